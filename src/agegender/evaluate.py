"""Evaluation of a trained model: metrics, a Markdown report, plots and per-image predictions.

:func:`evaluate` runs a checkpoint over a prepared cache split (or a plain image folder) and
writes ``metrics.json``, ``report.md``, ``predictions.csv`` and four PNG plots into one folder;
:func:`show` draws a grid of faces titled with true and predicted labels. The numbers come from
:func:`compute_metrics`, a pure function of the labels and predictions.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from agegender.data import AGE_BANDS, GENDERS, RACES, SPLITS, age_band, band_name
from agegender.errors import DataError
from agegender.inference import device_name

DECADES = (*((lo, lo + 9) for lo in range(0, 90, 10)), (90, 200))
ECE_BINS = 10
INTERVAL_LEVEL = 0.9
INTERVAL_Z = 1.645  # two-sided 90 % quantile of the standard normal
GOOD_AGE_ERROR = 5  # show(): a face counts as right within this many years
SPLIT_CHOICES = (*SPLITS, "all")


# --------------------------------------------------------------------------- metrics


def _mean(x: np.ndarray) -> float | None:
    # None (JSON null) rather than NaN for empty groups: NaN is not valid JSON
    return float(x.mean()) if len(x) else None


def _range_name(lo: int, hi: int, last: bool) -> str:
    return f"{lo}+" if last else f"{lo}-{hi}"


def compute_metrics(
    age_true: Any,
    gender_true: Any,
    race: Any,
    age_pred: Any,
    p_female: Any,
    age_std: Any | None = None,
) -> dict[str, Any]:
    """Gender, age, fairness, calibration and uncertainty metrics of one set of predictions.

    A face is predicted female when ``p_female > 0.5``. Calibration uses the confidence
    ``max(p, 1 - p)`` (always in [0.5, 1]) in :data:`ECE_BINS` equal-width bins over [0.5, 1];
    the expected calibration error is the image-weighted mean of |accuracy - confidence| over
    the bins. With ``age_std`` the 90 % interval ``age_pred +- 1.645 * age_std`` is checked
    against the true ages. Groups without images get ``None`` for their averages.

    >>> m = compute_metrics(
    ...     age_true=[5, 25, 45, 70], gender_true=[0, 1, 0, 1], race=[0, 0, 1, 2],
    ...     age_pred=[7, 22, 45, 60], p_female=[0.2, 0.9, 0.6, 0.7], age_std=[1, 2, 1, 5])
    >>> m["n"], m["gender_accuracy"], m["gender_accuracy_by_gender"]
    (4, 0.75, {'male': 0.5, 'female': 1.0})
    >>> m["confusion"]  # rows: true male, female; columns: predicted male, female
    [[1, 1], [0, 2]]
    >>> m["age_mae"], round(m["age_abs_error_std"], 4)  # errors 2, 3, 0, 10
    (3.75, 3.7666)
    >>> {band: v["mae"] for band, v in m["age_mae_by_band"].items()}
    {'0-9': 2.0, '10-19': None, '20-39': 3.0, '40-59': 0.0, '60+': 10.0}
    >>> m["by_race"]["White"]
    {'n': 2, 'gender_accuracy': 1.0, 'age_mae': 2.5}
    >>> round(m["calibration"]["ece"], 6)  # one face per bin: (0.2 + 0.1 + 0.6 + 0.3) / 4
    0.3
    >>> m["age_interval"]["coverage"], round(m["age_interval"]["mean_width"], 4)
    (0.5, 7.4025)
    """
    age_true = np.asarray(age_true, dtype=np.float64)
    gender_true = np.asarray(gender_true, dtype=np.int64)
    race = np.asarray(race, dtype=np.int64)
    age_pred = np.asarray(age_pred, dtype=np.float64)
    p_female = np.asarray(p_female, dtype=np.float64)
    n = len(age_true)
    if not n == len(gender_true) == len(race) == len(age_pred) == len(p_female):
        raise ValueError("age_true, gender_true, race, age_pred and p_female differ in length")
    if n == 0:
        raise ValueError("no predictions to evaluate")

    gender_pred = (p_female > 0.5).astype(np.int64)
    correct = gender_pred == gender_true
    abs_err = np.abs(age_pred - age_true)
    confusion = np.zeros((2, 2), dtype=np.int64)
    np.add.at(confusion, (gender_true, gender_pred), 1)

    def by_ranges(ranges: tuple[tuple[int, int], ...]) -> dict[str, dict[str, Any]]:
        out = {}
        for i, (lo, hi) in enumerate(ranges):
            sel = (age_true >= lo) & (age_true <= hi)
            out[_range_name(lo, hi, i == len(ranges) - 1)] = {
                "n": int(sel.sum()),
                "mae": _mean(abs_err[sel]),
            }
        return out

    # Bands by data.age_band, so that the bands match the split's stratification exactly.
    bands = np.asarray(age_band(age_true.astype(np.int64)))
    by_band = {
        band_name(b): {"n": int((bands == b).sum()), "mae": _mean(abs_err[bands == b])}
        for b in range(len(AGE_BANDS))
    }

    confidence = np.maximum(p_female, 1 - p_female)
    edges = np.linspace(0.5, 1.0, ECE_BINS + 1)
    which = np.clip(np.searchsorted(edges[1:-1], confidence, side="right"), 0, ECE_BINS - 1)
    bins, ece = [], 0.0
    for b in range(ECE_BINS):
        sel = which == b
        conf, acc = _mean(confidence[sel]), _mean(correct[sel].astype(np.float64))
        if conf is not None and acc is not None:
            ece += sel.sum() / n * abs(acc - conf)
        bins.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "n": int(sel.sum()),
                "confidence": conf,
                "accuracy": acc,
            }
        )

    metrics: dict[str, Any] = {
        "n": n,
        "gender_accuracy": float(correct.mean()),
        "gender_accuracy_by_gender": {
            name: _mean(correct[gender_true == g].astype(np.float64))
            for g, name in enumerate(GENDERS)
        },
        "confusion": confusion.tolist(),
        "age_mae": float(abs_err.mean()),
        "age_abs_error_std": float(abs_err.std()),
        "age_mae_by_band": by_band,
        "age_mae_by_decade": by_ranges(DECADES),
        "by_race": {
            name: {
                "n": int((race == r).sum()),
                "gender_accuracy": _mean(correct[race == r].astype(np.float64)),
                "age_mae": _mean(abs_err[race == r]),
            }
            for r, name in enumerate(RACES)
        },
        "calibration": {"ece": float(ece), "bins": bins},
        "age_interval": None,
    }
    if age_std is not None:
        std = np.asarray(age_std, dtype=np.float64)
        half = INTERVAL_Z * std
        metrics["age_interval"] = {
            "level": INTERVAL_LEVEL,
            "z": INTERVAL_Z,
            "coverage": float((abs_err <= half).mean()),
            "mean_width": float((2 * half).mean()),
        }
    return metrics


# --------------------------------------------------------------------------- model and data


class _Loaded(NamedTuple):
    model: nn.Module
    meta: dict[str, Any]
    images: np.ndarray  # (N, H, W, C) uint8 at the model's input size
    ages: np.ndarray
    genders: np.ndarray
    races: np.ndarray
    paths: list[str]
    checkpoint: Path
    split: str  # "all" for a plain image folder
    source: str  # where the images came from, for people
    skipped: dict[str, Any] | None = None  # a plain folder's files left out, see _skipped


def _run_cache(model_spec: str | os.PathLike) -> Path:
    """The cache a run folder trained on, as its ``config.toml`` records it."""
    from agegender.config import load_config

    run = Path(model_spec)
    if str(model_spec) == "default" or not (run / "config.toml").is_file():
        raise DataError(
            f"give --data (a prepared cache or an image folder): {model_spec} is not a run "
            "folder with a config.toml naming its data"
        )
    d = load_config(run / "config.toml").data
    if d.cache:
        cache = Path(d.cache)
    elif d.root:
        cache = run / "cache"  # where train() prepares data.root when data.cache is empty
    else:
        raise DataError(f"{run}/config.toml names no data.cache or data.root; give --data")
    if not cache.exists():
        raise DataError(
            f"{run}/config.toml names the cache {cache}, which does not exist; give --data"
        )
    return cache


def _skipped(cache_dir: Path) -> dict[str, Any] | None:
    """The files of a plain image folder that :func:`prepare` left out: how many, of how many,
    by reason, and the first few with their reasons (bad files before duplicates)."""
    from agegender.data import read_manifest

    rows = read_manifest(cache_dir)
    left_out = sorted(
        (r for r in rows if r["status"] != "kept"),
        key=lambda r: r["status"].startswith("duplicate"),
    )
    if not left_out:
        return None
    return {
        "n": len(left_out),
        "of": len(rows),
        "by_reason": dict(Counter(r["status"].split(":")[0] for r in left_out).most_common()),
        "examples": [f"{Path(r['path']).name} ({r['status']})" for r in left_out[:3]],
    }


def _skipped_line(skipped: dict[str, Any], root: Path) -> str:
    why = ", ".join(f"{n:,} {reason}" for reason, n in skipped["by_reason"].items())
    names = ", ".join(e.split(" (", 1)[0] for e in skipped["examples"])
    more = ", ..." if skipped["n"] > len(skipped["examples"]) else ""
    return (
        f"skipped {skipped['n']:,} of {skipped['of']:,} image files in {root} ({why}): "
        f"{names}{more}"
    )


def _load(
    model_spec: str | os.PathLike,
    data: str | os.PathLike | None,
    split: str,
    device: torch.device,
    work_dir: Path,
) -> _Loaded:
    """Model, metadata and the labelled images to run it on (already at the model's size).

    A prepared cache gives its ``split`` (``all`` for every row); a plain image folder is
    prepared into ``work_dir`` at the model's size and colour and used whole, since its split
    would be an arbitrary one of ours, not the model's.
    """
    from agegender.checkpoint import load_checkpoint, resolve_checkpoint
    from agegender.data import is_cache, open_cache, prepare
    from agegender.inference import to_tensor
    from agegender.train import _resize

    if split not in SPLIT_CHOICES:
        raise DataError(f"split must be one of {', '.join(SPLIT_CHOICES)}, got {split!r}")
    checkpoint = resolve_checkpoint(model_spec)
    if data is not None and not Path(data).exists():
        raise DataError(f"no such data: {data} (give a prepared cache or an image folder)")
    model, meta = load_checkpoint(checkpoint, device)
    chans, size, _ = meta["data_config"]["input_size"]
    color = meta["data_config"]["color"]

    root = _run_cache(model_spec) if data is None else Path(data)
    skipped = None
    if is_cache(root):
        cache = open_cache(root)
        rows = cache.indices(None if split == "all" else split)
        source = f"{root} ({'all images' if split == 'all' else f'{split} split'})"
    else:
        prepare([root], work_dir / "cache", size=size, color=color, quiet=True)
        cache = open_cache(work_dir / "cache")
        rows = cache.indices(None)
        split, source = "all", f"{root} (all usable images)"
        skipped = _skipped(work_dir / "cache")
        if skipped:  # said here, since the folder's manifest goes with the temporary cache
            print(f"agegender: {_skipped_line(skipped, root)}", file=sys.stderr)
    if len(rows) == 0:
        where = f"the {split} split of {root}" if split != "all" else str(root)
        raise DataError(f"{where} holds no usable images")
    if cache.color != color:
        raise DataError(
            f"the model expects {color} images but {root} holds {cache.color} ones: prepare a "
            f"{color} cache (agegender prepare ... --color {color})"
        )
    images = np.asarray(cache.images[rows])  # fancy indexing reads those rows into memory
    if cache.size != size:
        # the same antialiased resize that training applies to a cache of another size
        x = _resize(to_tensor(images, torch.device("cpu")), size)
        images = x.permute(0, 2, 3, 1).contiguous().numpy()
    assert images.shape[1:] == (size, size, chans)
    return _Loaded(
        model,
        meta,
        images,
        cache.age[rows],
        cache.gender[rows],
        cache.race[rows],
        [cache.paths[i] for i in rows],
        checkpoint,
        split,
        source,
        skipped,
    )


def _default_tta(meta: dict[str, Any]) -> bool:
    """The checkpoint's own recipe decides, so that evaluation matches training's test score."""
    return bool(((meta.get("config") or {}).get("train") or {}).get("tta", False))


# --------------------------------------------------------------------------- timing


def time_inference(
    model: nn.Module,
    images: np.ndarray,
    device: torch.device,
    batch_size: int = 256,
    tta: bool = False,
    amp: bool = False,
    reps: int = 50,
) -> dict[str, Any]:
    """Median inference time per image at batch size 1 and at ``batch_size``, in ms.

    Batch 1 is the median of ``reps`` single-image calls after a warm-up; the batch figure is
    the median over ``max(1, min(5, reps // 10))`` full batches (images repeated to fill one).
    Times are for the whole :func:`~agegender.inference.predict_arrays` call (normalisation,
    TTA, copy back), which is what a user of the model waits for.
    """
    from agegender.inference import predict_arrays

    def run(x: np.ndarray) -> float:
        t0 = time.perf_counter()
        predict_arrays(model, x, device, batch_size=len(x), tta=tta, amp=amp)
        return time.perf_counter() - t0

    one = images[:1]
    for _ in range(min(5, reps)):
        run(one)
    single = [run(one) for _ in range(reps)]
    batch = images[np.arange(batch_size) % len(images)]
    batches = max(1, min(5, reps // 10))
    run(batch)
    many = [run(batch) / batch_size for _ in range(batches)]
    return {
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "tta": tta,
        "amp": amp,
        "batch1_ms_per_image": 1000 * statistics.median(single),
        "batch1_calls": reps,
        "batch_size": batch_size,
        "batch_ms_per_image": 1000 * statistics.median(many),
        "batch_calls": batches,
    }


# --------------------------------------------------------------------------- plots


def _save(fig: Figure, path: Path) -> Path:
    # Figure (not pyplot) keeps no global state and needs no display
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


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


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _report(m: dict[str, Any]) -> str:
    g = m["gender_accuracy_by_gender"]
    conf = m["confusion"]
    lines = [
        "# Evaluation",
        "",
        f"Model `{m['model']}` from `{m['checkpoint']}`, on {m['data']}: {m['n']:,} images; "
        f"{'flip TTA' if m['tta'] else 'no TTA'}; device {m['device']}"
        f"{' (bf16)' if m['amp'] else ''}.",
    ]
    if m.get("skipped"):
        sk = m["skipped"]
        why = ", ".join(f"{n:,} {reason}" for reason, n in sk["by_reason"].items())
        lines += [
            "",
            f"Skipped {sk['n']:,} of the folder's {sk['of']:,} image files ({why}), e.g. "
            + "; ".join(f"`{e}`" for e in sk["examples"])
            + ".",
        ]
    summary = [
        ["gender accuracy", f"{m['gender_accuracy']:.2%}"],
        ["age MAE (years)", f"{m['age_mae']:.2f}"],
        ["std of absolute age errors (years)", f"{m['age_abs_error_std']:.2f}"],
        ["gender ECE (10 bins)", f"{m['calibration']['ece']:.3f}"],
    ]
    if m["age_interval"]:
        iv = m["age_interval"]
        summary.append(["90 % age interval coverage", f"{iv['coverage']:.1%}"])
    lines += _table(["metric", "value"], summary)

    lines += ["## Gender"]
    lines += _table(
        ["true gender", "n", "accuracy"],
        [[name, f"{sum(conf[i]):,}", _fmt(g[name], ".2%")] for i, name in enumerate(GENDERS)],
    )
    lines += ["Confusion matrix (rows: true, columns: predicted; row percentages):"]
    lines += _table(
        ["true \\ predicted", *GENDERS],
        [
            [name, *(f"{conf[i][j]:,} ({conf[i][j] / max(sum(conf[i]), 1):.1%})" for j in range(2))]
            for i, name in enumerate(GENDERS)
        ],
    )
    lines += ["![confusion matrix](confusion.png)", ""]

    lines += ["## Age"]
    lines += _table(
        ["age band", "n", "MAE (years)"],
        [[k, f"{v['n']:,}", _fmt(v["mae"], ".2f")] for k, v in m["age_mae_by_band"].items()],
    )
    lines += _table(
        ["decade", "n", "MAE (years)"],
        [[k, f"{v['n']:,}", _fmt(v["mae"], ".2f")] for k, v in m["age_mae_by_decade"].items()],
    )
    lines += ["![predicted vs true age](age_scatter.png) ![MAE by age band](mae_by_band.png)", ""]

    lines += ["## Fairness by race", "", "UTKFace's race labels; small groups give noisy numbers."]
    lines += _table(
        ["race", "n", "gender accuracy", "age MAE (years)"],
        [
            [r, f"{v['n']:,}", _fmt(v["gender_accuracy"], ".2%"), _fmt(v["age_mae"], ".2f")]
            for r, v in m["by_race"].items()
        ],
    )

    cal = m["calibration"]
    lines += [
        "## Gender calibration",
        "",
        f"Expected calibration error {cal['ece']:.4f}: the image-weighted mean gap between "
        "accuracy and confidence max(p, 1 - p) over 10 equal-width bins on [0.5, 1].",
    ]
    lines += _table(
        ["confidence bin", "n", "mean confidence", "accuracy"],
        [
            [
                f"{b['lo']:.2f}-{b['hi']:.2f}",
                f"{b['n']:,}",
                _fmt(b["confidence"], ".3f"),
                _fmt(b["accuracy"], ".3f"),
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
            f"The predicted 90 % interval (age +- {iv['z']} x std) holds the true age for "
            f"{iv['coverage']:.1%} of the images (ideal: 90 %); its mean width is "
            f"{iv['mean_width']:.1f} years.",
            "",
        ]
    if "timing" in m:
        t = m["timing"]
        lines += ["## Speed"]
        lines += _table(
            ["batch size", "ms per image", "calls (median)"],
            [
                [1, f"{t['batch1_ms_per_image']:.2f}", t["batch1_calls"]],
                [t["batch_size"], f"{t['batch_ms_per_image']:.3f}", t["batch_calls"]],
            ],
        )
        extras = (", flip TTA" if t["tta"] else "") + (", bf16" if t["amp"] else "")
        lines += [f"Device {t['device']}, {t['threads']} torch thread(s){extras}.", ""]
    lines += ["Per-image predictions: [predictions.csv](predictions.csv).", ""]
    return "\n".join(lines)


def _write_predictions(path: Path, d: _Loaded, pred: dict[str, np.ndarray]) -> Path:
    std = pred.get("age_std")
    header = ["path", "age_true", "gender_true", "race", "age_pred", "p_female", "gender_pred"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header + (["age_std"] if std is not None else []))
        for i in range(len(d.ages)):
            row = [
                d.paths[i],
                int(d.ages[i]),
                GENDERS[d.genders[i]],
                RACES[d.races[i]],
                f"{pred['age'][i]:.3f}",
                f"{pred['p_female'][i]:.5f}",
                GENDERS[int(pred["p_female"][i] > 0.5)],
            ]
            w.writerow(row + ([f"{std[i]:.3f}"] if std is not None else []))
    return path


# --------------------------------------------------------------------------- commands


def evaluate(
    model_spec: str | os.PathLike,
    data: str | os.PathLike | None = None,
    split: str = "test",
    tta: bool | None = None,
    out_dir: str | os.PathLike = "runs/evaluate",
    device: str = "auto",
    batch_size: int = 256,
    timing: bool = True,
    timing_reps: int = 50,
    amp: str = "auto",
    quiet: bool = False,
) -> dict[str, Any]:
    """Evaluate a model and write ``metrics.json``, ``report.md``, ``predictions.csv``,
    ``confusion.png``, ``age_scatter.png``, ``mae_by_band.png`` and ``reliability.png``.

    Args:
        model_spec: ``default`` (the bundled model), a run folder or a checkpoint file.
        data: a prepared cache or a plain UTKFace-style image folder (prepared on the fly at
            the model's size and colour, all of it used); ``None`` uses a run folder's own cache.
        split: ``train``, ``val``, ``test`` or ``all`` (caches only).
        tta: flip test-time augmentation; ``None`` follows the checkpoint's recipe.
        out_dir: where the files go (created).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        batch_size: images per forward pass (and the batch size timed).
        timing: also time inference at batch size 1 and ``batch_size``.
        timing_reps: single-image calls timed (see :func:`time_inference`).
        amp: ``auto``, ``bf16`` or ``off``, as in training.
        quiet: no progress bar.

    Returns the metrics, as written to ``metrics.json``.
    """
    from agegender.inference import predict_arrays
    from agegender.train import resolve_device, use_amp

    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    if timing and timing_reps < 1:
        raise DataError(f"timing reps must be >= 1, got {timing_reps}")
    out = Path(out_dir)
    if (out / "best.safetensors").is_file() or (out / "last.state.pt").is_file():
        # its metrics.json is the training's, which sweeps and reports read
        raise DataError(
            f"--out {out} is a training run folder: write the evaluation elsewhere, "
            f"e.g. --out {out / 'eval'}"
        )
    dev = resolve_device(device, option="--device")
    bf16 = use_amp(dev, amp)
    with tempfile.TemporaryDirectory(prefix="agegender-eval-") as tmp:
        d = _load(model_spec, data, split, dev, Path(tmp))
    tta = _default_tta(d.meta) if tta is None else tta
    pred = predict_arrays(
        d.model, d.images, dev, batch_size=batch_size, tta=tta, amp=bf16, progress=not quiet
    )
    m = compute_metrics(
        d.ages, d.genders, d.races, pred["age"], pred["p_female"], pred.get("age_std")
    )
    m.update(
        model=d.meta["model"]["name"],
        checkpoint=str(d.checkpoint),
        epoch=d.meta.get("epoch"),
        data=d.source,
        split=d.split,
        skipped=d.skipped,
        tta=tta,
        amp=bf16,
        device=device_name(dev),
    )
    if timing:
        m["timing"] = time_inference(d.model, d.images, dev, batch_size, tta, bf16, timing_reps)

    out.mkdir(parents=True, exist_ok=True)
    _write_predictions(out / "predictions.csv", d, pred)
    _plot_confusion(m, out / "confusion.png")
    _plot_scatter(m, d.ages, pred["age"], out / "age_scatter.png")
    _plot_bands(m, out / "mae_by_band.png")
    _plot_reliability(m, out / "reliability.png")
    (out / "report.md").write_text(_report(m))
    (out / "metrics.json").write_text(json.dumps(m, indent=2) + "\n")
    return m


def format_summary(metrics: dict[str, Any], out_dir: str | os.PathLike) -> str:
    """A few lines for people: accuracy, MAE, per-gender accuracy and where the report is."""
    m = metrics
    g = m["gender_accuracy_by_gender"]
    lines = [
        f"{m['n']:,} images from {m['data']} ({'flip TTA' if m['tta'] else 'no TTA'})",
        f"gender accuracy  {m['gender_accuracy']:.2%}  (male {_fmt(g['male'], '.2%')}, "
        f"female {_fmt(g['female'], '.2%')})",
        f"age MAE          {m['age_mae']:.2f} years  (std of errors {m['age_abs_error_std']:.2f})",
    ]
    if "timing" in m:
        t = m["timing"]
        lines.append(
            f"speed            {t['batch1_ms_per_image']:.2f} ms/image at batch 1, "
            f"{t['batch_ms_per_image']:.3f} at batch {t['batch_size']} "
            f"({t['device']})"
        )
    lines.append(f"report           {Path(out_dir) / 'report.md'}")
    return "\n".join(lines)


def _figure_path(out: str | os.PathLike) -> Path:
    """Where :func:`show` writes for ``--out``: a folder gets ``grid.png`` inside it, a name
    without an extension gets ``.png`` (as matplotlib would add, but then said)."""
    path = Path(out)
    if path.is_dir() or str(out).endswith(("/", os.sep)):
        return path / "grid.png"
    if not path.suffix:
        return path.with_name(path.name + ".png")
    formats = Figure().canvas.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise DataError(
            f"--out {out}: matplotlib cannot write {path.suffix} files; give a file ending in "
            f"one of {', '.join('.' + f for f in sorted(formats))}"
        )
    return path


def show(
    model_spec: str | os.PathLike,
    data: str | os.PathLike | None,
    out: str | os.PathLike,
    n: int = 25,
    split: str = "test",
    seed: int = 0,
    tta: bool | None = None,
    device: str = "auto",
) -> Path:
    """Draw ``n`` random faces (5 per row) titled ``true 34 F / pred 31 F``; returns the file
    written: ``out``, ``out/grid.png`` for a folder, or ``out.png`` when it has no extension.

    A title is green when the predicted gender is right and the age is off by at most
    :data:`GOOD_AGE_ERROR` years, red otherwise. ``data`` is resolved as in :func:`evaluate`.
    """
    from agegender.inference import predict_arrays
    from agegender.train import resolve_device

    if n < 1:
        raise DataError(f"n must be >= 1, got {n}")
    path = _figure_path(out)  # before the model and the data are loaded
    dev = resolve_device(device, option="--device")
    with tempfile.TemporaryDirectory(prefix="agegender-show-") as tmp:
        d = _load(model_spec, data, split, dev, Path(tmp))
    tta = _default_tta(d.meta) if tta is None else tta
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(d.ages), size=min(n, len(d.ages)), replace=False))
    pred = predict_arrays(d.model, d.images[picks], dev, tta=tta)

    cols = 5
    rows = math.ceil(len(picks) / cols)
    fig = Figure(figsize=(10, 2.2 * rows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for k, (ax, i) in enumerate(zip(axes, picks)):
        img = d.images[i]
        if img.shape[2] == 1:
            ax.imshow(img[:, :, 0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(img)
        age, sex = float(pred["age"][k]), int(pred["p_female"][k] > 0.5)
        good = sex == d.genders[i] and abs(age - d.ages[i]) <= GOOD_AGE_ERROR
        ax.set_title(
            f"true {d.ages[i]} {'MF'[d.genders[i]]} / pred {round(age)} {'MF'[sex]}",
            fontsize=8.5,
            color="tab:green" if good else "tab:red",
        )
    fig.suptitle(f"{d.meta['model']['name']} on {d.source}", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
