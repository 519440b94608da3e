"""Models on disk, without torch: which file a name means, and what its metadata says.

A checkpoint is ``NAME.safetensors`` (weights) plus ``NAME.json`` (the model's name and
constructor arguments, its ``data_config``, epoch, metrics, recipe); the same JSON is also in
the safetensors header, so the weights file alone is enough. An exported model is
``NAME.onnx`` with the same description in its ``metadata_props``. This module reads the
description of either (the safetensors header by hand: it is 8 bytes of length and a JSON
object) and checks it, so a damaged or edited file is a one-line error, not a traceback later.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from agegender.core.errors import AgeGenderError, DataError
from agegender.data.near_dups import BYTES as SIGNATURE_BYTES
from agegender.data.near_dups import SeenRecord
from agegender.vision.images import COLORS, INTERPOLATIONS

FORMAT = "agegender-checkpoint"
VERSION = 1
WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
#: the models that come with the package: ``default`` (distilled for speed) and ``accurate``
#: (the larger model it learnt from)
BUNDLED_NAMES = ("default", "accurate")


def bundled(name: str = "default") -> Path:
    """The weights file of a bundled model (``default`` is ``accurate`` where no distilled
    model is bundled)."""
    path = WEIGHTS / f"{name}.safetensors"
    if name == "default" and not path.is_file():
        return WEIGHTS / "accurate.safetensors"
    return path


BUNDLED = bundled("default")
#: the largest input side a model may declare (``prepare --size`` takes 16-1024 too)
MAX_SIDE = 1024


def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """A bundled model's name (``default``, ``accurate``), a run folder (its
    ``best.safetensors``) or a file."""
    if str(spec) in BUNDLED_NAMES:
        path = bundled(str(spec))
        if not path.is_file():
            raise AgeGenderError(
                f"no bundled model {spec!r} in this installation; pass a run folder or a checkpoint"
            )
        return path
    path = Path(spec)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                return path / name
        raise AgeGenderError(f"{spec} is a folder without best.safetensors or last.safetensors")
    if not path.is_file():
        raise AgeGenderError(
            f"no such model: {spec} (give default, accurate, a run folder or a checkpoint)"
        )
    return path


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header, read without the library."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                raise ValueError(f"a header of {n:,} bytes")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not a safetensors checkpoint: {e}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


#: tensors of a checkpoint that are not the model's: the record of what it was trained on
SEEN_HASHES, SEEN_SIGNATURES = "agegender.seen.hashes", "agegender.seen.signatures"


def read_seen(path: str | os.PathLike) -> SeenRecord | None:
    """The record of the images a checkpoint was trained and validated on, or None when it
    has none (read without torch: the two uint8 tensors' bytes, by the header's offsets)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            if SEEN_HASHES not in header or SEEN_SIGNATURES not in header:
                return None
            arrays = []
            for key in (SEEN_HASHES, SEEN_SIGNATURES):
                info = header[key]
                if info["dtype"] != "U8":
                    raise ValueError(f"{key} is {info['dtype']}, not U8")
                start, end = info["data_offsets"]
                f.seek(8 + n + start)
                data = np.frombuffer(f.read(end - start), np.uint8)
                arrays.append(data.reshape(info["shape"]))
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise DataError(f"{path}: its record of training images is unreadable: {e}") from None
    if arrays[1].ndim != 2 or arrays[1].shape[1] != SIGNATURE_BYTES:
        raise DataError(
            f"{path}: its record of training images was made by an older version (signatures "
            f"of {arrays[1].shape[-1]} bytes, not {SIGNATURE_BYTES}): refresh it with "
            "python tools/record_seen.py --refresh CHECKPOINT CACHE"
        )
    return SeenRecord(*arrays)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The description of a checkpoint (from ``.json``, else from the weights' header).

    Raises :class:`~agegender.core.errors.DataError` naming the file when the metadata is not JSON,
    lacks the model's description (``model`` with its ``name``, ``data_config``), or holds a
    ``data_config`` no model can have.
    """
    path = Path(path)
    if not path.is_file():
        raise AgeGenderError(f"no such checkpoint: {path}")
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        source = sidecar
        try:
            meta = json.loads(sidecar.read_text())
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise DataError(f"corrupt checkpoint metadata {sidecar}: not JSON ({e})") from None
    else:
        source = path
        try:
            meta = json.loads(safetensors_metadata(path).get("agegender", "{}"))
        except ValueError as e:
            raise DataError(f"corrupt checkpoint metadata in {path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{source} is not an agegender checkpoint (no model description)")
    model = meta.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise DataError(f"corrupt checkpoint metadata {source}: no model name")
    problem = data_config_problem(meta.get("data_config"))
    if problem:
        raise DataError(f"corrupt checkpoint metadata {source}: {problem}")
    return meta


def data_config_problem(cfg: Any) -> str | None:
    """What is wrong with a model's ``data_config``, or None when a model can have it."""
    if not isinstance(cfg, dict) or not {"input_size", "color"} <= cfg.keys():
        return "no data_config (input_size, color)"
    size, color = cfg["input_size"], cfg["color"]
    if color not in COLORS:
        return f"data_config color {color!r} is not one of {', '.join(COLORS)}"
    chans = 1 if color == "gray" else 3
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)
        or size[0] != chans
        or size[1] != size[2]
        or not 16 <= size[1] <= MAX_SIDE
    ):
        return (
            f"data_config input_size {size!r} is not [channels, side, side] with {chans} "
            f"channel(s) for {color} and a side of 16-{MAX_SIDE}"
        )
    for key in ("mean", "std"):
        v = cfg.get(key, [0.5] * chans)
        if (
            not isinstance(v, (list, tuple))
            or len(v) != chans
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
            or (key == "std" and not all(x > 0 for x in v))
        ):
            return f"data_config {key} {v!r} is not {chans} number(s){' > 0' * (key == 'std')}"
    interp = cfg.get("interpolation", "bilinear")
    if interp not in INTERPOLATIONS:
        return f"data_config interpolation {interp!r} is not one of {', '.join(INTERPOLATIONS)}"
    return None


