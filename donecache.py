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

The module reads top to bottom, each section using only those above it: platform
primitives, basics, locks, atomic writes, stages, the entry format, the store
directory's data path and upkeep, the store, keys, code identity and memoize.
The core ends there; batches (f.map, f.imap) and the command line follow.

Cache entries are pickles: never open a cache directory that someone you do not
trust can write to. See README.md for the whole story.
"""

from __future__ import annotations

__all__ = ["atomic_write", "atomic_path", "done_dir", "is_done", "mark_not_done", "Stage", "open", "Store", "memoize",
           "file_digest", "disabled", "CacheInfo", "PruneReport", "DonecacheWarning", "BatchResult", "Failure",
           "FailureRecord", "Progress"]

__version__ = "0.3.0.dev0"

# One-off scripts pay for every import: only modules that the interpreter has loaded anyway (_collections_abc and
# _weakref: os and the startup load them) or that cost little are imported here. The rest (pickle and shelve alone
# cost 4 ms, with re and enum; struct and zlib load shared libraries: 60 system calls, about 0.4 ms) are imported
# where first needed, when a store is opened or a function decorated, in the caller's thread, never first on a hot
# path: a KeyboardInterrupt inside a first import can leave a half-made module behind (seen with inspect and json on
# CPython 3.9).
import _collections_abc
import _thread
import _weakref
import errno
import io
import os
import stat
import sys
import time

# typing costs more to import than all of the above; type checkers treat this name as True (mypy, pyright), and
# `overload` is a no-op at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import collections
    import pickle
    import shelve
    import struct
    import weakref
    import zlib
    from pathlib import Path
    from types import TracebackType
    from typing import IO, Any, Callable, Generator, Generic, Iterable, Iterator, NamedTuple, ParamSpec, TypeVar
    from typing import Union, overload

    StrPath = Union[str, os.PathLike[str]]
    _Version = Union[str, int, tuple[Union[str, int], ...]]  # Compared by _version_text().
    # What shelve.open() takes: bytes paths too (only donecache.open and Store do).
    AnyPath = Union[str, bytes, os.PathLike[str], os.PathLike[bytes]]
    _P = ParamSpec("_P")
    _R = TypeVar("_R")
    # A key= function, by its arity: with a union of fixed arities pyright's strict mode gives a lambda's parameters
    # a type (with Callable[..., Any] they stay Unknown, and `key=lambda record: record["id"]` is rejected).
    _KeyFunction = Union[Callable[[Any], object], Callable[[Any, Any], object], Callable[[Any, Any, Any], object],
                         Callable[[Any, Any, Any, Any], object]]
else:
    _P = _R = None

    class Generic:  # Subscripting it gives it back, as typing.Generic does for classes.
        def __class_getitem__(cls, params: object) -> type:
            return cls

    def overload(func):
        return func


# ---------------------------------------------------------------------------
# Platform primitives
#
# Every difference between operating systems lives here, as one set of private names defined per platform: file
# flags, flushing, renaming, permission bits, and _LockFile, a lock file whose locks belong to that one open handle.
# Nothing below this section asks which OS it runs on. What differs, and what is not run: docs/filesystems.md.
# ---------------------------------------------------------------------------

_CLOEXEC = getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# O_EXCL makes creation fail if the name exists (even as a dangling symlink, per open(2)), so a temporary file is
# always ours. O_NOFOLLOW is belt and braces.
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
_READ_FLAGS = os.O_RDONLY | _CLOEXEC
# Every file that donecache opens in place to write (lock files, .usage) is opened by _open_regular with these:
# created if missing, never through a symlink (a link planted at a stage's lock file made the holder's note empty
# its target: issue 18), never a FIFO or a device.
_WRITE_FLAGS = os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC
_KINDS = {stat.S_IFREG: "a regular file", stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO (named pipe)",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket",
          stat.S_IFLNK: "a symbolic link"}


def _delays() -> Iterator[float]:
    """The one backoff schedule for polling: 1 ms, doubling, capped at 50 ms."""
    delay = 0.001
    while True:
        yield delay
        delay = min(delay * 2, 0.05)


# NFS answers ESTALE when the file behind a name or a handle was replaced or removed by another host; the name,
# looked up again, leads to the new file. Linux retries a path lookup once by itself, but a read on a descriptor
# opened just before another host's rename still fails: the whole operation, from its open, is retried.
def _retry(operation: Callable[[], _R], errors: tuple[int, ...] = (errno.ESTALE,), tries: int = 5) -> _R:
    """operation(), run again (``tries`` times in all, with backoff) while it fails with one of ``errors``."""
    delays = None  # Made at the first failure: most operations succeed at once (a hit's read is one).
    for _ in range(tries - 1):
        try:
            return operation()
        except OSError as exc:
            if exc.errno not in errors:
                raise
        delays = delays or _delays()
        time.sleep(next(delays))
    return operation()


def _kind_of(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "a special file")


class _NotRegular(OSError):
    """Something other than a regular file stands where one was expected."""

    def __init__(self, path: str, st: os.stat_result) -> None:
        message = (f"{path!r} is {_kind_of(st.st_mode)}, not a regular file; donecache never writes through a link or "
                   "into a special file (one planted there could make it write elsewhere): remove it and run again")
        super().__init__(errno.EINVAL, message, path)
        self.stat = st


if sys.platform == "win32":  # pragma: no cover - CI proves Linux only
    import msvcrt

    _SYNC_FLAGS = os.O_RDWR | os.O_BINARY  # os.fsync() on Windows needs a descriptor open for writing.
    _LOCK_SPAN = 2**31 - 1  # A byte offset that msvcrt.locking() can seek to on every Windows build.

    _fsync_file = os.fsync  # _commit(): flushes the file's data and metadata.

    def _fsync_dir(path: str) -> None:
        pass  # Windows cannot open a directory for flushing; NTFS journals the rename.

    def _replace(src: str, dst: str) -> None:
        # os.replace fails with a sharing violation (PermissionError) while any process (a virus scanner, an
        # indexer, a reader) has the target open. Such handles are usually short-lived: retry for about a second
        # (26 tries: 63 ms of doubling delays, then 50 ms each).
        _retry(lambda: os.replace(src, dst), (errno.EACCES, errno.EPERM), 26)

    _move_new = os.rename  # On Windows rename refuses to replace: no clobbering.

    def _keep_mode(fd: int, mode: int) -> None:
        pass  # Windows files carry only a read-only flag, not POSIX permission bits.

    def _touch(fd: int, path: str, ns: int | None) -> None:
        # Windows' os.utime takes no descriptor; ns None: "now".
        if ns is None:
            os.utime(path)
        else:
            os.utime(path, ns=(ns, ns))

    def _pid_alive(pid: int) -> bool:
        return True  # os.kill(pid, 0) would terminate it; an open file cannot be removed here anyway.

    _exists = os.path.lexists  # os.access() takes no follow_symlinks=False here.

    def _check_exists(known: str) -> None:
        pass

    def _open_file(path: str, flags: int, mode: int) -> int:
        # No O_NOFOLLOW: a name opened to write is refused if it is a symlink now (one made between this check and
        # the open is not seen).
        if flags & (os.O_WRONLY | os.O_RDWR) and os.path.islink(path):
            raise _NotRegular(path, os.lstat(path))
        return os.open(path, flags, mode)

    def _untrusted(st: os.stat_result) -> str:
        return ""  # No owner uid in os.stat, no POSIX mode bits: nothing to check (docs/security.md).

    def _stat_trusted(path: str) -> bool:
        return False  # Not measured on Windows: every hit opens its entry.

    def _anonymous_memory(length: int) -> Any:
        import mmap

        return mmap.mmap(-1, length)  # Pagefile-backed; Windows takes no flags.

else:
    _SYNC_FLAGS = _READ_FLAGS
    _LOCK_SPAN = 2**62
    # fcntl is imported by _load_fcntl() at the first lock or flush, not by `import donecache` (0.15 ms of a 3 ms
    # import, issue 20), with the constants taken from it: 0 stands for one this system lacks.
    fcntl: Any = None
    _F_FULLFSYNC = _F_OFD_SETLK = _F_OFD_SETLKW = 0
    _FLOCK: struct.Struct  # struct flock, 64-bit Linux (type, whence, start, len, pid): made by _load_fcntl.

    def _load_fcntl() -> Any:
        global fcntl, _F_FULLFSYNC, _F_OFD_SETLK, _F_OFD_SETLKW, _FLOCK
        import fcntl as module
        import struct

        _FLOCK = struct.Struct("@hhqqi4x")

        # macOS: fsync(2) only hands data to the drive, whose cache may lose it on power failure; F_FULLFSYNC asks
        # the drive to flush (see fcntl(2) on macOS).
        _F_FULLFSYNC = getattr(module, "F_FULLFSYNC", 0)
        # OFD locks (see _LockFile) on 64-bit Linux only: 32-bit Linux's struct flock differs from _FLOCK.
        _F_OFD_SETLK = getattr(module, "F_OFD_SETLK", 0) if sys.maxsize > 2**32 else 0
        _F_OFD_SETLKW = getattr(module, "F_OFD_SETLKW", 0)
        fcntl = module
        return module
    # Filesystems that cannot fsync a directory say so with these: CIFS, some FUSE and VirtualBox shares give
    # EINVAL (python-atomicwrites issue #27).
    _NO_DIR_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}

    def _fsync_file(fd: int) -> None:
        if fcntl is None:
            _load_fcntl()
        if _F_FULLFSYNC:
            try:
                fcntl.fcntl(fd, _F_FULLFSYNC)
                return
            except OSError:  # Not every filesystem supports it; fsync still helps.
                pass
        os.fsync(fd)

    def _fsync_dir(path: str) -> None:
        # A rename is durable only once its directory is flushed (fsync(2), "Calling fsync() does not necessarily
        # ensure that the entry in the directory containing the file has also reached disk").
        fd = -1
        try:
            fd = os.open(path or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in _NO_DIR_FSYNC and not (fd < 0 and exc.errno == errno.EACCES):  # EACCES: unopenable.
                raise
        finally:
            if fd >= 0:
                os.close(fd)

    _replace = os.replace

    def _move_new(src: str, dst: str) -> None:
        # link(2) fails with EEXIST if dst exists, atomically, so a file that appeared meanwhile is never clobbered.
        # Filesystems without hard links (FAT, some SMB mounts) fall back to check-then-rename, which has a tiny
        # window in which a concurrent creator can lose; docs/atomic-writes.md says so.
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

    def _touch(fd: int, path: str, ns: int | None) -> None:
        # Through the open file (futimens(2)): no second lookup of a path that a rename may have changed.
        if ns is None:
            os.utime(fd)
        else:
            os.utime(fd, ns=(ns, ns))

    # _exists: whether anything (a symlink too) has this name, asked without a Python exception for a missing one:
    # a failed lstat's exception costs more than the system call (issue 20). False on any error (EACCES, EIO).
    # As the effective user (AT_EACCESS): access(2) alone asks as the real one, which under setuid cannot search a
    # store made private to the effective user, and every lookup would miss (review of issue 20).
    if os.access in os.supports_effective_ids and os.access in os.supports_follow_symlinks:

        def _exists(path: str) -> bool:
            return os.access(path, os.F_OK, effective_ids=True, follow_symlinks=False)

    else:
        _exists = os.path.lexists

    def _check_exists(known: str) -> None:
        """Ask _exists about ``known``, a directory that exists (a store's root, at each open): if it says no,
        access(2) is refused, and lstat answers from then on. glibc makes it faccessat2(2), which Docker's seccomp
        profile before 20.10 refuses with EPERM (no fallback: fwupd issue 3223), as can a filter that a process
        sets up after import; every name would look missing (review of issue 20)."""
        global _exists
        if not _exists(known):
            _exists = os.path.lexists

    def _pid_alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)  # Signal 0 only asks (kill(2)); EPERM: alive, another user's.
        except ProcessLookupError:
            return False
        except OSError:
            pass
        return True

    def _open_file(path: str, flags: int, mode: int) -> int:
        return os.open(path, flags, mode)  # O_NOFOLLOW in the flags refuses a symlink.

    def _untrusted(st: os.stat_result) -> str:
        """Why a directory (or a link to one) may hold what another user wrote, or "": it is not the effective
        user's (root's too; a link may be root's), or group or others can write to it."""
        mine = st.st_uid == os.geteuid() or (stat.S_ISLNK(st.st_mode) and st.st_uid == 0)
        bits = st.st_mode & 0o022 if stat.S_ISDIR(st.st_mode) else 0
        writers = {0o020: "its group", 0o002: "others", 0o022: "its group and others"}.get(bits)
        if mine and writers is None:
            return ""
        import pwd

        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            owner = "no name"
        why = f"is writable by {writers}" if mine else f"is not yours (you are uid {os.geteuid()})"
        return f"{why}: owner {owner} (uid {st.st_uid}), mode {stat.filemode(st.st_mode)} ({st.st_mode & 0o7777:o})"

    # Filesystems on which an lstat(2) of a name tells whether it still holds the file read before (same inode,
    # size, mtime): local ones. NFS clients cache attributes (acregmin 3 s to acregmax 60 s, nfs(5)); only open(2)
    # revalidates. There, and on any filesystem not listed (FUSE, SMB, Lustre...), every hit opens its entry.
    _LOCAL_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "zfs", "f2fs", "jfs", "bcachefs",
                           "overlay", "ramfs"})

    def _stat_trusted(path: str) -> bool:
        """True if ``path`` is on a local filesystem (Linux: /proc/self/mountinfo, proc(5))."""
        try:
            with io.open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
                table = mounts.read().splitlines()
        except OSError:
            return False  # Not Linux (macOS, the BSDs), or no /proc.
        real, best, kind = os.path.join(os.path.realpath(path), ""), "", ""
        for line in table:
            fields, _sep, rest = line.partition(" - ")
            parts = fields.split()
            point = os.path.join(parts[4].replace("\\040", " "), "") if len(parts) > 4 else ""
            if point and real.startswith(point) and len(point) >= len(best):
                best, kind = point, rest.split(" ", 1)[0]
        return kind in _LOCAL_FS

    def _anonymous_memory(length: int) -> Any:
        """Fresh memory to read a big buffer into, without bytearray(n)'s pass that zeroes every page first."""
        import mmap

        # Private, not mmap's default MAP_SHARED: shared anonymous memory is shmem, which gets no transparent huge
        # pages (shmem_enabled is "never" by default), and a forked child would share writes to it. Advised for huge
        # pages (madvise(2)), a 240 MB read faults 2 MiB at a time: 70 ms instead of 100 ms on tmpfs.
        memory = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        huge = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only.
        if huge is not None:
            try:
                memory.madvise(huge)
            except OSError:  # EINVAL: a kernel built without transparent huge pages.
                pass
        return memory


def _open_regular(path: str, flags: int = _READ_FLAGS) -> tuple[int, os.stat_result]:
    """Open ``path`` only if it is a regular file: (descriptor, its stat), else _NotRegular."""
    # O_NONBLOCK makes the open of a FIFO or a device return at once (fifo(7)) instead of waiting for a writer or an
    # end, and fstat then refuses it. With O_NOFOLLOW in ``flags`` (always in _WRITE_FLAGS), open(2) refuses a
    # symlink with ELOOP (EMLINK on FreeBSD, EFTYPE on NetBSD), and lstat says why.
    try:
        fd = _open_file(path, flags | _NONBLOCK, 0o666)
    except OSError as exc:
        if not (flags & _NOFOLLOW and exc.errno in (errno.ELOOP, errno.EMLINK, getattr(errno, "EFTYPE", -1))):
            raise
        st = os.lstat(path)
        if not stat.S_ISLNK(st.st_mode):
            raise
        raise _NotRegular(path, st) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            return fd, st
        raise _NotRegular(path, st)
    except BaseException:
        os.close(fd)
        raise


# The lock primitive: _LockFile(path, offset) locks the whole file (offset None) or one byte of it, through a handle
# of its own, with lock(wait) (wait=True only where can_wait), unlock() and close(); _lock_taken(path) asks whether
# another process holds a file's lock.
if sys.platform == "win32":  # pragma: no cover - CI proves Linux only

    class _LockFile:
        """Windows byte locks belong to the handle, so each lock has a handle of its own: two threads never share
        the file position that msvcrt.locking() locks at."""

        can_wait = False  # msvcrt's blocking mode gives up after ten seconds: poll.

        def __init__(self, path: str, offset: int | None) -> None:
            self._file = io.FileIO(_open_regular(path, _WRITE_FLAGS)[0], "r+")
            self.fd, self.offset = self._file.fileno(), offset or 0  # A whole-file lock is byte 0.

        def lock(self, wait: bool) -> bool:
            assert not wait, "can_wait is False: callers poll"
            os.lseek(self.fd, self.offset, os.SEEK_SET)
            try:
                msvcrt.locking(self.fd, msvcrt.LK_NBLCK, 1)
            except OSError:
                return False
            return True

        def unlock(self) -> None:
            os.lseek(self.fd, self.offset, os.SEEK_SET)
            msvcrt.locking(self.fd, msvcrt.LK_UNLCK, 1)

        def close(self) -> None:
            self._file.close()

    def _lock_taken(path: str) -> bool:
        try:
            file = io.FileIO(path, "r")
        except FileNotFoundError:
            return False
        with file:
            try:
                msvcrt.locking(file.fileno(), msvcrt.LK_NBRLCK, 1)
            except OSError:
                return True
            msvcrt.locking(file.fileno(), msvcrt.LK_UNLCK, 1)
            return False

