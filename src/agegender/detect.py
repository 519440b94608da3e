"""Face detection and alignment: find the faces in any photo and crop them as UTKFace's were.

The age/gender models are trained on UTKFace's *aligned & cropped* 200x200 faces, so a photo has
to be brought into that geometry before prediction. This module does it in three steps:

1. :func:`agegender.images.load_photo` decodes a file, bytes, a PIL image or an array into an
   RGB uint8 array, applying the EXIF orientation and refusing what is too large;
2. a detector (:func:`get_detector`, by default OpenCV's YuNet, vendored with the package: no
   download ever) returns one :class:`FacialArea` per face: box, score and five landmarks;
3. :func:`align_face` maps the five landmarks onto :data:`UTKFACE_TEMPLATE_200`, the median
   landmark positions that YuNet finds in UTKFace's own crops, with a similarity transform.

>>> list_detectors()
['yunet', 'yunet-fast']
>>> face = FacialArea((0.0, 0.0, 200.0, 200.0), 1.0, UTKFACE_TEMPLATE_200)
>>> img = np.zeros((200, 200, 3), np.uint8)
>>> align_face(img, face).shape
(200, 200, 3)
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from agegender.errors import AgeGenderError, ConfigError
from agegender.images import as_rgb_array

__all__ = [
    "MODEL_SHA256",
    "UTKFACE_TEMPLATE_200",
    "YUNET_MODEL",
    "Detector",
    "FacialArea",
    "ModelFileError",
    "NoFaceError",
    "YuNetDetector",
    "align_face",
    "alignment_matrix",
    "crop_faces",
    "get_detector",
    "list_detectors",
]

Point = tuple[float, float]

#: The vendored YuNet model: OpenCV Zoo's ``face_detection_yunet_2023mar_int8bq.onnx`` (MIT,
#: see ``assets/YUNET_LICENSE.txt``), int8 block-quantised, 122,489 bytes.
YUNET_MODEL = Path(__file__).resolve().parent / "assets/face_detection_yunet_2023mar_int8bq.onnx"

#: SHA-256 of :data:`YUNET_MODEL`; equal to the Git LFS object id of the file in opencv_zoo.
MODEL_SHA256 = "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10"

#: Median positions (x, y), in pixels, of YuNet's five landmarks on UTKFace's aligned & cropped
#: 200x200 images, in YuNet's order: right eye, left eye, nose tip, right mouth corner, left mouth
#: corner ("right" is the person's right, which is on the image's left). Measured by
#: ``benchmarks/yunet_utkface_geometry.py`` (seed 0) on 2,000 random images of the 21,340, all
#: of them detected, with the detector's defaults (refine=2, flip=True). The refinement frames
#: faces with this very template, so it is a fixed point: rerunning the script moves it < 0.15 px.
UTKFACE_TEMPLATE_200: tuple[Point, ...] = (
    (59.82, 56.53),
    (136.69, 56.58),
    (97.95, 102.32),
    (65.29, 134.49),
    (131.04, 134.59),
)

# YuNet was trained on faces of about 10 to 300 pixels: a face filling a large frame is missed
# (measured on upscaled UTKFace crops: 100 % found at 480 px, 97 % at 640, 51 % at 1280), so
# images are first shrunk to ``max_side``; when that finds nothing, one more pass at this long
# side catches close-ups.
_FALLBACK_SIDE = 320

# Refinement crops: the face in the template's geometry with a margin of 30 % of the face crop on
# each side, so that it no longer touches the crop's edges (a 200 px face in a 320 px crop).
_REFINE_MARGIN = 0.3
# Side of the crops of the passes before the last, which only frame the face (roll and scale):
# half the pixels of 320, and no mirror, cut refinement time by 38 % at the same accuracy (on
# 396 test faces pasted upright and at +-30 deg: gender 90.7 % / MAE 4.72 vs 91.7 % / 4.75).
_COARSE_SIZE = 224


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class FacialArea:
    """One detected face, in pixel coordinates of the (EXIF-corrected) input image.

    ``box`` is ``(x0, y0, x1, y1)``; it may reach slightly past the image's edges when the face
    is cut off by them. ``landmarks`` are five ``(x, y)`` points in YuNet's order: the person's
    right eye, left eye, nose tip, right mouth corner, left mouth corner. The person's right is on
    the image's left for a face looking at the camera, so ``landmarks[0][0] < landmarks[1][0]``.
    """

    box: tuple[float, float, float, float]
    score: float
    landmarks: tuple[Point, ...]

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def right_eye(self) -> Point:
        """The person's right eye (on the image's left)."""
        return self.landmarks[0]

    @property
    def left_eye(self) -> Point:
        """The person's left eye (on the image's right)."""
        return self.landmarks[1]

    @property
    def roll(self) -> float:
        """Angle of the eye line in degrees, clockwise on screen (y points down); 0 = level."""
        (xr, yr), (xl, yl) = self.landmarks[0], self.landmarks[1]
        return math.degrees(math.atan2(yl - yr, xl - xr))


class NoFaceError(AgeGenderError):
    """No face was found in an image (for callers that prefer an exception to an empty list)."""


class ModelFileError(AgeGenderError):
    """The vendored detector model is missing, altered or cannot be loaded."""


class Detector(Protocol):
    """What every detector returned by :func:`get_detector` provides."""

    name: str

    def detect_faces(self, img: np.ndarray) -> list[FacialArea]: ...


# --------------------------------------------------------------------------- YuNet


def _read_verified(path: Path, sha256: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelFileError(
            f"face detector model missing: {path} (reinstall agegender to restore it)"
        ) from None
    except OSError as e:
        raise ModelFileError(f"face detector model unreadable: {path}: {e}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ModelFileError(
            f"face detector model altered or corrupt: {path} has SHA-256 {digest}, "
            f"expected {sha256} (reinstall agegender to restore it)"
        )
    return data


def _set_cv_log_level(level: int | None) -> int | None:
    """Set OpenCV's log level, returning the old one; None where this build has no such API.

    OpenCV 5 warns on stderr that its new graph engine ignores the DNN target each time a
    FaceDetectorYN is built; silenced at build time only. The API moved between 4.x and 5.x.
    """
    api = getattr(getattr(cv2, "utils", None), "logging", None)
    get, put = (
        (api.getLogLevel, api.setLogLevel)
        if api is not None
        else (getattr(cv2, "getLogLevel", None), getattr(cv2, "setLogLevel", None))
    )
    if get is None or put is None:
        return None
    old = get()
    if level is not None:
        put(level)
    return old


class YuNetDetector:
    """OpenCV's YuNet face detector (``cv2.FaceDetectorYN``), vendored and checksummed.

    Args:
        score_threshold: faces scoring below this are dropped (YuNet's scores are in [0, 1]).
        nms_threshold: IoU above which overlapping boxes are merged by non-maximum suppression.
        top_k: candidates kept before non-maximum suppression.
        max_side: images whose long side exceeds this are shrunk to it before detection (speed,
            and YuNet misses faces much larger than ~500 px); boxes are mapped back. When that
            finds nothing, a second pass at 320 px catches faces that fill the frame.
        min_side: images whose long side is below this are enlarged to it, so that small face
            crops (e.g. 40x40) are still found.
        refine: landmark refinement passes; each re-detects the face on an upright crop framed
            like UTKFace's (see ``_refine``). 0 keeps YuNet's first guess (about 4x faster per
            face, but rolled faces stay partly rolled after alignment).
        flip: in the last refinement pass, also detect on the mirrored crop and average.
        refine_size: side in pixels of the last refinement crop (the face fills 62 % of it;
            earlier passes use 224 px). YuNet's time grows with the pixels (160 is about 5x
            faster than 320) but its landmarks get coarser: on +-30 degree faces the eye-line
            error was 1.2 deg at 320, 1.9 at 240 and 3.2 at 160
            (``benchmarks/yunet_utkface_geometry.py --refine-size``).
        model_path: the ONNX file to load; by default the vendored :data:`YUNET_MODEL`. It must
            have the SHA-256 :data:`MODEL_SHA256` whichever path it comes from.

    Each instance owns one ``cv2.FaceDetectorYN``, whose input size is state set per image, so
    :meth:`detect_faces` holds a per-instance lock: sharing one instance between threads is safe
    but serialises them; build one instance per thread to detect in parallel.

    Raises :class:`ModelFileError` if the model file is missing, altered or unloadable.
    """

    name = "yunet"

    def __init__(
        self,
        score_threshold: float = 0.6,
        nms_threshold: float = 0.3,
        top_k: int = 5000,
        max_side: int = 640,
        min_side: int = 160,
        refine: int = 2,
        flip: bool = True,
        refine_size: int = 320,
        model_path: str | os.PathLike | None = None,
    ) -> None:
        if not 0.0 <= score_threshold <= 1.0:
            raise ConfigError(f"score_threshold must be in [0, 1], got {score_threshold}")
        if not 0.0 < nms_threshold <= 1.0:
            raise ConfigError(f"nms_threshold must be in (0, 1], got {nms_threshold}")
        if top_k < 1:
            raise ConfigError(f"top_k must be at least 1, got {top_k}")
        if not 32 <= min_side <= max_side:
            raise ConfigError(f"need 32 <= min_side <= max_side, got {min_side} and {max_side}")
        if refine < 0:
            raise ConfigError(f"refine must be 0 or more passes, got {refine}")
        if refine_size < 64:
            raise ConfigError(f"refine_size must be at least 64 px, got {refine_size}")
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.top_k = top_k
        self.max_side = max_side
        self.min_side = min_side
        self.refine = refine
        self.flip = flip
        self.refine_size = refine_size
        self.model_path = Path(model_path) if model_path is not None else YUNET_MODEL
        data = _read_verified(self.model_path, MODEL_SHA256)
        # Built from the verified bytes rather than the path: the file could change in between.
        old = _set_cv_log_level(2)  # 2 = errors only
        try:
            self._net = cv2.FaceDetectorYN.create(
                "onnx",
                np.frombuffer(data, dtype=np.uint8),
                np.zeros(0, dtype=np.uint8),
                (320, 320),
                score_threshold,
                nms_threshold,
                top_k,
            )
        except cv2.error as e:
            # The int8 block-quantised model needs OpenCV >= 4.11 (DequantizeLinear with blocks).
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ModelFileError(
                f"OpenCV {cv2.__version__} cannot load {self.model_path.name} "
                f"(needs opencv-python-headless >= 4.11): {msg}"
            ) from None
        finally:
            if old is not None:
                _set_cv_log_level(old)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"YuNetDetector(score_threshold={self.score_threshold}, "
            f"nms_threshold={self.nms_threshold}, top_k={self.top_k}, "
            f"max_side={self.max_side}, min_side={self.min_side}, refine={self.refine}, "
            f"flip={self.flip}, refine_size={self.refine_size})"
        )

    def detect_faces(self, img: np.ndarray) -> list[FacialArea]:
        """Faces in an RGB uint8 image ``(H, W, 3)`` (or gray ``(H, W)``), best score first.

        Returns an empty list when there is none. Coordinates are in pixels of ``img``; the box
        and score come from the first pass over the whole image, the landmarks from the
        refinement passes. Faces rolled up to 30 degrees were all found in a test of 200 UTKFace
        faces on a 600x400 canvas, 96 % at 45 degrees, 79 % at 90.
        """
        rgb = as_rgb_array(img, "detect_faces")
        h, w = rgb.shape[:2]
        # cv2's SIMD swap: a tenth of the time of NumPy's reversed-stride copy on a large photo
        bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
        long_side = max(h, w)
        if long_side > self.max_side:
            sides = [self.max_side]
        elif long_side < self.min_side:
            sides = [self.min_side]
        else:
            sides = [long_side]
        if sides[0] > _FALLBACK_SIDE:
            sides.append(_FALLBACK_SIDE)
        with self._lock:
            for side in sides:
                faces = self._detect_at(bgr, side)
                if faces:
                    break
            if self.refine:
                faces = [self._refine(bgr, f) for f in faces]
        return faces

    def _run(self, bgr: np.ndarray) -> np.ndarray:
        """YuNet's raw rows ``(N, 15)`` for a BGR image at its own size, bad rows dropped."""
        self._net.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, raw = self._net.detect(bgr)
        if raw is None:
            return np.zeros((0, 15))
        rows = np.asarray(raw, dtype=np.float64).reshape(-1, 15)
        # OpenCV 4.x returns inf/NaN rows with score 1 on inputs of a few pixels.
        ok = np.all(np.isfinite(rows), axis=1) & (rows[:, 2] > 0) & (rows[:, 3] > 0)
        return rows[ok]

    def _detect_at(self, bgr: np.ndarray, side: int) -> list[FacialArea]:
        h, w = bgr.shape[:2]
        s = side / max(h, w)
        tw, th = max(1, round(w * s)), max(1, round(h * s))
        if (tw, th) != (w, h):
            interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
            work = cv2.resize(bgr, (tw, th), interpolation=interp)
        else:
            work = bgr
        sx, sy = w / tw, h / th
        faces = []
        for row in self._run(work):
            x, y, bw, bh = row[:4]
            # points map through pixel centres, as cv2.resize samples them
            pts = (row[4:14].reshape(5, 2) + 0.5) * (sx, sy) - 0.5
            faces.append(
                FacialArea(
                    box=(float(x * sx), float(y * sy), float((x + bw) * sx), float((y + bh) * sy)),
                    score=float(row[14]),
                    landmarks=_points(pts),
                )
            )
        faces.sort(key=lambda f: f.score, reverse=True)
        return faces

    def _refine(self, bgr: np.ndarray, face: FacialArea) -> FacialArea:
        """Re-detect ``face`` on an upright, centred crop and map its landmarks back.

        YuNet's landmarks pull towards an upright face (a 30 degree roll reads as about 24) and
        move by a few pixels when the face touches the image's edge, so the first pass only
        frames the face: each pass warps it into the template's geometry with a margin and
        detects again; the last one, at ``refine_size`` and with ``flip``, also averages with the
        mirrored crop (which cancels left-right biases). Measured on UTKFace crops turned by 30
        degrees: eye-line error 6.5 -> 1.3 deg.
        """
        pts = np.asarray(face.landmarks, dtype=np.float64)
        for k in range(self.refine):
            last = k == self.refine - 1
            # the passes before the last only frame the face: a smaller crop and no mirror do
            c = self.refine_size if last else min(_COARSE_SIZE, self.refine_size)
            face_side = c / (1 + 2 * _REFINE_MARGIN)
            frame = _template(face_side) + (c - face_side) / 2
            try:
                m = _similarity(pts, frame)
            except ValueError:
                break
            crop = _warp(bgr, m, c)
            found = [self._nearest_centre(self._run(crop), c)]
            if self.flip and last:
                mirrored = self._nearest_centre(self._run(cv2.flip(crop, 1)), c)
                if mirrored is not None:
                    mirrored[:, 0] = c - 1 - mirrored[:, 0]
                    found.append(mirrored[[1, 0, 2, 4, 3]])  # the person's right is now left
            found = [f for f in found if f is not None]
            if not found:
                break
            inv = cv2.invertAffineTransform(m)
            pts = np.mean(found, axis=0) @ inv[:, :2].T + inv[:, 2]
        return FacialArea(face.box, face.score, _points(pts))

    @staticmethod
    def _nearest_centre(rows: np.ndarray, c: int) -> np.ndarray | None:
        """Landmarks ``(5, 2)`` of the detection nearest the crop's centre, None if none is near."""
        if len(rows) == 0:
            return None
        cx, cy = rows[:, 0] + rows[:, 2] / 2, rows[:, 1] + rows[:, 3] / 2
        dist = np.hypot(cx - c / 2, cy - c / 2)
        k = int(np.argmin(dist))
        if dist[k] > c / 4:  # the framed face was lost; another face is not a refinement of it
            return None
        return rows[k, 4:14].reshape(5, 2).copy()


