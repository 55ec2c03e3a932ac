"""Checkpoints in xarray and dask: ``dimension_names`` on every array, steps opened by
xarray's own zarr backend, ``Checkpoint.to_xarray`` and ``LazyArray.to_dask``."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

import zarrckpt
from zarrckpt._storage.local import LocalStorage
from zarrckpt.checkpoint import step_url

xr = pytest.importorskip("xarray")
da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")


def _tree() -> dict:
    rng = np.random.default_rng(0)
    return {
        "W": rng.standard_normal((6, 4)).astype(np.float32),
        "b": np.arange(5, dtype=np.int64),
        "t": np.float64(2.5),
        "spikes": rng.random((3, 8)) < 0.2,
        "net": {
            "W": rng.standard_normal((7, 2)),  # same leaf name as the root's, other shape
            "l1": {"V": np.linspace(0, 1, 9), "W_0": np.ones((2, 2))},
        },
        "layers": [np.zeros(2), np.ones((3, 1))],
    }


@pytest.fixture
def root(tmp_path: Path) -> str:
    root = str(tmp_path / "ckpt")
    zarrckpt.save_pytree(root, _tree(), step=3, verbose=False)
    return root


@pytest.fixture
def chunk_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Keys of chunks (not metadata) read from local storage from now on."""
    keys: list[str] = []
    original = LocalStorage._open_read

    def counting(self: LocalStorage, key: str) -> int | None:
        if not key.endswith("zarr.json"):
            keys.append(key.split("/", 1)[1])  # relative to the step directory
        return original(self, key)

    monkeypatch.setattr(LocalStorage, "_open_read", counting)
    return keys


def _array_docs(step_dir: Path) -> dict[str, dict]:
    return {
        str(p.parent.relative_to(step_dir)): doc
        for p in step_dir.rglob("zarr.json")
        if (doc := json.loads(p.read_text()))["node_type"] == "array"
    }


# --- dimension_names ---------------------------------------------------------------------------


def test_every_array_has_dimension_names_unique_in_the_step(root: str) -> None:
    docs = _array_docs(Path(step_url(root)))
    assert len(docs) == 9
    for path, doc in docs.items():
        assert doc["dimension_names"] == [f"{path}_{i}" for i in range(len(doc["shape"]))]
    assert docs["W"]["dimension_names"] == ["W_0", "W_1"]
    assert docs["net/l1/W_0"]["dimension_names"] == ["net/l1/W_0_0", "net/l1/W_0_1"]
    assert docs["t"]["dimension_names"] == []
    names = [n for doc in docs.values() for n in doc["dimension_names"]]
    assert len(names) == len(set(names))


