"""Recycling: in a save loop the dropped step is rewritten in place, never read by mistake."""

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr

import zarrckpt
from zarrckpt import CheckpointNotFoundError


def _files(step_dir: Path) -> set[str]:
    return {str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file()} - {
        ".zarrckpt-writing"
    }


def _dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def _committed(root: Path) -> Path:
    ckpt = zarrckpt.open_checkpoint(str(root))
    return Path(ckpt.location)


def _inode(path: Path) -> int:
    return os.stat(path).st_ino


def test_a_save_loop_recycles_one_spare_and_creates_no_inodes(tmp_path):
    root = tmp_path / "ckpt"
    state = {
        "w": np.arange(100_000, dtype=np.float32),
        "n": {f"x{i}": np.full(10, i) for i in range(50)},
    }
    zarrckpt.save_pytree(str(root), state, verbose=False)
    zarrckpt.save_pytree(str(root), state, verbose=False)
    spares = [d for d in _dirs(root) if d.startswith(".spare-")]
    assert len(spares) == 1 and len([d for d in _dirs(root) if d.startswith("step_")]) == 1
    spare_inode = _inode(root / spares[0] / "w" / "c.0")
    for _ in range(3):
        state["w"] = state["w"] + 1
        zarrckpt.save_pytree(str(root), state, verbose=False)
        assert len([d for d in _dirs(root) if d.startswith(".spare-")]) == 1
    # The spare of two saves ago is the committed step now: same inodes, new bytes.
    inodes = {_inode(d / "w" / "c.0") for d in root.iterdir() if (d / "w" / "c.0").exists()}
    assert spare_inode in inodes
    out = zarrckpt.load_pytree(str(root))
    assert np.array_equal(out["w"], np.arange(100_000, dtype=np.float32) + 3)
    assert zarrckpt.list_steps(str(root)) == [4]


def test_structure_changes_between_recycled_saves_leave_no_stale_files(tmp_path):
    root = tmp_path / "ckpt"
    trees = [
        {"a": np.ones((40, 3)), "b": {"c": np.zeros(5, np.int32), "d": 1}, "keep": "x"},
        {"a": np.ones((80, 3)), "b": np.arange(4), "keep": "x", "new": {"e": [1, 2]}},
        {"a": np.ones(3, np.float16), "keep": "y", "new": {"e": [1]}},
        {"b": {"c": np.zeros(5, np.int32)}, "keep": "z", "a": {"c.0": np.ones(2)}},
        {"a": np.ones((40, 3)), "b": {"c": np.zeros(5, np.int32), "d": 1}, "keep": "x"},
    ]
    for tree in trees:
        zarrckpt.save_pytree(str(root), tree, verbose=False, chunk_bytes=256)
        step_dir = _committed(root)
        got = zarrckpt.load_pytree(str(root))
        assert got.keys() == tree.keys()
        group = zarr.open_group(str(step_dir), mode="r")
        # Every file belongs to the new tree: the zarr.json of a node, or a chunk of a leaf.
        nodes = {"", *(k for k, _ in group.members(max_depth=None))}
        for f in _files(step_dir):
            parent = os.path.dirname(f)
            assert parent in nodes, f"stale file {f} in the recycled step"
            if not f.endswith("zarr.json"):
                assert isinstance(group[parent], zarr.Array), f
        assert (
            zarr.open_array(str(step_dir / "keep"), mode="r")[...].tobytes().decode()
            == tree["keep"]
        )
    assert np.array_equal(zarrckpt.load_pytree(str(root))["a"], np.ones((40, 3)))


def test_recycle_false_deletes_the_spare(tmp_path):
    root = tmp_path / "ckpt"
    for _ in range(2):
        zarrckpt.save_pytree(str(root), {"v": np.ones(3)}, verbose=False)
    assert any(d.startswith(".spare-") for d in _dirs(root))
    zarrckpt.save_pytree(str(root), {"v": np.ones(3)}, verbose=False, recycle=False)
    assert [d for d in _dirs(root) if not d.startswith("step_")] == []
    assert len(_dirs(root)) == 1


def test_disabled_by_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ZARRCKPT_RECYCLE", "0")
    root = tmp_path / "ckpt"
    for _ in range(3):
        zarrckpt.save_pytree(str(root), {"v": np.ones(3)}, verbose=False)
    assert len(_dirs(root)) == 1


