"""Measure where YuNet puts its landmarks on UTKFace's aligned crops, and check the alignment.

    python benchmarks/yunet_utkface_geometry.py ../shared/data/UTKFace [--n 2000] [--check 500]

1. Geometry: runs the detector on ``--n`` random aligned & cropped 200x200 UTKFace images and
   prints the detection rate and the median (with spread) of the box and the five landmarks: the
   median landmarks are ``agegender.vision.detect.UTKFACE_TEMPLATE_200``.
2. Round trip: on ``--check`` *other* images, detects and re-aligns each crop at 200x200 with
   ``align_face`` and compares it with the original (mean absolute difference in grey levels,
   correlation, and the similarity transform's deviation from the identity). An aligned image
   re-aligned should come back almost unchanged.
3. Robustness: rotates each of those crops by 30 degrees (alternately clockwise and
   anticlockwise), pastes it at a random place on a 600x400 grey canvas, detects and aligns it,
   and compares the result with the original and with the round trip of step 2.

For scale, the script also prints the difference between each crop and itself shifted by 2 px.
Images are only read; nothing is written unless ``--json`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import cv2
import numpy as np

from agegender.vision.detect import (
    UTKFACE_TEMPLATE_200,
    align_face,
    alignment_matrix,
    get_detector,
)
from agegender.vision.images import decode_rgb

LANDMARKS = ("right eye", "left eye", "nose tip", "right mouth", "left mouth")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/UTKFace"


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean absolute difference (grey levels, all channels) and Pearson correlation."""
    fa, fb = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(np.abs(fa - fb).mean()), float(np.corrcoef(fa, fb)[0, 1])


def transform_params(m: np.ndarray) -> tuple[float, float, float]:
    """Scale, rotation (degrees) and the displacement of the crop's centre (px) of a 2x3 matrix."""
    scale = math.sqrt(abs(np.linalg.det(m[:, :2])))
    angle = math.degrees(math.atan2(m[1, 0], m[0, 0]))
    centre = np.array([99.5, 99.5])
    shift = float(np.linalg.norm(m[:, :2] @ centre + m[:, 2] - centre))
    return scale, angle, shift


def summarise(name: str, values: list[float], unit: str = "", low: bool = False) -> dict:
    """Print and return mean, median and the bad tail: p90 and max, or p10 and min if ``low``."""
    v = np.asarray(values, dtype=np.float64)
    tail = ("p10", 10, "min", v.min()) if low else ("p90", 90, "max", v.max())
    out = {
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        tail[0]: float(np.percentile(v, tail[1])),
        tail[2]: float(tail[3]),
    }
    print(
        f"  {name:<34} mean {out['mean']:8.3f}  median {out['median']:8.3f}  "
        f"{tail[0]} {out[tail[0]]:8.3f}  {tail[2]} {out[tail[2]]:8.3f} {unit}"
    )
    return out


