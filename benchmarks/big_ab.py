"""Two versions of donecache.py and joblib, storing one big result, taking turns.

    python benchmarks/big_ab.py OLD_DIR NEW_DIR DIR [--kind frame|array] [--rounds 7]

OLD_DIR and NEW_DIR each hold a donecache.py. Each measurement is a fresh process
running bench.py's big-value child (which syncs before its timed call) on an empty
cache in DIR: a miss that stores a 400 MB array or a 240 MB frame. The three take
turns, in an order that reverses each round, and the medians are printed. Use it to
judge a change to the big-value write path: on a disk the write of a big file swings
by a factor of two or three between runs, and only alternation shows a 10% change.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from pathlib import Path

from bench import _big_child


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("dir", type=Path)
    parser.add_argument("--kind", choices=("frame", "array"), default="frame")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    sides = {"old": args.old, "new": args.new, "joblib": None}
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    for r in range(args.rounds):
        for side in list(sides)[:: 1 if r % 2 else -1]:
            cache = args.dir / f"big-ab-{side}"
            shutil.rmtree(cache, ignore_errors=True)
            tool = "joblib" if side == "joblib" else "donecache"
            seconds[side].append(_big_child(tool, args.kind, "result", "miss", cache, sides[side])["seconds"])
            shutil.rmtree(cache, ignore_errors=True)
    for side, times in seconds.items():
        print(f"{side:7s} miss {statistics.median(times) * 1e3:6.1f} ms   {[round(t * 1e3) for t in times]}")


if __name__ == "__main__":
    main()
