"""PyTree <-> ``{"a/b/0": leaf}`` plus a JSON record of the containers.

Containers are ``None``, ``dict`` (``OrderedDict`` recorded as such; keys ``str`` or
``int``), ``list``, ``tuple`` and namedtuples; everything else is a leaf (what a leaf may
be is ``_leaves``' business). Traversal order is the container's own order, so a tree
flattens the same way every time and the record reproduces dict key order on load.

Each child gets a Zarr node name. ``str`` keys are escaped reversibly so that any key is a
valid, portable node name (:func:`escape`); ``int`` keys and list positions are spelt in
decimal. The record stores the original keys, so names only need to be unique per container.

Record nodes (JSON)::

    {"type": "leaf", "path": "net/l1/W", ...}             # _leaves adds the leaf's fields
    {"type": "none"}
    {"type": "dict" | "odict", "keys": [k, ...], "names": [n, ...], "children": [...]}
    {"type": "list" | "tuple", "children": [...]}
    {"type": "namedtuple", "class": "pkg.mod:Name", "fields": [f, ...], "children": [...]}
"""

from __future__ import annotations

import importlib
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from .errors import UnsupportedLeafError

__all__ = ["ROOT_LEAF_NAME", "escape", "flatten", "map_leaves", "unescape", "unflatten"]

#: The node name of a tree that is a single leaf (it has no container to name it).
ROOT_LEAF_NAME = "value"

_UNSAFE = re.compile(r"[%/\\\x00-\x1f\x7f]")
_PERCENT = re.compile(r"%([0-9A-F]{2})")


def escape(key: str) -> str:
    """A valid Zarr v3 node name for ``key``; :func:`unescape` inverts it.

    ``%``, ``/``, ``\\`` and control characters become ``%XX``; ``.`` and ``..`` become
    ``%2E`` runs; a leading ``__`` (reserved by Zarr) becomes ``%5F_``; the empty key is
    ``%`` alone, which no other key produces.
    """
    if key == "":
        return "%"
    name = _UNSAFE.sub(lambda m: f"%{ord(m.group()):02X}", key)
    if name in (".", ".."):
        return "%2E" * len(name)
    if name.startswith("__"):
        return "%5F" + name[1:]
    return name


def unescape(name: str) -> str:
    if name == "%":
        return ""
    return _PERCENT.sub(lambda m: chr(int(m.group(1), 16)), name)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(type(obj), "_fields")


def _dict_names(path: str, keys: list[Any]) -> list[str]:
    names: list[str] = []
    for key in keys:
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise UnsupportedLeafError(
                f"{_join(path, repr(key))!s}: dict keys must be str or int, got {type(key).__name__}"
            )
        names.append(escape(key) if isinstance(key, str) else str(key))
    seen = set(names)
    if len(seen) != len(names):  # an int key collides with a str key: spell the int as %iN
        str_names = {escape(k) for k in keys if isinstance(k, str)}
        names = [
            f"%i{k}" if isinstance(k, int) and str(k) in str_names else n
            for k, n in zip(keys, names, strict=True)
        ]
    return names


def _children(obj: Any, path: str) -> tuple[dict[str, Any], list[tuple[str, Any]]] | None:
    """The record header and ``(name, child)`` pairs of a container, or None for a leaf."""
    if obj is None:
        return {"type": "none"}, []
    if isinstance(obj, dict):
        keys = list(obj.keys())
        names = _dict_names(path, keys)
        kind = "odict" if isinstance(obj, OrderedDict) else "dict"
        return {"type": kind, "keys": keys, "names": names}, list(
            zip(names, obj.values(), strict=True)
        )
    if _is_namedtuple(obj):
        cls = type(obj)
        fields = list(cls._fields)  # type: ignore[attr-defined]
        header = {"type": "namedtuple", "class": f"{cls.__module__}:{cls.__qualname__}"}
        header["fields"] = fields
        return header, [(escape(f), v) for f, v in zip(fields, obj, strict=True)]
    if isinstance(obj, (list, tuple)):
        kind = "list" if isinstance(obj, list) else "tuple"
        return {"type": kind}, [(str(i), v) for i, v in enumerate(obj)]
    return None


def flatten(tree: Any) -> tuple[dict[str, Any], list[tuple[str, Any]], list[str]]:
    """Flatten ``tree`` into ``(record, [(path, leaf), ...], container_paths)``.

    Leaf records carry ``{"type": "leaf", "path": ...}``; callers add their own fields.
    ``container_paths`` lists the paths of dict/list/tuple nodes (``""`` is the root).
    """
    leaves: list[tuple[str, Any]] = []
    groups: list[str] = []

    def visit(obj: Any, path: str) -> dict[str, Any]:
        found = _children(obj, path)
        if found is None:
            leaf_path = path or ROOT_LEAF_NAME
            leaves.append((leaf_path, obj))
            return {"type": "leaf", "path": leaf_path}
        header, kids = found
        if header["type"] != "none":
            groups.append(path)
            header["children"] = [visit(child, _join(path, name)) for name, child in kids]
        return header

    record = visit(tree, "")
    return record, leaves, groups


def _import_namedtuple(spec: str) -> type | None:
    module, _, qualname = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) and issubclass(obj, tuple) else None


def unflatten(
    record: dict[str, Any],
    leaf_fn: Callable[[dict[str, Any]], Any],
    on_missing_class: Callable[[str], None] | None = None,
) -> Any:
    """Rebuild a tree from its record; ``leaf_fn(leaf_record)`` supplies each leaf.

    A namedtuple whose class cannot be imported comes back as a ``dict`` of its fields
    (``on_missing_class(spec)`` is told, to warn).
    """
    kind = record["type"]
    if kind == "leaf":
        return leaf_fn(record)
    if kind == "none":
        return None
    values = [unflatten(c, leaf_fn, on_missing_class) for c in record["children"]]
    if kind in ("dict", "odict"):
        pairs = zip(record["keys"], values, strict=True)
        return OrderedDict(pairs) if kind == "odict" else dict(pairs)
    if kind == "list":
        return values
    if kind == "tuple":
        return tuple(values)
    if kind == "namedtuple":
        cls = _import_namedtuple(record["class"])
        if cls is None:
            if on_missing_class is not None:
                on_missing_class(record["class"])
            return dict(zip(record["fields"], values, strict=True))
        return cls(*values)
    raise ValueError(f"unknown container type {kind!r} in the checkpoint's tree record")


def map_leaves(tree: Any, fn: Callable[[str, Any], Any]) -> Any:
    """``tree`` with every leaf replaced by ``fn(path, leaf)``; containers keep their types."""

    def visit(obj: Any, path: str) -> Any:
        found = _children(obj, path)
        if found is None:
            return fn(path or ROOT_LEAF_NAME, obj)
        header, kids = found
        values = [visit(child, _join(path, name)) for name, child in kids]
        kind = header["type"]
        if kind == "none":
            return None
        if kind in ("dict", "odict"):
            out = type(obj).__new__(type(obj))
            if hasattr(out, "default_factory"):  # defaultdict
                out.default_factory = obj.default_factory
            out.update(zip(obj.keys(), values, strict=True))
            return out
        if kind == "namedtuple":
            return type(obj)(*values)
        return type(obj)(values)

    return visit(tree, "")


def iter_leaf_records(record: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every leaf record of a tree record, in traversal order."""
    if record["type"] == "leaf":
        yield record
    for child in record.get("children", ()):
        yield from iter_leaf_records(child)
