"""zarrckpt on an S3 server (moto, loopback) with added latency: parallel vs sequential.

    python benchmarks/bench_remote.py                  # 20 ms per request, 1,000 leaves
    python benchmarks/bench_remote.py --latency-ms 0 --leaves 200

Latency is added on the client, once per S3 request (a subclass of s3fs whose ``_call_s3``
sleeps first; ``tc netem`` is not available on these machines). Request counts come from
the same choke point. Workloads: (a) many small leaves (4 KiB float32 each), (b) two
64 MiB float32 matrices in 8 MiB chunks. For each: save, full load with ``parallel=True``
and ``parallel=False``, open + one lazy leaf; and for comparison, naive zarr-python over
the same server (one ``create_array`` per leaf), for the small-leaf case, run once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import fsspec
import s3fs
from servers import s3_options, start_s3, stop

import zarrckpt

CALLS: Counter = Counter()


class SlowS3(s3fs.S3FileSystem):
    """s3fs with a fixed delay before every request, and a request counter."""

    delay = 0.0

    async def _call_s3(self, method, *args, **kwargs):
        CALLS[method] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        return await super()._call_s3(method, *args, **kwargs)


def timed(fn, *args, **kwargs):
    CALLS.clear()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, sum(CALLS.values()), out


def small_state(n: int) -> dict:
    rng = np.random.default_rng(0)
    state: dict = {}
    for i in range(n):
        state.setdefault(f"layer{i // 100:02d}", {})[f"n{i:04d}"] = rng.standard_normal(
            1024
        ).astype(np.float32)
    return state


def naive_zarr_save(url: str, flat: dict[str, np.ndarray], options: dict) -> None:
    import zarr

    group = zarr.open_group(url, mode="w", storage_options=options)
    for path, array in flat.items():
        group.create_array(path, shape=array.shape, dtype=array.dtype, chunks=array.shape)[...] = (
            array
        )


def naive_zarr_load(url: str, paths: list[str], options: dict) -> list[np.ndarray]:
    import zarr

    group = zarr.open_group(url, mode="r", storage_options=options)
    return [group[p][...] for p in paths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--leaves", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-naive", action="store_true", help="skip naive zarr-python")
    args = parser.parse_args()

    proc, endpoint, log = start_s3(os.path.join(tempfile.mkdtemp(), "moto.log"))
    try:
        fsspec.register_implementation("s3", SlowS3, clobber=True)
        options = s3_options(endpoint)
        s3fs.S3FileSystem(skip_instance_cache=True, **options).mkdir("bench")
        SlowS3.delay = args.latency_ms / 1000
        rows = []
        big = {"W0": np.random.default_rng(1).standard_normal((4096, 4096), dtype=np.float32),
               "W1": np.random.default_rng(2).standard_normal((4096, 4096), dtype=np.float32)}  # fmt: skip
        workloads = {f"{args.leaves} small leaves (4 KiB)": (small_state(args.leaves), f"layer{args.leaves // 200:02d}/n{args.leaves // 2:04d}"),
                     "2 matrices of 64 MiB": (big, "W1")}  # fmt: skip
        for name, (state, leaf) in workloads.items():
            results: dict[str, list] = {}
            for rep in range(args.repeats):
                url = f"s3://bench/{uuid.uuid4().hex}"
                results.setdefault("save", []).append(
                    timed(zarrckpt.save_pytree, url, state, storage_options=options, verbose=False)[
                        :2
                    ]
                )
                for parallel in (True, False):
                    key = "load, parallel" if parallel else "load, sequential"
                    results.setdefault(key, []).append(
                        timed(
                            zarrckpt.load_pytree, url, storage_options=options, parallel=parallel
                        )[:2]
                    )

                def one_leaf(url: str = url, leaf: str = leaf) -> object:
                    return zarrckpt.open_checkpoint(url, storage_options=options)[leaf][...]

                results.setdefault("open + one leaf", []).append(timed(one_leaf)[:2])
                if not args.no_naive and "small" in name and rep == 0:  # ~0.2 s a leaf: once
                    flat = {f"{a}/{b}": v for a, sub in state.items() for b, v in sub.items()}
                    nurl = f"s3://bench/naive-{uuid.uuid4().hex}"
                    results.setdefault("naive zarr-python save", []).append(
                        timed(naive_zarr_save, nurl, flat, options)[:2]
                    )
                    results.setdefault("naive zarr-python load", []).append(
                        timed(naive_zarr_load, nurl, list(flat), options)[:2]
                    )
            for op, values in results.items():
                seconds = statistics.median(v[0] for v in values)
                requests = statistics.median(v[1] for v in values)
                rows.append((name, op, seconds, requests))
            seq = statistics.median(v[0] for v in results["load, sequential"])
            par = statistics.median(v[0] for v in results["load, parallel"])
            rows.append((name, "**load speed-up, parallel vs sequential**", seq / par, None))
        print(
            f"\nmoto S3 server on loopback, {args.latency_ms:g} ms added per request, median of {args.repeats}.\n"
        )
        print("| workload | operation | seconds | requests |")
        print("|---|---|---|---|")
        for name, op, seconds, requests in rows:
            value = f"{seconds:.1f}x" if requests is None else f"{seconds:.2f}"
            print(f"| {name} | {op} | {value} | {'' if requests is None else int(requests)} |")
    finally:
        stop(proc, log)


if __name__ == "__main__":
    main()
