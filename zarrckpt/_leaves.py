"""Leaves: what may be stored, how it becomes a host array, and how it comes back.

A leaf becomes one numpy array plus a small JSON record of its kind, so that a load
without a target returns what was saved (a Python ``int`` stays an ``int``, a Quantity
keeps its unit) and a load into a target updates the target's own objects.

Framework types (JAX, BrainPy, brainstate, brainunit) are recognised only when their module
is already imported: an object cannot be a ``jax.Array`` if ``jax`` was never imported, so
the core never imports a framework it does not need.

Typed JAX PRNG keys (``jax.random.key(0)``, arrays of them, a brainstate ``RandomState``'s
value) are stored as their ``jax.random.key_data`` (``uint32``, the key shape appended) with
the implementation's name (``"impl": "threefry2x32"``), and come back as typed keys of that
implementation, with or without a target, so a resumed run draws the same numbers.

Kinds recorded per leaf (``"kind"``): ``ndarray``, ``jax``, ``npscalar``, ``py`` (+
``pytype``), ``str``, ``bytes``, ``quantity`` (+ ``unit``), ``brainpy`` (+ ``class``),
``state`` (+ ``class``: a brainstate State holding an array), ``prngkey`` (+ ``impl``). A
State holding a Quantity or a key keeps that kind and adds ``"state": class name``.

Anything else cannot be stored. Below a registered PyTree node ``_tree`` records it as
taken from the target instead of calling :func:`encode`; elsewhere :func:`encode` refuses it.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from typing import Any, TypeGuard

import numpy as np

from . import _dtypes, _sharding
from ._format import ArrayLayout, parse_codec, shown
from .errors import CorruptCheckpointError, UnsupportedLeafError, ZarrCkptWarning

__all__ = [
    "HASH_FIELD",
    "LEAF_TYPES",
    "IdentityMemo",
    "check_dims",
    "check_record",
    "compare",
    "decode",
    "describe",
    "encode",
    "global_target",
    "immutable_array",
    "is_leaf",
    "restore",
    "state_subtree",
]

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


def _holds_array(inner: Any) -> bool:
    """Whether a State's value is one leaf (an array or a Quantity), not a sub-tree."""
    return _is(inner, _quantity_type()) or (hasattr(inner, "shape") and hasattr(inner, "dtype"))


def _is_key(value: Any) -> bool:
    """Whether ``value`` is a typed JAX PRNG key array (``jax.random.key``, not ``PRNGKey``),
    or a ``jax.ShapeDtypeStruct`` of one (a target)."""
    jax = sys.modules.get("jax")
    if jax is None or not isinstance(value, (jax.Array, jax.ShapeDtypeStruct)):
        return False
    if isinstance(value.dtype, np.dtype):  # key arrays have an extended dtype
        return False
    return bool(jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key))


def _key_impl(key: Any) -> str:
    import jax

    if isinstance(key, jax.ShapeDtypeStruct):  # a target: its key dtype holds the impl
        impl = getattr(key.dtype, "_impl", None)
        return str(getattr(impl, "name", impl))
    impl = jax.random.key_impl(key)
    return impl if isinstance(impl, str) else str(getattr(impl, "name", impl))


def is_leaf(value: Any) -> bool:
    """Whether ``value`` is a leaf of a kind :func:`encode` stores (even if JAX could split it).

    ``_tree`` asks this before treating an object as a JAX PyTree node: Quantities and
    BrainPy arrays are PyTree nodes to JAX but one leaf each here. A brainstate State is a
    leaf if it holds an array or a Quantity (a State holding a sub-tree is a container:
    see :func:`state_subtree`).
    """
    cls = type(value)
    if cls in LEAF_TYPES:
        return True
    classes = _leaf_classes()
    if issubclass(cls, classes):  # every instance of ``cls`` is a leaf
        if len(LEAF_TYPES) < _MAX_LEAF_TYPES:
            LEAF_TYPES.add(cls)
        return True
    if isinstance(value, classes):  # this instance only (a JAX tracer holding an array)
        return True
    if _is(value, _module_attr("brainstate", "State")):
        return _holds_array(value.value)
    return False


