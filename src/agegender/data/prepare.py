"""Preparing a cache: scan, parse, de-duplicate, decode and split images once, for training,
evaluation and the reports to read (:mod:`agegender.data.cache` describes what it holds).

Images come from UTKFace folders (labels in the file names, aligned crops taken as given) and
from labels files of your own (:mod:`agegender.data.labels`: ages, ranges, genders, groups), whose
photos are detected and aligned as ``predict`` does it unless they are crops (``aligned``).
They are decoded as a model's ``data_config`` says (its input size, colour and interpolation),
so a cache is made for the model that will read it.

Copies of one photograph that are not byte-identical (:mod:`agegender.data.near_dups`) form a
group, and a group never crosses splits (:mod:`agegender.data.split`). With the default seed the
splits are those the bundled models were trained on; ``splits/utkface.csv`` publishes them.

UTKFace folders hold UTKFace's aligned crops, taken as given (the bundled models trained so). A
labels file's images are photos: each face is found and aligned as ``predict`` does it (the
``box`` column picks one face of several), so training sees the geometry prediction will.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from agegender.core import fileio
from agegender.core.config import SPLIT_SEED, DataConfig
from agegender.core.errors import DataError
from agegender.data import near_dups
from agegender.data.cache import CACHE_VERSION, DamagedCache, read_cache
from agegender.data.decode import chunks, decode_chunk, hash_chunk, pool_map
from agegender.data.labels import LabelRow, read_labels
from agegender.data.manifest import Row, write_manifest
from agegender.data.split import (
    assign_splits,
    group_near_duplicates,
    parse_split,
    read_split_file,
)
from agegender.data.summary import summarise
from agegender.data.utkface import parse_name
from agegender.vision.images import COLORS, INTERPOLATIONS, face_config
from agegender.vision.scan import scan_images

#: what :func:`prepare` decodes to when no model says: the training recipe's size and colour
DEFAULT_DATA_CONFIG: Mapping[str, Any] = MappingProxyType(
    face_config(DataConfig.size, DataConfig.color)
)
SIZES = (16, 1024)  #: the smallest and largest image side a cache holds, in pixels


def input_config(data_config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a model's ``data_config`` that :func:`prepare` reads (``input_size``
    ``(C, S, S)``, ``color``, optionally ``interpolation``), checked, as a plain dict.

    >>> input_config({"input_size": [3, 64, 64], "color": "rgb", "mean": (0.5,) * 3})
    {'input_size': (3, 64, 64), 'color': 'rgb', 'interpolation': 'bilinear'}
    """
    try:
        chans, size, width = (int(v) for v in data_config["input_size"])
        color = data_config["color"]
    except (KeyError, TypeError, ValueError):
        raise DataError(
            f"data_config needs input_size (C, S, S) and color, got {dict(data_config)!r}"
        ) from None
    if color not in COLORS:
        raise DataError(f"--color must be one of {', '.join(COLORS)}, got {color!r}")
    if not SIZES[0] <= size <= SIZES[1]:
        raise DataError(f"--size must be between {SIZES[0]} and {SIZES[1]}, got {size}")
    if width != size or chans != (1 if color == "gray" else 3):
        raise DataError(f"data_config input_size {(chans, size, width)} is not (C, S, S) {color}")
    interpolation = data_config.get("interpolation")
    if interpolation is None:
        return face_config(size, color)
    if interpolation not in INTERPOLATIONS:
        known = ", ".join(INTERPOLATIONS)
        raise DataError(f"interpolation must be one of {known}, got {interpolation!r}")
    return face_config(size, color, interpolation)


