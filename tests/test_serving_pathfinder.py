"""Serving Pathfinder-task models (issue 24): the panoptic answer with one `contour` category whose one segment is
the model's argmax mask. In process for each artifact kind (tiny checkpoints of hgru-pathfinder and ff-pathfinder,
an early-exit ONNX export with its pieces), and through a real TorchServe for the paper's public checkpoint,
packaged from its `.pth.tar` as it is (tests/data/public_hgru)."""
import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crbp_deploy import checkpoint
from crbp_deploy.errors import CrbpError, InputError
from crbp_deploy.imageio import to_channels
from crbp_deploy.panoptic.encoding import decode_png
from crbp_deploy.serving.mask import CONTOUR, MaskPredictor
from crbp_deploy.serving.service import PanopticService, RawRequest
from crbp_deploy.sources import resolve
from conftest import tiny_model, untar_public
from serving_util import cli, need_torchserve, png, served

DATA = Path(__file__).parent / "data" / "public_hgru"
PUBLIC = "model_fscore_0000_epoch_00_checkpoint.pth.tar"
NAME = "model_fscore_0000_epoch_00_checkpoint"  # the default model name of PUBLIC: its stem without .pth.tar


@pytest.fixture(scope="module")
def inputs():
    return np.load(DATA / "inputs.npz")  # uint8 grayscale: pathfinder64, random64, ...


def ids_of(body: dict) -> np.ndarray:
    return decode_png(base64.b64decode(body["panoptic_png"]))


def argmax_mask(model, image: np.ndarray, **budget) -> np.ndarray:
    """The model's own decision at batch 1: class 1 of the argmax of its logits."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        return (model(x, **budget)["logits"].argmax(dim=1)[0] == 1).numpy()


def ask(service: PanopticService, data: bytes, **budget):
    headers = {f"X-{k.replace('_', '-')}": str(v) for k, v in budget.items()}
    return service.handle([RawRequest({"body": data}, {"body": "image/png"}, headers)])[0]


def check_answer(body: dict, expected: np.ndarray) -> None:
    """One contour category; the id map is the expected mask (id 1) and nothing else; the segment describes it."""
    assert body["categories"] == [CONTOUR]
    ids = ids_of(body)
    assert set(np.unique(ids).tolist()) <= {0, 1}
    np.testing.assert_array_equal(ids == 1, expected)
    if expected.any():
        (segment,) = body["segments_info"]
        assert {k: segment[k] for k in ("id", "category_id", "isthing", "area")} == {
            "id": 1, "category_id": 1, "isthing": 1, "area": int(expected.sum())}
        assert 0.5 <= segment["score"] <= 1.0  # the mean class-1 probability where class 1 wins
    else:
        assert body["segments_info"] == []


# --- the pieces -----------------------------------------------------------------------------------------------


def test_to_channels_gives_a_1_channel_model_the_luma():
    gray = np.random.default_rng(0).random((5, 7, 1), dtype=np.float32)
    assert to_channels(np.repeat(gray, 3, axis=2), 1).tobytes() == gray.tobytes()  # a gray image: bit for bit
    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    pillow = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32) / 255
    np.testing.assert_allclose(to_channels(rgb.astype(np.float32) / 255, 1)[..., 0], pillow, atol=1 / 255)
    assert to_channels(gray, 3).shape == (5, 7, 3)
    with pytest.raises(InputError, match="2 channel"):
        to_channels(np.zeros((4, 4, 2), np.float32), 1)


def test_mask_predictor_groups_the_argmax_into_one_contour_segment():
    logits = torch.zeros(2, 2, 6, 8)
    logits[0, 1, 1:3, 2:5] = 3.0  # class 1 wins on a 2 x 3 block of image 0; nowhere on image 1
    predictor = MaskPredictor(lambda images, **budget: {}, in_channels=1)
    (pan0, seg0), (pan1, seg1) = predictor.group({"logits": logits})
    assert int(pan0.sum()) == 6 and not pan1.any() and seg1 == []
    assert seg0 == [{"id": 1, "category_id": 1, "isthing": 1, "area": 6, "bbox": [2, 1, 3, 2],
                     "score": pytest.approx(float(torch.sigmoid(torch.tensor(3.0))))}]


def test_public_file_name_gives_a_valid_model_name(tmp_path):
    assert resolve(tmp_path / PUBLIC).name == NAME
    assert resolve(tmp_path / "m.pt").name == "m"


def test_a_panoptic_model_without_categories_is_still_refused(tmp_path):
    from crbp_deploy.serving.archive import package

    path = checkpoint.save(tiny_model("hgru-panoptic"), tmp_path / "untrained.pt")
    with pytest.raises(CrbpError, match="lists no categories; not a trained panoptic model"):
        package(path, out=tmp_path / "store", fmt="checkpoint")


# --- the service, in process ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny Pathfinder checkpoints (a recurrent and a feed-forward one) and the recurrent one's early-exit export."""
    from crbp_deploy.export import export_onnx

    folder = tmp_path_factory.mktemp("pathfinder")
    meta = {"inference": {"budget": {"max_iters": 20, "tol": 1e-3}}}
    built = {arch: checkpoint.save(tiny_model(arch, seed=2), folder / f"{arch}.pt", meta=meta)
             for arch in ("hgru-pathfinder", "ff-pathfinder")}
    built["onnx"] = folder / "hgru-pathfinder.onnx"
    export_onnx(checkpoint.load(built["hgru-pathfinder"]), built["onnx"], strategy="loop", pieces=True,
                max_iters=20, tol=1e-3)
    return built


