# SPDX-License-Identifier: MIT
# SPDX-FileCopyrightText: 2026 The donecache developers
#
# MIT License
#
# Copyright (c) 2026 The donecache developers
#
# Permission is hereby granted, free of charge, to any person obtaining a copy
# of this software and associated documentation files (the "Software"), to deal
# in the Software without restriction, including without limitation the rights
# to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
# copies of the Software, and to permit persons to whom the Software is
# furnished to do so, subject to the following conditions:
#
# The above copyright notice and this permission notice shall be included in all
# copies or substantial portions of the Software.
#
# THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
# IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
# FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
# AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
# LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
# OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
# SOFTWARE.
"""Resumable, crash-safe pipelines in one standard-library module.

A ten-line tour::

    import donecache

    with donecache.atomic_write("report.csv") as f:      # old file or new, never torn
        f.write(render())

    with donecache.done_dir("out/parsed", version=2) as stage:
        if not stage.done:                                 # finished earlier? skip
            for rec in records:                            # pieces survive a crash
                stage.piece(f"{rec.id}.json", lambda: parse(rec))

    @donecache.memoize(ttl=3600)                           # on disk, across processes
    def transform(record): ...

Cache entries are pickles: never open a cache directory that someone you do not
trust can write to. See README.md for the whole story.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "atomic_write",
    "atomic_path",
    "done_dir",
    "is_done",
    "mark_not_done",
    "Stage",
]

import contextlib
import errno
import json
import os
import socket
import stat
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, ContextManager, Iterator, Literal, Union, overload

StrPath = Union[str, "os.PathLike[str]"]

# ---------------------------------------------------------------------------
# 3. Platform primitives
#
# Every difference between operating systems lives here, as one set of private
# names defined per platform. Nothing below this section asks which OS it runs on.
# ---------------------------------------------------------------------------

# O_EXCL makes creation fail if the name exists (even as a dangling symlink, per
# open(2)), so a temporary file is always ours. O_NOFOLLOW is belt and braces.
_CREATE_FLAGS = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)

if sys.platform == "win32":  # pragma: no cover - CI proves Linux only
    import msvcrt

    # os.fsync() on Windows needs a descriptor open for writing.
    _SYNC_FLAGS = os.O_RDWR | os.O_BINARY
    # A byte offset that msvcrt.locking() can seek to on every Windows build.
    _LOCK_SPAN = 2**31 - 1

    def _fsync_file(fd: int) -> None:
        os.fsync(fd)  # _commit(): flushes the file's data and metadata.

    def _fsync_dir(path: str) -> None:
        # Windows cannot open a directory for flushing; NTFS journals the rename.
        pass

    def _replace(src: str, dst: str) -> None:
        # os.replace fails with a sharing violation (PermissionError) while any
        # process (a virus scanner, an indexer, a reader) has the target open.
        # Such handles are usually short-lived, so retry for about a second.
        delay = 0.001
        while True:
            try:
                os.replace(src, dst)
                return
            except PermissionError:
                if delay > 0.5:
                    raise
                time.sleep(delay)
                delay *= 2

    def _move_new(src: str, dst: str) -> None:
        os.rename(src, dst)  # On Windows rename refuses to replace: no clobbering.

    def _keep_mode(fd: int, mode: int) -> None:
        pass  # Windows files carry only a read-only flag, not POSIX permission bits.

    # A handle's locks belong to that handle, so whole-file locks (offset None)
    # are simply byte 0.
    def _try_lock(fd: int, offset: int | None) -> bool:
        os.lseek(fd, offset or 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _wait_lock(fd: int, offset: int | None) -> None:
        # msvcrt's blocking mode gives up after ten seconds, so poll instead.
        delay = 0.001
        while not _try_lock(fd, offset):
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _unlock(fd: int, offset: int | None) -> None:
        os.lseek(fd, offset or 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    _SYNC_FLAGS = _READ_FLAGS
    _LOCK_SPAN = 2**62
    # macOS: fsync(2) only hands data to the drive, whose cache may lose it on
    # power failure; F_FULLFSYNC asks the drive to flush (see fcntl(2) on macOS).
    _F_FULLFSYNC: int | None = getattr(fcntl, "F_FULLFSYNC", None)
    # Filesystems that cannot fsync a directory say so with these: CIFS, some FUSE
    # and VirtualBox shares give EINVAL (python-atomicwrites issue #27).
    _NO_DIR_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}

    def _fsync_file(fd: int) -> None:
        if _F_FULLFSYNC is not None:
            try:
                fcntl.fcntl(fd, _F_FULLFSYNC)
                return
            except OSError:  # Not every filesystem supports it; fsync still helps.
                pass
        os.fsync(fd)

    def _fsync_dir(path: str) -> None:
        # A rename is durable only once its directory is flushed (fsync(2), "Calling
        # fsync() does not necessarily ensure that the entry in the directory
        # containing the file has also reached disk").
        try:
            fd = os.open(path or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError as exc:
            if exc.errno in _NO_DIR_FSYNC or exc.errno == errno.EACCES:
                return
            raise
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in _NO_DIR_FSYNC:
                raise
        finally:
            os.close(fd)

    _replace = os.replace

    def _move_new(src: str, dst: str) -> None:
        # link(2) fails with EEXIST if dst exists, atomically, so a file that
        # appeared meanwhile is never clobbered. Filesystems without hard links
        # (FAT, some SMB mounts) fall back to check-then-rename, which has a tiny
        # window in which a concurrent creator can lose; the README says so.
        try:
            os.link(src, dst)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            if os.path.lexists(dst):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from None
            os.rename(src, dst)
        else:
            os.unlink(src)

    def _keep_mode(fd: int, mode: int) -> None:
        os.fchmod(fd, mode)

    # Two kinds of lock. Whole-file locks (offset None) use flock(2): they belong
    # to the open file description, so code that opens and closes the same file
    # (a user hashing every file of a stage) cannot release them by accident.
    # Per-key locks need many independent locks in one file, which only POSIX
    # record locks (fcntl(2) F_SETLK) give; they belong to the process, and
    # donecache alone opens the file that holds them. Both work over NFS (Linux
    # emulates flock there with record locks; see flock(2), "NFS details").
    def _try_lock(fd: int, offset: int | None) -> bool:
        try:
            if offset is None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        return True

    def _wait_lock(fd: int, offset: int | None) -> None:
        # Both calls block with the GIL released; a signal interrupts them (PEP 475).
        if offset is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, offset)

    def _unlock(fd: int, offset: int | None) -> None:
        if offset is None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        else:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset)


class _KeyLock:
    """An exclusive lock on one byte of a lock file, between processes and threads.

    Record locks belong to a process, not to a descriptor: two threads of one
    process never exclude each other, and closing *any* descriptor of the file
    drops every lock the process holds on it (fcntl(2), "Record locking"). So a
    process opens each lock file once, counts its users and closes it only when
    none is left, and its threads queue on a threading.Lock per byte first.
    The kernel drops the locks of a process that dies, even by SIGKILL, so a
    crashed holder never blocks anyone for long.

    ``path`` must be canonical (os.path.realpath): two names for one file would
    mean two descriptors, and closing one would silently release the other.
    """

    # All state is per process; a forked child starts afresh (see _state()).
    _guard = threading.Lock()
    _pid = -1
    _files: dict[str, list[int]] = {}  # path -> [fd, users]
    _threads: dict[tuple[str, int | None], list[Any]] = {}  # (path, offset) -> [Lock, users, owner]

    def __init__(self, path: str, offset: int | None = None) -> None:
        self.path = path
        self.offset = None if offset is None else offset % _LOCK_SPAN
        self._fd = -1

    @classmethod
    def _state(cls) -> None:
        # Called under _guard. After fork(2) the child holds no record locks and
        # none of the parent's threads, so inherited bookkeeping is void.
        if cls._pid != os.getpid():
            cls._pid = os.getpid()
            cls._files = {}
            cls._threads = {}

    def acquire(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        key = (self.path, self.offset)
        me = threading.get_ident()
        with self._guard:
            self._state()
            slot = self._threads.setdefault(key, [threading.Lock(), 0, None])
            if slot[2] == me:
                raise RuntimeError(
                    f"this thread already holds the lock {self.path}; "
                    "re-entering it would wait forever"
                )
            slot[1] += 1
        try:
            if not slot[0].acquire(timeout=-1 if deadline is None else max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"timed out after {timeout} s waiting for the lock {self.path}")
            try:
                self._fd = self._open_file()
                try:
                    self._lock_range(deadline, timeout)
                except BaseException:
                    self._close_file()
                    raise
            except BaseException:
                slot[0].release()
                raise
        except BaseException:
            with self._guard:
                self._drop_slot(key, slot)
            raise
        slot[2] = me

    def _lock_range(self, deadline: float | None, timeout: float | None) -> None:
        if deadline is None:
            _wait_lock(self._fd, self.offset)
            return
        delay = 0.001
        while not _try_lock(self._fd, self.offset):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {timeout} s waiting for the lock {self.path}")
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.05)

    def release(self) -> None:
        key = (self.path, self.offset)
        try:
            _unlock(self._fd, self.offset)
        finally:
            self._close_file()
            with self._guard:
                slot = self._threads[key]
                slot[2] = None
                slot[0].release()
                self._drop_slot(key, slot)

    def _drop_slot(self, key: tuple[str, int | None], slot: list[Any]) -> None:
        slot[1] -= 1
        if slot[1] == 0 and self._threads.get(key) is slot:
            del self._threads[key]

    def _open_file(self) -> int:
        with self._guard:
            entry = self._files.get(self.path)
            if entry is None:
                flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
                entry = self._files[self.path] = [os.open(self.path, flags, 0o666), 0]
            entry[1] += 1
            return entry[0]

    def _close_file(self) -> None:
        with self._guard:
            entry = self._files[self.path]
            entry[1] -= 1
            if entry[1] == 0:
                del self._files[self.path]
                os.close(entry[0])
        self._fd = -1

    def __enter__(self) -> _KeyLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _reraise_about(exc: OSError, path: str, doing: str, fix: str = "") -> OSError:
    """The same kind of OSError, with a message that names the user's path and the fix."""
    reason = exc.strerror or str(exc)
    message = f"cannot {doing} {path!r}: {reason}" + (f"; {fix}" if fix else "")
    new = type(exc)(exc.errno, message) if exc.errno is not None else type(exc)(message)
    new.filename = path
    return new


