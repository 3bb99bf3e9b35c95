"""Is the C-RBP gradient the gradient of the fixed point? Cosine with a converged reference, per contour length.

    python benchmarks/gradient_check.py --model crbp-pathfinder --data runs/pf/data --images 8
    python benchmarks/gradient_check.py --model runs/p25/c/epoch23.pt --data runs/p23c/data \
        --lengths 14,20,25 --images 16 --reference implicit --dtype float32

On `--images` training images (per length with `--lengths`): the parameter gradient of the task loss
from `solve()` exactly as the checkpoint was trained (its recorded steps, solvers, tolerances and
budgets), the same with the forward cap raised `--cap-factor` times, with the forward run to
convergence, with the backward solved further too (60 terms, tolerance 1e-6), and one-step
back-propagation; each against a reference:
BPTT run `--reference-steps` steps (`bptt`, memory O(steps)) or the implicit gradient solved to
convergence (`implicit`: forward to 1e-6, backward to 1e-6, `--reference-steps` each at most; O(1)
memory, the limit BPTT tends to when the state converges). Prints a JSON record (and writes it with --out).

Why per length: a forward that stops at its cap before the fixed point differentiates the wrong
state, and long contours are where the cap bites (docs/pathfinder_claims.md §11).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SOLVER_KEYS = ("steps", "grad", "neumann_steps", "neumann_rule", "neumann_patience", "neumann_growth_limit",
               "forward_tol", "forward_solver", "backward_solver", "backward_tol")
OLD_DEFAULTS = {"steps": 20, "grad": "crbp", "neumann_steps": 15}  # records written before the solvers were recorded


def flat_grad(model, loss) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def as_trained(record: dict) -> dict:
    """solve() keywords of the training run, from the checkpoint's `meta.training`."""
    return {**OLD_DEFAULTS, **{k: record[k] for k in SOLVER_KEYS if k in record}}


def variants(trained: dict, reference_steps: int, cap_factor: int) -> dict[str, dict]:
    converged = {**trained, "steps": reference_steps, "forward_tol": 1e-6}
    return {
        "crbp_as_trained": trained,
        f"crbp_forward_cap_x{cap_factor}": {**trained, "steps": trained["steps"] * cap_factor},
        "crbp_forward_converged": converged,
        "crbp_forward_converged_60_terms": {**converged, "neumann_steps": 60, "backward_tol": 1e-6},
        "one_step_backprop": {**trained, "neumann_steps": 0},
    }


def reference_kwargs(kind: str, trained: dict, steps: int) -> dict:
    if kind == "bptt":
        return {"steps": steps, "grad": "bptt"}
    return {**trained, "grad": "rbp", "steps": steps, "forward_tol": 1e-6, "forward_solver": "anderson",
            "backward_solver": "anderson", "backward_tol": 1e-6, "neumann_steps": steps}


def check(model, images, mask, loss_fn, runs: dict[str, dict], reference: dict) -> dict:
    from crbp_deploy.training.solve import solve

    def gradient(kw):
        sol = solve(model, images, **kw)
        return flat_grad(model, loss_fn(sol.outputs["logits"], mask)), sol

    ref, ref_sol = gradient(reference)
    result = {"images": len(images), "reference_residual_max": float(ref_sol.residual.max())}
    for name, kw in runs.items():
        g, sol = gradient(kw)
        result[name] = {
            "cosine": round(float(torch.nn.functional.cosine_similarity(g, ref, dim=0)), 4),
            "relative_error": round(float((g - ref).norm() / ref.norm()), 4),
            "mean_forward_steps": round(float(sol.forward_steps.float().mean()), 2),
            "neumann_terms": sol.neumann.terms if sol.neumann else None,
            "stop": sol.neumann.stop if sol.neumann else None,
            "forward_residual_max": float(sol.residual.max()),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint or bundled model name")
    ap.add_argument("--data", required=True, help="the training data root (train/ is read)")
    ap.add_argument("--images", type=int, default=8, help="images (per length with --lengths)")
    ap.add_argument("--lengths", default="", help="contour lengths, each checked on its own images (e.g. 14,20,25)")
    ap.add_argument("--reference", choices=("bptt", "implicit"), default="bptt")
    ap.add_argument("--reference-steps", type=int, default=150)
    ap.add_argument("--cap-factor", type=int, default=3, help="the as-trained forward with its step cap times this")
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    from crbp_deploy.sources import resolve_model
    from crbp_deploy.tasks import PATHFINDER
    from crbp_deploy.tasks.pathfinder import as_tensors
    from crbp_deploy.training.losses import PATHFINDER_LOSSES

    torch.manual_seed(0)
    model, source = resolve_model(args.model)
    dtype = getattr(torch, args.dtype)
    model = model.to(dtype).eval()
    record = model.meta.get("training") or {}
    trained = as_trained(record)
    loss_fn = PATHFINDER_LOSSES[record.get("loss", "bce")]
    data = as_tensors(PATHFINDER.open(Path(args.data) / "train"))
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    groups = {str(n): data["length"] == n for n in lengths} or {"all": torch.ones_like(data["length"], dtype=torch.bool)}
    runs = variants(trained, args.reference_steps, args.cap_factor)
    reference = reference_kwargs(args.reference, trained, args.reference_steps)
    result = {"model": source, "as_trained": trained, "reference": {"kind": args.reference, **reference},
              "dtype": args.dtype, "per_length" if lengths else "images": {}}
    for name, chosen in groups.items():
        index = chosen.nonzero().squeeze(1)[: args.images]
        if len(index) == 0:
            raise SystemExit(f"error: {args.data}/train has no images of contour length {name}")
        images, mask = data["images"][index].to(dtype), data["mask"][index]
        out = check(model, images, mask, loss_fn, runs, reference)
        if lengths:
            result["per_length"][name] = out
        else:
            result["images"] = out
        print(name, json.dumps(out))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
