"""Leaves: what may be stored, how it becomes a host array, and how it comes back.

A leaf becomes one numpy array plus a small JSON record of its kind, so that a load
without a target returns what was saved (a Python ``int`` stays an ``int``, a Quantity
keeps its unit) and a load into a target updates the target's own objects.

Framework types (JAX, BrainPy, brainstate, brainunit) are recognised only when their module
is already imported: an object cannot be a ``jax.Array`` if ``jax`` was never imported, so
the core never imports a framework it does not need.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import numpy as np

from . import _dtypes
from .errors import UnsupportedLeafError, ZarrCkptWarning

__all__ = ["decode", "encode", "restore"]

_PY_SCALARS = {"bool": bool, "int": int, "float": float, "complex": complex}


def _module_attr(module: str, attr: str) -> Any:
    mod = sys.modules.get(module)
    return getattr(mod, attr, None) if mod is not None else None


def _brainpy_array_type() -> type | None:
    bm = sys.modules.get("brainpy.math")
    return getattr(bm, "Array", None) if bm is not None else None


def _quantity_type() -> type | None:
    for module in ("brainunit", "saiunit"):
        cls = _module_attr(module, "Quantity")
        if cls is not None:
            return cls
    return None


def _is(obj: Any, cls: type | None) -> bool:
    return cls is not None and isinstance(obj, cls)


def _host_array(path: str, value: Any, copy: bool) -> np.ndarray:
    """``value`` as a numpy array with a supported dtype (a copy if ``copy``)."""
    jax_array = _module_attr("jax", "Array")
    if _is(value, jax_array):
        array = np.asarray(value)  # device -> host; JAX arrays are immutable, so no copy
    elif isinstance(value, np.ndarray):
        array = value.copy() if copy else value
    else:
        array = np.asarray(value)
        if copy and array is value:
            array = array.copy()
    if not _dtypes.is_supported(array.dtype):
        raise UnsupportedLeafError(
            f"leaf {path!r}: dtype {array.dtype} cannot be stored; expected a numeric, bool, "
            "complex or ml_dtypes (bfloat16, float8_*) dtype"
        )
    return array


def _unit_record(unit: Any) -> dict[str, Any]:
    return {
        "dim": [float(d) for d in np.asarray(unit.dim._dims).ravel()],
        "scale": unit.scale,
        "base": unit.base,
        "factor": unit.factor,
        "name": unit.name,
        "dispname": unit.dispname,
    }


def _unit_from_record(rec: dict[str, Any]) -> Any:
    import brainunit as u

    dims = [int(d) if float(d).is_integer() else d for d in rec["dim"]]
    dim = u.get_or_create_dimension(dims)
    return u.Unit(
        dim,
        scale=rec["scale"],
        base=rec["base"],
        factor=rec["factor"],
        name=rec["name"],
        dispname=rec["dispname"],
    )


def encode(path: str, value: Any, *, copy: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """A host array for ``value`` and its kind record.

    With ``copy=True`` the array does not alias anything the caller may mutate later (numpy
    buffers are copied; JAX arrays are immutable and are not). Raises
    :class:`~zarrckpt.errors.UnsupportedLeafError` naming ``path`` for anything else.
    """
    bp_array = _brainpy_array_type()
    if _is(value, bp_array):
        return _host_array(path, value.value, copy), {
            "kind": "brainpy",
            "class": type(value).__name__,
        }
    if _is(value, _module_attr("brainstate", "State")):
        inner = value.value
        if _is(inner, _quantity_type()):
            array, rec = encode(path, inner, copy=copy)
            return array, {**rec, "state": type(value).__name__}
        if not (hasattr(inner, "shape") and hasattr(inner, "dtype")):
            raise UnsupportedLeafError(
                f"leaf {path!r}: a brainstate {type(value).__name__} holding "
                f"{type(inner).__name__}; expected one holding an array"
            )
        return _host_array(path, inner, copy), {"kind": "state", "class": type(value).__name__}
    if _is(value, _quantity_type()):
        return _host_array(path, value.mantissa, copy), {
            "kind": "quantity",
            "unit": _unit_record(value.unit),
        }
    if _is(value, _module_attr("jax", "Array")):
        return _host_array(path, value, copy), {"kind": "jax"}
    if isinstance(value, np.ndarray):
        return _host_array(path, value, copy), {"kind": "ndarray"}
    if isinstance(value, np.generic):
        return _host_array(path, np.asarray(value), False), {"kind": "npscalar"}
    if isinstance(value, (bool, int, float, complex)):
        try:
            array = np.asarray(value)
        except OverflowError:
            array = np.asarray(value, dtype=object)
        if array.dtype == object:
            raise UnsupportedLeafError(f"leaf {path!r}: int {value} does not fit in int64/uint64")
        return array, {"kind": "py", "pytype": type(value).__name__}
    if isinstance(value, str):
        return np.frombuffer(value.encode("utf-8"), dtype=np.uint8), {"kind": "str"}
    if isinstance(value, bytes):
        return np.frombuffer(value, dtype=np.uint8), {"kind": "bytes"}
    raise UnsupportedLeafError(
        f"leaf {path!r}: cannot store an object of type {type(value).__module__}."
        f"{type(value).__qualname__}; expected an array (numpy, JAX, BrainPy, brainstate), a "
        "brainunit Quantity, a number, str or bytes, inside dict/list/tuple/namedtuple/None"
    )


def decode(rec: dict[str, Any], array: np.ndarray) -> Any:
    """The value a load without target returns for a leaf stored as ``array``."""
    kind = rec.get("kind", "ndarray")
    if kind == "py":
        return _PY_SCALARS[rec["pytype"]](array.item())
    if kind == "npscalar":
        return array[()]
    if kind == "str":
        return array.tobytes().decode("utf-8")
    if kind == "bytes":
        return array.tobytes()
    if kind == "quantity":
        try:
            import brainunit as u
        except ImportError:
            warnings.warn(
                f"leaf {rec['path']!r} is a brainunit Quantity but brainunit is not installed; "
                "returning its mantissa as a plain array",
                ZarrCkptWarning,
                stacklevel=4,
            )
            return array
        return u.Quantity(array, unit=_unit_from_record(rec["unit"]))
    return array


def describe(value: Any) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype of a target leaf as it would be stored (None for str/bytes)."""
    if isinstance(value, (str, bytes)):
        return None
    if _is(value, _brainpy_array_type()) or _is(value, _module_attr("brainstate", "State")):
        value = value.value  # they wrap their array
    if _is(value, _quantity_type()):
        value = value.mantissa
    if isinstance(value, (bool, int, float, complex)):
        value = np.asarray(value)
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None:
        return None
    return tuple(shape), np.dtype(dtype)


def restore(target: Any, rec: dict[str, Any], array: np.ndarray) -> Any:
    """``array`` (already checked against ``target``'s shape and dtype) in ``target``'s form.

    BrainPy variables and brainstate States are updated in place and returned; JAX arrays
    are placed on the target's devices with its sharding.
    """
    if _is(target, _brainpy_array_type()):
        import jax.numpy as jnp

        target.value = jnp.asarray(array)
        return target
    if _is(target, _module_attr("brainstate", "State")):
        target.value = restore(target.value, rec, array)
        return target
    quantity = _quantity_type()
    if _is(target, quantity):
        unit = _unit_from_record(rec["unit"]) if rec.get("kind") == "quantity" else target.unit
        return quantity(restore(target.mantissa, rec, array), unit=unit)
    jax_array = _module_attr("jax", "Array")
    if _is(target, jax_array):
        import jax

        return jax.device_put(array, target.sharding)
    if isinstance(target, np.ndarray):
        return array
    if isinstance(target, np.generic):
        return array[()]
    if isinstance(target, (bool, int, float, complex)):
        return type(target)(array.item())
    if isinstance(target, str):
        return array.tobytes().decode("utf-8")
    if isinstance(target, bytes):
        return array.tobytes()
    return decode(rec, array)