def _points(pts: np.ndarray) -> tuple[Point, ...]:
    return tuple((float(x), float(y)) for x, y in pts)


#: name -> (class, the settings that name stands for)
_DETECTORS: dict[str, tuple[Callable[..., Detector], dict[str, Any]]] = {
    "yunet": (YuNetDetector, {}),
    # one framing pass on a 224 px crop, no mirror: about a third of the default's
    # refinement (benchmarks/predict_speed.py measures both, time and accuracy)
    "yunet-fast": (YuNetDetector, {"refine": 1, "refine_size": 224, "flip": False}),
}


def list_detectors() -> list[str]:
    """Names accepted by :func:`get_detector`, sorted."""
    return sorted(_DETECTORS)


def get_detector(name: str = "yunet", **kwargs: Any) -> Detector:
    """Build a face detector by name; keyword arguments go to its constructor.

    Raises :class:`~agegender.errors.ConfigError` for an unknown name or argument.
    """
    if name not in _DETECTORS:
        known = ", ".join(list_detectors())
        raise ConfigError(f"unknown detector {name!r}; known detectors: {known}")
    cls, preset = _DETECTORS[name]
    params = inspect.signature(cls).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ConfigError(
            f"detector {name!r} takes no argument {', '.join(unknown)}; valid: {', '.join(params)}"
        )
    return cls(**{**preset, **kwargs})


