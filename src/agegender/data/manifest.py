"""``manifest.csv``: one row per file a cache was prepared from, with its labels, origin,
content hash, near-duplicate group, split, status (``kept`` or why it was not), its row in
``images.npy`` (-1 if not kept) and a note (a labels file's path outside its folder).

Text cells that a spreadsheet would run as a formula (``=HYPERLINK(...)``, ``+x``, ``@SUM``)
are written with a leading ``'`` (:func:`agegender.core.fileio.csv_cell`) and read back as
they were."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from agegender.core import fileio
from agegender.data.utkface import RACES, SPLITS

#: how files that hold paths are written and read: a file name that is not valid UTF-8 keeps its
#: bytes (os.fsencode of what is read gives them back) instead of failing the whole run
PATHS_IN_TEXT = {"encoding": "utf-8", "errors": "surrogateescape"}
GROUP_PREFIX = "by:"  #: manifest columns of the labels files' groups
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
    "note",
)
#: the columns of manifests written before ``note`` came, which still read
_WITHOUT_NOTE = MANIFEST_COLUMNS[:-1]


@dataclass
class Row:
    """One file as ``prepare`` saw it: one row of ``manifest.csv``."""

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
    note: str = ""  # what to know of it: agegender.data.labels.OUTSIDE

    @property
    def key(self) -> tuple[str, str]:
        """What makes two rows one image: the same bytes and the same face of them."""
        return self.content_hash, self.box


def write_manifest(path: Path, rows: list[Row], group_columns: list[str]) -> None:
    """Write ``rows`` to ``path`` (atomically), the labels files' ``group_columns`` last."""
    blank = lambda v: "" if v is None else v  # noqa: E731
    with fileio.atomic_write(path, newline="", **PATHS_IN_TEXT) as f:
        w = csv.writer(f)
        w.writerow([*MANIFEST_COLUMNS, *(GROUP_PREFIX + g for g in group_columns)])
        for r in rows:
            cells = [
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
                r.note,
                *(r.groups.get(g, "") for g in group_columns),
            ]
            w.writerow([fileio.csv_cell(c) for c in cells])


def read_manifest(cache_dir: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of ``manifest.csv`` as dicts of strings (as they were before quoting)."""
    with (Path(cache_dir) / "manifest.csv").open(newline="", **PATHS_IN_TEXT) as f:
        return [
            {k: fileio.csv_value(v) if isinstance(v, str) else v for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def read_rows(path: Path) -> tuple[list[Row], list[str]]:
    """The rows of the manifest at ``path`` and its group columns, each row checked.

    Raises ``ValueError`` (``"line N: why"``) for a damaged manifest, ``OSError`` for a
    missing or unreadable one.
    """
    line = 1
    try:
        with path.open(newline="", **PATHS_IN_TEXT) as f:
            reader = csv.reader(f)
            header = next(reader, [])
            noted = tuple(header[: len(MANIFEST_COLUMNS)]) == MANIFEST_COLUMNS
            columns = MANIFEST_COLUMNS if noted else _WITHOUT_NOTE
            extra = header[len(columns) :]
            if tuple(header[: len(columns)]) != columns or not all(
                c.startswith(GROUP_PREFIX) for c in extra
            ):
                raise ValueError("not the manifest header")
            group_columns = [c[len(GROUP_PREFIX) :] for c in extra]
            rows = []
            for fields in reader:
                line = reader.line_num
                fields = [fileio.csv_value(c) for c in fields]
                if not noted:  # an older manifest: no note
                    fields.insert(len(_WITHOUT_NOTE), "")
                rows.append(parse_row(fields, group_columns))
    except (ValueError, csv.Error) as e:
        raise ValueError(f"line {line}: {e}") from None
    return rows, group_columns


def parse_row(fields: list[str], group_columns: list[str]) -> Row:
    """One manifest line as a :class:`Row`; ``ValueError`` for one no ``prepare`` writes."""
    if len(fields) != len(MANIFEST_COLUMNS) + len(group_columns):
        raise ValueError(f"{len(fields)} fields instead of {len(MANIFEST_COLUMNS)}")
    path, age, low, high, gender, race, origin, box, digest, group, split, status, index, note = (
        fields[: len(MANIFEST_COLUMNS)]
    )
    number = lambda x: int(x) if x else None  # noqa: E731
    r = Row(path, number(age), number(gender), number(race), digest, group, split, status)
    r.age_low, r.age_high, r.origin, r.box = number(low), number(high), origin, box
    r.groups = dict(zip(group_columns, fields[len(MANIFEST_COLUMNS) :]))
    r.index, r.note = int(index), note
    if not status:
        raise ValueError("no status")
    if status == "kept" and not _valid_kept(r):
        raise ValueError("a kept image without valid labels, split or index")
    return r


def _valid_kept(r: Row) -> bool:
    return (
        r.age is not None
        and r.age_low is not None
        and r.age_high is not None
        and r.age_low <= r.age <= r.age_high
        and r.gender in (-1, 0, 1)
        and r.race is not None
        and -1 <= r.race < len(RACES)
        and r.split in SPLITS
        and bool(r.group)
        and r.index >= 0
    )
