"""Faces drawn onto their image: a box and an ``F 34 (29-40)`` label each.

The label is sized to its face (an eighth of the face's height, readable at the least, never
wider than the image) and placed where it stays whole: above the box, else below it, else
inside its top; shifted left when it would leave the image at the right. The same rule draws
the annotated video (:mod:`agegender.cli.video`) and the web page's canvas.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from agegender.inference.face import Face
from agegender.vision.images import ImageSource, load_photo

Box = tuple[float, float, float, float]
Colour = tuple[int, int, int]
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

FEMALE: Colour = (230, 60, 120)
MALE: Colour = (40, 120, 230)
UNSURE: Colour = (128, 128, 128)  #: a face whose gender is not said, or a track not yet confirmed
LABEL_SHARE = 0.13  #: the label's text height, as a share of its face's height
MIN_TEXT_PX = 11  #: the smallest text height drawn: below it a label is not read
MAX_TEXT_SHARE = 0.025  #: ... and the largest, as a share of the image's longer side


def colour_of(gender: str | None) -> Colour:
    """The box colour of a face said to be ``gender`` (grey for anything but male/female)."""
    return FEMALE if gender == "female" else MALE if gender == "male" else UNSURE


def text_colour(fill: Colour) -> Colour:
    """Black or white, whichever reads better on ``fill`` (by its relative luminance)."""
    r, g, b = fill
    return (0, 0, 0) if 0.2126 * r + 0.7152 * g + 0.0722 * b > 140 else (255, 255, 255)


@lru_cache(maxsize=64)
def font(size: int) -> Font:
    """Pillow's own scalable font at ``size`` px (its fixed bitmap font before Pillow 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size, and no TrueType font ships with it
        return ImageFont.load_default()


def text_px(box: Box, image_size: tuple[int, int], min_px: int = MIN_TEXT_PX) -> int:
    """The text height of ``box``'s label: :data:`LABEL_SHARE` of the face, at least
    ``min_px`` (a small face gets a label wider than itself rather than none that reads), at
    most :data:`MAX_TEXT_SHARE` of the image (a face filling a photo gets no poster)."""
    face = box[3] - box[1]
    # the cap counts a small image as 560 px: a face filling a 112 px crop keeps its share
    top = max(min_px, round(MAX_TEXT_SHARE * max(*image_size, 560)))
    return int(min(max(round(LABEL_SHARE * face), min_px), top))


def place_label(
    box: Box, size: tuple[float, float], image_size: tuple[int, int], taken: Sequence[Box] = ()
) -> Box:
    """Where a label of ``size`` (w, h) goes for ``box``, kept whole inside the image: above
    the box, else below it, else inside its top edge; its left edge at the box's, moved left
    as far as the image's right edge needs (and never past the left one). Of those places,
    the first that overlaps none of the labels ``taken`` already, if one does."""
    (w, h), (iw, ih) = size, image_size
    x0, y0, _, y1 = box
    left = min(max(x0, 0.0), max(iw - w, 0.0))
    tops = [t for t in (y0 - h, y1) if 0 <= t <= ih - h] + [y0]
    places = [
        (left, t, left + w, t + h) for t in (min(max(t, 0.0), max(ih - h, 0.0)) for t in tops)
    ]
    for place in places:
        if not any(_overlap(place, other) for other in taken):
            return place
    return places[0]


def _overlap(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def fitting_font(
    draw: ImageDraw.ImageDraw, text: str, px: int, image_size: tuple[int, int]
) -> tuple[Font, int]:
    """The font of ``px`` px, smaller if ``text`` in it (with its padding) would be wider than
    the image, and that padding."""
    while True:
        pad = max(1, px // 6)
        f = font(px)
        left, _, right, _ = draw.textbbox((0, 0), text, font=f)
        if right - left + 2 * pad <= image_size[0] or px <= 6:
            return f, pad
        px = max(6, int(px * image_size[0] / (right - left + 2 * pad)))


def draw_label(
    draw: ImageDraw.ImageDraw, box: Box, text: str, fill: Colour, image_size: tuple[int, int],
    min_px: int = MIN_TEXT_PX, taken: Sequence[Box] = (), bold: bool = False,
) -> Box:  # fmt: skip
    """``text`` on a ``fill`` background by ``box`` (:func:`text_px`, :func:`place_label`,
    clear of the labels ``taken`` where it can be), in black or white as reads better;
    returns where the label went. ``bold``: strokes a little thicker (video, read in motion)."""
    f, pad = fitting_font(draw, text, text_px(box, image_size, min_px), image_size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
    where = place_label(box, (right - left + 2 * pad, bottom - top + 2 * pad), image_size, taken)
    draw.rectangle(where, fill=fill)
    # the text's own bounding box starts below its origin (the ascender's room): shift it back
    ink = text_colour(fill)
    # a stroke thickens strokes of 20 px and more; smaller ones it would fill in
    size = f.size if isinstance(f, ImageFont.FreeTypeFont) else 0
    stroke = size // 20 if bold else 0
    draw.text(
        (where[0] + pad - left, where[1] + pad - top), text, fill=ink, font=f,
        stroke_width=stroke, stroke_fill=ink,
    )  # fmt: skip
    return where


def line_width(box: Box) -> int:
    """A box outline's width: 2 px for small faces, thicker for large ones."""
    return max(2, round((box[3] - box[1]) / 60))


def draw_box(
    draw: ImageDraw.ImageDraw, box: Box, colour: Colour, width: int, dashed: bool = False
) -> None:
    """``box``'s outline; ``dashed``: in dashes (a face not yet taken as a person)."""
    if not dashed:
        draw.rectangle(box, outline=colour, width=width)
        return
    x0, y0, x1, y1 = box
    dash = max(4, 3 * width)
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    for a, b in zip(corners, corners[1:] + corners[:1]):
        length = max(abs(b[0] - a[0]), abs(b[1] - a[1]))
        for s in range(0, int(length), 2 * dash):
            t0, t1 = s / max(length, 1), min(s + dash, length) / max(length, 1)
            p0 = (a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0)
            p1 = (a[0] + (b[0] - a[0]) * t1, a[1] + (b[1] - a[1]) * t1)
            draw.line((p0, p1), fill=colour, width=width)


def annotate(image: ImageSource, faces: Sequence[Face]) -> Image.Image:
    """The image (EXIF-upright) with each face's box and label drawn.

    A photo of more than 40 MP is drawn shrunk, as :func:`agegender.vision.images.load_photo`
    decodes it (the boxes, in full-size pixels, are scaled to it).
    """
    rgb, (w, h) = load_photo(image)
    img = Image.fromarray(rgb)
    sx, sy = img.width / w, img.height / h
    draw = ImageDraw.Draw(img)
    boxes = [(f.box[0] * sx, f.box[1] * sy, f.box[2] * sx, f.box[3] * sy) for f in faces]
    # every box first, then every label: a neighbour's box never crosses a label
    for f, box in zip(faces, boxes):
        draw_box(draw, box, colour_of(f.gender), line_width(box))
    taken: list[Box] = []
    for f, box in zip(faces, boxes):
        taken.append(draw_label(draw, box, f.label(), colour_of(f.gender), img.size, taken=taken))
    return img
