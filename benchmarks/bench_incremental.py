"""Saves that cost what changed (issue 18): a save loop where only part of the state changes.

    python benchmarks/bench_incremental.py                       # local disk, 1 GiB, 7 saves
    python benchmarks/bench_incremental.py --gib 0.05 --saves 3  # a quick check
    python benchmarks/bench_incremental.py --part s3             # moto: requests, bytes uploaded
    python benchmarks/bench_local.py --scenario changes          # the same local part

**Local part.** The user's way: one root per system, the defaults, ``--saves`` saves (default 7)
in one long-lived process per system (the training or simulation process), the state mutated
between saves. The parent alternates the systems save by save, rotating their order each round,
so disk noise and one system's dirty pages hit all alike.
Profiles:

* ``every``: every leaf changes (training): the four matrices and all 2,001 small leaves;
* ``small``: only the 2,001 small leaves change (a simulation with fixed weights);
* ``1pct``: 330 small leaves change (~1% of the bytes);
* ``brainstate``: a brainstate / ``brainpy.state`` E/I network (LIFRef + two AlignPostProj, dense
  ``Linear`` weights as ``ParamState`` of ~0.3 x ``--gib`` GiB, membrane potentials, conductances
  and spike times as ``HiddenState`` / ``ShortTermState``) simulated ``--sim-steps`` steps with
  ``brainstate.transform.for_loop`` between saves; ``net.states()`` is saved each time.

The first three come with NumPy leaves (mutated in place, as a NumPy user does) and with JAX
leaves (changed leaves are new ``jax.Array`` objects; unchanged leaves keep their very objects).
The state is ``bench_local.build_state``: four float32 matrices (~94% of the bytes) and 2,001
small per-neuron leaves of 4-64 KiB.

Systems: ``raw`` (one file overwritten with all bytes + ``fsync``: the disk's reference),
``zarrckpt`` (``save_pytree(root, state)``, defaults: incremental), ``zarrckpt-full``
(``incremental=False``), ``orbax`` (``CheckpointManager(max_to_keep=1)`` + ``syncfs``).

Per save, measured inside the saving process: seconds (median of saves 2..N); ``write_bytes``
from ``/proc/self/io`` (bytes the process sent toward the disk: it counts pages dirtied in the
page cache, once per page however often rewritten before write-back, and not hard links);
``wchar`` (bytes passed to ``write``-like calls); the bytes the profile changed. After the
loop: the root's size, each inode counted once (hard links shared by steps count once), as
``du`` does: allocated (``st_blocks``) and apparent (``st_size``), hidden spares included.

**S3 part** (``--part s3``): profile ``1pct`` on a moto server for a smaller state
(``--s3-gib``, default 1/16: the same structure, every leaf 1/16 of its local size, ~64 MiB),
zarrckpt with ``incremental`` on and off, through obstore (the default client) and s3fs.
Requests and uploaded bytes are counted at the server: moto's app runs under waitress behind a
WSGI wrapper that logs every request with the request-body bytes moto read (``PUT`` with an
``x-amz-copy-source`` header is logged as ``COPY``: a server-side copy uploads no data).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE)]
from bench_local import MIB, _matrix_side, flat, syncfs  # noqa: E402

PROFILES = ["every", "small", "1pct", "brainstate"]
KINDS = ["numpy", "jax"]
SYSTEMS = ["raw", "zarrckpt", "zarrckpt-full", "orbax"]
ONE_PCT_LEAVES = 330


# --- the states and what changes between saves ----------------------------------------------


def build_state(gib: float, small_scale: float = 1.0) -> dict:
    """``bench_local.build_state``, with every small leaf scaled by ``small_scale``."""
    rng = np.random.default_rng(0)
    n = _matrix_side(gib)
    weights = {f"W{i}": rng.standard_normal((n, n), dtype=np.float32) for i in range(4)}
    neurons: dict = {}
    sizes = rng.integers(1024, 16 * 1024, size=2000 // 3 + 1)
    for i in range(2000 // 3 + 1):
        layer = neurons.setdefault(f"layer{i // 100:02d}", {})
        size = max(16, int(int(sizes[i]) * small_scale))
        layer[f"n{i:04d}"] = {
            "V": rng.standard_normal(size).astype(np.float32),
            "spike": rng.random(size) < 0.02,
            "count": rng.poisson(0.5, size).astype(np.int32),
        }
    return {"net": {"weights": weights, "neurons": neurons}, "step": 0}


def small_leaves(state: dict) -> list[tuple[dict, str]]:
    """(container, key) of each small leaf, in a fixed order."""
    return [
        (neuron, key)
        for layer in state["net"]["neurons"].values()
        for neuron in layer.values()
        for key in ("V", "spike", "count")
    ]


def _changed(value, use_jax: bool):
    """``value`` with every element changed: in place for NumPy, a new array for JAX (made
    on the host and put on the device: one XLA program per leaf shape would compile for
    minutes)."""
    if use_jax:
        import jax

        return jax.device_put(_changed(np.array(value), False))
    if value.dtype == np.bool_:
        np.logical_not(value, out=value)
    else:
        value += 1 if value.dtype.kind == "i" else 1e-3
    return value


class ArrayState:
    """The SNN-like state of ``bench_local`` and one of the profiles' mutations."""

    def __init__(self, profile: str, kind: str, gib: float, small_scale: float = 1.0) -> None:
        self.profile, self.jax = profile, kind == "jax"
        self.tree = build_state(gib, small_scale)
        if self.jax:
            import jax

            self.tree = jax.tree_util.tree_map(jax.device_put, self.tree)
            self.tree["step"] = 0
        leaves = small_leaves(self.tree)
        if profile == "every":
            self.targets = [(self.tree["net"]["weights"], k) for k in self.tree["net"]["weights"]]
            self.targets += leaves
        elif profile == "small":
            self.targets = leaves
        elif profile == "1pct":
            self.targets = leaves[:ONE_PCT_LEAVES]
        else:
            raise ValueError(profile)

    def mutate(self, step: int) -> int:
        """Change the profile's leaves; the bytes changed."""
        changed = 0
        for container, key in self.targets:
            container[key] = _changed(container[key], self.jax)
            changed += container[key].nbytes
        self.tree["step"] = step
        return changed

    def for_zarrckpt(self):
        return self.tree

    def plain(self) -> dict:
        return self.tree


