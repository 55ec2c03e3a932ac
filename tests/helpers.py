"""Shared test helpers."""

import json
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

import zarrckpt
from zarrckpt._dtypes import ml_dtypes_table

NUMERIC = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
           "float16", "float32", "float64", "complex64", "complex128"]  # fmt: skip
ML = [np.dtype(d) for d in ml_dtypes_table()]
ALL_DTYPES = NUMERIC + ML


def assert_same(a, b):
    """Equal values and types, recursively; arrays bit-exact with equal dtype and shape."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    else:
        assert a == b


def nested_trees(leaves, keys, point):
    """Trees of ``leaves`` in lists, tuples, dicts keyed by ``keys`` and the namedtuple class
    ``point`` (two fields), at most 10 leaves."""
    return st.recursive(
        leaves,
        lambda kids: st.one_of(
            st.lists(kids, max_size=3),
            st.lists(kids, max_size=3).map(tuple),
            st.dictionaries(keys, kids, max_size=4),
            st.builds(point, kids, kids),
        ),
        max_leaves=10,
    )


def save(url, tree, **kwargs):
    """``save_pytree`` without its summary line."""
    zarrckpt.save_pytree(url, tree, verbose=False, **kwargs)


def only_step_dir(url) -> Path:
    """The one step directory of a local root."""
    (step,) = Path(url).glob("step_*")
    return step


def tree_record(url) -> dict:
    """The tree record of a local root's one step."""
    meta = json.loads((only_step_dir(url) / "zarr.json").read_text())
    return meta["attributes"]["zarrckpt"]["tree"]
