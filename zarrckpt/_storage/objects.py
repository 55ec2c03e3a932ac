"""Any zarr v3 ``Store``: object stores through fsspec (``s3://``, ``gs://``, ...), memory.

Object stores have no locks and no renames. A writer's lease on its step directory is an
object, ``<step>/.zarrckpt-lease``, written before anything else of the step and refreshed
by a heartbeat while the step is written; it holds the time until which the writer vouches
for it (``ZARRCKPT_LEASE_TTL_S``, default 10 minutes, refreshed every quarter of that). A
step directory whose lease is gone is finished; one whose lease has run out belonged to a
writer that died (or stalled for longer than the TTL, which the README's Safety section
asks users to avoid by keeping the TTL well above any pause of their process).

Conditional publication of the manifest: S3 (``If-Match`` / ``If-None-Match``, see
:class:`S3Storage`), GCS (``ifGenerationMatch``, see :class:`GCSStorage`) and in-process
stores (memory), where a compare-and-set under a lock is exact. Other backends (generic
fsspec filesystems) replace the manifest unconditionally: one writer per root, and the
commit warns once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import quote

from zarr.abc.store import RangeByteRequest, Store
from zarr.buffer import cpu, default_buffer_prototype
from zarr.storage import FsspecStore

from .._manifest import MANIFEST_MAX_BYTES
from ..errors import StoreConnectionError, StoreCredentialsError, StoreError
from .base import (
    Storage,
    cannot_connect,
    check_key,
    copy_each,
    no_aws_credentials,
    url_origin,
)

__all__ = ["GCSStorage", "LeaseObjects", "S3Storage", "StoreStorage", "protocols"]

_LEASE = ".zarrckpt-lease"


def _lease_ttl() -> float:
    return float(os.environ.get("ZARRCKPT_LEASE_TTL_S", "600"))


def protocols(store: Store) -> set[str]:
    """The fsspec protocols of a store's filesystem (``{"memory"}`` for zarr's MemoryStore)."""
    if isinstance(store, FsspecStore):
        fs = getattr(store.fs, "sync_fs", store.fs)  # AsyncFileSystemWrapper
        proto = fs.protocol
        return {proto} if isinstance(proto, str) else set(proto)
    return {"memory"} if type(store).__name__ in ("MemoryStore", "GpuMemoryStore") else set()


# --- failures of fsspec clients (aiohttp, botocore) as messages a person can act on ---------

#: errors that mean "no connection was made" (botocore wraps aiohttp's, aiohttp the OS's)
_CONNECT_ERRORS = frozenset({
    "EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
    "ClientConnectorDNSError", "ConnectionTimeoutError", "ConnectionRefusedError", "gaierror",
})  # fmt: skip


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the errors it wraps (``__cause__``, aiohttp's ``os_error``, botocore's
    ``kwargs["error"]``), each once."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        kwargs = getattr(e, "kwargs", None)
        inner = [e.__cause__, getattr(e, "os_error", None)]
        inner.append(kwargs.get("error") if isinstance(kwargs, dict) else None)
        todo += [i for i in inner if isinstance(i, BaseException)]


def _connect_failure(exc: BaseException) -> tuple[str | None, str] | None:
    """``(endpoint named by the error, reason)`` if ``exc`` says no connection was made."""
    chain = list(_chain(exc))
    names = set().union(*({c.__name__ for c in type(e).__mro__} for e in chain))
    if not names & _CONNECT_ERRORS:
        return None
    endpoint = None
    for e in chain:
        kwargs = getattr(e, "kwargs", None)
        if endpoint is None and isinstance(kwargs, dict):  # botocore: the object's URL
            endpoint = url_origin(kwargs.get("endpoint_url"))
        host, port = getattr(e, "host", None), getattr(e, "port", None)
        if endpoint is None and host and port:  # aiohttp
            endpoint = f"{host}:{port}"
    dns = [e for e in chain if isinstance(e, socket.gaierror)]
    system = [e for e in chain if isinstance(e, OSError) and (e.errno or 0) > 0]
    if dns:
        reason = f"host not found ({dns[0].strerror})" if dns[0].strerror else "host not found"
    elif system:
        reason = os.strerror(system[0].errno or 0).lower()  # "connection refused"
    elif names & {"TimeoutError", "ConnectTimeoutError", "ConnectionTimeoutError"}:
        reason = "timed out"
    else:
        reason = "connection failed"
    return endpoint, reason


def _fs_endpoint(store: Store) -> str | None:
    """Where an fsspec store's requests go, as configured (s3fs, gcsfs), if known."""
    fs = getattr(store, "fs", None)
    fs = getattr(fs, "sync_fs", fs)
    if fs is None:
        return None
    client = fs.__dict__.get("_s3")  # s3fs's botocore client, once made
    for value in (
        getattr(fs, "endpoint_url", None),
        (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url"),
        getattr(getattr(client, "meta", None), "endpoint_url", None),
        getattr(fs, "_location", None) if hasattr(type(fs), "_location") else None,
    ):
        if isinstance(value, str) and value:
            return value.rstrip("/")
    return None


def explain_fsspec(
    exc: BaseException, endpoint: str | None, elapsed: float
) -> tuple[type[StoreError], str] | None:
    """What an fsspec client's failure means, or None (then its own words are used)."""
    if any(type(e).__name__ == "NoCredentialsError" for e in _chain(exc)):  # botocore
        return StoreCredentialsError, no_aws_credentials(endpoint)
    failure = _connect_failure(exc)
    if failure is not None:
        seen, reason = failure
        where = endpoint or seen or "the endpoint"
        return StoreConnectionError, cannot_connect(where, reason, elapsed=elapsed)
    return None


#: one lock per in-process root, so that two Storage objects on the same memory:// root
#: (e.g. a background save and a foreground one) compare-and-set the manifest one at a time
_LOCAL_LOCKS: dict[str, asyncio.Lock] = {}


class LeaseObjects:
    """Writer leases as objects (see the module docstring), for any backend with get/put/delete.

    A mix-in: the backend provides ``put``, ``get`` and ``delete`` (of one key).
    """

    async def get(self, key: str, limit: int | None = None) -> bytes | None:
        """The value of one object (absent: None), as ``Storage.get``."""
        raise NotImplementedError

    async def put(self, key: str, parts: Sequence[Any]) -> None:
        """Write one object, as ``Storage.put``."""
        raise NotImplementedError

    async def delete(self, key: str) -> None:
        """Delete one object (absent: no error)."""
        raise NotImplementedError

    async def _write_lease(self, step_dir: str, writer: str) -> None:
        doc = {"writer": writer, "expires": time.time() + _lease_ttl()}
        await self.put(f"{step_dir}/{_LEASE}", [json.dumps(doc).encode()])

    @property
    def _heartbeats(self) -> dict[str, asyncio.Task[None]]:
        return self.__dict__.setdefault("_heartbeat_tasks", {})

    async def begin_step(self, step_dir: str, recycle: bool = False) -> bytes | None:
        writer = uuid.uuid4().hex
        await self._write_lease(step_dir, writer)  # first: the directory never exists without it

        async def heartbeat() -> None:
            while True:
                await asyncio.sleep(_lease_ttl() / 4)
                with contextlib.suppress(Exception):  # a missed beat is retried; the TTL covers it
                    await self._write_lease(step_dir, writer)

        self._heartbeats[step_dir] = asyncio.get_running_loop().create_task(heartbeat())
        return None  # object stores do not recycle: rewriting an object costs what a new one does

    async def end_step(self, step_dir: str) -> None:
        task = self._heartbeats.pop(step_dir, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.delete(f"{step_dir}/{_LEASE}")

    async def lease_expired(self, step_dir: str, created: float) -> bool:
        data = await self.get(f"{step_dir}/{_LEASE}", limit=4096)
        if data is None:
            return True  # finished: its writer committed or gave up
        try:
            expires = float(json.loads(data)["expires"])
        except (ValueError, KeyError, TypeError):
            return True  # not a lease any zarrckpt wrote
        return time.time() > expires


class StoreStorage(LeaseObjects, Storage):
    """Any zarr v3 ``Store`` (``FsspecStore`` for URLs, ``MemoryStore``, ...)."""

    leases = True

    def __init__(self, store: Store, url: str | None = None) -> None:
        self.store = store
        self.url = url or str(store)
        self._in_process = "memory" in protocols(store)
        self.conditional_writes = self._in_process

    def explain(self, exc: Exception, elapsed: float) -> tuple[type[StoreError], str]:
        endpoint = None
        with contextlib.suppress(Exception):  # for the message only
            endpoint = _fs_endpoint(self.store)
        return explain_fsspec(exc, endpoint, elapsed) or super().explain(exc, elapsed)

    async def get(self, key: str, limit: int | None = None) -> bytes | None:
        # Bounded: a ranged read of one byte more than the limit (one request, as a plain
        # read); only a value found too large costs a second one, for its size (a HEAD:
        # other stores' ``getsize`` may read the value).
        byte_range = None if limit is None else RangeByteRequest(0, limit + 1)
        async with self.errors("reading", check_key(self.url, key)):
            buf = await self.store.get(key, default_buffer_prototype(), byte_range)
            if buf is not None and limit is not None and len(buf) > limit:
                size = None
                if isinstance(self.store, FsspecStore):
                    with contextlib.suppress(Exception):  # for the message only
                        size = await self.store.getsize(key)
                raise self.too_large(key, size, limit)
        return None if buf is None else buf.to_bytes()

    async def put(self, key: str, parts: Sequence[Any]) -> None:
        data = b"".join(memoryview(p).cast("B") for p in parts)
        async with self.errors("writing", check_key(self.url, key)):
            await self.store.set(key, cpu.Buffer.from_bytes(data))

    async def put_atomic(self, key: str, data: bytes) -> None:
        # A single PUT of one object is atomic on object stores and in memory.
        await self.put(key, [data])

    async def link_many(self, src_dir: str, dst_dir: str, keys: Sequence[str]) -> set[str]:
        """Server-side copies through fsspec (s3fs: CopyObject, gcsfs: rewrite); in memory,
        the same bytes under a new key."""
        if self._in_process:

            async def copy(src: str, dst: str) -> None:
                buf = await self.store.get(check_key(self.url, src), default_buffer_prototype())
                if buf is None:
                    raise FileNotFoundError(src)
                await self.store.set(check_key(self.url, dst), buf)

        elif isinstance(self.store, FsspecStore) and hasattr(self.store.fs, "_cp_file"):
            fs, root = self.store.fs, self.store.path.rstrip("/")

            async def copy(src: str, dst: str) -> None:
                src, dst = check_key(self.url, src), check_key(self.url, dst)
                await fs._cp_file(f"{root}/{src}", f"{root}/{dst}")

        else:
            return set(keys)
        return await copy_each(src_dir, dst_dir, keys, copy)

    async def delete(self, key: str) -> None:
        async with self.errors("deleting", check_key(self.url, key)):
            await self.store.delete(key)

    async def list_dir(self, prefix: str = "") -> list[str]:
        async with self.errors("listing", check_key(self.url, prefix)):
            return sorted([name async for name in self.store.list_dir(prefix)])

    async def delete_dir(self, prefix: str) -> None:
        async with self.errors("deleting", check_key(self.url, prefix)):
            await self.store.delete_dir(prefix)

    async def put_if_unchanged(self, key: str, data: bytes, token: Any) -> bool:
        if not self._in_process:
            return await super().put_if_unchanged(key, data, token)
        lock = _LOCAL_LOCKS.setdefault(self.url, asyncio.Lock())
        async with lock:
            if await self.get(key) != token:
                return False
            await self.put_atomic(key, data)
            return True


class S3Storage(StoreStorage):
    """S3 through s3fs, with conditional PUTs (``If-Match`` / ``If-None-Match``) for the manifest."""

    conditional_writes = True
    store: FsspecStore

    def __init__(self, store: FsspecStore, url: str) -> None:
        super().__init__(store, url)
        self.conditional_writes = True

    def _split(self, key: str) -> tuple[str, str]:
        bucket, path, _ = self.store.fs.split_path(f"{self.store.path}/{key}")
        return bucket, path

    async def get_with_token(
        self, key: str, limit: int | None = MANIFEST_MAX_BYTES
    ) -> tuple[bytes | None, Any]:
        bucket, path = self._split(key)
        async with self.errors("reading", key):
            try:
                response = await self.store.fs._call_s3("get_object", Bucket=bucket, Key=path)
            except FileNotFoundError:
                return None, None
            async with response["Body"] as body:
                size = response.get("ContentLength")
                if limit is not None and isinstance(size, int) and size > limit:
                    raise self.too_large(key, size, limit)  # the body is never read
                data = await (body.read() if limit is None else body.read(limit + 1))
            if limit is not None and len(data) > limit:
                raise self.too_large(key, None, limit)
        return data, response["ETag"]

    async def put_if_unchanged(self, key: str, data: bytes, token: Any) -> bool:
        bucket, path = self._split(key)
        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        async with self.errors("writing", key):
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


class GCSStorage(StoreStorage):
    """GCS through gcsfs, with generation preconditions for the manifest.

    The manifest is read with its generation (``x-goog-generation``) and replaced by one upload
    with ``ifGenerationMatch=<generation>`` (``0``: only if absent, as gcsfs's own
    ``mode="create"`` sends); GCS answers 412, which gcsfs raises as ``FileExistsError``.
    """

    conditional_writes = True
    store: FsspecStore

    def __init__(self, store: FsspecStore, url: str) -> None:
        super().__init__(store, url)
        self.conditional_writes = True

    def _path(self, key: str) -> str:
        return f"{self.store.path}/{key}"

    async def get_with_token(
        self, key: str, limit: int | None = MANIFEST_MAX_BYTES
    ) -> tuple[bytes | None, Any]:
        fs = self.store.fs
        # Bounded by a range of one byte more than the limit (an empty object has no such
        # range: then, as when the generation is not sent, its size and generation are
        # asked for and the content read pinned to that generation).
        bounded = {} if limit is None else {"headers": {"Range": f"bytes=0-{limit}"}}
        async with self.errors("reading", key):
            try:
                try:
                    headers, data = await fs._call("GET", fs.url(self._path(key)), **bounded)
                    generation = headers.get("x-goog-generation")
                except OSError as exc:
                    if "416" not in str(exc) and "satisfiable" not in str(exc).lower():
                        raise
                    generation = None
                if generation is None:  # pin the content to the generation it belongs to
                    info = await fs._info(self._path(key))
                    if limit is not None and int(info["size"]) > limit:
                        raise self.too_large(key, int(info["size"]), limit)
                    generation = str(info["generation"])
                    url = fs.url(self._path(key), generation=generation)
                    _, data = await fs._call("GET", url)
            except FileNotFoundError:
                return None, None
            if limit is not None and len(data) > limit:
                raise self.too_large(key, None, limit)
        return data, str(generation)

    async def put_if_unchanged(self, key: str, data: bytes, token: Any) -> bool:
        fs = self.store.fs
        bucket, path, _ = fs.split_path(self._path(key))
        async with self.errors("writing", key):
            try:
                await fs._call(
                    "POST",
                    f"{fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
                    uploadType="media",
                    name=path,
                    ifGenerationMatch="0" if token is None else token,
                    data=data,
                    headers={"Content-Type": "application/octet-stream"},
                    json_out=True,
                )
            except FileExistsError:  # 412: the generation changed
                return False
        return True