class BrainstateState:
    """An E/I network of ``brainpy.state`` neurons with dense brainstate ``Linear`` weights."""

    def __init__(self, gib: float, sim_steps: int) -> None:
        import brainpy
        import brainstate
        import brainunit as u

        brainstate.environ.set(dt=0.1 * u.ms)
        n = max(100, int(np.sqrt(0.3 * gib * 1024 * MIB / 4)))
        ne = int(0.8 * n)
        self.sim_steps, self.t = sim_steps, 0
        brainstate.random.seed(0)

        class EINet(brainstate.nn.Module):
            def __init__(self):
                super().__init__()
                self.N = brainpy.state.LIFRef(
                    n, V_rest=-60.0 * u.mV, V_th=-50.0 * u.mV, V_reset=-60.0 * u.mV,
                    tau=20.0 * u.ms, tau_ref=5.0 * u.ms,
                    V_initializer=brainstate.nn.init.Normal(-55.0, 2.0, unit=u.mV),
                )  # fmt: skip

                def dense(n_pre, weight):
                    mask = brainstate.random.rand(n_pre, n) < 0.1
                    w = u.math.where(mask, weight, 0.0) * u.mS
                    return brainstate.nn.Linear(n_pre, n, w_init=w, b_init=None)

                self.E = brainpy.state.AlignPostProj(
                    comm=dense(ne, 0.6), syn=brainpy.state.Expon.desc(n, tau=5.0 * u.ms),
                    out=brainpy.state.COBA.desc(E=0.0 * u.mV), post=self.N,
                )  # fmt: skip
                self.I = brainpy.state.AlignPostProj(
                    comm=dense(n - ne, 6.7), syn=brainpy.state.Expon.desc(n, tau=10.0 * u.ms),
                    out=brainpy.state.COBA.desc(E=-80.0 * u.mV), post=self.N,
                )  # fmt: skip

            def update(self, i):
                with brainstate.environ.context(i=i, t=i * brainstate.environ.get_dt()):
                    spk = self.N.get_spike() != 0.0
                    self.E(spk[:ne].astype(float))
                    self.I(spk[ne:].astype(float))
                    self.N(20.0 * u.mA)
                    return self.N.get_spike()

        self.net = EINet()
        brainstate.nn.init_all_states(self.net)
        self.brainstate = brainstate
        self.previous = self._leaves()

    def _leaves(self) -> dict[str, object]:
        """Each state's arrays by a plain name (units dropped), the objects themselves."""
        import jax

        out = {}
        for i, (path, state) in enumerate(sorted(self.net.states().items(), key=str)):
            parts = jax.tree_util.tree_leaves(
                state.value, is_leaf=lambda x: type(x).__name__ == "Quantity"
            )
            for j, leaf in enumerate(parts):
                out[f"s{i:03d}_{j}_{path[-1]}"] = getattr(leaf, "mantissa", leaf)
        return out

    def mutate(self, step: int) -> int:
        """Simulate; the bytes of the leaves whose value changed."""
        self.brainstate.transform.for_loop(
            self.net.update, np.arange(self.t, self.t + self.sim_steps)
        ).block_until_ready()
        self.t += self.sim_steps
        now, changed = self._leaves(), 0
        for name, leaf in now.items():
            old = self.previous[name]
            if leaf is not old and not np.array_equal(np.asarray(leaf), np.asarray(old)):
                changed += leaf.nbytes
        self.previous = now
        return changed

    def for_zarrckpt(self):
        return self.net.states()  # as a user saves it: the States themselves

    def plain(self) -> dict:
        return self.previous


