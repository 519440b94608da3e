"""Whether ONNX Runtime's idle threads should spin (``--spin`` / ``--no-spin``), side by side.

    python benchmarks/spin.py [--data ../shared/data/UTKFace --cache cache/utk128 --n 2308
        --single 300 --threads 2 --repeats 3 --serve-seconds 15] [--json F]

ONNX Runtime's intra-op threads spin waiting for work by default, during a run and after it.
That is fastest when nothing else wants the cores, and it takes them from whatever else does:
this process's own decoding thread, the web service's request handling, another program. For
both settings, in rounds that alternate them (``--repeats``, medians):

- **whole process**: ``agegender predict FILES --aligned --spin`` (or ``--no-spin``) on ``--n``
  test-split crops, start-up to JSONL (decoding runs in a thread beside the network);
- **batch 1, idle** and **batch 1, one core busy**: one aligned face at a time, file to answer,
  in process (``--single`` files), with nothing else running, then beside one ``while True:
  pass`` process;
- **group photo**: six faces on a 1280x886 JPEG (:func:`predict_speed.group_photo`), decode,
  detect (``yunet`` and ``yunet-fast``), align, predict, ``--group-runs`` times;
- **serve**: ``benchmarks/serve_load.py --spin`` / ``--no-spin`` (8 clients posting aligned
  faces).

Both run the same files with ``default`` at the precision ``auto`` picks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from predict_speed import (  # this folder: python puts a script's on the path
    batch1,
    cpu_record,
    emit,
    face_options,
    group_photo,
    group_time,
    test_files,
    whole_process,
)

from agegender.inference.predictor import Predictor

MODES = {"spin": True, "no spin": False}
HERE = Path(__file__).resolve().parent


def busy_batch1(predictor: Predictor, files: list[Path]) -> dict[str, float]:
    """:func:`batch1` beside one process that keeps a core busy."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # the spinner running before the first face
        return batch1(predictor, files)
    finally:
        spinner.kill()
        spinner.wait()


def flag(spin: bool) -> str:
    return "--spin" if spin else "--no-spin"


def serve(spin: bool, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "serve_load.py"), "--data", args.data, flag(spin)]
    cmd += ["--seconds", str(args.serve_seconds), "--threads", str(args.threads)]
    subprocess.run([*cmd, "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
    r = json.loads(out.read_text())
    return {k: r[k] for k in ("requests_per_s", "p50_ms", "p99_ms")} | {
        "errors": sum(r["errors"].values())
    }


def medians(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per key, the median over rounds; errors summed."""
    return {
        k: sum(r[k] for r in rows) if k == "errors" else statistics.median(r[k] for r in rows)
        for k in rows[0]
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    face_options(p)
    p.add_argument("--repeats", type=int, default=3, help="rounds over the modes")
    p.add_argument("--group-runs", type=int, default=15)
    p.add_argument("--serve-seconds", type=float, default=15.0, help="0: leave serve out")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    files = test_files(Path(args.data), Path(args.cache), args.n, args.seed)
    single = files[: args.single]
    rounds: dict[str, dict[str, list]] = {m: {} for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files_list = tmp / "files.txt"
        files_list.write_text("\n".join(str(f) for f in files))
        photo = group_photo(Path(args.data), tmp / "group.jpg")
        for _ in range(args.repeats):
            for mode, spin in MODES.items():
                r = rounds[mode]
                s, _faces = whole_process(
                    files_list, tmp / "out.jsonl", args.threads, "default", flag(spin)
                )
                r.setdefault("whole_process_s", []).append(s)
                pr = Predictor.load("default", threads=args.threads, detector=None, spin=spin)
                r.setdefault("batch1_idle", []).append(batch1(pr, single))
                r.setdefault("batch1_one_core_busy", []).append(busy_batch1(pr, single))
                del pr
                for det in ("yunet", "yunet-fast"):
                    pr = Predictor.load("default", threads=args.threads, detector=det, spin=spin)
                    r.setdefault(f"group_{det}", []).append(group_time(pr, photo, args.group_runs))
                if args.serve_seconds > 0:
                    r.setdefault("serve", []).append(serve(spin, args, tmp / "serve.json"))
    out: dict[str, Any] = {
        "cpu": cpu_record(),
        "threads": args.threads,
        "files": len(files),
        "single": len(single),
        "repeats": args.repeats,
        "modes": {},
    }
    for mode, r in rounds.items():
        out["modes"][mode] = {
            k: round(statistics.median(v), 2) if k == "whole_process_s" else medians(v)
            for k, v in r.items()
        }
    emit(out, args.json)
    print("\n| ONNX Runtime threads | whole process s | batch 1 idle ms "
          "| one core busy: median, p99 ms | group photo ms: yunet, yunet-fast "
          "| serve req/s, p99 ms |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for mode, m in out["modes"].items():
        busy = m["batch1_one_core_busy"]
        sv = m.get("serve", {})
        print(
            f"| {mode} | {m['whole_process_s']} | {m['batch1_idle']['median_ms']} | "
            f"{busy['median_ms']}, {busy['p99_ms']} | "
            f"{m['group_yunet']['median_ms']}, {m['group_yunet-fast']['median_ms']} | "
            f"{sv.get('requests_per_s', '-')}, {sv.get('p99_ms', '-')} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
