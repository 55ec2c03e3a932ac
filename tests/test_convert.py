"""BrainPy / braintools msgpack checkpoints (.bp) converted into zarrckpt steps, bit-exact."""

import collections
import os
import subprocess
import sys
from pathlib import Path

import brainunit as u
import ml_dtypes
import msgpack
import numpy as np
import pytest
from braintools.file import _msg_checkpoint as bt_msgpack
from braintools.file import msgpack_load, msgpack_save
from helpers import assert_same

import zarrckpt
from zarrckpt import AlreadyExistsError, CorruptCheckpointError
from zarrckpt._convert import convert_msgpack, read_msgpack

ROOT = Path(__file__).resolve().parent.parent
Pair = collections.namedtuple("Pair", "left right")


def _state():
    rng = np.random.default_rng(0)
    return {
        "net": {
            "l1": {"W": rng.normal(size=(40, 30)).astype(np.float32), "b": np.zeros(30)},
            "l2": {
                "V": rng.normal(size=30).astype(ml_dtypes.bfloat16),
                "spike": rng.random(30) < 0.2,
                "count": rng.integers(0, 9, size=(3, 30), dtype=np.int32),
                "u8": np.arange(7, dtype=np.uint8),
            },
        },
        "optimizer": {
            "lr": 1e-3,
            "step": 1200,
            "nesterov": True,
            "name": "adam",
            "blob": b"\x00\xff",
        },
        "epoch_i": 7,
        "big_int": 2**63 + 5,  # fits uint64 only
        "z": 1 + 2j,
        "np_scalars": {"f": np.float32(0.5), "i": np.int64(-3), "bf": ml_dtypes.bfloat16(1.5)},
        "complex": (np.arange(4) * (1 - 1j)).astype(np.complex64),
        "f16": np.linspace(0, 1, 5, dtype=np.float16),
        "empty": np.zeros((0, 4), np.float32),
        "scalar0d": np.array(3.25),
        "nothing": None,
        "layers": [np.ones(2), np.zeros(3, np.int8)],  # lists become {"0": ..., "1": ...}
        "pair": Pair(np.ones(1), 2.0),
        "nested": {"a": {"b": {"c": {"d": np.float64(np.pi)}}}},
        "nan": np.array([np.nan, -0.0, np.inf], np.float32),
    }


@pytest.fixture
def bp_file(tmp_path):
    path = tmp_path / "ckpt.bp"
    msgpack_save(str(path), _state())
    return path


def test_convert_is_bit_exact_to_msgpack_load(bp_file, tmp_path):
    dst = tmp_path / "zarr"
    location = convert_msgpack(bp_file, dst)
    assert location.startswith(str(dst)) and zarrckpt.list_steps(dst) == [0]
    assert_same(zarrckpt.load_pytree(dst), msgpack_load(str(bp_file)))


def test_read_msgpack_equals_msgpack_load(bp_file):
    assert_same(read_msgpack(bp_file), msgpack_load(str(bp_file)))
    with open(bp_file, "rb") as fp:  # a file object works too
        assert_same(read_msgpack(fp), msgpack_load(str(bp_file)))


def test_brainpy_save_pytree_file(tmp_path):
    """What BrainPy users have: bp.checkpoints.save_pytree (which calls msgpack_save)."""
    from brainpy import checkpoints

    src = str(tmp_path / "brainpy.bp")
    target = {"W": np.arange(6.0).reshape(2, 3), "layers": [np.ones(2), np.int32(4)]}
    checkpoints.save_pytree(src, target, verbose=False)
    dst = tmp_path / "zarr"
    convert_msgpack(src, dst, step=12)
    assert zarrckpt.list_steps(dst) == [12]
    assert_same(zarrckpt.load_pytree(dst), checkpoints.load_pytree(src))
    # leaves are matched by path, so the dicts "0", "1" restore into a target's list
    restored = zarrckpt.load_pytree(
        dst, {"W": np.zeros((2, 3)), "layers": [np.zeros(2), np.int32(0)]}
    )
    assert_same(restored, checkpoints.load_pytree(src, target))


