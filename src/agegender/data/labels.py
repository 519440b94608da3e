"""Your own labels: a CSV or JSON-lines file naming images and what is known of each face.

Columns (JSON keys): ``path`` (relative to the labels file, or absolute) and ``age`` are
required; ``gender`` may be empty. Optional: ``box`` (``x0 y0 x1 y1`` in the photo's pixels: which
face of a photo with several), ``split`` (``train``/``val``/``test``: yours, kept), ``race`` and
any other column, kept as a group for the per-group tables of ``evaluate`` (``camera``,
``source``, ``site``, ...).

- ``age``: whole years (``34``), a range (``20-29``, ``(25, 32)`` as Adience writes it) or an open
  range (``60+``, taken as ``60-79``: :data:`OPEN_SPAN` years, since a uniform range up to 116
  would pull estimates up). A range trains the DLDL head towards a distribution over its ages
  and is scored by whether the estimate falls inside it and by how far it falls outside.
- ``gender``: ``male``/``female``, ``m``/``f``, ``man``/``woman`` or ``0``/``1`` (UTKFace's
  codes: 0 male); empty, ``na`` or ``unknown`` when not known (the face then trains the age only).
- ``race``: UTKFace's names (White, Black, Asian, Indian, Others) or codes 0-4 fill the race
  tables; any other values are a group like the rest.

A row that cannot be used keeps its reason (``bad label: ...``), which ``prepare`` writes to the
manifest; the other rows go on. A row whose path is absolute or leads out of the labels file's
folder (``../x``) is read like the others but carries a note (:data:`OUTSIDE`), which the
manifest's ``note`` column shows: a labels file from elsewhere can name any file you can read.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from agegender.core.errors import DataError

OPEN_SPAN = 20  #: years an open range such as "60+" stands for
MAX_AGE = 120
REQUIRED = ("path", "age")
#: columns with a meaning of their own; every other one is a group
KNOWN = ("path", "age", "gender", "box", "split", "race")
RACE_NAMES = ("white", "black", "asian", "indian", "others")
#: the note of a row whose path is outside the labels file's folder
OUTSIDE = "path outside the labels file's folder"
_GENDERS = {
    "0": 0, "m": 0, "male": 0, "man": 0, "boy": 0,
    "1": 1, "f": 1, "female": 1, "woman": 1, "girl": 1,
    "": -1, "na": -1, "n/a": -1, "unknown": -1, "none": -1, "?": -1,
}  # fmt: skip
_RANGE = re.compile(r"^\(?\s*(\d+)\s*(?:-|,|to)\s*(\d+)\s*\)?$")
_OPEN = re.compile(r"^(\d+)\s*\+$")


@dataclass
class LabelRow:
    """One row of a labels file: where the image is and what is known of its face."""

    path: str
    age_low: int = -1
    age_high: int = -1
    gender: int = -1  # -1: not known
    race: int = -1  # a UTKFace race code, -1: not known or not one of them
    box: tuple[float, float, float, float] | None = None
    split: str = ""
    groups: dict[str, str] = field(default_factory=dict)
    problem: str = ""  # why the row cannot be used; "" when it can
    line: int = 0
    note: str = ""  # what to know of a usable row (OUTSIDE), for the manifest


def parse_age(text: str) -> tuple[int, int]:
    """``(low, high)`` years from ``34``, ``20-29``, ``(25, 32)`` or ``60+``.

    >>> parse_age("34"), parse_age("20-29"), parse_age("(25, 32)"), parse_age("60+")
    ((34, 34), (20, 29), (25, 32), (60, 79))
    """
    s = str(text).strip()
    if re.fullmatch(r"\d+(\.0*)?", s):
        low = high = int(float(s))
    elif m := _RANGE.match(s):
        low, high = int(m[1]), int(m[2])
    elif m := _OPEN.match(s):
        low = int(m[1])
        high = low + OPEN_SPAN - 1
    else:
        raise ValueError(f"age {text!r} is not whole years, a range like 20-29 or one like 60+")
    if not 0 <= low <= high <= MAX_AGE:
        raise ValueError(f"age {text!r} is outside 0-{MAX_AGE} or its range is reversed")
    return low, high


def parse_gender(text: str) -> int:
    """0 male, 1 female, -1 unknown."""
    key = str(text).strip().lower()
    if key not in _GENDERS:
        raise ValueError(f"gender {text!r} is not male/female, m/f or 0/1 (or empty)")
    return _GENDERS[key]


def parse_box(text: str) -> tuple[float, float, float, float]:
    parts = re.split(r"[\s,;]+", str(text).strip().strip("[]()"))
    try:
        x0, y0, x1, y1 = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"box {text!r} is not four numbers x0 y0 x1 y1") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {text!r} is not x0 y0 x1 y1 with x1 > x0 and y1 > y0")
    return x0, y0, x1, y1


def _race(text: str) -> int:
    key = str(text).strip().lower()
    if key in RACE_NAMES:
        return RACE_NAMES.index(key)
    if key in ("0", "1", "2", "3", "4"):
        return int(key)
    return -1


def _records(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The columns and ``(line, row)`` of a CSV or JSON-lines file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise DataError(f"--labels {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise DataError(f"--labels {path}: not UTF-8 text") from None
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        rows, columns = [], {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                rows.append((n, {"\0": "not a JSON object"}))
                continue
            if not isinstance(obj, dict):
                rows.append((n, {"\0": "not a JSON object"}))
                continue
            obj = {str(k): "" if v is None else str(v) for k, v in obj.items()}
            columns.update(dict.fromkeys(obj))
            rows.append((n, obj))
        return list(columns), rows
    try:
        reader = csv.DictReader(text.splitlines())
        columns = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = columns
        rows = [(reader.line_num, {k: (v or "").strip() for k, v in r.items() if k})
                for r in reader]  # fmt: skip
    except csv.Error as e:
        raise DataError(f"--labels {path}: not a readable CSV ({e})") from None
    return columns, rows


def is_outside(raw: str) -> bool:
    """Whether a labels file's ``path`` value leaves its folder: absolute, or up with ``..``.

    >>> is_outside("a/b.jpg"), is_outside("a/../b.jpg"), is_outside("../b.jpg"), is_outside("/b")
    (False, False, True, True)
    """
    if Path(raw).is_absolute() or os.path.isabs(raw) or re.match(r"^[A-Za-z]:|^[\\/]", raw):
        return True
    return os.path.normpath(raw).replace("\\", "/").split("/")[0] == ".."


def read_labels(path: str | os.PathLike) -> tuple[list[LabelRow], list[str]]:
    """The rows of a labels file (each with its ``problem``, if any) and its group columns.

    Raises :class:`DataError` (one line) for a file that cannot be read or lacks a required
    column; a file whose every row has a problem is left to ``prepare`` to report.
    """
    path = Path(path)
    columns, records = _records(path)
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        have = ", ".join(columns) or "none"
        raise DataError(f"--labels {path}: no {' or '.join(missing)} column (columns: {have})")
    group_columns = [c for c in columns if c not in KNOWN]
    out, races = [], []
    for line, rec in records:
        row = LabelRow(path="", line=line)
        out.append(row)
        races.append(rec.get("race", ""))
        if "\0" in rec:
            row.problem = f"bad label: line {line} is not a JSON object"
            continue
        raw = rec.get("path", "")
        if not raw:
            row.problem = f"bad label: line {line} has no path"
            continue
        p = Path(raw)
        row.path = str(p if p.is_absolute() else path.parent / p)
        if is_outside(raw):
            row.note = OUTSIDE
        try:
            row.age_low, row.age_high = parse_age(rec.get("age", ""))
            row.gender = parse_gender(rec.get("gender", ""))
            if rec.get("box"):
                row.box = parse_box(rec["box"])
            split = rec.get("split", "").lower()
            if split and split not in ("train", "val", "test"):
                raise ValueError(f"split {rec['split']!r} is not train, val or test")
            row.split = split
        except ValueError as e:
            row.problem = f"bad label: {e}"
            continue
        row.groups = {c: rec.get(c, "") for c in group_columns}
    if "race" in columns:
        # UTKFace's races fill the race tables; any other value makes the column a group
        usable = [(r, text) for r, text in zip(out, races) if not r.problem]
        if all(_race(text) >= 0 for _, text in usable):
            for r, text in usable:
                r.race = _race(text)
        else:
            group_columns.append("race")
            for r, text in usable:
                r.groups["race"] = text
    return out, group_columns
