"""Write the golden checkpoints of this zarrckpt release; define what they hold.

Run once per release, from the repository root::

    python tests/golden/make_golden.py

It writes ``tests/golden/v<zarrckpt.__version__>/<case>/`` with the code installed now and
refuses to touch a folder that already exists: golden checkpoints are written once, by the
release they belong to, and every later version must load them bit-exact
(``tests/test_golden.py``). Never regenerate or edit an existing ``v*/`` folder, and never
change what an existing case's functions below return (that is the expected data); add new
cases instead.

Importing this module writes nothing. :data:`CASES` maps each case name to a :class:`Case`
whose ``save(step)`` builds what is saved (fresh objects every call) and whose
``expected(step)`` builds what ``zarrckpt.load_pytree`` returns for it without a target.
All values come from exact arithmetic or explicit bit patterns (no random generators, no
transcendental functions, no clock), so the expected trees are the same on every machine
and every numpy/BrainPy version.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import ml_dtypes
import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # golden_types must import under that top-level name

from golden_types import Outer, Point  # noqa: E402

# --- values --------------------------------------------------------------------------------------

NUMPY_DTYPES = [
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
]  # fmt: skip
#: The ml_dtypes types zarrckpt 0.1.0 stores (its ``_dtypes._ML_NAMES``, all present in
#: ml_dtypes 0.6.0).
ML_DTYPES = [
    "bfloat16", "float8_e3m4", "float8_e4m3", "float8_e4m3fn", "float8_e4m3fnuz",
    "float8_e4m3b11fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn",
    "int2", "int4", "uint2", "uint4",
]  # fmt: skip
ALL_DTYPES = NUMPY_DTYPES + ML_DTYPES
_SUB_BYTE_BITS = {"float4_e2m1fn": 4, "int2": 2, "int4": 4, "uint2": 2, "uint4": 4}

# Float bit patterns: a NaN with a payload (not numpy's default NaN) must survive too.
_PAYLOAD_NAN = {"float16": 0x7E01, "float32": 0x7FC00001, "float64": 0x7FF8000000000001}


def dtype(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name)) if name in ML_DTYPES else np.dtype(name)


def f32(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def ramp(shape: tuple[int, ...], dt: Any = np.float32, start: int = 0, div: int = 4) -> np.ndarray:
    """``(start + arange) / div`` wrapped into a small range: exact in every float dtype."""
    n = int(np.prod(shape))
    values = ((np.arange(n, dtype=np.int64) * 7 + start) % 61 - 30) / div
    return values.astype(dt).reshape(shape)


def dtype_sample(name: str) -> np.ndarray:
    """A small array of dtype ``name`` covering its special values (or every bit pattern)."""
    dt = dtype(name)
    if name == "bool":
        return (np.arange(12) % 3 == 0).reshape(3, 4)
    if dt.kind in "iu" and name not in ML_DTYPES:
        info = np.iinfo(dt)
        values = [info.min, info.max, 0, 1, 2, 3, 100, info.min + 1, info.max - 1, 7, 11, 13]
        if info.min < 0:
            values[4:7] = [-1, -2, -100]
        return np.array(values, dtype=dt).reshape(3, 4)
    if name in ("float16", "float32", "float64"):
        info = np.finfo(dt)
        values = [0.0, -0.0, 1.0, -1.5, 1000.0, np.inf, -np.inf, np.nan,
                  info.max, info.tiny, info.smallest_subnormal, 0.0]  # fmt: skip
        out = np.array(values, dtype=dt)
        out[-1:].view(f"u{dt.itemsize}")[0] = _PAYLOAD_NAN[name]  # the last: a payload NaN
        return out.reshape(3, 4)
    if dt.kind == "c":
        real = np.array([0.0, 1.0, -1.5, np.inf, np.nan, -0.0], dtype=np.float64)
        imag = np.array([0.0, 2.0, -0.25, -np.inf, 1.0, np.nan], dtype=np.float64)
        out = np.empty(6, dtype=dt)
        out.real, out.imag = real, imag
        return out.reshape(2, 3)
    if name == "bfloat16":  # explicit bit patterns: zeros, 1, -1.5, infs, NaNs, max, tiny, ...
        bits = [0x0000, 0x8000, 0x3F80, 0xBFC0, 0x7F80, 0xFF80,
                0x7FC0, 0x7F81, 0x0001, 0x7F7F, 0x0080, 0x4049]  # fmt: skip
        return np.array(bits, dtype=np.uint16).view(dt).reshape(3, 4)
    if name in _SUB_BYTE_BITS:  # every valid bit pattern, in the low bits of a byte
        return np.arange(2 ** _SUB_BYTE_BITS[name], dtype=np.uint8).view(dt).reshape(-1, 2)
    assert dt.itemsize == 1, name  # 8-bit floats: all 256 bit patterns
    return np.arange(256, dtype=np.uint8).view(dt).reshape(16, 16)


# --- cases ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One golden checkpoint root."""

    doc: str
    save: Callable[[int], Any]  # step -> the tree (or BrainPy module) saved
    expected: Callable[[int], Any]  # step -> what load_pytree(root, step=step) returns
    steps: tuple[int, ...] = (0,)
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra save_pytree arguments
    module: bool = False  # saved with zarrckpt.save_module instead of save_pytree
    since: str = "0.1.0"  # the first release whose folder holds it (LATER_CASES)


