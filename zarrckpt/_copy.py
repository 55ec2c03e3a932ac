"""Copying committed steps from one root to another (``zarrckpt cp``), byte for byte.

A copy is the same step. Every object of the source step is read and written unchanged:
each chunk file, each array's and each group's ``zarr.json``, and last the step record,
whose bytes are the source's: the copy keeps the dimension names, chunking and codecs, the
kind of every leaf (a JAX array stays one), the PyTree node classes and the chunk hashes
(``xxh3``) of its source. Objects travel concurrently with bounded memory (``_engine``'s
byte budget and request limit; one object, at most one chunk, is read whole), and each is
checked on the way: a chunk by its crc32c (its last 4 bytes, of the rest:
``ArrayLayout.encode_chunk``), an array's ``zarr.json`` against the record (as ``zarrckpt
verify`` does), the record against the manifest's checksum. A damaged source is refused,
naming the object, and nothing is published.

The copy is published by the ordinary commit protocol (``_commit.commit_step``), as a new
directory of the destination root with the same step number. It shares nothing with its
source (no links), and a concurrent writer of the destination wins or loses against it as
against any save. With ``verify`` every object written is read back and compared (length
and crc32c of the whole object) before the record is written, so a copy that did not arrive
intact is never committed. A step that a newer commit drops from the source while it is
being copied is a race, not damage: it is reported as such, and nothing is published.

``codec``/``chunk_bytes`` ask for another operation, a re-encoded copy: the same record with
each leaf's chunking and codec replaced (and its chunk hashes, which depend on the chunking
only, dropped where the chunking changes), the values decoded and encoded again.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import google_crc32c
import numpy as np

from . import _tree
from ._commit import commit_step, read_manifest, read_manifest_versioned
from ._engine import (
    MAX_BYTES_IN_FLIGHT,
    MAX_REQUESTS_IN_FLIGHT,
    LeafData,
    _Budget,
    _gather_bounded,
    read_leaves,
    write_step,
)
from ._format import ArrayLayout, chunk_shape, parse_codec
from ._leaves import HASH_FIELD
from ._manifest import (
    METADATA_MAX_BYTES,
    STEP_RECORD_MAX_BYTES,
    Manifest,
    StepInfo,
    new_step_dir,
    parse_json,
    parse_step_record,
)
from ._storage import Storage
from ._sync import run
from .errors import (
    AlreadyExistsError,
    CheckpointNotFoundError,
    CollectionWarning,
    CorruptCheckpointError,
)

__all__ = ["Copied", "check_destination", "copy_step", "group_paths"]

#: Objects claimed to hold at most this many bytes move in batches where both storages
#: batch small I/O (local disks): one thread hop per batch instead of two per file.
_SMALL = 256 * 1024
_BATCH_ITEMS = 128
_BATCH_BYTES = 4 * 1024 * 1024
#: What a ``zarr.json`` takes of the byte budget (its read is bounded by METADATA_MAX_BYTES)
_JSON_BUDGET = 4096
#: Objects larger than this are checksummed in a thread, off the event loop
_OFFLOAD = 1024 * 1024
#: Bytes of decoded values a re-encoded copy holds at once (a bigger leaf goes alone)
_REENCODE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Copied:
    """A committed copy: its step, where it is, and what it holds."""

    step: int
    location: str
    leaves: int
    nbytes: int
    #: files copied besides the step record (None: a re-encoded copy)
    files: int | None


@dataclass(frozen=True)
class _Object:
    """One file of a step (key relative to the step directory) and how it is checked."""

    key: str
    what: str  # "chunk", "array" (an array's zarr.json) or "group" (a group's zarr.json)
    limit: int  # the most bytes it may hold (a larger one is refused unread)
    budget: int  # bytes it holds of the budget while in flight
    progress: int = 0  # the leaf bytes it stands for (progress bars)
    path: str = ""  # the leaf it belongs to
    layout: ArrayLayout | None = None
    dims: Any = None


# --- what a step is made of -----------------------------------------------------------------


#: the record types of containers, each stored as a group (``_tree.flatten``)
_GROUP_TYPES = frozenset({"dict", "odict", "list", "tuple", "namedtuple", "pytree"})


def group_paths(tree: dict[str, Any]) -> list[str]:
    """The paths of a step's groups below its root (whose ``zarr.json`` is the step record),
    as the writer made them (``_tree.flatten``): each container, and each intermediate level
    of a tuple key; a State has none of its own."""
    out: list[str] = []

    def walk(rec: dict[str, Any], path: str) -> None:
        for _, name, child in _tree.labelled_children(rec):  # States unwrapped
            if child.get("type") not in _GROUP_TYPES:  # leaves, None, taken from a target
                continue
            sub = f"{path}/{name}" if path else name
            out.append(sub)
            walk(child, sub)

    walk(tree, "")
    return out


def _leaf_layouts(tree: dict[str, Any], where: str) -> dict[str, tuple[ArrayLayout, Any]]:
    """Leaf path -> (layout, dimension names) of a validated tree record."""
    return {
        rec["path"]: (
            ArrayLayout.from_json(rec, f"leaf {rec['path']!r} ({where})"),
            rec.get("dims"),
        )
        for rec in _tree.iter_leaf_records(tree)
    }


def _objects(tree: dict[str, Any], where: str) -> Iterator[_Object]:
    """Every file of a step but its record, groups first, each leaf's ``zarr.json`` before
    its chunks."""
    for path in group_paths(tree):
        yield _Object(f"{path}/zarr.json", "group", METADATA_MAX_BYTES, _JSON_BUDGET)
    for path, (layout, dims) in _leaf_layouts(tree, where).items():
        yield _Object(
            f"{path}/zarr.json", "array", METADATA_MAX_BYTES, _JSON_BUDGET, 0, path, layout, dims
        )
        if not layout.nbytes:
            continue
        size = layout.max_chunk_file_bytes
        for idx in layout.chunk_ids():
            region = layout.chunk_region(idx)
            held = math.prod(r.stop - r.start for r in region) * layout.dtype.itemsize
            key = f"{path}/{layout.chunk_key(idx)}"
            yield _Object(key, "chunk", size, size, held, path, layout)


def _check(obj: _Object, data: Any, where: str) -> int:
    """The crc32c of the whole of ``data``, once it is known to be what ``obj`` must hold."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if obj.what == "chunk":
        assert obj.layout is not None
        if buf.size < 4:
            raise CorruptCheckpointError(f"{where}: chunk is truncated ({buf.size} bytes)")
        crc = google_crc32c.value(buf[:-4])
        if crc != int.from_bytes(buf[-4:].tobytes(), "little"):
            raise CorruptCheckpointError(
                f"{where}: crc32c checksum mismatch (the chunk is damaged)"
            )
        if obj.layout.codec == "none" and buf.size != obj.layout.chunk_nbytes + 4:
            raise CorruptCheckpointError(
                f"{where}: chunk holds {buf.size - 4} bytes, expected {obj.layout.chunk_nbytes}"
            )
        return int(google_crc32c.extend(crc, buf[-4:]))
    if obj.what == "array":
        assert obj.layout is not None
        data = bytes(buf)
        if data != _array_json(obj.layout, obj.path, obj.dims):  # what zarrckpt writes today
            doc = parse_json(data, where, "zarr.json")
            obj.layout.check_whole_zarr_json(doc, where, obj.path, obj.dims)
        return int(google_crc32c.value(buf))
    doc = parse_json(bytes(buf), where, "zarr.json")
    if not (
        isinstance(doc, dict) and doc.get("zarr_format") == 3 and doc.get("node_type") == "group"
    ):
        raise CorruptCheckpointError(f"{where}: not a Zarr v3 group's zarr.json")
    return int(google_crc32c.value(buf))


