"""How far is each quantiser from Shannon's bound? (SIMULATIONS.md, "Rate-distortion").

Run (writes ``experiments/out/rate_distortion.md``, ``experiments/figures/rd_*.png`` and
``experiments/figures/rate_distortion.json``)::

    .venv/bin/python experiments/rate_distortion.py [--quick]

Sources (unit variance, ``m`` i.i.d. float32 draws): Gaussian, Laplace and Student-t with 3
degrees of freedom. Reference curves, squared error relative to the variance:

* Gaussian: the distortion-rate function ``D(R) = 2^(-2R)``;
* Laplace and Student-t: the Shannon lower bound ``D_SLB(R) = 2^(2h) / (2 pi e) 2^(-2R)``
  (``h``: differential entropy in bits, from scipy), below the true ``D(R)`` and tight at high
  rate.

Quantisers, each at k = 1..8 bits (VQ at the rates it supports), their distance in dB from the
reference at ``R = k``, and the bits per value they really store:

* ``lloyd-max``: the fixed-rate optimum for the sample, computed here in NumPy (Lloyd's
  iterations on the sorted sample with prefix sums; independent of distq);
* ``distq default``: ``distq.quantize(x, distq.Scalar(bits=k))`` as shipped;
* ``uniform + entropy``: a uniform grid whose step is chosen so that the empirical entropy of
  its codes is ``k`` bits (centroid levels), the classic entropy-coded scalar quantiser; its
  rate is that entropy, and the bytes distq's entropy-coded checkpoint really needs for those
  codes are shown beside it;
* ``VQ``: ``distq.VQ(bits=k)`` (trellis-coded, fixed rate);
* ``rotated``: the same quantisers after ``distq.Rotated`` (a random-sign Hadamard-type
  rotation of the data laid out as a matrix; undone at decode, so the error is measured in the
  original basis). On i.i.d. heavy-tailed data a rotation makes the values Gaussian: a
  fixed-rate quantiser then loses its outliers' cost, but the reference (the SLB of the
  heavy-tailed source) is lower than the Gaussian's, so this shows what rotation buys and what
  it cannot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import distq  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("gaussian", "laplace", "student_t3")
TITLES = {"gaussian": "Gaussian", "laplace": "Laplace", "student_t3": "Student-t (3 d.o.f.)"}


# --------------------------------------------------------------------------- sources, bounds
def sample(name: str, m: int, seed: int) -> np.ndarray:
    """``m`` unit-variance float32 draws."""
    rng = np.random.default_rng([seed, SOURCES.index(name)])
    if name == "gaussian":
        x = rng.standard_normal(m)
    elif name == "laplace":
        x = rng.laplace(0.0, 1.0 / math.sqrt(2.0), m)
    else:
        x = rng.standard_t(3, m) / math.sqrt(3.0)
    return x.astype(np.float32)


def entropy_bits(name: str) -> float:
    """Differential entropy (bits) of the unit-variance source."""
    return float(_dist(name).entropy()) / math.log(2.0)


def reference(name: str, rate: float) -> float:
    """D(R) for the Gaussian (exact), the Shannon lower bound for the others (unit variance)."""
    h = entropy_bits(name)
    return 2.0 ** (2.0 * h) / (2.0 * math.pi * math.e) * 2.0 ** (-2.0 * rate)


def db(d: float, ref: float) -> float:
    return 10.0 * math.log10(d / ref)


# ------------------------------------------------------------------------------- quantisers
def _dist(name: str):
    """The unit-variance source as a scipy distribution."""
    if name == "gaussian":
        return stats.norm()
    if name == "laplace":
        return stats.laplace(scale=1.0 / math.sqrt(2.0))
    return stats.t(3, scale=1.0 / math.sqrt(3.0))


def companding_levels(name: str, n: int) -> np.ndarray:
    """The high-rate optimal levels (Panter-Dite): quantiles of the density's cube root."""
    grid = np.linspace(-60.0, 60.0, 1_200_001)
    w = np.cbrt(_dist(name).pdf(grid))
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    return np.interp((np.arange(n) + 0.5) / n, cdf, grid)


