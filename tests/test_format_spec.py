"""docs/format.md is enough to read a checkpoint: a reader built from its rules alone.

The reader below uses ``json``, zarr-python and NumPy (plus the standard library, numcodecs
for zstd, ``ml_dtypes`` for the data types NumPy lacks, and ``xxhash`` to check the ``xxh3``
field); it imports nothing of zarrckpt's. It follows the specification: manifest -> a listed
step -> the step record (CRC-32C checked) -> the tree record -> each leaf's ``path`` ->
``zarr.open_array``, and decodes every chunk file by the chunk-encoding rules as well. Its
values are compared with ``zarrckpt.load_pytree``'s for every golden checkpoint (zarrckpt
0.1.0: format 1.0, naming scheme 1; 0.2.0: format 1.1, naming scheme 2) and for a fresh root. The naming rules are checked
too: names computed by the specification's escaping and uniqueness rules must be the names
zarrckpt recorded.

zarrckpt itself is imported only to write the fresh root and for ``load_pytree`` (its import
registers the ml_dtypes types with zarr-python, as the specification says).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import shutil
import sys
import unicodedata
from collections import OrderedDict
from pathlib import Path
from typing import Any

import ml_dtypes
import numcodecs
import numpy as np
import pytest
import xxhash
import zarr

import zarrckpt

GOLDEN = Path(__file__).resolve().parent / "golden"
if str(GOLDEN) not in sys.path:
    sys.path.insert(0, str(GOLDEN))  # golden_types: the namedtuple classes the golden data names

import golden_types  # noqa: E402  (so that load_pytree rebuilds its namedtuples)

assert sys.byteorder == "little"  # chunks are little-endian: decoded here as native arrays

# --- CRC-32C, as specified (Castagnoli, reflected 0x82F63B78) -----------------------------------


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def test_check_values_of_the_specification() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert xxhash.xxh3_128_hexdigest(b"") == "99aa06d3014798d86001c324468d497f"


# --- a reader that knows only the specification ------------------------------------------------

#: Zarr v3 data type names (docs/format.md, "Data types")
_NUMPY_NAMES = [
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
]  # fmt: skip
_ML_NAMES = [
    "bfloat16", "float8_e3m4", "float8_e4m3", "float8_e4m3fn", "float8_e4m3fnuz",
    "float8_e4m3b11fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn",
    "int2", "int4", "uint2", "uint4",
]  # fmt: skip
DTYPES = {name: np.dtype(name) for name in _NUMPY_NAMES} | {
    name: np.dtype(getattr(ml_dtypes, name)) for name in _ML_NAMES if hasattr(ml_dtypes, name)
}
_PY = {"bool": bool, "int": int, "float": float, "complex": complex}


def read_json(path: Path) -> Any:
    return json.loads(path.read_bytes())


def read_manifest(root: Path) -> list[dict[str, Any]]:
    doc = read_json(root / "zarr.json")
    assert doc["zarr_format"] == 3 and doc["node_type"] == "group"
    meta = doc["attributes"]["zarrckpt"]
    assert meta["format"] == "zarrckpt"
    assert meta["version"] == 1  # the newest major version this reader knows
    assert meta.get("minor", 0) >= 0
    return sorted(meta["steps"], key=lambda entry: entry["step"])


def read_step_record(root: Path, entry: dict[str, Any]) -> dict[str, Any]:
    data = (root / entry["dir"] / "zarr.json").read_bytes()
    if "record_crc32c" in entry:
        assert crc32c(data) == entry["record_crc32c"]
    doc = json.loads(data)
    assert doc["zarr_format"] == 3 and doc["node_type"] == "group"
    meta = doc["attributes"]["zarrckpt"]
    assert meta.get("version", 1) == 1
    assert meta.get("step", entry["step"]) == entry["step"]
    return meta


def decode_chunks(leaf_dir: Path, leaf: dict[str, Any]) -> np.ndarray:
    """The leaf's array from its chunk files, by the chunk-encoding rules alone."""
    shape, chunks, dtype = tuple(leaf["shape"]), tuple(leaf["chunks"]), DTYPES[leaf["dtype"]]
    out = np.zeros(shape, dtype)
    if math.prod(shape) == 0:
        assert not [p for p in leaf_dir.iterdir() if p.name.startswith("c")]  # no chunk at all
        assert leaf.get("xxh3", []) == []
        return out
    grid = [math.ceil(s / c) for s, c in zip(shape, chunks, strict=True)]
    hashes = []
    for index in np.ndindex(*grid) if shape else [()]:  # C order: the last index fastest
        data = (leaf_dir / ".".join(["c", *map(str, index)])).read_bytes()
        payload, stored = data[:-4], int.from_bytes(data[-4:], "little")
        assert crc32c(payload) == stored
        name = leaf["codec"].partition(":")[0]
        if name == "zstd":
            raw = bytes(numcodecs.Zstd().decode(payload))
        elif name == "gzip":
            raw = gzip.decompress(payload)
        else:
            raw = payload
        assert len(raw) == math.prod(chunks) * dtype.itemsize  # always the full chunk shape
        hashes.append(xxhash.xxh3_128_hexdigest(raw))
        block = np.frombuffer(raw, dtype).reshape(chunks)  # little-endian, as this host
        region = tuple(
            slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, chunks, shape, strict=True)
        )
        valid = block[tuple(slice(0, r.stop - r.start) for r in region)]
        out[region] = valid
        padding = np.ones(block.shape, bool)
        padding[tuple(slice(0, r.stop - r.start) for r in region)] = False
        raw_bytes = np.frombuffer(raw, np.uint8).reshape(*chunks, dtype.itemsize)
        assert not raw_bytes[padding].any()  # edge chunks padded with zero bytes
    if "xxh3" in leaf:
        assert leaf["xxh3"] == hashes
    return out


