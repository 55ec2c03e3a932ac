"""Background saves.

``save_pytree(..., async_manager=m)`` snapshots the target on the calling thread (numpy
buffers are copied; JAX arrays are immutable, so holding them is already a snapshot) and
hands writing and committing to ``m``. The call returns once the snapshot is taken. A
new save first waits for the previous one, so the overwrite and ``keep`` logic always sees
committed state; errors of a background save are raised by :meth:`wait_previous_save`,
:meth:`close` or the next save, never swallowed.

A save after a failed one is not made: it raises :class:`BackgroundSaveError`, which names
the failed step and its error (also its ``__cause__``) and says that this call saved nothing
either. The failure has to be raised somewhere, and a call that raises should not also have
saved; the caller calls ``save_pytree`` again.

At interpreter exit (the script ends, ``sys.exit``, an uncaught exception) a save still
running is finished, also when its manager was dropped without :meth:`close`: the exit
waits for it, saying so on stderr after a second, and prints its error if it fails, like
the error of any failed save that was never raised. This runs before Python stops the
thread pools that zarrckpt's I/O runs on (see :func:`_finish_at_exit`).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import Any

from ._sync import ThreadPool, interpreter_exiting, lower_priority
from .errors import BackgroundSaveError

__all__ = ["AsyncManager"]

#: How long the exit waits for a background save before saying that it does.
_NOTICE_AFTER_S = 1.0

#: How often a blocked caller looks for signals (Ctrl-C), as in ``_sync.run``.
_SLICE_S = 0.1


def _finished(future: Future[Any], timeout: float = math.inf) -> bool:
    """Wait up to ``timeout`` seconds for ``future``; whether it is done.

    In slices: the kernel may deliver SIGINT to any of the process's threads, and the main
    thread runs the handler (raising KeyboardInterrupt) only between waits.
    """
    end = time.monotonic() + timeout
    while not future.done() and time.monotonic() < end:
        wait([future], timeout=min(_SLICE_S, end - time.monotonic()))
    return future.done()


class _Save:
    """One background save: its future, and the step and root that messages name."""

    def __init__(self, future: Future[Any], step: int | None, url: str | None) -> None:
        self.future = future
        self.step = step
        self.url = url

    def name(self, url: bool = True) -> str:
        text = "the background save"
        if self.step is not None:
            text += f" of step {self.step}"
        if url and self.url is not None:
            text += f" to {self.url}"
        return text

    def failure(self) -> str:
        """``"<name> failed: <Type>: <error>"``; only once the save failed."""
        error = self.future.exception(timeout=0)
        return f"{self.name()} failed: {type(error).__name__}: {error}"


# Saves whose outcome nobody has seen: running, or failed with the error not yet raised.
# Held here, not by their manager, so that dropping a manager does not drop its save.
_unseen: dict[_Save, None] = {}
_unseen_lock = threading.Lock()


def _track(save: _Save) -> None:
    with _unseen_lock:
        _unseen[save] = None

    def done(future: Future[Any]) -> None:
        if not future.cancelled() and future.exception() is None:
            _seen(save)

    save.future.add_done_callback(done)


def _seen(save: _Save) -> None:
    with _unseen_lock:
        _unseen.pop(save, None)


def _finish_at_exit() -> None:
    """Wait for the saves still running at exit; print the failures nobody saw.

    Python's exit first calls the hooks of ``threading._register_atexit`` (latest first),
    then joins the non-daemon threads, then calls ``atexit``'s. ``concurrent.futures``
    registers such a hook when it is imported, and that hook stops every thread pool: from
    then on the I/O of a save fails ("cannot schedule new futures after shutdown"), so
    ``atexit`` would be too late, and the private ``threading._register_atexit`` is the only
    way in. This module imports ``concurrent.futures`` before it registers this hook, which
    therefore runs first, with the pools still working.
    """
    with _unseen_lock:
        saves = list(_unseen)
        _unseen.clear()
    try:
        for save in saves:
            if not _finished(save.future, _NOTICE_AFTER_S):
                print(
                    f"zarrckpt: waiting for {save.name(url=False)} to finish...",
                    file=sys.stderr,
                    flush=True,
                )
                _finished(save.future)
            if not save.future.cancelled() and save.future.exception() is not None:
                print(f"zarrckpt: {save.failure()}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:  # once the pools stop, the save fails at its next I/O
        print("zarrckpt: interrupted; not waiting for the background save", file=sys.stderr)


# private CPython API (3.9+), absent from typeshed's threading stub
threading._register_atexit(_finish_at_exit)  # type: ignore[attr-defined]


def _forget_after_fork() -> None:
    """A forked child has none of the parent's save threads: it must not wait for them."""
    global _unseen_lock
    _unseen.clear()
    _unseen_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


class AsyncManager:
    """Runs one checkpoint save at a time in the background (API of braintools' manager).

    A save still running at interpreter exit is finished first; one whose manager was
    dropped without :meth:`close` too.
    """

    def __init__(self, max_workers: int = 1) -> None:
        self._executor = ThreadPool(
            max_workers, thread_name_prefix="zarrckpt-save", initializer=lower_priority
        )
        self._save: _Save | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self._max_workers = max_workers

    def __enter__(self) -> AsyncManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take_previous(self) -> _Save | None:
        """Wait until the previous save has finished, and take it off this manager."""
        if self._pid != os.getpid():  # a forked child: the parent's save is not ours to await
            self._pid, self._save, self._lock = os.getpid(), None, threading.Lock()
            self._executor = ThreadPool(
                self._max_workers, thread_name_prefix="zarrckpt-save", initializer=lower_priority
            )
        save = self._save
        if save is None:
            return None
        _finished(save.future)  # interrupted (Ctrl-C), the save stays the previous one
        with self._lock:
            if self._save is save:
                self._save = None
        _seen(save)
        return save

    def wait_previous_save(self) -> None:
        """Block until the previous save has committed; re-raise its error, if any."""
        save = self._take_previous()
        if save is not None:
            save.future.result()

    def wait_before_save(self) -> None:
        """Like :meth:`wait_previous_save`, for a call about to save: it raises the previous
        save's error as :class:`BackgroundSaveError`, which says the new save was not made."""
        save = self._take_previous()
        if save is not None and not save.future.cancelled():
            error = save.future.exception()
            if error is not None:
                raise BackgroundSaveError(
                    f"{save.failure()}; this call saved nothing: call save_pytree again"
                ) from error

    def save_async(
        self, task: Callable[[], Any], *, step: int | None = None, url: str | None = None
    ) -> Future[Any]:
        """Run ``task`` (the save of ``step`` to ``url``, which messages name) in the
        background once the previous save has finished; if that one failed, raise
        :class:`BackgroundSaveError` and do not run ``task``."""
        self.wait_before_save()
        with self._lock:  # (close() sets it under the lock: no save slips past a close)
            if self._closed:
                raise RuntimeError("this AsyncManager is closed")
            save = _Save(self._executor.submit(task), step, url)
            self._save = save
        if save.future.done() and interpreter_exiting():
            # Run in this thread (an atexit handler: see ThreadPool), after the hook that
            # reports failures at exit: its failure is this call's, as a foreground save's.
            with self._lock:
                if self._save is save:
                    self._save = None
            save.future.result()
            return save.future
        _track(save)
        return save.future

    def close(self) -> None:
        """Wait for the pending save (raising its error) and stop the worker thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.wait_previous_save()
        finally:
            self._executor.shutdown(wait=True)
