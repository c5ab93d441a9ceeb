# SPDX-License-Identifier: MIT
"""Tests for donecache: one section per tool, real processes for crashes and races.

The module is imported once, under one name. Set DONECACHE_MODULE (for example
to ``myproject._vendor.donecache``) to run this same suite against a vendored copy.
"""

from __future__ import annotations

import dbm
import datetime
import contextlib
import copy
import errno
import importlib
import itertools
import json
import os
import pickle
import random
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
import warnings
from pathlib import Path
from typing import Callable, Iterator

import pytest

MODULE = os.environ.get("DONECACHE_MODULE", "donecache")
dc = importlib.import_module(MODULE)
# The directory to put on sys.path so that children import the same copy.
IMPORT_ROOT = Path(dc.__file__).resolve().parents[MODULE.count(".")]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="uses POSIX signals, permissions or rlimits")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")


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
    python: str | None = None,
    run: list[str] | None = None,
) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
    """Run ``script`` in a fresh interpreter where ``dc`` is donecache; args go to sys.argv[1:].

    background: return the Popen at once (stdout is a pipe) instead of waiting.
    unprivileged: make file permissions apply to the child even when the tests
        run as root, by dropping the capabilities that let root ignore them
        (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) with setpriv(1).
    script_file: save the script there and run the file instead of ``-c``
        (multiprocessing's spawn start method re-imports the main script).
    python: another interpreter to run it with.
    run: the interpreter's arguments instead of the script (which must be ""): an existing
        file, ``-m MODULE``, or ``-c CODE`` that does without the line importing ``dc``.
    """
    prelude = f"import importlib, sys\ndc = importlib.import_module({MODULE!r})\n"
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(IMPORT_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    argv = [python or sys.executable, "-c", prelude + textwrap.dedent(script), *args]
    if script_file is not None:
        script_file.write_text(prelude + textwrap.dedent(script))
        argv[1:3] = [str(script_file)]
    if run is not None:
        assert script == "", "child(): give either a script or run="
        argv[1:3] = run
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


def cli(
    *args: str, cwd: Path | None = None, unprivileged: bool = False, background: bool = False
) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
    """``python -m donecache ARGS`` in a subprocess; see child() for ``unprivileged`` and ``background``."""
    return child(
        f"import runpy\nsys.argv = ['donecache.py', *sys.argv[1:]]\nrunpy.run_module({MODULE!r}, run_name='__main__')",
        *args,
        check=False,
        cwd=cwd,
        unprivileged=unprivileged,
        background=background,
    )


@contextlib.contextmanager
def stage_being_built(stage: Path, *, expect: int | None = None) -> Iterator[subprocess.Popen[str]]:
    """A child inside ``done_dir(stage)`` (shared: with ``expect`` and a first piece "a"), killed on exit."""
    builder = child(
        """
        import time
        expect = int(sys.argv[2]) or None
        with dc.done_dir(sys.argv[1], **({"expect": expect} if expect else {})) as stage:
            if expect:
                stage.piece("a", lambda: "a")
            print("building", flush=True)
            time.sleep(60)
        """,
        str(stage),
        str(expect or 0),
        background=True,
    )
    try:
        wait_for_line(builder, "building")  # type: ignore[arg-type]
        yield builder  # type: ignore[misc]
    finally:
        builder.kill()
        builder.wait()


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (one that init will reap soon counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    return True


def entry_files(root: Path) -> list[Path]:
    """Entry files of both layouts: donecache.open keys, and memoized functions' folders."""
    found = [*root.glob("??/*"), *root.glob("?" * 16 + "/??/*")]
    return sorted(p for p in found if not p.name.startswith("."))


def entry_key(path: Path) -> bytes:
    """The key an entry file holds, read from its header (searching its first bytes for a key's text
    can match the header's CRCs and times by chance)."""
    entry = dc._load_entry(str(path), None, dc._HEAD)[0]
    assert entry is not None, path
    return entry.key


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


# ---------------------------------------------------------------------------
# The module's layout: each section uses only what is above it
# ---------------------------------------------------------------------------

# The names the core may call although the tail defines them below: f.map() and
# f.imap() hand their work to the batch section through these entry points.
LAYERING_ENTRY_POINTS = {"_run_map", "_run_imap"}

# Uses of a name above its definition still to be removed (none: keep it so).
LAYERING_NOT_YET: set[str] = set()


def _without_annotations(source: str) -> str:
    """``source`` with every annotation blanked out, lines and columns kept. Under
    `from __future__ import annotations` an annotation is never evaluated, so a
    type named before its class does not count as a use; symtable sees
    annotations on 3.9 but not from 3.10 on, and this makes every version agree."""
    import ast

    lines = source.splitlines(keepends=True)
    spans = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.arg) and node.annotation is not None:
            spans.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            spans.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            spans.append(node.annotation)
    for node in sorted(spans, key=lambda n: (n.lineno, n.col_offset), reverse=True):
        first, last = node.lineno - 1, node.end_lineno - 1
        if first == last:
            line = lines[first]
            width = node.end_col_offset - node.col_offset
            lines[first] = line[: node.col_offset] + "0".ljust(width) + line[node.end_col_offset :]
        else:  # In parentheses, so that the line breaks stay legal.
            lines[first] = lines[first][: node.col_offset] + "(0" + "\n"
            for number in range(first + 1, last):
                lines[number] = "\n"
            lines[last] = " " * max(node.end_col_offset - 1, 0) + ")" + lines[last][node.end_col_offset :]
    return "".join(lines)


def names_used_above_their_definition(source: str, filename: str) -> dict[str, tuple[int, list[int]]]:
    """Top-level names that code above their definition uses (in function and class
    bodies, found with symtable, so locals and parameters of the same name do not
    count): each with the line of its definition and the lines of the top-level
    statements that use it too early."""
    import ast
    import symtable

    defined: dict[str, int] = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.setdefault(node.name, node.lineno)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        defined.setdefault(name.id, node.lineno)
    early: dict[str, tuple[int, list[int]]] = {}

    def visit(table: symtable.SymbolTable, top_line: int) -> None:
        for symbol in table.get_symbols():
            name = symbol.get_name()
            if symbol.is_global() and defined.get(name, 0) > top_line:
                early.setdefault(name, (defined[name], []))[1].append(top_line)
        for inner in table.get_children():
            visit(inner, top_line)

    for table in symtable.symtable(_without_annotations(source), filename, "exec").get_children():
        visit(table, table.get_lineno())
    return early


def test_each_name_is_used_only_below_its_definition():
    source = Path(dc.__file__).read_text(encoding="utf-8")
    early = names_used_above_their_definition(source, dc.__file__)
    wrong = {name: lines for name, lines in early.items() if name not in LAYERING_ENTRY_POINTS | LAYERING_NOT_YET}
    assert not wrong, f"used above their definition (name: (defined at, used by the statements at)): {wrong}"
    mended = sorted(LAYERING_NOT_YET - set(early))
    assert not mended, f"now layered, strike from LAYERING_NOT_YET: {mended}"


def test_the_core_reaches_the_tail_only_through_the_batch_entry_points():
    source = Path(dc.__file__).read_text(encoding="utf-8")
    lines = source.splitlines()
    marker = [n + 1 for n, line in enumerate(lines) if line.startswith("#") and "core ends here" in line.lower()]
    if not marker:
        pytest.xfail("the core/tail marker is not in place yet")
    assert len(marker) == 1
    early = names_used_above_their_definition(source, dc.__file__)
    reached = {name for name, (at, users) in early.items() if at > marker[0] and min(users) < marker[0]}
    assert reached <= LAYERING_ENTRY_POINTS, f"the core uses the tail's {sorted(reached - LAYERING_ENTRY_POINTS)}"
    assert LAYERING_ENTRY_POINTS <= reached, "an entry point the core no longer uses"


as_str_or_path = pytest.mark.parametrize("kind", [str, Path], ids=["str", "Path"])
text_or_bytes = pytest.mark.parametrize(
    "mode,content", [("w", "héllo\nwörld\n"), ("wb", b"\x00\xffbinary\n")], ids=["text", "bytes"]
)


# ---------------------------------------------------------------------------
# Atomic writes
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
@pytest.mark.parametrize("tool", ["atomic_write", "atomic_path"])
def test_fsync_of_the_directory_only_when_durable(tmp_path, monkeypatch, durable, tool):
    """Issue 18, item 12b: the file's data is flushed even when not durable (else a power cut
    can keep the rename and lose the data: an empty target); the directory only when durable."""
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real_fsync(fd)))
    if tool == "atomic_write":
        with dc.atomic_write(tmp_path / "out", durable=durable) as f:
            f.write("x")
    else:
        with dc.atomic_path(tmp_path / "out", durable=durable) as tmp:
            tmp.write_text("x")
    assert calls == ([False, True] if durable else [False]), "file first, then its directory"


@posix_only
@pytest.mark.parametrize("durable", [True, False])
def test_durable_stage_flushes_each_piece_before_its_rename(tmp_path, monkeypatch, durable):
    """Issue 18, item 12a: in a durable stage each piece's data reaches the disk before its name,
    so a rerun after a power cut never resumes from (and marks done over) an emptied piece."""
    synced: set[int] = set()
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.add(os.fstat(fd).st_ino), real_fsync(fd)))
    with dc.done_dir(tmp_path / "stage", durable=durable) as stage:
        for name in ("a.bin", "sub/b.bin"):
            ino = os.stat(stage.piece(name, lambda: b"data")).st_ino
            assert (ino in synced) == durable, f"piece {name} flushed: {ino in synced}"


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


VICTIM = b"precious data of another file\n"


def victim_file(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM)
    os.chmod(victim, 0o640)
    return victim


def untouched(victim: Path) -> bool:
    return victim.read_bytes() == VICTIM and stat.S_IMODE(victim.stat().st_mode) == 0o640


# issue 18 item 1 (failed on 0.2.0, 3cf1caa, unless the docstring says otherwise)
@posix_only
def test_atomic_path_never_renames_or_chmods_through_a_link(tmp_path):
    """Item 1: a symlink made at atomic_path's temporary name (by the library, or by someone
    racing it) was followed: its target was chmod-ed to the old file's mode and the link was
    renamed onto the target."""
    victim = victim_file(tmp_path)
    target = tmp_path / "out.npy"
    target.write_bytes(b"old")
    os.chmod(target, 0o600)
    with pytest.raises(OSError, match="symbolic link"):
        with dc.atomic_path(target) as tmp:
            os.symlink(victim, tmp)
    assert untouched(victim) and not target.is_symlink() and target.read_bytes() == b"old"
    assert listing(tmp_path) == ["out.npy", "victim"]


# -- Attack 7 (issue 10 item 7, failed before its fix): atomic_write onto a FIFO or a device node


def make_special(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """(the path to write to, the special file that must survive)."""
    if kind == "chardev":
        special = tmp_path / "null"
        try:
            os.mknod(special, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
        except PermissionError:
            pytest.skip("mknod(2) needs privileges")
        return special, special
    special = tmp_path / "pipe"
    os.mkfifo(special)
    if kind == "symlink to fifo":
        (tmp_path / "link").symlink_to(special)
        return tmp_path / "link", special
    return special, special


@posix_only
@pytest.mark.parametrize("kind", ["fifo", "chardev", "symlink to fifo"])
@pytest.mark.parametrize("tool", ["atomic_write", "atomic_path"])
def test_atomic_write_refuses_a_special_file(tmp_path, kind, tool):
    """Issue 10, item 7: atomic_write (and atomic_path) onto a FIFO or a device node replaced it with
    a regular file. It must refuse, with an error naming the path, and leave the special file."""
    target, special = make_special(tmp_path, kind)
    before = listing(tmp_path)
    mode = os.lstat(special).st_mode
    with pytest.raises((OSError, ValueError)) as caught:
        if tool == "atomic_write":
            with dc.atomic_write(target) as f:
                f.write("data")
        else:
            with dc.atomic_path(target) as tmp:
                tmp.write_text("data")
    message = str(caught.value)
    assert str(target) in message or str(special) in message, message
    assert "regular file" in message.replace(str(tmp_path), "<tmp>"), message
    assert os.lstat(special).st_mode == mode, "the special file was replaced"
    assert listing(tmp_path) == before, "no temporary file left"


# -- Attack 15 (issue 10 item 15, failed before its fix): durable: new directories are fsynced into their parents


@pytest.fixture
def fsynced_into_parent(monkeypatch):
    """Record every fsync of a directory, with the names it held then; return a check for one directory."""
    synced: list[tuple[tuple[int, int], set[str]]] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name, None)
        if real is None:
            continue

        def spy(fd, real=real):
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                synced.append(((st.st_dev, st.st_ino), set(os.listdir(fd))))
            return real(fd)

        monkeypatch.setattr(os, name, spy)

    def check(path: Path) -> bool:
        """True if the directory holding ``path`` was fsynced while ``path`` was in it."""
        st = os.stat(path.parent)
        return any(ident == (st.st_dev, st.st_ino) and path.name in names for ident, names in synced)

    return check


@posix_only
def test_durable_atomic_write_fsyncs_new_parents(tmp_path, fsynced_into_parent):
    """Issue 10, item 15: atomic_write(make_parents=True) fsynced only the file's own directory,
    not the new directories above it, which a power cut could lose with the file in them."""
    target = tmp_path / "a" / "b" / "c" / "file"
    with dc.atomic_write(target, make_parents=True) as f:
        f.write("x")
    missing = [str(p) for p in (target, target.parent, target.parent.parent, tmp_path / "a") if not fsynced_into_parent(p)]
    assert missing == [], f"not fsynced into their parent directories: {missing}"


@posix_only
def test_durable_stage_fsyncs_its_new_directories(tmp_path, fsynced_into_parent):
    """Issue 10, item 15: done_dir on a new nested path did not fsync the new directories into
    their parents (only the stage's own tree)."""
    stage_dir = tmp_path / "x" / "y" / "stage"
    with dc.done_dir(stage_dir) as stage:
        stage.piece("sub/piece", lambda: "x")
    new = [tmp_path / "x", tmp_path / "x" / "y", stage_dir, stage_dir / "sub", stage_dir / "sub" / "piece", stage_dir / "DONE"]
    missing = [str(p) for p in new if not fsynced_into_parent(p)]
    assert missing == [], f"not fsynced into their parent directories: {missing}"


@posix_only
def test_durable_store_fsyncs_a_new_shard(tmp_path, fsynced_into_parent):
    """Issue 10, item 15: a durable store writing its first entry into a new shard fsynced the
    shard (with the entry) but not the store's directory, which holds the new shard (nor, for a new
    store, the directory above it)."""
    with dc.open(tmp_path / "c", durable=True) as db:
        db["k"] = 1
    [entry] = entry_files(tmp_path / "c")
    missing = [str(p) for p in (entry, entry.parent, tmp_path / "c") if not fsynced_into_parent(p)]
    assert missing == [], f"not fsynced into their parent directories: {missing}"


# ---------------------------------------------------------------------------
# Stage directories
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
        # Each piece's data is flushed as it is written (issue 18, item 12a), its directory is not.
        assert [os.path.basename(p).split("~")[-1] for p in flushed[1:]] == ["a.txt", "b.txt"]
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


def test_a_new_version_starts_from_an_empty_stage_and_the_same_version_resumes(tmp_path):
    with dc.done_dir(tmp_path / "s", version=1) as stage:
        stage.piece("a", lambda: "v1")
    with pytest.raises(Boom):
        with dc.done_dir(tmp_path / "s", version=2) as stage:
            assert not stage.done and not stage.has("a"), "version-1 pieces are not reused for version 2"
            stage.piece("b", lambda: "v2")
            raise Boom()  # A crash halfway through version 2.
    with dc.done_dir(tmp_path / "s", version=2) as stage:
        assert stage.has("b"), "the same version resumes its pieces"
        assert stage.piece("b", lambda: "again").read_text() == "v2"
        stage.piece("c", lambda: "v2")
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if not p.name.startswith(".")) == ["DONE", "b", "c"]
    assert dc.is_done(tmp_path / "s", version=2) and dc.is_done(tmp_path / "s", version="2")


def test_a_version_change_never_shows_a_marker_over_mixed_pieces(tmp_path):
    with dc.done_dir(tmp_path / "s", version="old") as stage:
        stage.piece("a", lambda: "old")
    with dc.done_dir(tmp_path / "s", version="new") as stage:
        assert not (tmp_path / "s" / "DONE").exists() and not stage.has("a")
        stage.piece("b", lambda: "new")
    meta = json.loads((tmp_path / "s" / "DONE").read_text())
    assert meta["version"] == "new" and not (tmp_path / "s" / "a").exists()


@pytest.mark.parametrize("version", [2, "2", (1, 2), ("run", 3)])
def test_versions_are_compared_by_their_text(tmp_path, version):
    with dc.done_dir(tmp_path / "s", version=version):
        pass
    assert dc.is_done(tmp_path / "s", version=version), "a tuple survives the JSON round trip"
    text = dc._version_text(version)
    assert dc.is_done(tmp_path / "s", version=text)
    assert cli("status", str(tmp_path / "s"), "--version", text).returncode == 0
    assert cli("status", str(tmp_path / "s"), "--version", text + "0").returncode == 1
    with dc.done_dir(tmp_path / "s", version=text) as stage:
        assert stage.done


@pytest.mark.parametrize("version", [{"a": 1}, 1.5j, object(), 1.10, ("run", 1.5)])
def test_an_unusable_version_raises_before_the_body(tmp_path, version):
    ran = []
    with pytest.raises(TypeError, match="version must be"):
        with dc.done_dir(tmp_path / "s", version=version):
            ran.append(1)
    assert ran == []
    with pytest.raises(TypeError, match="version must be"):
        dc.memoize(tmp_path / "c", version=version)
    with pytest.raises(TypeError, match="version must be"):
        dc.is_done(tmp_path / "s", version=version)


def test_a_float_version_is_refused_with_the_text_to_write(tmp_path):
    with pytest.raises(TypeError, match=r"1\.10 and 1\.1 are one float: write '1\.1'"):
        dc.done_dir(tmp_path / "s", version=1.10)


@pytest.mark.parametrize(
    "one, other", [(("1,2",), (1, 2)), (("",), ()), ((1, "(2)"), (1, (2,))), (("a'", "b"), ("a", "'b"))]
)
def test_tuple_versions_with_different_items_differ(tmp_path, one, other):
    with dc.done_dir(tmp_path / "s", version=one):
        pass
    assert dc.is_done(tmp_path / "s", version=one) and not dc.is_done(tmp_path / "s", version=other)
    prefixes = [dc.memoize(tmp_path / "m", version=version)(len)._prepare() for version in (one, other)]
    assert prefixes[0] != prefixes[1], "memoize's version too"


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


@pytest.mark.parametrize("name", ["../escape", "/abs/path", "DONE", ".donecache.lock", ".donecache.builder~1", ""])
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


# issue 18 item 1 (failed on 0.2.0, 3cf1caa, unless the docstring says otherwise)
@posix_only
@pytest.mark.parametrize("shared", [False, True], ids=["stage", "shared-stage"])
def test_a_symlink_at_a_stage_lock_is_refused_and_its_target_kept(tmp_path, shared):
    """Item 1: the lock file was opened through a planted link, then truncated and rewritten
    with the builder's host and pid: the link's target was emptied."""
    victim = victim_file(tmp_path)
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / ".donecache.lock").symlink_to(victim)
    with pytest.raises(OSError, match="symbolic link, not a regular file") as caught:
        with dc.done_dir(stage, expect=1 if shared else None) as s:
            s.piece("a", lambda: "a")
    assert ".donecache.lock" in str(caught.value) and "remove it" in str(caught.value)
    assert untouched(victim) and not (stage / "DONE").exists()


# issue 18 item 1 (failed on 0.2.0, 3cf1caa, unless the docstring says otherwise)
@posix_only
@pytest.mark.parametrize("depth", ["sub/x", "sub/deeper/x"])
def test_a_piece_is_never_written_through_a_symlinked_folder(tmp_path, depth):
    """Item 1: a symlinked folder planted inside a stage made piece() write outside it (and
    count a file found there as the piece)."""
    outside = tmp_path / "outside"
    (outside / "deeper").mkdir(parents=True)
    victim = victim_file(tmp_path)
    os.link(victim, outside / "x")
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "sub").symlink_to(outside, target_is_directory=True)
    before = listing(outside)
    with pytest.raises(NotADirectoryError, match="is a symbolic link, not a directory") as caught:
        with dc.done_dir(stage) as s:
            s.piece(depth, lambda: "written outside the stage")
    assert str(stage / "sub") in str(caught.value) and "remove it" in str(caught.value)
    assert untouched(victim) and listing(outside) == before and listing(outside / "deeper") == []
    assert not (stage / "DONE").exists()
    (stage / "sub").unlink()

    def plant_meanwhile():
        (stage / "sub").symlink_to(outside, target_is_directory=True)
        return "written while a link was planted"

    with pytest.raises(NotADirectoryError, match="symbolic link"):
        with dc.done_dir(stage) as s:
            s.piece(depth, plant_meanwhile)
    assert untouched(victim) and listing(outside) == before and listing(outside / "deeper") == []
    (stage / "sub").unlink()
    with pytest.raises(Boom), dc.done_dir(stage) as s:
        s.piece(depth, lambda: (_ for _ in ()).throw(Boom()))
    assert listing(stage) == [".donecache.lock"], "a failed make() leaves no folder behind"
    with dc.done_dir(stage) as s:  # Real folders are made as before.
        s.piece(depth, lambda: "inside")
    assert (stage / depth).read_text() == "inside"


# issue 18 item 11 (failed on 0.2.0, 3cf1caa, unless the docstring says otherwise)
def test_a_versioned_stage_over_an_unversioned_build_starts_empty(tmp_path):
    """Item 11: a version=2 stage resumed the pieces of a finished unversioned build (whose
    marker names no version and which recorded none) and wrote its marker over them."""
    stage = tmp_path / "stage"
    with dc.done_dir(stage) as s:
        s.piece("old", lambda: "from the unversioned build")
    with dc.done_dir(stage, version=2) as s:
        assert not s.done and not (stage / "old").exists()
        s.piece("new", lambda: "v2")
    assert dc.is_done(stage, version=2) and not (stage / "old").exists()
    with dc.done_dir(tmp_path / "crashed") as s:  # No marker: an unversioned build that crashed.
        s.piece("kept", lambda: "x")
        mark = s.path / "DONE"
    mark.unlink()
    with dc.done_dir(tmp_path / "crashed", version=2) as s:
        assert (s.path / "kept").exists(), "without a marker nothing says which version wrote the pieces"


# -- shared stages (expect=) ---------------------------------------------------

SHARED_BUILDER = """
    import json, os, time
    stage_dir, log, go, index, count, pieces = sys.argv[1:7]
    index, count, pieces = int(index), int(count), int(pieces)
    real_write_marker = dc.Stage._write_marker

    def write_marker(self):  # A spy: every marker written, by whom.
        with open(log, "a") as f:
            f.write(f"marker {os.getpid()}\\n")
        real_write_marker(self)

    dc.Stage._write_marker = write_marker
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    names = [f"part-{i:03d}.txt" for i in range(pieces)]
    with dc.done_dir(stage_dir, expect=names, version="v1") as stage:
        entered = time.time()
        if not stage.done:
            for name in names[index::count]:
                stage.piece(name, lambda: (time.sleep(0.2), name)[1])
        left = time.time()
    print(json.dumps({"pid": os.getpid(), "done": stage.done, "entered": entered, "left": left}), flush=True)
"""

SHARED_WATCHER = """
    import json, os, time
    stage_dir, stop, pieces = sys.argv[1], sys.argv[2], int(sys.argv[3])
    paths = [os.path.join(stage_dir, f"part-{i:03d}.txt") for i in range(pieces)]
    marker = os.path.join(stage_dir, "DONE")
    seen, early, polls = set(), [], 0
    deadline = time.monotonic() + 120  # Never outlive a test that failed.
    print("ready", flush=True)
    while not os.path.exists(stop) and time.monotonic() < deadline:
        polls += 1
        time.sleep(0.0005)
        try:
            st = os.stat(marker)
        except FileNotFoundError:
            continue
        seen.add((st.st_ino, st.st_mtime_ns))
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            early.append(missing)
    print(json.dumps({"markers": len(seen), "early": early[:3], "polls": polls}), flush=True)
"""


@posix_only
def test_shared_stage_is_filled_by_four_processes_at_once_and_marked_once(tmp_path):
    stage_dir, log, go, stop = tmp_path / "s", tmp_path / "log", tmp_path / "go", tmp_path / "stop"
    pieces, count = 12, 4  # Each builder makes 3 pieces of 0.2 s: 0.6 s alone, 2.4 s one after another.
    watcher = child(SHARED_WATCHER, str(stage_dir), str(stop), str(pieces), background=True)
    procs = [
        child(SHARED_BUILDER, str(stage_dir), str(log), str(go), str(i), str(count), str(pieces), background=True)
        for i in range(count)
    ]
    try:
        for proc in [watcher, *procs]:
            wait_for_line(proc, "ready")
        started = time.monotonic()
        go.touch()
        reports = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
        wall = time.monotonic() - started
        stop.touch()
        watched = json.loads(watcher.communicate(timeout=60)[0])
    finally:
        for proc in [watcher, *procs]:
            proc.kill()
            proc.wait()
    assert all(p.returncode == 0 for p in procs)
    # Concurrent, not one after another: every builder was inside before any
    # left, and the wall time is a fraction of the builders' summed time (which
    # is what it would at least be, were they serialised).
    assert max(r["entered"] for r in reports) < min(r["left"] for r in reports)
    busy = sum(r["left"] - r["entered"] for r in reports)
    assert wall < 0.6 * busy and wall < count * 0.6, f"4 builders took {wall:.2f} s for {busy:.2f} s of work"
    assert log.read_text().split() .count("marker") == 1, "the marker was written exactly once"
    writer = int(log.read_text().split()[1])
    assert any(r["pid"] == writer and r["done"] for r in reports)
    meta = json.loads((stage_dir / "DONE").read_text())
    assert meta["pid"] == writer and meta["expect"] == pieces and meta["version"] == "v1"
    # Never before the last piece: the marker is newer than every piece, and the
    # watcher, polling throughout, never saw it while a piece was missing.
    newest_piece = max((stage_dir / f"part-{i:03d}.txt").stat().st_mtime_ns for i in range(pieces))
    assert (stage_dir / "DONE").stat().st_mtime_ns >= newest_piece
    assert watched["early"] == [] and watched["markers"] == 1 and watched["polls"] > 100
    assert dc.is_done(stage_dir, version="v1")
    assert sorted(os.listdir(stage_dir)) == [".donecache.lock", ".donecache.version", "DONE"] + [
        f"part-{i:03d}.txt" for i in range(pieces)
    ]


def test_shared_stage_builder_that_finishes_early_leaves_without_a_marker(tmp_path):
    stage_dir = tmp_path / "s"
    with dc.done_dir(stage_dir, expect=["a", "b"]) as first:
        first.piece("a", lambda: "a")
    assert first.done is False and not dc.is_done(stage_dir)
    assert sorted(os.listdir(stage_dir)) == [".donecache.lock", "a"]
    with dc.done_dir(stage_dir, expect=["a", "b"]) as second:
        assert not second.done
        second.piece("b", lambda: "b")
    assert second.done is True and dc.is_done(stage_dir)
    with dc.done_dir(stage_dir, expect=["a", "b"]) as third:
        assert third.done, "a finished shared stage is skipped like any other"


@posix_only
def test_shared_stage_is_not_locked_while_builders_work(tmp_path):
    stage_dir, release = tmp_path / "s", tmp_path / "release"
    inside = child(
        """
        import os, time
        with dc.done_dir(sys.argv[1], expect=2, version=1) as stage:
            stage.piece("mine", lambda: "1")
            print("inside", flush=True)
            while not os.path.exists(sys.argv[2]):
                time.sleep(0.001)
        print("done" if stage.done else "not done", flush=True)
        """,
        str(stage_dir),
        str(release),
        background=True,
    )
    wait_for_line(inside, "inside")
    # The other builder is inside its block: entering and finishing takes no wait.
    with dc.done_dir(stage_dir, expect=2, version=1, timeout=1) as stage:
        assert not stage.done
        stage.piece("yours", lambda: "2")
    assert stage.done and dc.is_done(stage_dir, version=1), "the last piece's builder wrote the marker"
    release.touch()
    assert inside.communicate(timeout=30)[0].split() == ["done"], "the builder still inside found it finished"
    assert json.loads((stage_dir / "DONE").read_text())["pid"] == os.getpid()


@posix_only
def test_shared_stage_builder_killed_leaves_no_marker_and_a_rerun_completes_it(tmp_path):
    stage_dir = tmp_path / "s"
    names = [f"{i}.txt" for i in range(6)]
    proc = child(
        """
        import json, time
        with dc.done_dir(sys.argv[1], expect=json.loads(sys.argv[2])) as stage:
            for name in json.loads(sys.argv[2]):
                if name == "3.txt":
                    print("inside", flush=True)
                    time.sleep(60)
                stage.piece(name, lambda: name)
        """,
        str(stage_dir),
        json.dumps(names),
        background=True,
    )
    wait_for_line(proc, "inside")
    # What a kill in the middle of a write leaves: a temporary file named by its writer (this host, its pid).
    litter = stage_dir / (dc._TEMP_PREFIX + dc._writer_token()[:6] + f"{proc.pid:06x}0000~3.txt")
    litter.write_text("half a piece")
    proc.kill()
    proc.wait()
    assert not dc.is_done(stage_dir) and not (stage_dir / "DONE").exists()
    # Another builder's entry must not sweep it (it may be a live writer's file)...
    with dc.done_dir(stage_dir, expect=names, timeout=2) as stage:
        assert litter.exists()
        stage.piece("3.txt", lambda: "3.txt")
    assert not stage.done, "two pieces are still missing"
    # ...but the one that finds the stage complete does, before its marker.
    with dc.done_dir(stage_dir, expect=names, timeout=2) as stage:
        for name in names:
            stage.piece(name, lambda: name)
    assert stage.done and dc.is_done(stage_dir) and not litter.exists()
    assert [(stage_dir / n).read_text() for n in names] == names


def test_shared_stage_expect_count_or_names(tmp_path):
    # A count: any three pieces, in subdirectories too, by piece() or atomic_path.
    with dc.done_dir(tmp_path / "count", expect=3) as stage:
        stage.piece("a", lambda: "a")
        stage.piece("sub/b", lambda: "b")
    assert not stage.done
    with dc.done_dir(tmp_path / "count", expect=3) as stage:
        with dc.atomic_path(stage.path / "sub" / "c.npy") as tmp:
            tmp.write_bytes(b"c")
            assert not dc.is_done(tmp_path / "count"), "a temporary file is not a piece"
    assert stage.done and json.loads((tmp_path / "count" / "DONE").read_text())["expect"] == 3
    # Names: only the named pieces count, however the name is spelled.
    names = ["x", "sub/y"]
    with dc.done_dir(tmp_path / "names", expect=names) as stage:
        stage.piece("x", lambda: "x")
        stage.piece("other", lambda: "not expected")
        stage.piece("sub/z", lambda: "not expected")
    assert not stage.done
    with dc.done_dir(tmp_path / "names", expect=iter(["./x", "sub//y"])) as stage:
        stage.piece("sub/y", lambda: "y")
    assert stage.done and json.loads((tmp_path / "names" / "DONE").read_text())["expect"] == 2
    # The stage's own files (lock, recorded version, marker) are no pieces.
    with dc.done_dir(tmp_path / "versioned", expect=2, version=1) as stage:
        stage.piece("a", lambda: "a")
    assert not stage.done and (tmp_path / "versioned" / ".donecache.version").exists()
    # Nothing expected: the first builder to leave marks it.
    with dc.done_dir(tmp_path / "empty", expect=[]) as stage:
        pass
    assert stage.done and dc.is_done(tmp_path / "empty")


def test_shared_stage_piece_whose_temporary_file_the_finisher_swept(tmp_path, monkeypatch):
    # Two builders make the same piece; the other renames its copy first and
    # completes the stage, leaving this live builder's temporary file alone.
    real_replace = dc._replace
    raced: list[str] = []

    def replace(src: str, dst: str) -> None:
        if not raced:
            raced.append(src)
            with dc.done_dir(tmp_path / "s", expect=["a"]) as other:
                other.piece("a", lambda: "theirs")
            assert other.done and os.path.exists(src), "a live writer's temporary file is left to it"
        real_replace(src, dst)

    monkeypatch.setattr(dc, "_replace", replace)
    with dc.done_dir(tmp_path / "s", expect=["a"]) as stage:
        assert stage.piece("a", lambda: "mine") == stage.path / "a"
        with pytest.raises(FileNotFoundError):  # A missing piece's vanished file is still an error.
            monkeypatch.setattr(dc, "_replace", lambda src, dst: (os.unlink(src), real_replace(src, dst)))
            stage.piece("b", lambda: "b")
    assert (tmp_path / "s" / "a").read_text() == "mine" and stage.done
    assert sorted(os.listdir(tmp_path / "s")) == [".donecache.lock", "DONE", "a"]


@posix_only
def test_shared_stage_finisher_leaves_live_writers_temporary_files(tmp_path):
    # A builder on this host and one on "another host" (a UTS namespace with its
    # own hostname, same filesystem) each hold an atomic_path() open in the stage
    # while the stage completes; then the other host's writer is killed.
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-u", "true"]).returncode != 0:
        pytest.skip("unshare -u (a UTS namespace) is not allowed here")
    stage_dir, go = tmp_path / "s", tmp_path / "go"
    writer = """
        import os, time
        with dc.done_dir(sys.argv[1], expect=["a"]) as stage:
            with dc.atomic_path(stage.path / f"extra-{sys.argv[2]}") as tmp:
                tmp.write_text("partial")
                print(os.path.basename(tmp), flush=True)
                while not os.path.exists(sys.argv[3]):
                    time.sleep(0.01)
                tmp.write_text("whole")
        print("ready", flush=True)
    """
    here = child(writer, str(stage_dir), "here", str(go), background=True)
    prelude = f"import importlib, sys\ndc = importlib.import_module({MODULE!r})\n"
    there = subprocess.Popen(
        ["unshare", "-u", "sh", "-c", 'hostname other-host && exec "$0" "$@"', sys.executable, "-c",
         prelude + textwrap.dedent(writer), str(stage_dir), "there", str(tmp_path / "never")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(IMPORT_ROOT)},
    )
    temps = [stage_dir / proc.stdout.readline().strip() for proc in (here, there)]  # type: ignore[union-attr]
    with dc.done_dir(stage_dir, expect=["a"]) as stage:
        stage.piece("a", lambda: "a")
    assert stage.done and all(temp.exists() for temp in temps), "the finisher left both live writers' files"
    go.touch()
    wait_for_line(here, "ready")  # type: ignore[arg-type]
    assert (stage_dir / "extra-here").read_text() == "whole"
    there.kill()
    there.wait()
    assert temps[1].exists()
    dc.mark_not_done(stage_dir)
    with dc.done_dir(stage_dir, expect=["a"]) as stage:
        pass
    assert temps[1].exists(), "another host's writer cannot be seen to be gone: its file is left until it is old"
    os.utime(temps[1], (time.time() - 7200, time.time() - 7200))
    dc.mark_not_done(stage_dir)
    with dc.done_dir(stage_dir, expect=["a"]) as stage:
        pass
    assert stage.done and not temps[1].exists()


def test_shared_stage_a_failing_builder_writes_no_marker(tmp_path):
    with pytest.raises(Boom):
        with dc.done_dir(tmp_path / "s", expect=1) as stage:
            stage.piece("a", lambda: "a")
            raise Boom()
    assert not dc.is_done(tmp_path / "s") and (tmp_path / "s" / "a").exists()


def test_shared_stage_threads_fill_it_at_once(tmp_path):
    names = [f"{i}" for i in range(8)]
    inside = threading.Barrier(4, timeout=10)  # Would time out if entering held the lock.
    done: list[bool] = []

    def build(n: int) -> None:
        with dc.done_dir(tmp_path / "s", expect=names) as stage:
            inside.wait()
            for name in names[n::4]:
                stage.piece(name, lambda: name)
        done.append(stage.done)

    in_threads(build, 4)
    assert done.count(True) >= 1 and dc.is_done(tmp_path / "s")


@pytest.mark.parametrize(
    "expect,error,message",
    [
        (-1, ValueError, "negative"),
        (True, TypeError, "count of pieces or an iterable"),
        (2.0, TypeError, "not float"),
        ("a.txt", TypeError, r"expect=\[name\]"),
        (Path("a.txt"), TypeError, r"expect=\[name\]"),
        (["../a"], ValueError, "bad name.*relative path inside the stage"),
        (["/abs"], ValueError, "bad name"),
        (["DONE"], ValueError, "bad name.*marker"),
        ([".donecache.lock"], ValueError, "bad name"),
        ([dc._TEMP_PREFIX + "0" * 16 + "~a"], ValueError, "bad name"),
        ([3], TypeError, "holds 3, not a piece name"),
        ([b"a"], TypeError, "holds b.a., not a piece name"),
        (["a", "./a"], ValueError, "names the piece 'a' twice"),
    ],
)
def test_shared_stage_bad_expect(tmp_path, expect, error, message):
    with pytest.raises(error, match=message):
        dc.done_dir(tmp_path / "s", expect=expect)
    assert not (tmp_path / "s").exists(), "nothing was created for a refused stage"


def test_shared_stage_refuses_fresh(tmp_path):
    with pytest.raises(ValueError, match="fresh=True cannot be combined with expect=") as caught:
        dc.done_dir(tmp_path / "s", expect=2, fresh=True)
    assert str(tmp_path / "s") in str(caught.value)


# -- shared filesystems: NFS lookup caches and ESTALE ------------------------------


def stale_once(
    monkeypatch, module, name: str, applies: Callable[..., bool] = lambda *a, **k: True, times: int = 1
) -> list[str]:
    """Make module.name raise ESTALE the first ``times`` times that ``applies`` accepts its arguments,
    as NFS does when another host replaced the file; returns the log of calls that failed."""
    real = getattr(module, name)
    failed: list[str] = []

    def flaky(*args, **kwargs):
        if len(failed) < times and applies(*args, **kwargs):
            failed.append(name)
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, flaky)
    return failed


