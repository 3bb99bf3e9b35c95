"""COCO panoptic id maps <-> RGB PNG (id = R + 256 G + 256^2 B; 0 = void).

Kept here, beside post-processing and PQ, so neither depends on the data reader.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ..errors import InputError

#: Ids must fit in three 8-bit channels.
MAX_ID = 256**3 - 1


def rgb_to_id(rgb) -> np.ndarray:
    """H x W x 3 uint8 RGB -> H x W int64 segment ids."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise InputError(f"an RGB id map must be H x W x 3, got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise InputError(f"an RGB id map must be uint8, got {rgb.dtype}")
    c = rgb.astype(np.int64)
    return c[..., 0] + 256 * c[..., 1] + 256 * 256 * c[..., 2]


def id_to_rgb(ids) -> np.ndarray:
    """H x W integer segment ids in [0, 256^3) -> H x W x 3 uint8 RGB."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise InputError(f"an id map must be H x W, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"an id map must hold integers, got {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() > MAX_ID):
        raise InputError(f"segment ids must be in 0..{MAX_ID}, got {ids.min()}..{ids.max()}")
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def encode_png(ids) -> bytes:
    """H x W segment ids -> PNG bytes in the COCO panoptic RGB encoding."""
    buf = io.BytesIO()
    Image.fromarray(id_to_rgb(ids)).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes in the COCO panoptic RGB encoding -> H x W int64 segment ids."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = np.asarray(img.convert("RGB"))
    except Exception as exc:  # PIL raises several unrelated types for bad data
        raise InputError(f"not a readable PNG id map: {exc}") from exc
    return rgb_to_id(rgb)
