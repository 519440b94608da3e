"""Bundle a trained model into the package: fp16 weights with their record, and ONNX files.

    python tools/bundle_model.py RUN_OR_CHECKPOINT [...] --name default|accurate
        [--cache cache/utk128] [--child-temperature fit|keep|T]

Several runs or checkpoints make one ensemble (their outputs averaged, run with flip TTA; see
:class:`agegender.training.models.Ensemble`), bundled as one model; its members keep their own
``child_temperature``.

Writes ``src/agegender/weights/NAME.safetensors`` (+ ``.json``): fp16 weights and the record
of the images the model trained on, after checking that fp16 keeps the test metrics (gender
accuracy within 0.1 point, MAE within 0.02 years of fp32); ``NAME.onnx``: the same weights
stored in half, computed in fp32, for ONNX Runtime; and ``NAME.int8.onnx``, statically
quantised and calibrated on training faces of ``--cache``, kept only where it loses at most 0.1
point of gender accuracy and 0.03 years of MAE on the test split against ``NAME.onnx``, and its
90 % age interval covers as many true ages within 2 points, so that
``precision=auto`` may take it. Prints the four evaluations and writes them to
``reports/bundled/NAME.json``.

The model's ``child_temperature`` (how much a child's P(female) is softened, see
:mod:`agegender.training.calibrate`) is fitted on the test split's faces (``--child-temperature
fit``, the default) or set (a number; ``keep``: as the checkpoint has it). It moves no predicted
gender and no age, so no accuracy or MAE above depends on it; what it does to calibration is
reported cross-fitted (each half of the faces scored with the temperature fitted on the other).
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
from agegender.inference.model_files import WEIGHTS, read_meta, read_seen
from agegender.inference.options import InferenceOptions
from agegender.training.calibrate import cross_fitted, fit_child_temperature
from agegender.training.checkpoint import load_checkpoint, save_checkpoint, save_ensemble
from agegender.training.export import export

FP16_TOLERANCE = {"gender_accuracy": 1e-3, "age_mae": 0.02, "interval_coverage": 0.01}
# the 90 % age interval too: a quantised softmax once kept the mean age and lost the spread
INT8_TOLERANCE = {"gender_accuracy": 1e-3, "age_mae": 0.03, "interval_coverage": 0.02}


def _scores(m: dict) -> dict:
    interval = m.get("age_interval") or {}
    return {"gender_accuracy": m["gender_accuracy"], "age_mae": m["age_mae"], "n": m["n"],
            "interval_coverage": interval.get("coverage")}  # fmt: skip


def _within(a: dict, b: dict, tolerance: dict) -> bool:
    """b loses at most ``tolerance`` against a (accuracy lower, MAE higher)."""
    covered = a.get("interval_coverage"), b.get("interval_coverage")
    return (
        a["gender_accuracy"] - b["gender_accuracy"] <= tolerance["gender_accuracy"]
        and b["age_mae"] - a["age_mae"] <= tolerance["age_mae"]
        and (None in covered or abs(covered[0] - covered[1]) <= tolerance["interval_coverage"])
    )


def _child_temperature(predictions: Path, how: str) -> tuple[float | None, dict]:
    """The temperature ``how`` asks for, fitted on ``predictions`` (an evaluation's CSV) when
    ``fit``, and what it does to each age band's gender calibration, cross-fitted."""
    if how == "keep":
        return None, {}
    with predictions.open() as f:
        rows = list(csv.DictReader(f))
    age = np.array([float(r["age_true"]) for r in rows])
    gender = np.array([GENDERS.index(g) if (g := r["gender_true"]) in GENDERS else -1
                       for r in rows])  # fmt: skip
    race = np.array([RACES.index(r["race"]) if r["race"] in RACES else -1 for r in rows])
    p = np.array([float(r["p_female"]) for r in rows])
    age_pred = np.array([float(r["age_pred"]) for r in rows])
    value = fit_child_temperature(p, age_pred, gender) if how == "fit" else float(how)
    softened, halves = cross_fitted(p, age_pred, gender)

    def bands(p_female: np.ndarray) -> dict:
        m = compute_metrics(age, gender, race, age_pred, p_female)
        keys = ("n", "gender_accuracy", "gender_confidence", "gender_ece")
        return {b: {k: v[k] for k in keys} for b, v in m["age_mae_by_band"].items()}

    report = {"value": value, "how": how, "cross_fitted_values": halves,
              "before": bands(p), "after_cross_fitted": bands(softened)}  # fmt: skip
    return value, report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "run",
        nargs="+",
        help="a run folder (its best.safetensors) or a checkpoint; several: an ensemble of them",
    )
    p.add_argument("--name", choices=("default", "accurate"), required=True)
    p.add_argument("--cache", default="cache/utk128", help="prepared cache: test and calibration")
    p.add_argument(
        "--child-temperature", default="fit", help="fit (on the test split), keep, or a number"
    )
    args = p.parse_args()

    sources = [Path(r) / "best.safetensors" if Path(r).is_dir() else Path(r) for r in args.run]
    src = sources[0]
    if len(sources) > 1:
        if args.child_temperature == "fit":
            raise SystemExit("an ensemble's members keep their own: give --child-temperature keep")
        # the members' own files stay where they are: the ensemble is a new checkpoint
        src = save_ensemble(sources, Path("runs") / f"ensemble-{args.name}" / "best.safetensors")
    dst = WEIGHTS / f"{args.name}.safetensors"
    kw = {"data": args.cache, "split": "test", "timing": False, "quiet": True}
    report = Path("reports/bundled") / f"{args.name}.json"
    results: dict = {"source": str(src)}
    same = src.resolve() == dst.resolve()
    if same and report.is_file():  # re-exported: keep its fp32/fp16 figures and its source
        results = json.loads(report.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        model, meta = load_checkpoint(src)
        if args.child_temperature == "fit" and getattr(model, "child_temperature", 1) != 1:
            raise SystemExit(f"{src} is calibrated already: give --child-temperature keep")
        extra = {k: meta[k] for k in ("epoch", "metrics", "config") if k in meta}
        seen = read_seen(src)
        # the checkpoints themselves, on torch: what fp16 storage changes, before any export
        on_torch = InferenceOptions(model=str(src), backend="torch")
        plain = _scores(evaluate(on_torch, out_dir=Path(tmp) / "full", **kw))
        temperature, calibration = _child_temperature(
            Path(tmp) / "full" / "predictions.csv", args.child_temperature
        )
        if temperature is not None:
            model.child_temperature = model.config["child_temperature"] = temperature
            results["child_temperature"] = calibration
        if not same:
            results["fp32"] = plain
            half = save_checkpoint(Path(tmp) / "half.safetensors", model, extra, True, seen)
            on_torch = on_torch.replace(model=str(half))
            results["fp16"] = _scores(evaluate(on_torch, out_dir=Path(tmp) / "half", **kw))
            if not _within(results["fp32"], results["fp16"], FP16_TOLERANCE):
                raise SystemExit(f"fp16 storage loses too much: {results}")
        save_checkpoint(dst, model, extra, half=True, seen=seen)
        export(dst, WEIGHTS / f"{args.name}.onnx", half_weights=True)
        int8 = WEIGHTS / f"{args.name}.int8.onnx"
        export(dst, int8, int8=True, data=args.cache)
        for precision in ("fp32", "int8"):
            onnx = InferenceOptions(model=args.name, precision=precision)
            out = Path(tmp) / f"onnx-{precision}"
            results[f"onnx_{precision}"] = _scores(evaluate(onnx, out_dir=out, **kw))
    results["int8_kept"] = _within(results["onnx_fp32"], results["onnx_int8"], INT8_TOLERANCE)
    if not results["int8_kept"]:
        int8.unlink()
    report.parent.mkdir(parents=True, exist_ok=True)
    fileio.write_json(report, results)
    print(json.dumps(results, indent=1))
    print(f"bundled {src} as {args.name}: {json.dumps(read_meta(dst)['model'])}")
    for f in sorted(WEIGHTS.glob(f"{args.name}.*")):
        print(f"  {f.name}: {f.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
