# SPDX-License-Identifier: MIT
"""Tests for donecache: one section per tool, real processes for crashes and races.

The module is imported once, under one name. Set DONECACHE_MODULE (for example
to ``myproject._vendor.donecache``) to run this same suite against a vendored copy.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import itertools
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

MODULE = os.environ.get("DONECACHE_MODULE", "donecache")
dc = importlib.import_module(MODULE)
# The directory to put on sys.path so that children import the same copy.
IMPORT_ROOT = Path(dc.__file__).resolve().parents[MODULE.count(".")]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="uses POSIX signals, permissions or rlimits")


# ---------------------------------------------------------------------------
# The one helper that runs a child Python script.
# ---------------------------------------------------------------------------


def child(
    script: str,
    *args: str,
    background: bool = False,
    unprivileged: bool = False,
    check: bool = True,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    script_file: Path | None = None,
) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
    """Run ``script`` in a fresh interpreter where ``dc`` is donecache; args go to sys.argv[1:].

    background: return the Popen at once (stdout is a pipe) instead of waiting.
    unprivileged: make file permissions apply to the child even when the tests
        run as root, by dropping the capabilities that let root ignore them
        (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) with setpriv(1).
    script_file: save the script there and run the file instead of ``-c``
        (multiprocessing's spawn start method re-imports the main script).
    """
    prelude = f"import importlib, sys\ndc = importlib.import_module({MODULE!r})\n"
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(IMPORT_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    argv = [sys.executable, "-c", prelude + textwrap.dedent(script), *args]
    if script_file is not None:
        script_file.write_text(prelude + textwrap.dedent(script))
        argv[1:3] = [str(script_file)]
    if unprivileged and IS_ROOT:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv(1): cannot make permissions apply")
        argv = [setpriv, "--bounding-set=-dac_override,-dac_read_search", *argv]
    if background:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=cwd, env=full_env)
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def in_threads(work: Callable[[int], object], count: int) -> None:
    """Run work(0) ... work(count - 1) in threads at once; re-raise the first error."""
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            work(n)
        except BaseException as exc:  # Reported in the test's own thread.
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def release_together(procs: list[subprocess.Popen[str]], go: Path) -> None:
    """Wait until every child has said 'ready' (and waits for ``go``), then let them all go."""
    for proc in procs:
        wait_for_line(proc, "ready")
    go.touch()


def wait_for_line(proc: subprocess.Popen[str], expected: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line == expected, f"child said {line!r}, expected {expected!r}"


@pytest.fixture
def read_only(tmp_path):
    """Make directories read-only for the test, and writable again afterwards so pytest can clean up."""
    made: list[Path] = []

    def make(path: Path) -> Path:
        os.chmod(path, 0o555)
        made.append(path)
        return path

    yield make
    for path in made:
        os.chmod(path, 0o755)


def listing(path: Path) -> list[str]:
    return sorted(os.listdir(path))


as_str_or_path = pytest.mark.parametrize("kind", [str, Path], ids=["str", "Path"])
text_or_bytes = pytest.mark.parametrize(
    "mode,content", [("w", "héllo\nwörld\n"), ("wb", b"\x00\xffbinary\n")], ids=["text", "bytes"]
)


# ---------------------------------------------------------------------------
# 4. Atomic writes
# ---------------------------------------------------------------------------


@as_str_or_path
@text_or_bytes
@pytest.mark.parametrize("durable", [True, False])
def test_atomic_write_creates_file(tmp_path, kind, mode, content, durable):
    target = tmp_path / "out.txt"
    with dc.atomic_write(kind(target), mode, durable=durable, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
        f.write(content)
        assert not target.exists(), "the target must not appear before the block ends"
    got = target.read_bytes() if mode == "wb" else target.read_text(encoding="utf-8")
    assert got == content
    assert listing(tmp_path) == ["out.txt"]


@as_str_or_path
@text_or_bytes
def test_atomic_write_replaces_and_keeps_permission_bits(tmp_path, kind, mode, content):
    target = tmp_path / "out"
    target.write_text("old")
    os.chmod(target, 0o640)
    with dc.atomic_write(kind(target), mode) as f:
        f.write(content)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert listing(tmp_path) == ["out"]


@posix_only
@pytest.mark.parametrize("umask,expected", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664), (0o077, 0o600)])
def test_new_file_mode_follows_umask_without_changing_it(tmp_path, umask, expected):
    proc = child(
        """
        import os, stat
        os.umask(int(sys.argv[2], 8))
        with dc.atomic_write(sys.argv[1]) as f:
            f.write("x")
        print(oct(stat.S_IMODE(os.stat(sys.argv[1]).st_mode)), oct(os.umask(0)))
        """,
        str(tmp_path / "new"),
        oct(umask),
    )
    assert proc.stdout.split() == [oct(expected), oct(umask)]


class Boom(Exception):
    pass


@text_or_bytes
@pytest.mark.parametrize("error", [Boom("boom"), KeyboardInterrupt(), SystemExit(3)], ids=["error", "ctrl-c", "exit"])
@pytest.mark.parametrize("existing", [True, False], ids=["existing", "new"])
def test_failure_leaves_target_untouched_and_no_litter(tmp_path, mode, content, error, existing):
    target = tmp_path / "out"
    if existing:
        target.write_bytes(b"old version")
    with pytest.raises(type(error)) as caught:
        with dc.atomic_write(target, mode) as f:
            f.write(content)
            f.flush()
            raise error
    assert caught.value is error, "the original exception must propagate unchanged"
    assert listing(tmp_path) == (["out"] if existing else [])
    if existing:
        assert target.read_bytes() == b"old version"


def test_cleanup_failure_never_masks_the_error(tmp_path, monkeypatch):
    target = tmp_path / "out"

    def broken_unlink(*args, **kwargs):
        raise PermissionError("cannot unlink")

    with pytest.raises(Boom):
        with dc.atomic_write(target) as f:
            f.write("x")
            monkeypatch.setattr(os, "unlink", broken_unlink)
            raise Boom()


@as_str_or_path
def test_overwrite_false_refuses_existing_target(tmp_path, kind):
    target = tmp_path / "out"
    target.write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True") as caught:
        with dc.atomic_write(kind(target), overwrite=False) as f:
            f.write("theirs")
    assert str(target) in str(caught.value)
    assert target.read_text() == "mine"
    assert listing(tmp_path) == ["out"]


@pytest.mark.parametrize("tool", ["atomic_write", "atomic_path"])
def test_overwrite_false_never_clobbers_a_file_that_appears_meanwhile(tmp_path, tool):
    target = tmp_path / "out"
    with pytest.raises(FileExistsError):
        if tool == "atomic_write":
            with dc.atomic_write(target, overwrite=False) as f:
                f.write("late")
                target.write_text("first")  # Someone else wins the race.
        else:
            with dc.atomic_path(target, overwrite=False) as tmp:
                tmp.write_text("late")
                target.write_text("first")
    assert target.read_text() == "first"
    assert listing(tmp_path) == ["out"]


def test_missing_parent_is_an_error_unless_asked(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    with pytest.raises(FileNotFoundError, match="make_parents=True") as caught:
        with dc.atomic_write(target) as f:
            f.write("x")
    assert str(target) in str(caught.value)
    assert listing(tmp_path) == []
    with dc.atomic_write(target, make_parents=True) as f:
        f.write("x")
    assert target.read_text() == "x"


def test_parent_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("keep")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        with dc.atomic_write(tmp_path / "file" / "out", make_parents=True) as f:
            f.write("x")
    assert (tmp_path / "file").read_text() == "keep"


@pytest.mark.parametrize("tool", ["atomic_write", "atomic_path"])
def test_target_is_a_directory(tmp_path, tool):
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory") as caught:
        with (dc.atomic_write(tmp_path / "d") if tool == "atomic_write" else dc.atomic_path(tmp_path / "d")):
            pass
    assert str(tmp_path / "d") in str(caught.value)
    assert listing(tmp_path) == ["d"] and listing(tmp_path / "d") == []


@pytest.mark.parametrize("mode", ["r", "a", "r+", "w+", "x", "ab", "rb"])
def test_unsupported_modes_are_refused(tmp_path, mode):
    with pytest.raises(ValueError, match="'w', 'wt', 'wb'"):
        with dc.atomic_write(tmp_path / "out", mode):
            pass
    assert listing(tmp_path) == []


def test_encoding_in_binary_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="text mode"):
        with dc.atomic_write(tmp_path / "out", "wb", encoding="utf-8"):
            pass
    assert listing(tmp_path) == []


@posix_only
def test_symlink_is_written_through(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("old")
    os.chmod(real, 0o600)
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    with dc.atomic_write(link) as f:
        f.write("new")
    assert link.is_symlink() and real.read_text() == "new"
    assert stat.S_IMODE(real.stat().st_mode) == 0o600
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "made-by-write")
    with dc.atomic_write(dangling) as f:
        f.write("created")
    assert (tmp_path / "made-by-write").read_text() == "created"
    assert listing(tmp_path) == ["dangling", "link.txt", "made-by-write", "real.txt"]


@posix_only
@pytest.mark.parametrize("durable", [True, False])
def test_fsync_only_when_durable(tmp_path, monkeypatch, durable):
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real_fsync(fd)))
    with dc.atomic_write(tmp_path / "out", durable=durable) as f:
        f.write("x")
    assert calls == ([False, True] if durable else []), "file first, then its directory"


@posix_only
@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP])
def test_directory_fsync_refusal_is_tolerated(tmp_path, monkeypatch, code):
    real_fsync = os.fsync

    def picky_fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))  # What CIFS or a VirtualBox share says.
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", picky_fsync)
    with dc.atomic_write(tmp_path / "out") as f:
        f.write("x")
    assert (tmp_path / "out").read_text() == "x"


@posix_only
def test_file_fsync_failure_is_raised_and_cleaned_up(tmp_path, monkeypatch):
    def failing_fsync(fd):
        raise OSError(errno.EIO, "I/O error")

    (tmp_path / "out").write_text("old")
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="I/O error"):
        with dc.atomic_write(tmp_path / "out") as f:
            f.write("new")
    assert (tmp_path / "out").read_text() == "old"
    assert listing(tmp_path) == ["out"]


@posix_only
@pytest.mark.parametrize("mode", ["w", "wb"])
@pytest.mark.parametrize("tool", ["atomic_write", "atomic_path"])
def test_full_disk_keeps_original_and_leaves_no_litter(tmp_path, mode, tool):
    target = tmp_path / "data.bin"
    target.write_bytes(b"precious original")
    proc = child(
        """
        import errno, resource
        # A file-size limit makes writes past 64 KiB fail with EFBIG: a full disk in miniature.
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        target, mode, tool = sys.argv[1:]
        chunk = "x" * 8192 if mode == "w" else b"x" * 8192
        try:
            if tool == "atomic_write":
                with dc.atomic_write(target, mode) as f:
                    for _ in range(128):
                        f.write(chunk)
            else:
                with dc.atomic_path(target) as tmp:
                    with open(tmp, mode) as f:
                        for _ in range(128):
                            f.write(chunk)
        except OSError as exc:
            print(errno.errorcode[exc.errno])
        else:
            print("no error")
        """,
        str(target),
        mode,
        tool,
    )
    assert proc.stdout.strip() == "EFBIG"
    assert target.read_bytes() == b"precious original"
    assert listing(tmp_path) == ["data.bin"]


@posix_only
def test_read_only_directory_gives_a_clear_error(tmp_path, read_only):
    target = tmp_path / "out.txt"
    target.write_text("keep")
    read_only(tmp_path)
    proc = child(
        """
        try:
            with dc.atomic_write(sys.argv[1]) as f:
                f.write("new")
        except PermissionError as exc:
            print(exc)
        """,
        str(target),
        unprivileged=True,
    )
    message = proc.stdout.strip()
    assert str(target) in message and "writable" in message
    assert target.read_text() == "keep"
    assert listing(tmp_path) == ["out.txt"]


SELF_CHECKING_WRITER = """
    import hashlib, os, random, struct
    target, durable = sys.argv[1], sys.argv[2] == "1"
    rng = random.Random(os.getpid())
    version = 0
    while True:
        version += 1
        body = os.urandom(rng.randrange(1, 300_000))
        with dc.atomic_write(target, "wb", durable=durable) as f:
            f.write(struct.pack("<Q", len(body)))
            for i in range(0, len(body), 4096):   # Many writes: a wide window to be killed in.
                f.write(body[i:i + 4096])
            f.write(hashlib.sha256(body).digest())
        if version == 1:
            print("ready", flush=True)
"""


def assert_complete(data: bytes) -> None:
    import hashlib
    import struct

    (length,) = struct.unpack("<Q", data[:8])
    assert len(data) == 8 + length + 32, f"torn file: {len(data)} bytes, header says {8 + length + 32}"
    assert hashlib.sha256(data[8 : 8 + length]).digest() == data[8 + length :], "torn file: checksum mismatch"


@posix_only
def test_sigkill_never_leaves_a_torn_file(tmp_path):
    target = tmp_path / "state.bin"
    rng = random.Random(1234)
    for trial in range(24):
        proc = child(SELF_CHECKING_WRITER, str(target), str(trial % 2), background=True)
        wait_for_line(proc, "ready")
        time.sleep(rng.uniform(0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert_complete(target.read_bytes())
        # A kill can leave a temporary file, but only one that prune recognises.
        assert all(name == "state.bin" or dc._is_temp_name(name) for name in os.listdir(tmp_path))


def test_threads_writing_one_file(tmp_path):
    target = tmp_path / "shared"

    def writer(n: int) -> None:
        for i in range(40):
            with dc.atomic_write(target, durable=False) as f:
                f.write(f"{n}:{i}:" + "y" * 5000)
            assert target.read_text().endswith("y" * 5000)

    in_threads(writer, 8)
    assert listing(tmp_path) == ["shared"]


@as_str_or_path
def test_atomic_path_for_libraries_that_write_themselves(tmp_path, kind):
    target = tmp_path / "table.csv.gz"
    with dc.atomic_path(kind(target)) as tmp:
        assert isinstance(tmp, Path) and not tmp.exists()
        assert tmp.parent == tmp_path and tmp.name.endswith("table.csv.gz"), "the suffix picks a format"
        tmp.write_bytes(b"library output")
        assert not target.exists()
    assert target.read_bytes() == b"library output"
    assert listing(tmp_path) == ["table.csv.gz"]


def test_atomic_path_failure_and_missing_output(tmp_path):
    target = tmp_path / "x.npy"
    target.write_bytes(b"old")
    os.chmod(target, 0o604)
    with pytest.raises(Boom):
        with dc.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise Boom()
    assert target.read_bytes() == b"old" and listing(tmp_path) == ["x.npy"]
    with pytest.raises(FileNotFoundError, match="did not create"):
        with dc.atomic_path(target):
            pass
    with dc.atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and listing(tmp_path) == ["x.npy"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o604


# ---------------------------------------------------------------------------
# 5. Stage directories
# ---------------------------------------------------------------------------


@as_str_or_path
def test_stage_success_writes_marker_with_metadata(tmp_path, kind):
    stage_dir = tmp_path / "a" / "b" / "stage"
    with dc.done_dir(kind(stage_dir), version="v1") as stage:
        assert stage.done is False and stage.path == stage_dir
        assert not dc.is_done(kind(stage_dir))
        stage.piece("one.txt", lambda: "1")
        stage.piece("sub/two.bin", lambda: b"2")
    assert dc.is_done(kind(stage_dir)) and dc.is_done(stage_dir, version="v1")
    meta = json.loads((stage_dir / "DONE").read_text())
    assert meta["version"] == "v1" and meta["pid"] == os.getpid() and meta["donecache"] == dc.__version__
    assert {"started", "finished", "duration_s", "host"} <= set(meta)
    assert (stage_dir / "one.txt").read_text() == "1" and (stage_dir / "sub" / "two.bin").read_bytes() == b"2"


def test_stage_failure_keeps_pieces_and_rerun_resumes(tmp_path):
    made: list[int] = []

    def build(fail_at: int | None) -> None:
        with dc.done_dir(tmp_path / "s") as stage:
            for i in range(10):
                if i == fail_at:
                    raise Boom(f"bad record {i}")
                stage.piece(f"{i}.txt", lambda: (made.append(i), str(i))[1])

    with pytest.raises(Boom):
        build(fail_at=6)
    assert not dc.is_done(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").glob("*.txt")) == [f"{i}.txt" for i in range(6)]
    build(fail_at=None)
    assert dc.is_done(tmp_path / "s")
    assert made == list(range(10)), "the rerun made only the pieces the first run had not"


@posix_only
def test_durable_stage_flushes_every_piece_and_directory_before_its_marker(tmp_path, monkeypatch):
    flushed: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        flushed.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else str(fd))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with dc.done_dir(tmp_path / "s") as stage:
        assert flushed == [str(tmp_path)], "the new stage directory is flushed into its parent"
        stage.piece("a.txt", lambda: "a")
        stage.piece("sub/b.txt", lambda: "b")
        assert flushed == [str(tmp_path)], "pieces are not flushed one by one"
    if not os.path.exists("/proc/self/fd"):
        pytest.skip("no /proc to name the flushed descriptors")
    marker = [i for i, path in enumerate(flushed) if path.endswith("~DONE")]  # The marker's temporary file.
    assert marker, f"the marker was flushed too: {flushed}"
    before = set(flushed[: marker[0]])
    expected = {str(tmp_path / "s" / "a.txt"), str(tmp_path / "s" / "sub" / "b.txt"), str(tmp_path / "s"), str(tmp_path / "s" / "sub")}
    assert expected <= before, f"flushed before the marker: {sorted(before)}"


def test_finished_stage_is_skipped_and_marker_kept(tmp_path):
    with dc.done_dir(tmp_path / "s", version=3) as stage:
        stage.piece("x", lambda: "x")
    first = (tmp_path / "s" / "DONE").read_bytes()
    with dc.done_dir(tmp_path / "s", version=3) as stage:
        assert stage.done
    assert (tmp_path / "s" / "DONE").read_bytes() == first


def test_version_change_means_not_done(tmp_path):
    with dc.done_dir(tmp_path / "s", version=1):
        pass
    assert dc.is_done(tmp_path / "s", version=1)
    assert not dc.is_done(tmp_path / "s", version=2)
    with pytest.raises(Boom):
        with dc.done_dir(tmp_path / "s", version=2) as stage:
            assert not stage.done
            assert not (tmp_path / "s" / "DONE").exists(), "a stale marker must not count during a rebuild"
            raise Boom()
    assert not dc.is_done(tmp_path / "s"), "the failed rebuild left no marker behind"
    with dc.done_dir(tmp_path / "s", version=2):
        pass
    assert json.loads((tmp_path / "s" / "DONE").read_text())["version"] == 2


def test_mark_not_done_and_fresh(tmp_path):
    with dc.done_dir(tmp_path / "s") as stage:
        stage.piece("old", lambda: "old")
        (stage.path / "dir").mkdir()
    assert dc.mark_not_done(tmp_path / "s") is True
    assert dc.mark_not_done(tmp_path / "s") is False
    assert not dc.is_done(tmp_path / "s") and (tmp_path / "s" / "old").exists()
    with dc.done_dir(tmp_path / "s", fresh=True) as stage:
        assert [p.name for p in stage.path.iterdir() if p.name != ".donecache.lock"] == []
        stage.piece("new", lambda: "new")
    assert dc.is_done(tmp_path / "s") and not (tmp_path / "s" / "old").exists()


@pytest.mark.parametrize("marker", ["_SUCCESS", "DONE.json"])
def test_custom_marker_name(tmp_path, marker):
    with dc.done_dir(tmp_path / "s", marker=marker):
        pass
    assert (tmp_path / "s" / marker).is_file() and not (tmp_path / "s" / "DONE").exists()
    assert dc.is_done(tmp_path / "s", marker=marker) and not dc.is_done(tmp_path / "s")


@pytest.mark.parametrize("marker", ["", "a/b", "..", ".donecache.lock"])
def test_bad_marker_names(tmp_path, marker):
    with pytest.raises(ValueError, match="marker must be a plain file name"):
        dc.is_done(tmp_path, marker=marker)


@pytest.mark.parametrize("content", [b"", b"not json", b"[1, 2]", b"\xff\xfe"], ids=["empty", "text", "list", "binary"])
def test_foreign_or_empty_marker(tmp_path, content):
    (tmp_path / "_SUCCESS").write_bytes(content)  # As Hadoop or a hand-written `touch` leaves it.
    assert dc.is_done(tmp_path, marker="_SUCCESS")
    assert not dc.is_done(tmp_path, marker="_SUCCESS", version=1)
    with dc.done_dir(tmp_path, marker="_SUCCESS") as stage:
        assert stage.done


def test_stage_path_is_a_file(tmp_path):
    (tmp_path / "s").write_text("user data")
    with pytest.raises(NotADirectoryError, match="is a file") as caught:
        with dc.done_dir(tmp_path / "s"):
            pass
    assert str(tmp_path / "s") in str(caught.value)
    assert (tmp_path / "s").read_text() == "user data"


@posix_only
def test_stage_parent_not_writable(tmp_path, read_only):
    read_only(tmp_path)
    proc = child(
        """
        try:
            with dc.done_dir(sys.argv[1]):
                print("ran the body")
        except PermissionError as exc:
            print(exc)
        """,
        str(tmp_path / "stage"),
        unprivileged=True,
    )
    assert str(tmp_path / "stage") in proc.stdout and "permission" in proc.stdout.lower()
    assert listing(tmp_path) == []


@pytest.mark.parametrize("name", ["../escape", "/abs/path", "DONE", ".donecache.lock", ""])
def test_bad_piece_names(tmp_path, name):
    with dc.done_dir(tmp_path / "s") as stage:
        with pytest.raises(ValueError, match="relative path inside the stage"):
            stage.piece(name, lambda: "x")


def test_piece_must_be_str_or_bytes(tmp_path):
    with pytest.raises(TypeError, match="must return str or bytes"):
        with dc.done_dir(tmp_path / "s") as stage:
            stage.piece("x", lambda: 42)  # type: ignore[arg-type,return-value]
    assert not dc.is_done(tmp_path / "s") and not (tmp_path / "s" / "x").exists()


def test_litter_from_a_crash_is_removed_on_entry(tmp_path):
    (tmp_path / "s").mkdir()
    litter = tmp_path / "s" / (dc._TEMP_PREFIX + "0" * 16 + "~piece.json")
    litter.write_text("half a piece")
    with dc.done_dir(tmp_path / "s"):
        assert not litter.exists()


STAGE_BUILDER = """
    import os, time
    stage_dir, log, go = sys.argv[1:4]
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    with dc.done_dir(stage_dir) as stage:
        if not stage.done:
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\\n")
            time.sleep(0.3)
            stage.piece("result", lambda: "ok")
    print("done" if dc.is_done(stage_dir) else "not done")
"""


@posix_only
def test_two_processes_build_a_stage_once(tmp_path):
    log, go = tmp_path / "log", tmp_path / "go"
    procs = [child(STAGE_BUILDER, str(tmp_path / "s"), str(log), str(go), background=True) for _ in range(4)]
    release_together(procs, go)
    outputs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert outputs == ["done"] * 4
    assert len(log.read_text().split()) == 1, "exactly one process ran the body"


def test_two_threads_build_a_stage_once(tmp_path):
    runs: list[int] = []

    def build(n: int) -> None:
        with dc.done_dir(tmp_path / "s") as stage:
            if not stage.done:
                runs.append(n)
                time.sleep(0.2)

    in_threads(build, 4)
    assert len(runs) == 1


def test_nested_stage_in_one_thread_is_an_error_not_a_hang(tmp_path):
    outcome: list[str] = []

    def nest() -> None:
        with dc.done_dir(tmp_path / "s"):
            try:
                with dc.done_dir(tmp_path / "s"):
                    outcome.append("entered twice")
            except RuntimeError as exc:
                outcome.append(str(exc))

    worker = threading.Thread(target=nest, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "re-entering a stage in one thread deadlocked"
    assert len(outcome) == 1 and "already holds the lock" in outcome[0]


@posix_only
def test_sigkill_in_the_body_leaves_stage_not_done_and_lock_free(tmp_path):
    stage_dir = tmp_path / "s"
    for trial in range(5):
        proc = child(
            """
            import time
            with dc.done_dir(sys.argv[1]) as stage:
                stage.piece(f"piece-{sys.argv[2]}", lambda: "x")
                print("inside", flush=True)
                time.sleep(60)
            """,
            str(stage_dir),
            str(trial),
            background=True,
        )
        wait_for_line(proc, "inside")
        with pytest.raises(TimeoutError, match="timed out"):
            with dc.done_dir(stage_dir, timeout=0.2):
                pass
        proc.kill()
        proc.wait()
        assert not dc.is_done(stage_dir)
        assert (stage_dir / f"piece-{trial}").read_text() == "x"
    started = time.monotonic()
    with dc.done_dir(stage_dir, timeout=5) as stage:
        assert not stage.done and len(list(stage.path.glob("piece-*"))) == 5
    assert time.monotonic() - started < 2, "the killed holders' locks were released"
    assert dc.is_done(stage_dir)


# ---------------------------------------------------------------------------
# 6. The store (donecache.open) and memoize
# ---------------------------------------------------------------------------


def entry_files(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("??/*") if not p.name.startswith("."))


@as_str_or_path
def test_open_is_a_shelf_drop_in(tmp_path, kind):
    import shelve

    with dc.open(kind(tmp_path / "cache")) as db:
        assert isinstance(db, shelve.Shelf) and isinstance(db, dc.Store)
        db["text"] = "héllo"
        db["none"] = None
        db["nested"] = {"a": [1, 2], "b": {3}}
        del db["text"]
        assert "text" not in db and "none" in db and db["none"] is None
        assert db.get("missing", 42) == 42
        assert sorted(db) == ["nested", "none"] and len(db) == 2
        assert dict(db.items()) == {"none": None, "nested": {"a": [1, 2], "b": {3}}}
        with pytest.raises(KeyError):
            db["missing"]
        with pytest.raises(KeyError):
            del db["missing"]
    with pytest.raises(ValueError):  # shelve's behaviour after close
        db["x"] = 1
    with dc.open(tmp_path / "cache", "r") as db:
        assert db["nested"] == {"a": [1, 2], "b": {3}}
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700
    assert (tmp_path / "cache" / "CACHEDIR.TAG").read_bytes().startswith(b"Signature: 8a477f597d28d172789f06886806bc55")


def test_writeback_and_sync_behave_as_in_shelve(tmp_path):
    with dc.open(tmp_path / "c", writeback=True) as db:
        db["list"] = []
        db["list"].append(1)  # Only writeback=True keeps this mutation.
        db.sync()
        db["list"].append(2)
    with dc.open(tmp_path / "c") as db:
        assert db["list"] == [1, 2]
        db["list"].append(3)  # Lost without writeback, as in shelve.
        assert db["list"] == [1, 2]


def test_open_flags(tmp_path):
    with pytest.raises(FileNotFoundError, match="flag='c'") as caught:
        dc.open(tmp_path / "nope", "r")
    assert str(tmp_path / "nope") in str(caught.value)
    with pytest.raises(FileNotFoundError):
        dc.open(tmp_path / "nope", "w")
    assert not (tmp_path / "nope").exists()
    with dc.open(tmp_path / "c") as db:
        db["k"] = 1
    with dc.open(tmp_path / "c", "r") as db:
        with pytest.raises(PermissionError, match="flag='r'"):
            db["k"] = 2
        assert db["k"] == 1
    with dc.open(tmp_path / "c", "n") as db:
        assert len(db) == 0
    with pytest.raises(ValueError, match="flag must be"):
        dc.open(tmp_path / "c", "x")
    (tmp_path / "file").write_text("data")
    with pytest.raises(NotADirectoryError, match="is a file"):
        dc.open(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "data"


def test_unpicklable_value_raises_and_leaves_nothing(tmp_path):
    with dc.open(tmp_path / "c") as db:
        import pickle

        # The wording differs between Pythons (3.13: "Can't get local object"); the type does not.
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
            db["f"] = lambda: 1
        assert "f" not in db and len(db) == 0
    assert not [p for p in (tmp_path / "c").rglob("*") if dc._is_temp_name(p.name)]


DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:-3]),
    "bit flip": lambda p: p.write_bytes(p.read_bytes()[:-1] + bytes([p.read_bytes()[-1] ^ 1])),
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(os.urandom(200)),
    "padded": lambda p: p.write_bytes(p.read_bytes() + b"\0"),
    "other entry": None,  # Filled in below: a valid entry of another key under this name.
    "directory": lambda p: (p.unlink(), p.mkdir()),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_entry_reads_as_missing_and_is_pruned(tmp_path, damage):
    with dc.open(tmp_path / "c") as db:
        db["victim"] = list(range(100))
        db["other"] = "fine"
    victim = next(p for p in entry_files(tmp_path / "c") if b"victim" in p.read_bytes())
    other = next(p for p in entry_files(tmp_path / "c") if p != victim)
    if damage == "other entry":
        shutil.copy(other, victim)
    else:
        DAMAGE[damage](victim)
    with dc.open(tmp_path / "c") as db:
        assert "victim" not in db and db.get("victim") is None
        assert sorted(db) == ["other"] and dict(db.items()) == {"other": "fine"}
        db["victim"] = "rewritten"  # Over the damage: nothing to clean up first.
        assert db["victim"] == "rewritten"
    DAMAGE["directory" if damage == "directory" else "garbage"](victim)
    with dc.open(tmp_path / "c") as db:
        assert db.prune() == 1 and sorted(db) == ["other"] and not victim.exists()


@posix_only
def test_processes_writing_one_store_lose_nothing(tmp_path):
    writer = """
        who = int(sys.argv[2])
        with dc.open(sys.argv[1]) as db:
            for i in range(200):
                db[f"{who}-{i}"] = (who, i)
                db["shared"] = who            # All four fight over one key too.
    """
    procs = [child(writer, str(tmp_path / "c"), str(n), background=True) for n in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    with dc.open(tmp_path / "c") as db:
        assert len(db) == 801
        assert all(db[f"{w}-{i}"] == (w, i) for w in range(4) for i in range(200))
        assert db["shared"] in range(4)


@posix_only
def test_sigkill_never_corrupts_or_loses_committed_entries(tmp_path):
    writer = """
        import os
        start = int(sys.argv[2])
        with dc.open(sys.argv[1]) as db:
            for i in range(start, start + 100000):
                db[f"k{i}"] = os.urandom(i % 5000)  # Varied sizes; some rewrite "k0".
                db["k0"] = i
                print(i, flush=True)                 # Reported only once the write returned.
    """
    rng = random.Random(99)
    committed: list[int] = []
    for trial in range(20):
        proc = child(writer, str(tmp_path / "c"), str(trial * 1000), background=True)
        assert proc.stdout is not None
        proc.stdout.readline()
        time.sleep(rng.uniform(0, 0.1))
        proc.kill()
        out, _ = proc.communicate()
        committed.extend(int(line) for line in out.split()[:-1])  # The last line may be cut.
    with dc.open(tmp_path / "c") as db:
        for i in committed:
            value = db[f"k{i}"]
            assert isinstance(value, bytes) and len(value) == i % 5000
        assert isinstance(db["k0"], int)
        for path in entry_files(tmp_path / "c"):  # Every file on disk is a whole entry.
            assert dc._decode_entry(path.read_bytes()) is not None
    assert len(committed) > 100


def test_threads_share_a_store(tmp_path):
    db = dc.open(tmp_path / "c")

    def work(n: int) -> None:
        for i in range(100):
            db[f"{n}/{i}"] = [n, i]
            assert db[f"{n}/{i}"] == [n, i]

    in_threads(work, 8)
    assert len(db) == 800
    db.close()


@posix_only
def test_read_only_store_serves_hits_and_explains_writes(tmp_path, read_only):
    script = """
        import warnings
        @dc.memoize(sys.argv[1])
        def square(x):
            print("computed", x)
            return x * x
        print(square(3))
    """
    child(script, str(tmp_path / "c"))  # Fills the cache with square(3).
    for path in [tmp_path / "c", *(tmp_path / "c").glob("??")]:
        read_only(path)
    proc = child(
        script
        + """
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            print(square(4))
        print("WARNING", caught[0].category.__name__, caught[0].message)
        with dc.open(sys.argv[1]) as db:
            try:
                db["x"] = 1
            except PermissionError as exc:
                print("ERROR", exc)
        """,
        str(tmp_path / "c"),
        unprivileged=True,
    )
    lines = proc.stdout.splitlines()
    assert lines[0] == "9", "a hit, served from the read-only cache"
    assert lines[1:3] == ["computed 4", "16"]
    assert lines[3].startswith("WARNING DonecacheWarning") and "not cached" in lines[3]
    assert lines[4].startswith("ERROR") and str(tmp_path / "c") in lines[4] and "writable" in lines[4]


# -- memoize ------------------------------------------------------------------


@pytest.fixture
def calls():
    return []


def test_memoize_bare_uses_dot_donecache_or_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DONECACHE_DIR", raising=False)

    @dc.memoize
    def double(x):
        return 2 * x

    assert double(2) == 4 and double(2) == 4
    assert double.cache_info() == (1, 1, None, 1)
    assert (tmp_path / ".donecache" / ".gitignore").exists()
    monkeypatch.setenv("DONECACHE_DIR", str(tmp_path / "elsewhere"))

    @dc.memoize()
    def triple(x):
        return 3 * x

    assert triple(1) == 3 and entry_files(tmp_path / "elsewhere")


@as_str_or_path
def test_arguments_are_bound_to_the_signature(tmp_path, kind, calls):
    @dc.memoize(kind(tmp_path))
    def f(x, y=2, *, z=3):
        calls.append((x, y, z))
        return x + y + z

    assert f(1) == f(x=1) == f(1, 2) == f(1, y=2, z=3) == f(z=3, y=2, x=1) == 6
    assert calls == [(1, 2, 3)]
    assert f(1, 3) == 7 and len(calls) == 2
    with pytest.raises(TypeError):
        f(1, 2, 3)  # Errors of the call itself are the function's own.


def test_keys_are_canonical_and_typed(tmp_path, calls):
    @dc.memoize(tmp_path)
    def f(*args, **kwargs):
        calls.append(1)
        return len(calls)

    assert f({"a": 1, "b": 2}) == f({"b": 2, "a": 1}) == 1
    assert f({3, 1, 2}) == f({1, 2, 3}) == 2
    assert f(a=1, b=2) == f(b=2, a=1) == 3
    assert len({f(1), f(1.0), f(True), f("1")}) == 4, "1, 1.0, True and '1' are different calls"
    assert f(Path("/x")) == f(Path("/x"))


def test_scalar_fast_path_keeps_types_apart(tmp_path, calls):
    """A plain def f(x) with scalar arguments takes the fast key path, which must not be lossy."""

    @dc.memoize(tmp_path)
    def f(x):
        calls.append(x)
        return repr(x)

    assert [f(1), f(1.0), f(True), f("1"), f(b"1"), f(None)] == ["1", "1.0", "True", "'1'", "b'1'", "None"]
    assert [f(1), f(1.0), f(True), f("1"), f(b"1"), f(None)] == ["1", "1.0", "True", "'1'", "b'1'", "None"]
    assert len(calls) == 6 and f.cache_info().currsize == 6
    assert f(-0.0) == "-0.0" and f(0.0) == "0.0", "0.0 and -0.0 compare equal but are different arguments"


def test_short_arguments_stay_in_the_key_and_long_ones_are_hashed(tmp_path, calls):
    @dc.memoize(tmp_path)
    def total(values):
        calls.append(len(values))
        return sum(values)

    assert total([1, 2]) == total([1, 2]) == 3
    assert total(list(range(100))) == total(list(range(100))) == 4950
    assert total(list(range(101))) == 5050
    assert calls == [2, 100, 101]
    with dc.open(tmp_path) as db:
        tails = sorted(key.split("|")[-1][:1] for key in db)
    assert tails == ["#", "#", "="], "two long argument texts were hashed, the short one kept"


def test_keys_agree_across_processes_and_hash_seeds(tmp_path):
    script = """
        @dc.memoize(sys.argv[1])
        def f(data):
            print("computed")
            return sorted(data["tags"])
        print(f({"tags": {"alpha", "beta", "gamma", "delta"}, "n": frozenset({"x", "y"})}))
    """
    outputs = [
        child(script, str(tmp_path), env={"PYTHONHASHSEED": seed}).stdout.split("\n")[0]
        for seed in ("1", "2", "3", "random")
    ]
    assert outputs[0] == "computed" and all(o.startswith("[") for o in outputs[1:])


def test_ignore_leaves_parameters_out_of_the_key(tmp_path, calls):
    @dc.memoize(tmp_path, ignore=("log",))
    def f(x, log):
        calls.append(x)
        return x

    f(1, log=print)
    f(1, log=lambda *a: None)  # Unpicklable, and ignored.
    assert calls == [1]
    with pytest.raises(ValueError, match="'logger'"):
        dc.memoize(tmp_path, ignore=["logger"])(lambda x: x)


def test_unpicklable_argument_names_the_argument(tmp_path):
    @dc.memoize(tmp_path)
    def f(x, callback):
        return x

    with pytest.raises(TypeError, match=r"argument 'callback' .* ignore=\('callback',\)"):
        f(1, lambda: None)


def test_results_none_exceptions_and_unpicklable(tmp_path, calls):
    @dc.memoize(tmp_path)
    def f(x):
        calls.append(x)
        if x == "boom":
            raise Boom(x)
        if x == "lock":
            return threading.Lock()
        return None

    assert f("none") is None and f("none") is None and calls == ["none"]
    for _ in range(2):
        with pytest.raises(Boom):
            f("boom")
    assert calls.count("boom") == 2, "exceptions are not cached"
    with pytest.warns(dc.DonecacheWarning, match="cannot be pickled") as caught:
        assert f("lock") is not None
    assert caught[0].filename == __file__, "the warning points at the caller's line, not into donecache"
    with pytest.warns(dc.DonecacheWarning):
        f("lock")
    assert calls.count("lock") == 2
    assert f.cache_info().currsize == 1


def test_code_changes_invalidate_but_comments_do_not(tmp_path):
    def define(source: str, version=None):
        namespace: dict[str, object] = {"calls": []}
        exec(compile(textwrap.dedent(source), "<pipeline>", "exec"), namespace)
        namespace["transform"].__module__ = "pipeline"  # type: ignore[attr-defined]
        return dc.memoize(tmp_path, version=version)(namespace["transform"]), namespace["calls"]

    original = """
        def transform(x):
            calls.append(x)
            return x + 1
    """
    reformatted = """


        def transform(x):
            # A comment and blank lines change nothing.

            calls.append(x)

            return x + 1  # trailing comment
    """
    changed = """
        def transform(x):
            calls.append(x)
            return x + 2
    """
    f, calls = define(original)
    assert f(1) == 2 and calls == [1]
    f, calls = define(reformatted)
    assert f(1) == 2 and calls == [], "reformatting must not invalidate"
    f, calls = define(changed)
    assert f(1) == 3 and calls == [1], "a change of logic must invalidate"
    f, calls = define(changed, version="2")
    assert f(1) == 3 and calls == [1], "a new version must invalidate"


def test_ttl_expires_entries(tmp_path, calls, monkeypatch):
    import datetime

    @dc.memoize(tmp_path, ttl=datetime.timedelta(seconds=60))
    def f(x):
        calls.append(x)
        return x

    f(1)
    f(1)
    assert calls == [1]
    later = time.time() + 61
    monkeypatch.setattr(time, "time", lambda: later)  # An hour later, without the wait.
    f(1)
    assert calls == [1, 1], "expired entries are recomputed"
    monkeypatch.undo()
    with dc.open(tmp_path) as db:
        assert len(db) == 1
        assert db.prune() == 0

    @dc.memoize(tmp_path, ttl=0.2)
    def g(x):
        calls.append(x)
        return x

    g(2)
    time.sleep(0.3)
    with dc.open(tmp_path) as db:
        assert db.prune() == 1, "prune removes what has expired"
    for bad in (0, -1, "1h", True):
        with pytest.raises(ValueError, match="ttl must be"):
            dc.memoize(tmp_path, ttl=bad)


def test_a_shorter_ttl_applies_to_older_entries(tmp_path, calls, monkeypatch):
    def transform(x):
        calls.append(x)
        return x

    dc.memoize(tmp_path, ttl=3600)(transform)(1)  # Stored to expire in an hour.
    later = time.time() + 120
    monkeypatch.setattr(time, "time", lambda: later)
    dc.memoize(tmp_path, ttl=3600)(transform)(1)
    assert calls == [1], "still fresh under the ttl it was written with"
    dc.memoize(tmp_path, ttl=60)(transform)(1)
    assert calls == [1, 1], "the decorator's shorter ttl counts from the entry's creation"


def test_wrapper_methods(tmp_path, calls):
    @dc.memoize(tmp_path)
    def f(x):
        calls.append(x)
        return x * 10

    @dc.memoize(tmp_path)
    def g(x):
        return -x

    f(1), f(2), g(1)
    assert f.forget(1) is True and f.forget(1) is False
    f(1)
    assert calls == [1, 2, 1]
    assert f.refresh(2) == 20 and calls == [1, 2, 1, 2]
    assert f.__wrapped__(3) == 30 and f.cache_info().currsize == 2, "__wrapped__ bypasses the cache"
    assert f.__name__ == "f" and f.__doc__ is None
    f.cache_clear()
    assert f.cache_info() == (0, 0, None, 0)
    assert g.cache_info().currsize == 1, "cache_clear() drops only its own function's entries"


# Module level, so that pickle can find it by name; created only on first call.
METHOD_CACHE = os.path.join(tempfile.gettempdir(), f"donecache-test-methods-{os.getpid()}")


class Model:
    def __init__(self, scale):
        self.scale = scale
        self.calls = 0

    @dc.memoize(METHOD_CACHE, ignore=("self",))
    def predict(self, x):
        self.calls += 1
        return x * 2


def test_methods_with_ignored_self():
    model = Model(1)
    assert model.predict(2) == 4 and model.predict(2) == 4
    assert Model(5).predict(2) == 4 and model.calls == 1
    Model.predict.cache_clear()
    shutil.rmtree(METHOD_CACHE, ignore_errors=True)


def test_recursive_memoized_function(tmp_path):
    @dc.memoize(tmp_path)
    def fib(n):
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    assert fib(60) == 1548008755920


def test_memoized_function_pickles_by_reference():
    import pickle

    assert pickle.loads(pickle.dumps(Model.predict)) is Model.predict


def test_async_functions(tmp_path, calls):
    import asyncio

    @dc.memoize(tmp_path)
    async def fetch(x):
        calls.append(x)
        await asyncio.sleep(0.05)
        return x * 2

    async def main():
        return await asyncio.gather(*(fetch(7) for _ in range(5)), fetch(8))

    assert asyncio.run(main()) == [14, 14, 14, 14, 14, 16]
    assert sorted(calls) == [7, 8], "concurrent coroutines computed each key once"
    assert asyncio.run(fetch.refresh(7)) == 14 and calls.count(7) == 2


def test_threads_compute_each_key_once(tmp_path, calls):
    @dc.memoize(tmp_path)
    def slow(x):
        calls.append(x)
        time.sleep(0.1)
        return x

    in_threads(lambda n: slow(n % 2), 8)
    assert sorted(calls) == [0, 1]


@posix_only
def test_processes_compute_each_key_once(tmp_path):
    script = """
        import os, time
        @dc.memoize(sys.argv[1])
        def slow(x):
            with open(sys.argv[2], "a") as log:
                log.write(f"{x}\\n")
            time.sleep(0.002)
            return x * x
        go = sys.argv[3]
        print("ready", flush=True)
        while not os.path.exists(go):
            time.sleep(0.001)
        assert all(slow(k) == k * k for k in range(150))
        assert all(slow(k) == k * k for k in reversed(range(150)))
    """
    log, go = tmp_path / "log", tmp_path / "go"
    procs = [child(script, str(tmp_path / "c"), str(log), str(go), background=True) for _ in range(4)]
    release_together(procs, go)
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    computed = log.read_text().split()
    assert sorted(map(int, computed)) == list(range(150)), "each key computed exactly once, none lost"
    with dc.open(tmp_path / "c") as db:
        assert len(db) == 150


@posix_only
def test_a_killed_holder_never_blocks_the_others(tmp_path):
    holder = child(
        """
        import time
        @dc.memoize(sys.argv[1])
        def stuck(x):
            print("computing", flush=True)
            time.sleep(60)
        stuck(1)
        """,
        str(tmp_path),
        background=True,
    )
    wait_for_line(holder, "computing")
    holder.kill()
    holder.wait()
    started = time.monotonic()
    proc = child(
        """
        @dc.memoize(sys.argv[1])
        def stuck(x):
            return "recovered"
        print(stuck(1))
        """,
        str(tmp_path),
    )
    assert proc.stdout.strip() == "recovered" and time.monotonic() - started < 10


@posix_only
@pytest.mark.parametrize("method", ["spawn", "fork", "forkserver"])
def test_process_pools_share_entries_with_the_parent(tmp_path, method):
    proc = child(
        """
        import multiprocessing, os
        from concurrent.futures import ProcessPoolExecutor

        @dc.memoize(os.environ["JOB_CACHE"])
        def square(x):
            return (x * x, os.getpid())

        if __name__ == "__main__":
            context = multiprocessing.get_context(sys.argv[1])
            with ProcessPoolExecutor(2, mp_context=context) as pool:
                results = list(pool.map(square, range(20)))
            assert all(pid != os.getpid() for _, pid in results), "computed in the workers"
            assert [square(x) for x in range(20)] == results, "and reused here"
            print(square.cache_info())
        """,
        method,
        env={"JOB_CACHE": str(tmp_path / "c")},
        script_file=tmp_path / "job.py",
    )
    assert proc.stdout.strip() == "CacheInfo(hits=20, misses=0, maxsize=None, currsize=20)"


# -- map: the keep-going batch helper ------------------------------------------


def bad_at(bad: set[int], calls: list[int]):
    def parse(x):
        calls.append(x)
        if x in bad:
            raise ValueError(f"bad record {x}")
        return x * 10

    return parse


@pytest.mark.parametrize("workers", [None, 3], ids=["serial", "threads"])
def test_map_keeps_going_and_a_rerun_computes_only_failures(tmp_path, calls, workers):
    parse = dc.memoize(tmp_path)(bad_at({3, 7}, calls))
    batch = parse.map(range(10), keep_going=True, workers=workers, processes=False)
    assert batch.results[:3] == [0, 10, 20] and batch.results[3] is batch.failures[0]
    assert batch.successes == [0, 10, 20, 40, 50, 60, 80, 90] and batch.done == 10
    assert [(f.index, f.input, str(f.exception)) for f in batch.failures] == [
        (3, 3, "bad record 3"),
        (7, 7, "bad record 7"),
    ]
    assert "ValueError: bad record 3" in batch.failures[0].traceback and "in parse" in batch.failures[0].traceback
    assert (batch.computed, batch.reused, batch.ok) == (8, 0, False)
    calls.clear()
    again = parse.map(range(12), keep_going=True, workers=workers, processes=False)
    assert sorted(calls) == [3, 7, 10, 11], "only the failures and the new inputs are computed"
    assert (again.computed, again.reused, len(again.failures)) == (2, 8, 2)
    assert repr(again) == "BatchResult(12 inputs: 8 reused, 2 computed, 2 failed)"


@pytest.mark.parametrize("workers", [None, 2], ids=["serial", "threads"])
def test_map_stops_at_the_first_failure_like_a_loop(tmp_path, calls, workers):
    parse = dc.memoize(tmp_path)(bad_at({4}, calls))
    with pytest.raises(ValueError, match="bad record 4"):
        parse.map(range(8), workers=workers, processes=False)
    calls.clear()
    assert parse.map(range(4)).reused == 4 and calls == [], "what finished before the failure stays cached"


def test_map_over_several_iterables_and_its_errors(tmp_path):
    @dc.memoize(tmp_path)
    def add(x, y):
        return x + y

    assert add.map([1, 2], [10, 20]).results == [11, 22]
    assert add.map([1], [2]).failures == [] and add.map([1], [2]).ok
    with pytest.raises(TypeError, match="at least one iterable"):
        add.map()

    @dc.memoize(tmp_path)
    async def fetch(x):
        return x

    with pytest.raises(TypeError, match="asyncio.gather"):
        fetch.map([1])


def test_map_progress_only_when_asked_or_on_a_terminal(tmp_path, capsys):
    parse = dc.memoize(tmp_path)(bad_at({1}, []))
    parse.map(range(3), keep_going=True)  # stderr is not a terminal under pytest: silent.
    assert capsys.readouterr().err == ""
    parse.map(range(3), keep_going=True, progress=True)
    err = capsys.readouterr().err
    assert "3/3 done" in err and "/s, ETA " in err and "1 failed" in err and err.endswith("\n")
    parse.map(range(3), keep_going=True, progress=False)
    assert capsys.readouterr().err == ""


@posix_only
@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_map_in_a_process_pool(tmp_path, method):
    proc = child(
        """
        import multiprocessing, os, threading

        class Unpicklable(Exception):
            def __init__(self, x):
                super().__init__(f"cannot handle {x}")
                self.lock = threading.Lock()  # An exception that cannot cross processes.

        @dc.memoize(os.environ["JOB_CACHE"])
        def parse(x):
            if x == 5:
                raise ValueError("bad record 5")
            if x == 6:
                raise Unpicklable(x)
            return (x, os.getpid())

        if __name__ == "__main__":
            multiprocessing.set_start_method(sys.argv[1])
            batch = parse.map(range(20), keep_going=True, workers=2)
            assert all(r[1] != os.getpid() for r in batch.successes), "computed in the workers"
            print(batch)
            for f in batch.failures:
                print(f.index, type(f.exception).__name__, f.exception, "Traceback" in f.traceback)
            print(parse.map(range(20), keep_going=True, workers=2))
        """,
        method,
        env={"JOB_CACHE": str(tmp_path / "c")},
        script_file=tmp_path / "job.py",
    )
    assert proc.stdout.splitlines() == [
        "BatchResult(20 inputs: 0 reused, 18 computed, 2 failed)",
        "5 ValueError bad record 5 True",
        "6 RuntimeError Unpicklable: cannot handle 6 True",
        "BatchResult(20 inputs: 18 reused, 0 computed, 2 failed)",
    ]


class CountingExecutor:
    """Someone else's executor (a thread pool behind a submit() of its own): it
    counts what it is sent, and says if anyone shuts it down."""

    def __init__(self, workers=2):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(workers)
        self.submitted = []  # The inputs of each submission.
        self.shut_down = False

    def submit(self, fn, *args, **kwargs):
        self.submitted.append([call[1][-1] for call in args[1]])
        return self.pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait=True, **options):
        self.shut_down = True
        self.pool.shutdown(wait)


def test_map_on_a_foreign_executor_sends_only_misses_and_leaves_it_running(tmp_path, calls):
    parse = dc.memoize(tmp_path)(bad_at({3, 7}, calls))
    executor = CountingExecutor()
    batch = parse.map(range(50), keep_going=True, executor=executor)
    assert batch.results[:3] == [0, 10, 20] and [f.index for f in batch.failures] == [3, 7]
    assert sorted(x for chunk in executor.submitted for x in chunk) == list(range(50))
    assert parse.cache_info()[:2] == (0, 48), "threads of this process count in its counters"
    executor.submitted.clear()
    calls.clear()
    again = parse.map(range(50), keep_going=True, executor=executor)
    assert sorted(x for chunk in executor.submitted for x in chunk) == [3, 7], "hits are answered here"
    assert sorted(calls) == [3, 7] and (again.reused, again.computed, len(again.failures)) == (48, 0, 2)
    assert again.results == batch.results[:3] + again.results[3:4] + batch.results[4:7] + again.results[7:8] + batch.results[8:]
    executor.submitted.clear()
    assert parse.map(range(3), executor=executor).results == [0, 10, 20] and executor.submitted == []
    assert not executor.shut_down and executor.pool.submit(int, "5").result() == 5, "still running"
    executor.shutdown()


def test_one_key_twice_in_a_batch_is_computed_once(tmp_path, calls):
    @dc.memoize(tmp_path)
    def work(x):
        calls.append(x)
        if x > 5:
            time.sleep(0.5)  # The slow ones fill the two chunks in flight (workers=1)...
        return bytes(20_000_000)  # ...and storing this is slow: the worker's writer holds the lock a while.

    executor = CountingExecutor()
    batch = work.map([9, 8, 1, 1, 2, 1], executor=executor, workers=1, chunksize=10)
    assert batch.ok and sorted(calls) == [1, 2, 8, 9] and (batch.computed, batch.reused) == (4, 2)
    assert executor.submitted == [[9], [8], [1], [1, 2], [1]], "a key already in the chunk starts the next one"
    executor.shutdown()


def test_map_without_keep_going_on_an_executor_stops_like_a_loop(tmp_path, calls):
    parse = dc.memoize(tmp_path)(bad_at({4}, calls))
    executor = CountingExecutor()
    with pytest.raises(ValueError, match="bad record 4"):
        parse.map(range(10_000), executor=executor, chunksize=1)
    assert len(calls) < 100, "later inputs are not started after the failure"
    assert not executor.shut_down
    executor.shutdown()


def test_imap_streams_a_huge_generator_in_bounded_memory(tmp_path):
    import tracemalloc

    @dc.memoize(tmp_path)
    def square(x):
        return x * x

    read = []

    def inputs():  # Ten million inputs, far more than this test will run.
        for x in range(10_000_000):
            read.append(x)  # How far map has read.
            yield x

    executor = CountingExecutor()
    tracemalloc.start()
    try:
        stream = square.imap(inputs(), executor=executor)
        for n, result in enumerate(stream):
            assert result == n * n, "in input order"
            if n == 1_000:
                break
        stream.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(read) < 20_000, "read ahead only a bounded window"
    assert peak < 20_000_000, f"peak {peak} bytes"
    read.clear()
    assert list(square.imap(itertools.islice(inputs(), 3), workers=2, processes=False)) == [0, 1, 4]
    with pytest.raises(TypeError, match="can't multiply"):  # A failure ends map() of a huge generator early too.
        square.map((x if x < 100 else "bad" for x in inputs()), executor=executor)
    assert len(read) < 20_000
    executor.shutdown()


def test_results_keep_none_and_failures_apart(tmp_path):
    @dc.memoize(tmp_path)
    def maybe(x):
        if x == 2:
            raise KeyError(x)
        return None if x % 2 else x

    batch = maybe.map(range(4), keep_going=True)
    assert batch.results[0] == 0 and batch.results[1] is None and batch.results[3] is None
    assert isinstance(batch.results[2], dc.Failure) and batch.results[2].input == 2
    assert batch.successes == [0, None, None] and not batch.ok
    streamed = list(maybe.imap(range(4), keep_going=True))
    assert streamed[:2] == [0, None] and isinstance(streamed[2], dc.Failure) and streamed[3] is None


def test_batch_options_are_checked(tmp_path):
    @dc.memoize(tmp_path)
    def f(x):
        return x

    with pytest.raises(TypeError, match="executor= takes a concurrent.futures.Executor"):
        f.map([1], executor=object())
    for option, value in (("workers", 0), ("chunksize", 0), ("workers", 1.5)):
        with pytest.raises(ValueError, match=f"{option}= must be a positive int"):
            f.map([1], **{option: value})
    with pytest.raises(ValueError, match="progress= takes"):
        f.map([1], progress="yes")
    with pytest.raises(TypeError, match="unexpected keyword"):
        f.imap([1], worker=2)
    with pytest.raises(TypeError, match="asyncio"):

        @dc.memoize(tmp_path)
        async def g(x):
            return x

        g.imap([1])


class Scaler:
    def __init__(self, scale):
        self.scale = scale
        self.calls = []

    def __repr__(self):  # Part of the key (self is not ignored): equal scales share entries.
        return f"Scaler({self.scale})"

    def __reduce__(self):
        return Scaler, (self.scale,)

    @dc.memoize(METHOD_CACHE)
    def apply(self, x):
        self.calls.append(x)
        return x * self.scale


def test_bound_methods_have_the_wrapper_methods():
    model = Scaler(3)
    try:
        assert model.apply(2) == 6 and model.apply(2) == 6 and model.calls == [2]
        assert model.apply.map([1, 2, 3]).results == [3, 6, 9] and model.calls == [2, 1, 3]
        assert list(model.apply.imap([4], keep_going=True)) == [12]
        assert model.apply.map([5, 6], workers=2, processes=False).results == [15, 18]
        assert model.apply.forget(2) is True and model.apply.forget(2) is False
        assert model.apply.refresh(1) == 3 and model.calls[-1] == 1
        assert model.apply.__wrapped__(7) == 21 and model.calls[-1] == 7
        info = model.apply.cache_info()
        assert info == Scaler.apply.cache_info() and info.currsize == 5
        assert model.apply.__name__ == "apply" and model.apply.__self__ is model
        assert model.apply == model.apply and "bound memoized Scaler.apply" in repr(model.apply)
        import pickle

        assert pickle.loads(pickle.dumps(model.apply))(2) == 6
        model.apply.cache_clear()
        assert Scaler.apply.cache_info().currsize == 0
    finally:
        shutil.rmtree(METHOD_CACHE, ignore_errors=True)


def test_functional_form_pickles_by_value_and_comes_back_as_itself(tmp_path):
    import pickle

    cached = dc.memoize(tmp_path, ttl=60, version=2)(plain_double)
    assert pickle.loads(pickle.dumps(cached)) is cached, "unpickled in the same process: the same object"
    data = pickle.dumps(cached)
    del cached
    import gc

    gc.collect()
    copy = pickle.loads(data)
    assert copy(4) == 8 and copy.path == str(tmp_path) and copy._ttl == 60
    assert copy.__wrapped__ is plain_double


def plain_double(x):
    return x * 2


@pytest.mark.parametrize("form", ["lambda", "nested"])
def test_an_unpicklable_function_fails_before_any_pool_starts(tmp_path, form, monkeypatch):
    from concurrent.futures import ProcessPoolExecutor

    def nested(x):
        return x

    func = dc.memoize(tmp_path)((lambda x: x) if form == "lambda" else nested)
    theirs = ProcessPoolExecutor(1)
    started = []
    monkeypatch.setattr(ProcessPoolExecutor, "__init__", lambda self, *a, **k: started.append(a))
    with pytest.raises(TypeError, match="Define it at module level.*processes=False"):
        func.map(range(3), workers=2)
    with pytest.raises(TypeError, match="cannot be sent to worker processes"):
        func.map(range(3), executor=theirs)
    assert started == [], "no pool was started"
    monkeypatch.undo()
    theirs.shutdown()
    assert func.map(range(3), workers=2, processes=False).ok, "threads need no pickling"


@posix_only
@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_functional_form_and_counters_with_workers(tmp_path, method):
    proc = child(
        """
        import multiprocessing, os
        from concurrent.futures import ProcessPoolExecutor

        def slow(x):
            with open(os.environ["LOG"], "a") as log:
                log.write(f"{x}\\n")
            return x * 2

        cached = dc.memoize(os.environ["JOB_CACHE"])(slow)

        if __name__ == "__main__":
            multiprocessing.set_start_method(sys.argv[1])
            print(cached.map(range(40), workers=2))
            print(cached.cache_info())
            with ProcessPoolExecutor(2) as pool:
                print(cached.map(range(50), executor=pool))
                print(pool.submit(abs, -3).result())
            print(cached.cache_info())
        """,
        method,
        env={"JOB_CACHE": "relative-cache", "LOG": str(tmp_path / "log")},
        cwd=tmp_path,
        script_file=tmp_path / "job.py",
    )
    assert proc.stdout.splitlines() == [
        "BatchResult(40 inputs: 0 reused, 40 computed, 0 failed)",
        "CacheInfo(hits=0, misses=40, maxsize=None, currsize=40)",
        "BatchResult(50 inputs: 40 reused, 10 computed, 0 failed)",
        "3",
        "CacheInfo(hits=40, misses=50, maxsize=None, currsize=50)",
    ]
    assert sorted(map(int, (tmp_path / "log").read_text().split())) == list(range(50)), "each computed once"


@posix_only
def test_pool_workers_exit_when_the_parent_is_killed(tmp_path):
    parent = child(
        """
        import os, time

        @dc.memoize(sys.argv[1])
        def stuck(x):
            os.write(1, f"{os.getpid()}\\n".encode())  # One write: the two workers' lines never mix.
            time.sleep(60)

        if __name__ == "__main__":
            stuck.map(range(2), workers=2)
        """,
        str(tmp_path / "c"),
        background=True,
        script_file=tmp_path / "job.py",
    )
    assert parent.stdout is not None
    workers = [int(parent.stdout.readline()) for _ in range(2)]
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if os.path.exists(f"/proc/{pid}") or _alive(pid)]
    assert alive == [], "the workers exited with their parent"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # A zombie (reaped by init soon) counts as gone.
        if "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            return False
    return True


def test_progress_is_logged_when_stderr_is_not_a_terminal(tmp_path, capsys, caplog):
    @dc.memoize(tmp_path)
    def slow(x):
        time.sleep(0.02)
        return x

    with caplog.at_level("INFO", logger="donecache"):
        slow.map(range(10), progress=0.05)
    lines = [r.getMessage() for r in caplog.records if r.name == "donecache"]
    assert len(lines) >= 2 and all(line.startswith(f"{slow.__qualname__}.map(): ") for line in lines)
    assert "/10 done" in lines[0] and lines[-1].endswith("10/10 done" + lines[-1].split("10/10 done")[1])
    assert capsys.readouterr().err == "", "logged, not printed"
    caplog.clear()
    slow.map(range(10, 13))  # Default: a record only every 30 s; this batch is shorter.
    assert not caplog.records and capsys.readouterr().err == ""
    assert dc._clock(3 * 86400 + 3661) == "3d 01:01:01" and dc._clock(59) == "00:00:59"


DASK_JOB = """
    import os

    @dc.memoize(os.environ["JOB_CACHE"])  # Relative: it must travel as an absolute path.
    def parse(x):
        fd = os.open(os.environ["LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{x}\\n".encode())  # One O_APPEND write per computation.
        os.close(fd)
        if x % 97 == 5:
            raise ValueError(f"bad record {x}")
        return x * 2, os.getpid()

    class Counting:
        \"\"\"The cluster's executor, counting the inputs it is sent.\"\"\"

        def __init__(self, executor):
            self.executor, self.inputs = executor, []

        def submit(self, fn, *args, **kwargs):
            self.inputs.extend(call[1][0] for call in args[1])
            return self.executor.submit(fn, *args, **kwargs)

    def main_is_bare():
        import sys
        return not hasattr(sys.modules["__main__"], "parse")

    if __name__ == "__main__":
        from distributed import Client, LocalCluster

        with LocalCluster(processes=True, n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster:
            with Client(cluster) as client:
                print("workers without the main script's parse:", sorted(client.run(main_is_bare).values()))
                executor = Counting(client.get_executor())
                batch = parse.map(range(2000), keep_going=True, executor=executor)
                print(batch, len(executor.inputs), len({pid for _, pid in batch.successes} - {os.getpid()}))
                failed = [f.input for f in batch.failures]
                executor.inputs.clear()
                again = parse.map(range(2000), keep_going=True, executor=executor)
                print(again, sorted(executor.inputs) == failed, again.results[:2] == batch.results[:2])
                print(parse.cache_info())
"""


def test_map_on_a_dask_cluster(tmp_path):
    pytest.importorskip("distributed")
    work = tmp_path / "work"
    work.mkdir()
    log = tmp_path / "log"
    # Run with -c: the workers cannot import the main script, so parse must travel by value.
    proc = child(DASK_JOB, env={"JOB_CACHE": "cache", "LOG": str(log)}, cwd=work, timeout=170)
    lines = proc.stdout.splitlines()
    assert lines[0] == "workers without the main script's parse: [True, True]"
    failures = sum(1 for x in range(2000) if x % 97 == 5)
    assert lines[1:] == [
        f"BatchResult(2000 inputs: 0 reused, {2000 - failures} computed, {failures} failed) 2000 2",
        f"BatchResult(2000 inputs: {2000 - failures} reused, 0 computed, {failures} failed) True True",
        f"CacheInfo(hits={2000 - failures}, misses={2000 - failures}, maxsize=None, currsize={2000 - failures})",
    ], proc.stderr
    computed = sorted(map(int, log.read_text().split()))
    bad = [x for x in range(2000) if x % 97 == 5]
    assert computed == sorted(list(range(2000)) + bad), "each input computed once, the failures once more"
    assert (work / "cache").is_dir()


def test_damage_costs_only_a_recomputation(tmp_path):
    script = """
        import warnings
        warnings.simplefilter("always")
        @dc.memoize(sys.argv[1])
        def f(x):
            print("computed", x)
            return [x] * 3
        assert f(1) == [1, 1, 1] and f(2) == [2, 2, 2]
    """
    assert child(script, str(tmp_path)).stdout.split() == ["computed", "1", "computed", "2"]
    for path in entry_files(tmp_path):
        path.write_bytes(path.read_bytes()[:-5])  # Tear every entry.
    (tmp_path / ".lock").unlink()
    (tmp_path / ".lock").mkdir()  # And make the lock file unusable.
    proc = child(script, str(tmp_path))
    assert proc.stdout.split() == ["computed", "1", "computed", "2"], "damage costs a recomputation"
    assert "DonecacheWarning: f(): computing without the cache lock" in proc.stderr
    (tmp_path / ".lock").rmdir()
    proc = child(script, str(tmp_path))
    assert proc.stdout == "" and proc.stderr == "", "the rewritten entries are hits again"


# ---------------------------------------------------------------------------
# 7. The command line, and the example pipeline
# ---------------------------------------------------------------------------


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m donecache ARGS`` in a subprocess."""
    return child(
        f"import runpy\nsys.argv = ['donecache', *sys.argv[1:]]\nrunpy.run_module({MODULE!r}, run_name='__main__')",
        *args,
        check=False,
        cwd=cwd,
    )


@pytest.fixture
def filled_cache(tmp_path):
    """A cache with two memoized functions, a shelf key, and one entry of each kind of trouble."""
    cache = tmp_path / "cache"
    child(
        """
        import time
        @dc.memoize(sys.argv[1])
        def square(x):
            return x * x if isinstance(x, int) else x
        @dc.memoize(sys.argv[1], ttl=0.05)
        def brief(x):
            return x
        for i in range(2):
            square(i)
        square("a|b|c")  # Raw argument text in the key may contain the separator.
        brief(1)
        with dc.open(sys.argv[1]) as db:
            db["plain key"] = "value"
        time.sleep(0.1)  # brief(1) expires.
        """,
        str(cache),
    )
    victim = next(p for p in entry_files(cache) if b"plain key" in p.read_bytes())
    victim.write_bytes(victim.read_bytes()[:-1])  # Damaged.
    litter = cache / victim.parent.name / (dc._TEMP_PREFIX + "f" * 16 + "~" + victim.name)
    litter.write_bytes(b"half an entry")
    os.utime(litter, (time.time() - 7200, time.time() - 7200))  # Left by a crash two hours ago.
    return cache


def test_cli_info(filled_cache):
    proc = cli("info", str(filled_cache))
    assert proc.returncode == 0
    assert "entries: 3 live, 1 expired, 1 damaged" in proc.stdout
    assert "temporary files left by crashed writers: 1" in proc.stdout
    assert "3  __main__:square" in proc.stdout
    report = json.loads(cli("info", str(filled_cache), "--json").stdout)
    assert report["entries"] == {"live": 3, "expired": 1, "damaged": 1}
    assert report["functions"] == {"__main__:square": 3} and report["temporary_files"] == 1


def test_cli_prune(filled_cache):
    proc = cli("prune", str(filled_cache), "--json")
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == {
        "path": str(filled_cache),
        "removed_entries": 2,
        "removed_temporary_files": 1,
    }
    assert json.loads(cli("info", str(filled_cache), "--json").stdout)["entries"] == {
        "live": 3,
        "expired": 0,
        "damaged": 0,
    }


def test_cli_clear(filled_cache):
    proc = cli("clear", str(filled_cache), "--function", "nope")
    assert proc.returncode == 1 and "functions there: __main__:square" in proc.stderr
    proc = cli("clear", str(filled_cache), "--function", "square")
    assert proc.returncode == 0 and proc.stdout.startswith("removed 3 entries")
    assert json.loads(cli("clear", str(filled_cache), "--json").stdout)["removed"] == 2  # brief(1), damaged
    assert entry_files(filled_cache) == []


def test_cli_never_unpickles(tmp_path):
    cache = tmp_path / "cache"
    with dc.open(cache) as db:
        db["trap"] = "placeholder"
    path = entry_files(cache)[0]
    payload = b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR."  # Runs a command if loaded.
    path.write_bytes(dc._encode_entry(b"trap", payload))
    for command in ("info", "prune", "clear"):
        assert cli(command, str(cache)).returncode == 0
    assert not (tmp_path / "pwned").exists()


def test_cli_status(tmp_path):
    with dc.done_dir(tmp_path / "done", version="v2"):
        pass
    (tmp_path / "half").mkdir()
    proc = cli("status", str(tmp_path / "done"))
    assert proc.returncode == 0 and proc.stdout.startswith("done") and "version v2" in proc.stdout
    proc = cli("status", str(tmp_path / "done"), str(tmp_path / "half"), str(tmp_path / "gone"), "--json")
    assert proc.returncode == 1
    assert [(row["state"], bool(row["marker"])) for row in json.loads(proc.stdout)] == [
        ("done", True),
        ("incomplete", False),
        ("missing", False),
    ]
    assert cli("status", str(tmp_path / "done"), "--version", "v3").stdout.startswith("incomplete")
    assert cli("status", str(tmp_path / "done"), "--marker", "_SUCCESS").returncode == 1


def test_cli_errors_and_help(tmp_path):
    proc = cli("info", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and str(tmp_path / "nothing") in proc.stderr
    assert cli().returncode == 2
    assert cli("prune").returncode == 2
    for command in ("info", "clear", "prune", "status"):
        proc = cli(command, "--help")
        assert proc.returncode == 0 and "--json" in proc.stdout


def test_example_pipeline_runs_and_then_reuses_everything(tmp_path):
    script = Path(__file__).resolve().parent / "examples" / "pipeline.py"
    if not script.exists():
        pytest.skip("examples/ is not beside this test file (a vendored copy)")
    env = {**os.environ, "PYTHONPATH": str(IMPORT_ROOT), "PIPELINE_OUT": str(tmp_path / "out")}

    def run() -> str:
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    first = run()
    assert "stage 1: wrote 2000 record files" in first
    assert "stage 2: 1993 computed, 0 reused from the cache, 7 failed" in first
    assert "record 0137: ValueError: amount '12,5O' is not a number" in first
    assert "record 0777: KeyError: 'customer'" in first
    second = run()
    assert "stage 1: " + str(tmp_path / "out" / "records") + " is done; skipped" in second
    assert "stage 2: 0 computed, 1993 reused from the cache, 7 failed" in second
    assert len((tmp_path / "out" / "report.csv").read_text().splitlines()) == 1994
