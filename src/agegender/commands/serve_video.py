"""The web service's video endpoints, beside the photo ones of :mod:`agegender.commands.serve`.

- ``POST /api/track``: one webcam frame (field ``image``) of a client's ``session`` (an id the
  page draws at random): its faces, each with its track and the track's pooled estimate, so
  labels stay steady from frame to frame. The service keeps a tracker per session in memory,
  bounded: at most ``MAX_SESSIONS`` (the least recently used one goes when another comes), each
  dropped after ``SESSION_IDLE_S`` unused, remembering at most ``KEEP_ENDED`` ended tracks;
  a tracker's pooled evidence has a fixed size however long the camera runs. Frames of one
  session are tracked one at a time, in order of arrival.
- ``POST /api/video``: an uploaded clip (field ``video``), answered with its tracks as
  ``agegender predict VIDEO --output`` writes them. Limits: ``max_video_mb``, ``MAX_VIDEO_S``
  seconds of video, frames of at most the photo pixel limit; one clip is tracked at a time and
  one more may wait, beyond which the answer is 503.
"""

from __future__ import annotations

import asyncio
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

from agegender.commands.uploads import ERRORS, ImageError, decode_upload, too_large
from agegender.detect import get_detector
from agegender.predict import Predictor, Tracking
from agegender.video import DETECTOR, LOW, VideoError, sampled

MAX_SESSIONS = 32  #: live trackers held at once
SESSION_IDLE_S = 60.0  #: a session unused this long is forgotten
KEEP_ENDED = 50  #: ended tracks a live session remembers
MAX_VIDEO_MB = 50.0
MAX_VIDEO_S = 120.0  #: seconds of video one upload may hold
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
        self.detector = get_detector(DETECTOR, score_threshold=LOW)
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


def track_clip(
    predictor: Predictor,
    path: str,
    fps: float,
    max_pixels: int,
    max_seconds: float,
    detector: Any = None,
) -> dict[str, Any]:
    """The tracks of the video file ``path``, refusing (:class:`VideoError`, answered 422)
    one longer than ``max_seconds`` or with frames over ``max_pixels``. ``detector``: as
    :class:`Tracking` takes it."""
    frames, rate = sampled(path, None)
    first = next(frames, None)
    if first is None:
        raise VideoError("no frame could be read (an empty or damaged video)")
    h, w = first.rgb.shape[:2]
    if w * h > max_pixels:
        raise VideoError(f"frames of {w}x{h} exceed the limit of {max_pixels:,} pixels")
    import cv2

    cap = cv2.VideoCapture(path)
    count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    cap.release()
    if math.isfinite(count) and count / rate > max_seconds + 1 / rate:
        raise VideoError(f"the clip lasts {count / rate:.0f} s: the limit is {max_seconds:g} s")
    tracking = Tracking(predictor, path, fps, detector=detector)
    n = 0
    for result in tracking:
        if result.time_s > max_seconds:  # a header may understate the length
            raise VideoError(f"the clip lasts over {max_seconds:g} s: the limit")
        n += 1
    return {"tracks": tracking.tracks, "frames": n, "fps": fps}


def add_video_routes(
    app: FastAPI,
    predictor: Predictor,
    call: Callable[[Callable[[], Any]], Awaitable[Any]],
    max_image_bytes: int,
    max_video_bytes: int,
    max_pixels: int,
) -> None:
    """``/api/track`` and ``/api/video``. ``call(fn)`` runs ``fn`` in the photo endpoints'
    pool, through their admission (503 when full), which webcam frames share; a clip gets a
    thread of its own."""
    sessions = Sessions(predictor)
    clips = ThreadPoolExecutor(1, thread_name_prefix="agegender-video")
    clip_detector = get_detector(DETECTOR, score_threshold=LOW)  # the clips' thread's own
    inside = [0]  # clips running or waiting (the event loop's thread alone touches it)
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
        data = await image.read(max_image_bytes + 1)
        if len(data) > max_image_bytes:
            raise HTTPException(413, too_large(max_image_bytes))
        start = time.perf_counter()
        try:
            faces = await call(lambda: sessions.step(session, decode_upload(data, max_pixels)))
        except ImageError as e:
            raise HTTPException(e.status, e.detail) from None
        ms = round(1e3 * (time.perf_counter() - start), 2)
        return {"session": session, "faces": faces, "ms": ms}

    @app.post("/api/video", responses=errors)
    async def video(
        video: Annotated[UploadFile, File(description="a clip: mp4, webm, mkv, avi, mov")],
        fps: Annotated[float, Form(description="frames a second to look at")] = VIDEO_FPS,
    ) -> dict[str, Any]:
        """The persons in a clip, one track each, as ``agegender predict VIDEO`` finds them."""
        if not (math.isfinite(fps) and 0 < fps <= 60):
            raise HTTPException(422, f"fps must be in (0, 60], got {fps}")
        if inside[0] >= 2:  # one tracked, one waiting
            raise HTTPException(503, "busy with other clips, retry shortly",
                                headers={"Retry-After": "5"})  # fmt: skip
        inside[0] += 1
        try:
            start = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="agegender-clip-") as tmp:
                path = os.path.join(tmp, "clip")
                size = 0
                with open(path, "wb") as f:  # OpenCV reads files, not bytes
                    while chunk := await video.read(1 << 20):
                        size += len(chunk)
                        if size > max_video_bytes:
                            limit = f"{max_video_bytes / 1e6:g} MB"
                            raise HTTPException(413, f"video too large: the limit is {limit}")
                        f.write(chunk)
                loop = asyncio.get_running_loop()
                try:
                    answer = await loop.run_in_executor(
                        clips, track_clip, predictor, path, fps, max_pixels, MAX_VIDEO_S,
                        clip_detector,
                    )  # fmt: skip
                except VideoError as e:
                    raise HTTPException(422, str(e).replace(path, "the upload")) from None
            return {**answer, "ms": round(1e3 * (time.perf_counter() - start), 2)}
        finally:
            inside[0] -= 1
