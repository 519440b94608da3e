"""Data: label parsing, image decoding, de-duplication, splitting and the decoded cache.

Images come from UTKFace folders (labels in the file names, aligned crops taken as given) and
from labels files of your own (:mod:`agegender.labels`: ages, ranges, genders, groups), whose
photos are detected and aligned as ``predict`` does it unless they are crops (``aligned``).

A cache directory written by :func:`prepare` holds:

- ``images.npy``: uint8 array ``(N, H, W, C)`` (C = 1 for gray, 3 for RGB), memory-mappable;
- ``manifest.csv``: one row per image found, with its labels (an age range as ``age_low`` and
  ``age_high``, -1 for a gender or race not known), where it came from (``origin``), content
  hash, split, status (``kept`` or why it was skipped), ``index`` (its row in ``images.npy``,
  -1 if not kept) and the labels files' group columns (``by:NAME``);
- ``summary.json``: the counts :func:`prepare` printed;
- ``cache.json``: what the cache was built from, so an unchanged re-run reuses it. It is
  written last and removed before anything else changes, so it marks a complete cache.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from agegender import fileio, near_dups
from agegender.config import SPLIT_SEED
from agegender.errors import DataError
from agegender.images import (
    COLORS,
    face_config,
    find_images,
    link_problem,
    load_face,
    load_photo,
    preprocess,
)
from agegender.labels import LabelRow, read_labels

GENDERS = ("male", "female")  # UTKFace: 0 = male, 1 = female
RACES = ("White", "Black", "Asian", "Indian", "Others")  # UTKFace race codes 0..4
AGE_RANGE = (1, 120)
AGE_BANDS = ((0, 9), (10, 19), (20, 39), (40, 59), (60, 200))
SPLITS = ("train", "val", "test")
#: how files that hold paths are written and read: a file name that is not valid UTF-8 keeps its
#: bytes (os.fsencode of what is read gives them back) instead of failing the whole run
PATHS_IN_TEXT = {"encoding": "utf-8", "errors": "surrogateescape"}
CACHE_VERSION = 3  # 2: near-duplicate groups in the manifest; 3: labels files, age ranges
GROUP_PREFIX = "by:"  #: manifest columns of the labels files' groups

# age_gender_race_datetime, then the extension as it really occurs: ".jpg.chip.jpg",
# " .jpg.chip.jpg", "jpg.chip.jpg" (no dot), upper case, or a plain ".jpg"/".jpeg"/".png".
_NAME = re.compile(r"^(?P<stem>.+?)\s*\.?(?:jpe?g|png)(?:\.chip\.jpe?g)?$", re.IGNORECASE)


class Labels(NamedTuple):
    """Labels parsed from a UTKFace file name."""

    age: int
    gender: int  # 0 male, 1 female
    race: int  # 0..4, see RACES


def parse_name(name: str) -> Labels:
    """Parse ``age_gender_race_datetime.jpg.chip.jpg`` into :class:`Labels`.

    Raises ``ValueError`` whose message says why the name was rejected.

    >>> parse_name("26_1_2_20170116174525125.jpg.chip.jpg")
    Labels(age=26, gender=1, race=2)
    >>> parse_name("24_0_1_20170116220224657 .jpg.chip.jpg")
    Labels(age=24, gender=0, race=1)
    >>> parse_name("39_1_20170116174525125.jpg.chip.jpg")
    Traceback (most recent call last):
    ValueError: missing field: expected age_gender_race_datetime, got 3 fields
    """
    base = os.path.basename(name)
    match = _NAME.match(base)
    if match is None:
        raise ValueError("not an image name ending in .jpg, .jpeg or .png")
    fields = match["stem"].split("_")
    if len(fields) < 4:
        raise ValueError(
            f"missing field: expected age_gender_race_datetime, got {len(fields)} fields"
        )
    if len(fields) > 4:
        raise ValueError(f"expected age_gender_race_datetime, got {len(fields)} fields")
    if not all(f.isdigit() for f in fields):
        raise ValueError("fields must be whole numbers")
    age, gender, race = (int(f) for f in fields[:3])
    if not AGE_RANGE[0] <= age <= AGE_RANGE[1]:
        raise ValueError(f"age {age} outside {AGE_RANGE[0]}..{AGE_RANGE[1]}")
    if gender not in (0, 1):
        raise ValueError(f"gender {gender} is not 0 (male) or 1 (female)")
    if not 0 <= race < len(RACES):
        raise ValueError(f"race {race} outside 0..{len(RACES) - 1}")
    return Labels(age, gender, race)


def age_band(age: int | np.ndarray) -> int | np.ndarray:
    """Index of the age band in :data:`AGE_BANDS` (0-9, 10-19, 20-39, 40-59, 60+)."""
    edges = np.array([lo for lo, _ in AGE_BANDS[1:]])
    band = np.searchsorted(edges, age, side="right")
    return int(band) if np.ndim(band) == 0 else band


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


def band_name(band: int) -> str:
    lo, hi = AGE_BANDS[band]
    return f"{lo}+" if band == len(AGE_BANDS) - 1 else f"{lo}-{hi}"


def _real(path: Path) -> Path:
    """The file's real path; a broken link or a link loop stays as it was found."""
    try:
        return path.resolve(strict=True)
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


