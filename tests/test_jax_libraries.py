"""The JAX libraries' own state as it is: equinox modules, flax NNX and struct, optax chains.

Inside a registered PyTree node, arrays and numbers are stored and every other leaf (a
function, a sentinel) is recorded as taken from the target, as equinox's
``tree_deserialise_leaves`` takes it from its ``like`` model. Plain dicts and lists still
refuse such leaves: nothing could supply them on load.
"""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import only_step_dir as _step_dir
from helpers import save
from helpers import tree_record as _record

import zarrckpt
from zarrckpt import _tree
from zarrckpt.errors import CorruptCheckpointError, StructureMismatchError, UnsupportedLeafError

eqx = pytest.importorskip("equinox")
optax = pytest.importorskip("optax")
flax_struct = pytest.importorskip("flax.struct")
nnx = pytest.importorskip("flax.nnx")


def _child(record: dict, key) -> dict:
    """The child of a dict or pytree record at ``key`` (an attribute, dict key or index)."""
    keys = [k[1] if record["type"] == "pytree" else k for k in record["keys"]]
    return record["children"][keys.index(key)]


def assert_bit_exact(a, b):
    """Same tree structure, and leaves of the same type, dtype, shape and bytes."""
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert type(x) is type(y)
        if hasattr(x, "dtype"):
            assert x.dtype == y.dtype and x.shape == y.shape
            if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
                x, y = jax.random.key_data(x), jax.random.key_data(y)
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
        else:
            assert x == y


# --- equinox -------------------------------------------------------------------------------------


def _mlp(seed):
    return eqx.nn.MLP(3, 2, 8, 2, key=jax.random.key(seed))


def test_equinox_mlp_restores_into_a_like_model(local_url):
    model = _mlp(0)
    save(local_url, model)
    like = _mlp(1)
    out = zarrckpt.load_pytree(local_url, like)
    assert type(out) is eqx.nn.MLP
    assert_bit_exact(out, model)
    assert out.activation is jax.nn.relu and out.final_activation is like.final_activation
    x = jnp.linspace(-1.0, 1.0, 3)
    np.testing.assert_array_equal(out(x), model(x))
    # equinox's own skeleton, built without allocating: the arrays come back as jax.Arrays
    skeleton = eqx.filter_eval_shape(_mlp, 2)
    out = zarrckpt.load_pytree(local_url, skeleton)
    assert_bit_exact(out, model)
    np.testing.assert_array_equal(out(x), model(x))


def test_equinox_mlp_record_and_load_without_target(local_url):
    model = _mlp(0)
    save(local_url, model)
    record = _record(local_url)
    assert record["type"] == "pytree" and record["class"].endswith(":MLP")
    assert _child(record, "activation") == {
        "type": "from_target",
        "pytype": "jax._src.custom_derivatives:custom_jvp",
    }
    assert _child(record, "final_activation")["pytype"] == "builtins:function"
    # nothing is stored for them: six arrays, no group or array named after a function
    ckpt = zarrckpt.open_checkpoint(local_url)
    assert len(ckpt.leaves()) == 6
    assert not (_step_dir(local_url) / "activation").exists()
    assert ckpt.tree()["activation"] is None
    assert "  activation: None" in repr(ckpt).splitlines()
    assert ckpt.load("activation") is None
    out = zarrckpt.load_pytree(local_url)
    assert out["activation"] is None and out["final_activation"] is None
    np.testing.assert_array_equal(out["layers"][0]["weight"], np.asarray(model.layers[0].weight))


def test_equinox_filtered_arrays_restore_into_the_full_model(local_url):
    """The equinox idiom: save ``eqx.filter(model, eqx.is_array)`` (functions become None)."""
    model = _mlp(0)
    save(local_url, eqx.filter(model, eqx.is_array))
    out = zarrckpt.load_pytree(local_url, _mlp(1))
    assert_bit_exact(out, model)


def test_equinox_sequential_with_identity_and_lambda(local_url):
    def build(seed):
        key1, key2 = jax.random.split(jax.random.key(seed))
        return eqx.nn.Sequential([
            eqx.nn.Linear(3, 4, key=key1), eqx.nn.Identity(), eqx.nn.Lambda(jax.nn.tanh),
            eqx.nn.Linear(4, 2, key=key2),
        ])  # fmt: skip

    model = build(0)
    save(local_url, model)
    assert (_step_dir(local_url) / "layers/1/zarr.json").exists()  # Identity: an empty group
    out = zarrckpt.load_pytree(local_url, build(1))
    assert type(out.layers[1]) is eqx.nn.Identity and out.layers[2].fn is jax.nn.tanh
    assert_bit_exact(out, model)
    x = jnp.arange(3.0)
    np.testing.assert_array_equal(out(x), model(x))
    plain = zarrckpt.load_pytree(local_url)
    assert plain["layers"][1] == {} and plain["layers"][2] == {"fn": None}


