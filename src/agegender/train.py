"""Training: plain functions in reading order, no trainer framework.

``train(cfg)`` loads the prepared cache, builds the model by name, then for each epoch runs
:func:`train_one_epoch` and :func:`validate`, logs a row of ``history.csv``, writes
``last``/``best`` checkpoints atomically and redraws ``curves.png``. A killed run continues with
``train(cfg, resume=run_dir)``.

Started by ``torchrun``, each process trains on its share of every batch with
DistributedDataParallel; metrics are summed over processes, so every rank keeps the same
history and takes the same scheduler and early-stopping decisions, and rank 0 alone writes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from agegender.checkpoint import load_checkpoint, read_meta, save_checkpoint
from agegender.config import AugConfig, Config, load_config, to_dict, to_toml
from agegender.data import SPLITS, Cache, is_cache, open_cache, prepare
from agegender.errors import ConfigError, DataError
from agegender.inference import autocast, device_name, forward_tta, to_tensor
from agegender.losses import UncertaintyWeights, multitask_loss
from agegender.models import count_parameters, create_model, list_models, normalize

# torch.compile's modes; reduce-overhead replays each step as CUDA graphs, which removes the
# per-kernel launch cost that bounds small batches on a GPU (on the CPU it compiles as default)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PLOT_EVERY_S = 20.0  # least seconds between two redraws of curves.png during training

HISTORY_COLUMNS = (
    "epoch",
    "train_loss",
    "train_acc",
    "train_mae",
    "val_loss",
    "val_acc",
    "val_mae",
    "lr",
    "seconds",
    "img_per_s",
)


# --------------------------------------------------------------------------- setup


def resolve_device(name: str, option: str = "train.device") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu. ``option`` names the setting in error messages
    (``train.device`` for a recipe, ``--device`` for the commands that take the flag)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"{option}: unknown device {name!r}; valid: auto, cpu, cuda, cuda:N, mps"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}={name} but no CUDA GPU is available")
    return device


def use_amp(device: torch.device, amp: str) -> bool:
    """bf16 autocast: on CUDA, and on CPUs with native bf16 (AMX/AVX-512), where it is 2-3x
    faster than fp32; off on MPS and on other CPUs, where it is emulated and slow."""
    if amp == "off":
        return False
    if amp == "bf16":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(
            getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
            in ("AVX512", "AMX", "AVX512_BF16")
        )
    return False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_config(cfg: Config) -> None:
    """Raise a :class:`ConfigError` for values no run can use, before anything is written."""
    t, d, m = cfg.train, cfg.data, cfg.model
    bad = [
        (t.epochs < 1, "train.epochs must be >= 1"),
        (t.batch_size < 1, "train.batch_size must be >= 1"),
        (t.eval_batch_size < 1, "train.eval_batch_size must be >= 1"),
        (t.lr <= 0, "train.lr must be > 0"),
        (t.threads < 0, "train.threads must be >= 0 (0 = all cores)"),
        (t.seed < 0, "train.seed must be >= 0"),
        (t.grad_clip < 0, "train.grad_clip must be >= 0 (0 = off)"),
        (t.early_stopping < 0, "train.early_stopping must be >= 0 (0 = off)"),
        (not 0 <= t.warmup < 1, "train.warmup must be in [0, 1)"),
        (t.weight_decay < 0, "train.weight_decay must be >= 0"),
        (t.compile_mode not in COMPILE_MODES, f"train.compile_mode must be one of "
         f"{', '.join(COMPILE_MODES)}"),
        (not 16 <= d.size <= 1024, "data.size must be 16-1024 pixels (as prepare --size)"),
        (d.limit < 0, "data.limit must be >= 0 (0 = all)"),
        (d.split_seed < 0, "data.split_seed must be >= 0"),
        (m.dropout >= 1, "model.dropout must be below 1 (< 0 = the model's default)"),
        (m.name not in list_models(), f"unknown model.name {m.name!r}; registered: "
         f"{', '.join(list_models())}"),
    ]  # fmt: skip
    problems = [says for wrong, says in bad if wrong]
    if problems:
        raise ConfigError("; ".join(problems))


# what makes a folder a run: continuing it is --resume's job, and writing over it loses it
_RUN_FILES = ("metrics.json", "last.state.pt", "last.safetensors", "best.safetensors")


def _check_new_run_dir(out: Path) -> None:
    held = [f for f in _RUN_FILES if (out / f).exists()]
    if held:
        raise ConfigError(
            f"run.out={out} already holds a run ({', '.join(held)}): continue it with "
            f"`agegender train --resume {out}`, or give another run.out"
        )


def run_dir(cfg: Config) -> Path:
    """``run.out``, or ``runs/train/<name>``, ``<name>2``, ... (the first that does not exist)."""
    if cfg.run.out:
        return Path(cfg.run.out)
    base = Path("runs") / "train" / cfg.run.name
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{cfg.run.name}{k}")
    return path


# --------------------------------------------------------------------------- distributed


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world() -> int:
    return dist.get_world_size() if _distributed() else 1


def _local_rank() -> int:
    """The process's index on its own machine (torchrun's ``LOCAL_RANK``)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if _distributed() else 0


