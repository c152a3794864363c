"""Scalar quantisation: quality and speed of distq beside distquant, in one process.

Run: ``make bench`` (or ``.venv/bin/python experiments/bench_scalar.py [--quick]``).
Writes ``experiments/out/bench_scalar.md`` and prints the same tables.

Quality references are computed here, independently of distq, in NumPy float64: the empirical
Lloyd-Max optimum (squared error: centroids; absolute error: medians) iterated to convergence on
the same samples.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

import distq
from distq import compat

try:  # the peer, from the `bench` extra
    import torch
    import distquant.distquant as dq
except ImportError:  # pragma: no cover
    dq = None

OUT = os.path.join(os.path.dirname(__file__), "out")


def lloyd_reference(x: np.ndarray, n: int, objective: str = "mse", **kw):
    """Empirical Lloyd-Max optimum in float64, independent of distq: the better of two starts
    (the data's quantiles, and the normal p=2 companding levels at the data's robust scale)."""
    from scipy import stats

    xs = np.sort(x.astype(np.float64))
    u = (np.arange(n) + 0.5) / n
    sigma = 1.4826 * np.median(np.abs(xs - np.median(xs)))
    starts = [np.quantile(xs, u), np.median(xs) + sigma * np.sqrt(3.0) * stats.norm.ppf(u)]
    runs = [_lloyd_from(xs, np.sort(lv), objective, **kw) for lv in starts]
    return min(runs, key=lambda r: r[1])


def _lloyd_from(xs, lv, objective, tol=1e-12, max_iter=50_000):
    n = lv.size
    cs = np.concatenate([[0.0], np.cumsum(xs)])
    for _ in range(max_iter):
        b = np.concatenate([[0], np.searchsorted(xs, 0.5 * (lv[1:] + lv[:-1])), [xs.size]])
        cnt = np.diff(b)
        if objective == "mse":
            new = np.where(cnt > 0, (cs[b[1:]] - cs[b[:-1]]) / np.maximum(cnt, 1), lv)
        else:
            mid = np.clip((b[:-1] + b[1:] - 1) // 2, 0, xs.size - 1)
            new = np.where(cnt > 0, xs[mid], lv)
        if np.max(np.abs(new - lv)) < tol:
            lv = new
            break
        lv = new
    idx = np.clip(np.searchsorted(0.5 * (lv[1:] + lv[:-1]), xs, side="right"), 0, n - 1)
    err = (xs - lv[idx]) ** 2 if objective == "mse" else np.abs(xs - lv[idx])
    return lv, float(err.mean())


def times(fn, repeat=3):
    fn()  # compile / warm up
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return ts


def best_time(fn, repeat=3):
    return min(times(fn, repeat))


def distq_error(x, spec, objective):
    q = distq.quantize(x, spec)
    xh = np.asarray(q.dequantize())
    bad = int(np.sum(~np.isfinite(xh)))
    e = (xh - x) ** 2 if objective == "mse" else np.abs(xh - x)
    return float(e.mean()), q, bad


def distquant_error(x, objective, **kw):
    q, info = dq.quantize(torch.from_numpy(x.copy()), **kw)
    xh = dq.dequantize(q, **info).numpy()
    bad = int(np.sum(~np.isfinite(xh)))
    xh = np.nan_to_num(xh, nan=0.0)
    e = (xh - x) ** 2 if objective == "mse" else np.abs(xh - x)
    return float(e.mean()), bad


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="skip distquant's dist=None runs (~1 min)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    lines = ["# Scalar quantisation benchmark", "",
             f"jax {jax.__version__}, {os.cpu_count()} CPU cores; distquant "
             f"{'present' if dq else 'absent'}.", ""]

    def emit(s=""):
        print(s, flush=True)
        lines.append(s)

    # ---------------------------------------------------------------- Gaussian, MSE objective
    x = rng.standard_normal(1_000_000).astype(np.float32)
    var = float(x.var())
    emit("## 1M N(0,1) samples, relative MSE (MSE / variance), MSE objective")
    emit()
    emit("| k | distq Scalar(bits=k) | empirical Lloyd-Max | ratio | distquant beta search | "
         "distquant beta=1 | distq bytes/value |")
    emit("|---|---|---|---|---|---|---|")
    for k in range(1, 9):
        e, q, _ = distq_error(x, distq.Scalar(bits=k, objective="mse"), "mse")
        _, opt = lloyd_reference(x, 1 << k, "mse")
        if dq:
            ds, _ = distquant_error(x, "mse", k=k, dist="gaussian", beta=None, packbits=True)
            d1, _ = distquant_error(x, "mse", k=k, dist="gaussian", beta=1.0, packbits=True)
        else:
            ds = d1 = float("nan")
        emit(f"| {k} | {e / var:.5g} | {opt / var:.5g} | {e / opt:.5f} | {ds / var:.5g} | "
             f"{d1 / var:.5g} | {q.nbytes / x.size:.5f} |")
    emit()

    # ---------------------------------------------------------------- MAE objective
    emit("## 1M N(0,1), k=4, MAE objective (mean absolute error)")
    emit()
    e, _, _ = distq_error(x, distq.Scalar(bits=4, objective="mae"), "mae")
    _, opt = lloyd_reference(x, 16, "mae")
    ds = distquant_error(x, "mae", k=4, dist="gaussian", beta=None)[0] if dq else float("nan")
    emit("| distq Scalar(bits=4, objective='mae') | L1 Lloyd optimum | ratio | distquant |")
    emit("|---|---|---|---|")
    emit(f"| {e:.5f} | {opt:.5f} | {e / opt:.5f} | {ds:.5f} |")
    emit()

    # ---------------------------------------------------------------- heavy tails
    emit("## Student-t(3), 1M samples, k=8, relative MSE")
    emit()
    t3 = rng.standard_t(3, 1_000_000).astype(np.float32)
    v3 = float(t3.var())
    e, q, bad = distq_error(t3, distq.Scalar(bits=8), "mse")
    codes = np.asarray(q.codes_unpacked())
    _, opt = lloyd_reference(t3, 256, "mse")
    emit("| distq Scalar(bits=8) | empirical Lloyd | ratio | NaN out | max code | "
         "distquant dist=None | its NaN out |")
    emit("|---|---|---|---|---|---|---|")
    if dq and not args.quick:
        ds, dbad = distquant_error(t3, "mse", k=8, dist=None, packbits=False)
    else:
        ds, dbad = float("nan"), "-"
    emit(f"| {e / v3:.4g} | {opt / v3:.4g} | {e / opt:.4f} | {bad} | {codes.max()} | "
         f"{ds / v3:.4g} | {dbad} |")
    emit()

    # ---------------------------------------------------------------- speed
    emit("## Speed (after compilation; best of 3, the 10M row best and median of 15)")
    emit()
    emit("| task | distq | distquant | speed-up |")
    emit("|---|---|---|---|")
    x10 = rng.standard_normal(10_000_000).astype(np.float32)  # a fresh, unaligned NumPy array
    ts = times(lambda: compat.quantize(x10, k=4, dist="gaussian", beta=1.0, packbits=True), 15)
    t_ours, t_med = min(ts), float(np.median(ts))
    if dq:
        tx10 = torch.from_numpy(x10)
        t_ref = best_time(lambda: dq.quantize(tx10, k=4, dist="gaussian", beta=1.0), repeat=1)
    else:
        t_ref = float("nan")
    emit(f"| quantise+pack 10M, k=4, fixed beta (G values/s) | {x10.size / t_ours / 1e9:.3f} "
         f"(median {x10.size / t_med / 1e9:.3f}) | {x10.size / t_ref / 1e9:.4f} | "
         f"{t_ref / t_ours:.0f}x |")
    for k in (1, 3, 8):  # the other paths: whole words for k=1; codes, then packing, for 3 and 8
        t_ours = best_time(lambda: compat.quantize(x10, k=k, dist="gaussian", beta=1.0))
        t_ref = (best_time(lambda: dq.quantize(tx10, k=k, dist="gaussian", beta=1.0), repeat=1)
                 if dq else float("nan"))
        emit(f"| quantise+pack 10M, k={k}, fixed beta (G values/s) | "
             f"{x10.size / t_ours / 1e9:.3f} | {x10.size / t_ref / 1e9:.4f} | "
             f"{t_ref / t_ours:.0f}x |")
    x1 = x
    tx1 = torch.from_numpy(x1) if dq else None
    for k in (4, 8):
        t_ours = best_time(lambda: compat.quantize(x1, k=k, dist="gaussian", beta=None))
        t_ref = (best_time(lambda: dq.quantize(tx1, k=k, dist="gaussian", beta=None), repeat=1)
                 if dq else float("nan"))
        emit(f"| beta search, 1M, k={k} (s) | {t_ours:.3f} | {t_ref:.2f} | {t_ref / t_ours:.0f}x |")
    t_ours = best_time(lambda: compat.quantize(x1, k=4, dist=None))
    if dq and not args.quick:
        t_ref = best_time(lambda: dq.quantize(tx1, k=4, dist=None), repeat=1)
    else:
        t_ref = float("nan")
    emit(f"| dist=None, 1M, k=4 (s) | {t_ours:.3f} | {t_ref:.1f} | {t_ref / t_ours:.0f}x |")
    from distq.core import _numerics

    xj = jax.device_put(x10)
    for n in (16, 256):
        t = jax.numpy.asarray(np.sort(rng.standard_normal(n - 1)).astype(np.float32))
        ours = jax.jit(_numerics.bucketize)
        ref = jax.jit(lambda v, t: jax.numpy.searchsorted(t, v, side="right"))
        t_ours = best_time(lambda: ours(xj, t))
        t_ref = best_time(lambda: ref(xj, t))
        emit(f"| encode 10M against {n} sorted levels (G values/s; peer: jnp.searchsorted) | "
             f"{x10.size / t_ours / 1e9:.2f} | {x10.size / t_ref / 1e9:.3f} | "
             f"{t_ref / t_ours:.0f}x |")
    f = jax.jit(distq.quantize, static_argnums=1)
    for k in (4, 8):
        t_ours = best_time(lambda: f(x1, distq.Scalar(bits=k)))
        emit(f"| distq.quantize(1M, Scalar(bits={k})): search + Lloyd + encode (s) | "
             f"{t_ours:.3f} | - | - |")
    emit()

    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "bench_scalar.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
