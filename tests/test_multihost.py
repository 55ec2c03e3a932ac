"""Multi-process JAX: collective saves and sharded restores, with real processes.

Each test starts a JAX job of 2 (or 3) processes on 127.0.0.1 (``jax.distributed`` with a
local coordinator, 2 CPU devices per process, gloo collectives) running
``multihost_worker.py``, against a local directory or the S3 server, and checks what every
process reports (outcome, keys written and read) and what a plain single-process load sees.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import zarrckpt

pytest.importorskip("jax")

WORKER = Path(__file__).with_name("multihost_worker.py")
SHAPES = {"w": (64, 48), "v": (12, 48), "r": (12,), "b": (12, 8)}  # as in multihost_worker


def expected(name: str, shape: tuple[int, ...], step: int = 0) -> np.ndarray:
    seed = sum(map(ord, name)) + 1000 * step
    return (np.arange(np.prod(shape), dtype=np.float64).reshape(shape) + seed).astype(np.float32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job(
    scenario: str, root: str, tmp_path: Path, count: int = 2, arg: str = "",
    env: dict[str, str] | None = None, timeout: float = 120, options: dict | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Run one job of ``count`` processes; each process's report (None if it wrote none)."""
    out = Path(tempfile.mkdtemp(prefix=f"out-{scenario}-", dir=tmp_path))
    port = str(_free_port())
    environ = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "MULTIHOST_STORAGE_OPTIONS": json.dumps(options),
        # the workers import this checkout's zarrckpt, as the tests do, not an installed one
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(WORKER.parent.parent), os.environ.get("PYTHONPATH")])
        ),
        **(env or {}),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(p), str(count), port, root, str(out), arg],
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for p in range(count)
    ]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail(f"job {scenario!r} did not finish within {timeout} s")
    reports = []
    for p in range(count):
        path = out / f"{p}.json"
        reports.append(json.loads(path.read_text()) if path.exists() else None)
    for report, log in zip(reports, logs, strict=True):
        if report is not None:
            report["log"] = log[-3000:]
    return reports


def assert_ok(reports: list[dict[str, Any] | None]) -> None:
    for p, report in enumerate(reports):
        assert report is not None, f"process {p} wrote no report"
        assert report["outcome"] == "ok", f"process {p}: {report.get('traceback')}\n{report['log']}"


def chunk_keys(keys: list[str]) -> list[str]:
    return [k.split("/", 1)[1] for k in keys if not k.endswith("zarr.json") and "/" in k]


def check_saved(root: str, step: int = 0, options: dict | None = None) -> None:
    tree = zarrckpt.load_pytree(root, step=step, storage_options=options)  # an ordinary process
    for name, shape in SHAPES.items():
        np.testing.assert_array_equal(tree[name], expected(name, shape, step), name)
    assert tree["meta"] == {"epoch": step, "note": "every process saves the same tree"}


def test_collective_save_writes_each_chunk_once(tmp_path):
    root = str(tmp_path / "ckpt")
    reports = job("save", root, tmp_path)
    assert_ok(reports)
    check_saved(root)
    ckpt = zarrckpt.open_checkpoint(root)
    # every chunk file of the step is written by exactly one process
    written = [chunk_keys(r["written"]) for r in reports]
    every = written[0] + written[1]
    assert len(every) == len(set(every))
    step_dir = Path(ckpt.url.removeprefix("file://"))
    on_disk = {str(f.relative_to(step_dir)) for f in step_dir.rglob("c*") if f.is_file()}
    assert set(every) == on_disk
    # The mesh is 2x2 ("a", "b") with process p's two devices on row a=p. Process 1 writes
    # only chunks of the shards it holds and no other process writes: rows 32.. of "w"
    # (P("a", "b")); columns 4.. of "b" (P("b", "a")); nothing of "v" (P(None, "b"): its
    # shards are replicated over "a", so process 0 writes them), of the replicated "r" or of
    # the plain values under "meta".
    assert written[1]
    for key in written[1]:
        leaf, name = key.rsplit("/", 1)
        first = [
            i * c for i, c in zip(map(int, name.split(".")[1:]), ckpt[leaf].chunks, strict=True)
        ]
        assert (leaf == "w" and first[0] >= 32) or (leaf == "b" and first[1] >= 4), key
    assert {k.split("/")[0] for k in written[1]} == {"w", "b"}
    # chunk grids follow the shards on any axis: "v" is split along its trailing axis only
    assert ckpt["v"].chunks[1] == 24 and ckpt["w"].chunks[1] == 24
    # the record says how each leaf was sharded
    info = {leaf.path: leaf.sharding for leaf in ckpt.leaves()}
    assert info["w"]["spec"] == ["a", "b"] and info["w"]["mesh"] == {"a": 2, "b": 2}
    assert info["w"]["shard_shape"] == [32, 24] and info["w"]["processes"] == 2
    assert info["meta/epoch"] is None


def step_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> tuple[str, dict | None]:
    if request.param == "local":
        return str(tmp_path / "ckpt"), None
    return request.getfixturevalue("s3_root")