else:
    # Byte locks. Linux (3.15 and later) has open-file-description locks (F_OFD_SETLK, fcntl(2)), which belong to the
    # open file description as flock(2) locks do: each handle's locks are its own, closing it drops only those, and the
    # kernel's deadlock detection, which misfires when threads of several processes hold classic record locks (EDEADLK,
    # "Resource deadlock avoided"), does not apply. Elsewhere (macOS, the BSDs; 32-bit Linux, whose struct flock differs
    # from _FLOCK) only classic record locks are used: see _RecordLocks. (_F_OFD_SETLK is 0 there, set by _load_fcntl.)
    _BUSY = (errno.EACCES, errno.EAGAIN)

    class _RecordLocks:
        """Classic record locks belong to the process: closing *any* descriptor of the file drops all of them, and
        threads of one process never exclude each other (fcntl(2), "Record locking"). So the handles of one path
        share one descriptor, kept open while any of them is, and threads take turns on a byte by a thread lock."""

        guard = _thread.allocate_lock()
        shared: dict[str, list[Any]] = {}  # path -> [descriptor, handles]
        turns: dict[tuple[str, int], list[Any]] = {}  # (path, byte) -> [thread lock, handles]

        def __init__(self, path: str, offset: int) -> None:
            self.path, self.offset = path, offset
            with self.guard:
                shared = self.shared.get(path)
                if shared is None:
                    shared = self.shared[path] = [_open_regular(path, _WRITE_FLAGS)[0], 0]
                shared[1] += 1
                turn = self.turns.setdefault((path, offset), [_thread.allocate_lock(), 0])
                turn[1] += 1
            self.fd, self.turn = shared[0], turn[0]

        def lock(self, wait: bool) -> bool:
            if not self.turn.acquire(wait):
                return False
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB), 1, self.offset)
            except BaseException as exc:
                self.turn.release()
                if isinstance(exc, OSError) and exc.errno in _BUSY:
                    return False
                raise
            return True

        def unlock(self) -> None:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, self.offset)
            finally:
                self.turn.release()

        def close(self) -> None:
            with self.guard:
                turn = self.turns.get((self.path, self.offset))
                shared = self.shared.get(self.path)
                if turn is None or shared is None or shared[0] != self.fd:
                    return  # Opened by the parent of this forked child: forgotten.
                turn[1] -= 1
                if turn[1] == 0:
                    del self.turns[(self.path, self.offset)]
                shared[1] -= 1
                if shared[1] == 0:
                    del self.shared[self.path]
                    os.close(self.fd)

    class _LockFile:
        """A lock file opened for one lock. Whole-file locks (flock(2)) and OFD locks belong to this handle: code
        that opens and closes the same file (a user hashing every file of a stage) cannot release them by accident,
        and two handles exclude each other even within one thread. Both kinds work over NFS (Linux emulates flock
        there with record locks). A forked child closes its copies of every open handle at once (_forked), so that
        a pool worker that outlives a killed parent never holds the parent's locks forever."""

        can_wait = True
        _files: set[weakref.ref[io.FileIO]] = set()  # The handles' open files, for _forked: a weak set without weakref.
        _hooked = False
        # Opening the lock file costs four system calls (open, fstat, lseek, close) per lock: a byte lock's handle
        # released cleanly (unlocked, so it holds nothing) is kept for the next byte lock of that file, a few per
        # file, for the last two files (short-lived stores leave no descriptors behind: issue 10, item 6). Each
        # handle still serves one lock at a time, so OFD locks still exclude threads. A handle whose unlock did not
        # run is closed, never kept; one whose file was removed (st_nlink 0: the store was deleted; checked once a
        # second) is dropped, or its locks would exclude no one.
        _spare: dict[str, list[tuple[io.FileIO, float]]] = {}  # path -> [(file, when its link count was checked)]
        _SPARES, _SPARE_FILES = 4, 2  # No thread lock guards them: an interrupt inside `with` can leave one held (3.9).

        def __init__(self, path: str, offset: int | None) -> None:
            if not _LockFile._hooked:
                _LockFile._hooked = True
                os.register_at_fork(after_in_child=_LockFile._forked)
            self.offset, self._path, self._clean = offset, path, False
            if fcntl is None:
                _load_fcntl()
            self._records = None if offset is None or _F_OFD_SETLK else _RecordLocks(path, offset)
            # io.FileIO closes its descriptor when it is collected: a lock whose holder vanished with an exception
            # (KeyboardInterrupt) is released.
            self._file, self._checked = None, 0.0
            if self._records is None:
                self._file = self._take_spare() if offset is not None else None
                if self._file is None:
                    self._file, self._checked = io.FileIO(_open_regular(path, _WRITE_FLAGS)[0], "r+"), time.monotonic()
                    self._files.add(_weakref.ref(self._file, _LockFile._files.discard))  # Collected: closed, forgotten.

        def _take_spare(self) -> io.FileIO | None:
            spare = self._spare.get(self._path)
            if not spare:
                return None
            try:
                file, self._checked = spare.pop()  # Atomic: each kept file goes to one handle.
            except IndexError:  # Another thread took the last one.
                return None
            if time.monotonic() - self._checked > 1.0:
                self._checked = time.monotonic()
                if os.fstat(file.fileno()).st_nlink == 0:
                    file.close()
                    return None
            return file

        @staticmethod
        def _forked() -> None:
            for ref in list(_LockFile._files):  # Kept ones too.
                file = ref()
                if file is not None:
                    file.close()
            _LockFile._files, _LockFile._spare = set(), {}
            # The child holds no record locks and none of the parent's threads; another thread may have held the guard.
            _RecordLocks.guard, _RecordLocks.shared, _RecordLocks.turns = _thread.allocate_lock(), {}, {}

        def _apply(self, operation: int, command: int, kind: int) -> None:
            """flock(operation) on the whole file, or fcntl(command) for a ``kind`` OFD lock on the byte."""
            assert self._file is not None
            if self.offset is None:
                fcntl.flock(self._file.fileno(), operation)
            else:
                fcntl.fcntl(self._file.fileno(), command, _FLOCK.pack(kind, os.SEEK_SET, self.offset, 1, 0))

        def lock(self, wait: bool) -> bool:
            """Take the lock; with ``wait``, block for it with the GIL released (a signal interrupts it: PEP 475)."""
            if self._records is not None:
                return self._records.lock(wait)
            try:
                self._apply(fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB), _F_OFD_SETLKW if wait else _F_OFD_SETLK,
                            fcntl.F_WRLCK)
            except OSError as exc:
                if exc.errno in _BUSY:
                    return False
                raise
            return True

        def unlock(self) -> None:
            if self._records is not None:
                self._records.unlock()
            elif self._file is not None and not self._file.closed:  # Closed: a forked child.
                self._apply(fcntl.LOCK_UN, _F_OFD_SETLK, fcntl.F_UNLCK)
                self._clean = True

        def close(self) -> None:  # Twice is harmless: a record lock's counts drop once.
            file, self._file = self._file, None
            records, self._records = self._records, None
            if records is not None:
                records.close()
            elif file is not None:
                if self._clean and self.offset is not None and not file.closed and self._keep_spare(file):
                    return
                file.close()

        def _keep_spare(self, file: io.FileIO) -> bool:
            spare = self._spare.get(self._path)
            if spare is None:
                while len(self._spare) >= self._SPARE_FILES:
                    try:
                        old = self._spare.pop(next(iter(self._spare)))
                    except (StopIteration, KeyError, RuntimeError):  # Another thread got there first.
                        break
                    while old:
                        try:
                            old.pop()[0].close()
                        except IndexError:
                            break
                spare = self._spare.setdefault(self._path, [])
            if len(spare) >= self._SPARES:
                return False
            spare.append((file, self._checked))
            return True

    def _lock_taken(path: str) -> bool:
        # A shared lock, tried and dropped at once: a builder that asks for the lock in that instant waits
        # microseconds. The file is opened read-only, never created. Only for another process's locks: on NFS,
        # where flock is a record lock, closing this descriptor would drop our own.
        module = fcntl or _load_fcntl()
        try:
            fd = os.open(path, _READ_FLAGS | _NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            return False
        try:
            module.flock(fd, module.LOCK_SH | module.LOCK_NB)
        except OSError as exc:
            if exc.errno in _BUSY:
                return True
            raise
        finally:
            os.close(fd)
        return False


# ---------------------------------------------------------------------------
# Basics
#
# Error messages, small files, who this process is, directories, and logging: what everything below shares.
# ---------------------------------------------------------------------------

def _os_error(code: int | None, path: str, message: str, kind: type[OSError] = OSError) -> OSError:
    """An OSError about ``path``: OSError(errno.ENOENT, ...) is a FileNotFoundError, and so on."""
    error = kind(message) if code is None else kind(code, message)
    error.filename = path
    return error


def _error_about(exc: OSError, path: str, doing: str, fix: str = "") -> OSError:
    """The same kind of OSError, with a message that names the user's path and the fix."""
    message = f"cannot {doing} {path!r}: {exc.strerror or exc}" + (f"; {fix}" if fix else "")
    return _os_error(exc.errno, path, message, OSError if isinstance(exc, _NotRegular) else type(exc))


def _fspath(path: StrPath, what: str = "path") -> str:
    name = os.fspath(path)
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str or os.PathLike[str], not {type(path).__name__}")
    return name


def _store_path(path: StrPath) -> str:
    """A store's path, refusing a URL (s3://, gs://, http://): os.path would make it a local folder "s3:"."""
    name = _fspath(path, "the cache path")
    scheme, sep, _rest = name.partition("://")
    if sep and len(scheme) > 1 and scheme.replace("+", "").replace(".", "").replace("-", "").isalnum():
        raise ValueError(f"cache path {name!r} is a URL; donecache stores entries in a local (or mounted) directory: "
                         "give a filesystem path, such as the mount point of that bucket")
    return name


def _read_file(path: str, size: int | None = 1 << 20) -> bytes | None:
    """The first ``size`` bytes (None: as many as it has) of the regular file at ``path``, or None if nothing has
    that name. _NotRegular if something else has it; other errors as they come."""

    def read() -> bytes | None:
        try:
            fd, st = _open_regular(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            return os.read(fd, st.st_size if size is None else size)
        finally:
            os.close(fd)

    return _retry(read)


def _file_head(path: str, size: int | None) -> bytes:
    """_read_file(path, size), or b"" where there is no such file or it cannot be read."""
    try:
        return _read_file(path, size) or b""
    except OSError:
        return b""


def _read_text(path: str, size: int | None = 1 << 16) -> str:
    """A small regular file's text, or "" if there is none (or it is no such file, or unreadable)."""
    return _file_head(path, size).decode("utf-8", "replace")


def _json_object(data: bytes | str | None) -> dict[str, Any] | None:
    """The JSON object in ``data``, or None (empty, damaged, or not an object)."""
    import json

    try:
        found = json.loads(data) if data else None
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def _read_json(path: str, size: int | None = 1 << 16) -> dict[str, Any] | None:
    """A small JSON object from a regular file, or None (absent, damaged, or not an object)."""
    return _json_object(_read_text(path, size))


def _scandir(path: str) -> list[os.DirEntry[str]]:
    """The entries of a directory, or none if it cannot be listed."""
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except OSError:
        return []


# Who this process is, asked once: os.getpid() is a system call (glibc stopped caching it in 2.25) and the host's
# name costs an import. "pid", then "host", "host meta" (_encode_entry) and "writer" (_writer_token) when asked.
# A forked child forgets them.
_me: dict[str, Any] = {}
_me_hooked: list[bool] = []


def _pid() -> int:
    pid: int | None = _me.get("pid")
    if pid is None:
        if hasattr(os, "register_at_fork") and not _me_hooked:
            _me_hooked.append(True)  # Once: the child inherits the hook.
            os.register_at_fork(after_in_child=_me.clear)
        pid = _me["pid"] = os.getpid()
    return pid


def _host() -> str:
    host: str | None = _me.get("host")
    if host is None:
        import socket

        host = _me["host"] = socket.gethostname()
    return host


def _who() -> dict[str, Any]:
    """This process as lock notes, stage markers and failure records name it: {"host": ..., "pid": ...}."""
    return {"host": _host(), "pid": _pid()}


def _holder(file: io.FileIO | None) -> str:
    """" (held by pid N on HOST)" from what the holder noted in the lock file (_who(), see _KeyLock.note), read
    through our own open handle; "" where nothing is known."""
    pread = getattr(os, "pread", None)  # Not on Windows, where the holder's locked byte is unreadable anyway.
    try:
        noted = _json_object(pread(file.fileno(), 4096, 0)) if file is not None and pread is not None else None
    except OSError:
        return ""
    if noted is None or "pid" not in noted:
        return ""  # The holder has not noted itself.
    return f" (held by pid {noted['pid']} on {noted.get('host', 'an unknown host')})"


def _make_dirs(path: str, mode: int | None = None, *, durable: bool = False, missing: bool = False) -> list[str]:
    """os.makedirs(path, exist_ok=True), giving each new directory exactly ``mode`` (None: 0o777 less the umask, as
    mkdir -p): os.makedirs gives its mode to the last one only, filtered by the umask (mkdir(2)), so a store's shards
    came out 0777 less the umask (issue 18). With ``durable``, each new directory is also flushed into its parent,
    so that a power cut cannot lose it and with it the durable files written next. Returns the directories made."""
    # To make, the last one first. Where it most likely exists (a stage's folder before each piece), one stat says so:
    # mkdir would lock the parent against other writers (and cost a round trip on NFS) to say EEXIST. Where the caller
    # has just seen it ``missing``, mkdir comes first: a store's new shard costs mkdir and lstat. A parent is looked at
    # only once mkdir finds it missing (or not a directory); once one is made, a missing parent was removed meanwhile.
    new, made, met = ([path] if missing or not os.path.isdir(path) else []), [], False
    while new:
        directory = new[-1]
        try:
            os.mkdir(directory, 0o777 if mode is None else mode)
        except (FileNotFoundError, NotADirectoryError):
            if met or os.path.dirname(directory) == directory:  # At the root, os.path.dirname(x) is x.
                raise
            new.append(os.path.dirname(directory))
            continue
        except OSError:
            # There already (EEXIST; or EROFS, EACCES where a system checks those first), perhaps made meanwhile by
            # another process (with the same mode, if it is donecache).
            if not os.path.isdir(directory):
                raise
        else:
            try:
                if mode is not None and stat.S_IMODE(os.lstat(directory).st_mode) != mode:
                    os.chmod(directory, mode)
                if durable:
                    _fsync_dir(os.path.dirname(directory))
            except OSError:
                # Undone, so that a retry makes it again (and flushes it): a directory whose flush failed would
                # pass for made, and no write into it would ever flush its parent.
                try:
                    os.rmdir(directory)
                except OSError:
                    pass
                raise
            made.append(directory)
        new.pop()
        met = True
    return made


# Records go to logging.getLogger("donecache"): DEBUG for each memoize hit and miss, INFO for waits on a lock
# longer than a second and for each sweep of a bounded store. logging is never imported here: if the program has
# not imported it, nobody can have configured it, and there is nothing to log. The level check is the logger's own
# cached isEnabledFor, so a hit pays a dictionary lookup for it.
_DEBUG, _INFO = 10, 20  # logging.DEBUG, logging.INFO
_logger: Any = None


def _log_at(level: int) -> Any:
    """The "donecache" logger if it handles ``level``, else None."""
    global _logger
    if _logger is None:
        if "logging" not in sys.modules:
            return None
        # Not sys.modules["logging"]: while another thread imports it, that is a half-made module without
        # getLogger (issue 18 item 5). The import statement waits for the other thread's import to finish.
        import logging

        _logger = logging.getLogger("donecache")
    return _logger if _logger.isEnabledFor(level) else None


# ---------------------------------------------------------------------------
# Locks
#
# _KeyLock is the one lock that stages and memoize use: the whole of a lock file, or one byte of it, held by one thread
# of one process at a time, with a timeout, and an error instead of a deadlock when a thread asks for a lock it already
# holds. The kernel drops the locks of a process that dies, even by SIGKILL, so a crashed holder never blocks anyone.
# ---------------------------------------------------------------------------


class _KeyLock:
    """An exclusive lock on a file (offset None) or one byte of it; ``path`` must be canonical (realpath), so
    that one file has one name in the table of holders.

    An exception can arrive between any two lines (KeyboardInterrupt), so nothing stays "held" because
    a line did not run: a collected handle releases its kernel lock, the table of holders keeps only
    weak references, and there is no in-process guard to be left locked.
    """

    # (path, offset) -> (owner: a thread's id or an asyncio task's, the lock) for the locks this process holds.
    _holders: dict[tuple[str, int | None], tuple[int, weakref.ref[_KeyLock]]] = {}
    _readied: Any = None  # The _Ready that took this lock for a call not yet begun: it gives the lock up when asked.
    # name -> (the thread, the _Ready) trying for it for a call not yet begun: taken, perhaps, but not yet recorded.
    _readying: dict[tuple[str, int | None], tuple[int, Any]] = {}

    def __init__(self, path: str, offset: int | None = None) -> None:
        self.path, self._name = path, (path, None if offset is None else offset % _LOCK_SPAN)
        self._handle: _LockFile | None = None
        self._pid = -1

    def __enter__(self) -> _KeyLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _holder_check(self, owner: int) -> None:
        """RuntimeError if this thread holds the lock already (re-entering would wait forever); a lock that a batch
        readied for a call not yet begun is given up, since that call may wait on this one (see _Ready)."""
        held = self._holders.get(self._name)
        lock = held[1]() if held is not None else None
        if lock is not None and lock._handle is not None and lock._pid == _pid():
            if held is not None and held[0] == owner:
                raise RuntimeError(f"this thread already holds the lock {self.path}; re-entering it would wait forever")
            readied = lock._readied  # Once: a take() or surrender() in another thread may clear it meanwhile.
            if readied is not None:
                readied.surrender()
        readying = self._readying.get(self._name) if self._readying else None
        if readying is not None and readying[0] != owner:
            readying[1].surrender()

    def _try(self, owner: int) -> _LockFile | None:
        """The first try, without waiting: None if it took the lock, else the handle to poll with."""
        self._holder_check(owner)
        handle = _LockFile(*self._name)
        try:
            if not handle.lock(False):
                return handle
        except BaseException:
            handle.close()
            raise
        self._taken(handle, owner)
        return None

    def _tries(self, owner: int, handle: _LockFile, timeout: float | None, block: bool) -> Generator[float, None, None]:
        """The one poll loop, after a first try found the lock taken: yields the sleep (time.sleep or asyncio.sleep)
        before each new try; TimeoutError after ``timeout`` s. With ``block``, an untimed wait blocks in the kernel
        if it can."""
        waiting: list[bool] = []
        try:
            # Asked again before each wait: the lock may have been readied after the first try looked (see _Ready).
            self._holder_check(owner)
            if block and timeout is None and handle.can_wait:
                waiting = self._report_wait(handle)
                handle.lock(True)
            else:
                deadline = time.monotonic() + (1e12 if timeout is None else timeout)
                for delay in _delays():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"timed out after {timeout} s waiting for the lock {self.path}")
                    yield min(delay, left)
                    waiting = waiting or self._report_wait(handle)
                    self._holder_check(owner)
                    if handle.lock(False):
                        break
        except BaseException:
            handle.close()
            raise
        finally:
            waiting.clear()  # The wait is over: nothing more to report.
        self._taken(handle, owner)

    def _taken(self, handle: _LockFile, owner: int) -> None:
        self._handle, self._pid = handle, _pid()
        self._holders[self._name] = (owner, _weakref.ref(self))

    def _drop(self, handle: _LockFile) -> None:
        """Give back a handle that a wait left behind: released if it was recorded as held, else closed."""
        if self._handle is handle:
            self.release()
        else:
            handle.close()

    def adopt(self, owner: int | None = None) -> None:
        """Make ``owner`` (a thread's id; None: the calling thread) the holder of this lock, taken by another thread
        of this process: a batch's writer readies a call's lock for the call, and a call hands its lock to the writer,
        which stores the result and releases it. Asking for the lock in the holder's thread is then the error it should
        be, not a hang; asking in another thread (the next call wants the result just handed off) waits for it."""
        if self._handle is not None:
            self._holders[self._name] = (_thread.get_ident() if owner is None else owner, _weakref.ref(self))

    def acquire(self, timeout: float | None = None) -> _KeyLock:
        """Wait for the lock (TimeoutError after ``timeout`` s); returns it, for ``with lock.acquire(timeout):``."""
        owner = _thread.get_ident()
        handle = self._try(owner)
        if handle is not None:
            try:
                for delay in self._tries(owner, handle, timeout, True):
                    time.sleep(delay)
            except BaseException:  # Also one that came before the loop's own handler was set up.
                self._drop(handle)
                raise
        return self

    def try_acquire(self) -> bool:
        """Take the lock if it is free now, without waiting (for event loops)."""
        handle = self._try(_thread.get_ident())
        if handle is None:
            return True
        handle.close()  # Not free: give the handle back.
        return False

    async def acquire_async(self, owner: int) -> None:
        """Wait for the lock without blocking the event loop."""
        handle = self._try(owner)
        if handle is not None:
            try:
                import asyncio

                for delay in self._tries(owner, handle, None, False):
                    await asyncio.sleep(delay)
            except BaseException:  # Cancelled, or interrupted before the loop's own handler was set up.
                self._drop(handle)
                raise

    def _report_wait(self, handle: _LockFile) -> list[bool]:
        """With INFO logging on, a helper thread logs a wait that passes a second, naming the holder if it
        noted itself in the file (stages do); the wait is on while the list returned is not empty."""
        waiting = [True]
        logger = _log_at(_INFO)
        if logger is not None:
            path, file = self.path, handle._file

            def watch() -> None:
                time.sleep(1.0)
                if waiting:
                    logger.info("waiting more than a second for the lock %s%s", path, _holder(file))

            _thread.start_new_thread(watch, ())
        return waiting

    def note(self, data: bytes) -> None:  # See _holder for the reader.
        """While holding a whole-file lock, make ``data`` the file's content (who holds it), through the
        lock's own handle: on NFS, closing any other descriptor of the file would drop the lock. A failure
        (ENOSPC) costs only the note."""
        file = None if self._handle is None else self._handle._file
        if file is not None:
            try:
                os.ftruncate(file.fileno(), 0)
                os.lseek(file.fileno(), 0, os.SEEK_SET)
                os.write(file.fileno(), data)
            except OSError:
                pass

    def release(self) -> None:
        handle, self._handle = self._handle, None
        if handle is None:
            return
        held = self._holders.get(self._name)
        if held is not None and held[1]() is self:
            self._holders.pop(self._name, None)
        try:
            handle.unlock()
        finally:
            handle.close()


# ---------------------------------------------------------------------------
# Atomic writes
#
# A new version is written to a temporary file beside the target and renamed over it: rename(2) replaces
# a name atomically, so a reader sees the old file or the new one, whatever happens to the writer.
# Everything else that donecache writes (stage markers and pieces, cache entries) goes through _write_bytes.
# ---------------------------------------------------------------------------

# Temporary names start with a dot (hidden from ls and glob.glob), carry a marker that `prune` recognises, and end
# with the target's own name, for libraries that pick a format from the suffix (numpy.save, PIL, pandas' compression).
_TEMP_PREFIX = ".dc~"
_TEMP_TOKEN = 16  # hex digits: the writer's host and pid, and a count (_writer_token)
# NAME_MAX is 255 bytes on most filesystems: a temporary name keeps this many bytes of the target's name (its end).
_TEMP_KEEP = 255 - len(_TEMP_PREFIX) - _TEMP_TOKEN - 1
_LITTER_AGE = 3600.0  # A temporary file this old belongs to no live writer.


def _is_temp_name(name: str) -> bool:
    return name.startswith(_TEMP_PREFIX) and name[len(_TEMP_PREFIX) + _TEMP_TOKEN :][:1] == "~"


def _writer_token() -> str:
    """Who writes a temporary file: 6 hex digits of a digest of the host's name, 6 of the pid, 4 of a count."""
    writer = _me.get("writer")
    if writer is None:
        import hashlib

        tag = hashlib.blake2b(_host().encode("utf-8", "replace"), digest_size=3).hexdigest()
        # A count from a random start, not a getrandom(2) per name (issue 20); O_EXCL settles any collision.
        import itertools

        names = itertools.count(int.from_bytes(os.urandom(2), "little"))
        writer = _me["writer"] = f"{tag}{_pid() & 0xFFFFFF:06x}", names
    return f"{writer[0]}{next(writer[1]) & 0xFFFF:04x}"


def _writer_gone(path: str, now: float) -> bool:
    """Whether a temporary file's writer is gone (issue 18): on this host, its pid is dead; from another host,
    whose processes we cannot see, the file was left untouched for _LITTER_AGE."""
    token = os.path.basename(path)[len(_TEMP_PREFIX) : len(_TEMP_PREFIX) + _TEMP_TOKEN]
    try:
        dead = token[:6] == _writer_token()[:6] and not _pid_alive(int(token[6:12], 16))
        return dead or os.lstat(path).st_mtime < now - _LITTER_AGE
    except (OSError, ValueError):
        return False


def _temp_name(target: str) -> str:
    base = os.path.basename(target)
    head = target[: len(target) - len(base)]
    # Bytes, not characters, count (at most 4 a character): a 238-byte name of 79 CJK characters must
    # fit, so characters are trimmed from the front until the rest does.
    while len(base) * 4 > _TEMP_KEEP and len(os.fsencode(base)) > _TEMP_KEEP:
        base = base[max(1, (len(os.fsencode(base)) - _TEMP_KEEP) // 4) :]
    return f"{head}{_TEMP_PREFIX}{_writer_token()}~{base}"


def _discard(temp: str) -> None:
    # Cleanup must never mask the error that made it necessary.
    try:
        os.unlink(temp)
    except OSError:
        pass


def _create_temp(target: str, mode: int | None = None) -> tuple[int, str]:
    """A new temporary file beside ``target``: (fd, path). It gets 0o666 less the umask, as open() gives, or exactly
    ``mode`` (an existing target's bits); the umask is never read by changing it: that races with other threads."""
    while True:
        temp = _temp_name(target)
        try:
            fd = os.open(temp, _CREATE_FLAGS, 0o666)
        except FileExistsError:  # Another writer's name: harmless, take the next.
            continue
        if mode is not None:
            try:
                _keep_mode(fd, mode)
            except BaseException:
                os.close(fd)
                _discard(temp)
                raise
        return fd, temp


def _commit(temp: str, target: str, *, durable: bool, overwrite: bool = True) -> None:
    """Move a finished, closed temporary file onto ``target``."""
    (_replace if overwrite else _move_new)(temp, target)
    if durable:
        _fsync_dir(os.path.dirname(target))


def _temp_files(root: str) -> Iterator[str]:
    """Every temporary file of a writer, live or crashed, anywhere below ``root``."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            if _is_temp_name(name):
                yield os.path.join(dirpath, name)


def _remove_path(path: str) -> None:
    """Remove a file, or a whole directory tree (never following a symlink)."""
    if os.path.isdir(path) and not os.path.islink(path):
        import shutil

        shutil.rmtree(path)
    else:
        os.unlink(path)


def _write_bytes(target: str, data: bytes | Iterable[Any], *, durable: bool, whole: bool = False,
                 written: Callable[[int], None] | None = None) -> None:
    """Atomically make ``target`` hold ``data``: the writer behind markers, pieces and entries.

    ``whole`` fsyncs the data (not the directory) even when not ``durable``: after a power cut
    the name may be missing, but never holds a torn file. ``data`` is bytes, or an iterable of
    bytes-like chunks, each written straight from its own buffer (as writev would): a big value's
    arrays are never joined or copied. A generator may produce a chunk (a table of checksums) only
    once the chunks before it are written. ``written(fd)`` runs once all is written.
    """
    fd, temp = _create_temp(target)
    try:
        chunks: Iterable[Any] = (data,) if isinstance(data, bytes) else data
        for chunk in chunks:
            view = memoryview(chunk).cast("B")  # Slices of it, not of bytes: a short write copies nothing.
            while view:
                view = view[os.write(fd, view) :]
        if written is not None:
            written(fd)
        if durable or whole:
            _fsync_file(fd)
        os.close(fd)
        fd = -1
        _commit(temp, target, durable=durable)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        _discard(temp)
        raise


class _Atomic:
    """What atomic_write() and atomic_path() return: a context manager around a temporary file beside the target,
    committed onto it when the block ends normally and removed otherwise (the body's exception propagates unchanged)."""

    def __init__(self, path: StrPath, durable: bool, overwrite: bool, make_parents: bool) -> None:
        self._path, self._durable, self._overwrite, self._make_parents = path, durable, overwrite, make_parents

    def _create(self, *, keep_now: bool) -> int:
        """Check the target, and create the temporary file: its descriptor. The target's
        permission bits, if it exists, are given to the file now or kept for _finish."""
        target = _fspath(self._path)
        # Symlink policy: a write through a link replaces the file it points to, not the link, as open(path, "w") would.
        if os.path.islink(target):
            target = os.path.realpath(target)
        try:
            st = os.stat(target)
        except (FileNotFoundError, NotADirectoryError):  # The parent checks below explain which.
            st = None
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                message = f"cannot write {target!r}: it is a directory; choose a file path inside it"
                raise _os_error(errno.EISDIR, target, message)
            if not stat.S_ISREG(st.st_mode):
                # Renaming over a device or a FIFO would replace the node itself
                # (as root, atomic_write("/dev/null") would replace the system's).
                what = f"it is {_kind_of(st.st_mode)}, not a regular file, and an atomic write would replace it"
                message = f"cannot write {target!r}: {what}; write to it with open(), or choose another path"
                raise _os_error(errno.EEXIST, target, message)
            if not self._overwrite:
                message = f"{target!r} already exists and overwrite=False; remove it or pass overwrite=True"
                raise _os_error(errno.EEXIST, target, message)
        parent = os.path.dirname(os.path.abspath(target))
        if not os.path.isdir(parent):
            if os.path.exists(parent):
                raise _os_error(errno.ENOTDIR, target, f"cannot write {target!r}: {parent!r} is not a directory")
            if not self._make_parents:
                message = f"cannot write {target!r}: its directory {parent!r} does not exist"
                raise _os_error(errno.ENOENT, target, f"{message}; create it first or pass make_parents=True")
            try:
                _make_dirs(parent, durable=self._durable)
            except OSError as exc:
                raise _error_about(exc, target, "create the parent directories of") from exc
        self._target, self._mode = target, (stat.S_IMODE(st.st_mode) & 0o777 if st is not None else None)
        try:
            fd, self._temp = _create_temp(target, self._mode if keep_now else None)
        except OSError as exc:
            fix = "the directory must be writable to create a temporary file beside the target"
            raise _error_about(exc, target, "write", fix) from exc
        return fd

    def _finish(self) -> None:
        """Make the temporary file whole on disk, ready to be renamed."""

    def _abandon(self) -> None:
        _discard(self._temp)

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        try:
            if exc_type is None:
                self._finish()
                _commit(self._temp, self._target, durable=self._durable, overwrite=self._overwrite)
                return
        except BaseException:
            self._abandon()
            raise
        self._abandon()


class _AtomicFile(_Atomic):
    def __init__(self, path: StrPath, mode: str, encoding: str | None, newline: str | None, *options: bool) -> None:
        if mode not in ("w", "wt", "wb"):
            raise ValueError(f"atomic_write() mode must be one of 'w', 'wt', 'wb', not {mode!r}")
        if "b" in mode and (encoding is not None or newline is not None):
            raise ValueError("atomic_write() takes encoding= and newline= only in text mode ('w')")
        super().__init__(path, *options)
        self._mode_text, self._encoding, self._newline = mode, encoding, newline

    def __enter__(self) -> IO[Any]:
        fd = self._create(keep_now=True)
        try:
            self._file: IO[Any] = io.open(fd, self._mode_text, encoding=self._encoding, newline=self._newline)
        except BaseException:
            os.close(fd)
            _discard(self._temp)
            raise
        return self._file

    def _finish(self) -> None:
        self._file.flush()
        # Even when not durable: without it, a power cut can keep the rename but
        # not the data (ext4's delayed allocation, XFS), leaving an empty target.
        _fsync_file(self._file.fileno())
        self._file.close()

    def _abandon(self) -> None:
        try:
            self._file.close()  # Flushing may fail again (ENOSPC); the file is closed all the same.
        except Exception:
            pass
        _discard(self._temp)


def atomic_write(path: StrPath, mode: str = "w", *, encoding: str | None = None, newline: str | None = None,
                 durable: bool = True, overwrite: bool = True, make_parents: bool = False) -> _AtomicFile:
    """Write a file so that readers see the old version or the whole new one.

    ``with atomic_write(path) as f: f.write(...)`` writes under a temporary name in the same directory,
    renamed over ``path`` when the block ends. If the block raises (KeyboardInterrupt included) or the disk
    fills up, the temporary file is removed, ``path`` is untouched and the original exception propagates.

    mode: ``"w"`` (text) or ``"wb"`` (binary); ``encoding`` and ``newline`` work as for open() in text mode.
    durable: fsync the file and its directory before returning, so that the new version survives a power
        failure. ``False`` skips the directory's flush: after a power failure ``path`` holds the old version
        or the whole new one, never an empty or torn file (the file's flush, still done, is most of the cost).
    overwrite: if False, raise FileExistsError when ``path`` exists, and never clobber a file that appears
        while the block runs.
    make_parents: create missing parent directories instead of raising FileNotFoundError.

    A new file gets mode 0o666 less the umask; an existing file keeps its permission bits. A symlink at
    ``path`` is followed: its target is replaced.
    """
    return _AtomicFile(path, mode, encoding, newline, durable, overwrite, make_parents)


class _AtomicPath(_Atomic):
    def __enter__(self) -> Path:
        from pathlib import Path

        # Creating the file with O_EXCL proves that the name is free; the library then creates it itself.
        os.close(self._create(keep_now=False))
        os.unlink(self._temp)
        return Path(self._temp)

    def _finish(self) -> None:
        temp = self._temp
        if not os.path.lexists(temp):
            message = f"atomic_path({self._target!r}): the block did not create a file at the temporary path {temp!r}"
            raise _os_error(errno.ENOENT, temp, message)
        # Opened (never through a link, which would be renamed onto the
        # target) to check that it is a regular file, to set its mode and flush it.
        fd = _open_regular(temp, _SYNC_FLAGS | _NOFOLLOW)[0]
        try:
            if self._mode is not None:
                _keep_mode(fd, self._mode)
            _fsync_file(fd)  # Even when not durable, as in atomic_write().
        finally:
            os.close(fd)


def atomic_path(path: StrPath, *, durable: bool = True, overwrite: bool = True,
                make_parents: bool = False) -> _AtomicPath:
    """Yield a temporary path for a library that writes files itself.

    ``with atomic_path("x.npy") as tmp: numpy.save(tmp, array)``. The yielded :class:`pathlib.Path` does not
    exist yet; it lies in the same directory and ends with the target's name, so suffix-sniffing libraries
    choose the right format. When the block ends the file is renamed onto ``path``; if the block raises, the
    file is removed and ``path`` is untouched. The options are those of :func:`atomic_write`. It raises
    FileNotFoundError if the block did not create the file.
    """
    return _AtomicPath(path, durable, overwrite, make_parents)


# ---------------------------------------------------------------------------
# Stage directories
#
# A stage is a directory filled piece by piece; its marker file says that the whole stage finished. The
# marker is written last, with the atomic writer, so it exists only if every piece before it does. While a
# stage is being built, a lock on a hidden file inside it keeps other processes and threads out.
# ---------------------------------------------------------------------------

_STAGE_LOCK = ".donecache.lock"
_STAGE_VERSION = ".donecache.version"  # The version being built, recorded when a build starts.
# Each builder of a shared stage holds a lock file of its own, named this and 16 hex digits, while it builds: the
# stage's lock is held only on entry and exit, so `status` looks for these to tell "building" from "incomplete".
_STAGE_BUILDER = ".donecache.builder~"


def _write_json(path: str, record: dict[str, Any], mode: int | None, durable: bool, indent: int | None = None,
                end: bytes = b"") -> None:
    """A JSON record (a stage's marker, a store's sidecar records), its missing folders made with ``mode``."""
    import json

    if mode is not None:
        _make_dirs(os.path.dirname(path), mode, durable=durable)
    _write_bytes(path, json.dumps(record, indent=indent).encode("utf-8") + end, durable=durable)


def _sweep_temps(root: str, stale: Callable[[str], bool] = bool, dry_run: bool = False) -> int:
    """Remove (with ``dry_run``, only count) the temporary files below ``root`` that ``stale(path)`` finds left by a
    writer that is gone (by default, all); how many. An error on one (it vanished, or cannot be removed) skips it."""
    count = 0
    for temp in _temp_files(root):
        try:
            if stale(temp):
                if not dry_run:
                    os.unlink(temp)
                count += 1
        except OSError:
            pass
    return count


def _is_stage_file(name: str, marker: str) -> bool:
    """Whether a name at a stage's top is donecache's own (or the marker), not a piece."""
    return name in (marker, _STAGE_LOCK, _STAGE_VERSION) or name.startswith(_STAGE_BUILDER)


def _version_text(version: Any, item: bool = False) -> str:
    """A version's canonical text: 2, "2" and the command line's --version 2 agree, and a tuple reads the
    same after a JSON round trip (which makes it a list). A str item of a tuple that is empty or holds a
    comma, bracket, quote or backslash is quoted, so ("1,2",) and (1, 2) differ. Floats are refused: 1.10 == 1.1."""
    if isinstance(version, str):
        return repr(version) if item and (not version or any(c in "(),'\"\\" for c in version)) else version
    if isinstance(version, int):
        return str(version)
    if isinstance(version, (tuple, list)):
        return "(" + ",".join(_version_text(part, True) for part in version) + ")"
    raise TypeError(f"version must be a str, an int, or a tuple of them, not {type(version).__name__}: {version!r}"
                    + (f" (1.10 and 1.1 are one float: write {str(version)!r})" if isinstance(version, float) else ""))


def _marker_path(directory: StrPath, marker: str) -> str:
    if not isinstance(marker, str) or marker in ("", ".", "..", _STAGE_LOCK) or os.path.basename(marker) != marker:
        raise ValueError(f"marker must be a plain file name such as 'DONE' or '_SUCCESS', not {marker!r}")
    return os.path.join(_fspath(directory, "directory"), marker)


def _read_marker(path: str) -> dict[str, Any] | None:
    """The marker's metadata: {} for an empty or foreign marker, None if there is none."""
    try:
        data = _read_file(path)
    except _NotRegular:
        return {}  # A FIFO or a directory by the marker's name: not a marker we wrote.
    return None if data is None else _json_object(data) or {}


def _marker_version(info: dict[str, Any] | None) -> str | None:
    """The canonical text of the version a marker records, or None."""
    try:
        return None if not info or info.get("version") is None else _version_text(info["version"])
    except TypeError:
        return None  # A foreign marker's "version" that is no version of ours.


def _marker_counts(path: str, version: Any) -> bool:
    """Whether the marker at ``path`` exists (version None) or records ``version``."""

    def check() -> bool:
        if version is None:
            try:
                return stat.S_ISREG(_retry(lambda: os.stat(path)).st_mode)
            except (FileNotFoundError, NotADirectoryError):
                return False
        return _marker_version(_read_marker(path)) == _version_text(version)

    if check():
        return True
    # An NFS client caches lookups, "no such file" included, for up to acdirmax (60 s by default), so a marker that
    # another host has just written can look absent. Reading the directory makes the client fetch it again from the
    # server (as `ls` does), so "not done" is asked twice.
    try:
        _retry(lambda: sum(1 for _ in os.scandir(os.path.dirname(path))))  # Read through: it closes at its end.
    except (FileNotFoundError, NotADirectoryError):
        return False
    except PermissionError:
        pass  # Searchable but not readable: the stat's answer is all there is.
    return check()


def is_done(directory: StrPath, *, version: _Version | None = None, marker: str = "DONE") -> bool:
    """True if the stage in ``directory`` finished: its marker is a regular file.

    With ``version``, the marker must also record that same version; a marker from an older version of
    your code, or one written by another tool (an empty ``_SUCCESS``, say), then counts as not done.
    Without it, a finished stage costs a single stat(2), cheap enough to call for thousands of stages.
    Before answering "not done" it also reads the directory's listing, which makes an NFS client see a
    marker that another host wrote moments ago.
    """
    if version is not None:
        _version_text(version)  # A float is refused whether or not there is a marker.
    return _marker_counts(_marker_path(directory, marker), version)


def mark_not_done(directory: StrPath, *, marker: str = "DONE") -> bool:
    """Remove the stage's marker so that the next run rebuilds it (its pieces stay); True if there was one."""
    try:
        os.unlink(_marker_path(directory, marker))
    except FileNotFoundError:
        return False
    return True


class _StageState:
    """What `status` says of a stage: its state ("done", "building", "incomplete", "other version" (done, but its
    marker names another version), "not a stage" (a directory that done_dir never entered) or "missing"), its
    marker's metadata, and who builds it ({"host", "pid"} where known)."""

    __slots__ = ("state", "marker", "builder")

    def __init__(self, state: str, marker: dict[str, Any] | None, builder: dict[str, Any] | None = None) -> None:
        self.state, self.marker, self.builder = state, marker, builder


def _stage_status(directory: str, *, version: _Version | None, marker: str) -> _StageState:
    """What `status` says of a stage, only reading (it may be on a read-only filesystem)."""
    path = _marker_path(directory, marker)
    if not os.path.isdir(directory):
        return _StageState("missing", None)
    # An incomplete stage may still hold a stale marker, which says who wrote it.
    if _marker_counts(path, version):
        return _StageState("done", _read_marker(path))
    locks = [os.path.join(directory, _STAGE_LOCK)]
    locks += [e.path for e in _scandir(directory) if e.name.startswith(_STAGE_BUILDER)]
    lock = next((lock for lock in locks if _lock_taken(lock)), None)
    if lock is not None:  # Its note is None if not written yet, or unreadable while locked (Windows).
        return _StageState("building", _read_marker(path), _read_json(lock))
    # A stage that done_dir entered has its lock file; a marker of another version says so.
    if os.path.lexists(path) and version is not None:
        return _StageState("other version", _read_marker(path))
    started = len(locks) > 1 or os.path.lexists(locks[0])
    return _StageState("incomplete" if started else "not a stage", _read_marker(path))


def _flush_tree(root: str) -> None:
    """fsync every file and directory below ``root``: the pieces reach disk before the marker."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            if dirpath == root and _is_stage_file(name, ""):
                continue  # Flushed when written, or a lock file (on NFS, closing one would drop our lock).
            try:
                fd, _st = _open_regular(os.path.join(dirpath, name), _SYNC_FLAGS | _NOFOLLOW)
            except OSError:
                continue  # Unreadable, vanished, or a link, FIFO or device: nothing of ours to flush.
            try:
                _fsync_file(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


class Stage:
    """done_dir(directory, ...): build a stage directory that is marked done only once all of it is written.

    ::

        with done_dir("out/parsed", version=2) as stage:
            if not stage.done:
                for rec in records:
                    stage.piece(f"{rec.id}.json", lambda: parse(rec))

    The directory is created with its parents and, while the block runs, locked against other processes and
    threads building it: one that waited finds ``stage.done`` (checked under the lock) True if the first finished
    it. When the block ends normally, the marker file (``marker``, default ``DONE``) is written atomically with
    JSON metadata: times, host, pid, donecache's version and ``version``. If the block raises or the process
    dies, there is no marker and the pieces stay, so the next run resumes. ``stage.path`` is the directory as a
    Path; ``stage.piece()`` writes a piece and ``stage.has()`` asks whether one is there.

    version: a str, an int or a tuple of them naming your code's or data's version; a stage whose marker
        records another version counts as not done, and its stale marker is removed before rebuilding.
    fresh: when the stage is not done, empty it first instead of resuming from the pieces of an earlier run.
    durable: fsync each piece as it is written and every file of the stage before the marker, so that neither
        the marker nor a rerun that resumes trusts a piece that a power failure emptied.
    timeout: seconds to wait for another builder before TimeoutError.
    expect: make this a shared stage, which many processes or hosts fill at once: a count of pieces, or an
        iterable of their names. Each builder holds the lock only on entry and on exit; the one whose exit
        finds every expected piece present writes the marker, exactly once, and the others leave with
        ``stage.done`` False. Every builder must pass the same ``expect``; ``fresh`` cannot be combined with it.
    """

    def __init__(self, directory: StrPath, *, version: _Version | None = None, marker: str = "DONE",
                 fresh: bool = False, durable: bool = True, timeout: float | None = None,
                 expect: int | Iterable[StrPath] | None = None) -> None:
        from pathlib import Path

        self._root = os.path.abspath(_fspath(directory, "directory"))
        self._marker_file = _marker_path(self._root, marker)
        if version is not None:
            _version_text(version)  # An unusable version fails before the stage is entered.
        self.path, self.marker, self.version = Path(self._root), marker, version
        self.done = False
        self._fresh, self._durable, self._timeout = fresh, durable, timeout
        self._lock: _KeyLock | None = None
        self._builder: _KeyLock | None = None  # A shared builder's own lock (see _announce).
        # A shared stage waits for a count of pieces (an int) or for every one of some pieces (their names).
        self._expect = None if expect is None else self._expected(expect)
        if self._expect is not None and fresh:
            raise ValueError(f"stage {self._root!r}: fresh=True cannot be combined with expect=, because emptying a "
                             "shared stage would throw away the pieces of the other builders; empty it once, before "
                             "they start")

    def _expected(self, expect: int | Iterable[StrPath]) -> int | frozenset[str]:
        """Check ``expect=``: a count of pieces, or their names (relative to the stage, normalised)."""
        if isinstance(expect, int) and not isinstance(expect, bool):
            if expect < 0:
                raise ValueError(f"expect={expect} is negative; pass the number of pieces the stage must hold")
            return expect
        if isinstance(expect, (str, bytes, os.PathLike)) or not isinstance(expect, _collections_abc.Iterable):
            single = "; for a single name pass a list: expect=[name]" if isinstance(expect, (str, os.PathLike)) else ""
            raise TypeError(f"expect must be a count of pieces or an iterable of piece names, not "
                            f"{type(expect).__name__}{single}")
        names: set[str] = set()
        for name in expect:
            if not isinstance(name, (str, os.PathLike)):
                raise TypeError(f"expect= holds {name!r}, not a piece name: names are str or os.PathLike[str]")
            try:
                rel = os.path.relpath(self._piece_path(name), self._root)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"expect= holds a bad name: {exc}") from None
            if rel in names:
                raise ValueError(f"expect= names the piece {rel!r} twice; each piece counts once")
            names.add(rel)
        return frozenset(names)

    def __repr__(self) -> str:
        return f"Stage({self._root!r}, done={self.done})"

    def __enter__(self) -> Stage:
        root = self._root
        if os.path.exists(root) and not os.path.isdir(root):
            message = f"stage {root!r} is a file, not a directory; move it away or choose another path"
            raise _os_error(errno.ENOTDIR, root, message)
        self._pid = _pid()
        if _marker_counts(self._marker_file, self.version):
            # Finished: seeing that needs no lock, and no write (the stage may be on a read-only filesystem). A
            # builder that would rebuild it removes the marker first, under the lock.
            self.done = True
            return self
        lock = self._take_lock()
        try:
            import json

            # For `python -m donecache status`: who is building (read only while the lock is held).
            who = json.dumps(_who()).encode("utf-8")
            lock.note(who)
            self.done = _marker_counts(self._marker_file, self.version)
            if not self.done:
                self._begin()
        except BaseException:
            self._release()
            raise
        if self._expect is not None:
            self._release()  # A shared stage is locked only to enter and to finish.
            if not self.done:
                self._announce(who)
        self._started = time.time()
        return self

    def _announce(self, who: bytes) -> None:
        """A shared builder's own lock file, held while it builds (see _STAGE_BUILDER)."""
        name = f"{_STAGE_BUILDER}{os.urandom(8).hex()}"
        builder = _KeyLock(os.path.join(os.path.realpath(self._root), name))
        try:
            builder.acquire()
        except OSError:
            return  # Only `status` would miss it.
        builder.note(who)
        self._builder = builder

    def _begin(self) -> None:
        """Under the lock, for a stage that is not done: resume a build of the same version, or start empty."""
        root, wanted = self._root, None if self.version is None else _version_text(self.version)
        old = _marker_version(_read_marker(self._marker_file))
        marked = os.path.lexists(self._marker_file)
        if marked:
            os.unlink(self._marker_file)  # Stale: it must not count while we rebuild.
        building = _read_text(os.path.join(root, _STAGE_VERSION))
        # The pieces belong to the version whose build started last, or (for a stage made before versions were
        # recorded) to the one its old marker names; a marker that names none, with no version recorded, is an
        # unversioned build's: another version (issue 18).
        other = wanted is not None and (building or old or ("" if marked else wanted)) != wanted
        if self._fresh or other:
            for name in os.listdir(root):
                if name != _STAGE_LOCK:
                    _remove_path(os.path.join(root, name))
        elif self._expect is None:
            # Left by writers that crashed. In a shared stage they may be live builders' files: the builder that
            # completes it sweeps them.
            _sweep_temps(root)
        if wanted is not None and (building != wanted or self._fresh or other):
            _write_bytes(os.path.join(root, _STAGE_VERSION), wanted.encode("utf-8"), durable=self._durable)

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        try:
            # A forked child that leaves the block did not build the stage.
            if exc_type is None and not self.done and _pid() == self._pid:
                self.done = self._finish(self._expect)
        finally:
            self._release()
            builder, self._builder = self._builder, None
            if builder is not None and _pid() == self._pid:
                _discard(builder.path)
                builder.release()

    def _take_lock(self) -> _KeyLock:
        root = self._root
        try:
            _make_dirs(root, durable=self._durable)
            lock = _KeyLock(os.path.join(os.path.realpath(root), _STAGE_LOCK))
            _retry(lambda: lock.acquire(self._timeout))
        except TimeoutError as exc:
            raise TimeoutError(f"stage {root!r}: {exc}; another process or thread is building it") from None
        except OSError as exc:
            fix = "check its path and permissions"
            raise _error_about(exc, root, "create or lock the stage directory", fix) from exc
        self._lock = lock
        return lock

    def _finish(self, expect: int | frozenset[str] | None) -> bool:
        """Write the marker (a shared stage's only if every expected piece is present and nobody has); True if the
        stage is done. Pieces appear only by a rename, so a listed piece is whole; under the lock, two builders
        cannot both see "complete, no marker", and the marker cannot appear before the last piece."""
        if expect is not None:
            self._take_lock()
            if _marker_counts(self._marker_file, self.version):
                return True
            present = _retry(self._pieces)
            if not (present >= expect if isinstance(expect, frozenset) else len(present) >= expect):
                return False
            # Complete: a temporary file left is a crashed writer's, or a live builder's (a late duplicate, an
            # atomic_path() into the stage), which must be left to it.
            now = time.time()
            _sweep_temps(self._root, lambda temp: _writer_gone(temp, now))
            mine = None if self._builder is None else os.path.basename(self._builder.path)
            for entry in _scandir(self._root):  # Lock files of builders that were killed.
                if entry.name.startswith(_STAGE_BUILDER) and entry.name != mine and not _lock_taken(entry.path):
                    _discard(entry.path)
        self._write_marker()
        return True

    def _pieces(self) -> set[str]:
        """The names of the pieces present: every file below the stage but its marker, lock and temporary files."""

        def fail(exc: OSError) -> None:
            raise exc  # A listing that failed could hide pieces: never count around it.

        found: set[str] = set()
        for dirpath, _dirnames, filenames in os.walk(self._root, onerror=fail):
            for name in filenames:
                if not _is_temp_name(name) and not (dirpath == self._root and _is_stage_file(name, self.marker)):
                    found.add(os.path.relpath(os.path.join(dirpath, name), self._root))
        return found

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.note(b"")
            self._lock.release()
            self._lock = None

    def _write_marker(self) -> None:
        if self._durable:
            _flush_tree(self._root)
        finished = time.time()
        stamp = "%Y-%m-%dT%H:%M:%S%z"
        metadata = {"started": time.strftime(stamp, time.localtime(self._started)),
                    "finished": time.strftime(stamp, time.localtime(finished)),
                    "duration_s": round(finished - self._started, 6), **_who(),
                    "donecache": __version__, "version": self.version}
        if self._expect is not None:
            metadata["expect"] = self._expect if isinstance(self._expect, int) else len(self._expect)
        _write_json(self._marker_file, metadata, None, self._durable, indent=1, end=b"\n")

    def _piece_path(self, name: StrPath) -> Path:
        from pathlib import PurePath

        rel = _fspath(name, "piece name")
        parts = PurePath(rel).parts if rel and not os.path.isabs(rel) else ()
        if not parts or ".." in parts or _is_stage_file(parts[0], self.marker) or any(map(_is_temp_name, parts)):
            raise ValueError(f"piece name {rel!r} must be a relative path inside the stage, and not its marker "
                             f"{self.marker!r} or lock file")
        return self.path / rel

    def _folders_of(self, path: Path) -> None:
        """Refuse a piece whose folders (between the stage and it) are not all real directories: through a
        symlinked folder planted inside the stage (by anyone who can write there), a piece would be written
        outside it (issue 18). Checked with lstat, never following a link, up to the first folder that is
        missing; one swapped for a link after the check is not caught."""
        folder = self._root
        for part in path.relative_to(folder).parts[:-1]:
            folder = os.path.join(folder, part)
            try:
                st = os.lstat(folder)
            except FileNotFoundError:
                return
            if not stat.S_ISDIR(st.st_mode):
                piece = os.path.relpath(path, self._root)
                raise _os_error(errno.ENOTDIR, folder, f"cannot write the piece {piece!r} of stage {self._root!r}: "
                                f"{folder!r} is {_kind_of(st.st_mode)}, not a directory, and pieces are written only "
                                "into real directories inside the stage (a link could lead outside it); remove it and "
                                "run again")

    def has(self, name: StrPath) -> bool:
        """True if the piece ``name`` exists (written by this run or an earlier one)."""
        return self._piece_path(name).exists()

    def piece(self, name: StrPath, make: Callable[[], str | bytes]) -> Path:
        """Write one piece unless an earlier run already wrote it; return its path.

        ``make()`` is called only when the piece is missing. A str is written as UTF-8 and bytes as they
        are, atomically, so an interrupted run never leaves a torn piece that a rerun would trust. Names may
        contain subdirectories (``"shard-3/42.json"``).
        """
        path = self._piece_path(name)
        self._folders_of(path)
        if path.exists():
            return path
        data = make()
        if isinstance(data, str):
            data = data.encode("utf-8")
        elif not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"make() for piece {os.fspath(name)!r} must return str or bytes, not {type(data).__name__}")
        self._folders_of(path)  # Again: make() may have taken long.
        _make_dirs(str(path.parent))  # When durable, the flush before the marker reaches them.
        # A durable piece's data is flushed before its rename: a rerun after a power cut trusts every piece whose
        # name survived, and ext4 can keep a rename without the data. Its directory is flushed before the marker;
        # in a shared stage at once: the marker's writer may be on another host.
        try:
            shared = self._expect is not None
            _write_bytes(str(path), bytes(data), durable=self._durable and shared, whole=self._durable)
        except FileNotFoundError:
            if not path.exists():
                raise
            # Another builder wrote this piece and finished the stage, sweeping our temporary file: it is there.
        return path


# The documented entry point; Stage is its class, for annotations and isinstance.
done_dir = Stage


# ---------------------------------------------------------------------------
# Entry files: the format
#
# A store is a directory with one file per entry, written with the atomic writer and named by a hash of its key. Each
# file holds a header, the key and the pickled value, so reads need no lock and no index, and a torn or damaged file
# reads as missing.
# ---------------------------------------------------------------------------

# Format dcE2 (all integers little-endian, lengths 64-bit; docs/storage.md):
#   header  magic "dcE2", head CRC, created and expires (Unix seconds; 0.0 =
#           never), key length, stream length, stream CRC, buffer count, flags
#   key     the key, then (from 0.3) the entry's metadata: the seconds its computation
#           took (a double) and the host that made it (UTF-8); flags bits 16-31 give
#           its length, which key length includes (0.2 reads it as another key's)
#   stream  the pickle (protocol 5) of the value, less its big buffers; flags bits
#           0-7 name its codec (1 zlib, 2 lzma; buffers stay uncompressed, mappable)
#   buffers the pickle's out-of-band buffers, each at an offset aligned to 64
#   table   per buffer: its length and CRC-32; then the table's own CRC-32
# The head CRC covers the header after itself and the key; the table comes last because its CRCs are computed while the
# buffers are written. What each read checks (not the buffers' CRCs on a hit: they cost more than the whole read of a
# big value): docs/storage.md.
_ENTRY_MAGIC = b"dcE2"
# The header, its tail (all after the magic and the head CRC, which covers it), a table row, and the metadata's fixed
# part (the computation's seconds; the host follows): made by _runtime_imports, which imports struct.
_ENTRY_HEADER: struct.Struct
_ENTRY_TAIL: struct.Struct
_BUFFER_ROW: struct.Struct
_META: struct.Struct
_CODECS = {"zlib": 1, "lzma": 2}
_OUT_OF_BAND = 1 << 16  # Buffers this big are written apart from the stream, and can be mapped.
_MAX_BUFFERS = 4096  # Beyond this many, buffers stay in the stream: the table's size is bounded.
_MAX_KEY = 1 << 20  # So that reading a key allocates little, whatever a damaged header says.
_ALIGN = 64
_CHUNK = 1 << 22  # Buffers are written in pieces this big.


def _check_compress(compress: Any) -> str | None:
    """compress= as a codec name, or None; False/None: off, True: zlib."""
    if compress is None or compress is False:
        return None
    if compress is True or compress in _CODECS:
        return "zlib" if compress is True else str(compress)
    raise ValueError(f"compress must be False, True, 'zlib' or 'lzma' (stdlib codecs), not {compress!r}")


def _lzma() -> Any:
    import lzma

    return lzma


_DatetimePickler: type[pickle.Pickler] | None = None  # Made by _runtime_imports; used while numpy is loaded.
# Weak tables of the sections below (weakref is an import that `import donecache` does without): each registers its
# global's name and weakref class here, and _runtime_imports makes the table at the first store or decoration.
_WEAK_TABLES: dict[str, str] = {}


def _runtime_imports() -> None:
    """Import and make what entries need: called where a store is opened or a function decorated or rebuilt."""
    global pickle, collections, struct, zlib, _ENTRY_HEADER, _ENTRY_TAIL, _BUFFER_ROW, _META, _DatetimePickler
    if _DatetimePickler is None:  # Made last: an interrupted first call is made again.
        import collections
        import pickle
        import struct
        import zlib

        _ENTRY_TAIL = struct.Struct("<ddQQIII")  # Created, expires, key and stream lengths, stream CRC, count, flags.
        _ENTRY_HEADER = struct.Struct("<4sI" + _ENTRY_TAIL.format[1:])  # Magic and head CRC, then the tail.
        _BUFFER_ROW, _META = struct.Struct("<QI"), struct.Struct("<d")

        class DatetimePickler(pickle.Pickler):
            # NumPy pickles datetime64 and timedelta64 arrays in the stream (no PickleBuffer): a big
            # one (a pandas datetime block) goes as its int64 view, out of band, and comes back as
            # ndarray.view(that, its dtype). Nothing of donecache's is named in the pickle.
            def reducer_override(self, obj: Any) -> Any:
                ndarray = sys.modules["numpy"].ndarray
                if type(obj) is ndarray and obj.dtype.kind in "mM" and obj.nbytes >= _OUT_OF_BAND and (
                    obj.flags.c_contiguous or obj.flags.f_contiguous
                ):
                    return ndarray.view, (obj.view("i8"), obj.dtype)
                return NotImplemented

        _DatetimePickler = DatetimePickler
    made = globals()
    for name, kind in _WEAK_TABLES.items():
        if made[name] is None:
            import weakref

            made[name] = getattr(weakref, kind)()


class _Entry:
    """An entry file as read: key, times and (unless only its head was read) the stream and buffers to load()."""

    __slots__ = ("key", "created", "expires", "stream", "buffers", "flags", "meta", "seconds")

    def __init__(self, key: bytes, created: float, expires: float, flags: int = 0, meta: Any = b"") -> None:
        self.key, self.created, self.expires, self.flags, self.meta = key, created, expires, flags, meta
        self.stream: Any = b""
        self.buffers: list[Any] = []
        # How long the computation of the value took (0.0 if not recorded: an entry of 0.2). Read once: a kept
        # entry serves many hits, and each adds it to the time saved.
        self.seconds: float = _META.unpack_from(meta)[0] if meta else 0.0

    def live(self, now: float) -> bool:
        return not self.expires or now < self.expires

    @property
    def host(self) -> str:
        return bytes(self.meta[_META.size :]).decode("utf-8", "replace")

    def load(self) -> Any:
        """The value; raises what unpickling raises (code that changed since)."""
        stream = self.stream
        if self.flags & 0xFF:  # Decompression errors raise as unpickling's do: a miss.
            stream = (zlib if self.flags & 0xFF == 1 else _lzma()).decompress(stream)
        return pickle.loads(stream, buffers=self.buffers)


# A big buffer's CRC-32 (2.2 GB/s here) takes longer than writing it into an ext4's page cache, so a miss waited for
# it: a helper thread checksums from the front while the writer writes, then the writer checksums the back half of
# what is left, and the two CRCs are joined. For the bare CRC register, crc(A + B) = crc(A) * x^(8 len(B)) xor crc(B)
# in GF(2)[x] modulo the polynomial; with zlib's inversions too, A's final one, carried through B, cancels B's initial
# one, so the same holds. Computed in zlib's reflected bit order: bit 31 is the coefficient of x^0, 0xEDB88320 the
# polynomial.
_CRC_STEP = 1 << 20  # The helper takes the buffer in pieces this big, so that the writer can stop it between two.
_CRC_ALONE = 1 << 19  # A smaller buffer is checksummed by the writer: a thread costs more than it saves.
_CRC_SPLIT = 1 << 21  # Less than this left for the helper: the writer waits rather than pay for a join (0.1 ms).


def _crc_times(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC-32 polynomial."""
    product = 0
    for bit in range(31, -1, -1):  # a's coefficients of x^0, x^1, ...: b is multiplied by x between two.
        if a >> bit & 1:
            product ^= b
        b = (b >> 1) ^ (0xEDB88320 if b & 1 else 0)
    return product


def _crc_join(front: int, back: int, back_length: int) -> int:
    """The CRC-32 of A + B, from crc(A), crc(B) and len(B)."""
    shift, power = 1 << 31, 1 << 23  # x^0, and x^8: one byte.
    while back_length:  # x^(8 len(B)), by squaring.
        if back_length & 1:
            shift = _crc_times(shift, power)
        power, back_length = _crc_times(power, power), back_length >> 1
    return _crc_times(shift, front) ^ back


class _TwoHandedCrc:
    """The CRC-32 of a buffer that is being written: a helper thread starts at the front at once (zlib.crc32
    releases the GIL), and result(), called once the writer is free, takes the back half of what is left."""

    def __init__(self, view: memoryview) -> None:
        self._view, self._next, self._stop, self._front = view, 0, view.nbytes, 0
        self._failed: BaseException | None = None
        self._claim, self._done = _thread.allocate_lock(), _thread.allocate_lock()
        self._done.acquire()
        _thread.start_new_thread(self._from_front, ())

    def _from_front(self) -> None:
        crc = 0
        try:
            while True:
                with self._claim:
                    start = self._next
                    if start >= self._stop:
                        break
                    end = self._next = min(start + _CRC_STEP, self._stop)
                crc = zlib.crc32(self._view[start:end], crc)
            self._front = crc
        except BaseException as exc:  # Raised by result(), in the writer's thread.
            self._failed = exc
        finally:
            self._done.release()

    def abandon(self) -> None:
        """The write failed: the helper stops after its piece (it held the buffer for as long as its CRC took)."""
        with self._claim:
            self._stop = self._next

    def result(self) -> int:
        with self._claim:  # The helper stops at the split: the pieces it has claimed stay its own.
            if self._stop - self._next >= _CRC_SPLIT:
                self._stop = self._next + (self._stop - self._next) // 2
            split = self._stop
        back = zlib.crc32(self._view[split:])
        self._done.acquire()
        failed = self._failed
        if isinstance(failed, MemoryError):
            raise MemoryError(f"the CRC-32 of a {self._view.nbytes}-byte buffer could not be computed") from failed
        if failed is not None:
            raise failed
        return _crc_join(self._front, back, self._view.nbytes - split) if split < self._view.nbytes else self._front


class _Encoded(_Entry):
    """A value pickled by _encode_entry (its buffers: views of the value's memory); a small one reads as itself."""

    __slots__ = ()

    def __init__(self, key: bytes, expires: float, meta: bytes, seconds: float, stream: bytes,
                 buffers: list[memoryview]) -> None:
        # Every slot of _Entry (not its __init__: seconds are known, not read). Its creation time, and meta's length
        # in its flags, are set by chunks(), as the file is written.
        self.key, self.created, self.expires, self.flags, self.meta = key, 0.0, expires, 0, meta
        self.stream, self.buffers, self.seconds = stream, buffers, seconds

    def nbytes(self) -> int:
        """The size of the file that chunks() makes, or more by at most the padding (_ALIGN bytes a buffer)."""
        rows: int = sum(buffer.nbytes + _ALIGN + _BUFFER_ROW.size for buffer in self.buffers)
        return _ENTRY_HEADER.size + len(self.key) + len(self.meta) + len(self.stream) + rows + 4

    def chunks(self) -> Iterator[Any]:
        """The file's bytes, in pieces for _write_bytes (the table's CRCs computed as the buffers are written)."""
        key, stream, meta, crc32 = self.key, self.stream, self.meta, zlib.crc32
        self.created = time.time()
        self.flags = flags = self.flags & 0xFF | len(meta) << 16  # The codec, then meta's length as the header has it.
        tail = _ENTRY_TAIL.pack(self.created, self.expires, len(key) + len(meta), len(stream), crc32(stream),
                                len(self.buffers), flags)
        # The head CRC chained over the pieces it covers, not computed over a copy of them: that copy and its slicing
        # were half of a small entry's encoding (issue 20).
        head = (_ENTRY_MAGIC, crc32(meta, crc32(key, crc32(tail))).to_bytes(4, "little"), tail, key, meta)
        if not self.buffers and len(stream) < _OUT_OF_BAND:
            yield b"".join((*head, stream))  # A small entry in one write(2): copying it costs less than a system call.
            return
        yield b"".join(head)
        yield stream
        position = _ENTRY_HEADER.size + len(key) + len(meta) + len(stream)
        table = bytearray()
        for buffer in self.buffers:
            pad = -position % _ALIGN
            if pad:
                yield bytes(pad)
            if buffer.nbytes < _CRC_ALONE:
                yield buffer
                crc = zlib.crc32(buffer)
            else:
                hands = _TwoHandedCrc(buffer)
                try:
                    for start in range(0, buffer.nbytes, _CHUNK):
                        yield buffer[start : start + _CHUNK]
                except BaseException:  # The write failed: _write_bytes closed this generator.
                    hands.abandon()
                    raise
                crc = hands.result()
            table += _BUFFER_ROW.pack(buffer.nbytes, crc)
            position += pad + buffer.nbytes
        if table:
            table += zlib.crc32(table).to_bytes(4, "little")
            yield table


def _compress_entry(encoded: _Encoded, compress: str) -> None:
    """Compress ``encoded``'s stream where that makes it smaller (apart from pickling: a batch's writer thread
    compresses what the call's thread pickled)."""
    # Level 1 (zlib) and preset 1 (lzma): most of the gain on text for a fraction of the time.
    stream = encoded.stream
    packed = zlib.compress(stream, 1) if compress == "zlib" else _lzma().compress(stream, preset=1)
    if len(packed) < len(stream):
        encoded.stream, encoded.flags = packed, _CODECS[compress]


def _encode_entry(key: bytes, value: Any, expires: float = 0.0, protocol: int = 5, seconds: float = 0.0,
                  compress: str | None = None) -> _Encoded:
    """``value`` pickled (compressed where that makes it smaller) with its metadata; raises what pickling raises."""
    host = _me.get("host meta")  # The host's name as metadata records it: encoded once per process.
    if host is None:
        host = _me["host meta"] = _host().encode("utf-8")[:255]
    meta = _META.pack(seconds) + host
    if len(key) + len(meta) > _MAX_KEY:
        raise ValueError(f"a cache key of {len(key)} bytes is too long; keys may have at most {_MAX_KEY} bytes")
    buffers: list[memoryview] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        # True keeps a buffer in the stream: small ones, and any that is not contiguous.
        try:
            view = buffer.raw()
        except BufferError:
            return True
        if len(buffers) >= _MAX_BUFFERS or view.nbytes < _OUT_OF_BAND:
            return True
        buffers.append(view)
        return False

    if protocol < 5 or "numpy" not in sys.modules or _DatetimePickler is None:
        stream = pickle.dumps(value, protocol=protocol, buffer_callback=out_of_band if protocol >= 5 else None)
    else:
        file = io.BytesIO()
        _DatetimePickler(file, protocol, buffer_callback=out_of_band).dump(value)
        stream = file.getvalue()
    encoded = _Encoded(key, expires, meta, seconds, stream, buffers)
    if compress is not None:
        _compress_entry(encoded, compress)
    return encoded


# How much of an entry a read takes: its head (header, key, and the buffer table's structure), its value (the stream
# checked, the buffers read or mapped), or a verification of every byte (the value itself is not kept).
_HEAD, _VALUE, _VERIFY = 0, 1, 2
_HEAD_READ = 512  # A head read asks for this much first: a header and a typical key.
_FIRST_READ = 1 << 16  # A value read asks for this much first: most entries are whole in it.


def _read_exactly(fd: int, view: memoryview) -> bool:
    """Fill ``view`` from ``fd``'s current position; False if the file ends first."""
    file = io.FileIO(fd, "r", closefd=False)
    while view:
        got = file.readinto(view)
        if not got:
            return False
        view = view[got:]
    return True


def _read_span(fd: int, first: bytes, start: int, end: int) -> memoryview | None:
    """Bytes ``start`` to ``end`` of the file, from its ``first`` read as far as that goes; None if it ends first."""
    if end <= len(first):
        return memoryview(first)[start:end]
    span = memoryview(bytearray(end - start))
    have = max(0, len(first) - start)
    span[:have] = memoryview(first)[start : start + have]
    os.lseek(fd, start + have, os.SEEK_SET)
    return span if _read_exactly(fd, span[have:]) else None


def _crc_of_range(fd: int, start: int, length: int) -> int | None:
    """The CRC-32 of ``length`` bytes at ``start``, read in pieces; None if the file ends first."""
    os.lseek(fd, start, os.SEEK_SET)
    piece = memoryview(bytearray(min(length, _CHUNK)))
    crc = 0
    while length:
        view = piece[: min(length, len(piece))]
        if not _read_exactly(fd, view):
            return None
        crc = zlib.crc32(view, crc)
        length -= len(view)
    return crc


def _read_entry(fd: int, size: int, key: bytes | None, depth: int, mapped: bool) -> _Entry | None:
    """The entry in the open file ``fd`` of ``size`` bytes, read to ``depth``; None if it is damage."""
    # Nothing is allocated beyond what the header declares, first checked against the file's size (keys
    # and tables also have fixed limits): a huge or endless file reads as damage in bounded memory.
    first = os.read(fd, _HEAD_READ if depth == _HEAD else _FIRST_READ)
    if len(first) < _ENTRY_HEADER.size:
        return None
    magic, head_crc, created, expires, key_len, stream_len, stream_crc, count, flags = _ENTRY_HEADER.unpack_from(first)
    key_end = _ENTRY_HEADER.size + key_len
    stream_end = key_end + stream_len
    table_len = count * _BUFFER_ROW.size + 4 if count else 0
    meta = flags >> 16  # The metadata's length, at the end of the key area (0 in entries of 0.2).
    if magic != _ENTRY_MAGIC or meta > key_len or 0 < meta < _META.size or key_len > _MAX_KEY or count > _MAX_BUFFERS:
        return None
    if stream_end + table_len > size:  # Checked before anything is allocated.
        return None
    head = _read_span(fd, first, 0, key_end)
    if head is None or zlib.crc32(head[8:key_end]) != head_crc:
        return None
    found = bytes(head[_ENTRY_HEADER.size : key_end - meta])
    if key is not None and found != key:
        return None  # Another key with the same hash prefix (or a swapped file).
    spans: list[tuple[int, int, int]] = []  # (offset, length, crc) of each buffer
    position = stream_end
    if count:
        table = _read_span(fd, b"", size - table_len, size)
        if table is None or zlib.crc32(table[:-4]) != int.from_bytes(table[-4:], "little"):
            return None
        for length, crc in _BUFFER_ROW.iter_unpack(table[:-4]):
            position += -position % _ALIGN
            spans.append((position, length, crc))
            position += length
    if position + table_len != size:
        return None  # Truncated, padded, or a table that does not fit the file.
    entry = _Entry(found, created, expires, flags, head[key_end - meta : key_end])
    if depth == _HEAD and (size > len(first) or count):
        return entry
    stream = _read_span(fd, first, key_end, stream_end)
    if stream is None or zlib.crc32(stream) != stream_crc:
        return None
    if depth == _HEAD:
        return entry  # A small entry, whole in the head read: checked for free.
    if depth == _VERIFY:
        return entry if all(_crc_of_range(fd, offset, length) == crc for offset, length, crc in spans) else None
    entry.stream = stream
    if not spans:
        return entry
    import mmap

    if mapped:
        # A private copy-on-write mapping: arrays over it are writable, their changes never reach the file, and it stays
        # valid after the entry is replaced or removed (entry files are replaced by a rename, never changed in place;
        # issue 18 checked: no O_TRUNC open, the one ftruncate is _KeyLock.note's). Another tool that truncates an entry
        # in place makes the pages past the new end vanish: touching them is SIGBUS (mmap(2)).
        whole = memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_COPY))
        entry.buffers = [whole[offset : offset + length] for offset, length, _crc in spans]
        return entry
    for offset, length, _crc in spans:
        buffer = _anonymous_memory(length)  # Filled in place: bytearray(n) would first zero every page.
        os.lseek(fd, offset, os.SEEK_SET)
        if not _read_exactly(fd, memoryview(buffer)):
            return None
        entry.buffers.append(buffer)
    return entry


# The keys that memoize writes name their function and code identity ("module:qualname|16 hex of code|arguments"); a
# store opened with donecache.open holds keys of the user's own making, which parse to None.
_HEX = frozenset("0123456789abcdef")
_OPEN_KEYS = "(donecache.open keys)"


def _parse_key(key: bytes) -> tuple[str, str] | None:
    """(function, code identity) of a memoize key; None for keys that donecache.open users wrote."""
    head, _, rest = key.decode("utf-8", "replace").partition("|")
    code, sep, arguments = rest.partition("|")
    if ":" in head and sep and len(code) == 16 and set(code) <= _HEX and arguments[:1] in ("=", "#"):
        return head, code
    return None


def _key_identity(key: bytes) -> str:
    """The code identity in a memoize key (or in its prefix alone)."""
    return key.decode("utf-8", "replace").partition("|")[2].partition("|")[0]


def _function_of(key: bytes) -> str:
    parts = _parse_key(key)
    return _OPEN_KEYS if parts is None else parts[0]


# ---------------------------------------------------------------------------
# Entry files: the store directory's data path
#
# donecache.open() keys live at <root>/<2 hex>/<32 hex>; a memoized function's at
# <root>/<16 hex of its name>/<2 hex>/<32 hex>, so that one function's entries are found, counted and cleared without
# touching any other's. Safe for any number of threads and processes without locks: a write is a rename, a read takes
# whichever version the name points to and checks it.
# ---------------------------------------------------------------------------

_NAME_BYTES = 16  # An entry's file name is the hex of a BLAKE2b digest this long.
_NAME_HEX = 2 * _NAME_BYTES
_FOLDER_HEX = 16  # A memoized function's entries live in a folder named by 16 hex digits of its name.
_CACHEDIR_TAG = (b"Signature: 8a477f597d28d172789f06886806bc55\n"
                 b"# This file marks a donecache store (see https://bford.info/cachedir/).\n")
_STORE_FILES = frozenset({"CACHEDIR.TAG", ".gitignore", ".lock", ".functions", ".failures", ".usage", ".sources"})
# The store's .lock file lends byte 0 to the one process that sweeps the store and byte 1 to the running total of its
# bytes in .usage (see the size limit); each other byte guards the computation of the keys that hash to it.
_SWEEP_BYTE, _USAGE_BYTE, _FIRST_KEY_BYTE = 0, 1, 2
# An entry file's modification time is its last use (atime cannot serve: noatime and relatime mounts do not keep it),
# set when it is written and when a read finds it this many seconds old. With a limit, to the second (one futimens(2),
# 2.5 us, on every read would double a hit; HFS+ and FAT keep times only to 1 or 2 s anyway), or finer once this process
# sees the store half full (every read until a sweep) or sweeps evicting entries used less than 8 s ago (an eighth of
# that age), so that entries hit every few ms never look older than those just written by other processes. Without a
# limit, within a minute, as `prune --older-than` needs.
_USE_GRAIN_BOUNDED = 1.0
_USE_GRAIN = 60.0


def _seconds(ttl: Any, what: str = "ttl") -> float | None:
    if ttl is None:
        return None
    seconds = ttl.total_seconds() if hasattr(ttl, "total_seconds") else ttl
    wrong_type = isinstance(seconds, bool) or not isinstance(seconds, (int, float))
    if wrong_type or not seconds > 0:  # A wrong type is a TypeError, a wrong number a ValueError.
        raise (TypeError if wrong_type else ValueError)(
            f"{what} must be a positive number of seconds or a timedelta, not {ttl!r}"
        )
    try:
        return float(seconds)
    except OverflowError:
        raise ValueError(f"{what}={ttl!r} is too large; pass {what}=None for no limit") from None


def _check_max_bytes(max_bytes: Any) -> int | None:
    """max_bytes as given if it is None or a positive int; else a TypeError or ValueError saying what fits."""
    if max_bytes is None or (isinstance(max_bytes, int) and not isinstance(max_bytes, bool) and max_bytes > 0):
        return max_bytes
    raise (ValueError if isinstance(max_bytes, int) and not isinstance(max_bytes, bool) else TypeError)(
        f"max_bytes must be a positive int (bytes on disk, such as 500 * 2**20 for 500 MiB) or None for no limit, "
        f"not {max_bytes!r}")


def _key_byte(digest: str) -> int:
    """The byte of the store's lock file that guards the keys whose file name is ``digest``."""
    return _FIRST_KEY_BYTE + int(digest[-16:], 16) % (_LOCK_SPAN - _FIRST_KEY_BYTE)


def _is_store(root: str) -> bool:
    """True if ``root`` carries the CACHEDIR.TAG that donecache writes into its stores."""
    return _file_head(os.path.join(root, "CACHEDIR.TAG"), len(_CACHEDIR_TAG)) == _CACHEDIR_TAG


# shelve.open(name) keeps its data in a dbm database at or beside ``name``: dbm.dumb writes name.dat, name.dir and
# name.bak; dbm.ndbm name.pag and name.dir, or name.db where it is Berkeley DB (macOS); dbm.gnu and, from 3.13,
# dbm.sqlite3 write the file ``name`` itself.
_DBM_SUFFIXES = ("", ".dat", ".dir", ".bak", ".pag", ".db")
_BERKELEY_MAGIC = frozenset({0x061561, 0x053162})  # Hash and btree; at byte 0 (1.85) or 12 (later).


def _dbm_database(root: str) -> tuple[str, list[str]] | None:
    """(its kind, its files) if a dbm database is named ``root``, else None."""
    files = [root + suffix for suffix in _DBM_SUFFIXES if os.path.lexists(root + suffix)]
    if not files or not all(os.path.isfile(name) for name in files):
        return None  # Nothing there (the common case: a few lstats), or not only files (whichdb could block on a FIFO).
    import dbm

    kind = dbm.whichdb(root)  # Reads magic numbers; it never unpickles.
    head = _file_head(root + ".db", 16)
    if not kind and any(
        int.from_bytes(head[at : at + 4], order) in _BERKELEY_MAGIC for at in (0, 12) for order in ("little", "big")
    ):
        kind = "dbm.ndbm (Berkeley DB)"  # whichdb knows it only where this Python has dbm.ndbm.
    return (kind, files) if kind else None


def _is_hex(name: str, length: int) -> bool:
    return len(name) == length and set(name) <= _HEX


def _foreign_names(root: str, names: list[str] | None = None) -> bool:
    """True if the directory ``root`` holds names that donecache never makes in a store."""
    try:
        names = os.listdir(root) if names is None else names
    except OSError:
        return False
    return any(name not in _STORE_FILES and not (_is_hex(name, 2) or _is_hex(name, _FOLDER_HEX) or _is_temp_name(name))
               for name in names)


class _Untrusted(PermissionError):
    """A store that another user could have written to (see _check_trusted)."""


def _check_trusted(root: str, st: os.stat_result) -> None:
    """Refuse a store directory (or a link to it) that another user could have written to (not those above it):
    its entries are pickles, and loading one runs the code its writer chose (issue 18)."""
    link = os.lstat(root)
    for what, found in [("cache directory", st)] + ([("symbolic link", link)] if stat.S_ISLNK(link.st_mode) else []):
        why = _untrusted(found)
        if why:
            raise _os_error(errno.EACCES, root, f"the {what} {root!r} {why}; loading its entries would run code that "
                            "another user could have written. Use a cache directory of your own (chmod go-w it, if it "
                            "is yours and group or others may write), or pass trust_shared=True if you trust everyone "
                            "who can write to it (docs/security.md)", _Untrusted)


def _record_use(fd: int, path: str, ns: int) -> None:
    """Record a use (see _USE_GRAIN) of the open file ``fd``: its times set to ``ns``."""
    # Through the descriptor, while it is open: set by name, the time could land on a file that another process
    # renamed onto the name meanwhile, on the inode number just freed, and vouch for it (see _recent).
    try:
        try:
            _touch(fd, path, ns)
        except PermissionError:  # Group-writable, not ours: only "now" may be set.
            _touch(fd, path, None)
    except OSError:
        pass  # A store this process may read but not change: the use goes unrecorded.


# Entry files are opened without following symlinks: donecache never makes one, and one planted at an entry's name (to
# /dev/zero, to a file outside the store) must read as damage, not be loaded.
_ENTRY_FLAGS = _READ_FLAGS | _NOFOLLOW


def _load_entry(path: str, key: bytes | None = None, depth: int = _VALUE, mapped: bool = False,
                touch_before: float = 0.0, ns: int = 0) -> tuple[_Entry | None, os.stat_result | None]:
    """(entry, stat) read to ``depth``, (None, stat) if damage, (None, None) if nothing; a use recorded (at ``ns``, or
    now) if older than ``touch_before``, and then the stat is the file's after it. Other OSErrors (ESTALE, EIO)
    propagate: the file could not be judged."""
    try:
        fd, st = _open_regular(path, _ENTRY_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    except _NotRegular as exc:  # A FIFO, a device or a symlink.
        return None, exc.stat
    try:
        entry = _read_entry(fd, st.st_size, key, depth, mapped)
        if entry is not None and st.st_mtime < touch_before:
            _record_use(fd, path, ns or time.time_ns())
            st = os.fstat(fd)
        return entry, st
    finally:
        os.close(fd)


def _lstat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return a.st_ino == b.st_ino and a.st_dev == b.st_dev


# A store that cannot be written says so: a removal that fails with these is an error, never "removed 0".
_READ_ONLY = frozenset({errno.EACCES, errno.EROFS})


def _remove_judged(path: str, judged: os.stat_result) -> bool:
    """Remove ``path`` only if it still is the file that was judged; True if it was removed. A writer
    may have renamed a fresh entry onto the name since (unlinking it would lose a write that had
    returned), so the file is renamed aside first, and put back unless it is the one judged."""
    aside = _temp_name(path)
    try:
        if not _same_file(os.lstat(path), judged):
            return False
        os.rename(path, aside)
        moved = os.lstat(aside)
    except OSError as exc:
        if exc.errno in _READ_ONLY:
            raise
        return False
    if not _same_file(moved, judged):
        try:
            _move_new(aside, path)
        except OSError:
            _discard(aside)  # The name holds a newer file still.
        return False
    try:
        _remove_path(aside)
    except OSError:
        pass  # Left as a temporary file: the next prune removes it.
    return True


class _Slot:
    """Where an entry lives: its file, and the byte of the store's lock file that guards its computation."""

    __slots__ = ("path", "offset")

    def __init__(self, path: str, offset: int) -> None:
        self.path, self.offset = path, offset


class _Found:
    """A scanned entry file: its head (None: damage), the stat judged (None: unreadable), its folder ("": top)."""

    __slots__ = ("path", "entry", "stat", "folder")

    def __init__(self, path: str, entry: _Entry | None, stat: os.stat_result | None, folder: str) -> None:
        self.path, self.entry, self.stat, self.folder = path, entry, stat, folder


# Recently read or written small entries of memoized functions, by path, kept in process as the bytes of their pickle
# (each hit unpickles afresh: a caller that changes its result cannot change the next), so that a hit costs one
# lstat(2). The name must still hold the very file read (inode, device, size, owner, mode, mtime to the ns), kept only
# once no new file can share its mtime (_settled) or when this process set that mtime to the ns through the open file.
# Only where _stat_trusted (NFS caches attributes). Why, and the residual risk: benchmarks/README.md, "Small hits served
# in process".
_RECENT_COUNT = 2048
_RECENT_SIZE = 8192
_RECENT_SETTLED = 50_000_000  # nanoseconds: more than a coarse clock tick (1-10 ms)
_recent: dict[str, tuple[tuple[int, ...], _Entry]] = {}


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_uid, st.st_mode)


def _keep_recent(path: str, stamp: tuple[int, ...] | None, entry: _Entry) -> None:
    """Keep a small ``entry`` in _recent as the file that ``stamp`` describes (None: forget it)."""
    _recent.pop(path, None)  # Inserted again, as the newest.
    if stamp is None or entry.buffers or len(entry.stream) > _RECENT_SIZE:
        return
    entry.stream = bytes(entry.stream)  # Not a view that holds the whole first read.
    if len(_recent) >= _RECENT_COUNT:
        # The oldest quarter at once: a dict's first key is found past the
        # slots of keys deleted before it, so dropping one at a time is slow.
        import itertools

        try:
            for old in list(itertools.islice(_recent, _RECENT_COUNT // 4)):
                _recent.pop(old, None)
        except RuntimeError:  # Changed by another thread meanwhile: the next insert tries again.
            pass
    _recent[path] = (stamp, entry)


def _settled(st: os.stat_result, now: int) -> bool:
    """Whether no file made from ``now`` (ns) on can have ``st``'s modification time: it is older than a clock tick,
    or than a second where the filesystem keeps times in whole seconds (ext2-4 with 128-byte inodes)."""
    coarse = 1_000_000_000 if st.st_mtime_ns % 1_000_000_000 == 0 else 0  # By chance, 1 in 10^9: a needless wait.
    return st.st_mtime_ns < now - coarse - _RECENT_SETTLED

def _kept(path: str, key: bytes, touch_before: float) -> _Entry | None:
    """The entry kept in _recent for ``path`` if the name still holds that very file (one lstat(2)) and no use is
    due to be recorded (its mtime is not older than ``touch_before``); else None."""
    kept = _recent.get(path)
    if kept is None:
        return None
    try:
        st = os.lstat(path)
    except OSError:
        return None  # Gone, or ESTALE, EIO...: judged by the full read (which retries ESTALE).
    entry = kept[1]
    if entry.key == key and st.st_mtime >= touch_before and kept[0] == (
        st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_uid, st.st_mode  # _stamp(st), inline: a hit.
    ):
        return entry
    return None


def _read_recent(path: str, key: bytes, touch_before: float, mapped: bool) -> _Entry | None:
    """_EntryDir.read() on a local filesystem: the entry that _kept vouches for, else read (and kept)."""
    entry = _kept(path, key, touch_before)
    if entry is not None:
        return entry
    # A miss costs one _exists (else _kept's lstat found the file): no failed open. On an error (EACCES, EIO) it says
    # no, and the full read would have found nothing either.
    if path not in _recent and not _exists(path):
        return None
    now = time.time_ns()
    entry, st = _retry(lambda: _load_entry(path, key, _VALUE, mapped, touch_before, now))
    if entry is not None and st is not None:  # Kept if the use just recorded set its time exactly, or settled.
        _keep_recent(path, _stamp(st) if st.st_mtime_ns == now or _settled(st, now) else None, entry)
    return entry



class _EntryDir:
    """A store's directory: where entries live, and how they are read, written, listed and removed."""

    def __init__(self, path: StrPath, flag: str, durable: bool, max_bytes: int | None = None,
                 trust_shared: bool = False) -> None:
        import hashlib

        _runtime_imports()
        if flag not in ("r", "w", "c", "n"):
            raise ValueError(f"flag must be 'r', 'w', 'c' or 'n' (as for shelve.open), not {flag!r}")
        self.root = root = os.path.abspath(_store_path(path))
        self._prefix = os.path.join(root, "")
        self.readonly, self.durable, self.max_bytes = flag == "r", durable, _check_max_bytes(max_bytes)
        # How old an entry's recorded use may be before a read records another (never, read-only).
        self.grain = float("inf") if self.readonly else _USE_GRAIN if max_bytes is None else _USE_GRAIN_BOUNDED
        self._blake2b = hashlib.blake2b
        self.trusted: bool | None = None  # Whether lstat can vouch for an entry (see _recent); told at the first read.
        self.horizon = 0.0  # The newest use time of an entry evicted, as .usage last said.
        # Folders of entries that this object made, with the shards it has made or met in them (see _shard_first).
        self._young: dict[str, set[str]] = {}
        if os.path.islink(root) and not os.path.exists(root):
            raise _os_error(errno.ENOENT, root, f"cache path {root!r} is a symbolic link to {os.readlink(root)!r}, "
                            "which does not exist; create that directory or remove the link")
        legacy = None if os.path.isdir(root) else _dbm_database(root)
        if legacy is not None:
            new = root + ".donecache"
            raise FileExistsError(
                errno.EEXIST,
                f"{root!r} names a shelve (dbm) database, not a donecache store: {legacy[0]} files "
                f"{', '.join(os.path.basename(name) for name in legacy[1])}; donecache does not read dbm files. "
                f"Copy it into a new store once with: with shelve.open({root!r}, 'r') as old, "
                f"donecache.open({new!r}) as new: new.update(old)",
            )  # No filename: str() would append it after the line to copy.
        if os.path.exists(root) and not os.path.isdir(root):  # Asked again: another thread may make it meanwhile.
            raise _os_error(errno.ENOTDIR, root, f"cache {root!r} is a file, not a directory; choose another path")
        if not os.path.isdir(root):
            if flag in ("r", "w"):
                message = f"there is no cache at {root!r}; open it with flag='c' to create one"
                raise _os_error(errno.ENOENT, root, message)
            try:
                # Private, whatever the umask: whoever can write entries can run code in the reader.
                _make_dirs(os.path.dirname(root), durable=durable)
                if _make_dirs(root, 0o700, durable=durable, missing=True):
                    self._young[self._prefix] = set()
            except OSError as exc:
                raise _error_about(exc, root, "create the cache directory", "choose a writable path") from exc
        elif _foreign_names(root) and not _is_store(root):
            # Adopting it would write entries among the user's files, which the CLI then refuses to manage.
            raise _os_error(errno.EEXIST, root, f"{root!r} is a directory that holds other files and is not a "
                            "donecache store (no CACHEDIR.TAG); give a new or empty directory, such as .donecache")
        st = os.stat(root)
        _check_exists(root)
        if not trust_shared:
            _check_trusted(root, st)
        # Folders made inside the store get the store directory's own mode, whatever
        # the umask: 0700 in a store that donecache made, a team's in a shared one.
        self.dir_mode = stat.S_IMODE(st.st_mode)
        if not self.readonly:
            self._label()
        self.lock_path = os.path.join(os.path.realpath(root), ".lock")
        self._block = getattr(st, "st_blksize", 0) or 4096
        if flag == "n":
            self.clear()

    def _label(self) -> None:
        # CACHEDIR.TAG tells backup tools to skip the store; .gitignore keeps it out of commits when it lives in a
        # checkout, as .donecache/ does. Both would hide a user's own files, so a directory that holds anything but
        # donecache's files (a temporary file is a label a cut interrupted: ours) is never labelled. A label that a
        # crash left empty or torn (issue 18 item 12e) is written again.
        try:
            names = os.listdir(self.root)
        except OSError:
            return
        if _foreign_names(self.root, names):
            return
        for name, content in (("CACHEDIR.TAG", _CACHEDIR_TAG), (".gitignore", b"# Made by donecache.\n*\n")):
            path = os.path.join(self.root, name)
            if name in names:
                st, head = _lstat_or_none(path), _file_head(path, 4096)
                # A link or other non-regular file there is left alone; a .gitignore
                # that still ignores everything (edited or not) is kept.
                if st is None or not stat.S_ISREG(st.st_mode) or (
                    head.startswith(content) if name == "CACHEDIR.TAG" else b"*" in head.splitlines()
                ):
                    continue
            try:
                _write_bytes(path, content, durable=self.durable)
            except OSError:
                pass  # Labels are a courtesy; a read-only store works without them.

    def _writable(self) -> None:
        if self.readonly:
            message = f"cache {self.root!r} was opened with flag='r'; open it with flag='c' to write"
            raise _os_error(errno.EACCES, self.root, message)

    def folder(self, function: str) -> str:
        """Where a memoized function's entries live, relative to the root (with a trailing separator)."""
        name: str = self._blake2b(function.encode("utf-8"), digest_size=_FOLDER_HEX // 2).hexdigest()
        return name + os.sep

    def slot(self, key: bytes, folder: str = "") -> _Slot:
        digest = self._blake2b(key, digest_size=_NAME_BYTES).hexdigest()
        return _Slot(f"{self._prefix}{folder}{digest[:2]}{os.sep}{digest}", _key_byte(digest))

    def read(self, key: bytes, slot: _Slot | None = None, now: float | None = None, mapped: bool = False,
             use: bool = True, recent: bool = False) -> _Entry | None:
        """The entry if whole and live at ``now``, or None; ``use``: recorded as a use; ``recent``: may use _recent."""
        when = time.time() if now is None else now
        touch = when - self.grain if use else 0.0
        path = (slot or self.slot(key)).path
        try:
            if recent and self.trusted is None:
                self.trusted = _stat_trusted(self.root)
            if recent and self.trusted:
                entry = _read_recent(path, key, touch, mapped)
            else:
                entry = _retry(lambda: _load_entry(path, key, _VALUE, mapped, touch))[0]
        except (OSError, ValueError):
            return None  # Unreadable now (EIO, or ESTALE that persisted), or a mapping refused: a miss.
        return None if entry is None or (entry.expires and when >= entry.expires) else entry

    def occupied(self, slot: _Slot) -> bool:
        """Whether a file is at the entry's name, as read() would find one: without reading more than its head."""
        if self.trusted is None:
            self.trusted = _stat_trusted(self.root)
        if self.trusted:
            return _exists(slot.path)
        try:
            return _retry(lambda: _load_entry(slot.path, None, _HEAD))[1] is not None
        except OSError:
            return False  # Unreadable now: read() would have found nothing either.

    def _shard_first(self, path: str) -> None:
        """In a folder that this object made, make the entry's shard before its open rather than after the open
        fails: most of a young folder's 256 shards are still missing (half of a new store's first 300 misses made
        one, at two more system calls and an exception each: issue 20)."""
        directory = path[: -(_NAME_HEX + 1)]  # <folder>/<2 hex>: slicing, as the slot was built.
        folder, shard = directory[:-2], directory[-2:]
        met = self._young.get(folder)
        if met is not None and shard not in met:
            try:
                _make_dirs(directory, self.dir_mode, durable=self.durable, missing=True)
            except OSError:
                if os.path.isdir(directory):
                    raise  # Made, but not as asked (its flush failed): nothing later would meet it.
                return  # Damage (a file there) or a full disk: the write meets it too, and its handlers know it.
            met.add(shard)
            if len(met) == 256:
                self._young.pop(folder, None)

    def write(self, encoded: _Encoded, slot: _Slot | None = None, recent: bool = False) -> None:
        """Store an entry; ``recent``: a small one is also kept in _recent, as read."""
        self._writable()
        path = (slot or self.slot(encoded.key)).path
        stamps: list[tuple[int, ...]] = []

        def written(fd: int) -> None:
            # A use recorded at the nanosecond, as a read records one (see _read_recent): kept if the
            # filesystem holds that very time.
            now = time.time_ns()
            _record_use(fd, path, now)
            try:
                st = os.fstat(fd)
            except OSError:
                return
            if st.st_mtime_ns == now:
                stamps.append(_stamp(st))

        small = recent and self.trusted and not encoded.buffers and len(encoded.stream) <= _RECENT_SIZE
        keep = written if small else None
        try:
            try:
                if self._young:
                    self._shard_first(path)
                _write_bytes(path, encoded.chunks(), durable=self.durable, written=keep)
            except FileNotFoundError:  # The first entry in its folder (or the store was removed).
                made = _make_dirs(os.path.dirname(path), self.dir_mode, durable=self.durable, missing=True)
                if len(made) > 1:  # The folder above the shard is new too: its other shards are made first.
                    self._young[os.path.join(made[-2], "")] = {os.path.basename(made[-1])}
                _write_bytes(path, encoded.chunks(), durable=self.durable, written=keep)
            except (NotADirectoryError, IsADirectoryError):  # Damage: a file as a folder, or a folder as the entry.
                folder = self.root
                for part in os.path.relpath(os.path.dirname(path), self.root).split(os.sep):
                    folder = os.path.join(folder, part)
                    if os.path.lexists(folder) and not os.path.isdir(folder):
                        os.unlink(folder)
                _make_dirs(os.path.dirname(path), self.dir_mode, durable=self.durable)
                if os.path.isdir(path):
                    _remove_path(path)
                _write_bytes(path, encoded.chunks(), durable=self.durable, written=keep)
        except OSError as exc:
            raise _error_about(exc, self.root, "store an entry in the cache", "check that it is writable") from exc
        if stamps:
            _keep_recent(path, stamps[-1], encoded)

    def _synced(self, folders: Iterable[str]) -> None:
        """With durable, flush the folders of removed entries: a removal is durable once they are (issue 18, 12d)."""
        if self.durable:
            for folder in sorted(folders):
                _fsync_dir(folder)

    def delete(self, key: bytes, slot: _Slot | None = None) -> bool:
        """Remove the entry file that ``key`` names (whatever state it is in); True if there was one."""
        self._writable()
        path = (slot or self.slot(key)).path
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        self._synced([os.path.dirname(path)])  # A value deleted because it was wrong stays deleted.
        return True

    def folders(self) -> list[str]:
        """The function folders (their names, no separator)."""
        try:
            found = os.scandir(self.root)
            return sorted(e.name for e in found if _is_hex(e.name, _FOLDER_HEX) and e.is_dir(follow_symlinks=False))
        except OSError:
            return []

    def files(self, folder: str | None = None) -> Iterator[tuple[str, str]]:
        """(path, folder) of each entry file (valid or not), or of one of folders() ("" for the top level)."""
        for name in self.folders() + [""] if folder is None else [folder.rstrip(os.sep)]:
            try:
                shards = [e for e in os.scandir(os.path.join(self.root, name)) if _is_hex(e.name, 2)]
            except (FileNotFoundError, NotADirectoryError):
                continue
            for shard in sorted((e for e in shards if e.is_dir(follow_symlinks=False)), key=lambda e: e.name):
                try:
                    names = os.listdir(shard.path)
                except OSError:
                    continue
                for entry in names:
                    if _is_hex(entry, _NAME_HEX) and entry.startswith(shard.name):
                        yield os.path.join(shard.path, entry), name

    def scan(self, folder: str | None = None) -> Iterator[_Found]:
        """_Found for each of files() (expired ones too; a file under another key's name is damage)."""
        for path, where in self.files(folder):
            try:
                entry, st = _retry(lambda: _load_entry(path, None, _HEAD))
            except OSError:
                yield _Found(path, None, None, where)
                continue
            if st is None:
                continue  # Removed since the listing.
            if entry is not None and not path.endswith(self._blake2b(entry.key, digest_size=_NAME_BYTES).hexdigest()):
                entry = None
            yield _Found(path, entry, st, where)

    def clear(self, match: Callable[[bytes], bool] | None = None, folder: str | None = None) -> int:
        """Remove the entries (of ``folder``; those whose key ``match`` accepts); return how many."""
        self._writable()
        removed: list[str] = []
        try:
            if match is not None:
                for found in self.scan(folder):
                    if found.entry is not None and found.stat is not None and match(found.entry.key):
                        if _remove_judged(found.path, found.stat):
                            removed.append(found.path)
            for path, _folder in list(self.files(folder)) if match is None else ():
                try:
                    os.unlink(path)
                    removed.append(path)
                except (FileNotFoundError, IsADirectoryError):
                    pass  # Removed by another process first, or damage that prune() removes.
                except PermissionError as exc:
                    if exc.errno in _READ_ONLY:
                        raise
                    # EPERM: a directory at an entry's name (macOS); prune() removes it.
            self._synced({os.path.dirname(path) for path in removed})
        except OSError as exc:
            raise _error_about(exc, self.root, "remove entries from the cache", "check that it is writable") from exc
        return len(removed)


# ---------------------------------------------------------------------------
# Entry files: store upkeep
#
# The size limit (max_bytes, in bytes on disk), verify and prune, and the sidecar records beside the entries:
# function identities and the failure ledger.
# ---------------------------------------------------------------------------

# A writer that finds no room sweeps down to 80% (docs/size-limit.md).
_LOW_WATER = 0.8
# .usage: the total, the boot time and host of its last writer, the newest use
# time of an entry a sweep evicted, and the number of sweeps begun.
_USAGE, _USAGE_BYTES = "<QdQdQ", 40  # For struct's functions (imported by then: a store is open); its calcsize.


def _this_boot() -> tuple[float, int]:
    """(boot time, host digest). A drift (a suspend, a clock step) costs only a needless recount."""
    import hashlib

    host = hashlib.blake2b(_host().encode(), digest_size=8).digest()
    return time.time() - time.monotonic(), int.from_bytes(host, "little")


def _disk_bytes(st: os.stat_result) -> int:
    """A file's space on disk: its 512-byte blocks (as stat(2) counts them), or its size where there are none."""
    blocks = getattr(st, "st_blocks", None)
    return st.st_size if blocks is None else int(blocks) * 512


def _judge(path: str, key: bytes | None, depth: int) -> tuple[_Entry | None, os.stat_result | None]:
    """_load_entry, with a file that could not be read (EIO, ESTALE, EACCES) as not judged: (None, None)."""
    try:
        return _load_entry(path, key, depth)
    except OSError:
        return None, None


class _EntryFiles(_EntryDir):
    """A store's directory with its upkeep: the size limit, verify, prune and the sidecar records."""

    # -- the size limit (docs/size-limit.md) ---------------------------------
    #
    # Each write reserves its bytes in a running total kept in .usage, under its lock byte, before it creates its file;
    # only a write that finds no room lists the store and sweeps. A computation holds its key's lock byte until the
    # waiters have read the entry, and a sweep skips entries whose byte is held: it never evicts an entry whose key is
    # being computed.

    def write(self, encoded: _Encoded, slot: _Slot | None = None, recent: bool = False) -> None:
        if self.max_bytes is None or self.readonly:  # A read-only store: refused there, before any reservation.
            return _EntryDir.write(self, encoded, slot, recent)  # Not super(): it costs a lookup per miss.
        slot = slot or self.slot(encoded.key)
        reserved, sweeps = self._bounded(lambda: self._reserve(encoded.nbytes()))
        try:
            super().write(encoded, slot, recent)
        except OSError:
            self._usage(lambda total: None if total is None else total - reserved)
            raise
        try:
            size = _disk_bytes(os.stat(slot.path))
        except FileNotFoundError:
            size = 0  # Already evicted or removed by another process.
        # Count what the file really takes; if a sweep began meanwhile, its
        # count may have missed this file: count it again (too much is safe).
        seen: list[int] = []
        self._bounded(lambda: self._usage(
            lambda total: None if total is None else total + size - (reserved if seen[0] == sweeps else 0), seen=seen
        ))

    def _bounded(self, work: Callable[[], Any]) -> Any:
        try:
            return work()
        except OSError as exc:
            raise _error_about(
                exc, self.root, f"keep the cache within max_bytes={self.max_bytes}", "check that it is writable"
            ) from exc

    def _usage(self, change: Callable[[int | None], int | None], evicted: float = 0.0, sweep: int = 0,
               seen: list[int] | None = None) -> int | None:
        """Replace the running total by ``change`` of it under its lock byte; return the new total.

        ``seen`` gets the number of sweeps begun. ``change`` gets None where .usage is missing, damaged, or written
        before this host's last boot (a crash may have lost updates: issue 18 item 12c); only a sweep's count replaces
        it. A durable store syncs a total that grew before the write it counts."""
        with _KeyLock(self.lock_path, _USAGE_BYTE).acquire():
            fd = _open_regular(os.path.join(self.root, ".usage"), _WRITE_FLAGS)[0]
            try:
                raw = os.read(fd, _USAGE_BYTES + 1)
                whole = len(raw) == _USAGE_BYTES
                total, boot, host, self.horizon, sweeps = struct.unpack(_USAGE, raw) if whole else (0, 0.0, 0, 0.0, 0)
                now = _this_boot()
                found = total if whole and (host != now[1] or abs(boot - now[0]) < 5.0) else None
                if seen is not None:
                    seen.append(sweeps)
                new = change(found)
                if new is not None and (new != found or evicted > self.horizon or sweep):
                    self.horizon = max(self.horizon, evicted)
                    os.lseek(fd, 0, os.SEEK_SET)
                    os.write(fd, struct.pack(_USAGE, max(0, new), *now, self.horizon, sweeps + sweep))
                    if self.durable and (found is None or new > found):
                        _fsync_file(fd)
                if self.max_bytes is not None and not self.readonly:
                    # Record uses finely enough that a hot entry never looks as old as those a sweep evicts.
                    age = max(0.0, time.time() - self.horizon) / 8 if self.horizon else _USE_GRAIN_BOUNDED
                    near = (new if new is not None else found or 0) >= self.max_bytes // 2
                    self.grain = min(age, 0.0 if near and not self.horizon else _USE_GRAIN_BOUNDED)
                return new
            finally:
                os.close(fd)

    def _reserve(self, nbytes: int) -> tuple[int, int]:
        """Count an entry of ``nbytes`` (in whole blocks) before it is written: (bytes counted, sweeps begun). With no
        room, sweep or wait for the process sweeping: the back-pressure that bounds any number of writers."""
        max_bytes, need = self.max_bytes or 0, -(-max(nbytes, 1) // self._block) * self._block
        took: list[bool] = []
        seen: list[int] = []

        def take(total: int | None) -> int | None:
            took.append(total is not None and total + need <= max_bytes)
            return total + need if took[-1] and total is not None else total

        self._usage(take, seen=seen)
        if took[-1]:
            return need, seen[-1]
        with _KeyLock(self.lock_path, _SWEEP_BYTE).acquire():
            self._usage(take, seen=seen)  # The process that swept before may have made room.
            idle = 0
            while not took[-1]:
                evicted = self.sweep(min(int(max_bytes * _LOW_WATER), max_bytes - need), locked=True)[0]
                self._usage(take, seen=seen)
                idle = 0 if evicted else idle + 1
                if not took[-1] and (idle == 2 or idle and need > max_bytes):
                    # Bigger than the bound, or two sweeps in a row found nothing to evict (the rest is being
                    # computed): over it by one entry. (After one, others may have filled the store between that
                    # sweep and this look: seen in CI, where it left a store over its bound at rest.)
                    self._usage(lambda total: (total or 0) + need, seen=seen)
                    break
            return need, seen[-1]

    def sweep(self, target: int | None, older_than: float | None = None, folder: str | None = None,
              dry_run: bool = False, locked: bool = False) -> tuple[int, int]:
        """Evict entries (of ``folder``), least recently used first, until they take at most ``target`` bytes on disk,
        and those last used before ``older_than`` (a Unix time); log it; return (entries, bytes). One process sweeps
        at a time (``locked``: this one holds the sweep's lock byte); ``dry_run`` only counts."""
        if not (dry_run or locked):
            self._writable()
            with _KeyLock(self.lock_path, _SWEEP_BYTE).acquire():
                return self.sweep(target, older_than, folder, locked=True)
        usage: Any = (lambda change, *more, **named: None) if dry_run else self._usage
        base = usage(lambda total: total, sweep=1)
        stats = ((path, _lstat_or_none(path)) for path, _folder in self.files(folder))
        listed = sorted(((st.st_mtime, path, st) for path, st in stats if st is not None), key=lambda item: item[0])
        total = sum(_disk_bytes(st) for _mtime, _path, st in listed)
        entries = evicted = 0
        newest, folders = 0.0, set[str]()

        def left(now: int | None) -> int:
            # The total measured, less what was evicted, plus what others reserved since it was read.
            return total - evicted + (now - base if now is not None and base is not None else 0)

        for mtime, path, st in listed:
            if (target is None or left(usage(lambda now: now)) <= target) and (
                older_than is None or mtime >= older_than
            ):
                break
            if dry_run or self._evict(path, st):
                entries, evicted, newest = entries + 1, evicted + _disk_bytes(st), mtime
                folders.add(os.path.dirname(path))
        if dry_run:
            return entries, evicted
        self._synced(folders)  # Evictions reach the disk before the total that leaves them out.
        # One folder's listing is not the store's total: only what left it is taken off.
        after = usage(left if folder is None else lambda now: None if now is None else now - evicted, newest)
        logger = _log_at(_INFO) if entries else None
        if logger is not None:
            logger.info("evicted %d entries (%d bytes on disk, the most recently used of them %.0f s ago) from %s; its "
                        "entries now take %d bytes", entries, evicted, max(0.0, time.time() - newest), self.root,
                        after or 0)
        return entries, evicted

    def _evict(self, path: str, listed: os.stat_result) -> bool:
        """Remove an entry file a sweep listed, unless its key is being computed or it changed since."""
        lock = _KeyLock(self.lock_path, _key_byte(os.path.basename(path)))
        try:
            if not lock.try_acquire():
                return False
        except RuntimeError:
            return False  # This very thread is computing the key.
        with lock:
            st = _judge(path, None, _HEAD)[1]
            if st is None or not _same_file(st, listed) or st.st_mtime != listed.st_mtime:
                return False
            return _remove_judged(path, st)

    def verify(self) -> list[str]:
        """The entry files that are damaged, checking every byte (every buffer's CRC too)."""
        judged = ((path, *_judge(path, None, _VERIFY)) for path, _folder in self.files())
        return [path for path, entry, st in judged if st is not None and entry is None]

    def prune(self, when: float, stale: Callable[[_Found], bool] | None, folder: str | None,
              dry_run: bool) -> tuple[int, int]:
        """Remove expired or damaged entries (of ``folder``; and those ``stale`` accepts), the live ones checked byte
        by byte, and temporary files old at ``when``: (entries, temporaries). ``dry_run`` only counts."""
        if not dry_run:
            self._writable()
        entries = 0
        top = self.root if not folder else os.path.join(self.root, folder)
        folders: set[str] = set()
        try:
            for found in self.scan(folder):
                # A file not judged (stat None) is left alone: ESTALE, EIO and EACCES say nothing of the entry.
                entry, judged = found.entry, found.stat
                if entry is not None and entry.live(when) and not (stale is not None and stale(found)):
                    entry, judged = _judge(found.path, entry.key, _VERIFY)
                    if entry is not None:
                        continue
                if judged is not None and (dry_run or _remove_judged(found.path, judged)):
                    entries += 1
                    folders.add(os.path.dirname(found.path))
            for directory in [top] if folder else [top, *(os.path.join(top, name) for name in self.folders())]:
                for e in _scandir(directory):  # Damage: a file or a link where a folder should be.
                    folder_name = _is_hex(e.name, 2) or (directory == self.root and _is_hex(e.name, _FOLDER_HEX))
                    if folder_name and not e.is_dir(follow_symlinks=False):
                        entries += dry_run or _remove_judged(e.path, e.stat(follow_symlinks=False))
            if not dry_run:
                self._synced(folders)
        except OSError as exc:
            raise _error_about(exc, self.root, "remove entries from the cache", "check that it is writable") from exc
        temps = _sweep_temps(top, lambda temp: os.stat(temp).st_mtime < when - _LITTER_AGE, dry_run)
        return entries, temps

    # Each memoized function's current code identity, one small JSON file per function under .functions/, so that
    # `info` and `prune --stale` can tell the entries of older code without running or importing anything.

    def record_identity(self, function: str, identity: str, code: str = "") -> float | None:
        """Record the identity this process runs under and when each code digest under it was first
        seen; return when ``code`` was, if other code was seen before it (entries older than that came from
        other code: a pinned version=), else None."""
        path = os.path.join(self.root, ".functions", self.folder(function)[:_FOLDER_HEX])
        record = _read_json(path) or {}
        same = record.get("identity") == identity
        codes = dict(record["codes"]) if same and isinstance(record.get("codes"), dict) else {}
        since = codes.get(code)
        if not isinstance(since, (int, float)):
            since = time.time()
            if code:
                codes[code] = since
                codes = dict(sorted(codes.items(), key=lambda item: float(item[1]))[-50:])  # Bounded.
            if code or not same:
                data = {"function": function, "identity": identity, "recorded": since, "codes": codes}
                try:
                    _write_json(path, data, self.dir_mode, self.durable)
                except OSError:
                    pass  # Only `info`, `prune --stale` and the warning use it; a read-only store still serves.
        older = any(isinstance(t, (int, float)) and t < since for t in codes.values())
        return float(since) if code and older else None

    def identities(self) -> dict[str, str]:
        """function -> its current code identity, as the last process that ran it recorded."""
        found: dict[str, str] = {}
        for file in _scandir(os.path.join(self.root, ".functions")):
            record = _read_json(file.path)
            if record is not None and "function" in record and "identity" in record:
                found[str(record["function"])] = str(record["identity"])
        return found  # A damaged or foreign file only costs the stale count.

    def older_code(self) -> Callable[[str, Any], bool]:
        """older(function, identity): whether an entry or failure record is of code older than the recorded one."""
        current = self.identities()
        return lambda function, identity: current.get(function, identity) != identity

    # The failure ledger: one small JSON file per failed input of a batch, under .failures/<function's folder>/<the
    # entry's name>.json, written as the failure happens and removed when that input succeeds. JSON, never a pickle:
    # listing failures runs nothing.

    def _failure_file(self, slot: _Slot) -> str:
        # Slots are <root>/[<folder>/]<2 hex>/<name>: string slicing, no relpath per success.
        folder, name = slot.path[len(self._prefix) : -(_NAME_HEX + 3)], slot.path[-_NAME_HEX:]
        return f"{self._prefix}.failures{os.sep}{folder or '.' + os.sep}{name}.json"

    def record_failure(self, slot: _Slot, record: dict[str, Any]) -> None:
        _write_json(self._failure_file(slot), record, self.dir_mode, self.durable, indent=1)

    def forget_failure(self, slot: _Slot) -> None:
        # A store that never recorded a failure has no .failures at all: one access(2), no exception (a failed
        # unlink's FileNotFoundError cost 8% of a small miss: issue 20). Where it exists, unlink(2) itself, not a
        # check first: an error other than "no such file" (EACCES on the ledger's folder) must surface, or a stale
        # failure record would outlive this success (review of issue 20).
        if not _exists(f"{self._prefix}.failures"):
            return
        try:
            os.unlink(self._failure_file(slot))
        except (FileNotFoundError, NotADirectoryError):
            pass

    def failure(self, slot: _Slot) -> dict[str, Any] | None:
        return _read_json(self._failure_file(slot))

    def _failure_records(self, folder: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
        top = os.path.join(self.root, ".failures")
        for directory in [os.path.join(top, folder)] if folder else [e.path for e in _scandir(top) if e.is_dir()]:
            for entry in _scandir(directory):
                record = _read_json(entry.path) if entry.name.endswith(".json") else None
                if record is not None:
                    yield entry.path, record

    def failures(self, folder: str | None = None) -> list[dict[str, Any]]:
        """The failure records (of one function's ``folder``), oldest first."""
        return sorted((r for _path, r in self._failure_records(folder)), key=lambda r: float(r.get("time") or 0))

    def drop_failures(self, drop: Callable[[dict[str, Any]], bool], folder: str | None = None) -> int:
        """Remove the failure records that ``drop`` accepts; how many were removed."""
        self._writable()
        removed = 0
        for path, record in list(self._failure_records(folder)):
            if drop(record):
                try:
                    os.unlink(path)
                    removed += 1
                except FileNotFoundError:
                    pass
        return removed


# ---------------------------------------------------------------------------
# The store
#
# Its upkeep first: _prune serves Store.prune(), f.prune() and the command line's prune. Then Store: shelve.Shelf
# supplies the pickling; _ShelfDict is the bytes-to-bytes mapping it expects, over the entry files.
# ---------------------------------------------------------------------------


def _stale_test(files: _EntryFiles) -> Callable[[_Found], bool]:
    """Whether an entry is of code older than its function's current identity, or a memoize
    entry in donecache 0.1's layout (at the top level, where no memoized function looks now)."""
    older = files.older_code()

    def stale(found: _Found) -> bool:
        parts = None if found.entry is None else _parse_key(found.entry.key)
        return parts is not None and (found.folder == "" or older(*parts))

    return stale


def _prune(files: _EntryFiles, folder: str | None, max_bytes: Any, older_than: Any, *, stale: bool,
           dry_run: bool) -> tuple[int, int, int, int]:
    """Prune one ``folder`` of the store (None: all of it); returns PruneReport's fields."""
    limit, age = _check_max_bytes(max_bytes), _seconds(older_than, "older_than")
    now = time.time()
    entries, temps = files.prune(now, _stale_test(files) if stale else None, folder, dry_run)
    if stale and not dry_run:  # The failures of older code go with its entries.
        older = files.older_code()
        files.drop_failures(lambda r: older(str(r.get("function")), r.get("identity")), folder)
    swept = (0, 0)
    if limit is not None or age is not None:
        # By hand the store goes down to the size asked for, not to a low-water mark.
        swept = files.sweep(limit, None if age is None else now - age, folder, dry_run)
    return entries, temps, *swept


class _ShelfDict:
    """The bytes-keyed mapping that shelve.Shelf works on, over the entry files (Store reads and
    writes values itself). Shelf needs no sync() or close(): every write is in place when it returns."""

    def __init__(self, files: _EntryFiles) -> None:
        self.files = files

    def __delitem__(self, key: bytes) -> None:
        if not self.files.delete(key):
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        # Mapped: the stream is checked, and big buffers are not read.
        return isinstance(key, bytes) and self.files.read(key, mapped=True, use=False) is not None

    def keys(self) -> Iterator[bytes]:  # Memoized functions' entries too.
        now = time.time()
        for found in self.files.scan():
            if found.entry is not None and found.entry.live(now):
                yield found.entry.key

    def __len__(self) -> int:
        # Entry files on disk: may count expired or damaged entries until prune().
        return sum(1 for _ in self.files.files())


# Another process may delete a key between the listing and the read (or between shelve's `key in self.dict` and
# `self[key]`): the key is then simply absent, never a KeyError. The views below, and Store.get, skip it.

if TYPE_CHECKING:
    _ShelfBase = shelve.Shelf[Any]
else:
    _ShelfBase = object  # shelve.Shelf joins at the first open: see Store.__new__.


class _StoreItems(_collections_abc.ItemsView[str, "Any"]):  # "Any": typing is not imported at run time.
    _mapping: shelve.Shelf[Any]  # The store, as ItemsView keeps it (not in its stubs).

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        for key in self._mapping:
            try:
                yield key, self._mapping[key]
            except KeyError:
                pass


class _StoreValues(_collections_abc.ValuesView["Any"]):
    _mapping: shelve.Shelf[Any]

    def __iter__(self) -> Iterator[Any]:
        return (value for _key, value in _StoreItems(self._mapping))


# The class each Store class is made into at its first open: itself joined with shelve.Shelf.
_shelf_classes: dict[type, type] = {}


class Store(_ShelfBase):
    """donecache.open(filename, ...): a cache directory as a shelf, a drop-in for ``shelve.open(filename)``.

    The result is a :class:`shelve.Shelf` with str keys and picklable values,
    usable as a context manager. Unlike ``shelve.open``'s, it is safe for many
    threads and processes at once, a crash never corrupts it, a damaged entry
    reads as missing, and its format is the same on every Python and OS.

    filename: the cache directory (a str, bytes or path-like, as shelve.open takes).
    flag: ``"c"`` creates it if needed, ``"w"`` requires it to exist, ``"n"``
        empties it, ``"r"`` opens it read-only. protocol, writeback: as for shelve.open().
    durable: fsync each entry as it is written, so that it survives a power
        failure (a crash of the process it always survives). Slower.
    mmap: return values' big buffers (64 KiB or more: the data of NumPy arrays and
        pandas columns) as private copy-on-write maps of the entry files, not read:
        writable, and changes never reach the file.
    max_bytes: bound the entries to this many bytes on disk (None: no bound). A
        write that finds no room evicts the least recently used entries (a read is
        a use) down to 80% of it and logs the sweep (INFO, "donecache" logger). The
        bound is the whole directory's, memoized functions' entries included
        (docs/size-limit.md).
    compress: ``"zlib"`` (or True) or ``"lzma"``: as for memoize().
    trust_shared: open a directory that is not yours, or that group or others can
        write to; without it, PermissionError, because entries are pickles: loading
        one runs code its writer chose. Only for a team cache whose writers you all
        trust (docs/security.md).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Store:
        # shelve and pickle would be 4 ms of `import donecache`: they are imported at the first open, which makes the
        # store an instance of a class joining this one with shelve.Shelf (isinstance(store, shelve.Shelf) holds, and
        # shelve's own methods serve what this class leaves to them).
        real = _shelf_classes.get(cls)
        if real is None:
            import shelve

            real = cls if issubclass(cls, shelve.Shelf) else type(cls.__name__, (cls, shelve.Shelf), {
                "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
            })
            real = _shelf_classes.setdefault(cls, real)  # One class, whichever thread made it first.
        store: Store = object.__new__(real)
        return store

    def __init__(self, filename: AnyPath, flag: str = "c", protocol: int | None = None, writeback: bool = False, *,
                 durable: bool = False, mmap: bool = False, max_bytes: int | None = None, trust_shared: bool = False,
                 compress: bool | str = False) -> None:
        # Named and typed as in shelve.DbfilenameShelf; a bytes path is decoded
        # as the filesystem encoding says, as os.open would.
        self._compress = _check_compress(compress)
        self._files = _EntryFiles(os.fsdecode(filename), flag, durable, max_bytes, trust_shared)
        self.path = self._files.root
        self._mmap = mmap
        # shelve turns None into protocol 3; here None means 5, which keeps big buffers apart.
        self._pickle_protocol = 5 if protocol is None else protocol
        super().__init__(_ShelfDict(self._files), protocol, writeback, keyencoding="utf-8")  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"<donecache.Store {self.path!r}>"

    def _open_files(self) -> _EntryFiles:
        # Shelf.close() swaps self.dict for a marker that raises ValueError on
        # any use; what bypasses self.dict must refuse in the same way.
        if not isinstance(getattr(self, "dict", None), _ShelfDict):  # Shelf.dict: not in its stubs.
            raise ValueError(f"invalid operation on closed shelf {self.path!r}; open it again with donecache.open()")
        return self._files

    # Values are read and written here rather than by shelve, so that big buffers go to the file straight from the
    # value (protocol 5, unless protocol= asks for an older one) and come back in one allocation each, or mapped.
    # Otherwise this is shelve's own logic, writeback cache and all (`cache`, `writeback`: not in shelve's stubs).

    def __getitem__(self, key: str) -> Any:
        cache = getattr(self, "cache", {})
        if key in cache:
            return cache[key]
        entry = self._open_files().read(key.encode("utf-8"), mapped=self._mmap)
        if entry is None:
            raise KeyError(key)
        value = entry.load()
        if getattr(self, "writeback", False):  # False while shelve's sync() writes the cache back.
            cache[key] = value
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        if getattr(self, "writeback", False):
            getattr(self, "cache", {})[key] = value
        files = self._open_files()
        files.write(_encode_entry(key.encode("utf-8"), value, 0.0, self._pickle_protocol, 0.0, self._compress))

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def items(self) -> _StoreItems:
        return _StoreItems(self)

    def values(self) -> _StoreValues:
        return _StoreValues(self)

    def clear(self) -> None:
        """Remove every entry (much faster than deleting them one by one)."""
        files = self._open_files()
        getattr(self, "cache", {}).clear()
        files.clear()

    def prune(self, *, max_bytes: int | None = None, older_than: float | Any = None, dry_run: bool = False) -> int:
        """Remove expired and damaged entries (checking every byte of the others) and crashed
        writers' temporary files; then, as the command line's prune does, evict the least recently
        used entries until the store takes at most ``max_bytes`` on disk, and those not used for
        ``older_than`` (seconds or a timedelta). Returns how many files were (``dry_run``: would be) removed."""
        return sum(_prune(self._open_files(), None, max_bytes, older_than, stale=False, dry_run=dry_run)[:3])

    def verify(self) -> list[str]:
        """The paths of damaged entry files, checking every byte of every entry
        (reads do not check big buffers' checksums; prune() removes what this finds)."""
        return self._open_files().verify()


# The documented entry point, a drop-in for shelve.open(); Store is its class.
open = Store


# ---------------------------------------------------------------------------
# Memoize: keys
#
# A memoize key is
#     <module>:<qualname>|<16 hex digits: the code digest>|
# followed by "=" and the arguments' canonical text when that text is short, or by "#" and the hex BLAKE2b digest of the
# text when it is long. What counts in a key, rule by rule, is in docs/identity.md.
# ---------------------------------------------------------------------------

_SCALARS = frozenset({str, int, float, bool, type(None), bytes, complex})
_RAW_KEY_LIMIT = 96  # Longer argument texts are hashed.
_CO_VARARGS, _CO_VARKEYWORDS, _CO_COROUTINE = 0x04, 0x08, 0x80  # inspect.CO_*
_BIG_INT = 1 << 4000  # Larger ints are written in hex: decimal text has a digit limit (3.11+).
_BIG_VALUE = 1 << 16  # Longer str, bytes and bytearray arguments are hashed in place, not written out.
_FUNCTION_KINDS = (type(_delays), type(len), type(sys))  # Python functions, builtins, modules.


def _function_name(func: Any) -> str:
    """A callable's qualified name; a partial by what it wraps (its repr holds an address)."""
    import functools

    if isinstance(func, functools.partial):
        return f"partial({_function_name(func.func)})"
    return str(getattr(func, "__qualname__", None) or type(func).__qualname__)


_script_names: dict[str, str] = {}  # _module_name(): a main script's file -> its module name.


def _module_name(obj: Any) -> str:
    """The module that defines ``obj``; the main script by the name it would have if
    imported (pkg/job.py -> pkg.job), so that a script and its import share entries."""
    module = getattr(obj, "__module__", None) or "?"
    if module not in ("__main__", "__mp_main__"):
        return module
    main = sys.modules.get(module)
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name not in ("__main__", "__mp_main__"):
        return str(spec.name)
    script: str | None = getattr(main, "__file__", None)
    if not script:
        return "__main__"
    name = _script_names.get(script)
    if name is None:  # Worked out once: objects of the script's classes ask at every call.
        folder, stem = os.path.split(os.path.splitext(os.path.realpath(script))[0])
        name, package = stem, folder  # pkg/job.py is pkg.job while the folders above it are packages.
        while os.path.isfile(os.path.join(package, "__init__.py")) and os.path.basename(package).isidentifier():
            package, folder_name = os.path.split(package)
            name = f"{folder_name}.{name}"
        on_path = name != stem or any(os.path.realpath(entry or ".") == folder for entry in sys.path)
        name = _script_names[script] = name if stem.isidentifier() and on_path else "__main__"
    return name


def _reference(obj: Any) -> str:
    """module.qualname (see _module_name), or "module name"."""
    if isinstance(obj, type(sys)):
        return f"module {obj.__name__}"
    return f"{_module_name(obj)}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


def _cell_value(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # An empty cell: a name the function defines later.
        return "<empty cell>"


def _signed_nan(value: float | complex) -> str | None:
    """The text of a float or complex holding -nan (repr() writes "nan"); None for others."""
    import math

    parts = [("-nan" if math.copysign(1.0, p) < 0 else "nan") if p != p else repr(p) for p in (value.real, value.imag)]
    return f"{type(value).__name__}:{','.join(parts)}" if "-nan" in parts else None


def _buffer_digest(buffer: Any) -> str:
    """A digest of a buffer's bytes read in place, or of a str encoded a piece at a time."""
    import hashlib

    # SHA-256 runs at about 1.8 GB/s on CPUs with SHA extensions, twice BLAKE2b's speed.
    if isinstance(buffer, str):
        digest = hashlib.sha256()
        for start in range(0, len(buffer), 1 << 18):  # At most 1 MiB of UTF-8 at a time.
            piece = buffer[start : start + (1 << 18)]
            try:  # Latin-1 copies a one-byte-per-character string as it is, 30x faster than UTF-8.
                digest.update(b"L" + piece.encode("latin-1"))
            except UnicodeEncodeError:
                digest.update(b"U" + piece.encode("utf-8", "surrogatepass"))
        return digest.hexdigest()[:40]
    view = memoryview(buffer)
    return hashlib.sha256(view.cast("B") if view.c_contiguous else view.tobytes()).hexdigest()[:40]


def _no_code(obj: Any) -> str:
    raise TypeError(f"{_reference(obj)} is code where only constants were expected")


class _Canonical:
    """Writes a text that is equal for equal values in every process and run (docs/identity.md).

    1, 1.0, True and "1" stay apart, as their results may differ; dicts and sets are sorted by their items'
    texts, since their order depends on insertion and on PYTHONHASHSEED.

    Functions and classes count by ``code``, which the code identity section below
    passes in: the keys need the code identity, which needs canonical values.
    """

    __slots__ = ("code", "active")

    def __init__(self, code: Callable[[Any], str] = _no_code) -> None:
        self.code = code
        self.active: set[int] = set()  # The containers being written: a cycle is named, not followed.

    def text(self, value: Any) -> str:
        out: list[str] = []
        self.write(value, out)
        return "".join(out)

    def tagged(self, head: str, value: Any, out: list[str], tail: str = ">") -> None:
        out.append(head)
        self.write(value, out)
        out.append(tail)

    def write(self, value: Any, out: list[str]) -> None:
        kind = type(value)
        if kind in _SCALARS:
            if (kind is str or kind is bytes) and len(value) > _BIG_VALUE:
                out.append(f"<{kind.__name__} {len(value)} {_buffer_digest(value)}>")
            elif kind is int and not -_BIG_INT < value < _BIG_INT:
                out.append(f"int:{value:x}")
            elif (kind is float or kind is complex) and value != value:
                out.append(_signed_nan(value) or repr(value))
            else:
                out.append(repr(value))
            return
        active = self.active
        if id(value) in active:
            out.append("<cycle>")
            return
        active.add(id(value))
        try:
            if kind is tuple or kind is list:
                out.append("(" if kind is tuple else "[")
                for item in value:
                    self.write(item, out)
                    out.append(",")
                out.append(")" if kind is tuple else "]")
            elif kind is dict:
                out.append("{")
                out.extend(sorted(self.text(k) + ":" + self.text(v) + "," for k, v in value.items()))
                out.append("}")
            elif kind is set or kind is frozenset:
                out.append("set{" if kind is set else "frozenset{")
                out.extend(sorted(self.text(item) + "," for item in value))
                out.append("}")
            elif not self._code(value, out):
                self._object(value, out)
        finally:
            active.discard(id(value))

    def bytecode(self, code: Any) -> str:
        """A code object's bytecode, names and constants (line numbers aside), a line each."""
        out = [code.co_code.hex(), "\n"]
        out.append(repr((code.co_argcount, code.co_kwonlyargcount, code.co_flags, code.co_names, code.co_varnames)))
        for const in code.co_consts:
            out.append("\n")
            if hasattr(const, "co_code"):
                out.append(self.bytecode(const))
            else:
                self.write(const, out)
        return "".join(out)

    def _code(self, value: Any, out: list[str]) -> bool:
        """Functions, classes, partials and methods by their code; False for anything else."""
        import functools
        import types

        kind = type(value)
        if isinstance(value, type) or kind in _FUNCTION_KINDS:
            self_ = getattr(value, "__self__", None)
            if kind is type(len) and self_ is not None and not isinstance(self_, type(sys)):
                # A bound built-in method (english.get): what it is bound to counts.
                self.tagged(f"<built-in {value.__qualname__} of ", self_, out)
                return True
            reference = _reference(value)
            out.append(f"<{reference}")
            if kind is not type(sys):
                out.append(self.code(value))
            code = getattr(value, "__code__", None)
            if "<" in reference and code is not None:
                # A lambda or a local function: many share one name (and a line of
                # source), so its bytecode, defaults and closure count too.
                self.write((self.bytecode(code), value.__defaults__, value.__kwdefaults__), out)
                self.write(tuple(_cell_value(cell) for cell in value.__closure__ or ()), out)
            out.append(">")
        elif kind is types.MethodType:
            self.tagged("<method ", value.__func__, out, " of ")
            self.tagged("", value.__self__, out)
        elif isinstance(value, functools.partial):
            self.tagged("<partial ", (value.func, value.args, value.keywords), out)
        elif callable(value) and callable(getattr(value, "__wrapped__", None)):
            self.write(value.__wrapped__, out)  # memoize, lru_cache: what they wrap.
        else:
            return False
        return True

    def _object(self, value: Any, out: list[str]) -> None:
        kind = type(value)
        name = f"{_module_name(kind)}.{kind.__qualname__}"  # A script's class by its import name.
        if kind is bytearray or kind is memoryview:
            if kind is memoryview or len(value) > _BIG_VALUE:  # Smaller bytearrays keep their 0.2.0 key.
                shape = f"{value.format} {value.shape}" if kind is memoryview else len(value)
                out.append(f"<{kind.__name__} {shape} {_buffer_digest(value)}>")
                return
        pathlib = sys.modules.get("pathlib")
        if pathlib is not None and isinstance(value, pathlib.PurePath):
            # 3.13 moved the classes to pathlib._local and pickles a path as one
            # string; its parts are what every version agrees on (3.9-3.12's form).
            module = "pathlib" if kind.__module__.startswith("pathlib") else kind.__module__
            self.tagged(f"<{module}.{kind.__qualname__}:", tuple(value.parts), out, ";>")
            return
        re = sys.modules.get("re")
        if re is not None and kind is re.Pattern:
            self.tagged(f"<re.Pattern {value.flags}:", value.pattern, out)
            return
        if kind.__module__ == "numpy" and hasattr(value, "dtype") and hasattr(value, "shape"):
            dtype = str(value.dtype.descr) if value.dtype.names else value.dtype.str
            if value.dtype.hasobject:  # Python objects, not a buffer of numbers.
                self.tagged(f"<{name} {dtype} {value.shape}:", value.tolist(), out)
            else:
                data = value if value.flags.c_contiguous else value.copy(order="C")
                out.append(f"<{name} {dtype} {value.shape} {_buffer_digest(data.reshape(-1).view('u1'))}>")
            return
        pandas = sys.modules.get("pandas")
        if pandas is not None and isinstance(value, (pandas.DataFrame, pandas.Series, pandas.Index)):
            # By isinstance, not by module: pandas 3 names its classes' module "pandas".
            out.append(f"<{name} ")
            if isinstance(value, pandas.DataFrame):
                self.write(value.columns, out)
                self.write(value.index, out)
                for column in range(value.shape[1]):
                    series = value.iloc[:, column]
                    out.append(f"|{series.dtype}:")
                    self._pandas_values(series, out, pandas)
            else:  # A Series or an Index.
                names = value.names if isinstance(value, pandas.MultiIndex) else getattr(value, "name", None)
                out.append(f"{names!r} {value.dtype}:")
                if hasattr(value, "index"):
                    self.write(value.index, out)
                self._pandas_values(value, out, pandas)
            out.append(">")
            return
        if kind.__module__.partition(".")[0] in ("pyarrow", "polars") and self._arrow(value, out):
            return
        try:
            reduced = value.__reduce_ex__(4)
        except Exception as exc:
            raise TypeError(f"{name} cannot be taken apart as pickle would ({exc})") from None
        if isinstance(reduced, str):  # A module-level singleton, named.
            out.append(f"<{_module_name(kind)}.{reduced}>")
            return
        out.append(f"<{name}{self.code(kind)}:")  # The class's own code counts (its methods make the result).
        ordered = isinstance(value, collections.OrderedDict)  # Its order is part of its value (==).
        for index, part in enumerate(reduced[1:5]):
            if part is not None and index >= 2:  # listitems and dictitems are iterators.
                part = list(part) if index == 2 or ordered else dict(part)
            self.write(part, out)
            out.append(";")
        out.append(">")

    def _pandas_values(self, value: Any, out: list[str], pandas: Any) -> None:
        """A Series' or Index's values, a categorical's categories, a tz-aware column's instants."""
        dtype = value.dtype
        if isinstance(dtype, pandas.CategoricalDtype):
            self.tagged(f"ordered={dtype.ordered!r} categories=", dtype.categories, out, "")
        if isinstance(dtype, pandas.DatetimeTZDtype):  # str(dtype) above names the zone.
            self.write(value.to_numpy(dtype=f"datetime64[{dtype.unit}]"), out)
        else:
            self.write(value.to_numpy(), out)

    def _arrow(self, value: Any, out: list[str]) -> bool:
        """pyarrow values, and polars values as Arrow data (to_arrow() does not copy); False for others."""
        pyarrow, polars = sys.modules.get("pyarrow"), sys.modules.get("polars")
        if polars is not None and isinstance(value, (polars.DataFrame, polars.Series)):
            out.append(f"<polars.{type(value).__name__} {getattr(value, 'name', None)!r}:")
            self._arrow(value.to_arrow(), out)
        elif pyarrow is None:
            return False
        elif isinstance(value, (pyarrow.Table, pyarrow.RecordBatch)):
            out.append(f"<pyarrow.{type(value).__name__} {value.schema.to_string(show_schema_metadata=True)!r}:")
            for column in value.columns:
                self._arrow(column, out)
        elif isinstance(value, pyarrow.ChunkedArray):
            out.append(f"<pyarrow.ChunkedArray {value.type}:")
            for chunk in value.chunks:
                self._arrow(chunk, out)
        elif isinstance(value, pyarrow.Array):
            out.append(f"<pyarrow.Array {value.type} {value.offset} {len(value)}:")
            if value.type.num_fields or pyarrow.types.is_dictionary(value.type):
                self.write(value.to_pylist(), out)  # A child's offset is not in the buffers.
            else:
                out.extend(f"{buffer and _buffer_digest(buffer)}," for buffer in value.buffers())
        else:
            return False
        out.append(">")
        return True


class _Arguments:
    """Binds a call to the function's signature: f(1), f(x=1) and f() (when x=1
    is the default) give the same values, in parameter order."""

    def __init__(self, func: Any, ignore: Iterable[str], key: Callable[..., Any] | None = None) -> None:
        self._func = func
        self.function = _function_name(func)
        self._key = key
        self._signature: Any = None
        code = getattr(func, "__code__", None)
        defaults = getattr(func, "__defaults__", None) or ()
        kwdefaults = getattr(func, "__kwdefaults__", None) or {}
        self._fast = False
        if code is not None and not code.co_flags & (_CO_VARARGS | _CO_VARKEYWORDS):
            npos, nkw = code.co_argcount, code.co_kwonlyargcount
            self.names: tuple[str, ...] = code.co_varnames[: npos + nkw]
            kwonly = self.names[npos:]
            if all(name in kwdefaults for name in kwonly):  # Bound without inspect: args, then the defaults.
                self._fast = True
                self._npos, self._defaults = npos, tuple(defaults)
                self._kwdefaults = tuple(kwdefaults[name] for name in kwonly)
        if not self._fast:
            self.names = tuple(self._inspect().parameters)
        unknown = sorted(set(ignore) - set(self.names))
        if unknown:
            raise ValueError(
                f"ignore= names {', '.join(map(repr, unknown))}, which "
                f"{getattr(func, '__qualname__', func)}() has no parameter for; it has {', '.join(self.names)}"
            )
        self._keep = tuple(i for i, name in enumerate(self.names) if name not in set(ignore))
        self._all = len(self._keep) == len(self.names)
        # Whether equal positional arguments always bind to the same values:
        # not with key= (it may read anything) or a signature inspect binds.
        self.memoizable = self._fast and key is None

    def _inspect(self) -> Any:
        if self._signature is None:
            import inspect

            self._signature = inspect.signature(self._func)
        return self._signature

    def values(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        if self._key is not None:  # key=: what it returns stands for the arguments.
            return (self._key(*args, **kwargs),)
        if self._fast and not kwargs:
            missing = self._npos - len(args)
            if 0 <= missing <= len(self._defaults):
                values = args + self._defaults[len(self._defaults) - missing :] + self._kwdefaults
                return values if self._all else tuple(values[i] for i in self._keep)
        bound = self._inspect().bind(*args, **kwargs)  # Raises TypeError as the call would.
        bound.apply_defaults()
        values = tuple(bound.arguments.values())
        return values if self._all else tuple(values[i] for i in self._keep)

    def unkeyable(self, index: int, value: Any, reason: Exception) -> TypeError:
        """The error for a bound value (at ``index``) that has no canonical text."""
        plain = "str, int, float, bytes, None, and tuples, lists, dicts or sets of them"
        if self._key is not None:
            what, fix = "the value key= returned", f"Make key= return plain values: {plain}"
        else:
            name = self.names[self._keep[index]]
            what = f"argument {name!r}"
            fix = f"Leave it out with ignore=({name!r},), or build the key yourself with key=lambda ...: ..."
        return TypeError(
            f"{self.function}(): {what} ({type(value).__name__}) cannot be part of a cache key: {reason}. {fix}"
        )


_digests: dict[tuple[Any, ...], str] = {}  # file_digest()'s memo: (device, inode, size, mtime, ctime) -> digest.
_RACY_SECONDS = 2.0  # A file changed this recently may change again within its mtime's tick: never memoized.


def file_digest(path: StrPath, *, quick: bool = False) -> str:
    """A text that changes when the file at ``path`` changes, to return from key=
    (or pass as an argument) so that a new input file recomputes.

    The SHA-256 of the file's bytes; in one process, a file whose inode, size,
    mtime and ctime are unchanged is not read again, unless it changed in the
    last two seconds (a rewrite within one tick of a coarse clock keeps all four).
    ``quick=True`` reads nothing: size and mtime stand for the contents, which
    misses a rewrite that keeps both (``cp -p``, ``touch -r``). Anything but a
    regular file (a directory, a FIFO) is an OSError.
    """
    import hashlib

    fd, st = _open_regular(_fspath(path, "path"))
    try:
        if quick:
            return f"size={st.st_size} mtime_ns={st.st_mtime_ns}"
        memo = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        digest = _digests.get(memo)
        if digest is None:
            sha, chunk = hashlib.sha256(), bytearray(1 << 20)
            with io.FileIO(fd, "rb", closefd=False) as reader:
                for got in iter(lambda: reader.readinto(chunk), 0):
                    sha.update(memoryview(chunk)[:got])
            digest = f"sha256={sha.hexdigest()}"
            if time.time() - max(st.st_mtime, st.st_ctime) > _RACY_SECONDS:
                while len(_digests) >= 4096:
                    del _digests[next(iter(_digests))]
                _digests[memo] = digest
        return digest
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# Code identity
#
# Without version=, a memoized function's entries belong to its code: its syntax tree (docstrings aside), the
# module-level values it reads (by canonical value), and the user's own functions, classes and modules it reaches,
# transitively. Installed distributions count by their RECORD (the hashes of their files), the standard library not
# at all. What cannot be followed (eval, open, the environment, a value with no canonical form) is named in one
# warning. The rules in full: docs/identity.md.
# ---------------------------------------------------------------------------

# Read from the syntax tree, never from the text: fields that say how it was written.
_TREE_SKIP = frozenset({"kind", "type_comment", "lineno", "col_offset", "end_lineno", "end_col_offset"})
_DOCUMENTED = ("FunctionDef", "AsyncFunctionDef", "ClassDef")
# Names whose use donecache cannot follow, and what they do.
_UNSEEN = {"eval": "eval()", "exec": "exec()", "open": "open() (files read at run time)", "__import__": "__import__()",
           "import_module": "importlib.import_module()", "environ": "os.environ", "getenv": "os.getenv()"}
_WHOLE_MODULE = frozenset({"getattr", "globals", "vars"})
_CLASS_SKIP = frozenset({"__dict__", "__weakref__", "__module__", "__qualname__", "__doc__", "__firstlineno__",
                         "__static_attributes__", "__annotations__", "__orig_bases__", "__parameters__"})
_SINK_METHODS = frozenset({"append", "extend", "add", "update", "insert", "clear", "discard", "remove"})
_learnt: dict[Any, Any] = {}  # Per process: what each source file, RECORD and site directory told.


def _digest_text(text: str) -> str:
    import hashlib

    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _code_digest(code: Any) -> str:
    return _digest_text(_Canonical().bytecode(code))[:16]


def _origin_file(obj: Any) -> str | None:
    """The file that defines a module, function or class (None: built in, or no file)."""
    if isinstance(obj, type(sys)):
        file = getattr(obj, "__file__", None)
        if file is None:  # A namespace package: where its folders are.
            file = next(iter(getattr(obj, "__path__", None) or ()), None)
        return file if isinstance(file, str) else None
    code = getattr(obj, "__code__", None)
    if hasattr(code, "co_filename") and not isinstance(obj, type):
        return str(code.co_filename)  # type: ignore[union-attr]
    file = getattr(sys.modules.get(getattr(obj, "__module__", None) or ""), "__file__", None)
    if file is None and isinstance(obj, type):  # A class made in a module with no file: by its methods' file.
        codes = (getattr(getattr(member, "__func__", member), "__code__", None) for member in vars(obj).values())
        file = next((code.co_filename for code in codes if code), None)
    return file if isinstance(file, str) else None


def _dist_infos(site: str) -> list[str]:
    return sorted(entry.path for entry in _scandir(site) if entry.name.endswith(".dist-info"))


def _distribution(site: str, name: str, top: str) -> str:
    """An installed distribution by its RECORD's digest: a reinstall under the same version counts as new code."""
    name = name.partition(".")[0]  # pkg, pkg.py, pkg.cpython-311-x86_64-linux-gnu.so
    owners = _learnt.get(("site", site))
    if owners is None:  # Which distribution installed each top-level name, once per site directory.
        owners = _learnt[("site", site)] = {}
        for found in _dist_infos(site):
            normal = os.path.basename(found).partition("-")[0].lower().replace(".", "_")
            for owned in (_read_text(os.path.join(found, "top_level.txt")) or "").split() or [normal]:
                owners.setdefault(owned, found)
    if name not in owners:  # A name no top_level.txt lists: look for it in the RECORDs, once.
        owners[name] = ""
        for found in _dist_infos(site):
            text = "\n" + (_read_text(os.path.join(found, "RECORD")) or "")
            if f"\n{name}/" in text or f"\n{name}." in text:
                owners[name] = found
                break
    info = str(owners[name])
    record = os.path.join(info, "RECORD") if info else ""
    try:
        st = os.stat(record)
    except (OSError, ValueError):
        version = getattr(sys.modules.get(top), "__version__", None)
        return f"library {top}=={version if isinstance(version, str) else '?'}"
    stamp = ("record", record, st.st_size, st.st_mtime_ns)
    if stamp not in _learnt:
        import hashlib

        digest = hashlib.blake2b(_file_head(record, st.st_size), digest_size=8).hexdigest()
        _learnt[stamp] = f"library {os.path.basename(info)} {digest}"
    return _learnt[stamp]  # type: ignore[no-any-return]


def _library(obj: Any) -> str | None:
    """How code counts, by where its file lives (not its module's name): None for the user's own (followed),
    "" for the standard library and built-ins, "library <distribution> <RECORD digest>" for an installed one."""
    module = obj.__name__ if isinstance(obj, type(sys)) else getattr(obj, "__module__", None) or ""
    file = _origin_file(obj)
    top = module.partition(".")[0]
    if file is None or file.startswith("<"):  # Built in, frozen, or typed in (a REPL, exec).
        known = top in sys.builtin_module_names or top in getattr(sys, "stdlib_module_names", ())
        imported = file is None and top not in ("__main__", "__mp_main__") and module in sys.modules
        return "" if known or imported else None
    if file == __file__:
        return ""  # donecache itself.
    stamp = ("where", file)
    if stamp not in _learnt:
        if "stdlib" not in _learnt:  # Where os.py lives (a venv's too); lib-dynload is inside it.
            _learnt["stdlib"] = os.path.join(os.path.realpath(os.path.dirname(os.__file__)), "")
        path = os.path.realpath(file)
        parts = path.split(os.sep)
        site = next((i for i, part in enumerate(parts) if part in ("site-packages", "dist-packages")), None)
        if site is not None and site + 1 < len(parts):
            found: str | None = _distribution(os.sep.join(parts[: site + 1]), parts[site + 1], top)
        else:
            found = "" if path.startswith(_learnt["stdlib"]) else None
        _learnt[stamp] = found
    return _learnt[stamp]  # type: ignore[no-any-return]


def _decorator_name(node: Any) -> str:
    node = getattr(node, "func", node)
    return str(getattr(node, "attr", None) or getattr(node, "id", ""))


def _tree_text(node: Any, out: list[str], texts: dict[int, str]) -> None:
    import ast

    if isinstance(node, list):
        out.append("[")
        for item in node:
            _tree_text(item, out, texts)
            out.append(",")
        out.append("]")
    elif not isinstance(node, ast.AST):
        out.append(repr(node))
    elif id(node) in texts:  # A nested def or class, digested already.
        out.append(texts[id(node)])
    else:
        kind = type(node).__name__
        out.append(kind + "(")
        for name, value in ast.iter_fields(node):
            # Empty fields are left out: 3.12 added type_params, and 3.13's ast leaves empties out.
            if name in _TREE_SKIP or value is None or (isinstance(value, list) and not value):
                continue
            if name == "body" and kind in _DOCUMENTED and isinstance(value[0], ast.Expr):
                if isinstance(value[0].value, ast.Constant) and isinstance(value[0].value.value, str):
                    value = value[1:]  # The docstring.
            elif name == "decorator_list":  # memoize's own options (ttl=, path) are not the code.
                value = [d for d in value if _decorator_name(d) != "memoize"]
            out.append(name + "=")
            _tree_text(value, out, texts)
            out.append(",")
        out.append(")")


def _nested_codes(code: Any) -> list[Any]:
    """A code object, then the code objects nested in it, depth first."""
    found, todo = [], [code]
    while todo:
        found.append(todo.pop())
        todo += [const for const in found[-1].co_consts if hasattr(const, "co_code")]
    return found


def _parse_source(path: str, data: bytes) -> dict[str, Any] | None:
    """For each def and lambda (by "co_firstlineno co_name"), its tree digest and the
    digests of the code a fresh compile makes there; for each class, its tree digest."""
    import ast

    try:
        tree = ast.parse(data, path)
        code = compile(tree, path, "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    order: list[tuple[Any, str]] = []  # Every def, lambda and class after its parents.
    todo: list[tuple[Any, str]] = [(tree, "")]
    while todo:
        node, prefix = todo.pop()
        for child in ast.iter_child_nodes(node):
            inner = prefix
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                name = getattr(child, "name", "<lambda>")
                order.append((child, prefix + name))
                inner = prefix + name + ("." if isinstance(child, ast.ClassDef) else ".<locals>.")
            todo.append((child, inner))
    texts: dict[int, str] = {}
    functions: dict[str, list[Any]] = {}
    classes: dict[str, str] = {}
    for node, qualname in reversed(order):  # Inner ones first: an outer one reuses their digests.
        out: list[str] = []
        _tree_text(node, out, texts)
        texts[id(node)] = digest = _digest_text("".join(out))
        if isinstance(node, ast.ClassDef):
            classes[qualname] = digest
        else:  # co_firstlineno is the first decorator's line.
            line = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", ())])
            found = functions.setdefault(f"{line} {getattr(node, 'name', '<lambda>')}", ["", []])
            found[0] = digest + ";" + found[0]
    for inner in _nested_codes(code)[1:]:
        functions.setdefault(f"{inner.co_firstlineno} {inner.co_name}", ["", []])[1].append(_code_digest(inner))
    return {"functions": functions, "classes": classes}


def _source_notes(path: str, notes: dict[str, Any] | None) -> dict[str, Any] | None:
    """_parse_source's answer by path, size and mtime: this process's, else the store's notes, else parsed."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    stamp = [st.st_size, st.st_mtime_ns]
    known = _learnt.get(("source", path))
    if known is None or known.get("stamp") != stamp:
        known = (notes or {}).get(path)
        if not isinstance(known, dict) or known.get("stamp") != stamp:
            known = _parse_source(path, _file_head(path, st.st_size)) or {}
            known["stamp"] = stamp
            if notes is not None:
                notes[path] = known
                notes[""] = True  # Changed: to be written back.
        _learnt[("source", path)] = known
    return known if "functions" in known else None


def _function_text(func: Any, notes: dict[str, Any] | None) -> str:
    """Its tree digest when its file still holds this code (a fresh compile's bytecode is
    the same), else its bytecode: a file edited after import must not name the old code."""
    code = func.__code__
    known = None if code.co_filename.startswith("<") else _source_notes(code.co_filename, notes)
    tree, compiled = (known or {}).get("functions", {}).get(f"{code.co_firstlineno} {code.co_name}", ("", ()))
    return f"tree {tree}" if tree and _code_digest(code) in compiled else f"bytecode {_Canonical().bytecode(code)}"


def _is_constant(value: Any) -> bool:
    kind = type(value)
    return kind in _SCALARS or ((kind is tuple or kind is frozenset) and all(map(_is_constant, value)))


def _loads(code: Any) -> tuple[set[str], set[str]]:
    """The names it loads as globals or builtins, and those it uses only to add to
    (calls.append(x), seen.add(x)): outputs, not inputs, so their contents do not count."""
    import dis

    loaded: set[str] = set()
    adds_only: dict[str, bool] = {}
    for inner in _nested_codes(code):
        instructions = list(dis.get_instructions(inner))
        for here, after in zip(instructions, instructions[1:] + instructions[:1]):
            if here.opname in ("LOAD_GLOBAL", "LOAD_DEREF", "LOAD_NAME", "LOAD_CLASSDEREF"):
                adds = after.opname in ("LOAD_ATTR", "LOAD_METHOD") and after.argval in _SINK_METHODS
                adds_only[here.argval] = adds_only.get(here.argval, True) and adds
                if here.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
                    loaded.add(here.argval)
    return loaded, {name for name, adds in adds_only.items() if adds}


def _imported_in(code: Any, package: str) -> list[Any]:
    """The modules its imports name, imported now (the call is about to; one that fails is left to the call)."""
    import dis
    import importlib.util

    found = []
    for inner in _nested_codes(code):
        if dis.opmap["IMPORT_NAME"] not in inner.co_code[::2]:  # Most code imports nothing: no dis for it.
            continue
        instructions = list(dis.get_instructions(inner))
        for index, here in enumerate(instructions):
            if here.opname != "IMPORT_NAME" or index < 2:
                continue
            level, fromlist = instructions[index - 2].argval, instructions[index - 1].argval
            try:
                name = importlib.util.resolve_name("." * level + here.argval, package) if level else here.argval
                found.append(importlib.import_module(name))
                for sub in fromlist or ():
                    if not hasattr(found[-1], sub):
                        found.append(importlib.import_module(f"{name}.{sub}"))
            except Exception:
                continue
    return found


_exec_count: list[int] = []  # exec() calls in this process, counted once a memoized function is called.


def _count_exec(event: str, args: tuple[Any, ...]) -> None:
    # An audit hook (PEP 578): cells, reloads and imports run their code through exec().
    if event == "exec":
        _exec_count[0] += 1


# Functions and classes passed as arguments: their code, worked out once per object (following code costs ms).
_argument_codes: weakref.WeakKeyDictionary[Any, str] | None = None  # Made by _runtime_imports.
_WEAK_TABLES["_argument_codes"] = "WeakKeyDictionary"


class _CodeIdentity:
    """What a function's code depends on (texts to digest), the bindings it read (to
    notice a redefinition or a reload) and what it could not see (to warn about)."""

    def __init__(self, notes: dict[str, Any] | None = None) -> None:
        self.notes = notes  # What the store says of source files (see _source_notes).
        self.parts: set[str] = set()
        self.unseen: dict[str, None] = {}
        self.watched: dict[int, tuple[Any, dict[str, Any]]] = {}
        self.codes: list[tuple[Any, Any]] = []  # (function, its code when followed)
        # What was followed, by id (a module with the names read of it by both ids), held so no id is reused.
        self._seen: dict[Any, Any] = {}
        self._active: set[int] = set()  # The containers being written (a cycle is named).

    def digest(self) -> str:
        return _digest_text("\0".join(sorted(self.parts)))[:16]

    def same(self, home: Any) -> Callable[[], bool]:
        """A check, before each call, that the bindings read are the same objects: those in ``home`` (a script's,
        a notebook's globals) at every call, the others after an exec() (a cell, a reload, an import): a hit
        costs a few dict reads."""
        if not _exec_count:
            _exec_count.append(0)
            try:
                sys.addaudithook(_count_exec)
            except Exception:  # Refused by another hook: check every binding at every call.
                _exec_count[0] = -1
        watched = {key: (mapping, found) for key, (mapping, found) in self.watched.items() if found}
        everything = [(mapping.get, tuple(found), tuple(found.values())) for mapping, found in watched.values()]
        local = [check for key, check in zip(watched, everything) if key == id(home)]
        seen, codes = [_exec_count[0]], list(self.codes)

        def unchanged(checks: list[tuple[Any, tuple[str, ...], tuple[Any, ...]]]) -> bool:
            try:
                for get, names, values in checks:
                    if tuple(map(get, names)) != values:
                        return False
            except Exception:  # A value whose == is not a bool (an array): it was replaced.
                return False
            return True

        def same() -> bool:
            if _exec_count[0] == seen[0] >= 0:
                return not local or unchanged(local)  # No call for a function that reads no global of its module.
            count = _exec_count[0]  # %autoreload also swaps the code of the old function objects.
            if unchanged(everything) and all(func.__code__ is code for func, code in codes):
                seen[0] = count
                return True
            return False

        return same

    def _watch(self, mapping: Any, names: Iterable[str]) -> None:
        self.watched.setdefault(id(mapping), (mapping, {}))[1].update({name: mapping.get(name) for name in names})

    def follow(self, obj: Any, root: bool = False) -> None:
        """Add a function, class or callable object, and what it uses, unless it is library code."""
        import functools
        import inspect

        if id(obj) in self._seen:
            return
        self._seen[id(obj)] = obj
        if isinstance(obj, functools.partial):
            self.follow(obj.func, root)
            self.parts.add(f"partial {_reference(obj.func)} {self.text(obj.args)} {self.text(obj.keywords)}")
            return
        if inspect.ismethod(obj):  # A bound method: its function and its object.
            self.follow(obj.__func__, root)
            self.parts.add(f"bound {_reference(obj.__func__)} {self.text(obj.__self__)}")
            return
        try:
            inner = obj if inspect.isclass(obj) else inspect.unwrap(obj)
        except ValueError:
            inner = obj
        if inner is not obj:  # A decorated function (or a memoized one): what it wraps counts,
            self.follow(inner, root)  # even where the wrapper is library code.
        registry = getattr(obj, "registry", None)
        if hasattr(obj, "dispatch") and isinstance(registry, collections.abc.Mapping):
            for implementation in list(registry.values()):  # functools.singledispatch
                self.follow(implementation)
        library = None if root or inspect.ismodule(obj) else _library(obj)
        if library is not None:
            if library:
                self.parts.add(library)
            return
        if inspect.isclass(obj):
            self._class(obj)
            return
        code = getattr(obj, "__code__", None)
        if code is None:  # A callable object: its class's code and its state.
            if not inspect.isbuiltin(obj) and inner is obj:
                self.follow(type(obj))
                self.parts.add(f"object {_reference(type(obj))} {self.text(getattr(obj, '__dict__', obj))}")
            return
        self.parts.add(f"def {_reference(obj)}\n{_function_text(obj, self.notes)}")
        self.codes.append((obj, code))
        owner: Any = obj.__globals__ if "<" not in obj.__qualname__ else None
        for part in obj.__qualname__.split(".")[:-1]:  # A method: its class (self.RATE, self.step()).
            owner = owner.get(part) if isinstance(owner, dict) else getattr(owner, part, None)
        if inspect.isclass(owner):
            self.follow(owner)
        self.uses(obj)

    def _class(self, cls: type) -> None:
        """A class: its source, its bases along the MRO, its methods, properties and class attributes."""
        import functools
        import inspect

        file = _origin_file(cls)
        known = _source_notes(file, self.notes) if file and not file.startswith("<") else None
        self.parts.add(f"class {_reference(cls)}\n{(known or {}).get('classes', {}).get(cls.__qualname__, '')}")
        for base in cls.__mro__[1:]:
            if base is not object:
                self.follow(base)
        members = {name: value for name, value in vars(cls).items() if name not in _CLASS_SKIP}
        self._watch(vars(cls), members)
        for name, member in sorted(members.items()):
            member = getattr(member, "__func__", member)  # staticmethod, classmethod
            if isinstance(member, (property, functools.cached_property)):
                for accessor in (getattr(member, part, None) for part in ("fget", "fset", "fdel", "func")):
                    if accessor is not None:
                        self.follow(accessor)
            elif inspect.isfunction(member) and member.__code__.co_filename == "<string>":
                continue  # Made by dataclass or namedtuple from what the class states.
            else:
                self.value(f"{_reference(cls)}.{name}", member, set())

    def uses(self, func: Any) -> None:
        """What ``func`` reads (globals, modules, closure, defaults); what cannot be followed."""
        code = func.__code__
        names = {name for inner in _nested_codes(code) for name in inner.co_names}  # Globals and attributes read.
        scope = getattr(func, "__globals__", {})
        where = _reference(func)
        self._watch(scope, names & scope.keys())
        mutable = [name for name in names & scope.keys() if type(scope[name]) in (list, dict, set)]
        cells = zip(code.co_freevars, func.__closure__ or ())
        mutable += [name for name, cell in cells if type(_cell_value(cell)) in (list, dict, set)]
        sinks = _loads(code)[1] if mutable else set()
        for name in sorted(names & scope.keys() - sinks):
            self.value(name, scope[name], names)
        for module in _imported_in(code, str(scope.get("__package__") or "")):
            self.value(module.__name__, module, names)
        for name, cell in zip(code.co_freevars, getattr(func, "__closure__", None) or ()):
            if name not in sinks:
                self.value(f"{where} closure {name}", _cell_value(cell), names)
        for index, default in enumerate([*(func.__defaults__ or ()), *(func.__kwdefaults__ or {}).values()]):
            self.value(f"{where} default {index}", default, set())
        suspect = (names & (_UNSEEN.keys() | _WHOLE_MODULE)) - scope.keys()
        loaded = _loads(code)[0] & suspect if suspect else set()
        for name in sorted(suspect & _UNSEEN.keys()):
            if name in loaded or name in ("environ", "getenv", "import_module"):
                self.unseen[f"{_UNSEEN[name]} in {where}()"] = None
        if loaded & _WHOLE_MODULE:  # getattr(module, name), globals(), vars(): the whole module counts.
            for value in [sys.modules.get(getattr(func, "__module__", None) or ""), *scope.values()]:
                if isinstance(value, type(sys)) and _library(value) is None:
                    self.value(value.__name__, value, set(vars(value)))

    def value(self, name: str, value: Any, names: set[str]) -> None:
        """A value the code reads: a module (its attributes that are read), code (followed), or data."""
        import inspect

        if _is_constant(value):
            self.parts.add(f"constant {name}={_Canonical().text(value)}")
        elif inspect.ismodule(value):
            library = _library(value)
            if library:
                self.parts.add(library)
            elif library is None and (id(value), id(names)) not in self._seen:
                self._seen[id(value), id(names)] = names
                read = sorted(names & vars(value).keys())
                self._watch(vars(value), read)
                for attribute in read:
                    if not attribute.startswith("__"):
                        self.value(f"{value.__name__}.{attribute}", getattr(value, attribute), names)
        elif callable(value):
            self.follow(value)
        else:
            self.parts.add(f"value {name}={self.text(value, name)}")

    def text(self, value: Any, name: str = "") -> str:
        """Data by canonical value, code in it followed, a user's class's instance with its class."""
        kind = type(value)
        if kind in _SCALARS:
            return repr(value)
        if id(value) in self._active:
            return "<cycle>"
        self._active.add(id(value))
        try:
            import inspect

            if kind in (tuple, list):
                try:
                    if _SCALARS.issuperset(map(type, value)):
                        return kind.__name__ + repr(value)  # Plain data, at C speed.
                except ValueError:  # An int too long for decimal text.
                    pass
                return kind.__name__ + "(" + ",".join(map(self.text, value)) + ")"
            if kind in (dict, set, frozenset):
                items = value.items() if kind is dict else ((item, None) for item in value)
                pairs = sorted(f"{self.text(k)}:{self.text(v)}" for k, v in items)
                return kind.__name__ + "{" + ",".join(pairs) + "}"
            if callable(value) and not inspect.isbuiltin(value) and not kind.__module__.startswith("numpy"):
                self.follow(value)
                return f"<code {_reference(value)}>"
            if kind.__module__ in ("_thread", "threading", "multiprocessing.synchronize", "asyncio.locks"):
                return f"<{kind.__name__}>"  # A lock is how the code waits, not what it computes.
            if not isinstance(value, type(sys)) and _library(kind) is None:
                self.follow(kind)
            try:
                return _Canonical(self.argument_code).text(value)
            except Exception as exc:  # No canonical form: its attributes, or a warning.
                state = getattr(value, "__dict__", None)
                if isinstance(state, dict):
                    return f"<{_reference(kind)} {self.text(state)}>"
                self.unseen[f"the value of {name or 'a ' + kind.__name__} ({kind.__name__}: {exc})"] = None
                return f"<unseen {_reference(kind)}>"
        finally:
            self._active.discard(id(value))

    _working: set[tuple[int, int]] = set()  # (thread, id) of the arguments whose code is being worked out.

    @classmethod
    def argument_code(cls, obj: Any) -> str:
        """The code of a function or class in a key: nothing for the standard library, the
        distribution for an installed one, else its code identity (an edit recomputes)."""
        if _argument_codes is None:  # Made at decoration: here if a key is built without one.
            _runtime_imports()
        assert _argument_codes is not None
        try:
            return _argument_codes[obj]
        except (KeyError, TypeError):  # TypeError: unhashable, or no weak reference.
            pass
        library = _library(obj)  # Decided by where its file lives (a script's module is its own code).
        if library is None:
            # A class whose attributes hold its own instances (every Enum) reaches itself while its code is worked
            # out: that is the code being digested. Followed again, it recursed until RecursionError, whose fallback
            # text depended on the caller's stack depth: the same argument got another key per call site.
            working = (_thread.get_ident(), id(obj))
            if working in cls._working:
                return " <itself>"
            cls._working.add(working)
            try:
                followed = cls()
                followed.follow(obj, root=True)
                code = " " + followed.digest()
            finally:
                cls._working.discard(working)
        else:
            code = " " + library if library else ""
        try:
            _argument_codes[obj] = code
        except TypeError:
            pass
        return code


_argument_code = _CodeIdentity.argument_code  # Bound once: keys ask for it at every call with code in it.


def _follow(func: Any, store: str | None = None) -> _CodeIdentity:
    """Follow ``func``, keeping what source files told in ``store``/.sources (per interpreter) for later processes."""
    path = os.path.join(store, ".sources", f"{sys.implementation.cache_tag}.json") if store else None
    notes = _learnt.get(("notes", path))
    if path is not None and notes is None:
        # Read whole: the notes of a big project outgrow _read_json's usual 64 KiB.
        notes = _learnt[("notes", path)] = _read_json(path, None) or {}
    identity = _CodeIdentity(notes)
    identity.follow(func, root=True)
    if path is not None and notes is not None and notes.pop("", None):
        try:
            _write_json(path, notes, 0o700, False)
        except OSError:
            pass  # Only a cost: the next process parses the files again.
    return identity


def _unchanged() -> bool:
    return True


def _text(value: Any) -> str:
    """The canonical text of a value (see _Canonical), code passed in it by its code identity."""
    return _Canonical(_argument_code).text(value)


def _closure_text(func: Any) -> str:
    """Part of every key: a closure's constants (outer(2) and outer(3) make different
    functions) and a partial's arguments; its other values count in the code identity."""
    import functools
    import inspect

    values: list[Any] = []
    while isinstance(func, functools.partial):
        values += [func.args, func.keywords]
        func = func.func
    for layer in {id(f): f for f in (func, inspect.unwrap(func))}.values():
        code = getattr(layer, "__code__", None)
        for name, cell in zip(code.co_freevars if code else (), getattr(layer, "__closure__", None) or ()):
            value = _cell_value(cell)
            if _is_constant(value):
                values.append((name, value))
    if not values:
        return ""
    try:
        return "closure " + _text(tuple(values)) + ";"
    except (TypeError, ValueError, RecursionError) as exc:
        qualname = getattr(func, "__qualname__", func)
        raise TypeError(f"{qualname}(): the arguments of the partial cannot be part of a cache key: {exc}") from None


# -- the key: a call's arguments, with the code passed in them -------------------


def _is_big(value: Any) -> bool:
    return (type(value) is str or type(value) is bytes) and len(value) > _BIG_VALUE


def _make_key(prefix: bytes, closure: str, values: tuple[Any, ...], arguments: _Arguments,
              blake2b: Callable[..., Any]) -> bytes:
    """``prefix`` (identity and code digest), the closure's text, then a call's bound values."""
    text = None
    if _SCALARS.issuperset(map(type, values)) and not any(map(_is_big, values)):
        try:
            text = repr(values)  # A tuple of scalars: repr() is already canonical...
        except ValueError:  # An int too long for decimal text: _Canonical writes hex.
            pass
        else:  # ...but for -nan, which repr() writes as "nan".
            if "nan" in text and any(type(value) in (float, complex) and _signed_nan(value) for value in values):
                text = None
    if text is None:
        out: list[str] = []
        canonical = _Canonical(_argument_code)
        for index, value in enumerate(values):
            try:
                canonical.write(value, out)
            except (TypeError, ValueError, RecursionError) as exc:
                raise arguments.unkeyable(index, value, exc) from None
            out.append(",")
        text = "".join(out)
    raw = (closure + text).encode("utf-8", "surrogatepass")
    # Short texts (a few scalars, the common case) go into the key as they are: the store hashes the key for the
    # file name anyway, so hashing here too would cost a second digest on every call. Long ones are hashed to bound
    # the key. The tag keeps the two forms from ever meaning the same thing.
    if len(raw) <= _RAW_KEY_LIMIT:
        return prefix + b"=" + raw
    digest: str = blake2b(raw, digest_size=20).hexdigest()
    return prefix + b"#" + digest.encode("ascii")


# ---------------------------------------------------------------------------
# Memoize
# ---------------------------------------------------------------------------


class DonecacheWarning(UserWarning):
    """A result was computed but could not be cached (the reason is in the message)."""


def _warn(message: str) -> None:
    """Warn at the user's line: the first frame outside this module."""
    import warnings

    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, DonecacheWarning, stacklevel=level)


if TYPE_CHECKING:

    class CacheInfo(NamedTuple):
        hits: int
        misses: int
        maxsize: int | None
        currsize: int
        held_seconds: float = 0.0
        saved_seconds: float = 0.0

    class PruneReport(NamedTuple):
        removed: int
        temporary_files: int
        evicted: int
        evicted_bytes: int

    class _BatchOptions(NamedTuple):
        keep_going: bool
        workers: int | None
        processes: bool
        executor: Any
        chunksize: int | None
        progress: Any
        retry_failures: bool
        shard: tuple[int, int] | None
        label: Callable[..., Any] | None


# The records are collections.namedtuple classes made at their first use (a call, or `donecache.CacheInfo` through
# the module's __getattr__): collections is not loaded at startup in a venv or under -S, and import time is a
# budget (issue 20). Type checkers see the NamedTuple classes above.
_RECORDS: dict[str, tuple[str, tuple[Any, ...], str]] = {
    "CacheInfo": ("hits misses maxsize currsize held_seconds saved_seconds", (0.0, 0.0), """\
functools.lru_cache's fields, then donecache's: hits and misses, this process's calls answered
    from the cache and computed; maxsize, the store's max_bytes (bytes on disk, not entries) or None;
    currsize, this function's live entries on disk; held_seconds, the computation time they hold (as
    each entry recorded it); saved_seconds, the computation time this process's hits did not repeat."""),
    "PruneReport": ("removed temporary_files evicted evicted_bytes", (), """\
What f.prune() did (dry_run=True: would do): expired, damaged or stale entries removed, crashed
    writers' temporary files removed, least recently used entries evicted and their bytes on disk."""),
    "_BatchOptions": ("keep_going workers processes executor chunksize progress retry_failures shard label", (),
                      "The options of f.map() and f.imap(), as map() names them."),
}
_made_records: dict[str, Any] = {}


def _record(name: str) -> Any:
    made = _made_records.get(name)
    if made is None:
        import collections

        fields, defaults, doc = _RECORDS[name]
        namedtuple: Any = collections.namedtuple  # Fields from a table: no literal for mypy's plugin.
        made = namedtuple(name, fields, defaults=defaults, module=__name__)
        made.__doc__ = doc or made.__doc__
        made = _made_records.setdefault(name, made)  # One class, whichever thread made it first.
    return made


if not TYPE_CHECKING:  # Hidden from type checkers, which would then allow any name.

    def __getattr__(name: str) -> Any:
        if name in _RECORDS and not name.startswith("_"):
            return _record(name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_MISSING: Any = object()


# -- the switch: DONECACHE=off, or donecache.disabled() ------------------------
#
# Checked on every call: os.environ.get() encodes its key and raises KeyError inside when the variable is unset
# (0.57 us, 14% of a hit, on 3.11), so the mapping under it is read, with the key encoded once as os.environ does
# (bytes on POSIX, upper case on Windows).
_ENVIRON: Any = getattr(os.environ, "_data", None)
if _ENVIRON is not None:
    _SWITCH_KEY: Any = os.environ.encodekey("DONECACHE")
    _env_text: Callable[[Any], str] = os.environ.decodevalue
else:  # pragma: no cover - an os.environ without CPython's internals
    _ENVIRON, _SWITCH_KEY, _env_text = os.environ, "DONECACHE", str
_off_depth = 0  # How many disabled() blocks are open, in all threads.
_off_guard = _thread.allocate_lock()
_SWITCH_WORDS = dict.fromkeys(("0", "false", "no", "off"), True) | dict.fromkeys(("1", "true", "yes", "on"), False)
_switch_warned: set[str] = set()


def _switched_off() -> bool:
    """True while memoize calls straight through: inside disabled(), or with DONECACHE=off."""
    if _off_depth:
        return True
    raw = _ENVIRON.get(_SWITCH_KEY)
    if raw is None:
        return False
    value = _env_text(raw)
    off = _SWITCH_WORDS.get(value.strip().lower())
    # Once per value: this runs at every call, and it must never raise there.
    if off is None and value.strip() and value not in _switch_warned:
        _switch_warned.add(value)
        _warn(f"the environment variable DONECACHE={value!r} is not understood, so caching stays on; "
              "set it to off (or 0, false, no) or on (or 1, true, yes)")  # fmt: skip
    return bool(off)


class _Disabled:
    """What disabled() returns: a context manager, usable again and nested."""

    def __enter__(self) -> None:
        global _off_depth
        with _off_guard:
            _off_depth += 1

    def __exit__(self, *exc_info: object) -> None:
        global _off_depth
        with _off_guard:
            _off_depth -= 1


def disabled() -> _Disabled:
    """``with donecache.disabled():`` memoized functions call straight through.

    For tests: while any such block is open, every thread of this process calls memoized functions
    as plain functions, with no reads, writes or locks, and no cache directory is created; hits and
    misses are not counted. A batch (f.map) started inside the block runs its workers the same way.
    The environment variable DONECACHE=off does the same for a whole process (and the processes it
    starts), checked at each call.
    """
    return _Disabled()


# -- a batch's failure, as the store's ledger keeps it ------------------------

class FailureRecord(Exception):
    """A failure of a batch as the store's ledger keeps it (see ``f.failures()``).

    ``input`` is the input itself when the ledger kept its pickle and ``f.failures()`` read this
    record; else (the command line, an input too big to keep or that no longer unpickles) the text in
    ``label``: what ``map(label=...)`` gave, or a bounded repr. ``entry`` names the input's entry file.
    Then the exception's ``type`` and ``message``, the ``traceback`` text (donecache's own frames left
    out), when and where (``time``, ``host``, ``pid``), and the code ``identity`` it failed under
    (``current``: the code that reads it now). A batch with ``retry_failures=False`` reports such a
    failure again as this exception. It pickles and copies (a worker may return one; a memoized
    report of failures holds them)."""

    def __init__(self, record: dict[str, Any], current: bool, load: bool = False) -> None:
        self._record, self._load = record, load
        get = record.get
        self.function, self.label, self.entry = str(get("function", "?")), str(get("input", "?")), str(get("entry", ""))
        self.type, self.message = str(get("type", "?")), str(get("message", ""))
        self.traceback = str(get("traceback", ""))
        self.time = float(get("time") or 0)
        self.host, self.pid = str(get("host", "?")), get("pid")
        self.identity, self.current = str(get("identity", "")), current
        self.input_kept = isinstance(get("input_pickle"), str)
        self.input: Any = self.label
        if load and self.input_kept:
            import base64
            import pickle  # Unpickled in a fresh process, before any store set the global.

            try:  # The store is the user's own, as trusted as its entries.
                self.input = pickle.loads(base64.b64decode(str(get("input_pickle"))))
            except Exception:
                self.input_kept = False  # Its class changed or is gone: the text stands in.
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.time))
        super().__init__(f"{self.type}: {self.message} (recorded {when}; retry_failures=True calls it again)")

    def __reduce__(self) -> tuple[Any, ...]:
        return FailureRecord, (self._record, self.current, self._load)

    def as_dict(self) -> dict[str, Any]:
        """The record as JSON data (``input`` is the text, ``label``)."""
        names = "function label entry input_kept type message traceback time host pid identity current".split()
        return {"input": self.label, **{name: getattr(self, name) for name in names}}


_KEY_MEMO_TYPES = frozenset({int, str, bytes, type(None)})
_KEY_MEMO_SIZE = 4096
_KEY_MEMO_TEXT = 1024  # Longer strs and bytes are not remembered: the memo would keep them alive.


class _KnownKey:
    """A remembered key (see _Memoized._keyed): the key, its slot, and the prefix and closure text it was made with."""

    __slots__ = ("key", "slot", "prefix", "closure")

    def __init__(self, key: bytes, slot: _Slot, prefix: bytes, closure: str) -> None:
        self.key, self.slot, self.prefix, self.closure = key, slot, prefix, closure


def _simple(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a call's key may be remembered by its arguments (see _Memoized._keyed)."""
    if kwargs or len(args) > 4:
        return False
    return type(args[0]) in _KEY_MEMO_TYPES if len(args) == 1 else _KEY_MEMO_TYPES.issuperset(map(type, args))
# What a first call needs to work out and record the code identity, imported at decoration: a KeyboardInterrupt
# in a first import can leave a half-made module (seen with inspect and json on 3.9; importlib.util brings typing on
# 3.9, through importlib.abc).
_DECORATION_IMPORTS = (
    "ast", "base64", "collections", "dis", "functools", "hashlib", "importlib.util", "inspect", "json", "math",
    "reprlib", "socket", "types", "warnings",
)  # fmt: skip


class _Call:
    """One call: its arguments, key, entry slot and computation seconds (now, or as its entry records)."""

    __slots__ = ("args", "kwargs", "key", "slot", "seconds")

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any], key: bytes, slot: _Slot | None) -> None:
        self.args, self.kwargs, self.key, self.slot, self.seconds = args, kwargs, key, slot, 0.0


# -- pickling a memoized function ---------------------------------------------
#
# The memoized functions that this process has pickled by value or rebuilt from such pickles: unpickling in the
# same process gives back the same object (its counters and open store); a worker rebuilds each once per task.
_by_value: weakref.WeakValueDictionary[tuple[Any, ...], _Memoized[..., Any]] | None = None  # At the first decoration.
_WEAK_TABLES["_by_value"] = "WeakValueDictionary"


def _pickler_sends_functions_by_value() -> bool:
    """Whether the pickler at work sends functions by value (cloudpickle and those built on it)."""
    # Such picklers define reducer_override() and run dump() as Python code, so they are on the stack.
    import pickle

    frame: Any = sys._getframe(1)  # From __reduce__, the caller, up: 16 frames, as before it was folded in.
    for _ in range(16):
        pickler = frame and frame.f_locals.get("self")
        if isinstance(pickler, pickle.Pickler):
            return callable(getattr(pickler, "reducer_override", None))
        frame = frame and frame.f_back
    return False


def _restore_memoized(kind: type[_Memoized[..., Any]], state: dict[str, Any]) -> _Memoized[..., Any]:
    key = (kind, state["path"], state["_pickle_token"])
    _runtime_imports()  # A worker may rebuild a function before it decorates any.
    assert _by_value is not None
    func = _by_value.get(key)
    if func is None:
        func = kind.__new__(kind)
        func.__dict__.update(state)
        _by_value[key] = func
    return func


class _BoundMemoized:
    """``obj.method``: the call and the wrapper's methods take the instance first, as a bound method does."""

    __slots__ = ("__func__", "__self__")

    def __init__(self, func: _Memoized[..., Any], instance: Any) -> None:
        self.__func__, self.__self__ = func, instance

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__(self.__self__, *args, **kwargs)

    def map(self, *iterables: Iterable[Any], **options: Any) -> BatchResult:
        checked = self.__func__._batch_options(iterables, options)
        return _run_map(self.__func__, iterables, (self.__self__,), checked)

    def imap(self, *iterables: Iterable[Any], **options: Any) -> Iterator[Any]:
        checked = self.__func__._batch_options(iterables, options)
        return _run_imap(self.__func__, iterables, (self.__self__,), checked)

    @property
    def __wrapped__(self) -> Any:
        import types

        return types.MethodType(self.__func__.__wrapped__, self.__self__)

    def __getattr__(self, name: str) -> Any:  # __name__, __doc__, path, cache_info, ...
        found = getattr(self.__func__, name)
        if name in ("refresh", "forget", "is_cached"):  # Called with the instance first, as the function is.
            import functools

            return functools.partial(found, self.__self__)
        return found

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _BoundMemoized) and self.__func__ is other.__func__ and self.__self__ is other.__self__

    def __hash__(self) -> int:
        return hash((id(self.__func__), id(self.__self__)))

    def __reduce__(self) -> tuple[Any, ...]:
        return getattr, (self.__self__, self.__func__.__wrapped__.__name__)

    def __repr__(self) -> str:
        return f"<bound memoized {self.__func__.__qualname__} of {self.__self__!r}>"


class _Memoized(Generic[_P, _R]):
    """A function whose results are kept in a donecache store."""

    # Set by functools.update_wrapper from the decorated function.
    __wrapped__: Callable[_P, _R]
    __qualname__: str

    def __init__(
        self, func: Callable[..., Any], path: StrPath | None, ttl: float | None, version: Any, ignore: Iterable[str],
        durable: bool, key: Callable[..., Any] | None, mmap: bool, max_bytes: int | None, trust_shared: bool,
        compress: str | None,
    ) -> None:  # fmt: skip
        import functools
        import hashlib

        for module in _DECORATION_IMPORTS:
            __import__(module)
        _runtime_imports()
        functools.update_wrapper(self, func)
        if not hasattr(func, "__qualname__"):  # A functools.partial or a callable object.
            self.__qualname__ = self.__name__ = _function_name(func)
        self._blake2b = hashlib.blake2b  # Bound once: an import statement on the hit path costs a lookup per call.
        path = os.environ.get("DONECACHE_DIR") or ".donecache" if path is None else path
        self.path = os.path.abspath(_store_path(path))
        self._ttl, self._durable, self._mmap, self._version = ttl, durable, mmap, version
        self._max_bytes, self._trust_shared, self._compress = max_bytes, trust_shared, compress
        self._arguments, self._key_given = _Arguments(func, ignore, key), key is not None
        self._function = f"{_module_name(func)}:{_function_name(func)}"
        self._identity = f"{self._function}|".encode("utf-8")
        # Made at the first call (_prepare): the key prefix (with the code identity), the closure's values,
        # and whether what the identity followed is unchanged.
        self._prefix, self._closure, self._same, self._unrecorded = b"", "", _unchanged, False
        self._store: _EntryFiles | None = None
        # The folder of this function's entries (set with the store); _saved: the seconds of computation
        # that this process's hits did not repeat.
        self._folder, self._warned, self._hits, self._misses, self._saved = "", False, 0, 0, 0.0
        self._keys: dict[tuple[Any, ...], _KnownKey] = {}  # See _keyed.

    def __reduce__(self) -> str | tuple[Any, ...]:
        """By name where its name finds it (the decorator form), else by value: the function and the settings."""
        # The functional form ``cached = memoize(path)(f)`` goes by value, and so does a function of the main
        # script when the pickler sends functions by value (cloudpickle, for dask and loky: a remote worker cannot
        # import the parent's main script); the standard pickler (process pools) sends that by name, which their
        # workers can resolve.
        name: str = self.__qualname__
        target: Any = sys.modules.get(self.__module__)
        for part in name.split("."):  # A method's name: Class.method.
            target = getattr(target, part, None)
        if target is self and not (self.__module__ == "__main__" and _pickler_sends_functions_by_value()):
            return name
        # The registry's key names this very wrapper: before its first call its key prefix is
        # empty, and two functions' wrappers were once taken for one.
        token = self.__dict__.setdefault("_pickle_token", os.urandom(8).hex())
        state = dict(
            self.__dict__, _store=None, _warned=False, _hits=0, _misses=0, _same=_unchanged, _keys={}, _saved=0.0
        )
        _runtime_imports()
        assert _by_value is not None
        _by_value[(type(self), self.path, token)] = self
        return _restore_memoized, (type(self), state)

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        return self if instance is None else _BoundMemoized(self, instance)

    def __repr__(self) -> str:
        return f"<memoized {self.__module__}.{self.__qualname__} in {self.path!r}>"

    def _files(self) -> _EntryFiles | None:
        """The store, or None (called straight through, warned once) if it cannot be made: a read-only cwd."""
        if self._store is None:
            try:
                files = _EntryFiles(self.path, "c", self._durable, self._max_bytes, self._trust_shared)
                self._folder = files.folder(self._function)
                self._store = files
                if self._unrecorded and not files.readonly:  # Prepared while switched off (a sharded batch).
                    files.record_identity(self._function, _key_identity(self._prefix))
            except _Untrusted:
                raise  # Never computed around: the user must choose another store, or trust this one.
            except OSError as exc:
                if not self._warned:
                    self._warned = True
                    _warn(f"{self.__qualname__}(): results are computed but not cached: {exc}")
        return self._store

    def _prepare(self) -> bytes:
        """The key prefix, at the first call and when a binding it followed changed (a redefinition, a reload)."""
        # The identity is recorded in the store, so that `info` and `prune` can tell stale entries, with the
        # code under a pinned version=, to say when other code made the entries it reuses.
        import inspect

        files = self._store or (None if _switched_off() else self._files())  # Off: no cache directory is made.
        followed = _follow(self.__wrapped__, None if files is None or files.readonly else files.root)
        code = followed.digest()
        identity = code if self._version is None else _digest_text(f"version {_version_text(self._version)}")[:16]
        self._closure = _closure_text(self.__wrapped__)
        home = getattr(inspect.unwrap(self.__wrapped__), "__globals__", None)
        self._same = followed.same(home) if self._version is None else _unchanged
        first = self._prefix == b""  # Warn once, at the first call.
        self._prefix = self._identity + f"{identity}|".encode("utf-8")
        if first and followed.unseen and self._version is None and not self._key_given:
            _warn(f"{self.__qualname__}(): donecache cannot follow {'; '.join(followed.unseen)}, so a change there "
                  "will not recompute. Pass version= (and bump it when that changes), or key= that includes it")
        since = None if files is None or files.readonly else files.record_identity(self._function, identity, code)
        self._unrecorded = files is None  # Then _files() records it once the store is made.
        if first and since is not None and files is not None:
            scanned = (found.entry for found in files.scan(self._folder))
            older = sum(1 for e in scanned if e is not None and e.created < since and e.key.startswith(self._prefix))
            if older:
                _warn(f"{self.__qualname__}(): version={self._version!r} is pinned but the code has changed: {older} "
                      "of its entries came from other code and are reused, as version= asks. Bump version= if the "
                      "change alters results")
        return self._prefix

    def _key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        prefix = self._prefix if self._prefix and self._same() else self._prepare()
        return _make_key(prefix, self._closure, self._arguments.values(args, kwargs), self._arguments, self._blake2b)

    def _keyed(self, args: tuple[Any, ...], kwargs: dict[str, Any], simple: bool | None = None) -> _Call:
        """The call with its key and entry slot; ``simple``: _simple(args, kwargs), if the caller knows it."""
        # Keys of calls with a few ints, strs, bytes or Nones are remembered (the key and the entry's path cost
        # more than a hit's read): for these types equal arguments have equal keys (not for floats, 0.0 == -0.0,
        # or bools, True == 1). A key is reused only while the prefix and closure text it was made with are the
        # very objects in use and what the identity followed is unchanged (_same).
        if simple is None:
            simple = _simple(args, kwargs)
        simple = simple and self._store is not None
        if simple:
            known = self._keys.get(args)
            if known is not None and known.prefix is self._prefix and known.closure is self._closure and self._same():
                return _Call(args, kwargs, known.key, known.slot)
        key = self._key(args, kwargs)
        call = self._at_key(key, args, kwargs)
        small = simple and all(type(a) is int or a is None or len(a) <= _KEY_MEMO_TEXT for a in args)
        if small and self._arguments.memoizable and call.slot is not None:
            if len(self._keys) >= _KEY_MEMO_SIZE:
                self._keys = {}
            self._keys[args] = _KnownKey(key, call.slot, self._prefix, self._closure)
        return call

    def _at_key(self, key: bytes, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
        """The call with a key made already (a batch's worker gets it from the parent)."""
        files = self._store or self._files()
        return _Call(args, kwargs, key, None if files is None else files.slot(key, self._folder))

    # -- the flow of one call, written once ----------------------------------
    #
    # _flow is a coroutine for sync and async functions alike. For a sync function its awaits (_acquire and
    # _invoke) never suspend, so _get runs it to the end with one send(); the async class overrides only those two.

    def _live(self, entry: _Entry, now: float) -> bool:
        """Whether ``entry`` may serve a call at ``now``: neither its own expiry nor this function's ttl has passed."""
        return entry.live(now) and (self._ttl is None or now - entry.created < self._ttl)

    def _hit(self, call: _Call, recent: bool = True) -> Any:
        """The cached result, counted as a hit, or _MISSING; ``recent``: through _recent (see _EntryDir.read)."""
        files = self._store
        if files is None:
            return _MISSING
        now = time.time()
        entry = files.read(call.key, call.slot, now, self._mmap, True, recent=recent)  # True: a use of the entry.
        if entry is None or not self._live(entry, now):
            return _MISSING
        try:
            value = entry.load()
        except Exception:
            return _MISSING  # Written by code that has changed since: recompute.
        call.seconds = entry.seconds
        return self._counted(entry, call.slot, value)

    def _counted(self, entry: _Entry, slot: _Slot | None, value: Any) -> Any:
        """``value``, loaded from ``entry``: counted as a hit (and the computation it saved), and logged."""
        self._hits += 1
        self._saved += entry.seconds
        if _log_at(_DEBUG) is not None:
            _logger.debug("%s: hit; entry %s", self.__qualname__, slot.path if slot else "?")
        return value

    def _why_missed(self, call: _Call) -> str:
        """For the DEBUG log (it reads the file again)."""
        # An entry of the same arguments under an older code digest lives in another file, found only by a scan:
        # it reads as "new key".
        if self._store is None or call.slot is None:
            return "no cache directory"
        try:
            entry, st = _load_entry(call.slot.path, call.key)
        except OSError as exc:
            return f"entry unreadable: {exc.strerror}"
        if st is None:
            return "new key"
        if entry is None:
            return "damaged entry"
        now = time.time()
        if not self._live(entry, now):
            return "expired"
        return "damaged entry (its value does not unpickle)"

    def _store_result(self, call: _Call, value: Any, warn: Callable[[str], None] = _warn) -> None:
        """Count a freshly computed result as a miss and store it (or ``warn`` why not)."""
        encoded = self._encode_result(call, value, warn)
        if encoded is not None:
            self._write_result(call, encoded, warn)

    def _encode_result(self, call: _Call, value: Any, warn: Callable[[str], None] = _warn) -> _Encoded | None:
        """A freshly computed result, counted as a miss and pickled (not compressed): None if there is no store or
        it cannot be pickled (``warn``-ed). Where the call ran: pickling runs the value's own code (__reduce__)."""
        self._misses += 1
        if self._store is None:
            return None  # No store (already warned).
        try:
            # Protocol 5 (readable by every Python donecache supports) keeps big buffers out of the stream,
            # to be written straight from the value.
            expires = time.time() + self._ttl if self._ttl is not None else 0.0
            return _encode_entry(call.key, value, expires, 5, call.seconds)
        except Exception as exc:
            warn(f"{self.__qualname__}() returned a {type(value).__name__} that cannot be pickled ({exc}); "
                 "it is returned but not cached")  # fmt: skip
            return None

    def _write_result(self, call: _Call, encoded: _Encoded, warn: Callable[[str], None] = _warn) -> None:
        """Compress (compress=) and write a result that _encode_result pickled: donecache's code only."""
        files = self._store
        assert files is not None
        if self._compress is not None:
            try:
                _compress_entry(encoded, self._compress)
            except Exception as exc:  # MemoryError, or an lzma that this Python lacks.
                warn(f"{self.__qualname__}(): the result could not be compressed ({exc!r}); it is returned but not "
                     "cached")  # fmt: skip
                return
        try:
            files.write(encoded, call.slot, recent=True)
        except OSError as exc:
            warn(f"{self.__qualname__}(): the result is returned but not cached: {exc}")
            return
        if call.slot is not None:
            files.forget_failure(call.slot)  # A success clears the input's recorded failure.

    async def _acquire(self, lock: _KeyLock) -> None:
        lock.acquire()

    async def _invoke(self, call: _Call) -> Any:
        return self.__wrapped__(*call.args, **call.kwargs)

    async def _flow(self, call: _Call, refresh: bool, hand_off: Callable[..., None] | None = None,
                    held: _KeyLock | None = None, computing: Callable[[], None] | None = None) -> tuple[Any, bool]:
        """(result, computed), after a miss or for a refresh: compute under the key's lock, unless another caller
        stored the result while this one waited for the lock."""
        # hand_off(self, call, value, lock) takes over the storing and the lock's release (a batch worker stores in
        # the background). With no store, or no lock file (a read-only or damaged store), it computes without the
        # lock: results stay right; concurrent callers may compute the same key. ``held``: the key's lock, taken
        # (and the entry looked for under it) by a batch's writer thread; ``computing``: called once the lock is
        # held and the result must be computed (a batch's worker then readies its next call).
        files, lock = self._store, held
        if held is None and files is not None and call.slot is not None:
            lock = _KeyLock(files.lock_path, call.slot.offset)
            try:
                await self._acquire(lock)
            except OSError as exc:
                _warn(f"{self.__qualname__}(): computing without the cache lock: {exc}")
                lock = None
        try:
            if not refresh and held is None:
                value = self._hit(call)
                if value is not _MISSING:
                    return value, False
            if computing is not None:
                computing()
            if _log_at(_DEBUG) is not None:
                reason = "refresh" if refresh else self._why_missed(call)
                where = call.slot and call.slot.path
                _logger.debug("%s: miss (%s), computing; entry %s", self.__qualname__, reason, where)
            started = time.perf_counter()
            value = await self._invoke(call)
            call.seconds = time.perf_counter() - started
            if hand_off is None:
                self._store_result(call, value)
            else:
                hand_off(self, call, value, lock)
                lock = None
            return value, True
        finally:
            if lock is not None:
                lock.release()

    def _get(self, call: _Call, refresh: bool = False, hand_off: Callable[..., None] | None = None,
             missed: bool = False, held: _KeyLock | None = None,
             computing: Callable[[], None] | None = None) -> tuple[Any, bool]:
        """(result, computed); ``missed``: a lookup just missed, so look again only under the lock (see _flow)."""
        value = _MISSING if refresh or missed else self._hit(call)
        if value is not _MISSING:
            return value, False
        flow = self._flow(call, refresh, hand_off, held, computing)
        try:
            flow.send(None)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        flow.close()
        raise RuntimeError(f"{self.__qualname__}(): the memoize flow suspended in a sync call")

    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        if (_off_depth or _SWITCH_KEY in _ENVIRON) and _switched_off():
            return self.__wrapped__(*args, **kwargs)
        # The everyday hit in this one frame: a key that _keyed remembered, an entry that _kept vouches for, a plain
        # pickle. Each call layer saved is a tenth of a microsecond of a four-microsecond hit (issue 20).
        simple = type(args[0]) in _KEY_MEMO_TYPES and not kwargs if len(args) == 1 else _simple(args, kwargs)
        known = self._keys.get(args) if simple else None
        files = self._store
        if known is not None and files is not None and files.trusted and known.prefix is self._prefix:
            now = time.time()
            entry = _kept(known.slot.path, known.key, now - files.grain)
            if entry is not None and known.closure is self._closure and self._same() and not entry.flags & 0xFF:
                if self._live(entry, now):
                    try:
                        value = pickle.loads(entry.stream)
                    except Exception:
                        pass  # Written by code that has changed since: _hit judges it.
                    else:
                        return self._counted(entry, known.slot, value)  # type: ignore[no-any-return]
        call = self._keyed(args, kwargs, simple)
        value = self._hit(call)  # Here, not in _get: one call layer fewer on a hit.
        return value if value is not _MISSING else self._get(call, missed=True)[0]  # type: ignore[no-any-return]

    def refresh(self, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        """Compute this call again, whatever the cache holds, and store the result."""
        if _switched_off():
            return self.__wrapped__(*args, **kwargs)
        return self._get(self._keyed(args, kwargs), refresh=True)[0]  # type: ignore[no-any-return]

    def failures(self, *, all: bool = False) -> list[FailureRecord]:
        """The inputs that failed in a batch and have not succeeded since, oldest first, as the store
        records them: those of the current code, or with ``all=True`` of older code too (``current``
        tells them apart). ``input`` is the input itself when the ledger kept it (a pickle up to 256
        KiB), so ``f.map([r.input for r in f.failures()])`` runs them again."""
        files, identity = self._files(), _key_identity(self._prefix or self._prepare())
        if files is None:
            return []
        records = [FailureRecord(r, r.get("identity") == identity, load=True) for r in files.failures(self._folder)]
        return [record for record in records if all or record.current]

    def is_cached(self, *args: _P.args, **kwargs: _P.kwargs) -> bool:
        """True if a call with these arguments would be a hit: its entry is stored and live (ttl counts).
        It never calls the function, takes no lock, counts no hit, makes no cache directory, and does not
        unpickle the value: one that no longer loads (its class changed) still counts."""
        if _switched_off() or (self._store is None and not os.path.isdir(self.path)):
            return False
        call = self._keyed(args, kwargs)  # Opens the store on a first call: self._store is read after it.
        files, now = self._store, time.time()
        entry = None if files is None else files.read(call.key, call.slot, now, self._mmap, False, recent=True)
        return entry is not None and self._live(entry, now)

    def forget(self, *args: _P.args, **kwargs: _P.kwargs) -> bool:
        """Drop the cached result of this one call; True if there was one."""
        files = self._files()
        if files is None:
            return False
        call = self._keyed(args, kwargs)
        return files.delete(call.key, call.slot)

    def cache_clear(self) -> None:
        """Drop every entry of this function (all versions of its code), its recorded failures, and
        the counts. Its folder holds nothing else, so nothing is read."""
        files = self._files()
        if files is not None:
            files.clear(folder=self._folder)
            files.drop_failures(lambda record: True, self._folder)  # A fresh start forgets them too.
        self._hits, self._misses, self._saved = 0, 0, 0.0

    def cache_info(self) -> CacheInfo:
        """Hits, misses and the computation time saved in this process, and this function's live
        entries on disk with the computation time they hold (read from the heads of its own entries only)."""
        now, files, prefix = time.time(), self._files(), self._prefix or self._prepare()
        live, held = 0, 0.0
        for found in files.scan(self._folder) if files is not None else ():
            if found.entry is not None and found.entry.live(now) and found.entry.key.startswith(prefix):
                live, held = live + 1, held + found.entry.seconds
        info: CacheInfo = _record("CacheInfo")(self._hits, self._misses, self._max_bytes, live, held, self._saved)
        return info

    def cache_parameters(self) -> dict[str, Any]:
        """The options this function was memoized with (functools' ``maxsize`` is max_bytes)."""
        return {
            "maxsize": self._max_bytes, "path": self.path, "ttl": self._ttl, "version": self._version,
            "max_bytes": self._max_bytes, "compress": self._compress, "durable": self._durable, "mmap": self._mmap,
        }  # fmt: skip

    def prune(self, *, max_bytes: int | None = None, older_than: float | Any = None, stale: bool = False,
              dry_run: bool = False) -> PruneReport:
        """Trim this function's entries, as ``prune`` on the command line does: remove the expired and
        damaged ones (``stale``: and those of its older code), then evict the least recently used until
        they take at most ``max_bytes`` on disk, and those not used for ``older_than`` (seconds or a
        timedelta). ``dry_run``: remove nothing, only count."""
        files = self._files()
        if files is None:
            return _record("PruneReport")(0, 0, 0, 0)  # type: ignore[no-any-return]
        self._prefix or self._prepare()  # Records the current identity, which stale= compares with.
        done = _prune(files, self._folder.rstrip(os.sep), max_bytes, older_than, stale=stale, dry_run=dry_run)
        return _record("PruneReport")(*done)  # type: ignore[no-any-return]

    def map(self, *iterables: Iterable[Any], keep_going: bool = False, workers: int | None = None,
            processes: bool = True, executor: Any = None, chunksize: int | None = None,
            progress: bool | float | None = None, retry_failures: bool = True, shard: tuple[int, int] | None = None,
            label: Callable[..., Any] | None = None) -> BatchResult:
        """Call the function on every input, caching each success as soon as it is done.

        ``f.map(records)`` calls ``f(record)`` for each record; ``f.map(xs, ys)`` calls ``f(x, y)``
        pairwise, like map(). A rerun reuses every stored result and computes only what failed or is
        new. The result keeps one entry per input; for more inputs than fit in memory, use :meth:`imap`.

        keep_going: False stops at the first failure and raises it, as a plain loop would (what
            finished before it stays cached). True runs every input and reports the failures in the
            result, each with its input, exception and traceback.
        workers: run that many calls at once, in a ProcessPoolExecutor (processes=False: a
            ThreadPoolExecutor) that map() starts and shuts down.
        executor: run the calls on an executor you made instead (any object with concurrent.futures'
            submit(), such as dask.distributed's Client.get_executor() or loky's); it is never shut
            down, and only this batch's own futures are cancelled. workers= then says how many calls
            it runs at once (default: its _max_workers, or the CPU count).
        chunksize: calls per submitted task; by default it grows until a task takes about 50 ms, and
            an idle worker gets whatever is ready.
        progress: the function's name, percentage, done/total, rate, ETA and failures. None (the
            default): a line redrawn on stderr when it is a terminal or a Jupyter kernel, else a record
            every 30 s on the "donecache" logger (INFO). True: always on stderr. A number: log every
            that many seconds. False: silent. A callable: called with a :class:`Progress` record at
            most ten times a second and once at the end (``final`` True), to drive a tqdm or rich bar.
        retry_failures: True (the default) calls again the inputs that failed in an earlier batch.
            False reports, without calling, the failures that the store's ledger holds for the current
            code (see :meth:`failures`), each as a :class:`FailureRecord` exception.
        shard: (index, count) runs only this process's share of the inputs, for array jobs: every input
            falls to exactly one index, the same in every process and on every host, by a digest of its
            key. A final unsharded map() then finds every result cached, or in the ledger.
        label: called with an input's arguments, as the function is, to give the text that the ledger
            shows for it when it fails (``label=lambda rec: rec["id"]``); by default a bounded repr.

        Each failure is written to the store's ledger as it happens, so a crash of this process loses
        none of them; a later success removes it. Cached inputs are answered here, never sent; only
        misses go to the workers, a bounded number at a time, so the inputs can be a generator.
        """
        options = (keep_going, workers, processes, executor, chunksize, progress, retry_failures, shard, label)
        return _run_map(self, iterables, (), _record("_BatchOptions")(*options))

    def imap(self, *iterables: Iterable[Any], **options: Any) -> Iterator[Any]:
        """:meth:`map` as a stream, with the same options: yield each result in input order as soon as it
        and every one before it are done, keeping none, so memory stays bounded however many inputs there
        are. With keep_going=True a failed input yields its :class:`Failure` in its place."""
        return _run_imap(self, iterables, (), self._batch_options(iterables, options))

    def _batch_options(self, iterables: tuple[Iterable[Any], ...], options: Any) -> _BatchOptions:
        """Options given by name (to imap, or to a bound method's map), checked as map() checks them."""
        import inspect

        bound = inspect.signature(_Memoized.map).bind(self, *iterables, **options)
        bound.apply_defaults()
        return _record("_BatchOptions")(**bound.kwargs)  # type: ignore[no-any-return]


class _AsyncMemoized(_Memoized[_P, _R]):
    """The same for ``async def`` functions: the event loop never blocks on a lock."""

    async def _acquire(self, lock: _KeyLock) -> None:
        import asyncio

        await lock.acquire_async(id(asyncio.current_task()))

    async def _invoke(self, call: _Call) -> Any:
        coroutine: Any = self.__wrapped__(*call.args, **call.kwargs)
        return await coroutine

    async def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> Any:  # type: ignore[override]
        if _switched_off():
            return await self.__wrapped__(*args, **kwargs)  # type: ignore[misc]
        call = self._keyed(args, kwargs)
        value = self._hit(call)
        return value if value is not _MISSING else (await self._flow(call, False))[0]

    async def refresh(self, *args: _P.args, **kwargs: _P.kwargs) -> Any:  # type: ignore[override]
        if _switched_off():
            return await self.__wrapped__(*args, **kwargs)  # type: ignore[misc]
        return (await self._flow(self._keyed(args, kwargs), True))[0]



# -- the decorator --------------------------------------------------------------

_CO_GENERATOR, _CO_ASYNC_GENERATOR = 0x20, 0x200  # inspect.CO_*


@overload
def memoize(path: Callable[_P, _R]) -> _Memoized[_P, _R]: ...


@overload
def memoize(
    path: StrPath | None = None, *, ttl: float | Any = None, version: _Version | None = None,
    ignore: Iterable[str] = (), key: _KeyFunction | None = None, durable: bool = False, mmap: bool = False,
    max_bytes: int | None = None, trust_shared: bool = False, compress: bool | str = False,
) -> Callable[[Callable[_P, _R]], _Memoized[_P, _R]]: ...


def memoize(path: StrPath | Callable[..., Any] | None = None, *, ttl: float | Any = None,
            version: _Version | None = None, ignore: Iterable[str] = (), key: _KeyFunction | None = None,
            durable: bool = False, mmap: bool = False, max_bytes: int | None = None, trust_shared: bool = False,
            compress: bool | str = False) -> Any:
    """Keep a function's results on disk, shared by threads, processes and runs.

    ``@memoize`` or ``@memoize("cache-dir", ttl=3600)``. Without a path the store is ``.donecache`` in
    the current directory, or $DONECACHE_DIR.

    A call's key is the function's module and qualified name, its code identity, the values its
    closure holds, and the arguments bound to its signature with defaults applied, so f(1), f(x=1)
    and f() (when x=1 is the default) are one entry. The code identity is ``version`` when given;
    otherwise it follows the function's source (comments, blank lines and decorators aside), the
    module-level constants it reads and the functions and classes of your own code that it uses
    (docs/identity.md). Concurrent callers of one key, in threads or processes, compute it
    once; the others wait and reuse the result. Exceptions are not cached; None is. A result that
    cannot be pickled is returned with a DonecacheWarning and not stored.

    ttl: seconds (or a timedelta) after which an entry is recomputed.
    version: pins the code identity (a str, an int or a tuple of them): edits keep the entries
        until you change it.
    ignore: names of parameters left out of the key (``self``, a logger).
    key: a function of the same arguments whose result stands for them in the key, as
        ``key=lambda record: record["id"]``.
    durable: fsync each entry as it is written (survives power failures).
    mmap: return the big buffers of results (64 KiB or more: the data of NumPy arrays and pandas
        columns) as private copy-on-write memory maps of the entry files: a hit costs milliseconds
        whatever the size; the arrays are writable, and changes never reach the file.
    max_bytes: bound the store (the whole directory, shared with any other function in it) to this
        many bytes on disk: a miss that takes it past the bound evicts the least recently used
        entries (a hit counts as a use) down to 80% of it, logging the sweep on the "donecache"
        logger (INFO). None (the default): no bound. ``cache_info().maxsize`` reports it, in bytes
        (functools counts entries there).
    trust_shared: use a store directory that is not yours, or that group or others can write to (by
        default the first call raises PermissionError there: results are pickles, and loading one
        runs its writer's code).
    compress: ``"zlib"`` (or True) or ``"lzma"`` compresses each entry's pickle stream (not the big
        buffers that mmap maps) where that makes it smaller: text-heavy results shrink several times
        at some write time (docs/storage.md). False (the default): no compression.

    The decorated function has ``cache_info()``, ``cache_parameters()``, ``cache_clear()`` (this
    function's entries only), ``is_cached(*args)``, ``forget(*args)``, ``refresh(*args)``, ``prune()``,
    ``__wrapped__`` (the function itself: call it to bypass the cache), ``map``/``imap`` for batches
    on any executor and ``failures()`` for their ledger. It pickles by reference where its
    name finds it, else by value, so it works with ProcessPoolExecutor, multiprocessing and Dask;
    bound to an instance, it keeps all of these. ``async def`` functions are supported.
    """
    seconds, max_bytes, codec = _seconds(ttl), _check_max_bytes(max_bytes), _check_compress(compress)
    if path is not None and not callable(path):
        _store_path(path)
    if version is not None:
        _version_text(version)  # An unusable version fails here, not at the first call.
    if isinstance(ignore, str):
        ignore = (ignore,)
    if key is not None and (ignore or not callable(key)):
        raise ValueError("memoize(key=...) takes a function of the call's arguments, and then no ignore= (the key "
                         "function chooses what counts)" if ignore else
                         f"memoize(key=...) must be callable, not {key!r}")

    def decorate(func: Callable[..., Any]) -> Any:
        if not callable(func):
            raise TypeError(f"memoize() decorates functions, not {type(func).__name__}")
        code = getattr(func, "__code__", None)
        if code is not None and code.co_flags & (_CO_GENERATOR | _CO_ASYNC_GENERATOR):
            what = "an async generator" if code.co_flags & _CO_ASYNC_GENERATOR else "a generator"
            raise TypeError(f"memoize() cannot cache {getattr(func, '__qualname__', func)}(): it is {what} function, "
                            "and the iterator that it returns is used up once read; return a list instead, or memoize "
                            "a function that collects it")
        kind = _AsyncMemoized if code is not None and code.co_flags & _CO_COROUTINE else _Memoized
        return kind(func, store_path, seconds, version, ignore, durable, key, mmap, max_bytes, trust_shared, codec)

    if callable(path) and not isinstance(path, (str, os.PathLike)):
        store_path: StrPath | None = None
        return decorate(path)  # Used bare: @memoize
    store_path = path
    return decorate


# ---- core ends here ----------------------------------------------------------
# The tail: batches, then the command line. The core reaches the batches only
# through _run_map and _run_imap.


# ---------------------------------------------------------------------------
# Batches: f.map() and f.imap(), on any executor
#
# The parent answers every cached input itself and sends only the misses, in chunks, with a bounded number of chunks in
# flight and a bounded window of inputs read ahead: a generator of any length runs in bounded memory, and results come
# out in input order. The workers get the keys made here, so a worker stores each result under the parent's key.
# ---------------------------------------------------------------------------

# A worker readies its next call in the background (_Ready) after a call that took this long, but no longer than
# _READY_HOLD, the most it holds a readied lock: readying saves 50-90 us, nothing to a call of a second.
_READY_AFTER, _READY_HOLD = 0.0002, 0.05
_CHUNK_SECONDS = 0.05  # A chunk grows until it takes about this long...
_MAX_CHUNK = 1000  # ...up to this many calls.
_LOG_EVERY = 30.0  # Seconds between progress records when stderr is not a terminal.


# The failure ledger's view of user objects. A failure is recorded inside a batch that must keep going, so nothing
# here may raise or grow without bound: an exception whose str() raises, a 300 MiB bytes input, an int of a million
# digits (repr raises ValueError from 3.11).

_SHOWN = 300  # Characters of an input's text in the ledger.
_INPUT_PICKLE_MAX = 256 * 1024  # Pickled inputs up to this size go into the ledger.
_bounded: Any = None  # The reprlib.Repr below, made at the first failure.


def _safe_str(value: Any, limit: int = 4000) -> str:
    try:
        return str(value)[:limit]
    except Exception as exc:
        return f"<str() of {type(value).__name__} raised {type(exc).__name__}>"


def _bounded_repr(value: Any) -> str:
    """A repr capped at every level, as reprlib makes it, but also for bytes, big ints and container subclasses."""
    # reprlib shows those in full, then cuts. Dicts keep their own order (a record's id usually comes first).
    global _bounded
    if _bounded is None:
        import itertools
        import reprlib

        class Bounded(reprlib.Repr):
            def repr_dict(self, x: Any, level: int) -> str:
                if level <= 0 or not x:
                    return "{...}" if x else "{}"
                pairs = itertools.islice(x.items(), self.maxdict)
                shown = [f"{self.repr1(k, level - 1)}: {self.repr1(v, level - 1)}" for k, v in pairs]
                return "{" + ", ".join(shown) + (", ..." if len(x) > self.maxdict else "") + "}"

            def repr_int(self, x: Any, level: int) -> str:
                return f"<int of {x.bit_length()} bits>" if x.bit_length() > 256 else int.__repr__(x)

            def repr_instance(self, x: Any, level: int) -> str:
                for kinds, name in (((str, bytes, bytearray), "str"), (dict, "dict"), (list, "list"), (tuple, "tuple")):
                    if isinstance(x, kinds):
                        shown = getattr(self, f"repr_{name}")(x[: self.maxstring + 1] if name == "str" else x, level)
                        return str(shown)
                return reprlib.Repr.repr_instance(self, x, level)

            repr_bytes = repr_bytearray = repr_instance

        shown = Bounded()
        shown.maxstring, shown.maxother, shown.maxdict, shown.maxlist, shown.maxtuple = 120, 120, 8, 8, 8
        _bounded = shown
    try:
        return str(_bounded.repr(value))[:_SHOWN]
    except Exception as exc:
        return f"<{type(value).__name__} object; its repr raised {type(exc).__name__}>"


def _pickled_input(value: Any) -> str | None:
    """The input's pickle as base64 text, or None if it cannot be pickled or passes _INPUT_PICKLE_MAX."""
    import base64

    class Bounded(io.BytesIO):
        def write(self, data: Any) -> int:
            if self.tell() + len(data) > _INPUT_PICKLE_MAX:
                raise OverflowError  # The pickler stops here, never building a big input's whole pickle.
            return super().write(data)

    out = Bounded()
    try:
        pickle.Pickler(out, protocol=4).dump(value)
    except Exception:
        return None
    return base64.b64encode(out.getvalue()).decode("ascii")


def _label_text(label: Callable[..., Any] | None, args: tuple[Any, ...]) -> str:
    """What the ledger shows for an input: ``label(*args)`` if given, or a bounded repr."""
    shown = args[0] if len(args) == 1 else args
    if label is None:
        return _bounded_repr(shown)
    try:
        text = label(*args)
    except Exception as exc:
        return f"<label raised {type(exc).__name__}: {_safe_str(exc, 200)}> {_bounded_repr(shown)}"
    return (text if isinstance(text, str) else _bounded_repr(text))[:_SHOWN]


def _record_failure(func: _Memoized[..., Any], call: _Call, exc: BaseException, traceback: str, shown: str,
                    lead: int = 0) -> None:
    """Write a batch's failure to the ledger at once, so that a crash of the parent cannot lose it.
    ``shown``: the input's text; ``lead``: how many arguments come before the input (a method's self)."""
    files = func._store
    if files is None or call.slot is None or files.readonly:
        return
    args = call.args[lead:]
    record = {
        "function": func._function, "identity": _key_identity(call.key), "input": shown,
        "input_pickle": _pickled_input(args[0] if len(args) == 1 and not call.kwargs else args),
        "entry": os.path.basename(call.slot.path),  # Names the input when its pickle is not kept.
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}", "message": _safe_str(exc),
        "traceback": traceback[-20000:], "time": time.time(), **_who(),
    }
    try:
        files.record_failure(call.slot, record)
    except OSError as exc:
        _warn(f"{func.__qualname__}(): a failure could not be recorded in the cache: {exc}")


def _exit_with_parent() -> None:
    """A pool worker's initializer: exit when the parent is gone, instead of idling forever after a kill -9."""
    # The parent pid changes then. Under forkserver the worker's parent is the fork server, which exits when
    # the batch's process does: watch whichever process is the parent now.
    first = os.getppid()

    def watch() -> None:
        while os.getppid() == first:
            time.sleep(0.5)
        os._exit(1)

    _thread.start_new_thread(watch, ())


class _Outcome:
    """How one call went: result (ok) or exception, computed (not reused), failure's traceback, seconds."""

    __slots__ = ("ok", "value", "computed", "traceback", "seconds")

    def __init__(self, ok: bool, value: Any, computed: bool, traceback: str = "", seconds: float = 0.0) -> None:
        self.ok, self.value, self.computed, self.traceback, self.seconds = ok, value, computed, traceback, seconds

    def __reduce__(self) -> tuple[Any, ...]:
        # A worker sends a chunk's outcomes back: by their fields, a third of the time slots' default takes.
        return _Outcome, (self.ok, self.value, self.computed, self.traceback, self.seconds)


def _failed(exc: BaseException, portable: bool) -> _Outcome:
    """A failure's outcome: its traceback without donecache's own frames (the user's code is what failed)."""
    import pickle
    import traceback

    shown = traceback.TracebackException.from_exception(exc)
    part: Any = shown
    while part is not None:
        part.stack = traceback.StackSummary.from_list([f for f in part.stack if f.filename != __file__])
        part = part.__cause__ or (None if part.__suppress_context__ else part.__context__)
    text = "".join(shown.format())
    if portable:  # The exception must cross back to the parent process.
        try:
            pickle.loads(pickle.dumps(exc))  # Many exceptions pickle but do not unpickle.
        except Exception:
            exc = RuntimeError(f"{type(exc).__name__}: {_safe_str(exc)}")
    return _Outcome(False, exc, True, text)


class _Ready:
    """A call of a chunk made ready by the writer thread while the call before it computes: its _Call, and its key's
    lock if that was free and no entry was found under it (else None: the call goes the ordinary way, which takes the
    lock, looks, and reads what another process may have stored since the parent looked). Taking the lock and
    looking after a sleep-like call cost a worker 50-90 us per call of a cold batch (issue 20: a batch of 1 ms calls
    went from 0.86 to 0.90 of a plain pool)."""

    # The lock is held for a call that has not begun, so whoever asks for it may be what the call before waits on:
    # the call before itself (a recursive function: f(5) calls f(4), the next input), another thread, or another
    # process. So the lock is never waited for here (two workers each waiting while holding a readied lock could
    # deadlock), it is given up at once to a thread of this process that asks (_KeyLock._holder_check, even while
    # make() is still taking it), and after _READY_HOLD seconds to anyone (the writer's timer). A call whose lock was
    # given up goes the ordinary way.
    __slots__ = ("func", "key", "args", "call", "lock", "made", "claim", "given_up", "taken")

    def __init__(self, func: _Memoized[..., Any], key: bytes, args: tuple[Any, ...]) -> None:
        self.func, self.key, self.args = func, key, args
        self.call: _Call | None = None
        self.lock: _KeyLock | None = None
        self.made = _thread.allocate_lock()  # Held until make() has run.
        self.made.acquire()
        self.claim = _thread.allocate_lock()  # Guards self.lock: taken by the call, or given up, once.
        self.given_up = False  # Asked for before make() had it: released as soon as taken.
        self.taken: _KeyLock | None = None  # The lock that take() gave the call (see _run_chunk's end).

    def make(self) -> None:
        """In the writer thread."""
        try:
            call = self.func._at_key(self.key, self.args, {})
            files = self.func._store
            if files is not None and call.slot is not None:
                lock = _KeyLock(files.lock_path, call.slot.offset)
                # Noted before the try: a thread that finds the lock taken before _holders says by whom asks here.
                lock._readying[lock._name] = noted = (_thread.get_ident(), self)
                try:
                    taken = lock.try_acquire()
                    if taken:
                        with self.claim:
                            lock._readied, self.lock = self, lock
                finally:
                    if lock._readying.get(lock._name) is noted:
                        del lock._readying[lock._name]
                if taken:
                    if self.given_up:
                        self.surrender()
                    # The call's own look, short of reading: a file found at the entry's name sends the call the
                    # ordinary way, which reads and judges it (ttl, damage) as it begins. Reading its value here
                    # too would read a big entry twice, and keep the call waiting for the first read.
                    elif files.occupied(call.slot):
                        self.surrender()
            self.call = call
        except BaseException:  # In the writer's thread. The call then goes the ordinary way, which meets the error.
            self.surrender()
        finally:
            self.made.release()

    def take(self, writer: _Writer) -> tuple[_Call | None, _KeyLock | None]:
        """For the call, as it begins: its _Call (None: make it) and its readied lock, now held by this thread
        (None: take it the ordinary way). If the writer died before making it, neither."""
        while not self.made.acquire(timeout=0.1 if writer.alive() else 0):
            if not writer.alive():  # Gone: it made this call as it died, or never will.
                if self.made.acquire(False):
                    break
                return None, None
        with self.claim:
            lock, self.lock = self.lock, None
            self.taken = lock
        if lock is not None:
            lock._readied = None
            lock.adopt()
        return self.call, lock

    def surrender(self) -> None:
        """Give up the readied lock, unless the call has taken it."""
        with self.claim:
            lock, self.lock, self.given_up = self.lock, None, True
        if lock is not None:
            lock._readied = None
            lock.release()


def _said(exc: BaseException) -> str:
    """repr(exc) for a message, or what it is if its repr raises: a writer's handler must not fail (see _Writer)."""
    try:
        return repr(exc)
    except BaseException:  # noqa: BLE001
        return f"<{type(exc).__name__}: its repr raised>"


class _Writer:
    """A worker's background writer: it stores a chunk's results (and releases their keys' locks) while the next
    call computes, so that creating entry files costs the calls no time, and readies the next call (_Ready).
    finish() waits until all are stored."""

    # Keys are distinct within a chunk (the parent sees to it): a key's lock that the writer holds is asked for only
    # by a call that needs that result (f(n) calls f(n - 1)), which waits for the store. One per worker process,
    # made with its first chunk (a thread started and joined per chunk cost 7% of a batch of 1 ms calls); a chunk
    # run in a thread of a process that is not a pool's worker (executor=ThreadPoolExecutor) has its own, stopped
    # at its end, so that no thread outlives the batch in the user's process (a later fork(2) with threads alive can
    # deadlock its child).
    _current: _Writer | None = None

    def __init__(self) -> None:
        import queue
        import threading

        self._pid = _pid()
        self._queue: Any = queue.SimpleQueue()
        # What went wrong in the thread, warned by finish() in the caller's thread: a warning raised in the thread
        # (warnings as errors) would end it, and the chunk's next readied call would wait for it forever.
        self._problems: list[str] = []
        self._ended = False  # Its chunk done (a chunk's own writer), as opposed to stopped by an error.
        self._thread = threading.Thread(target=self._run, name="donecache-keeper", daemon=True)
        self._thread.start()

    @classmethod
    def running(cls) -> _Writer:
        """This process's writer (a forked child's is its own), or a chunk's own (see above)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return cls()
        writer = cls._current
        if writer is None or writer._pid != _pid() or not writer.alive():
            writer = cls._current = cls()
        return writer

    def put(self, func: _Memoized[..., Any], call: _Call, value: Any, lock: _KeyLock | None) -> None:
        """Store a call's result in the background, and release its key's lock once stored. It is pickled here, in
        the call's thread: pickling runs the value's own code, which may need what that thread holds (a lock the
        next call takes, then asking for this result); the writer thread runs donecache's code only."""
        encoded = func._encode_result(call, value, self._problems.append)
        if self.alive():
            # The writer holds the lock from now on: the chunk's next call may ask for this result (f(n) calls
            # f(n - 1)) before it is stored, and must wait for it, not be told that its own thread holds the lock.
            if lock is not None:
                lock.adopt(self._thread.ident)
            self._queue.put((func, call, encoded, lock))
        else:  # The thread is gone (it should never be): stored here rather than into a queue nobody reads.
            self._drain()
            self._store(func, call, encoded, lock)

    def _drain(self) -> None:
        """The thread is gone: store here what it left queued (releasing their keys' locks), give up what it
        readied."""
        import queue

        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, tuple):
                self._store(*job)
            elif isinstance(job, _Ready):
                job.surrender()
            else:
                job.release()  # A finish() waiting for it.

    def _store(self, func: _Memoized[..., Any], call: _Call, encoded: _Encoded | None, lock: _KeyLock | None,
               caught: type[BaseException] = Exception) -> None:
        """Write a result that put() pickled and release its key's lock; what goes wrong is said by finish(). The
        thread catches every BaseException: were it to end, the results queued after would never be stored and their
        keys would stay locked, with the chunk's next call perhaps waiting on one (an interrupt never reaches it:
        signals go to the main thread)."""
        try:
            if encoded is not None:
                func._write_result(call, encoded, self._problems.append)
        except caught as exc:  # noqa: BLE001 - the thread serves the next chunks too.
            self._problems.append(f"{func.__qualname__}(): the result is returned but not cached: {_said(exc)}")
        finally:
            if lock is not None:
                lock.release()

    def ready(self, func: _Memoized[..., Any], key: bytes, args: tuple[Any, ...]) -> _Ready:
        ready = _Ready(func, key, args)
        self._queue.put(ready)
        return ready

    def alive(self) -> bool:
        return bool(self._thread.is_alive())

    def _run(self) -> None:
        import queue

        held: list[tuple[float, _Ready]] = []  # Readied locks not yet taken, with when each is given up.
        while True:
            try:
                job = self._queue.get(timeout=max(0.0, held[0][0] - time.monotonic())) if held else self._queue.get()
            except queue.Empty:
                job = None
            except BaseException as exc:  # noqa: BLE001 - nothing may end the thread: a chunk's call may be waiting
                self._problems.append(f"a batch's background writer: {_said(exc)}")  # for a lock handed to it.
                job = None
            try:
                while held and held[0][0] <= time.monotonic():  # (One that an interrupt left: _run_chunk's finally.)
                    held.pop(0)[1].surrender()
            except BaseException as exc:  # noqa: BLE001 - its unlock failed; closing its file released it.
                self._problems.append(f"a batch's background writer: {_said(exc)}")
            try:
                if job is None:
                    continue
                if isinstance(job, _Ready):
                    job.make()
                    if job.lock is not None:
                        held.append((time.monotonic() + _READY_HOLD, job))
                    continue
                if not isinstance(job, tuple):  # finish(): everything before it is stored.
                    job.release()
                    if self is not _Writer._current:
                        self._ended = True
                        return  # A chunk's own writer: its chunk is done.
                    continue
                func, call, value, lock = job
                self._store(func, call, value, lock, BaseException)
            except BaseException as exc:  # noqa: BLE001 - the thread serves the next chunks too; finish() says it.
                self._problems.append(f"a batch's background writer: {_said(exc)}")

    def finish(self, raising: bool = True) -> None:
        """Wait until everything put before is done, then say what went wrong (without ``raising``, a warning that
        is an error is not raised: an interrupt on its way out stays what it is)."""
        done = _thread.allocate_lock()
        done.acquire()
        self._queue.put(done)
        while not done.acquire(timeout=0.1) and self.alive():
            pass
        if not self.alive():
            self._drain()
        problems, self._problems = self._problems, []  # This chunk's, said once each, all of them.
        if not self.alive() and not self._ended:
            problems.append("a batch's background writer stopped; results handed to it since were stored without it")
        first = None
        for text in problems:
            try:
                _warn(text)
            except Exception as exc:  # Warnings as errors: the first one is raised once all are said.
                first = first or exc
        if first is not None and raising:
            raise first


def _call_one(func: _Memoized[..., Any], args: tuple[Any, ...], key: bytes, portable: bool, off: bool,
              writer: _Writer | None = None, shown: str | Callable[[], str] = "", lead: int = 0,
              raising: bool = False, ready: _Ready | None = None,
              computing: Callable[[], None] | None = None) -> _Outcome:
    """One call of a batch; a failure is recorded, then returned (raised if ``raising``). ``key``: just looked up (b""
    if ``off``: caching was off when the batch began); ``writer`` stores the result in the background; ``shown``: the
    input's text for the ledger (or what makes it); ``lead``: arguments before the input (a method's self);
    ``ready``: the call as the writer readied it; ``computing``: see _Memoized._flow."""
    call = None
    try:
        if off:
            started = time.perf_counter()
            value = func.__wrapped__(*args)
            return _Outcome(True, value, True, seconds=time.perf_counter() - started)
        held = None
        if ready is not None and writer is not None:
            call, held = ready.take(writer)
        call = call or func._at_key(key, args, {})
        value, computed = func._get(call, False, None if writer is None else writer.put, True, held, computing)
        return _Outcome(True, value, computed, seconds=call.seconds)
    except Exception as exc:
        outcome = _failed(exc, portable)
        if call is not None:
            _record_failure(func, call, exc, outcome.traceback, shown if isinstance(shown, str) else shown(), lead)
        if raising:
            raise
        return outcome


def _run_chunk(func: _Memoized[..., Any], calls: list[tuple[bytes, tuple[Any, ...], str]], portable: bool, off: bool,
               lead: int = 0, nonce: bytes = b"") -> tuple[list[_Outcome], int, float]:
    """A worker's task, at module level to pickle by name: a chunk's calls (key, arguments, the input's text),
    giving their outcomes in order, its pid and its seconds. ``nonce`` makes every submission unique:
    Dask treats equal submissions as one pure task and hands back an old result, reported as computed but never
    stored (issue 18)."""
    started = time.perf_counter()
    writer = _Writer.running()
    outcomes: list[_Outcome] = []
    ahead: list[_Ready] = []  # This call's _Ready until the call has begun, and the next one's once readied.
    slow = False  # Whether the last call took long enough for readying the next to pay (a thread handshake).

    def computing() -> None:  # This call holds its lock and computes: ready the next one meanwhile.
        index = len(outcomes) + 1
        if slow and index < len(calls) and writer.alive():
            ahead.append(writer.ready(func, calls[index][0], calls[index][1]))

    def end(raising: bool) -> None:
        try:
            writer.finish(raising)  # First: a readied call's make() may still be queued.
        finally:
            for ready in ahead:  # Readied for a call that an interrupt stopped before it began (or just as it did).
                ready.surrender()
                if ready.taken is not None:  # Taken, perhaps before the call's own try/finally had it. Released
                    ready.taken.release()  # once finish() is done: by then a result handed off is stored.

    try:
        for key, args, text in calls:
            ready = ahead[0] if ahead else None  # Readied during the last call; the next one may join it.
            outcome = _call_one(func, args, key, portable, off, writer, text, lead, False, ready, computing)
            if ready is not None:
                ahead.remove(ready)  # Only now: an interrupt before the call took its lock finds it below.
            outcomes.append(outcome)
            slow = outcome.computed and _READY_AFTER <= outcome.seconds <= _READY_HOLD
    except BaseException:  # KeyboardInterrupt, SystemExit: _call_one returns every Exception as an outcome.
        end(False)
        raise
    end(True)
    return outcomes, _pid(), time.perf_counter() - started


class Failure:
    """One input that raised in :meth:`map`: its position, the input, the exception and its traceback text."""

    __slots__ = ("index", "input", "exception", "traceback")

    def __init__(self, index: int, input: Any, exception: BaseException, traceback: str) -> None:
        self.index, self.input, self.exception, self.traceback = index, input, exception, traceback

    def __repr__(self) -> str:
        return f"Failure(index={self.index}, input={self.input!r}, exception={self.exception!r})"


class _Done:
    """One input of a batch: its position, its arguments, its key if it goes to a worker, its outcome once known."""

    __slots__ = ("index", "args", "key", "outcome")

    def __init__(self, index: int, args: tuple[Any, ...]) -> None:
        self.index, self.args, self.key = index, args, b""
        self.outcome: _Outcome | None = None


def _answer_here(func: _Memoized[..., Any], done: _Done, lead: tuple[Any, ...], retry: bool = True,
                 total: int | None = None) -> bool:
    """Settle an input here if its result is cached, its key cannot be made, or (without ``retry``) its failure is
    recorded for the current code; else keep its key for the call and return False. A batch of more inputs (its
    ``total``) than the key memo or _recent keep goes past them: each input would only evict another (issue 20)."""
    args, recent = lead + done.args, total is None or total <= _RECENT_COUNT
    try:
        if total is None or total <= _KEY_MEMO_SIZE:
            call = func._keyed(args, {})
        else:
            call = func._at_key(func._key(args, {}), args, {})
    except Exception as exc:
        done.outcome = _failed(exc, False)
        return True
    files = func._store
    value = func._hit(call, recent)
    if value is not _MISSING:
        done.outcome = _Outcome(True, value, False, seconds=call.seconds)
        return True
    recorded = None if retry or files is None or call.slot is None else files.failure(call.slot)
    if recorded is not None and recorded.get("identity") == _key_identity(call.key):  # Failed under this code.
        failure = FailureRecord(recorded, current=True)
        done.outcome = _Outcome(False, failure, False, failure.traceback)
        return True
    done.key = call.key
    return False


def _serial(func: _Memoized[..., Any], calls: Iterator[tuple[Any, ...]], lead: tuple[Any, ...], options: _BatchOptions,
            off: bool, total: int | None) -> Iterator[_Done]:
    """A batch in this thread, one call after the other."""
    keep_going = options.keep_going
    for index, args in enumerate(calls):
        done = _Done(index, args)
        if off or not _answer_here(func, done, lead, options.retry_failures, total):
            # Without keep_going a failure propagates with its own traceback, as a loop would.
            shown = (lambda: _label_text(options.label, args))  # noqa: E731 - made only if the call fails.
            done.outcome = _call_one(func, lead + args, done.key, False, off, shown=shown, lead=len(lead),
                                     raising=not keep_going)
        elif not keep_going and done.outcome is not None and not done.outcome.ok:
            raise done.outcome.value
        yield done


class _Plan:
    """Where a batch runs: its executor (or a pool of ``workers`` to start), how calls travel, how many at once."""

    def __init__(self, func: _Memoized[..., Any], name: str, options: _BatchOptions, off: bool) -> None:
        import concurrent.futures as futures

        executor, workers, processes = options.executor, options.workers, options.processes
        self.executor, self.workers, self.processes, self.off = executor, workers, processes, off
        self.owned = executor is None  # Started and shut down by the batch.
        if executor is None:
            self.capacity, in_process, by_standard_pickle = workers or 1, not processes, processes
        elif not callable(getattr(executor, "submit", None)):
            raise TypeError(f"{name}: executor= takes a concurrent.futures.Executor (an object with submit()), not "
                            f"{type(executor).__name__}")
        else:
            self.capacity = workers or getattr(executor, "_max_workers", None) or os.cpu_count() or 1
            in_process = isinstance(executor, futures.ThreadPoolExecutor)
            by_standard_pickle = isinstance(executor, futures.ProcessPoolExecutor)
        self.portable = not in_process  # Exceptions are checked for the trip back unless the calls run here.
        if not by_standard_pickle:
            return
        # Found now, not as a hang or a broken pool later: a function that the standard pickler cannot send (a
        # lambda, a nested function), or one of a __main__ without a file where workers import __main__ afresh
        # from its file (spawn or forkserver, Linux's default from 3.14): a notebook, the REPL or ``python -c``.
        import multiprocessing
        import pickle

        try:
            pickle.dumps(func)
        except Exception as exc:
            raise TypeError(f"{name}: {func.__qualname__} cannot be sent to worker processes ({exc}). Define it at "
                            "module level (a lambda or a function defined inside another cannot be pickled), or run "
                            "the calls in threads: processes=False, or an executor of threads") from exc
        context = getattr(executor, "_mp_context", None) or multiprocessing
        method = context.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
        in_main = getattr(func.__wrapped__, "__module__", None) == "__main__"
        if method != "fork" and in_main and not getattr(sys.modules.get("__main__"), "__file__", None):
            raise TypeError(
                f"{name}: {func.__qualname__} is defined in __main__ without a file (a notebook, the REPL or python "
                f"-c), and worker processes started by {method!r} cannot import it. Move it into a module (a .py file "
                "beside the notebook) and import it from there, run the calls in threads (processes=False), or pass "
                "executor=ProcessPoolExecutor(mp_context=multiprocessing.get_context('fork'))"
            )

    def broken(self, exc: BaseException | None) -> bool:
        """Whether ``exc`` says that a worker of the pool the batch started died: the pool takes no more work."""
        return self.owned and self.processes and type(exc).__name__ == "BrokenProcessPool"

    def start(self, workers: int | None = None) -> Any:
        """The executor to use (``workers``: a pool of that many); the caller shuts it down if ``owned``."""
        import concurrent.futures as futures

        if self.executor is not None and workers is None:
            return self.executor
        if self.processes:
            return futures.ProcessPoolExecutor(workers or self.workers, initializer=_exit_with_parent)
        return futures.ThreadPoolExecutor(self.workers)


def _stop_pool(pool: Any, now: bool) -> None:
    """Shut down a pool that a batch started; ``now`` (an interrupt): terminate its worker processes instead of
    waiting for the calls they run (issue 18)."""
    processes = list((getattr(pool, "_processes", None) or {}).values()) if now else []
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + 1.0
    for process in processes:  # Reaped here: nobody joins a pool shut down without waiting.
        process.join(max(0.0, deadline - time.monotonic()))
        if process.exitcode is None:
            process.kill()  # It ignored SIGTERM.
            process.join()
    # Its futures fail as the pool breaks; cancelled ones would make CPython 3.11's
    # manager thread raise InvalidStateError as it fails them (terminate_broken).
    pool.shutdown(wait=not now, cancel_futures=not processes)


def _death(pool: Any, processes: list[Any]) -> str:
    """How the one worker of ``pool`` ended, after it broke: a signal or an exit code."""
    import signal

    pool.shutdown(wait=True)
    code = next((p.exitcode for p in processes if p.exitcode), None)
    if code is None:
        return "worker died"
    if code < 0:
        try:
            return f"worker died: signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"worker died: signal {-code}"
    return f"worker died: exit code {code}"


def _stream(func: _Memoized[..., Any], calls: Iterator[tuple[Any, ...]], lead: tuple[Any, ...], options: _BatchOptions,
            plan: _Plan, total: int | None) -> Iterator[_Done]:
    """A batch on an executor, yielding each input's _Done in input order (docs/batches.md)."""
    import collections
    import concurrent.futures as futures

    keep_going, chunksize, label = options.keep_going, options.chunksize, options.label
    limit = 2 * plan.capacity  # Chunks in flight: two per worker.
    size = chunksize or 1
    here = _pid()
    ahead: collections.deque[_Done] = collections.deque()  # Read, waiting to be yielded.
    pending: dict[Any, list[_Done]] = {}
    buffer: dict[Any, _Done] = {}  # The next chunk, by key (by index when off: no keys).
    inputs = enumerate(calls)
    reading = True
    interrupted = False
    executor: Any = None  # Started by the first send: a batch with every result cached starts no pool.
    pools: list[Any] = []  # What to stop at the end.

    def task(chunk: list[_Done]) -> tuple[Any, ...]:
        calls = [(done.key, lead + done.args, "" if label is None else _label_text(label, done.args)) for done in chunk]
        # Only a foreign executor gets a nonce: Dask's submissions are pure by default.
        return (_run_chunk, func, calls, plan.portable, plan.off, len(lead), b"" if plan.owned else os.urandom(8))

    def send() -> None:
        nonlocal executor
        if executor is None:
            executor = plan.start()
            pools.extend([executor] if plan.owned else [])
        chunk = list(buffer.values())
        try:
            future = executor.submit(*task(chunk))
        except Exception as exc:  # A worker died since the last send: the pool refuses work.
            if not plan.broken(exc):
                raise
            future = futures.Future()  # Judged with the broken pool's other chunks, one input at a time.
            future.set_exception(exc)
        pending[future] = chunk
        buffer.clear()

    def stop_after(index: int) -> None:
        """A loop would have stopped at this failure: nothing after it runs."""
        nonlocal reading
        reading = False
        for key in [key for key, done in buffer.items() if done.index >= index]:
            del buffer[key]
        for future, chunk in pending.items():
            if chunk[0].index > index:
                future.cancel()

    def settle(chunk: list[_Done], report: tuple[list[_Outcome], int, float]) -> None:
        nonlocal size
        outcomes, pid, seconds = report
        for done, outcome in zip(chunk, outcomes):
            done.outcome = outcome
        if pid != here:  # Another process's counts: add them to this one's.
            computed = sum(1 for outcome in outcomes if outcome.ok and outcome.computed)
            func._misses += computed
            func._hits += sum(1 for outcome in outcomes if outcome.ok) - computed
            func._saved += sum(o.seconds for o in outcomes if o.ok and not o.computed)
        if chunksize is None and seconds > 0:
            size = max(1, min(_MAX_CHUNK, int(_CHUNK_SECONDS / (seconds / len(chunk)))))

    def alone(done: _Done) -> None:
        """Run an input of a broken pool alone, in a pool of one: it completes, or its worker's death is its failure."""
        from concurrent.futures.process import BrokenProcessPool

        if _answer_here(func, done, lead, True):
            return  # Stored before the pool broke (or its key cannot be made).
        solo = plan.start(1)
        pools.append(solo)
        processes: list[Any] = []
        try:
            future = solo.submit(*task([done]))
            processes = list((getattr(solo, "_processes", None) or {}).values())  # Started by submit().
            settle([done], future.result())
        except BrokenProcessPool:
            exc = BrokenProcessPool(f"{_death(solo, processes)} while running {func.__qualname__} on this input")
            done.outcome = _failed(exc, False)
            call = func._at_key(done.key, lead + done.args, {})
            _record_failure(func, call, exc, "", _label_text(label, done.args), len(lead))
        finally:
            solo.shutdown(wait=True)
            pools.remove(solo)

    try:
        while True:
            while ahead and ahead[0].outcome is not None:
                yield ahead.popleft()
            full = len(pending) >= limit
            # Read a bounded window ahead; send the misses gathered so far as soon as there is room: a rerun's few
            # misses go out at once, one by one, while a cold run's gather into full chunks as the workers stay busy.
            reads = reading and len(ahead) < (limit + 1) * size + 1000 and not (full and len(buffer) >= size)
            if reads:
                item = next(inputs, None)
                if item is None:
                    reading = False
                else:
                    done = _Done(*item)
                    if not plan.off and _answer_here(func, done, lead, options.retry_failures, total):
                        if not keep_going and not done.outcome.ok:  # type: ignore[union-attr]
                            stop_after(done.index)
                        if not ahead:  # Nothing before it waits (nor is sent): out at once, as a rerun's inputs go.
                            yield done
                            continue
                    else:
                        if done.key in buffer:  # One key twice in a chunk: the second waits for the next.
                            send()
                        buffer[done.key or done.index] = done
                    ahead.append(done)
            if buffer and not full:
                send()
                continue
            if reads:
                continue
            if not pending:
                return  # Everything sent came back; anything left lies after a failure.
            finished, _ = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
            if any(plan.broken(future.exception()) for future in finished if not future.cancelled()):
                # A dying worker breaks the whole pool: each input of the chunks in flight runs again alone, to
                # record the one that kills its worker as a failure; a new pool takes the rest (docs/batches.md).
                pools.remove(executor)
                executor.shutdown(wait=True)  # Every future of a broken pool is settled by now.
                executor, finished = None, set(pending)
            suspects: list[_Done] = []
            for future in sorted(finished, key=lambda future: pending[future][0].index):
                chunk = pending.pop(future)
                exc = None if future.cancelled() else future.exception()
                if plan.broken(exc):
                    suspects.extend(chunk)
                elif not future.cancelled():  # It came back, or could not go out, run, or come back.
                    settle(chunk, future.result() if exc is None else ([_failed(exc, False)] * len(chunk), here, 0.0))
                    failed = [done.index for done in chunk if done.outcome is not None and not done.outcome.ok]
                    if failed and not keep_going:
                        stop_after(failed[0])
            for done in suspects:
                alone(done)
                if not keep_going and not done.outcome.ok:  # type: ignore[union-attr]
                    stop_after(done.index)
                    break
    except BaseException as exc:
        interrupted = not isinstance(exc, (Exception, GeneratorExit))  # KeyboardInterrupt, SystemExit
        raise
    finally:
        for future in pending if not (interrupted and plan.owned and plan.processes) else ():
            future.cancel()  # Only this batch's futures; an executor it did not start stays up.
        for pool in pools:
            _stop_pool(pool, interrupted)


def _duration(seconds: float) -> str:
    """A length of time as a person reads it: 1.2 s, 4 min 10 s, 2 h 10 min, 3 d 4 h."""
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    whole = int(seconds + 0.5)
    for big, small, name, rest in ((86400, 3600, "d", "h"), (3600, 60, "h", "min")):
        if whole >= big:
            return f"{whole // big} {name} {whole % big // small} {rest}"
    return f"{whole // 60} min {whole % 60} s"


def _batch_figures(computed: int, computed_seconds: float, reused: int, saved_seconds: float) -> str:
    """What a batch did: "7 computed (1.2 s), 1,993 reused (saved 2 h 10 min of compute)"."""
    spent, saved = _duration(computed_seconds), _duration(saved_seconds)
    return f"{computed:,} computed ({spent}), {reused:,} reused (saved {saved} of compute)"


class BatchResult:
    """What :meth:`map` returns.

    ``results`` holds one item per input, in input order: the result, or for an input that failed its
    :class:`Failure` (so a result of None is a real None). ``failures`` lists the failures alone, ``successes``
    the results alone; ``computed`` and ``reused`` count the results by where they came from.
    ``computed_seconds`` is the time the computed ones took (summed over workers: compute time, not wall time);
    ``saved_seconds`` the time the reused ones had taken when they were computed, as their entries record it.
    ``summary`` says it in words.
    """

    def __init__(self) -> None:
        self.results: list[Any] = []
        self.failures: list[Failure] = []
        self.computed = self.reused = 0
        self.computed_seconds = self.saved_seconds = 0.0

    @property
    def summary(self) -> str:
        """"7 computed (1.2 s), 1,993 reused (saved 2 h 10 min of compute), 0 failed"."""
        figures = _batch_figures(self.computed, self.computed_seconds, self.reused, self.saved_seconds)
        return f"{figures}, {len(self.failures):,} failed"

    @property
    def done(self) -> int:
        """How many inputs were run."""
        return len(self.results)

    @property
    def successes(self) -> list[Any]:
        """The results of the inputs that succeeded, in input order."""
        return [result for result in self.results if not isinstance(result, Failure)]

    @property
    def ok(self) -> bool:
        """True if every input succeeded."""
        return not self.failures

    def __repr__(self) -> str:
        return (f"BatchResult({len(self.results)} inputs: {self.reused} reused, {self.computed} computed, "
                f"{len(self.failures)} failed)")


def _clock(seconds: float) -> str:
    """H:MM:SS, with days in front past 24 hours."""
    days, rest = divmod(int(seconds), 86400)
    text = time.strftime("%H:%M:%S", time.gmtime(rest))
    return f"{days}d {text}" if days else text


class Progress:
    """What a ``progress=`` callable of :meth:`map` receives: a snapshot of a batch.

    ``function`` (its qualified name), ``done`` inputs of ``total`` (None for a generator), of which ``failed``,
    ``computed`` and ``reused``; the seconds the computed calls took (``computed_seconds``) and those the reused
    results had taken when first computed (``saved_seconds``); ``elapsed`` seconds; ``eta`` seconds left (None
    when unknown); ``final``: the batch has ended. ``percent`` is done/total in percent, or None. More fields may
    be added; a callable should read them by name."""

    __slots__ = ("function", "done", "total", "failed", "computed", "reused", "computed_seconds", "saved_seconds",
                 "elapsed", "eta", "final")
    function: str
    done: int
    total: int | None
    failed: int
    computed: int
    reused: int
    computed_seconds: float
    saved_seconds: float
    elapsed: float
    eta: float | None
    final: bool

    def __init__(self, **fields: Any) -> None:
        for name in self.__slots__:
            setattr(self, name, fields[name])

    @property
    def percent(self) -> float | None:
        return None if not self.total else 100.0 * self.done / self.total

    def __repr__(self) -> str:
        return "Progress(" + ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__) + ")"

    def __str__(self) -> str:
        rate = self.done / self.elapsed if self.elapsed > 0 else 0.0
        figures = _batch_figures(self.computed, self.computed_seconds, self.reused, self.saved_seconds)
        if self.percent is None:  # A generator: no total, no ETA.
            return f"{self.function}: {self.done} done, {rate:.1f}/s, {self.failed} failed; {figures}"
        eta = "-" if self.eta is None else _clock(self.eta)
        done = f"{self.percent:3.0f}% {self.done}/{self.total} done"
        return f"{self.function}: {done}, {rate:.1f}/s, ETA {eta}, {self.failed} failed; {figures}"


def _unfit(func: _Memoized[..., Any], started: float, name: str) -> None:
    """At a batch's end, warn if a sweep (in any process) evicted an entry used since it ``started``: its results do
    not all fit under max_bytes, and since a batch walks its inputs in order, a rerun would reuse none of the
    evicted ones (issue 21). One .usage read per batch."""
    files = func._store
    if files is None or files.max_bytes is None or files.readonly:
        return
    try:
        files._usage(lambda total: total)
    except OSError:
        return
    if files.horizon < started:
        return
    sizes = [_disk_bytes(st) for st in map(_lstat_or_none, (p for p, _f in files.files(func._folder))) if st]
    each = -(-sum(sizes) // len(sizes)) if sizes else 0
    fit = f"; about {files.max_bytes // each:,} of its entries fit ({each:,} bytes on disk each)" if each else ""
    _warn(f"{name}: the results do not fit in the store at max_bytes={files.max_bytes:,}: entries used since the "
          f"batch began were evicted, so a rerun computes them again{fit}. Raise max_bytes, or run the batch in parts "
          "that fit")


class _Progress:
    """A batch's progress: one line redrawn on stderr (five times a second at most), a record on the "donecache"
    logger every few seconds, or a Progress for the user's callable (ten times a second at most)."""

    def __init__(self, name: str, total: int | None, progress: Any, function: str, counts: BatchResult) -> None:
        number = isinstance(progress, (int, float)) and not isinstance(progress, bool)
        if not (progress is None or callable(progress) or isinstance(progress, bool) or (number and progress > 0)):
            raise ValueError(
                f"{name}: progress= takes True, False, None, a number of seconds or a callable, not {progress!r}"
            )
        self.name, self.total, self.function, self._call = name, total, function, progress
        self.done = self.failed = 0
        self.counts = counts  # map()'s result; for imap() only its figures count.
        self._started = self._last = time.monotonic()
        self._logged = False
        # A Jupyter kernel replaces stderr with its own stream, which draws "\r" lines; asking the type costs
        # nothing (importing IPython to ask would cost 0.3 s).
        terminal = progress is None and (sys.stderr.isatty() or type(sys.stderr).__module__.startswith("ipykernel"))
        if callable(progress):
            self.mode, self._every = "call", 0.1
        elif progress is True or terminal:
            self.mode, self._every = "terminal", 0.2
        elif progress is False:
            self.mode, self._every = "off", 0.0
        else:
            import logging

            self.mode, self._every = "log", _LOG_EVERY if progress is None else float(progress)
            self._logger = logging.getLogger("donecache")

    def watch(self, func: _Memoized[..., Any], stream: Iterator[_Done], keep_going: bool, keep: bool) -> Iterator[Any]:
        """Pass the results on, counting (``keep``: into self.counts, for map(), yielding none); raise a failure
        unless ``keep_going``; at the end, warn if the results did not fit (_unfit)."""
        started, counts = time.time(), self.counts
        try:
            for done in stream:
                outcome = done.outcome
                assert outcome is not None
                value = outcome.value
                self.done += 1
                if not outcome.ok:
                    self.failed += 1
                    if not keep_going:
                        raise value
                    value = Failure(done.index, done.args[0] if len(done.args) == 1 else done.args, value,
                                    outcome.traceback)
                    if keep:
                        counts.failures.append(value)
                elif outcome.computed:
                    counts.computed += 1
                    counts.computed_seconds += outcome.seconds
                else:
                    counts.reused += 1
                    counts.saved_seconds += outcome.seconds
                if time.monotonic() - self._last >= self._every:  # Asked here: a call per input was 4% of a rerun.
                    self.update()
                if keep:
                    counts.results.append(value)
                    continue
                try:
                    yield value
                except BaseException as exc:
                    if not isinstance(exc, (Exception, GeneratorExit)):
                        stream.throw(exc)  # type: ignore[attr-defined]  # An interrupt: the pool stops now.
                    raise
        finally:
            stream.close()  # type: ignore[attr-defined]
            self.close()
        _unfit(func, started, self.name)

    def snapshot(self, final: bool = False) -> Progress:
        elapsed = time.monotonic() - self._started
        left = None if self.total is None or not self.done else (self.total - self.done) * elapsed / self.done
        c = self.counts
        return Progress(function=self.function, done=self.done, total=self.total, failed=self.failed,
                        computed=c.computed, reused=c.reused, computed_seconds=c.computed_seconds,
                        saved_seconds=c.saved_seconds, elapsed=elapsed, eta=left, final=final)

    def update(self, final: bool = False) -> None:
        now = time.monotonic()
        if self.mode == "off" or (not final and now - self._last < self._every):
            return
        self._last = now
        if self.mode == "call":
            try:
                self._call(self.snapshot(final))
            except Exception as exc:  # A broken bar must not end a long batch.
                self.mode = "off"
                failure = f"{type(exc).__name__}: {_safe_str(exc)}"
                _warn(f"{self.name}: the progress= callable raised {failure}; progress is off")
        elif self.mode == "terminal":
            sys.stderr.write(f"\r{self.snapshot(final)} ")
            sys.stderr.flush()
        elif not final or self._logged:  # A batch that ends before the first record logs nothing.
            self._logged = True
            self._logger.info("%s", self.snapshot(final))

    def close(self) -> None:
        self.update(final=True)
        if self.mode == "terminal":
            sys.stderr.write("\n")
            sys.stderr.flush()


def _share(func: _Memoized[..., Any], calls: Iterator[tuple[Any, ...]], lead: tuple[Any, ...], shard: Any,
           name: str) -> Iterator[tuple[Any, ...]]:
    """The inputs that shard=(index, count) runs: those whose key's digest is index modulo count, so that every
    input falls to exactly one shard, in any process on any host (keys are the same everywhere). An input with no
    key (an argument that cannot be one) falls to shard 0, which reports it."""
    pair = isinstance(shard, tuple) and len(shard) == 2
    if not (pair and all(isinstance(n, int) and not isinstance(n, bool) for n in shard) and 0 <= shard[0] < shard[1]):
        raise ValueError(f"{name}: shard= takes (index, count) with 0 <= index < count, not {shard!r}")
    index, count = shard
    for args in calls:
        try:
            key = func._key(lead + args, {})  # Makes no cache directory (DONECACHE=off).
        except Exception:
            if index == 0:
                yield args
            continue
        if int.from_bytes(func._blake2b(key, digest_size=8).digest(), "big") % count == index:
            yield args


def _batch(func: _Memoized[..., Any], iterables: tuple[Iterable[Any], ...], lead: tuple[Any, ...], method: str,
           options: _BatchOptions, batch: BatchResult | None = None) -> Iterator[Any]:
    """map() and imap(): check the options at once, then stream the results (map: into ``batch``).
    ``lead`` is put before every call's arguments (a bound method's instance)."""
    name = f"{func.__qualname__}.{method}()"
    if isinstance(func, _AsyncMemoized):  # Every batch starts here: plain or bound, map or imap.
        advice = "asyncio.gather()" if method == "map" else "asyncio.as_completed()"
        raise TypeError(f"{name}: use {advice} for async functions")
    if not iterables:
        raise TypeError(f"{name} needs at least one iterable of inputs")
    for option, value in (("workers", options.workers), ("chunksize", options.chunksize)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: {option}= must be a positive int or None, not {value!r}")
    calls: Iterator[tuple[Any, ...]] = zip(*iterables)
    try:
        total: int | None = min(len(it) for it in iterables)  # type: ignore[arg-type]
    except TypeError:  # An iterable without a length.
        total = None
    if options.shard is not None:
        calls, total = _share(func, calls, lead, options.shard, name), None
    if options.label is not None and not callable(options.label):
        raise TypeError(f"{name}: label= takes a callable (called with an input's arguments), not {options.label!r}")
    meter = _Progress(name, total, options.progress, func.__qualname__, batch or BatchResult())
    off = _switched_off()  # Taken once: the batch's workers follow the parent.
    if options.executor is None and (options.workers or 1) == 1:
        stream = _serial(func, calls, lead, options, off, total)
    else:
        stream = _stream(func, calls, lead, options, _Plan(func, name, options, off), total)
    return meter.watch(func, stream, options.keep_going, batch is not None)


def _run_map(func: _Memoized[..., Any], iterables: tuple[Iterable[Any], ...], lead: tuple[Any, ...],
             options: _BatchOptions) -> BatchResult:
    batch = BatchResult()
    next(_batch(func, iterables, lead, "map", options, batch), None)  # It yields nothing: the results go to batch.
    return batch


def _run_imap(func: _Memoized[..., Any], iterables: tuple[Iterable[Any], ...], lead: tuple[Any, ...],
              options: _BatchOptions) -> Iterator[Any]:
    return _batch(func, iterables, lead, "imap", options)


# ---------------------------------------------------------------------------
# The command line: python -m donecache info|clear|verify|prune|status|failures
#
# It reads entry headers and keys, never values: inspecting a cache does not unpickle anything. Exit codes: 0
# success, 1 the answer is "no" (a stage is not done, no entries matched), 2 a usage error or a path that is not
# there. Each command returns its exit code, its report (printed by --json) and the lines that say it to a person.
# ---------------------------------------------------------------------------


class _UsageError(Exception):
    """A command line that cannot be carried out: exit 2 with this message."""


class _NoMatch(Exception):
    """Nothing matched the function named: exit 1 with this message."""


def _human(size: float) -> str:
    """A size in bytes by its magnitude: 512 B, 11.2 KiB, 3.4 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"


def _cli_size(text: str | None) -> int | None:
    """--max-bytes, as GNU coreutils spell sizes (du -B, sort -S): K, KiB = 1024; KB = 1000; and so on up to T."""
    if text is None:
        return None
    import re

    found = re.fullmatch(r"\s*(\d+\.?\d*|\.\d+)\s*(?:([kmgt])(i?b)?|b)?\s*", text, re.IGNORECASE)
    number, prefix, suffix = found.groups() if found else ("0", "", "")
    power = "kmgt".find(prefix.lower()) + 1 if prefix else 0
    size = int(float(number) * (1000 if (suffix or "").lower() == "b" else 1024) ** power)
    if size < 1:
        raise _UsageError(f"--max-bytes {text!r}: give a positive size in bytes, or with K/KiB, M/MiB, G/GiB, T/TiB "
                          "(powers of 1024) or KB, MB, GB, TB (of 1000): 1000000, 500M, 10MB, 2GiB")
    return size


def _cli_age(text: str | None) -> float | None:
    """--older-than: a positive number and its unit (required), s, m, h or d."""
    if text is None:
        return None
    word = text.strip().lower()
    try:
        age = float(word[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[word[-1:]]
    except (KeyError, ValueError):
        age = 0.0
    if not 0 < age < float("inf"):
        raise _UsageError(f"--older-than {text!r}: give a positive age with its unit, s, m, h or d: "
                          "3600s, 90m, 12h, 30d")
    return age


def _names(name: str, wanted: str | None) -> bool:
    """Whether ``wanted`` (None: every function) names ``name`` as printed, as module.qualname or by qualname."""
    return wanted is None or wanted in (name, name.partition(":")[2], name.replace(":", "."))


def _message_pattern(message: str) -> str:
    """A failure's message with its particulars (quoted values, numbers) elided, to group alike failures."""
    import re

    pattern = re.sub(r"'[^']*'|\"[^\"]*\"|(?<![\w.])-?\d[\d.,:/-]*", "...", message.splitlines()[0] if message else "")
    return message if pattern.strip(". ") == "" else pattern


def _cli_store(path: str, flag: str) -> _EntryFiles:
    """The store at ``path``: the command line never writes into, or labels, a directory donecache did not make."""
    if not os.path.isdir(path):
        what = "not a directory" if os.path.exists(path) else "no such directory"
        raise _UsageError(f"{path}: {what}; give the path of a cache directory (by default .donecache)")
    if not _is_store(path):
        raise _UsageError(f"{path}: not a donecache store (there is no CACHEDIR.TAG written by donecache in it); "
                          "give the path of a cache directory, such as the .donecache directory beside your script")
    # Trusted whoever owns it: the command line reads keys, heads and JSON, never a value.
    return _EntryFiles(path, flag, False, trust_shared=True)


def _survey(files: _EntryFiles, now: float) -> dict[str, Any]:
    """What `info` reports; it reads a bounded prefix (the head) of each entry."""
    expired = damaged = size = disk = 0
    each: dict[str, dict[str, Any]] = {}  # Per function, live entries only but for "expired".
    is_stale = _stale_test(files)
    for found in files.scan():
        if found.stat is None:
            continue
        size, disk = size + found.stat.st_size, disk + _disk_bytes(found.stat)
        if found.entry is None:
            damaged += 1
            continue
        fresh = {"entries": 0, "bytes": 0, "disk_bytes": 0, "expired": 0, "stale": 0, "compute_seconds": 0.0}
        row = each.setdefault(_function_of(found.entry.key), fresh)
        created = found.entry.created
        if not found.entry.live(now):
            expired += 1
            row["expired"] += 1
            continue
        row.update(
            entries=row["entries"] + 1, bytes=row["bytes"] + found.stat.st_size,
            disk_bytes=row["disk_bytes"] + _disk_bytes(found.stat), stale=row["stale"] + int(is_stale(found)),
            compute_seconds=row["compute_seconds"] + found.entry.seconds,
            oldest=min(row.get("oldest", created), created), newest=max(row.get("newest", created), created),
        )  # fmt: skip
    live = {name: row for name, row in sorted(each.items()) if row["entries"]}
    return {
        "path": files.root,
        "entries": {"live": sum(row["entries"] for row in live.values()), "expired": expired, "damaged": damaged},
        "bytes": size,  # The files' sizes; disk_bytes their blocks (many small entries take a block each).
        "disk_bytes": disk,
        "temporary_files": sum(1 for _ in _temp_files(files.root)),
        "functions": {name: row["entries"] for name, row in live.items()},
        "function_bytes": {name: {k: row[k] for k in ("bytes", "disk_bytes")} for name, row in live.items()},
        # Live entries of older code than the identity that the last process to run the function recorded.
        "stale": {name: row["stale"] for name, row in live.items() if row["stale"]},
        "per_function": dict(sorted(each.items())),  # All of it per function (docs/cli.md lists the fields).
    }


def _cli_info(args: Any) -> tuple[int, Any, list[str]]:
    report = _survey(_cli_store(args.path, "r"), time.time())
    entries = report["entries"]
    summary = (f"  {entries['live']:,} entries, {_human(report['bytes'])} ({_human(report['disk_bytes'])} on disk); "
               f"{entries['expired']:,} expired, {entries['damaged']:,} damaged, "
               f"{report['temporary_files']:,} temporary files left by crashed writers")
    lines = [f"cache {report['path']}", summary]
    for name, row in report["per_function"].items():
        line = f"    {row['entries']:,} entries, {_human(row['bytes'])}"
        if row["entries"]:
            oldest, newest = (time.strftime("%Y-%m-%d %H:%M", time.localtime(row[k])) for k in ("oldest", "newest"))
            line += f", {_duration(row['compute_seconds'])} of compute held; made {oldest} to {newest}"
        lines += [f"  {name}", line]
        if row["stale"] or row["expired"]:
            lines.append(f"    {row['stale']:,} of older code (prune --stale removes them), {row['expired']:,} expired")
    return 0, report, lines


def _cli_clear(args: Any) -> tuple[int, Any, list[str]]:
    files, wanted = _cli_store(args.path, "w"), args.function
    matches: Callable[[bytes], bool] = lambda key: _names(_function_of(key), wanted)  # noqa: E731
    if wanted is None:
        removed = files.clear()
    else:
        # The top level holds donecache.open() keys (and memoize entries of donecache 0.1): judged key by key.
        # A function folder holds one function's entries: the first head that can be read names it.
        removed = files.clear(matches, folder="")
        for folder in files.folders():
            entry = next((found.entry for found in files.scan(folder) if found.entry is not None), None)
            if entry is not None and matches(entry.key):
                removed += files.clear(matches, folder=folder)
    # Their failures go with them: a rerun computes those inputs afresh.
    files.drop_failures(lambda record: _names(str(record.get("function")), wanted))
    if wanted is not None and not removed:
        known = ", ".join(_survey(files, time.time())["functions"]) or "none"
        raise _NoMatch(f"no entries of {wanted!r} in {files.root}; functions there: {known}")
    return 0, {"path": files.root, "removed": removed}, [f"removed {removed} entries from {files.root}"]


def _cli_failures(args: Any) -> tuple[int, Any, list[str]]:
    import collections

    age = _cli_age(args.older_than)
    files = _cli_store(args.path, "w" if args.clear else "r")
    is_older, now = files.older_code(), time.time()

    def chosen(record: dict[str, Any]) -> bool:
        old_enough = age is None or float(record.get("time") or 0) < now - age
        return old_enough and _names(str(record.get("function")), args.function)

    every = [r for r in files.failures() if chosen(r)]
    if args.function is not None and not every:
        functions = {str(r.get("function")) for r in files.failures()} | set(files.identities())
        known = ", ".join(sorted(functions)) or "none"
        raise _NoMatch(f"no failures of {args.function!r} in {files.root}; functions there: {known}")
    if args.clear:
        removed = files.drop_failures(chosen)
        return 0, {"path": files.root, "removed": removed}, [f"removed {removed} failure record(s) from {files.root}"]
    records = [FailureRecord(r, not is_older(str(r.get("function")), r.get("identity"))) for r in every]
    older = sum(1 for record in records if not record.current)
    records = [record for record in records if record.current or args.all]
    groups = collections.Counter((r.type.rpartition(".")[2], _message_pattern(r.message)) for r in records)
    summary = sorted(groups.items(), key=lambda item: (-item[1], item[0]))
    shown = "" if args.all else " of the current code"
    hidden = f" ({older} more of older code: --all shows them)" if older and not args.all else ""
    lines = [f"{len(records)} failure(s){shown} recorded in {files.root}{hidden}"]
    lines += [f"  {kind}: {message}: {count} input{'s' if count != 1 else ''}" for (kind, message), count in summary]
    for record in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.time))
        old = "" if record.current else "  (older code)"
        lines.append(f"{when}  {record.function}({record.label}){old}\n    {record.type}: {record.message}")
    rows = [{"type": kind, "message": message, "inputs": count} for (kind, message), count in summary]
    report = {"path": files.root, "summary": rows, "older_code": older, "failures": [r.as_dict() for r in records]}
    return (0 if records else 1), report, lines


def _cli_prune(args: Any) -> tuple[int, Any, list[str]]:
    max_bytes, age = _cli_size(args.max_bytes), _cli_age(args.older_than)
    files = _cli_store(args.path, "r" if args.dry_run else "w")
    removed, temps, evicted, evicted_bytes = _prune(files, None, max_bytes, age, stale=args.stale, dry_run=args.dry_run)
    report = {"path": files.root, "dry_run": args.dry_run, "removed_entries": removed, "removed_temporary_files": temps}
    what = "expired, damaged or stale" if args.stale else "expired or damaged"
    verb = "would remove" if args.dry_run else "removed"
    lines = [f"{verb} {removed} {what} entries and {temps} temporary files from {files.root}"]
    if max_bytes is not None or age is not None:
        report.update(evicted_entries=evicted, evicted_bytes=evicted_bytes)
        verb = "would evict" if args.dry_run else "evicted"
        lines.append(f"{verb} {evicted} least recently used entries ({_human(evicted_bytes)} on disk)")
    return 0, report, lines


def _cli_verify(args: Any) -> tuple[int, Any, list[str]]:
    files = _cli_store(args.path, "r")
    damaged = files.verify()
    lines = [f"damaged: {path}" for path in damaged]
    lines.append(f"{len(damaged)} damaged entries in {files.root}" + ("; prune removes them" if damaged else ""))
    return (1 if damaged else 0), {"path": files.root, "damaged": damaged}, lines


def _cli_status(args: Any) -> tuple[int, Any, list[str]]:
    try:
        _marker_path(".", args.marker)
    except ValueError:
        raise _UsageError(f"--marker {args.marker!r}: give a plain file name, such as DONE or _SUCCESS") from None
    rows, lines = [], []
    for directory in args.directories:
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise _UsageError(f"{directory}: not a directory; give the directory of a stage")
        found = _stage_status(directory, version=args.version, marker=args.marker)
        state, marker, builder = found.state, found.marker, found.builder
        rows.append({"directory": directory, "state": state, "marker": marker, "builder": builder})
        # A building stage is described by its builder; a done one by its marker.
        info = builder or marker or {}
        keys = ("host", "pid") if builder else ("finished", "version", "host")
        details = ", ".join(f"{k} {info[k]}" for k in keys if info.get(k) is not None)
        lines.append(f"{state:<13}  {directory}" + (f"  ({details})" if details else ""))
    return (0 if all(row["state"] == "done" for row in rows) else 1), rows, lines


def main(argv: list[str] | None = None) -> int:
    """The ``python -m donecache`` command; returns the exit code."""
    import argparse

    # The console script `donecache` (pyproject.toml) or `python -m donecache`.
    prog = "donecache" if os.path.basename(sys.argv[0]) in ("donecache", "donecache.exe") else "python -m donecache"
    description = ("Inspect and clean donecache stores and stage directories. Exit codes: 0 success, "
                   "1 not done or nothing matched, 2 usage error or missing path.")
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"donecache {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    def command(name: str, run: Callable[[Any], Any], help: str, *, store: bool = True, function: bool = False) -> Any:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--json", action="store_true", help="print JSON for scripts")
        if store:
            sub.add_argument("path", nargs="?", default=".donecache", help="the cache directory (default: .donecache)")
        if function:
            only = "only this function: module:qualname (as info prints it), module.qualname, or qualname"
            sub.add_argument("--function", metavar="NAME", help=only)
        sub.set_defaults(run=run)
        return sub

    command("info", _cli_info, "entries, bytes and expired entries of a cache, counted per function")
    command("clear", _cli_clear, "remove a cache's entries (all, or one function's)", function=True)
    command("verify", _cli_verify, "check every byte of every entry (exit 1 if any is damaged)")
    failures = command("failures", _cli_failures, "list the inputs that failed in batches, from the "
                       "store's ledger, with a summary by exception (exit 1 if none)", function=True)
    failures.add_argument("--all", action="store_true", help="also the failures of functions' older code")
    failures.add_argument("--older-than", metavar="AGE", help="only records older than AGE: 3600s, 90m, 12h, 30d")
    chosen = "remove the records chosen (by --function, --older-than)"
    failures.add_argument("--clear", action="store_true", help=chosen)
    prune = command("prune", _cli_prune, "remove expired and damaged entries and temporary files left by crashes")
    prune.add_argument("--stale", action="store_true", help="also remove entries of functions' older code (see info)")
    prune.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    prune.add_argument(
        "--max-bytes", metavar="SIZE", help="then evict the least recently used entries until the entries take at "
        "most SIZE on disk: bytes, or K, M, G, T for KiB, MiB, GiB, TiB (1000000, 500M, 2G)")
    prune.add_argument("--older-than", metavar="AGE", help="then evict the entries not used (read or written) within "
                       "AGE: 3600s, 90m, 12h, 30d")
    stages = "say whether stage directories are done, incomplete or missing"
    status = command("status", _cli_status, stages, store=False)
    status.add_argument("directories", nargs="+", metavar="DIR", help="stage directories")
    status.add_argument("--marker", default="DONE", help="the marker's file name (default: DONE)")
    status.add_argument("--version", help="count a stage as done only if its marker records this version")

    args = parser.parse_args(argv)
    try:
        code, report, lines = args.run(args)
        if args.json:
            import json

            lines = [json.dumps(report, indent=1)]
        print(*lines, sep="\n")
        return int(code)
    except BrokenPipeError:
        # The reader went away (`donecache info | head -1`): stop quietly, stdout on /dev/null so that the
        # interpreter's final flush does not report the pipe again (Python docs, "Note on SIGPIPE" in signal).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    except _NoMatch as exc:
        print(exc, file=sys.stderr)
        return 1
    except (_UsageError, OSError, ValueError) as exc:
        message = str(exc)
        if isinstance(exc, OSError) and exc.strerror:  # Not str(): it appends the file name again.
            where = os.fsdecode(exc.filename) if exc.filename is not None else ""
            message = exc.strerror if where in exc.strerror else f"{where}: {exc.strerror}"
        print(f"{prog} {args.command}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