def _lloyd_from(xs, s1, s2, levels, iters):
    for _ in range(iters):
        cut = np.searchsorted(xs, (levels[1:] + levels[:-1]) / 2.0)
        edges = np.concatenate([[0], cut, [xs.size]])
        cnt = np.diff(edges)
        new = np.where(cnt > 0, np.diff(s1[edges]) / np.maximum(cnt, 1), levels)
        done = np.allclose(new, levels, rtol=0, atol=1e-12)
        levels = new
        if done:
            break
    cut = np.searchsorted(xs, (levels[1:] + levels[:-1]) / 2.0)
    edges = np.concatenate([[0], cut, [xs.size]])
    cnt = np.diff(edges)
    a1, a2 = np.diff(s1[edges]), np.diff(s2[edges])
    return float(np.sum(a2 - 2 * levels * a1 + cnt * levels**2))


def lloyd_max(xs: np.ndarray, k: int, name: str, iters: int = 3000) -> float:
    """Relative MSE of the fixed-rate optimum on the sorted sample ``xs``: Lloyd's iterations
    (prefix sums, float64) from the sample's quantiles and from the companding levels; the
    better of the two (at high rates the sample's error has many fixed points)."""
    n = 1 << k
    s1 = np.concatenate([[0.0], np.cumsum(xs, dtype=np.float64)])
    s2 = np.concatenate([[0.0], np.cumsum(xs.astype(np.float64) ** 2)])
    inits = (np.quantile(xs, (np.arange(n) + 0.5) / n).astype(np.float64),
             np.clip(companding_levels(name, n), xs[0], xs[-1]))
    sse = min(_lloyd_from(xs, s1, s2, lv, iters) for lv in inits)
    return float(sse / xs.size / np.var(xs.astype(np.float64)))


def uniform_entropy(x: np.ndarray, rate: float) -> tuple[float, float, np.ndarray]:
    """``(relative MSE, entropy in bits, codes)`` of the uniform grid whose code entropy is
    ``rate`` bits (step found by bisection on the log step), centroid reconstruction."""
    x64 = x.astype(np.float64)

    def codes_of(step):
        return np.round(x64 / step).astype(np.int64)

    def entropy(c):
        _, cnt = np.unique(c, return_counts=True)
        p = cnt / c.size
        return float(-np.sum(p * np.log2(p)))

    lo, hi = -12.0, 4.0  # log2 step
    for _ in range(40):
        mid = (lo + hi) / 2.0
        if entropy(codes_of(2.0**mid)) > rate:
            lo = mid
        else:
            hi = mid
    c = codes_of(2.0**hi)
    u, inv, cnt = np.unique(c, return_inverse=True, return_counts=True)
    cent = np.bincount(inv, weights=x64) / cnt
    mse = float(np.mean((x64 - cent[inv]) ** 2) / np.var(x64))
    return mse, entropy(c), (c - c.min()).astype(np.int64)


def coded_bits(codes: np.ndarray) -> float | None:
    """Bits per value distq's entropy coder stores for ``codes`` (None if it is not there)."""
    try:
        from distq.core import entropy as E  # noqa: PLC0415
    except ImportError:
        return None
    width = max(1, int(codes.max()).bit_length())
    if width > 16:
        return None
    blob = E.encode(codes, bits=width)
    return 8.0 * len(blob) / codes.size


def run_distq(x: np.ndarray, spec, key) -> tuple[float, float, float]:
    """``(relative MSE, stored bits per value, seconds)`` of ``distq.quantize(x, spec)``."""
    t0 = time.perf_counter()
    q = distq.quantize(x, spec, key=key)
    d = np.asarray(q.dequantize(), np.float64)
    dt = time.perf_counter() - t0
    x64 = x.astype(np.float64)
    return float(np.mean((d - x64) ** 2) / np.var(x64)), 8.0 * q.nbytes / x.size, dt


