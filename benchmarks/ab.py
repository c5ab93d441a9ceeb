"""Two versions of donecache.py side by side in one process: small misses and hits.

    python benchmarks/ab.py OLD/donecache.py donecache.py DIR [ROUNDS] [--max-bytes N]

Both modules are loaded under other names and take turns, round after round, in the
order that alternates; each round memoizes one function into a fresh store in DIR,
misses on 300 keys, then hits them in shuffled order. Prints the medians per call.
Use it to judge a change of a few microseconds, which separate runs of bench.py blur.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import shutil
import statistics
import sys
import tempfile
import time
from types import ModuleType


def load(name: str, path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def work(x: int) -> int:
    return x * 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("directory")
    parser.add_argument("rounds", type=int, nargs="?", default=12)
    parser.add_argument("--max-bytes", type=int, default=None)
    args = parser.parse_args()
    modules = {"old": load("donecache_old", args.old), "new": load("donecache_new", args.new)}
    misses: dict[str, list[float]] = {name: [] for name in modules}
    hits: dict[str, list[float]] = {name: [] for name in modules}
    keys = list(range(300))
    for r in range(args.rounds):
        for name in (["old", "new"] if r % 2 else ["new", "old"]):
            directory = tempfile.mkdtemp(dir=args.directory)
            function = modules[name].memoize(directory, max_bytes=args.max_bytes)(work)
            start = time.perf_counter()
            for key in keys:
                function(key)
            misses[name].append((time.perf_counter() - start) / len(keys) * 1e6)
            random.Random(r).shuffle(keys)
            start = time.perf_counter()
            for key in keys:
                function(key)
            hits[name].append((time.perf_counter() - start) / len(keys) * 1e6)
            shutil.rmtree(directory)
    for name in modules:
        print(f"{name}: miss {statistics.median(misses[name]):.1f} us, hit {statistics.median(hits[name]):.2f} us")


if __name__ == "__main__":
    main()
