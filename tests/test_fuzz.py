"""Fuzzing the three JSON readers: the manifest, the step record and a leaf's ``zarr.json``.

Each example mutates a valid document written by ``save_pytree``: bytes flipped, inserted,
deleted or cut off, or one JSON value replaced by another type, a huge or negative number,
a deep nesting, or deleted. The only acceptable outcomes are a
:class:`~zarrckpt.CorruptCheckpointError` or a correct load — never another exception, a
hang or an allocation the document claims. The parsers are fuzzed directly (fast, many
examples) and through the public readers (fewer examples).

What a correct load is depends on what was mutated. The manifest and a leaf's
``zarr.json`` do not describe values, so a load that succeeds returns exactly what was
saved. A step record does: its mutations fix the manifest's ``record_crc32c`` (a stranger
can write a matching checksum), and a load that succeeds must return what the mutated
record says (each leaf of its kind, shape and dtype; unmutated leaves as saved). The
accidental case, any changed byte with the checksum left alone, is always detected.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import google_crc32c
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import zarrckpt
from zarrckpt import (
    CorruptCheckpointError,
    MissingCheckpointWarning,
    StructureMismatchError,
    _read,
    _tree,
)
from zarrckpt._format import ArrayLayout
from zarrckpt._manifest import Manifest, StepInfo, parse_step_record

u = pytest.importorskip("brainunit")

MANY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEWER = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TREE = ("attributes", "zarrckpt", "tree")
Loc = tuple[Any, ...]


def make_tree() -> dict[str, Any]:
    """A leaf of every kind zarrckpt decodes; with 64-byte chunks, leaves of several chunks."""
    return {
        "w": np.arange(40, dtype=np.float32).reshape(10, 4),  # 3 chunks of 4 rows
        "spikes": np.arange(30) % 3 == 0,  # bool: zstd
        "count": np.arange(20, dtype=np.int64),  # zstd, 3 chunks
        "py": {"i": 7, "f": 0.5, "b": True, "c": 1 + 2j},
        "np": np.float64(3.25),
        "text": "hello",
        "blob": b"\x00\xff",
        "empty": np.zeros((0, 3), np.float32),
        "nothing": None,
        "seq": [np.int8(1), (np.uint16(2),)],
        "v": u.Quantity(np.ones(3, np.float32), unit=u.mV),
    }


# --- the checkpoint and its documents ------------------------------------------------------------


def locations(doc: Any, keep: Callable[[Loc], bool] = lambda loc: True) -> list[Loc]:
    """Every location (a tuple of keys and indices) in a JSON document, the root included."""
    out: list[Loc] = []

    def walk(node: Any, loc: Loc) -> None:
        if keep(loc):
            out.append(loc)
        items = (
            node.items()
            if isinstance(node, dict)
            else enumerate(node)
            if isinstance(node, list)
            else ()
        )
        for key, value in items:
            walk(value, (*loc, key))

    walk(doc, ())
    return out


def at(doc: Any, loc: Loc) -> Any:
    for key in loc:
        doc = doc[key]
    return doc


class Files:
    """A saved checkpoint's three kinds of document, and a way to swap one for a while."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.manifest_path = root / "zarr.json"
        self.manifest = self.manifest_path.read_bytes()
        entry = json.loads(self.manifest)["attributes"]["zarrckpt"]["steps"][0]
        self.info = StepInfo.from_json(entry, "manifest")
        self.record_path = root / entry["dir"] / "zarr.json"
        self.record = self.record_path.read_bytes()
        self.leaf_path = root / entry["dir"] / "w" / "zarr.json"
        self.leaf = self.leaf_path.read_bytes()
        # locations inside leaf records, but their "type": what _read validates (whether a
        # node is a leaf or a container, and the containers, are _tree's)
        doc = json.loads(self.record)
        self.leaf_fields = {
            loc
            for loc in locations(doc)
            if loc[:3] == TREE
            and any(isinstance(n := at(doc, loc[:i]), dict) and n.get("type") == "leaf"
                    for i in range(3, len(loc)))
            and not (loc[-1] == "type" and at(doc, loc) == "leaf")
        }  # fmt: skip

    def outside_containers(self, loc: Loc) -> bool:
        return loc[:3] != TREE[: len(loc)] or loc in self.leaf_fields

    @contextlib.contextmanager
    def swapped(self, path: Path, data: bytes, fix_crc: bool = False) -> Iterator[None]:
        """``path`` holds ``data`` inside the block (and the manifest its crc32c, if asked)."""
        try:
            path.write_bytes(data)
            if fix_crc:
                doc = json.loads(self.manifest)
                doc["attributes"]["zarrckpt"]["steps"][0]["record_crc32c"] = google_crc32c.value(
                    data
                )
                self.manifest_path.write_bytes(json.dumps(doc).encode())
            yield
        finally:
            self.manifest_path.write_bytes(self.manifest)
            self.record_path.write_bytes(self.record)
            self.leaf_path.write_bytes(self.leaf)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    root = tmp_path_factory.mktemp("fuzz") / "ckpt"
    zarrckpt.save_pytree(str(root), make_tree(), verbose=False, chunk_bytes=64)
    return Files(root)


