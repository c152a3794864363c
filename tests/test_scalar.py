"""Tests of distq's scalar quantisers (Scalar, Uniform, NF4) through distq.quantize.

``distq.quantize`` compiles once per (spec, shape, dtype), and compilation dominates the run
time, so the tests reuse a few specs and shapes (mostly 20480 values) and use fixed priors
(``dist`` and ``beta`` given) wherever the property does not depend on the search.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import distq
from distq.core import distributions as D

N = 20480  # values in most test arrays (divisible by 64 and 128)
SHAPE2 = (160, 128)
BIG = 200_000  # the Lloyd-Max tests' size; data sets for the default spec share its compile

_jit_quantize = jax.jit(distq.quantize, static_argnums=1)


# ------------------------------------------------------------------------------- helpers
def _np(a):
    return np.asarray(a)


def _codes(q):
    return _np(q.codes_unpacked()).astype(np.int64)


def _deq(q):
    return _np(q.dequantize())


def _mse(x, y):
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    return float(np.mean((x - y) ** 2))


def _assert_valid(q, x):
    """Codes in range, output finite, of the input's shape and dtype."""
    c = _codes(q)
    assert c.min() >= 0 and c.max() < q.n, (c.min(), c.max(), q.n)
    y = _deq(q)
    assert y.shape == np.shape(x)
    assert np.all(np.isfinite(y.astype(np.float32))), f"{np.sum(~np.isfinite(y))} non-finite"
    return c, y


@functools.lru_cache(maxsize=None)
def _data(name):
    rng = np.random.default_rng(sum(map(ord, name)))
    if name == "normal":
        return rng.standard_normal(N).astype(np.float32)
    if name == "normal2d":
        return rng.standard_normal(SHAPE2).astype(np.float32)
    if name == "student_t3":
        return rng.standard_t(3, BIG).astype(np.float32)
    if name == "exponential":
        return rng.exponential(2.0, N).astype(np.float32)
    if name == "outliers":
        x = rng.standard_normal(BIG).astype(np.float32)
        x[::1000] = 1e30
        x[500::1000] = -1e30
        return x
    if name == "columns":  # very different column scales
        scales = np.logspace(-2, 2, SHAPE2[1]).astype(np.float32)
        return (rng.standard_normal(SHAPE2) * scales + 0.1 * scales).astype(np.float32)
    raise KeyError(name)


@functools.lru_cache(maxsize=None)
def _quant(name, spec):
    """Cached quantisation of a named data set: tests share the results."""
    return distq.quantize(_data(name), spec)


# ===================================================================== Lloyd-Max optimality
def _lloyd_reference(zs, cs, lv, objective, max_iter=30000):
    """Float64 Lloyd-Max on sorted data ``zs`` (``cs``: prefix sums) from levels ``lv``."""
    n_pts = zs.size
    span = lv[-1] - lv[0]
    for _ in range(max_iter):
        t = 0.5 * (lv[1:] + lv[:-1])
        b = np.concatenate([[0], np.searchsorted(zs, t, side="left"), [n_pts]])
        b0, b1 = b[:-1], b[1:]
        cnt = b1 - b0
        if objective == "mse":
            new = (cs[b1] - cs[b0]) / np.maximum(cnt, 1)
        else:  # lower median of each cell
            new = zs[np.clip((b0 + b1 - 1) // 2, 0, n_pts - 1)]
        new = np.sort(np.where(cnt > 0, new, lv))
        done = np.max(np.abs(new - lv)) <= 1e-14 * span
        lv = new
        if done:
            break
    return lv


def _nearest_error(zs, lv, objective):
    t = 0.5 * (lv[1:] + lv[:-1])
    e = zs - lv[np.searchsorted(t, zs, side="right")]
    return float(np.mean(e**2) if objective == "mse" else np.mean(np.abs(e)))


def _reference_errors(x, n, objective):
    """Errors of float64 Lloyd-Max runs from several data-driven starts (no parametric prior).

    Starts: "quantile" (the data's quantiles) and "hist{bins}" (quantiles of the histogram
    density raised to 1/3 for MSE or 1/2 for MAE, the asymptotically optimal point density).
    Returns ``({start: error}, sorted data, prefix sums)``.
    """
    zs = np.sort(np.asarray(x, np.float64))
    cs = np.concatenate([[0.0], np.cumsum(zs)])
    u = (np.arange(n) + 0.5) / n
    starts = {"quantile": np.quantile(zs, u)}
    power = 1.0 / 3.0 if objective == "mse" else 0.5
    for bins in (50, 100, 200):
        h, edges = np.histogram(zs, bins=bins)
        g = np.concatenate([[0.0], np.cumsum(h.astype(np.float64) ** power)])
        starts[f"hist{bins}"] = np.interp(u, g / g[-1], edges)
    errs = {}
    for name, lv in starts.items():
        lv = _lloyd_reference(zs, cs, np.sort(lv), objective)
        errs[name] = _nearest_error(zs, lv, objective)
    return errs, zs, cs


def _levels_in_data_units(q):
    assert q.scale.shape == (1,)
    loc = 0.0 if q.loc is None else float(_np(q.loc)[0])
    return loc + float(_np(q.scale)[0]) * _np(q.levels()).astype(np.float64)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, pytest.param(8, marks=pytest.mark.slow)])
def test_mse_matches_lloyd_max_reference(bits):
    # 256 levels need more data for the sample's optimum to be well defined
    size = 2_000_000 if bits == 8 else BIG
    x = np.random.default_rng(1234).standard_normal(size).astype(np.float32)
    q = distq.quantize(x, distq.Scalar(bits=bits))
    c, y = _assert_valid(q, x)
    got = _mse(x, y)
    refs, zs, cs = _reference_errors(x, 1 << bits, "mse")
    # the Lloyd-Max run from the data's quantiles
    assert got <= 1.002 * refs["quantile"], (got / refs["quantile"], refs)
    # the best of all starts: at 256 levels the sample's error has many Lloyd fixed points
    # (measured: the starts' results spread by ~0.4% at 2M values, ~2% at 200k), so there
    # distq's (equally valid) fixed point may be a little worse than the best one found.
    # Measured on this sample: distq's 0.53% above the best start's (and on the benchmark's 1M
    # sample 1.2% below every start's); the last assertion checks it is a fixed point
    tol = 1.01 if bits == 8 else 1.002
    best = min(refs.values())
    assert got <= tol * best, (got / best, refs)
    # relative MSE of an 8-bit Gaussian quantiser is ~4e-5, of a 1-bit one 1 - 2/pi
    if bits == 1:
        assert got / x.var() == pytest.approx(1 - 2 / np.pi, rel=5e-3)
    # distq's refined codebook is itself a Lloyd-Max fixed point of the data: up to 64 levels
    # of the data's histogram (bins 2**-8 standard deviations wide, read as a piecewise-uniform
    # density), whose optimum at 64 levels on 200k values lies ~1.2e-4 (measured) above the
    # sample's own fixed point, which fits the sample's noise
    lv = _levels_in_data_units(q)
    polished = _nearest_error(zs, _lloyd_reference(zs, cs, lv, "mse", max_iter=200), "mse")
    assert polished >= got * (1 - (2e-4 if bits == 6 else 1e-4))


