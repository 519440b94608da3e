"""Bad inputs and interruptions, answered with one line and nothing lost (the CLI and training
half of the reliability issue; the web service's half is in test_serve.py)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_checkpoint
from PIL import Image

from agegender.cli.main import main
from agegender.core.config import load_config
from agegender.core.errors import ConfigError, DataError, TrainingError
from agegender.data.cache import open_cache
from agegender.data.manifest import read_manifest
from agegender.data.prepare import prepare
from agegender.data.synthetic import draw_face
from agegender.evaluation.sweep import load_sweep
from agegender.inference.model_files import read_meta
from agegender.training import train as train_mod
from agegender.training.checkpoint import save_checkpoint
from agegender.training.models import create_model
from agegender.training.train import train
from agegender.vision.images import face_config

SMOKE = Path(__file__).parents[1] / "configs" / "smoke.toml"
ODD = os.fsdecode(b"26_1_2_20170116174525125\xff.jpg")  # a name that is not valid UTF-8


@pytest.fixture
def awkward_folder(tmp_path):
    """Faces, one with a name that is not UTF-8, a dangling link and a link loop."""
    root = tmp_path / "faces"
    root.mkdir()
    for i in range(12):
        draw_face(20 + i, i % 2, i % 5, 64, seed=i).save(
            root / f"{20 + i}_{i % 2}_{i % 5}_2017{i:09d}.jpg"
        )
    draw_face(26, 1, 2, 64, seed=99).save(root / ODD)
    (root / "30_0_1_20170101000000000.jpg").symlink_to(tmp_path / "gone.jpg")
    (root / "31_0_1_20170101000000001.jpg").symlink_to(root / "32_0_1_20170101000000002.jpg")
    (root / "32_0_1_20170101000000002.jpg").symlink_to(root / "31_0_1_20170101000000001.jpg")
    return root


def test_prepare_gives_odd_names_and_bad_links_their_rows(awkward_folder, tmp_path):
    s = prepare([awkward_folder], tmp_path / "c", face_config(32), quiet=True)
    assert s["files_found"] == 16
    rows = {os.fsencode(Path(r["path"]).name): r["status"] for r in read_manifest(tmp_path / "c")}
    assert rows[b"30_0_1_20170101000000000.jpg"] == "unreadable: broken symbolic link"
    assert rows[b"31_0_1_20170101000000001.jpg"] == "unreadable: symbolic link loop"
    # the odd name keeps its bytes through the manifest (its timestamp field is not a number)
    assert rows[os.fsencode(ODD)].startswith("unparsable")
    assert len(open_cache(tmp_path / "c")) == 12


def test_predict_answers_bad_links_and_keeps_odd_names(awkward_folder, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    model = make_checkpoint(tmp_path / "m.safetensors")
    argv = ["predict", str(awkward_folder), "--aligned", "--model", str(model), "--quiet"]
    assert main([*argv, "--output", str(out)]) == 1  # some images could not be read
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 16
    errors = {Path(r["path"]).name: r["error"] for r in rows}
    assert errors["30_0_1_20170101000000000.jpg"] == "broken symbolic link"
    assert errors["32_0_1_20170101000000002.jpg"] == "symbolic link loop"
    # os.fsencode of the JSON path gives the file's own bytes back
    assert any(os.fsencode(r["path"]).endswith(b"\xff.jpg") for r in rows)
    # a dangling link named on the command line is a row too, not the end of the run
    assert main([*argv[:1], str(awkward_folder / "30_0_1_20170101000000000.jpg"), *argv[2:]]) == 1
    assert "broken symbolic link" in capsys.readouterr().out


def test_the_next_prepare_clears_what_a_killed_one_left(awkward_folder, tmp_path, capsys):
    cache = tmp_path / "c"
    cache.mkdir()
    dead = 2**22 + 12345  # no such process: its temporary files are garbage
    for name in (f"images.tmp{dead}.npy", f"manifest.csv.tmp{dead}", f"summary.json.tmp{dead}"):
        (cache / name).write_bytes(b"x" * 100)
    # before the next prepare, the folder is an unfinished cache, and says so
    with pytest.raises(DataError, match="an unfinished cache"):
        open_cache(cache)
    model = make_checkpoint(tmp_path / "m.safetensors")
    args = [
        "evaluate",
        str(model),
        "--data",
        str(cache),
        "--no-timing",
        "--out",
        str(tmp_path / "e"),
    ]
    assert main(args) == 2
    assert "an unfinished cache (prepare was interrupted" in capsys.readouterr().err
    prepare([awkward_folder], cache, face_config(32), quiet=True)
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("train.lr=nan", "train.lr must be a finite number"),
        ("train.lr=inf", "train.lr must be a finite number"),
        ("loss.w_age=nan", "loss.w_age must be a finite number"),
        ("loss.sigma=nan", "loss.sigma must be a finite number"),
        ("loss.w_gender=-1", "loss.w_age and loss.w_gender must be >= 0"),
        ("train.grad_clip=nan", "train.grad_clip must be a finite number"),
        ("train.momentum=nan", "train.momentum must be a finite number"),
        ("aug.rotate=nan", "aug.rotate must be a finite number"),
        ("train.epochs=99999999999999999999", "train.epochs must be 1-100,000"),
        ("train.momentum=1.5", "train.momentum must be in [0, 1)"),
        ("aug.shift=2", "aug.shift must be in [0, 1)"),
    ],
)
def test_every_value_no_run_can_use_is_one_line(cache64, tmp_path, capsys, override, says):
    argv = ["train", str(SMOKE), f"data.cache={cache64}", f"run.out={tmp_path / 'r'}", override]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("run", "says"),
    [
        ("name = 5", "run name 5 must be a plain name"),
        ('name = "../../x"', "run name '../../x' must be a plain name"),
        ('name = "a/b"', "must be a plain name"),
        ('name = "a"\noverrides = "train.epochs=1"', "overrides must be a list"),
        ('name = "a"\nstudy = { acc = "high" }', "study must be a table of numbers"),
    ],
)
def test_sweep_runs_are_checked(tmp_path, run, says):
    (tmp_path / "s.toml").write_text(f'base = "{SMOKE}"\n[[run]]\n{run}\n')
    with pytest.raises(ConfigError, match=says.replace("[", r"\[").replace("(", r"\(")):
        load_sweep(tmp_path / "s.toml")


def _smoke(cache, out, *extra):
    base = [f"data.cache={cache}", f"run.out={out}", "train.threads=2", "data.limit=128"]
    return load_config(SMOKE, [*base, "train.tta=false", "train.amp=off", *extra])


def test_a_loss_that_turns_nan_stops_the_run_and_keeps_the_last_good_epoch(
    cache64, tmp_path, monkeypatch
):
    real = train_mod.train_one_epoch

    def nan_in_epoch_2(run, data, epoch):
        out = real(run, data, epoch)
        return {**out, "loss": float("nan")} if epoch == 2 else out

    monkeypatch.setattr(train_mod, "train_one_epoch", nan_in_epoch_2)
    with pytest.raises(TrainingError, match=r"loss became nan in epoch 2.*keep epoch 1"):
        train(_smoke(cache64, tmp_path / "r", "train.epochs=3"), quiet=True)
    assert read_meta(tmp_path / "r" / "last.safetensors")["epoch"] == 1
    assert train_mod.torch.load(tmp_path / "r" / "last.state.pt", weights_only=True)["epoch"] == 1


def test_a_kill_between_the_weights_and_the_state_resumes_exactly(cache64, tmp_path, monkeypatch):
    """The state file is the whole resume set: a run killed after writing epoch 2's weights
    but before its state resumes from epoch 1 and ends where an unbroken run ends."""
    full = train(_smoke(cache64, tmp_path / "full", "train.epochs=2"), quiet=True)
    real = train_mod.save_state

    def die_in_epoch_2(run, epoch):
        if epoch == 2:
            raise KeyboardInterrupt  # last.safetensors of epoch 2 is written already
        real(run, epoch)

    monkeypatch.setattr(train_mod, "save_state", die_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(_smoke(cache64, tmp_path / "killed", "train.epochs=2"), quiet=True)
    monkeypatch.setattr(train_mod, "save_state", real)
    assert read_meta(tmp_path / "killed" / "last.safetensors")["epoch"] == 2  # torn set
    train(None, resume=tmp_path / "killed", quiet=True)
    from safetensors.torch import load_file

    a, b = (load_file(str(r / "last.safetensors")) for r in (full, tmp_path / "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_damaged_state_is_one_line(cache64, tmp_path, capsys):
    run = train(_smoke(cache64, tmp_path / "r"), quiet=True)
    (run / "last.state.pt").write_bytes(b"")  # a zero-length file: a full disk, a kill
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "its last checkpoint is damaged" in err and err.count("\n") == 1


def test_a_failed_run_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(SMOKE, [f"data.cache={tmp_path / 'no-cache'}", "run.name=gone"])
    with pytest.raises(DataError):
        train(cfg, quiet=True)
    assert not (tmp_path / "runs" / "train" / "gone").exists()


def test_the_epoch_line_says_which_is_train_and_which_val(cache64, tmp_path, capsys):
    train(_smoke(cache64, tmp_path / "r"), quiet=False)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch"))
    assert "train loss" in line and "| val loss" in line


def test_checkpoints_get_the_mode_of_other_files(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", create_model("resnet-mt-small"))
    umask = os.umask(0)
    os.umask(umask)
    for f in (path, path.with_suffix(".json")):
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        ({"input_size": "abc"}, "input_size 'abc' is not"),
        ({"input_size": [1, -64, -64]}, "input_size [1, -64, -64] is not"),
        ({"color": "cmyk"}, "color 'cmyk' is not one of"),
        ({"std": [0.0]}, "std [0.0] is not 1 number(s) > 0"),
        ({"interpolation": "magic"}, "interpolation 'magic' is not one of"),
    ],
)
def test_an_edited_sidecar_is_one_line(tmp_path, capsys, edit, says):
    ckpt = make_checkpoint(tmp_path / "m.safetensors")
    sidecar = ckpt.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta["data_config"].update(edit)
    sidecar.write_text(json.dumps(meta))
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
    assert main(["predict", str(tmp_path / "a.png"), "--aligned", "--model", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1


def test_boxes_stay_inside_the_photo(utkface_dir):
    from agegender.inference.predictor import Predictor

    face = np.asarray(Image.open(sorted(utkface_dir.glob("*.jpg"))[100]).convert("RGB"))
    photo = np.full((300, 400, 3), 120, np.uint8)
    photo[0:200, 0:200] = face  # at the corner: the detector's box reaches past it
    (found,) = Predictor.load(threads=2).predict(photo)
    x0, y0, x1, y1 = found.box
    assert 0 <= x0 < x1 <= 400 and 0 <= y0 < y1 <= 300


def test_help_shows_no_default_of_none(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert "(default: None)" not in capsys.readouterr().out


# --------------------------------------------------------------------------- image inputs


def _jpeg_claiming(tmp_path: Path, w: int, h: int) -> Path:
    """8x8 pixels of JPEG data under a header that claims ``w`` x ``h``."""
    import io
    import struct

    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
    path = tmp_path / "claims.jpg"
    path.write_bytes(bytes(data))
    return path


def test_api_errors_name_the_path_and_what_was_expected(tmp_path):
    from agegender.vision.images import decode_rgb, load_photo

    with pytest.raises(ValueError, match=r"^no such file: .*missing\.jpg$"):
        decode_rgb(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match=r"^.* is a directory$"):
        load_photo(tmp_path)
    with pytest.raises(ValueError) as e:
        decode_rgb(np.zeros((8, 8, 3), np.float32))
    assert str(e.value).startswith(
        "expected a uint8 RGB (or gray) image array or a PIL image, got float32"
    )
    assert "decode_rgb" not in str(e.value) and "as_rgb_array" not in str(e.value)


def test_a_jpeg_whose_data_is_far_short_of_its_header_is_corrupt(tmp_path, capsys):
    from PIL import ImageFile

    from agegender.vision.images import decode_rgb, load_photo

    path = _jpeg_claiming(tmp_path, 6000, 6000)
    assert path.stat().st_size < 1000 and not ImageFile.LOAD_TRUNCATED_IMAGES
    for read in (decode_rgb, load_photo, lambda p: load_photo(p, work_pixels=1_000_000)):
        with pytest.raises(ValueError, match=r"^corrupt image: truncated"):
            read(path)
    # a draft-mode decode of a file cut short raises too
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"^corrupt image"):
        load_photo(path, work_pixels=1_000_000)
    # and the command line says so instead of "no faces"
    path = _jpeg_claiming(tmp_path, 6000, 6000)
    model = make_checkpoint(tmp_path / "m.safetensors")
    out = tmp_path / "p.jsonl"
    main(["predict", str(path), "--model", str(model), "--quiet", "--output", str(out)])
    row = json.loads(out.read_text().splitlines()[0])
    assert row["error"].startswith("corrupt image: truncated")


def test_a_webp_is_refused_from_its_header_over_the_pixel_limit(tmp_path, monkeypatch):
    from agegender.vision import images

    path = tmp_path / "big.webp"
    Image.new("RGB", (3000, 2000), (90, 90, 90)).save(path, "WEBP", lossless=True)
    assert path.stat().st_size < 20_000
    opened = []
    monkeypatch.setattr(images.Image, "open", lambda *a, **k: opened.append(a))
    with pytest.raises(ValueError, match=r"^image too large \(6\.0 MP > 1\.0 MP\)"):
        images.load_photo(path, work_pixels=1_000_000)
    with pytest.raises(ValueError, match=r"^decompression bomb: 3000x2000"):
        images.decode_rgb(path, max_pixels=1_000_000)
    assert opened == []  # refused before the decoder, which allocates the canvas, was made


def test_a_large_png_is_shrunk_and_a_large_webp_refused_from_its_header(tmp_path):
    """A PNG is decoded and shrunk to the working size (its cost is its file's); a WebP
    allocates its whole canvas on opening, so over the working size it is refused first."""
    from agegender.vision.images import load_photo

    Image.new("L", (2000, 1000)).save(tmp_path / "big.png")
    rgb, size = load_photo(tmp_path / "big.png", work_pixels=1_000_000)
    assert size == (2000, 1000) and rgb.shape[0] * rgb.shape[1] <= 1_000_000
    Image.new("L", (2000, 1000)).save(tmp_path / "big.webp", lossless=True)
    with pytest.raises(ValueError, match=r"^image too large \(2\.0 MP > 1\.0 MP\)"):
        load_photo(tmp_path / "big.webp", work_pixels=1_000_000)


def test_a_float_tiff_with_a_nan_pixel_is_not_blanked(tmp_path):
    from agegender.vision.images import decode_rgb

    arr = np.linspace(0, 100, 64 * 64, dtype=np.float32).reshape(64, 64)
    arr[3, 5] = np.nan
    arr[7, 9] = np.inf
    Image.fromarray(arr, mode="F").save(tmp_path / "f.tif")
    rgb = decode_rgb(tmp_path / "f.tif")
    assert rgb[63, 63, 0] == 255 and rgb[32, 0, 0] > 100
    assert rgb[3, 5, 0] == 0 and rgb[7, 9, 0] == 255


# --------------------------------------------------------------------------- outputs and CSVs


def test_a_second_run_writing_one_output_is_refused(tmp_path, capsys):
    from agegender.core import fileio

    out = tmp_path / "p.jsonl"
    with fileio.output_file(out, "JSON lines") as f:
        f.write("first\n")
        with (
            pytest.raises(
                DataError, match=rf"is being written by another run \(pid {os.getpid()}\)"
            ),
            fileio.output_path(out, "JSON lines"),
        ):
            pass
        # the command line says so in one line, exit 2
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
        model = make_checkpoint(tmp_path / "m.safetensors")
        argv = ["predict", str(tmp_path / "a.png"), "--aligned", "--model", str(model)]
        assert main([*argv, "--quiet", "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert "is being written by another run (pid" in err and err.count("\n") == 1
    assert out.read_text() == "first\n"  # the first run's output, whole
    assert not fileio.lock_path(out).exists()
    with fileio.output_file(out, "JSON lines") as f:  # free again
        f.write("second\n")
    assert out.read_text() == "second\n"


def test_csv_cells_that_a_spreadsheet_would_run_are_quoted_and_read_back(tmp_path):
    from agegender.core.fileio import csv_cell, csv_value
    from agegender.data.manifest import Row, read_manifest, read_rows, write_manifest

    risky = ['=HYPERLINK("http://x")', "+x", "-x", "@SUM(1)", "\tx", "\rx", "'=x", "'plain"]
    for text in risky:
        assert csv_cell(text).startswith("'") and csv_value(csv_cell(text)) == text
    assert csv_cell("-1") == "-1" and csv_cell("plain") == "plain" and csv_cell(-1) == -1
    rows = [Row("=cmd.png", status="skipped: x", origin="@SUM(1)", groups={"cam": "+x"})]
    rows[0].note = "-note"
    write_manifest(tmp_path / "manifest.csv", rows, ["cam"])
    text = (tmp_path / "manifest.csv").read_text()
    assert "'=cmd.png" in text and "'@SUM(1)" in text and "'+x" in text and ",-1," in text
    back = read_manifest(tmp_path)[0]
    assert back["path"] == "=cmd.png" and back["by:cam"] == "+x" and back["note"] == "-note"
    again, _ = read_rows(tmp_path / "manifest.csv")
    assert (again[0].path, again[0].origin, again[0].groups, again[0].note) == (
        "=cmd.png", "@SUM(1)", {"cam": "+x"}, "-note"
    )  # fmt: skip


def test_a_manifest_without_the_note_column_still_reads(tmp_path):
    from agegender.data.manifest import MANIFEST_COLUMNS, read_rows

    old = ",".join(MANIFEST_COLUMNS[:-1]) + ",by:cam\n" + "a.png,,,,,,x,,,,,skipped: y,-1,c0\n"
    (tmp_path / "manifest.csv").write_text(old)
    rows, groups = read_rows(tmp_path / "manifest.csv")
    assert groups == ["cam"] and rows[0].note == "" and rows[0].groups == {"cam": "c0"}


def test_labels_paths_outside_their_folder_are_read_and_noted(tmp_path):
    from agegender.data.labels import OUTSIDE, read_labels

    inside = tmp_path / "set"
    inside.mkdir()
    labels = inside / "labels.csv"
    labels.write_text(
        "path,age,gender\n"
        f"a.png,30,m\nsub/../b.png,31,f\n../c.png,32,m\n{tmp_path / 'd.png'},33,f\n"
    )
    rows, _ = read_labels(labels)
    assert [r.problem for r in rows] == ["", "", "", ""]
    assert [r.note for r in rows] == ["", "", OUTSIDE, OUTSIDE]


def test_prepare_notes_outside_paths_in_the_manifest(tmp_path):
    from agegender.data.labels import OUTSIDE

    (tmp_path / "set").mkdir()
    rng = np.random.default_rng(0)
    for name in ("set/a.png", "c.png"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / name)
    labels = tmp_path / "set" / "labels.csv"
    labels.write_text("path,age,gender,camera\na.png,30,m,=HYPERLINK(1)\n../c.png,32,f,@x\n")
    prepare([], tmp_path / "c", face_config(32), labels=[labels], aligned=True, quiet=True)
    rows = {Path(r["path"]).name: r for r in read_manifest(tmp_path / "c")}
    assert rows["a.png"]["note"] == "" and rows["c.png"]["note"] == OUTSIDE
    assert rows["a.png"]["by:camera"] == "=HYPERLINK(1)"
    assert "'=HYPERLINK(1)" in (tmp_path / "c" / "manifest.csv").read_text()
