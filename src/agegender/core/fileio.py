"""Atomic writes: a file is either its old self or its new self, never half of either.

Everything the package writes for later (caches, checkpoints, results, reports) goes through
here: the new content is written to a temporary file beside the target, flushed to disk, and
moved over the target in one ``os.replace``. A killed process leaves the old file whole and, at
worst, a temporary ``NAME.tmpPID`` that :func:`remove_stale_temps` clears on the next run.

>>> import tempfile, pathlib
>>> p = pathlib.Path(tempfile.mkdtemp()) / "a.json"
>>> write_json(p, {"n": 1}); p.read_text()
'{\\n  "n": 1\\n}\\n'
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from agegender.core.errors import DataError

try:
    import fcntl
except ImportError:  # Windows: outputs are not locked there
    fcntl = None  # type: ignore[assignment]

_UMASK = os.umask(0o022)  # read once (setting it is the only way to read it), then put back
os.umask(_UMASK)
#: what a temporary file of :func:`temp_path` is called: the target's name + ``.tmp`` + a pid
_TEMP = re.compile(r"\.tmp(\d+)(\.\w+)?$")


def temp_path(path: str | os.PathLike, suffix: str = "") -> Path:
    """The temporary file beside ``path`` that this process writes before replacing it.

    ``suffix`` keeps an extension that a writer insists on (``np.save`` adds ``.npy``).
    """
    path = Path(path)
    return path.with_name(f"{path.name}.tmp{os.getpid()}{suffix}")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Flush a fully written ``tmp`` to disk and move it over ``path`` in one step, with the
    mode any new file gets here (some writers create theirs 0600)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)
    _fsync_dir(Path(path).parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to, for writers that take a path
    (``np.save``, ``safetensors``, ``savefig``, ``onnx.save``); it replaces ``path`` when the
    block ends without an exception and is removed when one is raised."""
    path = Path(path)
    tmp = temp_path(path, suffix)
    try:
        yield tmp
        replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there when the block failed


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """``open(path, mode)`` whose content replaces ``path`` only once the block completes."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, encoding="utf-8") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON (plus a newline) to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed runs left in ``folder``; return them.

    Only files named as :func:`temp_path` names them, by a process that no longer runs, are
    removed: a run still writing beside this one keeps its own.
    """
    removed = []
    root = Path(folder)
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        m = _TEMP.search(p.name)
        if m is None or not p.is_file() or _alive(int(m[1])):
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # someone else's process, or no way to tell
        return True
    return True


# --------------------------------------------------------------------------- outputs

