"""Assemble reports/README.md from the sweep tables and the default model's evaluation.

    python tools/make_report.py [--sweeps reports/sweeps-cpu] [--default reports/default]

Every table is copied from a `results.md` that `agegender sweep` wrote, or computed from the
`metrics.json` that `agegender evaluate` wrote; the prose around them is below.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

from agegender.evaluation.report import table, worst_lines

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SECTIONS = [
    ("seeds", "How far a run moves with its seed alone: read every table below against it."),
    ("optimizer", "The study compares SGD, RMSprop and Adam at learning rate 1e-3 and picks Adam."),
    ("learning_rate", "The study's learning-rate table, Adam."),
    ("batch_size", "The study's batch-size table, with our time per epoch and peak memory."),
    ("architecture", "3, 4 and 5 conv layers, with and without batch norm."),
    (
        "regularization",
        "The study's text says it fought overfitting with dropout, augmentation and early "
        "stopping, but its code only has dropout. Train metrics are measured after training in "
        "eval mode, so the train-val gap is the overfitting the study describes.",
    ),
    ("loss_weights", "Equal weights (the study's choice) against unequal and learned weights."),
    ("ours", "Beyond the study: the stronger network, colour, resolution and age heads."),
]

HEADER = """# Results: the study's tables, regenerated

Everything here comes from `bash reports/reproduce.sh` (UTKFace from `../shared`, prepared with
`agegender prepare --seed 1`, 128 px gray, split 70/10/20 by content hash; 4,157 test images that
no run ever trains on). The study's numbers are quoted from its paper beside ours.

These runs predate the near-duplicate groups: on that split about 112 test images had a
near-copy (the same photograph re-encoded or re-cropped) in train (2.7 % of the test split),
which a model that remembers its copies scores better than the rest. Today's `prepare`
keeps each group in one split (3,984 test images); the bundled models' figures in the README and
MODEL_CARD.md are on that split, with every image a model trained on left out.

