"""``agegender predict VIDEO`` and ``--camera N``: one line per person tracked through a
video, and optionally every frame's boxes, a CSV and the annotated video."""

from __future__ import annotations

import contextlib
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
from PIL import Image, ImageDraw

from agegender.cli.photos import STDOUT, csv_cell, output_format, shown
from agegender.core import fileio
from agegender.core.errors import ConfigError, DataError
from agegender.core.progress import progress_bar
from agegender.inference import draw
from agegender.inference.options import InferenceOptions
from agegender.inference.tracking import DETECT_EVERY, FrameResult
from agegender.training.loading import open_predictor

TRACK_COLUMNS = (
    "track", "first_frame", "last_frame", "start_s", "end_s", "frames", "best_frame", "age",
    "age_low", "age_high", "gender", "p_female", "age_spread", "frame_age_spread",
    "x0", "y0", "x1", "y1", "returns", "joined", "low_quality_frames",
)  # fmt: skip
#: the smallest label text (px) on the annotated video: read while it plays, not paused
VIDEO_TEXT_PX = 20


def predict_video(
    source: str | os.PathLike | int | Iterable[np.ndarray],
    options: InferenceOptions,
    *,
    output: str | os.PathLike | None = None,
    frames_out: str | os.PathLike | None = None,
    csv_out: str | os.PathLike | None = None,
    annotate_out: str | os.PathLike | None = None,
    fps: float | None = None,
    detect_every: int = DETECT_EVERY,
    quiet: bool = False,
) -> int:
    """The ``agegender predict VIDEO`` (or ``--camera N``) command: track every face of
    ``source`` and write what was asked: ``output`` the persons, as JSON lines (``.jsonl``,
    ``.json``, or ``-`` for stdout) or a CSV (``.csv``) by its extension; ``frames_out`` one
    JSON object per sampled frame; ``csv_out`` the persons as CSV; ``annotate_out`` the video
    (``.mp4``) with boxes, track ids and each person's running estimate. Without ``output``
    the persons are printed. The detector is ``options.detector_for("video")`` (``auto``:
    yunet-fast, since pooling over frames makes up for its coarser landmarks:
    ``benchmarks/video_speed.py``).

    Every file is written beside its target and moved into place at the end; none may replace
    the input video (by identity: a hard link too) or an existing file of another kind
    (:func:`agegender.core.fileio.check_output`), which is refused before the model loads.
    Returns the exit code: 0, or 130 when a file's reading is interrupted (what was found so
    far is written all the same; Ctrl-C is how a camera ends, so 0 there)."""
    targets = _check_outputs(source, output, frames_out, csv_out, annotate_out)
    predictor = open_predictor(options.replace(detector=options.detector_for("video")))
    tracking = predictor.track(source, fps=fps, detect_every=detect_every)
    name = _name(source)
    t0 = time.perf_counter()
    n, code = _follow(tracking, targets, name, fps, quiet, camera=isinstance(source, int))
    if n == 0 and not isinstance(source, int):
        raise DataError(f"{shown(name)}: no frame could be read (an empty or damaged video)")
    _write_tracks(tracking.tracks, targets)
    if output is None:
        _print_tracks(name, tracking.tracks, n, time.perf_counter() - t0)
    return code


def _name(source: Any) -> str:
    if isinstance(source, int):
        return f"camera {source}"
    return Path(source).name if isinstance(source, (str, os.PathLike)) else "frames"


def _check_outputs(source: Any, output: Any, frames_out: Any, csv_out: Any,
                   annotate_out: Any) -> dict[str, Any]:  # fmt: skip
    """Each output's target and kind, refused now if it would replace what it must not."""
    inputs = [source] if isinstance(source, (str, os.PathLike)) else []
    if annotate_out is not None and Path(annotate_out).suffix.lower() != ".mp4":
        raise DataError(f"--annotate {annotate_out}: a video's annotation is an .mp4 file")
    targets: dict[str, Any] = {"stdout": output is not None and str(output) == STDOUT}
    if output is not None and not targets["stdout"]:
        kind = output_format(output)
        targets["jsonl" if kind == "JSON lines" else "csv"] = (output, "--output")
    if csv_out is not None:
        if "csv" in targets:
            raise ConfigError("--output FILE.csv is the CSV already: leave out --csv")
        targets["csv"] = (csv_out, "--csv")
    if frames_out is not None:
        targets["frames"] = (frames_out, "--frames")
    if annotate_out is not None:
        targets["annotate"] = (annotate_out, "--annotate")
    ids = fileio.file_ids(inputs)
    for key, kind in KINDS.items():
        if key in targets:
            path, what = targets[key]
            targets[key] = (fileio.check_output(path, kind, ids, what), what, ids)
    return targets


#: each output's kind (what it may replace)
KINDS = {"jsonl": "JSON lines", "csv": "CSV", "frames": "JSON lines", "annotate": "video"}


def _open(stack: contextlib.ExitStack, targets: dict[str, Any], key: str, **kw: Any) -> Any:
    path, what, ids = targets[key]
    return stack.enter_context(fileio.output_path(path, KINDS[key], ids, what, **kw))


