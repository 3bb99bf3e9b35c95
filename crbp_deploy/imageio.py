"""Decoding and validating user images: whatever arrives becomes float32 RGB in [0, 1], or a clear error.

Shared by `predict`, `eval` and the TorchServe handler so every entry point accepts the same inputs.
`to_channels` then gives a model the channels it takes (luma for the 1-channel Pathfinder models).
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import StrictConfig
from .errors import ConfigError, InputError


@dataclass(frozen=True)
class ImageLimits(StrictConfig):
    max_bytes: int = 20 * 1024 * 1024
    min_side: int = 8
    max_side: int = 2048
    max_pixels: int = 2048 * 2048
    formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")

    def validate(self) -> None:
        if not 1 <= self.min_side <= self.max_side or self.max_pixels < 1 or self.max_bytes < 1:
            raise ConfigError(f"inconsistent image limits: {self}")


DEFAULT_LIMITS = ImageLimits()


def decode_image(data: bytes, *, name: str = "image", limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Bytes -> float32 H x W x 3 in [0, 1]. Grayscale, RGBA, palette and 16-bit images are converted.

    The header is checked against the size limits before any pixel is decoded, so a small file that
    claims a huge image (a decompression bomb) is refused without allocating it.
    """
    if not data:
        raise InputError(f"{name}: empty input (0 bytes)")
    if len(data) > limits.max_bytes:
        raise InputError(f"{name}: {len(data)} bytes exceeds the limit of {limits.max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            w, h = img.size
            if fmt not in limits.formats:
                raise InputError(f"{name}: format {fmt} is not accepted (accepted: {', '.join(limits.formats)})")
            _check_size(name, w, h, limits)
            img.load()
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{name}: not an image (no known image format recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{name}: refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{name}: truncated or corrupt {fmt or 'image'} ({exc})") from None
    if img.mode == "F":  # a float image (TIFF) may hold NaN or infinity: bad input, not a model failure
        bad = int(np.count_nonzero(~np.isfinite(np.asarray(img, dtype=np.float32))))
        if bad:
            raise InputError(f"{name}: {bad} pixel(s) of this float image are NaN or infinite; send finite values")
    return to_rgb_float(img)


def _check_size(name: str, w: int, h: int, limits: ImageLimits) -> None:
    if min(w, h) < limits.min_side:
        raise InputError(f"{name}: {w}x{h} is too small (each side must be >= {limits.min_side} px)")
    if max(w, h) > limits.max_side or w * h > limits.max_pixels:
        raise InputError(
            f"{name}: {w}x{h} is too large (sides <= {limits.max_side} px, at most {limits.max_pixels} pixels)"
        )


def to_rgb_float(img: Image.Image) -> np.ndarray:
    """Any Pillow mode -> float32 H x W x 3 in [0, 1]; 16-bit and float images keep their range."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        scale = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        gray = np.clip(arr / scale, 0.0, 1.0)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "F":
        gray = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (0, 0, 0, 255))  # transparent pixels become black
        img = Image.alpha_composite(canvas, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


#: ITU-R BT.601 luma weights: Pillow's convert("L"), which the Pathfinder data and the paper's loader use.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def to_channels(image: np.ndarray, channels: int, *, name: str = "image") -> np.ndarray:
    """H x W x C float image -> H x W x `channels`: a colour image becomes its luma for a 1-channel model (a
    grayscale one, its channels equal, comes back bit for bit); a 1-channel image is repeated for a 3-channel
    model. Anything else is an InputError naming the shapes."""
    if image.ndim != 3:
        raise InputError(f"{name}: expected H x W x C, got shape {tuple(image.shape)}")
    have = image.shape[2]
    if have == channels:
        return image
    if have == 3 and channels == 1:
        if np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2]):
            return np.ascontiguousarray(image[..., :1])
        return np.clip(image @ LUMA, 0.0, 1.0)[..., None].astype(np.float32)
    if have == 1 and channels == 3:
        return np.repeat(image, 3, axis=2)
    raise InputError(f"{name}: {have} channel(s) cannot be given to a model that takes {channels}")


def read_image(path: str | os.PathLike, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise InputError(f"{path}: {size} bytes exceeds the limit of {limits.max_bytes} bytes")
    return decode_image(path.read_bytes(), name=str(path), limits=limits)
