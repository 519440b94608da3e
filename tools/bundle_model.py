"""Copy a run's best checkpoint into the package as the bundled default model (fp16 weights).

    python tools/bundle_model.py runs/default-cpu [--cache cache/utk128]

Checks that fp16 storage keeps the test metrics (gender accuracy within 0.1 point, MAE within
0.02 years of the fp32 checkpoint) before it writes anything.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from agegender.checkpoint import BUNDLED, load_checkpoint, read_meta, save_checkpoint
from agegender.commands.evaluate import evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", help="run folder (its best.safetensors is bundled)")
    p.add_argument("--cache", default=None, help="prepared cache to check on (default: the run's)")
    args = p.parse_args()

    src = Path(args.run) / "best.safetensors"
    model, meta = load_checkpoint(src)
    extra = {k: meta[k] for k in ("epoch", "metrics", "config") if k in meta}
    with tempfile.TemporaryDirectory() as tmp:
        half = save_checkpoint(Path(tmp) / "half.safetensors", model, extra, half=True)
        kw = {"data": args.cache, "split": "test", "timing": False, "quiet": True}
        full_m = evaluate(src, out_dir=Path(tmp) / "full", **kw)
        half_m = evaluate(half, out_dir=Path(tmp) / "half", **kw)
    for key, tol in (("gender_accuracy", 1e-3), ("age_mae", 0.02)):
        a, b = full_m[key], half_m[key]
        print(f"{key}: fp32 {a:.4f}  fp16 {b:.4f}")
        if abs(a - b) > tol:
            raise SystemExit(f"fp16 storage changes {key} by more than {tol}: not bundled")
    BUNDLED.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(BUNDLED, model, extra, half=True)
    print(f"bundled {src} -> {BUNDLED} ({BUNDLED.stat().st_size / 1e6:.1f} MB)")
    print(json.dumps(read_meta(BUNDLED)["model"]))


if __name__ == "__main__":
    main()
