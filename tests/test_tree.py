"""_tree: names, records, navigation, matching by original keys, rebuilding, validation."""

import contextlib
import copy
import json
import sys
import types
import unicodedata
from collections import OrderedDict, defaultdict, namedtuple

import numpy as np
import pytest
from helpers import nested_trees
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zarrckpt import _leaves, _tree
from zarrckpt._tree import (
    MAX_DEPTH,
    MAX_NAME_BYTES,
    NAMING_VERSION,
    children,
    escape,
    flatten,
    iter_leaf_records,
    labelled_children,
    map_leaves,
    match,
    rebuild,
    unescape,
    unflatten,
    validate,
)
from zarrckpt.errors import CorruptCheckpointError, UnsupportedLeafError

Point = namedtuple("Point", "x y")
Cased = namedtuple("Cased", "V v")

_WINDOWS_BAD = set('<>:"|?*\\')


def _valid_zarr_name(name: str) -> bool:
    return bool(name) and "/" not in name and name not in (".", "..") and not name.startswith("__")


def _portable(name: str) -> bool:
    """Valid for Zarr and for ext4, APFS, NTFS and object stores alike."""
    return (
        _valid_zarr_name(name)
        and not name.startswith(".")
        and name.casefold() != "zarr.json"
        and not (_WINDOWS_BAD & set(name))
        and not any(ord(c) < 32 or ord(c) == 127 for c in name)
        and name[-1] not in ". "
        and len(name.encode("utf-8")) <= MAX_NAME_BYTES
    )


def _names_of(record):
    """Every node name used anywhere in a record, grouped by parent."""
    out = []

    def walk(rec):
        kids = children(rec)
        out.append(list(kids))
        for child in kids.values():
            walk(child)

    walk(record)
    return out


def _with_layouts(record):
    """A record as the writer leaves it: every leaf with a (0-d int64) layout."""
    for rec in iter_leaf_records(record):
        rec.update(kind="ndarray", shape=[], dtype="int64", chunks=[], codec="none")
    return record


def _roundtrip(tree):
    record, leaves, _ = flatten(tree)
    by_path = dict(leaves)
    return unflatten(record, lambda rec: by_path[rec["path"]])


# --- escape -------------------------------------------------------------------------------------


@given(st.text())
def test_escape_is_reversible_and_portable(key):
    name = escape(key)
    assert _valid_zarr_name(name)
    assert unescape(name) == key
    if len(name.encode("utf-8", "surrogatepass")) <= MAX_NAME_BYTES:
        assert _portable(name) or name == "%"


@given(st.text(), st.text())
def test_escape_is_injective(a, b):
    if a != b:
        assert escape(a) != escape(b)


@given(st.text())
def test_escape_never_writes_the_marker_of_hashed_and_suffixed_names(key):
    assert "%~" not in escape(key)


@pytest.mark.parametrize(
    ("key", "name"),
    [("W", "W"), ("Dense0.W", "Dense0.W"), ("a/b", "a%2Fb"), ("", "%"), (".", "%2E"),
     ("..", "%2E%2E"), ("__x", "%5F_x"), ("50%", "50%25"), ("_x", "_x"),
     ("zarr.json", "%7Aarr.json"), ("ZARR.JSON", "%5AARR.JSON"), (".hidden", "%2Ehidden"),
     (".zarrckpt-lease", "%2Ezarrckpt-lease"), ("a:b", "a%3Ab"), ("x?", "x%3F"),
     ("end.", "end%2E"), ("end ", "end%20"), ("CON", "%43ON"), ("nul.txt", "%6Eul.txt"),
     ("com1", "%63om1"), ("console", "console"), ("c.0", "c.0"), ("ключ", "ключ")],
)  # fmt: skip
def test_escape_examples(key, name):
    assert escape(key) == name


# --- names of siblings ---------------------------------------------------------------------------


def test_naming_version():
    assert NAMING_VERSION == 2


def test_reserved_long_and_case_colliding_keys_get_portable_distinct_names():
    long_a, long_b = "é" * 200, "é" * 199 + "e"
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    tree = {"zarr.json": 1, ".zarrckpt-x": 2, "V": 3, "v": 4, long_a: 5, long_b: 6, nfc: 7,
            nfd: 8, "ǅ": 9, "ǆ": 10, "Straße": 11, "STRASSE": 12}  # fmt: skip
    record, leaves, _ = flatten(tree)
    names = [p for p, _ in leaves]
    assert all(_portable(n) for n in names), names
    folded = [unicodedata.normalize("NFKC", n.casefold()) for n in names]
    assert len(set(folded)) == len(folded)
    assert names[:4] == ["%7Aarr.json", "%2Ezarrckpt-x", "V", "v%~1"]
    assert names[4].startswith("é" * 100) and "%~" in names[4]  # readable prefix + hash
    assert names[5] != names[4]
    assert names[6] == nfc and names[7] == nfd + "%~1"
    assert names[11] == "STRASSE%~1"
    assert _roundtrip(tree) == tree
    assert record["keys"] == list(tree)  # the record keeps the original keys