**Why our numbers differ from the study's.** The study's loader scans the three Kaggle folders,
which hold every image two or three times, so most of its test images are also in its training
set, and UTKFace itself has 341 groups of byte-identical files (202 with conflicting labels). Our
split is by content hash and drops the conflicting groups, so our test numbers are honest and
lower than a leaky split would give. The study's text also describes augmentation, a plateau
schedule and early stopping that its code never runs: `configs/seed.toml` is its code,
`configs/seed-regularized.toml` what its text describes.
"""


def default_section(folder: Path) -> list[str]:
    m = json.loads((folder / "metrics.json").read_text())
    by_g = m["gender_accuracy_by_gender"]
    lines = [
        "## The bundled `accurate` model (the default before the distilled one)",
        "",
        f"`configs/default.toml` (resnet-mt, DLDL age head, AdamW one-cycle, augmentation, flip "
        f"TTA) trained on train+val for 40 epochs on this project's 2-core CPU; evaluated with "
        f"`agegender evaluate accurate --data cache/utk128 --split test --amp off` "
        f"({m['n']:,} test images).",
        "",
        "| | gender acc | male | female | age MAE | abs error std | ECE | 90 % interval cover |",
        "|---|---|---|---|---|---|---|---|",
        "| study's claim (leaky split) | 89.8 % | - | - | 6.3 | - | - | - |",
        f"| ours | {m['gender_accuracy']:.1%} | {by_g['male']:.1%} | {by_g['female']:.1%} | "
        f"{m['age_mae']:.2f} | {m['age_abs_error_std']:.2f} | "
        f"{m['calibration']['ece']:.3f} | {_cover(m)} |",
        "",
        "Training curves (train+val, so the validation curve is not held out here):",
        "",
        "![curves](default/curves.png)",
        "",
        "![scatter](default/age_scatter.png) ![confusion](default/confusion.png)",
        "",
        "![bands](default/mae_by_band.png) ![reliability](default/reliability.png)",
        "",
        "Predictions next to the truth (`agegender show`): ![grid](default/grid.png)",
        "",
        "Full report with per-band, per-decade and per-race tables: "
        "[default/report.md](default/report.md).",
        "",
    ]
    return lines


def _tables(m: dict) -> str:
    bands = [[k, f"{v['n']:,}", f"{v['mae']:.2f}", f"{v['gender_accuracy']:.1%}"]
             for k, v in m["age_mae_by_band"].items()]  # fmt: skip
    races = [[k, f"{v['n']:,}", f"{v['gender_accuracy']:.1%}", f"{v['age_mae']:.2f}"]
             for k, v in m["by_race"].items()]  # fmt: skip
    lines = [
        *table(["age band", "n", "age MAE", "gender accuracy"], bands),
        *table(["race (UTKFace label)", "n", "gender accuracy", "age MAE"], races),
    ]
    return "\n".join(lines).strip().replace("\n\n\n", "\n\n")


def _row(name: str, m: dict) -> str:
    by_g = m["gender_accuracy_by_gender"]
    return (f"| `{name}` | {m['n']:,} | {m['gender_accuracy']:.1%} | {by_g['male']:.1%} | "
            f"{by_g['female']:.1%} | {m['age_mae']:.2f} | {m['calibration']['ece']:.3f} | "
            f"{_cover(m)} |")  # fmt: skip


def retrain_lines(reports: Path) -> list[str]:
    """One line per retraining of the default's recipe on another CPU: each ``student-*`` folder
    holding the run's ``metrics.json``, its ``command.txt`` (the command first, continued
    with backslashes) and ``time.txt`` (``/usr/bin/time -f "%e s wall"`` of the whole command)."""
    lines = []
    for folder in sorted(reports.glob("student-*")):
        if not all((folder / f).is_file() for f in ("metrics.json", "command.txt", "time.txt")):
            continue
        m = json.loads((folder / "metrics.json").read_text())
        command = []
        for line in (folder / "command.txt").read_text().splitlines():
            command.append(line.rstrip("\\").strip())
            if not line.endswith("\\"):
                break
        wall = float((folder / "time.txt").read_text().split()[0])
        cpu = m["device"] + (" with AVX2 only" if "avx2_only" in command[0] else "")
        if "ATEN_CPU_CAPABILITY=avx2" in command[0]:  # torch held to its AVX2 kernels
            cpu += " on torch's AVX2 kernels"
        shown = re.sub(r"^/usr/bin/time -f \"[^\"]*\" ", "", " ".join(command))
        took = f"{wall / 60:.0f} minutes" if wall < 5400 else f"{wall / 3600:.2f} hours"
        lines.append(
            f"- `{shown}`: {took}, the whole command, "
            f"on a {m['threads']}-thread {cpu}, {'bf16' if m['amp'] else 'fp32'}, "
            f"{m['epochs_run']} epochs: test {m['test_acc']:.2%} / {m['test_mae']:.2f} "
            f"(`{folder}/`)"
        )
    return lines


def model_card(evals: Path, run: Path) -> str:
    """MODEL_CARD.md from the evaluations of the two bundled models (``evals``: the folders
    ``eval-default``, ``eval-accurate``, ``eval-default-whole-folder`` and the bundling reports
    ``default.json``/``accurate.json``) and the default model's training run."""
    m = json.loads((evals / "eval-default" / "metrics.json").read_text())
    acc = json.loads((evals / "eval-accurate" / "metrics.json").read_text())
    whole = json.loads((evals / "eval-default-whole-folder" / "metrics.json").read_text())
    bundled = {n: json.loads((evals / f"{n}.json").read_text()) for n in ("default", "accurate")}
    train = json.loads((run / "metrics.json").read_text())
    recipe = tomllib.loads((run / "config.toml").read_text())
    hours = train["train_seconds"] / 3600
    img_s = _images_per_second(run, train)
    fast = _speed_sentence()
    int8 = {n: bundled[n]["onnx_int8"] for n in bundled}
    retrained = retrain_lines(run.parent)
    if retrained:
        retrained = "\nThe default's recipe retrained on other 2-core CPUs:\n" + "\n".join(
            retrained
        )
    worst = "\n".join(worst_lines(m)).strip()
    worst = worst[0].lower() + worst[1:]  # after "`default`'s"
    return (
        _card_models(train, m, bundled["default"]["child_temperature"]["value"])
        + _card_training(train, recipe, hours, img_s, retrained)
        + _card_metrics(m, acc, int8, whole, worst, fast, children_rows(bundled["default"]))
        + CARD_LIMITS
    )


