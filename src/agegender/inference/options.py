"""How a model runs: one frozen object, validated once, taken by every way of predicting.

The Python API (:meth:`~agegender.inference.predictor.Predictor.load`), ``agegender predict``
(photos and video), ``agegender serve`` and ``agegender evaluate`` all take an
:class:`InferenceOptions`, so each option has one default, here.

>>> opts = InferenceOptions(model="accurate", precision="fp32")
>>> opts.replace(tta=True).tta, opts.backend
(True, 'onnx')
>>> InferenceOptions(precision="int4")
Traceback (most recent call last):
agegender.core.errors.ConfigError: precision: unknown value 'int4'; valid: auto, fp32, int8
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any

from agegender.core.errors import ConfigError
from agegender.vision.detect import check_rotations, list_detectors

BACKENDS = ("onnx", "torch")
PRECISIONS = ("auto", "fp32", "int8")
AMP_CHOICES = ("auto", "bf16", "off")
#: ``detector="auto"``: the detector each kind of input measured best with
#: (``benchmarks/predict_speed.py``, ``benchmarks/video_speed.py``): on a video, pooling a
#: person's frames makes up for the faster detector's coarser landmarks
AUTO_DETECTOR = {"photo": "yunet", "video": "yunet-fast"}
#: far above any machine's cores: a larger count only costs memory and time
MAX_THREADS = 256


def _choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{name}: unknown value {value!r}; valid: {', '.join(valid)}")


@dataclass(frozen=True)
class InferenceOptions:
    """What to run and how.

    Attributes:
        model: ``default`` (the bundled fast model), ``accurate`` (the bundled larger one), a
            run folder, a checkpoint (``.safetensors``) or an ``.onnx`` file.
        backend: ``onnx`` (ONNX Runtime on the CPU, no torch needed) or ``torch`` (for CUDA
            users; needs ``agegender[train]``; ``device`` and ``amp`` apply to it only).
        precision: ONNX Runtime: ``auto`` takes a model's int8 file where it has one and the
            CPU runs int8 fast (AVX2 and up); ``int8`` or ``fp32`` insist.
        threads: intra-op threads; None: every core this process may use.
        spin: ONNX Runtime's idle threads spin waiting for work (fastest one image at a time on
            an idle machine) or sleep (leaving the cores to decoding, detection, HTTP and
            other programs: ``benchmarks/spin.py``). None: spin only without a detector.
        detector: ``yunet``, ``yunet-fast``, ``auto`` (yunet for photos, yunet-fast for video)
            or None (aligned face crops only).
        rotations: quarter turns of the photo the detector also tries, e.g. ``(90, 180, 270)``
            for faces at any roll (sideways or upside-down photos without EXIF): multiples of 90
            within 0-270. Faces rolled up to ~75 degrees are found without them; each turn
            adds the upright coarse passes' cost again (about +25 ms a photo at 640 px on a
            2-core EPYC, ``benchmarks/detector_accuracy.py``).
        tta: mirror test-time augmentation; None follows the model's recipe.
        device: torch's device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        amp: torch's bf16 autocast: ``auto`` where the hardware does bf16 natively, ``bf16``,
            ``off``.
    """

    model: str = "default"
    backend: str = "onnx"
    precision: str = "auto"
    threads: int | None = None
    spin: bool | None = None
    detector: str | None = "auto"
    rotations: tuple[int, ...] = ()
    tta: bool | None = None
    device: str = "auto"
    amp: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.model, os.PathLike):
            object.__setattr__(self, "model", os.fspath(self.model))
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"model: give a name, a folder or a file, got {self.model!r}")
        _choice("backend", self.backend, BACKENDS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("amp", self.amp, AMP_CHOICES)
        if self.detector is not None:
            _choice("detector", self.detector, ("auto", *list_detectors()))
        # a list (JSON, argparse's nargs) is taken as the tuple it means
        object.__setattr__(self, "rotations", check_rotations(self.rotations, "rotations"))
        if self.threads is not None and not (
            isinstance(self.threads, int) and 1 <= self.threads <= MAX_THREADS
        ):
            raise ConfigError(f"threads: must be 1-{MAX_THREADS} or None, got {self.threads!r}")
        for name in ("spin", "tta"):
            if getattr(self, name) not in (None, True, False):
                raise ConfigError(f"{name}: must be true, false or None")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(self.device)):
            raise ConfigError(
                f"device: unknown device {self.device!r}; valid: auto, cpu, cuda, cuda:N, mps"
            )
        if self.backend == "onnx" and self.device not in ("auto", "cpu"):
            raise ConfigError(f"device {self.device} runs on torch: add backend torch")

    def replace(self, **changes: Any) -> InferenceOptions:
        """A copy with ``changes``, validated like the original."""
        return dataclasses.replace(self, **changes)

    def detector_for(self, kind: str) -> str | None:
        """The detector to build for ``kind`` (``photo`` or ``video``) of input."""
        return AUTO_DETECTOR[kind] if self.detector == "auto" else self.detector

    @property
    def spins(self) -> bool:
        """Whether ONNX Runtime's idle threads spin (``spin``, or its default)."""
        return self.detector is None if self.spin is None else self.spin


def option_names() -> tuple[str, ...]:
    """The options' names, in declaration order (what the command line offers)."""
    return tuple(f.name for f in dataclasses.fields(InferenceOptions))
