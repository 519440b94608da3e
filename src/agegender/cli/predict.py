"""``agegender predict``'s options, and which of photos or video it runs.

The photos' side is :mod:`agegender.cli.photos`, the video's :mod:`agegender.cli.video`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agegender.cli.args import Handler, default_of, inference_options, int_in, options_from
from agegender.core.errors import ConfigError

PHOTOS = "agegender.cli.photos:predict_files"
VIDEO = "agegender.cli.video:predict_video"
OUTPUT_HELP = (
    "where results go, by extension: FILE.jsonl or FILE.json one JSON object per image (per "
    "person for a video), FILE.csv one row per face (per person); - JSON lines on standard "
    "output. Moved into place when the run ends; an existing file is replaced only by an "
    "output of its kind, and never if it is an input"
)


def add_predict(p: argparse.ArgumentParser) -> Handler:
    p.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="image files or folders (recursive), or one video (.mp4, .mkv, .avi, .mov, ...)",
    )
    p.add_argument("--aligned", action="store_true", help="images are aligned face crops")
    p.add_argument("--output", metavar="FILE.jsonl|FILE.csv|-", help=OUTPUT_HELP)
    p.add_argument(
        "--csv", metavar="FILE.csv", help="also a CSV: one row per face (per person for a video)"
    )
    p.add_argument(
        "--annotate",
        metavar="DIR|FILE.mp4",
        help="images: write each with boxes and labels to DIR/NAME.jpg (refused if that would "
        "replace an input image); a video or camera: write the annotated video to FILE.mp4",
    )
    _photo_options(p)
    _video_options(p)
    inference_options(p)

    def run(a: argparse.Namespace) -> int:
        from agegender.inference.tracking import is_video

        options = options_from(a)
        videos = [x for x in a.paths if is_video(x) and not Path(x).is_dir()]
        if a.camera is not None or videos:
            return _run_video(a, options, videos)
        if not a.paths:
            raise ConfigError("give image files or folders, a video, or --camera N")
        if a.frames or a.fps is not None:
            raise ConfigError("--frames and --fps are for a video or a camera")
        from agegender.cli.photos import predict_files

        kw = {k: getattr(a, k) for k in ("aligned", "output", "batch_size", "quiet", "resume")}
        kw.update(annotate_dir=a.annotate, csv_out=a.csv, workers=a.workers)
        return predict_files(a.paths, options, ordered=not a.unordered, **kw)

    return run


def _photo_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("photos")
    g.add_argument(
        "--batch-size",
        type=int_in(1),
        default=default_of(PHOTOS, "batch_size"),
        help="images a batch",
    )
    g.add_argument(
        "--workers",
        type=int_in(0, 256),
        default=default_of(PHOTOS, "workers"),
        help="processes, each with its own model and cores/N threads (0: one per core for "
        "many photos, else 1: what measured fastest; at most the cores this process may use)",
    )
    g.add_argument(
        "--unordered", action="store_true", help="with --workers: results as they are done"
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="keep the images already in --output FILE.jsonl (or FILE.jsonl.partial) and "
        "predict the rest",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _video_options(p: argparse.ArgumentParser) -> None:
    v = p.add_argument_group("video and camera")
    v.add_argument(
        "--camera", type=int_in(0), metavar="N", help="track the faces of camera N (Ctrl-C ends)"
    )
    v.add_argument(
        "--fps", type=float, default=default_of(VIDEO, "fps"), help="frames a second to look at "
        "(default: every frame)",
    )  # fmt: skip
    v.add_argument(
        "--detect-every",
        type=int_in(1, 100),
        default=default_of(VIDEO, "detect_every"),
        help="detect faces on every k-th of those frames; tracks carry the boxes in between",
    )
    v.add_argument("--frames", metavar="FILE.jsonl", help="every sampled frame's faces and tracks")


def _run_video(a: argparse.Namespace, options, videos: list[str]) -> int:
    if (a.camera is not None and a.paths) or len(a.paths) > 1:
        raise ConfigError("give one video, or --camera N, alone (images separately)")
    if a.aligned:
        raise ConfigError("--aligned is for face crops, not video")
    if a.fps is not None and not 0 < a.fps <= 1000:
        raise ConfigError(f"--fps must be in (0, 1000], got {a.fps}")
    if a.resume or a.unordered:
        raise ConfigError("--resume and --unordered are for photos")
    from agegender.cli.video import predict_video

    source = a.camera if a.camera is not None else videos[0]
    kw = {"output": a.output, "frames_out": a.frames, "csv_out": a.csv, "fps": a.fps}
    kw.update(annotate_out=a.annotate, detect_every=a.detect_every, quiet=a.quiet)
    return predict_video(source, options, **kw)
