"""Crash safety: a saver SIGKILLed at random moments never damages the committed step."""

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

MIB = 1024 * 1024
SIZE = 96 * MIB  # per big array; 3 of them + small leaves ~ 300 MB a step

CHILD = textwrap.dedent(
    """
    import sys, numpy as np, zarrckpt
    sys.path.insert(0, {tests!r})
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


@functools.cache
def _base() -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    return tuple(np.frombuffer(rng.bytes(SIZE), dtype=np.float32) for _ in range(3))


def make_state(step: int) -> dict:
    big = [a.copy() for a in _base()]
    for a in big:
        a[::4096] = step  # every chunk depends on the step
    small = {f"n{i}": np.full(256, step * 1000 + i, dtype=np.int32) for i in range(200)}
    return {"big": big, "small": small, "step": step}


def _assert_is_step(tree: dict, step: int) -> None:
    expected = make_state(step)
    assert tree["step"] == step
    for got, want in zip(tree["big"], expected["big"], strict=True):
        assert got.tobytes() == want.tobytes()
    for key, want in expected["small"].items():
        assert np.array_equal(tree["small"][key], want)


def _step_dirs(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.name.startswith("step_")}


def _committed_dirs(root: Path) -> set[str]:
    manifest = json.loads((root / "zarr.json").read_text())
    return {s["dir"] for s in manifest["attributes"]["zarrckpt"]["steps"]}


@pytest.mark.slow
def test_sigkill_during_saves(tmp_path):
    root = tmp_path / "ckpt"
    zarrckpt.save_pytree(str(root), make_state(0), step=0, verbose=False)
    rng = random.Random(1234)
    script = CHILD.format(tests=str(Path(__file__).parent))
    killed_mid_save = 0
    for trial in range(10):
        child = subprocess.Popen(
            [sys.executable, "-c", script, str(root)], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 2.0))
        os.kill(child.pid, signal.SIGKILL)
        child.communicate(timeout=30)

        latest = zarrckpt.latest_step(str(root))
        assert latest is not None, f"trial {trial}: no committed step after the kill"
        _assert_is_step(zarrckpt.load_pytree(str(root)), latest)
        killed_mid_save += bool(_step_dirs(root) - _committed_dirs(root))  # debris left behind
        # The next save succeeds and leaves nothing but its own step.
        zarrckpt.save_pytree(str(root), make_state(latest + 1), step=latest + 1, verbose=False)
        assert _step_dirs(root) == _committed_dirs(root) and len(_committed_dirs(root)) == 1
        assert not list(root.glob("*.partial"))
        _assert_is_step(zarrckpt.load_pytree(str(root)), latest + 1)
    # Most kills must land while a step was being written, or the test proves little.
    print("kills that landed mid-save:", killed_mid_save)
    assert killed_mid_save >= 3, killed_mid_save
