"""Several processes on one local root with the defaults (keep=1, recycle=True): two writers
saving ``latest + 1`` in a loop, ``zarrckpt gc`` in a loop (as a command and in-process), a
reader and a checker. Nothing a writer committed may lose a byte while the manifest lists it.

The workers are tests/stress_worker.py (its docstring says what each one logs). The quick
variant runs in the normal suite; the long one (60 s) is marked slow.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import stress_worker as sw

import zarrckpt

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    env.pop("ZARRCKPT_RECYCLE", None)  # the defaults
    return env


def _reference_files(tmp_path: Path) -> set[str]:
    """The files one step of :func:`stress_worker.make_tree` has, from a fresh root."""
    ref_root = tmp_path / "reference"
    where = zarrckpt.save_pytree(
        str(ref_root),
        sw.make_tree(0, 0, 0),
        verbose=False,
        recycle=False,
        chunk_bytes=sw.CHUNK_BYTES,
    )
    files = sw.step_files(where)
    assert "zarr.json" in files and "big/zarr.json" in files and len(files) > 40
    return files


def _events(out: Path) -> dict[str, list[dict]]:
    return {
        p.stem: [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        for p in sorted(out.glob("*.jsonl"))
    }


def _stop(procs: list[subprocess.Popen]) -> None:
    """Kill what is still running (each worker's own process group: a gc-cli worker's child
    too) and reap it."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)


def run_stress(tmp_path: Path, seconds: float, roles: list[tuple[str, int]]) -> dict:
    """Start the workers, let them run ``seconds``, stop them; the events by worker."""
    root, out = tmp_path / "root", tmp_path / "out"
    out.mkdir()
    (out / "ref.json").write_text(json.dumps(sorted(_reference_files(tmp_path))))
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        for role, ident in roles:
            log = open(out / f"{role}{ident}.stderr", "wb")  # noqa: SIM115
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(TESTS / "stress_worker.py"),
                        role,
                        str(root),
                        str(out),
                        str(seconds),
                        str(ident),
                    ],
                    env=_env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + 120
        while len(list(out.glob("ready.*"))) < len(roles):
            dead = [p.args[2:5] for p in procs if p.poll() is not None]
            assert not dead, f"workers exited before the start: {dead}"
            assert time.monotonic() < deadline, "workers did not start in 120 s"
            time.sleep(0.05)
        (out / "go").touch()
        limit = time.monotonic() + seconds + 90
        for proc in procs:
            proc.wait(timeout=max(1, limit - time.monotonic()))
        crashed = {
            f"{p.args[2]}{p.args[6]}": (out / f"{p.args[2]}{p.args[6]}.stderr").read_text()[-3000:]
            for p in procs
            if p.returncode != 0
        }
        assert not crashed, f"workers failed: {crashed}"
    finally:
        _stop(procs)
        for log in logs:
            log.close()
    return _events(out)


class Problems:
    """Problems by kind, for one readable failure message."""

    def __init__(self) -> None:
        self.kinds: dict[str, list[str]] = {}

    def add(self, kind: str, text: str) -> None:
        self.kinds.setdefault(kind, []).append(text)

    def __len__(self) -> int:
        return sum(map(len, self.kinds.values()))

    def report(self, examples: int = 4) -> str:
        lines = [f"{kind}: {len(items)}" for kind, items in self.kinds.items()]
        for kind, items in self.kinds.items():
            lines += ["", f"{kind}, e.g.:", *(f"  {t}" for t in items[:examples])]
        return "\n".join(lines)


