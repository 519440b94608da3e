import pytest

from agegender.core.errors import DataError
from agegender.evaluation.explore import explore


def test_explore_writes_every_plot(synthetic_cache, tmp_path):
    files = explore(synthetic_cache, tmp_path / "e")
    names = {f.name for f in files}
    assert names == {
        "sample.png",
        "age_distribution.png",
        "gender_counts.png",
        "race_counts.png",
        "grid.png",
        "age_by_gender.png",
        "summary.md",
    }
    for f in files:
        assert f.stat().st_size > 500
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "e" / "summary.md").read_text()
    assert "| train |" in text and "120 images" in text


def test_explore_needs_a_cache(tmp_path):
    with pytest.raises(DataError, match="not a prepared cache"):
        explore(tmp_path, tmp_path / "e")
