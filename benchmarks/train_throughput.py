"""Training images/second through the real training step,
:func:`agegender.training.train.train_one_epoch` (batch augmentation on the device, bf16
autocast where fast, channels_last, optimizer and scheduler steps, no host sync inside the
step) on random uint8 faces held on the device.

    python benchmarks/train_throughput.py --models seed-cnn resnet-mt --batch-sizes 32 128 512 \
        --threads 2 --steps 20 [--amp off] [--compile [--compile-mode reduce-overhead]] \
        [--cuda-graphs] [--count-ops] [--json out.json [--append]]

Each (model, batch size) gets a fresh model built by the recipe (``--recipe``, default
``configs/default.toml``, with ``model.name`` and ``train.batch_size`` overridden), one warm-up
epoch of 3 steps, then ``--repeats`` timed epochs of ``--steps`` steps; the median epoch gives
images/second (synchronised on CUDA). Prints one JSON line per row and a Markdown table with
the device's name. On CUDA each row also counts the host syncs per step; ``--count-ops`` counts
the ATen ops that do work per eager step (each a kernel launch on a GPU: the bound of a step
too small to fill one). ``--cuda-graphs`` (CUDA only) replays each step's forward and backward
as CUDA graphs, as ``train.cuda_graphs=true`` does.

``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` in front gives an AVX2 CPU's training step
on a newer x86 CPU (every CPU kernel of a step is oneDNN's or ATen's, and both obey these); each
row records the capability torch ran with.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from agegender.core import fileio
from agegender.core.config import load_config
from agegender.training.dataset import Data
from agegender.training.optim import build_scheduler
from agegender.training.torch_backend import device_name, resolve_device, use_amp
from agegender.training.train import (
    build_model,
    build_run,
    train_one_epoch,
    wrap_for_training,
)

_NO_WORK = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
            torch.ops.aten.detach.default}  # fmt: skip


def _fake_data(
    n: int, size: int, channels: int, device: torch.device, soft_ages: int | None = None
) -> Data:
    """Random faces and labels; with ``soft_ages`` (a distilling recipe) random teacher outputs
    too, a P(female) and an age distribution over that many ages (0: none): training computes
    the teacher's outputs once before the first epoch, so a step costs the same with these."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=gen)
    age = torch.randint(1, 90, (n,), generator=gen).float()
    gender = torch.randint(0, 2, (n,), generator=gen).float()
    data = Data(
        None, {"train": x.to(device)}, {"train": age.to(device)}, {"train": gender.to(device)}
    )
    if soft_ages is not None:
        data.soft_gender = torch.rand(n, generator=gen).to(device)
        data.soft_age = torch.rand(n, soft_ages, generator=gen).softmax(1).to(device)
    return data


def _per_step(count, epoch, make, batch: int, size: int, channels: int, device) -> float:
    """``count(run)`` (what running an epoch adds up to) per training step: epochs of 2 and 6
    steps differ by 4 steps, which cancels what every epoch does once (shuffle, closing sums)."""
    counts = []
    for steps in (2, 6):
        data = make(batch * steps, size, channels, device)  # its upload: made first
        counts.append(count(functools.partial(epoch, steps, data)))
    return (counts[1] - counts[0]) / 4


def _host_syncs(run) -> int:
    """Host waits while ``run()`` runs, from CUDA's sync debugger."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


class _CountOps(TorchDispatchMode):
    """Counts the ATen ops that do work (no views), forward and backward: on a GPU each one is
    at least one kernel launch, so this is what bounds a step that is too small to fill it."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += not (func.is_view or func in _NO_WORK)
        return func(*args, **(kwargs or {}))


def _ops(run) -> int:
    with _CountOps() as count:
        run()
    return count.n