def test_mae_matches_l1_lloyd_reference():
    x = np.random.default_rng(99).standard_normal(BIG).astype(np.float32)
    q = distq.quantize(x, distq.Scalar(bits=4, objective="mae"))
    _, y = _assert_valid(q, x)
    got = float(np.mean(np.abs(y.astype(np.float64) - x)))
    refs, _, _ = _reference_errors(x, 16, "mae")
    best = min(refs.values())
    assert got <= 1.002 * best, (got / best, refs)
    # and it is a better MAE quantiser than the MSE-optimal one
    q2 = distq.quantize(x, distq.Scalar(bits=4))  # compiled by the bits=4 case above
    assert got < float(np.mean(np.abs(_deq(q2).astype(np.float64) - x)))


# ===================================================================== robustness
# the Lloyd-Max tests' 4-bit default spec: data sets of BIG values reuse its compilation
CANON = distq.Scalar(bits=4)
ROBUST = distq.Scalar(bits=4, robust=True)


@pytest.mark.parametrize(
    "spec",
    [CANON, ROBUST, distq.Uniform(bits=4), distq.NF4(),
     distq.Scalar(bits=3, dist="logistic", beta=1.0, axis=-1)],
    ids=["scalar", "robust", "uniform", "nf4", "scalar-axis"],
)
def test_heavy_tails_student_t3(spec):
    x = _data("student_t3")
    if getattr(spec, "axis", None) is not None:
        x = x[:N].reshape(SHAPE2)
    q = distq.quantize(x, spec)
    _assert_valid(q, x)
    if isinstance(spec, distq.Scalar):
        # a 3-4 bit quantiser of t(3) data must still explain most of the variance
        assert _mse(x, _deq(q)) < 0.1 * float(np.var(x))


@pytest.mark.parametrize(
    "spec",
    [
        # regression: the float32 std of (1e30)**2 once overflowed, making every value NaN
        pytest.param(CANON, id="scalar"),
        pytest.param(ROBUST, id="scalar-robust"),
        pytest.param(distq.Uniform(bits=8), id="uniform"),
        pytest.param(distq.Uniform(bits=8, symmetric=False), id="uniform-affine"),
        pytest.param(distq.NF4(), id="nf4"),
    ],
)
def test_huge_outliers(spec):
    x = _data("outliers")
    q = distq.quantize(x, spec)
    c, y = _assert_valid(q, x)
    big = np.abs(x) > 1e29
    # the outliers themselves come back with the right sign and magnitude
    assert np.all(np.sign(y[big]) == np.sign(x[big]))
    assert np.all(np.abs(y[big]) > 1e29)


# (the same specs and shape as test_every_dist_name: no extra compilation)
@pytest.mark.parametrize("spec", [distq.Scalar(bits=2, dist="exponential", beta=1.0),
                                  distq.Scalar(bits=2, dist="exponential_cdf"),
                                  distq.Scalar(bits=2, dist="exponential", beta=1.0, refine=False)],
                         ids=["exponential", "exponential_cdf-search", "exponential-prior"])
def test_exponential_data(spec):
    x = _data("exponential")
    q = distq.quantize(x, spec)
    c, y = _assert_valid(q, x)
    assert np.all(np.bincount(c.reshape(-1), minlength=4) > 0)  # all four levels used
    # 2-bit Lloyd-Max on exponential data: relative MSE ~0.11
    assert _mse(x, y) < (0.11 if spec.refine else 0.13) * float(np.var(x)), _mse(x, y) / np.var(x)


