"""Readers racing a save loop: a step that a newer commit drops while it is being read is a
race, never damage (issue 16, item 6).

Each deterministic test pauses a reader at one point of its read (after it read the manifest
and before it read the step record; after it read the record; between opening a step and
verifying its files), commits one or two newer steps with the defaults (``keep=1``, so the
step being read is dropped: deleted, or renamed to a spare and rewritten as a newer step),
and lets the reader go on. Opening the latest step must then open the newer one; an explicit
step must say that it was dropped (:class:`~zarrckpt.CheckpointNotFoundError`); ``verify``
must verify the newer latest, or report the step as dropped, never as DAMAGED. Damage of a
step that is still listed stays damage. The slow test runs a real save loop in another
process against a reading loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import zarrckpt
from zarrckpt import CheckpointNotFoundError, CorruptCheckpointError, _read, cli


def tree(step: int) -> dict[str, np.ndarray]:
    return {
        "w": np.full((4, 3), step, np.float32),
        "big": np.full(2**16, step, np.float32),  # two raw chunks: read straight into place
        "n": np.int64(step),
    }


def save(root: Path, step: int, **kw) -> None:
    zarrckpt.save_pytree(str(root), tree(step), verbose=False, step=step, chunk_bytes=2**17, **kw)


def assert_tree(got, step: int) -> None:
    for key, value in tree(step).items():
        np.testing.assert_array_equal(got[key], value)


@pytest.fixture
def root(tmp_path) -> Path:
    path = tmp_path / "ckpt"
    save(path, 0)
    return path


def commit_during(monkeypatch, module, name: str, commit, times: int = 1) -> list[int]:
    """Replace ``module.name`` by a function that first runs ``commit()`` (its first
    ``times`` calls), then the original; returns the list of calls made so far."""
    original = getattr(module, name)
    calls: list[int] = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) <= times:
            commit()
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


# --- opening a step: the record read races a commit ------------------------------------------

SAVES = {
    # the dropped step is deleted
    "deleted": lambda root: save(root, 1, recycle=False),
    # the dropped step becomes a spare, renamed into place and rewritten as the step after
    "recycled": lambda root: (save(root, 1), save(root, 2)),
}


@pytest.mark.parametrize("how", list(SAVES))
def test_latest_dropped_before_its_record_is_read_opens_the_newer_one(root, monkeypatch, how):
    newest = 1 if how == "deleted" else 2
    calls = commit_during(monkeypatch, _read, "_read_record", lambda: SAVES[how](root))
    assert_tree(zarrckpt.load_pytree(str(root)), newest)
    assert len(calls) == 2  # the dropped step's, then the newer one's
    assert zarrckpt.open_checkpoint(str(root)).step == newest


@pytest.mark.parametrize("how", list(SAVES))
def test_latest_dropped_after_its_record_was_read_opens_the_newer_one(root, monkeypatch, how):
    """The record itself was read whole; its directory has gone by the confirmation."""
    newest = 1 if how == "deleted" else 2
    commit_during(monkeypatch, _read, "parse_step_record", lambda: SAVES[how](root))
    assert_tree(zarrckpt.load_pytree(str(root)), newest)


@pytest.mark.parametrize("how", list(SAVES))
def test_explicit_step_dropped_while_being_opened_says_so(root, monkeypatch, how):
    commit_during(monkeypatch, _read, "_read_record", lambda: SAVES[how](root))
    with pytest.raises(CheckpointNotFoundError, match=r"step 0 was dropped by a newer commit"):
        zarrckpt.load_pytree(str(root), step=0)


def test_explicit_step_overwritten_while_being_opened_opens_the_new_one(root, monkeypatch):
    """``step=0`` saved again (overwrite) while being opened: the new step 0 is step 0."""

    def overwrite() -> None:
        zarrckpt.save_pytree(str(root), tree(7), verbose=False, step=0, chunk_bytes=2**17)

    commit_during(monkeypatch, _read, "_read_record", overwrite)
    assert_tree(zarrckpt.load_pytree(str(root), step=0), 7)


def test_a_reader_that_always_loses_gives_up_saying_why(root, monkeypatch):
    monkeypatch.setattr(_read, "OPEN_ATTEMPTS", 3)
    steps = iter(range(1, 100))
    commit_during(monkeypatch, _read, "_read_record", lambda: save(root, next(steps)), times=99)
    with pytest.raises(CheckpointNotFoundError, match=r"3 times in a row"):
        zarrckpt.load_pytree(str(root))


def _record_path(root: Path) -> Path:
    manifest = json.loads((root / "zarr.json").read_text())
    return root / manifest["attributes"]["zarrckpt"]["steps"][-1]["dir"] / "zarr.json"


def test_a_listed_step_whose_record_is_gone_is_still_damage(root):
    _record_path(root).unlink()
    with pytest.raises(CorruptCheckpointError, match=r"listed in the manifest but its data"):
        zarrckpt.load_pytree(str(root))


def test_a_listed_step_whose_directory_is_gone_is_still_damage(root, monkeypatch):
    """Its record read, then its directory moved away by hand (not by a commit): damage."""
    step_dir = _record_path(root).parent

    def remove() -> None:
        step_dir.rename(root / "moved-away")

    commit_during(monkeypatch, _read, "parse_step_record", remove)
    with pytest.raises(CorruptCheckpointError, match=r"listed in the manifest but its data"):
        zarrckpt.load_pytree(str(root))


def test_a_listed_step_with_a_damaged_record_is_still_damage(root):
    record = _record_path(root)
    data = bytearray(record.read_bytes())
    data[-3] ^= 1
    record.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"crc32c checksum mismatch"):
        zarrckpt.load_pytree(str(root))


def test_a_race_on_an_object_store(monkeypatch):
    """Object stores have no renames: a dropped step's objects are deleted, and only the newer
    manifest tells a race from damage."""
    url = f"memory://races-{os.getpid()}-{time.monotonic_ns()}"
    save(url, 0)
    commit_during(monkeypatch, _read, "_read_record", lambda: save(url, 1))
    assert_tree(zarrckpt.load_pytree(url), 1)


# --- verify ------------------------------------------------------------------------------------


def verify(capsys, *args: str) -> tuple[int, str]:
    status = cli.main(["verify", *args])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def drop_during_verify(monkeypatch, root: Path, how: str = "recycled") -> None:
    """Commit newer steps after verify opened its step, before it reads the step's files."""
    commit_during(monkeypatch, cli, "_check_zarr_jsons", lambda: SAVES[how](root))