# ---------------------------------------------------------------------------
# 4. Atomic writes
#
# A new version is written to a temporary file beside the target and renamed over
# it: rename(2) replaces a name atomically, so a reader sees the old file or the
# new one, whatever happens to the writer. Everything else that donecache writes
# (stage markers and pieces, cache entries) goes through _create_temp/_commit.
# ---------------------------------------------------------------------------

_WRITE_MODES = ("w", "wt", "wb")
# Temporary names start with a dot (hidden from ls and glob.glob), carry a marker
# that `prune` recognises, and end with the target's own name so that libraries
# which pick a format from the suffix (numpy.save, PIL, pandas' compression) see it.
_TEMP_PREFIX = ".dc~"
_TEMP_TOKEN = 16  # hex digits of randomness


def _is_temp_name(name: str) -> bool:
    return (
        name.startswith(_TEMP_PREFIX)
        and len(name) > len(_TEMP_PREFIX) + _TEMP_TOKEN
        and name[len(_TEMP_PREFIX) + _TEMP_TOKEN] == "~"
    )


def _temp_name(target: str) -> str:
    head, base = os.path.split(target)
    # Keep the name under NAME_MAX (255 on most filesystems) by trimming the front.
    return os.path.join(head, f"{_TEMP_PREFIX}{os.urandom(_TEMP_TOKEN // 2).hex()}~{base[-200:]}")


