"""Checkpoints that rebuild their model alone: safetensors weights plus a JSON sidecar.

``best.safetensors`` holds the weights; ``best.json`` beside it holds the model's name and
constructor arguments, its data contract (input size, colour, mean/std), the epoch and the
metrics. The same JSON is also stored in the safetensors header, so the weights file alone is
enough. No pickle is ever loaded. Reading the description needs no torch: see
:mod:`agegender.inference.model_files`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from agegender.core import fileio
from agegender.core.errors import DataError
from agegender.data.near_dups import SIGNATURE_VERSION, SeenRecord
from agegender.inference.model_files import (
    FORMAT,
    SEEN_HASHES,
    SEEN_SIGNATURES,
    VERSION,
    read_meta,
    read_seen,
)
from agegender.training.models import LEGACY_ARGS, create_model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile and DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    extra: dict[str, Any] | None = None,
    half: bool = False,
    seen: SeenRecord | None = None,
) -> Path:
    """Write ``model`` to ``path`` (.safetensors) and its sidecar (.json), atomically.

    ``half`` stores float weights as fp16 (half the size; for bundling a final model).
    ``seen``: the record of the images it was trained and validated on, kept in the weights
    file beside the tensors (``evaluate`` leaves those images and their near-copies out).
    """
    path = Path(path)
    model = unwrap(model)
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
    if seen is not None:
        state[SEEN_HASHES] = torch.from_numpy(np.ascontiguousarray(seen.hashes))
        state[SEEN_SIGNATURES] = torch.from_numpy(np.ascontiguousarray(seen.signatures))
        meta["seen"] = {"images": len(seen), "signature_version": SIGNATURE_VERSION}
    text = json.dumps(meta, indent=1, default=str)
    with fileio.atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"agegender": text})
    fileio.write_text(path.with_suffix(".json"), text + "\n")
    return path


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    """The model's tensors of a checkpoint (its record of training images left out)."""
    state = load_file(str(path), device=str(device))
    return {k: v for k, v in state.items() if k not in (SEEN_HASHES, SEEN_SIGNATURES)}


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from a checkpoint alone; returns ``(model in eval mode, metadata)``.

    A corrupt sidecar or weights file raises :class:`~agegender.core.errors.DataError` naming it.
    """
    meta = read_meta(path)
    cfg = {LEGACY_ARGS.get(k, k): v for k, v in meta["model"].items()}
    model = create_model(cfg.pop("name"), **cfg)
    try:
        state = load_weights(path)
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


def save_ensemble(
    members: list[str | os.PathLike], path: str | os.PathLike, tta: bool = True
) -> Path:
    """One checkpoint of an :class:`~agegender.training.models.Ensemble` of ``members``
    (checkpoints), written to ``path``: their weights as they are, the record of every image
    any of them saw, and a recipe that runs it with flip TTA when ``tta``."""
    nets, seen = [], None
    for member in members:
        net, _ = load_checkpoint(member)
        nets.append(net)
        record = read_seen(member)
        seen = record if seen is None else (seen + record if record is not None else seen)
    ensemble = create_model("ensemble", members=[net.config for net in nets])
    for slot, net in zip(ensemble.members, nets):
        slot.load_state_dict(net.state_dict())
    extra = {"epoch": 0, "metrics": {}, "config": {"train": {"tta": tta}}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(path, ensemble, extra, seen=seen)
