"""BrainPy and brainstate modules saved and restored by relative path.

``module.state_dict()`` names nodes by their global names (``SNN0``, ``Dense0``), which
differ in a second instance of the same class, so that instance cannot load the first's
state dict. :func:`save_module` stores the module's state by its **relative** path
instead (``l1/W``, ``l2/V``, ``layers/0/weight``): the path from the module, stable across
instances of one class. :func:`load_module` restores it into any such instance.

Frameworks. The module's class is checked against classes already imported (this module
imports neither framework): a ``brainpy.math.BrainPyObject`` is a BrainPy 2 module, a
``brainstate.graph.Node`` (``brainstate.nn.Module``, ``brainpy.state`` models) a brainstate
one. Anything else raises ``TypeError``.

Paths. Every path component is one step through the node tree, never a piece of a
dotted name:

- BrainPy 2: the tree is walked as ``module.nodes(method="relative")`` walks it (same
  order, a node reached twice is kept at its first path). An attribute is one component
  (``l2``), a ``NodeList`` position one more (``layers/0``), a ``NodeDict`` key one more
  (``N/_before_updates/<entry>``), an implicit node its key. A node's variables follow:
  attribute (``V``), ``VarList`` position (``d/0``), ``VarDict`` key, implicit key.
- brainstate: the tuple paths of ``module.states()``, one element per component
  (``("layers", 0, "weight")`` -> ``layers/0/weight``); a state holding a dict (a
  ``ParamState`` of ``Linear``) is stored as a group of its entries. brainstate keeps a
  state reached twice at its first path in its own (sorted) order: a population ``N``
  that projection ``E`` also holds as ``E.post`` is stored under ``E/post``.
  Unreadable components (``_before_updates`` keys) are named as below.

Registry entries. Dict keys are kept when they are readable and stable, i.e. made of
``A-Z a-z 0-9 _ . - +`` (64 characters at most) and not a node's global name. Other keys
are named, in order of preference:

1. a key that is another node's global name (BrainPy's ``_current_inputs`` are keyed by
   the registering projection's name, ``HalfProjAlignPostMg0``): that node's relative
   path (``E``; ``label-E`` for BrainPy's ``"label // name"`` form);
2. an unreadable key (the merging projections' ``"None // (<class ...Expon'>, ...)"``):
   the relative path of the projection that registered the entry, i.e. the first node
   in traversal order that holds the entry, or the entry's ``syn``, as an attribute or
   in its ``refs`` dict (``pre``/``post`` excepted): ``N/_before_updates/E/syn/g``. When
   two projections share one merged synapse, the first names it;
3. otherwise the class of the entry's ``syn`` (or of the entry) and its index among the
   container's entries of that class: ``children/Lif0``, ``Expon1``. Global auto-names
   (``Lif3`` as a key for the ``Lif`` itself) and BrainPy's id-based implicit variable
   keys (``var140...``) are named this way, since they differ between instances.

BrainPy's delay registry key ``_*_delay_of_`` becomes ``delay``. A name already taken in
its container gets ``-1``, ``-2``, ... Names depend only on the class's construction
order, so two instances of one class name their entries alike.

Keys in :class:`StateLoadResult` and in errors are the path components joined by dots
(``l2.V``, ``N._before_updates.E.syn.g``, ``layers.0.weight``); with ``/`` instead they
address the checkpoint (``open_checkpoint(path)["l2/V"]``).

Loading validates first, then reads, then assigns: every variable's (state's) structure,
shape and dtype, and for nodes with a ``__load_state__`` hook the shape and dtype of each
array entry that their ``__save_state__`` also produces, are checked against the
checkpoint's record before any array is read; all mismatches are raised together as one
:class:`StructureMismatchError` and the module is unchanged. Then the matching arrays are
read in one batch (hook entries after them), and only then assigned. Missing and
unexpected keys are reported, not raised.

``only=`` restores one sub-module: its path as ``"l2/sub"``, ``"l2.sub"``, a tuple of
components (``("layers", 0)``), for BrainPy its name in ``module.nodes(method="relative")``,
or any attribute path that reaches the node (``only="N"`` for a brainstate population
stored under ``E/post``). Only that sub-tree of the checkpoint is read, and missing and
unexpected keys are reported within it.

BrainPy nodes that override ``__save_state__`` / ``__load_state__`` are honoured: the
dict is stored under the node's path and handed back (as saved: numpy arrays, Python
scalars) to ``__load_state__``, which may return ``(missing, unexpected)``. brainstate
0.5.4 has no per-module state-dict hooks (``nn.assign_state_values`` assigns as it goes,
without checking shapes first), so brainstate states are assigned here, after validation.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections import namedtuple
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .api import save_pytree
from .checkpoint import open_checkpoint
from .errors import CheckpointNotFoundError, MissingCheckpointWarning, StructureMismatchError

__all__ = ["StateLoadResult", "load_module", "module_state", "save_module"]

#: Same fields as ``brainpy``'s ``StateLoadResult``.
StateLoadResult = namedtuple("StateLoadResult", ["missing_keys", "unexpected_keys"])

Path = tuple[str, ...]

_READABLE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+\-]{0,63}")
_BRAINPY_DELAY_KEY = "_*_delay_of_"


def _dotted(path: Path) -> str:
    return ".".join(path)


# --- naming the entries of registries and other dicts ---------------------------------------


class _Key:
    """A raw path component that is a dict key: named by :class:`_Namer` once the tree is known."""

    __slots__ = ("container", "key")

    def __init__(self, container: Any, key: Any) -> None:
        self.container = container
        self.key = key


@dataclass
class _Namer:
    """Readable, stable names for dict keys (see the module docstring, "Registry entries")."""

    #: nodes in traversal order, with a function giving each one's relative path
    nodes: list[Any]
    path_of: Callable[[Any], Path | None]
    _names: dict[int, dict[Any, str]] = field(default_factory=dict)
    _busy: set[int] = field(default_factory=set)
    _by_name: dict[str, Any] | None = None

    def name(self, component: _Key) -> str:
        container = component.container
        table = self._names.get(id(container))
        if table is None:
            table = self._names[id(container)] = self._name_all(container)
        return table[component.key]

    def _name_all(self, container: Any) -> dict[Any, str]:
        self._busy.add(id(container))
        try:
            names: dict[Any, str] = {}
            counts: dict[str, int] = {}
            for key, entry in list(container.items()):
                name = self._preferred(key, entry)
                if name is None:
                    base = _class_base(entry)
                    name = f"{base}{counts.get(base, 0)}"
                    counts[base] = counts.get(base, 0) + 1
                taken, n = set(names.values()), 0
                unique = name
                while unique in taken:
                    n += 1
                    unique = f"{name}-{n}"
                names[key] = unique
            return names
        finally:
            self._busy.discard(id(container))

    def _preferred(self, key: Any, entry: Any) -> str | None:
        if not isinstance(key, str):
            return str(key) if isinstance(key, int) and not isinstance(key, bool) else None
        if key == _BRAINPY_DELAY_KEY:
            return "delay"
        label, sep, tail = key.rpartition(" // ")
        other = self._node_named(tail)
        if other is not None and other is not entry:
            where = self._path_str(other)
            if where is not None:
                return f"{label}-{where}" if sep and _READABLE.fullmatch(label) else where
        if _is_auto_name(key, entry):
            return None
        if _READABLE.fullmatch(key):
            return key
        registrant = self._registrant(entry)
        return self._path_str(registrant) if registrant is not None else None

    def _node_named(self, name: str) -> Any:
        if self._by_name is None:
            self._by_name = {}
            for node in self.nodes:
                found = getattr(node, "name", None)
                if isinstance(found, str):
                    self._by_name.setdefault(found, node)
        return self._by_name.get(name) if name else None

    def _path_str(self, node: Any) -> str | None:
        path = self.path_of(node)
        return _dotted(path) if path else None

    def _registrant(self, entry: Any) -> Any:
        """The first node holding ``entry`` (or its ``syn``) as an attribute or in ``refs``."""
        wanted = {id(entry)}
        syn = getattr(entry, "__dict__", {}).get("syn")
        if syn is not None:
            wanted.add(id(syn))
        for node in self.nodes:
            if node is entry:
                continue
            attrs = getattr(node, "__dict__", {})
            refs = attrs.get("refs")
            held = [v for k, v in attrs.items() if k not in ("pre", "post")]
            if isinstance(refs, dict):
                held += [v for k, v in refs.items() if k not in ("pre", "post")]
            if any(id(v) in wanted for v in held):
                return node
        return None


def _class_base(entry: Any) -> str:
    syn = getattr(entry, "__dict__", {}).get("syn")
    return type(syn if syn is not None and hasattr(syn, "__dict__") else entry).__name__


def _is_auto_name(key: str, entry: Any) -> bool:
    """BrainPy's global auto-names (``Lif3``) and id-based implicit-variable keys."""
    if key == f"var{id(entry)}":
        return True
    auto = re.fullmatch(re.escape(type(entry).__name__) + r"\d+", key)
    return auto is not None and getattr(entry, "name", None) == key


