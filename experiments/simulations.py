"""Error-versus-bits simulations of distributional quantisation (the SIMULATIONS.md figures).

Run (writes ``experiments/figures/*.png`` and ``experiments/figures/simulations.json``)::

    .venv/bin/python experiments/simulations.py [--quick]

What is simulated, for Gaussian, logistic, Gumbel, exponential and Student-t(3) data (all in
standard form, scale 1):

* ``l1`` figures (the paper's plots): mean absolute error versus k = 1..20 bits of the seven
  companding quantisers of the reference (``gaussian``, ``exponential``, ``gumbel_cdf``,
  ``gumbel``, ``logistic_cdf``, ``logistic``, ``cauchy_cdf``) with ``beta`` chosen on the
  reference's grid by the smallest absolute error, torch-style ``qint8`` at k = 8, float16 and
  bfloat16 at k = 16, a histogram quantiser, Lloyd-Max trained on a few samples, and the
  high-rate bound ``(integral sqrt(pdf))^2 / (4 * 2^k)``.
* ``mse`` figures (beyond the paper): mean squared error of distq's ``p = 2`` companding,
  ``distq.Scalar`` as shipped, the same baselines, and the Panter-Dite line
  ``(1/12) (integral pdf^(1/3))^3 2^(-2k)``.

How errors are computed. Every quantiser here is a partition of the line into ``n`` intervals
plus one level per interval, so its error on a sample is a function of the *sorted* sample: the
interval boundaries are found with ``searchsorted`` and the error of each interval follows from
float64 prefix sums (``n <= 2^12``; a whole beta grid at once) or from one pass that repeats the
levels over their intervals (larger ``n``; exact, float64). The codebooks are distq's own tables
(``distq.distributions.thresholds/levels``), placed in data space with the reference's
standardisation, so the curves are those of ``distq.compat.quantize`` (checked against it at a
few points in every run) extended to k = 20 (compat, like distquant's int64 packing, stops at 16).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, NamedTuple

import numpy as np
from scipy import integrate, stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distq.core import distributions as D  # noqa: E402
from distq.core.search import beta_grid  # noqa: E402  (the reference's 37- and 31-value grids)

FIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures")

INPUTS = ("gaussian", "logistic", "gumbel", "exponential")
HEAVY = "student_t3"
TITLES = {
    "gaussian": "Gaussian",
    "logistic": "logistic",
    "gumbel": "Gumbel",
    "exponential": "exponential",
    HEAVY: "Student-t (3 d.o.f.)",
}
#: reference name -> legend label (the reference figures' names)
L1_VARIANTS = (
    ("gaussian", "Gaussian"),
    ("exponential", "Exponential"),
    ("gumbel_cdf", "Gumbel CDF"),
    ("gumbel", "Gumbel Opt."),
    ("logistic_cdf", "Logistic CDF"),
    ("logistic", "Logistic Opt."),
    ("cauchy_cdf", "Cauchy CDF"),
)
MSE_FAMILIES = ("gaussian", "logistic", "gumbel", "exponential")
INT8_SCALES = (0.01, 0.03, 0.1, 0.3)
CLASS_A = ("gaussian", "logistic", "gumbel")  # distq.Scalar centres these at the mean
PREFIX_MAX_LEVELS = 1 << 12  # above this, float64 prefix sums lose the MSE; use the direct pass


@dataclasses.dataclass(frozen=True)
class Config:
    m: int = 1 << 21  # samples per data set
    reps: int = 3  # independent data sets (seeds) per input distribution
    ks: tuple = tuple(range(1, 21))
    k_search: int = 12  # beta is searched for k <= k_search and then kept fixed
    mse_kmax: int = 16  # the p=2 (squared-error) curves stop here, as distq.Scalar does
    hist_bins: tuple = (1 << 12, 1 << 16)
    lloyd_train: tuple = (1 << 12, 1 << 14)
    lloyd_margin: int = 3  # Lloyd-Max is shown for k <= log2(training samples) - margin
    lloyd_iters: int = 300
    inputs: tuple = INPUTS + (HEAVY,)
    seed: int = 2023
    threads: int = 2  # worker processes
    library: bool = True  # run distq.Scalar / distq.Uniform / distq.compat (JAX) on rep 0
    lib_m: int = 1 << 20  # distq.Scalar runs on the first lib_m values of rep 0
    lib_ks: tuple = (1, 2, 4, 8, 10, 12, 16)
    compat_ks: tuple = (4,)
    distquant_m: int = 1 << 16
    distquant_ks: tuple = (2, 4, 8)


FULL = Config()
QUICK = Config(m=1 << 18, reps=2, k_search=10, lib_m=1 << 18, lib_ks=(1, 2, 4, 8, 12),
               distquant_ks=(4,))


# ------------------------------------------------------------------------------------- data
def sample(name: str, m: int, seed: int, rep: int) -> np.ndarray:
    """``m`` float32 draws of a standard distribution; seed sequence ``(seed, input, rep)``."""
    index = (INPUTS + (HEAVY,)).index(name)
    rng = np.random.default_rng([seed, index, rep])
    if name == "gaussian":
        x = rng.standard_normal(m)
    elif name == "logistic":
        x = rng.logistic(0.0, 1.0, m)
    elif name == "gumbel":
        x = rng.gumbel(0.0, 1.0, m)
    elif name == "exponential":
        x = rng.exponential(1.0, m)
    elif name == HEAVY:
        x = rng.standard_t(3, m)
    else:
        raise ValueError(name)
    return x.astype(np.float32)


def pdf_of(name: str) -> Callable:
    return {
        "gaussian": stats.norm.pdf,
        "logistic": stats.logistic.pdf,
        "gumbel": stats.gumbel_r.pdf,
        "exponential": stats.expon.pdf,
        HEAVY: stats.t(3).pdf,
    }[name]


def power_integral(name: str, a: float) -> float:
    """``integral pdf(x)^a dx`` of the standard density (two half-lines for accuracy)."""
    pdf = pdf_of(name)
    f = lambda t: pdf(t) ** a  # noqa: E731
    with np.errstate(over="ignore", under="ignore"):
        right, _ = integrate.quad(f, 0.0, np.inf, limit=400)
        if name == "exponential":
            return right
        left, _ = integrate.quad(f, -np.inf, 0.0, limit=400)
    return left + right


def min_l1(name: str, ks, scale: float = 1.0) -> np.ndarray:
    """High-rate minimal mean absolute error ``scale / (4 kappa^2 2^k)``, 1/kappa = int sqrt f."""
    return scale * power_integral(name, 0.5) ** 2 / 4.0 / 2.0 ** np.asarray(ks, np.float64)


def min_mse(name: str, ks, scale: float = 1.0) -> np.ndarray:
    """Panter-Dite high-rate minimal MSE ``scale^2 (int f^(1/3))^3 / 12 * 2^(-2k)``."""
    c = power_integral(name, 1.0 / 3.0) ** 3 / 12.0
    return scale**2 * c * 4.0 ** (-np.asarray(ks, np.float64))


class Sorted(NamedTuple):
    xs: np.ndarray  # float64, ascending
    p1: np.ndarray  # exclusive prefix sums of xs (length m + 1)
    p2: np.ndarray  # ... of xs**2
    mean: float
    std: float  # ddof = 1, as the reference
    m: int


def prepare(x: np.ndarray) -> Sorted:
    xs = np.sort(x).astype(np.float64)
    m = xs.size
    p1 = np.zeros(m + 1)
    np.cumsum(xs, out=p1[1:])
    p2 = np.zeros(m + 1)
    np.cumsum(xs * xs, out=p2[1:])
    return Sorted(xs, p1, p2, float(xs.mean()), float(xs.std(ddof=1)), m)


# ------------------------------------------------------------------------------------ errors
def _cells(d: Sorted, t: np.ndarray, lv: np.ndarray):
    """Start/end indices (b0, b1) in ``d.xs`` of the cells of thresholds ``t``, batched."""
    b = np.searchsorted(d.xs, t, side="left")
    lead = lv.shape[:-1] + (1,)
    b0 = np.concatenate([np.zeros(lead, b.dtype), b], axis=-1)
    b1 = np.concatenate([b, np.full(lead, d.m, b.dtype)], axis=-1)
    return b0, b1


def _l1_cells(d: Sorted, lv: np.ndarray, b0: np.ndarray, b1: np.ndarray) -> np.ndarray:
    """Mean |e| of levels ``lv`` over cells ``[b0, b1)`` by prefix sums."""
    mid = np.clip(np.searchsorted(d.xs, lv, side="left"), b0, b1)
    p1 = d.p1
    above = (p1[b1] - p1[mid]) - lv * (b1 - mid)
    below = lv * (mid - b0) - (p1[mid] - p1[b0])
    return (above + below).sum(axis=-1) / d.m


def _errors_prefix(d: Sorted, t: np.ndarray, lv: np.ndarray):
    """(mean |e|, mean e^2) of interval quantisers ``t`` (..., n-1) / ``lv`` (..., n), batched.

    A value ``x`` falls in interval ``#(t <= x)`` (as ``distq`` and the reference encode).
    """
    b0, b1 = _cells(d, t, lv)
    s1 = d.p1[b1] - d.p1[b0]
    s2 = d.p2[b1] - d.p2[b0]
    mse = (s2 - 2.0 * lv * s1 + lv * lv * (b1 - b0)).sum(axis=-1) / d.m
    return _l1_cells(d, lv, b0, b1), mse


def _l1_prefix(d: Sorted, t: np.ndarray, lv: np.ndarray) -> np.ndarray:
    """Mean |e| only, by prefix sums, batched (accurate in float64 for any ``n``: no squares)."""
    return _l1_cells(d, lv, *_cells(d, t, lv))


def _errors_direct(d: Sorted, t: np.ndarray, lv: np.ndarray):
    """Same as :func:`_errors_prefix` for one quantiser, by one exact pass over the data."""
    b = np.searchsorted(d.xs, t, side="left")
    cnt = np.diff(b, prepend=0, append=d.m)
    e = d.xs - np.repeat(lv, cnt)
    return float(np.abs(e).sum() / d.m), float(np.dot(e, e) / d.m)


def errors(d: Sorted, t: np.ndarray, lv: np.ndarray):
    """(L1, MSE) of one or a batch of interval quantisers on the sorted sample ``d``."""
    t, lv = np.asarray(t, np.float64), np.asarray(lv, np.float64)
    if lv.shape[-1] <= PREFIX_MAX_LEVELS:
        return _errors_prefix(d, t, lv)
    if lv.ndim == 1:
        return _errors_direct(d, t, lv)
    out = [_errors_direct(d, a, b) for a, b in zip(t.reshape(-1, t.shape[-1]),
                                                   lv.reshape(-1, lv.shape[-1]))]
    l1, mse = (np.array(v).reshape(lv.shape[:-1]) for v in zip(*out))
    return l1, mse


def errors_of_values(x: np.ndarray, xhat: np.ndarray):
    e = np.asarray(xhat, np.float64) - np.asarray(x, np.float64)
    return float(np.abs(e).mean()), float(np.dot(e, e) / e.size)


# ------------------------------------------------------------------------ companding codebooks
_TABLES: dict = {}


def tables(dist: D.Dist, n: int) -> tuple[np.ndarray, np.ndarray]:
    """distq's standard thresholds and levels of ``dist`` with ``n`` levels (cached arrays)."""
    key = (dist, n)
    if key not in _TABLES:
        _TABLES[key] = (D.thresholds(dist, n), D.levels(dist, n))
    return _TABLES[key]


