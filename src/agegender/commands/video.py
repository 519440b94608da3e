"""``agegender predict VIDEO`` and ``--camera N``: one line per person tracked through a
video, and optionally every frame's boxes, a CSV and the annotated video."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from agegender import fileio
from agegender.errors import DataError
from agegender.predict import FrameResult, Predictor
from agegender.video import DETECT_EVERY, DETECTOR

TRACK_COLUMNS = (
    "track", "first_frame", "last_frame", "start_s", "end_s", "frames", "best_frame", "age",
    "age_low", "age_high", "gender", "p_female", "age_spread", "frame_age_spread",
    "x0", "y0", "x1", "y1",
)  # fmt: skip


def predict_video(
    source: str | os.PathLike | int | Iterable[np.ndarray],
    model: str = "default",
    output: str | os.PathLike | None = None,
    frames_out: str | os.PathLike | None = None,
    csv_out: str | os.PathLike | None = None,
    annotate_out: str | os.PathLike | None = None,
    fps: float | None = None,
    detect_every: int = DETECT_EVERY,
    detector: str = DETECTOR,
    quiet: bool = False,
    **load: Any,
) -> int:
    """The ``agegender predict VIDEO`` (or ``--camera N``) command: track every face of
    ``source`` and write what was asked: ``output`` one JSON object per person, ``frames_out``
    one per sampled frame, ``csv_out`` the persons as CSV, ``annotate_out`` the video with
    boxes, track ids and each person's running estimate. Without ``output`` the persons are
    printed. ``detector``: video's default is ``yunet-fast``, since pooling over frames makes
    up for its coarser landmarks (``benchmarks/video_speed.py`` measures both); ``load`` goes
    to :meth:`Predictor.load`. Returns the exit code: 0, or 130 when a file's reading is
    interrupted (what was found so far is written all the same; Ctrl-C is how a camera
    ends, so 0 there)."""
    for path in (output, frames_out, csv_out, annotate_out):
        if path is not None and Path(path).is_dir():
            raise DataError(f"{path} is a folder: give a file's name")
    if annotate_out is not None and Path(annotate_out).suffix.lower() != ".mp4":
        raise DataError(f"--annotate {annotate_out}: a video's annotation is an .mp4 file")
    if isinstance(source, (str, os.PathLike)):
        for path in (output, frames_out, csv_out, annotate_out):
            if path is not None and Path(path).resolve() == Path(source).resolve():
                raise DataError(f"{path} is the input video: choose another name")
    predictor = Predictor.load(model, detector=detector, **load)
    tracking = predictor.track(source, fps=fps, detect_every=detect_every)
    frame_log = open(fileio.temp_path(frames_out), "w") if frames_out else None  # noqa: SIM115
    writer = None
    if isinstance(source, int):
        name = f"camera {source}"
    else:
        name = Path(source).name if isinstance(source, (str, os.PathLike)) else "frames"
    bar = tqdm(desc=name, unit="frame", disable=quiet, leave=False, file=sys.stderr)
    code, t0, n = 0, time.perf_counter(), 0
    try:
        for result in tracking:
            n += 1
            bar.update()
            if frame_log:
                frame_log.write(json.dumps(_frame_record(result)) + "\n")
            if annotate_out is not None:
                writer = writer or _writer(annotate_out, tracking.rate, fps, tracking)
                writer.write(_draw(tracking.last_rgb, result, tracking))
    except KeyboardInterrupt:  # how a camera is stopped; a file's persons so far are kept
        code = 0 if isinstance(source, int) else 130
        if code:
            msg = "agegender predict: interrupted; the persons seen so far are kept"
            print(msg, file=sys.stderr)
    finally:
        bar.close()
        if writer is not None:
            writer.release()
        if frame_log:
            frame_log.close()
            fileio.replace(fileio.temp_path(frames_out), frames_out)
    tracks = tracking.tracks
    if n == 0 and not isinstance(source, int):
        raise DataError(f"{name}: no frame could be read (an empty or damaged video)")
    _write_tracks(tracks, output, csv_out)
    if output is None:
        _print_tracks(name, tracks, n, time.perf_counter() - t0)
    return code


def _frame_record(r: FrameResult) -> dict[str, Any]:
    faces = [{"track": tid, **f.to_dict()} for tid, f in r.faces]
    carried = [{"track": tid, "box": [round(v, 1) for v in box]} for tid, box in r.carried]
    return {"frame": r.index, "time_s": round(r.time_s, 3), "detected": r.detected,
            "faces": faces or carried}  # fmt: skip


def _write_tracks(tracks: list[dict], output: Any, csv_out: Any) -> None:
    if output is not None:
        fileio.write_text(output, "".join(json.dumps(t) + "\n" for t in tracks))
    if csv_out is not None:
        with fileio.atomic_write(csv_out, newline="") as f:
            w = csv.writer(f)
            w.writerow(TRACK_COLUMNS)
            for t in tracks:
                low, high = t.get("age_interval") or ("", "")
                row = {**t, "age_low": low, "age_high": high}
                row.update(zip(("x0", "y0", "x1", "y1"), t["box"]))
                w.writerow([row[k] for k in TRACK_COLUMNS])


def _print_tracks(name: str, tracks: list[dict], frames: int, seconds: float) -> None:
    print(f"{name}: {len(tracks)} person{'s' * (len(tracks) != 1)} in {frames} frames "
          f"({frames / max(seconds, 1e-9):.1f} frames/s)")  # fmt: skip
    for t in tracks:
        iv = t.get("age_interval")
        span = f" ({iv[0]:.0f}-{iv[1]:.0f})" if iv else ""
        when = f"{t['start_s']:.1f}-{t['end_s']:.1f} s, {t['frames']} frames"
        print(f"  #{t['track']:<3d} {t['gender']:6s} p_female {t['p_female']:.2f}  age "
              f"{t['age']:4.1f}{span}  {when}")  # fmt: skip


def _writer(path: Any, rate: float, fps: float | None, tracking: Any) -> cv2.VideoWriter:
    h, w = tracking.last_rgb.shape[:2]
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps or rate, (w, h))
    if not out.isOpened():
        raise DataError(f"--annotate {path}: cannot write a video there")
    return out


def _draw(rgb: np.ndarray, r: FrameResult, tracking: Any) -> np.ndarray:
    """The frame (BGR, for OpenCV) with each face's box, track id and running estimate."""
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    running = {t.id: t.evidence.estimate() for t in tracking.tracker.active}
    items: list[tuple[int | None, tuple]] = [(tid, f.box) for tid, f in r.faces]
    items += [(tid, box) for tid, box in r.carried]
    for tid, box in items:
        est = running.get(tid) if tid is not None else None
        colour = (120, 60, 230) if est and est["gender"] == "female" else (230, 120, 40)
        x0, y0, x1, y1 = (round(float(v)) for v in box)
        cv2.rectangle(bgr, (x0, y0), (x1, y1), colour, 2)
        label = "?" if tid is None else f"#{tid}"
        if est:
            label += f" {'F' if est['gender'] == 'female' else 'M'} {est['age']:.0f}"
            if est["age_interval"]:
                label += f" ({est['age_interval'][0]:.0f}-{est['age_interval'][1]:.0f})"
        cv2.putText(bgr, label, (x0, max(y0 - 6, 12)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, 2)
    return bgr
