import os
import subprocess
import sys

import pytest

from agegender.cli.main import main


def test_prepare_and_explore(synthetic_dir, tmp_path, capsys):
    assert (
        main(
            ["prepare", str(synthetic_dir), "--out", str(tmp_path / "c"), "--size", "32", "--quiet"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "kept images" in out and "120" in out
    assert main(["explore", str(tmp_path / "c"), "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "grid.png").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prepare", "/no/such/folder", "--out", "{tmp}/c"], "no such file or directory"),
        (["prepare", "{tmp}/empty", "--out", "{tmp}/c"], "no image files (.jpg, .jpeg, .png"),
        (["prepare", "{tmp}/IMG_0001.jpg", "--out", "{tmp}/c"], "has a UTKFace name"),
        (["explore", "{tmp}/empty", "--out", "{tmp}/e"], "not a prepared cache"),
        (["explore", "/no/such/cache", "--out", "{tmp}/e"], "no such cache directory"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "IMG_0001.jpg").write_bytes(b"")  # an ordinary photo name: no labels
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_unusable_output_path_is_one_line_and_exit_2(synthetic_dir, tmp_path, capsys):
    """An output path the system refuses (here a file where a folder must go) is the user's to
    fix; an OSError that names no path is a bug and keeps its traceback."""
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "cache"
    assert main(["prepare", str(synthetic_dir), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("agegender prepare: error: Not a directory: ") and err.count("\n") == 1
    assert str(tmp_path / "afile") in err

    def broken(cache_dir, out_dir, seed=0):
        raise OSError("no path here")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("agegender.evaluation.explore.explore", broken)
        with pytest.raises(OSError, match="no path here"):
            main(["explore", str(tmp_path), "--out", str(tmp_path / "e")])


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["summary", "seed-cnn", "--size", "100000"], "--size: must be 32-1024, got 100000"),
        (["demo", "--synthetic", "--n", "0"], "--n: must be 10-100000, got 0"),
        (["demo", "--synthetic", "--n", "many"], "--n: 'many' is not an integer"),
    ],
)
def test_numbers_out_of_range_are_usage_errors(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["prepare", "data", "--out", "c"],
        ["explore", "c", "--out", "e"],
        ["show", "default", "--out", "g.png"],
    ],
)
@pytest.mark.parametrize(
    ("seed", "says"), [("-1", "must be >= 0, got -1"), ("x", "'x' is not an integer")]
)
def test_seed_must_be_a_whole_number_from_0(capsys, argv, seed, says):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--seed", seed])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --seed: {says}" in err and "Traceback" not in err


def test_damaged_cache_is_one_line_then_repaired(synthetic_dir, tmp_path, capsys):
    cache, plots = str(tmp_path / "c"), str(tmp_path / "e")
    prepare = ["prepare", str(synthetic_dir), "--out", cache, "--size", "32", "--quiet"]
    assert main(prepare) == 0
    os.truncate(tmp_path / "c" / "images.npy", 1000)
    capsys.readouterr()
    assert main(["explore", cache, "--out", plots]) == 2
    err = capsys.readouterr().err
    assert "is damaged" in err and err.count("\n") == 1 and "Traceback" not in err
    assert main(prepare) == 0  # rebuilds rather than crashing on the damaged images
    assert main(["explore", cache, "--out", plots]) == 0


def test_console_script_exit_codes(tmp_path):
    """The installed command, as users run it: exit 2 and one line, no traceback."""
    run = [sys.executable, "-m", "agegender"]
    bad = subprocess.run(
        [*run, "prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "c")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    unknown = subprocess.run([*run, "prepare", "--bogus"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    helptext = subprocess.run([*run, "prepare", "--help"], capture_output=True, text=True).stdout
    assert "(default: 128)" in helptext and "(default: gray)" in helptext


def test_demo(tmp_path, capsys):
    assert main(["demo", "--synthetic", "--out", str(tmp_path), "--n", "40"]) == 0
    assert "kept images" in capsys.readouterr().out
    assert (tmp_path / "explore" / "age_distribution.png").exists()
