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
   object store is durable already. An incremental save whose record awaits the hashes of
   leaves it wrote without comparing (``_reuse``) writes the record during this step: it
   hashes them while the data is flushed, then writes the record and flushes it alone
   (``fsync`` of the file and of its directory).
4. **Publish.** Replace the manifest with one that lists the new step (its entry carries
   the crc32c of the step record), *if it is still the manifest this save started from*:
   locally under an exclusive ``flock`` on ``.zarrckpt.lock`` (temp file, ``fsync``,
   rename, ``fsync`` of the directory); on S3 one PUT with ``If-Match: <etag>`` or
   ``If-None-Match: *`` (Azure alike); on GCS ``ifGenerationMatch`` (``0`` for a new root);
   in memory a compare-and-set under a lock. If another writer published first, this save
   keeps its directory as its spare or deletes it (step 5) and raises :class:`~zarrckpt.errors.ConcurrentWriteError`: a commit
   is never lost silently. Backends that cannot compare-and-set (other fsspec filesystems,
   S3-compatible servers found to ignore the conditions) replace the manifest
   unconditionally: one writer per root, and the first commit to such a root in a process
   says so with a :class:`~zarrckpt.errors.SingleWriterWarning`.
5. **Release** the lease; a writer that lost the race in 4 first turns its directory into
   its spare (or deletes it) *under* the lease, so that directory is never lease-less.
6. **Collect** (best effort, :func:`collect_garbage`): delete the directories this commit
   dropped (``keep``, ``overwrite``) and debris of crashed or interrupted saves; with
   recycling, one dropped directory this process created becomes its spare instead. A
   failure here is reported as a :class:`~zarrckpt.errors.CollectionWarning`, not an error:
   the step is committed, and the next save collects what is left.