# --- what a module holds, by relative path ----------------------------------------------------


@dataclass
class _Slot:
    """One BrainPy ``Variable`` or brainstate ``State`` (both hold their array in ``.value``)."""

    key: str  # the dotted relative path: "l2.V"
    holder: Any
    #: what save_module stores: the Variable itself (the core records its class) or, for a
    #: State, its value (which may be a dict of arrays, stored as a group)
    store_holder: bool


@dataclass
class _Layout:
    slots: dict[Path, _Slot] = field(default_factory=dict)
    #: BrainPy nodes whose __save_state__ (saving) / __load_state__ (loading) is honoured
    hooks: dict[Path, Any] = field(default_factory=dict)
    nodes: dict[Path, Any] = field(default_factory=dict)
    #: what only= accepts (dotted, slashed, tuple, BrainPy's relative name) -> node path
    aliases: dict[Any, Path] = field(default_factory=dict)
    #: slots and hooks in traversal order: (path, is a hook)
    order: list[tuple[Path, bool]] = field(default_factory=list)

    def alias(self, path: Path, *extra: Any) -> None:
        for name in (path, _dotted(path), "/".join(path), *extra):
            self.aliases.setdefault(name, path)


def _framework(module: Any) -> str:
    bs = sys.modules.get("brainstate")
    node_cls = getattr(getattr(bs, "graph", None), "Node", None)
    if node_cls is not None and isinstance(module, node_cls):
        return "brainstate"
    bm = sys.modules.get("brainpy.math")
    base = getattr(bm, "BrainPyObject", None)
    if base is not None and isinstance(module, base):
        return "brainpy"
    raise TypeError(
        f"expected a BrainPy module (brainpy.math.BrainPyObject) or a brainstate module "
        f"(brainstate.graph.Node), got {type(module).__module__}.{type(module).__qualname__}"
    )