def bench(args: argparse.Namespace, name: str, batch: int, device: torch.device) -> dict:
    overrides = [f"model.name={name}", f"train.batch_size={batch}", f"data.size={args.size}"]
    overrides += [f"train.amp={args.amp}", f"train.compile={str(args.compile).lower()}"]
    overrides.append(f"train.compile_mode={args.compile_mode}")
    overrides.append(f"train.cuda_graphs={str(args.cuda_graphs).lower()}")
    overrides.append('model.age_head=""')  # each model's own head: dldl for resnet-mt
    cfg = load_config(args.recipe, overrides)
    amp = use_amp(device, cfg.train.amp)
    channels = 1 if cfg.data.color == "gray" else 3
    model = build_model(cfg, device)
    soft = getattr(model, "num_ages", 0) if cfg.distill.teacher else None
    fake_data = functools.partial(_fake_data, soft_ages=soft)
    # the run's optimizer, streams and step (compiled, or captured as CUDA graphs on a sample)
    run = build_run(cfg, model, fake_data(batch, args.size, channels, device), device, amp, None)
    run.quiet = True
    wrap_for_training(run, fake_data(batch, args.size, channels, device))

    def epoch(steps: int, data: Data | None = None) -> float:
        if data is None:
            data = fake_data(batch * steps, args.size, channels, device)
        run.sched, run.per_step = build_scheduler(cfg, run.opt, steps)
        t0 = time.perf_counter()
        out = train_one_epoch(run, data, 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out["images"] / (time.perf_counter() - t0)

    epoch(3)  # warm-up: allocator, kernel selection, compilation
    shape = (batch, args.size, channels, device)
    syncs = _per_step(_host_syncs, epoch, fake_data, *shape) if device.type == "cuda" else None
    # a compiled or captured graph is one call, not ops
    count = args.count_ops and not (cfg.train.compile or cfg.train.cuda_graphs)
    ops = _per_step(_ops, epoch, fake_data, *shape) if count else None
    rates = [epoch(args.steps) for _ in range(args.repeats)]
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "batch": batch,
        "img_per_s": round(statistics.median(rates), 1),
        "device": device_name(device),
        "cpuid_mask": os.environ.get("CPUID_MASK"),
        # the kernels torch runs: ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA can hold them below
        # what the CPU has (an AVX2 machine's training step on a newer CPU)
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()
        if device.type == "cpu"
        else None,
        "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "amp_bf16": amp,
        "compile": cfg.train.compile and cfg.train.compile_mode,
        "cuda_graphs": cfg.train.cuda_graphs,
        "host_syncs_per_step": syncs,
        "ops_per_step": ops,
        "size": args.size,
        "color": cfg.data.color,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--recipe", default="configs/default.toml", help="recipe for everything else")
    p.add_argument("--models", nargs="+", default=["seed-cnn", "resnet-mt"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 128, 512])
    p.add_argument("--steps", type=int, default=20, help="steps per timed epoch")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs (median)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"))
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--compile-mode", default="default", help="with --compile: e.g. reduce-overhead")
    p.add_argument(
        "--cuda-graphs", action="store_true", help="replay each step as CUDA graphs (CUDA only)"
    )
    p.add_argument(
        "--count-ops", action="store_true", help="also count the ATen ops of an eager step"
    )
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument(
        "--append",
        action="store_true",
        help="add the rows to those --json holds (settings that need their own process: "
        "ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        p.error(f"--cuda-graphs needs a CUDA device, not {device}")
    torch.backends.cudnn.benchmark = True  # as train() does on CUDA
    rows = []
    for name in args.models:
        for batch in args.batch_sizes:
            r = bench(args, name, batch, device)
            print(json.dumps(r), flush=True)
            rows.append(r)
    if args.json:
        earlier = []
        if args.append and os.path.exists(args.json):
            with open(args.json) as f:
                earlier = json.load(f)
        fileio.write_text(args.json, json.dumps(earlier + rows, indent=1) + "\n")
    print("\n| model | batch | img/s | device | threads | bf16 | compile | CUDA graphs |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['batch']} | {r['img_per_s']:,.0f} | {r['device']} | "
            f"{r['threads'] or '-'} | {r['amp_bf16']} | {r['compile']} | {r['cuda_graphs']} |"
        )


if __name__ == "__main__":
    main()