def test_names_are_deterministic():
    tree = {"V": 1, "v": 2, ("a", "b"): 3, "a": {"b": 4}, "x" * 400: 5}
    assert flatten(tree)[0] == flatten(dict(tree))[0]


def test_a_suffixed_name_that_would_be_too_long_is_hashed():
    _, leaves, _ = flatten({"a" * 255: 1, "A" * 255: 2})
    first, second = (p for p, _ in leaves)
    assert first == "a" * 255
    assert len(second.encode()) <= MAX_NAME_BYTES and second.startswith("A" * 100)


def test_namedtuple_fields_differing_in_case_get_distinct_names():
    record, leaves, _ = flatten(Cased(1, 2))
    assert [p for p, _ in leaves] == ["V", "v%~1"]
    assert record["names"] == ["V", "v%~1"] and record["fields"] == ["V", "v"]
    assert _roundtrip(Cased(1, 2)) == Cased(1, 2)


# --- containers ----------------------------------------------------------------------------------


def test_flatten_paths_and_groups():
    tree = {"net": {"l1": {"W": 1}, "l2": [2, (3, None)]}, "p": Point(4, 5), 7: 6}
    _, leaves, groups = flatten(tree)
    assert [p for p, _ in leaves] == ["net/l1/W", "net/l2/0", "net/l2/1/0", "p/x", "p/y", "7"]
    assert [v for _, v in leaves] == [1, 2, 3, 4, 5, 6]
    assert groups == ["", "net", "net/l1", "net/l2", "net/l2/1", "p"]
    rebuilt = _roundtrip(tree)
    assert rebuilt == tree
    assert isinstance(rebuilt["p"], Point)


def test_int_and_str_keys_that_collide_get_distinct_names():
    _, leaves, _ = flatten({1: "int", "1": "str"})
    assert sorted(p for p, _ in leaves) == ["%i1", "1"]
    assert _roundtrip({1: "int", "1": "str"}) == {1: "int", "1": "str"}


class _Spelt(int):
    """An int key that spells itself otherwise (as ``IntEnum`` did before Python 3.11)."""

    def __str__(self):
        return f"spelt{int(self)}"


class _Shouted(str):
    def __str__(self):
        return self.upper()


@pytest.mark.parametrize("plain_first", [True, False])
def test_subclassed_keys_are_named_by_value_whatever_was_named_before(plain_first):
    # Equal keys share a cache entry: a key's name never depends on which class of it the
    # process named first, and is the decimal spelling / escape the format specifies.
    plain = {1: 0, "a": 0, (2, "b"): 0}
    odd = {_Spelt(1): 0, _Shouted("a"): 0, (_Spelt(2), _Shouted("b")): 0}
    _tree._sibling_names_of.cache_clear()
    for tree in (plain, odd) if plain_first else (odd, plain):
        _, leaves, _ = flatten({"x": tree})
        assert [p for p, _ in leaves] == ["x/1", "x/a", "x/2/b"]
        _, leaves, _ = flatten({"y": dict(list(tree.items())[:2])})  # (no tuple key)
        assert [p for p, _ in leaves] == ["y/1", "y/a"]


def test_ordered_dict_and_key_order_survive():
    tree = OrderedDict([("b", 1), ("a", 2)])
    out = _roundtrip(tree)
    assert type(out) is OrderedDict and list(out) == ["b", "a"]


@pytest.mark.parametrize(
    ("key", "message"),
    [(1.5, r"a/1\.5: dict keys must be str, int or tuples of them, got float"),
     (True, r"a/True: dict keys must be str, int or tuples of them, got bool"),
     (None, r"a/None: dict keys must be str, int or tuples of them, got NoneType"),
     ((), r"a/\(\): a tuple dict key must not be empty"),
     (("x", 1.5), r"a/\('x', 1\.5\): tuple dict keys may hold str and int only, got float"),
     (("x", ("y",)), r"tuple dict keys may hold str and int only, got tuple")],
)  # fmt: skip
def test_unsupported_keys_name_the_path(key, message):
    with pytest.raises(UnsupportedLeafError, match=message):
        flatten({"a": {key: 1}})


def test_a_tree_that_contains_itself_is_refused():
    loop = []
    loop.append(loop)
    with pytest.raises(UnsupportedLeafError, match=f"nests deeper than {MAX_DEPTH} levels"):
        flatten({"a": loop})