def _leaf_classes() -> tuple[type, ...]:
    """The classes whose instances :func:`is_leaf` takes (of the frameworks imported so far;
    ``jax.ShapeDtypeStruct``: a target, which restores a ``jax.Array``)."""
    found = [np.ndarray, np.generic, bool, int, float, complex, str, bytes]
    for cls in (
        _module_attr("jax", "Array"),
        _brainpy_array_type(),
        _module_attr("jax", "ShapeDtypeStruct"),
        _quantity_type(),
    ):
        if cls is not None:
            found.append(cls)
    return tuple(found)


#: Types whose every instance is a leaf, by class (not a brainstate State, a leaf or a
#: container by what it holds; not a JAX tracer, a ``jax.Array`` by the value it traces):
#: the leaves of a large tree are asked about again and again. Bounded: classes made on
#: the fly are not kept forever.
LEAF_TYPES: set[type] = {np.ndarray, bool, int, float, str}
_MAX_LEAF_TYPES = 1024


def state_subtree(value: Any) -> tuple[Any] | None:
    """``(sub_tree,)`` if ``value`` is a brainstate State holding a sub-tree, else None.

    Such a State is a container to ``_tree`` (transparent: its sub-tree is stored at its
    path); a State holding an array or a Quantity is a leaf (:func:`is_leaf`).
    """
    if _is(value, _module_attr("brainstate", "State")) and not _holds_array(value.value):
        return (value.value,)
    return None


def _host_array(path: str, value: Any, copy: bool) -> Any:
    """``value`` as a numpy array with a supported dtype (a copy if ``copy``); a ``jax.Array``
    sharded over other processes too as the :class:`~zarrckpt._sharding.Shards` this
    process writes."""
    jax_array = _module_attr("jax", "Array")
    array: np.ndarray | _sharding.Shards
    if _is(value, jax_array) and _sharding.is_global(value):
        array = _sharding.owned_pieces(value)
    elif _is(value, jax_array):
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
        name=rec.get("name"),
        dispname=rec.get("dispname"),  # optional: _check_unit allows them absent
    )


def _sharding_field(value: Any) -> dict[str, Any]:
    """``{"sharding": ...}`` for a ``jax.Array`` spread over several devices, else nothing."""
    if not _is(value, _module_attr("jax", "Array")):
        return {}
    described = _sharding.describe(value.sharding, tuple(value.shape))
    return {"sharding": described} if described else {}


def immutable_array(value: Any) -> Any | None:
    """The ``jax.Array`` holding ``value``'s data (itself, or inside a BrainPy Variable, a
    brainstate State or a Quantity), or None: the same such object means the same bytes."""
    if type(value) is np.ndarray:
        return None
    jax_array = _module_attr("jax", "Array")
    for _ in range(3):
        if _is(value, jax_array):
            return value
        if _is(value, _quantity_type()):
            value = value.mantissa
        elif _is(value, _brainpy_array_type()) or _is(value, _module_attr("brainstate", "State")):
            value = value.value
        else:
            return None
    return None


class _KeyedRef(weakref.ref):  # type: ignore[type-arg]
    """A weak reference that knows its memo key (the object's ``id``)."""

    __slots__ = ("key",)
    key: int


class IdentityMemo:
    """What is known of live objects, by identity, while they live: for immutable leaves
    (``jax.Array``), the same object means the same kind, dtype and bytes. A weak reference
    tells the object from a later one that reuses its ``id``."""

    def __init__(self) -> None:
        self.items: dict[int, tuple[weakref.ref[Any], Any]] = {}
        items = self.items

        def forget(ref: _KeyedRef) -> None:  # (one callback for all: no closure per entry)
            found = items.get(ref.key)
            if found is not None and found[0] is ref:  # (not a later object's entry)
                items.pop(ref.key, None)

        self._forget = forget

    def get(self, obj: Any) -> Any | None:
        found = self.items.get(id(obj))
        return found[1] if found is not None and found[0]() is obj else None

    def put(self, obj: Any, value: Any) -> None:
        """Keep ``value`` for ``obj`` until ``obj`` dies (nothing, if it has no weak refs)."""
        try:
            ref = _KeyedRef(obj, self._forget)
        except TypeError:
            return
        ref.key = id(obj)
        self.items[ref.key] = (ref, value)


