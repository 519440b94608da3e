"""tools/pack_cache.py: a cache packed small for a GPU machine unpacks to the same rows and
splits, with images within JPEG noise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from agegender.data.cache import open_cache

TOOL = Path(__file__).resolve().parents[1] / "tools" / "pack_cache.py"


def test_pack_round_trip(synthetic_cache, tmp_path):
    # a destination whose parents do not exist yet, as on a fresh GPU machine
    pack, out = tmp_path / "c.zip", tmp_path / "fresh" / "cache" / "utk128"
    for args in (["pack", synthetic_cache, pack, "--quality", "90"], ["unpack", pack, out]):
        subprocess.run([sys.executable, TOOL, *map(str, args)], check=True, capture_output=True)
    a, b = open_cache(synthetic_cache), open_cache(out)
    assert b.images.shape == a.images.shape and b.images.dtype == np.uint8
    assert (a.split == b.split).all() and (a.age == b.age).all() and (a.gender == b.gender).all()
    diff = np.abs(a.images.astype(np.float32) - b.images.astype(np.float32)).mean()
    assert 0 < diff < 4  # lossy, but close
