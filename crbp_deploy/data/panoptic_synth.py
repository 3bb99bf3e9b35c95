"""Synthetic panoptic scenes written in the real COCO panoptic layout.

Why synthetic: a small, seeded set that needs what the C-RBP panoptic head is for —
long-range grouping. "curve" instances are long thin contours of one colour that cross
each other (the later one occludes the earlier, cutting it in two), so instance identity
can only be recovered by following a contour; "blob" instances are compact ellipses.
Two textured stuff classes split the background along a wavy boundary. Void (id 0)
pixels and occasional iscrowd=1 segments exercise evaluation code.

Layout (the same as COCO 2017 panoptic, split per folder):
    OUT/{train,val}/images/000000000007.png      RGB
    OUT/{train,val}/panoptic/000000000007.png    id = R + 256 G + 256^2 B, 0 = void
    OUT/{train,val}/annotations.json             COCO panoptic JSON
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import StrictConfig
from ..errors import ConfigError

# Non-contiguous ids on purpose (COCO's are 1..90 for things, 92..200 for stuff).
CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "curve", "supercategory": "shape", "isthing": 1, "color": [240, 220, 60]},
    {"id": 3, "name": "blob", "supercategory": "shape", "isthing": 1, "color": [220, 50, 60]},
    {"id": 184, "name": "ground", "supercategory": "background", "isthing": 0, "color": [140, 100, 60]},
    {"id": 190, "name": "water", "supercategory": "background", "isthing": 0, "color": [50, 90, 160]},
]
CURVE, BLOB, GROUND, WATER = 1, 3, 184, 190
SPLITS = ("train", "val")
MIN_SIZE, MAX_SIZE = 32, 1024

# Appearance (RGB in [0, 1]): class is recognisable locally, curve identity is not.
_CURVE_RGB = np.array([0.95, 0.88, 0.30])
_BLOB_RGB = np.array([0.85, 0.22, 0.25])
_GROUND_RGB = np.array([0.52, 0.40, 0.26])
_WATER_RGB = np.array([0.20, 0.34, 0.60])
_CLUTTER_RGB = np.array([0.55, 0.55, 0.55])


@dataclasses.dataclass(frozen=True)
class SynthConfig(StrictConfig):
    """Knobs of the generator. Pairs are (min, max); lengths and radii are fractions of the image size."""

    curves: tuple[int, int] = (2, 4)
    curve_thickness: tuple[float, float] = (2.0, 3.0)  # pixels
    curve_length: tuple[float, float] = (0.8, 1.5)  # x size
    curve_max_turn: float = 0.08  # radians per pixel (tightest radius of curvature 1/0.08 = 12.5 px)
    cross_prob: float = 0.7  # chance a curve is routed through an earlier one
    blobs: tuple[int, int] = (1, 3)
    blob_radius: tuple[float, float] = (0.05, 0.13)  # x size (ellipse semi-axes)
    crowd_prob: float = 0.25  # chance of one iscrowd=1 cluster of tiny blobs
    void_border_prob: float = 0.5  # chance of a 1-pixel void border
    void_patches: tuple[int, int] = (0, 2)  # unlabeled clutter squares
    min_thing_area: int = 6  # smaller visible remains of a thing become void
    noise: float = 0.03  # std of additive pixel noise

    def validate(self) -> None:
        for name in ("curves", "curve_thickness", "curve_length", "blobs", "blob_radius", "void_patches"):
            pair = getattr(self, name)
            if len(pair) != 2 or pair[0] > pair[1] or pair[0] < 0:
                raise ConfigError(f"SynthConfig.{name} must be (min, max) with 0 <= min <= max, got {pair!r}")
        if self.curve_thickness[0] < 1.0:
            raise ConfigError(f"SynthConfig.curve_thickness must be >= 1 pixel, got {self.curve_thickness!r}")
        if not 0 < self.blob_radius[1] <= 0.5:
            raise ConfigError(f"SynthConfig.blob_radius must lie in (0, 0.5], got {self.blob_radius!r}")
        for name in ("cross_prob", "crowd_prob", "void_border_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"SynthConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not 0.0 < self.curve_max_turn <= 0.5:
            raise ConfigError(f"SynthConfig.curve_max_turn must be in (0, 0.5], got {self.curve_max_turn!r}")
        if self.min_thing_area < 1 or self.noise < 0:
            raise ConfigError("SynthConfig.min_thing_area must be >= 1 and noise >= 0")


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ConfigError(f"image size must be an integer in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")


# ---------------------------------------------------------------- geometry


def _trace(rng: np.random.Generator, start, heading: float, steps: int, size: int, max_turn: float) -> np.ndarray:
    """A smooth random path of `steps` half-pixel steps: curvature drifts, and turns inward near the border."""
    pts = np.empty((steps, 2))
    p = np.array(start, dtype=float)
    theta, kappa = heading, rng.uniform(-max_turn, max_turn) * 0.5
    margin, centre = 0.1 * size, (size - 1) / 2
    for i in range(steps):
        pts[i] = p
        kappa = float(np.clip(0.97 * kappa + rng.normal(0, 0.15 * max_turn), -max_turn, max_turn))
        theta += 0.5 * kappa
        if min(p[0], p[1], size - 1 - p[0], size - 1 - p[1]) < margin:
            inward = np.arctan2(centre - p[0], centre - p[1])
            theta += float(np.clip(np.angle(np.exp(1j * (inward - theta))), -max_turn, max_turn))
        p = p + 0.5 * np.array([np.sin(theta), np.cos(theta)])
    return pts


def _stamp(points: np.ndarray, radius: float, size: int) -> np.ndarray:
    """Rasterise a polyline of closely spaced points as a band of the given radius (pixel centres at integers)."""
    r = int(np.ceil(radius))
    oy, ox = np.mgrid[-r : r + 1, -r : r + 1]
    base = np.floor(points).astype(np.int64)
    py = base[:, None, 0] + oy.ravel()[None]
    px = base[:, None, 1] + ox.ravel()[None]
    near = (py - points[:, None, 0]) ** 2 + (px - points[:, None, 1]) ** 2 <= radius**2
    near &= (py >= 0) & (py < size) & (px >= 0) & (px < size)
    mask = np.zeros((size, size), dtype=bool)
    mask[py[near], px[near]] = True
    return mask


def _curves(rng: np.random.Generator, size: int, cfg: SynthConfig) -> list[np.ndarray]:
    paths: list[np.ndarray] = []
    for _ in range(rng.integers(cfg.curves[0], cfg.curves[1] + 1)):
        steps = int(2 * size * rng.uniform(*cfg.curve_length))
        if paths and rng.random() < cfg.cross_prob:
            # Route through a point on an earlier curve at a clear angle: a guaranteed crossing.
            other = paths[rng.integers(len(paths))]
            j = int(rng.integers(len(other) // 4, max(len(other) * 3 // 4, len(other) // 4 + 1)))
            tangent = other[min(j + 1, len(other) - 1)] - other[max(j - 1, 0)]
            heading = np.arctan2(tangent[0], tangent[1]) + rng.choice([-1, 1]) * rng.uniform(np.pi / 5, np.pi / 2)
            ahead = _trace(rng, other[j], heading, steps - steps // 2, size, cfg.curve_max_turn)
            behind = _trace(rng, other[j], heading + np.pi, steps // 2 + 1, size, cfg.curve_max_turn)
            paths.append(np.concatenate([behind[:0:-1], ahead]))
        else:
            start = rng.uniform(0.15 * size, 0.85 * size, 2)
            paths.append(_trace(rng, start, rng.uniform(0, 2 * np.pi), steps, size, cfg.curve_max_turn))
    return paths


def _ellipse(yy, xx, cy, cx, ry, rx, angle) -> np.ndarray:
    """Normalised squared radius of an ellipse: < 1 inside."""
    c, s = np.cos(angle), np.sin(angle)
    u, v = (yy - cy) * c + (xx - cx) * s, -(yy - cy) * s + (xx - cx) * c
    return (u / ry) ** 2 + (v / rx) ** 2


# ---------------------------------------------------------------- ids


def _thing_id(rng: np.random.Generator, color, taken: set[int]) -> int:
    """COCO-style segment id: the category colour jittered until unique (stuff ids are the colour itself)."""
    base = np.array(color)
    for _ in range(10_000):
        rgb = np.clip(base + rng.integers(-40, 41, 3), 0, 255)
        seg_id = int(rgb[0]) + 256 * int(rgb[1]) + 65536 * int(rgb[2])
        if seg_id and seg_id not in taken:
            taken.add(seg_id)
            return seg_id
    raise RuntimeError("no free segment id")  # unreachable with a handful of segments


def _bbox(mask: np.ndarray) -> list[int]:
    """COCO [x, y, width, height] of a boolean mask, inclusive of both edges."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


