"""Pack a prepared cache into one small file for a lent GPU machine, and unpack it there.

    python tools/pack_cache.py pack cache/utk128 shared/utk128.zip [--quality 75]
    python tools/pack_cache.py unpack shared/utk128.zip cache/utk128

A cache's ``images.npy`` (20,783 faces at 128x128 gray: 340 MB) is too big to send with a
repository, and re-running ``prepare`` on re-encoded images would give another split (the split
goes by content hash). The pack keeps the cache's own ``manifest.csv`` (labels, splits, source
paths), ``cache.json`` and ``summary.json`` and stores each face as a JPEG (quality 75: about
50 MB), so the unpacked cache has the same rows and splits and images within JPEG noise of the
originals (the unpacker prints the mean absolute difference it was packed with). Not a
distribution format: UTKFace's licence applies to the pack as to the images.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from agegender.data.cache import open_cache

META = ("manifest.csv", "cache.json", "summary.json")


def pack(cache_dir: Path, out: Path, quality: int) -> None:
    cache = open_cache(cache_dir)
    images = cache.images
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    err = 0.0
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:  # JPEGs do not compress further
        for name in META:
            if (cache_dir / name).is_file():
                z.write(cache_dir / name, name)
        for i in tqdm(range(len(images)), desc="packing", unit="img", file=sys.stderr):
            arr = np.asarray(images[i])
            img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=quality)
            z.writestr(f"images/{i:06d}.jpg", buf.getvalue())
            if i % 50 == 0:  # a sample is enough to state the loss
                back = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32)
                err += float(np.abs(back - arr.reshape(back.shape)).mean())
        info = {
            "n": len(images),
            "shape": list(images.shape),
            "quality": quality,
            "mean_abs_diff": round(err / len(range(0, len(images), 50)), 3),
        }
        z.writestr("pack.json", json.dumps(info, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {json.dumps(info)}")


def unpack(pack_file: Path, out: Path) -> None:
    with zipfile.ZipFile(pack_file) as z:
        info = json.loads(z.read("pack.json"))
        out.parent.mkdir(parents=True, exist_ok=True)
        # beside the destination: os.replace cannot move a folder across file systems
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
        try:
            images = np.lib.format.open_memmap(
                tmp / "images.npy", "w+", np.uint8, tuple(info["shape"])
            )
            for i in tqdm(range(info["n"]), desc="unpacking", unit="img", file=sys.stderr):
                arr = np.asarray(Image.open(io.BytesIO(z.read(f"images/{i:06d}.jpg"))))
                images[i] = arr.reshape(images.shape[1:])
            images.flush()
            del images
            for name in META:
                if name in z.namelist():
                    (tmp / name).write_bytes(z.read(name))
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    open_cache(out)  # checks manifest and images agree
    print(
        f"unpacked {info['n']:,} faces to {out} (JPEG q{info['quality']}, "
        f"mean |diff| {info['mean_abs_diff']} grey levels)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("cache", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("--quality", type=int, default=75)
    b = sub.add_parser("unpack")
    b.add_argument("pack", type=Path)
    b.add_argument("out", type=Path)
    args = p.parse_args()
    if args.cmd == "pack":
        pack(args.cache, args.out, args.quality)
    else:
        unpack(args.pack, args.out)


if __name__ == "__main__":
    main()
