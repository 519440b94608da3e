"""``agegender evaluate`` (and ``--compare``) and ``agegender show``: a model on a test split."""

from __future__ import annotations

import argparse
from pathlib import Path

from agegender.cli.args import (
    DATA_HELP,
    Handler,
    default_of,
    inference_options,
    int_in,
    options_from,
    quiet_option,
    require_train,
    split_option,
)

#: a cache's faces are aligned crops: no detector to choose
NO_DETECTOR = ("detector",)


def add_evaluate(p: argparse.ArgumentParser) -> Handler:
    at = "agegender.evaluation.evaluate:evaluate"
    inference_options(p, model_positional=True, skip=NO_DETECTOR)
    p.add_argument(
        "--compare",
        metavar="OTHER",
        help="a second model: both on the images neither saw, the differences in compare.md",
    )
    p.add_argument("--data", metavar="CACHE_OR_FOLDER", help=DATA_HELP)
    split_option(p, at)
    p.add_argument(
        "--batch-size", type=int_in(1), default=default_of(at, "batch_size"), help="per pass"
    )
    p.add_argument(
        "--include-seen",
        action="store_true",
        help="keep the images the model trained or validated on (left out by default, "
        "near-copies included)",
    )
    p.add_argument("--no-timing", action="store_true", help="skip the inference-speed timing")
    p.add_argument(
        "--timing-reps",
        type=int_in(1),
        default=default_of(at, "timing_reps"),
        help="single-image calls timed (median reported)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the report")
    quiet_option(p)

    def run(a: argparse.Namespace) -> int:
        require_train("evaluate")
        from agegender.evaluation.evaluate import compare, evaluate, format_summary

        options = options_from(a)
        kw = {"data": a.data, "split": a.split, "out_dir": a.out, "batch_size": a.batch_size}
        kw.update(timing=not a.no_timing, timing_reps=a.timing_reps, quiet=a.quiet)
        kw.update(exclude_seen=not a.include_seen)
        if a.compare:
            compare(options, a.compare, **kw)
            print((Path(a.out) / "compare.md").read_text())
            return 0
        print(format_summary(evaluate(options, **kw), a.out))
        return 0

    return run


def add_show(p: argparse.ArgumentParser) -> Handler:
    at = "agegender.evaluation.evaluate:show"
    inference_options(p, model_positional=True, skip=NO_DETECTOR)
    p.add_argument("--data", metavar="CACHE_OR_FOLDER", help=DATA_HELP)
    split_option(p, at)
    p.add_argument("--n", type=int_in(1), default=default_of(at, "n"), help="faces (5 per row)")
    p.add_argument("--seed", type=int_in(0), default=default_of(at, "seed"), help="which faces")
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="image to write (.png, .jpg, .pdf, .svg, ...; a folder: FOLDER/grid.png)",
    )

    def run(a: argparse.Namespace) -> int:
        require_train("show")
        from agegender.evaluation.evaluate import show

        kw = {"n": a.n, "split": a.split, "seed": a.seed}
        print(f"wrote {show(options_from(a), a.data, a.out, **kw)}")
        return 0

    return run
