"""Reprs: LazyArray's NumPy-like preview, the HTML tree (steps, samples, caps, escaping), and
what a real browser shows of it (headless Chromium: text, folding, light and dark themes)."""

import html
import json
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from helpers import ALL_DTYPES
from hypothesis import given
from hypothesis import strategies as st

import zarrckpt
from zarrckpt import _repr, _tree
from zarrckpt._storage import LocalStorage

# --- helpers ------------------------------------------------------------------------------------


class CountingStorage(LocalStorage):
    """A local directory that records every file it opens for reading and its size (both
    ``get`` and the raw ``read_into`` path open files here)."""

    def __init__(self, root):
        super().__init__(root)
        self.reads = []

    def _open_read(self, key):
        fd = super()._open_read(key)
        if fd is not None:
            self.reads.append((key, os.fstat(fd).st_size))
        return fd

    def chunk_reads(self, leaf=""):
        """(key, bytes) of chunk files read, of the leaf ``leaf`` if given."""
        return [
            (k, n)
            for k, n in self.reads
            if re.search(r"/c(\.\d+)*$", k) and (not leaf or f"/{leaf}/c" in k)
        ]


class _Node:
    def __init__(self, tag, attrs):
        self.tag, self.attrs, self.children = tag, dict(attrs), []

    def text(self):
        """Text inside, whitespace collapsed, less style sheets and the text fallback."""
        if self.tag == "style" or self.attrs.get("class") == "zck-fallback":
            return ""
        parts = [c if isinstance(c, str) else c.text() for c in self.children]
        return " ".join(" ".join(parts).split())

    def walk(self):
        yield self
        for child in self.children:
            if isinstance(child, _Node):
                yield from child.walk()


class _Tree(HTMLParser):
    """An HTML fragment as nested nodes; refuses one that is not well formed."""

    VOID = frozenset({"br", "hr", "meta", "input", "img"})

    def __init__(self):
        super().__init__()
        self.stack = [_Node("root", [])]

    def handle_starttag(self, tag, attrs):
        node = _Node(tag, attrs)
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        assert len(self.stack) > 1 and self.stack[-1].tag == tag, (self.stack[-1].tag, tag)
        self.stack.pop()

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse(fragment):
    parser = _Tree()
    parser.feed(fragment)
    parser.close()
    assert len(parser.stack) == 1, "unclosed tags"
    return parser.stack[0]


def text_of(fragment):
    return parse(fragment).text()


def numpy_body(leaf_repr):
    """The NumPy part of a LazyArray's repr (after the header line)."""
    header, _, body = leaf_repr.partition("\n")
    assert header.startswith("LazyArray(")
    return body


# --- LazyArray.__repr__ ---------------------------------------------------------------------------

