"""Concurrent writers on one root: conditional commits, leases and garbage collection.

Overlaps are forced, not hoped for: writer processes meet at a file barrier just before
publishing (so every forced round is a real race), and the in-process interleavings are
scheduled with hooks on the protocol's own functions (``_commit.publish``,
``_write.write_step``, ``Storage.list_dir``).
"""

import asyncio
import inspect
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest

import zarrckpt
import zarrckpt._commit as commit
import zarrckpt._write as write
from zarrckpt import CollectionWarning, ConcurrentWriteError, SingleWriterWarning
from zarrckpt._storage import LocalStorage, StoreStorage, open_storage
from zarrckpt._sync import run

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
#: names a root holds besides step directories
ROOT_FILES = {"zarr.json", ".zarrckpt.lock"}


def child_env() -> dict:
    """Subprocesses import this checkout's zarrckpt, whatever is installed."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}


def make_state(who: str, round_: int) -> dict:
    """A writer's state for one round: every leaf depends on the writer and the round."""
    seed = int.from_bytes(who.encode(), "little") * 1000 + round_
    rng = np.random.default_rng(seed)
    return {
        "who": who,
        "round": round_,
        "noise": rng.standard_normal(5000).astype(np.float32),
        "ids": {f"x{k}": np.full(64, seed + k, np.int64) for k in range(4)},
    }


def assert_state(tree: dict, who: str, round_: int) -> None:
    want = make_state(who, round_)
    assert (tree["who"], tree["round"]) == (who, round_)
    assert tree["noise"].dtype == want["noise"].dtype
    assert tree["noise"].tobytes() == want["noise"].tobytes()
    assert set(tree["ids"]) == set(want["ids"])
    for key, value in want["ids"].items():
        assert tree["ids"][key].tobytes() == value.tobytes(), key


def root_entries(url, options=None) -> set[str]:
    """Everything directly under the root except the manifest, the lock file and the one
    spare that local recycling may keep (the saving process's own, never more)."""
    names = set(run(open_storage(url, options).list_dir(""))) - ROOT_FILES
    spares = {n for n in names if n.startswith(".spare-")}
    assert len(spares) <= 1, f"more than one spare: {spares}"
    return names - spares


def committed_dirs(url, options=None) -> dict[str, int]:
    manifest = run(commit.read_manifest(open_storage(url, options)))
    return {s.dir: s.step for s in manifest.steps} if manifest else {}


