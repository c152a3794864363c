"""Extreme magnitudes, wide and narrow float dtypes, and non-finite values under ``jit``.

XLA on CPU flushes subnormal numbers to zero and may compute ``x / s`` as ``x * (1 / s)``, so a
quantiser that computes statistics or divisions in the data's own units fails silently near
either end of float32's range. distq scales every group by a power of two first (exactly), so
``x * 2**j`` must get exactly the codes of ``x``; what it cannot store it refuses with a
``ValueError`` that names the range.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import distq
from distq import compat
from distq.compat import quantitize
from distq.core import _checks
from distq.core.qarray import layout_for

F32_TINY = 2.0 ** -126
SPECS = {
    "scalar4": distq.Scalar(bits=4),
    "int8": distq.Uniform(bits=8),
    "int4-affine": distq.Uniform(bits=4, symmetric=False),
    "nf4-g16": distq.NF4(group_size=16),
}
_jit_quantize = jax.jit(distq.quantize, static_argnums=1)


def _base(shape=(64,), seed=0) -> np.ndarray:
    """Standard normal float32 values scaled so that the largest magnitude is 1."""
    x = np.random.default_rng(seed).standard_normal(shape)
    return (x / np.abs(x).max()).astype(np.float32)


def _at(x: np.ndarray, mag: float) -> np.ndarray:
    return (x.astype(np.float64) * mag).astype(np.float32)


def _rel(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(((x - y) ** 2).sum() / (x ** 2).sum())


def _codes(q) -> np.ndarray:
    return np.asarray(q.codes_unpacked())


# ============================================================ item 5: magnitudes (each example)
@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("j", [-118, -60, 60, 126])
def test_power_of_two_scaling_keeps_codes(name, j):
    """x * 2**j gets x's codes and decodes to x's decoded values times 2**j (exactly)."""
    spec = SPECS[name]
    x = _base((16, 8))
    xj = np.ldexp(x, j).astype(np.float32)
    q, qj = distq.quantize(x, spec), distq.quantize(xj, spec)
    np.testing.assert_array_equal(_codes(q), _codes(qj))
    np.testing.assert_array_equal(np.ldexp(np.asarray(q.dequantize(), np.float64), j),
                                  np.asarray(qj.dequantize(), np.float64))


@pytest.mark.parametrize("name,mag", [
    ("nf4-g16", 3e38),   # block absmax above ~8.5e37: 1 / absmax was flushed, all codes 0
    ("scalar4", 1e38),   # squares overflowed: NaN in the codebook
    ("int8", 3e38),
    ("int8", 2e-36),     # just above the smallest largest-magnitude int8 takes (1.49e-36)
    ("scalar4", 1e-36),
    ("int4-affine", 2e-37),
])
def test_extreme_magnitudes_keep_the_usual_error(name, mag):
    spec = SPECS[name]
    x = _base((16, 8))
    usual = _rel(x, distq.quantize(x, spec).dequantize())
    xm = _at(x, mag)
    y = np.asarray(distq.quantize(xm, spec).dequantize())
    assert np.all(np.isfinite(y))
    # (not to the last digit: near 1e-36 the input's own smallest values are subnormal in
    # float32 and have lost bits before any quantiser sees them)
    assert _rel(xm, y) == pytest.approx(usual, rel=1e-2)


def test_affine_grid_positive_values_near_float32_max():
    """Before: NaN (hi - lo overflowed). Values in [0, 3e38] now quantise as usual."""
    x = np.abs(_base((16, 8)))
    spec = distq.Uniform(bits=8, symmetric=False)
    usual = _rel(x, distq.quantize(x, spec).dequantize())
    y = distq.quantize(_at(x, 3e38), spec).dequantize()
    assert _rel(_at(x, 3e38), y) == pytest.approx(usual, rel=1e-4)


@pytest.mark.parametrize("name,mag,match", [
    # before: zeros (the scale 7.9e-39 was flushed)
    ("int8", 1e-36, r"needs a scale of 7\.\d+e-39, outside float32's normal range .*at least "
                    r"1\.49e-36"),
    # before: relative error 2.4 (the spread was flushed)
    ("scalar4", 1e-38, r"outside float32's normal range"),
    ("scalar4", 1e-37, r"between its decoded levels, below float32's smallest normal number"),
    ("nf4-g16", 1e-37, r"at least 1\.48e-37"),
    # a span max(x, 0) - min(x, 0) beyond float32's largest number: scale * code overflows
    ("int4-affine", 3e38, r"beyond float32's largest number 3\.403e\+38 \(a group's span"),
])
def test_out_of_range_groups_are_refused_with_the_range(name, mag, match):
    with pytest.raises(ValueError, match=match):
        distq.quantize(_at(_base((16, 8)), mag), SPECS[name])


def test_subnormal_input_is_scaled_exactly():
    """Subnormal values (which XLA reads as 0) are scaled by their bits: a group of them gets
    the codes of its values scaled up; on its own it is refused (its decoded levels would be
    subnormal), next to groups 2**24 times larger it is kept and decodes as 0."""
    spec = distq.NF4(group_size=16)
    x = _base((4, 16), seed=3)
    x[1] = np.ldexp(x[1], -140)  # every value of row 1 subnormal (or 0)
    with pytest.raises(ValueError, match="at least 1.48e-37"):
        distq.quantize(x[1:2], spec)
    q = distq.quantize(x, spec)
    up = np.ldexp(x[1:2], 140).astype(np.float32)
    np.testing.assert_array_equal(_codes(q)[1], _codes(distq.quantize(up, spec))[0])
    y = np.asarray(q.dequantize())
    assert not y[1].any()
    rest = np.delete(np.arange(4), 1)
    np.testing.assert_array_equal(y[rest], np.asarray(distq.quantize(x[rest], spec).dequantize()))


def test_float16_scales_are_refused_outside_their_range():
    x = _base((16, 8))
    spec = distq.Uniform(bits=8, scale_dtype="float16")
    distq.quantize(x * np.float32(1000), spec)  # fine: scale ~8
    with pytest.raises(ValueError, match=r"outside float16's normal range .*scale_dtype='float32'"):
        distq.quantize(_at(x, 1e9), spec)


def test_ldexp_is_exact_for_subnormal_and_extreme_values():
    rng = np.random.default_rng(1)
    x = np.concatenate([np.ldexp(rng.uniform(-1, 1, 64), rng.integers(-149, 128, 64)),
                        [0.0, 1e-45, -3e38]]).astype(np.float32)
    for e in (-300, -149, -1, 0, 1, 100, 250):
        got = np.asarray(jax.jit(_checks.ldexp)(x, np.full(x.shape, e, np.int32)))
        with np.errstate(over="ignore"):
            want = np.ldexp(x.astype(np.float64), e).astype(np.float32)
        want = np.where(np.abs(want) < F32_TINY, 0.0, want)  # XLA flushes subnormal results
        np.testing.assert_array_equal(got, want)
    assert np.asarray(_checks.max_exponent(np.array([[1e-40, -3e-39, 0.0]], np.float32))) == -128


@pytest.mark.parametrize("j", [-100, -70, 64, 100])
def test_compat_statistics_at_extreme_spreads(j):
    """Before: a std below ~1e-19 gave scale=0 (squares flushed), above ~1e19 an error."""
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    q, info = compat.quantize(x, k=4, beta=1.0)
    xs = np.ldexp(x, j).astype(np.float32)
    qs, infos = compat.quantize(xs, k=4, beta=1.0)
    assert infos["scale"] == math.ldexp(info["scale"], j)
    np.testing.assert_array_equal(qs, q)
    assert _rel(xs, compat.dequantize(qs, **infos)) == pytest.approx(
        _rel(x, compat.dequantize(q, **info)), rel=1e-6)


def test_compat_refuses_a_spread_below_the_normal_range():
    x = (np.random.default_rng(0).standard_normal(1000) * 1e-40).astype(np.float32)
    with pytest.raises(ValueError, match="below float32's normal range"):
        compat.quantize(x, k=4, beta=1.0)


_PQ = distq.PQ(m=4, bits=4)


@pytest.fixture(scope="module")
def rows():
    return np.random.default_rng(0).standard_normal((512, 16)).astype(np.float32)


@pytest.mark.parametrize("j", [-100, -66, 66, 100])
def test_pq_and_opq_at_extreme_magnitudes(rows, j):
    """Before: all accuracy lost beyond 1e19 or below 1e-19, and OPQ returned NaN. Now the
    codes of ``x * 2**j`` are those of ``x``."""
    xm = np.ldexp(rows, j).astype(np.float32)
    for spec in (_PQ, distq.PQ(m=4, bits=4, opq=True, opq_iters=2)):
        q, qm = distq.quantize(rows, spec), distq.quantize(xm, spec)
        np.testing.assert_array_equal(np.asarray(qm.codes), np.asarray(q.codes))
        y = np.asarray(qm.dequantize())
        assert np.all(np.isfinite(y))
        assert _rel(xm, y) == pytest.approx(_rel(rows, q.dequantize()), rel=1e-5)
    qt, qtm = quantitize(rows, sub_size=4, n_cluster=16), quantitize(xm, sub_size=4, n_cluster=16)
    np.testing.assert_array_equal(qt.indexes, qtm.indexes)


def test_pq_offset_does_not_cost_accuracy(rows):
    """Before: an offset of 1e4 on unit-variance rows tripled the error (0.31 -> 1.03)."""
    def err(x):
        y = np.asarray(distq.quantize(x, _PQ).dequantize(), np.float64)
        return float(((x - y) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())

    assert err(rows + np.float32(1e4)) < 1.05 * err(rows)


@pytest.mark.parametrize("j", [40, 66])
def test_pq_search_at_extreme_magnitudes(rows, j):
    """Search ranks in the codebooks' frame and reports distances in the data's units
    (``inf`` where a squared distance exceeds float32, as for 2**66-sized rows)."""
    def search(x):
        pq = distq.pq.fit(jax.random.key(0), x, _PQ)
        return pq.search(pq.encode(x), x[:3], k=2)

    d0, i0 = search(rows)
    d1, i1 = search(np.ldexp(rows, j).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(i1), np.asarray(i0))
    want = np.ldexp(np.asarray(d0, np.float64), 2 * j)
    np.testing.assert_array_equal(np.asarray(d1), np.where(want > _checks.F32_MAX, np.inf, want))


# =========================================================== item 6: float64, float16, bfloat16
def test_float64_outside_float32_is_refused_clearly():
    with pytest.raises(ValueError, match="beyond float32's range"):
        distq.quantize(np.array([1e300, 1.0]), distq.Uniform(bits=8))
    with pytest.raises(ValueError, match="below float32's range"):
        distq.quantize(np.array([1e-300, 1.0]), distq.Uniform(bits=8))
    with pytest.raises(ValueError, match="beyond float32's range"):
        distq.pq.fit(jax.random.key(0), np.full((32, 4), 1e300), _PQ)
    with pytest.raises(ValueError, match="beyond float32's range"):
        quantitize(np.full((32, 4), 1e300), sub_size=2, n_cluster=16)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, ml_dtypes.bfloat16])
def test_input_dtype_is_recorded_and_restored(dtype):
    x = _base((16, 8)).astype(dtype)
    name = np.dtype(dtype).name
    out = jax.dtypes.canonicalize_dtype(np.dtype(dtype))  # float32 for float64 without x64
    for spec in (SPECS["int8"], SPECS["nf4-g16"], SPECS["scalar4"]):
        q = distq.quantize(x, spec)
        assert q.dtype == name
        assert q.dequantize().dtype == out and q.take(jnp.arange(2)).dtype == out
    m = np.random.default_rng(0).standard_normal((512, 16)).astype(dtype)
    p = distq.quantize(m, _PQ)
    assert p.dtype == name and p.dequantize().dtype == out
    qt = quantitize(m, sub_size=4, n_cluster=16)
    assert qt.dtype == np.dtype(dtype) and qt.decode().dtype == np.dtype(dtype)
    assert qt[3].dtype == np.dtype(dtype)


def test_float64_decodes_as_float64_with_x64():
    x = np.random.default_rng(0).standard_normal(64)
    with jax.enable_x64(True):
        q = distq.quantize(x, SPECS["int8"])
        y = q.dequantize()
        assert q.dtype == "float64" and y.dtype == jnp.float64
        assert _rel(x, y) < 1e-4
        with pytest.raises(ValueError, match="beyond float32's range"):
            distq.quantize(jnp.asarray([1e300, 1.0]), SPECS["int8"])


# ============================================================== item 7: non-finite under jit
def _finite_decode(q):
    """What the finite values of a group marked for non-finite ones decode to."""
    return np.asarray(dataclasses.replace(q, scale=jnp.abs(q.scale)).dequantize())


@pytest.mark.parametrize("name", ["scalar4", "int8", "int4-affine"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_jit_nonfinite_is_excluded_and_decodes_as_nan(name, bad):
    """One NaN (inf) inserted: every other value gets exactly its code without it, and no
    value of the group that held it decodes as a number (the clean array is quantised outside
    jit, which gives the codes jit gives: one compilation of the search under jit is enough)."""
    spec = SPECS[name]
    x = _base((63,))
    xn = np.insert(x, 20, bad).astype(np.float32)
    q0, q1 = distq.quantize(x, spec), _jit_quantize(xn, spec)
    np.testing.assert_array_equal(np.delete(_codes(q1).reshape(-1), 20), _codes(q0).reshape(-1))
    y1 = np.asarray(q1.dequantize())
    assert np.isnan(y1).all() and np.isnan(np.asarray(q1.take(jnp.array([20, 3])))).all()
    assert np.signbit(np.asarray(q1.scale)).all()
    np.testing.assert_array_equal(np.delete(_finite_decode(q1), 20), np.asarray(q0.dequantize()))
    # nothing is stored for it: nbytes is that of any array of the shape
    assert q1.nbytes == distq.quantize(np.append(x, 0.5), spec).nbytes
    with pytest.raises(ValueError, match="NaN/inf"):  # outside jit: refused, as before
        distq.quantize(xn, spec)


def test_jit_nonfinite_marks_only_its_groups():
    spec = SPECS["nf4-g16"]
    x = _base((16, 8))
    i = np.argsort(np.abs(x).reshape(-1, 16), axis=1)[:, 0]  # not a group's absmax: replacing
    xn, xc = x.copy(), x.copy()                                # it by 0 changes no statistic
    for g in (1, 5):
        xn.reshape(-1)[16 * g + i[g]], xc.reshape(-1)[16 * g + i[g]] = np.nan, 0.0
    xn.reshape(-1)[16 * 5 + (i[5] + 1) % 16] = -np.inf  # two in one group
    q0, q1 = distq.quantize(xc, spec), _jit_quantize(xn, spec)
    finite = np.isfinite(xn).reshape(-1, 16)
    np.testing.assert_array_equal(_codes(q1)[finite], _codes(q0)[finite])
    y0, y1 = (np.asarray(q.dequantize()).reshape(-1, 16) for q in (q0, q1))
    hit = ~finite.all(axis=1)
    assert np.isnan(y1[hit]).all()
    np.testing.assert_array_equal(y1[~hit], y0[~hit])
    ok = _finite_decode(q1).reshape(-1, 16)
    np.testing.assert_array_equal(ok[finite & hit[:, None]], y0[finite & hit[:, None]])


def test_vmap_marks_nonfinite_per_member():
    x = _base((4, 32))
    x[2, 5] = np.nan
    qs = jax.vmap(lambda a: distq.quantize(a, SPECS["int8"]))(x)
    y = np.asarray(qs.dequantize())
    assert np.isnan(y[2]).all() and np.isfinite(np.delete(y, 2, axis=0)).all()


def test_fake_quantize_nonfinite_under_jit():
    spec = SPECS["int4-affine"]
    x = _base((63,))
    xn = jnp.asarray(np.insert(x, 7, np.nan))
    f = jax.jit(lambda a: distq.fake_quantize(a, spec))
    y0, y1 = np.asarray(f(x)), np.asarray(f(xn))
    assert np.isnan(y1[7])
    np.testing.assert_array_equal(np.delete(y1, 7), y0)
    for clip in (True, False):
        g = np.asarray(jax.jit(jax.grad(
            lambda a: distq.fake_quantize(a, spec, clip=clip).sum()))(xn))
        assert g[7] == 0.0 and np.all(np.isfinite(g))


# ======================================================================== property tests
def _group_twin(x: np.ndarray, spec) -> tuple[np.ndarray, np.ndarray]:
    """x with each of the spec's groups scaled by a power of two to a largest magnitude in
    [1, 2) (float64 arithmetic, exact), and each group's exponent."""
    lay = layout_for(spec.resolve(x.shape), x.shape)
    rows = np.asarray(lay.to_rows(jnp.asarray(x)), np.float64)
    amax = np.abs(rows).max(axis=1)
    e = np.where(amax > 0, np.frexp(np.where(amax > 0, amax, 1.0))[1] - 1, 0)
    twin = np.ldexp(rows, -e[:, None]).astype(np.float32)
    return np.asarray(lay.from_rows(jnp.asarray(twin), x.shape)), e


