"""Warm-started training forwards: each image's graph-free solve starts from its fixed point of the last epoch.

Why: RBP differentiates the fixed point, which does not depend on where the forward starts; only the
number of steps to reach it does. After one epoch the weights have moved a little, so last epoch's
fixed point of an image is far closer to this epoch's than the cold start (zeros) is: on the 9x9
Pathfinder model's long contours (PF14-25), Anderson reached epoch 20's fixed points at tol 3e-3 in 18.6
steps from epoch 19's, against 34.6 from zeros (benchmarks/train_throughput.py --previous,
docs/pathfinder_claims.md §10). On short contours, which converge fast from zeros, it saves little. The gradient is the same
implicit gradient; what changes is the forward's cost. This is the fixed-point reuse of deep
equilibrium models, kept per image because a training set is revisited every epoch.

The cache holds one state per training image on the host in float16 (half the bytes; its rounding,
about 5e-4 relative, is below the forward tolerance). A state that does not fit float16 is not kept
(that image starts cold again). With several processes every rank keeps every image: each batch's
states are gathered from all ranks, since the next epoch deals the images out differently.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from .distributed import World, all_gather

STORE_DTYPE = torch.float16
MAX_CACHE_BYTES = 8 * 2**30  # a cache above this is refused: --max-train bounds it


class StateCache:
    """Last epoch's fixed point per training image (index into the training set)."""

    def __init__(self, images: int, world: World = World()):
        self.images, self.world = images, world
        self.states: Tensor | None = None  # allocated at the first store, when the state's shape is known
        self.seen = torch.zeros(images, dtype=torch.bool)

    def start(self, index: Tensor, cold: Tensor) -> Tensor:
        """The forward's start for the images `index`: their cached states, `cold` where there is none."""
        if self.states is None:
            return cold
        index = index.cpu()
        hit = self.seen[index]
        if not bool(hit.any()):
            return cold
        out = cold.clone()  # keeps cold's memory format, in which the solver goes on stepping
        out[hit.to(cold.device)] = self.states[index[hit]].to(device=cold.device, dtype=cold.dtype)
        return out

    def store(self, index: Tensor, states: Tensor) -> None:
        """Keep the fixed points just reached (all ranks' when data-parallel)."""
        # gathered where the states are (nccl gathers CUDA tensors only, gloo host ones), then kept on the host
        index = all_gather(index.to(states.device), self.world).cpu()
        states = all_gather(states.detach().to(STORE_DTYPE), self.world).cpu()
        if self.states is None:
            need = self.images * states[0].numel() * states.element_size()
            if need > MAX_CACHE_BYTES:
                raise ConfigError(f"--warm-start would keep {need / 2**30:.1f} GiB of states for {self.images} images "
                                  f"(at most {MAX_CACHE_BYTES / 2**30:.0f}): lower --max-train or leave it off")
            self.states = torch.zeros(self.images, *states.shape[1:], dtype=STORE_DTYPE)
        self.states[index] = states
        self.seen[index] = torch.isfinite(states).flatten(1).all(dim=1)
