"""PyTree <-> ``{"a/b/0": leaf}`` plus a JSON record of the containers.

Containers
    * ``None``, ``list``, ``tuple``, namedtuples and ``dict`` with its subclasses
      (``OrderedDict``, ``defaultdict``, brainstate's ``FlattedDict``, ...), in their own
      order: dict insertion order, ``str`` and ``int`` keys mixed freely, ``None`` kept.
    * Dict keys are ``str``, ``int`` or non-empty tuples of them: a tuple key
      (``("layers", 0, "weight")``, as in brainstate's ``Module.states()`` or flax's
      ``flatten_dict``) is stored at the group path its parts spell, ``layers/0/weight``,
      with a Zarr group for every intermediate level.
    * A brainstate ``State`` holding a sub-tree (a ``ParamState`` of ``{"weight", "bias"}``)
      is transparent: its sub-tree is stored at the State's own path.
    * Any other registered JAX PyTree node (flax ``FrozenDict`` and ``struct.dataclass``,
      equinox modules, ``register_dataclass``, ``register_pytree_node_class``) is split one
      level at a time by ``jax.tree_util``, its children named by their key paths
      (``GetAttrKey`` -> the attribute, ``DictKey`` -> the key, ``SequenceKey`` and
      ``FlattenedIndexKey`` -> the position). jax is consulted only if already imported.
      A node without children (``eqx.nn.Identity``, a dataclass whose fields are all
      static) is a container of nothing, not a leaf.

Everything else is a leaf; what a leaf may be is :mod:`._leaves`' business. Arrays
(typed PRNG key arrays too), BrainPy ``Variable``s, brainstate ``State``s holding an array
and brainunit ``Quantity``s stay leaves even where JAX would split them. Traversal order
is the containers' own, so a tree flattens the same way every time.

Taken from the target
    Below a registered PyTree node (at any depth), a leaf that is not something
    :mod:`._leaves` stores (``jax.nn.relu``, a ``custom_jvp``, equinox's sentinels, any
    object) is not stored: it is recorded as ``from_target``, with its type's name, and a
    load into a target keeps the target's own object there, as equinox's
    ``tree_deserialise_leaves`` takes non-array leaves from its ``like``; a load without a
    target gives ``None``. The type name is descriptive only: nothing is pickled, and
    nothing is imported on load. In plain dicts, lists and tuples, where no target's node
    can supply such an object, it is refused (``UnsupportedLeafError`` naming its path).

Loading
    Without a target a tree comes back as the containers the record names: same dict keys
    (tuple keys included) in the same order. **Nothing is ever imported because a
    checkpoint names it**: a recorded class (namedtuple, dict subclass) is looked up in
    ``sys.modules`` only, and accepted only if it is still the kind of class recorded (a
    namedtuple with the recorded fields, a dict subclass); otherwise a plain ``dict`` comes
    back and ``on_missing_class`` is told. **A treedef is not data**: PyTree nodes come back
    as dicts keyed by attribute, key or position, and a State holding a sub-tree as that
    sub-tree, and a ``from_target`` node as ``None``. To get the classes back, restore into
    a target: :func:`match` pairs the target's leaves with the record by original keys
    (never by re-spelling names), and :func:`rebuild` puts the restored values back into
    the target's own containers.

Names (``NAMING_VERSION`` 2)
    Each child gets a Zarr node name that is valid on every disk and object store:

    1. ``str`` keys, attribute names and namedtuple fields are escaped by :func:`escape`
       (reversible by :func:`unescape`): ``%``, ``/``, ``\\``, control characters and
       ``< > : " | ? *`` become ``%XX``; a leading ``.`` (so ``.``, ``..``, hidden files and
       the writer's own ``.zarrckpt-*`` files), a leading ``__`` (reserved by Zarr), a
       trailing ``.`` or space (dropped by Windows), the first letter of ``zarr.json`` and
       of Windows device names (``CON``, ``nul.txt``) are escaped too; the empty key is ``%``.
       ``int`` keys and positions are decimal, ``%iN`` where a ``str`` sibling spells ``N``.
    2. A name longer than 255 bytes (UTF-8) becomes a readable prefix plus ``%~`` and 32
       hex digits of its SHA-256.
    3. Siblings whose names are equal under NFKC normalisation and ``str.casefold()``
       (``V`` and ``v`` on macOS or Windows) are told apart: each later one gets ``%~N``,
       the smallest ``N`` that makes it unique.

    :func:`escape` never produces ``%~``, so suffixed and hashed names cannot collide with
    escaped ones. Names are not meant to be reversed: the record keeps the original keys
    and the names, and readers use the recorded names and leaf paths, never recompute
    them. Version 1 (zarrckpt 0.1) escaped only ``%``, ``/``, ``\\``, control characters,
    ``.``/``..`` and a leading ``__``, did not hash or disambiguate, and did not record the
    names of namedtuple fields (they were the escaped fields); its records load unchanged.

Record nodes (JSON)::

    {"type": "leaf", "path": "net/l1/W", ...}     # _leaves and _format add the leaf's fields
    {"type": "none"}
    {"type": "dict" | "odict", "class": "mod:Qual",  # "class" only for dict subclasses
     "keys": [k, ...],            # str | int | [part, ...] (a tuple key)
     "names": [n, ...],           # str, or [name, ...] (one per part) for a tuple key
     "children": [...]}
    {"type": "list" | "tuple", "children": [...]}                 # names "0", "1", ...
    {"type": "namedtuple", "class": "mod:Qual", "fields": [f, ...], "names": [n, ...],
     "children": [...]}
    {"type": "pytree", "class": "mod:Qual",
     "keys": [["attr", name] | ["key", k] | ["seq", i] | ["index", i], ...],
     "names": [n, ...], "children": [...]}
    {"type": "state", "class": "mod:Qual", "children": [sub-tree]}  # same path as its child
    {"type": "from_target", "pytype": "mod:Qual"}  # not stored: the target supplies it

``from_target`` is part of format 1.1 (zarrckpt 0.2.0), as are the names of scheme 2.

A leaf's ``path`` is its parents' names joined by ``/``. A record read from storage is
untrusted: :func:`validate` checks it (types, lengths, depth at most ``MAX_DEPTH``, safe and
consistent paths) and raises :class:`~zarrckpt.errors.CorruptCheckpointError` naming the
place; the other readers here assume a validated record.
"""

