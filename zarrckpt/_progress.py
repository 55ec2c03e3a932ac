"""The progress bar class: a notebook widget where Jupyter can draw one, else text.

``tqdm.auto`` picks the widget in any notebook, and where ipywidgets is not installed it
prints a warning in place of a bar; a text bar on stderr is the better fallback.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

if importlib.util.find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm
else:
    from tqdm.std import tqdm

__all__ = ["progress_bar", "tqdm"]


@contextmanager
def progress_bar(total: int, desc: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A byte progress bar, shown only for operations that last more than a second."""
    bar = tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
        delay=1.0, leave=False, disable=not enabled, file=sys.stderr,
    )  # fmt: skip
    try:
        yield bar.update
    finally:
        bar.close()