def test_map_leaves_keeps_container_types():
    tree = {"a": [1, (2, Point(3, 4))], "b": OrderedDict(c=5), "n": None}
    out = map_leaves(tree, lambda path, v: f"{path}={v}")
    assert out == {"a": ["a/0=1", ("a/1/0=2", Point("a/1/1/x=3", "a/1/1/y=4"))],
                   "b": OrderedDict(c="b/c=5"), "n": None}  # fmt: skip
    assert isinstance(out["a"][1][1], Point) and isinstance(out["b"], OrderedDict)


def test_single_leaf_tree():
    record, leaves, groups = flatten(42)
    assert leaves == [("value", 42)] and groups == []
    assert unflatten(record, lambda rec: 42) == 42


# --- tuple keys ----------------------------------------------------------------------------------


def test_tuple_keys_are_stored_at_the_path_they_spell():
    tree = {("layers", 0, "weight"): 1, ("layers", 0, "bias"): 2, ("layers", 2, "weight"): 3,
            "epoch": 4}  # fmt: skip
    record, leaves, groups = flatten(tree)
    assert [p for p, _ in leaves] == [
        "layers/0/weight", "layers/0/bias", "layers/2/weight", "epoch"
    ]  # fmt: skip
    assert groups == ["", "layers", "layers/0", "layers/2"]  # a group per intermediate level
    assert record["keys"] == [["layers", 0, "weight"], ["layers", 0, "bias"],
                              ["layers", 2, "weight"], "epoch"]  # fmt: skip
    assert record["names"][0] == ["layers", "0", "weight"] and record["names"][3] == "epoch"
    out = _roundtrip(tree)
    assert out == tree and list(out) == list(tree)


def test_interleaved_tuple_keys_keep_their_order():
    tree = {("a", 1): 1, ("b", 1): 2, ("a", 2): 3}
    out = _roundtrip(tree)
    assert list(out) == [("a", 1), ("b", 1), ("a", 2)]


@pytest.mark.parametrize(
    ("tree", "paths"),
    [({("a", "b"): 1, "a": {"b": 2}}, ["a/b", "a%~1/b"]),
     ({"a": {"b": 2}, ("a", "b"): 1}, ["a/b", "a%~1/b"]),
     ({("a",): 1, "a": 2}, ["a", "a%~1"]),
     ({("a", "b"): 1, ("a",): 2}, ["a/b", "a%~1"]),
     ({(0, "x"): 1, ("0", "x"): 2}, ["%i0/x", "0/x"]),
     ({("A", "x"): 1, ("a", "y"): 2}, ["A/x", "a%~1/y"]),
     ({"a": 1, ("a", "b"): 2, ("a", "c"): 3}, ["a", "a%~1/b", "a%~1/c"])],
)  # fmt: skip
def test_tuple_keys_colliding_with_other_names_round_trip(tree, paths):
    record, leaves, _ = flatten(tree)
    assert [p for p, _ in leaves] == paths
    _with_layouts(record)
    validate(json.loads(json.dumps(record)))
    out = _roundtrip(tree)
    assert out == tree and list(out) == list(tree)
    assert all(type(k) is type(k2) for k, k2 in zip(out, tree, strict=True))


def test_children_shows_intermediate_groups_of_tuple_keys():
    tree = {"state": {("layers", 0, "w"): 1, ("layers", 2, "w"): 2, "n": 3}}
    record, _, _ = flatten(tree)
    state = children(record)["state"]
    assert list(children(state)) == ["layers", "n"]
    layers = children(state)["layers"]
    assert list(children(layers)) == ["0", "2"]
    leaf = children(children(layers)["2"])["w"]
    assert leaf == {"type": "leaf", "path": "state/layers/2/w"}
    # a group is an ordinary dict record keyed by the rest of each tuple key
    assert unflatten(layers, lambda rec: rec["path"]) == {
        (0, "w"): "state/layers/0/w", (2, "w"): "state/layers/2/w"
    }  # fmt: skip
    assert unflatten(children(layers)["0"], lambda rec: rec["path"]) == {"w": "state/layers/0/w"}
    assert [r["path"] for r in iter_leaf_records(layers)] == [
        "state/layers/0/w", "state/layers/2/w"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "tree",
    [{"a": 1}, [1, 2], (1,), Point(1, 2), OrderedDict(a=1), None, 5,
     {("a", "b"): 1}, defaultdict(list, a=1)],
)  # fmt: skip
def test_children_covers_every_record_type(tree):
    record, leaves, _ = flatten(tree)
    kids = children(record)
    expected = [p.split("/")[0] for p, _ in leaves] if record["type"] != "leaf" else []
    assert list(kids) == list(dict.fromkeys(expected))


