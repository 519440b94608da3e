"""Progress bars: on a terminal only, so logs, pipes and CI output stay quiet."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(iterable: Any = None, *, quiet: bool = False, **kw: Any) -> Any:
    """A ``tqdm`` bar on standard error, disabled by ``quiet`` or when standard error is not a
    terminal (a redirected log would fill with carriage-return frames)."""
    from tqdm import tqdm  # tqdm is light, but most commands never draw a bar

    disable = quiet or not sys.stderr.isatty()
    return tqdm(iterable, file=sys.stderr, leave=False, disable=disable, **kw)
