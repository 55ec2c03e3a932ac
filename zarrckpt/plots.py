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


def _integer_ticks(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(nbins="auto", integer=True))


def _matrix(leaf: LazyArray, max_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Every ``stride``-th row and column of ``leaf`` (a vector is one row), and the strides."""
    if leaf.ndim == 1:
        stride = max(1, math.ceil(leaf.shape[0] / max_size))
        return leaf[::stride][None, :], (1, stride)
    if leaf.ndim != 2:
        raise ValueError(
            f"{leaf.path!r} is {leaf.ndim}-dimensional; a heatmap needs 1 or 2 dimensions"
        )
    rows, cols = (max(1, math.ceil(n / max_size)) for n in leaf.shape)
    return leaf[::rows, ::cols], (rows, cols)


def heatmap(leaf: LazyArray, *, max_size: int = 512, ax: Any = None, **imshow: Any) -> Any:
    """A weight matrix as an image, subsampled to at most ``max_size`` pixels a side.

    The axes are the matrix's own indices: a pixel of a subsample (every ``s``-th row or
    column) covers the ``s`` indices from the one it shows."""
    ax = _axes(ax)
    data, (sr, sc) = _matrix(leaf, max_size)
    rows, cols = leaf.shape if leaf.ndim == 2 else (1, leaf.shape[0])
    extent = (-0.5, data.shape[1] * sc - 0.5, data.shape[0] * sr - 0.5, -0.5)
    options = {"cmap": "RdBu_r", "aspect": "auto", "interpolation": "nearest", **imshow}
    image = ax.imshow(data.astype(np.float64), extent=extent, **options)
    ax.set_xlim(-0.5, cols - 0.5)  # the last pixel of a subsample may reach past the end
    ax.set_ylim(rows - 0.5, -0.5)
    _integer_ticks(ax.xaxis)
    _integer_ticks(ax.yaxis)
    dims = leaf._record.get("dims")
    if leaf.ndim == 1:
        ax.set_yticks([])
        ax.set_xlabel(dims[0] if dims else "index")
    else:
        ax.set_ylabel(dims[0] if dims else "row")
        ax.set_xlabel(dims[1] if dims else "column")
    ax.figure.colorbar(image, ax=ax)
    shown = "" if (sr, sc) == (1, 1) else f", 1 in {sr}×{sc} shown"
    ax.set_title(f"{leaf.path} {leaf.shape}{shown}")
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
    """Spikes (non-zero entries) of a leaf across saved steps: one column of ticks per step;
    the step axis is marked at the saved steps (integers), or at integers when they are many."""
    ax = _axes(ax)
    first = open_checkpoint(filename, storage_options=storage_options)
    steps = list(steps if steps is not None else first.steps)
    population = 0
    for step in steps:
        leaf = open_checkpoint(filename, step=step, storage_options=storage_options)[path]
        if not isinstance(leaf, LazyArray):
            raise TypeError(f"{path!r} at step {step} is a sub-tree, not a spike array")
        neurons = np.flatnonzero(np.asarray(leaf).ravel())
        population = max(population, leaf.size)
        ax.scatter(np.full(neurons.size, step), neurons, s=4, marker="|", color="k")
    if 0 < len(steps) <= 12:
        ax.set_xticks(steps)
    else:
        _integer_ticks(ax.xaxis)
    _integer_ticks(ax.yaxis)
    if population:
        ax.set_ylim(-0.5, population - 0.5)  # every neuron, spiking or not
    ax.set_xlabel("step")
    ax.set_ylabel("neuron")
    ax.set_title(f"{path} spikes")
    return ax
