"""Incremental saves (``_reuse``): unchanged chunks are linked or copied, never rewritten,
and every step stays a complete Zarr group that plain readers open alone."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr

import zarrckpt
from zarrckpt import _reuse, _tree, cli
from zarrckpt._format import ArrayLayout
from zarrckpt._storage import local as local_storage


def _state(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "W": rng.standard_normal((512, 256)).astype(np.float32),  # 512 KiB
        "small": {f"s{i}": np.arange(64, dtype=np.int32) * i for i in range(20)},
        "V": np.zeros(300, np.float32),
    }


def _steps(root: str) -> dict[int, Path]:
    doc = json.loads(Path(root, "zarr.json").read_text())
    return {s["step"]: Path(root, s["dir"]) for s in doc["attributes"]["zarrckpt"]["steps"]}


def _count_writes(monkeypatch) -> dict[str, int]:
    """Bytes and files written through local storage (every write goes through _write_all)."""
    count = {"bytes": 0, "files": 0}
    write_all = local_storage._write_all

    def counting(fd, parts):
        n = write_all(fd, parts)
        count["bytes"] += n
        count["files"] += 1
        return n

    monkeypatch.setattr(local_storage, "_write_all", counting)
    return count


def test_unchanged_chunks_are_hard_links_and_each_step_stands_alone(tmp_path, monkeypatch):
    root = str(tmp_path / "run")
    state = _state()
    zarrckpt.save_pytree(root, state, keep=None, verbose=False)
    state["V"] = state["V"] + 1
    written = _count_writes(monkeypatch)
    zarrckpt.save_pytree(root, state, keep=None, verbose=False)
    monkeypatch.undo()
    first, second = _steps(root)[0], _steps(root)[1]
    same = os.stat(first / "W/c.0.0"), os.stat(second / "W/c.0.0")
    assert same[0].st_ino == same[1].st_ino and same[1].st_nlink == 2
    assert os.stat(first / "V/c.0").st_ino != os.stat(second / "V/c.0").st_ino
    # written: V's chunk, the group/leaf documents that are not linked, and the record
    assert written["bytes"] < state["V"].nbytes + 64 * 1024, written
    record = json.loads((second / "zarr.json").read_text())["attributes"]["zarrckpt"]["tree"]
    assert '"xxh3"' in json.dumps(record)
    # plain zarr-python reads each step on its own; deleting the older one breaks nothing
    assert np.array_equal(zarr.open_array(str(second / "W"), mode="r")[...], state["W"])
    zarrckpt.save_pytree(root, state, keep=1, verbose=False)  # drops steps 0 and 1
    assert sorted(_steps(root)) == [2]
    out = zarrckpt.load_pytree(root)
    assert np.array_equal(out["W"], state["W"]) and np.array_equal(out["V"], state["V"])
    assert cli.main(["verify", root, "--all"]) == 0


def test_a_save_loop_writes_what_changed(tmp_path, monkeypatch):
    """The tutorial's loop (defaults: keep=1, recycling): after the first saves only the
    changed leaf and the documents that must change are written."""
    root = str(tmp_path / "run")
    state = _state()
    for _epoch in range(3):
        state["V"] = state["V"] + 1
        zarrckpt.save_pytree(root, state, verbose=False)
    written = _count_writes(monkeypatch)
    for _epoch in range(3):
        state["V"] = state["V"] + 1
        zarrckpt.save_pytree(root, state, verbose=False)
    monkeypatch.undo()
    assert written["bytes"] < 3 * (state["V"].nbytes + 64 * 1024), written
    out = zarrckpt.load_pytree(root)
    assert all(np.array_equal(out[k], state[k]) for k in ("W", "V"))
    assert all(np.array_equal(out["small"][k], v) for k, v in state["small"].items())
    (step_dir,) = _steps(root).values()
    assert os.stat(step_dir / "W/c.0.0").st_nlink == 2  # shared with the recycled spare


def test_unchanged_jax_leaves_of_every_kind_save_again(tmp_path):
    """A save loop keeps the very same jax.Arrays: plain arrays (planned from memory) and
    typed PRNG keys (stored as their key data, never from memory) save and load again."""
    jax = pytest.importorskip("jax")
    root = str(tmp_path / "run")
    state = {"k": jax.random.key(3), "w": jax.numpy.arange(6.0), "old": jax.random.PRNGKey(1)}
    for _ in range(3):
        zarrckpt.save_pytree(root, state, verbose=False)
    out = zarrckpt.load_pytree(root, target=state)
    assert np.array_equal(jax.random.key_data(out["k"]), jax.random.key_data(state["k"]))
    assert np.array_equal(out["w"], state["w"]) and np.array_equal(out["old"], state["old"])
    with pytest.raises(TypeError):  # as before the memory: dims=None is no list of names
        zarrckpt.save_pytree(root, state, dims={"w": None}, verbose=False)


def test_a_step_records_shape_leaves_out_the_hashes_only():
    """A recycled spare's tree is compared with the new one by shape: the record's tree
    without its chunk hashes (other values, other hashes, the same shape)."""
    from zarrckpt import _write
    from zarrckpt._manifest import step_record_bytes

    def record(state, step=3):
        snapshot = _write.plan(state, copy=False, chunk_bytes=None, codec=None)
        snapshot.hash_chunks()
        return step_record_bytes(step, snapshot.record, 2)

    first, second = record(_state(0)), record(_state(1), step=4)
    assert first.count(b'"xxh3":[') == 22 and first != second
    assert _write._shape(first) == _write._shape(second)
    state = _state(0)
    state["V"] = state["V"].astype(np.float64)
    assert _write._shape(record(state)) != _write._shape(first)
    state = _state(0)
    state["small"]["xxh3"] = state["small"].pop("s0")  # a key named like the field is shape
    assert _write._shape(record(state)) != _write._shape(first)
    assert _write._shape(b"not json") is None


@pytest.mark.parametrize("change", ["replaced", "rewritten", "removed"])
def test_a_spare_file_changed_between_saves_is_not_trusted(tmp_path, change):
    """A save skips a recycled spare's file only while it is the very file this process
    linked there (inode, size, mtime); whatever else is found is replaced by the step's
    own bytes."""
    root = str(tmp_path / "run")
    state = _state()
    for _epoch in range(3):
        state["V"] = state["V"] + 1
        zarrckpt.save_pytree(root, state, verbose=False)
    (spare,) = Path(root).glob(".spare-*")
    chunk = spare / "W/c.0.0"
    if change == "replaced":  # another file under the name
        (spare / "W/garbage").write_bytes(os.urandom(chunk.stat().st_size))
        os.replace(spare / "W/garbage", chunk)
    elif change == "rewritten":  # broken out of the link, then rewritten in place
        data = chunk.read_bytes()
        chunk.unlink()
        chunk.write_bytes(data[:-8] + b"\0" * 8)
    else:
        chunk.unlink()
    state["V"] = state["V"] + 1
    zarrckpt.save_pytree(root, state, verbose=False)
    out = zarrckpt.load_pytree(root)
    assert np.array_equal(out["W"], state["W"]) and np.array_equal(out["V"], state["V"])
    assert cli.main(["verify", root]) == 0


def test_every_leaf_changing_writes_everything(tmp_path, monkeypatch):
    root = str(tmp_path / "run")
    zarrckpt.save_pytree(root, _state(0), verbose=False)
    written = _count_writes(monkeypatch)
    zarrckpt.save_pytree(root, _state(1), verbose=False)
    monkeypatch.undo()
    state = _state(1)
    assert written["bytes"] >= state["W"].nbytes + state["V"].nbytes
    out = zarrckpt.load_pytree(root)
    assert np.array_equal(out["W"], state["W"])


def test_a_changed_layout_or_incremental_false_writes_the_bytes(tmp_path, monkeypatch):
    root = str(tmp_path / "run")
    state = _state()
    zarrckpt.save_pytree(root, state, keep=None, verbose=False)
    zarrckpt.save_pytree(root, state, keep=None, verbose=False, chunk_bytes=64 * 1024)
    zarrckpt.save_pytree(root, state, keep=None, verbose=False, incremental=False)
    steps = _steps(root)
    assert os.stat(steps[1] / "W/c.0.0").st_nlink == 1  # other chunks: nothing shared
    assert all(os.stat(p).st_nlink == 1 for p in steps[2].rglob("c.*"))
    record = json.loads((steps[2] / "zarr.json").read_text())
    assert '"xxh3"' not in json.dumps(record)
    assert np.array_equal(zarrckpt.load_pytree(root, step=1)["W"], state["W"])


def test_an_array_changed_in_place_is_seen(tmp_path):
    """NumPy arrays are compared by content, never by identity."""
    root = str(tmp_path / "run")
    state = _state()
    zarrckpt.save_pytree(root, state, verbose=False)
    state["W"][3, 4] += 1.0  # the same object, one element changed
    zarrckpt.save_pytree(root, state, verbose=False)
    assert np.array_equal(zarrckpt.load_pytree(root)["W"], state["W"])


def test_the_same_jax_array_is_not_hashed_again(tmp_path, monkeypatch):
    jnp = pytest.importorskip("jax.numpy")
    root = str(tmp_path / "run")
    state = {"W": jnp.arange(100_000, dtype=jnp.float32), "V": jnp.zeros(10)}
    zarrckpt.save_pytree(root, state, verbose=False)
    hashed = []
    chunk_hashes = _reuse.chunk_hashes
    monkeypatch.setattr(
        _reuse, "chunk_hashes", lambda layout, a: hashed.append(a.shape) or chunk_hashes(layout, a)
    )
    state["V"] = state["V"] + 1  # a new object; W is the very same
    zarrckpt.save_pytree(root, state, verbose=False)
    assert hashed == [(10,)]
    (step_dir,) = _steps(root).values()
    assert os.stat(step_dir / "W/c.0").st_nlink == 2
    out = zarrckpt.load_pytree(root)
    assert np.array_equal(out["W"], np.asarray(state["W"]))
    assert np.array_equal(out["V"], np.asarray(state["V"]))


def test_large_leaves_are_hashed_ahead_with_the_same_hashes():
    """Leaves of at least 4 MiB are hashed on the hash pool while the rest of the tree is
    planned: the same hashes as in line, and none for a jax.Array an earlier save hashed."""
    from zarrckpt import _write

    jnp = pytest.importorskip("jax.numpy")
    # 4.2 MiB in 5 chunks of 1 MiB or less, the last one short (padded when hashed)
    big = np.random.default_rng(0).standard_normal((1101, 1000)).astype(np.float32)
    tree = {
        "big": big, "small": np.arange(10), "jbig": jnp.asarray(big),
        "fortran": np.asfortranarray(big),  # its chunks need copies: hashed in line, in turn
        "swapped": big.astype(">f4"),  # big-endian: likewise
    }  # fmt: skip

    def planned(hash_ahead=True):
        return _write.plan(tree, copy=False, chunk_bytes=1 << 20, codec=None, hash_ahead=hash_ahead)

    snapshot = planned()
    assert set(snapshot.hashing) == {"big", "jbig"}
    hashes = snapshot.hash_chunks()
    leaves = {leaf.path: leaf for leaf in snapshot.leaves}
    for path, leaf in leaves.items():
        assert hashes[path] == _reuse.chunk_hashes(leaf.layout, leaf.array)
    assert len(hashes["big"]) == 5
    assert hashes["big"] == hashes["jbig"] == hashes["fortran"] == hashes["swapped"]
    _reuse.remember(tree["jbig"], leaves["jbig"].layout, hashes["jbig"])
    assert set(planned().hashing) == {"big"}
    assert not planned(hash_ahead=False).hashing


def test_hashing_ahead_never_holds_up_the_io_pool(monkeypatch):
    """Large leaves are hashed on a pool of their own: the save's reads and writes (the
    manifest read that decides the step, first) never queue behind them."""
    from zarrckpt import _sync, _write

    release = threading.Event()
    view_hashes = _reuse.view_hashes

    def slow(*args):
        release.wait(30)
        return view_hashes(*args)

    monkeypatch.setattr(_reuse, "view_hashes", slow)
    big = np.ones((2048, 1100), np.float32)  # 8.6 MiB in 35 chunks: runs for every thread
    snapshot = _write.plan(
        {"big": big}, copy=False, chunk_bytes=256 * 1024, codec=None, hash_ahead=True
    )
    try:
        assert _sync.io_executor().submit(lambda: "read").result(timeout=10) == "read"
    finally:
        release.set()
    (leaf,) = snapshot.leaves
    assert snapshot.hash_chunks()["big"] == _reuse.chunk_hashes(leaf.layout, big)


def test_a_jax_arrays_plan_is_remembered_while_it_lives(monkeypatch):
    """A save loop's unchanged jax.Array is planned from memory (no encoding, no checks):
    only for the same path, chunk size, codec and dimension names; forgotten with it."""
    import gc

    from zarrckpt import _leaves, _write

    jnp = pytest.importorskip("jax.numpy")
    a = jnp.arange(6.0)
    encoded = []
    encode = _leaves.encode
    monkeypatch.setattr(
        _leaves, "encode", lambda *args, **kw: encoded.append(args[0]) or encode(*args, **kw)
    )

    def planned(tree, **kw):
        options = {"copy": False, "chunk_bytes": 1 << 20, "codec": None, **kw}
        snapshot = _write.plan(tree, **options)
        return {leaf.path: leaf for leaf in snapshot.leaves}, snapshot.record

    first, record = planned({"a": a})
    assert encoded == ["a"] and id(a) in _write._planned.items
    second, again = planned({"a": a})  # from memory
    assert encoded == ["a"] and second["a"].layout is first["a"].layout and again == record
    assert np.array_equal(second["a"].array, first["a"].array)
    planned({"b": a})  # another path
    planned({"a": jnp.arange(6.0)})  # another array, equal values
    planned({"a": a}, chunk_bytes=16)  # another layout
    names = ["x"]
    leaves, with_dims = planned({"a": a}, dims={"a": names})
    assert encoded == ["a", "b", "a", "a", "a"]
    names[0] = "y"  # the caller's list changes: the memory does not match any more
    planned({"a": a}, dims={"a": names})
    assert encoded[-1] == "a" and len(encoded) == 6
    assert leaves["a"].dims == ["x"] and with_dims["children"][0]["dims"] == ["x"]
    assert np.array_equal(first["a"].array, np.arange(6.0))
    key = id(a)
    del a, first, second, leaves
    gc.collect()
    assert key not in _write._planned.items


def test_a_link_in_a_strangers_previous_step_is_never_followed(tmp_path, monkeypatch):
    """A previous step this process did not write, whose leaf directory is a symbolic link
    out of the root: its files are not linked into the new step (the bytes are written)."""
    root = str(tmp_path / "run")
    state = _state()
    zarrckpt.save_pytree(root, state, keep=None, verbose=False)
    first = _steps(root)[0]
    outside = tmp_path / "outside"
    os.rename(first / "W", outside)
    os.symlink(outside, first / "W")
    monkeypatch.setattr(local_storage, "_own", {})  # as if another process had written it
    monkeypatch.setattr(_reuse, "_records", {})
    zarrckpt.save_pytree(root, state, keep=None, verbose=False)
    second = _steps(root)[1]
    assert not (second / "W").is_symlink()
    assert os.stat(second / "W/c.0.0").st_ino != os.stat(outside / "c.0.0").st_ino
    assert os.stat(second / "V/c.0").st_nlink == 2  # the rest of that step was fine
    assert np.array_equal(zarrckpt.load_pytree(root, step=1)["W"], state["W"])


def test_a_previous_step_gone_meanwhile_means_writing(tmp_path, monkeypatch):
    """A source that vanished (another writer's commit dropped that step) is written."""
    root = str(tmp_path / "run")
    state = _state()
    zarrckpt.save_pytree(root, state, keep=None, verbose=False)
    _vanish_before_linking(monkeypatch, root, "W/c.0.0")
    zarrckpt.save_pytree(root, state, keep=None, verbose=False)
    assert np.array_equal(zarrckpt.load_pytree(root, step=1)["W"], state["W"])


def _vanish_before_linking(monkeypatch, root: str, key: str, step: int = 0) -> None:
    """Make the next save find ``key`` of ``step`` gone when it links (as after another
    writer's commit dropped it)."""
    link_many = local_storage.LocalStorage.link_many

    async def vanish_then_link(self, src_dir, dst_dir, keys):
        (_steps(root)[step] / key).unlink()
        return await link_many(self, src_dir, dst_dir, keys)

    monkeypatch.setattr(local_storage.LocalStorage, "link_many", vanish_then_link)


@pytest.mark.parametrize("backend", ["memory", "s3", "s3-obstore", "gcs", "gcs-obstore"])
def test_object_stores_copy_server_side(backend, request, monkeypatch):
    if backend == "memory":
        url, options = f"memory://{os.urandom(8).hex()}/run", None
    else:
        url, options = request.getfixturevalue(f"{backend.replace('-', '_')}_root")
    state = _state()
    zarrckpt.save_pytree(url, state, storage_options=options, verbose=False)
    uploaded = {"bytes": 0}
    copied = []
    from zarrckpt._storage import objects

    classes = [objects.StoreStorage]
    if backend.endswith("-obstore"):
        from zarrckpt._storage import obstore as obstore_storage

        classes = [obstore_storage.ObjectStoreStorage]
    for cls in classes:
        put, link_many = cls.put, cls.link_many

        async def counting_put(self, key, parts, put=put):
            uploaded["bytes"] += sum(memoryview(p).nbytes for p in parts)
            await put(self, key, parts)

        async def counting_links(self, src_dir, dst_dir, keys, link_many=link_many):
            failed = await link_many(self, src_dir, dst_dir, keys)
            copied.extend(key for key in keys if key not in failed)
            return failed

        monkeypatch.setattr(cls, "put", counting_put)
        monkeypatch.setattr(cls, "link_many", counting_links)
    state["V"] = state["V"] + 1
    zarrckpt.save_pytree(url, state, storage_options=options, verbose=False)
    monkeypatch.undo()
    assert any(k.endswith("W/c.0.0") for k in copied)
    assert uploaded["bytes"] < state["V"].nbytes + 64 * 1024, uploaded
    out = zarrckpt.load_pytree(url, storage_options=options)
    assert np.array_equal(out["W"], state["W"]) and np.array_equal(out["V"], state["V"])


def test_a_failed_save_drops_the_hashes_it_started(tmp_path, monkeypatch):
    """A save refused after planning (here overwrite=False) cancels the chunk hashes that
    have not started, instead of leaving the hash pool hashing for nobody."""
    from zarrckpt import _write

    root = str(tmp_path / "run")
    zarrckpt.save_pytree(root, {"v": np.zeros(3)}, verbose=False)
    cancelled = []
    cancel = _write.Plan.cancel_hashing
    monkeypatch.setattr(
        _write.Plan,
        "cancel_hashing",
        lambda self: cancelled.append(set(self.hashing)) or cancel(self),
    )
    big = np.ones((2048, 1024), np.float32)  # 8 MiB: hashed ahead
    with pytest.raises(zarrckpt.AlreadyExistsError):
        zarrckpt.save_pytree(root, {"v": big}, overwrite=False, verbose=False)
    assert cancelled == [{"v"}]


def _carried(monkeypatch) -> list[set[str]]:
    """The paths of the leaves each save carried whole from the previous step."""
    from zarrckpt import _write

    seen: list[set[str]] = []
    carried_over = _write.Plan.carried_over

    def spy(self, previous):
        result = carried_over(self, previous)
        seen.append({c.path for c in result.carried})
        return result

    monkeypatch.setattr(_write.Plan, "carried_over", spy)
    return seen


def test_a_loops_unchanged_jax_leaves_are_carried_and_written_where_a_link_fails(
    tmp_path, monkeypatch
):
    """The very jax.Arrays of the previous save are carried: linked whole, not planned,
    hashed or compared again. A carried leaf whose link fails (its file in the previous step
    vanished) is written from the array, and the step is complete."""
    jnp = pytest.importorskip("jax.numpy")
    root = str(tmp_path / "run")
    state = {"W": jnp.arange(60_000, dtype=jnp.float32), "V": jnp.zeros(10), "n": 3}
    carried = _carried(monkeypatch)
    zarrckpt.save_pytree(root, state, keep=None, verbose=False)
    state["V"] = state["V"] + 1
    hashed = []
    chunk_hashes = _reuse.chunk_hashes
    monkeypatch.setattr(
        _reuse, "chunk_hashes", lambda layout, a: hashed.append(a.shape) or chunk_hashes(layout, a)
    )
    _vanish_before_linking(monkeypatch, root, "W/c.0")
    zarrckpt.save_pytree(root, state, keep=None, verbose=False)
    assert carried == [set(), {"W"}] and hashed == [(10,), ()]
    second = _steps(root)[1]
    assert os.stat(second / "W/c.0").st_nlink == 1  # written: the link had nothing to link
    assert os.stat(second / "W/zarr.json").st_nlink == 2  # linked
    out = zarrckpt.load_pytree(root, step=1)
    assert np.array_equal(out["W"], np.asarray(state["W"]))
    assert np.array_equal(out["V"], np.asarray(state["V"]))
    assert cli.main(["verify", root, "--all"]) == 1  # step 0 lost a file; step 1 is whole
    assert cli.main(["verify", root]) == 0


def test_a_step_directory_claimed_while_linking_is_never_re_created(tmp_path, monkeypatch):
    """A collector may claim (rename away) a step directory whose writer seems dead; a save
    that then links into it must fail, not re-create the directory under its old name and
    fill it (a half-made step, debris for the next collection)."""
    root = tmp_path / "run"
    state = _state()
    zarrckpt.save_pytree(str(root), state, verbose=False)
    state["V"] = state["V"] + 1
    claimed = []
    link_many = local_storage.LocalStorage.link_many

    async def claimed_then_link(self, src_dir, dst_dir, keys):
        os.rename(root / dst_dir, tmp_path / "claimed")
        failed = await link_many(self, src_dir, dst_dir, keys)
        claimed.append((dst_dir, (root / dst_dir).exists(), len(failed) == len(keys)))
        return failed

    monkeypatch.setattr(local_storage.LocalStorage, "link_many", claimed_then_link)
    with pytest.raises(zarrckpt.ZarrCkptError, match="vanished"):
        zarrckpt.save_pytree(str(root), state, verbose=False)
    [(step_dir, re_created, all_failed)] = claimed
    assert not re_created and all_failed  # (the writes that follow find it gone: the error)
    assert not (root / step_dir).exists()
    monkeypatch.undo()
    assert zarrckpt.latest_step(str(root)) == 0
    assert np.array_equal(zarrckpt.load_pytree(str(root))["V"], _state()["V"])


def test_progress_counts_each_byte_once_however_it_reaches_the_step(tmp_path, monkeypatch):
    """A save's bar reaches its total exactly: written, linked (NumPy leaves whose chunks
    did not change), carried (jax.Arrays) and carried-but-written (a link that failed) bytes
    are each counted once."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from contextlib import contextmanager

    from zarrckpt import _write

    bars: list[tuple[int, list[int]]] = []

    @contextmanager
    def recording_bar(total, desc, enabled):
        bars.append((total, []))
        yield bars[-1][1].append

    monkeypatch.setattr(_write, "progress_bar", recording_bar)
    root = str(tmp_path / "run")
    state = {**_state(), "J": jnp.arange(60_000, dtype=jnp.float32), "K": jnp.ones(500)}
    carried = _carried(monkeypatch)
    zarrckpt.save_pytree(root, state, keep=None, verbose=False, chunk_bytes=64 * 1024)
    state["V"] = state["V"] + 1  # written; W and small linked; J and K carried
    zarrckpt.save_pytree(root, state, keep=None, verbose=False, chunk_bytes=64 * 1024)
    state["small"]["s3"] = state["small"]["s3"] + 1
    _vanish_before_linking(monkeypatch, root, "J/c.1", step=1)  # J: carried, written after
    zarrckpt.save_pytree(root, state, keep=None, verbose=False, chunk_bytes=64 * 1024)
    assert carried == [set(), {"J", "K"}, {"J", "K"}]
    third = _steps(root)[2]
    assert os.stat(third / "J/c.1").st_nlink == 1  # written
    assert os.stat(third / "J/c.0").st_nlink == 3  # linked (steps 0, 1, 2)
    assert os.stat(third / "W/c.0.0").st_nlink == 3
    nbytes = sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(state))
    assert [total for total, _ in bars] == [nbytes] * 3
    assert [sum(updates) for _, updates in bars] == [nbytes] * 3
    out = zarrckpt.load_pytree(root)
    assert np.array_equal(out["J"], np.asarray(state["J"]))
    assert np.array_equal(out["small"]["s3"], state["small"]["s3"])


def test_a_carried_leaf_is_written_after_another_processs_commit(tmp_path, monkeypatch):
    """Leaves are carried from the step this process committed last; if another process
    committed a step since (here with other values under the same names and layouts), the
    save compares with that step instead, and writes what differs from it."""
    import subprocess
    import sys

    jnp = pytest.importorskip("jax.numpy")
    root = str(tmp_path / "run")
    state = {"W": jnp.arange(1000, dtype=jnp.float32), "V": jnp.zeros(10)}
    carried = _carried(monkeypatch)
    zarrckpt.save_pytree(root, state, keep=None, verbose=False)
    other = (
        "import sys, numpy as np, zarrckpt\n"
        "zarrckpt.save_pytree(sys.argv[1], {'W': np.full(1000, 7, np.float32),"
        " 'V': np.zeros(10, np.float32)}, keep=None, verbose=False)\n"
    )
    subprocess.run([sys.executable, "-c", other, root], check=True, timeout=120)
    zarrckpt.save_pytree(root, state, keep=None, verbose=False)
    assert carried == [set(), set()]  # planned as carried, then not: the latest step changed
    theirs, step_dir = _steps(root)[1], _steps(root)[2]
    # equal bytes: linked from the other process's step; W's differ: written
    assert os.stat(step_dir / "V/c.0").st_ino == os.stat(theirs / "V/c.0").st_ino
    assert os.stat(step_dir / "W/c.0").st_nlink == 1
    out = zarrckpt.load_pytree(root)
    assert np.array_equal(out["W"], np.arange(1000, dtype=np.float32))
    zarrckpt.save_pytree(root, state, keep=None, verbose=False)
    assert carried[-1] == {"W", "V"}
    assert np.array_equal(zarrckpt.load_pytree(root)["W"], np.arange(1000, dtype=np.float32))


def test_an_identity_memo_forgets_each_object_with_it_and_only_it():
    """An entry goes when its object dies; a stale callback (of a reference the entry no
    longer holds, as after an ``id`` was reused) removes nothing."""
    import gc

    from zarrckpt._leaves import IdentityMemo

    class Thing:
        pass

    memo, a, b = IdentityMemo(), Thing(), Thing()
    memo.put(a, 1)
    memo.put(b, 2)
    stale = memo.items[id(a)][0]
    memo.put(a, 3)  # the entry now holds another reference
    memo._forget(stale)
    assert memo.get(a) == 3 and memo.get(b) == 2
    memo.put(7, "no weak references: not kept")
    assert memo.get(7) is None
    del a
    gc.collect()
    assert list(memo.items) == [id(b)]


def test_a_plan_learns_its_step_entry_from_its_own_save_only(tmp_path, monkeypatch):
    """While a save commits, another plans the same array with other options (another
    chunk size): the commit tells its own plan, never the newer one, so a later save with
    the other options does not carry the array with the first save's files."""
    from zarrckpt import _write

    jnp = pytest.importorskip("jax.numpy")
    root = str(tmp_path / "run")
    state = {"a": jnp.arange(32, dtype=jnp.float32), "b": jnp.zeros(3)}
    committed = _reuse.committed

    def meanwhile(*args, **kwargs):
        _write.plan(state, copy=False, chunk_bytes=64, codec=None)  # replaces the memo entry
        return committed(*args, **kwargs)

    monkeypatch.setattr(_reuse, "committed", meanwhile)
    zarrckpt.save_pytree(root, state, verbose=False)
    monkeypatch.undo()
    carried = _carried(monkeypatch)
    zarrckpt.save_pytree(root, state, chunk_bytes=64, verbose=False)
    assert carried == [set()]  # planned anew for 64-byte chunks: compared, not carried
    assert np.array_equal(zarrckpt.load_pytree(root)["a"], np.arange(32, dtype=np.float32))
    assert cli.main(["verify", root]) == 0
    zarrckpt.save_pytree(root, state, chunk_bytes=64, verbose=False)
    assert carried[-1] == {"a", "b"}
    assert cli.main(["verify", root]) == 0


def test_a_background_save_of_carried_leaves_needs_no_array_after_the_call(tmp_path, monkeypatch):
    """A background save takes carried leaves' host arrays at the call: when a link fails
    later it writes them, even if the caller deleted (or donated) the arrays meanwhile."""
    jnp = pytest.importorskip("jax.numpy")
    root = str(tmp_path / "run")
    state = {"W": jnp.arange(1000, dtype=jnp.float32) * 2, "V": jnp.zeros(4)}
    zarrckpt.save_pytree(root, state, verbose=False)

    deleted = threading.Event()

    async def no_links(self, src_dir, dst_dir, keys):
        while not deleted.is_set():  # (after the caller deleted the array)
            await asyncio.sleep(0.01)
        return set(keys)

    monkeypatch.setattr(local_storage.LocalStorage, "link_many", no_links)
    carried = _carried(monkeypatch)
    with zarrckpt.AsyncManager() as manager:
        zarrckpt.save_pytree(root, state, async_manager=manager, verbose=False)
        state["W"].delete()
        deleted.set()
    assert carried == [{"W", "V"}]
    out = zarrckpt.load_pytree(root)
    assert np.array_equal(out["W"], np.arange(1000, dtype=np.float32) * 2)
    assert cli.main(["verify", root]) == 0


def _record_hashes(step_dir: Path) -> dict[str, tuple[ArrayLayout, list[str]]]:
    """Leaf path -> (layout, chunk hashes) as the step's record has them."""
    doc = json.loads((step_dir / "zarr.json").read_text())
    tree = doc["attributes"]["zarrckpt"]["tree"]
    return {r["path"]: (ArrayLayout.from_json(r), r["xxh3"]) for r in _tree.iter_leaf_records(tree)}


def test_leaves_that_changed_wholly_are_written_without_comparing(tmp_path, monkeypatch):
    """A leaf of which every chunk changed in the previous save (a training loop's weights) is
    written without being compared first: the step record still gets its exact hashes, and
    a leaf that did not change after all is written once more, then linked."""
    from zarrckpt import _write

    root = str(tmp_path / "run")
    rng = np.random.default_rng(0)
    state = {
        "W": rng.standard_normal((2048, 1100)).astype(np.float32),  # 8.6 MiB: hashed ahead
        "small": {f"s{i}": rng.standard_normal(100) for i in range(100)},  # in 2 batches
    }
    later: list[frozenset[str]] = []
    speculative = _write.Plan.speculative
    monkeypatch.setattr(
        _write.Plan,
        "speculative",
        lambda self, previous: later.append(speculative(self, previous)) or later[-1],
    )

    def step(change_w: bool) -> None:
        if change_w:
            state["W"] += 1.0
        for k in state["small"]:
            state["small"][k] += 1.0
        zarrckpt.save_pytree(root, state, keep=None, verbose=False)

    for _ in range(3):
        step(change_w=True)
    everything = {"W"} | {f"small/s{i}" for i in range(100)}
    assert later == [frozenset(), frozenset(), everything]  # the 2nd save learns what changed
    values = {"W": state["W"], **{f"small/{k}": v for k, v in state["small"].items()}}
    steps = _steps(root)
    recorded = _record_hashes(steps[2])
    assert set(recorded) == everything
    # their metadata did not change: linked, as a compared leaf's is
    assert os.path.samefile(steps[2] / "W/zarr.json", steps[1] / "W/zarr.json")
    for path, (layout, hashes) in recorded.items():
        assert hashes == _reuse.chunk_hashes(layout, values[path]), path
    step(change_w=False)  # W was expected to change and did not: written, not linked
    step(change_w=False)  # now W is compared first again, and linked
    assert later[3] == everything and later[4] == everything - {"W"}
    steps = _steps(root)
    w_chunk = "W/c.0.0"
    assert os.stat(steps[3] / w_chunk).st_ino != os.stat(steps[2] / w_chunk).st_ino
    assert os.stat(steps[4] / w_chunk).st_ino == os.stat(steps[3] / w_chunk).st_ino
    assert _record_hashes(steps[3])["W"] == _record_hashes(steps[4])["W"]
    out = zarrckpt.load_pytree(root)
    assert np.array_equal(out["W"], state["W"])
    assert all(np.array_equal(out["small"][k], v) for k, v in state["small"].items())
    assert cli.main(["verify", root, "--all"]) == 0  # records, crc32c and hashes agree


def _expected_to_change(root: str) -> dict:
    """A state saved twice into ``root`` (the second save learns that W changed), W changed
    again for a third save."""
    state = {
        "W": np.ones((2048, 1100), np.float32),  # 8.6 MiB: hashed in runs of chunks
        "small": {f"s{i}": np.zeros(100) for i in range(100)},
    }
    for _ in range(2):
        state["W"] += 1.0
        zarrckpt.save_pytree(root, state, verbose=False)
    state["W"] += 1.0
    return state


def test_leaves_expected_to_change_are_hashed_while_their_bytes_are_flushed(tmp_path, monkeypatch):
    """On a local disk a save's leaves expected to change are hashed only once all its data
    is written (their hashing then takes no CPU from the writes): while the disk flushes
    it. The step record with their hashes is written after that, last, and flushed alone
    (fsync: the data is durable already) before the commit."""
    from zarrckpt import _commit, _write
    from zarrckpt._storage.local import LocalStorage

    root = str(tmp_path / "run")
    state = _expected_to_change(root)
    events: list[str] = []
    put, put_batch, sync = LocalStorage.put, LocalStorage._put_batch, LocalStorage.sync
    view_hashes, hashes_of, publish = _reuse.view_hashes, _write.Plan._hashes_of, _commit.publish

    async def logged_put(self, key, parts):
        events.append(f"put {key}")
        return await put(self, key, parts)

    def logged_put_batch(self, items):
        events.extend(f"put {key}" for key, _ in items)
        return put_batch(self, items)

    async def logged_sync(self, keys=()):
        events.append(f"sync {' '.join(keys)}".strip())
        return await sync(self, keys)

    async def logged_publish(*args, **kwargs):
        events.append("publish")
        return await publish(*args, **kwargs)

    monkeypatch.setattr(LocalStorage, "put", logged_put)
    monkeypatch.setattr(LocalStorage, "_put_batch", logged_put_batch)
    monkeypatch.setattr(LocalStorage, "sync", logged_sync)
    monkeypatch.setattr(_commit, "publish", logged_publish)
    monkeypatch.setattr(_reuse, "view_hashes", lambda *a: events.append("hash") or view_hashes(*a))
    monkeypatch.setattr(
        _write.Plan,
        "_hashes_of",
        lambda self, leaves: events.append("hash") or hashes_of(self, leaves),
    )
    zarrckpt.save_pytree(root, state, verbose=False)
    (step_dir,) = _steps(root).values()  # (keep=1)
    record_key = f"{step_dir.name}/zarr.json"
    record = events.index(f"put {record_key}")
    data = [i for i, e in enumerate(events) if e.startswith("put ") and i != record]
    hashed = [i for i, e in enumerate(events) if e == "hash"]
    assert data and hashed and max(data) < events.index("sync") < min(hashed)
    assert max(hashed) < record < events.index(f"sync {record_key}") < events.index("publish")
    layout, hashes = _record_hashes(step_dir)["W"]
    assert hashes == _reuse.chunk_hashes(layout, state["W"])
    assert cli.main(["verify", root]) == 0


def test_leaves_expected_to_change_are_hashed_while_written_where_writes_are_durable(
    monkeypatch,
):
    """On a store without a flush to wait for (object stores; here memory://) the leaves
    expected to change are hashed while they are written, as there is no later wait to
    hide the hashing in."""
    from zarrckpt import _write

    root = f"memory://{os.urandom(8).hex()}/run"
    state = _expected_to_change(root)
    events: list[str] = []
    hash_later, write_step = _write.Plan.hash_later, _write.write_step

    async def logged_write_step(*args, **kwargs):
        events.append("write")
        await write_step(*args, **kwargs)
        events.append("written")

    monkeypatch.setattr(
        _write.Plan, "hash_later", lambda *a: events.append("hash") or hash_later(*a)
    )
    monkeypatch.setattr(_write, "write_step", logged_write_step)
    zarrckpt.save_pytree(root, state, verbose=False)
    assert events == ["hash", "write", "written"]
    assert np.array_equal(zarrckpt.load_pytree(root)["W"], state["W"])
    assert cli.main(["verify", root]) == 0


@pytest.mark.parametrize("failing", ["write_step", "step_record_bytes", "sync"])
def test_a_failed_save_while_hashing_later_keeps_the_committed_step(tmp_path, monkeypatch, failing):
    """A save that fails before the leaves expected to change are hashed (in the write, or
    before it: the first serialization of the record), or while they are (the flush of
    their bytes): it fails at once, the hashing not begun is dropped, the committed step
    is untouched, and the next save saves."""
    from zarrckpt import _sync, _write
    from zarrckpt._storage.local import LocalStorage

    root = str(tmp_path / "run")
    state = {f"s{i}": np.zeros(1000) for i in range(1000)}  # 16 batches of 64 or fewer
    for _ in range(2):
        for v in state.values():
            v += 1.0
        zarrckpt.save_pytree(root, state, verbose=False)
    cancelled: list[int] = []
    cancel = _write.Plan.cancel_hashing
    monkeypatch.setattr(
        _write.Plan,
        "cancel_hashing",
        lambda self: cancelled.append(len(self.later)) or cancel(self),
    )
    started, release, ran = threading.Event(), threading.Event(), []
    hashes_of = _write.Plan._hashes_of

    def held(self, leaves):  # (each batch waits until the save has failed, or 2 s)
        started.set()
        ran.append(release.wait(2))
        return hashes_of(self, leaves)

    async def failing_async(*args, **kwargs):
        if failing == "sync":  # (the flush fails once the hashing is under way)
            await asyncio.to_thread(started.wait, 10)
        raise OSError("disk full")

    def failing_record(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(_write.Plan, "_hashes_of", held)
    if failing == "sync":
        monkeypatch.setattr(LocalStorage, "sync", failing_async)
    else:
        monkeypatch.setattr(
            _write, failing, failing_async if failing == "write_step" else failing_record
        )
    for v in state.values():
        v += 1.0
    with pytest.raises(OSError, match="disk full"):
        zarrckpt.save_pytree(root, state, verbose=False)
    release.set()
    _sync.hash_executor().submit(lambda: None).result(timeout=30)  # (after what was begun)
    assert cancelled == [16 if failing == "sync" else 0]  # (batches submitted)
    assert len(ran) <= _sync.HASH_THREADS and all(ran)  # those begun; none waited 2 s
    monkeypatch.undo()
    assert np.array_equal(zarrckpt.load_pytree(root)["s7"], state["s7"] - 1.0)
    zarrckpt.save_pytree(root, state, verbose=False)
    assert np.array_equal(zarrckpt.load_pytree(root)["s7"], state["s7"])
    assert cli.main(["verify", root]) == 0
