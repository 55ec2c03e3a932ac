"""The commit protocol: how a step becomes visible, and how old ones go away.

A checkpoint root holds a **manifest** (``zarr.json``, see ``_manifest``) that lists the
committed steps and their directories. A step is committed if and only if the manifest
lists it; readers trust nothing else. Saving step ``N`` is, in this order:

1. **Lease.** Take the writer's lease on a fresh directory ``step_<N>.<ms><random>`` (the
   name is new, so no reader or writer has seen it). Locally the directory appears by
   rename with an ``flock`` already held on its ``.zarrckpt-writing`` file; the kernel drops
   the lock if the writer dies. On object stores the first object written is a lease object
   with an expiry time, refreshed by a heartbeat (``_storage.objects``). On local disks the
   directory may be this process's *spare* (a step an earlier commit dropped, still leased
   by this process), renamed to the new name: its files are then rewritten in place.
2. **Write.** One Zarr array per leaf, a group ``zarr.json`` per container, and last the
   step record (the step group's ``zarr.json``), which indexes every leaf. A recycled
   directory is first trimmed of the files the new tree does not have.
3. **Make durable.** Locally one ``syncfs`` flushes every file and directory of the step
   (~50 ms for 6,000 inodes, against ~1 s for ``fsync`` of each). A completed PUT to an
   object store is durable already.
4. **Publish.** Replace the manifest with one that lists the new step (its entry carries
   the crc32c of the step record), *if it is still the manifest this save started from*:
   locally under an exclusive ``flock`` on ``.zarrckpt.lock`` (temp file, ``fsync``,
   rename, ``fsync`` of the directory); on S3 one PUT with ``If-Match: <etag>`` or
   ``If-None-Match: *`` (Azure alike); on GCS ``ifGenerationMatch`` (``0`` for a new root);
   in memory a compare-and-set under a lock. If another writer published first, this save
   removes its directory and raises :class:`~zarrckpt.errors.ConcurrentWriteError`: a commit
   is never lost silently. Backends that cannot compare-and-set (other fsspec filesystems,
   S3-compatible servers found to ignore the conditions) replace the manifest
   unconditionally: one writer per root, and the first commit to such a root in a process
   says so with a :class:`~zarrckpt.errors.SingleWriterWarning`.
5. **Release** the lease.
6. **Collect** (best effort, :func:`collect_garbage`): delete the directories this commit
   dropped (``keep``, ``overwrite``) and debris of crashed or interrupted saves; with
   recycling, one dropped directory becomes the spare instead (renamed, not deleted). A failure
   here is reported as a :class:`~zarrckpt.errors.CollectionWarning`, not an error: the
   step is committed, and the next save collects what is left.

Why collection cannot delete another writer's committed step: a directory not listed by
the manifest is debris only if no writer holds its lease, and leases are checked *before*
the manifest is read. A writer publishes while holding its lease and releases it only
afterwards, so a directory whose lease was already gone when checked is either listed in
the manifest read next, or was never committed (it lost the race, or its writer died).
The directories this commit itself dropped need no check: a commit only ever adds new
directories, so nobody can list a dropped one again.

Recycling keeps this safe: a spare is never listed, so it is taken without looking at the
manifest, and only by the process whose lease it holds; readers that still hold a view
of the dropped step confirm after each read that its directory exists under its old name
(it does not, once renamed), so they can never read the rewritten bytes as their step's.

A collective save of a multi-process JAX job (``_collective``) is this same protocol run
by process 0: the other processes write their chunks into the directory process 0 leased
(step 2) and make them durable (step 3) before process 0 writes the step record and
publishes; so a step is still committed by one conditional manifest update, by one process.

A crash before 4 leaves an unreferenced directory, invisible to readers and collected by a
later save; a crash after 4 leaves only garbage. Committed steps are never touched before
a manifest that no longer lists them is published. Ctrl-C during a save cancels it
(``_sync.run``): an interrupted save never publishes after the caller saw the interrupt.
"""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from ._manifest import MANIFEST_KEY, SPARE_PREFIX, Manifest, StepInfo, checksum, parse_step_dir
from ._storage import Storage
from .errors import ConcurrentWriteError, SingleWriterWarning

__all__ = [
    "collect_garbage",
    "commit_step",
    "find_garbage",
    "publish",
    "read_manifest",
    "read_manifest_versioned",
]

_warned_single_writer: set[str] = set()


async def read_manifest(storage: Storage) -> Manifest | None:
    """The committed manifest, or None where no checkpoint was ever committed."""
    manifest, _ = await read_manifest_versioned(storage)
    return manifest


async def read_manifest_versioned(storage: Storage) -> tuple[Manifest | None, Any]:
    """The manifest and the version token a later :func:`publish` compares against."""
    data, token = await storage.get_with_token(MANIFEST_KEY)
    if data is None:
        return None, None
    return Manifest.from_bytes(data, storage.describe(MANIFEST_KEY)), token


