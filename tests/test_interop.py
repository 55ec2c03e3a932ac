"""Plain zarr-python and TensorStore read what zarrckpt writes, without zarrckpt's reader."""

import glob
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
import zarr
from helpers import ALL_DTYPES

import zarrckpt

# ml_dtypes types TensorStore does not know (yet); zarr-python reads them after `import zarrckpt`.
NOT_IN_TENSORSTORE = {"float8_e4m3", "uint4", "uint2"}
TS_DTYPES = [d for d in ALL_DTYPES if np.dtype(d).name not in NOT_IN_TENSORSTORE]


def _sample(dtype, shape=(7, 6)):
    rng = np.random.default_rng(3)
    if np.dtype(dtype) == np.bool_:
        return rng.random(shape) < 0.3
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(rng.bytes(n), dtype=dtype).reshape(shape).copy()


def _step_path(root):
    (step,) = glob.glob(os.path.join(root, "step_*"))
    return step


@pytest.mark.parametrize("codec", ["none", "zstd:3", "gzip:1"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_zarr_python_reads_every_dtype_and_codec(local_url, dtype, codec):
    a = _sample(dtype)
    zarrckpt.save_pytree(
        local_url, {"net": {"w": a}}, codec=codec, chunk_bytes=4 * a.itemsize * 6, verbose=False
    )
    group = zarr.open_group(_step_path(local_url), mode="r")
    arr = group["net/w"]
    assert arr.shape == a.shape and arr.dtype == a.dtype and arr.chunks == (4, 6)
    assert arr[:].tobytes() == a.tobytes()
    assert arr[2:5, 1:3].tobytes() == a[2:5, 1:3].tobytes()


@pytest.mark.parametrize("dtype", TS_DTYPES, ids=str)
def test_tensorstore_reads_every_dtype(local_url, dtype):
    a = _sample(dtype)
    zarrckpt.save_pytree(
        local_url,
        {"w": a, "scalar": a[0, 0].reshape(())},
        codec="zstd:1",
        chunk_bytes=3 * 6 * a.itemsize,
        verbose=False,
    )
    step = _step_path(local_url)
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(step, "w")}}
    got = ts.open(spec, read=True).result().read().result()
    assert got.dtype == a.dtype and got.tobytes() == a.tobytes()
    spec["kvstore"]["path"] = os.path.join(step, "scalar")
    assert ts.open(spec, read=True).result().read().result().tobytes() == a[0, 0].tobytes()


def test_zarr_python_sees_the_hierarchy(local_url):
    zarrckpt.save_pytree(
        local_url,
        {"net": {"l1": {"W": np.ones((2, 3))}, "l2": {"V": np.zeros(4)}}, "epoch": 3},
        verbose=False,
    )
    root = zarr.open_group(local_url, mode="r")  # the checkpoint root is itself a group
    assert root.attrs["zarrckpt"]["steps"][0]["step"] == 0
    step = zarr.open_group(_step_path(local_url), mode="r")
    assert sorted(step.group_keys()) == ["net"]
    assert sorted(step["net"].group_keys()) == ["l1", "l2"]
    assert step["epoch"][...] == 3
    meta = json.loads(Path(_step_path(local_url), "net", "l1", "W", "zarr.json").read_text())
    assert meta["codecs"][-1] == {"name": "crc32c"}


def _read_error(read, path):
    """The exception ``read(path)`` raises; none fails the test."""
    try:
        read(path)
    except Exception as exc:
        return exc
    pytest.fail(f"{read.__name__} read the damaged chunk of {path}")


def test_readers_detect_a_damaged_chunk(local_url, tmp_path):
    """zarr-python and TensorStore refuse a damaged zarrckpt chunk exactly as they refuse the
    same damage in an array zarr-python wrote itself (bytes + crc32c, the same values and
    chunk key): the same exception with the same message, whatever their wording is."""
    value = np.arange(100, dtype=np.float32)
    zarrckpt.save_pytree(local_url, {"w": value}, verbose=False)
    ours = os.path.join(_step_path(local_url), "w")
    theirs = str(tmp_path / "reference")
    reference = zarr.create_array(
        theirs,
        shape=value.shape,
        dtype=value.dtype,
        chunks=value.shape,
        serializer=zarr.codecs.BytesCodec(endian="little"),
        compressors=[zarr.codecs.Crc32cCodec()],
        chunk_key_encoding={"name": "default", "separator": "."},
        fill_value=0,
    )
    reference[:] = value
    for leaf in (ours, theirs):
        chunk = Path(leaf, "c.0")
        data = bytearray(chunk.read_bytes())
        data[10] ^= 0xFF
        chunk.write_bytes(bytes(data))

    def with_zarr(path):
        return zarr.open_array(path, mode="r")[:]

    def with_tensorstore(path):
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
        return ts.open(spec, read=True).result().read().result()

    for read in (with_zarr, with_tensorstore):
        got, want = _read_error(read, ours), _read_error(read, theirs)
        assert type(got) is type(want), (read.__name__, got, want)
        message = str(got).replace(ours, "<leaf>")
        assert message == str(want).replace(theirs, "<leaf>"), read.__name__


def test_zarr_python_writes_bfloat16_that_zarrckpt_registered(tmp_path):
    import ml_dtypes

    a = np.arange(10).astype(ml_dtypes.bfloat16)
    z = zarr.create_array(str(tmp_path / "bf"), shape=a.shape, dtype=a.dtype, chunks=(5,))
    z[:] = a
    meta = json.loads((tmp_path / "bf" / "zarr.json").read_text())
    assert meta["data_type"] == "bfloat16"
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "bf")}}
    assert ts.open(spec, read=True).result().read().result().tobytes() == a.tobytes()
