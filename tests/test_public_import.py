"""Issue 24: checkpoints of the paper's public code (c-rbp/pathfinder_experiments) load, export and verify here.

The reference (tests/data/public_hgru/README.md says how it was made) holds a public-format checkpoint, with
and without DataParallel's `module.`, inputs and the public forward's logits. One ONNX export per strategy
is shared by the module; each is compared with the public numbers at batch size 1.
"""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from crbp_deploy import checkpoint
from crbp_deploy.budget import Budget
from crbp_deploy.errors import CheckpointError
from crbp_deploy.runtime import load_backend
from conftest import untar_public

DATA = Path(__file__).parent / "data" / "public_hgru"
PLAIN = "model_fscore_0000_epoch_00_checkpoint.pth.tar"
MODULE = "module_model_fscore_0000_epoch_00_checkpoint.pth.tar"
MAX_REL = 1e-4  # the bound: max |ours - public| / max |public|


def max_rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())


def image(inputs, name: str) -> np.ndarray:
    """The public input: uint8 grayscale / 255, one channel, batch 1."""
    return (inputs[name].astype(np.float32) / 255)[None, None]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    root = untar_public(tmp_path_factory.mktemp("public_hgru"))
    return {"plain": root / PLAIN, "module": root / MODULE, "inputs": np.load(DATA / "inputs.npz"),
            "logits": np.load(DATA / "public_logits.npz")}


def cli(*args) -> str:
    """`crbp-deploy ARGS` in this process (module fixtures cannot take the function-scoped run_cli)."""
    from crbp_deploy.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def unrolled(ref, tmp_path_factory):
    """The goal's command: the public file as it is, exported with the public step count."""
    out = tmp_path_factory.mktemp("export") / "public-6.onnx"
    cli("export", ref["plain"], "--iters", 6, "--no-verify", "--out", out)
    return out


