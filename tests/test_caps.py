"""Everything read from a checkpoint is bounded before it is read (issue 16, items 5 and 7).

A checkpoint may come from a stranger. A 1 GiB sparse file in place of a document or a chunk
used to cost ~1.2 GiB per read, kept across failing calls; a record edited to claim 2^28
one-element chunks made ``to_dask()`` build a graph of 5.6 GiB. Here:

- the storage contract: ``get(key, limit)``, ``get_batch(items, limit)`` and
  ``get_with_token(key, limit)`` refuse a larger value from its size, on every backend;
- each document and chunk a reader takes, as a 1 GiB sparse file: refused, with the peak of
  traced allocations far below the file, and no memory kept across failing calls (nor after a
  failure inside the bound);
- lazy graphs of more chunks than the data holds are refused;
- other files that are not what they claim: a UNIX socket for a chunk, and a valid deep tree
  read from deep in a call stack.

Time bounds appear only where a bound is the point, and generously.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import re
import socket
import time
import tracemalloc
from pathlib import Path

import google_crc32c
import numpy as np
import pytest

import zarrckpt
from zarrckpt import CorruptCheckpointError, _read, cli
from zarrckpt._manifest import MANIFEST_MAX_BYTES, METADATA_MAX_BYTES, STEP_RECORD_MAX_BYTES
from zarrckpt._storage import open_storage
from zarrckpt._sync import run

GiB = 2**30


# --- the storage contract ----------------------------------------------------------------------

BACKENDS = ["local", "memory", "s3", "gcs", "s3-obstore", "gcs-obstore", "azure"]


@pytest.fixture(params=BACKENDS)
def storage(request, tmp_path):
    name = request.param
    if name == "local":
        return open_storage(str(tmp_path / "root"))
    if name == "memory":
        return open_storage(f"memory://caps-{os.getpid()}-{time.monotonic_ns()}")
    fixture = {"s3": "s3_root", "gcs": "gcs_root", "s3-obstore": "s3_obstore_root",
               "gcs-obstore": "gcs_obstore_root", "azure": "azure_root"}[name]  # fmt: skip
    url, options = request.getfixturevalue(fixture)
    return open_storage(url, options)


TOO_LARGE = r"a/value holds (11|more than 10) bytes, more than the 10 bytes zarrckpt reads there"


def test_get_refuses_a_value_over_its_limit(storage):
    run(storage.put("a/value", [b"0123456789A"]))
    assert run(storage.get("a/value", 11)) == b"0123456789A"
    assert run(storage.get("a/value")) == b"0123456789A"
    with pytest.raises(CorruptCheckpointError, match=TOO_LARGE):
        run(storage.get("a/value", 10))
    assert run(storage.get("a/missing", 10)) is None


def test_get_batch_refuses_a_value_over_its_limit(storage):
    run(storage.put("a/value", [b"0123456789A"]))
    got: list[bytes | None] = []
    run(storage.get_batch([("a/value", got.append), ("a/missing", got.append)], 11))
    assert got == [b"0123456789A", None]
    with pytest.raises(CorruptCheckpointError, match=TOO_LARGE):
        run(storage.get_batch([("a/value", got.append)], 10))


def test_get_with_token_refuses_a_value_over_its_limit(storage):
    run(storage.put("a/value", [b"0123456789A"]))
    data, token = run(storage.get_with_token("a/value", 11))
    assert data == b"0123456789A" and token is not None
    with pytest.raises(CorruptCheckpointError, match=TOO_LARGE):
        run(storage.get_with_token("a/value", 10))
    assert run(storage.get_with_token("a/missing", 10)) == (None, None)


def test_get_with_token_is_bounded_as_the_manifest_by_default(storage):
    """``get_with_token`` reads the manifest (``_commit.read_manifest_versioned``)."""
    data, _ = run(storage.get_with_token("a/missing"))
    assert data is None
    if storage.url.startswith("/"):  # a sparse file: big on paper only
        path = Path(storage.url) / "big"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(MANIFEST_MAX_BYTES + 1)
        with pytest.raises(CorruptCheckpointError, match=f"more than the {MANIFEST_MAX_BYTES}"):
            run(storage.get_with_token("big"))


def test_the_ceilings_hold_what_zarrckpt_writes():
    """The documents of a step far larger than usual stay far below their ceilings."""
    assert METADATA_MAX_BYTES <= STEP_RECORD_MAX_BYTES
    assert MANIFEST_MAX_BYTES >= 200_000 * 250  # 200,000 steps listed


# --- 1 GiB sparse files in place of what a reader reads -----------------------------------------


def make_root(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint with a batched small leaf (``w``), a raw leaf read straight into place
    (``big``) and a compressed leaf whose 512 KiB chunks are each read alone (``z``)."""
    root = tmp_path / "ckpt"
    tree = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "big": np.arange(2**17, dtype=np.float32),
        "z": np.arange(2**18, dtype=np.int32),
    }
    zarrckpt.save_pytree(str(root), tree, verbose=False, chunk_bytes=2**19, codec=None)
    manifest = json.loads((root / "zarr.json").read_text())
    step_dir = root / manifest["attributes"]["zarrckpt"]["steps"][0]["dir"]
    return root, step_dir


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def sparse(path: Path, size: int = GiB) -> None:
    path.unlink()
    with open(path, "wb") as f:
        f.truncate(size)


