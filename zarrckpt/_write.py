"""Saving: snapshot a tree into host arrays, pick the step, and hand it to the commit.

What is decided here, synchronously in the caller's thread, is everything that depends on
the committed state or on the caller's objects: the snapshot of the tree (numpy buffers
are copied for background saves), the step number, the ``overwrite``/``keep`` checks.
Writing and publishing follow the protocol of ``_commit``, in the foreground or on an
:class:`~zarrckpt.AsyncManager`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import operator
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np
import xxhash

from . import _collective, _leaves, _reuse, _tree
from ._commit import commit_step, read_manifest_versioned
from ._engine import LeafData, write_step
from ._format import KEPT_CHUNK_KEYS, ArrayLayout
from ._manifest import Manifest, StepInfo, checksum, new_step_dir, step_record_bytes
from ._progress import human, progress_bar
from ._sharding import Shards
from ._storage import Storage, open_storage
from ._storage.local import LocalStorage
from ._sync import HASH_THREADS, hash_executor, run
from .errors import AlreadyExistsError, CollectionWarning, UnsupportedLeafError

__all__ = ["DEFAULT_KEEP", "Plan", "plan", "save"]

#: ``keep``'s default: the newest step with ``overwrite=True``, every step with ``overwrite=False``
DEFAULT_KEEP: Any = "default"


class Carried(NamedTuple):
    """A leaf that the previous step (this process's last commit into the root) holds whole:
    the very same immutable ``jax.Array``, planned alike. Each of its files is linked from
    there; it is not converted, hashed or compared again (a save loop's unchanged leaves)."""

    path: str
    value: Any
    layout: ArrayLayout
    dims: list[str] | None
    #: the previous step's (layout, dims, hashes) of the leaf
    entry: tuple[ArrayLayout, Any, list[str]]
    #: its files' keys, relative to the step
    files: list[str]
    #: its plan (which the commit tells the step entry it is saved with)
    planned: _Planned
    #: its host array, taken when the caller does not wait for the save (a background
    #: save must not need the array after the call: it may be deleted or donated)
    host: np.ndarray | None = None

    def leaf(self) -> LeafData:
        array = self.host if self.host is not None else np.asarray(self.value)
        return LeafData(self.path, array, self.layout, {}, self.dims)


def _files(path: str, layout: ArrayLayout) -> list[str]:
    """The keys of the files of leaf ``path``, relative to the step."""
    names = layout.chunk_keys() if layout.nbytes else ()
    return [f"{path}/zarr.json"] + [f"{path}/{name}" for _, name in names]


@dataclass(frozen=True)
class Plan:
    """A flattened, host-side snapshot of a tree, ready to write."""

    record: dict[str, Any]
    #: the leaves to write
    leaves: list[LeafData]
    groups: list[str]
    #: leaf path -> its record (in ``record``)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: leaf path -> the immutable ``jax.Array`` its data came from (``_reuse``)
    sources: dict[str, Any] = field(default_factory=dict)
    #: leaf path -> its chunk hashes, being computed on the hash pool (large leaves), a
    #: run of chunks per future
    hashing: dict[str, list[Future[list[str | None]]]] = field(default_factory=dict)
    #: the leaves the previous step holds whole (:class:`Carried`), and that step
    carried: list[Carried] = field(default_factory=list)
    carried_from: _reuse.Previous | None = None
    #: leaf path -> the plan of the jax.Array it came from (:class:`_Planned`), for the
    #: leaves to write
    planned: dict[str, _Planned] = field(default_factory=dict)
    #: batches of leaves being hashed for the step record, written last (:meth:`hash_later`)
    later: list[Future[dict[str, list[str]]]] = field(default_factory=list)

    def carried_over(self, previous: _reuse.Previous | None) -> Plan:
        """This plan for a save whose latest committed step is ``previous``: the carried
        leaves become leaves to write, unless ``previous`` is the step they were carried
        from (another process may have committed since)."""
        if not self.carried or previous is self.carried_from:
            return self
        sources = {**self.sources, **{c.path: c.value for c in self.carried}}
        planned = {**self.planned, **{c.path: c.planned for c in self.carried}}
        leaves = self.leaves + [c.leaf() for c in self.carried]
        return replace(
            self, leaves=leaves, sources=sources, planned=planned, carried=[], carried_from=None
        )

    @property
    def count(self) -> int:
        """Its leaves, written or carried."""
        return len(self.leaves) + len(self.carried)

    def cancel_hashing(self) -> None:
        """Drop the hashes not started yet (a save that fails)."""
        _cancel(self.hashing)
        for future in self.later:
            future.cancel()

    def hash_chunks(self, later: frozenset[str] = frozenset()) -> dict[str, list[str]]:
        """Each leaf's chunk hashes (``_reuse``), also put into the tree record: computed,
        or known from an earlier save of the same ``jax.Array``. Sharded leaves have none,
        nor do the leaves of ``later`` yet (:meth:`hash_later`). (A save that fails
        cancels what is still hashing: ``_save``'s task.)"""
        todo = [
            leaf
            for leaf in self.leaves
            if not isinstance(leaf.array, Shards) and leaf.path not in later
        ]
        self._hash_large(todo)  # (those plan expected to change, then not written unhashed)
        hashes = {}
        for leaf in todo:
            found = self._hashes_ahead(leaf)
            if found is None:
                found = self._hashes_now(leaf)
            hashes[leaf.path] = self.records[leaf.path][_leaves.HASH_FIELD] = found
        for carried in self.carried:  # (their records have them: _plan_leaf)
            hashes[carried.path] = carried.entry[2]
        return hashes

    def _hash_large(self, leaves: list[LeafData]) -> None:
        """Start hashing those of ``leaves`` worth it (large) on the hash pool, unless begun."""
        for leaf in leaves:
            if leaf.path not in self.hashing and _worth_hashing_ahead(
                leaf, self.sources.get(leaf.path)
            ):
                self.hashing[leaf.path] = _hash_ahead(leaf)

    def _hashes_ahead(self, leaf: LeafData) -> list[str] | None:
        """``leaf``'s hashes if :func:`plan` began them (waiting for them), else None."""
        if leaf.path not in self.hashing:
            return None
        assert isinstance(leaf.array, np.ndarray)  # (_worth_hashing_ahead)
        ahead = [h for future in self.hashing[leaf.path] for h in future.result()]
        return [  # (None: a chunk that needs a copy, hashed here)
            h or _reuse.chunk_hash(leaf.layout, leaf.array, idx)
            for h, idx in zip(ahead, leaf.layout.chunk_ids(), strict=True)
        ]

    def _hashes_now(self, leaf: LeafData) -> list[str]:
        """``leaf``'s hashes, known from an earlier save of the same ``jax.Array`` or computed
        here (never waiting for another job: the hash pool's batches call it)."""
        found = _known_hashes(leaf, self.sources.get(leaf.path))
        if found is None:
            assert isinstance(leaf.array, np.ndarray)  # (callers skip Shards)
            found = _reuse.chunk_hashes(leaf.layout, leaf.array)
        return found

    def _hashes_of(self, leaves: list[LeafData]) -> dict[str, list[str]]:
        return {leaf.path: self._hashes_now(leaf) for leaf in leaves}

    def speculative(self, previous: _reuse.Previous | None) -> frozenset[str]:
        """The leaves to write without comparing, hashed once the step's data is written
        (:meth:`hash_later`, while ``commit_step`` flushes it): those of which every chunk
        changed in the previous save (``previous.changed``), when hashing them would take
        longer than serializing the step record a second time (once for the recycled
        directory's check, once with their hashes)."""
        if previous is None or not previous.changed:
            return frozenset()
        leaves = [
            leaf
            for leaf in self.leaves
            if leaf.path in previous.changed and not isinstance(leaf.array, Shards)
        ]
        nbytes = sum(leaf.layout.nbytes for leaf in leaves)
        hashing = nbytes / _HASHED_BYTES_PER_S + len(leaves) * _HASH_S_PER_LEAF
        if hashing <= self.count * _RECORD_S_PER_LEAF:
            return frozenset()
        return frozenset(leaf.path for leaf in leaves)

    def hash_later(self, paths: frozenset[str]) -> Callable[[], dict[str, list[str]]]:
        """Start hashing the leaves ``paths`` on the hash pool (large ones in runs of
        chunks, the others in batches; those that :func:`plan` began hashing carry on);
        the function returned waits for their hashes and puts them into the tree record
        too. Cancelled with the rest by :meth:`cancel_hashing`."""
        todo = [leaf for leaf in self.leaves if leaf.path in paths]
        self._hash_large(todo)
        ahead = [leaf for leaf in todo if leaf.path in self.hashing]
        small = [leaf for leaf in todo if leaf.path not in self.hashing]
        pool = hash_executor()
        batches: list[Future[dict[str, list[str]]]] = []
        for i in range(0, len(small), _LATER_BATCH):
            batches.append(pool.submit(self._hashes_of, small[i : i + _LATER_BATCH]))
            self.later.append(batches[-1])  # (at once: cancel_hashing sees each)

        def wait() -> dict[str, list[str]]:
            found = {}
            for batch in batches:
                found.update(batch.result())
            for leaf in ahead:
                found[leaf.path] = self._hashes_ahead(leaf) or []  # (never None: in hashing)
            for leaf in todo:
                self.records[leaf.path][_leaves.HASH_FIELD] = found[leaf.path]
            return found

        return wait

    def linkable(
        self,
        previous: _reuse.Previous,
        hashes: dict[str, list[str]],
        later: frozenset[str] = frozenset(),
    ) -> list[str]:
        """Keys of this step (relative to its directory) whose bytes ``previous`` holds
        under the same key (of the leaves of ``later``, hashed later: the metadata)."""
        linked = []
        for leaf in self.leaves:
            if leaf.path not in hashes:
                if leaf.path in later and previous.same_metadata(leaf.path, leaf.layout, leaf.dims):
                    linked.append(f"{leaf.path}/zarr.json")
                continue
            positions = previous.linkable(leaf.path, leaf.layout, leaf.dims, hashes[leaf.path])
            names = None
            for i in positions:
                if i < 0:
                    key = f"{leaf.path}/zarr.json"
                else:
                    names = names if names is not None else leaf.layout.chunk_keys()
                    key = f"{leaf.path}/{names[i][1]}"
                linked.append(key)
        if self.carried:
            assert previous is self.carried_from  # (carried_over)
            for carried in self.carried:
                linked += carried.files
        return linked

    @property
    def nbytes(self) -> int:
        return sum(leaf.layout.nbytes for leaf in self._all())

    def _all(self) -> Iterator[LeafData | Carried]:
        yield from self.leaves
        yield from self.carried

    def keys(self) -> set[str]:
        """Every file of the step, relative to its directory."""
        keys = {f"{g}/zarr.json" if g else "zarr.json" for g in self.groups}
        for leaf in self._all():
            keys.update(_files(leaf.path, leaf.layout))
        return keys

    def metadata_keys(self) -> frozenset[str]:
        return frozenset(
            [f"{g}/zarr.json" for g in self.groups if g]
            + [f"{leaf.path}/zarr.json" for leaf in self._all()]
        )

    def unchanged_metadata(self, old: dict[str, Any]) -> frozenset[str]:
        """Metadata keys whose bytes a recycled step (tree record ``old``: this process's own
        earlier step, so written by this very code) already holds: same group, or same leaf
        layout and dimension names. Anything unreadable counts as changed."""
        try:
            layouts = {
                r["path"]: (ArrayLayout.from_json(r), r.get("dims"))
                for r in _tree.iter_leaf_records(old)
            }
        except Exception:
            return frozenset()
        groups = {path[:i] for path in layouts for i, ch in enumerate(path) if ch == "/"}
        same = {f"{g}/zarr.json" for g in self.groups if g and g in groups}
        same |= {
            f"{leaf.path}/zarr.json"
            for leaf in self._all()
            if layouts.get(leaf.path) == (leaf.layout, leaf.dims)
        }
        return frozenset(same)


#: Leaves of at least this many bytes are hashed on the hash pool while the rest of the
#: tree is planned: hashing runs at ~28 GB/s (bound by memory bandwidth), so a state's large
#: matrices cost the save what its thousands of small leaves cost.
_HASH_AHEAD_BYTES = 4 * 1024 * 1024


#: Whether a save hashes a leaf expected to change before writing it or after (while the
#: data is flushed: :meth:`Plan.speculative`) weighs these, measured on a 2-core VM:
#: xxh3-128 runs at ~28 GB/s on a large leaf alone (20 GB/s is assumed beside the save's
#: other work), a small leaf costs ~8 µs with the Python around it, and the step record's
#: JSON ~3 µs per leaf.
_HASHED_BYTES_PER_S = 20e9
_HASH_S_PER_LEAF = 8e-6
_RECORD_S_PER_LEAF = 3e-6
#: small leaves hashed per job of :meth:`Plan.hash_later`
_LATER_BATCH = 64


def _known_hashes(leaf: LeafData, source: Any) -> list[str] | None:
    return None if source is None else _reuse.known_hashes(source, leaf.layout)


def plan(
    target: Any, *, copy: bool, chunk_bytes: int | None, codec: str | None,
    dims: dict[str, Sequence[str]] | None = None, collective: bool = False,
    hash_ahead: bool = False, previous: _reuse.Previous | None = None, flushes: bool = False,
) -> Plan:  # fmt: skip
    """``target`` flattened into host arrays and records; with ``hash_ahead``, the chunk
    hashes of its large leaves (those an earlier save did not know) start at once, except,
    on a store that ``flushes`` its writes (``Storage.durable``), the leaves expected to
    change (``previous.changed``): the save hashes those while the store flushes. The
    leaves that ``previous`` holds whole are carried (:class:`Carried`)."""
    record, flat, groups = _tree.flatten(target)
    by_path = {rec["path"]: rec for rec in _tree.iter_leaf_records(record)}
    unknown = sorted(set(dims or ()) - set(by_path))
    if unknown:
        raise ValueError(
            f"dims names {unknown}, which are not leaves of the tree; its leaves are "
            f"{sorted(by_path)[:20]}{' ...' if len(by_path) > 20 else ''}"
        )
    expected = previous.changed if previous is not None and flushes else frozenset()
    leaves: list[LeafData] = []
    carried: list[Carried] = []
    sources: dict[str, Any] = {}
    planned: dict[str, _Planned] = {}
    hashing: dict[str, list[Future[list[str | None]]]] = {}
    try:
        for path, value in flat:
            leaf, source, known = _plan_leaf(
                path, value, by_path[path], copy, chunk_bytes, codec, dims, collective, previous
            )
            if isinstance(leaf, Carried):
                carried.append(leaf)
                continue
            leaves.append(leaf)
            if known is not None:
                planned[path] = known
            if source is not None:
                sources[path] = source
            if hash_ahead and _worth_hashing_ahead(leaf, source) and path not in expected:
                hashing[path] = _hash_ahead(leaf)
    except BaseException:
        _cancel(hashing)
        raise
    return Plan(
        record, leaves, groups, by_path, sources, hashing, carried,
        previous if carried else None, planned,
    )  # fmt: skip


def _cancel(hashing: dict[str, list[Future[list[str | None]]]]) -> None:
    for futures in hashing.values():
        for future in futures:
            future.cancel()


class _Planned:
    """What a ``jax.Array`` was planned as. A save loop's unchanged JAX leaves are the very
    objects it planned before, and immutable: the same kind and layout, so each costs a
    lookup. (Not the host array: a NumPy view of a jax.Array keeps it alive.)"""

    __slots__ = ("entry", "fields", "files", "layout", "wanted")

    def __init__(self, wanted: tuple[Any, ...], layout: ArrayLayout, fields: dict[str, Any]):
        #: what it was planned for (path, chunk bytes, codec, dims), and as what: its
        #: layout and the fields it added to its leaf record
        self.wanted, self.layout, self.fields = wanted, layout, fields
        #: its files' keys (kept once carried, for a leaf of a few chunks)
        self.files: list[str] | None = None
        #: its (layout, dims, hashes) in the step this process last committed it into with
        #: this plan (set by that save: :class:`Plan.planned`)
        self.entry: tuple[ArrayLayout, Any, list[str]] | None = None


#: jax.Array -> :class:`_Planned`
_planned = _leaves.IdentityMemo()


def _plan_leaf(
    path: str, value: Any, rec: dict[str, Any], copy: bool, chunk_bytes: int | None,
    codec: str | None, dims: dict[str, Sequence[str]] | None, collective: bool,
    previous: _reuse.Previous | None,
) -> tuple[LeafData | Carried, Any, _Planned | None]:  # fmt: skip
    """One leaf of :func:`plan` (its record ``rec`` completed), the ``jax.Array`` it came
    from (None: none, or a mutable NumPy array) and that array's plan; carried if
    ``previous`` holds it."""
    names: list[str] | None = None
    if dims and path in dims:  # (a copy: the caller's list may change before the next save)
        given = dims[path]
        names = [given] if isinstance(given, str) else list(given)
    wanted = (path, chunk_bytes, codec, names)
    if type(value) is not np.ndarray:
        known: _Planned | None = _planned.get(value)
        if known is not None and known.wanted == wanted:
            rec.update(known.fields)
            entry = known.entry
            if entry is not None and previous is not None and previous.leaves.get(path) is entry:
                # (the very entry this array was committed with: same layout, names, hashes)
                rec[_leaves.HASH_FIELD] = entry[2]
                files = known.files or _files(path, known.layout)
                if known.layout.n_chunks <= KEPT_CHUNK_KEYS:
                    known.files = files
                host = np.asarray(value) if copy else None
                carried = Carried(path, value, known.layout, names, entry, files, known, host)
                return carried, None, known
            return LeafData(path, np.asarray(value), known.layout, {}, names), value, known
    source = _leaves.immutable_array(value)
    array, kind = _leaves.encode(path, value, copy=copy)
    if isinstance(array, Shards) and not collective:
        raise UnsupportedLeafError(
            f"leaf {path!r}: a jax.Array on the devices of another process only; this "
            "process holds none of it. Save it from the process that holds it, or shard "
            "it over several processes (a collective save by every process)"
        )
    layout = ArrayLayout.for_array(array, chunk_bytes, codec)
    fields = {**kind, **layout.to_json()}
    if names is not None:
        fields["dims"] = _dimension_names(path, names, len(layout.shape))
    rec.update(fields)
    known = None
    if source is value and kind["kind"] == "jax" and isinstance(array, np.ndarray):
        # (a jax.Array itself: not sharded, not a typed PRNG key, stored as its key data)
        known = _Planned(wanted, layout, fields)
        _planned.put(value, known)
    return LeafData(path, array, layout, {}, fields.get("dims")), source, known


def _worth_hashing_ahead(leaf: LeafData, source: Any) -> bool:
    """Whether :func:`_hash_ahead` should hash ``leaf``: a large C-ordered NumPy array, whose
    chunks are views (others are copied chunk by chunk, in line), not known already."""
    array = leaf.array
    return (
        leaf.layout.nbytes >= _HASH_AHEAD_BYTES
        and isinstance(array, np.ndarray)
        and array.flags.c_contiguous
        and array.dtype.byteorder != ">"
        and _known_hashes(leaf, source) is None
    )


def _hash_ahead(leaf: LeafData) -> list[Future[list[str | None]]]:
    """Start hashing ``leaf``'s chunks on the hash pool, in a few runs of chunks each."""
    assert isinstance(leaf.array, np.ndarray)  # (_worth_hashing_ahead)
    array, ids = leaf.array, list(leaf.layout.chunk_ids())
    per = -(-len(ids) // (2 * HASH_THREADS))  # at most 2 runs per thread
    pool = hash_executor()
    return [
        pool.submit(_reuse.view_hashes, leaf.layout, array, ids[i : i + per])
        for i in range(0, len(ids), per)
    ]


def _dimension_names(path: str, names: list[str], ndim: int) -> list[str]:
    """``names`` (a list: :func:`_plan_leaf` made it one) checked as a leaf's dimension names."""
    problem = _leaves.check_dims(names, ndim)
    if problem:
        raise ValueError(f"dims[{path!r}]: {problem}")
    return names


#: a leaf record's chunk hashes in step record JSON (hex digits: no ``]`` inside; a quote
#: inside a JSON string is escaped, so this matches the field itself only)
_HASHES = re.compile(rb',"%s":\[[^\]]*\]' % _leaves.HASH_FIELD.encode())


def _shape(record: bytes) -> bytes | None:
    """The shape of a step record's tree (None: it has none): what decides the files and
    metadata of a step (two saves of the same tree with other values have the same shape),
    as the xxh3-128 of the tree's JSON without the chunk hashes."""
    start = record.find(b'"tree":')
    if start < 0:
        return None
    digest = xxhash.xxh3_128()
    for part in _HASHES.split(record[start:]):
        digest.update(part)
    return digest.digest()


def _old_tree(record: bytes) -> Any:
    """The tree record of a recycled step's record (None if unreadable: then all is rewritten)."""
    try:
        return json.loads(record)["attributes"]["zarrckpt"]["tree"]
    except Exception:
        return None


def _held(
    snapshot: Plan, hashes: dict[str, list[str]], previous: _reuse.Previous | None
) -> tuple[dict[str, tuple[ArrayLayout, Any, list[str]]], frozenset[str]]:
    """Leaf path -> (layout, dims, hashes) of a step just committed, for the next save, and
    the leaves of which every chunk differs from ``previous`` (``Previous.changed``). An
    unchanged leaf keeps the previous step's entry: a save loop then keeps few new objects,
    and the garbage collector's full collections (tens of ms in a process holding JAX) come
    rarely."""
    before = previous.leaves if previous is not None else {}
    held, changed = {}, []
    for leaf in snapshot.leaves:
        found = hashes.get(leaf.path)
        if found is None:
            continue
        entry = before.get(leaf.path)
        if entry is None or entry[2] != found or entry[0] != leaf.layout or entry[1] != leaf.dims:
            if (
                entry is not None
                and entry[0] == leaf.layout
                and found
                and not any(map(operator.eq, entry[2], found))  # (same layout: same count)
            ):
                changed.append(leaf.path)
            entry = (leaf.layout, leaf.dims, found)
        held[leaf.path] = entry
    for carried in snapshot.carried:
        held[carried.path] = carried.entry
    return held, frozenset(changed)


_pause_lock = threading.Lock()
_pausing = 0  # saves in progress that pause the collector
_paused = False  # whether they paused it (it was enabled)


def _resume_after_fork() -> None:
    """A forked child has none of its parent's saves: its collector runs (as it did before
    they paused it), and no lock a parent's thread held at the fork blocks it."""
    global _pause_lock, _pausing, _paused
    _pause_lock = threading.Lock()
    _pausing = 0
    if _paused:
        _paused = False
        gc.enable()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_resume_after_fork)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while the caller waits for a save into a
    local directory, as ``timeit`` does (a save to an object store takes seconds: there the
    collections do not matter, and other threads keep their collector).

    A save makes and drops a few records per leaf; with the collector on, the young
    collections it triggers move them to the oldest generation, and every few saves a full
    collection walks the whole process (JAX's objects and the user's: ~20 ms per save in
    the 1% profile with 110,000 objects, growing with the process). Paused, they are freed
    by reference counting before any collection sees them. Background saves never pause it
    (the caller's own code runs meanwhile); a collector the user disabled stays disabled.
    """
    global _pausing, _paused
    with _pause_lock:
        _pausing += 1
        if _pausing == 1 and gc.isenabled():
            gc.disable()
            _paused = True
    try:
        yield
    finally:
        with _pause_lock:
            _pausing -= 1
            if _pausing == 0 and _paused:
                _paused = False
                gc.enable()


def _resolve_step(manifest: Manifest, step: int | None, overwrite: bool, where: str) -> int:
    latest = manifest.latest
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ValueError(f"step must be a non-negative int or None, got {step!r}")
    if not overwrite and latest is not None and (step is None or latest.step >= step):
        asked = "the next step" if step is None else f"step {step}"
        raise AlreadyExistsError(
            f"{where}: cannot save {asked} with overwrite=False: step {latest.step} is already "
            "committed (pass overwrite=True to add or replace steps, or an explicit step "
            f"above {latest.step})"
        )
    if step is None:
        return 0 if latest is None else latest.step + 1
    return step


def _resolve_keep(keep: Any, overwrite: bool) -> int | None:
    if keep is DEFAULT_KEEP:
        return 1 if overwrite else None
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be a positive int or None, got {keep!r}")
    return keep


def save(
    filename: Any,
    target: Any,
    **kwargs: Any,
) -> str:
    """``save_pytree``'s implementation (see its docstring)."""
    collective = _collective.group(target)  # first: it numbers collective saves
    try:
        storage = open_storage(filename, kwargs.pop("storage_options"))
        if kwargs["async_manager"] is None and isinstance(storage, LocalStorage):
            # paused until _save's records are gone (else the first collection scans them)
            with _collector_paused():
                return _save(collective, storage, target, **kwargs)
        return _save(collective, storage, target, **kwargs)
    except BaseException as exc:
        if collective is not None:  # tell the other processes, so they do not wait for us
            collective.fail(exc)
        raise


def _save(
    collective: _collective.Group | None,
    storage: Storage,
    target: Any,
    *,
    overwrite: bool,
    async_manager: Any,
    verbose: bool,
    step: int | None,
    keep: Any,
    chunk_bytes: int | None,
    codec: str | None,
    recycle: bool = True,
    dims: dict[str, Sequence[str]] | None = None,
    incremental: bool = True,
) -> str:
    keep = _resolve_keep(keep, overwrite)
    if storage.is_file():
        raise AlreadyExistsError(
            f"{storage.url} is an existing file (an old single-file checkpoint?); "
            "zarrckpt needs a directory path"
        )
    if async_manager is not None:
        # overwrite/keep must see committed state; if the previous save failed, this raises
        # BackgroundSaveError, which says that this call saves nothing either
        async_manager.wait_before_save()
    chunk_bytes = chunk_bytes or storage.default_chunk_bytes
    # Collective saves write every chunk: each process would have to hash its own shards.
    incremental = incremental and collective is None
    with _collector_paused():  # (a foreground save: paused already, until it returns)
        snapshot = plan(
            target,
            # a collective save's followers never write unsharded leaves: no need to copy
            copy=async_manager is not None and (collective is None or collective.leader),
            chunk_bytes=chunk_bytes,
            codec=codec,
            dims=dims,
            collective=collective is not None,
            hash_ahead=incremental,
            previous=_reuse.last_committed(storage) if incremental else None,
            flushes=storage.durable,
        )

    def decide() -> tuple[Manifest, Any, StepInfo]:
        found, token = run(read_manifest_versioned(storage))
        base = found or Manifest()
        number = _resolve_step(base, step, overwrite, storage.url)
        info = StepInfo(number, new_step_dir(number), time.time(), snapshot.count, snapshot.nbytes)
        if not overwrite:
            dropped = [s.step for s in base.steps if s not in base.with_step(info, keep).steps]
            if dropped:
                raise AlreadyExistsError(
                    f"{storage.url}: keep={keep} would delete committed step(s) {dropped}, "
                    "which overwrite=False protects; pass keep=None (keep all) or overwrite=True"
                )
        return base, token, info

    base: Manifest | None  # None: another process of a collective save decided
    if collective is None:
        try:
            base, token, info = decide()
        except BaseException:
            snapshot.cancel_hashing()
            raise
    else:
        call = {
            "record": snapshot.record,
            "root": storage.url,
            "step": step,
            "overwrite": overwrite,
            "keep": keep,
            "sharded": [leaf.path for leaf in snapshot.leaves if isinstance(leaf.array, Shards)],
        }
        base, token, info = collective.decide(call, decide)
        verbose = verbose and collective.leader
    number = info.step
    location = storage.describe(info.dir)

    def task() -> None:
        try:
            save_step()
        except BaseException:
            snapshot.cancel_hashing()  # (what is still hashing for a failed save: drop it)
            raise

    def save_step() -> None:
        start = time.perf_counter()
        show_bar = verbose and async_manager is None
        previous = (
            run(_reuse.Previous.read(storage, base.latest))
            if incremental and base is not None  # incremental saves are never collective
            else None
        )
        current = snapshot.carried_over(previous)
        later = current.speculative(previous) if incremental else frozenset()
        hashes = current.hash_chunks(later) if incremental else {}
        # (without the hashes of ``later``: enough to tell a recycled directory's metadata)
        record = step_record_bytes(number, current.record, _tree.NAMING_VERSION)
        linked = current.linkable(previous, hashes, later) if previous is not None else []
        # A store that does not flush (writes are durable when done) leaves no wait to hide
        # the hashing of ``later`` in: it runs while they are written.
        started = current.hash_later(later) if later and not storage.durable else None
        total = sum(leaf.nbytes for leaf in current.leaves)
        total += sum(carried.layout.nbytes for carried in current.carried)
        with progress_bar(total, f"save step {number}", show_bar) as progress:

            async def recycled(old_record: bytes | None) -> frozenset[str]:
                """Ready a recycled directory (same names, rewritten in place) for this
                tree; the metadata keys it already holds with the right bytes (files this
                process wrote there, still the very same: ``storage.intact``)."""
                if old_record is None:
                    return frozenset()
                shape = _shape(old_record)
                if shape is not None and shape == _shape(record):  # a loop's usual case
                    same = current.metadata_keys()
                else:
                    await storage.trim(info.dir, current.keys())
                    same = current.unchanged_metadata(_old_tree(old_record))
                return await storage.intact(info.dir, same)

            async def link(unchanged: frozenset[str]) -> tuple[frozenset[str], list[LeafData]]:
                """Link (or copy server-side) the files of ``linked`` not there already:
                the keys the step then holds, and the leaves to write (with each carried
                leaf that a link failed for: its files are written, the others skipped)."""
                todo = [key for key in linked if key not in unchanged]
                failed: set[str] = set()
                if todo:
                    assert previous is not None  # (what ``linked`` names is there)
                    failed = await storage.link_many(previous.dir, info.dir, todo)
                unchanged = unchanged | (set(todo) - failed)
                leaves, done = current.leaves, 0
                for carried in current.carried:
                    if failed and not failed.isdisjoint(carried.files):
                        leaves = [*leaves, carried.leaf()]
                    else:
                        done += carried.layout.nbytes
                progress(done)
                return unchanged, leaves

            async def write(old_record: bytes | None) -> None:
                unchanged, leaves = await link(await recycled(old_record))
                await write_step(
                    storage, info.dir, leaves, current.groups,
                    None if later else record, progress, unchanged=unchanged,
                )  # fmt: skip

            async def finish_record() -> bytes:
                """The record with the hashes of ``later``: hashed now that their bytes are
                written, while commit_step flushes them (or while they were written, on a
                store that does not flush)."""
                nonlocal record
                wait = started or current.hash_later(later)
                record = await asyncio.get_running_loop().run_in_executor(None, complete, wait)
                return record

            def complete(wait: Callable[[], dict[str, list[str]]]) -> bytes:
                hashes.update(wait())
                return step_record_bytes(number, current.record, _tree.NAMING_VERSION)

            async def write_part(primary: bool, unchanged: frozenset[str]) -> None:
                await write_step(
                    storage, info.dir, snapshot.leaves, snapshot.groups, None, progress,
                    unchanged=unchanged, primary=primary,
                )  # fmt: skip

            if collective is None:
                assert base is not None  # decided by this process
                finish = finish_record if later else record
                _, collect_error = run(
                    commit_step(storage, base, token, info, keep, finish, write, recycle)
                )
            else:
                collect_error = collective.commit(
                    storage, base, token, info, keep, record, recycled, write_part, recycle
                )
        if hashes:  # what the next save compares with, without reading it back
            held, changed = _held(current, hashes, previous)
            committed = replace(info, record_crc32c=checksum(record))
            _reuse.committed(storage, committed, held, changed)
            for path, source in current.sources.items():
                if path in held:
                    _reuse.remember(source, held[path][0], held[path][2])
            for path, known in current.planned.items():  # (the very plans of this save)
                if path in held and held[path][0] == known.layout:
                    known.entry = held[path]
        if collect_error is not None:
            warnings.warn(
                f"{storage.url}: step {number} is committed, but deleting old steps failed "
                f"({type(collect_error).__name__}: {collect_error}); the next save retries",
                CollectionWarning,
                stacklevel=3,
            )
        if verbose:
            print(
                f"zarrckpt: saved step {number} ({info.leaves} leaves, {human(info.nbytes)}) "
                f"to {location} in {time.perf_counter() - start:.2f} s"
            )

    if async_manager is None:
        task()
    else:
        try:
            async_manager.save_async(task, step=number, url=storage.url)
        except BaseException:
            snapshot.cancel_hashing()
            raise
    return location
