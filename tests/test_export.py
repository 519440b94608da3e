"""`agegender export` and the ONNX backend: a dynamic batch and parity with PyTorch.

ONNX export takes tens of seconds on a busy machine, so each model is exported once per module:
the dldl model through the command line, the regression model by ``open_predictor(...,
backend="onnx")`` on first use (which is also what the first-use test checks).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import make_checkpoint

from agegender.cli.main import main
from agegender.core.errors import AgeGenderError
from agegender.data.synthetic import draw_face
from agegender.training.checkpoint import load_checkpoint
from agegender.training.loading import open_predictor
from agegender.training.onnx_export import ExportWrapper
from agegender.vision.images import face_config, load_face

AGE_TOL = 0.05  # years
PROB_TOL = 1e-3

HEADS = {"dldl": ("age", "p_female", "age_std", "age_probs"), "regression": ("age", "p_female")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, dict]:
    """Per head: checkpoint, ONNX file, torch and onnx Predictors (aligned faces only).

    ``dldl`` (gray, tta in its recipe) is exported by ``agegender export``; ``regression`` (RGB)
    by the ONNX backend on first use, next to its checkpoint.
    """
    root = tmp_path_factory.mktemp("export")
    out: dict[str, dict] = {}

    ckpt = make_checkpoint(root / "dldl" / "model.safetensors", "dldl", 1, tta=True, seed=1)
    onnx_file = root / "cli" / "dldl.onnx"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["export", "--model", str(ckpt), "--onnx", str(onnx_file)])
    mtime = onnx_file.stat().st_mtime_ns if onnx_file.exists() else None
    out["dldl"] = {
        "ckpt": ckpt,
        "onnx": onnx_file,
        "rc": rc,
        "stdout": stdout.getvalue(),
        "torch": open_predictor(ckpt, backend="torch", detector=None, amp="off"),  # fp32 reference
        # the ONNX file the command wrote is opened as it is, not exported again
        "onnx_predictor": open_predictor(onnx_file, detector=None, threads=2),
        "reexported": mtime is None or onnx_file.stat().st_mtime_ns != mtime,
    }

    ckpt = make_checkpoint(
        root / "regression" / "model.safetensors", "regression", 3, tta=False, seed=1
    )
    beside = ckpt.with_suffix(".onnx")
    existed = beside.exists()
    out["regression"] = {
        "ckpt": ckpt,
        "onnx": beside,
        "existed_before": existed,
        "torch": open_predictor(ckpt, backend="torch", detector=None, amp="off"),  # fp32 reference
        "onnx_predictor": open_predictor(ckpt, backend="onnx", detector=None, threads=2),
    }
    return out


def random_faces(n: int, chans: int, seed: int = 0) -> np.ndarray:
    """Uniform noise: ``(n, 64, 64, chans)`` uint8, the model's input layout."""
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, chans), dtype=np.uint8)


def face_crops(request: pytest.FixtureRequest, source: str, color: str) -> np.ndarray:
    """A few faces at the model's size and colour: random noise or real UTKFace crops."""
    chans = 1 if color == "gray" else 3
    if source == "random":
        return random_faces(16, chans, seed=3)
    if source == "synthetic":
        imgs = [draw_face(20 + 9 * k, k % 2, k % 5, 200, seed=k) for k in range(6)]
        return np.stack([load_face(img, face_config(64, color)) for img in imgs])
    utk = request.getfixturevalue("utkface_dir")
    files = sorted(utk.glob("*.jpg"))
    config = face_config(64, color)
    return np.stack([load_face(files[k * 2003 % len(files)], config) for k in range(6)])


def ort_session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def assert_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], keys) -> None:
    """Ages (and spreads) within AGE_TOL years, probabilities within PROB_TOL."""
    for key in keys:
        x, y = np.asarray(a[key], np.float64), np.asarray(b[key], np.float64)
        assert x.shape == y.shape, key
        tol = PROB_TOL if key == "p_female" else AGE_TOL
        assert np.abs(x - y).max() < tol, (key, np.abs(x - y).max())


