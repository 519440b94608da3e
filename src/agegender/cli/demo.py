"""``agegender demo``: the bundled model on the bundled photo, or the synthetic-data demo."""

from __future__ import annotations

import argparse
from pathlib import Path

from agegender.cli.args import Handler, int_in, require_train


def add_demo(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--out", default="demo-output", help="where to write the results")
    p.add_argument("--synthetic", action="store_true", help="the synthetic data demo")
    p.add_argument("--n", type=int_in(10, 100_000), default=200, help="number of synthetic faces")

    def run(a: argparse.Namespace) -> int:
        from agegender.inference.model_files import BUNDLED

        out = Path(a.out)
        if a.synthetic or not BUNDLED.is_file():
            require_train("demo --synthetic")  # its plots need matplotlib
            return _synthetic_demo(out, a.n)
        return _photo_demo(out)

    return run


def _photo_demo(out: Path) -> int:
    from agegender.core import fileio
    from agegender.inference.draw import annotate
    from agegender.inference.predictor import ASTRONAUT, Predictor

    faces = Predictor.load("default").predict(ASTRONAUT)
    target = out / "astronaut.jpg"
    with fileio.output_path(target, "image", [ASTRONAUT], "--out") as tmp:
        annotate(ASTRONAUT, faces).save(tmp, format="JPEG", quality=92)
    print(f"{ASTRONAUT.name} (NASA portrait of Eileen Collins, public domain):")
    for f in faces:
        print(f"  {f.label():16s} p_female {f.p_female:.2f}  box {[round(v) for v in f.box]}")
    print(f"annotated image: {target}")
    return 0


def _synthetic_demo(out: Path, n: int) -> int:
    import tempfile

    from agegender.data.prepare import prepare
    from agegender.data.summary import format_summary
    from agegender.data.synthetic import make_dataset
    from agegender.evaluation.explore import explore
    from agegender.vision.images import face_config

    with tempfile.TemporaryDirectory() as tmp:
        print(f"Generating {n} synthetic faces (UTKFace-style names) ...")
        make_dataset(Path(tmp) / "faces", n=n, size=96, seed=0)
        summary = prepare([Path(tmp) / "faces"], out / "cache", face_config(64), quiet=True)
        print(format_summary(summary))
        files = explore(out / "cache", out / "explore")
    print(f"Exploration plots: {', '.join(str(f) for f in files)}")
    return 0
