"""zarrckpt.plots: what the axes say is the checkpoint's own (indices, steps), whatever was
subsampled to draw it."""

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest

import zarrckpt
from zarrckpt import plots

matplotlib.use("Agg")  # no display


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _shown_ticks(axis):
    """The tick positions inside the axis's view (matplotlib keeps some outside it)."""
    lo, hi = sorted(axis.get_view_interval())
    return [t for t in axis.get_ticklocs() if lo <= t <= hi]


def _save(tmp_path, tree, **kwargs):
    root = str(tmp_path / "ckpt")
    zarrckpt.save_pytree(root, tree, verbose=False, **kwargs)
    return zarrckpt.open_checkpoint(root)


@pytest.mark.parametrize(
    "shape, max_size, strides",
    [((1000, 2000), 512, (2, 4)), ((1001, 37), 100, (11, 1)), ((5, 7), 512, (1, 1))],
)
def test_heatmap_labels_the_matrixs_own_indices(tmp_path, shape, max_size, strides):
    W = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    leaf = _save(tmp_path, {"W": W})["W"]
    ax = plots.heatmap(leaf, max_size=max_size)
    ax.figure.canvas.draw()
    rows, cols = shape
    assert ax.get_xlim() == (-0.5, cols - 0.5) and ax.get_ylim() == (rows - 0.5, -0.5)
    for axis, n in ((ax.xaxis, cols), (ax.yaxis, rows)):
        ticks = _shown_ticks(axis)
        assert len(ticks) >= 2 and all(0 <= t < n and float(t).is_integer() for t in ticks), ticks
        if n > max_size:  # subsampled: the labels still reach far past the subsample's size
            assert max(ticks) >= n // 2 > max_size // 2 or max(ticks) > max_size, ticks
    # each pixel sits over the indices it was read from
    image = ax.get_images()[0]
    data = image.get_array()
    assert data.shape == (-(-rows // strides[0]), -(-cols // strides[1]))
    np.testing.assert_array_equal(data, W[:: strides[0], :: strides[1]])
    left, right, bottom, top = image.get_extent()
    assert (left, top) == (-0.5, -0.5)
    assert (right + 0.5) / data.shape[1] == strides[1] and (bottom + 0.5) / data.shape[
        0
    ] == strides[0]
    assert ax.get_title() == f"W {shape}" + (
        "" if strides == (1, 1) else f", 1 in {strides[0]}×{strides[1]} shown"
    )


def test_heatmap_names_its_axes_by_the_leafs_dims(tmp_path):
    leaf = _save(tmp_path, {"W": np.ones((30, 40))}, dims={"W": ("pre", "post")})["W"]
    ax = plots.heatmap(leaf)
    assert (ax.get_ylabel(), ax.get_xlabel()) == ("pre", "post")


def test_heatmap_of_a_vector(tmp_path):
    leaf = _save(tmp_path, {"v": np.arange(3000.0)})["v"]
    ax = plots.heatmap(leaf, max_size=512)
    ax.figure.canvas.draw()
    assert ax.get_xlim() == (-0.5, 2999.5) and list(ax.get_yticks()) == []
    assert all(0 <= t < 3000 and float(t).is_integer() for t in _shown_ticks(ax.xaxis))


def test_heatmap_refuses_3d(tmp_path):
    leaf = _save(tmp_path, {"x": np.ones((2, 3, 4))})["x"]
    with pytest.raises(ValueError, match="3-dimensional; a heatmap needs 1 or 2"):
        plots.heatmap(leaf)


@pytest.mark.parametrize("steps", [[0, 1, 2, 3, 4], [0, 1], list(range(0, 300, 10))])
def test_spike_raster_marks_integer_steps(tmp_path, steps):
    root = str(tmp_path / "run")
    rng = np.random.default_rng(0)
    for step in steps:
        zarrckpt.save_pytree(
            root, {"spike": rng.random(50) < 0.2}, step=step, keep=None, verbose=False
        )
    ax = plots.spike_raster(root, "spike")
    ax.figure.canvas.draw()
    ticks = _shown_ticks(ax.xaxis)
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    if len(steps) <= 12:
        assert ticks == steps  # at the saved steps, and nowhere else
    labels = [label.get_text().replace("−", "-") for label in ax.get_xticklabels()]
    assert all(label.lstrip("-").isdigit() for label in labels if label), labels
    assert ax.get_ylim() == (-0.5, 49.5)  # every neuron
    assert all(0 <= t < 50 and float(t).is_integer() for t in _shown_ticks(ax.yaxis))
    # one tick mark per spike, at its step
    offsets = np.concatenate([c.get_offsets() for c in ax.collections])
    assert set(offsets[:, 0]) <= set(steps)
