"""Pathfinder generator: determinism, geometry of the task, rendering, folder round-trip, CLI."""
import json
import math
from collections import deque

import numpy as np
import pytest
import torch

from crbp_deploy.data import pathfinder as pf
from crbp_deploy.data.pathfinder import (
    PathfinderConfig,
    PathfinderDataset,
    PathfinderFolder,
    generate,
    render,
    sample_scene,
    write_dataset,
)
from crbp_deploy.errors import ConfigError, InputError

LENGTHS = (9, 14, 20, 25)


def components(mask: np.ndarray) -> int:
    """8-connected components (a plain BFS; no scipy in the project)."""
    seen = np.zeros(mask.shape, bool)
    h, w = mask.shape
    count = 0
    for i, j in zip(*np.nonzero(mask)):
        if seen[i, j]:
            continue
        count += 1
        seen[i, j] = True
        todo = deque([(i, j)])
        while todo:
            a, b = todo.popleft()
            for x in range(max(a - 1, 0), min(a + 2, h)):
                for y in range(max(b - 1, 0), min(b + 2, w)):
                    if mask[x, y] and not seen[x, y]:
                        seen[x, y] = True
                        todo.append((x, y))
    return count


def dilate(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1)
    h, w = mask.shape
    return np.logical_or.reduce([p[1 + a : 1 + a + h, 1 + b : 1 + b + w] for a in (-1, 0, 1) for b in (-1, 0, 1)])


def seg_dist(p, q, r, s) -> float:
    """Exact distance between 2-D segments pq and rs (written independently of the module)."""

    def point(x, a, b):
        ab = b - a
        t = 0.0 if not ab.any() else min(1.0, max(0.0, float((x - a) @ ab) / float(ab @ ab)))
        return float(np.linalg.norm(x - (a + t * ab)))

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    if cross(p, q, r) * cross(p, q, s) < 0 and cross(r, s, p) * cross(r, s, q) < 0:
        return 0.0
    return min(point(p, r, s), point(q, r, s), point(r, p, q), point(s, p, q))


def paddles(cfg: PathfinderConfig, nodes: np.ndarray):
    g = cfg.geometry()
    cut = (g["gap"] + g["thickness"]) / 2
    out = []
    for a, b in zip(nodes[:-1], nodes[1:]):
        u = (b - a) / np.linalg.norm(b - a)
        out.append((a + cut * u, b - cut * u))
    return out


# ---------------------------------------------------------------- determinism and basic properties


def test_same_seed_same_bytes_other_seed_or_index_differs():
    cfg = PathfinderConfig(length=14)
    a_img, a_mask = generate(cfg, 3, seed=7)
    b_img, b_mask = generate(cfg, 3, seed=7)
    assert a_img.tobytes() == b_img.tobytes() and a_mask.tobytes() == b_mask.tobytes()
    assert generate(cfg, 3, seed=8)[0].tobytes() != a_img.tobytes()
    assert generate(cfg, 4, seed=7)[0].tobytes() != a_img.tobytes()
    # the order of generation does not matter (each sample has its own generator)
    later = [generate(cfg, i, seed=7)[0] for i in (5, 4, 3)]
    assert later[2].tobytes() == a_img.tobytes()


@pytest.mark.parametrize("length", LENGTHS)
def test_image_and_mask_contract(length):
    cfg = PathfinderConfig(length=length)
    for i in range(4):
        image, mask = generate(cfg, i, seed=0)
        assert image.shape == mask.shape == (64, 64)
        assert image.dtype == np.float32 and mask.dtype == bool
        assert image.min() >= 0.0 and image.max() <= 1.0 and image.max() == 1.0
        assert np.allclose(image * 255, np.round(image * 255), atol=1e-4), "quantised to 1/255 (exact PNG round-trip)"
        assert mask.sum() > 0
        assert (image[mask] >= 0.5).all(), "mask pixels are drawn pixels"
        # every paddle of the target is its own dash; the discs sit on the end paddles
        assert components(mask) == length
        # the gaps are small: two dilations join the whole contour
        assert components(dilate(dilate(mask))) == 1