def test_is_done_lists_the_directory_before_answering_not_done(tmp_path, monkeypatch):
    with dc.done_dir(tmp_path / "s", version=2):
        pass
    marker = str(tmp_path / "s" / "DONE")
    listed: list[str] = []
    cache = {"stale": True}
    real_stat, real_open, real_scandir = os.stat, os.open, os.scandir

    # An NFS client that cached "no such file" for the marker's name, until it
    # reads the directory again.
    def cached(real):
        def call(path, *args, **kwargs):
            if os.fspath(path) == marker and cache["stale"]:
                raise FileNotFoundError(errno.ENOENT, "cached negative lookup", marker)
            return real(path, *args, **kwargs)

        return call

    def scandir(path="."):
        listed.append(os.fspath(path))
        cache["stale"] = False
        return real_scandir(path)

    monkeypatch.setattr(os, "stat", cached(real_stat))
    monkeypatch.setattr(os, "open", cached(real_open))
    monkeypatch.setattr(os, "scandir", scandir)
    assert dc.is_done(tmp_path / "s") and listed == [str(tmp_path / "s")]
    listed.clear()
    cache["stale"] = True
    assert dc.is_done(tmp_path / "s", version=2) and listed == [str(tmp_path / "s")]
    listed.clear()
    assert dc.is_done(tmp_path / "s") and dc.is_done(tmp_path / "s", version=2)
    assert listed == [], "a marker that is seen at once costs no listing"
    assert not dc.is_done(tmp_path / "s", version=3) and not dc.is_done(tmp_path / "nothing")


@pytest.mark.parametrize("version", [None, 1], ids=["stat", "read"])
def test_is_done_retries_estale(tmp_path, monkeypatch, version):
    with dc.done_dir(tmp_path / "s", version=version):
        pass
    marker = str(tmp_path / "s" / "DONE")
    failed = stale_once(monkeypatch, os, "stat" if version is None else "read")
    assert dc.is_done(tmp_path / "s", version=version)
    assert failed, "the ESTALE was raised and retried"
    assert dc._stage_status(str(tmp_path / "s"), version=version, marker="DONE").state == "done"
    assert marker


def test_estale_that_persists_is_raised(tmp_path, monkeypatch):
    (tmp_path / "DONE").write_text("")

    def always(*args, **kwargs):
        raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))

    monkeypatch.setattr(os, "stat", always)
    monkeypatch.setattr(dc, "_delays", lambda: iter([0.0] * 10))
    with pytest.raises(OSError) as caught:
        dc.is_done(tmp_path)
    assert caught.value.errno == errno.ESTALE


def test_stage_entry_and_listing_retry_estale(tmp_path, monkeypatch):
    lock_file = str(tmp_path / "s" / ".donecache.lock")
    failed = stale_once(monkeypatch, os, "open", lambda path, *a, **k: os.fspath(path).endswith(".donecache.lock"))
    with dc.done_dir(tmp_path / "s", expect=["a"]) as stage:
        stage.piece("a", lambda: "a")
        listing_failed = stale_once(monkeypatch, os, "scandir", lambda path=".": os.fspath(path) == str(stage.path))
    assert failed == ["open"] and listing_failed == ["scandir"]
    assert stage.done and os.path.exists(lock_file)


def test_counting_pieces_retries_estale(tmp_path, monkeypatch):
    sub = str(tmp_path / "s" / "sub")
    with dc.done_dir(tmp_path / "s", expect=["sub/a"]) as stage:
        stage.piece("sub/a", lambda: "a")
        failed = stale_once(monkeypatch, os, "scandir", lambda path=".": os.fspath(path) == sub)
    assert failed == ["scandir"] and stage.done


def test_store_listing_retries_estale(tmp_path, monkeypatch):
    with dc.open(tmp_path / "c") as db:
        db["k"] = 1
        failed = stale_once(monkeypatch, os, "read")
        assert dict(db.items()) == {"k": 1} and failed == ["read"]


def test_entry_reads_retry_estale(tmp_path, monkeypatch, calls):
    @dc.memoize(tmp_path)
    def f(x):
        calls.append(x)
        return x * 2

    assert f(21) == 42
    dc._recent.clear()  # Else the hit is served in process (issue 20), with no read to fail.
    # Twice: a miss is read again under the key's lock before computing.
    failed = stale_once(monkeypatch, os, "read", times=2)
    assert f(21) == 42 and calls == [21], "an ESTALE read is retried, not taken for a miss"
    assert failed == ["read", "read"]


# -- Attack 2 (issue 10 item 2, failed before its fix): forked children must not keep a stage locked


ORPHAN_MAKER = """
    import multiprocessing, os, time
    with dc.done_dir(sys.argv[1]) as stage:
        if sys.argv[2] == "os.fork":
            pid = os.fork()
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            orphans = [pid]
        else:  # A Manager's server process outlives its parent.
            manager = multiprocessing.get_context("fork").Manager()
            shared = manager.dict()
            orphans = [p.pid for p in multiprocessing.active_children()]
        print(*orphans, flush=True)
        time.sleep(60)
"""


