"""Background saves: snapshot at call time, one at a time, errors surfaced."""

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
