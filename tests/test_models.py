import pytest
import torch

from crbp_deploy.errors import ConfigError, InputError
from crbp_deploy.models import MAX_ITERATIONS, create_model, list_models

from conftest import tiny_model


def images_for(model, batch=2, size=24, seed=1):
    return torch.rand(batch, model.in_channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_registry_lists_models():
    assert {"hgru-pathfinder", "hgru-panoptic", "ff-panoptic"} <= set(list_models())


@torch.no_grad()
def test_panoptic_heads_at_input_resolution():
    model = create_model("hgru-panoptic", num_classes=5, thing_classes=[0, 3], channels=6, kernel_size=3)
    out = model(torch.rand(2, 3, 32, 48), iters=2)
    assert out["semantic"].shape == (2, 5, 32, 48)
    assert out["center"].shape == (2, 1, 32, 48)
    assert out["offset"].shape == (2, 2, 32, 48)
    with pytest.raises(InputError, match="multiple of the model stride 4"):
        model(torch.rand(1, 3, 30, 32), iters=1)


@torch.no_grad()
def test_ff_baseline_converges_in_one_step():
    model = tiny_model("ff-panoptic")
    out = model(torch.rand(2, 3, 16, 16), max_iters=50, tol=0.0)
    assert out["iterations"].tolist() == [1, 1] and out["residual"].tolist() == [0.0, 0.0]


def test_ff_baseline_has_at_least_as_many_parameters():
    assert create_model("ff-panoptic").num_parameters() >= create_model("hgru-panoptic").num_parameters()


@torch.no_grad()
def test_forward_shapes(model_name):
    model = tiny_model(model_name)
    x = images_for(model, batch=3, size=32)
    out = model(x, iters=3)
    assert out["iterations"].dtype == torch.int64 and out["iterations"].shape == (3,)
    assert out["iterations"].tolist() == [3, 3, 3]
    assert out["residual"].is_floating_point() and out["residual"].shape == (3,)
    heads = {k: v for k, v in out.items() if k not in ("iterations", "residual")}
    assert heads, "readout returned no heads"
    for name, tensor in heads.items():
        assert tensor.shape[0] == 3, name
        assert torch.isfinite(tensor).all(), name


@torch.no_grad()
def test_pathfinder_logits_shape():
    model = create_model("hgru-pathfinder", channels=4, kernel_size=5)
    out = model(torch.rand(2, 1, 20, 28), iters=2)
    assert out["logits"].shape == (2, 2, 20, 28)


@torch.no_grad()
def test_early_exit_with_zero_tol_equals_fixed_steps(model_name):
    model = tiny_model(model_name)
    if not model.recurrent:
        pytest.skip("feed-forward baseline: its step is the identity and converges at once")
    x = images_for(model)
    fixed = model(x, iters=7)
    early = model(x, max_iters=7, tol=0.0)
    assert early["iterations"].tolist() == [7, 7]
    for key in fixed:
        assert torch.equal(fixed[key], early[key]), key


@torch.no_grad()
def test_per_sample_iterations_match_single_runs(model_name):
    model = tiny_model(model_name)
    # different contrasts converge at different speeds
    x = images_for(model, batch=4) * torch.tensor([0.05, 0.3, 0.7, 1.0]).view(4, 1, 1, 1)
    batched = model(x, max_iters=100, tol=1e-2)
    alone = [model(x[i : i + 1], max_iters=100, tol=1e-2) for i in range(4)]
    assert batched["iterations"].tolist() == [int(a["iterations"]) for a in alone]
    if model.recurrent:
        assert len(set(batched["iterations"].tolist())) > 1, "inputs should need different budgets"
    assert (batched["residual"] <= 1e-2).all()
    for i, a in enumerate(alone):
        for key, value in a.items():
            if value.is_floating_point():
                torch.testing.assert_close(batched[key][i : i + 1], value, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_early_exit_stops_at_cap_when_not_converged(model_name):
    model = tiny_model(model_name)
    if not model.recurrent:
        pytest.skip("feed-forward baseline: its step is the identity and converges at once")
    out = model(images_for(model), max_iters=2, tol=1e-12)
    assert out["iterations"].tolist() == [2, 2]
    assert (out["residual"] > 1e-12).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one"),
        ({"iters": 0}, "outside"),
        ({"iters": 10**6}, "outside"),
        ({"max_iters": 10**6, "tol": 1e-3}, "outside"),
        ({"max_iters": 5}, "needs tol"),
        ({"max_iters": 5, "tol": -1.0}, "tol must be"),
        ({"max_iters": 5, "tol": float("nan")}, "tol must be"),
        ({"iters": 2.5}, "integer"),
        ({"iters": 3, "max_iters": 3, "tol": 0.1}, "exactly one"),
    ],
)
def test_bad_budget_is_rejected(kwargs, match):
    model = tiny_model("hgru-pathfinder")
    with pytest.raises(InputError, match=match):
        model(torch.rand(1, 1, 8, 8), **kwargs)


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.rand(1, 3, 8, 8), "N x 1 x H x W"),
        (torch.rand(8, 8), "N x 1 x H x W"),
        (torch.zeros(1, 1, 8, 8, dtype=torch.uint8), "floating point"),
    ],
)
def test_bad_images_are_rejected(images, match):
    with pytest.raises(InputError, match=match):
        tiny_model("hgru-pathfinder")(images, iters=1)


def test_config_rejects_unknown_and_bad_values():
    with pytest.raises(ConfigError, match="unknown key.*chanels"):
        create_model("hgru-pathfinder", chanels=8)
    with pytest.raises(ConfigError, match="must be odd"):
        create_model("hgru-pathfinder", kernel_size=4)
    with pytest.raises(ConfigError, match="must be int"):
        create_model("hgru-pathfinder", channels="8")
    with pytest.raises(ConfigError, match="unknown model"):
        create_model("no-such-model")


def test_max_iterations_constant_is_enforced():
    model = tiny_model("hgru-pathfinder")
    with pytest.raises(InputError, match=str(MAX_ITERATIONS)):
        model(torch.rand(1, 1, 8, 8), iters=MAX_ITERATIONS + 1)


def test_gate_bias_init_applies():
    """The public code's chronos init never reached the biases; ours must."""
    model = create_model("hgru-pathfinder", channels=6, kernel_size=3)
    b1 = model.cell.u1.bias
    assert (b1 > 0).all() and (b1 <= torch.log(torch.tensor(7.0))).all()
    assert (model.cell.u2.bias < 0).all()