def _native_c(a: np.ndarray) -> np.ndarray:
    """What a load returns for a saved numpy array: native byte order, C order."""
    return np.ascontiguousarray(a.astype(a.dtype.newbyteorder("=")))


def _arrays(as_saved: bool) -> dict[str, Any]:
    layouts = {
        "big_endian_i4": np.arange(6, dtype=">i4").reshape(2, 3) - 3,
        "big_endian_f8": ramp((5,), ">f8"),
        "big_endian_c8": np.array([1 + 2j, -0.5j], dtype=">c8"),
        "fortran_f32": np.asfortranarray(ramp((3, 4))),
        "strided_i64": np.arange(30, dtype=np.int64)[::4],
        "transposed_u16": np.arange(12, dtype=np.uint16).reshape(3, 4).T,
        "rank5_i16": np.arange(12, dtype=np.int16).reshape(2, 1, 3, 1, 2),
    }
    if not as_saved:
        layouts = {k: _native_c(v) for k, v in layouts.items()}
    return {
        "dtypes": {name: dtype_sample(name) for name in ALL_DTYPES},
        "zero_d": {
            "float32": np.array(1.5, np.float32),
            "int64": np.array(-7, np.int64),
            "bool": np.array(True),
            "complex128": np.array(-1 + 0.5j),
            "bfloat16": np.array(2.5, np.float32).astype(ml_dtypes.bfloat16),
            "float8_e4m3fn": np.array(-3.0, np.float32).astype(ml_dtypes.float8_e4m3fn),
            "uint4": np.array(9, np.uint8).astype(ml_dtypes.uint4),
        },
        "zero_size": {
            "float32_0": np.zeros(0, np.float32),
            "int8_3x0": np.zeros((3, 0), np.int8),
            "bool_0x2": np.zeros((0, 2), bool),
            "complex128_2x0x3": np.zeros((2, 0, 3), np.complex128),
            "bfloat16_0": np.zeros(0, ml_dtypes.bfloat16),
            "int4_0x5": np.zeros((0, 5), ml_dtypes.int4),
        },
        "layouts": layouts,
    }


def _chunked(step: int) -> dict[str, Any]:
    # Saved with chunk_bytes=64: every leaf but "one_chunk" and "zero_d" has several chunks.
    return {
        "f32_11x7": ramp((11, 7)),  # 28 B rows -> chunks (2, 7): 6 chunks, edge of 1 row
        "f64_3x5x4": ramp((3, 5, 4), np.float64, 1),  # chunks (1, 2, 4): edge on axis 1
        "f32_2x40": ramp((2, 40), np.float32, 2),  # a row > 64 B -> chunks (1, 14), edge 12
        "i32_40": np.arange(40, dtype=np.int32) * 3 - 50,  # zstd:1 (default), chunks 14,14,12
        "bool_101": np.arange(101) % 4 == 1,  # zstd:1, chunks 51 + 50
        "c64_9": (np.arange(9) + 1j * np.arange(9)[::-1]).astype(np.complex64),  # 5 + 4
        "bf16_5x7": ramp((5, 7), ml_dtypes.bfloat16, 3),  # chunks (3, 7): 3 + 2 rows
        "f8_70": np.arange(70, dtype=np.uint8).view(ml_dtypes.float8_e5m2),  # 35 + 35
        "one_chunk": f32([1.0, 2.0, 3.0]),
        "zero_d": np.array(0.5, np.float64),
    }


