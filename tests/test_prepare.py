import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import bomb_png
from PIL import Image

from agegender.core.errors import DataError
from agegender.data import prepare as data
from agegender.data.cache import open_cache
from agegender.data.manifest import MANIFEST_COLUMNS, read_manifest
from agegender.data.prepare import prepare
from agegender.data.split import split_indices
from agegender.data.synthetic import draw_face
from agegender.data.utkface import SPLITS, age_band
from agegender.vision.images import face_config, load_face


def test_split_is_stratified_and_proportional():
    rng = np.random.default_rng(0)
    n = 6000
    gender, age = rng.integers(0, 2, n), rng.integers(1, 100, n)
    fractions = (0.7, 0.1, 0.2)
    split = split_indices(gender, age, fractions, seed=3)
    counts = np.bincount(split, minlength=3)
    assert np.all(np.abs(counts / n - fractions) < 0.01)
    stratum = gender * 100 + age_band(age)
    for s in np.unique(stratum):
        members = split[stratum == s]
        expected = np.array(fractions) * len(members)
        assert np.all(np.abs(np.bincount(members, minlength=3) - expected) <= 2)
    assert np.array_equal(split, split_indices(gender, age, fractions, seed=3))
    assert not np.array_equal(split, split_indices(gender, age, fractions, seed=4))


def test_prepare_synthetic(synthetic_dir, tmp_path):
    s = prepare([synthetic_dir], tmp_path, face_config(32, "rgb"), quiet=True, workers=2)
    assert (s["files_found"], s["parsed"], s["kept"]) == (120, 120, 120)
    assert sum(s["splits"].values()) == 120
    rows = read_manifest(tmp_path)
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    cache = open_cache(tmp_path)
    assert cache.images.shape == (120, 32, 32, 3) and cache.images.dtype == np.uint8
    assert cache.color == "rgb" and cache.size == 32
    # each cached image is exactly what load_face gives for its file (the predict path)
    i = 17
    assert np.array_equal(cache.images[i], load_face(cache.paths[i], face_config(32, "rgb")))
    assert json.loads((tmp_path / "summary.json").read_text())["kept"] == 120
    assert not list(tmp_path.glob("*tmp*")), "temporary files left behind"


def test_kaggle_layout_duplicates_and_conflicts(synthetic_dir, tmp_path):
    root = tmp_path / "kaggle"
    names = sorted(p.name for p in synthetic_dir.iterdir())[:40]
    for sub in ("UTKFace", "crop_part1", "utkface_aligned_cropped/UTKFace"):
        (root / sub).mkdir(parents=True)
        for name in names[:30] if sub != "crop_part1" else names[10:40]:
            shutil.copy(synthetic_dir / name, root / sub / name)
    # the same bytes under a name with another age: the group is unreliable and dropped
    age, rest = names[0].split("_", 1)
    shutil.copy(synthetic_dir / names[0], root / "UTKFace" / f"{int(age) % 90 + 2}_{rest}")
    s = prepare([root], tmp_path / "cache", face_config(32), quiet=True, workers=1)
    assert s["files_found"] == 30 + 30 + 30 + 1
    assert s["duplicate_groups"] == 30  # names[:30] have two or three copies
    assert s["conflicting_groups"] == 1
    assert s["kept"] == 39
    rows = read_manifest(tmp_path / "cache")
    by_hash: dict[str, set[str]] = {}
    for r in rows:
        if r["status"] == "kept":
            by_hash.setdefault(r["content_hash"], set()).add(r["split"])
    assert len(by_hash) == 39 and all(len(v) == 1 for v in by_hash.values())
    assert sum(r["status"].startswith("conflicting") for r in rows) == 3
    assert sum(r["status"].startswith("duplicate") for r in rows) == 91 - 39 - 3


def test_no_image_on_two_sides(tmp_path, synthetic_dir):
    # two folders holding the same files: copies must follow their original
    for sub in ("a", "b"):
        shutil.copytree(synthetic_dir, tmp_path / sub)
    prepare(
        [tmp_path / "a", tmp_path / "b"], tmp_path / "c", face_config(32), quiet=True, workers=1
    )
    splits_of: dict[str, set[str]] = {}
    for r in read_manifest(tmp_path / "c"):
        splits_of.setdefault(r["content_hash"], set()).add(r["split"])
    assert all(len(v - {""}) == 1 for v in splits_of.values())


