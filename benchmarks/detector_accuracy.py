"""What each face-detector setting costs and gains on photos: accuracy and time, side by side.

    python benchmarks/detector_accuracy.py [--data ../shared/data/UTKFace --cache cache/utk128]
        [--n 600 --roll 30 --threads 2 --seed 0] [--detector yunet:refine=2,flip=false ...]
        [--json F]
    python benchmarks/detector_accuracy.py --rolls 0,15,30,45,60,75,90 [--n 60] [--json F]
    python benchmarks/detector_accuracy.py --megapixels 12,24,48 [--size-runs 3] [--json F]

``--n`` aligned UTKFace faces of the test split of ``--cache`` (no bundled model trained on
them), a seeded sample, are pasted six at a time on 1280x886 photos, each at 180-250 px and
rolled by an angle drawn from [-``--roll``, ``--roll``] degrees, saved as JPEG (quality 90), and
given to ``Predictor.predict`` as a user's photo: decode, detect, align, the network. For each
detector setting (``yunet`` and ``yunet-fast``, or each ``--detector NAME[:KEY=VALUE,...]``, the
values as :func:`~agegender.vision.detect.get_detector` takes them): how many faces it finds (a
detection whose box centre lies within a third of the face's side of where it was pasted),
gender accuracy and age MAE on them, the same on the faces every setting found (the paired
comparison), stray detections, and the median milliseconds per photo. As the reference, the same
faces through ``--aligned`` (UTKFace's own alignment, no detector). ``default`` model, the CPU's
precision (``precision=auto``).

``--rolls A,B,...``: instead, for each roll the same ``--n`` faces all rolled by it (alternately
clockwise and anticlockwise), through three detectors: ``before`` (the single upright 640 px pass
the detector had until it looked for small and rolled faces: ``min_face=None, tilt=0``),
``default`` (``yunet`` as shipped) and ``rotations`` (``Predictor.load(rotations=(90, 180,
270))``): the share of faces found, stray detections and the median milliseconds per photo.

``--megapixels M,N,...``: six of the faces at their native 200x200 pasted on a grey 4:3 canvas of
M megapixels (JPEG quality 90), ``before`` and ``default``: faces found and the median
milliseconds per photo (decode included: a photo over 40 MP is decoded at half its size) over
``--size-runs`` runs.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from predict_speed import (  # this folder: python puts a script's on the path
    GROUP_SIDES,
    cpu_record,
    emit,
    test_files,
)
from tqdm import tqdm

from agegender.core.errors import ConfigError
from agegender.data.utkface import parse_name
from agegender.inference.predictor import Predictor
from agegender.vision.detect import get_detector, list_detectors
from agegender.vision.images import MAX_PIXELS, decode_rgb

CANVAS = (886, 1280)  # height, width: predict_speed's group photo
CELL = (443, 426)
#: the detector as it was before it looked for small and rolled faces
BEFORE = {"min_face": None, "tilt": 0.0}


def photo(faces: list[np.ndarray], angles: list[float]) -> tuple[bytes, list[tuple]]:
    """Up to six faces rolled and pasted on a grey canvas, as JPEG bytes, and where each went:
    ``(centre x, centre y, side)``."""
    canvas = np.full((*CANVAS, 3), 200, np.uint8)
    where = []
    for k, (face, angle) in enumerate(zip(faces, angles)):
        side = GROUP_SIDES[k]
        col, row = k % 3, k // 3
        cx, cy = col * CELL[1] + CELL[1] / 2, row * CELL[0] + CELL[0] / 2
        h, w = face.shape[:2]
        m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, side / w)
        m[:, 2] += (cx - (w - 1) / 2, cy - (h - 1) / 2)
        # the crop's own background comes along, as in a photo; the canvas shows around it
        cv2.warpAffine(face, m, (CANVAS[1], CANVAS[0]), dst=canvas, flags=cv2.INTER_AREA,
                       borderMode=cv2.BORDER_TRANSPARENT)  # fmt: skip
        where.append((cx, cy, side))
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), where


def match(found: list, where: list[tuple]) -> tuple[list, int]:
    """For each pasted face, the nearest detection within a third of its side (or None), and
    how many detections matched no face."""
    used, out = set(), []
    for cx, cy, side in where:
        best, dist = None, side / 3
        for i, f in enumerate(found):
            x0, y0, x1, y1 = f.box
            d = math.hypot((x0 + x1) / 2 - cx, (y0 + y1) / 2 - cy)
            if i not in used and d < dist:
                best, dist = i, d
        out.append(None if best is None else found[best])
        if best is not None:
            used.add(best)
    return out, len(found) - len(used)


def scores(faces: list, labels: list) -> dict[str, Any]:
    pairs = [(f, lab) for f, lab in zip(faces, labels) if f is not None]
    if not pairs:
        return {"n": 0}
    return {
        "n": len(pairs),
        "gender_accuracy": round(
            float(np.mean([(f.gender == "female") == (lab.gender == 1) for f, lab in pairs])), 4
        ),
        "age_mae": round(float(np.mean([abs(f.age - lab.age) for f, lab in pairs])), 3),
    }


def detector_setting(text: str) -> tuple[str, dict[str, Any]]:
    """``"yunet:refine=1,flip=false"`` -> ``("yunet", {"refine": 1, "flip": False})``."""
    name, _, rest = text.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"{item!r}: expected KEY=VALUE")
        low = value.lower()
        kwargs[key] = low == "true" if low in ("true", "false") else json.loads(value)
    return name, kwargs


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="../shared/data/UTKFace")
    p.add_argument("--cache", default="cache/utk128", help="its test split gives the faces")
    p.add_argument("--n", type=int, default=600, help="faces, six to a photo")
    p.add_argument("--roll", type=float, default=30.0, help="largest roll, degrees")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--detector",
        action="append",
        type=detector_setting,
        help="a setting to compare, NAME[:KEY=VALUE,...] (repeatable; default: every name)",
    )
    p.add_argument("--rolls", type=numbers, help="roll sweep: degrees, e.g. 0,15,30,45,60,90")
    p.add_argument("--megapixels", type=numbers, help="size sweep: canvases, e.g. 12,24,48")
    p.add_argument("--size-runs", type=int, default=3, help="runs per canvas of the size sweep")
    p.add_argument("--json", default=None)
    return p.parse_args()


def numbers(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers, e.g. 0,30,45") from None


def loaded(threads: int, setting: dict[str, Any] | None = None, **options: Any) -> Predictor:
    """The default model; the detector ``yunet`` with ``setting`` when given, else as the
    options build it. ONNX Runtime's idle threads sleep, as ``Predictor.load(detector=...)``."""
    if setting is None:
        return Predictor.load("default", threads=threads, spin=False, **options)
    predictor = Predictor.load("default", threads=threads, detector=None, spin=False)
    predictor.detector = get_detector("yunet", **setting)
    return predictor


