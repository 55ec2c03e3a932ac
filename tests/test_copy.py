"""``zarrckpt cp``: a copy is the same step, byte for byte (``zarrckpt._copy``).

Issue 19 found the old copy (a load and a save) losing dimension names, re-chunking,
turning JAX leaves into NumPy ones and dropping the PyTree node classes of the record.
These tests compare a copy with its source leaf by leaf (layout, kind, dimension names),
record byte for byte, every file byte for byte, and what a load returns, on a local disk,
``memory://`` and S3.
"""

import asyncio
import collections
import json
import os
import subprocess
import sys
import uuid
import warnings
from pathlib import Path

import brainunit as u
import fsspec
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import nested_trees
from hypothesis import given, settings
from hypothesis import strategies as st

import zarrckpt
from zarrckpt import _copy, _tree, cli
from zarrckpt._commit import read_manifest
from zarrckpt._storage import open_storage
from zarrckpt._sync import run
from zarrckpt.errors import AlreadyExistsError, CheckpointNotFoundError

ROOT = Path(__file__).resolve().parent.parent

Point = collections.namedtuple("Point", "x y")


@jax.tree_util.register_pytree_node_class
class Layer:
    """A PyTree node class the record names (``"class": "test_copy:Layer"``)."""

    def __init__(self, w, b):
        self.w, self.b = w, b

    def tree_flatten(self):
        return (self.w, self.b), None

    @classmethod
    def tree_unflatten(cls, aux, kids):
        return cls(*kids)


def _state(step: int = 0) -> dict:
    """Every kind of leaf and container: JAX arrays and a node class, a Quantity, str, bytes,
    Python and NumPy scalars, a PRNG key, bfloat16, an empty array, None, an empty dict, a
    tuple, a namedtuple, tuple keys (intermediate groups)."""
    return {
        "net": {
            "W": np.arange(1000 * 300, dtype=np.float32).reshape(1000, 300) + step,
            "layer": Layer(jnp.ones((3, 4)) * step, jnp.zeros(4)),
        },
        "q": u.Quantity(np.array([1.0, 2.0]), unit=u.mV),
        "name": "run-a", "epoch": step, "lr": 1e-3, "none": None, "empty": {}, "pair": (1, 2.0),
        "pt": Point(np.int8(3), np.zeros(2)),
        "tk": {("layers", 0): np.ones(3), ("layers", 1): np.zeros(2)},
        "bf": np.array([1.5, -2.0], ml_dtypes.bfloat16), "blob": b"\x00\xff",
        "e": np.zeros((0, 3)), "key": jax.random.key(step),
    }  # fmt: skip


DIMS = {"net/W": ("pre", "post")}
#: chunks of 200 x 300 for net/W (issue 19: the old copy made them 1000 x 300)
CHUNK_BYTES = 200 * 300 * 4


@pytest.fixture
def source(tmp_path):
    """A local root with steps 0 and 1 of :func:`_state`."""
    path = str(tmp_path / "src")
    for step in (0, 1):
        zarrckpt.save_pytree(path, _state(step), step=step, keep=None, dims=DIMS,
                             chunk_bytes=CHUNK_BYTES, verbose=False)  # fmt: skip
    return path


def _fs(url: str, options: dict | None):
    options = {k: v for k, v in (options or {}).items() if k != "backend"}
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path.rstrip("/")


def _files(url: str, options: dict | None, step: int) -> dict[str, bytes]:
    """Every file of ``step`` (relative to its directory) and its bytes; lease files aside."""
    info = run(read_manifest(open_storage(url, options))).get(step)
    fs, root = _fs(url, options)
    fs.invalidate_cache()
    base = f"{root}/{info.dir}"
    found = {p[len(base) + 1 :] for p in fs.find(base)}
    return {
        name: fs.cat_file(f"{base}/{name}")
        for name in sorted(found)
        if not name.rsplit("/", 1)[-1].startswith(".zarrckpt-")
    }