@pytest.mark.parametrize("how", list(SAVES))
def test_verify_of_the_latest_step_dropped_meanwhile_verifies_the_newer_one(
    root, monkeypatch, capsys, how
):
    drop_during_verify(monkeypatch, root, how)
    status, out = verify(capsys, str(root))
    assert status == 0, out
    assert "DAMAGED" not in out
    assert f"step {1 if how == 'deleted' else 2}:" in out


def test_verify_of_the_latest_step_dropped_meanwhile_json(root, monkeypatch, capsys):
    drop_during_verify(monkeypatch, root)
    status, out = verify(capsys, str(root), "--json")
    doc = json.loads(out)
    assert status == 0 and doc["ok"], doc
    assert [s["step"] for s in doc["steps"]] == [2]


def test_verify_all_reports_a_dropped_step_as_dropped(tmp_path, monkeypatch, capsys):
    root = tmp_path / "ckpt"
    save(root, 0, keep=None)
    save(root, 1, keep=None)
    # while step 0 is verified, a save with keep=1 drops steps 0 and 1
    commit_during(monkeypatch, cli, "_check_zarr_jsons", lambda: save(root, 2))
    status, out = verify(capsys, str(root), "--all")
    assert status == 0, out
    assert "DAMAGED" not in out
    assert "step 0: dropped by a newer commit while being verified" in out
    assert "step 1: dropped by a newer commit while being verified" in out
    assert "ok: 0 of 0 steps intact (2 dropped by newer commits while being verified)" in out


def test_verify_of_an_explicit_step_dropped_meanwhile_is_an_error(root, monkeypatch, capsys):
    drop_during_verify(monkeypatch, root)
    status, out = verify(capsys, str(root), "--step", "0")
    assert status == 2, out
    assert "DAMAGED" not in out
    assert "step 0 of" in out and "was dropped by a newer commit" in out


def test_verify_still_reports_damage_of_a_listed_step(root, capsys):
    leaf = _record_path(root).parent / "w" / "zarr.json"
    leaf.unlink()
    status, out = verify(capsys, str(root))
    assert status == 1
    assert "DAMAGED" in out and "the array's zarr.json is missing" in out


# --- a real save loop --------------------------------------------------------------------------


def loop_tree(step: int) -> dict:
    return {
        "w": np.full((64, 64), step, np.float32),
        "n": np.int64(step),
        "more": [np.full(100, step, np.int32) for _ in range(20)],
    }


WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import zarrckpt
    from test_reader_races import loop_tree

    root, seconds = sys.argv[1], float(sys.argv[2])
    end = time.monotonic() + seconds
    step = 0
    while time.monotonic() < end:
        step += 1
        zarrckpt.save_pytree(root, loop_tree(step), verbose=False, step=step)
    """
)


@pytest.mark.slow
def test_readers_against_a_keep_1_save_loop(tmp_path, capsys):
    """Loads of the latest step and ``verify`` against a save loop (keep=1, recycling): no
    CorruptCheckpointError, never DAMAGED; each load is one committed step, whole."""
    root = str(tmp_path / "ckpt")
    zarrckpt.save_pytree(root, loop_tree(0), verbose=False, step=0)
    seconds = 8.0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, root, str(seconds)], env=env)
    loads = races = verifies = 0
    corrupt: list[str] = []
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                got = zarrckpt.load_pytree(root)
                loads += 1
                step = int(got["n"])
                assert (got["w"] == step).all() and all((x == step).all() for x in got["more"])
            except CheckpointNotFoundError:  # dropped while its chunks were being read
                races += 1
            except CorruptCheckpointError as exc:
                corrupt.append(str(exc))
            if loads % 10 == 0:
                status = cli.main(["verify", root])
                captured = capsys.readouterr()
                verifies += 1
                if status == 1 or "DAMAGED" in captured.out:
                    corrupt.append(captured.out)
                elif status == 2:  # dropped by newer commits every time it tried
                    assert "was dropped by a newer commit" in captured.err, captured.err
                    races += 1
    finally:
        assert writer.wait(timeout=120) == 0
    assert not corrupt, corrupt[:3]
    assert loads > 20, (loads, races, verifies)
