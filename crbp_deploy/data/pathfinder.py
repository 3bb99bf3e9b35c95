"""Pathfinder segmentation data: seeded, deterministic, generated on the fly or written to a folder.

The task (Linsley et al. 2018; the segmentation form used by C-RBP, Linsley et al. 2020), as built here:

- A *snake* is a chain of `length` short line segments ("paddles") laid along a random polyline of
  nodes p_0..p_length, one `step` = paddle_length + gap apart. Each paddle is the middle part of one
  polyline edge, so consecutive paddles are separated by a visible `gap` centred on a node, and the
  heading turns by at most `max_turn_deg` at each node (the continuity constraint).
- An image holds 1 + `distractors` snakes of the same length and kind. One of them, drawn at random
  after all are placed, is the *target*: its end node(s) carry filled discs (markers). `markers=2`
  marks both ends ("segment the contour joining the two dots"); `markers=1` marks p_0 only
  ("segment the contour that starts at the dot"). Every snake end keeps room for a disc, so
  nothing but the discs tells the target from the distractors.
- Snakes never touch: the edge-to-edge distance between elements of different snakes, and between
  non-adjacent paddles of one snake, is at least `clearance`, by default the within-contour `gap`.
  So nearness cannot tell which dash continues the target; only good continuation can, and the
  answer needs grouping along the whole contour.
- The image is white-on-black anti-aliased drawing, grayscale float32 in [0, 1], quantised to 1/255
  so a PNG round-trip is exact. The mask is the target: pixels that the target's own drawing
  (paddles and markers) covers at least half. Mask pixels are therefore always drawn pixels.
- Geometry is in pixels (times `scale`) and does not follow `size`: as in the original, where a
  longer contour covers more of a fixed canvas, a paddle stays a paddle to a model's fixed kernels,
  and a larger image gives long contours room. PF9/PF14 fit 64x64 well; PF20/PF25 fit 64x64 with
  one distractor and 128x128 (about the original 150x150) with several. `scale=2` at size 128
  draws the 64x64 picture at twice the resolution. validate() rejects sizes that are too small.

Every sample depends only on (config, seed, index) through its own NumPy generator, so datasets can
be generated lazily, in any order, or in parallel, and always give identical bytes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch.utils.data import Dataset

from ..config import StrictConfig
from ..errors import ConfigError, CrbpError, InputError

INDEX_NAME = "index.json"
FORMAT = "crbp-pathfinder"
FORMAT_VERSION = 1
_START_TRIES = 16  # start points drawn for each snake; the freest is used
_SAMPLE = 0.5  # px between the points that stand for a candidate paddle in collision tests
_ARM_ROUNDS = 6  # turns the two ends of a snake take growing, before it is given up
_TURN_TRIES = 16  # candidate headings tried (in one batch) for each paddle
_GROW_BUDGET = 3  # growth steps per paddle (backing up included) before an end gives up
_SNAKE_TRIES = 30  # fresh starts for one snake before the whole image starts over
_SCENE_TRIES = 25  # fresh images before giving up with an error
_MAX_ARC = 2.0  # longest contour (arc length) that validate() accepts, in sides of the free square
_CLUTTER = 0.25  # auto distractors: paddles per step x step square of free area, all snakes together
_MAX_CLUTTER = 0.35  # most that validate() accepts (sampling slows sharply past it, measured)


@dataclass(frozen=True)
class PathfinderConfig(StrictConfig):
    """One Pathfinder task. Geometry is in pixels, times `scale`."""

    length: int = 14  # paddles per snake (the paper's PF9/14/20/25)
    size: int = 64  # image side in pixels
    distractors: int = -1  # unmarked snakes besides the target; -1: auto (see `distractor_count`)
    markers: int = 2  # discs at the target's ends: 2 (both ends) or 1 (the first end only)
    max_turn_deg: float = 30.0  # largest heading change between consecutive paddles
    paddle_length: float = 3.0  # visible paddle length, round caps included
    gap: float = 1.5  # visible gap between consecutive paddles of a snake
    thickness: float = 1.0  # paddle width
    marker_radius: float = 2.0
    clearance: float = 1.5  # least edge-to-edge distance between different snakes
    scale: float = 1.0  # multiplies all of the geometry above (2 at size 128 = the 64 picture, finer)

    def validate(self) -> None:
        if self.length < 3:
            raise ConfigError(f"PathfinderConfig.length must be >= 3 paddles, got {self.length}")
        if self.size < 16:
            raise ConfigError(f"PathfinderConfig.size must be >= 16 pixels, got {self.size}")
        if self.distractors < -1:
            raise ConfigError(f"PathfinderConfig.distractors must be >= 0 (or -1 for auto), got {self.distractors}")
        if self.markers not in (1, 2):
            raise ConfigError(f"PathfinderConfig.markers must be 1 or 2, got {self.markers}")
        if not 0 < self.max_turn_deg <= 90:
            raise ConfigError(f"PathfinderConfig.max_turn_deg must be in (0, 90], got {self.max_turn_deg}")
        for name in ("paddle_length", "gap", "thickness", "marker_radius", "clearance", "scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"PathfinderConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.paddle_length < self.thickness:
            raise ConfigError(
                f"PathfinderConfig.paddle_length ({self.paddle_length}) must be >= thickness ({self.thickness})"
            )
        # Limits measured with this sampler: a contour longer than about twice the side of the free
        # square, or snakes covering more than _MAX_CLUTTER of it, make sampling slow or failing.
        wanted = max(1, self.distractors)
        hint = f"use size >= {self._min_size(wanted)}, a shorter length or a smaller scale"
        arc = self.length * self.step
        if arc > _MAX_ARC * (self.size - 2 * self.margin):
            raise ConfigError(
                f"size {self.size} is too small for a contour of {self.length} paddles ({arc:.0f} px of arc); {hint}"
            )
        fit = math.floor(_MAX_CLUTTER * self._cells() / self.length) - 1
        if self.distractor_count > fit:
            if self.distractors == -1 or fit < 1:
                raise ConfigError(
                    f"size {self.size} is too small for a {self.length}-paddle contour and a distractor; {hint}"
                )
            raise ConfigError(
                f"{self.distractors} distractors of {self.length} paddles do not fit a {self.size}x{self.size} "
                f"image: at most {fit} do; or {hint}"
            )

    def _cells(self) -> float:
        """The free square, in units of step x step."""
        return ((self.size - 2 * self.margin) / self.step) ** 2

    def _min_size(self, distractors: int) -> int:
        """The smallest size that passes both limits in validate()."""
        by_arc = self.length * self.step / _MAX_ARC
        by_clutter = self.step * math.sqrt((distractors + 1) * self.length / _MAX_CLUTTER)
        usable = max(by_arc, by_clutter)
        return math.ceil(usable + 2 * self.margin)

    @property
    def step(self) -> float:
        """Node spacing in pixels: one paddle plus one gap."""
        return (self.paddle_length + self.gap) * self.scale

    @property
    def margin(self) -> float:
        """Nodes stay this far inside the image border, so nothing is clipped."""
        return (max(self.marker_radius, self.thickness / 2) + 1.0) * self.scale

    @property
    def distractor_count(self) -> int:
        """`distractors`, or for -1 enough that all snakes together have about _CLUTTER paddles per
        step x step square of the free area (clutter alike across lengths and sizes), at least 1."""
        if self.distractors >= 0:
            return self.distractors
        return max(1, round(_CLUTTER * self._cells() / self.length) - 1)

    def geometry(self) -> dict[str, float]:
        """What is drawn, in pixels."""
        s = self.scale
        return {
            "distractors": self.distractor_count,
            "step": self.step,
            "paddle_length": self.paddle_length * s,
            "gap": self.gap * s,
            "thickness": self.thickness * s,
            "marker_radius": self.marker_radius * s,
            "clearance": self.clearance * s,
            "margin": self.margin,
        }


@dataclass(frozen=True)
class Scene:
    """What one image shows: `snakes[0]` is the target; each snake is its (length+1, 2) nodes (x, y)."""

    snakes: tuple[np.ndarray, ...]
    markers: np.ndarray  # (markers, 2) centres of the target's discs


# ---------------------------------------------------------------- geometry
#
# Points are complex numbers x + iy (pixel (row r, col c) covers [c, c+1) x [r, r+1)). Every drawn
# element is a capsule: a segment a -> a + d with half-width hw (a marker disc has d = 0).


def _pt_seg(z, a, d, dd):
    """Distance from points z to segments a -> a + d (dd = |d|^2), complex, broadcasting."""
    t = np.clip(((z - a) * d.conj()).real / np.where(dd > 0, dd, 1.0), 0.0, 1.0)
    return np.abs(z - a - t * d)


class _Canvas:
    """The capsules placed so far, with their snake (owner) and place along it (seq)."""

    _FIELDS = ("a", "d", "dd", "hw", "centre", "reach", "owner", "seq")

    def __init__(self, capacity: int):
        self.a = np.zeros(capacity, complex)
        self.d = np.zeros(capacity, complex)
        self.dd = np.zeros(capacity)
        self.hw = np.zeros(capacity)
        self.centre = np.zeros(capacity, complex)
        self.reach = np.zeros(capacity)  # centre to the farthest point of the capsule
        self.owner = np.full(capacity, -1)
        self.seq = np.zeros(capacity, dtype=np.int64)
        self.n = 0

    def add(self, a: complex, d: complex, hw: float, owner: int, seq: int) -> None:
        i = self.n
        self.a[i], self.d[i], self.dd[i], self.hw[i] = a, d, abs(d) ** 2, hw
        self.centre[i], self.reach[i] = a + d / 2, abs(d) / 2 + hw
        self.owner[i], self.seq[i] = owner, seq
        self.n += 1

    def remove(self, owner: int, lo: int | None = None, hi: int | None = None) -> None:
        """Drop this owner's elements with lo <= seq <= hi (all of them without lo and hi)."""
        n = self.n
        drop = self.owner[:n] == owner
        if lo is not None:
            drop &= (self.seq[:n] >= lo) & (self.seq[:n] <= hi)
        keep = ~drop
        m = int(keep.sum())
        for name in self._FIELDS:
            arr = getattr(self, name)
            arr[:m] = arr[:n][keep]
        self.n = m

    def clear(self, points, around: complex, radius: float, hw: float, clearance: float, owner: int, lo: int, hi: int):
        """Candidates given as points along their centre lines (K, S), all within `radius` of
        `around`: does each keep `clearance` from every element, except this owner's elements
        with lo <= seq <= hi (its neighbours)? Points `_SAMPLE` px apart make this exact to
        within _SAMPLE**2 / (8 * clearance) px."""
        n = self.n
        near = np.abs(self.centre[:n] - around) < radius + hw + clearance + self.reach[:n]
        near &= ~((self.owner[:n] == owner) & (self.seq[:n] >= lo) & (self.seq[:n] <= hi))
        if not near.any():
            return np.ones(len(points), dtype=bool)
        dist = _pt_seg(points[:, :, None], self.a[:n][near], self.d[:n][near], self.dd[:n][near])  # (K, S, m)
        return ~(dist < hw + self.hw[:n][near] + clearance).any(axis=(1, 2))