def make_state(profile: str, kind: str, gib: float, sim_steps: int):
    if profile == "brainstate":
        return BrainstateState(gib, sim_steps)
    return ArrayState(profile, kind, gib)


def state_bytes(state) -> int:
    return sum(np.asarray(a).nbytes for a in flat(state.plain()).values())


# --- measurements inside the saving process ---------------------------------------------------


def proc_io() -> dict[str, int]:
    """This process's (all threads') I/O counters."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {k: int(v) for k, v in fields.items()}


def root_size(root: str) -> dict[str, int]:
    """Allocated and apparent bytes under ``root``, each inode once (``du``), files counted."""
    seen, allocated, apparent, files = set(), 0, 0, 0
    stack = [root]
    while stack:
        for entry in os.scandir(stack.pop()):
            st = entry.stat(follow_symlinks=False)
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            allocated += st.st_blocks * 512
            apparent += st.st_size
            files += 1
    return {"allocated": allocated, "apparent": apparent, "inodes": files}


class Saver:
    """One system's way of keeping the latest checkpoint in one root, in one process."""

    def __init__(self, system: str, root: str) -> None:
        self.system, self.root = system, root
        os.makedirs(root, exist_ok=True)
        self.manager = None
        if system == "orbax":
            import orbax.checkpoint as ocp

            options = ocp.CheckpointManagerOptions(max_to_keep=1)
            self.manager = ocp.CheckpointManager(os.path.join(root, "orbax"), options=options)
        elif system.startswith("zarrckpt"):
            import zarrckpt  # noqa: F401 - imported before timing

    def save(self, step: int, state) -> None:
        if self.system == "raw":
            with open(os.path.join(self.root, "state.bin"), "wb") as f:
                for array in flat(state.plain()).values():
                    f.write(memoryview(np.ascontiguousarray(array)).cast("B"))
                f.flush()
                os.fsync(f.fileno())
        elif self.system == "orbax":
            import orbax.checkpoint as ocp

            self.manager.save(step, args=ocp.args.StandardSave(state.plain()))
            self.manager.wait_until_finished()
            syncfs(self.root)
        elif self.system.startswith("zarrckpt"):
            import zarrckpt

            zarrckpt.save_pytree(
                os.path.join(self.root, "ckpt"), state.for_zarrckpt(), verbose=False,
                incremental=self.system == "zarrckpt",
            )  # fmt: skip
        else:
            raise ValueError(self.system)

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()