def _flat(tree):
    """A loaded tree's structure (node classes, units) and leaves (type, dtype, bytes)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)

    def data(x):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return str(x.dtype), np.asarray(jax.random.key_data(x)).tobytes()
        return np.asarray(x).dtype, np.asarray(x).tobytes()

    return treedef, [(type(x), *data(x)) for x in leaves]


def assert_same_step(a: tuple, b: tuple, step: int) -> None:
    """``b`` holds ``step`` exactly as ``a`` does: each leaf's layout, kind and dimension
    names, the record and every file byte for byte, and a load's types and values."""
    (url_a, opts_a), (url_b, opts_b) = a, b
    ca = zarrckpt.open_checkpoint(url_a, step, opts_a)
    cb = zarrckpt.open_checkpoint(url_b, step, opts_b)
    assert ca.step == cb.step == step
    assert ca.leaves() == cb.leaves()  # path, shape, dtype, chunks, codec, kind, sharding
    for leaf in ca.leaves():
        assert ca[leaf.path].dims == cb[leaf.path].dims, leaf.path
    files_a, files_b = _files(url_a, opts_a, step), _files(url_b, opts_b, step)
    assert list(files_a) == list(files_b)
    for name, data in files_a.items():
        assert files_b[name] == data, name  # the step record ("zarr.json") too
    info_a = run(read_manifest(open_storage(url_a, opts_a))).get(step)
    info_b = run(read_manifest(open_storage(url_b, opts_b))).get(step)
    assert (info_b.time, info_b.leaves, info_b.nbytes, info_b.record_crc32c) == (
        info_a.time,
        info_a.leaves,
        info_a.nbytes,
        info_a.record_crc32c,
    )
    assert info_b.dir != info_a.dir or url_a != url_b
    assert _classes(url_a, opts_a, step) == _classes(url_b, opts_b, step)
    tree_a = zarrckpt.load_pytree(url_a, step=step, storage_options=opts_a)
    tree_b = zarrckpt.load_pytree(url_b, step=step, storage_options=opts_b)
    assert _flat(tree_a) == _flat(tree_b)  # node classes, JAX stays JAX, Quantity units


def test_the_source_is_what_issue_19_copied_wrong(source):
    """The properties the old copy lost are there to lose."""
    ckpt = zarrckpt.open_checkpoint(source)
    assert ckpt["net/W"].dims == ("pre", "post") and ckpt["net/W"].chunks == (200, 300)
    kinds = {leaf.path: leaf.kind for leaf in ckpt.leaves()}
    assert kinds["net/layer/0"] == "jax" and kinds["q"] == "quantity" and kinds["name"] == "str"
    assert _classes(source, None, 0) == {"test_copy:Layer", "test_copy:Point"}


def _classes(url: str, options: dict | None, step: int) -> set[str]:
    """The classes a step's record names (PyTree nodes, namedtuples, States)."""
    found = set()

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") != "leaf" and isinstance(node.get("class"), str):
                found.add(node["class"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(_files(url, options, step)["zarr.json"]))
    return found


# --- the same step, on each backend ------------------------------------------------------------


def _destination(kind: str, tmp_path, request) -> tuple[str, dict | None]:
    if kind == "local":
        return str(tmp_path / "dst"), None
    if kind == "memory":
        return f"memory://{uuid.uuid4().hex}/dst", None
    return request.getfixturevalue(f"{kind.replace('-', '_')}_root")  # s3fs, or obstore


@pytest.mark.parametrize("kind", ["local", "memory", "s3", "s3-obstore"])
def test_a_copy_is_the_same_step(source, kind, tmp_path, request, capsys):
    url, options = _destination(kind, tmp_path, request)
    assert cli.main(["cp", source, url, "-q"]) == 0  # s3: options from fsspec's config
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2 and out.startswith(f"step 0 -> {url}/step_0000000000.")
    assert "(17 leaves, 1.1 MiB)" in out
    assert ("vanishes" in err) == (kind == "memory")
    assert zarrckpt.list_steps(url, storage_options=options) == [0, 1]
    for step in (0, 1):
        assert_same_step((source, None), (url, options), step)
    # and back again, from the remote root (a step from a copy is the same step too)
    back = str(tmp_path / "back")
    assert cli.main(["cp", url, back, "--step", "1", "-q"]) == 0
    assert zarrckpt.list_steps(back) == [1]
    assert_same_step((source, None), (back, None), 1)
    assert cli.main(["verify", back]) == 0


GOLDEN = sorted(p for p in (ROOT / "tests/golden/v0.1.0").iterdir() if (p / "zarr.json").exists())


@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name)
def test_steps_written_by_0_1_0_copy_byte_for_byte(case, tmp_path, capsys):
    """Older records (naming version 1, no chunk hashes) and their groups, unchanged."""
    dst = str(tmp_path / "dst")
    assert cli.main(["cp", str(case), dst, "-q"]) == 0
    steps = zarrckpt.list_steps(str(case))
    assert zarrckpt.list_steps(dst) == steps
    for step in steps:
        assert _files(str(case), None, step) == _files(dst, None, step)
        a, b = zarrckpt.open_checkpoint(str(case), step), zarrckpt.open_checkpoint(dst, step)
        assert a.leaves() == b.leaves()


