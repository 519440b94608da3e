"""Training: plain functions in reading order, no trainer framework.

``train(cfg)`` loads the prepared cache, builds the model its recipe names, then for each epoch
runs :func:`train_one_epoch` and :func:`validate`, logs a row of ``history.csv``, writes
``last``/``best`` checkpoints atomically and redraws ``curves.png``; at the end it scores the best
checkpoint and exports it to ``best.onnx``, so that ``Predictor.load(run_dir)`` needs no torch. A
killed run continues with ``train(None, resume=run_dir)``.

Started by ``torchrun``, each process trains on its share of every batch with
DistributedDataParallel; metrics are summed over processes, so every rank keeps the same
history and takes the same scheduler and early-stopping decisions, and rank 0 alone writes.
"""

from __future__ import annotations

import math
import os
import platform
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from agegender.core import fileio
from agegender.core.config import Config, check_config, load_config, to_dict, to_toml
from agegender.core.errors import ConfigError, DataError, TrainingError
from agegender.core.progress import progress_bar
from agegender.data.near_dups import SeenRecord
from agegender.inference.model_files import read_meta, read_seen, resolve_checkpoint
from agegender.training import distributed
from agegender.training.augment import draw_count
from agegender.training.checkpoint import load_checkpoint, load_weights, save_checkpoint
from agegender.training.dataset import Data, blank_model, build_model, load_data, without_seen_test
from agegender.training.losses import UncertaintyWeights, range_error
from agegender.training.models import count_parameters, list_models, normalize
from agegender.training.onnx_export import export_onnx
from agegender.training.optim import build_optimizer, build_scheduler, param_groups
from agegender.training.runs import (
    RUN_FILES,
    check_new_run_dir,
    check_run_name,
    plot_curves,
    read_history,
    run_dir,
    write_history,
)
from agegender.training.step import TrainForward, distill_targets, graph_train_forward, recipe_loss
from agegender.training.torch_backend import (
    autocast,
    device_name,
    forward_tta,
    peak_memory_mb,
    resolve_device,
    use_amp,
)

PLOT_EVERY_S = 20.0  # least seconds between two redraws of curves.png during training


@dataclass
class Run:
    """What one training run holds from epoch to epoch."""

    cfg: Config
    out: Path
    device: torch.device
    amp: bool
    model: nn.Module  # the plain model: what is validated and saved
    weights: UncertaintyWeights | None  # learnt task weights (loss.uncertainty)
    opt: torch.optim.Optimizer
    sched: Any
    per_step: bool  # the scheduler steps per batch (else per epoch, on the val loss)
    gen: torch.Generator  # shuffling: in the same state on every rank
    aug_gen: torch.Generator  # augmentation: its own stream per rank (gen itself outside torchrun)
    quiet: bool = False
    train_model: nn.Module | None = None  # the model as it trains (DDP, torch.compile)
    forward: nn.Module | None = None  # the step's forward (TrainForward, maybe CUDA graphs)
    history: list[dict[str, Any]] = field(default_factory=list)
    seen: SeenRecord | None = None  # the training and validation images, kept in checkpoints
    best_loss: float = math.inf
    best_epoch: int = 0

    def log(self, *args: Any) -> None:
        if not self.quiet:
            print(*args, flush=True)