def table(title: str, head: list[str], rows: list[list[Any]]) -> None:
    """A Markdown table on stderr (stdout carries the JSON)."""
    print(f"\n{title}\n| " + " | ".join(head) + " |\n|" + "---|" * len(head), file=sys.stderr)
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |", file=sys.stderr)


def roll_sweep(files: list[Path], rolls: list[float], threads: int) -> dict[str, Any]:
    """Faces found, stray detections and ms per photo for each roll and detector."""
    predictors = {
        "before": loaded(threads, BEFORE),
        "default": loaded(threads, detector="yunet"),
        "rotations": loaded(threads, detector="yunet", rotations=(90, 180, 270)),
    }
    crops = [decode_rgb(f) for f in files]
    out: dict[str, Any] = {}
    for roll in rolls:
        angles = [roll if k % 2 == 0 else -roll for k in range(len(files))]
        found, stray = dict.fromkeys(predictors, 0), dict.fromkeys(predictors, 0)
        ms: dict[str, list[float]] = {name: [] for name in predictors}
        for start in tqdm(range(0, len(files), 6), desc=f"roll {roll:g}", unit="photo"):
            jpeg, where = photo(crops[start : start + 6], angles[start : start + 6])
            for name, predictor in predictors.items():
                t0 = time.perf_counter()
                faces = predictor.predict(jpeg)
                ms[name].append((time.perf_counter() - t0) * 1e3)
                matched, extra = match(faces, where)
                found[name] += sum(f is not None for f in matched)
                stray[name] += extra
        out[f"{roll:g}"] = {
            name: {
                "found": round(found[name] / len(files), 4),
                "stray_detections": stray[name],
                "median_ms_per_photo": round(statistics.median(ms[name]), 1),
            }
            for name in predictors
        }
    table(
        f"faces found by roll ({len(files)} faces, 1280x886 photos; ms per photo)",
        ["roll", *predictors],
        [
            [f"{r}"] + [f"{v['found']:.1%} ({v['median_ms_per_photo']:.0f} ms)" for v in d.values()]
            for r, d in out.items()
        ],
    )
    return out


