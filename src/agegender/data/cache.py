"""Reading a prepared cache: :func:`open_cache` and the :class:`Cache` it returns, the checks
that refuse a damaged or unfinished one, and the per-image weights that balance its groups.

A cache directory written by :func:`agegender.data.prepare.prepare` holds:

- ``images.npy``: uint8 array ``(N, H, W, C)`` (C = 1 for gray, 3 for RGB), memory-mappable;
- ``manifest.csv`` (:mod:`agegender.data.manifest`): one row per file found, kept or not;
- ``summary.json``: the counts ``prepare`` printed (:mod:`agegender.data.summary`);
- ``cache.json``: what the cache was built from, so an unchanged re-run reuses it. It is
  written last and removed before anything else changes, so it marks a complete cache.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agegender.core.errors import DataError
from agegender.data.manifest import Row, read_rows
from agegender.data.summary import SUMMARY_COUNTS
from agegender.data.utkface import SPLITS, age_band

CACHE_VERSION = 3  # 2: near-duplicate groups in the manifest; 3: labels files, age ranges


@dataclass(frozen=True)
class Cache:
    """A prepared cache: images and labels aligned by index.

    ``images`` is a read-only memory map ``(N, H, W, C)`` uint8; ``age``, ``gender``, ``race``
    are ``(N,)`` integer arrays (gender and race -1 where not known; age a range's middle, the
    range in ``age_low``/``age_high``, equal for a whole-years label); ``split`` is ``(N,)``
    strings in :data:`~agegender.data.utkface.SPLITS`; ``groups`` the labels files' group
    columns, ``(N,)`` strings each.
    """

    root: Path
    images: np.ndarray
    age: np.ndarray
    gender: np.ndarray
    race: np.ndarray
    split: np.ndarray
    paths: list[str] = field(repr=False)
    summary: dict[str, Any] = field(repr=False)
    content_hash: list[str] = field(repr=False, default_factory=list)
    group: list[str] = field(repr=False, default_factory=list)  # near-duplicate groups
    age_low: np.ndarray | None = field(repr=False, default=None)
    age_high: np.ndarray | None = field(repr=False, default=None)
    origin: list[str] = field(repr=False, default_factory=list)
    groups: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    @property
    def has_ranges(self) -> bool:
        return self.age_low is not None and bool((self.age_low != self.age_high).any())

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    @property
    def color(self) -> str:
        return "gray" if self.images.shape[3] == 1 else "rgb"

    def indices(self, split: str | None = None) -> np.ndarray:
        """Row indices of one split (``train``/``val``/``test``), or all rows for ``None``."""
        if split is None:
            return np.arange(len(self.images))
        if split not in SPLITS:
            raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        return np.flatnonzero(self.split == split)

    def __len__(self) -> int:
        return len(self.images)


def is_cache(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a cache's images and manifest (complete or not)."""
    p = Path(path)
    return (p / "images.npy").is_file() and (p / "manifest.csv").is_file()


def unfinished_cache(path: str | os.PathLike) -> bool:
    """What a killed (or still running) ``prepare`` leaves: its files, and no ``cache.json``."""
    p = Path(path)
    if not p.is_dir() or (p / "cache.json").is_file():
        return False
    names = [q.name for q in p.iterdir()]
    ours = ("images.", "manifest.csv", "summary.json", "images-compact.")
    return any(n.startswith(ours) for n in names)


