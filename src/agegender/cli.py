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
        args.model, in_chans=1 if args.color == "gray" else 3, img_size=args.size,
        age_head=args.age_head,
    )  # fmt: skip
    print(f"Model: {args.model}")
    print(summary(model, (1 if args.color == "gray" else 3, args.size, args.size)))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from agegender.data import format_summary, prepare
    from agegender.explore import explore
    from agegender.synthetic import make_dataset

    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"Generating {args.n} synthetic faces (UTKFace-style names) ...")
        make_dataset(Path(tmp) / "faces", n=args.n, size=96, seed=0)
        summary = prepare([Path(tmp) / "faces"], out / "cache", size=64, quiet=True)
        print(format_summary(summary))
        files = explore(out / "cache", out / "explore")
    print(f"Exploration plots: {', '.join(str(f) for f in files)}")
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
    p.add_argument("--seed", type=int, default=42, help="seed of the train/val/test split")
    p.add_argument("--split", default="0.7,0.1,0.2", help="train,val,test fractions")
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = add(
        "explore",
        _cmd_explore,
        "The study's data exploration: sample image, age/gender/race distributions, a 5x5 grid "
        "of faces and the age distribution by gender, as PNG files and summary.md.",
    )
    p.add_argument("cache", metavar="CACHE_DIR", help="a cache written by `agegender prepare`")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the plots")
    p.add_argument("--seed", type=int, default=0, help="which samples to show")

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
    p.add_argument("--size", type=int, default=128, help="input side in pixels")
    p.add_argument("--color", choices=("gray", "rgb"), default="gray", help="input colour")
    p.add_argument("--age-head", default=None, help="age head (resnet-mt: regression|dldl|coral)")

    p = add(
        "demo",
        _cmd_demo,
        "Run the pipeline end to end on a small synthetic data set (no download needed).",
    )
    p.add_argument("--out", default="demo-output", help="where to write the results")
    p.add_argument("--n", type=int, default=200, help="number of synthetic faces")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AgeGenderError as e:
        print(f"agegender {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("agegender: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
