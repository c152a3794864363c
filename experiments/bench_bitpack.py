"""Throughput of distq.bitpack on CPU.

Times ``pack`` and ``unpack`` (and optionally the distquant-compatible int64
layout) of ``--n`` random codes for every width in ``--bits``. Each function is
compiled first; the reported time is the best of ``--reps`` runs, each ending
with ``block_until_ready``. Throughput is in G codes/s (1e9 codes per second).

Codes are stored as uint8 for bits <= 8 and uint16 otherwise (the default
output dtype of ``unpack``).

Usage:
  python experiments/bench_bitpack.py                 # 10M codes, bits 1..16
  python experiments/bench_bitpack.py --n 10000007    # ragged length
  python experiments/bench_bitpack.py --bits 3 4 --int64
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np

from distq.core import bitpack


def best_time(fn, reps: int) -> float:
    """Best wall time of ``reps`` calls of ``fn`` (after one warm-up call)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000, help="codes per call")
    parser.add_argument("--bits", type=int, nargs="+", default=list(range(1, 17)))
    parser.add_argument("--reps", type=int, default=10, help="timed runs (best kept)")
    parser.add_argument(
        "--int64", action="store_true", help="also time the int64-halves layout"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    n = args.n
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    )
    print(f"n = {n:,} codes, best of {args.reps} runs, throughput in G codes/s")
    header = f"{'bits':>4} {'MB packed':>9} {'pack':>7} {'unpack':>7}"
    if args.int64:
        header += f" {'pack64':>7} {'unpack64':>8}"
    print(header)

    rng = np.random.default_rng(args.seed)
    for bits in args.bits:
        dtype = np.uint8 if bits <= 8 else np.uint16
        codes = jax.device_put(rng.integers(0, 2**bits, n).astype(dtype))
        words = bitpack.pack(codes, bits)
        back = bitpack.unpack(words, bits, n)
        if not np.array_equal(np.asarray(back), np.asarray(codes)):
            raise AssertionError(f"round trip failed for bits={bits}")

        t_pack = best_time(lambda: bitpack.pack(codes, bits), args.reps)
        t_unpack = best_time(lambda: bitpack.unpack(words, bits, n), args.reps)
        row = (
            f"{bits:>4} {words.nbytes / 1e6:>9.2f} "
            f"{n / t_pack / 1e9:>7.2f} {n / t_unpack / 1e9:>7.2f}"
        )
        if args.int64:
            halves = bitpack.pack_int64_halves(codes, bits)
            back = bitpack.unpack_int64_halves(halves, bits, n)
            if not np.array_equal(np.asarray(back), np.asarray(codes)):
                raise AssertionError(f"int64 round trip failed for bits={bits}")
            t_p64 = best_time(lambda: bitpack.pack_int64_halves(codes, bits), args.reps)
            t_u64 = best_time(
                lambda: bitpack.unpack_int64_halves(halves, bits, n), args.reps
            )
            row += f" {n / t_p64 / 1e9:>7.2f} {n / t_u64 / 1e9:>8.2f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