def _table_job(job):
    return job, tables(*job)


def _pool(cfg: Config):
    """A fork-based process pool (NumPy/SciPy work only; JAX is not initialised before it)."""
    return ProcessPoolExecutor(cfg.threads, mp_context=multiprocessing.get_context("fork"))


def warm_tables(cfg: Config) -> None:
    """Builds every table once, largest first, in ``cfg.threads`` processes (SciPy's inverse
    incomplete gamma/beta functions make each 2^20-level Gumbel table cost several seconds)."""
    jobs = {(D.parse_dist(v), 1 << k) for v, _ in L1_VARIANTS for k in cfg.ks}
    jobs |= {(D.Dist(f, 2), 1 << k) for f in MSE_FAMILIES for k in cfg.ks if k <= cfg.mse_kmax}
    jobs = sorted(jobs, key=lambda j: -j[1])
    jobs = [j for j in jobs if j not in _TABLES]
    if cfg.threads <= 1:
        for j in jobs:
            tables(*j)
        return
    with _pool(cfg) as pool:
        for job, tab in pool.map(_table_job, jobs):
            _TABLES[job] = tab


def compat_codebook(name: str, n: int, beta, mean: float, std: float):
    """Thresholds and levels in data space of ``distq.compat.quantize(dist=name)`` (= distquant).

    ``beta`` may be an array (a batch of candidates on the last axis).
    """
    dist = D.parse_dist(name)
    loc, scale = D.standardise_from_moments(dist.family, mean, std)
    if dist.family in ("exponential", "cauchy"):
        loc = 0.0
    b = np.asarray(beta, np.float64)[..., None]
    tt, ll = tables(dist, n)
    return loc + scale * b * tt, loc + scale * b * ll


