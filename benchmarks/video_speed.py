"""Video tracking on this CPU: speed against real time, track counts, and per-person estimates
pooled over frames against single frames.

    python benchmarks/video_speed.py [--data ../shared/data/UTKFace --cache cache/utk128
        --clips 3 --threads 2 --json reports/speed/video.json]

Each clip is :func:`agegender.data.synthetic.group_pan`: six UTKFace faces of the test split of
``--cache`` (seeded; no bundled model trained on them) standing as in a group photo, the camera
panning and zooming over them for 10 s at 25 fps, 640x360, written as MP4 and read back as a
user's video is. Every face is in the picture throughout, so a run is right when it finds six
tracks, each on one face (``id_switches`` counts faces covered by more than one track, and
tracks over more than one face). Per configuration (model, detector, detect every k-th frame):

- ``x_real_time``: the clip's duration over the wall time of ``Predictor.track`` on the file
  (decode, detect, align, the network, tracking); above 1 is faster than real time;
- ``pooled_mae`` (each person's pooled age) beside ``frame_mae`` (every single frame's), and
  gender right per person (pooled) and per frame;
- ``age_spread`` (the shown estimate's spread over a track) beside ``frame_age_spread``
  (single frames'), medians over the tracks;
- once per run, the whole command, ``agegender predict clip.mp4 --output tracks.jsonl``, from
  start-up to the written file, against the clip's duration.

Figures hold for this CPU (its name and class are recorded), under the recorded load.
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

from agegender.data.synthetic import Scene, group_pan, write_video
from agegender.data.utkface import parse_name
from agegender.inference.predictor import Predictor
from agegender.inference.runtime import cpu_class, cpu_info
from agegender.vision.detect import iou
from agegender.vision.images import decode_rgb

CONFIGS = (  # (model, detector, detect_every)
    ("default", "yunet-fast", 1),
    ("default", "yunet-fast", 2),
    ("default", "yunet-fast", 3),
    ("default", "yunet", 1),
    ("accurate", "yunet-fast", 1),
)


def pick_faces(data: Path, cache: Path, clips: int, seed: int) -> list[list[Path]]:
    """``clips`` groups of six test-split faces, three of each gender, ages 5 and up (the
    detector is weakest on babies, which is not what a group photo benchmark is for)."""
    with open(cache / "manifest.csv", newline="") as f:
        names = sorted(
            Path(r["path"]).name
            for r in csv.DictReader(f)
            if r["split"] == "test" and r["status"] == "kept"
        )
    return groups_of_six(names, data, clips, seed)


def groups_of_six(names: list[str], data: Path, clips: int, seed: int) -> list[list[Path]]:
    """``clips`` groups of six of the UTKFace files ``names`` in ``data``, three of each
    gender, ages 5 and up, shuffled by ``seed``."""
    rng = random.Random(seed)
    rng.shuffle(names)
    by_gender: dict[int, list[Path]] = {0: [], 1: []}
    for name in names:
        label = parse_name(name)
        if label is not None and label[0] >= 5 and (data / name).is_file():
            by_gender[label[1]].append(data / name)
    groups = []
    for k in range(clips):
        six = by_gender[0][3 * k : 3 * k + 3] + by_gender[1][3 * k : 3 * k + 3]
        rng.shuffle(six)
        groups.append(six)
    return groups


def match(scene: Scene, tracks: list[dict]) -> dict[int, int]:
    """Track id -> the face it covers (by overlap on its best frame)."""
    out = {}
    for t in tracks:
        truth = scene.boxes(t["best_frame"])
        boxes = np.array([b if b is not None else (0, 0, 0, 0) for b in truth], np.float64)
        overlap = iou(np.array([t["box"]], np.float64), boxes)[0]
        if overlap.max() > 0.3:
            out[t["track"]] = int(overlap.argmax())
    return out


def run_clip(path: Path, scene: Scene, labels: list, model: str, detector: str, every: int,
             threads: int) -> dict[str, Any]:  # fmt: skip
    predictor = Predictor.load(model, detector=detector, threads=threads)
    tracking = predictor.track(path, detect_every=every)
    t0 = time.perf_counter()
    per_frame: dict[int, list] = {}  # track id -> its single frames' faces
    n = 0
    for result in tracking:
        n += 1
        for tid, face in result.faces:
            if tid is not None:
                per_frame.setdefault(tid, []).append(face)
    wall = time.perf_counter() - t0
    tracks = tracking.tracks
    owner = match(scene, tracks)
    per_face: dict[int, int] = {}
    for k in owner.values():
        per_face[k] = per_face.get(k, 0) + 1
    pooled_err, frame_err, pooled_ok, frame_ok = [], [], [], []
    for t in tracks:
        if t["track"] not in owner:
            continue
        age, gender = labels[owner[t["track"]]][:2]
        pooled_err.append(abs(t["age"] - age))
        pooled_ok.append(t["gender"] == ("female" if gender == 1 else "male"))  # "?": wrong
        faces = per_frame.get(t["track"], [])
        frame_err += [abs(f.age - age) for f in faces]
        frame_ok += [(f.gender == "female") == (gender == 1) for f in faces]
    return {
        "frames": n,
        "seconds": wall,
        "tracks": len(tracks),
        "faces_found": len(per_face),
        "id_switches": sum(c - 1 for c in per_face.values()) + len(tracks) - len(owner),
        "pooled_errors": pooled_err,
        "frame_errors": frame_err,
        "pooled_gender": pooled_ok,
        "age_spread": [t["age_spread"] for t in tracks],
        "frame_age_spread": [t["frame_age_spread"] for t in tracks],
        "frame_gender": frame_ok,
    }


def _share(flags: Any) -> float:
    flags = list(flags)
    return round(sum(flags) / max(len(flags), 1), 3)


def _summarise(results: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """Per configuration, its clips' runs pooled: medians of speeds, sums and means of errors."""
    summary = {}
    for name, runs in results.items():
        pooled = [e for r in runs for e in r["pooled_errors"]]
        frame = [e for r in runs for e in r["frame_errors"]]
        summary[name] = {
            "x_real_time": round(statistics.median(r["duration"] / r["seconds"] for r in runs), 2),
            "frames_per_s": round(statistics.median(r["frames"] / r["seconds"] for r in runs), 1),
            "tracks": [r["tracks"] for r in runs],
            "faces_found": [r["faces_found"] for r in runs],
            "id_switches": sum(r["id_switches"] for r in runs),
            "pooled_mae": round(float(np.mean(pooled)), 2),
            "frame_mae": round(float(np.mean(frame)), 2),
            "pooled_gender": _share(g for r in runs for g in r["pooled_gender"]),
            "frame_gender": _share(g for r in runs for g in r["frame_gender"]),
            "age_spread": round(statistics.median(s for r in runs for s in r["age_spread"]), 2),
            "frame_age_spread": round(
                statistics.median(s for r in runs for s in r["frame_age_spread"]), 2
            ),
        }
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/UTKFace"))
    ap.add_argument("--cache", type=Path, default=Path("cache/utk128"))
    ap.add_argument("--clips", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    cv2.setNumThreads(a.threads)
    groups = pick_faces(a.data, a.cache, a.clips, a.seed)
    results: dict[str, list[dict]] = {f"{m} {d} every {k}": [] for m, d, k in CONFIGS}
    command: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for c, files in enumerate(groups):
            faces = [decode_rgb(f.read_bytes()) for f in files]
            labels = [parse_name(f.name) for f in files]
            scene = group_pan(faces)
            clip = write_video(scene.render(), Path(tmp) / f"clip{c}.mp4")
            duration = scene.frames / 25.0
            for model, detector, every in CONFIGS:
                r = run_clip(clip, scene, labels, model, detector, every, a.threads)
                r["duration"] = duration
                results[f"{model} {detector} every {every}"].append(r)
                print(f"clip {c} {model:8s} {detector:10s} every {every}: "
                      f"{duration / r['seconds']:.2f}x real time, {r['tracks']} tracks, "
                      f"pooled MAE {np.mean(r['pooled_errors']):.2f}, "
                      f"frame MAE {np.mean(r['frame_errors']):.2f}", flush=True)  # fmt: skip
            out = Path(tmp) / f"tracks{c}.jsonl"
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "agegender", "predict", str(clip), "--quiet",
                   "--output", str(out)]  # fmt: skip
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
            wall = time.perf_counter() - t0
            n = len(out.read_text().splitlines())
            command.append({"clip": c, "seconds": round(wall, 2), "duration": duration,
                            "tracks": n})  # fmt: skip
            print(f"clip {c} whole command: {wall:.1f} s for a {duration:.0f} s clip, {n} tracks")
    summary = _summarise(results)
    report = {
        "cpu": cpu_info(),
        "cpu_class": cpu_class(),
        "threads": a.threads,
        "load_average": os.getloadavg(),
        "clips": a.clips,
        "faces": [[f.name for f in g] for g in groups],
        "configs": summary,
        "command": command,
    }
    print(json.dumps({"cpu": report["cpu"]["name"], "configs": summary, "command": command},
                     indent=1))  # fmt: skip
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