def _layout(module: Any, for_load: bool) -> _Layout:
    if _framework(module) == "brainstate":
        return _brainstate_layout(module)
    return _brainpy_layout(module, for_load)


# --- BrainPy 2 ---------------------------------------------------------------------------------


def _overrides(node: Any, hook: str) -> bool:
    import brainpy.math as bm

    return getattr(type(node), hook) is not getattr(bm.BrainPyObject, hook)


def _brainpy_children(node: Any) -> Iterator[tuple[tuple[Any, ...], str, Any]]:
    """``(raw components, BrainPy's relative name, child)`` as ``_find_nodes`` sees them."""
    import brainpy.math as bm

    for k, v in node.__dict__.items():
        if isinstance(v, bm.BrainPyObject):
            yield (k,), k, v
        elif isinstance(v, bm.NodeList):
            for i, v2 in enumerate(v):
                if isinstance(v2, bm.BrainPyObject):
                    yield (k, str(i)), f"{k}-{i}", v2
        elif isinstance(v, bm.NodeDict):
            for k2, v2 in v.items():
                if isinstance(v2, bm.BrainPyObject):
                    yield (k, _Key(v, k2)), f"{k}.{k2}", v2
    implicit = node.__dict__.get("_implicit_nodes") or {}
    for k2, v2 in implicit.items():
        if isinstance(v2, bm.BrainPyObject):
            yield (_Key(implicit, k2),), str(k2), v2


def _brainpy_variables(node: Any) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """``(raw components, variable)`` of the node's own variables, as ``vars()`` sees them."""
    import brainpy.math as bm

    excluded = getattr(node, "_excluded_vars", ())
    for k in list(node.__dict__):
        if k in excluded:
            continue
        v = getattr(node, k)
        if isinstance(v, bm.Variable) and not isinstance(v, bm.VariableView):
            yield (k,), v
        elif isinstance(v, bm.VarList):
            for i, vv in enumerate(v):
                if not isinstance(vv, bm.VariableView):
                    yield (k, str(i)), vv
        elif isinstance(v, bm.VarDict):
            for kk, vv in v.items():
                if not isinstance(vv, bm.VariableView):
                    yield (k, _Key(v, kk)), vv
    implicit = node.__dict__.get("_implicit_vars") or {}
    for kk, vv in implicit.items():
        yield (_Key(implicit, kk),), vv


