"""Tiny synthetic "faces" with UTKFace file names, for tests and the demo (no data licence needed).

The drawings carry learnable signal on purpose: hair grows longer for ``female``, the face gets
paler and gains wrinkle lines with age, so a model can overfit them in a test.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def draw_face(age: int, gender: int, race: int, size: int = 64, seed: int = 0) -> Image.Image:
    """A cartoon face whose look depends on ``age``, ``gender`` and ``race`` (RGB, size x size)."""
    rng = np.random.default_rng(seed)
    s = size
    bg = tuple(int(v) for v in rng.integers(40, 200, 3))
    img = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(img)
    skin_base = (np.array([235, 200, 170]) - race * np.array([30, 32, 30])).clip(40, 255)
    skin = tuple(int(v) for v in (skin_base + min(age, 90) * 0.4).clip(0, 255))
    hair = tuple(int(v) for v in np.full(3, 30 + min(age, 90) * 2.3).clip(0, 230))
    jitter = rng.integers(-s // 32 - 1, s // 32 + 2, 2)
    cx, cy = s // 2 + jitter[0], s // 2 + jitter[1]
    fw, fh = int(s * 0.28), int(s * 0.36)
    if gender == 1:  # long hair behind the face
        d.rectangle([cx - fw - s // 10, cy - fh, cx + fw + s // 10, cy + fh + s // 8], fill=hair)
    d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=skin)
    d.chord([cx - fw, cy - fh - 2, cx + fw, cy], 180, 360, fill=hair)
    eye = max(1, s // 32)
    for ex in (cx - fw // 2, cx + fw // 2):
        d.ellipse([ex - eye, cy - eye, ex + eye, cy + eye], fill=(20, 20, 20))
    d.line([cx - fw // 3, cy + fh // 2, cx + fw // 3, cy + fh // 2], fill=(120, 40, 40), width=eye)
    for k in range(min(age // 15, 5)):  # wrinkles
        y = cy - fh // 2 + k * max(1, s // 40)
        d.line([cx - fw // 2, y, cx + fw // 2, y], fill=(90, 70, 60), width=1)
    return img


def make_dataset(
    out_dir: str | os.PathLike, n: int = 64, size: int = 64, seed: int = 0
) -> list[Path]:
    """Write ``n`` synthetic faces named ``age_gender_race_datetime.jpg.chip.jpg`` into ``out_dir``.

    >>> import tempfile
    >>> paths = make_dataset(tempfile.mkdtemp(), n=3)
    >>> len(paths), paths[0].name.endswith(".jpg.chip.jpg")
    (3, True)
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        age = int(rng.integers(1, 91))
        gender = int(rng.integers(0, 2))
        race = int(rng.integers(0, 5))
        path = out / f"{age}_{gender}_{race}_2017011{seed % 10}{i:010d}.jpg.chip.jpg"
        draw_face(age, gender, race, size, seed=seed * 100_003 + i).save(path, quality=90)
        paths.append(path)
    return paths
