"""``prepare``'s work on the files themselves, in a process pool: hashing their bytes, and
decoding them (a crop taken as given, or a photo's face detected and aligned) straight into a
memory-mapped ``.npy`` that the workers share.

A worker gets everything through its arguments: the face detector of a chunk of photos is
built there, on the first photo, so no process keeps state between chunks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from agegender.core.progress import progress_bar
from agegender.vision.images import load_face, load_photo
from agegender.vision.scan import link_problem, not_regular


def chunks(n: int, k: int) -> list[range]:
    """``range(n)`` cut into ranges of ``k`` (the last shorter)."""
    return [range(i, min(i + k, n)) for i in range(0, n, k)]


def pool_map(
    fn: Callable[..., Any],
    jobs: list[tuple],
    sizes: list[int],
    workers: int,
    desc: str,
    quiet: bool,
) -> list[Any]:
    """Run ``fn(*job)`` for each job in a process pool with a progress bar (``sizes``: the
    images of each job); results in order. One worker or one job: in this process."""
    results: list = [None] * len(jobs)
    bar = progress_bar(total=sum(sizes), quiet=quiet, desc=desc, unit="img")
    if workers <= 1 or len(jobs) <= 1:
        for j, job in enumerate(jobs):
            results[j] = fn(*job)
            bar.update(sizes[j])
    else:
        pool = ProcessPoolExecutor(workers)
        try:
            futures = {pool.submit(fn, *job): j for j, job in enumerate(jobs)}
            for fut in as_completed(futures):
                j = futures[fut]
                results[j] = fut.result()
                bar.update(sizes[j])
        finally:
            # on Ctrl-C, drop the chunks still queued rather than wait for all of them
            pool.shutdown(cancel_futures=True)
    bar.close()
    return results


def hash_file(path: Path) -> tuple[str, str | None]:
    """``(content hash, None)``, or ``("", "unreadable: why")``."""
    special = not_regular(path)  # opening a FIFO would wait for a writer forever
    if special:
        return "", f"unreadable: {special}"
    try:
        data = path.read_bytes()
    except OSError as e:
        return "", f"unreadable: {link_problem(path) or e.strerror or e}"
    if not data:
        return "", "unreadable: empty file"
    return hashlib.blake2b(data, digest_size=16).hexdigest(), None


def hash_chunk(paths: list[Path]) -> list[tuple[str, str | None]]:
    """:func:`hash_file` for each path: one pool job."""
    return [hash_file(p) for p in paths]


class NoFace(ValueError):
    """A photo without the face a labels row is about."""


class _Faces:
    """Finds a labelled photo's face as ``predict`` does; the detector is built on first use,
    so a chunk of crops taken as given never loads it."""

    def __init__(self) -> None:
        self._detector: Any = None

    def crop(self, path: str, data_config: dict[str, Any], box: str) -> np.ndarray:
        """The face of the photo at ``path`` (``box``: "x0 y0 x1 y1" of the one meant, "" when
        it has one face only), aligned and preprocessed as prediction does it."""
        from agegender.vision.detect import face_crop, get_detector, the_face

        if self._detector is None:
            self._detector = get_detector("yunet")
        rgb, (w, _) = load_photo(path)
        scale = rgb.shape[1] / w  # boxes are in the photo's pixels; a huge photo decodes shrunk
        given = tuple(float(v) * scale for v in box.split()) if box else None
        try:
            face = the_face(self._detector.detect_faces(rgb), given)  # type: ignore[arg-type]
        except ValueError as e:
            raise NoFace(str(e)) from None
        return face_crop(rgb, face, data_config)


def decode_chunk(
    out: str, start: int, items: list[tuple[str, str | None]], data_config: dict[str, Any]
) -> list[tuple[int, str]]:
    """Decode ``items`` (path, and None for a crop taken as given or the box of a photo to
    detect in) as ``data_config`` says into rows ``start...`` of the .npy at ``out``; return
    the failures ``(row, "reason: why")``."""
    images = np.load(out, mmap_mode="r+")
    faces = _Faces()
    failures = []
    for i, (path, box) in enumerate(items):
        try:
            images[start + i] = (
                load_face(path, data_config) if box is None else faces.crop(path, data_config, box)
            )
        except NoFace as e:
            failures.append((start + i, f"no face: {e}"))
        except ValueError as e:
            failures.append((start + i, f"unreadable: {e}"))
        except Exception as e:  # one bad file must never stop the run
            failures.append((start + i, f"unreadable: {type(e).__name__}: {e}"))
    images.flush()
    return failures