def test_without_distractors_the_mask_is_exactly_the_ink():
    cfg = PathfinderConfig(length=14, distractors=0)
    image, mask = generate(cfg, 0, seed=1)
    assert np.array_equal(image >= 0.5, mask)


@pytest.mark.parametrize("length", LENGTHS)
def test_distractors_present(length):
    cfg = PathfinderConfig(length=length)
    assert cfg.distractor_count >= 1
    for i in range(3):
        scene = sample_scene(cfg, i, seed=0)
        image, mask = render(cfg, scene)
        outside = (image >= 0.5) & ~mask
        # every distractor is drawn like the target without its discs
        _, bare = render(cfg, pf.Scene(scene.snakes, scene.markers[:0]))
        assert 0.8 < outside.sum() / (cfg.distractor_count * bare.sum()) < 1.25
        assert components(outside) >= cfg.distractor_count * length * 0.9


def test_longer_contours_give_larger_masks():
    areas = [np.mean([generate(PathfinderConfig(length=n), i, seed=0)[1].sum() for i in range(6)]) for n in LENGTHS]
    assert all(a < b for a, b in zip(areas, areas[1:])), areas


def test_one_marker_variant_marks_one_end_of_the_same_scene():
    two, one = PathfinderConfig(length=14, markers=2), PathfinderConfig(length=14, markers=1)
    img2, mask2 = generate(two, 5, seed=3)
    img1, mask1 = generate(one, 5, seed=3)
    assert (mask1 <= mask2).all() and mask1.sum() < mask2.sum()
    assert (img1 <= img2).all() and img1.sum() < img2.sum()
    assert sample_scene(one, 5, 3).markers.shape == (1, 2)


# ---------------------------------------------------------------- the task's geometry