def test_a_copy_shares_no_file_with_its_source(source, tmp_path):
    """No hard links: deleting or damaging the source never touches the copy."""
    dst = str(tmp_path / "dst")
    assert cli.main(["cp", source, dst, "-q"]) == 0
    inodes = {os.stat(p).st_ino for p in Path(source).rglob("*") if p.is_file()}
    assert inodes and not any(
        os.stat(p).st_ino in inodes for p in Path(dst).rglob("*") if p.is_file()
    )


@given(tree=nested_trees(st.integers(0, 9), st.text("ab/.", max_size=3), Point))
@settings(max_examples=40, deadline=None)
def test_group_paths_are_the_ones_the_writer_made(tree):
    record, _, groups = _tree.flatten({"t": tree, ("x", 1, "y"): 0, "s": {}})
    assert sorted(_copy.group_paths(record)) == sorted(g for g in groups if g)


def test_a_brainstate_root_copies_without_a_python_warning(tmp_path):
    """A brainstate module's step: no warning, let alone one with a source path."""
    import brainstate

    net = brainstate.nn.Sequential(brainstate.nn.Linear(4, 8), brainstate.nn.ReLU())
    src, dst = str(tmp_path / "net"), str(tmp_path / "copy")
    zarrckpt.save_module(net, src, verbose=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "zarrckpt", "cp", src, dst],
                          capture_output=True, text=True, env=env, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert_same_step((src, None), (dst, None), 0)


# --- refusals: nothing is published ------------------------------------------------------------


def _no_step_dirs(path: str) -> bool:
    return not os.path.exists(path) or not [n for n in os.listdir(path) if "step_" in n]