def _hash_file(path: Path) -> tuple[str, str | None]:
    try:
        data = path.read_bytes()
    except OSError as e:
        return "", f"unreadable: {link_problem(path) or e.strerror or e}"
    if not data:
        return "", "unreadable: empty file"
    return hashlib.blake2b(data, digest_size=16).hexdigest(), None


def _hash_chunk(paths: list[Path]) -> list[tuple[str, str | None]]:
    return [_hash_file(p) for p in paths]


class _NoFace(ValueError):
    """A photo without the face a labels row is about."""


_detector: Any = None  # one per process that detects (a pool worker), built on first use


def detected_face(path: str, config: dict, box: str) -> np.ndarray:
    """The face of the photo at ``path`` found, aligned and preprocessed as ``predict`` does
    it (``box``: "x0 y0 x1 y1" of the one meant, "" when it has one face only)."""
    global _detector
    from agegender.detect import align_face, get_detector, the_face

    if _detector is None:
        _detector = get_detector("yunet")
    rgb, (w, _) = load_photo(path)
    scale = rgb.shape[1] / w  # boxes are in the photo's pixels; a huge photo decodes shrunk
    given = tuple(float(v) * scale for v in box.split()) if box else None
    try:
        face = the_face(_detector.detect_faces(rgb), given)  # type: ignore[arg-type]
    except ValueError as e:
        raise _NoFace(str(e)) from None
    # UTKFace's geometry at 200 px, then the same resize and colour path as prediction
    return preprocess(align_face(rgb, face, 200), config)


def _decode_chunk(
    out: str, start: int, items: list[tuple[str, str | None]], size: int, color: str
) -> list[tuple[int, str]]:
    """Decode ``items`` (path, and None for a crop taken as given or the box of a photo to
    detect in) into rows ``start...`` of the .npy at ``out``; return the failures."""
    images = np.load(out, mmap_mode="r+")
    config = face_config(size, color)
    failures = []
    for i, (path, box) in enumerate(items):
        try:
            images[start + i] = (
                load_face(path, config) if box is None else (detected_face(path, config, box))
            )
        except _NoFace as e:
            failures.append((start + i, f"no face: {e}"))
        except ValueError as e:
            failures.append((start + i, f"unreadable: {e}"))
        except Exception as e:  # one bad file must never stop the run
            failures.append((start + i, f"unreadable: {type(e).__name__}: {e}"))
    images.flush()
    return failures


def _chunks(n: int, k: int) -> list[range]:
    return [range(i, min(i + k, n)) for i in range(0, n, k)]


def _pool_map(fn, jobs: list[tuple], sizes: list[int], workers: int, desc: str, quiet: bool):
    """Run ``fn(*job)`` for each job in a process pool with a progress bar; results in order."""
    from concurrent.futures import as_completed

    from tqdm import tqdm

    results: list = [None] * len(jobs)
    bar = tqdm(total=sum(sizes), desc=desc, unit="img", disable=quiet, leave=False, file=sys.stderr)
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


# --------------------------------------------------------------------------- splitting


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


