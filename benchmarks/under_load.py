"""Batch-1 latency of one aligned face while other processes keep cores busy.

    python benchmarks/under_load.py [--data ../shared/data/UTKFace --cache cache/utk128]
        [--busy 0 1 --threads 2 --n 200] [--no-spin] [--json F]

A 2-core machine is rarely idle: a browser, an indexer, another job. OpenMP-style thread pools
that spin and wait on each other suffer most when one of their threads is descheduled (the
issue that asked for the torch-free path saw torch at 2 threads take 630 ms for one forward with
one core busy). For each ``--busy`` count, that many ``while True: pass`` processes run beside
this one while ``--n`` aligned test-split faces go one by one (decode, preprocess, the network)
through each runtime: ONNX Runtime (``default`` int8 and fp32, its idle threads spinning, as
:class:`~agegender.inference.predictor.Predictor` has them by default; with ``--no-spin`` also
sleeping, as
``agegender predict`` and ``serve`` have them) and, where torch is installed, ``--backend
torch``. Medians and 90th/99th percentiles; every runtime is timed within one busy setting,
side by side.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from predict_speed import (  # this folder: python puts a script's on the path
    batch1,
    cpu_record,
    emit,
    test_files,
)

from agegender.inference.predictor import Predictor


def runtimes(threads: int, no_spin: bool) -> dict[str, Predictor]:
    out = {
        f"onnx {precision}": Predictor.load(
            "default", precision=precision, threads=threads, detector=None
        )
        for precision in ("int8", "fp32")
    }
    if no_spin:  # the same files, their idle threads sleeping (the command line's default)
        for precision in ("int8", "fp32"):
            out[f"onnx {precision}, no spin"] = Predictor.load(
                "default", precision=precision, threads=threads, detector=None, spin=False
            )
    try:
        import torch  # noqa: F401
    except ImportError:
        return out
    from agegender.training.loading import open_predictor

    out["torch fp32"] = open_predictor(
        "default", backend="torch", device="cpu", amp="off", threads=threads, detector=None
    )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="../shared/data/UTKFace")
    p.add_argument("--cache", default="cache/utk128", help="its test split gives the faces")
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="busy processes beside")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=200, help="faces timed per runtime and setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument(
        "--no-spin",
        action="store_true",
        help="also time ONNX Runtime with session.intra_op.allow_spinning=0",
    )
    args = p.parse_args()
    files = test_files(Path(args.data), Path(args.cache), args.n, args.seed)
    models = runtimes(args.threads, args.no_spin)
    out: dict[str, Any] = {
        "cpu": cpu_record(),
        "threads": args.threads,
        "faces": len(files),
        "busy": {},
    }
    for busy in args.busy:
        spinners = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)
        ]
        try:
            time.sleep(0.5 if busy else 0)  # the spinners running before the first face
            out["busy"][str(busy)] = {name: batch1(pr, files) for name, pr in models.items()}
        finally:
            for s in spinners:
                s.kill()
                s.wait()
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
