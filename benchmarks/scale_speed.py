"""Throughput of batch inference on this machine: ``predict --workers N`` and the Ray Data path.

    python benchmarks/scale_speed.py [--cache cache/utk128 --data ../shared/data/UTKFace
        --n 2000 --repeats 3 --json reports/speed/scale.json]

The images are ``--n`` UTKFace JPEGs of the test split of ``--cache`` (seeded), 200x200 with one
face each, predicted as photos (YuNet detection, alignment, the network: what auditing an
archive costs) and as aligned crops (the network alone). Each configuration is one whole
process, from start-up to its written output, so start-up costs count as they would for a
user; configurations alternate within each repeat and the medians are reported:

- ``predict --workers 1`` (one process, decoding in a thread beside the network), ``--workers
  2`` in input order and ``--unordered``;
- ``python -m agegender.integrations.ray`` on a local Ray instance of this machine's cores,
  ``--workers`` actors of one thread (writing Parquet): Ray's own start-up is part of it.

From the fastest: faces per second, and what 1 M faces costs in core-hours on this CPU class
(the measured rate, extrapolated linearly: one machine's figure times the number of machines
is what a cluster gives at best; Ray's scheduling and reading images from remote storage only
take from it). The CPU, its class and the load are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agegender.core import fileio
from agegender.data.cache import open_cache
from agegender.inference.runtime import cpu_info

ROOT = Path(__file__).resolve().parents[1]


def configs(files: Path, out: Path, cores: int) -> dict[str, list[str]]:
    predict = [sys.executable, "-m", "agegender.cli.main", "predict", str(files), "--quiet"]
    ray = [sys.executable, "-m", "agegender.integrations.ray", str(files)]
    return {
        "predict, 1 worker": [*predict, "--output", str(out / "w1.jsonl"), "--workers", "1"],
        f"predict, {cores} workers": [*predict, "--output", str(out / "w2.jsonl"),
                                      "--workers", str(cores)],
        f"predict, {cores} workers, unordered": [*predict, "--output", str(out / "w2u.jsonl"),
                                                 "--workers", str(cores), "--unordered"],
        f"ray data, {cores} actors": [*ray, "--output", str(out / "ray"), "--workers",
                                      str(cores), "--threads", "1"],
    }  # fmt: skip


def timed(cmd: list[str], clean: Path) -> float:
    shutil.rmtree(clean) if clean.is_dir() else clean.unlink(missing_ok=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cache", type=Path, default=ROOT / "cache/utk128")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/UTKFace")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ray", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    cache = open_cache(a.cache)
    test = [p for p, s in zip(cache.paths, cache.split) if s == "test"]
    chosen = random.Random(a.seed).sample(test, min(a.n, len(test)))
    cores = int(cpu_info()["cores"] or os.cpu_count() or 1)
    result: dict[str, Any] = {"cpu": cpu_info(), "images": len(chosen), "load_start":
                              os.getloadavg()[0], "modes": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        files = out / "images"  # links to the chosen files: what both commands take is a folder
        files.mkdir()
        for p in chosen:
            (files / Path(p).name).symlink_to((a.data / p).resolve())
        for mode, extra in (
            ("photos (detect, align, predict)", []),
            ("aligned crops", ["--aligned"]),
        ):
            runs = {k: v + extra for k, v in configs(files, out, cores).items()}
            if not a.ray:
                runs = {k: v for k, v in runs.items() if not k.startswith("ray")}
            times: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(a.repeats):
                for name, cmd in runs.items():
                    target = Path(cmd[cmd.index("--output") + 1])
                    times[name].append(timed(cmd, target))
            rows = {}
            for name, t in times.items():
                s = statistics.median(t)
                rows[name] = {"seconds": round(s, 2), "images_per_s": round(len(chosen) / s, 1)}
            best = max(rows, key=lambda k: rows[k]["images_per_s"])
            rate = rows[best]["images_per_s"]
            rows["fastest"] = {
                "config": best,
                "core_hours_per_million": round(1e6 / rate / 3600 * cores, 2),
                "hours_per_million_on_this_machine": round(1e6 / rate / 3600, 2),
            }
            result["modes"][mode] = rows
            print(mode, json.dumps(rows, indent=1), flush=True)
    result["load_end"] = os.getloadavg()[0]
    text = json.dumps(result, indent=1)
    if a.json:
        fileio.write_text(a.json, text + "\n")
    print(text)


if __name__ == "__main__":
    main()
