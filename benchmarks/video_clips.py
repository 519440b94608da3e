"""Persons counted on clips made to break a tracker: people who leave the picture and come
back, and face-like clutter a fast detector takes for faces at low resolution.

    python benchmarks/video_clips.py [--data ../shared/data/UTKFace --clips 3 --threads 2
        --json reports/speed/video_clips.json]

Six UTKFace faces of the committed split's test part (three of each gender, ages 5 and up,
seeded; no bundled model trained on them) stand as in a group photo on a cluttered canvas
(:func:`clutter`: bright round blobs, bowls, glasses, textured patches). Two clips per group,
written as MP4 and read back as a user's video is, tracked by ``Predictor.track`` with the
video defaults (yunet-fast, detection on every 2nd frame):

- ``pan``: 12 s at 640x360, the camera panning back and forth over the group so that each
  person leaves the picture and comes back (out for 0.5-4 s);
- ``drift``: 10 s at 640x442, the whole group in view, zoom 1.0-1.1 and a few px of motion,
  faces ~50 px and the clutter's face-like things ~25 px;
- ``small``: the same with faces of ~25 px, as small as the clutter: real small faces must
  still be persons.

On the pan clips, tracking once more without re-identification gives the cosine distances
between the pooled signatures of one person's visits (``reid_same_*``) and of different
persons (``reid_other_*``), the data ``REID_MAX_DIST`` is set on.

Per clip: ``persons`` (tracks reported; right when 6), ``false_tracks`` (tracks lying on no
face for most of their frames, also per minute), ``fragments`` (tracks beyond one per face),
``id_switches`` (frames where a track lies on another face than its own, in events),
``gender_right`` (tracks on faces, pooled; "?" counts as wrong), ``returns`` (lost tracks
continued by a face that came back), ``joined`` (of those, ids already shown) and
``x_real_time`` (clip duration over wall time; above 1 is faster than real time).
"""

from __future__ import annotations

import argparse
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
from typing import Any

import cv2
import numpy as np
from video_speed import groups_of_six  # this folder: python puts a script's on the path

from agegender.data.synthetic import Scene, background, write_video
from agegender.data.utkface import parse_name
from agegender.inference.predictor import Predictor
from agegender.inference.runtime import cpu_class, cpu_info
from agegender.vision.detect import iou
from agegender.vision.images import decode_rgb

sys.path.insert(0, str(Path(__file__).parent))

SPLITS = Path(__file__).resolve().parents[1] / "splits/utkface.csv"
FPS = 25.0


def pick_faces(data: Path, clips: int, seed: int) -> list[list[Path]]:
    """``clips`` groups of six test-split faces, three of each gender, ages 5 and up."""
    with open(SPLITS, newline="") as f:
        names = sorted(r["name"] for r in csv.DictReader(f) if r["split"] == "test")
    return groups_of_six(names, data, clips, seed)


# --------------------------------------------------------------------------- clips


