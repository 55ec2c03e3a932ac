"""The async core: write and read many leaves and chunks at once, with bounded memory.

Every chunk of every leaf is one task on zarrckpt's event loop; a byte budget bounds how
much encoded data is in flight (so memory stays flat however large the state), and a
count limit bounds concurrent requests. Encoding and decoding of large chunks runs in the
I/O thread pool (numcodecs and google-crc32c release the GIL); small ones run inline,
where a thread hop would cost more than the work.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ._format import KEPT_CHUNK_KEYS, ArrayLayout, encoded_bound
from ._indexing import Selection, normalize
from ._sharding import Shards
from ._storage import Storage
from .errors import CorruptCheckpointError

__all__ = ["LeafData", "read_leaves", "read_selections", "write_step"]

#: Encoded bytes allowed in flight per save or load.
MAX_BYTES_IN_FLIGHT = 64 * 1024 * 1024
#: Concurrent store requests per save or load.
MAX_REQUESTS_IN_FLIGHT = 64
#: Chunks smaller than this are encoded/decoded on the loop thread.
_INLINE_BYTES = 256 * 1024
#: No file read in a batch (chunks under ``_INLINE_BYTES``) can legitimately hold more.
_BATCHED_FILE_BYTES = encoded_bound(_INLINE_BYTES, compressed=True)


class _Budget:
    """A semaphore counted in bytes; one oversized request may always go alone."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._cond = asyncio.Condition()

    async def acquire(self, n: int) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n

    async def release(self, n: int) -> None:
        async with self._cond:
            self.used -= n
            self._cond.notify_all()


def _budgeted(
    budget: _Budget, nbytes: int, work: Callable[[], Awaitable[Any]],
    progress: Callable[[int], None], done_bytes: int,
) -> Callable[[], Awaitable[None]]:  # fmt: skip
    """A job that holds ``nbytes`` of the budget while ``work`` runs, then reports progress."""

    async def job() -> None:
        await budget.acquire(nbytes)
        try:
            await work()
        finally:
            await budget.release(nbytes)
        progress(done_bytes)

    return job


#: Output arrays start on this boundary: JAX's CPU backend then adopts them without a copy
#: (``jax.device_put`` of a 64-byte aligned array; numpy's own allocations are 16-byte
#: aligned and cost a copy: 0.18 s per GiB measured here).
_ALIGN = 64


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``np.empty(shape, dtype)`` whose data starts on a ``_ALIGN``-byte boundary."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _chunk_consumer(
    storage: Storage, path: str, layout: ArrayLayout, key: str, put: Callable[[np.ndarray], None]
) -> Callable[[bytes | None], None]:
    """Decode a chunk's bytes (None: the chunk is missing) and hand the array to ``put``."""

    def consume(data: bytes | None) -> None:
        if data is None:
            raise CorruptCheckpointError(f"leaf {path!r}: chunk {storage.describe(key)} is missing")
        put(layout.decode_chunk(data, f"leaf {path!r} ({storage.describe(key)})"))

    return consume


