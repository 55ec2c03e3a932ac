"""A state machine of saves, failed saves and collections against a model of the manifest.

The model is the list of committed steps and the value each holds. After every rule the
checkpoint lists exactly the model's steps, every one loads its value, and no committed
step is missing data; ``overwrite=False`` errors exactly when the model says it must.
"""

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import os
import shutil
import tempfile
import uuid

import fsspec
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import zarrckpt
import zarrckpt._write as write
from zarrckpt import AlreadyExistsError
from zarrckpt._commit import collect_garbage, read_manifest
from zarrckpt._storage import open_storage
from zarrckpt._sync import run

DEFAULT = "default"
ROOT_FILES = {"zarr.json", ".zarrckpt.lock"}
CHUNK = 512 * 1024  # the big leaf is 4 chunks written one by one: a save can fail halfway

keeps = st.sampled_from([DEFAULT, None, 1, 2, 3])


def make_tree(value: int) -> dict:
    return {
        "v": np.array([value], np.int64),
        "big": np.full(512 * 1024, value, np.float32),  # 4 chunks
        "small": {f"s{i}": np.full(8, value * 10 + i, np.int16) for i in range(5)},
        "tag": f"value {value}",
    }


def check_tree(tree: dict, value: int) -> None:
    want = make_tree(value)
    assert tree["tag"] == want["tag"]
    for key in ("v", "big"):
        assert tree[key].dtype == want[key].dtype
        assert tree[key].tobytes() == want[key].tobytes(), key
    assert {k: v.tobytes() for k, v in tree["small"].items()} == {
        k: v.tobytes() for k, v in want["small"].items()
    }


@functools.cache
def _scratch() -> str:
    """One directory for every machine's root, removed at exit (whatever teardown missed)."""
    path = tempfile.mkdtemp(prefix="zarrckpt-stateful-")
    atexit.register(shutil.rmtree, path, True)
    return path


class SimulatedCrash(OSError):
    pass


class FailAfter:
    """A storage that lets ``n`` writes through, then fails (the save dies halfway)."""

    def __init__(self, storage, n: int) -> None:
        self._storage, self._left = storage, n

    def __getattr__(self, name):
        return getattr(self._storage, name)

    def _tick(self) -> None:
        if self._left <= 0:
            raise SimulatedCrash("simulated crash halfway through a save")
        self._left -= 1

    async def put(self, key, parts):
        self._tick()
        await self._storage.put(key, parts)

    async def put_batch(self, items):
        self._tick()
        await self._storage.put_batch(items)


