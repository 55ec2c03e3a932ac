"""The ``zarrckpt`` command line: look into, check, compare, copy and convert checkpoints.

::

    zarrckpt ls URL                          committed steps: number, time, leaves, bytes
    zarrckpt tree URL [PATH] [--step N]      the tree, with shape/dtype/size/chunks/codec per leaf
    zarrckpt info URL [PATH] [--stats]       totals of a step or sub-tree; one leaf's layout
    zarrckpt cat URL PATH [--slice 0:10,::2] a leaf's values (--json: a nested list)
    zarrckpt verify URL [--step N | --all]   read every chunk of every leaf, checking its crc32c
    zarrckpt diff URL[@N] URL[@N]            added / removed / changed leaves between two steps
    zarrckpt gc URL [--dry-run]              delete what interrupted saves left, abandoned spares
    zarrckpt cp SRC DST [--step N]           copy steps from any URL to any URL, byte for byte
    zarrckpt convert OLD.bp DST              a BrainPy / braintools msgpack file -> a new step

Every command takes ``--json`` (one JSON document on stdout) and ``-o KEY=VALUE`` fsspec
storage options for remote URLs (the value is parsed as JSON when it can be: ``-o anon=true``,
``-o 'client_kwargs={"region_name": "eu-west-1"}'``; else it is a string). Progress bars go to
stderr when it is a terminal (``-q`` turns them off).

Exit status: 0 success; 1 a check failed (``verify`` found damage; ``diff --exit-code`` found
differences: plain ``diff`` exits 0 whenever it ran, as ``git diff`` does); 2 usage errors and
every error zarrckpt reports (no checkpoint, no such step or path, store errors), printed as one
line ``zarrckpt: error: ...`` without a traceback.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import json
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._progress import human as _human
from .errors import (
    AlreadyExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    ZarrCkptError,
)

if TYPE_CHECKING:
    import numpy as np

    from ._format import ArrayLayout
    from ._read import OpenStep
    from ._storage import Storage
    from .checkpoint import Checkpoint, LazyArray, LeafInfo

# Commands import what they use when they run: ``ls`` reads two small JSON documents and
# should not pay for NumPy, zarr or ml_dtypes (issue 17: ``zarrckpt ls`` within 0.3 s).

__all__ = ["main"]

#: Bytes held in memory at once by ``verify`` and ``diff``; a leaf
#: bigger than this is read in slabs of whole chunks.
BATCH_BYTES = 256 * 1024 * 1024


class UsageError(Exception):
    """A request that cannot be carried out as asked (exit status 2)."""


# --- small helpers ------------------------------------------------------------------------------


def _iso(timestamp: float) -> str:
    when = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def _shape(shape: Sequence[int]) -> str:
    return "×".join(map(str, shape)) or "scalar"


def _protocol(url: str) -> str | None:
    """``url``'s protocol as fsspec reads it (``fsspec.core.split_protocol``, without
    importing fsspec): ``s3`` of ``s3://b/k``, ``simplecache::s3`` of a chained URL."""
    protocol, sep, _ = url.partition("://")
    if sep and len(protocol) > 1:  # C://... is a Windows path
        return protocol
    return "data" if url.startswith("data:") else None


def _is_remote(url: str) -> bool:
    return _protocol(url) not in (None, "file", "local")


def _storage_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _options(args: argparse.Namespace, url: str, side: str = "") -> dict[str, Any] | None:
    """fsspec options for ``url``: ``-o`` ones, then ``--src-option``/``--dst-option`` ones."""
    if not _is_remote(url):
        return None
    options = dict(args.storage_option)
    options.update(getattr(args, f"{side}_option", None) or [])
    return options or None


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _bar(args: argparse.Namespace, total: int, desc: str) -> Any:
    from ._progress import bar_class

    return bar_class()(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, delay=0.5,
        leave=False, disable=not _progress(args), file=sys.stderr,
    )  # fmt: skip


def _print_json(doc: Any, indent: int | None = 1) -> None:
    print(json.dumps(doc, indent=indent, ensure_ascii=False))


def _leaves(n: int) -> str:
    return f"{n} leaf" if n == 1 else f"{n} leaves"


def _open(args: argparse.Namespace, url: str, step: int | None, side: str = "") -> OpenStep:
    from ._read import open_step

    opened = open_step(url, step, _options(args, url, side))
    if opened is None:
        raise CheckpointNotFoundError(f"no checkpoint at {url}")
    return opened


def _leaf_records(opened: OpenStep) -> list[dict[str, Any]]:
    from . import _tree

    return list(_tree.iter_leaf_records(opened.record))


def _layouts(records: list[dict[str, Any]]) -> dict[str, ArrayLayout]:
    from ._format import ArrayLayout

    return {rec["path"]: ArrayLayout.from_json(rec, f"leaf {rec['path']!r}") for rec in records}


def _nchunks(layout: ArrayLayout) -> int:
    return math.prod(layout.grid) if layout.shape else 1


# --- reading many leaves with bounded memory ----------------------------------------------------

#: (leaf path, region of it as (start, stop) per axis, or None for the whole leaf)
Piece = tuple[str, tuple[tuple[int, int], ...] | None]