# --- several writer processes --------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import asyncio, json, os, random, sys, time
    import numpy as np
    import zarrckpt, zarrckpt._commit as commit

    cfg = json.loads(sys.argv[1])
    who, n, barrier = cfg["who"], cfg["writers"], cfg["barrier"]
    rng = random.Random(cfg["seed"])
    current = {"round": None}
    original = commit.publish

    # MAKE_STATE

    def arrive(tag):
        open(os.path.join(barrier, f"{tag}.{who}"), "w").close()

    def arrived(tag):
        return sum(name.startswith(tag + ".") for name in os.listdir(barrier))

    async def publish_after_barrier(storage, manifest, token):
        r = current["round"]
        if r in cfg["forced"]:
            # Every writer has read the manifest and written its step: all publish together.
            arrive(f"r{r}")
            deadline = time.monotonic() + 60
            while arrived(f"r{r}") < n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{who}: barrier of round {r} timed out")
                await asyncio.sleep(0.002)
        return await original(storage, manifest, token)

    commit.publish = publish_after_barrier
    arrive("start")
    while arrived("start") < n:
        time.sleep(0.01)
    keep = {} if cfg["keep"] == "default" else {"keep": cfg["keep"]}
    for r in range(cfg["rounds"]):
        current["round"] = r
        time.sleep(rng.uniform(0, 0.2))  # unforced rounds: sometimes a race, sometimes not
        try:
            where = zarrckpt.save_pytree(
                cfg["url"], make_state(who, r), storage_options=cfg["options"],
                verbose=False, **keep,
            )
            out = {"who": who, "round": r, "ok": where.rstrip("/").rsplit("/", 1)[-1]}
        except zarrckpt.ConcurrentWriteError as exc:
            out = {"who": who, "round": r, "conflict": str(exc)}
        print(json.dumps(out), flush=True)
    """
)
# make_state's own source (importing this module would import pytest in every writer)
WRITER = WRITER.replace("# MAKE_STATE", inspect.getsource(make_state))
KEEP_DEFAULT = "default"


def run_writers(url, options, writers: int, rounds: int, forced: set[int], keep, tmp_path):
    barrier = tmp_path / f"barrier-{uuid.uuid4().hex[:6]}"
    barrier.mkdir()
    procs = []
    for i in range(writers):
        cfg = {
            "who": "abcdefg"[i], "writers": writers, "barrier": str(barrier), "seed": i,
            "url": str(url), "options": options, "rounds": rounds, "forced": sorted(forced),
            "keep": keep,
        }  # fmt: skip
        argv = [sys.executable, "-c", WRITER, json.dumps(cfg)]
        procs.append(
            subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=child_env(),
                cwd=str(tmp_path),
            )
        )
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, f"writer failed:\n{err[-3000:]}"
        results += [json.loads(line) for line in out.splitlines()]
    return results


def check_rounds(results, writers, rounds, forced):
    # Every save either committed or raised ConcurrentWriteError: none vanished.
    assert sorted((r["who"], r["round"]) for r in results) == sorted(
        (w, i) for w in "abcdefg"[:writers] for i in range(rounds)
    )
    for r in results:
        if "conflict" in r:
            assert "another writer committed" in r["conflict"], r
    wins = {(r["who"], r["round"]): r["ok"] for r in results if "ok" in r}
    for i in forced:
        won = [w for (w, j) in wins if j == i]
        lost = [r["who"] for r in results if r["round"] == i and "conflict" in r]
        # All writers published after all had read the manifest: the first publication
        # makes every other one stale, and the writer that saw the last commit is current.
        assert len(lost) >= 1, f"round {i} was forced to overlap but nobody lost: {results}"
        assert len(won) == 1 and len(lost) == writers - 1, (i, won, lost)
    return wins


BACKENDS_2 = [("local", 2), ("local", 3), ("s3", 2), ("s3", 3)]


def _root(kind, tmp_path, request):
    if kind == "local":
        return str(tmp_path / "ckpt"), None
    return request.getfixturevalue("s3_root")


@pytest.mark.parametrize(("kind", "writers"), BACKENDS_2)
def test_writer_processes_keep_all(kind, writers, tmp_path, request):
    url, options = _root(kind, tmp_path, request)
    rounds, forced = 4, {0, 2, 3}
    results = run_writers(url, options, writers, rounds, forced, None, tmp_path)
    wins = check_rounds(results, writers, rounds, forced)

    # No commit lost, none overwritten: the manifest lists exactly the winners' directories,
    # as consecutive steps (each commit's base was the previous commit's manifest).
    listed = committed_dirs(url, options)
    assert sorted(listed) == sorted(wins.values())
    assert sorted(listed.values()) == list(range(len(wins)))
    by_dir = {d: key for key, d in wins.items()}
    for step_dir, step in listed.items():
        tree = zarrckpt.load_pytree(url, step=step, storage_options=options)
        assert_state(tree, *by_dir[step_dir])
    # Losers removed their directories; a further save leaves only committed steps.
    zarrckpt.save_pytree(url, make_state("z", 0), storage_options=options, keep=None, verbose=False)
    assert root_entries(url, options) == set(committed_dirs(url, options))
    print(f"{len(wins)} commits, {len(results) - len(wins)} conflicts")


@pytest.mark.parametrize(("kind", "writers"), [("local", 3), ("s3", 3)])
def test_writer_processes_default_keep(kind, writers, tmp_path, request):
    url, options = _root(kind, tmp_path, request)
    rounds, forced = 4, {0, 2, 3}
    results = run_writers(url, options, writers, rounds, forced, KEEP_DEFAULT, tmp_path)
    wins = check_rounds(results, writers, rounds, forced)

    listed = committed_dirs(url, options)
    assert list(listed.values()) == [len(wins) - 1]  # keep=1: the last of consecutive steps
    (survivor,) = listed
    tree = zarrckpt.load_pytree(url, storage_options=options)
    who, round_ = tree["who"], tree["round"]
    assert wins.get((who, round_)) == survivor, (who, round_, survivor, wins)
    assert_state(tree, who, round_)
    # A final save collects every dropped step and every loser's leftovers.
    zarrckpt.save_pytree(url, make_state("z", 0), storage_options=options, verbose=False)
    assert root_entries(url, options) == set(committed_dirs(url, options))
    assert zarrckpt.list_steps(url, storage_options=options) == [len(wins)]
    assert_state(zarrckpt.load_pytree(url, storage_options=options), "z", 0)


# --- collection racing another writer's commit (one process) -------------------------------


def _wait(flag: threading.Event, what: str, timeout: float = 30) -> None:
    if not flag.wait(timeout):
        raise AssertionError(f"timed out waiting for {what}")


async def _await(flag: threading.Event, what: str, timeout: float = 30) -> None:
    """Wait for ``flag`` on zarrckpt's loop without blocking it."""
    deadline = time.monotonic() + timeout
    while not flag.is_set():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def _record_step(record: bytes) -> int:
    return json.loads(record)["attributes"]["zarrckpt"]["step"]