SHAPES = [(), (0, 3), (7,), (4000,), (1001,), (2048, 40), (3, 1000), (10, 20, 30), (2, 3, 4, 50)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_lazy_repr_is_numpys_repr(local_url, shape):
    rng = np.random.default_rng(0)
    value = rng.standard_normal(shape).astype(np.float32)
    zarrckpt.save_pytree(local_url, {"a": value}, verbose=False, chunk_bytes=4096)
    leaf = zarrckpt.open_checkpoint(local_url)["a"]
    text = repr(leaf)
    assert text.splitlines()[0] == (
        f"LazyArray('a', shape={shape}, dtype=float32, chunks={leaf.chunks}, codec='none', "
        f"size={_repr.human(value.nbytes)!r})"
    )
    assert numpy_body(text) == repr(value)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_lazy_repr_every_dtype(local_url, dtype):
    value = (np.arange(2400) % 7).astype(dtype).reshape(40, 60)
    zarrckpt.save_pytree(local_url, {"a": value}, verbose=False, chunk_bytes=1024)
    leaf = zarrckpt.open_checkpoint(local_url)["a"]
    assert numpy_body(repr(leaf)) == repr(value)


def test_lazy_repr_reads_the_edge_chunks_only(tmp_path):
    value = np.arange(100 * 1024, dtype=np.float32)  # 100 chunks of 4 KiB
    zarrckpt.save_pytree(str(tmp_path), {"V": value}, verbose=False, chunk_bytes=4096)
    storage = CountingStorage(tmp_path)
    leaf = zarrckpt.open_checkpoint(storage)["V"]
    text = repr(leaf)
    assert sorted(k.rsplit("/", 1)[1] for k, _ in storage.chunk_reads()) == ["c.0", "c.99"]
    assert numpy_body(text) == repr(value)
    storage.reads.clear()
    leaf._repr_html_()  # the preview is cached: the HTML repr reads only its sample
    assert sorted(k.rsplit("/", 1)[1] for k, _ in storage.chunk_reads()) == [
        "c.0", "c.1", "c.2", "c.3"
    ]  # fmt: skip


def test_lazy_repr_does_not_read_past_its_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(_repr, "PREVIEW_BYTES", 64 * 1024)
    zarrckpt.save_pytree(str(tmp_path), {"V": np.ones(40_000, np.float32)}, verbose=False)
    storage = CountingStorage(tmp_path)
    leaf = zarrckpt.open_checkpoint(storage)["V"]  # one chunk of 156 KiB
    body = numpy_body(repr(leaf))
    assert body == (
        "<values not read: the items a repr shows lie in 1 chunks (156.2 KiB), over the "
        "64.0 KiB a repr may read; index the array to read them>"
    )
    assert storage.chunk_reads() == []


def test_reprs_of_a_deleted_step_say_so(local_url):
    zarrckpt.save_pytree(local_url, {"V": np.ones(5)}, verbose=False)
    view = zarrckpt.open_checkpoint(local_url)
    leaf = view["V"]
    zarrckpt.save_pytree(local_url, {"V": np.ones(5)}, verbose=False, keep=1)  # drops step 0
    assert numpy_body(repr(leaf)).startswith("<values not read: CheckpointNotFoundError: step 0")
    page = view._repr_html_()
    assert "values not read: CheckpointNotFoundError: step 0" in text_of(page)


# --- samples --------------------------------------------------------------------------------------


@st.composite
def layouts(draw):
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    chunks = tuple(draw(st.integers(1, n)) for n in shape)
    return shape, chunks, draw(st.sampled_from([1, 2, 4, 8])), draw(st.integers(1, 400))


@given(layouts(), st.integers(1, 5))
def test_a_sample_is_a_prefix_within_its_caps(layout, max_chunks):
    shape, chunks, itemsize, budget = layout
    plan = _repr.plan_sample(shape, chunks, itemsize, budget, max_chunks)
    chunk_bytes = math.prod(chunks) * itemsize
    if plan is None:
        assert chunk_bytes > budget
        return
    index = np.arange(math.prod(shape)).reshape(shape)
    np.testing.assert_array_equal(index[plan.box].ravel(), np.arange(plan.count))  # C-order prefix
    touched = {
        tuple(i // c for i, c in zip(idx, chunks, strict=True))
        for idx in np.ndindex(*index[plan.box].shape)
    }
    assert len(touched) == plan.chunks <= max_chunks
    assert plan.nbytes == plan.chunks * chunk_bytes <= budget


def test_sample_of_a_zarrckpt_layout():
    # (8, 1000, 10) float32 cut into chunks of one row of 100: four chunks = 4,000 elements
    plan = _repr.plan_sample((8, 1000, 10), (1, 100, 10), 4, 1 << 20)
    assert plan.box == (slice(0, 1), slice(0, 400), slice(None))
    assert (plan.count, plan.chunks, plan.nbytes) == (4000, 4, 16000)
    assert _repr.plan_sample((4000,), (4000,), 4, 1 << 20).count == 4000  # whole
    assert _repr.plan_sample((1 << 20,), (1 << 19,), 4, 1 << 20) is None  # a 2 MiB chunk


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampled")
    rng = np.random.default_rng(1)
    state = {
        "small": {"W": rng.standard_normal((20, 30)).astype(np.float32)},
        "nan": np.array([1.0, np.nan, 3.0, np.inf]),
        "big": rng.standard_normal((2048, 1024)).astype(np.float32),  # 8 MiB, 32 chunks
    }
    zarrckpt.save_pytree(str(root), state, verbose=False, chunk_bytes=256 * 1024)
    return root, state


def _leaf_details(page, name):
    """The text of leaf ``name``'s row and of its (expanded) details."""
    for node in parse(page).walk():
        if node.attrs.get("class") == "zck-leaf":
            label = next(c for c in node.children if getattr(c, "tag", "") == "label")
            if label.attrs.get("title") == name:
                details = next(
                    c for c in node.children if "zck-details" in c.attrs.get("class", "")
                )
                return label.text(), details.text()
    raise AssertionError(f"no leaf row {name!r}")


def _stats_of(details):
    """{name: value} from a details block's statistics table."""
    words = details.split()
    names = ["min", "max", "mean", "std", "NaN"]
    i = words.index("min")
    return dict(zip(names, map(float, words[i + 5 : i + 10]), strict=True))


def test_html_stats_come_from_a_labelled_sample(sampled):
    root, state = sampled
    storage = CountingStorage(root)
    page = zarrckpt.open_checkpoint(storage)._repr_html_()
    # the small leaf: whole array, its own statistics
    _, details = _leaf_details(page, "small/W")
    w = state["small"]["W"].astype(np.float64)
    assert details.startswith("all 600 elements")
    stats = _stats_of(details)
    for name, want in [("min", w.min()), ("max", w.max()), ("mean", w.mean()), ("std", w.std())]:
        assert stats[name] == float(f"{want:.6g}"), name
    assert stats["NaN"] == 0
    # NaNs are counted and left out of the other statistics
    stats = _stats_of(_leaf_details(page, "nan")[1])
    assert stats["NaN"] == 1 and stats["min"] == 1 and stats["max"] == math.inf
    # the big leaf: four chunks of 64 rows, labelled as a sample
    row, details = _leaf_details(page, "big")
    assert row.split()[1:] == ["2048×1024", "float32", "8.0", "MiB", "64×1024", "none"]
    assert details.startswith(
        "sample: first 262,144 of 2,097,152 elements [:256, :], 4 of 32 chunks"
    )
    sample = state["big"][:256].astype(np.float64)
    stats = _stats_of(details)
    assert stats["mean"] == float(f"{sample.mean():.6g}") != float(f"{state['big'].mean():.6g}")
    assert stats["max"] == float(f"{sample.max():.6g}")
    # what was read: 4 chunks of the big leaf (1 MiB), none of the leaf whose chunk is too big
    big = sorted(storage.chunk_reads("big"))
    assert [k.rsplit("/", 1)[1] for k, _ in big] == ["c.0.0", "c.1.0", "c.2.0", "c.3.0"]
    assert sum(n for _, n in big) <= _repr.SAMPLE_LEAF_BYTES + 4 * 4  # + the checksums


def test_html_never_reads_a_chunk_over_the_leaf_cap(tmp_path):
    zarrckpt.save_pytree(str(tmp_path), {"V": np.zeros(600_000, np.float32)}, verbose=False)
    storage = CountingStorage(tmp_path)
    page = zarrckpt.open_checkpoint(storage)._repr_html_()  # V: one chunk of 2.3 MiB
    assert storage.chunk_reads() == []
    assert _leaf_details(page, "V")[1] == (
        "not sampled: one chunk holds 2.3 MiB, over the 1.0 MiB a leaf's sample may read; "
        "index the leaf to read it"
    )


def test_html_repr_reads_no_more_than_its_budget(tmp_path):
    # 12 leaves of 1 MiB in 256 KiB chunks: the first 8 are sampled (8 MiB), 4 are not
    state = {f"w{i:02d}": np.full(256 * 1024, i, np.float32) for i in range(12)}
    zarrckpt.save_pytree(str(tmp_path), state, verbose=False, chunk_bytes=256 * 1024)
    storage = CountingStorage(tmp_path)
    page = zarrckpt.open_checkpoint(storage)._repr_html_()
    read = storage.chunk_reads()
    assert sum(n for _, n in read) <= _repr.SAMPLE_TOTAL_BYTES + 4 * len(read)
    assert {k.split("/")[1] for k, _ in read} == {f"w{i:02d}" for i in range(8)}
    for i in range(12):
        details = _leaf_details(page, f"w{i:02d}")[1]
        if i < 8:
            assert details.startswith("all 262,144 elements")
            assert _stats_of(details)["mean"] == i
        else:
            assert details.startswith("not sampled: this repr's 8.0 MiB sample budget is spent")


def test_html_limits_rows_of_huge_trees(tmp_path, monkeypatch):
    monkeypatch.setattr(_repr, "MAX_ROWS", 50)
    state = {"net": {f"layer{i}": {f"n{j}": np.zeros(2) for j in range(10)} for i in range(10)}}
    zarrckpt.save_pytree(str(tmp_path), state, verbose=False)
    storage = CountingStorage(tmp_path)
    page = zarrckpt.open_checkpoint(storage)._repr_html_()
    shown = re.findall(r"title='(net/layer\d/n\d)'", page)
    assert len(shown) == 44 and shown[-1] == "net/layer4/n3"  # 50 rows: 6 groups, 44 leaves
    assert "… 56 more leaves not shown" in text_of(page)
    assert len(storage.chunk_reads()) == 44  # leaves not shown are not sampled


def _big_state():
    """207 leaves in 42 groups: a model's layers and its optimizer's moments, as a flax/optax
    run saves them (the tree issue 19 found opening ~5,000 px tall)."""

    def layer(i):
        return {
            "kernel": np.full((4, 4), i, np.float32), "bias": np.zeros(4, np.float32),
            "scale": np.ones(4, np.float32), "mean": np.zeros(4), "var": np.ones(4),
        }  # fmt: skip

    return {
        "params": {f"layers_{i}": layer(i) for i in range(20)},
        "opt_state": {"count": np.int32(3), **{f"layers_{i}": layer(i) for i in range(20)}},
        "step": 3, "lr": 0.1, "rng": np.zeros(2, np.uint32), "epoch": 1, "loss": 0.5, "note": "x",
    }  # fmt: skip


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("big") / "ckpt")
    zarrckpt.save_pytree(root, _big_state(), verbose=False)
    return root


def _groups(page):
    """``(label, open)`` of each group row, and the rows shown before a click: a group's
    rows show when it and every group around it are open."""
    groups, shown = [], [0]

    def walk(node, visible):
        for child in node.children:
            if not isinstance(child, _Node):
                continue
            kind = child.attrs.get("class", "")
            if kind in ("zck-group", "zck-leaf"):
                box = next(c for c in child.children if getattr(c, "tag", "") == "input")
                shown[0] += visible
                if kind == "zck-leaf":
                    continue
                is_open = "checked" in box.attrs
                label = next(c for c in child.children if getattr(c, "tag", "") == "label")
                groups.append((label.text().split("/")[0], is_open))
                walk(child, visible and is_open)
            else:
                walk(child, visible)

    walk(parse(page), True)
    return groups, shown[0]


def test_html_folds_a_large_tree_to_an_outline(big):
    """A tree of many groups opens a screen tall: the top level, then groups breadth first
    while the rows on show stay within OPEN_ROWS; every leaf is still there, a click away."""
    ckpt = zarrckpt.open_checkpoint(big)
    page = ckpt._repr_html_()
    groups, shown = _groups(page)
    assert len(groups) == 42 and len(ckpt.leaves()) == 207
    assert len(re.findall(r"<div class='zck-leaf'>", page)) == 207  # folded, not dropped
    assert shown <= _repr.OPEN_ROWS
    # params/ (20 groups) opens, then its first layers while they fit; opt_state/ does not
    assert [label for label, is_open in groups if is_open] == ["params", "layers_0", "layers_1"]
    assert dict(groups)["opt_state"] is False


def test_html_opens_a_small_tree_whole(odd):
    groups, _ = _groups(zarrckpt.open_checkpoint(odd)._repr_html_())
    assert groups and all(is_open for _, is_open in groups)


def test_html_folding_budget():
    tree = {
        "a": {"x": {f"y{i}": 1 for i in range(3)}, "z": 1},
        "b": {f"c{i}": 1 for i in range(50)},
    }
    opened = _repr._opened(tree, 40)
    assert opened == {id(tree["a"]), id(tree["a"]["x"])}  # b would pass 40 rows: folded
    assert _repr._opened(tree, 2) == set() and _repr._opened(np.zeros(2), 40) == set()
    everything = _repr._opened(tree, 1000)
    assert everything == {id(tree["a"]), id(tree["a"]["x"]), id(tree["b"])}


# --- content of the HTML tree ----------------------------------------------------------------------


def _odd_state():
    import brainunit as u
    import jax

    return {
        "net": {"l1": {"W": np.ones((20, 30), np.float32)}},
        "<script>alert(1)</script>": {"a&b": np.arange(3.0)},
        "<img src=x onerror='window.pwned=1'>": np.zeros(2),
        "text": "hello <b>world</b> & 'you'",
        "blob": b"\x00<\xff",
        "flag": True,
        "count": 3,
        "scalar": np.float32(2.5),
        "none": None,
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 3)),
        "complex": np.array([1 + 2j, 3j]),
        "bf16": np.arange(5).astype(ml_dtypes.bfloat16),
        "int4": np.arange(-3, 3).astype(ml_dtypes.int4),
        "key": jax.random.key(0),
        "v": u.Quantity(np.array([1.0, 2.0]), unit=u.mV),
        "g": u.Quantity(np.ones(2, np.float32), unit=u.siemens / u.cm**2),
        "ratio": u.Quantity(np.ones(2), unit=u.UNITLESS),
    }


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("odd") / "ckpt")
    for step in range(3):
        zarrckpt.save_pytree(root, _odd_state(), verbose=False, keep=None, step=step)
    return root