def _check_any_magnitude(x: np.ndarray, name: str) -> None:
    """Either x quantises to exactly the codes of its unit-magnitude twin (so each group keeps
    the relative error it has at unit magnitude), or it is refused naming the range, and
    only because a group lies near an end of float32's range."""
    spec = SPECS[name]
    twin, e = _group_twin(x.astype(np.float32), spec)
    qt = distq.quantize(twin, spec)
    try:
        q = distq.quantize(x, spec)
    except ValueError as err:
        msg = str(err)
        assert "cannot represent this array" in msg and "float32" in msg, msg
        assert re_range(msg), msg
        near_edge = np.min(np.abs(x)[np.abs(x) > 0], initial=np.inf) < 1e-30 or (
            e.min() < -100 or e.max() > 120)
        assert near_edge, (msg, e)
        return
    # groups below 2**-24 of the array's largest magnitude may decode as 0 (an error below
    # float32's resolution at the array's scale); every other group keeps its twin's codes
    amax = np.abs(np.asarray(q.layout.to_rows(jnp.asarray(x)), np.float64)).max(axis=1)
    keep = amax >= np.ldexp(amax.max(), -24)
    np.testing.assert_array_equal(_codes(q)[keep], _codes(qt)[keep])
    # per group, the error relative to the group's energy equals the twin's: a stated bound
    # of 0.1 % plus what flushing decoded values below 1.2e-38 to zero may add
    lay = q.layout
    xr = np.asarray(lay.to_rows(jnp.asarray(x)), np.float64)
    yr = np.asarray(lay.to_rows(q.dequantize()), np.float64)
    tr = np.asarray(lay.to_rows(jnp.asarray(twin)), np.float64)
    ytr = np.asarray(lay.to_rows(qt.dequantize()), np.float64)
    assert np.all(np.isfinite(yr))
    for g in np.flatnonzero(keep):
        energy = (xr[g] ** 2).sum()
        if energy == 0:
            assert not yr[g].any()
            continue
        rel = ((xr[g] - yr[g]) ** 2).sum() / energy
        rel_t = ((tr[g] - ytr[g]) ** 2).sum() / (tr[g] ** 2).sum()
        slack = xr.shape[1] * F32_TINY ** 2 / energy
        assert rel <= rel_t * 1.001 + slack + 1e-12, (g, rel, rel_t)


