"""Read COCO panoptic data: the real COCO 2017 files and the synthetic set in the same layout.

COCO panoptic = a JSON (images, annotations with segments_info, categories) + one RGB PNG
per image whose pixel colour encodes the segment id (id = R + 256 G + 256^2 B, 0 = void)
+ the images themselves in a separate folder. Category ids come from the JSON and need
not be contiguous; `category_index` maps them to the contiguous indices a model predicts.
Crowd segments (iscrowd=1) and void are ignored by the dense training targets (255 / 0),
as COCO's PQ evaluation ignores them.

Every problem with the files raises DatasetError naming the file, never a bare PIL or
KeyError from deep inside a data loader worker.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import DatasetError, InputError  # noqa: F401  (DatasetError: re-exported)

IGNORE = 255  # semantic label of void and crowd pixels


# ---------------------------------------------------------------- id <-> colour


# one implementation of the COCO id encoding, shared with post-processing and PQ
from ..panoptic.encoding import id_to_rgb, rgb_to_id  # noqa: E402,F401


# ---------------------------------------------------------------- categories


def category_index(categories: Sequence[Mapping[str, Any]]) -> dict[int, int]:
    """{category_id: contiguous index}, in increasing id order (the order COCO lists them)."""
    ids = sorted(int(c["id"]) for c in categories)
    if len(set(ids)) != len(ids):
        raise DatasetError(f"duplicate category ids in {ids}")
    if len(ids) > IGNORE:
        raise DatasetError(f"{len(ids)} categories do not fit beside the ignore label {IGNORE}")
    return {cid: i for i, cid in enumerate(ids)}


def category_ids(categories: Sequence[Mapping[str, Any]]) -> list[int]:
    """The inverse of category_index: list[contiguous index] = category_id."""
    return sorted(category_index(categories))


# ---------------------------------------------------------------- JSON


def _require(entry: Any, keys: Sequence[str], where: str, path: Path) -> None:
    if not isinstance(entry, dict):
        raise DatasetError(f"{path}: {where} is not an object")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise DatasetError(f"{path}: {where} lacks {', '.join(missing)}; not a COCO panoptic annotation file")


def load_annotations(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a COCO panoptic JSON: the fields this reader needs are present and consistent."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"annotation file {path} not found")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read JSON ({exc})") from None
    _require(doc, ("images", "annotations", "categories"), "the top level", path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc[key], list):
            raise DatasetError(f"{path}: '{key}' must be a list")
    for i, c in enumerate(doc["categories"]):
        _require(c, ("id", "name", "isthing"), f"categories[{i}]", path)
    known = {c["id"] for c in doc["categories"]}
    images = {}
    for i, im in enumerate(doc["images"]):
        _require(im, ("id", "file_name", "width", "height"), f"images[{i}]", path)
        images[im["id"]] = im
    seen = set()
    for i, ann in enumerate(doc["annotations"]):
        _require(ann, ("image_id", "file_name", "segments_info"), f"annotations[{i}]", path)
        if ann["image_id"] not in images:
            raise DatasetError(f"{path}: annotations[{i}] refers to image_id {ann['image_id']} not in 'images'")
        seen.add(ann["image_id"])
        ids = set()
        for j, seg in enumerate(ann["segments_info"]):
            _require(seg, ("id", "category_id"), f"annotations[{i}].segments_info[{j}]", path)
            if seg["category_id"] not in known:
                raise DatasetError(f"{path}: annotations[{i}] segment {seg['id']} has unknown category_id {seg['category_id']}")
            if not isinstance(seg["id"], int) or not 0 < seg["id"] < 1 << 24 or seg["id"] in ids:
                raise DatasetError(f"{path}: annotations[{i}] segment id {seg['id']} is 0, out of range or repeated")
            ids.add(seg["id"])
    unannotated = [images[k]["file_name"] for k in images if k not in seen]
    if unannotated:
        raise DatasetError(f"{path}: {len(unannotated)} image(s) have no annotation, e.g. {unannotated[0]}")
    return doc


# ---------------------------------------------------------------- images


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Any image file -> uint8 HxWx3: grayscale, palette, alpha and 16-bit images are converted to RGB."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode.startswith("I") or mode == "F":
                # 16/32-bit grayscale: scale the 16-bit range to 8 bits (PIL's own convert clips instead).
                gray = np.asarray(img, dtype=np.float64)
                if mode.startswith("I;16") or gray.max(initial=0) > 255:
                    gray = gray / 257.0
                gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
                return np.repeat(gray[..., None], 3, axis=-1)
            if mode in ("P", "PA", "LA", "La"):
                img = img.convert("RGBA")
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DatasetError(f"image file {path} not found") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from None


def load_ids(path: str | os.PathLike) -> np.ndarray:
    """A panoptic PNG -> uint32 HxW segment ids. It must be an RGB (or palette) PNG, as COCO writes them."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("RGB", "RGBA", "P"):
                raise DatasetError(f"panoptic PNG {path} has mode {img.mode}; ids must be encoded as RGB")
            return rgb_to_id(np.asarray(img.convert("RGB")))
    except FileNotFoundError:
        raise DatasetError(f"panoptic PNG {path} not found") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"cannot read panoptic PNG {path}: {exc}") from None


