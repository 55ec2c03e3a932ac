"""zarrckpt: BrainPy / JAX PyTree checkpoints as chunked Zarr v3 stores.

Drop-in for ``bp.checkpoints``::

    import zarrckpt
    zarrckpt.save_pytree("ckpt/", {"net": net.state_dict(), "epoch_i": 3})
    state = zarrckpt.load_pytree("ckpt/")
"""

from importlib import metadata as _metadata

from . import _dtypes  # noqa: F401  (registers bfloat16 & co. with zarr-python)
from ._async import AsyncManager
from ._brainpy import StateLoadResult, load_module, save_module
from ._convert import convert_msgpack
from .api import latest_step, list_steps, load_pytree, save_pytree
from .checkpoint import Checkpoint, LazyArray, TreeView, open_checkpoint
from .errors import (
    AlreadyExistsError,
    BackgroundSaveError,
    CheckpointNotFoundError,
    CollectionWarning,
    CollectiveError,
    ConcurrentWriteError,
    CorruptCheckpointError,
    MissingCheckpointWarning,
    SingleWriterWarning,
    StoreConnectionError,
    StoreCredentialsError,
    StoreError,
    StructureMismatchError,
    StructureMismatchWarning,
    UnknownProtocolError,
    UnsupportedLeafError,
    ZarrCkptError,
    ZarrCkptWarning,
)

try:  # written in one place, pyproject.toml; installing the package records it
    __version__ = _metadata.version("zarrckpt")
except _metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AlreadyExistsError",
    "AsyncManager",
    "BackgroundSaveError",
    "Checkpoint",
    "CheckpointNotFoundError",
    "CollectionWarning",
    "CollectiveError",
    "ConcurrentWriteError",
    "CorruptCheckpointError",
    "LazyArray",
    "MissingCheckpointWarning",
    "SingleWriterWarning",
    "StateLoadResult",
    "StoreConnectionError",
    "StoreCredentialsError",
    "StoreError",
    "StructureMismatchError",
    "StructureMismatchWarning",
    "TreeView",
    "UnknownProtocolError",
    "UnsupportedLeafError",
    "ZarrCkptError",
    "ZarrCkptWarning",
    "__version__",
    "convert_msgpack",
    "latest_step",
    "list_steps",
    "load_module",
    "load_pytree",
    "open_checkpoint",
    "save_module",
    "save_pytree",
]