def load(root: Path) -> str:
    with pytest.raises(CorruptCheckpointError) as info:
        zarrckpt.load_pytree(str(root))
    return str(info.value)


def load_cross_checked(root: Path) -> str:
    """A load that checks every leaf against its own zarr.json (as large leaves are)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_read, "CROSS_CHECK_BYTES", 0)
        return load(root)


def verify(root: Path) -> str:
    """``zarrckpt verify``'s report (the damage is reported, not raised)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["verify", str(root), "-q"])
    assert status in (1, 2), out.getvalue()
    return out.getvalue() + err.getvalue()


ANY = r"\d+"


def refused(size: int, limit: int | str) -> str:
    return rf"holds {size} bytes, more than the {limit} bytes zarrckpt reads there"


SPARSE = {
    # what: (the file, who reads it, what they say)
    "manifest": ("zarr.json", [load, verify], refused(GiB, MANIFEST_MAX_BYTES)),
    "step-record": ("{step}/zarr.json", [load, verify], refused(GiB, STEP_RECORD_MAX_BYTES)),
    "leaf-zarr.json": (
        "{step}/w/zarr.json", [load_cross_checked, verify], refused(GiB, METADATA_MAX_BYTES)
    ),
    "batched-chunk": ("{step}/w/c.0.0", [load, verify], r"w/c\.0\.0 " + refused(GiB, ANY)),
    "compressed-chunk": ("{step}/z/c.0", [load, verify], r"z/c\.0 " + refused(GiB, ANY)),
    "raw-chunk": ("{step}/big/c.0", [load, verify], rf"chunk holds {GiB - 4} bytes, expected"),
}  # fmt: skip


@pytest.mark.parametrize("what", list(SPARSE))
def test_a_sparse_gigabyte_costs_nothing(tmp_path, what):
    root, step_dir = make_root(tmp_path)
    where, readers, says = SPARSE[what]
    sparse(root / where.format(step=step_dir.name))
    gc.collect()
    before = rss_bytes()
    for reader in readers:
        for _ in range(3):
            tracemalloc.start()
            try:
                message = reader(root)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak < 32 * 2**20, f"{reader.__name__}: peak {peak} bytes"
            assert re.search(says, message), message
    assert rss_bytes() - before < 64 * 2**20  # nothing kept across the failing calls


def test_verify_names_an_oversized_leaf_zarr_json(tmp_path, capsys):
    root, step_dir = make_root(tmp_path)
    sparse(step_dir / "w" / "zarr.json")
    status = cli.main(["verify", str(root)])
    out = capsys.readouterr().out
    assert status == 1
    assert f"w/zarr.json holds {GiB} bytes, more than the {METADATA_MAX_BYTES} bytes" in out


def test_memory_is_returned_after_a_failure_within_the_bound(tmp_path):
    """A 40 MiB manifest that is not JSON is read (it is under the bound) and refused; the
    memory is returned when the error is gone, not at the collector's next full pass."""
    root, _ = make_root(tmp_path)
    sparse(root / "zarr.json", 40 * 2**20)
    gc.collect()
    before = rss_bytes()
    for _ in range(6):
        with pytest.raises(CorruptCheckpointError, match="the manifest is not valid JSON"):
            zarrckpt.load_pytree(str(root))
    assert rss_bytes() - before < 100 * 2**20  # 6 x 40 MiB if kept


# --- lazy graphs ---------------------------------------------------------------------------------


