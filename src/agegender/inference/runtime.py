"""The inference runtime without torch: ONNX Runtime sessions, the test-time-augmentation
merge, the age interval and what the CPU can do.

A backend maps uint8 faces ``(B, H, W, C)`` (already at the model's size, see
:func:`agegender.vision.images.preprocess`) and a ``tta`` flag to NumPy arrays ``age`` (B,),
``p_female`` (B,) and, for heads with a spread, ``age_std`` (B,). :class:`OnnxBackend` is the
default; :class:`agegender.training.torch_backend.TorchBackend` has the same interface.

>>> views = [{"age": np.array([30.0]), "p_female": np.array([0.8]), "age_std": np.array([3.0])},
...          {"age": np.array([34.0]), "p_female": np.array([0.6]), "age_std": np.array([3.0])}]
>>> {k: v.round(3).tolist() for k, v in merge_views(views).items()}
{'age': [32.0], 'p_female': [0.7], 'age_std': [3.606]}
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from agegender.core.errors import AgeGenderError

#: the predicted age interval is age +- INTERVAL_Z * age_std: the two-sided 90 % interval of a
#: normal distribution
INTERVAL_LEVEL = 0.9
INTERVAL_Z = 1.6448536269514722


def merge_views(views: list[dict[str, Any]]) -> dict[str, Any]:
    """Average the outputs of several views of the same faces (the image and its mirror).

    ``age`` and ``p_female`` are averaged; ``age_std`` is the spread of the equal mixture of
    the views' distributions: ``var = mean(std^2 + age^2) - mean(age)^2``. Works on NumPy
    arrays and on torch tensors alike (only arithmetic and ``clip``), so that every backend and
    training's validation merge the same way.
    """
    n = len(views)
    age = sum(v["age"] for v in views) / n
    out = {"age": age, "p_female": sum(v["p_female"] for v in views) / n}
    if all("age_std" in v for v in views):
        second = sum(v["age_std"] ** 2 + v["age"] ** 2 for v in views) / n
        out["age_std"] = (second - age**2).clip(min=0) ** 0.5
    if all("age_probs" in v for v in views):  # the mixture of the views' distributions
        out["age_probs"] = sum(v["age_probs"] for v in views) / n
    return out


def age_interval(age: float, std: float) -> tuple[float, float]:
    """The 90 % interval ``age +- INTERVAL_Z * std``, clipped at 0 years."""
    half = INTERVAL_Z * std
    return max(age - half, 0.0), age + half


# --------------------------------------------------------------------------- the CPU


def _cpuid_features() -> set[str] | None:
    """The x86 features this process's CPUID reports, as NumPy read them at import (its
    dispatch table), or None where NumPy does not say.

    CPUID, not ``/proc/cpuinfo``, is what ONNX Runtime, oneDNN and OpenCV pick their kernels
    from: the two differ where a feature is hidden from the process (a VM, a CPUID mask such as
    ``benchmarks/avx2_only``) and ``/proc/cpuinfo`` does not exist on macOS or Windows.
    """
    try:
        try:
            from numpy._core._multiarray_umath import __cpu_features__
        except ImportError:  # NumPy 1.x
            from numpy.core._multiarray_umath import __cpu_features__
    except ImportError:
        return None
    return {name for name, on in __cpu_features__.items() if on}


@functools.cache
def cpu_info() -> dict[str, Any]:
    """The CPU's name and what this process may use of it: cores, AVX2, AVX-512, VNNI, AMX,
    bf16.

    Features come from CPUID as this process sees it (:func:`_cpuid_features`); AMX and
    AVX-VNNI (the VEX form: Alder Lake, Zen 5), which NumPy does not report, from
    ``/proc/cpuinfo``, each counted only where that agrees with what this process sees of
    AVX-512: AMX only where AVX-512 is visible (every AMX CPU has it, and hiding AVX-512 hides
    AMX), AVX-VNNI where AVX-512 is visible or the CPU has none (a process told to leave
    AVX-512 alone, as ``benchmarks/avx2_only`` does, is told to leave AVX-VNNI too). Without
    NumPy's view, from ``/proc/cpuinfo`` alone.
    """
    name, flags = platform.processor() or platform.machine() or "cpu", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    seen = _cpuid_features()
    if seen is None:
        avx2, avx512 = "avx2" in flags, "avx512f" in flags
        vnni, bf16 = bool({"avx512_vnni", "avx_vnni"} & flags), "avx512_bf16" in flags
    else:
        # AVX-512 counts where NumPy may dispatch to it (its Skylake-X target, X86_V4 in
        # NumPy 2), so that NPY_DISABLE_CPU_FEATURES hides it here as it does from NumPy
        avx2 = "AVX2" in seen
        avx512 = "AVX512F" in seen and bool({"AVX512_SKX", "X86_V4"} & seen)
        vex_vnni = "avx_vnni" in flags and (avx512 or "avx512f" not in flags)
        vnni = (avx512 and "AVX512VNNI" in seen) or vex_vnni
        bf16 = avx512 and "AVX512BF16" in seen
    amx = avx512 and "amx_tile" in flags
    return {
        "name": name,
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "avx2": avx2,
        "avx512": avx512,
        "vnni": vnni,
        "amx": amx,
        "bf16": bf16 or (amx and "amx_bf16" in flags),
    }


def cpu_class() -> str:
    """``"amx"``, ``"avx512"``, ``"avx2"`` or ``"basic"``: the class speed figures are for."""
    info = cpu_info()
    for key in ("amx", "avx512", "avx2"):
        if info[key]:
            return key
    return "basic"


def int8_is_fast() -> bool:
    """Whether int8 models beat fp32 here: ONNX Runtime's int8 kernels need AVX2 at least
    (on older x86 CPUs they fall back to slow paths; ARM has its own dot-product kernels)."""
    machine = platform.machine().lower()
    return cpu_class() != "basic" or machine in ("arm64", "aarch64")


def default_threads() -> int:
    """Intra-op threads for one inference session: every core this process may use."""
    return max(int(cpu_info()["cores"] or 1), 1)


# --------------------------------------------------------------------------- ONNX Runtime


class OnnxLoadError(AgeGenderError):
    """ONNX Runtime could not build a session from a file (its one-line reason)."""


def onnx_session(path: str | os.PathLike, threads: int | None = None, spin: bool = True) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU with ``threads`` intra-op threads.

    ``spin``: idle intra-op threads spin waiting for work (ONNX Runtime's own default: the
    lowest latency when nothing else wants the cores); ``False`` lets them sleep, which leaves
    the cores to this process's other threads (decoding the next images, answering HTTP) and to
    other programs (``benchmarks/spin.py`` times both).

    Raises :class:`OnnxLoadError` when the file is not a loadable model.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise AgeGenderError(
            "the ONNX backend needs onnxruntime: pip install onnxruntime"
        ) from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # InvalidProtobuf, NoSuchFile, Fail...: no common base class
        lines = str(e).strip().splitlines()
        raise OnnxLoadError(lines[-1] if lines else type(e).__name__) from None


class OnnxBackend:
    """ONNX Runtime on an exported graph (uint8 NCHW in, age/p_female/age_std out).

    With ``tta`` the mirrored faces ride in the same run, a batch twice as large, and the two
    views are merged by :func:`merge_views`.
    """

    def __init__(
        self, path: str | os.PathLike, threads: int | None = None, spin: bool = True
    ) -> None:
        self.path, self.spin = Path(path), spin
        self.session = onnx_session(path, threads, spin)
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]

    @property
    def metadata(self) -> dict[str, str]:
        """The file's ``metadata_props`` (what :mod:`agegender.training.onnx_export` wrote)."""
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, faces: np.ndarray, tta: bool) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(faces.transpose(0, 3, 1, 2))  # (B, H, W, C) -> (B, C, H, W)
        n = len(x)
        if tta:
            x = np.concatenate([x, x[..., ::-1]])
        res = dict(zip(self.outputs, self.session.run(None, {self.input: x})))
        views = [{k: v[:n] for k, v in res.items()}]
        if tta:
            views.append({k: v[n:] for k, v in res.items()})
        return merge_views(views)