def test_equinox_batchnorm_made_with_state(local_url):
    def build():
        return eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="ema")

    model, state = build()
    x = jnp.arange(12.0).reshape(4, 3)
    train = jax.vmap(lambda m, x, s: m(x, s), (None, 0, None), (0, None), axis_name="batch")
    for _ in range(2):
        _, state = train(model, x, state)
    save(local_url, {"model": model, "state": state})
    fresh_model, fresh_state = build()
    out = zarrckpt.load_pytree(local_url, {"model": fresh_model, "state": fresh_state})
    assert_bit_exact(out, {"model": model, "state": state})
    assert type(out["state"]) is eqx.nn.State
    y_saved, state_saved = train(model, x, state)
    y_out, state_out = train(out["model"], x, out["state"])
    np.testing.assert_array_equal(y_out, y_saved)
    assert_bit_exact(state_out, state_saved)

    def infer(m, s):  # the running statistics
        return jax.vmap(eqx.nn.inference_mode(m), (0, None), (0, None), axis_name="batch")(x, s)

    np.testing.assert_array_equal(infer(out["model"], out["state"])[0], infer(model, state)[0])


# --- static-only dataclasses ---------------------------------------------------------------------


@flax_struct.dataclass
class StaticConfig:
    size: int = flax_struct.field(pytree_node=False, default=3)
    name: str = flax_struct.field(pytree_node=False, default="lif")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StaticOnly:
    n: int = dataclasses.field(default=2, metadata={"static": True})


def test_static_only_dataclasses_are_empty_nodes_not_leaves(local_url):
    assert jax.tree.leaves(StaticConfig()) == [] and jax.tree.leaves(StaticOnly()) == []
    record, leaves, groups = _tree.flatten({"cfg": StaticConfig(), "w": np.ones(2)})
    assert record["children"][0] == {
        "type": "pytree", "class": f"{__name__}:StaticConfig", "keys": [], "names": [],
        "children": [],
    }  # fmt: skip
    assert [p for p, _ in leaves] == ["w"] and groups == ["", "cfg"]

    tree = {"cfg": StaticConfig(size=5), "dc": StaticOnly(n=7), "w": np.arange(3.0)}
    save(local_url, tree)
    assert zarrckpt.load_pytree(local_url) == {"cfg": {}, "dc": {}, "w": pytest.approx(tree["w"])}
    target = {"cfg": StaticConfig(size=9), "dc": StaticOnly(n=1), "w": np.zeros(3)}
    out = zarrckpt.load_pytree(local_url, target)
    # a static field is the treedef's, so the target's: as in equinox, flax and orbax
    assert out["cfg"] == StaticConfig(size=9) and out["dc"] == StaticOnly(n=1)
    np.testing.assert_array_equal(out["w"], tree["w"])
    # a tree that is one such node
    save(local_url, StaticOnly(n=4), step=1)
    assert zarrckpt.load_pytree(local_url) == {}
    assert zarrckpt.load_pytree(local_url, StaticOnly(n=4)) == StaticOnly(n=4)


# --- flax NNX ------------------------------------------------------------------------------------