def worker(args: argparse.Namespace) -> None:
    """Serve ``save N`` / ``size`` lines on stdin for one system; one JSON line each."""
    if args.kind == "jax" or args.profile == "brainstate" or args.system == "orbax":
        import jax  # noqa: F401 - imported before timing
    state = make_state(args.profile, args.kind, args.gib, args.sim_steps)
    saver = Saver(args.system, args.path)
    print(json.dumps({"ready": True, "state_bytes": state_bytes(state)}), flush=True)
    for line in sys.stdin:
        if line.startswith("save"):
            step = int(line.split()[1])
            changed = state.mutate(step) if step else state_bytes(state)
            before, cpu, start = proc_io(), time.process_time(), time.perf_counter()
            usage = resource.getrusage(resource.RUSAGE_SELF)
            saver.save(step, state)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            after, usage_after = proc_io(), resource.getrusage(resource.RUSAGE_SELF)
            delta = {k: after[k] - before[k] for k in after}
            for field in ("ru_majflt", "ru_minflt"):  # (major: paged back in from disk)
                delta[field[3:]] = getattr(usage_after, field) - getattr(usage, field)
            out = {"seconds": seconds, "cpu": cpu, "changed": changed, "at": time.time(), **delta}
            print(json.dumps(out), flush=True)
        elif line.startswith("size"):
            print(json.dumps(root_size(args.path)), flush=True)
        else:
            break
    saver.close()


# --- the local part: parent ---------------------------------------------------------------------


def spawn(args: argparse.Namespace, system: str, profile: str, kind: str, root: str):
    cmd = [sys.executable, __file__, "--worker", "--system", system, "--profile", profile,
           "--kind", kind, "--path", os.path.join(root, f"{profile}-{kind}", system),
           "--gib", str(args.gib), "--sim-steps", str(args.sim_steps)]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def ask(proc, line: str) -> dict:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    out = proc.stdout.readline()
    if not out:
        raise RuntimeError(f"worker died answering {line!r} (rc {proc.wait()})")
    return json.loads(out)


#: Disk each system's root may hold at the end of a run, in states' worth (every root is kept
#: until the end): raw 1, zarrckpt and incremental=False up to 2 (a step and its spare),
#: orbax up to 2 (the kept step and the one being written).
_ROOTS_PER_STATE = {"raw": 1, "zarrckpt": 2, "zarrckpt-full": 2, "orbax": 2}


def _check_disk(args: argparse.Namespace, where: str) -> None:
    """Stop before the first save if the disk cannot hold every root of the run."""
    runs = sum(1 if p == "brainstate" else len(args.kinds) for p in args.profiles)
    need = runs * sum(_ROOTS_PER_STATE[s] for s in args.systems) * args.gib * 2**30 * 1.05
    free = shutil.disk_usage(where).free
    if free < need:
        sys.exit(
            f"bench_incremental: this run keeps up to {need / 2**30:.1f} GiB of roots on "
            f"{where}, which has {free / 2**30:.1f} GiB free; pass --dir on a larger disk, "
            "fewer --profiles/--kinds/--systems, or a smaller --gib"
        )


def run_local(args: argparse.Namespace) -> None:
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    _check_disk(args, args.dir or os.getcwd())
    root = tempfile.mkdtemp(prefix="zarrckpt-changes-", dir=args.dir or os.getcwd())
    results: dict[tuple[str, str], dict] = {}
    try:
        for profile in args.profiles:
            for kind in ["jax"] if profile == "brainstate" else args.kinds:
                procs = {s: spawn(args, s, profile, kind, root) for s in args.systems}
                try:
                    ready = {s: json.loads(p.stdout.readline()) for s, p in procs.items()}
                    saves: dict[str, list[dict]] = {s: [] for s in args.systems}
                    for step in range(args.saves):
                        # Alternate save by save, and rotate the order each round: a system
                        # that always ran right after the same one would always meet that
                        # one's dirty pages (or its syncfs) on the disk.
                        shift = step % len(procs)
                        order = list(procs)[shift:] + list(procs)[:shift]
                        for system in order:
                            r = ask(procs[system], f"save {step}")
                            saves[system].append(r)
                            print(f"# {profile:10s} {kind:5s} save {step} {system:13s} "
                                  f"{r['seconds']:.3f} s, write_bytes {r['write_bytes'] / MIB:.1f} MiB, "
                                  f"changed {r['changed'] / MIB:.1f} MiB, cpu {r['cpu']:.3f} s, "
                                  f"faults {r['majflt']} major {r['minflt']} minor",
                                  file=sys.stderr)  # fmt: skip
                    sizes = {s: ask(p, "size") for s, p in procs.items()}
                    for proc in procs.values():
                        proc.stdin.write("quit\n")
                        proc.stdin.flush()
                        proc.wait(600)
                finally:
                    for proc in procs.values():
                        if proc.poll() is None:
                            proc.kill()
                state_bytes_ = next(iter(ready.values()))["state_bytes"]
                results[(profile, kind)] = {"saves": saves, "sizes": sizes, "state": state_bytes_}
                if args.json:
                    Path(args.json).write_text(json.dumps({f"{p}/{k}": v for (p, k), v in results.items()}))  # fmt: skip
    finally:
        # Deleting ~10^4 inodes slows this disk's next creations for minutes (io-floors.md):
        # every root is deleted at the end, outside the timed saves.
        if not args.keep_dir:
            shutil.rmtree(root, ignore_errors=True)
    report_local(results, args)