def clutter(width: int, height: int, keep_out: list[tuple[float, float, float]], side: float,
            seed: int = 0) -> np.ndarray:  # fmt: skip
    """A textured canvas strewn with face-sized things that are not faces: shaded bright
    disks, bowls (a dark rim, a bright inside, two highlights), glasses (an upright ellipse
    with a rim and a reflection) and patches of texture, about ``side`` px across, none over
    the faces' spots ``keep_out`` (centre x, centre y, side)."""
    rng = np.random.default_rng(seed)
    img = background(width, height, seed=seed + 3).astype(np.float32)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    placed = 0
    while placed < 40:
        cx, cy = rng.uniform(side, width - side), rng.uniform(side, height - side)
        if any(abs(cx - fx) < 0.6 * (fs + side) and abs(cy - fy) < 0.6 * (fs + side)
               for fx, fy, fs in keep_out):  # fmt: skip
            continue
        r = side * rng.uniform(0.35, 0.6)
        d2 = ((x - cx) ** 2 + (y - cy) ** 2) / (r * r)
        kind = placed % 4
        colour = rng.uniform(150, 255, 3)
        if kind == 0:  # a shaded bright disk (a lamp, a plate, a ball)
            shade = np.clip(1.2 - 0.5 * ((x - cx + 0.3 * r) ** 2 + (y - cy + 0.3 * r) ** 2)
                            / (r * r), 0, 1)[..., None]  # fmt: skip
            img = np.where((d2 < 1)[..., None], colour * shade, img)
        elif kind == 1:  # a bowl: dark rim, bright inside, two highlights
            img = np.where((d2 < 1)[..., None], colour * 0.35, img)
            img = np.where((d2 < 0.7)[..., None], colour, img)
            for hx in (-0.35, 0.35):
                dh = ((x - cx - hx * r) ** 2 + (y - cy + 0.2 * r) ** 2) / (0.12 * r) ** 2
                img = np.where((dh < 1)[..., None], 40.0, img)
            dm = ((x - cx) / (0.4 * r)) ** 2 + ((y - cy - 0.35 * r) / (0.1 * r)) ** 2
            img = np.where((dm < 1)[..., None], 60.0, img)
        elif kind == 2:  # a glass: an upright ellipse, rim and reflection
            de = ((x - cx) / (0.7 * r)) ** 2 + ((y - cy) / r) ** 2
            img = np.where((de < 1)[..., None], 0.6 * img + 0.4 * colour, img)
            img = np.where(((de > 0.8) & (de < 1))[..., None], 30.0, img)
            dr = ((x - cx + 0.3 * r) / (0.1 * r)) ** 2 + ((y - cy) / (0.6 * r)) ** 2
            img = np.where((dr < 1)[..., None], 250.0, img)
        else:  # a patch of texture
            noise = rng.uniform(0, 255, (int(2 * r) + 1, int(2 * r) + 1, 3)).astype(np.float32)
            noise = cv2.GaussianBlur(noise, (0, 0), 1.5)
            x0, y0 = int(cx - r), int(cy - r)
            h, w = img[y0 : y0 + noise.shape[0], x0 : x0 + noise.shape[1]].shape[:2]
            img[y0 : y0 + h, x0 : x0 + w] = noise[:h, :w]
        placed += 1
    return img.clip(0, 255).astype(np.uint8)


def _group(spots: list[tuple[float, float]], sides: list[float]) -> list:
    return [
        (lambda t, x=x, y=y, s=s: (x + 6 * math.sin(7 * t), y + 4 * math.cos(5 * t), s))
        for (x, y), s in zip(spots, sides)
    ]


def pan_clip(faces: list[np.ndarray], seconds: float = 12.0) -> Scene:
    """640x360: the camera pans along the group to one end, back and there again, every
    person leaving the picture at one end of the pan and coming back."""
    spots = [(600, 250), (800, 235), (1000, 255), (620, 440), (810, 450), (990, 430)]
    sides = [150, 160, 145, 155, 150, 160]
    canvas = clutter(1600, 720, [(x, y, s) for (x, y), s in zip(spots, sides)], 70, seed=1)

    def camera(t: float) -> tuple[float, float, float, float]:
        # from the left end to the right, back, and right again: 4 s a way, 15 px a frame
        x0 = 480 - 480 * math.cos(3 * math.pi * t)
        return x0, 160 + 10 * math.sin(3 * t), 640.0, 360.0

    n = round(seconds * FPS)
    return Scene(faces, _group(spots, sides), n, (640, 360), canvas, camera)


def drift_clip(faces: list[np.ndarray], seconds: float = 10.0, scale: float = 1.0) -> Scene:
    """640x442: the whole group in view, drifting a few px and zooming 1.0-1.1 over the
    clutter (faces ~50 px times ``scale``, the clutter's things ~25 px)."""
    spots = [(430, 340), (650, 320), (870, 345), (450, 570), (660, 585), (860, 565)]
    sides = [scale * s for s in (100, 108, 96, 104, 100, 106)]
    # a margin round the first frame's window, for the drift
    canvas = clutter(1300, 900, [(x, y, s) for (x, y), s in zip(spots, sides)], 50, seed=2)

    def camera(t: float) -> tuple[float, float, float, float]:
        zoom = 1.0 + 0.1 * (0.5 - 0.5 * math.cos(2 * math.pi * t))
        w, h = 1280 / zoom, 884 / zoom
        return (1300 - w) / 2 + 6 * math.sin(5 * t), (900 - h) / 2 + 4 * math.cos(4 * t), w, h

    n = round(seconds * FPS)
    return Scene(faces, _group(spots, sides), n, (640, 442), canvas, camera)


