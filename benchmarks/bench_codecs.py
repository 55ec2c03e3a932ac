"""Which codec for which leaf: size and speed of none / zstd / gzip on SNN-like data.

    python benchmarks/bench_codecs.py

Encodes (and decodes) 64 MiB of each kind of leaf with the same code path a save uses
(``ArrayLayout.encode_chunk`` / ``decode_chunk``, 8 MiB chunks, crc32c included) and prints
the compression ratio and single-thread throughput. In memory: disk speed is not involved.
"""

from __future__ import annotations

import time

import numpy as np

from zarrckpt._format import ArrayLayout

MIB = 1024 * 1024


def samples() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 16 * MIB  # elements
    return {
        "float32 weights (normal noise)": rng.standard_normal(n, dtype=np.float32),
        "float32 potentials (mostly at rest)": np.where(
            rng.random(n) < 0.7, np.float32(0), rng.standard_normal(n, dtype=np.float32)
        ),
        "bool spikes (2% true)": rng.random(4 * n) < 0.02,
        "int32 spike counts (Poisson 0.5)": rng.poisson(0.5, n).astype(np.int32),
    }


def measure(array: np.ndarray, codec: str) -> tuple[float, float, float]:
    layout = ArrayLayout.for_array(array, codec=codec)
    start = time.perf_counter()
    encoded = [
        b"".join(bytes(memoryview(p)) for p in layout.encode_chunk(layout.chunk_data(array, idx)))
        for idx in layout.chunk_ids()
    ]
    t_enc = time.perf_counter() - start
    start = time.perf_counter()
    for data in encoded:
        layout.decode_chunk(data, "bench")
    t_dec = time.perf_counter() - start
    size = sum(len(d) for d in encoded)
    return array.nbytes / size, array.nbytes / MIB / t_enc, array.nbytes / MIB / t_dec


def main() -> None:
    print("| data | codec | ratio | encode MiB/s | decode MiB/s |")
    print("|---|---|---|---|---|")
    for name, array in samples().items():
        for codec in ("none", "zstd:1", "zstd:3", "gzip:1"):
            ratio, enc, dec = measure(array, codec)
            print(f"| {name} | {codec} | {ratio:.2f} | {enc:.0f} | {dec:.0f} |")


if __name__ == "__main__":
    main()