# --------------------------------------------------------------------------- the command


def test_export_command(exported):
    e = exported["dldl"]
    assert e["rc"] == 0 and e["onnx"].is_file()
    assert f"wrote {e['onnx']}" in e["stdout"]
    assert not list(e["onnx"].parent.glob("*.tmp")), "temporary file left behind"
    proto = onnx.load(str(e["onnx"]))
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["agegender_data_config"])["color"] == "gray"
    assert json.loads(meta["agegender_model"])["age_head"] == "dldl"
    assert meta["input"].startswith("uint8 (batch, 1, 64, 64)")


def test_export_errors_exit_2(tmp_path, capsys):
    assert main(["export", "--model", str(tmp_path / "nope.safetensors"), "--onnx", "x.onnx"]) == 2
    err = capsys.readouterr().err
    assert "no such model" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x.onnx").exists()
    folder = tmp_path / "folder"
    folder.mkdir()
    for argv, says in (
        (["--onnx", str(folder)], "is a folder: give the ONNX file's name"),
        (["--onnx", str(tmp_path / "y.onnx"), "--opset", "3"], "opset must be 7-20"),
    ):
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]  # nothing half-written


@pytest.mark.parametrize("head", ["dldl", "regression"])
def test_dynamic_batch(exported, head):
    e = exported[head]
    session = ort_session(e["onnx"])
    (inp,) = session.get_inputs()
    chans = 1 if head == "dldl" else 3
    assert inp.name == "image" and inp.type == "tensor(uint8)"
    assert inp.shape[1:] == [chans, 64, 64] and not isinstance(inp.shape[0], int)
    assert [o.name for o in session.get_outputs()] == list(HEADS[head])
    x = random_faces(5, chans).transpose(0, 3, 1, 2).copy()
    five = session.run(None, {"image": x})
    assert all(
        o.shape[0] == 5 and o.ndim == (2 if n == "age_probs" else 1)
        for n, o in zip(HEADS[head], five)
    )
    ones = [session.run(None, {"image": x[i : i + 1]}) for i in range(5)]
    assert all(o.shape[0] == 1 for r in ones for o in r)
    for k, name in enumerate(HEADS[head]):  # the batch size is not baked into the graph
        alone = np.concatenate([r[k] for r in ones])
        assert np.abs(alone - five[k]).max() < (
            PROB_TOL if name in ("p_female", "age_probs") else AGE_TOL
        )


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("source", ["random", "synthetic", "real"])
@pytest.mark.parametrize("head", ["dldl", "regression"])
def test_onnx_matches_pytorch(exported, request, head, source):
    e = exported[head]
    net, meta = load_checkpoint(e["ckpt"])
    faces = face_crops(request, source, meta["data_config"]["color"])
    wrapper = ExportWrapper(net.float()).eval()
    x = np.ascontiguousarray(faces.transpose(0, 3, 1, 2))
    with torch.no_grad():
        ref = dict(zip(HEADS[head], (t.numpy() for t in wrapper(torch.from_numpy(x)))))
    got = dict(zip(HEADS[head], ort_session(e["onnx"]).run(None, {"image": x})))
    assert_close(got, ref, HEADS[head])
    # and the backends of the Predictor, with and without the mirror
    for tta in (False, True):
        assert_close(
            e["onnx_predictor"].backend(faces, tta), e["torch"].backend(faces, tta), HEADS[head]
        )


def test_onnx_backend_exports_beside_the_checkpoint_on_first_use(exported):
    e = exported["regression"]
    assert not e["existed_before"] and e["onnx"].is_file()
    assert e["onnx"].stat().st_mtime >= e["ckpt"].stat().st_mtime
    # the dldl predictor reused the file the command wrote instead of exporting again
    assert not exported["dldl"]["reexported"]
    assert not exported["dldl"]["ckpt"].with_suffix(".onnx").exists()


