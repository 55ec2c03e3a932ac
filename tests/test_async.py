"""Background saves: snapshot at call time, one at a time, errors surfaced."""

import json
import os
import subprocess
import sys
import threading

import jax.numpy as jnp
import numpy as np
import pytest

import zarrckpt
from zarrckpt import AsyncManager


def test_values_are_those_at_call_time(url):
    state = {"w": np.zeros(1000), "j": jnp.zeros(3), "step": 0}
    with AsyncManager() as manager:
        for i in range(1, 4):
            state["w"][:] = i  # mutate in place right after each save returns
            zarrckpt.save_pytree(url, state, async_manager=manager, keep=None, verbose=False)
            state["w"][:] = -1
            state["j"] = state["j"] + 1
    steps = zarrckpt.list_steps(url)
    assert steps == [0, 1, 2]
    for s in steps:
        out = zarrckpt.load_pytree(url, step=s)
        assert set(np.unique(out["w"])) == {s + 1}
        np.testing.assert_array_equal(out["j"], np.full(3, s, np.float32))


def test_errors_surface_on_wait_and_close(url, monkeypatch):
    import zarrckpt._write as api

    async def boom(*args, **kwargs):
        raise OSError("disk on fire")

    manager = AsyncManager()
    monkeypatch.setattr(api, "write_step", boom)
    zarrckpt.save_pytree(url, {"w": np.ones(2)}, async_manager=manager, verbose=False)
    with pytest.raises(OSError, match="disk on fire"):
        manager.wait_previous_save()
    zarrckpt.save_pytree(url, {"w": np.ones(2)}, async_manager=manager, verbose=False)
    with pytest.raises(OSError, match="disk on fire"):
        manager.close()
    assert zarrckpt.list_steps(url) == []
    with pytest.raises(RuntimeError, match="closed"):
        manager.save_async(lambda: None)


def test_a_save_waits_for_the_previous_one(url, monkeypatch):
    import zarrckpt._write as api

    release = threading.Event()
    original = api.write_step
    calls = []

    async def slow(*args, **kwargs):
        calls.append("start")
        if len(calls) == 1:
            import asyncio

            while not release.is_set():
                await asyncio.sleep(0.01)
        await original(*args, **kwargs)

    monkeypatch.setattr(api, "write_step", slow)
    with AsyncManager() as manager:
        zarrckpt.save_pytree(url, {"w": 1}, async_manager=manager, keep=None, verbose=False)
        timer = threading.Timer(0.2, release.set)
        timer.start()
        zarrckpt.save_pytree(url, {"w": 2}, async_manager=manager, keep=None, verbose=False)
        assert release.is_set(), "the second save started before the first committed"
        assert zarrckpt.list_steps(url) == [0]  # it also saw step 0 to pick step 1
    assert zarrckpt.list_steps(url) == [0, 1]


def test_overwrite_check_is_synchronous(url):
    with AsyncManager() as manager:
        zarrckpt.save_pytree(url, {"w": 1}, step=3, async_manager=manager, verbose=False)
        with pytest.raises(zarrckpt.AlreadyExistsError):
            zarrckpt.save_pytree(
                url, {"w": 1}, step=3, overwrite=False, async_manager=manager, verbose=False
            )


# A script whose one background save is still running when it exits: its ``write_step`` waits
# 1.5 s first, then writes through zarrckpt's I/O pools, which Python stops at exit.
EXIT_SCRIPT = """
import asyncio, sys
import numpy as np
import zarrckpt, zarrckpt._write as write

original = write.write_step

async def slow(*args, **kwargs):
    await asyncio.sleep(1.5)
    if sys.argv[2] == "fail":
        raise OSError("disk on fire")
    await original(*args, **kwargs)

write.write_step = slow
m = zarrckpt.AsyncManager()
zarrckpt.save_pytree(sys.argv[1], {"w": np.arange(100_000.0)}, async_manager=m, verbose=False)
if sys.argv[2] == "exit":
    sys.exit(0)
if sys.argv[2] == "raise":
    raise ValueError("uncaught")
if sys.argv[2] == "del":
    del m
    import gc
    gc.collect()
"""


def _run_script(root, how):
    return subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(root), how],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("how", ["end", "exit", "raise", "del"])
def test_a_save_running_at_exit_is_finished(tmp_path, how):
    root = tmp_path / "ckpt"
    done = _run_script(root, how)
    assert done.returncode == (1 if how == "raise" else 0), done.stderr
    assert "zarrckpt: waiting for the background save of step 0 to finish...\n" in done.stderr
    assert zarrckpt.list_steps(root) == [0]
    np.testing.assert_array_equal(zarrckpt.load_pytree(root)["w"], np.arange(100_000.0))
    manifest = json.loads((root / "zarr.json").read_text())
    committed = {s["dir"] for s in manifest["attributes"]["zarrckpt"]["steps"]}
    debris = {p.name for p in root.iterdir() if p.name.startswith(("step_", ".tmp-"))}
    assert debris == committed


