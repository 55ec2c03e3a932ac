"""Crash safety: a saver SIGKILLed at random moments never damages the committed step.

The local trial saves with the default ``keep`` (1) into one root, so every save replaces
the previous step: kills land in writes, flushes, commits and collections of dropped steps.
"""

import functools
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import zarrckpt
from zarrckpt._commit import read_manifest
from zarrckpt._storage import open_storage
from zarrckpt._sync import run

MIB = 1024 * 1024
SIZE = 32 * MIB  # per big array; 3 of them + small leaves ~ 100 MB a step
KILLS = 20
REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

CHILD = textwrap.dedent(
    """
    import sys, numpy as np, zarrckpt
    from test_crash import make_state
    root = sys.argv[1]
    make_state(0)
    print("ready", flush=True)
    while True:
        step = (zarrckpt.latest_step(root) or 0) + 1
        zarrckpt.save_pytree(root, make_state(step), step=step, verbose=False)
        print("committed", step, flush=True)
    """
)


def child_env(**extra: str) -> dict:
    """The child imports this checkout's zarrckpt and this module."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]), **extra}


@functools.cache
def _base(size: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    return tuple(np.frombuffer(rng.bytes(size), dtype=np.float32) for _ in range(3))


def make_state(step: int, size: int = SIZE, n_small: int = 200) -> dict:
    big = [a.copy() for a in _base(size)]
    for a in big:
        a[::4096] = step  # every chunk depends on the step
    small = {f"n{i}": np.full(256, step * 1000 + i, dtype=np.int32) for i in range(n_small)}
    return {"big": big, "small": small, "step": step}


def _assert_is_step(tree: dict, step: int, **kw) -> None:
    expected = make_state(step, **kw)
    assert tree["step"] == step
    for got, want in zip(tree["big"], expected["big"], strict=True):
        assert got.tobytes() == want.tobytes()
    assert set(tree["small"]) == set(expected["small"])
    for key, want in expected["small"].items():
        assert np.array_equal(tree["small"][key], want)


def _step_dirs(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.name.startswith(("step_", ".tmp-"))}


def _committed_dirs(root: Path) -> set[str]:
    manifest = json.loads((root / "zarr.json").read_text())
    return {s["dir"] for s in manifest["attributes"]["zarrckpt"]["steps"]}


def _reported(out: str) -> list[int]:
    """The steps the killed child said it had committed (a save that returned)."""
    return [int(line.split()[1]) for line in out.splitlines() if line.startswith("committed")]


@pytest.mark.slow
def test_sigkill_during_saves(tmp_path):
    root = tmp_path / "ckpt"
    zarrckpt.save_pytree(str(root), make_state(0), step=0, verbose=False)
    rng = random.Random(1234)
    script = CHILD
    killed_mid_save = 0
    for trial in range(KILLS):
        before = zarrckpt.latest_step(str(root))
        child = subprocess.Popen(
            [sys.executable, "-c", script, str(root)],
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 1.5))
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate(timeout=30)

        latest = zarrckpt.latest_step(str(root))
        assert latest is not None, f"trial {trial}: no committed step after the kill"
        reported = _reported(out)
        # A save that returned stays committed; at most the save in flight is added.
        assert latest >= max(reported, default=before), (trial, latest, reported)
        assert latest <= max(reported, default=before) + 1, (trial, latest, reported)
        _assert_is_step(zarrckpt.load_pytree(str(root)), latest)
        killed_mid_save += bool(_step_dirs(root) - _committed_dirs(root))  # debris left behind
        # The next save succeeds and leaves nothing but its own step.
        zarrckpt.save_pytree(str(root), make_state(latest + 1), step=latest + 1, verbose=False)
        assert len(_committed_dirs(root)) == 1
        assert _committed_dirs(root) <= _step_dirs(root)
        # Nothing else is left, but for one case the protocol keeps by design: a kill between
        # creating a ``.tmp-`` directory and taking its lease (one mkdir apart) leaves an empty
        # directory no collector can tell from a live writer's for 60 s (then it is debris).
        for name in _step_dirs(root) - _committed_dirs(root):
            assert name.startswith(".tmp-") and not any((root / name).iterdir()), name
        assert not list(root.glob("*.partial"))
        _assert_is_step(zarrckpt.load_pytree(str(root)), latest + 1)
    # Most kills must land while a step was being written, or the test proves little.
    print("kills that landed mid-save:", killed_mid_save, "of", KILLS)
    assert killed_mid_save >= KILLS // 3, killed_mid_save


# --- S3 ------------------------------------------------------------------------------------

S3_KILLS = 4
S3_SIZE = 2 * MIB
S3_SMALL = 40
LEASE_TTL_S = 2.0  # the child's leases run out soon after it dies, so its debris is collectable

S3_CHILD = textwrap.dedent(
    """
    import json, sys, zarrckpt
    from test_crash import make_state
    root, options, size, n_small = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    make_state(0, size, n_small)
    zarrckpt.latest_step(root, storage_options=options)  # the client is up (~1 s with today's
    print("ready", flush=True)                           # packages): kills land in the loop
    while True:
        step = (zarrckpt.latest_step(root, storage_options=options) or 0) + 1
        zarrckpt.save_pytree(root, make_state(step, size, n_small), step=step,
                             storage_options=options, chunk_bytes=256 * 1024, verbose=False)
        print("committed", step, flush=True)
    """
)


def _s3_names(url: str, options: dict) -> set[str]:
    """What the bucket holds under the root now (a fresh client: s3fs caches listings)."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **options)
    return {p.rsplit("/", 1)[-1] for p in fs.ls(url[len("s3://") :], detail=False)}


