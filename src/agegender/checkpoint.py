"""Checkpoints that rebuild their model alone: safetensors weights plus a JSON sidecar.

``best.safetensors`` holds the weights; ``best.json`` beside it holds the model's name and
constructor arguments, its data contract (input size, colour, mean/std), the epoch and the
metrics. The same JSON is also stored in the safetensors header, so the weights file alone is
enough. No pickle is ever loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from agegender.errors import AgeGenderError, DataError
from agegender.models import create_model

FORMAT = "agegender-checkpoint"
VERSION = 1


def atomic_replace(tmp: Path, path: Path) -> None:
    """Move a fully written ``tmp`` over ``path``: a killed write never leaves half a file."""
    os.replace(tmp, path)


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    extra: dict[str, Any] | None = None,
    half: bool = False,
) -> Path:
    """Write ``model`` to ``path`` (.safetensors) and its sidecar (.json), atomically.

    ``half`` stores float weights as fp16 (half the size; for bundling a final model).
    """
    path = Path(path)
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": model.config,
        "data_config": model.data_config,
        **(extra or {}),
    }
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu").contiguous()
        if half and v.is_floating_point():
            v = v.half()
        state[k] = v
    text = json.dumps(meta, indent=1, default=str)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"agegender": text})
    atomic_replace(tmp, path)
    sidecar = path.with_suffix(".json")
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(text + "\n")
    atomic_replace(tmp, sidecar)
    return path


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar metadata of a checkpoint (from ``.json``, else from the weights' header).

    Raises :class:`~agegender.errors.DataError` naming the file when the metadata is not JSON or
    lacks the model's description (``model`` with its ``name``, ``data_config``).
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
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("agegender", "{}"))
        except Exception as e:
            raise DataError(f"{path} is not a safetensors checkpoint: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{source} is not an agegender checkpoint (no model description)")
    model, data_config = meta.get("model"), meta.get("data_config")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise DataError(f"corrupt checkpoint metadata {source}: no model name")
    if not isinstance(data_config, dict) or not {"input_size", "color"} <= data_config.keys():
        raise DataError(f"corrupt checkpoint metadata {source}: no data_config (input_size, color)")
    return meta


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from a checkpoint alone; returns ``(model in eval mode, metadata)``.

    A corrupt sidecar or weights file raises :class:`~agegender.errors.DataError` naming it.
    """
    meta = read_meta(path)
    cfg = dict(meta["model"])
    model = create_model(cfg.pop("name"), **cfg)
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:  # truncated or overwritten: safetensors' own error types vary
        raise DataError(f"corrupt checkpoint weights {path}: {e}") from None
    reference = model.state_dict()
    state = {k: v.to(reference[k].dtype) if k in reference else v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # same names, other shapes: weights from another configuration
        msg = str(e).strip().splitlines()[-1].strip()
        raise DataError(f"{path} does not match model {meta['model']['name']}: {msg}") from None
    if missing or unexpected:
        raise DataError(
            f"{path} does not match model {meta['model']['name']}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.to(device).eval(), meta


BUNDLED = Path(__file__).parent / "weights" / "default.safetensors"


def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """``default`` (the bundled model), a run folder (its ``best.safetensors``) or a file."""
    if str(spec) == "default":
        if not BUNDLED.is_file():
            raise AgeGenderError(
                "no bundled model in this installation; pass a run folder or a checkpoint"
            )
        return BUNDLED
    path = Path(spec)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                return path / name
        raise AgeGenderError(f"{spec} is a folder without best.safetensors or last.safetensors")
    if not path.is_file():
        raise AgeGenderError(f"no such model: {spec} (give default, a run folder or a checkpoint)")
    return path
