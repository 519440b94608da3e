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
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

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