def _codec_tree(step: int) -> dict[str, Any]:
    # Saved with an explicit codec for every leaf and chunk_bytes=128 (several chunks).
    return {
        "i16_300": (np.arange(300, dtype=np.int16) % 17) * 5,  # 600 B: 5 chunks, edge
        "i64_50": np.arange(50, dtype=np.int64) // 3,
        "u8_0d": np.array(200, np.uint8),
        "f32_40": ramp((40,)),
        "bool_200": np.arange(200) % 7 == 0,
    }


def _scalars(step: int) -> dict[str, Any]:
    return {
        "py": {
            "true": True,
            "false": False,
            "int": 42,
            "int_neg": -7,
            "int_max_i64": 2**63 - 1,
            "int_min_i64": -(2**63),
            "int_max_u64": 2**64 - 1,  # stored as uint64
            "float": 0.1,
            "float_neg_zero": -0.0,
            "float_inf": float("inf"),
            "float_nan": float("nan"),
            "complex": 1.5 - 2.25j,
            "complex_nan": complex(float("nan"), -1.0),
        },
        "np": {
            "float16": np.float16(-0.5),
            "float32": np.float32(0.1),
            "float64": np.float64(-1e300),
            "int8": np.int8(-5),
            "uint64": np.uint64(2**64 - 1),
            "bool": np.bool_(True),
            "complex64": np.complex64(1 - 2j),
            "complex128": np.complex128(-0.25 + 4j),
            "bfloat16": ml_dtypes.bfloat16(1.5),
            "float8_e4m3fn": ml_dtypes.float8_e4m3fn(-2.0),
            "int4": ml_dtypes.int4(-3),
        },
        "str": {
            "ascii": "hello",
            "empty": "",
            "unicode": "ünïcødé 日本語 🧠",
            "control": "a\x00b\nc\t",
        },
        "bytes": {"empty": b"", "all_256": bytes(range(256)), "text": b"zarr"},
        "none": None,
    }


def _containers(step: int) -> dict[str, Any]:
    return {
        "dict": {"b": 1, "a": np.arange(2, dtype=np.int16), "c": "see"},  # insertion order
        "int_keys": {3: "three", -7: 7.5, 0: None, 10**20: b"big"},
        # int 1 and str "1" in one dict: the int is stored as "%i1"; the literal str "%i1"
        # escapes to "%25i1", so neither collides.
        "int_str_collision": {1: "int one", "1": "str one", "%i1": "literal", 2: "int two"},
        "str_int_collision": {"7": np.int8(7), 7: np.uint8(7)},
        "odict": OrderedDict([("z", 1), ("a", np.arange(3.0)), ("m", None)]),
        "list": [1, "two", 3.0, None, [np.int8(4)], ()],
        "tuple": (np.float32(1), (2, (3,)), []),
        "namedtuple": Point(x=np.arange(2, dtype=np.uint32), y=None),
        "nested_namedtuples": [Point(1, 2.5), Outer.Inner(a=Point(x=[], y={}), b="b")],
        "empty": {"dict": {}, "list": [], "tuple": (), "odict": OrderedDict()},
        "none": None,
        "deep": {"a": {"b": {"c": [{"d": np.arange(4, dtype=np.int32).reshape(2, 2)}]}}},
    }


# Keys that need escaping (and neighbours that must stay distinct from them). No two keys
# differ only in case, and none has a character Windows forbids, so checkouts work anywhere.
ESCAPED_KEYS = [
    "a/b", "100%", "%", "", ".", "..", "__x", "__", "_x", "a.b", "%2E", "%25",
    "back\\slash", "ctl\x00\x01\n\t\x1f\x7f", "ünïcødé", "日本語", "🧠", "a b",
]  # fmt: skip


def _escaped(step: int) -> dict[str, Any]:
    tree: dict[str, Any] = {key: np.array(i, np.int32) for i, key in enumerate(ESCAPED_KEYS)}
    tree["nested/dir"] = {"..": {"": ramp((3,)), "x/y": "s", "__zarr": [b"%"]}}
    return tree


