"""The storage interface: the handful of async key/value operations a checkpoint needs.

A backend says what it can do with capability flags instead of being special-cased by
type (zarr-python's habit): the commit protocol (``zarrckpt._commit``) asks
``conditional_writes`` and ``leases`` to decide how safe concurrent writers are, the engine
asks ``zero_copy_writes``, ``reads_into`` and ``batches_small_io`` to pick its fast paths.
Keys are ``/``-separated and relative to the checkpoint root; every backend refuses keys
that would leave the root (:func:`check_key`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from .._manifest import MANIFEST_MAX_BYTES
from ..errors import CorruptCheckpointError, StoreError, ZarrCkptError

__all__ = [
    "Storage",
    "cannot_connect",
    "check_key",
    "copy_each",
    "is_relative_key",
    "no_aws_credentials",
    "one_line",
    "url_origin",
]


async def copy_each(
    src_dir: str, dst_dir: str, keys: Sequence[str], copy: Callable[[str, str], Any],
    in_flight: int = 32,
) -> set[str]:  # fmt: skip
    """Run ``await copy(src_dir/key, dst_dir/key)`` for each key, ``in_flight`` at a time;
    the keys whose copy failed (for :meth:`Storage.link_many`: the caller writes those)."""
    gate = asyncio.Semaphore(in_flight)
    failed: set[str] = set()

    async def one(key: str) -> None:
        async with gate:
            try:
                await copy(f"{src_dir}/{key}", f"{dst_dir}/{key}")
            except Exception:  # a missing source, a store without copies: written instead
                failed.add(key)

    await asyncio.gather(*(one(key) for key in keys))
    return failed


def is_relative_key(key: str) -> bool:
    """Whether ``key`` names something strictly inside a directory, on every backend.

    Keys come from checkpoint data (the manifest's step directories, the record's leaf
    paths), which may have been written by a stranger: an absolute path, a ``..``, an empty
    component, a backslash (a separator on Windows) or a NUL must never reach a filesystem
    or a bucket.
    """
    wrapped = f"/{key}/"  # (string searches: a save checks thousands of keys)
    return not (
        "//" in wrapped  # empty (or absolute) key, empty component, trailing "/"
        or "/./" in wrapped
        or "/../" in wrapped
        or "\\" in key
        or "\x00" in key
    )


def check_key(url: str, key: str) -> str:
    """``key`` if it names something inside the root (``""``: the root itself), else
    :class:`CorruptCheckpointError`."""
    if key and not is_relative_key(key):
        raise CorruptCheckpointError(
            f"{url}: refusing key {key!r:.200}, which leaves the checkpoint root"
        )
    return key


def one_line(exc: BaseException) -> str:
    """``Type: message`` of a backend's error on one line (obstore's errors append their Rust
    ``Debug`` form on many lines: dropped here, kept on the error itself)."""
    text = str(exc).split("\n\nDebug source:", 1)[0]
    return re.sub(r"\s*\n\s*", " ", f"{type(exc).__name__}: {text}").strip()


def url_origin(url: Any) -> str | None:
    """``scheme://host:port`` of a URL (None: not a URL)."""
    parts = urlsplit(url) if isinstance(url, str) else None
    return f"{parts.scheme}://{parts.netloc}" if parts and parts.scheme and parts.netloc else None


def cannot_connect(
    endpoint: str, reason: str, retries: int | None = None, elapsed: float | None = None
) -> str:
    """``could not connect to <endpoint>: <reason> (<n> retries, <t> s)``."""
    spent = [] if retries is None else [f"{retries} retr{'y' if retries == 1 else 'ies'}"]
    spent += [] if elapsed is None else [f"{elapsed:.1f} s"]
    return f"could not connect to {endpoint}: {reason}" + (
        f" ({', '.join(spent)})" if spent else ""
    )


def no_aws_credentials(endpoint: str | None, metadata: str | None = None) -> str:
    """The cause when no AWS credentials were found, with where the clients look;
    ``metadata``: what the instance metadata service said (default: whether it is off)."""
    if metadata is None and os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
        metadata = "off: AWS_EC2_METADATA_DISABLED=true"
    files = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials"
    return (
        f"no AWS credentials found{f' for {endpoint}' if endpoint else ''} (looked in "
        f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, {files}, AWS_PROFILE, instance metadata"
        f"{f' [{metadata}]' if metadata else ''})"
    )


