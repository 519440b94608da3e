"""Your own data: labels files (ages, ranges, unknown genders, groups, boxes), photos detected
and aligned in prepare, training on ranges, fine-tuning a bundled model, evaluating by group.

Made here: UTKFace test-split faces under random names, half pasted into larger photos (where
../shared has them), and synthetic crops with the bundled photo's face (always)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from agegender.cli.main import main
from agegender.core.errors import DataError
from agegender.data.cache import open_cache
from agegender.data.labels import parse_age, parse_box, parse_gender, read_labels
from agegender.data.manifest import read_manifest
from agegender.data.prepare import prepare
from agegender.data.synthetic import make_dataset
from agegender.inference.predictor import ASTRONAUT
from agegender.training.losses import (
    age_loss,
    gender_loss,
    multitask_loss,
    range_error,
    range_label_distribution,
)
from agegender.vision.images import decode_rgb, face_config

SPLIT_FILE = Path(__file__).resolve().parents[1] / "splits/utkface.csv"

# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "bounds"),
    [("34", (34, 34)), ("34.0", (34, 34)), ("20-29", (20, 29)), ("(25, 32)", (25, 32)),
     ("60+", (60, 79)), (" 3 to 5 ", (3, 5)), ("0", (0, 0))],
)  # fmt: skip
def test_ages(text, bounds):
    assert parse_age(text) == bounds


@pytest.mark.parametrize("text", ["", "abc", "29-20", "130", "-3", "34.5", "20-", "1e3"])
def test_bad_ages(text):
    with pytest.raises(ValueError, match="age"):
        parse_age(text)


@pytest.mark.parametrize(
    ("text", "code"),
    [("male", 0), ("M", 0), ("0", 0), ("Woman", 1), ("f", 1), ("1", 1), ("", -1), ("NA", -1)],
)
def test_genders(text, code):
    assert parse_gender(text) == code


def test_boxes():
    assert parse_box("10 20 110 140") == parse_box("[10, 20, 110, 140]") == (10, 20, 110, 140)
    for bad in ("10 20 5 140", "1 2 3", "a b c d"):
        with pytest.raises(ValueError, match="box"):
            parse_box(bad)


def _write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerows(rows)
    return path


def test_labels_rows_keep_their_problems(tmp_path):
    path = _write_csv(tmp_path / "l.csv", [
        {"path": "a.jpg", "age": "30", "gender": "f", "race": "Asian", "site": "x"},
        {"path": "", "age": "30", "gender": "f", "race": "White", "site": "y"},
        {"path": "b.jpg", "age": "old", "gender": "f", "race": "Black", "site": "y"},
        {"path": "c.jpg", "age": "20-29", "gender": "?", "race": "Indian", "site": "y"},
        {"path": "d.jpg", "age": "40", "gender": "x", "race": "Others", "site": "y"},
        {"path": "e.jpg", "age": "40", "gender": "m", "race": "White", "split": "nope"},
    ])  # fmt: skip
    rows, groups = read_labels(path)
    assert groups == ["site"]
    problems = [r.problem for r in rows]
    assert problems[0] == "" and problems[3] == ""
    assert "no path" in problems[1] and "age 'old'" in problems[2]
    assert "gender 'x'" in problems[4] and "split 'nope'" in problems[5]
    assert (rows[0].race, rows[0].gender, rows[3].gender) == (2, 1, -1)  # Asian; unknown
    assert (rows[3].age_low, rows[3].age_high) == (20, 29)
    assert rows[0].path == str(tmp_path / "a.jpg") and rows[0].groups == {"site": "x"}


def test_races_that_are_not_utkface_s_are_a_group(tmp_path):
    path = _write_csv(tmp_path / "l.csv", [
        {"path": "a.jpg", "age": "30", "race": "Latino_Hispanic"},
        {"path": "b.jpg", "age": "30", "race": "White"},
    ])  # fmt: skip
    rows, groups = read_labels(path)
    assert groups == ["race"] and [r.race for r in rows] == [-1, -1]
    assert [r.groups["race"] for r in rows] == ["Latino_Hispanic", "White"]


def test_json_lines(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text('{"path": "a.jpg", "age": 31, "gender": null, "camera": 2}\nnot json\n')
    rows, groups = read_labels(path)
    assert (rows[0].age_low, rows[0].gender, rows[0].groups) == (31, -1, {"camera": "2"})
    assert "not a JSON object" in rows[1].problem and groups == ["camera"]


@pytest.mark.parametrize(
    ("content", "message"),
    [("file,years\na.jpg,3\n", "no path or age column (columns: file, years)"),
     ("path,gender\na.jpg,m\n", "no age column")],
)  # fmt: skip
def test_labels_without_required_columns_are_one_line(tmp_path, capsys, content, message):
    (tmp_path / "l.csv").write_text(content)
    code = main(["prepare", "--labels", str(tmp_path / "l.csv"), "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_labels_with_no_usable_row_are_one_line(tmp_path, capsys):
    _write_csv(tmp_path / "l.csv", [{"path": "gone.jpg", "age": "30"}, {"path": "x", "age": "?"}])
    code = main(["prepare", "--labels", str(tmp_path / "l.csv"), "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "none of the 2 image files is usable" in err
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- losses


def test_range_targets():
    age = torch.tensor([[20.0, 29.0], [34.0, 34.0]])
    dist = range_label_distribution(age, num_ages=101, sigma=2.0)
    assert torch.allclose(dist.sum(1), torch.ones(2))
    inside = dist[0, 20:30]  # the range's ages take most of it, evenly but for blurred edges
    assert inside.sum() > 0.8 and 0.09 < inside[3:7].min() <= inside.max() < 0.1
    assert torch.allclose(inside, inside.flip(0))
    assert int(dist[1].argmax()) == 34  # a whole age: its Gaussian
    assert range_error(torch.tensor([25.0, 31.0]), age).tolist() == [0.0, 3.0]
    out = {"age": torch.tensor([25.0, 31.0]), "age_logits": torch.zeros(2, 101)}
    assert age_loss(out, age, "regression").item() == pytest.approx(1.5)
    # CORAL: levels inside the range are left out, so an estimate anywhere in it costs alike
    coral = {"age": torch.tensor([0.0]), "age_logits": torch.zeros(1, 100)}
    a = age_loss({**coral, "age_logits": torch.full((1, 100), 0.0)}, age[:1], "coral")
    assert a.item() == pytest.approx((100 - 9) * np.log(2), rel=1e-5)


def test_unknown_genders_train_nothing():
    logits = torch.tensor([3.0, -3.0, 0.0])
    assert gender_loss(logits, torch.tensor([-1.0, -1.0, -1.0])).item() == 0.0
    full = gender_loss(logits[:2], torch.tensor([1.0, 0.0]))
    assert gender_loss(logits, torch.tensor([1.0, 0.0, -1.0])).item() == pytest.approx(full.item())
    out = {"gender": logits, "age": torch.tensor([30.0, 30, 30])}
    res = multitask_loss(
        out, torch.tensor([[20.0, 40], [30, 30], [31, 31]]), torch.tensor([1.0, 0, -1])
    )
    assert res["mae"].item() == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- prepare


@pytest.fixture(scope="module")
def own_set(tmp_path_factory, request):
    """A labelled set of 60 UTKFace test faces under random names: 20 crops, 30 pasted into
    640x480 photos, 10 of those beside another face with a box saying which; a third of the
    ages as decades; a camera column; and one bad row of each kind."""
    utk = request.getfixturevalue("utkface_dir")
    out = tmp_path_factory.mktemp("own")
    with open(SPLIT_FILE, newline="") as f:
        names = sorted(r["name"] for r in csv.DictReader(f) if r["split"] == "test")
    rng = random.Random(3)
    rng.shuffle(names)
    names = [n for n in names if int(n.split("_")[0]) >= 10][:61]
    other = Image.open(utk / names.pop()).convert("RGB").resize((200, 200))
    rows = []
    for k, name in enumerate(names):
        age, gender = (int(v) for v in name.split("_")[:2])
        img = Image.open(utk / name).convert("RGB")
        row = {"path": f"p{k:03d}.jpg", "age": str(age), "gender": "mf"[gender],
               "camera": f"cam{k % 2}"}  # fmt: skip
        if k % 3 == 0:
            row["age"] = f"{age // 10 * 10}-{age // 10 * 10 + 9}"
        if k >= 20:
            photo = Image.new("RGB", (640, 480), (90, 120, 150))
            x, y = (30, 60) if k >= 50 else (rng.randrange(0, 400), rng.randrange(0, 240))
            photo.paste(img.resize((200, 200)), (x, y))
            if k >= 50:  # a second face, the row's box naming the first
                photo.paste(other, (400, 200))
                row["box"] = f"{x} {y} {x + 200} {y + 200}"
            img = photo
        img.save(out / row["path"], quality=93)
        rows.append(row)
    Image.new("RGB", (300, 300), (128, 128, 128)).save(out / "blank.jpg")
    rows += [
        {"path": "gone.jpg", "age": "30", "gender": "f", "camera": "cam0"},  # no such file
        {"path": "p001.jpg", "age": "thirty", "gender": "f", "camera": "cam0"},  # bad age
        {"path": "p002.jpg", "age": "30", "gender": "w?", "camera": "cam0"},  # bad gender
        {"path": "blank.jpg", "age": "30", "gender": "f", "camera": "cam0"},  # no face
        {**rows[5]},  # the same row twice: a duplicate
    ]
    return _write_csv(out / "labels.csv", rows), rows


@pytest.fixture(scope="module")
def own_cache(own_set, tmp_path_factory):
    labels, _ = own_set
    out = tmp_path_factory.mktemp("own-cache") / "cache"
    summary = prepare([], out, face_config(64), labels=[labels], quiet=True, workers=1)
    return out, summary


def test_prepare_detects_aligns_and_reports_each_bad_row(own_set, own_cache):
    _, _rows = own_set
    out, summary = own_cache
    manifest = read_manifest(out)
    status = {(Path(r["path"]).name, r["box"]): r["status"] for r in manifest}
    assert summary["kept"] == 60 and summary["bad_labels"] == 2 and summary["no_face"] == 1
    assert status[("gone.jpg", "")].startswith("unreadable")
    assert status[("blank.jpg", "")] == "no face: no face found"
    assert sum(r["status"].startswith("duplicate") for r in manifest) == 1
    cache = open_cache(out)
    assert cache.has_ranges and sorted(cache.groups) == ["camera"]
    assert set(cache.origin) == {"labels.csv"}
    decade = next(i for i, p in enumerate(cache.paths) if p.endswith("p003.jpg"))
    assert cache.age_high[decade] - cache.age_low[decade] == 9
    # a face pasted into a photo is found and aligned
    pasted = cache.images[next(i for i, p in enumerate(cache.paths) if p.endswith("p050.jpg"))]
    assert pasted.std() > 20  # a face, not the blue background


def test_a_photo_of_two_faces_needs_its_box(own_set, tmp_path):
    labels, rows = own_set
    bare = [{k: v for k, v in r.items() if k != "box"} for r in rows if r.get("box")][:3]
    path = _write_csv(labels.parent / "bare.csv", bare, ["path", "age", "gender", "camera"])
    with pytest.raises(DataError, match="2 faces: give a box column to say which"):
        prepare([], tmp_path / "c", face_config(64), labels=[path], quiet=True, workers=1)


def test_reprepare_reuses_and_a_changed_label_rebuilds(own_set, own_cache, tmp_path):
    labels, rows = own_set
    out, _ = own_cache
    assert prepare([], out, face_config(64), labels=[labels], quiet=True, workers=1)["reused"]
    moved = [{**r, "path": str(labels.parent / r["path"])} for r in rows[:20]]
    moved[0]["age"] = "77"
    changed = _write_csv(tmp_path / "changed.csv", moved)
    s = prepare([], tmp_path / "c2", face_config(64), labels=[changed], quiet=True, workers=1)
    cache = open_cache(tmp_path / "c2")
    first = next(i for i, p in enumerate(cache.paths) if p.endswith("p000.jpg"))
    assert not s["reused"] and cache.age[first] == 77


def test_labels_split_column_is_kept(tmp_path):
    # noise, not cartoons: the synthetic faces are near-copies of each other, whose groups
    # would (rightly) go whole to the earliest split of their members
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        path = tmp_path / f"n{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        rows.append({"path": str(path), "age": str(20 + i), "gender": "m",
                     "split": "test" if i < 10 else ""})  # fmt: skip
    labels = _write_csv(tmp_path / "l.csv", rows)
    prepare(
        [], tmp_path / "c", face_config(32), labels=[labels], aligned=True, quiet=True, workers=1
    )
    cache = open_cache(tmp_path / "c")
    by_name = dict(zip((Path(p).name for p in cache.paths), cache.split))
    assert all(by_name[Path(r["path"]).name] == "test" for r in rows[:10])


def test_utkface_folders_and_labels_mix(tmp_path, synthetic_dir):
    crops = make_dataset(tmp_path / "mine", n=20, size=64, seed=9)
    labels = _write_csv(tmp_path / "mine.csv", [
        {"path": str(p), "age": "20-29", "gender": "", "source": "phone"} for p in crops
    ])  # fmt: skip
    s = prepare([synthetic_dir], tmp_path / "c", face_config(32), labels=[labels], aligned=True,
                quiet=True, workers=1)  # fmt: skip
    cache = open_cache(tmp_path / "c")
    assert s["kept"] == 140 and s["age_ranges"] == 20
    assert set(cache.origin) == {"UTKFace", "mine.csv"}
    mine = np.array([o == "mine.csv" for o in cache.origin])
    assert (cache.gender[mine] == -1).all() and (cache.race[mine] == -1).all()
    assert set(cache.groups["source"][mine]) == {"phone"}
    assert set(cache.groups["source"][~mine]) == {""}


# ----------------------------------------------------------------------------- fine-tuning


def test_finetune_and_evaluate_by_group(own_set, own_cache, tmp_path):
    """The Done-when path at test scale: fine-tune the bundled model for one epoch on the
    prepared set, then evaluate on the labels file, by camera."""
    from agegender.inference.model_files import read_seen, resolve_checkpoint

    labels, _ = own_set
    cache, _ = own_cache
    run = tmp_path / "ft"
    argv = ["train", "configs/finetune.toml", f"data.cache={cache}", "train.epochs=1",
            f"run.out={run}", "train.threads=2", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    seen, start = read_seen(run / "best.safetensors"), read_seen(resolve_checkpoint("default"))
    trained = int((open_cache(cache).split != "test").sum())
    # the start's record and ours, each image once (the start's holds its teacher's too)
    assert len(seen.hashes) == len(np.unique(start.hashes, axis=0)) + trained
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--data", str(labels), "--out", str(out), "--quiet",
                 "--no-timing"]) == 0  # fmt: skip
    report = (out / "report.md").read_text()
    assert "## By camera" in report and "| cam0 |" in report
    m = json.loads((out / "metrics.json").read_text())
    # the set's training and validation faces are in the record: only its test faces are left
    assert m["n"] == int((open_cache(cache).split == "test").sum())
    assert m["age_range"] is not None and 0 <= m["age_range"]["accuracy"] <= 1


def test_freeze_names_must_exist(tmp_path, capsys):
    argv = ["train", "configs/finetune.toml", "data.cache=/nonexistent", "train.freeze=trunk",
            f"run.out={tmp_path / 'run'}"]  # fmt: skip
    assert main(argv) == 2
    assert "train.freeze: 'trunk' names no parameter" in capsys.readouterr().err


def test_astronaut_photo_with_a_box(tmp_path):
    """Without ../shared: the bundled photo, labelled with the box of its face, is detected and
    aligned, and a box where there is no face is said so."""
    rgb = decode_rgb(ASTRONAUT.read_bytes())
    wide = cv2.copyMakeBorder(rgb, 0, 0, 0, 300, cv2.BORDER_CONSTANT, value=(90, 90, 90))
    Image.fromarray(wide).save(tmp_path / "photo.jpg")
    labels = _write_csv(tmp_path / "l.csv", [
        {"path": "photo.jpg", "age": "40-49", "gender": "f", "box": "170 55 275 180"},
        {"path": "photo.jpg", "age": "30", "gender": "f", "box": "600 100 700 200"},
    ])  # fmt: skip
    prepare([], tmp_path / "c", face_config(64), labels=[labels], quiet=True, workers=1)
    status = [r["status"] for r in read_manifest(tmp_path / "c")]
    assert status == ["kept", "no face: no face found in the given box"]