def _plan(layouts: dict[str, ArrayLayout], limit: int | None = None) -> Iterator[list[Piece]]:
    """Batches of pieces holding at most ``limit`` bytes (default :data:`BATCH_BYTES`); a
    bigger leaf comes in slabs of whole chunk rows (chunks split leading axes only, so a
    slab is a run of chunks)."""
    limit = BATCH_BYTES if limit is None else limit
    batch: list[Piece] = []
    held = 0
    for path, layout in layouts.items():
        if layout.nbytes <= limit:
            if batch and held + layout.nbytes > limit:
                yield batch
                batch, held = [], 0
            batch.append((path, None))
            held += layout.nbytes
            continue
        row = layout.nbytes // layout.shape[0]
        rows = max(layout.chunks[0], limit // row // layout.chunks[0] * layout.chunks[0])
        for start in range(0, layout.shape[0], rows):
            rest = ((0, n) for n in layout.shape[1:])
            region = ((start, min(start + rows, layout.shape[0])), *rest)
            yield [(path, region)]
    if batch:
        yield batch


def _read_pieces(
    opened: OpenStep, layouts: dict[str, ArrayLayout], pieces: list[Piece],
    progress: Callable[[int], None],
) -> dict[Piece, np.ndarray]:  # fmt: skip
    """The values of ``pieces`` (every chunk checksummed on the way)."""
    from ._engine import read_leaves, read_selections
    from ._indexing import normalize
    from ._read import fetch

    whole = {path: layouts[path] for path, region in pieces if region is None}
    parts = {
        path: (layouts[path], normalize(tuple(slice(*r) for r in region), layouts[path].shape))
        for path, region in pieces
        if region is not None
    }
    out: dict[Piece, np.ndarray] = {}
    storage, step_dir = opened.storage, opened.info.dir
    if whole:
        arrays = fetch(opened, read_leaves(storage, step_dir, whole, progress))
        out.update(((path, None), array) for path, array in arrays.items())
    if parts:
        arrays = fetch(opened, read_selections(storage, step_dir, parts, progress))
        out.update(((p, r), arrays[p]) for p, r in pieces if r is not None)
    return out


def _read_batch(
    opened: OpenStep, layouts: dict[str, ArrayLayout], batch: list[Piece],
    progress: Callable[[int], None], damaged: dict[str, str],
) -> dict[Piece, np.ndarray]:  # fmt: skip
    """The pieces of ``batch`` whose leaf is not in ``damaged``; a leaf that fails to read is
    added to ``damaged`` (path -> error) and the others are still read."""
    batch = [piece for piece in batch if piece[0] not in damaged]
    if not batch:
        return {}
    try:
        return _read_pieces(opened, layouts, batch, progress)
    except CorruptCheckpointError as exc:
        if len(batch) == 1:
            damaged[batch[0][0]] = str(exc)
            return {}
    got: dict[Piece, np.ndarray] = {}
    for piece in batch:  # find the culprits one by one
        try:
            got.update(_read_pieces(opened, layouts, [piece], progress))
        except CorruptCheckpointError as exc:
            damaged[piece[0]] = str(exc)
    return got


async def _check_zarr_jsons(
    opened: OpenStep, layouts: dict[str, ArrayLayout], dims: dict[str, Any]
) -> dict[str, str]:
    """Each leaf's own ``zarr.json`` (what zarr-python and TensorStore read) against the
    document the record implies, whole (``dims``: the record's dimension names per leaf)."""
    import asyncio

    from ._manifest import METADATA_MAX_BYTES, parse_json

    limit = asyncio.Semaphore(64)
    errors: dict[str, str] = {}

    async def check(path: str, layout: ArrayLayout) -> None:
        key = f"{opened.info.dir}/{path}/zarr.json"
        where = f"leaf {path!r} ({opened.storage.describe(key)})"
        try:
            async with limit:
                data = await opened.storage.get(key, METADATA_MAX_BYTES)
            if data is None:
                raise CorruptCheckpointError(f"{where}: the array's zarr.json is missing")
            doc = parse_json(data, where, "zarr.json")
            layout.check_whole_zarr_json(doc, where, path, dims.get(path))
        except CorruptCheckpointError as exc:
            errors[path] = str(exc)

    await asyncio.gather(*(check(p, lay) for p, lay in layouts.items()))
    return errors


# --- ls -----------------------------------------------------------------------------------------


def _cmd_ls(args: argparse.Namespace) -> int:
    from ._commit import read_manifest
    from ._storage import open_storage
    from ._sync import run

    storage = open_storage(args.url, _options(args, args.url), read_only=True)
    if storage.is_file():
        raise CorruptCheckpointError(
            f"{storage.url} is a file, not a zarrckpt checkpoint (a .bp file? see "
            "`zarrckpt convert`)"
        )
    manifest = run(read_manifest(storage))
    if manifest is None:
        raise CheckpointNotFoundError(f"no checkpoint at {storage.url}")
    steps: list[dict[str, Any]] = [
        {"step": s.step, "time": _iso(s.time), "leaves": s.leaves, "nbytes": s.nbytes, "dir": s.dir}
        for s in manifest.steps
    ]
    if args.json:
        _print_json({"url": storage.url, "steps": steps})
        return 0
    if not steps:
        print(f"{storage.url}: no committed steps")
        return 0
    width = max(4, len(str(steps[-1]["step"])))
    print(f"{'step':>{width}}  {'time (UTC)':<20}  {'leaves':>7}  {'size':>10}")
    for s in steps:
        print(f"{s['step']:>{width}}  {s['time']:<20}  {s['leaves']:>7}  {_human(s['nbytes']):>10}")
    return 0


class _Version(argparse.Action):
    """``--version``, reading the installed version (importlib.metadata, ~30 ms) only when asked."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        import zarrckpt

        print(f"zarrckpt {zarrckpt.__version__}")  # to stdout, as argparse's own action does
        parser.exit()


# --- tree / info / cat ----------------------------------------------------------------------------


def _leaf_json(info: Any, rec: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A leaf as ``--json`` shows it: its layout, and its value (``str``, ``bytes`` and
    Python scalars, see :func:`_small_values`) or unit (a Quantity) where it has one."""
    doc = {
        "path": info.path, "shape": list(info.shape), "dtype": str(info.dtype),
        "nbytes": info.nbytes, "chunks": list(info.chunks), "codec": info.codec, "kind": info.kind,
    }  # fmt: skip
    if info.path in values:
        doc["value"] = _json_value(values[info.path])
    if rec.get("kind") == "quantity":
        doc["unit"] = _unit_text(rec.get("unit"))
    return doc


#: Leaf kinds that ``tree`` and ``info`` show by their value, not by how they are stored
#: (a ``str`` is a uint8 array of its UTF-8 bytes)
_VALUE_KINDS = ("str", "bytes", "py")
#: ... when they hold at most this many bytes (a longer text is shown by its size)
_VALUE_BYTES = 4096
#: Characters of a value shown on a line
_VALUE_CHARS = 60
#: SI base units, in the order of a brainunit dimension (``_leaves._unit_record``'s ``dim``)
_SI = ("m", "kg", "s", "A", "K", "mol", "cd")


def _small_values(opened: OpenStep, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Leaf path -> value of the ``str``, ``bytes`` and Python-scalar leaves among
    ``records`` that hold at most ``_VALUE_BYTES`` (read at once, checksummed)."""
    from . import _leaves

    wanted = [r for r in records if r.get("kind") in _VALUE_KINDS]
    layouts = {p: lay for p, lay in _layouts(wanted).items() if lay.nbytes <= _VALUE_BYTES}
    if not layouts:
        return {}
    got = _read_pieces(opened, layouts, [(p, None) for p in layouts], lambda n: None)
    out: dict[str, Any] = {}
    for rec in wanted:
        array = got.get((rec["path"], None))
        if array is None:
            continue
        if rec["kind"] == "str":  # a stranger's bytes: shown, never refused
            out[rec["path"]] = array.tobytes().decode("utf-8", errors="replace")
        else:
            out[rec["path"]] = _leaves.decode(rec, array)
    return out


def _value_text(rec: dict[str, Any], values: dict[str, Any], nbytes: int) -> str:
    """A ``str``/``bytes``/Python-scalar leaf as one line: ``'run-a'  [str]``."""
    kind = rec.get("pytype", rec["kind"]) if rec["kind"] == "py" else rec["kind"]
    return f"{_value_repr(rec, values, nbytes)}  [{kind}]"


def _value_repr(rec: dict[str, Any], values: dict[str, Any], nbytes: int) -> str:
    if rec["path"] not in values:  # too long to show
        return f"({_human(nbytes)} of {'text' if rec['kind'] == 'str' else rec['kind']})"
    text = repr(values[rec["path"]])
    return text if len(text) <= _VALUE_CHARS else text[: _VALUE_CHARS - 1] + "…"


def _unit_text(unit: Any) -> str:
    """A recorded brainunit unit (``_leaves._unit_record``) as text: its display name, or
    else its scale and SI dimensions (``10^-3 m^2 kg``); ``1`` for a dimensionless one."""
    if not isinstance(unit, dict):
        return "?"
    for name in ("dispname", "name"):
        if isinstance(unit.get(name), str) and unit[name]:
            return unit[name]
    parts = []
    scale, factor = unit.get("scale"), unit.get("factor")
    if isinstance(factor, (int, float)) and factor != 1:
        parts.append(f"{factor:g}")
    if isinstance(scale, int) and scale:
        parts.append(f"10^{scale}")
    dims = unit.get("dim")
    for symbol, power in zip(_SI, dims if isinstance(dims, list) else [], strict=False):
        if isinstance(power, (int, float)) and power:
            parts.append(symbol if power == 1 else f"{symbol}^{power:g}")
    return " ".join(parts) or "1"


def _kind_text(rec: dict[str, Any]) -> str:
    """The ``[kind]`` tag of an array leaf (none for plain NumPy and JAX arrays)."""
    kind = rec.get("kind", "ndarray")
    if kind in ("ndarray", "jax"):
        return ""
    if kind == "quantity":
        return f"  [quantity {_unit_text(rec.get('unit'))}]"
    return f"  [{kind}]"


def _node(args: argparse.Namespace) -> tuple[OpenStep, Checkpoint, Any]:
    """(the open step, its checkpoint view, the view or lazy array at ``args.path``)."""
    from .checkpoint import Checkpoint

    opened = _open(args, args.url, args.step)
    ckpt = Checkpoint(opened)
    return opened, ckpt, (ckpt[args.path] if args.path else ckpt)


def _leaf_info(opened: OpenStep, array: LazyArray) -> LeafInfo:
    from .checkpoint import LeafInfo

    rec = next(r for r in _leaf_records(opened) if r["path"] == array.path)
    kind = rec.get("kind", "ndarray")
    return LeafInfo(array.path, array.shape, array.dtype, array.chunks, array.codec, kind)


def _cmd_tree(args: argparse.Namespace) -> int:
    from .checkpoint import LazyArray

    opened, ckpt, node = _node(args)
    if isinstance(node, LazyArray):
        leaves = [_leaf_info(opened, node)]
        tree: Any = node.path
    else:
        leaves = node.leaves()
        tree = node.tree()
    shown = {leaf.path for leaf in leaves}
    records = {r["path"]: r for r in _leaf_records(opened) if r["path"] in shown}
    values = _small_values(opened, list(records.values()))
    if args.json:

        def paths(sub: Any, prefix: str) -> Any:
            if isinstance(sub, dict):
                return {k: paths(v, f"{prefix}/{k}" if prefix else k) for k, v in sub.items()}
            return None if sub is None else sub.path

        _print_json({
            "location": ckpt.location, "step": ckpt.step, "path": args.path or "",
            "tree": paths(tree, "") if isinstance(tree, dict) else tree,
            "leaves": [_leaf_json(leaf, records[leaf.path], values) for leaf in leaves],
        })  # fmt: skip
        return 0
    title = ckpt.location + (f" :: {args.path}" if args.path else "")
    print(
        f"{title} (step {ckpt.step}): {_leaves(len(leaves))}, {_human(sum(x.nbytes for x in leaves))}"
    )
    rows: list[tuple[str, Any]] = []

    def walk(sub: dict[str, Any], indent: str) -> None:
        for name, child in sub.items():
            if isinstance(child, dict):
                rows.append((f"{indent}{name}/", None))
                walk(child, indent + "  ")
            else:
                rows.append((f"{indent}{name}", child if child is not None else "None"))

    if isinstance(tree, dict):
        walk(tree, "")
    else:
        rows.append((args.path, leaves[0]))
    width = max((len(name) for name, leaf in rows if leaf is not None), default=0)
    for name, leaf in rows:
        if leaf is None:
            print(name)
        elif isinstance(leaf, str):
            print(f"{name:<{width}}  {leaf}")
        elif records[leaf.path].get("kind") in _VALUE_KINDS:
            print(f"{name:<{width}}  {_value_text(records[leaf.path], values, leaf.nbytes)}")
        else:
            print(
                f"{name:<{width}}  {_shape(leaf.shape):>12} {leaf.dtype!s:<9} "
                f"{_human(leaf.nbytes):>10}  chunks {_shape(leaf.chunks)}  {leaf.codec}"
                f"{_kind_text(records[leaf.path])}"
            )
    return 0


def _totals(leaves: list[Any]) -> dict[str, Any]:
    codecs: dict[str, int] = {}
    dtypes: dict[str, int] = {}
    for leaf in leaves:
        codecs[leaf.codec] = codecs.get(leaf.codec, 0) + 1
        dtypes[str(leaf.dtype)] = dtypes.get(str(leaf.dtype), 0) + 1
    chunks = sum(
        math.prod(math.ceil(s / c) for s, c in zip(leaf.shape, leaf.chunks, strict=True))
        for leaf in leaves
    )
    return {
        "leaves": len(leaves), "nbytes": sum(leaf.nbytes for leaf in leaves), "nchunks": chunks,
        "codecs": codecs, "dtypes": dtypes,
    }  # fmt: skip


def _cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import LazyArray

    opened, ckpt, node = _node(args)
    doc: dict[str, Any] = {"location": ckpt.location, "step": ckpt.step}
    if not args.path:
        doc.update(time=_iso(opened.info.time), steps=opened.manifest.step_numbers)
    hidden: set[str] = set()  # what the text leaves out (the JSON has it)
    value_text = ""
    if isinstance(node, LazyArray):
        rec = next(r for r in _leaf_records(opened) if r["path"] == node.path)
        values = _small_values(opened, [rec])
        doc.update(_leaf_json(_leaf_info(opened, node), rec, values))
        doc["nchunks"] = _totals([_leaf_info(opened, node)])["nchunks"]
        if rec.get("kind") in _VALUE_KINDS:  # shown by its value, not as a uint8 array
            hidden = {"shape", "dtype"}
            value_text = _value_repr(rec, values, node.nbytes)
        if args.stats:
            doc["stats"] = node.stats()
    else:
        if args.stats:
            raise UsageError(f"--stats takes a leaf; {args.path or 'the root'!r} is a sub-tree")
        doc.update({"path": node.path} if node.path else {}, **_totals(node.leaves()))
    if args.json:
        _print_json(doc)
        return 0
    for key, value in doc.items():
        if key in hidden:
            continue
        if key == "value":
            value = value_text
        elif key == "nbytes":
            value = f"{value} ({_human(value)})"
        elif key in ("shape", "chunks"):
            value = _shape(value)
        elif isinstance(value, dict):
            value = ", ".join(
                f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v}" for k, v in value.items()
            )
        print(f"{key + ':':<10} {value}")
    return 0


def parse_slice(text: str) -> tuple[Any, ...]:
    """``"0:10,::2"`` -> ``(slice(0, 10), slice(None, None, 2))``; ints and ``...`` too."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    out: list[Any] = []
    for item in (s.strip() for s in text.split(",")):
        try:
            if item == "...":
                out.append(Ellipsis)
            elif ":" in item:
                bounds = item.split(":")
                if len(bounds) > 3:
                    raise ValueError
                out.append(slice(*(int(b) if b.strip() else None for b in bounds)))
            else:
                out.append(int(item))
        except ValueError:
            raise UsageError(
                f"bad --slice {text!r}: expected comma-separated ints, start:stop:step or ..."
            ) from None
    return tuple(out)


def _finite(x: float) -> Any:
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _json_array(array: np.ndarray) -> Any:
    """A nested list; complex numbers as [re, im]; nan/inf as strings (JSON has none)."""
    import numpy as np

    if array.dtype.kind not in "biufc":  # ml_dtypes: bfloat16, float8_*, int4, ...
        array = array.astype(np.int64 if "int" in array.dtype.name else np.float64)
    if array.dtype.kind == "c":
        array = np.stack([array.real, array.imag], axis=-1)
    values = array.tolist()

    def fix(v: Any) -> Any:
        if isinstance(v, list):
            return [fix(x) for x in v]
        return _finite(v) if isinstance(v, float) else v

    return fix(values) if array.dtype.kind in "fc" else values


def _json_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, complex):
        return [_finite(value.real), _finite(value.imag)]
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, (str, int)):  # bool too
        return value
    import numpy as np

    if isinstance(value, (np.ndarray, np.generic)):
        return _json_array(np.asarray(value))
    if hasattr(value, "mantissa") and hasattr(value, "unit"):  # a brainunit Quantity
        return {"mantissa": _json_value(np.asarray(value.mantissa)), "unit": str(value.unit)}
    return value