def read_leaf(step_dir: Path, leaf: dict[str, Any]) -> Any:
    path = leaf["path"]
    assert path and not path.startswith("/") and ".." not in path.split("/")
    leaf_dir = step_dir.joinpath(*path.split("/"))
    array = zarr.open_array(leaf_dir, mode="r")[...]
    array = np.asarray(array)
    manual = decode_chunks(leaf_dir, leaf)
    assert array.dtype == DTYPES[leaf["dtype"]] and array.shape == tuple(leaf["shape"])
    assert array.tobytes() == manual.tobytes()
    kind = leaf.get("kind", "ndarray")
    if kind in ("ndarray", "jax", "brainpy", "state"):
        return array
    if kind == "npscalar":
        return array[()]
    if kind == "py":
        return _PY[leaf["pytype"]](array.item())
    if kind == "str":
        return array.tobytes().decode("utf-8")
    if kind == "bytes":
        return array.tobytes()
    if kind == "quantity":
        return ("quantity", array, leaf["unit"])
    if kind == "prngkey":
        return ("prngkey", leaf["impl"], array)
    raise AssertionError(f"unknown leaf kind {kind!r}: refused, as the specification says")


def read_tree(step_dir: Path, node: dict[str, Any]) -> Any:
    kind = node["type"]
    if kind == "leaf":
        return read_leaf(step_dir, node)
    if kind in ("none", "from_target"):  # from_target: not stored; a target would supply it
        return None
    values = [read_tree(step_dir, child) for child in node["children"]]
    if kind == "state":
        assert len(values) == 1
        return values[0]
    if kind in ("dict", "odict"):
        keys = [tuple(k) if isinstance(k, list) else k for k in node["keys"]]
        assert len(keys) == len(node["names"]) == len(values)
        return dict(zip(keys, values, strict=True))
    if kind == "list":
        return values
    if kind == "tuple":
        return tuple(values)
    if kind == "namedtuple":
        return dict(zip(node["fields"], values, strict=True))
    if kind == "pytree":
        return dict(zip([key[1] for key in node["keys"]], values, strict=True))
    raise AssertionError(f"unknown node type {kind!r}")


def read_checkpoint(root: Path, step: int | None = None) -> Any:
    entries = read_manifest(root)
    entry = entries[-1] if step is None else next(e for e in entries if e["step"] == step)
    meta = read_step_record(root, entry)
    return read_tree(root / entry["dir"], meta["tree"])


# --- comparison with zarrckpt -------------------------------------------------------------------