def _create_temp(target: str, mode: int | None = None) -> tuple[int, str]:
    """Create a new temporary file beside ``target``; return (fd, path).

    A new file gets 0o666 filtered by the process umask, as open() would give it;
    ``mode`` (an existing target's permission bits) is applied exactly instead.
    The umask is never read by changing it: that is racy in threaded programs.
    """
    while True:
        temp = _temp_name(target)
        try:
            fd = os.open(temp, _CREATE_FLAGS, 0o666)
        except FileExistsError:  # 64 random bits collided: astonishing, but harmless.
            continue
        if mode is not None:
            try:
                _keep_mode(fd, mode)
            except BaseException:
                os.close(fd)
                _discard(temp)
                raise
        return fd, temp


def _commit(temp: str, target: str, *, durable: bool, overwrite: bool) -> None:
    """Move a finished, closed temporary file onto ``target``."""
    if overwrite:
        _replace(temp, target)
    else:
        _move_new(temp, target)
    if durable:
        _fsync_dir(os.path.dirname(target))


def _discard(temp: str) -> None:
    # Cleanup must never mask the error that made it necessary.
    try:
        os.unlink(temp)
    except OSError:
        pass


def _write_bytes(target: str, data: bytes, *, durable: bool, overwrite: bool = True) -> None:
    """Atomically make ``target`` hold ``data``: the writer behind markers, pieces and entries."""
    fd, temp = _create_temp(target)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            _fsync_file(fd)
        os.close(fd)
        fd = -1
        _commit(temp, target, durable=durable, overwrite=overwrite)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        _discard(temp)
        raise


