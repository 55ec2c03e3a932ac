"""Worker processes of the multi-writer stress test (tests/test_multiwriter.py).

``python stress_worker.py ROLE ROOT OUT SECONDS [ID]``: announce readiness
(``OUT/ready.<name>``), wait for ``OUT/go``, then work for ``SECONDS`` and write one JSON line
per event to ``OUT/<name>.jsonl``. Roles:

``writer``
    saves ``step = latest + 1`` (``overwrite=True``, the defaults ``keep=1``, ``recycle=True``)
    in a loop; each leaf encodes ``(step, writer, seq)`` (:func:`make_tree`). Logs every commit
    (step, writer, seq, directory), every lost race (``ConcurrentWriteError``, allowed), every
    other error, every warning, and right after each commit checks that its step's files are
    all there while the manifest still lists it.
``reader``
    loads the latest step, and explicitly each listed step, in a loop, checking each tree
    bit-exactly against :func:`make_tree` of the ``(step, writer, seq)`` it claims; a failed
    load is classified by whether the manifest changed while it ran.
``checker``
    lists the files of every listed step and reports those still listed afterwards that miss
    files of the reference layout (a listed step is listed from its commit until it is dropped,
    never again, so such a step was damaged while committed).
``gc-cli`` / ``gc-inproc``
    ``python -m zarrckpt gc --json ROOT`` in a loop, as a subprocess per run or as
    ``zarrckpt.cli.main`` in this process.

Loops are bounded by ``SECONDS`` (each worker stops starting new work after it) and the test
kills whatever outlives its own time limit. This module never imports pytest.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

#: chunk size of every save (the big leaf has 4 chunks)
CHUNK_BYTES = 1 << 20
N_SMALL = 20
BIG = 1 << 20  # float32 elements: 4 MiB
#: names a step directory may hold while being written, not part of its layout
LEASE_NAMES = {".zarrckpt-writing"}


def make_tree(step: int, wid: int, seq: int, big: int = BIG, n_small: int = N_SMALL) -> dict:
    """A tree whose every leaf depends on (step, writer id, sequence number of the save)."""
    seed = (step * 7919 + wid * 104729 + seq * 1299709) % 4096
    return {
        "meta": np.array([step, wid, seq], np.int64),
        "small": {
            f"s{k:02d}": np.full(8, step * 1000 + wid * 100 + seq + k, np.int64)
            for k in range(n_small)
        },
        "nested": {
            "f": np.full(16, seed, np.float32),
            "i": np.arange(seed, seed + 5, dtype=np.int32),
        },
        "big": np.arange(big, dtype=np.float32) + np.float32(seed),
    }


def flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = value
    return out


def mismatch(tree: dict, step: int, wid: int, seq: int, **kw) -> str | None:
    """None if ``tree`` is bit-exactly ``make_tree(step, wid, seq)``, else what differs."""
    want, got = flat(make_tree(step, wid, seq, **kw)), flat(tree)
    if set(want) != set(got):
        return f"leaves differ: {sorted(set(want) ^ set(got))[:5]}"
    for path, value in want.items():
        other = np.asarray(got[path])
        if other.dtype != value.dtype or other.shape != value.shape:
            return f"{path}: {other.dtype}{other.shape} instead of {value.dtype}{value.shape}"
        if other.tobytes() != value.tobytes():
            return f"{path}: values differ from (step, writer, seq) = {(step, wid, seq)}"
    return None


def identity(tree: dict) -> tuple[int, int, int]:
    step, wid, seq = (int(x) for x in np.asarray(tree["meta"]))
    return step, wid, seq


def step_files(step_dir: str | os.PathLike[str]) -> set[str]:
    """Every file under a step directory, relative to it (lease files left out)."""
    top = str(step_dir)
    out = set()
    for dirpath, _, filenames in os.walk(top):
        for name in filenames:
            if name not in LEASE_NAMES:
                out.add(os.path.relpath(os.path.join(dirpath, name), top))
    return out


def manifest_bytes(root: str) -> bytes | None:
    try:
        with open(os.path.join(root, "zarr.json"), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def listed(data: bytes | None) -> dict[str, int]:
    """{directory: step} of a manifest's bytes (empty for None)."""
    if data is None:
        return {}
    doc = json.loads(data)
    return {s["dir"]: s["step"] for s in doc["attributes"]["zarrckpt"]["steps"]}


class Log:
    def __init__(self, path: Path) -> None:
        self.f = open(path, "a", buffering=1)  # noqa: SIM115

    def __call__(self, **event) -> None:
        event["t"] = round(time.time(), 4)
        self.f.write(json.dumps(event) + "\n")


def _error(exc: BaseException) -> dict:
    return {"type": type(exc).__name__, "msg": str(exc)[:500]}


# --- roles ----------------------------------------------------------------------------------