def canvas_photo(faces: list[np.ndarray], megapixels: float) -> tuple[bytes, list[tuple]]:
    """Six native-size faces spread over a grey 4:3 canvas of ``megapixels``, as JPEG bytes."""
    w = round(math.sqrt(megapixels * 1e6 * 4 / 3))
    h = round(w * 3 / 4)
    canvas = np.full((h, w, 3), 200, np.uint8)
    where = []
    for k, face in enumerate(faces[:6]):
        side = face.shape[0]
        cx, cy = round((k % 3 + 0.5) * w / 3), round((k // 3 + 0.5) * h / 2)
        x, y = cx - side // 2, cy - side // 2
        canvas[y : y + side, x : x + face.shape[1]] = face
        where.append((x + side / 2, y + side / 2, side))
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), where


def size_sweep(files: list[Path], sizes: list[float], threads: int, runs: int) -> dict[str, Any]:
    """Six native 200 px faces on canvases of each size: found and ms per photo."""
    predictors = {"before": loaded(threads, BEFORE), "default": loaded(threads, detector="yunet")}
    crops = [decode_rgb(f) for f in files[:6]]
    out: dict[str, Any] = {}
    for mp in tqdm(sizes, desc="canvases", unit="canvas"):
        jpeg, where = canvas_photo(crops, mp)
        row: dict[str, Any] = {"decoded_shrunk": mp * 1e6 > MAX_PIXELS}
        for name, predictor in predictors.items():
            ms, found, stray = [], 0, 0
            for _ in range(runs):
                t0 = time.perf_counter()
                faces = predictor.predict(jpeg)
                ms.append((time.perf_counter() - t0) * 1e3)
                matched, stray = match(faces, where)
                found = sum(f is not None for f in matched)
            row[name] = {
                "found": found,
                "stray_detections": stray,
                "median_ms_per_photo": round(statistics.median(ms), 1),
            }
        out[f"{mp:g}"] = row
    table(
        "six 200 px faces on an M-megapixel canvas: found of 6 (ms per photo, decode included)",
        ["MP", *predictors],
        [
            [m] + [f"{d[n]['found']}/6 ({d[n]['median_ms_per_photo']:.0f} ms)" for n in predictors]
            for m, d in out.items()
        ],
    )
    return out


def sweeps(args: argparse.Namespace, files: list[Path]) -> dict[str, Any]:
    """The ``--rolls`` and ``--megapixels`` tables."""
    out: dict[str, Any] = {"cpu": cpu_record(), "threads": args.threads, "faces": len(files)}
    if args.rolls:
        out["by_roll"] = roll_sweep(files, args.rolls, args.threads)
    if args.megapixels:
        out["by_megapixels"] = size_sweep(files, args.megapixels, args.threads, args.size_runs)
    return out


def main() -> int:
    args = parse_args()
    if args.n < 1 or args.roll < 0 or args.size_runs < 1:
        print(
            "detector_accuracy: --n and --size-runs must be positive and --roll not negative",
            file=sys.stderr,
        )
        return 2
    if args.megapixels and not all(0.5 <= mp <= 150 for mp in args.megapixels):
        print("detector_accuracy: --megapixels must be within 0.5-150", file=sys.stderr)
        return 2
    files = test_files(Path(args.data), Path(args.cache), args.n, args.seed)
    if args.rolls or args.megapixels:
        emit(sweeps(args, files), args.json)
        return 0
    return compare_settings(args, files)


def setting_predictors(args: argparse.Namespace) -> dict[str, Predictor]:
    """One predictor per ``--detector`` setting (default: each name), by its label."""
    predictors = {}
    for name, kwargs in args.detector or [(name, {}) for name in list_detectors()]:
        label = name + "".join(f" {k}={v}" for k, v in kwargs.items())
        # as Predictor.load(detector=...) has it: ONNX Runtime's idle threads sleep
        predictors[label] = Predictor.load(
            "default", threads=args.threads, detector=None, spin=False
        )
        predictors[label].detector = get_detector(name, **kwargs)
    return predictors


def compare_settings(args: argparse.Namespace, files: list[Path]) -> int:
    """The detector settings side by side on photos rolled up to ``--roll`` (the default)."""
    labels = [parse_name(f.name) for f in files]
    rng = random.Random(args.seed)
    angles = [rng.uniform(-args.roll, args.roll) for _ in files]
    try:
        predictors = setting_predictors(args)
    except ConfigError as e:
        print(f"detector_accuracy: --detector: {e}", file=sys.stderr)
        return 2
    detectors = list(predictors)
    aligned = Predictor.load("default", threads=args.threads, detector=None)
    found: dict[str, list] = {d: [] for d in detectors}
    stray = dict.fromkeys(detectors, 0)
    ms: dict[str, list[float]] = {d: [] for d in detectors}
    reference = []
    for start in tqdm(range(0, len(files), 6), desc="photos", unit="photo"):
        crops = [decode_rgb(f) for f in files[start : start + 6]]
        jpeg, where = photo(crops, angles[start : start + 6])
        reference += [aligned.predict(c, aligned=True)[0] for c in crops]
        turn = (start // 6) % len(detectors)  # each setting first in turn
        for d in detectors[turn:] + detectors[:turn]:
            t0 = time.perf_counter()
            faces = predictors[d].predict(jpeg)
            ms[d].append((time.perf_counter() - t0) * 1e3)
            matched, extra = match(faces, where)
            found[d] += matched
            stray[d] += extra
    everywhere = [all(found[d][i] is not None for d in detectors) for i in range(len(files))]
    out: dict[str, Any] = {
        "cpu": cpu_record(),
        "threads": args.threads,
        "faces": len(files),
        "photos": len(ms[detectors[0]]),
        "roll_degrees": args.roll,
        "aligned": scores(reference, labels),
        "aligned_on_found_by_all": scores(
            [r if e else None for r, e in zip(reference, everywhere)], labels
        ),
    }
    for d in detectors:
        out[d] = {
            "found": sum(f is not None for f in found[d]),
            "stray_detections": stray[d],
            "on_found": scores(found[d], labels),
            "on_found_by_all": scores(
                [f if e else None for f, e in zip(found[d], everywhere)], labels
            ),
            "median_ms_per_photo": round(statistics.median(ms[d]), 1),
        }
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