# --- mutations -----------------------------------------------------------------------------------

DEEP = "\x00DEEP\x00"  # placeholders, replaced in the serialised text
HUGE_LITERAL = "\x00HUGE\x00"

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**32, 2**53 + 1, 2**62, 2**63, 2**64, 10**30, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["", ".", "..", "/", "../..", "/etc/passwd", "c.0", "float32", "int64",
                     "uint8", "zstd:1", "gzip:9", "none", "ndarray", "py", "npscalar", "str",
                     "bytes", "quantity", "int", "\x00", "a\\b", DEEP, HUGE_LITERAL]),
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)  # fmt: skip


def _render(doc: Any, depth: int) -> bytes:
    text = json.dumps(doc)
    text = text.replace(json.dumps(DEEP), "[" * depth + "1" + "]" * depth)
    return text.replace(json.dumps(HUGE_LITERAL), "9" * 5000).encode()


@st.composite
def json_mutation(draw, data: bytes, keep: Callable[[Loc], bool] = lambda loc: True) -> bytes:
    """``data`` (a JSON document) with one value replaced, deleted, wrapped, nudged or nested
    deeply (some depths parse, some exceed the parser's recursion limit)."""
    doc = json.loads(data)
    loc = draw(st.sampled_from(locations(doc, keep)))
    op = draw(st.sampled_from(["replace", "delete", "wrap", "nudge", "deep"]))
    depth = draw(st.sampled_from([2, 50, 500, 900, 990, 1100, 100_000]))
    if not loc:
        return _render(DEEP if op == "deep" else draw(json_values), depth)
    parent, key = at(doc, loc[:-1]), loc[-1]
    old = parent[key]
    if op == "delete":
        del parent[key]
    elif op == "wrap":
        parent[key] = [old]
    elif op == "nudge" and type(old) is int:
        parent[key] = old + draw(st.sampled_from([-1, 1, -old - 1, 2**40, 2**64]))
    elif op == "deep":
        parent[key] = DEEP
    else:
        parent[key] = draw(json_values)
    return _render(doc, depth)


@st.composite
def byte_mutation(draw, data: bytes) -> bytes:
    """``data`` with bytes flipped, inserted or deleted, or cut short."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        i = draw(st.integers(0, max(0, len(out) - 1)))
        if op == "flip" and out:
            out[i] ^= draw(st.integers(1, 255))
        elif op == "insert":
            out[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and out:
            del out[i]
        else:
            del out[i:]
    return bytes(out)


def mutations(
    data: bytes, keep: Callable[[Loc], bool] = lambda loc: True
) -> st.SearchStrategy[bytes]:
    return st.one_of(json_mutation(data, keep), byte_mutation(data))


# --- outcomes ------------------------------------------------------------------------------------


def outcome(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or the CorruptCheckpointError it raised; anything else fails the test."""
    try:
        return fn(*args)
    except CorruptCheckpointError as exc:
        return exc