class CollectionRace:
    """Schedules writer A's whole save inside writer B's collection.

    B saves step ``b`` and publishes; A then reads B's manifest and takes its lease on a
    new directory (A's save is started by ``start_a``); B's collection lists the root (so
    it sees A's directory); only then does A write, commit and release its lease; B's
    collection goes on after A's save has returned. A collection that judged A's directory
    by a manifest read before A's lease was gone would delete A's committed step.
    """

    def __init__(self, monkeypatch, b: int, a: int, start_a) -> None:
        self.b, self.a, self.start_a = b, a, start_a
        self.b_published = threading.Event()
        self.a_began = threading.Event()
        self.b_listed = threading.Event()
        self.a_done = threading.Event()
        self.listings: list[list[str]] = []
        self._armed = True
        original_publish, original_write = commit.publish, write.write_step

        async def publish(storage, manifest, token):
            ok = await original_publish(storage, manifest, token)
            if ok and manifest.latest.step == self.b and not self.b_published.is_set():
                self.b_published.set()
                self.start_a()
                await _await(self.a_began, "A to take its lease")
            return ok

        async def write_step(storage, step_dir, leaves, groups, record, *args, **kwargs):
            if _record_step(record) == self.a:
                self.a_began.set()  # A's directory exists, with its lease held
                await _await(self.b_listed, "B's collection to list the root")
            return await original_write(storage, step_dir, leaves, groups, record, *args, **kwargs)

        monkeypatch.setattr(commit, "publish", publish)
        monkeypatch.setattr(write, "write_step", write_step)
        for cls in (LocalStorage, StoreStorage):
            original_list = cls.list_dir

            async def list_dir(storage, prefix="", _original=original_list):
                names = await _original(storage, prefix)
                if prefix == "" and self.b_published.is_set() and self._armed:
                    self._armed = False  # B's collection: the first listing after B's commit
                    self.listings.append(names)
                    self.b_listed.set()
                    await _await(self.a_done, "A's save to finish")
                return names

            monkeypatch.setattr(cls, "list_dir", list_dir)


def _value(url, step):
    return int(zarrckpt.load_pytree(url, step=step)["v"][0])


