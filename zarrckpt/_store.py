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
import ctypes
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fsspec.core
from zarr.abc.store import Store
from zarr.buffer import cpu, default_buffer_prototype
from zarr.storage import FsspecStore

__all__ = ["LocalStorage", "Storage", "StoreStorage", "open_storage"]


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

    async def list_dir(self, prefix: str = "") -> list[str]:
        raise NotImplementedError

    async def delete_dir(self, prefix: str) -> None:
        raise NotImplementedError

    async def sync(self) -> None:
        """Make everything written so far durable (no-op where writes already are)."""

    def is_file(self) -> bool:
        """Whether the root is an existing non-directory (e.g. an old msgpack checkpoint)."""
        return False


def _write_all(fd: int, parts: Sequence[Any]) -> None:
    views = [memoryview(p).cast("B") for p in parts]
    views = [v for v in views if v.nbytes]
    while views:
        written = os.writev(fd, views)
        while views and written >= views[0].nbytes:
            written -= views[0].nbytes
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


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
        self._made: set[str] = set()

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key) if key else str(self.root)

    @staticmethod
    async def _run(fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

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
        parent = os.path.dirname(path)
        if parent not in self._made:
            os.makedirs(parent, exist_ok=True)
            self._made.add(parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, parts)
        finally:
            os.close(fd)

    async def put(self, key: str, parts: Sequence[Any]) -> None:
        await self._run(self._put, key, parts)

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
        self._made = {d for d in self._made if not d.startswith(path)}

    async def delete_dir(self, prefix: str) -> None:
        await self._run(self._delete_dir, prefix)

    async def sync(self) -> None:
        if self.root.exists():
            await self._run(_syncfs, self.root)

    def is_file(self) -> bool:
        return self.root.exists() and not self.root.is_dir()


class StoreStorage(Storage):
    """Any zarr v3 ``Store`` (``FsspecStore`` for URLs, ``MemoryStore``, ...)."""

    def __init__(self, store: Store, url: str | None = None) -> None:
        self.store = store
        self.url = url or str(store)

    async def get(self, key: str) -> bytes | None:
        buf = await self.store.get(key, prototype=default_buffer_prototype())
        return None if buf is None else buf.to_bytes()

    async def put(self, key: str, parts: Sequence[Any]) -> None:
        data = b"".join(memoryview(p).cast("B") for p in parts)
        await self.store.set(key, cpu.Buffer.from_bytes(data))

    async def put_atomic(self, key: str, data: bytes) -> None:
        # A single PUT of one object is atomic on object stores and in memory.
        await self.store.set(key, cpu.Buffer.from_bytes(data))

    async def list_dir(self, prefix: str = "") -> list[str]:
        return sorted([name async for name in self.store.list_dir(prefix)])

    async def delete_dir(self, prefix: str) -> None:
        await self.store.delete_dir(prefix)


def open_storage(
    location: Any, storage_options: dict[str, Any] | None = None, *, read_only: bool = False
) -> Storage:
    """A :class:`Storage` for a path, URL, zarr ``Store`` or :class:`Storage`."""
    if isinstance(location, Storage):
        return location
    if isinstance(location, Store):
        return StoreStorage(location)
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
    store = FsspecStore.from_url(location, storage_options=storage_options, read_only=read_only)
    return StoreStorage(store, url=location)
