import csv
from pathlib import Path

import pytest

from agegender.cli.main import main
from agegender.core.errors import ConfigError, DataError
from agegender.data.prepare import prepare
from agegender.evaluation.sweep import load_sweep, run_sweep
from agegender.vision.images import face_config

SWEEPS = sorted((Path(__file__).parents[1] / "sweeps").glob("*.toml"))


@pytest.fixture(scope="module")
def cache96(synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache96")
    prepare([synthetic_dir], out, face_config(96), quiet=True, workers=1)
    return out


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.stem)
def test_sweep_files_resolve(sweep):
    s = load_sweep(sweep)
    assert s.runs and s.base.is_file()


@pytest.mark.slow
@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.stem)
def test_every_sweep_runs_reduced(sweep, cache96, synthetic_dir, tmp_path):
    reduced = {
        "root": str(synthetic_dir),
        "limit": 48,
        "epochs": 1,
        "quiet": True,
        "parallel": 2,
        "extra": ["data.size=96", "train.batch_size=16"],
    }
    table = run_sweep(sweep, cache96, tmp_path, **reduced)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["run"] for r in rows] == [r.name for r in load_sweep(sweep).runs]
    for r in rows:
        assert 0 <= float(r["test_acc"]) <= 1 and float(r["test_mae"]) > 0, r
    text = table.read_text()
    assert text.count("\n| ") == len(rows) + 1  # header + one line per run
    # a finished sweep is not trained again: same table, no new logs
    logs = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.log")}
    again = run_sweep(sweep, cache96, tmp_path, **reduced)
    assert again.read_text() == text
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.log")} == logs


@pytest.mark.slow
def test_a_run_prepared_from_root_keeps_the_caches_split(synthetic_dir, tmp_path):
    cache = tmp_path / "cache"
    prepare([synthetic_dir], cache, face_config(64), seed=3, quiet=True, workers=1)
    smoke = Path(__file__).parents[1] / "configs" / "smoke.toml"
    (tmp_path / "s.toml").write_text(
        f'base = "{smoke}"\n[[run]]\nname = "gray"\n[[run]]\nname = "rgb"\n'
        'overrides = ["data.root={root}", "data.color=rgb"]\n'
    )
    out = tmp_path / "out"
    table = run_sweep(tmp_path / "s.toml", cache, out, root=str(synthetic_dir), epochs=1,
                      limit=32, quiet=True)  # fmt: skip

    def split(cache_dir):
        rows = csv.DictReader((cache_dir / "manifest.csv").open())
        return {(r["path"], r["split"]) for r in rows if r["status"] == "kept"}

    assert split(out / "rgb" / "cache") == split(cache)
    assert "data.split_seed=3" in table.read_text()  # the table says so


def test_bad_sweeps(tmp_path):
    (tmp_path / "s.toml").write_text('base = "nope.toml"\n[[run]]\nname = "a"\n')
    with pytest.raises(ConfigError, match="no such recipe"):
        load_sweep(tmp_path / "s.toml")
    base = Path(__file__).parents[1] / "configs" / "seed.toml"
    (tmp_path / "t.toml").write_text(
        f'base = "{base}"\n[[run]]\nname = "a"\noverrides = ["train.lr=fast"]\n'
    )
    with pytest.raises(ConfigError, match=r"train\.lr must be float"):
        load_sweep(tmp_path / "t.toml")
    assert main(["sweep", str(tmp_path / "missing.toml"), "--data", str(tmp_path)]) == 2


@pytest.mark.slow
def test_sweep_reuses_only_what_it_would_train_and_checks_first(cache96, tmp_path):
    smoke = Path(__file__).parents[1] / "configs" / "smoke.toml"
    (tmp_path / "s.toml").write_text(f'base = "{smoke}"\n[[run]]\nname = "a"\n')
    out = tmp_path / "out"
    kw = {"limit": 48, "epochs": 1, "quiet": True}
    run_sweep(tmp_path / "s.toml", cache96, out, **kw)
    weights = (out / "a" / "best.safetensors").read_bytes()

    # other settings than the finished run's: refused before training, the run untouched
    with pytest.raises(ConfigError, match=r"other settings: a \(train\.epochs 1 -> 2\)"):
        run_sweep(tmp_path / "s.toml", cache96, out, **{**kw, "epochs": 2})
    assert (out / "a" / "best.safetensors").read_bytes() == weights
    with pytest.raises(ConfigError, match="--only b: no such run; the sweep's runs: a"):
        run_sweep(tmp_path / "s.toml", cache96, out, only=["b"], **kw)
    with pytest.raises(ConfigError, match=r"did you mean train\.epochs"):
        run_sweep(tmp_path / "s.toml", cache96, tmp_path / "o2", extra=["train.epochz=1"], **kw)
    with pytest.raises(ConfigError, match=r"train\.epochs must be 1-100,000"):
        run_sweep(tmp_path / "s.toml", cache96, tmp_path / "o2", extra=["train.epochs=0"], **kw)
    with pytest.raises(DataError, match="not a prepared cache"):
        run_sweep(tmp_path / "s.toml", tmp_path / "nope", tmp_path / "o3", **kw)
    assert not (tmp_path / "o2" / "a").exists() and not (tmp_path / "o3" / "a").exists()

    # a run killed before it wrote metrics.json is continued, not started again
    (out / "a" / "metrics.json").unlink()
    run_sweep(tmp_path / "s.toml", cache96, out, **kw)
    # (trained afresh, it would be refused: train never writes over a run folder)
    assert (out / "a" / "metrics.json").is_file()
    assert (out / "a" / "best.safetensors").read_bytes() == weights