def _numpys(value):
    """NumPy's own repr of ``value`` as an array, whitespace collapsed as :func:`text_of` does.

    Previews are compared with what NumPy (and ml_dtypes) print for the same value, never
    with text copied from one of their versions: NumPy 2.4 prints an ml_dtypes array's dtype
    as ``dtype=dtype(bfloat16)`` where earlier versions printed ``dtype=bfloat16``."""
    return " ".join(repr(np.asarray(value)).split())


def test_html_tree_shows_every_kind_of_leaf_escaped(odd):
    import brainunit as u

    ckpt = zarrckpt.open_checkpoint(odd)
    page = ckpt._repr_html_()
    assert "<script>alert" not in page and "<img src=x" not in page and "<b>world" not in page
    text = text_of(page)
    assert "<script>alert(1)</script>/" in text and "<img src=x onerror='window.pwned=1'>" in text
    state = _odd_state()
    expect = {
        "<script>alert(1)</script>|a&b": _numpys(state["<script>alert(1)</script>"]["a&b"]),
        "text": repr(state["text"]),
        "blob": repr(state["blob"]),
        "flag": repr(state["flag"]),
        "count": repr(state["count"]),
        "scalar": _numpys(state["scalar"]),
        "mask": _numpys(state["mask"]),
        "empty": _numpys(state["empty"]),
        "complex": _numpys(state["complex"]),
        "bf16": _numpys(state["bf16"]),
        "int4": _numpys(state["int4"]),
        "v": _numpys(state["v"].mantissa),
    }
    for keys, preview in expect.items():
        path = "/".join(map(_tree.escape, keys.split("|")))
        _, details = _leaf_details(page, path)
        assert preview in details, (keys, details)
    assert "true 2 of 3" in _leaf_details(page, "mask")[1]
    assert _stats_of(_leaf_details(page, "bf16")[1]) == {
        "min": 0,
        "max": 4,
        "mean": 2,
        "std": 1.41421,
        "NaN": 0,
    }
    assert (
        "min max mean std" in _leaf_details(page, "int4")[1]
        and "NaN" not in _leaf_details(page, "int4")[1]
    )
    row, details = _leaf_details(page, "key")
    assert "uint32 prngkey threefry2x32" in row and "min" not in details
    assert f"float64 quantity {u.mV.dispname}" in _leaf_details(page, "v")[0]
    assert "float32 quantity S / cm^2" in _leaf_details(page, "g")[0]
    assert "float64 quantity dimensionless" in _leaf_details(page, "ratio")[0]
    assert re.search(r"none\s+None", text)


