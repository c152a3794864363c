"""Trellis-coded VQ on a Gaussian source: distance to the distortion-rate bound, storage, time.

One command: ``python experiments/vq_gaussian.py`` (``--n`` values, ``--sweep`` adds the table
of trellis designs on a smaller sample). For ``k = 1..4`` bits it codes ``n`` i.i.d. N(0, 1)
values with ``distq.VQ(bits=k)`` and, side by side in the same process, with the Lloyd-Max
scalar quantiser ``distq.Scalar(bits=k, axis=None, outliers=None)``, and reports the relative MSE,
its distance in dB above Shannon's bound ``D(R) = 2^(-2k)``, the stored bits per value (codes,
scales and everything else counted) and the encode and decode times (first call with
compilation, then the best and the median of ``--repeat`` calls). The table goes to
``experiments/out/vq_gaussian.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np

import distq

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "vq_gaussian.md")
LLOYD_MAX = {1: 0.3634, 2: 0.1175, 3: 0.03455, 4: 0.00950}  # fixed-rate optimum, N(0, 1)


def db_over_bound(mse: float, k: int) -> float:
    return 10 * np.log10(mse / 2.0 ** (-2 * k))


def timed(fn, repeat: int):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        runs.append(time.perf_counter() - t0)
    return out, first, min(runs) if runs else first, statistics.median(runs) if runs else first


def measure(x: np.ndarray, spec, repeat: int) -> dict:
    q, first, best, med = timed(lambda: distq.quantize(x, spec), repeat)
    dec, _, dbest, _ = timed(lambda: q.dequantize(), max(repeat, 1))
    mse = float(np.mean((np.asarray(dec, np.float64) - x) ** 2) / np.var(x))
    return dict(mse=mse, bits=8 * q.nbytes / x.size, first=first, best=best, med=med,
                decode=dbest)


def sweep(x: np.ndarray) -> list[str]:
    """MSE of trellis designs (state bits L) on a smaller sample, tail-biting, blocks of 256."""
    lines = ["| bits | state bits L | relative MSE | dB above D(R) | encode s |", "|---|---:|---:|---:|---:|"]
    for k in (1, 2, 3, 4):
        for L in range(k * -(-8 // k), 17, k):
            r = measure(x, distq.VQ(bits=k, state_bits=L), 0)
            lines.append(f"| {k} | {L} | {r['mse']:.5f} | {db_over_bound(r['mse'], k):.2f} | "
                         f"{r['first']:.1f} |")
            print(lines[-1], flush=True)
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1 << 20, help="values (default 2**20)")
    ap.add_argument("--repeat", type=int, default=2, help="timed calls after the first")
    ap.add_argument("--sweep", action="store_true", help="add the trellis design table")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)

    x = np.random.default_rng(0).standard_normal(args.n).astype(np.float32)
    load = os.getloadavg()[0]
    print(f"{args.n:,} N(0,1) values; load average {load:.1f} on {os.cpu_count()} cores",
          flush=True)
    rows = []
    for k in (1, 2, 3, 4):
        # interleaved: the scalar baseline and VQ on the same data, one after the other
        s = measure(x, distq.Scalar(bits=k, axis=None, outliers=None), args.repeat)
        v = measure(x, distq.VQ(bits=k), args.repeat)
        rows.append((k, s, v))
        print(f"k={k}: VQ mse {v['mse']:.5f} ({db_over_bound(v['mse'], k):.2f} dB over D(R)), "
              f"{v['bits']:.4f} bits/value, encode {v['first']:.1f} s first, {v['best']:.1f} s "
              f"best, {v['med']:.1f} s median, decode {v['decode'] * 1e3:.0f} ms | scalar mse "
              f"{s['mse']:.5f} ({db_over_bound(s['mse'], k):.2f} dB), {s['best']:.2f} s",
              flush=True)
    lines = [
        "# Trellis-coded VQ on a Gaussian source",
        "",
        f"Command: `python experiments/vq_gaussian.py{' --sweep' if args.sweep else ''}`. "
        f"{args.n:,} i.i.d. N(0, 1) float32 values (seed 0), 2 CPU cores shared with other "
        f"jobs (load average {load:.1f} at the start: timings are noisy). `distq.VQ(bits=k)` "
        "(bitshift trellis, L = 12 state bits, tail-biting blocks of 256 values) beside the "
        "Lloyd-Max scalar quantiser `distq.Scalar(bits=k, axis=None, outliers=None)`. dB: "
        "10 log10(MSE / D(R)) with D(R) = 2^(-2k). Bits per value count everything stored. "
        f"Encode: first call (with compilation), best and median of {args.repeat} more.",
        "",
        "| bits | VQ relative MSE | VQ dB above D(R) | VQ bits/value | VQ encode s (first / best "
        "/ median) | VQ decode ms | scalar relative MSE | scalar dB above D(R) | scalar "
        "encode s (best) | Lloyd-Max optimum |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, s, v in rows:
        lines.append(
            f"| {k} | {v['mse']:.5f} | {db_over_bound(v['mse'], k):.2f} | {v['bits']:.4f} | "
            f"{v['first']:.1f} / {v['best']:.1f} / {v['med']:.1f} | {v['decode'] * 1e3:.0f} | "
            f"{s['mse']:.5f} | {db_over_bound(s['mse'], k):.2f} | {s['best']:.2f} | "
            f"{LLOYD_MAX[k]} ({db_over_bound(LLOYD_MAX[k], k):.2f} dB) |")
    if args.sweep:
        n = min(args.n, 1 << 18)
        lines += ["", f"Trellis designs, {n:,} values (first call, with compilation):", ""]
        lines += sweep(x[:n])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
