"""Annotated images: labels inside the image, sized to their face, on a filled background."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from agegender.inference import draw
from agegender.inference.face import Face


def _face(box, gender="female", interval=(29.0, 40.0)) -> Face:
    return Face(tuple(float(v) for v in box), 0.9, 34.0, interval, gender, 0.9)


def _label_box(size, box, taken=()):
    """Where annotate's rule puts the label of ``box`` on a blank image of ``size``."""
    pen = ImageDraw.Draw(Image.new("RGB", size))
    return draw.draw_label(pen, box, "F 34 (29-40)", draw.FEMALE, size, taken=taken)


@pytest.mark.parametrize(
    "box",
    [
        (0, 0, 80, 90),  # top-left corner
        (560, 0, 640, 90),  # top-right corner: the label would run off at the right
        (600, 150, 640, 200),  # cut by the right edge
        (-20, 150, 40, 210),  # cut by the left edge
        (280, 310, 360, 400),  # at the bottom
        (560, 320, 640, 400),  # bottom-right corner
        (0, 0, 640, 400),  # the whole image
    ],
)
def test_labels_stay_inside_the_image_at_every_edge(box):
    x0, y0, x1, y1 = _label_box((640, 400), box)
    assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 400


def test_label_goes_below_a_face_at_the_top_and_keeps_clear_of_another():
    first = _label_box((640, 400), (100, 0, 200, 120))
    assert first[1] >= 120 - 1  # no room above: below the box
    second = _label_box((640, 400), (140, 130, 240, 250), taken=[first])
    assert not (second[0] < first[2] and first[0] < second[2] and second[1] < first[3])


def test_label_height_grows_with_face_size():
    heights = []
    for side in (40, 120, 300):
        label = _label_box((1280, 886), (400, 400, 400 + side, 400 + side))
        heights.append(label[3] - label[1])
    assert heights[0] < heights[1] < heights[2]
    assert heights[2] <= 0.1 * 886  # a large face gets no poster


def test_a_112_px_crop_gets_a_readable_label_inside_it():
    crop = np.full((112, 112, 3), 128, np.uint8)
    face = _face((6, 8, 106, 110))
    out = np.asarray(draw.annotate(crop, [face]))
    x0, y0, x1, y1 = _label_box((112, 112), face.box)
    assert x1 <= 112 and y1 - y0 >= draw.MIN_TEXT_PX
    region = out[int(y0) + 1 : int(y1) - 1, int(x0) + 1 : int(x1) - 1].reshape(-1, 3)
    filled = (region == draw.FEMALE).all(axis=1).mean()
    assert 0.3 < filled < 0.95 and region.min(axis=1).max() > 230  # filled, white text on it


def test_label_never_wider_than_a_narrow_image():
    x0, _, x1, _ = _label_box((60, 200), (0, 50, 60, 110))
    assert x0 >= 0 and x1 <= 60


def test_text_contrasts_with_its_background():
    assert draw.text_colour(draw.FEMALE) == (255, 255, 255)
    assert draw.text_colour((250, 230, 60)) == (0, 0, 0)


def test_small_photo_labels_do_not_cover_the_faces_more_than_needed():
    # three 70 px faces side by side on a 240 px-wide photo, room above them
    boxes = [(5, 45, 75, 115), (85, 45, 155, 115), (165, 45, 235, 115)]
    taken: list = []
    for box in boxes:
        taken.append(_label_box((240, 160), box, taken))
    for label in taken:
        assert label[3] - label[1] <= 20
    for i, a in enumerate(taken):  # no label hides another
        for b in taken[i + 1 :]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])


def test_annotate_keeps_size_and_draws_every_gender():
    img = np.zeros((200, 300, 3), np.uint8)
    faces = [_face((10, 60, 90, 150)), _face((200, 60, 290, 150), "male", None)]
    out = draw.annotate(img, faces)
    assert out.size == (300, 200)
    pixels = {tuple(c) for c in np.asarray(out).reshape(-1, 3)}
    assert draw.FEMALE in pixels and draw.MALE in pixels


def test_dashed_box_leaves_gaps():
    img = Image.new("RGB", (100, 100))
    draw.draw_box(ImageDraw.Draw(img), (10, 10, 90, 90), draw.UNSURE, 2, dashed=True)
    top = np.asarray(img)[10, 10:90]
    assert (top == draw.UNSURE).all(axis=1).any() and (top == 0).all(axis=1).any()
