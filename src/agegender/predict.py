"""Age and gender for every face in ordinary photos: detect, align, predict.

>>> from agegender import Predictor
>>> predictor = Predictor.load()                       # the bundled model, no download
>>> faces = predictor.predict(ASTRONAUT)               # a path, bytes, PIL image or RGB array
>>> len(faces), faces[0].gender
(1, 'female')

Every face is a :class:`Face`. The command line (``agegender predict``), the web service and
this API all go through :meth:`Predictor.predict_batch`. Importing this module imports no
torch; only ``backend="torch"`` does.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from agegender.detect import align_face, get_detector
from agegender.errors import AgeGenderError
from agegender.images import load_photo, open_photo, preprocess, upright_size
from agegender.model_files import BUNDLED_NAMES, WEIGHTS, bundled, read_meta, resolve_checkpoint
from agegender.runtime import OnnxBackend, OnnxLoadError, age_interval, int8_is_fast
from agegender.video import DETECT_EVERY, DETECTOR, LIVE_RATE, LOW, MAX_MISSED_S, Tracker, sampled

ASTRONAUT = Path(__file__).parent / "assets" / "astronaut.jpg"
BACKENDS = ("onnx", "torch")
PRECISIONS = ("auto", "fp32", "int8")


def onnx_meta(backend: OnnxBackend) -> dict[str, Any] | None:
    """The model description an exported file carries (None for files exported before)."""
    text = backend.metadata.get("agegender")
    return json.loads(text) if text else None


def _open_onnx(path: Path, threads: int | None, spin: bool) -> OnnxBackend:
    try:
        return OnnxBackend(path, threads, spin)
    except OnnxLoadError as e:
        raise AgeGenderError(f"cannot load the ONNX model {path}: {e}") from None


ImageInput = str | os.PathLike | bytes | IO[bytes] | Image.Image | np.ndarray
# what locate() accepts besides file objects (anything with .read)
_IMAGE_TYPES = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray)


@dataclass(frozen=True)
class Face:
    """One face found in an image.

    Attributes:
        box: ``(x0, y0, x1, y1)`` in pixels of the (EXIF-upright) image.
        score: detector confidence in [0, 1] (1.0 for ``aligned`` input).
        age: estimated (apparent) age in years.
        age_interval: ``(low, high)`` 90 % interval, for heads that give a spread (dldl).
        gender: ``"male"`` or ``"female"``.
        p_female: probability that the face is female, in [0, 1].
    """

    box: tuple[float, float, float, float]
    score: float
    age: float
    age_interval: tuple[float, float] | None
    gender: str
    p_female: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["box"] = [round(v, 1) for v in self.box]
        d["score"] = round(self.score, 4)
        d["age"] = round(self.age, 2)
        if self.age_interval is not None:
            d["age_interval"] = [round(v, 1) for v in self.age_interval]
        else:
            del d["age_interval"]
        d["p_female"] = round(self.p_female, 4)
        return d

    def label(self) -> str:
        """``"F 34 (29-40)"``: what the annotated images and the web page show."""
        text = f"{'F' if self.gender == 'female' else 'M'} {self.age:.0f}"
        if self.age_interval is not None:
            text += f" ({self.age_interval[0]:.0f}-{self.age_interval[1]:.0f})"
        return text


def _torch_backend(path: Path, device: str, amp: str, threads: int | None) -> tuple[Any, Any]:
    """The checkpoint at ``path`` on torch: ``(network, backend)``."""
    import torch  # only here: every other backend runs without torch

    from agegender.checkpoint import load_checkpoint
    from agegender.torch_runtime import TorchBackend, resolve_device, use_amp

    net, _ = load_checkpoint(path, "cpu")
    net = net.float()
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device, option="--device")
    bf16 = use_amp(dev, amp)
    net = net.to(dev)
    if dev.type == "cpu":  # oneDNN's bf16 convolutions (AMX) want NHWC
        net = net.to(memory_format=torch.channels_last)
    return net, TorchBackend(net, dev, amp=bf16)


def _onnx_model(
    model: str | os.PathLike, onnx_path: str | os.PathLike | None, precision: str
) -> tuple[Path | None, Path | None]:
    """``(ONNX file, checkpoint)`` for a model: a bundled one's own file, an ``.onnx`` given,
    or a checkpoint's ``NAME.int8.onnx`` newer than it. The ONNX file is None for the fp32
    model of a checkpoint, which :func:`_onnx_backend` exports beside it and keeps fresh."""
    if precision not in PRECISIONS:
        raise AgeGenderError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if onnx_path is not None:
        return Path(onnx_path), None
    spec = Path(model)
    if spec.suffix == ".onnx":
        if not spec.is_file():
            raise AgeGenderError(f"no such model: {model}")
        return spec, None
    checkpoint = resolve_checkpoint(model) if str(model) not in BUNDLED_NAMES else None
    base = (bundled(str(model)) if checkpoint is None else checkpoint).with_suffix("")
    int8, fp32 = base.with_suffix(".int8.onnx"), base.with_suffix(".onnx")
    fresh = int8.is_file() and (
        checkpoint is None or int8.stat().st_mtime >= checkpoint.stat().st_mtime
    )
    if precision == "int8" and not fresh:
        raise AgeGenderError(
            f"{model} has no int8 model ({int8.name}, newer than its weights): make one with "
            f"agegender export --int8 --onnx {int8}"
        )
    if fresh and (precision == "int8" or (precision == "auto" and int8_is_fast())):
        return int8, checkpoint
    if checkpoint is None and fp32.is_file():
        return fp32, None
    return None, checkpoint or resolve_checkpoint(model)


def _onnx_backend(
    path: Path, onnx_path: Path | None, threads: int | None, spin: bool
) -> OnnxBackend:
    """ONNX Runtime on ``onnx_path``, or on the export of the checkpoint at ``path`` (made on
    first use next to it, or in the user's cache for the bundled model)."""
    onnx_file = onnx_path or path.with_suffix(".onnx")
    if onnx_path is None and path.parent == WEIGHTS:  # the package folder may be read-only
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        onnx_file = cache / "agegender" / f"{path.stem}-{path.stat().st_size}.onnx"
    fresh = not onnx_file.is_file() or onnx_file.stat().st_mtime < path.stat().st_mtime
    if fresh:
        from agegender.onnx_export import export_onnx  # exporting needs torch

        export_onnx(path, onnx_file)
    try:
        return OnnxBackend(onnx_file, threads, spin)
    except OnnxLoadError as e:
        if fresh:
            raise AgeGenderError(f"cannot load the ONNX model {onnx_file}: {e}") from None
    # a cached file damaged after its export (a killed copy, a full disk) is newer than the
    # checkpoint, so the mtime check would keep it forever: rebuild it once
    from agegender.onnx_export import export_onnx

    export_onnx(path, onnx_file)  # written atomically
    try:
        return OnnxBackend(onnx_file, threads, spin)
    except OnnxLoadError as e:
        raise AgeGenderError(
            f"cannot load the ONNX model {onnx_file}, even exported again: {e}"
        ) from None


class Predictor:
    """A loaded model (plus a face detector) that estimates age and gender.

    Load once and reuse: loading builds the network and the detector. Use
    :meth:`load` rather than the constructor.
    """

    def __init__(
        self,
        model: Any,
        meta: dict[str, Any],
        backend: Any,
        detector: Any,
        tta: bool,
        checkpoint: Path,
    ) -> None:
        self.model = model  # the torch network with backend="torch", else None
        self.meta = meta
        self.backend = backend
        self.detector = detector
        self.tta = tta
        self.checkpoint = checkpoint
        self.data_config: dict[str, Any] = meta["data_config"]
        self.detector_name: str | None = getattr(detector, "name", None)
        self.size = int(self.data_config["input_size"][1])
        self.color = self.data_config["color"]

    @classmethod
    def load(
        cls,
        model: str | os.PathLike = "default",
        device: str = "auto",
        tta: bool | None = None,
        backend: str = "onnx",
        onnx_path: str | os.PathLike | None = None,
        threads: int | None = None,
        detector: str | None = "yunet",
        amp: str = "auto",
        precision: str = "auto",
        spin: bool | None = None,
    ) -> Predictor:
        """Load ``model``: ``default`` (the bundled fast model), ``accurate`` (the bundled
        larger one), a run folder, a checkpoint or an ``.onnx`` file.

        ``backend``: ``onnx`` (ONNX Runtime on the CPU, no torch needed: the bundled models
        ship as ONNX files; a checkpoint without one is exported on first use, which needs
        torch) or ``torch`` (for CUDA users; ``device`` and ``amp`` apply to it only).
        ``precision`` (onnx): ``auto`` takes a model's int8 file where it has one and the CPU
        runs int8 fast (AVX2 and up), ``int8`` or ``fp32`` insist. ``tta``: mirror test-time
        augmentation; ``None`` follows the model's recipe. ``threads``: intra-op threads
        (default: every core this process may use). ``detector=None`` accepts aligned faces
        only. ``amp`` (torch): ``auto`` runs bf16 autocast where the hardware does bf16
        natively, ``bf16`` forces it, ``off`` keeps fp32. ``spin`` (onnx): idle ONNX Runtime
        threads spin waiting for work, or sleep (see :func:`agegender.runtime.onnx_session`);
        ``None`` spins only without a detector: with one, OpenCV's detection runs between
        network runs and spinning threads would take its cores (``benchmarks/spin.py``).
        """
        if backend not in BACKENDS:
            raise AgeGenderError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
            raise AgeGenderError(
                f"--device: unknown device {device!r}; valid: auto, cpu, cuda, cuda:N, mps"
            )
        if backend == "onnx" and device not in ("auto", "cpu"):
            raise AgeGenderError(f"--device {device} runs on torch: add --backend torch")
        net = None
        if spin is None:
            spin = detector is None
        if backend == "torch":
            path = resolve_checkpoint(model)
            meta = read_meta(path)
            net, runner = _torch_backend(path, device, amp, threads)
        else:
            onnx_file, path = _onnx_model(model, onnx_path, precision)
            if onnx_file is None:  # a checkpoint without its ONNX file: exported once, here
                runner = _onnx_backend(path, None, threads, spin)
            else:
                runner = _open_onnx(onnx_file, threads, spin)
            meta = onnx_meta(runner) or read_meta(path)
            path = path or runner.path
        if tta is None:
            tta = bool(meta.get("config", {}).get("train", {}).get("tta", False))
        det = get_detector(detector) if detector is not None else None
        predictor = cls(net, meta, runner, det, tta, path)
        predictor.detector_name = detector
        return predictor

    # ------------------------------------------------------------------ faces

    def _faces(self, crops: np.ndarray, boxes: list, scores: list) -> list[Face]:
        if len(crops) == 0:
            return []
        return self._faces_of(self.backend(crops, self.tta), boxes, scores)

    def track(
        self,
        source: Any,
        fps: float | None = None,
        detect_every: int = DETECT_EVERY,
        keep_ended: int | None = None,
    ) -> Tracking:
        """Faces tracked through a video file, a camera index or an iterable of RGB frames:
        iterate the result for each sampled frame's faces and track ids; its ``tracks`` then
        hold one estimate per person (see :mod:`agegender.video`). ``fps``: frames a second
        to look at (None: all); ``detect_every``: detect on every k-th of those, the tracks'
        boxes carried in between. ``source=None``: frames are pushed one by one to the
        result's :meth:`Tracking.step`, of which ``keep_ended`` ended tracks are kept."""
        if self.detector is None:
            raise AgeGenderError("tracking needs a face detector: load the predictor with one")
        return Tracking(self, source, fps, detect_every, keep_ended)

    def _faces_of(self, out: dict[str, np.ndarray], boxes: list, scores: list) -> list[Face]:
        faces = []
        for i, (box, score) in enumerate(zip(boxes, scores)):
            age = float(out["age"][i])
            interval = age_interval(age, float(out["age_std"][i])) if "age_std" in out else None
            p = float(out["p_female"][i])
            gender = "female" if p >= 0.5 else "male"
            faces.append(Face(tuple(float(v) for v in box), float(score), age, interval, gender, p))
        return faces

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
        crops = [preprocess(align_face(rgb, f, 200), self.data_config) for f in found]
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
        crops, boxes, scores = self.locate(image, aligned)
        return self._faces(crops, boxes, scores)

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
            else:
                results.append(faces[k : k + len(r[1])])
                k += len(r[1])
        return results


# --------------------------------------------------------------------------- video


@dataclass(frozen=True)
class FrameResult:
    """One sampled frame of a tracked video: its faces with their track ids (None: not yet a
    confirmed track) and, when ``detected`` is False, the boxes the tracks were carried to."""

    index: int
    time_s: float
    detected: bool
    faces: list[tuple[int | None, Face]]
    carried: list[tuple[int, tuple[float, float, float, float]]]


class Tracking:
    """What :meth:`Predictor.track` returns: an iterator of :class:`FrameResult`; ``tracks``
    holds one summary per person seen (so far, while iterating). An interrupted iteration
    keeps the tracks found up to there.

    With ``source=None`` there is nothing to iterate: frames are pushed one by one with
    :meth:`step` (a webcam's frames through the web service), and ``keep_ended`` bounds how
    many ended tracks are remembered. ``detector``: one to share (its threshold at ``LOW``).
    """

    def __init__(
        self,
        predictor: Predictor,
        source: Any,
        fps: float | None = None,
        every: int = DETECT_EVERY,
        keep_ended: int | None = None,
        detector: Any = None,
    ) -> None:
        if every < 1:
            raise AgeGenderError(f"detect_every must be 1 or more, got {every}")
        self.predictor, self.every = predictor, every
        self.frames, self.rate = sampled(source, fps) if source is not None else (None, LIVE_RATE)
        # low-scoring faces continue tracks (a blurred frame), only confident ones start them:
        # the detector passes them down to LOW (a shared one may be given, already so)
        self.detector = detector or get_detector(
            predictor.detector_name or DETECTOR, score_threshold=LOW
        )
        max_missed = max(round(MAX_MISSED_S * self.rate), 1)
        self.tracker = Tracker(max_missed=max_missed, keep_ended=keep_ended)
        self.seen = 0
        self.last_rgb: np.ndarray | None = None  # the latest frame's pixels, for drawing

    def __iter__(self) -> Iterator[FrameResult]:
        if self.frames is None:
            raise AgeGenderError("a live tracking has no source to iterate: push frames to step()")
        for k, frame in enumerate(self.frames):
            yield self.step(frame.rgb, frame.time_s, frame.index, detect=k % self.every == 0)

    def step(
        self, rgb: np.ndarray, time_s: float, index: int | None = None, detect: bool = True
    ) -> FrameResult:
        """One frame (RGB) at ``time_s`` seconds: its faces and their tracks. ``index``: the
        frame's number in its source (by default counted from the time, at :data:`LIVE_RATE`
        frames a second); ``detect=False`` carries the tracks' boxes instead of detecting."""
        index = round(time_s * self.rate) if index is None else index
        self.seen += 1
        self.last_rgb = rgb
        if not detect:
            carried = [(i, tuple(map(float, b))) for i, b in self.tracker.carried(index)]
            return FrameResult(index, time_s, False, [], carried)
        faces, outs = self._analyse(rgb)
        ids = self.tracker.step(index, time_s, faces, outs)
        return FrameResult(index, time_s, True, list(zip(ids, faces)), [])

    def estimate(self, track_id: int) -> dict[str, Any] | None:
        """The running estimate of a track still in view (``age``, ``age_interval``,
        ``gender``, ``p_female``), None for one that has ended or is unknown."""
        for t in self.tracker.active:
            if t.id == track_id:
                return t.evidence.estimate()
        return None

    def _analyse(self, rgb: np.ndarray) -> tuple[list[Face], list[dict]]:
        p = self.predictor
        found = self.detector.detect_faces(rgb)
        if not found:
            return [], []
        crops = np.stack([preprocess(align_face(rgb, f, 200), p.data_config) for f in found])
        out = p.backend(crops, p.tta)
        h, w = rgb.shape[:2]
        boxes = [
            (max(a, 0.0), max(b, 0.0), min(c, w), min(d, h))
            for a, b, c, d in (f.box for f in found)
        ]
        per_face = [{k: v[i] for k, v in out.items()} for i in range(len(found))]
        return p._faces_of(out, boxes, [f.score for f in found]), per_face

    @property
    def tracks(self) -> list[dict[str, Any]]:
        return self.tracker.tracks()
