"""``agegender prepare`` and ``agegender explore``: images into a cache, a cache into plots."""

from __future__ import annotations

import argparse

from agegender.cli.args import Handler, default_of, int_in, require_train
from agegender.core.errors import ConfigError
from agegender.data.prepare import DEFAULT_DATA_CONFIG, SIZES, prepare
from agegender.data.summary import format_summary
from agegender.vision.images import COLORS, face_config

# _prepare's own names for the shared helpers (its body is kept as its owner wrote it)
_default, _int_in = default_of, int_in


def add_prepare(p: argparse.ArgumentParser) -> Handler:
    at = "agegender.data.prepare:prepare"
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
        type=_int_in(*SIZES),
        default=DEFAULT_DATA_CONFIG["input_size"][1],
        help="side of the square images, in pixels",
    )
    p.add_argument(
        "--color", choices=COLORS, default=DEFAULT_DATA_CONFIG["color"], help="colour mode"
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
        if not a.data_dirs and not a.labels:
            raise ConfigError("give UTKFace folders, --labels FILE, or both")
        keys = ("seed", "split", "workers", "quiet", "split_file", "labels", "aligned")
        kw = {k: getattr(a, k) for k in keys}
        print(format_summary(prepare(a.data_dirs, a.out, face_config(a.size, a.color), **kw)))
        return 0

    return run


def add_explore(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("cache", metavar="CACHE_DIR", help="a cache written by `agegender prepare`")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the plots")
    at = "agegender.evaluation.explore:explore"
    p.add_argument("--seed", type=int_in(0), default=default_of(at, "seed"), help="which samples")

    def run(a: argparse.Namespace) -> int:
        require_train("explore")
        from agegender.evaluation.explore import explore

        files = explore(a.cache, a.out, seed=a.seed)
        print(f"wrote {len(files)} files to {a.out}:")
        for f in files:
            print(f"  {f.name}")
        return 0

    return run
