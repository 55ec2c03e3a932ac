"""Collective saves and sharded restores by 1, 2 and 4 JAX processes, on local disk.

    python benchmarks/bench_multihost.py                    # 2 GiB, 1/2/4 processes
    python benchmarks/bench_multihost.py --gib 1 --processes 1 2 --repeats 1

Each configuration is one JAX job of N processes on 127.0.0.1 (``jax.distributed`` with a
local coordinator, one CPU device per process, gloo collectives) holding the same global
state: 8 float32 matrices of ``gib/8`` each, sharded by rows over the N devices (each
process creates only its own shards). Every process then calls, as users would,

* ``save_pytree(root, state)`` into one root (default arguments but ``verbose``), and
* ``load_pytree(root, targets)`` with ``jax.ShapeDtypeStruct`` targets of the same sharding,
  cold: process 0 evicts the step's pages (``posix_fadvise(DONTNEED)``) first.

Each timed operation starts at a barrier of all processes (the coordination service's), and
its wall time is the slowest process's. Reported: the median wall time over ``--repeats``
saves (the first into the root is left out: later ones pay for deleting the previous step,
as in a training loop) and loads, the aggregate throughput, and per-process throughput (the
bytes each process writes or reads over the wall time). Raw: one process writing the same
bytes to one file + ``fsync`` and reading it back cold, the disk's reference.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MIB = 1024 * 1024
LEAVES = 8


def _evict(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def worker(process: int, count: int, port: str, root: str, gib: float, repeats: int) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=count, process_id=process)
    from jax._src import distributed
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import zarrckpt

    client = distributed.global_state.client
    mesh = Mesh(np.array(jax.devices()), ("x",))
    sharding = NamedSharding(mesh, P("x"))
    rows = int(gib * 1024**3 / LEAVES / 4 / 4096) // (4 * count) * (4 * count)
    shape = (rows, 4096)
    rng = np.random.default_rng(process)
    state = {
        f"layer{i}/W": jax.make_array_from_callback(
            shape,
            sharding,
            lambda index: rng.random((len(range(*index[0].indices(rows))), 4096), np.float32),
        )
        for i in range(LEAVES)
    }
    targets = {k: jax.ShapeDtypeStruct(shape, np.float32, sharding=sharding) for k in state}
    mine = sum(s.data.nbytes for v in state.values() for s in v.addressable_shards)
    times: dict[str, list[float]] = {"save": [], "load": []}
    for n in range(repeats + 1):
        client.wait_at_barrier(f"save-{n}", 600_000)
        start = time.perf_counter()
        zarrckpt.save_pytree(root, state, verbose=False)
        times["save"].append(time.perf_counter() - start)
        if process == 0:
            _evict(Path(root))
        client.wait_at_barrier(f"load-{n}", 600_000)
        start = time.perf_counter()
        loaded = zarrckpt.load_pytree(root, targets)
        jax.block_until_ready(loaded)
        times["load"].append(time.perf_counter() - start)
        del loaded
    client.key_value_set(f"times/{process}", json.dumps({"times": times, "bytes": mine}))
    if process == 0:
        reports = [
            json.loads(client.blocking_key_value_get(f"times/{p}", 600_000)) for p in range(count)
        ]
        print(json.dumps({"reports": reports, "total": LEAVES * rows * 4096 * 4}))
    client.wait_at_barrier("exit", 600_000)
    sys.stdout.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(count: int, root: Path, gib: float, repeats: int) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}  # fmt: skip
    port = str(_free_port())
    args = [sys.executable, __file__, "--worker", "", str(count), port, str(root), str(gib)]
    procs = []
    for p in range(count):
        args[3] = str(p)
        procs.append(
            subprocess.Popen(
                [*args, str(repeats)], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
            )
        )
    outs = [proc.communicate()[0].decode() for proc in procs]
    line = [ln for ln in outs[0].splitlines() if ln.startswith("{")]
    if not line:
        raise RuntimeError(f"job of {count} processes failed: {outs}")
    return json.loads(line[-1])


def raw(root: Path, nbytes: int, repeats: int) -> dict[str, float]:
    data = np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)
    path = root / "raw.bin"
    saves, loads = [], []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with open(path, "wb") as f:
            f.write(memoryview(data).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        saves.append(time.perf_counter() - start)
        _evict(root)
        start = time.perf_counter()
        back = np.fromfile(path, dtype=np.float32)
        loads.append(time.perf_counter() - start)
        del back
    path.unlink()
    return {"save": statistics.median(saves[1:]), "load": statistics.median(loads[1:])}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        p, n, port, root, gib, repeats = sys.argv[2:8]
        worker(int(p), int(n), port, root, float(gib), int(repeats))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    opts = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-multihost-", dir=opts.dir))
    rows = []
    for count in opts.processes:
        result = run_job(count, base / f"n{count}", opts.gib, opts.repeats)
        total = result["total"]
        for op in ("save", "load"):
            walls = [
                max(r["times"][op][i] for r in result["reports"])
                for i in range(1, opts.repeats + 1)
            ]
            wall = statistics.median(walls)
            per = statistics.median(r["bytes"] for r in result["reports"]) / wall / MIB
            rows.append((count, op, wall, total / wall / MIB, per))
    reference = raw(base, total, opts.repeats)
    cores = os.cpu_count()
    print(f"\n{total / 1024**3:.2f} GiB sharded by rows, {LEAVES} leaves; {cores} cores; "
          f"medians of {opts.repeats} (after one warm-up save)\n")  # fmt: skip
    print("| processes | operation | wall (s) | aggregate (MiB/s) | per process (MiB/s) | vs raw |")
    print("|---|---|---|---|---|---|")
    for count, op, wall, agg, per in rows:
        print(f"| {count} | {op} | {wall:.3f} | {agg:.0f} | {per:.0f} | "
              f"{wall / reference[op]:.2f}x |")  # fmt: skip
    for op in ("save", "load"):
        print(f"| raw (1 file) | {op} | {reference[op]:.3f} | {total / reference[op] / MIB:.0f} "
              "| | 1.00x |")  # fmt: skip
    subprocess.run(["rm", "-rf", str(base)], check=False)


if __name__ == "__main__":
    main()