def test_a_spare_of_another_process_is_never_taken(tmp_path):
    """Only the process that holds a spare's lease rewrites it; a dead process's spare is
    debris, and a `.spare-` directory planted in a downloaded checkpoint is never used."""
    import subprocess
    import sys

    root = tmp_path / "ckpt"
    code = (
        "import numpy as np, zarrckpt, sys\n"
        "for i in range(2): zarrckpt.save_pytree(sys.argv[1], {'v': np.full(4, i)}, verbose=False)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(root)], check=True, cwd=os.getcwd())
    (dead,) = [d for d in _dirs(root) if d.startswith(".spare-")]
    planted = root / ".spare-step_0000000099.000000000001cafe0000"
    (planted / "v").mkdir(parents=True)
    (planted / "v" / "c").write_bytes(b"x")
    zarrckpt.save_pytree(str(root), {"v": np.full(4, 7)}, verbose=False)
    names = _dirs(root)
    assert dead not in names and planted.name not in names  # both collected as debris
    assert (planted / "v").exists() is False
    assert zarrckpt.load_pytree(str(root))["v"].tolist() == [7] * 4


def test_a_view_of_a_recycled_step_raises_instead_of_reading_new_bytes(tmp_path):
    root = tmp_path / "ckpt"
    zarrckpt.save_pytree(str(root), {"w": np.zeros(1000)}, verbose=False)
    view = zarrckpt.open_checkpoint(str(root))
    assert view["w"][:3].tolist() == [0, 0, 0]
    zarrckpt.save_pytree(str(root), {"w": np.ones(1000)}, verbose=False)  # view's step -> spare
    zarrckpt.save_pytree(str(root), {"w": np.full(1000, 2.0)}, verbose=False)  # spare rewritten
    with pytest.raises(CheckpointNotFoundError, match="has been deleted since this view"):
        view["w"][:]
    with pytest.raises(CheckpointNotFoundError, match="has been deleted since this view"):
        view.load()


def test_a_reader_hammering_a_step_while_a_loop_recycles_it(tmp_path):
    """A reader pinned to a step either reads that step's bytes or is told it is gone."""
    root = tmp_path / "ckpt"
    n = 200_000
    zarrckpt.save_pytree(
        str(root), {"w": np.zeros(n, np.float32)}, verbose=False, chunk_bytes=64 * 1024
    )
    stop = threading.Event()
    seen = {"values": 0, "gone": 0}
    errors = []

    def reader():
        while not stop.is_set():
            view = zarrckpt.open_checkpoint(str(root))
            expected = float(view.step)
            try:
                while not stop.is_set():
                    values = view["w"][:]
                    if not (values == expected).all():
                        errors.append((view.step, np.unique(values)[:5]))
                        return
                    seen["values"] += 1
            except CheckpointNotFoundError:
                seen["gone"] += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for step in range(1, 25):
            zarrckpt.save_pytree(
                str(root), {"w": np.full(n, step, np.float32)}, verbose=False, chunk_bytes=64 * 1024
            )
    finally:
        stop.set()
        thread.join(30)
    assert not errors, f"a reader saw another step's bytes: {errors}"
    assert seen["values"] > 0 and seen["gone"] > 0, seen


@pytest.mark.parametrize("size", [1000, 3_000_000])  # a batched small file; a direct raw read
def test_a_file_opened_before_recycling_and_read_after_is_not_taken_for_the_step(
    tmp_path, monkeypatch, size
):
    """The reader opens a chunk of step 0; meanwhile step 0 is dropped, recycled and rewritten
    (same inode, new bytes, valid checksum); then the reader reads. It must not return them."""
    from zarrckpt._storage.local import LocalStorage

    root = tmp_path / "ckpt"
    zarrckpt.save_pytree(str(root), {"w": np.zeros(size, np.float32)}, verbose=False)
    view = zarrckpt.open_checkpoint(str(root))
    step0 = view.location
    opened, rewritten = threading.Event(), threading.Event()
    original = LocalStorage._open_read

    def paused(self, key):
        fd = original(self, key)
        if key.startswith(os.path.basename(step0)) and not opened.is_set():
            opened.set()
            assert rewritten.wait(30)
        return fd

    monkeypatch.setattr(LocalStorage, "_open_read", paused)

    def writer():
        assert opened.wait(30)
        for value in (1.0, 2.0):
            zarrckpt.save_pytree(str(root), {"w": np.full(size, value, np.float32)}, verbose=False)
        rewritten.set()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        with pytest.raises(CheckpointNotFoundError, match="has been deleted since this view"):
            view["w"][:]
    finally:
        rewritten.set()
        thread.join(30)
    assert not os.path.exists(step0)
    assert zarrckpt.load_pytree(str(root))["w"][0] == 2.0


def test_a_step_directory_taken_away_mid_save_is_never_committed(tmp_path, monkeypatch):
    """If a collector misjudges a live step (another user's gc) and claims it while it is
    being written, the save fails before publishing: it never re-creates the directory
    and commits a partial step."""
    from zarrckpt._storage.local import LocalStorage
    from zarrckpt.errors import StoreError

    root = tmp_path / "run"
    zarrckpt.save_pytree(str(root), {"a": np.arange(10), "b": np.ones(3)}, verbose=False)
    sync = LocalStorage.sync

    async def claimed_before_sync(self):
        for name in os.listdir(self.root):
            if name.startswith("step_") and name not in committed:
                os.rename(self.root / name, self.root / f".trash-{name}.00000000")
        await sync(self)

    committed = {p.name for p in root.iterdir() if p.name.startswith("step_")}
    monkeypatch.setattr(LocalStorage, "sync", claimed_before_sync)
    with pytest.raises(StoreError, match="removed or replaced while this save wrote it"):
        zarrckpt.save_pytree(str(root), {"a": np.arange(10) + 1, "b": np.ones(3)}, verbose=False)
    monkeypatch.undo()
    assert zarrckpt.list_steps(str(root)) == [0]
    assert zarrckpt.load_pytree(str(root))["a"].tolist() == list(range(10))