def test_a_damaged_chunk_is_refused_and_nothing_published(source, tmp_path, capsys):
    step_dir = next(Path(source).glob("step_0000000001.*"))
    chunk = step_dir / "net/W/c.2.0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 1
    chunk.unlink()  # incremental saves may have linked it to step 0's: damage step 1 alone
    chunk.write_bytes(bytes(data))
    dst = str(tmp_path / "dst")
    status = cli.main(["cp", source, dst, "--step", "1"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert "net/W/c.2.0: crc32c checksum mismatch (the chunk is damaged)" in err
    assert not zarrckpt.list_steps(dst) and _no_step_dirs(dst)
    assert cli.main(["cp", source, dst, "--step", "0", "-q"]) == 0  # intact: copied


def test_a_missing_chunk_and_an_edited_zarr_json_are_refused(source, tmp_path, capsys):
    step_dir = next(Path(source).glob("step_0000000001.*"))
    (step_dir / "net/W/c.4.0").unlink()
    status = cli.main(["cp", source, str(tmp_path / "a"), "--step", "1"])
    assert status == 2 and "net/W/c.4.0: chunk is missing" in capsys.readouterr().err
    meta = next(Path(source).glob("step_0000000000.*")) / "lr/zarr.json"
    text = meta.read_text().replace('"little"', '"big"')
    assert text != meta.read_text()
    meta.unlink()
    meta.write_text(text)
    status = cli.main(["cp", source, str(tmp_path / "b"), "--step", "0"])
    assert status == 2 and "the array's zarr.json disagrees with the step record" in (
        capsys.readouterr().err
    )


def test_a_copy_that_arrives_damaged_is_never_committed(source, tmp_path, capsys, monkeypatch):
    from zarrckpt._storage.local import LocalStorage

    put, put_batch = LocalStorage.put, LocalStorage.put_batch

    def damaged(key, parts):
        if not key.endswith("net/W/c.3.0"):
            return parts
        data = bytearray(b"".join(bytes(p) for p in parts))
        data[0] ^= 1
        return [bytes(data)]

    async def lossy(self, key, parts):
        return await put(self, key, damaged(key, parts))

    async def lossy_batch(self, items):
        return await put_batch(self, [(k, lambda k=k, m=m: damaged(k, m())) for k, m in items])

    monkeypatch.setattr(LocalStorage, "put", lossy)
    monkeypatch.setattr(LocalStorage, "put_batch", lossy_batch)
    dst = str(tmp_path / "dst")
    status = cli.main(["cp", source, dst, "--step", "0"])
    err = capsys.readouterr().err
    assert status == 2
    assert "the copy of step 0 at" in err and "does not match its source: net/W/c.3.0" in err
    assert _no_step_dirs(dst)
    assert cli.main(["cp", source, dst, "--step", "0", "--no-verify", "-q"]) == 0  # unchecked


def test_a_step_dropped_while_being_copied_is_a_race(source, tmp_path, monkeypatch):
    real = _copy._transfer

    async def and_meanwhile(src, *args):
        out = await real(src, *args)
        await asyncio.to_thread(  # another writer: overwrite=True, keep=1
            zarrckpt.save_pytree, source, {"x": np.ones(2)}, step=5, overwrite=True,
            verbose=False,
        )  # fmt: skip
        return out

    monkeypatch.setattr(_copy, "_transfer", and_meanwhile)
    dst = str(tmp_path / "dst")
    with pytest.raises(CheckpointNotFoundError, match="dropped by a newer commit"):
        _copy.copy_step(open_storage(source), 1, open_storage(dst))
    assert _no_step_dirs(dst)


# --- the destination ---------------------------------------------------------------------------


def test_a_second_copy_says_to_pass_overwrite(source, tmp_path, capsys):
    dst = str(tmp_path / "dst")
    assert cli.main(["cp", source, dst, "-q"]) == 0
    capsys.readouterr()
    status = cli.main(["cp", source, dst, "--step", "1"])
    err = capsys.readouterr().err
    assert status == 2 and "pass --overwrite to replace it" in err and "overwrite=True" not in err
    status = cli.main(["cp", source, dst])
    err = capsys.readouterr().err
    assert status == 2 and "steps [0, 1] are committed there" in err and "--overwrite" in err
    first = zarrckpt.open_checkpoint(dst, 1).location
    assert cli.main(["cp", source, dst, "--step", "0", "--overwrite", "-q"]) == 0
    assert zarrckpt.list_steps(dst) == [0]  # the steps after it are dropped, as saves do
    assert cli.main(["cp", source, dst, "--step", "1", "-q"]) == 0  # appending needs nothing
    assert zarrckpt.open_checkpoint(dst, 1).location != first
    assert_same_step((source, None), (dst, None), 1)
    with pytest.raises(AlreadyExistsError):
        _copy.copy_step(open_storage(source), 0, open_storage(dst))


def test_a_copy_into_memory_warns_that_it_vanishes(source, capsys):
    url = f"memory://{uuid.uuid4().hex}/dst"
    status = cli.main(["cp", source, url, "--step", "0", "-q", "--json"])
    out, err = capsys.readouterr()
    assert status == 0 and err.startswith("zarrckpt: warning: ") and err.count("\n") == 1
    assert "memory" in err and "vanishes when zarrckpt exits" in err
    assert '"verified": true' in out


def test_python_warnings_become_one_line(source, tmp_path, capsys, monkeypatch):
    real = _copy.copy_step

    def noisy(*args, **kwargs):
        warnings.warn("first line\n  second line", UserWarning, stacklevel=1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_copy, "copy_step", noisy)
    assert cli.main(["cp", source, str(tmp_path / "dst"), "--step", "0", "-q"]) == 0
    err = capsys.readouterr().err
    assert err == "zarrckpt: warning: first line second line\n"


# --- a re-encoded copy -------------------------------------------------------------------------


def test_a_reencoded_copy_keeps_everything_but_the_encoding(source, tmp_path, capsys):
    dst = str(tmp_path / "zstd")
    argv = ["cp", source, dst, "--codec", "zstd:3", "--chunk-bytes", str(100 * 300 * 4), "--json"]
    assert cli.main(argv) == 0
    assert '"reencoded": true' in capsys.readouterr().out
    for step in (0, 1):
        a, b = zarrckpt.open_checkpoint(source, step), zarrckpt.open_checkpoint(dst, step)
        for la, lb in zip(a.leaves(), b.leaves(), strict=True):
            assert (la.path, la.shape, la.dtype, la.kind) == (lb.path, lb.shape, lb.dtype, lb.kind)
            assert lb.codec == "zstd:3" and a[la.path].dims == b[lb.path].dims
        assert b["net/W"].chunks == (100, 300) and b["net/W"].dims == ("pre", "post")
        assert _flat(zarrckpt.load_pytree(source, step=step)) == _flat(
            zarrckpt.load_pytree(dst, step=step)
        )
    assert cli.main(["verify", dst, "--all"]) == 0
    # its hashes are those of its own chunks: an incremental save after it links correctly
    zarrckpt.save_pytree(dst, _state(1), step=2, dims=DIMS, codec="zstd:3",
                         chunk_bytes=100 * 300 * 4, verbose=False)  # fmt: skip
    assert _flat(zarrckpt.load_pytree(dst, step=2)) == _flat(zarrckpt.load_pytree(source, step=1))
