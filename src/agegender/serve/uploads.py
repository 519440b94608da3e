"""What the web service accepts, and how it refuses the rest: its limits (one frozen
:class:`ServiceLimits`), and the one admission every image upload goes through, shared by the
photo endpoints (:mod:`agegender.serve.app`) and the video ones (:mod:`agegender.serve.video`).

An upload is admitted in this order, on every route:

1. the request as a whole (:class:`agegender.serve.guards.Admission`, before its body is
   read): its ``Content-Length`` against the route's body limit (413), then a place in the
   queue and room in the buffered-bytes budget (503);
2. each file's size while it is read (:func:`read_upload`: 413);
3. in a thread, never on the event loop (:func:`probe_uploads`): the type (415), the header,
   the pixel count and the EXIF orientation (422), and a batch's pixel budget (422), before
   any pixel is decoded;
4. the decode itself (:func:`decode_upload`, in the inference pool: 422 for corrupt data).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import UploadFile
from PIL import Image
from pydantic import BaseModel

from agegender.core.errors import ConfigError
from agegender.vision.images import decode_rgb, open_image, upright_size

#: PIL format names the service decodes; MPO is the multi-picture JPEG that phones write
FORMATS = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


#: the defaults :func:`agegender.serve.app.serve` shows as parameters (and the command line
#: reads from its source): declared here, once, and taken by :class:`ServiceLimits`
WORKERS = 1
QUEUE = 16
MAX_UPLOAD_MB = 10.0
MAX_VIDEO_MB = 50.0


def flag(name: str) -> str:
    """The command-line option that sets the limit ``name`` (``max_pixels`` -> ``--max-pixels``;
    ``workers``, threads, is ``--request-threads``: predict's ``--workers`` counts processes)."""
    return "--request-threads" if name == "workers" else "--" + name.replace("_", "-")


@dataclass(frozen=True)
class ServiceLimits:
    """Every limit of ``agegender serve``, declared once; each is raisable (``serve(...,
    limits=ServiceLimits(max_pixels=...))``, or its command-line option, ``--max-pixels``) and
    every refusal names the option that raises it. Validated on creation: a value the service
    cannot run with is a one-line :class:`ConfigError`.

    Attributes:
        workers: inference threads. On a small CPU one thread running torch on every core
            beats several competing ones; use more with ONNX Runtime or a GPU.
        queue: requests that may wait for a thread; beyond ``workers + queue`` admitted
            uploads the answer is 503 with ``Retry-After``, before their bodies are read.
        max_upload_mb: largest image file; a larger one in a batch gets its own 413.
        max_pixels: largest image (width x height), read from its header before decoding;
            a video's frames may be as large.
        max_request_pixels: pixels a batch request may hold in all (a 35 kB PNG can claim
            36 MP and cost seconds to decode, a batch of them a minute).
        max_batch: files per ``/api/predict/batch`` request; a body over ``max_batch *
            max_upload_mb`` is refused whole with 413.
        max_buffered_mb: bytes of admitted uploads the service holds in memory at once, booked
            from each request's ``Content-Length`` (its body limit when it has none) before the
            body is read; past it the answer is 503. Never less than one full request.
        max_faces: faces answered per image (the best detections); the answer's
            ``faces_left_out`` counts the others.
        max_video_mb: largest clip ``/api/video`` accepts.
        max_video_s: seconds of video one clip may hold.
        max_video_pixels: pixels x frames looked at in one clip (1280x720 at 10 fps for two
            minutes is 1.1e9): a clip past it is refused, and the answer states its cost.
        max_clips: clips admitted at once (one tracked, the others waiting), beyond: 503.
        max_connections: open connections; one more is answered 503 and closed.
        header_timeout_s: seconds a connection may take to send a request's headers.
        body_timeout_s: seconds a request body may take, plus one per ``min_body_kbps`` kB
            received: a client trickling a byte every few seconds is cut off.
        min_body_kbps: the slowest body (kB/s) given more time than ``body_timeout_s``.
    """

    workers: int = WORKERS
    queue: int = QUEUE
    max_upload_mb: float = MAX_UPLOAD_MB
    max_pixels: int = 16_000_000
    max_request_pixels: int = 64_000_000
    max_batch: int = 16
    max_buffered_mb: float = 256.0
    max_faces: int = 100
    max_video_mb: float = MAX_VIDEO_MB
    max_video_s: float = 120.0
    max_video_pixels: int = 2_000_000_000
    max_clips: int = 2
    max_connections: int = 128
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    min_body_kbps: float = 32.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            lo, hi = _RANGES[field.name]
            value = getattr(self, field.name)
            whole = field.type == "int"
            ok_type = isinstance(value, int if whole else (int, float))
            if (
                isinstance(value, bool)
                or not ok_type
                or not (math.isfinite(value) and lo <= value <= hi)
            ):
                raise ConfigError(
                    f"{field.name} must be {lo:g}-{hi:g}, got {value!r} ({flag(field.name)})"
                )

    def replace(self, **changes: Any) -> ServiceLimits:
        """A copy with ``changes``, validated like the original."""
        return dataclasses.replace(self, **changes)

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 1e6)

    @property
    def max_video_bytes(self) -> int:
        return int(self.max_video_mb * 1e6)

    @property
    def buffered_bytes(self) -> int:
        """The buffered-bytes budget: never less than one full batch, which must fit."""
        return max(int(self.max_buffered_mb * 1e6), self.max_batch * self.max_bytes + 65536)


