"""How the near-duplicate thresholds were chosen, on a prepared cache of the real UTKFace.

    python benchmarks/near_duplicates.py cache/utk128 --out reports/near-duplicates

Writes into ``--out``:

- ``distances.png``: the signature distance of every face to its nearest other face (at the best
  of 25 relative shifts), and the pixel difference of each such pair against its signature
  distance, with the thresholds drawn in;
- ``inside.png`` / ``outside.png``: pairs just inside and just outside the thresholds, side by
  side with their distances, to judge by eye which are the same photograph;
- ``synthetic.json``: how often a copy made from a real face is found again (re-encoded as JPEG
  q70, shifted by 1-2 px, brightness +-5 %, all three), and how long the search took;
- ``near_duplicates.json``: the counts per distance band, for the report.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from agegender import fileio
from agegender import near_dups as nd
from agegender.data import open_cache


def _sheet(faces: np.ndarray, pairs: list, title: str, path: Path) -> None:
    rows = len(pairs)
    fig = Figure(figsize=(8, 1.6 * rows + 0.6))
    axes = fig.subplots(rows, 4, squeeze=False)
    for r, (i, j, d, mad) in enumerate(pairs):
        for c, k in enumerate((int(i), int(j))):
            ax = axes[r, c]
            ax.imshow(faces[k], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 2].imshow(
            np.abs(faces[int(i)].astype(int) - faces[int(j)].astype(int)), cmap="magma", vmax=64
        )
        axes[r, 2].set_xticks([])
        axes[r, 2].set_yticks([])
        axes[r, 3].axis("off")
        axes[r, 3].text(0, 0.5, f"signature {d:.3f}\npixels {mad:.1f}", fontsize=9, va="center")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with fileio.atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=80)


def _synthetic(faces: np.ndarray, base: np.ndarray, n: int, seed: int) -> dict:
    """Copies of ``n`` random faces made as the issue names them: found again?"""

    def shift(x: np.ndarray, dx: int, dy: int) -> np.ndarray:
        p = np.pad(x, 4, mode="edge")
        return p[4 + dy : 4 + dy + x.shape[0], 4 + dx : 4 + dx + x.shape[1]]

    def jpeg(x: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(x).save(buf, "JPEG", quality=70)
        return np.asarray(Image.open(buf))

    def bright(x: np.ndarray, f: float) -> np.ndarray:
        return np.clip(x.astype(np.float32) * f, 0, 255).astype(np.uint8)

    rng = np.random.default_rng(seed)
    idx = rng.choice(len(faces), n, replace=False)
    kinds = {
        "jpeg q70": jpeg,
        "shift 1 px": lambda x: shift(x, 1, -1),
        "shift 2 px": lambda x: shift(x, 2, 2),
        "brightness +5 %": lambda x: bright(x, 1.05),
        "brightness -5 %": lambda x: bright(x, 0.95),
        "all three": lambda x: bright(shift(jpeg(x), -2, 1), 1.05),
    }
    out = {}
    for name, make in kinds.items():
        copies = np.stack([make(faces[i]) for i in idx])
        found = {i for i, j, _ in nd.find_pairs(base, copies) if j == idx[i]}
        dists = [nd.pixel_distance(faces[idx[i]], copies[i]) for i in range(n)]
        out[name] = {
            "n": n,
            "found": len(found),
            "pixel_distance_max": round(max(dists), 2),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("cache", help="a prepared cache of the real UTKFace")
    p.add_argument("--out", default="reports/near-duplicates")
    p.add_argument("--synthetic", type=int, default=300, help="faces copied for the recall test")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    faces = nd.work_faces(np.asarray(open_cache(args.cache).images))

    t0 = time.perf_counter()
    sig = nd.signatures(faces)
    loose = 0.3  # wide enough to draw both sides of the thresholds
    pairs = nd.find_pairs(sig, faces, query=sig, max_distance=loose, self_search=True)
    search_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scored = [(i, j, d, nd.pixel_distance(faces[i], faces[j])) for i, j, d in pairs]
    pixel_s = time.perf_counter() - t0

    d = np.array([s[2] for s in scored])
    mad = np.array([s[3] for s in scored])
    fig = Figure(figsize=(11, 4))
    a1, a2 = fig.subplots(1, 2)
    a1.hist(d, bins=60, color="tab:gray")
    a1.axvline(nd.SIGNATURE_MAX, color="tab:red", ls="--", label=f"{nd.SIGNATURE_MAX}")
    a1.set(xlabel="signature distance (best shift)", ylabel="pairs", title="Closest pairs")
    a1.legend()
    a2.scatter(d, mad, s=4, alpha=0.5)
    a2.axvline(nd.SIGNATURE_MAX, color="tab:red", ls="--")
    a2.axhline(nd.PIXEL_MAX, color="tab:red", ls="--")
    a2.set(xlabel="signature distance", ylabel="mean |pixel difference| (grey levels)")
    a2.set_title("Same photo: bottom left")
    fig.tight_layout()
    with fileio.atomic_path(out / "distances.png", ".png") as tmp:
        fig.savefig(tmp, dpi=90)

    merged = [s for s in scored if s[2] < nd.SIGNATURE_MAX and s[3] < nd.PIXEL_MAX]
    inside = sorted(merged, key=lambda s: -s[3])[:8]  # the merged pairs most unlike each other
    outside = sorted(
        (s for s in scored if not (s[2] < nd.SIGNATURE_MAX and s[3] < nd.PIXEL_MAX)),
        key=lambda s: s[3] + 40 * max(s[2] - nd.SIGNATURE_MAX, 0),
    )[:8]  # the left-out pairs nearest to being merged
    _sheet(faces, inside, "merged: the least alike (original, copy, difference)", out / "inside.png")
    _sheet(faces, outside, "not merged: the most alike", out / "outside.png")

    bands = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
    table = []
    for lo, hi in zip(bands, bands[1:]):
        sel = (d >= lo) & (d < hi)
        table.append(
            {
                "signature": f"{lo:.2f}-{hi:.2f}",
                "pairs": int(sel.sum()),
                "pixel_below_max": int((mad[sel] < nd.PIXEL_MAX).sum()),
                "pixel_median": round(float(np.median(mad[sel])), 1) if sel.any() else None,
            }
        )
    summary = {
        "faces": len(faces),
        "pairs_within_0.3": len(scored),
        "merged_pairs": len(merged),
        "search_seconds": round(search_s, 2),
        "pixel_check_seconds": round(pixel_s, 2),
        "bands": table,
        "thresholds": {"signature": nd.SIGNATURE_MAX, "pixels": nd.PIXEL_MAX, "shift": nd.SHIFT},
    }
    fileio.write_json(out / "near_duplicates.json", summary)
    synthetic = _synthetic(faces, sig, args.synthetic, seed=0)
    fileio.write_json(out / "synthetic.json", synthetic)
    print(json.dumps(summary, indent=1))
    print(json.dumps(synthetic, indent=1))


if __name__ == "__main__":
    main()
