"""Collective saves: every process of a multi-process JAX program writes one step together.

When ``jax.distributed`` runs several processes and a tree holds an array sharded over the
devices of more than one of them, ``save_pytree`` called by every process is one save: each
writes the chunks of the shards it holds (``_sharding``) and process 0 commits, by the
protocol of ``_commit``, once all are done. (A tree of process-local values is saved by
whoever calls, as in a single-process program: the usual "process 0 saves" code, or each
process saving to its own root, keeps working.) The processes agree through
the key-value store of JAX's coordination service (``jax.distributed``'s own, no other
cluster layer), never through device collectives, which would interleave with the
training step's when an :class:`~zarrckpt.AsyncManager` saves in a background thread.

The keys of the ``n``-th collective save of the job sit under ``zarrckpt/save/<n>/``; every
process counts its saves, and the counts agree because every process makes the same calls:

1. ``tree/<p>``: process ``p``'s call: its tree record's checksum (paths, kinds, shapes,
   dtypes, chunks, shardings), the root and the arguments that decide the step, and which
   leaves it found sharded over processes; process 0 refuses calls that differ. A process
   that fails before its writes are done posts its error instead, under every key it has
   not posted yet, so nobody waits for it.
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

Waits for work (3-5) have no time limit: a process that fails posts its error, and one that
dies makes JAX's heartbeat end every process of the job (``heartbeat_timeout_seconds`` of
``jax.distributed.initialize``); the directory it leaves is debris that the next save
collects. Every wait is cut into short slices, so Ctrl-C is seen.

The keys of a save are deleted by a later save of process 0, once every process has
reported (in its ``done``) that it finished every save up to it: saves may overlap (an
:class:`~zarrckpt.AsyncManager` save and a foreground one to another root).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import google_crc32c

from . import _sharding, errors
from ._commit import commit_step
from ._manifest import Manifest, StepInfo
from ._storage import Storage
from ._sync import run
from .errors import CollectiveError, ZarrCkptError

__all__ = ["Group", "group", "open_agreed"]

#: how long a process waits for the others to arrive at a collective save
DEFAULT_TIMEOUT_S = 300.0
_SLICE_MS = 500

_numbers = {"save": itertools.count(), "load": itertools.count()}
_lock = threading.Lock()
_finished: set[int] = set()  # this process's collective saves that are over
_low = 0  # the lowest number not in _finished
_deleted = 0  # process 0: saves below this have no keys left


def _finish(number: int) -> None:
    global _low
    with _lock:
        if number < _low:  # finished already (a failure is reported from several places)
            return
        _finished.add(number)
        while _low in _finished:
            _finished.discard(_low)
            _low += 1


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


def _spans_processes(target: Any) -> bool:
    """Whether ``target`` holds a ``jax.Array`` (or a ``jax.ShapeDtypeStruct`` target) sharded
    over devices of several processes: the same answer on every process for the same global
    tree (it depends on the global sharding only). Looks into what JAX sees as leaves but
    holds arrays: brainstate States (``.value``, possibly a sub-tree) and Quantities
    (``.mantissa``), as ``_tree.flatten`` does, without failing on anything odd."""
    import jax

    kinds = (jax.Array, jax.ShapeDtypeStruct)

    def spans(value: Any, depth: int) -> bool:
        if isinstance(value, kinds):
            return value.sharding is not None and _sharding.process_count(value.sharding) > 1
        if depth > 8:
            return False
        for attr in ("value", "mantissa"):  # a State, a BrainPy Variable, a Quantity
            try:
                inner = getattr(value, attr, None)
            except Exception:
                continue
            if inner is not None and inner is not value and walk(inner, depth + 1):
                return True
        return False

    def walk(tree: Any, depth: int) -> bool:
        return any(spans(leaf, depth) for leaf in jax.tree_util.tree_leaves(tree))

    try:
        return walk(target, 0)
    except Exception:  # an odd container: flattening will say what is wrong, to everyone
        return True


def group(target: Any, kind: str = "save") -> Group | None:
    """The collective save (or load) of ``target`` in this process's JAX job, or None where
    this process works alone (no ``jax.distributed``, or nothing sharded over processes).

    Must be the first thing a save does, before anything that may fail on one process
    only: it takes the save's number, and the numbers of all processes must agree.
    """
    if "jax" not in sys.modules:
        return None
    # The coordination service's client: no public API exposes its key-value store; orbax's
    # multi-host code uses this same object.
    from jax._src import distributed

    state = distributed.global_state
    if state.client is None or (state.num_processes or 1) < 2 or not _spans_processes(target):
        return None
    return Group(state.client, state.process_id, state.num_processes, kind)


def open_agreed(
    agreed: Group | None, root: str, step: int | None, open_step: Callable[[int | None], Any]
) -> Any:
    """``open_step(step)``, the same step on every process of a load into a target sharded
    over processes (``agreed``, from ``group(target, "load")``, taken before anything that
    may fail on one process only): process 0 resolves it (the latest may change under a
    concurrent writer) and posts it with the call (``root``, ``step``); the others check the
    call, open that very step and report (``opened/<p>``); process 0 returns only once every
    process has, so a load fails everywhere or nowhere, and then deletes the load's keys."""
    if agreed is None:
        return open_step(step)
    call = {"root": root, "step": step}
    if not agreed.leader:
        doc = agreed.wait("step", "process 0's step to load", agreed.timeout_s)
        if doc["call"] != call:
            raise errors.StructureMismatchError(
                f"collective load {agreed.number}: process 0 loads {doc['call']}, this "
                f"process {call}; every process must load the same root and step"
            )
        opened = open_step(doc["step"]) if doc["step"] is not None else None
        if opened is not None and opened.info.dir != doc["dir"]:
            raise CollectiveError(
                f"step {doc['step']}, which process 0 is loading, was replaced before this "
                "process could open it (a concurrent save); every process must load again"
            )
        agreed.post(f"opened/{agreed.process}", {})
        return opened
    opened = open_step(step)
    info = opened.info if opened is not None else None
    agreed.post("step", {
        "call": call, "step": info and info.step, "dir": info and info.dir,
    })  # fmt: skip
    for p in range(1, agreed.count):
        agreed.wait(f"opened/{p}", f"process {p}'s step", agreed.timeout_s)
    agreed._forget_load()
    return opened


