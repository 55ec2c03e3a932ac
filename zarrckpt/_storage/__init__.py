"""Storage backends: where a checkpoint lives.

:func:`open_storage` turns what the user passed (a path, a ``file://``, ``memory://``,
``s3://``, ``gs://`` ... URL, an fsspec mapper or a zarr ``Store``) into a :class:`Storage`.
The backend is chosen by what the location *is*, not by how it was spelled: an S3 bucket
gets conditional commits whether it came as a URL, a mapper or an ``FsspecStore``.

- ``local``: a directory (:class:`LocalStorage`);
- ``objects``: any zarr store, with lease objects; S3 with conditional PUTs.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec.core
from zarr.abc.store import Store
from zarr.storage import FsspecStore

from .base import Storage, check_key
from .local import LocalStorage
from .objects import S3Storage, StoreStorage, protocols

__all__ = ["LocalStorage", "S3Storage", "Storage", "StoreStorage", "check_key", "open_storage"]

_S3 = {"s3", "s3a"}


def _for_store(store: Store, url: str | None = None) -> Storage:
    if isinstance(store, FsspecStore) and protocols(store) & _S3 and hasattr(store.fs, "_call_s3"):
        return S3Storage(store, url or f"s3://{store.path}")
    return StoreStorage(store, url)


def open_storage(
    location: Any, storage_options: dict[str, Any] | None = None, *, read_only: bool = False
) -> Storage:
    """A :class:`Storage` for a path, URL, fsspec mapper, zarr ``Store`` or :class:`Storage`."""
    if isinstance(location, Storage):
        return location
    if isinstance(location, Store):
        return _for_store(location)
    if isinstance(location, fsspec.FSMap):  # fs.get_mapper("bucket/run"): a built filesystem
        store = FsspecStore.from_mapper(location, read_only=read_only)
        proto = next(iter(protocols(store)), "")
        return _for_store(store, f"{proto}://{location.root}" if proto else location.root)
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
    if protocol in _S3:
        # s3fs sends a HEAD before every whole-object GET unless max_concurrency is 1; our
        # objects are single chunks, so this halves the requests of a load.
        options.setdefault("max_concurrency", 1)
    store = FsspecStore.from_url(location, storage_options=options, read_only=read_only)
    return _for_store(store, location)