def _brainpy_layout(module: Any, for_load: bool) -> _Layout:
    # 1. the raw node tree, in _find_nodes' order: a node's children, then their subtrees
    order: list[tuple[tuple[Any, ...], str, Any]] = [((), "", module)]
    seen = {id(module)}

    def visit(raw: tuple[Any, ...], name: str, node: Any) -> None:
        found = []
        for comps, child_name, child in _brainpy_children(node):
            if id(child) not in seen:
                seen.add(id(child))
                found.append((raw + comps, f"{name}.{child_name}" if name else child_name, child))
        order.extend(found)
        for item in found:
            visit(*item)

    visit((), "", module)
    raw_of = {id(node): raw for raw, _, node in order}

    # 2. names for dict keys, which may refer to other nodes' paths
    pretty_cache: dict[int, Path] = {}

    def pretty(raw: tuple[Any, ...]) -> Path:
        return tuple(namer.name(c) if isinstance(c, _Key) else c for c in raw)

    def path_of(node: Any) -> Path | None:
        raw = raw_of.get(id(node))
        if raw is None or any(isinstance(c, _Key) and id(c.container) in namer._busy for c in raw):
            return None
        if id(node) not in pretty_cache:
            pretty_cache[id(node)] = pretty(raw)
        return pretty_cache[id(node)]

    namer = _Namer([node for _, _, node in order], path_of)

    # 3. variables (each stored once, at its first path) and hooks
    layout = _Layout()
    hook = "__load_state__" if for_load else "__save_state__"
    stored: set[int] = set()
    for _, name, node in order:
        path = path_of(node)
        assert path is not None
        layout.nodes[path] = node
        layout.alias(path, name)
        if _overrides(node, hook):
            layout.hooks[path] = node
            layout.order.append((path, True))
            continue
        for comps, var in _brainpy_variables(node):
            if id(var) in stored:
                continue
            stored.add(id(var))
            where = path + pretty(comps)
            layout.slots[where] = _Slot(_dotted(where), var, store_holder=True)
            layout.order.append((where, False))
    return layout


# --- brainstate --------------------------------------------------------------------------------


def _brainstate_layout(module: Any) -> _Layout:
    import brainstate

    states = brainstate.graph.states(module)
    nodes_by_raw: dict[Path, Any] = {}
    for raw, node in brainstate.graph.nodes(module).items():
        nodes_by_raw.setdefault(tuple(str(c) for c in raw), node)
    state_raw = [(tuple(str(c) for c in raw), state) for raw, state in states.items()]
    node_list = list(nodes_by_raw.values())
    raw_of: dict[int, Path] = {}
    for raw, node in nodes_by_raw.items():
        raw_of.setdefault(id(node), raw)

    # Containers with an unreadable child: their children (in order) and what each one holds.
    children: dict[Path, dict[str, Any]] = {}
    for raw, obj in [*nodes_by_raw.items(), *state_raw]:
        for i in range(len(raw)):
            parent, comp = raw[:i], raw[i]
            entry = nodes_by_raw.get(raw[: i + 1], obj if i == len(raw) - 1 else None)
            kids = children.setdefault(parent, {})
            if comp not in kids or kids[comp] is None:
                kids[comp] = entry
    unreadable = {
        p for p, kids in children.items() if any(not _READABLE.fullmatch(k) for k in kids)
    }

    pretty_cache: dict[Path, Path] = {}

    def pretty(raw: Path) -> Path:
        if raw not in pretty_cache:
            out: list[str] = []
            for i, comp in enumerate(raw):
                parent = raw[:i]
                if parent in unreadable:
                    comp = namer.name(_Key(children[parent], comp))
                out.append(comp)
            pretty_cache[raw] = tuple(out)
        return pretty_cache[raw]

    def path_of(node: Any) -> Path | None:
        raw = raw_of.get(id(node))
        if raw is None:
            return None
        if any(
            id(children[raw[:i]]) in namer._busy for i in range(len(raw)) if raw[:i] in unreadable
        ):
            return None
        return pretty(raw)

    namer = _Namer(node_list, path_of)
    layout = _Layout()
    for raw, node in nodes_by_raw.items():
        path = pretty(raw)
        layout.nodes[path] = node
        layout.alias(path, tuple(raw))
    for raw, state in state_raw:
        path = pretty(raw)
        for i in range(len(path)):  # containers between nodes (a list of layers) can be only=
            layout.alias(path[:i], tuple(raw[:i]))
        layout.slots[path] = _Slot(_dotted(path), state, store_holder=False)
        layout.order.append((path, False))
    return layout