@pytest.mark.parametrize("head", ["dldl", "regression"])
@pytest.mark.parametrize("tta", [False, True])
def test_onnx_predictor_gives_the_same_faces(exported, head, tta):
    e = exported[head]
    images = [np.asarray(draw_face(15 + 11 * k, k % 2, k % 5, 160, seed=k)) for k in range(5)]
    images.append(random_faces(1, 3, seed=9)[0])
    results = {}
    for name in ("torch", "onnx_predictor"):
        p = copy.copy(e[name])  # a shallow copy: the module's predictors keep their recipe tta
        p.tta = tta
        results[name] = [r[0] for r in p.predict_batch(images, aligned=True)]
    for a, b in zip(results["torch"], results["onnx_predictor"]):
        assert a.box == b.box and a.score == b.score
        assert abs(a.age - b.age) < AGE_TOL and abs(a.p_female - b.p_female) < PROB_TOL
        if head == "dldl":
            assert a.age_interval is not None and b.age_interval is not None
            assert np.abs(np.subtract(a.age_interval, b.age_interval)).max() < 2 * AGE_TOL
        else:
            assert a.age_interval is None and b.age_interval is None
        if abs(a.p_female - 0.5) > PROB_TOL:
            assert a.gender == b.gender


def test_recipe_tta_is_followed(exported):
    assert exported["dldl"]["torch"].tta is True and exported["dldl"]["onnx_predictor"].tta is True
    assert exported["regression"]["onnx_predictor"].tta is False


def _copy_checkpoint(e: dict, folder: Path) -> Path:
    folder.mkdir()
    for src in (e["ckpt"], e["ckpt"].with_suffix(".json")):
        (folder / src.name).write_bytes(src.read_bytes())
    return folder / e["ckpt"].name


def test_a_damaged_cached_onnx_is_exported_again(exported, tmp_path):
    e = exported["regression"]
    ckpt = _copy_checkpoint(e, tmp_path / "run")
    cached = ckpt.with_suffix(".onnx")
    cached.write_text("x\n")  # newer than the checkpoint, so the mtime check trusts it
    p = open_predictor(ckpt, backend="onnx", detector=None, threads=2)
    onnx.checker.check_model(onnx.load(str(cached)))
    assert not list(cached.parent.glob("*.tmp"))
    faces = random_faces(3, 3)
    ref = e["onnx_predictor"].backend(faces, False)
    assert_close(p.backend(faces, False), ref, HEADS["regression"])


def test_an_onnx_that_stays_broken_is_one_clear_error(exported, tmp_path, monkeypatch):
    import agegender.training.onnx_export

    ckpt = _copy_checkpoint(exported["regression"], tmp_path / "run")
    ckpt.with_suffix(".onnx").write_text("x\n")
    calls = []

    def broken_export(model, out, opset=18):
        calls.append(out)
        Path(out).write_text("still not a model\n")
        return Path(out)

    monkeypatch.setattr(agegender.training.onnx_export, "export_onnx", broken_export)
    with pytest.raises(AgeGenderError, match=r"cannot be loaded, even exported again"):
        open_predictor(ckpt, backend="onnx", detector=None)
    assert len(calls) == 1  # rebuilt once, not in a loop