def _error_doc(exc: BaseException, prefix: str = "") -> dict[str, Any]:
    return {"error": type(exc).__name__, "message": prefix + (str(exc) or type(exc).__name__)}


class Group:
    """One collective save's view of the job: this process, the others, and their keys."""

    def __init__(self, client: Any, process: int, count: int, kind: str = "save") -> None:
        self.client, self.process, self.count, self.kind = client, process, count, kind
        self.timeout_s = _timeout_s()  # may raise: before taking a number
        self.number = next(_numbers[kind])
        self._posted: set[str] = set()

    @property
    def leader(self) -> bool:
        return self.process == 0

    def _key(self, name: str) -> str:
        return f"zarrckpt/{self.kind}/{self.number}/{name}"

    def post(self, name: str, doc: dict[str, Any]) -> None:
        if name not in self._posted:  # the first word stands: a failure after it is
            self._posted.add(name)  # reported under a later key, never by overwriting
            self.client.key_value_set(self._key(name), json.dumps(doc))

    def fail(self, exc: BaseException) -> None:
        """Post ``exc`` under every key this process has yet to post, so no process waits
        for it; the save is over for this process. Every post is tried, whatever happens
        during the others (a second Ctrl-C): a process left waiting would hang its job."""
        carried = getattr(exc, "_zarrckpt_carried", False)  # another process's: as it is
        verdict = isinstance(exc, (errors.AlreadyExistsError, errors.StructureMismatchError))
        if self.leader:
            first = "decision" if self.kind == "save" else "step"  # where verdicts go
            posts = [
                (name, _error_doc(exc, "" if carried or (verdict and name == first)
                                  else "process 0 failed: "))
                for name in ((first, "begun", "commit") if self.kind == "save" else (first,))
            ]  # fmt: skip
        else:
            failed = _error_doc(exc, "" if carried else f"process {self.process} failed: ")
            names = ("tree", "done") if self.kind == "save" else ("opened",)
            posts = [(f"{name}/{self.process}", {**failed, "low": _low}) for name in names]
        interrupted: BaseException | None = None
        try:
            for name, doc in posts:
                try:
                    self.post(name, doc)
                except Exception:
                    pass
                except BaseException as again:  # post the rest, then let it through
                    interrupted = interrupted or again
        finally:
            _finish(self.number)
        if interrupted is not None:
            raise interrupted

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
                        f"collective {self.kind} {self.number}: the coordination service failed "
                        f"while waiting for {what} ({exc})"
                    ) from None
                if deadline is not None and time.monotonic() > deadline:
                    raise CollectiveError(
                        f"collective {self.kind} {self.number}: {what} did not arrive within "
                        f"{timeout_s:g} s (ZARRCKPT_COLLECTIVE_TIMEOUT_S). Every process of the "
                        f"job must call {self.kind}_pytree with the same arguments in the same "
                        "order"
                    ) from None
        return _raise_carried(json.loads(raw))

    def _posted_error(self, name: str) -> None:
        """Raise the error posted under ``name`` already, if any (no waiting)."""
        try:
            raw = self.client.key_value_try_get(self._key(name))
        except Exception:  # NOT_FOUND: nothing posted yet
            return
        _raise_carried(json.loads(raw))

    # --- the protocol ----------------------------------------------------------------------

    def decide(
        self, call: dict[str, Any], decide: Callable[[], tuple[Manifest, Any, StepInfo]]
    ) -> tuple[Manifest | None, Any, StepInfo]:
        """Steps 1-2: ``decide()`` runs on process 0 only; every process gets its outcome.
        ``call``: what must be the same on every process (see the module docstring)."""
        mine = {"crc32c": google_crc32c.value(json.dumps(call, sort_keys=True).encode())}
        self.post(f"tree/{self.process}", mine)
        if not self.leader:
            doc = self.wait("decision", "process 0's decision", self.timeout_s)
            return None, None, StepInfo.from_json(doc["step"], "collective save")
        differ = []
        for p in range(1, self.count):
            if self.wait(f"tree/{p}", f"process {p}", self.timeout_s) != mine:
                differ.append(p)
        if differ:
            raise errors.StructureMismatchError(
                f"collective save {self.number}: process(es) {differ} made another call than "
                "process 0: a different tree (paths, shapes, dtypes, chunking, sharding), "
                "root, step/overwrite/keep, or leaves sharded over processes on some and "
                "local on others (an array on the devices of one process only). Every "
                "process must save the same global tree to the same root"
            )
        for p in range(1, self.count):
            self._posted_error(f"done/{p}")  # a process that gave up meanwhile
        base, token, info = decide()
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
        prepare: Callable[[bytes | None], Awaitable[frozenset[str]]],
        write: Callable[[bool, frozenset[str]], Coroutine[Any, Any, None]],
        recycle: bool,
    ) -> Exception | None:
        """Steps 3-5. ``prepare(old)`` readies process 0's recycled directory (``old`` as in
        ``commit_step``) before the others may write into it, and returns the metadata keys
        it already holds; ``write(primary, unchanged)`` writes this process's chunks (and, on
        process 0, the ``zarr.json`` documents but the record, and the leaves not sharded
        over processes). Returns process 0's collection error, if any (the step is committed
        all the same)."""
        try:
            if not self.leader:
                self._follow(storage, write, info)
                return None
            return self._lead(storage, base, token, info, keep, record, prepare, write, recycle)
        except BaseException as exc:
            self.fail(exc)
            raise
        finally:
            _finish(self.number)

    def _lead(
        self, storage: Storage, base: Manifest | None, token: Any, info: StepInfo,
        keep: int | None, record: bytes,
        prepare: Callable[[bytes | None], Awaitable[frozenset[str]]],
        write: Callable[[bool, frozenset[str]], Coroutine[Any, Any, None]], recycle: bool,
    ) -> Exception | None:  # fmt: skip
        assert base is not None

        async def write_all(old: bytes | None) -> None:
            unchanged = await prepare(old)
            self.post("begun", {})
            await write(True, unchanged)
            lows = [_low]
            for p in range(1, self.count):
                done = await _in_thread(self.wait, f"done/{p}", f"process {p}'s writes", None)
                lows.append(done["low"])
            self._forget(min(lows))
            await storage.put(f"{info.dir}/zarr.json", [record])

        _, collect_error = run(
            commit_step(storage, base, token, info, keep, record, write_all, recycle)
        )
        self.post("commit", {})
        return collect_error

    def _follow(
        self, storage: Storage, write: Callable[[bool, frozenset[str]], Coroutine[Any, Any, None]],
        info: StepInfo,
    ) -> None:  # fmt: skip
        self.wait("begun", "process 0's lease on the step directory", self.timeout_s)
        if not run(storage.step_exists(info.dir)):
            self._posted_error("commit")  # process 0 failed and removed it: say why
            raise CollectiveError(
                f"{storage.describe(info.dir)}, which process 0 created, does not exist here: "
                "the processes of a collective save must share its root (one file system, "
                "or an object store)"
            )
        run(write(False, frozenset()))
        run(storage.sync())
        self.post(f"done/{self.process}", {"low": _low})
        self.wait("commit", "process 0's commit", None)

    def _forget_load(self) -> None:
        """Delete this load's keys: every process has read them (it posted ``opened``)."""
        with contextlib.suppress(Exception):  # housekeeping only
            self.client.key_value_delete(f"zarrckpt/load/{self.number}/")

    def _forget(self, below: int) -> None:
        """Delete the keys of every save below ``below`` (all processes are past them)."""
        global _deleted
        with _lock:
            numbers = range(_deleted, below)
            _deleted = max(_deleted, below)
        for number in numbers:
            with contextlib.suppress(Exception):  # housekeeping only
                self.client.key_value_delete(f"zarrckpt/save/{number}/")


def _raise_carried(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc``, or the error it carries raised (zarrckpt's own class where it is one)."""
    if "error" in doc:
        cls = getattr(errors, doc["error"], None)
        if not (isinstance(cls, type) and issubclass(cls, ZarrCkptError)):
            cls = CollectiveError
        exc = cls(doc["message"])
        exc._zarrckpt_carried = True  # type: ignore[attr-defined]
        raise exc
    return doc


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
