"""`hgru-public`: the Pathfinder segmenter of the paper's public code, so its checkpoints deploy here.

The public `hConvGRU` (c-rbp/pathfinder_experiments, models/hgrucleanSEG.py), written from its facts:
conv0 (1 -> 25, 7x7, no input normalisation) squared; one hGRU cell with 15x15 kernels whose step ends
in a softplus; readout norm + 1x1 conv to 2 logits; `timesteps` steps (6 in mainclean.py) from zero.
`public_code.py` maps its checkpoints onto this model.

What differs, on purpose: the public BatchNorms have `track_running_stats=False`, so they normalise
with the statistics of whatever batch arrives, at test time too. Here they are per-sample statistics
(`InstanceNorm`: the same eps and affine). That equals the public forward at batch size 1 and makes each
image's answer independent of its batch (the public answer for an image changes with its batch mates).
The step is the hGRU cell of hgru.py, whose equations are the public ones, followed by the public final
softplus (hgru.py says why the project's own models omit it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import StrictConfig
from ..errors import ConfigError
from .contract import RecurrentSegmenter
from .hgru import HGRUCell, softplus
from .registry import register_model

#: The public code's step count (mainclean.py: `timesteps = 6`).
PUBLIC_TIMESTEPS = 6


@dataclass(frozen=True)
class PublicHGRUConfig(StrictConfig):
    channels: int = 25  # the public BatchNorms hard-code 25
    kernel_size: int = 15  # `filt_size`
    input_kernel: int = 7
    num_classes: int = 2
    eps: float = 1e-3  # the public BatchNorms' eps

    def validate(self) -> None:
        for name in ("channels", "kernel_size", "input_kernel", "num_classes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"PublicHGRUConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("input_kernel", "kernel_size"):
            if getattr(self, name) % 2 == 0:
                raise ConfigError(f"PublicHGRUConfig.{name} must be odd, got {getattr(self, name)}")
        if not self.eps > 0:
            raise ConfigError(f"PublicHGRUConfig.eps must be > 0, got {self.eps}")


class InstanceNorm(nn.Module):
    """A batch-statistics BatchNorm made per-sample: each image's own mean and (biased) variance of each
    channel over H x W, then the BatchNorm's affine. Equal to the BatchNorm at batch size 1."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        # written out: GroupNorm(C, C) and F.instance_norm check "more than one value per channel" on a size
        # that holds the compacted Loop's data-dependent batch, which torch.export cannot decide
        centred = x - x.mean(dim=(2, 3), keepdim=True)
        scale = torch.rsqrt(centred.square().mean(dim=(2, 3), keepdim=True) + self.eps)
        return centred * scale * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


@register_model("hgru-public", PublicHGRUConfig, tiny={"channels": 4, "kernel_size": 3, "input_kernel": 3})
class PublicHGRU(RecurrentSegmenter):
    """Pathfinder segmenter of the paper's public code (hConvGRU), per-sample norms."""

    task = "pathfinder"  # scored like hgru-pathfinder (IoU of the 'on the contour' pixels)
    in_channels = 1  # grayscale in [0, 1], as the public loader's convert('L') / 255

    def __init__(self, config: PublicHGRUConfig):
        super().__init__(config)
        c = config.channels
        self.conv0 = nn.Conv2d(1, c, config.input_kernel, padding=config.input_kernel // 2)
        self.cell = HGRUCell(c, config.kernel_size, norm="none")
        self.cell.norm_inh, self.cell.norm_exc = InstanceNorm(c, config.eps), InstanceNorm(c, config.eps)
        self.head_norm = InstanceNorm(c, config.eps)
        self.head = nn.Conv2d(c, config.num_classes, 1)

    def encode(self, images: Tensor) -> Tensor:
        return self.conv0(images) ** 2

    def init_state(self, ctx: Tensor) -> Tensor:
        return torch.zeros_like(ctx)

    def step(self, ctx: Tensor, h: Tensor) -> Tensor:
        return softplus(self.cell(ctx, h))

    def readout(self, ctx: Tensor, h: Tensor) -> dict[str, Tensor]:
        return {"logits": self.head(self.head_norm(h))}

    def answer_proxy(self, ctx: Tensor, h: Tensor) -> Tensor:
        """The per-pixel decision (the readout is one norm and a 1x1 conv)."""
        return self.readout(ctx, h)["logits"].argmax(dim=1)
