"""How fast the Pathfinder generator draws images, per contour length and size (CPU, one core).

Moved out of the test suite (it measured and printed, and asserted nothing). Prints one line per
(length, size) with the distractor count and images/s of CPU time; `--json` writes the numbers.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pathfinder_data_speed.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pathfinder_data_speed.py --lengths 14 --sizes 64 --seconds 1
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from crbp_deploy.data.pathfinder import PathfinderConfig, generate


def rate(cfg: PathfinderConfig, seconds: float, seed: int = 123) -> float:
    """Images per second of process CPU time, after one warm-up image."""
    generate(cfg, 0, 0)
    start, n = time.process_time(), 0
    while time.process_time() - start < seconds:
        generate(cfg, n, seed)
        n += 1
    return n / (time.process_time() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="9,14,20,25", help="contour lengths, comma-separated")
    ap.add_argument("--sizes", default="64", help="image sides, comma-separated")
    ap.add_argument("--seconds", type=float, default=2.0, help="CPU seconds per (length, size)")
    ap.add_argument("--json", type=Path, help="also write the rows to this file")
    args = ap.parse_args()
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for length in (int(x) for x in args.lengths.split(",")):
            cfg = PathfinderConfig(length=length, size=size)
            row = {"length": length, "size": size, "distractors": cfg.distractor_count,
                   "images_per_s": round(rate(cfg, args.seconds), 1)}
            rows.append(row)
            print(f"PF{length} {size}x{size}, {row['distractors']} distractors: {row['images_per_s']:.0f} images/s "
                  f"(CPU time, 1 core)")
    if args.json:
        args.json.write_text(json.dumps({"cpu": platform.processor() or platform.machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
