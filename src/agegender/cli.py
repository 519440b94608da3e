"""The ``agegender`` command: one sub-command per public function.

Errors a user can fix end in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from agegender.errors import AgeGenderError, ConfigError

Handler = Callable[[argparse.Namespace], int | None]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


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


def _cmd_prepare(args: argparse.Namespace) -> int:
    from agegender.data import format_summary, prepare

    summary = prepare(
        args.data_dirs,
        args.out,
        size=args.size,
        color=args.color,
        seed=args.seed,
        split=args.split,
        workers=args.workers,
        quiet=args.quiet,
    )
    print(format_summary(summary))
    return 0


def _cmd_explore(args: argparse.Namespace) -> int:
    from agegender.explore import explore

    files = explore(args.cache, args.out, seed=args.seed)
    print(f"wrote {len(files)} files to {args.out}:")
    for f in files:
        print(f"  {f.name}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from agegender.config import load_config
    from agegender.train import train

    if args.resume:
        if args.config or args.overrides:
            raise ConfigError("--resume takes the run's own config.toml; give no recipe")
        train(None, resume=args.resume, quiet=args.quiet)
        return 0
    if not args.config:
        raise ConfigError("give a recipe (e.g. configs/default.toml) or --resume RUN_DIR")
    overrides = list(args.overrides)
    config = args.config
    if "=" in config:  # only overrides, no recipe: start from the defaults
        overrides.insert(0, config)
        config = None
    train(load_config(config, overrides), quiet=args.quiet)
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from agegender.models import create_model, summary

    model = create_model(
        args.model,
        in_chans=1 if args.color == "gray" else 3,
        img_size=args.size,
        age_head=args.age_head,
    )
    print(f"Model: {args.model}")
    print(summary(model, (1 if args.color == "gray" else 3, args.size, args.size)))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from agegender.sweep import run_sweep

    out = args.out or str(Path("runs") / "sweep" / Path(args.sweep).stem)
    run_sweep(
        args.sweep,
        args.data,
        out,
        root=args.root,
        limit=args.limit,
        epochs=args.epochs,
        parallel=args.parallel,
        extra=args.set,
        only=args.only,
        quiet=args.quiet,
    )
    print((Path(out) / "results.md").read_text())
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from agegender.predict import predict_files

    return predict_files(
        args.paths,
        model=args.model,
        aligned=args.aligned,
        output=args.output,
        annotate_dir=args.annotate,
        tta=args.tta,
        backend=args.backend,
        batch_size=args.batch_size,
        device=args.device,
        quiet=args.quiet,
        amp=args.amp,
    )


def _cmd_export(args: argparse.Namespace) -> int:
    from agegender.export import export_onnx

    path = export_onnx(args.model, args.onnx, opset=args.opset)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from agegender.checkpoint import BUNDLED

    out = Path(args.out)
    if args.synthetic or not BUNDLED.is_file():
        return _synthetic_demo(out, args.n)
    from agegender.predict import ASTRONAUT, Predictor, annotate

    predictor = Predictor.load("default")
    faces = predictor.predict(ASTRONAUT)
    out.mkdir(parents=True, exist_ok=True)
    annotate(ASTRONAUT, faces).save(out / "astronaut.jpg", quality=92)
    print(f"{ASTRONAUT.name} (NASA portrait of Eileen Collins, public domain):")
    for f in faces:
        print(f"  {f.label():16s} p_female {f.p_female:.2f}  box {[round(v) for v in f.box]}")
    print(f"annotated image: {out / 'astronaut.jpg'}")
    return 0


def _synthetic_demo(out, n: int) -> int:
    import tempfile
    from pathlib import Path

    from agegender.data import format_summary, prepare
    from agegender.explore import explore
    from agegender.synthetic import make_dataset

    with tempfile.TemporaryDirectory() as tmp:
        print(f"Generating {n} synthetic faces (UTKFace-style names) ...")
        make_dataset(Path(tmp) / "faces", n=n, size=96, seed=0)
        summary = prepare([Path(tmp) / "faces"], out / "cache", size=64, quiet=True)
        print(format_summary(summary))
        files = explore(out / "cache", out / "explore")
    print(f"Exploration plots: {', '.join(str(f) for f in files)}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from agegender.serve import serve

    serve(
        host=args.host,
        port=args.port,
        model=args.model,
        workers=args.workers,
        queue=args.queue,
        max_upload_mb=args.max_upload_mb,
        device=args.device,
        backend=args.backend,
        tta=args.tta,
        amp=args.amp,
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from agegender.evaluate import evaluate, format_summary

    metrics = evaluate(
        args.model,
        args.data,
        split=args.split,
        tta=args.tta,
        out_dir=args.out,
        device=args.device,
        batch_size=args.batch_size,
        timing=not args.no_timing,
        timing_reps=args.timing_reps,
        amp=args.amp,
        quiet=args.quiet,
    )
    print(format_summary(metrics, args.out))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from agegender.evaluate import show

    path = show(
        args.model,
        args.data,
        args.out,
        n=args.n,
        split=args.split,
        seed=args.seed,
        tta=args.tta,
        device=args.device,
    )
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agegender",
        description="Age and gender estimation from face images, trained on UTKFace.",
        formatter_class=_Formatter,
    )
    from agegender import __version__

    parser.add_argument("--version", action="version", version=f"agegender {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=_Formatter)
        p.set_defaults(func=handler)
        return p

    p = add(
        "prepare",
        _cmd_prepare,
        "Scan UTKFace folders, parse labels from file names, drop duplicates and bad files, "
        "split by content and decode every image once into a memory-mappable cache.",
    )
    p.add_argument("data_dirs", nargs="+", metavar="DATA_DIR", help="folders (or files) to scan")
    p.add_argument("--out", required=True, metavar="CACHE_DIR", help="where to write the cache")
    p.add_argument("--size", type=int, default=128, help="side of the square images, in pixels")
    p.add_argument("--color", choices=("gray", "rgb"), default="gray", help="colour mode")
    p.add_argument("--seed", type=_int_in(0), default=42, help="seed of the train/val/test split")
    p.add_argument("--split", default="0.7,0.1,0.2", help="train,val,test fractions")
    p.add_argument("--workers", type=_int_in(0), default=0, help="processes (0 = CPU count, max 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = add(
        "explore",
        _cmd_explore,
        "The study's data exploration: sample image, age/gender/race distributions, a 5x5 grid "
        "of faces and the age distribution by gender, as PNG files and summary.md.",
    )
    p.add_argument("cache", metavar="CACHE_DIR", help="a cache written by `agegender prepare`")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the plots")
    p.add_argument("--seed", type=_int_in(0), default=0, help="which samples to show")

    p = add(
        "train",
        _cmd_train,
        "Train a multi-task age/gender network from a TOML recipe, overridden by key=value "
        "(e.g. train.epochs=5 data.cache=cache/utk128). Writes a run folder with config.toml, "
        "history.csv, best/last checkpoints, curves.png and metrics.json.",
    )
    p.add_argument("config", nargs="?", metavar="CONFIG.toml", help="recipe (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last epoch")
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")

    p = add("summary", _cmd_summary, "Print a Keras-like table of a model's layers.")
    p.add_argument("model", metavar="MODEL", help="a registered model name")
    p.add_argument("--size", type=_int_in(32, 1024), default=128, help="input side in pixels")
    p.add_argument("--color", choices=("gray", "rgb"), default="gray", help="input colour")
    p.add_argument("--age-head", default=None, help="age head (resnet-mt: regression|dldl|coral)")

    p = add(
        "sweep",
        _cmd_sweep,
        "Train a grid of runs (a base recipe plus overrides, see sweeps/), evaluate each on the "
        "same test split and write results.md and results.csv.",
    )
    p.add_argument("sweep", metavar="SWEEP.toml", help="sweep file (see sweeps/)")
    p.add_argument("--data", required=True, metavar="CACHE_DIR", help="prepared cache")
    p.add_argument("--root", default="", help="image folder(s) for runs that re-prepare ({root})")
    p.add_argument("--out", default=None, help="sweep folder (default: runs/sweep/<name>)")
    p.add_argument("--limit", type=int, default=None, help="reduce: at most N training images")
    p.add_argument("--epochs", type=int, default=None, help="reduce: epochs per run")
    p.add_argument("--parallel", type=int, default=1, help="runs trained at once")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="key=value",
        help="overrides for every run (e.g. data.size=64)",
    )
    p.add_argument("--only", nargs="*", default=None, metavar="NAME", help="only these runs")
    p.add_argument("--quiet", action="store_true", help="no progress lines")

    model_help = "a run folder, a checkpoint (.safetensors) or `default` (the bundled model)"
    data_help = (
        "a prepared cache or a plain UTKFace-style image folder (used whole, prepared at the "
        "model's size); None: the cache the run folder MODEL trained on"
    )
    split_help = "split of a cache to use (all = every image; ignored for an image folder)"
    tta_help = "flip test-time augmentation; None: as the checkpoint's recipe"

    p = add(
        "evaluate",
        _cmd_evaluate,
        "Evaluate a model on a test split: gender accuracy and confusion, age MAE by band and "
        "decade, a per-race fairness table, calibration, age-interval coverage and speed. Writes "
        "metrics.json, report.md, predictions.csv and PNG plots to --out.",
    )
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--data", metavar="CACHE_OR_FOLDER", default=None, help=data_help)
    p.add_argument(
        "--split", choices=("train", "val", "test", "all"), default="test", help=split_help
    )
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help=tta_help)
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--amp",
        choices=("auto", "bf16", "off"),
        default="auto",
        help="bf16 autocast (auto: where it is fast, as in training)",
    )
    p.add_argument("--no-timing", action="store_true", help="skip the inference-speed timing")
    p.add_argument(
        "--timing-reps", type=int, default=50, help="single-image calls timed (median reported)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the report")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add(
        "show",
        _cmd_show,
        "Predict and show: a grid of random faces titled 'true 34 F / pred 31 F', green when "
        "the gender is right and the age within 5 years, red otherwise.",
    )
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--data", metavar="CACHE_OR_FOLDER", default=None, help=data_help)
    p.add_argument(
        "--split", choices=("train", "val", "test", "all"), default="test", help=split_help
    )
    p.add_argument("--n", type=int, default=25, help="number of faces (5 per row)")
    p.add_argument("--seed", type=_int_in(0), default=0, help="which faces to show")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help=tta_help)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="image to write (.png, .jpg, .pdf, .svg, ...; a folder: FOLDER/grid.png)",
    )

    amp_help = "bf16 autocast for the torch backend (auto: where the hardware has it natively)"
    p = add(
        "predict",
        _cmd_predict,
        "Estimate age and gender of every face in photos (files or folders): detect, align "
        "to UTKFace's geometry, predict. Photos of up to 150 MP are read (those over 40 MP shrunk "
        "while decoding). Exit 0 when every image was read, 1 when some failed.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (recursive)")
    p.add_argument("--model", default="default", help="default, a run folder or a checkpoint")
    p.add_argument("--aligned", action="store_true", help="images are aligned face crops")
    p.add_argument(
        "--output",
        metavar="FILE.jsonl",
        help="one JSON object per image, moved into place when the run ends; an existing file "
        "is replaced only if it ends in .jsonl or .json and is not an input",
    )
    p.add_argument(
        "--annotate",
        metavar="DIR",
        help="write each image with boxes and labels to DIR/NAME.jpg (refused if that would "
        "replace an input image)",
    )
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mirror test-time augmentation (default: as the model was trained)",
    )
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch", help="runtime")
    p.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto", help=amp_help)
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (1 or more)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add("export", _cmd_export, "Export a model to ONNX (uint8 faces in, dynamic batch).")
    p.add_argument("--model", default="default", help="default, a run folder or a checkpoint")
    p.add_argument("--onnx", required=True, metavar="OUT.onnx", help="where to write it")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset")

    p = add(
        "demo",
        _cmd_demo,
        "Run the bundled model on a bundled public-domain photo and write the annotated image "
        "(with --synthetic, or without a bundled model: prepare and explore synthetic faces).",
    )
    p.add_argument("--out", default="demo-output", help="where to write the results")
    p.add_argument("--synthetic", action="store_true", help="the synthetic data demo")
    p.add_argument("--n", type=_int_in(10, 100_000), default=200, help="number of synthetic faces")

    p = add(
        "serve",
        _cmd_serve,
        "Serve the model over HTTP: a web page at / (upload, drop or webcam), "
        "POST /api/predict and /api/predict/batch, GET /health and /docs.",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface (0.0.0.0 for every one)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--model", default="default", help="default, a run folder or a checkpoint")
    p.add_argument("--workers", type=int, default=1, help="inference threads")
    p.add_argument("--queue", type=int, default=16, help="waiting requests before 503")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted file")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch", help="runtime")
    p.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto", help=amp_help)
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help=tta_help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
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