def _follow(tracking: Any, targets: dict[str, Any], name: str, fps: float | None, quiet: bool,
            camera: bool) -> tuple[int, int]:  # fmt: skip
    """Run the tracking to its end, writing the frames' log and the annotated video as it
    goes; returns ``(frames read, exit code)``."""
    bar = progress_bar(desc=shown(name), unit="frame", quiet=quiet)
    n, code, writer = 0, 0, None
    with contextlib.ExitStack() as stack:
        stack.callback(bar.close)
        frame_log = None
        if "frames" in targets:
            frame_log = stack.enter_context(
                open(_open(stack, targets, "frames"), "w", encoding="utf-8")
            )
        video = _open(stack, targets, "annotate") if "annotate" in targets else None
        try:
            for result in tracking:
                n += 1
                bar.update()
                if frame_log:
                    frame_log.write(json.dumps(_frame_record(result)) + "\n")
                if video is not None:
                    if writer is None:
                        writer = _writer(video, tracking.rate, fps, tracking)
                        stack.callback(writer.release)  # before the file is moved: LIFO
                    writer.write(_draw(tracking.last_rgb, result, tracking))
        except KeyboardInterrupt as e:  # how a camera is stopped; a file's persons so far are kept
            if not camera or type(e) is not KeyboardInterrupt:  # SIGTERM ends a camera too
                code = 130
                print("agegender predict: interrupted; the persons seen so far are kept",
                      file=sys.stderr)  # fmt: skip
    return n, code


def _frame_record(r: FrameResult) -> dict[str, Any]:
    faces = [{"track": tid, **f.to_dict()} for tid, f in r.faces]
    carried = [{"track": tid, "box": [round(v, 1) for v in box]} for tid, box in r.carried]
    return {"frame": r.index, "time_s": round(r.time_s, 3), "detected": r.detected,
            "faces": faces or carried}  # fmt: skip


def _write_tracks(tracks: list[dict], targets: dict[str, Any]) -> None:
    if targets["stdout"]:
        sys.stdout.writelines(json.dumps(t) + "\n" for t in tracks)
    if "jsonl" in targets:
        path, what, ids = targets["jsonl"]
        with fileio.output_file(path, "JSON lines", ids, what) as f:
            f.writelines(json.dumps(t) + "\n" for t in tracks)
    if "csv" in targets:
        path, what, ids = targets["csv"]
        with fileio.output_file(path, "CSV", ids, what, newline="") as f:
            w = csv.writer(f)
            w.writerow(TRACK_COLUMNS)
            for t in tracks:
                low, high = t.get("age_interval") or ("", "")
                row = {**t, "age_low": low, "age_high": high}
                row["joined"] = " ".join(map(str, t.get("joined", ())))  # ids merged into it
                row.update(zip(("x0", "y0", "x1", "y1"), t["box"]))
                w.writerow([csv_cell(row[k]) for k in TRACK_COLUMNS])


def _print_tracks(name: str, tracks: list[dict], frames: int, seconds: float) -> None:
    print(f"{shown(name)}: {len(tracks)} person{'s' * (len(tracks) != 1)} in {frames} frames "
          f"({frames / max(seconds, 1e-9):.1f} frames/s)")  # fmt: skip
    for t in tracks:
        iv = t.get("age_interval")
        span = f" ({iv[0]:.0f}-{iv[1]:.0f})" if iv else ""
        when = f"{t['start_s']:.1f}-{t['end_s']:.1f} s, {t['frames']} frames"
        if t.get("returns"):
            when += f", came back {t['returns']}x"
        if t.get("joined"):
            when += f" (also shown as #{', #'.join(map(str, t['joined']))})"
        print(f"  #{t['track']:<3d} {t['gender']:6s} p_female {t['p_female']:.2f}  age "
              f"{t['age']:4.1f}{span}  {when}")  # fmt: skip


def _writer(path: Any, rate: float, fps: float | None, tracking: Any) -> cv2.VideoWriter:
    h, w = tracking.last_rgb.shape[:2]
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps or rate, (w, h))
    if not out.isOpened():
        raise DataError(f"--annotate {path}: cannot write a video there")
    return out


def _draw(rgb: np.ndarray, r: FrameResult, tracking: Any) -> np.ndarray:
    """The frame (BGR, for OpenCV) with each face's box, track id and running estimate, the
    labels placed as a photo's (:mod:`agegender.inference.draw`). A face not yet confirmed as
    a person (no track id) gets a grey dashed box and no label; a gender not yet sure
    (``"?"``) a grey box and label."""
    img = Image.fromarray(rgb)
    pen = ImageDraw.Draw(img)
    running = {t.id: t.evidence.estimate() for t in tracking.tracker.active}
    items: list[tuple[int | None, tuple]] = [(tid, f.box) for tid, f in r.faces]
    items += [(tid, box) for tid, box in r.carried]
    labels = []
    for tid, box in items:
        box = tuple(float(v) for v in box)
        if tid is None:
            draw.draw_box(pen, box, draw.UNSURE, 2, dashed=True)
            continue
        est = running.get(tid)
        colour = draw.colour_of(est["gender"] if est else None)
        draw.draw_box(pen, box, colour, draw.line_width(box))
        labels.append((box, _label(tid, est), colour))
    taken: list[tuple[float, float, float, float]] = []
    for box, text, colour in labels:  # after every box: no box crosses a label
        taken.append(
            draw.draw_label(pen, box, text, colour, img.size, VIDEO_TEXT_PX, taken, bold=True)
        )
    return np.ascontiguousarray(np.asarray(img)[:, :, ::-1])


def _label(tid: int, est: dict[str, Any] | None) -> str:
    """``"#3 F 34 (29-40)"``: the track and its running estimate, ``?`` for a gender not
    yet sure."""
    if not est:
        return f"#{tid}"
    gender = {"female": "F", "male": "M"}.get(est["gender"], "?")
    label = f"#{tid} {gender} {est['age']:.0f}"
    if est["age_interval"]:
        label += f" ({est['age_interval'][0]:.0f}-{est['age_interval'][1]:.0f})"
    return label
