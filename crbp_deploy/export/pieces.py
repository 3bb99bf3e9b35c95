"""A Loop artifact's pieces as standalone ONNX graphs, for a host that steps requests itself.

An iteration-level scheduler (serving/scheduler.py) encodes each request once, steps the requests in
its slots together one solver step per tick, and reads each one out when it leaves: the Loop artifact,
which runs all three inside one call, cannot do that. `export_onnx(..., pieces=True)` (`crbp-deploy
export --pieces`) therefore also writes, beside `model.onnx`:

    model.onnx.pieces/encode.onnx    images -> ctx_0.., h             (the state before the first step)
    model.onnx.pieces/step.onnx      ctx_0.., h, active, iterations, residual, streak, tol[, threshold, patience]
                                     -> cond, h_next, active_next, iterations_next, residual_next, streak_next
    model.onnx.pieces/readout.onnx   ctx_0.., h -> heads
    model.onnx.pieces/pieces.json    the interface names, the artifact's metadata and its sha256

They are cut from the same traced graph the Loop is composed from (export/loop.py), so `step.onnx` is
one Loop trip: the solver's `advance`, halting policy included. `tol`, `threshold` and `patience` are
scalars (one budget per call). runtime/stepper.py `OrtStepper` runs them.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import onnx
from onnx import ModelProto, helper

from ..artifact import ArtifactMeta
from ..errors import CrbpError, InputError
from .loop import PieceNames, _extract, _rename

SUFFIX = ".pieces"
FORMAT = "crbp-deploy/onnx-pieces"
VERSION = 1
FILES = {"encode": "encode.onnx", "step": "step.onnx", "readout": "readout.onnx"}
SPEC = "pieces.json"


def pieces_dir(artifact: str | os.PathLike) -> Path:
    """`model.onnx` -> `model.onnx.pieces/`."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + SUFFIX)


def check_pieces(wanted: bool, strategy: str, substeps: int, dynamic: bool = True) -> None:
    """Pieces step one solver step at a time (a loop artifact with one step per trip) over however many
    requests share a tick, at any size (a dynamic export)."""
    if not wanted:
        return
    if not dynamic:
        raise InputError("pieces need a dynamic export: a scheduler steps any number of requests of any size")
    if strategy != "loop":
        raise InputError("pieces (one solver step per call) come from an early-exit export: use strategy loop")
    if substeps != 1:
        raise InputError(f"pieces step one solver step per call: export with substeps=1, not {substeps}")


def split(pieces: ModelProto, names: PieceNames) -> dict[str, ModelProto]:
    """The traced pieces graph -> {"encode", "step", "readout"}: three checked standalone models."""
    src = pieces.graph
    ctx = {f"enc_{c}": c for c in names.ctx} | {f"readout_{c}": c for c in names.ctx}
    graphs = {
        "encode": _extract(src, [*(f"enc_{c}" for c in names.ctx), "h0"], ["images"], "encode"),
        "step": _extract(src, names.step_outputs, names.step_inputs, "step"),
        "readout": _extract(src, list(names.heads), names.readout_inputs, "readout"),
    }
    _rename(graphs["encode"], {**ctx, "h0": "h"}, "")
    _rename(graphs["readout"], {**ctx, "h_final": "h"}, "")
    models = {}
    for piece, graph in graphs.items():
        model = helper.make_model(graph, opset_imports=list(pieces.opset_import), ir_version=pieces.ir_version,
                                  producer_name="crbp-deploy")
        try:
            onnx.checker.check_model(model, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise CrbpError(f"the {piece} piece failed the ONNX checker: {str(exc).strip().splitlines()[0]}") from exc
        models[piece] = model
    return models


def piece_files(artifact: Path, artifact_bytes: bytes, pieces: ModelProto, names: PieceNames,
          meta: ArtifactMeta) -> list[tuple[Path, bytes]]:
    """(path, bytes) of every piece file for `artifact`, to be written with the artifact itself."""
    folder = pieces_dir(artifact)
    out = [(folder / FILES[piece], model.SerializeToString()) for piece, model in split(pieces, names).items()]
    spec = {
        "format": FORMAT,
        "version": VERSION,
        "artifact": artifact.name,
        "artifact_sha256": hashlib.sha256(artifact_bytes).hexdigest(),
        "ctx": list(names.ctx),
        "heads": list(names.heads),
        "step_inputs": names.step_inputs,
        "step_outputs": names.step_outputs,
        "files": FILES,
        "metadata": meta.to_props(),
    }
    return out + [(folder / SPEC, (json.dumps(spec, indent=2) + "\n").encode())]


def read_spec(artifact: str | os.PathLike) -> tuple[Path, dict[str, Any], ArtifactMeta]:
    """(folder, pieces.json, the artifact's metadata) for an artifact exported with pieces; one clear
    error line when they are missing, unreadable or were written for another version of the artifact."""
    artifact = Path(artifact)
    folder = pieces_dir(artifact)
    if not artifact.is_file():
        raise InputError(f"{artifact}: no such ONNX file")
    if not (folder / SPEC).is_file():
        raise InputError(f"{artifact} has no pieces ({folder}/): re-export it with --pieces (export_onnx(pieces=True)) "
                         "to step it on onnxruntime")
    try:
        spec = json.loads((folder / SPEC).read_text())
    except (OSError, ValueError) as exc:
        raise CrbpError(f"{folder / SPEC}: unreadable ({exc})") from None
    if spec.get("format") != FORMAT or spec.get("version") != VERSION:
        raise CrbpError(f"{folder / SPEC}: not a {FORMAT} v{VERSION} file")
    if spec.get("artifact_sha256") != hashlib.sha256(artifact.read_bytes()).hexdigest():
        raise CrbpError(f"{folder}/ was written for another export of {artifact.name}: re-export it with --pieces")
    missing = [name for name in FILES.values() if not (folder / name).is_file()]
    if missing:
        raise CrbpError(f"{folder}/ lacks {', '.join(missing)}: re-export {artifact.name} with --pieces")
    return folder, spec, ArtifactMeta.from_props(spec.get("metadata") or {}, str(folder / SPEC))