def _array_json(layout: ArrayLayout, path: str, dims: Any) -> bytes:
    """The bytes of the ``zarr.json`` the writer gives this leaf (``_engine.write_step``); one
    that differs (an older version's, another key order) is compared field by field."""
    return json.dumps(layout.zarr_json(None, path, dims), separators=(",", ":")).encode()


# --- moving objects -------------------------------------------------------------------------


async def _offload(nbytes: int, fn: Callable[..., Any], *args: Any) -> Any:
    if nbytes < _OFFLOAD:
        return fn(*args)
    import asyncio

    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _batches(objects: list[_Object], batching: bool) -> Iterator[list[_Object]]:
    """``objects`` grouped: small ones in batches where ``batching``, each other alone."""
    batch: list[_Object] = []
    held = 0
    for obj in objects:
        if not batching or obj.budget > _SMALL:
            yield [obj]
            continue
        batch.append(obj)
        held += obj.budget
        if len(batch) >= _BATCH_ITEMS or held >= _BATCH_BYTES:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


async def _each(storage: Storage, keys: list[str], limit: int, batch: bool) -> list[Any]:
    """The values of ``keys`` (None where missing): one batch request, or one per key."""
    if batch:
        got: dict[str, Any] = {}

        def keep(key: str) -> Callable[[bytes | None], None]:
            return lambda data: got.__setitem__(key, data)

        await storage.get_batch([(k, keep(k)) for k in keys], limit)
        return [got.get(k) for k in keys]
    return [await storage.get(k, limit) for k in keys]


