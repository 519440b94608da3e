"""The web service's video endpoints, beside the photo ones of :mod:`agegender.serve.app`.

- ``POST /api/track``: one webcam frame (field ``image``) of a client's ``session`` (an id the
  page draws at random): its faces, each with its track and the track's pooled estimate, so
  labels stay steady from frame to frame. The service keeps a tracker per session in memory,
  bounded: at most ``MAX_SESSIONS`` (the least recently used one goes when another comes), each
  dropped after ``SESSION_IDLE_S`` unused, remembering at most ``KEEP_ENDED`` ended tracks;
  a tracker's pooled evidence has a fixed size however long the camera runs. Frames of one
  session are tracked one at a time, in order of arrival.
- ``POST /api/video``: an uploaded clip (field ``video``), answered with its tracks as
  ``agegender predict VIDEO --output`` writes them. Limits (fields of
  :class:`~agegender.serve.uploads.ServiceLimits`): ``max_video_mb``, ``max_video_s`` seconds
  of video, frames of at most ``max_pixels``, ``max_video_pixels`` pixels x frames looked at
  (the answer's ``cost`` states them); one clip is tracked at a time and ``max_clips - 1`` more
  may wait, beyond which the answer is 503.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, UploadFile

from agegender.inference.predictor import Predictor, Tracking
from agegender.inference.tracking import DETECTOR, VideoError, sampled, tracking_detector
from agegender.serve.uploads import (
    ERRORS,
    ImageError,
    ServiceLimits,
    admit_uploads,
    decode_upload,
)

MAX_SESSIONS = 32  #: live trackers held at once
SESSION_IDLE_S = 60.0  #: a session unused this long is forgotten
KEEP_ENDED = 50  #: ended tracks a live session remembers
VIDEO_FPS = 10.0  #: frames a second an uploaded clip is looked at, unless asked otherwise
SESSION = re.compile(r"[A-Za-z0-9_-]{8,64}")


class _Session:
    def __init__(self, tracking: Tracking) -> None:
        self.tracking, self.lock = tracking, threading.Lock()
        self.start = self.used = time.monotonic()


class Sessions:
    """Live trackers by session id, bounded in number and in idle time (see the module)."""

    def __init__(
        self, predictor: Predictor, max_sessions: int = MAX_SESSIONS, idle_s: float = SESSION_IDLE_S
    ) -> None:
        self.predictor, self.max_sessions, self.idle_s = predictor, max_sessions, idle_s
        # one detector for every session (its own lock serialises it), passing faces down to LOW
        self.detector = tracking_detector(predictor, _video_detector(predictor))
        self.held: OrderedDict[str, _Session] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: str) -> _Session:
        now = time.monotonic()
        with self.lock:
            for old in [k for k, s in self.held.items() if now - s.used > self.idle_s]:
                del self.held[old]
            session = self.held.pop(key, None)
            if session is None:
                tracking = Tracking(self.predictor, None, keep_ended=KEEP_ENDED,
                                    detector=self.detector)  # fmt: skip
                session = _Session(tracking)
            while len(self.held) >= self.max_sessions:
                self.held.popitem(last=False)  # the least recently used
            session.used = now
            self.held[key] = session  # last: the most recently used
            return session

    def step(self, key: str, rgb: np.ndarray) -> list[dict[str, Any]]:
        """Track one frame of session ``key``: each face as ``/api/predict`` gives it, plus
        ``track`` (None until it is a person) and ``frame`` (this frame's own estimate); for
        a tracked face, age, interval, gender and p_female are the track's pooled ones."""
        session = self.get(key)
        with session.lock:
            tracking = session.tracking
            result = tracking.step(rgb, time.monotonic() - session.start)
            tracking.last_rgb = None  # no frame is kept between requests
            faces = []
            for tid, face in result.faces:
                item = {**face.to_dict(), "track": tid}
                item["frame"] = {k: item[k] for k in ("age", "age_interval", "gender", "p_female")}
                est = tracking.estimate(tid) if tid is not None else None
                if est is not None:
                    item.update(
                        age=round(est["age"], 2),
                        age_interval=[round(v, 2) for v in est["age_interval"]]
                        if est["age_interval"]
                        else None,
                        gender=est["gender"],
                        p_female=round(est["p_female"], 4),
                    )
                faces.append(item)
            return faces


def _clip_size(path: str, limits: ServiceLimits) -> tuple[int, int, float, float]:
    """A clip's frame ``(width, height)``, rate and frame count (NaN: unknown), refusing
    (:class:`VideoError`) one with frames over ``max_pixels`` or longer than ``max_video_s``."""
    import cv2

    frames, rate = sampled(path, None)
    first = next(frames, None)
    if first is None:
        raise VideoError("no frame could be read (an empty or damaged video)")
    h, w = first.rgb.shape[:2]
    if w * h > limits.max_pixels:
        raise VideoError(
            f"frames of {w}x{h} exceed the limit of {limits.max_pixels:,} pixels (--max-pixels)"
        )
    cap = cv2.VideoCapture(path)
    count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    cap.release()
    count = count if math.isfinite(count) and count > 0 else math.nan
    if count / rate > limits.max_video_s + 1 / rate:
        raise VideoError(
            f"the clip lasts {count / rate:.0f} s: the limit is {limits.max_video_s:g} s "
            "(--max-video-s)"
        )
    return w, h, rate, count


def _over_budget(cost: float, limits: ServiceLimits) -> VideoError:
    return VideoError(
        f"the clip needs {cost:.3g} pixels x frames: the limit is "
        f"{limits.max_video_pixels:.3g} (--max-video-pixels; or send it at a lower --fps)"
    )


def track_clip(
    predictor: Predictor, path: str, fps: float, limits: ServiceLimits, detector: Any = None
) -> dict[str, Any]:
    """The tracks of the video file ``path``, refusing (:class:`VideoError`, answered 422)
    one longer than ``max_video_s``, with frames over ``max_pixels``, or whose frames looked
    at cost more than ``max_video_pixels`` (pixels x frames: the answer states its cost).
    ``detector``: as :class:`Tracking` takes it."""
    w, h, rate, count = _clip_size(path, limits)
    # the frames looked at, from the header: min(fps, rate) a second
    expected = count / rate * min(fps, rate)
    if w * h * expected > limits.max_video_pixels:
        raise _over_budget(w * h * expected, limits)
    tracking = Tracking(predictor, path, fps, detector=detector)
    n = 0
    for result in tracking:
        if result.time_s > limits.max_video_s:  # a header may understate the length
            raise VideoError(f"the clip lasts over {limits.max_video_s:g} s: the limit "
                             "(--max-video-s)")  # fmt: skip
        n += 1
        if n * w * h > limits.max_video_pixels:
            raise _over_budget(n * w * h, limits)
    cost = {"pixel_frames": n * w * h, "max_pixel_frames": limits.max_video_pixels}
    return {"tracks": tracking.tracks, "frames": n, "fps": fps, "rate": rate, "cost": cost}


async def _save(video: UploadFile, path: str, limit: int) -> None:
    """The uploaded clip to ``path`` (OpenCV reads files, not bytes), refused with 413 past
    ``limit`` bytes (the admission bounded the body, with the form's framing, before)."""
    size = 0
    with open(path, "wb") as f:
        while chunk := await video.read(1 << 20):
            size += len(chunk)
            if size > limit:
                detail = f"video too large: the limit is {limit / 1e6:g} MB (--max-video-mb)"
                raise HTTPException(413, detail)
            f.write(chunk)


def add_video_routes(
    app: FastAPI,
    predictor: Predictor,
    call: Callable[[Callable[[], Any]], Awaitable[Any]],
    limits: ServiceLimits,
) -> None:
    """``/api/track`` and ``/api/video``, admitted as every upload is (see
    :mod:`agegender.serve.uploads`). ``call(fn)`` runs ``fn`` in the photo endpoints' pool,
    which webcam frames share; a clip gets a thread of its own."""
    sessions = Sessions(predictor)
    clips = ThreadPoolExecutor(1, thread_name_prefix="agegender-video")
    clip_detector = tracking_detector(predictor, _video_detector(predictor))  # its own
    errors = {c: ERRORS[c] for c in (400, 401, 403, 413, 415, 422, 503)}

    @app.post("/api/track", responses=errors)
    async def track(
        image: Annotated[UploadFile, File(description="one webcam frame: JPEG, PNG or WebP")],
        session: Annotated[str, Form(description="the client's id, 8-64 of A-Z a-z 0-9 _ -")],
    ) -> dict[str, Any]:
        """Faces of one frame of a live stream, each with its ``track`` and that track's
        pooled age, interval and gender (``frame`` holds this frame's own)."""
        if not SESSION.fullmatch(session):
            raise HTTPException(422, "session must be 8-64 characters of A-Z a-z 0-9 _ -")
        (data,) = await admit_uploads([image], limits)
        start = time.perf_counter()
        try:
            if isinstance(data, ImageError):
                raise data
            rgb = functools.partial(decode_upload, data, limits.max_pixels)
            faces = await call(lambda: sessions.step(session, rgb()))
        except ImageError as e:
            raise HTTPException(e.status, e.detail) from None
        ms = round(1e3 * (time.perf_counter() - start), 2)
        return {"session": session, "faces": faces, "ms": ms}

    @app.post("/api/video", responses=errors)
    async def video(
        video: Annotated[UploadFile, File(description="a clip: mp4, webm, mkv, avi, mov")],
        fps: Annotated[float, Form(description="frames a second to look at")] = VIDEO_FPS,
    ) -> dict[str, Any]:
        """The persons in a clip, one track each, as ``agegender predict VIDEO`` finds them;
        ``cost`` states its pixels x frames against ``--max-video-pixels``."""
        if not (math.isfinite(fps) and 0 < fps <= 60):
            raise HTTPException(422, f"fps must be in (0, 60], got {fps}")
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="agegender-clip-") as tmp:
            path = os.path.join(tmp, "clip")
            await _save(video, path, limits.max_video_bytes)
            loop = asyncio.get_running_loop()
            job = functools.partial(track_clip, predictor, path, fps, limits, clip_detector)
            try:
                answer = await loop.run_in_executor(clips, job)
            except VideoError as e:
                raise HTTPException(422, str(e).replace(path, "the upload")) from None
        return {**answer, "ms": round(1e3 * (time.perf_counter() - start), 2)}


def _video_detector(predictor: Predictor) -> str:
    """The detector the predictor's options choose for video (``auto``: the faster one)."""
    options = getattr(predictor, "options", None)
    return (options.detector_for("video") if options is not None else None) or DETECTOR
