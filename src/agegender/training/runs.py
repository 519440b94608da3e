"""Run folders: where a training run goes, what marks one, its history and its curves.

A run folder holds ``config.toml`` (the resolved recipe), ``history.csv`` (one row per epoch),
``best``/``last`` checkpoints, ``last.state.pt`` (what ``--resume`` needs), ``curves.png`` and,
once finished, ``metrics.json`` and ``best.onnx`` (what prediction opens, without torch). No
torch here: reports and sweeps read run folders too.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from agegender.core import fileio
from agegender.core.config import Config
from agegender.core.errors import ConfigError

HISTORY_COLUMNS = (
    "epoch",
    "train_loss",
    "train_acc",
    "train_mae",
    "val_loss",
    "val_acc",
    "val_mae",
    "lr",
    "seconds",
    "img_per_s",
)

# what makes a folder a run: continuing it is --resume's job, and writing over it loses it
RUN_FILES = ("metrics.json", "last.state.pt", "last.safetensors", "best.safetensors")


#: a run's name is its folder's: one path component, no "..", nothing hidden
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")


def is_run_name(name: object) -> bool:
    """Whether ``name`` can name a run's folder: a plain name of letters, digits, ``_.+-``."""
    return isinstance(name, str) and bool(RUN_NAME.fullmatch(name)) and ".." not in name


def check_run_name(name: object) -> None:
    """Refuse a ``run.name`` that would put the run anywhere but ``runs/train/<name>``."""
    if not is_run_name(name):
        raise ConfigError(
            f"run.name {name!r} must be a plain name (letters, digits, _ . + -): it names the "
            "run's folder under runs/train"
        )


def check_new_run_dir(out: Path) -> None:
    """Refuse a ``run.out`` that already holds a run."""
    held = [f for f in RUN_FILES if (out / f).exists()]
    if held:
        raise ConfigError(
            f"run.out={out} already holds a run ({', '.join(held)}): continue it with "
            f"`agegender train --resume {out}`, or give another run.out"
        )


def run_dir(cfg: Config) -> Path:
    """``run.out``, or ``runs/train/<name>``, ``<name>2``, ... (the first that does not exist)."""
    if cfg.run.out:
        return Path(cfg.run.out)
    check_run_name(cfg.run.name)
    base = Path("runs") / "train" / cfg.run.name
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{cfg.run.name}{k}")
    return path


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    with fileio.atomic_write(path, newline="") as f:
        w = csv.DictWriter(f, HISTORY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for h in history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in h.items()})


def read_history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [
            {k: (int(v) if k == "epoch" else float(v)) for k, v in r.items()}
            for r in csv.DictReader(f)
        ]


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """The study's three plots: gender accuracy, overall loss and age MAE, train vs val."""
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(14, 4))
    axes = fig.subplots(1, 3)
    for ax, key, title in zip(
        axes, ("acc", "loss", "mae"), ("Gender accuracy", "Overall loss", "Age MAE (years)")
    ):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", ms=3, label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "o-", ms=3, label="validation")
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with fileio.atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=100)
