"""The Neumann series runs where it converges: the patient stop rule on a non-normal contraction
(the public rule kept as an option), a floor relative to the loss scale, one set of defaults for
every entry point, the trainer's Neumann statistics and warning, and the contraction report."""
import inspect
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crbp_deploy.config import StrictConfig
from crbp_deploy.contraction import contraction_report, summary_line
from crbp_deploy.data.panoptic_synth import write_dataset
from crbp_deploy.models import RecurrentSegmenter
from crbp_deploy.training import NeumannInfo, solve
from crbp_deploy.training import trainer as trainer_module
from crbp_deploy.training.distributed import World
from crbp_deploy.training.trainer import NeumannWarning, TrainConfig, train

from conftest import tiny_model

#: ρ(A) = 0.5 but ‖A‖₂ ≈ 2.1: the series Σ (Aᵀ)ᵏ v converges, yet ‖Aᵀ e₀‖ = 2.06 ‖e₀‖.
NON_NORMAL = torch.tensor([[0.5, 2.0], [0.0, 0.3]], dtype=torch.float64)


@dataclass(frozen=True)
class _Config(StrictConfig):
    pass


class MixToy(RecurrentSegmenter):
    """h <- A h + x at every pixel (A mixes the channels): J = A ⊗ I exactly."""

    def __init__(self, a: torch.Tensor):
        super().__init__(_Config())
        self.a = a
        self.in_channels = a.shape[0]
        self.b = nn.Parameter(torch.zeros(1, a.shape[0], 1, 1, dtype=torch.float64))

    def encode(self, images):
        return images + self.b

    def init_state(self, ctx):
        return torch.zeros_like(ctx)

    def step(self, ctx, h):
        return torch.einsum("oi,bihw->bohw", self.a, h) + ctx

    def readout(self, ctx, h):
        return {"logits": h}


def _images(channels, batch=2, size=4, seed=1):
    return torch.rand(batch, channels, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _first_channel_grad(a, **kwargs):
    """dL/db for L = Σ h*[:, 0]: v₀ = e₀ at every pixel, so dL/db = pixels · (I − Aᵀ)⁻¹ e₀."""
    model, x = MixToy(a), _images(a.shape[0])
    sol = solve(model, x, steps=200, grad="rbp", **kwargs)
    sol.state[:, 0].sum().backward()
    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    return model.b.grad.flatten() / pixels, sol.neumann


def test_patient_rule_runs_a_non_normal_contraction_to_the_exact_solve():
    e0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(2, dtype=torch.float64) - NON_NORMAL.T, e0)
    got, info = _first_channel_grad(NON_NORMAL, neumann_steps=80)
    assert info.v_norms[1] > 2 * info.v_norms[0], "the first term must grow for this test to mean anything"
    assert info.stop in ("steps", "floor") and info.terms >= 20
    torch.testing.assert_close(got, exact, rtol=1e-7, atol=0)
    # the public code's rule throws the whole series away at the first growing term
    public, info = _first_channel_grad(NON_NORMAL, neumann_steps=80, neumann_rule="public")
    assert (info.stop, info.terms) == ("growth", 0)
    torch.testing.assert_close(public, e0)
    assert float((public - exact).norm() / exact.norm()) > 0.5


@pytest.mark.parametrize("rate, stop_after", [(1.5, 3), (5.0, 1)])
def test_patient_rule_rolls_a_divergent_series_back(rate, stop_after):
    """1.5: three growing terms in a row; 5: one term above 4‖v₀‖. Either way g = v₀ (0 terms)."""
    got, info = _first_channel_grad(torch.tensor([[rate]], dtype=torch.float64), neumann_steps=20)
    assert (info.stop, info.terms) == ("growth", 0)
    assert len(info.v_norms) == stop_after + 1  # VJPs spent before giving up
    torch.testing.assert_close(got, torch.ones(1, dtype=torch.float64))
    assert info.ratio == 1.0 and info.summary() == {"terms": 0, "stop": "growth", "ratio": 1.0}


def test_patience_and_growth_limit_are_options():
    _, info = _first_channel_grad(NON_NORMAL, neumann_steps=80, neumann_growth_limit=2.0)
    assert (info.stop, info.terms) == ("growth", 0)  # ‖v₁‖ = 2.06‖v₀‖ > 2‖v₀‖
    _, info = _first_channel_grad(torch.tensor([[1.5]], dtype=torch.float64), neumann_steps=20, neumann_patience=5,
                                  neumann_growth_limit=100.0)
    assert (info.stop, info.terms, len(info.v_norms)) == ("growth", 0, 6)