# --------------------------------------------------------------------------- prepare


MANIFEST_COLUMNS = (
    "path",
    "age",
    "age_low",
    "age_high",
    "gender",
    "race",
    "origin",
    "box",
    "content_hash",
    "group",
    "split",
    "status",
    "index",
)
#: a near-duplicate group disagrees widely when its genders differ or its ages span more than
#: this many years (or a quarter of the youngest age, when that is more)
CONFLICT_YEARS = 5


@dataclass
class _Row:
    path: str
    age: int | None = None  # whole years; a range's middle
    gender: int | None = None  # 0 male, 1 female, -1 not known
    race: int | None = None  # 0..4, -1 not known
    content_hash: str = ""
    group: str = ""  # near-duplicate group: the content hash of its first member
    split: str = ""
    status: str = ""
    index: int = -1
    age_low: int | None = None
    age_high: int | None = None
    origin: str = ""  # the folder or labels file it came from
    box: str = ""  # "x0 y0 x1 y1": which face of the photo (labels files)
    groups: dict[str, str] = field(default_factory=dict)
    aligned: bool = True  # a crop taken as given, else detected and aligned
    given_split: str = ""  # the labels file's own split for it

    @property
    def key(self) -> tuple[str, str]:
        """What makes two rows one image: the same bytes and the same face of them."""
        return self.content_hash, self.box


