"""Incremental saves: which files of a new step are already in the previous one.

A save records a content hash of every chunk (xxh3-128 of the chunk's little-endian
C-order bytes, edge chunks zero-padded: what the codec encodes) in the step record, as
the leaf's ``xxh3`` list, in chunk order. The next save into the same root compares its
own hashes with those of the latest committed step: a chunk whose hash *and* whole layout
(shape, dtype, chunk grid, codec; dimension names for the ``zarr.json``) match is not
encoded nor written again, but hard-linked (local disks) or copied server-side (object
stores) from that step. Every step stays self-contained: deleting any step never breaks
another, and plain Zarr readers read any step alone. crc32c stays the integrity check; it
never decides equality.

A ``jax.Array`` is immutable, so the same object hashed by an earlier save of this process
keeps its hashes: it is not hashed again (:func:`known_hashes`).

A leaf of which every chunk changed in this process's last save into the root (a training
loop's weights) is expected to change again: the next save writes it whole without
comparing, and hashes it once all the step's data is written, while the disk flushes it
(the hashes go into the step record, written last). If it did not change after all, that
save writes bytes it could have linked; the one after compares first again.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np
import xxhash

from . import _tree
from ._format import ArrayLayout
from ._leaves import HASH_FIELD, IdentityMemo
from ._manifest import StepInfo, parse_step_record
from ._storage import Storage

__all__ = [
    "Previous", "chunk_hash", "chunk_hashes", "committed", "known_hashes", "last_committed",
    "remember", "view_hash", "view_hashes",
]  # fmt: skip

_HEX128 = re.compile(r"[0-9a-f]{32}")
#: step records are read with this bound (the same as readers use)
_RECORD_LIMIT = 256 * 1024 * 1024


def chunk_hashes(layout: ArrayLayout, array: np.ndarray) -> list[str]:
    """The xxh3-128 of each chunk of ``array`` (as :meth:`ArrayLayout.chunk_data` gives it)."""
    if not layout.nbytes:
        return []
    return [chunk_hash(layout, array, idx) for idx in layout.chunk_ids()]


def chunk_hash(layout: ArrayLayout, array: np.ndarray, idx: tuple[int, ...]) -> str:
    found = view_hash(layout, array, idx)
    if found is None:  # a copy of the chunk as stored (Fortran order, big-endian, ...)
        copy = layout.chunk_data(array, idx).reshape(-1).view(np.uint8)
        return xxhash.xxh3_128_hexdigest(copy.data)
    return found


def view_hashes(
    layout: ArrayLayout, array: np.ndarray, ids: list[tuple[int, ...]]
) -> list[str | None]:
    """:func:`view_hash` of each chunk of ``ids``."""
    return [view_hash(layout, array, idx) for idx in ids]


def view_hash(layout: ArrayLayout, array: np.ndarray, idx: tuple[int, ...]) -> str | None:
    """:func:`chunk_hash` where it needs no copy of the chunk, else None."""
    view = layout.chunk_view(array, idx)
    if view is None:
        return None
    raw, pad = view
    if not pad:
        return xxhash.xxh3_128_hexdigest(raw.data)
    hasher = xxhash.xxh3_128(raw.data)  # an edge chunk: its bytes, then the padding, uncopied
    hasher.update(np.zeros(pad, np.uint8).data)
    return hasher.hexdigest()


def _usable(hashes: Any, layout: ArrayLayout) -> TypeGuard[list[str]]:
    """Whether a record's hash list fits its layout (else nothing of the leaf is reused)."""
    return (
        isinstance(hashes, list)
        and len(hashes) == (layout.n_chunks if layout.nbytes else 0)
        and all(isinstance(h, str) and _HEX128.fullmatch(h) for h in hashes)
    )


# --- jax.Array identity -------------------------------------------------------------------

#: array -> (its layout, its chunk hashes)
_known = IdentityMemo()


def known_hashes(value: Any, layout: ArrayLayout) -> list[str] | None:
    """The hashes an earlier save computed for this very (immutable) ``jax.Array``."""
    found = _known.get(value)
    return found[1] if found is not None and found[0] == layout else None


def remember(value: Any, layout: ArrayLayout, hashes: list[str]) -> None:
    """Keep ``value``'s hashes while it lives (only for immutable arrays: ``jax.Array``)."""
    if _known.get(value) != (layout, hashes):  # (else an unchanged leaf: nothing new to keep)
        _known.put(value, (layout, hashes))


# --- the previous step ----------------------------------------------------------------------


@dataclass(frozen=True)
class Previous:
    """The latest committed step's leaves: path -> (layout, dims, hashes)."""

    dir: str
    leaves: dict[str, tuple[ArrayLayout, Any, list[str]]]
    #: the leaves of which every chunk differed from the step before (known only of a step
    #: this process committed): the next save writes them without comparing, then hashes them
    changed: frozenset[str] = frozenset()

    @classmethod
    async def read(cls, storage: Storage, info: StepInfo | None) -> Previous | None:
        """Read from ``info``'s step record; None if there is none or it is unusable (then
        nothing is reused: a save never fails for the previous step's sake)."""
        if info is None:
            return None
        cached = _records.get(storage.url)
        if cached is not None and cached[0] == info.dir and cached[1] == info.record_crc32c:
            return cached[2]
        try:
            data = await storage.get(f"{info.dir}/zarr.json", limit=_RECORD_LIMIT)
            if data is None:
                return None
            tree = _tree.validate(parse_step_record(data, info, storage.describe(info.dir)))
            leaves: dict[str, tuple[ArrayLayout, Any, list[str]]] = {}
            for rec in _tree.iter_leaf_records(tree):
                layout, hashes = ArrayLayout.from_json(rec), rec.get(HASH_FIELD)
                if _usable(hashes, layout):
                    leaves[rec["path"]] = (layout, rec.get("dims"), hashes)
        except Exception:
            return None
        return cls(info.dir, leaves)

    def linkable(
        self, path: str, layout: ArrayLayout, dims: Any, hashes: list[str]
    ) -> Iterable[int]:
        """Positions (in chunk order) of the chunks of leaf ``path`` the previous step holds
        with the same bytes; ``-1`` stands for its ``zarr.json`` (same layout and names)."""
        found = self.leaves.get(path)
        if found is None or found[0] != layout:
            return []
        same = [i for i, (a, b) in enumerate(zip(found[2], hashes, strict=True)) if a == b]
        return ([-1] if self.same_metadata(path, layout, dims) else []) + same

    def same_metadata(self, path: str, layout: ArrayLayout, dims: Any) -> bool:
        """Whether the previous step holds leaf ``path``'s ``zarr.json`` with the same bytes
        (the same layout and dimension names)."""
        found = self.leaves.get(path)
        return found is not None and found[0] == layout and found[1] == dims


#: url -> (step directory, record crc32c, what it holds): the step this process committed
#: last into each root, so that a save loop never reads back its own step record.
_records: dict[str, tuple[str, int | None, Previous]] = {}


def last_committed(storage: Storage) -> Previous | None:
    """The step this process committed last into ``storage``'s root (what
    :meth:`Previous.read` returns for it while the manifest lists it as the latest; whether
    it still is, only the manifest says)."""
    found = _records.get(storage.url)
    return found[2] if found is not None else None


def committed(
    storage: Storage,
    info: StepInfo,
    leaves: dict[str, tuple[ArrayLayout, Any, list[str]]],
    changed: frozenset[str] = frozenset(),
) -> None:
    """Note the step this process just committed (the next save's :class:`Previous`)."""
    _records[storage.url] = (info.dir, info.record_crc32c, Previous(info.dir, leaves, changed))
