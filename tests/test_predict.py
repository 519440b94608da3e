"""`agegender predict` and :class:`agegender.inference.predictor.Predictor`: the issue-5 contract.

The models here are untrained (tiny, built in a fixture): the tests check the plumbing (JSONL
shape, errors, exit codes, decoding, geometry), not the accuracy. The bundled model is only used
when it exists.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import bomb_png, collage, make_checkpoint
from PIL import Image

from agegender.cli.main import main
from agegender.core.errors import AgeGenderError
from agegender.data.synthetic import draw_face
from agegender.inference.draw import annotate
from agegender.inference.model_files import BUNDLED
from agegender.inference.predictor import ASTRONAUT, Face, Predictor
from agegender.training.loading import open_predictor
from agegender.vision.images import decode_rgb

cv2.setNumThreads(1)  # the tests run beside other work; one thread is plenty for these sizes

FACE_KEYS_DLDL = {"box", "score", "age", "age_interval", "gender", "p_female"}
FACE_KEYS_REGRESSION = FACE_KEYS_DLDL - {"age_interval"}
RECORD_KEYS = {"path", "faces", "error"}
GENDERS = ("male", "female")


# --------------------------------------------------------------------------- helpers


def utk_files(utkface_dir: Path, n: int, step: int = 997) -> list[Path]:
    """``n`` different real aligned 200x200 crops, spread over the folder (as in test_detect)."""
    files = sorted(utkface_dir.glob("*.jpg"))
    return [files[(i * step) % len(files)] for i in range(n)]


def synthetic_face(seed: int = 0, size: int = 200) -> np.ndarray:
    """A cartoon face (RGB uint8): decodable, but YuNet need not find it; use with aligned."""
    return np.asarray(draw_face(30 + seed, seed % 2, seed % 5, size, seed=seed))


def good_faces(request: pytest.FixtureRequest, n: int, real: bool) -> list[np.ndarray]:
    """``n`` RGB faces: real UTKFace crops (skip if absent) or synthetic ones."""
    if real:
        utk = request.getfixturevalue("utkface_dir")
        return [decode_rgb(p) for p in utk_files(utk, n)]
    return [synthetic_face(k) for k in range(n)]


def write_bad_files(folder: Path, jpeg: bytes) -> dict[str, str]:
    """Every kind of unreadable input; returns ``name -> start of the expected error``."""
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is a text file, not a JPEG\n")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # header intact, data cut
    bomb_png(folder / "bomb.png")
    return {
        "empty.jpg": "not an image",
        "text.jpg": "not an image",
        "truncated.jpg": "corrupt image",
        "bomb.png": "image too large (400 MP > 150 MP)",
    }


def jpeg_bytes(rgb: np.ndarray, **save: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_face_dict(face: dict, keys: set[str]) -> None:
    """One face of the JSONL output: exact keys and types, consistent values."""
    assert set(face) == keys
    assert isinstance(face["box"], list) and len(face["box"]) == 4
    assert all(isinstance(v, float | int) for v in face["box"])
    x0, y0, x1, y1 = face["box"]
    assert x0 < x1 and y0 < y1
    assert isinstance(face["score"], float | int) and 0.0 <= face["score"] <= 1.0
    assert isinstance(face["age"], float | int) and np.isfinite(face["age"])
    assert face["gender"] in ("male", "female")
    assert isinstance(face["p_female"], float | int) and 0.0 <= face["p_female"] <= 1.0
    assert face["gender"] == ("female" if face["p_female"] >= 0.5 else "male")
    if "age_interval" in keys:
        low, high = face["age_interval"]
        assert isinstance(low, float | int) and isinstance(high, float | int)
        # the bounds are rounded to 0.1 year, the age to 0.01
        assert 0.0 <= low <= face["age"] + 0.05 and face["age"] - 0.05 <= high


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Untrained checkpoints: ``dldl`` (gray, tta in its recipe) and ``regression`` (RGB)."""
    root = tmp_path_factory.mktemp("models")
    return {
        "dldl": make_checkpoint(root / "dldl.safetensors", "dldl", 1, tta=True),
        "regression": make_checkpoint(root / "regression.safetensors", "regression", 3, tta=False),
    }


@pytest.fixture(scope="module")
def predictor(models) -> Predictor:
    """Loaded once per module: the dldl model with the YuNet detector."""
    return open_predictor(models["dldl"])


# --------------------------------------------------------------------------- JSONL contract


