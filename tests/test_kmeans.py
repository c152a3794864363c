"""Tests for distq.kmeans: seeding, Lloyd iterations, batching, determinism, tracing."""

from __future__ import annotations

import doctest

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distq.core import kmeans as km


# ------------------------------------------------------------------------------ references
def np_assign(x: np.ndarray, c: np.ndarray):
    d2 = ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)
    return d2.argmin(1), d2.min(1)


def np_lloyd(x: np.ndarray, c: np.ndarray, iters: int) -> np.ndarray:
    """Plain Lloyd in float64 (empty clusters keep their centroid)."""
    c = c.astype(np.float64).copy()
    for _ in range(iters):
        a, _ = np_assign(x, c)
        for j in range(c.shape[0]):
            if np.any(a == j):
                c[j] = x[a == j].mean(0)
    return c


def blobs(seed: int, k: int, n_per: int, d: int, spread: float = 20.0, noise: float = 0.3):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-spread, spread, (k, d)).astype(np.float32)
    x = centres[:, None, :] + noise * rng.standard_normal((k, n_per, d)).astype(np.float32)
    return x.reshape(-1, d), centres


def clustered(seed: int, n: int, k_true: int, d: int, sigma: float = 0.1):
    """Rows drawn from ``k_true`` N(0, 1) centres + noise (one sub-space of the PQ benchmark)."""
    rng = np.random.default_rng(seed)
    cents = rng.standard_normal((k_true, d)).astype(np.float32)
    x = cents[rng.integers(0, k_true, n)] + sigma * rng.standard_normal((n, d))
    return x.astype(np.float32)


CFG = km.KMeans(k=6)
X_BLOBS, C_BLOBS = blobs(0, 6, 50, 3)


# ----------------------------------------------------------------------------------- tests
def test_finds_true_centres_and_matches_numpy_lloyd():
    res = km.fit(jax.random.key(0), X_BLOBS, CFG)
    c = np.asarray(res.centroids)
    # every true centre has a fitted centroid within the noise level
    dist = np.sqrt(((C_BLOBS[:, None] - c[None]) ** 2).sum(-1))
    assert dist.min(1).max() < 0.2
    assert sorted(dist.argmin(1).tolist()) == list(range(6))
    # the same seeds refined by a float64 numpy Lloyd land on the same centroids
    seeds = np.asarray(km.seed(jax.random.key(3), X_BLOBS, 6))
    ours = np.asarray(km.lloyd(X_BLOBS, seeds, iters=10, tol=0.0).centroids)
    np.testing.assert_allclose(ours, np_lloyd(X_BLOBS, seeds, 10), atol=1e-4)
    # reported inertia is the true sum of squared distances to the returned centroids
    np.testing.assert_allclose(float(res.inertia), np_assign(X_BLOBS, c)[1].sum(), rtol=1e-4)


def test_assign_matches_bruteforce():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((700, 5)).astype(np.float32)
    c = rng.standard_normal((9, 5)).astype(np.float32)
    codes, d2 = km.assign(x, c, block=128)  # several blocks + a ragged one
    ref_codes, ref_d2 = np_assign(x, c)
    np.testing.assert_array_equal(np.asarray(codes), ref_codes)
    np.testing.assert_allclose(np.asarray(d2), ref_d2, rtol=1e-4, atol=1e-4)
    # batched form
    cb, db = km.assign(np.stack([x, -x]), np.stack([c, c]), block=128)
    np.testing.assert_array_equal(np.asarray(cb[1]), np_assign(-x, c)[0])


def test_seeds_are_distinct_data_rows():
    rows = {tuple(r) for r in X_BLOBS.tolist()}
    for init, trials in (("greedy", None), ("kmeans++", 1), ("random", None)):
        c = np.asarray(km.seed(jax.random.key(3), X_BLOBS, 6, trials=trials, init=init))
        assert c.shape == (6, 3)
        assert all(tuple(r) in rows for r in c.tolist())
        assert len({tuple(r) for r in c.tolist()}) == 6


X_MANY = clustered(2, 1000, 32, 4)
CFG_MANY = km.KMeans(k=32)


def test_greedy_seeding_beats_random_on_clustered_data():
    scores = {}
    for cfg in (CFG_MANY, km.KMeans(k=32, init="random")):
        scores[cfg.init] = [float(km.fit(jax.random.key(s), X_MANY, cfg).inertia)
                            for s in range(3)]
    # greedy k-means++ finds (nearly) every true cluster; random seeding leaves some merged
    assert max(scores["greedy"]) < 0.7 * min(scores["random"])
    noise_floor = 1000 * 4 * 0.1**2
    assert np.mean(scores["greedy"]) < 1.5 * noise_floor


