"""Batched inference on uint8 face arrays: what training's validation, evaluation, prediction
and export all share, so that the preprocessing comes from the model's own ``data_config``."""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from agegender.models import normalize


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``enabled``, else a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def to_tensor(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``(B, H, W, C)`` uint8 (a cache's layout) -> ``(B, C, H, W)`` uint8 on ``device``.

    The result is a channels_last view, which is what the convolutions prefer anyway.
    """
    x = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    return x.to(device, non_blocking=True).permute(0, 3, 1, 2)


def forward_tta(model: nn.Module, x: torch.Tensor, tta: bool) -> dict[str, torch.Tensor]:
    """Model outputs in float32, averaged with the mirrored image when ``tta``.

    Returns ``age`` (B,), ``p_female`` (B,) and, for heads that give one, ``age_std`` (B,)
    (the mirror-averaged mixture's spread: var = mean(std^2 + age^2) - mean(age)^2).
    """
    views = [x, torch.flip(x, dims=[3])] if tta else [x]
    ages, probs, second = [], [], []
    for v in views:
        out = model(v)
        age = out["age"].float()
        ages.append(age)
        probs.append(torch.sigmoid(out["gender"].float()))
        if "age_std" in out:
            second.append(out["age_std"].float() ** 2 + age**2)
    result = {"age": torch.stack(ages).mean(0), "p_female": torch.stack(probs).mean(0)}
    if second:
        var = torch.stack(second).mean(0) - result["age"] ** 2
        result["age_std"] = var.clamp_min(0).sqrt()
    return result


@torch.no_grad()
def predict_arrays(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    tta: bool = False,
    amp: bool = False,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Predict ages and genders for uint8 faces ``(N, H, W, C)`` already at the model's size.

    Returns numpy arrays ``age`` (N,), ``p_female`` (N,) and maybe ``age_std`` (N,).
    """
    device = torch.device(device)
    cfg: dict[str, Any] = model.data_config
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="predicting", unit="batch", leave=False)
    for s in starts:
        x = normalize(to_tensor(images[s : s + batch_size], device), cfg)
        with autocast(device, amp):
            out = forward_tta(model, x, tta)
        for k, v in out.items():
            parts.setdefault(k, []).append(v.float().cpu())
    return {k: torch.cat(v).numpy() for k, v in parts.items()}


def device_name(device: torch.device) -> str:
    """The GPU's name, the CPU's marketing name (Linux), or the device string."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine() or "cpu"
    return str(device)
