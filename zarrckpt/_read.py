"""Reading committed steps: open one, materialise a sub-tree, restore into a target.

Everything a reader does starts from the manifest: :func:`open_step` finds the step there,
reads its record (one request) and checks the record's checksum against the manifest
entry; each part of the record is validated (``_tree.validate``: a path inside the step
directory, a possible layout, a known kind with what decoding it needs) before it is used
(:meth:`OpenStep.valid`), so nothing is read or allocated on an unchecked claim. Leaves larger than ``CROSS_CHECK_BYTES``, or cut into more than
``CROSS_CHECK_CHUNKS`` chunks, are also checked against their own ``zarr.json`` and the
listing of their chunks before their memory is allocated, so a record that claims a huge
array must agree with the array it names and with what its chunks can hold (the chunks
themselves are verified by checksum as they arrive). A lazy view skips those checks until
a whole leaf is materialised: slicing a huge leaf reads only what is asked for.

Nothing is read without a bound known before the read (``_manifest.*_MAX_BYTES`` for the
documents, the record's chunk sizes for chunks). And a step that a newer commit drops while
it is being read is a race, never damage: every read (the record's too) is confirmed
afterwards against the step's directory and, after a failure, against the newest manifest;
opening the latest step then starts again with the newer manifest, an explicit step is a
:class:`~zarrckpt.errors.CheckpointNotFoundError` saying that it was dropped.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from . import _leaves, _sharding, _tree
from ._commit import read_manifest
from ._engine import read_leaves, read_selections
from ._format import ArrayLayout
from ._indexing import normalize
from ._manifest import (
    METADATA_MAX_BYTES,
    STEP_RECORD_MAX_BYTES,
    Manifest,
    StepInfo,
    parse_json,
    parse_step_record,
)
from ._progress import human, progress_bar
from ._storage import Storage, open_storage
from ._sync import run
from .errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StructureMismatchError,
    StructureMismatchWarning,
    ZarrCkptError,
    ZarrCkptWarning,
)

__all__ = [
    "Mismatch",
    "OpenStep",
    "check_alive",
    "cross_check",
    "fetch",
    "materialize",
    "open_step",
    "read",
    "read_shards",
    "rebuild_leaf",
    "restore_into",
]

Mismatch = Literal["error", "warn", "ignore"]

#: Leaves above this size are checked against their own ``zarr.json`` and their chunk
#: listing before allocation (one read and one listing per such leaf).
CROSS_CHECK_BYTES = 64 * 1024 * 1024
#: ... and so are leaves cut into more chunks than this (a record claiming millions of tiny
#: chunks would otherwise cost per-chunk work before the first missing one is found).
CROSS_CHECK_CHUNKS = 4096
#: How many times opening the latest step starts again with a newer manifest when newer
#: commits drop the step being opened (a save loop with ``keep=1`` drops it at every commit,
#: so a slow reader may lose a few races in a row; each try costs two small reads).
OPEN_ATTEMPTS = 20


@dataclass(frozen=True)
class OpenStep:
    """A committed step: its storage, manifest entry and tree record.

    The record is validated lazily, part by part, as it is used (:meth:`valid`): opening a
    step of 100,000 leaves to read one of them costs the JSON parse, not a walk of all.
    """

    storage: Storage
    manifest: Manifest
    info: StepInfo
    record: dict[str, Any]
    _checked: set[tuple[int, str]] = field(default_factory=set, compare=False, repr=False)
    #: leaf path -> validated layout, filled as parts of the record are validated
    layouts: dict[str, ArrayLayout] = field(default_factory=dict, compare=False, repr=False)

    @property
    def location(self) -> str:
        return self.storage.describe(self.info.dir)

    def valid(self, record: dict[str, Any], path: str = "") -> dict[str, Any]:
        """``record`` (the sub-tree of this step's record at ``path``), once validated."""
        if (id(self.record), "") in self._checked or (id(record), path) in self._checked:
            return record
        where = self.storage.describe(f"{self.info.dir}/zarr.json")
        try:
            _tree.validate(record, path)
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"{where}: {exc}") from None
        # _tree.validate refused unsafe, duplicate or non-string paths and impossible layouts
        for rec in _tree.iter_leaf_records(record):
            self.layouts[rec["path"]] = ArrayLayout.from_json(
                rec, f"leaf {rec['path']!r} ({where})"
            )
        self._checked.add((id(record), path))
        return record


