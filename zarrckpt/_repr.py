"""Plain-text and HTML (Jupyter) representations of checkpoints, sub-trees and leaves.

The HTML repr is modelled on xarray's: one ``<style>`` block whose colours are JupyterLab's
CSS variables, so light and dark themes follow the notebook's (with fallbacks for other
front ends: VS Code's ``body.vscode-dark``, ``html[theme=dark]``); sections that fold with a
checkbox and its label, not JavaScript (a notebook's output scripts are often untrusted),
a large tree starting folded to an outline (:data:`OPEN_ROWS`);
and the plain-text repr underneath, shown where the styles are stripped (an untrusted
notebook, a notebook viewer). Every name and value is escaped.

Static HTML cannot read when a leaf is expanded, so what it shows then (a NumPy-like
preview and statistics) is computed when the repr is made, from a **sample**: a prefix of
the leaf in C order, at most :data:`SAMPLE_CHUNKS` of its chunks and
:data:`SAMPLE_LEAF_BYTES` of chunk data, and at most :data:`SAMPLE_TOTAL_BYTES` for all the
leaves of one repr, read in one batch. A leaf whose sample is not the whole array says so
("sample: first N of M elements"); one whose chunks are too large to sample says why. A
:class:`~zarrckpt.LazyArray`'s repr reads only the items NumPy would print (``edgeitems``
per axis), and only if the chunks holding them total at most :data:`PREVIEW_BYTES`. All
reads go through zarrckpt's reader: checksums verified, the view's step pinned.
"""

from __future__ import annotations

import html
import itertools
import math
import uuid
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from ._progress import human
from .errors import ZarrCkptError

if TYPE_CHECKING:
    from ._manifest import StepInfo
    from .checkpoint import LazyArray, LeafInfo

#: A leaf's sample takes at most this many of its chunks ...
SAMPLE_CHUNKS = 4
#: ... holding at most this many bytes (decoded) ...
SAMPLE_LEAF_BYTES = 1 << 20
#: ... and one repr samples at most this many bytes for all its leaves.
SAMPLE_TOTAL_BYTES = 8 << 20
#: A LazyArray's repr reads its edge items only from chunks totalling at most this.
PREVIEW_BYTES = 8 << 20
#: Rows (groups and leaves) an HTML tree shows; the rest are counted.
MAX_ROWS = 500
#: Rows an HTML tree shows before a click: groups start open, breadth first, while the rows
#: they add keep the tree within this; the others start folded (as xarray folds a section
#: of many items), so a large tree opens as an outline a screen tall.
OPEN_ROWS = 40
#: Committed steps the Steps section lists (the newest).
MAX_STEPS = 20
#: NumPy's defaults for when and how to summarise an array.
EDGEITEMS, THRESHOLD = 3, 1000
#: Elements above which a sample's preview is summarised.
PREVIEW_THRESHOLD = 24

#: ``{leaf path: box}`` -> ``{leaf path: values}``, read in one batch.
Reader = Callable[[dict[str, tuple[slice, ...]]], dict[str, np.ndarray]]

# Reading fails as a ZarrCkptError (damaged data, a step deleted since it was opened) or an
# OSError (the network): a repr then says so instead of raising.
_READ_ERRORS = (ZarrCkptError, OSError)
_PY_SCALARS: dict[str, Callable[[Any], Any]] = {
    "bool": bool, "int": int, "float": float, "complex": complex,
}  # fmt: skip
# Leaf kinds whose values are not a plain array: the dtype column names them.
_SHOWN_KINDS = {"str", "bytes", "py", "npscalar", "quantity", "prngkey"}


def _dims(shape: Sequence[int]) -> str:
    return "×".join(map(str, shape)) or "scalar"


def _describe(leaf: LeafInfo) -> str:
    return f"{_dims(leaf.shape)} {leaf.dtype} ({human(leaf.nbytes)}, chunks {leaf.chunks}, {leaf.codec})"


def _totals(leaves: Sequence[LeafInfo]) -> str:
    noun = "leaf" if len(leaves) == 1 else "leaves"
    return f"{len(leaves)} {noun}, {human(sum(leaf.nbytes for leaf in leaves))}"


# --- plain text -------------------------------------------------------------------------------