# --- saving ------------------------------------------------------------------------------------


def _nest(flat: dict[Path, Any]) -> dict[str, Any]:
    """``{("l1", "W"): w}`` -> ``{"l1": {"W": w}}``; a path used twice raises ``ValueError``."""
    tree: dict[str, Any] = {}
    made = {id(tree)}
    for path, value in flat.items():
        where = tree
        for i, comp in enumerate(path[:-1]):
            if comp not in where:
                where[comp] = {}
                made.add(id(where[comp]))
            elif id(where[comp]) not in made:
                raise ValueError(
                    f"{_dotted(path[: i + 1])}: a state entry and a sub-module share this name"
                )
            where = where[comp]
        if path[-1] in where:
            raise ValueError(f"{_dotted(path)}: a state entry and a sub-module share this name")
        where[path[-1]] = value
    return tree


def module_state(module: Any) -> dict[str, Any]:
    """The module's state as a nested dict keyed by relative path: ``{"l1": {"W": ...}}``."""
    layout = _layout(module, for_load=False)
    flat: dict[Path, Any] = {}
    for path, is_hook in layout.order:
        if is_hook:
            for key, value in dict(layout.hooks[path].__save_state__()).items():
                flat[(*path, str(key))] = value
        else:
            slot = layout.slots[path]
            flat[path] = slot.holder if slot.store_holder else slot.holder.value
    return _nest(flat)


def save_module(module: Any, filename: Any, **save_kwargs: Any) -> str:
    """Save a module's state by relative path (see :func:`save_pytree` for ``save_kwargs``)."""
    return save_pytree(filename, module_state(module), **save_kwargs)


# --- loading: compare with the checkpoint's record, read, assign ---------------------------------

_ABSENT = object()


def _lookup(tree: Any, path: Path) -> Any:
    for comp in path:
        if not isinstance(tree, dict) or comp not in tree:
            return _ABSENT
        tree = tree[comp]
    return tree


def _flat(tree: Any, prefix: Path = (), *, saved: bool = False) -> dict[Path, Any]:
    """A value as ``{relative path: leaf}`` over the core's containers (dict, list, tuple,
    namedtuple). With ``saved``, ``tree`` is ``Checkpoint.tree()`` output: every container
    there is a dict, and anything else is a leaf's description."""
    if isinstance(tree, dict):
        out: dict[Path, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, (*prefix, str(k)), saved=saved))
        return out
    if saved:
        return {prefix: tree}
    cls = type(tree)
    if isinstance(tree, tuple) and hasattr(cls, "_fields"):
        return _flat(dict(zip(cls._fields, tree, strict=True)), prefix)
    if isinstance(tree, (list, tuple)):
        return _flat({str(i): v for i, v in enumerate(tree)}, prefix)
    return {prefix: tree}


def _unwrap(value: Any) -> Any:
    """The array inside a BrainPy ``Variable``/``Array`` or a brainstate ``State``."""
    for module, name in (("brainpy.math", "Array"), ("brainstate", "State")):
        cls: type[Any] | None = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(value, cls):
            return value.value
    return value