# --------------------------------------------------------------------------- ONNX files


class NeedsExport(AgeGenderError):
    """A checkpoint with no usable ONNX file: missing, older than the weights, or damaged.

    Prediction opens ONNX files only; turning a checkpoint into one needs torch, so it is a
    training-side step (``agegender export``, or
    :func:`agegender.training.loading.open_predictor`, which exports and retries).
    """

    def __init__(self, checkpoint: Path, target: Path, why: str) -> None:
        self.checkpoint, self.target = checkpoint, target
        super().__init__(
            f"{checkpoint} has no {why} ONNX model: make one with agegender export --model "
            f'{checkpoint} --onnx {target} (needs pip install "agegender[train]")'
        )


def export_target(checkpoint: Path) -> Path:
    """Where the fp32 ONNX export of ``checkpoint`` lives: beside it, or in the user's cache
    for a bundled model (the package folder may be read-only)."""
    if checkpoint.parent.resolve() == WEIGHTS.resolve():
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        return cache / "agegender" / f"{checkpoint.stem}-{checkpoint.stat().st_size}.onnx"
    return checkpoint.with_suffix(".onnx")


def _newer(path: Path, than: Path | None) -> bool:
    return path.is_file() and (than is None or path.stat().st_mtime >= than.stat().st_mtime)


def onnx_file(model: str, precision: str, int8_fast: bool) -> tuple[Path, Path | None]:
    """``(ONNX file, the checkpoint it was exported from or None)`` for ``model``: an
    ``.onnx`` file as given, a bundled model's own file, or a checkpoint's ``NAME.int8.onnx``
    or fp32 export when newer than its weights. ``int8_fast``: whether ``precision="auto"``
    takes an int8 file.

    Raises :class:`NeedsExport` when a checkpoint has no fresh ONNX file.
    """
    spec = Path(model)
    if spec.suffix == ".onnx":
        if not spec.is_file():
            raise AgeGenderError(f"no such model: {model}")
        return spec, None
    checkpoint = None if model in BUNDLED_NAMES else resolve_checkpoint(model)
    base = (bundled(model) if checkpoint is None else checkpoint).with_suffix("")
    int8, fp32 = base.with_suffix(".int8.onnx"), base.with_suffix(".onnx")
    fresh_int8 = _newer(int8, checkpoint)
    if precision == "int8" and not fresh_int8:
        raise AgeGenderError(
            f"{model} has no int8 model ({int8.name}, newer than its weights): make one with "
            f"agegender export --int8 --model {model} --onnx {int8}"
        )
    if fresh_int8 and (precision == "int8" or (precision == "auto" and int8_fast)):
        return int8, checkpoint
    if checkpoint is None and fp32.is_file():
        return fp32, None
    checkpoint = checkpoint or resolve_checkpoint(model)
    target = export_target(checkpoint)
    if not _newer(target, checkpoint):
        raise NeedsExport(checkpoint, target, "up-to-date")
    return target, checkpoint


#: what an agegender ONNX graph must return
ONNX_OUTPUTS = ("age", "p_female")


def check_onnx_model(meta_text: str | None, inputs: list[Any], outputs: list[str], path: Path):
    """The model description an ONNX file carries (None for files exported before there was
    one), checked against the graph itself: a file's metadata is trusted no further than the
    graph bears it out, so a damaged or hostile file is a one-line error, never a traceback
    or a huge allocation.
    """
    missing = [o for o in ONNX_OUTPUTS if o not in outputs]
    if len(inputs) != 1 or missing:
        raise DataError(
            f"{path} is not an agegender model (it takes {len(inputs)} input(s) and lacks the "
            f"output(s) {', '.join(missing) or '-'}; an agegender model takes one batch of "
            f"faces and returns {', '.join(ONNX_OUTPUTS)})"
        )
    if meta_text is None:
        return None
    try:
        meta = json.loads(meta_text)
    except ValueError as e:
        raise DataError(f"{path}: its agegender metadata is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: its agegender metadata is not a JSON object")
    problem = data_config_problem(meta.get("data_config"))
    if problem:
        raise DataError(f"{path}: its agegender metadata is unusable: {problem}")
    shape = list(inputs[0].shape)
    declared = meta["data_config"]["input_size"]
    graph = [d if isinstance(d, int) else None for d in shape[1:]]
    if len(shape) != 4 or any(g is not None and g != d for g, d in zip(graph, declared)):
        raise DataError(
            f"{path}: its metadata says input {declared} but the graph takes {shape[1:]}"
        )
    return meta


def model_tta(meta: dict[str, Any]) -> bool:
    """Whether a model's recipe predicts with flip TTA (what ``tta=None`` follows)."""
    recipe = meta.get("config")
    train = recipe.get("train") if isinstance(recipe, dict) else None
    return bool(train.get("tta", False)) if isinstance(train, dict) else False
