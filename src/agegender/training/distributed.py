"""DistributedDataParallel helpers: who this process is, and what all of them must agree on.

Outside ``torchrun`` every function here acts as for a single process (rank 0 of 1), so the
training loop calls them unconditionally.
"""

from __future__ import annotations

import hashlib
import os
import sys
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from agegender.core.errors import ConfigError
from agegender.inference.runtime import default_threads


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """The process's index on its own machine (torchrun's ``LOCAL_RANK``)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def process_device(device: torch.device) -> torch.device:
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


def barrier(device: torch.device) -> None:
    if is_distributed():
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over processes, in place (``x`` itself in a single process)."""
    if is_distributed():
        dist.all_reduce(x)
    return x


def broadcast_state(module: nn.Module, buffers_only: bool = False) -> None:
    """Copy rank 0's parameters and buffers (or its buffers only) into every rank's ``module``."""
    if is_distributed():
        for v in module.buffers() if buffers_only else module.state_dict().values():
            dist.broadcast(v, 0)


def rank_seeds(seed: int, epoch: int, rank: int) -> tuple[int, int]:
    """Two independent seeds for this rank's augmentation and dropout in this epoch."""
    a, b = np.random.SeedSequence([seed % 2**32, epoch, rank]).generate_state(2)
    return int(a), int(b)


def state_digest(module: nn.Module) -> str:
    """SHA-256 of the state dict (keys sorted): a checkpoint's tensors hash the same."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_ranks_agree(model: nn.Module, *facts: Any) -> str:
    """The weights' digest, after checking every rank holds the same weights and ``facts``.

    Ranks that drifted apart (a gradient not averaged, a decision taken on local numbers) would
    otherwise go unnoticed: only rank 0's weights are saved.
    """
    digest = state_digest(model)
    if is_distributed():
        mine = (digest, *facts)
        every: list[Any] = [None] * world_size()
        dist.all_gather_object(every, mine)
        if any(other != mine for other in every):
            raise RuntimeError(
                f"ranks disagree after training; (weights sha256, ...) per rank: {every}"
            )
    return digest


def process_threads(asked: int, world: int, quiet: bool) -> int:
    """CPU threads for this process: ``train.threads`` (0: all), at most its share of the
    cores this process may use (more only oversubscribe them, which is slower)."""
    # torchrun starts LOCAL_WORLD_SIZE processes per machine: they share its cores
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if world > 1 else 1
    share = max(default_threads() // local_world, 1)
    if asked > share and not quiet:
        print(
            f"agegender: train.threads={asked} lowered to {share}, the cores available"
            + (f" to each of {local_world} processes" if local_world > 1 else ""),
            file=sys.stderr,
        )
    return min(asked, share) if asked else share