def canonical(value: Any) -> Any:
    """What ``load_pytree`` returned, in the reader's terms: namedtuples as dicts of their
    fields, dict subclasses as dicts, Quantities and typed PRNG keys as tagged tuples."""
    if isinstance(value, tuple) and hasattr(type(value), "_fields"):
        return {f: canonical(v) for f, v in zip(value._fields, value, strict=True)}
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    if isinstance(value, tuple):
        return tuple(canonical(v) for v in value)
    quantity = getattr(sys.modules.get("brainunit"), "Quantity", None)
    if quantity is not None and isinstance(value, quantity):
        unit = value.unit
        return ("quantity", np.asarray(value.mantissa), unit)
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(value, jax.Array):
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(value)
            name = impl if isinstance(impl, str) else str(getattr(impl, "name", impl))
            return ("prngkey", name, np.asarray(jax.random.key_data(value)))
        return np.asarray(value)
    return value


def same(mine: Any, theirs: Any, where: str = "") -> None:
    """The spec reader's value equals zarrckpt's: types, keys in order, shapes, bits."""
    if isinstance(mine, tuple) and mine and mine[0] == "quantity":
        _, mantissa, unit_record = mine
        assert theirs[0] == "quantity", where
        same(mantissa, theirs[1], where)
        unit = theirs[2]
        assert unit.scale == unit_record["scale"], where
        assert unit.base == unit_record["base"] and unit.factor == unit_record["factor"], where
        assert [float(d) for d in np.asarray(unit.dim._dims).ravel()] == unit_record["dim"], where
        assert unit.name == unit_record.get("name"), where
        return
    if isinstance(mine, tuple) and mine and mine[0] == "prngkey":
        assert theirs[:2] == mine[:2], where
        same(mine[2], theirs[2], where)
        return
    assert type(mine) is type(theirs), f"{where}: {type(mine)} != {type(theirs)}"
    if isinstance(mine, dict):
        assert list(mine) == list(theirs), where
        for key in mine:
            same(mine[key], theirs[key], f"{where}/{key!r}")
    elif isinstance(mine, (list, tuple)):
        assert len(mine) == len(theirs), where
        for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            same(a, b, f"{where}/{i}")
    elif isinstance(mine, (np.ndarray, np.generic)):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, where
        assert np.asarray(mine).tobytes() == np.asarray(theirs).tobytes(), where
    elif isinstance(mine, (float, complex)):
        assert repr(np.asarray(mine).tobytes()) == repr(np.asarray(theirs).tobytes()), where
    else:
        assert mine == theirs, where


# --- golden checkpoints of every release ---------------------------------------------------------

#: (release folder, case) of every golden checkpoint
GOLDEN_ROOTS = sorted(
    (v.name, p.name) for v in GOLDEN.glob("v*") if v.is_dir() for p in v.iterdir() if p.is_dir()
)
#: what each release wrote: (format 1.1's record_crc32c in manifest entries, naming scheme,
#: whether its leaf records hold chunk hashes: ``xxh3``, written by incremental saves)
FORMATS = {"v0.1.0": (False, None, False), "v0.2.0": (True, 2, True)}


@pytest.fixture(scope="module")
def golden_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("spec") / "golden"
    for version in {v for v, _ in GOLDEN_ROOTS}:  # nothing may ever be written into tests/golden
        shutil.copytree(GOLDEN / version, copy / version)
    return copy


@pytest.mark.parametrize(("version", "case"), GOLDEN_ROOTS)
def test_golden_checkpoint_read_by_the_specification(
    golden_copy: Path, version: str, case: str
) -> None:
    pytest.importorskip("brainunit")
    root = golden_copy / version / case
    entries = read_manifest(root)
    assert entries
    crc, naming, hashes = FORMATS[version]  # (a new release folder must say what it wrote)
    for entry in entries:
        assert ("record_crc32c" in entry) is crc
        record = read_step_record(root, entry)
        assert record.get("naming") == naming
        if case != "root_none":  # (no leaf)
            assert ('"xxh3"' in json.dumps(record)) is hashes
        mine = read_checkpoint(root, entry["step"])
        theirs = canonical(zarrckpt.load_pytree(root, step=entry["step"]))
        same(mine, theirs, f"{version}/{case}@{entry['step']}")


# --- a fresh 0.2.0 checkpoint -------------------------------------------------------------------

LONG = "x" * 300