# ---------------------------------------------------------------- dense targets


def dense_targets(
    pan_ids: np.ndarray | torch.Tensor,
    segments: Sequence[Mapping[str, Any]],
    category_index: Mapping[int, int],
    stride: int = 1,
    sigma: float = 8.0,
    isthing: Mapping[int, bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Targets for a box-free panoptic head (semantic + instance centres + centre offsets).

    All maps lie on the output grid of the given stride: cell (i, j) stands for input pixel
    (i*stride + stride//2, j*stride + stride//2), clipped to the image, and takes that pixel's
    segment. Centres are each thing instance's centre of mass at full resolution.

    Returns (h = ceil(H/stride), w = ceil(W/stride)):
      semantic       int64 h x w: contiguous class, IGNORE (255) for void and crowd
      thing_instance int64 h x w: 0 = not a (non-crowd) thing, k = k-th thing segment in `segments`
      center         float32 1 x h x w: max over instances of exp(-d^2 / 2 sigma^2), d in input pixels
      offset         float32 2 x h x w: (dy, dx) in input pixels from the cell to its instance centre
      offset_mask    float32 1 x h x w: 1 where offset is defined (thing pixels)
    `isthing` maps category_id -> bool; by default a segment's own "isthing" key is used.
    """
    if stride < 1 or sigma <= 0:
        raise InputError(f"stride must be >= 1 and sigma > 0, got stride={stride}, sigma={sigma}")
    ids = pan_ids.numpy() if isinstance(pan_ids, torch.Tensor) else np.asarray(pan_ids)
    ids = ids.astype(np.int64)
    H, W = ids.shape
    ys = np.minimum(np.arange(0, H, stride) + stride // 2, H - 1)
    xs = np.minimum(np.arange(0, W, stride) + stride // 2, W - 1)
    grid = ids[np.ix_(ys, xs)]
    gy, gx = np.meshgrid(ys.astype(np.float64), xs.astype(np.float64), indexing="ij")
    semantic = np.full(grid.shape, IGNORE, dtype=np.int64)
    instance = np.zeros(grid.shape, dtype=np.int64)
    center = np.zeros(grid.shape, dtype=np.float32)
    offset = np.zeros((2,) + grid.shape, dtype=np.float32)
    k = 0
    for seg in segments:
        cid = seg["category_id"]
        if cid not in category_index:
            raise InputError(f"segment {seg['id']} has category_id {cid}, not in the category index")
        if seg.get("iscrowd", 0):
            continue
        cell = grid == seg["id"]
        semantic[cell] = category_index[cid]
        thing = isthing.get(cid, False) if isthing is not None else bool(seg.get("isthing", False))
        if not thing:
            continue
        rows, cols = np.nonzero(ids == seg["id"])
        if rows.size == 0:
            continue
        k += 1
        cy, cx = rows.mean(), cols.mean()
        instance[cell] = k
        offset[0][cell] = cy - gy[cell]
        offset[1][cell] = cx - gx[cell]
        np.maximum(center, np.exp(-((gy - cy) ** 2 + (gx - cx) ** 2) / (2 * sigma**2)).astype(np.float32), out=center)
    return {
        "semantic": torch.from_numpy(semantic),
        "thing_instance": torch.from_numpy(instance),
        "center": torch.from_numpy(center)[None],
        "offset": torch.from_numpy(offset),
        "offset_mask": torch.from_numpy((instance > 0).astype(np.float32))[None],
    }


# ---------------------------------------------------------------- dataset


class PanopticDataset(torch.utils.data.Dataset):
    """COCO panoptic images + targets. `images_dir`, `panoptic_dir` and the JSON are given separately, as in COCO.

    An item is a dict: image (float32 3xHxW in [0, 1]), pan_ids (int64 HxW), segments (list of
    segments_info dicts, each with "isthing" added), image_id, file_name, and — when `targets`
    is true — the dense_targets maps at `stride`. Use `collate` in a DataLoader.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        panoptic_dir: str | os.PathLike,
        annotations: str | os.PathLike,
        targets: bool = True,
        stride: int = 1,
        sigma: float = 8.0,
    ) -> None:
        self.images_dir, self.panoptic_dir = Path(images_dir), Path(panoptic_dir)
        self.annotations_path = Path(annotations)
        doc = load_annotations(self.annotations_path)
        self.categories: list[dict[str, Any]] = doc["categories"]
        self.category_index = category_index(self.categories)
        self.category_ids = category_ids(self.categories)
        self.isthing = {c["id"]: bool(c["isthing"]) for c in self.categories}
        by_image = {a["image_id"]: a for a in doc["annotations"]}
        self.entries = [(im, by_image[im["id"]]) for im in doc["images"]]
        self.targets, self.stride, self.sigma = targets, stride, sigma
        for im, ann in self.entries:
            for path in (self.images_dir / im["file_name"], self.panoptic_dir / ann["file_name"]):
                if not path.is_file():
                    raise DatasetError(f"{path} is listed in {self.annotations_path} but missing")

    @classmethod
    def from_split(cls, root: str | os.PathLike, split: str, **kwargs: Any) -> "PanopticDataset":
        """The synthetic layout: ROOT/SPLIT/{images, panoptic, annotations.json}."""
        base = Path(root) / split
        return cls(base / "images", base / "panoptic", base / "annotations.json", **kwargs)

    @classmethod
    def from_coco(cls, root: str | os.PathLike, split: str = "val2017", **kwargs: Any) -> "PanopticDataset":
        """COCO 2017 as unpacked: ROOT/SPLIT/*.jpg, ROOT/annotations/panoptic_SPLIT.json and panoptic_SPLIT/*.png."""
        root = Path(root)
        ann = root / "annotations"
        return cls(root / split, ann / f"panoptic_{split}", ann / f"panoptic_{split}.json", **kwargs)

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """(rgb uint8 HxWx3, ids uint32 HxW, segments) with the PNG checked against its segments_info."""
        im, ann = self.entries[index]
        image_path, pan_path = self.images_dir / im["file_name"], self.panoptic_dir / ann["file_name"]
        rgb, ids = load_rgb(image_path), load_ids(pan_path)
        if rgb.shape[:2] != ids.shape:
            raise DatasetError(f"{image_path} is {rgb.shape[1]}x{rgb.shape[0]} but {pan_path} is {ids.shape[1]}x{ids.shape[0]}")
        if ids.shape != (im["height"], im["width"]):
            raise DatasetError(f"{pan_path} is {ids.shape[1]}x{ids.shape[0]}, the JSON says {im['width']}x{im['height']}")
        present = set(np.unique(ids).tolist()) - {0}
        listed = {s["id"] for s in ann["segments_info"]}
        if present - listed:
            raise DatasetError(f"{pan_path} has segment ids {sorted(present - listed)[:5]} not in its segments_info")
        if listed - present:
            raise DatasetError(f"{pan_path} lacks segment ids {sorted(listed - present)[:5]} listed in its segments_info")
        segments = [
            {**s, "iscrowd": int(s.get("iscrowd", 0)), "isthing": self.isthing[s["category_id"]]} for s in ann["segments_info"]
        ]
        return rgb, ids, segments

    def __getitem__(self, index: int) -> dict[str, Any]:
        im, ann = self.entries[index]
        rgb, ids, segments = self.load(index)
        item: dict[str, Any] = {
            "image": torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0),
            "pan_ids": torch.from_numpy(ids.astype(np.int64)),
            "segments": segments,
            "image_id": im["id"],
            "file_name": im["file_name"],
        }
        if self.targets:
            item.update(dense_targets(ids, segments, self.category_index, self.stride, self.sigma, self.isthing))
        return item


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors of equal shape; keep everything else (segments, ids, names) as lists."""
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [b[key] for b in batch]
        if isinstance(values[0], torch.Tensor) and all(v.shape == values[0].shape for v in values):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out
