"""One leaf's Zarr v3 array: chunk grid, ``zarr.json``, and chunk encoding/decoding.

zarrckpt writes standard Zarr v3 arrays itself instead of going through zarr-python's
array API, which costs milliseconds of Python per array (see the README's format
section). Only a narrow subset is produced, and tests check that zarr-python and
TensorStore read every variant:

* a ``regular`` chunk grid whose chunks split the leading axes only, so that a chunk of a
  C-contiguous array is a contiguous slice of it (no gather on write, no scatter on read);
  except for arrays sharded over several processes, whose chunks divide the shards on
  whichever axes the sharding splits (``_sharding``), and which any reader must handle
  anyway (arrays written by other tools);
* the ``default`` chunk key encoding with ``.`` (``c.0.0``; ``c`` for a 0-d array), so a
  leaf's chunks sit beside its ``zarr.json`` and a small leaf costs one directory, not two;
* codecs ``bytes`` (little-endian), optionally ``zstd`` or ``gzip``, then ``crc32c`` on
  every chunk. Compression uses numcodecs (the codecs zarr-python itself calls), the
  checksum google-crc32c (zarr-python's own); nothing here reimplements a codec. Reads
  bound what decompression may produce to one chunk: zstd frames must declare the chunk's
  size, gzip streams are inflated by ``zlib`` with a limit.

Every chunk is written, also chunks equal to the fill value, so a missing chunk means
damage, not zeros.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import reprlib
import sys
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np

from . import _dtypes
from ._sharding import Shards, aligned_chunks
from .errors import CorruptCheckpointError

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "ArrayLayout",
    "default_codec",
    "encoded_bound",
    "parse_codec",
    "shown",
]

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("zarrckpt supports little-endian hosts only")

#: Target size of one chunk before compression. Measured on 1 GiB of float32 matrices read
#: cold from local disk: 8 MiB chunks 0.58-0.62 s, 32 MiB 0.45-0.62 s, 64 MiB 0.41-0.43 s,
#: one raw file 0.34-0.35 s. Larger chunks make lazy slices coarser; pass ``chunk_bytes``
#: to trade load speed for finer slicing. (Object stores default to 16 MiB: see ``_storage``.)
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024

#: codec name -> its default level (numcodecs is imported when a chunk is (de)compressed)
_COMPRESSORS = {"zstd": 1, "gzip": 5}

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 60, 60, 40


def shown(value: Any) -> str:
    """``value`` (read from a document) for a message: short, and shallow however deeply
    the document nests it."""
    return _REPR.repr(value)


def parse_codec(codec: str) -> str:
    """Normalise a codec spec (``"none"``, ``"zstd"``, ``"zstd:5"``, ``"gzip:6"``)."""
    name, _, level = codec.partition(":")
    if name in ("none", "raw") and not level:
        return "none"
    if name not in _COMPRESSORS:
        raise ValueError(
            f"unknown codec {codec!r}; expected 'none', 'zstd[:LEVEL]' or 'gzip[:LEVEL]'"
        )
    try:
        lvl = int(level) if level else _COMPRESSORS[name]
    except ValueError:
        raise ValueError(f"codec {codec!r}: the level must be an integer") from None
    return f"{name}:{lvl}"


@functools.cache
def _compressor(name: str, level: int) -> Any:
    """The numcodecs codec for ``name:level`` (stateless between calls: one is shared)."""
    import numcodecs

    return {"zstd": numcodecs.Zstd, "gzip": numcodecs.GZip}[name](level=level)


#: Leaves of at most this many bytes are stored uncompressed whatever their dtype: a zstd frame
#: costs ~10 bytes, so a scalar or a short counter only grows, and reading it back (``zarrckpt
#: tree`` shows ``epoch_i``) would import numcodecs for nothing
SMALL_LEAF_BYTES = 64


def default_codec(dtype: np.dtype, nbytes: int) -> str:
    """The codec used when none is given, for a leaf of ``nbytes`` bytes.

    Float weights and potentials are close to incompressible (zstd saves ~8% on float32
    noise and makes loading several times slower), while bool spikes and integer counters
    are mostly zeros and shrink by orders of magnitude with a fast zstd level.
    """
    return "zstd:1" if dtype.kind in "biu" and nbytes > SMALL_LEAF_BYTES else "none"


def encoded_bound(nbytes: int, compressed: bool) -> int:
    """The most bytes a chunk file of ``nbytes`` uncompressed bytes can hold: the payload
    and the 4-byte crc32c. Compressors expand incompressible data a little at worst (zstd's
    ``ZSTD_compressBound``: n/256 plus at most 64 bytes; deflate: 5 bytes per 16 KiB block
    plus an 18-byte gzip header and trailer), so ``n/4 + 4 KiB`` of room covers both. Reads
    refuse a larger file before reading it."""
    return nbytes + (nbytes // 4 + 4096 if compressed else 0) + 4


def chunk_shape(shape: tuple[int, ...], itemsize: int, chunk_bytes: int) -> tuple[int, ...]:
    """Chunks of at most ``chunk_bytes`` that split leading axes only, balanced in size."""
    chunks = [max(1, s) for s in shape]
    if math.prod(shape) == 0:  # no chunk is ever stored
        return tuple(chunks)
    for axis in range(len(shape)):
        inner = itemsize * math.prod(chunks[axis + 1 :])
        if inner * chunks[axis] <= chunk_bytes:
            break
        per_chunk = max(1, chunk_bytes // inner)
        n_chunks = math.ceil(chunks[axis] / per_chunk)
        chunks[axis] = math.ceil(chunks[axis] / n_chunks)  # equal chunks, less edge padding
        if inner <= chunk_bytes:
            break
    return tuple(chunks)


def _int_tuple(value: Any) -> Any:
    """A JSON list of integers as a tuple; anything else as it is (it compares unequal)."""
    if isinstance(value, list) and all(type(n) is int for n in value):
        return tuple(value)
    return value


_ABSENT = object()


def _canonical(value: Any) -> str:
    """A JSON value spelt one way (keys sorted), so that ``0`` and ``false`` differ."""
    if value is _ABSENT:
        return "nothing"
    return json.dumps(value, sort_keys=True, ensure_ascii=True)


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _zstd_content_size(frame: np.ndarray) -> int | None:
    """The decompressed size a zstd frame's header declares (RFC 8878, section 3.1.1.1),
    or None if it declares none (numcodecs always writes it)."""
    head = frame[:18].tobytes()
    if len(head) < 6 or head[:4] != _ZSTD_MAGIC:
        return None
    descriptor = head[4]
    single_segment = descriptor >> 5 & 1
    field = (single_segment, 2, 4, 8)[descriptor >> 6]
    start = 5 + (not single_segment) + (0, 1, 2, 4)[descriptor & 3]
    if not field or len(head) < start + field:
        return None
    size = int.from_bytes(head[start : start + field], "little")
    return size + 256 if field == 2 else size


def _codec_for(dtype: np.dtype, shape: tuple[int, ...], codec: str | None) -> str:
    return parse_codec(codec) if codec else default_codec(dtype, math.prod(shape) * dtype.itemsize)


@functools.lru_cache(maxsize=16384)  # (a save loop asks in a cycle: an LRU too small never hits)
def _layout_for(
    shape: tuple[int, ...], dtype: np.dtype, chunk_bytes: int, codec: str | None
) -> ArrayLayout:
    """The layout of an unsharded array (remembered: a state's thousands of leaves have a
    few shapes, and a save loop asks again for each)."""
    chunks = chunk_shape(shape, dtype.itemsize, chunk_bytes)
    return ArrayLayout(shape, dtype, chunks, _codec_for(dtype, shape, codec))


#: Layouts of at most this many chunks keep their chunk keys (:meth:`ArrayLayout.chunk_keys`)
KEPT_CHUNK_KEYS = 64


@dataclass(frozen=True, eq=False)
class ArrayLayout:
    """Shape, dtype, chunking and codec of one stored array."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    codec: str = "none"

    # (Equality by value, as a dataclass's; first by identity: ``_layout_for`` hands out one
    # object per layout, and a save compares each leaf's with the previous step's.)
    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if type(other) is not ArrayLayout:
            return NotImplemented
        return self._fields == other._fields

    def __hash__(self) -> int:
        return hash(self._fields)

    @functools.cached_property
    def _fields(self) -> tuple[Any, ...]:
        return (self.shape, self.dtype, self.chunks, self.codec)

    @classmethod
    def for_array(
        cls, array: np.ndarray | Shards, chunk_bytes: int | None = None, codec: str | None = None
    ) -> ArrayLayout:
        """The layout zarrckpt gives ``array``; the chunks of a sharded array divide its
        shards (see ``_sharding``)."""
        dtype = array.dtype.newbyteorder("=") if array.dtype.byteorder in "<>" else array.dtype
        chunk_bytes = chunk_bytes or DEFAULT_CHUNK_BYTES
        if isinstance(array, Shards):
            chunks = aligned_chunks(array, chunk_bytes)
            return cls(array.shape, dtype, chunks, _codec_for(dtype, array.shape, codec))
        return _layout_for(array.shape, dtype, chunk_bytes, parse_codec(codec) if codec else None)

    # --- index entries (the step record) -----------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "dtype": _dtypes.zarr_name(self.dtype),
            "chunks": list(self.chunks),
            "codec": self.codec,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "leaf") -> ArrayLayout:
        """The layout a leaf record describes, validated: a record may come from a stranger."""
        try:
            shape, chunks = tuple(data["shape"]), tuple(data["chunks"])
            dtype, codec = _dtypes.native_dtype(data["dtype"]), parse_codec(data["codec"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptCheckpointError(f"{where}: malformed leaf record ({exc})") from None
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in shape + chunks):
            raise CorruptCheckpointError(f"{where}: shape and chunks must be integers")
        if (
            len(shape) != len(chunks)
            or len(shape) > 64
            or any(s < 0 or not 1 <= c <= max(1, s) for s, c in zip(shape, chunks, strict=True))
            or math.prod(shape) * dtype.itemsize >= 2**62
        ):
            raise CorruptCheckpointError(
                f"{where}: impossible layout (shape {shape}, chunks {chunks}, {dtype})"
            )
        return cls(shape, dtype, chunks, codec)

    def check_zarr_json(self, doc: Any, where: str) -> None:
        """Refuse an array ``zarr.json`` that disagrees with this layout (from the record)."""
        try:
            if doc["zarr_format"] != 3 or doc["node_type"] != "array":
                raise TypeError("not a Zarr v3 array")
            found = (
                _int_tuple(doc["shape"]),
                doc["data_type"],
                _int_tuple(doc["chunk_grid"]["configuration"]["chunk_shape"]),
            )
        except (KeyError, TypeError) as exc:
            raise CorruptCheckpointError(f"{where}: malformed zarr.json ({exc})") from None
        expected = (self.shape, _dtypes.zarr_name(self.dtype), self.chunks)
        if found != expected:
            raise CorruptCheckpointError(
                f"{where}: the step record says shape {self.shape}, {expected[1]}, chunks "
                f"{self.chunks}; the array's zarr.json says shape {shown(found[0])}, "
                f"{shown(found[1])}, chunks {shown(found[2])}"
            )

    def check_whole_zarr_json(
        self, doc: Any, where: str, path: str, dims: list[str] | None = None
    ) -> None:
        """Refuse an array ``zarr.json`` that is not, field for field (but ``attributes``), the
        one the record implies (:meth:`zarr_json` of this layout, the leaf's ``path`` and ``dims``): other
        Zarr readers decode by it, so a codec, fill value or key encoding edited there makes
        them read other values than zarrckpt does. (Arrays written before
        ``dimension_names`` existed have none: its absence is accepted.)"""
        self.check_zarr_json(doc, where)
        implied = self.zarr_json(None, path, dims)
        if "dimension_names" not in doc:
            del implied["dimension_names"]
        # Not compared: attributes (other tools may add their own; they decode nothing) and
        # an empty storage_transformers list (zarr-python writes one when it rewrites).
        keys = (implied.keys() | doc.keys()) - {"attributes"}
        if doc.get("storage_transformers") == []:
            keys.discard("storage_transformers")
        differ = [
            key
            for key in sorted(keys)
            if _canonical(doc.get(key, _ABSENT)) != _canonical(implied.get(key, _ABSENT))
        ]
        if differ:
            key = differ[0]
            found = _canonical(doc.get(key, _ABSENT))[:300]
            wanted = _canonical(implied.get(key, _ABSENT))[:300]
            others = f" (and in {', '.join(map(repr, differ[1:]))})" if differ[1:] else ""
            raise CorruptCheckpointError(
                f"{where}: the array's zarr.json disagrees with the step record in {key!r}"
                f"{others}: it has {found}, the record implies {wanted}; other Zarr readers "
                "would decode it differently from zarrckpt"
            )

    # --- geometry ----------------------------------------------------------------------------

    # (Computed once per layout: layouts are immutable, and ``_layout_for`` hands the same
    # object to every leaf of a shape, save after save.)
    @functools.cached_property
    def grid(self) -> tuple[int, ...]:
        return tuple(math.ceil(s / c) for s, c in zip(self.shape, self.chunks, strict=True))

    @functools.cached_property
    def n_chunks(self) -> int:
        return math.prod(self.grid)

    @functools.cached_property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @functools.cached_property
    def chunk_nbytes(self) -> int:
        return math.prod(self.chunks) * self.dtype.itemsize

    @property
    def max_chunk_file_bytes(self) -> int:
        """The largest chunk file this layout can have (:func:`encoded_bound`)."""
        return encoded_bound(self.chunk_nbytes, self.codec != "none")

    def chunk_ids(self) -> Iterator[tuple[int, ...]]:
        """Every chunk's index, in C order (the last dimension's index fastest)."""
        return itertools.product(*map(range, self.grid))

    @staticmethod
    def chunk_key(idx: tuple[int, ...]) -> str:
        return ".".join(("c", *map(str, idx)))

    def chunk_keys(self) -> Sequence[tuple[tuple[int, ...], str]]:
        """Every chunk's ``(index, key)``, in C order; kept for layouts of a few chunks (a
        state's thousands of small leaves share a few layouts, saved again and again)."""
        if self.n_chunks <= KEPT_CHUNK_KEYS:
            return self._kept_chunk_keys
        return [(idx, self.chunk_key(idx)) for idx in self.chunk_ids()]

    @functools.cached_property
    def _kept_chunk_keys(self) -> tuple[tuple[tuple[int, ...], str], ...]:
        return tuple((idx, self.chunk_key(idx)) for idx in self.chunk_ids())

    def count_chunk_keys(self, names: Iterable[str]) -> int:
        """How many of ``names`` (a directory listing) are keys of this array's chunks."""
        grid = self.grid
        count = 0
        for name in names:
            parts = name.split(".")
            if parts[0] != "c" or len(parts) != len(grid) + 1:
                continue
            digits = parts[1:]
            if all(d.isascii() and d.isdigit() and (d == "0" or d[0] != "0") for d in digits):
                count += all(int(d) < n for d, n in zip(digits, grid, strict=True))
        return count

    def chunk_region(self, idx: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(
            slice(i * c, min((i + 1) * c, s))
            for i, c, s in zip(idx, self.chunks, self.shape, strict=True)
        )

    # --- zarr.json -----------------------------------------------------------------------------

    def codecs_json(self) -> list[dict[str, Any]]:
        codecs: list[dict[str, Any]] = [
            {"name": "bytes", "configuration": {"endian": "little"}}
            if self.dtype.itemsize > 1
            else {"name": "bytes"}
        ]
        if self.codec != "none":
            name, level = self.codec.split(":")
            config: dict[str, Any] = {"level": int(level)}
            if name == "zstd":
                config["checksum"] = False
            codecs.append({"name": name, "configuration": config})
        codecs.append({"name": "crc32c"})
        return codecs

    def dimension_names(self, path: str) -> list[str]:
        """``<path>_0``, ``<path>_1``, ... for the leaf stored at ``path`` in its step
        (``W_0``, ``net/l1/W_1``; none for a 0-d array).

        Leaf paths are unique and a trailing ``_<digits>`` splits a dimension name back into
        exactly one path and axis, so no two arrays of a step share a dimension: every group
        opens as an xarray ``Dataset``, and a whole step as a ``DataTree`` (which requires
        a dimension seen in a group and in one of its ancestors to have one size)."""
        return [f"{path}_{axis}" for axis in range(len(self.shape))]

    def zarr_json(
        self,
        attributes: dict[str, Any] | None = None,
        path: str | None = None,
        dims: list[str] | None = None,
    ) -> dict[str, Any]:
        """The array's ``zarr.json``: a pure function of the layout, ``attributes`` and the
        leaf's ``path`` in its step (a recycled save skips rewriting identical documents).
        With a path it carries ``dimension_names``: ``dims`` (the user's) or those of
        :meth:`dimension_names`."""
        doc: dict[str, Any] = {
            "zarr_format": 3,
            "node_type": "array",
            "shape": list(self.shape),
            "data_type": _dtypes.zarr_name(self.dtype),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(self.chunks)}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
            "fill_value": _dtypes.fill_value_json(self.dtype),
            "codecs": self.codecs_json(),
            "attributes": attributes or {},
        }
        if path is not None:
            doc["dimension_names"] = dims if dims is not None else self.dimension_names(path)
        return doc

    # --- chunks ------------------------------------------------------------------------------

    def chunk_data(self, array: np.ndarray, idx: tuple[int, ...]) -> np.ndarray:
        """The full-size, little-endian, C-contiguous chunk ``idx`` of ``array`` (edges padded)."""
        if self._stored_whole(array):
            return array
        region = self.chunk_region(idx)
        part = array[region]
        if part.dtype.byteorder == ">":
            part = part.astype(part.dtype.newbyteorder("<"))
        if part.shape == self.chunks and part.flags.c_contiguous:
            return part
        full = np.zeros(self.chunks, dtype=self.dtype)
        full[tuple(slice(0, r.stop - r.start) for r in region)] = part
        return full

    def _stored_whole(self, array: np.ndarray) -> bool:
        """Whether ``array`` is its one chunk as stored (most small leaves): C-contiguous,
        little-endian, one chunk of its whole shape; no region to slice out."""
        return (
            self.chunks == self.shape and array.flags.c_contiguous and array.dtype.byteorder != ">"
        )

    def _valid_is_prefix(self, region: tuple[slice, ...]) -> bool:
        """Whether a chunk's valid (unpadded) elements are a prefix of its C-order bytes."""
        valid = [r.stop - r.start for r in region]
        partial = [i for i, (v, c) in enumerate(zip(valid, self.chunks, strict=True)) if v < c]
        if not partial:
            return True
        first = partial[0]
        return all(c == 1 for c in self.chunks[:first]) and partial == [first]

    def chunk_view(self, array: np.ndarray, idx: tuple[int, ...]) -> tuple[np.ndarray, int] | None:
        """Chunk ``idx`` of ``array`` as (its bytes: a view, no copy; the number of zero
        bytes of padding after them), when :meth:`chunk_data` would be exactly these bytes
        followed by zeros; else None (a copy is needed)."""
        if self._stored_whole(array):
            raw = array.reshape(-1).view(np.uint8)
            return raw, self.chunk_nbytes - raw.size
        region = self.chunk_region(idx)
        part = array[region]
        if (
            part.dtype.byteorder != ">"
            and part.flags.c_contiguous
            and self._valid_is_prefix(region)
        ):
            raw = part.reshape(-1).view(np.uint8)
            return raw, self.chunk_nbytes - raw.size
        return None

    def encode_at(self, array: np.ndarray, idx: tuple[int, ...]) -> list[Any]:
        """Encoded chunk ``idx`` of ``array``; raw chunks are views of ``array`` (no copy),
        an edge chunk's padding a separate run of zeros."""
        view = self.chunk_view(array, idx) if self.codec == "none" else None
        if view is not None:
            raw, pad = view
            crc = google_crc32c.value(raw)
            if not pad:
                return [raw, crc.to_bytes(4, "little")]
            zeros = np.zeros(pad, dtype=np.uint8)
            return [raw, zeros, google_crc32c.extend(crc, zeros).to_bytes(4, "little")]
        return self.encode_chunk(self.chunk_data(array, idx))

    def encode_chunk(self, chunk: np.ndarray) -> list[Any]:
        """Encoded bytes of a chunk, as buffers to write one after the other."""
        raw = chunk.reshape(-1).view(np.uint8)
        if self.codec == "none":
            payload: Any = raw
        else:
            name, level = self.codec.split(":")
            payload = np.frombuffer(_compressor(name, int(level)).encode(raw), np.uint8)
        checksum = google_crc32c.value(payload)
        return [payload, checksum.to_bytes(4, "little")]

    def direct_destination(
        self, block: np.ndarray, parts: tuple[tuple[int, slice, slice], ...]
    ) -> np.ndarray | None:
        """The part of ``block`` a raw chunk can be read into directly, or None.

        That is possible when the codec is ``none`` and the selection takes the chunk's whole
        valid region: with leading-axis chunking the valid region is then a prefix of the
        chunk's bytes (only the last chunk is padded) and a contiguous run of ``block``.
        """
        if self.codec != "none" or not parts:
            return None
        idx = tuple(p[0] for p in parts)
        region = self.chunk_region(idx)
        for (_, inner, _), r in zip(parts, region, strict=True):
            if inner.start != 0 or inner.step != 1 or inner.stop != r.stop - r.start:
                return None
        dest = block[tuple(p[2] for p in parts)]
        return dest if dest.flags.c_contiguous else None

    def read_raw_into(self, read_into: Any, key: str, dest: np.ndarray, where: str) -> None:
        """Read a raw chunk into ``dest`` (its valid prefix) and verify its checksum."""
        valid = dest.reshape(-1).view(np.uint8)
        pad = np.empty(self.chunk_nbytes - valid.size, dtype=np.uint8)
        tail = bytearray(4)
        got = read_into(key, [valid, pad, tail])
        if got is None:
            raise CorruptCheckpointError(f"{where}: chunk is missing")
        if got != self.chunk_nbytes + 4:
            raise CorruptCheckpointError(
                f"{where}: chunk holds {got - 4} bytes, expected {self.chunk_nbytes}"
            )
        crc = google_crc32c.value(valid)
        if pad.size:
            crc = google_crc32c.extend(crc, pad)
        if crc != int.from_bytes(tail, "little"):
            raise CorruptCheckpointError(
                f"{where}: crc32c checksum mismatch (the chunk is damaged)"
            )

    def _decompress(self, payload: np.ndarray, where: str) -> bytes:
        """Decompress a chunk's payload without ever producing more than one chunk's bytes
        (plus one, to tell a chunk that holds too much): a small file must not make the
        reader allocate what its header or its content claims (a decompression bomb)."""
        name = self.codec.split(":")[0]
        try:
            if name == "zstd":
                declared = _zstd_content_size(payload)
                if declared != self.chunk_nbytes:
                    raise CorruptCheckpointError(
                        f"{where}: cannot decompress (the zstd frame declares "
                        f"{'no size' if declared is None else f'{declared} bytes'}, the chunk "
                        f"holds {self.chunk_nbytes})"
                    )
                return bytes(_compressor("zstd", 1).decode(payload))  # allocates what it declares
            stream = zlib.decompressobj(zlib.MAX_WBITS | 16)  # gzip, one member
            raw = stream.decompress(payload.data, self.chunk_nbytes + 1)
            if len(raw) <= self.chunk_nbytes and (not stream.eof or stream.unused_data):
                raise CorruptCheckpointError(
                    f"{where}: cannot decompress (the gzip stream is truncated or followed "
                    "by other data)"
                )
            return raw
        except CorruptCheckpointError:
            raise
        except Exception as exc:
            raise CorruptCheckpointError(f"{where}: cannot decompress ({exc})") from None

    def decode_chunk(self, data: bytes | bytearray | memoryview, where: str) -> np.ndarray:
        """A chunk-shaped array from encoded bytes; damage raises naming ``where``."""
        buf = np.frombuffer(data, dtype=np.uint8)
        if buf.size < 4:
            raise CorruptCheckpointError(f"{where}: chunk is truncated ({buf.size} bytes)")
        payload = buf[:-4]
        stored = int.from_bytes(buf[-4:].tobytes(), "little")
        if google_crc32c.value(payload) != stored:
            raise CorruptCheckpointError(
                f"{where}: crc32c checksum mismatch (the chunk is damaged)"
            )
        if self.codec != "none":
            payload = np.frombuffer(self._decompress(payload, where), dtype=np.uint8)
        if payload.size != self.chunk_nbytes:
            raise CorruptCheckpointError(
                f"{where}: chunk holds {payload.size} bytes, expected {self.chunk_nbytes}"
            )
        return payload.view(self.dtype).reshape(self.chunks)  # native order is little-endian
