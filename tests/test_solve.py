"""C-RBP solver: RBP/C-RBP gradients equal BPTT at convergence, the LCP equals its brute-force
value, every Neumann stopping rule fires, and recorded memory does not grow with the steps."""
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crbp_deploy.config import StrictConfig
from crbp_deploy.errors import InputError
from crbp_deploy.models import RecurrentSegmenter
from crbp_deploy.training import GRAD_MODES, lipschitz_penalty, neumann_vjp, solve

from conftest import tiny_model


@pytest.fixture(autouse=True)
def _threads():
    """Overrides conftest's 2 threads: these ops are tiny, and a second thread only spins."""
    torch.set_num_threads(1)


@dataclass(frozen=True)
class ToyConfig(StrictConfig):
    pass


class TanhToy(RecurrentSegmenter):
    """h <- tanh(k * (M h) + x): Lipschitz <= rate (about 0.5 measured at its fixed point).

    M = rate W / ‖W‖₂ mixes channels (spectral norm exactly `rate`); k is a 3x3 spatial kernel
    made non-negative and summing to 1 by a softmax, so ‖k‖₁ = 1 bounds its norm; tanh' <= 1.
    """

    in_channels = 1

    def __init__(self, channels=3, rate=0.9, seed=0):
        super().__init__(ToyConfig())
        torch.manual_seed(seed)
        self.enc = nn.Conv2d(1, channels, 3, padding=1)
        self.w = nn.Parameter(torch.randn(channels, channels))
        self.k = nn.Parameter(torch.randn(3, 3))
        self.bias = nn.Parameter(torch.randn(channels, 1, 1) * 0.1)
        self.head = nn.Conv2d(channels, 2, 1)
        self.rate = rate

    def encode(self, images):
        return 0.3 * self.enc(images)

    def init_state(self, ctx):
        return torch.zeros_like(ctx)

    def step(self, ctx, h):
        mix = self.rate * self.w / torch.linalg.matrix_norm(self.w, 2)
        blur = torch.softmax(self.k.flatten(), 0).view(1, 1, 3, 3).expand(h.shape[1], 1, 3, 3)
        h = F.conv2d(torch.einsum("oi,bihw->bohw", mix, h), blur, padding=1, groups=h.shape[1])
        return torch.tanh(h + ctx + self.bias)

    def readout(self, ctx, h):
        return {"logits": self.head(h)}


class LinearToy(RecurrentSegmenter):
    """h <- a h + (x + b): J = a I exactly, so the Neumann sum is known in closed form."""

    in_channels = 1

    def __init__(self, a):
        super().__init__(ToyConfig())
        self.a = a
        self.b = nn.Parameter(torch.zeros(1, 1, 1, 1, dtype=torch.float64))

    def encode(self, images):
        return images + self.b

    def init_state(self, ctx):
        return torch.zeros_like(ctx)

    def step(self, ctx, h):
        return self.a * h + ctx

    def readout(self, ctx, h):
        return {"logits": h}