async def _run_batches(
    objects: list[_Object], batching: bool, work: Callable[[list[_Object]], Awaitable[None]]
) -> None:
    """``work`` on each batch of ``objects``, concurrently, within the byte budget."""
    budget = _Budget(MAX_BYTES_IN_FLIGHT)

    def job(batch: list[_Object]) -> Callable[[], Awaitable[None]]:
        held = sum(o.budget for o in batch)

        async def run_it() -> None:
            await budget.acquire(held)
            try:
                await work(batch)
            finally:
                await budget.release(held)

        return run_it

    await _gather_bounded((job(b) for b in _batches(objects, batching)), MAX_REQUESTS_IN_FLIGHT)


async def _transfer(
    src: Storage, src_dir: str, dst: Storage, dst_dir: str, objects: list[_Object],
    progress: Callable[[int], None],
) -> dict[str, tuple[int, int]]:  # fmt: skip
    """Copy each object, checked; key -> (length, crc32c) of each written (a group's
    ``zarr.json`` that the source lacks, as old steps may, is left out)."""
    written: dict[str, tuple[int, int]] = {}
    batching = src.batches_small_io and dst.batches_small_io

    async def work(batch: list[_Object]) -> None:
        limit = max(o.limit for o in batch)
        many = len(batch) > 1
        found = await _each(src, [f"{src_dir}/{o.key}" for o in batch], limit, many)
        items: list[tuple[str, Callable[[], list[Any]]]] = []
        for obj, data in zip(batch, found, strict=True):
            where = src.describe(f"{src_dir}/{obj.key}")
            if data is None:
                if obj.what == "group":
                    continue
                what = "chunk" if obj.what == "chunk" else "the array's zarr.json"
                raise CorruptCheckpointError(f"{where}: {what} is missing")
            crc = await _offload(len(data), _check, obj, data, where)
            written[obj.key] = (len(data), crc)
            items.append((f"{dst_dir}/{obj.key}", _parts(data)))
        if many:
            await dst.put_batch(items)
        else:
            for key, make in items:
                await dst.put(key, make())
        progress(sum(o.progress for o in batch))

    await _run_batches(objects, batching, work)
    return written


async def _compare(
    dst: Storage, dst_dir: str, objects: list[_Object], written: dict[str, tuple[int, int]],
    step: int,
) -> None:  # fmt: skip
    """Read back every object written and compare it with what was sent."""
    sent = [o for o in objects if o.key in written]

    async def work(batch: list[_Object]) -> None:
        limit = max(o.limit for o in batch)
        keys = [f"{dst_dir}/{o.key}" for o in batch]
        found = await _each(dst, keys, limit, len(batch) > 1)
        for obj, data in zip(batch, found, strict=True):
            got = None if data is None else (len(data), _whole_crc(data))
            if got != written[obj.key]:
                problem = "is missing" if data is None else "holds other bytes than its source"
                raise CorruptCheckpointError(
                    f"the copy of step {step} at {dst.describe(dst_dir)} does not match its "
                    f"source: {obj.key} {problem}"
                )

    await _run_batches(sent, dst.batches_small_io, work)