def test_labelled_children_give_original_keys_for_display():
    tree = {"<b>x</b>": 1, ("layers", 0): 2, 3: Point(4, 5), "V": 6, "v": 7}
    record, _, _ = flatten(tree)
    assert [(label, name) for label, name, _ in labelled_children(record)] == [
        ("<b>x</b>", "%3Cb%3Ex%3C%2Fb%3E"), ("layers", "layers"), ("3", "3"), ("V", "V"),
        ("v", "v%~1")
    ]  # fmt: skip
    point = children(record)["3"]
    assert [(label, name) for label, name, _ in labelled_children(point)] == [
        ("x", "x"),
        ("y", "y"),
    ]
    layers = children(record)["layers"]
    assert [(label, name) for label, name, _ in labelled_children(layers)] == [("0", "0")]


def test_children_reads_version_1_records():
    v1 = {"type": "namedtuple", "class": "nowhere:P", "fields": ["x", "y"],
          "children": [{"type": "leaf", "path": "x"}, {"type": "leaf", "path": "y"}]}  # fmt: skip
    assert list(children(v1)) == ["x", "y"]
    v1_dict = {"type": "dict", "keys": ["a:b", ".h"], "names": ["a:b", ".h"],
               "children": [{"type": "leaf", "path": "a:b"}, {"type": "leaf", "path": ".h"}]}  # fmt: skip
    assert list(children(v1_dict)) == ["a:b", ".h"]


# --- classes: looked up, never imported ----------------------------------------------------------


def test_missing_namedtuple_class_comes_back_as_dict():
    record, leaves, _ = flatten(Point(1, 2))
    record["class"] = "no_such_module:Point"
    seen = []
    out = unflatten(record, lambda rec: dict(leaves)[rec["path"]], seen.append)
    assert out == {"x": 1, "y": 2} and seen == ["no_such_module:Point"]


def _side_effect_module(tmp_path, monkeypatch, name):
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "print('zarrckpt imported me!')\n"
        "from collections import namedtuple\n"
        "P = namedtuple('P', 'x y')\n"
        "class D(dict):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return marker


def test_recorded_classes_are_never_imported(tmp_path, monkeypatch):
    name = "zarrckpt_side_effect_mod"
    marker = _side_effect_module(tmp_path, monkeypatch, name)
    record, leaves, _ = flatten({"p": Point(1, 2), "d": OrderedDict(a=3)})
    record["children"][0]["class"] = f"{name}:P"
    record["children"][1]["class"] = f"{name}:D"
    seen = []
    out = unflatten(record, lambda rec: dict(leaves)[rec["path"]], seen.append)
    assert out == {"p": {"x": 1, "y": 2}, "d": OrderedDict(a=3)}
    assert type(out["p"]) is dict and type(out["d"]) is OrderedDict
    assert seen == [f"{name}:P", f"{name}:D"]
    assert name not in sys.modules and not marker.exists()


def test_a_loaded_class_is_used_only_if_it_still_fits(monkeypatch):
    record, leaves, _ = flatten(Point(1, 2))
    seen = []
    for spec in ("builtins:tuple", "os:system", "collections:OrderedDict", f"{__name__}:Cased"):
        record["class"] = spec
        out = unflatten(record, lambda rec: dict(leaves)[rec["path"]], seen.append)
        assert out == {"x": 1, "y": 2}
    assert len(seen) == 4
    record["class"] = f"{__name__}:Point"
    assert type(unflatten(record, lambda rec: dict(leaves)[rec["path"]])) is Point


def test_lookup_does_not_trigger_module_getattr(monkeypatch):
    calls = []
    module = types.ModuleType("zarrckpt_lazy_mod")
    module.__getattr__ = lambda attr: calls.append(attr) or Point
    monkeypatch.setitem(sys.modules, "zarrckpt_lazy_mod", module)
    record, leaves, _ = flatten(Point(1, 2))
    record["class"] = "zarrckpt_lazy_mod:Point"
    seen = []
    assert unflatten(record, lambda rec: dict(leaves)[rec["path"]], seen.append) == {"x": 1, "y": 2}
    assert calls == [] and seen == ["zarrckpt_lazy_mod:Point"]


def test_dict_subclasses_come_back_when_loaded():
    tree = {"dd": defaultdict(list, a=1), "od": OrderedDict(b=2)}
    out = _roundtrip(tree)
    assert type(out["dd"]) is defaultdict and out["dd"] == {"a": 1}
    assert type(out["od"]) is OrderedDict


def test_a_dict_class_whose_constructor_does_not_take_pairs_gives_a_dict():
    from collections import Counter

    record, leaves, _ = flatten(Counter(a=1, b=2))
    seen = []
    out = unflatten(record, lambda rec: dict(leaves)[rec["path"]], seen.append)
    assert type(out) is dict and out == {"a": 1, "b": 2} and seen == ["collections:Counter"]


