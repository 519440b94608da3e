"""ONNX model files are trusted no further than their graph bears out: hostile or damaged
metadata is a one-line error, never a traceback, a huge allocation or a silent wrong answer."""

import json
from pathlib import Path

import numpy as np
import pytest

from agegender.core.errors import AgeGenderError
from agegender.inference.model_files import WEIGHTS
from agegender.inference.options import InferenceOptions
from agegender.inference.predictor import ASTRONAUT, Predictor
from agegender.vision.detect import YUNET_MODEL

onnx = pytest.importorskip("onnx")

DEFAULT = WEIGHTS / "default.onnx"


def _with_meta(tmp_path: Path, edit) -> Path:
    """default.onnx with its ``agegender`` metadata changed by ``edit(dict) -> str | None``."""
    model = onnx.load(str(DEFAULT))
    props = {p.key: p.value for p in model.metadata_props}
    text = edit(json.loads(props["agegender"]))
    del model.metadata_props[:]
    for key, value in props.items():
        if key != "agegender":
            model.metadata_props.add(key=key, value=value)
    if text is not None:
        model.metadata_props.add(key="agegender", value=text)
    out = tmp_path / "edited.onnx"
    onnx.save(model, str(out))
    return out


def _config(**change):
    def edit(meta):
        meta["data_config"].update(change)
        return json.dumps(meta)

    return edit


HOSTILE = {
    "a huge input": _config(input_size=[1, 100000, 100000]),
    "not JSON": lambda meta: "{not json",
    "a list": lambda meta: "[1, 2]",
    "no data_config": lambda meta: json.dumps(
        {k: v for k, v in meta.items() if k != "data_config"}
    ),
    "an unknown interpolation": _config(interpolation="sinc"),
    "a size that is text": _config(input_size="abc"),
    "a size the graph does not take": _config(input_size=[1, 96, 96]),
    "a colour the graph does not take": _config(color="rgb", input_size=[3, 128, 128]),
    "an unknown colour": _config(color="cmyk"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_metadata_is_one_line(tmp_path, case):
    path = _with_meta(tmp_path, HOSTILE[case])
    with pytest.raises(AgeGenderError) as e:
        Predictor.load(InferenceOptions(model=str(path), threads=1))
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_a_file_without_metadata_is_refused(tmp_path):
    path = _with_meta(tmp_path, lambda meta: None)
    with pytest.raises(AgeGenderError, match="no agegender model description"):
        Predictor.load(str(path), threads=1)


def test_the_detector_is_not_a_model():
    with pytest.raises(AgeGenderError, match="not an agegender model"):
        Predictor.load(str(YUNET_MODEL), threads=1)


def test_an_intact_copy_predicts_as_the_original(tmp_path):
    path = _with_meta(tmp_path, json.dumps)
    faces = Predictor.load(str(path), threads=1).predict(ASTRONAUT)
    want = Predictor.load("default", precision="fp32", threads=1).predict(ASTRONAUT)
    assert [f.gender for f in faces] == [f.gender for f in want]
    assert np.isclose(faces[0].age, want[0].age, atol=1e-3)


def test_options_are_checked_once():
    for bad in ({"precision": "int4"}, {"threads": 0}, {"device": "tpu"}, {"detector": "haar"}):
        with pytest.raises(AgeGenderError):
            InferenceOptions(**bad)
    with pytest.raises(AgeGenderError, match="runs on torch"):
        InferenceOptions(device="cuda")
    assert InferenceOptions(detector=None).spins and not InferenceOptions().spins
    assert InferenceOptions().detector_for("video") == "yunet-fast"