# -------------------------------------------------------------------------------------- run
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2^18 values per source, fewer rows")
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args()
    m = 1 << (18 if args.quick else 20)
    ks = tuple(range(1, 9))
    vq_ks = (1, 2, 3, 4)
    cols = 1024
    key = jax.random.key(args.seed)
    results: dict = {"m": m, "sources": {}}
    for name in SOURCES:
        x = sample(name, m, args.seed)
        xs = np.sort(x)
        mat = x.reshape(-1, cols)  # rows x cols, rotated along the columns
        rows: dict = {}

        def add(label, k, mse, bits, **extra):
            ref = reference(name, k)
            rows.setdefault(label, {})[k] = dict(mse=mse, bits=bits, db=db(mse, ref), **extra)
            print(f"{name:11s} {label:26s} k={k}  rel MSE {mse:.3e}  {bits:6.3f} bits/value  "
                  f"{db(mse, ref):+6.2f} dB", flush=True)

        for k in ks:
            add("Lloyd-Max (NumPy)", k, lloyd_max(xs, k, name), float(k))
            mse, bits, _ = run_distq(x, distq.Scalar(bits=k), key)
            add("distq Scalar default", k, mse, bits)
            mse, h, codes = uniform_entropy(x, float(k))
            add("uniform + entropy", k, mse, h, coded=coded_bits(codes))
            if name != "gaussian":
                mse, bits, _ = run_distq(mat, distq.Rotated(distq.Scalar(bits=k)), key)
                add("Rotated Scalar", k, mse, bits)
        for k in vq_ks:
            mse, bits, sec = run_distq(x, distq.VQ(bits=k), key)
            add("VQ", k, mse, bits, seconds=sec)
            if name != "gaussian":
                # VQ rotates on its own (along input_axis), one scale for the whole array, and
                # the plain array's trellis (L = 12): the two VQ rows differ by the rotation only
                rvq = distq.VQ(bits=k, state_bits=12, input_axis=1, scales="tensor",
                               input_scales=None, boost=0.0)
                mse, bits, sec = run_distq(mat, rvq, key)
                add("Rotated VQ", k, mse, bits, seconds=sec)
        results["sources"][name] = {"h_bits": entropy_bits(name), "rows": rows}

    os.makedirs(os.path.join(HERE, "figures"), exist_ok=True)
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    with open(os.path.join(HERE, "figures", "rate_distortion.json"), "w") as f:
        json.dump(results, f, indent=1)
    md = table(results, ks)
    with open(os.path.join(HERE, "out", "rate_distortion.md"), "w") as f:
        f.write(md)
    print(md)
    plot(results)


def table(results: dict, ks) -> str:
    out = [f"m = {results['m']} values per source; dB above the reference at R = k "
           "(D(R) for the Gaussian, the Shannon lower bound otherwise); "
           "stored bits per value in brackets.\n"]
    for name, res in results["sources"].items():
        out.append(f"\n### {TITLES[name]} (h = {res['h_bits']:.3f} bits)\n")
        out.append("| quantiser | " + " | ".join(f"k={k}" for k in ks) + " |")
        out.append("|---|" + "---|" * len(ks))
        for label, by_k in res["rows"].items():
            cells = []
            for k in ks:
                r = by_k.get(k) or by_k.get(str(k))
                if r is None:
                    cells.append("")
                    continue
                extra = f", coded {r['coded']:.3f}" if r.get("coded") else ""
                cells.append(f"{r['db']:.2f} ({r['bits']:.3f}{extra})")
            out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(results: dict) -> None:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("matplotlib not installed: no figures")
        return
    for name, res in results["sources"].items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, by_k in res["rows"].items():
            ks = sorted(int(k) for k in by_k)
            ax.plot([by_k[k]["bits"] for k in ks], [by_k[k]["db"] for k in ks], "o-",
                    label=label, markersize=3)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xlabel("stored bits per value")
        ax.set_ylabel("dB above " + ("D(R)" if name == "gaussian" else "Shannon lower bound"))
        ax.set_title(TITLES[name])
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(HERE, "figures", f"rd_{name}.png"), dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