def _images_per_second(run: Path, train: dict) -> float:
    # images/second from the epochs' own rows: the metrics.json of a run resumed before the fix
    # counted only the last process's images over every epoch's seconds
    with open(run / "history.csv", newline="") as f:
        epochs = list(csv.DictReader(f))
    return sum(float(r["img_per_s"]) * float(r["seconds"]) for r in epochs) / train["train_seconds"]


def _speed_sentence() -> str:
    """The bundled models' speed, side by side in one run, from
    ``reports/speed/predict_zen4_ensemble.json`` (``benchmarks/predict_speed.py``)."""
    speed = Path("reports/speed/predict_zen4_ensemble.json")
    b = json.loads(speed.read_text()) if speed.is_file() else None
    return (
        f"On a {b['cpu']['cores']}-core {b['cpu']['name']} ({b['cpu']['class'].upper()} class), "
        f"{b['threads']} threads, one aligned face from JPEG file to answer takes "
        f"{b['batch1']['default int8 (tta False)']['median_ms']:.1f} ms (int8) / "
        f"{b['batch1']['default fp32 (tta False)']['median_ms']:.1f} ms (fp32) with `default`, "
        f"{b['batch1']['accurate int8 (tta True)']['median_ms']:.1f} / "
        f"{b['batch1']['accurate fp32 (tta True)']['median_ms']:.1f} ms with `accurate` "
        "(`python benchmarks/predict_speed.py`; other CPU classes differ: measure yours)."
        if b
        else "Speed: run `python benchmarks/predict_speed.py` on your CPU."
    )


def _card_models(train: dict, m: dict, temperature: float) -> str:
    return f"""# Model card: agegender `default` and `accurate`

The two bundled models: `Predictor.load()`, `agegender predict`, `serve` and `demo` use
`default` without any download; `--model accurate` takes the other. Each ships as fp16
safetensors weights with a JSON sidecar (for training and fine-tuning), an ONNX file and an int8
ONNX file (for ONNX Runtime, which is all that prediction needs), in `src/agegender/weights/`.

## Models
- `default`: `resnet-mt-fast`, {train["params"]:,} parameters, 143 M multiply-adds per face at
  128x128 gray, one pass: a small ResNet (stride-4 stem, 4 stages of 2 BasicBlocks, 32-256
  channels, batch norm, global pooling), a gender logit and a DLDL age head (softmax over ages
  0-116; the age is its expectation, its spread gives a 90 % interval). Distilled from
  `accurate` with its flip TTA folded into training (`configs/student.toml`).
- `accurate`: an ensemble of two networks, `default` and `resnet-mt` (the same ResNet with a
  stride-2 stem, 555 M multiply-adds a pass, trained alone by `configs/default.toml`), their
  P(female) and age distributions averaged, each over the face and its mirror (flip TTA):
  1,396 M multiply-adds a face, 9.8x `default`.
- Children's gender: `default` (alone and inside `accurate`) divides its gender logit by a
  temperature where its own age estimate is a child's (`child_temperature` {temperature}, fitted
  on the test split; no predicted gender or age changes), so a child's P(female) says how often
  such a guess is right (see `docs/accuracy.md`).

Input: one face aligned like UTKFace's "aligned & cropped" images; `agegender predict` finds
faces with YuNet and aligns them to that geometry (5-landmark similarity transform).

## Data
UTKFace aligned & cropped (21,340 files), prepared by `agegender prepare` (its default split,
published in `splits/utkface.csv`): 3 unparsable names and 202 groups of byte-identical files
whose names disagree dropped, copies counted once, then **near-duplicate groups** (the same
photograph re-encoded, re-cropped or re-toned) kept in one split each: 20,783 images, 70/10/20
by group, stratified by gender and age band. Both models trained on train+val; the
{m["n"]:,} test images, near-copies included, were never trained on. Each checkpoint records
the content hashes and near-duplicate signatures of the images it trained on, and `evaluate`
leaves those and their near-copies out.

"""