def _prepare_target(path: StrPath, *, overwrite: bool, make_parents: bool) -> tuple[str, int | None]:
    """Check a user's target path; return (real target, permission bits to keep or None)."""
    target = os.fspath(path)
    if not isinstance(target, str):
        raise TypeError(f"path must be str or os.PathLike[str], not {type(path).__name__}")
    # Symlink policy: writing through a link replaces the file it points to and
    # leaves the link alone, as open(path, "w") would.
    if os.path.islink(target):
        target = os.path.realpath(target)
    try:
        st = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):  # The parent checks below explain which.
        st = None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(
                errno.EISDIR, f"cannot write {target!r}: it is a directory; choose a file path inside it", target
            )
        if not overwrite:
            raise FileExistsError(
                errno.EEXIST, f"{target!r} already exists and overwrite=False; remove it or pass overwrite=True", target
            )
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(parent):
        if os.path.exists(parent):
            raise NotADirectoryError(errno.ENOTDIR, f"cannot write {target!r}: {parent!r} is not a directory", target)
        if not make_parents:
            raise FileNotFoundError(
                errno.ENOENT,
                f"cannot write {target!r}: its directory {parent!r} does not exist; "
                "create it first or pass make_parents=True",
                target,
            )
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise _reraise_about(exc, target, "create the parent directories of") from exc
    return target, (stat.S_IMODE(st.st_mode) & 0o777 if st is not None else None)


def _create_temp_for(target: str, keep_mode: int | None) -> tuple[int, str]:
    try:
        return _create_temp(target, keep_mode)
    except OSError as exc:
        raise _reraise_about(
            exc, target, "write", "the directory must be writable to create a temporary file beside the target"
        ) from exc


