"""Lazy selections equal NumPy's, whatever the chunking."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zarrckpt._engine import read_selections, write_step
from zarrckpt._format import ArrayLayout
from zarrckpt._indexing import normalize
from zarrckpt._storage import open_storage
from zarrckpt._sync import run
from zarrckpt._write import plan as _plan


def _write(tmp_path, array, chunk_bytes):
    storage = open_storage(str(tmp_path))
    plan = _plan({"a": array}, copy=False, chunk_bytes=chunk_bytes, codec="zstd:1")
    run(write_step(storage, "s", plan.leaves, plan.groups, b"{}"))
    return storage, plan.leaves[0].layout


def _index(n):
    ints = st.integers(-n, n - 1) if n else st.nothing()
    ends = st.one_of(st.none(), st.integers(-n - 2, n + 2))
    slices = st.builds(slice, ends, ends, st.one_of(st.none(), st.integers(-4, 4).filter(bool)))
    return st.one_of(ints, slices)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_selection_matches_numpy(tmp_path_factory, data):
    shape = tuple(data.draw(st.lists(st.integers(0, 9), min_size=0, max_size=3)))
    array = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    chunk_bytes = data.draw(st.sampled_from([4, 12, 40, 1000]))
    storage, layout = _write(tmp_path_factory.mktemp("sel"), array, chunk_bytes)
    selection = tuple(data.draw(_index(n)) for n in shape[: data.draw(st.integers(0, len(shape)))])
    if data.draw(st.booleans()):
        selection = (*selection, Ellipsis)
    got = run(read_selections(storage, "s", {"a": (layout, normalize(selection, shape))}))["a"]
    want = array[selection]
    assert np.shape(got) == np.shape(want)
    np.testing.assert_array_equal(got, want)


def test_bad_indices(tmp_path):
    with pytest.raises(IndexError, match="out of bounds for axis 0 with size 3"):
        normalize((5,), (3,))
    with pytest.raises(IndexError, match="too many indices"):
        normalize((0, 0), (3,))
    with pytest.raises(IndexError, match="only integers, slices and"):
        normalize(([0, 1],), (3,))
    with pytest.raises(IndexError, match="single ellipsis"):
        normalize((..., ...), (3,))


def test_only_touched_chunks_are_read():
    layout = ArrayLayout((100, 10), np.dtype("f4"), (10, 10))
    sel = normalize((slice(15, 25), 3), layout.shape)
    touched = [p[0] for p in sel.axes[0].projections(10, 100)]
    assert touched == [1, 2]
