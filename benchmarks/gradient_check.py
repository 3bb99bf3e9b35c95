"""Is the C-RBP gradient the gradient of the fixed point? Cosine with BPTT run to convergence.

    python benchmarks/gradient_check.py --model crbp-pathfinder --data runs/pf/data --images 8

On `--images` training images, in float64: the parameter gradient of the task loss from
`solve(grad="crbp")` at the model's training steps (as trained), with the forward run to
convergence (`forward_tol`), with more Neumann terms, and one-step back-propagation, each against
BPTT run `--reference-steps` steps. Prints a JSON record (and writes it with --out).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def flat_grad(model, loss) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint or bundled model name")
    ap.add_argument("--data", required=True, help="the training data root (train/ is read)")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--reference-steps", type=int, default=150)
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    from crbp_deploy.sources import resolve_model
    from crbp_deploy.training.solve import solve
    from crbp_deploy.tasks import PATHFINDER
    from crbp_deploy.tasks.pathfinder import as_tensors
    from crbp_deploy.training.losses import PATHFINDER_LOSSES

    torch.manual_seed(0)
    model, source = resolve_model(args.model)
    model = model.double().eval()
    record = model.meta.get("training") or {}
    steps = int(record.get("steps", 20))
    loss_fn = PATHFINDER_LOSSES[record.get("loss", "bce")]
    data = as_tensors(PATHFINDER.open(Path(args.data) / "train"))
    images, mask = data["images"][: args.images].double(), data["mask"][: args.images]

    def gradient(**kw):
        sol = solve(model, images, **kw)
        return flat_grad(model, loss_fn(sol.outputs["logits"], mask)), sol

    reference, ref_sol = gradient(steps=args.reference_steps, grad="bptt")
    runs = {
        "crbp_as_trained": dict(steps=steps, grad="crbp", neumann_steps=int(record.get("neumann_steps", 15))),
        "crbp_forward_converged": dict(steps=args.reference_steps, grad="crbp", forward_tol=1e-6),
        "crbp_forward_converged_60_terms": dict(steps=args.reference_steps, grad="crbp", forward_tol=1e-6, neumann_steps=60),
        "one_step_backprop": dict(steps=steps, grad="crbp", neumann_steps=0),
    }
    result = {"model": source, "images": args.images, "training_steps": steps,
              "reference": {"steps": args.reference_steps, "residual_max": float(ref_sol.residual.max())}}
    for name, kw in runs.items():
        g, sol = gradient(**kw)
        result[name] = {
            "cosine": round(float(torch.nn.functional.cosine_similarity(g, reference, dim=0)), 4),
            "neumann_terms": sol.neumann.terms if sol.neumann else None,
            "stop": sol.neumann.stop if sol.neumann else None,
            "forward_residual_max": float(sol.residual.max()),
        }
        print(name, result[name])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
