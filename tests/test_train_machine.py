"""benchmarks/train_machine.py: the whole-machine training benchmark runs its process groups for real."""
import json

from conftest import benchmark_module


def test_threads_and_processes_arms_time_real_training_steps(tmp_path):
    bench = benchmark_module("train_machine")
    out = tmp_path / "machine.json"
    arms = [bench.BASELINE, "defaults: 2 processes x 1 thread"]
    assert bench.main(["--rounds", "1", "--batches", "1", "--batch-size", "4", "--arms", ",".join(arms),
                       "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report["arms"]) == arms
    two = report["arms"]["defaults: 2 processes x 1 thread"]
    assert two["processes"] == 2 and two["threads_per_process"] == 1 and len(two["batch_seconds"]) == 1
    assert all(a["images_per_s"] > 0 for a in report["arms"].values())
    assert report["arms"][bench.BASELINE]["speedup_vs_baseline"] == 1.0