class CheckpointMachine(RuleBasedStateMachine):
    backend = "local"

    def __init__(self) -> None:
        super().__init__()
        if self.backend == "local":
            self.tmp = tempfile.mkdtemp(dir=_scratch())
            self.url = os.path.join(self.tmp, "ckpt")
        else:
            self.tmp = None
            self.url = f"memory://{uuid.uuid4().hex}/ckpt"
        self.model: dict[int, int] = {}  # committed step -> value
        self.counter = 0

    def teardown(self) -> None:
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                fsspec.filesystem("memory").rm(self.url, recursive=True)

    # --- the model -------------------------------------------------------------------------

    def expect(self, step, overwrite, keep):
        """The steps after this save, or None where it must raise AlreadyExistsError."""
        keep = (1 if overwrite else None) if keep == DEFAULT else keep
        latest = max(self.model) if self.model else None
        if not overwrite and latest is not None and (step is None or step <= latest):
            return None
        number = step if step is not None else (0 if latest is None else latest + 1)
        steps = [s for s in sorted(self.model) if s < number] + [number]
        if keep is not None:
            steps = steps[-keep:]
        if not overwrite and set(self.model) - set(steps):
            return None  # keep would drop a committed step, which overwrite=False protects
        return number, steps

    def entries(self) -> set[str]:
        """Root entries but the manifest, the lock and recycling's one spare (at most one)."""
        names = set(run(open_storage(self.url).list_dir(""))) - ROOT_FILES
        spares = {n for n in names if n.startswith(".spare-")}
        assert len(spares) <= 1, f"more than one spare: {spares}"
        return names - spares

    def committed(self) -> set[str]:
        manifest = run(read_manifest(open_storage(self.url)))
        return manifest.dirs if manifest else set()

    def save(self, step, overwrite, keep):
        self.counter += 1
        value = self.counter
        kwargs = {} if keep == DEFAULT else {"keep": keep}
        before = self.entries()
        outcome = self.expect(step, overwrite, keep)
        if outcome is None:
            with pytest.raises(AlreadyExistsError):
                zarrckpt.save_pytree(
                    self.url, make_tree(value), overwrite, step=step, chunk_bytes=CHUNK,
                    verbose=False, **kwargs,
                )  # fmt: skip
            assert self.entries() == before  # nothing written, nothing deleted
            return
        number, steps = outcome
        zarrckpt.save_pytree(
            self.url, make_tree(value), overwrite, step=step, chunk_bytes=CHUNK, verbose=False,
            **kwargs,
        )  # fmt: skip
        self.model = {s: (value if s == number else self.model[s]) for s in steps}
        # The save collected what it dropped and any debris of earlier failed saves.
        assert self.entries() == self.committed()

    # --- rules -----------------------------------------------------------------------------

    @rule(overwrite=st.booleans(), keep=keeps)
    def save_next(self, overwrite, keep):
        self.save(None, overwrite, keep)

    @rule(step=st.integers(0, 12), overwrite=st.booleans(), keep=keeps)
    def save_step(self, step, overwrite, keep):
        self.save(step, overwrite, keep)

    @rule(
        step=st.none() | st.integers(0, 12),
        writes=st.integers(0, 4),
        interrupt=st.booleans(),
    )
    def crash(self, step, writes, interrupt):
        """A save that dies halfway: an I/O error, or an interrupt (its task is cancelled)."""
        original = write.write_step

        async def dying(storage, *args, **kwargs):
            try:
                await original(FailAfter(storage, writes), *args, **kwargs)
            except SimulatedCrash:
                if interrupt:
                    raise asyncio.CancelledError from None  # as Ctrl-C cancels a save
                raise
            raise AssertionError("the save should have failed")

        self.counter += 1
        write.write_step = dying
        try:
            with pytest.raises(BaseException) as info:
                zarrckpt.save_pytree(
                    self.url, make_tree(self.counter), step=step, chunk_bytes=CHUNK,
                    verbose=False,
                )  # fmt: skip
        finally:
            write.write_step = original
        cancelled = (asyncio.CancelledError, concurrent.futures.CancelledError)
        expected = cancelled if interrupt else SimulatedCrash
        assert isinstance(info.value, expected), repr(info.value)
        # The model is unchanged: the invariants check that nothing was committed.

    @rule()
    def collect(self):
        run(collect_garbage(open_storage(self.url)))
        assert self.entries() == self.committed()

    # --- invariants ------------------------------------------------------------------------

    @invariant()
    def manifest_matches_the_model(self):
        assert zarrckpt.list_steps(self.url) == sorted(self.model)

    @invariant()
    def every_committed_step_loads_its_value(self):
        missing = self.committed() - self.entries()
        assert not missing, f"committed step directories are gone: {missing}"
        for step, value in self.model.items():
            check_tree(zarrckpt.load_pytree(self.url, step=step), value)


SETTINGS = settings(
    max_examples=30,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class MemoryCheckpointMachine(CheckpointMachine):
    backend = "memory"


TestLocalCheckpoint = pytest.mark.slow(CheckpointMachine.TestCase)
TestLocalCheckpoint.settings = SETTINGS
TestMemoryCheckpoint = pytest.mark.slow(MemoryCheckpointMachine.TestCase)
TestMemoryCheckpoint.settings = SETTINGS
