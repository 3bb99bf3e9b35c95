"""Image decoding: every mode converted, every bad input named."""
import io
import zlib
import struct

import numpy as np
import pytest
from PIL import Image

from crbp_deploy.errors import InputError
from crbp_deploy.imageio import ImageLimits, decode_image, read_image


def _png(img: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _bomb_png(w: int, h: int) -> bytes:
    """A valid PNG header that claims w x h pixels, with a tiny body."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P", "I;16", "1"])
def test_modes_become_rgb_float(mode):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).convert(mode)
    out = decode_image(_png(img))
    assert out.shape == (20, 30, 3) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_sixteen_bit_keeps_range():
    arr = np.full((10, 10), 65535, dtype=np.uint16)
    arr[0, 0] = 0
    out = decode_image(_png(Image.fromarray(arr)))
    assert out.max() == pytest.approx(1.0) and out.min() == 0.0


def test_rgba_transparent_is_black():
    img = Image.new("RGBA", (10, 10), (255, 255, 255, 0))
    assert decode_image(_png(img)).max() == 0.0


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_other_formats(fmt):
    img = Image.new("RGB", (16, 16), (200, 10, 10))
    assert decode_image(_png(img, fmt)).shape == (16, 16, 3)


def test_bad_inputs_are_named():
    good = _png(Image.new("RGB", (64, 64)))
    with pytest.raises(InputError, match="empty input"):
        decode_image(b"")
    with pytest.raises(InputError, match="not an image"):
        decode_image(b"hello, this is plain text")
    with pytest.raises(InputError, match="truncated or corrupt PNG"):
        decode_image(good[: len(good) // 2])
    with pytest.raises(InputError, match="too small"):
        decode_image(_png(Image.new("RGB", (1, 1))))
    with pytest.raises(InputError, match="decompression bomb|20000x20000 is too large"):
        decode_image(_bomb_png(20000, 20000))
    with pytest.raises(InputError, match="exceeds the limit"):
        decode_image(good, limits=ImageLimits(max_bytes=10))
    with pytest.raises(InputError, match="format GIF is not accepted"):
        decode_image(_png(Image.new("RGB", (16, 16)), "GIF"))


def test_read_image_missing(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_image(tmp_path / "nope.png")