# --- match and rebuild ---------------------------------------------------------------------------


def _match_paths(record, target, prefix=""):
    pairs, unexpected = match(record, target, prefix)
    return [(p, None if r is None else r["path"]) for p, _, r in pairs], unexpected


def test_match_pairs_by_original_keys_in_target_order():
    saved = {"b": 1, "a": [2, 3], ("t", 0): 4, "gone": 5}
    record, _, _ = flatten(saved)
    target = {"a": (0, 0, 0), ("t", 0): 0, "b": 0, "new": {"x": 0}}
    paths, unexpected = _match_paths(record, target)
    assert paths == [("a/0", "a/0"), ("a/1", "a/1"), ("a/2", None), ("t/0", "t/0"),
                     ("b", "b"), ("new/x", None)]  # fmt: skip
    assert unexpected == ["gone"]


def test_match_uses_recorded_names_not_respelt_ones():
    # a version-1 record: names were not escaped as version 2 escapes them
    v1 = {"type": "dict", "keys": ["a:b", ".h", "p"], "names": ["a:b", ".h", "p"],
          "children": [{"type": "leaf", "path": "a:b"}, {"type": "leaf", "path": ".h"},
                       {"type": "namedtuple", "class": "x:P", "fields": ["x", "y"],
                        "children": [{"type": "leaf", "path": "p/x"},
                                     {"type": "leaf", "path": "p/y"}]}]}  # fmt: skip
    target = {"a:b": 0, ".h": 0, "p": Point(0, 0), "new:key": 0}
    paths, unexpected = _match_paths(v1, target)
    assert paths == [("a:b", "a:b"), (".h", ".h"), ("p/x", "p/x"), ("p/y", "p/y"),
                     ("new%3Akey", None)]  # fmt: skip
    assert unexpected == []


def test_match_across_container_kinds_and_prefix():
    record, _, _ = flatten({"p": Point(1, 2), "l": [1, 2]})
    target = {"p": {"y": 0, "x": 0}, "l": (0, 0)}
    paths, unexpected = _match_paths(record, target, prefix="sub")
    assert paths == [("sub/p/y", "p/y"), ("sub/p/x", "p/x"), ("sub/l/0", "l/0"),
                     ("sub/l/1", "l/1")]  # fmt: skip
    assert unexpected == []


def test_match_leaf_against_container_and_back():
    record, _, _ = flatten({"a": 1, "b": {"c": 2}})
    paths, unexpected = _match_paths(record, {"a": {"x": 0}, "b": 0})
    assert paths == [("a/x", None), ("b", None)]
    assert unexpected == ["a", "b/c"]
    assert _match_paths(flatten(7)[0], 0) == ([("value", "value")], [])


def test_match_a_group_of_tuple_keys_from_children():
    record, _, _ = flatten({("layers", 0, "w"): 1, ("layers", 1, "w"): 2})
    layers = children(record)["layers"]
    paths, unexpected = _match_paths(layers, {(0, "w"): 0, (1, "w"): 0}, prefix="layers")
    assert paths == [("layers/0/w", "layers/0/w"), ("layers/1/w", "layers/1/w")]
    assert unexpected == []


class Attrs(dict):
    """A dict subclass with instance attributes."""


def test_rebuild_keeps_every_container_type():
    attrs = Attrs(k=6)
    attrs.note = "kept"
    target = {"dd": defaultdict(list, a=1), "od": OrderedDict(b=2), "nt": Point(3, [4]),
              "t": (5,), "attrs": attrs, "n": None, ("t", 1): 7}  # fmt: skip
    out = rebuild(target, [10, 20, 30, 40, 50, 60, 70])
    assert type(out["dd"]) is defaultdict and out["dd"].default_factory is list
    assert out["dd"] == {"a": 10} and out["od"] == OrderedDict(b=20)
    assert out["nt"] == Point(30, [40]) and type(out["nt"]) is Point
    assert out["t"] == (50,) and out["n"] is None and out[("t", 1)] == 70
    assert type(out["attrs"]) is Attrs and out["attrs"].note == "kept" and out["attrs"]["k"] == 60
    assert target["dd"]["a"] == 1  # the target itself is untouched
    with pytest.raises(ValueError, match="rebuild: 6 values for a target with more leaves"):
        rebuild(target, range(6))
    with pytest.raises(ValueError, match="rebuild: 8 values for a target of 7 leaves"):
        rebuild(target, range(8))