def kill_quietly(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@linux_only
@pytest.mark.parametrize("how", ["os.fork", "fork manager"])
def test_orphans_forked_inside_a_stage_do_not_keep_it_locked(tmp_path, how):
    """Issue 10, item 2: a child forked inside `with done_dir(...)` (os.fork, or a multiprocessing
    Manager started with fork) inherited the stage's flock; once the parent was SIGKILLed, the
    orphan kept the stage locked and every rerun waited forever. The orphans are killed at the end."""
    stage_dir = tmp_path / "s"
    holder = child(ORPHAN_MAKER, str(stage_dir), how, background=True)
    assert holder.stdout is not None
    orphans: list[int] = []
    try:
        orphans = [int(pid) for pid in holder.stdout.readline().split()]
        assert orphans, "the holder forked no child"
        holder.kill()
        holder.wait()
        assert all(alive(pid) for pid in orphans)
        started = time.monotonic()
        with dc.done_dir(stage_dir, timeout=5) as stage:
            assert not stage.done
        assert time.monotonic() - started < 2
        assert dc.is_done(stage_dir)
    finally:
        holder.kill()
        holder.wait()
        kill_quietly(orphans)


# -- Attack 11 (issue 10 item 11, failed before its fix): read-only directories and filesystems


@pytest.fixture
def ro_mount(tmp_path):
    """A new tmpfs at tmp_path/"mnt", and a function that remounts it read-only; skips if mounting is not permitted."""
    mount = shutil.which("mount")
    if sys.platform != "linux" or not IS_ROOT or mount is None:
        pytest.skip("needs root and mount(8) on Linux")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    made = subprocess.run([mount, "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")

    def make_read_only() -> None:
        subprocess.run([mount, "-o", "remount,ro", str(mnt)], check=True, capture_output=True)

    try:
        yield mnt, make_read_only
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


ENTER_STAGE = """
    try:
        with dc.done_dir(sys.argv[1], version="v1") as stage:
            print("done" if stage.done else "not done")
    except OSError as exc:
        print("ERROR", exc)
    print(dc.is_done(sys.argv[1], version="v1"))
"""


@posix_only
@pytest.mark.parametrize("how", ["permissions", "read-only mount"])
def test_finished_stage_on_read_only_storage_is_entered_as_done(tmp_path, read_only, request, how):
    """Issue 10, item 11: done_dir on a finished stage in a read-only directory or filesystem raised
    "cannot create or lock the stage directory" although is_done was True. It must enter, with
    stage.done True and no error: there is nothing to build, so nothing to lock."""
    if how == "permissions":
        stage_dir = tmp_path / "s"
    else:
        mnt, make_read_only = request.getfixturevalue("ro_mount")
        stage_dir = mnt / "s"
    with dc.done_dir(stage_dir, version="v1") as stage:
        stage.piece("data", lambda: "x")
    if how == "permissions":
        for path in stage_dir.iterdir():
            os.chmod(path, 0o444)  # As another user's files are to us: readable, not writable.
        read_only(stage_dir)
    else:
        make_read_only()
    proc = child(ENTER_STAGE, str(stage_dir), unprivileged=how == "permissions")
    assert proc.stdout.splitlines() == ["done", "True"]


BARE_MEMOIZE = """
    import warnings

    @dc.memoize
    def double(x):
        return 2 * x

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            print([double(1), double(2), double(1), double(3)])
        except OSError as exc:
            print("ERROR", exc)
    for w in caught:
        print("WARNING", w.category.__name__, w.message)
"""


@posix_only
@pytest.mark.parametrize("how", ["permissions", "read-only mount"])
def test_bare_memoize_in_a_read_only_directory_computes_and_warns_once(tmp_path, read_only, request, monkeypatch, how):
    """Issue 10, item 11: bare @memoize (the store .donecache in the working directory) raised on
    every call when the working directory was read-only. It must compute and return the results,
    with one DonecacheWarning, not one per call."""
    monkeypatch.delenv("DONECACHE_DIR", raising=False)
    if how == "permissions":
        work = tmp_path / "work"
        work.mkdir()
        read_only(work)
    else:
        work, make_read_only = request.getfixturevalue("ro_mount")
        make_read_only()
    proc = child(BARE_MEMOIZE, cwd=work, unprivileged=how == "permissions")
    lines = proc.stdout.splitlines()
    assert lines[0] == "[2, 4, 2, 6]", proc.stdout
    warned = lines[1:]
    assert len(warned) == 1 and warned[0].startswith("WARNING DonecacheWarning"), warned
    assert os.listdir(work) == []


# ---------------------------------------------------------------------------
# The entry format and the store (donecache.open)
# ---------------------------------------------------------------------------


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
            assert dc._load_entry(str(path), None, dc._VERIFY)[0] is not None
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
    for path in [tmp_path / "c", *(p for p in (tmp_path / "c").rglob("*") if p.is_dir())]:
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


def test_open_takes_what_shelve_open_takes_and_refuses_a_closed_store(tmp_path):
    with dc.open(filename=os.fsencode(tmp_path / "c"), flag="c") as db:  # shelve's name; bytes.
        db["k"] = 1
        assert db.path == str(tmp_path / "c")
    for use in (len, lambda db: db.clear(), lambda db: db.prune(), lambda db: db["k"], list):
        with pytest.raises(ValueError, match="closed shelf"):
            use(db)
    with dc.open(tmp_path / "c") as db:
        assert db["k"] == 1, "nothing was cleared after close"


def make_gdbm_file(path: Path) -> None:
    path.write_bytes(struct.pack("=l", 0x13579ACF) + bytes(60))  # GNU dbm's magic number; whichdb reads it.


def make_berkeley_db_file(path: Path) -> None:
    path.write_bytes(bytes(12) + struct.pack("<l", 0x061561) + bytes(100))  # A Berkeley DB hash file (ndbm on macOS).


@pytest.mark.parametrize("kind", ["dbm.dumb", "dbm.sqlite3", "dbm.gnu", "Berkeley DB"])
def test_open_beside_a_shelve_database_refuses_and_says_how_to_copy_it(tmp_path, kind):
    import shelve

    legacy = tmp_path / "legacy"
    if kind == "dbm.gnu":
        make_gdbm_file(legacy)
    elif kind == "Berkeley DB":
        make_berkeley_db_file(tmp_path / "legacy.db")
    else:
        module = pytest.importorskip(kind)  # dbm.sqlite3 is new in 3.13.
        with shelve.Shelf(module.open(str(legacy), "c")) as old:  # What shelve.open makes with that module.
            old["answer"] = [42]
            old["other"] = "x"
    before = listing(tmp_path)
    for flag in ("c", "n", "r"):
        with pytest.raises(FileExistsError, match="shelve") as caught:
            dc.open(legacy, flag)
        assert listing(tmp_path) == before, "no store was made, nothing was touched"
    message = str(caught.value)
    assert kind.split()[0] in message and str(legacy) in message
    if kind == "dbm.dumb":
        assert "legacy.dat, legacy.dir" in message
    if kind in ("dbm.dumb", "dbm.sqlite3"):
        # The line the error suggests really copies the shelf.
        exec(message.split("once with: ")[1], {"shelve": shelve, "donecache": dc})
        with dc.open(str(legacy) + ".donecache", "r") as new:
            assert dict(new.items()) == {"answer": [42], "other": "x"}
    with dc.open(tmp_path / "elsewhere") as db:  # Unrelated names are not refused.
        db["k"] = 1
    (tmp_path / "notes.dat").write_text("not a database")
    dc.open(tmp_path / "notes").close()


# issue 21
@pytest.mark.parametrize("url", ["s3://bucket/cache", "gs://b/c", "http://example.com/c", "HTTPS://x"])
def test_url_paths_are_refused(tmp_path, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="is a URL; donecache stores entries in a local"):
        dc.memoize(url)
    with pytest.raises(ValueError, match="is a URL"):
        dc.open(url)
    assert listing(tmp_path) == [], "no local folder named after the scheme"
    assert dc._store_path("C:\\cache") == "C:\\cache", "a Windows drive is no URL"


# issue 21
def test_a_directory_of_other_files_is_refused_not_adopted(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds other files and is not a donecache store"):
        dc.open(tmp_path)
    f = dc.memoize(tmp_path)(abs)
    with pytest.warns(dc.DonecacheWarning, match="not cached: .*holds other files"):
        assert f(-1) == 1
    assert listing(tmp_path) == ["notes.txt"], "nothing written or labelled"
    with dc.open(tmp_path / "store") as db:  # A store (labelled) keeps opening, whatever it holds.
        db["k"] = 1
    (tmp_path / "store" / "stray.txt").write_text("x")
    with dc.open(tmp_path / "store") as db:
        assert db["k"] == 1


# issue 18 item 11 (failed on 0.2.0, 3cf1caa, unless the docstring says otherwise)
def test_verify_on_a_closed_store_raises_like_other_operations(tmp_path):
    """Item 11: Store.verify() worked on a closed store, unlike every other operation."""
    db = dc.open(tmp_path / "c")
    db["k"] = 1
    db.close()
    for operation in (lambda: db["k"], db.prune, db.verify):
        with pytest.raises(ValueError, match="closed"):
            operation()


# -- CPython's own shelve tests, run against donecache.open ---------------------
#
# Lib/test/test_shelve.py (and mapping_tests) come from the interpreter's test
# package, imported, never copied. While one of them runs, the `shelve` global
# of CPython's test module is a stand-in whose open() is dc.open. Only CPython's
# modules get names here, not its classes: pytest collects every TestCase
# subclass it finds at module level, and would run shelve's own tests on shelve.
#
# Kept: the mapping protocol on a shelf from TestShelveFileBase (shelve.open)
# for every pickle protocol, with and without writeback; from TestCase, the
# tests that call shelve.open, and test_close, test_with and
# test_default_protocol, which build shelve.Shelf over a dict that they never
# read again (the stand-in's Shelf opens a store instead). Left out: the tests
# that look into the dict under a Shelf, which test shelve itself.

try:
    from test import mapping_tests as cpython_mapping_tests
    from test import test_shelve as cpython_shelve_tests

    # The layout of 3.9-3.13; a later one skips rather than breaks the import.
    cpython_shelve_tests.TestCase, cpython_shelve_tests.TestShelveFileBase
    cpython_mapping_tests.BasicTestMappingProtocol
    NO_CPYTHON_SHELVE_TESTS = ""
except (ImportError, AttributeError) as exc:  # Python built without its test package.
    NO_CPYTHON_SHELVE_TESTS = f"this Python has no usable test.test_shelve ({exc!r})"


class OnDonecache:
    """Mixin: one of CPython's shelve tests, in a scratch directory, with shelve.open = dc.open."""

    def setUp(self):
        scratch = tempfile.mkdtemp(prefix="dc-cpython-shelve-")
        self.addCleanup(shutil.rmtree, scratch, True)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(scratch)  # CPython's tests name their files relative to the working directory.
        numbers = itertools.count()

        def store_not_dict(_dict, protocol=None, writeback=False):
            return dc.open(os.path.join(scratch, f"shelf{next(numbers)}"), protocol=protocol, writeback=writeback)

        self.addCleanup(setattr, cpython_shelve_tests, "shelve", cpython_shelve_tests.shelve)
        cpython_shelve_tests.shelve = types.SimpleNamespace(open=dc.open, Shelf=store_not_dict)
        super().setUp()


if NO_CPYTHON_SHELVE_TESTS:

    @pytest.mark.skip(reason=NO_CPYTHON_SHELVE_TESTS)
    def test_cpython_shelve_tests():
        pass

else:

    class TestCPythonShelveOnDonecache(OnDonecache, cpython_shelve_tests.TestCase):
        pass

    for _name in dir(cpython_shelve_tests.TestCase):  # By name, so later CPythons' new file tests join.
        if _name.startswith("test") and not (
            _name == "test_open_template"
            or _name.endswith("_file_shelf")
            or _name in ("test_close", "test_with", "test_default_protocol")
        ):
            setattr(TestCPythonShelveOnDonecache, _name, None)  # None: no test to unittest or pytest.

    for _protocol, _writeback in itertools.product(range(pickle.HIGHEST_PROTOCOL + 1), (False, True)):
        _name = f"TestCPythonMappingProtocol{_protocol}{'Writeback' if _writeback else ''}OnDonecache"
        globals()[_name] = type(
            _name,
            (OnDonecache, cpython_shelve_tests.TestShelveFileBase, cpython_mapping_tests.BasicTestMappingProtocol),
            {
                "_args": {"protocol": _protocol, "writeback": _writeback},
                # Their setUp makes this dbm's default; donecache uses no dbm, so leave dbm as it is.
                "dbm_mod": property(lambda self: dbm._defaultmod),
                "__module__": __name__,
            },
        )
    del _name, _protocol, _writeback


# -- big values: the entry format, buffers, mapping, bounded reads -------------


def big_buffer(size: int, fill: int = 7) -> object:
    """A value pickle keeps out of band (as NumPy's data is), with no NumPy needed."""
    import pickle

    return pickle.PickleBuffer(bytearray([fill]) * size)


def test_big_buffers_go_out_of_band_aligned_and_come_back_writable(tmp_path):
    with dc.open(tmp_path / "c") as db:
        db["big"] = {"meta": "x" * 10, "data": big_buffer(300_000)}
        db["small"] = big_buffer(1000)  # Below the threshold: inside the stream.
        big = db["big"]
        assert big["meta"] == "x" * 10 and bytes(big["data"]) == b"\7" * 300_000
        big["data"][0] = 1  # One writable allocation, not a view of anything shared.
        assert db["big"]["data"][0] == 7 and bytes(db["small"]) == b"\7" * 1000
    path = next(p for p in entry_files(tmp_path / "c") if p.stat().st_size > 300_000)
    raw = path.read_bytes()
    fields = dc._ENTRY_HEADER.unpack_from(raw)
    assert fields[0] == b"dcE2" and fields[7] == 1  # One out-of-band buffer...
    start = raw.index(b"\7" * 1000)
    assert start % 64 == 0 and raw[start : start + 300_000] == b"\7" * 300_000  # ...aligned for arrays.


@posix_only
def test_a_big_value_read_is_private_memory_that_a_forked_child_cannot_change(tmp_path):
    with dc.open(tmp_path / "c") as db:
        db["big"] = big_buffer(300_000)
        data = db["big"]
    pid = os.fork()
    if pid == 0:  # The child writes to its copy and leaves at once.
        data[0] = 1
        os._exit(0 if data[0] == 1 else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert data[0] == 7, "the child's write reached the parent: the buffer was shared memory"


@linux_only
def test_a_big_value_is_read_where_huge_pages_cannot_be_advised(tmp_path, monkeypatch):
    import mmap

    monkeypatch.setattr(mmap, "MADV_HUGEPAGE", 0x7FFF)  # An advice no kernel knows: madvise(2) says EINVAL.
    with dc.open(tmp_path / "c") as db:
        db["big"] = big_buffer(300_000)
        assert bytes(db["big"]) == b"\7" * 300_000


def test_truncated_or_padded_big_entry_reads_as_missing(tmp_path):
    for damage in (lambda b: b[:-1], lambda b: b + b"\0", lambda b: b[:-100_000], lambda b: b[:4096]):
        with dc.open(tmp_path / "c", "n") as db:
            db["big"] = big_buffer(200_000)
            (path,) = entry_files(tmp_path / "c")
            path.write_bytes(damage(path.read_bytes()))
            assert "big" not in db and db.get("big") is None
            assert db.prune() == 1 and not path.exists()


def flip_inside_buffer(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # In the middle of the big buffer.
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_big_buffer_is_found_by_verify_and_removed_by_prune(tmp_path):
    with dc.open(tmp_path / "c") as db:
        db["big"] = big_buffer(500_000)
        db["fine"] = big_buffer(500_000, 3)
    path = next(p for p in entry_files(tmp_path / "c") if p.read_bytes()[-40_000] == 7)
    flip_inside_buffer(path)
    with dc.open(tmp_path / "c") as db:
        # The hit path checks structure, not each byte of big buffers: the flip gets through.
        assert bytes(db["big"]).count(b"\7") == 500_000 - 1
        assert db.verify() == [str(path)]
    proc = cli("verify", str(tmp_path / "c"))
    assert proc.returncode == 1 and f"damaged: {path}" in proc.stdout
    assert json.loads(cli("verify", str(tmp_path / "c"), "--json").stdout)["damaged"] == [str(path)]
    with dc.open(tmp_path / "c") as db:
        assert db.prune() == 1 and not path.exists() and sorted(db) == ["fine"]
        assert db.verify() == [] and bytes(db["fine"]) == b"\3" * 500_000
    assert cli("verify", str(tmp_path / "c")).returncode == 0


def test_a_buffer_checksummed_by_two_threads_has_the_crc_of_its_bytes(tmp_path):
    """A big buffer's CRC-32 is computed from the front by a helper thread and from the back by the writer, then
    joined: the table must hold the CRC of the whole buffer, and a flipped byte anywhere must be found."""
    data = os.urandom(9 << 20)  # Random: a wrong CRC cannot pass by chance. Nine pieces of the helper's stride.
    for split in (0, 1, 12345, 1 << 20, len(data) - 1, len(data)):
        front, back = data[:split], data[split:]
        assert dc._crc_join(zlib_crc32(front), zlib_crc32(back), len(back)) == zlib_crc32(data), split
    assert dc._TwoHandedCrc(memoryview(data)).result() == zlib_crc32(data)  # At once: both hands take a part.
    late = dc._TwoHandedCrc(memoryview(data[: 3 << 20]))
    deadline = time.monotonic() + 30
    while late._done.locked() and time.monotonic() < deadline:  # Until the helper has done it all.
        time.sleep(0.01)
    assert late.result() == zlib_crc32(data[: 3 << 20])
    import pickle

    with dc.open(tmp_path / "c") as db:
        db["big"] = pickle.PickleBuffer(bytearray(data))
        assert db.verify() == []
    (path,) = entry_files(tmp_path / "c")
    raw = path.read_bytes()
    start = raw.index(data[:4096])
    size, crc = dc._BUFFER_ROW.unpack_from(raw, len(raw) - 4 - dc._BUFFER_ROW.size)
    assert (size, crc) == (len(data), zlib_crc32(data))
    for where in (start, start + len(data) // 2, start + len(data) - 1):  # Against the table's CRC, anywhere.
        damaged = bytearray(raw)
        damaged[where] ^= 0x01
        path.write_bytes(bytes(damaged))
        with dc.open(tmp_path / "c", "r") as db:
            assert db.verify() == [str(path)], where
    path.write_bytes(raw)
    with dc.open(tmp_path / "c") as db:
        assert db.verify() == [] and bytes(db["big"]) == data
        db["small"] = pickle.PickleBuffer(bytearray(data[:100_000]))  # Checksummed by the writer alone.
    raw = next(p for p in entry_files(tmp_path / "c") if p != path).read_bytes()
    assert dc._BUFFER_ROW.unpack_from(raw, len(raw) - 4 - dc._BUFFER_ROW.size) == (100_000, zlib_crc32(data[:100_000]))


@pytest.mark.parametrize("error, message", [(MemoryError, "CRC-32 of a 600000-byte buffer could not be computed"),
                                            (ValueError, "the helper's own error")])
def test_a_checksum_that_fails_in_its_helper_thread_fails_the_write_and_keeps_the_old_entry(tmp_path, monkeypatch,
                                                                                             error, message):
    import threading
    import zlib

    with dc.open(tmp_path / "c") as db:
        db["big"] = big_buffer(600_000)

    class HelperFails:  # zlib as the module sees it, whose crc32 fails in any thread but the main one.
        def __getattr__(self, name: str) -> object:
            return getattr(zlib, name)

        def crc32(self, data: bytes, value: int = 0) -> int:
            if threading.current_thread() is not threading.main_thread():
                raise error() if error is MemoryError else error(message)
            return zlib.crc32(data, value)

    monkeypatch.setattr(dc, "zlib", HelperFails())
    with dc.open(tmp_path / "c") as db:
        with pytest.raises(error, match=message):
            db["big"] = big_buffer(600_000, 9)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "c").rglob("*") if p.name.startswith(dc._TEMP_PREFIX)] == []
    with dc.open(tmp_path / "c") as db:
        assert bytes(db["big"]) == b"\7" * 600_000 and db.verify() == []


def test_a_write_that_fails_mid_buffer_stops_the_checksum_helper(monkeypatch):
    made = []

    class Watched(dc._TwoHandedCrc):
        def __init__(self, view: memoryview) -> None:
            super().__init__(view)
            made.append(self)

    monkeypatch.setattr(dc, "_TwoHandedCrc", Watched)
    encoded = dc._encode_entry(b"k", big_buffer(64 << 20))
    chunks = encoded.chunks()
    while len(made) == 0:
        next(chunks)  # The head, the stream, the padding: then the first piece of the buffer starts the helper.
    chunks.close()  # As _write_bytes's failed write(2) leaves it.
    (hands,) = made
    assert hands._done.acquire(timeout=30), "the helper never ended"
    assert hands._stop < 64 << 20, "the helper went on to the end of the buffer after the write failed"


def test_lengths_are_64_bit(tmp_path):
    """A 5 GiB buffer cannot be written in a test, so its entry is made sparse: a
    real head and stream, a hole of 5 GiB, and a table that declares it."""
    size = 5 << 30
    encoded = dc._encode_entry(b"huge", big_buffer(1 << 16))
    head, stream, *_rest = encoded.chunks()
    start = len(head) + len(stream)
    start += -start % 64
    table = dc._BUFFER_ROW.pack(size, 0)
    table += (zlib_crc32(table)).to_bytes(4, "little")
    path = tmp_path / "huge"
    with open(path, "wb") as f:
        f.write(bytes(head) + stream)
        f.truncate(start + size)
        f.seek(start + size)
        f.write(table)
    entry, st = dc._load_entry(str(path), b"huge", dc._HEAD)
    assert entry is not None and st.st_size == start + size + len(table)
    entry, _st = dc._load_entry(str(path), b"huge", dc._VALUE, mapped=True)
    value = entry.load()
    assert len(value) == size and value[-1] == 0 and value[size // 2] == 0
    with open(path, "r+b") as f:  # One byte short: the table no longer fits.
        f.truncate(st.st_size - 1)
    assert dc._load_entry(str(path), b"huge", dc._HEAD)[0] is None


def zlib_crc32(data: bytes) -> int:
    import zlib

    return zlib.crc32(data)


def test_mapped_hits_survive_replacement_and_never_write_to_the_file(tmp_path):
    with dc.open(tmp_path / "c", mmap=True) as db:
        db["big"] = big_buffer(200_000)
        (path,) = entry_files(tmp_path / "c")
        before = path.read_bytes()
        view = db["big"]
        assert isinstance(view, memoryview) and not view.readonly
        view[:3] = b"abc"  # Copy on write: the change stays in this process.
        assert bytes(view[:4]) == b"abc\7" and path.read_bytes() == before
        assert bytes(db["big"][:3]) == b"\7\7\7"
        db["big"] = big_buffer(200_000, 9)  # Renamed over the mapped file...
        assert bytes(view[3:6]) == b"\7\7\7" and bytes(db["big"][:2]) == b"\t\t"
        del db["big"]  # ...and removed: the mapping stays valid.
        assert view[-1] == 7 and "big" not in db


@posix_only
def test_garbage_and_dev_zero_at_entry_names_read_as_missing_in_bounded_memory(tmp_path):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    script = """
        import os, resource
        root = sys.argv[1]
        @dc.memoize(root)
        def f(x):
            return x
        db = dc.open(root)
        db["k"] = "value"
        f(1)
        entry = dc._load_entry
        shelf_path = db._files.slot(b"k").path
        memo_path = db._files.slot(f._keyed((1,), {}).key, f._folder).path
        real = open(shelf_path, "rb").read()
        limit = 300 << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # An unbounded read fails here.
        cases = {
            "1 GiB of zeros": lambda p: os.truncate(p, 1 << 30),
            "1 GiB, a real head": lambda p: (open(p, "wb").write(real), os.truncate(p, 1 << 30)),
            "1 GiB of garbage": lambda p: (open(p, "wb").write(os.urandom(1 << 20)), os.truncate(p, 1 << 30)),
            "symlink to /dev/zero": lambda p: (os.unlink(p), os.symlink("/dev/zero", p)),
            "FIFO": lambda p: (os.unlink(p), os.mkfifo(p)),
        }
        for name, damage in cases.items():
            for path in (shelf_path, memo_path):
                damage(path)
            assert "k" not in db and db.get("k") is None, name
            assert f(1) == 1 and f.cache_info().hits == 0, name  # Recomputed (and rewritten).
            assert f(1) == 1 and f.cache_info().hits == 1, name
            f.cache_clear()
            assert dc.main(["info", root]) == 0
            assert dc.main(["verify", root]) == 1
            assert db.prune() >= 1, name
            db["k"] = "value"
            f(1)
            print("ok", name)
    """
    proc = child(script, str(tmp_path / "c"))
    assert proc.stdout.count("ok ") == 5


def rchar_script(body: str) -> str:
    return textwrap.dedent(
        """
        def rchar():
            with open("/proc/self/io") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
        """
    ) + textwrap.dedent(body)


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts bytes read with /proc/self/io (Linux)")
def test_one_functions_upkeep_never_reads_anothers_values(tmp_path):
    script = rchar_script(
        """
        import pickle
        root = sys.argv[1]
        @dc.memoize(root)
        def big(i):
            return pickle.PickleBuffer(bytearray(32 << 20))
        @dc.memoize(root)
        def small(i):
            return i
        for i in range(8):  # 256 MiB of another function's values...
            big(i)
        for i in range(20):
            small(i)
        with dc.open(root) as db:
            db["shelf key"] = pickle.PickleBuffer(bytearray(16 << 20))
        import argparse, json  # Importing modules reads files too: not the cache's doing.
        dc.main(["info", root, "--json"])
        for name, call in [
            ("cache_info", lambda: small.cache_info()),
            ("forget", lambda: small.forget(3)),
            ("info", lambda: dc.main(["info", root, "--json"])),
            ("clear --function", lambda: dc.main(["clear", root, "--function", "small"])),
            ("cache_clear", lambda: small.cache_clear()),
        ]:
            before = rchar()
            call()
            print(name, rchar() - before)
        """
    )
    proc = child(script, str(tmp_path / "c"))
    names = ("cache_info", "forget", "info", "clear --function", "cache_clear")
    read = {name: int(line.rpartition(" ")[2]) for line in proc.stdout.splitlines() for name in names if line.startswith(name + " ")}
    assert set(read) == set(names), proc.stdout
    for name, count in read.items():
        assert count < 256 << 10, f"{name} read {count} bytes"  # ...of which at most heads are read.


def write_old_entry(path: Path, key: bytes, value: object, expires: float = 0.0) -> None:
    """An entry in format 1, as donecache 0.1 wrote it."""
    import pickle
    import struct
    import zlib

    data = pickle.dumps(value, protocol=5)
    rest = struct.pack("<ddII", time.time(), expires, len(key), len(data)) + key + data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"dcE1" + struct.pack("<I", zlib.crc32(rest)) + rest)


def test_entries_of_the_first_format_read_as_misses_and_prune_as_damage(tmp_path):
    with dc.open(tmp_path / "c") as db:
        db["new"] = 1
        files = db._files
    old = Path(files.slot(b"old").path)
    write_old_entry(old, b"old", {"still": "here"})  # 0.3 no longer reads format 1: it is computed again.
    with dc.open(tmp_path / "c") as db:
        assert "old" not in db and db.get("old") is None and sorted(db) == ["new"]
        assert db.verify() == [str(old)]
        assert db.prune() == 1 and sorted(db) == ["new"] and not old.exists()
        db["old"] = 2
        assert db["old"] == 2


def test_memoize_entries_of_the_first_layout_are_recomputed_once_and_pruned_as_stale(tmp_path):
    script = """
        @dc.memoize(sys.argv[1])
        def f(x):
            print("computed", x)
            return x
        f(1)
    """
    child(script, str(tmp_path))
    (path,) = entry_files(tmp_path)
    key = dc._load_entry(str(path), None, dc._HEAD)[0].key
    old = tmp_path / path.name[:2] / path.name  # Where donecache 0.1 filed it.
    old.parent.mkdir()
    old.write_bytes(b"".join(dc._encode_entry(key, "old").chunks()))  # In today's format: read, but not used.
    path.unlink()
    assert child(script, str(tmp_path)).stdout == "computed 1\n"  # The old entry is not used.
    report = json.loads(cli("info", str(tmp_path), "--json").stdout)
    assert report["functions"] == {"__main__:f": 2} and report["stale"] == {"__main__:f": 1}
    assert cli("prune", str(tmp_path)).returncode == 0 and old.exists()  # Not damage...
    assert cli("prune", str(tmp_path), "--stale").returncode == 0 and not old.exists()  # ...but stale.
    assert child(script, str(tmp_path)).stdout == ""


def test_info_shows_bytes_on_disk_beside_logical_bytes(tmp_path):
    with dc.open(tmp_path / "c") as db:
        for i in range(10):
            db[str(i)] = i
    report = json.loads(cli("info", str(tmp_path / "c"), "--json").stdout)
    files = entry_files(tmp_path / "c")
    assert report["bytes"] == sum(p.stat().st_size for p in files)
    assert report["disk_bytes"] == sum(p.stat().st_blocks * 512 for p in files) >= report["bytes"]
    assert report["function_bytes"] == {"(donecache.open keys)": {"bytes": report["bytes"], "disk_bytes": report["disk_bytes"]}}
    assert "KiB on disk)" in cli("info", str(tmp_path / "c")).stdout


def test_datetime_columns_travel_out_of_band_and_round_trip(tmp_path):
    """Issue 20: NumPy keeps datetime64 and timedelta64 arrays inside the pickle stream; a
    pandas frame's datetime block was read, checksummed and copied twice on every hit."""
    np = pytest.importorskip("numpy")
    pd = pytest.importorskip("pandas")
    n = 100_000
    frame = pd.DataFrame(
        {"t": pd.date_range("2020-01-01", periods=n, freq="s"), "x": np.arange(n, dtype="f8"),
         "d": pd.to_timedelta(np.arange(n), "s")}
    )
    stamps = np.arange(n).astype("M8[ns]")
    with dc.open(tmp_path / "c") as db:
        db["frame"], db["stamps"], db["strided"] = frame, stamps, stamps[::2]
        assert db["frame"].equals(frame) and list(db["frame"].dtypes) == list(frame.dtypes)
        back = db["stamps"]
        assert back.dtype == stamps.dtype and (back == stamps).all() and back.flags.writeable
        assert (db["strided"] == stamps[::2]).all()
        files = db._files
    for key, buffers in (("frame", 3), ("stamps", 1)):
        entry, _st = dc._load_entry(files.slot(key.encode()).path)
        assert entry is not None and len(entry.buffers) == buffers, f"{key}: every big column out of band"
        assert len(entry.stream) < 4096


def test_numpy_and_pandas_results_round_trip_read_and_mapped(tmp_path):
    np = pytest.importorskip("numpy")
    pd = pytest.importorskip("pandas")
    script = """
        import numpy as np, pandas as pd
        @dc.memoize(sys.argv[1], mmap=sys.argv[2] == "mmap")
        def make(n):
            print("computed", n)
            frame = pd.DataFrame({"a": np.arange(n, dtype="f8"), "b": np.arange(n) % 7, "s": ["x"] * n})
            return np.arange(n, dtype="f8").reshape(-1, 10), np.asfortranarray(np.ones((n // 10, 10))), frame
        array, fortran, frame = make(200_000)
        assert array.flags.writeable and array.flags.aligned and array.ctypes.data % 64 in (0, 16, 32, 48)
        assert float(array.sum()) == float(np.arange(200_000).sum()) and fortran.flags.f_contiguous
        assert list(frame.columns) == ["a", "b", "s"] and frame["a"].iloc[-1] == 199_999 and frame["s"].iloc[5] == "x"
        array[0, 0] = -1
        print("ok")
    """
    for mode in ("read", "mmap", "read"):
        out = child(script, str(tmp_path), mode).stdout
        assert out.endswith("ok\n")
    assert out == "ok\n"  # Computed once; the write to array[0, 0] never reached the file.
    assert cli("verify", str(tmp_path)).returncode == 0


# issue 21
def test_entries_without_metadata_still_read(tmp_path):
    """An entry written by 0.2 (no metadata in its key area) is a hit that records no time."""

    @dc.memoize(tmp_path / "c")
    def f(x):
        return x + 1

    f(1)
    [path] = entry_files(tmp_path / "c")
    entry, _st = dc._load_entry(str(path))
    old = dc._encode_entry(entry.key, 2)
    old.meta = b""
    path.write_bytes(b"".join(old.chunks()))
    assert struct.unpack_from("<I", path.read_bytes(), 48)[0] == 0, "flags 0, as 0.2 wrote them"
    assert f(1) == 2 and f.cache_info()[:2] == (1, 1) and f.cache_info().saved_seconds == 0.0
    short = dc._encode_entry(entry.key, 3)
    short.meta = b"abc"  # A metadata length that no writer makes (under 8 bytes): damage, so a miss.
    path.write_bytes(b"".join(short.chunks()))
    assert f(1) == 2 and f.cache_info()[:2] == (1, 2)


# issue 21
def test_compress_shrinks_the_stream_and_never_the_mapped_buffers(tmp_path):
    text = [f"record {i}: the quick brown fox jumps over the lazy dog" for i in range(20000)]
    sizes = {}
    for codec in (False, "zlib", True, "lzma"):

        @dc.memoize(tmp_path / str(codec), compress=codec)
        def make(n):
            return text[:n]

        assert make(20000) == text
        [path] = entry_files(tmp_path / str(codec))
        sizes[codec] = path.stat().st_size
        make.cache_clear()
        assert make(20000) == text and make(20000) == text and make.cache_info().hits == 1, codec
    assert sizes["zlib"] == sizes[True] and sizes["zlib"] * 5 < sizes[False] and sizes["lzma"] * 5 < sizes[False]
    with dc.open(tmp_path / "s", compress="zlib", mmap=True) as db:
        db["big"] = pickle.PickleBuffer(bytearray(b"a" * 200_000))
        db["small"] = b"b" * 1000
        assert bytes(db["big"]) == b"a" * 200_000 and db["small"] == b"b" * 1000
    blobs = {p.read_bytes() for p in entry_files(tmp_path / "s")}
    assert any(b"a" * 200_000 in blob for blob in blobs), "an out-of-band buffer is written as it is, to be mapped"
    assert not any(b"b" * 1000 in blob for blob in blobs), "the small value's stream is compressed"
    for bad in ("gzip", 1):
        with pytest.raises(ValueError, match="compress must be False, True, 'zlib' or 'lzma'"):
            dc.memoize(tmp_path, compress=bad)


# issue 18 item 11 (failed on 0.2.0, 3cf1caa, unless the docstring says otherwise)
@linux_only
def test_donecache_never_truncates_an_entry_in_place(tmp_path, monkeypatch):
    """Item 11: a mapped hit dies with SIGBUS if its file shrinks under it (mmap(2)), so
    donecache must replace entries, never truncate or rewrite them in place: every write,
    overwrite, clear, prune and sweep is watched for O_TRUNC opens and ftruncate of an
    entry file. (0.2.0 did not either: kept as a guard.)"""
    truncated: list[str] = []
    real_open, real_ftruncate, real_truncate = os.open, os.ftruncate, os.truncate

    def watched_open(path, flags, *args, **kwargs):
        if flags & os.O_TRUNC:
            truncated.append(f"O_TRUNC {path}")
        return real_open(path, flags, *args, **kwargs)

    def watched_ftruncate(fd, length):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if not name.endswith(".lock"):  # A lock file's note of its holder is rewritten in place.
            truncated.append(f"ftruncate {name}")
        return real_ftruncate(fd, length)

    monkeypatch.setattr(os, "open", watched_open)
    monkeypatch.setattr(os, "ftruncate", watched_ftruncate)
    monkeypatch.setattr(os, "truncate", lambda *a: truncated.append(f"truncate {a}") or real_truncate(*a))
    big = bytes(1 << 17)
    with dc.open(tmp_path / "c", mmap=True, max_bytes=1 << 20) as db:
        for round_ in range(12):
            db[f"k{round_ % 5}"] = big
            assert db[f"k{round_ % 5}"] == big
        db.prune()
        del db["k1"]
        db.clear()
    assert truncated == []


# -- links, special files and other users' stores (issue 18 items 1-3) ---------

# issue 18 item 1 (failed on 0.2.0, 3cf1caa, unless the docstring says otherwise)
@posix_only
def test_a_symlink_at_the_store_lock_is_refused(tmp_path):
    """Item 1: the store's .lock was opened through a planted link: a dangling one made
    donecache create its target, an existing one was locked and kept open (the same path
    takes the stage-lock note). A store with max_bytes raises; memoize warns and computes
    without the lock (its policy for a lock it cannot take); neither touches the targets."""
    victim = victim_file(tmp_path)
    nowhere = tmp_path / "made-through-the-link"
    for target, name in ((victim, "a"), (nowhere, "b")):
        cache = tmp_path / name
        with dc.open(cache) as db:
            db["k"] = 0
        (cache / ".lock").symlink_to(target)
        with dc.open(cache, max_bytes=1 << 20) as db, pytest.raises(OSError, match="symbolic link"):
            db["k"] = 1

        @dc.memoize(cache)
        def double(x):
            return 2 * x

        with pytest.warns(dc.DonecacheWarning, match="symbolic link"):
            assert double(21) == 42
    assert untouched(victim) and not os.path.lexists(nowhere)


# issue 18 item 1 (failed on 0.2.0, 3cf1caa, unless the docstring says otherwise)
@posix_only
@pytest.mark.parametrize(
    "where", ["marker", "version file", "CACHEDIR.TAG", "identity", "ledger", "entry"]
)
def test_links_at_files_written_by_rename_are_replaced_and_their_targets_kept(tmp_path, where):
    """Item 1: markers, version files, labels, identity records, ledger records and entries are
    written to a temporary file and renamed over their name, which replaces a planted link by
    a fresh regular file and never writes through it (a label whose name exists, even as a
    link, is left alone). Passed on 0.2.0 too: kept as a guard."""
    victim = victim_file(tmp_path)
    cache = tmp_path / "cache"
    if where in ("marker", "version file"):
        stage = tmp_path / "stage"
        stage.mkdir()
        planted = stage / ("DONE" if where == "marker" else ".donecache.version")
        planted.symlink_to(victim)
        with dc.done_dir(stage, version=2) as s:
            s.piece("a", lambda: "a")
        assert dc.is_done(stage, version=2)
    elif where == "CACHEDIR.TAG":
        cache.mkdir(mode=0o700)
        planted = cache / ".gitignore"
        planted.symlink_to(victim)
        dc.open(cache).close()
        assert (cache / "CACHEDIR.TAG").is_file() and planted.is_symlink(), "a name that exists is left alone"
        planted = cache / "CACHEDIR.TAG"
    elif where in ("identity", "ledger"):
        def half(x):
            if x == 1:
                raise ValueError("one")
            return x / 2

        dc.memoize(cache, version=1)(half).map([1, 2], keep_going=True)
        [planted] = (cache / (".functions" if where == "identity" else ".failures")).rglob("*.*" if where == "ledger" else "*")
        planted.unlink()
        planted.symlink_to(victim)
        dc.memoize(cache, version=2 if where == "identity" else 1)(half).map([1, 2], keep_going=True)
    else:
        with dc.open(cache) as db:
            db["k"] = 1
            [planted] = entry_files(cache)
            planted.unlink()
            planted.symlink_to(victim)
            db["k"] = 2
            assert db["k"] == 2
    assert untouched(victim)
    assert planted.is_file() and not planted.is_symlink() and planted.read_bytes() != VICTIM


class RunsCode:
    """A value whose unpickling runs code: it makes a directory (what an attacker's entry could do)."""

    def __init__(self, proof: str) -> None:
        self.proof = proof

    def __reduce__(self):
        return os.mkdir, (self.proof,)


root_only = pytest.mark.skipif(not IS_ROOT or sys.platform == "win32", reason="chowns to another user: needs root")


# issue 18 item 2 (failed on 0.2.0, 3cf1caa, unless the docstring says otherwise)
@root_only
@pytest.mark.parametrize("how", ["owner", "g+w", "o+w", "link owner"])
def test_a_store_another_user_could_write_is_refused_unless_trusted(tmp_path, how):
    """Item 2: open() and memoize loaded the entries of a store that another user owns, or that
    group or others can write, running whatever code its pickles held."""
    cache, proof = tmp_path / "cache", tmp_path / "code-ran"
    with dc.open(cache) as db:
        db["k"] = RunsCode(str(proof))

    @dc.memoize(cache)
    def answer():
        return 42

    assert answer() == 42 and not proof.exists()
    path = cache
    if how == "owner":
        for folder, _dirs, files in os.walk(cache):
            for name in [folder, *(os.path.join(folder, f) for f in files)]:
                os.lchown(name, 65534, 65534)
    elif how == "link owner":
        path = tmp_path / "link"
        path.symlink_to(cache, target_is_directory=True)
        os.lchown(path, 65534, 65534)
    else:
        os.chmod(cache, 0o720 if how == "g+w" else 0o702)
    for attempt in (lambda: dc.open(path)["k"], lambda: dc.memoize(path)(answer.__wrapped__)()):
        with pytest.raises(PermissionError) as caught:
            attempt()
        message = str(caught.value)
        assert str(path) in message and "trust_shared=True" in message, message
        if how in ("owner", "link owner"):
            assert "uid 65534" in message and "not yours" in message, message
        else:
            assert ("its group" if how == "g+w" else "others") in message and "drwx-" in message, message
    assert not proof.exists(), "nothing was loaded"
    assert dc.memoize(path, trust_shared=True)(answer.__wrapped__)() == 42
    with dc.open(path, trust_shared=True) as db:
        db["k"]
    assert proof.is_dir(), "trusted: the entry was loaded, and its code ran"
    assert cli("info", str(path)).returncode == 0, "the command line loads no value: it needs no trust"


# issue 18 item 2 (failed on 0.2.0, 3cf1caa, unless the docstring says otherwise)
@root_only
def test_a_fresh_store_is_trusted_whatever_the_umask(tmp_path):
    """Item 2: a store that donecache creates passes its own check (0700, the user's)."""
    proc = child(
        """
        import os
        os.umask(0)
        with dc.open(sys.argv[1] + "/a/b/cache") as db:
            db["k"] = 1
        with dc.open(sys.argv[1] + "/a/b/cache") as db:
            print(db["k"])
        """,
        str(tmp_path),
    )
    assert proc.stdout.strip() == "1"


TREE_OF_A_STORE = """
import os
os.umask(int(sys.argv[2], 8))
root = sys.argv[1] + "/new/parent/cache"

def half(x):
    if x == 3:
        raise ValueError("three")
    return x / 2

with dc.open(root, max_bytes=1 << 30) as db:
    db["k"] = 1
dc.memoize(root, max_bytes=1 << 30)(half).map(range(8), keep_going=True)
for folder, _dirs, _files in os.walk(sys.argv[1]):
    print(folder, oct(os.stat(folder).st_mode & 0o7777))
"""


# issue 18 item 3 (failed on 0.2.0, 3cf1caa, unless the docstring says otherwise)
@posix_only
@pytest.mark.parametrize("umask", ["000", "077", "022", "277"])
def test_every_folder_of_a_store_is_private_whatever_the_umask(tmp_path, umask):
    """Item 3: os.makedirs(..., 0o700) gave 0700 to the last folder only: function folders,
    shards and .failures/ got 0777 less the umask (0777 with umask 000)."""
    modes = dict(line.rsplit(" ", 1) for line in child(TREE_OF_A_STORE, str(tmp_path), umask).stdout.splitlines())
    root = str(tmp_path / "new" / "parent" / "cache")
    inside = {path: mode for path, mode in modes.items() if path.startswith(root)}
    assert len(inside) >= 8, inside  # The store, shards, a function folder and its shards, .functions, .failures/x.
    assert set(inside.values()) == {"0o700"}, inside
    above = 0o777 & ~int(umask, 8)  # Directories above the store are the user's: mkdir -p's mode.
    assert modes[str(tmp_path / "new")] == oct(above) and modes[str(tmp_path / "new" / "parent")] == oct(above)


# issue 18 item 3 (failed on 0.2.0, 3cf1caa, unless the docstring says otherwise)
@root_only
@pytest.mark.parametrize("umask", ["077", "002"])
def test_folders_of_a_team_store_keep_its_mode(tmp_path, umask):
    """Item 3: a team store (setgid, group-writable, trusted) passes its mode to every folder
    donecache makes in it, whatever the umask of the member who writes."""
    team = tmp_path / "new" / "parent" / "cache"
    team.mkdir(parents=True)
    os.chown(team, 0, 65534)
    os.chmod(team, 0o2770)
    script = TREE_OF_A_STORE.replace("max_bytes=1 << 30", "max_bytes=1 << 30, trust_shared=True")
    modes = dict(line.rsplit(" ", 1) for line in child(script, str(tmp_path), umask).stdout.splitlines())
    inside = {path: mode for path, mode in modes.items() if path.startswith(str(team))}
    assert len(inside) >= 8 and set(inside.values()) == {"0o2770"}, inside


# -- Attack 1 (issue 10 item 1, failed before its fix): prune() must remove only the file it judged

PRUNER = """
    import time
    with dc.open(sys.argv[1]) as db:
        print("ready", flush=True)
        for line in open(sys.argv[2]):  # A FIFO: one line per prune wanted.
            started = time.perf_counter()
            db.prune()
            print(time.perf_counter() - started, flush=True)
"""


def plant(master: Path, target: Path) -> None:
    """Put a copy of ``master`` at ``target`` at once: a hard link renamed into place."""
    temp = target.with_name(".planted")
    os.link(master, temp)
    os.replace(temp, target)


@posix_only
def test_prune_never_removes_a_write_that_returned(tmp_path):
    """Issue 10, item 1: prune() judged a damaged entry, then unlinked the *name*, taking the
    fresh entry that a writer had renamed onto it meanwhile: a write that returned was lost."""
    cache = tmp_path / "c"
    with dc.open(cache) as db:
        db["victim"] = -1
    [victim] = entry_files(cache)
    # Damage that takes a while to judge: a header that looks right and 24 MB to checksum.
    master = tmp_path / "damaged"
    with master.open("wb") as f:
        f.write(b"dcE1" + b"\0" * 28)
        f.write(b"\x5a" * (24 << 20))
    orders = tmp_path / "orders"
    os.mkfifo(orders)
    pruner = child(PRUNER, str(cache), str(orders), background=True)
    assert pruner.stdout is not None
    go_fd = -1
    try:
        wait_for_line(pruner, "ready")
        go_fd = os.open(orders, os.O_WRONLY)
        rng = random.Random(10)
        lost: list[int] = []
        deadline = time.monotonic() + 4
        rounds = 0
        duration = 0.02
        with dc.open(cache) as db:
            while rounds < 12 and time.monotonic() < deadline:
                plant(master, victim)
                os.write(go_fd, b"go\n")
                time.sleep(rng.uniform(0, duration))  # Somewhere in the prune's reading.
                db["victim"] = rounds  # The write returns...
                at_once = db.get("victim")
                duration = max(duration, float(pruner.stdout.readline()))
                if at_once != rounds or db.get("victim") != rounds:  # ...and must stay after the prune.
                    lost.append(rounds)
                rounds += 1
    finally:
        if go_fd >= 0:
            os.close(go_fd)
        pruner.kill()
        pruner.wait()
    assert rounds >= 5
    assert lost == [], f"prune() removed {len(lost)} of {rounds} entries that were written while it ran"


@posix_only
def test_prune_leaves_an_entry_it_may_not_read(tmp_path):
    """Issue 10, item 1: an entry that prune() cannot open (EACCES) is not damage; leave it."""
    cache = tmp_path / "c"
    with dc.open(cache) as db:
        db["mine"] = "precious"
    [entry] = entry_files(cache)
    os.chmod(entry, 0)
    proc = child("print(dc.open(sys.argv[1]).prune())", str(cache), unprivileged=True)
    assert entry.exists(), f"prune() removed an entry it could not read (it said {proc.stdout.strip()})"
    os.chmod(entry, 0o600)
    with dc.open(cache) as db:
        assert db["mine"] == "precious"


@posix_only
@pytest.mark.parametrize("code", [errno.EIO, errno.ESTALE], ids=["EIO", "ESTALE"])
@pytest.mark.parametrize("during", ["open", "read"])
def test_prune_leaves_an_entry_on_io_errors(tmp_path, monkeypatch, code, during):
    """Issue 10, item 1: EIO or ESTALE (an NFS hiccup) while prune() reads an entry means
    "cannot tell", not "damaged": the entry stays."""
    cache = tmp_path / "c"
    with dc.open(cache) as db:
        db["mine"] = "precious"
    [entry] = entry_files(cache)
    inode = entry.stat().st_ino
    real_open, real_read = os.open, os.read

    def failing_open(path, *args, **kwargs):
        if during == "open" and os.path.basename(os.fsdecode(path)) == entry.name:
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return real_open(path, *args, **kwargs)

    def failing_read(fd, *args, **kwargs):
        if during == "read" and os.fstat(fd).st_ino == inode:
            raise OSError(code, os.strerror(code))
        return real_read(fd, *args, **kwargs)

    with dc.open(cache) as db:
        monkeypatch.setattr(os, "open", failing_open)
        monkeypatch.setattr(os, "read", failing_read)
        db.prune()
        monkeypatch.undo()
    assert entry.exists(), f"prune() removed an entry after {errno.errorcode[code]}"
    with dc.open(cache) as db:
        assert db["mine"] == "precious"


# -- Attack 5 (issue 10 item 5, failed before its fix): FIFOs: never open anything but regular files


def run_bounded(actions: dict[str, Callable[[], object]], fifos: list[Path], seconds: float = 2.0) -> dict[str, object]:
    """Run every action at once, each in its own thread; return name -> result.

    Fails, naming them, if any is still running after ``seconds``. Those are set free first:
    opening a FIFO lets a blocked open(2) return, and closing it again gives the reader EOF.
    """
    results: dict[str, object] = {}
    errors: dict[str, BaseException] = {}

    def run(name: str, action: Callable[[], object]) -> None:
        try:
            results[name] = action()
        except BaseException as exc:  # Reported in the test's own thread.
            errors[name] = exc

    threads = {name: threading.Thread(target=run, args=(name, action), daemon=True) for name, action in actions.items()}
    for t in threads.values():
        t.start()
    deadline = time.monotonic() + seconds
    for t in threads.values():
        t.join(max(0.0, deadline - time.monotonic()))
    hung = sorted(name for name, t in threads.items() if t.is_alive())
    for _ in range(100):
        if not any(t.is_alive() for t in threads.values()):
            break
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))
            except OSError:
                pass
        time.sleep(0.02)
    assert not hung, f"blocked on a FIFO for more than {seconds} s: {', '.join(hung)}"
    if errors:
        raise next(iter(errors.values()))
    return results


def store_with_fifo_entry(root: Path) -> Path:
    """A store with the entries 'other' and 'k', where a FIFO has replaced the file of 'k'."""
    with dc.open(root) as db:
        db["other"] = "fine"
        db["k"] = "victim"
    victim = next(p for p in entry_files(root) if b"victim" in p.read_bytes())
    victim.unlink()
    os.mkfifo(victim)
    return victim


@posix_only
def test_fifo_at_an_entry_reads_as_missing(tmp_path):
    """Issue 10, item 5: a FIFO at an entry's name blocked get, `in`, iteration and items()
    forever. It must read as a miss, and be skipped by iteration."""
    fifos = []
    stores = {}
    for name in ("get", "in", "iter", "items", "values"):
        fifos.append(store_with_fifo_entry(tmp_path / name))
        stores[name] = dc.open(tmp_path / name)
    results = run_bounded(
        {
            "get": lambda: stores["get"].get("k", "missing"),
            "in": lambda: "k" in stores["in"],
            "iter": lambda: sorted(stores["iter"]),
            "items": lambda: dict(stores["items"].items()),
            "values": lambda: list(stores["values"].values()),
        },
        fifos,
    )
    assert results == {
        "get": "missing",
        "in": False,
        "iter": ["other"],
        "items": {"other": "fine"},
        "values": ["fine"],
    }


@posix_only
def test_fifo_at_an_entry_is_a_miss_for_memoize_and_prune(tmp_path, calls):
    """Issue 10, item 5: a FIFO at an entry's name blocked a memoized call and prune() forever.
    For memoize it is a miss (computed again, and stored over it, as over any damage); prune()
    returns, and the other entries stay."""

    @dc.memoize(tmp_path / "memoize")
    def double(x):
        calls.append(x)
        return x * 2

    double(1)
    [fifo_m] = entry_files(tmp_path / "memoize")
    fifo_m.unlink()
    os.mkfifo(fifo_m)
    fifo_p = store_with_fifo_entry(tmp_path / "prune")
    pruned = dc.open(tmp_path / "prune")
    results = run_bounded({"memoize": lambda: double(1), "prune": pruned.prune}, [fifo_m, fifo_p])
    assert results["memoize"] == 2 and calls == [1, 1], "the FIFO is a miss: double(1) computed again"
    assert double(1) == 2 and calls == [1, 1], "and the recomputed result was stored"
    assert dict(pruned.items()) == {"other": "fine"}


def finish_all(procs: dict[str, subprocess.Popen[str]], seconds: float) -> dict[str, int]:
    """Wait for every process until one deadline; kill and name those still running."""
    deadline = time.monotonic() + seconds
    codes: dict[str, int] = {}
    hung = []
    for name, proc in procs.items():
        try:
            proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
            codes[name] = proc.returncode
        except subprocess.TimeoutExpired:
            hung.append(name)
            proc.kill()
            proc.communicate()
    assert not hung, f"still running after {seconds} s (blocked on a FIFO): {', '.join(hung)}"
    return codes


@posix_only
def test_cli_returns_with_a_fifo_in_the_cache_or_as_a_marker(tmp_path):
    """Issue 10, item 5: a FIFO at an entry's name blocked `python -m donecache info`, `prune` and
    `clear`; a FIFO as a stage's marker blocked `status`."""
    for name in ("info", "prune", "clear"):
        store_with_fifo_entry(tmp_path / name)
    (tmp_path / "stage").mkdir()
    os.mkfifo(tmp_path / "stage" / "DONE")
    procs = {name: cli(name, str(tmp_path / name), background=True) for name in ("info", "prune", "clear")}
    procs["status"] = cli("status", str(tmp_path / "stage"), background=True)
    codes = finish_all(procs, 5)
    assert codes == {"info": 0, "prune": 0, "clear": 0, "status": 1}


@posix_only
def test_fifo_in_a_stage_or_as_its_marker(tmp_path):
    """Issue 10, item 5: a FIFO anywhere in a stage blocked the marker's write (the durable flush
    opens every file), and a FIFO as the marker blocked is_done(version=...) and done_dir."""

    def build_with_a_fifo_inside() -> bool:
        with dc.done_dir(tmp_path / "built") as stage:
            (stage.path / "sub").mkdir()
            os.mkfifo(stage.path / "sub" / "pipe")
            stage.piece("data", lambda: "x")
        return dc.is_done(tmp_path / "built")

    def enter_with_version() -> bool:
        with dc.done_dir(tmp_path / "marker", version=1) as stage:
            return stage.done

    (tmp_path / "marker").mkdir()
    os.mkfifo(tmp_path / "marker" / "DONE")
    results = run_bounded(
        {"build": build_with_a_fifo_inside, "is_done": lambda: dc.is_done(tmp_path / "marker", version=1)},
        [tmp_path / "built" / "sub" / "pipe", tmp_path / "marker" / "DONE"],
    )
    assert results == {"build": True, "is_done": False}
    assert stat.S_ISFIFO(os.lstat(tmp_path / "built" / "sub" / "pipe").st_mode), "the user's FIFO stays"
    results = run_bounded({"done_dir": enter_with_version}, [tmp_path / "marker" / "DONE"])
    assert results == {"done_dir": False}, "a FIFO is not a finished marker"


# issue 18 item 1 (failed on 0.2.0, 3cf1caa, unless the docstring says otherwise)
@posix_only
def test_fifos_at_lock_files_and_usage_do_not_hang(tmp_path):
    """Item 1: a FIFO at .usage hung every write of a store with max_bytes (its read waited
    for a writer); a FIFO at a stage's lock file was taken as the lock. Each now fails at
    once with an error naming the FIFO."""
    fifos = []
    stage = tmp_path / "stage"
    stage.mkdir()
    os.mkfifo(stage / ".donecache.lock")
    for name in ("usage", "lock"):
        with dc.open(tmp_path / name) as db:
            db["k"] = 0
        os.mkfifo(tmp_path / name / f".{name}")
        fifos.append(tmp_path / name / f".{name}")
    fifos.append(stage / ".donecache.lock")

    def store(name: str) -> str:
        try:
            with dc.open(tmp_path / name, max_bytes=1 << 20) as db:
                db["k"] = 1
        except OSError as exc:
            return str(exc)
        return "no error"

    def build() -> str:
        try:
            with dc.done_dir(stage):
                pass
        except OSError as exc:
            return str(exc)
        return "no error"

    results = run_bounded({"usage": lambda: store("usage"), "lock": lambda: store("lock"), "stage": build}, fifos)
    assert all("FIFO" in message for message in results.values()), results
    assert not (stage / "DONE").exists()


# -- Attack 6 (issue 10 item 6, failed before its fix): descriptors: one per cache path, for the life of the process

MANY_CACHES = """
    import os, resource, warnings
    limit = 256
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))

    def open_descriptors():
        # Counted without opening one (/proc/self/fd would need one, and there may be none left).
        count = 0
        for fd in range(limit):
            try:
                os.fstat(fd)
                count += 1
            except OSError:
                pass
        return count

    def plus_one(x):
        return x + 1

    before = open_descriptors()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(300):
            f = dc.memoize(os.path.join(sys.argv[1], f"cache-{i}"))(plus_one)
            assert f(i) == i + 1  # One miss, then the cache is dropped.
            del f
    print(open_descriptors() - before)
    for w in caught:
        print("WARNING", w.category.__name__, w.message)
"""


@posix_only
def test_short_lived_caches_do_not_keep_descriptors(tmp_path):
    """Issue 10, item 6: every cache path kept one descriptor (its lock file) open for the life of
    the process: 300 short-lived caches left 300 descriptors open, and with RLIMIT_NOFILE 256 the
    later ones failed with "Too many open files". The descriptors held must stay bounded."""
    proc = child(MANY_CACHES, str(tmp_path), check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-1000:]
    extra, *warned = proc.stdout.splitlines()
    emfile = sum("Too many open files" in line for line in warned)
    assert int(extra) < 20, f"{extra} descriptors still open after 300 caches were used and dropped, and {emfile} warnings said 'Too many open files'"
    assert "Too many open files" not in output
    assert warned == []


# -- Attack 8 (issue 10 item 8, failed before its fix): get/items/values while another process deletes keys

DELETER = """
    keys = [f"k{i}" for i in range(5)]
    with dc.open(sys.argv[1]) as db:
        for k in keys:
            db[k] = k
        print("ready", flush=True)
        while True:
            for k in keys:
                del db[k]
                db[k] = k
"""


@posix_only
def test_keys_vanishing_meanwhile_are_simply_absent(tmp_path):
    """Issue 10, item 8: Store.get(k, default), items() and values() raised KeyError when another
    process deleted a key between listing (or `in`) and reading it."""
    keys = [f"k{i}" for i in range(5)]
    deleter = child(DELETER, str(tmp_path / "c"), background=True)
    raised: dict[str, str] = {}
    try:
        wait_for_line(deleter, "ready")
        with dc.open(tmp_path / "c") as db:
            operations = {
                "get": lambda: [db.get(k, k) for k in keys],
                "items": lambda: [v for k, v in db.items()],
                "values": lambda: list(db.values()),
            }
            deadline = time.monotonic() + 2
            while len(raised) < len(operations) and time.monotonic() < deadline:
                for name, operation in operations.items():
                    if name in raised:
                        continue
                    try:
                        values = operation()
                    except KeyError as exc:
                        raised[name] = repr(exc)
                        continue
                    assert set(values) <= set(keys)
    finally:
        deleter.kill()
        deleter.wait()
    assert raised == {}, f"KeyError for a key deleted meanwhile: {raised}"


# -- Attack 9 (issue 10 item 9, failed before its fix): a regular file where a shard directory should be


def test_a_file_in_place_of_a_shard_is_repaired(tmp_path):
    """Issue 10, item 9: a regular file at <root>/<2 hex> was ignored by prune(), and every later
    write to that shard raised NotADirectoryError. Writes must succeed (prune or the write
    itself repairs the damage)."""
    cache = tmp_path / "c"
    with dc.open(cache) as db:
        db["k"] = 1
    [entry] = entry_files(cache)
    shard = entry.parent
    shutil.rmtree(shard)
    shard.write_bytes(b"damage")
    with dc.open(cache) as db:
        assert "k" not in db
        db.prune()
        db["k"] = 2
        assert db["k"] == 2
    assert shard.is_dir()


def test_a_new_shard_whose_flush_fails_is_reported_and_flushed_at_the_next_write(tmp_path, monkeypatch):
    # Found by review: a durable write into a new store makes the entry's shard before its open, and
    # ignored that shard's failed flush into the store directory; the shard then existed, so no later
    # write flushed it either. The failure is reported, and the shard is made (and flushed) again.
    root, flush, failing, flushed = str(tmp_path / "c"), dc._fsync_dir, [False], []

    def flaky_flush(path):
        if path == root:
            flushed.append(failing[0])
            if failing[0]:
                raise OSError(errno.EIO, "Input/output error", path)
        return flush(path)

    monkeypatch.setattr(dc, "_fsync_dir", flaky_flush)
    with dc.open(root, durable=True) as db:
        failing[0], flushed[:] = True, []
        with pytest.raises(OSError, match="Input/output error"):
            db["k"] = 1
        assert "k" not in db and flushed and all(flushed)
        failing[0], flushed[:] = False, []
        db["k"] = 2
        assert db["k"] == 2 and flushed == [False]  # The shard, made and flushed into the store directory.
    [entry] = entry_files(Path(root))
    assert entry.parent.is_dir()


def test_a_file_in_place_of_a_shard_of_a_new_store_is_repaired(tmp_path):
    """In a folder that this process made, a write makes the entry's shard before it opens the
    entry (issue 20); a file found there is still repaired by the write."""
    with dc.open(tmp_path / "first") as db:
        db["k"] = 1
    [entry] = entry_files(tmp_path / "first")
    with dc.open(tmp_path / "c") as db:
        shard = tmp_path / "c" / entry.parent.name
        shard.write_bytes(b"damage")
        db["k"] = 2
        assert db["k"] == 2
    assert shard.is_dir() and [p.name for p in entry_files(tmp_path / "c")] == [entry.name]


# -- Attack 13 (issue 10 item 13, failed before its fix): misleading errors


@posix_only
def test_dangling_symlink_as_cache_path_is_named(tmp_path):
    """Issue 10, item 13: a dangling symlink as the cache path said "cannot create the cache
    directory: File exists". The message must say that it is a (dangling) symlink, and name it."""
    link = tmp_path / "cache"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises((OSError, ValueError)) as caught:
        dc.open(link)
    message = str(caught.value)
    assert str(link) in message, message
    words = message.replace(str(tmp_path), "<tmp>").lower()  # The test's own name says "symlink".
    assert "symlink" in words or "symbolic link" in words, message


CJK_NAME = "漢" * 79 + "x"  # 238 bytes in UTF-8: a valid name (at most 255 bytes), 80 characters.


@pytest.mark.parametrize("tool", ["atomic_write", "atomic_path", "piece"])
def test_long_multibyte_names_can_be_written(tmp_path, tool):
    """Issue 10, item 13: a valid 238-byte CJK file name failed with "File name too long" in
    atomic_write and stage.piece, since the temporary name kept 200 characters of it, not bytes."""
    assert len(CJK_NAME.encode("utf-8")) == 238
    if tool == "atomic_write":
        with dc.atomic_write(tmp_path / CJK_NAME) as f:
            f.write("data")
        written = tmp_path / CJK_NAME
    elif tool == "atomic_path":
        with dc.atomic_path(tmp_path / CJK_NAME) as tmp:
            assert len(tmp.name.encode("utf-8")) <= 255
            tmp.write_text("data")
        written = tmp_path / CJK_NAME
    else:
        with dc.done_dir(tmp_path / "s") as stage:
            written = stage.piece(CJK_NAME, lambda: "data")
    assert written.read_text() == "data"


def test_huge_ttl_is_a_value_error_or_never_expires(tmp_path, calls):
    """Issue 10, item 13: ttl=10**400 raised OverflowError. It must be refused with ValueError, or
    accepted as "never expires"."""
    try:
        memoize = dc.memoize(tmp_path, ttl=10**400)
    except ValueError:
        return

    @memoize
    def f(x):
        calls.append(x)
        return x

    assert f(1) == 1 and f(1) == 1 and calls == [1]


# ---------------------------------------------------------------------------
# Memoize: keys, identity, hits kept in process, the size limit, the failure ledger
# ---------------------------------------------------------------------------


# -- memoize ------------------------------------------------------------------


@pytest.fixture
def calls():
    return []


def counted(tmp_path, calls, answer):
    """A function memoized in tmp_path that appends to calls each time it runs and returns answer(value)."""

    @dc.memoize(tmp_path)
    def count(value):
        calls.append(1)
        return answer(value)

    return count


def test_memoize_bare_uses_dot_donecache_or_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DONECACHE_DIR", raising=False)

    @dc.memoize
    def double(x):
        return 2 * x

    assert double(2) == 4 and double(2) == 4
    assert double.cache_info()[:4] == (1, 1, None, 1)
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
        f(1, threading.Lock())


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
    for bad, error in ((0, ValueError), (float("nan"), ValueError), ("1h", TypeError), (True, TypeError)):
        with pytest.raises(error, match="ttl must be"):
            dc.memoize(tmp_path, ttl=bad)


def test_is_cached_answers_like_a_hit_without_calling_or_locking(tmp_path, calls, monkeypatch):
    @dc.memoize(tmp_path / "c", ttl=60)
    def f(x, y=2):
        calls.append(x)
        return x * y

    assert not f.is_cached(1) and not (tmp_path / "c").exists(), "asking creates no store"
    f(1)
    assert f.is_cached(1) and f.is_cached(x=1, y=2) and not f.is_cached(1, 3) and not f.is_cached(2)
    assert calls == [1] and f.cache_info()[:2] == (0, 1), "nothing called, no hit counted"
    later = time.time() + 61
    monkeypatch.setattr(time, "time", lambda: later)
    assert not f.is_cached(1), "expired, as a call would find it"
    monkeypatch.undo()
    entry_files(tmp_path / "c")[0].write_bytes(b"damaged")
    assert not f.is_cached(1)
    with pytest.raises(TypeError):
        f.is_cached(1, 2, 3)  # Arguments that the call would refuse.
    release = threading.Event()

    @dc.memoize(tmp_path / "c")
    def slow(x):
        calls.append(x)
        release.wait(30)
        return x

    holder = threading.Thread(target=slow, args=(5,))
    holder.start()  # It holds the lock of slow(5)'s key until released.
    try:
        while 5 not in calls:
            time.sleep(0.01)
        started = time.monotonic()
        assert not slow.is_cached(5) and time.monotonic() - started < 1, "no waiting on the holder's lock"
    finally:
        release.set()
        holder.join()
    assert slow.is_cached(5) and calls.count(5) == 1


def test_donecache_off_calls_straight_through(tmp_path, calls, monkeypatch):
    import asyncio

    @dc.memoize(tmp_path / "c")
    def f(x):
        calls.append(x)
        return -x

    @dc.memoize(tmp_path / "c")
    async def g(x):
        calls.append(x)
        return x

    monkeypatch.setenv("DONECACHE", "off")  # Read at each call, not at import.
    assert f(1) == -1 and f(1) == -1 and f.refresh(1) == -1 and asyncio.run(g(2)) == 2
    assert f.map([3, 4]).results == [-3, -4] and f.map([3], keep_going=True, workers=2, processes=False).ok
    assert calls == [1, 1, 1, 2, 3, 4, 3] and not f.is_cached(1)
    assert not (tmp_path / "c").exists(), "no reads, no writes, no locks: no store at all"
    monkeypatch.setenv("DONECACHE", "On")
    assert f(1) == -1 and f(1) == -1 and calls.count(1) == 4 and f.is_cached(1)
    for word in ("0", "FALSE", "No", "oFF"):
        monkeypatch.setenv("DONECACHE", word)
        assert f(1) == -1 and calls.count(1) == 4 + ("0", "FALSE", "No", "oFF").index(word) + 1, word
    for word in ("1", "True", "YES", " on "):
        monkeypatch.setenv("DONECACHE", word)
        assert f(1) == -1 and calls.count(1) == 8, word
    monkeypatch.setenv("DONECACHE", "of")
    with pytest.warns(dc.DonecacheWarning, match="DONECACHE='of' is not understood, so caching stays on") as seen:
        assert f(1) == -1 and f(1) == -1 and calls.count(1) == 8, "an unknown value never raises: caching stays on"
    assert len(seen) == 1, "warned once, not at every call"


def test_disabled_switches_off_every_thread_and_takes_no_lock(tmp_path, calls):
    release = threading.Event()

    @dc.memoize(tmp_path / "c")
    def slow(x):
        calls.append(x)
        if threading.current_thread() is holder:
            release.wait(30)
        return x

    holder = threading.Thread(target=slow, args=(5,))
    holder.start()  # It holds the lock of slow(5)'s key.
    try:
        while 5 not in calls:
            time.sleep(0.01)
        with dc.disabled():
            with dc.disabled():  # Nested blocks: off until the outermost ends.
                pass
            started = time.monotonic()
            assert slow(5) == 5 and time.monotonic() - started < 1, "no waiting on the key's lock"
            other = threading.Thread(target=slow, args=(6,))
            other.start()
            other.join()
    finally:
        release.set()
        holder.join()
    assert calls == [5, 5, 6] and not slow.is_cached(6), "the other thread's call was not cached either"
    assert slow(6) == 6 and slow(6) == 6 and calls == [5, 5, 6, 6], "on again after the block"


@posix_only
def test_disabled_reaches_the_workers_of_a_batch(tmp_path):
    proc = child(
        """
        import multiprocessing, os
        @dc.memoize(os.environ["JOB_CACHE"])
        def pid(x):
            return os.getpid()

        if __name__ == "__main__":
            multiprocessing.set_start_method("spawn")  # Workers start afresh: nothing is inherited.
            with dc.disabled():
                batch = pid.map(range(6), workers=2)
            print(batch, os.path.exists(os.environ["JOB_CACHE"]), os.getpid() in batch.results)
        """,
        env={"JOB_CACHE": str(tmp_path / "c")},
        script_file=tmp_path / "job.py",
    )
    assert proc.stdout.strip() == "BatchResult(6 inputs: 0 reused, 6 computed, 0 failed) False False"


def test_hits_and_misses_are_logged_at_debug_with_the_reason(tmp_path, caplog, monkeypatch):
    import logging

    @dc.memoize(tmp_path / "c", ttl=60)
    def f(x):
        return [x]

    caplog.set_level(logging.DEBUG, logger="donecache")

    def said() -> list[str]:
        lines = [r.getMessage().split("; entry")[0].split("<locals>.")[-1] for r in caplog.records if r.name == "donecache"]
        caplog.clear()
        return lines

    f(1), f(1), f.refresh(1)
    assert said() == ["f: miss (new key), computing", "f: hit", "f: miss (refresh), computing"]
    later = time.time() + 61
    monkeypatch.setattr(time, "time", lambda: later)
    f(1)
    monkeypatch.undo()
    assert said() == ["f: miss (expired), computing"]
    entry_files(tmp_path / "c")[0].write_bytes(b"torn")
    f(1)
    assert said() == ["f: miss (damaged entry), computing"]
    caplog.set_level(logging.INFO, logger="donecache")
    f(1), f(2)
    assert said() == [], "nothing below the level the user chose"


def test_logging_is_silent_unless_configured_and_not_imported():
    proc = child(
        """
        import tempfile
        print("logging" in sys.modules)
        import logging  # Imported, as a library would, but not configured.
        @dc.memoize(tempfile.mkdtemp())
        def f(x):
            return x
        f(1), f(1)
        """
    )
    assert proc.stdout == "False\n" and proc.stderr == ""


def test_hits_in_other_threads_survive_the_first_import_of_logging(tmp_path):
    # Issue 18 item 5: the first map() imports logging in its thread; while
    # that import runs, hits in other threads found the half-made module in
    # sys.modules and died with AttributeError. A tracer holds the import at
    # the first line of logging's own code, so the window is always open.
    script = """
        import os, threading, time
        assert "logging" not in sys.modules
        @dc.memoize(sys.argv[1])
        def f(x):
            return x
        f(1)
        paused, errors, done = threading.Event(), [], threading.Event()

        def tracer(frame, event, arg):
            if frame.f_code.co_filename.endswith(os.path.join("logging", "__init__.py")):
                if not paused.is_set():
                    paused.set()
                    time.sleep(0.3)
                return None
            return tracer

        def first_map():
            sys.settrace(tracer)
            try:
                f.map([1, 2], progress=None)  # stderr is a pipe: progress goes to logging.
            finally:
                sys.settrace(None)
                done.set()

        def hits():
            paused.wait()
            while not done.is_set():
                try:
                    assert f(1) == 1
                except Exception as exc:
                    errors.append(repr(exc))
                    return

        threads = [threading.Thread(target=first_map)] + [threading.Thread(target=hits) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(paused.is_set(), errors)
    """
    for n in range(6):  # Fresh processes: logging is imported for the first time in each.
        assert child(script, str(tmp_path / "c")).stdout.strip() == "True []"


def test_waits_longer_than_a_second_are_logged_with_the_holder(tmp_path, caplog, calls):
    import logging

    caplog.set_level(logging.INFO, logger="donecache")
    builder = child(
        """
        import time
        with dc.done_dir(sys.argv[1]) as stage:
            print("building", flush=True)
            time.sleep(2)
        """,
        str(tmp_path / "stage"),
        background=True,
    )
    wait_for_line(builder, "building")
    with dc.done_dir(tmp_path / "stage") as stage:
        assert stage.done
    builder.wait()
    [record] = [r for r in caplog.records if r.name == "donecache"]
    assert record.levelno == logging.INFO and f"(held by pid {builder.pid} on " in record.getMessage()
    assert ".donecache.lock" in record.getMessage()
    caplog.clear()

    @dc.memoize(tmp_path / "c")
    def slow(x):
        calls.append(x)
        time.sleep(1.5)
        return x

    in_threads(lambda n: slow(1), 2)
    assert calls == [1]
    [record] = [r for r in caplog.records if r.name == "donecache" and r.levelno == logging.INFO]
    assert record.getMessage().startswith("waiting more than a second for the lock ")
    assert record.getMessage().endswith(".lock"), "a key's holder is not known"


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
    assert f.cache_info() == (0, 0, None, 0, 0.0, 0.0)
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


def test_generator_functions_are_refused_at_decoration(tmp_path):
    def numbers(n):
        yield from range(n)

    async def ticks(n):
        for i in range(n):
            yield i

    with pytest.raises(TypeError, match=r"numbers\(\): it is a generator function.*return a list"):
        dc.memoize(tmp_path)(numbers)
    with pytest.raises(TypeError, match=r"ticks\(\): it is an async generator function"):
        dc.memoize(ticks)
    assert not (tmp_path / "CACHEDIR.TAG").exists()


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
            print(square.cache_info()[:4])
        """,
        method,
        env={"JOB_CACHE": str(tmp_path / "c")},
        script_file=tmp_path / "job.py",
    )
    assert proc.stdout.strip() == "(20, 0, None, 20)"


# issue 21
def test_cache_info_is_a_namedtuple_like_functools(tmp_path):
    import functools

    f = dc.memoize(tmp_path, ttl=60, version=2, max_bytes=10**6)(abs)
    info = f.cache_info()
    assert info._fields[:4] == functools.lru_cache()(abs).cache_info()._fields
    assert info._asdict() == {
        "hits": 0, "misses": 0, "maxsize": 10**6, "currsize": 0, "held_seconds": 0.0, "saved_seconds": 0.0,
    }  # fmt: skip
    assert isinstance(info, tuple) and info._replace(hits=3).hits == 3
    params = f.cache_parameters()
    assert params["maxsize"] == params["max_bytes"] == 10**6 and params["ttl"] == 60 and params["version"] == 2


# issue 18 item 11 (failed on 0.2.0, 3cf1caa, unless the docstring says otherwise)
def test_is_cached_on_a_bound_method(tmp_path):
    """Item 11: obj.method.is_cached(3) raised TypeError: the bound wrapper did not pass obj."""
    calls = []

    class Model:
        def __init__(self, scale):
            self.scale = scale

        @dc.memoize(tmp_path, key=lambda self, x: (self.scale, x))
        def predict(self, x):
            calls.append(x)
            return self.scale * x

    model = Model(2)
    assert not model.predict.is_cached(3)
    assert model.predict(3) == 6 and model.predict.is_cached(3) and not model.predict.is_cached(4)
    assert not Model(5).predict.is_cached(3) and calls == [3]


# -- Attack 3 (issue 10 item 3, failed before its fix): threads in several processes: each key computed once, no EDEADLK

THREADED_WORKER = """
    import os, random, threading, time, warnings
    warnings.simplefilter("always")
    cache, log, go, who, keys = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])

    @dc.memoize(cache)
    def slow(x):
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{x}\\n".encode())
        os.close(fd)
        time.sleep(0.01)
        return x * x

    def work(n):
        order = list(range(keys))
        random.Random(who * 100 + n).shuffle(order)  # Overlapping keys, in different orders.
        for k in order:
            assert slow(k) == k * k

    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    with warnings.catch_warnings(record=True) as caught:
        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for w in caught:
        print("WARNING", w.category.__name__, str(w.message), flush=True)
