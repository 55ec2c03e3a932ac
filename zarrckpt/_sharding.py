"""Sharded ``jax.Array``s: chunk grids aligned with a sharding, who writes which chunk, and
which regions a process reads.

A global array of a multi-process JAX program is not addressable by any one process, so
it is saved as pieces: each process writes the chunks of the shards it holds. The chunk
grid is chosen so that every shard is a whole number of chunks (a chunk never straddles
two shards, so no chunk has two writers), on any axis the sharding splits; a replicated
shard is written once, by the lowest-numbered process holding it. Loading into a target
sharded the same way, or any other way, reads per process only the chunks that overlap
its addressable shards.

Nothing here imports JAX: the arrays passed in are JAX's, so it is loaded already.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Shards",
    "aligned_chunks",
    "bounding",
    "describe",
    "owned_pieces",
    "process_count",
    "regions",
    "within",
]

Index = tuple[slice, ...]


@dataclass(frozen=True)
class Shards:
    """The part of a global array this process writes: ``(start, data)`` pieces, ``start``
    the global index of the piece's first element. Stands in for the host array of a leaf
    (``shape``/``dtype`` are the global array's)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    pieces: tuple[tuple[tuple[int, ...], np.ndarray], ...]
    #: each axis's shard boundaries (the starts of all shards but the first)
    boundaries: tuple[tuple[int, ...], ...]

    @property
    def nbytes(self) -> int:
        return sum(data.nbytes for _, data in self.pieces)


def _normalized(index: Index, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def owned_pieces(value: Any) -> Shards:
    """The shards of the global ``jax.Array`` ``value`` that this process writes (views of
    its immutable device buffers: never copied, also for background saves)."""
    shape = tuple(value.shape)
    index_map = value.sharding.devices_indices_map(shape)
    owner: dict[tuple[tuple[int, int], ...], int] = {}
    for device, index in index_map.items():
        key = _normalized(index, shape)
        owner[key] = min(owner.get(key, device.process_index), device.process_index)
    boundaries = tuple(
        tuple(sorted({bounds[axis][0] for bounds in owner} - {0})) for axis in range(len(shape))
    )
    pieces, seen = [], set()
    for shard in value.addressable_shards:
        key = _normalized(shard.index, shape)
        if key in seen or owner[key] != shard.device.process_index:
            continue
        seen.add(key)
        pieces.append((tuple(lo for lo, _ in key), np.asarray(shard.data)))
    pieces.sort(key=lambda piece: piece[0])
    return Shards(shape, np.dtype(value.dtype), tuple(pieces), boundaries)


def aligned_chunks(shards: Shards, chunk_bytes: int) -> tuple[int, ...]:
    """A regular chunk shape that divides every shard (each axis's chunk divides all its
    shard boundaries), near ``chunk_bytes``, splitting leading axes first."""
    shape = shards.shape
    chunks = [
        math.gcd(*bounds) if bounds else max(1, n)
        for bounds, n in zip(shards.boundaries, shape, strict=True)
    ]
    itemsize = shards.dtype.itemsize
    for axis in range(len(shape)):
        inner = itemsize * math.prod(chunks[axis + 1 :])
        if inner * chunks[axis] <= chunk_bytes:
            break
        chunks[axis] = _split(chunks[axis], inner, chunk_bytes)
        if chunks[axis] > 1 or inner <= chunk_bytes:
            break
    return tuple(chunks)


def _split(extent: int, inner: int, chunk_bytes: int) -> int:
    """The chunk length along an axis of ``extent`` (a divisor of it, so shard boundaries
    stay chunk boundaries) whose chunks of ``inner`` bytes per index come nearest
    ``chunk_bytes``: the largest that fits, unless an awkward extent (few divisors: 24,573
    is 3 x 8,191) makes it tiny; then a larger one, up to 4x, or else one index (the next
    axis is split in turn)."""
    sizes = [d for d in _divisors(extent)]
    fits = [d for d in sizes if d * inner <= chunk_bytes]
    best = max(fits) if fits else 1
    if best * inner >= chunk_bytes // 8:
        return best
    larger = [d for d in sizes if chunk_bytes < d * inner <= 4 * chunk_bytes]
    return min(larger) if larger else best


def _divisors(n: int) -> list[int]:
    small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0]
    return sorted(set(small + [n // k for k in small]))


def process_count(sharding: Any) -> int:
    """How many processes hold devices of ``sharding`` (the same on every process)."""
    return len({d.process_index for d in sharding.device_set})


def describe(sharding: Any, shape: tuple[int, ...]) -> dict[str, Any] | None:
    """What the step record says of a leaf's sharding (None: one device, nothing to say)."""
    devices = sharding.device_set
    if len(devices) <= 1:
        return None
    doc: dict[str, Any] = {
        "type": type(sharding).__name__,
        "shard_shape": list(sharding.shard_shape(shape)),
        "devices": len(devices),
        "processes": process_count(sharding),
    }
    mesh, spec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None)
    if mesh is not None and spec is not None:
        doc["mesh"] = {str(name): int(size) for name, size in mesh.shape.items()}
        doc["spec"] = [
            list(map(str, part)) if isinstance(part, tuple) else part and str(part) for part in spec
        ]
    return doc


def regions(sharding: Any, shape: tuple[int, ...]) -> list[tuple[Index, list[Any]]]:
    """This process's distinct shard regions of ``shape`` under ``sharding``, each with the
    addressable devices that hold it (a replicated region is read once, placed on each)."""
    out: dict[tuple[tuple[int, int], ...], list[Any]] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        out.setdefault(_normalized(index, shape), []).append(device)
    return [(tuple(slice(lo, hi) for lo, hi in key), devices) for key, devices in out.items()]


def bounding(regions: list[Index]) -> Index | None:
    """The box the ``regions`` tile exactly (then one read of it reads each chunk once),
    or None if they leave gaps."""
    if not regions:
        return None
    box = tuple(
        slice(min(r[a].start for r in regions), max(r[a].stop for r in regions))
        for a in range(len(regions[0]))
    )
    volume = math.prod(s.stop - s.start for s in box)
    return box if volume == sum(math.prod(s.stop - s.start for s in r) for r in regions) else None


def within(index: Index, box: Index) -> Index:
    """``index`` relative to the start of ``box`` (which holds it)."""
    return tuple(
        slice(i.start - b.start, i.stop - b.start) for i, b in zip(index, box, strict=True)
    )


def is_global(value: Any) -> bool:
    """Whether ``value`` (a ``jax.Array`` or ``jax.ShapeDtypeStruct``) is sharded over devices
    of other processes too (so no process can hold it whole)."""
    sharding = getattr(value, "sharding", None)
    return sharding is not None and not sharding.is_fully_addressable