def test_a_save_failing_at_exit_is_reported(tmp_path):
    root = tmp_path / "ckpt"
    done = _run_script(root, "fail")
    assert done.returncode == 0, done.stderr
    assert f"zarrckpt: the background save of step 0 to {root} failed: " in done.stderr
    assert "disk on fire" in done.stderr
    assert zarrckpt.list_steps(root) == []


# Saves from an ``atexit`` handler, in a process that saved before (so zarrckpt's pools ran
# and Python's exit stopped them before the handler ran): foreground, background, and a load;
# or ("fail") a background save whose write fails.
ATEXIT_SCRIPT = """
import atexit, sys
import numpy as np
import zarrckpt, zarrckpt._write as write

root, how, manager = sys.argv[1], sys.argv[2], zarrckpt.AsyncManager()

async def broken(*args, **kwargs):
    raise OSError("disk on fire")

def on_exit():
    if how == "fail":
        write.write_step = broken
        try:
            zarrckpt.save_pytree(root, {"w": np.arange(9.0)}, verbose=False, async_manager=manager)
        except OSError as exc:
            print("raised:", exc)
        return
    zarrckpt.save_pytree(root, {"w": np.arange(10.0)}, verbose=False)
    zarrckpt.save_pytree(root, {"w": np.arange(20.0)}, verbose=False, async_manager=manager)
    manager.wait_previous_save()
    print(zarrckpt.load_pytree(root)["w"].sum())

atexit.register(on_exit)
zarrckpt.save_pytree(root, {"w": np.arange(5.0)}, verbose=False, async_manager=manager)
manager.wait_previous_save()
"""


@pytest.mark.parametrize(
    ("how", "printed", "steps", "latest"),
    [("saves", ["190.0"], [2], np.arange(20.0)),  # the last save's, loaded in the handler
     # (the hook that reports unseen failures at exit has run by then: nobody else would)
     ("fail", ["raised: disk on fire"], [0], np.arange(5.0))],
)  # fmt: skip
def test_saves_and_loads_work_in_atexit_handlers(tmp_path, how, printed, steps, latest):
    root = tmp_path / "ckpt"
    done = subprocess.run(
        [sys.executable, "-c", ATEXIT_SCRIPT, str(root), how],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == printed
    assert zarrckpt.list_steps(root) == steps
    np.testing.assert_array_equal(zarrckpt.load_pytree(root)["w"], latest)


def test_pools_run_work_in_the_caller_once_python_exit_stopped_them(monkeypatch):
    import concurrent.futures.thread
    import threading

    from zarrckpt._sync import ThreadPool

    pool = ThreadPool(1)
    assert pool.submit(threading.current_thread).result() is not threading.current_thread()
    monkeypatch.setattr(concurrent.futures.thread, "_shutdown", True)  # what Python's exit sets
    assert pool.submit(threading.current_thread).result() is threading.current_thread()
    failed = pool.submit(int, "x")  # an Exception goes into the future, as in a pool
    assert isinstance(failed.exception(), ValueError)

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # the caller's Ctrl-C is never parked in a future
        pool.submit(interrupted)
    monkeypatch.undo()
    pool.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):  # a pool its owner shut refuses
        pool.submit(int, "1")


