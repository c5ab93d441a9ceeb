# SPDX-License-Identifier: MIT
"""Print what a filesystem does with the calls donecache depends on (for docs/filesystems.md).

Usage: python .ci/fs_probe.py DIRECTORY  (a scratch directory on the filesystem to probe).
"""
from __future__ import annotations

import errno
import os
import sys
import tempfile


def attempt(what: str, action) -> None:
    try:
        result = action()
        print(f"  {what}: ok{'' if result is None else f' ({result})'}")
    except OSError as exc:
        print(f"  {what}: {errno.errorcode.get(exc.errno, exc.errno)} ({exc.strerror})")


def main() -> None:
    top = tempfile.mkdtemp(prefix="probe-", dir=sys.argv[1])
    p = lambda *names: os.path.join(top, *names)  # noqa: E731
    for name in ("file", "small", "big"):
        with open(p(name), "wb") as f:
            f.write({"file": b"x", "small": b"x" * 100, "big": b"x" * 5000}[name])
    os.mkdir(p("empty"))
    os.mkdir(p("full"))
    open(p("full", "inside"), "wb").close()
    os.mkdir(p("dir"))
    print(f"{sys.argv[1]}:")
    attempt("rename a file over a directory", lambda: os.rename(p("file"), p("empty")))
    attempt("rename a directory over a file", lambda: os.rename(p("dir"), p("small")))
    attempt("rename a directory over a non-empty one", lambda: os.rename(p("dir"), p("full")))
    attempt("rename a directory over an empty one", lambda: os.rename(p("dir"), p("empty")))

    def tmpfile() -> None:
        fd = os.open(top, os.O_TMPFILE | os.O_WRONLY, 0o600)
        os.close(fd)

    attempt("O_TMPFILE", tmpfile)

    def fsync_dir() -> None:
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    attempt("fsync of a directory", fsync_dir)
    attempt("hard link (overwrite=False)", lambda: os.link(p("small"), p("linked")))
    attempt(
        "disk bytes (st_blocks * 512) of 100 B / 5000 B files",
        lambda: f"{os.stat(p('small')).st_blocks * 512} / {os.stat(p('big')).st_blocks * 512}",
    )

    def grain() -> str:
        os.utime(p("big"), ns=(1, 1_000_000_123))
        return f"mtime kept to {os.stat(p('big')).st_mtime_ns % 1000} ns of 123"

    attempt("nanosecond mtimes", grain)


if __name__ == "__main__":
    main()
