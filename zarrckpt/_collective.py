"""Collective saves: every process of a multi-process JAX program writes one step together.

When ``jax.distributed`` runs several processes, ``save_pytree`` called by every process
is one save: each writes the chunks of the shards it holds (``_sharding``) and process 0
commits, by the protocol of ``_commit``, once all are done. The processes agree through
the key-value store of JAX's coordination service (``jax.distributed``'s own, no other
cluster layer), never through device collectives, which would interleave with the
training step's when an :class:`~zarrckpt.AsyncManager` saves in a background thread.

The keys of the ``n``-th collective save of the job sit under ``zarrckpt/save/<n>/``; every
process counts its saves, and the counts agree because every process makes the same calls:

1. ``tree/<p>``: process ``p``'s tree record checksum (paths, kinds, shapes, dtypes, chunks,
   shardings); process 0 refuses trees that differ.
2. ``decision``: process 0 reads the manifest and decides the step number, its directory
   and time, or the error every process raises (``overwrite=False`` on a committed step,
   different trees). The others wait for it at most ``ZARRCKPT_COLLECTIVE_TIMEOUT_S``
   (default 300 s): a process that never makes the call (a mismatched program) is an
   error, not a hang.
3. ``begun``: process 0 holds the lease on the step directory (``_commit`` step 1); the
   others start writing.
4. ``done/<p>``: process ``p`` wrote its chunks and made them durable, or failed (its error).
   Process 0 writes the metadata and its own chunks, waits for every ``done``, then writes
   the step record and publishes: the commit stays one atomic manifest update.
5. ``commit``: the manifest is published (or the save failed: why); every process returns,
   or raises.

Waits for work (3-5) have no time limit: a process that dies makes JAX's heartbeat end
every process of the job (``heartbeat_timeout_seconds`` of ``jax.distributed.initialize``),
and the directory it leaves is debris that the next save collects. Every wait is cut into
short slices, so Ctrl-C is seen.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import google_crc32c

from . import errors
from ._commit import commit_step
from ._manifest import Manifest, StepInfo
from ._storage import Storage
from ._sync import run
from .errors import CollectiveError, ZarrCkptError

__all__ = ["Group", "group"]

#: how long a process waits for the others to arrive at a collective save
DEFAULT_TIMEOUT_S = 300.0
_SLICE_MS = 500

_saves = itertools.count()


def _timeout_s() -> float:
    raw = os.environ.get("ZARRCKPT_COLLECTIVE_TIMEOUT_S")
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"ZARRCKPT_COLLECTIVE_TIMEOUT_S must be a positive number, got {raw!r}")
    return value


def group() -> Group | None:
    """The collective of this process's JAX job, or None in a single-process program.

    Looks only at the state ``jax.distributed.initialize`` left: it neither imports JAX nor
    starts its backends.
    """
    if "jax" not in sys.modules:
        return None
    from jax._src import distributed  # the client orbax's multi-host code uses, too

    state = distributed.global_state
    if state.client is None or not state.num_processes or state.num_processes < 2:
        return None
    return Group(state.client, state.process_id, state.num_processes)


def _error_doc(exc: BaseException) -> dict[str, Any]:
    return {"error": type(exc).__name__, "message": str(exc) or type(exc).__name__}


class Group:
    """One collective save's view of the job: this process, the others, and their keys."""

    def __init__(self, client: Any, process: int, count: int) -> None:
        self.client, self.process, self.count = client, process, count
        self.number = next(_saves)
        self.timeout_s = _timeout_s()
        self._posted: set[str] = set()

    @property
    def leader(self) -> bool:
        return self.process == 0

    def _key(self, name: str, number: int | None = None) -> str:
        return f"zarrckpt/save/{self.number if number is None else number}/{name}"

    def post(self, name: str, doc: dict[str, Any]) -> None:
        if name not in self._posted:  # the first word stands: a failure after it is reported
            self._posted.add(name)  # elsewhere (``commit``), never by overwriting
            self.client.key_value_set(self._key(name), json.dumps(doc))

    def wait(self, name: str, what: str, timeout_s: float | None) -> dict[str, Any]:
        """The document posted under ``name``; ``what`` names the waited-for for errors.
        Raises the error it carries (same class on every process where it is zarrckpt's)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                raw = self.client.blocking_key_value_get(self._key(name), _SLICE_MS)
                break
            except Exception as exc:  # the client raises JaxRuntimeError for everything
                if "DEADLINE_EXCEEDED" not in str(exc):
                    raise CollectiveError(
                        f"collective save {self.number}: the coordination service failed "
                        f"while waiting for {what} ({exc})"
                    ) from None
                if deadline is not None and time.monotonic() > deadline:
                    raise CollectiveError(
                        f"collective save {self.number}: {what} did not arrive within "
                        f"{timeout_s:g} s (ZARRCKPT_COLLECTIVE_TIMEOUT_S). Every process of the "
                        "job must call save_pytree with the same arguments in the same order"
                    ) from None
        doc = json.loads(raw)
        if "error" in doc:
            cls = getattr(errors, doc["error"], None)
            if not (isinstance(cls, type) and issubclass(cls, ZarrCkptError)):
                cls = CollectiveError
            raise cls(doc["message"])
        return doc

    # --- the protocol ----------------------------------------------------------------------

    def decide(
        self, tree_record: dict[str, Any], decide: Callable[[], tuple[Manifest, Any, StepInfo]]
    ) -> tuple[Manifest | None, Any, StepInfo]:
        """Steps 1-2: ``decide()`` runs on process 0 only; every process gets its outcome."""
        fingerprint = google_crc32c.value(json.dumps(tree_record, sort_keys=True).encode())
        self.post(f"tree/{self.process}", {"crc32c": fingerprint})
        if not self.leader:
            doc = self.wait("decision", "process 0's decision", self.timeout_s)
            return None, None, StepInfo.from_json(doc["step"], "collective save")
        try:
            differ = []
            for p in range(1, self.count):
                theirs = self.wait(f"tree/{p}", f"process {p}", self.timeout_s)["crc32c"]
                if theirs != fingerprint:
                    differ.append(p)
            if differ:
                raise errors.StructureMismatchError(
                    f"collective save {self.number}: process(es) {differ} save a different tree "
                    "than process 0 (paths, shapes, dtypes, chunking or sharding differ); "
                    "every process must save the same global tree"
                )
            base, token, info = decide()
        except BaseException as exc:
            self.post("decision", _error_doc(exc))
            raise
        self.post("decision", {"step": info.to_json()})
        return base, token, info

    def commit(
        self,
        storage: Storage,
        base: Manifest | None,
        token: Any,
        info: StepInfo,
        keep: int | None,
        record: bytes,
        write: Callable[[bool, bytes | None], Awaitable[None]],
        recycle: bool,
    ) -> Exception | None:
        """Steps 3-5: ``write(primary, old)`` writes this process's chunks (and, on process 0,
        the ``zarr.json`` documents but the record, and the leaves not sharded over processes;
        ``old`` as in ``commit_step``: process 0's recycled directory, which the others then
        rewrite in place too). Returns process 0's collection error, if any (the step is
        committed all the same)."""
        if not self.leader:
            return self._follow(storage, write)
        assert base is not None

        async def write_all(old: bytes | None) -> None:
            self.post("begun", {})
            await write(True, old)
            for p in range(1, self.count):
                await _in_thread(self.wait, f"done/{p}", f"process {p}'s writes", None)
            self._forget(self.number - 1)  # every process is past the previous save
            await storage.put(f"{info.dir}/zarr.json", [record])

        try:
            _, collect_error = run(
                commit_step(storage, base, token, info, keep, record, write_all, recycle)
            )
        except BaseException as exc:
            self.post("begun", _error_doc(exc))
            self.post("commit", _error_doc(exc))
            raise
        self.post("commit", {})
        return collect_error

    def _follow(
        self, storage: Storage, write: Callable[[bool, bytes | None], Awaitable[None]]
    ) -> None:
        try:
            self.wait("begun", "process 0's lease on the step directory", self.timeout_s)
            run(write(False, None))
            run(storage.sync())
        except BaseException as exc:
            failed = _error_doc(exc)
            failed["message"] = f"process {self.process} failed: {failed['message']}"
            self.post(f"done/{self.process}", failed)
            raise
        self.post(f"done/{self.process}", {})
        self.wait("commit", "process 0's commit", None)
        return None

    def _forget(self, number: int) -> None:
        if number >= 0:
            with contextlib.suppress(Exception):  # housekeeping only
                self.client.key_value_delete(f"zarrckpt/save/{number}/")


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    import asyncio

    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
