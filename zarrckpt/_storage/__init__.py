"""Storage backends: where a checkpoint lives.

:func:`open_storage` turns what the user passed (a path, a ``file://``, ``memory://``,
``s3://``, ``gs://`` ... URL, an fsspec mapper or a zarr ``Store``) into a :class:`Storage`.
The backend is chosen by what the location *is*, not by how it was spelled: an S3 bucket
gets conditional commits whether it came as a URL, a mapper or an ``FsspecStore``.

- ``local``: a directory (:class:`LocalStorage`);
- ``obstore``: ``s3://``, ``gs://``, ``az://`` / ``abfs://`` URLs through obstore (Rust), when it
  is installed and can honour the ``storage_options``; conditional PUTs on all three;
- ``objects``: any zarr store, with lease objects (every other URL, and the fallback for the
  ones above); S3 through s3fs and GCS through gcsfs with conditional PUTs.

Which client serves a URL: the ``backend`` argument, else a ``"backend"`` entry of
``storage_options`` (popped here, so every public function takes it), else the
``ZARRCKPT_STORAGE_BACKEND`` environment variable, else ``"auto"``: obstore where it is
installed and takes the options, fsspec otherwise. Defaults from fsspec's configuration
(``fsspec.config.conf["s3"]``, ``FSSPEC_S3_*`` variables) apply to both clients.

Only the local backend is imported with this package: zarr, fsspec and obstore come with the
first location that needs them, so that ``zarrckpt ls DIR`` needs none of them (issue 17).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from typing import TYPE_CHECKING, Any

from ..errors import StoreCredentialsError, UnknownProtocolError
from .base import Storage, check_key
from .local import LocalStorage

if TYPE_CHECKING:  # __getattr__ imports them at run time, with zarr and fsspec
    from zarr.abc.store import Store

    from .objects import GCSStorage, S3Storage, StoreStorage

__all__ = [
    "BACKENDS",
    "GCSStorage",
    "LocalStorage",
    "S3Storage",
    "Storage",
    "StoreStorage",
    "check_key",
    "open_storage",
]

_S3 = {"s3", "s3a"}
_GCS = {"gs", "gcs"}
#: URLs obstore can serve (``_storage.obstore.PROTOCOLS``, without importing obstore)
OBSTORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
#: fsspec's configuration sections per protocol family (S3FileSystem.protocol, ...)
_FAMILIES = ({"s3", "s3a"}, {"gs", "gcs"}, {"az", "abfs", "abfss"})
BACKENDS = ("auto", "obstore", "fsspec")


def __getattr__(name: str) -> type[Storage]:
    """The zarr-store backends (``_storage.objects``), imported on first use with zarr."""
    if name in ("GCSStorage", "S3Storage", "StoreStorage"):
        from . import objects

        return getattr(objects, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _split_protocol(url: str) -> tuple[str | None, str]:
    """``fsspec.core.split_protocol`` without importing fsspec: ``("s3", "b/k")`` of
    ``s3://b/k``, ``(None, path)`` of a path (``C://x`` is a Windows path)."""
    protocol, sep, path = url.partition("://")
    if sep and len(protocol) > 1:
        return protocol, path
    if url.startswith("data:"):
        return "data", url[len("data:") :]
    return None, url


def _for_store(store: Store, url: str | None = None) -> Storage:
    from zarr.storage import FsspecStore

    from .objects import GCSStorage, S3Storage, StoreStorage, protocols

    if isinstance(store, FsspecStore) and protocols(store) & _S3 and hasattr(store.fs, "_call_s3"):
        return S3Storage(store, url or f"s3://{store.path}")
    if isinstance(store, FsspecStore) and protocols(store) & _GCS and hasattr(store.fs, "_call"):
        return GCSStorage(store, url or f"gs://{store.path}")
    return StoreStorage(store, url)


def _backend(options: dict[str, Any], backend: str | None) -> tuple[str, bool]:
    """The client asked for (argument, ``storage_options["backend"]``, environment) and
    whether it was asked for explicitly (the environment only states a preference)."""
    option = options.pop("backend", None)
    if backend is not None and option is not None and backend != option:
        raise ValueError(f"backend={backend!r} but storage_options say backend={option!r}")
    explicit = backend or option
    choice = explicit or os.environ.get("ZARRCKPT_STORAGE_BACKEND") or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {choice!r}")
    return choice, bool(explicit)


def _fsspec_defaults(protocol: str) -> dict[str, Any]:
    """fsspec's configured defaults for ``protocol`` (what ``fsspec.filesystem`` would apply)."""
    import fsspec.config

    family = next((f for f in _FAMILIES if protocol in f), {protocol})
    defaults: dict[str, Any] = {}
    for name in sorted(family):
        defaults.update(fsspec.config.conf.get(name, {}))
    return defaults


