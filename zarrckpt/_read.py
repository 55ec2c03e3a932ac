"""Reading committed steps: open one, materialise a sub-tree, restore into a target.

Everything a reader does starts from the manifest: :func:`open_step` finds the step there,
reads its record (one request), checks the record's checksum against the manifest entry
and validates every leaf record before anything is allocated (:func:`check_leaves`): a
path inside the step directory, a possible layout, a known kind with what decoding it
needs. Leaves larger than ``CROSS_CHECK_BYTES``, or cut into more than
``CROSS_CHECK_CHUNKS`` chunks, are also checked against their own ``zarr.json`` and the
listing of their chunks before their memory is allocated, so a record that claims a huge
array must agree with the array it names and with what its chunks can hold (the chunks
themselves are verified by checksum as they arrive). A lazy view skips those checks until
a whole leaf is materialised: slicing a huge leaf reads only what is asked for.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from . import _leaves, _tree
from ._commit import read_manifest
from ._engine import read_leaves
from ._format import ArrayLayout, shown
from ._manifest import Manifest, StepInfo, parse_step_record
from ._repr import human
from ._storage import Storage, open_storage
from ._storage.base import is_relative_key
from ._sync import run
from .errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StructureMismatchError,
    StructureMismatchWarning,
    ZarrCkptWarning,
)

__all__ = [
    "Mismatch",
    "OpenStep",
    "check_alive",
    "check_leaves",
    "materialize",
    "open_step",
    "progress_bar",
    "read",
    "restore_into",
]

Mismatch = Literal["error", "warn", "ignore"]

#: Leaves above this size are checked against their own ``zarr.json`` and their chunk
#: listing before allocation (one read and one listing per such leaf).
CROSS_CHECK_BYTES = 64 * 1024 * 1024
#: ... and so are leaves cut into more chunks than this (a record claiming millions of tiny
#: chunks would otherwise cost per-chunk work before the first missing one is found).
CROSS_CHECK_CHUNKS = 4096

#: Leaf kinds (``_leaves.encode``) decoded as the stored array itself.
_ARRAY_KINDS = frozenset({"ndarray", "jax", "brainpy", "state", "quantity"})
#: ``py`` leaves: the Python type, and the numpy dtype kinds it can be rebuilt from.
_PY_TYPES = {"bool": "b", "int": "biu", "float": "biuf", "complex": "biufc"}


@contextmanager
def progress_bar(total: int, desc: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A byte progress bar, shown only for operations that last more than a second."""
    bar = tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
        delay=1.0, leave=False, disable=not enabled, file=sys.stderr,
    )  # fmt: skip
    try:
        yield bar.update
    finally:
        bar.close()


@dataclass(frozen=True)
class OpenStep:
    """A committed step: its storage, manifest entry and tree record."""

    storage: Storage
    manifest: Manifest
    info: StepInfo
    record: dict[str, Any]
    #: leaf path -> validated layout, for every leaf of the record
    layouts: dict[str, ArrayLayout]

    @property
    def location(self) -> str:
        return self.storage.describe(self.info.dir)


def _read_record(storage: Storage, info: StepInfo) -> dict[str, Any]:
    key = f"{info.dir}/zarr.json"
    data = run(storage.get(key))
    if data is None:
        raise CorruptCheckpointError(
            f"{storage.describe(key)} is missing: step {info.step} is listed in the manifest "
            "but its data is gone"
        )
    return parse_step_record(data, info, storage.describe(key))


