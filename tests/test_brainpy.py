"""The tutorial's workflows, unchanged but for the module name, and relative-path modules."""

import brainpy as bp
import brainpy.math as bm
import brainstate
import brainunit as u
import jax
import numpy as np
import pytest

import zarrckpt

bm.set_platform("cpu")


class SNN(bp.DynamicalSystem):
    def __init__(self, tau):
        super().__init__()
        self.l1 = bp.dnn.Dense(28 * 28, 10, b_initializer=None)
        self.l2 = bp.dyn.Lif(
            10, V_rest=0.0, V_reset=0.0, V_th=1.0, tau=2.0, spk_fun=bm.surrogate.arctan
        )

    def update(self, x):
        return x >> self.l1 >> self.l2


class YourClass(bp.DynamicalSystem):  # the tutorial's custom class, verbatim
    def __init__(self):
        super().__init__()
        self.a = 1
        self.b = bm.random.rand(10)
        self.c = bm.Variable(bm.random.rand(3))
        self.d = bm.var_list([bm.Variable(bm.random.rand(3)), bm.Variable(bm.random.rand(3))])

    def __save_state__(self) -> dict:
        state_dict = {"a": self.a, "b": self.b, "c": self.c}
        for i, elem in enumerate(self.d):
            state_dict[f"d{i}"] = elem.value
        return state_dict

    def __load_state__(self, state_dict):
        self.a = state_dict["a"]
        self.b = bm.asarray(state_dict["b"])
        self.c = bm.asarray(state_dict["c"])
        for i in range(len(self.d)):
            self.d[i].value = bm.asarray(state_dict[f"d{i}"])


def _values(module):
    return {
        k: np.asarray(v.value).copy() for k, v in module.vars(method="relative").unique().items()
    }


def _train_step(net, opt, x):
    def loss():
        return bm.mean(net(x) ** 2) + bm.sum(net.l1.W**2)

    grads = bm.grad(loss, grad_vars=net.train_vars().unique())()
    opt.update(grads)


@pytest.fixture
def trained(tmp_path):
    """The tutorial's save-on-improvement loop, with zarrckpt in place of bp.checkpoints."""
    with bm.training_environment():
        net = SNN(2.0)
    opt = bp.optim.Adam(lr=1e-2, train_vars=net.train_vars().unique())
    out_dir = str(tmp_path)
    x = bm.random.rand(1, 28 * 28)
    max_test_acc = -1.0
    for epoch_i in range(4):
        _train_step(net, opt, x)
        train_acc, test_acc = 0.5 + epoch_i / 10, [0.6, 0.8, 0.7, 0.9][epoch_i]
        if max_test_acc < test_acc:
            max_test_acc = test_acc
            states = {
                "net": net.state_dict(),
                "optimizer": opt.state_dict(),
                "epoch_i": epoch_i,
                "train_acc": train_acc,
                "test_acc": test_acc,
            }
            saved_values = (_values(net), epoch_i)
            zarrckpt.save_pytree(f"{out_dir}/mnist-lif.bp", states, verbose=False)
    return net, opt, f"{out_dir}/mnist-lif.bp", saved_values


def test_tutorial_state_dict_round_trip(trained):
    net, opt, path, (saved, saved_epoch) = trained
    assert zarrckpt.list_steps(path) == [2]  # keep=1: the best epoch's checkpoint only
    _train_step(net, opt, bm.random.rand(1, 28 * 28))  # move away from the saved values
    assert any(not np.array_equal(saved[k], v) for k, v in _values(net).items())

    state_dict = zarrckpt.load_pytree(path)
    result = net.load_state_dict(state_dict["net"])
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, value in _values(net).items():
        assert value.tobytes() == saved[key].tobytes(), key
    assert state_dict["epoch_i"] == saved_epoch == 3 and type(state_dict["epoch_i"]) is int
    assert state_dict["test_acc"] == 0.9 and "Adam0" in str(state_dict["optimizer"].keys())
    opt.load_state_dict(state_dict["optimizer"])


def test_tutorial_custom_save_and_load_state(tmp_path):
    obj = YourClass()
    expected = {k: np.asarray(v).copy() for k, v in obj.__save_state__().items() if k != "a"}
    zarrckpt.save_pytree(str(tmp_path / "c"), obj.state_dict(), verbose=False)
    obj.a, obj.b = 0, bm.zeros(10)
    obj.c.value = bm.zeros(3)
    for v in obj.d:
        v.value = bm.zeros(3)
    obj.load_state_dict(zarrckpt.load_pytree(str(tmp_path / "c")))
    assert obj.a == 1 and type(obj.a) is int
    got = {k: np.asarray(v) for k, v in obj.__save_state__().items() if k != "a"}
    for k in expected:
        assert got[k].tobytes() == expected[k].tobytes(), k


def test_second_instance_restores_by_relative_path(tmp_path):
    with bm.training_environment():
        first, second = SNN(2.0), SNN(2.0)
    first.l2.V.value = bm.ones_like(first.l2.V.value) * 0.25
    assert set(first.state_dict()) != set(
        second.state_dict()
    )  # SNN0 vs SNN1: state_dict fails here
    where = zarrckpt.save_module(first, str(tmp_path / "m"), verbose=False)
    import zarr

    group = zarr.open_group(where, mode="r")
    assert sorted(group["l1"].array_keys()) == ["W"] and sorted(group["l2"].array_keys()) == [
        "V",
        "spike",
    ]
    result = zarrckpt.load_module(second, str(tmp_path / "m"))
    assert result == zarrckpt.StateLoadResult([], [])
    for key, value in _values(first).items():
        assert _values(second)[key].tobytes() == value.tobytes(), key