#: each limit's accepted range: far beyond any real use above, so that a typo such as
#: ``1e308`` is refused at start-up instead of overflowing later
_RANGES: dict[str, tuple[float, float]] = {
    "workers": (1, 256),
    "queue": (0, 100_000),
    "max_upload_mb": (0.001, 4096),  # under 1 kB no JPEG face fits
    "max_pixels": (1, 2**31),
    "max_request_pixels": (1, 2**34),
    "max_batch": (1, 10_000),
    "max_buffered_mb": (1, 1_000_000),
    "max_faces": (1, 100_000),
    "max_video_mb": (0.01, 1_000_000),
    "max_video_s": (0.1, 86_400),
    "max_video_pixels": (1, 2**50),
    "max_clips": (1, 1_000),
    "max_connections": (1, 1_000_000),
    "header_timeout_s": (0.01, 3_600),
    "body_timeout_s": (0.01, 3_600),
    "min_body_kbps": (0.001, 1e9),
}


class Detail(BaseModel):
    """What every error answer holds."""

    detail: str


#: the answers other than 200 that the upload endpoints give, for the OpenAPI schema
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Detail, "description": text}
    for code, text in {
        400: "unknown host name (see --allow-host), or an unreadable form",
        401: "no API key, or a wrong one (where the service has --api-key)",
        403: "a post from another web origin (see --allow-origin)",
        413: "a file over --max-upload-mb, or too many files",
        415: "not a JPEG, PNG or WebP image",
        422: "truncated or corrupt data, too many pixels, a flat image, or a missing field",
        503: "the queue is full: retry after the Retry-After header's seconds",
    }.items()
}


