"""Checkpoints: a damaged sidecar or weights file is a one-line DataError naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agegender.cli.main import main
from agegender.core.errors import DataError
from agegender.data.synthetic import draw_face
from agegender.inference.model_files import read_meta
from agegender.training.checkpoint import load_checkpoint, save_checkpoint
from agegender.training.loading import open_predictor
from agegender.training.models import create_model


@pytest.fixture
def run(tmp_path) -> Path:
    """A run folder with an untrained checkpoint: best.safetensors and best.json."""
    torch.manual_seed(0)
    model = create_model("resnet-mt-small", img_size=64, age_head="regression", in_chans=1)
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "run" / "best.safetensors", model, {"epoch": 0})
    return tmp_path / "run"


def test_intact_checkpoint_loads(run):
    model, meta = load_checkpoint(run / "best.safetensors")
    assert meta["data_config"]["color"] == "gray" and not model.training


@pytest.mark.parametrize(
    ("sidecar", "message"),
    [
        ("{oops\n", "not JSON"),
        ("\xff\xfe garbage", "not JSON"),
        ("[1, 2]\n", "not an agegender checkpoint"),
        ('{"format": "agegender-checkpoint", "model": {"name": "x"}}', "no data_config"),
        ('{"format": "agegender-checkpoint", "data_config": {}}', "no model name"),
    ],
    ids=["not-json", "binary", "a-list", "no-data-config", "no-model"],
)
def test_corrupt_sidecar_is_a_data_error(run, sidecar, message):
    (run / "best.json").write_bytes(sidecar.encode("latin-1"))
    with pytest.raises(DataError, match=message) as info:
        read_meta(run / "best.safetensors")
    assert "best.json" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError, match=message):  # the export a checkpoint needs first
        open_predictor(run, detector=None)


def test_corrupt_sidecar_exits_2_in_predict(run, tmp_path, capsys):
    (run / "best.json").write_text("{oops\n")
    Image.fromarray(np.asarray(draw_face(30, 0, 0, 64))).save(tmp_path / "a.png")
    assert main(["predict", str(tmp_path / "a.png"), "--model", str(run), "--aligned"]) == 2
    err = capsys.readouterr().err
    assert "best.json" in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("sidecar", [True, False], ids=["with-sidecar", "weights-only"])
def test_truncated_weights_are_a_data_error(run, sidecar):
    weights = run / "best.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    if not sidecar:
        (run / "best.json").unlink()
    with pytest.raises(DataError, match=r"best\.safetensors"):
        load_checkpoint(weights)


def test_weights_of_another_shape_are_a_data_error(run):
    meta = json.loads((run / "best.json").read_text())
    meta["model"]["in_chans"] = 3  # the stem's weights were saved for one channel
    (run / "best.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="does not match model resnet-mt-small"):
        load_checkpoint(run / "best.safetensors")