Safety, for every interleaving of any number of writers, collectors (``zarrckpt gc``, the
collection of other writers' commits) and readers on one root. Each claim names the tests
that check it: ``tests/test_protocol_model.py`` explores every interleaving of a model of
these steps (two writers, one recycling or losing and saving again, a collector, a reader;
it also finds the damage of the protocol before these rules), ``test_interleavings.py``
pauses real processes at each race point, ``test_multiwriter.py`` runs writers, ``gc`` and
a reader against each other (60 s in the slow suite), ``test_links.py`` covers links.

(a) *Collection never deletes a committed step, nor one being written.* A directory not
    listed by the manifest is garbage only if no writer holds its lease, and leases are
    checked *before* the manifest is read. A writer publishes while holding its lease and
    releases it only afterwards (a loser: after step 5's spare or deletion), so a directory
    whose lease was already gone when checked is either listed in the manifest read next,
    or was never committed. A commit only ever lists a *new* name, so a directory found
    unlisted is never listed again. (``test_interleavings``: collector while a writer
    creates its directory; every pause point of a dropping and a losing save.)
(b) *A directory leaves the step namespace by one atomic rename*, and only its renamer
    acts on it afterwards: a spare is ``.spare-<name>`` (the lease locked *before* the
    rename), a deletion first renames to ``.trash-<name>.<random>`` and only then unlinks.
    Two parties that both judge a dropped directory garbage (its dropper wanting a spare,
    a ``gc``) cannot both act: the second rename fails. ``rmtree`` unlinks through the
    directory it opened even after a rename, which is why it only ever runs on a
    ``.trash-`` name that no one else can reach. (Model: "writer+gc, recycled";
    ``test_interleavings``: a collector about to delete a dropped step its writer recycles,
    ``rmtree`` under way during the rename, ``gc`` while a writer holds a spare.)
(c) *A spare is rewritten only by its owner*, and only a directory that process created is
    ever its spare (never a downloaded step, nor another writer's). Its ``flock`` lease is
    held from before it became a spare until it is committed again or deleted; when the
    process dies the kernel drops the lock and the spare is debris.
(d) *A recycled file is never written through a link*: it is opened ``O_NOFOLLOW``, and one
    that is not a regular file with a single link (a ``cp -al`` backup shares it) is
    replaced by a new file. A ``zarr.json`` is left unwritten only if it is provably the
    file this process wrote there (inode, size, mtime; ``Storage.intact``).
    (``test_links``: hard-link backups stay valid; planted symbolic links are never
    written through.)
(e) *Readers never take other bytes for their step*: they read the manifest, then the
    step, then confirm that its directory still exists under its name
    (``Storage.step_exists``); a recycled or deleted directory has been renamed before any
    of its files change, so a read that confirms saw only the step's own bytes. (Model:
    "writer+gc+reader"; ``test_reader_races``.)
(f) *Incremental saves* (``_reuse``) hard-link unchanged files from the step the manifest
    listed as latest when the save began. A link shares an inode, never a name: deleting
    the source step leaves the new one whole, and by (d) no file with two links is ever
    rewritten in place. The source can only be recycled after a commit dropped it, which
    changes the manifest, so a save whose source was recycled under it fails its publish
    (g) and commits nothing; a source deleted meanwhile is written instead.
    (``test_incremental``; the stress tests run with incremental saves.)
(g) *Concurrent publishes*: exactly one of two writers starting from the same manifest
    commits; the other raises :class:`~zarrckpt.errors.ConcurrentWriteError` having changed
    nothing that is listed (``test_concurrency``).

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
from collections.abc import Set as AbstractSet
from dataclasses import replace
from typing import Any

from ._manifest import (
    MANIFEST_KEY,
    SPARE_PREFIX,
    TRASH_PREFIX,
    Manifest,
    StepInfo,
    checksum,
    parse_step_dir,
)
from ._storage import Storage
from .errors import ConcurrentWriteError, SingleWriterWarning, StoreError

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
    record: bytes | Callable[[], Awaitable[bytes]],
    write: Callable[[bytes | None], Awaitable[None]],
    recycle: bool = True,
) -> tuple[Manifest, Exception | None]:
    """Steps 1-6 for one step: ``write(old)`` writes its data and, last, ``record``; or
    writes its data only, and the record is the one ``record()`` completes once ``write``
    has returned (chunk hashes computed from the bytes just written), written here while
    the data is made durable (:func:`_record_last`).

    ``old`` is the step record of a recycled spare the data goes over (None: a fresh
    directory); ``recycle=False`` neither uses nor keeps spares.

    ``base``/``token`` are the manifest this save started from. Returns the published
    manifest and the error of collection, if it failed (the caller warns: collection
    is best effort). Raises :class:`ConcurrentWriteError` if another writer won.
    """
    old = await storage.begin_step(info.dir, recycle)
    try:
        try:
            await write(old)
            if callable(record):
                record = await _record_last(storage, info.dir, record)
            else:
                await storage.sync()
            info = replace(info, record_crc32c=checksum(record))
            new = base.with_step(info, keep)
            await storage.check_lease(info.dir)
        except Exception:
            # Best effort, so that a failed save leaves no gigabytes behind; an interrupt
            # (cancellation) skips this: the next save collects the directory.
            with contextlib.suppress(Exception):
                await _discard(storage, info.dir)
            raise
        published = await _not_abandoned(publish(storage, new, token))
    except BaseException:
        with contextlib.suppress(Exception):
            await storage.end_step(info.dir)
        raise
    if not published:
        # The spare is made under the lease this writer still holds, so the directory is
        # never lease-less in between (and is deleted only after a claim: see the storage).
        with contextlib.suppress(Exception):
            if not (recycle and await storage.make_spare(info.dir)):
                await _discard(storage, info.dir)
        raise ConcurrentWriteError(
            f"{storage.url}: another writer committed while step {info.step} was being saved; "
            "this step was not committed (nothing else changed). Save again to retry."
        )
    await storage.end_step(info.dir)
    try:
        await collect_garbage(storage, base.dirs - new.dirs, new.dirs, recycle)
    except Exception as exc:
        return new, exc
    return new, None


async def _record_last(
    storage: Storage, step_dir: str, make: Callable[[], Awaitable[bytes]]
) -> bytes:
    """Write the step record that ``make()`` completes, last, and make the step durable:
    the data is flushed while ``make()`` runs (on a local disk a save's CPU work then
    overlaps the wait for the disk), then the record alone. A failure of either stops the
    other."""
    flushing = asyncio.ensure_future(storage.sync())
    await asyncio.sleep(0)  # (the flush begins first)
    making = asyncio.ensure_future(make())
    try:
        done, _ = await asyncio.wait((flushing, making), return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # (the first error)
        await flushing
        record = await making
    except BaseException:
        for task in (flushing, making):
            task.cancel()
        await asyncio.gather(flushing, making, return_exceptions=True)
        raise
    key = f"{step_dir}/zarr.json"
    await storage.put(key, [record])
    await storage.sync([key])
    return record


async def _discard(storage: Storage, step_dir: str) -> None:
    """Give up the lease on an uncommitted ``step_dir`` and delete it."""
    try:
        await storage.end_step(step_dir)
    finally:
        await storage.delete_dir(step_dir)


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
    dropped: AbstractSet[str] = frozenset(),
    live: AbstractSet[str] = frozenset(),
) -> list[str]:
    """What step 6 collects, read-only: ``dropped`` step directories and debris.

    ``live`` are directories known to be committed (skipped without a look). Every other
    step directory is garbage if its lease has expired and the manifest, read after the
    lease checks, does not list it; so are spares whose owning process is gone.
    """
    names = await storage.list_dir("")
    dead: list[str] = []
    candidates: list[str] = []
    for name in names:
        if name.startswith(TRASH_PREFIX):  # claimed for deletion by a collector that died
            dead.append(name)
            continue
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
    dropped: AbstractSet[str] = frozenset(),
    live: AbstractSet[str] = frozenset(),
    recycle: bool = False,
) -> list[str]:
    """Step 6: delete what :func:`find_garbage` finds; returns the deleted names. With
    ``recycle``, the first dropped directory becomes this process's spare instead.

    Every name is tried; if some could not be deleted, :class:`StoreError` says which and
    why (and what was deleted) after the others are done.
    """
    deleted, failed = [], []
    for name in await find_garbage(storage, dropped, live):
        try:
            if name in dropped and recycle and await storage.make_spare(name):
                continue
            await storage.delete_dir(name)
        except Exception as exc:
            failed.append(f"{name} ({exc})")
            continue
        deleted.append(name)
    if failed:
        raise StoreError(
            f"{storage.url}: could not delete {len(failed)} of {len(failed) + len(deleted)} "
            f"unreferenced directories: {'; '.join(failed)}"
            + (f" (deleted: {', '.join(deleted)})" if deleted else "")
        )
    return deleted
