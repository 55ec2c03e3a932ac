"""The ``zarrckpt`` command line (``zarrckpt.cli``), in process and as ``python -m zarrckpt``."""

import errno
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import fsspec
import ml_dtypes
import numpy as np
import pytest
import s3fs
from helpers import assert_same

import zarrckpt
from zarrckpt import cli
from zarrckpt._commit import collect_garbage
from zarrckpt._format import ArrayLayout
from zarrckpt._storage import open_storage
from zarrckpt._sync import run

ROOT = Path(__file__).resolve().parent.parent


def _state(step: int) -> dict:
    rng = np.random.default_rng(step)
    state = {
        "net": {
            "l1": {"W": rng.normal(size=(64, 32)).astype(np.float32)},
            "l2": {"V": np.full(32, float(step), np.float32), "spike": rng.random(32) < 0.2},
        },
        "epoch_i": step,
        "name": "run-a",
        "lr": 1e-3,
    }
    if step == 2:
        state["net"]["l3"] = {"W": np.zeros((4, 3))}
        del state["lr"]
    return state


@pytest.fixture
def root(tmp_path):
    """A local checkpoint with steps 0, 1, 2 (step 2 adds net/l3/W and drops lr)."""
    path = str(tmp_path / "run")
    for step in range(3):
        zarrckpt.save_pytree(path, _state(step), step=step, keep=None, verbose=False)
    return path


def zc(capsys, *argv):
    """Run the CLI in process: (exit status, stdout, stderr)."""
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def zc_json(capsys, *argv):
    status, out, _ = zc(capsys, *argv, "--json")
    return status, json.loads(out)


def _step_dir(path: str, step: int) -> Path:
    return next(Path(path).glob(f"step_{step:010d}.*"))


# --- ls / tree / info / cat ---------------------------------------------------------------------


def test_ls(root, capsys):
    status, out, _ = zc(capsys, "ls", root)
    lines = out.splitlines()
    assert status == 0 and lines[0].split() == ["step", "time", "(UTC)", "leaves", "size"]
    assert [line.split()[0] for line in lines[1:]] == ["0", "1", "2"]
    assert lines[3].split()[2:] == ["6", "8.3", "KiB"]
    status, doc = zc_json(capsys, "ls", root)
    assert [s["step"] for s in doc["steps"]] == [0, 1, 2]
    assert doc["steps"][2]["leaves"] == 6 and doc["steps"][2]["nbytes"] == 8461
    assert doc["steps"][0]["time"].endswith("Z") and doc["steps"][0]["dir"].startswith("step_")


def test_tree(root, capsys):
    status, out, _ = zc(capsys, "tree", root)
    assert status == 0
    assert out.splitlines()[0].endswith("(step 2): 6 leaves, 8.3 KiB")
    assert "  l1/" in out and "    W" in out and "64×32 float32" in out and "none" in out
    # a str is shown as the string it is, not as the uint8 array it is stored in (issue 19)
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert lines["name"].split(None, 1)[1] == "'run-a'  [str]" and "uint8" not in lines["name"]
    assert lines["epoch_i"].split(None, 1)[1] == "2  [int]"
    status, out, _ = zc(capsys, "tree", root, "net.l1", "--step", "0")  # dotted paths too
    assert "(step 0): 1 leaf, 8.0 KiB" in out and "W" in out and "l2" not in out
    status, doc = zc_json(capsys, "tree", root, "net")
    assert doc["tree"] == {
        "l1": {"W": "net/l1/W"},
        "l2": {"V": "net/l2/V", "spike": "net/l2/spike"},
        "l3": {"W": "net/l3/W"},
    }
    leaf = doc["leaves"][0]
    assert leaf == {
        "path": "net/l1/W", "shape": [64, 32], "dtype": "float32", "nbytes": 8192,
        "chunks": [64, 32], "codec": "none", "kind": "ndarray",
    }  # fmt: skip
    status, doc = zc_json(capsys, "tree", root, "net/l2/V")
    assert doc["tree"] == "net/l2/V" and len(doc["leaves"]) == 1
    _, doc = zc_json(capsys, "tree", root)
    values = {leaf["path"]: leaf.get("value") for leaf in doc["leaves"]}
    assert values["name"] == "run-a" and values["epoch_i"] == 2 and values["net/l1/W"] is None


