"""Cold batches of several versions of donecache.py, in turns, each against a plain pool.

    python benchmarks/map_ab.py OLD/donecache.py donecache.py [--dir DIR] [--inputs 4000] [--rounds 4]

Each round runs every version in a fresh interpreter, in an order that alternates: the child
times a plain ProcessPoolExecutor over the inputs (chunks of 50), then a cold `map` of the same
1 ms function on 2 workers into a new store in DIR, and prints both rates. Then the medians of
each version's rate and of its ratio to the pool run just before it. One child per measurement
keeps a version's first-call costs (the code identity) in, as a user's first batch pays them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import os, sys, time
sys.path.insert(0, os.path.dirname(sys.argv[1]))
sys.path.insert(0, sys.argv[2])
from concurrent.futures import ProcessPoolExecutor
import donecache
from bench import one_ms

n = int(sys.argv[4])
if __name__ == "__main__":
    start = time.perf_counter()
    with ProcessPoolExecutor(2) as pool:
        for _ in pool.map(one_ms, range(n), chunksize=50):
            pass
    pool_rate = n / (time.perf_counter() - start)
    cached = donecache.memoize(sys.argv[3])(one_ms)
    start = time.perf_counter()
    cached.map(range(n), workers=2)
    print(pool_rate, n / (time.perf_counter() - start))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="+", help="donecache.py files to compare")
    parser.add_argument("--dir", default=None, help="where the stores go (default: the temporary directory)")
    parser.add_argument("--inputs", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    modules = [os.path.abspath(m) for m in args.modules]
    rates: dict[str, list[float]] = {m: [] for m in modules}
    ratios: dict[str, list[float]] = {m: [] for m in modules}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="donecache-map-ab-") as tmp:
        script = Path(tmp) / "child.py"
        script.write_text(CHILD)
        for r in range(args.rounds):
            for i, module in enumerate(modules if r % 2 == 0 else modules[::-1]):
                store = os.path.join(tmp, f"store-{r}-{i}")
                out = subprocess.run([sys.executable, str(script), module, str(HERE), store, str(args.inputs)],
                                     capture_output=True, text=True, check=True).stdout.split()
                pool_rate, rate = float(out[0]), float(out[1])
                rates[module].append(rate)
                ratios[module].append(rate / pool_rate)
                print(f"round {r}: {module}: pool {pool_rate:,.0f}/s, donecache {rate:,.0f}/s, {rate / pool_rate:.3f}")
    print(f"\nmedians over {args.rounds} rounds, {args.inputs:,} calls of 1 ms, 2 workers, cold:")
    for module in modules:
        print(f"  {module}: {statistics.median(rates[module]):,.0f}/s, "
              f"{statistics.median(ratios[module]):.3f} of the pool")
    return 0


if __name__ == "__main__":
    sys.exit(main())
