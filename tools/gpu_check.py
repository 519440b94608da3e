"""Check the CUDA code paths on a machine with a GPU: what CI (CPU only) cannot run.

    python tools/gpu_check.py --cache cache/utk128 [--out /tmp/gpu_check] [--json result.json]

1. ``train`` on CUDA (bf16 autocast, channels_last, cuDNN autotuning, fused AdamW) writes a
   complete run folder.
2. A run killed during epoch 2 and continued with ``agegender train --resume`` ends as close
   to an unbroken run as a second unbroken run does (cuDNN's autotuned kernels need not be
   bit-reproducible; both largest differences are reported).
3. The DistributedDataParallel path on NCCL: a one-process NCCL group (one GPU cannot hold two
   NCCL ranks) runs the same training through DDP, the all-reduces, broadcasts and the final
   all-ranks weight check.
4. ``train.cuda_graphs=true`` (each step's forward and backward replayed as CUDA graphs) trains
   the model eager training does: without dropout, whose random masks differ, its validation
   loss and MAE are within 1 % of an eager run's, and the checkpoint loads.

Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from agegender.cli.main import main as cli_main
from agegender.core.config import load_config
from agegender.training import train as train_mod
from agegender.training.checkpoint import load_checkpoint
from agegender.training.train import train

ROOT = Path(__file__).resolve().parents[1]
ARTEFACTS = (
    "config.toml",
    "history.csv",
    "best.safetensors",
    "last.safetensors",
    "curves.png",
    "metrics.json",
)


def _cfg(cache: str, out: Path, *extra: str):
    return load_config(
        ROOT / "configs" / "smoke.toml",
        [
            f"data.cache={cache}",
            f"run.out={out}",
            "data.limit=4096",
            "train.epochs=2",
            "train.batch_size=64",
            "train.device=cuda",
            *extra,
        ],
    )


def _complete(run: Path) -> dict:
    """The run's metrics, after checking it wrote every artefact."""
    missing = [a for a in ARTEFACTS if not (run / a).is_file()]
    assert not missing, f"missing artefacts {missing}"
    return json.loads((run / "metrics.json").read_text())


def check_train(cache: str, out: Path) -> dict:
    metrics = _complete(train(_cfg(cache, out / "train"), quiet=True))
    assert metrics["amp"], "bf16 autocast should be on for CUDA"
    return {k: metrics[k] for k in ("device", "amp", "test_acc", "test_mae", "train_img_per_s")}


def check_resume(cache: str, out: Path) -> dict:
    cfg = _cfg(cache, out / "full", "train.amp=off")
    full = train(cfg, quiet=True)
    killed = out / "killed"
    real_validate, calls = train_mod.validate, {"n": 0}

    def validate_then_die(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # during epoch 2, after epoch 1 was saved
            raise KeyboardInterrupt
        return real_validate(*args, **kwargs)

    train_mod.validate = validate_then_die
    try:
        train(replace(cfg, run=replace(cfg.run, out=str(killed))), quiet=True)
        raise AssertionError("the run was meant to die in epoch 2")
    except KeyboardInterrupt:
        pass
    finally:
        train_mod.validate = real_validate
    assert cli_main(["train", "--resume", str(killed), "--quiet"]) == 0
    with (killed / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"], rows
    # cuDNN's autotuned kernels need not be bit-reproducible, so two unbroken runs may differ
    # already: the resumed run must be about as close to the first as a second unbroken run is
    again = train(replace(cfg, run=replace(cfg.run, out=str(out / "again"))), quiet=True)
    spread = _max_diff(full, again)
    diff = _max_diff(full, killed)
    assert diff <= 3 * spread, f"resumed weights differ by {diff}, two unbroken runs by {spread}"
    return {"max_abs_diff": diff, "unbroken_runs_max_abs_diff": spread}


def _max_diff(run_a: Path, run_b: Path) -> float:
    """Largest difference between two runs' last weights (BatchNorm statistics included)."""
    a, b = (load_file(str(r / "last.safetensors")) for r in (run_a, run_b))
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def check_nccl(cache: str, out: Path) -> dict:
    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)
    try:
        assert dist.get_backend() == "nccl"
        run = train(_cfg(cache, out / "nccl"), quiet=True)
    finally:
        dist.destroy_process_group()
    metrics = _complete(run)
    return {k: metrics[k] for k in ("world_size", "last_sha256", "test_acc", "test_mae")}


def check_graphs(cache: str, out: Path) -> dict:
    common = ("train.amp=off", "model.dropout=0")
    eager = train(_cfg(cache, out / "eager", *common), quiet=True)
    graphs = train(_cfg(cache, out / "graphs", *common, "train.cuda_graphs=true"), quiet=True)
    a, b = _complete(eager), _complete(graphs)
    for key in ("val_loss", "val_mae"):
        a[key], b[key] = (_last_row(r)[key] for r in (eager, graphs))
        assert abs(b[key] - a[key]) <= 0.01 * abs(a[key]), f"{key}: graphs {b[key]}, eager {a[key]}"
    load_checkpoint(graphs / "best.safetensors")
    return {
        "val_loss": [a["val_loss"], b["val_loss"]],  # eager, graphs
        "val_mae": [a["val_mae"], b["val_mae"]],
        "train_img_per_s": [a["train_img_per_s"], b["train_img_per_s"]],
        "max_abs_diff": _max_diff(eager, graphs),
    }


def _last_row(run: Path) -> dict[str, float]:
    with (run / "history.csv").open() as f:
        return {k: float(v) for k, v in list(csv.DictReader(f))[-1].items()}


CHECKS = {"train": check_train, "resume": check_resume, "nccl": check_nccl, "graphs": check_graphs}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cache", required=True, help="a prepared cache (agegender prepare)")
    p.add_argument("--out", default="/tmp/gpu_check", help="scratch folder for the runs")
    p.add_argument("--json", default=None, help="write the results here too")
    p.add_argument("--only", nargs="+", choices=list(CHECKS), help="these checks alone")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here", file=sys.stderr)
        return 2
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="check-", dir=args.out))  # train never overwrites a run
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    failed = False
    for name in args.only or list(CHECKS):
        check = CHECKS[name]
        t0 = time.perf_counter()
        try:
            r = {"ok": True, **check(args.cache, out)}
        except Exception as e:  # report every check, then fail
            traceback.print_exc()
            r, failed = {"ok": False, "error": f"{type(e).__name__}: {e}"}, True
        r["seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = r
        print(f"{name}: {json.dumps(r)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