def scalar_codebook(family: str, p: int, n: int, beta, mean: float, std: float):
    """Codebook of ``distq.Scalar(dist=family, p=p, refine=False)`` (nearest-level encoding)."""
    off, mul = D.standardise_from_moments(family, 0.0, 1.0)
    if family == "cauchy":
        mul = 1.0
    centre = mean if family in CLASS_A else 0.0
    b = np.asarray(beta, np.float64)[..., None]
    lv = centre + std * (off + mul * b * tables(D.Dist(family, p), n)[1])
    return 0.5 * (lv[..., 1:] + lv[..., :-1]), lv


def search_compat_beta(d: Sorted, name: str, n: int) -> tuple[float, float]:
    """The reference's beta search: smallest mean |error| over its grid (first minimum wins).

    Returns:
      ``(beta, mean absolute error)``.
    """
    grid = np.array(beta_grid(D.parse_dist(name).family))
    t, lv = compat_codebook(name, n, grid, d.mean, d.std)
    l1 = _l1_prefix(d, t, lv)
    i = int(np.argmin(l1))
    return float(grid[i]), float(l1[i])


def continue_compat_beta(d: Sorted, name: str, n: int, beta: float) -> tuple[float, float]:
    """Cheap search for large ``n``: ``beta`` (the previous k's choice) and its two neighbours on
    the reference's grid; the best of the three (first minimum wins)."""
    grid = np.array(beta_grid(D.parse_dist(name).family))
    i = int(np.argmin(np.abs(grid - beta)))
    cand = grid[max(i - 1, 0): i + 2]
    t, lv = compat_codebook(name, n, cand, d.mean, d.std)
    l1 = _l1_prefix(d, t, lv)
    j = int(np.argmin(l1))
    return float(cand[j]), float(l1[j])


def search_scalar_beta(d: Sorted, family: str, p: int, n: int, rounds: int = 2,
                       points: int = 17):
    """distq.Scalar's beta search for the MSE (grid, then zooms in log beta), with exact errors.

    Returns:
      ``(beta, (mean absolute error, mean squared error))``.
    """
    grid = np.array(beta_grid(family))
    l1, mse = errors(d, *scalar_codebook(family, p, n, grid, d.mean, d.std))
    i = int(np.argmin(mse))
    best_b, best = grid[i], (l1[i], mse[i])
    lo = grid[i - 1] if i > 0 else grid[i] / 1.5
    hi = grid[i + 1] if i < grid.size - 1 else grid[i] * 1.5
    for _ in range(rounds):
        bs = np.exp(np.linspace(np.log(lo), np.log(hi), points))
        l1, mse = errors(d, *scalar_codebook(family, p, n, bs, d.mean, d.std))
        j = int(np.argmin(mse))
        if mse[j] < best[1]:
            best_b, best = bs[j], (l1[j], mse[j])
        step = (np.log(hi) - np.log(lo)) / (points - 1)
        lo, hi = best_b * np.exp(-step), best_b * np.exp(step)
    return float(best_b), (float(best[0]), float(best[1]))


CONTINUE_STEP = 0.07  # log-beta step of the large-n search for the squared-error curves


def continue_scalar_beta(d: Sorted, family: str, p: int, n: int, beta: float):
    """Large ``n``: the best of ``beta * exp(-s, 0, +s)`` by squared error (exact, one pass each).
    """
    cand = beta * np.exp(np.array([-CONTINUE_STEP, 0.0, CONTINUE_STEP]))
    l1, mse = errors(d, *scalar_codebook(family, p, n, cand, d.mean, d.std))
    j = int(np.argmin(mse))
    return float(cand[j]), (float(l1[j]), float(mse[j]))


# ------------------------------------------------------------------------------ baselines
def histogram_quantiser(d: Sorted, bins: int, n: int, power: float):
    """Histogram quantiser with ``bins`` uniform bins over [min, max] of the data.

    The ``n`` cells are runs of whole bins: bin ``j`` goes to cell ``floor(n * u_j)``, where
    ``u_j`` is the bin's mid-point under the companding map ``cumsum(count ** power)``
    (``power = 1/2`` is the point density that is optimal for absolute error, ``1/3`` for MSE).
    Each cell is reconstructed at the mean of the data in it (from per-bin sums), so the
    quantiser can never resolve more than ``bins`` cells.

    Returns:
      Thresholds (n-1,) and levels (n,) in data space.
    """
    lo, hi = d.xs[0], d.xs[-1]
    edges = lo + (hi - lo) * np.arange(bins + 1) / bins
    bidx = np.concatenate([[0], np.searchsorted(d.xs, edges[1:-1], side="left"), [d.m]])
    counts = np.diff(bidx).astype(np.float64)
    w = counts**power
    c = np.cumsum(w) / w.sum()
    u = c - 0.5 * w / w.sum()
    cell = np.minimum((u * n).astype(np.int64), n - 1)  # non-decreasing
    first = np.searchsorted(cell, np.arange(1, n), side="left")  # first bin of cells 1..n-1
    t = np.where(first < bins, edges[np.minimum(first, bins)], np.inf)
    tb = np.concatenate([[0], np.searchsorted(d.xs, t, side="left"), [d.m]])
    cnt = np.diff(tb)
    sums = d.p1[tb[1:]] - d.p1[tb[:-1]]
    lo_edge = np.concatenate([[lo], np.minimum(t, hi)])
    lv = np.where(cnt > 0, sums / np.maximum(cnt, 1), lo_edge)
    return t, lv