from __future__ import annotations

import functools
import hashlib
import re
import sys
import unicodedata
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from . import _leaves
from .errors import CorruptCheckpointError, UnsupportedLeafError

__all__ = [
    "FROM_TARGET",
    "MAX_DEPTH",
    "NAMING_VERSION",
    "ROOT_LEAF_NAME",
    "children",
    "escape",
    "flatten",
    "iter_leaf_records",
    "labelled_children",
    "map_leaves",
    "match",
    "rebuild",
    "unescape",
    "unflatten",
    "validate",
]

#: The node name of a tree that is a single leaf (it has no container to name it).
ROOT_LEAF_NAME = "value"
#: The naming scheme this module writes (see the module docstring); version 1 still loads.
NAMING_VERSION = 2
#: The longest node name, in UTF-8 bytes (ext4, APFS, NTFS: 255).
MAX_NAME_BYTES = 255
#: How deep a tree may nest (container levels plus tuple-key parts); deeper is refused.
MAX_DEPTH = 256
#: The record type of a leaf that is not stored but taken from the target on load.
FROM_TARGET = "from_target"

_HASH_PREFIX_BYTES = 200
_MARK = "%~"  # escape() never produces it: every "%" it writes starts "%XX" (or is the key "")
_UNSAFE = re.compile(r'[%/\\\x00-\x1f\x7f<>:"|?*]')
_UNSAFE_V1 = re.compile(r"[%/\\\x00-\x1f\x7f]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PERCENT = re.compile(r"%([0-9A-F]{2})")
_PARTIAL_ESCAPE = re.compile(r"%[0-9A-F]?$")
_WINDOWS_DEVICES = frozenset(
    ["con", "prn", "aux", "nul"] + [f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)]
)
_STATE = object()  # the "key" of a State's only child


# --- names ---------------------------------------------------------------------------------------


def _pct(char: str) -> str:
    return f"%{ord(char):02X}"


@functools.lru_cache(maxsize=4096)  # the same keys recur in every layer
def escape(key: str) -> str:
    """A valid, portable Zarr v3 node name for ``key``; :func:`unescape` inverts it.

    ``%``, ``/``, ``\\``, control characters and ``< > : " | ? *`` become ``%XX``; a leading
    ``.`` becomes ``%2E`` (``.``, ``..``, hidden names); a leading ``__`` (reserved by Zarr)
    becomes ``%5F_``; a trailing ``.`` or space is escaped (Windows drops them); so is the
    first letter of ``zarr.json`` and of Windows device names (``CON``, ``nul.txt``), in any
    case. The empty key is ``%`` alone, which no other key produces.
    """
    if key == "":
        return "%"
    name = _UNSAFE.sub(lambda m: _pct(m.group()), key)
    if name.startswith("."):
        name = "%2E" + name[1:]
    elif name.startswith("__"):
        name = "%5F" + name[1:]
    if name[-1] in ". ":
        name = name[:-1] + _pct(name[-1])
    folded = name.casefold()
    reserved = folded == "zarr.json" or folded.split(".", 1)[0].rstrip(" ") in _WINDOWS_DEVICES
    if reserved and name[0].isascii():
        name = _pct(name[0]) + name[1:]
    return name


def unescape(name: str) -> str:
    """The key :func:`escape` turned into ``name`` (version 1 names too)."""
    if name == "%":
        return ""
    return _PERCENT.sub(lambda m: chr(int(m.group(1), 16)), name)


def _escape_v1(key: str) -> str:
    """Version 1 names, for version 1 namedtuple records (which did not record names)."""
    if key == "":
        return "%"
    name = _UNSAFE_V1.sub(lambda m: _pct(m.group()), key)
    if name in (".", ".."):
        return "%2E" * len(name)
    if name.startswith("__"):
        return "%5F" + name[1:]
    return name


def _fold(name: str) -> str:
    """Names equal here are one name on a case- or normalisation-insensitive disk."""
    if name.isascii():
        return name.lower()
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


def _shorten(name: str) -> str:
    """``name``, or a readable prefix and a hash if it is too long (or not UTF-8)."""
    if len(name) <= MAX_NAME_BYTES and name.isascii():
        return name
    try:
        if len(name.encode("utf-8")) <= MAX_NAME_BYTES:
            return name
    except UnicodeEncodeError:  # a lone surrogate: no disk can store it
        pass
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    prefix = name.encode("utf-8", "ignore")[:_HASH_PREFIX_BYTES].decode("utf-8", "ignore")
    return f"{_PARTIAL_ESCAPE.sub('', prefix)}{_MARK}{digest}"


def _unique(names: Iterable[str]) -> list[str]:
    """Shortened names, later siblings suffixed ``%~N`` where they fold to an earlier one."""
    used: set[str] = set()
    out: list[str] = []
    for base in names:
        name = _shorten(base)
        folded = _fold(name)
        n = 0
        while folded in used:
            n += 1
            name = _shorten(f"{base}{_MARK}{n}")
            folded = _fold(name)
        used.add(folded)
        out.append(name)
    return out


def _sibling_names(parts: list[str | int]) -> list[str]:
    """Names for the children of one group, keyed by ``str`` or ``int`` parts."""
    return list(_sibling_names_of(_plain(parts)))


