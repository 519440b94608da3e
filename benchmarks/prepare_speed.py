"""Time `prepare` on a UTKFace folder: cold (new cache dir) and warm (cache reused).

    python benchmarks/prepare_speed.py ../shared/data/UTKFace --repeats 3 [--drop-caches]

`--drop-caches` (root only) empties the OS page cache before each cold run, so the files are
read from disk as on a first run after boot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from agegender.data.prepare import prepare
from agegender.vision.images import face_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data_dir")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--color", default="gray")
    p.add_argument("--drop-caches", action="store_true")
    args = p.parse_args()

    def timed(tmp: str) -> tuple[float, dict]:
        t = time.perf_counter()
        config = face_config(args.size, args.color)
        kw = dict(data_config=config, workers=args.workers, quiet=True)
        summary = prepare([args.data_dir], tmp, **kw)
        return time.perf_counter() - t, summary

    cold, warm = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            if args.drop_caches:
                subprocess.run(["sync"], check=True)
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
            seconds, s = timed(tmp)  # a new cache folder: every image decoded
            cold.append(seconds)
            warm.append(timed(tmp)[0])  # the same folder again: the cache is reused
    result = {
        "files": s["files_found"],
        "kept": s["kept"],
        "size": args.size,
        "color": args.color,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "drop_caches": args.drop_caches,
        "cold_median_s": round(statistics.median(cold), 2),
        "cold_runs_s": [round(x, 2) for x in cold],
        "warm_median_s": round(statistics.median(warm), 2),
        "images_per_s_cold": round(s["kept"] / statistics.median(cold)),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