def _cmd_cat(args: argparse.Namespace) -> int:
    import numpy as np

    from .checkpoint import LazyArray

    selection = parse_slice(args.slice) if args.slice is not None else None
    _, _, node = _node(args)
    if not isinstance(node, LazyArray):
        raise UsageError(
            f"{args.path!r} is a sub-tree of {len(node.leaves())} leaves; cat shows one leaf "
            "(see `zarrckpt tree`)"
        )
    try:
        value = node.load() if selection is None else node[selection]
    except IndexError as exc:
        raise UsageError(f"--slice {args.slice!r}: {exc}") from None
    if args.json:
        _print_json(_json_value(value), indent=None)
        return 0
    with np.printoptions(threshold=sys.maxsize if args.full else 1000):
        print(value)
    return 0


# --- verify -------------------------------------------------------------------------------------


@dataclass
class _StepCheck:
    step: int
    leaves: int = 0
    nbytes: int = 0
    chunks: int = 0
    damaged: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # the step itself (its record) is damaged
    #: a newer commit dropped the step while it was being verified (a race, not damage)
    dropped: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.damaged

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step, "ok": self.ok, "dropped": self.dropped, "leaves": self.leaves,
            "nbytes": self.nbytes, "chunks": self.chunks, "error": self.error,
            "damaged": [{"path": p, "error": e} for p, e in self.damaged.items()],
        }  # fmt: skip