def prepare(
    data_dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    data_config: Mapping[str, Any] = DEFAULT_DATA_CONFIG,
    seed: int = SPLIT_SEED,
    split: str | tuple[float, float, float] = (0.7, 0.1, 0.2),
    workers: int = 0,
    quiet: bool = False,
    split_file: str | os.PathLike | None = None,
    labels: Sequence[str | os.PathLike] = (),
    aligned: bool = False,
) -> dict[str, Any]:
    """Scan, parse, de-duplicate, decode and split images into a cache at ``out``: UTKFace
    folders ``data_dirs`` and the labels files ``labels`` (see :mod:`agegender.data.labels`),
    mixed at will, each row's origin recorded. Images are decoded as ``data_config`` says: a
    model's (``model.data_config``), or :func:`~agegender.vision.images.face_config` of a size
    and a colour.

    Returns the summary (also written to ``out/summary.json``). Files that cannot be used are
    listed in ``manifest.csv`` with the reason; they never stop the run, but a run that keeps
    no image at all raises :class:`DataError` and writes no cache. Re-running on unchanged
    files with the same data config reuses the decoded images (a new ``seed`` or ``split``
    only re-deals the splits).

    A near-duplicate group never crosses splits; ``split_file`` (a CSV such as
    ``splits/utkface.csv``) gives each image it lists its split, as a labels file's ``split``
    column does for its rows. ``aligned=True`` takes the labels files' images as crops instead
    of detecting and aligning their faces.
    """
    t0 = time.perf_counter()
    fractions = parse_split(split)
    config = input_config(data_config)
    if not data_dirs and not labels:
        raise DataError("no data folder or labels file given")
    paths, skipped = _scan(data_dirs)
    labelled, group_columns = _labelled_rows(labels, aligned)
    out_dir = Path(out)
    key = _cache_key([*paths, *(p for p, _ in skipped)], labels, labelled, config, aligned)
    fileio.remove_stale_temps(out_dir)  # what a killed prepare left behind
    reused = _reused_rows(out_dir, key, quiet)
    created = not out_dir.exists()
    tmp_images = None
    try:
        if reused is None:
            out_dir.mkdir(parents=True, exist_ok=True)
            workers = workers or min(os.cpu_count() or 1, 8)
            rows, tmp_images = _build(paths, skipped, labelled, out_dir, config, workers, quiet)
        else:
            rows, group_columns = reused
        given = read_split_file(split_file) if split_file else None
        kept = _deal(rows, labelled, tmp_images, fractions, seed, given, quiet)
        about = {"seed": seed, "split_fractions": list(fractions), "reused": reused is not None}
        about |= _sources(data_dirs, labels, group_columns, kept, config, out_dir)
        summary = summarise(rows, {**about, "seconds": round(time.perf_counter() - t0, 2)})
        _commit(out_dir, rows, group_columns, tmp_images, summary, key)
    except BaseException:
        _undo(tmp_images, out_dir if created else None)
        raise
    return summary


def _undo(tmp_images: Path | None, created: Path | None) -> None:
    """What a failed or interrupted run leaves: its temporary images removed, and the cache
    folder it ``created`` too when nothing else was written into it."""
    if tmp_images is not None:
        tmp_images.unlink(missing_ok=True)
    if created is not None:
        with contextlib.suppress(OSError):
            created.rmdir()  # only when empty: nothing was written


def _deal(
    rows: list[Row],
    labelled: list[Row],
    tmp_images: Path | None,
    fractions: tuple[float, ...],
    seed: int,
    given: dict[str, str] | None,
    quiet: bool,
) -> list[Row]:
    """The kept rows, grouped (when just decoded into ``tmp_images``) and dealt to splits."""
    kept = [r for r in rows if r.status == "kept"]
    if not kept:
        raise _nothing_usable(rows)
    if tmp_images is not None:  # a reused manifest has its groups
        group_near_duplicates(kept, np.load(tmp_images, mmap_mode="r"), quiet)
    else:  # ... but not the labels files' own splits: those come from the labels
        by_key = {(r.path, r.box): r.given_split for r in labelled}
        for r in kept:
            r.given_split = by_key.get((r.path, r.box), "")
    assign_splits(kept, fractions, seed, given)
    return kept