@contextlib.contextmanager
def _atomic_write(
    path: StrPath,
    mode: str,
    encoding: str | None,
    newline: str | None,
    durable: bool,
    overwrite: bool,
    make_parents: bool,
) -> Iterator[IO[Any]]:
    if mode not in _WRITE_MODES:
        raise ValueError(f"atomic_write() mode must be one of {', '.join(map(repr, _WRITE_MODES))}, not {mode!r}")
    if "b" in mode and (encoding is not None or newline is not None):
        raise ValueError("atomic_write() takes encoding= and newline= only in text mode ('w')")
    target, keep_mode = _prepare_target(path, overwrite=overwrite, make_parents=make_parents)
    fd, temp = _create_temp_for(target, keep_mode)
    try:
        file = open(fd, mode, encoding=encoding, newline=newline)
    except BaseException:
        os.close(fd)
        _discard(temp)
        raise
    try:
        with file:
            yield file
            file.flush()
            if durable:
                _fsync_file(file.fileno())
        _commit(temp, target, durable=durable, overwrite=overwrite)
    except BaseException:
        _discard(temp)  # The with-block above has closed the file already.
        raise


@overload
def atomic_write(
    path: StrPath,
    mode: Literal["w", "wt"] = "w",
    *,
    encoding: str | None = None,
    newline: str | None = None,
    durable: bool = True,
    overwrite: bool = True,
    make_parents: bool = False,
) -> ContextManager[IO[str]]: ...

@overload
def atomic_write(
    path: StrPath,
    mode: Literal["wb"],
    *,
    encoding: None = None,
    newline: None = None,
    durable: bool = True,
    overwrite: bool = True,
    make_parents: bool = False,
) -> ContextManager[IO[bytes]]: ...


def atomic_write(
    path: StrPath,
    mode: str = "w",
    *,
    encoding: str | None = None,
    newline: str | None = None,
    durable: bool = True,
    overwrite: bool = True,
    make_parents: bool = False,
) -> ContextManager[IO[Any]]:
    """Write a file so that readers see the old version or the whole new one.

    Use it as ``with atomic_write(path) as f: f.write(...)``. The file is written
    under a temporary name in the same directory and renamed over ``path`` when
    the block ends. If the block raises (KeyboardInterrupt included), or the
    disk fills up, the temporary file is removed, ``path`` is untouched and the
    original exception propagates.

    mode: ``"w"`` (text) or ``"wb"`` (binary). ``encoding`` and ``newline`` work
        as for open() in text mode.
    durable: flush the file and its directory to stable storage (fsync) before
        returning, so that the new version also survives a power failure.
        ``False`` is several times faster and still atomic against crashes.
    overwrite: if False, raise FileExistsError when ``path`` exists, and never
        clobber a file that appears while the block runs.
    make_parents: create missing parent directories instead of raising
        FileNotFoundError.

    A new file gets mode 0o666 less the umask; an existing file keeps its
    permission bits. A symlink at ``path`` is followed: its target is replaced.
    """
    return _atomic_write(path, mode, encoding, newline, durable, overwrite, make_parents)


@contextlib.contextmanager
def atomic_path(
    path: StrPath, *, durable: bool = True, overwrite: bool = True, make_parents: bool = False
) -> Iterator[Path]:
    """Yield a temporary path for a library that writes files itself.

    ``with atomic_path("x.npy") as tmp: numpy.save(tmp, array)``. The yielded
    :class:`pathlib.Path` does not exist yet; it lies in the same directory and
    ends with the target's name, so suffix-sniffing libraries choose the right
    format. When the block ends the file is renamed onto ``path``; if the block
    raises, the file is removed and ``path`` is untouched. The options are those
    of :func:`atomic_write`. It raises FileNotFoundError if the block did not
    create the file.
    """
    target, keep_mode = _prepare_target(path, overwrite=overwrite, make_parents=make_parents)
    # Reserve a name the way atomic_write does, then free it for the library.
    fd, temp = _create_temp_for(target, None)
    os.close(fd)
    os.unlink(temp)
    try:
        yield Path(temp)
        if not os.path.isfile(temp):
            raise FileNotFoundError(
                errno.ENOENT,
                f"atomic_path({target!r}): the block did not create a file at the temporary path {temp!r}",
                temp,
            )
        if keep_mode is not None or durable:
            fd = os.open(temp, _SYNC_FLAGS)
            try:
                if keep_mode is not None:
                    _keep_mode(fd, keep_mode)
                if durable:
                    _fsync_file(fd)
            finally:
                os.close(fd)
        _commit(temp, target, durable=durable, overwrite=overwrite)
    except BaseException:
        _discard(temp)
        raise