def _open_obstore(
    location: str, protocol: str, path: str, options: dict[str, Any], required: bool
) -> Storage | None:
    """An obstore storage, or None (fsspec then) where obstore is missing or cannot serve."""
    try:
        from .obstore import NoCredentials, Unsupported, open_obstore
    except ImportError as exc:
        if required:
            raise ImportError(
                "backend='obstore' needs obstore: pip install 'zarrckpt[obstore]'"
            ) from exc
        return None
    try:
        return open_obstore(location, protocol, path, {**_fsspec_defaults(protocol), **options})
    except Unsupported as exc:
        if required and isinstance(exc, NoCredentials):
            raise StoreCredentialsError(f"opening {location} failed: {exc}") from exc
        if required:
            raise ValueError(f"backend='obstore' cannot open {location}: {exc}") from None
        return None


def open_storage(
    location: Any,
    storage_options: dict[str, Any] | None = None,
    *,
    read_only: bool = False,
    backend: str | None = None,
) -> Storage:
    """A :class:`Storage` for a path, URL, fsspec mapper, zarr ``Store`` or :class:`Storage`.

    ``backend`` (or ``storage_options["backend"]``): ``"obstore"``, ``"fsspec"`` or
    ``"auto"`` (see the module docstring); it chooses the client of ``s3://``, ``gs://`` and
    ``az://`` URLs. ``"obstore"`` raises where obstore cannot serve the URL or its options.
    """
    options = dict(storage_options or {})
    choice, explicit = _backend(options, backend)
    if isinstance(location, Storage):
        return location
    if isinstance(location, os.PathLike):
        location = os.fspath(location)
    if not isinstance(location, str):
        return _open_object(location, read_only)
    protocol, path = _split_protocol(location)
    if choice == "obstore" and explicit and protocol not in OBSTORE_PROTOCOLS:
        raise ValueError(f"backend='obstore' serves s3://, gs:// and az:// URLs, not {location!r}")
    if protocol in (None, "file", "local"):
        if options:
            raise ValueError("storage_options apply to remote URLs, not to local paths")
        return LocalStorage(path)
    if protocol in OBSTORE_PROTOCOLS and choice != "fsspec":
        storage = _open_obstore(location, protocol, path, options, required=choice == "obstore")
        if storage is not None:
            return storage
    if protocol in _S3:
        # s3fs sends a HEAD before every whole-object GET unless max_concurrency is 1; our
        # objects are single chunks, so this halves the requests of a load.
        options.setdefault("max_concurrency", 1)
    from zarr.storage import FsspecStore

    try:
        store = FsspecStore.from_url(location, storage_options=options, read_only=read_only)
    except ValueError as exc:
        if not str(exc).startswith("Protocol not known"):
            raise
        raise UnknownProtocolError(_unknown_protocol(location, str(protocol))) from exc
    return _for_store(store, location)


def _open_object(location: Any, read_only: bool) -> Storage:
    """A :class:`Storage` for a zarr ``Store`` or an fsspec mapper (whoever built one has
    imported zarr or fsspec already: the imports here cost nothing then)."""
    import fsspec
    from zarr.abc.store import Store
    from zarr.storage import FsspecStore

    from .objects import protocols

    if isinstance(location, Store):
        return _for_store(location)
    if isinstance(location, fsspec.FSMap):  # fs.get_mapper("bucket/run"): a built filesystem
        store = FsspecStore.from_mapper(location, read_only=read_only)
        proto = next(iter(protocols(store)), "")
        return _for_store(store, f"{proto}://{location.root}" if proto else location.root)
    raise TypeError(
        f"expected a path, an fsspec URL or a zarr Store, got {type(location).__name__}"
    )


#: protocols a mistyped one is compared with ("s4" -> "s3", "azure" -> "az", "gcp" -> "gcs")
_COMMON = ("file", "memory", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "http", "https",
           "hf", "hdfs", "sftp", "ftp")  # fmt: skip
#: object stores a checkpoint is commonly kept on: protocol -> the packages that serve it
_STORE_PACKAGES = {
    "s3": ("s3fs", "obstore"),
    "gs": ("gcsfs", "obstore"),
    "az": ("adlfs", "obstore"),
}


def _unknown_protocol(location: str, protocol: str) -> str:
    """The message for a URL whose protocol fsspec does not know: what would work here."""
    near = difflib.get_close_matches(protocol, _COMMON, n=1, cutoff=0.5)
    hint = f" (did you mean {near[0]}://?)" if near else ""
    have, need = ["file://", "memory://"], []
    for proto, packages in _STORE_PACKAGES.items():
        if any(importlib.util.find_spec(p) is not None for p in packages):
            have.append(f"{proto}://")
        else:
            need.append(f"{proto}:// (pip install {packages[0]})")
    more = f"; installable: {', '.join(need)}" if need else ""
    return (
        f"{location}: unknown protocol {protocol!r}{hint}; zarrckpt opens local paths and "
        f"{', '.join(have)}{more}; other fsspec protocols: see fsspec.available_protocols()"
    )
