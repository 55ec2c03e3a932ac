"""save_module / load_module for brainstate (BrainPy 3) modules, by relative path."""

import subprocess
import sys
from pathlib import Path

import brainpy
import brainstate
import brainunit as u
import jax.numpy as jnp
import numpy as np
import pytest
import zarr

import zarrckpt


def _mlp():
    return brainstate.nn.Sequential(
        brainstate.nn.Linear(4, 8), brainstate.nn.ReLU(), brainstate.nn.Linear(8, 2)
    )


def _weights(module):
    return {
        ".".join(map(str, path)): {k: np.asarray(v).copy() for k, v in state.value.items()}
        for path, state in module.states().items()
    }


def test_sequential_round_trip_into_a_second_instance(tmp_path):
    first, second = _mlp(), _mlp()
    x = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    assert not np.array_equal(first(x), second(x))
    where = zarrckpt.save_module(first, str(tmp_path / "mlp"), verbose=False)
    group = zarr.open_group(where, mode="r")
    assert sorted(group["layers"].group_keys()) == ["0", "2"]  # ReLU holds no state
    assert sorted(group["layers/0/weight"].array_keys()) == ["bias", "weight"]
    assert group["layers/0/weight/weight"].shape == (4, 8)

    assert zarrckpt.load_module(second, str(tmp_path / "mlp")) == zarrckpt.StateLoadResult([], [])
    np.testing.assert_array_equal(np.asarray(second(x)), np.asarray(first(x)))


@pytest.mark.parametrize("only", ["layers/0", "layers.0", ("layers", 0)])
def test_only_one_layer(tmp_path, only):
    first, second = _mlp(), _mlp()
    zarrckpt.save_module(first, str(tmp_path / "mlp"), verbose=False)
    before = _weights(second)
    assert zarrckpt.load_module(second, str(tmp_path / "mlp"), only=only) == ([], [])
    after, saved = _weights(second), _weights(first)
    for k in ("weight", "bias"):
        np.testing.assert_array_equal(after["layers.0.weight"][k], saved["layers.0.weight"][k])
        np.testing.assert_array_equal(after["layers.2.weight"][k], before["layers.2.weight"][k])
    with pytest.raises(KeyError, match="'layers/7' is not a sub-module"):
        zarrckpt.load_module(second, str(tmp_path / "mlp"), only="layers/7")


def test_mismatch_in_the_last_state_leaves_every_state_unchanged(tmp_path):
    zarrckpt.save_module(
        brainstate.nn.Sequential(brainstate.nn.Linear(4, 8), brainstate.nn.Linear(8, 3)),
        str(tmp_path / "m"),
        verbose=False,
    )
    other = brainstate.nn.Sequential(brainstate.nn.Linear(4, 8), brainstate.nn.Linear(8, 2))
    before = _weights(other)
    with pytest.raises(zarrckpt.StructureMismatchError, match="nothing was restored") as info:
        zarrckpt.load_module(other, str(tmp_path / "m"))
    message = str(info.value)
    assert "(2 problems)" in message
    assert "layers.1.weight.weight: shape (8, 3) dtype float32 in the checkpoint, shape (8, 2)" in (
        message
    )
    assert "layers.1.weight.bias: shape (3,)" in message
    after = _weights(other)
    for key, value in before.items():
        for k in value:
            np.testing.assert_array_equal(after[key][k], value[k])  # layer 0 was not assigned


def test_unexpected_and_missing_states_are_reported(tmp_path):
    zarrckpt.save_pytree(
        str(tmp_path / "m"),
        {"layers": {"0": {"weight": {"weight": np.ones((4, 8), np.float32),
                                     "bias": np.ones(8, np.float32)}},
                    "5": {"x": np.ones(1)}}},
        verbose=False,
    )  # fmt: skip
    net = _mlp()
    with pytest.warns(UserWarning) as record:
        result = zarrckpt.load_module(net, str(tmp_path / "m"))
    assert result == (["layers.2.weight"], ["layers.5"])
    assert len(record) == 2
    np.testing.assert_array_equal(np.asarray(net.layers[0].weight.value["bias"]), np.ones(8))


# --- a brainpy.state spiking network -----------------------------------------------------------

NE, NI = 80, 20