def test_deterministic_per_key():
    a = km.fit(jax.random.key(7), X_MANY, CFG_MANY)
    b = km.fit(jax.random.key(7), X_MANY, CFG_MANY)
    c = km.fit(jax.random.key(8), X_MANY, CFG_MANY)
    np.testing.assert_array_equal(np.asarray(a.centroids), np.asarray(b.centroids))
    assert float(a.inertia) == float(b.inertia)
    assert not np.array_equal(np.asarray(a.centroids), np.asarray(c.centroids))


def is_fixed_point(x, c) -> bool:
    a, _ = np_assign(x, c)
    return all(np.allclose(c[j], x[a == j].mean(0), atol=1e-4) for j in np.unique(a))


def test_vmap_equals_per_problem_and_batched_input():
    xs = np.stack([X_BLOBS, X_BLOBS[::-1] * 0.5, X_BLOBS + 3.0])
    keys = jax.random.split(jax.random.key(0), 3)
    batched = jax.vmap(lambda k, x: km.fit(k, x, CFG))(keys, xs)
    for i in range(3):
        single = km.fit(keys[i], xs[i], CFG)
        np.testing.assert_allclose(np.asarray(batched.centroids[i]),
                                   np.asarray(single.centroids), atol=1e-5)
        assert int(batched.iters[i]) == int(single.iters)
    # one (B, N, d) call solves every problem (converged Lloyd fixed points)
    many = km.fit(jax.random.key(0), xs, CFG)
    assert many.centroids.shape == (3, 6, 3) and many.inertia.shape == (3,)
    for i in range(3):
        assert is_fixed_point(xs[i], np.asarray(many.centroids[i]))


def test_empty_clusters_are_reseeded():
    far = np.full((3,), 1e4, np.float32)
    init = np.stack([C_BLOBS[0]] + [far] * 5)  # five centroids nobody will pick
    res = km.lloyd(X_BLOBS, init, iters=10, tol=0.0)
    codes, _ = km.assign(X_BLOBS, res.centroids)
    assert np.bincount(np.asarray(codes), minlength=6).min() > 0
    assert np.abs(np.asarray(res.centroids)).max() < 100


def test_early_stop_before_budget():
    res = km.fit(jax.random.key(0), X_BLOBS, CFG)
    assert 1 <= int(res.iters) < CFG.iters  # no assignment changed long before the budget
    assert is_fixed_point(X_BLOBS, np.asarray(res.centroids))


def test_restarts_and_sampling():
    cfg = km.KMeans(k=6, restarts=3, sample=200, seed_sample=100, seed_score=50)
    assert cfg.sample_size(10**6) == 200 and cfg.seed_size(10**6) == 100
    assert km.KMeans(k=16).sample_size(10**6) == 512 * 16
    assert km.KMeans(k=16).seed_size(10**6) == 32 * 16
    assert km.KMeans(k=16).trials == 2 + int(np.log(16))
    res = km.fit(jax.random.key(0), X_BLOBS, cfg)
    assert res.centroids.shape == (6, 3)
    dist = np.sqrt(((C_BLOBS[:, None] - np.asarray(res.centroids)[None]) ** 2).sum(-1))
    assert dist.min(1).max() < 0.3  # 200 of 300 rows are plenty for 6 blobs


def test_no_retrace():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def fit(key, x):
        return km.fit(key, x, CFG)

    for s in range(3):
        fit(jax.random.key(s), X_BLOBS + s)
    # the library's own jitted entry point is compiled once per shape and config too
    km.fit(jax.random.key(0), X_BLOBS, CFG)
    before = km._fit_jit._cache_size()
    for s in range(3):
        km.fit(jax.random.key(s), X_BLOBS * (1 + s), CFG)
    assert km._fit_jit._cache_size() == before


def test_verbose_reports_progress(capsys):
    km.fit(jax.random.key(0), X_BLOBS, km.KMeans(k=6, iters=3, verbose=True))
    jax.effects_barrier()
    out = capsys.readouterr().out
    assert "k-means iteration 0: inertia" in out


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        (dict(k=0), ValueError),
        (dict(k=2.5), TypeError),
        (dict(k=4, iters=-1), ValueError),
        (dict(k=4, tol=-1.0), ValueError),
        (dict(k=4, init="forgy"), ValueError),
        (dict(k=4, restarts=0), ValueError),
        (dict(k=4, seed_trials=0), ValueError),
    ],
)
def test_config_validation(kwargs, exc):
    with pytest.raises(exc):
        km.KMeans(**kwargs)


def test_fit_input_validation():
    with pytest.raises(TypeError):
        km.fit(jax.random.key(0), np.ones((10, 2), np.int32), 2)
    with pytest.raises(ValueError, match="at least k=8"):
        km.fit(jax.random.key(0), np.ones((5, 2), np.float32), 8)
    bad = np.ones((10, 2), np.float32)
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        km.fit(jax.random.key(0), bad, 2)
    with pytest.raises(ValueError, match="shape"):
        km.fit(jax.random.key(0), np.ones((10,), np.float32), 2)


@pytest.mark.slow
def test_doctests():
    failures, _ = doctest.testmod(km, optionflags=doctest.ELLIPSIS)
    assert failures == 0