def _quantities(as_saved: bool) -> dict[str, Any]:
    import brainunit as u

    def q(mantissa: Any, unit: Any) -> Any:
        if as_saved:
            return mantissa * unit if unit is not None else u.Quantity(mantissa)
        return u.Quantity(np.asarray(mantissa), unit=u.Unit() if unit is None else unit)

    tree = {
        "mV_f64": q(np.arange(3.0), u.mV),
        "conductance": q(2.0, u.siemens / u.cm**2),  # a Python float mantissa (0-d on load)
        "ms_i32": q(np.arange(3, dtype=np.int32), u.ms),
        "dimensionless_f32": q(np.float32(1.5), None),  # a numpy-scalar mantissa
        "acceleration": q(f32([1.0, -2.0]), u.meter / u.second**2),
        "kHz_2x2": q(f32([[1, 2], [3, 4]]), u.kHz),
    }
    if as_saved:
        import brainstate
        import jax.numpy as jnp

        tree["jax_nA"] = jnp.asarray(f32([0.5, 1.5])) * u.nA
        tree["state_nA"] = brainstate.State(np.arange(2.0) * u.nA)  # loads as a Quantity
    else:
        tree["jax_nA"] = u.Quantity(f32([0.5, 1.5]), unit=u.nA)
        tree["state_nA"] = u.Quantity(np.arange(2.0), unit=u.nA)
    return tree


def _frameworks(as_saved: bool) -> dict[str, Any]:
    """JAX arrays, BrainPy Variable/TrainVar/Array, brainstate States: numpy on load."""
    values = {
        "jax_f32": ramp((2, 3)),
        "jax_i32": np.arange(5, dtype=np.int32) - 2,
        "jax_bool": np.array([True, False, True]),
        "jax_bf16": ramp((4,), ml_dtypes.bfloat16),
        "bm_variable": ramp((3,), np.float32, 5),
        "bm_trainvar": ramp((2, 2), np.float32, 9),
        "bm_array": np.array([1, 2], np.int32),
        "bs_state": np.arange(4, dtype=np.int32),
        "bs_param": ramp((2,), np.float32, 11),
        "bs_short_term": np.array([False, True]),
    }
    if not as_saved:
        return values
    import brainpy.math as bm
    import brainstate
    import jax.numpy as jnp

    wrap = {
        "jax": jnp.asarray, "bm_variable": bm.Variable, "bm_trainvar": bm.TrainVar,
        "bm_array": bm.Array, "bs_state": lambda v: brainstate.State(jnp.asarray(v)),
        "bs_param": lambda v: brainstate.ParamState(jnp.asarray(v)),
        "bs_short_term": lambda v: brainstate.ShortTermState(jnp.asarray(v)),
    }  # fmt: skip
    return {k: wrap["jax" if k.startswith("jax") else k](v) for k, v in values.items()}


# --- BrainPy -------------------------------------------------------------------------------------


def module_values() -> dict[str, dict[str, np.ndarray]]:
    """The variables of the golden network by relative path, as ``load_pytree`` returns them."""
    return {
        "lin": {"W": ramp((3, 4), np.float32, 13), "b": f32([0.5, -0.25, 0.0, 1.0])},
        "lif": {"V": f32([[0.125, -0.5, 0.75, 0.0]]), "spike": f32([[0, 1, 0, 1]])},
    }


#: Global node names of the network saved through ``state_dict()`` (BrainPy state dicts are
#: keyed by them). Its ODE integrator cannot be named; it was the first one created.
STATE_DICT_NAMES = {"net": "golden_net", "lin": "golden_lin", "lif": "golden_lif"}
STATE_DICT_INTEGRATOR = "ExponentialEuler0"


def build_net(names: dict[str, str] | None = None, values: Any = None) -> Any:
    """A tiny BrainPy network: Linear(3 -> 4) then LIF(4), in training mode (batch 1).

    ``values`` (default :func:`module_values`) are assigned to its variables;
    ``values=False`` leaves BrainPy's own initial values.
    """
    import brainpy as bp
    import brainpy.math as bm
    import jax.numpy as jnp

    names = names or {}

    class GoldenNet(bp.DynSysGroup):
        def __init__(self) -> None:
            super().__init__(name=names.get("net"))
            self.lin = bp.dnn.Linear(3, 4, name=names.get("lin"))
            self.lif = bp.dyn.Lif(4, name=names.get("lif"))

        def update(self, x: Any) -> Any:
            return self.lif(self.lin(x))

    with bm.training_environment():
        net = GoldenNet()
    if values is not False:
        for layer, variables in (values or module_values()).items():
            for var, value in variables.items():
                getattr(getattr(net, layer), var).value = jnp.asarray(value)
    return net


