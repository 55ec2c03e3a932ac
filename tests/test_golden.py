"""The on-disk format is a promise: checkpoints written by every release load bit-exact.

``tests/golden/v<release>/`` holds checkpoints written once by that release
(``tests/golden/make_golden.py``, which also builds the expected values used here); every
test below runs on each of them. These tests use the public API only (``zarrckpt.*``; no private module, no step-directory name),
so that they keep testing the promise whatever changes inside. They read copies: nothing
may ever be written into ``tests/golden``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

import zarrckpt

GOLDEN = Path(__file__).resolve().parent / "golden"
if str(GOLDEN) not in sys.path:
    sys.path.insert(0, str(GOLDEN))  # make_golden, and golden_types for the namedtuples

import make_golden  # noqa: E402
from make_golden import CASES, LATER_CASES  # noqa: E402

#: every release that wrote golden checkpoints (a folder each)
VERSIONS = sorted(p.name for p in GOLDEN.glob("v*") if p.is_dir())


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.lstrip("v").split("."))


def _later(version: str) -> list[str]:
    """The :data:`LATER_CASES` that release ``version`` wrote (all of ``CASES`` it did)."""
    return [n for n, c in LATER_CASES.items() if _release(version) >= _release(c.since)]


def test_every_release_since_the_first_has_a_folder() -> None:
    assert VERSIONS[:2] == ["v0.1.0", "v0.2.0"]


@pytest.fixture(scope="module", params=VERSIONS)
def golden(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of one release's folder: loads must never touch the originals."""
    copy = tmp_path_factory.mktemp("golden") / request.param
    shutil.copytree(GOLDEN / request.param, copy)
    return copy


# --- comparison ----------------------------------------------------------------------------------


def _quantity_type() -> type | None:
    try:
        import brainunit as u
    except ImportError:  # pragma: no cover
        return None
    return u.Quantity


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


def same(got: Any, want: Any, where: str = "") -> None:
    """Equal types, keys, shapes, dtypes and bits, recursively (NaN equals the same NaN)."""
    assert type(got) is type(want), f"{where}: {type(got)} != {type(want)}"
    if isinstance(want, dict):
        assert [(type(k), k) for k in got] == [(type(k), k) for k in want], where
        for k in want:
            same(got[k], want[k], f"{where}/{k!r}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            same(g, w, f"{where}/{i}")
    elif isinstance(want, (np.ndarray, np.generic)):
        assert got.dtype == want.dtype and got.shape == want.shape, (where, got, want)
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), (where, got, want)
    elif isinstance(want, float):
        assert _bits(got) == _bits(want), (where, got, want)
    elif isinstance(want, complex):
        assert _bits(got.real) + _bits(got.imag) == _bits(want.real) + _bits(want.imag), where
    elif _quantity_type() is not None and isinstance(want, _quantity_type()):
        assert got.unit == want.unit, (where, got.unit, want.unit)
        for attr in ("scale", "base", "factor"):
            assert getattr(got.unit, attr) == getattr(want.unit, attr), (where, attr)
        # Not name and dispname: they are brainunit's text, which its versions spell
        # differently (a dimensionless unit: "Unit(10.0^0)" in 0.5, "1" in 0.6), while a load
        # restores the names the writer's brainunit recorded: test_units_keep_their_names.
        same(got.mantissa, want.mantissa, f"{where}.mantissa")
    else:
        assert got == want, (where, got, want)


def same_array(got: Any, want: Any, where: str = "") -> None:
    """``got`` (any array-like: JAX, zarr, ...) holds exactly ``want``'s dtype, shape, bits."""
    got = np.asarray(got)
    want = np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, (where, got, want)
    assert got.tobytes() == want.tobytes(), (where, got, want)