@dataclass
class _Arm:
    """One end of a snake growing out of its first node: nodes after it, headings, place numbers."""

    seq0: int  # place number (seq) of this arm's first paddle
    dseq: int  # +1 for the forward arm, -1 for the backward arm
    nodes: list = field(default_factory=list)
    headings: list = field(default_factory=list)

    def seq(self, k: int) -> int:
        return self.seq0 + self.dseq * k


class _Sampler:
    """Random snakes for one image, drawn from one generator."""

    def __init__(self, rng: np.random.Generator, cfg: PathfinderConfig):
        g = cfg.geometry()
        self.rng, self.cfg = rng, cfg
        self.step, self.hw, self.clr, self.rad = g["step"], g["thickness"] / 2, g["clearance"], g["marker_radius"]
        self.lo, self.hi = cfg.margin, cfg.size - cfg.margin
        self.max_turn = math.radians(cfg.max_turn_deg)
        # a paddle's centre line runs from `cut` after its first node to `cut` before the next one;
        # collision tests stand it in by points along it
        cut = (g["gap"] + g["thickness"]) / 2
        seg = g["paddle_length"] - g["thickness"]
        self.along = cut + np.linspace(0.0, seg, max(2, math.ceil(seg / _SAMPLE) + 1))
        self.canvas = _Canvas((cfg.distractor_count + 1) * (cfg.length + 2))

    def free_point(self) -> complex:
        """The best of a few uniform draws: the one farthest from everything placed so far."""
        xy = self.rng.uniform(self.lo, self.hi, size=(_START_TRIES, 2))
        z = xy[:, 0] + 1j * xy[:, 1]
        c, n = self.canvas, self.canvas.n
        if n == 0:
            return complex(z[0])
        room = (_pt_seg(z[:, None], c.a[:n], c.d[:n], c.dd[:n]) - c.hw[:n]).min(axis=1)
        return complex(z[int(np.argmax(room))])

    def back_up(self, owner: int, arm: _Arm, count: int) -> None:
        """Remove the last `count` paddles of an arm."""
        k = len(arm.nodes)
        s0, s1 = sorted((arm.seq(k - count), arm.seq(k - 1)))
        self.canvas.remove(owner, s0, s1)
        del arm.nodes[k - count :], arm.headings[k - count :]

    def grow(self, owner: int, origin: complex, arm: _Arm, other: _Arm, count: int) -> None:
        """Add up to `count` paddles to `arm`, backing up 1-3 paddles when stuck, until done,
        stuck at the origin, or out of budget."""
        c, rng = self.canvas, self.rng
        goal = len(arm.nodes) + count
        for _ in range(_GROW_BUDGET * count):
            k = len(arm.nodes)
            if k == goal:
                return
            if k:  # continue within max_turn; the first paddle continues the other arm through the origin
                cand = arm.headings[-1] + rng.uniform(-self.max_turn, self.max_turn, _TURN_TRIES)
            elif other.headings:
                cand = other.headings[0] + math.pi + rng.uniform(-self.max_turn, self.max_turn, _TURN_TRIES)
            else:
                cand = rng.uniform(0, 2 * math.pi, _TURN_TRIES)
            p = arm.nodes[-1] if k else origin
            u = np.exp(1j * cand)
            q = p + self.step * u
            ok = (q.real >= self.lo) & (q.real <= self.hi) & (q.imag >= self.lo) & (q.imag <= self.hi)
            if ok.any():
                s = arm.seq(k)
                points = p + u[ok, None] * self.along
                ok[ok] = c.clear(points, p, self.along[-1], self.hw, self.clr, owner, s - 1, s + 1)
            if ok.any():
                j = int(np.argmax(ok))
                a, b = p + self.along[0] * u[j], p + self.along[-1] * u[j]
                c.add(a, b - a, self.hw, owner, arm.seq(k))
                arm.nodes.append(complex(q[j]))
                arm.headings.append(float(cand[j]))
            elif k == 0:
                return
            else:
                self.back_up(owner, arm, min(k, int(rng.integers(1, 4))))

    def end_fits(self, owner: int, arm: _Arm, origin: complex) -> bool:
        """Is there room for a marker disc at this arm's end (touching only its own end paddles)?"""
        k = len(arm.nodes)
        end = arm.nodes[-1] if k else origin
        s0, s1 = sorted((arm.seq(k - 1), arm.seq(k - 2)))
        return bool(self.canvas.clear(np.full((1, 1), end), end, 0.0, self.rad, self.clr, owner, s0, s1)[0])

    def snake(self, owner: int) -> np.ndarray | None:
        """One snake grown out of a free node at both ends in turn (an end that gets stuck leaves
        the rest to the other), with room for a marker disc at each end, so that any snake can be
        the marked one: its (length + 1,) complex nodes, or None with the canvas unchanged."""
        cfg, c = self.cfg, self.canvas
        origin = self.free_point()
        fwd, bwd = _Arm(seq0=0, dseq=1), _Arm(seq0=-1, dseq=-1)
        arms = ((fwd, bwd), (bwd, fwd))
        for r in range(_ARM_ROUNDS):
            arm, other = arms[r % 2]
            missing = cfg.length - len(fwd.nodes) - len(bwd.nodes)
            self.grow(owner, origin, arm, other, missing - (cfg.length // 2 if r == 0 else 0))
            if len(fwd.nodes) + len(bwd.nodes) < cfg.length:
                continue
            cramped = [a for a, _ in arms if not self.end_fits(owner, a, origin)]
            if not cramped:
                nodes = bwd.nodes[::-1] + [origin] + fwd.nodes
                c.add(nodes[0], 0j, self.rad, owner, bwd.seq(len(bwd.nodes)))
                c.add(nodes[-1], 0j, self.rad, owner, fwd.seq(len(fwd.nodes)))
                return np.array(nodes)
            for a in cramped:  # pull back the end(s) that have no room and grow again
                self.back_up(owner, a, min(len(a.nodes), int(self.rng.integers(1, 4))))
        c.remove(owner)
        return None


def sample_scene(config: PathfinderConfig, index: int, seed: int) -> Scene:
    """The snakes of image `index` of the dataset `seed`, the target first (see the module doc)."""
    if index < 0 or seed < 0:
        raise InputError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    count = config.distractor_count + 1
    for _ in range(_SCENE_TRIES):
        sampler = _Sampler(rng, config)
        snakes = []
        for owner in range(count):
            for _ in range(_SNAKE_TRIES):
                nodes = sampler.snake(owner)
                if nodes is not None:
                    snakes.append(np.stack([nodes.real, nodes.imag], axis=1))
                    break
            else:
                break  # this image is too crowded: start it again
        if len(snakes) == count:
            # the target is drawn at random after all are placed, so placing order tells nothing
            t = int(rng.integers(count))
            snakes = [snakes[t]] + snakes[:t] + snakes[t + 1 :]
            markers = snakes[0][[0, -1]] if config.markers == 2 else snakes[0][:1]
            return Scene(tuple(snakes), markers.copy())
    raise CrbpError(
        f"could not place {config.distractor_count} distractors beside a {config.length}-paddle contour in a "
        f"{config.size}x{config.size} image (seed {seed}, index {index}); use fewer distractors or a larger size"
    )


# ---------------------------------------------------------------- rendering


def _capsules(config: PathfinderConfig, scene: Scene):
    """All drawn capsules as complex (a, d) and half-widths, and which belong to the target."""
    g = config.geometry()
    cut = (g["gap"] + g["thickness"]) / 2
    a, d, hw, target = [], [], [], []
    for i, xy in enumerate(scene.snakes):
        nodes = xy[:, 0] + 1j * xy[:, 1]
        u = np.diff(nodes) / np.abs(np.diff(nodes))
        a.append(nodes[:-1] + cut * u), d.append((g["step"] - 2 * cut) * u)
        hw.append(np.full(len(u), g["thickness"] / 2)), target.append(np.full(len(u), i == 0))
    m = scene.markers[:, 0] + 1j * scene.markers[:, 1]
    a.append(m), d.append(np.zeros(len(m), complex))
    hw.append(np.full(len(m), g["marker_radius"])), target.append(np.ones(len(m), bool))
    return np.concatenate(a), np.concatenate(d), np.concatenate(hw), np.concatenate(target)


def render(config: PathfinderConfig, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased drawing of a scene: (image float32 HxW in [0, 1], target mask bool HxW)."""
    n = config.size
    a, d, hw, is_target = _capsules(config, scene)
    # every capsule fits in one fixed-size window around its centre: evaluate all windows at once
    w = int(math.ceil(2 * np.max(np.abs(d) / 2 + hw) + 2)) + 1
    centre = a + d / 2
    x0 = np.floor(centre.real - w / 2).astype(np.int64)[:, None, None]
    y0 = np.floor(centre.imag - w / 2).astype(np.int64)[:, None, None]
    xs, ys = x0 + np.arange(w)[None, None, :], y0 + np.arange(w)[None, :, None]  # (E, 1, w), (E, w, 1)
    dist = _pt_seg((xs + 0.5) + 1j * (ys + 0.5), a[:, None, None], d[:, None, None], np.abs(d[:, None, None]) ** 2)
    cover = np.clip(hw[:, None, None] + 0.5 - dist, 0.0, 1.0)  # (E, w, w) approximate pixel coverage
    inside = (xs >= 0) & (xs < n) & (ys >= 0) & (ys < n)
    flat = np.where(inside, ys * n + xs, 0)
    cover = np.where(inside, cover, 0.0)
    image = np.zeros(n * n)
    np.maximum.at(image, flat.ravel(), cover.ravel())
    target = np.zeros(n * n)
    np.maximum.at(target, flat[is_target].ravel(), cover[is_target].ravel())
    image = (np.round(image * 255) / 255).astype(np.float32).reshape(n, n)
    return image, target.reshape(n, n) >= 0.5


def generate(config: PathfinderConfig, index: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Image `index` of dataset `seed`: (image float32 HxW in [0, 1], mask bool HxW of the target)."""
    return render(config, sample_scene(config, index, seed))


# ---------------------------------------------------------------- mixed lengths


def parse_lengths(text: str | int | Iterable[int]) -> list[int]:
    """Contour lengths from "14" or "6,9,14,20,25" (or ints): distinct, in the order given, each >= 3."""
    if isinstance(text, int):
        items: list = [text]
    elif isinstance(text, str):
        items = [t.strip() for t in text.split(",")]
    else:
        items = list(text)
    lengths: list[int] = []
    for item in items:
        try:
            value = int(item)
        except (TypeError, ValueError):
            raise ConfigError(f"length must be a whole number of paddles (e.g. 14 or 6,9,14), got {item!r}") from None
        if value < 3:
            raise ConfigError(f"length must be >= 3 paddles, got {value}")
        if value not in lengths:
            lengths.append(value)
    if not lengths:
        raise ConfigError("length list is empty")
    return lengths


def length_configs(config: PathfinderConfig, lengths: Iterable[int] | None) -> dict[int, PathfinderConfig]:
    """One validated config per contour length (the geometry of `config`, each its own length)."""
    lengths = parse_lengths(lengths if lengths is not None else [config.length])
    return {n: config if n == config.length else dataclasses.replace(config, length=n) for n in lengths}


def length_of(lengths: list[int], index: int) -> int:
    """The contour length of image `index` in a mixed set: lengths take turns, so every prefix of
    the set is balanced across them (counts differ by at most one)."""
    return lengths[index % len(lengths)]


# ---------------------------------------------------------------- datasets


def _to_tensors(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(image)[None], torch.from_numpy(mask.astype(np.int64))


class PathfinderDataset(Dataset):
    """`count` samples generated on the fly: (image float32 1xHxW, mask int64 HxW, 1 = target).
    With `lengths`, image i has contour length `length_of(lengths, i)` (a mixed-difficulty set)."""

    def __init__(self, config: PathfinderConfig, count: int, seed: int = 0, lengths: Iterable[int] | None = None):
        if count < 1:
            raise InputError(f"count must be >= 1, got {count}")
        if seed < 0:
            raise InputError(f"seed must be >= 0, got {seed}")
        self.config, self.count, self.seed = config, count, seed
        self.configs = length_configs(config, lengths)
        self.lengths = list(self.configs)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        return _to_tensors(*generate(self.configs[length_of(self.lengths, index)], index, self.seed))


class PathfinderFolder(Dataset):
    """A folder written by `write_dataset` (`crbp-deploy data pathfinder`); the same items as
    PathfinderDataset(config, count, seed) with the folder's config, count and seed."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        path = self.root / INDEX_NAME
        if not path.is_file():
            raise InputError(f"{self.root} has no {INDEX_NAME}: not a folder written by `crbp-deploy data pathfinder`")
        try:
            index = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{path} is not readable JSON: {exc}") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise InputError(f"{path} is not a Pathfinder index (format {FORMAT!r} expected)")
        if index.get("version") != FORMAT_VERSION:
            raise InputError(f"{path} has format version {index.get('version')}; this reader knows {FORMAT_VERSION}")
        self.config = PathfinderConfig.from_dict(index["config"])
        self.seed = int(index["seed"])
        self.files = [(self.root / f["image"], self.root / f["mask"]) for f in index["files"]]
        # contour length per image (older single-length indexes list none: all have config.length)
        self.lengths = [int(f.get("length", self.config.length)) for f in index["files"]]
        missing = [str(p) for pair in self.files for p in pair if not p.is_file()]
        if missing:
            raise InputError(f"{len(missing)} file(s) listed in {path} are missing, e.g. {missing[0]}")

    def __len__(self) -> int:
        return len(self.files)

    def config_of(self, index: int) -> PathfinderConfig:
        """The config image `index` was generated with (its own contour length)."""
        n = self.lengths[index]
        return self.config if n == self.config.length else dataclasses.replace(self.config, length=n)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample `index` as NumPy arrays, as `generate` gives them."""
        image_path, mask_path = self.files[index]
        with Image.open(image_path) as im:
            image = np.asarray(im.convert("L"), dtype=np.float32) / np.float32(255)
        with Image.open(mask_path) as im:
            mask = np.asarray(im.convert("L")) > 127
        return image, mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self.files):
            raise IndexError(index)
        return _to_tensors(*self.load(index))


def _save_png(array: np.ndarray, path: Path) -> None:
    """Write atomically: a crash leaves no half-written file under the final name."""
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array, mode="L").save(tmp, format="PNG")
    os.replace(tmp, path)


def _write_sample(job: tuple[Path, PathfinderConfig, int, int, str]) -> dict[str, str | int]:
    out, config, seed, index, name = job
    image, mask = generate(config, index, seed)
    _save_png(np.round(image * 255).astype(np.uint8), out / "images" / name)
    _save_png(mask.astype(np.uint8) * 255, out / "masks" / name)
    return {"image": f"images/{name}", "mask": f"masks/{name}", "length": config.length}


def _prepare_out(out: Path, overwrite: bool) -> None:
    try:
        for sub in ("images", "masks"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"cannot write to {out}: {exc.strerror or exc}") from None
    index = out / INDEX_NAME
    if index.exists():
        if not overwrite:
            raise InputError(f"{out} already holds a dataset ({INDEX_NAME}); pass --overwrite to replace it")
        index.unlink()  # first, so that a crash below never leaves the old index over new files


def write_dataset(
    out_dir: str | os.PathLike,
    config: PathfinderConfig,
    count: int,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    workers: int = 1,
    lengths: Iterable[int] | None = None,
) -> Path:
    """Write `count` samples as PNGs (images/*.png, masks/*.png with 255 = target), then index.json
    (format, config, seed, count, lengths, file list with each image's contour length). Each file
    and the index are written atomically and the index last, so it lists only files that exist.
    `workers` > 1 generates in that many processes (identical output). `lengths` (e.g. [6, 9, 14,
    20, 25]) mixes contour lengths, balanced: image i has `length_of(lengths, i)`, drawn with
    `config`'s geometry at that length (auto distractors keep the clutter alike). Every length is
    validated before anything is written. Returns the index path."""
    configs = length_configs(config, lengths)
    order = list(configs)
    if count < 1:
        raise InputError(f"count must be >= 1, got {count}")
    if seed < 0:
        raise InputError(f"seed must be >= 0, got {seed}")
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    out = Path(out_dir)
    _prepare_out(out, overwrite)
    digits = max(6, len(str(count - 1)))
    jobs = [(out, configs[length_of(order, i)], seed, i, f"{i:0{digits}d}.png") for i in range(count)]
    with contextlib.ExitStack() as stack:
        if workers == 1:
            results: Iterable = map(_write_sample, jobs)
        else:
            # spawn, not fork: the parent may hold torch's thread pools
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")))
            results = pool.map(_write_sample, jobs, chunksize=max(1, min(64, count // (4 * workers))))
        label = "PF" + "/".join(map(str, order))
        files = list(_progress(results, count, f"pathfinder {label} {config.size}px", progress))
    index = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "task": "segment the marked contour; mask 255 = the target snake (paddles and markers)",
        "config": configs[max(order)].to_dict(),  # the geometry; its length is the longest of `lengths`
        "geometry_px": configs[max(order)].geometry(),
        "lengths": order,
        "distractors_per_length": {str(n): c.distractor_count for n, c in configs.items()},
        "seed": seed,
        "count": count,
        "files": files,
    }
    path = out / INDEX_NAME
    tmp = path.with_name(INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, path)
    return path


def _progress(items: Iterable, total: int, label: str, enabled: bool) -> Iterator:
    if not enabled:
        yield from items
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as bar:
        task = bar.add_task(label, total=total)
        for item in items:
            yield item
            bar.advance(task)