def encode(path: str, value: Any, *, copy: bool = False) -> tuple[Any, dict[str, Any]]:
    """A host array for ``value`` and its kind record.

    With ``copy=True`` the array does not alias anything the caller may mutate later (numpy
    buffers are copied; JAX arrays are immutable and are not). Raises
    :class:`~zarrckpt.errors.UnsupportedLeafError` naming ``path`` for anything else.
    """
    if type(value) is np.ndarray:  # the commonest leaf, without the checks below
        return _host_array(path, value, copy), {"kind": "ndarray"}
    bp_array = _brainpy_array_type()
    if _is(value, bp_array):
        return _host_array(path, value.value, copy), {
            "kind": "brainpy",
            "class": type(value).__name__,
            **_sharding_field(value.value),
        }
    if _is(value, _module_attr("brainstate", "State")):
        inner = value.value
        if not _holds_array(inner):
            raise UnsupportedLeafError(
                f"leaf {path!r}: a brainstate {type(value).__name__} holding "
                f"{type(inner).__name__}; expected one holding an array"
            )
        array, rec = encode(path, inner, copy=copy)
        if rec["kind"] in ("jax", "ndarray", "npscalar"):
            return array, {"kind": "state", "class": type(value).__name__, **_sharding_field(inner)}
        return array, {**rec, "state": type(value).__name__}
    if _is(value, _quantity_type()):
        return _host_array(path, value.mantissa, copy), {
            "kind": "quantity",
            "unit": _unit_record(value.unit),
        }
    if _is_key(value):
        import jax

        data = jax.random.key_data(value)
        return _host_array(path, data, copy), {"kind": "prngkey", "impl": _key_impl(value)}
    if _is(value, _module_attr("jax", "Array")):
        return _host_array(path, value, copy), {"kind": "jax", **_sharding_field(value)}
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
        "brainunit Quantity, a number, str or bytes, inside dict/list/tuple/namedtuple/None "
        "(other objects, such as functions, only inside a registered PyTree node like an "
        "equinox Module, where a load takes them from its target)"
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
        try:
            unit = _unit_from_record(rec["unit"])
        except Exception as exc:
            raise CorruptCheckpointError(
                f"leaf {rec['path']!r}: the recorded unit cannot be rebuilt ({exc})"
            ) from exc
        return u.Quantity(array, unit=unit)
    if kind == "prngkey":
        try:
            return _wrap_key(rec, array, rec["impl"])
        except ImportError:
            warnings.warn(
                f"leaf {rec['path']!r} is a JAX PRNG key ({rec['impl']}) but jax is not "
                "installed; returning its key data as a uint32 array",
                ZarrCkptWarning,
                stacklevel=4,
            )
            return array
    return array


def _wrap_key(rec: dict[str, Any], array: np.ndarray, impl: str) -> Any:
    import jax

    try:
        # jax annotates Array, but takes "a uint32 array" (its docstring): here a NumPy one
        return jax.random.wrap_key_data(array, impl=impl)  # type: ignore[arg-type]
    except (TypeError, ValueError, KeyError) as exc:
        raise CorruptCheckpointError(
            f"leaf {rec['path']!r}: key data of shape {array.shape} is not a {impl!r} PRNG key "
            f"({exc})"
        ) from exc


def _stored_part(target: Any) -> Any:
    """What of a target leaf holds the stored array: a BrainPy variable's or a brainstate
    State's value, a Quantity's mantissa, else the leaf itself."""
    if _is(target, _brainpy_array_type()) or _is(target, _module_attr("brainstate", "State")):
        target = target.value  # they wrap their array
    if _is(target, _quantity_type()):
        target = target.mantissa
    return target