def _plain(parts: Sequence[str | int]) -> tuple[str | int, ...]:
    """``parts`` as exact ``str`` and ``int``: a name is an integer's decimal spelling and a
    string's escape, never what a subclass's ``__str__`` says (equal keys of any class share
    one entry of the cache below, so they must be named alike)."""
    return tuple(
        p if type(p) is str or type(p) is int
        else str.__str__(p) if isinstance(p, str) else int.__int__(p)
        for p in parts
    )  # fmt: skip


@functools.lru_cache(maxsize=1024)  # the same dict shapes recur (every layer, every neuron)
def _sibling_names_of(parts: tuple[str | int, ...]) -> tuple[str, ...]:
    escaped = [escape(p) if isinstance(p, str) else None for p in parts]
    str_names = {e for e in escaped if e is not None}
    base = [
        e if e is not None else f"%i{p}" if str(p) in str_names else str(p)
        for p, e in zip(parts, escaped, strict=True)
    ]
    return tuple(_unique(base))


def _join(path: str, names: str | list[str]) -> str:
    tail = names if isinstance(names, str) else "/".join(names)
    if not tail:
        return path
    return f"{path}/{tail}" if path else tail


def _spec(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- one level of a live tree --------------------------------------------------------------------


class _Node:
    """One container of a live tree: its record header and ``(key, names, child)`` entries."""

    __slots__ = ("groups", "header", "kids", "treedef")

    def __init__(
        self,
        header: dict[str, Any],
        kids: list[tuple[Any, list[str], Any]],
        groups: list[list[str]] | None = None,
        treedef: Any = None,
    ) -> None:
        self.header = header
        self.kids = kids
        self.groups = groups or []  # intermediate groups of tuple keys, as name paths
        self.treedef = treedef


def _key_parts(path: str, key: Any) -> tuple[str | int, ...]:
    if isinstance(key, tuple):
        if not key:
            raise UnsupportedLeafError(f"{_join(path, '()')}: a tuple dict key must not be empty")
        for part in key:
            if isinstance(part, bool) or not isinstance(part, (str, int)):
                raise UnsupportedLeafError(
                    f"{_join(path, repr(key))}: tuple dict keys may hold str and int only, "
                    f"got {type(part).__name__}"
                )
        if len(key) > MAX_DEPTH:
            raise UnsupportedLeafError(
                f"{_join(path, _show(key))}: a tuple dict key of more than {MAX_DEPTH} parts"
            )
        return key
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise UnsupportedLeafError(
            f"{_join(path, repr(key))}: dict keys must be str, int or tuples of them, "
            f"got {type(key).__name__}"
        )
    return (key,)


def _trie_names(all_parts: list[tuple[str | int, ...]]) -> tuple[list[list[str]], list[list[str]]]:
    """Name paths of a dict's keys, and its intermediate groups (tuple-key prefixes).

    A key ends in a node of its own, never shared: ``"a"`` and ``("a",)``, or ``"a"`` and
    the prefix ``"a"`` of ``("a", "b")``, are distinct siblings, told apart by ``%~N``.
    """
    # A trie node: (entries, groups by (type, part)); an entry is (part, key index | node).
    root: tuple[list[tuple[Any, Any]], dict[tuple[type, Any], Any]] = ([], {})
    for index, parts in enumerate(all_parts):
        node = root
        for part in parts[:-1]:
            child = node[1].get((type(part), part))
            if child is None:
                child = node[1][(type(part), part)] = ([], {})
                node[0].append((part, child))
            node = child
        node[0].append((parts[-1], index))
    paths: list[list[str]] = [[] for _ in all_parts]
    groups: list[list[str]] = []
    stack: list[tuple[Any, list[str]]] = [(root, [])]
    while stack:
        node, prefix = stack.pop()
        names = _sibling_names([part for part, _ in node[0]])
        pending = []
        for (_, target), name in zip(node[0], names, strict=True):
            if isinstance(target, int):
                paths[target] = [*prefix, name]
            else:
                groups.append([*prefix, name])
                pending.append((target, [*prefix, name]))
        stack.extend(reversed(pending))
    return paths, groups


def _dict_node(obj: dict[Any, Any], path: str, named: bool) -> _Node:
    header: dict[str, Any] = {"type": "odict" if isinstance(obj, OrderedDict) else "dict"}
    if type(obj) not in (dict, OrderedDict):
        header["class"] = _spec(type(obj))
    items = list(obj.items())
    if not named:
        return _Node(header, [(k, [], v) for k, v in items])
    keys = tuple(k for k, _ in items)
    if any(isinstance(k, tuple) for k in keys):  # tuple keys: a trie of intermediate groups
        paths, groups = _trie_names([_key_parts(path, k) for k in keys])
        header["keys"] = [list(k) if isinstance(k, tuple) else k for k in keys]
        header["names"] = [
            p if isinstance(k, tuple) else p[0] for k, p in zip(keys, paths, strict=True)
        ]
        return _Node(header, [(k, p, v) for (k, v), p in zip(items, paths, strict=True)], groups)
    plain = True
    for key in keys:  # one level of siblings (the common case)
        if type(key) is not str and type(key) is not int:  # (bool is a type of its own)
            _key_parts(path, key)  # refuses a key of another type, naming it
            plain = False
    names = _sibling_names_of(keys if plain else _plain(keys))
    header["keys"] = list(keys)
    header["names"] = list(names)
    return _Node(header, [(k, [n], v) for (k, v), n in zip(items, names, strict=True)])


def _key_entry(entry: Any, position: int, tree_util: Any) -> tuple[list[Any], str | int]:
    """A JAX key path entry as JSON, and the key it is matched by."""
    if isinstance(entry, tree_util.GetAttrKey) and isinstance(entry.name, str):
        return ["attr", entry.name], entry.name
    if isinstance(entry, tree_util.DictKey):
        key = entry.key
        if isinstance(key, (str, int)) and not isinstance(key, bool):
            return ["key", key], key
    if isinstance(entry, tree_util.SequenceKey):
        return ["seq", entry.idx], entry.idx
    if isinstance(entry, tree_util.FlattenedIndexKey):
        return ["index", entry.key], entry.key
    return ["index", position], position  # a key type we cannot spell: its position


def _pytree_node(obj: Any, named: bool) -> _Node | None:
    jax = sys.modules.get("jax")
    if jax is None:
        return None
    tree_util = jax.tree_util
    pairs, treedef = tree_util.tree_flatten_with_path(obj, is_leaf=lambda x: x is not obj)
    if tree_util.treedef_is_leaf(treedef) and treedef.num_leaves == 1:
        return None  # not a registered node (one without children has no leaves at all)
    entries = [_key_entry(kp[-1], i, tree_util) for i, (kp, _) in enumerate(pairs)]
    canon = [c for _, c in entries]
    if len(set(canon)) != len(canon):  # ambiguous keys: match by position instead
        entries = [(["index", i], i) for i in range(len(pairs))]
        canon = list(range(len(pairs)))
    header: dict[str, Any] = {"type": "pytree", "class": _spec(type(obj))}
    names = _sibling_names(canon) if named else [""] * len(canon)
    if named:
        header["keys"] = [e for e, _ in entries]
        header["names"] = names
    kids = [(c, [n], child) for c, n, (_, child) in zip(canon, names, pairs, strict=True)]
    return _Node(header, kids, treedef=treedef)


def _node(obj: Any, path: str, named: bool = True) -> _Node | None:
    """The container ``obj`` as a :class:`_Node`, or None if ``obj`` is a leaf."""
    if type(obj) in _leaves.LEAF_TYPES:  # (most objects of a large tree)
        return None
    if obj is None:
        return _Node({"type": "none"}, [])
    if isinstance(obj, dict):
        return _dict_node(obj, path, named)
    if isinstance(obj, tuple) and hasattr(type(obj), "_fields"):  # namedtuple
        cls = type(obj)
        fields = list(cls._fields)  # type: ignore[attr-defined]
        header = {"type": "namedtuple", "class": _spec(cls), "fields": fields}
        names = _unique(escape(f) for f in fields) if named else fields
        if named:
            header["names"] = names
        return _Node(header, [(f, [n], v) for f, n, v in zip(fields, names, obj, strict=True)])
    if isinstance(obj, (list, tuple)):
        kind = "list" if isinstance(obj, list) else "tuple"
        return _Node({"type": kind}, [(i, [str(i)], v) for i, v in enumerate(obj)])
    if _leaves.is_leaf(obj):
        return None
    state = _leaves.state_subtree(obj)
    if state is not None:
        return _Node({"type": "state", "class": _spec(type(obj))}, [(_STATE, [], state[0])])
    return _pytree_node(obj, named)


def _from_target(obj: Any) -> dict[str, Any]:
    """The record of a leaf that is not stored: a load into a target keeps the target's."""
    return {"type": FROM_TARGET, "pytype": _spec(type(obj))}


def _too_deep(path: str) -> UnsupportedLeafError:
    return UnsupportedLeafError(
        f"{path or ROOT_LEAF_NAME!r}: the tree nests deeper than {MAX_DEPTH} levels "
        "(does it contain itself?)"
    )


# --- save ----------------------------------------------------------------------------------------


def flatten(tree: Any) -> tuple[dict[str, Any], list[tuple[str, Any]], list[str]]:
    """Flatten ``tree`` into ``(record, [(path, leaf), ...], group_paths)``.

    Leaf records carry ``{"type": "leaf", "path": ...}``; callers add their own fields.
    Below a registered PyTree node, a leaf :mod:`._leaves` does not store is recorded as
    ``from_target`` and left out of the leaves. ``group_paths`` lists every path that needs
    a Zarr group: each container (``""`` is the root; ``None`` and transparent States have
    none) and each intermediate level of a tuple key. Raises :class:`UnsupportedLeafError`
    naming the path of a bad key.
    """
    leaves: list[tuple[str, Any]] = []
    groups: list[str] = []
    leaf_types = _leaves.LEAF_TYPES

    def leaf(obj: Any, path: str) -> dict[str, Any]:
        leaf_path = path or ROOT_LEAF_NAME
        leaves.append((leaf_path, obj))
        return {"type": "leaf", "path": leaf_path}

    def visit(obj: Any, path: str, depth: int, in_node: bool) -> dict[str, Any]:
        if depth > MAX_DEPTH:
            raise _too_deep(path)
        node = _node(obj, path)
        if node is None:
            if in_node and not _leaves.is_leaf(obj):
                return _from_target(obj)
            return leaf(obj, path)
        header = node.header
        if header["type"] == "none":
            return header
        if header["type"] != "state":
            groups.append(path)
            for group in node.groups:
                groups.append(_join(path, group))
        in_node = in_node or header["type"] == "pytree"
        kids = []
        for _, names, child in node.kids:
            child_path, child_depth = _join(path, names), depth + max(1, len(names))
            if type(child) in leaf_types and child_depth <= MAX_DEPTH:  # (what visit does)
                kids.append(leaf(child, child_path))
            else:
                kids.append(visit(child, child_path, child_depth, in_node))  # noqa: F821
        header["children"] = kids
        return header

    try:
        record = visit(tree, "", 0, False)
    finally:
        # ``visit`` calls itself through its closure: a reference cycle that would keep
        # ``leaves``, and with it every array of the tree, alive until the garbage
        # collector's next pass (a full one, if collections promoted it meanwhile: a
        # background save runs with the collector on). Emptying the cell breaks it; ruff's
        # F821 on the recursive call is pyflakes' known false alarm for a deleted name.
        del visit
    return record, leaves, groups


# --- load without a target -----------------------------------------------------------------------


def _lookup(spec: Any) -> Any:
    """The object ``"module:Qual.Name"`` names, if its module is already imported; else None.

    Only namespaces are read (module and class ``__dict__``), so nothing is imported and
    no module-level ``__getattr__`` runs.
    """
    if not isinstance(spec, str):
        return None
    module, sep, qualname = spec.partition(":")
    obj = sys.modules.get(module) if sep and qualname else None
    for part in qualname.split("."):
        namespace = getattr(obj, "__dict__", None)
        if obj is None or namespace is None:
            return None
        try:
            obj = namespace.get(part)
        except Exception:
            return None
    return obj


def _namedtuple_class(spec: Any, fields: list[str]) -> type | None:
    cls = _lookup(spec)
    if (
        isinstance(cls, type)
        and issubclass(cls, tuple)
        and tuple(getattr(cls, "_fields", ()) or ()) == tuple(fields)
        and callable(getattr(cls, "_make", None))
    ):
        return cls
    return None


def _build_dict(spec: Any, pairs: list[tuple[Any, Any]]) -> dict[Any, Any] | None:
    """A dict of the recorded class holding exactly ``pairs``, or None."""
    cls = _lookup(spec)
    if not (isinstance(cls, type) and issubclass(cls, dict)):
        return None
    try:
        out: dict[Any, Any]
        if issubclass(cls, defaultdict):
            out = cls()
            out.update(pairs)
        else:
            out = cls(pairs)
        ok = (
            len(out) == len(pairs)
            and all(dict.__getitem__(out, k) is v for k, v in pairs)
            and list(dict.keys(out)) == [k for k, _ in pairs]
        )
    except Exception:
        return None
    return out if ok else None


def _key_from_json(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def _canonical(entry: list[Any]) -> Any:
    """The key a recorded pytree key path entry is matched by (attribute, key or position)."""
    return entry[1]


def unflatten(
    record: dict[str, Any],
    leaf_fn: Callable[[dict[str, Any]], Any],
    on_missing_class: Callable[[str], None] | None = None,
) -> Any:
    """Rebuild a tree from its (validated) record; ``leaf_fn(leaf_record)`` supplies each leaf.

    A recorded class that is not loaded (or no longer fits: a namedtuple with other fields)
    gives a ``dict`` (an ``OrderedDict`` for ``odict``), and ``on_missing_class(spec)`` is
    told, to warn. PyTree nodes give dicts keyed by attribute, key or position; States
    holding a sub-tree give the sub-tree (a treedef is not data); ``from_target`` nodes give
    ``None`` (only a target can supply them).
    """
    kind = record["type"]
    if kind == "leaf":
        return leaf_fn(record)
    if kind in ("none", FROM_TARGET):
        return None
    values = []
    for child in record["children"]:
        values.append(unflatten(child, leaf_fn, on_missing_class))
    if kind == "state":
        return values[0]
    if kind in ("dict", "odict"):
        pairs = list(zip(map(_key_from_json, record["keys"]), values, strict=True))
        spec = record.get("class")
        if spec is not None:
            out = _build_dict(spec, pairs)
            if out is not None:
                return out
            if on_missing_class is not None:
                on_missing_class(spec)
        return OrderedDict(pairs) if kind == "odict" else dict(pairs)
    if kind == "list":
        return values
    if kind == "tuple":
        return tuple(values)
    if kind == "namedtuple":
        cls = _namedtuple_class(record["class"], record["fields"])
        if cls is None:
            if on_missing_class is not None:
                on_missing_class(record["class"])
            return dict(zip(record["fields"], values, strict=True))
        return cls._make(values)  # type: ignore[attr-defined]
    if kind == "pytree":
        return dict(zip(map(_canonical, record["keys"]), values, strict=True))
    raise CorruptCheckpointError(f"unknown container type {_show(kind)} in the tree record")


def iter_leaf_records(record: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every leaf record of a (validated) tree record, in traversal order."""
    kind = record["type"]
    if kind == "leaf":
        yield record
    elif kind not in ("none", FROM_TARGET):
        for child in record["children"]:
            yield from iter_leaf_records(child)


# --- navigation ----------------------------------------------------------------------------------


def _unwrap(record: dict[str, Any]) -> dict[str, Any]:
    while record.get("type") == "state":
        record = record["children"][0]
    return record


def _record_entries(record: dict[str, Any]) -> list[tuple[Any, list[str], dict[str, Any]]]:
    """``(key, name path, child record)`` of a container record, in record order."""
    kind = record["type"]
    if kind in ("leaf", "none", FROM_TARGET):
        return []
    kids = record["children"]
    if kind in ("list", "tuple"):
        return [(i, [str(i)], c) for i, c in enumerate(kids)]
    if kind in ("dict", "odict"):
        return [
            (_key_from_json(k), n if isinstance(n, list) else [n], c)
            for k, n, c in zip(record["keys"], record["names"], kids, strict=True)
        ]
    if kind == "namedtuple":
        fields = record["fields"]
        names = record.get("names") or [_escape_v1(f) for f in fields]  # version 1
        return [(f, [n], c) for f, n, c in zip(fields, names, kids, strict=True)]
    if kind == "pytree":
        return [
            (_canonical(k), [n], c)
            for k, n, c in zip(record["keys"], record["names"], kids, strict=True)
        ]
    if kind == "state":
        return [(_STATE, [], kids[0])]
    raise CorruptCheckpointError(f"unknown container type {_show(kind)} in the tree record")


def labelled_children(record: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(label, name, child record)`` for each child of any record (``[]`` for a leaf).

    ``name`` is the recorded node name (what paths are made of); ``label`` is the original
    key, field, attribute or position as text, for display. A tuple-keyed dict shows its
    intermediate groups as dict records (``"layers"`` for the keys ``("layers", 0, ...)``)
    keyed by the rest of each key, which :func:`unflatten`, :func:`iter_leaf_records` and
    :func:`match` accept like any record. States holding a sub-tree are transparent: their
    sub-tree's record stands in their place.
    """
    try:
        record = _unwrap(record)
        out: dict[str, tuple[str, dict[str, Any]]] = {}
        virtual: set[str] = set()
        for key, names, child in _record_entries(record):
            head = names[0]
            label = str(key[0] if isinstance(key, tuple) else key)
            if len(names) == 1:
                if head in out:
                    raise CorruptCheckpointError(f"two children named {_show(head)}")
                out[head] = (label, _unwrap(child))
                continue
            if head not in out:
                group: dict[str, Any] = {"type": "dict", "keys": [], "names": [], "children": []}
                out[head] = (label, group)
                virtual.add(head)
            elif head not in virtual:
                raise CorruptCheckpointError(f"two children named {_show(head)}")
            group = out[head][1]
            rest_key, rest_names = list(key[1:]), names[1:]
            group["keys"].append(rest_key if len(rest_key) > 1 else rest_key[0])
            group["names"].append(rest_names if len(rest_names) > 1 else rest_names[0])
            group["children"].append(child)
        return [(label, name, child) for name, (label, child) in out.items()]
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(f"malformed tree record: {exc}") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise CorruptCheckpointError(f"malformed tree record: {exc!r}") from None


def children(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Child node name -> child record, for any record (``{}`` for a leaf or ``None``).

    Names are the recorded ones (version 1 records too); see :func:`labelled_children`.
    """
    return {name: child for _, name, child in labelled_children(record)}


# --- load into a target --------------------------------------------------------------------------


def match(
    record: dict[str, Any], target: Any, prefix: str = ""
) -> tuple[list[tuple[str, Any, dict[str, Any] | None]], list[str]]:
    """Pair ``target``'s leaves with the (validated) ``record``'s by original keys.

    Returns ``(pairs, unexpected)``: ``pairs`` has one ``(path, target_leaf, leaf_record)``
    per target leaf, in the target's leaf order (the order :func:`flatten` and
    :func:`rebuild` use), with ``leaf_record`` None where the record has no leaf there;
    ``unexpected`` lists the paths of record leaves the target does not have. Children are
    matched by dict key (tuple keys too), position, namedtuple field or PyTree key (the
    attribute, key or index), so a list matches a tuple, a namedtuple a dict of its fields,
    a position ``i`` the key ``"i"`` where there is no key ``i`` (msgpack checkpoints of flax
    and braintools store sequences so),
    and names are never re-spelt: version 1 records match like version 2. Paths are
    ``prefix`` joined with the recorded names, or below a target-only node with the names
    the writer would give (``ROOT_LEAF_NAME`` for a bare leaf).

    A ``from_target`` record in a pair means that the checkpoint holds nothing there and
    the target's leaf is kept. A target leaf that cannot be stored (a function, a sentinel:
    not a :mod:`._leaves` kind) gets one where the record says ``from_target``, and below a
    registered PyTree node also where the record has ``None`` or nothing (equinox's rule:
    non-array leaves come from the ``like`` model). A storable target leaf gets one only
    where the record says ``from_target``: the caller reports that it has no saved value.
    """
    pairs: list[tuple[str, Any, dict[str, Any] | None]] = []
    unexpected: list[str] = []

    def missing(obj: Any, path: str, depth: int, in_node: bool) -> None:
        if depth > MAX_DEPTH:
            raise _too_deep(path)
        node = _node(obj, path)
        if node is None:
            taken = in_node and not _leaves.is_leaf(obj)
            pairs.append((path or ROOT_LEAF_NAME, obj, _from_target(obj) if taken else None))
            return
        in_node = in_node or node.header["type"] == "pytree"
        for _, names, child in node.kids:
            missing(child, _join(path, names), depth + max(1, len(names)), in_node)

    def extra(rec: dict[str, Any], path: str) -> None:
        rec = _unwrap(rec)
        if rec["type"] == "leaf":
            unexpected.append(path or ROOT_LEAF_NAME)
            return
        for _, names, child in _record_entries(rec):
            extra(child, _join(path, names))

    def walk(rec: dict[str, Any], obj: Any, path: str, depth: int, in_node: bool) -> None:
        if depth > MAX_DEPTH:
            raise _too_deep(path)
        rec = _unwrap(rec)
        node = _node(obj, path)
        if node is None:
            kind = rec["type"]
            if kind in ("leaf", FROM_TARGET):
                pairs.append((path or ROOT_LEAF_NAME, obj, rec))
            elif in_node and not _leaves.is_leaf(obj):
                pairs.append((path or ROOT_LEAF_NAME, obj, _from_target(obj)))
                extra(rec, path)
            else:
                pairs.append((path or ROOT_LEAF_NAME, obj, None))
                extra(rec, path)
            return
        if node.header["type"] == "state":
            walk(rec, node.kids[0][2], path, depth + 1, in_node)
            return
        in_node = in_node or node.header["type"] == "pytree"
        if rec["type"] == "leaf":
            unexpected.append(path or ROOT_LEAF_NAME)
        entries = _record_entries(rec)
        index: dict[Any, tuple[list[str], dict[str, Any]]] = {}
        for key, names, child in entries:
            index.setdefault(key, (names, child))
        used: set[Any] = set()
        for key, names, child in node.kids:
            hit = index.get(key)
            if hit is None and type(key) is int and str(key) in index:
                key = str(key)  # flax / braintools msgpack: sequences saved as {"0": ..}
                hit = index[key]
            if hit is None:
                missing(child, _join(path, names), depth + max(1, len(names)), in_node)
            else:
                used.add(key)
                walk(hit[1], child, _join(path, hit[0]), depth + max(1, len(hit[0])), in_node)
        for key, names, child in entries:
            if key not in used:
                extra(child, _join(path, names))

    walk(record, target, prefix, 0, False)
    return pairs, unexpected


def _rebuild_node(obj: Any, node: _Node, values: list[Any]) -> Any:
    kind = node.header["type"]
    if kind == "none":
        return None
    if kind in ("dict", "odict"):
        cls: Any = type(obj)
        out = cls.__new__(cls)
        if isinstance(obj, defaultdict):
            out.default_factory = obj.default_factory
        attributes = getattr(obj, "__dict__", None)
        if attributes:
            out.__dict__.update(attributes)
        out.update(zip([k for k, _, _ in node.kids], values, strict=True))
        return out
    if kind == "namedtuple":
        return type(obj)._make(values)
    if kind in ("list", "tuple"):
        return type(obj)(values)
    if kind == "state":
        obj.value = values[0]  # in place, as leaf States are restored
        return obj
    return sys.modules["jax"].tree_util.tree_unflatten(node.treedef, values)


def rebuild(target: Any, values: Iterable[Any]) -> Any:
    """``target`` with its leaves replaced, in leaf order, by ``values``.

    Every container keeps its type: dict subclasses (``defaultdict`` with its factory,
    ``OrderedDict``, ``FlattedDict``, instance attributes), namedtuples, lists and tuples,
    PyTree nodes (through ``jax.tree_util.tree_unflatten``, so static fields survive).
    A brainstate State holding a sub-tree is updated in place (its ``value`` is set) and
    returned, as leaf States are by ``_leaves.restore``.
    """
    values = list(values)
    position = 0

    def visit(obj: Any, depth: int) -> Any:
        nonlocal position
        if depth > MAX_DEPTH:
            raise _too_deep("")
        node = _node(obj, "", named=False)
        if node is None:
            if position >= len(values):
                raise ValueError(f"rebuild: {len(values)} values for a target with more leaves")
            position += 1
            return values[position - 1]
        kids = []
        for _, _, child in node.kids:
            kids.append(visit(child, depth + 1))  # noqa: F821 (deleted after use)
        return _rebuild_node(obj, node, kids)

    try:
        out = visit(target, 0)
    finally:
        del visit  # (a recursive closure: see flatten)
    if position != len(values):
        raise ValueError(f"rebuild: {len(values)} values for a target of {position} leaves")
    return out


def map_leaves(tree: Any, fn: Callable[[str, Any], Any]) -> Any:
    """``tree`` with every leaf replaced by ``fn(path, leaf)``; containers keep their types.

    Paths and order are :func:`flatten`'s; containers are rebuilt as by :func:`rebuild`.
    """

    def visit(obj: Any, path: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise _too_deep(path)
        node = _node(obj, path)
        if node is None:
            return fn(path or ROOT_LEAF_NAME, obj)
        values = []
        for _, names, child in node.kids:
            child_path, child_depth = _join(path, names), depth + max(1, len(names))
            values.append(visit(child, child_path, child_depth))  # noqa: F821 (deleted after use)
        return _rebuild_node(obj, node, values)

    try:
        return visit(tree, "", 0)
    finally:
        del visit  # (a recursive closure: see flatten)


# --- validation ----------------------------------------------------------------------------------


def _fail(where: str, reason: str) -> CorruptCheckpointError:
    place = f"at {where!r}" if where else "at the root"
    return CorruptCheckpointError(f"malformed tree record {place}: {reason}")


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _bad_name(name: Any) -> str | None:
    if not isinstance(name, str):
        return f"a name must be a string, found {_type_name(name)}"
    if not name:
        return "a name is empty"
    if name in (".", ".."):
        return f"the name {name!r} is not allowed"
    if "/" in name or "\\" in name:
        return f"the name {_show(name)} contains a slash or backslash"
    if _CONTROL.search(name):
        return f"the name {_show(name)} contains a control character"
    if name.startswith("__"):
        return f"the name {_show(name)} starts with '__' (reserved by Zarr)"
    if name.casefold() == "zarr.json":
        return f"the name {name!r} is reserved"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return f"the name {_show(name)} is not valid UTF-8"
    return None


def _bad_path(path: str) -> str | None:
    if not path:
        return "is empty"
    if path.startswith("/"):
        return "is absolute"
    if "\\" in path:
        return "contains a backslash"
    if "\x00" in path:
        return "contains a NUL character"
    parts = path.split("/")
    if "" in parts:
        return "has an empty component"
    if "." in parts or ".." in parts:
        return "contains '.' or '..'"
    for part in parts:
        reason = _bad_name(part)
        if reason:
            return f"is not a safe storage key: {reason}"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_key(key: Any) -> str | None:
    if isinstance(key, str) or _is_int(key):
        return None
    if isinstance(key, list):
        if not key:
            return "a tuple key is empty"
        if len(key) > MAX_DEPTH:
            return f"a tuple key has more than {MAX_DEPTH} parts"
        if all(isinstance(p, str) or _is_int(p) for p in key):
            return None
        return f"a tuple key {_show(key)} holds something other than strings and integers"
    return f"a key must be a string, an integer or an array of them, found {_type_name(key)}"


def _check_list(rec: dict[str, Any], field: str, length: int) -> list[Any]:
    value = rec.get(field)
    if not isinstance(value, list):
        raise CorruptCheckpointError(f"'{field}' must be an array, found {_type_name(value)}")
    if len(value) != length:
        raise CorruptCheckpointError(f"'{field}' has {len(value)} entries for {length} children")
    return value


def _check_class(rec: dict[str, Any], required: bool) -> None:
    spec = rec.get("class")
    if spec is None and not required:
        return
    if not isinstance(spec, str):
        raise CorruptCheckpointError(f"'class' must be a string, found {_type_name(spec)}")


def _entry_names(rec: dict[str, Any], kind: str, n: int) -> list[list[str]]:
    """The name path of each child of a container record; raises on malformed fields."""
    if kind in ("list", "tuple"):
        return [[str(i)] for i in range(n)]
    if kind == "state":
        _check_class(rec, required=True)
        if n != 1:
            raise CorruptCheckpointError(f"a state node has {n} children, not 1")
        return [[]]
    canon: list[Any] = []
    paths: list[list[str]] = []
    if kind in ("dict", "odict"):
        _check_class(rec, required=False)
        keys, names = _check_list(rec, "keys", n), _check_list(rec, "names", n)
        for key, name in zip(keys, names, strict=True):
            reason = _check_key(key)
            if reason:
                raise CorruptCheckpointError(reason)
            if isinstance(key, list):
                if not isinstance(name, list) or len(name) != len(key):
                    raise CorruptCheckpointError(
                        f"the tuple key {_show(key)} needs one name per part, found {_show(name)}"
                    )
                paths.append(name)
            else:
                paths.append([name])
            canon.append(_key_from_json(key))
    elif kind == "namedtuple":
        _check_class(rec, required=True)
        fields = _check_list(rec, "fields", n)
        if not all(isinstance(f, str) for f in fields):
            raise CorruptCheckpointError("'fields' must hold strings")
        given = rec.get("names")
        names = _escape_v1_all(fields) if given is None else _check_list(rec, "names", n)
        paths, canon = [[name] for name in names], list(fields)
    elif kind == "pytree":
        _check_class(rec, required=True)
        keys, names = _check_list(rec, "keys", n), _check_list(rec, "names", n)
        for key in keys:
            if not (
                isinstance(key, list)
                and len(key) == 2
                and (
                    (key[0] == "attr" and isinstance(key[1], str))
                    or (key[0] == "key" and (isinstance(key[1], str) or _is_int(key[1])))
                    or (key[0] in ("seq", "index") and _is_int(key[1]) and key[1] >= 0)
                )
            ):
                raise CorruptCheckpointError(f"bad pytree key {_show(key)}")
            canon.append(key[1])
        paths = [[name] for name in names]
    if len(set(canon)) != len(canon):
        raise CorruptCheckpointError("two children have the same key")
    full: set[tuple[str, ...]] = set()
    prefixes: set[tuple[str, ...]] = set()
    for path in paths:
        for name in path:
            reason = _bad_name(name)
            if reason:
                raise CorruptCheckpointError(reason)
        here = tuple(path)
        if here in full or here in prefixes:
            raise CorruptCheckpointError(f"two children are both named {_show('/'.join(path))}")
        for i in range(1, len(here)):
            if here[:i] in full:
                raise CorruptCheckpointError(
                    f"{_show('/'.join(here[:i]))} is both a child and a group of tuple keys"
                )
            prefixes.add(here[:i])
        full.add(here)
    return paths


def _escape_v1_all(fields: list[str]) -> list[str]:
    return [_escape_v1(f) for f in fields]


def validate(record: Any, path: str = "") -> dict[str, Any]:
    """Check a tree record read from storage; return it, or raise ``CorruptCheckpointError``.

    Checks every node's type and fields (lists of matching lengths, keys, names, classes as
    strings), depth (at most ``MAX_DEPTH``), that names are valid Zarr node names and
    unique among siblings, and that each leaf's ``path`` is a safe relative storage key equal
    to its parents' names joined by ``/`` (``path`` is the record's own path, ``""`` for a
    step's root), plus the leaf's own fields (``_leaves.check_record``). The message names
    the place. Records written by version 1 pass.
    """
    seen: set[str] = set()
    stack: list[tuple[Any, str, int]] = [(record, path, 0)]
    while stack:
        rec, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _fail(where, f"the tree nests deeper than {MAX_DEPTH} levels")
        if not isinstance(rec, dict):
            raise _fail(where, f"a node must be an object, found {_type_name(rec)}")
        kind = rec.get("type")
        if kind == "leaf":
            expected = where or ROOT_LEAF_NAME
            leaf_path = rec.get("path")
            if not isinstance(leaf_path, str):
                raise _fail(
                    where, f"a leaf's 'path' must be a string, found {_type_name(leaf_path)}"
                )
            reason = _bad_path(leaf_path)
            if reason:
                raise _fail(where, f"the leaf path {_show(leaf_path)} {reason}")
            if leaf_path != expected:
                raise _fail(
                    where,
                    f"the leaf path {_show(leaf_path)} does not match the names of its parents "
                    f"({_show(expected)})",
                )
            if leaf_path in seen:
                raise _fail(where, f"two leaves have the path {_show(leaf_path)}")
            seen.add(leaf_path)
            reason = _leaves.check_record(rec)
            if reason:
                raise _fail(where, reason)
            continue
        if kind == "none":
            continue
        if kind == FROM_TARGET:
            if not isinstance(rec.get("pytype"), str):
                raise _fail(where, f"a {FROM_TARGET} node needs a 'pytype' string")
            continue
        for child, child_path, n_names in _container_entries(rec, where):
            stack.append((child, child_path, depth + max(1, n_names)))
    return record


def _container_entries(rec: dict[str, Any], where: str) -> list[tuple[Any, str, int]]:
    """``(child, its path, its number of names)`` of a container record, after checking the
    node's own fields."""
    kind = rec.get("type")
    if kind not in ("dict", "odict", "list", "tuple", "namedtuple", "pytree", "state"):
        raise _fail(where, f"unknown node type {_show(kind)}")
    kids = rec.get("children")
    if not isinstance(kids, list):
        raise _fail(where, f"a {kind} node needs a 'children' array")
    try:
        name_paths = _entry_names(rec, kind, len(kids))
    except CorruptCheckpointError as exc:
        raise _fail(where, str(exc)) from None
    return [
        (child, _join(where, names), len(names))
        for child, names in zip(kids, name_paths, strict=True)
    ]


def validate_node(record: Any, path: str = "") -> None:
    """Check one container record's own fields (not its children's): what a lazy reader
    needs of each container it walks through on the way to one leaf."""
    if not isinstance(record, dict):
        raise _fail(path, f"a node must be an object, found {_type_name(record)}")
    if record.get("type") not in ("leaf", "none", FROM_TARGET):
        _container_entries(record, path)