def _med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows[1:] or rows)


PROFILE_NAMES = {
    "every": "every leaf changes (training)",
    "small": "the 2,001 small leaves change (simulation, fixed weights)",
    "1pct": f"{ONE_PCT_LEAVES} small leaves change (~1% of the bytes)",
    "brainstate": "brainstate network simulated between saves, `net.states()` saved",
}


def report_local(results: dict, args: argparse.Namespace) -> None:
    where = args.dir or "the current directory's disk"
    print(f"\nChanges: {args.saves} saves into one root per system, default arguments, on {where}; "
          "one long-lived process per system, systems alternating save by save in an order "
          "rotated each round; per save the "
          "median of saves 2..N; `write_bytes`/`wchar` from /proc/self/io of the saving process; "
          "root after the loop, each inode once (allocated; apparent in brackets).\n")  # fmt: skip
    summary = []
    for (profile, kind), res in results.items():
        saves, sizes = res["saves"], res["sizes"]
        raw = saves.get("raw")
        raw_s = _med(raw, "seconds") if raw else None
        changed = _med(next(iter(saves.values())), "changed")
        title = PROFILE_NAMES[profile] + ("" if profile == "brainstate" else f", {kind} leaves")
        print(f"**{title}**: state {res['state'] / MIB:,.0f} MiB, changed per save "
              f"{changed / MIB:,.2f} MiB\n")  # fmt: skip
        print("| system | s per save | / raw | write_bytes MiB | / changed | wchar MiB "
              "| CPU s | root MiB after | every save, s |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        for system, rows in saves.items():
            s, wb, wc = _med(rows, "seconds"), _med(rows, "write_bytes"), _med(rows, "wchar")
            size = sizes[system]
            ratio = f"{s / raw_s:.2f}x" if raw_s else "-"
            every = " ".join(f"{r['seconds']:.2f}" for r in rows)
            print(f"| {system} | {s:.3f} | {ratio} | {wb / MIB:,.1f} | {wb / changed:.2f}x "
                  f"| {wc / MIB:,.1f} | {_med(rows, 'cpu'):.2f} | {size['allocated'] / MIB:,.0f} "
                  f"({size['apparent'] / MIB:,.0f}) | {every} |")  # fmt: skip
        print()
        if "zarrckpt" in saves:
            inc = saves["zarrckpt"]
            full = saves.get("zarrckpt-full")
            summary.append((profile, kind, _med(inc, "seconds"), raw_s,
                            _med(full, "seconds") if full else None,
                            _med(inc, "write_bytes"), changed))  # fmt: skip
    if summary:
        print("**Against issue 18's targets** (zarrckpt, incremental default):\n")
        print(
            "| profile | leaves | s per save | / raw | / incremental=False | write_bytes / changed |"
        )
        print("|---|---|---|---|---|---|")
        for profile, kind, s, raw_s, full_s, wb, changed in summary:
            r = f"{s / raw_s:.2f}x" if raw_s else "-"
            f = f"{s / full_s:.2f}x" if full_s else "-"
            print(f"| {profile} | {kind} | {s:.3f} | {r} | {f} | {wb / changed:.2f}x |")
        print("\nTargets: `1pct` <= 0.15 s per save and <= 3x the changed bytes; `every` within "
              "1.1x of incremental=False.")  # fmt: skip


# --- the S3 part ---------------------------------------------------------------------------------


def moto_server(port: int) -> None:
    """moto's S3 app under waitress; one line per request: method, key, body bytes read."""
    import waitress
    from moto.server import DomainDispatcherApplication, create_backend_app

    class Counting:
        def __init__(self, stream):
            self.stream, self.n = stream, 0

        def read(self, *a):
            data = self.stream.read(*a)
            self.n += len(data)
            return data

        def readline(self, *a):
            data = self.stream.readline(*a)
            self.n += len(data)
            return data

        def readlines(self, *a):
            lines = self.stream.readlines(*a)
            self.n += sum(map(len, lines))
            return lines

        def __iter__(self):
            for line in self.stream:
                self.n += len(line)
                yield line

    app = DomainDispatcherApplication(create_backend_app)

    def logged(environ, start_response):
        body = environ["wsgi.input"] = Counting(environ["wsgi.input"])
        method = environ["REQUEST_METHOD"]
        if method == "PUT" and environ.get("HTTP_X_AMZ_COPY_SOURCE"):
            method = "COPY"
        target = environ.get("RAW_URI") or environ["PATH_INFO"]
        if environ.get("QUERY_STRING") and "?" not in target:
            target += "?" + environ["QUERY_STRING"]

        def start(status, headers, exc_info=None):
            line = f"{method} {target} {status[:3]} {body.n}\n"
            os.write(1, line.encode())  # one write per line (O_APPEND): whole lines
            return start_response(status, headers, exc_info)

        return app(environ, start)

    waitress.serve(logged, host="127.0.0.1", port=port, threads=8, connection_limit=4096,
                   backlog=1024, _quiet=True)  # fmt: skip


class ServerLog:
    """The requests logged for one bucket since :meth:`mark`."""

    def __init__(self, path: str) -> None:
        self.path, self.offset = path, 0

    def _size(self) -> int:
        size, stable_since = -1, time.monotonic()
        while time.monotonic() - stable_since < 0.05:  # lines come right after each answer
            now = os.path.getsize(self.path)
            if now != size:
                size, stable_since = now, time.monotonic()
            time.sleep(0.01)
        return size

    def mark(self) -> None:
        self.offset = self._size()

    def since(self, bucket: str) -> list[tuple[str, str, int]]:
        end = self._size()
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            text = fh.read(end - self.offset).decode(errors="replace")
        pattern = re.compile(rf"^([A-Z]+) /{re.escape(bucket)}([/?]\S*|) \d+ (\d+)$")
        return [(m[1], m[2], int(m[3])) for line in text.splitlines() if (m := pattern.match(line))]


def _what(method: str, target: str) -> str:
    """What a request's body is, from its method and target (``/key?query`` in the bucket)."""
    key, _, query = target.partition("?")
    if method == "POST" and query.startswith("delete"):
        return "delete lists"
    parts = key.strip("/").split("/")
    if len(parts) <= 2:
        return "root documents"  # the manifest, the root zarr.json, leases
    if len(parts) == 3 and parts[-1] == "zarr.json":
        return "step record"
    return "zarr.json" if parts[-1] == "zarr.json" else "chunks"


def run_s3(args: argparse.Namespace) -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    sys.path.insert(0, str(REPO / "tests"))
    import s3fs
    from servers import s3_options, serve, stop

    import zarrckpt

    log_path = os.path.join(tempfile.mkdtemp(), "moto.log")
    proc, endpoint, log = serve([sys.executable, __file__, "--moto-server"], "/moto-api/", log_path)
    server = ServerLog(log_path)
    options = s3_options(endpoint)
    rows = []
    try:
        maker = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        for backend in args.backends:
            for incremental in (True, False):
                state = ArrayState("1pct", "numpy", args.s3_gib, small_scale=args.s3_gib)
                total = state_bytes(state)
                bucket = "b-" + uuid.uuid4().hex[:12]
                maker.mkdir(bucket)
                opts = {**options, "backend": backend}
                per_save = []
                for step in range(args.saves):
                    changed = state.mutate(step) if step else total
                    server.mark()
                    start = time.perf_counter()
                    zarrckpt.save_pytree(f"s3://{bucket}/run", state.tree, storage_options=opts,
                                         verbose=False, incremental=incremental)  # fmt: skip
                    seconds = time.perf_counter() - start
                    requests = server.since(bucket)
                    per_save.append((seconds, changed, requests))
                    up = sum(n for _, _, n in requests)
                    print(f"# s3 {backend} incremental={incremental} save {step}: {seconds:.2f} s, "
                          f"{len(requests)} requests, {up / MIB:.2f} MiB uploaded, "
                          f"changed {changed / MIB:.2f} MiB", file=sys.stderr)  # fmt: skip
                rows.append((backend, incremental, total, per_save))
    finally:
        stop(proc, log)
    report_s3(rows, args)


def report_s3(rows: list, args: argparse.Namespace) -> None:
    total = rows[0][2]
    print(f"\nS3 (moto under waitress, loopback): profile `1pct` ({ONE_PCT_LEAVES} of 2,001 small "
          f"leaves change), state {total / MIB:.1f} MiB (4 matrices + 2,001 small leaves at "
          f"{args.s3_gib:g} of their local size), {args.saves} saves into one root; per save the "
          "median of saves 2..N, counted at the server.\n")  # fmt: skip
    print("| client | incremental | s per save | requests (by method) | MiB uploaded | / changed "
          "| request bodies: chunks / group+array zarr.json / step record / root documents / "
          "delete lists (KiB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for backend, incremental, _, per_save in rows:
        steady = per_save[1:] or per_save
        seconds = statistics.median(s for s, _, _ in steady)
        changed = statistics.median(c for _, c, _ in steady)
        n_req = statistics.median(len(r) for _, _, r in steady)
        methods: Counter = Counter()
        kinds: dict[str, list[int]] = defaultdict(list)
        for _, _, reqs in steady:
            methods.update(m for m, _, _ in reqs)
            by = Counter()
            for method, target, n in reqs:
                by[_what(method, target)] += n
            for k in ("chunks", "zarr.json", "step record", "root documents", "delete lists"):
                kinds[k].append(by[k])
        uploaded = statistics.median(sum(n for _, _, n in r) for _, _, r in steady)
        by_method = ", ".join(f"{m} {c / len(steady):.0f}" for m, c in methods.most_common())
        split = " / ".join(f"{statistics.median(v) / 1024:,.1f}" for v in kinds.values())
        client = {"obstore": "zarrckpt + obstore", "fsspec": "zarrckpt + s3fs"}.get(
            backend, backend
        )
        print(f"| {client} | {incremental} | {seconds:.2f} | {n_req:.0f} ({by_method}) "
              f"| {uploaded / MIB:.2f} | {uploaded / changed:.2f}x | {split} |")  # fmt: skip
    print(
        "\n`MiB uploaded` is every request body the server read (data, metadata, and the "
        "key lists of batch deletes, which remove the step that keep=1 drops); `changed` is "
        "the in-memory bytes of the changed leaves (int and bool leaves are stored zstd-"
        "compressed, so their chunks upload fewer bytes). Target: bytes uploaded <= 1.1x "
        "the changed bytes."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["local", "s3"], default="local")
    parser.add_argument("--gib", type=float, default=1.0, help="local: state size")
    parser.add_argument("--saves", type=int, default=7)
    parser.add_argument("--profiles", nargs="+", choices=PROFILES, default=PROFILES)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=KINDS)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=SYSTEMS)
    parser.add_argument("--sim-steps", type=int, default=10, help="brainstate: steps between saves")
    parser.add_argument("--dir", default=None, help="where roots go (default: under the cwd)")
    parser.add_argument("--keep-dir", action="store_true")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument(
        "--report", nargs="+", default=None, metavar="JSON",
        help="local: print the tables from files --json wrote (later files replace profiles)",
    )  # fmt: skip
    parser.add_argument("--s3-gib", type=float, default=1 / 16, help="s3: state scale")
    parser.add_argument("--backends", nargs="+", default=["obstore", "fsspec"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--moto-server", type=int, nargs="?", const=0, help=argparse.SUPPRESS)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    parser.add_argument("--profile", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args(argv)
    if args.moto_server is not None:  # servers.serve appends the port
        return moto_server(int(extra[-1]) if extra else args.moto_server)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.worker:
        return worker(args)
    if args.part == "s3":
        return run_s3(args)
    if args.report:
        results = {}
        for name in args.report:
            for key, value in json.loads(Path(name).read_text()).items():
                results[tuple(key.split("/"))] = value
        args.saves = max(len(next(iter(r["saves"].values()))) for r in results.values())
        return report_local(results, args)
    return run_local(args)


if __name__ == "__main__":
    main()
