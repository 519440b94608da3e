"""Face detection and alignment: find the faces in any photo and crop them as UTKFace's were.

The age/gender models are trained on UTKFace's *aligned & cropped* 200x200 faces, so a photo has
to be brought into that geometry before prediction. This module does it in three steps:

1. :func:`agegender.vision.images.load_photo` decodes a file, bytes, a PIL image or an array into an
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

import contextlib
import hashlib
import inspect
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from agegender.core.errors import AgeGenderError, ConfigError
from agegender.vision.images import as_rgb_array, preprocess

__all__ = [
    "MODEL_SHA256",
    "UTKFACE_SIZE",
    "UTKFACE_TEMPLATE_200",
    "YUNET_MODEL",
    "Detector",
    "FacialArea",
    "ModelFileError",
    "NoFaceError",
    "YuNetDetector",
    "align_face",
    "alignment_matrix",
    "check_rotations",
    "crop_faces",
    "face_crop",
    "get_detector",
    "iou",
    "list_detectors",
    "the_face",
]

Point = tuple[float, float]

#: The vendored YuNet model: OpenCV Zoo's ``face_detection_yunet_2023mar_int8bq.onnx`` (MIT,
#: see ``assets/YUNET_LICENSE.txt``), int8 block-quantised, 122,489 bytes.
YUNET_MODEL = (
    Path(__file__).resolve().parents[1] / "assets/face_detection_yunet_2023mar_int8bq.onnx"
)

#: SHA-256 of :data:`YUNET_MODEL`; equal to the Git LFS object id of the file in opencv_zoo.
MODEL_SHA256 = "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10"

#: Median positions (x, y), in pixels, of YuNet's five landmarks on UTKFace's aligned & cropped
#: 200x200 images, in YuNet's order: right eye, left eye, nose tip, right mouth corner, left mouth
#: corner ("right" is the person's right, which is on the image's left). Measured by
#: ``benchmarks/yunet_utkface_geometry.py`` (seed 0) on 2,000 random images of the 21,340, all
#: of them detected, with the detector's defaults (refine=2, flip=True). The refinement frames
#: faces with this very template, so it is a fixed point: rerunning the script moves it < 0.15 px.
#: Side of UTKFace's aligned crops, in pixels: faces are aligned at this size (the template's
#: own), then resized to a model's input, so every model sees UTKFace's framing.
UTKFACE_SIZE = 200
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

# The smallest face YuNet finds reliably at its input, as its box's side in pixels: on UTKFace
# crops pasted on a grey 640x480 canvas it found 97 % of boxes of ~34 px, 80 % of ~27 px, 3 % of
# ~17 px (the box is about 0.85 of UTKFace's crop side). A level of the pyramid looks for faces
# down to ``min_face`` by shrinking the image by no more than _YUNET_MIN_FACE / min_face.
_YUNET_MIN_FACE = 32
# Consecutive levels of the pyramid differ by at most this factor: a level finds boxes of ~32 to
# ~500 px at its input, so a factor of 3 leaves no size between two levels unfound, and a face
# that a level must find (one the coarser level is too small for) is under 3 x 32 = 96 px there.
_LEVEL_RATIO = 3.0
# Levels larger than a tile are cut into tiles that overlap by more than the 96 px above, so each
# face such a level must find lies whole in one tile; detections touching a tile's inner edge
# (cut faces) are dropped. 1536 px tiles: 19 % more pixels than the level, 2.4 MP each at most.
_TILE = 1536
_TILE_OVERLAP = 128
_TILE_EDGE = 8

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


@contextlib.contextmanager
def opencv_errors_only() -> Iterator[None]:
    """OpenCV (and the FFmpeg inside it) says nothing below an error meanwhile: its warnings
    (a camera index that does not open, a damaged file's FFmpeg complaints) would print
    before the one-line error the caller gives."""
    # read by OpenCV when its FFmpeg backend starts: quiet (AV_LOG_QUIET) unless the user set it
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    old = _set_cv_log_level(2)  # 2 = errors only
    try:
        yield
    finally:
        if old is not None:
            _set_cv_log_level(old)


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
        max_side: the first (coarse) pass sees the image shrunk to this long side (YuNet misses
            faces much larger than ~500 px); boxes are mapped back. When no pass finds anything,
            the coarse passes run again at 320 px, for faces that fill the frame.
        min_side: images whose long side is below this are enlarged to it, so that small face
            crops (e.g. 40x40) are still found.
        min_face: the smallest face to find, as its box's side in pixels of the image given.
            Where the coarse pass shrinks such a face below what YuNet finds (~32 px), finer
            levels of a pyramid (up to 3x apart, cut into overlapping 1536 px tiles) look for it
            too; an image of up to ``max_side * min_face / 32`` px (800 px at the defaults) needs
            none. Faces from ``min_face`` up are found at any image size (~93 % of those of
            ``min_face`` itself, nearly all from 1.2x that). None: the coarse pass only, which
            finds faces from ``32 / max_side`` of the long side (100 px in a 24 MP photo).
        tilt: degrees by which the coarse pass also turns the image, both ways (0: not at all),
            shrunk to the pixels of the upright pass. YuNet finds faces rolled up to ~30 degrees
            upright; with the turned passes, faces rolled up to ~75 degrees either way. Rolled
            faces smaller than the coarse pass finds are missed (the finer levels run upright).
        rotations: quarter turns (90, 180, 270) also tried at the coarse level, each with its
            ``tilt`` passes: (90, 180, 270) finds faces at any roll, 4x the coarse passes' cost.
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
        min_face: int | None = 40,
        tilt: float = 45.0,
        rotations: Sequence[int] = (),
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
        if min_face is not None and min_face < 8:
            raise ConfigError(f"min_face must be at least 8 px or None, got {min_face}")
        if not 0.0 <= tilt <= 90.0:
            raise ConfigError(f"tilt must be 0-90 degrees, got {tilt}")
        rotations = check_rotations(rotations, "rotations")
        if refine < 0:
            raise ConfigError(f"refine must be 0 or more passes, got {refine}")
        if refine_size < 64:
            raise ConfigError(f"refine_size must be at least 64 px, got {refine_size}")
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.top_k = top_k
        self.max_side = max_side
        self.min_side = min_side
        self.min_face = min_face
        self.tilt = tilt
        self.rotations = rotations
        self.refine = refine
        self.flip = flip
        self.refine_size = refine_size
        self.model_path = Path(model_path) if model_path is not None else YUNET_MODEL
        self._net = self._build(_read_verified(self.model_path, MODEL_SHA256))
        self._lock = threading.Lock()

    def _build(self, data: bytes) -> Any:
        """The ``cv2.FaceDetectorYN`` of the model bytes ``data``."""
        # Built from the verified bytes rather than the path: the file could change in between.
        old = _set_cv_log_level(2)  # 2 = errors only
        try:
            return cv2.FaceDetectorYN.create(
                "onnx",
                np.frombuffer(data, dtype=np.uint8),
                np.zeros(0, dtype=np.uint8),
                (320, 320),
                self.score_threshold,
                self.nms_threshold,
                self.top_k,
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

    def __repr__(self) -> str:
        return (
            f"YuNetDetector(score_threshold={self.score_threshold}, "
            f"nms_threshold={self.nms_threshold}, top_k={self.top_k}, "
            f"max_side={self.max_side}, min_side={self.min_side}, min_face={self.min_face}, "
            f"tilt={self.tilt}, rotations={self.rotations}, refine={self.refine}, "
            f"flip={self.flip}, refine_size={self.refine_size})"
        )

    def detect_faces(self, img: np.ndarray) -> list[FacialArea]:
        """Faces in an RGB uint8 image ``(H, W, 3)`` (or gray ``(H, W)``), best score first.

        Returns an empty list when there is none. Coordinates are in pixels of ``img``; the box
        and score come from the pass that found the face best (duplicates from the other
        passes are merged by non-maximum suppression), the landmarks from the refinement
        passes. The smallest face found is ``min_face`` (40 px: the side of its box), at any
        image size; a photo of over 40 MP (:data:`~agegender.vision.images.MAX_PIXELS`) is
        decoded shrunk by 2 by :func:`~agegender.vision.images.load_photo`, so there the
        smallest is 80 px of the full photo. Faces rolled up to ~75 degrees are found by
        default (``tilt``), any roll with ``rotations=(90, 180, 270)``.
        """
        rgb = as_rgb_array(img, "detect_faces")
        # cv2's SIMD swap: a tenth of the time of NumPy's reversed-stride copy on a large photo
        bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
        with self._lock:
            faces = [_facial_area(row) for row in self._search(bgr)]
            if self.refine:
                faces = [self._refine(bgr, f) for f in faces]
        return faces

    def _search(self, bgr: np.ndarray) -> np.ndarray:
        """Rows ``(N, 15)`` in ``bgr``'s pixels of every face found, merged, best first."""
        long_side = max(bgr.shape[:2])
        coarse = min(max(long_side, self.min_side), self.max_side)
        upright, turned = self._coarse_passes(bgr, coarse)
        finer = [
            self._tiled_pass(bgr, s) for s in self._finer_scales(long_side, coarse / long_side)
        ]
        rows = _merge([upright, *finer, turned], self.nms_threshold)
        if len(rows) == 0 and coarse > _FALLBACK_SIDE:
            rows = _merge(list(self._coarse_passes(bgr, _FALLBACK_SIDE)), self.nms_threshold)
        return rows

    def _angles(self) -> list[float]:
        """The turns of the coarse passes, degrees anticlockwise: 0, +-tilt, each rotation."""
        out: list[float] = []
        for centre in (0, *self.rotations):
            for a in (centre, centre + self.tilt, centre - self.tilt):
                a = a % 360.0
                if not any(abs(a - b) < 1e-6 for b in out):
                    out.append(a)
        return out

    def _finer_scales(self, long_side: int, coarse: float) -> list[float]:
        """Scales (of ``bgr``) of the pyramid's levels below the coarse pass, coarse to fine."""
        if self.min_face is None:
            return []
        fine = min(1.0, _YUNET_MIN_FACE / self.min_face)
        if fine <= coarse * 1.05:  # the coarse pass already sees min_face large enough
            return []
        steps = math.ceil(math.log(fine / coarse) / math.log(_LEVEL_RATIO))
        return [coarse * (fine / coarse) ** (k / steps) for k in range(1, steps + 1)]

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

    def _coarse_passes(self, bgr: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``bgr`` shrunk to long side ``side``: ``(upright, turned by each angle)``."""
        work, sx, sy = _resized(bgr, side / max(bgr.shape[:2]))
        upright, turned = [np.zeros((0, 15))], [np.zeros((0, 15))]
        for angle, m, size in _turns(work.shape, self._angles()):
            rows = _unturned(self._run(_turn(work, m, size)), m, angle)
            (upright if angle == 0 else turned).append(rows)
        return _unscaled(np.concatenate(upright), sx, sy), _unscaled(np.concatenate(turned), sx, sy)

    def _tiled_pass(self, bgr: np.ndarray, scale: float) -> np.ndarray:
        """Rows of ``bgr`` scaled by ``scale``, cut into overlapping tiles when large."""
        level, sx, sy = _resized(bgr, scale)
        h, w = level.shape[:2]
        xs, tw = _tile_starts(w)
        ys, th = _tile_starts(h)
        parts = []
        for y0 in ys:
            for x0 in xs:
                rows = self._run(np.ascontiguousarray(level[y0 : y0 + th, x0 : x0 + tw]))
                # a face cut by an inner edge lies whole in the neighbouring tile
                cut = np.zeros(len(rows), bool)
                if x0 > 0:
                    cut |= rows[:, 0] < _TILE_EDGE
                if y0 > 0:
                    cut |= rows[:, 1] < _TILE_EDGE
                if x0 + tw < w:
                    cut |= rows[:, 0] + rows[:, 2] > tw - _TILE_EDGE
                if y0 + th < h:
                    cut |= rows[:, 1] + rows[:, 3] > th - _TILE_EDGE
                rows = rows[~cut]
                rows[:, [0, 4, 6, 8, 10, 12]] += x0  # x of the box and of the landmarks
                rows[:, [1, 5, 7, 9, 11, 13]] += y0
                parts.append(rows)
        return _unscaled(np.concatenate(parts), sx, sy)

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


def check_rotations(rotations: Sequence[int], name: str) -> tuple[int, ...]:
    """``rotations`` as a sorted tuple of distinct quarter turns (90, 180, 270; 0 is always
    tried); raises :class:`~agegender.core.errors.ConfigError` naming ``name`` otherwise."""
    if isinstance(rotations, (str, bytes)) or not isinstance(rotations, Sequence):
        raise ConfigError(f"{name}: give a list of 90, 180, 270, got {rotations!r}")
    bad = [r for r in rotations if isinstance(r, bool) or not isinstance(r, int)
           or r % 90 or not 0 <= r <= 270]  # fmt: skip
    if bad:
        raise ConfigError(f"{name}: multiples of 90 within 0-270 only, got {bad[0]!r}")
    return tuple(sorted(set(rotations) - {0}))


def _facial_area(row: np.ndarray) -> FacialArea:
    x, y, bw, bh = row[:4]
    box = (float(x), float(y), float(x + bw), float(y + bh))
    return FacialArea(box, float(row[14]), _points(row[4:14].reshape(5, 2)))


def _resized(bgr: np.ndarray, scale: float) -> tuple[np.ndarray, float, float]:
    """``bgr`` scaled by ``scale`` (whole pixels), and the factors that map back (x, y)."""
    h, w = bgr.shape[:2]
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    if (tw, th) == (w, h):
        return bgr, 1.0, 1.0
    interp = cv2.INTER_AREA if tw < w else cv2.INTER_LINEAR
    return cv2.resize(bgr, (tw, th), interpolation=interp), w / tw, h / th


def _unscaled(rows: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Rows of an image resized by ``1 / (sx, sy)`` in the original's pixels."""
    out = rows.copy()
    out[:, [0, 2]] *= sx
    out[:, [1, 3]] *= sy
    # points map through pixel centres, as cv2.resize samples them
    out[:, 4:14:2] = (rows[:, 4:14:2] + 0.5) * sx - 0.5
    out[:, 5:14:2] = (rows[:, 5:14:2] + 0.5) * sy - 0.5
    return out


def _turns(shape: tuple[int, ...], angles: Sequence[float]):
    """For each angle: ``(angle, 2x3 matrix image -> turned canvas, canvas (w, h))``. The
    canvas holds the whole turned image, shrunk to the image's pixels (a quarter turn is not
    shrunk), so each turned pass costs what the upright one does."""
    h, w = shape[:2]
    for a in angles:
        c, s = abs(math.cos(math.radians(a))), abs(math.sin(math.radians(a)))
        cw, ch = w * c + h * s, w * s + h * c
        f = min(1.0, math.sqrt(w * h / (cw * ch)))
        size = (max(1, round(cw * f)), max(1, round(ch * f)))
        m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), a, f)
        m[:, 2] += ((size[0] - 1) / 2 - (w - 1) / 2, (size[1] - 1) / 2 - (h - 1) / 2)
        yield a, m, size