def test_quantities_are_rebuilt(tmp_path):
    src = str(tmp_path / "q.bp")
    V = u.Quantity(np.linspace(-70, -50, 5), unit=u.mV)
    tau = u.Quantity(np.float32(10.0), unit=u.ms)
    msgpack_save(src, {"V": V, "tau": tau, "plain": np.ones(2)})
    dst = tmp_path / "zarr"
    convert_msgpack(src, dst)
    got = zarrckpt.load_pytree(dst)
    expected = msgpack_load(src, target={"V": V, "tau": tau, "plain": np.ones(2)})
    for key in ("V", "tau"):
        assert isinstance(got[key], u.Quantity)
        assert got[key].unit == expected[key].unit
    # braintools rebuilds an unnamed unit ("10.0^-3 * m^2 * kg / (s^3 * A)"); the converter
    # names it after the unit brainunit exports with the same dimension and scale
    assert (str(got["V"].unit), str(got["tau"].unit)) == ("mV", "ms")
    for key in ("V", "tau"):
        assert_same(np.asarray(got[key].mantissa), np.asarray(expected[key].mantissa))
    # restore into a target holding Quantities
    restored = zarrckpt.load_pytree(dst, {"V": V * 0, "tau": tau * 0, "plain": np.zeros(2)})
    assert restored["V"].unit == u.mV and np.array_equal(restored["V"].mantissa, V.mantissa)
    # without rebuilding: exactly what msgpack_load returns without a target
    convert_msgpack(src, tmp_path / "raw", quantities=False)
    assert_same(zarrckpt.load_pytree(tmp_path / "raw"), msgpack_load(src))


def test_arrays_the_writer_split(tmp_path, monkeypatch):
    """Arrays above MAX_CHUNK_SIZE are written as __msgpack_chunked_array__ dicts."""
    monkeypatch.setattr(bt_msgpack, "MAX_CHUNK_SIZE", 64)
    src = str(tmp_path / "chunked.bp")
    tree = {
        "big": np.arange(300, dtype=np.float32).reshape(10, 30),
        "inner": {"x": np.arange(50.0)},
    }
    msgpack_save(src, tree)
    raw = msgpack.unpackb(Path(src).read_bytes(), raw=False, ext_hook=lambda c, d: None)
    assert "__msgpack_chunked_array__" in raw["big"]
    convert_msgpack(src, tmp_path / "zarr")
    assert_same(zarrckpt.load_pytree(tmp_path / "zarr"), msgpack_load(src))


def test_needs_neither_braintools_nor_jax(bp_file):
    code = (
        "import sys, numpy as np; from zarrckpt._convert import read_msgpack; "
        f"t = read_msgpack({str(bp_file)!r}, quantities=False); "
        "assert t['net']['l1']['W'].shape == (40, 30); "
        "bad = [m for m in ('braintools', 'brainpy', 'jax') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_appends_to_an_existing_root(bp_file, tmp_path):
    dst = tmp_path / "zarr"
    zarrckpt.save_pytree(dst, {"a": np.ones(1)}, step=3, verbose=False)
    convert_msgpack(bp_file, dst)  # step None: one past the latest, nothing dropped
    assert zarrckpt.list_steps(dst) == [3, 4]
    with pytest.raises(AlreadyExistsError):
        convert_msgpack(bp_file, dst, step=3)
    convert_msgpack(bp_file, dst, step=3, overwrite=True)  # replaces 3, drops 4 (save_pytree)
    assert zarrckpt.list_steps(dst) == [3]


def test_to_s3(bp_file, s3_root):
    root, options = s3_root
    convert_msgpack(bp_file, root, storage_options=options)
    assert_same(zarrckpt.load_pytree(root, storage_options=options), msgpack_load(str(bp_file)))


def _ext_array(shape, dtype_name: bytes, buffer: bytes):
    return msgpack.ExtType(1, msgpack.packb((shape, dtype_name, buffer), use_bin_type=True))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "empty or truncated"),
        (msgpack.packb({"a": 1})[:-1], "empty or truncated"),
        (msgpack.packb({"a": 1}) + b"\x01", "trailing data"),
        (b"\xc1", "not a valid msgpack checkpoint"),  # a reserved byte
        (msgpack.packb({"a": msgpack.ExtType(9, b"x")}), "unknown msgpack ext type 9"),
        (msgpack.packb({"a": _ext_array([2], b"float32", b"\x00" * 4)}), "needs 8 bytes"),
        (msgpack.packb({"a": _ext_array([1], b"object", b"\x00" * 8)}), "refusing array dtype"),
        (msgpack.packb({"a": _ext_array([1], b"no-such-type", b"")}), "unknown array dtype"),
        (msgpack.packb({"a": _ext_array([-1], b"int8", b"")}), "malformed array shape"),
    ],
    ids=["empty", "truncated", "trailing", "garbage", "ext", "short", "object", "dtype", "shape"],
)
def test_damaged_files_are_refused(tmp_path, payload, message):
    src = tmp_path / "bad.bp"
    src.write_bytes(payload)
    with pytest.raises(CorruptCheckpointError, match=message) as info:
        convert_msgpack(src, tmp_path / "zarr")
    assert str(src) in str(info.value)
    assert not os.path.exists(tmp_path / "zarr")  # nothing written


def test_a_directory_is_not_a_bp_file(tmp_path):
    with pytest.raises(IsADirectoryError):
        read_msgpack(tmp_path)
