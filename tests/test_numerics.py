"""Kernels behind the scalar quantisers, each against an independent NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distq
from distq.core import _numerics as nx
from distq.core import distributions as D
from distq.core import search as S


def test_sort_float_matches_numpy_including_signed_zero_and_extremes():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(5000) * 10.0 ** rng.integers(-30, 30, 5000),
        [0.0, -0.0, 3.4e38, -3.4e38, 1e-45, -1e-45],
    ]).astype(np.float32)
    out = np.asarray(jax.jit(nx.sort_float)(jnp.asarray(x)))
    np.testing.assert_array_equal(out, np.sort(x))
    w = rng.standard_normal(x.size).astype(np.float32)
    xs, ws = nx.sort_float(jnp.asarray(x), jnp.asarray(w))
    order = np.argsort(x, kind="stable")
    np.testing.assert_array_equal(np.asarray(xs), x[order])
    # ties (the two zeros) may swap payloads; compare as multisets per value
    assert np.allclose(np.sort(np.asarray(ws)), np.sort(w))


@pytest.mark.parametrize("m", [0, 1, 3, 7, 15, 24, 100, 255, 256, 1000])
@pytest.mark.parametrize("ties", [False, True])
def test_bucketize_equals_searchsorted(m, ties):
    # select-tree search up to 255 thresholds, gathered search above: both against numpy,
    # with repeated thresholds too (constant data gives all-equal ones)
    rng = np.random.default_rng(m)
    t = np.sort(rng.standard_normal(m)).astype(np.float32)
    if ties:
        t = np.round(t, 1)
    x = np.concatenate([rng.standard_normal(20_000) * 2, t, [np.inf, -np.inf]]).astype(np.float32)
    got = np.asarray(jax.jit(nx.bucketize)(jnp.asarray(x), jnp.asarray(t)))
    np.testing.assert_array_equal(got, np.searchsorted(t, x, side="right"))
    if m:
        assert int(nx.bucketize(jnp.asarray([np.nan], jnp.float32), jnp.asarray(t))[0]) == 0


def test_search_bits_needs_a_full_tree():
    with pytest.raises(ValueError, match="2\\*\\*d - 1"):
        nx.search_bits(jnp.zeros(3), jnp.zeros(4))


def test_prefix_sums_ranges_are_accurate():
    rng = np.random.default_rng(1)
    v = np.sort(rng.standard_normal(1_000_003)).astype(np.float32)
    p = nx.PrefixSums.build(jnp.asarray(v))
    a = rng.integers(0, v.size, 500)
    b = rng.integers(0, v.size + 1, 500)
    a, b = np.minimum(a, b), np.maximum(a, b)
    got = np.asarray(p.range(jnp.asarray(a), jnp.asarray(b)), np.float64)
    cs = np.concatenate([[0.0], np.cumsum(v.astype(np.float64))])
    want = cs[b] - cs[a]
    plain = np.concatenate([[0.0], np.cumsum(v, dtype=np.float32)]).astype(np.float64)
    plain_err = np.max(np.abs((plain[b] - plain[a]) - want))
    ours_err = np.max(np.abs(got - want))
    # near the float32 resolution of the sums themselves (|sum| < 3e5: ulp 0.03)
    assert ours_err < 0.1
    assert ours_err * 5 < plain_err


def _np_error(x, t, lv, objective):
    c = np.searchsorted(t, x, side="right")
    d = x.astype(np.float64) - lv[c]
    return np.sum(d * d) if objective == "mse" else np.sum(np.abs(d))


@pytest.mark.parametrize("objective", ["mse", "mae"])
def test_range_errors_match_direct_evaluation(objective):
    rng = np.random.default_rng(2)
    x = np.sort(rng.standard_t(5, 50_000)).astype(np.float32)
    xs = jnp.asarray(x)
    p1 = nx.PrefixSums.build(xs)
    p2 = nx.PrefixSums.build(xs * xs)
    for n in (2, 5, 16, 64):
        lv = np.sort(rng.standard_normal(n) * 2).astype(np.float32)
        t = np.sort(rng.uniform(-3, 3, n - 1)).astype(np.float32)
        got = float(nx.range_errors(xs, p1, p2, jnp.asarray(t), jnp.asarray(lv), objective))
        assert got == pytest.approx(_np_error(x, t, lv, objective), rel=2e-4)


def test_grid_search_picks_the_brute_force_winner():
    rng = np.random.default_rng(3)
    x = np.sort(rng.logistic(0, 1, 30_000)).astype(np.float32)
    dists = (D.Dist("gaussian", 1), D.Dist("logistic", 0), D.Dist("cauchy", 0))
    offs = np.zeros(3, np.float32)
    muls = np.ones(3, np.float32)
    cands = S.Candidates(dists, 16, offs, muls, encode="companding")
    err, row, col = S.grid_search(jnp.asarray(x), cands, "mae")
    brute = np.full(cands.betas.shape, np.inf)
    for i, d in enumerate(dists):
        for j, b in enumerate(cands.betas[i]):
            if np.isnan(b):
                continue
            t = (b * D.thresholds(d, 16)).astype(np.float32)
            lv = (b * D.levels(d, 16)).astype(np.float32)
            brute[i, j] = _np_error(x, t, lv, "mae")
    i, j = np.unravel_index(np.argmin(brute), brute.shape)
    assert (int(row), int(col)) == (i, j)
    np.testing.assert_allclose(np.asarray(err)[np.isfinite(brute)], brute[np.isfinite(brute)],
                               rtol=2e-4)


def test_zoom_never_worse_than_grid():
    rng = np.random.default_rng(4)
    x = jnp.asarray(np.sort(rng.standard_normal(20_000)).astype(np.float32))
    cands = S.Candidates((D.Dist("gaussian", 2),), 8, np.zeros(1, np.float32),
                         np.ones(1, np.float32), encode="nearest")
    err, row, col = S.grid_search(x, cands, "mse")
    b, e = S.zoom_search(x, cands, "mse", row, col)
    assert float(e) <= float(err[row, col]) + 1e-6


def test_lloyd_weighted_fixed_point_and_fixed_level():
    rng = np.random.default_rng(5)
    x = np.sort(rng.standard_normal(40_000)).astype(np.float32)
    w = rng.uniform(0.5, 2.0, x.size).astype(np.float32)
    init = np.linspace(-2, 2, 8).astype(np.float32)
    fixed = np.arange(8) == 3
    lv, it = nx.lloyd_sorted(jnp.asarray(x), jnp.asarray(init), objective="mse",
                             weights=jnp.asarray(w), fixed=jnp.asarray(fixed), max_iter=5000)
    lv = np.asarray(lv)
    assert lv[3] == init[3] and int(it) < 5000
    # at convergence every free level is the weighted centroid of its cell
    c = np.searchsorted(0.5 * (lv[1:] + lv[:-1]), x, side="right")
    for j in range(8):
        if not fixed[j]:
            m = c == j
            assert lv[j] == pytest.approx(np.sum(w[m] * x[m]) / np.sum(w[m]), abs=2e-5)


def test_lloyd_mae_levels_are_cell_medians():
    rng = np.random.default_rng(6)
    x = np.sort(rng.laplace(0, 1, 20_001)).astype(np.float32)
    lv, _ = nx.lloyd_sorted(jnp.asarray(x), jnp.linspace(-3, 3, 6), objective="mae",
                            max_iter=5000)
    lv = np.asarray(lv)
    c = np.searchsorted(0.5 * (lv[1:] + lv[:-1]), x, side="right")
    for j in range(6):
        cell = x[c == j]
        below, above = np.sum(cell < lv[j]), np.sum(cell > lv[j])
        assert abs(int(below) - int(above)) <= 1


def test_sampled_fit_is_stable():
    """Codebooks fitted on a strided sample (fit_size) give nearly the error of a full fit."""
    rng = np.random.default_rng(7)
    x = rng.standard_t(6, 1 << 20).astype(np.float32)
    errs = {}
    for fit in (1 << 14, 1 << 16, 1 << 20):
        q = distq.quantize(x, distq.Scalar(bits=4, fit_size=fit))
        errs[fit] = float(np.mean((np.asarray(q.dequantize()) - x) ** 2))
    assert errs[1 << 16] <= errs[1 << 20] * 1.01
    assert errs[1 << 14] <= errs[1 << 20] * 1.03
