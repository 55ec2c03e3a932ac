"""Bad input is refused before anything is written; damage is reported by leaf."""

import os
import threading
from pathlib import Path

import numpy as np
import pytest

import zarrckpt
from zarrckpt import CorruptCheckpointError, UnsupportedLeafError


def _files(root):
    return (
        sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))
        if os.path.exists(root)
        else []
    )


@pytest.mark.parametrize(
    ("leaf", "message"),
    [
        (np.array([object()]), "leaf 'net/l1/W': dtype object cannot be stored"),
        (np.array(["a", "b"]), "leaf 'net/l1/W': dtype <U1 cannot be stored"),
        (threading.Lock(), "leaf 'net/l1/W': cannot store an object of type _thread.lock"),
        ({1, 2}, "leaf 'net/l1/W': cannot store an object of type builtins.set"),
        (2**70, "leaf 'net/l1/W': int 1180591620717411303424 does not fit"),
    ],
)  # fmt: skip
def test_unsupported_leaves_name_the_path_and_write_nothing(url, leaf, message):
    good = {"net": {"l0": np.ones(3), "l1": {"W": leaf}}}
    with pytest.raises(UnsupportedLeafError, match=message):
        zarrckpt.save_pytree(url, good, verbose=False)
    with pytest.raises(TypeError):
        zarrckpt.save_pytree(url, good, verbose=False)
    assert zarrckpt.list_steps(url) == []


def test_bad_leaf_never_damages_a_committed_step(local_url):
    zarrckpt.save_pytree(local_url, {"w": np.arange(3)}, verbose=False)
    before = _files(local_url)
    with pytest.raises(UnsupportedLeafError):
        zarrckpt.save_pytree(local_url, {"w": np.arange(3), "bad": object()}, verbose=False)
    assert _files(local_url) == before
    np.testing.assert_array_equal(zarrckpt.load_pytree(local_url)["w"], np.arange(3))


def _chunk(root, leaf, key="0"):
    (step,) = Path(root).glob("step_*")
    return step / leaf / f"c.{key}"


def test_flipped_byte_raises_naming_the_leaf(local_url):
    zarrckpt.save_pytree(local_url, {"net": {"l2": {"V": np.arange(1000.0)}}}, verbose=False)
    chunk = _chunk(local_url, "net/l2/V")
    data = bytearray(chunk.read_bytes())
    data[100] ^= 1
    chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"leaf 'net/l2/V' .*crc32c checksum mismatch"):
        zarrckpt.load_pytree(local_url)


@pytest.mark.parametrize("damage", ["truncate", "delete", "garble-compressed"])
def test_other_damage_is_reported(local_url, damage):
    zarrckpt.save_pytree(
        local_url, {"spikes": np.zeros(4096, bool)}, verbose=False
    )  # zstd by default
    chunk = _chunk(local_url, "spikes")
    if damage == "truncate":
        chunk.write_bytes(chunk.read_bytes()[:2])
        expected = "chunk is truncated"
    elif damage == "delete":
        chunk.unlink()
        expected = "is missing"
    else:  # valid checksum over bytes that are not zstd
        import google_crc32c

        payload = b"not zstd at all"
        chunk.write_bytes(payload + google_crc32c.value(payload).to_bytes(4, "little"))
        expected = "cannot decompress"
    with pytest.raises(CorruptCheckpointError, match=rf"leaf 'spikes'.*{expected}"):
        zarrckpt.load_pytree(local_url)


def test_step_data_gone_but_listed(local_url):
    where = zarrckpt.save_pytree(local_url, {"w": 1}, verbose=False)
    os.remove(os.path.join(where, "zarr.json"))
    with pytest.raises(
        CorruptCheckpointError, match="step 0 is listed in the manifest but its data is gone"
    ):
        zarrckpt.load_pytree(local_url)


def test_every_error_derives_from_the_base():
    for name in ("AlreadyExistsError", "CheckpointNotFoundError", "CorruptCheckpointError",
                 "StructureMismatchError", "UnsupportedLeafError", "StoreError"):  # fmt: skip
        assert issubclass(getattr(zarrckpt, name), zarrckpt.ZarrCkptError)


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend"])
def test_damage_in_large_raw_chunks(local_url, damage):
    zarrckpt.save_pytree(
        local_url,
        {"w": np.arange(300_000, dtype=np.float32)},
        codec="none",
        chunk_bytes=400_000,
        verbose=False,
    )
    chunk = _chunk(local_url, "w", "1")
    data = bytearray(chunk.read_bytes())
    if damage == "flip":
        data[1000] ^= 4
        expected = "checksum mismatch"
    elif damage == "truncate":
        data = data[:-10]
        expected = "chunk holds"
    else:
        data += b"\0\0"
        expected = "chunk holds"
    chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=rf"leaf 'w' .*{expected}"):
        zarrckpt.load_pytree(local_url)