def test_html_header_and_steps(odd, monkeypatch):
    ckpt = zarrckpt.open_checkpoint(odd, step=1)
    manifest = ckpt._opened.manifest
    text = text_of(ckpt._repr_html_())
    assert f"zarrckpt.Checkpoint {ckpt.location} step 1 " in text
    assert f"root {ckpt._opened.storage.url}" in text
    assert "Steps (3) 0 … 2" in text
    for info in manifest.steps:
        when = _repr._utc(info.time)
        size = re.escape(_repr.human(info.nbytes))
        assert re.search(rf"{info.step} {when} {info.leaves} {size}", text)
    assert "1 " + _repr._utc(manifest.steps[1].time) in text and "this view" in text
    monkeypatch.setattr(_repr, "MAX_STEPS", 2)
    text = text_of(ckpt._repr_html_())
    assert "… 1 earlier steps" in text and f"0 {_repr._utc(manifest.steps[0].time)}" not in text
    sub = text_of(ckpt["net"]._repr_html_())
    assert "zarrckpt.TreeView" in sub and "path net" in sub and "Steps" not in sub


def test_unit_text_is_the_whole_unit():
    import brainunit as u

    from zarrckpt._leaves import _unit_record

    for unit, text in [
        (u.mV, "mV"), (u.mV / u.ms, "mV / ms"), (u.siemens / u.cm**2, "S / cm^2"),
        (u.UNITLESS, "dimensionless"), (u.kilogram * u.meter**2 / u.second**3 / u.amp, "V"),
    ]:  # fmt: skip
        assert _repr.unit_text(_unit_record(unit)) == text
    # a record without names (they are optional): spelled from its dimensions
    bare = {"dim": [2, 1, -3, -1, 0, 0, 0], "scale": -3, "base": 10.0, "factor": 1.0}
    assert _repr.unit_text(bare) == "10^-3 * m^2 kg s^-3 A^-1"
    assert _repr.unit_text(None) == "?"