async def publish(storage: Storage, manifest: Manifest, token: Any) -> bool:
    """Step 4: publish ``manifest`` if the committed one still has version ``token``.

    The step's data must already be durable. Returns False if another writer published first.
    """
    if not storage.conditional_writes and storage.url not in _warned_single_writer:
        _warned_single_writer.add(storage.url)
        warnings.warn(
            f"{storage.url}: this backend cannot publish conditionally, so zarrckpt assumes "
            "one writer at a time on this root; two concurrent writers may lose a commit "
            "(see the README's Safety section)",
            SingleWriterWarning,
            stacklevel=2,
        )
    return await storage.put_if_unchanged(MANIFEST_KEY, manifest.to_bytes(), token)


async def commit_step(
    storage: Storage,
    base: Manifest,
    token: Any,
    info: StepInfo,
    keep: int | None,
    record: bytes,
    write: Callable[[bytes | None], Awaitable[None]],
    recycle: bool = True,
) -> tuple[Manifest, Exception | None]:
    """Steps 1-6 for one step: ``write(old)`` writes its data and, last, ``record``.

    ``old`` is the step record of a recycled spare the data goes over (None: a fresh
    directory); ``recycle=False`` neither uses nor keeps spares.

    ``base``/``token`` are the manifest this save started from. Returns the published
    manifest and the error of collection, if it failed (the caller warns: collection
    is best effort). Raises :class:`ConcurrentWriteError` if another writer won.
    """
    info = replace(info, record_crc32c=checksum(record))
    new = base.with_step(info, keep)
    old = await storage.begin_step(info.dir, recycle)
    leased = True
    try:
        try:
            await write(old)
            await storage.sync()
        except Exception:
            # Best effort, so that a failed save leaves no gigabytes behind; an interrupt
            # (cancellation) skips this: the next save collects the directory.
            leased = False
            with contextlib.suppress(Exception):
                await storage.end_step(info.dir)
                await storage.delete_dir(info.dir)
            raise
        published = await _not_abandoned(publish(storage, new, token))
    finally:
        if leased:
            await storage.end_step(info.dir)
    if not published:
        with contextlib.suppress(Exception):
            if not (recycle and await storage.make_spare(info.dir)):
                await storage.delete_dir(info.dir)
        raise ConcurrentWriteError(
            f"{storage.url}: another writer committed while step {info.step} was being saved; "
            "this step was not committed (nothing else changed). Save again to retry."
        )
    try:
        await collect_garbage(storage, base.dirs - new.dirs, new.dirs, recycle)
    except Exception as exc:
        return new, exc
    return new, None


async def _not_abandoned(coro: Awaitable[Any]) -> Any:
    """Await ``coro``; if cancelled meanwhile, let it finish before the cancellation goes on.

    A publish runs in a thread (temp file, fsync, rename) or as an HTTP request that the
    server may complete anyway: abandoning it would let the commit land *after* the caller
    saw its Ctrl-C. Waiting makes the order "committed, then interrupted" or "interrupted,
    nothing committed", never a commit after the interrupt.
    """
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.gather(task, return_exceptions=True)
        raise


async def find_garbage(
    storage: Storage,
    dropped: set[str] = frozenset(),  # type: ignore[assignment]
    live: set[str] = frozenset(),  # type: ignore[assignment]
) -> list[str]:
    """What step 6 collects, read-only: ``dropped`` step directories and debris.

    ``live`` are directories known to be committed (skipped without a look). Every other
    step directory is garbage if its lease has expired and the manifest, read after the
    lease checks, does not list it; so are spares whose owning process is gone.
    """
    names = await storage.list_dir("")
    dead, candidates = [], []
    for name in names:
        spare = name.startswith(SPARE_PREFIX)
        parsed = parse_step_dir(name[len(SPARE_PREFIX) :] if spare else name)
        if name in dropped:
            dead.append(name)
        elif (
            parsed is not None and name not in live and await storage.lease_expired(name, parsed[1])
        ):
            (dead if spare else candidates).append(name)  # spares are never listed
    if candidates:
        current = await read_manifest(storage)  # after the lease checks: see the docstring
        listed = current.dirs if current else set()
        dead += [n for n in candidates if n not in listed]
    return sorted(dead)


async def collect_garbage(
    storage: Storage,
    dropped: set[str] = frozenset(),  # type: ignore[assignment]
    live: set[str] = frozenset(),  # type: ignore[assignment]
    recycle: bool = False,
) -> list[str]:
    """Step 6: delete what :func:`find_garbage` finds; returns the deleted names. With
    ``recycle``, the first dropped directory becomes this process's spare instead."""
    deleted = []
    for name in await find_garbage(storage, dropped, live):
        if name in dropped and recycle and await storage.make_spare(name):
            continue
        await storage.delete_dir(name)
        deleted.append(name)
    return deleted