@pytest.mark.parametrize("head", ["dldl", "regression"])
def test_jsonl_contract(models, predictor, head, tmp_path):
    names = ["c.jpg", "a.png", "b.jpeg"]  # deliberately not sorted: output keeps input order
    paths = []
    for k, name in enumerate(names):
        face = synthetic_face(k, size=(200, 160, 120)[k])
        Image.fromarray(face).save(tmp_path / name, quality=90)
        paths.append(tmp_path / name)
    out = tmp_path / "out" / "pred.jsonl"
    argv = ["predict", *map(str, paths), "--model", str(models[head]), "--aligned"]
    assert main([*argv, "--output", str(out), "--quiet"]) == 0
    records = read_jsonl(out)
    assert [r["path"] for r in records] == [str(p) for p in paths]
    keys = FACE_KEYS_DLDL if head == "dldl" else FACE_KEYS_REGRESSION
    for rec, size in zip(records, (200, 160, 120)):
        assert set(rec) == RECORD_KEYS
        assert isinstance(rec["path"], str) and rec["error"] is None
        assert len(rec["faces"]) == 1
        check_face_dict(rec["faces"][0], keys)
        assert rec["faces"][0]["box"] == [0.0, 0.0, size, size]  # the whole image, aligned
        assert rec["faces"][0]["score"] == 1.0
    if head == "dldl":  # the command and the API agree (the recipe's tta=True in both)
        assert predictor.tta is True
        for rec, path in zip(records, paths):
            api = predictor.predict(path, aligned=True)[0].to_dict()
            got = rec["faces"][0]
            assert got["box"] == api["box"] and got["gender"] == api["gender"]
            # batch composition may move the last rounded digit: one unit of it is allowed
            for key, unit in (("age", 0.01), ("p_female", 1e-4), ("age_interval", 0.1)):
                assert np.allclose(got[key], api[key], rtol=0, atol=1.01 * unit), key


