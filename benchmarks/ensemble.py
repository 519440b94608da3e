"""Models and their ensemble on one split: each member's figures, the ensemble's, the groups.

    python benchmarks/ensemble.py --data cache/utk128 [--split test] [--models default accurate]
        [--also MODEL ...] [--no-mean] [--out reports/accuracy/ensemble] [--threads 2]

Each model is scored by :func:`agegender.evaluation.evaluate.evaluate` as ``agegender
evaluate`` runs it (ONNX Runtime, its own test-time augmentation), on the images no member
trained or validated on (each one's record of what it saw, near-copies included). The ensemble
averages the members' P(female) and expected age per face (the ``mean`` column; none with
``--no-mean``, for a table of models side by side); ``--also`` models are scored on the same
faces and shown beside. Writes ``OUT/ensemble.json`` and
``OUT/ensemble.md``: overall gender accuracy and
age MAE, the race table, the age-band table and the gender's calibration by age band
(children's gender is hard: how sure a model sounds there beside how often it is right).

A model given as ``NAME@K`` is member ``K`` (from 0) of the ensemble ``NAME`` (a bundled name or
a checkpoint), alone, with flip TTA: ``--models default accurate@1`` compares the default with
the larger network inside ``accurate``.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

import numpy as np

from agegender.core import fileio
from agegender.data.utkface import GENDERS, RACES
from agegender.evaluation.evaluate import evaluate
from agegender.evaluation.metrics import compute_metrics
from agegender.inference.options import InferenceOptions


def alone(spec: str, out: Path) -> str:
    """``spec``, or for ``NAME@K`` a checkpoint of that ensemble's member K written in ``out``
    (with the ensemble's record of what it saw, and flip TTA)."""
    import torch

    from agegender.inference.model_files import read_seen, resolve_checkpoint
    from agegender.training.checkpoint import load_checkpoint, save_checkpoint

    name, _, k = spec.partition("@")
    if not k:
        return spec
    path = resolve_checkpoint(name)
    ensemble, _ = load_checkpoint(path)
    net = ensemble.members[int(k)]
    with torch.no_grad():  # a member file stores fp32 weights, as a trained run does
        net.float()
    extra = {"epoch": 0, "metrics": {}, "config": {"train": {"tta": True}}}
    dest = out / spec.replace("/", "_") / "member.safetensors"
    dest.parent.mkdir(parents=True, exist_ok=True)
    return str(save_checkpoint(dest, net, extra, seen=read_seen(path)))


def member(model: str, others: list[str], data: str | None, split: str, out: Path, threads: int):
    """One model's predictions on the images no member saw: ``{path: row}``."""
    evaluate(
        InferenceOptions(model=model, threads=threads),
        data,
        split,
        out_dir=out / model.replace("/", "_"),
        timing=False,
        quiet=True,
        also_unseen_by=[m for m in others if m != model],
    )
    with (out / model.replace("/", "_") / "predictions.csv").open() as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def scores(rows: list[dict], p_female: np.ndarray, age_pred: np.ndarray) -> dict:
    """:func:`compute_metrics` of these predictions against ``rows``' truth."""
    age = np.array([float(r["age_true"]) for r in rows])
    gender = np.array([GENDERS.index(g) if (g := r["gender_true"]) in GENDERS else -1
                       for r in rows])  # fmt: skip
    race = np.array([RACES.index(r["race"]) if r["race"] in RACES else -1 for r in rows])
    return compute_metrics(age, gender, race, age_pred, p_female)


def _name(model: str) -> str:
    """A column's title: a run folder's or checkpoint's own name, else the model's name."""
    path = Path(model)
    if path.is_dir():
        return path.name
    return path.parent.name if path.suffix == ".safetensors" else model


def _pair(accuracy: float | None, mae: float | None) -> str:
    """``accuracy % / MAE``; ``-`` for a group without faces."""
    return "-" if accuracy is None or mae is None else f"{100 * accuracy:.1f} % / {mae:.2f}"


def _calib(accuracy: float | None, confidence: float | None, ece: float | None) -> str:
    """``accuracy % / confidence % / ECE``; ``-`` for a group without faces."""
    if accuracy is None or confidence is None or ece is None:
        return "-"
    return f"{100 * accuracy:.1f} % / {100 * confidence:.1f} % / {ece:.3f}"


def _row(label: str, cells: list[str]) -> str:
    return f"| {label} | " + " | ".join(cells) + " |"


def table(results: dict[str, dict]) -> str:
    """The Markdown tables: overall, race, age band and gender calibration by age band, a
    column a model."""
    names = list(results)
    head = [_row("", [_name(n) for n in names]), _row("---", ["---"] * len(names))]
    first = results[names[0]]
    lines = ["#### Overall", "", *head]
    lines.append(_row("faces", [f"{results[n]['n']:,}" for n in names]))
    lines.append(
        _row("gender accuracy", [f"{100 * results[n]['gender_accuracy']:.2f} %" for n in names])
    )
    lines.append(_row("age MAE", [f"{results[n]['age_mae']:.3f}" for n in names]))
    lines += ["", "#### By race: gender accuracy / age MAE", "", *head]
    for race, first_row in first["by_race"].items():
        cells = [results[n]["by_race"][race] for n in names]
        text = [_pair(c["gender_accuracy"], c["age_mae"]) for c in cells]
        lines.append(_row(f"{race} ({first_row['n']:,})", text))
    lines += ["", "#### By age band: gender accuracy / age MAE", "", *head]
    bands = first["age_mae_by_band"]
    for band, first_row in bands.items():
        cells = [results[n]["age_mae_by_band"][band] for n in names]
        text = [_pair(c["gender_accuracy"], c["mae"]) for c in cells]
        lines.append(_row(f"{band} ({first_row['n']:,})", text))
    lines += ["", "#### Gender by age band: accuracy / mean confidence / ECE", "", *head]
    for band, first_row in bands.items():
        cells = [results[n]["age_mae_by_band"][band] for n in names]
        text = [_calib(c["gender_accuracy"], c["gender_confidence"], c["gender_ece"])
                for c in cells]  # fmt: skip
        lines.append(_row(f"{band} ({first_row['n']:,})", text))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--data",
        default=None,
        help="prepared cache (without: each run folder's own, so runs "
        "of other sizes or colours are scored on the same faces)",
    )
    ap.add_argument("--split", default="test")
    ap.add_argument("--models", nargs="+", default=["default", "accurate"])
    ap.add_argument("--out", default="reports/accuracy/ensemble")
    ap.add_argument("--also", nargs="*", default=[], help="models shown beside, not averaged")
    ap.add_argument("--no-mean", action="store_true", help="each model alone: no mean column")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # each member's full report: not kept
        files = {m: alone(m, Path(tmp)) for m in [*args.models, *args.also]}
        preds = {m: member(f, list(files.values()), args.data, args.split, Path(tmp),
                           args.threads) for m, f in files.items()}  # fmt: skip
    paths = sorted(set.intersection(*(set(p) for p in preds.values())))
    rows = [preds[args.models[0]][p] for p in paths]
    results = {}
    for m, pred in preds.items():  # each alone, the --also models too
        p = np.array([float(pred[k]["p_female"]) for k in paths])
        a = np.array([float(pred[k]["age_pred"]) for k in paths])
        results[m] = scores(rows, p, a)
    if not args.no_mean:
        members = [preds[m] for m in args.models]
        mean_p = np.mean([[float(pred[k]["p_female"]) for k in paths] for pred in members], 0)
        mean_a = np.mean([[float(pred[k]["age_pred"]) for k in paths] for pred in members], 0)
        results["mean"] = scores(rows, mean_p, mean_a)
    keep = ("n", "gender_accuracy", "age_mae", "by_race", "age_mae_by_band", "calibration")
    summary = {"split": args.split, "data": args.data, "models": args.models,
               "results": {n: {k: r[k] for k in keep} for n, r in results.items()}}  # fmt: skip
    fileio.write_text(out / "ensemble.json", json.dumps(summary, indent=1) + "\n")
    names = " + ".join(_name(m) for m in args.models)
    what = "each alone" if args.no_mean else "and their mean"
    title = f"### {names} {what}, {args.split} split ({len(paths):,} faces)\n\n"
    fileio.write_text(out / "ensemble.md", title + table(results))
    print(title + table(results))


if __name__ == "__main__":
    main()
