"""Lazy, read-only views of one committed step.

:func:`open_checkpoint` reads two small documents — the manifest and the step's record —
and nothing else: no array data, no per-leaf metadata. Indexing a view gives a sub-tree
view or a :class:`LazyArray`; slicing a lazy array fetches only the chunks it touches.
A view is pinned to its step: newer commits do not change what it shows, and if retention
deletes its step, reads fail with a :class:`CheckpointNotFoundError` that says so.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _leaves, _repr, _tree
from ._commit import read_manifest
from ._engine import read_selections
from ._format import ArrayLayout
from ._indexing import normalize
from ._read import (
    CROSS_CHECK_BYTES,
    CROSS_CHECK_CHUNKS,
    Mismatch,
    OpenStep,
    check_alive,
    cross_check,
    fetch,
    materialize,
    open_step,
    rebuild_leaf,
    restore_into,
)
from ._storage import open_storage
from ._sync import run
from .errors import CheckpointNotFoundError, CorruptCheckpointError

__all__ = ["Checkpoint", "LazyArray", "TreeView", "open_checkpoint", "step_url"]


def open_checkpoint(
    filename: Any, step: int | None = None, storage_options: dict[str, Any] | None = None
) -> Checkpoint:
    """Open a committed step (the latest by default) without reading array data."""
    opened = open_step(filename, step, storage_options)
    if opened is None:
        raise CheckpointNotFoundError(f"no checkpoint at {filename}")
    return Checkpoint(opened, storage_options)


def step_url(
    root: Any, step: int | None = None, storage_options: dict[str, Any] | None = None
) -> str:
    """Where a committed step's Zarr group lies (the latest step by default): a path, or a
    URL for object storage (``s3://bucket/run/step_0000000003.<id>``).

    Plain Zarr readers do not follow zarrckpt's manifest; give them this location, e.g.
    ``xarray.open_datatree(step_url(root), engine="zarr", consolidated=False)``. Reads only
    the manifest.
    """
    storage = open_storage(root, storage_options, read_only=True)
    manifest = run(read_manifest(storage))
    if manifest is None or not manifest.steps:
        raise CheckpointNotFoundError(f"no checkpoint at {storage.url}")
    info = manifest.latest if step is None else manifest.get(step)
    if info is None:
        raise CheckpointNotFoundError(
            f"step {step} is not committed at {storage.url}; committed steps: "
            f"{manifest.step_numbers}"
        )
    return storage.describe(info.dir)


@functools.lru_cache(maxsize=16)
def _reopen(root: str, options: str, step: int, step_dir: str) -> OpenStep:
    """The step a pickled :class:`LazyArray` came from, opened once per process."""
    opened = open_step(root, step, json.loads(options) or None)
    if opened is None or opened.info.dir != step_dir:
        raise CheckpointNotFoundError(
            f"step {step} of {root} is no longer the one this array was read from "
            "(deleted or overwritten since it was pickled)"
        )
    return opened


def _unpickle_leaf(root: str, options: str, step: int, step_dir: str, path: str) -> LazyArray:
    opened = _reopen(root, options, step, step_dir)
    record, canonical = _resolve(opened.record, path)
    return LazyArray(opened, opened.valid(record, canonical), canonical, (root, options))


_children = _tree.children


def _resolve(record: dict[str, Any], path: str, base: str = "") -> tuple[dict[str, Any], str]:
    """The record at ``path`` (``/``-separated, BrainPy dots allowed) below ``record`` (whose
    own path is ``base``) and its canonical path. Every container walked through is
    validated on the way (a lazy reader checks what it uses)."""
    segments = [s for s in path.strip("/").split("/") if s] if path else []
    canonical: list[str] = []

    def walk(rec: dict[str, Any], atoms: list[list[str]], where: str) -> dict[str, Any] | None:
        if not atoms:
            return rec
        _tree.validate_node(rec, where)
        kids = _children(rec)
        head = atoms[0]
        for n in range(len(head), 0, -1):  # longest dotted run that names a child
            name = ".".join(head[:n])
            for key in (name, _tree.escape(name)):
                if key in kids:
                    rest = [head[n:], *atoms[1:]] if n < len(head) else atoms[1:]
                    found = walk(kids[key], rest, f"{where}/{key}" if where else key)
                    if found is not None:
                        canonical.insert(0, key)
                        return found
        return None

    atoms = [re.split(r"\.", s) if s not in (".", "..") else [s] for s in segments]
    found = walk(record, atoms, base)
    if found is None:
        names = _all_paths(record)
        close = difflib.get_close_matches(path.replace(".", "/"), names, n=5, cutoff=0.4)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        top = sorted(_children(record))
        raise KeyError(f"{path!r} is not in this checkpoint{hint} (top level: {top[:20]})")
    return found, "/".join(canonical)


def _all_paths(record: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for name, child in _children(record).items():
        path = f"{prefix}/{name}" if prefix else name
        out.append(path)
        out += _all_paths(child, path)
    return out


@dataclass(frozen=True)
class LeafInfo:
    """What the record says about one leaf."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    codec: str
    kind: str
    #: how the leaf was sharded when saved (mesh, spec, shard shape), if over several devices
    sharding: dict[str, Any] | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _leaf_info(rec: dict[str, Any]) -> LeafInfo:
    layout = ArrayLayout.from_json(rec)
    return LeafInfo(
        rec["path"],
        layout.shape,
        layout.dtype,
        layout.chunks,
        layout.codec,
        rec.get("kind", "ndarray"),
        rec.get("sharding"),
    )


class _View:
    """Shared by :class:`Checkpoint` and :class:`TreeView`: a sub-tree of one step."""

    def __init__(
        self,
        opened: OpenStep,
        record: dict[str, Any],
        path: str,
        source: tuple[str, str] | None = None,
    ) -> None:
        self._opened = opened
        self._record = record
        self.path = path
        #: (root, storage options as JSON) to re-open the step with: pickling, xarray
        self._source = source or (opened.storage.url, "null")

    # --- navigation ---------------------------------------------------------------------------

    def _full(self, path: str) -> str:
        return f"{self.path}/{path}" if self.path and path else self.path or path

    def __getitem__(self, path: str) -> TreeView | LazyArray:
        record, canonical = _resolve(self._record, path, self.path)
        full = self._full(canonical)
        if record.get("type") == "leaf":
            return LazyArray(self._opened, self._opened.valid(record, full), full, self._source)
        return TreeView(self._opened, record, full, self._source)

    def __contains__(self, path: object) -> bool:
        try:
            _resolve(self._record, str(path), self.path)
        except KeyError:
            return False
        return True

    def keys(self) -> list[str]:
        return list(_children(self._record))

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def _checked(self) -> dict[str, Any]:
        """This view's record, validated (once) before anything walks all of it."""
        return self._opened.valid(self._record, self.path)

    def leaves(self) -> list[LeafInfo]:
        return [_leaf_info(r) for r in _tree.iter_leaf_records(self._checked())]

    def tree(self) -> dict[str, Any] | LeafInfo | None:
        """The saved structure with a :class:`LeafInfo` (shape, dtype, chunks, ...) per leaf
        (``None`` for ``None`` and for what a load takes from its target: functions, ...)."""

        def build(rec: dict[str, Any]) -> Any:
            if rec["type"] == "leaf":
                return _leaf_info(rec)
            if rec["type"] in ("none", _tree.FROM_TARGET):
                return None
            return {label: build(c) for label, _, c in _tree.labelled_children(rec)}

        return build(self._checked())

    # --- loading ------------------------------------------------------------------------------

    def load(
        self,
        path: str = "",
        target: Any = None,
        *,
        parallel: bool = True,
        mismatch: Mismatch = "error",
        verbose: bool = False,
    ) -> Any:
        """Materialise the sub-tree at ``path`` (all of this view by default), like ``load_pytree``."""
        check_alive(self._opened)
        record, canonical = _resolve(self._record, path, self.path) if path else (self._record, "")
        if target is None:
            return materialize(self._opened, record, parallel, verbose, self._full(canonical))
        prefix = self._full(canonical)
        return restore_into(self._opened, record, target, mismatch, parallel, verbose, prefix)

    def to_xarray(self, path: str = "") -> Any:
        """The sub-tree at ``path`` (all of this view by default) as xarray objects whose
        variables are dask arrays over :class:`LazyArray` s: nothing is read until values
        are asked for, and reads go through zarrckpt (checksums verified, the step pinned).

        A sub-tree with sub-groups gives an ``xarray.DataTree`` shaped like the step's Zarr
        groups, one with leaves only an ``xarray.Dataset``, a leaf an ``xarray.DataArray``.
        Variables are named like the Zarr arrays (escaped node names), dimensions like
        their ``dimension_names`` (``<leaf path>_<axis>``), as
        ``xarray.open_datatree(ckpt.url, engine="zarr")`` shows them; the tree record is
        the authority, so steps written before ``dimension_names`` existed open too.
        Containers without leaves (and ``None`` leaves) have no group.
        """
        import xarray as xr

        node = self[path] if path else self
        if isinstance(node, LazyArray):
            return xr.DataArray(node.to_dask(), dims=node.dims, name=node.path.split("/")[-1])
        assert isinstance(node, _View)
        prefix = f"{node.path}/" if node.path else ""
        groups: dict[str, dict[str, Any]] = {}
        for rec in _tree.iter_leaf_records(node._checked()):
            leaf_path = rec["path"]
            if prefix and not leaf_path.startswith(prefix):
                prefix = ""  # a record whose paths do not follow its nesting: step-rooted
                break
        leaves = [
            LazyArray(node._opened, rec, rec["path"], node._source)
            for rec in _tree.iter_leaf_records(node._checked())
        ]
        _justify_chunks(node._opened, {leaf.path: leaf._layout for leaf in leaves})
        for leaf in leaves:
            rel = leaf.path[len(prefix) :]
            group, _, name = rel.rpartition("/")
            groups.setdefault(group, {})[name] = (leaf.dims, leaf._dask())
        if set(groups) <= {""}:
            return xr.Dataset(groups.get("", {}))
        return xr.DataTree.from_dict(
            {f"/{g}": xr.Dataset(variables) for g, variables in groups.items()}
        )

    def stats(self, path: str = "") -> dict[str, float]:
        """min/max/mean/std/nnz of a leaf, computed chunk by chunk (memory: a few chunks)."""
        leaf = self[path] if path else self
        if not isinstance(leaf, LazyArray):
            raise TypeError(f"{self._full(path)!r} is a sub-tree, not an array")
        return leaf.stats()

    # --- display ------------------------------------------------------------------------------

    def _title(self) -> str:
        return f"{self._opened.location}" + (f" :: {self.path}" if self.path else "")

    def __repr__(self) -> str:
        return _repr.text_tree(type(self).__name__, self._title(), self.tree(), self.leaves())

    def _repr_html_(self) -> str:
        opened = self._opened
        records = {rec["path"]: rec for rec in _tree.iter_leaf_records(self._checked())}

        def read(boxes: dict[str, tuple[slice, ...]]) -> dict[str, np.ndarray]:
            """Samples of many leaves in one batch, through the verified reader."""
            request = {}
            for path, box in boxes.items():
                layout = opened.layouts.get(path) or ArrayLayout.from_json(records[path])
                request[path] = (layout, normalize(box, layout.shape))
            return fetch(opened, read_selections(opened.storage, opened.info.dir, request))

        return _repr.html_tree(
            type(self).__name__, self._title(), self.tree(), self.leaves(),
            records=records, read=read, root=opened.storage.url, step=opened.info,
            steps=opened.manifest.steps if isinstance(self, Checkpoint) else None,
            path=self.path,
        )  # fmt: skip


class Checkpoint(_View):
    """A lazy, read-only view of one committed step of a checkpoint."""

    def __init__(self, opened: OpenStep, storage_options: dict[str, Any] | None = None) -> None:
        options = json.dumps(storage_options or None, sort_keys=True, default=repr)
        super().__init__(opened, opened.record, "", (opened.storage.url, options))

    @property
    def step(self) -> int:
        return self._opened.info.step

    @property
    def steps(self) -> list[int]:
        """The steps committed now (re-reads the manifest)."""
        manifest = run(read_manifest(self._opened.storage))
        return manifest.step_numbers if manifest else []

    @property
    def location(self) -> str:
        return self._opened.location

    @property
    def url(self) -> str:
        """Where this step's Zarr group lies (a path, or a URL for object storage): what
        plain Zarr readers and ``xarray.open_datatree(..., engine="zarr")`` open."""
        return self._opened.storage.describe(self._opened.info.dir)

    def info(self) -> dict[str, Any]:
        leaves = self.leaves()
        codecs: dict[str, int] = {}
        dtypes: dict[str, int] = {}
        for leaf in leaves:
            codecs[leaf.codec] = codecs.get(leaf.codec, 0) + 1
            dtypes[str(leaf.dtype)] = dtypes.get(str(leaf.dtype), 0) + 1
        return {
            "location": self.location,
            "step": self.step,
            "leaves": len(leaves),
            "nbytes": sum(leaf.nbytes for leaf in leaves),
            "chunks": sum(
                math.prod(math.ceil(s / c) for s, c in zip(leaf.shape, leaf.chunks, strict=True))
                for leaf in leaves
            ),
            "codecs": codecs,
            "dtypes": dtypes,
        }


class TreeView(_View):
    """A lazy view of a sub-tree (``ckpt["net/l2"]``)."""


def _justify_chunks(opened: OpenStep, layouts: dict[str, ArrayLayout]) -> None:
    """Refuse to build a lazy graph of more chunks than the stored data holds.

    A dask graph costs memory and time per block before anything is read (~20 bytes and
    30 ns each to lay out its chunks; 2^28 one-element chunks, a ~100-byte edit of a record,
    cost 5.6 GiB and 8.5 s). So a leaf cut into more than ``CROSS_CHECK_CHUNKS`` chunks must
    show them: its ``zarr.json`` must agree with the record and its directory must list every
    chunk (:func:`~zarrckpt._read.cross_check`), which costs what the data itself holds. A
    record claiming chunks that are not there is refused naming the leaf, the count and the
    limit.
    """
    many = {p: lay for p, lay in layouts.items() if lay.n_chunks > CROSS_CHECK_CHUNKS}
    if not many:
        return
    try:
        fetch(opened, cross_check(opened, many))
    except CorruptCheckpointError as exc:
        counts = ", ".join(f"{p!r}: {lay.n_chunks}" for p, lay in list(many.items())[:5])
        raise CorruptCheckpointError(
            f"refusing a lazy graph of chunks the data does not hold (leaves cut into more "
            f"than {CROSS_CHECK_CHUNKS} chunks must list them all; chunks claimed {counts}): "
            f"{exc}"
        ) from None


class LazyArray:
    """One leaf, read on demand: NumPy-style slicing fetches only the chunks it touches."""

    def __init__(
        self,
        opened: OpenStep,
        record: dict[str, Any],
        path: str,
        source: tuple[str, str] | None = None,
    ) -> None:
        self._opened = opened
        self._record = record
        self._layout = ArrayLayout.from_json(record)
        self.path = path
        self._source = source or (opened.storage.url, "null")

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as where to re-open it (root, storage options, step and its directory,
        leaf path): a dask worker re-opens the step once per process, and refuses if the
        step was overwritten since (its directory differs)."""
        root, options = self._source
        info = self._opened.info
        return _unpickle_leaf, (root, options, info.step, info.dir, self.path)

    @property
    def dims(self) -> tuple[str, ...]:
        """Dimension names, as in the array's ``zarr.json``: those given to ``save_pytree``'s
        ``dims``, else ``<leaf path>_<axis>``."""
        given = self._record.get("dims")
        if given is not None:
            return tuple(given)
        return tuple(self._layout.dimension_names(self._record["path"]))

    def to_dask(self) -> Any:
        """A ``dask.array`` with one block per stored chunk, each read through zarrckpt
        (checksums verified, the step pinned). Builds no more than the graph: nothing is
        read until it is computed, except for a leaf cut into more than
        ``CROSS_CHECK_CHUNKS`` chunks, whose chunks are listed first (see
        :func:`_justify_chunks`). The graph pickles (see :meth:`__reduce__`)."""
        _justify_chunks(self._opened, {self.path: self._layout})
        return self._dask()

    def _dask(self) -> Any:
        import dask.array as da
        from dask.base import tokenize

        root, options = self._source
        token = tokenize(root, options, self._opened.info.dir, self._record["path"])
        return da.from_array(
            self,
            chunks=self.chunks if self.shape else (),
            name=f"zarrckpt-{token}",
            asarray=False,
            fancy=False,
            meta=np.empty((0,) * self.ndim, dtype=self.dtype),
        )

    shape = property(lambda self: self._layout.shape)
    dtype = property(lambda self: self._layout.dtype)
    chunks = property(lambda self: self._layout.chunks)
    codec = property(lambda self: self._layout.codec)
    ndim = property(lambda self: len(self._layout.shape))
    size = property(lambda self: math.prod(self._layout.shape))
    nbytes = property(lambda self: self._layout.nbytes)

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d array")
        return self.shape[0]

    def _read(self, selection: Any) -> np.ndarray:
        sel = normalize(selection, self.shape)
        if math.prod(sel.shape) * self.dtype.itemsize > CROSS_CHECK_BYTES:
            # a large read allocates first: the record must agree with the array it names
            fetch(self._opened, cross_check(self._opened, {self._record["path"]: self._layout}))
        request = {self._record["path"]: (self._layout, sel)}
        read = read_selections(self._opened.storage, self._opened.info.dir, request)
        return fetch(self._opened, read)[self._record["path"]]

    def __getitem__(self, selection: Any) -> Any:
        return self._read(selection)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self._read(())
        return array if dtype is None else array.astype(dtype)

    def load(self) -> Any:
        """The whole leaf as saved (a Python scalar stays a scalar, a Quantity keeps its unit)."""

        return rebuild_leaf(
            self._opened, self._record, _leaves.decode, self._record, self._read(())
        )

    def iter_chunks(self) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
        """``(region, values)`` for each chunk in order; memory stays at one chunk."""
        if not self.size:
            return
        for idx in self._layout.chunk_ids():
            region = self._layout.chunk_region(idx)
            yield region, self._read(region)

    def stats(self) -> dict[str, float]:
        """min, max, mean, std and nnz, computed chunk by chunk."""
        if self.dtype.kind == "c":
            raise TypeError(f"{self.path!r}: stats of complex arrays are not defined")
        n, nnz = 0, 0
        low, high = math.inf, -math.inf
        mean, m2 = 0.0, 0.0  # Chan et al. parallel variance
        for _, values in self.iter_chunks():
            x = values.astype(np.float64).ravel()
            if not x.size:
                continue
            nnz += int(np.count_nonzero(x))
            low, high = min(low, float(x.min())), max(high, float(x.max()))
            cmean, cm2 = float(x.mean()), float(((x - x.mean()) ** 2).sum())
            delta = cmean - mean
            total_n = n + x.size
            mean += delta * x.size / total_n
            m2 += cm2 + delta**2 * n * x.size / total_n
            n = total_n
        if n == 0:
            return {
                "size": 0,
                "nnz": 0,
                "min": math.nan,
                "max": math.nan,
                "mean": math.nan,
                "std": math.nan,
            }
        return {
            "size": n,
            "nnz": nnz,
            "min": low,
            "max": high,
            "mean": mean,
            "std": math.sqrt(m2 / n),
        }

    def __repr__(self) -> str:
        """Layout, then NumPy's repr of the values from the edge items alone (see ``_repr``)."""
        return _repr.text_leaf(self, self._record)

    def _repr_html_(self) -> str:
        return _repr.html_leaf(self, self._record, _leaf_info(self._record))
