"""Near-duplicates: copies of one photo found, grouped, kept in one split, and left out of the
evaluation of a model that trained on them."""

import csv
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from agegender.cli.main import main
from agegender.core.errors import DataError
from agegender.data import near_dups as nd
from agegender.data.cache import open_cache
from agegender.data.manifest import read_manifest
from agegender.data.prepare import prepare
from agegender.data.split import write_split_file
from agegender.data.synthetic import draw_face
from agegender.vision.images import decode_rgb, face_config


def _shift(x: np.ndarray, dx: int, dy: int) -> np.ndarray:
    p = np.pad(x, ((4, 4), (4, 4), (0, 0)), mode="edge")
    return p[4 + dy : 4 + dy + x.shape[0], 4 + dx : 4 + dx + x.shape[1]]


def _jpeg(x: np.ndarray, quality: int = 70) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def _bright(x: np.ndarray, f: float) -> np.ndarray:
    return np.clip(x.astype(np.float32) * f, 0, 255).astype(np.uint8)


#: the kinds of copy the issue names, each alone and all at once
COPIES = {
    "re-encoded": lambda x: _jpeg(x),
    "shifted 1 px": lambda x: _shift(x, 1, -1),
    "shifted 2 px": lambda x: _shift(x, -2, 2),
    "brighter 5 %": lambda x: _bright(x, 1.05),
    "darker 5 %": lambda x: _bright(x, 0.95),
    "all three": lambda x: _bright(_shift(_jpeg(x), 2, 1), 1.05),
}


