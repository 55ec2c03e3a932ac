"""Lazy checkpoints: O(1) open, touched chunks only, pinned steps, reprs."""

from html.parser import HTMLParser

import numpy as np
import pytest

import zarrckpt
from zarrckpt import CheckpointNotFoundError
from zarrckpt._storage import LocalStorage


class CountingStorage(LocalStorage):
    """A local directory that counts reads and the bytes they return."""

    def __init__(self, root):
        super().__init__(root)
        self.gets, self.bytes = [], 0

    def _get(self, key, limit=None):  # every read, batched or not, goes through here
        data = super()._get(key, limit)
        self.gets.append(key)
        self.bytes += len(data or b"")
        return data

    def reset(self):
        self.gets, self.bytes = [], 0


def _many_leaves(n=2000):
    rng = np.random.default_rng(0)
    net = {f"layer{i // 100}": {} for i in range(n)}
    for i in range(n):
        net[f"layer{i // 100}"][f"n{i}"] = rng.standard_normal(64).astype(np.float32)
    return {"net": net, "big": {"W": rng.standard_normal((2048, 512)).astype(np.float32)}}


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    root = tmp_path_factory.mktemp("many") / "ckpt"
    state = _many_leaves()
    zarrckpt.save_pytree(str(root), state, verbose=False, chunk_bytes=256 * 1024)
    return root, state


def test_open_is_two_reads_for_two_thousand_leaves(many):
    root, _ = many
    storage = CountingStorage(root)
    ckpt = zarrckpt.open_checkpoint(storage)
    assert len(ckpt.leaves()) == 2001
    assert storage.gets == ["zarr.json", f"{ckpt._opened.info.dir}/zarr.json"]


def test_one_small_leaf_is_one_read(many):
    root, state = many
    storage = CountingStorage(root)
    ckpt = zarrckpt.open_checkpoint(storage)
    storage.reset()
    np.testing.assert_array_equal(ckpt["net/layer7/n777"][:], state["net"]["layer7"]["n777"])
    assert len(storage.gets) == 1 and storage.gets[0].endswith("net/layer7/n777/c.0")
    assert storage.bytes == 64 * 4 + 4  # the data and its checksum


def test_a_slice_reads_within_one_chunk_of_what_it_needs(many):
    root, state = many
    storage = CountingStorage(root)
    ckpt = zarrckpt.open_checkpoint(storage)
    storage.reset()
    w = ckpt["big/W"]
    assert w.chunks == (128, 512)
    part = w[300:420, 10:20]
    np.testing.assert_array_equal(part, state["big"]["W"][300:420, 10:20])
    row, chunk = 512 * 4, 128 * 512 * 4  # chunks are whole rows: a row range is what is needed
    # A range that straddles chunk boundaries reads the partial chunk at each end.
    assert storage.bytes <= 120 * row + 2 * chunk + 8 and len(storage.gets) == 2
    assert storage.bytes < w.nbytes / 4
    storage.reset()
    np.testing.assert_array_equal(w[256:300], state["big"]["W"][256:300])  # starts on a boundary
    assert storage.bytes <= 44 * row + chunk + 4 and len(storage.gets) == 1


def test_paths_dotted_forms_and_unknown_names(local_url):
    state = {"net": {"Dense0": {"Dense0.W": np.ones(3)}, "l2": {"V": np.arange(4.0)}}}
    zarrckpt.save_pytree(local_url, state, verbose=False)
    ckpt = zarrckpt.open_checkpoint(local_url)
    np.testing.assert_array_equal(ckpt["net.l2.V"][:], np.arange(4.0))
    np.testing.assert_array_equal(ckpt["net/Dense0/Dense0.W"][:], np.ones(3))
    np.testing.assert_array_equal(ckpt["net.Dense0.Dense0.W"][:], np.ones(3))
    assert isinstance(ckpt["net/l2"], zarrckpt.TreeView) and ckpt["net"]["l2"]["V"].shape == (4,)
    assert "net/l2/V" in ckpt and "net/l9" not in ckpt
    with pytest.raises(
        KeyError, match=r"'net/l3' is not in this checkpoint; did you mean 'net/l2'"
    ):
        ckpt["net/l3"]