def _parts(data: Any) -> Callable[[], list[Any]]:
    return lambda: [data]


def _bytes(data: Any) -> bytes | None:
    return None if data is None else bytes(data)


def _whole_crc(data: Any) -> int:
    return int(google_crc32c.value(np.frombuffer(data, dtype=np.uint8)))


# --- one step -------------------------------------------------------------------------------


def _read_record(src: Storage, info: StepInfo) -> tuple[bytes, dict[str, Any]]:
    """The step record's bytes and its validated tree record."""
    key = f"{info.dir}/zarr.json"
    where = src.describe(key)
    data = run(src.get(key, STEP_RECORD_MAX_BYTES))
    if data is None:
        raise CorruptCheckpointError(
            f"{where} is missing: step {info.step} is listed in the manifest but its data is gone"
        )
    data = bytes(data)
    tree = parse_step_record(data, info, where)
    try:
        _tree.validate(tree)
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(f"{where}: {exc}") from None
    return data, tree


def check_destination(url: str, base: Manifest, step: int, overwrite: bool) -> None:
    """Refuse to commit ``step`` where ``base`` (the manifest of the root at ``url``) has it
    or a later step, unless ``overwrite`` (the CLI's ``--overwrite``)."""
    later = [s.step for s in base.steps if s.step >= step]
    if not later or overwrite:
        return
    if later == [step]:
        raise AlreadyExistsError(
            f"{url}: step {step} is already committed there; pass --overwrite to replace it"
        )
    raise AlreadyExistsError(
        f"{url}: steps {later} are committed there, at or after step {step}; pass --overwrite "
        f"to replace step {step} (the steps after it are dropped)"
    )


async def _dropped(src: Storage, info: StepInfo) -> bool:
    """Whether a newer commit dropped the source step (so a failed read was a race)."""
    if not await src.step_exists(info.dir):
        return True
    newer = await read_manifest(src)
    return newer is None or info.dir not in newer.dirs


def _dropped_error(src: Storage, info: StepInfo) -> CheckpointNotFoundError:
    return CheckpointNotFoundError(
        f"step {info.step} of {src.url} was dropped by a newer commit (retention or overwrite) "
        "while it was being copied; nothing was copied"
    )


def copy_step(
    src: Storage,
    step: int,
    dst: Storage,
    *,
    overwrite: bool = False,
    verify: bool = True,
    progress: Callable[[int], None] = lambda n: None,
    codec: str | None = None,
    chunk_bytes: int | None = None,
) -> Copied:
    """Copy committed ``step`` of ``src`` into ``dst`` as the same step (see the module
    docstring); ``overwrite`` replaces that step there and drops the ones after it."""
    manifest = run(read_manifest(src))
    info = manifest.get(step) if manifest is not None else None
    if info is None:
        committed = manifest.step_numbers if manifest is not None else []
        raise CheckpointNotFoundError(
            f"step {step} is not committed at {src.url}; committed steps: {committed}"
        )
    try:
        record, tree = _read_record(src, info)
    except CorruptCheckpointError:
        if run(_dropped(src, info)):
            raise _dropped_error(src, info) from None
        raise
    where = src.describe(f"{info.dir}/zarr.json")
    if codec is not None or chunk_bytes is not None:
        record, write_data = _reencoding(src, info, record, tree, codec, chunk_bytes, verify)
        objects: list[_Object] = []
    else:
        objects = list(_objects(tree, where))
        write_data = None
    found, token = run(read_manifest_versioned(dst))
    base = found or Manifest()
    check_destination(dst.url, base, step, overwrite)
    new = StepInfo(step, new_step_dir(step), info.time, info.leaves, info.nbytes)

    written: dict[str, tuple[int, int]] = {}

    async def write(old: bytes | None) -> None:  # recycle=False: never a recycled directory
        try:
            if write_data is not None:
                await write_data(dst, new.dir, progress)
            else:
                written.update(await _transfer(src, info.dir, dst, new.dir, objects, progress))
        except CorruptCheckpointError:
            if await _dropped(src, info):
                raise _dropped_error(src, info) from None
            raise
        # Confirm that what was read is the step's own: a dropped local directory is renamed
        # before any of its files change (``_commit``, rule (e)).
        if await _dropped(src, info):
            raise _dropped_error(src, info)
        if verify and write_data is None:
            await _compare(dst, new.dir, objects, written, step)
        key = f"{new.dir}/zarr.json"
        await dst.put(key, [record])
        if verify and _bytes(await dst.get(key, STEP_RECORD_MAX_BYTES)) != record:
            raise CorruptCheckpointError(
                f"the copy of step {step} at {dst.describe(new.dir)} does not match its "
                "source: its step record holds other bytes"
            )

    _, collect_error = run(commit_step(dst, base, token, new, None, record, write, False))
    if collect_error is not None:
        warnings.warn(
            f"{dst.url}: step {step} is copied and committed, but deleting the steps it "
            f"replaced failed ({type(collect_error).__name__}: {collect_error}); `zarrckpt gc` "
            "or the next save retries",
            CollectionWarning,
            stacklevel=2,
        )
    files = len(written) if write_data is None else None
    return Copied(step, dst.describe(new.dir), info.leaves, info.nbytes, files)