@pytest.mark.parametrize("length, size", [(9, 64), (14, 64), (25, 64), (20, 128)])
def test_scene_geometry(length, size):
    cfg = PathfinderConfig(length=length, size=size)
    g = cfg.geometry()
    near = 0
    for i in range(3):
        scene = sample_scene(cfg, i, seed=11)
        assert len(scene.snakes) == cfg.distractor_count + 1
        np.testing.assert_array_equal(scene.markers, scene.snakes[0][[0, -1]])
        caps = []  # (snake, place, a, b, half-width)
        for s, nodes in enumerate(scene.snakes):
            assert nodes.shape == (length + 1, 2)
            assert (nodes >= cfg.margin - 1e-9).all() and (nodes <= size - cfg.margin + 1e-9).all()
            steps = np.diff(nodes, axis=0)
            np.testing.assert_allclose(np.linalg.norm(steps, axis=1), g["step"], rtol=1e-9)
            heading = np.arctan2(steps[:, 1], steps[:, 0])
            turn = np.degrees(np.abs(np.angle(np.exp(1j * np.diff(heading)))))
            assert turn.max() <= cfg.max_turn_deg + 1e-6
            caps += [(s, k, a, b, g["thickness"] / 2) for k, (a, b) in enumerate(paddles(cfg, nodes))]
        # discs: place -1 sits on paddles 0 and 1, place `length` on the last two
        caps += [(0, k, m, m, g["marker_radius"]) for k, m in zip((-1, length), scene.markers)]
        # no two snakes come closer than `clearance`, nor a snake to itself past its neighbours
        # (sampling tests the paddle at points 0.5 px apart: within 0.5**2 / (8 * 1.5) px of exact)
        closest = math.inf
        for x, (s1, k1, a1, b1, h1) in enumerate(caps):
            for s2, k2, a2, b2, h2 in caps[x + 1 :]:
                disc = k1 in (-1, length) or k2 in (-1, length)
                if s1 == s2 and abs(k1 - k2) <= (2 if disc else 1):
                    continue
                gap = seg_dist(a1, b1, a2, b2) - h1 - h2
                assert gap >= g["clearance"] - 0.03, (s1, k1, s2, k2, gap)
                if s1 != s2 and 0 in (s1, s2):
                    closest = min(closest, gap)
        near += closest <= g["clearance"] + g["step"]
    # distractors do come close to the target (within a step of the minimum), not just somewhere
    assert near >= 2


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"length": 2}, "length must be >= 3"),
        ({"length": 25, "size": 32}, "too small for a contour of 25"),
        ({"length": 9, "size": 32}, "too small for a 9-paddle contour and a distractor"),
        ({"length": 14, "distractors": 9}, "at most 3 do"),
        ({"markers": 3}, "markers must be 1 or 2"),
        ({"max_turn_deg": 0}, "max_turn_deg"),
        ({"thickness": 0}, "thickness must be > 0"),
        ({"paddle_length": 1.0, "thickness": 2.0}, "paddle_length"),
        ({"distractors": -2}, "distractors"),
        ({"colour": 1}, "unknown key"),
    ],
)
def test_bad_configs_are_rejected(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PathfinderConfig.from_dict(kwargs)


def test_auto_distractors_keep_clutter_alike():
    counts = {(n, s): PathfinderConfig(length=n, size=s).distractor_count for n in LENGTHS for s in (64, 128)}
    assert counts[(9, 64)] > counts[(14, 64)] >= counts[(20, 64)] >= counts[(25, 64)] == 1
    assert all(counts[(n, 128)] > counts[(n, 64)] for n in LENGTHS)
    assert PathfinderConfig(length=14, distractors=0).distractor_count == 0


def test_scale_draws_the_same_task_finer():
    small, big = PathfinderConfig(length=14, size=64), PathfinderConfig(length=14, size=128, scale=2.0)
    assert big.distractor_count == small.distractor_count
    ratio = generate(big, 0, 0)[1].sum() / generate(small, 0, 0)[1].sum()
    assert 3.0 < ratio < 5.0  # twice the side: about four times the pixels


# ---------------------------------------------------------------- datasets and files


def test_on_the_fly_dataset_matches_generate_and_batches():
    cfg = PathfinderConfig(length=9)
    ds = PathfinderDataset(cfg, count=6, seed=2)
    image, mask = ds[4]
    ref_image, ref_mask = generate(cfg, 4, 2)
    assert image.shape == (1, 64, 64) and image.dtype == torch.float32
    assert mask.shape == (64, 64) and mask.dtype == torch.int64
    assert torch.equal(image[0], torch.from_numpy(ref_image)) and torch.equal(mask.bool(), torch.from_numpy(ref_mask))
    images, masks = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert images.shape == (3, 1, 64, 64) and masks.shape == (3, 64, 64)
    with pytest.raises(IndexError):
        ds[6]
    with pytest.raises(InputError):
        PathfinderDataset(cfg, count=0)


def test_write_and_read_back_equal_to_the_generator(tmp_path):
    cfg = PathfinderConfig(length=14)
    index_path = write_dataset(tmp_path / "pf", cfg, count=5, seed=9, progress=False)
    index = json.loads(index_path.read_text())
    assert index["format"] == "crbp-pathfinder" and index["seed"] == 9 and index["count"] == 5
    assert PathfinderConfig.from_dict(index["config"]) == cfg
    assert index["geometry_px"]["distractors"] == cfg.distractor_count
    folder = PathfinderFolder(tmp_path / "pf")
    assert len(folder) == 5 and folder.config == cfg and folder.seed == 9
    for i in range(5):
        image, mask = folder.load(i)
        ref_image, ref_mask = generate(cfg, i, 9)
        assert image.dtype == np.float32 and np.array_equal(image, ref_image) and np.array_equal(mask, ref_mask)
    live = PathfinderDataset(cfg, 5, seed=9)
    for (a, b), (c, d) in zip(folder, live):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert not list((tmp_path / "pf").rglob("*.tmp"))


def test_existing_dataset_needs_overwrite(tmp_path):
    cfg = PathfinderConfig(length=9)
    write_dataset(tmp_path, cfg, count=2, progress=False)
    with pytest.raises(InputError, match="--overwrite"):
        write_dataset(tmp_path, cfg, count=2, progress=False)
    write_dataset(tmp_path, cfg, count=3, seed=1, progress=False, overwrite=True)
    assert len(PathfinderFolder(tmp_path)) == 3 and PathfinderFolder(tmp_path).seed == 1


def test_a_crash_leaves_no_index_over_missing_or_stale_files(tmp_path, monkeypatch):
    cfg = PathfinderConfig(length=9)
    write_dataset(tmp_path, cfg, count=2, progress=False)
    real = pf._save_png
    calls = []

    def failing(array, path):
        calls.append(path)
        if len(calls) == 5:
            raise OSError("disk full")
        real(array, path)

    monkeypatch.setattr(pf, "_save_png", failing)
    with pytest.raises(OSError):
        write_dataset(tmp_path, cfg, count=4, seed=5, progress=False, overwrite=True)
    assert not (tmp_path / "index.json").exists(), "the old index must not describe the new, half-written files"
    with pytest.raises(InputError, match="no index.json"):
        PathfinderFolder(tmp_path)


def test_folder_errors(tmp_path):
    with pytest.raises(InputError, match="no index.json"):
        PathfinderFolder(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(InputError, match="JSON"):
        PathfinderFolder(tmp_path)
    write_dataset(tmp_path / "ok", PathfinderConfig(length=9), count=2, progress=False, overwrite=True)
    (tmp_path / "ok" / "masks" / "000001.png").unlink()
    with pytest.raises(InputError, match="missing"):
        PathfinderFolder(tmp_path / "ok")


def test_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot write"):
        write_dataset(blocker / "sub", PathfinderConfig(length=9), count=1, progress=False)


def test_parallel_writing_gives_identical_files(tmp_path):
    cfg = PathfinderConfig(length=9)
    write_dataset(tmp_path / "one", cfg, count=6, seed=4, progress=False)
    write_dataset(tmp_path / "two", cfg, count=6, seed=4, progress=False, workers=2)
    for sub in ("images", "masks"):
        for f in sorted((tmp_path / "one" / sub).iterdir()):
            assert f.read_bytes() == (tmp_path / "two" / sub / f.name).read_bytes()
    assert (tmp_path / "one" / "index.json").read_text() == (tmp_path / "two" / "index.json").read_text()


# ---------------------------------------------------------------- CLI


def test_cli_writes_a_dataset_the_folder_loader_reads(tmp_path, run_cli):
    out = tmp_path / "pf14"
    code, stdout, stderr = run_cli(
        "data", "pathfinder", "--length", "14", "--size", "64", "--count", "4",
        "--out", str(out), "--seed", "3", "--distractors", "2", "--no-progress",
    )
    assert code == 0, stderr
    assert "wrote 4 images" in stdout
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(4)]
    folder = PathfinderFolder(out)
    assert folder.config == PathfinderConfig(length=14, size=64, distractors=2) and folder.seed == 3
    for i in range(4):
        image, mask = folder.load(i)
        ref_image, ref_mask = generate(folder.config, i, 3)
        assert np.array_equal(image, ref_image) and np.array_equal(mask, ref_mask)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--length", "2"], "length must be >= 3"),
        (["--length", "25", "--size", "32"], "too small"),
        (["--count", "0"], "--count must be >= 1"),
        (["--distractors", "40"], "do not fit"),
        (["--out", "{blocked}/sub"], "cannot write"),
    ],
)
def test_cli_rejects_bad_options_in_one_line(tmp_path, run_cli, one_error_line, args, match):
    (tmp_path / "blocked").write_text("a file, not a folder")
    base = {"--count": "2", "--out": str(tmp_path / "out")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value.format(blocked=tmp_path / "blocked")
    argv = ["data", "pathfinder", "--no-progress"] + [x for kv in base.items() for x in kv]
    code, _, stderr = run_cli(*argv)
    one_error_line(code, stderr, match)
