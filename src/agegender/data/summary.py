"""What ``prepare`` reports: the counts of its ``summary.json`` and the lines it prints."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from agegender.data.manifest import Row
from agegender.data.utkface import SPLITS

#: the summary counts that ``explore`` reports, and that a cache's summary.json must hold
SUMMARY_COUNTS = (
    "files_found",
    "unparsable",
    "unreadable",
    "duplicate_groups",
    "conflicting_groups",
    "kept",
)
#: a near-duplicate group disagrees widely when its genders differ or its ages span more than
#: this many years (or a quarter of the youngest age, when that is more)
CONFLICT_YEARS = 5


def summarise(rows: list[Row], extra: dict[str, Any]) -> dict[str, Any]:
    """The counts of ``rows`` by status, near-duplicates and split, then ``extra``."""
    status = Counter(r.status.split(":")[0] for r in rows)
    dup_groups: defaultdict[str, int] = defaultdict(int)
    for r in rows:
        if r.content_hash:
            dup_groups[r.content_hash] += 1
    kept = [r for r in rows if r.status == "kept"]
    return {
        "files_found": len(rows),
        "parsed": len(rows) - status["unparsable"] - status["bad label"] - status["skipped"],
        "unparsable": status["unparsable"],
        "bad_labels": status["bad label"],
        "unreadable": status["unreadable"],
        "skipped": status["skipped"],
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


def _near_duplicate_counts(kept: list[Row]) -> dict[str, Any]:
    members: defaultdict[str, list[Row]] = defaultdict(list)
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


def _conflict(members: list[Row]) -> bool:
    """Copies of one photograph whose labels disagree widely (see ``CONFLICT_YEARS``); a
    gender not known disagrees with none."""
    ages = [r.age for r in members if r.age is not None]
    span = max(CONFLICT_YEARS, min(ages) / 4)
    genders = {r.gender for r in members} - {-1}
    return len(genders) > 1 or max(ages) - min(ages) > span


def _optional(summary: dict[str, Any], key: str, line: str) -> list[str]:
    """``line`` (formatted with the count) when the summary has a count of ``key``: the counts
    that are most often zero, and that summaries written before them lack."""
    return [line.format(summary[key])] if summary.get(key) else []


def format_summary(summary: dict[str, Any]) -> str:
    """The summary of ``prepare`` as aligned lines for people."""
    s = summary
    lines = [
        f"files found          {s['files_found']:>8,}",
        f"parsed               {s['parsed']:>8,}",
        f"unparsable names     {s['unparsable']:>8,}",
        *_optional(s, "bad_labels", "bad labels           {:>8,}  (see manifest.csv)"),
        f"unreadable files     {s['unreadable']:>8,}",
        *_optional(s, "skipped", "skipped              {:>8,}  (not regular files, see manifest)"),
        *_optional(
            s, "no_face", "no usable face       {:>8,}  (none found, or several and no box)"
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