# --- a re-encoded copy ----------------------------------------------------------------------


def _reencoding(
    src: Storage, info: StepInfo, record: bytes, tree: dict[str, Any], codec: str | None,
    chunk_bytes: int | None, verify: bool,
) -> tuple[bytes, Callable[..., Awaitable[None]]]:  # fmt: skip
    """The record of a re-encoded copy, and the coroutine function that writes its data."""
    where = src.describe(f"{info.dir}/zarr.json")
    codec = parse_codec(codec) if codec is not None else None
    source = _leaf_layouts(tree, where)
    records = {rec["path"]: rec for rec in _tree.iter_leaf_records(tree)}
    target: dict[str, ArrayLayout] = {}
    for path, (layout, _) in source.items():
        chunks = layout.chunks
        if chunk_bytes is not None:
            chunks = chunk_shape(layout.shape, layout.dtype.itemsize, chunk_bytes)
        new = replace(layout, chunks=chunks, codec=codec or layout.codec)
        target[path] = new
        records[path].update(new.to_json())
        if new.chunks != layout.chunks:
            records[path].pop(HASH_FIELD, None)  # hashes are per chunk: they no longer fit
    doc = json.loads(record)
    doc["attributes"]["zarrckpt"]["tree"] = tree
    new_record = json.dumps(doc, separators=(",", ":")).encode()
    groups = group_paths(tree)

    async def write(dst: Storage, step_dir: str, progress: Callable[[int], None]) -> None:
        first = True
        for batch in _leaf_batches(source):
            arrays = await read_leaves(src, info.dir, {p: source[p][0] for p in batch})
            leaves = [LeafData(p, arrays[p], target[p], {}, source[p][1]) for p in batch]
            await write_step(dst, step_dir, leaves, groups if first else [], None, progress)
            first = False
            if verify:
                back = await read_leaves(dst, step_dir, {p: target[p] for p in batch})
                for p in batch:
                    if back[p].tobytes() != arrays[p].tobytes():
                        raise CorruptCheckpointError(
                            f"the copy of step {info.step} at {dst.describe(step_dir)} does not "
                            f"match its source: leaf {p!r} reads back other values"
                        )
        if first and groups:  # a step without leaves still has its groups
            await write_step(dst, step_dir, [], groups, None, progress)

    return new_record, write


def _leaf_batches(layouts: dict[str, tuple[ArrayLayout, Any]]) -> Iterator[list[str]]:
    batch: list[str] = []
    held = 0
    for path, (layout, _) in layouts.items():
        if batch and held + layout.nbytes > _REENCODE_BYTES:
            yield batch
            batch, held = [], 0
        batch.append(path)
        held += layout.nbytes
    if batch:
        yield batch