#: the clips made of each group: what they are for is in the module's docstring
KINDS = {
    "pan": pan_clip,
    "drift": drift_clip,
    "small": lambda faces: drift_clip(faces, scale=0.5),  # real faces of ~25 px: kept?
}


# --------------------------------------------------------------------------- scoring


def score(scene: Scene, results: list, tracks: list[dict], labels: list) -> dict[str, Any]:
    """What the tracks got right against the scene's known faces (see the module)."""
    owners: dict[int, Counter] = {}  # track id -> face index (-1: none) -> frames
    for r in results:
        truth = scene.boxes(r.index)
        boxes = np.array([b if b is not None else (0, 0, 0, 0) for b in truth], np.float64)
        for tid, face in r.faces:
            if tid is None:
                continue
            overlap = iou(np.array([face.box], np.float64), boxes.reshape(-1, 4))[0]
            k = int(overlap.argmax()) if overlap.size and overlap.max() > 0.3 else -1
            owners.setdefault(tid, Counter())[k] += 1
    reported = {t["track"]: t for t in tracks}
    majority = {tid: c.most_common(1)[0][0] for tid, c in owners.items() if tid in reported}
    per_face = Counter(k for k in majority.values() if k >= 0)
    # a switch: a track's frames on another face than its own, counted in runs of frames
    switches = sum(n for tid, c in owners.items() if tid in majority
                   for k, n in c.items() if k >= 0 and k != majority[tid])  # fmt: skip
    right = [reported[tid]["gender"] == ("female" if labels[k][1] == 1 else "male")
             for tid, k in majority.items() if k >= 0]  # fmt: skip
    false = [tid for tid, k in majority.items() if k < 0]
    return {
        "persons": len(tracks),
        "faces_found": len(per_face),
        "false_tracks": len(false),
        "false_track_frames": [sum(owners[t].values()) for t in false],
        "fragments": sum(n - 1 for n in per_face.values()),
        "id_switch_frames": switches,
        "gender_right": sum(right),
        "tracks_on_faces": len(right),
        "joined": sum(len(t.get("joined", [])) for t in tracks),
        "returns": sum(t.get("returns", 0) for t in tracks),
    }


def reid_distances(predictor: Predictor, path: Path, scene: Scene) -> dict[str, list[float]]:
    """Cosine distances between the pooled signatures of tracks made without
    re-identification, ``same`` face (a person's visits) and ``other`` faces: the data
    ``REID_MAX_DIST`` is set on."""
    tracking = predictor.track(path)
    tracking.tracker.reid_window_s = 0.0
    results = list(tracking)
    owner = {}
    for r in results:
        truth = scene.boxes(r.index)
        boxes = np.array([b if b is not None else (0, 0, 0, 0) for b in truth], np.float64)
        for tid, face in r.faces:
            overlap = iou(np.array([face.box], np.float64), boxes)[0]
            if tid is not None and overlap.max() > 0.3:
                owner.setdefault(tid, Counter())[int(overlap.argmax())] += 1
    done = [t for t in tracking.tracker.ended + tracking.tracker.active
            if t.confirmed and t.signature is not None and t.id in owner]  # fmt: skip
    out: dict[str, list[float]] = {"same": [], "other": []}
    for i, a in enumerate(done):
        for b in done[i + 1 :]:
            same = owner[a.id].most_common(1)[0][0] == owner[b.id].most_common(1)[0][0]
            d = 1 - float(a.signature @ b.signature) / float(
                np.linalg.norm(a.signature) * np.linalg.norm(b.signature)
            )
            out["same" if same else "other"].append(round(d, 4))
    return out


