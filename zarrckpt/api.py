"""``save_pytree`` / ``load_pytree`` and step queries: drop-ins for ``bp.checkpoints``."""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from tqdm.auto import tqdm

from . import _leaves, _tree
from ._engine import LeafData, read_leaves, write_step
from ._format import ArrayLayout
from ._manifest import (
    FORMAT_VERSION,
    Manifest,
    StepInfo,
    collect_garbage,
    commit,
    new_step_dir,
    read_manifest,
    read_manifest_versioned,
)
from ._repr import human as _human
from ._store import Storage, open_storage
from ._sync import run
from .errors import (
    AlreadyExistsError,
    CheckpointNotFoundError,
    ConcurrentWriteError,
    CorruptCheckpointError,
    MissingCheckpointWarning,
    StructureMismatchError,
    StructureMismatchWarning,
    ZarrCkptWarning,
)

__all__ = ["latest_step", "list_steps", "load_pytree", "save_pytree"]

Mismatch = Literal["error", "warn", "ignore"]


@contextmanager
def _progress(total: int, desc: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A byte progress bar, shown only for operations that last more than a second."""
    bar = tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
        delay=1.0, leave=False, disable=not enabled, file=sys.stderr,
    )  # fmt: skip
    try:
        yield bar.update
    finally:
        bar.close()


# --- save ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """A flattened, host-side snapshot of a tree, ready to write."""

    record: dict[str, Any]
    leaves: list[LeafData]
    groups: list[str]

    @property
    def nbytes(self) -> int:
        return sum(leaf.layout.nbytes for leaf in self.leaves)


def _plan(target: Any, *, copy: bool, chunk_bytes: int | None, codec: str | None) -> _Plan:
    record, flat, groups = _tree.flatten(target)
    by_path = {rec["path"]: rec for rec in _tree.iter_leaf_records(record)}
    leaves = []
    for path, value in flat:
        array, kind = _leaves.encode(path, value, copy=copy)
        layout = ArrayLayout.for_array(array, chunk_bytes, codec)
        by_path[path].update(kind, **layout.to_json())
        leaves.append(LeafData(path, array, layout, {}))
    return _Plan(record, leaves, groups)


def _resolve_step(manifest: Manifest, step: int | None, overwrite: bool, where: str) -> int:
    latest = manifest.latest
    if step is None:
        return 0 if latest is None else latest.step + 1
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int or None, got {step!r}")
    if not overwrite and latest is not None and latest.step >= step:
        raise AlreadyExistsError(
            f"{where}: cannot save step {step}: step {latest.step} is already committed "
            "(pass overwrite=True to replace it and drop later steps)"
        )
    return step


async def _write_and_commit(
    storage: Storage, manifest: Manifest, token: Any, plan: _Plan, info: StepInfo,
    keep: int | None, progress: Callable[[int], None],
) -> None:  # fmt: skip
    attributes = {"zarrckpt": {"version": FORMAT_VERSION, "step": info.step, "tree": plan.record}}
    await storage.begin_step(info.dir)
    try:
        await write_step(storage, info.dir, plan.leaves, plan.groups, attributes, progress)
        await storage.sync()
        new_manifest = manifest.with_step(info, keep)
        committed = await commit(storage, new_manifest, token)
    finally:
        await storage.end_step(info.dir)
    if not committed:
        await storage.delete_dir(info.dir)
        raise ConcurrentWriteError(
            f"{storage.url}: another writer committed while step {info.step} was being saved; "
            "this step was not committed (nothing else changed). Save again to retry."
        )
    await collect_garbage(storage, manifest, new_manifest)


def save_pytree(
    filename: Any,
    target: Any,
    *,
    step: int | None = None,
    overwrite: bool = True,
    keep: int | None = 1,
    async_manager: Any = None,
    verbose: bool = True,
    storage_options: dict[str, Any] | None = None,
    chunk_bytes: int | None = None,
    codec: str | None = None,
) -> str:
    """Save ``target`` as a new step of the checkpoint at ``filename``.

    Args:
        filename: checkpoint root: a directory path, an fsspec URL (``s3://b/run``,
            ``memory://x``) or a zarr ``Store``. Created if needed.
        target: a PyTree of dict/list/tuple/namedtuple/None whose leaves are arrays (numpy,
            JAX, BrainPy ``Variable``/``Array``, brainstate ``State``), brainunit
            Quantities, numbers, ``str`` or ``bytes``.
        step: step number; ``None`` means one past the latest (0 for a new root).
        overwrite: if False, raise :class:`AlreadyExistsError` when a step ``>= step`` is
            committed; if True, replace ``step`` and drop later steps.
        keep: keep the newest ``keep`` steps after committing (None keeps all).
        async_manager: an :class:`AsyncManager`; the call then returns once the target is
            snapshotted, and writing happens in the background.
        verbose: print a summary (and a progress bar for saves longer than a second).
        storage_options: passed to fsspec for URLs (credentials, ``endpoint_url``, ...).
        chunk_bytes: target uncompressed chunk size (default 64 MiB on local disks, 16 MiB
            on object stores; smaller makes lazy slices finer, larger loads faster).
        codec: ``"none"``, ``"zstd[:level]"`` or ``"gzip[:level]"`` for every leaf; by default
            integer and bool leaves get ``zstd:1`` and float leaves none.

    Returns:
        The location of the step's Zarr group.
    """
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be a positive int or None, got {keep!r}")
    storage = open_storage(filename, storage_options)
    if storage.is_file():
        raise AlreadyExistsError(
            f"{storage.url} is an existing file (an old single-file checkpoint?); "
            "zarrckpt needs a directory path"
        )
    if async_manager is not None:
        async_manager.wait_previous_save()  # overwrite/keep must see committed state
    chunk_bytes = chunk_bytes or storage.default_chunk_bytes
    plan = _plan(target, copy=async_manager is not None, chunk_bytes=chunk_bytes, codec=codec)
    found, token = run(read_manifest_versioned(storage))
    manifest = found or Manifest()
    number = _resolve_step(manifest, step, overwrite, storage.url)
    info = StepInfo(number, new_step_dir(number), time.time(), len(plan.leaves), plan.nbytes)
    location = storage.describe(info.dir)

    def task() -> None:
        start = time.perf_counter()
        show_bar = verbose and async_manager is None
        with _progress(plan.nbytes, f"save step {number}", show_bar) as progress:
            run(_write_and_commit(storage, manifest, token, plan, info, keep, progress))
        if verbose:
            print(
                f"zarrckpt: saved step {number} ({info.leaves} leaves, {_human(info.nbytes)}) "
                f"to {location} in {time.perf_counter() - start:.2f} s"
            )

    if async_manager is None:
        task()
    else:
        async_manager.save_async(task)
    return location


# --- load ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _OpenStep:
    """A committed step: its storage, manifest entry and tree record."""

    storage: Storage
    manifest: Manifest
    info: StepInfo
    record: dict[str, Any]

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
    try:
        meta = json.loads(data)["attributes"]["zarrckpt"]
        return meta["tree"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(f"{storage.describe(key)}: no zarrckpt tree record") from exc


def _open_step(
    filename: Any, step: int | None, storage_options: dict[str, Any] | None
) -> _OpenStep | None:
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
    return _OpenStep(storage, manifest, info, _read_record(storage, info))


def _layouts(records: list[dict[str, Any]]) -> dict[str, ArrayLayout]:
    return {rec["path"]: ArrayLayout.from_json(rec) for rec in records}


def _read(
    opened: _OpenStep, records: list[dict[str, Any]], parallel: bool, verbose: bool
) -> dict[str, Any]:
    layouts = _layouts(records)
    total = sum(layout.nbytes for layout in layouts.values())
    start = time.perf_counter()
    with _progress(total, f"load step {opened.info.step}", verbose) as progress:
        arrays = run(read_leaves(opened.storage, opened.info.dir, layouts, progress, parallel))
    if verbose:
        print(
            f"zarrckpt: loaded step {opened.info.step} ({len(layouts)} leaves, {_human(total)}) "
            f"from {opened.location} in {time.perf_counter() - start:.2f} s"
        )
    return arrays


def _warn_missing_class(spec: str) -> None:
    warnings.warn(
        f"namedtuple class {spec} cannot be imported; returning its fields as a dict",
        ZarrCkptWarning,
        stacklevel=4,
    )


def _materialize(opened: _OpenStep, record: dict[str, Any], parallel: bool, verbose: bool) -> Any:
    """The sub-tree ``record`` of an open step, as saved (arrays as numpy)."""
    arrays = _read(opened, list(_tree.iter_leaf_records(record)), parallel, verbose)
    return _tree.unflatten(
        record, lambda rec: _leaves.decode(rec, arrays[rec["path"]]), _warn_missing_class
    )


def _compare(path: str, value: Any, rec: dict[str, Any]) -> str | None:
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
    layout = ArrayLayout.from_json(rec)
    if shape != layout.shape:
        return f"{path}: shape {layout.shape} in the checkpoint, {shape} in the target"
    if dtype != layout.dtype:
        return f"{path}: dtype {layout.dtype} in the checkpoint, {dtype} in the target"
    return None


def _restore_into(
    opened: _OpenStep, record: dict[str, Any], target: Any, mismatch: Mismatch, parallel: bool,
    verbose: bool, prefix: str = "",
) -> Any:  # fmt: skip
    """Restore the sub-tree ``record`` (stored under ``prefix``) into ``target``'s structure."""
    saved = {rec["path"][len(prefix) :].lstrip("/"): rec for rec in _tree.iter_leaf_records(record)}
    _, flat, _ = _tree.flatten(target)
    problems, wanted = [], {}
    for path, value in flat:
        rec = saved.get(path)
        problem = (
            f"{path}: missing from the checkpoint" if rec is None else _compare(path, value, rec)
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
    arrays = _read(opened, list(wanted.values()), parallel, verbose)

    def restore(path: str, value: Any) -> Any:
        if path not in wanted:
            return value  # mismatched or missing: the target keeps its value
        rec = wanted[path]
        return _leaves.restore(value, rec, arrays[rec["path"]])

    return _tree.map_leaves(target, restore)


def load_pytree(
    filename: Any,
    target: Any = None,
    *,
    step: int | None = None,
    parallel: bool = True,
    mismatch: Mismatch = "error",
    storage_options: dict[str, Any] | None = None,
    verbose: bool = False,
) -> Any:
    """Load a committed step (the latest by default).

    Without ``target`` the tree comes back as saved, arrays as numpy. With ``target`` the
    values are restored into its structure and types: JAX arrays keep the target's
    sharding, BrainPy variables and brainstate States are updated in place. Leaves whose
    path, shape or dtype differ are handled by ``mismatch`` (``"error"`` raises
    :class:`StructureMismatchError`; ``"warn"``/``"ignore"`` keep the target's value).

    If there is no checkpoint at ``filename`` (and ``step`` is None) the target is returned
    unchanged with a :class:`MissingCheckpointWarning`, as ``bp.checkpoints`` does; a
    ``step`` that is not committed raises :class:`CheckpointNotFoundError`.
    """
    if mismatch not in ("error", "warn", "ignore"):
        raise ValueError(f"mismatch must be 'error', 'warn' or 'ignore', got {mismatch!r}")
    storage = open_storage(filename, storage_options, read_only=True)
    opened = _open_step(storage, step, None)
    if opened is None:
        warnings.warn(
            f"no checkpoint at {storage.url}; returning the target unchanged",
            MissingCheckpointWarning,
            stacklevel=2,
        )
        return target
    if target is None:
        return _materialize(opened, opened.record, parallel, verbose)
    return _restore_into(opened, opened.record, target, mismatch, parallel, verbose)


def list_steps(filename: Any, storage_options: dict[str, Any] | None = None) -> list[int]:
    """The committed steps at ``filename``, oldest first (empty if there is no checkpoint)."""
    manifest = run(read_manifest(open_storage(filename, storage_options, read_only=True)))
    return manifest.step_numbers if manifest else []


def latest_step(filename: Any, storage_options: dict[str, Any] | None = None) -> int | None:
    """The newest committed step at ``filename``, or None."""
    steps = list_steps(filename, storage_options)
    return steps[-1] if steps else None
