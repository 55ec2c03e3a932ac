"""Loading into a target: its structure and types win; mismatches are named."""

from collections import namedtuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import zarrckpt
from zarrckpt import StructureMismatchError, StructureMismatchWarning

Params = namedtuple("Params", "w b")


def test_restore_keeps_target_types(url):
    saved = {"p": Params(np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, np.float32)), "n": 3, "x": 2.5, "s": "hi",
             "g": np.float32(1.5), "l": [np.arange(2)]}  # fmt: skip
    zarrckpt.save_pytree(url, saved, verbose=False)
    target = {"p": Params(jnp.zeros((2, 3)), jnp.zeros(3)), "n": 0, "x": 0.0, "s": "",
              "g": np.float32(0), "l": [np.zeros(2, dtype=np.int64)]}  # fmt: skip
    out = zarrckpt.load_pytree(url, target)
    assert isinstance(out["p"], Params) and isinstance(out["p"].w, jax.Array)
    np.testing.assert_array_equal(out["p"].w, saved["p"].w)
    assert out["n"] == 3 and type(out["n"]) is int
    assert out["x"] == 2.5 and out["s"] == "hi" and out["g"] == np.float32(1.5)
    assert type(out["l"]) is list


def test_jax_target_keeps_its_sharding(url):
    devices = np.array(jax.devices()[:2])
    assert len(devices) == 2, "conftest asks XLA for 2 CPU devices"
    sharding = NamedSharding(Mesh(devices, ("x",)), PartitionSpec("x"))
    w = jax.device_put(jnp.arange(8, dtype=jnp.float32), sharding)
    zarrckpt.save_pytree(url, {"w": w * 2}, verbose=False)
    out = zarrckpt.load_pytree(url, {"w": w})
    assert out["w"].sharding == sharding
    np.testing.assert_array_equal(out["w"], np.arange(8) * 2)


def test_mismatch_error_names_every_path(url):
    zarrckpt.save_pytree(
        url, {"a": np.zeros((2, 3)), "b": np.zeros(2, np.int32), "extra": 1}, verbose=False
    )
    target = {"a": np.zeros((3, 2)), "b": np.zeros(2, np.int64), "new": np.zeros(1)}
    with pytest.raises(StructureMismatchError) as info:
        zarrckpt.load_pytree(url, target)
    message = str(info.value)
    assert "does not match the target (4 leaves)" in message
    assert "a: shape (2, 3) in the checkpoint, (3, 2) in the target" in message
    assert "b: dtype int32 in the checkpoint, int64 in the target" in message
    assert "new: missing from the checkpoint" in message
    assert "extra: in the checkpoint, not in the target" in message
    assert isinstance(info.value, ValueError)


def test_mismatch_warn_and_ignore_keep_the_target_value(url):
    zarrckpt.save_pytree(url, {"a": np.ones(2), "b": np.ones(3)}, verbose=False)
    target = {"a": np.zeros(2), "b": np.zeros(4)}
    with pytest.warns(StructureMismatchWarning, match="b: shape"):
        out = zarrckpt.load_pytree(url, target, mismatch="warn")
    np.testing.assert_array_equal(out["a"], np.ones(2))
    assert out["b"] is target["b"]
    out = zarrckpt.load_pytree(url, target, mismatch="ignore")
    np.testing.assert_array_equal(out["a"], np.ones(2))
    with pytest.raises(ValueError, match="mismatch must be"):
        zarrckpt.load_pytree(url, target, mismatch="loose")


def test_str_target_against_array(url):
    zarrckpt.save_pytree(url, {"s": np.zeros(3, np.uint8)}, verbose=False)
    with pytest.raises(StructureMismatchError, match="s: target is str, checkpoint has array"):
        zarrckpt.load_pytree(url, {"s": "abc"})


def test_shape_dtype_struct_targets(local_url):
    """``jax.ShapeDtypeStruct`` targets (no buffers needed to restore): arrays land with the
    target's sharding, typed PRNG keys with their implementation, key-dtype targets too."""
    keys = jax.random.split(jax.random.key(3), 4)
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    zarrckpt.save_pytree(local_url, {"w": w, "k": keys, "r": jax.random.key(1, impl="rbg")})
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {
        "w": jax.ShapeDtypeStruct((3, 4), np.float32, sharding=device),
        "k": jax.ShapeDtypeStruct(keys.shape, keys.dtype),
        "r": jax.eval_shape(lambda: jax.random.key(0, impl="rbg")),
    }
    got = zarrckpt.load_pytree(local_url, target)
    assert isinstance(got["w"], jax.Array) and got["w"].sharding == device
    np.testing.assert_array_equal(got["w"], w)
    np.testing.assert_array_equal(jax.random.key_data(got["k"]), jax.random.key_data(keys))
    assert jax.random.key_impl(got["r"]) == jax.random.key_impl(jax.random.key(0, impl="rbg"))
    other_impl = jax.eval_shape(lambda: jax.random.split(jax.random.key(0, impl="rbg"), 4))
    with pytest.raises(StructureMismatchError, match=r"k: shape \(4, 2\) in the checkpoint"):
        zarrckpt.load_pytree(local_url, {**target, "k": other_impl})
    with pytest.raises(StructureMismatchError, match=r"w: shape \(3, 4\) in the checkpoint"):
        zarrckpt.load_pytree(local_url, {**target, "w": jax.ShapeDtypeStruct((4, 3), np.float32)})
