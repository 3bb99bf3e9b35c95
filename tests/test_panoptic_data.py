"""Synthetic panoptic set in the COCO panoptic layout, and the COCO panoptic reader."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from crbp_deploy.data.coco_panoptic import (
    IGNORE,
    DatasetError,
    PanopticDataset,
    category_ids,
    category_index,
    collate,
    dense_targets,
    id_to_rgb,
    load_rgb,
    rgb_to_id,
)
from crbp_deploy.data.panoptic_synth import CATEGORIES, SynthConfig, generate_sample, write_dataset
from crbp_deploy.errors import ConfigError, CrbpError, InputError

SIZE = 64


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """A few dozen small scenes, written once for the module."""
    out = tmp_path_factory.mktemp("pan") / "ds"
    write_dataset(out, count=36, size=SIZE, seed=7, val_fraction=0.25)
    return out


@pytest.fixture
def small_copy(tmp_path):
    out = tmp_path / "small"
    write_dataset(out, count=4, size=48, seed=1, val_fraction=0.25)
    return out


def _all(root):
    """(split, image record, annotation, ids) for every image on disk."""
    for split in ("train", "val"):
        doc = json.loads((root / split / "annotations.json").read_text())
        anns = {a["image_id"]: a for a in doc["annotations"]}
        for im in doc["images"]:
            ann = anns[im["id"]]
            ids = rgb_to_id(np.asarray(Image.open(root / split / "panoptic" / ann["file_name"])))
            yield split, im, ann, ids


# ---------------------------------------------------------------- generator


def test_generate_sample_is_deterministic_and_seed_dependent():
    a, b, c = generate_sample(3, 11, SIZE), generate_sample(3, 11, SIZE), generate_sample(3, 12, SIZE)
    assert a[0].dtype == np.uint8 and a[0].shape == (SIZE, SIZE, 3)
    assert a[1].dtype == np.uint32 and a[1].shape == (SIZE, SIZE)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])


def test_same_seed_writes_identical_bytes(tmp_path):
    for name in ("a", "b"):
        write_dataset(tmp_path / name, count=5, size=48, seed=3, val_fraction=0.4)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 2 * 5 + 2
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_categories_are_coco_like_and_noncontiguous():
    things = [c for c in CATEGORIES if c["isthing"]]
    stuff = [c for c in CATEGORIES if not c["isthing"]]
    assert len(things) >= 2 and len(stuff) >= 2
    ids = sorted(c["id"] for c in CATEGORIES)
    assert ids != list(range(ids[0], ids[0] + len(ids)))
    for c in CATEGORIES:
        assert {"id", "name", "supercategory", "isthing", "color"} <= set(c)


def test_json_schema_and_consistency_with_pngs(dataset_dir):
    n = 0
    for split, im, ann, ids in _all(dataset_dir):
        n += 1
        assert set(im) >= {"id", "file_name", "width", "height"}
        assert (im["height"], im["width"]) == ids.shape == (SIZE, SIZE)
        assert ann["file_name"].endswith(".png") and (dataset_dir / split / "images" / im["file_name"]).is_file()
        listed = {s["id"] for s in ann["segments_info"]}
        assert set(np.unique(ids).tolist()) - {0} == listed
        for s in ann["segments_info"]:
            assert set(s) == {"id", "category_id", "iscrowd", "bbox", "area"}
            mask = ids == s["id"]
            rows, cols = np.nonzero(mask)
            assert s["area"] == mask.sum()
            assert s["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
    assert n == 36
    train = json.loads((dataset_dir / "train" / "annotations.json").read_text())
    val = json.loads((dataset_dir / "val" / "annotations.json").read_text())
    assert (len(train["images"]), len(val["images"])) == (27, 9)
    assert train["categories"] == CATEGORIES


def test_crowd_void_and_close_curves_present(dataset_dir):
    cat_of = {}
    crowd = void = images_with_close_curves = 0
    for _, _, ann, ids in _all(dataset_dir):
        void += int((ids == 0).sum())
        crowd += sum(s["iscrowd"] for s in ann["segments_info"])
        curves = [ids == s["id"] for s in ann["segments_info"] if s["category_id"] == 1 and not s["iscrowd"]]
        close = False
        for i, a in enumerate(curves):
            padded = np.pad(a, 2)
            grown = np.zeros_like(a)  # a grown by 2 px (square neighbourhood), no wrap-around
            for dy in range(5):
                for dx in range(5):
                    grown |= padded[dy : dy + SIZE, dx : dx + SIZE]
            close |= any(bool((grown & b).any()) for b in curves[i + 1 :])
        images_with_close_curves += close
        for s in ann["segments_info"]:
            cat_of[s["category_id"]] = cat_of.get(s["category_id"], 0) + 1
    assert crowd >= 1 and void >= 1
    assert images_with_close_curves >= 18  # crossings are the point of the set: most images have one
    assert all(cat_of.get(c["id"], 0) > 0 for c in CATEGORIES)


def test_synth_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="bogus"):
        SynthConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="curves"):
        SynthConfig.from_dict({"curves": [4, 2]})
    with pytest.raises(ConfigError, match="size"):
        generate_sample(0, 0, 8)
    with pytest.raises(ConfigError, match="val_fraction"):
        write_dataset("/nonexistent-unused", count=2, size=32, val_fraction=1.5)


def test_crash_never_leaves_json_listing_missing_files(small_copy):
    def boom(i):
        if i == 1:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        write_dataset(small_copy, count=6, size=48, seed=2, progress=boom)
    for split in ("train", "val"):
        assert not (small_copy / split / "annotations.json").exists()
        assert not list((small_copy / split).rglob("*.tmp"))
    with pytest.raises(DatasetError, match="annotations.json"):
        PanopticDataset.from_split(small_copy, "train")


# ---------------------------------------------------------------- ids and categories


def test_id_rgb_round_trip_is_exact():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1 << 24, (17, 23)).astype(np.uint32)
    ids[0, :3] = [0, 1, (1 << 24) - 1]
    assert np.array_equal(rgb_to_id(id_to_rgb(ids)), ids)
    rgb = rng.integers(0, 256, (9, 5, 3)).astype(np.uint8)
    assert np.array_equal(id_to_rgb(rgb_to_id(rgb)), rgb)
    assert rgb_to_id(np.array([[[1, 2, 3]]], np.uint8))[0, 0] == 1 + 2 * 256 + 3 * 65536
    with pytest.raises(InputError):
        id_to_rgb(np.array([1 << 24]))


def test_category_index_and_inverse():
    index = category_index(CATEGORIES)
    assert index == {1: 0, 3: 1, 184: 2, 190: 3}
    assert category_ids(CATEGORIES) == [1, 3, 184, 190]
    assert all(category_ids(CATEGORIES)[i] == cid for cid, i in index.items())


# ---------------------------------------------------------------- reader


def test_reader_round_trip(dataset_dir):
    ds = PanopticDataset.from_split(dataset_dir, "val")
    assert len(ds) == 9
    item = ds[0]
    rgb, pan, segments = generate_sample(item["image_id"], 7, SIZE)
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, SIZE, SIZE)
    assert torch.equal(item["image"], torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    assert torch.equal(item["pan_ids"], torch.from_numpy(pan.astype(np.int64)))
    assert [{k: s[k] for k in segments[0]} for s in item["segments"]] == segments
    thing_ids = [s["id"] for s in segments if s["category_id"] in (1, 3) and not s["iscrowd"]]
    assert int(item["thing_instance"].max()) == len(thing_ids)
    crowd = [s["id"] for s in segments if s["iscrowd"]]
    ignored = (item["pan_ids"] == 0) | torch.isin(item["pan_ids"], torch.tensor(crowd + [-1]))
    assert torch.equal(item["semantic"] == IGNORE, ignored)
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, SIZE, SIZE) and len(batch["segments"]) == 2


def test_dense_targets_on_hand_made_example():
    ids = np.full((6, 8), 10, np.uint32)  # stuff "ground"
    ids[0, 0] = 0  # void
    ids[1:3, 1:3] = 20  # thing A (curve): centre of mass (1.5, 1.5)
    ids[4, 4:7] = 30  # thing B (blob): centre of mass (4, 5)
    ids[5, 7] = 40  # crowd blob
    segments = [
        {"id": 10, "category_id": 184, "iscrowd": 0, "isthing": False},
        {"id": 20, "category_id": 1, "iscrowd": 0, "isthing": True},
        {"id": 30, "category_id": 3, "iscrowd": 0, "isthing": True},
        {"id": 40, "category_id": 3, "iscrowd": 1, "isthing": True},
    ]
    index = category_index(CATEGORIES)
    sigma = 2.0
    t = dense_targets(ids, segments, index, stride=1, sigma=sigma)
    semantic = np.full((6, 8), 2)
    semantic[0, 0] = semantic[5, 7] = IGNORE
    semantic[1:3, 1:3], semantic[4, 4:7] = 0, 1
    assert np.array_equal(t["semantic"].numpy(), semantic)
    inst = np.zeros((6, 8), int)
    inst[1:3, 1:3], inst[4, 4:7] = 1, 2
    assert np.array_equal(t["thing_instance"].numpy(), inst)
    assert np.array_equal(t["offset_mask"][0].numpy(), (inst > 0).astype(np.float32))
    assert t["center"].shape == (1, 6, 8) and t["offset"].shape == (2, 6, 8)
    assert t["center"][0, 4, 5] == 1.0 and t["center"].max() == 1.0
    assert t["center"][0, 1, 1] == pytest.approx(np.exp(-0.5 / (2 * sigma**2)))
    assert t["offset"][:, 1, 1].tolist() == [0.5, 0.5] and t["offset"][:, 2, 2].tolist() == [-0.5, -0.5]
    assert t["offset"][:, 4, 4].tolist() == [0.0, 1.0] and t["offset"][:, 4, 6].tolist() == [0.0, -1.0]
    assert t["offset"][:, 0, 7].abs().sum() == 0  # stuff: no offset
    # stride 2: cell (i, j) samples pixel (2i + 1, 2j + 1)
    s = dense_targets(torch.from_numpy(ids.astype(np.int64)), segments, index, stride=2, sigma=sigma)
    assert s["semantic"].shape == (3, 4)
    assert s["semantic"][0, 0] == 0 and s["thing_instance"][0, 0] == 1
    assert s["offset"][:, 0, 0].tolist() == [0.5, 0.5]
    assert s["semantic"][2, 3] == IGNORE  # pixel (5, 7): crowd
    assert s["center"][0, 1, 2] == pytest.approx(np.exp(-1.0 / (2 * sigma**2)))  # pixel (3, 5), 1 px from B


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA", "1"])
def test_images_of_any_mode_load_as_rgb(tmp_path, mode):
    gray = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    if mode == "I;16":
        img = Image.fromarray(gray.astype(np.uint16) * 257)
        assert img.mode == "I;16"
    elif mode == "RGBA":
        img = Image.fromarray(np.dstack([gray, gray, gray, np.full_like(gray, 128)]))
    else:
        img = Image.fromarray(gray).convert(mode)
    img.save(tmp_path / "x.png")
    rgb = load_rgb(tmp_path / "x.png")
    assert rgb.shape == (12, 10, 3) and rgb.dtype == np.uint8
    if mode in ("L", "I;16", "RGBA", "LA"):
        assert np.array_equal(rgb[..., 0], gray) and np.array_equal(rgb[..., 2], gray)


def test_reads_real_coco_layout_with_jpeg_images(small_copy, tmp_path):
    """COCO 2017 as unpacked: val2017/*.jpg, annotations/panoptic_val2017.json + panoptic_val2017/*.png."""
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    shutil.copytree(small_copy / "train" / "panoptic", root / "annotations" / "panoptic_val2017")
    doc = json.loads((small_copy / "train" / "annotations.json").read_text())
    for im in doc["images"]:
        jpg = im["file_name"].replace(".png", ".jpg")
        Image.open(small_copy / "train" / "images" / im["file_name"]).convert("L").save(root / "val2017" / jpg)
        im["file_name"] = jpg
    (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps(doc))
    ds = PanopticDataset.from_coco(root, "val2017", stride=4)
    item = ds[0]
    assert item["image"].shape == (3, 48, 48) and item["semantic"].shape == (12, 12)


# ---------------------------------------------------------------- corrupt datasets


def _first(root, split="train"):
    doc = json.loads((root / split / "annotations.json").read_text())
    return doc, doc["images"][0]["file_name"], doc["annotations"][0]["file_name"]


def test_missing_annotations(small_copy):
    (small_copy / "train" / "annotations.json").unlink()
    with pytest.raises(DatasetError, match=r"train/annotations\.json"):
        PanopticDataset.from_split(small_copy, "train")


@pytest.mark.parametrize(
    "content",
    ["{not json", json.dumps({"foo": 1}), json.dumps({"images": [], "annotations": [{"image_id": 1, "segmentation": []}], "categories": []})],
)
def test_json_that_is_not_coco_panoptic(small_copy, content):
    (small_copy / "train" / "annotations.json").write_text(content)
    with pytest.raises(DatasetError, match=r"train/annotations\.json"):
        PanopticDataset.from_split(small_copy, "train")


@pytest.mark.parametrize("sub", ["images", "panoptic"])
def test_listed_png_missing(small_copy, sub):
    _, image_name, pan_name = _first(small_copy)
    (small_copy / "train" / sub / (image_name if sub == "images" else pan_name)).unlink()
    with pytest.raises(DatasetError, match=rf"train/{sub}/{image_name}"):
        PanopticDataset.from_split(small_copy, "train")


@pytest.mark.parametrize("sub", ["images", "panoptic"])
def test_truncated_png(small_copy, sub):
    _, name, _ = _first(small_copy)
    path = small_copy / "train" / sub / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    ds = PanopticDataset.from_split(small_copy, "train")
    with pytest.raises(DatasetError, match=rf"train/{sub}/{name}"):
        ds[0]


def test_panoptic_ids_not_in_segments_info(small_copy):
    _, _, pan_name = _first(small_copy)
    path = small_copy / "train" / "panoptic" / pan_name
    ids = rgb_to_id(np.asarray(Image.open(path)))
    ids[5:8, 5:8] = 123457
    Image.fromarray(id_to_rgb(ids)).save(path)
    with pytest.raises(DatasetError, match=rf"{pan_name}.*123457"):
        PanopticDataset.from_split(small_copy, "train")[0]


def test_segment_listed_but_absent_from_png(small_copy):
    doc, _, pan_name = _first(small_copy)
    doc["annotations"][0]["segments_info"].append({"id": 99, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1})
    (small_copy / "train" / "annotations.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=rf"{pan_name}.*99"):
        PanopticDataset.from_split(small_copy, "train")[0]


def test_image_and_panoptic_size_mismatch(small_copy):
    _, name, _ = _first(small_copy)
    Image.new("RGB", (40, 48)).save(small_copy / "train" / "images" / name)
    with pytest.raises(DatasetError, match=rf"images/{name}.*40x48") as err:
        PanopticDataset.from_split(small_copy, "train")[0]
    assert isinstance(err.value, CrbpError)


def test_unknown_category_in_json(small_copy):
    doc, _, _ = _first(small_copy)
    doc["annotations"][0]["segments_info"][0]["category_id"] = 2
    (small_copy / "train" / "annotations.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="unknown category_id 2"):
        PanopticDataset.from_split(small_copy, "train")


# ---------------------------------------------------------------- CLI


def test_cli_writes_splits(tmp_path, run_cli):
    out = tmp_path / "cli"
    code, stdout, err = run_cli("data", "panoptic", "--out", out, "--count", "5", "--size", "40", "--seed", "2",
                                "--val-fraction", "0.4")
    assert code == 0, err
    assert "wrote 3 train, 2 val images" in stdout
    for split, n in (("train", 3), ("val", 2)):
        doc = json.loads((out / split / "annotations.json").read_text())
        assert len(doc["images"]) == n
        assert len(list((out / split / "images").glob("*.png"))) == n
        assert len(list((out / split / "panoptic").glob("*.png"))) == n
    assert not list(out.rglob("*.tmp"))
    assert len(PanopticDataset.from_split(out, "val")) == 2


@pytest.mark.parametrize(
    "args, match",
    [(["--size", "8"], "size"), (["--config", '{"bogus": 1}'], "bogus"), (["--count", "0"], "count"), (["--config", "[1]"], "JSON object")],
)
def test_cli_bad_options_are_config_errors(tmp_path, args, match, run_cli, one_error_line):
    code, _, err = run_cli("data", "panoptic", "--out", tmp_path / "x", *args)
    one_error_line(code, err, match)
    assert not (tmp_path / "x").exists()
