"""Object-store clients on one S3 server (moto, loopback), in one run.

    python benchmarks/bench_remote.py                        # 500 small leaves, 2 x 32 MiB
    python benchmarks/bench_remote.py --leaves 200 --big-mib 8 --repeats 3
    python benchmarks/bench_remote.py --latency-ms 20        # s3fs with latency: parallel vs not

Clients: zarrckpt through obstore (Rust ``object_store``) and through s3fs, and TensorStore
writing one zarr3 array per leaf (its own S3 driver, all leaves at once). Orbax is not in the
table: ``StandardCheckpointer().save("s3://...")`` fails before writing array data (orbax
0.12.8 builds TensorStore specs for local and ``gs://`` paths only; ``s3://b/p`` becomes
``s3:/b/p`` and is refused as "not absolute").

For each client and operation, the median of ``--repeats`` runs after one warm-up:

- **wall** seconds;
- **requests** counted at the server: moto logs one line per request, and the lines naming
  the run's own bucket are counted (nothing is inferred from the client). The server is
  moto's app under waitress (``tests/moto_keepalive.py``: HTTP/1.1 keep-alive, as S3 does;
  ``pip install waitress``, in the ``bench`` extra) or, with ``--server werkzeug``, moto's
  own server, which closes the connection after every response, so that every request of
  every client also pays a TCP connect;
- **client CPU**: ``time.process_time()`` of this process (every thread: zarrckpt's loop,
  its I/O pool, obstore's Rust runtime, TensorStore's threads), over the requests made.
  moto runs in its own process, so its work is not counted.

Workloads: (a) many small leaves (1,024 float32 each, 4 KiB: one request per leaf and
metadata document, the case that client overhead dominates); (b) two float32 matrices in 4 MiB
chunks. Operations: save (a new step), load (everything), open + one leaf.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
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
os.environ.pop("ZARRCKPT_STORAGE_BACKEND", None)
REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # this checkout's zarrckpt, the test servers

import fsspec  # noqa: E402
import s3fs  # noqa: E402
from servers import s3_options, start_s3, stop  # noqa: E402

import zarrckpt  # noqa: E402


class ServerLog:
    """Counts the requests moto logged for one bucket since :meth:`mark`."""

    def __init__(self, path: str) -> None:
        self.path, self.offset = path, 0

    def _size(self) -> int:
        # moto writes its line right after answering: wait until the log stops growing
        size, stable_since = -1, time.monotonic()
        while time.monotonic() - stable_since < 0.05:
            now = os.path.getsize(self.path)
            if now != size:
                size, stable_since = now, time.monotonic()
            time.sleep(0.01)
        return size

    def mark(self) -> None:
        self.offset = self._size()

    def count(self, bucket: str) -> Counter:
        end = self._size()
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            text = fh.read(end - self.offset).decode(errors="replace")
        pattern = re.compile(rf'"([A-Z]+) /{re.escape(bucket)}[/? ]')
        return Counter(m.group(1) for line in text.splitlines() if (m := pattern.search(line)))


def measure(log: ServerLog, bucket: str, fn) -> tuple[float, int, float, Counter]:
    """(wall s, requests at the server, client CPU s, requests by method) of ``fn()``."""
    log.mark()
    cpu, start = time.process_time(), time.perf_counter()
    fn()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    by_method = log.count(bucket)
    return wall, sum(by_method.values()), cpu, by_method


def small_state(n: int) -> dict:
    rng = np.random.default_rng(0)
    state: dict = {}
    for i in range(n):
        state.setdefault(f"layer{i // 100:02d}", {})[f"n{i:04d}"] = rng.standard_normal(
            1024
        ).astype(np.float32)
    return state


def big_state(mib: int) -> dict:
    rows = mib * 1024 * 1024 // 4 // 1024
    rng = np.random.default_rng(1)
    return {f"W{i}": rng.standard_normal((rows, 1024), dtype=np.float32) for i in range(2)}


def flat(state: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


# --- clients ------------------------------------------------------------------------------------


def zarrckpt_ops(backend: str, options: dict, state: dict, leaf: str, chunk_bytes: int):
    opts = {**options, "backend": backend}

    def save(url):
        zarrckpt.save_pytree(
            url, state, storage_options=opts, verbose=False, chunk_bytes=chunk_bytes
        )

    def load(url):
        zarrckpt.load_pytree(url, storage_options=opts)

    def one_leaf(url):
        zarrckpt.open_checkpoint(url, storage_options=opts)[leaf][...]

    return {"save": save, "load": load, "open + one leaf": one_leaf}


def tensorstore_ops(endpoint: str, state: dict, leaf: str, chunk_bytes: int):
    import tensorstore as ts

    arrays = flat(state)
    context = ts.Context()

    def spec(url: str, path: str) -> dict:
        bucket, _, root = url[len("s3://") :].partition("/")
        return {
            "driver": "zarr3",
            "kvstore": {"driver": "s3", "bucket": bucket, "path": f"{root}/{path}/",
                        "endpoint": endpoint, "aws_region": "us-east-1",
                        "aws_credentials": {"type": "environment"}},
        }  # fmt: skip

    def chunks(a: np.ndarray) -> list[int]:
        rows = max(1, chunk_bytes // (a.itemsize * int(np.prod(a.shape[1:], dtype=int))))
        return [min(rows, a.shape[0]), *a.shape[1:]]

    def save(url):
        opened = [
            ts.open(
                {
                    **spec(url, p),
                    "metadata": {
                        "shape": list(a.shape),
                        "data_type": str(a.dtype),
                        "chunk_grid": {
                            "name": "regular",
                            "configuration": {"chunk_shape": chunks(a)},
                        },
                    },
                },
                create=True,
                context=context,
            )
            for p, a in arrays.items()
        ]
        writes = [f.result().write(a) for f, a in zip(opened, arrays.values(), strict=True)]
        for w in writes:
            w.result()

    def load(url):
        opened = [ts.open(spec(url, p), context=context) for p in arrays]
        reads = [f.result().read() for f in opened]
        for r in reads:
            r.result()

    def one_leaf(url):
        ts.open(spec(url, leaf), context=context).result().read().result()

    return {"save": save, "load": load, "open + one leaf": one_leaf}


def compare_clients(args) -> None:
    log_path = os.path.join(tempfile.mkdtemp(), "moto.log")
    proc, endpoint, log = start_s3(log_path, keep_alive=args.server == "waitress")
    server = ServerLog(log_path)
    rows = []
    try:
        options = s3_options(endpoint)
        maker = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        workloads = {
            f"{args.leaves} leaves of 4 KiB": (small_state(args.leaves), "layer00/n0001"),
            f"2 matrices of {args.big_mib} MiB, 4 MiB chunks": (big_state(args.big_mib), "W1"),
        }
        for name, (state, leaf) in workloads.items():
            clients = {
                "zarrckpt + obstore": zarrckpt_ops("obstore", options, state, leaf, 4 << 20),
                "zarrckpt + s3fs": zarrckpt_ops("fsspec", options, state, leaf, 4 << 20),
            }
            if not args.no_tensorstore:
                clients["TensorStore, one zarr3 array per leaf"] = tensorstore_ops(
                    endpoint, state, leaf, 4 << 20
                )
            for client, ops in clients.items():
                bucket = "b-" + uuid.uuid4().hex[:12]
                maker.mkdir(bucket)
                results: dict[str, list] = {}
                for rep in range(args.repeats + 1):  # the first is a warm-up
                    url = f"s3://{bucket}/run{rep}"
                    for op, fn in ops.items():
                        out = measure(server, bucket, lambda fn=fn, url=url: fn(url))
                        if rep:
                            results.setdefault(op, []).append(out)
                for op, values in results.items():
                    wall, requests, cpu, methods = sorted(values, key=lambda v: v[0])[
                        len(values) // 2
                    ]
                    rows.append((name, client, op, wall, requests, cpu, methods))
    finally:
        stop(proc, log)
    served = {
        "waitress": "moto's app under waitress (keep-alive, as S3)",
        "werkzeug": "moto's own server (a new connection per request)",
    }[args.server]
    print(
        f"\n{served}, on loopback; the median run (by wall time) of {args.repeats}, after a warm-up.\n"
    )
    print(
        "| workload | client | operation | wall s | requests (server) | client CPU s | CPU ms / request |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, client, op, wall, requests, cpu, methods in rows:
        detail = ", ".join(f"{m} {n}" for m, n in sorted(methods.items()))
        per = 1000 * cpu / requests if requests else float("nan")
        print(
            f"| {name} | {client} | {op} | {wall:.3f} | {int(requests)} ({detail}) | {cpu:.3f} | {per:.3f} |"
        )
    small = [r for r in rows if r[0].endswith("4 KiB") and r[2] in ("save", "load")]
    per_request = {}
    for client in ("zarrckpt + obstore", "zarrckpt + s3fs"):
        cpu = sum(r[5] for r in small if r[1] == client)
        requests = sum(r[4] for r in small if r[1] == client)
        per_request[client] = 1000 * cpu / requests
    ob, fs = per_request["zarrckpt + obstore"], per_request["zarrckpt + s3fs"]
    print(f"\nSmall leaves, save + load: client CPU per request {ob:.3f} ms with obstore, "
          f"{fs:.3f} ms with s3fs ({fs / ob:.1f}x less with obstore).")  # fmt: skip


# --- the older table: s3fs with latency added, parallel vs sequential ------------------------

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


def latency_table(args) -> None:
    """Latency is added on the client, once per S3 request (a subclass of s3fs whose
    ``_call_s3`` sleeps first; ``tc netem`` is not available on these machines)."""
    proc, endpoint, log = start_s3(os.path.join(tempfile.mkdtemp(), "moto.log"))
    try:
        fsspec.register_implementation("s3", SlowS3, clobber=True)
        options = {**s3_options(endpoint), "backend": "fsspec"}
        s3fs.S3FileSystem(skip_instance_cache=True, **s3_options(endpoint)).mkdir("bench")
        SlowS3.delay = args.latency_ms / 1000
        rows = []
        workloads = {f"{args.leaves} small leaves (4 KiB)": (small_state(args.leaves), "layer00/n0001"),
                     f"2 matrices of {args.big_mib} MiB": (big_state(args.big_mib), "W1")}  # fmt: skip
        for name, (state, leaf) in workloads.items():
            results: dict[str, list] = {}
            for _ in range(args.repeats):
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
            for op, values in results.items():
                rows.append((name, op, statistics.median(v[0] for v in values),
                             statistics.median(v[1] for v in values)))  # fmt: skip
            seq = statistics.median(v[0] for v in results["load, sequential"])
            par = statistics.median(v[0] for v in results["load, parallel"])
            rows.append((name, "**load speed-up, parallel vs sequential**", seq / par, None))
        print(
            f"\ns3fs on moto, {args.latency_ms:g} ms added per request, median of {args.repeats}.\n"
        )
        print("| workload | operation | seconds | requests |")
        print("|---|---|---|---|")
        for name, op, seconds, requests in rows:
            value = f"{seconds:.1f}x" if requests is None else f"{seconds:.2f}"
            print(f"| {name} | {op} | {value} | {'' if requests is None else int(requests)} |")
    finally:
        stop(proc, log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, default=500)
    parser.add_argument("--big-mib", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-tensorstore", action="store_true")
    parser.add_argument(
        "--server", choices=("waitress", "werkzeug"), default="waitress",
        help="serve moto's app with waitress (keep-alive, default) or moto's own server",
    )  # fmt: skip
    parser.add_argument(
        "--latency-ms", type=float, default=None,
        help="instead: the s3fs table with this latency added per request",
    )  # fmt: skip
    args = parser.parse_args()
    if args.latency_ms is None:
        compare_clients(args)
    else:
        latency_table(args)


if __name__ == "__main__":
    main()
