import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from agegender.cli.main import main
from agegender.core.config import load_config
from agegender.core.errors import ConfigError
from agegender.data.synthetic import make_dataset
from agegender.inference.predictor import Predictor
from agegender.inference.runtime import default_threads
from agegender.training import distributed
from agegender.training import train as train_mod
from agegender.training.augment import augment
from agegender.training.checkpoint import load_checkpoint
from agegender.training.losses import UncertaintyWeights
from agegender.training.models import from_config
from agegender.training.step import TrainForward, graph_train_forward
from agegender.training.torch_backend import predict_arrays
from agegender.training.train import train

SMOKE = Path(__file__).parents[1] / "configs" / "smoke.toml"
ARTEFACTS = {
    "config.toml",
    "history.csv",
    "best.safetensors",
    "best.json",
    "last.safetensors",
    "last.json",
    "last.state.pt",
    "curves.png",
    "metrics.json",
}


def _smoke(cache, out, *extra):
    overrides = [f"data.cache={cache}", f"run.out={out}", "train.threads=2", *extra]
    return load_config(SMOKE, overrides)


@pytest.mark.slow
def test_smoke_run_writes_every_artefact(cache64, tmp_path):
    out = train(_smoke(cache64, tmp_path / "run"), quiet=True)
    assert {p.name for p in out.iterdir()} >= ARTEFACTS
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert len(rows) == 1
    assert set(rows[0]) >= {"train_loss", "val_loss", "val_acc", "val_mae", "lr", "seconds"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["test_acc"] <= 1 and metrics["test_mae"] > 0
    assert metrics["train_img_per_s"] > 0
    # the checkpoint rebuilds its model alone, with its preprocessing
    model, meta = load_checkpoint(out / "best.safetensors")
    assert meta["model"]["name"] == "resnet-mt-small"
    assert meta["data_config"]["input_size"] == [1, 64, 64]
    out2 = model(torch.zeros(2, 1, 64, 64))
    assert out2["age"].shape == (2,)
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # the run's ONNX file, newer than the weights: the run folder predicts without torch
    assert (out / "best.onnx").stat().st_mtime >= (out / "best.safetensors").stat().st_mtime
    predictor = Predictor.load(out, detector=None, precision="fp32")
    assert predictor.backend.path == out / "best.onnx"
    faces = np.full((2, 64, 64, 1), 128, np.uint8)
    expected = predict_arrays(model, faces, tta=predictor.tta)
    got = predictor.backend(faces, predictor.tta)
    np.testing.assert_allclose(got["age"], expected["age"], atol=1e-3)


@pytest.mark.slow
def test_resume_continues_a_killed_run_exactly(cache64, tmp_path, monkeypatch):
    cfg = _smoke(
        cache64,
        tmp_path / "full",
        "train.epochs=2",
        "data.limit=256",
        "train.amp=off",
        "train.tta=false",
    )
    full = train(cfg, quiet=True)

    killed = tmp_path / "killed"
    calls = {"n": 0}
    real_validate = train_mod.validate

    def validate_then_die(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # during epoch 2, after epoch 1 was saved
            raise KeyboardInterrupt
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(train_mod, "validate", validate_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(
            cfg.__class__(**{**cfg.__dict__, "run": cfg.run.__class__(out=str(killed))}), quiet=True
        )
    monkeypatch.setattr(train_mod, "validate", real_validate)
    assert len(list(csv.DictReader((killed / "history.csv").open()))) == 1
    assert main(["train", "--resume", str(killed), "--quiet"]) == 0
    rows = list(csv.DictReader((killed / "history.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    # images/second of the resumed process is its own epoch's, not its images over all epochs'
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["train_img_per_s"] == pytest.approx(float(rows[1]["img_per_s"]), rel=0.02)
    a, b = load_file(str(full / "last.safetensors")), load_file(str(killed / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from an unbroken run"


@pytest.mark.slow
def test_compiled_training_matches_eager(cache64, tmp_path):
    """train.compile=true trains the same model as eager (to float rounding) and saves the
    plain model's weights, which load without torch.compile's wrapper."""
    common = ["data.limit=256", "train.amp=off", "train.tta=false"]
    eager = train(_smoke(cache64, tmp_path / "eager", *common), quiet=True)
    compiled = train(
        _smoke(cache64, tmp_path / "compiled", *common, "train.compile=true"), quiet=True
    )
    a, b = load_file(str(eager / "last.safetensors")), load_file(str(compiled / "last.safetensors"))
    assert a.keys() == b.keys()
    (ra,), (rb,) = (list(csv.DictReader((r / "history.csv").open())) for r in (eager, compiled))
    for key in ("train_loss", "val_loss", "val_mae"):
        assert float(rb[key]) == pytest.approx(float(ra[key]), rel=0.005), key
    model, _ = load_checkpoint(compiled / "best.safetensors")
    assert model(torch.zeros(1, 1, 64, 64))["age"].shape == (1,)
    with pytest.raises(ConfigError, match=r"train\.compile_mode must be one of"):
        train(_smoke(cache64, tmp_path / "bad", "train.compile_mode=fast"), quiet=True)


def test_cuda_graphs_refused_where_they_cannot_run(tmp_path, monkeypatch):
    """train.cuda_graphs captures one GPU's eager step: on a CPU, with torch.compile or under
    torchrun it is a clear ConfigError before any data is read."""
    missing = tmp_path / "no-cache"
    for extra, env, says in (
        ([], "1", "device cpu, compile false, 1 processes"),
        (["train.compile=true"], "1", "compile true"),
        ([], "2", "2 processes"),
    ):
        monkeypatch.setenv("WORLD_SIZE", env)
        cfg = _smoke(
            missing, tmp_path / "run", "train.cuda_graphs=true", "train.device=cpu", *extra
        )
        with pytest.raises(ConfigError, match=r"train\.cuda_graphs needs one CUDA GPU") as e:
            train(cfg, quiet=True)
        assert says in str(e.value)
    assert not (tmp_path / "run").exists()


def test_graph_train_forward_captures_on_copies_and_puts_batchnorm_back(monkeypatch):
    """What graph_train_forward adds around torch.cuda.make_graphed_callables (CUDA only, so
    stood in for here by its warm-up steps): the graphs read copies of the sample, never the
    training set itself (each call copies its batch into them), and the warm-up's BatchNorm
    statistics are put back."""
    seen = {}

    def warm_up_only(module, sample, allow_unused_input):
        seen["sample"] = sample
        for _ in range(3):
            module(*sample)[0].backward()
        return module

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", warm_up_only)
    cfg = load_config(SMOKE, ["data.size=64"])
    model = from_config(cfg.model, 64, "gray")
    forward = TrainForward(cfg, model, None, amp=False)
    gen = torch.Generator().manual_seed(0)
    faces = torch.randint(0, 256, (8, 1, 64, 64), dtype=torch.uint8, generator=gen)
    batch = (faces, torch.rand(8, 7, generator=gen), torch.full((8,), 30.0), torch.ones(8))
    before = {k: v.clone() for k, v in model.named_buffers()}
    assert graph_train_forward(forward, batch) is forward
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers())
    assert before["stem.bn.num_batches_tracked"] == 0
    for copy, original in zip(seen["sample"], batch, strict=True):
        assert torch.equal(copy, original) and copy.data_ptr() != original.data_ptr()


def test_train_forward_fits_make_graphed_callables_contract(monkeypatch):
    """torch.cuda.make_graphed_callables' own checks and autograd wiring, run on the CPU with
    the CUDA pieces stubbed (a capture runs its body once, a replay does nothing): no hooks, no
    buffer that wants a gradient, tensors in and out, and a backward that reaches every
    parameter of the model and of the learnt loss weights."""
    import contextlib

    import torch.cuda.graphs as graphs

    class Graph:
        def replay(self):
            pass

    @contextlib.contextmanager
    def capture(graph, pool=None, **kw):
        yield

    for module in (torch.cuda, graphs):
        monkeypatch.setattr(module, "CUDAGraph", Graph)
        monkeypatch.setattr(module, "graph", capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(graphs, "graph_pool_handle", lambda: None)

    cfg = load_config(SMOKE, ["data.size=64", "loss.uncertainty=true"])
    model = from_config(cfg.model, 64, "gray")
    weights = UncertaintyWeights()
    forward = TrainForward(cfg, model, weights, amp=True)
    gen = torch.Generator().manual_seed(0)
    faces = torch.randint(0, 256, (8, 1, 64, 64), dtype=torch.uint8, generator=gen)
    batch = (faces, torch.rand(8, 7, generator=gen), torch.full((8,), 30.0), torch.ones(8))
    graphed = graph_train_forward(forward, batch)
    loss, mae, correct = graphed(*batch)
    assert loss.requires_grad and mae.shape == correct.shape == ()
    loss.backward()
    params = [*model.parameters(), *weights.parameters()]
    assert all(p.grad is not None and p.grad.shape == p.shape for p in params)


def test_overfits_32_synthetic_faces(tmp_path):
    """The study's network must drive the training loss down on a tiny set it can memorise."""
    make_dataset(tmp_path / "faces", n=48, size=64, seed=3)
    cfg = load_config(
        Path(__file__).parents[1] / "configs" / "seed.toml",
        [
            f"data.root={tmp_path / 'faces'}",
            "data.size=64",
            f"run.out={tmp_path / 'run'}",
            "data.limit=32",
            "train.epochs=25",
            "train.batch_size=8",
            "train.threads=2",
            # fp32: bf16's rounding (amp=auto where the CPU has it) moves this tiny run's loss
            # by CPU: 0.34 of the first epoch's on a Zen 5 EPYC, under 0.3 on the AMX Xeon
            "train.amp=off",
        ],
    )
    out = train(cfg, quiet=True)
    rows = list(csv.DictReader((out / "history.csv").open()))
    first, last = float(rows[0]["train_loss"]), float(rows[-1]["train_loss"])
    assert last < 0.3 * first, (first, last)
    assert float(rows[-1]["train_mae"]) < 0.4 * float(rows[0]["train_mae"])


def test_train_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"set data\.cache"):
        train(load_config(None, [f"run.out={tmp_path}"]), quiet=True)
    assert main(["train", str(SMOKE), "train.epoch=1"]) == 2
    assert "did you mean train.epochs" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["train", str(SMOKE), f"data.cache={tmp_path}"]) == 2
    assert "not a prepared cache" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("data.size=0", "data.size must be 16-1024"),
        ("train.threads=-1", "train.threads must be 0-1024"),
        ("train.eval_batch_size=0", "train.eval_batch_size must be 1-65536"),
        ("model.dropout=5", "model.dropout must be below 1"),
        ("train.seed=-1", "train.seed must be >= 0"),
        ("model.name=nosuch", "unknown model.name 'nosuch'"),
    ],
)
def test_values_no_run_can_use_fail_before_anything_is_written(tmp_path, override, says):
    base = [f"data.cache={tmp_path / 'nope'}", f"run.out={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match=says):
        train(load_config(SMOKE, [*base, override]), quiet=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".hidden", ""])
def test_run_name_is_one_folder_under_runs(tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)
    argv = ["train", str(SMOKE), f"data.cache={tmp_path / 'nope'}", f"run.name={name}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "must be a plain name" in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())  # nothing written, inside runs/ or out of it


def test_threads_capped_at_the_cores_available(capsys, monkeypatch):
    cores = default_threads()
    assert distributed.process_threads(0, 1, quiet=False) == cores
    assert distributed.process_threads(cores + 7, 1, quiet=False) == cores
    assert f"train.threads={cores + 7} lowered to {cores}" in capsys.readouterr().err
    assert distributed.process_threads(1, 1, quiet=False) == 1 and not capsys.readouterr().err
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes share the cores
    assert distributed.process_threads(0, 2, quiet=True) == max(cores // 2, 1)


def test_recipe_that_is_not_text_is_a_config_error(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_bytes("[train]\nepochs = 1\n".encode("utf-16"))
    assert main(["train", str(recipe)]) == 2
    assert "not a TOML recipe (TOML is UTF-8 text)" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_is_never_overwritten_and_a_damaged_one_not_resumed(cache64, tmp_path, capsys):
    run = train(_smoke(cache64, tmp_path / "run", "data.limit=128"), quiet=True)
    before = (run / "best.safetensors").read_bytes()
    again = _smoke(cache64, run, "data.limit=128", "train.seed=5")
    with pytest.raises(ConfigError, match=r"already holds a run .*--resume"):
        train(again, quiet=True)
    assert (run / "best.safetensors").read_bytes() == before
    state = run / "last.state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # cut short, as by a full disk
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "its last checkpoint is damaged" in err and err.count("\n") == 1


def test_summary_prints_keras_total(capsys):
    assert main(["summary", "seed-cnn"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-3] == "Total params: 5,107,458"


def test_color_mismatch_is_explained(synthetic_cache, tmp_path):
    cfg = load_config(
        SMOKE, [f"data.cache={synthetic_cache}", "data.color=rgb", f"run.out={tmp_path}"]
    )
    with pytest.raises(ConfigError, match="holds gray images"):
        train(cfg, quiet=True)


def test_rgb_run_from_folder(tmp_path):
    shutil.rmtree(tmp_path, ignore_errors=True)
    make_dataset(tmp_path / "faces", n=40, size=64, seed=5)
    cfg = load_config(
        SMOKE,
        [
            f"data.root={tmp_path / 'faces'}",
            "data.color=rgb",
            f"run.out={tmp_path / 'run'}",
            "train.threads=2",
        ],
    )
    out = train(cfg, quiet=True)
    _, meta = load_checkpoint(out / "best.safetensors")
    assert meta["data_config"]["color"] == "rgb" and (out / "cache" / "images.npy").exists()


def _aug(**kw):
    from agegender.core.config import AugConfig

    zero = dict(rotate=0.0, flip=False, brightness=0.0, contrast=0.0, scale=0.0, shift=0.0)
    return AugConfig(**{**zero, **kw})


def test_augment_parameters_do_what_they_say():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 16, 16, generator=gen) - 0.5
    same = augment(x, _aug(), gen)
    assert same.shape == x.shape and same.dtype == x.dtype
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)  # nothing asked, nothing changed

    flipped = augment(x, _aug(flip=True), gen)
    mirror = [torch.allclose(f, m, atol=1e-5) for f, m in zip(flipped, x.flip(-1))]
    kept = [torch.allclose(f, o, atol=1e-5) for f, o in zip(flipped, x)]
    assert all(a or b for a, b in zip(mirror, kept)) and 10 < sum(mirror) < 54

    shifted = augment(x, _aug(brightness=0.2), gen) - x  # 0.2 of the 2-wide range
    per_image = shifted.mean(dim=(1, 2, 3))
    torch.testing.assert_close(shifted, per_image.view(-1, 1, 1, 1).expand_as(x), atol=1e-5, rtol=0)
    assert per_image.abs().max() <= 0.4 + 1e-6 and per_image.min() < -0.1 < 0.1 < per_image.max()

    stretched = augment(x, _aug(contrast=0.5), gen)  # the mean stays, the spread scales
    torch.testing.assert_close(
        stretched.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-5, rtol=0
    )
    ratio = stretched.std(dim=(1, 2, 3)) / x.std(dim=(1, 2, 3))
    assert ratio.min() >= 0.5 - 1e-4 and ratio.max() <= 1.5 + 1e-4 and ratio.std() > 0.1

    # rotation and zoom turn and scale a ramp's gradient (measured away from the borders)
    ramp = torch.linspace(-0.5, 0.5, 32).expand(64, 1, 32, 32)
    warped = augment(ramp, _aug(rotate=20.0, scale=0.1), gen)[..., 8:24, 8:24]
    gx = (warped[..., :, 2:] - warped[..., :, :-2]).mean(dim=(1, 2, 3))
    gy = (warped[..., 2:, :] - warped[..., :-2, :]).mean(dim=(1, 2, 3))
    angle = torch.rad2deg(torch.atan2(gy, gx))
    assert angle.abs().max() <= 20.5 and angle.min() < -8 and angle.max() > 8
    gain = torch.hypot(gx, gy) / (2 / 31)  # the ramp's own step over two pixels
    assert gain.min() >= 1 / 1.1 - 0.01 and gain.max() <= 1 / 0.9 + 0.01 and gain.std() > 0.02

    # a shift of at most 5 % of the side (32 px, where the ramp climbs 32/31) moves its centre
    moved = augment(ramp, _aug(shift=0.05), gen)[..., 8:24, 8:24].mean(dim=(1, 2, 3))
    assert moved.abs().max() <= 0.05 * 32 / 31 + 1e-4 and moved.abs().max() > 0.04

    everything = load_config(None).aug
    a = augment(x * 3, everything, torch.Generator().manual_seed(1))
    b = augment(x * 3, everything, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.min() >= -1 and a.max() <= 1  # seeded, and clamped
    # the draws passed in (how a training step augments) are the ones it would have drawn
    draws = torch.rand(64, 7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(augment(x * 3, everything, draws=draws), a)
    assert not torch.allclose(a, (x * 3).clamp(-1, 1), atol=1e-2)


def _race_skewed(cache: Path, tmp_path: Path) -> Path:
    """``cache`` where some race is over thrice as common as another (the real UTKFace), else
    a cache of synthetic faces made so: make_dataset draws races evenly, and balancing even
    groups would show nothing."""
    from agegender.data.cache import open_cache
    from agegender.data.prepare import prepare
    from agegender.vision.images import face_config

    counts = np.bincount(open_cache(cache).race)
    if counts.max() > 3 * counts[counts > 0].min():
        return cache
    src = tmp_path / "skewed-faces"
    for k, path in enumerate(make_dataset(src, n=300, size=64, seed=5)):
        if k % 3:  # two thirds White: about 200 of race 0 against about 25 of each other
            age, gender, _, rest = path.name.split("_", 3)
            path.rename(path.with_name(f"{age}_{gender}_0_{rest}"))
    out = tmp_path / "skewed-cache"
    prepare([src], out, face_config(64), quiet=True)
    return out


@pytest.mark.slow
def test_balanced_training_draws_each_race_alike(cache64, tmp_path):
    from agegender.data.cache import open_cache
    from agegender.training.dataset import load_data

    cache64 = _race_skewed(cache64, tmp_path)
    cfg = _smoke(cache64, tmp_path / "run", "data.balance=race", "data.balance_power=1.0")
    whole = _smoke(cache64, tmp_path / "run", "data.balance=race", "data.balance_power=1.0",
                   "data.limit=0")  # fmt: skip
    model = from_config(cfg.model, cfg.data.size, cfg.data.color)
    data = load_data(whole, model.data_config, torch.device("cpu"), tmp_path / "data", quiet=True)
    cache = open_cache(cache64)
    train_rows = np.isin(cache.split, cfg.data.train_splits.split(","))
    race = torch.as_tensor(cache.race[train_rows])
    assert data.weights is not None and len(data.weights) == len(race)
    # power 1: every race group is drawn as often as every other, whatever its size
    share = torch.stack([data.weights[race == r].sum() for r in race.unique()])
    assert torch.allclose(share, share.mean(), rtol=1e-4)
    counts = torch.bincount(race)
    assert counts.max() > 2 * counts[counts > 0].min()  # ... which the data alone would not do
    out = train(cfg, quiet=True)  # and a balanced run trains like any other
    assert json.loads((out / "metrics.json").read_text())["test_mae"] > 0


@pytest.mark.parametrize(
    ("bf16", "capability", "expected"),
    [(True, "AVX512", True), (False, "AVX512", False), (True, "AVX2", False)],
)
def test_amp_auto_needs_native_bf16_on_cpu(monkeypatch, bf16, capability, expected):
    """AVX-512 without AVX512-BF16/AMX (Skylake) emulates bf16, slower than fp32: auto stays
    fp32 there, as on a CPU whose torch kernels are held to AVX2."""
    from agegender.training import torch_backend as torch_runtime

    info = dict(torch_runtime.cpu_info(), bf16=bf16)
    monkeypatch.setattr(torch_runtime, "cpu_info", lambda: info)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert torch_runtime.use_amp(torch.device("cpu"), "auto") is expected
    assert torch_runtime.use_amp(torch.device("cpu"), "off") is False


FINETUNE = Path(__file__).parents[1] / "configs" / "finetune.toml"


@pytest.mark.slow
def test_finetune_scores_test_without_what_its_start_saw_as_evaluate_does(tmp_path, capsys):
    from conftest import make_checkpoint

    from agegender.data.cache import open_cache
    from agegender.data.near_dups import SeenRecord
    from agegender.data.prepare import prepare
    from agegender.evaluation.evaluate import evaluate
    from agegender.training.checkpoint import save_checkpoint
    from agegender.vision.images import face_config

    src, cache = tmp_path / "faces", tmp_path / "cache"
    make_dataset(src, n=300, size=64, seed=11)
    prepare([src], cache, face_config(64), quiet=True, workers=1)
    # a start that "trained on" the first 10 test images of the cache: they must not score it
    opened = open_cache(cache)
    shown = opened.indices("test")[:10]
    start = make_checkpoint(tmp_path / "start" / "best.safetensors", tta=False)
    model, meta = load_checkpoint(start)
    seen = SeenRecord.of([opened.content_hash[i] for i in shown], opened.images[shown])
    save_checkpoint(start, model, {k: meta[k] for k in ("epoch", "metrics", "config")}, seen=seen)
    overrides = [f"data.cache={cache}", f"model.init={start}", f"run.out={tmp_path / 'run'}",
                 "train.epochs=2", "train.threads=2", "train.freeze="]  # fmt: skip
    out = train(load_config(FINETUNE, overrides))
    printed = capsys.readouterr().out
    # the header names the network model.init holds, not the recipe's default model
    assert printed.splitlines()[0].startswith("resnet-mt-small (")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_left_out"] >= 10
    assert f"without {metrics['test_left_out']:,} test images" in printed
    ev = evaluate(out, cache, "test", out_dir=tmp_path / "eval", timing=False, quiet=True)
    assert ev["excluded_seen_in_training"] == metrics["test_left_out"]
    assert ev["n"] == len(opened.indices("test")) - metrics["test_left_out"]
    assert metrics["test_acc"] == pytest.approx(ev["gender_accuracy"], abs=1e-6)
    assert metrics["test_mae"] == pytest.approx(ev["age_mae"], abs=1e-3)


def test_random_erasing_greys_one_rectangle_of_the_asked_share_of_faces():
    from agegender.training.augment import draw_count

    x = torch.full((400, 1, 32, 32), 0.5)
    aug = _aug(erase=0.5)
    assert draw_count(aug) == draw_count(_aug()) + 5
    y = augment(x, aug, torch.Generator().manual_seed(0))
    grey = (y == 0).flatten(1).float().mean(1)  # share of each face erased
    erased = grey > 0
    assert 0.4 < erased.float().mean() < 0.6  # about half the faces
    # each rectangle covers 2-20 % of the face (a few pixels more where it is cut to pixels)
    assert grey[erased].min() >= 0.01 and grey[erased].max() <= 0.26
    assert torch.equal(y[~erased], x[~erased])  # the others are untouched
    # one rectangle: the erased pixels of a face span as many rows and columns as they fill
    k = int(torch.nonzero(erased)[0])
    rows, cols = torch.nonzero(y[k, 0] == 0).unbind(1)
    assert (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) == len(rows)


def test_mixup_blends_the_batch_with_its_neighbour_and_both_labels_count():
    from agegender.training.augment import draw_count, mixup

    aug = _aug(mixup=1.0)
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    gen = torch.Generator().manual_seed(3)
    lams = []
    for _ in range(200):
        y, lam = mixup(x, aug, torch.rand(4, draw_count(aug), generator=gen))
        torch.testing.assert_close(y, lam * x + (1 - lam) * x.roll(1, 0))
        lams.append(lam.item())
    lams = torch.tensor(lams)
    # Beta(1/2, 1/2) folded onto [0.5, 1]: its mean is 0.5 + 1/pi, and most blends are uneven
    assert lams.min() >= 0.5 and lams.max() <= 1
    assert abs(lams.mean().item() - (0.5 + 1 / torch.pi)) < 0.04
    never = mixup(x, _aug(mixup=0.0), torch.rand(4, 7 + 2, generator=gen))
    assert never[1].item() == 1.0 and torch.equal(never[0], x)

    # in a training step, the blended batch is scored against both faces' labels
    cfg = load_config(SMOKE, ["aug.mixup=1.0", "train.channels_last=false"])
    model = from_config(cfg.model, 64, "gray")
    model.eval()  # no dropout, no BatchNorm updates: the same forward twice
    plain = TrainForward(load_config(SMOKE, ["train.augment=false"]), model, None, False)
    step = TrainForward(cfg, model, None, False)
    faces = torch.randint(0, 256, (4, 1, 64, 64), dtype=torch.uint8, generator=gen)
    age, gender = torch.tensor([5.0, 30.0, 60.0, 80.0]), torch.tensor([0.0, 1.0, 1.0, 0.0])
    draws = torch.rand(4, draw_count(cfg.aug), generator=gen)
    draws[:, :7] = 0.5  # the geometric and colour draws at their middle: no change
    draws[0, -2], draws[0, -1] = 0.0, 1 / 3  # mixed; lam = max(u, 1 - u) for u = 1/4: 0.75
    loss, _, _ = step(faces, draws, age, gender)
    blended = (0.75 * faces.float() + 0.25 * faces.float().roll(1, 0)).round().to(torch.uint8)
    expect_a = plain(blended, draws, age, gender)[0]
    expect_b = plain(blended, draws, age.roll(1), gender.roll(1))[0]
    torch.testing.assert_close(loss, 0.75 * expect_a + 0.25 * expect_b, atol=0.05, rtol=0.01)


def test_gender_smoothing_bounds_the_cost_of_a_wrong_label():
    from agegender.training.step import recipe_loss

    cfg = load_config(SMOKE, ["loss.w_age=0", "loss.w_gender=1", "loss.gender_smoothing=0.2"])
    sure = {"gender": torch.tensor([20.0, 20.0]), "age": torch.tensor([30.0, 30.0])}
    # a confident right answer now costs something, and a confident wrong one less than before
    right = recipe_loss(cfg, "regression", sure, torch.tensor([30, 30]), torch.tensor([1, 1]), None)
    wrong = recipe_loss(cfg, "regression", sure, torch.tensor([30, 30]), torch.tensor([0, 0]), None)
    assert right["loss"].item() == pytest.approx(0.1 * 20, rel=0.01)  # BCE at target 0.9
    assert wrong["loss"].item() == pytest.approx(0.9 * 20, rel=0.01)
    # unknown genders (-1) stay left out
    age, unknown = torch.tensor([30, 30]), torch.tensor([-1, -1])
    unknown = recipe_loss(cfg, "regression", sure, age, unknown, None)
    assert unknown["loss"].item() == 0


def test_several_teachers_are_averaged_and_their_seen_images_all_kept(tmp_path):
    from conftest import make_checkpoint

    from agegender.data.near_dups import SeenRecord
    from agegender.inference.model_files import read_seen
    from agegender.training.checkpoint import save_checkpoint
    from agegender.training.models import create_model
    from agegender.training.step import distill_targets, teacher_targets

    paths = []
    for k in range(2):
        path = make_checkpoint(tmp_path / f"t{k}" / "best.safetensors", seed=k)
        model, meta = load_checkpoint(path)
        pixels = np.full((1, 64, 64, 1), k, np.uint8)
        seen = SeenRecord.of([f"{k + 1:x}" * 64], pixels)
        extra = {k: meta[k] for k in ("epoch", "metrics", "config")}
        save_checkpoint(path, model, extra, seen=seen)
        paths.append(path)
    x = torch.randint(0, 256, (6, 1, 64, 64), dtype=torch.uint8)
    student = create_model("resnet-mt-small", img_size=64, age_head="dldl")
    cfg = load_config(SMOKE, [f"distill.teacher={paths[0]}, {paths[1]}"])
    gender, age, seen = distill_targets(cfg, x, student, amp=False)
    each = [teacher_targets(load_checkpoint(p)[0], x, "dldl", True, False) for p in paths]
    torch.testing.assert_close(gender, (each[0][0] + each[1][0]) / 2)
    torch.testing.assert_close(age, (each[0][1] + each[1][1]) / 2)
    assert age.shape == (6, 117) and torch.allclose(age.sum(1), torch.ones(6))
    assert len(seen) == len(read_seen(paths[0])) + len(read_seen(paths[1])) == 2