def verify_step(storage: Storage, step: int, progress: Callable[[int], None]) -> _StepCheck:
    """Read every chunk of every leaf of ``step`` (checking each crc32c) and each leaf's
    ``zarr.json``; damage is collected per leaf, not raised.

    A step that a newer commit drops meanwhile (a save loop's retention) is reported as
    ``dropped``, never as damaged: every read is confirmed afterwards (``_read.fetch``), and
    damage is reported only of a step that the newest manifest still lists.
    """
    from ._read import check_alive, fetch, open_step

    check = _StepCheck(step)
    try:
        opened = open_step(storage, step)
    except CorruptCheckpointError as exc:
        check.error = str(exc)
        return check
    except CheckpointNotFoundError:  # listed when verify began, dropped since
        check.dropped = True
        return check
    assert opened is not None
    records = _leaf_records(opened)
    layouts = _layouts(records)
    check.leaves = len(layouts)
    check.nbytes = sum(layout.nbytes for layout in layouts.values())
    check.chunks = sum(_nchunks(layout) for layout in layouts.values())
    dims = {rec["path"]: rec.get("dims") for rec in records}
    try:
        check.damaged.update(fetch(opened, _check_zarr_jsons(opened, layouts, dims)))
        for batch in _plan(layouts):
            _read_batch(opened, layouts, batch, progress, check.damaged)  # reading is the check
        if check.damaged:
            check_alive(opened)  # damage of a step deleted meanwhile (object stores) is a race
    except CheckpointNotFoundError:
        check.dropped = True
        check.damaged.clear()
        return check
    check.damaged = {p: check.damaged[p] for p in layouts if p in check.damaged}
    return check