def _card_training(train: dict, recipe: dict, hours: float, img_s: float, retrained: str) -> str:
    return f"""## Training
`default`: `agegender train configs/student.toml data.cache=cache/utk128`: {train["epochs_run"]}
epochs, AdamW one-cycle, batch augmentation, loss = hard labels (10 x gender BCE + DLDL) mixed
with the teacher's flip-averaged outputs (weight {recipe["distill"]["weight"]}). {hours:.1f} hours of epochs on this
project's 2-core {train["device"]} (bf16 autocast, {img_s:.0f} images/s; the teacher's outputs,
computed once before the first epoch, and each epoch's validation come on top; the machine also
ran other work for part of it). `accurate`'s larger network:
`configs/default.toml`, 40 epochs, 108 minutes on the same CPU; the ensemble is the two
trained networks bundled together (`tools/bundle_model.py runs/student runs/default-cpu --name
accurate`), no further training.
{retrained}

"""


def children_rows(bundled_default: dict) -> str:
    """The rows of the children's calibration table, from ``bundle_model``'s report."""
    c = bundled_default["child_temperature"]
    rows = []
    for band, before in c["before"].items():
        after = c["after_cross_fitted"][band]
        rows.append(
            f"| {band} | {before['n']:,} | {before['gender_accuracy']:.1%} | "
            f"{before['gender_confidence']:.1%} | {before['gender_ece']:.3f} | "
            f"{after['gender_confidence']:.1%} | {after['gender_ece']:.3f} |"
        )
    return "\n".join(rows)


def _card_metrics(
    m: dict, acc: dict, int8: dict, whole: dict, worst: str, fast: str, children: str
) -> str:
    return f"""## Test metrics, on faces neither model saw
`agegender evaluate MODEL --data cache/utk128 --split test`:

| model | n | gender accuracy | male | female | age MAE | gender ECE | 90 % interval coverage |
|---|---|---|---|---|---|---|---|
{_row("default", m)}
{_row("accurate", acc)}

The ONNX int8 files on the same test split: `default` {int8["default"]["gender_accuracy"]:.1%} /
{int8["default"]["age_mae"]:.2f}, `accurate` {int8["accurate"]["gender_accuracy"]:.1%} /
{int8["accurate"]["age_mae"]:.2f} (`reports/bundled/*.json`; `precision=auto` takes int8 only
where it loses at most 0.1 point / 0.03 years and the CPU runs it fast).

On the whole shared UTKFace folder, `agegender evaluate default --data ../shared/data/UTKFace`
leaves out the {whole["excluded_seen_in_training"]:,} images `default` trained or validated on
(or near-copies of them) and scores the {whole["n"]:,} others: {whole["gender_accuracy"]:.1%} /
{whole["age_mae"]:.2f}.

`default`'s {worst}

{_tables(m)}

Children's gender with `default`'s `child_temperature`, cross-fitted (each half of the test faces
scored with the temperature fitted on the other half):

| ages | faces | accuracy | confidence before | ECE before | confidence after | ECE after |
|---|---|---|---|---|---|---|
{children}

What was tried to do better (other inputs, wider networks, augmentation, label noise, balanced
sampling, the ensemble, distilling it), with every figure: `docs/accuracy.md`.

{fast}

"""


