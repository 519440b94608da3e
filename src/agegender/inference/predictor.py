"""Age and gender for every face in ordinary photos: detect, align, predict.

>>> from agegender import Predictor
>>> predictor = Predictor.load()                       # the bundled model, no download
>>> faces = predictor.predict(ASTRONAUT)               # a path, bytes, PIL image or RGB array
>>> len(faces), faces[0].gender
(1, 'female')

Every face is a :class:`~agegender.inference.face.Face`. The command line (``agegender
predict``), the web service and this API all go through :meth:`Predictor.predict_batch`.
A predictor opens ONNX files only and imports no torch: the torch backend, and turning a
checkpoint into ONNX, are the training side's (:mod:`agegender.training.loading`).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from agegender.core.errors import AgeGenderError, ConfigError, DataError
from agegender.inference.face import Face, faces_from
from agegender.inference.model_files import (
    NeedsExport,
    check_onnx_model,
    export_target,
    model_tta,
    onnx_file,
    read_meta,
)
from agegender.inference.options import InferenceOptions
from agegender.inference.runtime import OnnxBackend, OnnxLoadError, int8_is_fast
from agegender.inference.tracking import DETECT_EVERY, Tracking
from agegender.vision.detect import face_crop, get_detector
from agegender.vision.images import load_photo, open_photo, preprocess, upright_size

ASTRONAUT = Path(__file__).resolve().parents[1] / "assets" / "astronaut.jpg"

ImageInput = str | os.PathLike | bytes | IO[bytes] | Image.Image | np.ndarray
# what locate() accepts besides file objects (anything with .read)
_IMAGE_TYPES = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray)


def as_options(
    options: InferenceOptions | str | os.PathLike | None, changes: dict[str, Any]
) -> InferenceOptions:
    """``options`` (or a model's name or path, or None for the defaults) with ``changes``."""
    if options is None or isinstance(options, (str, os.PathLike)):
        base = InferenceOptions() if options is None else InferenceOptions(model=options)
    elif isinstance(options, InferenceOptions):
        base = options
    else:
        raise TypeError(f"options must be InferenceOptions or a model, got {type(options)}")
    return base.replace(**changes) if changes else base


def open_onnx(options: InferenceOptions) -> tuple[OnnxBackend, dict[str, Any], Path]:
    """ONNX Runtime on the model ``options`` name: ``(runner, model description, file)``.

    Raises :class:`~agegender.inference.model_files.NeedsExport` for a checkpoint with no
    fresh, loadable ONNX file, and a one-line error for a file that is not an agegender model.
    """
    path, checkpoint = onnx_file(options.model, options.precision, int8_is_fast())
    try:
        runner = OnnxBackend(path, options.threads, options.spins)
    except OnnxLoadError as e:
        if checkpoint is not None and path == export_target(checkpoint):
            # an export damaged after it was written (a killed copy, a full disk) is newer
            # than the checkpoint, so the mtime check alone would keep it forever
            raise NeedsExport(checkpoint, path, "loadable") from None
        raise AgeGenderError(f"cannot load the ONNX model {path}: {e}") from None
    inputs = runner.session.get_inputs()
    meta = check_onnx_model(runner.metadata.get("agegender"), inputs, runner.outputs, path)
    if meta is None:
        if checkpoint is None:
            raise DataError(f"{path} carries no agegender model description")
        meta = read_meta(checkpoint)
    return runner, meta, checkpoint or path


class Predictor:
    """A loaded model (plus a face detector) that estimates age and gender.

    Load once and reuse: loading opens the network and the detector. Use :meth:`load`.
    """

    def __init__(
        self, runner: Any, meta: dict[str, Any], options: InferenceOptions, path: Path
    ) -> None:
        self.backend = runner  # called with uint8 faces (B, H, W, C) and the tta flag
        self.meta = meta
        self.options = options
        self.checkpoint = path
        self.tta = model_tta(meta) if options.tta is None else options.tta
        self.detector_name = options.detector_for("photo")
        self.detector = (
            get_detector(self.detector_name, rotations=options.rotations)
            if self.detector_name
            else None
        )
        self.data_config: dict[str, Any] = meta["data_config"]
        self.size = int(self.data_config["input_size"][1])
        self.color = self.data_config["color"]

    @classmethod
    def load(
        cls,
        options: InferenceOptions | str | os.PathLike | None = None,
        /,
        *,
        runner: Any = None,
        **changes: Any,
    ) -> Predictor:
        """Load a model: ``Predictor.load()`` (the bundled default), ``Predictor.load(
        "accurate")``, ``Predictor.load(options)`` or ``Predictor.load(model=..., tta=True)``;
        ``changes`` are :class:`~agegender.inference.options.InferenceOptions` fields.

        ``runner``: a backend to use instead of ONNX Runtime (the training side's
        ``TorchBackend``, which carries its ``meta`` and ``path``).
        """
        opts = as_options(options, changes)
        if runner is not None:
            return cls(runner, runner.meta, opts, runner.path)
        if opts.backend != "onnx":
            raise ConfigError(
                "backend torch: load it with agegender.training.loading.open_predictor "
                '(needs pip install "agegender[train]")'
            )
        runner, meta, path = open_onnx(opts)
        return cls(runner, meta, opts, path)

    # ------------------------------------------------------------------ faces

    def _faces(self, crops: np.ndarray, boxes: list, scores: list) -> list[Face]:
        if len(crops) == 0:
            return []
        return faces_from(self.backend(crops, self.tta), boxes, scores)

    def track(
        self,
        source: Any,
        fps: float | None = None,
        detect_every: int = DETECT_EVERY,
        keep_ended: int | None = None,
    ) -> Tracking:
        """Faces tracked through a video file, a camera index or an iterable of RGB frames:
        iterate the result for each sampled frame's faces and track ids; its ``tracks`` then
        hold one estimate per person (see :mod:`agegender.inference.tracking`). ``fps``:
        frames a second to look at (None: all); ``detect_every``: detect on every k-th of
        those, the tracks' boxes carried in between. ``source=None``: frames are pushed one
        by one to the result's :meth:`Tracking.step`, of which ``keep_ended`` ended tracks are
        kept."""
        if self.detector is None:
            raise AgeGenderError("tracking needs a face detector: load the predictor with one")
        return Tracking(self, source, fps, detect_every, keep_ended)

    def locate(self, image: ImageInput, aligned: bool = False) -> tuple[np.ndarray, list, list]:
        """Decode ``image`` and find its faces: ``(model inputs (N, S, S, C), boxes, scores)``.

        Raises ``ValueError`` (one line) for data that is not a usable image and ``TypeError``
        for an ``image`` of no accepted type.
        """
        if not isinstance(image, _IMAGE_TYPES) and not hasattr(image, "read"):
            raise TypeError(
                "image must be a path, bytes, a binary file object, a PIL image or an RGB "
                f"array, got {type(image).__name__}"
            )
        if aligned:
            if isinstance(image, (np.ndarray, Image.Image)):
                rgb, (w, h) = load_photo(image)
                face = preprocess(rgb, self.data_config)
            else:
                # a file: decoded as prepare decoded the training cache (JPEG luma in draft
                # mode, no RGB detour), which is also twice as fast
                if isinstance(image, (bytes, bytearray, memoryview)):
                    image = io.BytesIO(bytes(image))
                img = open_photo(image)
                w, h = upright_size(img)
                face = preprocess(img, self.data_config)
            # a copy: a decoded array may be read-only, which torch.as_tensor warns about
            return face[None].copy(), [(0.0, 0.0, float(w), float(h))], [1.0]
        # a photo of more than 40 MP is decoded shrunk: boxes are scaled back to its full size
        rgb, (w, h) = load_photo(image)
        if self.detector is None:
            raise AgeGenderError("this predictor has no face detector: pass aligned=True")
        found = self.detector.detect_faces(rgb)
        # UTKFace's geometry at 200 px, then the same resize and colour path as training
        crops = [face_crop(rgb, f, self.data_config) for f in found]
        chans = self.data_config["input_size"][0]
        arr = np.stack(crops) if crops else np.zeros((0, self.size, self.size, chans), np.uint8)
        sx, sy = w / rgb.shape[1], h / rgb.shape[0]
        # in the photo's own pixels, within it (a face cut by the edge reaches past it)
        boxes = [
            (max(x0 * sx, 0.0), max(y0 * sy, 0.0), min(x1 * sx, w), min(y1 * sy, h))
            for x0, y0, x1, y1 in (f.box for f in found)
        ]
        return arr, boxes, [f.score for f in found]

    def predict(self, image: ImageInput, aligned: bool = False) -> list[Face]:
        """Every face in ``image`` with its age and gender, best detection first.

        ``aligned=True`` takes the whole image as one face already cropped like UTKFace's
        aligned crops and skips detection. An image without a face gives ``[]``.
        """
        (result,) = self.finish([self.locate(image, aligned)])
        if isinstance(result, Exception):
            raise result
        return result

    def predict_batch(
        self, images: Sequence[ImageInput], aligned: bool = False, workers: int = 2
    ) -> list[list[Face] | Exception]:
        """:meth:`predict` over many images: decoding and detection run in ``workers``
        threads, the network sees all their faces in batches. A bad image yields its
        ``ValueError``/``AgeGenderError``/``OSError`` (or ``TypeError`` for an item of no
        accepted type) in its place instead of stopping the batch."""
        return self.finish(self.locate_all(images, aligned, workers))

    def locate_all(
        self, images: Sequence[ImageInput], aligned: bool = False, workers: int = 2
    ) -> list[Any]:
        """:meth:`locate` for each image in ``workers`` threads: its result, or the exception
        a bad image raised. What :meth:`finish` takes; the two halves of
        :meth:`predict_batch`, so a caller can decode the next batch while this one runs."""
        if isinstance(images, (str, bytes, os.PathLike, Image.Image)):
            raise TypeError("predict_batch takes a sequence of images; use predict for one")

        def locate(img):
            try:
                return self.locate(img, aligned)
            except (ValueError, TypeError, AgeGenderError, OSError) as e:
                return e

        if workers <= 1 or len(images) <= 1:
            return [locate(img) for img in images]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(locate, images))

    def finish(self, located: list[Any]) -> list[list[Face] | Exception]:
        """The faces of every image :meth:`locate_all` found, through the network at once."""
        ok = [r for r in located if not isinstance(r, Exception)]
        crops = np.concatenate([r[0] for r in ok]) if ok else np.zeros((0,))
        faces = self._faces(crops, [b for r in ok for b in r[1]], [s for r in ok for s in r[2]])
        results: list[list[Face] | Exception] = []
        k = 0
        for r in located:
            if isinstance(r, Exception):
                results.append(r)
                continue
            mine = faces[k : k + len(r[1])]
            k += len(r[1])
            # a broken model's NaN would be written as bare NaN (not JSON) and read as "male"
            finite = all(math.isfinite(f.age) and math.isfinite(f.p_female) for f in mine)
            results.append(mine if finite else DataError("the model gave a non-finite output"))
        return results