def _verify_latest(storage: Storage, progress: Callable[[int], None]) -> _StepCheck:
    """Verify the latest step; if a newer commit drops it meanwhile, the newer latest."""
    from ._commit import read_manifest
    from ._read import OPEN_ATTEMPTS
    from ._sync import run

    for _ in range(OPEN_ATTEMPTS):
        manifest = run(read_manifest(storage))
        if manifest is None or not manifest.steps:
            raise CheckpointNotFoundError(f"no checkpoint at {storage.url}")
        check = verify_step(storage, manifest.steps[-1].step, progress)
        if not check.dropped:
            return check
    raise CheckpointNotFoundError(
        f"{storage.url}: the latest step was dropped by a newer commit while it was being "
        f"verified, {OPEN_ATTEMPTS} times in a row; verify a step of a root no longer saved "
        "into, or a step kept by retention (--step N)"
    )


def _cmd_verify(args: argparse.Namespace) -> int:
    from ._commit import read_manifest
    from ._storage import open_storage
    from ._sync import run

    storage = open_storage(args.url, _options(args, args.url), read_only=True)
    manifest = run(read_manifest(storage))
    if manifest is None or not manifest.steps:
        raise CheckpointNotFoundError(f"no checkpoint at {storage.url}")
    if args.all:
        steps = manifest.steps
    elif args.step is not None:
        found = manifest.get(args.step)
        if found is None:
            raise CheckpointNotFoundError(
                f"step {args.step} is not committed at {storage.url}; committed steps: "
                f"{manifest.step_numbers}"
            )
        steps = (found,)
    else:
        steps = (manifest.steps[-1],)
    checks = []
    with _bar(args, sum(s.nbytes for s in steps), "verify") as bar:
        if not args.all and args.step is None:
            checks.append(_verify_latest(storage, bar.update))
        else:
            for info in steps:
                checks.append(verify_step(storage, info.step, bar.update))
                if checks[-1].dropped and not args.all:
                    raise CheckpointNotFoundError(
                        f"step {info.step} of {storage.url} was dropped by a newer commit "
                        "(retention or overwrite) while it was being verified"
                    )
    ok = all(c.ok for c in checks)
    if args.json:
        _print_json({"url": storage.url, "ok": ok, "steps": [c.to_json() for c in checks]})
        return 0 if ok else 1
    for c in checks:
        head = f"step {c.step}: {_leaves(c.leaves)}, {_human(c.nbytes)}, {c.chunks} chunks"
        if c.dropped:
            print(f"step {c.step}: dropped by a newer commit while being verified (not checked)")
        elif c.error:
            print(f"step {c.step}: DAMAGED: {c.error}")
        elif c.damaged:
            print(f"{head}: DAMAGED ({len(c.damaged)} of {c.leaves} leaves)")
            for path, error in c.damaged.items():
                print(f"  {path}: {error}")
        else:
            print(f"{head}: ok")
    bad = sum(not c.ok for c in checks)
    dropped = sum(c.dropped for c in checks)
    checked = len(checks) - dropped
    gone = f" ({dropped} dropped by newer commits while being verified)" if dropped else ""
    print(f"{'ok' if ok else 'DAMAGED'}: {checked - bad} of {checked} steps intact{gone}")
    return 0 if ok else 1


# --- diff ---------------------------------------------------------------------------------------


def _split_step(text: str) -> tuple[str, int | None]:
    match = re.fullmatch(r"(.+)@(\d+)", text)
    return (match.group(1), int(match.group(2))) if match else (text, None)


