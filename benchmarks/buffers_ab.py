"""Two versions of donecache.py storing values of many out-of-band buffers, taking turns.

    python benchmarks/buffers_ab.py OLD/donecache.py donecache.py DIR [--rounds 5]

Each value is a list of PickleBuffers of random bytes (4,096 of 64 KiB, 1,024 of 256 KiB,
64 of 4 MiB, one of 400 MiB), stored with `store[key] = value` into a fresh store in
DIR; both modules run in this process, in an order that reverses each round. Prints the
median time per value. It judges the per-buffer cost of the write path (the CRC of
each buffer), which a single big value does not show.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import statistics
import tempfile
import time

from ab import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("dir")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    modules = {"old": load("donecache_old", args.old), "new": load("donecache_new", args.new)}
    for count, size in ((4096, 64 << 10), (1024, 256 << 10), (64, 4 << 20), (1, 400 << 20)):
        piece = os.urandom(min(size, 1 << 20))
        value = [pickle.PickleBuffer(bytearray(piece * (size // len(piece)))) for _ in range(count)]
        seconds: dict[str, list[float]] = {side: [] for side in modules}
        for r in range(args.rounds):
            for side in list(modules)[:: 1 if r % 2 else -1]:
                root = tempfile.mkdtemp(dir=args.dir)
                with modules[side].open(os.path.join(root, "c")) as store:
                    start = time.perf_counter()
                    store["value"] = value
                    seconds[side].append(time.perf_counter() - start)
                shutil.rmtree(root)
        figures = ", ".join(f"{side} {statistics.median(t) * 1e3:.1f} ms" for side, t in seconds.items())
        print(f"{count:5,d} buffers of {size >> 10:7,d} KiB: {figures}")


if __name__ == "__main__":
    main()
