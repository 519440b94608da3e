"""tools/make_report.py turns the runs' JSON into the tables of reports/README.md."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_report.py"
spec = importlib.util.spec_from_file_location("make_report", TOOL)
make_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_report)


def _row(model: str, batch: int, img_s: float, compile_: bool = False, **kw) -> dict:
    return {"model": model, "batch": batch, "img_per_s": img_s, "compile": compile_,
            "device": "NVIDIA H200", **kw}  # fmt: skip


def test_gpu_section_pivots_throughput_and_reports_checks(tmp_path):
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    (gpu / "train_throughput_before_sync_fix.json").write_text(
        json.dumps([_row("resnet-mt", 512, 20978.8), _row("resnet-mt", 512, 23034.3, True)])
    )
    (gpu / "train_throughput.json").write_text(json.dumps([_row("resnet-mt", 512, 25722.5)]))
    (gpu / "train_throughput_compile.json").write_text(
        json.dumps([_row("resnet-mt", 512, 40353.0, "default")])
    )
    (gpu / "train_throughput_reduce_overhead.json").write_text(
        json.dumps([_row("resnet-mt", 64, 30000.0, "reduce-overhead")])
    )
    (gpu / "train_throughput_cuda_graphs.json").write_text(
        json.dumps([_row("resnet-mt", 512, 33000.0, cuda_graphs=True)])
    )
    check = {
        "device": "NVIDIA H200",
        "torch": "2.11.0",
        "train": {"ok": True},
        "resume": {"ok": False, "error": "AssertionError: differ"},
        "nccl": {"ok": True},
    }
    (gpu / "gpu_check.json").write_text(json.dumps(check))
    text = "\n".join(make_report.gpu_section(gpu))
    assert "| eager | CUDA graphs | compile | reduce-overhead |" in text
    assert "| resnet-mt | 512 | 20,979 | 23,034 | 25,722 | 33,000 | 40,353 | - |" in text
    assert "| resnet-mt | 64 | - | - | - | - | - | 30,000 |" in text  # a mode gets its own column
    assert "train ok; resume FAILED: AssertionError: differ; nccl ok" in text
    cpu_only = tmp_path / "cpu"  # columns nothing filled are left out
    cpu_only.mkdir()
    (cpu_only / "train_throughput.json").write_text(json.dumps([_row("resnet-mt", 32, 150.0)]))
    assert "| model | batch | eager |" in "\n".join(make_report.gpu_section(cpu_only))
    assert "has not run on a GPU yet" in text  # the old resume criterion is explained

    check["resume"] = {"ok": True, "max_abs_diff": 0.1, "unbroken_runs_max_abs_diff": 0.1}
    (gpu / "gpu_check.json").write_text(json.dumps(check))
    assert "has not run on a GPU yet" not in "\n".join(make_report.gpu_section(gpu))


def test_full_runs_section_names_device_and_missing_runs(tmp_path):
    run = tmp_path / "default-train-s42"
    run.mkdir()
    metrics = {
        "best_epoch": 39,
        "epochs_run": 40,
        "train_acc": 0.9606,
        "val_acc": 0.9379,
        "test_acc": 0.93024,
        "test_mae": 4.773,
        "train_seconds": 4338.6,
        "train_img_per_s": 133.9,
        "device": "Intel(R) Xeon(R) Processor",
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    text = "\n".join(make_report.full_runs_section(tmp_path))
    assert "| 39 of 40 | 93.0% / 4.77 | +2.3% | 72 min, 134 img/s (CPU) |" in text
    assert "(not run yet)" in text  # the other recipes' folders are absent


def _retraining(folder: Path, metrics: dict, command: str, wall: str) -> None:
    """A reports/student-* folder as retrain_lines reads it."""
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "command.txt").write_text(command)
    (folder / "time.txt").write_text(f"{wall} s wall\n")


def test_retrain_lines_quote_each_retraining_from_its_files(tmp_path):
    metrics = {"device": "AMD EPYC", "threads": 2, "amp": True, "epochs_run": 75,
               "test_acc": 0.93574, "test_mae": 4.8733}  # fmt: skip
    command = (
        '/usr/bin/time -f "%e s wall" agegender train configs/student.toml \\\n'
        "    run.out=runs/student-epyc\n2973.84 s wall: the whole command\n"
    )
    _retraining(tmp_path / "student-epyc", metrics, command, "2973.84")
    (tmp_path / "student-unfinished").mkdir()  # no time.txt: left out
    (line,) = make_report.retrain_lines(tmp_path)
    assert line.startswith(
        "- `agegender train configs/student.toml run.out=runs/student-epyc`: 50 minutes"
    )
    assert "2-thread AMD EPYC, bf16, 75 epochs: test 93.57% / 4.87" in line


def test_retrain_lines_name_torch_held_to_its_avx2_kernels(tmp_path):
    metrics = {"device": "AMD EPYC", "threads": 2, "amp": False, "epochs_run": 45,
               "test_acc": 0.934, "test_mae": 4.95}  # fmt: skip
    command = (
        '/usr/bin/time -f "%e s wall" env ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 \\\n'
        "    agegender train configs/student.toml train.epochs=45\n"
    )
    _retraining(tmp_path / "student-zen4-avx2", metrics, command, "6000.5")
    (line,) = make_report.retrain_lines(tmp_path)
    assert "1.67 hours" in line
    assert "2-thread AMD EPYC on torch's AVX2 kernels, fp32, 45 epochs" in line