def same(a: Any, b: Any) -> bool:
    """Equal types and bits (arrays, scalars, str, bytes, Quantities with their unit)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, u.Quantity):
        return repr(a.unit) == repr(b.unit) and same(a.mantissa, b.mantissa)
    if isinstance(a, (np.ndarray, np.generic)):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return a == b


def leaves(tree: Any) -> dict[str, Any]:
    return dict(_tree.flatten(tree)[1])


def as_saved(got: Any) -> None:
    want = leaves(make_tree())
    found = leaves(got)
    assert list(found) == list(want)
    assert [p for p in want if not same(found[p], want[p])] == []


def leaf_records(record: bytes) -> dict[str, dict[str, Any]]:
    return {r["path"]: r for r in _tree.iter_leaf_records(at(json.loads(record), TREE))}


def as_recorded(got: Any, record: bytes, saved_record: bytes) -> None:
    """Each leaf is what the (mutated) record says; leaves whose record is unchanged are as
    saved. (Containers are not mutated, so the paths are the saved ones.)"""
    saved, now = leaf_records(saved_record), leaf_records(record)
    want, found = leaves(make_tree()), leaves(got)
    assert list(found) == list(want)
    for path, value in found.items():
        rec = now[path]
        if rec == saved[path]:
            assert same(value, want[path]), path
            continue
        layout = ArrayLayout.from_json(rec)
        kind = rec.get("kind", "ndarray")
        if kind == "py":
            assert type(value).__name__ == rec["pytype"], path
        elif kind in ("str", "bytes"):
            assert type(value).__name__ == kind, path
        elif kind == "npscalar":
            assert isinstance(value, np.generic) and value.dtype == layout.dtype, path
        else:
            array = value.mantissa if kind == "quantity" else value
            assert isinstance(array, np.ndarray), path
            assert (array.shape, array.dtype) == (layout.shape, layout.dtype), path


def as_restored(got: Any, record: bytes, saved_record: bytes) -> None:
    """A target load keeps the target's structure and types; leaves whose record is
    unchanged are as saved."""
    saved, now = leaf_records(saved_record), leaf_records(record)
    want, found = leaves(make_tree()), leaves(got)
    assert list(found) == list(want)
    for path, value in found.items():
        assert type(value) is type(want[path]), path
        if now[path] == saved[path]:
            assert same(value, want[path]), path


def readers(root: Path) -> dict[str, Any]:
    """What each public reader gives: a value, a CorruptCheckpointError, or None for a
    target load refused as a structure mismatch (a shape or dtype no longer matches)."""
    out = {
        "load_pytree": outcome(zarrckpt.load_pytree, str(root)),
        "open_checkpoint.load": outcome(lambda r: zarrckpt.open_checkpoint(r).load(), str(root)),
    }
    try:
        out["load_pytree(target)"] = outcome(zarrckpt.load_pytree, str(root), make_tree())
    except StructureMismatchError:
        out["load_pytree(target)"] = None
    return out


def loads_as_saved(root: Path) -> None:
    for value in readers(root).values():
        if value is not None and not isinstance(value, CorruptCheckpointError):
            as_saved(value)


# --- the manifest --------------------------------------------------------------------------------


@MANY
@given(data=st.data())
def test_fuzz_manifest_parser(files, data):
    mutated = data.draw(mutations(files.manifest))
    got = outcome(Manifest.from_bytes, mutated, "zarr.json")
    if isinstance(got, Manifest):  # what a later save would write back must parse again
        assert Manifest.from_bytes(got.to_bytes(), "rewritten").steps == got.steps


@FEWER
@given(data=st.data())
def test_fuzz_manifest(files, data):
    mutated = data.draw(mutations(files.manifest))
    with files.swapped(files.manifest_path, mutated):
        steps = outcome(zarrckpt.list_steps, str(files.root))
        if steps == []:  # a well-formed manifest that lists no step: no checkpoint
            with pytest.warns(MissingCheckpointWarning):
                assert zarrckpt.load_pytree(str(files.root)) is None
        else:
            assert isinstance(steps, CorruptCheckpointError) or steps == [0]
            loads_as_saved(files.root)


# --- the step record -----------------------------------------------------------------------------


@MANY
@given(data=st.data())
def test_fuzz_step_record_damage_is_always_detected(files, data):
    """Any change to the record's bytes, even one that still parses, fails its checksum."""
    mutated = data.draw(mutations(files.record))
    got = outcome(parse_step_record, mutated, files.info, "record")
    if mutated != files.record:
        assert isinstance(got, CorruptCheckpointError)
        assert "crc32c checksum mismatch" in str(got)


