# SPDX-License-Identifier: MIT
"""donecache against its peers, side by side, in one run.

    python -m venv .bench && .bench/bin/pip install -r benchmarks/requirements.txt
    .bench/bin/python benchmarks/bench.py --quick      # a few minutes on 2 cores
    .bench/bin/python benchmarks/bench.py              # the full run
    .bench/bin/python benchmarks/bench.py --big        # big arrays and frames (numpy, pandas)
    .bench/bin/python benchmarks/bench.py --first-call # the code identity's cost at a first call
    .bench/bin/python benchmarks/bench.py --compress   # compress= off, zlib, lzma on a text-heavy value

Every workload runs each tool in turn, round after round (the order rotates),
so drifts of the machine hit all tools alike. The table shows the median over
rounds of each tool's mean time per operation, and the ratio donecache/peer.
Results go to benchmarks/last-run.json (and a PNG if matplotlib is present).
A peer that is not installed is skipped with a note. The load average is
recorded before and after: a run on a busy machine says so.

Small misses are measured on a journaled ext4 filesystem, which the run makes
when it is root (a 2 GB image, mkfs.ext4, mount -o loop; unmounted at the end)
or finds at $BENCH_JOURNALED, beside the temporary directory's filesystem: an
ext4 without a journal pays ~0.5 ms of kernel time per new file after recent
deletions, whatever the code does. System calls per operation are counted
with strace(1) where it is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import random
import shelve
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import donecache  # noqa: E402  (the checkout's copy, not an installed one)

PEERS = ("diskcache", "joblib", "cachier", "atomicwrites", "dask")
have: dict[str, bool] = {}
for _name in PEERS:
    try:
        __import__(_name)
        have[_name] = True
    except ImportError:
        have[_name] = False


def work(x: int) -> int:
    """The memoized function: cheap, so that the cache's own cost shows."""
    return x * 2


def slow_work(x: int, log: str) -> int:
    with open(log, "a") as f:
        f.write(f"{x}\n")
    time.sleep(0.01)
    return x * 2


def one_ms(x: int) -> int:
    """The batch benchmark's function: 1 ms of waiting, to the microsecond
    (time.sleep alone overshoots by 0.1-0.2 ms on a VM), so the floor of a
    batch is exactly workers / 1 ms."""
    end = time.perf_counter() + 0.001
    time.sleep(0.0007)
    while time.perf_counter() < end:
        pass
    return x * 2


def bench_map(tmp: Path, n: int, workers: int = 2, peers: bool = True) -> dict[str, dict[str, float]]:
    """calls/s of a batch over n inputs of one_ms, cold (empty cache) and warm
    (every input cached), with `workers` processes: donecache's map with
    workers=, the same on a Dask LocalCluster's executor, and joblib.Parallel
    over a joblib.Memory function; cold only, a plain ProcessPoolExecutor as
    the measured floor. One measurement each: a cold run needs an empty cache."""
    out: dict[str, dict[str, float]] = {}

    def rate(run: Callable[[], Any]) -> float:
        start = time.perf_counter()
        run()
        return n / (time.perf_counter() - start)

    inputs = range(n)
    # The measured floor: the same calls on a plain pool of the same size, in chunks of 50 (the size
    # donecache's chunks grow to for 1 ms calls), run in this process just before donecache's batch, so
    # that both pay the same for forking it (issue 20: "floor measured: plain pool").
    from concurrent.futures import ProcessPoolExecutor

    def plain() -> None:
        with ProcessPoolExecutor(workers) as pool:
            for _ in pool.map(one_ms, inputs, chunksize=50):
                pass

    out["plain ProcessPoolExecutor"] = {"cold": rate(plain)}  # Nothing is cached: no warm run.
    cached = donecache.memoize(tmp / "map-donecache")(one_ms)
    out["donecache workers=2"] = {
        "cold": rate(lambda: cached.map(inputs, workers=workers)),
        "warm": rate(lambda: cached.map(inputs, workers=workers)),
    }
    if have["dask"] and peers:
        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
            with Client(cluster) as client:
                executor = client.get_executor()
                on_dask = donecache.memoize(tmp / "map-dask")(one_ms)
                out["donecache on Dask"] = {
                    "cold": rate(lambda: on_dask.map(inputs, executor=executor)),
                    "warm": rate(lambda: on_dask.map(inputs, executor=executor)),
                }
    if have["joblib"] and peers:
        import joblib

        remembered = joblib.Memory(str(tmp / "map-joblib"), verbose=0).cache(one_ms)

        def parallel() -> list[int]:
            return joblib.Parallel(n_jobs=workers)(joblib.delayed(remembered)(x) for x in inputs)  # type: ignore[no-any-return]

        out["joblib Parallel+Memory"] = {"cold": rate(parallel), "warm": rate(parallel)}
    return out


# -- memoizers: name -> (make(cache_dir) -> callable) --------------------------


def _shelve_pattern(path: str) -> Callable[[int], int]:
    os.makedirs(path, exist_ok=True)

    def cached(x: int) -> int:
        with shelve.open(os.path.join(path, "shelf")) as cache:  # The hand-written pattern.
            key = str(x)
            if key not in cache:
                cache[key] = work(x)
            return cache[key]  # type: ignore[no-any-return]

    return cached


def memoizers() -> dict[str, Callable[[str], Callable[[int], int]]]:
    tools: dict[str, Callable[[str], Callable[[int], int]]] = {
        "donecache": lambda d: donecache.memoize(d)(work),
        # With a size limit (never reached here): every hit records its use
        # (one futimens), every miss adds to the store's running total.
        MAX_BYTES: lambda d: donecache.memoize(d, max_bytes=1 << 40)(work),
    }
    if have["diskcache"]:
        import diskcache

        tools["diskcache"] = lambda d: diskcache.Cache(d).memoize()(work)
    if have["joblib"]:
        import joblib

        tools["joblib"] = lambda d: joblib.Memory(d, verbose=0).cache(work)
    if have["cachier"]:
        from cachier import cachier

        tools["cachier"] = lambda d: cachier(cache_dir=d)(work)
    tools["lru_cache"] = lambda d: functools.lru_cache(maxsize=None)(work)
    tools["shelve"] = _shelve_pattern
    return tools


FLOOR = "(floor: new file + rename)"
MAX_BYTES = "donecache max_bytes"