def open_cache(path: str | os.PathLike) -> Cache:
    """Open a cache written by ``prepare`` (images memory-mapped, not loaded)."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"no such cache directory: {path}")
    if unfinished_cache(root) and not is_cache(root):
        raise DataError(
            f"{path} is an unfinished cache (prepare was interrupted, or is still running): "
            "run agegender prepare again"
        )
    if not is_cache(root):
        raise DataError(
            f"{path} is not a prepared cache (no images.npy and manifest.csv): "
            "run `agegender prepare DATA_DIR --out CACHE_DIR` first"
        )
    images, rows, summary, group_columns = read_cache(root)
    kept = sorted((r for r in rows if r.status == "kept"), key=lambda r: r.index)
    return Cache(
        root=root,
        images=images,
        age=np.array([r.age for r in kept], dtype=np.int64),
        gender=np.array([r.gender for r in kept], dtype=np.int64),
        race=np.array([r.race for r in kept], dtype=np.int64),
        split=np.array([r.split for r in kept]),
        paths=[r.path for r in kept],
        summary=summary,
        content_hash=[r.content_hash for r in kept],
        group=[r.group for r in kept],
        age_low=np.array([r.age_low for r in kept], dtype=np.int64),
        age_high=np.array([r.age_high for r in kept], dtype=np.int64),
        origin=[r.origin for r in kept],
        groups={g: np.array([r.groups.get(g, "") for r in kept]) for g in group_columns},
    )


class DamagedCache(DataError):
    """A cache whose files do not agree with each other: ``prepare`` rebuilds it."""

    def __init__(self, root: Path, why: str):
        super().__init__(f"cache {root} is damaged ({why}); run prepare again")
        self.why = why


def read_cache(root: Path) -> tuple[np.ndarray, list[Row], dict[str, Any], list[str]]:
    """The memory-mapped images, every manifest row, the summary and the group columns of the
    cache at ``root``.

    Each file is checked against ``cache.json`` and the others, so that what a killed run or a
    damaged disk left behind raises :class:`DamagedCache` here rather than an obscure error.
    """
    size, color = _read_key(root)
    images = _read_images(root, size, color)
    try:
        rows, group_columns = read_rows(root / "manifest.csv")
    except ValueError as e:
        raise DamagedCache(root, f"manifest.csv {e}") from None
    kept = sorted(r.index for r in rows if r.status == "kept")
    if kept != list(range(len(images))):
        raise DamagedCache(
            root, f"manifest.csv lists {len(kept):,} kept images, images.npy holds {len(images):,}"
        )
    summary = _read_summary(root)
    if (summary["files_found"], summary["kept"]) != (len(rows), len(kept)):
        raise DamagedCache(root, "summary.json does not match manifest.csv")
    return images, rows, summary, group_columns


def _read_key(root: Path) -> tuple[int, str]:
    """The image size and colour ``cache.json`` says the cache holds."""
    try:
        key = json.loads((root / "cache.json").read_text())["key"]
        size, color = int(key["size"]), key["color"]
        if color not in ("gray", "rgb"):
            raise ValueError(color)
    except FileNotFoundError:
        raise DamagedCache(root, "no cache.json: prepare did not finish") from None
    except (ValueError, KeyError, TypeError):
        raise DamagedCache(root, "cache.json is unreadable") from None
    return size, color


def _read_images(root: Path, size: int, color: str) -> np.ndarray:
    """``images.npy`` memory-mapped, once its header and length agree with ``cache.json``."""
    channels = 1 if color == "gray" else 3
    try:
        with (root / "images.npy").open("rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(version)
            if read_header is None:
                raise ValueError(f"unknown .npy version {version}")
            shape, fortran, dtype = read_header(f)
            expected = f.tell() + int(np.prod(shape)) * dtype.itemsize
            found = os.fstat(f.fileno()).st_size
    except ValueError as e:
        raise DamagedCache(root, f"images.npy is not a readable .npy file: {e}") from None
    if dtype != np.uint8 or fortran or tuple(shape[1:]) != (size, size, channels):
        raise DamagedCache(
            root, f"images.npy holds {dtype} {shape}, cache.json says {size}x{size} {color}"
        )
    if found != expected:
        raise DamagedCache(
            root, f"images.npy is {found:,} bytes, {expected:,} expected for {shape}"
        )
    return np.load(root / "images.npy", mmap_mode="r")


def _read_summary(root: Path) -> dict[str, Any]:
    try:
        summary = json.loads((root / "summary.json").read_text())
    except FileNotFoundError:
        raise DamagedCache(root, "no summary.json") from None
    except ValueError:
        raise DamagedCache(root, "summary.json is not valid JSON") from None
    if not isinstance(summary, dict) or not all(
        isinstance(summary.get(k), int) for k in SUMMARY_COUNTS
    ):
        raise DamagedCache(root, "summary.json lacks its counts")
    return summary


def balance_weights(race: np.ndarray, age: np.ndarray, by: str, power: float) -> np.ndarray:
    """Per-image draw weights, ``(size of its group) ** -power``, scaled to a mean of 1: with
    ``by`` = ``race`` or ``race_age`` (race x age band) groups.

    >>> balance_weights(np.array([0, 0, 0, 1]), np.array([30] * 4), "race", 1.0).round(2)
    array([0.67, 0.67, 0.67, 2.  ])
    """
    group = race * 10 + (age_band(age) if by == "race_age" else 0)
    _, inverse, counts = np.unique(group, return_inverse=True, return_counts=True)
    w = counts[inverse].astype(np.float64) ** -power
    return w * (len(w) / w.sum())
