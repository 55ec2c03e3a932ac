"""Every leaf and container kind comes back as saved, on every backend."""

from collections import OrderedDict, namedtuple

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ML, NUMERIC, assert_same
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import zarrckpt

Point = namedtuple("Point", "x y")


def roundtrip(url, tree, **kwargs):
    zarrckpt.save_pytree(url, tree, verbose=False, **kwargs)
    return zarrckpt.load_pytree(url)


@pytest.mark.parametrize("dtype", NUMERIC + ML, ids=str)
def test_every_dtype(url, dtype):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(3, 5) if np.dtype(dtype).itemsize else 0, dtype=np.uint8)
    a = np.frombuffer(rng.bytes(15 * np.dtype(dtype).itemsize), dtype=dtype).reshape(3, 5)
    if np.dtype(dtype) == np.bool_:
        a = raw % 2 == 1
    tree = {"a": a, "zero_d": a[0, 0].reshape(()), "empty": a[:0]}
    assert_same(roundtrip(url, tree), tree)


def test_containers_and_python_leaves(url):
    tree = {
        "dict": {"a": 1, 2: 2.5, "nested": {"deep": [True, None, 1 + 2j]}},
        "list": [np.arange(3), "text", b"bytes", ()],
        "tuple": (np.float32(1.5), np.int64(-3), np.bool_(True)),
        "named": Point(np.zeros(2), [1, 2]),
        "odict": OrderedDict([("z", 1), ("a", 2)]),
        "none": None,
        "empty": {},
        "unicode ключ/with slash": "значение",
        "": "empty key", "..": "dots", "__dunder": "reserved",
    }  # fmt: skip
    assert_same(roundtrip(url, tree), tree)


def test_tuple_keys_and_names_unsafe_on_some_disk(url):
    tree = {
        ("layers", 0, "weight"): np.arange(3), ("layers", 0, "bias"): np.ones(2), "layers": 1,
        "zarr.json": 2, ".zarrckpt-x": 3, "V": 4, "v": 5, "x" * 300: 6, "a:b|c?": 7, "CON": 8,
        "%~1": 9, "nested": {("a",): 10, "a": 11, ("A", "b"): 12},
    }  # fmt: skip
    assert_same(roundtrip(url, tree), tree)
    zeros = zarrckpt.load_pytree(url, {**tree, "layers": 0})
    assert_same(zeros, tree)


def test_jax_arrays_load_as_numpy(url):
    out = roundtrip(url, {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3)})
    assert type(out["w"]) is np.ndarray
    np.testing.assert_array_equal(out["w"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_bare_leaf_and_bare_none(url):
    assert_same(roundtrip(url, np.arange(4)), np.arange(4))
    assert roundtrip(url, None) is None


def test_big_endian_and_non_contiguous_inputs(url):
    big = np.arange(12, dtype=">i4").reshape(3, 4)
    strided = np.arange(40, dtype=np.float64).reshape(5, 8)[::2, 1::3]
    out = roundtrip(url, {"big": big, "strided": strided})
    np.testing.assert_array_equal(out["big"], big)
    assert out["big"].dtype == np.dtype("int32")
    np.testing.assert_array_equal(out["strided"], strided)


@pytest.mark.parametrize("codec", [None, "none", "zstd", "zstd:7", "gzip:1"])
@pytest.mark.parametrize("shape", [(1000,), (37, 11), (4, 5, 6), ()])
def test_chunked_arrays_across_codecs(url, codec, shape):
    a = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    spikes = np.random.default_rng(2).random(shape) < 0.02
    tree = {"v": a, "s": spikes}
    assert_same(roundtrip(url, tree, chunk_bytes=100, codec=codec), tree)


def test_default_codec_by_dtype_and_size(tmp_path):
    """Integer and bool leaves get zstd:1, floats none, and so do leaves of at most 64 bytes
    (a zstd frame only adds bytes to a scalar; reading ``epoch_i`` needs no numcodecs)."""
    tree = {
        "w": np.zeros(100, np.float32), "spikes": np.zeros(100, bool), "n": np.zeros(100, np.int32),
        "epoch_i": 3, "flags": np.zeros(64, bool), "mask": np.zeros(65, bool), "name": "run-a",
    }  # fmt: skip
    zarrckpt.save_pytree(str(tmp_path), tree, verbose=False)
    ckpt = zarrckpt.open_checkpoint(str(tmp_path))
    assert {path: ckpt[path].codec for path in tree} == {
        "w": "none", "spikes": "zstd:1", "n": "zstd:1", "epoch_i": "none", "flags": "none",
        "mask": "zstd:1", "name": "none",
    }  # fmt: skip
    assert_same(zarrckpt.load_pytree(str(tmp_path)), tree)


def test_bad_codec_and_chunk_values(url):
    with pytest.raises(ValueError, match="unknown codec 'lz4'"):
        zarrckpt.save_pytree(url, {"a": np.ones(2)}, codec="lz4", verbose=False)
    with pytest.raises(ValueError, match="level must be an integer"):
        zarrckpt.save_pytree(url, {"a": np.ones(2)}, codec="zstd:x", verbose=False)
    assert zarrckpt.list_steps(url) == []


# --- random nested trees ------------------------------------------------------------------

_dtypes = st.sampled_from(["bool", "int8", "int32", "uint16", "float32", "float64", "complex64"])
_arrays = _dtypes.flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
)
_scalars = st.one_of(
    st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.text(max_size=8)
)
_parts = st.one_of(st.text(max_size=3), st.integers(0, 3))
_keys = st.one_of(
    st.text(max_size=6), st.integers(-5, 50), st.lists(_parts, min_size=1, max_size=3).map(tuple)
)
_trees = st.recursive(
    st.one_of(_arrays, _scalars, st.none()),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(_keys, children, max_size=4),
    ),
    max_leaves=12,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tree=_trees)
def test_random_trees_roundtrip(tmp_path_factory, tree):
    url = str(tmp_path_factory.mktemp("h") / "ckpt")
    assert_same(roundtrip(url, tree, chunk_bytes=64), tree)


@pytest.mark.parametrize("shape", [(1_000_003,), (1001, 997), (3, 700, 300)])
def test_large_raw_chunks_read_straight_into_the_output(url, shape):
    """Chunks of >= 256 KiB with no compression take the direct path on local disks."""
    a = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    out = roundtrip(url, {"w": a}, chunk_bytes=300_000, codec="none")
    assert out["w"].tobytes() == a.tobytes()
    ckpt = zarrckpt.open_checkpoint(url, storage_options=getattr(url, "storage_options", None))
    assert ckpt["w"][1:-1].tobytes() == a[1:-1].tobytes()  # partial chunks: the decode path