def fresh_tree() -> dict[Any, Any]:
    u = pytest.importorskip("brainunit")
    return {
        "net": {
            "l1": {"W": np.arange(12, dtype=np.float32).reshape(3, 4), "V": np.zeros(3)},
            "spikes": np.array([True, False, True, True, False]),
            "counts": (np.arange(7, dtype=np.int32) - 3),
        },
        "layers": [{"w": np.eye(2, dtype=np.float64)}, {"w": np.ones((2, 2), np.float16)}],
        "V": u.Quantity(np.array([-65.0, -70.0]), unit=u.mV),
        "name": "snn-ü",
        "blob": b"\x00\x01",
        "bf16": np.arange(5, dtype=np.float32).astype(ml_dtypes.bfloat16),
        "empty": np.zeros((0, 3), np.float32),
        "epoch": 7,
        "lr": 0.5,
        "flag": True,
        "np_scalar": np.int16(-2),
        "nothing": None,
        "pair": (1, "two"),
        # naming scheme 2: escapes, reserved names, collisions, long names, tuple keys
        "": 1,
        ".": 2,
        "..": 3,
        ".hidden": 4,
        "a/b": 5,
        "100%": 6,
        "__x": 7,
        "a.": 8,
        "x ": 9,
        "CON": 10,
        "nul.txt": 11,
        "Zarr.JSON": 12,
        'q<>:"|?*': 13,
        "ctl\x01\n": 14,
        3: 15,
        "3": 16,
        "v": 17,
        "V%~1": 18,
        LONG: 19,
        ("grp", 0, "w"): np.arange(3, dtype=np.uint8),
        ("grp", "0", "w"): np.arange(4, dtype=np.uint8),
        ("grp", 0, "b"): np.arange(2, dtype=np.int64),
    }


def test_fresh_checkpoint_read_by_the_specification(tmp_path: Path) -> None:
    root = tmp_path / "run"
    tree = fresh_tree()
    zarrckpt.save_pytree(root, tree, verbose=False, chunk_bytes=16)  # many chunks, edge chunks
    zarrckpt.save_pytree(root, tree, verbose=False, codec="gzip:6", keep=None)
    zarrckpt.save_pytree(root, tree, verbose=False, codec="none", keep=None)
    entries = read_manifest(root)
    assert [e["step"] for e in entries] == [0, 1, 2]
    assert read_json(root / "zarr.json")["attributes"]["zarrckpt"]["minor"] == 1
    for entry in entries:
        assert isinstance(entry["record_crc32c"], int)
        meta = read_step_record(root, entry)
        assert meta["naming"] == 2
        mine = read_checkpoint(root, entry["step"])
        theirs = canonical(zarrckpt.load_pytree(root, step=entry["step"]))
        same(mine, theirs, f"step {entry['step']}")
    assert read_checkpoint(root)["name"] == "snn-ü"  # the latest: the largest step listed


def test_readers_ignore_every_name_the_manifest_does_not_list(tmp_path: Path) -> None:
    root = tmp_path / "run"
    zarrckpt.save_pytree(root, {"a": np.arange(3)}, verbose=False)
    listed = read_manifest(root)[-1]["dir"]
    for debris in (".trash-x.1234", ".spare-" + listed, "step_0000000009.0123456789ab01234567"):
        (root / debris).mkdir()
    assert np.array_equal(read_checkpoint(root)["a"], np.arange(3))
    assert np.array_equal(zarrckpt.load_pytree(root)["a"], np.arange(3))


# --- naming scheme 2, computed from the specification -------------------------------------------

_ESCAPED = set('%/\\<>:"|?*') | {chr(c) for c in range(0x20)} | {"\x7f"}
_DEVICES = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)}


def spec_escape(key: str) -> str:
    if key == "":
        return "%"
    name = "".join(f"%{ord(c):02X}" if c in _ESCAPED else c for c in key)
    if name.startswith("."):
        name = "%2E" + name[1:]
    elif name.startswith("__"):
        name = "%5F" + name[1:]
    if name[-1] in ". ":
        name = name[:-1] + f"%{ord(name[-1]):02X}"
    folded = name.casefold()
    if (folded == "zarr.json" or folded.split(".", 1)[0].rstrip(" ") in _DEVICES) and name[
        0
    ].isascii():
        name = f"%{ord(name[0]):02X}" + name[1:]
    return name