def re_range(msg: str) -> bool:
    return any(s in msg for s in ("range [", "at least", "largest number", "smallest normal"))


_MAGS = st.floats(min_value=math.log10(1e-38), max_value=math.log10(3e38))
_SHAPES = st.sampled_from([(64,), (16, 8)])


@st.composite
def any_magnitude(draw):
    shape = draw(_SHAPES)
    n = math.prod(shape)
    exps = draw(st.lists(_MAGS, min_size=n, max_size=n))
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=n, max_size=n))
    x = (np.asarray(signs) * 10.0 ** np.asarray(exps)).astype(np.float32).reshape(shape)
    return x


@st.composite
def one_magnitude(draw):
    """A normal sample at one magnitude anywhere in float32's range (the refusals live here)."""
    shape = draw(_SHAPES)
    seed = draw(st.integers(0, 2**16))
    mag = 10.0 ** draw(_MAGS)
    return _at(_base(shape, seed), mag)


@settings(max_examples=25, deadline=None)
@given(x=st.one_of(any_magnitude(), one_magnitude()), name=st.sampled_from(list(SPECS)))
def test_property_any_finite_float32_magnitude(x, name):
    _check_any_magnitude(x, name)


@settings(max_examples=25, deadline=None)
@given(data=st.data(), name=st.sampled_from(list(SPECS)),
       dtype=st.sampled_from([np.float64, np.float16, ml_dtypes.bfloat16]))
