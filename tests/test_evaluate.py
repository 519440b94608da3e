import csv
import json
import shutil

import numpy as np
import pytest
import torch

from agegender.cli.main import main
from agegender.core.config import load_config, to_toml
from agegender.core.errors import AgeGenderError, DataError
from agegender.data.cache import open_cache
from agegender.data.prepare import prepare
from agegender.evaluation.evaluate import evaluate, show
from agegender.evaluation.metrics import compute_metrics
from agegender.inference.options import InferenceOptions
from agegender.inference.runtime import INTERVAL_Z
from agegender.training.checkpoint import save_checkpoint
from agegender.training.models import create_model
from agegender.vision.images import face_config

PLOTS = ("confusion.png", "age_scatter.png", "mae_by_band.png", "reliability.png")
KEYS = {
    "n",
    "gender_accuracy",
    "gender_accuracy_by_gender",
    "confusion",
    "age_mae",
    "age_abs_error_std",
    "age_mae_by_band",
    "age_mae_by_decade",
    "by_race",
    "calibration",
    "age_interval",
    "model",
    "checkpoint",
    "data",
    "split",
    "tta",
    "device",
}


@pytest.fixture(autouse=True)
def _one_thread():
    # tests share the machine with other work; one thread is plenty for these tiny models
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache64(synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache64")
    prepare([synthetic_dir], out, face_config(64), quiet=True, workers=1)
    return out


def _checkpoint(path, config=None, in_chans=1):
    torch.manual_seed(0)
    model = create_model("resnet-mt-small", img_size=64, age_head="dldl", in_chans=in_chans)
    return save_checkpoint(path, model, {"epoch": 0, "metrics": {}, "config": config or {}})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("model") / "model.safetensors")


