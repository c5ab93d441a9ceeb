# SPDX-License-Identifier: MIT
"""A user's script, type-checked by CI against the installed wheel (`pip install .`).

mypy --strict and pyright must accept it, and must reject it once CI appends a
line with a deliberate type error: proof that they read donecache's own types,
not an Any from an untyped import.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import donecache


@donecache.memoize("typed-user-cache", ttl=datetime.timedelta(hours=1), ignore=("verbose",))
def square(x: int, verbose: bool = False) -> int:
    return x * x


def main() -> None:
    total: int = square(3) + square.refresh(4)
    cached: bool = square.is_cached(3)
    info: donecache.CacheInfo = square.cache_info()
    batch: donecache.BatchResult = square.map([1, 2], keep_going=True)
    failures: list[donecache.Failure] = batch.failures
    with donecache.disabled():
        square(5)
    with donecache.open(Path("typed-user-store"), "c", writeback=False) as db:
        db["total"] = total
    store: donecache.Store = donecache.open(b"typed-user-store", "r")
    store.close()
    with donecache.atomic_write("out.txt", encoding="utf-8") as f:
        f.write(f"{total} {cached} {info.hits} {len(failures)}\n")
    with donecache.atomic_path("out.bin") as tmp:
        tmp.write_bytes(b"")
    with donecache.done_dir("stage", version=2) as stage:
        if not stage.done:
            stage.piece("a.txt", lambda: "text")
    done: bool = donecache.is_done("stage", version=2)
    digest: str = donecache.file_digest(Path("out.txt"), quick=False)
    print(done, digest, donecache.__version__)


# The README's own examples, typed as a user would type them.
Record = dict[str, str]


@donecache.memoize("typed-user-cache", version=1, key=lambda record: record["id"])
def parse(record: Record) -> float:
    return float(record["amount"].replace(",", "."))


@donecache.memoize("typed-user-cache", compress="zlib")
def render(n: int) -> str:
    return "x" * n


def readme_examples(records: list[Record]) -> None:
    batch = parse.map(records, keep_going=True, workers=4)
    for failure in batch.failures:
        print(failure.index, failure.input, failure.exception, failure.traceback)
    rows: list[float] = batch.successes
    seconds: float = batch.computed_seconds + batch.saved_seconds
    print(rows, seconds, batch.summary, batch.computed, batch.reused, batch.done, batch.ok)
    for result in parse.imap(iter(records), keep_going=True):
        if isinstance(result, donecache.Failure):
            print(result.input, result.exception)
        else:
            print(result)
    for record in parse.failures():
        print(record.input, record.type, record.message, record.current)
    info = parse.cache_info()
    held: float = info.held_seconds + info.saved_seconds
    print(held, info._asdict(), parse.cache_parameters())
    trimmed: donecache.PruneReport = parse.prune(max_bytes=10 * 2**20, older_than=86400.0, dry_run=True)
    print(trimmed.evicted, trimmed.evicted_bytes)
    with donecache.open("typed-user-store", compress=True) as cache:
        if "key" not in cache:
            cache["key"] = render(3)
        value: object = cache["key"]
        removed: int = cache.prune(max_bytes=2**20)
        print(value, removed)