def _turn(work: np.ndarray, m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if np.allclose(m, np.eye(2, 3)):
        return work
    # grey, not an edge smeared outwards, around the turned image: no face-like streaks
    return cv2.warpAffine(work, m, size, flags=cv2.INTER_LINEAR, borderValue=(128, 128, 128))


def _unturned(rows: np.ndarray, m: np.ndarray, angle: float) -> np.ndarray:
    """Rows found on the canvas ``m`` made, in the image's pixels: landmarks exactly, the box
    as the face's own (upright in its frame) box, centred where the face is."""
    if np.allclose(m, np.eye(2, 3)) or len(rows) == 0:
        return rows
    inv = cv2.invertAffineTransform(m)
    scale = math.sqrt(abs(np.linalg.det(inv[:, :2])))
    out = rows.copy()
    pts = rows[:, 4:14].reshape(-1, 2)
    out[:, 4:14] = (pts @ inv[:, :2].T + inv[:, 2]).reshape(-1, 10)
    centre = (rows[:, 0:2] + rows[:, 2:4] / 2) @ inv[:, :2].T + inv[:, 2]
    size = rows[:, 2:4] * scale
    if round(angle / 90) % 2 and abs(angle % 90) < 1e-6:
        size = size[:, ::-1]  # a quarter turn: the face's width is the image's height
    out[:, 0:2] = centre - size / 2
    out[:, 2:4] = size
    return out


def _tile_starts(length: int) -> tuple[list[int], int]:
    """Starts and length of the fewest tiles of at most ``_TILE`` px overlapping by at least
    ``_TILE_OVERLAP`` that cover ``length``, all of one size, the last flush with the end."""
    if length <= _TILE:
        return [0], length
    n = math.ceil((length - _TILE_OVERLAP) / (_TILE - _TILE_OVERLAP))
    size = math.ceil((length + (n - 1) * _TILE_OVERLAP) / n)
    return [round(k * (length - size) / (n - 1)) for k in range(n)], size


def _merge(passes: list[np.ndarray], threshold: float) -> np.ndarray:
    """The rows of several passes, each face once, best score first. The upright coarse pass
    comes first. A later pass's find of a face already found replaces it only when the two
    read the face's roll differently (by over :data:`_SAME_ROLL` degrees) and the later one
    scores higher: an upright face keeps the box and landmarks it always had (a turned pass's
    box of it is looser, its reading the same), while a face the upright pass reads the wrong
    way up takes the better reading of the pass that saw it upright."""
    kept = np.zeros((0, 15))
    for rows in passes:
        for row in _nms(rows, threshold):
            if len(kept):
                box = np.concatenate([row[0:2], row[0:2] + row[2:4]])[None]
                old = np.column_stack([kept[:, 0:2], kept[:, 0:2] + kept[:, 2:4]])
                same = iou(box, old)[0] > threshold
                if same.any():
                    turn = np.abs((_row_roll(kept[same]) - _row_roll(row[None]) + 180) % 360 - 180)
                    if turn.max() <= _SAME_ROLL or row[14] <= kept[same, 14].max():
                        continue
                    kept = kept[~same]
            kept = np.concatenate([kept, row[None]])
    return kept[np.argsort(-kept[:, 14], kind="stable")]


#: rolls (degrees) two finds of one face may differ by and still be one reading of it
_SAME_ROLL = 30.0


def _row_roll(rows: np.ndarray) -> np.ndarray:
    """The eye line's angle (degrees, as :attr:`FacialArea.roll`) of YuNet rows ``(N, 15)``."""
    return np.degrees(np.arctan2(rows[:, 7] - rows[:, 5], rows[:, 6] - rows[:, 4]))


def _nms(rows: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression over rows from several passes: best score first, a box
    overlapping a kept one by IoU above ``threshold`` dropped (the same face found twice)."""
    rows = rows[np.argsort(-rows[:, 14], kind="stable")]
    boxes = np.column_stack([rows[:, 0:2], rows[:, 0:2] + rows[:, 2:4]])
    overlap = iou(boxes, boxes)
    keep: list[int] = []
    for i in range(len(rows)):
        if all(overlap[i, j] <= threshold for j in keep):
            keep.append(i)
    return rows[keep]


#: name -> (class, the settings that name stands for)
_DETECTORS: dict[str, tuple[Callable[..., Detector], dict[str, Any]]] = {
    "yunet": (YuNetDetector, {}),
    # one framing pass on a 224 px crop, no mirror: about a third of the default's
    # refinement (benchmarks/predict_speed.py measures both, time and accuracy)
    # video frames are many: the single upright 640 px pass (no finer levels, no turned passes)
    "yunet-fast": (
        YuNetDetector,
        {"refine": 1, "refine_size": 224, "flip": False, "min_face": None, "tilt": 0.0},
    ),
}


def list_detectors() -> list[str]:
    """Names accepted by :func:`get_detector`, sorted."""
    return sorted(_DETECTORS)


def get_detector(name: str = "yunet", **kwargs: Any) -> Detector:
    """Build a face detector by name; keyword arguments go to its constructor.

    Raises :class:`~agegender.core.errors.ConfigError` for an unknown name or argument.
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


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of boxes ``(N, 4)`` and ``(M, 4)`` (x0, y0, x1, y1): ``(N, M)``.

    >>> iou(np.array([[0.0, 0, 2, 2]]), np.array([[1.0, 0, 3, 2], [5.0, 5, 6, 6]])).round(3)
    array([[0.333, 0.   ]])
    """
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    # the floor keeps two empty boxes at 0 rather than 0 / 0
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


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
    overlap = iou(boxes, np.array([box], np.float64))[:, 0]
    if overlap.max() < 0.3:
        raise ValueError("no face found in the given box")
    return faces[int(overlap.argmax())]


# --------------------------------------------------------------------------- alignment


def _template(size: float) -> np.ndarray:
    """:data:`UTKFACE_TEMPLATE_200` for a ``size`` x ``size`` crop (scaled about pixel centres)."""
    t = np.asarray(UTKFACE_TEMPLATE_200, dtype=np.float64)
    return (t + 0.5) * (size / UTKFACE_SIZE) - 0.5


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


def alignment_matrix(face: FacialArea, size: int = UTKFACE_SIZE) -> np.ndarray:
    """The 2x3 similarity matrix :func:`align_face` warps with (image -> crop pixels)."""
    if len(face.landmarks) != 5:
        raise ValueError(f"need 5 landmarks, got {len(face.landmarks)}")
    return _similarity(np.asarray(face.landmarks, dtype=np.float64), _template(size))


def align_face(img: np.ndarray, face: FacialArea, size: int = UTKFACE_SIZE) -> np.ndarray:
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


def crop_faces(
    img: np.ndarray, faces: Sequence[FacialArea], size: int = UTKFACE_SIZE
) -> list[np.ndarray]:
    """:func:`align_face` for each face, in the order given."""
    return [align_face(img, f, size) for f in faces]


def face_crop(rgb: np.ndarray, face: FacialArea, data_config: dict[str, Any]) -> np.ndarray:
    """A detected face as a model's input ``(S, S, C)`` uint8: aligned in UTKFace's geometry at
    :data:`UTKFACE_SIZE`, then :func:`~agegender.vision.images.preprocess` as ``data_config``
    says. The one crop of ``prepare`` (labelled photos), prediction and video tracking, so
    training sees faces framed as prediction will."""
    return preprocess(align_face(rgb, face, UTKFACE_SIZE), data_config)
