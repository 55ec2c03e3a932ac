"""NumPy basic indexing (ints, slices with any step, ``...``) mapped onto a chunk grid.

A selection is reduced, axis by axis, to the chunks it touches: for each touched chunk, the
slice inside the chunk and the slice of the output it fills. Reading a selection then costs
one GET per touched chunk and memory for the output plus the chunks in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Selection", "normalize"]


@dataclass(frozen=True)
class _Axis:
    start: int  # ascending form: first index
    stop: int  # exclusive
    step: int  # > 0
    flip: bool  # the user asked for a negative step
    drop: bool  # an integer index: the axis disappears

    @property
    def size(self) -> int:
        return max(0, -(-(self.stop - self.start) // self.step))

    def projections(self, chunk: int, length: int) -> list[tuple[int, slice, slice]]:
        """``(chunk index, slice in the chunk, slice in the output)`` for touched chunks."""
        if self.size == 0:
            return []
        out = []
        last = self.start + (self.size - 1) * self.step
        for ci in range(self.start // chunk, last // chunk + 1):
            lo, hi = ci * chunk, min((ci + 1) * chunk, length)
            k0 = -(-(max(self.start, lo) - self.start) // self.step)
            first = self.start + k0 * self.step
            end = min(self.stop, hi)
            if first >= end:
                continue
            k1 = -(-(end - self.start) // self.step)
            out.append((ci, slice(first - lo, end - lo, self.step), slice(k0, k1)))
        return out


@dataclass(frozen=True)
class Selection:
    axes: tuple[_Axis, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the selected block before integer axes are dropped."""
        return tuple(a.size for a in self.axes)

    def finish(self, block: Any) -> Any:
        """Apply flips and drop integer axes on the block read in ascending order."""
        if not any(a.flip or a.drop for a in self.axes):
            return block
        flips = tuple(slice(None, None, -1) if a.flip else slice(None) for a in self.axes)
        block = block[flips]
        return block[tuple(0 if a.drop else slice(None) for a in self.axes)]


def _axis(index: Any, length: int, axis: int) -> _Axis:
    if isinstance(index, slice):
        start, stop, step = index.indices(length)
        if step > 0:
            return _Axis(start, max(start, stop), step, False, False)
        n = len(range(start, stop, step))
        lo = start + (n - 1) * step if n else 0
        return _Axis(lo, lo + (n - 1) * -step + 1 if n else 0, -step, True, False)
    try:
        i = int(index.__index__())
    except (AttributeError, TypeError):
        raise IndexError(
            f"only integers, slices and ... are supported for lazy reads, got {type(index).__name__}"
        ) from None
    if not -length <= i < length:
        raise IndexError(f"index {i} is out of bounds for axis {axis} with size {length}")
    i %= length
    return _Axis(i, i + 1, 1, False, True)


def normalize(selection: Any, shape: tuple[int, ...]) -> Selection:
    if not isinstance(selection, tuple):
        selection = (selection,)
    if sum(s is Ellipsis for s in selection) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if Ellipsis in selection:
        i = selection.index(Ellipsis)
        fill = (slice(None),) * (len(shape) - len(selection) + 1)
        selection = selection[:i] + fill + selection[i + 1 :]
    if len(selection) > len(shape):
        raise IndexError(
            f"too many indices: array is {len(shape)}-dimensional, {len(selection)} given"
        )
    selection = selection + (slice(None),) * (len(shape) - len(selection))
    return Selection(
        tuple(_axis(s, n, i) for i, (s, n) in enumerate(zip(selection, shape, strict=True)))
    )