def build_run(
    cfg: Config,
    model: nn.Module,
    data: Data,
    device: torch.device,
    amp: bool,
    out: Path,
    quiet: bool = False,
) -> Run:
    """``model``'s optimizer, scheduler and random streams, ready for
    :func:`wrap_for_training`."""
    t = cfg.train
    weights = UncertaintyWeights().to(device) if cfg.loss.uncertainty else None
    opt = build_optimizer(cfg, param_groups(model, weights, t.weight_decay))
    sched, per_step = build_scheduler(cfg, opt, max(len(data.x["train"]) // t.batch_size, 1))
    gen = torch.Generator(device=device)
    gen.manual_seed(t.seed)
    # Shuffling (gen) must agree across ranks, augmentation and dropout must not, or the ranks
    # would augment and drop out their shards in lockstep; see the start of each epoch.
    aug_gen = torch.Generator(device=device) if distributed.is_distributed() else gen
    run = Run(cfg, out, device, amp, model, weights, opt, sched, per_step, gen, aug_gen, quiet)
    run.train_model, run.forward = model, TrainForward(cfg, model, weights, amp, _distill(cfg))
    run.seen = data.seen
    return run


def wrap_for_training(run: Run, data: Data) -> None:
    """DistributedDataParallel under torchrun, then torch.compile or CUDA graphs if asked."""
    t = run.cfg.train
    train_model: nn.Module = run.model
    if distributed.is_distributed():
        # rank 0's weights are broadcast here; gradients are averaged in backward
        ids = [run.device.index] if run.device.type == "cuda" else None
        train_model = DistributedDataParallel(run.model, device_ids=ids)
    if t.compile:  # around the DDP module, so that it compiles between gradient buckets
        train_model = torch.compile(train_model, mode=t.compile_mode)
    run.train_model = train_model
    run.forward = TrainForward(run.cfg, train_model, run.weights, run.amp, _distill(run.cfg))
    if t.cuda_graphs:
        b = min(t.batch_size, len(data.x["train"]))  # every step's batch: the ragged is dropped
        k = draw_count(run.cfg.aug) if t.augment else 0
        draws = torch.rand(b, k, device=run.device) if t.augment else torch.zeros(0)
        sample = (data.x["train"][:b], draws.to(run.device), data.age["train"][:b])
        sample += (data.gender["train"][:b],)
        if _distill(run.cfg):
            sample += (data.soft_gender[:b], data.soft_age[:b])
        run.forward = graph_train_forward(run.forward, sample)


def _distill(cfg: Config) -> bool:
    return bool(cfg.distill.teacher) and cfg.distill.weight > 0


def save_state(run: Run, epoch: int) -> None:
    """Everything ``--resume`` needs, in one file written atomically (and flushed to disk): the
    weights, optimizer, scheduler, random streams and history of ``epoch``. One file is
    consistent by construction; a run killed while it was written resumes from the epoch before.
    """
    device = run.device
    state = {
        "format": 2,  # 1: the weights only in last.safetensors, no history
        "model": run.model.state_dict(),
        "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict() if run.sched is not None else {},
        "weights": run.weights.state_dict() if run.weights is not None else {},
        "generator": run.gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
        "epoch": epoch,
        "best_loss": run.best_loss,
        "best_epoch": run.best_epoch,
        "history": run.history,
    }
    with fileio.atomic_path(run.out / "last.state.pt") as tmp:
        torch.save(state, tmp)


def resume_run(run: Run) -> int:
    """Load the last checkpoint of ``run.out`` into ``run``; returns the epoch to start at."""
    out, device = run.out, run.device
    # every rank reads what rank 0 wrote (several machines need a shared disk for this)
    try:
        state = torch.load(out / "last.state.pt", map_location=device, weights_only=True)
        if state.get("format", 1) >= 2:
            run.model.load_state_dict(state["model"])
            run.history = state["history"]
        else:  # an older run folder: its parts must be of the same epoch
            weights_epoch = read_meta(out / "last.safetensors").get("epoch")
            if weights_epoch != state["epoch"]:
                raise DataError(
                    f"cannot resume {out}: its last weights are of epoch {weights_epoch} and "
                    f"its optimizer state of epoch {state['epoch']} (killed between the two); "
                    "best.safetensors still loads"
                )
            run.model.load_state_dict(load_weights(out / "last.safetensors", device))
            run.history = read_history(out / "history.csv")[: state["epoch"]]
        run.opt.load_state_dict(state["optimizer"])
        if run.sched is not None:
            run.sched.load_state_dict(state["scheduler"])
        if run.weights is not None:
            run.weights.load_state_dict(state["weights"])
        run.gen.set_state(state["generator"].cpu())  # a CUDA generator's state is a CPU tensor
        torch.set_rng_state(state["torch_rng"].cpu())
        if device.type == "cuda" and "cuda_rng" in state:  # dropout draws from it there
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        run.best_loss, run.best_epoch = state["best_loss"], state["best_epoch"]
    except DataError:
        raise
    except (
        RuntimeError, OSError, KeyError, ValueError, TypeError, EOFError, UnpicklingError,
        SafetensorError, AttributeError,
    ) as e:  # fmt: skip
        # a file cut short by a full disk or a kill, or edited: say which, not torch's internals
        why = str(e).splitlines()[0][:200] if str(e) else "empty or cut short"
        raise DataError(
            f"cannot resume {out}: its last checkpoint is damaged ({type(e).__name__}: {why}); "
            "best.safetensors may still load"
        ) from None
    if len(run.history) != state["epoch"]:
        raise DataError(
            f"cannot resume {out}: its state is of epoch {state['epoch']} but holds "
            f"{len(run.history)} epochs of history"
        )
    return state["epoch"] + 1


# --------------------------------------------------------------------------- epochs


def train_one_epoch(run: Run, data: Data, epoch: int) -> dict[str, float]:
    """One pass over the shuffled training set; returns mean loss, gender accuracy, age MAE
    and the number of images, over all processes.

    ``run.gen`` shuffles and is in the same state on every rank; ``run.aug_gen`` augments.
    Under DDP each rank takes every ``world``-th image of each global batch.
    """
    t, device = run.cfg.train, run.device
    run.train_model.train()
    rank, world = distributed.rank(), distributed.world_size()
    x_all, n = data.x["train"], len(data.x["train"])
    if data.weights is None:
        perm = torch.randperm(n, device=device, generator=run.gen)
    else:  # data.balance: an epoch of n draws, smaller groups more often
        perm = torch.multinomial(data.weights, n, replacement=True, generator=run.gen)
    steps = n // t.batch_size if n >= t.batch_size else 1  # drop the ragged last batch
    # Sums stay on the device: a .item() per step would stall the GPU queue
    # loss * batch, correct genders, age absolute error, faces whose gender is known
    sums = torch.zeros(4, device=device)
    no_draws = torch.zeros(0, device=device)  # what a CUDA graph takes when nothing is drawn
    seen = 0
    desc = f"epoch {epoch}/{t.epochs}"
    bar = progress_bar(range(steps), quiet=run.quiet, desc=desc, unit="step")
    for step in bar:
        idx = perm[step * t.batch_size : (step + 1) * t.batch_size][rank::world]
        b = len(idx)
        draws = no_draws
        if t.augment:
            draws = torch.rand(b, draw_count(run.cfg.aug), device=device, generator=run.aug_gen)
        age, gender = data.age["train"][idx], data.gender["train"][idx]
        soft = (data.soft_gender[idx], data.soft_age[idx]) if data.soft_gender is not None else ()
        loss, mae, correct = run.forward(x_all[idx], draws, age, gender, *soft)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        if run.weights is not None and world > 1:
            # the learnt task weights sit outside the DDP module: average their gradients here
            for p in run.weights.parameters():
                dist.all_reduce(p.grad)
                p.grad.div_(world)
        if t.grad_clip > 0:
            nn.utils.clip_grad_norm_(run.model.parameters(), t.grad_clip)
        run.opt.step()
        if run.per_step:
            run.sched.step()
        with torch.no_grad():
            known = (gender >= 0).sum()
            sums += torch.stack([loss.detach() * b, correct, mae * b, known.float()])
            seen += b
        if not run.quiet and step % 25 == 0:  # reading the loss waits for the device: rarely
            bar.set_postfix(loss=f"{loss.item():.3f}")
    totals = torch.cat([sums, torch.tensor([float(seen)], device=device)])
    totals = distributed.sum_over_ranks(totals)
    seen, known = int(totals[4].item()), float(totals[3].item())
    loss, abs_err = (totals[[0, 2]] / max(seen, 1)).tolist()
    acc = float(totals[1].item()) / max(known, 1.0)
    return {"loss": loss, "acc": acc, "mae": abs_err, "images": seen}


@torch.no_grad()
def validate(
    run: Run,
    model: nn.Module,
    data: Data,
    split: str,
    weights: UncertaintyWeights | None = None,
    tta: bool = False,
) -> dict[str, float]:
    """Mean loss, gender accuracy and age MAE of ``model`` on ``split`` (no augmentation).

    Under DDP every rank must call it: each scores a slice of ``split`` and the sums are added
    up, so all ranks return the same numbers.
    """
    cfg, device = run.cfg, run.device
    model.eval()
    head = model.config.get("age_head", "regression")
    n, rank, world = len(data.x[split]), distributed.rank(), distributed.world_size()
    lo, hi = n * rank // world, n * (rank + 1) // world
    x_all, age_all, gender_all = (v[split][lo:hi] for v in (data.x, data.age, data.gender))
    sums = torch.zeros(4, device=device)  # loss * n, right genders, age error, known genders
    for s in range(0, len(x_all), cfg.train.eval_batch_size):
        x = normalize(x_all[s : s + cfg.train.eval_batch_size], model.data_config)
        age = age_all[s : s + len(x)]
        gender = gender_all[s : s + len(x)]
        with autocast(device, run.amp):
            out = model(x)
            pred = forward_tta(model, x, True) if tta else None
        losses = recipe_loss(cfg, head, out, age, gender, weights)
        p_female = pred["p_female"] if tta else torch.sigmoid(out["gender"].float())
        pred_age = pred["age"] if tta else out["age"].float()
        known = gender >= 0
        right = (((p_female > 0.5) == (gender > 0.5)) & known).sum()
        error = range_error(pred_age, age).sum()
        sums += torch.stack([losses["loss"] * len(x), right, error, known.sum()])
    totals = distributed.sum_over_ranks(sums)
    loss, mae = (totals[[0, 2]] / n).tolist()
    return {"loss": loss, "acc": float(totals[1].item()) / max(float(totals[3].item()), 1.0),
            "mae": mae}  # fmt: skip


def end_epoch(run: Run, epoch: int, tr: dict, va: dict, seconds: float, plotted: float) -> float:
    """Record an epoch: history row, best epoch, checkpoints, curves (at most every
    ``PLOT_EVERY_S``), the epoch line. Returns when ``curves.png`` was last drawn.

    A loss that is not a number stops the run before anything of this epoch is written: the
    checkpoints keep the last good epoch."""
    if not (math.isfinite(tr["loss"]) and math.isfinite(va["loss"])):
        raise TrainingError(
            f"the loss became {tr['loss'] if not math.isfinite(tr['loss']) else va['loss']} in "
            f"epoch {epoch} (a learning rate too high?): the run stops; "
            + (f"its checkpoints keep epoch {epoch - 1}" if epoch > 1 else "nothing was saved")
        )
    lr = run.opt.param_groups[0]["lr"]
    row = {"epoch": epoch, **{f"train_{k}": tr[k] for k in ("loss", "acc", "mae")}}
    row.update({f"val_{k}": va[k] for k in ("loss", "acc", "mae")})
    row.update(lr=lr, seconds=round(seconds, 2), img_per_s=round(tr["images"] / seconds, 1))
    run.history.append(row)
    improved = va["loss"] < run.best_loss
    if improved:
        run.best_loss, run.best_epoch = va["loss"], epoch
    if distributed.rank() == 0:
        meta = {"epoch": epoch, "metrics": {"val": va, "train": tr}, "config": to_dict(run.cfg)}
        save_checkpoint(run.out / "last.safetensors", run.model, meta, seen=run.seen)
        if improved:
            save_checkpoint(run.out / "best.safetensors", run.model, meta, seen=run.seen)
        save_state(run, epoch)
        write_history(run.out / "history.csv", run.history)
        # a redraw costs 0.2-0.5 s: every epoch on a CPU, every few seconds' worth on a GPU
        if time.monotonic() - plotted >= PLOT_EVERY_S:
            plot_curves(run.history, run.out / "curves.png")
            plotted = time.monotonic()
    run.log(
        f"epoch {epoch:3d}/{run.cfg.train.epochs}  train loss {tr['loss']:.3f} acc "
        f"{tr['acc']:.3f} mae {tr['mae']:.2f} | val loss {va['loss']:.3f} acc {va['acc']:.3f} "
        f"mae {va['mae']:.2f}  lr {lr:.2e}  {seconds:.0f}s {row['img_per_s']:.0f} img/s"
        f"{'  * best' if improved else ''}"
    )
    return plotted


# --------------------------------------------------------------------------- main


def train(cfg: Config | None, resume: str | os.PathLike | None = None, quiet: bool = False) -> Path:
    """Train as ``cfg`` says; returns the run folder. ``resume`` continues a run from its
    ``last`` checkpoint (its own ``config.toml`` is used).

    Started by ``torchrun`` (``WORLD_SIZE`` > 1), the process joins a process group for the
    length of the call (nccl on ``cuda:LOCAL_RANK``, gloo on the CPU) and trains with
    DistributedDataParallel; ``train.batch_size`` is then the global batch, split evenly
    between the processes. Every rank returns once rank 0 has written the whole run folder.
    """
    if resume is not None:
        out = Path(resume)
        if not (out / "config.toml").is_file() or not (out / "last.state.pt").is_file():
            raise DataError(f"{resume} is not a run folder with a last checkpoint to resume")
        cfg = load_config(out / "config.toml")
    elif cfg.run.out:
        check_new_run_dir(Path(cfg.run.out))
    else:  # the name is a folder under runs/train: never a path that leads out of it
        check_run_name(cfg.run.name)
    check_config(cfg, list_models())
    t = cfg.train
    device = resolve_device(t.device)
    # torchrun's environment says how many processes there are before a group exists
    processes = distributed.world_size()
    if not distributed.is_distributed():
        processes = int(os.environ.get("WORLD_SIZE", "1"))
    if t.cuda_graphs and (device.type != "cuda" or t.compile or processes > 1):
        raise ConfigError(
            "train.cuda_graphs needs one CUDA GPU and train.compile=false "
            f"(here: device {device}, compile {str(t.compile).lower()}, {processes} processes)"
        )
    own_group = processes > 1 and not distributed.is_distributed()
    if own_group or distributed.is_distributed():
        device = distributed.process_device(device)
    if own_group:  # torchrun's environment says where rank 0 listens
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(cfg, resume, device, quiet)
    finally:
        if own_group:
            dist.destroy_process_group()


def _setup(
    cfg: Config, resume: str | os.PathLike | None, device: torch.device, quiet: bool = False
) -> tuple[Path, bool]:
    """The run folder (picked once, by rank 0) and whether this call made it; threads, cuDNN
    and the seeds."""
    t = cfg.train
    rank, world = distributed.rank(), distributed.world_size()
    if t.batch_size % world:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is the global batch: it must divide evenly "
            f"between the {world} processes"
        )
    if resume is not None:
        out = Path(resume)
    else:
        # the numbered folder is picked once, by rank 0, before anyone creates it
        picked = [run_dir(cfg) if rank == 0 else None]
        if distributed.is_distributed():
            dist.broadcast_object_list(picked, src=0)
        out = Path(picked[0])
    if device.type == "cpu":
        torch.set_num_threads(distributed.process_threads(t.threads, world, quiet or rank > 0))
    if device.type == "cuda":
        # the input shape never changes: let cuDNN time its kernels once and keep the fastest
        torch.backends.cudnn.benchmark = True
    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)
    created = rank == 0 and not out.exists()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    return out, created


