"""Faces in video: frames in, faces tracked across them, one estimate per person out.

Each sampled frame goes through the same detection, alignment and network as a photo. A
:class:`Tracker` joins the faces of successive frames into tracks, as ByteTrack does for
boxes: predicted forward at constant velocity, matched by overlap (IoU), the confident
detections first, then the less confident ones to the tracks still unmatched, so a face that
blurs for a frame stays its track. A track is reported once it has been seen ``MIN_HITS``
times and its frames, on the whole, look like a face: a mean detection score of
``CONFIRM_SCORE``, a size of ``MIN_SIDE_PX`` and ``MIN_SIDE_FRAC`` of the frame, landmarks
placed as a face's (:func:`face_like`). A face seen for a frame or two, or a bowl the fast
detector takes for one at low resolution, is not a person.

A person who leaves the picture and comes back is the same track: each track pools an
appearance signature (:func:`signature`, a gradient histogram of the aligned face crop the
network sees), and a new track whose signature lies within ``REID_MAX_DIST`` of a track lost
in the last ``REID_WINDOW_S`` seconds continues it, same id and pooled evidence (its summary
lists the ids joined into it).

A track's estimate pools its frames (:class:`Evidence`): the age distributions of the network
(DLDL) are multiplied, each frame weighted by its detection score and face size, so the age
interval narrows as evidence accumulates; the gender logits add up likewise. Frames of one face
are far from independent, so a frame counts as ``LOOK`` of an independent look, and a track as
``MAX_LOOKS`` looks at most: its interval stops narrowing where more frames of the same face
would only repeat the same error. A frame that shows its face badly weighs little
(:func:`frame_quality`): cut by the picture's edge, blurred, small, or with landmarks no face
has; and until a track holds ``SURE_WEIGHT`` of good frames, or while its pooled p_female is
within ``SURE_MARGIN`` of 0.5, its gender is ``"?"`` rather than a guess.

Sources: a video file (decoded by OpenCV's FFmpeg backend), a camera index, or any iterable of
RGB arrays (your own decoder). No torch here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from agegender.core.errors import AgeGenderError
from agegender.inference.face import Face, faces_from
from agegender.vision.detect import face_crop, get_detector, iou, opencv_errors_only

if TYPE_CHECKING:
    from agegender.inference.predictor import Predictor

#: the detector video uses by default: one landmark pass, since pooling over frames makes up
#: for its coarser landmarks (benchmarks/video_speed.py measures it beside yunet)
DETECTOR = "yunet-fast"
#: detect on every k-th sampled frame, the tracks' boxes carried in between: on 2 cores every
#: frame of a 25 fps clip with six faces runs at 0.8x real time, every 2nd at 1.4-1.6x, and
#: the pooled estimates barely move (benchmarks/video_speed.py)
DETECT_EVERY = 2
VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".mpg", ".mpeg")
HIGH, LOW = 0.6, 0.35  #: detection scores: new tracks from HIGH up, updates down to LOW
IOU_MIN = 0.2  #: overlap a detection needs with a track's predicted box to continue it
MIN_HITS = 3  #: frames a track needs before it is a person
MAX_MISSED_S = 1.0  #: seconds unseen after which a track ends
LIVE_RATE = 25.0  #: frames a second frame numbers count in, for frames pushed live
LOOK = 0.2  #: one frame's share of an independent look at a face
MAX_LOOKS = 5.0  #: the most a track's pooled evidence counts for
GOOD_SIDE = 80.0  #: faces smaller than this (px) weigh less, in proportion
# A track is a face (benchmarks/video_clips.py, drift clips: UTKFace faces of 38-53 px scored
# 0.87-0.93 by yunet-fast on every frame; clutter it took for faces at 17-66 px, 0.35-0.80,
# median 0.44-0.51): the mean score of its frames, landmark geometry failing counting as 0.
# Small real faces (~25 px, the "small" clips) average 0.54-0.90 over their tracks, so some
# are lost: 14 of 18 kept, and 2 of 34 clutter tracks at that size pass (a two-step rule,
# 0.65 from the 10th detection, kept 15 but let clutter through on the drift clips).
CONFIRM_SCORE = 0.75  #: the mean detection score a track needs before it is a person
MIN_SIDE_PX = 16.0  #: smaller faces (px) never confirm a track ...
MIN_SIDE_FRAC = 0.025  #: ... nor ones under this share of the frame's shorter side
EDGE_WEIGHT = 0.1  #: a face cut by the picture's edge counts for this share of a frame
BLUR_OK = 15.0  #: variance of the aligned crop's Laplacian from which a frame is sharp
BLUR_FLOOR = 0.2  #: the least a blurred frame counts for
ODD_WEIGHT = 0.1  #: a frame whose landmarks no face has counts for this share
SURE_WEIGHT = 2.0  #: good frames a track needs before its gender is said
SURE_MARGIN = 0.1  #: a pooled p_female within this of 0.5 is said as "?"
UNSURE = "?"  #: the gender said until it is sure
# Re-identification, cosine distances of signatures. Single frames of the same UTKFace face at
# 50 and 110 px, JPEG and 15 % darker: median 0.029, 95th percentile 0.054; of other faces:
# 1st percentile 0.070 (200 faces, AUC 0.9995). Pooled over tracks of the pan clips of
# benchmarks/video_clips.py: one person's visits at most 0.011, different persons 0.059 at
# the least; the threshold lies between the same face's typical single frame and the
# nearest other person.
REID_WINDOW_S = 30.0  #: how long a lost track can be continued by a face that comes back
REID_MAX_DIST = 0.045  #: the most a returning face's signature may differ from the lost one's
REID_SETTLE = 3.0  #: signature weight after which a track is taken as a new person for good


class VideoError(AgeGenderError):
    """A video that cannot be read, or a camera that does not open."""


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Frame:
    """One sampled frame: its index in the source, its time and its RGB pixels."""

    index: int
    time_s: float
    rgb: np.ndarray


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def open_source(source: Any) -> tuple[Iterator[tuple[int, np.ndarray]], float]:
    """``(frames, fps)`` for a video file, a camera index or an iterable of RGB arrays: an
    iterator of ``(index, rgb)``. Raises :class:`VideoError` (one line) for what cannot be read,
    and for a still image (FFmpeg would play a JPEG as a one-frame video). A rate under one
    frame a second (a time-lapse, a slide show) is the file's own; only a missing or absurd one
    is taken as 25."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_file():
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(source) as img:  # the header only: cheap, and a video is refused
                still = img.format != "GIF" and not getattr(img, "is_animated", False)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            still = False
        if still:
            raise VideoError(f"{source}: a single image, not a video")
    if isinstance(source, (str, os.PathLike, int)):
        with opencv_errors_only():
            cap = cv2.VideoCapture(source if isinstance(source, int) else str(source))
        if not cap.isOpened():
            cap.release()
            if isinstance(source, int):
                raise VideoError(f"camera {source} does not open (no such device, or in use)")
            if not Path(source).is_file():
                raise VideoError(f"no such video: {source}")
            raise VideoError(f"{source}: not a video OpenCV can read")
        fps = cap.get(cv2.CAP_PROP_FPS)
        fps = fps if math.isfinite(fps) and 0.001 <= fps <= 1000 else 25.0

        def frames() -> Iterator[tuple[int, np.ndarray]]:
            try:
                index = 0
                while True:
                    ok, bgr = cap.read()
                    if not ok or bgr is None:  # the end, or data cut short: what came is kept
                        return
                    yield index, np.ascontiguousarray(bgr[:, :, ::-1])
                    index += 1
            finally:
                cap.release()

        return frames(), fps
    if isinstance(source, Iterable):
        return ((i, np.ascontiguousarray(f)) for i, f in enumerate(source)), 25.0
    raise TypeError(
        f"a video source is a path, a camera index or frames, not {type(source).__name__}"
    )