def test_export_never_replaces_the_weights(tmp_path, capsys):
    """``--onnx RUN/best.safetensors`` (or a hard link to it, or another file that is not an
    ONNX file) is refused before anything is exported; an old .onnx file is replaced."""
    ckpt = make_checkpoint(tmp_path / "run" / "best.safetensors")
    weights = ckpt.read_bytes()
    (tmp_path / "link.onnx").hardlink_to(ckpt)
    (tmp_path / "notes.txt").write_text("keep\n")
    for target, says in (
        (ckpt, "is an input"),
        (tmp_path / "link.onnx", "is an input"),
        (ckpt.with_suffix(".json"), "is an input"),
        (tmp_path / "notes.txt", "exists and is not a ONNX file"),
    ):
        assert main(["export", "--model", str(tmp_path / "run"), "--onnx", str(target)]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
    assert ckpt.read_bytes() == weights and (tmp_path / "notes.txt").read_text() == "keep\n"
    old = tmp_path / "old.onnx"
    old.write_text("an old export\n")
    assert main(["export", "--model", str(ckpt), "--onnx", str(old)]) == 0
    onnx.checker.check_model(onnx.load(str(old)))
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_an_ensemble_exports_as_one_graph_that_matches_torch(tmp_path):
    from agegender.inference.model_files import read_seen
    from agegender.training.checkpoint import save_ensemble

    a = make_checkpoint(tmp_path / "a.safetensors", seed=1)
    b = make_checkpoint(tmp_path / "b.safetensors", seed=2)
    ens = save_ensemble([a, b], tmp_path / "ens.safetensors")
    onnx_file = tmp_path / "ens.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", "--model", str(ens), "--onnx", str(onnx_file)]) == 0
    net, meta = load_checkpoint(ens)
    assert meta["config"]["train"]["tta"] is True and read_seen(ens) is None  # none recorded
    faces = random_faces(6, 1, seed=4)
    x = np.ascontiguousarray(faces.transpose(0, 3, 1, 2))
    with torch.no_grad():
        ref = dict(zip(HEADS["dldl"], (t.numpy() for t in ExportWrapper(net)(torch.from_numpy(x)))))
    got = dict(zip(HEADS["dldl"], ort_session(onnx_file).run(None, {"image": x})))
    assert_close(got, ref, HEADS["dldl"])
    # the graph gives the members' mean, as each alone gives it
    each = [ExportWrapper(load_checkpoint(m)[0])(torch.from_numpy(x)) for m in (a, b)]
    with torch.no_grad():
        mean_p = (each[0][1] + each[1][1]) / 2
    assert np.abs(got["p_female"] - mean_p.detach().numpy()).max() < PROB_TOL


def test_int8_quantises_the_body_and_keeps_the_heads_float(tmp_path, cache64):
    from agegender.training.export import export

    ckpt = make_checkpoint(tmp_path / "m.safetensors", seed=3)
    fp32 = export(ckpt, tmp_path / "m.onnx")
    int8 = export(ckpt, tmp_path / "m.int8.onnx", int8=True, data=cache64)
    graph = onnx.load(str(int8)).graph
    quantized = {n.name for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    assert quantized  # the convolutions run in int8
    producers = {o: n for n in graph.node for o in n.output}
    consumers = {i: n for n in graph.node for i in n.input}
    # the heads and the age distribution stay float: no quantised weights, no quantised outputs
    float_ops = ("Gemm", "Softmax", "Sigmoid", "Sqrt", "ReduceSum")
    heads = [n for n in graph.node if n.op_type in float_ops]
    assert {n.op_type for n in heads} == set(float_ops)
    for node in heads:
        for i in node.input[1:]:
            assert producers.get(i) is None or producers[i].op_type != "DequantizeLinear", node
        for o in node.output:
            assert o not in consumers or consumers[o].op_type != "QuantizeLinear", node
    x = np.ascontiguousarray(random_faces(32, 1, seed=5).transpose(0, 3, 1, 2))
    a = dict(zip(HEADS["dldl"], ort_session(fp32).run(None, {"image": x})))
    b = dict(zip(HEADS["dldl"], ort_session(int8).run(None, {"image": x})))
    np.testing.assert_allclose(b["age_probs"].sum(1), 1, atol=1e-4)
    # the spread (what the 90 % interval is made of) as the float model gives it, within 10 %
    assert np.median(np.abs(b["age_std"] / a["age_std"] - 1)) < 0.1