def _describe(value: Any) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype of ``value`` as the checkpoint stores it (None if it has none)."""
    value = _unwrap(value)
    if hasattr(value, "mantissa") and hasattr(value, "unit"):  # a brainunit Quantity
        value = value.mantissa
    if isinstance(value, (bool, int, float, complex)):
        value = np.asarray(value)
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None:
        return None
    try:
        return tuple(shape), np.dtype(dtype)
    except TypeError:
        return None


def _leaf_problem(key: str, value: Any, info: Any) -> str | None:
    """Why the checkpoint's leaf ``info`` cannot restore ``value`` (None if it can)."""
    kind = getattr(info, "kind", None)
    if isinstance(value, (str, bytes)) or kind in ("str", "bytes"):
        mine = type(value).__name__ if isinstance(value, (str, bytes)) else "array"
        theirs = kind if kind in ("str", "bytes") else "array"
        return (
            None if mine == theirs else f"{key}: {mine} in the module, {theirs} in the checkpoint"
        )
    described = _describe(value)
    if described is None:
        return f"{key}: a {type(value).__name__} in the module cannot be restored"
    shape, dtype = described
    if (tuple(info.shape), np.dtype(info.dtype)) != (shape, dtype):
        return (
            f"{key}: shape {tuple(info.shape)} dtype {np.dtype(info.dtype)} in the checkpoint, "
            f"shape {shape} dtype {dtype} in the module"
        )
    return None


def _structure(flat: dict[Path, Any]) -> str:
    if not flat:
        return "an empty group"
    if list(flat) == [()]:
        return "a group" if isinstance(flat[()], dict) else "one value"
    return "entries " + ", ".join(sorted(_dotted(p) for p in flat))


def _value_problems(key: str, value: Any, saved: Any) -> list[str]:
    """Compare a slot's value (an array, or a dict of arrays) with the checkpoint's sub-tree."""
    expected, found = _flat(value), _flat(saved, saved=True)
    if expected.keys() != found.keys():
        return [
            f"{key}: {_structure(found)} in the checkpoint, {_structure(expected)} in the module"
        ]
    problems: list[str] = []
    for rel, leaf in expected.items():
        name, info = _dotted((key, *rel)), found[rel]
        if leaf is None or info is None:
            if (leaf is None) != (info is None):
                problems.append(f"{name}: None on one side only")
        elif problem := _leaf_problem(name, leaf, info):
            problems.append(problem)
    return problems


