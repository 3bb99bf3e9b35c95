"""`hgru-panoptic`: a box-free panoptic segmenter on a recurrent hGRU core.

encode:  normalise -> strided conv encoder (stride 2**downsample) -> drive X (ctx)
step:    the hGRU cell, h <- F(X, h)   (trained with C-RBP through `training.solve`)
readout: [h, X] -> 3x3 conv -> heads, upsampled to the input size:
         "semantic" [B, K, H, W] logits, and the instance heads of the config's `grouping`:
         - "center": "center" [B, 1, H, W] logits of the instance-centre heatmap and "offset" [B, 2, H, W]
           (dy, dx) in input pixels from each pixel to its instance centre (Panoptic-DeepLab);
         - "embedding": "embedding" [B, E, H, W], a per-pixel instance embedding (De Brabandere et al. 2017)
           that the recurrent state refines: pixels of one instance lie close together, instances far apart.
           It fits long thin curves, whose centre of mass can lie far off the curve, and occluded curves
           cut in two, which keep one identity in embedding space though they are not connected.

Every op is a plain conv / norm / pointwise op, so the whole model exports to ONNX and TensorRT (no RoI
pooling, no NMS). `ff-panoptic` is the feed-forward baseline: same encoder and heads, the recurrence
replaced by stacked convs (its `step` is the identity, so it converges after one step).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import StrictConfig
from ..errors import ConfigError
from .contract import RecurrentSegmenter
from .hgru import HGRUCell, make_norm
from .registry import register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GROUPINGS = ("center", "embedding")


@dataclass(frozen=True)
class PanopticConfig(StrictConfig):
    num_classes: int = 4
    thing_classes: tuple[int, ...] = (0, 1)  # contiguous indices of the "thing" classes
    encoder_channels: int = 32
    downsample: int = 2  # stride = 2 ** downsample
    channels: int = 24  # recurrent state channels
    kernel_size: int = 7
    ff_depth: int = 3  # ff-panoptic only: stacked kernel_size convs replacing the recurrence
    head_channels: int = 32
    norm: str = "group"
    grouping: str = "center"  # instance heads: "center" (centre + offset) | "embedding"
    embedding_dim: int = 8  # grouping="embedding" only

    def validate(self) -> None:
        for name in ("num_classes", "encoder_channels", "channels", "kernel_size", "head_channels", "ff_depth"):
            if getattr(self, name) < 1:
                raise ConfigError(f"PanopticConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.downsample <= 4:
            raise ConfigError(f"PanopticConfig.downsample must be in 0..4, got {self.downsample}")
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"PanopticConfig.kernel_size must be odd, got {self.kernel_size}")
        bad = [c for c in self.thing_classes if not 0 <= c < self.num_classes]
        if bad:
            raise ConfigError(f"PanopticConfig.thing_classes {bad} outside 0..{self.num_classes - 1}")
        if self.grouping not in GROUPINGS:
            raise ConfigError(f"PanopticConfig.grouping must be one of {', '.join(GROUPINGS)}, got {self.grouping!r}")
        if self.embedding_dim < 1:
            raise ConfigError(f"PanopticConfig.embedding_dim must be >= 1, got {self.embedding_dim}")
        if self.norm not in ("group", "instance", "none"):
            raise ConfigError(f"PanopticConfig.norm must be group, instance or none, got {self.norm!r}")


def _conv_block(cin: int, cout: int, stride: int, norm: str, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2), make_norm(norm, cout), nn.ReLU())


class _PanopticBase(RecurrentSegmenter):
    in_channels = 3
    task = "panoptic"  # what eval / calibrate / bench score it on (PQ)

    def __init__(self, config: PanopticConfig):
        super().__init__(config)
        c = config
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        layers = [_conv_block(3, c.encoder_channels, 1, c.norm)]
        layers += [_conv_block(c.encoder_channels, c.encoder_channels, 2, c.norm) for _ in range(c.downsample)]
        self.encoder = nn.Sequential(*layers)
        self.drive = nn.Conv2d(c.encoder_channels, c.channels, 1)
        self.head_trunk = _conv_block(2 * c.channels, c.head_channels, 1, c.norm)
        self.semantic_head = nn.Conv2d(c.head_channels, c.num_classes, 1)
        if c.grouping == "embedding":
            self.embedding_head = nn.Conv2d(c.head_channels, c.embedding_dim, 1)
        else:
            self.center_head = nn.Conv2d(c.head_channels, 1, 1)
            self.offset_head = nn.Conv2d(c.head_channels, 2, 1)
            nn.init.constant_(self.center_head.bias, -4.0)  # heatmap starts near 0, as most pixels are not centres
        self.stride = 2**c.downsample

    def encode(self, images: Tensor) -> Tensor:
        return self.drive(self.encoder((images - self.mean) / self.std))

    def init_state(self, ctx: Tensor) -> Tensor:
        return torch.zeros_like(ctx)

    def readout(self, ctx: Tensor, h: Tensor) -> dict[str, Tensor]:
        feats = self.head_trunk(torch.cat([h, ctx], dim=1))
        # Heads are computed at feature resolution and upsampled to the input size.
        size = (ctx.shape[-2] * self.stride, ctx.shape[-1] * self.stride)
        up = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=False)  # noqa: E731
        if self.config.grouping == "embedding":
            return {"semantic": up(self.semantic_head(feats)), "embedding": up(self.embedding_head(feats))}
        return {
            "semantic": up(self.semantic_head(feats)),
            "center": up(self.center_head(feats)),
            "offset": up(self.offset_head(feats)) * float(self.stride),
        }

    def answer_proxy(self, ctx: Tensor, h: Tensor) -> Tensor:
        """The semantic argmax at state resolution: the cheap answer the `stable` halting policy watches."""
        return self.semantic_head(self.head_trunk(torch.cat([h, ctx], dim=1))).argmax(dim=1)

    def check_images(self, images: Tensor) -> None:
        super().check_images(images)
        h, w = images.shape[-2:]
        if h % self.stride or w % self.stride:
            from ..errors import InputError

            raise InputError(f"image size {h}x{w} must be a multiple of the model stride {self.stride}")


@register_model(
    "hgru-panoptic",
    PanopticConfig,
    tiny={"encoder_channels": 8, "channels": 6, "kernel_size": 3, "head_channels": 8, "downsample": 1},
)
class HGRUPanoptic(_PanopticBase):
    """Box-free panoptic segmenter (semantic + centre + offset heads) on an hGRU core."""

    def __init__(self, config: PanopticConfig):
        super().__init__(config)
        self.cell = HGRUCell(config.channels, config.kernel_size, config.norm)

    def step(self, ctx: Tensor, h: Tensor) -> Tensor:
        return self.cell(ctx, h)


@register_model(
    "ff-panoptic",
    PanopticConfig,
    tiny={"encoder_channels": 8, "channels": 6, "kernel_size": 3, "head_channels": 8, "downsample": 1, "ff_depth": 2},
)
class FFPanoptic(_PanopticBase):
    """Feed-forward baseline: the recurrence replaced by stacked convs (step is the identity)."""

    recurrent = False

    def __init__(self, config: PanopticConfig):
        super().__init__(config)
        c = config
        self.trunk = nn.Sequential(*[_conv_block(c.channels, c.channels, 1, c.norm, c.kernel_size) for _ in range(c.ff_depth)])

    def init_state(self, ctx: Tensor) -> Tensor:
        return self.trunk(ctx)

    def step(self, ctx: Tensor, h: Tensor) -> Tensor:
        return h