def the_face(
    faces: list[FacialArea], box: tuple[float, float, float, float] | None = None
) -> FacialArea:
    """The one face a labelled photo is about: the only one found, or the one that overlaps
    ``box`` most. Raises ``ValueError`` (the reason, one line) when there is none, or several
    and no box to choose by."""
    if not faces:
        raise ValueError("no face found")
    if box is None:
        if len(faces) > 1:
            raise ValueError(f"{len(faces)} faces: give a box column to say which")
        return faces[0]
    boxes = np.array([f.box for f in faces], np.float64)
    b = np.asarray(box, np.float64)
    w = np.clip(np.minimum(boxes[:, 2], b[2]) - np.maximum(boxes[:, 0], b[0]), 0, None)
    h = np.clip(np.minimum(boxes[:, 3], b[3]) - np.maximum(boxes[:, 1], b[1]), 0, None)
    inter = w * h
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    overlap = inter / (area + (b[2] - b[0]) * (b[3] - b[1]) - inter)
    if overlap.max() < 0.3:
        raise ValueError("no face found in the given box")
    return faces[int(overlap.argmax())]


# --------------------------------------------------------------------------- alignment


def _template(size: float) -> np.ndarray:
    """:data:`UTKFACE_TEMPLATE_200` for a ``size`` x ``size`` crop (scaled about pixel centres)."""
    t = np.asarray(UTKFACE_TEMPLATE_200, dtype=np.float64)
    return (t + 0.5) * (size / 200.0) - 0.5


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) taking src onto dst."""
    # A reprojection threshold no distance reaches makes every landmark an inlier, and the
    # Levenberg-Marquardt refinement then gives the least-squares fit over all five points (a
    # 5-point RANSAC would instead drop a mouth corner moved by a smile and tilt the face).
    m, _ = cv2.estimateAffinePartial2D(
        src.astype(np.float64),
        dst.astype(np.float64),
        method=cv2.RANSAC,
        ransacReprojThreshold=1e9,
        maxIters=1,
        refineIters=50,
    )
    if m is None or not np.all(np.isfinite(m)) or abs(np.linalg.det(m[:, :2])) < 1e-12:
        raise ValueError("cannot align: the landmarks are degenerate (all at one point)")
    return m


def alignment_matrix(face: FacialArea, size: int = 200) -> np.ndarray:
    """The 2x3 similarity matrix :func:`align_face` warps with (image -> crop pixels)."""
    if len(face.landmarks) != 5:
        raise ValueError(f"need 5 landmarks, got {len(face.landmarks)}")
    return _similarity(np.asarray(face.landmarks, dtype=np.float64), _template(size))


def align_face(img: np.ndarray, face: FacialArea, size: int = 200) -> np.ndarray:
    """Crop ``face`` from an RGB uint8 image into UTKFace's aligned geometry, ``(size, size, 3)``.

    A similarity transform (rotation that levels the eyes, uniform scale, translation) takes the
    five landmarks as close as possible (least squares) to :data:`UTKFACE_TEMPLATE_200` scaled to
    ``size``, so the model sees at prediction time the framing it was trained on. Pixels from
    outside the image repeat its edge, as UTKFace's own crops do.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    return _warp(as_rgb_array(img, "align_face"), alignment_matrix(face, size), size)