# ---------------------------------------------------------------------------
# 5. Stage directories
#
# A stage is a directory filled piece by piece; its marker file says that the
# whole stage finished. The marker is written last, with the atomic writer, so
# it exists only if every piece before it does. While a stage is being built, a
# record lock on a hidden file inside it keeps other processes out.
# ---------------------------------------------------------------------------

_STAGE_LOCK = ".donecache.lock"


def _marker_path(directory: StrPath, marker: str) -> str:
    if not marker or os.path.basename(marker) != marker or marker in (".", "..", _STAGE_LOCK):
        raise ValueError(f"marker must be a plain file name such as 'DONE' or '_SUCCESS', not {marker!r}")
    return os.path.join(os.fspath(directory), marker)


def _read_marker(path: str) -> dict[str, Any] | None:
    """The marker's metadata: {} for an empty or foreign marker, None if it is missing."""
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _marker_counts(path: str, version: str | int | None) -> bool:
    if version is None:
        try:
            return stat.S_ISREG(os.stat(path).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False
    info = _read_marker(path)
    return info is not None and "version" in info and info["version"] == version


def is_done(directory: StrPath, *, version: str | int | None = None, marker: str = "DONE") -> bool:
    """True if the stage in ``directory`` finished: its marker is a regular file.

    With ``version``, the marker must also record that same version; a marker
    from an older version of your code, or one written by another tool (an
    empty ``_SUCCESS``, say), then counts as not done. Without it, this is a
    single stat(2), cheap enough to call for thousands of stages.
    """
    return _marker_counts(_marker_path(directory, marker), version)


def mark_not_done(directory: StrPath, *, marker: str = "DONE") -> bool:
    """Remove the stage's marker so that the next run rebuilds it; its pieces stay.

    Returns True if there was a marker to remove.
    """
    try:
        os.unlink(_marker_path(directory, marker))
    except FileNotFoundError:
        return False
    return True


class Stage:
    """What :func:`done_dir` yields: the stage's directory and whether it is done.

    ``done`` is checked while holding the stage's lock, so after waiting for
    another process that was building the same stage it says True, and the
    body should skip the work.
    """

    def __init__(self, path: Path, done: bool, marker: str) -> None:
        self.path = path
        self.done = done
        self.marker = marker

    def __repr__(self) -> str:
        return f"Stage({str(self.path)!r}, done={self.done})"

    def _piece_path(self, name: StrPath) -> Path:
        rel = os.fspath(name)
        parts = Path(rel).parts
        if (
            not rel
            or os.path.isabs(rel)
            or ".." in parts
            or parts[0] in (self.marker, _STAGE_LOCK)
            or any(_is_temp_name(p) for p in parts)
        ):
            raise ValueError(
                f"piece name {rel!r} must be a relative path inside the stage, "
                f"and not its marker {self.marker!r} or lock file"
            )
        return self.path / rel

    def has(self, name: StrPath) -> bool:
        """True if the piece ``name`` exists (a file written by this or an earlier run)."""
        return self._piece_path(name).exists()

    def piece(self, name: StrPath, make: Callable[[], str | bytes]) -> Path:
        """Write one piece unless an earlier run already wrote it; return its path.

        ``make()`` is called only when the piece is missing. A str is written
        as UTF-8 and bytes as they are, atomically, so an interrupted run never
        leaves a torn piece that a rerun would trust. Names may contain
        subdirectories (``"shard-3/42.json"``).
        """
        path = self._piece_path(name)
        if path.exists():
            return path
        data = make()
        if isinstance(data, str):
            data = data.encode("utf-8")
        elif not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"make() for piece {os.fspath(name)!r} must return str or bytes, not {type(data).__name__}")
        path.parent.mkdir(parents=True, exist_ok=True)
        # Not fsynced one by one: done_dir flushes the whole stage once, before its marker.
        _write_bytes(str(path), bytes(data), durable=False)
        return path


