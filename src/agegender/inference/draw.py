"""Faces drawn onto their image: a box and an ``F 34 (29-40)`` label each."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from agegender.inference.predictor import Face
from agegender.vision.images import ImageSource, load_photo


def annotate(image: ImageSource, faces: list[Face]) -> Image.Image:
    """The image (EXIF-upright) with each face's box and label drawn.

    A photo of more than 40 MP is drawn shrunk, as :func:`agegender.vision.images.load_photo`
    decodes it (the boxes, in full-size pixels, are scaled to it).
    """
    rgb, (w, h) = load_photo(image)
    img = Image.fromarray(rgb)
    sx, sy = img.width / w, img.height / h
    draw = ImageDraw.Draw(img)
    side = max(img.size)
    width = max(2, side // 300)
    try:
        font = ImageFont.load_default(size=max(12, side // 45))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    for f in faces:
        color = (230, 60, 120) if f.gender == "female" else (40, 120, 230)
        box = (f.box[0] * sx, f.box[1] * sy, f.box[2] * sx, f.box[3] * sy)
        draw.rectangle(box, outline=color, width=width)
        text = f.label()
        x0, y0 = box[0], box[1]
        tb = draw.textbbox((x0, y0), text, font=font)
        th = tb[3] - tb[1] + 2 * width
        top = y0 - th if y0 - th >= 0 else box[3]
        draw.rectangle((x0, top, x0 + tb[2] - tb[0] + 2 * width, top + th), fill=color)
        draw.text((x0 + width, top + width - (tb[1] - y0)), text, fill="white", font=font)
    return img