class EINet(brainstate.nn.Module):
    """LIFRef + two merging AlignPostProj (Expon + COBA), dense Linear weights (ParamStates)."""

    def __init__(self):
        super().__init__()
        n = NE + NI
        self.N = brainpy.state.LIFRef(
            n, V_rest=-60.0 * u.mV, V_th=-50.0 * u.mV, V_reset=-60.0 * u.mV, tau=20.0 * u.ms,
            tau_ref=5.0 * u.ms, V_initializer=brainstate.nn.init.Normal(-55.0, 2.0, unit=u.mV),
        )  # fmt: skip

        def dense(n_pre, weight):
            mask = brainstate.random.rand(n_pre, n) < 0.1
            return brainstate.nn.Linear(n_pre, n, w_init=u.math.where(mask, weight, 0.0) * u.mS,
                                        b_init=None)  # fmt: skip

        self.E = brainpy.state.AlignPostProj(
            comm=dense(NE, 0.6), syn=brainpy.state.Expon.desc(n, tau=5.0 * u.ms),
            out=brainpy.state.COBA.desc(E=0.0 * u.mV), post=self.N,
        )  # fmt: skip
        self.I = brainpy.state.AlignPostProj(
            comm=dense(NI, 6.7), syn=brainpy.state.Expon.desc(n, tau=10.0 * u.ms),
            out=brainpy.state.COBA.desc(E=-80.0 * u.mV), post=self.N,
        )  # fmt: skip

    def update(self, i):
        with brainstate.environ.context(i=i, t=i * brainstate.environ.get_dt()):
            spk = self.N.get_spike() != 0.0
            self.E(spk[:NE].astype(float))
            self.I(spk[NE:].astype(float))
            self.N(20.0 * u.mA)
            return self.N.get_spike()


def _run(net, start, steps):
    return np.asarray(brainstate.transform.for_loop(net.update, np.arange(start, start + steps)))


def test_brainpy_state_network_resumes_identically(tmp_path):
    with brainstate.environ.context(dt=0.1 * u.ms):
        first, second = EINet(), EINet()
        brainstate.nn.init_all_states(first)
        brainstate.nn.init_all_states(second)
        _run(first, 0, 200)
        where = zarrckpt.save_module(first, str(tmp_path / "ei"), verbose=False)
        expected = _run(first, 200, 200)
        assert expected.sum() > 0

        # brainstate keeps N at its first path (E.post); the merged synapses are named after
        # the projections that registered them, not by their descriptor reprs
        group = zarr.open_group(where, mode="r")
        assert sorted(group["E/post/_before_updates"].group_keys()) == ["E", "I"]
        assert group["E/post/_before_updates/I/syn/g"].shape == (NE + NI,)
        assert group["E/comm/weight/weight"].shape == (NE, NE + NI)
        plain = zarrckpt.load_pytree(str(tmp_path / "ei"))
        assert plain["E"]["post"]["V"].unit == u.mV  # units kept

        assert zarrckpt.load_module(second, str(tmp_path / "ei")) == ([], [])
        assert second.N.V.value.unit == u.mV
        np.testing.assert_array_equal(_run(second, 200, 200), expected)


def test_brainpy_state_only_by_attribute_path(tmp_path):
    with brainstate.environ.context(dt=0.1 * u.ms):
        first, second = EINet(), EINet()
        brainstate.nn.init_all_states(first)
        brainstate.nn.init_all_states(second)
        zarrckpt.save_module(first, str(tmp_path / "ei"), verbose=False)
        w_before = np.asarray(second.E.comm.weight.value["weight"].mantissa).copy()
        # "N" is not in states()' paths (N is reached first as E.post), but names the same node
        assert zarrckpt.load_module(second, str(tmp_path / "ei"), only="N") == ([], [])
        np.testing.assert_array_equal(
            np.asarray(second.N.V.value.mantissa), np.asarray(first.N.V.value.mantissa)
        )
        np.testing.assert_array_equal(
            np.asarray(second.E.comm.weight.value["weight"].mantissa), w_before
        )


def test_core_imports_without_either_framework():
    """Frameworks are detected by classes already imported; zarrckpt imports neither."""
    code = "import sys, zarrckpt; print([m for m in ('brainpy', 'brainstate') if m in sys.modules])"
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_a_state_class_is_a_leaf_or_a_container_by_what_it_holds():
    """Most leaves are recognised by their type, which is then remembered (a large tree asks
    about the same types thousands of times); a State's class never is: the same class holds
    an array here and a sub-tree there, in either order."""
    from zarrckpt import _leaves, _tree

    leaf = brainstate.State(jnp.arange(3.0))
    holder = brainstate.State({"x": jnp.ones(2), "y": np.arange(2)})
    for tree in ({"a": leaf, "sub": holder}, {"sub": holder, "a": leaf}):
        _, flat, _ = _tree.flatten(tree)
        assert sorted(path for path, _ in flat) == ["a", "sub/x", "sub/y"]
    assert brainstate.State not in _leaves.LEAF_TYPES
    assert type(jnp.ones(2)) in _leaves.LEAF_TYPES
