"""The documentation: README.md stays a front door, and the MkDocs site builds offline with
``--strict`` (no broken link or anchor), documents the Python API from the docstrings, and loads
nothing from another host (a reader's browser contacts no one, and the site works offline)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200  # the front door: everything longer belongs in docs/
EXTERNAL = re.compile(r"^(https?:)?//", re.IGNORECASE)


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_readme_links_resolve():
    """Relative links in README.md point at files that exist (docs pages, the model card)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not EXTERNAL.match(target) and ":" not in target:
            assert (ROOT / target).exists(), f"README.md links to missing {target}"


class _Loads(HTMLParser):
    """Every URL a page makes the browser fetch by itself: scripts, stylesheets, icons, fonts
    (``<link>`` of any kind), images and frames; plain ``<a href>`` links are not loads."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "link": "href", "img": "src", "iframe": "src", "source": "src"}
        if tag in wanted:
            self.urls += [v for k, v in attrs if k == wanted[tag] and v]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    # MkDocs, the Material theme, mkdocstrings and its Python handler (the dev extra)
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[dev]')")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", "mkdocs.yml", "-d", out],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_api_page_documents_the_public_api(site):
    page = (site / "api.html").read_text(encoding="utf-8")
    for name in (
        "agegender.inference.predictor.Predictor",
        "agegender.inference.predictor.Predictor.load",
        "agegender.inference.predictor.Predictor.predict",
        "agegender.inference.options.InferenceOptions",
        "agegender.inference.face.Face",
        "agegender.training.loading.open_predictor",
    ):
        assert f'id="{name}"' in page, f"{name} is not documented on api.html"


def test_site_loads_nothing_from_another_host(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 10
    foreign = []
    for page in pages:
        parser = _Loads()
        text = page.read_text(encoding="utf-8")
        parser.feed(text)
        foreign += [f"{page.name}: {url}" for url in parser.urls if EXTERNAL.match(url)]
        foreign += [
            f"{page.name}: {m}" for m in re.findall(r"url\(\s*['\"]?(?:https?:)?//[^)]*", text)
        ]
    for sheet in site.rglob("*.css"):
        text = sheet.read_text(encoding="utf-8", errors="replace")
        found = re.findall(r"(?:@import\s+(?:url\()?|url\()\s*['\"]?((?:https?:)?//[^'\")]+)", text)
        foreign += [f"{sheet.name}: {url}" for url in found]
    assert not foreign, "the site loads from another host:\n" + "\n".join(foreign)
