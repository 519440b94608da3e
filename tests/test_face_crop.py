"""One face crop and one IoU: prepare, prediction and video tracking crop faces alike, and boxes
are compared by one function."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from agegender.inference import tracking
from agegender.vision import detect
from agegender.vision.detect import (
    UTKFACE_SIZE,
    UTKFACE_TEMPLATE_200,
    FacialArea,
    align_face,
    face_crop,
    iou,
    the_face,
)
from agegender.vision.images import face_config, preprocess

SRC = Path(detect.__file__).resolve().parents[1]


def _calls(name: str) -> list[str]:
    """Where the source tree calls ``name(...)``: ``module:line`` for each call."""
    found = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.id if isinstance(f, ast.Name) else getattr(f, "attr", None)
                if called == name:
                    found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    return found


def _defined(name: str) -> list[str]:
    return [
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name == name
    ]


def test_face_crop_is_utkface_geometry_then_the_model_input():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)
    face = FacialArea(
        (40.0, 50.0, 240.0, 250.0), 0.9, tuple((x + 40, y + 50) for x, y in UTKFACE_TEMPLATE_200)
    )
    for cfg in (face_config(32), face_config(64, "rgb")):
        crop = face_crop(rgb, face, cfg)
        assert crop.shape == (cfg["input_size"][1], cfg["input_size"][1], cfg["input_size"][0])
        assert np.array_equal(crop, preprocess(align_face(rgb, face, UTKFACE_SIZE), cfg))


def test_one_face_crop_in_the_tree():
    # align_face is called by the crop itself (and crop_faces) only: prepare, prediction and
    # tracking go through face_crop, so none of them can frame faces differently
    callers = {c.split(":")[0] for c in _calls("align_face")}
    assert callers == {"vision/detect.py"}, callers
    assert len(_calls("face_crop")) >= 3  # prepare (labelled photos), predict, tracking


def test_one_iou_in_the_tree():
    assert _defined("iou") == ["vision/detect.py"]
    assert tracking.iou is detect.iou


def test_iou_values():
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10]], np.float64)
    assert iou(boxes, boxes).round(3).tolist() == [[1.0, 0.333], [0.333, 1.0]]
    empty = np.zeros((1, 4))
    assert iou(empty, empty).tolist() == [[0.0]]  # no 0 / 0


def test_the_face_picks_by_iou():
    faces = [
        FacialArea((0.0, 0.0, 10.0, 10.0), 0.9, UTKFACE_TEMPLATE_200),
        FacialArea((20.0, 0.0, 30.0, 10.0), 0.9, UTKFACE_TEMPLATE_200),
    ]
    assert the_face(faces, (19.0, 0.0, 29.0, 10.0)) is faces[1]
    with pytest.raises(ValueError, match="no face found in the given box"):
        the_face(faces, (50.0, 50.0, 60.0, 60.0))
