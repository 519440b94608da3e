"""Images in and out of the models: decoding, folder scanning and the one resize.

Every path that turns a file into pixels goes through here, so that training, evaluation,
prediction and export see faces made alike:

- :func:`open_image` / :func:`open_photo` read a header only and refuse what is too large
  before a pixel is decoded;
- :func:`decode_rgb` and :func:`load_photo` give an upright RGB array for detection (EXIF
  orientation, 16-bit, alpha, palette and CMYK handled once, in :func:`_to_8bit`);
- :func:`preprocess` turns an image or an array into a model's ``(S, S, C)`` uint8 input as its
  ``data_config`` says (size, colour, interpolation): what ``prepare`` writes into a cache and
  what ``predict`` feeds the network;
- the folders are scanned by :mod:`agegender.vision.scan`.

Everything here is NumPy and Pillow: no torch.

>>> cfg = face_config(32, "gray")
>>> preprocess(np.zeros((200, 200, 3), np.uint8), cfg).shape
(32, 32, 1)
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from agegender.core.errors import first_line
from agegender.vision.scan import link_problem, not_regular

COLORS = ("gray", "rgb")
#: far above any face crop; refuses decompression bombs cheaply, from the header
MAX_PIXELS = 40_000_000
#: largest photo :func:`open_photo` and :func:`load_photo` accept: today's 50-108 MP phone
#: photos with room to spare, refused above from the header alone
MAX_PHOTO_PIXELS = 150_000_000
#: ``data_config["interpolation"]`` -> Pillow's filter (Pillow's filters antialias on reduction)
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

ImageSource = (
    str | os.PathLike | bytes | bytearray | memoryview | IO[bytes] | Image.Image | np.ndarray
)
_16BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
#: formats whose decoder can shrink while decoding (DCT scaling), so larger photos are allowed
_DRAFTABLE = ("JPEG", "MPO")


def face_config(size: int, color: str = "gray", interpolation: str = "bilinear") -> dict:
    """The part of a model's ``data_config`` that :func:`preprocess` reads, for code that has
    a size and a colour but no model (``prepare``)."""
    if color not in COLORS:
        raise ValueError(f"color must be one of {COLORS}, got {color!r}")
    return {
        "input_size": (1 if color == "gray" else 3, size, size),
        "color": color,
        "interpolation": interpolation,
    }


# --------------------------------------------------------------------------- opening


def open_image(src: str | os.PathLike | IO[bytes], max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image lazily, refusing decompression bombs before any pixel is decoded.

    Raises ``ValueError`` with a one-line reason for files that are not usable images (a
    FIFO or a device too, refused before it is opened: reading one would block or never end;
    ``"no such file: PATH"``, ``"PATH is a directory"``). A format whose opening already
    allocates its canvas (WebP) has its declared size checked from its first bytes, and a
    JPEG whose data is far too short for its declared size is corrupt (truncated): its decoder
    would fill the missing blocks with gray rather than fail.
    """
    _refuse_special(src)
    declared = _declared_size(src)
    if declared and declared[0] * declared[1] > max_pixels:
        w, h = declared
        raise ValueError(f"decompression bomb: {w}x{h} pixels exceeds {max_pixels:,}")
    try:
        img = Image.open(src)
    except UnidentifiedImageError:  # an OSError too, so it goes first
        raise ValueError("not an image (unknown format)") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"decompression bomb: {e}") from None
    except OSError as e:
        link = link_problem(src) if isinstance(src, (str, os.PathLike)) else None
        if link:
            raise ValueError(link) from None
        if isinstance(e, FileNotFoundError):
            raise ValueError(f"no such file: {os.fsdecode(src)}") from None  # type: ignore[arg-type]
        raise ValueError(f"corrupt image: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ValueError(f"decompression bomb: {w}x{h} pixels exceeds {max_pixels:,}")
    _check_jpeg_length(img)
    return img


def _refuse_special(src: str | os.PathLike | IO[bytes]) -> None:
    """Refuse a folder, a FIFO or a device by name before anything opens it (reading a FIFO
    would block until a writer comes, a device might never end)."""
    if not isinstance(src, (str, os.PathLike)):
        return
    if os.path.isdir(src):
        raise ValueError(f"{os.fsdecode(src)} is a directory")
    special = not_regular(src)
    if special:
        raise ValueError(special)


#: bytes at the start of a file that :func:`_declared_size` reads
_HEAD = 30


def _declared_size(src: str | os.PathLike | IO[bytes]) -> tuple[int, int] | None:
    """The ``(width, height)`` a WebP file declares in its first bytes, read before Pillow
    opens it (opening one creates its decoder, which allocates the whole canvas); None for
    other formats, which Pillow opens from the header alone, and for what cannot be read."""
    try:
        if isinstance(src, (str, os.PathLike)):
            with open(src, "rb") as f:
                head = f.read(_HEAD)
        else:
            at = src.tell()
            head = src.read(_HEAD)
            src.seek(at)
    except (OSError, AttributeError, ValueError):
        return None
    if len(head) < _HEAD or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return None
    chunk = head[12:16]
    if chunk == b"VP8X":  # extended: 24-bit canvas size minus one
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    if chunk == b"VP8L" and head[20] == 0x2F:  # lossless: 14-bit sizes minus one
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 ":  # lossy: 14-bit sizes after the frame tag and start code
        return (
            int.from_bytes(head[26:28], "little") & 0x3FFF,
            int.from_bytes(head[28:30], "little") & 0x3FFF,
        )
    return None


#: the fewest bits a JPEG can spend on an 8x8 block: Huffman coding spends at least a bit on a
#: block's DC alone (two with its AC end-of-block), so a quarter of one leaves room for
#: arithmetic coding of flat images while a header claiming 6000x6000 over 600 bytes fails
_JPEG_BITS_PER_BLOCK = 0.25


def _check_jpeg_length(img: Image.Image) -> None:
    """Refuse a JPEG whose file is too short to hold the blocks its header declares: libjpeg
    decodes such a file without an error, as gray, which would read as "no faces"."""
    if img.format not in ("JPEG", "MPO") or img.fp is None:
        return
    try:
        at = img.fp.tell()
        length = img.fp.seek(0, os.SEEK_END)
        img.fp.seek(at)
    except (OSError, AttributeError, ValueError):
        return
    w, h = img.size
    blocks = math.ceil(w / 8) * math.ceil(h / 8)
    if length * 8 < blocks * _JPEG_BITS_PER_BLOCK:
        raise ValueError(
            f"corrupt image: truncated ({length:,} bytes cannot hold {w}x{h} pixels of JPEG data)"
        )


def upright_size(img: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of ``img`` as shown, after its EXIF orientation, read from the
    header alone (no pixels decoded)."""
    w, h = img.size
    # orientations 5-8 turn the picture by 90 degrees
    return (h, w) if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)


def _too_large(pixels: int, limit: int) -> str:
    def mp(n: int) -> str:
        return f"{n / 1e6:.0f}" if n >= 10e6 else f"{n / 1e6:.1f}"

    return f"image too large ({mp(pixels)} MP > {mp(limit)} MP)"


def open_photo(
    src: str | os.PathLike | IO[bytes],
    max_pixels: int = MAX_PHOTO_PIXELS,
    *,
    full_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """Open a photo lazily (its header only), like :func:`open_image` but with a photo's
    limit: more than ``max_pixels`` raises ``ValueError("image too large (N MP > M MP)")``.
    A WebP allocates its whole canvas when it is opened, so more than ``full_pixels`` of one
    is refused from its header, before any decoding. PIL refuses more than
    ``2 * Image.MAX_IMAGE_PIXELS`` (179 MP) whatever the limit.
    """
    if Image.MAX_IMAGE_PIXELS:
        max_pixels = min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS)
    _refuse_special(src)  # before its first bytes are read
    declared = _declared_size(src)  # a WebP, whose opening allocates it whole
    if declared and declared[0] * declared[1] > min(max_pixels, full_pixels):
        raise ValueError(_too_large(declared[0] * declared[1], min(max_pixels, full_pixels)))
    with warnings.catch_warnings():
        # PIL warns from 89 MP on; the limit that applies is ours, checked below
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = open_image(src, max_pixels=2**62)
        except ValueError as e:
            # PIL's own refusal (from 179 MP) gives the size only inside its message
            found = re.search(r"\((\d+) pixels\)", str(e))
            if not str(e).startswith("decompression bomb") or found is None:
                raise
            raise ValueError(_too_large(int(found[1]), max_pixels)) from None
    w, h = img.size
    # a WebP's canvas is allocated whole on opening: its size alone is the cost
    limit = min(max_pixels, full_pixels) if img.format == "WEBP" else max_pixels
    if w * h > limit:
        raise ValueError(_too_large(w * h, limit))
    return img


# --------------------------------------------------------------------------- decoding


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit scaled to 8 bits by its maximum (PIL would clip at 255), transparency composited
    over white; other modes are left for ``convert``."""
    if img.mode in _16BIT:
        arr = np.asarray(img, dtype=np.float32)
        finite = np.isfinite(arr)
        # a NaN or infinite pixel (float TIFFs) would make the maximum NaN and blank the image:
        # it is set to the finite range's ends and the rest scaled by that range
        top = max(float(arr[finite].max()), 1.0) if finite.any() else 1.0
        arr = np.clip(np.nan_to_num(arr, nan=0.0, posinf=top, neginf=0.0), 0, None)
        img = Image.fromarray((arr * (255.0 / top)).astype(np.uint8))
    if "A" in img.getbands() or "transparency" in img.info:
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img


def _decode(img: Image.Image, mode: str, own: bool, checked: bool, shrink: int = 1) -> Image.Image:
    """An opened image -> upright, 8-bit, in ``mode``, box-averaged by ``shrink`` last.

    ``own``: ``img`` is not the caller's, so it may be turned upright in place. ``checked``: its
    size was already checked against a limit of ours, so PIL's warning (from 89 MP on, which some
    decoders give again while loading) is not an error. Raises ``ValueError`` (one line).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if checked else "error", Image.DecompressionBombWarning)
            if own:
                ImageOps.exif_transpose(img, in_place=True)
            else:
                img = ImageOps.exif_transpose(img)
            img = _to_8bit(img)
            if img.mode != mode:  # convert() copies even to the same mode
                img = img.convert(mode)
            if shrink > 1:  # after the conversion: averaging palette indices would be wrong
                img = img.reduce(shrink)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, EOFError) as e:  # truncated or corrupt data
        raise ValueError(f"corrupt image: {first_line(e)}") from None
    if img.width == 0 or img.height == 0:
        raise ValueError(f"corrupt image: decoded to {img.width}x{img.height}")
    return img


#: what an array image must be, in the words of its errors
_EXPECTED = "expected a uint8 RGB (or gray) image array or a PIL image"


def as_rgb_array(img: np.ndarray, who: str = "") -> np.ndarray:
    """Check an array image and return it as ``(H, W, 3)`` uint8 (gray is repeated).

    ``who``: the public function that was given it, kept for callers; errors speak of the
    image, in the user's terms, not of the functions it passed through.
    """
    del who
    if not isinstance(img, np.ndarray):
        raise TypeError(f"{_EXPECTED} (a numpy array), got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise ValueError(
            f"{_EXPECTED}, got {img.dtype} values of shape {img.shape} "
            "(scale them to 0-255 and use .astype(np.uint8))"
        )
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{_EXPECTED} of shape (H, W, 3) or (H, W), got shape {img.shape}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"expected an image, got an empty array of shape {img.shape}")
    return img


def decode_rgb(src: ImageSource, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image into an RGB uint8 array ``(H, W, 3)`` for detection.

    ``src`` may be a path, the bytes of an image file, a binary file object, a PIL image or an
    array (``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA, uint8; a
    C-contiguous RGB array is returned as is, not copied). The EXIF orientation is applied, so
    coordinates refer to the image as people see it. Transparent pixels are composited over
    white, 16-bit images are scaled to 8 bits by their maximum and palette, gray and CMYK
    images are converted.

    Raises ``ValueError`` with a one-line reason (``"not an image (unknown format)"``,
    ``"corrupt image: ..."``, ``"decompression bomb: ..."``, ``"no such file: PATH"``).
    """
    if isinstance(src, np.ndarray):
        if src.ndim == 3 and src.shape[2] == 4 and src.dtype == np.uint8:
            src = Image.fromarray(src)  # uint8 (H, W, 4) is RGBA
        else:
            return np.ascontiguousarray(as_rgb_array(src, "decode_rgb"))
    if isinstance(src, (bytes, bytearray, memoryview)):
        src = io.BytesIO(bytes(src))
    if isinstance(src, Image.Image):
        if src.width * src.height > max_pixels:
            raise ValueError(
                f"decompression bomb: {src.width}x{src.height} pixels exceeds {max_pixels:,}"
            )
        img = src
    else:
        img = open_image(src, max_pixels)
    return np.ascontiguousarray(np.asarray(_decode(img, "RGB", own=img is not src, checked=False)))


def load_photo(
    src: ImageSource, max_pixels: int = MAX_PHOTO_PIXELS, work_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`decode_rgb` for photos of up to ``max_pixels``, decoded at ``work_pixels`` at most.

    Returns ``(RGB uint8 (h, w, 3), (W, H))``: the upright image, shrunk by a whole factor when
    it has more than ``work_pixels`` (JPEGs by the decoder itself, in draft mode, so a 64 MP
    photo never exists at full size in memory), and the upright size of the full image, which
    coordinates found on the array are scaled to. Faces are found on a 640 px image and cropped
    at 200 px, so the shrunk image loses nothing they need.

    Raises ``ValueError`` with a one-line reason, ``"image too large (N MP > M MP)"`` above
    ``max_pixels``, and for a photo of another format than JPEG (decoded whole) above
    ``work_pixels``.
    """
    if isinstance(src, np.ndarray):
        rgb = decode_rgb(src)
        return rgb, (rgb.shape[1], rgb.shape[0])
    if isinstance(src, (bytes, bytearray, memoryview)):
        src = io.BytesIO(bytes(src))
    if isinstance(src, Image.Image):
        if src.width * src.height > max_pixels:
            raise ValueError(_too_large(src.width * src.height, max_pixels))
        img = src
    else:
        img = open_photo(src, max_pixels, full_pixels=work_pixels)
    full = upright_size(img)
    w, h = img.size
    if w * h > work_pixels and img is not src and img.format in _DRAFTABLE:
        # the decoder's DCT scaling (1/2, 1/4, 1/8): the biggest that keeps w // k pixels
        k = math.ceil(math.sqrt(w * h / work_pixels))
        img.draft(img.mode, (max(w // k, 1), max(h // k, 1)))
        w, h = img.size
    shrink = math.ceil(math.sqrt(w * h / work_pixels)) if w * h > work_pixels else 1
    out = _decode(img, "RGB", own=img is not src, checked=True, shrink=shrink)
    return np.ascontiguousarray(np.asarray(out)), full


# --------------------------------------------------------------------------- model input


def preprocess(img: Image.Image | np.ndarray, data_config: dict[str, Any]) -> np.ndarray:
    """An image -> a model's input, ``(S, S, C)`` uint8, as ``data_config`` says.

    ``img``: an opened (even lazily) PIL image, or an RGB/gray uint8 array (a detected and
    aligned crop, a cache row). The centre square is kept (UTKFace's crops are square already),
    converted to the model's colour and resized with its ``interpolation`` (Pillow's filters,
    which antialias when shrinking). A JPEG file is decoded in draft mode at the smallest DCT
    scale that still covers ``S`` (gray straight from its luma), which is faster and what
    ``prepare`` did when it wrote the training cache. Raises ``ValueError`` (one line).
    """
    chans, size, _ = data_config["input_size"]
    mode = "L" if data_config["color"] == "gray" else "RGB"
    interp = INTERPOLATIONS[data_config.get("interpolation", "bilinear")]
    if isinstance(img, np.ndarray):
        arr = img[:, :, 0] if img.ndim == 3 and img.shape[2] == 1 else img
        if arr.shape[:2] == (size, size) and (arr.ndim == 2) == (mode == "L"):
            return arr.reshape(size, size, chans)  # already the model's input
        pil = Image.fromarray(as_rgb_array(img, "preprocess") if arr.ndim == 3 else arr)
        pil = pil.convert(mode) if pil.mode != mode else pil
    else:
        if img.format == "JPEG":
            img.draft(mode, (size, size))
        pil = _decode(img, mode, own=False, checked=False)
    w, h = pil.size
    side = min(w, h)
    if w != h:
        left, top = (w - side) // 2, (h - side) // 2
        pil = pil.crop((left, top, left + side, top + side))
    if side != size:
        pil = pil.resize((size, size), interp)
    return np.asarray(pil, dtype=np.uint8).reshape(size, size, chans)


def load_face(
    src: str | os.PathLike | IO[bytes] | Image.Image,
    data_config: dict[str, Any],
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """A face file (or an opened image) -> :func:`preprocess`'s model input."""
    img = src if isinstance(src, Image.Image) else open_image(src, max_pixels)
    return preprocess(img, data_config)


def preprocess_batch(images: np.ndarray, data_config: dict[str, Any]) -> np.ndarray:
    """:func:`preprocess` for each row of ``(N, H, W, C)`` uint8 (a cache at another size)."""
    chans, size, _ = data_config["input_size"]
    if images.shape[1:] == (size, size, chans):
        return images
    out = np.empty((len(images), size, size, chans), np.uint8)
    for i, img in enumerate(images):
        out[i] = preprocess(np.asarray(img), data_config)
    return out