def spec_shorten(name: str) -> str:
    try:
        if len(name.encode("utf-8")) <= 255:
            return name
    except UnicodeEncodeError:
        pass
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    prefix = name.encode("utf-8", "ignore")[:200].decode("utf-8", "ignore")
    if prefix.endswith("%"):
        prefix = prefix[:-1]
    elif len(prefix) >= 2 and prefix[-2] == "%" and prefix[-1] in "0123456789ABCDEF":
        prefix = prefix[:-2]
    return f"{prefix}%~{digest}"


def spec_fold(name: str) -> str:
    if name.isascii():
        return name.lower()
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


def spec_sibling_names(parts: list[str | int]) -> list[str]:
    strings = {spec_escape(p) for p in parts if isinstance(p, str)}
    base = [
        spec_escape(p) if isinstance(p, str) else f"%i{p}" if str(p) in strings else str(p)
        for p in parts
    ]
    used: set[str] = set()
    names = []
    for b in base:
        name, n = spec_shorten(b), 0
        while spec_fold(name) in used:
            n += 1
            name = spec_shorten(f"{b}%~{n}")
        used.add(spec_fold(name))
        names.append(name)
    return names


def spec_dict_names(keys: list[Any]) -> list[Any]:
    """A dict's recorded ``names``: one name per key, a list of names per tuple key (the trie)."""
    root: tuple[list[tuple[Any, Any]], dict[Any, Any]] = ([], {})
    for index, key in enumerate(keys):
        parts = key if isinstance(key, tuple) else (key,)
        node = root
        for part in parts[:-1]:
            child = node[1].get((type(part), part))
            if child is None:
                child = node[1][(type(part), part)] = ([], {})
                node[0].append((part, child))
            node = child
        node[0].append((parts[-1], index))
    paths: list[list[str]] = [[] for _ in keys]

    def name(node: Any, prefix: list[str]) -> None:
        for (_, target), n in zip(
            node[0], spec_sibling_names([p for p, _ in node[0]]), strict=True
        ):
            if isinstance(target, int):
                paths[target] = [*prefix, n]
            else:
                name(target, [*prefix, n])

    name(root, [])
    return [p if isinstance(k, tuple) else p[0] for k, p in zip(keys, paths, strict=True)]


def test_spec_escape_examples() -> None:
    examples = {
        "a/b": "a%2Fb", "100%": "100%25", "..": "%2E%2E", ".hid": "%2Ehid", "__x": "%5F_x",
        "a.": "a%2E", "x y ": "x y%20", "ü": "ü", "": "%", "CON": "%43ON",
        "nul.txt": "%6Eul.txt", "Zarr.JSON": "%5Aarr.JSON",
    }  # fmt: skip
    assert {k: spec_escape(k) for k in examples} == examples
    assert spec_sibling_names(["V", "v"]) == ["V", "v%~1"]
    assert spec_sibling_names([3, "3"]) == ["%i3", "3"]


def test_recorded_names_follow_naming_scheme_2(tmp_path: Path) -> None:
    root = tmp_path / "run"
    tree = fresh_tree()
    zarrckpt.save_pytree(root, tree, verbose=False)
    entry = read_manifest(root)[-1]
    record = read_step_record(root, entry)["tree"]
    keys = [tuple(k) if isinstance(k, list) else k for k in record["keys"]]
    assert keys == list(tree)
    assert record["names"] == spec_dict_names(keys)
    by_key = dict(zip(keys, record["names"], strict=True))
    assert by_key[LONG].startswith("x" * 200 + "%~") and len(by_key[LONG]) == 234
    assert by_key["v"] == "v%~1" and by_key["V%~1"] == "V%25~1"
    assert by_key[("grp", 0, "w")] == ["grp", "%i0", "w"]  # 0 and "0" are two groups
    assert by_key[("grp", "0", "w")] == ["grp", "0", "w"]
    for node in record["children"]:
        if node["type"] == "leaf":
            name = by_key[keys[record["children"].index(node)]]
            assert node["path"] == (name if isinstance(name, str) else "/".join(name))
    # every container but none/state has a group document at its path
    step_dir = root / entry["dir"]
    for group in ("net", "net/l1", "layers", "layers/0", "pair", "grp", "grp/%i0", "grp/0"):
        doc = read_json(step_dir.joinpath(*group.split("/")) / "zarr.json")
        assert doc == {"zarr_format": 3, "node_type": "group", "attributes": {}}


