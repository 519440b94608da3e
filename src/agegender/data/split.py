"""Splitting a cache into train, val and test: stratified dealing, near-duplicate groups kept
whole in one split, and split files that publish a split by content."""

from __future__ import annotations

import csv
import os
import sys
import time
from pathlib import Path

import numpy as np

from agegender.core import fileio
from agegender.core.errors import DataError
from agegender.data import near_dups
from agegender.data.manifest import PATHS_IN_TEXT, Row, read_manifest
from agegender.data.utkface import SPLITS, age_band

SPLIT_FILE_COLUMNS = ("name", "content_hash", "group", "split")


def split_indices(
    gender: np.ndarray, age: np.ndarray, fractions: tuple[float, ...], seed: int
) -> np.ndarray:
    """Assign each image a split (0, 1, 2, ...) stratified by gender and age band.

    Images are shuffled within each (gender, age band) stratum, strata are laid end to end and
    the splits are dealt along that order by largest deficit, so every stratum and the whole
    set get their fraction to within one image.
    """
    n = len(gender)
    rng = np.random.default_rng(seed)
    stratum = np.asarray(gender, dtype=np.int64) * 100 + age_band(np.asarray(age))
    order = np.lexsort((rng.random(n), stratum))
    target = np.asarray(fractions, dtype=np.float64)
    counts = np.zeros(len(target))
    out = np.empty(n, dtype=np.int64)
    for k, i in enumerate(order):
        s = int(np.argmax(target * (k + 1) - counts))
        counts[s] += 1
        out[i] = s
    return out


def parse_split(text: str | tuple[float, ...]) -> tuple[float, float, float]:
    """``"0.7,0.1,0.2"`` -> (0.7, 0.1, 0.2); fractions must be >= 0 and sum to 1."""
    try:
        parts = tuple(float(x) for x in text.split(",")) if isinstance(text, str) else text
    except ValueError:
        raise DataError(f"--split must be three numbers like 0.7,0.1,0.2, got {text!r}") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1) > 1e-6:
        raise DataError(f"--split must be three fractions >= 0 summing to 1, got {text!r}")
    return parts  # type: ignore[return-value]


def group_near_duplicates(kept: list[Row], images: np.ndarray, quiet: bool) -> None:
    """Set each kept row's near-duplicate group (``kept`` in image index order)."""
    t0 = time.perf_counter()
    pairs = near_dups.find_pairs(images)
    roots = near_dups.groups(len(kept), pairs)
    for r, root in zip(kept, roots):
        r.group = kept[root].content_hash
    if not quiet:
        print(f"near-duplicates: {len(pairs):,} pairs in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)  # fmt: skip


def assign_splits(
    kept: list[Row], fractions: tuple[float, ...], seed: int, given: dict[str, str] | None
) -> None:
    """Deal the kept rows to splits, stratified (or take each row's from ``given``, content
    hash -> split, and from its labels file's own split), then move each near-duplicate group
    whole to the earliest split any of its members went to."""
    genders, ages = np.array([r.gender for r in kept]), np.array([r.age for r in kept])
    dealt = split_indices(genders, ages, fractions, seed)
    if given:
        dealt = [SPLITS.index(given.get(r.content_hash, SPLITS[s])) for r, s in zip(kept, dealt)]
    dealt = [SPLITS.index(r.given_split) if r.given_split else s for r, s in zip(kept, dealt)]
    earliest: dict[str, int] = {}
    for r, s in zip(kept, dealt):
        earliest[r.group] = min(int(s), earliest.get(r.group, len(SPLITS)))
    for r in kept:
        r.split = SPLITS[earliest[r.group]]


def write_split_file(cache_dir: str | os.PathLike, path: str | os.PathLike) -> int:
    """Publish a cache's split as CSV (``name, content_hash, group, split``, one row per kept
    image, sorted by name); returns the number of rows."""
    rows = sorted((r for r in read_manifest(cache_dir) if r["status"] == "kept"),
                  key=lambda r: Path(r["path"]).name)  # fmt: skip
    with fileio.atomic_write(path, newline="", **PATHS_IN_TEXT) as f:
        w = csv.writer(f)
        w.writerow(SPLIT_FILE_COLUMNS)
        for r in rows:
            w.writerow(
                [
                    fileio.csv_cell(Path(r["path"]).name),
                    r["content_hash"],
                    r["group"][:16],
                    r["split"],
                ]
            )
    return len(rows)


def read_split_file(path: str | os.PathLike) -> dict[str, str]:
    """A split file (see :func:`write_split_file`) as ``{content_hash: split}``."""
    try:
        with open(path, newline="", **PATHS_IN_TEXT) as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"--split-file {path}: cannot read it ({e})") from None
    if not rows or not {"content_hash", "split"} <= rows[0].keys():
        raise DataError(f"--split-file {path}: needs content_hash and split columns")
    bad = [r["split"] for r in rows if r["split"] not in SPLITS]
    if bad:
        raise DataError(f"--split-file {path}: split {bad[0]!r} is not one of {', '.join(SPLITS)}")
    return {r["content_hash"]: r["split"] for r in rows}
