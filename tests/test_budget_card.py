"""One budget type with one default, the typed model card (old files load), one model-source resolver."""
from pathlib import Path

import pytest

from crbp_deploy import checkpoint, zoo
from crbp_deploy.budget import Budget
from crbp_deploy.errors import InputError
from crbp_deploy.modelcard import ModelCard, resolve_budget
from crbp_deploy.sources import resolve


def test_budget_merge_and_default():
    card = Budget(max_iters=30, tol=1e-2)
    assert card.merge({}) is card and card.merge({"tol": None}) is card
    assert card.merge({"iters": 5, "max_iters": None}) == Budget(iters=5)
    assert card.merge({"tol": 1e-4}) == Budget(max_iters=30, tol=1e-4)
    assert Budget(iters=20).merge({"max_iters": 7}) == Budget(max_iters=7, tol=Budget.DEFAULT.tol)
    assert Budget(iters=20).early() is Budget.DEFAULT and Budget(iters=3).early(card) is card
    assert resolve_budget(None) is Budget.DEFAULT and resolve_budget({"training": "none"}) is Budget.DEFAULT
    with pytest.raises(InputError, match="tol must be"):
        card.merge({"tol": -1})


def test_one_budget_resolution_request_then_card_then_default():
    meta = {"inference": {"budget": {"max_iters": 40, "tol": 1e-4, "policy": "learned", "threshold": 0.6, "patience": 2}}}
    assert resolve_budget(meta) == Budget(max_iters=40, tol=1e-4, policy="learned", threshold=0.6, patience=2)
    assert resolve_budget(meta, {"threshold": 0.8}).threshold == 0.8  # the request wins, key by key
    assert resolve_budget(meta, {"iters": 7}) == Budget(iters=7)
    assert resolve_budget(meta, {"policy": "tol"}) == Budget(max_iters=40, tol=1e-4)  # the policy dropped
    fallback = Budget(max_iters=9, tol=0.1)
    assert resolve_budget(None, {}, fallback) is fallback and resolve_budget({}, {"tol": 0.2}, fallback).max_iters == 9
    # a card with no policy (older checkpoints) keeps the tol rule
    assert resolve_budget({"inference": {"budget": {"max_iters": 80, "tol": 0.03}}}).policy == "tol"


@pytest.mark.parametrize("values, match", [
    ({"policy": "magic", "threshold": 0.5}, "unknown halting policy 'magic'; valid: tol, estimate, stable, learned"),
    ({"policy": "estimate"}, "the estimate policy needs threshold"),
    ({"policy": "learned", "threshold": 1.5}, r"probability in \(0, 1\]"),
    ({"policy": "stable", "threshold": 0.0, "patience": 0}, "patience must be an integer in 1..100"),
    ({"threshold": 0.5}, "the tol policy takes no threshold"),
    ({"speed": "fast"}, "unknown budget key"),
])
def test_bad_policies_are_one_clear_error(values, match):
    with pytest.raises(InputError, match=match):
        Budget.from_dict({"max_iters": 30, "tol": 1e-3, **values})


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
    budget = card.budget
    assert budget.early_exit and budget != Budget.DEFAULT  # calibrated, not the fallback
    calibration = card.inference["calibration"]
    assert calibration["budget"] == budget.kwargs() and calibration["metric"] == "IoU"
    assert set(calibration["check"]["chosen"]["per_length"]) == {"6", "9", "14", "20", "25"}
    assert calibration["oracle"]["mean_iterations"] > 0 and {"estimate", "stable", "learned"} <= {
        p["budget"].get("policy") for p in calibration["sweep"]}  # every policy was swept
    assert model.halting_head is not None and card.inference["halting_head"] == model.halting_head.spec()
    assert card.training["grad"] == "crbp" and model.meta["training_command"].startswith("crbp-deploy train")
