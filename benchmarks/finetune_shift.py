"""Does fine-tuning adapt the bundled model to a user's own camera? Measured on faces it never saw.

    python benchmarks/finetune_shift.py [--cache cache/utk128 --n 1800 --epochs 8 --threads 2
        --work /tmp/finetune-shift --json reports/own-data/finetune_shift.json]

The "own data" is ``--n`` faces of the test split of ``--cache`` (no bundled model trained on
them), seen through a poor camera the bundled models never met: low resolution (56 px, blown
up again), a gamma of 1.5 and 60 % contrast, sensor noise, heavy JPEG, written as files with a
labels CSV as a user would. Its near-duplicate groups are split two thirds / one third into the
user's own train (a tenth of it their val) and held-out test, so that no photo is on both sides.

Then, as the README's worked example does: ``prepare --labels --aligned``; ``evaluate default``
on the held-out part (before); ``train configs/finetune.toml`` from ``default`` on the user's
train part; ``evaluate`` of the fine-tuned model on the same held-out part (after), with a
``camera`` group column in the tables. Also scored before and after: the same held-out faces
as UTKFace gives them (clean), so that forgetting would show. Times each step; the CPU is named.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from agegender.core import fileio
from agegender.data.cache import open_cache
from agegender.data.utkface import GENDERS, RACES
from agegender.inference.runtime import cpu_info

ROOT = Path(__file__).resolve().parents[1]
AGEGENDER = [sys.executable, "-m", "agegender.cli.main"]


def poor_camera(face: np.ndarray, rng: np.random.Generator) -> bytes:
    """A gray 128 px UTKFace crop as a cheap, dim camera would give it, as JPEG bytes."""
    img = Image.fromarray(face.squeeze(-1))
    img = img.resize((56, 56), Image.BILINEAR).resize((200, 200), Image.BILINEAR)
    x = np.asarray(img, np.float32) / 255
    x = 0.2 + 0.6 * x**1.5  # dim and flat: gamma 1.5, contrast cut to 60 %
    x = x + rng.normal(0, 0.03, x.shape)
    out = io.BytesIO()
    Image.fromarray((np.clip(x, 0, 1) * 255).astype(np.uint8)).save(out, "JPEG", quality=30)
    return out.getvalue()


def clean(face: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(face.squeeze(-1)).resize((200, 200), Image.BICUBIC).save(out, "PNG")
    return out.getvalue()


def write_set(cache_dir: Path, n: int, seed: int, work: Path) -> dict[str, int]:
    """The labelled files and ``labels.csv`` (poor camera) and ``clean.csv`` (held-out, clean)."""
    cache = open_cache(cache_dir)
    test = np.flatnonzero(cache.split == "test")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(test, size=min(n, len(test)), replace=False)
    # split by near-duplicate group: a photo and its near-copy go to the same side
    groups = sorted({cache.group[i] or cache.content_hash[i] for i in chosen})
    random.Random(seed).shuffle(groups)
    side = {g: ("held" if k % 3 == 2 else "own") for k, g in enumerate(groups)}
    files = work / "images"
    files.mkdir(parents=True, exist_ok=True)
    header = ["path", "age", "gender", "race", "camera", "split"]
    rows, clean_rows = [], []
    for k, i in enumerate(chosen):
        g = cache.group[i] or cache.content_hash[i]
        split = "test" if side[g] == "held" else ("val" if k % 10 == 0 else "train")
        label = [int(cache.age[i]), GENDERS[cache.gender[i]], RACES[cache.race[i]]]
        name = f"face{k:05d}"
        (files / f"{name}.jpg").write_bytes(poor_camera(cache.images[i], rng))
        rows.append([f"images/{name}.jpg", *label, "poor", split])
        if split == "test":
            (files / f"{name}.clean.png").write_bytes(clean(cache.images[i]))
            clean_rows.append([f"images/{name}.clean.png", *label, "clean", "test"])
    for name, table in (("labels.csv", rows), ("clean.csv", clean_rows)):
        with fileio.atomic_write(work / name, newline="") as f:
            csv.writer(f).writerows([header, *table])
    return {s: sum(r[-1] == s for r in rows) for s in ("train", "val", "test")}


def run(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return round(time.perf_counter() - t, 1)


def scores(metrics_dir: Path) -> dict[str, Any]:
    m = json.loads((metrics_dir / "metrics.json").read_text())
    return {"n": m["n"], "gender_accuracy": round(m["gender_accuracy"], 4),
            "age_mae": round(m["age_mae"], 3),
            "excluded_seen_in_training": m.get("excluded_seen_in_training")}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cache", type=Path, default=ROOT / "cache/utk128")
    ap.add_argument("--n", type=int, default=1800)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/finetune-shift"))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    work = a.work.resolve()
    if work.exists() and any(work.iterdir()):
        sys.exit(f"finetune_shift: {work} is not empty: give an empty --work folder")
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    counts = write_set(a.cache.resolve(), a.n, a.seed, work)
    seconds["write_files"] = round(time.perf_counter() - t, 1)
    prep = ["prepare", "--aligned", "--quiet"]
    seconds["prepare"] = run([*AGEGENDER, *prep, "--labels", str(work / "labels.csv"),
                              "--out", str(work / "cache")])  # fmt: skip
    run([*AGEGENDER, *prep, "--labels", str(work / "clean.csv"), "--out", str(work / "clean")])
    ev = ["evaluate", "--split", "test", "--no-timing", "--quiet"]
    result: dict[str, Any] = {"cpu": cpu_info(), "threads": a.threads, "faces": counts}
    for data in ("cache", "clean"):
        out = work / f"eval-before-{data}"
        run([*AGEGENDER, *ev, "default", "--data", str(work / data), "--out", str(out)])
        result[f"before_{data}"] = scores(out)
    recipe = ["configs/finetune.toml", f"data.cache={work / 'cache'}", f"run.out={work / 'run'}",
              f"train.epochs={a.epochs}", f"train.threads={a.threads}"]  # fmt: skip
    seconds["finetune"] = run([*AGEGENDER, "train", *recipe])
    for data in ("cache", "clean"):
        out = work / f"eval-after-{data}"
        run([*AGEGENDER, *ev, str(work / "run"), "--data", str(work / data), "--out", str(out)])
        result[f"after_{data}"] = scores(out)
    result["seconds"] = seconds
    text = json.dumps(result, indent=1)
    print(text)
    if a.json:
        fileio.write_text(a.json, text + "\n")
    b, f = result["before_cache"], result["after_cache"]
    print(f"\nheld-out poor-camera faces ({b['n']}): gender {b['gender_accuracy']:.1%} -> "
          f"{f['gender_accuracy']:.1%}, MAE {b['age_mae']:.2f} -> {f['age_mae']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