#: what each kind of output the package writes for a user ends in; an existing file is replaced
#: only by an output of its own kind (new results over old), never by another kind (a CSV
#: over a photo, an ONNX file over a checkpoint)
OUTPUT_KINDS: dict[str, tuple[str, ...]] = {
    "JSON lines": (".jsonl", ".json"),
    "CSV": (".csv",),
    "video": (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"),
    "image": (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"),
    "ONNX": (".onnx",),
}
#: errors of a full disk (or a full quota, or a file over the size limit)
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

FileId = tuple[int, int]


def output_kind(path: str | os.PathLike) -> str | None:
    """The kind of output ``path`` names by its extension (a key of :data:`OUTPUT_KINDS`)."""
    suffix = Path(path).suffix.lower()
    return next((k for k, exts in OUTPUT_KINDS.items() if suffix in exts), None)


def file_id(path: str | os.PathLike) -> FileId | None:
    """An existing file's identity (device, inode), the same for a hard link, a symbolic link
    or another spelling of it; None when there is no such file."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def file_ids(paths: Iterable[str | os.PathLike]) -> dict[FileId, Path]:
    """Identity -> path of the existing files among ``paths`` (inputs to protect)."""
    return {key: Path(p) for p in paths if (key := file_id(p)) is not None}


def check_output(
    path: str | os.PathLike,
    kind: str,
    inputs: Mapping[FileId, Path] | Iterable[str | os.PathLike] = (),
    what: str = "output",
) -> Path:
    """Refuse, with a one-line :class:`DataError`, an output ``path`` (of ``kind``, a key of
    :data:`OUTPUT_KINDS`) whose writing would destroy something: a folder, one of ``inputs``
    (by identity, so a hard link or another spelling of an input is caught), or an existing
    file that is not an output of the same kind. ``what`` names it (``--output``)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{what} {path} is a folder: give the {kind} file's name")
    key = file_id(path)
    if key is None:
        return path
    if not isinstance(inputs, Mapping):
        inputs = file_ids(inputs)
    if key in inputs:
        raise DataError(f"{what} {path} is an input ({inputs[key]}): not replacing it")
    if output_kind(path) != kind:
        exts = ", ".join(OUTPUT_KINDS[kind])
        raise DataError(f"{what} {path} exists and is not a {kind} file ({exts}): not replacing it")
    return path


@contextlib.contextmanager
def output_path(
    path: str | os.PathLike,
    kind: str,
    inputs: Mapping[FileId, Path] | Iterable[str | os.PathLike] = (),
    what: str = "output",
    *,
    partial: str | os.PathLike | None = None,
) -> Iterator[Path]:
    """A temporary path beside ``path`` to write an output to; it replaces ``path`` when the
    block ends without an exception (if the block wrote it: a writer may find nothing to write).

    ``path`` is checked first (:func:`check_output`), its folder made, and it is locked
    (:func:`output_lock`) while the block runs: a second run writing the same output is
    refused instead of replacing the first one's. On any exception,
    Ctrl-C included, the temporary file is removed, except that with ``partial`` an interrupted
    or failed block's non-empty file is kept there (what a later run can resume from); a full
    disk is a one-line :class:`DataError` and leaves nothing.
    """
    path = check_output(path, kind, inputs, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, path.suffix)  # the extension too: writers choose a format by it
    with output_lock(path, what):  # refused here, before anything is written or removed
        try:
            yield tmp
            if tmp.exists():
                replace(tmp, path)
        except BaseException as e:
            if is_disk_full(e):  # what it wrote would only fill the disk further
                says = f"{what} {path}: no space left on the device; nothing written"
                raise DataError(says) from e
            # what a run found before Ctrl-C, SIGTERM or a dead worker is worth keeping
            if partial is not None and tmp.is_file() and tmp.stat().st_size:
                os.replace(tmp, partial)
            raise
        finally:
            tmp.unlink(missing_ok=True)  # only still there when the block failed


@contextlib.contextmanager
def output_file(
    path: str | os.PathLike,
    kind: str,
    inputs: Mapping[FileId, Path] | Iterable[str | os.PathLike] = (),
    what: str = "output",
    *,
    mode: str = "w",
    partial: str | os.PathLike | None = None,
    **open_kwargs: Any,
) -> Iterator[IO[Any]]:
    """``open(path, mode)`` on :func:`output_path`: checked, written whole or not at all."""
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    with (
        output_path(path, kind, inputs, what, partial=partial) as tmp,
        open(tmp, mode, **open_kwargs) as f,
    ):
        yield f


def is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` (or what caused it) is a full disk or quota: the user's to fix."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _FULL:
            return True
        error = error.__cause__
    return False


# --------------------------------------------------------------------------- locks


def lock_path(path: str | os.PathLike) -> Path:
    """The sidecar ``NAME.lock`` that :func:`output_lock` locks for ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, what: str = "output") -> Iterator[None]:
    """Hold an advisory lock on ``path``'s sidecar ``NAME.lock`` (holding this process's pid)
    for the block; raise a one-line :class:`DataError`, ``"PATH is being written by another
    run (pid N)"``, when another run holds it. A no-op where there is no ``fcntl`` (Windows).

    The lock is the open file's (``flock``), so a killed run's lock goes with it; the sidecar
    is removed on release.
    """
    if fcntl is None:
        yield
        return
    lock = lock_path(path)
    fd = _acquire(lock, Path(path), what)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()  # while still held: a run waiting on it then finds a fresh file
        os.close(fd)


def _acquire(lock: Path, path: Path, what: str) -> int:
    """An open, locked descriptor of ``lock``; the file is checked to still be the one named
    ``lock`` after locking (the run before may have removed it in between)."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return _unlocked(lock)
            raise DataError(
                f"{what} {path} is being written by another run (pid {_holder(lock)})"
            ) from None
        st = os.fstat(fd)
        if file_id(lock) == (st.st_dev, st.st_ino):
            return fd
        os.close(fd)


def _unlocked(lock: Path) -> int:
    """A descriptor for a file system without locks (some network mounts): not locked."""
    return os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)


def _holder(lock: Path) -> str:
    try:
        return lock.read_text(encoding="utf-8").strip() or "?"
    except OSError:
        return "?"


# --------------------------------------------------------------------------- CSV cells

#: what a spreadsheet reads a cell starting with as a formula (OWASP's list)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def csv_cell(value: Any) -> Any:
    """``value`` as a CSV cell that no spreadsheet runs as a formula.

    Text starting with ``= + - @``, a tab or a carriage return gets a leading ``'``, and so
    does text already starting with ``'``, so that :func:`csv_value` gives the text back
    exactly; numbers (``-1``, ``+2.5``) and non-text values are left as they are.

    >>> csv_cell("=HYPERLINK(1)"), csv_cell("-1"), csv_cell(-1), csv_value("'=HYPERLINK(1)")
    ("'=HYPERLINK(1)", '-1', -1, '=HYPERLINK(1)')
    """
    if not isinstance(value, str) or not value:
        return value
    if value[0] == "'" or (value.startswith(FORMULA_STARTS) and not _NUMBER.fullmatch(value)):
        return "'" + value
    return value


def csv_value(cell: str) -> str:
    """The text :func:`csv_cell` was given for ``cell``."""
    if cell[:1] == "'" and cell[1:2] and (cell[1] == "'" or cell[1:].startswith(FORMULA_STARTS)):
        return cell[1:]
    return cell
