"""PyTrees beyond dict/list/tuple: tuple keys, brainstate states, JAX nodes, PRNG keys, names."""

import dataclasses
import json
import os
import subprocess
import sys
import unicodedata
from collections import namedtuple
from collections.abc import Mapping
from pathlib import Path

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_same, nested_trees, save
from helpers import only_step_dir as _step_dir
from helpers import tree_record as _record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import zarrckpt
from zarrckpt import _leaves
from zarrckpt._tree import MAX_NAME_BYTES
from zarrckpt.errors import CorruptCheckpointError, StructureMismatchError

FlattedDict = brainstate.util.FlattedDict
Point = namedtuple("Point", "x y")


def _net():
    net = brainstate.nn.Sequential(
        brainstate.nn.Linear(3, 4), brainstate.nn.ReLU(), brainstate.nn.Linear(4, 2)
    )
    return brainstate.nn.init_all_states(net)


def _values(states):
    return {k: jax.tree.map(np.asarray, s.value) for k, s in states.items()}


# --- brainstate: FlattedDict of tuple paths, States holding dicts ------------------------------


def test_brainstate_states_round_trip_without_target(local_url):
    states = _net().states()
    assert type(states) is FlattedDict and all(isinstance(k, tuple) for k in states)
    save(local_url, {"state": states})
    out = zarrckpt.load_pytree(local_url)["state"]
    assert type(out) is FlattedDict  # brainstate is loaded: the recorded class comes back
    assert list(out) == list(states)  # same tuple keys, same order
    for key, state in states.items():
        assert set(out[key]) == {"weight", "bias"}  # a State holding a dict: its dict
        for name, value in state.value.items():
            np.testing.assert_array_equal(out[key][name], np.asarray(value))
    step = _step_dir(local_url)
    for group in ("state", "state/layers", "state/layers/0", "state/layers/2"):
        assert json.loads((step / group / "zarr.json").read_text())["node_type"] == "group"
    assert (step / "state/layers/0/weight/weight/zarr.json").exists()


def test_brainstate_states_restored_in_place_into_a_target(local_url):
    saved = _net()
    save(local_url, {"state": saved.states()})
    other = _net()
    target = {"state": other.states()}
    before = dict(target["state"])
    assert not np.array_equal(
        np.asarray(other.layers[0].weight.value["weight"]),
        np.asarray(saved.layers[0].weight.value["weight"]),
    )
    out = zarrckpt.load_pytree(local_url, target)
    assert type(out["state"]) is FlattedDict and list(out["state"]) == list(before)
    for key, state in out["state"].items():
        assert state is before[key]  # the module's own State objects, updated in place
    for key, value in _values(saved.states()).items():
        for name in value:
            np.testing.assert_array_equal(np.asarray(other.states()[key].value[name]), value[name])
    x = jnp.ones((1, 3))
    np.testing.assert_allclose(np.asarray(other(x)), np.asarray(saved(x)))


def test_braintools_flatteneddict_case(local_url):
    """braintools/file/_msg_checkpoint_test.py::test_flatteneddict, against zarrckpt."""
    net = brainstate.nn.Sequential(
        brainstate.nn.Linear(10, 20), brainstate.nn.ReLU(), brainstate.nn.Linear(20, 5)
    )
    net = brainstate.nn.init_all_states(net)
    data = {"state": net.states(), "version": 1.0}
    save(local_url, data)
    loaded = zarrckpt.load_pytree(local_url)
    assert loaded["version"] == 1.0 and list(loaded["state"]) == list(data["state"])
    loaded2 = zarrckpt.load_pytree(local_url, target=data)
    assert loaded2["state"] is not None and loaded2["version"] == 1.0
    for key, state in data["state"].items():
        assert loaded2["state"][key] is state


def test_flatteddict_of_arrays_and_plain_tuple_keys(local_url):
    tree = {
        "fd": FlattedDict({("a",): np.arange(3), ("b", 1): np.arange(2)}),
        "plain": {("layers", 0, "weight"): np.ones(2), "n": 3, ("layers", 0, "bias"): np.zeros(1)},
    }
    save(local_url, tree)
    out = zarrckpt.load_pytree(local_url)
    assert_same(dict(out["fd"]), dict(tree["fd"]))
    assert type(out["fd"]) is FlattedDict
    assert_same(out["plain"], tree["plain"])
    back = zarrckpt.load_pytree(local_url, {"fd": FlattedDict({("a",): np.zeros(3, np.int64),
                                                               ("b", 1): np.zeros(2, np.int64)}),
                                            "plain": {("layers", 0, "weight"): np.zeros(2),
                                                      "n": 0, ("layers", 0, "bias"): np.ones(1)}})  # fmt: skip
    assert type(back["fd"]) is FlattedDict
    assert_same(dict(back["fd"]), dict(tree["fd"]))
    assert_same(back["plain"], tree["plain"])


