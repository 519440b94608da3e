"""What the sub-commands' parsers share: the inference options, integer ranges, defaults.

A default is declared once, by the function a command calls or by
:class:`~agegender.inference.options.InferenceOptions`; the parsers read it from there.
Building a parser imports nothing that needs torch or matplotlib: defaults are read from the
functions' source (:func:`default_of`), so every ``--help`` works in a plain install.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from agegender.core.errors import ConfigError
from agegender.inference.options import (
    AMP_CHOICES,
    BACKENDS,
    MAX_THREADS,
    PRECISIONS,
    InferenceOptions,
    option_names,
)

Handler = Callable[[argparse.Namespace], int | None]

#: the package's source folder: ``agegender.x.y`` is ``PACKAGE/x/y.py``
PACKAGE = Path(__file__).resolve().parents[1]

MODEL_HELP = (
    "default (the bundled fast model), accurate (the larger one), a run folder, a checkpoint "
    "(.safetensors) or an .onnx file"
)
DATA_HELP = (
    "a prepared cache or a plain UTKFace-style image folder (used whole, prepared at the "
    "model's size); none: the cache the run folder MODEL trained on"
)


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows a default only where there is one to show (not None, False or a suppressed one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # identity, not ==: a default of 0 is a default to show, unlike False
        if action.default is None or action.default is False or "%(default)" in text:
            return text
        return super()._get_help_string(action)  # argparse itself leaves SUPPRESS out


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[lo, hi]``, else argparse's one-line error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            span = f"{lo}-{hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value

    return parse


# --------------------------------------------------------------------------- defaults


@functools.cache
def _module_tree(module: str) -> ast.Module:
    parts = module.split(".")
    if parts[0] != "agegender":
        raise ValueError(f"default_of reads agegender's own modules, not {module}")
    return ast.parse(PACKAGE.joinpath(*parts[1:]).with_suffix(".py").read_text("utf-8"))


def _function(tree: ast.Module, attr: str) -> ast.FunctionDef:
    body: list[ast.stmt] = tree.body
    node: Any = None
    for part in attr.split("."):
        node = next(n for n in body if getattr(n, "name", None) == part)
        body = node.body
    return node


def _value(module: str, node: ast.expr) -> Any:
    """A default's value: a literal, or a module-level constant (followed through imports)."""
    if not isinstance(node, ast.Name):
        return ast.literal_eval(node)
    for stmt in _module_tree(module).body:
        if isinstance(stmt, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == node.id for t in stmt.targets
        ):
            return _value(module, stmt.value)
        if isinstance(stmt, ast.AnnAssign) and getattr(stmt.target, "id", None) == node.id:
            return _value(module, stmt.value)
        if isinstance(stmt, ast.ImportFrom) and stmt.module:
            for alias in stmt.names:
                if (alias.asname or alias.name) == node.id:
                    return _value(stmt.module, ast.Name(alias.name))
    raise ValueError(f"{module}: no constant {node.id}")


def default_of(where: str, name: str) -> Any:
    """The default of parameter ``name`` of ``where`` (``module:function``), so that the
    command line never restates what the function already says.

    Read from the module's source rather than by importing it: the commands' modules import
    torch or matplotlib, which a plain install has not, and ``--help`` must work there.
    """
    module, _, attr = where.partition(":")
    args = _function(_module_tree(module), attr).args
    positional = [*args.posonlyargs, *args.args]
    pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults))
    pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
    for arg, node in pairs:
        if arg.arg == name:
            return _value(module, node)
    raise KeyError(f"{where} has no parameter {name} with a default")


# --------------------------------------------------------------------------- shared options


def split_option(p: argparse.ArgumentParser, where: str) -> None:
    p.add_argument(
        "--split",
        choices=("train", "val", "test", "all"),
        default=default_of(where, "split"),
        help="split of a cache to use (all = every image; ignored for an image folder)",
    )


def quiet_option(p: argparse.ArgumentParser, what: str = "no progress bar") -> None:
    p.add_argument("--quiet", action="store_true", help=what)


def quarter_turns(text: str) -> tuple[int, ...]:
    """``"90,180,270"`` -> ``(90, 180, 270)``; InferenceOptions checks the angles."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected e.g. 90,180,270") from None


_OPTION_HELP = {
    "model": MODEL_HELP,
    "backend": "runtime: ONNX Runtime (no torch needed) or torch (CUDA; needs agegender[train])",
    "precision": "ONNX Runtime: auto = the model's int8 file where it has one and this CPU runs "
    "int8 fast",
    "threads": "intra-op threads (without the flag: every core this process may use)",
    "spin": "ONNX Runtime's idle threads spin waiting for work: faster one image at a time on "
    "an idle machine, slower when other threads or programs need the cores",
    "detector": "yunet-fast: one landmark refinement pass instead of two (faster per face); "
    "auto: yunet for photos, yunet-fast for video",
    "tta": "flip test-time augmentation (without the flag: as the model was trained)",
    "device": "torch's device: auto, cpu, cuda[:N] or mps",
    "amp": "bf16 autocast on torch (auto: where the hardware has it natively)",
    "rotations": "also look for faces on the photo turned by these quarter turns, e.g. "
    "90,180,270 for faces at any roll (rolls up to ~75 degrees are found without)",
}
_OPTION_KW: dict[str, dict[str, Any]] = {
    "backend": {"choices": BACKENDS},
    "precision": {"choices": PRECISIONS},
    "threads": {"type": int_in(1, MAX_THREADS), "metavar": "N"},
    "spin": {"action": argparse.BooleanOptionalAction},
    "detector": {"choices": ("yunet", "yunet-fast")},  # auto is the default, not a choice
    "tta": {"action": argparse.BooleanOptionalAction},
    "amp": {"choices": AMP_CHOICES},
    "rotations": {"type": quarter_turns, "metavar": "DEG,..."},
}


def inference_options(
    p: argparse.ArgumentParser,
    *,
    model_positional: bool = False,
    skip: Collection[str] = (),
) -> None:
    """Add the :class:`InferenceOptions` fields (but ``skip``) as options, in a group, their
    defaults the dataclass's; ``model_positional``: the model is the MODEL argument."""
    group = p.add_argument_group("how the model runs")
    defaults = {f.name: f.default for f in dataclasses.fields(InferenceOptions)}
    for name in option_names():
        if name in skip:
            continue
        if name == "model" and model_positional:
            p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
            continue
        kw = {"default": defaults[name], "help": _OPTION_HELP[name], **_OPTION_KW.get(name, {})}
        group.add_argument(f"--{name}", **kw)


def options_from(a: argparse.Namespace) -> InferenceOptions:
    """The one :class:`InferenceOptions` of a command: the parsed options it offers (the rest
    keep the dataclass's defaults); a value it refuses is a one-line ``ConfigError``."""
    try:
        return InferenceOptions(**{n: getattr(a, n) for n in option_names() if hasattr(a, n)})
    except ConfigError as e:
        # the dataclass names its field (``device: ...``); the command line, its option
        text = str(e)
        name = text.partition(":")[0]
        raise ConfigError(f"--{text}" if name in option_names() else text) from None


def require_train(what: str) -> None:
    """A one-line error naming ``pip install "agegender[train]"`` when torch is missing (for
    the commands that train, evaluate, plot or export); imported here, when a command runs."""
    from agegender.training.loading import require_torch

    require_torch(what)
