"""Faces in video: frames in, faces tracked across them, one estimate per person out.

Each sampled frame goes through the same detection, alignment and network as a photo. A
:class:`Tracker` joins the faces of successive frames into tracks, as ByteTrack does for
boxes: predicted forward at constant velocity, matched by overlap (IoU), the confident
detections first, then the less confident ones to the tracks still unmatched, so a face that
blurs for a frame stays its track. A track is reported once it has been seen ``MIN_HITS``
times: a face seen for a frame or two is not a person.

A track's estimate pools its frames (:class:`Evidence`): the age distributions of the network
(DLDL) are multiplied, each frame weighted by its detection score and face size, so the age
interval narrows as evidence accumulates; the gender logits add up likewise. Frames of one face
are far from independent, so a frame counts as ``LOOK`` of an independent look, and a track as
``MAX_LOOKS`` looks at most: its interval stops narrowing where more frames of the same face
would only repeat the same error.

Sources: a video file (decoded by OpenCV's FFmpeg backend), a camera index, or any iterable of
RGB arrays (your own decoder). No torch here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from agegender.errors import AgeGenderError

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
    iterator of ``(index, rgb)``. Raises :class:`VideoError` (one line) for what cannot be read."""
    if isinstance(source, (str, os.PathLike, int)):
        cap = cv2.VideoCapture(source if isinstance(source, int) else str(source))
        if not cap.isOpened():
            cap.release()
            if isinstance(source, int):
                raise VideoError(f"camera {source} does not open (no such device, or in use)")
            if not Path(source).is_file():
                raise VideoError(f"no such video: {source}")
            raise VideoError(f"{source}: not a video OpenCV can read")
        fps = cap.get(cv2.CAP_PROP_FPS)
        fps = fps if math.isfinite(fps) and 1 <= fps <= 1000 else 25.0

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


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes ``(N, 4)`` and ``(M, 4)`` (x0, y0, x1, y1): ``(N, M)``."""
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


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

    def estimate(self) -> dict[str, Any]:
        """The pooled ``age``, 90 % ``age_interval`` (None without a distribution),
        ``p_female`` and ``gender``."""
        scale = LOOK * min(1.0, MAX_LOOKS / max(LOOK * self.weight, 1e-9))
        p = 1 / (1 + math.exp(-max(min(scale * self.logit, 50.0), -50.0)))
        out: dict[str, Any] = {"p_female": p, "gender": "female" if p >= 0.5 else "male"}
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

    def predicted(self, frame: int) -> np.ndarray:
        return self.box + self.velocity * (frame - self.last_frame)

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
        # single frames disagree
        out.update(
            gender=est["gender"],
            p_female=round(est["p_female"], 4),
            age_spread=round(self.evidence.shown.std, 2),
            frame_age_spread=round(self.evidence.frames.std, 2),
        )
        return out


class Tracker:
    """ByteTrack-style association of per-frame faces into tracks (see the module).

    ``step(frame, time_s, faces, outputs)`` takes one frame's detections (``faces`` with
    ``box`` and ``score``; ``outputs`` the network's per face: age, p_female, age_probs) and
    returns each face's track id (None for a face no confirmed track holds yet).
    ``max_missed`` is in frames of the source; ``keep_ended`` bounds how many ended tracks are
    remembered (None: all, as a file's summary needs; a live camera keeps the latest).
    """

    def __init__(
        self, max_missed: int, min_hits: int = MIN_HITS, keep_ended: int | None = None
    ) -> None:
        self.max_missed, self.min_hits, self.keep_ended = max_missed, min_hits, keep_ended
        self.active: list[Track] = []
        self.ended: list[Track] = []
        self.next_id = 1

    def step(self, frame: int, time_s: float, faces: list, outputs: list[dict]) -> list[int | None]:
        boxes = np.array([f.box for f in faces], np.float64).reshape(-1, 4)
        scores = np.array([f.score for f in faces])
        assigned: list[Track | None] = [None] * len(faces)
        free = list(range(len(self.active)))
        for lo, hi in ((HIGH, 2.0), (LOW, HIGH)):  # confident detections first
            dets = [i for i in range(len(faces)) if lo <= scores[i] < hi and assigned[i] is None]
            if not dets or not free:
                continue
            pred = np.stack([self.active[t].predicted(frame) for t in free])
            for r, c in _greedy(iou(pred, boxes[dets]), IOU_MIN):
                assigned[dets[c]] = self.active[free[r]]
            taken = {id(t) for t in assigned if t is not None}
            free = [t for t in free if id(self.active[t]) not in taken]
        for i, track in enumerate(assigned):
            if track is None and scores[i] >= HIGH:  # a new face
                track = Track(
                    self.next_id,
                    boxes[i],
                    np.zeros(4),
                    frame,
                    frame,
                    time_s,
                    time_s,
                    hits=0,
                    frames=0,
                )
                self.next_id += 1
                self.active.append(track)
                assigned[i] = track
            if track is not None:
                self._update(track, frame, time_s, boxes[i], scores[i], outputs[i])
        self._retire(frame)
        return [t.id if t is not None and t.hits >= self.min_hits else None for t in assigned]

    def _update(
        self, t: Track, frame: int, time_s: float, box: np.ndarray, score: float, out: dict
    ) -> None:
        if t.hits:
            gap = max(frame - t.last_frame, 1)
            t.velocity = 0.5 * t.velocity + 0.5 * (box - t.box) / gap
        t.box, t.last_frame, t.end_s = box, frame, time_s
        t.hits += 1
        t.frames += 1
        side = float(min(box[2] - box[0], box[3] - box[1]))
        w = float(score) * min(1.0, max(side, 1.0) / GOOD_SIDE)
        t.evidence.add(out, w)
        if w >= t.best[0]:
            t.best = (w, [float(v) for v in box], frame)

    def _retire(self, frame: int) -> None:
        gone = [t for t in self.active if frame - t.last_frame > self.max_missed]
        self.active = [t for t in self.active if frame - t.last_frame <= self.max_missed]
        self.ended += [t for t in gone if t.hits >= self.min_hits]
        if self.keep_ended is not None and len(self.ended) > self.keep_ended:
            del self.ended[: len(self.ended) - self.keep_ended]

    def carried(self, frame: int) -> list[tuple[int, np.ndarray]]:
        """Confirmed tracks' predicted boxes on a frame without detection."""
        return [(t.id, t.predicted(frame)) for t in self.active if t.hits >= self.min_hits]

    def tracks(self) -> list[dict[str, Any]]:
        """Every confirmed track, ended or still active, by first appearance."""
        done = self.ended + [t for t in self.active if t.hits >= self.min_hits]
        return [t.summary() for t in sorted(done, key=lambda t: (t.first_frame, t.id))]