def lloyd_max(train: np.ndarray, n: int, objective: str, max_iter: int = 300) -> np.ndarray:
    """Lloyd-Max on a (small) training sample: nearest-level cells, then centroids ("mse") or
    lower medians ("mae"); starts from the sample's quantiles. Returns sorted levels."""
    ts = np.sort(train.astype(np.float64))
    size = ts.size
    pref = np.zeros(size + 1)
    np.cumsum(ts, out=pref[1:])
    lv = ts[np.minimum(((np.arange(n) + 0.5) / n * size).astype(np.int64), size - 1)]
    for _ in range(max_iter):
        b = np.concatenate([[0], np.searchsorted(ts, 0.5 * (lv[1:] + lv[:-1])), [size]])
        cnt = np.diff(b)
        if objective == "mse":
            new = np.where(cnt > 0, (pref[b[1:]] - pref[b[:-1]]) / np.maximum(cnt, 1), lv)
        else:
            new = np.where(cnt > 0, ts[np.clip(b[:-1] + (cnt - 1) // 2, 0, size - 1)], lv)
        new = np.sort(new)
        if np.array_equal(new, lv) or np.max(np.abs(new - lv)) <= 1e-12 * (ts[-1] - ts[0]):
            lv = new
            break
        lv = new
    return lv


def qint8(x: np.ndarray, scale: float, zero_point: int = 0, lo: int = -128, hi: int = 127):
    """torch.quantize_per_tensor + dequantize, written out (round half to even, then clamp)."""
    x = np.asarray(x, np.float32)
    q = np.clip(np.round(x / np.float32(scale)) + zero_point, lo, hi)
    return ((q - zero_point) * np.float32(scale)).astype(np.float32)


def quint8_minmax(x: np.ndarray):
    """Affine uint8 with torch's MinMaxObserver choice: range [min(x, 0), max(x, 0)] to 0..255."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255.0
    zp = int(np.clip(round(-lo / scale), 0, 255))
    return qint8(x, scale, zp, 0, 255)


def cast_roundtrip(x: np.ndarray, dtype) -> np.ndarray:
    return np.asarray(x, np.float32).astype(dtype).astype(np.float32)


# ----------------------------------------------------------------------------- one data set
def simulate_dataset(cfg: Config, name: str, rep: int) -> dict:
    """All numpy-side curves for one input distribution and one seed."""
    t0 = time.time()
    x = sample(name, cfg.m, cfg.seed, rep)
    d = prepare(x)
    ks = list(cfg.ks)
    res = {"l1": {}, "mse": {}, "beta_l1": {}, "beta_mse": {}, "points": {}}

    own = OWN_L1[name]
    for vname, _ in L1_VARIANTS:  # the reference's quantisers, beta by absolute error
        beta, l1s, mses, betas = None, [], [], []
        for k in ks:
            n = 1 << k
            if k <= cfg.k_search:
                beta, l1 = search_compat_beta(d, vname, n)
            else:
                beta, l1 = continue_compat_beta(d, vname, n, beta)
            l1s.append(float(l1))
            betas.append(beta)
            if vname == own:  # its squared error is shown in the MSE figure
                mses.append(float(errors(d, *compat_codebook(vname, n, beta, d.mean, d.std))[1]))
        res["l1"][vname] = l1s
        res["beta_l1"][vname] = betas
        if vname == own:
            res["mse"]["p1:" + vname] = mses

    curves = [(fam, 2) for fam in MSE_FAMILIES] + ([("cauchy", 0)] if name == HEAVY else [])
    for fam, p in curves:  # distq's companding with beta by squared error
        beta, mses, l1s, betas = None, [], [], []
        for k in (k for k in ks if k <= cfg.mse_kmax):
            n = 1 << k
            if k <= cfg.k_search:
                beta, (l1, mse) = search_scalar_beta(d, fam, p, n)
            else:
                beta, (l1, mse) = continue_scalar_beta(d, fam, p, n, beta)
            mses.append(float(mse))
            l1s.append(float(l1))
            betas.append(beta)
        res["mse"][f"p{p}:{fam}"] = mses
        res["l1"][f"p{p}:{fam}"] = l1s
        res["beta_mse"][f"p{p}:{fam}"] = betas

    for bins in cfg.hist_bins:
        kmax = int(math.log2(bins))
        hk = [k for k in ks if k <= kmax]
        res["l1"][f"hist:{bins}"] = [
            float(errors(d, *histogram_quantiser(d, bins, 1 << k, 0.5))[0]) for k in hk]
        res["mse"][f"hist:{bins}"] = [
            float(errors(d, *histogram_quantiser(d, bins, 1 << k, 1.0 / 3.0))[1]) for k in hk]

    rng = np.random.default_rng([cfg.seed, 99, rep])
    for size in cfg.lloyd_train:
        train = x[rng.choice(x.size, size, replace=False)]
        lk = [k for k in ks if k <= int(math.log2(size)) - cfg.lloyd_margin]
        for obj, key, col in (("mae", "l1", 0), ("mse", "mse", 1)):
            vals = []
            for k in lk:
                lv = lloyd_max(train, 1 << k, obj, cfg.lloyd_iters)
                vals.append(float(errors(d, 0.5 * (lv[1:] + lv[:-1]), lv)[col]))
            res[key][f"lloyd:{size}"] = vals

    pts = res["points"]
    for s in INT8_SCALES:
        pts[f"qint8:{s}"] = errors_of_values(x, qint8(x, s))
    pts["quint8:minmax"] = errors_of_values(x, quint8_minmax(x))
    pts["float16"] = errors_of_values(x, cast_roundtrip(x, np.float16))
    import ml_dtypes

    pts["bfloat16"] = errors_of_values(x, cast_roundtrip(x, ml_dtypes.bfloat16))
    res["seconds"] = time.time() - t0
    return res


# ------------------------------------------------------------------------- library (JAX) runs
def library_runs(cfg: Config, name: str) -> dict:
    """distq.Scalar (as shipped), distq.Uniform(8) and a distq.compat cross-check on rep 0."""
    import distq
    from distq import compat

    x = sample(name, cfg.m, cfg.seed, 0)
    xl = x[: cfg.lib_m]
    out = {"scalar_p2": {}, "scalar_default": {}, "compat": {}, "uniform8": None}
    for k in cfg.lib_ks:
        for key, spec in (("scalar_p2", distq.Scalar(bits=k, p=2, refine=False)),
                          ("scalar_default", distq.Scalar(bits=k))):
            q = distq.quantize(xl, spec)
            out[key][k] = errors_of_values(xl, np.asarray(q.dequantize()))
    q = distq.quantize(x, distq.Uniform(bits=8))
    out["uniform8"] = errors_of_values(x, np.asarray(q.dequantize()))
    if name in INPUTS:
        for k in cfg.compat_ks:
            for vname, _ in L1_VARIANTS:
                _, info = compat.quantize(x, k=k, dist=vname, beta=None, packbits=False)
                out["compat"][f"{vname}:{k}"] = (info["beta"], info["abs_error"])
    return out


def distquant_heavy_tail(cfg: Config) -> dict | None:
    """Runs the real ``distquant`` package on Student-t(3) data (if torch is installed).

    Counts codes outside 0..n-1 and NaNs after dequantisation, for the searched beta and for
    beta = 1; alongside, our evaluation of the same quantisers (in-range codes) on the same data.
    """
    try:
        import torch
        from distquant import distquant as dq
    except Exception as e:  # noqa: BLE001
        return {"error": f"distquant unavailable: {e!r}"}
    torch.set_num_threads(2)
    x = sample(HEAVY, cfg.distquant_m, cfg.seed, 100)
    d = prepare(x)
    rows = []
    for k in cfg.distquant_ks:
        n = 1 << k
        for vname, _ in L1_VARIANTS:
            ours_beta, ours = search_compat_beta(d, vname, n)
            for beta in (None, 1.0):
                q, info = dq.quantize(torch.from_numpy(x.copy()), k=k, dist=vname, beta=beta,
                                      packbits=False)
                codes = q.numpy()
                deq = dq.dequantize(q.clone(), **info).numpy()
                rows.append({
                    "k": k, "dist": vname, "beta_arg": beta, "beta": float(info["beta"]),
                    "out_of_range": int(((codes < 0) | (codes >= n)).sum()),
                    "nan": int(np.isnan(deq).sum()),
                    "abs_error": float(info["abs_error"]),
                    "ours_beta": ours_beta, "ours_abs_error": ours,
                })
    return {"m": cfg.distquant_m, "rows": rows}


# ------------------------------------------------------------------------------------ driver
def aggregate(per_rep: list[dict]) -> dict:
    """Mean and standard deviation over repetitions of every curve and point."""
    out = {}
    for group in ("l1", "mse"):
        out[group] = {}
        for key in per_rep[0][group]:
            a = np.array([r[group][key] for r in per_rep], np.float64)
            out[group][key] = {"mean": a.mean(0).tolist(), "std": a.std(0).tolist(),
                               "min": a.min(0).tolist(), "max": a.max(0).tolist()}
    out["points"] = {}
    for key in per_rep[0]["points"]:
        a = np.array([r["points"][key] for r in per_rep], np.float64)  # (reps, 2)
        out["points"][key] = {
            g: {"mean": a[:, j].mean(), "std": a[:, j].std(), "min": a[:, j].min(),
                "max": a[:, j].max()} for j, g in enumerate(("l1", "mse"))}
    for group in ("beta_l1", "beta_mse"):
        out[group] = {key: [r[group][key] for r in per_rep] for key in per_rep[0][group]}
    return out


def run(cfg: Config, log=print) -> dict:
    """Everything except the figures; returns a JSON-serialisable dict."""
    t0 = time.time()
    warm_tables(cfg)
    log(f"codebook tables: {time.time() - t0:.1f}s")
    jobs = [(name, rep) for name in cfg.inputs for rep in range(cfg.reps)]
    per, lib, dq = {}, {}, None

    def library_phase():  # JAX, in this process (single-threaded compiles overlap the workers)
        nonlocal dq
        t1 = time.time()
        for name in cfg.inputs:
            lib[name] = library_runs(cfg, name)
            log(f"  library runs {name}: {time.time() - t1:.1f}s")
        dq = distquant_heavy_tail(cfg)
        log(f"library runs: {time.time() - t1:.1f}s")

    if cfg.threads <= 1:
        for job in jobs:
            per[job] = simulate_dataset(cfg, *job)
        if cfg.library:
            library_phase()
    else:
        with _pool(cfg) as pool:  # forks here, before JAX is initialised by the library runs
            futures = {job: pool.submit(simulate_dataset, cfg, *job) for job in jobs}
            if cfg.library:
                library_phase()
            for job, fut in futures.items():
                per[job] = fut.result()
    for job in jobs:
        log(f"  {job[0]:<12} rep {job[1]}: {per[job]['seconds']:.1f}s")
    log(f"simulations done: {time.time() - t0:.1f}s")
    results = {
        "config": dataclasses.asdict(cfg),
        "inputs": {},
    }
    for name in cfg.inputs:
        agg = aggregate([per[(name, r)] for r in range(cfg.reps)])
        agg["min_l1"] = min_l1(name, cfg.ks).tolist()
        agg["min_mse"] = min_mse(name, cfg.ks).tolist()
        agg["rep0"] = per[(name, 0)]  # for the compat cross-check
        if name in lib:
            agg["library"] = lib[name]
        results["inputs"][name] = agg
    if cfg.library:
        results["distquant_t3"] = dq
    results["seconds"] = time.time() - t0
    return results


# ----------------------------------------------------------------------------------- figures
COLORS = {v: f"C{i}" for i, (v, _) in enumerate(L1_VARIANTS)}
BASELINE_COLORS = {"hist": ("saddlebrown", "darkviolet"), "lloyd": ("goldenrod", "teal")}
#: the paper's variant that is best for absolute error on each input (shown in the MSE figure)
OWN_L1 = {"gaussian": "gaussian", "logistic": "logistic", "gumbel": "gumbel",
          "exponential": "exponential", HEAVY: "cauchy_cdf"}
P2_COLORS = {"gaussian": "C0", "logistic": "C5", "gumbel": "C3", "exponential": "C1"}
POINT_STYLE = {
    "qint8:0.01": ("0.55", "v", "torch-style qint8 (scale .01)"),
    "qint8:0.03": ("0.0", "^", "torch-style qint8 (scale .03)"),
    "qint8:0.1": ("0.3", "<", "torch-style qint8 (scale .1)"),
    "qint8:0.3": ("0.45", ">", "torch-style qint8 (scale .3)"),
    "quint8:minmax": ("C9", "s", "quint8, min-max calibrated"),
    "uniform8": ("k", "D", "distq.Uniform(8), absmax"),
    "float16": ("C7", "o", "float16"),
    "bfloat16": ("C8", "o", "bfloat16"),
}


def _band(ax, ks, c, minline, n=None, **kw):
    """Mean over the data sets as a line, their range (min..max) as a band, in both panels."""
    n = len(c["mean"]) if n is None else n
    ks = np.asarray(ks)[:n]
    mean, lo, hi = (np.asarray(c[key][:n]) for key in ("mean", "min", "max"))
    ref = minline[:n]
    line = ax[0].plot(ks, mean, **kw)[0]
    ax[0].fill_between(ks, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    kw2 = {k: v for k, v in kw.items() if k != "label"}
    ax[1].plot(ks, mean / ref, **kw2)
    ax[1].fill_between(ks, lo / ref, hi / ref, color=line.get_color(), alpha=0.2, lw=0)


def _point(ax, k, val, minline_at_k, key):
    """A single quantiser at ``k`` bits: mean with a min..max bar (``val``: stats dict or float)."""
    color, marker, label = POINT_STYLE[key]
    if not isinstance(val, dict):
        val = {"mean": val, "min": val, "max": val}
    m = val["mean"]
    fill = color if marker != "D" else "none"
    ax[0].errorbar([k], [m], yerr=[[m - val["min"]], [val["max"] - m]], color=color,
                   marker=marker, ls="none", ms=7, label=label, mfc=fill)
    ax[1].plot([k], [m / minline_at_k], color=color, marker=marker, ls="none", ms=7, mfc=fill)


def _finish(fig, ax, title, ylabel, ratio_label, ks, ylim, rlim):
    import matplotlib.ticker as mt

    ax[0].set_yscale("log")
    ax[0].set_ylim(*ylim)
    ax[0].set_title(title)
    ax[0].set_ylabel(ylabel)
    ax[0].grid(True, which="major", alpha=0.3)
    ax[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, frameon=False)
    ax[1].set_yscale("log")
    ax[1].set_ylim(*rlim)
    ticks = (0.2, 0.3, 0.5, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0, 4.0, 6.0, 10.0)
    if rlim[1] / rlim[0] > 10:
        ticks = (0.2, 0.3, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
    ticks = [t for t in ticks if rlim[0] <= t <= rlim[1]]
    ax[1].yaxis.set_major_locator(mt.FixedLocator(ticks))
    ax[1].yaxis.set_major_formatter(mt.FormatStrFormatter("%g"))
    ax[1].yaxis.set_minor_formatter(mt.NullFormatter())
    ax[1].axhline(1.0, color="k", ls=":", lw=1.2)
    ax[1].set_ylabel(ratio_label)
    ax[1].set_xlabel("k (bits per value)")
    ax[1].grid(True, which="major", alpha=0.3)
    for a in ax:
        a.set_xlim(0.5, max(ks) + 0.5)
        a.xaxis.set_major_locator(mt.MultipleLocator(2))


def _new_fig():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 1, figsize=(11.5, 9.0), sharex=True,
                           gridspec_kw={"height_ratios": [2.3, 1.0], "hspace": 0.08})
    fig.subplots_adjust(left=0.08, right=0.72, top=0.95, bottom=0.07)
    return fig, ax


def _reps_note(cfg: dict) -> str:
    return (f"{cfg['reps']} data sets of 2^{int(math.log2(cfg['m']))} samples each; "
            f"lines: mean, bands: min..max over the data sets")


def plot_l1(results: dict, name: str, path: str) -> None:
    import matplotlib.pyplot as plt

    cfg = results["config"]
    r = results["inputs"][name]
    ks = np.array(cfg["ks"])
    mn = np.array(r["min_l1"])
    fig, ax = _new_fig()
    for vname, label in L1_VARIANTS:
        c = r["l1"][vname]
        _band(ax, ks, c, mn, color=COLORS[vname], lw=1.6, label=label)
    for key, st in (("hist", "--"), ("lloyd", "--")):
        col = BASELINE_COLORS[key]
        sizes = cfg["hist_bins"] if key == "hist" else cfg["lloyd_train"]
        for size, color in zip(sizes, col):
            c = r["l1"][f"{key}:{size}"]
            kk = ks[: len(c["mean"])]
            lab = (f"Histogram (2^{int(math.log2(size))} bins, sqrt-density)" if key == "hist"
                   else f"Lloyd-Max, medians (2^{int(math.log2(size))} training samples)")
            _band(ax, kk, c, mn, color=color, ls=st, lw=1.4, label=lab)
    for key in ("qint8:0.01", "qint8:0.03", "qint8:0.1", "qint8:0.3", "quint8:minmax"):
        p = r["points"][key]["l1"]
        _point(ax, 8, p, mn[7], key)
    lib = r.get("library")
    if lib and lib.get("uniform8"):
        _point(ax, 8, lib["uniform8"][0], mn[7], "uniform8")
    for key in ("float16", "bfloat16"):
        _point(ax, 16, r["points"][key]["l1"], mn[15], key)
    ax[0].plot(ks, mn, "k:", lw=1.8, label="Minimal error (high-rate)\n" r"$1/(4\kappa^2 2^k)$")
    _finish(fig, ax, f"Absolute error, {TITLES[name]} input data\n({_reps_note(cfg)})",
            r"mean absolute error ($\ell_1$)", "ratio to minimal error", ks,
            (min(mn.min(), 1e-6) / 2, 2.0), (0.5, 3.0) if name != HEAVY else RATIO_LIM_HEAVY)
    fig.savefig(path, dpi=110)
    plt.close(fig)


RATIO_LIM_MSE = (0.5, 4.0)
RATIO_LIM_HEAVY = (0.2, 10.0)


def plot_mse(results: dict, name: str, path: str) -> None:
    import matplotlib.pyplot as plt

    cfg = results["config"]
    r = results["inputs"][name]
    ks = np.array([k for k in cfg["ks"] if k <= cfg["mse_kmax"]])
    mn = np.array(r["min_mse"])[: ks.size]
    fig, ax = _new_fig()
    for fam in MSE_FAMILIES:
        c = r["mse"]["p2:" + fam]
        _band(ax, ks, c, mn, color=P2_COLORS[fam], lw=1.6,
              label=f"{fam.capitalize()}, p=2 companding")
    if "p0:cauchy" in r["mse"]:
        c = r["mse"]["p0:cauchy"]
        _band(ax, ks, c, mn, color="C6", lw=1.6,
              label="Cauchy CDF (p=0), beta for MSE")
    own = OWN_L1[name]
    c = r["mse"]["p1:" + own]
    _band(ax, ks, c, mn, n=ks.size, color="deeppink", lw=1.6,
          ls="-.",
          label=f"{dict(L1_VARIANTS)[own]} (paper's best for\nabs. error; beta for abs. error)")
    for key in ("hist", "lloyd"):
        col = BASELINE_COLORS[key]
        sizes = cfg["hist_bins"] if key == "hist" else cfg["lloyd_train"]
        for size, color in zip(sizes, col):
            c = r["mse"][f"{key}:{size}"]
            kk = ks[: len(c["mean"])]
            lab = (f"Histogram (2^{int(math.log2(size))} bins, cube-root)" if key == "hist"
                   else f"Lloyd-Max, centroids (2^{int(math.log2(size))} training samples)")
            _band(ax, kk, c, mn, color=color, ls="--", lw=1.4, label=lab)
    lib = r.get("library")
    if lib:
        for key, marker, label in (
            ("scalar_p2", "x", "distq.Scalar(p=2, refine=False)\n(as shipped, auto family)"),
            ("scalar_default", "+", "distq.Scalar() default\n(as shipped, Lloyd-Max refine)"),
        ):
            kk = np.array(sorted(int(k) for k in lib[key]))
            v = np.array([lib[key][k if k in lib[key] else str(k)][1] for k in kk])
            ax[0].plot(kk, v, color="k", marker=marker, ms=8, lw=0.8, label=label)
            ratio = v / mn[kk - 1]
            top = (RATIO_LIM_MSE if name != HEAVY else RATIO_LIM_HEAVY)[1]
            shown = np.minimum(ratio, top * 0.97)
            ax[1].plot(kk, shown, color="k", marker=marker, ms=8, lw=0.8)
            for kx, rx in zip(kk, ratio):  # off-scale ratios: write the value at the top edge
                if rx > top:
                    ax[1].annotate(f"{rx:.0f}x" if rx >= 10 else f"{rx:.1f}x", (kx, top * 0.97),
                                   xytext=(0, -14 if key == "scalar_p2" else -26),
                                   textcoords="offset points", ha="center", fontsize=7.5)
        _point(ax, 8, lib["uniform8"][1], mn[7], "uniform8")
    for key in ("qint8:0.01", "qint8:0.03", "qint8:0.1", "qint8:0.3", "quint8:minmax"):
        p = r["points"][key]["mse"]
        _point(ax, 8, p, mn[7], key)
    for key in ("float16", "bfloat16"):
        _point(ax, 16, r["points"][key]["mse"], mn[15], key)
    ax[0].plot(ks, mn, "k:", lw=1.8, label="Panter-Dite (high-rate)\n"
               r"$\frac{1}{12}(\int f^{1/3})^3\,2^{-2k}$")
    _finish(fig, ax, f"Squared error, {TITLES[name]} input data\n({_reps_note(cfg)})",
            "mean squared error", "ratio to Panter-Dite", ks, (mn.min() / 3, 3.0),
            RATIO_LIM_MSE if name != HEAVY else RATIO_LIM_HEAVY)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_figures(results: dict, out_dir: str = FIG_DIR) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name in results["config"]["inputs"]:
        tag = "t3" if name == HEAVY else name
        for kind, fn in (("l1", plot_l1), ("mse", plot_mse)):
            p = os.path.join(out_dir, f"{kind}_{tag}.png")
            fn(results, name, p)
            paths.append(p)
    return paths


# ---------------------------------------------------------------------------------- summary
def summary(results: dict, ks=(2, 4, 8, 16)) -> str:
    """Plain-text tables of the key numbers (printed, and pasted into SIMULATIONS.md)."""
    cfg = results["config"]
    allk = list(cfg["ks"])
    ks = [k for k in ks if k in allk]
    lines = []

    def baseline_rows(err: dict) -> list:
        """The histogram and small-sample Lloyd-Max rows of one error kind."""
        rows = [(f"histogram 2^{int(math.log2(b))}", err[f"hist:{b}"]["mean"])
                for b in cfg["hist_bins"]]
        return rows + [(f"Lloyd-Max 2^{int(math.log2(s))} samples", err[f"lloyd:{s}"]["mean"])
                       for s in cfg["lloyd_train"]]

    def ratio_rows(ref_label: str, mn, rows) -> list[str]:
        """The reference line, then each row as ``value (value / reference)`` at ``ks``."""
        out = [f"| {ref_label} | " + " | ".join(f"{mn[allk.index(k)]:.3g}" for k in ks) + " |"]
        for lab, vals in rows:
            cells = []
            for k in ks:
                i = allk.index(k)
                cells.append(f"{vals[i]:.3g} ({vals[i] / mn[i]:.2f})" if i < len(vals) else "-")
            out.append(f"| {lab} | " + " | ".join(cells) + " |")
        return out

    for name in cfg["inputs"]:
        r = results["inputs"][name]
        lines.append(f"\n## {TITLES[name]}: mean |error| (ratio to minimal)")
        head = "| quantiser | " + " | ".join(f"k={k}" for k in ks) + " |"
        lines += [head, "|" + "---|" * (len(ks) + 1)]
        mn = r["min_l1"]
        rows = [(lab, r["l1"][v]["mean"]) for v, lab in L1_VARIANTS]
        lines += ratio_rows("minimal (high-rate)", mn, rows + baseline_rows(r["l1"]))
        lines.append(f"\n## {TITLES[name]}: mean squared error (ratio to Panter-Dite)")
        lines += [head, "|" + "---|" * (len(ks) + 1)]
        mn = r["min_mse"]
        rows = [(f"{f} p=2", r["mse"]["p2:" + f]["mean"]) for f in MSE_FAMILIES]
        if "p0:cauchy" in r["mse"]:
            rows.append(("cauchy_cdf p=0, beta for MSE", r["mse"]["p0:cauchy"]["mean"]))
        own = OWN_L1[name]
        rows.append((f"{own} (paper, beta for abs. error)", r["mse"]["p1:" + own]["mean"]))
        lines += ratio_rows("Panter-Dite", mn, rows + baseline_rows(r["mse"]))
        lib = r.get("library")
        if lib:
            for key, lab in (("scalar_p2", "distq.Scalar(p=2, refine=False)"),
                             ("scalar_default", "distq.Scalar() default")):
                cells = []
                for k in ks:
                    v = lib[key].get(k, lib[key].get(str(k)))
                    cells.append("-" if v is None else
                                 f"{v[1]:.3g} ({v[1] / mn[allk.index(k)]:.2f})")
                lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        p = r["points"]
        pts = ", ".join(f"{key} {p[key]['l1']['mean']:.3g}/{p[key]['mse']['mean']:.3g}"
                        for key in p)
        lines.append(f"\npoints (L1/MSE): {pts}")
        if lib and lib.get("uniform8"):
            lines.append(f"distq.Uniform(8): {lib['uniform8'][0]:.3g}/{lib['uniform8'][1]:.3g}")
        b = r["beta_l1"]
        idx = [allk.index(k) for k in allk if cfg["k_search"] - 2 <= k <= cfg["k_search"]]
        lines.append("searched beta (abs. error) at k=" + ",".join(str(allk[i]) for i in idx)
                     + " (rep 0): " + "; ".join(f"{v} {[b[v][0][i] for i in idx]}"
                                                for v, _ in L1_VARIANTS))
        if lib and lib.get("compat"):
            rep0 = r["rep0"]
            worst = 0.0
            mism = []
            for key, (cb, ce) in lib["compat"].items():
                vname, k = key.split(":")
                i = allk.index(int(k))
                ob, oe = rep0["beta_l1"][vname][i], rep0["l1"][vname][i]
                worst = max(worst, abs(oe - ce) / ce)
                if abs(ob - cb) > 1e-9:
                    mism.append(f"{key}: beta {ob} vs compat {cb}")
            lines.append(f"cross-check vs distq.compat.quantize (k={cfg['compat_ks']}): max "
                         f"relative difference of abs_error {worst:.2e}; beta mismatches: "
                         f"{mism if mism else 'none'}")
    dq = results.get("distquant_t3")
    if dq and "rows" in dq:
        lines.append(f"\n## distquant 0.1.0 on Student-t(3) data (2^{int(math.log2(dq['m']))} "
                     "samples)")
        lines.append("| k | dist | beta arg | beta used | codes out of range | NaN after "
                     "dequantize | distquant abs_error | ours: beta, abs_error |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for row in dq["rows"]:
            lines.append(
                f"| {row['k']} | {row['dist']} | {row['beta_arg']} | {row['beta']:.3g} | "
                f"{row['out_of_range']} | {row['nan']} | {row['abs_error']:.4g} | "
                f"{row['ours_beta']:.3g}, {row['ours_abs_error']:.4g} |")
    elif dq:
        lines.append(f"\ndistquant: {dq['error']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small samples (about a minute)")
    ap.add_argument("--no-library", action="store_true",
                    help="skip the JAX library runs (distq.Scalar/Uniform/compat, distquant)")
    ap.add_argument("--out", default=FIG_DIR, help="output directory (default experiments/figures)")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw the figures and tables from <out>/simulations.json")
    args = ap.parse_args(argv)
    if args.replot:
        with open(os.path.join(args.out, "simulations.json")) as f:
            results = json.load(f)
        write_figures(results, args.out)
        text = summary(results)
        print(text)
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write(text + "\n")
        return 0
    cfg = QUICK if args.quick else FULL
    if args.no_library:
        cfg = dataclasses.replace(cfg, library=False)
    t0 = time.time()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log(f"config: {cfg}")
    results = run(cfg, log)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "simulations.json"), "w") as f:
        json.dump(results, f, default=float)
    paths = write_figures(results, args.out)
    text = summary(results)
    print(text)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text + "\n")
    log(f"wrote {len(paths)} figures to {args.out}; total {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