def test_reprs_of_a_quantity_leaf_name_its_unit(odd):
    leaf = zarrckpt.open_checkpoint(odd)["g"]
    assert ", kind='quantity', unit='S / cm^2')" in repr(leaf).split("\n")[0]
    assert "kind quantity unit S / cm^2" in text_of(leaf._repr_html_())


def test_text_fallback_is_the_text_repr(odd):
    ckpt = zarrckpt.open_checkpoint(odd)
    page = ckpt._repr_html_()
    fallback = re.search(r"<pre class='zck-fallback'>(.*?)</pre>", page, re.S).group(1)
    assert html.unescape(fallback) == repr(ckpt)


def test_html_of_a_lazy_array(odd):
    leaf = zarrckpt.open_checkpoint(odd)["net/l1/W"]
    text = text_of(leaf._repr_html_())
    assert "zarrckpt.LazyArray net/l1/W shape 20×30 dtype float32 size 2.3 KiB" in text
    assert numpy_body(repr(leaf)).split()[0] in text and "all 600 elements" in text
    assert "min max mean std NaN 1 1 1 0 0" in text


# --- in a browser ---------------------------------------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1100,900",
]  # fmt: skip

#: Appended to a page: reports what is visible (all of it, and of each repr) before and after
#: every fold is opened, the colours the first repr resolves to, how many images were
#: decoded, and whether any markup from a name ran.
PROBE = """
<script>
const wraps = [...document.querySelectorAll('.zck-wrap')];
const out = {collapsed: document.body.innerText};
out.reprs = wraps.map(w => ({
  collapsed: w.innerText, height: w.getBoundingClientRect().height,
  open_groups: w.querySelectorAll('.zck-group > .zck-in:checked').length,
}));
for (const box of document.querySelectorAll('.zck-in:not(:disabled)')) box.checked = true;
out.expanded = document.body.innerText;
wraps.forEach((w, i) => {
  out.reprs[i].expanded = w.innerText;
  out.reprs[i].expanded_height = w.getBoundingClientRect().height;
  // cells whose text the column cuts (an ellipsis): none may be a dtype and its kind
  out.reprs[i].clipped = [...w.querySelectorAll('.zck-dtype')]
    .filter(s => s.scrollWidth > s.clientWidth || s.scrollHeight > s.clientHeight)
    .map(s => s.innerText);
});
out.images = [...document.images].filter(i => i.complete && i.naturalWidth > 0).length;
const wrap = wraps[0];
out.background = getComputedStyle(wrap).backgroundColor;
out.color = getComputedStyle(wrap).color;
out.fallback = getComputedStyle(document.querySelector('.zck-fallback')).display;
out.pwned = window.pwned || 0;
const pre = document.createElement('pre');
pre.id = 'zck-probe';
pre.textContent = JSON.stringify(out);
document.body.appendChild(pre);
</script>
"""