def rotate_and_pad(img: np.ndarray, angle: float, rng: np.random.Generator) -> np.ndarray:
    """``img`` rotated by ``angle`` degrees about its centre, pasted on a 600x400 grey canvas."""
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)
    half = 0.5 * (w * abs(math.cos(math.radians(angle))) + h * abs(math.sin(math.radians(angle))))
    cx = rng.uniform(half, 600 - half)
    cy = rng.uniform(half, 400 - half)
    m[:, 2] += (cx - (w - 1) / 2, cy - (h - 1) / 2)
    return cv2.warpAffine(
        img,
        m,
        (600, 400),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(128, 128, 128),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data_dir", nargs="?", default=str(DEFAULT_DATA))
    p.add_argument("--n", type=int, default=2000, help="images for the geometry (default 2000)")
    p.add_argument("--check", type=int, default=500, help="other images for the alignment checks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="OpenCV threads (default 1)")
    p.add_argument("--refine", type=int, default=None, help="detector's refinement passes")
    p.add_argument("--refine-size", type=int, default=None, help="detector's refine_size")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    args = p.parse_args()
    cv2.setNumThreads(args.threads)

    files = sorted(Path(args.data_dir).glob("*.jpg"))
    if len(files) < args.n + args.check:
        raise SystemExit(
            f"need {args.n + args.check} images in {args.data_dir}, found {len(files)}"
        )
    rng = np.random.default_rng(args.seed)
    pick = rng.choice(len(files), size=args.n + args.check, replace=False)
    geometry_files = [files[i] for i in pick[: args.n]]
    check_files = [files[i] for i in pick[args.n :]]
    kw = {k: v for k, v in vars(args).items() if k in ("refine", "refine_size") and v is not None}
    detector = get_detector("yunet", **kw)
    report: dict = {"data_dir": str(args.data_dir), "seed": args.seed, "detector": repr(detector)}

    # ------------------------------------------------------------------ 1. geometry
    t0 = time.perf_counter()
    counts, points, boxes, scores, sizes = [], [], [], [], set()
    for f in geometry_files:
        img = decode_rgb(f)
        sizes.add(img.shape)
        faces = detector.detect_faces(img)
        counts.append(len(faces))
        if faces:
            points.append(faces[0].landmarks)
            boxes.append(faces[0].box)
            scores.append(faces[0].score)
    seconds = time.perf_counter() - t0
    counts_a = np.asarray(counts)
    pts, bxs = np.asarray(points), np.asarray(boxes)
    med, q1, q3 = np.median(pts, 0), np.percentile(pts, 25, 0), np.percentile(pts, 75, 0)
    std = pts.std(0)
    print(f"1. geometry on {args.n} aligned UTKFace images {sorted(sizes)} (seed {args.seed})")
    print(
        f"  detection rate {np.mean(counts_a >= 1):.2%} "
        f"(exactly one face {np.mean(counts_a == 1):.2%}"
        f", none {np.sum(counts_a == 0)}, two or more {np.sum(counts_a >= 2)}); "
        f"median score {np.median(scores):.3f}; {1000 * seconds / args.n:.1f} ms/image"
    )
    print(f"  {'landmark':<12} {'median x':>9} {'median y':>9}   {'IQR x':>13} {'IQR y':>13}  std")
    for name, m, a, b, s in zip(LANDMARKS, med, q1, q3, std):
        print(
            f"  {name:<12} {m[0]:9.2f} {m[1]:9.2f}   "
            f"{a[0]:6.1f}-{b[0]:6.1f} {a[1]:6.1f}-{b[1]:6.1f}"
            f"  ({s[0]:.1f}, {s[1]:.1f})"
        )
    bmed = np.median(bxs, 0)
    print("  box (x0, y0, x1, y1) median " + ", ".join(f"{v:.1f}" for v in bmed))
    eye_dist = np.linalg.norm(pts[:, 1] - pts[:, 0], axis=1)
    roll = np.degrees(np.arctan2(pts[:, 1, 1] - pts[:, 0, 1], pts[:, 1, 0] - pts[:, 0, 0]))
    print(
        f"  eye distance median {np.median(eye_dist):.1f} px (IQR {np.percentile(eye_dist, 25):.1f}"
        f"-{np.percentile(eye_dist, 75):.1f}); eye-line roll median {np.median(roll):.2f} deg, "
        f"|roll| p90 {np.percentile(np.abs(roll), 90):.2f} deg"
    )
    template = tuple((round(float(x), 2), round(float(y), 2)) for x, y in med)
    print(f"  UTKFACE_TEMPLATE_200 = {template}")
    # The refinement frames faces with the shipped template, so the median is a fixed point:
    # after updating the constant, rerun until it stops moving.
    moved = float(np.max(np.abs(np.asarray(UTKFACE_TEMPLATE_200) - med)))
    print(f"  largest move from agegender.vision.detect.UTKFACE_TEMPLATE_200: {moved:.2f} px")
    if moved > 0.25:
        print("  NOTE: update UTKFACE_TEMPLATE_200 to the median above and rerun")
    report["geometry"] = {
        "n": args.n,
        "detection_rate": float(np.mean(counts_a >= 1)),
        "exactly_one": float(np.mean(counts_a == 1)),
        "template": template,
        "landmark_std": std.round(2).tolist(),
        "landmark_iqr": (q3 - q1).round(2).tolist(),
        "box_median": bmed.round(2).tolist(),
        "eye_distance_median": float(np.median(eye_dist)),
        "ms_per_image": 1000 * seconds / args.n,
    }

    # ------------------------------------------------------------------ 2. round trip
    # The crops are re-aligned to the constant in agegender.vision.detect (the shipped template).
    print(
        f"\n2. round trip on {args.check} other images: detect + align_face(size=200) vs original"
    )
    diffs, corrs, shift_diffs, scales, angles, shifts, misses = [], [], [], [], [], [], 0
    originals, round_trips, base_faces = [], [], []
    for f in check_files:
        img = decode_rgb(f)
        faces = detector.detect_faces(img)
        if not faces:
            misses += 1
            continue
        out = align_face(img, faces[0])
        d, c = compare(img, out)
        diffs.append(d)
        corrs.append(c)
        shifted = np.roll(img, 2, axis=1)
        shift_diffs.append(compare(img[:, 2:], shifted[:, 2:])[0])
        s, a, t = transform_params(alignment_matrix(faces[0]))
        scales.append(s)
        angles.append(abs(a))
        shifts.append(t)
        originals.append(img)
        round_trips.append(out)
        base_faces.append(faces[0])
    print(f"  detected {len(diffs)}/{args.check}")
    rt = {
        "detected": len(diffs),
        "mean_abs_diff": summarise("mean |original - re-aligned|", diffs, "grey levels"),
        "correlation": summarise("correlation", corrs, low=True),
        "shift2px_mean_abs_diff": summarise("(scale: original vs 2 px shift)", shift_diffs),
        "scale": summarise("transform scale", scales),
        "abs_rotation_deg": summarise("transform |rotation|", angles, "deg"),
        "centre_shift_px": summarise("transform centre displacement", shifts, "px"),
    }
    report["round_trip"] = rt

    # ------------------------------------------------------------------ 3. rotated and padded
    print("\n3. rotated by +-30 deg and pasted on a 600x400 grey canvas: detect + align_face")
    rng = np.random.default_rng(args.seed + 1)
    found, d_orig, c_orig, d_rt, c_rt, roll_err, n_faces = 0, [], [], [], [], [], []
    t0 = time.perf_counter()
    for k, (img, ref, base) in enumerate(zip(originals, round_trips, base_faces)):
        angle = 30.0 if k % 2 == 0 else -30.0
        canvas = rotate_and_pad(img, angle, rng)
        faces = detector.detect_faces(canvas)
        n_faces.append(len(faces))
        if not faces:
            continue
        found += 1
        out = align_face(canvas, faces[0])
        d, c = compare(img, out)
        d_orig.append(d)
        c_orig.append(c)
        d, c = compare(ref, out)
        d_rt.append(d)
        c_rt.append(c)
        # getRotationMatrix2D turns anticlockwise on screen for a positive angle; roll is clockwise
        roll_err.append(abs(faces[0].roll - (base.roll - angle)))
    seconds = time.perf_counter() - t0
    print(
        f"  detected {found}/{len(originals)} (exactly one face in {sum(n == 1 for n in n_faces)});"
        f" {1000 * seconds / max(1, len(originals)):.1f} ms/image (600x400, detect + align)"
    )
    report["rotated"] = {
        "detected": found,
        "of": len(originals),
        "mean_abs_diff_vs_original": summarise("mean |original - aligned|", d_orig, "grey levels"),
        "correlation_vs_original": summarise("correlation with original", c_orig, low=True),
        "mean_abs_diff_vs_round_trip": summarise(
            "mean |round trip - aligned|", d_rt, "grey levels"
        ),
        "correlation_vs_round_trip": summarise("correlation with round trip", c_rt, low=True),
        "roll_error_deg": summarise("eye-line angle error", roll_err, "deg"),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
