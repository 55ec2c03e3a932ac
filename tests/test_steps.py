"""Steps, the manifest, overwrite/keep semantics and garbage collection."""

import os
from pathlib import Path

import numpy as np
import pytest

import zarrckpt
from zarrckpt import AlreadyExistsError, CheckpointNotFoundError, CorruptCheckpointError
from zarrckpt._storage import open_storage
from zarrckpt._sync import run


def save(url, value, **kw):
    kw.setdefault("verbose", False)
    return zarrckpt.save_pytree(url, {"v": np.asarray(value)}, **kw)


def load(url, **kw):
    return int(zarrckpt.load_pytree(url, **kw)["v"])


def step_dirs(url):
    return [n for n in run(open_storage(url).list_dir("")) if n.startswith("step_")]


def test_steps_count_up_and_keep_defaults_to_one(url):
    for i in range(3):
        save(url, i)
    assert zarrckpt.list_steps(url) == [2]
    assert zarrckpt.latest_step(url) == 2
    assert load(url) == 2
    assert len(step_dirs(url)) == 1  # dropped steps are deleted, not only unlisted


def test_keep_none_keeps_all_and_keep_n_the_newest(url):
    for i in range(4):
        save(url, i * 10, keep=None)
    assert zarrckpt.list_steps(url) == [0, 1, 2, 3]
    assert [load(url, step=s) for s in range(4)] == [0, 10, 20, 30]
    save(url, 40, keep=2)
    assert zarrckpt.list_steps(url) == [3, 4]
    assert len(step_dirs(url)) == 2


def test_explicit_steps_and_overwrite_false(url):
    save(url, 5, step=5, keep=None)
    save(url, 7, step=7, keep=None)
    with pytest.raises(
        AlreadyExistsError, match="cannot save step 7 with overwrite=False: step 7 is already"
    ):
        save(url, 0, step=7, overwrite=False)
    with pytest.raises(AlreadyExistsError, match="cannot save step 6 with overwrite=False: step 7"):
        save(url, 0, step=6, overwrite=False)
    with pytest.raises(FileExistsError):  # the built-in a caller would catch
        save(url, 0, step=3, overwrite=False)
    save(url, 8, step=8, overwrite=False)  # keeps every step by default
    assert zarrckpt.list_steps(url) == [5, 7, 8]
    assert load(url, step=7) == 7


def test_overwrite_false_protects_existing_data(url):
    """BrainPy's rule: overwrite=False on an existing checkpoint raises; nothing is deleted."""
    save(url, 1)
    with pytest.raises(
        AlreadyExistsError, match=r"cannot save the next step with overwrite=False: step 0"
    ):
        save(url, 2, overwrite=False)
    with pytest.raises(AlreadyExistsError, match=r"keep=1 would delete committed step\(s\) \[0\]"):
        save(url, 2, step=1, overwrite=False, keep=1)
    assert zarrckpt.list_steps(url) == [0] and load(url) == 1
    save(url, 3, step=1, overwrite=False, keep=2)  # drops nothing: allowed
    save(url, 4, step=2, overwrite=False)  # default keep under overwrite=False: all
    assert zarrckpt.list_steps(url) == [0, 1, 2]
    with pytest.raises(AlreadyExistsError):
        save(url, 5, overwrite=False)
    assert [load(url, step=s) for s in (0, 1, 2)] == [1, 3, 4]
    assert len(step_dirs(url)) == 3


def test_overwrite_replaces_the_step_and_drops_later_ones(url):
    for s in (1, 2, 3):
        save(url, s, step=s, keep=None)
    save(url, 20, step=2, keep=None)
    assert zarrckpt.list_steps(url) == [1, 2]
    assert load(url) == 20 and load(url, step=1) == 1
    assert len(step_dirs(url)) == 2


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_bad_step_values(url, bad):
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        save(url, 0, step=bad)


@pytest.mark.parametrize("bad", [0, -2, 1.0, True])
def test_bad_keep_values(url, bad):
    with pytest.raises(ValueError, match="keep must be a positive int or None"):
        save(url, 0, keep=bad)