def test_an_unseen_failure_is_reported_at_exit(tmp_path):
    script = (
        "import time, zarrckpt\n"
        "def boom():\n"
        "    raise OSError('disk on fire')\n"
        "m = zarrckpt.AsyncManager()\n"
        "m.save_async(boom)\n"
        "time.sleep(0.2)\n"  # it failed, and nobody asked
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0
    assert "zarrckpt: the background save failed: OSError: disk on fire" in done.stderr


def test_a_save_after_a_failed_one_says_it_saved_nothing():
    def boom():
        raise OSError("disk on fire")

    ran = []
    with AsyncManager() as manager:
        manager.save_async(boom, step=3, url="file:///runs/a")
        with pytest.raises(zarrckpt.BackgroundSaveError) as info:
            manager.save_async(lambda: ran.append(4), step=4, url="file:///runs/a")
        assert str(info.value) == (
            "the background save of step 3 to file:///runs/a failed: OSError: disk on fire; "
            "this call saved nothing: call save_pytree again"
        )
        assert isinstance(info.value.__cause__, OSError)
        assert ran == []
        # the failure has been raised: the next save starts afresh
        manager.save_async(lambda: ran.append(5), step=5, url="file:///runs/a")
    assert ran == [5]


def test_save_pytree_after_a_failed_save_saves_nothing_and_says_so(url, monkeypatch):
    import zarrckpt._write as api

    original = api.write_step
    calls = []

    async def fails_once(*args, **kwargs):
        calls.append(None)
        if len(calls) == 1:
            raise OSError("disk on fire")
        await original(*args, **kwargs)

    monkeypatch.setattr(api, "write_step", fails_once)
    with AsyncManager() as manager:
        zarrckpt.save_pytree(url, {"w": 1}, async_manager=manager, verbose=False)
        with pytest.raises(zarrckpt.BackgroundSaveError) as info:
            zarrckpt.save_pytree(url, {"w": 2}, async_manager=manager, verbose=False)
        assert str(info.value).startswith("the background save of step 0 to ")
        assert str(info.value).endswith("; this call saved nothing: call save_pytree again")
        assert "disk on fire" in str(info.value)
        assert isinstance(info.value.__cause__, OSError)
        assert zarrckpt.list_steps(url) == []
        zarrckpt.save_pytree(url, {"w": 3}, async_manager=manager, verbose=False)
    assert zarrckpt.list_steps(url) == [0]
    assert zarrckpt.load_pytree(url)["w"] == 3


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_wait_for_its_parents_save(tmp_path):
    """A child forked while the parent's manager had a save running may save and close
    with that manager without waiting forever for a thread it does not have."""
    script = f"""
import os, sys, time, warnings
import numpy as np
import zarrckpt
warnings.simplefilter("ignore")  # JAX's fork warning
m = zarrckpt.AsyncManager()
zarrckpt.save_pytree({str(tmp_path / "parent")!r}, {{"a": np.zeros(50_000_000, np.uint8)}},
                     async_manager=m, verbose=False)
pid = os.fork()
if pid == 0:
    zarrckpt.save_pytree({str(tmp_path / "child")!r}, {{"b": np.arange(3)}}, async_manager=m,
                         verbose=False)
    m.close()
    os._exit(0)
_, status = os.waitpid(pid, 0)
m.close()
sys.exit(os.waitstatus_to_exitcode(status))
"""
    done = subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert zarrckpt.load_pytree(str(tmp_path / "child"))["b"].tolist() == [0, 1, 2]
    assert zarrckpt.list_steps(str(tmp_path / "parent")) == [0]


def test_the_collector_is_paused_only_while_the_caller_waits(tmp_path, monkeypatch):
    """A foreground save into a local directory pauses the cyclic garbage collector and
    restores it (also after an error); a background save's writing, and a save to an object
    store, run with it on; a collector the user disabled stays disabled."""
    import gc

    import zarrckpt._write as api

    seen = []
    write_step = api.write_step

    async def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return await write_step(*args, **kwargs)

    monkeypatch.setattr(api, "write_step", spy)
    root = str(tmp_path / "run")
    assert gc.isenabled()
    zarrckpt.save_pytree(root, {"w": np.zeros(10)}, verbose=False)
    assert seen == [False] and gc.isenabled()
    with pytest.raises(zarrckpt.AlreadyExistsError):
        zarrckpt.save_pytree(root, {"w": np.zeros(10)}, overwrite=False, verbose=False)
    assert gc.isenabled()
    with AsyncManager() as manager:
        zarrckpt.save_pytree(root, {"w": np.ones(10)}, async_manager=manager, verbose=False)
    assert seen == [False, True] and gc.isenabled()
    zarrckpt.save_pytree(f"memory://{tmp_path.name}/run", {"w": np.zeros(10)}, verbose=False)
    assert seen == [False, True, True] and gc.isenabled()
    gc.disable()
    try:
        zarrckpt.save_pytree(root, {"w": np.zeros(10)}, verbose=False)
        assert seen == [False, True, True, False] and not gc.isenabled()
    finally:
        gc.enable()


def test_a_child_forked_during_a_save_has_its_collector(tmp_path, monkeypatch):
    """A process forked by another thread while a save pauses the collector does not inherit
    the pause: its collector runs, and its own saves pause and restore it."""
    import gc
    import warnings

    import zarrckpt._write as api

    status = []
    write_step = api.write_step

    async def fork_here(*args, **kwargs):
        with warnings.catch_warnings():  # (3.12+: forking a process with threads)
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: report, never return into the save
            ok = gc.isenabled()
            try:
                monkeypatch.setattr(api, "write_step", write_step)
                zarrckpt.save_pytree(str(tmp_path / "child"), {"w": np.ones(3)}, verbose=False)
                ok = ok and gc.isenabled()
            finally:
                os._exit(0 if ok else 1)
        status.append(os.waitpid(pid, 0)[1])
        return await write_step(*args, **kwargs)

    monkeypatch.setattr(api, "write_step", fork_here)
    zarrckpt.save_pytree(str(tmp_path / "run"), {"w": np.zeros(3)}, verbose=False)
    assert status == [0] and gc.isenabled()
    assert zarrckpt.list_steps(str(tmp_path / "child")) == [0]