@pytest.mark.parametrize("kind", ["hgru-pathfinder", "ff-pathfinder", "onnx"])
def test_service_answers_the_argmax_mask(tiny, inputs, kind):
    service = PanopticService(tiny[kind])
    assert service.task == "pathfinder" and service.describe()["task"] == "pathfinder"
    model = checkpoint.load(tiny["hgru-pathfinder" if kind == "onnx" else kind])
    image = inputs["pathfinder64"]
    reply = ask(service, png(image), max_iters=4, tol=0)
    assert reply.status == 200, reply.body
    check_answer(reply.body, argmax_mask(model, image[..., None] / 255, max_iters=4, tol=0.0))
    assert reply.body["iterations"] == (4 if model.recurrent else 1)
    assert reply.body["stopped"] in ("cap", "converged") and reply.body["size"] == [64, 64]
    bad = ask(service, b"not an image")
    assert bad.status == 400 and "not an image" in bad.body["message"]


def test_a_colour_image_reaches_a_1_channel_model_as_its_luma(tiny):
    rgb = np.random.default_rng(3).integers(0, 256, (40, 48, 3)).astype(np.uint8)
    reply = ask(PanopticService(tiny["hgru-pathfinder"]), png(rgb), max_iters=3, tol=0)
    assert reply.status == 200, reply.body
    luma = to_channels(rgb.astype(np.float32) / 255, 1)
    check_answer(reply.body, argmax_mask(checkpoint.load(tiny["hgru-pathfinder"]), luma, max_iters=3, tol=0.0))


def test_package_takes_pathfinder_models_for_every_engine(tiny, tmp_path):
    """A .mar (TorchServe, Ray) and a Triton repository entry; the served answers are the service's (above)."""
    from crbp_deploy.serving.archive import package
    from crbp_deploy.serving.triton_model import package_triton

    pytest.importorskip("model_archiver", reason="torch-model-archiver is not installed")
    mar = package(tiny["hgru-pathfinder"], out=tmp_path / "store", fmt="checkpoint")
    assert mar.path.name == "hgru-pathfinder.mar" and mar.path.is_file()
    repo = package_triton(tiny["onnx"], out=tmp_path / "repo")
    assert (tmp_path / "repo" / "hgru-pathfinder" / "config.pbtxt").is_file() and repo.model_file == "hgru-pathfinder.onnx"


# --- the paper's public checkpoint through a real TorchServe --------------------------------------------------


@pytest.mark.serve
def test_public_checkpoint_packaged_and_served_by_torchserve(tmp_path, inputs):
    """`package` takes the public .pth.tar as it is (default name: its stem), `serve` answers a Pathfinder PNG with
    the model's own argmax at batch 1, reports iterations, and refuses a bad image with a 4xx."""
    from crbp_deploy.serving.client import Client

    need_torchserve()
    untar_public(tmp_path, PUBLIC)
    store = tmp_path / "store"
    packaged = cli("package", tmp_path / PUBLIC, "--out", store)
    assert packaged.returncode == 0, packaged.stdout + packaged.stderr
    assert (store / f"{NAME}.mar").is_file()
    image = inputs["pathfinder64"]
    with served(store, tmp_path / "run") as server, Client(server["url"] + NAME, token=server["token"]) as client:
        fixed = client.post(png(image), max_iters=6, tol=0.0)  # the public step count
        early = client.post(png(image), max_iters=40, tol=5e-2)
        bad = client.post(b"not an image", content_type="image/png")
    assert fixed.status == 200, fixed.body
    expected = argmax_mask(checkpoint.load(tmp_path / PUBLIC), image[..., None] / 255, iters=6)
    assert 0 < expected.sum() < expected.size  # a real mask, not all one class
    check_answer(fixed.body, expected)
    assert fixed.body["iterations"] == 6 and fixed.body["stopped"] == "cap" and fixed.body["model"] == NAME
    assert early.status == 200, early.body
    assert 1 <= early.body["iterations"] <= 40 and early.body["categories"] == [CONTOUR]
    assert bad.status == 400 and "not an image" in bad.body["message"], bad.body