def test_state_holding_a_scalar_or_none(local_url):
    tree = {"f": brainstate.State(1.5), "n": brainstate.State(None)}
    save(local_url, tree)
    assert zarrckpt.load_pytree(local_url) == {"f": 1.5, "n": None}
    target = {"f": brainstate.State(0.0), "n": brainstate.State(None)}
    out = zarrckpt.load_pytree(local_url, target)
    assert out["f"] is target["f"] and target["f"].value == 1.5


# --- JAX PyTree nodes ------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Layer:
    w: object
    b: object
    size: int = dataclasses.field(default=3, metadata={"static": True})


@jax.tree_util.register_pytree_node_class
class Pair:
    def __init__(self, first, second):
        self.first, self.second = first, second

    def tree_flatten(self):
        return (self.first, self.second), "aux"

    @classmethod
    def tree_unflatten(cls, aux, kids):
        assert aux == "aux"
        return cls(*kids)


class Frozen(Mapping):
    """A FrozenDict-like mapping, registered with DictKey paths as flax's FrozenDict is."""

    def __init__(self, data):
        self._data = dict(data)

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)


jax.tree_util.register_pytree_with_keys(
    Frozen,
    lambda f: ([(jax.tree_util.DictKey(k), v) for k, v in f._data.items()], tuple(f._data)),
    lambda keys, kids: Frozen(zip(keys, kids, strict=True)),
)


def _nodes():
    return {
        "layer": Layer(np.arange(3.0), (np.ones(2, np.int32), None), size=7),
        "pair": Pair(np.float32(1.5), [np.arange(2)]),
        "frozen": Frozen({"kernel": np.eye(2), "bias": np.zeros(2)}),
    }


def test_pytree_nodes_load_as_dicts_without_target(local_url):
    save(local_url, _nodes())
    out = zarrckpt.load_pytree(local_url)
    assert set(out) == {"layer", "pair", "frozen"}
    assert type(out["layer"]) is dict and list(out["layer"]) == ["w", "b"]
    np.testing.assert_array_equal(out["layer"]["w"], np.arange(3.0))
    assert out["layer"]["b"][1] is None and type(out["layer"]["b"]) is tuple
    assert list(out["pair"]) == [0, 1] and out["pair"][0] == np.float32(1.5)
    assert list(out["frozen"]) == ["kernel", "bias"]
    record = _record(local_url)["children"][0]
    assert record["type"] == "pytree" and record["class"].endswith(":Layer")
    assert record["keys"] == [["attr", "w"], ["attr", "b"]] and record["names"] == ["w", "b"]
    assert (_step_dir(local_url) / "layer/b/0/zarr.json").exists()


def test_pytree_nodes_restored_into_a_target(local_url):
    save(local_url, _nodes())
    target = {
        "layer": Layer(np.zeros(3), (np.zeros(2, np.int32), None), size=7),
        "pair": Pair(np.float32(0), [np.zeros(2, np.int64)]),
        "frozen": Frozen({"kernel": np.zeros((2, 2)), "bias": np.ones(2)}),
    }
    out = zarrckpt.load_pytree(local_url, target)
    assert type(out["layer"]) is Layer and out["layer"].size == 7
    np.testing.assert_array_equal(out["layer"].w, np.arange(3.0))
    assert type(out["pair"]) is Pair and out["pair"].first == np.float32(1.5)
    assert type(out["frozen"]) is Frozen
    np.testing.assert_array_equal(out["frozen"]["kernel"], np.eye(2))


def test_optax_states_round_trip(local_url):
    optax = pytest.importorskip("optax")
    params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
    opt = optax.adam(1e-3)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = opt.update(grads, opt.init(params), params)
    save(local_url, {"opt": state})
    assert type(zarrckpt.load_pytree(local_url)["opt"][0]) is type(state[0])  # a namedtuple
    out = zarrckpt.load_pytree(local_url, {"opt": opt.init(params)})
    assert jax.tree.structure(out) == jax.tree.structure({"opt": state})
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), out["opt"], state)))


