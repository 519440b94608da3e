"""What each face-detector setting costs and gains on photos: accuracy and time, side by side.

    python benchmarks/detector_accuracy.py [--data ../shared/data/UTKFace --cache cache/utk128]
        [--n 600 --roll 30 --threads 2 --seed 0] [--detector yunet:refine=2,flip=false ...]
        [--json F]

``--n`` aligned UTKFace faces of the test split of ``--cache`` (no bundled model trained on
them), a seeded sample, are pasted six at a time on 1280x886 photos, each at 180-250 px and
rolled by an angle drawn from [-``--roll``, ``--roll``] degrees, saved as JPEG (quality 90), and
given to ``Predictor.predict`` as a user's photo: decode, detect, align, the network. For each
detector setting (``yunet`` and ``yunet-fast``, or each ``--detector NAME[:KEY=VALUE,...]``, the
values as :func:`~agegender.detect.get_detector` takes them): how many faces it finds (a
detection whose box centre lies within a third of the face's side of where it was pasted),
gender accuracy and age MAE on them, the same on the faces every setting found (the paired
comparison), stray detections, and the median milliseconds per photo. As the reference, the same
faces through ``--aligned`` (UTKFace's own alignment, no detector). ``default`` model, the CPU's
precision (``precision=auto``).
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

from agegender.data import parse_name
from agegender.detect import get_detector, list_detectors
from agegender.errors import ConfigError
from agegender.images import decode_rgb
from agegender.predict import Predictor

CANVAS = (886, 1280)  # height, width: predict_speed's group photo
CELL = (443, 426)


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


def main() -> int:
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
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.n < 1 or args.roll < 0:
        print("detector_accuracy: --n must be positive and --roll not negative", file=sys.stderr)
        return 2
    files = test_files(Path(args.data), Path(args.cache), args.n, args.seed)
    labels = [parse_name(f.name) for f in files]
    rng = random.Random(args.seed)
    angles = [rng.uniform(-args.roll, args.roll) for _ in files]
    settings = args.detector or [(name, {}) for name in list_detectors()]
    predictors = {}
    for name, kwargs in settings:
        label = name + "".join(f" {k}={v}" for k, v in kwargs.items())
        # as Predictor.load(detector=...) has it: ONNX Runtime's idle threads sleep
        predictors[label] = Predictor.load(
            "default", threads=args.threads, detector=None, spin=False
        )
        try:
            predictors[label].detector = get_detector(name, **kwargs)
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