CARD_LIMITS = """## Limits
- **Licence.** UTKFace is for non-commercial research only; these weights are derived from it.
  Do not use them commercially.
- **Apparent, not real, age.** UTKFace's ages are partly estimated by annotators; the model
  learns what a face looks like, not a birth date. Errors grow with age (see the bands).
- **Binary gender labels.** UTKFace labels gender as male/female from appearance; the model
  cannot represent anything else and should not be used to infer anyone's gender identity.
- **Biases.** UTKFace is mostly White (about 42 %) and young adults; accuracy differs by race
  and age group (tables above). Children's gender is hard for the model (and for people).
- **Input.** It expects a face aligned like UTKFace's crops; `agegender predict` aligns
  detected faces, but profile views, heavy occlusion and very small faces degrade it. A camera
  unlike UTKFace's photos can cost a lot (see the README's fine-tuning example).
- **Not for decisions about people** (access, pricing, law enforcement, age verification).

Regenerate every number here with `bash reports/reproduce.sh`.
"""


FULL_RUNS = [  # (run folder under --full, recipe, what it is, the number to compare with)
    (
        "seed",
        "seed",
        "the study's code: Adam 1e-3, batch 32, 30 epochs, no augmentation",
        "study: 89.8 % / 6.3",
    ),
    (
        "seed-regularized",
        "seed-regularized",
        "+ rotation, flip, brightness, plateau schedule, early stopping (patience 5)",
        "-",
    ),
    (
        "default-train",
        "default",
        "resnet-mt + DLDL, AdamW one-cycle, augmentation, flip TTA, 40 epochs",
        "issue target: >= 92.5 % / <= 4.85",
    ),
    (
        "default-train-s42",
        "default",
        "the same on `prepare`'s default split (`--seed 42`; every other row: `--seed 1`)",
        "issue target: >= 92.5 % / <= 4.85",
    ),
    (
        "default-b256-s42",
        "default",
        "the same at batch 256, lr 4e-3 (`train.batch_size=256 train.lr=4e-3`; seed-42 split)",
        "issue target: >= 92.5 % / <= 4.85",
    ),
    (
        "gpu/default-train-run1",
        "default",
        "the same on one H200, before the host-sync fix (4 syncs per step)",
        "issue target: >= 92.5 % / <= 4.85",
    ),
    (
        "gpu/default-train",
        "default",
        "the same on one H200",
        "issue target: >= 92.5 % / <= 4.85",
    ),
    (
        "gpu/default-graphs-train",
        "default",
        "the same on one GPU with CUDA graphs (`train.cuda_graphs=true`)",
        "issue target: under 40 s",
    ),
]


def _duration(m: dict) -> str:
    s, device = m["train_seconds"], m.get("device", "")
    where = "H200" if "H200" in device else ("H100" if "H100" in device else "CPU")
    took = f"{s:.0f} s" if s < 600 else f"{s / 60:.0f} min"
    return f"{took}, {m['train_img_per_s']:,.0f} img/s ({where})"


def full_runs_section(folder: Path) -> list[str]:
    """The study's recipes at full length (train split only, best epoch on val, test once)."""
    rows = []
    for name, recipe, what, claim in FULL_RUNS:
        f = folder / name / "metrics.json"
        if not f.is_file():
            rows.append(f"| `configs/{recipe}.toml` | {what} | (not run yet) | | | | {claim} |")
            continue
        m = json.loads(f.read_text())
        gap = m["train_acc"] - m["val_acc"] if "train_acc" in m else float("nan")
        rows.append(
            f"| `configs/{recipe}.toml` | {what} | {m['best_epoch']} of {m['epochs_run']} | "
            f"{m['test_acc']:.1%} / {m['test_mae']:.2f} | {gap:+.1%} | "
            f"{_duration(m)} | {claim} |"
        )
    return [
        "## The study's recipes at full length",
        "",
        "Trained on the train split alone (14,548 images), the best epoch chosen on val, tested "
        "once on the 4,157 test images: `agegender train configs/RECIPE.toml "
        "data.cache=cache/utk128 run.out=runs/full/NAME` (`reports/reproduce.sh`). The CPU "
        "runs ran on this project's 2-core CPU beside other work (the two seed recipes at "
        "once, one thread each), so their times are not speed figures. The H200 runs "
        "(`bash benchmarks/gpu_session.sh default` on a lent GPU) trained on the cache carried "
        "as `tools/pack_cache.py`'s JPEG-q75 pack: the same rows and splits, faces 1.3 grey "
        "levels off on average. The time is the training loop's; the whole command (start, "
        "loading, validation, checkpoints, final evaluation) took about 30 s more.",
        "",
        "| recipe | what | best epoch | test gender acc / age MAE | train-val acc gap | time "
        "| compare with |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        *(
            f"![{name}]({name}/curves.png)"
            for name, *_ in FULL_RUNS
            if (folder / name / "curves.png").is_file()
        ),
        "",
    ]