def test_leaf_zarr_json_is_the_documented_function_of_the_record(tmp_path: Path) -> None:
    root = tmp_path / "run"
    zarrckpt.save_pytree(
        root,
        {"W": np.zeros((3, 4), np.float32), "s": np.zeros(65, bool), "c": np.complex64(1j)},
        verbose=False,
        chunk_bytes=16,
        dims={"W": ("pre", "post")},
    )
    entry = read_manifest(root)[-1]
    tree = read_step_record(root, entry)["tree"]
    leaves = dict(zip(tree["keys"], tree["children"], strict=True))
    step_dir = root / entry["dir"]
    assert read_json(step_dir / "W" / "zarr.json") == {
        "zarr_format": 3, "node_type": "array", "shape": [3, 4], "data_type": "float32",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": leaves["W"]["chunks"]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
        "fill_value": 0.0,
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
        "attributes": {}, "dimension_names": ["pre", "post"],
    }  # fmt: skip
    assert leaves["W"]["dims"] == ["pre", "post"]
    spikes = read_json(step_dir / "s" / "zarr.json")
    assert spikes["fill_value"] is False and spikes["dimension_names"] == ["s_0"]
    assert spikes["codecs"] == [
        {"name": "bytes"},
        {"name": "zstd", "configuration": {"level": 1, "checksum": False}},
        {"name": "crc32c"},
    ]
    scalar = read_json(step_dir / "c" / "zarr.json")
    assert scalar["fill_value"] == [0.0, 0.0] and scalar["dimension_names"] == []
    assert (step_dir / "c" / "c").is_file()  # a 0-d array's one chunk


def test_odict_and_namedtuple_records(tmp_path: Path) -> None:
    root = tmp_path / "run"
    tree = {"od": OrderedDict(b=1, a=2), "pt": golden_types.Point(x=1.5, y=np.arange(2))}
    zarrckpt.save_pytree(root, tree, verbose=False)
    record = read_step_record(root, read_manifest(root)[-1])["tree"]
    od, pt = record["children"]
    assert od["type"] == "odict" and od["keys"] == ["b", "a"]
    assert pt["type"] == "namedtuple" and pt["class"] == "golden_types:Point"
    assert pt["fields"] == pt["names"] == ["x", "y"]
    same(read_checkpoint(root), canonical(zarrckpt.load_pytree(root)))


def test_pytree_state_key_and_from_target_nodes(tmp_path: Path) -> None:
    jax = pytest.importorskip("jax")
    brainstate = pytest.importorskip("brainstate")

    @jax.tree_util.register_pytree_with_keys_class
    class Layer:
        def __init__(self, w: Any, act: Any) -> None:
            self.w, self.act = w, act

        def tree_flatten_with_keys(self) -> Any:
            keys = jax.tree_util.GetAttrKey
            return [(keys("w"), self.w), (keys("act"), self.act)], None

        @classmethod
        def tree_unflatten(cls, aux: Any, children: Any) -> Layer:
            return cls(*children)

    tree = {
        "layer": Layer(np.arange(6.0).reshape(2, 3), jax.nn.relu),
        "param": brainstate.ParamState(
            {"weight": np.ones((2, 2), np.float32), "bias": np.zeros(2)}
        ),
        "key": jax.random.key(3),
    }
    root = tmp_path / "run"
    zarrckpt.save_pytree(root, tree, verbose=False)
    entry = read_manifest(root)[-1]
    record = read_step_record(root, entry)["tree"]
    layer, param, key = record["children"]
    assert layer["type"] == "pytree" and layer["keys"] == [["attr", "w"], ["attr", "act"]]
    assert layer["children"][1] == {"type": "from_target", "pytype": layer["children"][1]["pytype"]}
    assert param["type"] == "state" and param["children"][0]["type"] == "dict"
    assert key["kind"] == "prngkey" and key["impl"] == "threefry2x32" and key["shape"] == [2]
    assert entry["leaves"] == 4  # w, weight, bias, key: the from_target node is not stored
    mine = read_checkpoint(root)
    assert mine["layer"]["act"] is None
    same(mine, canonical(zarrckpt.load_pytree(root)))