def _scan(data_dirs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The image files under ``data_dirs``, each once by its real path, sorted (so that the
    first of byte-identical copies is the same whatever the order or spelling of the folders
    given), and what the scan skipped (FIFOs, devices, unreadable folders) with the reason."""
    if not data_dirs:
        return [], []
    found = scan_images(data_dirs)
    skipped = sorted({_real(p): why for p, why in found.skipped}.items())
    return sorted({_real(p) for p in found.files}), skipped


def _real(path: Path) -> Path:
    """The file's real path; a broken link or a link loop stays as it was found."""
    try:
        return path.resolve(strict=True)
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


def _cache_key(
    paths: list[Path],
    labels: Sequence[str | os.PathLike],
    labelled: list[Row],
    config: dict[str, Any],
    aligned: bool,
) -> dict[str, Any]:
    """What a cache is made from: an unchanged key lets the next run reuse it."""
    size, color = config["input_size"][1], config["color"]
    key = {"version": CACHE_VERSION, "files": _fingerprint(paths), "size": size, "color": color}
    if config["interpolation"] != face_config(size, color)["interpolation"]:
        # only when not the default: the caches written before it was a choice keep their key
        key["interpolation"] = config["interpolation"]
    key["near_duplicates"] = near_dups.SIGNATURE_VERSION
    if labels:  # the labels themselves, their images, and how they are read
        key["labels"] = _labels_fingerprint(labels, labelled, aligned)
    return key


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


def _labels_fingerprint(files: Sequence[str | os.PathLike], rows: list[Row], aligned: bool) -> str:
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        h.update(Path(f).read_bytes())
    h.update(_fingerprint([Path(r.path) for r in rows if r.path]).encode())
    h.update(b"aligned" if aligned else b"detected")
    return h.hexdigest()


def _reused_rows(
    out_dir: Path, key: dict[str, Any], quiet: bool
) -> tuple[list[Row], list[str]] | None:
    """The rows and group columns of the complete cache at ``out_dir`` when it was made from
    ``key``, else None (no cache yet, another one, or a damaged one: rebuilt)."""
    try:
        if json.loads((out_dir / "cache.json").read_text()).get("key") == key:
            _, rows, _, group_columns = read_cache(out_dir)
            return rows, group_columns
    except DamagedCache as e:
        if not quiet:
            print(f"cache {out_dir} is damaged ({e.why}): rebuilding it", file=sys.stderr)
    except (OSError, ValueError, AttributeError):
        pass  # no cache there yet, or not ours: build one
    return None


def _sources(
    data_dirs: Sequence[str | os.PathLike],
    labels: Sequence[str | os.PathLike],
    group_columns: list[str],
    kept: list[Row],
    config: dict[str, Any],
    out_dir: Path,
) -> dict[str, Any]:
    """The summary's record of what the cache was made from and what it holds."""
    chans, size, _ = config["input_size"]
    return {
        "image_shape": [len(kept), size, size, chans],
        "size": size,
        "color": config["color"],
        "interpolation": config["interpolation"],
        "data_dirs": [str(Path(d).resolve()) for d in data_dirs],
        "labels": [str(Path(f).resolve()) for f in labels],
        "group_columns": group_columns,
        "age_ranges": sum(1 for r in kept if r.age_low != r.age_high),
        "cache_dir": str(out_dir),
    }


def _commit(
    out_dir: Path,
    rows: list[Row],
    group_columns: list[str],
    tmp_images: Path | None,
    summary: dict[str, Any],
    key: dict[str, Any],
) -> None:
    """Write the cache's files. cache.json marks a complete cache: it goes first and comes
    back last, so that a run killed in between leaves a cache that ``open_cache`` refuses and
    the next run rebuilds."""
    meta_path = out_dir / "cache.json"
    meta_path.unlink(missing_ok=True)
    if tmp_images is not None:
        fileio.replace(tmp_images, out_dir / "images.npy")
    write_manifest(out_dir / "manifest.csv", rows, group_columns)
    fileio.write_json(out_dir / "summary.json", summary)
    meta = {"key": key, "shape": summary["image_shape"]}
    fileio.write_text(meta_path, json.dumps(meta, indent=1))


def _nothing_usable(rows: list[Row]) -> DataError:
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


# --------------------------------------------------------------------------- labels files


def _labelled_rows(
    files: Sequence[str | os.PathLike], aligned: bool
) -> tuple[list[Row], list[str]]:
    """The rows of the labels ``files`` and the union of their group columns."""
    rows: list[Row] = []
    columns: dict[str, None] = {}
    for f in files:
        found, groups = read_labels(f)
        columns.update(dict.fromkeys(groups))
        for lr in found:
            rows.append(_from_label(lr, Path(f).name, aligned))
    if files and not rows:
        raise DataError(f"--labels {', '.join(map(str, files))}: no rows")
    return rows, list(columns)


def _from_label(lr: LabelRow, origin: str, aligned: bool) -> Row:
    r = Row(str(_real(Path(lr.path))) if lr.path else "", origin=origin, aligned=aligned)
    r.status, r.note = lr.problem, lr.note
    if not lr.problem:
        r.age_low, r.age_high = lr.age_low, lr.age_high
        r.age = (lr.age_low + lr.age_high) // 2
        r.gender, r.race, r.groups, r.given_split = lr.gender, lr.race, lr.groups, lr.split
        r.box = " ".join(f"{v:g}" for v in lr.box) if lr.box else ""
    return r


# --------------------------------------------------------------------------- building


def _build(
    paths: list[Path],
    skipped: list[tuple[Path, str]],
    labelled: list[Row],
    out_dir: Path,
    config: dict[str, Any],
    workers: int,
    quiet: bool,
) -> tuple[list[Row], Path]:
    """Rows for ``paths`` (UTKFace names), ``skipped`` and ``labelled`` (labels files), and a
    temporary .npy in ``out_dir`` holding the kept images."""
    rows, parsed = _parse_rows(paths, skipped, labelled)
    if not parsed:  # before hashing and decoding nothing
        raise _nothing_usable(rows)
    copies = _hash_groups(parsed, workers, quiet)
    unique = _first_copies(copies)
    tmp = _decode(unique, out_dir, config, workers, quiet)
    for r in unique:
        if r.status != "kept":  # its copies were not decoded: the same reason holds for them
            for m in copies[r.key]:
                m.status = r.status
    return rows, tmp


def _parse_rows(
    paths: list[Path], skipped: list[tuple[Path, str]], labelled: list[Row]
) -> tuple[list[Row], list[Row]]:
    """Every row, and those with labels (parsed from a UTKFace name, or a labels file's)."""
    rows = [Row(str(p), origin=p.parent.name) for p in paths]
    parsed: list[Row] = []
    for r in rows:
        try:
            r.age, r.gender, r.race = parse_name(r.path)
            r.age_low = r.age_high = r.age
            parsed.append(r)
        except ValueError as e:
            r.status = f"unparsable: {e}"
    rows += [Row(str(p), origin=p.parent.name, status=f"skipped: {why}") for p, why in skipped]
    # labelled rows in a fixed order, so that the first of copies does not hang on the files'
    parsed += sorted((r for r in labelled if not r.status), key=lambda r: (r.path, r.box))
    return rows + labelled, parsed


def _hash_groups(parsed: list[Row], workers: int, quiet: bool) -> dict[tuple[str, str], list[Row]]:
    """Hash every parsed file and group the rows by :attr:`Row.key`: byte-identical copies
    (UTKFace has hundreds, the Kaggle layout holds every image two or three times) must count
    as one image on one side of the split. An unreadable file gets its reason instead."""
    cs = chunks(len(parsed), 512)
    jobs = [([Path(parsed[i].path) for i in c],) for c in cs]
    hashed = pool_map(hash_chunk, jobs, [len(c) for c in cs], workers, "hashing", quiet)
    groups: defaultdict[tuple[str, str], list[Row]] = defaultdict(list)
    for r, (digest, err) in zip(parsed, (x for part in hashed for x in part)):
        if err:
            r.status = err
        else:
            r.content_hash = digest
            groups[r.key].append(r)
    return groups


def _first_copies(groups: dict[tuple[str, str], list[Row]]) -> list[Row]:
    """The first row of each group of copies, the group's most frequent race its race; the
    others marked duplicates, and a group whose copies disagree on age or gender dropped."""
    unique: list[Row] = []
    for members in groups.values():
        if len({(m.age_low, m.age_high, m.gender) for m in members}) > 1:
            for m in members:
                m.status = "conflicting: byte-identical copies disagree on age or gender"
            continue
        first, *copies = members  # paths are sorted, so the first is deterministic
        first.race = Counter(m.race for m in members).most_common(1)[0][0]
        unique.append(first)
        for m in copies:
            m.status = f"duplicate: same bytes as {first.path}"
    return unique


def _decode(
    unique: list[Row], out_dir: Path, config: dict[str, Any], workers: int, quiet: bool
) -> Path:
    """Decode each of ``unique`` once, as ``config`` says, straight into a memory-mapped .npy
    in ``out_dir`` that the workers share; return it, holding the kept images only. Each row
    gets its index and ``kept``, or why it could not be decoded."""
    chans, size, _ = config["input_size"]
    tmp = fileio.temp_path(out_dir / "images", ".npy")
    try:
        arr = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(len(unique), size, size, chans)
        )
        del arr
        cs = chunks(len(unique), 256)
        todo = [(u.path, None if u.aligned else u.box) for u in unique]
        jobs = [(str(tmp), c.start, [todo[i] for i in c], config) for c in cs]
        decoded = pool_map(decode_chunk, jobs, [len(c) for c in cs], workers, "decoding", quiet)
        failures = dict(x for part in decoded for x in part)
        good = [i for i in range(len(unique)) if i not in failures]
        if failures:  # compact so that images.npy holds kept images only
            _compact(tmp, good, fileio.temp_path(out_dir / "images-compact", ".npy"))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for i, reason in failures.items():
        unique[i].status = reason
    for new, old in enumerate(good):
        unique[old].index = new
        unique[old].status = "kept"
    return tmp


def _compact(path: Path, rows: list[int], tmp: Path) -> None:
    """Keep only ``rows`` of the .npy at ``path`` (written to ``tmp``, then moved over it)."""
    try:
        src = np.load(path, mmap_mode="r")
        dst = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(len(rows), *src.shape[1:])
        )
        for c in chunks(len(rows), 1024):
            dst[c.start : c.stop] = src[rows[c.start : c.stop]]
        dst.flush()
        del dst, src
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
