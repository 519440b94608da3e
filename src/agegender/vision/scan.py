"""Finding image files: the one folder scanner, for ``prepare`` and ``predict`` alike.

A folder is walked whole, symbolic links to folders followed, each folder once (by its device
and inode, so a link loop or a second link to one folder is not walked again). What is found
must be a regular file to be read: a FIFO would block the reader forever, a device would be
read without end, so those (and sockets) are skipped with their reason, and one named directly
is refused. A broken link or a link loop named as an image is kept: its reader reports it.

>>> scan_images(["/dev/null"])
Traceback (most recent call last):
agegender.core.errors.DataError: /dev/null: not a regular file (a character device)
"""

from __future__ import annotations

import errno
import os
import stat
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agegender.core.errors import DataError

#: what a folder scan picks up (any case); a file named on the command line is read whatever
#: its extension. Every one is a format :mod:`agegender.vision.images` decodes (a GIF by its
#: first frame), so a folder finds what naming its files would read.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


@dataclass
class Scan:
    """What :func:`scan_images` found: ``files`` to read, in order (each file named, then each
    folder's files sorted), and ``skipped``: ``(path, why)`` for what no reader should open."""

    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def link_problem(path: str | os.PathLike) -> str | None:
    """``"broken symbolic link"``, ``"symbolic link loop"`` or None (not a bad link)."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except FileNotFoundError:
        return "broken symbolic link"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop"
        return None
    return None


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a file")


def not_regular(path: str | os.PathLike) -> str | None:
    """``"not a regular file (a FIFO)"`` and the like for what must not be opened as a file
    (opening a FIFO blocks until a writer comes); None for a regular file, and for a path that
    cannot be stat'ed (missing, a bad link), which its reader reports."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else f"not a regular file ({_kind(mode)})"


def scan_images(
    paths: Iterable[str | os.PathLike], suffixes: tuple[str, ...] = IMAGE_SUFFIXES
) -> Scan:
    """Files as given (any extension) and the images under folders (recursive, sorted).

    Raises :class:`~agegender.core.errors.DataError` for a path that does not exist or is not
    a regular file or a folder, and when nothing is found.
    """
    paths = list(paths)
    found = Scan()
    walked: set[tuple[int, int]] = set()  # folders by (device, inode): each walked once
    for p in map(Path, paths):
        try:
            st = os.stat(p)
        except OSError:
            if not link_problem(p):
                raise DataError(f"no such file or directory: {p}") from None
            found.files.append(p)  # its reader reports the bad link, in its row
            continue
        if stat.S_ISDIR(st.st_mode):
            under: list[Path] = []
            _walk(p, (st.st_dev, st.st_ino), suffixes, walked, under, found.skipped)
            found.files += sorted(under)
        elif stat.S_ISREG(st.st_mode):
            found.files.append(p)
        else:
            raise DataError(f"{p}: not a regular file ({_kind(st.st_mode)})")
    if not found.files:
        kinds = ", ".join(suffixes)
        also = f" ({len(found.skipped):,} not regular files skipped)" if found.skipped else ""
        raise DataError(f"no image files ({kinds}) under {', '.join(map(str, paths))}{also}")
    return found


def _walk(
    top: Path,
    top_id: tuple[int, int],
    suffixes: tuple[str, ...],
    walked: set[tuple[int, int]],
    found: list[Path],
    skipped: list[tuple[Path, str]],
) -> None:
    """Add the files under ``top`` named with ``suffixes`` to ``found``, what cannot be read
    to ``skipped``; folders (links to folders too) whose id is in ``walked`` are passed by."""
    if top_id in walked:
        return
    walked.add(top_id)
    todo = [top]
    while todo:
        folder = todo.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:
            skipped.append((folder, f"unreadable folder: {e.strerror or e}"))
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                st = entry.stat()  # follows links: a link to a folder is a folder
            except OSError:  # a broken link or a link loop: its reader reports it
                if path.suffix.lower() in suffixes:
                    found.append(path)
                continue
            if stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) not in walked:
                    walked.add((st.st_dev, st.st_ino))
                    todo.append(path)
            elif path.suffix.lower() not in suffixes:
                continue
            elif stat.S_ISREG(st.st_mode):
                found.append(path)
            else:
                skipped.append((path, f"not a regular file ({_kind(st.st_mode)})"))


def find_images(
    paths: Iterable[str | os.PathLike], suffixes: tuple[str, ...] = IMAGE_SUFFIXES
) -> list[Path]:
    """:func:`scan_images`' files; what it skipped is said in one warning, not dropped
    silently."""
    found = scan_images(paths, suffixes)
    if found.skipped:
        path, why = found.skipped[0]
        more = f" and {len(found.skipped) - 1:,} more" if len(found.skipped) > 1 else ""
        warnings.warn(f"skipped {path} ({why}){more}", stacklevel=2)
    return found.files
