"""Object stores: request budgets, conditional commits, errors naming the URL, store objects."""

import asyncio
import json
import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import pytest
import s3fs

import zarrckpt
from zarrckpt import ConcurrentWriteError, StoreError


@pytest.fixture
def s3_calls(monkeypatch):
    """Counts S3 API calls made by s3fs in this process, by operation name."""
    calls = Counter()
    original = s3fs.S3FileSystem._call_s3

    async def counting(self, method, *args, **kwargs):
        calls[method] += 1
        return await original(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counting)
    return calls


def _state(n_leaves=200, n_groups=4):
    rng = np.random.default_rng(0)
    return {f"g{g}": {f"n{i}": rng.standard_normal(64).astype(np.float32) for i in range(n_leaves // n_groups)}
            for g in range(n_groups)}  # fmt: skip


def test_request_budgets_on_s3(s3_root, s3_calls):
    url, options = s3_root
    zarrckpt.save_pytree(url, _state(), storage_options=options, verbose=False)
    # Per leaf: its zarr.json and its one chunk. Per step: the writer's lease object, 4 group
    # documents, the step group (which carries the index), the manifest; one manifest read,
    # the lease's deletion, one listing for collection.
    assert s3_calls["put_object"] == 1 + 2 * 200 + 4 + 1 + 1
    assert s3_calls["head_object"] == 0
    assert sum(s3_calls.values()) <= 2 * 200 + 12, dict(s3_calls)

    s3_calls.clear()
    zarrckpt.load_pytree(url, storage_options=options)
    assert s3_calls["get_object"] == 200 + 2 and sum(s3_calls.values()) == 202, dict(s3_calls)

    s3_calls.clear()
    ckpt = zarrckpt.open_checkpoint(url, storage_options=options)
    assert sum(s3_calls.values()) == 2  # manifest + step index, however many leaves
    s3_calls.clear()
    ckpt["g2/n27"][:]
    assert dict(s3_calls) == {"get_object": 1}
    s3_calls.clear()
    assert zarrckpt.list_steps(url, storage_options=options) == [0]
    assert sum(s3_calls.values()) == 1


def test_storage_options_are_passed_through(s3_server, s3_root):
    url, options = s3_root
    zarrckpt.save_pytree(
        url,
        {"w": np.arange(3)},
        storage_options={**options, "client_kwargs": {"region_name": "eu-west-1"}},
        verbose=False,
    )
    assert zarrckpt.load_pytree(url, storage_options=options)["w"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="storage_options apply to remote URLs"):
        zarrckpt.save_pytree("local/dir", {"w": 1}, storage_options=options)


def test_a_built_filesystem_or_zarr_store_works_where_a_url_does(s3_root):
    url, options = s3_root
    fs = s3fs.S3FileSystem(asynchronous=True, skip_instance_cache=True, **options)
    mapper = s3fs.S3FileSystem(skip_instance_cache=True, **options).get_mapper(
        url[len("s3://") :] + "-mapped"
    )
    zarrckpt.save_pytree(mapper, {"w": np.arange(4)}, verbose=False)
    assert zarrckpt.load_pytree(mapper)["w"].tolist() == [0, 1, 2, 3]
    from zarr.storage import FsspecStore

    store = FsspecStore(fs, path=url[len("s3://") :] + "-store")
    zarrckpt.save_pytree(store, {"w": np.arange(2)}, verbose=False)
    assert zarrckpt.load_pytree(store)["w"].tolist() == [0, 1]


def test_missing_bucket_is_a_store_error_naming_the_url(s3_server):
    url = "s3://no-such-bucket-zarrckpt/run"
    with pytest.raises(StoreError, match=r"s3://no-such-bucket-zarrckpt/run/.* failed"):
        zarrckpt.save_pytree(url, {"w": np.ones(3)}, verbose=False)
    with pytest.warns(zarrckpt.MissingCheckpointWarning):  # reading: simply no checkpoint
        assert zarrckpt.load_pytree(url) is None


def test_network_failure_mid_save_leaves_the_committed_step(s3_root, monkeypatch):
    url, options = s3_root
    zarrckpt.save_pytree(url, {"w": np.zeros(1000)}, storage_options=options, verbose=False)
    original, puts = s3fs.S3FileSystem._call_s3, []

    async def flaky(self, method, *args, **kwargs):
        if method == "put_object":
            puts.append(1)
            if len(puts) == 5:
                raise ConnectionError("connection reset by peer")
        return await original(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", flaky)
    with pytest.raises(
        StoreError, match=r"writing s3://.*failed: ConnectionError: connection reset"
    ):
        zarrckpt.save_pytree(
            url,
            {"w": np.ones(1000), "more": list(range(10))},
            storage_options=options,
            verbose=False,
        )
    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", original)
    assert zarrckpt.list_steps(url, storage_options=options) == [0]
    assert zarrckpt.load_pytree(url, storage_options=options)["w"].sum() == 0


@pytest.mark.parametrize("backend_name", ["local", "s3"])
def test_a_commit_that_lost_the_race_raises_and_cleans_up(
    backend_name, s3_root, tmp_path, monkeypatch
):
    import zarrckpt._write as api

    url, options = (str(tmp_path / "ckpt"), None) if backend_name == "local" else s3_root
    zarrckpt.save_pytree(url, {"who": "first"}, storage_options=options, verbose=False)
    original = api.write_step

    async def interleaved(*args, **kwargs):
        await original(*args, **kwargs)
        # Another writer commits after this save read the manifest and before it commits.
        monkeypatch.setattr(api, "write_step", original)
        await asyncio.to_thread(
            zarrckpt.save_pytree,
            url,
            {"who": "other"},
            storage_options=options,
            keep=None,
            verbose=False,
        )

    monkeypatch.setattr(api, "write_step", interleaved)
    with pytest.raises(
        ConcurrentWriteError, match="another writer committed while step 1 was being saved"
    ):
        zarrckpt.save_pytree(
            url, {"who": "loser"}, storage_options=options, keep=None, verbose=False
        )
    monkeypatch.setattr(api, "write_step", original)
    assert zarrckpt.load_pytree(url, storage_options=options) == {"who": "other"}
    ckpt = zarrckpt.open_checkpoint(url, storage_options=options)
    storage = ckpt._opened.storage
    from zarrckpt._sync import run

    dirs = [n for n in run(storage.list_dir("")) if n.startswith("step_")]
    assert len(dirs) == len(zarrckpt.list_steps(url, storage_options=options))  # loser's data gone


WRITER = textwrap.dedent(
    """
    import json, sys, time, numpy as np, zarrckpt
    url, endpoint, who, start = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    time.sleep(max(0.0, start - time.time()))
    for i in range(6):
        state = {"who": who, "i": i, "data": {f"x{k}": np.full(64, i, np.int32) for k in range(30)}}
        try:
            where = zarrckpt.save_pytree(url, state, storage_options=options, keep=None, verbose=False)
            print(json.dumps({"ok": [who, i, where]}), flush=True)
        except zarrckpt.ConcurrentWriteError as exc:
            print(json.dumps({"conflict": [who, i, str(exc)]}), flush=True)
    """
)


def test_two_processes_saving_to_one_s3_root(s3_server, s3_root):
    import time

    url, options = s3_root
    start = time.time() + 3.0  # both begin together, after their imports
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, url, s3_server, who, str(start)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for who in ("a", "b")
    ]
    results = [
        json.loads(line) for p in procs for line in p.communicate(timeout=120)[0].splitlines()
    ]
    assert all(p.returncode == 0 for p in procs)
    assert len(results) == 12  # every save either committed or raised ConcurrentWriteError
    wins = [r["ok"] for r in results if "ok" in r]
    conflicts = [r["conflict"] for r in results if "conflict" in r]
    steps = zarrckpt.list_steps(url, storage_options=options)
    assert len(steps) == len(wins)  # no committed save was lost
    seen = set()
    for step in steps:
        state = zarrckpt.load_pytree(url, step=step, storage_options=options)
        seen.add((state["who"], state["i"]))
        assert all(
            np.array_equal(v, np.full(64, state["i"], np.int32)) for v in state["data"].values()
        )
    assert seen == {(who, i) for who, i, _ in wins}
    assert all("another writer committed" in message for _, _, message in conflicts)
    print(f"{len(wins)} commits, {len(conflicts)} conflicts")