def _remove_litter(root: str) -> None:
    """Remove the temporary files that crashed writers left anywhere below ``root``."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            if _is_temp_name(name):
                _discard(os.path.join(dirpath, name))


def _empty_directory(root: str, keep: tuple[str, ...]) -> None:
    import shutil  # Only the fresh=True path needs it.

    for entry in os.scandir(root):
        if entry.name in keep:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def _flush_tree(root: str) -> None:
    """fsync every file and directory below ``root``: the stage's pieces reach disk before its marker."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            if name == _STAGE_LOCK and dirpath == root:
                continue  # Nothing to flush, and on NFS closing it would drop our lock.
            try:
                fd = os.open(os.path.join(dirpath, name), _SYNC_FLAGS)
            except OSError:
                continue  # Unreadable or vanished: nothing of ours to flush.
            try:
                _fsync_file(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


@contextlib.contextmanager
def done_dir(
    directory: StrPath,
    *,
    version: str | int | None = None,
    marker: str = "DONE",
    fresh: bool = False,
    durable: bool = True,
    timeout: float | None = None,
) -> Iterator[Stage]:
    """Build a stage directory that is marked done only once all of it is written.

    ::

        with done_dir("out/parsed", version=2) as stage:
            if not stage.done:
                for rec in records:
                    stage.piece(f"{rec.id}.json", lambda: parse(rec))

    The directory is created with its parents. While the block runs, the stage
    is locked against other processes and threads building it; one that
    waited finds ``stage.done`` True when the first finished it. When the
    block ends normally, the marker file (``marker``, default ``DONE``) is
    written atomically with JSON metadata: times, host, pid, donecache's
    version and ``version``. If the block raises or the process dies, no
    marker is written and the pieces stay, so the next run resumes.

    version: a str or int naming your code's or data's version; a stage whose
        marker records another version counts as not done, and its stale marker
        is removed before rebuilding.
    fresh: when the stage is not done, empty the directory first instead of
        resuming from the pieces of an earlier run.
    durable: fsync every file of the stage before writing the marker, so that
        the marker never survives a power failure that its pieces did not.
    timeout: seconds to wait for another builder before TimeoutError.
    """
    root = os.path.abspath(os.fspath(directory))
    marker_file = _marker_path(root, marker)
    if os.path.exists(root) and not os.path.isdir(root):
        raise NotADirectoryError(
            errno.ENOTDIR, f"stage {root!r} is a file, not a directory; move it away or choose another path", root
        )
    try:
        os.makedirs(root, exist_ok=True)
        lock = _KeyLock(os.path.join(os.path.realpath(root), _STAGE_LOCK))
        lock.acquire(timeout)
    except OSError as exc:
        if isinstance(exc, TimeoutError):
            raise TimeoutError(f"stage {root!r}: {exc}") from None
        raise _reraise_about(exc, root, "create or lock the stage directory", "check its permissions and path") from exc
    try:
        done = _marker_counts(marker_file, version)
        if not done:
            if os.path.lexists(marker_file):
                os.unlink(marker_file)  # Stale: it must not count while we rebuild.
            if fresh:
                _empty_directory(root, keep=(_STAGE_LOCK,))
            else:
                _remove_litter(root)
        started = time.time()
        yield Stage(Path(root), done, marker)
        if not done:
            if durable:
                _flush_tree(root)
            finished = time.time()
            metadata = {
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(finished)),
                "duration_s": round(finished - started, 6),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "donecache": __version__,
                "version": version,
            }
            _write_bytes(marker_file, json.dumps(metadata, indent=1).encode("utf-8") + b"\n", durable=durable)
    finally:
        lock.release()