def test_the_tree_core_runs_without_jax():
    code = (
        "import sys, zarrckpt._tree as t\n"
        "record, leaves, groups = t.flatten({('a', 1): 1, 'b': [2], 'c': None})\n"
        "assert leaves == [('a/1', 1), ('b/0', 2)] and groups == ['', 'a', 'b'], leaves\n"
        "assert 'jax' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_quantities_and_variables_are_not_split(local_url):
    import brainpy.math as bm
    import brainunit as u

    tree = {"q": np.arange(3.0) * u.mV, "v": bm.Variable(jnp.ones(2))}
    save(local_url, tree)
    record = _record(local_url)
    assert [c["type"] for c in record["children"]] == ["leaf", "leaf"]
    out = zarrckpt.load_pytree(local_url)
    assert out["q"].unit == u.mV


# --- JAX typed PRNG keys ---------------------------------------------------------------------------


def test_typed_keys_round_trip_and_draw_the_same_numbers(local_url):
    key = jax.random.key(0)
    keys = jax.random.split(jax.random.key(1, impl="rbg"), 3)
    save(local_url, {"key": key, "keys": keys, "legacy": jax.random.PRNGKey(2)})
    out = zarrckpt.load_pytree(local_url)
    assert jax.dtypes.issubdtype(out["key"].dtype, jax.dtypes.prng_key)
    assert jax.random.key_impl(out["keys"]) == "rbg" and out["keys"].shape == (3,)
    np.testing.assert_array_equal(jax.random.normal(out["key"], (4,)), jax.random.normal(key, (4,)))
    np.testing.assert_array_equal(
        jax.random.key_data(out["keys"]), jax.random.key_data(keys)
    )  # fmt: skip
    assert out["legacy"].dtype == np.uint32  # raw uint32 keys stay plain arrays
    leaf = _record(local_url)["children"][1]
    assert leaf["kind"] == "prngkey" and leaf["impl"] == "rbg" and leaf["shape"] == [3, 4]


def test_typed_keys_restored_into_a_target(local_url):
    key = jax.random.key(0)
    save(local_url, {"key": key, "legacy": jax.random.PRNGKey(5)})
    target = {"key": jax.random.key(9), "legacy": jax.random.key(9)}  # legacy data -> typed key
    out = zarrckpt.load_pytree(local_url, target)
    np.testing.assert_array_equal(jax.random.normal(out["key"], (4,)), jax.random.normal(key, (4,)))
    np.testing.assert_array_equal(jax.random.key_data(out["legacy"]), jax.random.PRNGKey(5))


def test_key_of_another_implementation_is_a_shape_mismatch(local_url):
    save(local_url, {"key": jax.random.key(0, impl="rbg")})
    with pytest.raises(
        StructureMismatchError, match=r"key: shape \(4,\) in the checkpoint, \(2,\)"
    ):
        zarrckpt.load_pytree(local_url, {"key": jax.random.key(0)})


def test_key_impl_mismatch_of_equal_shape(local_url):
    # rbg and unsafe_rbg keys share a shape: the implementation must be compared too
    save(local_url, {"key": jax.random.key(0, impl="rbg")})
    with pytest.raises(
        StructureMismatchError,
        match="key: PRNG key implementation rbg in the checkpoint, unsafe_rbg in the target",
    ):
        zarrckpt.load_pytree(local_url, {"key": jax.random.key(0, impl="unsafe_rbg")})


def test_brainstate_random_state_round_trips(local_url):
    rng = brainstate.random.RandomState(42)
    rng.normal(size=2)  # advance it
    save(local_url, {"rng": rng})
    plain = zarrckpt.load_pytree(local_url)["rng"]
    assert jax.dtypes.issubdtype(plain.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(plain), jax.random.key_data(rng.value))
    target = brainstate.random.RandomState(0)
    out = zarrckpt.load_pytree(local_url, {"rng": target})
    assert out["rng"] is target  # updated in place
    np.testing.assert_array_equal(np.asarray(target.normal(size=5)), np.asarray(rng.normal(size=5)))
    leaf = _record(local_url)["children"][0]
    assert leaf["kind"] == "prngkey" and leaf["state"] == "RandomState"


def test_leaves_pinned_messages_for_keys():
    rec = {"path": "k", "kind": "prngkey", "impl": "threefry2x32"}
    with pytest.raises(CorruptCheckpointError, match=r"leaf 'k': key data of shape \(3,\) is not"):
        _leaves.decode(rec, np.zeros(3, np.uint32))
    assert _leaves.compare("k", jax.random.key(0), rec) is None
    assert (
        _leaves.compare("k", jax.random.key(0, impl="rbg"), rec)
        == "k: PRNG key implementation threefry2x32 in the checkpoint, rbg in the target"
    )
    assert _leaves.describe(jax.random.split(jax.random.key(0), 3)) == ((3, 2), np.dtype("uint32"))


# --- names safe on every disk --------------------------------------------------------------------

_NFC, _NFD = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
_NASTY = {
    "zarr.json": 1, "ZARR.JSON": 2, ".zarrckpt-lease": 3, ".": 4, "V": 5, "v": 6, "x" * 300: 7,
    "é" * 200: 8, _NFC: 9, _NFD: 10, "CON": 11, "a:b?": 12, "trailing.": 13, "c.0": 14,
    "sub": {"zarr.json": np.arange(3), "W": np.ones(2), "w": np.zeros(2)},
}  # fmt: skip


def test_reserved_long_and_case_colliding_keys_save_and_load(local_url):
    save(local_url, _NASTY)
    assert_same(zarrckpt.load_pytree(local_url), _NASTY)
    step = _step_dir(local_url)
    for dirpath, dirnames, filenames in os.walk(step):
        names = dirnames + filenames
        assert all(len(n.encode()) <= MAX_NAME_BYTES for n in names)
        folded = [unicodedata.normalize("NFKC", n.casefold()) for n in names]
        assert len(set(folded)) == len(folded), dirpath
        assert not any(n.startswith(".") for n in dirnames)
    zeros = {k: (0 if isinstance(v, int) else v) for k, v in _NASTY.items()}
    assert_same(zarrckpt.load_pytree(local_url, zeros), _NASTY)


def test_reserved_keys_on_memory_store():
    url = "memory://nasty/ckpt"
    save(url, _NASTY)
    assert_same(zarrckpt.load_pytree(url), _NASTY)


# --- version 1 checkpoints -------------------------------------------------------------------------


def _resign(url):
    """Put the edited step record's crc32c into the manifest, as its author would."""
    import google_crc32c

    root = Path(url)
    manifest = json.loads((root / "zarr.json").read_text())
    entry = manifest["attributes"]["zarrckpt"]["steps"][-1]
    entry["record_crc32c"] = google_crc32c.value((root / entry["dir"] / "zarr.json").read_bytes())
    (root / "zarr.json").write_text(json.dumps(manifest))


def _as_version_1(url):
    """Rewrite a fresh checkpoint as zarrckpt 0.1 named it: "a:b" and ".h" unescaped."""
    step = _step_dir(url)
    meta = json.loads((step / "zarr.json").read_text())
    tree = meta["attributes"]["zarrckpt"]["tree"]
    renames = {"a%3Ab": "a:b", "%2Eh": ".h"}
    tree["names"] = [renames.get(n, n) for n in tree["names"]]
    for child in tree["children"]:
        if child["type"] == "leaf":
            child["path"] = renames.get(child["path"], child["path"])
        if child["type"] == "namedtuple":
            del child["names"]  # version 1 did not record them
    for old, new in renames.items():
        (step / old).rename(step / new)
    (step / "zarr.json").write_text(json.dumps(meta))
    _resign(url)


_V1_TREE = {"a:b": np.arange(3), ".h": np.ones(2), "p": Point(np.zeros(1), 4)}


def test_version_1_checkpoint_loads_without_target(local_url):
    save(local_url, _V1_TREE)
    _as_version_1(local_url)
    assert_same(zarrckpt.load_pytree(local_url), _V1_TREE)


def test_version_1_checkpoint_loads_into_target(local_url):
    # _tree.match pairs target keys with the recorded names ("a:b"), never re-spelt ("a%3Ab").
    save(local_url, _V1_TREE)
    _as_version_1(local_url)
    target = {"a:b": np.zeros(3, np.int64), ".h": np.zeros(2), "p": Point(np.ones(1), 0)}
    assert_same(zarrckpt.load_pytree(local_url, target), _V1_TREE)


# --- hostile step records ---------------------------------------------------------------------


def _edit_record(url, edit):
    step = _step_dir(url)
    meta = json.loads((step / "zarr.json").read_text())
    text = edit(meta["attributes"]["zarrckpt"])
    (step / "zarr.json").write_text(text or json.dumps(meta))
    _resign(url)  # a hostile author controls the manifest too


def _nested(levels):
    def edit(meta):
        tree = json.dumps(meta.pop("tree"))
        deep = '{"type": "list", "children": [' * levels + tree + "]}" * levels
        return json.dumps(
            {
                "zarr_format": 3,
                "node_type": "group",
                "attributes": {"zarrckpt": {**meta, "tree": 0}},
            }
        ).replace('"tree": 0', f'"tree": {deep}')

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [(lambda m: m["tree"]["children"][0].update(path="../../../outside"),
      "malformed tree record at 'a': the leaf path '../../../outside' contains '.' or '..'"),
     (lambda m: m["tree"]["children"][0].update(path="/etc/passwd"),
      "malformed tree record at 'a': the leaf path '/etc/passwd' is absolute"),
     (lambda m: m["tree"].update(names=["b", "b"]),
      "malformed tree record at the root: two children are both named 'b'"),
     (lambda m: m["tree"].update(children=None),
      "malformed tree record at the root: a dict node needs a 'children' array"),
     (_nested(400), "the tree nests deeper than 256 levels"),
     (_nested(100_000), "nests deeper than Python's JSON parser can follow")],
)  # fmt: skip
def test_hostile_tree_record_in_a_step(local_url, edit, message):
    save(local_url, {"a": np.arange(3), "b": 1})
    _edit_record(local_url, edit)
    with pytest.raises(CorruptCheckpointError, match=r"zarr\.json") as info:
        zarrckpt.load_pytree(local_url)
    assert message in str(info.value)
    # Opening parses the record; each part is validated before it is used.
    with pytest.raises(CorruptCheckpointError):
        zarrckpt.open_checkpoint(local_url).leaves()
    with pytest.raises(CorruptCheckpointError):
        ckpt = zarrckpt.open_checkpoint(local_url)
        for name in ckpt:  # a leaf is validated when indexed, a group when walked
            node = ckpt[name]
            node.leaves() if isinstance(node, zarrckpt.TreeView) else node[...]


