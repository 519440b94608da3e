"""The real UTKFace in ../shared: the figures the issue tracker records for it."""

from collections import Counter

import numpy as np
import pytest

from agegender.data.cache import open_cache
from agegender.data.manifest import read_manifest
from agegender.data.prepare import prepare
from agegender.data.utkface import age_band

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_cache(utkface_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("utkface-cache")
    summary = prepare([utkface_dir], out, quiet=True)
    return out, summary


def test_real_figures(real_cache):
    _, s = real_cache
    assert s["files_found"] == 21_340
    assert s["unparsable"] == 3
    assert s["unreadable"] == 0
    assert s["duplicate_groups"] == 341
    assert s["conflicting_groups"] == 202
    assert s["kept"] == 20_783
    assert sum(s["splits"].values()) == 20_783
    # 60 s is the budget on 2 cores; this also runs while other tests hold the CPU
    assert s["seconds"] < 60


def test_real_split(real_cache):
    out, s = real_cache
    cache = open_cache(out)
    assert cache.images.shape == (20_783, 128, 128, 1)
    n = len(cache)
    sizes = Counter(cache.group)
    in_group = np.array([sizes[g] > 1 for g in cache.group])  # near-copies of another image
    for name, frac in zip(("train", "val", "test"), (0.7, 0.1, 0.2)):
        assert abs(s["splits"][name] / n - frac) < 0.01 + in_group.mean()
        for g in (0, 1):  # stratified: each gender and age band gets its share of each split,
            for b in range(5):  # but for the near-copies that moved to their group's split
                stratum = (cache.gender == g) & (age_band(cache.age) == b)
                share = np.mean(cache.split[stratum] == name)
                assert abs(share - frac) < 0.01 + in_group[stratum].mean(), (name, g, b, share)
    # no group of copies of one photograph crosses splits
    splits_of: dict[str, set[str]] = {}
    for group, split in zip(cache.group, cache.split):
        splits_of.setdefault(group, set()).add(split)
    assert all(len(v) == 1 for v in splits_of.values())
    assert 400 < s["near_duplicate_groups"] < 700  # 506 with this version's thresholds
    sides: dict[str, set[str]] = {}
    for r in read_manifest(out):
        if r["content_hash"]:
            sides.setdefault(r["content_hash"], set()).add(r["split"])
    assert all(len(v - {""}) <= 1 for v in sides.values())


def test_real_reuse(real_cache, utkface_dir):
    out, _ = real_cache
    again = prepare([utkface_dir], out, quiet=True)
    assert again["reused"] and again["seconds"] < 10