class _Dropped(Exception):
    """The step being opened was dropped by a newer commit meanwhile (not damage)."""

    def __init__(self, manifest: Manifest | None) -> None:
        super().__init__()
        self.manifest = manifest  # the newer one


def _read_record(storage: Storage, info: StepInfo) -> dict[str, Any]:
    """The tree record of the committed step ``info``, read as its data is (:func:`fetch`):
    confirmed afterwards to belong to a step still there under its name, or else
    :class:`_Dropped` with the newer manifest that no longer lists it. A failure of a step
    that the newest manifest still lists is damage."""
    key = f"{info.dir}/zarr.json"
    where = storage.describe(key)
    try:
        data = run(storage.get(key, STEP_RECORD_MAX_BYTES))
        if data is None:
            raise CorruptCheckpointError(
                f"{where} is missing: step {info.step} is listed in the manifest but its data "
                "is gone"
            )
        record = parse_step_record(data, info, where)
        if run(storage.step_exists(info.dir)):
            return record
        raise CorruptCheckpointError(
            f"{storage.describe(info.dir)} is gone: step {info.step} is listed in the manifest "
            "but its data is gone"
        )
    except CorruptCheckpointError:
        newer = run(read_manifest(storage))
        if newer is None or info.dir not in newer.dirs:
            raise _Dropped(newer) from None
        raise


def open_step(
    filename: Any, step: int | None = None, storage_options: dict[str, Any] | None = None
) -> OpenStep | None:
    """The committed step (latest if None), or None if there is no checkpoint at all."""
    storage = open_storage(filename, storage_options, read_only=True)
    if storage.is_file():
        raise CorruptCheckpointError(
            f"{storage.url} is a file, not a zarrckpt checkpoint directory (a msgpack "
            "checkpoint? read it with braintools.file.msgpack_load)"
        )
    manifest = run(read_manifest(storage))
    dropped = None  # the step that a newer commit dropped while it was being opened
    for _ in range(OPEN_ATTEMPTS):
        if manifest is None or not manifest.steps:
            if step is not None:
                raise CheckpointNotFoundError(
                    f"no checkpoint at {storage.url} (asked for step {step})"
                )
            return None
        info = manifest.latest if step is None else manifest.get(step)
        if info is None:
            gone = "is not committed"
            if dropped is not None:
                gone = "was dropped by a newer commit (retention or overwrite) while being opened"
            raise CheckpointNotFoundError(
                f"step {step} {gone} at {storage.url}; committed steps: {manifest.step_numbers}"
            )
        try:
            return OpenStep(storage, manifest, info, _read_record(storage, info))
        except _Dropped as exc:  # a race, not damage: open what the newer manifest lists
            dropped, manifest = info, exc.manifest
    assert dropped is not None
    raise CheckpointNotFoundError(
        f"{storage.url}: step {dropped.step} was dropped by a newer commit while it was being "
        f"opened, {OPEN_ATTEMPTS} times in a row (commits come faster than this reader opens "
        "a step); try again"
    )


def _gone(opened: OpenStep) -> CheckpointNotFoundError:
    return CheckpointNotFoundError(
        f"step {opened.info.step} of {opened.storage.url} has been deleted since this view "
        "was opened (retention or overwrite); open the checkpoint again"
    )


def check_alive(opened: OpenStep) -> None:
    """Raise if the step is no longer committed (deleted by retention or overwrite)."""
    manifest = run(read_manifest(opened.storage))
    if manifest is None or opened.info.dir not in manifest.dirs:
        raise _gone(opened)


def fetch(opened: OpenStep, coro: Any) -> Any:
    """Run a read of the step's data, then confirm the step still exists under its name.

    A local step that retention dropped is renamed (to be recycled) before any of its files
    is rewritten, so data read before the confirmation is the step's own; a damaged or
    missing chunk of a step that has gone is reported as the step having gone.
    """
    try:
        out = run(coro)
    except CorruptCheckpointError:
        if not run(opened.storage.step_exists(opened.info.dir)):
            raise _gone(opened) from None
        check_alive(opened)  # a deleted step (object stores) explains itself
        raise
    if not run(opened.storage.step_exists(opened.info.dir)):
        raise _gone(opened)
    return out