def test_load_subtree_and_into_a_target(local_url):
    state = {
        "net": {
            "l1": {"W": np.ones((2, 2), np.float32)},
            "l2": {"V": np.arange(3, dtype=np.float32)},
        },
        "epoch": 7,
    }
    zarrckpt.save_pytree(local_url, state, verbose=False)
    ckpt = zarrckpt.open_checkpoint(local_url)
    out = ckpt.load("net/l2")
    assert list(out) == ["V"] and out["V"].tolist() == [0, 1, 2]
    restored = ckpt.load("net/l2", target={"V": np.zeros(3, np.float32)})
    assert restored["V"].tolist() == [0, 1, 2]
    assert ckpt["epoch"].load() == 7 and type(ckpt["epoch"].load()) is int
    assert ckpt.load()["net"]["l1"]["W"].sum() == 4


def test_stats_match_numpy_and_iterate_by_chunk(local_url):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((1000, 300)).astype(np.float32)
    w[w < -1] = 0
    zarrckpt.save_pytree(local_url, {"W": w}, verbose=False, chunk_bytes=64 * 1024)
    ckpt = zarrckpt.open_checkpoint(local_url)
    stats = ckpt.stats("W")
    x = w.astype(np.float64)
    assert stats["size"] == w.size and stats["nnz"] == np.count_nonzero(w)
    assert stats["min"] == x.min() and stats["max"] == x.max()
    assert stats["mean"] == pytest.approx(x.mean(), rel=1e-9)
    assert stats["std"] == pytest.approx(x.std(), rel=1e-9)
    sizes = {values.nbytes for _, values in ckpt["W"].iter_chunks()}
    assert max(sizes) <= 64 * 1024


def test_views_are_pinned_and_report_deleted_steps(url):
    zarrckpt.save_pytree(url, {"v": np.zeros(3)}, verbose=False)
    ckpt = zarrckpt.open_checkpoint(url)
    zarrckpt.save_pytree(url, {"v": np.ones(3)}, keep=None, verbose=False)
    assert ckpt.step == 0 and ckpt.steps == [0, 1]
    assert ckpt["v"][:].tolist() == [0, 0, 0]  # still the old step
    zarrckpt.save_pytree(url, {"v": np.full(3, 2.0)}, keep=1, verbose=False)  # retention drops 0
    with pytest.raises(
        CheckpointNotFoundError, match=r"step 0 .* has been deleted since this view was opened"
    ):
        ckpt["v"][:]
    with pytest.raises(CheckpointNotFoundError, match="has been deleted"):
        ckpt.load()
    assert zarrckpt.open_checkpoint(url)["v"][:].tolist() == [2, 2, 2]
    with pytest.raises(CheckpointNotFoundError, match="step 0 is not committed"):
        zarrckpt.open_checkpoint(url, step=0)


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.text, self.stack = [], []

    def handle_starttag(self, tag, attrs):
        if tag not in ("br", "hr", "meta", "input"):  # void elements
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (self.stack, tag)
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def test_reprs_show_names_shapes_and_totals(local_url):
    state = {
        "net": {"l1": {"W": np.ones((20, 30), np.float32)}, "<b>odd</b>": {"V": np.zeros(4)}},
        "n": None,
    }
    zarrckpt.save_pytree(local_url, state, verbose=False)
    ckpt = zarrckpt.open_checkpoint(local_url)
    text = repr(ckpt)
    assert "3 leaves" not in text and "2 leaves" in text and "W: 20×30 float32" in text
    for obj in (ckpt, ckpt["net"], ckpt["net/l1/W"]):
        parser = _Collect()
        parser.feed(obj._repr_html_())
        parser.close()
        assert parser.stack == []  # well-formed
        joined = " ".join(parser.text)
        assert "W" in joined and "20×30" in joined
    assert "<b>odd</b>" in " ".join(_text(ckpt))  # escaped, shown as text
    assert repr(ckpt["net/l1/W"]).splitlines()[0] == (
        "LazyArray('net/l1/W', shape=(20, 30), dtype=float32, chunks=(20, 30), codec='none', "
        "size='2.3 KiB')"
    )  # then NumPy's repr of the values: tests/test_repr.py
    info = ckpt.info()
    assert info["leaves"] == 2 and info["nbytes"] == 20 * 30 * 4 + 32 and info["step"] == 0


def _text(obj):
    parser = _Collect()
    parser.feed(obj._repr_html_())
    return parser.text


def test_open_missing_checkpoint(local_url):
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint at"):
        zarrckpt.open_checkpoint(local_url)
