"""zarrckpt against the tools a BrainPy user could pick instead, on local disk.

    python benchmarks/bench_local.py --scenario loop   # the tutorial's loop (the headline)
    python benchmarks/bench_local.py --scenario loop --compare-with /tmp/zc-base  # + an older zarrckpt
    python benchmarks/bench_local.py --scenario changes  # saves that change part of the state
    python benchmarks/bench_local.py                   # fresh directories: save, cold load, leaf
    python benchmarks/bench_local.py --gib 4 --systems raw zarrckpt --repeats 1

**Loop** (``--scenario loop``): what BrainPy users do, the way they do it: save every epoch
into the same place with each system's defaults for keeping one checkpoint, ``--saves``
times (default 8). Each system runs in its own long-lived process (the training process),
writing its own root; the parent alternates the systems save by save, so disk noise hits
all of them alike. Reported: every save's time and the median of saves 2..N (the steady
state: everything the product deletes, recycles or leaves for the next save is paid
there). ``zarrckpt-async`` saves with an ``AsyncManager`` and a simulated epoch of
``--epoch-s`` seconds between saves: the time the caller is blocked, and whether a save
was still running when the next one was asked for. Systems:

* raw: overwrite one file with all bytes (``O_TRUNC``) + ``fsync``;
* safetensors: ``save_file`` over the previous file + ``syncfs``;
* orbax: ``CheckpointManager(max_to_keep=1)``, ``save`` + ``wait_until_finished`` + ``syncfs``;
* msgpack: ``braintools.file.msgpack_save`` (what ``bp.checkpoints`` calls) over the
  previous file + ``syncfs``;
* zarrckpt: ``save_pytree(root, state)`` with the defaults (it flushes by itself);
* zarrckpt-full: the same with ``incremental=False`` (every byte written again);
* zarrckpt@base (with ``--compare-with PATH``): ``zarrckpt`` imported from another checkout
  (``PYTHONPATH=PATH`` for that worker; e.g. ``git worktree add /tmp/zc-base <commit>``), with
  its defaults, to compare two versions side by side in one run.

Between saves the loop adds 1 to one row of each matrix (in place): every save writes changed
data, but with incremental saves (the default) only the chunk holding that row differs from
the previous step, one of four per matrix (64 MiB chunks); the small leaves do not change.
``zarrckpt-full`` is the loop's cost when every byte is written.

The state mimics an SNN: four float32 weight matrices (normal noise) holding ~94% of the
bytes, plus 2,000 small per-neuron leaves of 4-64 KiB (float32 potentials, bool spikes
~2% true, int32 spike counters), nested under module names.

Every operation runs in a fresh process (so peak RSS and import state do not leak between
systems), all systems in one invocation, alternating, and the table reports medians and
ratios to the raw disk figures:

* save: durable — each system's files are flushed to stable storage (``fsync`` / ``syncfs``,
  timed as part of the save; zarrckpt does this itself);
* load: cold — the checkpoint's pages are evicted (``posix_fadvise(DONTNEED)`` on every
  file, which needs no privileges) before the timed read;
* leaf: read one small leaf (cold) from the checkpoint, where the format allows it;
* extra RSS: peak resident memory above what the state itself needs.

**Changes** (``--scenario changes``): issue 18's profiles (every leaf, the small leaves, ~1%,
a brainstate network) with bytes written and root sizes: see ``bench_incremental.py``, which
runs it (the options after ``--scenario changes`` are its own).

**Fresh directories** (the default scenario): saves go to fresh directories and everything
is deleted at the end only, so these figures leave out the cost of deleting old
checkpoints (on this disk, creating files right after deleting many costs ~10x more, see
io-floors.md): the loop scenario is the one that includes it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MIB = 1024 * 1024
SYSTEMS = ["raw", "npsave", "zarrckpt", "safetensors", "orbax", "msgpack"]
SMALL_LEAF = ("layer01", "n0123", "V")


def _matrix_side(gib: float) -> int:
    return int(np.sqrt(gib * 1024 * MIB * 0.94 / 4 / 4))


def build_state(gib: float) -> dict:
    rng = np.random.default_rng(0)
    n = _matrix_side(gib)
    weights = {f"W{i}": rng.standard_normal((n, n), dtype=np.float32) for i in range(4)}
    neurons: dict = {}
    sizes = rng.integers(1024, 16 * 1024, size=2000 // 3 + 1)  # elements: 4-64 KiB as float32
    for i in range(2000 // 3 + 1):
        layer = neurons.setdefault(f"layer{i // 100:02d}", {})
        size = int(sizes[i])
        layer[f"n{i:04d}"] = {
            "V": rng.standard_normal(size).astype(np.float32),
            "spike": rng.random(size) < 0.02,
            "count": rng.poisson(0.5, size).astype(np.int32),
        }
    return {"net": {"weights": weights, "neurons": neurons}, "step": 0}


def flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flat(value, path))
        else:
            out[path] = np.asarray(value)
    return out


def nbytes(tree: dict) -> int:
    return sum(a.nbytes for a in flat(tree).values())


# --- durability and cache helpers -------------------------------------------------------------


def files_under(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]


def evict(path: str) -> None:
    for name in files_under(path):
        fd = os.open(name, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def syncfs(path: str) -> None:
    import ctypes

    fd = os.open(path, os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs")
    finally:
        os.close(fd)


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident set size of this process."""
    fields = dict(
        line.split(":", 1)
        for line in Path("/proc/self/status").read_text().splitlines()
        if ":" in line
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


# --- the systems ---------------------------------------------------------------------------------


def save(system: str, state: dict, path: str) -> None:
    if system == "raw":
        with open(path, "wb") as f:
            for array in flat(state).values():
                f.write(memoryview(np.ascontiguousarray(array)).cast("B"))
            f.flush()
            os.fsync(f.fileno())
    elif system == "npsave":
        os.makedirs(path)
        for i, array in enumerate(flat(state).values()):
            np.save(os.path.join(path, f"{i}.npy"), array)
        syncfs(path)
    elif system == "zarrckpt":
        import zarrckpt

        zarrckpt.save_pytree(path, state, verbose=False)
    elif system == "safetensors":
        from safetensors.numpy import save_file

        save_file(flat(state), path)
        syncfs(os.path.dirname(path))
    elif system == "orbax":
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(path, state)
            ckptr.wait_until_finished()
        syncfs(path)
    elif system == "msgpack":
        import braintools

        braintools.file.msgpack_save(path, state, verbose=False)
        syncfs(os.path.dirname(path))
    else:
        raise ValueError(system)


def load(system: str, path: str, like: dict | None) -> object:
    if system == "raw":
        size = os.path.getsize(path)
        buf = np.empty(size, dtype=np.uint8)
        view, done = memoryview(buf), 0
        with open(path, "rb", buffering=0) as f:
            while done < size:  # one read() returns at most ~2 GiB on Linux
                done += f.readinto(view[done:])
        return buf
    if system == "npsave":
        return [np.load(os.path.join(path, f"{i}.npy")) for i in range(len(os.listdir(path)))]
    if system == "zarrckpt":
        import zarrckpt

        return zarrckpt.load_pytree(path)
    if system == "safetensors":
        from safetensors.numpy import load_file

        return load_file(path)
    if system == "orbax":
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(path)
    if system == "msgpack":
        import braintools

        return braintools.file.msgpack_load(path, target=like, verbose=False)
    raise ValueError(system)


def load_leaf(system: str, path: str, leaf_index: int) -> object:
    key = "net/neurons/" + "/".join(SMALL_LEAF)
    if system == "npsave":
        return np.load(os.path.join(path, f"{leaf_index}.npy"))
    if system == "zarrckpt":
        import zarrckpt

        return zarrckpt.open_checkpoint(path)[key][:]
    if system == "safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            return f.get_tensor(key)
    if system == "orbax":
        import orbax.checkpoint as ocp

        net = {
            "neurons": {
                SMALL_LEAF[0]: {
                    SMALL_LEAF[1]: {SMALL_LEAF[2]: ocp.utils.to_shape_dtype_struct(np.zeros(1))}
                }
            }
        }
        with ocp.PyTreeCheckpointer() as ckptr:
            meta = ckptr.metadata(path)
            item = meta.item_metadata if hasattr(meta, "item_metadata") else meta
            leaf = item["net"]["neurons"][SMALL_LEAF[0]][SMALL_LEAF[1]][SMALL_LEAF[2]]
            net["neurons"][SMALL_LEAF[0]][SMALL_LEAF[1]][SMALL_LEAF[2]] = (
                ocp.utils.to_shape_dtype_struct(np.zeros(leaf.shape, leaf.dtype))
            )
            args = ocp.args.PyTreeRestore(
                item={"net": net}, restore_args={"net": net}, partial_restore=True
            )
            return ckptr.restore(path, args=args)
    return None  # raw and msgpack have no partial read: the whole file


# --- one measurement in a fresh process ------------------------------------------------------------


def warm_imports(system: str) -> None:
    """Import a system's modules before timing: the table compares I/O, not import time."""
    modules = {"zarrckpt": ["zarrckpt"], "safetensors": ["safetensors.numpy"],
               "orbax": ["orbax.checkpoint", "jax"], "msgpack": ["braintools"]}  # fmt: skip
    for name in modules.get(system, []):
        __import__(name)


def worker(args: argparse.Namespace) -> None:
    warm_imports(args.system)
    like = None  # every system loads without a target
    small = build_state(0)  # same small leaves, no matrices: cheap to build
    state_mib = (nbytes(small) + 4 * 4 * _matrix_side(args.gib) ** 2) / MIB
    state = build_state(args.gib) if args.op == "save" else None
    base, _ = rss_mib()
    reset_peak()
    if args.op == "save":
        start = time.perf_counter()
        save(args.system, state, args.path)
        seconds = time.perf_counter() - start
        extra = rss_mib()[1] - base
    elif args.op == "load":
        evict(args.path)
        start = time.perf_counter()
        out = load(args.system, args.path, like)
        seconds = time.perf_counter() - start
        extra = rss_mib()[1] - base - state_mib  # the loaded state itself is not overhead
        del out
    else:
        leaf_index = list(flat(small).keys()).index("net/neurons/" + "/".join(SMALL_LEAF))
        evict(args.path)
        start = time.perf_counter()
        out = load_leaf(args.system, args.path, leaf_index)
        seconds = time.perf_counter() - start if out is not None else float("nan")
        extra = float("nan")
    print(json.dumps({"seconds": seconds, "extra_mib": extra, "state_mib": state_mib}))


def run_one(system: str, op: str, path: str, gib: float) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--system",
        system,
        "--op",
        op,
        "--path",
        path,
        "--gib",
        str(gib),
    ]
    out = subprocess.run(
        cmd, check=True, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def target_path(root: str, system: str, rep: int) -> str:
    name = f"{system}-{rep}"
    if system in ("raw", "safetensors", "msgpack"):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        return os.path.join(root, name, "state.bin")
    return os.path.join(root, name)


# --- the loop scenario -----------------------------------------------------------------------

LOOP_SYSTEMS = [
    "raw",
    "safetensors",
    "orbax",
    "msgpack",
    "zarrckpt",
    "zarrckpt-full",
    "zarrckpt-async",
]
BASE = "zarrckpt@base"  # --compare-with: zarrckpt imported from another checkout


class LoopSaver:
    """One system's way of keeping the latest checkpoint in one place, in one process."""

    def __init__(self, system: str, root: str, epoch_s: float) -> None:
        self.system, self.root, self.epoch_s = system, root, epoch_s
        os.makedirs(root, exist_ok=True)
        self.file = os.path.join(root, "state.bin")
        self.manager = None
        if system == "orbax":
            import orbax.checkpoint as ocp

            options = ocp.CheckpointManagerOptions(max_to_keep=1)
            self.manager = ocp.CheckpointManager(os.path.join(root, "orbax"), options=options)
        elif system == "zarrckpt-async":
            import zarrckpt

            self.manager = zarrckpt.AsyncManager()
        self.pending_since: float | None = None

    def save(self, step: int, state: dict) -> dict:
        start = time.perf_counter()
        extra: dict = {}
        if self.system == "raw":
            save("raw", state, self.file)
        elif self.system == "safetensors":
            from safetensors.numpy import save_file

            save_file(flat(state), self.file)
            syncfs(self.root)
        elif self.system == "orbax":
            import orbax.checkpoint as ocp

            self.manager.save(step, args=ocp.args.StandardSave(state))
            self.manager.wait_until_finished()
            syncfs(self.root)
        elif self.system == "msgpack":
            import braintools

            braintools.file.msgpack_save(self.file, state, overwrite=True, verbose=False)
            syncfs(self.root)
        elif self.system in ("zarrckpt", BASE):
            import zarrckpt

            zarrckpt.save_pytree(os.path.join(self.root, "ckpt"), state, verbose=False)
        elif self.system == "zarrckpt-full":
            import zarrckpt

            zarrckpt.save_pytree(
                os.path.join(self.root, "ckpt"), state, verbose=False, incremental=False
            )
        elif self.system == "zarrckpt-async":
            import zarrckpt

            future = getattr(self.manager, "_future", None)
            extra["queued"] = bool(future is not None and not future.done())
            zarrckpt.save_pytree(
                os.path.join(self.root, "ckpt"), state, async_manager=self.manager, verbose=False
            )
        seconds = time.perf_counter() - start
        if self.system == "zarrckpt-async":
            time.sleep(self.epoch_s)  # the next epoch's training, while the save runs
        return {"seconds": seconds, **extra}

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()


def loop_worker(args: argparse.Namespace) -> None:
    """Serve ``save N`` lines on stdin for one system; print one JSON line per save."""
    warm_imports(re.split("[-@]", args.system)[0])
    if args.system == "orbax":
        warm_imports("orbax")
    state = build_state(args.gib)
    saver = LoopSaver(args.system, args.path, args.epoch_s)
    version = None
    if args.system.startswith("zarrckpt"):
        import zarrckpt

        version = os.path.dirname(os.path.dirname(os.path.abspath(zarrckpt.__file__)))
    print(json.dumps({"ready": True, "zarrckpt": version}), flush=True)
    for line in sys.stdin:
        if not line.startswith("save"):
            break
        step = int(line.split()[1])
        state["step"] = step
        for array in state["net"]["weights"].values():
            array[step % array.shape[0]] += 1.0  # every save writes changed data
        print(json.dumps(saver.save(step, state)), flush=True)
    saver.close()


def run_loop(args: argparse.Namespace) -> None:
    root = tempfile.mkdtemp(prefix="zarrckpt-loop-", dir=args.dir or os.getcwd())
    procs = {}
    try:
        for system in args.systems:
            cmd = [sys.executable, __file__, "--loop-worker", "--system", system, "--path",
                   os.path.join(root, system), "--gib", str(args.gib), "--epoch-s", str(args.epoch_s)]  # fmt: skip
            env = {**os.environ, "JAX_PLATFORMS": "cpu"}
            if system == BASE:  # PYTHONPATH comes before the editable install's finder
                env["PYTHONPATH"] = os.pathsep.join(
                    filter(None, [os.path.abspath(args.compare_with), env.get("PYTHONPATH")])
                )
            procs[system] = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
            )
        for system, proc in procs.items():
            ready = json.loads(proc.stdout.readline())
            assert ready.get("ready"), system
            if ready.get("zarrckpt"):
                where = ready["zarrckpt"]
                print(f"# {system} imports zarrckpt from {where}", file=sys.stderr)
                if system == BASE:
                    assert os.path.samefile(where, args.compare_with), where
        results: dict[str, list[dict]] = {s: [] for s in args.systems}
        for step in range(args.saves):
            for system, proc in procs.items():  # alternate, save by save
                proc.stdin.write(f"save {step}\n")
                proc.stdin.flush()
                result = json.loads(proc.stdout.readline())
                results[system].append(result)
                print(f"# save {step} {system:15s} {result['seconds']:.3f} s", file=sys.stderr)
        for proc in procs.values():
            proc.stdin.write("quit\n")
            proc.stdin.flush()
            proc.wait(600)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        if not args.keep_dir:
            shutil.rmtree(root, ignore_errors=True)
    report_loop(results, args)