def gpu_section(folder: Path) -> list[str]:
    """What ran on a lent GPU: the CUDA checks and the training throughput, from their JSON."""
    return ["## On a lent GPU", "", *_gpu_checks(folder), *_gpu_throughput(folder)]


def _gpu_checks(folder: Path) -> list[str]:
    """What ``tools/gpu_check.py`` found, if it ran."""
    lines: list[str] = []
    check = folder / "gpu_check.json"
    if check.is_file():
        c = json.loads(check.read_text())
        lines += [
            f"`python tools/gpu_check.py` on {c['device']} (torch {c['torch']}): "
            + "; ".join(
                f"{name} {'ok' if c[name]['ok'] else 'FAILED: ' + c[name].get('error', '')}"
                for name in ("train", "resume", "nccl", "graphs")
                if name in c
            )
            + ".",
            "",
        ]
        if "resume" in c and "unbroken_runs_max_abs_diff" not in c["resume"]:
            lines += [
                "That resume check asked for weights within 1 % of the largest tensor value (the "
                "BatchNorm step counter, 128) of an unbroken run. cuDNN's autotuned kernels need "
                "not be bit-reproducible, so two unbroken runs may differ as much; the check now "
                "asks the resumed run to be as close as a second unbroken run is, and has not "
                "run on a GPU yet: whether the difference is that noise is open.",
                "",
            ]
    return lines


def _gpu_throughput(folder: Path) -> list[str]:
    """A table of training images/second by model, batch and mode, from the benchmark files."""
    lines: list[str] = []
    cols = {}  # (model, batch) -> {column: img/s}
    device = ""
    for name, before in (
        ("train_throughput_before_sync_fix.json", True),
        ("train_throughput.json", False),
        ("train_throughput_compile.json", False),
        ("train_throughput_reduce_overhead.json", False),
        ("train_throughput_cuda_graphs.json", False),
    ):
        f = folder / name
        for r in json.loads(f.read_text()) if f.is_file() else []:
            mode = r["compile"]  # False, True (older files) or torch.compile's mode
            col = "eager" if not mode else "compile" if mode in (True, "default") else mode
            col = "CUDA graphs" if r.get("cuda_graphs") else col
            col += ", before the fix" if before else ""
            cols.setdefault((r["model"], r["batch"]), {})[col] = r["img_per_s"]
            device = r["device"]
    if cols:
        order = ["eager, before the fix", "compile, before the fix", "eager", "CUDA graphs"]
        order.append("compile")
        present = {c for v in cols.values() for c in v}  # the columns some file filled
        heads = [h for h in order if h in present] + sorted(present - set(order))
        lines += [
            f"Training images/second on one {device} through the real training step (`python "
            "benchmarks/train_throughput.py --steps 30 --repeats 3 [--cuda-graphs | --compile "
            "[--compile-mode M]]`; 128x128 gray, "
            "bf16 autocast, channels_last, training set on the GPU, median of 3 epochs). Before "
            "the fix, each step copied four small tensors from the host (the normalisation "
            "constants and the loss weights), and each copy waited for the GPU queue to drain:",
            "",
            "| model | batch | " + " | ".join(heads) + " |",
            "|---|---|" + "---|" * len(heads),
            *(
                f"| {m} | {b} | "
                + " | ".join(f"{v[h]:,.0f}" if h in v else "-" for h in heads)
                + " |"
                for (m, b), v in cols.items()
            ),
            "",
        ]
    return lines


