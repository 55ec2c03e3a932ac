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
import contextlib
import os
import threading
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["IO_THREADS", "batch_executor", "run"]

T = TypeVar("T")

#: Threads for blocking file I/O and codec work (which releases the GIL).
IO_THREADS = int(os.environ.get("ZARRCKPT_IO_THREADS", "8"))

#: Threads for batches of small files: their work is mostly Python (GIL-bound), and more
#: threads than cores only add GIL hand-offs (measured: 8 threads ~2x slower than 2).
BATCH_THREADS = int(os.environ.get("ZARRCKPT_BATCH_THREADS", str(min(4, os.cpu_count() or 1))))

#: Niceness of zarrckpt's worker threads (Linux: per thread). When a save runs in the
#: background, the training loop's threads keep priority; alone, the workers run at full speed.
WORKER_NICENESS = int(os.environ.get("ZARRCKPT_WORKER_NICENESS", "10"))

_lock = threading.Lock()
_batch_pool: ThreadPoolExecutor | None = None
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
_pid: int | None = None


def lower_priority() -> None:
    """Run this thread at ``WORKER_NICENESS`` (Linux; elsewhere a no-op)."""
    if WORKER_NICENESS and hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    lower_priority()
    loop.run_forever()


def _get_loop() -> asyncio.AbstractEventLoop:
    global _loop, _thread, _pid
    with _lock:
        if _loop is None or _pid != os.getpid():  # (re)create after fork
            loop = asyncio.new_event_loop()
            loop.set_default_executor(
                ThreadPoolExecutor(
                    max_workers=IO_THREADS,
                    thread_name_prefix="zarrckpt-io",
                    initializer=lower_priority,
                )
            )
            thread = threading.Thread(
                target=_run_loop, args=(loop,), name="zarrckpt-loop", daemon=True
            )
            thread.start()
            _loop, _thread, _pid = loop, thread, os.getpid()
        return _loop


def batch_executor() -> ThreadPoolExecutor:
    """The pool for batches of small files (see ``BATCH_THREADS``)."""
    global _batch_pool
    with _lock:
        if _batch_pool is None or _pid != os.getpid():
            _batch_pool = ThreadPoolExecutor(
                BATCH_THREADS, thread_name_prefix="zarrckpt-batch", initializer=lower_priority
            )
        return _batch_pool


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on zarrckpt's loop and block until it finishes."""
    loop = _get_loop()
    if threading.current_thread() is _thread:
        coro.close()
        raise RuntimeError(
            "zarrckpt's blocking API was called from its own event loop thread; "
            "await the async core instead"
        )
    return asyncio.run_coroutine_threadsafe(coro, loop).result()