def describe(value: Any) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype of a target leaf as it would be stored (None for str/bytes)."""
    if isinstance(value, (str, bytes)):
        return None
    value = _stored_part(value)
    if _is_key(value):
        import jax

        value = jax.eval_shape(jax.random.key_data, value)  # stored as its key data
    if isinstance(value, (bool, int, float, complex)):
        value = np.asarray(value)
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None:
        return None
    return tuple(shape), np.dtype(dtype)


def global_target(path: str, target: Any) -> Any:
    """The ``jax.Array`` or ``jax.ShapeDtypeStruct`` inside a target leaf if it is sharded
    over other processes too (each process then reads only its shards), else None."""
    target = _stored_part(target)
    jax_types = tuple(
        t for t in (_module_attr("jax", "Array"), _module_attr("jax", "ShapeDtypeStruct")) if t
    )
    if not jax_types or not isinstance(target, jax_types) or not _sharding.is_global(target):
        return None
    if _is_key(target):
        raise UnsupportedLeafError(
            f"leaf {path!r}: restoring a PRNG key onto devices of several processes is not "
            "supported (sharded or replicated); restore its key data (a uint32 target of "
            "jax.random.key_data's shape) and jax.random.wrap_key_data it"
        )
    return target


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
    if quantity is not None and _is(target, quantity):
        unit = _unit_from_record(rec["unit"]) if rec.get("kind") == "quantity" else target.unit
        return quantity(restore(target.mantissa, rec, array), unit=unit)
    if _is_key(target):
        import jax

        impl = rec["impl"] if rec.get("kind") == "prngkey" else _key_impl(target)
        key = _wrap_key(rec, array, impl)
        return key if target.sharding is None else jax.device_put(key, target.sharding)
    jax_array = _module_attr("jax", "Array")
    if _is(target, jax_array):
        import jax

        return jax.device_put(array, target.sharding)
    if _is(target, _module_attr("jax", "ShapeDtypeStruct")):
        import jax

        sharding = target.sharding
        return jax.device_put(array, sharding) if sharding is not None else jax.numpy.asarray(array)
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


def compare(path: str, target: Any, rec: dict[str, Any]) -> str | None:
    """Why ``rec`` cannot restore ``target`` beyond shape and dtype (None if it can).

    A typed PRNG key target must get a key of its own implementation: ``threefry2x32``
    and ``rbg`` data may even share a shape, but draw different numbers.
    """
    if _is(target, _brainpy_array_type()) or _is(target, _module_attr("brainstate", "State")):
        target = target.value
    if _is_key(target) and rec.get("kind") == "prngkey":
        impl = _key_impl(target)
        if rec.get("impl") != impl:
            return f"{path}: PRNG key implementation {rec.get('impl')} in the checkpoint, {impl} in the target"
    return None


_MAX_NDIM = 64
_MAX_DIM = 2**62


_KINDS = frozenset(
    {"ndarray", "jax", "brainpy", "state", "quantity", "py", "npscalar", "str", "bytes", "prngkey"}
)
#: numpy dtype kinds a Python scalar of each type may be stored as
_PY_DTYPE_KINDS = {"bool": "b", "int": "biu", "float": "biuf", "complex": "biufc"}


def _int_list(value: Any, low: int) -> TypeGuard[list[int]]:
    return (
        isinstance(value, list)
        and len(value) <= _MAX_NDIM
        and all(
            isinstance(v, int) and not isinstance(v, bool) and low <= v <= _MAX_DIM for v in value
        )
    )


def _number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and bool(np.isfinite(float(value)))
    )


def _check_unit(unit: Any) -> str | None:
    if not isinstance(unit, dict):
        return "a quantity leaf needs a 'unit' object"
    dim = unit.get("dim")
    if not (isinstance(dim, list) and len(dim) == 7 and all(_number(d) for d in dim)):
        return "the unit's 'dim' must be an array of 7 numbers (the SI base dimensions)"
    if type(unit.get("scale")) is not int:
        return "the unit's 'scale' must be an integer"
    for field in ("base", "factor"):
        if not _number(unit.get(field)):
            return f"the unit's {field!r} must be a number"
    for field in ("name", "dispname"):
        if not isinstance(unit.get(field), (str, type(None))):
            return f"the unit's {field!r} must be a string"
    return None


def check_dims(names: Any, ndim: int) -> str | None:
    """Why ``names`` cannot name the axes of an ``ndim``-d leaf (None if they can)."""
    if not isinstance(names, list) or len(names) != ndim:
        return f"expected {ndim} dimension name(s), got {shown(names)}"
    if not all(isinstance(n, str) and 0 < len(n) <= 255 for n in names):
        return f"dimension names must be non-empty strings of at most 255 characters, got {shown(names)}"
    if len(set(names)) != len(names):
        return f"an array's dimension names must differ, got {shown(names)}"
    return None


#: the leaf record's field listing its chunks' content hashes (``_reuse``; readers ignore it)
HASH_FIELD = "xxh3"


def check_record(rec: dict[str, Any]) -> str | None:
    """Why a leaf record read from storage is unusable (None if it is fine).

    Checks the array layout (``shape``, ``dtype``, ``chunks``, ``codec``) and the fields of
    the leaf's kind, so that reading and :func:`decode` can trust them.
    """
    shape, chunks = rec.get("shape"), rec.get("chunks")
    if not _int_list(shape, 0):
        return f"the leaf's 'shape' must be an array of at most {_MAX_NDIM} non-negative integers"
    if not _int_list(chunks, 1) or len(chunks) != len(shape):
        return "the leaf's 'chunks' must be an array of positive integers, one per dimension"
    dtype, codec = rec.get("dtype"), rec.get("codec")
    if not isinstance(dtype, str):
        return "the leaf's 'dtype' must be a string"
    if not isinstance(codec, str):
        return "the leaf's 'codec' must be a string"
    try:
        parse_codec(codec)
        layout = ArrayLayout.from_json(rec)
    except ValueError as exc:
        return str(exc)
    kind = rec.get("kind", "ndarray")
    if not isinstance(kind, str):
        return "the leaf's 'kind' must be a string"
    if kind not in _KINDS:  # a new kind is a new major format version: refuse, never guess
        return f"unknown leaf kind {kind[:40]!r}"
    for field in ("class", "state"):
        if not isinstance(rec.get(field), (str, type(None))):
            return f"the leaf's {field!r} must be a string"
    if not isinstance(rec.get("sharding", {}), dict):  # descriptive only: never acted on
        return "the leaf's 'sharding' must be an object"
    if "dims" in rec:
        problem = check_dims(rec["dims"], len(layout.shape))
        if problem:
            return f"the leaf's 'dims': {problem}"
    if kind in ("py", "npscalar") and layout.shape != ():
        return f"a {kind} leaf must be 0-d, found shape {layout.shape}"
    if kind == "py":
        pytype = rec.get("pytype")
        if not isinstance(pytype, str) or pytype not in _PY_SCALARS:
            return f"the leaf's 'pytype' must be one of {sorted(_PY_SCALARS)}"
        if layout.dtype.kind not in _PY_DTYPE_KINDS[pytype]:
            return f"a Python {pytype} cannot be stored as {layout.dtype}"
    if kind in ("str", "bytes") and (len(layout.shape) != 1 or layout.dtype != np.uint8):
        return f"a {kind} leaf must be a 1-d uint8 array"
    if kind == "quantity":
        return _check_unit(rec.get("unit"))
    if kind == "prngkey":
        if not isinstance(rec.get("impl"), str):
            return "a prngkey leaf needs an 'impl' string"
        if not layout.shape or layout.dtype != np.uint32:
            return "a prngkey leaf must be a uint32 array of at least one dimension"
    return None
