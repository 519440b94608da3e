from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest

from agegender.synthetic import make_dataset

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
    from agegender.data import prepare

    out = tmp_path_factory.mktemp("cache")
    prepare([synthetic_dir], out, size=32, quiet=True, workers=1)
    return out


def bomb_png(path: Path, side: int = 20_000) -> None:
    """A PNG whose header claims side x side pixels: refused before any pixel is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
