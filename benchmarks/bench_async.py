"""How much an async save costs the training loop.

    python benchmarks/bench_async.py            # 1 GiB state of JAX arrays

Reports, for a state held as JAX arrays (as BrainPy variables hold them): the time a
synchronous save takes, the time ``save_pytree(..., async_manager=m)`` blocks the caller
(the snapshot: JAX arrays are immutable and are not copied), and the throughput of a
jitted update loop with and without a background save running. These machines have 2
cores, so a background save competes with the loop for CPU: that is part of the figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
from bench_local import build_state

import zarrckpt


def loop_rate(seconds: float, step, w) -> tuple[float, object]:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        w = step(w)
        w.block_until_ready()
        n += 1
    return n / (time.perf_counter() - start), w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    state = jax.tree_util.tree_map(jnp.asarray, build_state(args.gib))
    nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
    root = tempfile.mkdtemp(prefix="zarrckpt-async-", dir=os.getcwd())

    @jax.jit
    def step(w):
        return jnp.tanh(w @ w.T * 1e-3) + w * 0.5

    w = jnp.ones((512, 512), jnp.float32)
    step(w).block_until_ready()
    sync_s, block_s, total_s, busy_rate, idle_rate = [], [], [], [], []
    try:
        for rep in range(args.repeats):
            start = time.perf_counter()
            zarrckpt.save_pytree(os.path.join(root, f"sync{rep}"), state, verbose=False)
            sync_s.append(time.perf_counter() - start)

            rate, w = loop_rate(2.0, step, w)
            idle_rate.append(rate)
            with zarrckpt.AsyncManager() as manager:
                start = time.perf_counter()
                zarrckpt.save_pytree(
                    os.path.join(root, f"async{rep}"), state, async_manager=manager, verbose=False
                )
                block_s.append(time.perf_counter() - start)
                n, t0 = 0, time.perf_counter()
                future = manager._future
                while future is not None and not future.done():
                    w = step(w)
                    w.block_until_ready()
                    n += 1
                busy_rate.append(n / max(time.perf_counter() - t0, 1e-9))
                manager.wait_previous_save()
                total_s.append(time.perf_counter() - start)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = statistics.median
    print(
        f"\nState: {nbytes / 2**30:.2f} GiB of JAX arrays; median of {args.repeats}; local disk.\n"
    )
    print("| measure | value |")
    print("|---|---|")
    print(f"| synchronous save | {med(sync_s):.2f} s |")
    print(
        f"| async save: caller blocked | {med(block_s) * 1000:.0f} ms ({med(block_s) / med(sync_s) * 100:.1f}% of a synchronous save) |"
    )
    print(f"| async save: until committed | {med(total_s):.2f} s |")
    print(f"| update loop, no save running | {med(idle_rate):.0f} steps/s |")
    print(
        f"| update loop, async save running | {med(busy_rate):.0f} steps/s ({med(busy_rate) / med(idle_rate) * 100:.0f}%) |"
    )


if __name__ == "__main__":
    main()
