"""Fit the `learned` halting policy's head on a frozen model's trajectories.

The target is the oracle's: at step t an image's answer is final when t is at or past the earliest step
whose image quality is within the oracle slack of the image's best (`Trace.done_labels`). The head is a
small MLP over the per-step state-change features (`models.halting.features`); `calibrate` then picks
its threshold and patience on other held-out images, against the quality target.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .frontier import ORACLE_SLACK, Trace
from .models.halting import HaltingHead


def fit_head(trace: Trace, *, hidden: int = 32, epochs: int = 600, lr: float = 1e-2, weight_decay: float = 1e-2,
             seed: int = 0, slack: float = ORACLE_SLACK) -> HaltingHead:
    """A HaltingHead trained with binary cross-entropy on every (image, step) of `trace`."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.from_numpy(trace.features.reshape(-1, trace.features.shape[-1]).astype(np.float32))
    y = torch.from_numpy(trace.done_labels(slack).reshape(-1))
    head = HaltingHead(x.shape[1], hidden)
    head.mean.copy_(x.mean(0))
    head.std.copy_(x.std(0).clamp_min(1e-3))
    for layer in head.net:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=(1.0 / layer.in_features) ** 0.5, generator=gen)
            nn.init.zeros_(layer.bias)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    head.train()
    for _ in range(epochs):
        opt.zero_grad()
        loss = loss_fn(head(x), y)
        loss.backward()
        opt.step()
    return head.eval()


def attach_head(model, head: HaltingHead) -> None:
    """Make `head` part of the model (its weights are saved under `halting_head.`) and of its card."""
    model.halting_head = head
    meta = dict(getattr(model, "meta", None) or {})
    inference = dict(meta.get("inference") or {})
    inference["halting_head"] = head.spec()
    meta["inference"] = inference
    model.meta = meta