def zeros_like(tree: Any) -> Any:
    """A fresh tree of the same structure and leaf types, every value zero (or empty)."""
    if tree is None:
        return None
    if isinstance(tree, dict):
        return type(tree)((k, zeros_like(v)) for k, v in tree.items())
    if isinstance(tree, tuple) and hasattr(type(tree), "_fields"):
        return type(tree)(*map(zeros_like, tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(map(zeros_like, tree))
    if isinstance(tree, np.ndarray):
        return np.zeros_like(tree)
    if isinstance(tree, np.generic):
        return np.zeros((), tree.dtype)[()]
    if isinstance(tree, int) and not isinstance(tree, bool) and tree >= 2**63:
        # A Python int that only fits uint64 is stored as uint64, and a target int is matched
        # by the dtype it would be stored with: 0 (int64) is refused. 2**63 is the least
        # "zero" that stays uint64.
        return 2**63
    if isinstance(tree, (bool, int, float, complex, str, bytes)):
        return type(tree)()
    quantity = _quantity_type()
    if quantity is not None and isinstance(tree, quantity):
        return quantity(np.zeros_like(np.asarray(tree.mantissa)), unit=tree.unit)
    raise TypeError(f"no zero for {type(tree)}")


def _at(tree: Any, keys: tuple[Any, ...]) -> Any:
    for key in keys:
        tree = tree[key]
    return tree


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- the golden set itself -----------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_golden_folder_holds_exactly_the_cases(version: str) -> None:
    found = sorted(p.name for p in (GOLDEN / version).iterdir() if p.is_dir())
    assert found == sorted([*CASES, *_later(version)])


@pytest.mark.parametrize("name", list(CASES))
def test_manifest_is_a_zarr_group_with_format_version_1(golden: Path, name: str) -> None:
    doc = json.loads((golden / name / "zarr.json").read_text())
    assert doc["zarr_format"] == 3 and doc["node_type"] == "group"
    meta = doc["attributes"]["zarrckpt"]
    assert meta["format"] == "zarrckpt" and meta["version"] == 1
    assert [s["step"] for s in meta["steps"]] == list(CASES[name].steps)
    assert zarrckpt.list_steps(str(golden / name)) == list(CASES[name].steps)


# --- loading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_load_without_target_is_bit_exact(golden: Path, name: str) -> None:
    root, case = str(golden / name), CASES[name]
    for step in case.steps:
        same(zarrckpt.load_pytree(root, step=step), case.expected(step), f"{name}@{step}")
    latest = case.expected(case.steps[-1])
    same(zarrckpt.load_pytree(root), latest, name)
    same(zarrckpt.load_pytree(root, parallel=False), latest, name)
    same(zarrckpt.open_checkpoint(root).load(), latest, name)


@pytest.mark.parametrize("name", [n for n in CASES if n not in ("frameworks", "root_none")])
def test_load_into_a_zero_target(golden: Path, name: str) -> None:
    root, case = str(golden / name), CASES[name]
    for step in case.steps:
        expected = case.expected(step)
        target = zeros_like(expected)
        if name != "containers":  # (its leaves are mostly scalars: zero may equal the value)
            with pytest.raises(AssertionError):
                same(target, expected)
        same(zarrckpt.load_pytree(root, target, step=step), expected, f"{name}@{step}")


def test_framework_targets_are_updated_in_place(golden: Path) -> None:
    import jax
    import jax.numpy as jnp

    target = CASES["frameworks"].save(0)  # JAX arrays, BrainPy variables, brainstate States
    for key, value in target.items():
        if isinstance(value, jax.Array):
            target[key] = jnp.zeros_like(value)
        else:
            value.value = jnp.zeros_like(value.value)
    holders = {k: v for k, v in target.items() if not isinstance(v, jax.Array)}
    assert holders  # Variables, TrainVars, Arrays and States
    out = zarrckpt.load_pytree(str(golden / "frameworks"), target)
    assert list(out) == list(target)
    for key, want in CASES["frameworks"].expected(0).items():
        if key in holders:
            assert out[key] is holders[key], key
            same_array(out[key].value, want, key)
        else:
            assert isinstance(out[key], jax.Array), key
            same_array(out[key], want, key)


# --- lazy reads ----------------------------------------------------------------------------------

LAZY = [
    # (case, path in the checkpoint, keys into the expected tree, selection)
    ("arrays", "dtypes/float64", ("dtypes", "float64"), np.s_[...]),
    ("arrays", "dtypes/bfloat16", ("dtypes", "bfloat16"), np.s_[1:, ::2]),
    ("arrays", "dtypes/float8_e4m3fn", ("dtypes", "float8_e4m3fn"), np.s_[...]),
    ("arrays", "dtypes/uint2", ("dtypes", "uint2"), np.s_[...]),
    ("arrays", "dtypes/complex64", ("dtypes", "complex64"), np.s_[1, ::-1]),
    ("arrays", "zero_d/bool", ("zero_d", "bool"), np.s_[...]),
    ("arrays", "zero_size/int8_3x0", ("zero_size", "int8_3x0"), np.s_[...]),
    ("arrays", "layouts/big_endian_f8", ("layouts", "big_endian_f8"), np.s_[1:4]),
    ("chunked", "f32_11x7", ("f32_11x7",), np.s_[2:9:3, 1:]),
    ("chunked", "f32_11x7", ("f32_11x7",), np.s_[10]),
    ("chunked", "f64_3x5x4", ("f64_3x5x4",), np.s_[:, 1:5, ::-1]),
    ("chunked", "f32_2x40", ("f32_2x40",), np.s_[1, 10:35]),
    ("chunked", "i32_40", ("i32_40",), np.s_[::-5]),
    ("chunked", "bool_101", ("bool_101",), np.s_[45:101]),
    ("chunked", "bf16_5x7", ("bf16_5x7",), np.s_[...]),
    ("codec_gzip", "i16_300", ("i16_300",), np.s_[100:250]),
    ("codec_zstd", "f32_40", ("f32_40",), np.s_[5:37:4]),
    ("codec_none", "bool_200", ("bool_200",), np.s_[...]),
    ("containers", "deep/a/b/c/0/d", ("deep", "a", "b", "c", 0, "d"), np.s_[...]),
    ("containers", "odict/a", ("odict", "a"), np.s_[1:]),
    ("escaped_keys", "a%2Fb", ("a/b",), np.s_[...]),
    ("escaped_keys", "%2E%2E", ("..",), np.s_[...]),
    ("escaped_keys", "ünïcødé", ("ünïcødé",), np.s_[...]),
    ("escaped_keys", "nested%2Fdir/%2E%2E/%", ("nested/dir", "..", ""), np.s_[::2]),
    ("module", "lin/W", ("lin", "W"), np.s_[...]),
    ("module", "lif.V", ("lif", "V"), np.s_[...]),  # BrainPy's dotted path
    ("state_dict", "net/golden_lin/golden_lin.W", ("net", "golden_lin", "golden_lin.W"), np.s_[1]),
    ("frameworks", "jax_bf16", ("jax_bf16",), np.s_[...]),
    ("multistep", "w", ("w",), np.s_[:, 1]),
]


@pytest.mark.parametrize(("name", "path", "keys", "selection"), LAZY)
def test_open_checkpoint_reads_one_leaf_lazily(golden, name, path, keys, selection) -> None:
    case = CASES[name]
    ckpt = zarrckpt.open_checkpoint(str(golden / name))
    assert ckpt.step == case.steps[-1] and ckpt.steps == list(case.steps)
    want = np.asarray(_at(case.expected(case.steps[-1]), keys))
    leaf = ckpt[path]
    assert isinstance(leaf, zarrckpt.LazyArray)
    assert leaf.shape == want.shape and leaf.dtype == want.dtype
    same_array(leaf[selection], want[selection], f"{name}:{path}")


LAZY_LOADS = [
    # (case, path, keys): ``.load()`` of a leaf or a sub-tree returns it as saved
    ("scalars", "str/unicode", ("str", "unicode")),
    ("scalars", "bytes/all_256", ("bytes", "all_256")),
    ("scalars", "py/int_max_u64", ("py", "int_max_u64")),
    ("scalars", "py/float_nan", ("py", "float_nan")),
    ("scalars", "np/bfloat16", ("np", "bfloat16")),
    ("containers", "int_str_collision", ("int_str_collision",)),
    ("containers", "nested_namedtuples", ("nested_namedtuples",)),
    ("escaped_keys", "nested%2Fdir", ("nested/dir",)),
    ("quantity", "conductance", ("conductance",)),
    ("quantity", "kHz_2x2", ("kHz_2x2",)),
    ("module", "lif", ("lif",)),
]


@pytest.mark.parametrize(("name", "path", "keys"), LAZY_LOADS)
def test_open_checkpoint_loads_a_subtree(golden, name, path, keys) -> None:
    ckpt = zarrckpt.open_checkpoint(str(golden / name))
    want = _at(CASES[name].expected(0), keys)
    same(ckpt.load(path), want, f"{name}:{path}")
    same(ckpt[path].load(), want, f"{name}:{path}")  # a LazyArray's or a TreeView's load()


# --- BrainPy -------------------------------------------------------------------------------------


def _module_vars(net: Any) -> dict[str, dict[str, np.ndarray]]:
    return {
        layer: {var: np.asarray(getattr(getattr(net, layer), var).value) for var in variables}
        for layer, variables in make_golden.module_values().items()
    }


def test_load_module_restores_a_fresh_instance(golden: Path) -> None:
    root = str(golden / "module")
    want = make_golden.module_values()
    net = make_golden.build_net(values=False)  # BrainPy's own initial values
    assert _module_vars(net)["lin"]["W"].tobytes() != want["lin"]["W"].tobytes()
    result = zarrckpt.load_module(net, root)
    assert isinstance(result, zarrckpt.StateLoadResult)
    assert result.missing_keys == [] and result.unexpected_keys == []
    same(_module_vars(net), want)

    other = make_golden.build_net(values=False)
    w_before = _module_vars(other)["lin"]["W"]
    assert zarrckpt.load_module(other, root, only="lif") == ([], [])
    same(_module_vars(other)["lif"], want["lif"])
    same(_module_vars(other)["lin"]["W"], w_before)


def test_state_dict_loads_into_the_named_network(golden: Path) -> None:
    state = zarrckpt.load_pytree(str(golden / "state_dict"))
    assert state["epoch"] == 3 and type(state["epoch"]) is int
    net = make_golden.build_net(make_golden.STATE_DICT_NAMES, values=False)
    result = net.load_state_dict(state["net"])
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    same(_module_vars(net), make_golden.module_values())


# --- several steps -------------------------------------------------------------------------------


def test_every_step_of_a_multistep_root(golden: Path) -> None:
    root, case = str(golden / "multistep"), CASES["multistep"]
    assert zarrckpt.list_steps(root) == [0, 1, 2] and zarrckpt.latest_step(root) == 2
    for step in case.steps:
        expected = case.expected(step)
        same(zarrckpt.load_pytree(root, step=step), expected, f"step {step}")
        ckpt = zarrckpt.open_checkpoint(root, step=step)
        assert ckpt.step == step and ckpt.steps == [0, 1, 2]
        same_array(ckpt["w"][...], expected["w"])
        same(ckpt["tag"].load(), f"step-{step}")
        assert ("extra" in ckpt) == (step == 2)
    with pytest.raises(zarrckpt.CheckpointNotFoundError):
        zarrckpt.load_pytree(root, step=3)


def _unit_records(node: Any, found: dict[str, Any]) -> dict[str, Any]:
    """{leaf path: unit record} of the quantity leaves in a step record's tree."""
    if isinstance(node, dict):
        if node.get("kind") == "quantity":
            found[node["path"]] = node["unit"]
        for value in node.values():
            _unit_records(value, found)
    elif isinstance(node, list):
        for value in node:
            _unit_records(value, found)
    return found


def test_units_keep_their_names(golden: Path) -> None:
    """A loaded Quantity's unit is named as the checkpoint recorded it (the writer's brainunit
    spelled the names), not as the brainunit installed now would spell the same unit."""
    root = golden / "quantity"
    manifest = json.loads((root / "zarr.json").read_text())
    for entry in manifest["attributes"]["zarrckpt"]["steps"]:
        record = json.loads((root / entry["dir"] / "zarr.json").read_text())
        units = _unit_records(record["attributes"]["zarrckpt"]["tree"], {})
        assert len(units) == 8 and units["dimensionless_f32"]["name"] == "Unit(10.0^0)"
        ckpt = zarrckpt.open_checkpoint(str(root), step=entry["step"])
        for path, unit in units.items():
            got = ckpt[path].load().unit
            assert (got.name, got.dispname) == (unit["name"], unit["dispname"]), path


# --- without zarrckpt's reader -------------------------------------------------------------------

PLAIN_ZARR = [
    # (case, Zarr node path in the latest step, keys into the expected tree)
    ("arrays", "dtypes/float64", ("dtypes", "float64")),
    ("arrays", "dtypes/bool", ("dtypes", "bool")),
    ("arrays", "dtypes/complex128", ("dtypes", "complex128")),
    ("arrays", "dtypes/bfloat16", ("dtypes", "bfloat16")),
    ("arrays", "dtypes/float8_e5m2", ("dtypes", "float8_e5m2")),
    ("arrays", "dtypes/int4", ("dtypes", "int4")),
    ("arrays", "zero_d/complex128", ("zero_d", "complex128")),
    ("arrays", "zero_size/bool_0x2", ("zero_size", "bool_0x2")),
    ("arrays", "layouts/big_endian_i4", ("layouts", "big_endian_i4")),
    ("chunked", "f32_11x7", ("f32_11x7",)),
    ("chunked", "f64_3x5x4", ("f64_3x5x4",)),
    ("chunked", "i32_40", ("i32_40",)),
    ("codec_gzip", "i16_300", ("i16_300",)),
    ("codec_zstd", "bool_200", ("bool_200",)),
    ("escaped_keys", "a%2Fb", ("a/b",)),
    ("module", "lin/W", ("lin", "W")),
    ("multistep", "w", ("w",)),
]


@pytest.mark.parametrize(("name", "node", "keys"), PLAIN_ZARR)
def test_plain_zarr_python_reads_the_latest_step(golden, name, node, keys) -> None:
    root = golden / name
    manifest = json.loads((root / "zarr.json").read_text())
    step_dir = manifest["attributes"]["zarrckpt"]["steps"][-1]["dir"]
    group = zarr.open_group(str(root / step_dir), mode="r")
    array = group[node]
    want = np.asarray(_at(CASES[name].expected(CASES[name].steps[-1]), keys))
    assert array.shape == want.shape and array.dtype == want.dtype
    same_array(array[...], want, f"{name}:{node}")


# --- cases added after 0.1.0 --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "name"), [(v, n) for v in VERSIONS for n in _later(v)]
)  # fmt: skip
def test_a_later_case_loads_bit_exact_under_its_recorded_names(tmp_path, version, name) -> None:
    root = tmp_path / name
    shutil.copytree(GOLDEN / version / name, root)
    case = LATER_CASES[name]
    expected = case.expected(case.steps[-1])
    same(zarrckpt.load_pytree(str(root)), expected, f"{version}/{name}")
    same(zarrckpt.load_pytree(str(root), zeros_like(expected)), expected, f"{version}/{name}")
    ckpt = zarrckpt.open_checkpoint(str(root))
    paths = [leaf.path for leaf in ckpt.leaves()]
    if name == "portable_names":
        assert paths == make_golden.PORTABLE_PATHS
    manifest = json.loads((root / "zarr.json").read_text())
    group = zarr.open_group(str(root / manifest["attributes"]["zarrckpt"]["steps"][-1]["dir"]))
    for path in paths:  # plain zarr-python opens each leaf by its recorded name
        same_array(group[path][...], ckpt[path][...], f"{version}/{name}:{path}")
        same_array(group[path][...], ckpt.load(path), f"{version}/{name}:{path}")


# --- reading writes nothing ----------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_reading_writes_nothing(tmp_path: Path, version: str) -> None:
    root = tmp_path / "multistep"
    shutil.copytree(GOLDEN / version / "multistep", root)
    before = _digest(root)
    zarrckpt.load_pytree(str(root))
    zarrckpt.load_pytree(str(root), zeros_like(CASES["multistep"].expected(1)), step=1)
    zarrckpt.list_steps(str(root))
    ckpt = zarrckpt.open_checkpoint(str(root), step=0)
    ckpt["w"][0]
    ckpt.load()
    assert _digest(root) == before