def _process_device(device: torch.device) -> torch.device:
    """torchrun starts one process per GPU: process ``LOCAL_RANK`` takes ``cuda:LOCAL_RANK``."""
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"distributed training runs on cuda or cpu, not {device.type}")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} GPUs: "
            "start at most one process per GPU (torchrun --nproc_per_node)"
        )
    device = torch.device("cuda", local)
    torch.cuda.set_device(device)
    return device


def _barrier(device: torch.device) -> None:
    if _distributed():
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over processes, in place (``x`` itself in a single process)."""
    if _distributed():
        dist.all_reduce(x)
    return x


def _broadcast_state(module: nn.Module, buffers_only: bool = False) -> None:
    """Copy rank 0's parameters and buffers (or its buffers only) into every rank's ``module``."""
    if _distributed():
        for v in module.buffers() if buffers_only else module.state_dict().values():
            dist.broadcast(v, 0)


def _rank_seeds(seed: int, epoch: int, rank: int) -> tuple[int, int]:
    """Two independent seeds for this rank's augmentation and dropout in this epoch."""
    a, b = np.random.SeedSequence([seed % 2**32, epoch, rank]).generate_state(2)
    return int(a), int(b)


def _state_digest(module: nn.Module) -> str:
    """SHA-256 of the state dict (keys sorted): a checkpoint's tensors hash the same."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_ranks_agree(model: nn.Module, *facts: Any) -> str:
    """The weights' digest, after checking every rank holds the same weights and ``facts``.

    Ranks that drifted apart (a gradient not averaged, a decision taken on local numbers) would
    otherwise go unnoticed: only rank 0's weights are saved.
    """
    digest = _state_digest(model)
    if _distributed():
        mine = (digest, *facts)
        every: list[Any] = [None] * _world()
        dist.all_gather_object(every, mine)
        if any(other != mine for other in every):
            raise RuntimeError(
                f"ranks disagree after training; (weights sha256, ...) per rank: {every}"
            )
    return digest


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile and DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


# --------------------------------------------------------------------------- data


@dataclass
class Data:
    """The splits as uint8 tensors ``(N, C, H, W)`` plus labels, on the training device."""

    cache: Cache
    x: dict[str, torch.Tensor]
    age: dict[str, torch.Tensor]
    gender: dict[str, torch.Tensor]


def load_data(cfg: Config, device: torch.device, out: Path, quiet: bool = False) -> Data:
    """Open (or prepare) the cache and put the splits on ``device``.

    The whole uint8 training set goes to the device once (21k faces at 128 px gray are 340 MB),
    so a step never waits on a loader and augmentation runs there too.
    """
    d = cfg.data
    if d.root:
        cache_dir = Path(d.cache) if d.cache else out / "cache"
        # One writer at a time: rank 0 prepares, then the first process of every other machine
        # (which reuses it on a shared disk, or builds its own); the others wait, then read.
        for my_turn in (_rank() == 0, _rank() > 0 and _local_rank() == 0):
            if my_turn:
                prepare(
                    [r.strip() for r in d.root.split(",")],
                    cache_dir,
                    size=d.size,
                    color=d.color,
                    seed=d.split_seed,
                    quiet=quiet,
                )
            _barrier(device)
    elif d.cache:
        cache_dir = Path(d.cache)
        if not is_cache(cache_dir):
            open_cache(cache_dir)  # raises the helpful error
    else:
        raise ConfigError("set data.cache (a prepared cache) or data.root (image folders)")
    cache = open_cache(cache_dir)
    train_splits = [s.strip() for s in d.train_splits.split(",")]
    if not set(train_splits) <= set(SPLITS):
        raise ConfigError(f"data.train_splits must name splits from {SPLITS}, got {d.train_splits}")
    idx = {
        "train": np.sort(np.concatenate([cache.indices(s) for s in train_splits])),
        "val": cache.indices("val"),
        "test": cache.indices("test"),
    }
    if d.limit > 0 and len(idx["train"]) > d.limit:
        rng = np.random.default_rng(cfg.train.seed)
        # only training is reduced: val and test stay whole, so reduced runs stay comparable
        idx["train"] = np.sort(rng.choice(idx["train"], d.limit, replace=False))
    if len(idx["train"]) == 0 or len(idx["val"]) == 0:
        raise DataError(f"{cache_dir}: the train or val split is empty")
    if d.color != cache.color:
        raise ConfigError(
            f"data.color={d.color} but {cache_dir} holds {cache.color} images: prepare a "
            f"{d.color} cache (agegender prepare ... --color {d.color}) or set data.color"
        )
    x, age, gender = {}, {}, {}
    for split, rows in idx.items():
        # Fancy indexing a memmap reads just those rows; (N, H, W, C) -> (N, C, H, W) view
        x[split] = _resize(to_tensor(cache.images[rows], device), d.size)
        age[split] = torch.as_tensor(cache.age[rows], dtype=torch.float32, device=device)
        gender[split] = torch.as_tensor(cache.gender[rows], dtype=torch.float32, device=device)
    return Data(cache, x, age, gender)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 batch once at load time, so one 128 px cache serves 64-160 px runs."""
    if x.shape[-1] == size:
        return x
    parts = []
    for s in range(0, len(x), 1024):
        y = F.interpolate(
            x[s : s + 1024].float(),
            size=(size, size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        parts.append(y.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(parts).contiguous(memory_format=torch.channels_last)


def build_model(cfg: Config, data_size: int, color: str) -> nn.Module:
    m = cfg.model
    kwargs: dict[str, Any] = {"in_chans": 1 if color == "gray" else 3, "img_size": data_size}
    is_seed = m.name.startswith("seed-cnn")
    if m.age_head:
        if is_seed and m.age_head != "regression":
            raise ConfigError(f"model.age_head={m.age_head} needs resnet-mt; seed-cnn regresses")
        if not is_seed:
            kwargs["age_head"] = m.age_head
    if m.bn:
        if not is_seed:
            raise ConfigError("model.bn applies to the seed-cnn family (resnet-mt always has BN)")
        kwargs["bn"] = True
    if m.dropout >= 0:
        kwargs["dropout" if is_seed else "drop"] = m.dropout
    return create_model(m.name, **kwargs)


def to_channels_last(model: nn.Module) -> nn.Module:
    """``model`` with NHWC conv weights, except those with one input channel (a gray stem).

    For those both layouts are valid and autograd hands back a contiguous gradient, which DDP
    would copy into a differently strided bucket at every step (it warns about it).
    """
    model = model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        if p.ndim == 4 and p.shape[1] == 1:
            p.data = p.data.contiguous()
    return model


def build_optimizer(cfg: Config, params: list[dict[str, Any]]) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, nesterov=t.momentum > 0)
    if t.optimizer == "rmsprop":  # Keras defaults (rho 0.9, eps 1e-7), as the study used
        return torch.optim.RMSprop(params, lr=t.lr, alpha=0.9, eps=1e-7)
    # One fused kernel updates every tensor: on CUDA the foreach path launches dozens per step,
    # which is what bounds a small net's step time at small batches; on the CPU the fused step
    # of resnet-mt's AdamW takes 2.3 ms instead of 12.8 (1 thread)
    fused = all(p.device.type in ("cuda", "cpu") for g in params for p in g["params"]) or None
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, eps=1e-7, fused=fused)
    return torch.optim.AdamW(params, lr=t.lr, fused=fused)


def param_groups(model: nn.Module, extra: nn.Module | None, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only: decaying biases, BN and task weights only hurts."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if extra is not None:
        no_decay += list(extra.parameters())
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_scheduler(cfg: Config, opt: torch.optim.Optimizer, steps_per_epoch: int):
    """Returns ``(scheduler, per_step)``: one-cycle and cosine step per batch, plateau per epoch."""
    t = cfg.train
    total = max(t.epochs * steps_per_epoch, 1)
    if t.scheduler == "onecycle":
        s = torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=t.lr,
            total_steps=total,
            pct_start=t.warmup,
            div_factor=25,
            final_div_factor=1e3,
        )
        return s, True
    if t.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=total, eta_min=t.lr * 1e-3
        ), True
    if t.scheduler == "plateau":
        s = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, factor=t.plateau_factor, patience=t.plateau_patience, min_lr=t.lr * 1e-3
        )
        return s, False
    return None, False


