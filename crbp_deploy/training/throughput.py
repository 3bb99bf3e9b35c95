"""Training throughput: images/s and convolution GFLOP/s of a training step, counted the same way everywhere.

Why: "how fast does it train" needs one definition that the trainer (per epoch, in the checkpoint),
the benchmark (benchmarks/train_throughput.py) and the docs share. Work is counted in *step
equivalents*, each the convolutions of one recurrent step (`flops.step_flops`); element-wise terms
are not counted, as in flops.py:

- every forward step actually run (per sample: a solver that stops a sample early saves its steps);
- the recorded step: 1; back-propagation through a recorded step to its input and weights: 2;
- each Neumann vector-Jacobian product: 1 (the transposed convolutions of one step);
- the LCP: 3 (one VJP kept in the graph, then its double backward: about two more); on every k-th
  sample only (`lcp_every`), (3 + 1) / k: the subset re-runs its step. The spectral LCP adds its
  graph-free power iterations, one VJP each (lcp.SPECTRAL_POWER_ITERS).

So the GFLOP/s is useful convolution work per second; a faster solver lowers the GFLOP per image
(and may lower GFLOP/s) while images/s rises. Images/s is the figure of merit.
"""
from __future__ import annotations

from dataclasses import dataclass

from .lcp import SPECTRAL_POWER_ITERS

LCP_EQUIVALENTS = 3
BACKWARD_EQUIVALENTS = 2


def step_equivalents(grad: str, forward_steps: float, vjps: int, lcp_every: int = 1, lcp_kind: str = "columns") -> float:
    """Step equivalents per image of one training step. `forward_steps`: mean steps run per image
    before the recorded one (bptt: all of them, each also back-propagated); `vjps`: Neumann VJPs."""
    if grad in ("bptt", "cbptt"):
        work = (forward_steps + 1) * (1 + BACKWARD_EQUIVALENTS)
    else:
        work = forward_steps + 1 + BACKWARD_EQUIVALENTS + vjps
    lcp = LCP_EQUIVALENTS + (SPECTRAL_POWER_ITERS if lcp_kind == "spectral" else 0)
    lcp = lcp if lcp_every == 1 else (lcp + 1) / lcp_every
    return work + (lcp if grad in ("cbptt", "crbp") else 0)


@dataclass
class Meter:
    """Images, seconds and step equivalents of one epoch (this process)."""

    images: int = 0
    seconds: float = 0.0
    equivalents: float = 0.0  # summed over images

    def add(self, images: int, seconds: float, per_image: float) -> None:
        self.images += images
        self.seconds += seconds
        self.equivalents += per_image * images

    def summary(self, step_gflop: float, world_size: int = 1) -> dict[str, float]:
        """images/s (all processes: each runs its share of every batch at once), GFLOP/s and GFLOP/image."""
        if not self.images or self.seconds <= 0:
            return {"images_per_s": 0.0, "gflop_per_s": 0.0, "gflop_per_image": 0.0}
        per_image = self.equivalents / self.images * step_gflop
        rate = self.images / self.seconds * world_size
        return {"images_per_s": round(rate, 2), "gflop_per_s": round(rate * per_image, 2),
                "gflop_per_image": round(per_image, 4)}
