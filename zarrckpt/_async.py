"""Background saves.

``save_pytree(..., async_manager=m)`` snapshots the target on the calling thread (numpy
buffers are copied; JAX arrays are immutable, so holding them is already a snapshot) and
hands writing and committing to ``m``. The call returns once the snapshot is taken. A
new save first waits for the previous one, so the overwrite and ``keep`` logic always sees
committed state; errors of a background save are raised by :meth:`wait_previous_save`,
:meth:`close` or the next save, never swallowed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ._sync import lower_priority

__all__ = ["AsyncManager"]


class AsyncManager:
    """Runs one checkpoint save at a time in the background (API of braintools' manager)."""

    def __init__(self, max_workers: int = 1) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers, thread_name_prefix="zarrckpt-save", initializer=lower_priority
        )
        self._future: Future[Any] | None = None
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> AsyncManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_previous_save(self) -> None:
        """Block until the previous save has committed; re-raise its error, if any."""
        with self._lock:
            future, self._future = self._future, None
        if future is not None:
            future.result()

    def save_async(self, task: Callable[[], Any]) -> Future[Any]:
        """Run ``task`` in the background after the previous save has finished."""
        if self._closed:
            raise RuntimeError("this AsyncManager is closed")
        self.wait_previous_save()
        with self._lock:
            self._future = self._executor.submit(task)
            return self._future

    def close(self) -> None:
        """Wait for the pending save (raising its error) and stop the worker thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait_previous_save()
        finally:
            self._executor.shutdown(wait=True)
