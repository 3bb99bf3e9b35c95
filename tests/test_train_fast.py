"""The fast training path (issue 23): Anderson forward and backward keep the implicit gradient, the LCP
on a subset is the same penalty, and `train` reports its throughput, follows a curriculum and refuses
bad input with one line, writing nothing."""
import json

import pytest
import torch
import torch.nn.functional as F

from crbp_deploy import checkpoint
from crbp_deploy.data.pathfinder import PathfinderConfig, write_dataset
from crbp_deploy.errors import ConfigError, InputError
from crbp_deploy.models.solver import fixed_point
from crbp_deploy.training import lipschitz_penalty, solve
from crbp_deploy.training.anderson import anderson
from crbp_deploy.training.compiled import compile_step, compiler_missing
from crbp_deploy.training.curriculum import parse
from crbp_deploy.training.rbp import anderson_vjp
from crbp_deploy.training.trainer import TrainConfig, train
from crbp_deploy.training.warm_start import StateCache

from conftest import tiny_model

FAST = {k: getattr(TrainConfig(), k) for k in ("forward_solver", "forward_tol", "backward_solver", "backward_tol")}


def _images(model, batch=3, size=24):
    x = torch.rand(batch, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return x[:, : model.in_channels]


def _gradient(model, x, **kw):
    model.zero_grad(set_to_none=True)
    sol = solve(model, x, grad="rbp", **kw)
    target = torch.linspace(-1, 1, 24 * 24, dtype=torch.float64).view(24, 24)
    loss = sum(((v - target) ** 2).mean() for v in sol.outputs.values())
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]), sol


@pytest.mark.parametrize("name", ["hgru-pathfinder", "hgru-panoptic"])
def test_fast_path_keeps_the_implicit_gradient_on_the_tiny_configs(name):
    """The trainer's defaults (Anderson forward to 3e-3, Anderson backward to 2e-2, 15 VJPs at most) against
    the implicit gradient at a converged fixed point, solved exactly (400 Neumann terms): cosine >= 0.999."""
    model = tiny_model(name).double().train()
    x = _images(model)
    exact, ref = _gradient(model, x, steps=400, forward_tol=1e-9, neumann_steps=400, neumann_floor=0.0)
    assert float(ref.residual.max()) < 1e-6, "the reference forward must have converged"
    fast, sol = _gradient(model, x, steps=30, neumann_steps=15, **FAST)
    assert float(F.cosine_similarity(fast, exact, dim=0)) >= 0.999
    assert float(sol.forward_steps.float().mean()) < 29 and len(sol.neumann.v_norms) - 1 < 15  # it did less work


