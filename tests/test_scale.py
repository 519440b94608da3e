"""Inference at scale: ``predict --workers`` (processes on one machine) and Ray Data (a
cluster) give exactly what plain ``predict`` gives, bad images included, and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agegender.cli.main import main
from agegender.data.synthetic import make_dataset
from agegender.inference.predictor import ASTRONAUT


@pytest.fixture(scope="module")
def images(tmp_path_factory, request):
    """Real UTKFace crops where ../shared has them (else synthetic ones), the bundled photo,
    and two broken files."""
    root = tmp_path_factory.mktemp("scale")
    try:
        utk = request.getfixturevalue("utkface_dir")
        for p in sorted(utk.glob("*.jpg"))[:120]:
            shutil.copy(p, root / p.name)
    except pytest.skip.Exception:
        make_dataset(root, n=120, size=64, seed=4)
    shutil.copy(ASTRONAUT, root / "astronaut.jpg")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "empty.png").write_bytes(b"")
    return root


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


@pytest.fixture(scope="module")
def plain(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "one.jsonl"
    assert main(["predict", str(images), "--output", str(out), "--quiet"]) == 1  # 2 broken
    return out


def test_workers_give_the_same_lines_in_the_same_order(images, plain, tmp_path):
    out = tmp_path / "two.jsonl"
    assert main(["predict", str(images), "--output", str(out), "--quiet", "--workers", "2"]) == 1
    assert lines(out) == lines(plain)
    errors = [json.loads(x) for x in lines(out) if json.loads(x)["error"]]
    assert sorted(Path(e["path"]).name for e in errors) == ["broken.jpg", "empty.png"]


def test_unordered_gives_the_same_lines(images, plain, tmp_path):
    out = tmp_path / "any.jsonl"
    argv = ["predict", str(images), "--output", str(out), "--quiet", "--workers", "2",
            "--unordered", "--batch-size", "8"]  # fmt: skip
    assert main(argv) == 1
    assert sorted(lines(out)) == sorted(lines(plain))


def test_resume_predicts_only_the_rest(images, plain, tmp_path, capsys):
    out = tmp_path / "res.jsonl"
    head = lines(plain)[:50]
    (tmp_path / "res.jsonl.partial").write_text("\n".join(head) + "\n" + head[50 - 1][:20])
    argv = ["predict", str(images), "--output", str(out), "--resume", "--workers", "2"]
    assert main(argv) == 1
    assert lines(out) == lines(plain)  # the cut-short last line was predicted again
    assert not (tmp_path / "res.jsonl.partial").exists()
    assert main(["predict", str(images), "--output", str(out), "--resume", "--quiet"]) == 0
    assert lines(out) == lines(plain)  # nothing left to do, nothing lost


def test_resume_needs_an_output(images, capsys):
    assert main(["predict", str(images), "--resume"]) == 2
    assert "--resume needs --output" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Ray Data


def test_auto_workers_is_one_for_crops_and_few_files():
    from agegender.cli.photos import AUTO_WORKERS_FROM, auto_workers
    from agegender.inference.runtime import default_threads

    assert auto_workers(AUTO_WORKERS_FROM - 1, aligned=False) == 1  # start-up would dominate
    assert auto_workers(100_000, aligned=True) == 1  # the network alone keeps the cores busy
    assert auto_workers(100_000, aligned=False) == default_threads()  # photos: one per core


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False  # quiet test logs
    yield ray
    ray.shutdown()


def test_ray_gives_the_faces_predict_gives(local_ray, images, plain):
    from agegender.inference.options import InferenceOptions
    from agegender.integrations.ray import paths_dataset, predict_dataset

    options = InferenceOptions(threads=1)
    rows = predict_dataset(paths_dataset([images]), options, workers=2).take_all()
    want = {json.loads(x)["path"]: json.loads(x) for x in lines(plain)}
    assert len(rows) == len(want)
    for r in rows:
        assert json.loads(r["faces"]) == want[r["path"]]["faces"]
        assert r["error"] == want[r["path"]]["error"] and r["n_faces"] == len(
            want[r["path"]]["faces"]
        )


def test_ray_command_writes_parquet_and_a_rerun_skips_what_is_done(
    local_ray, images, tmp_path, capsys
):
    import pyarrow.parquet as pq

    from agegender.integrations.ray import COLUMNS
    from agegender.integrations.ray import main as ray_main

    out = tmp_path / "faces"
    first = sorted(str(p) for p in images.iterdir())[:40]  # a run cut short after 40 images
    assert ray_main([*first, "--output", str(out), "--workers", "1"]) == 0
    capsys.readouterr()
    assert ray_main([str(images), "--output", str(out), "--workers", "1"]) == 0
    assert "40 images done before were skipped" in capsys.readouterr().out
    table = pq.read_table(out)
    assert tuple(table.column_names) == COLUMNS
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 123  # each image once: the rest, not all again
    assert ray_main([str(images), "--output", str(out), "--workers", "1"]) == 0
    assert "nothing to do: the 123 images" in capsys.readouterr().out