@pytest.mark.parametrize("real", [False, True], ids=["aligned-synthetic", "detected-real"])
def test_bad_inputs_do_not_stop_the_batch(models, request, real, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    faces = good_faces(request, 2, real)
    Image.fromarray(faces[0]).save(folder / "face1.jpg", quality=90)
    Image.fromarray(faces[1]).save(folder / "face2.png")
    (folder / "notes.txt").write_text("not an image suffix: ignored\n")
    expected = write_bad_files(folder, jpeg_bytes(faces[0]))
    out, ann = tmp_path / "pred.jsonl", tmp_path / "annotated"
    argv = ["predict", str(folder), "--model", str(models["dldl"]), "--output", str(out)]
    argv += ["--annotate", str(ann), "--batch-size", "2", "--quiet"]  # bad files span batches
    assert main(argv + ([] if real else ["--aligned"])) == 1

    records = read_jsonl(out)
    names = [Path(r["path"]).name for r in records]
    assert names == sorted([*expected, "face1.jpg", "face2.png"])  # a folder is read sorted
    for rec, name in zip(records, names):
        assert set(rec) == RECORD_KEYS
        if name in expected:
            assert rec["faces"] == []
            assert isinstance(rec["error"], str) and "\n" not in rec["error"]
            assert rec["error"].startswith(expected[name]), (name, rec["error"])
        else:
            assert rec["error"] is None and len(rec["faces"]) == 1, rec
            check_face_dict(rec["faces"][0], FACE_KEYS_DLDL)
    err = capsys.readouterr().err
    assert "4 of 6 images could not be read" in err and "Traceback" not in err
    # one annotated JPEG per readable image, at the image's size
    assert sorted(p.name for p in ann.iterdir()) == ["face1.jpg", "face2.jpg"]
    with Image.open(ann / "face2.jpg") as im:
        assert im.format == "JPEG" and im.size == (faces[1].shape[1], faces[1].shape[0])


def test_table_output_and_exit_0(models, tmp_path, capsys):
    Image.fromarray(synthetic_face(3)).save(tmp_path / "one.png")
    assert main(["predict", str(tmp_path), "--model", str(models["dldl"]), "--aligned"]) == 0
    out = capsys.readouterr().out
    assert "one.png: 1 face" in out and "p_female" in out and "age" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{tmp}/no/such.jpg"], "no such file or directory"),
        (["{tmp}/empty"], "no image files (.jpg"),
        (["{tmp}/empty/notes.txt", "--model", "{tmp}/no-model.safetensors"], "no such model"),
        (["{tmp}/empty/notes.txt", "--device", "foo"], "--device: unknown device 'foo'"),
    ],
    ids=["no-such-path", "no-images", "no-such-model", "unknown-device"],
)
def test_user_errors_exit_2_with_one_line(models, tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("a folder without images\n")
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(models["dldl"])]
    assert main(["predict", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert "train." not in err  # predict has no recipe: its messages name its own options


def test_train_device_message_names_the_recipe_key():
    from agegender.training.torch_backend import resolve_device

    with pytest.raises(AgeGenderError, match=r"train\.device: unknown device 'foo'"):
        resolve_device("foo")


def test_unknown_option_exits_2(tmp_path):
    """argparse's usage error, as users meet it through the installed command."""
    run = subprocess.run(
        [sys.executable, "-m", "agegender", "predict", str(tmp_path), "--bogus"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "unrecognized arguments: --bogus" in run.stderr


@pytest.mark.parametrize("size", ["0", "-1"])
def test_batch_size_below_1_exits_2(models, tmp_path, capsys, size):
    Image.fromarray(synthetic_face(0)).save(tmp_path / "a.png")
    out = tmp_path / "pred.jsonl"
    argv = ["predict", str(tmp_path / "a.png"), "--model", str(models["dldl"]), "--aligned"]
    with pytest.raises(SystemExit) as exit_:  # argparse refuses it: a usage error
        main([*argv, "--batch-size", size, "--output", str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().endswith(f"argument --batch-size: must be >= 1, got {size}")
    assert not out.exists()


def _two_photos(folder: Path) -> dict[Path, bytes]:
    folder.mkdir()
    for k, name in enumerate(("a.jpg", "b.jpg")):
        Image.fromarray(synthetic_face(k)).save(folder / name, quality=90)
    return {p: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{d}/b.jpg", "--output", "{d}/a.jpg"], "give FILE.jsonl, FILE.json, FILE.csv or -"),
        (["{d}/b.jpg", "--csv", "{d}/a.jpg"], "exists and is not a CSV file"),
        (["{d}", "--csv", "{d}/a.jpg"], "is an input"),
        (["{d}", "--csv", "{d}/../ow/./b.jpg"], "is an input"),
        (["{d}", "--csv", "{d}/link.csv"], "is an input"),
        (["{d}/a.jpg", "--csv", "{d}/a.jpg"], "is an input"),
        (["{d}/a.jpg", "--output", "{d}"], "is a folder"),
        (["{d}", "--annotate", "{d}"], "is an input"),
        (["{d}", "--annotate", "{d}/../ow"], "is an input"),
    ],
    ids=[
        "existing-jpg",
        "existing-jpg-csv",
        "input",
        "input-respelled",
        "hard-link",
        "same-file",
        "folder",
        "ann-same",
        "ann-resp",
    ],
)
def test_outputs_never_replace_an_input(models, tmp_path, capsys, args, message):
    """Refused before the model loads: every photo keeps its bytes, nothing is written."""
    originals = _two_photos(tmp_path / "ow")
    (tmp_path / "ow" / "link.csv").hardlink_to(tmp_path / "ow" / "a.jpg")
    originals[tmp_path / "ow" / "link.csv"] = originals[tmp_path / "ow" / "a.jpg"]
    argv = [a.format(d=tmp_path / "ow") for a in args]
    assert main(["predict", *argv, "--model", str(models["dldl"]), "--aligned"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert {p: p.read_bytes() for p in (tmp_path / "ow").iterdir()} == originals


def test_output_replaces_old_results_whole_or_not_at_all(models, tmp_path, monkeypatch):
    _two_photos(tmp_path / "ow")
    out = tmp_path / "pred.jsonl"
    out.write_text("old results\n")
    argv = ["predict", str(tmp_path / "ow"), "--model", str(models["dldl"]), "--aligned"]
    assert main([*argv, "--output", str(out), "--quiet"]) == 0  # a .jsonl is replaced
    assert [Path(r["path"]).name for r in read_jsonl(out)] == ["a.jpg", "b.jpg"]
    before = out.read_bytes()
    calls = []

    def interrupted(self, located):  # the network's half of a batch
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return [[] for _ in located]

    monkeypatch.setattr(Predictor, "finish", interrupted)
    argv += ["--output", str(out), "--batch-size", "1", "--quiet"]
    assert main(argv) == 130  # interrupted in the second batch
    assert out.read_bytes() == before
    # the first batch's results are kept beside it, and no .tmp is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ow", "pred.jsonl", "pred.jsonl.partial"]
    assert [Path(r["path"]).name for r in read_jsonl(tmp_path / "pred.jsonl.partial")] == ["a.jpg"]


def test_annotated_names_stay_apart(models, tmp_path):
    for folder, name in (("x", "Face.jpg"), ("y", "face.png"), ("z", "face.jpg")):
        (tmp_path / folder).mkdir()
        Image.fromarray(synthetic_face(0)).save(tmp_path / folder / name)
    ann = tmp_path / "ann"
    paths = [str(tmp_path / d) for d in "xyz"]
    argv = ["predict", *paths, "--model", str(models["dldl"]), "--aligned", "--quiet"]
    assert main([*argv, "--annotate", str(ann)]) == 0
    assert sorted(p.name for p in ann.iterdir()) == ["Face.jpg", "face-2.jpg", "face-3.jpg"]


# --------------------------------------------------------------------------- real faces


def test_real_aligned_crops(models, utkface_dir, tmp_path):
    files = utk_files(utkface_dir, 4)
    model = ["--model", str(models["dldl"]), "--quiet"]
    out_aligned, out_detect = tmp_path / "aligned.jsonl", tmp_path / "detect.jsonl"
    assert (
        main(["predict", *map(str, files), *model, "--aligned", "--output", str(out_aligned)]) == 0
    )
    assert main(["predict", *map(str, files), *model, "--output", str(out_detect)]) == 0
    for rec in read_jsonl(out_aligned):
        assert len(rec["faces"]) == 1
        assert rec["faces"][0]["box"] == [0.0, 0.0, 200.0, 200.0]
        assert rec["faces"][0]["score"] == 1.0
    for rec in read_jsonl(out_detect):
        assert len(rec["faces"]) == 1, rec["path"]  # the detector finds the one face
        face = rec["faces"][0]
        check_face_dict(face, FACE_KEYS_DLDL)
        assert 0.6 <= face["score"] <= 1.0
        x0, y0, x1, y1 = face["box"]
        assert 50 < (x0 + x1) / 2 < 150 and 50 < (y0 + y1) / 2 < 150  # centred, as UTKFace is


def test_aligned_files_are_decoded_as_training_decoded_them(predictor, utkface_dir):
    """An aligned JPEG goes through the cache's own decoder (luma in draft mode), so its
    prediction equals the one on the image as `prepare` stored it, bit for bit."""
    from agegender.vision.images import face_config, load_face

    files = utk_files(utkface_dir, 3)
    cached = np.stack([load_face(f, face_config(predictor.size, predictor.color)) for f in files])
    expected = predictor.backend(cached, predictor.tta)
    for f, age in zip(files, expected["age"]):
        for src in (f, f.read_bytes()):
            (face,) = predictor.predict(src, aligned=True)
            assert face.age == pytest.approx(float(age), abs=1e-4)


def group_photo(utkface_dir: Path) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """1280x886 grey canvas with six real faces of ~200 px, one per cell of a 3x2 grid."""
    return collage([decode_rgb(p) for p in utk_files(utkface_dir, 6, step=1531)])


def test_group_photo_six_faces(predictor, utkface_dir):
    canvas, cells = group_photo(utkface_dir)
    faces = predictor.predict(jpeg_bytes(canvas))  # end to end from a JPEG file's bytes
    assert len(faces) == 6
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    found = {
        (int((f.box[0] + f.box[2]) / 2 // 426), int((f.box[1] + f.box[3]) / 2 // 443))
        for f in faces
    }
    assert found == set(cells)
    assert all(f.age_interval is not None and np.isfinite(f.age) for f in faces)


# --------------------------------------------------------------------------- input kinds


def _as_input(kind: str, rgb: np.ndarray, tmp_path: Path):
    """``rgb`` as the input ``kind``; returns ``(input, the RGB image it shows)``."""
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, "PNG")
    if kind == "pil-rgba":
        return Image.fromarray(rgb).convert("RGBA"), rgb
    if kind == "pil-l":
        return Image.fromarray(gray), np.repeat(gray[..., None], 3, 2)
    if kind == "pil-p":
        img = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE)
        return img, np.asarray(img.convert("RGB"))
    if kind == "pil-i16":
        return Image.fromarray(gray.astype(np.uint16) * 257), np.repeat(gray[..., None], 3, 2)
    if kind == "array-rgb":
        return rgb.copy(), rgb
    if kind == "array-gray":
        return gray, np.repeat(gray[..., None], 3, 2)
    if kind == "array-rgba":
        return np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]), rgb
    if kind == "bytes":
        return png.getvalue(), rgb
    if kind == "file-object":
        return io.BytesIO(png.getvalue()), rgb
    if kind in ("path", "str-path"):
        path = tmp_path / "face.png"
        path.write_bytes(png.getvalue())
        return (path if kind == "path" else str(path)), rgb
    raise AssertionError(kind)


KINDS = [
    "pil-rgba",
    "pil-l",
    "pil-p",
    "pil-i16",
    "array-rgb",
    "array-gray",
    "array-rgba",
    "bytes",
    "file-object",
    "path",
    "str-path",
]


@pytest.mark.parametrize("kind", KINDS)
def test_input_kinds(predictor, request, kind, tmp_path):
    real = _has_utkface(request)
    rgb = good_faces(request, 1, real)[0].copy()
    rgb[0, 0] = 255  # a white pixel, so that 16-bit input is scaled by exactly 257
    src, shown = _as_input(kind, rgb, tmp_path)
    decoded = decode_rgb(io.BytesIO(src.getvalue()) if kind == "file-object" else src)
    assert decoded.shape == (200, 200, 3) and decoded.dtype == np.uint8
    # 16 bits -> 8 is a float scale, which may round a level down; everything else is exact
    assert np.abs(decoded.astype(int) - shown).max() <= (1 if kind == "pil-i16" else 0)
    faces = predictor.predict(src, aligned=True)
    assert len(faces) == 1 and faces[0].box == (0.0, 0.0, 200.0, 200.0) and faces[0].score == 1.0
    reference = predictor.predict(decoded, aligned=True)[0]
    assert faces[0].age == pytest.approx(reference.age, abs=1e-4)
    assert faces[0].p_female == pytest.approx(reference.p_female, abs=1e-5)
    if real:  # the detector reads every kind too
        if kind == "file-object":
            src.seek(0)
        assert len(predictor.predict(src)) == 1


def _has_utkface(request: pytest.FixtureRequest) -> bool:
    try:
        request.getfixturevalue("utkface_dir")
    except pytest.skip.Exception:
        return False
    return True


def test_exif_orientation(predictor, request, tmp_path):
    """A phone JPEG stored on its side (orientation 6): boxes refer to the upright image."""
    real = _has_utkface(request)
    face = good_faces(request, 1, real)[0]
    upright = np.full((320, 200, 3), 128, np.uint8)  # portrait: the face on top
    upright[:200] = face
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # turned 90 deg anticlockwise: 320 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    data = jpeg_bytes(stored, exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (320, 200)
    aligned = predictor.predict(data, aligned=True)
    assert aligned[0].box == (0.0, 0.0, 200.0, 320.0)  # the upright image's size
    if real:
        faces = predictor.predict(data)
        assert len(faces) == 1
        x0, y0, x1, y1 = faces[0].box
        assert -10 <= x0 < x1 <= 210 and -10 <= y0 < y1 <= 330  # within the upright image
        assert (y0 + y1) / 2 < 200 and 50 < (x0 + x1) / 2 < 150  # on the face, at the top


# --------------------------------------------------------------------------- API details


def test_predict_batch_yields_errors_in_place(predictor, tmp_path):
    good = [synthetic_face(k) for k in range(3)]
    bomb = tmp_path / "bomb.png"
    bomb_png(bomb)
    items = [good[0], b"not an image", jpeg_bytes(good[1]), bomb, tmp_path / "missing.jpg"]
    items.append(good[2])
    results = predictor.predict_batch(items, aligned=True, workers=2)
    assert len(results) == len(items)
    assert [isinstance(r, Exception) for r in results] == [False, True, False, True, True, False]
    for r in results:
        if isinstance(r, Exception):
            assert isinstance(r, ValueError | AgeGenderError) and "\n" not in str(r)
        else:
            assert isinstance(r, list) and len(r) == 1 and isinstance(r[0], Face)
    assert "image too large" in str(results[3]) and "no such file" in str(results[4])
    # batching changes nothing: each image alone gives the same faces
    alone = predictor.predict(good[2], aligned=True)[0]
    assert results[5][0].age == pytest.approx(alone.age, abs=1e-4)
    assert results[5][0].p_female == pytest.approx(alone.p_female, abs=1e-5)
    # an image without a face is [] in detection mode, not an error
    blank = np.full((240, 320, 3), 128, np.uint8)
    assert predictor.predict_batch([blank, b""])[0] == []


@pytest.mark.parametrize("bad", [None, 123, [b"x"], {"a": 1}], ids=["none", "int", "list", "dict"])
def test_wrong_input_type_is_a_type_error(predictor, bad):
    for aligned in (False, True):
        with pytest.raises(TypeError, match="path, bytes, a binary file object, a PIL image"):
            predictor.predict(bad, aligned=aligned)
    good = synthetic_face(0)
    results = predictor.predict_batch([good, bad, good], aligned=True)
    assert isinstance(results[1], TypeError) and type(bad).__name__ in str(results[1])
    assert len(results[0]) == len(results[2]) == 1


def test_predict_batch_refuses_a_single_image(predictor, tmp_path):
    with pytest.raises(TypeError, match="sequence of images"):
        predictor.predict_batch(str(tmp_path / "a.jpg"))


def test_a_64_mp_photo_is_read(predictor, request, tmp_path):
    """Phones take 50 MP+ photos: decoded shrunk, with boxes in the full photo's pixels."""
    real = _has_utkface(request)
    face = good_faces(request, 1, real)[0]
    canvas = np.full((8000, 8000, 3), 128, np.uint8)
    canvas[3000:5000, 1000:3000] = cv2.resize(face, (2000, 2000))
    path = tmp_path / "big.jpg"
    Image.fromarray(canvas).save(path, quality=80)
    del canvas
    (aligned,) = predictor.predict(path, aligned=True)
    assert aligned.box == (0.0, 0.0, 8000.0, 8000.0)
    (faces,) = predictor.predict_batch([path])
    assert isinstance(faces, list)
    if real:
        assert len(faces) == 1
        x0, y0, x1, y1 = faces[0].box
        assert 800 < x0 < x1 < 3200 and 2800 < y0 < y1 < 5200  # where the face is, full size
    assert annotate(path, faces).size == (4000, 4000)  # drawn on the shrunk photo


def test_predictor_without_detector_needs_aligned(models):
    p = open_predictor(models["regression"], detector=None)
    assert p.color == "rgb" and p.size == 64 and p.tta is False
    face = p.predict(synthetic_face(1), aligned=True)[0]
    # writable model input: torch.as_tensor warns (once per process) about read-only arrays
    assert p.locate(synthetic_face(1), aligned=True)[0].flags.writeable
    assert face.age_interval is None and "age_interval" not in face.to_dict()
    with pytest.raises(AgeGenderError, match="aligned=True"):
        p.predict(synthetic_face(1))


def test_face_label():
    box = (0.0, 0.0, 10.0, 10.0)
    assert Face(box, 0.9, 34.3, (29.2, 40.4), "female", 0.8).label() == "F 34 (29-40)"
    assert Face(box, 0.9, 20.2, None, "male", 0.1).label() == "M 20"


# --------------------------------------------------------------------------- bundled model


@pytest.mark.skipif(BUNDLED.exists(), reason="a bundled model is installed")
def test_no_bundled_model_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(AgeGenderError, match="no bundled model"):
        Predictor.load("default")
    Image.fromarray(synthetic_face(0)).save(tmp_path / "a.png")
    assert main(["predict", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert "no bundled model" in err and err.count("\n") == 1


@pytest.mark.skipif(not BUNDLED.exists(), reason="no bundled model in this checkout")
def test_bundled_model_on_the_astronaut():
    faces = Predictor.load().predict(ASTRONAUT)
    assert len(faces) == 1
    assert faces[0].gender == "female" and 25 < faces[0].age < 60


def test_cpu_record_falls_back_to_proc_cpuinfo(monkeypatch):
    """Without NumPy's CPUID view the CPU's features come from /proc/cpuinfo, and AMX is
    counted only beside AVX-512 in either view."""
    from agegender.inference import runtime

    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo")
    flags = next(
        set(line.split(":", 1)[1].split())
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("flags")
    )
    monkeypatch.setattr(runtime, "_cpuid_features", lambda: None)
    runtime.cpu_info.cache_clear()
    try:
        info = runtime.cpu_info()
        assert info["avx2"] == ("avx2" in flags) and info["avx512"] == ("avx512f" in flags)
        assert info["amx"] == ("avx512f" in flags and "amx_tile" in flags)
        monkeypatch.setattr(runtime, "_cpuid_features", lambda: {"AVX", "AVX2"})
        runtime.cpu_info.cache_clear()
        assert runtime.cpu_info()["amx"] is False and runtime.cpu_class() == "avx2"
        # NumPy told not to use AVX-512 (NPY_DISABLE_CPU_FEATURES) still reports AVX512F, and
        # neither VNNI nor bf16 counts without AVX-512; AVX-VNNI (VEX) only on a CPU that has
        # no AVX-512 to hide
        told = {"AVX", "AVX2", "AVX512F", "AVX512VNNI", "AVX512BF16"}
        monkeypatch.setattr(runtime, "_cpuid_features", lambda: told)
        runtime.cpu_info.cache_clear()
        info = runtime.cpu_info()
        assert runtime.cpu_class() == "avx2" and not info["bf16"]
        assert info["vnni"] == ("avx_vnni" in flags and "avx512f" not in flags)
        monkeypatch.setattr(runtime, "_cpuid_features", lambda: told | {"AVX512_SKX"})
        runtime.cpu_info.cache_clear()
        info = runtime.cpu_info()
        assert info["avx512"] and info["vnni"] and info["bf16"]
    finally:
        runtime.cpu_info.cache_clear()


@pytest.mark.skipif(not BUNDLED.exists(), reason="no bundled model in this checkout")
def test_onnx_threads_that_sleep_answer_the_same():
    from agegender.inference.runtime import OnnxBackend

    predictor = Predictor.load(detector=None)
    spinning = predictor.backend
    sleeping = OnnxBackend(spinning.path, threads=2, spin=False)
    options = sleeping.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    side = predictor.size
    faces = np.stack(
        [cv2.resize(synthetic_face(k), (side, side)).mean(-1, keepdims=True) for k in range(3)]
    ).astype(np.uint8)
    a, b = spinning(faces, tta=False), sleeping(faces, tta=False)
    assert np.allclose(a["age"], b["age"]) and np.allclose(a["p_female"], b["p_female"])


def _spinning(backend) -> bool:
    """Whether an ONNX session's idle threads spin (ONNX Runtime's default unless told)."""
    options = backend.session.get_session_options()
    try:
        return options.get_session_config_entry("session.intra_op.allow_spinning") != "0"
    except RuntimeError:  # not set
        return True


@pytest.mark.skipif(not BUNDLED.exists(), reason="no bundled model in this checkout")
def test_commands_let_idle_onnx_threads_sleep_and_the_library_spins(monkeypatch, tmp_path):
    """``agegender predict`` (decoding beside the network) and ``serve`` (HTTP beside it) run
    ONNX Runtime with sleeping idle threads, the measured faster setting there, as a Predictor
    with a detector does; one without keeps them spinning; ``--spin`` turns them back on."""
    from agegender.cli import photos as predict_command
    from agegender.cli.args import options_from
    from agegender.cli.main import build_parser

    assert _spinning(Predictor.load(detector=None).backend)  # aligned faces, nothing between
    assert not _spinning(Predictor.load().backend)  # OpenCV's detection runs between runs
    assert options_from(build_parser("serve").parse_args(["serve"])).spins is False
    spins = []
    real = predict_command.open_predictor

    def spy(*args, **kwargs):
        predictor = real(*args, **kwargs)
        spins.append(_spinning(predictor.backend))
        return predictor

    monkeypatch.setattr(predict_command, "open_predictor", spy)
    Image.fromarray(synthetic_face(0)).save(tmp_path / "a.png")
    for flag in ([], ["--spin"]):
        out = tmp_path / f"out{len(flag)}.jsonl"
        args = [str(tmp_path / "a.png"), "--aligned", "--output", str(out), "--quiet"]
        assert main(["predict", *args, "--workers", "1", *flag]) == 0
        assert json.loads(out.read_text())["faces"]
    assert spins == [False, True]


# --------------------------------------------------------------------------- output rules


def test_csv_and_stdout_outputs(models, tmp_path, capsys, monkeypatch):
    """``--output X.csv`` one row per face, ``--csv`` besides JSON lines, ``--output -`` JSON
    lines on stdout; a cell that a spreadsheet would run as a formula gets a quote."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(synthetic_face(0)).save(folder / "=cmd.png")
    (folder / "@bad.jpg").write_bytes(b"")
    argv = ["predict", str(folder), "--model", str(models["dldl"]), "--aligned", "--quiet"]
    assert main([*argv, "--output", "-"]) == 1
    captured = capsys.readouterr()
    lines = [json.loads(x) for x in captured.out.splitlines()]
    assert [Path(r["path"]).name for r in lines] == ["=cmd.png", "@bad.jpg"]
    assert "could not be read" in captured.err and "face" not in captured.out.split("{")[0]
    out, extra = tmp_path / "faces.csv", tmp_path / "more.csv"
    assert main([*argv, "--output", str(out)]) == 1
    assert main([*argv, "--output", str(tmp_path / "f.jsonl"), "--csv", str(extra)]) == 1
    assert capsys.readouterr().out == ""  # no table when the results go to files
    for path in (out, extra):
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["path", "face", "x0", "y0", "x1", "y1", "age", "age_low", "age_high",
                           "gender", "p_female", "score", "error"]  # fmt: skip
        face, bad = rows[1:]
        assert face[0] == str(folder / "=cmd.png") and face[1] == "1" and face[-1] == ""
        assert float(face[7]) <= float(face[6]) <= float(face[8]) and face[9] in GENDERS
        assert bad[0] == str(folder / "@bad.jpg") and bad[1:-1] == [""] * 11
        assert bad[-1].startswith("not an image")
    # a cell starting with = or @ is text to a spreadsheet, not a formula to run
    monkeypatch.chdir(folder)
    assert main([*argv[:1], "=cmd.png", "@bad.jpg", *argv[2:], "--output", "r.csv"]) == 1
    assert [r["path"] for r in csv.DictReader((folder / "r.csv").open())] == [
        "'=cmd.png",
        "'@bad.jpg",
    ]


def test_table_escapes_control_characters_in_names(models, tmp_path, capsys):
    name = "a\nb.jpg: 1 face\x1b[2J.png"
    Image.fromarray(synthetic_face(0)).save(tmp_path / name, format="PNG")
    argv = ["predict", str(tmp_path), "--model", str(models["dldl"]), "--aligned"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and out.count("\n") == 2, out  # the name line and the face line
    assert "a\\nb.jpg: 1 face\\x1b[2J.png: 1 face" in out


def test_resume_matches_images_by_real_path(models, tmp_path, monkeypatch):
    """The same image given as another spelling (./, a symbolic link's folder) is done."""
    folder = tmp_path / "in"
    _two_photos(folder)
    (tmp_path / "alias").symlink_to(folder)
    out = tmp_path / "p.jsonl"
    argv = ["--model", str(models["dldl"]), "--aligned", "--quiet", "--output", str(out)]
    assert main(["predict", str(folder / "a.jpg"), *argv]) == 0
    monkeypatch.chdir(tmp_path)
    seen = []
    real = Predictor.locate_all

    def spy(self, items, aligned=False):
        seen.extend(Path(p).name for p in items)
        return real(self, items, aligned)

    monkeypatch.setattr(Predictor, "locate_all", spy)
    assert main(["predict", "alias/./a.jpg", "./in/b.jpg", *argv, "--resume"]) == 0
    assert seen == ["b.jpg"]  # a.jpg was done, under another name
    assert [Path(r["path"]).name for r in read_jsonl(out)] == ["a.jpg", "b.jpg"]


def test_workers_are_capped_at_the_cores(models, tmp_path, capsys, monkeypatch):
    from agegender.cli import photos

    monkeypatch.setattr(photos, "default_threads", lambda: 1)
    _two_photos(tmp_path / "in")
    argv = ["predict", str(tmp_path / "in"), "--model", str(models["dldl"]), "--aligned"]
    assert main([*argv, "--quiet", "--workers", "8", "--output", str(tmp_path / "p.jsonl")]) == 0
    assert "--workers 8 lowered to 1, the CPUs this process may use" in capsys.readouterr().err
    assert len(read_jsonl(tmp_path / "p.jsonl")) == 2


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid``, from /proc (children of each thread)."""
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                kids = {int(x) for x in (task / "children").read_text().split()}
                todo += list(kids - found)
                found |= kids
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
def test_sigterm_stops_the_workers_and_leaves_no_temporary_file(models, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(800):
        Image.fromarray(synthetic_face(k % 7, size=320)).save(folder / f"{k:03d}.jpg")
    out = tmp_path / "out" / "p.jsonl"
    cmd = [sys.executable, "-m", "agegender", "predict", str(folder), "--model",
           str(models["dldl"]), "--output", str(out), "--workers", "2", "--batch-size", "4",
           "--unordered", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children: set[int] = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        children |= _descendants(proc.pid)
        writing = out.parent.is_dir() and any(".tmp" in p.name for p in out.parent.iterdir())
        if writing and len({c for c in children if _alive(c)}) >= 2:
            break  # the workers' first results are coming in
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    children |= _descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "terminated" in err
    end = time.monotonic() + 20
    while time.monotonic() < end and any(_alive(c) for c in children):
        time.sleep(0.2)
    assert not [c for c in children if _alive(c)], "worker processes left running"
    left = [p.name for p in out.parent.iterdir()] if out.parent.exists() else []
    assert not [n for n in left if ".tmp" in n], left
    assert set(left) <= {"p.jsonl.partial"}


@pytest.mark.parametrize("where", ["results", "annotated"])
def test_a_full_disk_is_one_line_and_leaves_nothing(models, tmp_path, capsys, monkeypatch, where):
    import errno

    from agegender.core import fileio

    _two_photos(tmp_path / "in")
    out, ann = tmp_path / "out" / "p.jsonl", tmp_path / "ann"
    real = fileio.replace

    def full(tmp, path):
        if Path(path).suffix == (".jsonl" if where == "results" else ".jpg"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tmp, path)

    monkeypatch.setattr(fileio, "replace", full)
    argv = ["predict", str(tmp_path / "in"), "--model", str(models["dldl"]), "--aligned"]
    argv += ["--output", str(out), "--annotate", str(ann), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no space left on the device" in err and err.count("\n") == 1, err
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name or ".partial" in p.name]
    assert not out.exists()