@pytest.fixture(scope="module")
def loop(ref, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "public-loop.onnx"
    cli("export", ref["module"], "--no-verify", "--out", out)  # early exit, the card's budget
    return out


# --- recognising and mapping -----------------------------------------------------------------------------


def test_loads_with_and_without_module_prefix(ref):
    plain, module = checkpoint.load(ref["plain"]), checkpoint.load(ref["module"])
    assert plain.arch == module.arch == "hgru-public"
    assert plain.config.to_dict() == {"channels": 25, "kernel_size": 15, "input_kernel": 7, "num_classes": 2,
                                      "eps": 1e-3}
    for (k, a), (k2, b) in zip(plain.state_dict().items(), module.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert [plain.meta["public_code"]["dataparallel_prefix"], module.meta["public_code"]["dataparallel_prefix"]] == [
        False, True]
    assert "not trained here" in plain.meta["training"]
    assert plain.meta["normalisation"].startswith("per-sample statistics")
    assert Budget.from_dict(plain.meta["inference"]["budget"]) == Budget.DEFAULT  # early exit, the usual budget
    raw = torch.load(ref["plain"], weights_only=True)
    assert set(raw) == {"epoch", "state_dict", "best_prec1"}  # the public file itself, no conversion step
    public = raw["state_dict"]
    assert torch.equal(plain.cell.omega.flatten(), public["unit1.w"].flatten())  # the public `w` is omega
    assert torch.equal(plain.cell.norm_exc.weight, public["unit1.bn.3.weight"])


def test_another_filt_size_is_read_off_the_weights(public_file, tmp_path):
    """`hConvGRU(filt_size=k)` for any odd k: the kernel size comes from the weights."""
    state = {k: v[..., 5:10, 5:10] if k in ("unit1.w_gate_inh", "unit1.w_gate_exc") else v
             for k, v in public_file["state_dict"].items()}
    model = checkpoint.load(_save(tmp_path, {**public_file, "state_dict": state}, "k5.pth.tar"))
    assert model.config.kernel_size == 5 and model.cell.w_inh.shape == (25, 25, 5, 5)


def test_each_image_is_independent_of_its_batch(ref):
    """Per-sample statistics: an image's logits do not change with its batch mates (public BatchNorms would)."""
    model = checkpoint.load(ref["plain"])
    x = torch.from_numpy(np.concatenate([image(ref["inputs"], "pathfinder64"), image(ref["inputs"], "random64")]))
    with torch.no_grad():
        both = model(x, iters=2)["logits"]
        alone = model(x[:1], iters=2)["logits"]
    torch.testing.assert_close(both[:1], alone, rtol=1e-5, atol=1e-5)


def test_import_writes_a_self_describing_checkpoint(ref, run_cli, tmp_path):
    code, out, err = run_cli("import", ref["module"], "--out", tmp_path / "fixed.pt", "--iters", 6)
    assert code == 0, err
    assert "per-sample statistics" in out
    raw = torch.load(tmp_path / "fixed.pt", weights_only=True)
    assert raw["format"] == checkpoint.FORMAT and raw["arch"] == "hgru-public"
    fixed, direct = checkpoint.load(tmp_path / "fixed.pt"), checkpoint.load(ref["plain"])
    assert fixed.meta["inference"]["budget"] == {"iters": 6}
    assert fixed.meta["public_code"]["timesteps"] == 6 and "not trained here" in fixed.meta["training"]
    for (k, a), b in zip(fixed.state_dict().items(), direct.state_dict().values()):
        assert torch.equal(a, b), k
    code, out, err = run_cli("import", ref["plain"], "--out", tmp_path / "early.pt")
    assert code == 0, err
    assert checkpoint.load(tmp_path / "early.pt").meta["inference"]["budget"] == Budget.DEFAULT.kwargs()


def test_info_says_per_sample_statistics(ref, run_cli):
    code, out, err = run_cli("info", ref["plain"], "--no-check", "--json")
    assert code == 0, err
    assert "per-sample statistics" in out and "track_running_stats=False" in out and "public_code" in out


def test_calibrate_never_rewrites_the_public_file(ref):
    from crbp_deploy.calibrate import check_destination
    from crbp_deploy.errors import InputError

    with pytest.raises(InputError, match="public code: write the calibrated copy with --out"):
        check_destination(None, str(ref["plain"]))


# --- proof of equality: the export against the public forward --------------------------------------------


@pytest.mark.parametrize("name", ["random64", "lowcontrast64", "pathfinder64", "pathfinder150"])
def test_export_matches_the_public_forward_at_batch_1(ref, unrolled, name):
    result = load_backend(unrolled, "onnxruntime", threads=1).run(image(ref["inputs"], name))
    assert result["iterations"].tolist() == [6]
    assert max_rel(result["logits"], ref["logits"][name]) <= MAX_REL


def test_loop_matches_the_public_forward_over_60_steps(ref, loop):
    backend = load_backend(loop, "onnxruntime", threads=1)
    result = backend.run(image(ref["inputs"], "pathfinder64"), max_iters=60, tol=0.0)
    assert result["iterations"].tolist() == [60]
    assert max_rel(result["logits"], ref["logits"]["pathfinder64_t60"]) <= MAX_REL


def test_early_exit_runs_to_its_fixed_point_and_reports_iterations(ref, loop):
    """The public code runs 6 steps; early exit runs each image until its state stops changing."""
    x = np.concatenate([image(ref["inputs"], n) for n in ("pathfinder64", "random64")])
    result = load_backend(loop, "onnxruntime", threads=1).run(x, max_iters=100, tol=1e-2)
    with torch.no_grad():
        eager = checkpoint.load(ref["plain"])(torch.from_numpy(x), max_iters=100, tol=1e-2)
    iterations = result["iterations"].tolist()
    assert iterations == eager["iterations"].tolist()
    assert all(6 < n < 100 for n in iterations) and len(set(iterations)) > 1, iterations
    assert (result["residual"] <= 1e-2).all()


def test_verify_passes_on_the_early_exit_export(ref, loop):
    from crbp_deploy.export.verify import verify_export

    report = verify_export(loop, checkpoint.load(ref["plain"]), sizes=[(32, 32)], batches=[2])
    assert report.passed, report.summary()
    assert report.cases and all(c["iterations"]["reference"] == c["iterations"]["candidate"] for c in report.cases)


@pytest.mark.slow
def test_bench_runs_fixed_and_early_exit_rows(ref):
    """bench on the public file: every row, fixed count and early exit (2 images of 64 px, the smallest size the
    generated mix of lengths 6-25 fits; 1 repeat)."""
    from crbp_deploy.bench import run_bench

    result = run_bench(checkpoint.load(ref["plain"]), threads=1, repeats=1, limit=2, size=64, progress=lambda s: None)
    strategies = {(r["backend"], r["strategy"]) for r in result["rows"]}
    assert {("torch eager", "fixed"), ("torch eager", "early exit"), ("onnxruntime", "unrolled"),
            ("onnxruntime", "loop, early exit")} <= strategies
    assert result["early_exit"]["budget"] == Budget.DEFAULT.kwargs()


def test_bench_times_a_fixed_count_card_at_its_count():
    """A card that records a fixed count (`import --iters 6`) is benchmarked at that count, its early-exit rows at
    the default budget (before, bench tried to export an early-exit Loop with `iters`). A tiny hgru-public: the
    slow test above runs the real weights."""
    from conftest import tiny_model
    from crbp_deploy.bench import run_bench

    model = tiny_model("hgru-public")
    model.meta = {"inference": {"budget": {"iters": 6}}}
    result = run_bench(model, threads=1, repeats=1, limit=2, size=64, progress=lambda s: None)
    assert (result["fixed_count_matching_early_exit"], result["fixed_baseline_source"]) == (6, "card")
    assert result["early_exit"]["budget"] == Budget.DEFAULT.kwargs()
    budgets = {(r["backend"], r["strategy"]): r["budget"] for r in result["rows"]}
    assert budgets[("torch eager", "fixed")] == '{"iters": 6}' and budgets[("onnxruntime", "unrolled")] == '{"iters": 6}'


# --- bad input: one line each ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def public_file(ref):
    return torch.load(ref["plain"], weights_only=True)


def _save(tmp_path, payload, name="bad.pth.tar"):
    torch.save(payload, tmp_path / name)
    return tmp_path / name


def test_neither_format_names_what_was_expected_and_the_keys(tmp_path, run_cli, one_error_line):
    path = _save(tmp_path, {"epoch": 3, "weights": {"a": torch.zeros(1)}})
    code, _, err = run_cli("export", path, "--iters", 6)
    one_error_line(code, err, "missing keys ['best_prec1', 'state_dict'], extra keys ['weights']")
    assert "not a crbp-deploy checkpoint" in err and "public-code hConvGRU checkpoint" in err


def test_public_file_with_missing_and_extra_weights(public_file, tmp_path):
    state = dict(public_file["state_dict"])
    del state["conv6.bias"]
    state["unit2.w_gate_inh"] = state["unit1.w_gate_inh"]
    with pytest.raises(CheckpointError, match=r"missing \['conv6.bias'\], extra \['unit2.w_gate_inh'\]"):
        checkpoint.load(_save(tmp_path, {**public_file, "state_dict": state}))


def test_shape_mismatch_names_the_parameter(public_file, tmp_path, run_cli, one_error_line):
    state = {**public_file["state_dict"], "unit1.w_gate_exc": torch.zeros(25, 25, 13, 13)}
    code, _, err = run_cli("info", _save(tmp_path, {**public_file, "state_dict": state}), "--no-check")
    one_error_line(code, err, "'unit1.w_gate_exc' has shape (25, 25, 13, 13); expected (25, 25, 15, 15)")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_public_file_carrying_code_is_refused_without_running_it(public_file, tmp_path):
    marker = tmp_path / "pwned"
    path = _save(tmp_path, {**public_file, "best_prec1": _Evil(marker)})  # torch.save, as the public code
    with pytest.raises(CheckpointError, match="refused to load: the file contains pickled code"):
        checkpoint.load(path)
    assert not marker.exists(), "code in the checkpoint was executed"


# Key names of the public code's other families (models/convlstm.py ConvLSTM, models/FFnet.py FFConvNet).
CLSTM = ["conv0.weight", "conv0.bias", "bn.weight", "bn.bias", "conv6.weight", "conv6.bias"] + [
    f"unit1.W{a}{g}.{p}" for g in "ifco" for a, p in (("x", "weight"), ("x", "bias"), ("h", "weight"))]
FF = ["conv0.weight", "conv7.weight", "conv7.bias"] + [f"conv{i}.{p}" for i in range(1, 7) for p in ("weight", "bias")] + [
    f"bn{i}.{p}" for i in range(7) for p in ("weight", "bias", "running_mean", "running_var")]


@pytest.mark.parametrize("family, keys, prefix", [("clstm", CLSTM, ""), ("ff", FF, "module.")])
def test_other_public_families_are_not_supported_yet(family, keys, prefix, tmp_path, run_cli, one_error_line):
    state = {prefix + k: torch.zeros(2) for k in keys}
    path = _save(tmp_path, {"epoch": 1, "state_dict": state, "best_prec1": 0.5})
    code, _, err = run_cli("export", path, "--iters", 6)
    one_error_line(code, err, f"a {family} (")
    assert "not supported yet" in err