def sampled(source: Any, fps: float | None) -> tuple[Iterator[Frame], float]:
    """The source's frames, at most ``fps`` a second (None: every frame), and its own rate."""
    frames, rate = open_source(source)

    def gen() -> Iterator[Frame]:
        last = -1
        for index, rgb in frames:
            t = index / rate
            if fps is not None:
                slot = math.floor(t * fps + 1e-9)
                if slot == last:
                    continue
                last = slot
            yield Frame(index, t, rgb)

    return gen(), rate


# --------------------------------------------------------------------------- tracking


def _greedy(scores: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Pairs (row, col) by descending score, each row and column once, above ``threshold``
    (the optimal assignment would rarely differ at these overlaps)."""
    pairs, rows, cols = [], set(), set()
    for flat in np.argsort(-scores, axis=None):
        r, c = divmod(int(flat), scores.shape[1])
        if scores[r, c] < threshold:
            break
        if r not in rows and c not in cols:
            pairs.append((r, c))
            rows.add(r)
            cols.add(c)
    return pairs


@dataclass
class Spread:
    """A running standard deviation (Welford's): constant memory however long a track is."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n > 1 else 0.0

    def merge(self, other: Spread) -> None:
        """Fold ``other``'s values in (Chan et al.'s pairwise update)."""
        n = self.n + other.n
        if other.n == 0 or n == 0:
            return
        d = other.mean - self.mean
        self.m2 += other.m2 + d * d * self.n * other.n / n
        self.mean += d * other.n / n
        self.n = n


@dataclass
class Evidence:
    """What a track's frames say of its face, pooled (see the module's docstring). Its size
    does not grow with the frames: a camera may run for days."""

    log_age: np.ndarray | None = None  # (K,) weighted sum of log age probabilities
    logit: float = 0.0  # weighted sum of gender logits
    weight: float = 0.0  # sum of frame weights
    mean_age: float = 0.0  # weighted sum of the frames' ages
    frames: Spread = field(default_factory=Spread)  # single frames' ages
    shown: Spread = field(default_factory=Spread)  # the pooled age once a person, frame by frame

    def add(self, out: dict[str, float | np.ndarray], w: float) -> None:
        p = min(max(float(out["p_female"]), 1e-6), 1 - 1e-6)
        self.logit += w * math.log(p / (1 - p))
        if "age_probs" in out:
            log = np.log(np.asarray(out["age_probs"], np.float64) + 1e-9)
            self.log_age = w * log if self.log_age is None else self.log_age + w * log
        self.mean_age += w * float(out["age"])
        self.weight += w
        self.frames.add(float(out["age"]))
        if self.frames.n >= MIN_HITS:  # what is shown of a person, from when it is one
            self.shown.add(self.estimate()["age"])

    def merge(self, other: Evidence) -> None:
        """Pool ``other``'s frames in, as if they had been added here."""
        if other.log_age is not None:
            self.log_age = other.log_age if self.log_age is None else self.log_age + other.log_age
        self.logit += other.logit
        self.weight += other.weight
        self.mean_age += other.mean_age
        self.frames.merge(other.frames)
        self.shown.merge(other.shown)

    def estimate(self) -> dict[str, Any]:
        """The pooled ``age``, 90 % ``age_interval`` (None without a distribution),
        ``p_female`` and ``gender`` (``"?"`` until sure: see the module)."""
        scale = LOOK * min(1.0, MAX_LOOKS / max(LOOK * self.weight, 1e-9))
        p = 1 / (1 + math.exp(-max(min(scale * self.logit, 50.0), -50.0)))
        sure = self.weight >= SURE_WEIGHT and abs(p - 0.5) >= SURE_MARGIN
        gender = ("female" if p >= 0.5 else "male") if sure else UNSURE
        out: dict[str, Any] = {"p_female": p, "gender": gender}
        age = self.mean_age / max(self.weight, 1e-9)
        if self.log_age is not None:
            z = scale * self.log_age
            probs = np.exp(z - z.max())
            probs /= probs.sum()
            ages = np.arange(len(probs))
            cdf = np.cumsum(probs)
            low, high = (float(np.interp(q, cdf, ages)) for q in (0.05, 0.95))
            # The age is the frames' weighted mean estimate, not the product's mean: the
            # network is trained so that its expectation is the age (L1), and a product of
            # skewed distributions leans to their modes (half a year too young on the clips
            # of benchmarks/video_speed.py). The product gives the interval's width.
            shift = age - float(probs @ ages)
            out.update(age=age, age_interval=(max(low + shift, 0.0), high + shift))
        else:
            out.update(age=age, age_interval=None)
        return out


@dataclass
class Track:
    id: int
    box: np.ndarray  # (4,) the last box, in video pixels
    velocity: np.ndarray  # (4,) px per frame
    last_frame: int
    first_frame: int
    start_s: float
    end_s: float
    hits: int = 1
    frames: int = 1  # frames on which it was detected
    best: tuple[float, list[float], int] = (0.0, [], 0)  # (quality, box, frame)
    evidence: Evidence = field(default_factory=Evidence)
    confirmed: bool = False  # a person: reported
    shown: bool = False  # its id given out for a face
    face_score: float = 0.0  # sum of its frames' detection scores, 0 where not face-like
    small: int = 0  # frames too small to confirm it
    low_quality: int = 0  # frames that counted for less than half a good one
    signature: np.ndarray | None = None  # (D,) weighted sum of its frames' signatures
    sig_weight: float = 0.0
    settled: bool = False  # too long a person of its own to be re-identified
    joined: list[int] = field(default_factory=list)  # ids shown, then found to be this one
    returns: int = 0  # times it was lost and continued by a face that came back

    def predicted(self, frame: int) -> np.ndarray:
        return self.box + self.velocity * (frame - self.last_frame)

    def absorb(self, young: Track) -> None:
        """Continue this (lost) track with ``young``, the same person come back."""
        if young.shown:
            self.joined.append(young.id)
        self.joined += young.joined
        self.returns += 1 + young.returns
        self.box, self.velocity = young.box, young.velocity
        self.last_frame, self.end_s = young.last_frame, young.end_s
        self.hits += young.hits
        self.frames += young.frames
        self.low_quality += young.low_quality
        if young.best[0] > self.best[0]:
            self.best = young.best
        self.evidence.merge(young.evidence)
        if young.signature is not None:
            self.signature = (
                young.signature if self.signature is None else self.signature + young.signature
            )
            self.sig_weight += young.sig_weight

    def summary(self) -> dict[str, Any]:
        est = self.evidence.estimate()
        out = {
            "track": self.id,
            "first_frame": self.first_frame,
            "last_frame": self.last_frame,
            "start_s": round(self.start_s, 3),
            "end_s": round(self.end_s, 3),
            "frames": self.frames,
            "best_frame": self.best[2],
            "box": [round(v, 1) for v in self.best[1]],
            "age": round(est["age"], 2),
        }
        if est["age_interval"] is not None:
            out["age_interval"] = [round(v, 1) for v in est["age_interval"]]
        # how much the estimate shown moves once the track is a person, beside how much
        # single frames disagree; which shown ids were this person, how often it came back,
        # and how many of its frames were cut by the edge, blurred, tiny or odd
        out.update(
            gender=est["gender"],
            p_female=round(est["p_female"], 4),
            age_spread=round(self.evidence.shown.std, 2),
            frame_age_spread=round(self.evidence.frames.std, 2),
            joined=list(self.joined),
            returns=self.returns,
            low_quality_frames=self.low_quality,
        )
        return out


def signature(crop: np.ndarray) -> np.ndarray:
    """An appearance signature of an aligned face crop ``(S, S, C)`` uint8: a histogram of
    gradient orientations (8 bins, unsigned) in 4x4 cells of the face (the crop's margins left
    out) at 32x32, each cell normalised and square-rooted, the whole of unit length: ``(128,)``.
    Gradients, not pixels: the same face under other light, scale or compression keeps them.
    On 200 UTKFace test faces it found each face among all 200 (rank-1 100 %)."""
    g = crop.astype(np.float32).mean(axis=-1) if crop.ndim == 3 else crop.astype(np.float32)
    h, w = g.shape
    g = cv2.resize(g[h // 8 : h - h // 16, w // 8 : w - w // 8], (32, 32),
                   interpolation=cv2.INTER_AREA)  # fmt: skip
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=1)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=1)
    mag = np.hypot(gx, gy)
    bins = np.minimum((np.arctan2(gy, gx) % np.pi) * (8 / np.pi), 7).astype(np.int64)
    cells = np.zeros((4, 4, 8), np.float32)  # (cell row, cell col, orientation)
    for b in range(8):
        cells[..., b] = (mag * (bins == b)).reshape(4, 8, 4, 8).sum(axis=(1, 3))
    # a floor in proportion to the crop's contrast keeps flat cells' noise from counting
    cells /= np.linalg.norm(cells, axis=-1, keepdims=True) + 0.064 * float(mag.mean()) + 1e-6
    v = np.sqrt(cells).ravel()
    return v / max(float(np.linalg.norm(v)), 1e-9)


def face_like(face: Any) -> bool:
    """Whether a detection's five landmarks sit as a face's do: eyes apart by 25-75 % of the
    box's width, the nose below the eye line and the mouth below the nose, within reason
    (measured on the eye line's frame, so a tilted face passes). A detection without
    landmarks passes."""
    marks = getattr(face, "landmarks", None)
    if not marks or len(marks) != 5:
        return True
    re, le, nose, rm, lm = (np.asarray(m, np.float64) for m in marks)
    eye = float(np.linalg.norm(le - re))
    width = float(face.box[2] - face.box[0])
    if width <= 0 or not 0.25 <= eye / width <= 0.75:
        return False
    across = (le - re) / eye
    down = np.array([-across[1], across[0]])  # image y points down
    mid = (re + le) / 2
    nose_d = float((nose - mid) @ down) / eye
    mouth_d = float(((rm + lm) / 2 - mid) @ down) / eye
    return 0.2 <= nose_d <= 1.0 and nose_d + 0.1 <= mouth_d <= 1.6


def frame_quality(face: Any, frame_shape: tuple[int, ...], crop: np.ndarray | None = None) -> dict:
    """How well a frame shows a detected face (``box``, ``score``, ``landmarks``): ``edge``
    (its box reaches the picture's border), ``sharp`` (the aligned crop's Laplacian variance
    over :data:`BLUR_OK`, at most 1, at least :data:`BLUR_FLOOR`), ``face_like``
    (:func:`face_like`) and the product of the three weights, ``weight``, which multiplies the
    frame's share in its track's estimate. At the edge, a face whose landmarks come near the
    border (eyes or mouth cut off) weighs :data:`EDGE_WEIGHT`; one whose landmarks are well
    inside (a forehead or chin cut off) loses the share of its box outside the picture."""
    edge, cut = _edge(face, frame_shape)
    sharp = 1.0
    if crop is not None:
        gray = crop.mean(axis=-1) if crop.ndim == 3 else crop
        lap = float(cv2.Laplacian(gray.astype(np.float32), cv2.CV_32F).var())
        sharp = min(max(lap / BLUR_OK, BLUR_FLOOR), 1.0)
    like = face_like(face)
    weight = cut * sharp * (1.0 if like else ODD_WEIGHT)
    return {"edge": edge, "sharp": round(sharp, 3), "face_like": like, "weight": weight}


def _edge(face: Any, frame_shape: tuple[int, ...]) -> tuple[bool, float]:
    """Whether the box reaches the picture's border, and the weight that leaves the frame."""
    h, w = frame_shape[:2]
    x0, y0, x1, y1 = (float(v) for v in face.box)
    side = max(x1 - x0, y1 - y0, 1.0)
    margin = 0.02 * side
    if x0 > margin and y0 > margin and x1 < w - margin and y1 < h - margin:
        return False, 1.0
    near = 0.1 * side  # landmarks this close to the border: the face itself is cut
    marks = getattr(face, "landmarks", None) or ()
    if not marks or any(x < near or y < near or x > w - near or y > h - near for x, y in marks):
        return True, EDGE_WEIGHT
    inside = (min(x1, w) - max(x0, 0.0)) * (min(y1, h) - max(y0, 0.0))
    return True, max(EDGE_WEIGHT, inside / max((x1 - x0) * (y1 - y0), 1e-9))


class Tracker:
    """ByteTrack-style association of per-frame faces into tracks (see the module).

    ``step(frame, time_s, faces, outputs)`` takes one frame's detections (``faces`` with
    ``box`` and ``score``; ``outputs`` the network's per face: age, p_female, age_probs, and
    optionally ``quality`` (:func:`frame_quality`) and ``signature`` (:func:`signature`)) and
    returns each face's track id (None for a face no confirmed track holds yet).
    ``max_missed`` is in frames of the source; ``keep_ended`` bounds how many ended tracks are
    remembered (None: all, as a file's summary needs; a live camera keeps the latest);
    ``frame_side``: the frame's shorter side in px, for the smallest face that confirms a track
    (None: no relative limit); ``reid_window_s``: how long a lost track may be continued by a
    face that comes back (0: never).
    """

    def __init__(
        self,
        max_missed: int,
        min_hits: int = MIN_HITS,
        keep_ended: int | None = None,
        frame_side: float | None = None,
        reid_window_s: float = REID_WINDOW_S,
    ) -> None:
        self.max_missed, self.min_hits, self.keep_ended = max_missed, min_hits, keep_ended
        self.frame_side, self.reid_window_s = frame_side, reid_window_s
        self.active: list[Track] = []
        self.ended: list[Track] = []
        self.next_id = 1

    def step(self, frame: int, time_s: float, faces: list, outputs: list[dict]) -> list[int | None]:
        boxes = np.array([f.box for f in faces], np.float64).reshape(-1, 4)
        scores = np.array([f.score for f in faces])
        assigned = self._associate(frame, boxes, scores)
        for i, track in enumerate(assigned):
            if track is None and scores[i] >= HIGH:  # a new face
                track = Track(self.next_id, boxes[i], np.zeros(4), frame, frame, time_s, time_s,
                              hits=0, frames=0)  # fmt: skip
                self.next_id += 1
                self.active.append(track)
                assigned[i] = track
            if track is not None:
                self._update(track, frame, time_s, boxes[i], scores[i], outputs[i])
        for i, track in enumerate(assigned):
            if track is not None and track in self.active:
                assigned[i] = self._reidentify(track, time_s) or track
        self._retire(frame)
        for t in assigned:
            if t is not None and t.confirmed:
                t.shown = True
        return [t.id if t is not None and t.confirmed else None for t in assigned]

    def _associate(self, frame: int, boxes: np.ndarray, scores: np.ndarray) -> list:
        """Each detection's active track by overlap with the tracks' predicted boxes, the
        confident detections first (ByteTrack), None where no track takes it."""
        assigned: list[Track | None] = [None] * len(boxes)
        free = list(range(len(self.active)))
        for lo, hi in ((HIGH, 2.0), (LOW, HIGH)):  # confident detections first
            dets = [i for i in range(len(boxes)) if lo <= scores[i] < hi and assigned[i] is None]
            if not dets or not free:
                continue
            pred = np.stack([self.active[t].predicted(frame) for t in free])
            for r, c in _greedy(iou(pred, boxes[dets]), IOU_MIN):
                assigned[dets[c]] = self.active[free[r]]
            taken = {id(t) for t in assigned if t is not None}
            free = [t for t in free if id(self.active[t]) not in taken]
        return assigned

    def _update(
        self, t: Track, frame: int, time_s: float, box: np.ndarray, score: float, out: dict
    ) -> None:
        if t.hits:
            gap = max(frame - t.last_frame, 1)
            t.velocity = 0.5 * t.velocity + 0.5 * (box - t.box) / gap
        t.box, t.last_frame, t.end_s = box, frame, time_s
        t.hits += 1
        t.frames += 1
        quality = out.get("quality") or {}
        side = float(min(box[2] - box[0], box[3] - box[1]))
        w = float(score) * min(1.0, max(side, 1.0) / GOOD_SIDE) * quality.get("weight", 1.0)
        t.evidence.add(out, w)
        t.low_quality += quality.get("weight", 1.0) < 0.5
        t.face_score += float(score) if quality.get("face_like", True) else 0.0
        t.small += side < max(MIN_SIDE_PX, MIN_SIDE_FRAC * (self.frame_side or 0.0))
        if out.get("signature") is not None:
            sig = w * np.asarray(out["signature"], np.float64)
            t.signature = sig if t.signature is None else t.signature + sig
            t.sig_weight += w
        if w >= t.best[0]:
            t.best = (w, [float(v) for v in box], frame)
        if not t.confirmed and t.hits >= self.min_hits:
            # a person once its frames, on the whole, look like a face of a size to judge
            t.confirmed = t.face_score / t.frames >= CONFIRM_SCORE and 2 * t.small < t.frames

    def _reidentify(self, young: Track, time_s: float) -> Track | None:
        """The lost track ``young`` continues (``young`` is then gone), or None. Checked on
        each frame of a confirmed track until its signature has :data:`REID_SETTLE` of
        weight: a face coming back in at the edge shows itself badly at first."""
        if young.settled or not young.confirmed or young.signature is None:
            return None
        young.settled = young.sig_weight >= REID_SETTLE
        lost = [t for t in self.ended + self.active
                if t is not young and t.confirmed and t.signature is not None
                and t.last_frame < young.first_frame
                and time_s - t.end_s <= self.reid_window_s]  # fmt: skip
        if not lost:
            return None
        dist = [_distance(young.signature, t.signature) for t in lost]
        best = lost[int(np.argmin(dist))]
        if min(dist) > REID_MAX_DIST or _genders_differ(young, best):
            return None
        best.absorb(young)
        self.active.remove(young)
        if best in self.ended:
            self.ended.remove(best)
            self.active.append(best)
        return best

    def _retire(self, frame: int) -> None:
        gone = [t for t in self.active if frame - t.last_frame > self.max_missed]
        self.active = [t for t in self.active if frame - t.last_frame <= self.max_missed]
        self.ended += [t for t in gone if t.confirmed]
        if self.keep_ended is not None and len(self.ended) > self.keep_ended:
            del self.ended[: len(self.ended) - self.keep_ended]

    def carried(self, frame: int) -> list[tuple[int, np.ndarray]]:
        """Confirmed tracks' predicted boxes on a frame without detection."""
        return [(t.id, t.predicted(frame)) for t in self.active if t.confirmed]

    def tracks(self) -> list[dict[str, Any]]:
        """Every confirmed track, ended or still active, by first appearance."""
        done = self.ended + [t for t in self.active if t.confirmed]
        return [t.summary() for t in sorted(done, key=lambda t: (t.first_frame, t.id))]


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine distance of two pooled signatures (sums of unit vectors, any weights)."""
    return 1.0 - float(a @ b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12)


def _genders_differ(a: Track, b: Track) -> bool:
    """Both tracks sure of a gender, and not the same one: a weak cue, but a free one."""
    ga, gb = a.evidence.estimate()["gender"], b.evidence.estimate()["gender"]
    return UNSURE not in (ga, gb) and ga != gb


# --------------------------------------------------------------------------- a model over frames


@dataclass(frozen=True)
class FrameResult:
    """One sampled frame of a tracked video: its faces with their track ids (None: not yet a
    confirmed track) and how well the frame shows each, and, when ``detected`` is False, the
    boxes the tracks were carried to."""

    index: int
    time_s: float
    detected: bool
    faces: list[tuple[int | None, Face]]
    carried: list[tuple[int, tuple[float, float, float, float]]]
    #: per face of ``faces``, how well this frame shows it (:func:`frame_quality`: ``edge``,
    #: ``sharp``, ``face_like``, ``weight``): what its share in its track's estimate was
    quality: list[dict[str, Any]] = field(default_factory=list)


def tracking_detector(predictor: Any, name: str | None = None) -> Any:
    """The detector tracking runs: ``name`` (else the predictor's, else :data:`DETECTOR`),
    passing faces down to ``LOW`` and trying the quarter turns the predictor's options ask for
    (``rotations``: a camera held sideways or upside down), as a photo's detector does. A face
    found turned keeps its landmarks' identities, so :func:`face_like` judges it in its own
    frame and confirms it."""
    options = getattr(predictor, "options", None)
    rotations = options.rotations if options is not None else ()
    name = name or getattr(predictor, "detector_name", None) or DETECTOR
    return get_detector(name, score_threshold=LOW, rotations=rotations)


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
        self.detector = detector or tracking_detector(predictor)
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
        quality = [o["quality"] for o in outs]
        return FrameResult(index, time_s, True, list(zip(ids, faces)), [], quality)

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
        crops = np.stack([face_crop(rgb, f, p.data_config) for f in found])
        out = p.backend(crops, p.tta)
        h, w = rgb.shape[:2]
        if self.tracker.frame_side is None:
            self.tracker.frame_side = float(min(h, w))
        boxes = [
            (max(a, 0.0), max(b, 0.0), min(c, w), min(d, h))
            for a, b, c, d in (f.box for f in found)
        ]
        per_face = [{k: v[i] for k, v in out.items()} for i in range(len(found))]
        for f, crop, extra in zip(found, crops, per_face):  # the raw box: it may reach past
            extra["quality"] = frame_quality(f, rgb.shape, crop)
            extra["signature"] = signature(crop)
        return faces_from(out, boxes, [f.score for f in found]), per_face

    @property
    def tracks(self) -> list[dict[str, Any]]:
        return self.tracker.tracks()