def _check_race(race: CollectionRace, url: str, keep) -> None:
    assert race.a_done.is_set()
    (listing,) = race.listings
    dirs = committed_dirs(url)
    a_dir = next(d for d, s in dirs.items() if s == race.a)
    # The interleaving happened as intended: B's listing included A's (then leased) directory.
    assert a_dir in listing, (a_dir, listing)
    expected = {0: 0, 1: 10, 2: 20} if keep is None else {2: 20}  # keep=1: A's step alone
    assert zarrckpt.list_steps(url) == list(expected)
    assert {s: _value(url, s) for s in expected} == expected
    present = root_entries(url)
    assert set(dirs) <= present, f"committed step directories missing: {set(dirs) - present}"
    assert present == set(dirs)


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ckpt")
    return f"memory://{uuid.uuid4().hex}/ckpt"


def _save(url, value, **kw):
    kw.setdefault("keep", None)
    return zarrckpt.save_pytree(url, {"v": np.full(3, value)}, verbose=False, **kw)


race_keep = pytest.mark.parametrize("keep", [None, 1], ids=["keep_all", "keep_1"])


@race_keep
def test_collection_never_deletes_a_step_committed_during_it(root, keep, monkeypatch):
    _save(root, 0)
    errors = []

    def a_save():
        try:
            _save(root, 20, keep=keep)
        except BaseException as exc:
            errors.append(exc)
        finally:
            race.a_done.set()

    def start_a():
        threading.Thread(target=a_save, daemon=True).start()

    race = CollectionRace(monkeypatch, b=1, a=2, start_a=start_a)
    _save(root, 10, keep=keep)  # B, in this thread; A runs in another, inside B's collection
    assert not errors, errors
    _check_race(race, root, keep)


@race_keep
def test_foreground_save_during_a_background_collection(root, keep, monkeypatch):
    _save(root, 0)
    race = CollectionRace(monkeypatch, b=1, a=2, start_a=lambda: None)
    with zarrckpt.AsyncManager() as manager:
        _save(root, 10, keep=keep, async_manager=manager)  # B, in the background
        _wait(race.b_published, "the background save to commit")
        try:
            _save(root, 20, keep=keep)  # A: a plain save from this thread while B collects
        finally:
            race.a_done.set()
    _check_race(race, root, keep)


def test_collection_never_deletes_another_writers_manifest_in_flight(local_url, monkeypatch):
    """A collection running while another writer publishes leaves its temporary manifest.

    Locally a commit writes ``zarr.json.<random>.partial`` under the root's lock and renames
    it over the manifest; collection (which takes no lock) deletes ``*.partial`` files as
    debris of crashed commits. Here another writer's collection runs between the temporary
    file's creation and its rename: the publishing save must still commit.
    """
    import zarrckpt._storage.local as local

    _save(local_url, 0)
    original_replace = os.replace
    collected: list[list[str]] = []

    def replace(src, dst, *args, **kwargs):
        if str(src).endswith(".partial") and not collected:
            # Another writer (another process, or this one's background save) collects now.
            collected.append(run(commit.collect_garbage(open_storage(local_url))))
        return original_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(local.os, "replace", replace)
    _save(local_url, 1)
    monkeypatch.setattr(local.os, "replace", original_replace)
    assert collected, "the hook never ran"
    assert zarrckpt.list_steps(local_url) == [0, 1]
    assert _value(local_url, 1) == 1


# --- units ---------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["mapper", "store"])
def test_s3_given_as_a_mapper_or_store_still_commits_conditionally(form, s3_root, monkeypatch):
    import s3fs
    from zarr.storage import FsspecStore

    url, options = s3_root
    path = url[len("s3://") :]
    if form == "mapper":
        location = s3fs.S3FileSystem(skip_instance_cache=True, **options).get_mapper(path)
    else:
        fs = s3fs.S3FileSystem(asynchronous=True, skip_instance_cache=True, **options)
        location = FsspecStore(fs, path=path)
    assert open_storage(location).conditional_writes
    zarrckpt.save_pytree(location, {"who": "first"}, keep=None, verbose=False)
    original = write.write_step

    async def interleaved(*args, **kwargs):
        await original(*args, **kwargs)
        # Another writer (through the URL) commits after this save read the manifest.
        monkeypatch.setattr(write, "write_step", original)
        await asyncio.to_thread(
            zarrckpt.save_pytree, url, {"who": "other"}, storage_options=options, keep=None,
            verbose=False,
        )  # fmt: skip

    monkeypatch.setattr(write, "write_step", interleaved)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SingleWriterWarning)
        with pytest.raises(ConcurrentWriteError, match="another writer committed"):
            zarrckpt.save_pytree(location, {"who": "loser"}, keep=None, verbose=False)
    assert zarrckpt.list_steps(url, storage_options=options) == [0, 1]
    assert zarrckpt.load_pytree(location) == {"who": "other"}
    assert root_entries(url, options) == set(committed_dirs(url, options))


