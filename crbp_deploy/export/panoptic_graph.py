"""`--postprocess`: the panoptic grouping inside the exported graph.

Wraps a panoptic model so its readout also returns `panoptic` (int64 N x H x W labels,
class_index * label_divisor + instance) and `center_scores` (N x top_k). The grouping is
written with vectorised torch ops (crbp_deploy.panoptic.postprocess), so it exports like the heads;
a client then needs only `to_coco` (areas, boxes, ids), no tensor decoding of its own.
"""
from __future__ import annotations

from torch import Tensor

from ..errors import InputError
from ..modelcard import ModelCard
from ..models import RecurrentSegmenter
from ..panoptic.postprocess import PostprocessConfig, panoptic_labels, thing_mask_of


class WithPanopticLabels(RecurrentSegmenter):
    def __init__(self, model: RecurrentSegmenter, config: PostprocessConfig | None = None):
        categories = list(ModelCard.of(model).categories)
        if not categories:
            raise InputError("--postprocess needs a trained panoptic model whose card lists its categories")
        if getattr(model.config, "grouping", "center") != "center":
            raise InputError(
                f"--postprocess puts centre/offset grouping in the graph; this model groups by "
                f"{model.config.grouping}, which runs on the host (export without --postprocess)"
            )
        super().__init__(model.config)
        self.inner = model
        self.arch, self.task = model.arch, model.task
        self.meta = {**model.meta, "postprocess_in_graph": (config or PostprocessConfig()).to_dict()}
        self.in_channels, self.recurrent = model.in_channels, model.recurrent
        self.stride = getattr(model, "stride", 1)
        self.post = config or PostprocessConfig()
        self.register_buffer("thing_mask", thing_mask_of(categories), persistent=False)
        if getattr(model, "halting_head", None) is not None:  # the learned halting policy reads it
            self.halting_head = model.halting_head

    def answer_proxy(self, ctx: Tensor, h: Tensor) -> Tensor:
        return self.inner.answer_proxy(ctx, h)

    def encode(self, images: Tensor) -> Tensor:
        return self.inner.encode(images)

    def init_state(self, ctx: Tensor) -> Tensor:
        return self.inner.init_state(ctx)

    def step(self, ctx: Tensor, h: Tensor) -> Tensor:
        return self.inner.step(ctx, h)

    def readout(self, ctx: Tensor, h: Tensor) -> dict[str, Tensor]:
        heads = self.inner.readout(ctx, h)
        labels, scores = panoptic_labels(heads["semantic"], heads["center"], heads["offset"], self.thing_mask, **self.post.grouping())
        return {**heads, "panoptic": labels, "center_scores": scores}

    def check_images(self, images: Tensor) -> None:
        self.inner.check_images(images)
