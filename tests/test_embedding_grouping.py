"""Embedding grouping (issue 11): the head, its discriminative loss, the host mean-shift and the trainer options."""
from __future__ import annotations

import json

import pytest
import torch

from crbp_deploy.errors import ConfigError, InputError
from crbp_deploy.models import create_model
from crbp_deploy.panoptic.postprocess import embedding_labels, postprocess
from crbp_deploy.training.losses import PUSH_MARGIN, discriminative_loss, panoptic_loss

CATS = [
    {"id": 1, "name": "curve", "isthing": 1},
    {"id": 3, "name": "blob", "isthing": 1},
    {"id": 184, "name": "ground", "isthing": 0},
]
EMBED = {"grouping": "embedding", "num_classes": 3, "thing_classes": [0, 1], "encoder_channels": 8, "channels": 6,
         "kernel_size": 3, "head_channels": 8, "downsample": 1, "embedding_dim": 4}


def _scene():
    """32x32: a curve cut in two by a second curve (one identity, two pieces), a 3-pixel stray cluster, stuff."""
    semantic = torch.full((1, 3, 32, 32), -5.0)
    semantic[0, 2] = 5.0  # stuff everywhere
    embedding = torch.zeros(1, 4, 32, 32)
    inst = torch.zeros(32, 32, dtype=torch.int64)
    for rows, k, vec in (((4, 6), 1, (3.0, 0, 0, 0)), ((20, 22), 1, (3.0, 0, 0, 0)), ((12, 14), 2, (0, 3.0, 0, 0))):
        inst[rows[0] : rows[1], 2:30] = k
        embedding[0, :, rows[0] : rows[1], 2:30] = torch.tensor(vec).view(4, 1, 1)
    thing = inst > 0
    semantic[0, 0][thing] = 5.0
    semantic[0, 2][thing] = -5.0
    semantic[0, 1, 30, 0:3] = 10.0  # stray blob pixels with their own embedding
    embedding[0, :, 30, 0:3] = torch.tensor((0, 0, 3.0, 0)).view(4, 1)
    return semantic, embedding, inst


def test_pieces_of_one_instance_get_one_label_and_strays_none():
    semantic, embedding, inst = _scene()
    labels, scores = embedding_labels(semantic, embedding, torch.tensor([True, True, False]), min_area=8)
    instance = labels[0] % 1000
    first = instance[5, 10]
    assert first > 0 and bool((instance[4:6, 2:30] == first).all()) and bool((instance[20:22, 2:30] == first).all())
    second = instance[13, 10]
    assert second > 0 and second != first and bool((instance[12:14, 2:30] == second).all())
    assert bool((instance[30, 0:3] == 0).all())  # under min_area: void, no slot taken
    assert int((scores[0] > 0).sum()) == 2
    background = inst == 0
    background[30, 0:3] = False
    assert bool((labels[0][background] == 2 * 1000).all())  # stuff: its class, no instance


def test_noise_is_bounded_by_the_seed_budget():
    """Random embeddings (no instance structure): few pixels group, the loop stops after its seed budget."""
    semantic = torch.zeros(1, 3, 96, 96)
    semantic[0, 0] = 5.0  # every pixel a thing
    labels, scores = embedding_labels(semantic, 3 * torch.randn(1, 8, 96, 96, generator=torch.Generator().manual_seed(0)),
                                      torch.tensor([True, True, False]), top_k=4, min_area=8)
    assert int((scores[0] > 0).sum()) <= 4
    assert labels.shape == (1, 96, 96)


def test_postprocess_dispatches_on_the_embedding_head():
    semantic, embedding, _ = _scene()
    [(pan, segments)] = postprocess({"semantic": semantic, "embedding": embedding}, CATS, min_area=8)
    things = [s for s in segments if s["isthing"]]
    assert len(things) == 2 and sorted(s["area"] for s in things) == [56, 112]
    assert pan[5, 10] == pan[21, 10] != pan[13, 10]
    with pytest.raises(InputError, match="embedding"):
        embedding_labels(semantic, embedding[..., :16], torch.tensor([True, True, False]))


def test_discriminative_loss_prefers_separated_instances():
    _, embedding, inst = _scene()
    good = discriminative_loss(embedding, inst[None])
    merged = discriminative_loss(torch.zeros_like(embedding), inst[None])
    assert float(good) < 0.01 < float(merged)
    assert float(merged) == pytest.approx(PUSH_MARGIN**2, rel=1e-4)  # the one pair of means at distance 0
    e = embedding.clone().requires_grad_()
    discriminative_loss(e + 0.5 * torch.randn_like(e), inst[None]).backward()
    assert e.grad is not None and float(e.grad.abs().sum()) > 0


def test_embedding_model_heads_loss_and_export_refusal(tmp_path):
    model = create_model("hgru-panoptic", EMBED).eval()
    out = model(torch.rand(2, 3, 32, 32), iters=3)
    assert set(out) >= {"semantic", "embedding"} and "center" not in out
    assert out["embedding"].shape == (2, 4, 32, 32)
    targets = {"semantic": torch.zeros(2, 32, 32, dtype=torch.int64), "instance": torch.zeros(2, 32, 32, dtype=torch.int64)}
    targets["instance"][:, 3:9, 3:9] = 1
    loss, parts = panoptic_loss(out, targets)
    assert loss.requires_grad and set(parts) == {"semantic", "embedding"}
    with pytest.raises(ConfigError, match="grouping"):
        create_model("hgru-panoptic", {**EMBED, "grouping": "boxes"})

    from crbp_deploy.export.panoptic_graph import WithPanopticLabels

    model.meta = {"categories": CATS}
    with pytest.raises(InputError, match="host"):
        WithPanopticLabels(model)


def test_trainer_keeps_epochs_and_checks_the_device(tmp_path, run_cli):
    from crbp_deploy.data.panoptic_synth import write_dataset
    from crbp_deploy.training.trainer import TrainConfig

    with pytest.raises(ConfigError, match="device"):
        TrainConfig.from_dict(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            TrainConfig.from_dict(device="cuda")
    write_dataset(tmp_path / "data", count=20, size=32, seed=0, val_fraction=0.2, progress=False)
    code, _, err = run_cli(
        "train", "--task", "panoptic", "--data", tmp_path / "data", "--out", tmp_path / "run",
        "--model-config", json.dumps({k: v for k, v in EMBED.items() if k not in ("num_classes", "thing_classes")}),
        "--steps", "3", "--neumann-steps", "3", "--forward-tol", "0.01", "--epochs", "2", "--batch-size", "8",
        "--keep-epochs", "--report-every", "0", "--quiet",
    )
    assert code == 0, err
    from crbp_deploy import checkpoint

    first, last = checkpoint.read(tmp_path / "run" / "epoch1.pt"), checkpoint.read(tmp_path / "run" / "last.pt")
    assert (tmp_path / "run" / "epoch2.pt").is_file()
    assert "contraction_report" not in first["meta"] and "contraction_report" in last["meta"]  # last epoch only
    assert last["config"]["grouping"] == "embedding"
