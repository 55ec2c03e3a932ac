"""The progress bar class: a notebook widget where Jupyter can draw one, else text.

``tqdm.auto`` picks the widget in any notebook, and where ipywidgets is not installed it
prints a warning in place of a bar; a text bar on stderr is the better fallback.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["bar_class", "human", "progress_bar"]


def human(nbytes: float) -> str:
    """``1.5 KiB``: a byte count as bars, reprs and the command line show it."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError  # pragma: no cover


@functools.cache
def bar_class() -> Any:
    """tqdm's bar class (imported on first use: a command line that shows no bar skips it)."""
    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm


@contextmanager
def progress_bar(total: int, desc: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A byte progress bar, shown only for operations that last more than a second."""
    bar = bar_class()(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
        delay=1.0, leave=False, disable=not enabled, file=sys.stderr,
    )  # fmt: skip
    try:
        yield bar.update
    finally:
        bar.close()
