"""How the near-duplicate threshold was chosen, on a prepared cache of the real UTKFace.

    python benchmarks/near_duplicates.py cache/utk128 --out reports/near-duplicates

Writes into ``--out``:

- ``distances.png``: the median grid difference (at the best of 25 shifts) of every candidate
  pair up to 0.25, with the threshold ``MATCH_MAX`` drawn in;
- ``inside.png`` / ``outside.png``: the merged pairs least alike and the pairs left apart most
  alike, side by side with their difference image, to judge by eye which are one photograph;
- ``near_duplicates.json``: the pairs per band of the median difference, how long the search
  over every face took, and how often copies made from real faces are found again
  (re-encoded as JPEG q70, shifted by 1-2 px, brightness +-5 %, all three).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from agegender.core import fileio
from agegender.data import near_dups as nd
from agegender.data.cache import open_cache

LOOSE = 0.25  # pairs up to this median difference are drawn: both sides of the threshold


def _sheet(faces: np.ndarray, pairs: list, title: str, path: Path) -> None:
    fig = Figure(figsize=(7, 1.7 * len(pairs) + 0.6))
    axes = fig.subplots(len(pairs), 4, squeeze=False)
    for r, (i, j, d) in enumerate(pairs):
        diff = np.abs(faces[i].astype(int) - faces[j].astype(int))
        shown = ((faces[i], "gray", 255), (faces[j], "gray", 255), (diff, "magma", 64))
        for ax, (img, cmap, top) in zip(axes[r], shown):
            ax.imshow(img, cmap=cmap, vmin=0, vmax=top)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 3].axis("off")
        axes[r, 3].text(0, 0.5, f"median difference\n{d:.3f} std", fontsize=9, va="center")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with fileio.atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=80)


def _copies(faces: np.ndarray, n: int, seed: int) -> dict:
    """Copies of ``n`` random faces, of each kind the issue names: how many are found again."""

    def shift(x: np.ndarray, dx: int, dy: int) -> np.ndarray:
        p = np.pad(x, 4, mode="edge")
        return p[4 + dy : 4 + dy + x.shape[0], 4 + dx : 4 + dx + x.shape[1]]

    def jpeg(x: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(x).save(buf, "JPEG", quality=70)
        return np.asarray(Image.open(buf))

    def bright(x: np.ndarray, f: float) -> np.ndarray:
        return np.clip(x.astype(np.float32) * f, 0, 255).astype(np.uint8)

    idx = np.random.default_rng(seed).choice(len(faces), n, replace=False)
    base = nd.signatures(faces[idx])
    kinds = {
        "jpeg q70": jpeg,
        "shift 1 px": lambda x: shift(x, 1, -1),
        "shift 2 px": lambda x: shift(x, 2, 2),
        "brightness +5 %": lambda x: bright(x, 1.05),
        "brightness -5 %": lambda x: bright(x, 0.95),
        "all three": lambda x: bright(shift(jpeg(x), -2, 1), 1.05),
    }
    found = {}
    for name, make in kinds.items():
        copies = np.stack([make(faces[i]) for i in idx])
        pairs = nd.find_pairs(copies, base)
        found[name] = {"of": n, "found": len({i for i, j, _ in pairs if i == j})}
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("cache", help="a prepared cache of the real UTKFace")
    p.add_argument("--out", default="reports/near-duplicates")
    p.add_argument("--copies", type=int, default=300, help="faces copied for the recall test")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    faces = nd.work_faces(np.asarray(open_cache(args.cache).images))

    t0 = time.perf_counter()
    merged = nd.find_pairs(faces)
    search_s = time.perf_counter() - t0
    pairs = nd.find_pairs(faces, max_median=LOOSE)
    d = np.array([x[2] for x in pairs])

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.hist(d, bins=np.arange(0, LOOSE + 0.0051, 0.005), color="tab:gray")
    ax.axvline(nd.MATCH_MAX, color="tab:red", ls="--", label=f"threshold {nd.MATCH_MAX}")
    ax.set(xlabel="median |difference| of the 12x12 grids (std), best of 25 shifts",
           ylabel="pairs", title=f"Candidate pairs among {len(faces):,} faces")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    with fileio.atomic_path(out / "distances.png", ".png") as tmp:
        fig.savefig(tmp, dpi=90)

    inside = sorted((x for x in pairs if x[2] < nd.MATCH_MAX), key=lambda x: -x[2])[:8]
    outside = sorted((x for x in pairs if x[2] >= nd.MATCH_MAX), key=lambda x: x[2])[:8]
    _sheet(faces, inside, "merged, the least alike: original, copy, difference", out / "inside.png")
    _sheet(faces, outside, "not merged, the most alike", out / "outside.png")

    edges = [0.0, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25]
    bands = {f"{lo:.3f}-{hi:.3f}": int(((d >= lo) & (d < hi)).sum())
             for lo, hi in itertools.pairwise(edges)}  # fmt: skip
    summary = {
        "faces": len(faces),
        "pairs_merged": len(merged),
        "search_seconds": round(search_s, 1),
        "pairs_by_median_difference": bands,
        "threshold": nd.MATCH_MAX,
        "copies_found": _copies(faces, args.copies, seed=0),
    }
    fileio.write_json(out / "near_duplicates.json", summary)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