def chromium_or_skip():
    """Debian's Chromium (.ci/run installs it). Missing, the test fails in CI, else skips."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    message = "Chromium not installed: apt-get install chromium"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run_chromium(browser, tmp_path, page, *args):
    path = Path(tmp_path) / f"page{len(list(Path(tmp_path).glob('page*')))}.html"
    path.write_text(page, encoding="utf-8")
    proc = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}", *args, path.as_uri()],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    return proc.stdout.decode()


def probe(browser, tmp_path, page, *args):
    """What Chromium shows of ``page`` (see PROBE)."""
    page = page.replace("</body>", PROBE + "</body>") if "</body>" in page else page + PROBE
    dom = run_chromium(browser, tmp_path, page, "--dump-dom", *args)
    found = re.search(r'<pre id="zck-probe">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    return json.loads(html.unescape(found.group(1)))


def screenshot(browser, tmp_path, page):
    from PIL import Image

    out = Path(tmp_path) / "shot.png"
    run_chromium(browser, tmp_path, page, f"--screenshot={out}")
    return Image.open(out).convert("RGB")


def page_of(fragment, body_style="", body_class=""):
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'></head>"
        f"<body class='{body_class}' style='margin:0;font:13px sans-serif;{body_style}'>"
        f"{fragment}</body></html>"
    )


DARK_VARS = (
    "--jp-layout-color0:#111111;--jp-layout-color1:#1b1b1b;--jp-layout-color2:#262626;"
    "--jp-content-font-color0:rgb(238,238,238);--jp-content-font-color2:rgb(180,180,180);"
    "--jp-content-font-color3:rgb(120,120,120);--jp-border-color2:#333;background:#111111"
)


def test_browser_shows_the_tree_and_folds_it(odd, tmp_path):
    browser = chromium_or_skip()
    ckpt = zarrckpt.open_checkpoint(odd)
    shown = probe(browser, tmp_path, page_of(ckpt._repr_html_()))
    assert shown["fallback"] == "none" and shown["pwned"] == 0
    collapsed, expanded = shown["collapsed"], shown["expanded"]
    for path, leaf in [(p, ckpt[p]) for p in ("net/l1/W", "empty", "mask")]:
        name = path.rsplit("/", 1)[-1]
        assert re.search(rf"{name}\s+{_repr._dims(leaf.shape)}\s+{leaf.dtype}", collapsed), path
    assert "<script>alert(1)</script>/" in collapsed and "<img src=x onerror" in collapsed
    for info in ckpt._opened.manifest.steps:
        assert re.search(rf"^{info.step}\s+{_repr._utc(info.time)}", collapsed, re.M)
    # previews are folded away until their leaf is opened
    preview = repr(np.arange(3.0))  # the leaf "<script>alert(1)</script>/a&b", as NumPy prints it
    assert preview not in collapsed and preview in expanded
    assert repr("hello <b>world</b> & 'you'") in expanded
    assert re.search(r"min\s+max\s+mean\s+std\s+NaN\s+1\s+1\s+1\s+0\s+0", expanded)


def test_browser_opens_a_large_tree_a_screen_tall(big, tmp_path):
    browser = chromium_or_skip()
    ckpt = zarrckpt.open_checkpoint(big)
    (shown,) = probe(browser, tmp_path, page_of(ckpt._repr_html_()))["reprs"]
    assert shown["open_groups"] == 3  # of 42
    assert shown["height"] < 1200, shown["height"]  # was ~5,000 px with every group open
    assert shown["expanded_height"] > 3 * shown["height"]
    for info in ckpt.leaves():  # every leaf a click away
        assert info.path.rsplit("/", 1)[-1] in shown["expanded"]


@pytest.mark.parametrize("width", [1100, 640])
def test_browser_shows_units_in_full(odd, tmp_path, width):
    browser = chromium_or_skip()
    page = page_of(zarrckpt.open_checkpoint(odd)._repr_html_())
    (shown, *_) = probe(browser, tmp_path, page, f"--window-size={width},900")["reprs"]
    assert shown["clipped"] == []
    for unit in (
        "quantity mV",
        "quantity S / cm^2",
        "quantity dimensionless",
        "prngkey threefry2x32",
    ):
        assert unit in " ".join(shown["collapsed"].split())


@pytest.mark.parametrize(
    "style, body_class, background, color",
    [
        ("", "", (255, 255, 255), (0, 0, 0)),  # no JupyterLab: the light fallbacks
        (DARK_VARS, "", (17, 17, 17), (238, 238, 238)),  # JupyterLab's dark variables
        ("background:#111111", "vscode-dark", (17, 17, 17), (255, 255, 255)),  # VS Code dark
    ],
    ids=["light", "jupyterlab-dark", "vscode-dark"],
)
def test_browser_theme_follows_the_notebook(odd, tmp_path, style, body_class, background, color):
    browser = chromium_or_skip()
    page = page_of(zarrckpt.open_checkpoint(odd)._repr_html_(), style, body_class)
    shown = probe(browser, tmp_path, page)
    assert shown["background"] == f"rgb{background}"
    assert shown["color"] == f"rgb{color}"
    image = screenshot(browser, tmp_path, page)
    # the header area: mostly background, and its darkest/lightest text pixel on the other side
    region = np.asarray(image.crop((0, 0, 600, 60))).reshape(-1, 3).astype(int)
    values, counts = np.unique(region, axis=0, return_counts=True)
    assert tuple(values[counts.argmax()]) == background
    luminance = region.sum(axis=1) / 3
    far = luminance.min() if sum(background) > 384 else luminance.max()
    assert abs(far - sum(color) / 3) < 60  # text drawn in (about) the theme's colour
