"""DistributedDataParallel under torchrun: two CPU processes (gloo) on real faces."""

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import ARTEFACTS, SMOKE

from agegender.inference.model_files import SEEN_HASHES, SEEN_SIGNATURES


@pytest.fixture(scope="module")
def faces(utkface_dir, tmp_path_factory):
    """400 real faces (every 50th file): 128 to train on, and val and test splits of 40 and 80."""
    out = tmp_path_factory.mktemp("faces")
    for p in sorted(utkface_dir.iterdir())[::50][:400]:
        shutil.copy(p, out / p.name)
    return out


def _torchrun(*args: str, script: Path | None = None, ok: bool = True) -> str:
    """``torchrun --nproc_per_node=2 -m agegender train ARGS`` (or ``SCRIPT train ARGS``);
    returns the workers' stdout, or their stderr when ``ok`` is False and they failed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(script)] if script else ["-m", "agegender"]
    r = subprocess.run(
        [*cmd, "train", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert (r.returncode == 0) == ok, f"{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r.stdout if ok else r.stderr


def _sha256(checkpoint: Path) -> str:
    """What train's rank check hashes: every weight's bytes, in key order (not the record of
    the training images the checkpoint also keeps)."""
    h = hashlib.sha256()
    tensors = load_file(str(checkpoint))
    for k, v in sorted(
        (k, v) for k, v in tensors.items() if k not in (SEEN_HASHES, SEEN_SIGNATURES)
    ):
        h.update(k.encode())
        h.update(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _epochs(run: Path) -> list[str]:
    with (run / "history.csv").open() as f:
        return [r["epoch"] for r in csv.DictReader(f)]


@pytest.mark.slow
def test_two_processes_train_one_model_and_resume_exactly(faces, tmp_path):
    common = ["data.limit=128", "train.threads=1", "train.scheduler=plateau", "train.tta=false"]
    run = tmp_path / "run"
    stdout = _torchrun(
        str(SMOKE),
        f"data.root={faces}",
        f"data.cache={tmp_path / 'cache'}",  # prepared by rank 0 while rank 1 waits
        f"run.out={run}",
        "train.epochs=2",
        *common,
    )
    assert {p.name for p in run.iterdir()} >= ARTEFACTS
    assert _epochs(run) == ["1", "2"]  # one writer: one row per epoch
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["train_images"] == 128
    assert 0 <= metrics["test_acc"] <= 1 and metrics["test_mae"] > 0
    # Every rank hashed its final weights and checked the others hold the same; what rank 0
    # saved is those weights. Only rank 0 speaks.
    digest = metrics["last_sha256"]
    assert _sha256(run / "last.safetensors") == digest
    assert stdout.count(f"all 2 processes hold the same weights (sha256 {digest[:16]})") == 1
    assert stdout.count("epoch   1/2") == 1

    # Resume: both ranks read the state rank 0 wrote and go on to a third epoch ...
    config = run / "config.toml"
    config.write_text(config.read_text().replace("epochs = 2", "epochs = 3"))
    _torchrun("--resume", str(run), "--quiet")
    assert _epochs(run) == ["1", "2", "3"]
    # ... exactly where an unbroken three-epoch run is
    unbroken = tmp_path / "unbroken"
    _torchrun(
        str(SMOKE),
        f"data.cache={tmp_path / 'cache'}",
        f"run.out={unbroken}",
        "train.epochs=3",
        "--quiet",
        *common,
    )
    assert _sha256(unbroken / "last.safetensors") == _sha256(run / "last.safetensors")


# DDP swapped for a wrapper that averages nothing: each rank learns from its own shard alone
NO_SYNC = """
import sys
from torch import nn
import agegender.training.train
from agegender.cli.main import main

class NoSync(nn.Module):
    def __init__(self, module, **kwargs):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)

agegender.training.train.DistributedDataParallel = NoSync
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ranks_that_drift_apart_fail_the_run(faces, tmp_path):
    script = tmp_path / "no_sync.py"
    script.write_text(NO_SYNC)
    args = [str(SMOKE), f"data.root={faces}", f"run.out={tmp_path / 'run'}", "data.limit=128"]
    err = _torchrun(*args, "train.threads=1", "--quiet", script=script, ok=False)
    assert "ranks disagree after training" in err


@pytest.mark.slow
def test_global_batch_must_divide_between_processes(tmp_path):
    err = _torchrun(str(SMOKE), "train.batch_size=33", f"run.out={tmp_path / 'run'}", ok=False)
    assert "train.batch_size=33 is the global batch" in err