async def cross_check(opened: OpenStep, wanted: dict[str, ArrayLayout]) -> None:
    """Refuse large leaves whose ``zarr.json`` or chunk listing disagree with the record."""
    storage = opened.storage

    async def check(path: str, layout: ArrayLayout) -> None:
        leaf_dir = f"{opened.info.dir}/{path}"
        key = f"{leaf_dir}/zarr.json"
        where = f"leaf {path!r} ({storage.describe(key)})"
        data, names = await asyncio.gather(
            storage.get(key, METADATA_MAX_BYTES), storage.list_dir(leaf_dir)
        )
        if data is None:
            raise CorruptCheckpointError(f"{where}: the array's zarr.json is missing")
        doc = parse_json(data, where, "zarr.json")
        layout.check_zarr_json(doc, where)
        missing = layout.n_chunks - layout.count_chunk_keys(names)
        if missing:
            raise CorruptCheckpointError(
                f"leaf {path!r} ({storage.describe(leaf_dir)}): {missing} of its "
                f"{layout.n_chunks} chunks are missing"
            )

    large = [
        (p, lay)
        for p, lay in wanted.items()
        if lay.nbytes > CROSS_CHECK_BYTES or lay.n_chunks > CROSS_CHECK_CHUNKS
    ]
    await asyncio.gather(*(check(p, lay) for p, lay in large))


def read(
    opened: OpenStep, records: list[dict[str, Any]], parallel: bool, verbose: bool
) -> dict[str, Any]:
    """Whole leaves of an open step, path -> numpy array."""
    wanted = {rec["path"]: opened.layouts[rec["path"]] for rec in records}
    fetch(opened, cross_check(opened, wanted))
    total = sum(layout.nbytes for layout in wanted.values())
    start = time.perf_counter()
    with progress_bar(total, f"load step {opened.info.step}", verbose) as progress:
        arrays = fetch(
            opened, read_leaves(opened.storage, opened.info.dir, wanted, progress, parallel)
        )
    if verbose:
        print(
            f"zarrckpt: loaded step {opened.info.step} ({len(wanted)} leaves, {human(total)}) "
            f"from {opened.location} in {time.perf_counter() - start:.2f} s"
        )
    return arrays


def read_shards(opened: OpenStep, shardings: dict[str, Any], parallel: bool) -> dict[str, Any]:
    """Leaves (path -> target sharding) as global ``jax.Array``s: this process reads only the
    chunks that overlap its addressable shards, each chunk once where its shards tile a box
    (the usual case: a process's devices are a block of the mesh)."""
    import jax

    wanted = {path: opened.layouts[path] for path in shardings}
    fetch(opened, cross_check(opened, wanted))
    requests, placed = {}, {}
    for path, sharding in shardings.items():
        shape = wanted[path].shape
        regions = _sharding.regions(sharding, shape)
        box = _sharding.bounding([index for index, _ in regions])
        for n, read_as in enumerate([box] if box else [index for index, _ in regions]):
            requests[(path, n)] = (wanted[path], normalize(read_as, shape))
            placed[(path, n)] = [
                (_sharding.within(index, read_as), devices)
                for index, devices in regions
                if box or index == read_as
            ]
    storage, step_dir = opened.storage, opened.info.dir
    blocks = fetch(opened, read_selections(storage, step_dir, requests, parallel=parallel))
    out = {}
    for path, sharding in shardings.items():
        on_devices = [
            jax.device_put(block[inside], device)
            for name, block in blocks.items()
            if name[0] == path
            for inside, devices in placed[name]
            for device in devices
        ]
        out[path] = jax.make_array_from_single_device_arrays(
            wanted[path].shape, sharding, on_devices, dtype=wanted[path].dtype
        )  # (dtype: a process may hold no shard at all)
    return out


def _warn_missing_class(spec: str) -> None:
    warnings.warn(
        f"class {spec} is not loaded in this process (zarrckpt never imports a class named "
        "by a checkpoint); returning its fields as a dict",
        ZarrCkptWarning,
        stacklevel=4,
    )