def test_keyed_assign_agrees_with_exact_search():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3000, 8)).astype(np.float32)
    c = rng.standard_normal((256, 8)).astype(np.float32)
    codes, d2 = km.assign(x, c, block=1000, exact=False)
    ref_codes, ref_d2 = np_assign(x, c)
    codes, d2 = np.asarray(codes), np.asarray(d2)
    assert np.mean(codes == ref_codes) > 0.999
    # a different choice is a near tie: its true distance is the minimum to float32 precision
    chosen = ((x.astype(np.float64) - c[codes]) ** 2).sum(1)
    np.testing.assert_allclose(chosen, ref_d2, rtol=2.0**-13, atol=1e-5)
    # distances are returned truncated to 2^-15 of their value (plus float32 cancellation)
    assert np.all(d2 <= ref_d2 * (1 + 1e-6) + 1e-5)
    np.testing.assert_allclose(d2, ref_d2, rtol=2.0**-13, atol=1e-5)


def test_keyed_assign_keeps_the_index_at_zero_distance():
    # s == 0 would be a subnormal key, which XLA:CPU flushes (losing the index): it must not
    x = np.asarray(X_BLOBS)
    codes, d2 = km.assign(x, x[[5, 0, 17, 3]], exact=False)
    assert np.asarray(codes)[[5, 0, 17, 3]].tolist() == [0, 1, 2, 3]
    assert np.all(np.asarray(d2)[[5, 0, 17, 3]] == 0.0)


def test_coarse_to_fine_schedule():
    cfg = km.KMeans(k=8)  # coarse stage only when a quarter of the sample has >= 32 rows/centroid
    assert cfg.coarse_stride(4 * 32 * 8) == 4 and cfg.coarse_stride(4 * 32 * 8 - 4) == 1
    assert km.KMeans(k=8, coarse_iters=0).coarse_stride(10**6) == 1
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4096, 4)).astype(np.float32)
    fine = km.fit(jax.random.key(0), x, km.KMeans(k=8, iters=20, coarse_iters=0, tol=0.0))
    both = km.fit(jax.random.key(0), x, km.KMeans(k=8, iters=20, coarse_iters=10, tol=0.0))
    assert int(fine.iters) <= 20 and int(both.iters) <= 20
    # the coarse iterations cost a quarter each and lose (almost) nothing
    assert float(both.inertia) < 1.01 * float(fine.inertia)
    # the reported inertia is that of the whole sample
    np.testing.assert_allclose(float(both.inertia),
                               np_assign(x, np.asarray(both.centroids))[1].sum(), rtol=1e-4)


def test_seeding_tracks_the_assignment_lloyd_starts_from():
    # the importance-sampled seeding path (score rows < seeding rows) also returns every row's
    # nearest seed and its squared distance; Lloyd starts from them instead of re-assigning
    x = np.stack([clustered(s, 600, 40, 4) for s in (3, 4)])
    k, trials = 37, 4  # 37 - 1 centres: not a multiple of the picks per step
    assert km._importance_sampled(600, trials, "greedy", 64)
    cents, owner, dmin = km._seed_batched(jax.random.key(1), jnp.asarray(x), k, trials,
                                          "greedy", 64, track=True)
    for b in range(2):
        c = np.asarray(cents[b])
        assert len({tuple(r) for r in c.tolist()}) == k  # distinct rows
        ref_codes, ref_d2 = np_assign(x[b], c)
        np.testing.assert_allclose(np.asarray(dmin[b]), ref_d2, rtol=1e-4, atol=1e-5)
        got = np.asarray(owner[b])
        assert got.min() >= 0 and got.max() < k
        chosen = ((x[b].astype(np.float64) - c[got]) ** 2).sum(1)
        np.testing.assert_allclose(chosen, ref_d2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("s", [37, 4999, 5000, 6400])
def test_d2_sampler_is_the_inverse_cdf(s):
    # buckets that divide S (5000 -> 50 rows, 6400 -> 64) or a padded last bucket (37, 4999):
    # every draw is numpy's inverse CDF of dmin / sum(dmin) up to float rounding at the cell
    # edges, and a row of weight zero is never drawn
    rng = np.random.default_rng(s)
    dmin = (rng.random(s) ** 3).astype(np.float32)
    dmin[rng.random(s) < 0.3] = 0.0
    u = ((np.arange(20_000) + 0.5) / 20_000).astype(np.float32)
    got = np.asarray(jax.jit(km._d2_sample)(jnp.asarray(dmin), jnp.asarray(u)))
    cdf = np.cumsum(dmin.astype(np.float64))
    want = np.searchsorted(cdf / cdf[-1], u.astype(np.float64), side="right")
    assert np.mean(got == want) > 0.999
    assert np.all(dmin[got] > 0)
    assert km._bucket_size(5000) == 50 and km._bucket_size(6400) == 64
    assert km._bucket_size(4999) == km._BLOCK