def new_file_floor(directory: Path, keys: list[int]) -> float:
    """What any file-per-entry store pays per miss: create, write and rename one small file."""
    directory.mkdir()
    start = time.perf_counter()
    for k in keys:
        temp, final = directory / f"t{k}", directory / f"e{k}"
        with open(temp, "wb") as f:
            f.write(b"x" * 100)
        os.replace(temp, final)
    return (time.perf_counter() - start) / len(keys)


def per_call(fn: Callable[[int], Any], keys: list[int]) -> float:
    start = time.perf_counter()
    for k in keys:
        fn(k)
    return (time.perf_counter() - start) / len(keys)


def rotate(names: list[str], r: int) -> list[str]:
    return names[r % len(names) :] + names[: r % len(names)]


def bench_hits_and_misses(tmp: Path, n: int, rounds: int) -> dict[str, dict[str, float]]:
    tools = memoizers()
    names = list(tools)
    hits: dict[str, list[float]] = {t: [] for t in names}
    misses: dict[str, list[float]] = {t: [] for t in [*names, FLOOR]}
    keys = list(range(n))
    for r in range(rounds):
        misses[FLOOR].append(new_file_floor(tmp / f"floor-{r}", keys))
        for name in rotate(names, r):
            d = tmp / f"memo-{name}-{r}"
            fn = tools[name](str(d))
            misses[name].append(per_call(fn, keys))  # Fresh cache: every call misses and stores.
            shuffled = keys[:]
            random.Random(r).shuffle(shuffled)
            hits[name].append(per_call(fn, shuffled))
            if name == "cachier":
                fn.clear_cache()  # type: ignore[attr-defined]
            shutil.rmtree(d, ignore_errors=True)
    return {
        "hit": {t: statistics.median(v) for t, v in hits.items()},
        "miss": {t: statistics.median(v) for t, v in misses.items()},
    }


def bench_growth(tmp: Path, sizes: list[int], rounds: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {"donecache": {}}
    for size in sizes:
        d = tmp / f"grow-{size}"
        fn = donecache.memoize(str(d))(work)
        for k in range(size):
            fn(k)
        sample = random.Random(size).sample(range(size), 1000)
        out["donecache"][str(size)] = statistics.median(per_call(fn, sample) for _ in range(rounds))
        shutil.rmtree(d, ignore_errors=True)
    return out


WORKER = """
import os, random, sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, {bench!r})
import bench
tool, cache, log, go, nkeys, seed = sys.argv[1:7]
if tool == "donecache":
    import donecache; fn = donecache.memoize(cache)(bench.slow_work)
elif tool == "diskcache":
    import diskcache; fn = diskcache.Cache(cache).memoize()(bench.slow_work)
elif tool == "joblib":
    import joblib; fn = joblib.Memory(cache, verbose=0).cache(bench.slow_work)
elif tool == "cachier":
    from cachier import cachier; fn = cachier(cache_dir=cache)(bench.slow_work)
elif tool == "shelve":
    import shelve
    def fn(x, log):
        with shelve.open(os.path.join(cache, "shelf")) as db:
            if str(x) not in db:
                db[str(x)] = bench.slow_work(x, log)
            return db[str(x)]
keys = list(range(int(nkeys)))
random.Random(int(seed)).shuffle(keys)
while not os.path.exists(go):
    time.sleep(0.001)
for k in keys:
    assert fn(k, log) == 2 * k
"""


def bench_processes(tmp: Path, nproc: int, nkeys: int, limit: float) -> dict[str, dict[str, float]]:
    tools = ["donecache"] + [t for t in ("diskcache", "joblib", "cachier") if have[t]] + ["shelve"]
    script = WORKER.format(root=str(HERE.parent), bench=str(HERE))
    out: dict[str, dict[str, float]] = {}
    for tool in tools:
        cache, log, go = tmp / f"proc-{tool}", tmp / f"proc-{tool}.log", tmp / f"proc-{tool}.go"
        cache.mkdir()
        log.touch()
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, tool, str(cache), str(log), str(go), str(nkeys), str(i)],
                stderr=subprocess.PIPE,
            )
            for i in range(nproc)
        ]
        time.sleep(1.0)  # Let every worker import and wait.
        start = time.perf_counter()
        go.touch()
        deadline = start + limit
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(0.1, deadline - time.perf_counter())))
            except subprocess.TimeoutExpired:  # Hung (cachier waits on a stale "being calculated").
                p.kill()
                p.wait()
                codes.append("hung")
        wall = time.perf_counter() - start
        computed = len(log.read_text().split())
        # Entries lost: keys that one more process has to compute again.
        try:
            check = subprocess.run(
                [sys.executable, "-c", script, tool, str(cache), str(log), str(go), str(nkeys), "0"],
                capture_output=True,
                timeout=limit,
            )
            lost: float = len(log.read_text().split()) - computed if check.returncode == 0 else float("nan")
        except subprocess.TimeoutExpired:
            lost = float("nan")
        out[tool] = {
            "seconds": wall,
            "calls_per_s": nproc * nkeys / wall,
            "computations_per_key": computed / nkeys,
            "entries_lost": lost,
            "workers_failed": sum(1 for c in codes if c != 0 and c != "hung"),
            "workers_hung": codes.count("hung"),
        }
    return out