@pytest.mark.slow
def test_sigkill_during_s3_saves(s3_root):
    url, options = s3_root
    kw = {"size": S3_SIZE, "n_small": S3_SMALL}
    zarrckpt.save_pytree(url, make_state(0, **kw), step=0, storage_options=options, verbose=False)
    storage = open_storage(url, options)
    rng = random.Random(99)
    killed_mid_save = 0
    for trial in range(S3_KILLS):
        before = zarrckpt.latest_step(url, storage_options=options)
        child = subprocess.Popen(
            [sys.executable, "-c", S3_CHILD, url, json.dumps(options), str(S3_SIZE),
             str(S3_SMALL)],
            stdout=subprocess.PIPE, text=True, env=child_env(ZARRCKPT_LEASE_TTL_S=str(LEASE_TTL_S)),
        )  # fmt: skip
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.3, 2.0))
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate(timeout=30)

        latest = zarrckpt.latest_step(url, storage_options=options)
        reported = _reported(out)
        assert latest >= max(reported, default=before), (trial, latest, reported)
        assert latest <= max(reported, default=before) + 1, (trial, latest, reported)
        _assert_is_step(zarrckpt.load_pytree(url, storage_options=options), latest, **kw)
        names = _s3_names(url, options) - {"zarr.json"}
        killed_mid_save += bool(names - run(read_manifest(storage)).dirs)
        # Once the dead writer's lease has run out, the next save collects its leftovers.
        time.sleep(LEASE_TTL_S + 0.5)
        zarrckpt.save_pytree(
            url, make_state(latest + 1, **kw), step=latest + 1, storage_options=options,
            verbose=False,
        )  # fmt: skip
        manifest = run(read_manifest(storage))
        assert manifest.step_numbers == [latest + 1]
        assert _s3_names(url, options) - {"zarr.json"} == manifest.dirs
        _assert_is_step(zarrckpt.load_pytree(url, storage_options=options), latest + 1, **kw)
    print("S3 kills that landed mid-save:", killed_mid_save, "of", S3_KILLS)
    assert killed_mid_save >= 1, killed_mid_save