def text_tree(kind: str, title: str, tree: Any, leaves: list[LeafInfo], limit: int = 200) -> str:
    lines = [f"<{kind} {title}: {_totals(leaves)}>"]

    def walk(node: Any, indent: str) -> None:
        for name, child in node.items():
            if len(lines) > limit:
                return
            if isinstance(child, dict):
                lines.append(f"{indent}{name}/")
                walk(child, indent + "  ")
            else:
                lines.append(f"{indent}{name}: {_describe(child) if child is not None else 'None'}")

    if isinstance(tree, dict):
        walk(tree, "  ")
    if len(lines) > limit:
        lines.append(f"  ... ({len(leaves)} leaves in all)")
    return "\n".join(lines)


def _leaf_header(leaf: LazyArray, record: dict[str, Any]) -> str:
    kind = record.get("kind", "ndarray")
    extra = f", kind={kind!r}" if kind in _SHOWN_KINDS else ""
    if kind == "quantity":
        extra += f", unit={unit_text(record.get('unit'))!r}"
    return (
        f"LazyArray({leaf.path!r}, shape={leaf.shape}, dtype={leaf.dtype}, chunks={leaf.chunks}, "
        f"codec={leaf.codec!r}, size={human(leaf.nbytes)!r}{extra})"
    )


def unit_text(unit: Any) -> str:
    """A Quantity's unit as its record names it (``mV / ms``), in full: its display name,
    else its name, else spelled from the SI base dimensions; "dimensionless" for 1."""
    if not isinstance(unit, dict):
        return "?"
    dims = unit.get("dim") or []
    scale, factor = unit.get("scale", 0), unit.get("factor", 1)
    if not any(dims) and scale == 0 and factor == 1:
        return "dimensionless"
    for field in ("dispname", "name"):
        if isinstance(unit.get(field), str) and unit[field]:
            return unit[field]
    base = " ".join(
        name if d == 1 else f"{name}^{d:g}"
        for name, d in zip(("m", "kg", "s", "A", "K", "mol", "cd"), dims, strict=False)
        if d
    )
    prefix = (f"{factor:g} * " if factor != 1 else "") + (
        f"{unit.get('base', 10):g}^{scale} * " if scale else ""
    )
    return (prefix + base) if base else prefix.removesuffix(" * ")


def text_leaf(leaf: LazyArray, record: dict[str, Any]) -> str:
    """The leaf's layout, then NumPy's repr of its values (edge items only)."""
    return f"{_leaf_header(leaf, record)}\n{edge_preview(leaf)}"