def _state_dict_expected() -> dict[str, Any]:
    v, n = module_values(), STATE_DICT_NAMES
    return {
        "net": {
            n["net"]: {},
            n["lin"]: {f"{n['lin']}.W": v["lin"]["W"], f"{n['lin']}.b": v["lin"]["b"]},
            n["lif"]: {f"{n['lif']}.V": v["lif"]["V"], f"{n['lif']}.spike": v["lif"]["spike"]},
            STATE_DICT_INTEGRATOR: {},
        },
        "epoch": 3,
    }


# --- several steps -------------------------------------------------------------------------------


def _multistep(step: int) -> dict[str, Any]:
    tree: dict[str, Any] = {
        "step": step,
        "w": ramp((2, 3), np.float32, 10 * step),
        "tag": f"step-{step}",
        "spikes": np.arange(8) % (step + 2) == 0,
    }
    if step == 2:
        tree["extra"] = [step, None]  # the structure may change from step to step
    return tree


CASES: dict[str, Case] = {
    # Listed in the order main() saves them: state_dict first, so that its integrator is the
    # first one the process creates (STATE_DICT_INTEGRATOR).
    "state_dict": Case(
        "{'net': net.state_dict(), 'epoch': 3} of a BrainPy Linear+LIF net (global names)",
        lambda step: {"net": build_net(STATE_DICT_NAMES).state_dict(), "epoch": 3},
        lambda step: _state_dict_expected(),
    ),
    "module": Case(
        "zarrckpt.save_module of the same net: variables by relative path (lin/W, lif/V)",
        lambda step: build_net(),
        lambda step: module_values(),
        module=True,
    ),
    "arrays": Case(
        "every supported dtype (numpy + ml_dtypes; specials, payload NaNs, all bit patterns "
        "of 8-bit and sub-byte types), 0-d, zero-size, big-endian/Fortran/strided inputs",
        lambda step: _arrays(as_saved=True),
        lambda step: _arrays(as_saved=False),
    ),
    "chunked": Case(
        "multi-chunk leaves (chunk_bytes=64) with edge chunks on the first and second axis, "
        "raw floats and zstd:1 ints/bools",
        _chunked,
        _chunked,
        kwargs={"chunk_bytes": 64},
    ),
    "codec_gzip": Case(
        "codec='gzip:6' on every leaf, several chunks",
        _codec_tree,
        _codec_tree,
        kwargs={"codec": "gzip:6", "chunk_bytes": 128},
    ),
    "codec_zstd": Case(
        "codec='zstd:5' on every leaf (floats too), several chunks",
        _codec_tree,
        _codec_tree,
        kwargs={"codec": "zstd:5", "chunk_bytes": 128},
    ),
    "codec_none": Case(
        "codec='none' on every leaf (ints and bools raw too), several chunks",
        _codec_tree,
        _codec_tree,
        kwargs={"codec": "none", "chunk_bytes": 128},
    ),
    "scalars": Case(
        "Python bool/int/float/complex (int64/uint64 limits, -0.0, inf, nan), numpy and "
        "ml_dtypes scalars, str, bytes, None",
        _scalars,
        _scalars,
    ),
    "containers": Case(
        "dict (str keys, int keys, int/str key collisions), OrderedDict, list, tuple, "
        "namedtuples (plain and nested typing.NamedTuple), empty containers, None, deep nesting",
        _containers,
        _containers,
    ),
    "escaped_keys": Case(
        "keys escaped into node names: '/', '%', '.', '..', leading '__', '', control "
        "characters, backslash, unicode",
        _escaped,
        _escaped,
    ),
    "quantity": Case(
        "brainunit Quantities (float, int, Python-float, JAX and State-held mantissas; "
        "compound and scaled units)",
        lambda step: _quantities(as_saved=True),
        lambda step: _quantities(as_saved=False),
    ),
    "frameworks": Case(
        "JAX arrays, BrainPy Variable/TrainVar/Array, brainstate State/ParamState/"
        "ShortTermState leaves",
        lambda step: _frameworks(as_saved=True),
        lambda step: _frameworks(as_saved=False),
    ),
    "multistep": Case(
        "one root, keep=None, committed steps 0, 1, 2 with different values and structure",
        _multistep,
        _multistep,
        steps=(0, 1, 2),
        kwargs={"keep": None},
    ),
    "root_leaf": Case(
        "a tree that is a single array (no container)",
        lambda step: np.arange(5, dtype=np.int16) - 2,
        lambda step: np.arange(5, dtype=np.int16) - 2,
    ),
    "root_none": Case("a tree that is None (no leaf at all)", lambda step: None, lambda step: None),
}