# --- lazy navigation -------------------------------------------------------------------------------


def test_lazy_navigation_through_tuple_key_groups(local_url):
    states = _net().states()
    save(local_url, {"state": states, "nodes": _nodes()})
    ckpt = zarrckpt.open_checkpoint(local_url)
    assert list(ckpt["state"].keys()) == ["layers"]
    assert list(ckpt["state/layers"].keys()) == ["0", "2"]
    bias = ckpt["state/layers/2/weight/bias"]
    np.testing.assert_array_equal(
        np.asarray(bias), np.asarray(states[("layers", 2, "weight")].value["bias"])
    )
    assert list(ckpt["nodes/layer"].keys()) == ["w", "b"]
    sub = ckpt.load("state/layers/0")  # a group of tuple keys: a dict keyed by the rest
    assert list(sub) == ["weight"] and set(sub["weight"]) == {"weight", "bias"}


# --- random trees with tuple keys ----------------------------------------------------------------

_parts = st.one_of(st.sampled_from(["a", "b", "A", "zarr.json", ".x", ""]), st.integers(0, 3))
_keys = st.one_of(
    st.text(max_size=4), st.integers(-2, 20), st.lists(_parts, min_size=1, max_size=3).map(tuple)
)
_leaf = st.one_of(
    hnp.arrays(st.sampled_from(["int8", "float32", "bool"]), hnp.array_shapes(min_dims=0, max_dims=2, max_side=3)),
    st.integers(-5, 5),
    st.none(),
)  # fmt: skip
_trees = nested_trees(_leaf, _keys, Point)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tree=_trees)
def test_random_trees_with_tuple_keys_round_trip(tmp_path_factory, tree):
    url = str(tmp_path_factory.mktemp("t") / "ckpt")
    save(url, tree, chunk_bytes=64)
    assert_same(zarrckpt.load_pytree(url), tree)
    assert_same(zarrckpt.load_pytree(url, tree), tree)


