"""The ``agegender`` command: one sub-command per public function.

Each sub-command's options take their defaults from the function it calls (read from its
signature), so a default is declared once. Only the sub-command that runs is built and
imported: ``agegender predict`` never imports torch or the training code. Errors a user can
fix end in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agegender import __version__
from agegender.errors import AgeGenderError, ConfigError

Handler = Callable[[argparse.Namespace], int | None]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows a default only where there is one to show (not None, False or a suppressed one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # identity, not ==: a default of 0 is a default to show, unlike False
        if action.default is None or action.default is False or "%(default)" in text:
            return text
        return super()._get_help_string(action)  # argparse itself leaves SUPPRESS out


def _int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[lo, hi]``, else argparse's one-line error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            span = f"{lo}-{hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value

    return parse


def _default(where: str, name: str) -> Any:
    """The default of parameter ``name`` of ``where`` (``module:function``), so that the
    command line never restates what the function already says."""
    module, _, attr = where.partition(":")
    fn = importlib.import_module(module)
    for part in attr.split("."):
        fn = getattr(fn, part)
    return inspect.signature(fn).parameters[name].default


# ------------------------------------------------------------------ options shared by commands

MODEL_HELP = "default (the bundled model), a run folder or a checkpoint (.safetensors)"
DATA_HELP = (
    "a prepared cache or a plain UTKFace-style image folder (used whole, prepared at the "
    "model's size); none: the cache the run folder MODEL trained on"
)


def _tta(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="flip test-time augmentation (without the flag: as the model was trained)",
    )


def _amp(p: argparse.ArgumentParser, where: str) -> None:
    p.add_argument(
        "--amp",
        choices=("auto", "bf16", "off"),
        default=_default(where, "amp"),
        help="bf16 autocast on torch (auto: where the hardware has it natively)",
    )


def _device(p: argparse.ArgumentParser, where: str) -> None:
    p.add_argument("--device", default=_default(where, "device"), help="auto, cpu, cuda[:N] or mps")


def _split(p: argparse.ArgumentParser, where: str) -> None:
    p.add_argument(
        "--split",
        choices=("train", "val", "test", "all"),
        default=_default(where, "split"),
        help="split of a cache to use (all = every image; ignored for an image folder)",
    )


def _precision(p: argparse.ArgumentParser, where: str) -> None:
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "int8"),
        default=_default(where, "precision"),
        help="ONNX Runtime: auto = the model's int8 file where it has one and this CPU runs "
        "int8 fast",
    )


def _spin(p: argparse.ArgumentParser, where: str) -> None:
    p.add_argument(
        "--spin",
        action=argparse.BooleanOptionalAction,
        default=_default(where, "spin"),
        help="ONNX Runtime's idle threads spin waiting for work: faster one image at a time on "
        "an idle machine, slower when other threads or programs need the cores",
    )


def _backend(p: argparse.ArgumentParser, where: str) -> None:
    p.add_argument(
        "--backend",
        choices=("onnx", "torch"),
        default=_default(where, "backend"),
        help="runtime: ONNX Runtime (no torch needed) or torch (CUDA; needs agegender[train])",
    )


# ------------------------------------------------------------------ one function per command


def _prepare(p: argparse.ArgumentParser) -> Handler:
    at = "agegender.data:prepare"
    p.add_argument(
        "data_dirs", nargs="*", metavar="DATA_DIR", help="UTKFace folders (or files) to scan"
    )
    p.add_argument(
        "--labels",
        action="append",
        default=[],
        metavar="FILE",
        help="a CSV or JSON-lines file of your own images: path, age (34, 20-29 or 60+), "
        "gender (may be empty), optional box and split, any other column a group (repeatable)",
    )
    p.add_argument(
        "--aligned",
        action="store_true",
        help="the labels' images are aligned face crops: take them as given instead of "
        "detecting and aligning each face",
    )
    p.add_argument("--out", required=True, metavar="CACHE_DIR", help="where to write the cache")
    p.add_argument(
        "--size",
        type=_int_in(16, 1024),
        default=_default(at, "size"),
        help="side of the square images, in pixels",
    )
    p.add_argument(
        "--color", choices=("gray", "rgb"), default=_default(at, "color"), help="colour mode"
    )
    p.add_argument(
        "--seed", type=_int_in(0), default=_default(at, "seed"), help="seed of the split"
    )
    p.add_argument(
        "--split",
        default=",".join(map(str, _default(at, "split"))),
        help="train,val,test fractions",
    )
    p.add_argument(
        "--workers",
        type=_int_in(0),
        default=_default(at, "workers"),
        help="processes (0 = the CPU count, at most 8)",
    )
    p.add_argument(
        "--split-file",
        metavar="CSV",
        help="take each image's split from a published split (e.g. splits/utkface.csv), by "
        "content: the same split from any copy of the data",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    def run(a: argparse.Namespace) -> int:
        from agegender.data import format_summary, prepare

        if not a.data_dirs and not a.labels:
            raise ConfigError("give UTKFace folders, --labels FILE, or both")
        keys = ("size", "color", "seed", "split", "workers", "quiet", "split_file", "labels")
        kw = {k: getattr(a, k) for k in (*keys, "aligned")}
        print(format_summary(prepare(a.data_dirs, a.out, **kw)))
        return 0

    return run


def _explore(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("cache", metavar="CACHE_DIR", help="a cache written by `agegender prepare`")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the plots")
    at = "agegender.commands.explore:explore"
    p.add_argument("--seed", type=_int_in(0), default=_default(at, "seed"), help="which samples")

    def run(a: argparse.Namespace) -> int:
        from agegender.commands.explore import explore

        files = explore(a.cache, a.out, seed=a.seed)
        print(f"wrote {len(files)} files to {a.out}:")
        for f in files:
            print(f"  {f.name}")
        return 0

    return run


def _train(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("config", nargs="?", metavar="CONFIG.toml", help="recipe (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last epoch")
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")

    def run(a: argparse.Namespace) -> int:
        from agegender.commands.train import train
        from agegender.config import load_config

        if a.resume:
            if a.config or a.overrides:
                raise ConfigError("--resume takes the run's own config.toml; give no recipe")
            train(None, resume=a.resume, quiet=a.quiet)
            return 0
        if not a.config:
            raise ConfigError("give a recipe (e.g. configs/default.toml) or --resume RUN_DIR")
        overrides, config = list(a.overrides), a.config
        if "=" in config:  # only overrides, no recipe: start from the defaults
            overrides.insert(0, config)
            config = None
        train(load_config(config, overrides), quiet=a.quiet)
        return 0

    return run


def _summary(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("model", metavar="MODEL", help="a registered model name")
    p.add_argument("--size", type=_int_in(32, 1024), help="input side in pixels (the model's)")
    p.add_argument("--color", choices=("gray", "rgb"), help="input colour (the model's)")
    p.add_argument("--age-head", help="age head (resnet-mt: regression|dldl|coral)")

    def run(a: argparse.Namespace) -> int:
        from agegender.models import create_model, summary

        chans = None if a.color is None else (1 if a.color == "gray" else 3)
        model = create_model(a.model, in_chans=chans, img_size=a.size, age_head=a.age_head)
        print(f"Model: {a.model}")
        print(summary(model))
        return 0

    return run


def _sweep(p: argparse.ArgumentParser) -> Handler:
    at = "agegender.commands.sweep:run_sweep"
    p.add_argument("sweep", metavar="SWEEP.toml", help="sweep file (see sweeps/)")
    p.add_argument("--data", required=True, metavar="CACHE_DIR", help="prepared cache")
    p.add_argument(
        "--root", default=_default(at, "root"), help="image folder(s) for runs that re-prepare"
    )
    p.add_argument("--out", help="sweep folder (default: runs/sweep/<name>)")
    p.add_argument("--limit", type=_int_in(1), help="reduce: at most N training images")
    p.add_argument("--epochs", type=_int_in(1), help="reduce: epochs per run")
    p.add_argument(
        "--parallel", type=_int_in(1), default=_default(at, "parallel"), help="runs at once"
    )
    p.add_argument(
        "--set", nargs="*", default=[], metavar="key=value", help="overrides for every run"
    )
    p.add_argument("--only", nargs="*", metavar="NAME", help="only these runs")
    p.add_argument("--quiet", action="store_true", help="no progress lines")

    def run(a: argparse.Namespace) -> int:
        from agegender.commands.sweep import run_sweep

        out = a.out or str(Path("runs") / "sweep" / Path(a.sweep).stem)
        kw = {"root": a.root, "limit": a.limit, "epochs": a.epochs, "parallel": a.parallel}
        run_sweep(a.sweep, a.data, out, extra=a.set, only=a.only, quiet=a.quiet, **kw)
        print((Path(out) / "results.md").read_text())
        return 0

    return run


def _evaluate(p: argparse.ArgumentParser) -> Handler:
    at = "agegender.commands.evaluate:evaluate"
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument(
        "--compare",
        metavar="OTHER",
        help="a second model: both on the images neither saw, the differences in compare.md",
    )
    p.add_argument("--data", metavar="CACHE_OR_FOLDER", help=DATA_HELP)
    _split(p, at)
    _tta(p)
    p.add_argument(
        "--batch-size", type=_int_in(1), default=_default(at, "batch_size"), help="per pass"
    )
    _device(p, at)
    _amp(p, at)
    _backend(p, at)
    _precision(p, at)
    p.add_argument(
        "--include-seen",
        action="store_true",
        help="keep the images the model trained or validated on (left out by default, "
        "near-copies included)",
    )
    p.add_argument("--no-timing", action="store_true", help="skip the inference-speed timing")
    p.add_argument(
        "--timing-reps",
        type=_int_in(1),
        default=_default(at, "timing_reps"),
        help="single-image calls timed (median reported)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the report")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    def run(a: argparse.Namespace) -> int:
        from agegender.commands.evaluate import compare, evaluate, format_summary

        keys = ("split", "tta", "device", "batch_size", "amp", "quiet", "backend", "precision")
        kw = {k: getattr(a, k) for k in keys}
        kw.update(
            timing=not a.no_timing, timing_reps=a.timing_reps, exclude_seen=not a.include_seen
        )
        if a.compare:
            compare(a.model, a.compare, out_dir=a.out, data=a.data, **kw)
            print((Path(a.out) / "compare.md").read_text())
            return 0
        m = evaluate(a.model, a.data, out_dir=a.out, **kw)
        print(format_summary(m, a.out))
        return 0

    return run


def _show(p: argparse.ArgumentParser) -> Handler:
    at = "agegender.commands.evaluate:show"
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--data", metavar="CACHE_OR_FOLDER", help=DATA_HELP)
    _split(p, at)
    p.add_argument("--n", type=_int_in(1), default=_default(at, "n"), help="faces (5 per row)")
    p.add_argument("--seed", type=_int_in(0), default=_default(at, "seed"), help="which faces")
    _tta(p)
    _device(p, at)
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="image to write (.png, .jpg, .pdf, .svg, ...; a folder: FOLDER/grid.png)",
    )

    def run(a: argparse.Namespace) -> int:
        from agegender.commands.evaluate import show

        kw = {k: getattr(a, k) for k in ("n", "split", "seed", "tta", "device")}
        print(f"wrote {show(a.model, a.data, a.out, **kw)}")
        return 0

    return run


def _predict(p: argparse.ArgumentParser) -> Handler:
    at = "agegender.commands.predict:predict_files"
    vat = "agegender.commands.video:predict_video"
    p.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="image files or folders (recursive), or one video (.mp4, .mkv, .avi, .mov, ...)",
    )
    p.add_argument("--model", default=_default(at, "model"), help=MODEL_HELP)
    p.add_argument("--aligned", action="store_true", help="images are aligned face crops")
    p.add_argument(
        "--detector",
        choices=("yunet", "yunet-fast"),
        help="yunet-fast: one landmark refinement pass instead of two (faster per face); "
        f"default: {_default(at, 'detector')} for photos, {_default(vat, 'detector')} for video",
    )
    p.add_argument(
        "--output",
        metavar="FILE.jsonl",
        help="one JSON object per image (per person for a video), moved into place when the "
        "run ends; an existing file is replaced only if it ends in .jsonl or .json and is not "
        "an input",
    )
    p.add_argument(
        "--annotate",
        metavar="DIR|FILE.mp4",
        help="images: write each with boxes and labels to DIR/NAME.jpg (refused if that would "
        "replace an input image); a video or camera: write the annotated video to FILE.mp4",
    )
    v = p.add_argument_group("video and camera")
    v.add_argument(
        "--camera", type=_int_in(0), metavar="N", help="track the faces of camera N (Ctrl-C ends)"
    )
    v.add_argument(
        "--fps", type=float, default=_default(vat, "fps"), help="frames a second to look at "
        "(default: every frame)",
    )  # fmt: skip
    v.add_argument(
        "--detect-every",
        type=_int_in(1, 100),
        default=_default(vat, "detect_every"),
        help="detect faces on every k-th of those frames; tracks carry the boxes in between",
    )
    v.add_argument("--frames", metavar="FILE.jsonl", help="every sampled frame's faces and tracks")
    v.add_argument("--csv", metavar="FILE.csv", help="one row per person")
    _tta(p)
    _backend(p, at)
    _precision(p, at)
    _spin(p, at)
    _amp(p, at)
    p.add_argument(
        "--batch-size", type=_int_in(1), default=_default(at, "batch_size"), help="images a batch"
    )
    _device(p, at)
    p.add_argument(
        "--workers",
        type=_int_in(0, 256),
        default=_default(at, "workers"),
        help="processes, each with its own model and cores/N threads (0: one per core for "
        "many photos, else 1: what measured fastest)",
    )
    p.add_argument(
        "--unordered", action="store_true", help="with --workers: results as they are done"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the images already in --output (or OUTPUT.partial) and predict the rest",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    def run(a: argparse.Namespace) -> int:
        from agegender.video import is_video

        videos = [x for x in a.paths if is_video(x) and not Path(x).is_dir()]
        if a.camera is not None or videos:
            if (a.camera is not None and a.paths) or len(a.paths) > 1:
                raise ConfigError("give one video, or --camera N, alone (images separately)")
            if a.aligned:
                raise ConfigError("--aligned is for face crops, not video")
            if a.fps is not None and not 0 < a.fps <= 1000:
                raise ConfigError(f"--fps must be in (0, 1000], got {a.fps}")
            from agegender.commands.video import predict_video

            keys = ("tta", "backend", "device", "amp", "precision", "spin")
            return predict_video(
                a.camera if a.camera is not None else videos[0], a.model, a.output, a.frames,
                a.csv, a.annotate, a.fps, a.detect_every, a.detector or _default(vat, "detector"),
                a.quiet, **{k: getattr(a, k) for k in keys},
            )  # fmt: skip
        if not a.paths:
            raise ConfigError("give image files or folders, a video, or --camera N")
        if a.frames or a.csv or a.fps is not None:
            raise ConfigError("--frames, --csv and --fps are for a video or a camera")
        from agegender.commands.predict import predict_files

        keys = ("model", "aligned", "output", "tta", "backend", "batch_size", "device", "amp")
        kw = {k: getattr(a, k) for k in (*keys, "precision", "spin", "workers", "resume")}
        kw.update(detector=a.detector or _default(at, "detector"), ordered=not a.unordered)
        return predict_files(a.paths, annotate_dir=a.annotate, quiet=a.quiet, **kw)

    return run


def _export(p: argparse.ArgumentParser) -> Handler:
    at = "agegender.commands.export:export"
    p.add_argument("--model", default=_default(at, "model"), help=MODEL_HELP)
    p.add_argument("--onnx", required=True, metavar="OUT.onnx", help="where to write it")
    p.add_argument("--opset", type=int, default=_default(at, "opset"), help="ONNX opset")
    p.add_argument(
        "--int8", action="store_true", help="statically quantised (int8 weights, uint8 values)"
    )
    p.add_argument(
        "--half-weights",
        action="store_true",
        help="store fp32 weights as fp16 (half the file, the same fp32 arithmetic)",
    )
    p.add_argument("--data", metavar="CACHE", help="with --int8: its training faces calibrate")
    p.add_argument(
        "--calibration-images",
        type=_int_in(1),
        default=_default(at, "calibration_images"),
        help="with --int8: how many training faces",
    )

    def run(a: argparse.Namespace) -> int:
        from agegender.commands.export import export

        kw = {"opset": a.opset, "int8": a.int8, "data": a.data, "half_weights": a.half_weights}
        path = export(a.model, a.onnx, calibration_images=a.calibration_images, **kw)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
        return 0

    return run


def _demo(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--out", default="demo-output", help="where to write the results")
    p.add_argument("--synthetic", action="store_true", help="the synthetic data demo")
    p.add_argument("--n", type=_int_in(10, 100_000), default=200, help="number of synthetic faces")

    def run(a: argparse.Namespace) -> int:
        from agegender.model_files import BUNDLED

        out = Path(a.out)
        if a.synthetic or not BUNDLED.is_file():
            return _synthetic_demo(out, a.n)
        from agegender.draw import annotate
        from agegender.predict import ASTRONAUT, Predictor

        faces = Predictor.load("default").predict(ASTRONAUT)
        out.mkdir(parents=True, exist_ok=True)
        annotate(ASTRONAUT, faces).save(out / "astronaut.jpg", quality=92)
        print(f"{ASTRONAUT.name} (NASA portrait of Eileen Collins, public domain):")
        for f in faces:
            print(f"  {f.label():16s} p_female {f.p_female:.2f}  box {[round(v) for v in f.box]}")
        print(f"annotated image: {out / 'astronaut.jpg'}")
        return 0

    return run


def _synthetic_demo(out: Path, n: int) -> int:
    import tempfile

    from agegender.commands.explore import explore
    from agegender.data import format_summary, prepare
    from agegender.synthetic import make_dataset

    with tempfile.TemporaryDirectory() as tmp:
        print(f"Generating {n} synthetic faces (UTKFace-style names) ...")
        make_dataset(Path(tmp) / "faces", n=n, size=96, seed=0)
        summary = prepare([Path(tmp) / "faces"], out / "cache", size=64, quiet=True)
        print(format_summary(summary))
        files = explore(out / "cache", out / "explore")
    print(f"Exploration plots: {', '.join(str(f) for f in files)}")
    return 0


def _serve(p: argparse.ArgumentParser) -> Handler:
    at, app = "agegender.commands.serve:serve", "agegender.commands.serve:create_app"
    p.add_argument("--host", default=_default(at, "host"), help="interface (0.0.0.0: every one)")
    p.add_argument("--port", type=int, default=_default(at, "port"), help="TCP port (0: any)")
    p.add_argument("--model", default=_default(app, "model"), help=MODEL_HELP)
    p.add_argument("--workers", type=int, default=_default(app, "workers"), help="threads")
    p.add_argument("--queue", type=int, default=_default(app, "queue"), help="waiting before 503")
    p.add_argument(
        "--max-upload-mb", type=float, default=_default(app, "max_upload_mb"), help="per file"
    )
    p.add_argument(
        "--max-video-mb",
        type=float,
        default=_default(app, "max_video_mb"),
        help="per clip sent to /api/video",
    )
    _device(p, app)
    _backend(p, app)
    _precision(p, app)
    _spin(p, app)
    _amp(p, app)
    _tta(p)
    p.add_argument(
        "--api-key",
        metavar="KEY",
        help="require it on /api/ requests (Authorization: Bearer KEY); or AGEGENDER_API_KEY",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name to answer besides the interface's own (repeatable)",
    )
    p.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="URL",
        help="a web origin whose pages may post to the API, e.g. https://app.example",
    )

    def run(a: argparse.Namespace) -> int:
        from agegender.commands.serve import serve

        keys = ("model", "workers", "queue", "max_upload_mb", "max_video_mb", "device", "backend")
        keys += ("tta", "amp")
        keys += ("precision", "spin", "api_key")
        kw = {k: getattr(a, k) for k in keys}
        kw.update(allow_hosts=tuple(a.allow_host), allow_origins=tuple(a.allow_origin))
        serve(host=a.host, port=a.port, **kw)
        return 0

    return run


#: name -> (one-line help, the function that adds its options and returns its handler)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Handler]]] = {
    "prepare": (
        "Scan UTKFace folders, parse labels from file names, drop duplicates and bad files, "
        "split by content and decode every image once into a memory-mappable cache.",
        _prepare,
    ),
    "explore": (
        "The study's data exploration: sample image, age/gender/race distributions, a 5x5 grid "
        "of faces and the age distribution by gender, as PNG files and summary.md.",
        _explore,
    ),
    "train": (
        "Train a multi-task age/gender network from a TOML recipe, overridden by key=value "
        "(e.g. train.epochs=5 data.cache=cache/utk128). Writes a run folder with config.toml, "
        "history.csv, best/last checkpoints, curves.png and metrics.json.",
        _train,
    ),
    "summary": ("Print a Keras-like table of a model's layers.", _summary),
    "sweep": (
        "Train a grid of runs (a base recipe plus overrides, see sweeps/), evaluate each on the "
        "same test split and write results.md and results.csv.",
        _sweep,
    ),
    "evaluate": (
        "Evaluate a model on a test split: gender accuracy and confusion, age MAE by band and "
        "decade, a per-race fairness table, calibration, age-interval coverage and speed. "
        "Writes metrics.json, report.md, predictions.csv and PNG plots to --out.",
        _evaluate,
    ),
    "show": (
        "Predict and show: a grid of random faces titled 'true 34 F / pred 31 F', green when "
        "the gender is right and the age within 5 years, red otherwise.",
        _show,
    ),
    "predict": (
        "Estimate age and gender of every face in photos (files or folders): detect, align "
        "to UTKFace's geometry, predict. Photos of up to 150 MP are read (those over 40 MP "
        "shrunk while decoding). Exit 0 when every image was read, 1 when some failed. A "
        "video or a camera: faces tracked from frame to frame, one estimate per person.",
        _predict,
    ),
    "export": (
        "Export a model to ONNX (uint8 faces in, dynamic batch), in fp32 or, with --int8, "
        "statically quantised and calibrated on training faces.",
        _export,
    ),
    "demo": (
        "Run the bundled model on a bundled public-domain photo and write the annotated image "
        "(with --synthetic, or without a bundled model: prepare and explore synthetic faces).",
        _demo,
    ),
    "serve": (
        "Serve the model over HTTP: a web page at / (upload, drop or webcam), "
        "POST /api/predict and /api/predict/batch, GET /health and /docs.",
        _serve,
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, only that sub-command gets its options (the others are
    listed by name), so that running one imports only what it needs."""
    parser = argparse.ArgumentParser(
        prog="agegender",
        description="Age and gender estimation from face images, trained on UTKFace.",
        formatter_class=_Formatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"agegender {__version__}\ncode: MIT; the bundled weights: non-commercial research "
        "only (trained on UTKFace; see agegender/weights/TERMS.md)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (text, add_options) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text, formatter_class=_Formatter)
        if command is None or command == name:
            p.set_defaults(func=add_options(p))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), ""))
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling `overrides` at the first option: `train R --quiet a=1` leaves a=1
    if (
        extra
        and getattr(args, "overrides", None) is not None
        and all("=" in e and not e.startswith("-") for e in extra)
    ):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except AgeGenderError as e:
        print(f"agegender {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: a bug to see in full
            raise
        # a path that cannot be written or read (a file where a folder should be, no
        # permission, a full disk) is the user's to fix: one line, as for the errors above
        print(f"agegender {args.command}: error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("agegender: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