@dataclass
class _Plan:
    """What a load will do, decided before anything is read."""

    matched: dict[Path, _Slot] = field(default_factory=dict)
    hook_entries: dict[Path, list[str]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _plan(layout: _Layout, tree: Any, base: Path) -> _Plan:
    plan = _Plan()
    groups = {path[:i] for path in (*layout.slots, *layout.hooks, *layout.nodes)
              for i in range(len(path) + 1)}  # fmt: skip
    for path, slot in layout.slots.items():
        saved = _lookup(tree, path)
        if saved is _ABSENT:
            plan.missing.append(slot.key)
            continue
        problems = _value_problems(slot.key, slot.holder.value, saved)
        if problems:
            plan.problems += problems
        else:
            plan.matched[path] = slot
    for path in layout.hooks:
        plan.hook_entries[path] = []

    def visit(path: Path, sub: dict[str, Any]) -> None:
        for k, child in sub.items():
            q = (*path, str(k))
            if q in layout.slots:
                continue  # compared above
            if q in groups and isinstance(child, dict):
                visit(q, child)
            elif path in layout.hooks and q not in groups:
                plan.hook_entries[path].append(str(k))
            else:
                plan.unexpected.append(_dotted(q))

    start = _lookup(tree, base)
    if isinstance(start, dict):
        visit(base, start)
    for path, node in layout.hooks.items():
        plan.problems += _hook_problems(path, node, _lookup(tree, path), plan.hook_entries[path])
    return plan


def _hook_problems(path: Path, node: Any, saved: Any, entries: list[str]) -> list[str]:
    """Check a ``__load_state__`` node's entries against what its ``__save_state__`` gives."""
    if not entries or not _overrides(node, "__save_state__"):
        return []
    try:
        current = dict(node.__save_state__())
    except Exception:  # a hook that cannot run now cannot be checked; __load_state__ decides
        return []
    problems = []
    for k in entries:
        mine, info = _unwrap(current.get(k)), saved[k]
        if info is None or isinstance(info, dict) or not hasattr(mine, "shape"):
            continue  # only arrays are compared; __load_state__ decides about the rest
        if problem := _leaf_problem(_dotted((*path, k)), mine, info):
            problems.append(problem)
    return problems


def _resolve_only(module: Any, layout: _Layout, only: Any) -> Path:
    """The node path ``only`` names: a known path or alias, else attributes from ``module``."""
    key = tuple(str(c) for c in only) if isinstance(only, (tuple, list)) else only
    if isinstance(key, str):
        key = key.strip("/").strip(".")
    if key in layout.aliases:
        return layout.aliases[key]
    # Another way to the same node (brainstate keeps a shared node at its first path only).
    if isinstance(key, str):
        key = tuple(key.split("/")) if "/" in key else tuple(key.split("."))
    node = module
    for comp in key:
        node = _child(node, comp)
        if node is _ABSENT:
            break
    else:
        for path, candidate in layout.nodes.items():
            if candidate is node:
                return path
    names = sorted(_dotted(p) for p in layout.nodes if p)
    raise KeyError(f"{only!r} is not a sub-module; sub-modules: {names}")


def _child(obj: Any, comp: str) -> Any:
    if isinstance(obj, (list, tuple)) and comp.isdigit():
        return obj[int(comp)] if int(comp) < len(obj) else _ABSENT
    if isinstance(obj, dict):
        return obj.get(comp, _ABSENT)
    return getattr(obj, comp, _ABSENT) if comp.isidentifier() else _ABSENT


def _within(path: Path, base: Path) -> bool:
    return path[: len(base)] == base


def load_module(
    module: Any,
    filename: Any,
    *,
    step: int | None = None,
    warn: bool = True,
    only: str | tuple[Any, ...] | None = None,
    storage_options: dict[str, Any] | None = None,
    parallel: bool = True,
    verbose: bool = False,
) -> StateLoadResult:
    """Restore a module saved by :func:`save_module` (its own or another instance's).

    Returns ``StateLoadResult(missing_keys, unexpected_keys)`` with dotted relative keys
    (``"l2.V"``), like ``module.load_state_dict``. ``only="l2"`` (or ``"layers/0"``,
    ``("layers", 0)``) restores that sub-module alone and reads only its part of the
    checkpoint. Shapes and dtypes are all checked before anything is assigned: on a
    mismatch :class:`StructureMismatchError` names every bad key and the module is unchanged.
    """
    layout = _layout(module, for_load=True)
    base: Path = () if only in (None, "", ()) else _resolve_only(module, layout, only)
    layout.slots = {p: s for p, s in layout.slots.items() if _within(p, base)}
    layout.hooks = {p: n for p, n in layout.hooks.items() if _within(p, base)}
    layout.nodes = {p: n for p, n in layout.nodes.items() if _within(p, base)}
    try:
        ckpt = open_checkpoint(filename, step=step, storage_options=storage_options)
    except CheckpointNotFoundError:
        if step is not None:
            raise
        warnings.warn(
            f"no checkpoint at {filename}; the module is unchanged",
            MissingCheckpointWarning,
            stacklevel=2,
        )
        return StateLoadResult([s.key for s in layout.slots.values()], [])

    plan = _plan(layout, ckpt.tree(), base)
    if plan.problems:
        listing = "\n  ".join(plan.problems)
        raise StructureMismatchError(
            f"{ckpt.location} does not match the module ({len(plan.problems)} problems); "
            f"nothing was restored:\n  {listing}"
        )

    # Read everything before assigning anything.
    values: Any = {}
    if plan.matched:
        target = _nest({p: s.holder.value for p, s in plan.matched.items()})
        values = ckpt.load(target=target, mismatch="ignore", parallel=parallel, verbose=verbose)
    hook_inputs: dict[Path, dict[str, Any]] = {}
    for path, entries in plan.hook_entries.items():
        saved = ckpt.load("/".join(path), parallel=parallel, verbose=verbose) if entries else {}
        hook_inputs[path] = {k: saved[k] for k in entries}

    for path, slot in plan.matched.items():
        slot.holder.value = _lookup(values, path)
    missing, unexpected = plan.missing, plan.unexpected
    for path, node in layout.hooks.items():
        result = node.__load_state__(hook_inputs[path])
        if result is not None:
            m, u = result
            missing += [_dotted((*path, str(k))) for k in m]
            unexpected += [_dotted((*path, str(k))) for k in u]
    if warn and unexpected:
        warnings.warn(f"Unexpected keys in the checkpoint: {unexpected}", UserWarning, stacklevel=2)
    if warn and missing:
        warnings.warn(f"Missing keys in the checkpoint: {missing}", UserWarning, stacklevel=2)
    return StateLoadResult(missing, unexpected)