def test_tree_and_info_show_values_and_units(tmp_path, capsys):
    import brainunit as u

    path = str(tmp_path / "kinds")
    tree = {
        "v": u.Quantity(np.array([1.0, 2.0]), unit=u.mV), "i": u.Quantity(3.0, unit=u.nA),
        "note": "a \"quoted\" note é", "long": "x" * 5000, "bytes": b"\x00\xff", "ok": True,
        "z": 3 - 4j,
    }  # fmt: skip
    zarrckpt.save_pytree(path, tree, verbose=False)
    status, out, _ = zc(capsys, "tree", path)
    lines = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines()[1:]}
    assert lines["v"].endswith("[quantity mV]") and lines["i"].endswith("[quantity nA]")
    assert lines["note"] == repr(tree["note"]) + "  [str]"
    assert lines["long"] == "(4.9 KiB of text)  [str]"
    assert lines["bytes"] == "b'\\x00\\xff'  [bytes]"
    assert lines["ok"] == "True  [bool]" and lines["z"] == "(3-4j)  [complex]"
    status, out, _ = zc(capsys, "info", path, "v")
    assert status == 0 and "unit:      mV" in out
    status, doc = zc_json(capsys, "info", path, "v")
    assert doc["unit"] == "mV" and doc["kind"] == "quantity"
    status, out, _ = zc(capsys, "info", path, "note")
    assert f"value:     {tree['note']!r}" in out and "kind:      str" in out
    assert "shape:" not in out and "uint8" not in out  # the storage is in --json
    status, doc = zc_json(capsys, "info", path, "note")
    assert doc["value"] == tree["note"] and doc["dtype"] == "uint8"
    _, doc = zc_json(capsys, "info", path, "bytes")
    assert doc["value"] == {"base64": "AP8="}
    _, doc = zc_json(capsys, "info", path, "z")
    assert doc["value"] == [3.0, -4.0]


def test_unit_text():
    nameless = {"dim": [1, 0, -1, 0, 0, 0, 0], "scale": -3, "base": 10.0, "factor": 1.0,
                "name": None, "dispname": None}  # fmt: skip
    assert cli._unit_text(nameless) == "10^-3 m s^-1"
    assert cli._unit_text({**nameless, "dim": [0] * 7, "scale": 0}) == "1"
    assert cli._unit_text({**nameless, "dispname": "mV"}) == "mV"
    assert cli._unit_text(None) == "?"


def test_info(root, capsys):
    status, doc = zc_json(capsys, "info", root)
    assert status == 0 and doc["steps"] == [0, 1, 2] and doc["step"] == 2
    assert doc["leaves"] == 6 and doc["nbytes"] == 8461 and doc["nchunks"] == 6
    assert doc["dtypes"]["float32"] == 2 and doc["codecs"] == {"none": 6}  # all ≤ 64 B or float
    status, doc = zc_json(capsys, "info", root, "net/l1/W", "--stats", "--step", "1")
    W = _state(1)["net"]["l1"]["W"]
    assert doc["shape"] == [64, 32] and doc["nchunks"] == 1 and doc["step"] == 1
    assert doc["stats"]["max"] == pytest.approx(float(W.max()))
    assert doc["stats"]["mean"] == pytest.approx(float(W.mean()), rel=1e-5)
    status, out, _ = zc(capsys, "info", root, "net")
    assert "leaves:    4" in out and "nbytes:" in out
    status, out, err = zc(capsys, "info", root, "net", "--stats")
    assert status == 2 and "--stats takes a leaf" in err


def test_cat(root, capsys):
    W = _state(2)["net"]["l1"]["W"]
    status, out, _ = zc(capsys, "cat", root, "net/l1/W", "--slice", "0:2,::8")
    assert status == 0 and out == f"{W[0:2, ::8]}\n"
    status, got = zc_json(capsys, "cat", root, "net/l1/W", "--slice", "[1, -3:]")
    assert got == W[1, -3:].tolist()
    status, out, _ = zc(capsys, "cat", root, "name")
    assert out == "run-a\n"
    status, got = zc_json(capsys, "cat", root, "epoch_i")
    assert got == 2
    status, out, _ = zc(capsys, "cat", root, "net/l1/W")
    assert "..." in out  # numpy's summary of a big array
    status, out, _ = zc(capsys, "cat", root, "net/l1/W", "--full")
    assert "..." not in out and len(out.split()) > 64 * 32