def _warp(img: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """``img`` warped by the 2x3 similarity ``m`` into ``size`` x ``size``, edges replicated."""
    scale = math.sqrt(abs(np.linalg.det(m[:, :2])))
    if scale < 0.5:
        img, m = _prefilter(img, m, size, scale)
    return cv2.warpAffine(
        img, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )


def _prefilter(
    rgb: np.ndarray, m: np.ndarray, size: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Area-shrink the part of ``rgb`` the crop sees to twice the crop's scale; adjust ``m``.

    Bilinear warping samples 2x2 pixels, so shrinking a large face by more than 2 would alias
    (jagged edges, moire) into the crop; averaging first keeps it like a downscaled photo.
    """
    h, w = rgb.shape[:2]
    inv = cv2.invertAffineTransform(m)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64)
    src = corners @ inv.T
    x0, y0 = (max(0, math.floor(v) - 2) for v in src.min(axis=0))
    x1, y1 = min(w, math.ceil(src[:, 0].max()) + 2), min(h, math.ceil(src[:, 1].max()) + 2)
    if x1 - x0 < 2 or y1 - y0 < 2:  # the crop lies off the image: edge replication covers it
        return rgb, m
    roi = rgb[y0:y1, x0:x1]
    r = 2.0 * scale
    tw, th = max(1, round(roi.shape[1] * r)), max(1, round(roi.shape[0] * r))
    small = cv2.resize(roi, (tw, th), interpolation=cv2.INTER_AREA)
    rx, ry = tw / roi.shape[1], th / roi.shape[0]
    # small pixel p is image pixel (p + 0.5) / r - 0.5 + offset (pixel centres)
    to_image = np.array([[1 / rx, 0, 0.5 / rx - 0.5 + x0], [0, 1 / ry, 0.5 / ry - 0.5 + y0]])
    m2 = m[:, :2] @ to_image[:, :2]
    t2 = m[:, :2] @ to_image[:, 2] + m[:, 2]
    return small, np.hstack([m2, t2[:, None]])


def crop_faces(img: np.ndarray, faces: Sequence[FacialArea], size: int = 200) -> list[np.ndarray]:
    """:func:`align_face` for each face, in the order given."""
    return [align_face(img, f, size) for f in faces]