_PREVIEWS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def edge_preview(leaf: LazyArray, cap: int | None = None) -> str:
    """NumPy's repr of ``leaf``, from the items NumPy would print (``EDGEITEMS`` at each end
    of every long axis) read alone; or a line saying why no value was read. Cached per
    leaf object (a view's step is pinned: its values cannot change), since a notebook asks
    for the text and the HTML repr of each result."""
    if leaf in _PREVIEWS:
        return _PREVIEWS[leaf]
    cap = PREVIEW_BYTES if cap is None else cap
    shape, chunks = leaf.shape, leaf.chunks
    if 0 in shape:
        return repr(np.empty(shape, leaf.dtype))
    summarize = math.prod(shape) > THRESHOLD
    # per axis: the runs of indices shown, as (start, stop)
    runs = [
        [(0, EDGEITEMS), (n - EDGEITEMS, n)] if summarize and n > 2 * EDGEITEMS else [(0, n)]
        for n in shape
    ]
    touched = math.prod(
        len({i for a, b in axis_runs for i in range(a // c, (b - 1) // c + 1)})
        for axis_runs, c in zip(runs, chunks, strict=True)
    )
    need = touched * math.prod(chunks) * leaf.dtype.itemsize
    if need > cap:
        return (
            f"<values not read: the items a repr shows lie in {touched} chunks ({human(need)}), "
            f"over the {human(cap)} a repr may read; index the array to read them>"
        )
    # One filler element between the two runs of a summarised axis keeps it longer than
    # 2 * EDGEITEMS, so NumPy prints "..." there; the filler itself is never printed.
    small = np.zeros([sum(b - a for a, b in r) + (len(r) > 1) for r in runs], leaf.dtype)
    placed = [
        [
            (slice(a, b), slice(0, b - a) if i == 0 else slice(-(b - a), None))
            for i, (a, b) in enumerate(r)
        ]
        for r in runs
    ]
    try:
        for parts in itertools.product(*placed):
            small[tuple(p[1] for p in parts)] = leaf[tuple(p[0] for p in parts)]
    except _READ_ERRORS as exc:
        return f"<values not read: {type(exc).__name__}: {exc}>"
    with np.printoptions(threshold=0 if summarize else THRESHOLD, edgeitems=EDGEITEMS):
        text = _with_shape(repr(small), small.shape, shape)
    _PREVIEWS[leaf] = text
    return text


def _with_shape(text: str, small: tuple[int, ...], shape: tuple[int, ...]) -> str:
    """NumPy's repr of the summarised stand-in ``text`` as that of an array of ``shape``:
    NumPy >= 2.2 names the shape of a summarised array, and puts it on a new line when the
    last line would grow past ``linewidth`` (as ``numpy._core.arrayprint`` does)."""
    at = text.rfind(f"shape={small}")
    if at < 0 or small == shape:
        return text
    head = text[:at].rstrip()  # ends with ","
    extras = f"shape={shape}" + text[at + len(f"shape={small}") :]
    last_line = len(head) - (head.rfind("\n") + 1)
    fits = last_line + len(extras) + 1 <= np.get_printoptions()["linewidth"]
    return head + (" " if fits else "\n" + " " * len("array(")) + extras


# --- samples ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """A prefix of a leaf in C order, read as the block ``box``: leading axes at index 0,
    one axis cut at ``box[axis].stop``, the trailing ones whole."""

    box: tuple[slice, ...]
    count: int  # elements
    chunks: int  # chunks the box touches
    nbytes: int  # bytes (decoded) those chunks hold


def plan_sample(
    shape: tuple[int, ...], chunks: tuple[int, ...], itemsize: int, budget: int,
    max_chunks: int = SAMPLE_CHUNKS,
) -> Sample | None:  # fmt: skip
    """The longest prefix of a non-empty array readable from at most ``max_chunks`` whole
    chunks holding at most ``budget`` bytes, or None if not even one chunk fits."""
    chunk_nbytes = math.prod(chunks) * itemsize
    limit = min(max_chunks, budget // chunk_nbytes)
    if limit < 1:
        return None
    if not shape:
        return Sample((), 1, 1, chunk_nbytes)
    grid = [math.ceil(s / c) for s, c in zip(shape, chunks, strict=True)]
    best = None
    for axis in range(len(shape)):
        trailing = math.prod(grid[axis + 1 :])  # chunks one index of this axis spans
        if trailing > limit:
            continue
        rows = min(shape[axis], (limit // trailing) * chunks[axis])
        count = rows * math.prod(shape[axis + 1 :])
        if best is None or count > best.count:
            n = math.ceil(rows / chunks[axis]) * trailing
            box = (
                (slice(0, 1),) * axis + (slice(0, rows),) + (slice(None),) * (len(shape) - axis - 1)
            )
            best = Sample(box, count, n, n * chunk_nbytes)
    return best


def _box_text(box: tuple[slice, ...]) -> str:
    return "[" + ", ".join(":" if s.stop is None else f":{s.stop}" for s in box) + "]"


def _g(value: float) -> str:
    return f"{value:.6g}"


def _is_integer(dtype: np.dtype) -> bool:
    return dtype.kind in "iu" or dtype.name.startswith(("int", "uint"))  # ml_dtypes int4 ...


def sample_stats(values: np.ndarray) -> list[tuple[str, str]]:
    """``(name, value)`` rows: min, max, mean, std and the NaN count of a numeric sample;
    the count of ``True`` for booleans; nothing for complex or empty samples."""
    dtype = values.dtype
    if not values.size or dtype.kind == "c":
        return []
    if dtype == np.bool_:
        return [("true", f"{int(np.count_nonzero(values)):,} of {values.size:,}")]
    try:
        x = values.astype(np.float64).ravel()
    except (TypeError, ValueError):
        return []
    integer = _is_integer(dtype)
    nan = 0 if integer else int(np.isnan(x).sum())
    rows: list[tuple[str, str]] = []
    if nan < x.size:
        finite = x[~np.isnan(x)] if nan else x
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            low, high, mean, std = finite.min(), finite.max(), finite.mean(), finite.std()
        shown = (lambda v: str(int(v))) if integer else _g
        rows = [("min", shown(low)), ("max", shown(high)), ("mean", _g(mean)), ("std", _g(std))]
    if not integer:
        rows.append(("NaN", f"{nan:,}"))
    return rows


def _values_text(record: dict[str, Any], values: np.ndarray, whole: bool) -> str:
    """The preview of a sample, as the leaf's kind reads: text for str/bytes, a Python
    scalar for a Python number, NumPy's repr otherwise."""
    kind = record.get("kind", "ndarray")
    if kind in ("str", "bytes") and values.ndim == 1:
        data = values.tobytes()
        text = repr(data.decode("utf-8", errors="replace") if kind == "str" else data)
        if len(text) > 300:
            text, whole = text[:300], False
        return text + ("" if whole else " …")
    if kind == "py" and values.ndim == 0 and record.get("pytype") in _PY_SCALARS:
        return repr(_PY_SCALARS[record["pytype"]](values.item()))
    with np.printoptions(threshold=PREVIEW_THRESHOLD, edgeitems=EDGEITEMS, linewidth=88):
        return repr(values)


# --- HTML ---------------------------------------------------------------------------------------

_CSS = """
.zck {
  --zck-fg: var(--jp-content-font-color0, rgba(0, 0, 0, 1));
  --zck-fg2: var(--jp-content-font-color2, rgba(0, 0, 0, 0.54));
  --zck-fg3: var(--jp-content-font-color3, rgba(0, 0, 0, 0.38));
  --zck-border: var(--jp-border-color2, #e0e0e0);
  --zck-bg: var(--jp-layout-color0, white);
  --zck-bg-alt: var(--jp-layout-color1, #f6f6f6);
  --zck-bg-details: var(--jp-layout-color2, #eeeeee);
}
html[theme="dark"] .zck, html[data-theme="dark"] .zck, body[data-theme="dark"] .zck,
body.vscode-dark .zck {
  --zck-fg: var(--jp-content-font-color0, rgba(255, 255, 255, 1));
  --zck-fg2: var(--jp-content-font-color2, rgba(255, 255, 255, 0.54));
  --zck-fg3: var(--jp-content-font-color3, rgba(255, 255, 255, 0.38));
  --zck-border: var(--jp-border-color2, #3a3a3a);
  --zck-bg: var(--jp-layout-color0, #111111);
  --zck-bg-alt: var(--jp-layout-color1, #1b1b1b);
  --zck-bg-details: var(--jp-layout-color2, #262626);
}
.zck-fallback { display: none; }
.zck-wrap {
  display: block !important; min-width: 300px; max-width: 1000px; line-height: 1.5;
  color: var(--zck-fg); background-color: var(--zck-bg); padding: 2px 4px 4px;
}
.zck-header { padding: 4px 0; border-bottom: solid 1px var(--zck-border); margin-bottom: 4px; }
.zck-type { color: var(--zck-fg2); }
.zck-title { font-weight: bold; word-break: break-all; }
.zck-facts { list-style: none; padding: 0 !important; margin: 0; color: var(--zck-fg2); }
.zck-facts li { display: inline-block; margin: 0 1.2em 0 0 !important; }
.zck-facts b { color: var(--zck-fg); }
.zck-in { position: absolute; opacity: 0; width: 0; height: 0; margin: 0; }
.zck-in:focus-visible + label { outline: auto; }
.zck-in + label { cursor: pointer; }
.zck-in:disabled + label { cursor: default; }
.zck-in + label .zck-arrow::before {
  content: "►"; display: inline-block; width: 1.3em; font-size: 0.7em; color: var(--zck-fg2);
}
.zck-in:checked + label .zck-arrow::before { content: "▼"; }
.zck-in:disabled + label .zck-arrow::before { content: ""; }
.zck-in ~ .zck-body { display: none; }
.zck-in:checked ~ .zck-body { display: block; }
.zck-section-title { display: block; font-weight: 500; color: var(--zck-fg2); padding-top: 4px; }
.zck-section-title:hover { color: var(--zck-fg); }
.zck-inline { font-weight: normal; color: var(--zck-fg3); padding-left: 0.6em; }
.zck-row {
  display: grid; grid-template-columns: minmax(10em, 2.4fr) 1.2fr 1fr 0.8fr 1.2fr 0.8fr;
  column-gap: 0.8em; padding: 1px 0;
}
.zck-row > span { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.zck-row > span.zck-dtype { white-space: normal; overflow-wrap: anywhere; }
.zck-row > .zck-name { padding-left: calc(var(--zck-depth, 0) * 1.2em); }
.zck-group-row > .zck-name { grid-column: 1 / -1; color: var(--zck-fg); }
.zck-group-row .zck-dim, .zck-dim { color: var(--zck-fg3); }
.zck-colnames { color: var(--zck-fg2); border-bottom: solid 1px var(--zck-border); }
.zck-leaf:nth-child(even) > .zck-row { background-color: var(--zck-bg-alt); }
.zck-row:hover { background-color: var(--zck-bg-details); }
.zck-kind {
  color: var(--zck-fg2); font-size: 0.85em; padding-left: 0.4em;
  display: inline-block; max-width: 100%; box-sizing: border-box;
}
.zck-details {
  margin: 2px 0 6px calc(var(--zck-depth, 0) * 1.2em + 1.3em); padding: 4px 8px;
  border-left: solid 2px var(--zck-border); background-color: var(--zck-bg-details);
}
.zck-wrap pre.zck-values {
  margin: 0 0 4px; padding: 0; background: transparent; color: var(--zck-fg);
  white-space: pre; overflow-x: auto; line-height: 1.3;
  font-family: var(--jp-code-font-family, monospace); font-size: var(--jp-code-font-size, 0.9em);
}
.zck-wrap table.zck-table {
  border-collapse: collapse; margin: 2px 0; width: auto; font-size: inherit;
}
.zck-wrap table.zck-table th, .zck-wrap table.zck-table td {
  padding: 0 1.2em 0 0; text-align: left; border: none; background: transparent;
  color: var(--zck-fg); font-weight: normal;
}
.zck-wrap table.zck-table th { color: var(--zck-fg2); }
.zck-wrap table.zck-table tr.zck-current td { font-weight: bold; }
.zck-note { color: var(--zck-fg2); font-size: 0.9em; }
"""


def _style() -> str:
    return f"<style>{_CSS}</style>"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _new_id() -> str:
    return "zck-" + uuid.uuid4().hex


def _section(title: str, count: int | None, inline: str, body: str, open_: bool) -> str:
    ident = _new_id()
    checked = " checked" if open_ else ""
    number = "" if count is None else f" <span>({count:,})</span>"
    return (
        "<div class='zck-section'>"
        f"<input id='{ident}' class='zck-in' type='checkbox'{checked}>"
        f"<label for='{ident}' class='zck-section-title' title='Show/hide'>"
        f"<span class='zck-arrow'></span>{_e(title)}{number}"
        f"<span class='zck-inline'>{_e(inline)}</span></label>"
        f"<div class='zck-body'>{body}</div></div>"
    )


def _header(kind: str, title: str, facts: list[tuple[str, str]]) -> str:
    items = " ".join(
        f"<li>{_e(name)} <b>{_e(value)}</b></li>" if name else f"<li>{_e(value)}</li>"
        for name, value in facts
    )
    return (
        "<div class='zck-header'>"
        f"<div class='zck-type'>zarrckpt.{_e(kind)}</div>"
        f"<div class='zck-title'>{_e(title)}</div>"
        f"<ul class='zck-facts'>{items}</ul></div>"
    )


def _page(text: str, header: str, sections: list[str]) -> str:
    return (
        f"<div class='zck'>{_style()}"
        f"<pre class='zck-fallback'>{_e(text)}</pre>"
        f"<div class='zck-wrap' style='display:none'>{header}{''.join(sections)}</div></div>"
    )


def _utc(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _steps_section(steps: Sequence[StepInfo], current: int) -> str:
    shown = steps[-MAX_STEPS:]
    rows = []
    if len(steps) > len(shown):
        rows.append(
            f"<tr><td colspan='5' class='zck-dim'>… {len(steps) - len(shown):,} earlier "
            "steps</td></tr>"
        )
    for info in shown:
        mark = " class='zck-current'" if info.step == current else ""
        rows.append(
            f"<tr{mark}><td>{info.step}</td><td>{_e(_utc(info.time))}</td>"
            f"<td>{info.leaves:,}</td><td>{_e(human(info.nbytes))}</td>"
            f"<td>{'this view' if info.step == current else ''}</td></tr>"
        )
    table = (
        "<table class='zck-table zck-steps'><tr><th>step</th><th>committed</th>"
        f"<th>leaves</th><th>size</th><th></th></tr>{''.join(rows)}</table>"
    )
    numbers = [s.step for s in steps]
    inline = f"{numbers[0]} … {numbers[-1]}" if len(numbers) > 2 else ", ".join(map(str, numbers))
    return _section("Steps", len(steps), inline, table, open_=len(steps) <= MAX_STEPS)


@dataclass
class _Row:
    depth: int
    label: str
    leaf: LeafInfo | None = None  # a leaf's row (None for a None leaf)
    group: dict[str, Any] | None = None  # opens a group ...
    end: bool = False  # ... and this closes the innermost one


def _rows(tree: Any, limit: int) -> tuple[list[_Row], int]:
    """The rows an HTML tree shows, depth first (at most ``limit``, plus the closing rows
    of the groups open then), and how many leaves they show."""
    rows: list[_Row] = []
    count, shown = [0], [0]  # rows (closing rows aside) and leaves

    def walk(node: dict[str, Any], depth: int) -> None:
        for label, child in node.items():
            if count[0] >= limit:
                return
            count[0] += 1
            if isinstance(child, dict):
                rows.append(_Row(depth, label, group=child))
                walk(child, depth + 1)
                rows.append(_Row(depth, label, end=True))
            else:
                rows.append(_Row(depth, label, leaf=child))
                shown[0] += child is not None

    if isinstance(tree, dict):
        walk(tree, 0)
    else:
        rows.append(_Row(0, "(root)", leaf=tree))
        shown[0] += tree is not None
    return rows, shown[0]


def _group_leaves(node: Any) -> list[LeafInfo]:
    if isinstance(node, dict):
        return [leaf for child in node.values() for leaf in _group_leaves(child)]
    return [] if node is None else [node]


@dataclass
class _LeafValues:
    """What a leaf row shows when expanded."""

    text: str = ""
    stats: Sequence[tuple[str, str]] = ()
    note: str = ""


def _sample_all(
    leaves: list[LeafInfo], records: dict[str, dict[str, Any]], read: Reader
) -> dict[str, _LeafValues]:
    """Plan the samples of ``leaves`` (in order, within the caps), read them in one batch,
    and turn each into a preview, statistics and a note saying what was sampled."""
    out: dict[str, _LeafValues] = {}
    plans: dict[str, Sample] = {}
    budget = SAMPLE_TOTAL_BYTES
    for leaf in leaves:
        size = math.prod(leaf.shape)
        if size == 0:
            out[leaf.path] = _LeafValues(repr(np.empty(leaf.shape, leaf.dtype)), (), "empty")
            continue
        plan = plan_sample(
            leaf.shape, leaf.chunks, leaf.dtype.itemsize, min(budget, SAMPLE_LEAF_BYTES)
        )
        if plan is None:
            chunk = math.prod(leaf.chunks) * leaf.dtype.itemsize
            why = (
                f"one chunk holds {human(chunk)}, over the {human(SAMPLE_LEAF_BYTES)} a leaf's "
                "sample may read"
                if chunk > SAMPLE_LEAF_BYTES
                else f"this repr's {human(SAMPLE_TOTAL_BYTES)} sample budget is spent"
            )
            out[leaf.path] = _LeafValues(note=f"not sampled: {why}; index the leaf to read it")
            continue
        plans[leaf.path] = plan
        budget -= plan.nbytes
    try:
        values = read({path: plan.box for path, plan in plans.items()}) if plans else {}
    except _READ_ERRORS as exc:
        note = f"values not read: {type(exc).__name__}: {exc}"
        return out | {path: _LeafValues(note=note) for path in plans}
    for leaf in leaves:
        plan = plans.get(leaf.path)
        if plan is None:
            continue
        size = math.prod(leaf.shape)
        whole = plan.count == size
        rec = records.get(leaf.path, {})
        sample = values[leaf.path]
        kind = rec.get("kind", "ndarray")
        stats = (
            [] if kind in ("str", "bytes", "prngkey") or not leaf.shape else sample_stats(sample)
        )
        if whole:
            note = f"all {size:,} elements" if leaf.shape else ""
        else:
            n_chunks = math.prod(
                math.ceil(s / c) for s, c in zip(leaf.shape, leaf.chunks, strict=True)
            )
            note = (
                f"sample: first {plan.count:,} of {size:,} elements {_box_text(plan.box)}, "
                f"{plan.chunks} of {n_chunks:,} chunks"
            )
        out[leaf.path] = _LeafValues(_values_text(rec, sample, whole), stats, note)
    return out


def _kind_tag(record: dict[str, Any]) -> str:
    kind = record.get("kind", "ndarray")
    if kind not in _SHOWN_KINDS:
        return ""
    detail = ""
    if kind == "quantity":
        detail = f" {unit_text(record.get('unit'))}"
    elif kind == "prngkey":
        detail = f" {record.get('impl', '')}"
    elif kind == "py":
        detail = f" {record.get('pytype', '')}"
    return f" <span class='zck-kind'>{_e(kind + detail)}</span>"


def _details(values: _LeafValues) -> str:
    parts = [f"<div class='zck-note'>{_e(values.note)}</div>"] if values.note else []
    if values.text:
        parts.append(f"<pre class='zck-values'>{_e(values.text)}</pre>")
    if values.stats:
        head = "".join(f"<th>{_e(name)}</th>" for name, _ in values.stats)
        cells = "".join(f"<td>{_e(value)}</td>" for _, value in values.stats)
        parts.append(f"<table class='zck-table zck-stats'><tr>{head}</tr><tr>{cells}</tr></table>")
    return "".join(parts)


def _leaf_row(
    row: _Row, leaf: LeafInfo | None, record: dict[str, Any], values: _LeafValues | None
) -> str:
    ident = _new_id()
    depth = f"--zck-depth:{row.depth}"
    if leaf is None:
        cells = f"<span class='zck-name'><span class='zck-arrow'></span>{_e(row.label)}</span><span class='zck-dim'>None</span>"
        return (
            f"<div class='zck-leaf'><input id='{ident}' class='zck-in' type='checkbox' disabled>"
            f"<label for='{ident}' class='zck-row' style='{depth}'>{cells}</label></div>"
        )
    cells = (
        f"<span class='zck-name'><span class='zck-arrow'></span>{_e(row.label)}</span>"
        f"<span>{_e(_dims(leaf.shape))}</span>"
        f"<span class='zck-dtype'>{_e(leaf.dtype)}{_kind_tag(record)}</span>"
        f"<span>{_e(human(leaf.nbytes))}</span>"
        f"<span>{_e(_dims(leaf.chunks) if leaf.shape else '-')}</span>"
        f"<span>{_e(leaf.codec)}</span>"
    )
    body = _details(values) if values else ""
    disabled = "" if body else " disabled"
    return (
        f"<div class='zck-leaf'><input id='{ident}' class='zck-in' type='checkbox'{disabled}>"
        f"<label for='{ident}' class='zck-row' style='{depth}' title='{_e(leaf.path)}'>{cells}</label>"
        f"<div class='zck-body zck-details' style='{depth}'>{body}</div></div>"
    )


def _opened(tree: Any, budget: int) -> set[int]:
    """The groups (their ``id``) that start open: the top level shows, then groups open
    breadth first, each if the rows it adds keep the rows on show within ``budget``; a
    group inside a folded one stays folded (opening it shows its own rows, as an outline)."""
    if not isinstance(tree, dict):
        return set()
    shown, opened = len(tree), set()
    queue = deque(child for child in tree.values() if isinstance(child, dict))
    while queue:
        group = queue.popleft()
        if shown + len(group) <= budget:
            opened.add(id(group))
            shown += len(group)
            queue.extend(child for child in group.values() if isinstance(child, dict))
    return opened


def _tree_html(
    rows: list[_Row], records: dict[str, dict[str, Any]], values: dict[str, _LeafValues],
    opened: set[int] | frozenset[int] = frozenset(),
) -> str:  # fmt: skip
    parts = [
        "<div class='zck-row zck-colnames'><span>name</span><span>shape</span><span>dtype</span>"
        "<span>size</span><span>chunks</span><span>codec</span></div>"
    ]
    for row in rows:
        if row.end:
            parts.append("</div></div>")
        elif row.group is not None:
            ident = _new_id()
            checked = " checked" if id(row.group) in opened else ""
            inner = _group_leaves(row.group)
            parts.append(
                f"<div class='zck-group'><input id='{ident}' class='zck-in' type='checkbox'{checked}>"
                f"<label for='{ident}' class='zck-row zck-group-row' style='--zck-depth:{row.depth}'>"
                f"<span class='zck-name'><span class='zck-arrow'></span>{_e(row.label)}/ "
                f"<span class='zck-dim'>{_e(_totals(inner))}</span></span></label>"
                "<div class='zck-body'>"
            )
        else:
            leaf = row.leaf
            rec = records.get(leaf.path, {}) if leaf is not None else {}
            parts.append(_leaf_row(row, leaf, rec, values.get(leaf.path) if leaf else None))
    return "".join(parts)


def html_tree(
    kind: str, title: str, tree: Any, leaves: list[LeafInfo], *,
    records: dict[str, dict[str, Any]], read: Reader, root: str, step: StepInfo,
    steps: Sequence[StepInfo] | None = None, path: str = "",
) -> str:  # fmt: skip
    """A checkpoint's (or sub-tree's) HTML repr: header, committed steps (``steps``, for a
    checkpoint), and the tree with a sampled preview per leaf, read through ``read``."""
    rows, shown = _rows(tree, MAX_ROWS)
    displayed = [r.leaf for r in rows if r.leaf is not None]
    values = _sample_all(displayed, records, read)
    facts = [("step", str(step.step)), ("", _totals(leaves)), ("committed", _utc(step.time))]
    if path:
        facts.insert(0, ("path", path))
    facts.append(("root", root))
    sections = [_steps_section(steps, step.step)] if steps else []
    body = _tree_html(rows, records, values, _opened(tree, OPEN_ROWS))
    if shown < len(leaves):
        body += (
            f"<div class='zck-note'>… {len(leaves) - shown:,} more leaves not shown (the first "
            f"{MAX_ROWS} rows are); .tree() or .leaves() list them all</div>"
        )
    inline = (
        f"values sampled: ≤ {SAMPLE_CHUNKS} chunks and ≤ {human(SAMPLE_LEAF_BYTES)} a leaf, "
        f"≤ {human(SAMPLE_TOTAL_BYTES)} in all; click a leaf"
    )
    sections.append(_section("Leaves", len(leaves), inline, body, open_=True))
    text = text_tree(kind, title, tree, leaves)
    return _page(text, _header(kind, title, facts), sections)


def html_leaf(leaf: LazyArray, record: dict[str, Any], info: LeafInfo) -> str:
    """A LazyArray's HTML repr: layout, NumPy-like preview (edge items) and statistics of
    a sample."""
    n_chunks = math.prod(math.ceil(s / c) for s, c in zip(leaf.shape, leaf.chunks, strict=True))
    facts = [
        ("shape", _dims(leaf.shape)), ("dtype", str(leaf.dtype)), ("size", human(leaf.nbytes)),
        ("chunks", f"{_dims(leaf.chunks) if leaf.shape else '-'} ({n_chunks:,})"),
        ("codec", leaf.codec),
    ]  # fmt: skip
    kind = record.get("kind", "ndarray")
    if kind in _SHOWN_KINDS:
        facts.append(("kind", kind))
    if kind == "quantity":
        facts.append(("unit", unit_text(record.get("unit"))))
    preview = f"<pre class='zck-values'>{_e(edge_preview(leaf))}</pre>"
    sections = [_section("Values", None, "edge items, as NumPy prints them", preview, True)]
    if leaf.shape and kind not in ("str", "bytes", "prngkey"):
        stats = _sample_all(
            [info], {info.path: record}, lambda boxes: {p: leaf[b] for p, b in boxes.items()}
        )
        body = _details(_LeafValues("", stats[info.path].stats, stats[info.path].note))
        sections.append(_section("Statistics", None, "", body, True))
    return _page(text_leaf(leaf, record), _header("LazyArray", leaf.path, facts), sections)