def test_match_then_rebuild_restores_into_the_target():
    saved = {"w": 1, ("x", "y"): 2, "p": Point(3, 4)}
    record, leaves, _ = flatten(saved)
    by_path = dict(leaves)
    target = {"p": Point(0, 0), ("x", "y"): 0, "extra": 9}
    pairs, unexpected = match(record, target)
    values = [value if rec is None else by_path[rec["path"]] for _, value, rec in pairs]
    assert rebuild(target, values) == {"p": Point(3, 4), ("x", "y"): 2, "extra": 9}
    assert unexpected == ["w"]


# --- validation ----------------------------------------------------------------------------------


def _valid_record():
    tree = {"net": {"l1": {"W": 0}}, "p": Point(1, 2), ("layers", 0, "w"): 3, "lst": [4]}
    return _with_layouts(flatten(tree)[0])


def _set(path, value):
    def mutate(rec):
        node = rec
        for step in path[:-1]:
            node = node[step]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    return mutate


_DELETE = object()
_W = ["children", 0, "children", 0, "children", 0]  # the leaf net/l1/W


def _deep(rec):
    for _ in range(MAX_DEPTH + 5):
        rec = {"type": "list", "children": [rec]}
    return rec


@pytest.mark.parametrize(
    ("mutate", "message"),
    [(_set(["type"], "blob"), "at the root: unknown node type 'blob'"),
     (lambda r: r.clear(), "at the root: unknown node type None"),
     (_set(["children", 0, "names"], _DELETE), "at 'net': 'names' must be an array, found null"),
     (_set(["names"], ["net", "p"]), "at the root: 'names' has 2 entries for 4 children"),
     (_set(["children"], {}), "at the root: a dict node needs a 'children' array"),
     (_set(["children", 0], []), "at 'net': a node must be an object, found array"),
     (_set([*_W, "path"], "/etc/passwd"), "at 'net/l1/W': the leaf path '/etc/passwd' is absolute"),
     (_set([*_W, "path"], "net/../../x"), "the leaf path 'net/../../x' contains '.' or '..'"),
     (_set([*_W, "path"], "net/./l1/W"), "contains '.' or '..'"),
     (_set([*_W, "path"], "net//W"), "the leaf path 'net//W' has an empty component"),
     (_set([*_W, "path"], "net\\l1\\W"), "contains a backslash"),
     (_set([*_W, "path"], "net/l1/W\x00"), "contains a NUL character"),
     (_set([*_W, "path"], ""), "the leaf path '' is empty"),
     (_set([*_W, "path"], 7), "at 'net/l1/W': a leaf's 'path' must be a string, found int"),
     (_set([*_W, "path"], "net/l1/X"),
      "at 'net/l1/W': the leaf path 'net/l1/X' does not match the names of its parents ('net/l1/W')"),
     (_set(["children", 0, "children", 0, "names"], ["zarr.json"]), "the name 'zarr.json' is reserved"),
     (_set(["children", 0, "children", 0, "names"], [".."]), "the name '..' is not allowed"),
     (_set(["children", 0, "children", 0, "names"], ["a/b"]), "contains a slash or backslash"),
     (_set(["children", 0, "children", 0, "names"], ["__W"]), "starts with '__' (reserved by Zarr)"),
     (_set(["children", 0, "children", 0, "names"], [""]), "a name is empty"),
     (_set(["children", 0, "children", 0, "names"], [3]), "a name must be a string, found int"),
     (_set(["names", 1], "net"), "at the root: two children are both named 'net'"),
     (_set(["keys", 1], "net"), "at the root: two children have the same key"),
     (_set(["keys", 2], ["layers", 0]), "the tuple key ['layers', 0] needs one name per part"),
     (_set(["keys", 2], []), "a tuple key is empty"),
     (_set(["keys", 2], {"a": 1}), "a key must be a string, an integer or an array of them, found object"),
     (_set(["keys", 0], True), "a key must be a string, an integer or an array of them, found boolean"),
     (_set(["names", 0], "layers"), "'layers' is both a child and a group of tuple keys"),
     (_set(["class"], 5), "at the root: 'class' must be a string, found int"),
     (_set(["children", 1, "fields"], ["x"]), "at 'p': 'fields' has 1 entries for 2 children"),
     (_set(["children", 1, "class"], None), "at 'p': 'class' must be a string, found null"),
     (_set([*_W, "shape"], "abc"), "the leaf's 'shape' must be an array of at most 64 non-negative"),
     (_set([*_W, "shape"], [-1]), "the leaf's 'shape' must be an array"),
     (_set([*_W, "chunks"], [0]), "the leaf's 'chunks' must be an array of positive integers"),
     (_set([*_W, "dtype"], "object"), "unsupported Zarr data type 'object'"),
     (_set([*_W, "codec"], "lz4"), "unknown codec 'lz4'"),
     (_set([*_W, "kind"], "py"), "the leaf's 'pytype' must be one of"),
     (_set([*_W, "kind"], ["x"]), "the leaf's 'kind' must be a string"),
     (_set([*_W, "kind"], "prngkey"), "a prngkey leaf needs an 'impl' string"),
     (_set([*_W, "kind"], "quantity"), "a quantity leaf needs a 'unit' object"),
     (lambda r: r.update(_deep(r)), f"the tree nests deeper than {MAX_DEPTH} levels")],
)  # fmt: skip
def test_hostile_records_raise_corrupt_checkpoint_naming_the_place(mutate, message):
    record = _valid_record()
    validate(record)
    mutate(record)
    with pytest.raises(CorruptCheckpointError, match="malformed tree record") as info:
        validate(record)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "record",
    [{"type": "pytree", "class": "m:C", "keys": [["attr", 1]], "names": ["a"],
      "children": [{"type": "none"}]},
     {"type": "pytree", "class": "m:C", "keys": [["what", "a"]], "names": ["a"],
      "children": [{"type": "none"}]},
     {"type": "pytree", "class": "m:C", "keys": [["seq", -1]], "names": ["a"],
      "children": [{"type": "none"}]},
     {"type": "state", "class": "m:S", "children": []},
     {"type": "state", "children": [{"type": "none"}]}],
)  # fmt: skip
def test_hostile_pytree_and_state_records(record):
    with pytest.raises(CorruptCheckpointError, match="malformed tree record at the root"):
        validate(record)


