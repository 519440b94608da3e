"""The inference runtime on torch: devices, bf16 autocast, batched forward passes with TTA.

What training's validation, evaluation, the ``--backend torch`` predictor and export share, so
that preprocessing comes from the model's own ``data_config`` and the views of a face are
merged by :func:`agegender.inference.runtime.merge_views`, the one formula every backend uses.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

try:
    import resource
except ImportError:  # Windows
    resource = None
from typing import Any

import numpy as np
import torch
from torch import nn

from agegender.core.errors import ConfigError
from agegender.core.progress import progress_bar
from agegender.inference.runtime import cpu_info, merge_views
from agegender.training.models import normalize

AMP_CHOICES = ("auto", "bf16", "off")


def resolve_device(name: str, option: str = "train.device") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu. ``option`` names the setting in error messages
    (``train.device`` for a recipe, ``--device`` for the commands that take the flag)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"{option}: unknown device {name!r}; valid: auto, cpu, cuda, cuda:N, mps"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}={name} but no CUDA GPU is available")
    return device


def use_amp(device: torch.device, amp: str) -> bool:
    """bf16 autocast: on CUDA, and on CPUs with native bf16 (AMX, AVX512-BF16), where it is
    1.5-3x faster than fp32; off on MPS and on other CPUs, where it is emulated and slow."""
    if amp not in AMP_CHOICES:
        raise ConfigError(f"unknown amp {amp!r}; valid: {', '.join(AMP_CHOICES)}")
    if amp == "off":
        return False
    if amp == "bf16":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_bf16_native()
    return False


def cpu_bf16_native() -> bool:
    """Whether torch's CPU kernels run bf16 natively here: the CPU has AMX or AVX512-BF16 and
    torch uses it. AVX-512 alone (Skylake, Cascade Lake) is not enough: oneDNN emulates bf16
    there, slower than fp32. ``ATEN_CPU_CAPABILITY=avx2`` or ``ONEDNN_MAX_CPU_ISA=AVX2`` (an
    AVX2 machine's kernels on a newer CPU) turn it off as well."""
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    if not cpu_info()["bf16"] or capability not in ("AVX512", "AMX"):
        return False
    try:  # oneDNN's own check: it reads ONEDNN_MAX_CPU_ISA
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``enabled``, else a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def device_name(device: torch.device) -> str:
    """The GPU's name, the CPU's marketing name, or the device string."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return cpu_info()["name"]
    return str(device)


def to_tensor(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``(B, H, W, C)`` uint8 (a cache's layout) -> ``(B, C, H, W)`` uint8 on ``device``.

    The result is a channels_last view, which is what the convolutions prefer anyway.
    """
    x = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    return x.to(device, non_blocking=True).permute(0, 3, 1, 2)


def forward_tta(model: nn.Module, x: torch.Tensor, tta: bool) -> dict[str, torch.Tensor]:
    """Model outputs in float32 (``age``, ``p_female`` and, for heads that give one,
    ``age_std``, each (B,)), merged with the mirrored image's when ``tta``."""
    views = []
    for v in [x, torch.flip(x, dims=[3])] if tta else [x]:
        out = model(v)
        view = {"age": out["age"].float(), "p_female": torch.sigmoid(out["gender"].float())}
        if "age_std" in out:
            view["age_std"] = out["age_std"].float()
            view["age_probs"] = out["age_logits"].float().softmax(dim=-1)
        views.append(view)
    return merge_views(views)


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
        starts = progress_bar(starts, desc="predicting", unit="batch")
    for s in starts:
        x = normalize(to_tensor(images[s : s + batch_size], device), cfg)
        with autocast(device, amp):
            out = forward_tta(model, x, tta)
        for k, v in out.items():
            parts.setdefault(k, []).append(v.float().cpu())
    return {k: torch.cat(v).numpy() for k, v in parts.items()}


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory on CUDA; the process's peak resident memory elsewhere."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    if resource is None:  # Windows
        return float("nan")
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


class TorchBackend:
    """A torch model as a :mod:`agegender.inference.runtime` backend (CUDA users pick this one)."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        amp: bool,
        meta: dict[str, Any] | None = None,
        path: Path | None = None,
    ) -> None:
        self.model, self.device, self.amp = model, device, amp
        # what a Predictor needs of the model it runs: its description and file
        self.meta, self.path = meta, path

    def __call__(self, faces: np.ndarray, tta: bool) -> dict[str, np.ndarray]:
        return predict_arrays(
            self.model, faces, self.device, batch_size=len(faces) or 1, tta=tta, amp=self.amp
        )
