"""Write into a checkpoint the record of the images it was trained and validated on.

    python tools/record_seen.py CHECKPOINT CACHE [--splits train,val] [--dealt]
    python tools/record_seen.py --refresh CHECKPOINT CACHE

A model trained by this version of ``agegender train`` carries its record already. This tool
gives one to a checkpoint trained before: the rows of ``CACHE`` in ``--splits``. With
``--dealt``, the splits are those ``prepare`` dealt before near-duplicate groups were kept
together (the stratified deal of the cache's seed and fractions, image by image): the splits
that older checkpoints, the bundled ``accurate`` model among them, were trained on.
``--refresh`` recomputes, in this version's signature, the record a checkpoint already has:
every recorded image is looked up in ``CACHE`` by its content hash.
"""

from __future__ import annotations

import argparse
import json
import struct

import numpy as np

from agegender.data.cache import open_cache
from agegender.data.near_dups import SeenRecord, hash_bytes, signatures
from agegender.data.split import split_indices
from agegender.data.utkface import SPLITS
from agegender.inference.model_files import SEEN_HASHES
from agegender.training.checkpoint import load_checkpoint, save_checkpoint


def _stored_half(path: str) -> bool:
    """Whether the checkpoint stores its float weights as fp16 (read from its header)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return "F16" in dtypes and "F32" not in dtypes


def _refresh(checkpoint: str, cache) -> SeenRecord:
    """The checkpoint's recorded images, found in ``cache`` by content hash, signed anew."""
    with open(checkpoint, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        info = header[SEEN_HASHES]
        start, end = info["data_offsets"]
        f.seek(8 + n + start)
        hashes = np.frombuffer(f.read(end - start), np.uint8).reshape(info["shape"])
    row_of = {bytes(h): i for i, h in enumerate(hash_bytes(cache.content_hash))}
    missing = sum(bytes(h) not in row_of for h in hashes)
    if missing:
        raise SystemExit(f"{missing:,} recorded images are not in the cache: give the data it saw")
    rows = np.array([row_of[bytes(h)] for h in hashes])
    return SeenRecord(np.array(hashes), signatures(cache.images[rows]))


def _save(checkpoint: str, record: SeenRecord) -> None:
    model, meta = load_checkpoint(checkpoint)
    extra = {k: v for k, v in meta.items() if k in ("epoch", "metrics", "config")}
    # the weights are written again as they were stored: fp16 stays fp16
    save_checkpoint(checkpoint, model, extra, half=_stored_half(checkpoint), seen=record)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("cache")
    p.add_argument("--splits", default="train,val", help="the splits it trained and validated on")
    p.add_argument("--dealt", action="store_true", help="the splits as dealt before the groups")
    p.add_argument("--refresh", action="store_true", help="recompute the record it has")
    args = p.parse_args()

    cache = open_cache(args.cache)
    if args.refresh:
        record = _refresh(args.checkpoint, cache)
        _save(args.checkpoint, record)
        print(f"{args.checkpoint}: refreshed the record of {len(record):,} images")
        return
    wanted = [s.strip() for s in args.splits.split(",")]
    if args.dealt:
        s = cache.summary
        dealt = split_indices(cache.gender, cache.age, tuple(s["split_fractions"]), s["seed"])
        splits = np.array(SPLITS)[dealt]
    else:
        splits = cache.split
    rows = np.flatnonzero(np.isin(splits, wanted))
    record = SeenRecord.of([cache.content_hash[i] for i in rows], cache.images[rows])
    _save(args.checkpoint, record)
    print(f"{args.checkpoint}: recorded {len(record):,} images of {args.cache} ({args.splits}"
          f"{', as dealt' if args.dealt else ''})")  # fmt: skip


if __name__ == "__main__":
    main()