def rebuild_leaf(opened: OpenStep, rec: dict[str, Any], fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` (``_leaves.decode``/``restore``): what the record and the data say may
    still be impossible to rebuild (text that is not UTF-8, a unit brainunit refuses)."""
    where = f"leaf {rec['path']!r} ({opened.location})"
    try:
        return fn(*args)
    except ZarrCkptError:
        raise
    except UnicodeDecodeError:
        raise CorruptCheckpointError(f"{where}: the stored text is not valid UTF-8") from None
    except (ValueError, TypeError, ArithmeticError) as exc:
        raise CorruptCheckpointError(
            f"{where}: cannot rebuild the saved {rec.get('kind', 'ndarray')} "
            f"({type(exc).__name__}: {exc})"
        ) from None


def materialize(
    opened: OpenStep, record: dict[str, Any], parallel: bool, verbose: bool, path: str = ""
) -> Any:
    """The sub-tree ``record`` (at ``path``) of an open step, as saved (arrays as numpy)."""
    opened.valid(record, path)
    arrays = read(opened, list(_tree.iter_leaf_records(record)), parallel, verbose)
    return _tree.unflatten(
        record,
        lambda rec: rebuild_leaf(opened, rec, _leaves.decode, rec, arrays[rec["path"]]),
        _warn_missing_class,
    )


def _compare(path: str, value: Any, rec: dict[str, Any], layout: ArrayLayout) -> str | None:
    """Why the saved leaf ``rec`` cannot restore ``value`` (None if it can)."""
    kind = rec.get("kind")
    if isinstance(value, (str, bytes)) or kind in ("str", "bytes"):
        expected = (
            "str" if isinstance(value, str) else "bytes" if isinstance(value, bytes) else "array"
        )
        found = kind if kind in ("str", "bytes") else "array"
        return (
            None if expected == found else f"{path}: target is {expected}, checkpoint has {found}"
        )
    described = _leaves.describe(value)
    if described is None:
        return f"{path}: target leaf of type {type(value).__name__} cannot be restored"
    shape, dtype = described
    if shape != layout.shape:
        return f"{path}: shape {layout.shape} in the checkpoint, {shape} in the target"
    if dtype != layout.dtype:
        return f"{path}: dtype {layout.dtype} in the checkpoint, {dtype} in the target"
    return _leaves.compare(path, value, rec)


def _not_stored(path: str, rec: dict[str, Any]) -> str:
    pytype = rec["pytype"].rpartition(":")[2] or rec["pytype"]
    return (
        f"{path}: not stored in the checkpoint (it held a {pytype[:80]}, which a load takes "
        "from its target)"
    )


def restore_into(
    opened: OpenStep, record: dict[str, Any], target: Any, mismatch: Mismatch, parallel: bool,
    verbose: bool, prefix: str = "",
) -> Any:  # fmt: skip
    """Restore the sub-tree ``record`` (stored under ``prefix``) into ``target``'s structure.

    Target leaves are paired with saved ones by their original keys (``_tree.match``), never
    by re-spelling names, so checkpoints of every naming scheme restore alike. Leaves that
    are not stored (``from_target``: functions, sentinels) keep the target's own objects.
    """
    opened.valid(record, prefix)
    pairs, unexpected = _tree.match(record, target, prefix)
    problems: list[str] = []
    wanted: dict[int, dict[str, Any]] = {}
    for i, (path, value, rec) in enumerate(pairs):
        if rec is not None and rec["type"] == _tree.FROM_TARGET:
            if _leaves.is_leaf(value):  # the target's is kept, but it expected a saved value
                problems.append(_not_stored(path, rec))
            continue  # not stored (a function, a sentinel): the target's own is kept
        problem = (
            f"{path}: missing from the checkpoint"
            if rec is None
            else _compare(path, value, rec, opened.layouts[rec["path"]])
        )
        if problem:
            problems.append(problem)
        elif rec is not None:  # (a missing leaf is a problem)
            wanted[i] = rec
    problems += [f"{p}: in the checkpoint, not in the target" for p in unexpected]
    if problems and mismatch != "ignore":
        listing = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        message = (
            f"{opened.location} does not match the target ({len(problems)} leaves):\n  {listing}"
        )
        if mismatch == "error":
            raise StructureMismatchError(message)
        warnings.warn(message, StructureMismatchWarning, stacklevel=3)
    shardings = {}  # leaves whose targets are sharded over processes: read per process
    for i, rec in wanted.items():
        inner = _leaves.global_target(rec["path"], pairs[i][1])
        if inner is not None:
            shardings[rec["path"]] = inner.sharding
    whole = [rec for rec in wanted.values() if rec["path"] not in shardings]
    arrays = read(opened, whole, parallel, verbose and bool(whole))
    if shardings:
        arrays.update(read_shards(opened, shardings, parallel))
    values = [
        rebuild_leaf(
            opened, wanted[i], _leaves.restore, value, wanted[i], arrays[wanted[i]["path"]]
        )
        if i in wanted
        else value
        for i, (_, value, _) in enumerate(pairs)
    ]  # mismatched or missing leaves keep the target's value
    return _tree.rebuild(target, values)