# ---------------------------------------------------------------- one scene


def generate_sample(
    index: int, seed: int, size: int, config: SynthConfig | None = None
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """One scene: (rgb uint8 HxWx3, pan_id uint32 HxW, COCO segments_info). Depends only on (index, seed, size, config)."""
    cfg = config or SynthConfig()
    _check_size(size)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]))
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    label = np.zeros((size, size), dtype=np.int32)  # index into `segs` + 1, 0 = void
    segs: list[dict[str, Any]] = []  # {"category_id", "iscrowd"}
    rgb = np.zeros((size, size, 3))

    def add(mask: np.ndarray, category_id: int, iscrowd: int = 0) -> None:
        segs.append({"category_id": category_id, "iscrowd": iscrowd})
        label[mask] = len(segs)

    # Stuff: ground (diagonal stripes) and water (horizontal ripples) split by a wavy line.
    phi = rng.uniform(0, 2 * np.pi)
    u = (xx - size / 2) * np.cos(phi) + (yy - size / 2) * np.sin(phi)
    v = -(xx - size / 2) * np.sin(phi) + (yy - size / 2) * np.cos(phi)
    wave = rng.uniform(-0.25, 0.25) * size + rng.uniform(0.03, 0.1) * size * np.sin(
        2 * np.pi * v / (rng.uniform(0.4, 1.0) * size) + rng.uniform(0, 2 * np.pi)
    )
    ground = u < wave
    add(ground, GROUND)
    add(~ground, WATER)
    stripes = 0.07 * np.sin(2 * np.pi * (xx + yy) / 6.0)
    ripples = 0.07 * np.sin(2 * np.pi * yy / 4.0 + 0.8 * np.sin(2 * np.pi * xx / 17.0))
    rgb[ground] = _GROUND_RGB + stripes[ground, None]
    rgb[~ground] = _WATER_RGB + ripples[~ground, None]

    _paint_void_patches(rng, cfg, yy, xx, rgb, label)

    # Blobs: shaded ellipses.
    for _ in range(rng.integers(cfg.blobs[0], cfg.blobs[1] + 1)):
        ry, rx = rng.uniform(*cfg.blob_radius, 2) * size
        ry, rx = max(ry, 2.0), max(rx, 2.0)
        cy, cx = rng.uniform(0.1 * size, 0.9 * size, 2)
        r2 = _ellipse(yy, xx, cy, cx, ry, rx, rng.uniform(0, np.pi))
        inside = r2 < 1
        rgb[inside] = _BLOB_RGB * (1.0 - 0.35 * r2[inside, None])
        add(inside, BLOB)

    # Crowd: a cluster of tiny blobs annotated as one iscrowd=1 blob segment.
    if rng.random() < cfg.crowd_prob:
        cy, cx = rng.uniform(0.15 * size, 0.85 * size, 2)
        spread = max(3.0, 0.08 * size)
        crowd = np.zeros((size, size), dtype=bool)
        for _ in range(rng.integers(8, 21)):
            ty, tx = rng.normal([cy, cx], spread)
            crowd |= (yy - ty) ** 2 + (xx - tx) ** 2 <= rng.uniform(1.0, 2.2) ** 2
        rgb[crowd] = _BLOB_RGB * 0.9
        add(crowd, BLOB, iscrowd=1)

    # Curves, all the same colour; each later curve occludes the earlier ones where they cross.
    for path in _curves(rng, size, cfg):
        band = _stamp(path, rng.uniform(*cfg.curve_thickness) / 2, size)
        rgb[band] = _CURVE_RGB
        add(band, CURVE)

    if rng.random() < cfg.void_border_prob:
        for edge in ((0, slice(None)), (-1, slice(None)), (slice(None), 0), (slice(None), -1)):
            label[edge] = 0

    rgb += rng.normal(0.0, cfg.noise, rgb.shape) if cfg.noise > 0 else 0.0
    image = np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)

    return (image, *_panoptic_ids(rng, cfg, label, segs))


