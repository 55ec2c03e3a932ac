"""Plain-text and HTML (Jupyter) representations of checkpoints, sub-trees and leaves."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .checkpoint import LeafInfo


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError  # pragma: no cover


def _describe(leaf: LeafInfo) -> str:
    shape = "×".join(map(str, leaf.shape)) or "scalar"
    return f"{shape} {leaf.dtype} ({human(leaf.nbytes)}, chunks {leaf.chunks}, {leaf.codec})"


def _totals(leaves: list[LeafInfo]) -> str:
    return f"{len(leaves)} leaves, {human(sum(leaf.nbytes for leaf in leaves))}"


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


def text_leaf(path: str, leaf: LeafInfo) -> str:
    return f"<LazyArray {path}: {_describe(leaf)}>"


_STYLE = (
    "<style>.zarrckpt details{margin-left:1em}.zarrckpt summary{cursor:pointer}"
    ".zarrckpt td{padding:0 .6em;text-align:left}.zarrckpt .dim{color:#888}</style>"
)


def _leaf_row(name: str, leaf: LeafInfo) -> str:
    shape = "×".join(map(str, leaf.shape)) or "scalar"
    cells = [
        name,
        shape,
        str(leaf.dtype),
        human(leaf.nbytes),
        "×".join(map(str, leaf.chunks)) or "-",
        leaf.codec,
    ]
    return "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"


def _html_node(node: dict[str, Any], open_levels: int, budget: list[int]) -> str:
    rows, groups = [], []
    for name, child in node.items():
        if budget[0] <= 0:
            groups.append("<div class='dim'>…</div>")
            break
        budget[0] -= 1
        if isinstance(child, dict):
            inner = _html_node(child, open_levels - 1, budget)
            attr = " open" if open_levels > 0 else ""
            groups.append(
                f"<details{attr}><summary>{html.escape(name)}/ <span class='dim'>({len(child)})</span></summary>{inner}</details>"
            )
        elif child is None:
            rows.append(f"<tr><td>{html.escape(name)}</td><td class='dim' colspan=5>None</td></tr>")
        else:
            rows.append(_leaf_row(name, child))
    table = f"<table>{''.join(rows)}</table>" if rows else ""
    return table + "".join(groups)


def html_tree(kind: str, title: str, tree: Any, leaves: list[LeafInfo], limit: int = 2000) -> str:
    header = f"<b>{html.escape(kind)}</b> {html.escape(title)} <span class='dim'>— {html.escape(_totals(leaves))}</span>"
    body = _html_node(tree, 1, [limit]) if isinstance(tree, dict) else ""
    return f"<div class='zarrckpt'>{_STYLE}{header}{body}</div>"


def html_leaf(path: str, leaf: LeafInfo) -> str:
    head = "<tr><th>name</th><th>shape</th><th>dtype</th><th>size</th><th>chunks</th><th>codec</th></tr>"
    return f"<div class='zarrckpt'>{_STYLE}<b>LazyArray</b><table>{head}{_leaf_row(path, leaf)}</table></div>"
