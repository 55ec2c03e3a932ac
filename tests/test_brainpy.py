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


# --- paths from the node tree: BrainPy's E/I network with merging projections ----------------

NE, NI = 320, 80


class EINet(bp.DynSysGroup):
    """BrainPy's docs EINet (LifRefLTC, VarDelay, ProjAlignPostMg1 + Expon + COBA), small and
    with dense weights held in TrainVars so that a restore brings the connectivity too."""

    def __init__(self):
        super().__init__()
        n = NE + NI
        self.N = bp.dyn.LifRefLTC(n, V_rest=-60.0, V_th=-50.0, V_reset=-60.0, tau=20.0,
                                  tau_ref=5.0, V_initializer=bp.init.Normal(-55.0, 2.0))  # fmt: skip
        self.delay = bp.VarDelay(self.N.spike, entries={"I": 0.5})

        def dense(n_pre, weight):
            w = bm.where(bm.random.rand(n_pre, n) < 0.02, weight, 0.0)
            return bp.dnn.Linear(n_pre, n, W_initializer=w, b_initializer=None,
                                 mode=bm.training_mode)  # fmt: skip

        self.E = bp.dyn.ProjAlignPostMg1(comm=dense(NE, 0.6), syn=bp.dyn.Expon.desc(n, tau=5.0),
                                         out=bp.dyn.COBA.desc(E=0.0), post=self.N)  # fmt: skip
        self.I = bp.dyn.ProjAlignPostMg1(comm=dense(NI, 6.7), syn=bp.dyn.Expon.desc(n, tau=10.0),
                                         out=bp.dyn.COBA.desc(E=-80.0), post=self.N)  # fmt: skip

    def update(self, inp):
        spk = self.delay.at("I")
        self.E(spk[:NE])
        self.I(spk[NE:])
        self.delay(self.N(inp))
        return self.N.spike.value


def _run(net, start, steps):
    return np.asarray(bm.for_loop(lambda i: net.step_run(i, 20.0), np.arange(start, start + steps)))


def _group_paths(where):
    import zarr

    paths = []
    group = zarr.open_group(where, mode="r")

    def walk(g, prefix):
        for name, child in g.members():
            path = f"{prefix}/{name}" if prefix else name
            paths.append(path)
            if isinstance(child, zarr.Group):
                walk(child, path)

    walk(group, "")
    return paths


def test_einet_merging_projections_resume_spike_identical(tmp_path):
    first, second = EINet(), EINet()
    _run(first, 0, 200)
    where = zarrckpt.save_module(first, str(tmp_path / "ei"), verbose=False)
    expected = _run(first, 200, 300)
    assert expected.sum() > 0

    paths = _group_paths(where)
    for path in ("N/V", "N/spike", "N/t_last_spike", "delay/data", "E/comm/W", "I/comm/W",
                 "N/_before_updates/E/syn/g", "N/_before_updates/I/syn/g"):  # fmt: skip
        assert path in paths, (path, paths)
    assert not any(c in p for p in paths for c in "<>(){}' "), paths  # no reprs as group names
    ckpt = zarrckpt.open_checkpoint(str(tmp_path / "ei"))
    assert sorted(ckpt["N/_before_updates"].keys()) == ["E", "I"]

    assert zarrckpt.load_module(second, str(tmp_path / "ei")) == zarrckpt.StateLoadResult([], [])
    np.testing.assert_array_equal(_run(second, 200, 300), expected)


def test_einet_only_one_projection_and_names_stable_across_instances(tmp_path):
    first = EINet()
    _run(first, 0, 100)
    zarrckpt.save_module(first, str(tmp_path / "ei"), verbose=False)
    third = EINet()  # other global names (HalfProjAlignPostMg2, ...), same relative paths
    assert third.E.name != first.E.name
    w_before = np.asarray(third.I.comm.W.value).copy()
    v_before = np.asarray(third.N.V.value).copy()
    assert zarrckpt.load_module(third, str(tmp_path / "ei"), only="E") == ([], [])
    np.testing.assert_array_equal(np.asarray(third.E.comm.W.value), np.asarray(first.E.comm.W))
    np.testing.assert_array_equal(np.asarray(third.I.comm.W.value), w_before)
    np.testing.assert_array_equal(np.asarray(third.N.V.value), v_before)
    # the synapse registered by I on N, by its checkpoint path, its dotted key or a tuple
    syn_i = list(third.N.before_updates.values())[1]  # registered second, by I
    for only in ("N/_before_updates/I", "N._before_updates.I", ("N", "_before_updates", "I")):
        syn_i.syn.g.value = bm.zeros_like(syn_i.syn.g.value)
        assert zarrckpt.load_module(third, str(tmp_path / "ei"), only=only) == ([], [])
        g_first = list(first.N.before_updates.values())[1].syn.g
        np.testing.assert_array_equal(np.asarray(syn_i.syn.g.value), np.asarray(g_first))


