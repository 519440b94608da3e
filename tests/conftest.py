from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest

from agegender.data.synthetic import make_dataset
from agegender.vision.images import face_config

# The real data sits beside the checkout (../shared); CI lays it there too. Never copied in.
SHARED_UTKFACE = Path(
    os.environ.get("AGEGENDER_UTKFACE", Path(__file__).resolve().parents[2] / "shared/data/UTKFace")
)


@pytest.fixture(scope="session")
def utkface_dir() -> Path:
    if not SHARED_UTKFACE.is_dir() or not any(SHARED_UTKFACE.iterdir()):
        pytest.skip(f"real UTKFace not found at {SHARED_UTKFACE}")
    return SHARED_UTKFACE


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """120 synthetic 64x64 faces with UTKFace names (read-only: copy before changing)."""
    out = tmp_path_factory.mktemp("synthetic") / "UTKFace"
    make_dataset(out, n=120, size=64, seed=1)
    return out


@pytest.fixture(scope="session")
def synthetic_cache(synthetic_dir, tmp_path_factory) -> Path:
    from agegender.data.prepare import prepare

    out = tmp_path_factory.mktemp("cache")
    prepare([synthetic_dir], out, face_config(32), quiet=True, workers=1)
    return out


def bomb_png(path: Path, side: int = 20_000) -> None:
    """A PNG whose header claims side x side pixels: refused before any pixel is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def cache64(tmp_path_factory) -> Path:
    """A 64 px gray cache of the real UTKFace where it lies beside the checkout, else of 400
    synthetic faces: the training tests (smoke, exact resume, compile) run either way."""
    from agegender.data.prepare import prepare

    out = tmp_path_factory.mktemp("cache64")
    if SHARED_UTKFACE.is_dir() and any(SHARED_UTKFACE.iterdir()):
        src = SHARED_UTKFACE
    else:
        src = tmp_path_factory.mktemp("synthetic400")
        make_dataset(src, n=400, size=64, seed=3)
    prepare([src], out, face_config(64), quiet=True)
    return out


def make_checkpoint(
    path: Path, age_head: str = "dldl", in_chans: int = 1, tta: bool = True, seed: int = 0
) -> Path:
    """An untrained resnet-mt-small checkpoint at 64 px (``seed`` picks its weights)."""
    import torch

    from agegender.training.checkpoint import save_checkpoint
    from agegender.training.models import create_model

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = create_model("resnet-mt-small", img_size=64, age_head=age_head, in_chans=in_chans)
    extra = {"epoch": 0, "metrics": {}, "config": {"train": {"tta": tta}}}
    return save_checkpoint(path, model, extra)


def collage(faces: list, sides=(180, 250, 200, 230, 190, 240)):
    """A 1280x886 grey canvas with up to six RGB faces of ~200 px, one per cell of a 3x2 grid;
    returns ``(canvas, [(col, row), ...])``."""
    import cv2
    import numpy as np

    canvas = np.full((886, 1280, 3), 200, np.uint8)
    cells = []
    for k, (img, side) in enumerate(zip(faces, sides)):
        col, row = k % 3, k // 3
        x, y = col * 426 + (426 - side) // 2, row * 443 + (443 - side) // 2
        canvas[y : y + side, x : x + side] = cv2.resize(img, (side, side))
        cells.append((col, row))
    return canvas, cells