def test_bad_files_are_reported_and_skipped(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    good = []
    for i in range(6):
        p = data / f"{20 + i}_{i % 2}_0_2017011600000000{i}.jpg.chip.jpg"
        draw_face(20 + i, i % 2, 0, 48, seed=i).save(p)
        good.append(p)
    (data / "30_0_1_20170116000000010.jpg.chip.jpg").write_bytes(b"")
    (data / "31_0_1_20170116000000011.jpg.chip.jpg").write_text("this is not a JPEG\n")
    full = good[0].read_bytes()
    (data / "32_0_1_20170116000000012.jpg.chip.jpg").write_bytes(full[: len(full) // 2])
    bomb_png(data / "33_0_1_20170116000000013.png")
    (data / "notes.txt").write_text("ignored: not an image name")
    (data / "33_1_20170116000000013.jpg.chip.jpg").write_bytes(full)  # missing field
    s = prepare([data], tmp_path / "cache", face_config(32), quiet=True, workers=2)
    assert s["files_found"] == 11
    assert s["unparsable"] == 1
    assert s["unreadable"] == 4
    assert s["kept"] == 6
    status = {Path(r["path"]).name[:2]: r["status"] for r in read_manifest(tmp_path / "cache")}
    assert status["30"] == "unreadable: empty file"
    assert status["31"] == "unreadable: not an image (unknown format)"
    assert status["32"].startswith("unreadable: corrupt image")
    assert status["33"].startswith(("unreadable: decompression bomb", "unparsable"))
    assert len(open_cache(tmp_path / "cache")) == 6


def test_cache_is_reused_and_invalidated(synthetic_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    first = prepare([data], tmp_path / "c", face_config(32), quiet=True, workers=1)
    assert not first["reused"]
    before = (tmp_path / "c" / "images.npy").stat().st_mtime_ns
    again = prepare([data], tmp_path / "c", face_config(32), quiet=True, workers=1)
    assert again["reused"] and again["splits"] == first["splits"]
    assert (tmp_path / "c" / "images.npy").stat().st_mtime_ns == before
    reseeded = prepare([data], tmp_path / "c", face_config(32), seed=7, quiet=True, workers=1)
    assert reseeded["reused"]
    assert not prepare([data], tmp_path / "c", face_config(48), quiet=True, workers=1)["reused"]
    draw_face(50, 1, 2, 64).save(data / "50_1_2_20170116000000099.jpg.chip.jpg")
    changed = prepare([data], tmp_path / "c", face_config(48), quiet=True, workers=1)
    assert not changed["reused"] and changed["kept"] == first["kept"] + 1


def test_gray_cache_matches_load_face(synthetic_cache):
    cache = open_cache(synthetic_cache)
    assert cache.images.shape[1:] == (32, 32, 1)
    assert set(np.unique(cache.split)) <= set(SPLITS)
    assert np.array_equal(cache.images[3], load_face(cache.paths[3], face_config(32, "gray")))


@pytest.mark.parametrize(
    ("dirs", "message"),
    [(["/no/such/folder"], "no such file or directory"), ([], "no data folder")],
)
def test_bad_paths(tmp_path, dirs, message):
    with pytest.raises(DataError, match=message):
        prepare(dirs, tmp_path / "c", quiet=True)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no image files \(\.jpg, \.jpeg, \.png"):
        prepare([tmp_path / "empty"], tmp_path / "c", quiet=True)


@pytest.mark.parametrize("split", ["0.7,0.3", "a,b,c", "0.8,0.1,0.2", "-0.1,0.9,0.2"])
def test_bad_split(tmp_path, synthetic_dir, split):
    with pytest.raises(DataError, match="--split"):
        prepare([synthetic_dir], tmp_path / "c", split=split, quiet=True)


def test_open_cache_errors(tmp_path):
    with pytest.raises(DataError, match="no such cache"):
        open_cache(tmp_path / "missing")
    with pytest.raises(DataError, match="not a prepared cache"):
        open_cache(tmp_path)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "I;16", "1", "CMYK"])
def test_load_face_accepts_image_modes(mode):
    img = draw_face(30, 0, 1, 80).convert("RGBA" if mode in ("RGBA", "LA") else "RGB")
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)
    else:
        img = img.convert(mode)
    for color, channels in (("gray", 1), ("rgb", 3)):
        arr = load_face(img, face_config(40, color))
        assert arr.shape == (40, 40, channels) and arr.dtype == np.uint8
        assert arr.max() > 100  # 16-bit scaled, not clipped to white or black


def test_load_face_center_crops_non_square():
    img = Image.new("L", (120, 60), 0)
    img.paste(255, (30, 0, 90, 60))  # the white centre square
    assert load_face(img, face_config(20, "gray")).min() > 200


def test_load_face_honours_exif_orientation(tmp_path):
    img = Image.new("RGB", (60, 60), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 60, 20))  # white band on top
    exif = Image.Exif()
    exif[0x0112] = 3  # rotated 180 degrees: the band must end up at the bottom
    img.save(tmp_path / "r.jpg", exif=exif)
    arr = load_face(tmp_path / "r.jpg", face_config(30, "gray"))[:, :, 0]
    assert arr[-3:].mean() > 200 and arr[:3].mean() < 50


def _damage(cache, how):
    if how == "images truncated":
        os.truncate(cache / "images.npy", 1000)
    elif how == "manifest cut mid-row":
        text = (cache / "manifest.csv").read_text()
        (cache / "manifest.csv").write_text(text[: len(text) // 2])
    elif how == "manifest rows lost":
        lines = (cache / "manifest.csv").read_text().splitlines(keepends=True)
        (cache / "manifest.csv").write_text("".join(lines[:-5]))
    elif how == "summary corrupt":
        (cache / "summary.json").write_text('{"files')
    elif how == "no cache.json":
        (cache / "cache.json").unlink()


@pytest.mark.parametrize(
    "how",
    [
        "images truncated",
        "manifest cut mid-row",
        "manifest rows lost",
        "summary corrupt",
        "no cache.json",
    ],
)
def test_damaged_cache_is_refused_then_rebuilt(synthetic_dir, tmp_path, how):
    cache = tmp_path / "c"
    prepare([synthetic_dir], cache, face_config(32), quiet=True, workers=1)
    _damage(cache, how)
    with pytest.raises(DataError, match=r"is damaged \(.+\); run prepare again"):
        open_cache(cache)
    again = prepare([synthetic_dir], cache, face_config(32), quiet=True, workers=1)
    assert not again["reused"] and again["kept"] == 120
    assert len(open_cache(cache)) == 120


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_interrupted_prepare_leaves_no_temp_files(synthetic_dir, tmp_path, monkeypatch):
    prepare([synthetic_dir], tmp_path / "c", face_config(32), quiet=True, workers=1)
    monkeypatch.setattr(data, "decode_chunk", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare([synthetic_dir], tmp_path / "new", face_config(32), quiet=True, workers=1)
    assert not (tmp_path / "new").exists()
    # a rebuild interrupted while decoding leaves the old cache as it was
    with pytest.raises(KeyboardInterrupt):
        prepare([synthetic_dir], tmp_path / "c", face_config(48), quiet=True, workers=1)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "cache.json",
        "images.npy",
        "manifest.csv",
        "summary.json",
    ]
    assert open_cache(tmp_path / "c").size == 32


def test_interrupted_commit_is_not_reused(synthetic_dir, tmp_path, monkeypatch):
    # killed after the new images.npy is in place: cache.json (written last) is missing, so
    # the half-written cache is refused and the next run rebuilds it
    cache = tmp_path / "c"
    prepare([synthetic_dir], cache, face_config(32), quiet=True, workers=1)
    with monkeypatch.context() as m:
        m.setattr(data, "write_manifest", _interrupt)
        with pytest.raises(KeyboardInterrupt):
            prepare([synthetic_dir], cache, face_config(48), quiet=True, workers=1)
    assert not list(cache.glob("*tmp*"))
    with pytest.raises(DataError, match="is damaged"):
        open_cache(cache)
    assert not prepare([synthetic_dir], cache, face_config(48), quiet=True, workers=1)["reused"]
    assert open_cache(cache).size == 48


def test_no_usable_image_is_an_error(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("IMG_0001.jpg", "holiday.png"):
        draw_face(30, 0, 0, 48).save(photos / name)
    with pytest.raises(DataError, match=r"none of the 2 image files has a UTKFace name"):
        prepare([photos], tmp_path / "c", quiet=True, workers=1)
    assert not (tmp_path / "c").exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "30_0_1_20170116000000010.jpg.chip.jpg").write_text("not a JPEG")
    (broken / "holiday.png").write_text("not a PNG")
    with pytest.raises(
        DataError, match=r"none of the 2 image files is usable \(1 unreadable, 1 unparsable\)"
    ):
        prepare([broken], tmp_path / "c", quiet=True, workers=1)
    assert not (tmp_path / "c").exists()
