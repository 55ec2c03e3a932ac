"""zarrckpt's ml_dtypes data types in zarr-python: importing this module registers them.

zarr-python 3.1 knows none of the ml_dtypes types (``_dtypes._ML_NAMES``); registering them
through zarr's documented extension point (``zarr.dtype.data_type_registry``) lets plain
``zarr.open_array`` read and write the arrays zarrckpt stores with them. This module imports
zarr and ml_dtypes, so ``import zarrckpt`` does not import it: ``_zarr_hook`` does, as soon as
zarr itself is imported. Names a newer zarr (or another library) already knows are left alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeGuard

import numpy as np
from zarr.dtype import ZDType, data_type_registry

from ._dtypes import ml_dtypes_table

if TYPE_CHECKING:  # the one class, whichever module a release names it in
    from zarr.dtype import DataTypeValidationError
else:
    try:  # public since zarr 3.2 (zarr 3.4 deprecates the zarr.core and zarr.dtype spellings)
        from zarr.errors import DataTypeValidationError
    except ImportError:  # zarr 3.1
        from zarr.dtype import DataTypeValidationError

# No public path in any zarr release yet: the mix-ins a fixed-size, byte-ordered dtype needs.
from zarr.core.dtype.common import HasEndianness, HasItemSize

__all__: list[str] = []


@dataclass(frozen=True, kw_only=True)
class _MLDType(ZDType[np.dtype, np.generic], HasItemSize):
    """A zarr-python data type wrapping one ml_dtypes type (subclassed once per type)."""

    _zarr_v3_name: ClassVar[str]
    _native: ClassVar[np.dtype]

    @classmethod
    def _check_native_dtype(cls, dtype: Any) -> TypeGuard[np.dtype]:
        return isinstance(dtype, np.dtype) and dtype == cls._native

    @classmethod
    def from_native_dtype(cls, dtype: Any) -> _MLDType:
        if cls._check_native_dtype(dtype):
            return cls()
        raise DataTypeValidationError(f"Invalid data type: {dtype}. Expected {cls._native}")

    def to_native_dtype(self) -> np.dtype:
        return self._native

    @classmethod
    def _from_json_v2(cls, data: Any) -> _MLDType:
        raise DataTypeValidationError(f"{cls._zarr_v3_name} is not a Zarr v2 data type")

    @classmethod
    def _from_json_v3(cls, data: Any) -> _MLDType:
        if data == cls._zarr_v3_name:
            return cls()
        raise DataTypeValidationError(f"Expected {cls._zarr_v3_name!r}, got {data!r}")

    def to_json(self, zarr_format: int) -> Any:
        if zarr_format == 3:
            return self._zarr_v3_name
        raise ValueError(f"{self._zarr_v3_name} exists only in Zarr v3")

    def _check_scalar(self, data: object) -> bool:
        return isinstance(data, (int, float, np.generic))

    def cast_scalar(self, data: object) -> np.generic:
        if not self._check_scalar(data):
            raise TypeError(f"Cannot convert {data!r} to {self._zarr_v3_name}")
        return self._native.type(data)

    def default_scalar(self) -> np.generic:
        return self._native.type(0)

    def from_json_scalar(self, data: Any, *, zarr_format: int) -> np.generic:
        specials = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
        if isinstance(data, str) and data in specials:
            return self._native.type(specials[data])
        if isinstance(data, str) and data.startswith("0x"):
            # Hex fill values are the type's own bits, not float16's.
            raw = int(data, 16).to_bytes(self.item_size, "little")
            return np.frombuffer(raw, dtype=self._native)[0]
        if isinstance(data, (int, float)):
            return self._native.type(data)
        raise TypeError(f"Invalid fill value {data!r} for {self._zarr_v3_name}")

    def to_json_scalar(self, data: object, *, zarr_format: int) -> Any:
        value = float(self.cast_scalar(data))
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return int(value) if self._native.kind in "iuV" and self.item_size == 1 else value

    @property
    def item_size(self) -> int:
        return self._native.itemsize


@dataclass(frozen=True, kw_only=True)
class _MLDTypeWithEndianness(_MLDType, HasEndianness):
    """Multi-byte ml_dtypes types (bfloat16): zarr writes ``bytes`` with ``endian: little``."""


def _register() -> None:
    for native, name in ml_dtypes_table().items():
        try:
            data_type_registry.get(name)
            continue  # a newer zarr (or another library) already knows it
        except KeyError:
            pass
        base = _MLDTypeWithEndianness if native.itemsize > 1 else _MLDType
        cls = type(
            f"ZarrCkpt_{name}",
            (base,),
            {"_zarr_v3_name": name, "_native": native, "dtype_cls": type(native)},
        )
        data_type_registry.register(name, dataclass(frozen=True, kw_only=True)(cls))


_register()