class ImageError(Exception):
    """An upload the service refuses: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def too_large(limit: int) -> str:
    return f"upload too large: the limit is {limit / 1e6:g} MB per image (--max-upload-mb)"


async def read_upload(upload: UploadFile, limit: int) -> bytes:
    """The file's bytes, refused with :class:`ImageError` 413 past ``limit`` (only
    ``limit + 1`` bytes are ever read)."""
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ImageError(413, too_large(limit))
    return data


def _upright(img: Image.Image) -> tuple[int, int]:
    """:func:`upright_size` without decoding: Pillow looks for a PNG's EXIF by decoding the
    whole image, so a PNG without one before its pixels is taken as upright."""
    if img.format == "PNG" and "exif" not in img.info:
        return img.size
    return upright_size(img)


def check_upload(data: bytes, max_pixels: int = ServiceLimits.max_pixels) -> tuple[int, int]:
    """Read only the header of an uploaded file: its upright ``(width, height)``.

    Raises :class:`ImageError` with 415 for anything but JPEG/PNG/WebP and 422 for an
    unreadable header or EXIF block (whatever the decoder raised), more than ``max_pixels``
    pixels, or a decompression bomb, so an oversized image costs nothing to refuse.
    """
    if not data:
        raise ImageError(422, "empty file")
    try:
        # PIL's own bomb check (about 179 M pixels) still applies; ours is the lower limit
        img = open_image(io.BytesIO(data), max_pixels=2**62)
    except ValueError as e:
        raise ImageError(415 if str(e).startswith("not an image") else 422, str(e)) from None
    if img.format not in FORMATS:
        raise ImageError(415, f"unsupported image format {img.format}: send JPEG, PNG or WebP")
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(
            422, f"too many pixels: {w}x{h} exceeds the limit of {max_pixels:,} (--max-pixels)"
        )
    try:
        return _upright(img)
    except Exception as e:  # a damaged EXIF block or chunk: Pillow raises anything here
        raise ImageError(422, f"corrupt image: {type(e).__name__}: {e}".splitlines()[0]) from None


def probe_uploads(
    uploads: list[bytes], limits: ServiceLimits
) -> list[tuple[int, int] | ImageError]:
    """Step 3 of the admission for each upload of one request: its upright size, or the
    :class:`ImageError` that refuses it (its own, or 422 past the request's pixel budget).
    Reads headers only; run it in a thread."""
    spent, out = 0, []
    budget = f"{limits.max_request_pixels / 1e6:g} MP (--max-request-pixels)"
    for data in uploads:
        try:
            w, h = check_upload(data, limits.max_pixels)
        except ImageError as e:
            out.append(e)
            continue
        spent += w * h
        over = spent > limits.max_request_pixels
        out.append(ImageError(422, f"past the request's budget of {budget}") if over else (w, h))
    return out


async def admit_uploads(files: list[UploadFile], limits: ServiceLimits) -> list[bytes | ImageError]:
    """Steps 2 and 3 of the admission for the files of one request (every route takes its
    images through here): each file's bytes, or the :class:`ImageError` that refuses it."""
    read: list[bytes | ImageError] = []
    for upload in files:
        try:
            read.append(await read_upload(upload, limits.max_bytes))
        except ImageError as e:
            read.append(e)
    ok = [data for data in read if isinstance(data, bytes)]
    # headers are parsed in a thread: a PNG's EXIF search or a damaged header costs time
    probed = iter(await asyncio.to_thread(probe_uploads, ok, limits) if ok else [])
    out: list[bytes | ImageError] = []
    for data in read:
        found = next(probed) if isinstance(data, bytes) else data
        out.append(found if isinstance(found, ImageError) else data)
    return out


def decode_upload(data: bytes, max_pixels: int = ServiceLimits.max_pixels) -> np.ndarray:
    """The bytes of an uploaded file -> an upright RGB ``(H, W, 3)`` uint8 array, after
    :func:`check_upload`; truncated or corrupt pixel data raises :class:`ImageError` 422, and
    so does an image of one flat colour (a header with no picture behind it decodes so)."""
    check_upload(data, max_pixels)
    try:
        rgb = decode_rgb(data, max_pixels)
    except ValueError as e:
        raise ImageError(422, str(e)) from None
    except Exception as e:  # what the decoders raise beyond ValueError (OSError, SyntaxError)
        raise ImageError(422, f"corrupt image: {type(e).__name__}: {e}".splitlines()[0]) from None
    if rgb.min() == rgb.max():
        raise ImageError(422, "the image is one flat colour: no picture in it (truncated?)")
    return rgb