def test_version_1_records_validate():
    v1 = {"type": "dict", "keys": ["a:b", ".h", 1, "1", "p"], "names": ["a:b", ".h", "%i1", "1", "p"],
          "children": [{"type": "leaf", "path": "a:b"}, {"type": "leaf", "path": ".h"},
                       {"type": "leaf", "path": "%i1"}, {"type": "leaf", "path": "1"},
                       {"type": "namedtuple", "class": "x:P", "fields": ["x", "y"],
                        "children": [{"type": "leaf", "path": "p/x"},
                                     {"type": "leaf", "path": "p/y"}]}]}  # fmt: skip
    validate(_with_layouts(v1))


# --- fuzzing ---------------------------------------------------------------------------------------

_keys = st.one_of(
    st.text(max_size=4),
    st.integers(-3, 30),
    st.tuples(st.one_of(st.text(max_size=3), st.integers(0, 3)))
    .flatmap(lambda first: st.lists(st.one_of(st.sampled_from("abAB"), st.integers(0, 2)), max_size=2).map(lambda rest: (*first, *rest))),
)  # fmt: skip
_trees = nested_trees(st.one_of(st.integers(0, 9), st.none()), _keys, Point)
_json = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-2, 2**64), st.floats(), st.text(max_size=4),
        st.sampled_from(["leaf", "dict", "odict", "list", "tuple", "namedtuple", "pytree", "state",
                         "none", "..", ".", "/x", "a\\b", "zarr.json", "__x", "", "int64", "py",
                         "quantity", "prngkey", "zstd:1", "attr", "key", "seq", "index",
                         f"{__name__}:Point", "collections:defaultdict", "builtins:dict"]),
    ),
    lambda kids: st.one_of(
        st.lists(kids, max_size=3),
        st.dictionaries(
            st.sampled_from(["type", "path", "keys", "names", "children", "fields", "class",
                             "shape", "dtype", "chunks", "codec", "kind", "pytype", "impl",
                             "unit"]),
            kids, max_size=4),
    ),
    max_leaves=6,
)  # fmt: skip


def _containers(value):
    out, stack = [], [value]
    while stack:
        node = stack.pop()
        if isinstance(node, (dict, list)):
            out.append(node)
            stack.extend(node.values() if isinstance(node, dict) else node)
    return out


def _mutate(data, record):
    target = data.draw(st.sampled_from(_containers(record)))
    if isinstance(target, dict):
        key = data.draw(st.sampled_from([*sorted(target), "type", "path", "names", "children"]))
        if key in target and data.draw(st.booleans()):
            del target[key]
        else:
            target[key] = data.draw(_json)
    elif target and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(target) - 1))
        op = data.draw(st.sampled_from(["delete", "replace", "duplicate"]))
        if op == "delete":
            del target[i]
        elif op == "replace":
            target[i] = data.draw(_json)
        else:
            target.append(copy.deepcopy(target[i]))
    else:
        target.append(data.draw(_json))


