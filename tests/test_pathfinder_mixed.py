"""Mixed-length Pathfinder sets: balanced lengths, each image's length in index.json, the generator's bytes."""
import json
from collections import Counter

import numpy as np
import pytest
import torch

from crbp_deploy.data.pathfinder import (
    PathfinderConfig,
    PathfinderDataset,
    PathfinderFolder,
    generate,
    length_of,
    parse_lengths,
    write_dataset,
)
from crbp_deploy.errors import ConfigError


def test_parse_lengths():
    assert parse_lengths("14") == [14]
    assert parse_lengths(" 6, 9,14 ,9") == [6, 9, 14]
    assert parse_lengths([20, 25]) == [20, 25]
    for bad, match in (("6,2", "must be >= 3"), ("6,x", "whole number"), ("", "whole number")):
        with pytest.raises(ConfigError, match=match):
            parse_lengths(bad)


def test_mixed_set_is_balanced_records_lengths_and_matches_the_generator(tmp_path):
    cfg = PathfinderConfig(length=6, size=128)
    lengths = [6, 9, 14, 20, 25]
    index = json.loads(write_dataset(tmp_path, cfg, count=12, seed=3, progress=False, lengths=lengths).read_text())
    assert index["lengths"] == lengths
    per_file = [f["length"] for f in index["files"]]
    counts = Counter(per_file)
    assert set(counts) == set(lengths) and max(counts.values()) - min(counts.values()) <= 1
    folder = PathfinderFolder(tmp_path)
    assert folder.lengths == per_file == [length_of(lengths, i) for i in range(12)]
    live = PathfinderDataset(cfg, 12, seed=3, lengths=lengths)
    for i in (0, 4, 7):
        image, mask = folder.load(i)
        ref_image, ref_mask = generate(PathfinderConfig(length=per_file[i], size=128), i, 3)
        assert np.array_equal(image, ref_image) and np.array_equal(mask, ref_mask)
        assert folder.config_of(i).length == per_file[i]
        a, b = live[i]
        assert torch.equal(a[0], torch.from_numpy(ref_image)) and torch.equal(b.bool(), torch.from_numpy(ref_mask))
    # longer contours draw larger targets, on average
    area = {n: np.mean([folder.load(i)[1].sum() for i in range(12) if per_file[i] == n]) for n in lengths}
    assert area[25] > area[6]


def test_single_length_index_still_reads_without_per_file_lengths(tmp_path):
    cfg = PathfinderConfig(length=9)
    path = write_dataset(tmp_path, cfg, count=2, progress=False)
    index = json.loads(path.read_text())
    for f in index["files"]:
        del f["length"]
    path.write_text(json.dumps(index))
    assert PathfinderFolder(tmp_path).lengths == [9, 9]


def test_cli_mixed_lengths(tmp_path, run_cli):
    code, out, err = run_cli("data", "pathfinder", "--length", "6,9,14", "--count", "6",
                             "--out", str(tmp_path / "mix"), "--no-progress")
    assert code == 0, err
    assert PathfinderFolder(tmp_path / "mix").lengths == [6, 9, 14, 6, 9, 14]


@pytest.mark.parametrize("value, match", [("6,9,2", "length must be >= 3"), ("6,25", "too small"), ("6,,9", "whole number")])
def test_cli_bad_length_list_one_line_nothing_written(tmp_path, run_cli, one_error_line, value, match):
    out = tmp_path / "out"
    code, _, err = run_cli("data", "pathfinder", "--length", value, "--size", "32", "--count", "4",
                           "--out", str(out), "--no-progress")
    one_error_line(code, err, match)
    assert not out.exists()