def _train(cfg: Config, resume: str | os.PathLike | None, device: torch.device, quiet: bool):
    out, created = _setup(cfg, resume, device, quiet)
    try:
        return _run(cfg, resume, device, quiet or distributed.rank() > 0, out)
    except BaseException:
        # a run that failed before its first checkpoint leaves no folder behind (the next one
        # would be numbered past it); one that saved an epoch keeps it, for --resume
        if created and not any((out / f).exists() for f in RUN_FILES):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run(
    cfg: Config, resume: str | os.PathLike | None, device: torch.device, quiet: bool, out: Path
) -> Path:
    """Everything after the set-up: data, model, epochs, the final evaluation. ``quiet``: one
    voice, progress bars and epoch lines come from rank 0 only."""
    amp = use_amp(device, cfg.train.amp)
    model = build_model(cfg, device)
    data = _load_data(cfg, model, device, amp, out, quiet)
    run = build_run(cfg, model, data, device, amp, out, quiet)
    start = 1
    if resume is not None:
        start = resume_run(run)
        run.log(f"resuming {out} at epoch {start}")
    elif distributed.rank() == 0:
        fileio.write_text(out / "config.toml", to_toml(cfg))
    wrap_for_training(run, data)
    world = distributed.world_size()
    run.log(
        # the network model.init's checkpoint holds, whatever the recipe's [model] says
        f"{model.config.get('name', cfg.model.name)} ({count_parameters(run.model):,} params) on "
        f"{len(data.x['train']):,} images [{cfg.data.size}px {cfg.data.color}], device {device}"
        f"{' bf16' if amp else ''}, {torch.get_num_threads()} threads"
        f"{f' x {world} processes' if world > 1 else ''} -> {out}"
    )
    train_time, img_s = train_epochs(run, data, start)
    return finish(run, data, train_time, img_s)