def _exercise(record):
    """Everything a reader does with a validated record; none of it may raise."""
    leaves = list(iter_leaf_records(record))

    def navigate(rec, depth=0):
        for child in children(rec).values():
            navigate(child, depth + 1)

    navigate(record)
    seen = []
    loaded = unflatten(record, lambda rec: np.zeros(()), seen.append)
    pairs, unexpected = match(record, loaded)
    assert unexpected == []
    assert all(rec is not None for _, _, rec in pairs)
    assert sorted(id(r) for _, _, r in pairs) == sorted(id(r) for r in leaves)
    for rec in leaves:
        shape = tuple(rec["shape"])
        if np.prod(shape, dtype=float) <= 1000:
            from zarrckpt._format import ArrayLayout

            array = np.zeros(shape, ArrayLayout.from_json(rec).dtype)
            with contextlib.suppress(CorruptCheckpointError):
                _leaves.decode(rec, array)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=_trees, data=st.data())
def test_fuzzed_records_raise_only_corrupt_checkpoint(tree, data):
    record = json.loads(json.dumps(_with_layouts(flatten(tree)[0])))
    validate(record)
    _exercise(record)
    for _ in range(data.draw(st.integers(1, 3))):
        _mutate(data, record)
    try:
        validate(record)
    except CorruptCheckpointError:
        return
    _exercise(record)


@settings(max_examples=100, deadline=None)
@given(tree=_trees)
def test_random_trees_with_tuple_keys_round_trip(tree):
    record, leaves, groups = flatten(tree)
    record = json.loads(json.dumps(_with_layouts(record)))
    validate(record)
    assert _roundtrip(tree) == tree
    for names in _names_of(record):
        assert all(_portable(n) or n.startswith("%i") for n in names)
        folded = [unicodedata.normalize("NFKC", n.casefold()) for n in names]
        assert len(set(folded)) == len(folded)
    assert len(set(groups)) == len(groups)
    leaf_paths = {p for p, _ in leaves}
    assert not leaf_paths & set(groups)
    if record["type"] == "leaf":
        return
    for path in leaf_paths:  # every parent of a leaf is a group the writer creates
        parts = path.split("/")
        assert all("/".join(parts[:i]) in groups for i in range(len(parts)))


def test_a_sequence_target_matches_decimal_string_keys(tmp_path):
    """msgpack checkpoints (flax, braintools, and `zarrckpt convert` of them) store a list as a
    dict keyed "0", "1", ...; a target's list restores from it by position."""
    import numpy as np

    import zarrckpt

    root = str(tmp_path / "ckpt")
    zarrckpt.save_pytree(root, {"layers": {"0": np.ones(2), "1": np.arange(3)}}, verbose=False)
    got = zarrckpt.load_pytree(root, {"layers": [np.zeros(2), np.zeros(3, np.int64)]})
    assert isinstance(got["layers"], list)
    assert got["layers"][0].tolist() == [1, 1] and got["layers"][1].tolist() == [0, 1, 2]
    # a real int key wins over its decimal spelling
    zarrckpt.save_pytree(root, {"d": {0: np.zeros(1), "0": np.ones(1)}}, verbose=False)
    got = zarrckpt.load_pytree(root, {"d": [np.full(1, 5.0)]}, mismatch="ignore")
    assert got["d"][0].tolist() == [0.0]


@pytest.mark.parametrize("background", [False, True])
def test_a_saved_tree_is_freed_as_soon_as_the_caller_drops_it(tmp_path, background):
    """Nothing of a save keeps the caller's arrays alive after it: no reference cycle waits
    for the garbage collector (a background save runs with it on, so a cycle would move to
    the oldest generation and keep, say, a JAX model's old parameters until a full pass)."""
    import gc
    import weakref

    import zarrckpt

    array = np.arange(1000.0)
    alive = weakref.ref(array)
    gc.disable()
    try:
        if background:
            with zarrckpt.AsyncManager() as manager:
                zarrckpt.save_pytree(tmp_path / "c", {"a": {"b": array}}, async_manager=manager)
        else:
            zarrckpt.save_pytree(tmp_path / "c", {"a": {"b": array}}, verbose=False)
        del array
        assert alive() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("with_target", [False, True])
def test_a_loaded_tree_is_freed_as_soon_as_the_caller_drops_it(tmp_path, with_target):
    """Likewise for loads: a notebook that loads a large checkpoint again and again holds
    one copy, not every copy until the garbage collector's next full pass."""
    import gc
    import weakref

    import zarrckpt

    tree = {"a": {"b": np.arange(1000.0)}, "c": [np.zeros(3)]}
    zarrckpt.save_pytree(tmp_path / "c", tree, verbose=False)
    gc.disable()
    try:
        out = zarrckpt.load_pytree(tmp_path / "c", target=tree if with_target else None)
        alive = weakref.ref(out["a"]["b"])
        del out
        assert alive() is None
    finally:
        gc.enable()
