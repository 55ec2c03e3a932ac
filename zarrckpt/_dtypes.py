"""Zarr v3 data type names for numpy and ml_dtypes dtypes.

The names are the ones TensorStore's ``zarr3`` driver uses (``"bfloat16"``, ``"float8_e4m3fn"``,
...), so TensorStore opens these arrays natively. Every element is stored in one byte (two for
bfloat16), little-endian, as TensorStore does.

ml_dtypes is imported only when one of its names is read: its extension takes about a second
to import, which ``zarrckpt tree`` of a float32 checkpoint should not pay. Asking about a dtype
never imports it: an ml_dtypes dtype cannot exist before ml_dtypes is imported. Teaching
zarr-python these names is ``_zarr_dtypes``'s job, done when zarr is imported (``_zarr_hook``).
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import numpy as np

__all__ = ["fill_value_json", "is_supported", "ml_dtypes_table", "native_dtype", "zarr_name"]

_NUMPY_NAMES = {
    np.dtype(t): np.dtype(t).name
    for t in (
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64", "complex64", "complex128",
    )
}  # fmt: skip
_NUMPY_BY_NAME = {name: dtype for dtype, name in _NUMPY_NAMES.items()}

# ml_dtypes names that TensorStore's zarr3 driver knows (plus unsigned 2/4-bit ints and e4m3,
# stored the same way). Only those present in the installed ml_dtypes are used.
_ML_NAMES = (
    "bfloat16", "float8_e3m4", "float8_e4m3", "float8_e4m3fn", "float8_e4m3fnuz",
    "float8_e4m3b11fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn",
    "int2", "int4", "uint2", "uint4",
)  # fmt: skip


@functools.cache
def ml_dtypes_table() -> dict[np.dtype, str]:
    """ml_dtypes dtype -> name, for the names of ``_ML_NAMES`` the installed ml_dtypes has
    (imports ml_dtypes)."""
    import ml_dtypes

    return {
        np.dtype(getattr(ml_dtypes, name)): name for name in _ML_NAMES if hasattr(ml_dtypes, name)
    }


def _loaded_ml_dtypes() -> dict[np.dtype, str]:
    """:func:`ml_dtypes_table`, or nothing while ml_dtypes is not imported (no dtype can then
    be one of its types, and importing it costs a second)."""
    return ml_dtypes_table() if "ml_dtypes" in sys.modules else {}


def zarr_name(dtype: np.dtype) -> str | None:
    """The Zarr v3 ``data_type`` name of a native-order dtype, or None if unsupported."""
    dtype = dtype.newbyteorder("=") if dtype.byteorder in "<>" else dtype
    return _NUMPY_NAMES.get(dtype) or _loaded_ml_dtypes().get(dtype)


def native_dtype(name: str) -> np.dtype:
    """The numpy dtype of a Zarr v3 ``data_type`` name written by zarrckpt."""
    if name in _NUMPY_BY_NAME:
        return _NUMPY_BY_NAME[name]
    if name in _ML_NAMES:
        for dtype, ml_name in ml_dtypes_table().items():
            if ml_name == name:
                return dtype
    raise ValueError(f"unsupported Zarr data type {name!r}")


def is_supported(dtype: np.dtype) -> bool:
    return zarr_name(dtype) is not None


def fill_value_json(dtype: np.dtype) -> Any:
    """A zero fill value, spelt as the Zarr v3 spec wants it for ``dtype``."""
    if dtype.kind == "b":
        return False
    if dtype.kind == "c":
        return [0.0, 0.0]
    if dtype.kind in "iu" or _loaded_ml_dtypes().get(dtype, "").startswith(("int", "uint")):
        return 0
    return 0.0