def test_restore_reads_only_overlapping_chunks_on_another_mesh(where, tmp_path):
    root, options = where
    assert_ok(job("save", root, tmp_path, options=options))
    reports = job("restore", root, tmp_path, options=options)  # a 1-D mesh of 4 devices
    assert_ok(reports)  # each process checked its shards' values
    ckpt = zarrckpt.open_checkpoint(root, storage_options=options)
    for p, report in enumerate(reports):
        read = chunk_keys(report["read"])
        # "w" is restored as P(None, "x"): process p holds columns 24p..24p+24, which are
        # exactly the saved chunks of column index p
        w = [k for k in read if k.startswith("w/")]
        assert w and {int(k.split(".")[-1]) for k in w} == {p}, w
        # "b" as P("x", None) on 4 devices: rows 6p..6p+6 of 12
        b_rows = ckpt["b"].chunks[0]
        rows = {int(k.split(".")[1]) for k in read if k.startswith("b/")}
        assert rows == set(range(6 * p // b_rows, (6 * p + 5) // b_rows + 1)), rows
        assert len(read) == len(set(read))  # each chunk once, though several devices need it


def test_three_processes_save_two_restore_one_loads(tmp_path):
    root = str(tmp_path / "ckpt")
    reports = job("save", root, tmp_path, count=3)
    assert_ok(reports)
    every = [k for r in reports for k in chunk_keys(r["written"])]
    assert len(every) == len(set(every)) and all(chunk_keys(r["written"]) for r in reports)
    check_saved(root)
    assert_ok(job("restore", root, tmp_path, count=2))


@pytest.mark.slow
def test_a_failing_process_fails_the_save_everywhere(tmp_path):
    root = str(tmp_path / "ckpt")
    assert_ok(job("save", root, tmp_path))
    before = step_dirs(Path(root))
    reports = job("fail", root, tmp_path, arg="1")
    assert reports[1]["outcome"] == "OSError"
    assert reports[0]["outcome"] == "CollectiveError", reports[0]
    assert "process 1 failed" in reports[0]["message"] and "disk on fire" in reports[0]["message"]
    assert zarrckpt.list_steps(root) == [0] and step_dirs(Path(root)) == before
    check_saved(root)


@pytest.mark.slow
def test_a_process_that_never_saves_is_a_timeout_not_a_hang(tmp_path):
    root = str(tmp_path / "ckpt")
    env = {"ZARRCKPT_COLLECTIVE_TIMEOUT_S": "3"}
    reports = job("absent", root, tmp_path, env=env)
    assert reports[0]["outcome"] == "CollectiveError", reports[0]
    assert "did not arrive within 3 s" in reports[0]["message"]
    assert zarrckpt.list_steps(root) == []


@pytest.mark.slow
def test_overwrite_false_is_decided_once_and_raised_everywhere(tmp_path):
    root = str(tmp_path / "ckpt")
    assert_ok(job("save", root, tmp_path))
    reports = job("overwrite", root, tmp_path, arg="0")
    assert [r["outcome"] for r in reports] == ["AlreadyExistsError"] * 2
    assert not any(chunk_keys(r["written"]) for r in reports)  # refused before writing


def test_async_collective_saves(tmp_path):
    root = str(tmp_path / "ckpt")
    assert_ok(job("async", root, tmp_path, arg="1"))  # steps 1, 2, 3 in the background
    assert zarrckpt.list_steps(root) == [3]
    check_saved(root, step=3)  # written over step 1's recycled files, by both processes
    assert len(step_dirs(Path(root))) == 1
    # recycled: step 3 was written over step 1's directory, and step 2's is now the spare
    # (without recycling, both would have been deleted and no spare kept)
    assert len([p for p in Path(root).iterdir() if p.name.startswith(".spare-step_")]) == 1


@pytest.mark.slow
def test_killed_process_leaves_previous_step_and_the_next_job_collects(tmp_path):
    root = str(tmp_path / "ckpt")
    assert_ok(job("save", root, tmp_path))
    reports = job("kill", root, tmp_path, arg="1")
    assert reports[1] is None  # killed mid-save; JAX's heartbeat then ends process 0
    assert reports[0] is None or reports[0]["outcome"] != "ok"
    assert zarrckpt.list_steps(root) == [0]
    check_saved(root)
    assert len(step_dirs(Path(root))) == 2  # the dead save's debris
    assert_ok(job("save", root, tmp_path, arg="1"))
    check_saved(root, step=1)
    assert len(step_dirs(Path(root))) == 1


def test_shard_aligned_grids_read_by_zarr_tensorstore_and_lazy_slices(tmp_path):
    """Chunks that split trailing axes (``v``: columns only) are standard Zarr: zarr-python
    and TensorStore read them, and lazy slices across chunk corners are exact."""
    zarr = pytest.importorskip("zarr")
    ts = pytest.importorskip("tensorstore")
    root = str(tmp_path / "ckpt")
    assert_ok(job("save", root, tmp_path))
    ckpt = zarrckpt.open_checkpoint(root)
    step_dir = ckpt.url.removeprefix("file://")
    for name, shape in SHAPES.items():
        want = expected(name, shape)
        np.testing.assert_array_equal(zarr.open_array(f"{step_dir}/{name}", mode="r")[:], want)
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{step_dir}/{name}"}}
        np.testing.assert_array_equal(ts.open(spec, read=True).result().read().result(), want)
    w, v = expected("w", SHAPES["w"]), expected("v", SHAPES["v"])
    np.testing.assert_array_equal(ckpt["w"][5:40, 10:30], w[5:40, 10:30])
    np.testing.assert_array_equal(ckpt["v"][::-5, 20:28], v[::-5, 20:28])
    np.testing.assert_array_equal(ckpt["w"][33, ::7], w[33, ::7])


@pytest.mark.slow
def test_a_late_process_0_is_an_error_everywhere_not_a_hang(tmp_path):
    root = str(tmp_path / "ckpt")
    reports = job("late0", root, tmp_path, env={"ZARRCKPT_COLLECTIVE_TIMEOUT_S": "1.5"})
    assert reports[1]["outcome"] == "CollectiveError", reports[1]  # gave up waiting
    assert "did not arrive within 1.5 s" in reports[1]["message"]
    assert reports[0]["outcome"] == "CollectiveError", reports[0]  # heard why, then failed
    assert "process 1 failed" in reports[0]["message"]
    assert zarrckpt.list_steps(root) == []


def test_a_save_that_fails_on_one_process_does_not_shift_later_pairings(tmp_path):
    root = str(tmp_path / "ckpt")
    reports = job("desync", root, tmp_path)
    # process 0 raises process 1's error class, with its message ("process 1 failed: ...")
    assert reports[0]["outcomes"] == ["UnsupportedLeafError", "ok", "ok"], reports[0]
    assert reports[1]["outcomes"] == ["UnsupportedLeafError", "ok", "ok"], reports[1]
    assert zarrckpt.list_steps(root) == [2]
    check_saved(root, step=2)  # both processes' shards of the same call


def test_process_local_trees_are_saved_by_whoever_calls(tmp_path):
    root = str(tmp_path / "ckpt")
    assert_ok(job("local", root, tmp_path))
    for p in (0, 1):
        np.testing.assert_array_equal(zarrckpt.load_pytree(f"{root}/proc{p}")["p"], [p] * 3)
    np.testing.assert_array_equal(zarrckpt.load_pytree(f"{root}/only0")["p"], [0, 1, 2])


def test_overlapping_saves_to_two_roots_and_key_cleanup(tmp_path):
    root = str(tmp_path / "ckpt")
    reports = job("overlap", root, tmp_path)
    assert_ok(reports)
    check_saved(f"{root}/a", step=2)
    check_saved(f"{root}/b", step=3)
    # 7 saves of 6-7 keys each: those every process had finished are deleted
    assert reports[0]["keys"] <= 14, reports[0]["keys"]


def test_targets_without_local_shards_and_key_targets(tmp_path):
    root = str(tmp_path / "ckpt")
    assert_ok(job("save", root, tmp_path))
    assert_ok(job("nolocal", root, tmp_path))  # process 0 holds none of "w"
    reports = job("keytarget", root, tmp_path)
    for report in reports:
        assert report["outcome"] == "UnsupportedLeafError", report
        assert "PRNG key onto devices of several processes" in report["message"]


@pytest.mark.parametrize(
    ("scenario", "says"),
    [
        ("mismatch", "process(es) [1]"),  # process 1's tree has one more leaf
        ("diffroot", "root"),  # process 1 names another root
        ("partial", "one process only"),  # a leaf on process 1's devices only
    ],
)
def test_calls_that_differ_are_refused_on_every_process(tmp_path, scenario, says):
    root = str(tmp_path / "ckpt")
    reports = job(scenario, root, tmp_path)
    for report in reports:
        assert report["outcome"] == "StructureMismatchError", report
        assert says in report["message"]
    assert zarrckpt.list_steps(root) == [] and not Path(root + "-elsewhere").exists()


@pytest.mark.slow
def test_a_load_failing_on_one_process_fails_everywhere_and_later_loads_pair_up(tmp_path):
    root = str(tmp_path / "ckpt")
    assert_ok(job("save", root, tmp_path))
    reports = job("loaddrift", root, tmp_path)
    assert reports[1]["outcomes"] == ["ValueError", "ok"], reports[1]
    assert reports[0]["outcomes"] == ["CollectiveError", "ok"], reports[0]  # not a half load


def test_states_holding_sharded_sub_trees_are_collective(tmp_path):
    pytest.importorskip("brainstate")
    root = str(tmp_path / "ckpt")
    assert_ok(job("statetree", root, tmp_path))
    got = zarrckpt.load_pytree(root)
    np.testing.assert_array_equal(got["s"]["w"], expected("w", SHAPES["w"]))
