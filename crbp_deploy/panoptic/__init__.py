"""Panoptic post-processing (heads -> COCO segments), COCO id-map encoding, and PQ."""
from .encoding import decode_png, encode_png, id_to_rgb, rgb_to_id
from .postprocess import PostprocessConfig, panoptic_labels, postprocess, thing_mask_of, to_coco
from .pq import evaluate_panoptic, format_table, match_image

__all__ = [
    "PostprocessConfig",
    "decode_png",
    "encode_png",
    "evaluate_panoptic",
    "format_table",
    "id_to_rgb",
    "match_image",
    "panoptic_labels",
    "postprocess",
    "rgb_to_id",
    "thing_mask_of",
    "to_coco",
]