def test_property_wide_and_narrow_dtypes(data, name, dtype):
    """float16/bfloat16 convert exactly: the codes of their float32 values. float64 is rounded
    to float32 (then the same), or refused when float32 cannot hold it."""
    spec = SPECS[name]
    shape = data.draw(_SHAPES)
    n = math.prod(shape)
    lo, hi = {np.float64: (-300.0, 300.0), np.float16: (-7.0, 4.8)}.get(dtype, (-38.0, 38.5))
    exps = np.asarray(data.draw(st.lists(st.floats(lo, hi), min_size=n, max_size=n)))
    x = (np.random.default_rng(n).choice([-1.0, 1.0], n) * 10.0 ** exps).astype(dtype)
    x = x.reshape(shape)
    try:
        q = distq.quantize(x, spec)
    except ValueError as err:
        msg = str(err)
        if dtype is np.float64 and "float32's range" in msg:
            with np.errstate(over="ignore", under="ignore"):
                x32 = np.abs(x).astype(np.float32)
            assert np.isinf(x32).any() or ((x32 == 0) & (x != 0)).any(), msg
            return
        assert "cannot represent this array" in msg and re_range(msg), msg
        with pytest.raises(ValueError):
            distq.quantize(x.astype(np.float32), spec)
        return
    assert q.dtype == np.dtype(dtype).name
    assert q.dequantize().dtype == jax.dtypes.canonicalize_dtype(np.dtype(dtype))
    ref = distq.quantize(x.astype(np.float32), spec)
    np.testing.assert_array_equal(_codes(q), _codes(ref))
