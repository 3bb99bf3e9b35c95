"""`hgru-pathfinder`: the paper's Pathfinder segmenter (conv0 7x7 squared -> hGRU -> norm + 1x1)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import StrictConfig
from ..errors import ConfigError
from .contract import RecurrentSegmenter
from .hgru import HGRUCell, make_norm
from .registry import register_model


@dataclass(frozen=True)
class PathfinderConfig(StrictConfig):
    in_channels: int = 1
    channels: int = 25
    input_kernel: int = 7
    kernel_size: int = 15
    norm: str = "group"
    num_classes: int = 2
    mean: float = 0.5
    std: float = 0.5

    def validate(self) -> None:
        for name in ("in_channels", "channels", "input_kernel", "kernel_size", "num_classes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"PathfinderConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("input_kernel", "kernel_size"):
            if getattr(self, name) % 2 == 0:
                raise ConfigError(f"PathfinderConfig.{name} must be odd, got {getattr(self, name)}")
        if self.norm not in ("group", "instance", "none"):
            raise ConfigError(f"PathfinderConfig.norm must be group, instance or none, got {self.norm!r}")
        if self.std <= 0:
            raise ConfigError(f"PathfinderConfig.std must be > 0, got {self.std}")


@register_model("hgru-pathfinder", PathfinderConfig, tiny={"channels": 4, "kernel_size": 5, "input_kernel": 3})
class HGRUPathfinder(RecurrentSegmenter):
    """Pathfinder segmenter: per-pixel logits for 'on the marked contour'."""

    task = "pathfinder"  # what eval / calibrate / bench score it on (IoU)

    def __init__(self, config: PathfinderConfig):
        super().__init__(config)
        self.in_channels = config.in_channels
        self.conv0 = nn.Conv2d(config.in_channels, config.channels, config.input_kernel, padding=config.input_kernel // 2)
        self.cell = HGRUCell(config.channels, config.kernel_size, config.norm)
        self.head_norm = make_norm(config.norm, config.channels)
        self.head = nn.Conv2d(config.channels, config.num_classes, 1)

    def encode(self, images: Tensor) -> Tensor:
        x = (images - self.config.mean) / self.config.std
        return self.conv0(x) ** 2

    def init_state(self, ctx: Tensor) -> Tensor:
        return torch.zeros_like(ctx)

    def step(self, ctx: Tensor, h: Tensor) -> Tensor:
        return self.cell(ctx, h)

    def readout(self, ctx: Tensor, h: Tensor) -> dict[str, Tensor]:
        return {"logits": self.head(self.head_norm(h))}

    def answer_proxy(self, ctx: Tensor, h: Tensor) -> Tensor:
        """The per-pixel decision (the answer itself: the readout is one 1x1 conv)."""
        return self.readout(ctx, h)["logits"].argmax(dim=1)


@register_model("ff-pathfinder", PathfinderConfig, tiny={"channels": 4, "kernel_size": 5, "input_kernel": 3})
class FFPathfinder(RecurrentSegmenter):
    """Feed-forward twin of hgru-pathfinder (the paper's control): the cell's two k x k and two 1 x 1
    convolutions and its two norms as one stack run once, so the parameter count is the same up to the
    cell's 5C gain parameters; no recurrence (step is the identity, the work is in init_state)."""

    task = "pathfinder"
    recurrent = False

    def __init__(self, config: PathfinderConfig):
        super().__init__(config)
        c, k = config.channels, config.kernel_size
        self.in_channels = config.in_channels
        self.conv0 = nn.Conv2d(config.in_channels, c, config.input_kernel, padding=config.input_kernel // 2)
        self.trunk = nn.Sequential(
            nn.Conv2d(c, c, k, padding=k // 2), make_norm(config.norm, c), nn.Softplus(), nn.Conv2d(c, c, 1), nn.Softplus(),
            nn.Conv2d(c, c, k, padding=k // 2), make_norm(config.norm, c), nn.Softplus(), nn.Conv2d(c, c, 1), nn.Softplus(),
        )
        self.head_norm = make_norm(config.norm, c)
        self.head = nn.Conv2d(c, config.num_classes, 1)

    encode = HGRUPathfinder.encode
    readout = HGRUPathfinder.readout

    def init_state(self, ctx: Tensor) -> Tensor:
        return self.trunk(ctx)

    def step(self, ctx: Tensor, h: Tensor) -> Tensor:
        return h