def _finite(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_unit(unit: Any, where: str) -> None:
    """A brainunit unit record (``_leaves._unit_record``) has the fields and types it needs."""
    ok = (
        isinstance(unit, dict)
        and isinstance(unit.get("dim"), list)
        and len(unit["dim"]) == 7
        and all(_finite(d) for d in unit["dim"])
        and type(unit.get("scale")) is int
        and all(_finite(unit.get(k)) for k in ("base", "factor"))
        and all(isinstance(unit.get(k), str) for k in ("name", "dispname"))
    )
    if not ok:
        raise CorruptCheckpointError(
            f"{where}: malformed unit record (expected dim: 7 numbers, scale: int, base and "
            f"factor: numbers, name and dispname: str), got {shown(unit)}"
        )


def _check_kind(rec: dict[str, Any], layout: ArrayLayout, where: str) -> None:
    """What a leaf's kind needs to be decoded (``_leaves.decode``) is in its record."""
    kind = rec.get("kind", "ndarray")
    if not isinstance(kind, str) or (
        kind not in _ARRAY_KINDS and kind not in ("py", "npscalar", "str", "bytes")
    ):
        raise CorruptCheckpointError(f"{where}: unknown leaf kind {shown(kind)}")
    if kind in ("py", "npscalar") and layout.shape:
        raise CorruptCheckpointError(
            f"{where}: a {kind} leaf must be 0-d, got shape {layout.shape}"
        )
    if kind == "py":
        pytype = rec.get("pytype")
        if not isinstance(pytype, str) or pytype not in _PY_TYPES:
            raise CorruptCheckpointError(
                f"{where}: pytype must be one of {', '.join(_PY_TYPES)}, got {shown(pytype)}"
            )
        if layout.dtype.kind not in _PY_TYPES[pytype]:
            raise CorruptCheckpointError(
                f"{where}: a Python {pytype} cannot be stored as {layout.dtype}"
            )
    elif kind in ("str", "bytes") and (layout.dtype != np.uint8 or len(layout.shape) != 1):
        raise CorruptCheckpointError(
            f"{where}: a {kind} leaf must be a 1-d uint8 array, got shape {layout.shape}, "
            f"{layout.dtype}"
        )
    elif kind == "quantity":
        _check_unit(rec.get("unit"), where)


def check_leaves(record: dict[str, Any], where: str) -> dict[str, ArrayLayout]:
    """Leaf path -> layout for the leaf records of a tree record (of the step record at
    ``where``), validated.

    A record may come from a stranger: each path must stay inside the step directory and
    be used once, each layout must be possible, each kind known and decodable.
    """
    try:
        return _check_leaves(_tree.iter_leaf_records(record), where)
    except (KeyError, TypeError, AttributeError, RecursionError) as exc:  # walking the tree
        raise CorruptCheckpointError(f"{where}: malformed tree record ({exc!r})") from None


def _check_leaves(records: Iterable[Any], where: str) -> dict[str, ArrayLayout]:
    out: dict[str, ArrayLayout] = {}
    for rec in records:
        path = rec.get("path") if isinstance(rec, dict) else None
        if not isinstance(path, str):
            raise CorruptCheckpointError(f"{where}: malformed leaf record {shown(rec)}")
        if not is_relative_key(path):
            raise CorruptCheckpointError(
                f"{where}: leaf path {path!r:.300} leaves the step directory (an absolute "
                "path, a '..' or an empty component); refusing it"
            )
        if path in out:
            raise CorruptCheckpointError(f"{where}: two leaves have the path {path!r:.300}")
        leaf_where = f"leaf {path!r:.300} ({where})"
        layout = ArrayLayout.from_json(rec, leaf_where)
        _check_kind(rec, layout, leaf_where)
        out[path] = layout
    return out


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
    if manifest is None or not manifest.steps:
        if step is not None:
            raise CheckpointNotFoundError(f"no checkpoint at {storage.url} (asked for step {step})")
        return None
    info = manifest.latest if step is None else manifest.get(step)
    if info is None:
        raise CheckpointNotFoundError(
            f"step {step} is not committed at {storage.url}; committed steps: "
            f"{manifest.step_numbers}"
        )
    record = _read_record(storage, info)
    layouts = check_leaves(record, storage.describe(f"{info.dir}/zarr.json"))
    return OpenStep(storage, manifest, info, record, layouts)


def check_alive(opened: OpenStep) -> None:
    """Raise if the step is no longer committed (deleted by retention or overwrite)."""
    manifest = run(read_manifest(opened.storage))
    info = opened.info
    if manifest is None or info.dir not in manifest.dirs:
        raise CheckpointNotFoundError(
            f"step {info.step} of {opened.storage.url} has been deleted since this view "
            "was opened (retention or overwrite); open the checkpoint again"
        )


async def _cross_check(opened: OpenStep, wanted: dict[str, ArrayLayout]) -> None:
    """Refuse large leaves whose ``zarr.json`` or chunk listing disagree with the record."""
    storage = opened.storage

    async def check(path: str, layout: ArrayLayout) -> None:
        leaf_dir = f"{opened.info.dir}/{path}"
        key = f"{leaf_dir}/zarr.json"
        where = f"leaf {path!r} ({storage.describe(key)})"
        data, names = await asyncio.gather(storage.get(key), storage.list_dir(leaf_dir))
        if data is None:
            raise CorruptCheckpointError(f"{where}: the array's zarr.json is missing")
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise CorruptCheckpointError(f"{where}: zarr.json is not valid JSON ({exc})") from None
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
    run(_cross_check(opened, wanted))
    total = sum(layout.nbytes for layout in wanted.values())
    start = time.perf_counter()
    with progress_bar(total, f"load step {opened.info.step}", verbose) as progress:
        arrays = run(read_leaves(opened.storage, opened.info.dir, wanted, progress, parallel))
    if verbose:
        print(
            f"zarrckpt: loaded step {opened.info.step} ({len(wanted)} leaves, {human(total)}) "
            f"from {opened.location} in {time.perf_counter() - start:.2f} s"
        )
    return arrays


def _warn_missing_class(spec: str) -> None:
    warnings.warn(
        f"namedtuple class {spec} cannot be imported; returning its fields as a dict",
        ZarrCkptWarning,
        stacklevel=4,
    )


def _rebuild(opened: OpenStep, rec: dict[str, Any], fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` (``_leaves.decode``/``restore``): what the record and the data say may
    still be impossible to rebuild (text that is not UTF-8, a unit brainunit refuses)."""
    where = f"leaf {rec['path']!r} ({opened.location})"
    try:
        return fn(*args)
    except UnicodeDecodeError:
        raise CorruptCheckpointError(f"{where}: the stored text is not valid UTF-8") from None
    except (ValueError, TypeError, ArithmeticError) as exc:
        raise CorruptCheckpointError(
            f"{where}: cannot rebuild the saved {rec.get('kind', 'ndarray')} "
            f"({type(exc).__name__}: {exc})"
        ) from None


def materialize(opened: OpenStep, record: dict[str, Any], parallel: bool, verbose: bool) -> Any:
    """The sub-tree ``record`` of an open step, as saved (arrays as numpy)."""
    arrays = read(opened, list(_tree.iter_leaf_records(record)), parallel, verbose)
    return _tree.unflatten(
        record,
        lambda rec: _rebuild(opened, rec, _leaves.decode, rec, arrays[rec["path"]]),
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
    return None


def restore_into(
    opened: OpenStep, record: dict[str, Any], target: Any, mismatch: Mismatch, parallel: bool,
    verbose: bool, prefix: str = "",
) -> Any:  # fmt: skip
    """Restore the sub-tree ``record`` (stored under ``prefix``) into ``target``'s structure."""
    saved = {rec["path"][len(prefix) :].lstrip("/"): rec for rec in _tree.iter_leaf_records(record)}
    _, flat, _ = _tree.flatten(target)
    problems, wanted = [], {}
    for path, value in flat:
        rec = saved.get(path)
        problem = (
            f"{path}: missing from the checkpoint"
            if rec is None
            else _compare(path, value, rec, opened.layouts[rec["path"]])
        )
        if problem:
            problems.append(problem)
        else:
            wanted[path] = rec
    target_paths = {path for path, _ in flat}
    problems += [
        f"{p}: in the checkpoint, not in the target" for p in saved if p not in target_paths
    ]
    if problems and mismatch != "ignore":
        listing = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        message = (
            f"{opened.location} does not match the target ({len(problems)} leaves):\n  {listing}"
        )
        if mismatch == "error":
            raise StructureMismatchError(message)
        warnings.warn(message, StructureMismatchWarning, stacklevel=3)
    arrays = read(opened, list(wanted.values()), parallel, verbose)

    def restore(path: str, value: Any) -> Any:
        if path not in wanted:
            return value  # mismatched or missing: the target keeps its value
        rec = wanted[path]
        return _rebuild(opened, rec, _leaves.restore, value, rec, arrays[rec["path"]])

    return _tree.map_leaves(target, restore)
