"""BrainPy modules saved and restored by relative path.

``module.state_dict()`` names nodes by their global names (``SNN0``, ``Dense0``), which
differ in a second instance of the same class, so that instance cannot load the first's
state dict. :func:`save_module` stores variables by their **relative** path instead
(``l1/W``, ``l2/V``, ``l2/spike``): the attribute path from the module, stable across
instances. A variable reachable by two paths is stored once, under the first.

Nodes that override ``__save_state__`` / ``__load_state__`` are honoured: their dict is
stored under the node's path and handed back to their ``__load_state__``. brainpy is
imported only when these functions are called.
"""

from __future__ import annotations

import warnings
from collections import namedtuple
from typing import Any

import numpy as np

from .api import load_pytree, save_pytree
from .errors import StructureMismatchError

__all__ = ["StateLoadResult", "load_module", "module_state", "save_module"]

#: Same fields as ``brainpy``'s ``StateLoadResult``.
StateLoadResult = namedtuple("StateLoadResult", ["missing_keys", "unexpected_keys"])


def _base_class() -> type:
    import brainpy.math as bm

    return bm.BrainPyObject


def _overrides(node: Any, hook: str) -> bool:
    return getattr(type(node), hook) is not getattr(_base_class(), hook)


def _nodes(module: Any) -> dict[str, Any]:
    """Relative path (``""``, ``"l1"``, ``"l2.integral"``) -> node, each node once."""
    return dict(module.nodes(method="relative", level=-1, include_self=True).unique().items())


def _own_variables(node: Any) -> dict[str, Any]:
    """The node's own variables by attribute name (``W``, ``d-0`` for a var_list)."""
    prefix = f"{node.name}."
    found = node.vars(level=0, include_self=True).unique()
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in found.items()}


def _subtree(tree: dict[str, Any], relpath: str, create: bool) -> dict[str, Any] | None:
    for part in relpath.split(".") if relpath else ():
        if create:
            tree = tree.setdefault(part, {})
        else:
            nxt = tree.get(part) if isinstance(tree, dict) else None
            if not isinstance(nxt, dict):
                return None
            tree = nxt
    return tree


def module_state(module: Any) -> dict[str, Any]:
    """The module's state as a nested dict keyed by relative path: ``{"l1": {"W": ...}}``."""
    tree: dict[str, Any] = {}
    seen: set[int] = set()
    for relpath, node in _nodes(module).items():
        if _overrides(node, "__save_state__"):
            entries = dict(node.__save_state__())
        else:
            entries = {}
            for name, var in _own_variables(node).items():
                if id(var) not in seen:
                    seen.add(id(var))
                    entries[name] = var
        if not entries:
            continue
        where = _subtree(tree, relpath, create=True)
        assert where is not None
        for key, value in entries.items():
            if key in where:
                raise ValueError(f"{relpath}.{key}: a node and a state entry share this name")
            where[key] = value
    return tree


def save_module(module: Any, filename: Any, **save_kwargs: Any) -> str:
    """Save a BrainPy module's variables by relative path (see :func:`save_pytree`)."""
    return save_pytree(filename, module_state(module), **save_kwargs)


def _assign(var: Any, value: Any, key: str) -> None:
    import jax.numpy as jnp

    array = np.asarray(value)
    if tuple(array.shape) != tuple(var.shape) or array.dtype != np.dtype(var.dtype):
        raise StructureMismatchError(
            f"{key}: shape {array.shape} dtype {array.dtype} in the checkpoint, "
            f"shape {tuple(var.shape)} dtype {np.dtype(var.dtype)} in the module"
        )
    var.value = jnp.asarray(array)


def _load_only(filename: Any, only: str, step: int | None, storage_options: Any, parallel: bool,
               verbose: bool) -> dict[str, Any]:  # fmt: skip
    """Read only the sub-tree of sub-module ``only`` ("l2.sub"), nested as in the full state."""
    from .checkpoint import open_checkpoint

    ckpt = open_checkpoint(filename, step=step, storage_options=storage_options)
    path = only.replace(".", "/")
    sub = ckpt.load(path, parallel=parallel, verbose=verbose) if path in ckpt else {}
    state: dict[str, Any] = {}
    where = _subtree(state, only, create=True)
    assert where is not None
    where.update(sub)
    return state


def load_module(
    module: Any,
    filename: Any,
    *,
    step: int | None = None,
    warn: bool = True,
    only: str | None = None,
    storage_options: dict[str, Any] | None = None,
    parallel: bool = True,
    verbose: bool = False,
) -> StateLoadResult:
    """Restore a module saved by :func:`save_module` (its own or another instance's).

    Returns ``StateLoadResult(missing_keys, unexpected_keys)`` with dotted relative keys
    (``"l2.V"``), like ``module.load_state_dict``. ``only="l2"`` restores that sub-module alone.
    """
    nodes = _nodes(module)
    if only is not None:
        only = only.replace("/", ".").strip(".")
        if only not in nodes:
            raise KeyError(
                f"{only!r} is not a sub-module; sub-modules: {sorted(p for p in nodes if p)}"
            )
        nodes = {p: n for p, n in nodes.items() if p == only or p.startswith(only + ".")}
        state = _load_only(filename, only, step, storage_options, parallel, verbose)
    else:
        state = load_pytree(filename, step=step, storage_options=storage_options,
                            parallel=parallel, verbose=verbose)  # fmt: skip
    state = state if isinstance(state, dict) else {}
    children: dict[str, set[str]] = {p: set() for p in nodes}
    for path in nodes:
        if path:
            parent, _, name = path.rpartition(".")
            children.setdefault(parent, set()).add(name)

    missing: list[str] = []
    unexpected: list[str] = []
    maybe_missing: list[tuple[str, int]] = []
    loaded: set[int] = set()
    for relpath, node in nodes.items():
        prefix = f"{relpath}." if relpath else ""
        sub = _subtree(state, relpath, create=False) or {}
        entries = {k: v for k, v in sub.items() if k not in children.get(relpath, ())}
        if _overrides(node, "__load_state__"):
            result = node.__load_state__(entries)
            if result is not None:
                m, u = result
                missing += [prefix + k for k in m]
                unexpected += [prefix + k for k in u]
            continue
        variables = _own_variables(node)
        for name, var in variables.items():
            if name in entries:
                _assign(var, entries[name], prefix + name)
                loaded.add(id(var))
            else:
                maybe_missing.append((prefix + name, id(var)))
        unexpected += [prefix + k for k in entries if k not in variables]
    # A variable stored once under another path was restored there: it is not missing.
    missing += [key for key, vid in maybe_missing if vid not in loaded]
    if warn and unexpected:
        warnings.warn(f"Unexpected keys in the checkpoint: {unexpected}", UserWarning, stacklevel=2)
    if warn and missing:
        warnings.warn(f"Missing keys in the checkpoint: {missing}", UserWarning, stacklevel=2)
    return StateLoadResult(missing, unexpected)
