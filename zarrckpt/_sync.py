"""The one place that blocks on coroutines.

zarrckpt's core is async (one event loop issues many reads and writes at once). The
blocking API runs coroutines on a private loop in a daemon thread, so it works the same
from scripts, from threads, and from Jupyter (whose own loop is already running in the
main thread). Calling the blocking API from inside that private loop would deadlock and
raises instead. fsspec's async filesystems belong to the loop they were created on; every
store zarrckpt opens is only ever used on this loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures.thread
import contextlib
import os
import threading
from collections.abc import Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = [
    "IO_THREADS", "ThreadPool", "batch_executor", "hash_executor", "interpreter_exiting",
    "io_executor", "lower_priority", "run",
]  # fmt: skip

T = TypeVar("T")

#: Threads for blocking file I/O and codec work (which releases the GIL).
IO_THREADS = int(os.environ.get("ZARRCKPT_IO_THREADS", "8"))

#: Threads for batches of small files: their work is mostly Python (GIL-bound), and more
#: threads than cores only add GIL hand-offs (measured: 8 threads ~2x slower than 2).
BATCH_THREADS = int(os.environ.get("ZARRCKPT_BATCH_THREADS", str(min(4, os.cpu_count() or 1))))

#: Threads that hash large leaves and batches of small ones for a save (``_write``): half
#: the cores, 2 to 8. Hashing is bound by memory bandwidth (on a 2-core VM, 2 threads hash
#: 1 GiB no faster than 1, in 35 ms); a server's one core reaches a fraction of its
#: bandwidth, hence more there (not measured here). A pool of its own keeps hashing from
#: queueing ahead of the I/O pool's reads and writes.
HASH_THREADS = int(
    os.environ.get("ZARRCKPT_HASH_THREADS", str(min(8, max(2, (os.cpu_count() or 1) // 2))))
)

#: Niceness of zarrckpt's worker threads (Linux: per thread). When a save runs in the
#: background, the training loop's threads keep priority; alone, the workers run at full speed.
WORKER_NICENESS = int(os.environ.get("ZARRCKPT_WORKER_NICENESS", "10"))

#: How often a blocked caller looks for signals (Ctrl-C) while zarrckpt's loop works.
_SLICE_S = 0.1

_lock = threading.Lock()
#: pools made on first use, by name (``_pool``)
_pools: dict[str, ThreadPoolExecutor] = {}
_io_pool: ThreadPoolExecutor | None = None
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def interpreter_exiting() -> bool:
    """Whether Python's exit has stopped every thread pool (``concurrent.futures``' own flag,
    set by its exit hook, which runs before ``atexit`` handlers: ``_async._finish_at_exit``)."""
    return bool(getattr(concurrent.futures.thread, "_shutdown", False))


class ThreadPool(ThreadPoolExecutor):
    """A thread pool whose work runs in the caller's thread once Python's exit has stopped
    every pool, so that a save or a load from an ``atexit`` handler still works, if more
    slowly (a background save then finishes before its call returns). Decided before the
    work is queued, so it never runs twice; an ``Exception`` goes into the future, as in a
    pool, while ``KeyboardInterrupt`` and other exits reach the caller at once."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        if not interpreter_exiting():
            return super().submit(fn, *args, **kwargs)
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)
        return future


def _forget_after_fork() -> None:
    """In a forked child the parent's loop thread and pools do not exist: start afresh.

    (The parent's objects are dropped, not shut down: their threads are gone, and a lock
    held by one of them at fork time would never be released.)
    """
    global _lock, _pools, _io_pool, _loop, _thread
    _lock = threading.Lock()
    _pools = {}
    _io_pool = _loop = _thread = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def lower_priority() -> None:
    """Run this thread at ``WORKER_NICENESS`` (Linux; elsewhere a no-op)."""
    if WORKER_NICENESS and hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    lower_priority()
    loop.run_forever()


def _get_loop() -> asyncio.AbstractEventLoop:
    global _loop, _thread, _io_pool
    with _lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            _io_pool = ThreadPool(
                max_workers=IO_THREADS, thread_name_prefix="zarrckpt-io", initializer=lower_priority
            )
            loop.set_default_executor(_io_pool)
            thread = threading.Thread(
                target=_run_loop, args=(loop,), name="zarrckpt-loop", daemon=True
            )
            thread.start()
            _loop, _thread = loop, thread
        return _loop


def io_executor() -> ThreadPoolExecutor:
    """The pool of the loop's blocking work (file I/O, codecs, hashing: see ``IO_THREADS``)."""
    _get_loop()
    assert _io_pool is not None
    return _io_pool


def _pool(name: str, threads: int) -> ThreadPoolExecutor:
    """The pool ``name`` of ``threads`` threads, made on first use."""
    with _lock:
        pool = _pools.get(name)
        if pool is None:
            pool = _pools[name] = ThreadPool(
                threads, thread_name_prefix=f"zarrckpt-{name}", initializer=lower_priority
            )
        return pool


def batch_executor() -> ThreadPoolExecutor:
    """The pool for batches of small files (see ``BATCH_THREADS``)."""
    return _pool("batch", BATCH_THREADS)


def hash_executor() -> ThreadPoolExecutor:
    """The pool that hashes leaves for a save's record (see ``HASH_THREADS``)."""
    return _pool("hash", HASH_THREADS)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on zarrckpt's loop and block until it finishes.

    If the caller is interrupted (Ctrl-C) or otherwise leaves early, the coroutine is
    cancelled and this waits until it has unwound, so that nothing it would have done
    (such as publishing a manifest) happens after the caller saw the interrupt. Pending
    I/O jobs are cancelled with it; a system call already running (one ``syncfs``, one
    file write) finishes in its thread.
    """
    loop = _get_loop()
    if threading.current_thread() is _thread:
        coro.close()
        raise RuntimeError(
            "zarrckpt's blocking API was called from its own event loop thread; "
            "await the async core instead"
        )
    task: list[asyncio.Task[Any]] = []
    interrupted = False

    async def wrapper() -> T:
        if interrupted:  # cancelled before it began
            coro.close()
            raise asyncio.CancelledError
        current = asyncio.current_task()
        assert current is not None  # a coroutine run by the loop runs in a task
        task.append(current)
        del current  # this frame must not hold its own task: a cycle keeps a failure's data
        return await coro

    def cancel() -> None:  # on the loop thread, so it cannot race ``wrapper``'s start
        nonlocal interrupted
        interrupted = True
        if task:
            task[0].cancel()

    future = asyncio.run_coroutine_threadsafe(wrapper(), loop)
    try:
        while True:
            # Wait in slices: the kernel may deliver SIGINT to any of the process's threads
            # (an I/O worker, say), and then a single long wait here would not be interrupted;
            # between slices the main thread runs pending signal handlers.
            try:
                return future.result(timeout=_SLICE_S)
            except TimeoutError:
                if future.done():
                    raise  # the coroutine's own TimeoutError
    except BaseException:
        if not future.done():
            loop.call_soon_threadsafe(cancel)
            with contextlib.suppress(BaseException):  # a second Ctrl-C abandons the wait
                future.result()  # until the coroutine has unwound
        raise
    finally:
        # The error's traceback holds this frame, whose future and task hold the error: a
        # cycle that would keep everything the failed coroutine's frames held (a document
        # read whole, say) until the garbage collector's next full pass. Break it.
        if future.done():  # (else ``cancel`` may still need the task)
            task.clear()
        del future