# ===================================================================== jit / vmap / traces
@pytest.mark.parametrize(
    "spec,name,op_by_op",
    # (op by op, i.e. under jax.disable_jit, a Scalar spec compiles hundreds of primitives and
    # runs its search and Lloyd loops in Python: too slow here, so only Uniform runs that way)
    [(distq.Scalar(bits=3, dist="logistic", beta=1.0), "normal", False),
     (distq.Scalar(bits=3, dist="gumbel", axis=-1, beta=1.0), "columns", False),
     (distq.Uniform(bits=4, symmetric=False, axis=-1), "columns", True)],
    ids=["scalar", "scalar-axis", "uniform-axis"],
)
def test_jit_matches_eager(spec, name, op_by_op):
    x = _data(name)
    a = distq.quantize(x, spec)  # (jitted inside distq, per spec and shape)
    others = [_jit_quantize(x, spec)]  # inside a caller's jit
    if op_by_op:
        with jax.disable_jit():  # no XLA fusion at all
            others.append(distq.quantize(x, spec))
    for other in others:
        np.testing.assert_array_equal(_np(a.codes), _np(other.codes))
        assert (a.shape, a.dtype, a.bits, a.n, a.layout) == (
            other.shape, other.dtype, other.bits, other.n, other.layout)
        # fusion may change the last bit of a statistic (e.g. a / 7 as a * (1 / 7))
        np.testing.assert_allclose(_deq(a), _deq(other), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(_deq(a), _deq(others[0]))


def test_jit_traces_once_for_same_shape():
    spec = distq.Scalar(bits=3, dist="gaussian", beta=1.0)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def roundtrip(x):
        return distq.quantize(x, spec).dequantize()

    rng = np.random.default_rng(5)
    prev = None
    for i in range(3):
        x = (rng.standard_normal(SHAPE2) * (i + 1)).astype(np.float32)
        y = _np(roundtrip(x))
        assert y.shape == SHAPE2
        assert _mse(x, y) < 0.05 * float(np.var(x))
        if prev is not None:
            assert not np.array_equal(y, prev)
        prev = y
    with pytest.raises(AssertionError):  # a new shape retraces, which the counter sees
        roundtrip(np.ones((3, 4), np.float32))


def test_vmap_over_rows_matches_per_row():
    spec = distq.Scalar(bits=3, dist="gaussian", beta=1.0)
    x = _data("normal2d")[:8] * np.arange(1, 9, dtype=np.float32)[:, None]
    out = _np(jax.vmap(lambda r: distq.quantize(r, spec).dequantize())(x))
    assert out.shape == x.shape
    rows = np.stack([_deq(distq.quantize(r, spec)) for r in x])
    np.testing.assert_allclose(out, rows, rtol=1e-5, atol=1e-5)
    # each row used its own scale: the relative error is small for every row (the rows'
    # scales differ 8-fold; one shared scale would flatten the first rows)
    rel = np.mean((out - x) ** 2, axis=1) / np.var(x, axis=1)
    assert rel.max() < 0.08, rel
    # a vmapped QArray carries a leading batch axis on every array leaf
    qs = jax.vmap(lambda r: distq.quantize(r, spec))(x)
    assert qs.scale.shape == (8, 1) and qs.codebook.shape == (8, 8)


# ===================================================================== dists, beta, p
# the beta search compiles slowly (~1.5-2 s per family): the default run searches three
# families (one per kind of beta grid / location), the slow run all nine; the unrefined search
# is compared for two of them
_SEARCH_FAST = ("gaussian", "cauchy_cdf", "exponential_cdf")
_SEARCH_UNREFINED = ("cauchy_cdf", "exponential_cdf")


@pytest.mark.parametrize(
    "dist,beta",
    [(d, 1.0) for d in D.DIST_NAMES]
    + [pytest.param(d, None, marks=() if d in _SEARCH_FAST else pytest.mark.slow)
       for d in D.DIST_NAMES],
    ids=[f"beta1-{d}" for d in D.DIST_NAMES] + [f"search-{d}" for d in D.DIST_NAMES],
)
def test_every_dist_name(dist, beta):
    x = _data("normal")
    var = float(np.var(x))
    q = _quant("normal", distq.Scalar(bits=2, dist=dist, beta=beta))
    _assert_valid(q, x)
    e = _mse(x, _deq(q))
    assert np.isfinite(e)
    # 2-bit Lloyd-Max on Gaussian data: relative MSE 0.1175 whatever prior it started from
    assert e / var < 0.1180, e / var
    q1 = _quant("normal", distq.Scalar(bits=2, dist=dist, beta=1.0, refine=False))
    _assert_valid(q1, x)
    e1 = _mse(x, _deq(q1))
    if beta == 1.0:
        # Lloyd-Max refinement starts from the prior's codebook and never makes it worse
        assert e <= e1 * (1 + 1e-5), (e, e1)
    elif dist in _SEARCH_UNREFINED:
        q0 = _quant("normal", distq.Scalar(bits=2, dist=dist, refine=False))
        _assert_valid(q0, x)
        e0 = _mse(x, _deq(q0))
        assert e <= e0 * (1 + 1e-5), (e, e0)
        # the search (grid + zoom) is never worse than one of its own grid points (1.0)
        assert e0 <= e1 * (1 + 1e-5), (e0, e1)


@pytest.mark.parametrize("p", [0, 1])
def test_dist_none_and_p(p):
    # p=2 is the default for the MSE objective, exercised by the Lloyd-Max tests above
    assert distq.Scalar(bits=2).candidate_dists() == distq.Scalar(bits=2, p=2).candidate_dists()
    assert distq.Scalar(objective="mae").candidate_dists() == distq.Scalar(
        objective="mae", p=1).candidate_dists()
    x = _data("normal")
    q = _quant("normal", distq.Scalar(bits=2, p=p))
    _assert_valid(q, x)
    e = _mse(x, _deq(q))
    assert e / float(np.var(x)) < 0.1180
    fams = {d.family for d in distq.Scalar(p=p).candidate_dists()}
    assert fams == set(D.FAMILIES)


# ===================================================================== exact zero
@pytest.mark.parametrize("bits,n", [(1, 2), (2, 3), (3, 8), (4, 15), (4, 16), (5, 31)])
def test_exact_zero(bits, n):
    x = _data("normal").copy()
    x[::7] = 0.0
    x[3::11] = -0.0
    zeros = x == 0.0
    # the beta search once (it is slow to compile), a fixed prior otherwise
    kw = {"dist": "cauchy_cdf"} if (bits, n) == (5, 31) else {"dist": "cauchy_cdf", "beta": 1.0}
    q = distq.quantize(x, distq.Scalar(bits=bits, n=n, zero=0.0, **kw))
    assert q.n == n and q.bits == bits
    _, y = _assert_valid(q, x)
    assert np.all(y[zeros] == 0.0)
    assert _mse(x, y) < float(np.mean(x.astype(np.float64) ** 2))  # beats all-zeros


@pytest.mark.parametrize(
    "zero,layout",
    [(0.5, {}), (0.5, {"group_size": 64}), (0.1, {"axis": -1})],
    ids=["0.5-tensor", "0.5-group", "0.1-axis"],
)
def test_exact_nonzero_zero(zero, layout):
    x = (_data("normal2d") + np.float32(zero)).astype(np.float32)
    x[::3, ::5] = np.float32(zero)
    hits = x == np.float32(zero)
    q = distq.quantize(x, distq.Scalar(bits=3, dist="cauchy_cdf", beta=1.0, zero=zero, **layout))
    _, y = _assert_valid(q, x)
    assert np.all(y[hits] == np.float32(zero))
    assert _mse(x, y) < 0.2 * float(np.var(x))


def test_exact_zero_with_location_families():
    # regression: with zero set only class-"B" data was fitted while gaussian/logistic/gumbel
    # were class "A", so these specs crashed with "not enough values to unpack"
    x = _data("normal").copy()
    x[::7] = 0.0
    failures = []
    for dist in ("gaussian", "gumbel_cdf"):
        try:
            q = distq.quantize(x, distq.Scalar(bits=3, dist=dist, beta=1.0, zero=0.0))
        except Exception as e:  # noqa: BLE001 - collect every family's failure
            failures.append((dist, repr(e)))
            continue
        _, y = _assert_valid(q, x)
        if not np.all(y[x == 0.0] == 0.0):
            failures.append((dist, "zero not exact"))
    assert not failures, failures


# ===================================================================== constant tensors
_FIXED = {"dist": "gaussian", "beta": 1.0}


@pytest.mark.parametrize("value", [3.14159, 0.0])
@pytest.mark.parametrize(
    "spec",
    [
        CANON,
        distq.Scalar(bits=3, axis=-1, **_FIXED),
        distq.Scalar(bits=3, axis=0, refine=False, **_FIXED),
        distq.Scalar(bits=3, group_size=64, refine=False, **_FIXED),
        distq.Scalar(bits=3, group_size=64, group_axis=None, refine=False, **_FIXED),
        distq.Scalar(bits=3, zero=0.0, dist="cauchy_cdf", beta=1.0),
        distq.Uniform(bits=8, symmetric=False),
        distq.Uniform(bits=8, symmetric=False, axis=-1),
        distq.Uniform(bits=8, symmetric=False, group_size=64),
        distq.NF4(),
    ],
    ids=["scalar", "axis-1", "axis0", "group", "block", "zero", "uaff", "uaff-axis",
         "uaff-group", "nf4"],
)
def test_constant_tensor_roundtrip_is_exact(spec, value):
    # the tensor-wide default spec on the 1-D shape it is already compiled for
    x = np.full((BIG,) if spec == CANON else SHAPE2, value, np.float32)
    q = distq.quantize(x, spec)
    _, y = _assert_valid(q, x)
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(y.view(np.uint32), x.view(np.uint32))


def test_constant_tensor_uniform_affine_any_bits():
    # regression: constant groups decoded as float32(float32(v / (2**bits - 1)) * (2**bits - 1))
    # (3.14159 at 4 bits -> 3.1415904, 0.1 at 3 bits -> 0.10000001)
    vals = np.array([3.14159, 0.1, -2.5, 1e-20, 7.0, -0.3, 123.456], np.float32)
    bad = []
    for bits in (3, 4, 8):
        spec = distq.Uniform(bits=bits, symmetric=False)
        for v in vals:
            x = np.full((4, 64), v, np.float32)
            y = _deq(distq.quantize(x, spec))
            if not np.array_equal(y, x):
                bad.append((bits, float(v), float(y.flat[0])))
    assert not bad, bad


# ===================================================================== layouts and sizes
def test_per_channel_beats_per_tensor():
    x = _data("columns")  # column scales from 0.01 to 100
    y_t = _deq(_quant("columns", distq.Scalar(bits=3, dist="gaussian")))
    q_ax = _quant("columns", distq.Scalar(bits=3, axis=-1, **_FIXED))
    assert q_ax.scale.shape == (SHAPE2[1],)
    y_ax = _deq(q_ax)
    e_t, e_ax = _mse(x, y_t), _mse(x, y_ax)
    assert e_ax < 0.9 * e_t, (e_ax, e_t)  # the total is dominated by the widest columns
    # per channel, every column's relative error is small whatever its scale, while one
    # tensor-wide codebook flattens the narrow columns
    var = np.var(x, axis=0)
    rel_ax = np.mean((y_ax - x) ** 2, axis=0) / var
    rel_t = np.mean((y_t - x) ** 2, axis=0) / var
    assert rel_ax.max() < 0.08
    assert np.median(rel_ax) < 0.1 * np.median(rel_t)
    # the same channels given as axis 0 of the transposed array
    q0 = distq.quantize(x.T.copy(), distq.Scalar(bits=3, axis=0, **_FIXED))
    assert q0.scale.shape == (SHAPE2[1],)
    y0 = _deq(q0)
    assert y0.shape == x.T.shape
    np.testing.assert_allclose(_mse(x.T, y0), e_ax, rtol=1e-3)


def _nbytes_formula(q, groups):
    words = math.ceil(q.size * q.bits / 32)
    levels = 0 if q.codebook is None else 4 * q.n  # integer grids store no level table
    return 4 * words + levels + 4 * groups + (4 * groups if q.loc is not None else 0)


@pytest.mark.parametrize(
    "spec,groups",
    [
        (distq.Scalar(bits=3, **_FIXED), 1),
        (distq.Scalar(bits=3, axis=-1, **_FIXED), SHAPE2[1]),
        (distq.Scalar(bits=3, axis=0, refine=False, **_FIXED), SHAPE2[0]),
        (distq.Scalar(bits=3, axis=(0, 1), refine=False, **_FIXED), SHAPE2[0] * SHAPE2[1]),
        (distq.Scalar(bits=3, group_size=64, refine=False, **_FIXED), N // 64),
        (distq.Scalar(bits=3, group_size=64, group_axis=None, refine=False, **_FIXED), N // 64),
        (distq.Scalar(bits=3, n=5, group_size=32, group_axis=0, **_FIXED), N // 32),
        (distq.Uniform(bits=8), 1),
        (distq.Uniform(bits=4, symmetric=False, group_size=128), N // 128),
        (distq.NF4(), N // 64),
    ],
    ids=["tensor", "axis-1", "axis0", "axis01", "group", "block", "group-axis0-n5", "uniform",
         "uaff-group", "nf4"],
)
def test_layouts_shape_and_nbytes(spec, groups):
    x = _data("columns")
    q = distq.quantize(x, spec)
    _, y = _assert_valid(q, x)
    assert q.scale.shape == (groups,)
    assert q.levels().shape == (q.n,)
    assert (q.codebook is None) == isinstance(spec, distq.Uniform)
    if q.loc is not None:
        assert q.loc.shape == (groups,)
    assert q.nbytes == _nbytes_formula(q, groups)
    assert q.bits_per_value == pytest.approx(8 * q.nbytes / N)
    if isinstance(spec, distq.Scalar) and spec.axis == -1:
        # per-column scales adapt to the column scales
        e_t = _mse(x, _deq(_quant("columns", distq.Scalar(bits=3, **_FIXED))))
        assert _mse(x, y) < e_t


def test_group_layout_scales_follow_the_groups():
    # group_size along the last axis: one group per (row, block of 64 columns)
    x = _data("columns")
    q = distq.quantize(x, distq.Uniform(bits=8, group_size=64))
    absmax = np.abs(x.reshape(SHAPE2[0], 2, 64)).max(axis=2).reshape(-1)
    np.testing.assert_allclose(_np(q.scale), absmax / 127, rtol=1e-6)
    qb = distq.quantize(x, distq.Uniform(bits=8, group_size=64, group_axis=None))
    np.testing.assert_allclose(_np(qb.scale), np.abs(x.reshape(-1, 64)).max(axis=1) / 127,
                               rtol=1e-6)
    qc = distq.quantize(x, distq.Uniform(bits=8, group_size=32, group_axis=0))
    absmax0 = np.abs(x.reshape(5, 32, SHAPE2[1])).max(axis=1)  # (block, column)
    assert sorted(_np(qc.scale).tolist()) == pytest.approx(sorted((absmax0 / 127).reshape(-1)))


@pytest.mark.parametrize(
    "dtype", [jnp.bfloat16, jnp.float16, jnp.float32, np.float64], ids=str
)
def test_dtype_restored(dtype):
    x = _data("normal2d")
    xin = jnp.asarray(x, dtype) if dtype is not np.float64 else x.astype(np.float64)
    expected = jnp.asarray(xin).dtype  # float64 numpy becomes float32 unless x64 is on
    for spec in (distq.Scalar(bits=3, refine=False, **_FIXED), distq.Uniform(), distq.NF4()):
        q = distq.quantize(xin, spec)
        assert q.dtype == str(np.dtype(xin.dtype))  # the caller's dtype, float64 too
        y = q.dequantize()
        assert y.dtype == expected and y.shape == SHAPE2
        assert distq.dequantize(q).dtype == expected
        assert q.dequantize(jnp.float32).dtype == jnp.float32
        assert _mse(x, np.asarray(y, np.float32)) < 0.05


@pytest.mark.parametrize(
    "spec",
    [distq.Scalar(bits=b, dist="gaussian", beta=1.0, refine=False) for b in (1, 2, 3, 4, 8)]
    + [distq.Uniform(bits=8), distq.Uniform(bits=4, symmetric=False)],
    ids=lambda s: f"{type(s).__name__}{s.code_bits}",
)
def test_nbytes_is_true_size_for_1m_values(spec):
    x = np.random.default_rng(3).standard_normal((1024, 1024)).astype(np.float32)
    q = distq.quantize(x, spec)
    payload = spec.code_bits * x.size // 8
    assert payload <= q.nbytes < payload + 2048
    assert _np(q.codes).nbytes == payload
    assert q.nbytes < x.nbytes * spec.code_bits / 32 + 2048


# ===================================================================== Uniform
def _absmax_reference(x, bits, axis=None):
    qmax = 2 ** (bits - 1) - 1
    absmax = np.max(np.abs(x), axis=axis, keepdims=axis is not None).astype(np.float32)
    scale = (absmax / np.float32(qmax)).astype(np.float32)
    codes = np.clip(np.round(x / scale), -qmax, qmax).astype(np.int64) + qmax
    return codes, scale


def test_uniform_int8_matches_numpy_absmax():
    x = _data("normal")
    q = _quant("normal", distq.Uniform(bits=8))
    codes, scale = _absmax_reference(x, 8)
    assert q.n == 255 and q.loc is None
    np.testing.assert_array_equal(_codes(q).reshape(-1), codes)
    assert float(_np(q.scale)[0]) == float(scale)
    y = _deq(q)
    np.testing.assert_array_equal(y, ((codes - 127).astype(np.float32) * scale))
    # half a step, plus the rounding of code * scale (x / scale = k + 1/2 ties do occur)
    assert np.all(np.abs(y - x) <= scale / 2 + 2 * np.spacing(np.abs(x)))
    # the extremes are representable exactly up to one rounding
    i = np.argmax(np.abs(x))
    assert y[i] == pytest.approx(x[i], rel=1e-6)


def test_uniform_per_channel_matches_numpy():
    x = _data("columns")
    q = distq.quantize(x, distq.Uniform(bits=8, axis=-1))
    codes, scale = _absmax_reference(x, 8, axis=0)
    # XLA may divide by the constant 127 as a multiplication by 1/127: allow one ulp
    np.testing.assert_allclose(_np(q.scale), scale.reshape(-1), rtol=2.5e-7)
    # codes from distq's own scales: round(x / scale) + 127, rows are the channels
    s = _np(q.scale)[None, :]
    ref = np.clip(np.round(x / s), -127, 127).astype(np.int64) + 127
    np.testing.assert_array_equal(_codes(q), ref.T)
    assert np.mean(_codes(q) == codes.T) > 0.999  # and nearly all equal the all-numpy codes
    assert np.all(np.abs(_deq(q) - x) <= s / 2 + 2 * np.spacing(np.abs(x)))


@pytest.mark.parametrize("bits", range(1, 9))
def test_uniform_symmetric_bits(bits):
    x = _data("normal")
    q = _quant("normal", distq.Uniform(bits=bits))
    c, y = _assert_valid(q, x)
    absmax = float(np.abs(x).max())
    if bits == 1:
        assert q.n == 2
        np.testing.assert_array_equal(c.reshape(-1), (x >= 0).astype(np.int64))
        np.testing.assert_allclose(np.abs(y), absmax, rtol=1e-6)
        return
    qmax = 2 ** (bits - 1) - 1
    assert q.n == 2 * qmax + 1
    scale = float(_np(q.scale)[0])
    assert scale == pytest.approx(absmax / qmax, rel=1e-6)
    assert np.all(np.abs(y - x) <= scale / 2 + 2 * np.spacing(np.abs(x)))
    assert len(np.unique(y)) <= q.n
    codes, _ = _absmax_reference(x, bits)
    np.testing.assert_array_equal(c.reshape(-1), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_uniform_affine_bits(bits):
    x = _data("normal") + np.float32(0.7)
    x[::9] = 0.0
    q = distq.quantize(x, distq.Uniform(bits=bits, symmetric=False))
    c, y = _assert_valid(q, x)
    assert q.n == 2**bits
    assert np.all(y[x == 0.0] == 0.0), "affine quantisation keeps 0.0 exact"
    scale = float(_np(q.scale)[0])
    assert scale == pytest.approx((x.max() - min(x.min(), 0)) / (2**bits - 1), rel=1e-6)
    # within the grid every value is within half a step (the zero point is rounded, so the
    # grid may end up to half a step short of the extremes: allow a full step there)
    assert np.all(np.abs(y - x) <= scale * (1 + 1e-5))
    inner = (x > x.min() + scale) & (x < x.max() - scale)
    assert np.all(np.abs(y - x)[inner] <= scale / 2 + 2 * np.spacing(np.abs(x))[inner])


def test_uniform_affine_all_positive_and_all_negative():
    for x in (np.linspace(1.0, 5.0, 256, dtype=np.float32),
              np.linspace(-5.0, -1.0, 256, dtype=np.float32)):
        q = distq.quantize(x, distq.Uniform(bits=8, symmetric=False))
        _, y = _assert_valid(q, x)
        scale = float(_np(q.scale)[0])
        assert scale == pytest.approx(5.0 / 255, rel=1e-6)  # the range includes 0.0
        assert np.all(np.abs(y - x) <= scale / 2 + 2 * np.spacing(np.abs(x)))


# ===================================================================== NF4
NF4_TABLE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])


def test_nf4_levels_match_qlora_table():
    lv = distq.nf4_levels()
    assert lv.shape == (16,)
    np.testing.assert_allclose(lv, NF4_TABLE, atol=1e-6, rtol=0)
    assert lv[7] == 0.0 and lv[0] == -1.0 and lv[-1] == 1.0


def test_nf4_codes_match_numpy_blockwise_nearest():
    x = _data("student_t3")
    q = _quant("student_t3", distq.NF4())
    assert q.n == 16 and q.bits == 4 and q.loc is None
    blocks = x.reshape(-1, 64)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    r = blocks / absmax  # float32, as a bitsandbytes kernel would
    ref = np.argmin(np.abs(r[..., None].astype(np.float64) - NF4_TABLE), axis=-1)
    np.testing.assert_array_equal(_codes(q), ref)
    np.testing.assert_allclose(_np(q.scale), absmax.reshape(-1), rtol=0)
    y = _deq(q).reshape(-1, 64)
    np.testing.assert_allclose(y, NF4_TABLE[ref] * absmax, rtol=1e-6, atol=1e-30)
    # the absmax element of every block is reproduced exactly (level +-1)
    i = np.argmax(np.abs(blocks), axis=1)
    rows = np.arange(blocks.shape[0])
    np.testing.assert_array_equal(y[rows, i], blocks[rows, i])
    assert q.bits_per_value == pytest.approx(4.5 + 8 * 64 / x.size)


# ===================================================================== bad input
X_OK = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)


@pytest.mark.parametrize(
    "x,exc,words",
    [
        (np.zeros((0,), np.float32), ValueError, ["x", "empty"]),
        (np.zeros((3, 0), np.float32), ValueError, ["x", "empty"]),
        (np.array([1.0, np.nan, 2.0], np.float32), ValueError, ["x", "nan"]),
        (np.array([1.0, np.inf, 2.0], np.float32), ValueError, ["x", "inf"]),
        (np.array([1.0, -np.inf], np.float32), ValueError, ["x", "inf"]),
        (np.arange(10, dtype=np.int32), TypeError, ["x", "float"]),
        (np.arange(10, dtype=np.uint8), TypeError, ["x", "float"]),
        (np.array([True, False]), TypeError, ["x", "float"]),
    ],
    ids=["empty", "empty2d", "nan", "inf", "-inf", "int32", "uint8", "bool"],
)
@pytest.mark.parametrize("spec", [distq.Scalar(bits=2), distq.Uniform(), distq.NF4(group_size=1)],
                         ids=["scalar", "uniform", "nf4"])
def test_bad_arrays(x, exc, words, spec):
    with pytest.raises(exc) as e:
        distq.quantize(x, spec)
    msg = str(e.value).lower()
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize(
    "make,exc,word",
    [
        (lambda: distq.Scalar(bits=0), ValueError, "bits"),
        (lambda: distq.Scalar(bits=17), ValueError, "bits"),
        (lambda: distq.Scalar(bits=True), TypeError, "bits"),
        (lambda: distq.Scalar(bits=2.0), TypeError, "bits"),
        (lambda: distq.Scalar(n=1), ValueError, "n"),
        (lambda: distq.Scalar(n=0), ValueError, "n"),
        (lambda: distq.Scalar(bits=4, n=17), ValueError, "n=17"),
        (lambda: distq.Scalar(bits=1, n=3), ValueError, "bits=1"),
        (lambda: distq.Scalar(n=True), TypeError, "n"),
        (lambda: distq.Scalar(dist="weibull"), ValueError, "weibull"),
        (lambda: distq.Scalar(dist="cauchy", p=2), ValueError, "cauchy"),
        (lambda: distq.Scalar(p=3), ValueError, "p"),
        (lambda: distq.Scalar(objective="l3"), ValueError, "objective"),
        (lambda: distq.Scalar(objective="MSE"), ValueError, "objective"),
        (lambda: distq.Scalar(axis=-1, group_size=64), ValueError, "group_size"),
        (lambda: distq.Scalar(axis=1.5), TypeError, "axis"),
        (lambda: distq.Scalar(group_size=0), ValueError, "group_size"),
        (lambda: distq.Scalar(beta=-1.0), ValueError, "beta"),
        (lambda: distq.Scalar(beta=0.0), ValueError, "beta"),
        (lambda: distq.Scalar(scale_dtype="int8"), ValueError, "scale_dtype"),
        (lambda: distq.Scalar(max_iter=-1), ValueError, "max_iter"),
        (lambda: distq.Scalar(fit_size=4), ValueError, "fit_size"),
        (lambda: distq.Scalar(zero="0"), TypeError, "zero"),
        (lambda: distq.Uniform(bits=0), ValueError, "bits"),
        (lambda: distq.Uniform(bits=17), ValueError, "bits"),
        (lambda: distq.Uniform(bits=True), TypeError, "bits"),
        (lambda: distq.Uniform(axis=0, group_size=8), ValueError, "group_size"),
        (lambda: distq.Uniform(scale_dtype="int8"), ValueError, "scale_dtype"),
        (lambda: distq.NF4(group_size=-64), ValueError, "group_size"),
        (lambda: distq.NF4(scale_dtype="int8"), ValueError, "scale_dtype"),
    ],
)
def test_bad_specs(make, exc, word):
    with pytest.raises(exc) as e:
        make()
    assert word in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "spec,word",
    [
        (distq.Scalar(bits=2, group_size=7), "group_size"),
        (distq.Scalar(bits=2, group_size=7, group_axis=None), "group_size"),
        (distq.Scalar(bits=2, group_size=4, group_axis=2), "group_axis"),
        (distq.Scalar(bits=2, axis=2), "axis"),
        (distq.Scalar(bits=2, axis=-3), "axis"),
        (distq.Scalar(bits=2, axis=(0, 5)), "axis"),
        (distq.Uniform(group_size=5), "group_size"),
        (distq.Uniform(axis=3), "axis"),
        (distq.NF4(), "group_size"),  # 120 values, blocks of 64
    ],
    ids=["gs", "gs-flat", "gaxis", "axis2", "axis-3", "axis-tuple", "u-gs", "u-axis", "nf4"],
)
def test_bad_layout_for_shape(spec, word):
    x = X_OK if not isinstance(spec, distq.NF4) else X_OK[:, :15]  # 120 values
    with pytest.raises(ValueError) as e:
        distq.quantize(x, spec)
    assert word in str(e.value), str(e.value)


@pytest.mark.parametrize("spec", ["scalar", {"bits": 4}, 4, distq.Scalar])
def test_bad_spec_type(spec):
    with pytest.raises(TypeError, match="spec"):
        distq.quantize(X_OK, spec)


def test_dequantize_rejects_non_qarray():
    with pytest.raises(TypeError, match="QArray"):
        distq.dequantize(X_OK)


# ===================================================================== hypothesis
# few shapes and specs: every new (shape, spec) pair costs a compilation
_HYP_SHAPES = [(1,), (7,), (4, 8)]
_HYP_SPECS = [
    distq.Scalar(bits=3, dist="logistic", beta=1.3, refine=False),
    distq.Scalar(bits=2, dist="gaussian", beta=0.8, refine=False, axis=-1),
    distq.Uniform(bits=3, symmetric=False, axis=-1),
]


def _rows(x, spec):
    """(groups, group_len) view for per-tensor and last-axis channel layouts."""
    if spec.axis in (None, "auto"):  # a plain array: "auto" is one scale per tensor
        return x.reshape(1, -1)
    return x.reshape(-1, x.shape[-1]).T


@given(
    shape=st.sampled_from(_HYP_SHAPES),
    spec=st.sampled_from(_HYP_SPECS),
    data=st.data(),
)
def test_hypothesis_decodes_to_nearest_level(shape, spec, data):
    size = math.prod(shape)
    vals = data.draw(
        st.lists(
            st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32),
            min_size=size,
            max_size=size,
        )
    )
    x = np.asarray(vals, np.float32).reshape(shape)
    try:
        q = distq.quantize(x, spec)
    except ValueError as e:  # only near float32's smallest numbers (see tests/test_extremes.py)
        assert "cannot represent this array" in str(e) and np.abs(x).max() < 1e-30, str(e)
        return
    c, y = _assert_valid(q, x)
    cb = _np(q.levels()).astype(np.float32)
    scale = _np(q.scale).astype(np.float32)
    loc = np.zeros_like(scale) if q.loc is None else _np(q.loc).astype(np.float32)
    xr, yr = _rows(x, spec), _rows(y, spec)
    assert c.shape == xr.shape
    # every output is loc[g] + scale[g] * codebook[code]
    expected = cb[c] * scale[:, None] + loc[:, None]
    np.testing.assert_allclose(yr, expected, rtol=1e-6, atol=1e-6 * (np.abs(scale).max() + 1))
    # ... and the level is the nearest of the group's levels (ties within rounding allowed)
    levels = loc[:, None, None] + scale[:, None, None] * cb[None, None, :]
    dist = np.abs(xr[..., None].astype(np.float64) - levels)
    best = dist.min(axis=-1)
    tol = 1e-5 * (np.abs(xr).astype(np.float64) + np.abs(scale)[:, None] + 1e-30)
    assert np.all(np.abs(xr - yr) <= best + tol)


# ===================================================================== the fast paths
# (internals of distq.core.scalar: the outliers' search, the host-side packing, the density
# fit, each against an independent reference)
from distq.core import _numerics as nx  # noqa: E402
from distq.core import qarray as qa  # noqa: E402
from distq.core import scalar as sc  # noqa: E402

_OUTLIER_SPEC = distq.Scalar(bits=4, axis=0, outliers=0.01, scale_dtype="float32")


@pytest.mark.parametrize("kind", ["t3", "ties", "constant"])
def test_outlier_search_paths_agree_with_top_k(kind):
    # beyond 2**16 values the outliers are found by counting (on the host outside a trace,
    # in the computation under one); both must give lax.top_k's answer, order included
    rng = np.random.default_rng(7)
    shape = (257, 300)
    if kind == "t3":
        x = rng.standard_t(3, shape).astype(np.float32)
    elif kind == "ties":  # more values share the threshold's distance than the search takes
        x = np.where(rng.random(shape) < 0.995, 0.0, rng.standard_normal(shape))
        x = x.astype(np.float32)
    else:
        x = np.full(shape, 2.5, np.float32)
    k = _OUTLIER_SPEC.n_outliers(x.size)
    stats, _ = sc._stats_jit(jnp.asarray(x), _OUTLIER_SPEC, True)
    rows = sc._rows_of(jnp.asarray(x), _OUTLIER_SPEC)
    ku, cu, su = stats[0], stats[2], stats[5]
    ref = np.asarray(jax.lax.top_k(sc._dev(rows, ku, cu, su), k)[1])
    host = np.asarray(sc._outliers_host(jnp.asarray(x), _OUTLIER_SPEC, stats, k))
    lean = np.asarray(jax.jit(lambda r: sc._outliers(r, ku, cu, su, k, lean=True))(rows))
    np.testing.assert_array_equal(host, ref)
    np.testing.assert_array_equal(lean, ref)
    # ... and the reference is right: the k largest distances (NumPy, float64; distq's centre
    # and scale are rounded, so values at nearly the same distance may trade places)
    if kind == "t3":
        x64 = x.astype(np.float64)
        d = (np.abs(x64 - x64.mean(axis=1, keepdims=True)) / x64.std(axis=1, keepdims=True))
        d = d.ravel()
        assert d[ref].min() >= np.sort(d)[-k] * (1 - 2e-3)


def test_outlier_search_under_jit_ranks_non_finite_values_last():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((300, 256)).astype(np.float32)
    x[rng.random(x.shape) < 0.3] = np.nan
    x[0, :5] = np.inf
    spec = _OUTLIER_SPEC
    q = jax.jit(distq.quantize, static_argnums=1)(jnp.asarray(x), spec)
    pos = np.asarray(q.outlier_positions()).astype(np.int64)
    fin = np.isfinite(x).ravel()
    assert np.all(fin[pos]) and len(set(pos.tolist())) == pos.size
    xf = np.where(np.isfinite(x), x, np.nan).astype(np.float64)
    centre, spread = np.nanmean(xf, axis=1, keepdims=True), np.nanstd(xf, axis=1, keepdims=True)
    d = np.where(np.isfinite(x), np.abs(xf - centre) / spread, -1.0).ravel()
    assert d[pos].min() >= np.sort(d)[-pos.size] * (1 - 2e-3)


def test_host_position_packing_matches_qarray():
    rng = np.random.default_rng(9)
    for bits in (1, 7, 16, 17, 22, 31):
        for k in (1, 33, 1000):
            idx = rng.integers(0, 1 << bits, k).astype(np.uint32)
            np.testing.assert_array_equal(sc._pack_positions_host(idx, bits),
                                          np.asarray(qa.pack_positions(jnp.asarray(idx), bits)))


def test_settled_statistics_are_exact_grid_roundings():
    # spread to 12 significant bits, centre to a multiple of 2**-12 of it (NumPy, exact)
    rng = np.random.default_rng(10)
    spread = np.ldexp(rng.uniform(1, 2, 500), rng.integers(-40, 2, 500)).astype(np.float32)
    centre = rng.uniform(-2, 2, 500).astype(np.float32)
    c, s = (np.asarray(a) for a in jax.jit(sc._settled)(jnp.asarray(centre), jnp.asarray(spread)))
    e = np.floor(np.log2(spread.astype(np.float64))) - 11
    np.testing.assert_array_equal(s, (np.round(spread / 2.0 ** e) * 2.0 ** e).astype(np.float32))
    np.testing.assert_array_equal(c, (np.round(centre / 2.0 ** e) * 2.0 ** e).astype(np.float32))


def _density_reference(counts, t, lv, objective):
    """Expected error of a piecewise-uniform density (float64, bin by bin and cell by cell)."""
    e = nx.hist_edges().astype(np.float64)
    a, b = e[:-1], e[1:]
    m = counts.astype(np.float64) / counts.sum()
    lo = np.concatenate([[-np.inf], t])
    hi = np.concatenate([t, [np.inf]])
    total = 0.0
    for j, l in enumerate(lv.astype(np.float64)):
        x0, x1 = np.maximum(a, lo[j]), np.minimum(b, hi[j])
        ok = (x1 > x0) & (m > 0)
        x0, x1, dens = x0[ok], x1[ok], (m / (b - a))[ok]
        if objective == "mse":
            total += np.sum(dens * ((x1 - l) ** 3 - (x0 - l) ** 3) / 3)
        else:
            f = lambda u: np.sign(u - l) * (u - l) ** 2 / 2  # noqa: E731
            total += np.sum(dens * (f(x1) - f(x0)))
    return total


@pytest.mark.parametrize("objective", ["mse", "mae"])
def test_density_errors_match_numpy_integration(objective):
    rng = np.random.default_rng(11)
    z = np.concatenate([rng.standard_normal(20000), rng.standard_t(2, 500) * 5])
    counts = np.bincount(np.asarray(nx.hist_bin(jnp.asarray(z, jnp.float32))),
                         minlength=nx.HIST_BINS)
    d = nx.Density.build(jnp.asarray(counts, jnp.int32))
    for n in (2, 7, 16):
        lv = np.sort(rng.uniform(-3, 3, n)).astype(np.float32)
        t = (0.5 * (lv[1:] + lv[:-1])).astype(np.float32)
        got = float(nx.density_errors(d, jnp.asarray(t), jnp.asarray(lv), objective))
        assert got == pytest.approx(_density_reference(counts, t, lv, objective), rel=2e-5)


def test_histogram_fit_compiles_once_for_many_shapes():
    # stage 2 sees only a histogram of a fixed size and the fit's own fields: the leaves of a
    # model (each shape with its own automatic outlier fraction) share one compilation
    spec = distq.Scalar(bits=3, p=1)
    tree = {f"l{i}": {"kernel": jax.random.normal(jax.random.key(i), s)}
            for i, s in enumerate([(64, 96), (96, 80), (128, 40)])}
    before = sc._fit_jit._cache_size()
    _, report = distq.quantize_tree(tree, spec)
    assert len({r.spec for r in report.quantized()}) == 3  # three resolved specs
    assert sc._fit_jit._cache_size() == before + 1


def test_cpu_compile_options_give_the_portable_result(monkeypatch):
    # outside a trace on CPU the stages are compiled with _CPU_COMPILE_OPTIONS (faster to
    # compile); XLA's defaults elsewhere: both must give the same QArray, bit for bit (every
    # stage: statistics, the outliers' search on the host, fit, encoding, packing)
    spec = distq.Scalar(bits=3, dist="gaussian", p=2, beta=1.0, refine=False, axis=0, outliers=0.01,
                        scale_dtype="float32")
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.standard_t(4, (257, 300)).astype(np.float32))
    assert sc._fit_jit.pick() is sc._fit_jit.cpu  # (these tests run on CPU)
    fast = distq.quantize(x, spec)
    monkeypatch.setattr(sc._StageJit, "pick", lambda self: self.portable)
    portable = distq.quantize(x, spec)
    for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(portable)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert fast.n_outliers == portable.n_outliers == spec.n_outliers(x.size)


def test_lean_row_moments_are_accurate_on_long_rows():
    # under a caller's jit the statistics are one fused variadic reduction, which XLA:CPU runs
    # as a sequential loop per row: without carried rounding errors a float32 sum of 4M values
    # lost about 0.3 % of the spread (and jit and eager quantised a big tensor differently)
    x = np.random.default_rng(12).standard_normal((1, 1 << 22)).astype(np.float32) + 3.0
    fin = jnp.ones(x.shape, bool)
    mean, std = jax.jit(lambda v: sc._masked_moments(lambda: v, fin, v.shape[1], True))(
        jnp.asarray(x))
    x64 = x.astype(np.float64)
    assert float(mean[0]) == pytest.approx(x64.mean(), rel=1e-6)
    assert float(std[0]) == pytest.approx(x64.std(ddof=1), rel=1e-5)