def test_missing_checkpoint_returns_target_with_warning(url):
    target = {"v": np.zeros(2)}
    with pytest.warns(zarrckpt.MissingCheckpointWarning, match="no checkpoint at"):
        assert zarrckpt.load_pytree(url, target) is target
    with pytest.warns(zarrckpt.MissingCheckpointWarning):
        assert zarrckpt.load_pytree(url) is None
    assert zarrckpt.list_steps(url) == [] and zarrckpt.latest_step(url) is None


def test_uncommitted_step_raises(url):
    with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint at .* \(asked for step 3\)"):
        zarrckpt.load_pytree(url, step=3)
    save(url, 1, keep=None)
    save(url, 2, keep=None)
    with pytest.raises(
        CheckpointNotFoundError, match=r"step 5 is not committed .*committed steps: \[0, 1\]"
    ):
        zarrckpt.load_pytree(url, step=5)
    with pytest.raises(FileNotFoundError):
        zarrckpt.load_pytree(url, step=5)


def test_a_foreign_zarr_group_is_not_a_checkpoint(tmp_path):
    import zarr

    zarr.open_group(str(tmp_path / "plain"), mode="w").create_array("x", shape=(2,), dtype="f4")
    with pytest.raises(CorruptCheckpointError, match="is not a zarrckpt checkpoint"):
        zarrckpt.load_pytree(str(tmp_path / "plain"))
    with pytest.raises(CorruptCheckpointError, match="is not a zarrckpt checkpoint"):
        save(str(tmp_path / "plain"), 1)


def test_a_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "mnist-lif.bp"
    path.write_bytes(b"\x81\xa3old msgpack")
    with pytest.raises(CorruptCheckpointError, match="is a file, not a zarrckpt checkpoint"):
        zarrckpt.load_pytree(str(path))
    with pytest.raises(AlreadyExistsError, match="is an existing file"):
        save(str(path), 1)
    assert path.read_bytes() == b"\x81\xa3old msgpack"


def test_newer_manifest_version_is_refused(local_url):
    save(local_url, 1)
    manifest = Path(local_url, "zarr.json")
    manifest.write_text(manifest.read_text().replace('"version": 1', '"version": 99'))
    with pytest.raises(CorruptCheckpointError, match="version 99 is newer"):
        zarrckpt.load_pytree(local_url)


def test_debris_is_invisible_and_collected_by_the_next_save(url):
    save(url, 1)
    storage = open_storage(url)
    debris = "step_0000000009.000000000000deadbeef"  # created at the epoch: long abandoned
    run(storage.put(f"{debris}/v/zarr.json", [b"{}"]))  # a crashed save
    assert zarrckpt.list_steps(url) == [0] and load(url) == 1
    save(url, 2)
    assert debris not in step_dirs(url)
    assert len(step_dirs(url)) == 1


