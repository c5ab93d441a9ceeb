"""User-space instructions per small miss, counted by callgrind: a measure that load does not blur.

    python benchmarks/instructions.py [--dir DIR] OLD/donecache.py donecache.py ...

For each file, a fresh interpreter under `valgrind --tool=callgrind` memoizes one function into a
new store in DIR (a tmpfs is best: the kernel's work is not counted anyway), warms it with 300
misses, then makes N more; the difference between N = 500 and N = 1500 over 1000 is one miss.
Wall-clock A/B runs (benchmarks/ab.py) on a shared 2-core VM move by 5-10% between runs; these
counts repeat to the instruction. They leave out system calls, so they judge the Python around them.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

CHILD = """
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("donecache", sys.argv[1])
dc = importlib.util.module_from_spec(spec); sys.modules["donecache"] = dc; spec.loader.exec_module(dc)
f = dc.memoize(os.path.join(sys.argv[2], "c"))(lambda x: x * 2)
for k in range(10**6, 10**6 + 300): f(k)
for k in range(int(sys.argv[3])): f(k)
"""


def instructions(path: str, directory: str, misses: int) -> int:
    store = tempfile.mkdtemp(dir=directory)
    try:
        run = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-c",
                              CHILD, path, store, str(misses)], capture_output=True, text=True, check=True)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    found = re.search(r"Collected : (\d+)", run.stderr)
    assert found, run.stderr
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind)")
    for path in args.files:
        per_miss = (instructions(path, args.dir, 1500) - instructions(path, args.dir, 500)) / 1000
        print(f"{path}: {per_miss:,.0f} instructions per small miss")


if __name__ == "__main__":
    main()