def _paint_void_patches(rng, cfg: SynthConfig, yy: np.ndarray, xx: np.ndarray, rgb: np.ndarray,
                        label: np.ndarray) -> None:
    """Void: unlabeled grey clutter squares (checkerboard), labelled 0."""
    size = label.shape[0]
    for _ in range(rng.integers(cfg.void_patches[0], cfg.void_patches[1] + 1)):
        side = int(rng.integers(max(2, size // 24), max(3, size // 10) + 1))
        y0, x0 = rng.integers(0, size - side, 2)
        patch = (slice(y0, y0 + side), slice(x0, x0 + side))
        checker = ((yy[patch] // 2 + xx[patch] // 2) % 2) * 0.25 - 0.125
        rgb[patch] = _CLUTTER_RGB + checker[..., None]
        label[patch] = 0


def _panoptic_ids(rng, cfg: SynthConfig, label: np.ndarray, segs: list[dict[str, Any]]
                  ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """(pan_id uint32 HxW, COCO segments_info) from the painted label map (index into `segs` + 1, 0 = void)."""
    colors = {c["id"]: c["color"] for c in CATEGORIES}
    things = {c["id"] for c in CATEGORIES if c["isthing"]}
    areas = np.bincount(label.ravel(), minlength=len(segs) + 1)
    taken = {int(colors[c][0] + 256 * colors[c][1] + 65536 * colors[c][2]) for c in colors if c not in things}
    pan = np.zeros(label.shape, dtype=np.uint32)
    segments_info = []
    for k, seg in enumerate(segs, start=1):
        area = int(areas[k])
        thing = seg["category_id"] in things
        if area == 0:
            continue
        mask = label == k
        if thing and not seg["iscrowd"] and area < cfg.min_thing_area:
            continue  # a sliver left by occlusion: leave it void, as annotators would
        color = colors[seg["category_id"]]
        seg_id = _thing_id(rng, color, taken) if thing else color[0] + 256 * color[1] + 65536 * color[2]
        pan[mask] = seg_id
        segments_info.append(
            {"id": int(seg_id), "category_id": seg["category_id"], "iscrowd": seg["iscrowd"], "bbox": _bbox(mask), "area": area}
        )
    return pan, segments_info


# ---------------------------------------------------------------- dataset on disk


def _id_png(pan: np.ndarray) -> np.ndarray:
    return np.stack([pan & 255, (pan >> 8) & 255, (pan >> 16) & 255], axis=-1).astype(np.uint8)


def _save_png(array: np.ndarray, path: Path) -> None:
    """Write then rename, so a crash never leaves a truncated PNG under its final name."""
    from PIL import Image

    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def split_counts(count: int, val_fraction: float) -> tuple[int, int]:
    """(train, val): val gets round(count * fraction) images, at least one of each when both are asked for."""
    n_val = int(round(count * val_fraction))
    if 0 < val_fraction and count >= 2:
        n_val = max(n_val, 1)
    if val_fraction < 1 and count >= 2:
        n_val = min(n_val, count - 1)
    return count - n_val, n_val


def check_args(out: str | os.PathLike, count: int, size: int, val_fraction: float) -> None:
    """ConfigError for arguments write_dataset cannot use (callers check before showing progress)."""
    _check_size(size)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"count must be a positive integer, got {count!r}")
    if not 0.0 <= val_fraction <= 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1], got {val_fraction!r}")
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"output {out} exists and is not a folder")


def write_dataset(
    out: str | os.PathLike,
    count: int,
    size: int = 128,
    seed: int = 0,
    val_fraction: float = 0.2,
    config: SynthConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write `count` scenes as OUT/{train,val}; image i is the same whatever `count` or the split.

    Each split's annotations.json is removed first and written last (atomically), so it never
    lists a file that is missing. `progress(i)` is called after each image. Returns a summary.
    """
    cfg = config or SynthConfig()
    check_args(out, count, size, val_fraction)
    root = Path(out)
    n_train, _ = split_counts(count, val_fraction)
    summary: dict[str, Any] = {"out": str(root), "size": size, "seed": seed, "splits": {}}
    for split in SPLITS:
        for sub in ("images", "panoptic"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        (root / split / "annotations.json").unlink(missing_ok=True)
    records: dict[str, tuple[list, list]] = {s: ([], []) for s in SPLITS}
    crowd = void = 0
    for index in range(count):
        split = "train" if index < n_train else "val"
        image, pan, segments = generate_sample(index, seed, size, cfg)
        name = f"{index:012d}.png"
        _save_png(image, root / split / "images" / name)
        _save_png(_id_png(pan), root / split / "panoptic" / name)
        images, annotations = records[split]
        images.append({"id": index, "file_name": name, "width": size, "height": size})
        annotations.append({"image_id": index, "file_name": name, "segments_info": segments})
        crowd += sum(s["iscrowd"] for s in segments)
        void += int((pan == 0).sum())
        if progress:
            progress(index)
    for split in SPLITS:
        images, annotations = records[split]
        info = {"description": "crbp-deploy synthetic panoptic", "split": split, "seed": seed, "size": size, "config": cfg.to_dict()}
        doc = {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": CATEGORIES}
        _write_json(doc, root / split / "annotations.json")
        summary["splits"][split] = len(images)
    summary.update(crowd_segments=crowd, void_fraction=void / (count * size * size))
    return summary


# ---------------------------------------------------------------- preview


def _palette(pan: np.ndarray, segments: list[dict[str, Any]]) -> np.ndarray:
    """Stuff in greys, each thing in its own saturated hue, void black: instances are told apart at a glance."""
    import colorsys

    things = {c["id"] for c in CATEGORIES if c["isthing"]}
    out = np.zeros(pan.shape + (3,), dtype=np.uint8)
    n_thing = n_stuff = 0
    for s in segments:
        if s["category_id"] in things:
            rgb = colorsys.hsv_to_rgb((n_thing * 0.618034) % 1.0, 0.85, 1.0)
            n_thing += 1
        else:
            rgb = (0.22 + 0.2 * n_stuff,) * 3
            n_stuff += 1
        out[pan == s["id"]] = np.rint(np.array(rgb) * 255)
    return out


def contact_sheet(samples: list[tuple[np.ndarray, np.ndarray, list]], columns: int = 4, zoom: int = 1) -> np.ndarray:
    """Image | instance-coloured ground truth (void black, crowd hatched white) pairs in a grid, as uint8 RGB."""
    tiles = []
    for image, pan, segments in samples:
        view = _palette(pan, segments)
        size = pan.shape[0]
        hatch = (np.add.outer(np.arange(size), np.arange(size)) % 4) < 2
        for s in segments:
            if s["iscrowd"]:
                view[(pan == s["id"]) & hatch] = 255
        gap = np.full((size, 2, 3), 255, np.uint8)
        tile = np.concatenate([image, gap, view], axis=1)
        tiles.append(tile.repeat(zoom, 0).repeat(zoom, 1))
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    sheet = np.full((rows * (h + 8), columns * (w + 8), 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[r * (h + 8) + 4 : r * (h + 8) + 4 + h, c * (w + 8) + 4 : c * (w + 8) + 4 + w] = tile
    return sheet