def _speed(t: dict, speed: Path = Path("reports/speed/predict_tta.json")) -> str:
    if speed.is_file():  # benchmarks/predict_speed.py on an idle machine, end to end
        b = json.loads(speed.read_text())
        return (
            f"Speed ({b['device']}, {b['threads']} threads, end to end from JPEG files, flip TTA; "
            "`python benchmarks/predict_speed.py`): an aligned face at batch 1 takes "
            f"{b['onnx']['batch1']['median_ms']:.1f} ms with ONNX Runtime and "
            f"{b['torch']['batch1']['median_ms']:.1f} ms with PyTorch; a 1280x886 photo with six "
            f"faces (decode, detect, align, predict) {b['torch']['group_median_ms']:.0f} ms. "
            "Without TTA (`--no-tta`) the model's share halves; see the README's Speed section."
        )
    if not t:
        return (
            "Speed: not measured in this evaluation (the machine was busy); measure it on an idle "
            "machine with `python benchmarks/predict_speed.py --model default`."
        )
    return (
        f"Speed ({t['device']}, {t['threads']} threads): {t['batch1_ms_per_image']:.1f} ms per "
        f"face at batch 1, {t['batch_ms_per_image']:.2f} ms per face at batch {t['batch_size']} "
        "(model only, preprocessed faces)."
    )


def _cover(m: dict) -> str:
    interval = m.get("age_interval")
    if not interval:
        return "-"
    return f"{interval['coverage']:.1%}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    # results.md/.csv of each sweep, copied out of runs/ so that the report rebuilds anywhere
    p.add_argument("--sweeps", default="reports/sweeps-cpu")
    p.add_argument("--default", default="reports/default")
    p.add_argument("--out", default="reports/README.md")
    p.add_argument("--run", default="reports/student", help="the default model's training run")
    p.add_argument("--bundled", default="reports/bundled", help="the bundled models' evaluations")
    p.add_argument("--full", default="runs/full", help="full-length runs of the study's recipes")
    p.add_argument("--model-card", default="MODEL_CARD.md")
    p.add_argument(
        "--reduced",
        default="the whole train split, 5 epochs, 96 px (the study: 128 px)",
    )
    args = p.parse_args()
    lines = [HEADER]
    if (Path(args.default) / "metrics.json").is_file():
        lines += default_section(Path(args.default))
    lines += full_runs_section(Path(args.full))
    lines += gpu_section(Path(args.full) / "gpu")
    lines += [
        "## The study's tables",
        "",
        f"**Shortened runs on a CPU** ({args.reduced}; every run is tested on the full test "
        "split). No GPU was lent to the session that produced them, so they compare the "
        "settings after a short training, not at the study's 30 epochs: in 5 epochs no run has "
        "started to overfit, and the plateau schedule and early stopping (patience 5) never "
        "act, so the regularisation table cannot show the gap the study describes (the "
        "full-length runs above show it, in their train-val gap). On a lent GPU, `bash "
        "benchmarks/gpu_session.sh study` runs every table at full length, 8 runs at once.",
        "",
    ]
    for name, text in SECTIONS:
        f = Path(args.sweeps) / name / "results.md"
        if not f.is_file():
            lines += [f"### {name}", "", text, "", "(not run yet: it needs a lent GPU)", ""]
            continue
        table = f.read_text().strip().splitlines()
        lines += [table[0], "", text, "", *table[1:], ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")
    if (Path(args.bundled) / "eval-default" / "metrics.json").is_file() and (
        Path(args.run) / "metrics.json"
    ).is_file():
        Path(args.model_card).write_text(model_card(Path(args.bundled), Path(args.run)))
        print(f"wrote {args.model_card}")
    bundled_default = Path(args.bundled) / "default.json"
    if bundled_default.is_file():  # docs/accuracy.md includes it
        rows = children_rows(json.loads(bundled_default.read_text()))
        Path("reports/accuracy/children.md").write_text(rows + "\n")


if __name__ == "__main__":
    main()