def _fingerprint(paths: list[Path]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        try:
            st = p.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:  # a broken link: it has its row, and changes the fingerprint if mended
            size = mtime = -1
        # the name's own bytes: a name that is not valid UTF-8 is still a name
        h.update(os.fsencode(p) + f"\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def _write_manifest(path: Path, rows: list[_Row], group_columns: list[str]) -> None:
    blank = lambda v: "" if v is None else v  # noqa: E731
    with fileio.atomic_write(path, newline="", **PATHS_IN_TEXT) as f:
        w = csv.writer(f)
        w.writerow([*MANIFEST_COLUMNS, *(GROUP_PREFIX + g for g in group_columns)])
        for r in rows:
            w.writerow(
                [
                    r.path,
                    blank(r.age),
                    blank(r.age_low),
                    blank(r.age_high),
                    blank(r.gender),
                    blank(r.race),
                    r.origin,
                    r.box,
                    r.content_hash,
                    r.group,
                    r.split,
                    r.status,
                    r.index,
                    *(r.groups.get(g, "") for g in group_columns),
                ]
            )


def read_manifest(cache_dir: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of ``manifest.csv`` as dicts of strings."""
    with (Path(cache_dir) / "manifest.csv").open(newline="", **PATHS_IN_TEXT) as f:
        return list(csv.DictReader(f))


def _parse_row(fields: list[str], group_columns: list[str]) -> _Row:
    if len(fields) != len(MANIFEST_COLUMNS) + len(group_columns):
        raise ValueError(f"{len(fields)} fields instead of {len(MANIFEST_COLUMNS)}")
    path, age, low, high, gender, race, origin, box, digest, group, split, status, index = fields[
        : len(MANIFEST_COLUMNS)
    ]
    number = lambda x: int(x) if x else None  # noqa: E731
    r = _Row(path, number(age), number(gender), number(race), digest, group, split, status)
    r.age_low, r.age_high, r.origin, r.box = number(low), number(high), origin, box
    r.groups = dict(zip(group_columns, fields[len(MANIFEST_COLUMNS) :]))
    r.index = int(index)
    if not status:
        raise ValueError("no status")
    if status == "kept" and not (
        r.age is not None
        and r.age_low is not None
        and r.age_high is not None
        and r.age_low <= r.age <= r.age_high
        and r.gender in (-1, 0, 1)
        and r.race is not None
        and -1 <= r.race < len(RACES)
        and split in SPLITS
        and r.group
        and r.index >= 0
    ):
        raise ValueError("a kept image without valid labels, split or index")
    return r


class _Damaged(DataError):
    def __init__(self, root: Path, why: str):
        super().__init__(f"cache {root} is damaged ({why}); run prepare again")
        self.why = why


# the summary counts that explore() reports
_SUMMARY_COUNTS = (
    "files_found",
    "unparsable",
    "unreadable",
    "duplicate_groups",
    "conflicting_groups",
    "kept",
)


def _read_cache(root: Path) -> tuple[np.ndarray, list[_Row], dict[str, Any], list[str]]:
    """The memory-mapped images, every manifest row, the summary and the group columns of the
    cache at ``root``.

    Each file is checked against ``cache.json`` and the others, so that what a killed run or a
    damaged disk left behind raises :class:`_Damaged` here rather than an obscure error later.
    """
    try:
        key = json.loads((root / "cache.json").read_text())["key"]
        size, color = int(key["size"]), key["color"]
        channels = {"gray": 1, "rgb": 3}[color]
    except FileNotFoundError:
        raise _Damaged(root, "no cache.json: prepare did not finish") from None
    except (ValueError, KeyError, TypeError):
        raise _Damaged(root, "cache.json is unreadable") from None

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
        raise _Damaged(root, f"images.npy is not a readable .npy file: {e}") from None
    if dtype != np.uint8 or fortran or tuple(shape[1:]) != (size, size, channels):
        raise _Damaged(
            root,
            f"images.npy holds {dtype} {shape}, cache.json says {size}x{size} {color}",
        )
    if found != expected:
        raise _Damaged(root, f"images.npy is {found:,} bytes, {expected:,} expected for {shape}")
    images = np.load(root / "images.npy", mmap_mode="r")

    line = 1
    try:
        with (root / "manifest.csv").open(newline="", **PATHS_IN_TEXT) as f:
            reader = csv.reader(f)
            header = next(reader, [])
            extra = header[len(MANIFEST_COLUMNS) :]
            if tuple(header[: len(MANIFEST_COLUMNS)]) != MANIFEST_COLUMNS or not all(
                c.startswith(GROUP_PREFIX) for c in extra
            ):
                raise ValueError("not the manifest header")
            group_columns = [c[len(GROUP_PREFIX) :] for c in extra]
            rows = []
            for fields in reader:
                line = reader.line_num
                rows.append(_parse_row(fields, group_columns))
    except (ValueError, csv.Error) as e:
        raise _Damaged(root, f"manifest.csv line {line}: {e}") from None
    kept = sorted(r.index for r in rows if r.status == "kept")
    if kept != list(range(len(images))):
        raise _Damaged(
            root, f"manifest.csv lists {len(kept):,} kept images, images.npy holds {len(images):,}"
        )

    try:
        summary = json.loads((root / "summary.json").read_text())
    except FileNotFoundError:
        raise _Damaged(root, "no summary.json") from None
    except ValueError:
        raise _Damaged(root, "summary.json is not valid JSON") from None
    if not isinstance(summary, dict) or not all(
        isinstance(summary.get(k), int) for k in _SUMMARY_COUNTS
    ):
        raise _Damaged(root, "summary.json lacks its counts")
    if (summary["files_found"], summary["kept"]) != (len(rows), len(kept)):
        raise _Damaged(root, "summary.json does not match manifest.csv")
    return images, rows, summary, group_columns


def _summarise(rows: list[_Row], extra: dict[str, Any]) -> dict[str, Any]:
    status = Counter(r.status.split(":")[0] for r in rows)
    dup_groups: defaultdict[str, int] = defaultdict(int)
    for r in rows:
        if r.content_hash:
            dup_groups[r.content_hash] += 1
    kept = [r for r in rows if r.status == "kept"]
    return {
        "files_found": len(rows),
        "parsed": len(rows) - status["unparsable"] - status["bad label"],
        "unparsable": status["unparsable"],
        "bad_labels": status["bad label"],
        "unreadable": status["unreadable"],
        "no_face": status["no face"],
        "duplicate_groups": sum(1 for v in dup_groups.values() if v > 1),
        "conflicting_groups": len(
            {r.content_hash for r in rows if r.status.startswith("conflicting")}
        ),
        "duplicates_removed": status["duplicate"],
        "kept": len(kept),
        **_near_duplicate_counts(kept),
        "splits": {s: sum(1 for r in kept if r.split == s) for s in SPLITS},
        **extra,
    }


def _near_duplicate_counts(kept: list[_Row]) -> dict[str, Any]:
    members: defaultdict[str, list[_Row]] = defaultdict(list)
    for r in kept:
        members[r.group].append(r)
    shared = [m for m in members.values() if len(m) > 1]
    conflicts = [m for m in shared if _conflict(m)]
    return {
        "near_duplicate_groups": len(shared),
        "near_duplicate_images": sum(len(m) for m in shared),
        "near_duplicate_conflicts": len(conflicts),
        "near_duplicate_conflict_examples": [
            [f"{Path(r.path).name}" for r in m] for m in conflicts[:5]
        ],
    }


def _conflict(members: list[_Row]) -> bool:
    """Copies of one photograph whose labels disagree widely (see ``CONFLICT_YEARS``); a
    gender not known disagrees with none."""
    ages = [r.age for r in members]
    span = max(CONFLICT_YEARS, min(ages) / 4)
    genders = {r.gender for r in members} - {-1}
    return len(genders) > 1 or max(ages) - min(ages) > span


def format_summary(summary: dict[str, Any]) -> str:
    """The summary of :func:`prepare` as aligned lines for people."""
    s = summary
    lines = [
        f"files found          {s['files_found']:>8,}",
        f"parsed               {s['parsed']:>8,}",
        f"unparsable names     {s['unparsable']:>8,}",
        *(
            [f"bad labels           {s['bad_labels']:>8,}  (see manifest.csv)"]
            if s.get("bad_labels")
            else []
        ),
        f"unreadable files     {s['unreadable']:>8,}",
        *(
            [f"no usable face       {s['no_face']:>8,}  (none found, or several and no box)"]
            if s.get("no_face")
            else []
        ),
        f"duplicate groups     {s['duplicate_groups']:>8,}  (byte-identical files)",
        f"conflicting groups   {s['conflicting_groups']:>8,}  (copies disagree on age/gender: "
        "dropped)",
        f"kept images          {s['kept']:>8,}",
        f"near-duplicates      {s['near_duplicate_groups']:>8,}  groups of the same photo "
        f"({s['near_duplicate_images']:,} images), each kept in one split; "
        f"{s['near_duplicate_conflicts']:,} disagree widely on their labels",
        "splits               " + "  ".join(f"{k} {v:,}" for k, v in s["splits"].items()),
        f"images               {s['image_shape']} uint8 in {s['cache_dir']}/images.npy",
        f"time                 {s['seconds']:.1f} s" + ("  (cache reused)" if s["reused"] else ""),
    ]
    return "\n".join(lines)


def prepare(
    data_dirs: list[str | os.PathLike],
    out: str | os.PathLike,
    size: int = 128,
    color: str = "gray",
    seed: int = SPLIT_SEED,
    split: str | tuple[float, float, float] = (0.7, 0.1, 0.2),
    workers: int = 0,
    quiet: bool = False,
    split_file: str | os.PathLike | None = None,
    labels: list[str | os.PathLike] = (),  # type: ignore[assignment]
    aligned: bool = False,
) -> dict[str, Any]:
    """Scan, parse, de-duplicate, decode and split images into a cache at ``out``: UTKFace
    folders ``data_dirs`` and the labels files ``labels`` (see :mod:`agegender.labels`), mixed
    at will, each row's origin recorded.

    Returns the summary (also written to ``out/summary.json``). Files that cannot be used are
    listed in ``manifest.csv`` with the reason; they never stop the run, but a run that keeps
    no image at all raises :class:`DataError` and writes no cache. Re-running on unchanged
    files with the same ``size`` and ``color`` reuses the decoded images (a new ``seed`` or
    ``split`` only re-deals the splits).

    Copies of one photograph that are not byte-identical (:mod:`agegender.near_dups`) form a
    group, and a group never crosses splits: images are dealt to splits stratified by gender
    and age band, then each group goes whole to the earliest split one of its members was dealt
    to (train, val, test). With the default ``seed`` the splits are those the bundled models
    were trained on; ``splits/utkface.csv`` publishes them. ``split_file`` (such a CSV, with
    ``content_hash`` and ``split`` columns) gives each image it lists its split, whatever the
    folder layout or the other files; images it does not list are dealt as usual. A labels
    file's ``split`` column does the same for its rows.

    UTKFace folders hold UTKFace's aligned crops, taken as given (the bundled models trained
    so). A labels file's images are photos: each face is found and aligned with the detector
    and alignment ``predict`` uses, so training sees the geometry prediction will (the
    ``box`` column picks one face of several); ``aligned=True`` takes them as crops instead.
    A photo without a face, or with several and no box, is reported in the manifest.
    """
    t0 = time.perf_counter()
    fractions = parse_split(split)
    if color not in COLORS:
        raise DataError(f"--color must be one of {', '.join(COLORS)}, got {color!r}")
    if not 16 <= size <= 1024:
        raise DataError(f"--size must be between 16 and 1024, got {size}")
    if not data_dirs and not labels:
        raise DataError("no data folder or labels file given")
    # every file once, by its real path, sorted: the first of byte-identical copies is then
    # the same whatever the order or spelling of the folders given
    paths = sorted({_real(p) for p in find_images(data_dirs)}) if data_dirs else []
    labelled, group_columns = _labelled_rows(labels, aligned)
    out_dir = Path(out)
    images_path = out_dir / "images.npy"
    meta_path = out_dir / "cache.json"
    workers = workers or min(os.cpu_count() or 1, 8)
    channels = 1 if color == "gray" else 3

    key = {"version": CACHE_VERSION, "files": _fingerprint(paths), "size": size, "color": color}
    key["near_duplicates"] = near_dups.SIGNATURE_VERSION
    if labels:  # the labels themselves, their images, and how they are read
        key["labels"] = _labels_fingerprint(labels, labelled, aligned)
    reused = False
    fileio.remove_stale_temps(out_dir)  # what a killed prepare left behind
    try:
        if json.loads(meta_path.read_text()).get("key") == key:
            _, rows, _, group_columns = _read_cache(out_dir)
            reused = True
    except (OSError, ValueError, AttributeError):
        pass  # no cache there yet, or not ours: build one
    except _Damaged as e:
        if not quiet:
            print(f"cache {out_dir} is damaged ({e.why}): rebuilding it", file=sys.stderr)

    created = not out_dir.exists()
    tmp_images = None
    try:
        if not reused:
            out_dir.mkdir(parents=True, exist_ok=True)
            rows, tmp_images = _build(paths, labelled, out_dir, size, color, workers, quiet)
        kept = [r for r in rows if r.status == "kept"]
        if not kept:
            raise _nothing_usable(rows)
        if not reused:  # a reused manifest has its groups
            _group(kept, np.load(tmp_images, mmap_mode="r"), quiet)
        if reused:  # the labels files' own splits are not in the manifest: from the labels
            by_key = {(r.path, r.box): r.given_split for r in labelled}
            for r in kept:
                r.given_split = by_key.get((r.path, r.box), "")
        _split(kept, fractions, seed, read_split_file(split_file) if split_file else None)
        # cache.json marks a complete cache: it goes first and comes back last, so that a run
        # killed in between leaves a cache that open_cache refuses and the next run rebuilds
        meta_path.unlink(missing_ok=True)
        if tmp_images is not None:
            fileio.replace(tmp_images, images_path)
        _write_manifest(out_dir / "manifest.csv", rows, group_columns)
        shape = [len(kept), size, size, channels]
        summary = _summarise(
            rows,
            {
                "image_shape": shape,
                "size": size,
                "color": color,
                "seed": seed,
                "split_fractions": list(fractions),
                "data_dirs": [str(Path(d).resolve()) for d in data_dirs],
                "labels": [str(Path(f).resolve()) for f in labels],
                "group_columns": group_columns,
                "age_ranges": sum(1 for r in kept if r.age_low != r.age_high),
                "cache_dir": str(out_dir),
                "reused": reused,
                "seconds": round(time.perf_counter() - t0, 2),
            },
        )
        fileio.write_json(out_dir / "summary.json", summary)
        fileio.write_text(meta_path, json.dumps({"key": key, "shape": shape}, indent=1))
    except BaseException:
        if tmp_images is not None:
            tmp_images.unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only when empty: nothing was written
        raise
    return summary


def _group(kept: list[_Row], images: np.ndarray, quiet: bool) -> None:
    """Set each kept row's near-duplicate group (``kept`` in image index order)."""
    t0 = time.perf_counter()
    pairs = near_dups.find_pairs(images)
    roots = near_dups.groups(len(kept), pairs)
    for r, root in zip(kept, roots):
        r.group = kept[root].content_hash
    if not quiet:
        print(f"near-duplicates: {len(pairs):,} pairs in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)  # fmt: skip


def _split(
    kept: list[_Row], fractions: tuple[float, ...], seed: int, given: dict[str, str] | None
) -> None:
    """Deal the kept rows to splits, stratified (or take each row's from ``given``, content
    hash -> split), then move each near-duplicate group whole to the earliest split any of its
    members went to."""
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


SPLIT_FILE_COLUMNS = ("name", "content_hash", "group", "split")


def write_split_file(cache_dir: str | os.PathLike, path: str | os.PathLike) -> int:
    """Publish a cache's split as CSV (``name, content_hash, group, split``, one row per kept
    image, sorted by name); returns the number of rows."""
    rows = sorted((r for r in read_manifest(cache_dir) if r["status"] == "kept"),
                  key=lambda r: Path(r["path"]).name)  # fmt: skip
    with fileio.atomic_write(path, newline="", **PATHS_IN_TEXT) as f:
        w = csv.writer(f)
        w.writerow(SPLIT_FILE_COLUMNS)
        for r in rows:
            w.writerow([Path(r["path"]).name, r["content_hash"], r["group"][:16], r["split"]])
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


def _nothing_usable(rows: list[_Row]) -> DataError:
    bad = [r for r in rows if r.status != "kept"]
    first = f"{Path(bad[0].path).name} ({bad[0].status})"
    more = f" and {len(bad) - 1:,} more" if len(bad) > 1 else ""
    if all(r.status.startswith("unparsable") for r in bad):
        return DataError(
            f"none of the {len(rows):,} image files has a UTKFace name "
            f"(age_gender_race_datetime.jpg, e.g. 26_1_2_20170116174525125.jpg.chip.jpg): "
            f"{first}{more}"
        )
    counts = Counter(r.status.split(":")[0] for r in bad)
    why = ", ".join(f"{n:,} {reason}" for reason, n in counts.most_common())
    return DataError(f"none of the {len(rows):,} image files is usable ({why}): {first}{more}")


def _labelled_rows(files: list[str | os.PathLike], aligned: bool) -> tuple[list[_Row], list[str]]:
    """The rows of the labels ``files`` and the union of their group columns."""
    rows: list[_Row] = []
    columns: dict[str, None] = {}
    for f in files:
        found, groups = read_labels(f)
        columns.update(dict.fromkeys(groups))
        for lr in found:
            rows.append(_from_label(lr, Path(f).name, aligned))
    if files and not rows:
        raise DataError(f"--labels {', '.join(map(str, files))}: no rows")
    return rows, list(columns)


def _from_label(lr: LabelRow, origin: str, aligned: bool) -> _Row:
    r = _Row(str(_real(Path(lr.path))) if lr.path else "", origin=origin, aligned=aligned)
    r.status = lr.problem
    if not lr.problem:
        r.age_low, r.age_high = lr.age_low, lr.age_high
        r.age = (lr.age_low + lr.age_high) // 2
        r.gender, r.race, r.groups, r.given_split = lr.gender, lr.race, lr.groups, lr.split
        r.box = " ".join(f"{v:g}" for v in lr.box) if lr.box else ""
    return r


def _labels_fingerprint(files: list, rows: list[_Row], aligned: bool) -> str:
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        h.update(Path(f).read_bytes())
    h.update(_fingerprint([Path(r.path) for r in rows if r.path]).encode())
    h.update(b"aligned" if aligned else b"detected")
    return h.hexdigest()


def _build(
    paths: list[Path],
    labelled: list[_Row],
    out_dir: Path,
    size: int,
    color: str,
    workers: int,
    quiet: bool,
) -> tuple[list[_Row], Path]:
    """Rows for ``paths`` (UTKFace names) and ``labelled`` (labels files), and a temporary
    .npy in ``out_dir`` holding the kept images."""
    rows = [_Row(str(p), origin=p.parent.name) for p in paths]
    parsed: list[_Row] = []
    for r in rows:
        try:
            r.age, r.gender, r.race = parse_name(r.path)
            r.age_low = r.age_high = r.age
            parsed.append(r)
        except ValueError as e:
            r.status = f"unparsable: {e}"
    # labelled rows in a fixed order, so that the first of copies does not hang on the files'
    parsed += sorted((r for r in labelled if not r.status), key=lambda r: (r.path, r.box))
    rows += labelled
    if not parsed:  # before hashing and decoding nothing
        raise _nothing_usable(rows)

    # Hash every parsed file: byte-identical copies (UTKFace has hundreds, the Kaggle layout
    # holds every image two or three times) must count as one image on one side of the split.
    chunk = 512
    chunks = _chunks(len(parsed), chunk)
    jobs = [([Path(parsed[i].path) for i in c],) for c in chunks]
    hashed = _pool_map(_hash_chunk, jobs, [len(c) for c in chunks], workers, "hashing", quiet)
    groups: defaultdict[tuple[str, str], list[_Row]] = defaultdict(list)
    for r, (digest, err) in zip(parsed, (x for part in hashed for x in part)):
        if err:
            r.status = err
        else:
            r.content_hash = digest
            groups[r.key].append(r)

    unique: list[_Row] = []
    for members in groups.values():
        if len({(m.age_low, m.age_high, m.gender) for m in members}) > 1:
            for m in members:
                m.status = "conflicting: byte-identical copies disagree on age or gender"
            continue
        first, *copies = members  # paths are sorted, so the first is deterministic
        race = Counter(m.race for m in members).most_common(1)[0][0]
        first.race = race
        unique.append(first)
        for m in copies:
            m.status = f"duplicate: same bytes as {first.path}"

    # Decode each unique image once, straight into a memory-mapped .npy that workers share.
    channels = 1 if color == "gray" else 3
    tmp = fileio.temp_path(out_dir / "images", ".npy")
    tmp2 = fileio.temp_path(out_dir / "images-compact", ".npy")
    try:
        arr = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(len(unique), size, size, channels)
        )
        del arr
        chunks = _chunks(len(unique), 256)
        todo = [(u.path, None if u.aligned else u.box) for u in unique]
        jobs = [(str(tmp), c.start, [todo[i] for i in c], size, color) for c in chunks]
        sizes = [len(c) for c in chunks]
        decoded = _pool_map(_decode_chunk, jobs, sizes, workers, "decoding", quiet)
        failures = dict(x for part in decoded for x in part)
        good = [i for i in range(len(unique)) if i not in failures]
        for i, reason in failures.items():
            for m in groups[unique[i].key]:
                m.status = reason
        if failures:  # compact so that images.npy holds kept images only
            src = np.load(tmp, mmap_mode="r")
            dst = np.lib.format.open_memmap(
                tmp2, mode="w+", dtype=np.uint8, shape=(len(good), *src.shape[1:])
            )
            for c in _chunks(len(good), 1024):
                dst[c.start : c.stop] = src[good[c.start : c.stop]]
            dst.flush()
            del dst, src
            os.replace(tmp2, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        tmp2.unlink(missing_ok=True)
    for new, old in enumerate(good):
        unique[old].index = new
        unique[old].status = "kept"
    return rows, tmp


# --------------------------------------------------------------------------- reading a cache


@dataclass(frozen=True)
class Cache:
    """A prepared cache: images and labels aligned by index.

    ``images`` is a read-only memory map ``(N, H, W, C)`` uint8; ``age``, ``gender``, ``race``
    are ``(N,)`` integer arrays (gender and race -1 where not known; age a range's middle, the
    range in ``age_low``/``age_high``, equal for a whole-years label); ``split`` is ``(N,)``
    strings in :data:`SPLITS`; ``groups`` the labels files' group columns, ``(N,)`` strings each.
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
    """Open a cache written by :func:`prepare` (images memory-mapped, not loaded)."""
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
    images, rows, summary, group_columns = _read_cache(root)
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
