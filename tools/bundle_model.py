"""Bundle a trained model into the package: fp16 weights with their record, and ONNX files.

    python tools/bundle_model.py RUN_OR_CHECKPOINT --name default|accurate [--cache cache/utk128]

Writes ``src/agegender/weights/NAME.safetensors`` (+ ``.json``): fp16 weights and the record
of the images the model trained on, after checking that fp16 keeps the test metrics (gender
accuracy within 0.1 point, MAE within 0.02 years of fp32); ``NAME.onnx``: the same weights
stored in half, computed in fp32, for ONNX Runtime; and ``NAME.int8.onnx``, statically
quantised and calibrated on training faces of ``--cache``, kept only where it loses at most 0.1
point of gender accuracy and 0.03 years of MAE on the test split against ``NAME.onnx``, so that
``precision=auto`` may take it. Prints the four evaluations and writes them to
``reports/bundled/NAME.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from agegender.core import fileio
from agegender.evaluation.evaluate import evaluate
from agegender.inference.model_files import WEIGHTS, read_meta, read_seen
from agegender.inference.options import InferenceOptions
from agegender.training.checkpoint import load_checkpoint, save_checkpoint
from agegender.training.export import export

FP16_TOLERANCE = {"gender_accuracy": 1e-3, "age_mae": 0.02}
INT8_TOLERANCE = {"gender_accuracy": 1e-3, "age_mae": 0.03}


def _scores(m: dict) -> dict:
    return {"gender_accuracy": m["gender_accuracy"], "age_mae": m["age_mae"], "n": m["n"]}


def _within(a: dict, b: dict, tolerance: dict) -> bool:
    """b loses at most ``tolerance`` against a (accuracy lower, MAE higher)."""
    return (
        a["gender_accuracy"] - b["gender_accuracy"] <= tolerance["gender_accuracy"]
        and b["age_mae"] - a["age_mae"] <= tolerance["age_mae"]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", help="a run folder (its best.safetensors) or a checkpoint")
    p.add_argument("--name", choices=("default", "accurate"), required=True)
    p.add_argument("--cache", default="cache/utk128", help="prepared cache: test and calibration")
    args = p.parse_args()

    src = Path(args.run)
    src = src / "best.safetensors" if src.is_dir() else src
    dst = WEIGHTS / f"{args.name}.safetensors"
    kw = {"data": args.cache, "split": "test", "timing": False, "quiet": True}
    report = Path("reports/bundled") / f"{args.name}.json"
    results: dict = {"source": str(src)}
    if src.resolve() == dst.resolve() and report.is_file():  # re-exported: keep its fp32/fp16
        results = {**json.loads(report.read_text()), **results}
    with tempfile.TemporaryDirectory() as tmp:
        if src.resolve() != dst.resolve():
            model, meta = load_checkpoint(src)
            extra = {k: meta[k] for k in ("epoch", "metrics", "config") if k in meta}
            half = save_checkpoint(
                Path(tmp) / "half.safetensors", model, extra, half=True, seen=read_seen(src)
            )
            # the checkpoints themselves, on torch: what fp16 storage changes, before any export
            on_torch = InferenceOptions(model=str(src), backend="torch")
            results["fp32"] = _scores(evaluate(on_torch, out_dir=Path(tmp) / "full", **kw))
            on_torch = on_torch.replace(model=str(half))
            results["fp16"] = _scores(evaluate(on_torch, out_dir=Path(tmp) / "half", **kw))
            if not _within(results["fp32"], results["fp16"], FP16_TOLERANCE):
                raise SystemExit(f"fp16 storage loses too much: {results}")
            save_checkpoint(dst, model, extra, half=True, seen=read_seen(src))
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