def _faces(n: int, seed: int = 0) -> list[np.ndarray]:
    """Synthetic faces that differ as photos do: each drawing under a smooth random field of
    its own (two cartoons alone agree on most of their flat cells)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        face = np.asarray(draw_face(int(rng.integers(1, 90)), i % 2, i % 5, 200, seed * 1000 + i))
        field = Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).resize((200, 200))
        mixed = 0.5 * face + 0.5 * np.asarray(field, np.float32)[:, :, None]
        out.append(mixed.astype(np.uint8))
    return out


def test_each_kind_of_copy_is_found_and_nothing_else():
    originals = _faces(24)
    copies = [make(originals[k]) for k, make in enumerate(COPIES.values())]
    faces = np.stack(originals + copies)
    pairs = {(i, j) for i, j, _ in nd.find_pairs(faces)}
    assert pairs == {(k, 24 + k) for k in range(len(COPIES))}


def test_copies_of_real_faces_are_found(utkface_dir):
    files = sorted(utkface_dir.glob("*.jpg"))[::997][:20]
    originals = np.stack([decode_rgb(f) for f in files])
    record = nd.SeenRecord.of([f"{k:032x}" for k in range(len(files))], originals)
    for name, make in COPIES.items():
        copies = np.stack([make(x) for x in originals])
        found = {(i, j) for i, j, _ in nd.find_pairs(copies, record.signatures)}
        assert {(k, k) for k in range(len(files))} <= found, name
        assert record.seen(["f" * 32] * len(copies), copies).all(), name
    # ... and the originals are not copies of each other
    assert not nd.find_pairs(originals)


def test_signatures_pack_to_176_bytes_and_back():
    """The coarse grid at 4 bits a cell (32 bytes), the fine one at 8 (144): each comes back
    to within half its step."""
    faces = np.stack(_faces(5))
    packed = nd.signatures(faces)
    assert packed.shape == (5, nd.BYTES) == (5, 176) and packed.dtype == np.uint8
    coarse = np.clip(nd.grids(faces, nd.COARSE), -7 * nd.STEP, 8 * nd.STEP)
    assert np.abs(nd.unpack(packed[:, :32]) - coarse).max() < nd.STEP / 2 + 1e-6
    fine = np.clip(nd.grids(faces, nd.GRID), -127 * nd.FINE_STEP, 127 * nd.FINE_STEP)
    assert np.abs(nd._unpack_fine(packed[:, 32:]) - fine).max() < nd.FINE_STEP / 2 + 1e-6


@pytest.fixture(scope="module")
def copied_folder(tmp_path_factory):
    """48 synthetic faces with UTKFace names, and copies of 12 of them under other names (the
    copies' labels: the first three disagree with their originals' widely)."""
    root = tmp_path_factory.mktemp("copies") / "faces"
    root.mkdir()
    faces = _faces(48, seed=7)
    kinds = list(COPIES.values())
    for i, face in enumerate(faces):
        Image.fromarray(face).save(
            root / f"{20 + i}_{i % 2}_{i % 5}_20170110{i:09d}.jpg", quality=95
        )
    for k in range(12):
        i = 4 * k
        age, gender = (20 + i, i % 2) if k >= 3 else (80, 1 - i % 2)
        copy = kinds[k % len(kinds)](faces[i])
        Image.fromarray(copy).save(root / f"{age}_{gender}_{i % 5}_20171231{k:09d}.jpg", quality=92)
    return root


def test_prepare_groups_copies_and_keeps_each_group_in_one_split(copied_folder, tmp_path):
    for seed in (0, 1, 2):
        s = prepare([copied_folder], tmp_path / f"c{seed}", face_config(64), seed=seed, quiet=True)
        assert s["kept"] == 60
        assert s["near_duplicate_groups"] == 12 and s["near_duplicate_images"] == 24
        assert s["near_duplicate_conflicts"] == 3
        rows = [r for r in read_manifest(tmp_path / f"c{seed}") if r["status"] == "kept"]
        splits: dict[str, set[str]] = {}
        for r in rows:
            splits.setdefault(r["group"], set()).add(r["split"])
        assert all(len(v) == 1 for v in splits.values())
        # each copy's group is its original's
        by_name = {r["path"].rsplit("/", 1)[1]: r["group"] for r in rows}
        copies = sorted(n for n in by_name if "20171231" in n)
        assert len({by_name[n] for n in copies}) == 12


def test_a_published_split_is_reproduced_from_another_copy_of_the_data(copied_folder, tmp_path):
    prepare([copied_folder], tmp_path / "a", face_config(64), seed=5, quiet=True)
    write_split_file(tmp_path / "a", tmp_path / "split.csv")
    # the same images in another layout (two folders, other names, an extra file) and seed
    other = tmp_path / "other"
    for k, f in enumerate(sorted(copied_folder.iterdir())):
        (other / ("x" if k % 2 else "y")).mkdir(parents=True, exist_ok=True)
        age, gender, race, stamp = f.stem.split("_")
        shutil.copy(f, other / ("x" if k % 2 else "y") / f"{age}_{gender}_{race}_9{stamp}{k}.jpg")
    Image.fromarray(_faces(1, seed=99)[0]).save(other / "y" / "33_1_2_20170101000000001.jpg")
    split = tmp_path / "split.csv"
    argv = ["prepare", str(other), "--out", str(tmp_path / "b"), "--size", "64", "--seed", "9"]
    assert main([*argv, "--split-file", str(split), "--quiet"]) == 0
    with split.open(newline="") as f:
        want = {r["content_hash"]: r["split"] for r in csv.DictReader(f)}
    got = {r["content_hash"]: r["split"] for r in read_manifest(tmp_path / "b") if r["split"]}
    assert {h: got[h] for h in want} == want and len(got) == len(want) + 1
    (tmp_path / "bad.csv").write_text("content_hash,split\nabc,holdout\n")
    with pytest.raises(DataError, match="split 'holdout' is not one of"):
        prepare(
            [other], tmp_path / "c", face_config(64), split_file=tmp_path / "bad.csv", quiet=True
        )


def test_evaluate_leaves_out_what_the_model_trained_on(copied_folder, tmp_path, capsys):
    cache = tmp_path / "cache"
    prepare([copied_folder], cache, face_config(64), seed=3, quiet=True)
    run = tmp_path / "run"
    overrides = [f"data.cache={cache}", f"run.out={run}", "train.threads=2", "data.limit=0"]
    smoke = ["train", "configs/smoke.toml", *overrides, "--quiet"]
    assert main(smoke) == 0
    c = open_cache(cache)
    train_val = int(np.isin(c.split, ["train", "val"]).sum())
    assert json.loads((run / "best.json").read_text())["seen"]["images"] == train_val

    out = tmp_path / "eval"
    args = ["evaluate", str(run), "--data", str(cache), "--split", "all", "--no-timing", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["excluded_seen_in_training"] == train_val and m["n"] == len(c) - train_val
    err = capsys.readouterr().err
    assert f"left out {train_val:,} of {len(c):,} images that the model trained" in err
    # its own test split was never seen: nothing left out
    assert main([*args[:-4], "--split", "test", "--no-timing", "--out", str(tmp_path / "e2")]) == 0
    assert (
        json.loads((tmp_path / "e2" / "metrics.json").read_text())["excluded_seen_in_training"] == 0
    )
    # the training split alone is all seen: a one-line error, exit 2
    capsys.readouterr()
    assert main([*args[:-4], "--split", "train", "--no-timing", "--out", str(tmp_path / "e3")]) == 2
    assert "every image of the train split" in capsys.readouterr().err
    # --include-seen keeps them
    assert main([*args, "--include-seen", "--out", str(tmp_path / "e4")]) == 0
    m4 = json.loads((tmp_path / "e4" / "metrics.json").read_text())
    assert m4["excluded_seen_in_training"] is None and m4["n"] == len(c)
    report = (out / "report.md").read_text()
    assert "Left out: " in report  # (no group here has the 30 images a worst group needs)
