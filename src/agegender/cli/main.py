"""The ``agegender`` command: one sub-command per public function.

Each sub-command's options take their defaults from the function it calls (read from its
signature) or from :class:`~agegender.inference.options.InferenceOptions`, so a default is
declared once. Only the sub-command that runs is built, and building one imports nothing that
needs torch: every ``--help`` works in a plain install, and ``agegender predict`` never imports
torch or the training code. Errors a user can fix end in one line on stderr and exit code 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence

from agegender import __version__
from agegender.cli.args import Formatter, Handler
from agegender.cli.data import add_explore, add_prepare
from agegender.cli.demo import add_demo
from agegender.cli.evaluation import add_evaluate, add_show
from agegender.cli.predict import add_predict
from agegender.cli.serve import add_serve, add_site
from agegender.cli.training import add_export, add_summary, add_sweep, add_train
from agegender.core.errors import AgeGenderError
from agegender.core.fileio import is_disk_full

#: name -> (one-line help, the function that adds its options and returns its handler)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Handler]]] = {
    "prepare": (
        "Scan UTKFace folders, parse labels from file names, drop duplicates and bad files, "
        "split by content and decode every image once into a memory-mappable cache.",
        add_prepare,
    ),
    "explore": (
        "The study's data exploration: sample image, age/gender/race distributions, a 5x5 grid "
        "of faces and the age distribution by gender, as PNG files and summary.md.",
        add_explore,
    ),
    "train": (
        "Train a multi-task age/gender network from a TOML recipe, overridden by key=value "
        "(e.g. train.epochs=5 data.cache=cache/utk128). Writes a run folder with config.toml, "
        "history.csv, best/last checkpoints, curves.png and metrics.json.",
        add_train,
    ),
    "summary": ("Print a Keras-like table of a model's layers.", add_summary),
    "sweep": (
        "Train a grid of runs (a base recipe plus overrides, see sweeps/), evaluate each on the "
        "same test split and write results.md and results.csv.",
        add_sweep,
    ),
    "evaluate": (
        "Evaluate a model on a test split: gender accuracy and confusion, age MAE by band and "
        "decade, a per-race fairness table, calibration, age-interval coverage and speed. "
        "Writes metrics.json, report.md, predictions.csv and PNG plots to --out.",
        add_evaluate,
    ),
    "show": (
        "Predict and show: a grid of random faces titled 'true 34 F / pred 31 F', green when "
        "the gender is right and the age within 5 years, red otherwise.",
        add_show,
    ),
    "predict": (
        "Estimate age and gender of every face in photos (files or folders): detect, align "
        "to UTKFace's geometry, predict. Photos of up to 150 MP are read (those over 40 MP "
        "shrunk while decoding). Exit 0 when every image was read, 1 when some failed. A "
        "video or a camera: faces tracked from frame to frame, one estimate per person.",
        add_predict,
    ),
    "export": (
        "Export a model to ONNX (uint8 faces in, dynamic batch), in fp32 or, with --int8, "
        "statically quantised and calibrated on training faces.",
        add_export,
    ),
    "demo": (
        "Run the bundled model on a bundled public-domain photo and write the annotated image "
        "(with --synthetic, or without a bundled model: prepare and explore synthetic faces).",
        add_demo,
    ),
    "serve": (
        "Serve the model over HTTP: a web page at / (upload, drop or webcam; /private/ runs "
        "it all in the browser), POST /api/predict and /api/predict/batch, GET /health, /docs.",
        add_serve,
    ),
    "site": (
        "Write a static web page that runs detection and the model in the visitor's browser "
        "(private mode: nothing is uploaded), a folder for any static web server.",
        add_site,
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, only that sub-command gets its options (the others are
    listed by name), so that running one reads only what it needs."""
    parser = argparse.ArgumentParser(
        prog="agegender",
        description="Age and gender estimation from face images, trained on UTKFace.",
        formatter_class=Formatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"agegender {__version__}\ncode: MIT; the bundled weights: non-commercial research "
        "only (trained on UTKFace; see agegender/weights/TERMS.md)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (text, add_options) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text, formatter_class=Formatter)
        if command is None or command == name:
            p.set_defaults(func=add_options(p))
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser(next((a for a in argv if not a.startswith("-")), ""))
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling `overrides` at the first option: `train R --quiet a=1` leaves a=1
    if (
        extra
        and getattr(args, "overrides", None) is not None
        and all("=" in e and not e.startswith("-") for e in extra)
    ):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is: handled as Ctrl-C is, exit code 143."""


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM (a service manager, ``kill``, a container stopping) ends the run as Ctrl-C
    does: ``finally`` blocks remove temporary files and stop worker processes."""
    raise Terminated


def _on_sigterm() -> Callable[[], None]:
    """Install :func:`_terminated` (only possible in the main thread); returns its undoing."""
    try:
        previous = signal.signal(signal.SIGTERM, _terminated)
    except ValueError:  # not the main thread (an embedding application): leave it alone
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    undo = _on_sigterm()
    try:
        return int(args.func(args) or 0)
    except AgeGenderError as e:
        print(f"agegender {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if is_disk_full(e):  # the user's to fix, wherever it struck
            print(f"agegender {args.command}: error: {e.strerror or e}", file=sys.stderr)
            return 2
        if e.filename is None:  # not about a path the user gave: a bug to see in full
            raise
        # a path that cannot be written or read (a file where a folder should be, no
        # permission) is the user's to fix: one line, as for the errors above
        print(f"agegender {args.command}: error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print(f"agegender: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        undo()


if __name__ == "__main__":
    raise SystemExit(main())
