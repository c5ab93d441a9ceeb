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