"""


@posix_only
def test_threads_in_several_processes_compute_each_key_once(tmp_path):
    """Issue 10, item 3: 6 processes x 4 threads on overlapping keys got EDEADLK ("Resource
    deadlock avoided") from the kernel's per-process deadlock detection, and computed some keys
    twice with a DonecacheWarning."""
    keys = 80
    log, go = tmp_path / "log", tmp_path / "go"
    procs = [
        child(THREADED_WORKER, str(tmp_path / "c"), str(log), str(go), str(n), str(keys), background=True)
        for n in range(6)
    ]
    try:
        release_together(procs, go)
        outputs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0] * 6
    warned = [line for out in outputs for line in out.splitlines() if line.startswith("WARNING")]
    computed = sorted(map(int, log.read_text().split()))
    twice = sorted({k for k in computed if computed.count(k) > 1})
    assert computed == list(range(keys)), f"keys computed more than once: {twice}; {len(warned)} warnings: {warned[:3]}"
    assert warned == []


# -- Attack 4 (issue 10 item 4, failed before its fix): fork at any moment: the child can use memoize

FORKER = """
    import json, os, signal, threading, time, warnings
    warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads running.
    root, forks, hammers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    @dc.memoize(root + "/shared")
    def echo(x):
        return x

    sys.setswitchinterval(1e-5)  # Switch threads often: more moments to fork at.
    stop = threading.Event()

    def hammer(n):
        i = 0
        while not stop.is_set():
            i += 1
            if n % 2:
                assert echo((n, i)) == (n, i)  # A new key: a miss, so the key lock every time.
            else:
                with dc.done_dir(f"{root}/stage-{n}", durable=False):  # A stage lock: opened and closed.
                    pass

    threads = [threading.Thread(target=hammer, args=(n,), daemon=True) for n in range(hammers)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    children = []
    started = time.monotonic()
    for i in range(forks):
        pid = os.fork()
        if pid == 0:
            signal.alarm(2)  # The default action ends a child that hangs.
            try:
                code = 0 if echo(("child", i)) == ("child", i) else 1
            except BaseException:
                code = 2
            os._exit(code)
        children.append(pid)
        time.sleep(0.001)
    stop.set()
    outcomes = {"ok": 0, "hung": 0, "failed": 0, "forking took": round(time.monotonic() - started, 2)}
    for pid in children:
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM:
            outcomes["hung"] += 1
        elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            outcomes["ok"] += 1
        else:
            outcomes["failed"] += 1
    print(json.dumps(outcomes))
"""


@posix_only
def test_children_forked_at_any_moment_can_use_memoize(tmp_path):
    """Issue 10, item 4: a fork while another thread held the key lock's internal guard left the
    child blocked forever at its first miss (4 of 500 forks). Here 8 threads make misses or enter
    stages (the same guard) while the main thread forks 100 children; each child makes one miss and
    exits (SIGALRM ends it after 2 s)."""
    proc = child(FORKER, str(tmp_path), "100", "8", timeout=60)
    outcomes = json.loads(proc.stdout)
    outcomes.pop("forking took")
    assert outcomes == {"ok": 100, "hung": 0, "failed": 0}, f"forked while threads used the locks: {proc.stdout}"


# -- Attack 12 (issue 10 item 12, failed before its fix): an async memoized function that awaits itself


def test_async_function_awaiting_its_own_key_raises(tmp_path):
    """Issue 10, item 12: an async memoized function awaiting itself with the same key waited
    forever (the sync one raises RuntimeError). It must raise the same RuntimeError."""
    import asyncio

    @dc.memoize(tmp_path)
    def sync_loop(x):
        return sync_loop(x)

    @dc.memoize(tmp_path)
    async def async_loop(x):
        return await async_loop(x)

    with pytest.raises(RuntimeError):
        sync_loop(1)

    async def main():
        return await asyncio.wait_for(async_loop(1), 2)

    try:
        asyncio.run(main())
    except RuntimeError:
        pass
    except asyncio.TimeoutError:
        pytest.fail("awaiting its own key waited forever (cancelled after 2 s) instead of raising RuntimeError")
    else:
        pytest.fail("awaiting its own key returned instead of raising RuntimeError")


# -- Attack 16 (issue 10 item 16, failed before its fix): KeyboardInterrupt never leaves a key lock marked as held

INTERRUPT_STORM = """
    import signal, time, warnings
    warnings.simplefilter("ignore")  # An interrupted write may warn; that is not the question here.
    seconds = float(sys.argv[2])

    @dc.memoize(sys.argv[1])
    def f(x):
        return x

    mode, deadline = "idle", 0.0

    def interrupt(signum, frame):
        if mode == "storm":
            raise KeyboardInterrupt
        if mode == "check" and time.monotonic() > deadline:
            raise TimeoutError("f(1) or f.refresh(1) hung for 2 s")

    def check():
        # "ok", or what went wrong with f(1) and f.refresh(1), bounded by 2 s.
        global mode, deadline
        deadline = time.monotonic() + 2
        mode = "check"
        try:
            return "ok" if (f(1), f.refresh(1)) == (1, 1) else "wrong result"
        except Exception as exc:
            return f"after the storm: {type(exc).__name__}: {exc}"
        finally:
            mode = "idle"

    signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.0003, 0.0003)  # SIGALRM every 0.3 ms.
    start = time.monotonic()
    calls = interrupted = 0
    state, next_check = "ok", start + 0.25
    while state == "ok" and time.monotonic() < start + seconds:
        try:
            try:
                mode = "storm"
                f.refresh(1)
                calls += 1
            except KeyboardInterrupt:
                interrupted += 1
            except SystemError as exc:
                # CPython 3.9: a signal taken while the handler makes its KeyboardInterrupt turns that call into
                # "<class 'KeyboardInterrupt'> returned a result with an error set", caused by the inner one.
                if not isinstance(exc.__cause__, KeyboardInterrupt):
                    state = f"during the storm: {type(exc).__name__}: {exc}"
                interrupted += 1
            except Exception as exc:
                state = f"during the storm: {type(exc).__name__}: {exc}"
            finally:
                mode = "idle"
            if state == "ok" and time.monotonic() > next_check:  # Stop early once broken.
                next_check += 0.25
                state = check()
        except KeyboardInterrupt:  # Landed outside the call: harmless.
            pass
    if state == "ok":
        state = check()
    signal.setitimer(signal.ITIMER_REAL, 0)
    print(state)
    print(f"{calls} calls completed, {interrupted} interrupted in {time.monotonic() - start:.2f} s")
"""


@posix_only
def test_keyboard_interrupts_never_leave_a_key_lock_held(tmp_path):
    """Issue 10, item 16: under a storm of KeyboardInterrupts (SIGALRM every 0.3 ms, f.refresh(1) in
    a loop), an interrupt could land where the key lock was held but not yet (or no longer) fully
    recorded, and every later call raised "this thread already holds the lock" (or hung). After the
    storm, f(1) and f.refresh(1) must work."""
    proc = child(INTERRUPT_STORM, str(tmp_path), "3", timeout=60)
    state, summary = proc.stdout.splitlines()
    assert state == "ok", f"{state} ({summary})"


def hold_in_a_thread(path: str, byte: int, done: threading.Event) -> threading.Thread:
    """A thread that holds the key lock (path, byte) from before this returns until ``done`` is set."""
    held = threading.Event()

    def hold() -> None:
        with dc._KeyLock(path, byte).acquire():
            held.set()
            done.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(30)
    return thread


@posix_only
@pytest.mark.parametrize("wait", ["sync", "async"])
def test_an_interrupt_as_a_lock_wait_begins_gives_its_handle_back(tmp_path, monkeypatch, wait):
    """Review of issue 20: the first try of a lock moved out of the poll loop, and an interrupt between
    the two (KeyboardInterrupt, or a task's cancellation) left the handle open. With classic record
    locks (macOS, the BSDs, 32-bit Linux) its descriptor and counts then stayed forever."""
    import asyncio

    dc._load_fcntl()
    monkeypatch.setattr(dc, "_F_OFD_SETLK", 0)  # Classic record locks, as where OFD locks are missing.
    path = os.path.realpath(tmp_path / "lock")
    Path(path).touch()
    done = threading.Event()
    holder = hold_in_a_thread(path, 5, done)

    def interrupted(self, *args):
        raise KeyboardInterrupt
        yield  # A generator, as the poll loop is.

    with pytest.raises(TimeoutError):  # The poll loop closes its handle, then acquire() does again: harmless.
        dc._KeyLock(path, 5).acquire(timeout=0.01)
    assert dc._RecordLocks.shared[path][1] == 1, "the holder's descriptor is still counted once"
    monkeypatch.setattr(dc._KeyLock, "_tries", interrupted)
    with pytest.raises(KeyboardInterrupt):
        if wait == "sync":
            dc._KeyLock(path, 5).acquire()
        else:
            asyncio.run(dc._KeyLock(path, 5).acquire_async(1))
    monkeypatch.undo()
    assert dc._RecordLocks.shared[path][1] == 1 and dc._RecordLocks.turns[(path, 5)][1] == 1
    done.set()
    holder.join()
    assert path not in dc._RecordLocks.shared and (path, 5) not in dc._RecordLocks.turns


def test_an_interrupt_once_a_waited_lock_is_recorded_releases_it(tmp_path, monkeypatch):
    """Review of issue 20: an interrupt that lands after a wait has recorded the lock as held must
    release it, not only close its handle: a held record of a closed handle made this thread's next
    acquire of the key raise "this thread already holds the lock"."""
    path = os.path.realpath(tmp_path / "lock")
    Path(path).touch()
    done = threading.Event()
    holder = hold_in_a_thread(path, 7, done)
    threading.Timer(0.2, done.set).start()
    recorded = dc._KeyLock._taken

    def interrupted(self, handle, owner):
        recorded(self, handle, owner)
        raise KeyboardInterrupt

    monkeypatch.setattr(dc._KeyLock, "_taken", interrupted)
    lock = dc._KeyLock(path, 7)
    with pytest.raises(KeyboardInterrupt):
        lock.acquire()  # Waits for the holder, then is interrupted as it records the lock.
    monkeypatch.undo()
    holder.join()
    again = dc._KeyLock(path, 7)
    assert again.try_acquire(), "released, and not recorded as this thread's any more"
    again.release()
    assert lock._handle is None


# -- memoize: the identity of work (keys and code changes) ----------------------


def run_job(tmp_path: Path, source: str, *args: str, python: str | None = None, env: dict[str, str] | None = None) -> list[str]:
    """Write ``source`` as job.py in tmp_path (a real module file) and run it there."""
    proc = child(source, str(tmp_path / "cache"), *args, script_file=tmp_path / "job.py", cwd=tmp_path, python=python, env=env)
    return proc.stdout.split()


def test_closure_values_are_part_of_the_key(tmp_path, calls):
    def outer(n):
        @dc.memoize(tmp_path)
        def times(x):
            calls.append((n, x))
            return x * n

        return times

    assert outer(2)(5) == 10 and outer(3)(5) == 15 and outer(2)(5) == 10
    assert calls == [(2, 5), (3, 5)]


def test_module_constants_and_helpers_are_followed(tmp_path):
    job = """
        RATE = {rate}
        UNUSED = {unused}

        def helper(x):
            return x * RATE{helper_edit}

        def unrelated():
            return {unused}

        @dc.memoize(sys.argv[1])
        def price(x):
            print("computed")
            return helper(x)

        print(price(10))
    """

    def run(rate="1.0", unused="0", helper_edit=""):
        return run_job(tmp_path, job.format(rate=rate, unused=unused, helper_edit=helper_edit))

    assert run() == ["computed", "10.0"]
    assert run() == ["10.0"], "the same code reuses"
    assert run(unused="1") == ["10.0"], "an edit to code it does not use changes nothing"
    assert run(rate="1.2") == ["computed", "12.0"], "a module constant it reads is followed"
    assert run(rate="1.2", helper_edit=" + 1") == ["computed", "13.0"], "a helper it calls is followed"


def test_a_decorated_function_is_identified_by_what_it_wraps(tmp_path):
    job = """
        import functools

        def logged(func):
            @functools.wraps(func)
            def wrapper(*args, **kwargs):
                return func(*args, **kwargs)
            return wrapper

        @dc.memoize(sys.argv[1])
        @logged
        def step(x):
            print("computed")
            return {body}

        print(step(2))
    """
    assert run_job(tmp_path, job.format(body="x + 1")) == ["computed", "3"]
    assert run_job(tmp_path, job.format(body="x + 1")) == ["3"]
    assert run_job(tmp_path, job.format(body="x * 100")) == ["computed", "200"]


def test_comments_blank_lines_and_decorator_options_keep_the_identity(tmp_path):
    job = """
        @dc.memoize(sys.argv[1]{options})
        def step(x):{comment}
            print("computed")
{blank}
            return x + 1
        print(step(1))
    """
    assert run_job(tmp_path, job.format(options="", comment="", blank="")) == ["computed", "2"]
    edited = job.format(options=", ttl=3600", comment="  # explained", blank="\n        # a comment line\n")
    assert run_job(tmp_path, edited) == ["2"]


def test_version_pins_the_code_and_the_seed_story(tmp_path):
    """A job fails on some records; the fix keeps version=, and a rerun computes only the failures."""
    job = """
        import json
        @dc.memoize(sys.argv[1], version=1)
        def parse(record):
            with open("log", "a") as log:
                log.write(str(record["id"]) + "\\n")
            {handling}
            return float(record["amount"])

        records = [{{"id": i, "amount": "1,5" if i % 10 == 7 else str(i)}} for i in range(100)]
        batch = parse.map(records, keep_going=True)
        print(batch.computed, batch.reused, len(batch.failures))
    """
    assert run_job(tmp_path, job.format(handling="pass")) == ["90", "0", "10"]
    fixed = job.format(handling='record = dict(record, amount=record["amount"].replace(",", "."))')
    assert run_job(tmp_path, fixed) == ["10", "90", "0"], "the fix keeps version=1: only the failures run"
    assert len((tmp_path / "log").read_text().split()) == 110
    bumped = fixed.replace("version=1", "version=2")
    assert run_job(tmp_path, bumped) == ["100", "0", "0"], "a new version recomputes everything"


def test_key_function_chooses_what_counts(tmp_path, calls):
    @dc.memoize(tmp_path, key=lambda record: record["id"])
    def load(record):
        calls.append(record["id"])
        return record["id"] * 10

    @dc.memoize(tmp_path, key=lambda record: record["id"])
    def other(record):
        return -1

    assert load({"id": 1, "noise": 1}) == load({"id": 1, "noise": 2}) == 10 and calls == [1]
    assert other({"id": 1}) == -1, "the function's identity stays in the key"
    with pytest.raises(ValueError, match="no ignore="):
        dc.memoize(tmp_path, key=lambda r: r, ignore=("r",))
    with pytest.raises(TypeError, match="key= return"):
        dc.memoize(tmp_path, key=lambda r: threading.Lock())(lambda r: r)(1)


def test_keys_are_equal_in_every_process_for_nested_objects(tmp_path):
    script = """
        import collections, dataclasses, enum, functools

        Pair = collections.namedtuple("Pair", "name tags")

        @dataclasses.dataclass(frozen=True)
        class Config:
            tags: frozenset
            nested: dict

        class Color(enum.Enum):
            RED = 1

        class Plain:
            def __init__(self):
                self.tags = {"alpha", "beta", "gamma", "delta", "epsilon"}

        @dc.memoize(sys.argv[1])
        def f(*values):
            print("computed")
            return len(values)

        tags = frozenset({"alpha", "beta", "gamma", "delta", "epsilon"})
        f(Pair("p", set(tags)), Config(tags, {"b": {"x", "y", "z"}, "a": 1}), Color.RED, Plain(),
          functools.partial(max, 3), 10**5000)
        print("done")
    """
    outputs = [child(script, str(tmp_path), env={"PYTHONHASHSEED": seed}).stdout.split() for seed in ("1", "2", "3", "4")]
    assert outputs == [["computed", "done"]] + [["done"]] * 3


def test_big_ints_are_keys(tmp_path, calls):
    @dc.memoize(tmp_path)
    def f(x):
        calls.append(1)
        return len(x) if isinstance(x, tuple) else x % 7

    assert f(10**5000) == f(10**5000) == (10**5000) % 7 and f(10**5000 + 1) == (10**5000 + 1) % 7
    assert f((10**5000,)) == f((10**5000,)) and len(calls) == 3


def test_a_partial_is_keyed_by_what_it_holds(tmp_path):
    script = """
        import functools
        def power(base, exponent):
            print("computed")
            return base ** exponent
        square = dc.memoize(sys.argv[1])(functools.partial(power, exponent=2))
        cube = dc.memoize(sys.argv[1])(functools.partial(power, exponent=3))
        print(square(3), cube(3))
    """
    assert child(script, str(tmp_path)).stdout.split() == ["computed", "computed", "9", "27"]
    assert child(script, str(tmp_path)).stdout.split() == ["9", "27"], "no memory address in the key"


def test_a_script_and_its_import_share_entries(tmp_path):
    job = """
        @dc.memoize(sys.argv[1])
        def transform(x):
            print("computed")
            return x + 1

        if __name__ == "__main__":
            print(transform(1))
    """
    assert run_job(tmp_path, job) == ["computed", "2"]
    proc = child("import job\nprint(job.transform(1))", str(tmp_path / "cache"), cwd=tmp_path, env={"PYTHONPATH": f"{IMPORT_ROOT}{os.pathsep}{tmp_path}"})
    assert proc.stdout.split() == ["2"], "job.transform is __main__.transform run as a script"


def other_pythons() -> list[str]:
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found = []
    for minor in ("3.11", "3.12", "3.13"):
        candidates = sorted(root.glob(f"{minor}.*/bin/python{minor}")) or [Path(p) for p in [shutil.which(f"python{minor}")] if p]
        found += [str(candidates[-1])] if candidates else []
    return found


def assert_computed_once_across_pythons(tmp_path, job, *output):
    """Runs the job on each other CPython: the first computes and prints output, the rest reuse it."""
    pythons = other_pythons()
    if len(pythons) < 2:
        pytest.skip("needs two of CPython 3.11, 3.12, 3.13")
    outputs = [run_job(tmp_path, job, python=python) for python in pythons]
    assert outputs == [["computed", *output]] + [list(output)] * (len(pythons) - 1), pythons


def test_entries_are_shared_across_cpython_versions(tmp_path):
    job = """
        @dc.memoize(sys.argv[1])
        def transform(x):
            print("computed")
            return [x, {"a": (1, 2.5)}]
        print(transform(1) == [1, {"a": (1, 2.5)}])
    """
    assert_computed_once_across_pythons(tmp_path, job, "True")


def test_info_shows_stale_entries_and_prune_removes_them(tmp_path):
    job = """
        @dc.memoize(sys.argv[1])
        def transform(x):
            return x + {n}
        for i in range({count}):
            transform(i)
    """
    run_job(tmp_path, job.format(n=1, count=5))
    run_job(tmp_path, job.format(n=2, count=3))
    report = json.loads(cli("info", str(tmp_path / "cache"), "--json").stdout)
    assert report["functions"] == {"job:transform": 8} and report["stale"] == {"job:transform": 5}
    assert "5 of older code" in cli("info", str(tmp_path / "cache")).stdout
    assert cli("prune", str(tmp_path / "cache")).stdout.startswith("removed 0 ")
    assert cli("prune", str(tmp_path / "cache"), "--stale").stdout.startswith("removed 5 ")
    report = json.loads(cli("info", str(tmp_path / "cache"), "--json").stdout)
    assert report["functions"] == {"job:transform": 3} and report["stale"] == {}


def test_numpy_arrays_are_keyed_by_their_contents(tmp_path, calls):
    np = pytest.importorskip("numpy")

    @dc.memoize(tmp_path)
    def total(a):
        calls.append(1)
        return float(a.sum())

    a = np.arange(12.0).reshape(3, 4)
    assert total(a) == total(a.copy()) == 66.0 and len(calls) == 1
    assert total(a.T) == 66.0 and len(calls) == 2, "shape is part of the key; non-contiguous views work"
    b = a.copy()
    b[1, 1] = 0
    assert total(b) == 61.0 and total(a.astype("float32")) == 66.0 and len(calls) == 4
    assert total(np.float64(1.5)) == 1.5 and len(calls) == 5


# -- memoize: what a function's identity covers (issue 19) -----------------------
#
# Each test writes a package to tmp_path and runs a job in a fresh interpreter
# per step: the first run computes, an unchanged rerun hits, and each edit that
# can change the result recomputes (and its own rerun hits).


def write_files(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).replace("DC", MODULE))


def computed(tmp_path: Path, job: str, **options: object) -> int:
    """How many times the job's memoized functions computed (they print "computed")."""
    return run_job(tmp_path, job, **options).count("computed")  # type: ignore[arg-type]


def edits_recompute(tmp_path: Path, files: dict[str, str], job: str, edits: list[tuple[str, str, str]], same: list[tuple[str, str, str]] = []) -> None:
    """Edits are (file, old text, new text), applied in turn: each recomputes; each in ``same`` does not."""
    write_files(tmp_path, files)
    assert computed(tmp_path, job) == 1, "the first run computes"
    assert computed(tmp_path, job) == 0, "an unchanged rerun hits"
    for file, old, new, expected in [(*e, 1) for e in edits] + [(*e, 0) for e in same]:
        path = tmp_path / file
        text = path.read_text()
        assert text.count(old) == 1, (file, old)
        path.write_text(text.replace(old, new))
        assert computed(tmp_path, job) == expected, f"{file}: {old!r} -> {new!r}"
        assert computed(tmp_path, job) == 0, f"{file}: {old!r} -> {new!r}: the rerun hits"


def test_identity_of_a_method_covers_the_class_of_self(tmp_path):
    files = {
        "pkg/__init__.py": "",
        "pkg/base.py": """
            class Base:
                def step(self, x):
                    return x + 1
        """,
        "pkg/model.py": """
            import functools, sys
            import DC as dc
            from pkg.base import Base

            BASE = 0.5

            def boost():
                return 7

            class Pricer(Base):
                RATE = BASE * 2

                def __init__(self, n):
                    self.n = n

                @property
                def scale(self):
                    return 3

                @functools.cached_property
                def extra(self):
                    return boost()

                @dc.memoize(sys.argv[1])
                def total(self, x):
                    print("computed")
                    return self.step(x) * self.RATE * self.scale + self.n + self.extra
        """,
    }
    job = "from pkg.model import Pricer\nprint(Pricer(1).total(2))\n"
    edits_recompute(tmp_path, files, job, [
        ("pkg/base.py", "return x + 1", "return x + 2"),  # an inherited method self calls
        ("pkg/model.py", "RATE = BASE * 2", "RATE = BASE * 3"),  # a class attribute
        ("pkg/model.py", "BASE = 0.5", "BASE = 0.25"),  # a class attribute set from a module constant
        ("pkg/model.py", "return 3", "return 4"),  # a property
        ("pkg/model.py", "return 7", "return 8"),  # what a cached_property calls
    ])



def test_identity_of_a_method_covers_a_subclass_that_self_is(tmp_path):
    job = """
        class Base:
            @dc.memoize(sys.argv[1])
            def total(self, x):
                print("computed")
                return self.step(x)

            def step(self, x):
                return x

        class Sub(Base):
            def step(self, x):
                return x * {body}

        print(Sub().total(3))
    """
    assert run_job(tmp_path, job.format(body="2")) == ["computed", "6"]
    assert run_job(tmp_path, job.format(body="2")) == ["6"]
    assert run_job(tmp_path, job.format(body="2 + 1")) == ["computed", "7"], "an override in the class of self"

VALUES_MODULE = """
    import collections, dataclasses, datetime, decimal, enum, functools, pathlib

    CONFIG = {"scale": 2, "names": ["a", "b"]}
    COLUMNS = ["x", "y"]
    ROOT = pathlib.Path("data/in")

    class Mode(enum.Enum):
        FAST = 1
        SLOW = 2

    MODE = Mode.FAST
    Limits = collections.namedtuple("Limits", "low high")
    LIMITS = Limits(0, 10)

    @dataclasses.dataclass(frozen=True)
    class Options:
        depth: int = 1

    OPTIONS = Options()
    START = datetime.date(2024, 1, 1)
    TAX = decimal.Decimal("0.20")

    def double(x):
        return x * 2

    def triple(x):
        return x * 3

    HANDLERS = {"d": double}
    PIPELINE = (triple,)

    def mul(a, b):
        return a * b

    SCALE = functools.partial(mul, 3)

    def make(k):
        def times(x):
            return x * k
        return times

    TIMES = make(2)

    class Counter:
        def __init__(self, start):
            self.start = start

        def value(self):
            return self.start

    COUNTER = Counter(5)
"""


def test_identity_covers_module_level_values_of_any_type(tmp_path):
    files = {
        "pkg/__init__.py": "",
        "pkg/conf.py": VALUES_MODULE,
        "pkg/main.py": """
            import sys
            import DC as dc
            from pkg import conf
            from pkg.conf import CONFIG, COLUMNS

            @dc.memoize(sys.argv[1])
            def run(x):
                print("computed")
                return (CONFIG["scale"], len(COLUMNS), str(conf.ROOT), conf.MODE.value, conf.LIMITS.high,
                        conf.OPTIONS.depth, conf.START.year, float(conf.TAX), conf.HANDLERS["d"](x),
                        conf.PIPELINE[0](x), conf.SCALE(x), conf.TIMES(x), conf.COUNTER.value())
        """,
    }
    conf = "pkg/conf.py"
    edits_recompute(tmp_path, files, "from pkg.main import run\nprint(run(2))\n", [
        (conf, '"scale": 2', '"scale": 3'),  # a dict
        (conf, '["x", "y"]', '["x", "y", "z"]'),  # a list
        (conf, 'Path("data/in")', 'Path("data/out")'),  # a Path
        (conf, "MODE = Mode.FAST", "MODE = Mode.SLOW"),  # an Enum member
        (conf, "Limits(0, 10)", "Limits(0, 20)"),  # a namedtuple
        (conf, "depth: int = 1", "depth: int = 2"),  # a frozen dataclass
        (conf, "date(2024, 1, 1)", "date(2025, 1, 1)"),  # a date
        (conf, '"0.20"', '"0.25"'),  # a Decimal
        (conf, '{"d": double}', '{"d": triple}'),  # a registry of functions
        (conf, "return x * 3", "return x * 3 + 1"),  # a function in a tuple
        (conf, "partial(mul, 3)", "partial(mul, 4)"),  # a partial's arguments
        (conf, "return a * b", "return a * b + 1"),  # a partial's function
        (conf, "make(2)", "make(5)"),  # a factory-made closure's captured value
        (conf, "Counter(5)", "Counter(6)"),  # a module-level instance's state
        (conf, "return self.start", "return self.start + 1"),  # its class's code
    ])


def test_identity_covers_module_level_numpy_arrays(tmp_path):
    pytest.importorskip("numpy")
    files = {
        "weights.py": """
            import sys
            import numpy as np
            import DC as dc
            WEIGHTS = np.array([1.0, 2.0, 3.0])

            @dc.memoize(sys.argv[1])
            def score(x):
                print("computed")
                return float((WEIGHTS * x).sum())
        """,
    }
    edits_recompute(tmp_path, files, "from weights import score\nprint(score(2))\n", [("weights.py", "3.0]", "4.0]")])


FOLLOWER_FILES = {
    "statistics.py": """
        def mean(values):
            return sum(values) / len(values)
    """,
    "nspkg/tools.py": """
        def inc(x):
            return x + 1
    """,
    "plugins/rules.py": """
        def bonus(x):
            return 10
    """,
    "pkg/__init__.py": "",
    "pkg/late.py": """
        def f(x):
            return x * 7
    """,
    "pkg/ops.py": """
        def op_square(x):
            return x * x
    """,
    "pkg/names.py": """
        from pkg import ops

        def by_name(name, x):
            return getattr(ops, name)(x)
    """,
    "pkg/shapes.py": """
        class Shape:
            def area(self):
                return 1
    """,
    "pkg/main.py": """
        import functools, importlib.util, os, sys
        import DC as dc
        import statistics
        import nspkg.tools
        from pkg.names import by_name
        from pkg.shapes import Shape

        _spec = importlib.util.spec_from_file_location("rules_plugin", os.path.join(os.path.dirname(__file__), "..", "plugins", "rules.py"))
        rules = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(rules)

        class Square(Shape):
            pass

        @functools.singledispatch
        def fmt(x):
            return "object"

        @fmt.register(int)
        def _(x):
            return "int"

        class Retry:
            def __init__(self, func):
                self.func = func
                self.times = 2

            def __call__(self, *args):
                return [self.func(*args) for _ in range(self.times)]

        @Retry
        def fetch(x):
            return x * 10

        def scaled(k):
            def decorate(func):
                @functools.wraps(func)
                def wrapper(*args):
                    return func(*args) * k
                return wrapper
            return decorate

        def shift(x):
            return x + 100

        @dc.memoize(sys.argv[1])
        @scaled(2)
        def run(x, transform=shift):
            print("computed")
            from pkg import late
            return (statistics.mean([x, 3]), nspkg.tools.inc(x), rules.bonus(x), late.f(x), Square().area(), fmt(x),
                    fetch(x), transform(x), by_name("op_square", x))
    """,
}


def test_identity_follows_what_the_follower_missed(tmp_path):
    edits_recompute(tmp_path, FOLLOWER_FILES, "from pkg.main import run\nprint(run(2))\n", [
        ("statistics.py", "/ len(values)", "/ len(values) + 1"),  # an own module named like a stdlib one
        ("nspkg/tools.py", "x + 1", "x + 2"),  # a namespace package
        ("plugins/rules.py", "return 10", "return 11"),  # spec_from_file_location
        ("pkg/late.py", "x * 7", "x * 8"),  # an import inside the body
        ("pkg/shapes.py", "return 1", "return 2"),  # an inherited method
        ("pkg/main.py", 'return "int"', 'return "INT"'),  # a singledispatch registry
        ("pkg/main.py", "self.times = 2", "self.times = 3"),  # a class-based decorator
        ("pkg/main.py", "return x * 10", "return x * 11"),  # the function it decorates
        ("pkg/main.py", "@scaled(2)", "@scaled(3)"),  # an inner decorator's argument
        ("pkg/main.py", "return x + 100", "return x + 101"),  # a default argument that is a function
        ("pkg/ops.py", "return x * x", "return x * x * x"),  # getattr on an own module
    ])


def test_identity_follows_a_package_of_50_modules_completely(tmp_path):
    files = {"big/__init__.py": ""}
    for m in range(50):
        body = [f"from big import m{m + 1}\n" if m < 49 else ""]
        for n in range(6):  # Each function calls the next: 300 functions in one chain.
            call = f"f{n + 1}(x)" if n < 5 else f"m{m + 1}.f0(x)" if m < 49 else "0"
            body.append(f"def f{n}(x):\n    return x + {n} + {call}\n")
        files[f"big/m{m}.py"] = "\n".join(body)
    files["big/job.py"] = "import sys\nimport DC as dc\nfrom big import m0\n\n@dc.memoize(sys.argv[1])\ndef run(x):\n    print('computed')\n    return m0.f0(x)\n"
    edits_recompute(tmp_path, files, "from big.job import run\nprint(run(1))\n", [("big/m49.py", "return x + 5 + 0", "return x + 5 + 1")])


def test_identity_of_an_installed_distribution_is_its_record(tmp_path):
    site = tmp_path / "env" / "site-packages"
    files = {
        "env/site-packages/mylib/__init__.py": "def rate():\n    return 2\n",
        "env/site-packages/mylib-1.0.dist-info/RECORD": "mylib/__init__.py,sha256=aaaa,24\n",
        "env/site-packages/mylib-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: mylib\nVersion: 1.0\n",
        "job_lib.py": "import sys\nimport mylib\nimport DC as dc\n\n@dc.memoize(sys.argv[1])\ndef run(x):\n    print('computed')\n    return x * mylib.rate()\n",
    }
    env: dict[str, str] = {}
    write_files(tmp_path, files)
    job = f"sys.path.append({str(site)!r})\nfrom job_lib import run\nprint(run(3))\n"
    assert computed(tmp_path, job, env=env) == 1 and computed(tmp_path, job, env=env) == 0
    record = site / "mylib-1.0.dist-info" / "RECORD"
    (site / "mylib" / "__init__.py").write_text("def rate():\n    return 3\n")
    assert computed(tmp_path, job, env=env) == 0, "installed code counts by its RECORD, not traced file by file"
    record.write_text("mylib/__init__.py,sha256=bbbb,24\n")  # Reinstalled, the version number unchanged.
    assert computed(tmp_path, job, env=env) == 1 and computed(tmp_path, job, env=env) == 0


def test_identity_notices_a_redefinition_or_a_reload_in_the_same_process(tmp_path):
    write_files(tmp_path, {"helpers.py": "def rate():\n    return 2\n"})
    job = """
        import importlib, pathlib
        import helpers

        def bonus():
            return 0

        @dc.memoize(sys.argv[1])
        def run(x):
            print("computed")
            return x * helpers.rate() + bonus()

        print(run(1), run(1))
        exec("def bonus():\\n    return 100\\n")  # A notebook cell run again.
        print(run(1), run(1))
        pathlib.Path("helpers.py").write_text("def rate():\\n    return 30\\n")
        importlib.reload(helpers)
        print(run(1), run(1))
        patched = {}
        exec("def rate():\\n    return 40\\n", patched)
        helpers.rate.__code__ = patched["rate"].__code__  # As %autoreload updates the old function objects.
        print(run(1), run(1))
    """
    assert run_job(tmp_path, job) == ["computed", "2", "2", "computed", "102", "102", "computed", "130", "130", "computed", "140", "140"]


def test_identity_is_of_the_code_that_ran_not_of_the_file_edited_since(tmp_path):
    write_files(tmp_path, {"helpers.py": "def rate():\n    return 2\n"})
    job = """
        import pathlib
        import helpers

        @dc.memoize(sys.argv[1])
        def run(x):
            print("computed")
            return x * helpers.rate()

        if sys.argv[2] == "edit":  # Edited after the import, before the first call.
            pathlib.Path("helpers.py").write_text("def rate():\\n    return 300\\n")
        print(run(1))
    """
    assert run_job(tmp_path, job, "edit") == ["computed", "2"], "the old code ran"
    assert run_job(tmp_path, job, "run") == ["computed", "300"], "the new code never reuses the old code's result"
    assert run_job(tmp_path, job, "run") == ["300"]


def test_callable_objects_as_the_memoized_function_never_share_entries(tmp_path):
    job = """
        class Scorer:
            def __init__(self, threshold):
                self.threshold = threshold

            def __call__(self, x):
                print("computed")
                return x > self.threshold

        low, high = dc.memoize(sys.argv[1])(Scorer(0.5)), dc.memoize(sys.argv[1])(Scorer(5))
        print(low(1), high(1))
    """
    assert run_job(tmp_path, job) == ["computed", "computed", "True", "False"]
    assert run_job(tmp_path, job) == ["True", "False"]
    assert run_job(tmp_path, job.replace("x > self", "x >= self")) == ["computed", "computed", "True", "False"]


def test_formatting_only_edits_keep_the_identity(tmp_path):
    files = {
        "fmt_job.py": '''
            import sys
            import DC as dc

            @dc.memoize(sys.argv[1])
            def run(x):
                print("computed")
                values = [x, 'a', 2]
                return compute(values, 3)

            def compute(values, factor):
                return len(values) * factor
        ''',
    }
    job = "from fmt_job import run\nprint(run(1))\n"
    edits_recompute(tmp_path, files, job, [("fmt_job.py", "* factor", "* factor + 1")], same=[
        ("fmt_job.py", "def run(x):\n", 'def run(x):\n    """Run it."""\n'),  # a docstring
        ("fmt_job.py", "'a'", '"a"'),  # quote style
        ("fmt_job.py", "[x, \"a\", 2]", "[\n        x,\n        \"a\",\n        2,\n    ]"),  # black's wrapping, trailing comma
        ("fmt_job.py", "    return len(values) * factor", "        return len(values) * factor"),  # re-indentation
    ])


def test_a_pinned_version_over_changed_code_warns_once_with_the_count(tmp_path):
    job = """
        import warnings
        warnings.simplefilter("always")

        @dc.memoize(sys.argv[1], version=1)
        def speed(x):
            return x * {factor}

        print([speed(x) for x in range(3)], [speed(x) for x in range(4)])
    """
    plain = child(job.format(factor=1), str(tmp_path / "cache"), script_file=tmp_path / "job.py", cwd=tmp_path)
    assert "DonecacheWarning" not in plain.stderr
    changed = child(job.format(factor="1.609"), str(tmp_path / "cache"), script_file=tmp_path / "job.py", cwd=tmp_path)
    assert changed.stdout.split("] [")[0] == "[0, 1, 2", "version= reuses, as documented"
    assert changed.stderr.count("DonecacheWarning") == 1, changed.stderr
    assert "speed(): version=1 is pinned but the code has changed: 4 of its entries came from other code" in changed.stderr


def test_what_cannot_be_followed_is_named_once(tmp_path):
    job = """
        import os, warnings
        warnings.simplefilter("always")

        @dc.memoize(sys.argv[1]{options})
        def load(x):
            with open(sys.argv[1] + ".txt", "w") as f:
                f.write("a")
            return eval("x + 1") + len(os.environ.get("HOME", ""))

        print(load(1), load(1))
    """
    warned = child(job.format(options=""), str(tmp_path / "cache"), script_file=tmp_path / "job.py", cwd=tmp_path)
    assert warned.stderr.count("DonecacheWarning") == 1
    for construct in ("eval()", "open() (files read at run time)", "os.environ", "Pass version="):
        assert construct in warned.stderr
    quiet = child(job.format(options=", version=1"), str(tmp_path / "cache2"), script_file=tmp_path / "job.py", cwd=tmp_path)
    assert "DonecacheWarning" not in quiet.stderr, "version= answers it"


# -- what is in a call's key: arguments ------------------------------------------


def test_an_enum_argument_has_one_key_at_any_call_depth(tmp_path):
    """An Enum's class attributes hold its own instances, so working out the class's
    code met the class again; it recursed until RecursionError and the key's text
    depended on how deep the first call was: each call site missed the others' entries."""
    (tmp_path / "colors.py").write_text("import enum\n\nclass Color(enum.Enum):\n    RED = 1\n    BLUE = 2\n")
    script = """
        import sys
        sys.path.insert(0, sys.argv[1])
        from colors import Color
        def deep(n):
            return dc._text(Color.RED) if n == 0 else deep(n - 1)
        print(deep(int(sys.argv[2])))
    """
    texts = {child(script, str(tmp_path), str(depth)).stdout for depth in (0, 60, 300, 700)}
    assert len(texts) == 1, texts
    (tmp_path / "colors.py").write_text(
        "import enum\n\nclass Color(enum.Enum):\n    RED = 1\n    BLUE = 2\n\n    def warm(self):\n        return self is Color.RED\n"
    )
    assert child(script, str(tmp_path), "0").stdout not in texts  # The class's code still counts.

ARGUMENT_HELPERS = """
import functools
dc = __import__("__main__").dc

def scale(x):
    return x * {factor}

class Scaler:
    def __init__(self, by):
        self.by = by

    def apply(self, x):
        return x * self.by * {factor}

@functools.lru_cache(maxsize=None)
def cached_scale(x):
    return x * {factor}
"""


def test_functions_classes_and_objects_passed_as_arguments_are_keyed_by_their_code(tmp_path):
    job = """
        import functools, helpers, other
        @dc.memoize(sys.argv[1])
        def apply(fn, x):
            print("computed", end=" ")
            return fn(x) if callable(fn) else fn.apply(x)
        for arg in (helpers.scale, functools.partial(helpers.scale), helpers.Scaler(1).apply, helpers.Scaler(1),
                    helpers.cached_scale, other.cached_scale, lambda x: helpers.scale(x)):
            print(apply(arg, 3))
    """
    (tmp_path / "other.py").write_text(textwrap.dedent(ARGUMENT_HELPERS.format(factor=100)))

    def run(factor: int) -> list[str]:
        (tmp_path / "helpers.py").write_text(textwrap.dedent(ARGUMENT_HELPERS.format(factor=factor)))
        return run_job(tmp_path, job)

    assert run(2) == ["computed", "6"] * 5 + ["computed", "300"] + ["computed", "6"]
    assert run(2) == ["6"] * 5 + ["300", "6"], "an unchanged rerun hits"
    assert run(5) == ["computed", "15"] * 5 + ["300"] + ["computed", "15"], "an edit of the code passed recomputes"


def test_same_named_functions_are_different_arguments(tmp_path, calls):
    import functools

    @dc.memoize(tmp_path)
    def apply(fn, x):
        calls.append(x)
        return fn(x)

    first = types.FunctionType(compile("def twice(x): return 2 * x", "a.py", "exec").co_consts[0], {})
    second = types.FunctionType(compile("def twice(x): return 3 * x", "b.py", "exec").co_consts[0], {})
    assert apply(first, 1) == 2 and apply(second, 1) == 3, "two functions named twice"
    assert apply(functools.lru_cache()(first), 1) == 2 and apply(functools.lru_cache()(second), 1) == 3
    english, french = {"one": "one"}, {"one": "un"}
    assert apply(english.get, "one") == "one" and apply(french.get, "one") == "un", "bound built-ins by their object"
    double, triple = (lambda x: 2 * x), (lambda x: 3 * x)
    assert apply(double, 4) == 8 and apply(triple, 4) == 12, "lambdas on one line by their bytecode"

    def times(n):
        return lambda x: n * x

    assert apply(times(2), 5) == apply(times(2), 5) == 10 and apply(times(3), 5) == 15, "closures by their values"
    assert apply(len, "ab") == 2 and apply(len, "ab") == 2
    assert calls == [1, 1, "one", "one", 4, 4, 5, 5, "ab"], "a wrapped function is what it wraps"


def test_ordered_dicts_and_negative_nan_have_their_own_keys(tmp_path, calls):
    import collections

    @dc.memoize(tmp_path)
    def first(value):
        calls.append(value)
        return repr(value)

    ab, ba = collections.OrderedDict(a=1, b=2), collections.OrderedDict(b=2, a=1)
    assert first(ab) != first(ba) and len(calls) == 2, "OrderedDicts equal only in the same order"
    assert first({"a": 1, "b": 2}) == first({"b": 2, "a": 1}) and len(calls) == 3, "plain dicts ignore order"
    nan = float("nan")
    negative = -nan
    for value in (nan, negative, (nan, 1), (negative, 1), [negative], complex(negative, 0), complex(nan, 0)):
        first(value)
        first(value)
    assert len(calls) == 10, "-nan is not nan (alone, in a tuple of scalars, in a list, in a complex)"
    assert dc._text(negative) == "float:-nan,0.0" and dc._text(nan) == "nan", "nan keeps its 0.2.0 key"


def _double(x):
    return 2 * x


def _triple(x):
    return 3 * x


def _call_both(pair):
    return [fn(5) for fn in pair]


def test_functional_memoized_functions_keep_their_own_identity_when_pickled(tmp_path):
    from concurrent.futures import ProcessPoolExecutor

    pair = (dc.memoize(tmp_path)(_double), dc.memoize(tmp_path)(_triple))  # Neither called yet.
    assert _call_both(pickle.loads(pickle.dumps(pair))) == [10, 15]
    context = None if sys.platform == "win32" else __import__("multiprocessing").get_context("fork")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        assert pool.submit(_call_both, pair).result() == [10, 15], "one task, two steps: each ran its own"


def test_path_arguments_share_entries_across_cpython_versions(tmp_path):
    job = """
        import pathlib
        @dc.memoize(sys.argv[1])
        def stem(path, pure):
            print("computed")
            return path.stem + pure.stem
        print(stem(pathlib.Path("/data/in.csv"), pathlib.PureWindowsPath("C:/data/b.txt")))
    """
    assert_computed_once_across_pythons(tmp_path, job, "inb")


def test_enum_and_dataclass_arguments_of_a_script_share_entries_with_its_import(tmp_path):
    job = """
        import dataclasses, enum
        class Unit(enum.Enum):
            KM = "km"
        @dataclasses.dataclass(frozen=True)
        class Config:
            unit: Unit
            rate: float
        @dc.memoize(sys.argv[1])
        def convert(config, miles):
            print("computed")
            return f"{miles * config.rate:.1f} {config.unit.value}"
        if __name__ == "__main__":
            print(convert(Config(Unit.KM, 1.6), 10))
    """
    assert run_job(tmp_path, job) == ["computed", "16.0", "km"]
    imported = "import job\nprint(job.convert(job.Config(job.Unit.KM, 1.6), 10))"
    path = f"{IMPORT_ROOT}{os.pathsep}{tmp_path}"
    assert child(imported, str(tmp_path / "cache"), cwd=tmp_path, env={"PYTHONPATH": path}).stdout.split() == ["16.0", "km"]


def test_a_script_in_a_package_shares_entries_with_its_run_as_a_module(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "job.py").write_text(textwrap.dedent(f"""
        import importlib, sys
        dc = importlib.import_module({MODULE!r})
        @dc.memoize(sys.argv[1])
        def transform(x):
            print("computed")
            return x + 1
        print(transform(1))
    """))
    outputs = [
        child("", str(tmp_path / "cache"), run=how, cwd=tmp_path).stdout.split()
        for how in (["pkg/job.py"], ["-m", "pkg.job"], ["pkg/job.py"])
    ]
    assert outputs == [["computed", "2"], ["2"], ["2"]]


def test_big_buffers_are_hashed_in_place(tmp_path, calls):
    import tracemalloc

    @dc.memoize(tmp_path)
    def size(data):
        calls.append(type(data))
        return len(data)

    big = bytes(100 * 2**20)
    changed = bytearray(big)
    changed[-1] = 1
    text = "e" * (20 * 2**20)
    values = [big, changed, memoryview(changed), memoryview(big), "é" * len(text), text, text[:-1] + "f"]
    size(b"")  # The first call works out the code identity (it parses this file): not traced.
    calls.clear()
    for value in values:
        tracemalloc.start()
        size(value)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 3 * 2**20, f"{type(value).__name__}: {peak} bytes allocated to key it"
    assert len(calls) == len(values), "one byte, the type, or a character apart: other keys"
    assert [size(value) for value in values] and len(calls) == len(values), "equal values hit"
    assert size(memoryview(big)[::2]) == 50 * 2**20 and len(calls) == len(values) + 1, "a strided view works"


def test_file_digest_follows_the_contents(tmp_path, calls):
    data = tmp_path / "in.csv"
    data.write_text("a,b\n1,2\n")
    old = time.time() - 60
    os.utime(data, (old, old))

    @dc.memoize(tmp_path / "cache", key=lambda path: (str(path), dc.file_digest(path)))
    def rows(path):
        calls.append(path)
        return Path(path).read_text().count("\n")

    assert rows(data) == rows(data) == 2 and len(calls) == 1
    quick = dc.file_digest(data, quick=True)
    data.write_text("a,b\n3,4\n")  # Same size...
    os.utime(data, (old, old))  # ...and mtime: only the contents tell.
    assert dc.file_digest(data, quick=True) == quick
    assert rows(data) == 2 and len(calls) == 2, "new contents recompute"
    data.write_text("a,b\n5,6\n")  # Within the same second: the memo is not trusted.
    assert rows(data) == 2 and len(calls) == 3
    with pytest.raises(OSError):  # Linux: "... is a directory, not a regular file"; Windows: access denied.
        dc.file_digest(tmp_path)
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")
        with pytest.raises(OSError, match="FIFO"):
            dc.file_digest(tmp_path / "fifo")


@pytest.fixture
def coarse_clock_dir(tmp_path):
    """A loop-mounted ext4 with 128-byte inodes, whose timestamps have whole seconds
    (as on ext3, HFS+ or many NFS servers); skips where it cannot be mounted."""
    mkfs, mount = shutil.which("mkfs.ext4"), shutil.which("mount")
    if sys.platform != "linux" or not IS_ROOT or mkfs is None or mount is None:
        pytest.skip("needs root, mkfs.ext4 and mount(8) on Linux")
    image, mnt = tmp_path / "ext4.img", tmp_path / "coarse"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(8 * 2**20)
    subprocess.run([mkfs, "-q", "-F", "-I", "128", str(image)], check=True, capture_output=True)
    made = subprocess.run([mount, "-o", "loop", str(image), str(mnt)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a loop device here: {made.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_file_digest_reads_a_file_rewritten_within_its_timestamps_tick(coarse_clock_dir):
    data = coarse_clock_dir / "in.csv"
    for _ in range(5):  # Size, mtime and ctime all equal: only the bytes tell.
        data.write_text("a,b\n7,8\n")
        first = dc.file_digest(data)
        data.write_text("a,b\n9,0\n")
        assert dc.file_digest(data) != first


def test_pandas_values_are_keyed_by_what_they_hold(tmp_path, calls):
    pd = pytest.importorskip("pandas")
    show = counted(tmp_path, calls, repr)
    one = pd.DataFrame({"a": [1, 2], "b": [3.0, 4.0]})
    split = pd.DataFrame({"a": [1, 2]})
    split["b"] = [3.0, 4.0]  # Another block layout, the same frame.
    assert show(one) == show(split) and len(calls) == 1
    low_high = pd.CategoricalDtype(["low", "high"], ordered=True)
    cats = [
        pd.Series(["low", "high"], dtype=low_high),
        pd.Series(["low", "high"], dtype=pd.CategoricalDtype(["high", "low"], ordered=True)),
        pd.Series(["low", "high"], dtype=pd.CategoricalDtype(["low", "high"], ordered=False)),
        pd.Series(["low", "high"], dtype=pd.CategoricalDtype(["low", "high", "mid"], ordered=True)),
    ]
    for series in cats:
        show(series)
    assert len(calls) == 5, "categories and their order are in the key"
    index = [(1, "a"), (2, "b")]
    show(pd.Series([1, 2], index=pd.MultiIndex.from_tuples(index, names=["x", "y"])))
    show(pd.Series([1, 2], index=pd.MultiIndex.from_tuples(index, names=["x", "z"])))
    assert len(calls) == 7, "MultiIndex level names are in the key"
    times = pd.date_range("2024-03-30", periods=3, freq="h")
    for value in (pd.NaT, pd.Timestamp("2024-01-01"), pd.Timestamp("2024-01-01", tz="UTC"), pd.Timedelta("1h"),
                  pd.Series(times.tz_localize("UTC")), pd.Series(times.tz_localize("Europe/Paris")),
                  pd.DataFrame({"t": times.tz_localize("UTC")}, index=times.tz_localize("Asia/Tokyo"))):
        show(value)
        show(value)
    assert len(calls) == 14, "pandas scalars and tz-aware values are valid, their zones apart"


def test_arrow_values_are_keyed_by_their_buffers(tmp_path, calls):
    pa = pytest.importorskip("pyarrow")
    rows = counted(tmp_path, calls, len)
    values = [pa.table({"a": [1, 2, None], "s": ["x", "y", "z"]}), pa.table({"a": [1, 2, 3], "s": ["x", "y", "z"]}),
              pa.table({"a": [1, 2, None], "s": ["x", "y", "w"]}), pa.table({"l": [[1], [2, 3]]}),
              pa.table({"l": [[1, 2], [3]]}), pa.array(["a", "b"]).dictionary_encode(),
              pa.array(["c", "d"]).dictionary_encode()]
    for value in values + [pa.table({"a": [1, 2, None], "s": ["x", "y", "z"]})]:
        rows(value)
    assert len(calls) == len(values)
    import tracemalloc

    big = pa.table({"n": pa.array(range(8 * 2**20), pa.int64())})  # 64 MiB
    tracemalloc.start()
    assert rows(big) == 8 * 2**20
    assert tracemalloc.get_traced_memory()[1] < 2**20, "keyed from its buffers, not copied into bytes"
    tracemalloc.stop()
    pl = pytest.importorskip("polars")
    rows(pl.DataFrame({"a": [1, 2]}))
    rows(pl.DataFrame({"a": [1, 2]}))
    rows(pl.DataFrame({"a": [1, 3]}))
    assert len(calls) == len(values) + 3


# -- memoize: small hits served in process (issue 20) -----------------------------
#
# A small entry read or written lately is kept as its pickle's bytes and served
# after one lstat that finds the very same file (inode, size, owner, mode, and
# a modification time set to the nanosecond or settled past the clock's tick).


def test_a_written_entry_kept_in_process_is_the_entry_its_file_holds(tmp_path):
    for compress in (False, "zlib", "lzma"):
        @dc.memoize(tmp_path / str(compress), compress=compress, ttl=3600)
        def text(x):
            return "text " * 300 + str(x)

        text(1)
        [path] = entry_files(tmp_path / str(compress))
        kept, (read, _) = dc._recent[str(path)][1], dc._load_entry(str(path))
        fields = ("key", "created", "expires", "flags")
        assert [getattr(kept, f) for f in fields] == [getattr(read, f) for f in fields], compress
        assert (bytes(kept.meta), bytes(kept.stream)) == (bytes(read.meta), bytes(read.stream)), compress


def memo_stamp_matches(path: Path) -> bool:
    kept = dc._recent.get(str(path))
    return kept is not None and kept[0] == dc._stamp(os.lstat(path))


def test_in_process_hits_unpickle_afresh_so_a_mutated_result_changes_nothing(tmp_path, calls):
    @dc.memoize(tmp_path)
    def f(x):
        calls.append(x)
        return {"x": [x]}

    first = f(1)
    assert memo_stamp_matches(entry_files(tmp_path)[0]), "a small entry just written is kept"
    first["x"].append("changed")
    second = f(1)
    assert second == {"x": [1]} and second is not first
    second["x"].clear()
    assert f(1) == {"x": [1]} and calls == [1]


@pytest.mark.parametrize("max_bytes", [None, 10**8])
@pytest.mark.parametrize("clock", ["fine", "whole seconds"])
def test_an_entry_replaced_twice_by_another_writer_is_seen_at_the_next_hit(tmp_path, request, clock, max_bytes):
    """The writer's replacements copy in another store's entry for the same key (the same size),
    twice within microseconds, so the second file often gets the first one's inode back, in the
    same tick of the filesystem clock; the kept entry must not be taken for it. Where file times
    are whole seconds, a new file shares a kept one's time for up to a second (and with max_bytes a
    read within the second records no use that would set a time of its own)."""
    root = tmp_path if clock == "fine" else request.getfixturevalue("coarse_clock_dir")
    state = {"value": 0}

    def f(x):
        return state["value"] + x

    here, there = (dc.memoize(root / name, max_bytes=max_bytes)(f) for name in ("here", "there"))
    for attempt in range(30):
        state["value"] = 1000 + attempt
        assert here.refresh(1) == 1001 + attempt and here(1) == 1001 + attempt
        state["value"] = 2000 + attempt
        assert there.refresh(1) == 2001 + attempt
        (ours,), (theirs,) = entry_files(root / "here"), entry_files(root / "there")
        assert ours.stat().st_size == theirs.stat().st_size
        for _ in range(2):  # What another process does: copy aside, rename over the name.
            temp = ours.with_name(".dc~" + "0" * 16 + "~copy")
            shutil.copyfile(theirs, temp)
            os.replace(temp, ours)
        assert here(1) == 2001 + attempt, f"attempt {attempt}: the replaced entry's old value was served"


def test_an_entry_replaced_while_its_use_is_recorded_is_seen_at_the_next_hit(tmp_path, monkeypatch):
    """A read that records a use, and another process's forget and recompute just after it: the use must
    land on the file read (through its descriptor), never by name on the new file, which may reuse the
    freed inode and the same size, and would then look like the kept one."""
    state = {"value": 0}

    def f(x):
        return state["value"] + x

    here, there = dc.memoize(tmp_path / "here")(f), dc.memoize(tmp_path / "there")(f)
    load = dc._load_entry
    for attempt in range(10):
        state["value"] = 1000 + attempt
        assert here.refresh(1) == 1001 + attempt
        state["value"] = 2000 + attempt
        assert there.refresh(1) == 2001 + attempt
        (ours,), (theirs,) = entry_files(tmp_path / "here"), entry_files(tmp_path / "there")
        os.utime(ours, (time.time() - 600,) * 2)  # Last used ten minutes ago: the next read records a use.

        def replaced_after(*args, **kwargs):
            found = load(*args, **kwargs)
            os.unlink(ours)  # What another process does right after this one's read: forget, compute again.
            temp = ours.with_name(".dc~" + "0" * 16 + "~copy")
            shutil.copyfile(theirs, temp)  # On the inode just freed, where the filesystem reuses it (ext4).
            os.replace(temp, ours)
            return found

        monkeypatch.setattr(dc, "_load_entry", replaced_after)
        assert here(1) == 1001 + attempt, "the read itself saw the file it opened"
        monkeypatch.setattr(dc, "_load_entry", load)
        assert here(1) == 2001 + attempt, f"attempt {attempt}: the replaced entry's old value was served"


def test_another_process_replacing_an_entry_is_seen_at_the_next_hit(tmp_path, monkeypatch):
    (tmp_path / "memo_replaced.py").write_text(
        "import os, donecache\n"
        "@donecache.memoize(os.environ['MEMO_DIR'], version=1)\n"
        "def f(x):\n"
        "    return int(os.environ['MEMO_ADD']) + x\n"
    )
    monkeypatch.setenv("MEMO_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MEMO_ADD", "5")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "donecache", dc)
    import memo_replaced

    assert memo_replaced.f(1) == 6 and memo_replaced.f(1) == 6
    script = "import sys; sys.path.insert(0, sys.argv[1]); import memo_replaced; print(memo_replaced.f.refresh(1))"
    proc = child(script, str(tmp_path), env={"MEMO_ADD": "7"})
    assert proc.stdout.split() == ["8"]
    assert memo_replaced.f(1) == 8


def test_in_process_hits_record_their_use_under_max_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(dc, "_USE_GRAIN_BOUNDED", 0.2)  # A shorter grain than the second, for a quick test.

    @dc.memoize(tmp_path, max_bytes=1 << 30)
    def f(x):
        return x

    f(1)
    (path,) = entry_files(tmp_path)
    seen = [path.stat().st_mtime_ns]
    for _ in range(3):
        assert f(1) == 1 and path.stat().st_mtime_ns == seen[-1], "a use within the grain of the last is recorded"
        time.sleep(0.25)
        assert f(1) == 1
        seen.append(path.stat().st_mtime_ns)
        assert memo_stamp_matches(path), "the use is recorded and the entry stays kept"
    assert seen == sorted(set(seen)), f"every hit a grain after the last use records its use: {seen}"
    assert all(later - earlier >= 0.2e9 for earlier, later in zip(seen, seen[1:])), seen


def test_hits_under_max_bytes_record_uses_to_the_second(tmp_path):
    @dc.memoize(tmp_path, max_bytes=1 << 30)
    def f(x):
        return x

    f(1)
    (path,) = entry_files(tmp_path)
    os.utime(path, ns=(time.time_ns() - 1_100_000_000,) * 2)  # Used 1.1 s ago: a read records the use.
    before = path.stat().st_mtime_ns
    assert f(1) == 1 and path.stat().st_mtime_ns > before + 1_000_000_000
    after = path.stat().st_mtime_ns
    assert f(1) == 1 and f.is_cached(1) and path.stat().st_mtime_ns == after, "within the second: no second write"
    assert memo_stamp_matches(path)


def test_in_process_hits_honour_ttl(tmp_path, calls):
    @dc.memoize(tmp_path, ttl=0.3)
    def f(x):
        calls.append(x)
        return x

    assert f(1) == 1 and f(1) == 1 and calls == [1]
    assert memo_stamp_matches(entry_files(tmp_path)[0])
    time.sleep(0.35)
    assert f(1) == 1 and calls == [1, 1], "an expired entry is recomputed, kept or not"


def test_in_process_memory_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(dc, "_RECENT_COUNT", 5)
    dc._recent.clear()

    @dc.memoize(tmp_path)
    def f(x):
        return "y" * x

    for x in range(20):
        f(x)
        assert len(dc._recent) <= 5
    f(dc._RECENT_SIZE + 1)
    big = [p for p in entry_files(tmp_path) if p.stat().st_size > dc._RECENT_SIZE]
    assert big and str(big[0]) not in dc._recent, "entries bigger than _RECENT_SIZE are never kept"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/mountinfo")
def test_only_local_filesystems_let_lstat_vouch_for_an_entry(tmp_path, monkeypatch, calls):
    assert dc._stat_trusted(str(tmp_path)) and not dc._stat_trusted("/proc/self")
    monkeypatch.setattr(dc, "_stat_trusted", lambda path: False)  # As on NFS.
    dc._recent.clear()

    @dc.memoize(tmp_path)
    def f(x):
        calls.append(x)
        return x

    assert f(1) == 1 and f(1) == 1 and calls == [1]
    time.sleep(dc._RECENT_SETTLED / 1e9 + 0.01)  # Settled: a local filesystem's entry would be kept now.
    assert f(1) == 1 and calls == [1] and not dc._recent


def test_remembered_keys_never_keep_a_big_argument_alive(tmp_path):
    """The key memo holds its arguments: a 4 MiB bytes or str argument is keyed afresh
    instead, so thousands of big calls cannot pin their arguments in memory."""

    @dc.memoize(tmp_path / "c")
    def f(value):
        return len(value)

    big_bytes, big_text, small = b"x" * (4 << 20), "y" * (4 << 20), "z" * 10
    assert f(small) == f(small) == 10 and f(big_bytes) == f(big_bytes) == 4 << 20 and f(big_text) == 4 << 20
    kept = [a for args in f._keys for a in args]
    assert small in kept and not any(a is big_bytes or a is big_text for a in kept)


def test_remembered_keys_keep_equal_but_different_arguments_apart(tmp_path, calls):
    @dc.memoize(tmp_path)
    def f(x):
        calls.append(x)
        return repr(x)

    values = [1, True, 1.0, 0, 0.0, -0.0, False, "1", b"1", None]
    for _ in range(2):
        assert [f(v) for v in values] == [repr(v) for v in values]
    assert len(calls) == len(values)


@posix_only
def test_a_kept_lock_handle_of_a_removed_store_is_not_reused(tmp_path):
    """Lock handles stay open between locks (issue 20); a store removed and made again has a
    new lock file, and a handle of the old one would exclude no other process."""
    root = tmp_path / "store"
    files = dc._EntryFiles(root, "c", False)
    lock = dc._KeyLock(files.lock_path, 5)
    lock.acquire()
    lock.release()  # Its handle is kept for the next lock of this file.
    shutil.rmtree(root)
    files = dc._EntryFiles(root, "c", False)
    time.sleep(1.1)  # A kept handle's link count is checked once a second.
    lock = dc._KeyLock(files.lock_path, 5)
    lock.acquire()
    try:
        script = "print(dc._KeyLock(sys.argv[1], 5).try_acquire())"
        assert child(script, files.lock_path).stdout.split() == ["False"], "another process took a held lock"
    finally:
        lock.release()


# -- import: cheap, and lazy imports that survive threads and interrupts (issue 20) --


def test_import_loads_none_of_the_costly_modules(tmp_path):
    script = (
        "import sys; before = set(sys.modules); import importlib; importlib.import_module(sys.argv[1]); "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    loaded = child("", MODULE, run=["-c", script])
    costly = {"pickle", "shelve", "collections", "weakref", "re", "enum", "typing", "functools", "hashlib", "json",
              "fcntl", "struct", "zlib"}
    assert not costly & set(loaded.stdout.split()), loaded.stdout


@pytest.mark.parametrize("first", ["store", "memoize"])
@pytest.mark.parametrize("module", ["pickle", "shelve", "weakref", "collections", "fcntl", "struct", "zlib"])
def test_an_interrupted_first_import_leaves_donecache_working(tmp_path, module, first):
    """A KeyboardInterrupt inside the first import of what a store or memoize needs
    (injected by an import hook, once), then the same calls again: they work."""
    script = f"""
        import sys, importlib.abc
        class Interrupt(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == {module!r}:
                    sys.meta_path.remove(self)
                    raise KeyboardInterrupt
        for name in [m for m in sys.modules if m == {module!r} or m.startswith({module!r} + ".")]:
            del sys.modules[name]  # As in a process that has not imported it yet.
        sys.meta_path.insert(0, Interrupt())
        def store():
            with dc.open(sys.argv[1] + "/store") as db:
                db["k"] = [1]
                assert db["k"] == [1]
        def memoize():
            @dc.memoize(sys.argv[1] + "/memo")
            def f(x):
                return [x]
            assert f(2) == [2] and f(2) == [2]
        def use():
            for step in (store, memoize) if sys.argv[2] == "store" else (memoize, store):
                step()
        try:
            use()
        except KeyboardInterrupt:
            print("interrupted")
        use()
        print("ok")
    """
    assert child(script, str(tmp_path), first).stdout.split()[-1] == "ok"


def test_first_uses_in_many_threads_at_once(tmp_path):
    script = """
        import sys, threading
        barrier, errors = threading.Barrier(8), []
        def run(i):
            try:
                barrier.wait()
                with dc.open(f"{sys.argv[1]}/store{i % 2}") as db:
                    db[str(i)] = {"i": i}
                    assert db[str(i)] == {"i": i}
                @dc.memoize(sys.argv[1] + "/memo")
                def f(x):
                    return {"x": x}
                assert f(i) == {"x": i} and f(i) == {"x": i}
            except BaseException as exc:
                errors.append(repr(exc))
        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        print(errors or "ok")
    """
    for _ in range(3):
        assert child(script, str(tmp_path)).stdout.strip() == "ok"


# -- the size limit (max_bytes) ------------------------------------------------


def disk_bytes(root: Path) -> int:
    """Bytes on disk of a store's entry files, as `info` counts them."""
    return sum(os.lstat(p).st_blocks * 512 for p in entry_files(root))


@posix_only
def test_max_bytes_keeps_a_store_written_by_several_processes_within_the_bound_and_the_hot_entries(tmp_path):
    # 4 processes write 50 entries of 1 MiB each (200 MiB) into a store bounded
    # at 50 MiB, each hitting the same 3 hot entries after every write.
    cache, go = tmp_path / "cache", tmp_path / "go"
    script = """
        import logging, os, time
        root, who, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
        logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s", filename=f"{root}.{who}.log")

        @dc.memoize(root, max_bytes=50 * 2**20)
        def blob(i):
            return bytes([i % 256]) * 2**20

        def disk():
            total = 0
            for folder, _dirs, names in os.walk(root):
                for name in names:
                    if len(name) == 32:
                        try:
                            total += os.lstat(os.path.join(folder, name)).st_blocks * 512
                        except FileNotFoundError:
                            pass
            return total

        hot = [10_000, 10_001, 10_002]
        print("ready", flush=True)
        while not os.path.exists(go):
            time.sleep(0.001)
        for h in hot:
            blob(h)
        peak = 0
        for i in range(50):
            blob(1000 * who + i)
            for h in hot:
                blob(h)
            peak = max(peak, disk())
        print(peak, blob.cache_info().misses, blob.cache_info().maxsize, flush=True)
    """
    procs = [child(script, str(cache), str(n), str(go), background=True) for n in range(4)]
    release_together(procs, go)
    limit = 50 * 2**20
    outputs = [proc.communicate(timeout=120)[0].split() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    one_entry = max(os.lstat(p).st_blocks * 512 for p in entry_files(cache))
    for peak, _misses, maxsize in outputs:
        # The promise (docs/size-limit.md): the bound plus one entry per writer.
        assert int(peak) <= limit + 4 * one_entry, "the store grew past its bound while being written"
        assert int(maxsize) == limit
    # Each hot entry was computed once, by one of them, and never evicted.
    assert sum(int(misses) for _peak, misses, _maxsize in outputs) == 4 * 50 + 3, outputs
    assert disk_bytes(cache) <= limit
    # Every entry that is gone was evicted once, and each sweep logged one
    # line with its count and bytes: 4 x 50 + 3 distinct keys were written.
    logged = [line for n in range(4) for line in (tmp_path / f"cache.{n}.log").read_text().splitlines()]
    counts = [re.match(r"donecache evicted (\d+) entries \((\d+) bytes on disk, ", line) for line in logged]
    assert all(counts), logged[:3]
    assert sum(int(m[1]) for m in counts) == 4 * 50 + 3 - len(entry_files(cache)) > 100
    assert all(int(m[2]) == int(m[1]) * one_entry for m in counts)
    assert 10 < len(logged) < 40, "one line per sweep, a sweep per fifth of the bound written"


def shard_bytes(root: Path) -> int:
    """Bytes on disk of every file in a store's shard folders: entries and the temporary files of writers."""
    total = 0
    for folder, _dirs, names in os.walk(root):
        if len(os.path.basename(folder)) == 2:
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total


@pytest.mark.parametrize("writers", [4, 6])
def test_max_bytes_holds_on_disk_with_many_writing_processes(tmp_path, ro_mount, writers):
    # Issue 18 item 4: 4 processes writing 64 KiB entries under max_bytes=2 MiB
    # peaked at 1.7x to 6x, because one process swept while the others went on
    # writing. A monitor samples the bytes in use on a tmpfs of the store's own
    # (statvfs: the real space, temporary files and all, at one instant) as
    # fast as it can while they write.
    mnt, _read_only = ro_mount
    cache, go, limit = mnt / "cache", tmp_path / "go", 2 * 2**20

    def used() -> int:
        st = os.statvfs(mnt)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    script = """
        import os, time
        root, who, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]

        @dc.memoize(root, max_bytes=2 * 2**20)
        def blob(i):
            return os.urandom(64 * 1024 - 200)

        print("ready", flush=True)
        while not os.path.exists(go):
            time.sleep(0.001)
        for i in range(150):
            blob(1000 * who + i)
    """
    procs = [child(script, str(cache), str(n), str(go), background=True) for n in range(writers)]
    release_together(procs, go)
    peak = samples = 0
    while any(proc.poll() is None for proc in procs):
        peak, samples = max(peak, used()), samples + 1
    assert all(proc.wait() == 0 for proc in procs)
    peak -= used() - shard_bytes(cache)  # The store's own small files are not counted.
    one_entry = max(os.lstat(p).st_blocks * 512 for p in entry_files(cache))
    assert samples > 100
    # The promise (docs/size-limit.md): the bound plus one entry per writer.
    assert peak <= limit + writers * one_entry, f"peak {peak / limit:.2f}x the bound ({samples} samples)"
    assert shard_bytes(cache) <= limit


def test_a_store_filled_by_others_after_a_sweep_is_swept_again_not_overfilled(tmp_path, monkeypatch):
    # Seen once in CI (the test above, 6 writers): a writer swept a store that was still empty,
    # was descheduled, and came back to find the others had filled it to the bound. Its sweep
    # had evicted nothing, which was taken for "everything left is being computed", so it went
    # over by one entry and nothing swept after it: at rest the store held 33 entries of 32.
    # Here a second writer (another store object) fills the store right after the first sweep.
    root, each, room = tmp_path / "c", 64 * 1024, 10
    filled: list[bool] = []
    sweep = dc._EntryFiles.sweep

    def sweep_then_fill(self, *args, **kwargs):
        done = sweep(self, *args, **kwargs)
        if not filled:
            filled.append(True)
            with dc.open(root, max_bytes=room * each) as other:
                for n in range(room):
                    other[f"other{n}"] = os.urandom(each - 300)
        return done

    monkeypatch.setattr(dc._EntryFiles, "sweep", sweep_then_fill)
    with dc.open(root, max_bytes=room * each) as db:  # A new store: its first write sweeps.
        db["first"] = os.urandom(each - 300)
        assert "first" in db
    assert filled and max(os.lstat(p).st_blocks * 512 for p in entry_files(root)) == each
    assert shard_bytes(root) <= room * each, f"{len(entry_files(root))} entries of {room}"


@pytest.mark.xfail(strict=True, reason="known, not fixed: a sweep counts out writes still under way (docs/size-limit.md)")
def test_writes_that_land_after_a_sweep_counted_them_out_leave_the_store_within_its_bound(tmp_path, monkeypatch):
    # Found by a review of the fix above (the old code fails it too): ten writers reserve the whole
    # bound and stall before their files exist; a new writer finds no room and sweeps a store with no
    # files, which sets the total to what it counted (nothing), so it fits. The ten then land and
    # count their entries: 11 entries of 10 at rest. A write that found the total over the bound and
    # swept fixed it, but doubled the sweeps of busy stores (13 to 32 for 6 writers under 16 MiB), so
    # it was not kept; the fix is to keep the reservations under way apart from the files counted.
    root, each, room = tmp_path / "c", 64 * 1024, 10
    with dc.open(root, max_bytes=room * each) as db:  # The total exists: the writers below reserve at once.
        db["seed"] = b"s"
        del db["seed"]
    go, reserved, write = threading.Event(), threading.Semaphore(0), dc._EntryDir.write

    def stalled_write(self, *args, **kwargs):  # Reserved, not yet written.
        if threading.current_thread() is not threading.main_thread():
            reserved.release()
            go.wait()
        return write(self, *args, **kwargs)

    def other(n: int) -> None:
        with dc.open(root, max_bytes=room * each) as db:
            db[f"other{n}"] = os.urandom(each - 300)

    monkeypatch.setattr(dc._EntryDir, "write", stalled_write)
    threads = [threading.Thread(target=other, args=(n,)) for n in range(room)]
    for thread in threads:
        thread.start()
    for _ in threads:
        assert reserved.acquire(timeout=30)
    with dc.open(root, max_bytes=room * each) as db:
        db["first"] = os.urandom(each - 300)
    go.set()
    for thread in threads:
        thread.join()
    assert shard_bytes(root) <= room * each, f"{len(entry_files(root))} entries of {room} at rest"
    with dc.open(root, max_bytes=room * each) as db:
        assert len(db) == len(entry_files(root)) >= room - 3  # Swept back to the bound, not emptied.


def test_an_entry_bigger_than_the_bound_is_stored_and_read_back(tmp_path):
    # docs/size-limit.md: it is written anyway, over the bound by that entry, after one sweep that
    # evicts what it can (two sweeps that evict nothing decide it for any other entry).
    with dc.open(tmp_path / "c", max_bytes=64 * 1024) as db:
        db["small"] = b"s"
        db["big"] = value = os.urandom(200_000)
        assert db["big"] == value
        assert "small" not in db  # Evicted to make what room it could.


USAGE = struct.Struct("<QdQdQ")  # .usage: total, boot time, host, newest eviction, sweeps begun.


@pytest.mark.parametrize("damage", ["from an earlier boot", "torn", "empty"])
def test_a_running_total_that_may_be_stale_is_recounted_and_the_bound_holds(tmp_path, damage):
    # Issue 18 item 12c: after a power cut the total in .usage can be older than
    # the entries (or torn): two writes took a 48 KiB store to 76 KiB. A total
    # written before this machine's last boot, or not whole, is recounted.
    limit = 2**20
    with dc.open(tmp_path / "s", max_bytes=limit) as db:
        for n in range(12):
            db[f"a{n}"] = os.urandom(60_000)
    usage = tmp_path / "s" / ".usage"
    total, boot, host, newest, sweeps = USAGE.unpack(usage.read_bytes())
    assert total == shard_bytes(tmp_path / "s") > 12 * 60_000
    if damage == "from an earlier boot":  # As a crash leaves it: too low, written before a reboot.
        usage.write_bytes(USAGE.pack(0, boot - 3600, host, newest, sweeps))
    else:
        usage.write_bytes(USAGE.pack(0, boot, host, newest, sweeps)[: 0 if damage == "empty" else 20])
    with dc.open(tmp_path / "s", max_bytes=limit) as db:
        for n in range(12):
            db[f"b{n}"] = os.urandom(60_000)
            assert shard_bytes(tmp_path / "s") <= limit
    assert USAGE.unpack(usage.read_bytes())[0] == shard_bytes(tmp_path / "s")


def test_a_total_written_by_another_host_is_kept_not_recounted(tmp_path):
    # A store shared between machines: a total that another host wrote says nothing about this host's boot, so it
    # stands (a size pass of issue 22 shadowed the host read from .usage, and every such total was recounted: a
    # sweep per write, evicting down to 80% of the bound).
    with dc.open(tmp_path / "s", max_bytes=2**20) as db:
        db["a"] = os.urandom(60_000)
    usage = tmp_path / "s" / ".usage"
    total, boot, host, newest, sweeps = USAGE.unpack(usage.read_bytes())
    usage.write_bytes(USAGE.pack(total + 4096, boot - 3600, host ^ 1, newest, sweeps))  # Another host, another boot.
    with dc.open(tmp_path / "s", max_bytes=2**20) as db:
        db["b"] = os.urandom(100)
    assert USAGE.unpack(usage.read_bytes())[0] > shard_bytes(tmp_path / "s"), "kept (and grown), not recounted"


@pytest.mark.skipif(sys.platform != "linux", reason="names fsynced descriptors through /proc/self/fd")
def test_durable_deletions_and_totals_are_fsynced(tmp_path):
    # Issue 18 item 12d: with durable=True, del s[k] (and so forget, clear,
    # cache_clear, evictions) came back after a power cut: an unlink is durable
    # only once its folder is fsynced. A child counts what each call fsyncs,
    # and whether the file was already gone when its folder was.
    script = """
        import os
        synced = []
        real_fsync = os.fsync
        def fsync(fd):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            real_fsync(fd)
        os.fsync = fsync
        root = sys.argv[1]
        def entries():
            return {os.path.join(d, n) for d, _s, names in os.walk(root) for n in names if len(n) == 32}
        def report(what, action):
            before = entries()
            synced.clear()
            action()
            gone = before - entries()
            folders = {os.path.dirname(p) for p in gone}
            print(what, len(gone), sorted(folders) == sorted(set(synced) & folders))

        with dc.open(root + "/s", durable=True) as db:
            for n in range(6):
                db[f"k{n}"] = n
            root += "/s"
            report("del", lambda: db.__delitem__("k0"))
            report("clear", db.clear)
        root = sys.argv[1] + "/m"
        @dc.memoize(root, durable=True, max_bytes=6 * 8192)
        def f(x):
            return os.urandom(5000)
        for n in range(4):
            f(n)
        report("forget", lambda: f.forget(0))
        report("evict", lambda: [f(n) for n in range(10, 16)])
        synced.clear()
        f(99)
        print("usage", any(p.endswith(".usage") for p in synced))
        report("cache_clear", f.cache_clear)
    """
    lines = child(script, str(tmp_path)).stdout.split("\n")
    assert lines[:3] == ["del 1 True", "clear 5 True", "forget 1 True"] and lines[4:] == ["usage True", lines[5], ""]
    for line, what in ((lines[3], "evict"), (lines[5], "cache_clear")):
        assert re.fullmatch(what + r" [1-9]\d* True", line), lines


@pytest.mark.parametrize("opener", ["open", "memoize"])
def test_store_labels_left_empty_or_torn_are_repaired(tmp_path, opener):
    # Issue 18 item 12e: a power cut can leave CACHEDIR.TAG and .gitignore
    # empty; backup tools then stop skipping the cache, and the command line
    # no longer knows it for a store. They are repaired when found.
    def use() -> None:
        if opener == "open":
            with dc.open(tmp_path / "s") as db:
                db["k"] = 1
        else:
            dc.memoize(tmp_path / "s")(abs)(-1)

    use()
    tag, ignore = tmp_path / "s" / "CACHEDIR.TAG", tmp_path / "s" / ".gitignore"
    good = tag.read_bytes(), ignore.read_bytes()
    assert good[0].startswith(b"Signature: 8a477f597d28d172789f06886806bc55") and b"*" in good[1].splitlines()
    tag.write_bytes(b"")
    ignore.write_bytes(b"\0" * 10)  # As a cut that keeps the size but not the data leaves it.
    use()
    assert (tag.read_bytes(), ignore.read_bytes()) == good
    tag.write_bytes(good[0][:30])
    ignore.write_bytes(b"# mine\n*\n!keep\n")  # Edited, and still ignoring everything: kept.
    use()
    assert (tag.read_bytes(), ignore.read_bytes()) == (good[0], b"# mine\n*\n!keep\n")
    child("sys.exit(dc.main(['info', sys.argv[1]]))", str(tmp_path / "s"))  # A store again for the command line.


def test_a_batch_whose_results_do_not_fit_under_max_bytes_warns_once(tmp_path):
    # Issue 21: with results bigger in all than max_bytes, a batch evicts its
    # own first results, and each rerun, walking the inputs in order, reused
    # nothing, silently.
    @dc.memoize(tmp_path / "c", max_bytes=64 * 4096)
    def record(x):
        return [x] * 900  # About 3 KiB pickled: one 4 KiB block on disk.

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert record.map(range(100), progress=False).computed == 100
        batch = record.map(range(100), progress=False)
    assert batch.reused == 0, "the rerun found its first results evicted"
    said = [str(w.message).split("<locals>.")[-1] for w in caught if issubclass(w.category, dc.DonecacheWarning)]
    assert len(said) == 2, said  # Once per batch, not per eviction.
    assert said[0].startswith(
        "record.map(): the results do not fit in the store at max_bytes=262,144: entries used since the batch "
        "began were evicted, so a rerun computes them again; about 64 of its entries fit (4,096 bytes on disk each)"
    ), said[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert record.map(range(100, 110), progress=False).computed == 10  # Fits: no warning.
        assert record.map(range(100, 110), progress=False).reused == 10
    assert not [w for w in caught if issubclass(w.category, dc.DonecacheWarning)]


def test_a_hit_records_a_use_and_a_sweep_evicts_the_least_recently_used(tmp_path, caplog):
    with dc.open(tmp_path / "s", max_bytes=10 * 2**20) as db:
        for n in range(8):
            db[f"k{n}"] = b"x" * 2**20
        paths = {n: next(p for p in entry_files(tmp_path / "s") if entry_key(p) == f"k{n}".encode())
                 for n in range(8)}
        for n, path in paths.items():  # k0 is the oldest ... k7 the newest.
            os.utime(path, (1000.0 + n, 1000.0 + n))
        assert "k0" in db and os.stat(paths[0]).st_mtime == 1000.0  # A question is not a use.
        assert db["k0"] == b"x" * 2**20 and os.stat(paths[0]).st_mtime > time.time() - 5  # A read is.
        with caplog.at_level("INFO", logger="donecache"):
            for n in range(8, 12):
                db[f"k{n}"] = b"x" * 2**20  # k9 and k11 find no room: swept down to 8 MiB.
        assert disk_bytes(tmp_path / "s") <= 10 * 2**20
        # The least recently used went: k1 to k4, not k0, which was read.
        assert set(db) == {"k0", *(f"k{n}" for n in range(5, 12))}
    evicted = [r.getMessage() for r in caplog.records if r.name == "donecache"]
    one = os.lstat(paths[0]).st_blocks * 512
    assert len(evicted) == 2, "one line per sweep"
    assert all(m.startswith(f"evicted 2 entries ({2 * one} bytes on disk, the most recently used") for m in evicted)


def test_a_bounded_store_records_every_use_once_half_full_and_finely_after_sweeps(tmp_path):
    def used(db, key, path):
        """Whether reading ``key`` half a second after its last recorded use records another."""
        os.utime(path, ns=(time.time_ns() - 500_000_000,) * 2)
        before = os.stat(path).st_mtime_ns
        assert db[key] is not None
        return os.stat(path).st_mtime_ns != before

    with dc.open(tmp_path / "s", max_bytes=2**20) as db:
        db["a"] = b"a"
        (path,) = entry_files(tmp_path / "s")
        assert not used(db, "a", path), "a store far from its bound records uses to the second"
        for n in range(6):
            db[f"k{n}"] = b"x" * 100_000  # About 600 KB: over half the bound, and no sweep yet.
        assert used(db, "a", path), "half full: every use is recorded"
        for n in range(6, 12):
            db[f"k{n}"] = b"x" * 100_000  # Past the bound: sweeps evict entries used a moment ago.
        assert len(db) < 13 and "a" in db
        assert used(db, "a", path), "after sweeps of recently used entries: uses recorded finely"


def test_is_cached_does_not_count_as_a_use(tmp_path):
    @dc.memoize(tmp_path / "c", max_bytes=2**30)
    def f(x):
        return x

    f(1)
    (path,) = entry_files(tmp_path / "c")
    os.utime(path, (1000.0, 1000.0))
    assert f.is_cached(1) and os.stat(path).st_mtime == 1000.0
    assert f(1) == 1 and os.stat(path).st_mtime > 1000.0


@posix_only
def test_a_sweep_never_evicts_an_entry_whose_key_is_being_computed(tmp_path):
    cache, go = tmp_path / "cache", tmp_path / "go"
    # The oldest entry, being recomputed (a refresh) by another process.
    computing = child(
        """
        import os, time
        @dc.memoize(sys.argv[1], max_bytes=4 * 2**20)
        def blob(i):
            if os.path.exists(sys.argv[1] + ".first"):
                print("computing", flush=True)
                while not os.path.exists(sys.argv[2]):
                    time.sleep(0.01)
            return bytes([i]) * 2**20
        blob(0)
        open(sys.argv[1] + ".first", "w").close()
        blob.refresh(0)
        """,
        str(cache),
        str(go),
        background=True,
    )
    wait_for_line(computing, "computing")
    (first,) = entry_files(cache)
    inode = os.stat(first).st_ino
    os.utime(first, (1000.0, 1000.0))  # Least recently used of all.
    child(
        """
        @dc.memoize(sys.argv[1], max_bytes=4 * 2**20)
        def blob(i):
            return bytes([i]) * 2**20
        for i in range(1, 12):
            blob(i)
        """,
        str(cache),
    )
    assert os.stat(first).st_ino == inode, "the entry being computed was evicted"
    assert len(entry_files(cache)) <= 4  # The others were evicted around it.
    go.touch()
    assert computing.wait(timeout=60) == 0


@pytest.mark.parametrize(
    "bad, error", [(0, ValueError), (-1, ValueError), (True, TypeError), (1.5, TypeError), ("1G", TypeError)]
)
def test_max_bytes_must_be_a_positive_int(tmp_path, bad, error):
    with pytest.raises(error, match=r"max_bytes must be a positive int .* not"):
        dc.open(tmp_path / "s", max_bytes=bad)
    with pytest.raises(error, match=r"max_bytes must be a positive int .* not"):
        dc.memoize(tmp_path / "m", max_bytes=bad)
    assert not (tmp_path / "s").exists()


def test_cache_info_reports_max_bytes_or_none(tmp_path):
    assert dc.memoize(tmp_path, max_bytes=123456)(abs).cache_info().maxsize == 123456
    assert dc.memoize(tmp_path)(abs).cache_info().maxsize is None


# issue 21
def test_prune_in_python_trims_one_function_or_the_store(tmp_path):
    @dc.memoize(tmp_path / "c")
    def f(x):
        return x

    @dc.memoize(tmp_path / "c")
    def g(x):
        return x

    f.map(range(10))
    g.map(range(3))
    old = time.time() - 7200
    for path in entry_files(tmp_path / "c")[:2]:
        os.utime(path, (old, old))
    before = entry_files(tmp_path / "c")
    dry = f.prune(max_bytes=4 * 4096, dry_run=True)
    assert dry.evicted == 6 and dry.evicted_bytes == 6 * 4096 and entry_files(tmp_path / "c") == before
    assert f.prune(max_bytes=4 * 4096) == dc.PruneReport(0, 0, 6, 6 * 4096)
    assert f.cache_info().currsize == 4 and g.cache_info().currsize == 3, "g's entries are not f's to trim"
    with dc.open(tmp_path / "c") as store:
        assert store.prune(older_than=datetime.timedelta(hours=1), dry_run=True) >= 0
        assert store.prune(max_bytes=2 * 4096) == 5 and len(store) == 2
        with pytest.raises(ValueError, match="older_than must be a positive number of seconds"):
            store.prune(older_than=-1)
        with pytest.raises(ValueError, match="max_bytes must be a positive int"):
            store.prune(max_bytes=0)


# -- the failure ledger and array jobs ------------------------------------------

LEDGER_JOB = textwrap.dedent("""
    import os, time
    @dc.memoize(sys.argv[1], version=1)
    def parse(i):
        with open(os.path.join(os.path.dirname(sys.argv[1]), "calls"), "a") as log:
            log.write(f"{i}\\n")
        if i % 10 == 3 and sys.argv[2] != "fixed":
            raise ValueError(f"record {i} is malformed")
        if i == 57 and sys.argv[2] == "hang":
            print("hanging", flush=True)
            time.sleep(600)
        return i * 2
""")


def test_failures_survive_a_killed_parent_and_are_listed(tmp_path):
    cache = tmp_path / "cache"
    proc = child(LEDGER_JOB + "parse.map(range(100), keep_going=True)\n", str(cache), "hang", background=True)
    wait_for_line(proc, "hanging")
    proc.kill()
    proc.wait()
    listed = cli("failures", str(cache), "--json")
    assert listed.returncode == 0
    records = json.loads(listed.stdout)["failures"]
    assert sorted(int(r["input"]) for r in records) == list(range(3, 57, 10)), "every failure before the kill"
    assert all(r["type"] == "builtins.ValueError" and "malformed" in r["message"] and "Traceback" in r["traceback"] for r in records)
    assert all(r["function"] == "__main__:parse" and r["current"] for r in records)
    text = cli("failures", str(cache), "--function", "parse").stdout
    assert "parse(13)" in text and "ValueError: record 13 is malformed" in text
    listed = child(LEDGER_JOB + "print(len(parse.failures()), parse.failures()[0].input)", str(cache), "run")
    assert listed.stdout.split() == ["6", "3"]


def test_retry_failures_false_calls_nothing_and_a_success_clears_the_record(tmp_path):
    cache, calls = tmp_path / "cache", tmp_path / "calls"
    report = "b = parse.map(range(40), keep_going=True, retry_failures={retry})\nprint(b.computed, b.reused, len(b.failures), type(b.failures[0].exception).__name__ if b.failures else '-')\n"
    assert child(LEDGER_JOB + report.format(retry=True), str(cache), "run").stdout.split() == ["36", "0", "4", "ValueError"]
    calls.unlink()
    out = child(LEDGER_JOB + report.format(retry=False), str(cache), "run").stdout.split()
    assert out == ["0", "36", "4", "FailureRecord"] and not calls.exists(), "nothing was called"
    assert child(LEDGER_JOB + report.format(retry=True), str(cache), "fixed").stdout.split() == ["4", "36", "0", "-"]
    assert calls.read_text().split() == ["3", "13", "23", "33"], "only the failures ran again"
    assert cli("failures", str(cache)).returncode == 1, "successes removed their records"
    raising = child(LEDGER_JOB + "parse.map([3], retry_failures=False)", str(cache), "run", check=False)
    assert raising.returncode == 0, "no record left: the fixed code's result is a hit"


def test_a_success_removes_a_symlink_planted_as_its_failure_record(tmp_path):
    # A success unlinks its input's failure record, and unlink(2) never follows a link: a link planted there,
    # dangling or not, goes as a record does (a version of issue 20 asked access(2) first, following links).
    cache, target = tmp_path / "cache", tmp_path / "target.json"
    child(LEDGER_JOB + "parse.map([3, 4], keep_going=True)", str(cache), "run")
    (record,) = (cache / ".failures").rglob("*.json")
    record.unlink()
    os.symlink(tmp_path / "missing.json", record)
    child(LEDGER_JOB + "parse.map([3], keep_going=True)", str(cache), "fixed")
    assert not os.path.lexists(record), "the dangling link was removed by the success"
    child(LEDGER_JOB + "parse.map([13], keep_going=True)", str(cache), "run")
    (record,) = (cache / ".failures").rglob("*.json")
    record.unlink()
    target.write_text("{}")
    os.symlink(target, record)
    child(LEDGER_JOB + "parse.map([13], keep_going=True)", str(cache), "fixed")
    assert not os.path.lexists(record) and target.read_text() == "{}", "the link went, its target stayed"


@pytest.mark.skipif(not IS_ROOT or not hasattr(os, "setresuid"), reason="sets its real uid: needs root and setresuid")
def test_a_setuid_process_finds_its_own_entries_and_clears_its_failure_records(tmp_path):
    # Review of issue 20: lookups asked access(2), which checks the real uid, not the effective one. A set-user-ID
    # program (real uid 2000, effective uid 0 here) missed every entry of its own private store, and a success
    # left its input's failure record behind, so a batch with retry_failures=False returned the stale failure.
    cache, calls = tmp_path / "cache", tmp_path / "calls"
    job = "import os\nos.setresuid(2000, 0, 0)\n" + LEDGER_JOB
    batch = job + (
        "b = parse.map([3], keep_going=True, retry_failures=RETRY)\n"
        "print(os.getuid(), b.computed, b.reused, len(b.failures))"
    )
    assert child(batch.replace("RETRY", "True"), str(cache), "run").stdout.split() == ["2000", "0", "0", "1"]
    assert len(list((cache / ".failures").rglob("*.json"))) == 1
    assert child(batch.replace("RETRY", "True"), str(cache), "fixed").stdout.split() == ["2000", "1", "0", "0"]
    assert not list((cache / ".failures").rglob("*.json")), "the success cleared the failure record"
    assert child(batch.replace("RETRY", "False"), str(cache), "run").stdout.split() == ["2000", "0", "1", "0"]
    assert child(job + "print(parse(4), parse(4))", str(cache), "run").stdout.split() == ["8", "8"]
    assert child(job + "print(parse(4))", str(cache), "run").stdout.split() == ["8"]
    assert calls.read_text().split() == ["3", "3", "4"], "each input computed once: the later calls were hits"


@posix_only
@pytest.mark.parametrize("when", ["before import", "after import"])
def test_where_access_is_refused_lookups_and_the_ledger_fall_back_to_lstat(tmp_path, when):
    # Review of issue 20: glibc asks faccessat2(2) for access(path, F_OK, AT_EACCESS | AT_SYMLINK_NOFOLLOW), which
    # Docker's seccomp profile before 20.10 refuses with EPERM; os.access() then says False for every name. Lookups
    # missed every entry that another process wrote, and a success took the store for one without a failure ledger,
    # so a stale record outlived it and a retry_failures=False batch returned it. Here os.access is refused the same
    # way, before donecache is imported or after (a process that sets up its seccomp filter later).
    cache, calls = tmp_path / "cache", tmp_path / "calls"
    refuse = textwrap.dedent("""
        def refused(path, mode, *, dir_fd=None, effective_ids=False, follow_symlinks=True):
            return False  # EPERM from a seccomp filter reads as "no".
        os.supports_effective_ids.add(refused)
        os.supports_follow_symlinks.add(refused)
        os.access = refused
    """)
    load = f"dc = importlib.import_module({MODULE!r})\n"
    refused = "import importlib, os, sys\n" + (refuse + load if when == "before import" else load + refuse)
    batch = refused + LEDGER_JOB + (
        "b = parse.map([3], keep_going=True, retry_failures=RETRY)\n"
        "print(b.computed, b.reused, len(b.failures))"
    )

    def run(code: str, phase: str) -> list[str]:
        return child("", run=["-c", code, str(cache), phase]).stdout.split()

    assert run(batch.replace("RETRY", "True"), "run") == ["0", "0", "1"]
    assert run(batch.replace("RETRY", "True"), "fixed") == ["1", "0", "0"]
    assert not list((cache / ".failures").rglob("*.json")), "the success cleared the failure record"
    assert run(batch.replace("RETRY", "False"), "run") == ["0", "1", "0"]
    assert run(refused + LEDGER_JOB + "print(parse(4))", "run") == ["8"]
    assert run(refused + LEDGER_JOB + "print(parse(4))", "run") == ["8"]
    assert calls.read_text().split() == ["3", "3", "4"], "each input computed once: the later calls were hits"


@posix_only
def test_a_success_that_cannot_clear_its_failure_record_says_so(tmp_path):
    # Review of issue 20: with the record's folder not searchable (EACCES), a version that asked access(2) before
    # unlinking took the answer for "no record", and the stale record outlived the success without a word.
    cache = tmp_path / "cache"
    batch = LEDGER_JOB + (
        "b = parse.map([3], keep_going=True)\n"
        "print([(type(f.exception).__name__, getattr(f.exception, 'filename', None)) for f in b.failures])"
    )
    child(batch, str(cache), "run")
    (record,) = (cache / ".failures").rglob("*.json")
    record.parent.chmod(0o600)
    try:
        out = child(batch, str(cache), "fixed", unprivileged=True).stdout
    finally:
        record.parent.chmod(0o700)
    assert "PermissionError" in out and repr(str(record)) in out, out
    assert record.exists(), "the record stays, and the batch reported why"


def test_shards_cover_every_input_exactly_once_and_a_gather_computes_nothing(tmp_path):
    cache, calls = tmp_path / "cache", tmp_path / "calls"
    job = LEDGER_JOB + textwrap.dedent("""
        index, count = int(sys.argv[3]), int(sys.argv[4])
        b = parse.map(range(1000), keep_going=True, shard=(index, count) if count else None)
        print(b.computed, b.reused, len(b.failures))
    """)
    procs = [child(job, str(cache), "run", str(i), "4", background=True) for i in range(4)]
    outs = [proc.communicate(timeout=120)[0].split() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert sum(int(o[0]) for o in outs) == 900 and sum(int(o[2]) for o in outs) == 100
    assert all(int(o[0]) > 100 for o in outs), f"each shard has a share: {outs}"
    logged = calls.read_text().split()
    assert sorted(map(int, logged)) == list(range(1000)), "every input ran exactly once"
    calls.unlink()
    gather = child(job.replace("keep_going=True", "keep_going=True, retry_failures=False"), str(cache), "run", "0", "0")
    assert gather.stdout.split() == ["0", "900", "100"] and not calls.exists()
    with pytest.raises(AssertionError, match="shard= takes"):
        child(LEDGER_JOB + "parse.map(range(3), shard=(4, 4))", str(cache), "run")


def test_the_ledger_keeps_inputs_labels_and_summarises_by_exception(tmp_path):
    cache = tmp_path / "cache"
    job = """
        import copy, json, pickle
        @dc.memoize(sys.argv[1], version=int(sys.argv[2]))
        def parse(rec):
            if "," in rec["amount"]:
                raise ValueError(f"amount {rec['amount']!r} is not a number")
            return float(rec["amount"])
        records = [{"air_time": "", "amount": f"{i},5" if i % 7 == 3 else f"{i}.5", "id": f"F{i:04d}"} for i in range(30)]
        batch = parse.map(records, keep_going=True, label=lambda rec: rec["id"])
        kept = parse.failures()
        print(len(batch.failures), [r.label for r in kept], kept[0].input == records[3], kept[0].input_kept)
        again = parse.map([r.input for r in kept], keep_going=True, label=lambda rec: rec["id"])
        print(len(again.failures), again.computed + again.reused)
        assert pickle.loads(pickle.dumps(kept[0])).input == kept[0].input and copy.copy(kept[0]).label == "F0003"
    """
    out = child(job, str(cache), "1").stdout.splitlines()
    assert out == ["4 ['F0003', 'F0010', 'F0017', 'F0024'] True True", "4 0"], "real inputs, rerun exactly"
    text = cli("failures", str(cache)).stdout
    assert text.splitlines()[1] == "  ValueError: amount ... is not a number: 4 inputs"
    assert "__main__:parse(F0010)" in text
    assert cli("failures", str(cache), "--function", "__main__.parse").returncode == 0, "the dotted name"
    wrong = cli("failures", str(cache), "--function", "nope")
    assert wrong.returncode == 1 and "functions there: __main__:parse" in wrong.stderr
    child(job, str(cache), "2")  # New code: its own failures; the old ones are of older code.
    report = json.loads(cli("failures", str(cache), "--json").stdout)
    assert len(report["failures"]) == 4 and report["older_code"] == 4 and all(r["current"] for r in report["failures"])
    assert len(json.loads(cli("failures", str(cache), "--all", "--json").stdout)["failures"]) == 8
    assert "4 more of older code: --all shows them" in cli("failures", str(cache)).stdout
    assert cli("prune", str(cache), "--stale").returncode == 0
    assert len(json.loads(cli("failures", str(cache), "--all", "--json").stdout)["failures"]) == 4, "stale ones went"
    assert "removed 0 " in cli("failures", str(cache), "--clear", "--older-than", "1h").stdout
    assert "removed 4 " in cli("failures", str(cache), "--clear", "--function", "parse").stdout
    child(job, str(cache), "2")
    assert cli("clear", str(cache)).returncode == 0 and cli("failures", str(cache), "--all").returncode == 1
    child(job, str(cache), "2")
    assert child("@dc.memoize(sys.argv[1], version=2)\ndef parse(rec): pass\nparse.cache_clear()\nprint(len(parse.failures(all=True)))", str(cache)).stdout.strip() == "0"


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no str for you")


def test_a_failure_record_unpickled_in_a_fresh_process_keeps_its_input(tmp_path):
    """A FailureRecord pickled by one process (a worker's report, a memoized list of failures)
    and loaded in a fresh one that has opened no store still hands back the real input (it
    once fell back to the label, silently, on a lazily imported name)."""
    (tmp_path / "recmod.py").write_text("class P:\n    def __init__(self, v):\n        self.v = v\n")
    child(
        """
        import pickle
        sys.path.insert(0, sys.argv[1])
        from recmod import P

        @dc.memoize(sys.argv[1] + "/c")
        def f(p):
            raise ValueError(p.v)

        f.map([P(7)], keep_going=True, progress=False)
        [record] = f.failures()
        assert record.input_kept and record.input.v == 7
        open(sys.argv[1] + "/records.pkl", "wb").write(pickle.dumps([record]))
        """,
        str(tmp_path),
    )
    proc = child(
        """
        import pickle
        sys.path.insert(0, sys.argv[1])
        [record] = pickle.load(open(sys.argv[1] + "/records.pkl", "rb"))
        print(record.input_kept, type(record.input).__name__, getattr(record.input, "v", None))
        """,
        str(tmp_path),
    )
    assert proc.stdout.split() == ["True", "P", "7"]


def test_the_ledger_survives_hostile_inputs_and_exceptions(tmp_path):
    import copy
    import tracemalloc

    @dc.memoize(tmp_path)
    def parse(x):
        if isinstance(x, int) and x == 1:
            raise Unprintable()
        raise ValueError("bad")

    huge_int = 10**5000
    big = bytes(64 << 20)
    tracemalloc.start()
    for value in (big, [[big]], {"k": (big,)}):  # What the ledger makes of a big input, at any depth.
        dc._bounded_repr(value), dc._pickled_input(value)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    assert peak < 2, f"the ledger took {peak:.0f} MiB for a 64 MiB input"
    batch = parse.map([1, big, huge_int, {"k": [list(range(10**6))]}], keep_going=True)
    assert len(batch.failures) == 4
    records = {r.entry: r for r in parse.failures()}
    assert len(records) == 4
    labels = sorted(r.label for r in records.values())
    assert all(len(text) <= 300 for text in labels)
    assert any(text.startswith("b'\\x00\\x00") for text in labels) and "<int of 16610 bits>" in labels
    unprintable = next(r for r in records.values() if r.type.endswith("Unprintable"))
    assert unprintable.message == "<str() of Unprintable raised RuntimeError>" and unprintable.input == 1
    too_big = next(r for r in records.values() if r.label.startswith("b'"))
    assert not too_big.input_kept and too_big.input == too_big.label, "a repr and the entry's name stand in"
    for record in records.values():
        assert '/donecache.py"' not in record.traceback and "in parse" in record.traceback, record.traceback
        assert pickle.loads(pickle.dumps(record)).as_dict() == record.as_dict() == copy.deepcopy(record).as_dict()


def test_progress_callable_gets_records_and_jupyter_is_a_terminal(tmp_path, capsys, monkeypatch):
    parse = dc.memoize(tmp_path)(bad_at({1}, []))
    seen: list = []
    parse.map(range(4), keep_going=True, progress=seen.append)
    last = seen[-1]
    assert last.final and (last.done, last.total, last.failed, last.computed, last.reused) == (4, 4, 1, 3, 0)
    assert last.percent == 100.0 and last.function == "bad_at.<locals>.parse" and last.eta == 0.0
    assert str(last).startswith("bad_at.<locals>.parse: 100% 4/4 done") and "ETA 00:00:00" in str(last)
    with pytest.warns(dc.DonecacheWarning, match="progress= callable raised ZeroDivisionError"):
        assert parse.map(range(4), keep_going=True, progress=lambda p: 1 / 0).done == 4
    kernel_stream = type("OutStream", (), {"__module__": "ipykernel.iostream", "isatty": lambda self: False,
                                          "write": lambda self, text: seen.append(text), "flush": lambda self: None})
    monkeypatch.setattr(sys, "stderr", kernel_stream())
    parse.map(range(4), keep_going=True)
    assert any(isinstance(t, str) and "100% 4/4 done" in t for t in seen), "on by default in Jupyter"


# ---------------------------------------------------------------------------
# Batches (map/imap)
# ---------------------------------------------------------------------------


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
    with pytest.raises(TypeError, match="as_completed"):
        fetch.imap([1])

    class Client:
        @dc.memoize(tmp_path)
        async def get(self, x):
            return x

    for batch, advice in ((Client().get.map, "asyncio.gather"), (Client().get.imap, "as_completed")):
        with pytest.raises(TypeError, match=advice):  # Not a coroutine run outside any event loop.
            batch([1])


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


@posix_only
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_main_function_without_a_file_fails_before_any_work_under_spawn(tmp_path, method):
    # As in a notebook: __main__ has no file, so spawn/forkserver workers cannot import parse.
    job = """
        import multiprocessing
        @dc.memoize(sys.argv[2])
        def parse(x):
            return x
        multiprocessing.set_start_method(sys.argv[1])
        try:
            parse.map(range(4), workers=2)
        except TypeError as exc:
            print(exc)
        print(parse.cache_info().misses, parse.map(range(4), workers=2, processes=False).results)
    """
    lines = child(job, method, str(tmp_path / "c")).stdout.splitlines()
    assert "cannot import it. Move it into a module" in lines[0] and f"started by {method!r}" in lines[0]
    assert lines[1] == "0 [0, 1, 2, 3]", "nothing ran before the error; threads work"
    # From a file, the same function works under that start method.
    script = tmp_path / "job.py"
    out = child("""
        import multiprocessing
        @dc.memoize(sys.argv[2])
        def parse(x):
            return x * 2
        if __name__ == "__main__":
            multiprocessing.set_start_method(sys.argv[1])
            print(parse.map(range(4), workers=2).results)
    """, method, str(tmp_path / "d"), script_file=script).stdout
    assert out.strip() == "[0, 2, 4, 6]"


WORKER_DEATHS = """
    import os, signal
    @dc.memoize(sys.argv[1])
    def parse(x):
        if x == 5:
            os._exit(3)
        if x == 11:
            os.kill(os.getpid(), signal.SIGKILL)
        if x == 17:
            raise ValueError(f"bad {x}")
        return x * 2
    if __name__ == "__main__":
        batch = parse.map(range(40), keep_going=True, workers=2, label=lambda x: f"rec{x}")
        print(batch)
        for f in batch.failures:
            print(f.index, type(f.exception).__name__, f.exception)
        print(sorted(r.label for r in parse.failures()))
        print(parse.map(range(40), keep_going=True, workers=2, retry_failures=False))
"""


@posix_only
def test_a_dying_worker_is_a_recorded_failure_and_the_batch_goes_on(tmp_path):
    out = child(WORKER_DEATHS, str(tmp_path / "c"), script_file=tmp_path / "job.py").stdout.splitlines()
    # An input stored just before its pool broke counts as reused when it is judged again.
    reused, computed = (int(w) for w in out[0].replace(",", "").split()[2:5:2])
    assert reused + computed == 37 and out[0].endswith(" 3 failed)"), out
    assert out[1] == "5 BrokenProcessPool worker died: exit code 3 while running parse on this input"
    assert out[2] == "11 BrokenProcessPool worker died: signal 9 (SIGKILL) while running parse on this input"
    assert out[3] == "17 ValueError bad 17"
    assert out[4] == "['rec11', 'rec17', 'rec5']"
    assert out[5] == "BatchResult(40 inputs: 37 reused, 0 computed, 3 failed)", "the ledger holds the deaths"


@posix_only
def test_a_pool_that_breaks_before_a_chunk_is_sent_is_a_dying_worker_too(tmp_path):
    # The race behind a rare failure of the test above: submit() itself raises
    # BrokenProcessPool once the pool knows a worker died. label= delays the send.
    job = """
        import os, time
        @dc.memoize(sys.argv[1])
        def parse(x):
            if x == 0:
                os._exit(3)
            return x * 2
        def label(x):
            if x == 3:
                time.sleep(1)  # Input 0 kills its worker meanwhile.
            return f"rec{x}"
        if __name__ == "__main__":
            batch = parse.map(range(6), keep_going=True, workers=2, chunksize=1, label=label)
            print(batch)
            print(*(f"{f.index} {f.exception}" for f in batch.failures), sep="\\n")
    """
    out = child(job, str(tmp_path / "c"), script_file=tmp_path / "job.py").stdout.splitlines()
    reused, computed = (int(w) for w in out[0].replace(",", "").split()[2:5:2])  # As in the test above.
    assert reused + computed == 5 and out[0].endswith(" 1 failed)"), out
    assert out[1:] == ["0 worker died: exit code 3 while running parse on this input"], out


@posix_only
@pytest.mark.parametrize("own", [True, False], ids=["own-pool", "foreign-pool"])
def test_an_interrupt_of_the_parent_stops_the_batch_at_once(tmp_path, own):
    job = """
        import concurrent.futures, os, time
        @dc.memoize(sys.argv[1])
        def slow(x):
            with open(os.path.join(os.path.dirname(sys.argv[1]), f"started-{x}"), "w") as f:
                f.write(str(os.getpid()))
            time.sleep(120)
            return x
        if __name__ == "__main__":
            pool = None if sys.argv[2] == "own" else concurrent.futures.ProcessPoolExecutor(4)
            try:
                slow.map(range(8), workers=2 if pool is None else 1, executor=pool)
            except KeyboardInterrupt:
                print("interrupted", flush=True)
            if pool is not None:
                print("pool alive:", pool.submit(pow, 2, 3).result(timeout=60), flush=True)
                for process in pool._processes.values():
                    process.kill()
            os._exit(0)
    """
    proc = child(job, str(tmp_path / "c"), "own" if own else "foreign", background=True, script_file=tmp_path / "job.py")
    for _ in range(3000):
        workers = [int(p.read_text() or 0) for p in tmp_path.glob("started-*")]
        if len(workers) == 2 and all(workers):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)  # The parent only, as Jupyter's interrupt sends it.
    out, _ = proc.communicate(timeout=90)  # The calls take 120 s: waiting for them would time out.
    assert out.splitlines()[0] == "interrupted"
    if own:
        time.sleep(1)
        for pid in workers:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)  # Terminated (and reaped) with the pool.
    else:
        assert out.splitlines()[1] == "pool alive: 8", "someone else's executor keeps running"
        assert len(list(tmp_path.glob("started-*"))) == 2, "what donecache queued there was cancelled"


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


def test_batch_workers_look_up_only_under_the_lock_and_share_one_keeper(tmp_path, monkeypatch):
    """Issue 20: the parent has just looked each input up; a worker looks again only under
    the key's lock (where another process may have stored it meanwhile), and one background
    writer serves all the chunks of a process instead of a thread per chunk."""
    lookups = []
    hit = dc._Memoized._hit
    monkeypatch.setattr(dc._Memoized, "_hit", lambda self, call, *more: lookups.append(call.key) or hit(self, call, *more))

    @dc.memoize(tmp_path)
    def double(x):
        return 2 * x

    executor = CountingExecutor()
    batch = double.map(range(40), executor=executor, chunksize=5)
    assert batch.results == [2 * x for x in range(40)] and len(executor.submitted) > 2
    assert len(lookups) == 80, "once in the parent, once under the lock in the worker"
    keepers = [t for t in threading.enumerate() if t.name == "donecache-keeper"]
    assert keepers == [], "chunks run in this process's threads leave no writer behind (a later fork)"
    script = """
        import os
        @dc.memoize(sys.argv[1])
        def who(x):
            keeper = dc._Writer._current  # The writer of this worker process, if it has one.
            return os.getpid(), id(keeper) if keeper is not None and keeper._pid == os.getpid() else None
        batch = who.map(range(60), workers=2, chunksize=5)
        writers = {}
        for pid, writer in batch.results:
            writers.setdefault(pid, set()).add(writer)
        print(sorted(len(w) for w in writers.values()), any(None in w for w in writers.values()))
    """
    counts, missing = child(script, str(tmp_path / "workers")).stdout.split("] ")
    assert set(json.loads(counts + "]")) == {1} and missing.strip() == "False", "one writer per worker process"


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
            print(cached.cache_info()[:4])
            with ProcessPoolExecutor(2) as pool:
                print(cached.map(range(50), executor=pool))
                print(pool.submit(abs, -3).result())
            print(cached.cache_info()[:4])
        """,
        method,
        env={"JOB_CACHE": "relative-cache", "LOG": str(tmp_path / "log")},
        cwd=tmp_path,
        script_file=tmp_path / "job.py",
    )
    assert proc.stdout.splitlines() == [
        "BatchResult(40 inputs: 0 reused, 40 computed, 0 failed)",
        "(0, 40, None, 40)",
        "BatchResult(50 inputs: 40 reused, 10 computed, 0 failed)",
        "3",
        "(40, 50, None, 50)",
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
    running = workers
    while running and time.monotonic() < deadline:
        time.sleep(0.1)
        running = [pid for pid in running if os.path.exists(f"/proc/{pid}") or alive(pid)]
    assert running == [], "the workers exited with their parent"


def test_progress_is_logged_when_stderr_is_not_a_terminal(tmp_path, capsys, caplog):
    @dc.memoize(tmp_path)
    def slow(x):
        time.sleep(0.02)
        return x

    with caplog.at_level("INFO", logger="donecache"):
        slow.map(range(10), progress=0.05)
    lines = [r.getMessage() for r in caplog.records if r.name == "donecache"]
    assert len(lines) >= 2 and all(line.startswith(f"{slow.__qualname__}: ") for line in lines)
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
                print(parse.cache_info()[:4])
"""


def test_every_submission_to_a_foreign_executor_is_a_new_task(tmp_path):
    # Dask names a pure task by a digest of its arguments: equal chunks of two
    # batches (a rerun after cache_clear()) would get the old result back, reported
    # as computed but never stored. Each submission carries a nonce of its own.
    sent: list = []

    class Recording(CountingExecutor):
        def submit(self, fn, *args, **kwargs):
            sent.append(args)
            return super().submit(fn, *args, **kwargs)

    square = dc.memoize(tmp_path)(lambda x: x * x)
    executor = Recording()
    for _ in range(2):
        assert square.map(range(3), executor=executor, chunksize=3).computed == 3
        square.cache_clear()
    assert len(sent) == 6 and sent[0][1] == sent[3][1] and sent[0] != sent[3]
    tokenize = getattr(pytest.importorskip("dask.base", reason="dask is not installed"), "tokenize")
    assert tokenize(dc._run_chunk, *sent[0]) != tokenize(dc._run_chunk, *sent[3])


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
        f"({2000 - failures}, {2000 - failures}, None, {2000 - failures})",
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


# issue 21
def test_entries_record_their_compute_time_and_batches_say_what_was_saved(tmp_path):
    import socket

    slept: dict[int, float] = {}  # What each call really slept (a loaded machine oversleeps).

    @dc.memoize(tmp_path / "c")
    def slow(x):
        started = time.perf_counter()
        time.sleep(0.1 * (x + 1))
        slept[x] = time.perf_counter() - started
        return x

    def near(figure: float, *inputs: int) -> bool:  # Within 5% of what those calls slept.
        return 1.0 <= figure / sum(slept[x] for x in inputs) <= 1.05

    first = slow.map(range(4), workers=2, processes=False)  # 0.1+0.2+0.3+0.4 = 1.0 s of compute.
    assert (first.computed, first.reused) == (4, 0) and near(first.computed_seconds, 0, 1, 2, 3)
    second = slow.map(range(5))  # Four reused, one (0.5 s) computed.
    assert (second.computed, second.reused) == (1, 4)
    assert near(second.computed_seconds, 4) and near(second.saved_seconds, 0, 1, 2, 3)
    assert second.summary.startswith("1 computed (0.5 s), 4 reused (saved 1.0 s of compute), 0 failed")
    info = slow.cache_info()
    assert info[:4] == (4, 5, None, 5) and near(info.held_seconds, 0, 1, 2, 3, 4)
    assert near(info.saved_seconds, 0, 1, 2, 3)
    assert slow(4) == 4 and near(slow.cache_info().saved_seconds, 0, 1, 2, 3, 4), "a plain hit counts too"
    [found] = [f for f in dc._EntryFiles(tmp_path / "c", "r", False).scan() if f.entry.key.endswith(b"=(4,)")]
    assert found.entry.host == socket.gethostname() and abs(found.entry.created - time.time()) < 60
    report = json.loads(cli("info", str(tmp_path / "c"), "--json").stdout)["per_function"]
    [row] = report.values()
    assert row["entries"] == 5 and near(row["compute_seconds"], 0, 1, 2, 3, 4) and row["oldest"] <= row["newest"]
    assert f"{row['compute_seconds']:.1f} s of compute held" in cli("info", str(tmp_path / "c")).stdout


# issue 21
def test_batch_figures_read_as_a_person_says_them():
    assert dc._batch_figures(7, 1.21, 1993, 7800) == "7 computed (1.2 s), 1,993 reused (saved 2 h 10 min of compute)"
    assert [dc._duration(s) for s in (0, 59.9, 60, 250, 86400 * 3 + 3600 * 4)] == [
        "0.0 s", "59.9 s", "1 min 0 s", "4 min 10 s", "3 d 4 h",
    ]  # fmt: skip
    assert [dc._human(n) for n in (0, 1023, 11468, 5 * 2**30)] == ["0 B", "1023 B", "11.2 KiB", "5.0 GiB"]


# issue 21
def test_progress_lines_carry_the_batch_figures(tmp_path, capsys):
    f = dc.memoize(tmp_path)(abs)
    f.map([-1, -2], progress=True)
    f.map([-1, -2, -3], progress=True)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith("0 failed; 1 computed (0.0 s), 2 reused (saved 0.0 s of compute)"), last


def test_time_saved_by_a_pool_worker_that_waited_for_another_process_counts_in_the_parent(tmp_path):
    """Two batches on the same inputs at once: the second one's workers wait for the first
    one's computations and reuse them; the parent adds what they saved to its own figures."""
    script = """
        import os, time
        @dc.memoize(sys.argv[1])
        def slow(x):
            open(f"{sys.argv[1]}.started.{x}", "w").close()
            time.sleep(0.4)
            return x

        if __name__ == "__main__":
            while sys.argv[2] == "late" and not all(os.path.exists(f"{sys.argv[1]}.started.{x}") for x in (0, 1)):
                time.sleep(0.001)  # Until the other batch computes both (holding their locks).
            batch = slow.map(range(2), workers=2)
            print(batch.computed, batch.reused, round(batch.computed_seconds + batch.saved_seconds, 6), round(slow.cache_info().saved_seconds, 6))
    """
    first = child(script, str(tmp_path / "c"), "early", background=True)
    second = child(script, str(tmp_path / "c"), "late", background=True)
    out = [proc.communicate(timeout=60)[0].split() for proc in (first, second)]
    assert out[0][:2] == ["2", "0"] and 0.8 <= float(out[0][2]) and out[0][3] == "0.0", out
    computed, reused, saved, info_saved = out[1]
    assert (computed, reused) == ("0", "2") and saved == info_saved == out[0][2], "what the first batch computed"


# issue 18 item 11 (failed on 0.2.0, 3cf1caa, unless the docstring says otherwise)
def test_donecache_off_with_shards_makes_no_cache_directory(tmp_path, monkeypatch, calls):
    """Item 11: DONECACHE=off with map(shard=...) created the cache directory (making the keys
    that choose each shard made the store)."""
    monkeypatch.setenv("DONECACHE", "off")

    def square(x):
        calls.append(x)
        return x * x

    new = dc.memoize(tmp_path / "cache", version=2)(square)
    mine = [new.map(range(20), shard=(index, 2)).successes for index in (0, 1)]
    assert sorted(mine[0] + mine[1]) == sorted(x * x for x in range(20)) and mine[0] and mine[1]
    assert not (tmp_path / "cache").exists()
    monkeypatch.delenv("DONECACHE")
    assert dc.memoize(tmp_path / "cache", version=1)(square)(5) == 25  # Older code, recorded as current.
    assert new(3) == 9 and new.is_cached(3)
    # The identity prepared while off is recorded once the store is made: version 2 is current.
    assert cli("prune", str(tmp_path / "cache"), "--stale").returncode == 0
    assert new.is_cached(3), "prune --stale kept the entry of the current code"
    assert json.loads(cli("info", str(tmp_path / "cache"), "--json").stdout)["entries"]["live"] == 1
    assert sorted(calls) == sorted([*range(20), 5, 3])


# -- map: a worker readies its next call while one computes (issue 20) ---------------
#
# After a call of 0.2-50 ms, a worker's writer thread takes the next input's key lock (if free) and looks for its entry
# while the call computes. A readied lock is held for a call that has not begun, so whoever asks for it may be what the
# running call waits on. Each script runs a chunk [7, 5, 4, 3] on one worker (after two slow fillers that keep the
# worker busy while the chunk gathers): input 4 is readied while f(5) runs.

READIED = """
    import subprocess, sys, threading, time, warnings
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    ASK = sys.argv[2]
    if ASK == "thread":
        dc._READY_HOLD = 3600.0  # No timer: only the give-up on asking can free the lock in time.
    if ASK == "unpicklable":
        warnings.simplefilter("error")  # A warning in the writer's thread once ended it, and the batch hung.

    @dc.memoize(sys.argv[1], ttl=0.5 if ASK == "ttl" else None)
    def f(n):
        time.sleep(0.05 if n >= 100 else 0.002)
        if len(sys.argv) > 3:  # A child asked for one result.
            print("computed", n, file=sys.stderr)
            return n
        if n == 5 and ASK == "thread":
            held = [ref() for _, ref in list(dc._KeyLock._holders.values())]
            print("readied:", any(lock is not None and lock._readied is not None for lock in held), file=sys.stderr)
            return f(4) + 1  # The next input, readied while this call runs.
        if n == 5 and ASK == "process":
            out = subprocess.run([sys.executable, __file__, sys.argv[1], sys.argv[2], "4"], capture_output=True,
                                 text=True, timeout=20)
            sys.stderr.write(out.stderr)
            return int(out.stdout) + 1
        if n == 7 and ASK in ("early", "ttl"):
            return f(4) + 3  # Stored before input 4 is readied: the readied look finds it.
        if n == 5 and ASK == "ttl":
            time.sleep(1.0)  # Input 4 is readied as this begins; its entry's ttl passes meanwhile.
        if n == 5 and ASK == "interrupt":
            raise KeyboardInterrupt
        if n == 5 and ASK == "unpicklable":
            return threading.Lock()
        if n == 4 and ASK == "self":
            return f(4)  # A call that needs itself: an error, as it is outside a batch.
        print("computed", n, file=sys.stderr)
        return n

    if __name__ == "__main__":
        if len(sys.argv) > 3:
            print(f(int(sys.argv[3])))
            sys.exit()
        kind = ProcessPoolExecutor if ASK == "process" else ThreadPoolExecutor
        try:
            with kind(1) as pool:
                batch = f.map([100, 101, 7, 5, 4, 3], executor=pool, chunksize=4)
            print(batch.successes, batch.computed, batch.reused)
        except KeyboardInterrupt as exc:
            kept = exc  # Its traceback keeps the worker's frames, and whatever they hold, alive.
            start = time.monotonic()
            out = subprocess.run([sys.executable, __file__, sys.argv[1], sys.argv[2], "4"], capture_output=True,
                                 text=True, timeout=20)
            print("interrupted; another process computed", out.stdout.strip(), time.monotonic() - start < 10)
        except (RuntimeError, Warning) as exc:
            print(type(exc).__name__, exc)
"""


def readied(tmp_path: Path, ask: str) -> subprocess.CompletedProcess[str]:
    proc = child(READIED, str(tmp_path / "c"), ask, script_file=tmp_path / "job.py", timeout=60)
    assert isinstance(proc, subprocess.CompletedProcess)
    return proc


@pytest.mark.parametrize("ask", ["thread", "process"])
def test_a_readied_lock_is_given_up_to_whoever_the_running_call_waits_on(tmp_path, ask):
    """f(5) needs f(4), the input readied while it runs: asked in its own thread (a recursive function), the lock is
    given up at once; asked by another process, within _READY_HOLD. Either way f(4) is computed once, by the asker,
    and reused by the batch. Before, the call waited forever on the lock its own worker held for the next call."""
    proc = readied(tmp_path, ask)
    assert proc.stdout.split("\n")[0] == "[100, 101, 7, 5, 4, 3] 5 1", proc.stdout + proc.stderr
    assert proc.stderr.count("computed 4") == 1, proc.stderr
    if ask == "thread":
        assert "readied: True" in proc.stderr, "input 4 was readied while f(5) ran"


def test_a_readied_look_finds_an_entry_stored_since_the_parent_looked(tmp_path):
    """f(7) stores f(4) after the parent looked for it and before input 4 is readied: the readied look under the
    lock finds it, and the batch reuses it instead of computing it again."""
    proc = readied(tmp_path, "early")
    assert proc.stdout.split("\n")[0] == "[100, 101, 7, 5, 4, 3] 5 1", proc.stdout + proc.stderr
    assert proc.stderr.count("computed 4") == 1, proc.stderr


def test_an_entry_found_as_its_call_is_readied_is_judged_when_the_call_begins(tmp_path):
    """The entry that f(7) stored for input 4 is live when input 4 is readied (as f(5) begins) and past its ttl
    when input 4's call begins (after f(5)'s second): it is computed again, not served stale."""
    proc = readied(tmp_path, "ttl")
    assert proc.stdout.split("\n")[0] == "[100, 101, 7, 5, 4, 3] 6 0", proc.stdout + proc.stderr
    assert proc.stderr.count("computed 4") == 2, proc.stderr


def test_a_readied_call_that_asks_for_itself_is_an_error_not_a_hang(tmp_path):
    """The call takes over its readied lock as its own thread's: f(4) asking for f(4) is the error it is outside a
    batch, not a wait on a lock that another thread of the worker took for it."""
    proc = readied(tmp_path, "self")
    assert "this thread already holds the lock" in proc.stdout, proc.stdout + proc.stderr


def test_an_interrupted_chunk_gives_back_the_lock_it_readied(tmp_path):
    """KeyboardInterrupt in f(5), while input 4 is readied: its lock is given back as the chunk ends, even while
    the exception (and the frames it keeps) lives on; another process then computes f(4) at once."""
    proc = readied(tmp_path, "interrupt")
    assert proc.stdout.strip() == "interrupted; another process computed 4 True", proc.stdout + proc.stderr


def test_a_warning_as_an_error_in_the_background_writer_fails_the_chunk_instead_of_hanging(tmp_path):
    """With warnings as errors, f(5)'s unpicklable result made the writer thread's warning raise there and end the
    thread; the next call waited forever for it to ready input 4. The warning now comes from the chunk's own
    thread as it ends, as an error, which fails the batch."""
    proc = readied(tmp_path, "unpicklable")
    assert proc.stdout.startswith("DonecacheWarning") and "cannot be pickled" in proc.stdout, proc.stdout + proc.stderr


def test_a_chunk_says_its_own_warnings_not_those_of_the_chunk_before(tmp_path):
    """A pool worker's writer serves chunk after chunk. With warnings as errors, the first of a chunk's two
    warnings was raised and the second stayed behind, to fail the next chunk, which had none."""
    proc = child(
        """
        import threading, time, warnings

        @dc.memoize(sys.argv[1])
        def f(n):
            time.sleep(0.002)
            return threading.Lock() if n in (1, 2) else n

        def chunk(inputs):  # As a pool worker's main thread runs one.
            calls = [(f._keyed((n,), {}).key, (n,), str(n)) for n in inputs]
            return [outcome.value for outcome in dc._run_chunk(f, calls, False, False)[0]]

        warnings.simplefilter("error")
        try:
            chunk([1, 2, 3])
        except dc.DonecacheWarning as exc:
            print("first:", "cannot be pickled" in str(exc))
        print("second:", chunk([10, 11, 12]))
        """,
        str(tmp_path / "c"),
        timeout=60,
    )
    assert proc.stdout.split("\n")[:2] == ["first: True", "second: [10, 11, 12]"], proc.stdout + proc.stderr


# For child scripts that run a chunk as a pool worker does (_run_chunk): a memoized function whose calls are long
# enough for the writer to ready the next one, and a chunk's calls as the parent makes them.
SLEEPER = """
        import time

        @dc.memoize(sys.argv[1])
        def f(n):
            time.sleep(0.002)
            return n

        def chunk(*inputs):
            return [(f._keyed((n,), {}).key, (n,), str(n)) for n in inputs]
"""


def test_an_error_in_the_background_writer_is_said_and_the_writer_goes_on(tmp_path):
    """An error that escaped a job of the writer thread (here: readying a call) once ended the thread; every later
    result was handed to a queue nobody read, never stored, its key's lock never released. The writer now says it
    (once the chunk ends, in the chunk's thread) and goes on: every result is stored, no lock stays held."""
    proc = child(
        SLEEPER
        + """
        import warnings

        made = dc._Ready.make

        def failing(self):
            made(self)
            raise OSError("unlock failed")  # As if its lock's unlock had failed.

        dc._Ready.make = failing
        calls = chunk(*range(6))
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            dc._run_chunk(f, calls, False, False)
        print(sorted({str(w.message) for w in said}))
        print([f.is_cached(n) for n in range(6)])
        held = [ref() for _, ref in dc._KeyLock._holders.values()]
        print(sum(1 for lock in held if lock is not None and lock._handle is not None))
        """,
        str(tmp_path / "c"),
        timeout=60,
    )
    said, cached, held = proc.stdout.splitlines()
    assert said == '["a batch\'s background writer: OSError(\'unlock failed\')"]', proc.stdout + proc.stderr
    assert cached == str([True] * 6) and held == "0", proc.stdout + proc.stderr


def test_a_call_that_needs_the_result_just_handed_to_the_writer_waits_for_it(tmp_path):
    """f(n) calls f(n - 1), the call before it in the chunk, whose result the background writer is still storing
    (here: pickling takes 20 ms). The lock belongs to the writer from the hand-off on, so the call waits for the store
    and reads the entry; it was told "this thread already holds the lock" (a RuntimeError, one input failed)."""
    proc = child(
        """
        import time

        class Slow:  # A result that takes a while to store (a big array, a slow disk).
            def __init__(self, n):
                self.n = n

            def __reduce__(self):
                time.sleep(0.02)
                return (Slow, (self.n,))

        @dc.memoize(sys.argv[1])
        def f(n):
            print("computed", n, file=sys.stderr)
            if n > 1:
                f(n - 1)
            time.sleep(0.002)
            return Slow(n)

        calls = [(f._keyed((n,), {}).key, (n,), str(n)) for n in (1, 2, 3)]
        print([(o.ok, type(o.value).__name__) for o in dc._run_chunk(f, calls, False, False)[0]])
        print(len(dc._KeyLock._holders))
        """,
        str(tmp_path / "c"),
        timeout=60,
    )
    assert proc.stdout.splitlines() == [str([(True, "Slow")] * 3), "0"], proc.stdout + proc.stderr
    assert sorted(proc.stderr.split()) == sorted("computed 1 computed 2 computed 3".split()), proc.stderr


def test_a_value_that_exits_as_it_is_pickled_ends_the_chunk_as_it_would_a_plain_call(tmp_path):
    """Pickling runs the value's own code in the call's thread, before the hand-off: a SystemExit from it ends the
    chunk as it would end a loop of plain calls. It once ran in the writer thread and ended that thread: the results
    queued after it were never stored and their keys stayed locked, so another process waited forever."""
    proc = child(
        """
        import time

        class Exits:
            def __reduce__(self):
                raise SystemExit("bye")

        @dc.memoize(sys.argv[1])
        def f(n):
            time.sleep(0.002)
            return Exits() if n == 2 else n

        calls = [(f._keyed((n,), {}).key, (n,), str(n)) for n in (1, 2, 3)]
        try:
            dc._run_chunk(f, calls, False, False)
        except SystemExit as exc:
            print("exit:", exc)
        print([f.is_cached(n) for n in (1, 2, 3)], len(dc._KeyLock._holders), dc._Writer._current.alive())
        """,
        str(tmp_path / "c"),
        timeout=60,
    )
    assert proc.stdout.splitlines() == ["exit: bye", "[True, False, False] 0 True"], proc.stdout + proc.stderr


def test_a_value_is_pickled_in_the_calls_thread_where_its_code_may_take_what_the_call_holds(tmp_path):
    """f(n) computes under a library's lock and calls f(n - 1); the values' __reduce__ takes that lock too. The writer
    thread, pickling f(1)'s value, once waited for the lock that f(2) held, while f(2) waited for f(1)'s key lock,
    which the writer held: a deadlock. Pickling now happens in the call's thread, before the hand-off."""
    proc = child(
        """
        import faulthandler, threading, time

        faulthandler.dump_traceback_later(20, exit=True)
        LIBRARY = threading.Lock()

        class Handle:
            def __init__(self, n):
                self.n = n

            def __reduce__(self):
                time.sleep(0.02)  # A big value: f(2) has begun meanwhile.
                with LIBRARY:
                    return (Handle, (self.n,))

        @dc.memoize(sys.argv[1])
        def f(n):
            with LIBRARY:
                time.sleep(0.003)
                return Handle(n + (f(n - 1).n if n > 1 else 0))

        calls = [(f._keyed((n,), {}).key, (n,), str(n)) for n in (1, 2)]
        print([(o.ok, o.value.n) for o in dc._run_chunk(f, calls, False, False)[0]])
        """,
        str(tmp_path / "c"),
        timeout=60,
    )
    assert proc.stdout.strip() == "[(True, 1), (True, 3)]", proc.stdout + proc.stderr


def test_an_interrupt_as_a_readied_call_begins_gives_its_lock_back(tmp_path):
    """An interrupt that comes after the call took its readied lock but before its own try/finally had it: the chunk's
    end releases the lock, while the exception lives on (another process takes it at once)."""
    proc = child(
        SLEEPER
        + """
        import os, subprocess

        get = dc._Memoized._get

        def interrupted(self, call, *args, **kwargs):
            if len(args) > 3 and args[3] is not None:  # Given a readied lock.
                raise KeyboardInterrupt
            return get(self, call, *args, **kwargs)

        dc._Memoized._get = interrupted
        calls = chunk(1, 2, 3)
        try:
            dc._run_chunk(f, calls, False, False)
        except KeyboardInterrupt as exc:
            kept = exc  # Its traceback keeps the frames, and whatever they hold, alive.
        asker = "import sys; sys.path.insert(0, sys.argv[3]); import donecache as dc; " + (
            "dc._KeyLock(sys.argv[1], int(sys.argv[2])).acquire(timeout=5); print('taken')")
        slot = f._keyed((3,), {}).slot  # Readied while f(2) ran (after f(1), a call long enough to ready the next).
        out = subprocess.run([sys.executable, "-c", asker, f._store.lock_path, str(slot.offset),
                              os.path.dirname(dc.__file__)], capture_output=True, text=True, timeout=30)
        print("interrupted:", "kept" in dir(), out.stdout.strip() or out.stderr[-300:])
        """,
        str(tmp_path / "c"),
        timeout=60,
    )
    assert proc.stdout.strip() == "interrupted: True taken", proc.stdout + proc.stderr


def test_a_readied_look_that_finds_an_entry_does_not_read_its_value(tmp_path, monkeypatch):
    """The readied look only asks whether a file is at the entry's name: the call that finds one reads and judges it
    itself. It read the whole value, then the call read it again (a big entry twice, the call waiting for the first)."""

    @dc.memoize(tmp_path / "c")
    def f(n):
        return list(range(n))

    f(4)
    reads = []
    real = dc._read_entry

    def counting(fd, size, key, depth, mapped):
        reads.append(depth)
        return real(fd, size, key, depth, mapped)

    ready = dc._Ready(f, f._keyed((4,), {}).key, (4,))
    dc._recent.clear()  # As in a worker that did not write it.
    monkeypatch.setattr(dc, "_read_entry", counting)
    ready.make()
    monkeypatch.undo()
    assert ready.lock is None and ready.given_up, "an entry found: the call goes the ordinary way"
    assert dc._VALUE not in reads and dc._VERIFY not in reads, reads
    assert ready.call is not None and f(4) == [0, 1, 2, 3]


def test_a_call_readied_as_the_writer_died_is_taken_with_its_lock(tmp_path):
    """A writer that dies just after readying a call: the call begins with what was readied (its lock held by the
    calling thread), not as if nothing had been readied. The fake writer readies the call between the call's first
    look and its look after finding the writer gone: the window where take() once looked twice at its own lock."""

    @dc.memoize(tmp_path / "c")
    def f(n):
        return n

    ready = dc._Ready(f, f._keyed((7,), {}).key, (7,))

    class DyingWriter:
        asked = 0

        def alive(self):
            self.asked += 1
            if self.asked == 2:
                ready.make()  # Readied now, as the thread ends.
            return False

    call, lock = ready.take(DyingWriter())
    try:
        assert call is not None and call.args == (7,)
        assert lock is not None and lock._handle is not None
        with pytest.raises(RuntimeError, match="already holds the lock"):  # Held by this thread, as adopt() says.
            dc._KeyLock(lock.path, call.slot.offset).acquire(timeout=1)
    finally:
        if lock is not None:
            lock.release()


# -- Attack 14 (issue 10 item 14, failed before its fix): map(keep_going=False, workers=N) raises
#    the earliest input's failure


def test_map_in_threads_raises_the_earliest_failure(tmp_path):
    """Issue 10, item 14: map(keep_going=False, workers=N) raised the first failure to complete,
    not the first in input order, as the loop it stands for would."""

    @dc.memoize(tmp_path)
    def parse(x):
        if x == 0:
            time.sleep(0.5)
            raise ValueError("bad record 0")
        if x == 5:
            raise ValueError("bad record 5")
        return x

    with pytest.raises(ValueError) as caught:
        parse.map(range(8), workers=3, processes=False)
    assert str(caught.value) == "bad record 0"


@posix_only
def test_map_in_processes_raises_the_earliest_failure(tmp_path):
    """Issue 10, item 14: the same with a process pool."""
    proc = child(
        """
        import os, time

        @dc.memoize(os.environ["JOB_CACHE"])
        def parse(x):
            if x == 0:
                time.sleep(0.5)
                raise ValueError("bad record 0")
            if x == 5:
                raise ValueError("bad record 5")
            return x

        if __name__ == "__main__":
            try:
                parse.map(range(8), workers=3)
            except ValueError as exc:
                print(exc)
        """,
        env={"JOB_CACHE": str(tmp_path / "c")},
        script_file=tmp_path / "job.py",
    )
    assert proc.stdout.strip() == "bad record 0"


# ---------------------------------------------------------------------------
# The command line, and the example pipeline
# ---------------------------------------------------------------------------


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
    assert "3 entries, " in proc.stdout and "1 expired, 1 damaged, 1 temporary files left by crashed writers" in proc.stdout
    assert "  __main__:square\n    3 entries, " in proc.stdout
    report = json.loads(cli("info", str(filled_cache), "--json").stdout)
    assert report["entries"] == {"live": 3, "expired": 1, "damaged": 1}
    assert report["functions"] == {"__main__:square": 3} and report["temporary_files"] == 1


def test_cli_prune(filled_cache):
    proc = cli("prune", str(filled_cache), "--json")
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == {
        "path": str(filled_cache),
        "dry_run": False,
        "removed_entries": 2,
        "removed_temporary_files": 1,
    }
    assert json.loads(cli("info", str(filled_cache), "--json").stdout)["entries"] == {
        "live": 3,
        "expired": 0,
        "damaged": 0,
    }


def test_cli_prune_max_bytes_and_older_than(tmp_path):
    cache = tmp_path / "cache"
    with dc.open(cache) as db:
        for n in range(10):
            db[f"k{n}"] = bytes(100_000)  # 100 KiB... on disk: 100,352 bytes (ext4: 25 blocks).
    now = time.time()
    for path in entry_files(cache):  # k0 used 10 hours ago, ..., k9 one hour ago.
        n = int(entry_key(path).decode()[1:])
        os.utime(path, (now - 3600 * (10 - n), now - 3600 * (10 - n)))
    size = os.lstat(entry_files(cache)[0]).st_blocks * 512
    proc = cli("prune", str(cache), "--older-than", "5.5h", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["evicted_entries"] == 5  # k0 ... k4
    with dc.open(cache, "r") as db:
        assert sorted(db) == [f"k{n}" for n in range(5, 10)]
    proc = cli("prune", str(cache), "--max-bytes", str(3 * size))
    assert proc.returncode == 0 and "evicted 2 least recently used entries" in proc.stdout, proc.stdout
    with dc.open(cache, "r") as db:
        assert sorted(db) == ["k7", "k8", "k9"]
    assert disk_bytes(cache) <= 3 * size


@pytest.mark.parametrize(
    "option,value", [("--max-bytes", "0"), ("--max-bytes", "5X"), ("--max-bytes", "lots"), ("--older-than", "10"),
                     ("--older-than", "-1h"), ("--older-than", "soon")]
)
def test_cli_prune_refuses_bad_sizes_and_ages(filled_cache, option, value):
    before = sorted(p.name for p in entry_files(filled_cache))
    proc = cli("prune", str(filled_cache), f"{option}={value}")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"python -m donecache prune: {option} {value!r}: give a positive"), proc.stderr
    assert sorted(p.name for p in entry_files(filled_cache)) == before  # Refused before touching anything.


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
    encoded = dc._encode_entry(b"trap", None)
    encoded.stream = payload
    path.write_bytes(b"".join(encoded.chunks()))
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
        ("not a stage", False),
        ("missing", False),
    ]
    assert cli("status", str(tmp_path / "done"), "--version", "v3").stdout.startswith("other version")
    assert cli("status", str(tmp_path / "done"), "--marker", "_SUCCESS").returncode == 1


@posix_only
def test_cli_status_names_the_live_builder_and_only_reads(tmp_path, read_only):
    import socket

    stage = tmp_path / "stage"
    with stage_being_built(stage) as builder:
        read_only(stage)  # status must not need to write, not even the lock file.
        proc = cli("status", str(stage), "--json", unprivileged=True)
        assert proc.returncode == 1, proc.stderr
        [row] = json.loads(proc.stdout)
        assert row["state"] == "building"
        assert row["builder"] == {"host": socket.gethostname(), "pid": builder.pid}
        line = cli("status", str(stage)).stdout
        assert line.startswith("building") and f"pid {builder.pid}" in line
    [row] = json.loads(cli("status", str(stage), "--json").stdout)
    assert row["state"] == "incomplete" and row["builder"] is None, "a killed builder holds nothing"
    (tmp_path / "bare").mkdir()
    assert cli("status", str(tmp_path / "bare")).stdout.startswith("not a stage")
    assert listing(tmp_path / "bare") == [], "status created no lock file"


def test_cli_errors_and_help(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "plain").mkdir()
    for args, says in [
        (("info", str(tmp_path / "nothing")), "no such directory; give the path of a cache directory"),
        (("prune", str(tmp_path / "file")), "not a directory; give the path of a cache directory"),
        (("clear", str(tmp_path / "plain")), "not a donecache store"),
        (("status", str(tmp_path / "file")), "not a directory; give the directory of a stage"),
        (("status", str(tmp_path / "plain"), "--marker", "a/b"), "--marker 'a/b': give a plain file name"),
    ]:
        proc = cli(*args)
        assert proc.returncode == 2 and proc.stdout == "", args
        assert proc.stderr.startswith(f"python -m donecache {args[0]}: ") and says in proc.stderr, proc.stderr
        assert proc.stderr.count(str(tmp_path)) <= 1 and "flag=" not in proc.stderr, proc.stderr
    assert listing(tmp_path) == ["file", "plain"], "nothing was written or labelled"
    assert cli().returncode == 2
    assert cli("prune").returncode == 2
    for command in ("info", "clear", "prune", "status"):
        proc = cli(command, "--help")
        assert proc.returncode == 0 and "--json" in proc.stdout


@posix_only
def test_cli_on_a_read_only_cache_says_so_and_removes_nothing(tmp_path, read_only):
    cache = tmp_path / "cache"
    child(
        """
        import time
        @dc.memoize(sys.argv[1], ttl=0.01)
        def brief(x):
            return x
        brief(1)
        time.sleep(0.05)
        """,
        str(cache),
    )
    for path in [cache, *(p for p in cache.rglob("*") if p.is_dir())]:
        read_only(path)
    before = entry_files(cache)
    for command in (["prune"], ["clear"], ["clear", "--function", "brief"]):
        proc = cli(command[0], str(cache), *command[1:], unprivileged=True)
        assert proc.returncode == 2 and proc.stdout == "", command
        assert "Permission denied; check that it is writable" in proc.stderr
        assert proc.stderr.count(str(cache)) == 1, proc.stderr
    assert entry_files(cache) == before


def test_example_pipeline_tells_the_seed_story(tmp_path):
    script = Path(__file__).resolve().parent / "examples" / "pipeline.py"
    if not script.exists():
        pytest.skip("examples/ is not beside this test file (a vendored copy)")

    def run(*args: str) -> str:
        proc = child("", *args, run=[str(script)], env={"PIPELINE_OUT": str(tmp_path / "out")}, cwd=tmp_path,
                     check=False, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    first = run()
    assert "stage 1: wrote 2000 record files" in first
    assert re.search(r"stage 2: 1,993 computed \([^)]+\), 0 reused \(saved [^)]+ of compute\), 7 failed", first)
    assert "record 0137: ValueError: amount '91,61' is not a number" in first
    assert "record 0777: KeyError: 'customer'" in first
    ledger = json.loads(cli("failures", str(tmp_path / "out" / "cache"), "--json").stdout)
    ids = sorted(int(r["input"].split()[1]) for r in ledger["failures"])  # label= names each record.
    assert ids == [137, 402, 777, 1024, 1313, 1666, 1999]
    assert {"type": "ValueError", "message": "amount ... is not a number", "inputs": 3} in ledger["summary"]
    second = run()
    assert "stage 1: " + str(tmp_path / "out" / "records") + " is done; skipped" in second
    assert re.search(r"stage 2: 0 computed \([^)]+\), 1,993 reused \(saved [^)]+ of compute\), 7 failed", second)
    assert "record 0137: ValueError: amount '91,61' is not a number (recorded earlier)" in second
    fixed = run("--fixed")
    assert re.search(r"stage 2: 7 computed \([^)]+\), 1,993 reused \(saved [^)]+\), 0 failed", fixed), "the fix kept version=1"
    assert len((tmp_path / "out" / "report.csv").read_text().splitlines()) == 2001
    assert cli("failures", str(tmp_path / "out" / "cache")).returncode == 1, "the successes cleared the ledger"


# issue 21
def test_cli_sizes_version_default_path_and_dry_run(tmp_path):
    assert [dc._cli_size(t) for t in ("10M", "10MB", "10MiB", "10mib", "1.5K", "512", "2 GB", "3b")] == [
        10 << 20, 10_000_000, 10 << 20, 10 << 20, 1536, 512, 2_000_000_000, 3,
    ]  # fmt: skip
    for bad in ("10X", "MiB", "10iB", "-1M", "0"):
        with pytest.raises(dc._UsageError, match="give a positive size"):
            dc._cli_size(bad)
    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"donecache {dc.__version__}"
    with dc.open(tmp_path / ".donecache") as db:
        for i in range(5):
            db[str(i)] = "x" * 5000
    before = entry_files(tmp_path / ".donecache")
    proc = cli("prune", "--dry-run", "--max-bytes", "8K", cwd=tmp_path)  # No path: .donecache.
    assert proc.returncode == 0 and "would evict 4 least recently used entries (32.0 KiB on disk)" in proc.stdout
    assert entry_files(tmp_path / ".donecache") == before
    assert re.search(r"\n  5 entries, 2\d\.\d KiB \(40\.0 KiB on disk\)", cli("info", cwd=tmp_path).stdout)
    assert json.loads(cli("prune", "--max-bytes", "8KiB", "--json", cwd=tmp_path).stdout)["evicted_entries"] == 4


def shlex_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


# issue 21
@posix_only
def test_cli_broken_pipe_ends_quietly(tmp_path):
    with dc.open(tmp_path / "c") as db:
        for i in range(3000):
            db[str(i)] = i
    script = f"import runpy, sys\nsys.path.insert(0, {str(IMPORT_ROOT)!r})\nsys.argv = ['donecache.py', 'info', '--json', {str(tmp_path / 'c')!r}]\nrunpy.run_module({MODULE!r}, run_name='__main__')"
    proc = subprocess.run(
        f"{sys.executable} -c {shlex_quote(script)} | head -1", shell=True, capture_output=True, text=True, timeout=60
    )
    assert proc.stdout == "{\n" and proc.stderr == "", proc.stderr


# issue 21
def test_packaging_names_the_console_script_license_and_sdist_files():
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parent
    if not (root / "pyproject.toml").exists():
        pytest.skip("pyproject.toml is not beside this test file (a vendored copy)")
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"donecache": "donecache:main"} and callable(dc.main)
    assert project["project"]["license"] == "MIT" and not any("License ::" in c for c in project["project"]["classifiers"])
    include = project["tool"]["hatch"]["build"]["targets"]["sdist"]["include"]
    needed = {".ci/run", ".ci/typed_user.py", ".ci/fs_probe.py", "examples/pipeline.py", "test_donecache.py", "donecache.py"}
    assert all(any(name == path or (path.endswith("/") and name.startswith(path)) for path in include) for name in needed)


# issue 18 item 11 (failed on 0.2.0, 3cf1caa, unless the docstring says otherwise)
@posix_only
def test_status_shows_a_shared_stage_being_built(tmp_path):
    """Item 11: `status` said `incomplete` for a shared stage whose builders were at work:
    they hold the stage's lock only on entry and exit."""
    import socket

    stage = tmp_path / "stage"
    with stage_being_built(stage, expect=2) as builder:
        [row] = json.loads(cli("status", str(stage), "--json").stdout)
        assert row["state"] == "building" and row["builder"] == {"host": socket.gethostname(), "pid": builder.pid}
    [row] = json.loads(cli("status", str(stage), "--json").stdout)
    assert row["state"] == "incomplete", "a killed builder holds nothing"
    with dc.done_dir(stage, expect=2) as s:
        s.piece("b", lambda: "b")
    assert s.done and listing(stage) == [".donecache.lock", "DONE", "a", "b"], "the killed builder's file is swept"


# -- Attack 10 (issue 10 item 10, failed before its fix): the command line on directories that are not caches


@pytest.mark.parametrize("command", ["prune", "clear", "info"])
def test_cli_refuses_a_directory_that_is_not_a_store(tmp_path, command):
    """Issue 10, item 10: `python -m donecache prune DIR` (or clear) on any directory exited 0 and
    created .gitignore and CACHEDIR.TAG there. The command line must refuse a directory that is
    not a donecache store (exit 2, saying what it expected) and leave it untouched; `info` too,
    which reported an empty cache."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    proc = cli(command, str(project))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(project) in proc.stderr
    # Past "python -m donecache <command>:", and not in the path (named after this test).
    words = proc.stderr.split(":", 1)[-1].replace(str(tmp_path), "<tmp>")
    assert any(word in words for word in ("store", "cache", "CACHEDIR.TAG")), proc.stderr
    assert listing(project) == ["notes.txt"], "nothing created in a directory that is not a store"


def test_cli_still_serves_real_stores(tmp_path):
    """Issue 10, item 10: a store made by donecache.open (it has a CACHEDIR.TAG) still works."""
    with dc.open(tmp_path / "c") as db:
        db["k"] = 1
    assert (tmp_path / "c" / "CACHEDIR.TAG").exists()
    for command in ("info", "prune", "clear"):
        proc = cli(command, str(tmp_path / "c"))
        assert proc.returncode == 0, proc.stderr
    assert entry_files(tmp_path / "c") == []


# ---------------------------------------------------------------------------
# Power loss: a FUSE file system that forgets what was never synced
#
# In the spirit of LazyFS: a pass-through FUSE file system (mfusepy, over
# libfuse 3) runs a workload against a backing directory and logs every
# change in order: creates, renames, links, unlinks, writes and truncates
# (by inode), fsync and fsync of directories. A power cut at step k is the
# log's first k changes, replayed on a model of what a disk keeps:
#   "unsynced-lost"  names and data reach the disk only through fsync (of the
#                    file for its data, of its directory for its names);
#   "metadata-kept"  every name change and size survives but no unsynced data:
#                    new blocks read as zeros (XFS's "null files"; ext4's
#                    delayed allocation leaves such files empty instead);
#   "partial"        names survive and half of each file's unsynced writes
#                    reach the disk, the last of them torn.
# The workload runs once: a cut at step k is what it had done by then. What
# survives is written to a plain directory, where the checks (and any rerun
# that resumes) run in this process, as after a reboot: time.monotonic() is
# shifted, so the boot time that Python code derives from it has changed.
# Skipped without FUSE, fusermount3 or mfusepy.
# ---------------------------------------------------------------------------

POWERCUT_MODES = ("unsynced-lost", "metadata-kept", "partial")
POWERCUT_MARK = ".powercut-mark-"  # A workload stats <mount>/<this><name> to log a mark.
POWERCUT_MAX_CUTS = 80

POWERCUT_FS = r"""
import errno, os, pickle, sys
import mfusepy as fuse

backing, mount, log_path = sys.argv[1:4]
log = open(log_path, "wb", buffering=0)


def note(*record):
    log.write(pickle.dumps(record))


class PassThrough(fuse.Operations):
    use_ns = True

    def _real(self, path):
        return os.path.join(backing, path.lstrip("/"))

    def getattr(self, path, fh=None):
        if os.path.basename(path).startswith(MARK):
            note("mark", os.path.basename(path)[len(MARK):])
            raise fuse.FuseOSError(errno.ENOENT)
        st = os.fstat(fh) if fh is not None else os.lstat(self._real(path))
        names = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_ino", "st_blocks", "st_blksize", "st_rdev")
        found = {k: getattr(st, k) for k in names}
        found.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return found

    def access(self, path, amode):
        if not os.access(self._real(path), amode):
            raise fuse.FuseOSError(errno.EACCES)
        return 0

    def readdir(self, path, fh):
        return [".", "..", *os.listdir(self._real(path))]

    def readlink(self, path):
        return os.readlink(self._real(path))

    def statfs(self, path):
        sv = os.statvfs(self._real(path))
        return {k: getattr(sv, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                                            "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}

    def mkdir(self, path, mode):
        os.mkdir(self._real(path), mode)
        note("mkdir", path, mode)

    def rmdir(self, path):
        os.rmdir(self._real(path))
        note("unlink", path)

    def unlink(self, path):
        os.unlink(self._real(path))
        note("unlink", path)

    def symlink(self, target, source):
        os.symlink(source, self._real(target))
        note("symlink", target, source)

    def link(self, target, source):
        os.link(self._real(source), self._real(target))
        note("link", target, source)

    def rename(self, old, new):
        os.rename(self._real(old), self._real(new))
        note("rename", old, new)

    def chmod(self, path, mode):
        os.chmod(self._real(path), mode)
        note("chmod", path, mode)

    def chown(self, path, uid, gid):
        os.chown(self._real(path), uid, gid)

    def utimens(self, path, times=None):
        os.utime(self._real(path), ns=times)

    def create(self, path, mode, fi=None):
        fd = os.open(self._real(path), os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        note("create", path, mode, os.fstat(fd).st_ino)
        return fd

    def open(self, path, flags):
        fd = os.open(self._real(path), flags & ~(os.O_CREAT | os.O_EXCL | os.O_APPEND))
        if flags & os.O_TRUNC:
            note("truncate", os.fstat(fd).st_ino, 0)
        return fd

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        written = os.pwrite(fh, data, offset)
        note("write", os.fstat(fh).st_ino, offset, bytes(data[:written]))
        return written

    def truncate(self, path, length, fh=None):
        if fh is None:
            os.truncate(self._real(path), length)
            ino = os.lstat(self._real(path)).st_ino
        else:
            os.ftruncate(fh, length)
            ino = os.fstat(fh).st_ino
        note("truncate", ino, length)

    def fsync(self, path, datasync, fh):
        note("fsync", os.fstat(fh).st_ino)  # Nothing to do for real: the model keeps what was synced.
        return 0

    def fsyncdir(self, path, datasync, fh):
        note("fsyncdir", path)
        return 0

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0


MARK = sys.argv[4]
fuse.FUSE(PassThrough(), mount, foreground=True, nothreads=True, default_permissions=True)
"""


def _powercut_unavailable() -> str | None:
    """Why the power-cut harness cannot run here, or None."""
    if not sys.platform.startswith("linux"):
        return "the power-cut harness needs Linux FUSE"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "no fusermount3 (Debian: apt-get install fuse3)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"no FUSE binding (pip install mfusepy; libfuse3 from fuse3): {exc}"
    return None


powercut_harness = pytest.mark.skipif(_powercut_unavailable() is not None, reason=str(_powercut_unavailable()))


class _Node:
    """A file, directory or symlink of the model: what a program sees and what the disk holds."""

    def __init__(self, kind: str, mode: int, data: bytes = b"") -> None:
        self.kind, self.mode = kind, mode
        self.data = bytearray(data)  # What programs see.
        self.synced = bytes(data)  # What the disk holds.
        self.pending: list[tuple] = []  # Changes to the data since the last fsync, in order.
        self.entries: dict[str, _Node] = {}  # A directory's names, as programs see them...
        self.synced_entries: dict[str, _Node] = {}  # ... and as the disk holds them.


class _DiskModel:
    """Replays a power-cut log from a directory tree that is all on disk."""

    def __init__(self, backing: Path) -> None:
        self.by_ino: dict[int, _Node] = {}
        self.root = self._load(backing)

    def _load(self, path: Path) -> _Node:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            node = _Node("dir", stat.S_IMODE(st.st_mode))
            for name in os.listdir(path):
                node.entries[name] = self._load(path / name)
            node.synced_entries = dict(node.entries)
        elif stat.S_ISLNK(st.st_mode):
            node = _Node("link", 0o777, os.fsencode(os.readlink(path)))
        else:
            node = _Node("file", stat.S_IMODE(st.st_mode), path.read_bytes())
        self.by_ino[st.st_ino] = node
        return node

    def _parent(self, path: str) -> tuple[_Node, str]:
        node = self.root
        parts = [p for p in path.split("/") if p]
        for part in parts[:-1]:
            node = node.entries[part]
        return node, parts[-1]

    def lookup(self, path: str) -> _Node:
        parts = [p for p in path.split("/") if p]
        node = self.root
        for part in parts:
            node = node.entries[part]
        return node

    def apply(self, op: tuple) -> None:
        kind = op[0]
        if kind in ("create", "mkdir", "symlink"):
            parent, name = self._parent(op[1])
            node = {
                "create": lambda: _Node("file", op[2]),
                "mkdir": lambda: _Node("dir", op[2]),
                "symlink": lambda: _Node("link", 0o777, os.fsencode(op[2])),
            }[kind]()
            node.synced = bytes(node.data)  # A symlink's target is part of its name.
            parent.entries[name] = node
            if kind == "create":
                self.by_ino[op[3]] = node
        elif kind == "link":
            parent, name = self._parent(op[1])
            parent.entries[name] = self.lookup(op[2])
        elif kind == "rename":
            old_parent, old_name = self._parent(op[1])
            new_parent, new_name = self._parent(op[2])
            new_parent.entries[new_name] = old_parent.entries.pop(old_name)
        elif kind == "unlink":
            parent, name = self._parent(op[1])
            del parent.entries[name]
        elif kind == "chmod":
            self.lookup(op[1]).mode = stat.S_IMODE(op[2])
        elif kind in ("write", "truncate"):
            node = self.by_ino[op[1]]
            node.pending.append(op)
            _apply_data(node.data, op)
        elif kind == "fsync":
            node = self.by_ino[op[1]]
            node.synced, node.pending = bytes(node.data), []
        elif kind == "fsyncdir":
            node = self.lookup(op[1])
            node.synced_entries = dict(node.entries)

    def survivor(self, mode: str, into: Path) -> None:
        """Write what the disk would hold after a power cut in ``mode`` to the new directory ``into``."""
        written: dict[int, Path] = {}

        def data_of(node: _Node) -> bytes:
            if mode == "unsynced-lost" or not node.pending:
                return node.synced
            data = bytearray(node.synced)
            if mode == "metadata-kept":
                # Sizes are metadata and survive; blocks allocated since the last fsync read
                # as zeros, overwritten ones keep their old data (no unsynced byte lands).
                for op in node.pending:
                    end = op[2] if op[0] == "truncate" else max(len(data), op[2] + len(op[3]))
                    _apply_data(data, ("truncate", 0, end))
                return bytes(data)
            take = (len(node.pending) + 1) // 2
            for op in node.pending[: take - 1]:
                _apply_data(data, op)
            last = node.pending[take - 1]
            if last[0] == "write":  # Torn: its first half reached the disk.
                last = (*last[:3], last[3][: max(1, len(last[3]) // 2)])
            _apply_data(data, last)
            return bytes(data)

        def write(node: _Node, path: Path) -> None:
            if id(node) in written:
                os.link(written[id(node)], path)
            elif node.kind == "dir":
                path.mkdir()
                names = node.synced_entries if mode == "unsynced-lost" else node.entries
                for name, child_node in names.items():
                    write(child_node, path / name)
                os.chmod(path, node.mode)
            elif node.kind == "link":
                os.symlink(os.fsdecode(node.synced), path)
            else:
                path.write_bytes(data_of(node))
                os.chmod(path, node.mode)
                written[id(node)] = path

        write(self.root, into)


def _apply_data(data: bytearray, op: tuple) -> None:
    if op[0] == "truncate":
        del data[op[2] :]
        data.extend(bytes(op[2] - len(data)))
    else:
        offset, chunk = op[2], op[3]
        if len(data) < offset:
            data.extend(bytes(offset - len(data)))
        data[offset : offset + len(chunk)] = chunk


class PowerCut:
    """One survivor of a power cut: ``path`` holds it; ``marks`` are the workload's marks logged before it."""

    def __init__(self, mode: str, step: int, path: Path, marks: set[str]) -> None:
        self.mode, self.step, self.path, self.marks = mode, step, path, marks

    def __repr__(self) -> str:
        return f"cut at step {self.step} ({self.mode})"


def power_cuts(tmp_path: Path, setup: Callable[[Path], object], workload: str, *args: str):
    """Run ``workload`` (a child script; cwd is the mount) once on the FUSE file system over a
    backing directory that ``setup`` filled, then yield a PowerCut for each mode and each of up to
    POWERCUT_MAX_CUTS steps spread over its log (every step when there are fewer)."""
    backing, mount, log = tmp_path / "backing", tmp_path / "mount", tmp_path / "fs.log"
    backing.mkdir()
    mount.mkdir()
    setup(backing)
    initial = _DiskModel(backing)  # Before the run: writes name the backing files' inode numbers.
    server = subprocess.Popen(
        [sys.executable, "-c", POWERCUT_FS, str(backing), str(mount), str(log), POWERCUT_MARK],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mount):
            if server.poll() is not None:
                output = server.stdout.read() if server.stdout else ""
                pytest.skip(f"cannot mount the FUSE harness here (a container without CAP_SYS_ADMIN?): {output[-400:]}")
            assert time.monotonic() < deadline, "the FUSE harness did not mount in 30 s"
            time.sleep(0.02)
        ran = child(workload, *args, cwd=mount, check=False, timeout=300)
    finally:
        if os.path.ismount(mount):
            subprocess.run(["fusermount3", "-u", "-z", str(mount)], check=False)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert ran.returncode == 0, f"the workload failed on the FUSE file system:\n{ran.stdout}\n{ran.stderr}"
    # Replayed again from the start for each cut; the backing directory now holds the end state.
    records: list[tuple] = []
    with open(log, "rb") as f:
        while True:
            try:
                records.append(pickle.load(f))
            except EOFError:
                break
    steps = [i for i, r in enumerate(records) if r[0] != "mark"]
    assert steps, "the workload changed nothing on the FUSE file system"
    cuts = sorted({round(j * len(steps) / (POWERCUT_MAX_CUTS - 1)) for j in range(POWERCUT_MAX_CUTS)})
    for mode in POWERCUT_MODES:
        for k in cuts:
            model = copy.deepcopy(initial)
            # Cut just before step k + 1: marks logged after step k were made before the cut.
            end = steps[k] if k < len(steps) else len(records)
            marks = set()
            for record in records[:end]:
                if record[0] == "mark":
                    marks.add(record[1])
                else:
                    model.apply(record)
            survivor = tmp_path / f"cut-{mode}-{k}"
            model.survivor(mode, survivor)
            yield PowerCut(mode, k, survivor, marks)
            shutil.rmtree(survivor)


def powercut_report(violations: dict[str, list[str]], cuts: int) -> str:
    counts = ", ".join(f"{mode}: {len(found)}" for mode, found in violations.items())
    first = [f"  {v}" for found in violations.values() for v in found[:3]]
    return f"violations in {cuts} cuts per mode ({counts}):\n" + "\n".join(first)


def run_power_cuts(tmp_path, setup, workload, args, check) -> None:
    """Cut power at every step of the workload, in each mode; ``check(cut)`` returns the broken
    invariants of one survivor (a list of strings). Prints the counts; asserts there are none."""
    violations: dict[str, list[str]] = {mode: [] for mode in POWERCUT_MODES}
    cuts: set[int] = set()
    real_monotonic = time.monotonic
    rebooted = real_monotonic() / 2  # The machine came back up this many seconds after it first booted.
    for cut in power_cuts(tmp_path, setup, workload, *args):
        cuts.add(cut.step)
        time.monotonic = lambda: real_monotonic() - rebooted  # type: ignore[assignment]
        try:
            problems = check(cut)
        finally:
            time.monotonic = real_monotonic  # type: ignore[assignment]
        violations[cut.mode].extend(f"{cut!r}: {problem}" for problem in problems)
    report = powercut_report(violations, len(cuts))
    print(report)
    assert not any(violations.values()), report


POWERCUT_OLD = b"old." * 2000
POWERCUT_NEW = b"new!" * 3000

POWERCUT_ATOMIC = f"""
import os
durable = sys.argv[1] == "1"
NEW = {POWERCUT_NEW!r}
def mark(name):
    os.path.exists({POWERCUT_MARK!r} + name)
with dc.atomic_write("old.txt", "wb", durable=durable) as f:
    for i in range(3):  # Three writes reach the file system: a torn write is possible.
        f.write(NEW[i * 4000 : (i + 1) * 4000])
        f.flush()
mark("old.txt")
with dc.atomic_path("fresh.bin", durable=durable) as tmp:
    tmp.write_bytes(NEW)
mark("fresh.bin")
with dc.atomic_write("sub/deep.txt", "wb", durable=durable, make_parents=True) as f:
    f.write(NEW)
mark("sub/deep.txt".replace("/", "_"))
"""


@powercut_harness
@pytest.mark.parametrize("durable", [True, False], ids=["durable", "not-durable"])
def test_power_cut_atomic_write_leaves_the_old_or_the_new_file(tmp_path, durable):
    """Issue 18, items 12 and 12b: after a power cut at any step, in any mode, atomic_write and
    atomic_path leave the old file or the whole new one (never an empty or partial file), and a
    durable write that returned is there. Before 12b, durable=False left an empty or partial target
    in the metadata-kept and partial modes."""

    def setup(root: Path) -> None:
        (root / "old.txt").write_bytes(POWERCUT_OLD)

    def check(cut: PowerCut) -> list[str]:
        problems = []
        for name, old in [("old.txt", POWERCUT_OLD), ("fresh.bin", None), ("sub/deep.txt", None)]:
            path = cut.path / name
            found = path.read_bytes() if path.exists() else None
            returned = durable and name.replace("/", "_") in cut.marks
            allowed = [POWERCUT_NEW] if returned else [old, POWERCUT_NEW]
            if found not in allowed:
                what = "missing" if found is None else f"{len(found)} bytes, neither old nor new"
                problems.append(f"{name} is {what}" + (" after the write returned" if returned else ""))
        return problems

    run_power_cuts(tmp_path, setup, POWERCUT_ATOMIC, ["1" if durable else "0"], check)


POWERCUT_PIECES = {f"p{i}.bin": bytes([65 + i]) * 5000 for i in range(5)}
POWERCUT_PIECES["sub/p5.bin"] = b"F" * 5000

POWERCUT_STAGE = f"""
PIECES = {POWERCUT_PIECES!r}
with dc.done_dir("stage", durable=True) as stage:
    for name, data in PIECES.items():
        stage.piece(name, lambda data=data: data)
"""


def _build_powercut_stage(root: Path) -> None:
    with dc.done_dir(root / "stage", durable=True) as stage:
        for name, data in POWERCUT_PIECES.items():
            stage.piece(name, lambda data=data: data)


@powercut_harness
def test_power_cut_stage_resumed_never_marks_a_damaged_piece(tmp_path):
    """Issue 18, items 12 and 12a: a durable stage cut at any step, in any mode, has a marker only
    over complete pieces; and the rerun that resumes it (here, in the survivor) marks it done only
    over complete pieces. Before 12a the rerun trusted pieces whose names survived the cut but
    whose data was never synced, and wrote its marker over empty or partial pieces."""

    def check(cut: PowerCut) -> list[str]:
        problems = []
        stage = cut.path / "stage"

        def damaged() -> list[str]:
            return [n for n, data in POWERCUT_PIECES.items() if not (stage / n).exists() or (stage / n).read_bytes() != data]

        if dc.is_done(stage) and damaged():
            problems.append(f"marked done over damaged pieces {damaged()}")
        _build_powercut_stage(cut.path)  # The rerun after the power came back.
        if not dc.is_done(stage) or damaged():
            problems.append(f"the resumed build marked the stage done over damaged pieces {damaged()}")
        return problems

    run_power_cuts(tmp_path, lambda root: None, POWERCUT_STAGE, [], check)


POWERCUT_STORE = f"""
import os
durable = sys.argv[1] == "1"
def mark(name):
    os.path.exists({POWERCUT_MARK!r} + name)
store = dc.open("store", durable=durable)
for i in range(3):
    store[f"k{{i}}"] = (i, 1, b"v" * 3000)
    mark(f"k{{i}}-1")
store["k0"] = (0, 2, b"w" * 3000)
mark("k0-2")
if sys.argv[2] == "delete":
    mark("k1-deleting")
    del store["k1"]
    mark("k1-deleted")
store.close()
"""


def _check_powercut_store(cut: PowerCut, durable: bool) -> list[str]:
    """Every readable entry is right or absent; what a durable store returned from is there,
    and (12d) what it deleted stays deleted."""
    problems = []
    with dc.open(cut.path / "store", durable=durable) as store:
        for i in range(3):
            key = f"k{i}"
            try:
                found = store[key]
            except KeyError:
                found = None
            except Exception as exc:
                problems.append(f"reading {key} raised {type(exc).__name__}: {exc}")
                continue
            allowed = [None, (i, 1, b"v" * 3000)] + ([(0, 2, b"w" * 3000)] if i == 0 else [])
            if durable and f"{key}-1" in cut.marks and f"{key}-deleting" not in cut.marks:
                allowed.remove(None)
            if durable and "k0-2" in cut.marks and i == 0:
                allowed = [(0, 2, b"w" * 3000)]
            if durable and f"{key}-deleted" in cut.marks:
                allowed = [None]
            if found not in allowed:
                problems.append(f"{key} reads {str(found)[:40]}, expected one of {[str(a)[:20] for a in allowed]}")
    return problems


@powercut_harness
@pytest.mark.parametrize("durable", [True, False], ids=["durable", "not-durable"])
def test_power_cut_store_entries_are_right_or_absent(tmp_path, durable):
    """Issue 18, item 12: after a power cut at any step, in any mode, every entry a store reads is
    right or absent, and a durable store keeps what it returned from."""
    run_power_cuts(
        tmp_path, lambda root: None, POWERCUT_STORE, ["1" if durable else "0", "keep"],
        lambda cut: _check_powercut_store(cut, durable),
    )


@powercut_harness
def test_power_cut_durable_deletion_stays_deleted(tmp_path):
    """Issue 18, item 12d: with durable=True, a deleted entry stays deleted after a power cut once
    ``del`` returned."""
    run_power_cuts(
        tmp_path, lambda root: None, POWERCUT_STORE, ["1", "delete"], lambda cut: _check_powercut_store(cut, True)
    )


@powercut_harness
def test_power_cut_store_tags_are_repaired(tmp_path):
    """Issue 18, item 12e: a cut can leave the store's CACHEDIR.TAG and .gitignore empty; the next
    open of the store repairs them, so backup tools and git keep skipping it."""

    def check(cut: PowerCut) -> list[str]:
        with dc.open(cut.path / "store") as store:
            store["after"] = 1
        tag, ignore = cut.path / "store" / "CACHEDIR.TAG", cut.path / "store" / ".gitignore"
        problems = []
        found = tag.read_bytes() if tag.exists() else None
        if not (found or b"").startswith(b"Signature: 8a477f597d28d172789f06886806bc55"):
            problems.append(f"CACHEDIR.TAG holds {found!r:.30}")
        if not (ignore.exists() and ignore.read_bytes().strip()):
            problems.append(".gitignore is missing or empty")
        return problems

    run_power_cuts(tmp_path, lambda root: None, POWERCUT_STORE, ["0", "keep"], check)


POWERCUT_BOUNDED = """
store = dc.open("store", max_bytes=48 * 1024, durable=True)
for i in range(5):
    store[str(i)] = bytes([i]) * 12000
store.close()
"""


@powercut_harness
def test_power_cut_size_limit_total_is_recounted(tmp_path):
    """Issue 18, item 12c: after a power cut the store's running total may be stale; two more
    writes must still leave the store within max_bytes plus one entry."""

    def check(cut: PowerCut) -> list[str]:
        with dc.open(cut.path / "store", max_bytes=48 * 1024, durable=True) as store:
            for i in (10, 11):
                store[str(i)] = bytes([i]) * 12000
        entries = [
            os.lstat(os.path.join(d, n)) for d, _, names in os.walk(cut.path / "store") for n in names if len(n) == 32
        ]
        used = sum(dc._disk_bytes(st) for st in entries)
        bound = 48 * 1024 + max(dc._disk_bytes(st) for st in entries)
        return [f"the store takes {used} bytes, past {bound} (max_bytes plus one entry)"] if used > bound else []

    run_power_cuts(tmp_path, lambda root: None, POWERCUT_BOUNDED, [], check)


POWERCUT_MEMO_MODULE = '''
def square(x):
    return (x * x, b"m" * 3000)
'''

POWERCUT_MEMO = f"""
import os
sys.path.insert(0, sys.argv[1])
import powercut_memo
durable = sys.argv[2] == "1"
f = dc.memoize(os.path.abspath("cache"), durable=durable)(powercut_memo.square)
for i in range(3):
    f(i)
    os.path.exists({POWERCUT_MARK!r} + str(i))
"""


@powercut_harness
@pytest.mark.parametrize("durable", [True, False], ids=["durable", "not-durable"])
def test_power_cut_memoize_never_returns_a_wrong_value(tmp_path, durable, monkeypatch):
    """Issue 18, item 12: after a power cut at any step, in any mode, a memoized function returns
    the right value for every argument (a damaged entry is recomputed, never returned), and with
    durable=True a call that returned is a hit."""
    module = tmp_path / "module"
    module.mkdir()
    (module / "powercut_memo.py").write_text(POWERCUT_MEMO_MODULE)
    monkeypatch.syspath_prepend(str(module))
    import powercut_memo

    def check(cut: PowerCut) -> list[str]:
        problems = []
        f = dc.memoize(str(cut.path / "cache"), durable=durable)(powercut_memo.square)
        for i in range(3):
            if durable and str(i) in cut.marks and not f.is_cached(i):
                problems.append(f"f({i}) returned before the cut but is not cached")
            if f(i) != powercut_memo.square(i):
                problems.append(f"f({i}) returned a wrong value")
        return problems

    run_power_cuts(tmp_path, lambda root: None, POWERCUT_MEMO, [str(module), "1" if durable else "0"], check)


# ---------------------------------------------------------------------------
# The README
#
# The README prints the signature of every public function and of the memoized
# wrapper's methods in "signature blocks": fenced ```python blocks whose first
# line is exactly "# Signatures". Each other line there (a signature may run on
# over several lines until its parentheses close; blank lines and comments are
# skipped) is RECEIVER.NAME(PARAMETERS), optionally followed by a "# comment":
#   donecache.NAME  the module's attribute (a class: its __init__, without self)
#   f.NAME          the method of a memoized function (the wrapper @memoize makes)
#   stage.NAME      a method of donecache.Stage; store.NAME: of donecache.Store
# PARAMETERS are written as in a def: all of them, in order, with "*" before
# keyword-only ones, "/" after positional-only ones, *args, **kwargs, and each
# default as a Python literal (or the repr of the real default). Annotations and
# return types are left out.
# ---------------------------------------------------------------------------

README = Path(__file__).resolve().parent / "README.md"
README_SIGNATURES_HEADER = "# Signatures"
# Every public function, and the batch methods, must have its signature printed.
README_REQUIRED_SIGNATURES = {
    "donecache.atomic_write", "donecache.atomic_path", "donecache.done_dir", "donecache.is_done",
    "donecache.mark_not_done", "donecache.open", "donecache.memoize", "donecache.file_digest",
    "donecache.disabled", "f.map", "f.imap",
}  # fmt: skip


def _readme_square(x):
    return x * x


def _readme_signature_lines(text: str) -> tuple[list[tuple[int, str]], set[int]]:
    """The signatures in the signature blocks, each as (first line number, text with
    continuation lines joined), and the numbers of every line inside those blocks."""
    signatures: list[tuple[int, str]] = []
    inside: set[int] = set()
    lines = text.splitlines()
    fence = None  # None outside a fenced block, else whether it is a signature block.
    pending: tuple[int, str] | None = None
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            if fence is None:
                following = lines[number].strip() if number < len(lines) else ""
                fence = line.strip() == "```python" and following == README_SIGNATURES_HEADER
            else:
                assert pending is None, f"README.md:{pending[0]}: a signature whose parentheses never close"
                fence = None
            continue
        if not fence:
            continue
        inside.add(number)
        stripped = line.strip()
        if pending is None and (not stripped or stripped.startswith("#")):
            continue
        start, joined = pending if pending is not None else (number, "")
        joined = f"{joined} {stripped}" if joined else stripped
        code = joined.split("#", 1)[0]  # Defaults here hold no "#".
        pending = (start, joined) if code.count("(") > code.count(")") else None
        if pending is None:
            signatures.append((start, joined))
    return signatures, inside


def _readme_parameters(text: str) -> tuple[str, list[tuple[str, str, str | None]]]:
    """('receiver.name', [(parameter name, kind, default source or None)]) of one
    signature line; raises ValueError if it is not one."""
    import ast

    match = re.fullmatch(r"(\w+)\.(\w+)\((.*)\)\s*(#.*)?", text, re.S)
    if match is None:
        raise ValueError("not RECEIVER.NAME(PARAMETERS), optionally followed by a comment")
    receiver, name, params = match.group(1), match.group(2), match.group(3)
    try:
        arguments = ast.parse(f"def {name}({params}): pass").body[0].args
    except SyntaxError as exc:
        raise ValueError(f"its parameters do not parse as a def's: {exc.msg}") from None
    result: list[tuple[str, str, str | None]] = []
    positional = arguments.posonlyargs + arguments.args
    defaults = [None] * (len(positional) - len(arguments.defaults)) + list(arguments.defaults)
    for i, (arg, default) in enumerate(zip(positional, defaults)):
        kind = "POSITIONAL_ONLY" if i < len(arguments.posonlyargs) else "POSITIONAL_OR_KEYWORD"
        result.append((arg.arg, kind, None if default is None else ast.unparse(default)))
    if arguments.vararg is not None:
        result.append((arguments.vararg.arg, "VAR_POSITIONAL", None))
    for arg, default in zip(arguments.kwonlyargs, arguments.kw_defaults):
        result.append((arg.arg, "KEYWORD_ONLY", None if default is None else ast.unparse(default)))
    if arguments.kwarg is not None:
        result.append((arguments.kwarg.arg, "VAR_KEYWORD", None))
    return f"{receiver}.{name}", result


def _readme_real_signature(qualified: str, wrapper: object):
    """inspect.Signature of what a signature line names, without self; None if it names nothing."""
    import inspect

    receiver, name = qualified.split(".")
    owners = {"donecache": dc, "f": wrapper, "stage": dc.Stage, "store": dc.Store}
    if receiver not in owners or not hasattr(owners[receiver], name):
        return None
    obj = getattr(owners[receiver], name)
    if inspect.isclass(obj):
        obj = obj.__init__  # donecache.open is the class Store: its parameters are __init__'s.
    signature = inspect.signature(obj)
    if inspect.isfunction(obj) and (inspect.isclass(owners[receiver]) or obj.__name__ == "__init__"):
        signature = signature.replace(parameters=list(signature.parameters.values())[1:])  # self
    return signature


def _readme_default_matches(source: str, default: object) -> bool:
    import ast

    try:
        value = ast.literal_eval(source)
    except ValueError:
        return source == repr(default)
    return type(value) is type(default) and value == default


def _readme_signature_problems(text: str, wrapper: object) -> list[str]:
    """Every way the signature blocks of text disagree with the module, one line each."""
    import inspect

    problems = []
    shown = set()
    for number, line in _readme_signature_lines(text)[0]:
        try:
            qualified, parameters = _readme_parameters(line)
        except ValueError as exc:
            problems.append(f"README.md:{number}: {line!r}: {exc}")
            continue
        shown.add(qualified)
        real = _readme_real_signature(qualified, wrapper)
        if real is None:
            problems.append(
                f"README.md:{number}: {qualified} names nothing in the module (receivers: donecache, f, stage, store)"
            )
            continue
        real_parameters = [(p.name, p.kind.name, p.default) for p in real.parameters.values()]
        printed = [(name, kind) for name, kind, _ in parameters]
        actual = [(name, kind) for name, kind, _ in real_parameters]
        if printed != actual:
            problems.append(
                f"README.md:{number}: {qualified}: the README prints the parameters {printed}, "
                f"the module has {actual} (signature {real})"
            )
            continue
        for (name, _, printed_default), (_, _, real_default) in zip(parameters, real_parameters):
            no_default = real_default is inspect.Parameter.empty
            if (printed_default is None) != no_default or (
                printed_default is not None and not _readme_default_matches(printed_default, real_default)
            ):
                module_default = "none" if no_default else repr(real_default)
                problems.append(
                    f"README.md:{number}: {qualified}: parameter {name!r} has the default "
                    f"{printed_default or 'none'} in the README, {module_default} in the module"
                )
    problems += [f"README.md: no signature block shows {name}" for name in sorted(README_REQUIRED_SIGNATURES - shown)]
    return problems


def _readme_signatures_elsewhere(text: str, wrapper: object) -> list[str]:
    """Signatures printed outside the signature blocks (so never checked): any NAME(...)
    of a public function or a wrapper method, in prose, a heading or another code block,
    whose parameters parse as a def's with a bare "*" (which no call can have)."""
    import ast

    names = {qualified.split(".")[1] for qualified in README_REQUIRED_SIGNATURES} | {
        name for name in dir(wrapper) if not name.startswith("_")
    }
    inside = _readme_signature_lines(text)[1]
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if number in inside:
            continue
        for match in re.finditer(r"(\w+)\(((?:[^()]|\([^()]*\))*)\)", line):
            if match.group(1) not in names:
                continue
            try:
                arguments = ast.parse(f"def {match.group(1)}({match.group(2)}): pass").body[0].args
            except SyntaxError:
                continue
            if arguments.kwonlyargs and arguments.vararg is None:
                found.append(f"README.md:{number}: {match.group(0)}")
    return found


@pytest.mark.skipif(not README.exists(), reason="no README.md beside the tests (a vendored copy?)")
def test_every_signature_the_readme_prints_matches_the_module(tmp_path):
    """Issue 22: each signature in the README's signature blocks (see the banner above for
    the convention) has the real object's parameters: names, order, kind and defaults,
    compared with inspect.signature; every public function and f.map/f.imap have one; and
    no signature with keyword-only parameters is printed outside those blocks, where
    nothing would check it."""
    text = README.read_text(encoding="utf-8")
    wrapper = dc.memoize(str(tmp_path / "cache"))(_readme_square)
    problems = _readme_signature_problems(text, wrapper)
    elsewhere = _readme_signatures_elsewhere(text, wrapper)
    problems += [f"{where}: a signature outside a '# Signatures' block" for where in elsewhere]
    assert not problems, "\n".join(problems)


def test_the_readme_signature_check_catches_drift(tmp_path):
    """The check itself: a parameter missing, one too many, a keyword-only parameter
    shown as positional, a changed default, and a name the module lacks each fail."""
    wrapper = dc.memoize(str(tmp_path / "cache"))(_readme_square)
    required = "\n".join(f"{name}(*args, **kwargs)" for name in sorted(README_REQUIRED_SIGNATURES))
    drifted = {
        "missing": 'donecache.is_done(directory, *, version=None)',
        "extra": 'donecache.is_done(directory, *, version=None, marker="DONE", extra=1)',
        "kind": 'donecache.is_done(directory, version=None, *, marker="DONE")',
        "default": 'donecache.is_done(directory, *, version=None, marker="READY")',
        "unknown": "f.no_such_method(x)",
    }
    for case, line in drifted.items():
        text = f"```python\n{README_SIGNATURES_HEADER}\n{line}\n{required}\n```\n"
        problems = _readme_signature_problems(text, wrapper)
        assert any("README.md:3:" in problem for problem in problems), (case, problems)
    right = 'donecache.is_done(directory, *, version=None, marker="DONE")'
    problems = _readme_signature_problems(f"```python\n{README_SIGNATURES_HEADER}\n{right}\n```\n", wrapper)
    assert not any("README.md:3:" in problem for problem in problems), problems
    assert _readme_signatures_elsewhere("Use `done_dir(directory, *, version=None)` here.\n", wrapper)


def _markdown_anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file (lower case, punctuation dropped)."""
    anchors, fenced = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif line.startswith("#") and not fenced:
            heading = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower())
            anchors.add(heading.replace(" ", "-"))
    return anchors


@pytest.mark.skipif(not README.exists(), reason="no README.md beside the tests (a vendored copy?)")
def test_the_readme_and_docs_links_resolve():
    """Issue 22: the README sends reference material to docs/, benchmarks/README.md and
    CHANGELOG.md; each relative link there, and in those files, names a file that exists
    (and, for a Markdown file, a heading it has)."""
    root = README.parent
    pages = [README, root / "CHANGELOG.md", root / "benchmarks" / "README.md", *sorted((root / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(root)}: {target}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in _markdown_anchors(linked):
                broken.append(f"{page.relative_to(root)}: {target}: no such heading")
    assert not broken, "\n".join(broken)
