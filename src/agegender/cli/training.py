"""``agegender train``, ``summary``, ``sweep`` and ``export``: the commands of the train extra."""

from __future__ import annotations

import argparse
from pathlib import Path

from agegender.cli.args import MODEL_HELP, Handler, default_of, int_in, quiet_option, require_train
from agegender.core.errors import ConfigError


def add_train(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("config", nargs="?", metavar="CONFIG.toml", help="recipe (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last epoch")
    quiet_option(p, "no progress bars or epoch lines")

    def run(a: argparse.Namespace) -> int:
        require_train("train")
        from agegender.core.config import load_config
        from agegender.training.train import train

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


def add_summary(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("model", metavar="MODEL", help="a registered model name")
    p.add_argument("--size", type=int_in(32, 1024), help="input side in pixels (the model's)")
    p.add_argument("--color", choices=("gray", "rgb"), help="input colour (the model's)")
    p.add_argument("--age-head", help="age head (resnet-mt: regression|dldl|coral)")

    def run(a: argparse.Namespace) -> int:
        require_train("summary")
        from agegender.training.models import create_model, summary

        chans = None if a.color is None else (1 if a.color == "gray" else 3)
        model = create_model(a.model, in_chans=chans, img_size=a.size, age_head=a.age_head)
        print(f"Model: {a.model}")
        print(summary(model))
        return 0

    return run


def add_sweep(p: argparse.ArgumentParser) -> Handler:
    at = "agegender.evaluation.sweep:run_sweep"
    p.add_argument("sweep", metavar="SWEEP.toml", help="sweep file (see sweeps/)")
    p.add_argument("--data", required=True, metavar="CACHE_DIR", help="prepared cache")
    p.add_argument(
        "--root", default=default_of(at, "root"), help="image folder(s) for runs that re-prepare"
    )
    p.add_argument("--out", help="sweep folder (default: runs/sweep/<name>)")
    p.add_argument("--limit", type=int_in(1), help="reduce: at most N training images")
    p.add_argument("--epochs", type=int_in(1), help="reduce: epochs per run")
    p.add_argument(
        "--parallel", type=int_in(1), default=default_of(at, "parallel"), help="runs at once"
    )
    p.add_argument(
        "--set", nargs="*", default=[], metavar="key=value", help="overrides for every run"
    )
    p.add_argument("--only", nargs="*", metavar="NAME", help="only these runs")
    quiet_option(p, "no progress lines")

    def run(a: argparse.Namespace) -> int:
        require_train("sweep")
        from agegender.evaluation.sweep import run_sweep

        out = a.out or str(Path("runs") / "sweep" / Path(a.sweep).stem)
        kw = {"root": a.root, "limit": a.limit, "epochs": a.epochs, "parallel": a.parallel}
        run_sweep(a.sweep, a.data, out, extra=a.set, only=a.only, quiet=a.quiet, **kw)
        print((Path(out) / "results.md").read_text())
        return 0

    return run


def add_export(p: argparse.ArgumentParser) -> Handler:
    at = "agegender.training.export:export"
    p.add_argument("--model", default=default_of(at, "model"), help=MODEL_HELP)
    p.add_argument(
        "--onnx",
        required=True,
        metavar="OUT.onnx",
        help="where to write it (an existing file is replaced only if it is an .onnx file)",
    )
    p.add_argument("--opset", type=int, default=default_of(at, "opset"), help="ONNX opset")
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
        type=int_in(1),
        default=default_of(at, "calibration_images"),
        help="with --int8: how many training faces",
    )

    def run(a: argparse.Namespace) -> int:
        require_train("export")
        from agegender.training.export import export

        kw = {"opset": a.opset, "int8": a.int8, "data": a.data, "half_weights": a.half_weights}
        path = export(a.model, a.onnx, calibration_images=a.calibration_images, **kw)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
        return 0

    return run