# --------------------------------------------------------------------------- augmentation


def augment(
    x: torch.Tensor,
    aug: AugConfig,
    gen: torch.Generator | None = None,
    draws: torch.Tensor | None = None,
) -> torch.Tensor:
    """Random rotation, flip, zoom, shift (one affine warp) and brightness/contrast, per image.

    ``x``: normalised float ``(B, C, H, W)`` in [-1, 1] on any device; the whole batch is
    warped by one ``grid_sample`` call instead of image by image in Python. The randomness is
    ``draws``, ``(B, 7)`` uniform in [0, 1), drawn here from ``gen`` when not given.
    """
    b = x.shape[0]
    if draws is None:
        # One draw for every parameter of every image: on a GPU each op here is a kernel
        # launch, and small batches are bound by launches, not arithmetic
        draws = torch.rand(b, 7, device=x.device, generator=gen)
    r = draws * 2 - 1  # uniform in [-1, 1]
    angle, zoom, flip, dx, dy, contrast, brightness = r.unbind(1)
    angle = angle * math.radians(aug.rotate)
    zoom = 1 + zoom * aug.scale
    flip = torch.where(flip < 0, -1.0, 1.0) if aug.flip else torch.ones_like(flip)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # affine_grid maps output to input coordinates in [-1, 1]; a shift of f of the side is 2f
    shift = 2 * aug.shift
    theta = torch.stack([cos * flip, -sin, dx * shift, sin * flip, cos, dy * shift], 1)
    grid = F.affine_grid(theta.view(b, 2, 3).to(x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # (x - mean) * contrast + mean + brightness, as one pass over the pixels
    contrast = (1 + contrast * aug.contrast).view(b, 1, 1, 1)
    brightness = (brightness * (aug.brightness * 2)).view(b, 1, 1, 1)  # [-1, 1] is 2 wide
    offset = x.mean(dim=(1, 2, 3), keepdim=True) * (1 - contrast) + brightness
    return torch.addcmul(offset, x, contrast).clamp_(-1, 1)


# --------------------------------------------------------------------------- epochs


class TrainForward(nn.Module):
    """What a training step computes before ``backward``: a uint8 batch is normalised,
    augmented (with ``draws``, see :func:`augment`; ignored when ``train.augment`` is off),
    put through the model (bf16 autocast when ``amp``) and scored by the recipe's loss.

    ``forward(x, draws, age, gender)`` returns ``(loss, mae, correct)``: the loss to
    backpropagate, the batch's mean absolute age error and its number of right genders.
    One module with tensors in and out, so that ``train.cuda_graphs`` can capture the whole of
    it, and its backward, as CUDA graphs (see :func:`graph_train_forward`).
    """

    def __init__(
        self, cfg: Config, model: nn.Module, weights: UncertaintyWeights | None, amp: bool
    ) -> None:
        super().__init__()
        self.cfg, self.model, self.weights, self.amp = cfg, model, weights, amp
        plain = _unwrap(model)
        self.head = plain.config.get("age_head", "regression")
        self.data_config = plain.data_config

    def forward(
        self, x: torch.Tensor, draws: torch.Tensor, age: torch.Tensor, gender: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = self.cfg.train
        x = normalize(x, self.data_config)
        if t.augment:
            x = augment(x, self.cfg.aug, draws=draws)
        if t.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # no cast cache: CUDA graph capture needs it off, and each weight is cast once anyway
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.amp, cache_enabled=False):
            out = self.model(x)
        losses = _loss(self.cfg, self.head, out, age, gender, self.weights)
        correct = ((out["gender"].detach().float() > 0) == (gender > 0.5)).float().sum()
        return losses["loss"], losses["mae"], correct


def graph_train_forward(forward: TrainForward, sample: tuple[torch.Tensor, ...]) -> nn.Module:
    """``forward`` with its forward and backward passes captured as CUDA graphs and replayed
    at each call (``torch.cuda.make_graphed_callables``): a step then launches a few kernels
    instead of hundreds, which is what bounds small batches on a GPU. No compilation.

    ``sample``: ``(x, draws, age, gender)`` of the shape every call will have (the recipe's
    batch). Capturing runs a few warm-up steps; the BatchNorm statistics they move are put
    back. The graphs serve training mode only; in eval mode the module runs as usual.
    """
    # Each call copies its inputs into these tensors, which the graphs read: copies, never
    # views of the training set, or every step would overwrite its first batch
    sample = tuple(v.clone() for v in sample)
    buffers = {k: v.clone() for k, v in forward.named_buffers()}
    graphed = torch.cuda.make_graphed_callables(forward, sample, allow_unused_input=True)
    with torch.no_grad():
        for k, v in forward.named_buffers():
            v.copy_(buffers[k])
    return graphed


def _loss(cfg: Config, head: str, out, age, gender, weights: UncertaintyWeights | None):
    out = {k: v.float() for k, v in out.items()}
    if weights is not None:
        return weights(out, age, gender, head=head, sigma=cfg.loss.sigma)
    return multitask_loss(
        out,
        age,
        gender,
        head=head,
        w_age=cfg.loss.w_age,
        w_gender=cfg.loss.w_gender,
        sigma=cfg.loss.sigma,
    )


def train_one_epoch(
    cfg: Config,
    model: nn.Module,
    data: Data,
    opt,
    sched,
    per_step: bool,
    weights,
    device: torch.device,
    amp: bool,
    gen: torch.Generator,
    epoch: int,
    quiet: bool = False,
    aug_gen: torch.Generator | None = None,
    forward: nn.Module | None = None,
) -> dict[str, float]:
    """One pass over the shuffled training set; returns mean loss, gender accuracy, age MAE
    and the number of images, over all processes.

    ``model`` may be wrapped (torch.compile, DistributedDataParallel). ``gen`` shuffles and
    must be in the same state on every rank; ``aug_gen`` (default ``gen``) augments. Under
    DDP each rank takes every ``world``-th image of each global batch of ``train.batch_size``.
    ``forward`` (default ``TrainForward(cfg, model, weights, amp)``) is the step's forward,
    e.g. one made by :func:`graph_train_forward`.
    """
    from tqdm import tqdm

    t = cfg.train
    model.train()
    forward = TrainForward(cfg, model, weights, amp) if forward is None else forward
    rank, world = _rank(), _world()
    aug_gen = gen if aug_gen is None else aug_gen
    x_all, n = data.x["train"], len(data.x["train"])
    perm = torch.randperm(n, device=device, generator=gen)
    steps = n // t.batch_size if n >= t.batch_size else 1  # drop the ragged last batch
    # Sums stay on the device: a .item() per step would stall the GPU queue
    sums = torch.zeros(3, device=device)  # loss * batch, correct genders, age absolute error
    no_draws = torch.zeros(0, device=device)  # what a CUDA graph takes when nothing is drawn
    seen = 0
    bar = tqdm(
        range(steps),
        desc=f"epoch {epoch}/{t.epochs}",
        unit="step",
        leave=False,
        file=sys.stderr,
        disable=quiet,
    )
    for step in bar:
        idx = perm[step * t.batch_size : (step + 1) * t.batch_size][rank::world]
        b = len(idx)
        draws = torch.rand(b, 7, device=device, generator=aug_gen) if t.augment else no_draws
        age, gender = data.age["train"][idx], data.gender["train"][idx]
        loss, mae, correct = forward(x_all[idx], draws, age, gender)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if weights is not None and world > 1:
            # the learnt task weights sit outside the DDP module: average their gradients here
            for p in weights.parameters():
                dist.all_reduce(p.grad)
                p.grad.div_(world)
        if t.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        if per_step:
            sched.step()
        with torch.no_grad():
            sums += torch.stack([loss.detach() * b, correct, mae * b])
            seen += b
        if not quiet and step % 25 == 0:  # reading the loss waits for the device: rarely
            bar.set_postfix(loss=f"{loss.item():.3f}")
    totals = _sum_over_ranks(torch.cat([sums, torch.tensor([float(seen)], device=device)]))
    seen = int(totals[3].item())
    loss, correct, abs_err = (totals[:3] / max(seen, 1)).tolist()
    return {"loss": loss, "acc": correct, "mae": abs_err, "images": seen}


@torch.no_grad()
def validate(
    cfg: Config,
    model: nn.Module,
    data: Data,
    split: str,
    device: torch.device,
    amp: bool,
    weights=None,
    tta: bool = False,
) -> dict[str, float]:
    """Mean loss, gender accuracy and age MAE on ``split`` (no augmentation).

    Under DDP every rank must call it: each scores a slice of ``split`` and the sums are added
    up, so all ranks return the same numbers.
    """
    model.eval()
    head = model.config.get("age_head", "regression")
    n, rank, world = len(data.x[split]), _rank(), _world()
    lo, hi = n * rank // world, n * (rank + 1) // world
    x_all, age_all, gender_all = (v[split][lo:hi] for v in (data.x, data.age, data.gender))
    sums = torch.zeros(3, device=device)
    for s in range(0, len(x_all), cfg.train.eval_batch_size):
        x = normalize(x_all[s : s + cfg.train.eval_batch_size], model.data_config)
        age = age_all[s : s + len(x)]
        gender = gender_all[s : s + len(x)]
        with autocast(device, amp):
            out = model(x)
            pred = forward_tta(model, x, True) if tta else None
        losses = _loss(cfg, head, out, age, gender, weights)
        p_female = pred["p_female"] if tta else torch.sigmoid(out["gender"].float())
        pred_age = pred["age"] if tta else out["age"].float()
        sums += torch.stack(
            [
                losses["loss"] * len(x),
                ((p_female > 0.5) == (gender > 0.5)).sum(),
                (pred_age - age).abs().sum(),
            ]
        )
    loss, acc, mae = (_sum_over_ranks(sums) / n).tolist()
    return {"loss": loss, "acc": acc, "mae": mae}


# --------------------------------------------------------------------------- artefacts


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """The study's three plots: gender accuracy, overall loss and age MAE, train vs val."""
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(14, 4))
    axes = fig.subplots(1, 3)
    for ax, key, title in zip(
        axes, ("acc", "loss", "mae"), ("Gender accuracy", "Overall loss", "Age MAE (years)")
    ):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", ms=3, label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "o-", ms=3, label="validation")
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, HISTORY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for h in history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in h.items()})
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _save_state(path: Path, **state: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


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
        _check_new_run_dir(Path(cfg.run.out))
    check_config(cfg)
    t = cfg.train
    device = resolve_device(t.device)
    # torchrun's environment says how many processes there are before a group exists
    processes = _world() if _distributed() else int(os.environ.get("WORLD_SIZE", "1"))
    if t.cuda_graphs and (device.type != "cuda" or t.compile or processes > 1):
        raise ConfigError(
            "train.cuda_graphs needs one CUDA GPU and train.compile=false "
            f"(here: device {device}, compile {str(t.compile).lower()}, {processes} processes)"
        )
    own_group = processes > 1 and not _distributed()
    if own_group or _distributed():
        device = _process_device(device)
    if own_group:  # torchrun's environment says where rank 0 listens
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(cfg, resume, device, quiet)
    finally:
        if own_group:
            dist.destroy_process_group()


def _train(
    cfg: Config, resume: str | os.PathLike | None, device: torch.device, quiet: bool
) -> Path:
    t = cfg.train
    rank, world = _rank(), _world()
    if t.batch_size % world:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is the global batch: it must divide evenly "
            f"between the {world} processes"
        )
    quiet = quiet or rank > 0  # one voice: progress bars and epoch lines come from rank 0
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    if resume is not None:
        out = Path(resume)
    else:
        # the numbered folder is picked once, by rank 0, before anyone creates it
        picked = [run_dir(cfg) if rank == 0 else None]
        if _distributed():
            dist.broadcast_object_list(picked, src=0)
        out = Path(picked[0])
    if device.type == "cpu":
        # torchrun starts LOCAL_WORLD_SIZE processes per machine: they share its cores
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if world > 1 else 1
        torch.set_num_threads(t.threads or max((os.cpu_count() or 1) // local_world, 1))
    amp = use_amp(device, t.amp)
    if device.type == "cuda":
        # the input shape never changes: let cuDNN time its kernels once and keep the fastest
        torch.backends.cudnn.benchmark = True
    seed_everything(t.seed)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    data = load_data(cfg, device, out, quiet)
    model = build_model(cfg, cfg.data.size, cfg.data.color).to(device)
    if t.channels_last:
        model = to_channels_last(model)
    weights = UncertaintyWeights().to(device) if cfg.loss.uncertainty else None
    opt = build_optimizer(cfg, param_groups(model, weights, t.weight_decay))
    steps_per_epoch = max(len(data.x["train"]) // t.batch_size, 1)
    sched, per_step = build_scheduler(cfg, opt, steps_per_epoch)
    gen = torch.Generator(device=device)
    gen.manual_seed(t.seed)
    # Shuffling (gen) must agree across ranks, augmentation and dropout must not, or the ranks
    # would augment and drop out their shards in lockstep; see the start of each epoch below.
    aug_gen = torch.Generator(device=device) if _distributed() else gen
    history: list[dict[str, Any]] = []
    best_loss, best_epoch, start = math.inf, 0, 1
    if resume is not None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        # every rank reads what rank 0 wrote (several machines need a shared disk for this)
        try:
            state = torch.load(out / "last.state.pt", map_location=device, weights_only=True)
            model.load_state_dict(load_file(str(out / "last.safetensors"), device=str(device)))
            opt.load_state_dict(state["optimizer"])
            if sched is not None:
                sched.load_state_dict(state["scheduler"])
            if weights is not None:
                weights.load_state_dict(state["weights"])
            gen.set_state(state["generator"].cpu())  # a CUDA generator's state is a CPU tensor
            torch.set_rng_state(state["torch_rng"].cpu())
            if device.type == "cuda" and "cuda_rng" in state:  # dropout draws from it there
                torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
            best_loss, best_epoch = state["best_loss"], state["best_epoch"]
            start = state["epoch"] + 1
        except (RuntimeError, OSError, KeyError, ValueError, UnpicklingError, SafetensorError) as e:
            # a file cut short by a full disk, or edited: say which, not PyTorch's internals
            raise DataError(
                f"cannot resume {out}: its last checkpoint is damaged ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''}); best.safetensors may "
                "still load"
            ) from None
        history = _read_history(out / "history.csv")
        log(f"resuming {out} at epoch {start}")
    elif rank == 0:
        (out / "config.toml").write_text(to_toml(cfg))
    train_model: nn.Module = model
    if _distributed():
        # rank 0's weights are broadcast here; gradients are averaged in backward
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if t.compile:  # around the DDP module, so that it compiles between gradient buckets
        train_model = torch.compile(train_model, mode=t.compile_mode)
    forward = TrainForward(cfg, train_model, weights, amp)
    if t.cuda_graphs:
        b = min(t.batch_size, len(data.x["train"]))  # every step's batch: the ragged is dropped
        draws = torch.rand(b, 7, device=device) if t.augment else torch.zeros(0, device=device)
        sample = (data.x["train"][:b], draws, data.age["train"][:b], data.gender["train"][:b])
        forward = graph_train_forward(forward, sample)

    n_params = count_parameters(model)
    log(
        f"{cfg.model.name} ({n_params:,} params) on {len(data.x['train']):,} images "
        f"[{cfg.data.size}px {cfg.data.color}], device {device}"
        f"{' bf16' if amp else ''}, {torch.get_num_threads()} threads"
        f"{f' x {world} processes' if world > 1 else ''} -> {out}"
    )
    train_time, train_images = sum(h["seconds"] for h in history), 0
    plotted, drawn = -math.inf, 0  # when curves.png was last drawn, and with how many epochs
    for epoch in range(start, t.epochs + 1):
        if _distributed():
            # streams keyed by (seed, epoch, rank): --resume continues them with no saved state
            aug_seed, dropout_seed = _rank_seeds(t.seed, epoch, rank)
            aug_gen.manual_seed(aug_seed)
            torch.manual_seed(dropout_seed)
        t0 = time.perf_counter()
        tr = train_one_epoch(
            cfg,
            train_model,
            data,
            opt,
            sched,
            per_step,
            weights,
            device,
            amp,
            gen,
            epoch,
            quiet,
            aug_gen=aug_gen,
            forward=forward,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        # DDP sends rank 0's BatchNorm statistics at each forward, yet every rank's last forward
        # moved its own: validate everywhere with rank 0's, the ones the checkpoint keeps.
        # (Buffers only: parameters that drifted apart must stay apart for the check below.)
        _broadcast_state(model, buffers_only=True)
        va = validate(cfg, model, data, "val", device, amp, weights)
        lr = opt.param_groups[0]["lr"]
        # va is summed over ranks, so every rank takes the same plateau and stopping decisions
        if sched is not None and not per_step:
            sched.step(va["loss"])
        train_time += seconds
        train_images += tr["images"]
        row = {
            "epoch": epoch,
            "train_loss": tr["loss"],
            "train_acc": tr["acc"],
            "train_mae": tr["mae"],
            "val_loss": va["loss"],
            "val_acc": va["acc"],
            "val_mae": va["mae"],
            "lr": lr,
            "seconds": round(seconds, 2),
            "img_per_s": round(tr["images"] / seconds, 1),
        }
        history.append(row)
        improved = va["loss"] < best_loss
        if improved:
            best_loss, best_epoch = va["loss"], epoch
        if rank == 0:
            meta = {"epoch": epoch, "metrics": {"val": va, "train": tr}, "config": to_dict(cfg)}
            save_checkpoint(out / "last.safetensors", model, meta)
            if improved:
                save_checkpoint(out / "best.safetensors", model, meta)
            _save_state(
                out / "last.state.pt",
                optimizer=opt.state_dict(),
                scheduler=sched.state_dict() if sched is not None else {},
                weights=weights.state_dict() if weights is not None else {},
                generator=gen.get_state(),
                torch_rng=torch.get_rng_state(),
                **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
                epoch=epoch,
                best_loss=best_loss,
                best_epoch=best_epoch,
            )
            _write_history(out / "history.csv", history)
            # a redraw costs 0.2-0.5 s: every epoch on a CPU, every few seconds' worth on a GPU
            if time.monotonic() - plotted >= PLOT_EVERY_S:
                plot_curves(history, out / "curves.png")
                plotted, drawn = time.monotonic(), len(history)
        log(
            f"epoch {epoch:3d}/{t.epochs}  loss {tr['loss']:.3f}/{va['loss']:.3f}  "
            f"acc {tr['acc']:.3f}/{va['acc']:.3f}  mae {tr['mae']:.2f}/{va['mae']:.2f}  "
            f"lr {lr:.2e}  {seconds:.0f}s {row['img_per_s']:.0f} img/s"
            f"{'  *' if improved else ''}"
        )
        if t.early_stopping and epoch - best_epoch >= t.early_stopping:
            log(f"early stopping: no val-loss improvement for {t.early_stopping} epochs")
            break
    if rank == 0 and drawn < len(history):  # the last epochs were not drawn yet
        plot_curves(history, out / "curves.png")
    digest = _check_ranks_agree(
        model,
        _state_digest(weights) if weights is not None else "",
        opt.param_groups[0]["lr"],
        best_epoch,
        len(history),
    )
    if world > 1:
        log(f"all {world} processes hold the same weights (sha256 {digest[:16]})")

    # Final numbers: the best checkpoint on val and test, with the recipe's TTA
    if rank == 0:
        best, _ = load_checkpoint(out / "best.safetensors", device)
    else:  # other machines may not see rank 0's disk: it sends them the weights instead
        best = build_model(cfg, cfg.data.size, cfg.data.color).to(device).eval()
    _broadcast_state(best)
    results: dict[str, Any] = {}
    # train too (no augmentation, eval mode): the train-val gap is the study's overfitting table
    for split in ("train", "val", "test"):
        if len(data.x[split]):
            results[split] = validate(cfg, best, data, split, device, amp, None, tta=t.tta)
    img_s = train_images / train_time if train_images and train_time else 0.0
    metrics = {
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "tta": t.tta,
        **{f"{s}_{k}": v for s, r in results.items() for k, v in r.items() if k != "loss"},
        "train_seconds": round(train_time, 1),
        "seconds_per_epoch": round(train_time / max(len(history), 1), 2),
        "peak_memory_mb": _peak_memory_mb(device),
        "train_img_per_s": round(img_s, 1),
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "world_size": world,
        "last_sha256": digest,
        "amp": amp,
        "params": n_params,
        "train_images": len(data.x["train"]),
        "trained_on": cfg.data.train_splits,
        "host": platform.node(),
    }
    if rank == 0:
        _write_json(out / "metrics.json", metrics)
        meta = read_meta(out / "best.safetensors")
        meta["metrics"]["test"] = results.get("test")
        save_checkpoint(
            out / "best.safetensors", best, {k: meta[k] for k in ("epoch", "metrics", "config")}
        )
    _barrier(device)  # whichever rank returns first, the run folder is complete
    scores = "  ".join(
        f"{s} acc {r['acc']:.4f} mae {r['mae']:.3f}" for s, r in results.items() if s != "train"
    )
    tta = "flip TTA" if t.tta else "no TTA"
    log(f"best epoch {best_epoch}: {scores}  ({tta}); training {img_s:.0f} img/s -> {out}")
    return out


def _peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory on CUDA; the process's peak resident memory elsewhere."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
    except ImportError:  # Windows
        return float("nan")


def _read_history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [
            {k: (int(v) if k == "epoch" else float(v)) for k, v in r.items()}
            for r in csv.DictReader(f)
        ]