@dataclass
class _Change:
    path: str
    reasons: list[str] = field(default_factory=list)
    text: bool = False  # a str/bytes leaf: no numeric difference
    max_abs_diff: float | None = None
    n_different: int | None = None

    def to_json(self) -> dict[str, Any]:
        worst = None if self.max_abs_diff is None else _finite(self.max_abs_diff)
        return {
            "path": self.path, "reasons": self.reasons, "max_abs_diff": worst,
            "n_different": self.n_different,
        }  # fmt: skip


def _compare(a: np.ndarray, b: np.ndarray, change: _Change) -> None:
    """Accumulate the element differences of two same-shape, same-dtype pieces."""
    import numpy as np

    if a.reshape(-1).view(np.uint8).tobytes() == b.reshape(-1).view(np.uint8).tobytes():
        return
    if "values" not in change.reasons:
        change.reasons.append("values")
    if change.text:
        return
    if a.dtype.kind == "b":
        n = int(np.count_nonzero(a != b))
        worst = 1.0 if n else 0.0
    else:
        wide = np.complex128 if a.dtype.kind == "c" else np.float64
        x, y = np.atleast_1d(a.astype(wide)), np.atleast_1d(b.astype(wide))
        d = np.abs(x - y)
        d[np.isnan(x) & np.isnan(y)] = 0.0
        n = int(np.count_nonzero(d))  # nan counts: it is not zero
        worst = float(np.max(d)) if d.size else 0.0  # nan where one side only is nan
    change.n_different = (change.n_different or 0) + n
    prev = change.max_abs_diff
    change.max_abs_diff = worst if prev is None or not worst <= prev else prev


def _classify(path: str, ra: dict[str, Any], rb: dict[str, Any], la: ArrayLayout,
              lb: ArrayLayout) -> tuple[_Change, bool]:  # fmt: skip
    """What differs in a leaf's record, and whether its values can be compared."""
    change = _Change(path)
    kind_a, kind_b = ra.get("kind", "ndarray"), rb.get("kind", "ndarray")
    if kind_a != kind_b:
        change.reasons.append(f"kind {kind_a} -> {kind_b}")
    if ra.get("unit") != rb.get("unit"):
        change.reasons.append("unit")
    change.text = kind_a in ("str", "bytes") or kind_b in ("str", "bytes")
    if change.text and la.shape != lb.shape:
        change.reasons.append("values")  # strings of different lengths
        return change, False
    if la.shape != lb.shape:
        change.reasons.append(f"shape {la.shape} -> {lb.shape}")
    if la.dtype != lb.dtype:
        change.reasons.append(f"dtype {la.dtype} -> {lb.dtype}")
    return change, la.shape == lb.shape and la.dtype == lb.dtype


def _cmd_diff(args: argparse.Namespace) -> int:
    (url_a, step_a), (url_b, step_b) = _split_step(args.a), _split_step(args.b)
    a, b = _open(args, url_a, step_a, "src"), _open(args, url_b, step_b, "dst")
    recs_a = {r["path"]: r for r in _leaf_records(a)}
    recs_b = {r["path"]: r for r in _leaf_records(b)}
    lay_a, lay_b = _layouts(list(recs_a.values())), _layouts(list(recs_b.values()))
    added = [p for p in recs_b if p not in recs_a]
    removed = [p for p in recs_a if p not in recs_b]
    changes: dict[str, _Change] = {}
    comparable: dict[str, ArrayLayout] = {}
    for path in (p for p in recs_a if p in recs_b):
        changes[path], ok = _classify(path, recs_a[path], recs_b[path], lay_a[path], lay_b[path])
        if ok:
            comparable[path] = lay_a[path]
    damaged_a: dict[str, str] = {}
    damaged_b: dict[str, str] = {}
    with _bar(args, 2 * sum(x.nbytes for x in comparable.values()), "diff") as bar:
        for batch in _plan(comparable):
            got_a = _read_batch(a, lay_a, batch, bar.update, damaged_a)
            got_b = _read_batch(b, lay_b, batch, bar.update, damaged_b)
            for piece in batch:
                if piece in got_a and piece in got_b:
                    _compare(got_a[piece], got_b[piece], changes[piece[0]])
    for damaged in (damaged_a, damaged_b):  # a damaged side is an error, not a difference
        if damaged:
            raise CorruptCheckpointError(
                f"{len(damaged)} leaves cannot be read (run `zarrckpt verify`): "
                + next(iter(damaged.values()))
            )
    changed = [c for c in changes.values() if c.reasons]
    unchanged = len(changes) - len(changed)
    differ = bool(added or removed or changed)
    if args.json:

        def leaf(path: str, lay: ArrayLayout) -> dict[str, Any]:
            return {"path": path, "shape": list(lay.shape), "dtype": str(lay.dtype)}

        _print_json({
            "a": {"location": a.location, "step": a.info.step},
            "b": {"location": b.location, "step": b.info.step},
            "added": [leaf(p, lay_b[p]) for p in added],
            "removed": [leaf(p, lay_a[p]) for p in removed],
            "changed": [c.to_json() for c in changed],
            "unchanged": unchanged, "identical": not differ,
        })  # fmt: skip
        return 1 if differ and args.exit_code else 0
    print(f"--- {a.location} (step {a.info.step})")
    print(f"+++ {b.location} (step {b.info.step})")
    for p in added:
        print(f"+ {p}  {_shape(lay_b[p].shape)} {lay_b[p].dtype}")
    for p in removed:
        print(f"- {p}  {_shape(lay_a[p].shape)} {lay_a[p].dtype}")
    for c in changed:
        notes = [r for r in c.reasons if r != "values"]
        if "values" in c.reasons and c.max_abs_diff is not None:
            size = math.prod(lay_a[c.path].shape)
            notes.append(
                f"max |a-b| {c.max_abs_diff:.6g}, {c.n_different} of {size} elements differ"
            )
        elif "values" in c.reasons:
            notes.append("value differs")
        print(f"~ {c.path}  {'; '.join(notes)}")
    print(
        f"{len(added)} added, {len(removed)} removed, {len(changed)} changed, {unchanged} unchanged"
    )
    return 1 if differ and args.exit_code else 0


