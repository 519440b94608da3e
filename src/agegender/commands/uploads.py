"""What the web service accepts as an image upload, and how it refuses the rest: shared by
the photo endpoints (:mod:`agegender.commands.serve`) and the video ones
(:mod:`agegender.commands.serve_video`)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from pydantic import BaseModel

from agegender.images import decode_rgb, open_image, upright_size

#: pixels an image may have, and a request (a batch) in all, read from the headers before any
#: is decoded: a 35 kB PNG can claim 36 MP and cost seconds, a batch of them a minute
MAX_IMAGE_PIXELS = 16_000_000
MAX_REQUEST_PIXELS = 64_000_000
#: PIL format names the service decodes; MPO is the multi-picture JPEG that phones write
FORMATS = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


class Detail(BaseModel):
    """What every error answer holds."""

    detail: str


#: the answers other than 200 that the prediction endpoints give, for the OpenAPI schema
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


def check_upload(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """Read only the header of an uploaded file: its upright ``(width, height)``.

    Raises :class:`ImageError` with 415 for anything but JPEG/PNG/WebP and 422 for an
    unreadable header, more than ``max_pixels`` pixels, or a decompression bomb, so an
    oversized image costs nothing to refuse.
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
        raise ImageError(422, f"too many pixels: {w}x{h} exceeds the limit of {max_pixels:,}")
    return upright_size(img)


def decode_upload(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """The bytes of an uploaded file -> an upright RGB ``(H, W, 3)`` uint8 array, after
    :func:`check_upload`; truncated or corrupt pixel data raises :class:`ImageError` 422, and
    so does an image of one flat colour (a header with no picture behind it decodes so)."""
    check_upload(data, max_pixels)
    try:
        rgb = decode_rgb(data, max_pixels)
    except ValueError as e:
        raise ImageError(422, str(e)) from None
    if rgb.min() == rgb.max():
        raise ImageError(422, "the image is one flat colour: no picture in it (truncated?)")
    return rgb


def too_large(limit: int) -> str:
    return f"upload too large: the limit is {limit / 1e6:g} MB per image"
