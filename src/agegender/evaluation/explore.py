"""The study's data exploration, as PNG files and a short Markdown summary."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from agegender.core import fileio
from agegender.core.errors import DataError
from agegender.data.cache import open_cache
from agegender.data.utkface import AGE_BANDS, GENDERS, RACES, SPLITS, age_band, band_name

_GENDER_COLORS = ("tab:blue", "tab:red")


def _save(fig: Figure, path: Path) -> Path:
    # Figure (not pyplot) keeps no global state and needs no display
    with fileio.atomic_path(path, path.suffix) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    return path


def _face(ax, image: np.ndarray) -> None:
    if image.shape[2] == 1:
        ax.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])


def _name(names: tuple[str, ...], code: int) -> str:
    return names[code] if code >= 0 else "unknown"  # -1: not known (a labels file)


def _label(age: int, gender: int) -> str:
    return f"{age} y, {_name(GENDERS, gender)}"


def explore(cache_dir: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 0) -> list[Path]:
    """Write the exploration plots of a prepared cache into ``out_dir``; return the files.

    Files: ``sample.png``, ``age_distribution.png``, ``gender_counts.png``, ``race_counts.png``,
    ``grid.png`` (5x5 faces titled with age and gender), ``age_by_gender.png`` and ``summary.md``.
    """
    cache = open_cache(cache_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(cache)
    if n == 0:
        raise DataError(f"{cache_dir} holds no kept images")
    rng = np.random.default_rng(seed)
    bins = np.arange(0, max(int(cache.age.max()), 100) + 6, 5)
    sample = int(rng.integers(n))
    picks = rng.choice(n, size=min(25, n), replace=False)
    gender_counts = np.bincount(cache.gender[cache.gender >= 0], minlength=2)
    race_counts = np.bincount(cache.race[cache.race >= 0], minlength=len(RACES))
    figures = {
        "sample.png": _sample(cache, sample),
        "age_distribution.png": _age_distribution(cache, bins),
        "gender_counts.png": _counts(GENDERS, gender_counts, _GENDER_COLORS, "Gender counts"),
        "race_counts.png": _counts(
            RACES, race_counts, "tab:green", "Race counts (UTKFace labels)", (6, 4)
        ),
        "grid.png": _grid(cache, picks),
        "age_by_gender.png": _age_by_gender(cache, bins),
    }
    files = [_save(fig, out / name) for name, fig in figures.items()]
    files.append(_write_summary(cache, out, gender_counts, race_counts))
    return files


def _sample(cache, i: int) -> Figure:
    """One face, large, with all its labels and the cache's size and colour."""
    fig = Figure(figsize=(3.2, 3.6))
    ax = fig.subplots()
    _face(ax, cache.images[i])
    ax.set_title(
        f"age {cache.age[i]}, {_name(GENDERS, cache.gender[i])}, {_name(RACES, cache.race[i])}\n"
        f"{cache.size}x{cache.size} {cache.color}",
        fontsize=10,
    )
    return fig


def _age_distribution(cache, bins: np.ndarray) -> Figure:
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.hist(cache.age, bins=bins, color="tab:gray", edgecolor="white")
    ax.axvline(
        np.median(cache.age), color="black", ls="--", label=f"median {np.median(cache.age):.0f}"
    )
    ax.set(xlabel="age (years)", ylabel="images", title=f"Age distribution (n = {len(cache):,})")
    ax.legend()
    return fig


def _counts(names: tuple[str, ...], counts: np.ndarray, color, title: str, size=(4.5, 4)) -> Figure:
    """A bar per label, each with its count."""
    fig = Figure(figsize=size)
    ax = fig.subplots()
    bars = ax.bar(names, counts, color=color)
    ax.bar_label(bars, labels=[f"{c:,}" for c in counts])
    ax.set(ylabel="images", title=title)
    return fig


def _grid(cache, picks: np.ndarray) -> Figure:
    """The faces ``picks`` (up to 25), 5 a row, titled with age and gender."""
    fig = Figure(figsize=(9, 10))
    axes = fig.subplots(5, 5).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, j in zip(axes, picks):
        ax.axis("on")
        _face(ax, cache.images[j])
        ax.set_title(_label(int(cache.age[j]), int(cache.gender[j])), fontsize=9)
    fig.suptitle("Random faces with their labels")
    return fig


def _age_by_gender(cache, bins: np.ndarray) -> Figure:
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for g, name in enumerate(GENDERS):
        ages = cache.age[cache.gender == g]
        median = np.median(ages) if len(ages) else 0
        label = f"{name} (n = {len(ages):,}, median {median:.0f})"
        ax.hist(ages, bins=bins, histtype="step", lw=2, color=_GENDER_COLORS[g], label=label)
    ax.set(xlabel="age (years)", ylabel="images", title="Age distribution by gender")
    ax.legend()
    return fig


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _write_summary(cache, out: Path, gender_counts, race_counts) -> Path:
    n = len(cache)
    s = cache.summary
    bands = age_band(cache.age)
    lines = [
        "# UTKFace exploration",
        "",
        f"Cache: `{cache.root}` ({n:,} images, {cache.size}x{cache.size} {cache.color}).",
    ]
    if s:
        lines += [
            "",
            f"Files found {s['files_found']:,}; unparsable names {s['unparsable']:,}; unreadable "
            f"{s['unreadable']:,}; byte-identical groups {s['duplicate_groups']:,}, of which "
            f"{s['conflicting_groups']:,} disagree on age or gender and were dropped.",
        ]
    lines += [
        "",
        f"Age: mean {cache.age.mean():.1f}, median {np.median(cache.age):.0f}, "
        f"range {cache.age.min()}-{cache.age.max()}.",
    ]
    lines += _table(
        ["split", *GENDERS, "total"],
        [
            [
                sp,
                *(int(((cache.split == sp) & (cache.gender == g)).sum()) for g in range(2)),
                int((cache.split == sp).sum()),
            ]
            for sp in SPLITS
        ],
    )
    lines += _table(
        ["age band", "images", "share"],
        [
            [band_name(b), int((bands == b).sum()), f"{(bands == b).mean():.1%}"]
            for b in range(len(AGE_BANDS))
        ],
    )
    lines += _table(
        ["race", "images", "share"],
        [[r, int(c), f"{c / n:.1%}"] for r, c in zip(RACES, race_counts)],
    )
    lines += _table(
        ["gender", "images", "share"],
        [[g, int(c), f"{c / n:.1%}"] for g, c in zip(GENDERS, gender_counts)],
    )
    lines += [
        "",
        "![sample](sample.png) ![grid](grid.png)",
        "",
        "![age](age_distribution.png) ![age by gender](age_by_gender.png)",
        "",
        "![gender](gender_counts.png) ![race](race_counts.png)",
        "",
    ]
    path = out / "summary.md"
    fileio.write_text(path, "\n".join(lines))
    return path
