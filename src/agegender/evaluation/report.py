"""The evaluation report: ``report.md``, its figures and ``predictions.csv``."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from agegender.core import fileio
from agegender.data.manifest import PATHS_IN_TEXT
from agegender.data.utkface import GENDERS, RACES


def _save(fig: Figure, path: Path) -> Path:
    # Figure (not pyplot) keeps no global state and needs no display
    with fileio.atomic_path(path, path.suffix) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    return path


def plots(m: dict[str, Any], age_true: np.ndarray, age_pred: np.ndarray, out: Path) -> list[Path]:
    """The report's four figures, written into ``out`` (a range label is drawn at its middle)."""
    age_true = age_true.mean(axis=1) if age_true.ndim == 2 else age_true
    return [
        _plot_confusion(m, out / "confusion.png"),
        _plot_scatter(m, age_true, age_pred, out / "age_scatter.png"),
        _plot_bands(m, out / "mae_by_band.png"),
        _plot_reliability(m, out / "reliability.png"),
    ]


def _plot_confusion(m: dict[str, Any], path: Path) -> Path:
    counts = np.array(m["confusion"], dtype=np.float64)
    rows = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig = Figure(figsize=(4.6, 4))
    ax = fig.subplots()
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            ax.text(
                j,
                i,
                f"{int(counts[i, j]):,}\n{rows[i, j]:.1%}",
                ha="center",
                va="center",
                color="white" if rows[i, j] > 0.5 else "black",
                fontsize=11,
            )
    ax.set_xticks([0, 1], GENDERS)
    ax.set_yticks([0, 1], GENDERS)
    ax.set(
        xlabel="predicted",
        ylabel="true",
        title=f"Gender accuracy {m['gender_accuracy']:.1%} (n = {m['n']:,})",
    )
    return _save(fig, path)


def _plot_scatter(m: dict[str, Any], age_true: np.ndarray, age_pred: np.ndarray, path: Path):
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.scatter(age_true, age_pred, s=6, alpha=0.25, color="tab:blue", edgecolors="none")
    top = float(max(age_true.max(), age_pred.max(), 1)) * 1.05
    ax.plot([0, top], [0, top], color="black", lw=1, ls="--", label="perfect")
    ax.set(
        xlim=(0, top),
        ylim=(0, top),
        xlabel="true age (years)",
        ylabel="predicted age (years)",
        title=f"Age: MAE {m['age_mae']:.2f} years (n = {m['n']:,})",
    )
    ax.set_aspect("equal")
    ax.legend(loc="upper left")
    return _save(fig, path)


def _plot_bands(m: dict[str, Any], path: Path) -> Path:
    names = list(m["age_mae_by_band"])
    maes = [v["mae"] or 0.0 for v in m["age_mae_by_band"].values()]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    bars = ax.bar(names, maes, color="tab:orange")
    ax.bar_label(bars, labels=[f"n = {v['n']:,}" for v in m["age_mae_by_band"].values()])
    ax.axhline(m["age_mae"], color="black", ls="--", lw=1, label=f"overall {m['age_mae']:.2f}")
    ax.set(xlabel="true age band (years)", ylabel="MAE (years)", title="Age MAE by age band")
    ax.set_ylim(0, max([*maes, m["age_mae"]]) * 1.2 + 1e-9)
    ax.legend()
    return _save(fig, path)


def _plot_reliability(m: dict[str, Any], path: Path) -> Path:
    cal = m["calibration"]
    full = [b for b in cal["bins"] if b["n"]]
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    width = cal["bins"][0]["hi"] - cal["bins"][0]["lo"]
    ax.bar(
        [b["lo"] for b in full],
        [b["accuracy"] for b in full],
        width=width,
        align="edge",
        color="tab:blue",
        edgecolor="white",
        label="accuracy in bin",
    )
    ax.plot(
        [b["confidence"] for b in full],
        [b["accuracy"] for b in full],
        "o",
        color="black",
        ms=4,
        label="mean confidence",
    )
    ax.plot([0.5, 1], [0.5, 1], color="tab:red", ls="--", label="perfect calibration")
    ax.set(
        xlim=(0.5, 1),
        ylim=(0, 1),
        xlabel="confidence max(p, 1 - p)",
        ylabel="accuracy",
        title=f"Gender reliability: ECE {cal['ece']:.3f}",
    )
    ax.legend(loc="upper left")
    return _save(fig, path)


# --------------------------------------------------------------------------- report


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def md_cell(value: object) -> str:
    """``value`` as text that stays in its Markdown table cell (or line): ``|`` escaped, line
    breaks as spaces, ``<`` and ``&`` as entities (no HTML from a labels file's values).

    >>> md_cell("a|b\\nc<d>")
    'a\\\\|b c&lt;d>'
    """
    text = str(value).replace("&", "&amp;").replace("<", "&lt;").replace("\\", "\\\\")
    return _one_line(text.replace("|", "\\|"))


def _one_line(text: str) -> str:
    return re.sub(r"[\r\n\t\v\f\x85\u2028\u2029]+", " ", text)