class _Net(nnx.Module):
    def __init__(self, seed: int):
        rngs = nnx.Rngs(seed, dropout=seed + 100)
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.norm = nnx.BatchNorm(4, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.dropout(self.norm(self.linear(x)))


def _trained_net():
    net = _Net(0)
    x = jnp.arange(15.0).reshape(5, 3) / 10
    for _ in range(3):  # moves the batch statistics and the dropout stream
        net(x)
    return net, x


def test_flax_nnx_state_restores_into_a_fresh_model(local_url):
    net, x = _trained_net()
    save(local_url, nnx.state(net))
    fresh = _Net(7)
    restored = zarrckpt.load_pytree(local_url, nnx.state(fresh))
    nnx.update(fresh, restored)
    assert_bit_exact(nnx.state(fresh), nnx.state(net))
    for _ in range(3):  # the same dropout masks, so the same RNG stream, call after call
        np.testing.assert_array_equal(fresh(x), net(x))
    assert_bit_exact(nnx.state(fresh, nnx.RngState), nnx.state(net, nnx.RngState))
    np.testing.assert_array_equal(
        jax.random.key_data(fresh.dropout.rngs()), jax.random.key_data(net.dropout.rngs())
    )
    fresh.eval(), net.eval()
    np.testing.assert_array_equal(fresh(x), net(x))  # running statistics


def test_flax_nnx_state_without_target_is_dicts_of_values(local_url):
    net, _ = _trained_net()
    save(local_url, nnx.state(net))
    out = zarrckpt.load_pytree(local_url)
    assert set(out) == {"linear", "norm", "dropout"}
    assert set(out["linear"]["kernel"]) == {"value"}  # a Variable: its value, as a dict
    np.testing.assert_array_equal(out["linear"]["kernel"]["value"], net.linear.kernel[...])
    np.testing.assert_array_equal(out["norm"]["mean"]["value"], net.norm.mean[...])
    key = out["dropout"]["rngs"]["key"]["value"]
    assert jnp.issubdtype(key.dtype, jax.dtypes.prng_key)  # a typed key stays a typed key
    assert int(out["dropout"]["rngs"]["count"]["value"]) == int(net.dropout.rngs.count[...])


# --- optax ---------------------------------------------------------------------------------------


def test_optax_chain_state_round_trips(local_url):
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.zeros(3)}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))

    @jax.jit
    def step(params, state):
        grads = jax.tree.map(lambda p: jnp.sin(p) + 1.0, params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(3):
        params, state = step(params, state)
    save(local_url, {"params": params, "opt": state})
    out = zarrckpt.load_pytree(local_url, {"params": params, "opt": tx.init(params)})
    assert_bit_exact(out, {"params": params, "opt": state})
    assert_bit_exact(step(out["params"], out["opt"]), step(params, state))
    plain = zarrckpt.load_pytree(local_url)["opt"]  # optax is imported: its namedtuples
    assert type(plain) is tuple and type(plain[1][0]) is type(state[1][0])
    assert int(plain[1][0].count) == 3


# --- what is still refused, and what a mismatch says ---------------------------------------------


@pytest.mark.parametrize(
    ("tree", "path", "typename"),
    [({"fn": jax.nn.relu}, "fn", "jax._src.custom_derivatives.custom_jvp"),
     ({"w": np.ones(2), "layers": [np.ones(2), lambda x: x]}, "layers/1", "builtins.function"),
     (jax.nn.relu, "value", "jax._src.custom_derivatives.custom_jvp"),
     ({"model": _mlp(0), "act": jax.nn.relu}, "act", "jax._src.custom_derivatives.custom_jvp")],
)  # fmt: skip
def test_functions_outside_pytree_nodes_are_still_refused(local_url, tree, path, typename):
    with pytest.raises(UnsupportedLeafError) as info:
        save(local_url, tree)
    message = str(info.value)
    assert message.startswith(f"leaf {path!r}: cannot store an object of type {typename}; ")
    assert "only inside a registered PyTree node like an equinox Module" in message
    assert zarrckpt.list_steps(local_url) == []


def test_a_storable_target_leaf_where_a_function_was_saved(local_url):
    class Holder(eqx.Module):
        act: object
        w: jax.Array

    save(local_url, Holder(jax.nn.relu, jnp.ones(2)))
    target = Holder(jnp.zeros(3), jnp.zeros(2))
    with pytest.raises(StructureMismatchError) as info:
        zarrckpt.load_pytree(local_url, target)
    assert str(info.value).endswith(
        "does not match the target (1 leaves):\n  act: not stored in the checkpoint (it held a "
        "custom_jvp, which a load takes from its target)"
    )
    with pytest.warns(zarrckpt.StructureMismatchWarning):
        out = zarrckpt.load_pytree(local_url, target, mismatch="warn")
    assert out.act is target.act  # kept
    np.testing.assert_array_equal(out.w, np.ones(2))
    # any other object the target holds there is taken, even in a plain dict
    out = zarrckpt.load_pytree(local_url, {"act": jax.nn.tanh, "w": jnp.zeros(2)})
    assert out["act"] is jax.nn.tanh


def test_from_target_record_is_validated(local_url):
    save(local_url, _mlp(0))
    step = _step_dir(local_url)
    doc = json.loads((step / "zarr.json").read_text())
    tree = doc["attributes"]["zarrckpt"]["tree"]
    _child(tree, "activation").pop("pytype")
    (step / "zarr.json").write_text(json.dumps(doc))
    manifest_path = Path(local_url) / "zarr.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["attributes"]["zarrckpt"]["steps"]:
        entry.pop("record_crc32c", None)  # a format 1.0 entry: no checksum to refuse it first
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError) as info:
        zarrckpt.load_pytree(local_url)
    assert "malformed tree record at 'activation': a from_target node needs a 'pytype' string" in (
        str(info.value)
    )