@MANY
@given(data=st.data())
def test_fuzz_step_record_parser(files, data):
    """The envelope parser and the leaf validation, called directly, without a checksum."""
    mutated = data.draw(mutations(files.record, files.outside_containers))
    info = StepInfo(files.info.step, files.info.dir, 0.0, 0, 0)
    tree = outcome(parse_step_record, mutated, info, "record")
    if isinstance(tree, dict):
        outcome(_tree.validate, tree)  # the tree and leaf validation every reader applies


@FEWER
@given(data=st.data())
def test_fuzz_step_record(files, data):
    mutated = data.draw(json_mutation(files.record, files.outside_containers))
    with files.swapped(files.record_path, mutated, fix_crc=True):
        for reader, value in readers(files.root).items():
            if value is None or isinstance(value, CorruptCheckpointError):
                continue
            check = as_restored if reader == "load_pytree(target)" else as_recorded
            check(value, mutated, files.record)


@settings(max_examples=50, deadline=None)
@given(data=st.data())
@example(data=None)  # a dict whose keys and children disagree: fails today, every run
def test_fuzz_container_records(files, data):
    if data is None:
        doc = json.loads(files.record)
        at(doc, TREE)["keys"].pop()
        mutated = json.dumps(doc).encode()
    else:
        mutated = data.draw(json_mutation(files.record, lambda loc: loc[:3] == TREE))
    with files.swapped(files.record_path, mutated, fix_crc=True):
        for reader in (zarrckpt.load_pytree, lambda r: zarrckpt.open_checkpoint(r).load()):
            outcome(reader, str(files.root))


# --- a leaf's zarr.json --------------------------------------------------------------------------


@MANY
@given(data=st.data())
def test_fuzz_zarr_json_check(files, data):
    """A leaf's zarr.json against the layout its record gives, called directly."""
    layout = ArrayLayout((10, 4), np.dtype(np.float32), (4, 4), "none")
    mutated = data.draw(mutations(files.leaf))
    try:
        doc = json.loads(mutated)
    except (ValueError, RecursionError):
        return  # _read refuses what does not parse (test_fuzz_zarr_json)
    if not isinstance(outcome(layout.check_zarr_json, doc, "w"), CorruptCheckpointError):
        assert (doc["shape"], doc["data_type"]) == ([10, 4], "float32")


@FEWER
@given(data=st.data())
def test_fuzz_zarr_json(files, data):
    """``w`` cross-checked as if it were large (``CROSS_CHECK_BYTES`` is 64 MiB)."""
    mutated = data.draw(mutations(files.leaf))
    with mock.patch.object(_read, "CROSS_CHECK_BYTES", 0), files.swapped(files.leaf_path, mutated):
        loads_as_saved(files.root)


def test_the_fuzzed_checkpoint(files):
    """What the fuzz assumes: it loads, ``w`` has several chunks, leaf fields are found."""
    loads_as_saved(files.root)
    with mock.patch.object(_read, "CROSS_CHECK_BYTES", 0):
        loads_as_saved(files.root)
    assert zarrckpt.open_checkpoint(str(files.root))["w"].chunks == (4, 4)
    fields = {loc[-1] for loc in files.leaf_fields if isinstance(loc[-1], str)}
    assert {"path", "kind", "shape", "dtype", "chunks", "codec", "pytype", "unit"} <= fields
    assert not any(loc[-1] in ("keys", "names") for loc in files.leaf_fields)