def trees(step: int = 0) -> dict[str, Any]:
    """``{case: expected tree}`` for the cases that have ``step``."""
    return {name: case.expected(step) for name, case in CASES.items() if step in case.steps}


# --- cases added after 0.1.0 --------------------------------------------------------------------

#: Keys that naming scheme 2 (zarrckpt 0.2.0) spells as names valid on every disk and object
#: store, and the leaf path each gets, in order: Windows' forbidden characters, a leading
#: ".", a trailing "." or space, device names, siblings equal but for case (also after
#: Unicode case folding: "ß" folds to "ss"), a name over 255 bytes, tuple keys whose groups
#: collide by case. These paths are the format's promise: readers use the recorded names,
#: and plain Zarr readers open them.
PORTABLE_PATHS = [
    "names/a%3Cb%3Ec", "names/q%22uote", "names/pipe%7C", "names/what%3F", "names/star%2A",
    "names/colon%3Ax", "names/%2Ehidden", "names/end%2E", "names/end%20", "names/%43ON",
    "names/%6Eul.txt", "names/%63om1", "names/V", "names/v%~1", "names/Straße",
    "names/STRASSE%~1", "names/" + "x" * 200 + "%~0d4e2ca9e9cbced7a7a5380eb29e1a37",
    "names/ok", "tuple/A/b", "tuple/a%~1/B",
]  # fmt: skip
_PORTABLE_KEYS = [
    "a<b>c", 'q"uote', "pipe|", "what?", "star*", "colon:x", ".hidden", "end.", "end ",
    "CON", "nul.txt", "com1", "V", "v", "Straße", "STRASSE", "x" * 300, "ok",
]  # fmt: skip


def _portable(step: int) -> dict[str, Any]:
    return {
        "names": {k: np.arange(i + 1, dtype=np.int16) for i, k in enumerate(_PORTABLE_KEYS)},
        "tuple": {("A", "b"): np.ones(2, np.uint8), ("a", "B"): np.zeros(2, np.uint8)},
    }


#: Cases added after 0.1.0: the folder of each release from ``since`` on holds them.
LATER_CASES: dict[str, Case] = {
    "portable_names": Case(
        "naming scheme 2: Windows-forbidden characters, leading/trailing dots and spaces, "
        "device names, case-colliding siblings and tuple-key groups, a name over 255 bytes",
        _portable,
        _portable,
        since="0.2.0",
    ),
}


# --- writing -------------------------------------------------------------------------------------


def main() -> None:
    repo = HERE.parent.parent
    sys.path.insert(0, str(repo))  # this checkout's zarrckpt, not another installed copy
    import zarrckpt

    assert Path(zarrckpt.__file__).resolve().is_relative_to(repo), zarrckpt.__file__
    from zarrckpt import _dtypes  # only to check this file covers the release's dtypes

    supported = set(_dtypes.ml_dtypes_table().values())
    assert supported == set(ML_DTYPES), supported ^ set(ML_DTYPES)

    out = HERE / f"v{zarrckpt.__version__}"
    if out.exists():
        sys.exit(f"{out} exists: golden checkpoints are written once and never regenerated")
    out.mkdir()
    for name, case in {**CASES, **LATER_CASES}.items():
        root = str(out / name)
        for step in case.steps:
            tree = case.save(step)
            if case.module:
                zarrckpt.save_module(tree, root, step=step, verbose=False, **case.kwargs)
            else:
                zarrckpt.save_pytree(root, tree, step=step, verbose=False, **case.kwargs)
        print(f"{name}: {case.doc}")
    print(f"wrote {out} with {zarrckpt.__file__}")


if __name__ == "__main__":
    main()
