"""The training loop: single process, resume, checkpoints for `info`, and torchrun with 2 CPU processes."""
import json
import sys

import pytest
import torch

from crbp_deploy import checkpoint
from crbp_deploy.data.panoptic_synth import write_dataset
from crbp_deploy.errors import ConfigError
from crbp_deploy.models import create_model
from crbp_deploy.training.trainer import TrainConfig, train

TINY = {"encoder_channels": 8, "channels": 6, "kernel_size": 3, "head_channels": 8, "downsample": 1}


@pytest.fixture(scope="module")
def panoptic_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pan")
    write_dataset(root, count=20, size=32, seed=0, val_fraction=0.2, progress=False)
    return root


def _cfg(data, **kw):
    base = dict(task="panoptic", data=str(data), model_config=TINY, steps=3, neumann_steps=5, batch_size=4,
                epochs=1, lcp_lambda=0.95, penalty_weight=0.001, lr=1e-3, seed=0)
    return TrainConfig.from_dict({**base, **kw})


def test_train_writes_checkpoint_info_understands(panoptic_data, tmp_path, run_cli):
    record = train(_cfg(panoptic_data), tmp_path, progress=False)
    assert record["epoch"] == 1 and 0.0 <= record["val_miou"] <= 1.0
    model = checkpoint.load(tmp_path / "last.pt")
    assert model.arch == "hgru-panoptic"
    assert model.meta["training"]["grad"] == "crbp" and model.meta["training"]["epochs_done"] == 1
    assert [c["id"] for c in model.meta["categories"]] == sorted(c["id"] for c in model.meta["categories"])
    code, out, err = run_cli("info", tmp_path / "last.pt", "--json", "--no-check")
    assert code == 0, err
    assert json.loads(out)["meta"]["training"]["steps"] == 3


def test_resume_continues_where_it_stopped(panoptic_data, tmp_path):
    straight = tmp_path / "straight"
    train(_cfg(panoptic_data, epochs=2), straight, progress=False)
    split = tmp_path / "split"
    train(_cfg(panoptic_data, epochs=1), split, progress=False)
    train(_cfg(panoptic_data, epochs=2), split, resume=True, progress=False)
    a, b = checkpoint.load(straight / "last.pt"), checkpoint.load(split / "last.pt")
    assert len(b.meta["history"]) == 2
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=k)


def test_resume_takes_this_runs_learning_rate(panoptic_data, tmp_path):
    """--resume restores Adam's moments but not its saved lr: a resumed run at lr 1e-12 hardly moves a weight
    (an Adam step is about lr in size), where the saved 1e-3 would move them by ~1e-3."""
    train(_cfg(panoptic_data, epochs=1), tmp_path, progress=False)
    before = checkpoint.load(tmp_path / "last.pt").state_dict()
    train(_cfg(panoptic_data, epochs=2, lr=1e-12), tmp_path, resume=True, progress=False)
    after = checkpoint.load(tmp_path / "last.pt")
    assert after.meta["training"]["epochs_done"] == 2
    for k, x in before.items():
        torch.testing.assert_close(after.state_dict()[k], x, rtol=0, atol=1e-9, msg=k)


@pytest.mark.slow  # trains four models; each mode's gradient is covered by test_solve, the loop by the tests here
def test_every_grad_mode_trains(panoptic_data, tmp_path):
    for grad in ("bptt", "cbptt", "rbp", "crbp"):
        record = train(_cfg(panoptic_data, grad=grad, max_train=8), tmp_path / grad, progress=False)
        assert record["train_loss"] == record["train_loss"]  # not NaN


def test_epoch_line_counts_gflops_of_the_recurrent_step_only(panoptic_data, tmp_path, run_cli):
    common = ("train", "--task", "panoptic", "--data", panoptic_data, "--steps", "2", "--neumann-steps", "2",
              "--epochs", "1", "--batch-size", "8", "--report-every", "0", "--quiet")
    code, _, err = run_cli(*common, "--out", tmp_path / "rec", "--model-config", json.dumps(TINY))
    assert code == 0, err
    assert float(err.split("GFLOP/s=")[1].split()[0]) > 0
    # one graph-free step never reaches --forward-tol: the line says so, and a note says what it costs
    assert "forward_at_cap=1 " in err and "note: 100% of samples ran all --steps" in err
    code, _, err = run_cli(*common, "--out", tmp_path / "ff", "--model", "ff-panoptic", "--grad", "bptt",
                           "--model-config", json.dumps({**TINY, "ff_depth": 2}))
    assert code == 0, err
    assert "GFLOP/s=n/a (no recurrent step)" in err  # its step is the identity: 0.0 would read as a measurement
    assert "forward_at_cap" not in err  # bptt runs every step by design


def test_bad_training_options(panoptic_data, tmp_path, run_cli, one_error_line):
    with pytest.raises(ConfigError, match="grad must be one of"):
        _cfg(panoptic_data, grad="sgd")
    with pytest.raises(ConfigError, match="unknown key"):
        TrainConfig.from_dict(stepz=3)
    with pytest.raises(ConfigError, match="fewer than one batch"):
        train(_cfg(panoptic_data, batch_size=64), tmp_path, progress=False)
    code, _, err = run_cli("train", "--task", "panoptic", "--data", tmp_path / "missing", "--out", tmp_path / "o")
    one_error_line(code, err, "annotations.json")


def test_torchrun_two_processes_match_one(panoptic_data, tmp_path, run_cli_process):
    """2 gloo processes with half the batch each take exactly the steps of 1 process on the global batch
    (both runs are real processes: the same entry point, launched plainly and by torch.distributed.run).
    With --warm-start each rank keeps every image's state, so epoch 2 starts where one process does."""
    args = ["train", "--task", "panoptic", "--data", str(panoptic_data), "--model-config", json.dumps(TINY),
            "--steps", "3", "--neumann-steps", "5", "--batch-size", "4", "--epochs", "2", "--max-train", "12",
            "--warm-start",
            "--lcp-lambda", "0.95", "--penalty-weight", "0.001", "--quiet", "--threads", "1",
            "--lcp-every", "2"]  # local batch 2 of each process: every 2nd sample is the same samples as in one process
    code, _, err = run_cli_process(*args, "--out", tmp_path / "one", timeout=300)
    assert code == 0, err
    code, _, err = run_cli_process(*args, "--out", tmp_path / "two", timeout=300,
                                   launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc-per-node", "2"))
    assert code == 0, err[-3000:]
    a, b = checkpoint.load(tmp_path / "one" / "last.pt"), checkpoint.load(tmp_path / "two" / "last.pt")
    assert b.meta["training"]["world_size"] == 2
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=k)
    torch.manual_seed(0)
    init = create_model("hgru-panoptic", {"num_classes": 4, "thing_classes": [0, 1], **TINY})
    assert not torch.equal(init.cell.w_inh, a.cell.w_inh), "training did not move the weights"
