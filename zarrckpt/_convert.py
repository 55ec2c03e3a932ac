"""BrainPy / braintools msgpack checkpoints (``.bp`` files) into zarrckpt steps.

``brainpy.checkpoints.save_pytree`` calls ``braintools.file.msgpack_save``, which writes
Flax's serialisation format: one msgpack document holding the *state dict* of the target.
In that state dict

* containers are ``dict``\\ s with ``str`` keys; lists, tuples and namedtuples became dicts
  keyed ``"0"``, ``"1"``, ... (fields by name), and ``None`` stays ``None``;
* a brainunit ``Quantity`` became ``{"mantissa", "scale", "base", "dim", "factor"}``;
* leaves are msgpack scalars (``int``, ``float``, ``bool``, ``str``, ``bytes``) or one of
  three msgpack *ext* types: ``1`` an ndarray, ``2`` a Python ``complex``, ``3`` a numpy
  scalar. Ext 1 and 3 hold a nested msgpack ``(shape, dtype name, C-order bytes)``;
  ext 2 holds ``(real, imag)``;
* an array above 1 GiB was split into ``{"__msgpack_chunked_array__": True, "shape": ...,
  "chunks": ...}`` of flat pieces.

:func:`read_msgpack` decodes that format with ``msgpack`` alone (no braintools, no JAX, and
never pickle): arrays become numpy arrays whose bytes are the file's bytes, so a converted
step loads bit-exact to what ``braintools.file.msgpack_load`` returns. The file is streamed:
memory holds the decoded tree plus at most one array's encoded bytes, not the whole file.
:func:`convert_msgpack` then saves the tree as one zarrckpt step.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import IO, Any

import ml_dtypes
import numpy as np

from . import api
from .errors import CorruptCheckpointError

__all__ = ["convert_msgpack", "read_msgpack"]

_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"
_QUANTITY_KEYS = frozenset({"mantissa", "scale", "base", "dim", "factor"})


def _msgpack() -> Any:
    try:
        import msgpack
    except ImportError:  # pragma: no cover - msgpack comes with brainpy/braintools
        raise ImportError(
            "reading .bp checkpoints needs msgpack: pip install 'zarrckpt[convert]'"
        ) from None
    return msgpack


class _Invalid(ValueError):
    """A malformed ext payload (reported with the file's name by :func:`read_msgpack`)."""


def _dtype(name: Any) -> np.dtype:
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    if not isinstance(name, str):
        raise _Invalid(f"array dtype name must be a string, got {name!r:.60}")
    ml = getattr(ml_dtypes, name, None)  # bfloat16, float8_*, int4, ... (numpy lacks the names)
    is_ml = isinstance(ml, type) and issubclass(ml, np.generic)
    try:
        dtype = np.dtype(ml) if is_ml else np.dtype(name)
    except TypeError:
        raise _Invalid(f"unknown array dtype {name!r}") from None
    if dtype.hasobject or dtype.fields is not None:
        raise _Invalid(f"refusing array dtype {name!r} (objects and structs are not data)")
    return dtype


def _ndarray(data: bytes) -> np.ndarray:
    """An ext-1 payload: msgpack ``(shape, dtype name, C-order bytes)``."""
    msgpack = _msgpack()
    try:
        shape, name, buffer = msgpack.unpackb(data, raw=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise _Invalid(f"malformed array payload ({exc})") from None
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise _Invalid(f"malformed array shape {shape!r:.60}")
    dtype = _dtype(name)
    if not isinstance(buffer, bytes) or len(buffer) != math.prod(shape) * dtype.itemsize:
        raise _Invalid(
            f"array of shape {tuple(shape)} and dtype {dtype} needs "
            f"{math.prod(shape) * dtype.itemsize} bytes, the file holds {len(buffer)}"
        )
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_NDARRAY:
        return _ndarray(data)
    if code == _EXT_NPSCALAR:
        return _ndarray(data)[()]
    if code == _EXT_COMPLEX:
        pair = _msgpack().unpackb(data)
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise _Invalid(f"malformed complex payload {pair!r:.60}")
        return complex(pair[0], pair[1])
    raise _Invalid(f"unknown msgpack ext type {code} (not written by braintools/flax)")


def _unchunk(node: dict[str, Any]) -> np.ndarray:
    """A ``__msgpack_chunked_array__`` dict (an array above 1 GiB) as one array."""
    try:
        shape = tuple(node["shape"][str(i)] for i in range(len(node["shape"])))
        pieces = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
        return np.concatenate(pieces).reshape(shape)
    except (KeyError, TypeError, ValueError) as exc:
        raise _Invalid(f"malformed chunked array ({exc!r:.80})") from None


def _quantity(node: dict[str, Any]) -> Any:
    """A brainunit Quantity from its state dict, as ``msgpack_load`` into a Quantity makes it.

    The state dict has no unit name; a unit brainunit exports with the same dimension,
    scale, base and factor (``mV``) lends its name, so the converted step shows ``mV`` and
    not ``m^2 * kg / (s^3 * A)`` (the values and the unit are the same either way).
    """
    import brainunit as u

    unit = u.Unit(
        dim=u.Dimension(node["dim"]), scale=node["scale"], base=node["base"],
        factor=node["factor"],
    )  # fmt: skip
    if not unit.is_unitless:
        same = (
            v for v in vars(u).values()
            if isinstance(v, u.Unit) and v == unit
            and (v.scale, v.base, v.factor) == (unit.scale, unit.base, unit.factor)
        )  # fmt: skip
        unit = next(same, unit)
    return u.Quantity(node["mantissa"], unit=unit)


def _fix(node: Any, quantities: bool) -> Any:
    """Undo the writer's chunking of big arrays and, optionally, rebuild Quantities."""
    if not isinstance(node, dict):
        return node
    if _CHUNKED in node:
        return _unchunk(node)
    out = {key: _fix(value, quantities) for key, value in node.items()}
    numeric = (np.ndarray, np.generic, int, float, complex)
    if quantities and out.keys() == _QUANTITY_KEYS and isinstance(out["mantissa"], numeric):
        return _quantity(out)
    return out


@contextlib.contextmanager
def _open(src: Any, storage_options: dict[str, Any] | None) -> Iterator[tuple[IO[bytes], str]]:
    if hasattr(src, "read"):
        yield src, getattr(src, "name", "<file>")
        return
    src = os.fspath(src)
    if "://" in src and not src.startswith("file://"):
        import fsspec

        with fsspec.open(src, "rb", **(storage_options or {})) as fp:
            yield fp, src
        return
    path = src.removeprefix("file://")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a .bp checkpoint file")
    with open(path, "rb") as fp:
        yield fp, path


def read_msgpack(
    src: Any,
    *,
    quantities: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """The tree stored in a braintools / flax msgpack checkpoint, arrays as numpy.

    Args:
        src: a path, an fsspec URL or a binary file object.
        quantities: rebuild brainunit Quantities from their ``{"mantissa", "scale", "base",
            "dim", "factor"}`` state dicts (needs brainunit; if it is not installed they
            stay dicts). False returns exactly what ``braintools.file.msgpack_load(src)``
            returns without a target.
        storage_options: passed to fsspec when ``src`` is a URL.

    Raises:
        CorruptCheckpointError: the file is not a msgpack checkpoint (or is truncated).
    """
    msgpack = _msgpack()
    if quantities:
        try:
            import brainunit  # noqa: F401
        except ImportError:
            quantities = False
    with _open(src, storage_options) as (fp, where):
        # Streamed: the buffer holds at most one undecoded object (an array of <= 1 GiB,
        # as the writer splits bigger ones), never the whole file.
        unpacker = msgpack.Unpacker(
            fp, ext_hook=_ext_hook, raw=False, max_buffer_size=0, read_size=4 << 20
        )
        try:
            tree = unpacker.unpack()
        except msgpack.OutOfData:
            raise CorruptCheckpointError(
                f"{where}: not a msgpack checkpoint (empty or truncated)"
            ) from None
        except (_Invalid, ValueError, TypeError, msgpack.UnpackException) as exc:
            raise CorruptCheckpointError(
                f"{where}: not a valid msgpack checkpoint ({exc})"
            ) from None
        try:
            unpacker.unpack()
        except msgpack.OutOfData:
            pass
        except Exception as exc:
            raise CorruptCheckpointError(
                f"{where}: trailing garbage after the checkpoint ({exc})"
            ) from None
        else:
            raise CorruptCheckpointError(f"{where}: trailing data after the checkpoint")
    try:
        return _fix(tree, quantities)
    except _Invalid as exc:
        raise CorruptCheckpointError(f"{where}: {exc}") from None


def convert_msgpack(
    src: Any,
    dst: Any,
    *,
    step: int | None = None,
    overwrite: bool = False,
    quantities: bool = True,
    storage_options: dict[str, Any] | None = None,
    src_storage_options: dict[str, Any] | None = None,
    chunk_bytes: int | None = None,
    codec: str | None = None,
    verbose: bool = False,
) -> str:
    """Convert a ``.bp`` checkpoint (``brainpy.checkpoints.save_pytree`` /
    ``braintools.file.msgpack_save``) into a step of the zarrckpt checkpoint ``dst``.

    Values are bit-exact: ``load_pytree(dst)`` returns what ``msgpack_load(src)`` returns
    without a target (dict containers with ``str`` keys; numpy arrays, numpy and Python
    scalars), except that Quantities are rebuilt (see :func:`read_msgpack`). Lists and
    tuples were stored as dicts keyed ``"0"``, ``"1"``, ...; ``load_pytree(dst, target)``
    restores them into a target's lists and tuples all the same, since leaves are matched
    by path.

    Args:
        src: the ``.bp`` file: a path, an fsspec URL (with ``src_storage_options``) or a
            binary file object.
        dst: the zarrckpt root, created if needed; other steps there are kept.
        step: step number; None: one past the latest (0 for a new root).
        overwrite: with an explicit ``step`` at or below the latest: replace it and drop
            the later steps (as ``save_pytree``). Without it, that raises
            :class:`~zarrckpt.errors.AlreadyExistsError`.
        quantities: rebuild brainunit Quantities (see :func:`read_msgpack`).
        storage_options: fsspec options for ``dst``.
        chunk_bytes, codec, verbose: as for :func:`~zarrckpt.save_pytree`.

    Returns:
        The location of the new step.
    """
    tree = read_msgpack(src, quantities=quantities, storage_options=src_storage_options)
    return api.save_pytree(
        dst, tree, overwrite=True if step is None else overwrite, verbose=verbose, step=step,
        keep=None, storage_options=storage_options, chunk_bytes=chunk_bytes, codec=codec,
    )  # fmt: skip
