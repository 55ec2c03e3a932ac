"""Where a checkpoint lives: a local directory, or any zarr store / fsspec URL.

:func:`open_storage` turns what the user passed (a path, a ``file://``, ``memory://``,
``s3://``, ``gs://`` ... URL, or a zarr ``Store``) into a :class:`Storage`: the handful of
async operations the engine needs. Local directories get a direct implementation (plain
file writes from a thread pool, and ``syncfs`` for durability), because zarr's
``LocalStore`` costs several times more per small file and never flushes to stable
storage. Everything else goes through zarr's store abstraction (``FsspecStore`` for URLs).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import fsspec.core
from zarr.abc.store import Store
from zarr.buffer import cpu, default_buffer_prototype
from zarr.storage import FsspecStore

from ._sync import batch_executor
from .errors import StoreError, ZarrCkptError

__all__ = ["LocalStorage", "S3Storage", "Storage", "StoreStorage", "open_storage"]


class Storage:
    """The async key/value operations a checkpoint needs; keys are ``/``-separated."""

    url: str
    #: whether :meth:`sync` makes written data durable (local disks) or is a no-op
    durable: bool = False

    def describe(self, key: str = "") -> str:
        """A human-readable location for ``key`` (for messages)."""
        return f"{self.url.rstrip('/')}/{key}" if key else self.url

    async def get(self, key: str) -> bytes | None:
        raise NotImplementedError

    async def put(self, key: str, parts: Sequence[Any]) -> None:
        """Write the concatenation of ``parts`` (buffers) under ``key``."""
        raise NotImplementedError

    async def put_atomic(self, key: str, data: bytes) -> None:
        """Replace ``key`` so that readers see the old or the new value, never a mix."""
        raise NotImplementedError

    #: default chunk size: object stores get more, smaller requests in flight (and finer
    #: lazy slices, where every byte crosses the network); local disks read fewer, larger
    #: files faster (see ``_format.DEFAULT_CHUNK_BYTES``)
    default_chunk_bytes: int = 16 * 1024 * 1024

    #: whether :meth:`put` writes the given buffers without copying them
    zero_copy_writes: bool = False

    #: whether :meth:`read_into` exists (blocking, called from I/O threads)
    reads_into: bool = False

    #: whether small writes and reads should be grouped (:meth:`put_batch`, :meth:`get_batch`)
    batches_small_io: bool = False

    async def put_batch(self, items: Sequence[tuple[str, Callable[[], Sequence[Any]]]]) -> None:
        """Write ``key -> make()`` for each item (``make`` encodes; called once)."""
        for key, make in items:
            await self.put(key, make())

    async def get_batch(self, items: Sequence[tuple[str, Callable[[bytes | None], None]]]) -> None:
        """Read each key and hand its bytes (None if missing) to the item's consumer."""
        for key, consume in items:
            consume(await self.get(key))

    async def list_dir(self, prefix: str = "") -> list[str]:
        raise NotImplementedError

    async def delete_dir(self, prefix: str) -> None:
        raise NotImplementedError

    async def sync(self) -> None:
        """Make everything written so far durable (no-op where writes already are)."""

    #: whether :meth:`put_if_unchanged` is enforced by the backend (else: one writer per root)
    conditional_writes: bool = False

    async def get_with_token(self, key: str) -> tuple[bytes | None, Any]:
        """The value and a version token for :meth:`put_if_unchanged`."""
        data = await self.get(key)
        return data, data

    async def put_if_unchanged(self, key: str, data: bytes, token: Any) -> bool:
        """Atomically replace ``key`` if it still has version ``token`` (None: absent).

        Returns False, writing nothing, if another writer changed it. Backends without
        conditional writes replace unconditionally (single-writer assumption).
        """
        await self.put_atomic(key, data)
        return True

    async def begin_step(self, step_dir: str) -> None:
        """Mark ``step_dir`` as being written (see :meth:`is_abandoned`)."""

    async def end_step(self, step_dir: str) -> None:
        """The writer of ``step_dir`` is done (committed or gave up)."""

    async def is_abandoned(self, step_dir: str, created: float) -> bool:
        """Whether an unreferenced step directory is debris rather than another writer's work.

        Single-writer backends: always. ``created`` is the time encoded in the name.
        """
        return True

    def is_file(self) -> bool:
        """Whether the root is an existing non-directory (e.g. an old msgpack checkpoint)."""
        return False