def test_positional_children_named_by_class_and_index(tmp_path):
    def make():  # DynSysGroup keys positional children by their global names (Lif7, ...)
        return bp.DynSysGroup(bp.dyn.Lif(3), bp.dyn.Lif(4), bp.dyn.Expon(2))

    a = make()
    a.children[list(a.children)[1]].V.value = bm.arange(4.0)
    zarrckpt.save_module(a, str(tmp_path / "g"), verbose=False)
    assert sorted(zarrckpt.open_checkpoint(str(tmp_path / "g"))["children"].keys()) == [
        "Expon0", "Lif0", "Lif1",
    ]  # fmt: skip
    b = make()
    assert zarrckpt.load_module(b, str(tmp_path / "g")) == ([], [])
    np.testing.assert_array_equal(np.asarray(list(b.children.values())[1].V.value), np.arange(4.0))


def test_unexpected_and_missing_keys_are_the_real_ones(tmp_path):
    net = EINet()
    state = zarrckpt.load_pytree(zarrckpt.save_module(net, str(tmp_path / "a"), verbose=False)
                                 .rsplit("/", 1)[0])  # fmt: skip
    del state["N"]["_before_updates"]["I"]
    state["N"]["_before_updates"]["Z"] = {"syn": {"g": np.zeros(NE + NI, np.float32)}}
    state["extra"] = np.ones(2)
    zarrckpt.save_pytree(str(tmp_path / "b"), state, verbose=False)
    with pytest.warns(UserWarning) as record:
        result = zarrckpt.load_module(EINet(), str(tmp_path / "b"))
    assert sorted(str(w.message).split(":")[0] for w in record) == [
        "Missing keys in the checkpoint", "Unexpected keys in the checkpoint",
    ]  # fmt: skip
    assert result.missing_keys == ["N._before_updates.I.syn.g"]
    assert sorted(result.unexpected_keys) == ["N._before_updates.Z", "extra"]


# --- validate everything, then assign --------------------------------------------------------


class Three(bp.DynamicalSystem):
    def __init__(self, n):
        super().__init__()
        self.a = bm.Variable(bm.zeros(3))
        self.b = bm.Variable(bm.zeros(4, dtype=bm.int32))
        self.c = bm.Variable(bm.zeros(n))


def test_mismatch_in_the_last_variable_leaves_every_variable_unchanged(tmp_path):
    saved = Three(5)
    saved.a.value, saved.b.value, saved.c.value = bm.ones(3), bm.ones(4, bm.int32), bm.ones(5)
    zarrckpt.save_module(saved, str(tmp_path / "m"), verbose=False)
    other = Three(6)
    with pytest.raises(zarrckpt.StructureMismatchError, match=r"nothing was restored") as info:
        zarrckpt.load_module(other, str(tmp_path / "m"))
    assert "c: shape (5,) dtype float32 in the checkpoint, shape (6,) dtype float32" in str(
        info.value
    )
    for name in "abc":
        assert not np.asarray(getattr(other, name).value).any(), name  # nothing assigned


def test_mismatch_error_names_every_bad_key(tmp_path):
    zarrckpt.save_pytree(str(tmp_path / "m"), {"a": np.ones(2, np.float32),
                         "b": np.ones(4, np.float64), "c": np.ones(9, np.float32)},
                         verbose=False)  # fmt: skip
    other = Three(6)
    with pytest.raises(zarrckpt.StructureMismatchError, match=r"\(3 problems\)") as info:
        zarrckpt.load_module(other, str(tmp_path / "m"))
    message = str(info.value)
    assert "a: shape (2,) dtype float32 in the checkpoint, shape (3,) dtype float32" in message
    assert "b: shape (4,) dtype float64 in the checkpoint, shape (4,) dtype int32" in message
    assert "c: shape (9,)" in message


def test_hook_input_mismatch_is_found_before_anything_is_assigned(tmp_path):
    class Sized(YourClass):
        def __init__(self, n):
            bp.DynamicalSystem.__init__(self)
            self.a, self.b = 1, bm.random.rand(10)
            self.c = bm.Variable(bm.zeros(n))  # what __save_state__ gives as "c"
            self.d = bm.var_list([bm.Variable(bm.random.rand(3)), bm.Variable(bm.random.rand(3))])

    class Holder(bp.DynamicalSystem):
        def __init__(self, n):
            super().__init__()
            self.w = bm.Variable(bm.zeros(2))
            self.inner = Sized(n)

    saved = Holder(3)
    saved.w.value = bm.ones(2)
    zarrckpt.save_module(saved, str(tmp_path / "h"), verbose=False)
    other = Holder(4)
    d_before = [np.asarray(v.value).copy() for v in other.inner.d]
    with pytest.raises(zarrckpt.StructureMismatchError, match=r"inner\.c: shape \(3,\)"):
        zarrckpt.load_module(other, str(tmp_path / "h"))
    assert not np.asarray(other.w.value).any()
    for v, before in zip(other.inner.d, d_before, strict=True):
        np.testing.assert_array_equal(np.asarray(v.value), before)  # the hook never ran


def test_load_module_without_checkpoint_and_with_a_non_module(tmp_path):
    with pytest.warns(zarrckpt.MissingCheckpointWarning):
        result = zarrckpt.load_module(Three(2), str(tmp_path / "none"))
    assert result == (["a", "b", "c"], [])
    with pytest.raises(TypeError, match="expected a BrainPy module"):
        zarrckpt.save_module({"a": 1}, str(tmp_path / "x"))