def run_clip(predictor: Predictor, path: Path, scene: Scene, labels: list) -> dict[str, Any]:
    tracking = predictor.track(path)
    t0 = time.perf_counter()
    results = list(tracking)
    wall = time.perf_counter() - t0
    out = score(scene, results, tracking.tracks, labels)
    duration = scene.frames / FPS
    out.update(seconds=round(wall, 2), duration=duration,
               x_real_time=round(duration / wall, 2),
               false_per_min=round(60 * out["false_tracks"] / duration, 1))  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/UTKFace"))
    ap.add_argument("--clips", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--label", default="", help="a name for this run in the JSON")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    cv2.setNumThreads(a.threads)
    predictor = Predictor.load("default", detector="yunet-fast", threads=a.threads)
    runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory() as tmp:
        for c, files in enumerate(pick_faces(a.data, a.clips, a.seed)):
            faces = [decode_rgb(f.read_bytes()) for f in files]
            labels = [parse_name(f.name) for f in files]
            for kind, make in KINDS.items():
                scene = make(faces)
                clip = write_video(scene.render(), Path(tmp) / f"{kind}{c}.mp4")
                r = run_clip(predictor, clip, scene, labels)
                if kind == "pan":
                    r["distances"] = reid_distances(predictor, clip, scene)
                runs[kind].append(r)
                print(f"clip {c} {kind:5s}: {r['persons']} persons ({r['faces_found']} faces, "
                      f"{r['false_tracks']} false, {r['fragments']} fragments, "
                      f"{r['id_switch_frames']} switch frames, {r['returns']} returns), "
                      f"gender {r['gender_right']}/{r['tracks_on_faces']}, "
                      f"{r['x_real_time']:.2f}x real time",
                      flush=True)  # fmt: skip
    summary = {kind: _summary(rs) for kind, rs in runs.items()}
    _table(summary)
    report = {"label": a.label, "cpu": cpu_info(), "cpu_class": cpu_class(),
              "threads": a.threads, "load_average": os.getloadavg(), "clips": runs,
              "summary": summary}  # fmt: skip
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = a.json.with_suffix(".tmp")
        tmp_path.write_text(json.dumps(report, indent=1) + "\n")
        os.replace(tmp_path, a.json)  # atomic: a reader never sees half a report
    return 0


def _summary(rs: list[dict]) -> dict[str, Any]:
    minutes = sum(r["duration"] for r in rs) / 60
    out = {
        "persons": [r["persons"] for r in rs],
        "exactly_6": sum(r["persons"] == 6 and r["faces_found"] == 6 for r in rs),
        "false_tracks": sum(r["false_tracks"] for r in rs),
        "false_per_min": round(sum(r["false_tracks"] for r in rs) / minutes, 1),
        "fragments": sum(r["fragments"] for r in rs),
        "id_switch_frames": sum(r["id_switch_frames"] for r in rs),
        "gender_right": f"{sum(r['gender_right'] for r in rs)}/"
        f"{sum(r['tracks_on_faces'] for r in rs)}",
        "joined": sum(r["joined"] for r in rs),
        "returns": sum(r["returns"] for r in rs),
        "x_real_time": round(statistics.median(r["x_real_time"] for r in rs), 2),
    }
    same = [d for r in rs for d in r.get("distances", {}).get("same", [])]
    other = [d for r in rs for d in r.get("distances", {}).get("other", [])]
    if same and other:  # the signatures of one person's visits against other persons'
        out["reid_same_max"], out["reid_other_min"] = max(same), min(other)
        out["reid_same_median"] = round(statistics.median(same), 4)
        out["reid_other_median"] = round(statistics.median(other), 4)
    return out


def _table(summary: dict[str, dict]) -> None:
    cols = ("persons", "exactly_6", "false_tracks", "false_per_min", "fragments",
            "id_switch_frames", "gender_right", "returns", "joined", "x_real_time")  # fmt: skip
    print(f"CPU: {cpu_info().get('name')}  load {os.getloadavg()[0]:.1f}")
    print("clip  | " + " | ".join(cols))
    for kind, s in summary.items():
        print(f"{kind:5s} | " + " | ".join(str(s[c]) for c in cols))


if __name__ == "__main__":
    sys.exit(main())