def test_shared_variable_is_stored_once_and_not_missing(tmp_path):
    class Net(bp.DynamicalSystem):
        def __init__(self):
            super().__init__()
            self.l2 = bp.dyn.Lif(4)
            self.V = self.l2.V  # the same Variable reachable by two paths

    net = Net()
    net.l2.V.value = bm.arange(4.0)
    zarrckpt.save_module(net, str(tmp_path / "m"), verbose=False)
    saved = zarrckpt.load_pytree(str(tmp_path / "m"))
    stored = [k for k in ("V",) if k in saved] + [f"l2/{k}" for k in saved["l2"] if k == "V"]
    assert len(stored) == 1
    other = Net()
    assert zarrckpt.load_module(other, str(tmp_path / "m")) == ([], [])
    np.testing.assert_array_equal(np.asarray(other.l2.V.value), np.arange(4.0))


def test_load_module_honours_load_state_and_reports_keys(tmp_path):
    class Holder(bp.DynamicalSystem):
        def __init__(self):
            super().__init__()
            self.inner = YourClass()
            self.w = bm.Variable(bm.ones(2))

    h = Holder()
    zarrckpt.save_module(h, str(tmp_path / "h"), verbose=False)
    h2 = Holder()
    assert zarrckpt.load_module(h2, str(tmp_path / "h")) == ([], [])
    assert np.asarray(h2.inner.c).tobytes() == np.asarray(h.inner.c).tobytes()

    zarrckpt.save_pytree(
        str(tmp_path / "h"),
        {
            "w": np.ones(2, np.float32),
            "zz": np.ones(1),
            "inner": zarrckpt.load_pytree(str(tmp_path / "h"))["inner"],
        },
        verbose=False,
    )
    with pytest.warns(UserWarning, match="Unexpected keys"):
        result = zarrckpt.load_module(h2, str(tmp_path / "h"))
    assert result.unexpected_keys == ["zz"] and result.missing_keys == []


def test_load_module_only_one_layer(tmp_path):
    with bm.training_environment():
        a, b = SNN(2.0), SNN(2.0)
    a.l2.V.value = bm.ones_like(a.l2.V.value)
    zarrckpt.save_module(a, str(tmp_path / "m"), verbose=False)
    w_before = np.asarray(b.l1.W.value).copy()
    assert zarrckpt.load_module(b, str(tmp_path / "m"), only="l2") == ([], [])
    np.testing.assert_array_equal(np.asarray(b.l2.V.value), 1)
    np.testing.assert_array_equal(np.asarray(b.l1.W.value), w_before)
    with pytest.raises(KeyError, match="'l9' is not a sub-module"):
        zarrckpt.load_module(b, str(tmp_path / "m"), only="l9")


def test_module_shape_mismatch_names_the_key(tmp_path):
    class Layer(bp.DynamicalSystem):
        def __init__(self, n):
            super().__init__()
            self.l1 = bp.dyn.Lif(n)

    zarrckpt.save_module(Layer(10), str(tmp_path / "m"), verbose=False)
    with pytest.raises(
        zarrckpt.StructureMismatchError,
        match=r"l1.V: shape \(10,\) dtype float32 in the checkpoint, shape \(11,\)",
    ):
        zarrckpt.load_module(Layer(11), str(tmp_path / "m"))


def test_brainpy_brainstate_and_units_as_leaves(url):
    var, train = bm.Variable(bm.arange(3.0)), bm.TrainVar(bm.ones((2, 2)))
    state = brainstate.State(jax.numpy.arange(4))
    tree = {"var": var, "train": train, "arr": bm.asarray([1, 2]), "state": state,
            "q": np.arange(3.0) * u.mV, "g": 2.0 * u.siemens / u.cm**2}  # fmt: skip
    zarrckpt.save_pytree(url, tree, verbose=False)
    plain = zarrckpt.load_pytree(url)
    assert type(plain["var"]) is np.ndarray and plain["state"].tolist() == [0, 1, 2, 3]
    assert plain["q"].unit == u.mV and np.array_equal(plain["q"].mantissa, [0.0, 1.0, 2.0])
    assert plain["g"].unit == u.siemens / u.cm**2 and float(plain["g"].mantissa) == 2.0

    target = {"var": bm.Variable(bm.zeros(3)), "train": bm.TrainVar(bm.zeros((2, 2))),
              "arr": bm.asarray([0, 0]), "state": brainstate.State(jax.numpy.zeros(4, int)),
              "q": np.zeros(3) * u.volt, "g": 0.0 * u.siemens / u.cm**2}  # fmt: skip
    same_var, same_state = target["var"], target["state"]
    out = zarrckpt.load_pytree(url, target)
    assert out["var"] is same_var and out["state"] is same_state  # updated in place
    np.testing.assert_array_equal(np.asarray(same_var.value), [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(np.asarray(same_state.value), [0, 1, 2, 3])
    assert out["q"].unit == u.mV  # the saved unit, not the target's
