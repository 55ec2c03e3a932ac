"""zarrckpt: BrainPy / JAX PyTree checkpoints as chunked Zarr v3 stores.

Drop-in for ``bp.checkpoints``::

    import zarrckpt
    zarrckpt.save_pytree("ckpt/", {"net": net.state_dict(), "epoch_i": 3})
    state = zarrckpt.load_pytree("ckpt/")
"""

# Importing zarrckpt is cheap: the names below come from their modules on first use (PEP 562),
# so ``zarrckpt ls`` pays for neither NumPy, zarr nor ml_dtypes (issue 17); the errors are
# plain Python and stay eager.

from importlib import import_module as _import_module
from typing import TYPE_CHECKING, Any

from . import _zarr_hook
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

if TYPE_CHECKING:  # what type checkers and IDEs see; __getattr__ imports them at run time
    from ._async import AsyncManager
    from ._brainpy import StateLoadResult, load_module, save_module
    from ._convert import convert_msgpack
    from .api import latest_step, list_steps, load_pytree, save_pytree
    from .checkpoint import Checkpoint, LazyArray, TreeView, open_checkpoint

    __version__: str

#: public name -> the module that defines it (imported on first access)
_LAZY = {
    "AsyncManager": "._async",
    "StateLoadResult": "._brainpy",
    "load_module": "._brainpy",
    "save_module": "._brainpy",
    "convert_msgpack": "._convert",
    "latest_step": ".api",
    "list_steps": ".api",
    "load_pytree": ".api",
    "save_pytree": ".api",
    "Checkpoint": ".checkpoint",
    "LazyArray": ".checkpoint",
    "TreeView": ".checkpoint",
    "open_checkpoint": ".checkpoint",
}
#: submodules that ``import zarrckpt`` used to bind, as a guide uses them
#: (``zarrckpt.checkpoint.step_url``); imported on first access too
_SUBMODULES = ("api", "checkpoint")


def __getattr__(name: str) -> Any:
    """``zarrckpt.save_pytree`` & co.: imported on first access, then kept in the module."""
    if name == "__version__":  # importlib.metadata alone costs a command ~30 ms
        globals()[name] = value = _version()
        return value
    if name in _SUBMODULES:
        return _import_module(f".{name}", __name__)  # which binds it here
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zarrckpt' has no attribute {name!r}")
    value = getattr(_import_module(module, __name__), name)
    globals()[name] = value
    return value


def _version() -> str:
    """The installed distribution's version, written in one place: pyproject.toml."""
    from importlib import metadata

    try:
        return metadata.version("zarrckpt")
    except metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
        return "0+unknown"


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


# The promise ``import zarrckpt`` makes: zarr-python reads bfloat16 & co. (now, or as soon as
# zarr is imported, without importing it here).
_zarr_hook.install()

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