def _single_writer_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, SingleWriterWarning)]


def test_gcs_publishes_conditionally_without_a_warning(gcs_root):
    url, options = gcs_root
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        zarrckpt.save_pytree(url, {"w": np.arange(3)}, storage_options=options, verbose=False)
    assert not _single_writer_warnings(record)
    assert open_storage(url, options).conditional_writes


def test_a_backend_without_conditional_writes_warns_once(tmp_path):
    """A plain fsspec filesystem (here the local one, given as a mapper) cannot
    compare-and-set: the first commit says so, once per root and process."""
    import fsspec

    mapper = fsspec.filesystem("file", auto_mkdir=True).get_mapper(str(tmp_path / "ckpt"))
    with pytest.warns(SingleWriterWarning, match="one writer at a time"):
        zarrckpt.save_pytree(mapper, {"w": np.arange(3)}, verbose=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        zarrckpt.save_pytree(mapper, {"w": np.arange(4)}, verbose=False)
    assert not _single_writer_warnings(record)
    assert zarrckpt.load_pytree(mapper)["w"].tolist() == [0, 1, 2, 3]


def test_a_failed_collection_warns_and_the_next_save_collects(url, monkeypatch):
    options = url.storage_options  # recycle=False: locally a dropped step is otherwise renamed
    zarrckpt.save_pytree(url, {"v": 0}, storage_options=options, verbose=False, recycle=False)
    (first,) = committed_dirs(url, options)
    cls = type(open_storage(url, options))

    async def refuse(self, prefix):
        raise PermissionError(f"deleting {prefix} refused")

    monkeypatch.setattr(cls, "delete_dir", refuse)
    with pytest.warns(CollectionWarning, match="step 1 is committed, but deleting old steps"):
        zarrckpt.save_pytree(url, {"v": 1}, storage_options=options, verbose=False, recycle=False)
    monkeypatch.undo()
    assert zarrckpt.list_steps(url, storage_options=options) == [1]
    assert zarrckpt.load_pytree(url, storage_options=options) == {"v": 1}
    assert first in root_entries(url, options)  # dropped, but not deleted yet

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zarrckpt.save_pytree(url, {"v": 2}, storage_options=options, verbose=False, recycle=False)
    assert root_entries(url, options) == set(committed_dirs(url, options))
    assert zarrckpt.load_pytree(url, storage_options=options) == {"v": 2}


def test_without_flock_a_local_root_works_single_writer(local_url, monkeypatch):
    """As on Windows (no ``fcntl``): saves and loads work, with one SingleWriterWarning."""
    import zarrckpt._storage.local as local

    monkeypatch.setattr(local, "fcntl", None)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for i in range(3):
            zarrckpt.save_pytree(local_url, {"w": np.full(5, i)}, keep=2, verbose=False)
    assert len(_single_writer_warnings(record)) == 1, [str(w.message) for w in record]
    assert zarrckpt.list_steps(local_url) == [1, 2]
    assert zarrckpt.load_pytree(local_url, step=1)["w"].tolist() == [1] * 5
    assert zarrckpt.load_pytree(local_url)["w"].tolist() == [2] * 5
    assert root_entries(local_url) == set(committed_dirs(local_url))
