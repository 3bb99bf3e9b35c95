"""What one training forward keeps for backward: the memory that grows with steps under BPTT."""
from __future__ import annotations

import torch
from torch import Tensor

from .solve import solve


def saved_for_backward_bytes(model, images: Tensor, **solve_options) -> int:
    """Bytes of the distinct storages autograd saves during `solve(model, images, **solve_options)`.

    Parameters and the input batch are left out (they exist whatever the method); storages are
    counted once however many saved tensors view them, and kept alive so addresses cannot repeat.
    """
    known = {t.untyped_storage().data_ptr() for t in [*model.parameters(), images]}
    saved: dict[int, object] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in known:
            saved[storage.data_ptr()] = storage
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        solve(model, images, **solve_options)
    return sum(s.nbytes() for s in saved.values())