def _write_plain(path: str, data: bytes, fsync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def bench_atomic(tmp: Path, sizes: dict[str, tuple[int, int]], rounds: int) -> dict[str, dict[str, float]]:
    writers: dict[str, Callable[[str, bytes], None]] = {
        "donecache durable": lambda p, b: _dc_write(p, b, True),
        "donecache non-durable": lambda p, b: _dc_write(p, b, False),
        "plain write": lambda p, b: _write_plain(p, b, False),
        "plain write + fsync": lambda p, b: _write_plain(p, b, True),
    }
    if have["atomicwrites"]:
        import atomicwrites

        def aw(p: str, b: bytes) -> None:
            with atomicwrites.atomic_write(p, mode="wb", overwrite=True) as f:
                f.write(b)

        writers["atomicwrites"] = aw
    names = list(writers)
    out: dict[str, dict[str, float]] = {}
    for label, (size, count) in sizes.items():
        data = os.urandom(size)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for name in rotate(names, r):
                path = str(tmp / f"atomic-{label}.bin")
                start = time.perf_counter()
                for _ in range(count):
                    writers[name](path, data)
                times[name].append((time.perf_counter() - start) / count)
        out[label] = {n: statistics.median(v) for n, v in times.items()}
    return out


def _dc_write(path: str, data: bytes, durable: bool) -> None:
    with donecache.atomic_write(path, "wb", durable=durable) as f:
        f.write(data)


def bench_big_arguments(tmp: Path, rounds: int) -> dict[str, float]:
    """A memoize hit with one 100 MB argument: the key hashes it in place (SHA-256),
    so the time is the hash and the extra memory (tracemalloc's peak) stays small."""
    import tracemalloc

    @donecache.memoize(tmp / "big-arguments")
    def size(data: Any) -> int:
        return len(data)

    data = os.urandom(100 * 2**20)
    results: dict[str, float] = {}
    for label, value in (("bytes", data), ("str (ASCII)", data.hex()[: len(data)])):
        size(value)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            size(value)
            times.append(time.perf_counter() - start)
        tracemalloc.start()
        size(value)
        results[f"100 MB {label} argument: hit, MiB traced"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        results[f"100 MB {label} argument: hit"] = statistics.median(times)
    return results


def bench_imports(runs: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(HERE.parent)
    modules = ["donecache", "shelve"] + [m for m in ("diskcache", "joblib", "cachier", "atomicwrites") if have[m]]

    def once(stmt: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", stmt], env=env, check=True)
        return time.perf_counter() - start

    for m in modules:
        once(f"import {m}")  # Warm up: compile to bytecode, fill the page cache.
    samples: dict[str, list[float]] = {m: [] for m in ["(nothing)", *modules]}
    for r in range(runs):
        for m in rotate(list(samples), r):
            samples[m].append(once("pass" if m == "(nothing)" else f"import {m}"))
    base = statistics.median(samples.pop("(nothing)"))
    return {m: max(0.0, statistics.median(v) - base) for m, v in samples.items()}



# -- the first call: working out the code identity ------------------------------
#
# Each measurement is a fresh interpreter. It times the first call (a miss that
# also follows the code) and a second miss with another argument; the
# difference is what the code identity costs, once per process. "new" runs
# over an empty cache; "later" is the next process over that cache, which
# finds what the first learnt of each source file in the store's notes.
# Then it times the check that each call makes (the bindings it read are
# unchanged), alone, in a loop of 100,000: the per-hit cost of noticing a
# redefinition or a reload.

FIRST_CALL_CHILD = r"""
import json, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import donecache
module = __import__(sys.argv[3], fromlist=["run"])
followed = donecache.memoize(sys.argv[4])(module.run)
start = time.perf_counter(); followed(sys.argv[5]); first = time.perf_counter() - start
start = time.perf_counter(); followed(sys.argv[5] + "b"); second = time.perf_counter() - start
check, best = followed._same, float("inf")
for _ in range(5):
    start = time.perf_counter()
    for _ in range(100000):
        check()
    best = min(best, (time.perf_counter() - start) / 100000)
print(json.dumps({"first": first, "second": second, "check": best}))
"""

ARRAYS_MODULE = """
import numpy as np
import pandas as pd

def run(x):
    return float(np.sum(pd.Series([len(x), 2.0]).to_numpy()))
"""


def _package(root: Path, modules: int, functions: int) -> None:
    """A package where each function calls the next, through every module: all of it is followed."""
    (root / "big").mkdir()
    (root / "big" / "__init__.py").write_text("")
    for m in range(modules):
        body = [f"from big import m{m + 1}\n" if m < modules - 1 else ""]
        for n in range(functions):
            call = f"f{n + 1}(x)" if n < functions - 1 else f"m{m + 1}.f0(x)" if m < modules - 1 else "0"
            body.append(f'def f{n}(x):\n    """Step {n} of module {m}."""\n    return x + {n} + {call}\n')
        (root / "big" / f"m{m}.py").write_text("\n".join(body))
    (root / "big_job.py").write_text("from big import m0\n\ndef run(x):\n    return m0.f0(len(x))\n")


def bench_first_call(tmp: Path, rounds: int) -> dict[str, dict[str, float]]:
    (tmp / "small_job.py").write_text("RATE = 2\n\ndef run(x):\n    return x * RATE\n")
    _package(tmp, 50, 6)
    workloads = {"a 3-line function": "small_job", "a 50-module package (300 functions)": "big_job"}
    try:
        import numpy, pandas  # noqa: F401,E401
    except ImportError:
        print("note: numpy or pandas is not installed; the arrays row is skipped")
    else:
        (tmp / "arrays_job.py").write_text(ARRAYS_MODULE)
        workloads["a module that imports numpy and pandas"] = "arrays_job"
    results: dict[str, dict[str, float]] = {}
    for label, module in workloads.items():
        samples: dict[str, list[dict[str, float]]] = {"new": [], "later": []}
        for r in range(rounds):
            cache = tmp / f"first-{module}-{r}"
            for when, argument in (("new", "a"), ("later", "c")):
                out = subprocess.run(
                    [sys.executable, "-c", FIRST_CALL_CHILD, str(HERE.parent), str(tmp), module, str(cache), argument],
                    capture_output=True, text=True, check=True,
                ).stdout
                samples[when].append(json.loads(out))
        for when, found in samples.items():
            results[f"{label}, {when}"] = {key: statistics.median(s[key] for s in found) for key in found[0]}
    return results


def main_first_call(args: Any) -> int:
    results: dict[str, Any] = {"machine": machine(), "mode": "first-call", "python": sys.version}
    print(f"machine: {results['machine']}\nmode: first call, fresh processes, medians of {args.rounds}")
    with tempfile.TemporaryDirectory(prefix="donecache-bench-", dir=os.environ.get("BENCH_TMP")) as tmpdir:
        results["first_call"] = bench_first_call(Path(tmpdir), args.rounds)
    print(f"\n  {'workload, cache':50s} {'1st call':>9s} {'2nd miss':>9s} {'identity':>9s} {'check/hit':>9s}")
    for label, r in results["first_call"].items():
        print(
            f"  {label:50s} {r['first'] * 1e3:>7.1f}ms {r['second'] * 1e3:>7.2f}ms"
            f" {(r['first'] - r['second']) * 1e3:>7.1f}ms {r['check'] * 1e9:>7.0f}ns"
        )
    path = Path(args.json).with_name("first-call-run.json") if args.json == str(HERE / "last-run.json") else Path(args.json)
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"results written to {path}")
    return 0


# -- big values: arrays and frames, in fresh child processes --------------------
#
# Each measurement is one fresh interpreter: it builds the value (not timed),
# flushes the dirty pages that earlier rounds left (sync(2): otherwise a
# 400 MB write pays for the writeback of the round before, by a factor of up
# to three on a disk), resets the kernel's RSS high-water mark (writing 5 to
# /proc/self/clear_refs sets VmHWM back to the current RSS), times one call,
# and reports the call's seconds and its peak extra memory, VmHWM minus the
# RSS just before the call. That counts every transient copy, which ru_maxrss
# cannot (it never resets).
# A miss runs in an empty cache; a hit in a new process over the cache that
# the miss left. Pages of a memory-mapped file count in RSS only once touched.
# For results, a small call comes first, timed apart ("1st call"): the memoized
# function reads the 400 MB global, so donecache's first call of a process
# hashes it for the code identity (docs/identity.md). The miss and hit rows
# time storing and loading the big value, for every tool alike.

BIG_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
tool, kind, role, phase, cache = sys.argv[2:7]
import numpy as np, pandas as pd

def make():
    if kind == "array":
        return np.arange(50_000_000, dtype="f8")  # 400 MB
    n = 3_750_000  # 8 float64 columns and an int64 index: about 300 MB
    return pd.DataFrame({f"c{i}": np.arange(n, dtype="f8") + i for i in range(8)})

value = make() if role == "argument" or phase == "miss" else None

if role == "result":
    def work(x):
        return value if x else 0  # Reads the global: donecache's identity hashes it, at the first call.
else:
    def work(x):
        return float(x.iloc[:, 0].sum() if kind == "frame" else x.sum())

if tool.startswith("donecache"):
    import donecache
    f = donecache.memoize(cache, mmap=tool.endswith("mmap"), version=1)(work)  # work reads `value`
elif tool.startswith("joblib"):
    import joblib
    f = joblib.Memory(cache, verbose=0, mmap_mode="r" if tool.endswith("mmap") else None).cache(work)
else:
    import diskcache
    f = diskcache.Cache(cache).memoize()(work)
arg = value if role == "argument" else 1
warmup = 0.0
if role == "result":  # The first call of a process (the code identity: a SHA-256 of the 400 MB global) apart.
    start = time.perf_counter()
    f(0)
    warmup = time.perf_counter() - start

def rss(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))

os.sync()  # The last round's dirty pages written back first: on a disk, not this call's to throttle.
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")
before = rss("VmRSS:")
start = time.perf_counter()
out = f(arg)
seconds = time.perf_counter() - start
assert out is not None, "a hit that recomputed"
peak = rss("VmHWM:") - before
print(json.dumps({"seconds": seconds, "warmup": warmup, "peak": peak, "size": int(value.nbytes if kind == "array" else
      value.memory_usage(index=True).sum()) if value is not None else None}))
"""

BIG_TOOLS = ("donecache", "donecache mmap", "joblib", "joblib mmap", "diskcache")


def _big_child(
    tool: str, kind: str, role: str, phase: str, cache: Path, module_dir: str | None = None
) -> dict[str, Any]:
    """One measurement in a fresh process; ``module_dir``: where its donecache.py is (default: this checkout's)."""
    proc = subprocess.run(
        [sys.executable, "-c", BIG_CHILD, module_dir or str(HERE.parent), tool, kind, role, phase, str(cache)],
        capture_output=True, text=True, timeout=600,
    )
    if proc.returncode:
        raise RuntimeError(f"{tool} {kind} {role} {phase}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def bench_big(tmp: Path, rounds: int) -> dict[str, Any]:
    """Miss, hit and peak extra memory for big arrays and frames as results and arguments."""
    tools = [t for t in BIG_TOOLS if have.get(t.split()[0], True)]
    out: dict[str, Any] = {}
    for kind in ("array", "frame"):
        for role in ("result", "argument"):
            if role == "argument":  # Mapping changes nothing for an argument's small result.
                names = [t for t in tools if not t.endswith("mmap")]
            else:
                names = tools
            runs: dict[str, dict[str, list[float]]] = {
                t: {"miss": [], "hit": [], "miss_peak": [], "hit_peak": [], "first_call": []} for t in names
            }
            size = 0
            for r in range(rounds):
                for tool in rotate(names, r):
                    cache = tmp / f"big-{tool.replace(' ', '-')}"
                    shutil.rmtree(cache, ignore_errors=True)
                    miss = _big_child(tool, kind, role, "miss", cache)
                    hit = _big_child(tool, kind, role, "hit", cache)
                    shutil.rmtree(cache, ignore_errors=True)
                    size = miss["size"]
                    for phase, got in (("miss", miss), ("hit", hit)):
                        runs[tool][phase].append(got["seconds"])
                        runs[tool][phase + "_peak"].append(got["peak"] / size)
                    runs[tool]["first_call"].append(miss["warmup"])
            out[f"{kind} {role}"] = {
                "size": size,
                **{t: {k: statistics.median(v) for k, v in m.items()} for t, m in runs.items()},
            }
    return out


INFO_CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import donecache
def rchar():
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
before, start = rchar(), time.perf_counter()
if sys.argv[3] == "info":
    import argparse, json  # Imports read files too: not the cache's doing.
    donecache.main(["info", sys.argv[2], "--json"])
    before, start = rchar(), time.perf_counter()
    donecache.main(["info", sys.argv[2], "--json"])
else:
    @donecache.memoize(sys.argv[2])
    def other(x):
        return x
    other(1)
    before, start = rchar(), time.perf_counter()
    other.cache_info() if sys.argv[3] == "cache_info" else other.cache_clear()
print(rchar() - before, time.perf_counter() - start, file=sys.stderr)
"""


def bench_info(tmp: Path, entries: int) -> dict[str, Any]:
    """`info`, cache_info() and cache_clear() on a cache of multi-GB entries: bytes read and time."""
    cache = tmp / "info-cache"
    fill = (
        "import sys, numpy as np\nsys.path.insert(0, sys.argv[1])\nimport donecache\n"
        "@donecache.memoize(sys.argv[2])\ndef big(i):\n    return np.full(50_000_000 * 5 // 4, float(i))\n"
        "for i in range(int(sys.argv[3])):\n    big(i)\n"
    )
    subprocess.run([sys.executable, "-c", fill, str(HERE.parent), str(cache), str(entries)], check=True)
    total = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    out: dict[str, Any] = {"cache_bytes": total}
    for what in ("info", "cache_info", "cache_clear"):
        proc = subprocess.run(
            [sys.executable, "-c", INFO_CHILD, str(HERE.parent), str(cache), what], capture_output=True, text=True
        )
        read, seconds = proc.stderr.split()[-2:]
        out[what] = {"bytes_read": int(read), "seconds": float(seconds)}
    shutil.rmtree(cache)
    return out


# -- filesystems: a journaled ext4 for small misses ----------------------------


def filesystem(path: Path) -> str:
    """The filesystem under ``path``: its type, device, and for ext4 whether it has a journal."""
    try:
        source, kind = subprocess.run(
            ["findmnt", "-no", "SOURCE,FSTYPE", "--target", str(path)], capture_output=True, text=True
        ).stdout.split()[:2]
    except (OSError, ValueError):
        return "?"
    if kind.startswith("ext"):
        features = subprocess.run(["dumpe2fs", "-h", source], capture_output=True, text=True).stdout
        kind += " with a journal" if "has_journal" in features else " without a journal"
    return f"{kind} ({source})"


@contextlib.contextmanager
def journaled_ext4(tmp: Path) -> Iterator[tuple[Path | None, str]]:
    """(a directory on a journaled ext4, how it was found), or (None, why not)."""
    given = os.environ.get("BENCH_JOURNALED")
    if given:
        yield Path(given), f"$BENCH_JOURNALED={given}"
        return
    tools = all(shutil.which(t) for t in ("mkfs.ext4", "mount", "umount"))
    if not (hasattr(os, "geteuid") and os.geteuid() == 0 and tools):
        yield None, "not root (or no mkfs.ext4): set BENCH_JOURNALED to a directory on a journaled ext4"
        return
    image, mount = tmp / "ext4.img", tmp / "ext4"
    mount.mkdir()
    try:
        subprocess.run(["truncate", "-s", "2G", str(image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        yield None, f"could not make a loop-mounted ext4 ({exc})"
        return
    try:
        yield mount, "a 2 GB loop-mounted ext4 made by this run (mkfs.ext4 defaults: journaled)"
    finally:
        # Lazily if busy: this process keeps handles (diskcache's databases, donecache's lock files).
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount)], check=False)


SYSCALLS_CHILD = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
import bench
tool, cache, n = sys.argv[3], sys.argv[4], int(sys.argv[5])
fn = bench.memoizers()[tool](cache)
for k in range(n, 4000):  # Warm up: imports, the lock file, the 256 shard folders made.
    fn(k)
os.path.exists("/.bench-miss-start")
for k in range(n):
    fn(k)
os.path.exists("/.bench-hit-start")
for k in range(n):
    fn(k)
os.path.exists("/.bench-end")
"""


def count_syscalls(directory: Path, n: int) -> dict[str, dict[str, float]]:
    """System calls per miss and per hit, from strace -f (every thread), between markers."""
    if not shutil.which("strace"):
        return {}
    out: dict[str, dict[str, float]] = {}
    for tool in [t for t in ("donecache", "diskcache") if have.get(t, True)]:
        trace = directory / f"strace-{tool}.txt"
        subprocess.run(
            ["strace", "-f", "-o", str(trace), sys.executable, "-c", SYSCALLS_CHILD, str(HERE.parent), str(HERE),
             tool, str(directory / f"syscalls-{tool}"), str(n)],
            check=True, capture_output=True,
        )
        counts, phase = {"miss": 0, "hit": 0}, ""
        for line in trace.read_text().splitlines():
            if "/.bench-miss-start" in line:
                phase = "miss"
            elif "/.bench-hit-start" in line:
                phase = "hit"
            elif "/.bench-end" in line:
                phase = ""
            elif phase and "resumed>" not in line and "+++" not in line and "---" not in line:
                counts[phase] += 1
        out[tool] = {phase: count / n for phase, count in counts.items()}
        trace.unlink()
    return out


def disk_bytes(path: Path) -> int:
    """Bytes on disk of a directory tree (blocks, as du counts them), directories included."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def bytes_per_entry(tmp: Path, n: int) -> dict[str, float]:
    """Bytes on disk per small entry (an int result) once n entries are stored."""
    out = {}
    for tool in [t for t in ("donecache", "diskcache", "joblib") if have.get(t, True)]:
        d = tmp / f"size-{tool}"
        fn = memoizers()[tool](str(d))
        for k in range(n):
            fn(k)
        out[tool] = disk_bytes(d) / n
        shutil.rmtree(d, ignore_errors=True)
    return out


def bench_big_store(directory: Path, n: int) -> dict[str, float]:
    """A store of n small entries: build time per entry, hit and miss per call
    (1,000 random keys, read once: not yet kept in process), `info` and `prune`."""
    d = directory / "big-store"
    fn = donecache.memoize(str(d))(work)
    start = time.perf_counter()
    for k in range(n):
        fn(k)
    out: dict[str, float] = {"entries": n, "build_per_entry": (time.perf_counter() - start) / n}
    sample = random.Random(n).sample(range(n), 1000)
    donecache._recent.clear()  # Hits of a long-running process that has not read these keys yet.
    out["hit"] = per_call(fn, sample)
    out["hit_again"] = per_call(fn, sample)
    out["miss"] = per_call(fn, list(range(n, n + 1000)))
    for command in ("info", "prune"):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "donecache", command, str(d), "--json"], check=True,
                       capture_output=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
        out[command] = time.perf_counter() - start
    shutil.rmtree(d, ignore_errors=True)
    return out


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    fs = "?"
    try:
        where = os.environ.get("BENCH_TMP") or tempfile.gettempdir()  # Where the run's files go.
        out = subprocess.run(["df", "-T", where], capture_output=True, text=True).stdout
        fs = out.splitlines()[1].split()[1]
    except (OSError, IndexError):
        pass
    return (
        f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} cores, "
        f"{fs} filesystem, CPython {platform.python_version()}"
    )


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f} us" if seconds < 0.01 else f"{seconds * 1e3:,.1f} ms"


def table(title: str, results: dict[str, float], unit: Callable[[float], str] = us) -> list[str]:
    base = results.get("donecache", results.get("donecache durable"))
    lines = [f"\n{title}", f"  {'tool':28s} {'median':>14s} {'donecache/tool':>15s}"]
    for name, value in results.items():
        ratio = f"{base / value:.2f}x" if base and value else "-"
        lines.append(f"  {name:28s} {unit(value):>14s} {ratio:>15s}")
    return lines


def map_table(rows: dict[str, dict[str, float]], n: int, where: str = "") -> tuple[list[str], list[tuple[str, float, float]]]:
    """The batch rows, and their targets as (name, value, lowest value that holds)."""
    lines = [f"\nbatch of {n:,} calls of a 1 ms function, 2 worker processes (calls/s; floor 2,000/s)"
             + (f" on {where}" if where else "")]
    lines.append(f"  {'tool':28s} {'cold':>9s} {'warm':>9s}")
    for tool, r in rows.items():
        warm = f"{r['warm']:>9.0f}" if "warm" in r else f"{'-':>9s}"
        lines.append(f"  {tool:28s} {r['cold']:>9.0f} {warm}")
    targets = [("map cold >= 0.9x the floor (2,000/s)", rows["donecache workers=2"]["cold"] / 2000, 0.9)]
    if "plain ProcessPoolExecutor" in rows:
        pool = rows["plain ProcessPoolExecutor"]["cold"]
        targets.append(("map cold >= 0.9x a plain pool in this run", rows["donecache workers=2"]["cold"] / pool, 0.9))
    if "joblib Parallel+Memory" in rows:
        joblib_warm = rows["joblib Parallel+Memory"]["warm"]
        targets.append(("map warm >= 5x joblib's warm", rows["donecache workers=2"]["warm"] / joblib_warm, 5.0))
    return lines, targets


def bench_compress(tmp: Path, rounds: int) -> dict[str, dict[str, float]]:
    """compress= on a text-heavy value (about 9 MB pickled: 120,000 records of
    an id, two numbers and a line of text, the text being the standard
    library's own source lines, comments and docstrings included): the
    entry's size on disk, and the median time of one write and one read (a
    fresh store each)."""
    lines: list[str] = []
    for source in sorted(Path(os.__file__).parent.rglob("*.py")):
        lines += [line.strip() for line in source.read_text(encoding="utf-8", errors="replace").splitlines() if len(line) > 40]
        if len(lines) >= 120_000:
            break
    rng = random.Random(21)
    value = [
        {"id": f"rec-{i:07d}", "delay": rng.randint(-20, 300), "rate": rng.random(), "text": line}
        for i, line in enumerate(lines[:120_000])
    ]
    found: dict[str, dict[str, float]] = {}
    for codec in (False, "zlib", "lzma"):
        writes, reads, size = [], [], 0
        for r in range(rounds):
            path = tmp / f"compress-{codec}-{r}"
            with donecache.open(path, compress=codec) as db:
                started = time.perf_counter()
                db["v"] = value
                writes.append(time.perf_counter() - started)
                started = time.perf_counter()
                assert db["v"] == value
                reads.append(time.perf_counter() - started)
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and len(f.name) == 32)
            shutil.rmtree(path)
        found[str(codec)] = {"bytes": size, "write": statistics.median(writes), "read": statistics.median(reads)}
    return found


def compress_only(rounds: int, path: str) -> int:
    results: dict[str, Any] = {"machine": machine(), "mode": "compress", "python": sys.version}
    print(f"machine: {results['machine']}\nmode: compress= on a text-heavy value, median of {rounds} rounds")
    with tempfile.TemporaryDirectory(prefix="donecache-bench-", dir=os.environ.get("BENCH_TMP")) as tmpdir:
        results["compress"] = rows = bench_compress(Path(tmpdir), rounds)
    plain = rows["False"]
    print(f"  {'compress=':10s} {'entry size':>12s} {'ratio':>6s} {'write':>10s} {'read':>10s}")
    for codec, r in rows.items():
        print(
            f"  {codec:10s} {r['bytes'] / 1e6:>9.2f} MB {plain['bytes'] / r['bytes']:>5.1f}x "
            f"{r['write'] * 1e3:>7.1f} ms {r['read'] * 1e3:>7.1f} ms"
        )
    Path(path).write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0


def map_only(n: int, path: str) -> int:
    results: dict[str, Any] = {"machine": machine(), "mode": "map only", "python": sys.version, "load_before": loadavg()}
    print(f"machine: {results['machine']}\nmode: {results['mode']}")
    with tempfile.TemporaryDirectory(prefix="donecache-bench-") as tmpdir:
        results["map"] = bench_map(Path(tmpdir), n)
    results["load_after"] = loadavg()
    lines, targets = map_table(results["map"], n)
    lines.append(f"  (load average {results['load_before']} before, {results['load_after']} after)")
    for name, value, lowest in targets:
        lines.append(f"  {'HOLDS' if value >= lowest else 'FAILS'}  {name:44s} measured {value:.2f}")
    print("\n".join(lines))
    Path(path).write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run (under two minutes on two cores)")
    parser.add_argument("--json", default=str(HERE / "last-run.json"), help="where to write the results")
    parser.add_argument("--map-only", action="store_true", help="only the batch (map) throughput rows")
    parser.add_argument("--map-inputs", type=int, default=20000, help="inputs of the batch rows (default 20,000)")
    parser.add_argument("--big", action="store_true", help="only the big-value rows (400 MB arrays, 300 MB frames)")
    parser.add_argument("--big-rounds", type=int, default=5, help="rounds of the big-value rows (default 5)")
    parser.add_argument(
        "--store-entries", type=int, help="entries of the big-store rows (default 10,000 quick, 100,000 full)"
    )
    parser.add_argument("--first-call", action="store_true", help="only the first call's cost (the code identity)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the first-call rows (default 5)")
    parser.add_argument("--compress", action="store_true", help="only compress= (off, zlib, lzma) on a text-heavy value")
    parser.add_argument("--atomic-only", metavar="DIR", help="only the atomic-write rows, written under DIR")
    args = parser.parse_args()
    if args.first_call:
        return main_first_call(args)
    if args.compress:
        return compress_only(5, args.json)
    if args.big:
        return main_big(args)
    if args.atomic_only:  # Judge a filesystem: a loop-mounted journaled ext4, XFS, ...
        print(f"machine: {machine()}\ndirectory: {args.atomic_only}")
        with tempfile.TemporaryDirectory(prefix="donecache-bench-", dir=args.atomic_only) as tmpdir:
            for label, r in bench_atomic(Path(tmpdir), {"4 KiB": (4096, 500), "1 MiB": (1 << 20, 40)}, rounds=7).items():
                print("\n".join(table(f"atomic write of {label} (median per write)", r)))
        return 0
    quick = args.quick
    if args.map_only:
        return map_only(args.map_inputs, args.json)
    for name, ok in have.items():
        if not ok:
            print(f"note: {name} is not installed; skipped (pip install -r benchmarks/requirements.txt)")
    started = time.time()
    results: dict[str, Any] = {"machine": machine(), "mode": "quick" if quick else "full", "python": sys.version}
    results["load_before"] = loadavg()
    print(f"machine: {results['machine']}\nmode: {results['mode']}\nload average before: {results['load_before']}")
    rounds = 5 if quick else 7
    with tempfile.TemporaryDirectory(prefix="donecache-bench-") as tmpdir:
        tmp = Path(tmpdir)
        with journaled_ext4(tmp) as (journaled, how):
            results["filesystems"] = {"temporary directory": filesystem(tmp)}
            small = tmp
            if journaled is not None:
                small = Path(tempfile.mkdtemp(prefix="donecache-bench-", dir=journaled))
                results["filesystems"]["journaled"] = f"{filesystem(small)}: {how}"
            else:
                results["filesystems"]["journaled"] = f"none: {how}"
            print("\n".join(f"{k}: {v}" for k, v in results["filesystems"].items()))
            memo = bench_hits_and_misses(small, n=300 if quick else 1000, rounds=rounds)
            results.update(memo)
            if journaled is not None:
                results["root_fs"] = bench_hits_and_misses(tmp, n=300 if quick else 1000, rounds=rounds)
            results["syscalls"] = count_syscalls(small, 200)
            results["bytes_per_entry"] = bytes_per_entry(small, 2000 if quick else 10000)
            results["big_store"] = bench_big_store(small, args.store_entries or (10_000 if quick else 100_000))
            # A cold batch creates an entry per call: on the root ext4 without a journal each new inode after the
            # deletions above costs ~0.5 ms of kernel time (issue 20), so the judged batch runs on the journaled
            # filesystem, and the root filesystem's figure (pool and donecache only) is shown beside it.
            results["map"] = bench_map(small, 4000 if quick else 20000)
            if journaled is not None:
                shutil.rmtree(small, ignore_errors=True)
        results["growth"] = bench_growth(tmp, [1000, 10000, 100000] + ([] if quick else [1000000]), rounds=3)
        results["processes"] = bench_processes(tmp, nproc=8, nkeys=30 if quick else 100, limit=20 if quick else 120)
        results["atomic"] = bench_atomic(
            tmp, {"4 KiB": (4096, 100 if quick else 500), "1 MiB": (1 << 20, 10 if quick else 40)}, rounds=rounds
        )
        if journaled is not None:
            results["map_root_fs"] = bench_map(tmp, 4000 if quick else 20000, peers=False)
        results["big_arguments"] = bench_big_arguments(tmp, rounds=3 if quick else 7)
    results["import"] = bench_imports(runs=10 if quick else 30)
    results["seconds"] = time.time() - started

    where = results["filesystems"]["journaled"] if "root_fs" in results else results["filesystems"]["temporary directory"]
    lines = table(f"memoize hit (median per call) on {where}", results["hit"])
    lines += table(f"memoize miss + store (median per call) on {where}", results["miss"])
    if "root_fs" in results:
        root_fs = results["filesystems"]["temporary directory"]
        lines += table(f"memoize hit (median per call) on {root_fs}", results["root_fs"]["hit"])
        lines += table(f"memoize miss + store (median per call) on {root_fs}", results["root_fs"]["miss"])
    if results["syscalls"]:
        lines.append("\nsystem calls per call (strace -f, all threads)")
        lines += [f"  {tool:28s} miss {r['miss']:5.1f}   hit {r['hit']:5.1f}" for tool, r in results["syscalls"].items()]
    lines.append("\nbytes on disk per small entry (an int result; blocks, directories included)")
    lines += [f"  {tool:28s} {b:>9,.0f} B" for tool, b in results["bytes_per_entry"].items()]
    big = results["big_store"]
    lines.append(f"\na store of {big['entries']:,} small entries")
    lines.append(f"  build {us(big['build_per_entry'])}/entry, hit {us(big['hit'])} (read), {us(big['hit_again'])} (again),"
                 f" miss {us(big['miss'])}, info {big['info']:.2f} s, prune {big['prune']:.2f} s")
    growth = results["growth"]["donecache"]
    lines.append("\ndonecache hit as the cache grows (median per call over 1,000 random keys)")
    lines += [f"  {int(size):>9,d} entries {us(t):>14s}" for size, t in growth.items()]
    lines.append(f"\n{8} processes, same slow function (10 ms) on shared keys")
    lines.append(
        f"  {'tool':12s} {'wall':>9s} {'calls/s':>9s} {'computations/key':>17s} {'lost':>5s} {'crashed':>8s} {'hung':>5s}"
    )
    for tool, r in results["processes"].items():
        lines.append(
            f"  {tool:12s} {r['seconds']:>8.2f}s {r['calls_per_s']:>9.0f} {r['computations_per_key']:>17.2f} "
            f"{r['entries_lost']:>5} {r['workers_failed']:>8d} {r['workers_hung']:>5d}"
        )
    for label, r in results["atomic"].items():
        lines += table(f"atomic write of {label} (median per write)", r)
    lines += table("import time in a fresh interpreter (median, minus `python -c pass`)", results["import"])
    lines.append("\nbig arguments (median hit; memory traced during one hit)")
    lines += [f"  {name:48s} {value * 1000:8.1f} ms" if "MiB" not in name else f"  {name:48s} {value:8.2f} MiB"
              for name, value in results["big_arguments"].items()]
    map_lines, map_targets = map_table(results["map"], 4000 if quick else 20000, where)
    lines += map_lines
    if "map_root_fs" in results:
        lines += map_table(results["map_root_fs"], 4000 if quick else 20000, results["filesystems"]["temporary directory"])[0]

    hit, miss, imp, atomic = results["hit"], results["miss"], results["import"], results["atomic"]["4 KiB"]
    targets = []
    if "diskcache" in hit:
        targets += [
            ("memoize hit <= 0.25x diskcache", hit["donecache"] / hit["diskcache"], 0.25),
            ("memoize miss+store <= 0.6x diskcache (journaled)", miss["donecache"] / miss["diskcache"], 0.6),
            ("import <= 0.2x diskcache", imp["donecache"] / imp["diskcache"], 0.2),
        ]
    if results["syscalls"]:
        targets.append(("system calls per miss <= 12", results["syscalls"]["donecache"]["miss"], 12))
    targets.append(("hit at 100k / hit at 1k <= 1.5", growth["100000"] / growth["1000"], 1.5))
    targets.append(("100 MB bytes argument hit <= 0.1 s", results["big_arguments"]["100 MB bytes argument: hit"], 0.1))
    targets.append(("hit with max_bytes <= 1.2x hit without", hit[MAX_BYTES] / hit["donecache"], 1.2))
    if "atomicwrites" in atomic:
        targets.append(
            ("durable 4 KiB write <= 1.1x atomicwrites", atomic["donecache durable"] / atomic["atomicwrites"], 1.1)
        )
    # Since 0.3.0 durable=False fsyncs the file (not its directory), so that a power cut
    # leaves the old or the new file, never an empty one: compare with write + fsync.
    targets.append(
        (
            "non-durable 4 KiB write <= 1.5x plain write + fsync",
            atomic["donecache non-durable"] / atomic["plain write + fsync"],
            1.5,
        )
    )
    lines.append("\ntargets")
    results["targets"] = {}
    # Ceilings (lower is better) first, then the batch targets, which are floors.
    checks = [(name, value, limit, value <= limit) for name, value, limit in targets]
    checks += [(name, value, lowest, value >= lowest) for name, value, lowest in map_targets]
    for name, value, limit, ok in checks:
        results["targets"][name] = {"value": value, "limit": limit, "holds": ok}
        lines.append(f"  {'HOLDS' if ok else 'FAILS'}  {name:44s} measured {value:.2f}")
    results["load_after"] = loadavg()
    lines.append(f"\n(run took {results['seconds']:.0f} s; load average {results['load_before']} before, "
                 f"{results['load_after']} after: ratios from a loaded machine are not judgements)")
    print("\n".join(lines))
    Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"results written to {args.json}")
    try:
        _plot(results, Path(args.json).with_suffix(".png"))
    except ImportError:
        pass
    return 0


def main_big(args: Any) -> int:
    if not (have["joblib"] and have["diskcache"]):
        print("note: the big-value rows compare with joblib and diskcache; install them first")
    started = time.time()
    results: dict[str, Any] = {"machine": machine(), "mode": "big", "python": sys.version, "load_before": loadavg()}
    print(f"machine: {results['machine']}\nmode: big values, {args.big_rounds} rounds, fresh processes, medians")
    print(f"load average before: {results['load_before']}")
    with tempfile.TemporaryDirectory(prefix="donecache-bench-", dir=os.environ.get("BENCH_TMP")) as tmpdir:
        results["filesystems"] = {"big values": filesystem(Path(tmpdir))}
        print(f"big values written on: {results['filesystems']['big values']} (BENCH_TMP chooses)")
        results["big"] = bench_big(Path(tmpdir), args.big_rounds)
        results["info"] = bench_info(Path(tmpdir), entries=6)
    lines = []
    for workload, r in results["big"].items():
        lines.append(f"\n{workload} ({r['size'] / 1e6:.0f} MB)")
        lines.append(
            f"  {'tool':16s} {'miss':>9s} {'hit':>9s} {'miss peak':>10s} {'hit peak':>9s} {'1st call':>9s}"
            "  (peak: x the value; 1st call: a small call before, results only)"
        )
        for tool, m in r.items():
            if tool != "size":
                lines.append(
                    f"  {tool:16s} {m['miss'] * 1e3:>7.0f}ms {m['hit'] * 1e3:>7.1f}ms {m['miss_peak']:>9.2f}x "
                    f"{m['hit_peak']:>8.2f}x {m['first_call'] * 1e3:>7.0f}ms"
                )
        if "joblib" in r:
            lines.append(
                f"  donecache/joblib: miss {r['donecache']['miss'] / r['joblib']['miss']:.2f}x, "
                f"hit {r['donecache']['hit'] / r['joblib']['hit']:.2f}x"
            )
    big, targets = results["big"], []
    if "joblib" in big.get("array result", {}):
        for workload, phase, limit in (("array result", "hit", 0.9), ("array result", "miss", 1.0),
                                       ("frame result", "hit", 1.0), ("frame result", "miss", 1.0)):
            r = big[workload]
            targets.append((f"{workload} {phase} <= {limit}x joblib", r["donecache"][phase] / r["joblib"][phase], limit))
    lines.append("\ntargets")
    results["targets"] = {}
    for name, value, limit in targets:
        results["targets"][name] = {"value": value, "limit": limit, "holds": value <= limit}
        lines.append(f"  {'HOLDS' if value <= limit else 'FAILS'}  {name:44s} measured {value:.2f}")
    info = results["info"]
    lines.append(f"\ninspection of a cache of {info['cache_bytes'] / 1e9:.1f} GB (another function's values)")
    for what in ("info", "cache_info", "cache_clear"):
        lines.append(f"  {what:12s} read {info[what]['bytes_read']:>10,d} bytes in {info[what]['seconds'] * 1e3:.1f} ms")
    results["seconds"] = time.time() - started
    results["load_after"] = loadavg()
    lines.append(f"\n(run took {results['seconds']:.0f} s; load average {results['load_before']} before, {results['load_after']} after)")
    print("\n".join(lines))
    path = Path(args.json).with_name("big-run.json") if args.json == str(HERE / "last-run.json") else Path(args.json)
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"results written to {path}")
    return 0


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, op in zip(axes, ("hit", "miss")):
        names = list(results[op])
        ax.barh(names, [results[op][n] * 1e6 for n in names])
        ax.set_xscale("log")
        ax.set_xlabel("microseconds per call (log)")
        ax.set_title(f"memoize {op}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot written to {path}")


if __name__ == "__main__":
    sys.exit(main())