def test_another_writers_unfinished_step_is_not_debris(local_url):
    """Locally a writer holds a flock on its step directory; a dead writer's lock is gone."""
    import fcntl
    import time

    from zarrckpt._manifest import new_step_dir

    save(local_url, 1)
    alive, dead = new_step_dir(5), new_step_dir(6)
    for name in (alive, dead):
        os.makedirs(os.path.join(local_url, name))
        Path(local_url, name, ".zarrckpt-writing").touch()
    held = os.open(os.path.join(local_url, alive, ".zarrckpt-writing"), os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # a writer in progress (another open file description)
    try:
        save(local_url, 2)
        assert alive in step_dirs(local_url) and dead not in step_dirs(local_url)
    finally:
        os.close(held)
    time.sleep(0.01)
    save(local_url, 3)  # once its writer is gone it is debris like any other
    assert alive not in step_dirs(local_url)


def test_s3_debris_is_collected_once_its_writers_lease_has_expired(s3_root, monkeypatch):
    """On object stores a writer's lease is an object with an expiry time, kept fresh by a
    heartbeat; a directory whose lease is live is another writer's work in progress."""
    import json
    import time

    from zarrckpt._manifest import new_step_dir

    url, options = s3_root
    zarrckpt.save_pytree(url, {"v": 1}, storage_options=options, verbose=False)
    storage = open_storage(url, options)
    writing, dead, finished = new_step_dir(7), new_step_dir(8), new_step_dir(9)
    for name, expires in ((writing, time.time() + 600), (dead, time.time() - 1)):
        lease = json.dumps({"writer": "x", "expires": expires}).encode()
        run(storage.put(f"{name}/.zarrckpt-lease", [lease]))
    for name in (writing, dead, finished):
        run(storage.put(f"{name}/v/zarr.json", [b"{}"]))
    zarrckpt.save_pytree(url, {"v": 2}, storage_options=options, verbose=False)
    names = step_dirs(url)
    assert writing in names  # a concurrent writer's work is left alone
    assert dead not in names and finished not in names


def test_object_store_lease_is_refreshed_while_writing(monkeypatch):
    """A save that outlasts the lease TTL keeps its lease alive (heartbeat)."""
    import asyncio
    import json

    import zarrckpt._write as write_module

    monkeypatch.setenv("ZARRCKPT_LEASE_TTL_S", "0.2")
    url = "memory://lease-heartbeat/ckpt"
    storage = open_storage(url)
    original, seen = write_module.write_step, []

    async def slow(storage_, step_dir, *args, **kwargs):
        first = json.loads(await storage.get(f"{step_dir}/.zarrckpt-lease"))["expires"]
        await asyncio.sleep(0.5)  # longer than the TTL
        later = json.loads(await storage.get(f"{step_dir}/.zarrckpt-lease"))["expires"]
        seen.append((first, later, await storage.lease_expired(step_dir, 0.0)))
        await original(storage_, step_dir, *args, **kwargs)

    monkeypatch.setattr(write_module, "write_step", slow)
    zarrckpt.save_pytree(url, {"v": 1}, verbose=False)
    ((first, later, expired),) = seen
    assert later > first and not expired
    assert zarrckpt.load_pytree(url) == {"v": 1}


def test_save_returns_the_step_group(local_url):
    import zarr

    where = save(local_url, 42)
    assert os.path.dirname(where) == local_url and os.path.basename(where).startswith(
        "step_0000000000."
    )
    assert zarr.open_group(where, mode="r")["v"][...] == 42


def test_verbose_prints_a_summary(url, capsys):
    save(url, 1, verbose=True)
    zarrckpt.load_pytree(url, verbose=True)
    out = capsys.readouterr().out
    assert "zarrckpt: saved step 0 (1 leaves, 8 B) to " in out
    assert "zarrckpt: loaded step 0 (1 leaves, 8 B) from " in out


def test_brainpy_positional_signatures(local_url):
    """bp.checkpoints.save_pytree(filename, target, overwrite, async_manager, verbose) and
    load_pytree(filename, target, parallel) are positional-or-keyword in BrainPy 2.8."""
    import inspect

    zarrckpt.save_pytree(local_url, {"v": np.arange(3)}, True, None, False)
    with zarrckpt.AsyncManager() as manager:
        zarrckpt.save_pytree(local_url, {"v": np.arange(3) + 1}, True, manager, False)
    with pytest.raises(AlreadyExistsError):
        zarrckpt.save_pytree(local_url, {"v": np.arange(3)}, False, None, False)
    assert zarrckpt.load_pytree(local_url, None, False)["v"].tolist() == [1, 2, 3]
    target = {"v": np.zeros(3, np.int64)}
    assert zarrckpt.load_pytree(local_url, target, True)["v"].tolist() == [1, 2, 3]
    params = inspect.signature(zarrckpt.save_pytree).parameters
    assert list(params)[:5] == ["filename", "target", "overwrite", "async_manager", "verbose"]
    assert all(params[p].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in list(params)[:5])
    params = inspect.signature(zarrckpt.load_pytree).parameters
    assert list(params)[:3] == ["filename", "target", "parallel"]
    assert params["step"].kind is inspect.Parameter.KEYWORD_ONLY


def test_local_os_errors_are_store_errors_naming_the_path(tmp_path):
    root = tmp_path / "ro"
    zarrckpt.save_pytree(str(root), {"v": 1}, verbose=False)
    (root / "blocker").write_text("a file where a directory is needed")
    with pytest.raises(zarrckpt.StoreError, match=r"blocker.* failed") as info:
        zarrckpt.save_pytree(str(root / "blocker" / "inner"), {"v": 1}, verbose=False)
    assert isinstance(info.value, OSError)
    assert zarrckpt.load_pytree(str(root)) == {"v": 1}  # the committed step is untouched