@dataclass(frozen=True)
class LeafData:
    """A leaf to write: its path in the step, host array (or the :class:`Shards` of it this
    process writes), layout and zarr attributes."""

    path: str
    array: np.ndarray | Shards
    layout: ArrayLayout
    attributes: dict[str, Any]
    #: the user's dimension names (None: ``ArrayLayout.dimension_names``)
    dims: list[str] | None = None

    @property
    def nbytes(self) -> int:
        """The bytes this process writes of the leaf."""
        return self.array.nbytes if isinstance(self.array, Shards) else self.layout.nbytes

    def pieces(self) -> Iterator[tuple[tuple[int, ...], ArrayLayout, np.ndarray]]:
        """``(first chunk index, layout, array)`` for each part written: the whole leaf, or
        each owned shard (its layout has the shard's shape; shards start on chunk bounds)."""
        if not isinstance(self.array, Shards):
            yield (0,) * len(self.layout.shape), self.layout, self.array
            return
        for start, data in self.array.pieces:
            origin = tuple(s // c for s, c in zip(start, self.layout.chunks, strict=True))
            yield origin, replace(self.layout, shape=data.shape), data


def _chunks_of(
    leaf: LeafData,
) -> Iterator[tuple[str, ArrayLayout, np.ndarray, tuple[int, ...]]]:
    """``(key, layout, array, index)`` of each chunk of ``leaf`` this process holds: its key
    (relative to the step), and its index in ``array`` (the whole leaf, or a shard)."""
    if not isinstance(leaf.array, Shards) and leaf.layout.n_chunks <= KEPT_CHUNK_KEYS:
        if leaf.layout.nbytes:  # the common case, a small leaf: its keys are kept
            for idx, name in leaf.layout.chunk_keys():
                yield f"{leaf.path}/{name}", leaf.layout, leaf.array, idx
        return
    for origin, layout, array in leaf.pieces():
        if not layout.nbytes:
            continue
        for idx in layout.chunk_ids():
            at = tuple(o + i for o, i in zip(origin, idx, strict=True))
            yield f"{leaf.path}/{layout.chunk_key(at)}", layout, array, idx


def _json_bytes(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _group_json(attributes: dict[str, Any] | None = None) -> bytes:
    return _json_bytes({"zarr_format": 3, "node_type": "group", "attributes": attributes or {}})


async def _offload(nbytes: int, fn: Callable[..., Any], *args: Any) -> Any:
    if nbytes < _INLINE_BYTES:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def _gather_bounded(jobs: Iterable[Callable[[], Any]], limit: int) -> None:
    """Run coroutine factories, at most ``limit`` at once; the first error cancels the rest."""
    pending: set[asyncio.Task[Any]] = set()

    def check(done: set[asyncio.Task[Any]]) -> None:
        errors = [e for t in done if not t.cancelled() and (e := t.exception())]
        if errors:
            raise errors[0]

    try:
        for job in jobs:
            if len(pending) >= limit:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                check(done)
            pending.add(asyncio.create_task(job()))
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            check(done)
    except BaseException:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        raise


#: Small chunks are written and read in batches of this many bytes (local disks).
_BATCH_BYTES = 4 * 1024 * 1024
_BATCH_ITEMS = 128


class _Batcher:
    """Groups small items into one job each, so that a local disk pays one thread hop per
    batch instead of two asyncio tasks and two hops per leaf (the dominant cost of states
    made of thousands of small arrays)."""

    def __init__(
        self, enabled: bool, make_job: Callable[[list[Any], int], Callable[[], Any]]
    ) -> None:
        self.enabled, self.make_job = enabled, make_job
        self.items: list[Any] = []
        self.nbytes = 0

    def add(self, item: Any, nbytes: int) -> Callable[[], Any] | None:
        self.items.append(item)
        self.nbytes += nbytes
        if len(self.items) >= _BATCH_ITEMS or self.nbytes >= _BATCH_BYTES:
            return self.flush()
        return None

    def flush(self) -> Callable[[], Any] | None:
        if not self.items:
            return None
        job = self.make_job(self.items, self.nbytes)
        self.items, self.nbytes = [], 0
        return job


async def write_step(
    storage: Storage,
    step_dir: str,
    leaves: list[LeafData],
    group_paths: list[str],
    record: bytes | None,
    progress: Callable[[int], None] = lambda n: None,
    max_requests: int = MAX_REQUESTS_IN_FLIGHT,
    unchanged: frozenset[str] = frozenset(),
    primary: bool = True,
) -> None:
    """Write a whole step under ``step_dir``; ``record`` (its group ``zarr.json``) goes last.

    ``unchanged``: keys (relative to ``step_dir``) already there with the very bytes this
    would write (metadata of a recycled directory, files linked from the previous step):
    they are skipped. In a collective save, the ``primary`` process writes the metadata and
    the leaves that are not sharded over processes, the others only the chunks of their
    :class:`Shards`; the record is written apart, once all are done (``record=None``).
    """
    budget = _Budget(MAX_BYTES_IN_FLIGHT)

    def prefixed(path: str) -> str:
        return f"{step_dir}/{path}" if path else step_dir

    def put_json(key: str, data: bytes) -> Callable[[], Any]:
        return lambda: storage.put(key, [data])

    def put_chunk(
        key: str, layout: ArrayLayout, array: np.ndarray, idx: tuple[int, ...]
    ) -> Callable[[], Any]:
        size = layout.chunk_nbytes
        # A raw chunk of a C-contiguous little-endian array is written from the caller's own
        # buffer (writev): it costs no memory beyond an edge chunk's padding, so it takes only
        # that from the budget. Compressed, reordered or byte-swapped chunks are copies.
        zero_copy = (
            storage.zero_copy_writes
            and layout.codec == "none"
            and array.flags.c_contiguous
            and array.dtype.byteorder != ">"
        )
        if zero_copy:
            region = layout.chunk_region(idx)
            size -= math.prod(r.stop - r.start for r in region) * layout.dtype.itemsize

        async def work() -> None:
            parts = await _offload(size, layout.encode_at, array, idx)
            await storage.put(key, parts)

        return _budgeted(budget, size, work, progress, min(layout.chunk_nbytes, layout.nbytes))

    def batch_job(
        items: list[tuple[str, Callable[[], list[Any]]]], nbytes: int
    ) -> Callable[[], Any]:
        return _budgeted(budget, nbytes, lambda: storage.put_batch(items), progress, nbytes)

    def encoder(
        layout: ArrayLayout, array: np.ndarray, idx: tuple[int, ...]
    ) -> Callable[[], list[Any]]:
        return lambda: layout.encode_at(array, idx)

    def encoded(data: bytes) -> Callable[[], list[Any]]:
        return lambda: [data]

    def chunks(
        leaf: LeafData, report: bool = True
    ) -> Iterator[tuple[str, ArrayLayout, np.ndarray, tuple[int, ...]]]:
        """``(key, layout, array, index)`` of each chunk this process writes of ``leaf``."""
        if not primary and not isinstance(leaf.array, Shards):
            return
        for key, layout, array, idx in _chunks_of(leaf):
            if key in unchanged:
                if report:
                    progress(min(layout.chunk_nbytes, layout.nbytes))
                continue
            yield prefixed(key), layout, array, idx

    batcher = _Batcher(storage.batches_small_io, batch_job)

    def jobs() -> Iterable[Callable[[], Any]]:
        for path in group_paths if primary else ():
            if path and f"{path}/zarr.json" not in unchanged:
                key, doc = f"{prefixed(path)}/zarr.json", _group_json()
                job = (
                    batcher.add((key, lambda doc=doc: [doc]), 0)
                    if batcher.enabled
                    else put_json(key, doc)
                )
                if job:
                    yield job
        for leaf in leaves:
            layout = leaf.layout
            meta_key = f"{prefixed(leaf.path)}/zarr.json"
            skip_meta = not primary or f"{leaf.path}/zarr.json" in unchanged
            meta = (
                b""
                if skip_meta
                else _json_bytes(layout.zarr_json(leaf.attributes, leaf.path, leaf.dims))
            )
            if batcher.enabled and layout.chunk_nbytes < _INLINE_BYTES:
                items = [] if skip_meta else [(meta_key, encoded(meta))]
                items += [
                    (key, encoder(lay, array, idx))
                    for key, lay, array, idx in chunks(leaf, report=False)
                ]
                if not items:
                    progress(leaf.nbytes)
                for n, item in enumerate(items):
                    job = batcher.add(item, leaf.nbytes if n == 0 else 0)
                    if job:
                        yield job
                continue
            if not skip_meta:
                yield put_json(meta_key, meta)
            for key, lay, array, idx in chunks(leaf):
                yield put_chunk(key, lay, array, idx)
        job = batcher.flush()
        if job:
            yield job

    await _gather_bounded(jobs(), max_requests)
    if record is not None:
        await storage.put(f"{step_dir}/zarr.json", [record])


async def read_selections(
    storage: Storage,
    step_dir: str,
    requests: dict[Any, tuple[ArrayLayout, Selection]],
    progress: Callable[[int], None] = lambda n: None,
    parallel: bool = True,
) -> dict[Any, np.ndarray]:
    """Read selections of leaves; touched chunks only. ``requests`` maps a name to
    ``(layout, selection)``: the name is the leaf's path, or ``(path, anything)`` to read
    several selections of one leaf."""
    budget = _Budget(MAX_BYTES_IN_FLIGHT)
    blocks = {
        name: aligned_empty(sel.shape, layout.dtype) for name, (layout, sel) in requests.items()
    }

    def consumer(
        name: Any, path: str, layout: ArrayLayout, parts: tuple[tuple[int, slice, slice], ...]
    ) -> tuple[str, Callable[[bytes | None], None]]:
        idx = tuple(p[0] for p in parts)
        inner = tuple(p[1] for p in parts)
        outer = tuple(p[2] for p in parts)
        key = f"{step_dir}/{path}/{layout.chunk_key(idx)}"

        def put(chunk: np.ndarray) -> None:
            blocks[name][outer] = chunk[inner]

        return key, _chunk_consumer(storage, path, layout, key, put)

    def get_chunk(
        key: str, decode_into: Callable[[bytes | None], None], layout: ArrayLayout, out_bytes: int
    ) -> Callable[[], Any]:
        size = layout.chunk_nbytes

        async def work() -> None:
            data = await storage.get(key, layout.max_chunk_file_bytes)
            await _offload(size, decode_into, data)

        return _budgeted(budget, size, work, progress, out_bytes)

    def get_direct(
        key: str, path: str, layout: ArrayLayout, dest: np.ndarray, out_bytes: int
    ) -> Callable[[], Any]:
        def read() -> None:
            where = f"leaf {path!r} ({storage.describe(key)})"
            layout.read_raw_into(storage.read_into, key, dest, where)

        async def job() -> None:
            await asyncio.get_running_loop().run_in_executor(None, read)
            progress(out_bytes)

        return job

    def batch_job(
        items: list[tuple[str, Callable[[bytes | None], None]]], nbytes: int
    ) -> Callable[[], Any]:
        return _budgeted(
            budget, nbytes, lambda: storage.get_batch(items, _BATCHED_FILE_BYTES), progress, nbytes
        )

    batcher = _Batcher(storage.batches_small_io and parallel, batch_job)

    def jobs() -> Iterable[Callable[[], Any]]:
        for name, (layout, sel) in requests.items():
            if not blocks[name].size:
                continue
            path = name if isinstance(name, str) else name[0]
            per_axis = [
                a.projections(c, n)
                for a, c, n in zip(sel.axes, layout.chunks, layout.shape, strict=True)
            ]
            for parts in itertools.product(*per_axis):
                key, decode_into = consumer(name, path, layout, parts)
                size = layout.chunk_nbytes
                if batcher.enabled and size < _INLINE_BYTES:
                    job = batcher.add((key, decode_into), size)
                    if job:
                        yield job
                else:
                    out_bytes = (
                        math.prod(p[2].stop - p[2].start for p in parts) * layout.dtype.itemsize
                    )
                    dest = (
                        layout.direct_destination(blocks[name], parts)
                        if storage.reads_into
                        else None
                    )
                    if dest is not None:  # raw chunk straight into the output: no copy
                        yield get_direct(key, path, layout, dest, out_bytes)
                    else:
                        yield get_chunk(key, decode_into, layout, out_bytes)
        job = batcher.flush()
        if job:
            yield job

    await _gather_bounded(jobs(), MAX_REQUESTS_IN_FLIGHT if parallel else 1)
    return {name: sel.finish(blocks[name]) for name, (_, sel) in requests.items()}


async def read_leaves(
    storage: Storage,
    step_dir: str,
    layouts: dict[str, ArrayLayout],
    progress: Callable[[int], None] = lambda n: None,
    parallel: bool = True,
) -> dict[str, np.ndarray]:
    """Read whole leaves (path -> layout) into fresh arrays.

    Small one-chunk leaves on batching storage skip the selection machinery: each is
    decoded straight into its own array inside the I/O thread (the per-leaf Python cost is
    what bounds loading thousands of small leaves).
    """
    out: dict[str, np.ndarray] = {}
    rest: dict[str, tuple[ArrayLayout, Selection]] = {}

    def batch_job(
        items: list[tuple[str, Callable[[bytes | None], None]]], nbytes: int
    ) -> Callable[[], Any]:
        async def job() -> None:
            await storage.get_batch(items, _BATCHED_FILE_BYTES)
            progress(nbytes)

        return job

    def consumer(path: str, layout: ArrayLayout, key: str) -> Callable[[bytes | None], None]:
        return _chunk_consumer(
            storage, path, layout, key, lambda chunk: out.__setitem__(path, chunk.copy())
        )

    batcher = _Batcher(storage.batches_small_io and parallel, batch_job)

    def jobs() -> Iterable[Callable[[], Any]]:
        for path, layout in layouts.items():
            whole = layout.chunks == layout.shape or not layout.shape
            if batcher.enabled and whole and 0 < layout.nbytes < _INLINE_BYTES:
                key = f"{step_dir}/{path}/{layout.chunk_key((0,) * len(layout.shape))}"
                job = batcher.add((key, consumer(path, layout, key)), layout.nbytes)
                if job:
                    yield job
            else:
                rest[path] = (layout, normalize((), layout.shape))
        job = batcher.flush()
        if job:
            yield job

    await _gather_bounded(jobs(), MAX_REQUESTS_IN_FLIGHT)
    out.update(await read_selections(storage, step_dir, rest, progress, parallel))
    return {path: out[path] for path in layouts}
