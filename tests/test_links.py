"""Saves with the defaults (keep=1, recycle=True) never write through links.

A hard-link backup (``cp -al root backup``, ``rsync --link-dest``, rsnapshot) shares inodes with
the root: later saves into the root must leave the backup's committed steps as they were. A
symbolic link planted in a checkpoint (a downloaded one) must never make a save write outside
the root.
"""

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
import stress_worker as sw
from helpers import assert_same

import zarrckpt
from zarrckpt import CorruptCheckpointError
from zarrckpt.cli import main as cli_main


def link_copy(src: Path, dst: Path) -> None:
    """``cp -al src dst``: new directories, every file a hard link to the original."""
    for dirpath, _, filenames in os.walk(src):
        target = dst / Path(dirpath).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in filenames:
            os.link(os.path.join(dirpath, name), target / name)


def verify(root: Path) -> tuple[int, str]:
    """``zarrckpt verify --all root``: exit status and output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = cli_main(["verify", "--all", str(root)])
    return rc, out.getvalue()


def small_tree(step: int) -> dict:
    return sw.make_tree(step, 1, step, big=1 << 16, n_small=8)


def test_saves_after_a_hard_link_backup_leave_the_backup_intact(tmp_path):
    root, backup = tmp_path / "root", tmp_path / "backup"
    for step in range(3):  # a save loop: this process has a spare by now
        zarrckpt.save_pytree(str(root), small_tree(step), verbose=False, chunk_bytes=1 << 14)
    link_copy(root, backup)
    assert zarrckpt.list_steps(str(backup)) == [2]
    shared = sum(p.stat().st_nlink > 1 for p in backup.rglob("*") if p.is_file())
    assert shared > 20  # the backup shares its files' inodes with the root
    for step in range(3, 7):
        zarrckpt.save_pytree(str(root), small_tree(step), verbose=False, chunk_bytes=1 << 14)
        rc, out = verify(backup)
        assert rc == 0, f"after saving step {step} into the root, the backup fails verify:\n{out}"
        assert (
            sw.mismatch(zarrckpt.load_pytree(str(backup)), 2, 1, 2, big=1 << 16, n_small=8) is None
        )
    assert sw.mismatch(zarrckpt.load_pytree(str(root)), 6, 1, 6, big=1 << 16, n_small=8) is None
    assert verify(root)[0] == 0


BASE = {"a": np.arange(10, dtype=np.float32), "b": {"c": np.ones(3)}}
# 'a' changes its layout (its zarr.json is rewritten) and a leaf 'new' appears
CHANGED = {"a": np.arange(20, dtype=np.float32), "b": {"c": np.ones(3) * 2}, "new": np.arange(4)}


def _snapshot(outside: Path) -> dict:
    return {
        str(p.relative_to(outside)): (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_size)
        for p in sorted(outside.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("planted", ["file links", "directory link"])
def test_saves_never_write_through_symbolic_links_planted_in_a_checkpoint(tmp_path, planted):
    """A checkpoint as downloaded (one step, no spare of this process) with a link at a leaf's
    ``zarr.json`` and, where the user's next tree adds a leaf, a link at its chunk and
    ``zarr.json`` (or at its whole directory), each pointing outside the root."""
    outside, root = tmp_path / "outside", tmp_path / "ckpt"
    outside.mkdir()
    step_dir = Path(zarrckpt.save_pytree(str(root), BASE, verbose=False, recycle=False))
    leaf_json = step_dir / "a" / "zarr.json"
    (outside / "a.json").write_bytes(leaf_json.read_bytes())
    leaf_json.unlink()
    os.symlink(outside / "a.json", leaf_json)
    if planted == "file links":
        (step_dir / "new").mkdir()
        for name in ("c.0", "zarr.json"):
            (outside / f"new-{name}").write_bytes(b"precious " + name.encode())
            os.symlink(outside / f"new-{name}", step_dir / "new" / name)
    else:
        (outside / "dir").mkdir()
        (outside / "dir" / "c.0").write_bytes(b"precious chunk")
        (outside / "dir" / "zarr.json").write_bytes(b"precious json")
        os.symlink(outside / "dir", step_dir / "new")
    before = _snapshot(outside)

    with contextlib.suppress(CorruptCheckpointError):  # the user looks first (a refusal is fine)
        zarrckpt.load_pytree(str(root))
    for i, tree in enumerate([BASE, CHANGED, BASE, CHANGED, CHANGED]):
        zarrckpt.save_pytree(str(root), tree, verbose=False)
        after = _snapshot(outside)
        changed = sorted(k for k in before if after.get(k) != before[k])
        assert not changed, (
            f"save {i + 1} into the checkpoint wrote to files outside it, through the links "
            f"planted in it: {changed}"
        )
        assert_same(zarrckpt.load_pytree(str(root)), tree)