# --- gc -----------------------------------------------------------------------------------------


def _garbage_kind(name: str) -> tuple[str, str]:
    """(short kind, what it is) of a name ``find_garbage`` found, for ``gc``'s report."""
    from ._manifest import SPARE_PREFIX, TRASH_PREFIX, parse_step_dir

    if name.startswith(TRASH_PREFIX):
        return "trash", "a directory whose deletion was interrupted"
    if name.startswith(SPARE_PREFIX):
        return "spare", "an abandoned spare: the process that kept it for recycling has exited"
    parsed = parse_step_dir(name)
    if parsed is not None and parsed[2]:
        return "temporary", "a save's temporary directory, never committed"
    return "step", "a step directory no manifest lists and no writer holds (an unfinished save)"


def _cmd_gc(args: argparse.Namespace) -> int:
    from ._commit import collect_garbage, find_garbage, read_manifest
    from ._storage import open_storage
    from ._sync import run

    storage = open_storage(args.url, _options(args, args.url), read_only=args.dry_run)
    if storage.is_file():
        raise CorruptCheckpointError(f"{storage.url} is a file, not a zarrckpt checkpoint")
    manifest = run(read_manifest(storage))  # refuses a damaged manifest before deleting
    garbage = run(find_garbage(storage))
    if manifest is None and not garbage:
        raise CheckpointNotFoundError(f"no checkpoint at {storage.url}")
    if not args.dry_run and garbage:
        garbage = sorted(run(collect_garbage(storage)))
    if args.json:
        items = [{"name": n, "kind": _garbage_kind(n)[0]} for n in garbage]
        _print_json({"url": storage.url, "dry_run": args.dry_run, "garbage": items})
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for name in garbage:
        print(f"{verb} {storage.describe(name)}: {_garbage_kind(name)[1]}")
    print(f"{storage.url}: {verb} {len(garbage)} item{'s' * (len(garbage) != 1)}")
    return 0


# --- cp -----------------------------------------------------------------------------------------


def _cmd_cp(args: argparse.Namespace) -> int:
    from ._commit import read_manifest
    from ._copy import copy_step
    from ._storage import open_storage
    from ._sync import run

    src_opts, dst_opts = _options(args, args.src, "src"), _options(args, args.dst, "dst")
    src = open_storage(args.src, src_opts, read_only=True)
    if src.is_file():
        raise CorruptCheckpointError(f"{src.url} is a file, not a zarrckpt checkpoint")
    manifest = run(read_manifest(src))
    if manifest is None or not manifest.steps:
        raise CheckpointNotFoundError(f"no checkpoint at {src.url}")
    if args.step is not None and manifest.get(args.step) is None:
        raise CheckpointNotFoundError(
            f"step {args.step} is not committed at {src.url}; committed steps: "
            f"{manifest.step_numbers}"
        )
    infos = [s for s in manifest.steps if args.step is None or s.step == args.step]
    dst = open_storage(args.dst, dst_opts)
    if dst.is_file():
        raise AlreadyExistsError(
            f"{dst.url} is an existing file; the destination of a copy is a checkpoint root "
            "(a directory)"
        )
    if _protocol(args.dst) == "memory":
        _warn(
            f"{dst.url} lives in the memory of this process: the copy vanishes when zarrckpt exits"
        )
    copied = []
    for info in infos:
        with _bar(args, info.nbytes, f"cp step {info.step}") as bar:
            done = copy_step(
                src, info.step, dst, overwrite=args.overwrite, verify=not args.no_verify,
                progress=bar.update, codec=args.codec, chunk_bytes=args.chunk_bytes,
            )  # fmt: skip
        copied.append({
            "step": done.step, "location": done.location, "leaves": done.leaves,
            "nbytes": done.nbytes, "files": done.files,
        })  # fmt: skip
        if not args.json:
            size = f"{_leaves(done.leaves)}, {_human(done.nbytes)}"
            print(f"step {done.step} -> {done.location} ({size})")
    if args.json:
        _print_json({
            "src": src.url, "dst": dst.url, "verified": not args.no_verify,
            "reencoded": args.codec is not None or args.chunk_bytes is not None, "steps": copied,
        })  # fmt: skip
    return 0


# --- convert ------------------------------------------------------------------------------------


def _cmd_convert(args: argparse.Namespace) -> int:
    from ._commit import read_manifest
    from ._convert import read_msgpack
    from ._copy import check_destination
    from ._manifest import parse_step_dir
    from ._storage import open_storage
    from ._sync import run
    from .api import save_pytree

    dst_opts = _options(args, args.dst, "dst")
    if args.step is not None:  # refused before the file is read, in the CLI's words
        dst = open_storage(args.dst, dst_opts, read_only=True)
        found = run(read_manifest(dst)) if not dst.is_file() else None
        if found is not None:
            check_destination(dst.url, found, args.step, args.overwrite)
    tree = read_msgpack(
        args.src, quantities=not args.no_quantities, storage_options=_options(args, args.src, "src")
    )
    with contextlib.redirect_stdout(sys.stderr):  # the summary of a verbose save
        location = save_pytree(
            args.dst, tree, overwrite=True if args.step is None else args.overwrite,
            verbose=_progress(args), step=args.step, keep=None, storage_options=dst_opts,
            chunk_bytes=args.chunk_bytes, codec=args.codec,
        )  # fmt: skip
    parsed = parse_step_dir(location.rstrip("/").rsplit("/", 1)[-1])
    step = parsed[0] if parsed else args.step
    manifest = run(read_manifest(open_storage(args.dst, dst_opts, read_only=True)))
    info = manifest.get(step) if manifest is not None and step is not None else None
    doc = {
        "src": args.src, "dst": args.dst, "step": step, "location": location,
        "leaves": info.leaves if info else None, "nbytes": info.nbytes if info else None,
    }  # fmt: skip
    if args.json:
        _print_json(doc)
    else:
        size = f", {_leaves(info.leaves)}, {_human(info.nbytes)}" if info else ""
        print(f"{args.src} -> {location} (step {step}{size})")
    return 0