def check_outcome(root: Path, events: dict[str, list[dict]], ref: set[str]) -> dict:
    """Every assertion of the stress test; returns counts for the report."""
    problems = Problems()
    commits = {}  # dir -> (step, writer, seq)
    stats = {"commits": 0, "lost": 0, "reads": 0, "races": 0, "gc_runs": 0, "gc_deleted": 0}
    first_commit = min(
        (e["t"] for evs in events.values() for e in evs if e["ev"] == "commit"), default=None
    )
    for name, evs in events.items():
        for e in evs:
            ev = e["ev"]
            if ev == "commit":
                commits[e["dir"]] = (e["step"], e["wid"], e["seq"])
                stats["commits"] += 1
            elif ev == "lost":
                stats["lost"] += 1
            elif ev == "summary" and "ok" in e:
                stats["reads"] += e["ok"]
                stats["races"] += e["race"]
            elif ev == "gc":
                stats["gc_runs"] += 1
                stats["gc_deleted"] += len(e["deleted"])
            elif ev == "gc-error":
                # Before the first commit there is no checkpoint (exit 2, said so): not an error.
                early = first_commit is None or e["t"] < first_commit + 0.5
                if not (early and "no checkpoint" in e["msg"]):
                    problems.add("gc failed", f"{name}: exit {e['rc']}: {e['msg'][-300:]}")
            elif ev == "damage":
                problems.add(
                    f"committed step damaged while listed (seen by the {e['by']})",
                    f"step {e['step']} ({e['dir']}) lost {e['n']} files, e.g. {e['missing'][:4]}",
                )
            elif ev == "fail":
                changed = e.get("manifest_changed")
                problems.add(
                    f"load failed with {e['type']}"
                    + ("" if changed is None else f" (manifest changed meanwhile: {changed})"),
                    f"{name}: step {e['step'] if e['step'] is not None else 'latest'}: "
                    f"{e['msg'][:300]}",
                )
            elif ev in ("error", "crash"):
                problems.add(f"{name} {e.get('where', ev)} raised {e['type']}", e["msg"][:300])
            elif ev == "warning":
                problems.add(f"warning {e['category']}", f"{name}: {e['msg'][:300]}")
    committed_ids = set(commits.values())
    for name, evs in events.items():
        for e in evs:
            if e["ev"] == "read" and tuple(e["id"]) not in committed_ids:
                problems.add("read data no writer committed", f"{name}: {e['id']}")

    # After everything stopped: the whole root verifies ...
    verify = subprocess.run(
        [sys.executable, "-m", "zarrckpt", "verify", "--all", str(root)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    if verify.returncode != 0:
        problems.add(
            f"final: zarrckpt verify --all exit {verify.returncode}",
            (verify.stdout[-800:] + verify.stderr[-800:]).replace("\n", " | "),
        )
    # ... every committed step has every file of its layout ...
    manifest = sw.listed(sw.manifest_bytes(str(root)))
    assert manifest, "nothing committed"
    for name in manifest:
        missing = ref - sw.step_files(root / name)
        if missing:
            problems.add(
                "final: committed step misses files",
                f"{name}: {len(missing)} files, e.g. {sorted(missing)[:4]}",
            )
    # ... and the latest step is bit-exactly what its writer saved.
    latest_dir = max(manifest, key=lambda d: manifest[d])
    if latest_dir not in commits:
        problems.add("final: latest step is no writer's commit", latest_dir)
    else:
        step, wid, seq = commits[latest_dir]
        try:
            tree = zarrckpt.load_pytree(str(root))
        except Exception as exc:
            problems.add("final: loading the latest step failed", f"{type(exc).__name__}: {exc}")
        else:
            bad = sw.mismatch(tree, step, wid, seq)
            if bad is not None:
                problems.add(
                    "final: latest step differs from what its writer saved",
                    f"step {step} (writer {wid}, save {seq}): {bad}",
                )
    stats["problems"] = len(problems)
    print(f"stress: {stats}")
    assert not len(problems), f"{len(problems)} problems ({stats}):\n{problems.report()}"
    return stats


def stress(tmp_path: Path, seconds: float, roles: list[tuple[str, int]]) -> dict:
    events = run_stress(tmp_path, seconds, roles)
    ref = set(json.loads((tmp_path / "out" / "ref.json").read_text()))
    stats = check_outcome(tmp_path / "root", events, ref)
    # The run must have exercised something: commits, lost races and loads.
    assert stats["commits"] >= 10, stats
    if sum(role == "writer" for role, _ in roles) > 1:
        assert stats["lost"] >= 1, stats
    if any(role == "reader" for role, _ in roles):
        assert stats["reads"] >= 10, stats
    return stats


ALL = [("writer", 1), ("writer", 2), ("gc-cli", 0), ("gc-inproc", 0), ("reader", 0), ("checker", 0)]


def test_two_writers_gc_and_a_reader_quick(tmp_path):
    """Two writers, ``zarrckpt gc`` as a command and in-process, a reader, a checker: 8 s."""
    stress(tmp_path, 8, ALL)


@pytest.mark.slow
def test_two_writers_and_a_reader_without_gc(tmp_path):
    """Two writers (each collecting after its commits) and a reader, no ``gc``: 8 s."""
    stress(tmp_path, 8, [("writer", 1), ("writer", 2), ("reader", 0), ("checker", 0)])


@pytest.mark.slow
def test_one_writer_and_gc(tmp_path):
    """One writer and an in-process ``gc`` loop: 8 s."""
    stress(tmp_path, 8, [("writer", 1), ("gc-inproc", 0), ("checker", 0)])


@pytest.mark.slow
def test_two_writers_gc_and_a_reader_long(tmp_path):
    """The quick test's mix for 30 s (60 s before: CI's budget; the quick run and the
    protocol model's exhaustive interleavings cover the same ground)."""
    stress(tmp_path, 30, ALL)