class Storage:
    """Async operations on one checkpoint root; subclasses implement them per backend."""

    url: str

    # --- capabilities ----------------------------------------------------------------------
    #: :meth:`sync` makes written data durable (local disks); elsewhere a completed write is
    durable: bool = False
    #: :meth:`put_if_unchanged` is enforced by the backend, across processes and machines;
    #: without it the root supports one writer at a time (the commit warns once)
    conditional_writes: bool = False
    #: a step directory being written is recognisable as such (:meth:`lease_expired`), so
    #: garbage collection never takes another writer's unfinished step for debris
    leases: bool = False
    #: :meth:`put` writes the given buffers without copying them
    zero_copy_writes: bool = False
    #: :meth:`read_into` exists (blocking, called from I/O threads)
    reads_into: bool = False
    #: small writes and reads should be grouped (:meth:`put_batch`, :meth:`get_batch`)
    batches_small_io: bool = False
    #: dropped step directories are kept as spares and rewritten in place by the next save
    #: (see ``LocalStorage``): no inodes created or freed in a save loop
    recycles: bool = False
    #: default chunk size: object stores get more, smaller requests in flight (and finer
    #: lazy slices, where every byte crosses the network); local disks read fewer, larger
    #: files faster (see ``_format.DEFAULT_CHUNK_BYTES``)
    default_chunk_bytes: int = 16 * 1024 * 1024

    def describe(self, key: str = "") -> str:
        """A human-readable location for ``key`` (for messages)."""
        return f"{self.url.rstrip('/')}/{key}" if key else self.url

    #: where this root's requests go (``http://127.0.0.1:9000``), for messages; None: the
    #: client's default (local disks, memory)
    endpoint: str | None = None

    def explain(self, exc: Exception, elapsed: float) -> tuple[type[StoreError], str]:
        """The error class and the one-line cause of a backend failure (``elapsed``: the
        seconds the operation ran); backends recognise their clients' failures
        (:func:`cannot_connect`, :func:`no_aws_credentials`)."""
        return StoreError, one_line(exc)

    @contextlib.asynccontextmanager
    async def errors(self, op: str, key: str) -> AsyncIterator[None]:
        """Backend failures become :class:`StoreError` (or the subclass saying what went
        wrong) in one line naming the location and the cause; the backend's own error,
        whole, is the ``__cause__``."""
        start = time.monotonic()
        try:
            yield
        except ZarrCkptError:
            raise
        except Exception as exc:
            kind, cause = self.explain(exc, time.monotonic() - start)
            raise kind(f"{op} {self.describe(key)} failed: {cause}") from exc

    def too_large(self, key: str, size: int | None, limit: int) -> CorruptCheckpointError:
        """The error for a value of ``size`` bytes (None: unknown, more than ``limit``)
        where at most ``limit`` are read (see :meth:`get`)."""
        found = f"more than {limit}" if size is None else f"{size}"
        return CorruptCheckpointError(
            f"{self.describe(key)} holds {found} bytes, more than the {limit} bytes zarrckpt "
            "reads there; refusing to read it (damaged, or not written by zarrckpt)"
        )

    # --- data ------------------------------------------------------------------------------
    async def get(self, key: str, limit: int | None = None) -> bytes | None:
        """The value of ``key``, or None if it does not exist.

        With ``limit``, a value of more than ``limit`` bytes is refused
        (:meth:`too_large`) from its size, before it is read: a checkpoint's files may come
        from a stranger, and a reader must not spend what a file's size claims.
        """
        raise NotImplementedError

    async def put(self, key: str, parts: Sequence[Any]) -> None:
        """Write the concatenation of ``parts`` (buffers) under ``key``."""
        raise NotImplementedError

    async def put_atomic(self, key: str, data: bytes) -> None:
        """Replace ``key`` so that readers see the old or the new value, never a mix."""
        raise NotImplementedError

    def read_into(self, key: str, buffers: list[Any]) -> int | None:
        """Fill ``buffers`` in order from ``key``'s value; its size in bytes, or None if it
        does not exist. Blocking; only where :attr:`reads_into`."""
        raise NotImplementedError

    async def put_batch(self, items: Sequence[tuple[str, Callable[[], Sequence[Any]]]]) -> None:
        """Write ``key -> make()`` for each item (``make`` encodes; called once)."""
        for key, make in items:
            await self.put(key, make())

    async def get_batch(
        self, items: Sequence[tuple[str, Callable[[bytes | None], None]]], limit: int | None = None
    ) -> None:
        """Read each key and hand its bytes (None if missing) to the item's consumer; each
        value is bounded by ``limit`` as in :meth:`get`."""
        for key, consume in items:
            consume(await self.get(key, limit))

    async def link_many(self, src_dir: str, dst_dir: str, keys: Sequence[str]) -> set[str]:
        """Make each ``dst_dir/key`` hold the bytes of ``src_dir/key`` (a file of a
        committed step) without sending them: a hard link locally, a server-side copy on
        object stores. Returns the keys that could not be done so (the caller writes
        those); a backend without such an operation returns them all."""
        return set(keys)

    async def list_dir(self, prefix: str = "") -> list[str]:
        """Names directly under ``prefix``, sorted."""
        raise NotImplementedError

    async def delete_dir(self, prefix: str) -> None:
        """Delete everything under ``prefix``."""
        raise NotImplementedError

    async def sync(self, keys: Sequence[str] = ()) -> None:
        """Make everything written so far durable, or only the files ``keys`` (with their
        names in their directories); a no-op where writes are durable already."""

    def is_file(self) -> bool:
        """Whether the root is an existing non-directory (e.g. an old msgpack checkpoint)."""
        return False

    # --- commit support (see zarrckpt._commit) ---------------------------------------------
    async def get_with_token(
        self, key: str, limit: int | None = MANIFEST_MAX_BYTES
    ) -> tuple[bytes | None, Any]:
        """The value and a version token for :meth:`put_if_unchanged`; the value is bounded
        as in :meth:`get`, by default as the manifest (the document read this way) is."""
        data = await self.get(key, limit)
        return data, data

    async def put_if_unchanged(self, key: str, data: bytes, token: Any) -> bool:
        """Atomically replace ``key`` if it still has version ``token`` (None: absent).

        Returns False, writing nothing, if another writer changed it. Backends without
        conditional writes replace unconditionally (single-writer assumption).
        """
        await self.put_atomic(key, data)
        return True

    async def begin_step(self, step_dir: str, recycle: bool = False) -> bytes | None:
        """Take the writer's lease on a new ``step_dir`` (see :meth:`lease_expired`).

        With ``recycle`` (and :attr:`recycles`), ``step_dir`` may be a spare renamed into
        place: then the spare's old step record is returned, else None.
        """
        return None

    async def make_spare(self, step_dir: str) -> bool:
        """Keep ``step_dir`` as this process's spare: a dropped (no longer listed) step it
        created, or the one it holds the lease of and lost the commit with. False: delete it."""
        return False

    async def drop_spares(self) -> None:
        """Give up this process's spares on this root (deleting them)."""

    async def trim(self, step_dir: str, keep: set[str]) -> None:
        """Delete every file under a recycled ``step_dir`` whose key is not in ``keep``."""

    async def intact(self, step_dir: str, keys: frozenset[str]) -> frozenset[str]:
        """Those of ``keys`` (relative to a recycled ``step_dir``) that are provably the very
        files this process wrote there, unchanged since: only these may be left unwritten."""
        return frozenset()

    async def step_exists(self, step_dir: str) -> bool:
        """Whether ``step_dir`` still exists under its name (readers confirm after reading)."""
        return True

    async def check_lease(self, step_dir: str) -> None:
        """Raise :class:`StoreError` if ``step_dir`` is no longer the directory whose lease
        this writer holds (checked right before publishing)."""

    async def end_step(self, step_dir: str) -> None:
        """Give up the lease: the writer of ``step_dir`` committed or gave up."""

    async def lease_expired(self, step_dir: str, created: float) -> bool:
        """Whether no live writer holds ``step_dir`` (``created``: the time in its name).

        True for a finished step (its writer released the lease) and for a dead writer's
        debris; False while a writer is at work. Without leases: always True.
        """
        return True