def _read_predictions(out):
    with (out / "predictions.csv").open(newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- metrics


def test_compute_metrics_by_hand():
    m = compute_metrics(
        age_true=[3, 15, 30, 50, 95],
        gender_true=[1, 0, 0, 0, 1],
        race=[0, 1, 1, 4, 0],
        age_pred=[5, 15, 26, 60, 85],
        p_female=[0.9, 0.9, 0.1, 0.1, 0.6],
        age_std=[1.0, 1.0, 2.0, 5.0, 10.0],
    )
    assert m["n"] == 5
    assert m["gender_accuracy"] == pytest.approx(0.8)  # only the second face is wrong
    assert m["gender_accuracy_by_gender"] == {"male": pytest.approx(2 / 3), "female": 1.0}
    assert m["confusion"] == [[2, 1], [0, 2]]
    errors = np.array([2, 0, 4, 10, 10])
    assert m["age_mae"] == pytest.approx(5.2)
    assert m["age_abs_error_std"] == pytest.approx(np.sqrt(((errors - 5.2) ** 2).mean()))
    assert {k: v["mae"] for k, v in m["age_mae_by_band"].items()} == {
        "0-9": 2.0,
        "10-19": 0.0,
        "20-39": 4.0,
        "40-59": 10.0,
        "60+": 10.0,
    }
    decades = m["age_mae_by_decade"]
    assert list(decades)[-1] == "90+" and len(decades) == 10
    assert decades["90+"] == {"n": 1, "mae": 10.0} and decades["60-69"] == {"n": 0, "mae": None}
    assert m["by_race"]["Black"] == {"n": 2, "gender_accuracy": 0.5, "age_mae": 2.0}
    assert m["by_race"]["Asian"] == {"n": 0, "gender_accuracy": None, "age_mae": None}
    # confidence 0.9 four times (3 right: gap 0.15), 0.6 once (right: gap 0.4)
    assert m["calibration"]["ece"] == pytest.approx(4 / 5 * 0.15 + 1 / 5 * 0.4)
    bins = m["calibration"]["bins"]
    assert len(bins) == 10 and bins[0]["lo"] == 0.5 and bins[-1]["hi"] == 1.0
    assert sum(b["n"] for b in bins) == 5
    # half widths 1.645, 1.645, 3.29, 8.225, 16.45 vs errors 2, 0, 4, 10, 10
    assert m["age_interval"]["coverage"] == pytest.approx(2 / 5)
    assert m["age_interval"]["mean_width"] == pytest.approx(2 * INTERVAL_Z * 3.8)
    json.dumps(m, allow_nan=False)  # empty groups are null, not NaN


def test_compute_metrics_calibrated_and_without_std():
    # 10 faces at confidence 0.8 with 8 right: perfectly calibrated
    m = compute_metrics([30] * 10, [0] * 8 + [1] * 2, [0] * 10, [30] * 10, [0.2] * 10)
    assert m["calibration"]["ece"] == pytest.approx(0.0)
    assert m["age_interval"] is None and m["age_mae"] == 0.0
    with pytest.raises(ValueError, match="length"):
        compute_metrics([1, 2], [0], [0], [1], [0.5])


# --------------------------------------------------------------------------- end to end


def test_evaluate_checkpoint_on_cache(ckpt, cache64, tmp_path):
    out = tmp_path / "eval"
    m = evaluate(ckpt, cache64, out_dir=out, batch_size=16, timing=False, quiet=True)
    n_test = len(open_cache(cache64).indices("test"))
    assert m["n"] == n_test > 0
    assert set(m) >= KEYS and "timing" not in m
    assert m["split"] == "test" and m["tta"] is False and m["age_interval"] is not None
    assert json.loads((out / "metrics.json").read_text()) == m
    report = (out / "report.md").read_text()
    expected = (
        "gender accuracy",
        "Confusion matrix",
        "Fairness by race",
        "60+",
        "90+",
        "calibration",
        "Age uncertainty",
        "(reliability.png)",
        "(confusion.png)",
    )
    for text in expected:
        assert text in report, text
    assert all((out / p).stat().st_size > 0 for p in PLOTS)
    rows = _read_predictions(out)
    assert len(rows) == n_test and "age_std" in rows[0]
    mae = np.mean([abs(float(r["age_pred"]) - int(r["age_true"])) for r in rows])
    assert mae == pytest.approx(m["age_mae"], abs=1e-3)


def test_evaluate_torch_backend_agrees_with_onnx(ckpt, cache64, tmp_path):
    # the default runs the model's ONNX file (what users run), exported once beside it
    onnx = evaluate(ckpt, cache64, out_dir=tmp_path / "o", timing=False, quiet=True)
    assert onnx["runtime"] == "ONNX Runtime model.onnx" and ckpt.with_suffix(".onnx").is_file()
    opts = InferenceOptions(model=str(ckpt), backend="torch", device="cpu", amp="off")
    torch_m = evaluate(opts, cache64, out_dir=tmp_path / "t", timing=False, quiet=True)
    assert torch_m["runtime"] == "torch" and torch_m["amp"] is False
    assert torch_m["n"] == onnx["n"] and torch_m["checkpoint"] == onnx["checkpoint"]
    assert torch_m["age_mae"] == pytest.approx(onnx["age_mae"], abs=1e-3)
    assert torch_m["gender_accuracy"] == pytest.approx(onnx["gender_accuracy"], abs=0.01)


def test_evaluate_run_folder_uses_its_cache_and_recipe(synthetic_cache, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _checkpoint(run / "best.safetensors", config={"train": {"tta": True}})
    cfg = load_config(None, [f"data.cache={synthetic_cache}", "data.size=64"])
    (run / "config.toml").write_text(to_toml(cfg))
    # the cache holds 32 px images: they are resized to the model's 64 px, as training does
    opts = InferenceOptions(model=str(run), threads=1)
    m = evaluate(opts, out_dir=tmp_path / "eval", batch_size=8, timing_reps=2)
    assert m["n"] == len(open_cache(synthetic_cache).indices("test"))
    assert m["tta"] is True and m["checkpoint"].endswith("best.safetensors")
    t = m["timing"]
    assert t["batch_size"] == 8 and t["batch1_calls"] == 2 and t["threads"] == 1
    assert t["batch1_ms_per_image"] > 0 and t["batch_ms_per_image"] > 0 and t["device"]
    assert "## Speed" in (tmp_path / "eval" / "report.md").read_text()


def test_evaluate_plain_folder_uses_every_image(ckpt, synthetic_dir, tmp_path):
    out = tmp_path / "eval"
    m = evaluate(ckpt, synthetic_dir, out_dir=out, timing=False, quiet=True)
    assert m["n"] == 120 and m["split"] == "all"
    assert len(_read_predictions(out)) == 120
    assert all((out / p).is_file() for p in PLOTS)


def test_folder_files_left_out_are_reported(ckpt, synthetic_dir, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for src in sorted(synthetic_dir.iterdir())[:10]:
        shutil.copy(src, folder / src.name)
    shutil.copy(src, folder / "holiday.jpg")  # no labels in the name
    (folder / "39_1_20170101.jpg").write_bytes(src.read_bytes())  # a field missing
    (folder / "40_0_1_20170116000000010.jpg.chip.jpg").write_text("not a JPEG")
    out = tmp_path / "eval"
    m = evaluate(ckpt, folder, out_dir=out, timing=False, quiet=True)
    assert m["n"] == 10
    assert m["skipped"]["n"] == 3 and m["skipped"]["of"] == 13
    assert m["skipped"]["by_reason"] == {"unparsable": 2, "unreadable": 1}
    assert len(m["skipped"]["examples"]) == 3
    err = capsys.readouterr().err
    assert f"skipped 3 of 13 image files in {folder} (2 unparsable, 1 unreadable)" in err
    assert "holiday.jpg" in err
    assert "Skipped 3 of the folder's 13 image files" in (out / "report.md").read_text()
    assert json.loads((out / "metrics.json").read_text())["skipped"] == m["skipped"]
    show(ckpt, folder, tmp_path / "g.png", n=4)
    assert "skipped 3 of 13" in capsys.readouterr().err
    # nothing left out: null, as for a cache (which reported its own when prepared)
    assert evaluate(ckpt, synthetic_dir, out_dir=out, timing=False)["skipped"] is None


def test_show_writes_png(ckpt, cache64, tmp_path):
    path = show(ckpt, cache64, tmp_path / "sub" / "grid.png", n=7)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_show_out_is_the_file_written(ckpt, cache64, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    cases = {"s3": "s3.png", "folder": "folder/grid.png", "new/": "new/grid.png", "s.pdf": "s.pdf"}
    for out, written in cases.items():
        argv = ["show", str(ckpt), "--data", str(cache64), "--n", "2", "--device", "cpu"]
        assert main([*argv, "--out", f"{tmp_path}/{out}"]) == 0
        assert capsys.readouterr().out == f"wrote {tmp_path / written}\n"
        assert (tmp_path / written).stat().st_size > 0
    assert not (tmp_path / "folder.png").exists()
    with pytest.raises(DataError, match=r"cannot write \.txt files; .*\.jpg, .*\.png, .*\.svg"):
        show("no/such/model", cache64, tmp_path / "s2.txt")  # refused before any loading


# --------------------------------------------------------------------------- errors and CLI


def test_errors(ckpt, cache64, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AgeGenderError, match="no such model"):
        evaluate(tmp_path / "nope.safetensors", cache64, out_dir=tmp_path / "e")
    with pytest.raises(AgeGenderError, match=r"without best\.safetensors"):
        evaluate(tmp_path / "empty", cache64, out_dir=tmp_path / "e")
    with pytest.raises(DataError, match="no such data"):
        evaluate(ckpt, tmp_path / "missing", out_dir=tmp_path / "e")
    with pytest.raises(DataError, match=r"no image files \(\.jpg"):
        evaluate(ckpt, tmp_path / "empty", out_dir=tmp_path / "e")
    with pytest.raises(DataError, match="give --data"):
        evaluate(ckpt, out_dir=tmp_path / "e")
    rgb = _checkpoint(tmp_path / "rgb.safetensors", in_chans=3)
    with pytest.raises(DataError, match="expects rgb images"):
        show(rgb, cache64, tmp_path / "g.png")
    with pytest.raises(DataError, match="timing reps must be >= 1"):
        evaluate(ckpt, cache64, out_dir=tmp_path / "e", timing_reps=0)
    assert not (tmp_path / "e").exists()
    run = tmp_path / "run"  # a training run's metrics.json is not the evaluation's to replace
    run.mkdir()
    (run / "best.safetensors").write_bytes(b"")
    (run / "metrics.json").write_text("{}")
    with pytest.raises(DataError, match=r"is a training run folder.*--out .*run/eval"):
        evaluate(ckpt, cache64, out_dir=run)
    assert (run / "metrics.json").read_text() == "{}"


def test_cli_evaluate_and_show(ckpt, cache64, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = [
        "evaluate",
        str(ckpt),
        "--data",
        str(cache64),
        "--out",
        str(out),
        "--no-timing",
        "--device",
        "cpu",
        "--batch-size",
        "16",
        "--no-tta",
        "--quiet",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "gender accuracy" in printed and str(out / "report.md") in printed
    assert (
        main(
            [
                "show",
                str(ckpt),
                "--data",
                str(cache64),
                "--out",
                str(tmp_path / "g.png"),
                "--n",
                "5",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (tmp_path / "g.png").is_file()


@pytest.mark.parametrize(
    ("model", "data", "message"),
    [
        ("{tmp}/no/model", "{cache}", "no such model"),
        ("{ckpt}", "{tmp}/no/data", "no such data"),
        ("{ckpt}", "{tmp}/empty", "no image files (.jpg, .jpeg, .png"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(ckpt, cache64, tmp_path, capsys, model, data, message):
    (tmp_path / "empty").mkdir()
    fill = {"tmp": tmp_path, "ckpt": ckpt, "cache": cache64}
    argv = [
        "evaluate",
        model.format(**fill),
        "--data",
        data.format(**fill),
        "--out",
        str(tmp_path / "e"),
        "--no-timing",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_copied_checkpoint_without_sidecar_still_loads(ckpt, cache64, tmp_path):
    # the weights file alone carries its description (safetensors header)
    lone = tmp_path / "lone.safetensors"
    shutil.copy(ckpt, lone)
    m = evaluate(lone, cache64, split="val", out_dir=tmp_path / "e", timing=False, quiet=True)
    assert m["split"] == "val" and m["n"] == len(open_cache(cache64).indices("val"))


def test_worst_groups_name_the_worst_race_and_age_band():
    n = 400
    race = np.repeat(np.arange(5), 80)  # 80 faces a race group
    age = np.tile([5, 15, 30, 50, 70], 80)  # 80 an age band
    gender = np.arange(n) % 2
    p_female = np.where(gender == 1, 0.9, 0.1)
    wrong = (race == 4) & (np.arange(n) % 4 < 2)  # half of "Others" (40 faces) misjudged
    p_female[wrong] = 1 - p_female[wrong]
    age_pred = age + np.where(age == 70, 10.0, 1.0)  # the 60+ band 10 years off, the rest 1
    m = compute_metrics(age, gender, race, age_pred, p_female)
    race_acc = m["worst_groups"]["race"]["gender_accuracy"]
    assert race_acc["group"] == "Others" and race_acc["n"] == 80
    assert race_acc["value"] == 0.5 and race_acc["gap"] == pytest.approx(0.5 - 0.9)
    band_mae = m["worst_groups"]["age"]["age_mae"]
    assert band_mae["group"] == "60+" and band_mae["value"] == 10.0
    assert band_mae["gap"] == pytest.approx(10.0 - (4 * 1 + 10) / 5)
    # a group under 30 images is never named
    small = compute_metrics(age[:25], gender[:25], race[:25], age_pred[:25], p_female[:25])
    assert small["worst_groups"]["race"]["gender_accuracy"] is None


# --------------------------------------------------------------------------- reliability


def test_timing_reps_are_bounded(ckpt, cache64, tmp_path, capsys):
    from agegender.evaluation.evaluate import MAX_TIMING_REPS

    with pytest.raises(DataError, match="timing reps must be at most 10,000, got 10,001"):
        evaluate(ckpt, cache64, out_dir=tmp_path / "e", timing_reps=MAX_TIMING_REPS + 1)
    argv = ["evaluate", str(ckpt), "--data", str(cache64), "--out", str(tmp_path / "e")]
    assert main([*argv, "--timing-reps", "1000000", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "at most 10,000" in err and err.count("\n") == 1
    assert not (tmp_path / "e").exists()


def test_a_failed_report_leaves_nothing_partial(ckpt, cache64, tmp_path, monkeypatch):
    import errno

    from agegender.evaluation import report

    out = tmp_path / "e"
    evaluate(ckpt, cache64, out_dir=out, timing=False, quiet=True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "render", full)  # after predictions.csv and the plots
    with pytest.raises(DataError, match="no space left on the device; nothing written"):
        evaluate(ckpt, cache64, out_dir=out, timing=False, quiet=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old report, whole
    with pytest.raises(DataError, match="nothing written"):
        evaluate(ckpt, cache64, out_dir=tmp_path / "new", timing=False, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]  # no new folder, no temporary


def test_compare_says_what_it_left_out_once(ckpt, cache64, tmp_path, monkeypatch, capsys):
    from agegender.evaluation import evaluate as ev

    class Seen:  # a record of having trained on the first three images
        def seen(self, hashes, faces):
            return np.arange(len(hashes)) < 3

    monkeypatch.setattr(ev, "_seen_record", lambda path: Seen())
    other = _checkpoint(tmp_path / "other.safetensors")
    ev.compare(ckpt, other, tmp_path / "cmp", data=cache64, timing=False, quiet=True)
    assert capsys.readouterr().err.count("left out 3 of") == 1
    evaluate(ckpt, cache64, out_dir=tmp_path / "e", timing=False, quiet=True)
    assert capsys.readouterr().err.count("left out 3 of") == 1  # outside compare, as before


def test_report_cells_stay_in_their_cells_and_predictions_are_quoted(tmp_path):
    from types import SimpleNamespace

    from agegender.evaluation import report

    lines = report.table(["camera", "n"], [["a|b\nc <script>", 1]])
    assert lines[3] == "| a\\|b c &lt;script> | 1 |"
    d = SimpleNamespace(
        paths=['=HYPERLINK("http://x").png', "-x.png", "ok.png"],
        ages=np.array([30, 40, 50]),
        genders=np.array([0, 1, -1]),
        races=np.array([0, -1, 2]),
    )
    pred = {"age": np.array([31.0, 39.0, 52.0]), "p_female": np.array([0.1, 0.9, 0.5])}
    report.write_predictions(tmp_path / "p.csv", d, pred)
    with (tmp_path / "p.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert [r[0] for r in rows[1:]] == ['\'=HYPERLINK("http://x").png', "'-x.png", "ok.png"]
    m = {"by_race": {}, "by_group": {"cam|era": {"x\ny": {"n": 1, "gender_accuracy": None,
                                                          "age_mae": None}}}}  # fmt: skip
    text = "\n".join(report._group_lines(m))
    assert "## By cam\\|era" in text and "| x y |" in text
