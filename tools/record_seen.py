"""Write into a checkpoint the record of the images it was trained and validated on.

    python tools/record_seen.py CHECKPOINT CACHE [--splits train,val] [--dealt]

A model trained by this version of ``agegender train`` carries its record already. This tool
gives one to a checkpoint trained before: the rows of ``CACHE`` in ``--splits``. With
``--dealt``, the splits are those ``prepare`` dealt before near-duplicate groups were kept
together (the stratified deal of the cache's seed and fractions, image by image): the splits
that older checkpoints, the bundled ``accurate`` model among them, were trained on.
"""

from __future__ import annotations

import argparse
import json
import struct

import numpy as np

from agegender.checkpoint import load_checkpoint, save_checkpoint
from agegender.data import SPLITS, open_cache, split_indices
from agegender.near_dups import SeenRecord


def _stored_half(path: str) -> bool:
    """Whether the checkpoint stores its float weights as fp16 (read from its header)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return "F16" in dtypes and "F32" not in dtypes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("cache")
    p.add_argument("--splits", default="train,val", help="the splits it trained and validated on")
    p.add_argument("--dealt", action="store_true", help="the splits as dealt before the groups")
    args = p.parse_args()

    cache = open_cache(args.cache)
    wanted = [s.strip() for s in args.splits.split(",")]
    if args.dealt:
        s = cache.summary
        dealt = split_indices(cache.gender, cache.age, tuple(s["split_fractions"]), s["seed"])
        splits = np.array(SPLITS)[dealt]
    else:
        splits = cache.split
    rows = np.flatnonzero(np.isin(splits, wanted))
    record = SeenRecord.of([cache.content_hash[i] for i in rows], cache.images[rows])
    model, meta = load_checkpoint(args.checkpoint)
    extra = {k: v for k, v in meta.items() if k in ("epoch", "metrics", "config")}
    # the weights are written again as they were stored: fp16 stays fp16
    save_checkpoint(args.checkpoint, model, extra, half=_stored_half(args.checkpoint), seen=record)
    print(f"{args.checkpoint}: recorded {len(record):,} images of {args.cache} ({args.splits}"
          f"{', as dealt' if args.dealt else ''})")  # fmt: skip


if __name__ == "__main__":
    main()
