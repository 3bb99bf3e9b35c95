import os
import pickle

import pytest
import torch

from crbp_deploy import checkpoint
from crbp_deploy.errors import CheckpointError

from conftest import tiny_model


def test_round_trip_is_bit_exact(model_name, tmp_path):
    model = tiny_model(model_name, seed=3)
    path = checkpoint.save(model, tmp_path / "m.pt", meta={"training": "crbp", "steps": 20, "metrics": {"iou": 0.9}})
    raw = torch.load(path, weights_only=True)  # readable with the safe loader alone
    assert raw["arch"] == model_name
    loaded = checkpoint.load(path)
    assert not loaded.training
    assert loaded.meta["metrics"]["iou"] == 0.9
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.rand(2, model.in_channels, 16, 16)
    with torch.no_grad():
        a, b = model(x, iters=3), loaded(x, iters=3)
    for key in a:
        assert torch.equal(a[key], b[key])


def test_save_is_atomic_and_leaves_no_temp(tmp_path):
    checkpoint.save(tiny_model("hgru-pathfinder"), tmp_path / "m.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_meta_must_be_json(tmp_path):
    with pytest.raises(CheckpointError, match="JSON"):
        checkpoint.save(tiny_model("hgru-pathfinder"), tmp_path / "m.pt", meta={"x": object()})
    assert not (tmp_path / "m.pt").exists()


@pytest.fixture
def good(tmp_path):
    return checkpoint.save(tiny_model("hgru-pathfinder"), tmp_path / "good.pt")


def _payload(path):
    return torch.load(path, weights_only=True)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        checkpoint.load(tmp_path / "nope.pt")


def test_directory(tmp_path):
    with pytest.raises(CheckpointError, match="directory"):
        checkpoint.load(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "e.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        checkpoint.load(tmp_path / "e.pt")


def test_truncated_file(good, tmp_path):
    data = good.read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint"):
        checkpoint.load(tmp_path / "t.pt")


def test_text_file(tmp_path):
    (tmp_path / "x.pt").write_text("hello, I am not a checkpoint\n")
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint|refused"):
        checkpoint.load(tmp_path / "x.pt")


def test_bare_state_dict(good, tmp_path):
    torch.save(_payload(good)["state_dict"], tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match="not a crbp-deploy checkpoint"):
        checkpoint.load(tmp_path / "sd.pt")


def test_unknown_architecture(good, tmp_path):
    p = _payload(good)
    p["arch"] = "resnet-9000"
    torch.save(p, tmp_path / "u.pt")
    with pytest.raises(CheckpointError, match="unknown model 'resnet-9000'"):
        checkpoint.load(tmp_path / "u.pt")


def test_unknown_config_key(good, tmp_path):
    p = _payload(good)
    p["config"]["depth"] = 3
    torch.save(p, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="unknown key.*depth"):
        checkpoint.load(tmp_path / "c.pt")


def test_shape_mismatch(good, tmp_path):
    p = _payload(good)
    p["state_dict"]["head.weight"] = torch.zeros(2, 99, 1, 1)
    torch.save(p, tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match="'head.weight' has shape \\(2, 99, 1, 1\\)"):
        checkpoint.load(tmp_path / "s.pt")


def test_missing_weight(good, tmp_path):
    p = _payload(good)
    del p["state_dict"]["head.bias"]
    torch.save(p, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="missing \\['head.bias'\\]"):
        checkpoint.load(tmp_path / "m.pt")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["torch", "pickle"])
def test_pickle_with_code_is_refused_and_not_run(good, tmp_path, container):
    marker = tmp_path / "pwned"
    p = _payload(good)
    p["meta"] = {"x": _Evil(marker)}
    path = tmp_path / "evil.pt"
    if container == "torch":
        torch.save(p, path)
    else:
        path.write_bytes(pickle.dumps(p))
    with pytest.raises(CheckpointError, match="refused|not a checkpoint"):
        checkpoint.load(path)
    assert not marker.exists(), "code in the checkpoint was executed"


def test_cli_info_on_checkpoint(good, run_cli):
    code, out, err = run_cli("info", good, "--json")
    assert code == 0, err
    import json

    card = json.loads(out)
    assert card["architecture"] == "hgru-pathfinder"
    assert card["parameters"] == sum(p.numel() for p in tiny_model("hgru-pathfinder").parameters())
    assert card["contraction"]["inputs"] == 4 and len(card["contraction"]["iterations"]) == 4


@pytest.mark.parametrize("content, match", [(b"", "empty"), (b"garbage" * 10, "not a checkpoint")])
def test_cli_refuses_bad_file_cleanly(tmp_path, content, match, run_cli, one_error_line):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    code, _, err = run_cli("info", bad)
    one_error_line(code, err, match)


def test_cli_debug_shows_traceback(tmp_path, run_cli_process):
    """The interpreter's own traceback: a real `python -m crbp_deploy.cli` process."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"")
    code, _, err = run_cli_process("--debug", "info", bad)
    assert code != 0 and "Traceback" in err and "CheckpointError" in err


def test_cli_help_lists_commands(run_cli_process):
    """The `python -m crbp_deploy.cli` entry point itself."""
    code, out, err = run_cli_process("--help")
    assert code == 0, err
    for cmd in ("info", "data", "train", "eval", "predict", "export", "verify", "bench", "package", "serve"):
        assert cmd in out