@pytest.mark.skipif(bool(compiler_missing(torch.device("cpu"))), reason="torch.compile needs a C++ compiler on CPU")
def test_compiled_forward_keeps_the_gradient():
    """train --compile: the graph-free forward through torch.compile (batch sizes changing as samples stop)
    gives the eager fast path's gradient, so the cosine >= 0.999 above carries over."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = tiny_model("hgru-pathfinder").double().train()
    x = _images(model)
    eager, ref = _gradient(model, x, steps=30, neumann_steps=15, **FAST)
    compiled, sol = _gradient(model, x, steps=30, neumann_steps=15, forward_step=compile_step(model, x.device), **FAST)
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    assert torch.equal(sol.forward_steps, ref.forward_steps)
    assert float(F.cosine_similarity(compiled, eager, dim=0)) > 1 - 1e-9


def test_compile_without_a_compiler_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(ConfigError, match="no C\\+\\+ compiler"):
        compile_step(tiny_model("hgru-pathfinder"), torch.device("cpu"))


def test_anderson_forward_reaches_the_fixed_point_in_fewer_steps():
    model = tiny_model("hgru-pathfinder").double()
    x = _images(model)
    with torch.no_grad():
        ctx = model.encode(x)
        h_star, _ = fixed_point(model.step, ctx, model.init_state(ctx), max_iters=600, tol=1e-10)
        h_plain, plain = fixed_point(model.step, ctx, model.init_state(ctx), max_iters=600, tol=1e-6)
        h_fast, fast = anderson(model.step, ctx, model.init_state(ctx), max_iters=600, tol=1e-6)
    assert bool((fast.residual <= 1e-6).all()) and int(fast.iterations.max()) < int(plain.iterations.min())
    err = (h_fast - h_star).flatten(1).norm(dim=1) / h_star.flatten(1).norm(dim=1)
    assert float(err.max()) < 1e-4
    # each sample stops on its own: a sample solved alone takes the steps it takes in the batch
    with torch.no_grad():
        alone, stats = anderson(model.step, ctx[1:2], model.init_state(ctx[1:2]), max_iters=600, tol=1e-6)
    assert int(stats.iterations[0]) == int(fast.iterations[1])
    torch.testing.assert_close(alone[0], h_fast[1])


def test_anderson_backward_is_per_sample_and_solves_the_linear_system():
    model = tiny_model("hgru-pathfinder").double()
    x = _images(model)
    with torch.no_grad():
        ctx = model.encode(x)
        h, _ = fixed_point(model.step, ctx, model.init_state(ctx), max_iters=600, tol=1e-10)
    prev = h.requires_grad_()
    last = model.step(ctx, prev)
    v0 = torch.randn(last.shape, dtype=last.dtype, generator=torch.Generator().manual_seed(1))
    g, info = anderson_vjp(last, prev, v0, steps=200, tol=1e-6)
    assert info.stop == "floor"  # every sample reached tol
    (jg,) = torch.autograd.grad(last, prev, g, retain_graph=True)
    assert float((jg + v0 - g).norm() / g.norm()) < 1e-5  # g = Jᵀg + v₀
    prev1 = h[1:2].detach().requires_grad_()
    g1, _ = anderson_vjp(model.step(ctx[1:2], prev1), prev1, v0[1:2], steps=200, tol=1e-6)
    torch.testing.assert_close(g1[0], g[1], rtol=1e-6, atol=1e-9)  # a sample's solve ignores the rest of the batch


def test_lcp_every_kth_sample_is_the_penalty_of_those_samples():
    model = tiny_model("hgru-pathfinder").double().train()
    x = _images(model, batch=5)
    sol = solve(model, x, steps=4, grad="crbp", lcp_every=2)
    sub = solve(model, x[0::2], steps=4, grad="crbp")
    torch.testing.assert_close(sol.penalty, sub.penalty)
    full = solve(model, x, steps=4, grad="crbp", lcp_every=1)
    ctx = model.encode(x)
    with torch.no_grad():
        h, _ = fixed_point(model.step, ctx, model.init_state(ctx), iters=3)
    prev = h.requires_grad_()
    torch.testing.assert_close(full.penalty, lipschitz_penalty(model.step(ctx, prev), prev))


def test_curriculum_schedules():
    assert parse("auto", [6, 9, 14, 6], 6).stages == ((1, (6,)), (3, (6, 9)), (5, (6, 9, 14)))
    plan = parse("1:6,9; 3:6,9,14", [6, 9, 14], 4)
    assert [plan.lengths(e) for e in (1, 2, 3, 4)] == [(6, 9), (6, 9), (6, 9, 14), (6, 9, 14)]
    with pytest.raises(ConfigError, match="lacks"):
        parse("1:6;2:25", [6, 9], 3)
    with pytest.raises(ConfigError, match="epoch 1"):
        parse("2:6", [6], 3)
    with pytest.raises(ConfigError, match="not a whole number"):
        parse("1:six", [6], 3)


@pytest.fixture(scope="module")
def pf_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pf")
    config = PathfinderConfig(length=6, size=40, distractors=1)
    write_dataset(root / "train", config, 16, seed=0, progress=False, lengths=[6, 9])
    write_dataset(root / "val", config, 4, seed=1, progress=False, lengths=[6, 9])
    return root


def _pf_cfg(data, **kw):
    base = dict(task="pathfinder", data=str(data), model_config={"channels": 4, "kernel_size": 3, "input_kernel": 3},
                steps=4, neumann_steps=4, batch_size=4, epochs=2, report_every=0, seed=0)
    return TrainConfig.from_dict({**base, **kw})


def test_train_records_throughput_and_follows_the_curriculum(pf_data, tmp_path):
    record = train(_pf_cfg(pf_data, curriculum="1:6;2:6,9"), tmp_path, progress=False)
    model = checkpoint.load(tmp_path / "last.pt")
    history = model.meta["history"]
    assert [h["lengths"] for h in history] == [[6], [6, 9]]
    assert all(h["images_per_s"] > 0 and h["gflop_per_s"] > 0 and h["gflop_per_image"] > 0 for h in history)
    assert model.meta["throughput"]["images_per_s"] == record["images_per_s"]
    assert {"val_iou_pf6", "val_iou_pf9"} <= set(record)
    # 3 graph-free steps never reach tolerance 3e-3 from zeros: every sample stopped at the cap
    assert [h["forward_at_cap"] for h in history] == [1.0, 1.0]


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_bad_training_input_one_line_nothing_overwritten(pf_data, tmp_path, run_cli, one_error_line):
    out = tmp_path / "run"
    train(_pf_cfg(pf_data, epochs=1), out, progress=False)
    before = _snapshot(out)
    common = ["train", "--data", str(pf_data), "--out", str(out), "--steps", "4", "--batch-size", "4", "--quiet",
              "--model-config", json.dumps({"channels": 4, "kernel_size": 3, "input_kernel": 3})]
    code, _, err = run_cli(*common, "--curriculum", "1:6;2:6,25", "--epochs", "2")
    one_error_line(code, err, "lacks")
    code, _, err = run_cli(*common[:-1], json.dumps({"channels": 6, "kernel_size": 3, "input_kernel": 3}),
                           "--resume", "--epochs", "2")
    one_error_line(code, err, "--resume")
    code, _, err = run_cli(*common, "--task", "panoptic", "--epochs", "2")
    one_error_line(code, err, "Pathfinder data")
    code, _, err = run_cli(*common, "--grad", "bptt", "--compile", "--epochs", "2")
    one_error_line(code, err, "compile")
    code, _, err = run_cli(*common, "--grad", "bptt", "--warm-start", "--epochs", "2")
    one_error_line(code, err, "warm_start")
    assert _snapshot(out) == before


def test_cli_defaults_are_the_trainer_defaults():
    import inspect

    from crbp_deploy.commands.train import train as command

    cli = inspect.signature(command).parameters
    cfg = TrainConfig()
    for name in ("forward_solver", "forward_tol", "backward_solver", "backward_tol", "lcp_every", "layout", "curriculum",
                 "compile", "warm_start"):
        assert cli[name].default.default == getattr(cfg, name), name


def test_balanced_loss_does_not_reward_all_background():
    """With 1% contour pixels, predicting background everywhere is cheap under plain cross-entropy and
    costly under the balanced loss, whose two classes weigh half each whatever their pixel counts."""
    from crbp_deploy.training.losses import balanced_loss, bce_loss

    target = torch.zeros(2, 20, 20, dtype=torch.int64)
    target[:, 0, :4] = 1
    logits = torch.zeros(2, 2, 20, 20)
    logits[:, 0] = 3.0  # confident background
    ce_on, ce_off = F.softplus(torch.tensor(3.0)), F.softplus(torch.tensor(-3.0))
    torch.testing.assert_close(balanced_loss(logits, target), 0.5 * (ce_on + ce_off))
    assert float(balanced_loss(logits, target)) > 10 * float(bce_loss(logits, target))


def test_state_cache_starts_cold_until_an_image_has_a_finite_state():
    cache = StateCache(4)
    cold = torch.zeros(2, 1, 2, 2)
    assert cache.start(torch.tensor([0, 1]), cold) is cold
    kept, overflows = torch.full((1, 2, 2), 0.5), torch.full((1, 2, 2), 1e6)  # 1e6 is inf in float16
    cache.store(torch.tensor([1, 2]), torch.stack([kept, overflows]))
    out = cache.start(torch.tensor([0, 1, 2]), torch.zeros(3, 1, 2, 2))
    assert out[0].eq(0).all() and out[1].eq(0.5).all() and out[2].eq(0).all()


def test_warm_start_keeps_the_implicit_gradient_in_fewer_forward_steps():
    """--warm-start: the forward starts from a stored fixed point (float16), so it runs fewer steps, and
    the gradient is still the implicit gradient (the fixed point does not depend on the start)."""
    model = tiny_model("hgru-pathfinder").double().train()
    x = _images(model)
    exact, ref = _gradient(model, x, steps=400, forward_tol=1e-9, neumann_steps=400, neumann_floor=0.0)
    cache, index = StateCache(len(x)), torch.arange(len(x))
    cache.store(index, ref.state)
    warm, sol = _gradient(model, x, steps=30, neumann_steps=15, start_state=lambda cold: cache.start(index, cold), **FAST)
    _, cold = _gradient(model, x, steps=30, neumann_steps=15, **FAST)
    assert float(F.cosine_similarity(warm, exact, dim=0)) >= 0.999
    assert float(sol.forward_steps.float().mean()) < float(cold.forward_steps.float().mean())
    with pytest.raises(InputError, match="start_state"):
        solve(model, x, steps=3, grad="bptt", start_state=lambda cold: cold)


def test_train_warm_start_runs_later_epochs_in_fewer_forward_steps(pf_data, tmp_path):
    common = dict(steps=30, lr=1e-4, epochs=2, forward_tol=1e-3)
    cold = train(_pf_cfg(pf_data, **common), tmp_path / "cold", progress=False)
    warm = train(_pf_cfg(pf_data, warm_start=True, **common), tmp_path / "warm", progress=False)
    history = checkpoint.load(tmp_path / "warm" / "last.pt").meta["history"]
    assert history[0]["forward_steps"] == pytest.approx(
        checkpoint.load(tmp_path / "cold" / "last.pt").meta["history"][0]["forward_steps"])  # epoch 1 starts cold
    assert warm["forward_steps"] < 0.8 * cold["forward_steps"]
    assert warm["gflop_per_image"] < cold["gflop_per_image"]
    assert 0.0 <= warm["forward_at_cap"] < 1.0 and warm["forward_at_cap"] <= cold["forward_at_cap"]


def test_resume_refuses_a_shipped_model_and_an_optimizer_state_of_other_parameters(pf_data, tmp_path, run_cli,
                                                                                 one_error_line):
    """Both used to end in a traceback: a calibrated checkpoint's halting head is not trained (it would go
    stale), and an optimizer state of other parameters does not fit."""
    import shutil

    from crbp_deploy import zoo

    path = zoo.path("crbp-pathfinder")
    bundled = checkpoint.load(path)
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(path, out / "last.pt")
    torch.save({"optimizer": torch.optim.Adam([torch.zeros(1)]).state_dict(), "epoch": 1}, out / "last.state.pt")
    args = ["train", "--data", str(pf_data), "--out", str(out), "--resume", "--epochs", "2", "--batch-size", "4",
            "--quiet", "--model-config", json.dumps({"channels": bundled.config.channels,
                                                     "kernel_size": bundled.config.kernel_size})]
    before = _snapshot(out)
    one_error_line(*run_cli(*args)[::2], "halting_head")
    assert _snapshot(out) == before
    plain = checkpoint.load(path)
    del plain.halting_head
    checkpoint.save(plain, out / "last.pt", meta={k: v for k, v in plain.meta.items() if k != "inference"})
    before = _snapshot(out)
    one_error_line(*run_cli(*args)[::2], "does not fit")
    assert _snapshot(out) == before