# --- the parser ---------------------------------------------------------------------------------


def _codec(text: str) -> str:
    from ._format import parse_codec

    try:
        return parse_codec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document")
    common.add_argument(
        "-o", "--storage-option", metavar="KEY=VALUE", type=_storage_option, action="append",
        default=[], help="fsspec option for remote URLs (repeatable; VALUE parsed as JSON if it can be)",
    )  # fmt: skip
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    two = argparse.ArgumentParser(add_help=False)
    for side, what in (("src", "the first URL only"), ("dst", "the second URL only")):
        two.add_argument(
            f"--{side}-option", metavar="KEY=VALUE", type=_storage_option, action="append",
            default=[], help=f"like -o, for {what}",
        )  # fmt: skip
    writing = argparse.ArgumentParser(add_help=False)
    writing.add_argument(
        "--codec", type=_codec, help="none, zstd[:LEVEL] or gzip[:LEVEL] for every leaf"
    )
    writing.add_argument("--chunk-bytes", type=int, help="target chunk size of the destination")
    writing.add_argument(
        "--overwrite", action="store_true",
        help="replace a step that exists at the destination, dropping the steps after it",
    )  # fmt: skip

    parser = argparse.ArgumentParser(
        prog="zarrckpt",
        description="Look into, check, compare, copy and convert zarrckpt checkpoints.",
        epilog="Exit status: 0 ok, 1 a check failed (verify; diff --exit-code), 2 errors.",
    )
    parser.add_argument(
        "--version", action=_Version, nargs=0, default=argparse.SUPPRESS,
        help="show the version and exit",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, func: Callable[[argparse.Namespace], int], text: str, *parents: Any
    ) -> Any:
        p = sub.add_parser(name, parents=[common, *parents], help=text, description=text)
        p.set_defaults(func=func)
        return p

    p = command("ls", _cmd_ls, "list the committed steps")
    p.add_argument("url")
    for name, func, text in (
        ("tree", _cmd_tree, "show the tree of a step (or of a sub-tree)"),
        ("info", _cmd_info, "totals of a step or sub-tree; the layout of a leaf"),
    ):
        p = command(name, func, text)
        p.add_argument("url")
        p.add_argument("path", nargs="?", default="", help="a sub-tree or leaf (a/b/c or a.b.c)")
        p.add_argument("--step", type=int, help="default: the latest")
        if name == "info":
            p.add_argument("--stats", action="store_true", help="min/max/mean/std/nnz of a leaf")
    p = command("cat", _cmd_cat, "print the values of a leaf")
    p.add_argument("url")
    p.add_argument("path")
    p.add_argument("--step", type=int, help="default: the latest")
    p.add_argument("--slice", help="NumPy basic indexing, e.g. 0:10,::2 (reads only those chunks)")
    p.add_argument("--full", action="store_true", help="print every element (no ... summary)")
    p = command("verify", _cmd_verify, "read every chunk of every leaf, checking checksums")
    p.add_argument("url")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="default: the latest")
    which.add_argument("--all", action="store_true", help="every committed step")
    p = command("diff", _cmd_diff, "compare two steps: added, removed and changed leaves", two)
    p.add_argument("a", metavar="URL[@STEP]")
    p.add_argument("b", metavar="URL[@STEP]")
    p.add_argument("--exit-code", action="store_true", help="exit 1 if the steps differ")
    p = command(
        "gc", _cmd_gc,
        "delete what crashed or interrupted saves left behind, and spares whose process has "
        "exited (a live process's spare and a step being written are never touched)",
    )  # fmt: skip
    p.add_argument("url")
    p.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    p = command(
        "cp", _cmd_cp,
        "copy committed steps to another checkpoint root, byte for byte (same step numbers, "
        "chunking, dimension names, leaf kinds and record; each chunk's crc32c checked); "
        "--codec or --chunk-bytes re-encode the copy instead",
        two, writing,
    )  # fmt: skip
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--step", type=int, help="copy this step only (default: every step)")
    p.add_argument(
        "--no-verify", action="store_true",
        help="do not read the copy back before committing it (chunks are still checked as read)",
    )  # fmt: skip
    p = command(
        "convert", _cmd_convert, "a BrainPy/braintools msgpack (.bp) file -> a step", two, writing
    )
    p.add_argument("src", metavar="OLD.bp")
    p.add_argument("dst")
    p.add_argument("--step", type=int, help="default: one past the latest (0 for a new root)")
    p.add_argument(
        "--no-quantities", action="store_true",
        help="keep brainunit Quantities as the {mantissa, scale, base, dim, factor} dicts of the file",
    )  # fmt: skip
    return parser


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _warn(text: str) -> None:
    print(f"zarrckpt: warning: {' '.join(text.split())}", file=sys.stderr)


def _show_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int,
    file: Any = None, line: str | None = None,
) -> None:  # fmt: skip
    """Python warnings, as the CLI's one line (``zarrckpt: warning: ...``), never with the
    source path and line of whichever library raised them."""
    _warn(str(message))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.func(args)
    except BrokenPipeError:
        return _broken_pipe()
    except (ZarrCkptError, UsageError, OSError, KeyError, ImportError) as exc:
        print(f"zarrckpt: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zarrckpt: interrupted", file=sys.stderr)
        return 130


def _broken_pipe() -> int:
    """``zarrckpt cat ... | head``: stop quietly."""
    import os

    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
