import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from crbp_deploy.models import create_model, get_entry, list_models


PUBLIC_CHECKPOINTS = Path(__file__).parent / "data" / "public_hgru" / "checkpoints.tar.xz"


def untar_public(dest: Path, *names: str) -> Path:
    """The public-format reference checkpoints (tests/data/public_hgru), all or `names`, extracted into `dest`.
    tarfile's safe "data" filter where this Python has it (3.11.4+); the archive is the repository's own."""
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(PUBLIC_CHECKPOINTS) as tar:
        tar.extractall(dest, members=[tar.getmember(n) for n in names] if names else None, **safe)
    return dest


def benchmark_module(name: str):
    """benchmarks/NAME.py as a module: the benchmarks are scripts, not a package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so worker processes find its functions by name (pickle)
    spec.loader.exec_module(module)
    return module


def tiny_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(name, get_entry(name).tiny).eval()


@pytest.fixture(params=list_models())
def model_name(request):
    return request.param


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # small tensors: a second thread costs more than it gains, and never oversubscribes


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """`run_cli(*args)`: run `crbp-deploy ARGS` in this process -> (exit code, stdout, stderr)."""
    import sys

    from crbp_deploy import cli

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["crbp-deploy", *map(str, args)])
        with pytest.raises(SystemExit) as info:
            cli.main()
        out = capsys.readouterr()
        return info.value.code or 0, out.out, out.err

    return run


@pytest.fixture
def run_cli_process():
    """`run_cli_process(*args, launcher=..., timeout=..., env=...)`: `python -m crbp_deploy.cli ARGS` in a separate
    process -> (exit code, stdout, stderr).

    Only for what needs a real process: the `python -m crbp_deploy.cli` entry point itself (its help, the
    interpreter's traceback under --debug) and launchers such as torch.distributed.run; everything else uses
    `run_cli`. (tests/serving_util.cli does the same for servers that outlive a test.)
    """

    def run(*args, launcher=(sys.executable,), timeout=600, env=None):
        r = subprocess.run([*launcher, "-m", "crbp_deploy.cli", *map(str, args)], capture_output=True, text=True,
                           timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        return r.returncode, r.stdout, r.stderr

    return run


@pytest.fixture
def one_error_line():
    """`one_error_line(code, stderr, match)`: exit 1 and exactly one line, `error: ...` containing `match`."""

    def check(code, err, match):
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 1 and len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], err

    return check