def test_a_jax_tracers_class_is_never_remembered_as_a_leaf_class():
    """Leaf classes are remembered (a large tree asks about the same few thousands of times),
    but a tracer is a ``jax.Array`` by what it traces: one holding a ``Ref`` is not, and below
    a registered node it stays taken from the target, whatever was flattened before."""
    from jax.tree_util import register_pytree_node_class

    from zarrckpt import _leaves, _tree

    @register_pytree_node_class
    class Box:
        def __init__(self, v):
            self.v = v

        def tree_flatten(self):
            return (self.v,), None

        @classmethod
        def tree_unflatten(cls, aux, children):
            return cls(*children)

    seen = {}

    def traced(x):
        seen["array"] = _tree.flatten({"a": x})[0]["children"][0]  # an array tracer: a leaf
        seen["class"] = type(x)
        if hasattr(jax, "new_ref"):  # (jax >= 0.7)
            seen["ref"] = _tree.flatten({"b": Box(jax.new_ref(x))})[0]["children"][0]
        return x

    jax.jit(traced)(jnp.ones(2))
    assert seen["array"] == {"type": "leaf", "path": "a"}
    assert seen["class"] not in _leaves.LEAF_TYPES
    if "ref" in seen:
        assert seen["ref"]["children"][0]["type"] == "from_target", seen["ref"]