def _load_data(
    cfg: Config, model: nn.Module, device: torch.device, amp: bool, out: Path, quiet: bool
) -> Data:
    """The prepared cache on ``device``, with a teacher's outputs when distilling, and the
    record of every image the model will have seen (what its start and its teacher saw too)."""
    data = load_data(cfg, model.data_config, device, out, quiet)
    if _distill(cfg):  # the teacher's outputs, once; what it saw can reach the student
        data.soft_gender, data.soft_age, teacher_seen = distill_targets(
            cfg, data.x["train"], model, amp
        )
        data.seen = data.seen + teacher_seen if teacher_seen is not None else data.seen
    if cfg.model.init:  # a fine-tuned model has seen what its start saw, and the new data
        init_seen = read_seen(resolve_checkpoint(cfg.model.init))
        data.seen = data.seen + init_seen if init_seen is not None else data.seen
    return data


def train_epochs(run: Run, data: Data, start: int) -> tuple[float, float]:
    """Epochs ``start``.. until ``train.epochs`` or early stopping; returns the training
    seconds (a resumed run's earlier epochs included) and this process's images a second."""
    t, device = run.cfg.train, run.device
    rank = distributed.rank()
    # seconds of the epochs a resumed run had done, then this process's own: images/second is
    # this process's images over its own time (history keeps no image counts)
    done_before, own_time, own_images = sum(h["seconds"] for h in run.history), 0.0, 0
    plotted, drawn = -math.inf, 0  # when curves.png was last drawn, and with how many epochs
    for epoch in range(start, t.epochs + 1):
        if distributed.is_distributed():
            # streams keyed by (seed, epoch, rank): --resume continues them with no saved state
            aug_seed, dropout_seed = distributed.rank_seeds(t.seed, epoch, rank)
            run.aug_gen.manual_seed(aug_seed)
            torch.manual_seed(dropout_seed)
        t0 = time.perf_counter()
        tr = train_one_epoch(run, data, epoch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        # DDP sends rank 0's BatchNorm statistics at each forward, yet every rank's last forward
        # moved its own: validate everywhere with rank 0's, the ones the checkpoint keeps.
        # (Buffers only: parameters that drifted apart must stay apart for the check below.)
        distributed.broadcast_state(run.model, buffers_only=True)
        va = validate(run, run.model, data, "val", run.weights)
        # va is summed over ranks, so every rank takes the same plateau and stopping decisions
        if run.sched is not None and not run.per_step:
            run.sched.step(va["loss"])
        own_time += seconds
        own_images += tr["images"]
        before = plotted
        plotted = end_epoch(run, epoch, tr, va, seconds, plotted)
        drawn = len(run.history) if plotted != before else drawn
        if t.early_stopping and epoch - run.best_epoch >= t.early_stopping:
            run.log(f"early stopping: no val-loss improvement for {t.early_stopping} epochs")
            break
    if rank == 0 and drawn < len(run.history):  # the last epochs were not drawn yet
        plot_curves(run.history, run.out / "curves.png")
    return done_before + own_time, own_images / own_time if own_time else 0.0


def finish(run: Run, data: Data, train_time: float, img_s: float) -> Path:
    """Check that every rank holds the same weights, score the best checkpoint on every split
    with the recipe's TTA, write ``metrics.json`` and put the test score into the checkpoint."""
    cfg, device, out = run.cfg, run.device, run.out
    rank, world = distributed.rank(), distributed.world_size()
    weights_digest = distributed.state_digest(run.weights) if run.weights is not None else ""
    lr = run.opt.param_groups[0]["lr"]
    agreed = (weights_digest, lr, run.best_epoch, len(run.history))
    digest = distributed.check_ranks_agree(run.model, *agreed)
    if world > 1:
        run.log(f"all {world} processes hold the same weights (sha256 {digest[:16]})")
    if rank == 0:
        best, _ = load_checkpoint(out / "best.safetensors", device)
    else:  # other machines may not see rank 0's disk: it sends them the weights instead
        best = blank_model(cfg).to(device).eval()
    distributed.broadcast_state(best)
    results: dict[str, Any] = {}
    scored, left_out = _unseen_test(run, data)
    # train too (no augmentation, eval mode): the train-val gap is the study's overfitting table
    for split in ("train", "val", "test"):
        if len(scored.x[split]):
            results[split] = validate(run, best, scored, split, None, tta=cfg.train.tta)
    metrics = _final_metrics(run, data, results, train_time, img_s, digest)
    if left_out is not None:
        metrics["test_left_out"] = left_out
    if rank == 0:
        fileio.write_json(out / "metrics.json", metrics)
        meta = read_meta(out / "best.safetensors")
        meta["metrics"]["test"] = results.get("test")
        keep = {k: meta[k] for k in ("epoch", "metrics", "config")}
        save_checkpoint(out / "best.safetensors", best, keep, seen=run.seen)
        # after the last write of the weights, so that it is newer than them: Predictor.load
        # opens the run folder with no torch and no export (export_target's file)
        export_onnx(out / "best.safetensors", out / "best.onnx")
    distributed.barrier(device)  # whichever rank returns first, the run folder is complete
    scores = "  ".join(
        f"{s} acc {r['acc']:.4f} mae {r['mae']:.3f}" for s, r in results.items() if s != "train"
    )
    tta = "flip TTA" if cfg.train.tta else "no TTA"
    if left_out is not None:
        scores += f" (without {left_out:,} test images its start or teacher saw, as evaluate does)"
    run.log(f"best epoch {run.best_epoch}: {scores}  ({tta}); training {img_s:.0f} img/s -> {out}")
    return out


def _unseen_test(run: Run, data: Data) -> tuple[Data, int | None]:
    """``data`` without the test images a run from ``model.init`` (or a teacher's) may have
    seen through its start, as evaluate leaves them out, and how many (None: none to)."""
    cfg = run.cfg
    if not (cfg.model.init or _distill(cfg)) or run.seen is None or data.cache is None:
        return data, None
    return without_seen_test(data, run.seen, cfg.data.cache or "the cache")


def _final_metrics(
    run: Run, data: Data, results: dict[str, Any], train_time: float, img_s: float, digest: str
) -> dict[str, Any]:
    """What ``metrics.json`` holds: the best checkpoint's scores, speed, and what ran."""
    cfg, device, world = run.cfg, run.device, distributed.world_size()
    return {
        "best_epoch": run.best_epoch,
        "epochs_run": len(run.history),
        "tta": cfg.train.tta,
        **{f"{s}_{k}": v for s, r in results.items() for k, v in r.items() if k != "loss"},
        "train_seconds": round(train_time, 1),
        "seconds_per_epoch": round(train_time / max(len(run.history), 1), 2),
        "peak_memory_mb": peak_memory_mb(device),
        "train_img_per_s": round(img_s, 1),
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "world_size": world,
        "last_sha256": digest,
        "amp": run.amp,
        "params": count_parameters(run.model),
        "train_images": len(data.x["train"]),
        "trained_on": cfg.data.train_splits,
        "host": platform.node(),
    }