def test_relative_floor_makes_the_solve_invariant_to_the_loss_scale():
    model, x = tiny_model("hgru-pathfinder").double(), _images(1, size=10)
    grads, terms = [], []
    for scale in (1.0, 1e-9):
        model.zero_grad(set_to_none=True)
        sol = solve(model, x, steps=30, grad="crbp", lcp_lambda=10.0)
        (scale * sol.outputs["logits"].square().mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        terms.append(sol.neumann.terms)
    assert terms[0] == terms[1] >= 5
    cosine = float(grads[0] @ grads[1] / (grads[0].norm() * grads[1].norm()))  # F.cosine_similarity clamps at 1e-8
    assert cosine > 1 - 1e-9
    torch.testing.assert_close(grads[1], 1e-9 * grads[0], rtol=1e-6, atol=0)


def test_zero_gradient_solves_to_zero():
    model, x = MixToy(NON_NORMAL), _images(2)
    sol = solve(model, x, steps=5, grad="rbp")
    (0.0 * sol.state.sum()).backward()
    assert (sol.neumann.stop, sol.neumann.terms) == ("floor", 0) and float(model.b.grad.abs().sum()) == 0


def test_one_set_of_defaults_for_solve_trainer_and_cli():
    from crbp_deploy.commands.train import train as train_command

    solve_defaults = inspect.signature(solve).parameters
    cli_defaults = inspect.signature(train_command).parameters
    cfg = TrainConfig()
    for name in ("lcp_lambda", "lcp_reduction", "lcp_kind", "neumann_rule", "neumann_patience", "neumann_growth_limit"):
        assert solve_defaults[name].default == getattr(cfg, name) == cli_defaults[name].default.default, name
    assert cfg.penalty_weight == cli_defaults["penalty_weight"].default.default
    assert cfg.neumann_steps == solve_defaults["neumann_steps"].default == cli_defaults["neumann_steps"].default.default
    assert cfg.lcp_reduction == "mean" and cfg.neumann_rule == "patient"


def _log(pairs):
    log = trainer_module._NeumannLog()
    for terms, stop in pairs:
        log.add(NeumannInfo(terms=terms, stop=stop, v_norms=[1.0] * (terms + 1)))
    return log.summary(World())


def test_epoch_summary_and_early_growth_warning():
    two_early = _log([(0, "growth"), (2, "growth"), (3, "growth")] + [(15, "steps")] * 7)
    assert two_early["terms_mean"] == pytest.approx((2 + 3 + 105) / 10)
    assert two_early["share_terms_ge_10"] == 0.7 and two_early["share_growth_under_3"] == 0.2
    assert two_early["stop_share"] == {"steps": 0.7, "growth": 0.3, "cap": 0.0, "floor": 0.0, "nonfinite": 0.0}
    assert two_early["batches"]["terms"] == [0, 2, 3] + [15] * 7
    assert "20%" in trainer_module._neumann_warning(4, two_early, "public")
    one_early = _log([(1, "growth")] + [(15, "steps")] * 9)  # 10% is not more than 10%
    assert trainer_module._neumann_warning(4, one_early, "patient") is None


@pytest.fixture(scope="module")
def panoptic_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pan")
    write_dataset(root, count=15, size=32, seed=0, val_fraction=0.2, progress=False)
    return root


def test_trainer_records_neumann_statistics_and_contraction(panoptic_data, tmp_path, monkeypatch):
    from crbp_deploy import checkpoint

    tiny = {"encoder_channels": 8, "channels": 6, "kernel_size": 3, "head_channels": 8, "downsample": 1}
    cfg = TrainConfig.from_dict(task="panoptic", data=str(panoptic_data), model_config=tiny, steps=3,
                                neumann_steps=5, batch_size=4, epochs=1)
    monkeypatch.setattr(trainer_module, "EARLY_GROWTH_SHARE", -1.0)  # every epoch warns
    with pytest.warns(NeumannWarning, match="stopped on growth"):
        record = train(cfg, tmp_path, progress=False)
    n = record["neumann"]
    assert len(n["batches"]["terms"]) == len(n["batches"]["stop"]) == 3  # 12 training images / 4
    assert sum(n["stop_share"].values()) == pytest.approx(1.0)
    assert 0 <= record["neumann_terms"] <= 5 and record["warnings"]
    meta = checkpoint.load(tmp_path / "last.pt").meta
    assert meta["history"][-1]["neumann"]["batches"] == n["batches"]
    report = meta["contraction_report"]
    assert report["inputs"] == 4 and len(report["spectral_radius"]) == 4 and report["neumann"]["rule"] == "patient"


def test_contraction_report_measures_a_known_jacobian():
    a = torch.tensor([[0.5, 2.0], [0.0, 0.3]], dtype=torch.float64)
    report = contraction_report(MixToy(a), _images(2, batch=3, size=5), power_iters=40, radius_iters=40)
    assert report["inputs"] == 3 and report["fixed_point"]["residual"][0] <= 1e-4
    for rho, norm, colsum in zip(report["spectral_radius"], report["jacobian_norm"], report["max_column_sum"]):
        assert rho == pytest.approx(0.5, rel=1e-3)
        assert norm == pytest.approx(float(torch.linalg.matrix_norm(a, 2)), rel=1e-3)
        assert colsum == pytest.approx(float(a.sum(0).max()))  # 1ᵀJ for J = A ⊗ I: the column sums of A
    assert report["neumann"]["terms"] == [15] * 3 and report["neumann"]["stop"] == ["steps"] * 3
    assert "spectral radius" in summary_line(report)


@pytest.mark.parametrize("a", [NON_NORMAL, torch.tensor([[0.5]], dtype=torch.float64), torch.tensor([[1.5]], dtype=torch.float64)])
def test_report_reads_the_public_rule_off_the_patient_run(a):
    from crbp_deploy.contraction import _public_rule
    from crbp_deploy.training import neumann_vjp

    prev = torch.rand(1, a.shape[0], 3, 3, dtype=torch.float64, requires_grad=True)
    last = torch.einsum("oi,bihw->bohw", a, prev)
    v0 = torch.zeros_like(prev)
    v0[:, 0] = 1.0
    _, patient = neumann_vjp(last, prev, v0, steps=15, rule="patient")
    _, public = neumann_vjp(last, prev, v0, steps=15, rule="public")
    assert _public_rule(patient) == (public.terms, public.stop)