def writer(root: str, out: Path, seconds: float, wid: int, log: Log) -> None:
    import zarrckpt

    ref = set(json.loads((out / "ref.json").read_text()))
    end = time.monotonic() + seconds
    seq = 0
    while time.monotonic() < end:
        seq += 1
        try:
            steps = zarrckpt.list_steps(root)
        except Exception as exc:
            log(ev="error", where="list_steps", **_error(exc))
            continue
        step = steps[-1] + 1 if steps else 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                where = zarrckpt.save_pytree(
                    root,
                    make_tree(step, wid, seq),
                    step=step,
                    overwrite=True,
                    verbose=False,
                    chunk_bytes=CHUNK_BYTES,
                )
            except zarrckpt.ConcurrentWriteError:
                log(ev="lost", step=step, wid=wid, seq=seq)
                where = None
            except Exception as exc:
                log(
                    ev="error",
                    where="save",
                    step=step,
                    seq=seq,
                    tb=traceback.format_exc()[-2000:],
                    **_error(exc),
                )
                where = None
        for w in caught:
            log(ev="warning", category=w.category.__name__, msg=str(w.message)[:500])
        if where is None:
            continue
        name = os.path.basename(where.rstrip("/"))
        log(ev="commit", step=step, wid=wid, seq=seq, dir=name)
        # Right after the commit: all files there, unless a newer commit dropped the step.
        missing = ref - step_files(os.path.join(root, name))
        if missing and name in listed(manifest_bytes(root)):
            log(
                ev="damage",
                by="writer",
                dir=name,
                step=step,
                n=len(missing),
                missing=sorted(missing)[:10],
            )


def reader(root: str, out: Path, seconds: float, rid: int, log: Log) -> None:
    import zarrckpt

    rng = random.Random(rid)
    end = time.monotonic() + seconds
    counts = {"ok": 0, "race": 0}
    seen: set[tuple[int, int, int]] = set()
    while time.monotonic() < end:
        before = manifest_bytes(root)
        if before is None:
            time.sleep(0.01)
            continue
        steps = sorted(set(listed(before).values()))
        step = None if rng.random() < 0.5 else rng.choice(steps)
        try:
            tree = zarrckpt.load_pytree(root, step=step)
        except Exception as exc:
            after = manifest_bytes(root)
            changed = after != before
            if isinstance(exc, zarrckpt.CheckpointNotFoundError) and changed:
                counts["race"] += 1  # the step was dropped by a newer commit while read
                continue
            log(ev="fail", step=step, manifest_changed=changed, **_error(exc))
            continue
        got = identity(tree)
        bad = mismatch(tree, *got)
        if bad is None and step is not None and got[0] != step:
            bad = f"asked for step {step}, got the tree of step {got[0]}"
        if bad is not None:
            log(ev="fail", step=step, type="wrong data", msg=bad, got=list(got))
            continue
        counts["ok"] += 1
        if got not in seen:
            seen.add(got)
            log(ev="read", id=list(got))
    log(ev="summary", **counts)


def checker(root: str, out: Path, seconds: float, cid: int, log: Log) -> None:
    ref = set(json.loads((out / "ref.json").read_text()))
    end = time.monotonic() + seconds
    reported: set[str] = set()
    scans = 0
    while time.monotonic() < end:
        first = listed(manifest_bytes(root))
        gaps = {d: ref - step_files(os.path.join(root, d)) for d in first if d not in reported}
        still = listed(manifest_bytes(root))
        for name, missing in gaps.items():
            if missing and name in still:  # listed before and after the look: damaged
                reported.add(name)
                log(
                    ev="damage",
                    by="checker",
                    dir=name,
                    step=still[name],
                    n=len(missing),
                    missing=sorted(missing)[:10],
                )
        scans += 1
        time.sleep(0.005)
    log(ev="summary", scans=scans)


def gc_cli(root: str, out: Path, seconds: float, gid: int, log: Log) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        proc = subprocess.run(
            [sys.executable, "-m", "zarrckpt", "gc", "--json", root],
            capture_output=True,
            text=True,
            timeout=60,
        )
        _log_gc(log, proc.returncode, proc.stdout, proc.stderr)


def gc_inproc(root: str, out: Path, seconds: float, gid: int, log: Log) -> None:
    from zarrckpt.cli import main

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                rc = main(["gc", "--json", root])
            except Exception:
                rc, stderr = -1, io.StringIO(traceback.format_exc())
        _log_gc(log, rc, stdout.getvalue(), stderr.getvalue())
        time.sleep(0.002)


def _log_gc(log: Log, rc: int, stdout: str, stderr: str) -> None:
    if rc == 0:
        deleted = [item["name"] for item in json.loads(stdout)["garbage"]]
        log(ev="gc", deleted=deleted)
    else:
        log(ev="gc-error", rc=rc, msg=(stderr or stdout)[-1000:])


ROLES = {
    "writer": writer,
    "reader": reader,
    "checker": checker,
    "gc-cli": gc_cli,
    "gc-inproc": gc_inproc,
}


def main(argv: list[str]) -> None:
    role, root, out, seconds = argv[0], argv[1], Path(argv[2]), float(argv[3])
    ident = int(argv[4]) if len(argv) > 4 else 0
    name = f"{role}{ident}"
    fn = ROLES[role]
    if role != "gc-cli":
        import zarrckpt
        import zarrckpt.cli  # noqa: F401
    log = Log(out / f"{name}.jsonl")
    (out / f"ready.{name}").touch()
    deadline = time.monotonic() + 120
    while not (out / "go").exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{name}: no go signal")
        time.sleep(0.005)
    try:
        fn(root, out, seconds, ident, log)
    except Exception as exc:
        log(ev="crash", tb=traceback.format_exc()[-3000:], **_error(exc))
        raise
    log(ev="exit")


if __name__ == "__main__":
    main(sys.argv[1:])