def test_a_recycled_save_keeps_dimension_names(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    for step in range(3):
        zarrckpt.save_pytree(root, _tree(), step=step, keep=1, verbose=False)
    docs = _array_docs(Path(step_url(root)))
    assert docs["net/W"]["dimension_names"] == ["net/W_0", "net/W_1"]


# --- xarray's own zarr backend -------------------------------------------------------------------


def test_open_datatree_reads_a_whole_step(root: str) -> None:
    expected = zarrckpt.load_pytree(root)
    dt = xr.open_datatree(step_url(root), engine="zarr", consolidated=False)
    np.testing.assert_array_equal(dt["W"].values, expected["W"])
    np.testing.assert_array_equal(dt["spikes"].values, expected["spikes"])
    np.testing.assert_array_equal(dt["net/W"].values, expected["net"]["W"])
    np.testing.assert_array_equal(dt["net/l1/V"].values, expected["net"]["l1"]["V"])
    np.testing.assert_array_equal(dt["layers/1"].values, expected["layers"][1])
    assert dt["net/W"].dims == ("net/W_0", "net/W_1")
    assert float(dt["t"].values) == 2.5


def test_open_zarr_reads_one_group(root: str) -> None:
    ds = xr.open_zarr(f"{step_url(root)}/net/l1", consolidated=False)
    assert set(ds.data_vars) == {"V", "W_0"}
    np.testing.assert_array_equal(ds["V"].values, np.linspace(0, 1, 9))


def test_step_url_and_checkpoint_url(root: str) -> None:
    zarrckpt.save_pytree(root, {"x": np.zeros(1)}, step=4, keep=None, verbose=False)
    ckpt = zarrckpt.open_checkpoint(root, step=3)
    assert ckpt.url == step_url(root, 3) != step_url(root)
    assert Path(ckpt.url).parent == Path(root)
    assert Path(ckpt.url).name.startswith("step_0000000003.")
    assert zarrckpt.open_checkpoint(root).url == step_url(root, 4)
    with pytest.raises(zarrckpt.errors.CheckpointNotFoundError):
        step_url(root, 5)


def test_open_datatree_on_s3(s3_root) -> None:
    pytest.importorskip("s3fs")
    url, options = s3_root
    zarrckpt.save_pytree(url, _tree(), step=1, storage_options=options, verbose=False)
    ckpt = zarrckpt.open_checkpoint(url, storage_options=options)
    assert ckpt.url.startswith("s3://") and ckpt.url == step_url(url, storage_options=options)
    dt = xr.open_datatree(ckpt.url, engine="zarr", consolidated=False, storage_options=options)
    np.testing.assert_array_equal(dt["net/l1/V"].values, np.linspace(0, 1, 9))
    # zarrckpt's own reads, through dask, re-opened after pickling
    tree = pickle.loads(pickle.dumps(ckpt.to_xarray("net")))
    np.testing.assert_array_equal(tree["l1/V"].values, np.linspace(0, 1, 9))


# --- Checkpoint.to_xarray ------------------------------------------------------------------------


def test_to_xarray_of_a_step_equals_load(root: str, chunk_reads: list[str]) -> None:
    ckpt = zarrckpt.open_checkpoint(root)
    dt = ckpt.to_xarray()
    assert isinstance(dt, xr.DataTree)
    assert chunk_reads == []  # lazy: nothing read yet
    expected = zarrckpt.load_pytree(root)
    chunk_reads.clear()
    np.testing.assert_array_equal(dt["W"].values, expected["W"])
    assert chunk_reads == ["W/c.0.0"]
    np.testing.assert_array_equal(dt["net/W"].values, expected["net"]["W"])
    np.testing.assert_array_equal(dt["net/l1/W_0"].values, expected["net"]["l1"]["W_0"])
    np.testing.assert_array_equal(dt["layers/0"].values, expected["layers"][0])
    assert dt["spikes"].dtype == bool and float(dt["t"].values) == 2.5
    reference = xr.open_datatree(ckpt.url, engine="zarr", consolidated=False)
    assert dt["net/l1"].dataset.sizes == reference["net/l1"].dataset.sizes
    assert set(dt.groups) == set(reference.groups)


def test_to_xarray_of_a_subtree_is_a_dataset(root: str, chunk_reads: list[str]) -> None:
    ckpt = zarrckpt.open_checkpoint(root)
    ds = ckpt.to_xarray("net/l1")
    assert isinstance(ds, xr.Dataset) and set(ds.data_vars) == {"V", "W_0"}
    assert ds["V"].dims == ("net/l1/V_0",)
    assert chunk_reads == []
    np.testing.assert_array_equal(ds["V"].values, np.linspace(0, 1, 9))
    assert chunk_reads == ["net/l1/V/c.0"]
    # a view's to_xarray and a sub-tree with groups
    tree = ckpt["net"].to_xarray()
    assert isinstance(tree, xr.DataTree) and set(tree.children) == {"l1"}
    np.testing.assert_array_equal(tree["l1/W_0"].values, np.ones((2, 2)))
    leaf = ckpt.to_xarray("net/W")
    assert isinstance(leaf, xr.DataArray) and leaf.dims == ("net/W_0", "net/W_1")


def test_to_xarray_reads_only_the_chunks_asked_for(tmp_path: Path, chunk_reads) -> None:
    root = str(tmp_path / "ckpt")
    big = np.arange(40_000, dtype=np.float64).reshape(400, 100)
    zarrckpt.save_pytree(root, {"g": {"big": big}}, chunk_bytes=80_000, verbose=False)
    ds = zarrckpt.open_checkpoint(root).to_xarray("g")
    assert ds["big"].chunks == ((100, 100, 100, 100), (100,))
    assert chunk_reads == []
    np.testing.assert_array_equal(ds["big"][150:160].values, big[150:160])
    assert chunk_reads == ["g/big/c.1.0"]


# --- LazyArray.to_dask ---------------------------------------------------------------------------


@pytest.fixture
def big_root(tmp_path: Path) -> tuple[str, np.ndarray]:
    root = str(tmp_path / "big")
    big = np.random.default_rng(1).standard_normal((1000, 300)).astype(np.float32)
    zarrckpt.save_pytree(root, {"big": big}, chunk_bytes=100_000, verbose=False)
    return root, big


def test_to_dask_blocks_are_the_stored_chunks(big_root, chunk_reads) -> None:
    root, big = big_root
    leaf = zarrckpt.open_checkpoint(root)["big"]
    rows = leaf.chunks[0]
    assert leaf.chunks == (rows, 300) and 1 < rows < 1000  # several chunks of whole rows
    x = leaf.to_dask()
    assert chunk_reads == []
    assert x.shape == big.shape and x.dtype == big.dtype
    n = -(-1000 // rows)
    assert x.chunks == ((rows,) * (n - 1) + (1000 - rows * (n - 1),), (300,))
    np.testing.assert_array_equal(x.compute(), big)
    assert sorted(chunk_reads) == sorted(f"big/c.{i}.0" for i in range(n))
    assert leaf.to_dask().name == x.name  # deterministic


def test_dask_stat_over_a_large_leaf(big_root) -> None:
    root, big = big_root
    x = zarrckpt.open_checkpoint(root)["big"].to_dask()
    assert x.mean().compute() == pytest.approx(big.mean(dtype=np.float64), rel=1e-5)
    np.testing.assert_allclose(x.std(axis=0).compute(), big.std(axis=0), rtol=1e-4)
    stats = zarrckpt.open_checkpoint(root).stats("big")
    assert float(x.max().compute()) == stats["max"]


def test_from_array_still_works(big_root) -> None:
    root, big = big_root
    leaf = zarrckpt.open_checkpoint(root)["big"]
    np.testing.assert_array_equal(da.from_array(leaf, chunks=(500, 150)).compute(), big)


def test_zero_d_and_empty_leaves(tmp_path: Path) -> None:
    root = str(tmp_path / "c")
    zarrckpt.save_pytree(root, {"s": np.int32(7), "e": np.zeros((0, 3))}, verbose=False)
    ckpt = zarrckpt.open_checkpoint(root)
    assert ckpt["s"].to_dask().compute() == 7 and ckpt["s"].dims == ()
    assert ckpt["e"].to_dask().compute().shape == (0, 3)


def test_lazy_array_pickles(big_root, chunk_reads) -> None:
    root, big = big_root
    leaf = zarrckpt.open_checkpoint(root)["big"]
    copy = pickle.loads(pickle.dumps(leaf))
    assert chunk_reads == []
    assert copy.path == "big" and copy.shape == big.shape
    np.testing.assert_array_equal(copy[10:20, 5], big[10:20, 5])


def test_dask_graph_pickles_and_runs_in_processes(big_root) -> None:
    root, big = big_root
    x = zarrckpt.open_checkpoint(root)["big"].to_dask()
    restored = pickle.loads(pickle.dumps(x))
    np.testing.assert_array_equal(restored.compute(), big)
    total = (x.sum(axis=1)).compute(scheduler="processes", num_workers=2)
    np.testing.assert_allclose(total, big.sum(axis=1), rtol=1e-5)


def test_a_pickled_array_refuses_an_overwritten_step(big_root) -> None:
    root, big = big_root
    data = pickle.dumps(zarrckpt.open_checkpoint(root)["big"])
    zarrckpt.save_pytree(root, {"big": big * 2}, step=0, overwrite=True, verbose=False)
    with pytest.raises(zarrckpt.errors.CheckpointNotFoundError):
        pickle.loads(data)


# --- user-chosen dimension names -----------------------------------------------------------------


def _layer(n_pre: int = 6, n_post: int = 4) -> dict:
    return {
        "l1": {
            "W": np.arange(n_pre * n_post, dtype=np.float32).reshape(n_pre, n_post),
            "V": np.linspace(0, 1, n_post, dtype=np.float32),
            "spike": np.zeros(n_post, dtype=bool),
        }
    }


DIMS = {"l1/W": ("pre", "post"), "l1/V": ("post",), "l1/spike": "post"}


def test_user_dims_reach_zarr_json_xarray_and_lazy_views(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    zarrckpt.save_pytree(root, _layer(), dims=DIMS, verbose=False)
    docs = _array_docs(Path(step_url(root)))
    assert docs["l1/W"]["dimension_names"] == ["pre", "post"]
    assert docs["l1/spike"]["dimension_names"] == ["post"]  # a str names a 1-d leaf's axis
    ds = xr.open_zarr(f"{step_url(root)}/l1", consolidated=False)  # one shared "post" axis
    assert dict(ds.sizes) == {"pre": 6, "post": 4}
    ckpt = zarrckpt.open_checkpoint(root)
    assert ckpt["l1/W"].dims == ("pre", "post")
    mine = ckpt.to_xarray("l1")
    assert mine["V"].dims == ("post",) and dict(mine.sizes) == {"pre": 6, "post": 4}
    np.testing.assert_array_equal(mine["W"].values, _layer()["l1"]["W"])


def test_user_dims_change_between_recycled_saves(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    for step, dims in enumerate([DIMS, None, DIMS, {"l1/W": ("a", "b")}]):
        zarrckpt.save_pytree(root, _layer(), dims=dims, step=step, verbose=False)
        docs = _array_docs(Path(step_url(root)))
        want = {None: ["l1/W_0", "l1/W_1"], 0: ["pre", "post"], 3: ["a", "b"]}
        assert (
            docs["l1/W"]["dimension_names"]
            == want[None if dims is None else 0 if dims is DIMS else 3]
        )
        assert zarrckpt.open_checkpoint(root)["l1/W"].dims == tuple(docs["l1/W"]["dimension_names"])


@pytest.mark.parametrize(
    ("dims", "match"),
    [
        ({"l1/X": ("a",)}, r"not leaves of the tree.*'l1/W'"),
        ({"l1/W": ("a",)}, r"dims\['l1/W'\]: expected 2 dimension name"),
        ({"l1/W": ("a", "a")}, "must differ"),
        ({"l1/W": ("a", "")}, "non-empty strings"),
        ({"l1/V": (3,)}, "non-empty strings"),
    ],
)
def test_bad_user_dims_are_refused_before_writing(tmp_path: Path, dims, match) -> None:
    root = tmp_path / "ckpt"
    with pytest.raises(ValueError, match=match):
        zarrckpt.save_pytree(str(root), _layer(), dims=dims, verbose=False)
    assert not root.exists() or zarrckpt.list_steps(str(root)) == []