def images(batch=2, size=8, seed=1):
    return torch.rand(batch, 1, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def task_loss(outputs):
    logits = outputs["logits"]
    target = torch.linspace(-1, 1, logits[0].numel(), dtype=logits.dtype).view_as(logits[0])
    return ((logits - target) ** 2).mean()


def gradients(model, x, weight=0.0, **kwargs):
    model.zero_grad(set_to_none=True)
    sol = solve(model, x, **kwargs)
    (task_loss(sol.outputs) + weight * sol.penalty).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, sol


def assert_match(ref, got, skip=()):
    for name in ref:
        if name in skip:
            continue
        a, b = ref[name].flatten(), got[name].flatten()
        cos = float(F.cosine_similarity(a, b, dim=0))
        rel = float((a - b).norm() / a.norm())
        assert cos >= 0.999 and rel <= 0.01, f"{name}: cosine {cos:.6f}, relative error {rel:.4f}"


def disagreement(ref, got):
    return max(float((ref[n] - got[n]).norm() / ref[n].norm()) for n in ref)


# --- gradients --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["rbp", "crbp"])
def test_rbp_matches_bptt_to_convergence_on_a_contraction(mode):
    model = TanhToy().double()
    x = images()
    ref, _ = gradients(model, x, steps=80, grad="bptt")
    got, sol = gradients(model, x, steps=80, grad=mode, neumann_steps=40, lcp_lambda=0.0)
    assert float(sol.residual.max()) < 1e-10, "the forward must have converged for the comparison"
    assert sol.neumann.stop in ("steps", "floor") and sol.neumann.terms >= 10
    assert_match(ref, got)  # every parameter, encoder included
    # crbp: the task gradient still matches with the LCP (and its double-backward graph) present
    assert (float(sol.penalty.detach()) > 0) == (mode == "crbp")
    # the comparison is sensitive: one-step backprop (K = 0) is far off
    truncated, _ = gradients(model, x, steps=80, grad=mode, neumann_steps=0, lcp_lambda=0.0)
    assert disagreement(ref, truncated) > 0.05


def test_crbp_penalty_gradient_is_not_neumann_solved():
    """tanh saves its output, so the LCP's gradient reaches `last`; it must pass unchanged."""
    model, x = TanhToy().double(), images()
    total, _ = gradients(model, x, weight=3.0, steps=40, grad="crbp", lcp_lambda=0.0, neumann_steps=30)
    task, _ = gradients(model, x, steps=40, grad="rbp", neumann_steps=30)
    # the LCP's gradient by hand: one recorded step from the same state, no solver involved
    ctx = model.encode(x)
    with torch.no_grad():
        h = model.init_state(ctx)
        for _ in range(39):
            h = model.step(ctx, h)
    prev = h.requires_grad_()
    penalty = lipschitz_penalty(model.step(ctx, prev), prev, 0.0)
    assert float(torch.autograd.grad(penalty, prev, retain_graph=True)[0].norm()) > 0
    names, params = zip(*model.named_parameters())
    by_hand = torch.autograd.grad(penalty, params, allow_unused=True)
    for name, p in zip(names, by_hand):
        expected = task[name] + 3.0 * (p if p is not None else 0)
        torch.testing.assert_close(total[name], expected, rtol=1e-9, atol=1e-12)


def test_crbp_matches_bptt_on_tiny_hgru_pathfinder():
    """The registry's model; rate ~0.92 at its fixed point, so it needs ~100 Neumann terms."""
    model = tiny_model("hgru-pathfinder").double()
    x = images(size=12)
    ref, _ = gradients(model, x, steps=300, grad="bptt")
    got, sol = gradients(model, x, steps=300, grad="crbp", neumann_steps=99, lcp_lambda=10.0)
    assert sol.neumann.terms == 99
    # At a fixed point h~ = h, so d step / d G2 = h~ - h = 0: the output gate gets no gradient
    # from the fixed point itself; BPTT's is transient leftovers. Both must be negligible.
    gate = {"cell.u2.weight", "cell.u2.bias"}
    scale = max(float(g.norm()) for g in ref.values())
    for name in gate:
        assert float(ref[name].norm()) < 1e-5 * scale and float(got[name].norm()) < 1e-5 * scale
    assert_match(ref, got, skip=gate)
    for name in ("conv0.weight", "conv0.bias"):
        assert float(got[name].norm()) > 0, "gradient must reach the encoder"


@pytest.mark.parametrize("mode", GRAD_MODES)
def test_every_registered_model_trains_in_every_mode(model_name, mode):
    """Only the contract is used, so every model gets a finite gradient in every parameter."""
    model = tiny_model(model_name)
    x = torch.rand(2, model.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    if mode in ("rbp", "crbp") and getattr(model, "recurrent", True) is False:
        with pytest.raises(InputError, match="feed-forward"):
            solve(model, x, steps=3, grad=mode)
        return
    sol = solve(model, x, steps=3, grad=mode, lcp_lambda=0.0)
    loss = sum(v.float().square().mean() for v in sol.outputs.values() if v.is_floating_point())
    (loss + sol.penalty).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if sol.neumann is not None:
        assert sol.neumann.stop is not None


# --- the LCP ----------------------------------------------------------------------------------
def brute_force_lcp(model, x, steps, lam, reduction):
    with torch.no_grad():
        ctx = model.encode(x)
        h = model.init_state(ctx)
        for _ in range(steps - 1):
            h = model.step(ctx, h)
    jac = torch.autograd.functional.jacobian(lambda s: model.step(ctx, s), h)  # [B,C,H,W,B,C,H,W]
    n = h.numel()
    u = jac.reshape(n, n).sum(dim=0).view_as(h)  # column sums = 1ᵀ J
    excess = torch.relu(u - lam) ** 2
    return {"batch": excess.flatten(1).sum(1).mean(), "mean": excess.mean(), "sum": excess.sum()}[reduction]


@pytest.mark.parametrize("reduction", ["batch", "mean", "sum"])
@pytest.mark.parametrize("make", [lambda: TanhToy(channels=2).double(), lambda: tiny_model("hgru-pathfinder").double()])
def test_lcp_equals_full_jacobian_value(make, reduction):
    model, x = make(), images(size=6)
    lam = 0.3
    expected = brute_force_lcp(model, x, 5, lam, reduction)
    assert float(expected) > 0
    for mode in ("crbp", "cbptt"):
        sol = solve(model, x, steps=5, grad=mode, lcp_lambda=lam, lcp_reduction=reduction)
        torch.testing.assert_close(sol.penalty.detach(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["bptt", "rbp"])
def test_penalty_is_zero_without_lcp(mode):
    sol = solve(tiny_model("hgru-pathfinder"), images(size=10).float(), steps=4, grad=mode, lcp_lambda=-5.0)
    assert sol.penalty.shape == () and float(sol.penalty) == 0.0 and not sol.penalty.requires_grad


@pytest.mark.parametrize("mode", ["crbp", "cbptt"])
def test_penalty_is_positive_and_trains_the_model(mode):
    model = tiny_model("hgru-pathfinder")
    sol = solve(model, images(size=10).float(), steps=6, grad=mode, lcp_lambda=0.0)
    assert float(sol.penalty.detach()) > 0 and sol.penalty.shape == ()
    sol.penalty.backward()
    for name in ("cell.w_inh", "cell.w_exc", "cell.u1.weight", "conv0.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and float(grad.norm()) > 0, name
    # a generous lambda switches it off
    assert float(solve(model, images(size=10).float(), steps=6, grad=mode, lcp_lambda=100.0).penalty.detach()) == 0


def test_spectral_lcp_estimates_the_spectral_radius():
    """Power iterations on a symmetric linear step h <- A h find max |eig(A)|, per sample."""
    from crbp_deploy.training.lcp import spectral_estimate

    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    radii = torch.tensor([1.3, 0.7])
    estimates = []
    for radius in radii:
        eig = torch.tensor([radius, -0.6, 0.5, 0.3, 0.2, 0.1], dtype=torch.float64)
        a = (q @ torch.diag(eig) @ q.T).requires_grad_()  # the "parameters"
        prev = torch.randn(1, 6, dtype=torch.float64, requires_grad=True)
        estimates.append(spectral_estimate(prev @ a.T, prev, iters=60))
    torch.testing.assert_close(torch.cat(estimates).detach(), radii.double(), rtol=1e-6, atol=0)
    assert estimates[0].requires_grad  # the last product stays in the graph of the parameters


@pytest.mark.parametrize("mode", ["crbp", "cbptt"])
def test_spectral_lcp_trains_the_radius_down(mode):
    """Adam on the spectral LCP alone (lambda 0, so the penalty is the estimate squared) halves it."""
    model = tiny_model("hgru-pathfinder")
    torch.manual_seed(0)  # the estimate's random start vectors
    x = images(size=10).float()
    first = float(solve(model, x, steps=6, grad=mode, lcp_lambda=0.0, lcp_kind="spectral").penalty.detach())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(40):
        sol = solve(model, x, steps=6, grad=mode, lcp_lambda=0.0, lcp_kind="spectral")
        optimizer.zero_grad()
        sol.penalty.backward()
        optimizer.step()
    last = float(solve(model, x, steps=6, grad=mode, lcp_lambda=0.0, lcp_kind="spectral").penalty.detach())
    assert first > 0 and last < 0.5 * first
    with pytest.raises(InputError, match="lcp_kind must be one of"):
        solve(model, x, steps=3, grad=mode, lcp_kind="eigen")


# --- Neumann stopping rules -------------------------------------------------------------------
@pytest.mark.parametrize(
    "a, kwargs, stop, terms, factor",
    [
        (0.5, {"neumann_steps": 3}, "steps", 3, 1 + 0.5 + 0.25 + 0.125),
        (1.5, {"neumann_rule": "public"}, "growth", 0, 1.0),  # ‖v_1‖ = 1.5 ‖v_0‖: diverging, keep g_0
        (0.9, {"neumann_cap": 2.0}, "cap", 1, 1.9),  # ‖g_2‖ = 2.71 ‖v_0‖ > 2 ‖v_0‖: keep g_1
        (1e-6, {}, "floor", 1, 1 + 1e-6),  # ‖v_2‖ = 1e-12 ‖v_0‖ < 1e-9: keep g_1
    ],
)
def test_neumann_stopping_rules(a, kwargs, stop, terms, factor):
    model, x = LinearToy(a), images(batch=2, size=4)
    sol = solve(model, x, steps=3, grad="rbp", **kwargs)
    assert sol.neumann.stop is None  # nothing solved before backward
    sol.state.sum().backward()  # v_0 = 1, so g = factor * 1 and dL/db = factor * numel
    assert (sol.neumann.stop, sol.neumann.terms) == (stop, terms)
    torch.testing.assert_close(model.b.grad.item(), factor * x.numel(), rtol=1e-12, atol=0)
    assert len(sol.neumann.v_norms) == terms + 1 + (stop != "steps")


def test_neumann_vjp_direct_and_nonfinite():
    prev = torch.ones(3, dtype=torch.float64, requires_grad=True)
    g, info = neumann_vjp(prev * 0.5, prev, torch.ones(3, dtype=torch.float64), steps=60, floor=0.0)
    assert info.stop == "steps" and info.terms == 60
    torch.testing.assert_close(g, torch.full((3,), 2.0, dtype=torch.float64))  # (1 - 0.5)^-1
    g, info = neumann_vjp(prev * float("inf"), prev, torch.ones(3, dtype=torch.float64))
    assert info.stop == "nonfinite" and info.terms == 0 and torch.equal(g, torch.ones(3, dtype=torch.float64))


# --- memory and arguments ---------------------------------------------------------------------
def saved_bytes(model, x, steps, mode):
    """Bytes autograd saves for backward during one training forward (+ the LCP's graph)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sol = solve(model, x, steps=steps, grad=mode)
        task_loss(sol.outputs)
    return total


def test_recorded_memory_is_constant_in_steps_for_rbp():
    model, x = tiny_model("hgru-pathfinder"), images(size=16).float()
    for mode in ("rbp", "crbp"):
        assert saved_bytes(model, x, 3, mode) == saved_bytes(model, x, 30, mode), mode
    short, long = saved_bytes(model, x, 3, "bptt"), saved_bytes(model, x, 30, "bptt")
    assert long > 8 * short


def test_info_is_only_for_rbp_modes():
    model, x = tiny_model("hgru-pathfinder"), images(size=8).float()
    for mode in GRAD_MODES:
        sol = solve(model, x, steps=2, grad=mode)
        assert (sol.neumann is None) == (mode in ("bptt", "cbptt"))
        assert sol.outputs["logits"].shape == (2, 2, 8, 8) and sol.state.shape == (2, 4, 8, 8)
        assert sol.residual.shape == (2,)


@pytest.mark.parametrize("steps", [1, 2])
def test_single_step_runs_in_every_mode(steps):
    """The shortest runs: the four modes compute the same forward (they differ only in what is recorded),
    the LCP's value does not depend on the mode, every parameter gets a finite gradient, and the task
    gradient is the same with or without the LCP (bptt = cbptt, rbp = crbp). With one step the recorded
    step starts at h0 = 0, which carries no graph, so RBP without Neumann terms is exactly BPTT; and the
    parameters that act on the state only through a product with it (C1 = W_I * (G1 ⊙ h), ...) get no task
    gradient, in every mode alike."""
    model, x = tiny_model("hgru-pathfinder"), images(size=8).float()
    params = dict(model.named_parameters())
    sols, task_grads = {}, {}
    for mode in GRAD_MODES:
        model.zero_grad(set_to_none=True)
        sol = sols[mode] = solve(model, x, steps=steps, grad=mode, lcp_lambda=0.0)
        assert sol.outputs["logits"].shape == (2, 2, 8, 8) and sol.state.shape == (2, 4, 8, 8), mode
        assert sol.residual.shape == (2,) and torch.isfinite(sol.residual).all(), mode
        assert sol.penalty.shape == () and torch.isfinite(sol.penalty), mode
        loss = task_loss(sol.outputs)
        task_grads[mode] = dict(zip(params, torch.autograd.grad(loss, list(params.values()), retain_graph=True)))
        (loss + sol.penalty).backward()
        for name, p in params.items():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (mode, name)
        if sol.neumann is not None:
            assert sol.neumann.stop is not None and sol.neumann.terms >= 0, mode
    for mode in GRAD_MODES[1:]:
        torch.testing.assert_close(sols[mode].outputs["logits"], sols["bptt"].outputs["logits"], rtol=0, atol=0)
        torch.testing.assert_close(sols[mode].state, sols["bptt"].state, rtol=0, atol=0)
        torch.testing.assert_close(sols[mode].residual, sols["bptt"].residual, rtol=0, atol=0)
    assert float(sols["bptt"].penalty) == 0 and float(sols["rbp"].penalty) == 0
    assert float(sols["crbp"].penalty.detach()) > 0
    torch.testing.assert_close(sols["cbptt"].penalty.detach(), sols["crbp"].penalty.detach())
    zero = {mode: {n for n, g in task_grads[mode].items() if float(g.norm()) == 0} for mode in GRAD_MODES}
    if steps == 1:
        assert "cell.w_inh" in zero["bptt"] and all(z == zero["bptt"] for z in zero.values()), zero
        assert not zero["bptt"] & {"conv0.weight", "cell.w_exc", "cell.u2.weight", "head.weight"}, zero
    else:
        assert not any(zero.values()), zero
    for with_lcp, without in (("cbptt", "bptt"), ("crbp", "rbp")):
        for name in params:
            torch.testing.assert_close(task_grads[with_lcp][name], task_grads[without][name], msg=name)
    if steps == 1:
        model.zero_grad(set_to_none=True)
        one = dict(zip(params, torch.autograd.grad(
            task_loss(solve(model, x, steps=1, grad="rbp", neumann_steps=0).outputs), list(params.values()))))
        for name in params:
            torch.testing.assert_close(one[name], task_grads["bptt"][name], msg=name)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"grad": "tbptt"}, "grad must be one of bptt, cbptt, rbp, crbp"),
        ({"steps": 0}, "steps=0 is outside"),
        ({"steps": 2.5}, "steps must be an integer"),
        ({"steps": True}, "steps must be an integer"),
        ({"neumann_steps": -1}, "neumann_steps=-1 is outside"),
        ({"lcp_lambda": float("nan")}, "lcp_lambda must be a finite number"),
        ({"neumann_cap": 0.0}, "neumann_cap must be a number \\(inf allowed\\) > 0"),
        ({"neumann_floor": -1e-9}, "neumann_floor must be a finite number >= 0"),
        ({"lcp_reduction": "avg"}, "lcp_reduction must be one of"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    args = {"steps": 3, **kwargs}
    with pytest.raises(InputError, match=match):
        solve(tiny_model("hgru-pathfinder"), images(size=8).float(), **args)


def test_bad_images_and_no_grad_are_rejected():
    model = tiny_model("hgru-pathfinder")
    with pytest.raises(InputError, match="N x 1 x H x W"):
        solve(model, torch.rand(1, 3, 8, 8), steps=2)
    with torch.no_grad(), pytest.raises(InputError, match="gradients enabled"):
        solve(model, torch.rand(1, 1, 8, 8), steps=2)


def test_forward_tol_stops_each_sample_at_its_fixed_point():
    """forward_tol runs the graph-free forward until each sample's relative change <= tol (cap: steps)."""
    model = tiny_model("hgru-pathfinder").train()
    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * torch.tensor([0.05, 0.5, 1.0]).view(3, 1, 1, 1)
    sol = solve(model, images, steps=400, grad="crbp", forward_tol=1e-4)
    assert (sol.residual <= 2e-4).all(), sol.residual  # the recorded step starts at a converged state
    capped = solve(model, images, steps=3, grad="crbp", forward_tol=1e-4)
    assert (capped.residual > 1e-3).all()  # three steps are not enough: the cap holds
    with pytest.raises(InputError, match="forward_tol must be"):
        solve(model, images, steps=3, grad="crbp", forward_tol=-1.0)