def report_loop(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    steady = {s: statistics.median(r["seconds"] for r in rs[1:]) for s, rs in results.items()}
    base = steady.get(BASE)
    raw = steady.get("raw")
    where = args.dir or "the current directory's disk"
    print(f"\nLoop: {args.saves} saves into one root per system with default arguments, "
          f"{args.gib} GiB state (4 matrices + 2,001 small leaves), on {where}; "
          "median of saves 2..N; systems alternate save by save.\n")  # fmt: skip
    head, rule = "| system | s per save (median 2..N) | / raw |", "|---|---|---|"
    if base:
        head, rule = head + f" / {BASE} |", rule + "---|"
    print(head + " every save, s |")
    print(rule + "---|")
    for system, rs in results.items():
        ratio = f"{steady[system] / raw:.2f}x" if raw else "-"
        every = " ".join(f"{r['seconds']:.2f}" for r in rs)
        name = system
        if system == "zarrckpt-async":
            queued = sum(r.get("queued", False) for r in rs[1:])
            name = (f"zarrckpt + AsyncManager (caller blocked; {args.epoch_s:g} s epochs, "
                    f"{queued}/{len(rs) - 1} saves found the previous one still running)")  # fmt: skip
        if system == BASE:
            name = f"{BASE} ({args.compare_with})"
        vs_base = f" {steady[system] / base:.2f}x |" if base else ""
        print(f"| {name} | {steady[system]:.2f} | {ratio} |{vs_base} {every} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--systems", nargs="+", default=None, choices=SYSTEMS + LOOP_SYSTEMS[-2:])
    parser.add_argument(
        "--dir", default=None, help="where checkpoints go (default: a temp dir under the cwd)"
    )
    parser.add_argument("--scenario", choices=["fresh", "loop", "changes"], default="fresh")
    parser.add_argument(
        "--compare-with",
        default=None,
        metavar="PATH",
        help=f"loop: add a system {BASE!r} importing zarrckpt from the checkout at PATH",
    )
    parser.add_argument("--saves", type=int, default=8, help="loop: saves per system")
    parser.add_argument(
        "--epoch-s", type=float, default=3.0, help="loop: seconds between async saves"
    )
    parser.add_argument("--keep-dir", action="store_true", help="loop: keep the checkpoints")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loop-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    parser.add_argument("--op", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    argv = " ".join(sys.argv[1:]).replace("--scenario=", "--scenario ")
    if re.search(r"(^| )--scenario changes( |$)", argv):  # bench_incremental has its own options
        import bench_incremental

        return bench_incremental.main(re.sub(r"(^| )--scenario changes( |$)", " ", argv).split())
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.loop_worker:
        return loop_worker(args)
    if args.scenario == "loop":
        args.systems = args.systems or LOOP_SYSTEMS
        if args.compare_with and BASE not in args.systems:
            args.systems.append(BASE)
        return run_loop(args)
    args.systems = args.systems or SYSTEMS

    root = tempfile.mkdtemp(prefix="zarrckpt-bench-", dir=args.dir or os.getcwd())
    results: dict[str, dict[str, list[float]]] = {s: {} for s in args.systems}
    state_mib = 0.0
    try:
        for rep in range(args.repeats):
            for system in args.systems:  # alternate systems within each repeat
                path = target_path(root, system, rep)
                for op in ("save", "load", "leaf"):
                    if op == "leaf" and system in ("raw", "msgpack"):
                        continue
                    r = run_one(system, op, path, args.gib)
                    state_mib = r["state_mib"]
                    results[system].setdefault(op, []).append(r["seconds"])
                    results[system].setdefault(op + "_mem", []).append(r["extra_mib"])
                    print(
                        f"# rep {rep} {system:12s} {op:5s} {r['seconds']:.3f} s, extra RSS {r['extra_mib']:.0f} MiB",
                        file=sys.stderr,
                    )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(results, state_mib, args)


def report(results: dict, state_mib: float, args: argparse.Namespace) -> None:
    med = {s: {op: statistics.median(v) for op, v in ops.items()} for s, ops in results.items()}
    raw = med.get("raw", {})
    print(f"\nState: {state_mib / 1024:.2f} GiB ({args.gib} GiB requested), 4 matrices + 2,001 small leaves; "
          f"median of {args.repeats}; local disk; durable saves, cold loads (fadvise DONTNEED).\n")  # fmt: skip
    print(
        "| system | save s | save / raw | load s | load / raw | one small leaf | extra RSS save | extra RSS load |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for system in args.systems:
        m = med[system]

        def ratio(op: str, m: dict = m) -> str:
            return f"{m[op] / raw[op]:.2f}x" if raw.get(op) else "-"

        leaf = (
            f"{m['leaf'] * 1000:.1f} ms" if "leaf" in m and m["leaf"] == m["leaf"] else "whole file"
        )
        print(
            f"| {system} | {m['save']:.2f} | {ratio('save')} | {m['load']:.2f} | {ratio('load')} | {leaf} "
            f"| {m['save_mem'] / state_mib:.2f}x ({m['save_mem']:.0f} MiB) | {m['load_mem'] / state_mib:.2f}x ({m['load_mem']:.0f} MiB) |"
        )


if __name__ == "__main__":
    main()
