"""One budget type with one default, the typed model card (old files load), one model-source resolver."""
from pathlib import Path

import pytest

from crbp_deploy import checkpoint, zoo
from crbp_deploy.budget import Budget
from crbp_deploy.errors import InputError
from crbp_deploy.modelcard import ModelCard
from crbp_deploy.sources import resolve


def test_budget_merge_and_default():
    card = Budget(max_iters=30, tol=1e-2)
    assert card.merge({}) is card and card.merge({"tol": None}) is card
    assert card.merge({"iters": 5, "max_iters": None}) == Budget(iters=5)
    assert card.merge({"tol": 1e-4}) == Budget(max_iters=30, tol=1e-4)
    assert Budget(iters=20).merge({"max_iters": 7}) == Budget(max_iters=7, tol=Budget.DEFAULT.tol)
    assert Budget(iters=20).early() is Budget.DEFAULT and Budget(iters=3).early(card) is card
    assert Budget.from_card(None) is Budget.DEFAULT and Budget.from_card({"training": "none"}) is Budget.DEFAULT
    with pytest.raises(InputError, match="tol must be"):
        card.merge({"tol": -1})


OLD_CHECKPOINT = Path(__file__).parent / "data" / "old-crbp-panoptic.pt"  # bundled until issue 11, as shipped


@pytest.mark.parametrize("source, size", [(OLD_CHECKPOINT, 64), (zoo.path(), 128)], ids=["previous", "bundled"])
def test_shipped_checkpoints_load_as_typed_cards(source, size):
    meta = checkpoint.read(source)["meta"]  # the file as shipped, never rewritten
    card = ModelCard.of(checkpoint.load(source))
    assert card == ModelCard.of(meta) and card.budget == Budget.from_dict(meta["inference"]["budget"])
    assert [c["id"] for c in card.categories] == [c["id"] for c in meta["categories"]]
    assert card.postprocess.min_area == meta["inference"]["postprocess"]["min_area"]
    assert card.image_size == size and set(card.extra) == set(meta) - {"categories", "inference", "training", "evaluation"}


def test_one_resolver_for_every_kind(tmp_path):
    assert (resolve(None).kind, resolve(None).label) == ("bundled", f"bundled:{zoo.DEFAULT}")
    assert resolve("hgru-pathfinder").kind == "registry"
    assert resolve(tmp_path / "m.pt").kind == "checkpoint"
    assert resolve("x.onnx").kind == "onnx" and resolve("x.plan").kind == "engine"
    with pytest.raises(InputError, match="unknown artifact type"):
        resolve("nothing-like-this")


def test_bundled_pathfinder_model_carries_its_calibrated_budget():
    model = zoo.load("crbp-pathfinder")
    card = ModelCard.of(model)
    assert model.arch == "hgru-pathfinder" and "crbp-pathfinder" in zoo.names()
    budget = Budget.from_card(card)
    assert budget.early_exit and budget != Budget.DEFAULT  # calibrated, not the fallback
    calibration = card.inference["calibration"]
    assert calibration["budget"] == budget.kwargs() and calibration["metric"] == "IoU"
    assert set(calibration["sweep"][0]["per_length"]) == {"6", "9", "14", "20", "25"}
    assert card.training["grad"] == "crbp" and model.meta["training_command"].startswith("crbp-deploy train")
