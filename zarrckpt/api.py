"""``save_pytree`` / ``load_pytree`` and step queries: drop-ins for ``bp.checkpoints``.

The positional parameters are BrainPy 2.8's own (``save_pytree(filename, target,
overwrite=True, async_manager=None, verbose=True)``, ``load_pytree(filename, target=None,
parallel=True)``); zarrckpt's additions are keyword-only.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from . import _collective, _read, _write
from ._commit import read_manifest
from ._read import Mismatch
from ._storage import open_storage
from ._sync import run
from .errors import MissingCheckpointWarning

__all__ = ["latest_step", "list_steps", "load_pytree", "save_pytree"]


def save_pytree(
    filename: Any,
    target: Any,
    overwrite: bool = True,
    async_manager: Any = None,
    verbose: bool = True,
    *,
    step: int | None = None,
    keep: int | None = _write.DEFAULT_KEEP,
    storage_options: dict[str, Any] | None = None,
    chunk_bytes: int | None = None,
    codec: str | None = None,
    recycle: bool = True,
    dims: dict[str, Sequence[str]] | None = None,
    incremental: bool = True,
) -> str:
    """Save ``target`` as a new step of the checkpoint at ``filename``.

    Args:
        filename: checkpoint root: a directory path, an fsspec URL (``s3://b/run``,
            ``memory://x``), an fsspec mapper or a zarr ``Store``. Created if needed.
        target: a PyTree of dict/list/tuple/namedtuple/None whose leaves are arrays (numpy,
            JAX, BrainPy ``Variable``/``Array``, brainstate ``State``), brainunit
            Quantities, numbers, ``str`` or ``bytes``.
        overwrite: if True (BrainPy's default), replace ``step`` if it exists and drop later
            steps. If False, committed data is protected: saving with ``step=None`` into a
            root that has a committed step, or an explicit ``step`` at or below the latest,
            raises :class:`AlreadyExistsError`, and retention never deletes a step.
        async_manager: an :class:`AsyncManager`; the call then returns once the target is
            snapshotted, and writing happens in the background.
        verbose: print a summary (and a progress bar for saves longer than a second).
        step: step number; ``None`` means one past the latest (0 for a new root).
        keep: keep the newest ``keep`` steps after committing (None keeps all). Default:
            1 with ``overwrite=True``, all with ``overwrite=False`` (where an explicit
            ``keep`` that would delete a committed step raises).
        storage_options: passed to fsspec for URLs (credentials, ``endpoint_url``, ...).
        chunk_bytes: target uncompressed chunk size (default 64 MiB on local disks, 16 MiB
            on object stores; smaller makes lazy slices finer, larger loads faster).
        codec: ``"none"``, ``"zstd[:level]"`` or ``"gzip[:level]"`` for every leaf; by default
            integer and bool leaves get ``zstd:1``, float leaves and leaves of at most 64
            bytes none.
        recycle: on local disks, keep the step that retention drops as a hidden spare and
            rewrite it in place at the next save, instead of deleting one directory tree
            and creating another (several times faster in a save loop; costs the disk space
            of one more step). ``False`` deletes dropped steps and any spare.
        dims: dimension names of some leaves, by leaf path (``{"l1/W": ("pre", "post"),
            "l1/V": ("neuron",)}``): what xarray and ``LazyArray.dims`` call their axes
            (default ``<leaf path>_<axis>``, unique in the step). Leaves that share a name
            must agree on its size wherever xarray meets them (in one group, or a group and
            its ancestors).
        incremental: chunks whose bytes the latest committed step already holds (same
            layout, same xxh3-128 content hash, recorded per chunk; the same ``jax.Array``
            object needs no hashing) are hard-linked from it on local disks and copied
            server-side on object stores, instead of written. Every step stays a complete
            Zarr group: deleting one never breaks another. ``False`` writes every byte.
            (Collective multi-process saves always write every byte.)

    A save into a local directory without ``async_manager`` pauses Python's cyclic garbage
    collector until the call returns (and restores it; one the caller disabled stays
    disabled, and a forked child gets it back): a save makes and drops records per leaf, and
    collections triggered by them would walk the whole process.

    Returns:
        The location of the step's Zarr group.
    """
    return _write.save(
        filename, target, overwrite=overwrite, async_manager=async_manager, verbose=verbose,
        step=step, keep=keep, storage_options=storage_options, chunk_bytes=chunk_bytes,
        codec=codec, recycle=recycle, dims=dims, incremental=incremental,
    )  # fmt: skip


def load_pytree(
    filename: Any,
    target: Any = None,
    parallel: bool = True,
    *,
    step: int | None = None,
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
    ``parallel=False`` reads one chunk at a time.

    If there is no checkpoint at ``filename`` (and ``step`` is None) the target is returned
    unchanged with a :class:`MissingCheckpointWarning`, as ``bp.checkpoints`` does; a
    ``step`` that is not committed raises :class:`CheckpointNotFoundError`.
    """
    agreed = _collective.group(target, "load")  # first: it numbers collective loads
    try:
        if mismatch not in ("error", "warn", "ignore"):
            raise ValueError(f"mismatch must be 'error', 'warn' or 'ignore', got {mismatch!r}")
        storage = open_storage(filename, storage_options, read_only=True)
        opened = _collective.open_agreed(
            agreed, storage.url, step, lambda s: _read.open_step(storage, s)
        )
    except BaseException as exc:
        if agreed is not None:  # tell the other processes, so they do not wait for us
            agreed.fail(exc)
        raise
    if opened is None:
        warnings.warn(
            f"no checkpoint at {storage.url}; returning the target unchanged",
            MissingCheckpointWarning,
            stacklevel=2,
        )
        return target
    if target is None:
        return _read.materialize(opened, opened.record, parallel, verbose)
    return _read.restore_into(opened, opened.record, target, mismatch, parallel, verbose)


def list_steps(filename: Any, storage_options: dict[str, Any] | None = None) -> list[int]:
    """The committed steps at ``filename``, oldest first (empty if there is no checkpoint)."""
    manifest = run(read_manifest(open_storage(filename, storage_options, read_only=True)))
    return manifest.step_numbers if manifest else []


def latest_step(filename: Any, storage_options: dict[str, Any] | None = None) -> int | None:
    """The newest committed step at ``filename``, or None."""
    steps = list_steps(filename, storage_options)
    return steps[-1] if steps else None