def _views(buffers: Sequence[Any]) -> list[memoryview]:
    return [v for v in (memoryview(b).cast("B") for b in buffers) if v.nbytes]


def _advance(views: list[memoryview], n: int) -> None:
    """Drop the first ``n`` bytes of a vectored I/O's buffers (after a partial readv/writev)."""
    while views and n >= views[0].nbytes:
        n -= views[0].nbytes
        views.pop(0)
    if views and n:
        views[0] = views[0][n:]


def _write_all(fd: int, parts: Sequence[Any]) -> None:
    views = _views(parts)
    while views:
        _advance(views, os.writev(fd, views))


_libc: Any = None


def _syncfs(path: Path) -> None:
    """Flush the filesystem holding ``path`` (one call, ~50 ms) and report write-back errors."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.syncfs  # noqa: B018 - probe
        except (OSError, AttributeError):
            _libc = False
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc and _libc.syncfs(fd) == 0:
            return
        if _libc:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs failed: {os.strerror(err)}", str(path))
        os.sync()  # no syncfs (not Linux): flush everything
    finally:
        os.close(fd)


class LocalStorage(Storage):
    """A local directory, written with plain files from zarrckpt's I/O threads."""

    durable = True

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)
        self._leases: dict[str, int] = {}

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key) if key else str(self.root)

    @staticmethod
    async def _run(fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    @staticmethod
    async def _run_batch(fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(batch_executor(), fn, *args)

    def _get(self, key: str) -> bytes | None:
        try:
            with open(self._path(key), "rb", buffering=0) as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    async def get(self, key: str) -> bytes | None:
        return await self._run(self._get, key)

    def _put(self, key: str, parts: Sequence[Any]) -> None:
        path = self._path(key)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:  # first file of a directory: create it (and any parents)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, flags, 0o644)
        try:
            _write_all(fd, parts)
        finally:
            os.close(fd)

    async def put(self, key: str, parts: Sequence[Any]) -> None:
        await self._run(self._put, key, parts)

    batches_small_io = True
    reads_into = True
    zero_copy_writes = True
    default_chunk_bytes = 64 * 1024 * 1024

    def read_into(self, key: str, buffers: list[Any]) -> int | None:
        """Fill ``buffers`` in order from the file (``readv``); bytes in the file, or None."""
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            size = os.fstat(fd).st_size
            views = _views(buffers)
            while views:
                n = os.readv(fd, views)
                if n == 0:  # a short file: the caller compares ``size`` with what it expects
                    break
                _advance(views, n)
            return size
        finally:
            os.close(fd)

    def _put_batch(self, items: Sequence[tuple[str, Callable[[], Sequence[Any]]]]) -> None:
        for key, make in items:
            self._put(key, make())

    async def put_batch(self, items: Sequence[tuple[str, Callable[[], Sequence[Any]]]]) -> None:
        await self._run_batch(self._put_batch, items)

    def _get_batch(self, items: Sequence[tuple[str, Callable[[bytes | None], None]]]) -> None:
        for key, consume in items:
            consume(self._get(key))

    async def get_batch(self, items: Sequence[tuple[str, Callable[[bytes | None], None]]]) -> None:
        await self._run_batch(self._get_batch, items)

    def _put_atomic(self, key: str, data: bytes) -> None:
        path = self._path(key)
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.partial"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, [data])
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        dir_fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself must survive power loss
        finally:
            os.close(dir_fd)

    async def put_atomic(self, key: str, data: bytes) -> None:
        await self._run(self._put_atomic, key, data)

    def _list_dir(self, prefix: str) -> list[str]:
        try:
            return sorted(os.listdir(self._path(prefix)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    async def list_dir(self, prefix: str = "") -> list[str]:
        return await self._run(self._list_dir, prefix)

    def _delete_dir(self, prefix: str) -> None:
        path = self._path(prefix)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)

    async def delete_dir(self, prefix: str) -> None:
        await self._run(self._delete_dir, prefix)

    async def sync(self) -> None:
        if self.root.exists():
            await self._run(_syncfs, self.root)

    # Writers on one machine coordinate with flock: the manifest is compared and replaced
    # under an exclusive lock on ``.zarrckpt.lock``, and each step directory being written
    # holds a lock on its ``.zarrckpt-writing`` file, which the kernel releases if the writer
    # dies, so debris is recognised at once and other writers' work never is.
    conditional_writes = True
    _LEASE = ".zarrckpt-writing"

    def _put_if_unchanged(self, key: str, data: bytes, token: Any) -> bool:
        os.makedirs(self.root, exist_ok=True)
        fd = os.open(self._path(".zarrckpt.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self._get(key) != token:
                return False
            self._put_atomic(key, data)
            return True
        finally:
            os.close(fd)  # releases the lock

    async def put_if_unchanged(self, key: str, data: bytes, token: Any) -> bool:
        return await self._run(self._put_if_unchanged, key, data, token)

    def _begin_step(self, step_dir: str) -> None:
        # The directory appears (by rename) with its lease already locked, so a step
        # directory without a lease file is always a finished one.
        tmp = self._path(f".tmp-{step_dir}")
        os.makedirs(tmp)
        fd = os.open(os.path.join(tmp, self._LEASE), os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(tmp, self._path(step_dir))
        self._leases[step_dir] = fd

    async def begin_step(self, step_dir: str) -> None:
        await self._run(self._begin_step, step_dir)

    def _end_step(self, step_dir: str) -> None:
        fd = self._leases.pop(step_dir, None)
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(f"{step_dir}/{self._LEASE}"))
            os.close(fd)

    async def end_step(self, step_dir: str) -> None:
        await self._run(self._end_step, step_dir)

    def _is_abandoned(self, step_dir: str, created: float) -> bool:
        try:
            fd = os.open(self._path(f"{step_dir}/{self._LEASE}"), os.O_RDWR)
        except FileNotFoundError:
            # No lease: a finished step (committed, then dropped by a commit whose garbage
            # collection did not run), or a ``.tmp-`` directory of a writer that died before
            # creating its lease.
            return not step_dir.startswith(".tmp-") or time.time() - created > 60
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its writer is alive
        finally:
            os.close(fd)
        return True

    async def is_abandoned(self, step_dir: str, created: float) -> bool:
        return await self._run(self._is_abandoned, step_dir, created)

    def is_file(self) -> bool:
        return self.root.exists() and not self.root.is_dir()


class StoreStorage(Storage):
    """Any zarr v3 ``Store`` (``FsspecStore`` for URLs, ``MemoryStore``, ...)."""

    def __init__(self, store: Store, url: str | None = None) -> None:
        self.store = store
        self.url = url or str(store)

    @contextlib.asynccontextmanager
    async def _errors(self, op: str, key: str) -> Any:
        """Backend failures become :class:`StoreError` naming the URL."""
        try:
            yield
        except ZarrCkptError:
            raise
        except Exception as exc:
            raise StoreError(
                f"{op} {self.describe(key)} failed: {type(exc).__name__}: {exc}"
            ) from exc

    async def get(self, key: str) -> bytes | None:
        async with self._errors("reading", key):
            buf = await self.store.get(key, prototype=default_buffer_prototype())
        return None if buf is None else buf.to_bytes()

    async def put(self, key: str, parts: Sequence[Any]) -> None:
        data = b"".join(memoryview(p).cast("B") for p in parts)
        async with self._errors("writing", key):
            await self.store.set(key, cpu.Buffer.from_bytes(data))

    async def put_atomic(self, key: str, data: bytes) -> None:
        # A single PUT of one object is atomic on object stores and in memory.
        await self.put(key, [data])

    async def list_dir(self, prefix: str = "") -> list[str]:
        async with self._errors("listing", prefix):
            return sorted([name async for name in self.store.list_dir(prefix)])

    async def delete_dir(self, prefix: str) -> None:
        async with self._errors("deleting", prefix):
            await self.store.delete_dir(prefix)


class S3Storage(StoreStorage):
    """S3 through s3fs, with conditional PUTs (``If-Match`` / ``If-None-Match``) for the manifest.

    Writers do not see each other's unfinished steps, so a step directory no manifest lists
    is only deleted as debris once it is older than ``debris_grace_s`` (default one hour,
    ``ZARRCKPT_DEBRIS_GRACE_S``): a concurrent writer's step is never deleted mid-write.
    """

    conditional_writes = True

    def __init__(self, store: FsspecStore, url: str) -> None:
        super().__init__(store, url)
        self.debris_grace_s = float(os.environ.get("ZARRCKPT_DEBRIS_GRACE_S", "3600"))

    def _split(self, key: str) -> tuple[str, str]:
        bucket, path, _ = self.store.fs.split_path(f"{self.store.path}/{key}")
        return bucket, path

    async def get_with_token(self, key: str) -> tuple[bytes | None, Any]:
        bucket, path = self._split(key)
        async with self._errors("reading", key):
            try:
                response = await self.store.fs._call_s3("get_object", Bucket=bucket, Key=path)
            except FileNotFoundError:
                return None, None
            async with response["Body"] as body:
                data = await body.read()
        return data, response["ETag"]

    async def put_if_unchanged(self, key: str, data: bytes, token: Any) -> bool:
        bucket, path = self._split(key)
        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        async with self._errors("writing", key):
            try:
                await self.store.fs._call_s3(
                    "put_object", Bucket=bucket, Key=path, Body=data, **condition
                )
            except (FileExistsError, OSError) as exc:
                text = str(exc).lower().replace("-", "")  # "pre-conditions", "PreconditionFailed"
                if (
                    isinstance(exc, FileExistsError)
                    or "precondition" in text
                    or "conditionalrequestconflict" in text
                ):
                    return False
                raise
        return True

    async def is_abandoned(self, step_dir: str, created: float) -> bool:
        return time.time() - created > self.debris_grace_s


def open_storage(
    location: Any, storage_options: dict[str, Any] | None = None, *, read_only: bool = False
) -> Storage:
    """A :class:`Storage` for a path, URL, zarr ``Store`` or :class:`Storage`."""
    if isinstance(location, Storage):
        return location
    if isinstance(location, Store):
        return StoreStorage(location)
    if isinstance(location, fsspec.FSMap):  # fs.get_mapper("bucket/run"): a built filesystem
        return StoreStorage(
            FsspecStore.from_mapper(location, read_only=read_only), url=location.root
        )
    if isinstance(location, os.PathLike):
        location = os.fspath(location)
    if not isinstance(location, str):
        raise TypeError(
            f"expected a path, an fsspec URL or a zarr Store, got {type(location).__name__}"
        )
    protocol, path = fsspec.core.split_protocol(location)
    if protocol in (None, "file", "local"):
        if storage_options:
            raise ValueError("storage_options apply to remote URLs, not to local paths")
        return LocalStorage(path)
    options = dict(storage_options or {})
    if protocol in ("s3", "s3a"):
        # s3fs sends a HEAD before every whole-object GET unless max_concurrency is 1; our
        # objects are single chunks, so this halves the requests of a load.
        options.setdefault("max_concurrency", 1)
    store = FsspecStore.from_url(location, storage_options=options, read_only=read_only)
    if protocol in ("s3", "s3a"):
        return S3Storage(store, url=location)
    return StoreStorage(store, url=location)