def claim_chunks(root: Path, step_dir: Path, path: str, shape: list[int], chunks: list[int]):
    """Edit the step record (and its checksum in the manifest) so that leaf ``path`` claims
    ``shape`` cut into ``chunks``: a few bytes changed."""
    record = json.loads((step_dir / "zarr.json").read_text())

    def walk(node):
        if node.get("type") == "leaf" and node.get("path") == path:
            node["shape"], node["chunks"] = shape, chunks
        for child in node.get("children", []):
            walk(child)

    walk(record["attributes"]["zarrckpt"]["tree"])
    data = json.dumps(record).encode()
    (step_dir / "zarr.json").write_bytes(data)
    manifest = json.loads((root / "zarr.json").read_text())
    manifest["attributes"]["zarrckpt"]["steps"][0]["record_crc32c"] = google_crc32c.value(data)
    (root / "zarr.json").write_text(json.dumps(manifest))


CLAIMED = 2**22  # one-element chunks (2^28 in the issue: 8.5 s and 5.6 GiB before refusal)


@pytest.mark.parametrize("edit_zarr_json", [False, True], ids=["record", "record+zarr.json"])
@pytest.mark.parametrize("how", ["to_dask", "to_xarray", "tree-to_xarray"])
def test_lazy_graphs_refuse_chunks_the_data_does_not_hold(tmp_path, how, edit_zarr_json):
    pytest.importorskip("dask")
    pytest.importorskip("xarray")
    root, step_dir = make_root(tmp_path)
    claim_chunks(root, step_dir, "big", [CLAIMED], [1])
    if edit_zarr_json:  # the leaf's own zarr.json agrees: only the listing tells
        meta = step_dir / "big" / "zarr.json"
        doc = json.loads(meta.read_text())
        doc["shape"], doc["chunk_grid"]["configuration"]["chunk_shape"] = [CLAIMED], [1]
        meta.write_text(json.dumps(doc))
    ckpt = zarrckpt.open_checkpoint(str(root))
    build = {
        "to_dask": lambda: ckpt["big"].to_dask(),
        "to_xarray": lambda: ckpt.to_xarray("big"),
        "tree-to_xarray": lambda: ckpt.to_xarray(),
    }[how]
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(CorruptCheckpointError) as info:
            build()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 10
    assert peak < 32 * 2**20, f"peak {peak} bytes"
    message = str(info.value)
    assert "'big'" in message and str(CLAIMED) in message and "4096" in message, message


def test_lazy_graph_of_a_leaf_with_many_real_chunks(tmp_path):
    """More than 4096 chunks that are all there: the listing vouches for them."""
    pytest.importorskip("dask")
    root = tmp_path / "many"
    values = np.arange(5000, dtype=np.float64)
    zarrckpt.save_pytree(str(root), {"x": values}, verbose=False, chunk_bytes=8)
    leaf = zarrckpt.open_checkpoint(str(root))["x"]
    assert leaf.chunks == (1,)
    np.testing.assert_array_equal(leaf.to_dask()[4990:].compute(), values[4990:])


# --- other files that are not what they claim ---------------------------------------------------


@pytest.mark.parametrize("what", ["batched-chunk", "raw-chunk", "compressed-chunk"])
def test_a_socket_instead_of_a_chunk_is_damage(tmp_path, what):
    root, step_dir = make_root(tmp_path)
    path = {"batched-chunk": "w/c.0.0", "raw-chunk": "big/c.0", "compressed-chunk": "z/c.0"}[what]
    target = step_dir / path
    target.unlink()
    here = os.getcwd()
    os.chdir(target.parent)  # a UNIX socket path must be short
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(target.name)
            with pytest.raises(CorruptCheckpointError, match="is not a regular file"):
                zarrckpt.load_pytree(str(root))
    finally:
        os.chdir(here)


def deep_tree(levels: int) -> dict:
    tree: dict = {"leaf": np.arange(3)}
    for _ in range(levels):
        tree = {"k": tree}
    return tree


def test_a_valid_deep_tree_loads_from_deep_in_a_call_stack(tmp_path):
    """The record nests ~2 JSON levels per tree level; from 700 frames down, Python's JSON
    parser runs out of recursion where the same record parses fine from the top."""
    root = str(tmp_path / "deep")
    zarrckpt.save_pytree(root, deep_tree(150), verbose=False)

    def at_depth(n: int):
        return at_depth(n - 1) if n else zarrckpt.load_pytree(root)

    got = at_depth(700)
    for _ in range(150):
        got = got["k"]
    np.testing.assert_array_equal(got["leaf"], np.arange(3))