def test_cat_json_of_every_kind(tmp_path, capsys):
    import brainunit as u

    path = str(tmp_path / "kinds")
    tree = {
        "bf16": np.array([1.5, -2.0], ml_dtypes.bfloat16),
        "c": np.array([1 + 2j, -1j], np.complex64),
        "nan": np.array([np.nan, np.inf, -np.inf, 1.0]),
        "bytes": b"\x00\xff",
        "z": 3 - 4j,
        "q": u.Quantity(np.array([1.0, 2.0]), unit=u.mV),
        "b": np.array([True, False]),
        "i4": np.array([1, -2], ml_dtypes.int4),
    }
    zarrckpt.save_pytree(path, tree, verbose=False)
    expected = {
        "bf16": [1.5, -2.0], "c": [[1.0, 2.0], [0.0, -1.0]], "nan": ["nan", "inf", "-inf", 1.0],
        "bytes": {"base64": "AP8="}, "z": [3.0, -4.0], "q": {"mantissa": [1.0, 2.0], "unit": "mV"},
        "b": [True, False], "i4": [1, -2],
    }  # fmt: skip
    for key, value in expected.items():
        status, got = zc_json(capsys, "cat", path, key)
        assert (status, got) == (0, value), key


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ls", "{tmp}/nothing"], "no checkpoint at {tmp}/nothing"),
        (
            ["tree", "{root}", "--step", "7"],
            "step 7 is not committed at {root}; committed steps: [0, 1, 2]",
        ),
        (["cat", "{root}", "net/l9"], "'net/l9' is not in this checkpoint; did you mean"),
        (["cat", "{root}", "net"], "'net' is a sub-tree of 4 leaves; cat shows one leaf"),
        (["cat", "{root}", "net/l1/W", "--slice", "1:x"], "bad --slice '1:x'"),
        (["cat", "{root}", "net/l1/W", "--slice", "99"], "index 99 is out of bounds"),
        (["cat", "{root}", "epoch_i", "--slice", "0"], "too many indices"),
        (["info", "{root}/step_x"], "no checkpoint at"),
        (["diff", "{root}@9", "{root}"], "step 9 is not committed"),
        (["ls", "{root}/zarr.json"], "is a file, not a zarrckpt checkpoint"),
    ],
)
def test_errors_are_one_line_and_exit_2(root, tmp_path, capsys, argv, message):
    fill = {"tmp": str(tmp_path), "root": root}
    status, out, err = zc(capsys, *(a.format(**fill) for a in argv))
    assert status == 2 and out == ""
    assert err.startswith("zarrckpt: error: ") and err.count("\n") == 1
    assert message.format(**fill) in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["ls"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        cli.main(["verify", "x", "--step", "1", "--all"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        cli.main(["ls", "x", "-o", "novalue"])
    assert info.value.code == 2 and "expected KEY=VALUE" in capsys.readouterr().err


# --- verify -------------------------------------------------------------------------------------


def test_verify_intact(root, capsys):
    status, out, _ = zc(capsys, "verify", root)
    assert status == 0 and out.splitlines() == [
        "step 2: 6 leaves, 8.3 KiB, 6 chunks: ok",
        "ok: 1 of 1 steps intact",
    ]
    status, doc = zc_json(capsys, "verify", root, "--all")
    assert status == 0 and doc["ok"] and [s["step"] for s in doc["steps"]] == [0, 1, 2]
    status, doc = zc_json(capsys, "verify", root, "--step", "1")
    assert [s["step"] for s in doc["steps"]] == [1]


def _damage(step_dir: Path) -> None:
    """Three kinds of damage in three leaves of one step."""
    chunk = step_dir / "net/l1/W/c.0.0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0x01  # one flipped bit
    chunk.write_bytes(data)
    (step_dir / "net/l2/V/c.0").unlink()  # a missing chunk
    meta = step_dir / "net/l2/spike/zarr.json"
    meta.write_text(meta.read_text().replace('"shape":[32]', '"shape":[33]'))


def test_verify_names_every_damaged_leaf(root, capsys):
    step_dir = _step_dir(root, 1)
    meta = (step_dir / "net/l2/spike/zarr.json").read_text()
    # Incremental saves hard-link a leaf's zarr.json from the previous step when its layout
    # did not change (net/l2/spike's): edited in place, it is damage in every step sharing
    # it, and verify names it in each.
    shared = {
        step: os.path.samefile(_step_dir(root, step) / "net/l2/spike/zarr.json",
                               step_dir / "net/l2/spike/zarr.json")
        for step in (0, 2)
    }  # fmt: skip
    assert shared == {0: True, 2: True}
    _damage(step_dir)
    assert (step_dir / "net/l2/spike/zarr.json").read_text() != meta
    status, out, _ = zc(capsys, "verify", root, "--all")
    assert status == 1
    lines = out.splitlines()
    assert lines[0] == "step 0: 6 leaves, 8.2 KiB, 6 chunks: DAMAGED (1 of 6 leaves)"
    assert lines[1].startswith("  net/l2/spike: ") and "zarr.json says shape (33,)" in lines[1]
    lines = lines[2:]
    assert lines[0] == "step 1: 6 leaves, 8.2 KiB, 6 chunks: DAMAGED (3 of 6 leaves)"
    assert (
        lines[1].startswith("  net/l1/W: leaf 'net/l1/W'")
        and "crc32c checksum mismatch" in lines[1]
    )
    assert lines[2].startswith("  net/l2/V: ") and "c.0 is missing" in lines[2]
    assert lines[3].startswith("  net/l2/spike: ") and "zarr.json says shape (33,)" in lines[3]
    assert lines[4] == "step 2: 6 leaves, 8.3 KiB, 6 chunks: DAMAGED (1 of 6 leaves)"
    assert lines[5].startswith("  net/l2/spike: ")  # kept going
    assert lines[6] == "DAMAGED: 0 of 3 steps intact"
    status, doc = zc_json(capsys, "verify", root, "--step", "1")
    assert status == 1 and not doc["ok"]
    assert [d["path"] for d in doc["steps"][0]["damaged"]] == [
        "net/l1/W",
        "net/l2/V",
        "net/l2/spike",
    ]


def test_verify_reads_big_leaves_in_slabs(tmp_path, capsys, monkeypatch):
    """Memory stays bounded: a leaf bigger than the batch is read in slabs of chunks, and a
    damaged chunk in one slab still lets the other leaves (and slabs) be read."""
    path = str(tmp_path / "big")
    big = np.arange(64 * 100, dtype=np.float64).reshape(64, 100)  # 50 KiB, 8 rows per chunk
    zarrckpt.save_pytree(path, {"big": big, "small": np.ones(3), "other": big + 1},
                         chunk_bytes=8 * 800, verbose=False)  # fmt: skip
    monkeypatch.setattr(cli, "BATCH_BYTES", 20_000)  # 3 chunks per slab
    big_leaf = zarrckpt.open_checkpoint(path)["big"]
    layout = ArrayLayout(big_leaf.shape, big_leaf.dtype, big_leaf.chunks, big_leaf.codec)
    assert big_leaf.chunks == (8, 100)
    assert list(cli._plan({"big": layout}, 20_000)) == [
        [("big", ((0, 24), (0, 100)))],
        [("big", ((24, 48), (0, 100)))],
        [("big", ((48, 64), (0, 100)))],
    ]
    held = []
    real = cli._read_pieces

    def spy(opened, layouts, pieces, progress):
        out = real(opened, layouts, pieces, progress)
        held.append(sum(a.nbytes for a in out.values()))
        return out

    monkeypatch.setattr(cli, "_read_pieces", spy)
    assert zc(capsys, "verify", path)[0] == 0
    assert max(held) <= 20_000 and len(held) == 7  # 3 + 3 slabs, then "small" alone
    chunk = _step_dir(path, 0) / "big/c.4.0"  # in the second slab
    chunk.write_bytes(chunk.read_bytes()[:-1] + b"\x00")
    status, doc = zc_json(capsys, "verify", path)
    assert status == 1 and [d["path"] for d in doc["steps"][0]["damaged"]] == ["big"]
    assert "c.4.0" in doc["steps"][0]["damaged"][0]["error"]


def test_diff_compares_big_leaves_slab_by_slab(tmp_path, capsys, monkeypatch):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    big = np.arange(64 * 100, dtype=np.float64).reshape(64, 100)
    changed = big.copy()
    changed[30, 7] += 0.5  # in the second slab
    changed[63, 0] -= 2.0  # in the last
    zarrckpt.save_pytree(a, {"big": big}, chunk_bytes=8 * 800, verbose=False)
    zarrckpt.save_pytree(b, {"big": changed}, chunk_bytes=16 * 800, verbose=False)  # other chunks
    monkeypatch.setattr(cli, "BATCH_BYTES", 20_000)
    _, doc = zc_json(capsys, "diff", a, b)
    assert doc["changed"] == [
        {"path": "big", "reasons": ["values"], "max_abs_diff": 2.0, "n_different": 2}
    ]


def test_verify_a_damaged_step_record(root, capsys):
    record = _step_dir(root, 2) / "zarr.json"
    record.write_bytes(record.read_bytes().replace(b'"epoch_i"', b'"epoch_j"'))
    status, out, _ = zc(capsys, "verify", root, "--all")
    assert status == 1
    assert "step 2: DAMAGED: " in out and "crc32c checksum mismatch (the step record" in out


def _edit_zarr_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


ZARR_JSON_EDITS = {
    # what other Zarr readers decode by, none of which zarrckpt's own reads look at
    "codecs": lambda d: d["codecs"][0].update(configuration={"endian": "big"}),
    "fill_value": lambda d: d.update(fill_value=1.0),
    "chunk_key_encoding": lambda d: d["chunk_key_encoding"].update(
        configuration={"separator": "/"}
    ),
    "dimension_names": lambda d: d.update(dimension_names=["a", "b"]),
    "storage_transformers": lambda d: d.update(storage_transformers=[{"name": "x"}]),
}


def test_verify_accepts_what_other_tools_add_to_a_zarr_json(root, capsys):
    """Attributes decode nothing, and zarr-python writes an empty storage_transformers list
    when it rewrites a zarr.json: neither is damage."""
    meta = _step_dir(root, 2) / "net/l1/W/zarr.json"
    _edit_zarr_json(meta, lambda d: d.update(attributes={"units": "mV"}, storage_transformers=[]))
    assert zc(capsys, "verify", root)[0] == 0


@pytest.mark.parametrize("what", list(ZARR_JSON_EDITS))
def test_verify_compares_the_whole_zarr_json_with_the_record(root, capsys, what):
    meta = _step_dir(root, 2) / "net/l1/W/zarr.json"
    _edit_zarr_json(meta, ZARR_JSON_EDITS[what])
    status, out, _ = zc(capsys, "verify", root)
    assert status == 1, out
    assert "net/l1/W: leaf 'net/l1/W'" in out
    assert f"the array's zarr.json disagrees with the step record in {what!r}" in out
    assert zarrckpt.load_pytree(root)["net"]["l1"]["W"].dtype == np.float32  # zarrckpt's reads


def test_a_big_endian_codec_makes_zarr_read_other_values(root, capsys):
    """Why verify must compare codecs: zarr-python decodes by the array's zarr.json."""
    import zarr

    meta = _step_dir(root, 2) / "net/l1/W/zarr.json"
    saved = zarrckpt.load_pytree(root)["net"]["l1"]["W"]
    np.testing.assert_array_equal(zarr.open_array(str(meta.parent), mode="r")[:], saved)
    _edit_zarr_json(meta, ZARR_JSON_EDITS["codecs"])
    assert not np.array_equal(zarr.open_array(str(meta.parent), mode="r")[:], saved)
    status, out, _ = zc(capsys, "verify", root)
    assert status == 1 and '"endian": "big"' in out and '"endian": "little"' in out


def test_verify_accepts_what_older_versions_wrote_and_chosen_dims(tmp_path, root, capsys):
    """Arrays written before ``dimension_names`` existed have none (tests/golden/v0.1.0);
    dimension names given to save_pytree are what the record implies."""
    for meta in _step_dir(root, 2).rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        if doc.get("node_type") == "array":
            del doc["dimension_names"]
            meta.write_text(json.dumps(doc))
    assert zc(capsys, "verify", root)[0] == 0
    path = str(tmp_path / "dims")
    zarrckpt.save_pytree(path, _state(0), dims={"net/l1/W": ("pre", "post")}, verbose=False)
    assert zc(capsys, "verify", path)[0] == 0
    golden = ROOT / "tests/golden/v0.1.0"
    for case in sorted(p for p in golden.iterdir() if p.is_dir()):
        assert zc(capsys, "verify", case, "--all")[0] == 0, case


def test_verify_on_s3(s3_root, capsys):
    url, options = s3_root
    for step in range(2):
        zarrckpt.save_pytree(
            url, _state(step), step=step, keep=None, storage_options=options, verbose=False
        )
    fs = fsspec.filesystem("s3", **options)
    step_dir = next(p for p in fs.ls(url.removeprefix("s3://")) if "step_0000000001" in p)
    fs.pipe(f"{step_dir}/net/l1/W/c.0.0", b"garbage that fails its checksum")
    status, doc = zc_json(capsys, "verify", url, "--all")
    assert status == 1 and doc["steps"][0]["ok"] and not doc["steps"][1]["ok"]
    assert [d["path"] for d in doc["steps"][1]["damaged"]] == ["net/l1/W"]


# --- diff ---------------------------------------------------------------------------------------


def test_diff(root, capsys):
    status, out, _ = zc(capsys, "diff", f"{root}@0", root)
    assert status == 0  # diff exits 0 whenever it ran (git's convention) ...
    lines = out.splitlines()
    assert (
        lines[0].startswith("--- ")
        and lines[0].endswith("(step 0)")
        and lines[1].endswith("(step 2)")
    )
    assert "+ net/l3/W  4×3 float64" in lines and "- lr  scalar float64" in lines
    W0, W2 = _state(0)["net"]["l1"]["W"], _state(2)["net"]["l1"]["W"]
    worst = float(np.abs(W0.astype(np.float64) - W2).max())
    assert f"~ net/l1/W  max |a-b| {worst:.6g}, 2048 of 2048 elements differ" in lines
    assert "~ net/l2/V  max |a-b| 2, 32 of 32 elements differ" in lines
    assert lines[-1] == "1 added, 1 removed, 4 changed, 1 unchanged"  # name is unchanged
    status, doc = zc_json(capsys, "diff", f"{root}@0", f"{root}@1", "--exit-code")
    assert status == 1  # ... and 1 with --exit-code when the steps differ
    assert doc["added"] == doc["removed"] == [] and doc["unchanged"] == 2 and not doc["identical"]
    assert {c["path"]: c["n_different"] for c in doc["changed"]}["net/l2/V"] == 32
    status, doc = zc_json(capsys, "diff", root, root, "--exit-code")
    assert status == 0 and doc["identical"] and doc["unchanged"] == 6


def test_diff_shape_dtype_kind_and_nan(tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    zarrckpt.save_pytree(a, {
        "shape": np.zeros(3), "dtype": np.zeros(3, np.float32), "kind": np.int64(1),
        "nan": np.array([np.nan, 1.0, 2.0]), "text": "abc", "z": np.array([1 + 1j]),
        "same_nan": np.array([np.nan]),
    }, verbose=False)  # fmt: skip
    zarrckpt.save_pytree(b, {
        "shape": np.zeros(4), "dtype": np.zeros(3, np.float64), "kind": 1,
        "nan": np.array([np.nan, np.nan, 2.5]), "text": "abcd", "z": np.array([1 - 2j]),
        "same_nan": np.array([np.nan]),
    }, verbose=False)  # fmt: skip
    _, doc = zc_json(capsys, "diff", a, b)
    changed = {c["path"]: c for c in doc["changed"]}
    assert changed["shape"]["reasons"] == ["shape (3,) -> (4,)"]
    assert changed["dtype"]["reasons"] == ["dtype float32 -> float64"]
    assert changed["kind"]["reasons"] == ["kind npscalar -> py"]  # values equal
    assert changed["nan"]["max_abs_diff"] == "nan" and changed["nan"]["n_different"] == 2
    assert changed["text"]["reasons"] == ["values"] and changed["text"]["max_abs_diff"] is None
    assert changed["z"]["max_abs_diff"] == 3.0
    assert "same_nan" not in changed and doc["unchanged"] == 1


def test_diff_across_backends(root, s3_root, capsys):
    url, options = s3_root
    zarrckpt.save_pytree(url, _state(1), storage_options=options, verbose=False)
    status, doc = zc_json(capsys, "diff", f"{root}@1", url)
    assert status == 0 and doc["identical"]


# --- gc -----------------------------------------------------------------------------------------


def _garbage(doc: dict) -> list[str]:
    """The names ``gc --json`` lists."""
    return [item["name"] for item in doc["garbage"]]


def _make_debris(path: str) -> list[str]:
    step2 = _step_dir(path, 2)
    debris = [
        ".spare-step_0000000005.0000000000000000abcd",  # a dead process's spare
        "step_0000000009.0000000000000000abcd",  # a crashed save's unlisted step
    ]
    subprocess.run(["cp", "-r", str(step2), f"{path}/{debris[0]}"], check=True)
    subprocess.run(["cp", "-r", str(step2), f"{path}/{debris[1]}"], check=True)
    Path(path, "unrelated").mkdir()
    return debris


def test_gc_dry_run_lists_what_collection_deletes(root, capsys):
    debris = _make_debris(root)
    status, out, _ = zc(capsys, "gc", root, "--dry-run")
    assert status == 0
    # a dead process's spare is an abandoned spare, never "debris" (issue 19)
    assert out.splitlines() == [
        f"would delete {root}/{debris[0]}: an abandoned spare: the process that kept it for "
        "recycling has exited",
        f"would delete {root}/{debris[1]}: a step directory no manifest lists and no writer "
        "holds (an unfinished save)",
        f"{root}: would delete {len(debris)} items",
    ]
    assert "debris" not in out
    assert all(os.path.exists(f"{root}/{name}") for name in debris)
    _, doc = zc_json(capsys, "gc", root, "--dry-run")
    assert [item["kind"] for item in doc["garbage"]] == ["spare", "step"]
    # the read-only computation agrees with the collector itself
    assert _garbage(doc) == sorted(run(collect_garbage(open_storage(root))))
    assert not any(os.path.exists(f"{root}/{name}") for name in debris)
    assert zarrckpt.list_steps(root) == [0, 1, 2] and os.path.isdir(f"{root}/unrelated")
    assert zc(capsys, "verify", root, "--all")[0] == 0


def test_gc_deletes(root, capsys):
    debris = _make_debris(root)
    status, doc = zc_json(capsys, "gc", root)
    assert status == 0 and _garbage(doc) == sorted(debris) and not doc["dry_run"]
    assert not any(os.path.exists(f"{root}/{name}") for name in debris)
    status, out, _ = zc(capsys, "gc", root)
    assert out.splitlines() == [f"{root}: deleted 0 items"]


def test_gc_that_cannot_delete_says_so(root, capsys, monkeypatch):
    """A read-only mount: nothing is deleted, gc fails naming each directory and why
    (it used to print "deleted 1 item" and exit 0)."""
    import errno

    debris = _make_debris(root)

    def read_only(src, dst, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", src)

    monkeypatch.setattr(os, "rename", read_only)
    status, out, err = zc(capsys, "gc", root)
    monkeypatch.undo()
    assert status != 0 and "deleted" not in out
    for name in debris:
        assert os.path.exists(f"{root}/{name}")
        if os.path.isdir(f"{root}/{name}"):
            assert name in err
    assert "Read-only file system" in err and "could not delete" in err
    assert zc(capsys, "gc", root)[0] == 0  # writable again: collected
    assert not any(os.path.exists(f"{root}/{name}") for name in debris)


def test_gc_spares_a_live_writers_step(root, capsys):
    """An unlisted step whose writer still holds its lease (flock) is not debris."""
    import fcntl

    live = Path(root, "step_0000000003.0000000000000000beef")
    live.mkdir()
    lease = open(live / ".zarrckpt-writing", "w")  # noqa: SIM115
    try:
        fcntl.flock(lease, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _, doc = zc_json(capsys, "gc", root, "--dry-run")
        assert _garbage(doc) == []
    finally:
        lease.close()
    _, doc = zc_json(capsys, "gc", root, "--dry-run")
    assert _garbage(doc) == [live.name]


def test_gc_leaves_a_live_processs_spare(tmp_path, capsys):
    """A save loop keeps one dropped step as its spare (recycling); while that process lives
    the spare is its own, not garbage."""
    path = str(tmp_path / "loop")
    for step in range(3):
        zarrckpt.save_pytree(path, _state(0), step=step, overwrite=True, keep=1, verbose=False)
    assert any(name.startswith(".spare-") for name in os.listdir(path))
    status, doc = zc_json(capsys, "gc", path, "--dry-run")
    assert status == 0 and _garbage(doc) == []


def test_gc_on_s3(s3_root, capsys, monkeypatch):
    url, options = s3_root
    zarrckpt.save_pytree(url, _state(0), storage_options=options, verbose=False)
    fs = fsspec.filesystem("s3", **options)
    bucket = url.removeprefix("s3://")
    fs.pipe(f"{bucket}/step_0000000007.0000000000000000abcd/zarr.json", b"{}")  # no lease: dead
    fresh = '{"writer": "x", "expires": 9999999999}'
    fs.pipe(f"{bucket}/step_0000000008.0000000000000000abcd/.zarrckpt-lease", fresh.encode())
    s3fs.S3FileSystem.clear_instance_cache()  # the save's listings are cached in its instance
    status, doc = zc_json(capsys, "gc", url, "--dry-run")
    assert status == 0 and _garbage(doc) == ["step_0000000007.0000000000000000abcd"]
    _, doc = zc_json(capsys, "gc", url)
    assert _garbage(doc) == ["step_0000000007.0000000000000000abcd"]
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/step_0000000007.0000000000000000abcd")
    assert fs.exists(f"{bucket}/step_0000000008.0000000000000000abcd/.zarrckpt-lease")
    assert zarrckpt.list_steps(url, storage_options=options) == [0]


# --- cp -----------------------------------------------------------------------------------------


def test_cp_local_to_s3_and_back(root, s3_root, tmp_path, capsys, monkeypatch):
    """The CLI side of a copy (``test_copy`` compares copies with their sources)."""
    url, options = s3_root
    # no fsspec defaults: the endpoint and keys come from -o only
    monkeypatch.delitem(fsspec.config.conf, "s3")
    opts = [f"-o=endpoint_url={options['endpoint_url']}", f"-o=key={options['key']}",
            f"-o=secret={options['secret']}"]  # fmt: skip
    status, out, err = zc(capsys, "cp", root, url, *opts)
    assert status == 0 and err == "" and len(out.splitlines()) == 3
    assert out.startswith(f"step 0 -> {url}/step_0000000000.")
    assert out.splitlines()[2].endswith("(6 leaves, 8.3 KiB)")
    assert zarrckpt.list_steps(url, storage_options=options) == [0, 1, 2]
    for step in range(3):
        assert_same(
            zarrckpt.load_pytree(url, step=step, storage_options=options),
            zarrckpt.load_pytree(root, step=step),
        )
    back = str(tmp_path / "back")
    status, doc = zc_json(capsys, "cp", url, back, "--step", "1", "--codec", "zstd", *opts)
    assert status == 0 and doc["verified"] and doc["reencoded"]
    assert [s["step"] for s in doc["steps"]] == [1] and doc["steps"][0]["leaves"] == 6
    assert zarrckpt.list_steps(back) == [1]
    assert zarrckpt.open_checkpoint(back)["net/l1/W"].codec == "zstd:1"
    assert_same(zarrckpt.load_pytree(back), zarrckpt.load_pytree(root, step=1))
    # a step that exists at the destination needs the CLI's flag, named as the CLI spells it
    status, _, err = zc(capsys, "cp", root, back, "--step", "1")
    assert status == 2 and err.startswith("zarrckpt: error: ")
    assert "pass --overwrite to replace it" in err and "overwrite=True" not in err
    assert zc(capsys, "cp", root, back, "--step", "1", "--overwrite")[0] == 0
    _, doc = zc_json(capsys, "cp", root, back, "--step", "2", "--no-verify")
    assert not doc["verified"] and not doc["reencoded"] and doc["steps"][0]["files"] > 6


# --- convert, options, entry points -------------------------------------------------------------


def test_convert(tmp_path, capsys):
    from braintools.file import msgpack_load, msgpack_save

    src = str(tmp_path / "old.bp")
    msgpack_save(src, {"W": np.arange(6.0).reshape(2, 3), "bf": np.ones(2, ml_dtypes.bfloat16)})
    dst = str(tmp_path / "new")
    status, out, _ = zc(capsys, "convert", src, dst)
    assert status == 0 and out.startswith(f"{src} -> {dst}/step_0000000000.")
    assert out.rstrip().endswith("(step 0, 2 leaves, 52 B)")
    assert_same(zarrckpt.load_pytree(dst), msgpack_load(src))
    status, doc = zc_json(capsys, "convert", src, dst, "--step", "5")
    assert doc["step"] == 5 and doc["leaves"] == 2 and zarrckpt.list_steps(dst) == [0, 5]
    status, _, err = zc(capsys, "convert", src, dst, "--step", "5")
    assert status == 2 and "pass --overwrite to replace it" in err and "overwrite=True" not in err
    assert zc(capsys, "convert", src, dst, "--step", "5", "--overwrite")[0] == 0
    status, _, err = zc(capsys, "convert", str(tmp_path / "missing.bp"), dst)
    assert status == 2 and os.strerror(errno.ENOENT) in err  # the OS's wording, whatever it is
    status, _, err = zc(capsys, "convert", str(tmp_path), dst)
    assert status == 2 and "is a directory, not a .bp checkpoint file" in err


def test_storage_option_values():
    assert cli._storage_option("anon=true") == ("anon", True)
    assert cli._storage_option("key=abc") == ("key", "abc")
    assert cli._storage_option("n=3") == ("n", 3)
    assert cli._storage_option('client_kwargs={"region_name": "x"}') == (
        "client_kwargs", {"region_name": "x"},
    )  # fmt: skip
    assert cli._storage_option("url=http://h:1/?a=b") == ("url", "http://h:1/?a=b")


def test_progress_only_on_a_terminal(monkeypatch):
    args = cli._parser().parse_args(["ls", "x"])
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert cli._progress(args)
    assert not cli._progress(cli._parser().parse_args(["ls", "x", "-q"]))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not cli._progress(args)


def test_python_m_zarrckpt(root):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "zarrckpt", "verify", root, "--all"],
                          capture_output=True, text=True, env=env, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0 and done.stdout.endswith("ok: 3 of 3 steps intact\n")
    done = subprocess.run([sys.executable, "-m", "zarrckpt", "tree", root + "-missing"],
                          capture_output=True, text=True, env=env, cwd=ROOT)  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"zarrckpt: error: no checkpoint at {root}-missing\n"  # no traceback
    # a closed pipe ends the output quietly
    done = subprocess.run(f"{sys.executable} -m zarrckpt cat {root} net/l1/W --full | head -n 1",
                          shell=True, capture_output=True, text=True, env=env, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0 and done.stderr == "" and done.stdout.count("\n") == 1


def test_console_script_entry_point():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["zarrckpt"].partition(":")
    assert (module, name) == ("zarrckpt.cli", "main")
    assert cli.main.__module__ == module


def test_gc_that_cannot_open_a_lease_spares_its_step(root, capsys, monkeypatch):
    """A collector that may not open a step's lease (another user's gc in a shared directory:
    EACCES; out of descriptors: EMFILE) cannot judge it: not debris. It used to take a live
    writer's step for debris and delete it."""
    live = Path(root, "step_0000000003.0000000000000000beef")
    live.mkdir()
    (live / ".zarrckpt-writing").touch()
    real_open = os.open

    def refusing(path, flags, *args, **kwargs):
        if str(path).endswith(".zarrckpt-writing"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing)
    status, out, err = zc(capsys, "gc", root)
    monkeypatch.undo()
    assert status == 0 and live.is_dir() and live.name not in out, (out, err)
