"""``agegender export``: a checkpoint as ONNX, in fp32 or statically quantised to int8."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from agegender.core import fileio
from agegender.core.errors import ConfigError, DataError
from agegender.data.cache import open_cache
from agegender.inference.model_files import read_meta, resolve_checkpoint
from agegender.training.onnx_export import export_onnx, quantize_onnx
from agegender.vision.images import preprocess_batch

CALIBRATION_IMAGES = 512  #: training faces int8's ranges are measured on


def export(
    model: str | os.PathLike = "default",
    onnx: str | os.PathLike = "agegender.onnx",
    opset: int = 18,
    int8: bool = False,
    data: str | os.PathLike | None = None,
    calibration_images: int = CALIBRATION_IMAGES,
    half_weights: bool = False,
) -> Path:
    """Write ``model`` to ``onnx``; with ``int8``, statically quantised, its activation ranges
    calibrated on ``calibration_images`` random faces of the training split of the cache
    ``data`` (never test faces). ``half_weights`` (fp32 files): weights stored as fp16, see
    :func:`agegender.training.onnx_export.export_onnx`. Returns the file written.

    ``onnx`` replaces an existing file only if that is an ``.onnx`` file, never the model's
    own checkpoint (nor another name or a hard link of it): see
    :func:`agegender.core.fileio.check_output`."""
    checkpoint = resolve_checkpoint(model)
    fileio.check_output(onnx, "ONNX", [checkpoint, checkpoint.with_suffix(".json")], "--onnx")
    if not int8:
        return export_onnx(model, onnx, opset=opset, half_weights=half_weights)
    if data is None:
        raise ConfigError("--int8 needs --data CACHE: the training faces to calibrate on")
    if calibration_images < 1:
        raise ConfigError(f"--calibration-images must be 1 or more, got {calibration_images}")
    cache = open_cache(data)
    train = cache.indices("train")
    if len(train) == 0:
        raise DataError(f"{data} has no training split to calibrate on")
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(train, min(calibration_images, len(train)), replace=False))
    config = read_meta(checkpoint)["data_config"]
    faces = preprocess_batch(np.asarray(cache.images[rows]), config)
    with tempfile.TemporaryDirectory(prefix="agegender-export-") as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", opset=opset)
        return quantize_onnx(fp32, onnx, faces)
