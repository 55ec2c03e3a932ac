from collections import OrderedDict, namedtuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zarrckpt._tree import escape, flatten, map_leaves, unescape, unflatten
from zarrckpt.errors import UnsupportedLeafError

Point = namedtuple("Point", "x y")


def _valid_zarr_name(name: str) -> bool:
    return bool(name) and "/" not in name and name not in (".", "..") and not name.startswith("__")


@given(st.text())
def test_escape_is_reversible_and_valid(key):
    name = escape(key)
    assert _valid_zarr_name(name)
    assert unescape(name) == key


@given(st.text(), st.text())
def test_escape_is_injective(a, b):
    if a != b:
        assert escape(a) != escape(b)


@pytest.mark.parametrize(
    ("key", "name"),
    [("W", "W"), ("Dense0.W", "Dense0.W"), ("a/b", "a%2Fb"), ("", "%"), (".", "%2E"),
     ("..", "%2E%2E"), ("__x", "%5F_x"), ("50%", "50%25"), ("_x", "_x")],
)  # fmt: skip
def test_escape_examples(key, name):
    assert escape(key) == name


def test_flatten_paths_and_groups():
    tree = {"net": {"l1": {"W": 1}, "l2": [2, (3, None)]}, "p": Point(4, 5), 7: 6}
    record, leaves, groups = flatten(tree)
    assert [p for p, _ in leaves] == ["net/l1/W", "net/l2/0", "net/l2/1/0", "p/x", "p/y", "7"]
    assert [v for _, v in leaves] == [1, 2, 3, 4, 5, 6]
    assert groups == ["", "net", "net/l1", "net/l2", "net/l2/1", "p"]
    by_path = dict(leaves)
    rebuilt = unflatten(record, lambda rec: by_path[rec["path"]])
    assert rebuilt == tree
    assert isinstance(rebuilt["p"], Point)


def test_int_and_str_keys_that_collide_get_distinct_names():
    record, leaves, _ = flatten({1: "int", "1": "str"})
    assert sorted(p for p, _ in leaves) == ["%i1", "1"]
    by_path = dict(leaves)
    assert unflatten(record, lambda rec: by_path[rec["path"]]) == {1: "int", "1": "str"}


def test_ordered_dict_and_key_order_survive():
    tree = OrderedDict([("b", 1), ("a", 2)])
    record, leaves, _ = flatten(tree)
    out = unflatten(record, lambda rec: dict(leaves)[rec["path"]])
    assert type(out) is OrderedDict and list(out) == ["b", "a"]


@pytest.mark.parametrize("key", [1.5, (1, 2), True, None])
def test_unsupported_keys_name_the_path(key):
    with pytest.raises(UnsupportedLeafError, match=r"a/.*dict keys must be str or int"):
        flatten({"a": {key: 1}})


def test_missing_namedtuple_class_comes_back_as_dict():
    record, leaves, _ = flatten(Point(1, 2))
    record["class"] = "no_such_module:Point"
    seen = []
    out = unflatten(record, lambda rec: dict(leaves)[rec["path"]], seen.append)
    assert out == {"x": 1, "y": 2} and seen == ["no_such_module:Point"]


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
