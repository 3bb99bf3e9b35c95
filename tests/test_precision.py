"""Precision as an axis: the vocabulary, FLOP accounting against PyTorch's own counter, the measured peak,
and a bf16 run that converges like fp32 (no stall at the cap, no early stop on rounding noise)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from crbp_deploy.errors import InputError
from crbp_deploy.export.verify import sample_images
from crbp_deploy.flops import measure_peak, step_flops
from crbp_deploy.models import create_model, get_entry
from crbp_deploy.precision import canonical, torch_cpu_support
from crbp_deploy.runtime import TorchBackend
from crbp_deploy.sources import resolve_model

from conftest import benchmark_module


def test_precision_names():
    assert [canonical(n) for n in (None, "f32", "bfloat16", "half")] == ["fp32", "fp32", "bf16", "fp16"]
    with pytest.raises(InputError, match="unknown precision 'int4'"):
        canonical("int4")


@pytest.mark.parametrize("arch", ["bundled", "hgru-pathfinder", "hgru-panoptic"])
def test_step_flops_match_pytorchs_flop_counter(arch):
    """The analytic count (config only) equals what PyTorch counts when it runs one step."""
    model = resolve_model(None)[0] if arch == "bundled" else create_model(arch, get_entry(arch).tiny)
    size = 64 if arch != "hgru-pathfinder" else 32
    x = torch.rand(1, model.in_channels, size, size)
    with torch.no_grad():
        ctx = model.encode(x)
        h = model.init_state(ctx)
        with FlopCounterMode(display=False) as counter:
            model.step(ctx, h)
    assert step_flops(model, size, size) == counter.get_total_flops() > 0


def test_feed_forward_baseline_has_no_step_cost():
    model = create_model("ff-panoptic", get_entry("ff-panoptic").tiny)
    assert step_flops(model, 64, 64) == 0


def test_measured_peak_is_positive():
    peak = measure_peak(1, seconds=0.05)
    assert peak["fp32"] > 1.0
    assert ("bf16" in peak) == (torch_cpu_support("bf16") is None)


@pytest.mark.skipif(torch_cpu_support("bf16") is not None, reason="this CPU has no native bf16 for PyTorch")
def test_bf16_converges_like_fp32():
    """The bf16 step under autocast keeps an fp32 state and an fp32 residual: every sample reaches the
    tolerance (no stall at the cap) and none stops much before the fp32 run (no early exit on noise)."""
    model = resolve_model(None)[0]
    x = sample_images(4, 3, (32, 32), seed=11)
    budget = {"max_iters": 1000, "tol": 1e-3}
    fp32 = TorchBackend(model).run(x, **budget)
    bf16 = TorchBackend(model, precision="bf16").run(x, **budget)
    assert bf16.outputs["residual"].dtype.name == "float32"
    assert (bf16["residual"] <= budget["tol"]).all() and (bf16["iterations"] < budget["max_iters"]).all()
    ratio = bf16["iterations"] / fp32["iterations"]
    assert ((ratio >= 0.7) & (ratio <= 1.6)).all(), ratio
    assert bf16.telemetry["precision"] == "bf16"


def test_torch_fp16_on_cpu_is_refused():
    """Refused on every CPU with the same reason, whether or not it has native fp16 (AVX512-FP16 / AMX-FP16)."""
    with pytest.raises(InputError, match="fp16 on CUDA only"):
        TorchBackend(create_model("hgru-panoptic", get_entry("hgru-panoptic").tiny), precision="fp16")


def test_info_reports_gflop_per_step(run_cli):
    import json

    code, out, err = run_cli("info", "crbp-panoptic", "--no-check", "--json")
    assert code == 0, err
    flops = json.loads(out)["flops"]
    # the bundled model: 32 channels, 5x5, stride 2, evaluated at 128 px -> a 64x64 state
    assert flops["image_size"] == 128 and flops["gflop_per_step"] == pytest.approx(2 * 32 * 32 * (2 * 25 + 2) * 64 * 64 / 1e9)


def test_cuda_graph_body_equals_the_eager_solver():
    """The k-step body the CUDA graph captures (run here on CPU, no capture): per-sample iterations and
    residuals equal the eager solver's, also when the cap falls inside a group of k steps."""
    from crbp_deploy.models.solver import fixed_point, start
    from crbp_deploy.runtime.cuda_graphs import k_steps

    model = resolve_model(None)[0]
    x = torch.from_numpy(sample_images(4, 3, (32, 32), seed=3))
    with torch.no_grad():
        ctx = model.encode(x)
        h0 = model.init_state(ctx)
        for max_iters, tol in ((80, 0.03), (10, 0.001)):
            ref_h, ref = fixed_point(model.step, ctx, h0, max_iters=max_iters, tol=tol)
            h, (active, iterations, residual, streak) = h0.clone(), start(h0)
            for _ in range(-(-max_iters // 3)):  # k = 3: the cap (10) falls inside a group
                k_steps(model.step, ctx, h, active, iterations, residual, streak, torch.tensor(tol),
                        torch.tensor(max_iters), 3)
                if not active.any():
                    break
            assert iterations.tolist() == ref.iterations.tolist()
            torch.testing.assert_close(residual, ref.residual)
            torch.testing.assert_close(h, ref_h)


def test_cuda_graphs_need_cuda():
    with pytest.raises(InputError, match="CUDA graphs need a CUDA device"):
        TorchBackend(create_model("hgru-panoptic", get_entry("hgru-panoptic").tiny), cuda_graphs=4)


def test_gpu_check_without_cuda_says_so(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the real check (make gpu-check)")
    module = benchmark_module("gpu_check")
    assert module.main(["--out", str(tmp_path / "g")]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out and not list(tmp_path.iterdir())
