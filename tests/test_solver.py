"""The one solver: active-set early exit equals running each image alone (torch and ONNX Runtime),
a batch costs the sum of its iterations, and a diverging sample is never converged."""
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from crbp_deploy.config import StrictConfig
from crbp_deploy.errors import InputError
from crbp_deploy.export import export_onnx
from crbp_deploy.models import RecurrentSegmenter, fixed_point, relative_change
from crbp_deploy.models.solver import SolverStats

from conftest import tiny_model

CONTRASTS = torch.tensor([0.05, 1.0, 0.3, 0.7, 0.02, 0.5]).view(6, 1, 1, 1)  # easy and hard mixed


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def model():
    return tiny_model("hgru-pathfinder")


@pytest.fixture(scope="module")
def images():
    return torch.rand(6, 1, 16, 20, generator=torch.Generator().manual_seed(7)) * CONTRASTS


class _CountingStep:
    def __init__(self, step):
        self.step, self.rows = step, []

    def __call__(self, ctx, h):
        self.rows.append(h.shape[0])
        return self.step(ctx, h)


@torch.no_grad()
def test_compact_batch_equals_each_image_alone(model, images):
    batch = model(images, max_iters=60, tol=1e-2)
    assert len(set(batch["iterations"].tolist())) > 2, "the contrasts should need different budgets"
    for i in range(len(images)):
        alone = model(images[i : i + 1], max_iters=60, tol=1e-2)
        assert batch["iterations"][i].item() == alone["iterations"].item()
        torch.testing.assert_close(batch["residual"][i : i + 1], alone["residual"], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(batch["logits"][i : i + 1], alone["logits"], rtol=1e-4, atol=1e-5)
    masked = model(images, max_iters=60, tol=1e-2, execution="masked")
    assert masked["iterations"].tolist() == batch["iterations"].tolist()
    torch.testing.assert_close(masked["logits"], batch["logits"], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_a_batch_costs_the_sum_of_its_iterations(model, images):
    ctx = model.encode(images)
    for execution, expected in (("compact", None), ("masked", "max")):
        counting = _CountingStep(model.step)
        _, stats = fixed_point(counting, ctx, model.init_state(ctx), max_iters=60, tol=1e-2, execution=execution)
        its = stats.iterations
        if execution == "compact":
            assert sum(counting.rows) == int(its.sum())  # converged rows left the computation
        else:
            assert sum(counting.rows) == len(images) * int(its.max())
    assert int(its.sum()) < len(images) * int(its.max())


@torch.no_grad()
def test_compact_onnx_loop_equals_each_image_alone(model, images, tmp_path):
    art = export_onnx(model, tmp_path / "c.onnx", max_iters=60, tol=1e-2, example_size=(16, 16))
    assert art.meta.execution == "compact"
    sess = session(art.path)
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(names, {"images": images.numpy()})))
    for i in range(len(images)):
        alone = model(images[i : i + 1], max_iters=60, tol=1e-2)
        assert got["iterations"][i] == alone["iterations"].item()
        np.testing.assert_allclose(got["logits"][i : i + 1], alone["logits"].numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got["residual"][i : i + 1], alone["residual"].numpy(), rtol=1e-3)
    masked = export_onnx(model, tmp_path / "m.onnx", max_iters=60, tol=1e-2, example_size=(16, 16), execution="masked")
    assert masked.meta.execution == "masked"
    m = session(masked.path).run(["iterations"], {"images": images.numpy()})[0]
    assert m.tolist() == got["iterations"].tolist()


def test_execution_is_checked(model, tmp_path):
    with pytest.raises(InputError, match="execution must be one of compact, masked"):
        model(torch.rand(1, 1, 8, 8), iters=2, execution="lazy")
    with pytest.raises(InputError, match="substeps=1 or execution='masked'"):
        export_onnx(model, tmp_path / "x.onnx", max_iters=5, tol=0.1, substeps=2, execution="compact")


@dataclass(frozen=True)
class NoConfig(StrictConfig):
    pass


class Diverging(RecurrentSegmenter):
    """h <- h/2 + c + 0*log(1.5 - h): converges to 2c for c < 0.75, turns NaN at step 3 for c = 1."""

    in_channels = 1

    def __init__(self):
        super().__init__(NoConfig())
        self.arch = "diverging-toy"
        self.scale = nn.Parameter(torch.ones(()))

    def encode(self, images):
        return images * self.scale

    def init_state(self, ctx):
        return torch.zeros_like(ctx)

    def step(self, ctx, h):
        return 0.5 * h + ctx + 0.0 * torch.log(1.5 - h)

    def readout(self, ctx, h):
        return {"value": h}


@pytest.fixture(scope="module")
def diverging_images():
    return torch.tensor([0.2, 1.0, 0.4]).view(3, 1, 1, 1).expand(3, 1, 4, 4).contiguous()


@torch.no_grad()
def test_a_nan_step_is_diverged_never_converged(diverging_images):
    out = Diverging().eval()(diverging_images, max_iters=50, tol=1e-3)
    stats = SolverStats(iterations=out["iterations"], residual=out["residual"])
    assert out["iterations"][1].item() == 3, "the diverging sample stops at its first non-finite step"
    assert stats.diverged.tolist() == [False, True, False]
    assert stats.converged(1e-3).tolist() == [True, False, True]
    assert out["iterations"][0].item() > 3 and out["iterations"][2].item() > 3  # the others run on
    fixed = Diverging().eval()(diverging_images, iters=10)
    assert fixed["iterations"].tolist() == [10, 3, 10]
    assert not torch.isfinite(fixed["residual"][1])


@torch.no_grad()
def test_a_nan_step_is_diverged_in_onnx_runtime(diverging_images, tmp_path):
    model = Diverging().eval()
    art = export_onnx(model, tmp_path / "d.onnx", max_iters=50, tol=1e-3, example_size=(4, 4))
    iterations, residual = session(art.path).run(["iterations", "residual"], {"images": diverging_images.numpy()})
    ref = model(diverging_images, max_iters=50, tol=1e-3)
    assert iterations.tolist() == ref["iterations"].tolist()
    assert not np.isfinite(residual[1]) and bool((residual[[0, 2]] <= 1e-3).all())


def test_residual_is_fp32_and_survives_fp16_zero_state():
    zero = torch.zeros(2, 3, 4, 4, dtype=torch.float16)
    r = relative_change(zero, zero)
    assert r.dtype == torch.float32 and torch.isfinite(r).all() and (r == 0).all()
    new = torch.full((1, 8), 1e-4, dtype=torch.float16)
    assert torch.isfinite(relative_change(new, torch.zeros_like(new))).all()
