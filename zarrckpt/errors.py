"""The one exception and warning hierarchy of zarrckpt.

Every error raised on purpose derives from :class:`ZarrCkptError`, and also from the
built-in exception a caller would naturally catch, so ``except FileExistsError`` keeps
working around :class:`AlreadyExistsError`.
"""

from __future__ import annotations

__all__ = [
    "AlreadyExistsError",
    "BackgroundSaveError",
    "CheckpointNotFoundError",
    "CollectionWarning",
    "ConcurrentWriteError",
    "CorruptCheckpointError",
    "MissingCheckpointWarning",
    "SingleWriterWarning",
    "StoreConnectionError",
    "StoreCredentialsError",
    "StoreError",
    "StructureMismatchError",
    "StructureMismatchWarning",
    "UnknownProtocolError",
    "UnsupportedLeafError",
    "ZarrCkptError",
    "ZarrCkptWarning",
]


class ZarrCkptError(Exception):
    """Base class of every error zarrckpt raises on purpose."""


class AlreadyExistsError(ZarrCkptError, FileExistsError):
    """A step at or after the one being saved is committed and ``overwrite=False``."""


class ConcurrentWriteError(ZarrCkptError, RuntimeError):
    """Another writer committed to the same root during this save; this step was not committed."""


class CheckpointNotFoundError(ZarrCkptError, FileNotFoundError):
    """The requested step (or checkpoint) is not committed."""


class CorruptCheckpointError(ZarrCkptError, ValueError):
    """The root is not a zarrckpt checkpoint, or a leaf's stored data is damaged."""


class StructureMismatchError(ZarrCkptError, ValueError):
    """A checkpoint's structure, shapes or dtypes do not match the restore target."""


class UnsupportedLeafError(ZarrCkptError, TypeError):
    """A leaf (or container) cannot be stored; the message names its path."""


class StoreError(ZarrCkptError, OSError):
    """The storage backend failed; the message names the URL."""


class StoreConnectionError(StoreError, ConnectionError):
    """The store's endpoint could not be reached (refused, timed out, unknown host); the
    message names the URL, the endpoint, the cause and the retries spent."""


class StoreCredentialsError(StoreError, PermissionError):
    """No credentials were found for the store; the message says where the client looked."""


class UnknownProtocolError(ZarrCkptError, ValueError):
    """A URL's protocol is not one fsspec knows; the message lists those that are installed
    here and those that a package would add."""


class CollectiveError(ZarrCkptError, RuntimeError):
    """A save by every process of a multi-process JAX job failed on another process, or the
    processes did not all make it (nothing was committed)."""


class BackgroundSaveError(ZarrCkptError, RuntimeError):
    """A background save (``AsyncManager``) failed, and the save that found out saved nothing.

    Raised by the next ``save_pytree(..., async_manager=m)``; ``__cause__`` is the failed
    save's error (which ``wait_previous_save()`` and ``close()`` raise as it is).
    """


class ZarrCkptWarning(UserWarning):
    """Base class of every warning zarrckpt emits."""


class MissingCheckpointWarning(ZarrCkptWarning):
    """``load_pytree`` found no checkpoint and returned the target unchanged."""


class StructureMismatchWarning(ZarrCkptWarning):
    """A mismatch tolerated because ``mismatch="warn"``."""


class SingleWriterWarning(ZarrCkptWarning):
    """The root's backend cannot publish conditionally: one writer at a time is assumed."""


class CollectionWarning(ZarrCkptWarning):
    """A step was committed, but deleting dropped steps or debris failed (retried later)."""