def _code(value: object) -> str:
    """``value`` as inline code on one line (a backtick in it would end the code early)."""
    return "`" + _one_line(str(value)).replace("`", "'") + "`"


def table(header: list[str], rows: list[list[object]]) -> list[str]:
    """A Markdown table, every cell through :func:`md_cell`."""
    lines = ["", "| " + " | ".join(map(md_cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def worst_lines(m: dict[str, Any]) -> list[str]:
    """The worst race group and age band beside the overall figures."""
    rows = []
    for kind, label in (("race", "race"), ("age", "age band")):
        for key, what, spec in (
            ("gender_accuracy", "gender accuracy", ".1%"),
            ("age_mae", "age MAE", ".2f"),
        ):
            w = (m.get("worst_groups") or {}).get(kind, {}).get(key)
            if w is None:
                continue
            gap = w["gap"] * 100 if spec.endswith("%") else w["gap"]
            unit = " points" if spec.endswith("%") else " years"
            rows.append(
                [f"{what}, worst {label}", f"{w['group']} (n = {w['n']:,})",
                 format(w["value"], spec), format(w["overall"], spec), f"{gap:+.1f}{unit}"]
            )  # fmt: skip
    if not rows:
        return []
    return ["Worst groups (of 30 images or more):", *table(
        ["metric", "group", "value", "overall", "gap"], rows)]  # fmt: skip


def render(m: dict[str, Any]) -> str:
    """``report.md`` for the metrics of :func:`agegender.evaluation.evaluate.evaluate`."""
    lines = [
        *_intro_lines(m),
        *_summary_lines(m),
        *_gender_age_lines(m),
        *_group_lines(m),
        *_calibration_lines(m),
        "Per-image predictions: [predictions.csv](predictions.csv).",
        "",
    ]
    return "\n".join(lines)


def _intro_lines(m: dict[str, Any]) -> list[str]:
    lines = [
        "# Evaluation",
        "",
        f"Model `{m['model']}` from `{m['checkpoint']}`, on {m['data']}: {m['n']:,} images; "
        f"{'flip TTA' if m['tta'] else 'no TTA'}; device {m['device']}"
        f"{' (bf16)' if m['amp'] else ''}.",
    ]
    excluded = m.get("excluded_seen_in_training")
    if excluded is None:
        lines += ["", "The model keeps no record of its training images: nothing was left out."]
    else:
        lines += [
            "",
            f"Left out: {excluded:,} images the model trained or validated on, or near-copies "
            "of them (by the record its checkpoint keeps).",
        ]
    if m.get("skipped"):
        sk = m["skipped"]
        why = ", ".join(f"{n:,} {reason}" for reason, n in sk["by_reason"].items())
        lines += [
            "",
            f"Skipped {sk['n']:,} of the folder's {sk['of']:,} image files ({why}), e.g. "
            + "; ".join(map(_code, sk["examples"]))
            + ".",
        ]
    return lines


def _summary_lines(m: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    summary = [
        ["gender accuracy", fmt(m["gender_accuracy"], ".2%")],
        ["age MAE (years)", f"{m['age_mae']:.2f}"],
        ["std of absolute age errors (years)", f"{m['age_abs_error_std']:.2f}"],
        ["gender ECE (10 bins)", f"{m['calibration']['ece']:.3f}"],
    ]
    if m["age_interval"] and m["age_interval"]["coverage"] is not None:
        iv = m["age_interval"]
        summary.append(["90 % age interval coverage", f"{iv['coverage']:.1%}"])
    if m.get("age_range"):
        r = m["age_range"]
        summary += [
            [f"estimates inside their age range ({r['n']:,} range labels)", f"{r['accuracy']:.1%}"],
            ["mean distance to the range (0 inside it), years", f"{r['distance']:.2f}"],
        ]
        if r["exact_mae"] is not None:
            summary.append([f"age MAE of the {r['exact_n']:,} whole-years labels",
                            f"{r['exact_mae']:.2f}"])  # fmt: skip
    if m.get("gender_known", m["n"]) < m["n"]:
        summary.append(["images whose gender is known", f"{m['gender_known']:,} of {m['n']:,}"])
    lines += table(["metric", "value"], summary)
    lines += worst_lines(m)

    return lines


def _gender_age_lines(m: dict[str, Any]) -> list[str]:
    g = m["gender_accuracy_by_gender"]
    conf = m["confusion"]
    lines = ["## Gender"]
    lines += table(
        ["true gender", "n", "accuracy"],
        [[name, f"{sum(conf[i]):,}", fmt(g[name], ".2%")] for i, name in enumerate(GENDERS)],
    )
    lines += ["Confusion matrix (rows: true, columns: predicted; row percentages):"]
    lines += table(
        ["true \\ predicted", *GENDERS],
        [
            [name, *(f"{conf[i][j]:,} ({conf[i][j] / max(sum(conf[i]), 1):.1%})" for j in range(2))]
            for i, name in enumerate(GENDERS)
        ],
    )
    lines += ["![confusion matrix](confusion.png)", ""]

    lines += ["## Age"]
    lines += table(
        ["age band", "n", "MAE (years)", "gender accuracy", "gender confidence", "gender ECE"],
        [
            [
                k,
                f"{v['n']:,}",
                fmt(v["mae"], ".2f"),
                fmt(v.get("gender_accuracy"), ".2%"),
                fmt(v.get("gender_confidence"), ".2%"),
                fmt(v.get("gender_ece"), ".3f"),
            ]
            for k, v in m["age_mae_by_band"].items()
        ],
    )
    lines += table(
        ["decade", "n", "MAE (years)"],
        [[k, f"{v['n']:,}", fmt(v["mae"], ".2f")] for k, v in m["age_mae_by_decade"].items()],
    )
    lines += ["![predicted vs true age](age_scatter.png) ![MAE by age band](mae_by_band.png)", ""]

    return lines


def _group_lines(m: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if any(v["n"] for v in m["by_race"].values()):
        lines += ["## Fairness by race", "", "UTKFace's race labels; small groups give noisy "
                  "numbers."]  # fmt: skip
        lines += table(
            ["race", "n", "gender accuracy", "age MAE (years)"],
            [
                [r, f"{v['n']:,}", fmt(v["gender_accuracy"], ".2%"), fmt(v["age_mae"], ".2f")]
                for r, v in m["by_race"].items()
            ],
        )
    for column, groups in m.get("by_group", {}).items():
        lines += [f"## By {md_cell(column)}", "", f"The labels' {_code(column)} column (a range "
                  "label's error is its distance to the range)."]  # fmt: skip
        lines += table(
            [column, "n", "gender accuracy", "age MAE (years)"],
            [
                [
                    g or "(empty)",
                    f"{v['n']:,}",
                    fmt(v["gender_accuracy"], ".2%"),
                    fmt(v["age_mae"], ".2f"),
                ]
                for g, v in groups.items()
            ],
        )

    return lines


def _calibration_lines(m: dict[str, Any]) -> list[str]:
    cal = m["calibration"]
    lines = [
        "## Gender calibration",
        "",
        f"Expected calibration error {cal['ece']:.4f}: the image-weighted mean gap between "
        "accuracy and confidence max(p, 1 - p) over 10 equal-width bins on [0.5, 1].",
    ]
    lines += table(
        ["confidence bin", "n", "mean confidence", "accuracy"],
        [
            [
                f"{b['lo']:.2f}-{b['hi']:.2f}",
                f"{b['n']:,}",
                fmt(b["confidence"], ".3f"),
                fmt(b["accuracy"], ".3f"),
            ]
            for b in cal["bins"]
        ],
    )
    lines += ["![reliability diagram](reliability.png)", ""]

    if m["age_interval"]:
        iv = m["age_interval"]
        lines += [
            "## Age uncertainty",
            "",
            f"The predicted 90 % interval (age +- {iv['z']:.3f} x std) holds the true age for "
            f"{iv['coverage']:.1%} of the images (ideal: 90 %); its mean width is "
            f"{iv['mean_width']:.1f} years.",
            "",
        ]
    if "timing" in m:
        t = m["timing"]
        lines += ["## Speed"]
        lines += table(
            ["batch size", "ms per image", "calls (median)"],
            [
                [1, f"{t['batch1_ms_per_image']:.2f}", t["batch1_calls"]],
                [t["batch_size"], f"{t['batch_ms_per_image']:.3f}", t["batch_calls"]],
            ],
        )
        extras = (", flip TTA" if t["tta"] else "") + (", bf16" if t["amp"] else "")
        lines += [f"Device {t['device']}, {t['threads']} torch thread(s){extras}.", ""]
    return lines


def write_predictions(path: Path, d: Any, pred: dict[str, np.ndarray]) -> Path:
    """``predictions.csv``: one row per image (``d`` has ``paths``, ``ages``, ``genders``,
    ``races``), written atomically; a path that a spreadsheet would take for a formula is
    quoted (:func:`agegender.core.fileio.csv_cell`)."""
    std = pred.get("age_std")
    header = ["path", "age_true", "gender_true", "race", "age_pred", "p_female", "gender_pred"]
    name = lambda names, code: names[code] if code >= 0 else ""  # noqa: E731 (-1: not known)
    with fileio.atomic_write(path, newline="", **PATHS_IN_TEXT) as f:
        w = csv.writer(f)
        w.writerow(header + (["age_std"] if std is not None else []))
        for i in range(len(d.ages)):
            age = d.ages[i]
            row = [
                d.paths[i],
                f"{int(age[0])}-{int(age[1])}" if np.ndim(age) else int(age),
                name(GENDERS, d.genders[i]),
                name(RACES, d.races[i]),
                f"{pred['age'][i]:.3f}",
                f"{pred['p_female'][i]:.5f}",
                GENDERS[int(pred["p_female"][i] > 0.5)],
            ]
            row += [f"{std[i]:.3f}"] if std is not None else []
            w.writerow([fileio.csv_cell(c) for c in row])
    return path
