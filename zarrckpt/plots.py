"""Plots computed lazily from a checkpoint (needs matplotlib: ``pip install zarrckpt[plot]``).

Each function reads only what it draws: a heatmap reads a strided subsample of the matrix,
a histogram walks the leaf chunk by chunk, a raster reads one spike leaf per step.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .checkpoint import LazyArray, open_checkpoint

__all__ = ["heatmap", "histogram", "spike_raster"]


def _axes(ax: Any) -> Any:
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots()
    return ax


def _matrix(leaf: LazyArray, max_size: int) -> np.ndarray:
    if leaf.ndim == 1:
        return leaf[:: max(1, math.ceil(leaf.shape[0] / max_size))][None, :]
    if leaf.ndim != 2:
        raise ValueError(
            f"{leaf.path!r} is {leaf.ndim}-dimensional; a heatmap needs 1 or 2 dimensions"
        )
    steps = tuple(max(1, math.ceil(n / max_size)) for n in leaf.shape)
    return leaf[:: steps[0], :: steps[1]]


def heatmap(leaf: LazyArray, *, max_size: int = 512, ax: Any = None, **imshow: Any) -> Any:
    """A weight matrix as an image, subsampled to at most ``max_size`` pixels a side."""
    ax = _axes(ax)
    data = _matrix(leaf, max_size).astype(np.float64)
    image = ax.imshow(data, aspect="auto", interpolation="nearest", **{"cmap": "RdBu_r", **imshow})
    ax.figure.colorbar(image, ax=ax)
    ax.set_title(f"{leaf.path} {leaf.shape}")
    return ax


def histogram(leaf: LazyArray, *, bins: int = 100, ax: Any = None) -> Any:
    """A histogram of all values, accumulated chunk by chunk (memory: one chunk)."""
    ax = _axes(ax)
    stats = leaf.stats()
    lo, hi = stats["min"], stats["max"]
    if not math.isfinite(lo) or lo == hi:
        lo, hi = (lo - 0.5, hi + 0.5) if math.isfinite(lo) else (0.0, 1.0)
    edges = np.linspace(lo, hi, bins + 1)
    counts = np.zeros(bins, dtype=np.int64)
    for _, values in leaf.iter_chunks():
        counts += np.histogram(values.astype(np.float64), bins=edges)[0]
    ax.stairs(counts, edges, fill=True)
    ax.set_title(f"{leaf.path}: mean {stats['mean']:.3g}, std {stats['std']:.3g}")
    return ax


def spike_raster(
    filename: Any, path: str, *, steps: list[int] | None = None, ax: Any = None,
    storage_options: dict[str, Any] | None = None,
) -> Any:  # fmt: skip
    """Spikes (non-zero entries) of a leaf across saved steps: one column of ticks per step."""
    ax = _axes(ax)
    first = open_checkpoint(filename, storage_options=storage_options)
    for step in steps if steps is not None else first.steps:
        leaf = open_checkpoint(filename, step=step, storage_options=storage_options)[path]
        if not isinstance(leaf, LazyArray):
            raise TypeError(f"{path!r} at step {step} is a sub-tree, not a spike array")
        neurons = np.flatnonzero(np.asarray(leaf).ravel())
        ax.scatter(np.full(neurons.size, step), neurons, s=4, marker="|", color="k")
    ax.set_xlabel("step")
    ax.set_ylabel("neuron")
    ax.set_title(f"{path} spikes")
    return ax
