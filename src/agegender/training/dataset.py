"""A prepared cache's splits as uint8 tensors on the training device, with their labels, the
record of what the model will have seen, and, when distilling, a teacher's outputs; and the
model a recipe trains (fresh, or from ``model.init``'s weights to fine-tune)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from agegender.core.config import Config
from agegender.core.errors import ConfigError, DataError
from agegender.data.cache import Cache, balance_weights, is_cache, open_cache
from agegender.data.near_dups import SeenRecord
from agegender.data.prepare import prepare
from agegender.data.utkface import SPLITS
from agegender.inference.model_files import read_meta, resolve_checkpoint
from agegender.training import distributed
from agegender.training.checkpoint import load_checkpoint
from agegender.training.models import create_model, from_config, to_channels_last
from agegender.training.torch_backend import to_tensor
from agegender.vision.images import preprocess_batch


@dataclass
class Data:
    """The splits as uint8 tensors ``(N, C, H, W)`` plus labels, on the training device."""

    cache: Cache | None
    x: dict[str, torch.Tensor]
    age: dict[str, torch.Tensor]  # (N, 2): (low, high) years, equal for a whole-years label
    gender: dict[str, torch.Tensor]  # (N,): 0 male, 1 female, -1 not known
    seen: SeenRecord | None = None  # what the model trains and validates on, for its checkpoints
    soft_gender: torch.Tensor | None = None  # a teacher's P(female) per training image
    soft_age: torch.Tensor | None = None  # ... and its age distribution (N, K), maybe (N, 0)
    weights: torch.Tensor | None = None  # how often each training image is drawn (data.balance)


def _cache_dir(
    cfg: Config, data_config: dict, device: torch.device, out: Path, quiet: bool
) -> Path:
    """The cache to train on: ``data.cache``, or ``data.root`` prepared into it first."""
    d = cfg.data
    if not d.root:
        if not d.cache:
            raise ConfigError("set data.cache (a prepared cache) or data.root (image folders)")
        if not is_cache(d.cache):
            open_cache(d.cache)  # raises the helpful error
        return Path(d.cache)
    cache_dir = Path(d.cache) if d.cache else out / "cache"
    # One writer at a time: rank 0 prepares, then the first process of every other machine
    # (which reuses it on a shared disk, or builds its own); the others wait, then read.
    rank = distributed.rank()
    for my_turn in (rank == 0, rank > 0 and distributed.local_rank() == 0):
        if my_turn:
            roots = [r.strip() for r in d.root.split(",")]
            prepare(roots, cache_dir, data_config, seed=d.split_seed, quiet=quiet)
        distributed.barrier(device)
    return cache_dir


def load_data(
    cfg: Config, data_config: dict, device: torch.device, out: Path, quiet: bool = False
) -> Data:
    """Open (or prepare) the cache and put the splits on ``device``, as ``data_config`` (the
    model's) says: a cache of another size is resized by the one resize prediction uses too.

    The whole uint8 training set goes to the device once (21k faces at 128 px gray are 340 MB),
    so a step never waits on a loader and augmentation runs there too.
    """
    d = cfg.data
    cache_dir = _cache_dir(cfg, data_config, device, out, quiet)
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
        images = preprocess_batch(cache.images[rows], data_config)
        x[split] = to_tensor(images, device).contiguous(memory_format=torch.channels_last)
        # (N, 2): each label's (low, high) years, equal for a whole age (see training.losses)
        bounds = np.stack([cache.age_low[rows], cache.age_high[rows]], axis=1)
        age[split] = torch.as_tensor(bounds, dtype=torch.float32, device=device)
        # -1 where the gender is not known: the losses and accuracies leave those faces out
        gender[split] = torch.as_tensor(cache.gender[rows], dtype=torch.float32, device=device)
    rows = np.concatenate([idx["train"], idx["val"]])
    seen = SeenRecord.of([cache.content_hash[i] for i in rows], cache.images[rows])
    data = Data(cache, x, age, gender, seen)
    if d.balance != "none":
        w = balance_weights(
            cache.race[idx["train"]], cache.age[idx["train"]], d.balance, d.balance_power
        )
        data.weights = torch.as_tensor(w, dtype=torch.float32, device=device)
    return data


# --------------------------------------------------------------------------- model and optimizer


def blank_model(cfg: Config) -> nn.Module:
    """The recipe's network with fresh weights: the one ``model.init`` belongs to, if set."""
    if cfg.model.init:
        spec = dict(read_meta(resolve_checkpoint(cfg.model.init))["model"])
        return create_model(spec.pop("name"), **spec)
    return from_config(cfg.model, cfg.data.size, cfg.data.color)


def build_model(cfg: Config, device: torch.device) -> nn.Module:
    """The model the recipe names on ``device``: initialised from the torch seed, or from the
    weights of ``model.init`` (fine-tuning); ``train.freeze``'s parameters left as they are."""
    if cfg.model.init:
        model, _ = load_checkpoint(resolve_checkpoint(cfg.model.init), device)
        model.train()
        if hasattr(model, "child_temperature"):  # fitted to the start, not to what it becomes
            model.child_temperature = model.config["child_temperature"] = 1.0
    else:
        model = blank_model(cfg).to(device)
    prefixes = [p.strip() for p in cfg.train.freeze.split(",") if p.strip()]
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        hit = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not hit:
            tops = sorted({n.rsplit(".", 2)[0] for n in names})
            raise ConfigError(
                f"train.freeze: {prefix!r} names no parameter of {model.config['name']}; "
                f"try one of {', '.join(tops[:8])}"
            )
        for n, p in model.named_parameters():
            if n in hit:
                p.requires_grad_(False)
    return to_channels_last(model) if cfg.train.channels_last else model


def without_seen_test(data: Data, seen: SeenRecord, where: str) -> tuple[Data, int]:
    """``data`` with its test split shorn of the images ``seen`` holds (near-copies too), and
    how many were left out: the same record and test ``agegender evaluate`` applies, so a
    fine-tuned run's test figures and evaluate's agree. ``where`` names the cache in errors."""
    cache, rows = data.cache, data.cache.indices("test")
    if len(rows) == 0:
        return data, 0
    mask = seen.seen([cache.content_hash[i] for i in rows], cache.images[rows])
    if mask.all():
        raise DataError(
            f"every test image of {where} was seen by model.init (or its teacher), or is a "
            "near-copy of one: there is nothing left to score the run on"
        )
    keep = torch.as_tensor(~mask, device=data.x["test"].device)
    split = {k: {**v, "test": v["test"][keep]} for k, v in (("x", data.x), ("age", data.age),
                                                              ("gender", data.gender))}  # fmt: skip
    return replace(data, **split), int(mask.sum())
