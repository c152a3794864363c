"""distq.compat against the real distquant package (installed by the `bench` extra)."""

import math

import numpy as np
import pytest

from distq import compat
from distq.compat import distquant
from distq.core import bitpack
from distq.core import distributions as D

torch = pytest.importorskip("torch")
dq = pytest.importorskip("distquant.distquant")

N = 40_000


def _data(dist: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    fam = dist.replace("_cdf", "")
    if fam == "exponential":
        return rng.exponential(1.3, N).astype(np.float32)
    if fam == "gumbel":
        return rng.gumbel(0.5, 2.0, N).astype(np.float32)
    if fam == "logistic":
        return rng.logistic(-1.0, 0.7, N).astype(np.float32)
    return (0.3 + 1.7 * rng.standard_normal(N)).astype(np.float32)


def _ref(x, **kw):
    return dq.quantize(torch.from_numpy(x.copy()), **kw)


K_FAST = (1, 3, 8)


@pytest.mark.parametrize("dist", D.DIST_NAMES)
@pytest.mark.parametrize(
    "k", [k if k in K_FAST else pytest.param(k, marks=pytest.mark.slow) for k in range(1, 9)]
)
def test_codes_and_beta_agree_with_distquant(dist, k):
    x = _data(dist, seed=k)
    for beta in (1.0, None):
        q_ref, info_ref = _ref(x, k=k, dist=dist, beta=beta, packbits=False)
        q, info = compat.quantize(x, k=k, dist=dist, beta=beta, packbits=False)
        assert info["beta"] == info_ref["beta"]
        ref = q_ref.numpy()
        in_range = ref < (1 << k)  # distquant's out-of-range codes are its defect, not ours
        agree = np.mean((ref == q)[in_range])
        assert agree >= 0.9999, (dist, k, beta, agree)
        assert q.min() >= 0 and q.max() < info["n"]
        assert info["abs_error"] == pytest.approx(info_ref["abs_error"], rel=1e-4)
        assert info["scale"] == pytest.approx(float(info_ref["scale"]), rel=1e-5)
        assert info["loc"] == pytest.approx(float(info_ref["loc"]), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("k", [2, 3, 4, 7, 8])
def test_packed_words_identical_and_cross_decodable(k):
    x = _data("gaussian", seed=10 + k)
    q_ref, info_ref = _ref(x, k=k, dist="gaussian", beta=1.0, packbits=True)
    q, info = compat.quantize(x, k=k, dist="gaussian", beta=1.0, packbits=True)
    assert q.dtype == np.int64 and q.shape == tuple(q_ref.shape)
    assert np.mean(q == q_ref.numpy()) >= 0.999
    # each library decodes the other's words
    ours_from_ref = compat.dequantize(q_ref.numpy(), **info_ref)
    ref_from_ours = dq.dequantize(torch.from_numpy(q.copy()), **info).numpy()
    np.testing.assert_allclose(ours_from_ref, dq.dequantize(q_ref.clone(), **info_ref).numpy(),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ref_from_ours, compat.dequantize(q, **info), rtol=1e-5, atol=1e-5)


def test_dist_none_matches_distquant_choice():
    x = _data("gumbel", seed=3)
    _, info_ref = dq.auto_quantize(torch.from_numpy(x.copy()), k=4)
    _, info = compat.quantize(x, k=4, dist=None)
    assert (info["dist"], info["beta"]) == (info_ref["dist"], info_ref["beta"])


def test_n_and_zero_with_odd_n_match():
    x = _data("gaussian", seed=5)
    q_ref, info_ref = _ref(x, n=15, dist="gaussian", beta=None, zero=0.0, packbits=False)
    q, info = compat.quantize(x, n=15, dist="gaussian", zero=0.0, packbits=False)
    assert info["beta"] == info_ref["beta"] and info["n"] == 15
    assert np.mean(q == q_ref.numpy()) >= 0.9999


def test_fixed_defects():
    rng = np.random.default_rng(0)
    x = rng.standard_t(3, 200_000).astype(np.float32)
    x[::1000] = 1e4  # values whose CDF rounds to 1.0 in float32
    q, info = compat.quantize(x, k=8, dist="gaussian_cdf", beta=1.0, packbits=True)
    before = q.copy()
    a = compat.dequantize(q, **info)
    b = compat.dequantize(q, **info)
    np.testing.assert_array_equal(q, before)  # input not mutated
    np.testing.assert_array_equal(a, b)  # second call identical
    assert np.all(np.isfinite(a))
    codes, _ = compat.quantize(x, k=8, dist="gaussian_cdf", beta=1.0, packbits=False)
    assert codes.max() <= 255
    # zero together with k: an exact zero level
    xz = np.concatenate([rng.standard_normal(1000), np.zeros(10)]).astype(np.float32)
    qz, iz = compat.quantize(xz, k=4, zero=0.0)
    assert iz["n"] == 15
    assert np.all(compat.dequantize(qz, **iz)[-10:] == 0.0)


def test_layout_dtype_and_input_types():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((64, 50)).astype(np.float64)
    strided = base[:, ::2]  # non-contiguous, float64
    q, info = compat.quantize(strided, k=5, beta=1.0)
    out = compat.dequantize(q, **info)
    assert out.dtype == np.float64 and out.shape == strided.shape
    q32, info32 = compat.quantize(np.ascontiguousarray(strided, np.float32), k=5, beta=1.0)
    np.testing.assert_array_equal(q, q32)
    import jax.numpy as jnp

    qj, _ = compat.quantize(jnp.asarray(strided, jnp.float32), k=5, beta=1.0)
    np.testing.assert_array_equal(qj, q32)
    qt, _ = compat.quantize(torch.from_numpy(np.ascontiguousarray(strided)), k=5, beta=1.0)
    np.testing.assert_array_equal(qt, q32)


def test_constant_input_round_trips():
    x = np.full((7, 9), 2.5, np.float32)
    for dist in ("gaussian", "exponential", "gumbel_cdf", "cauchy_cdf", None):
        for beta in (1.0, None):
            q, info = compat.quantize(x, k=3, dist=dist, beta=beta)
            np.testing.assert_array_equal(compat.dequantize(q, **info), x)
            assert info["abs_error"] == 0.0
    q, info = compat.quantize(x, k=3, dist="gaussian", beta=1.0, packbits=False)
    assert q.min() >= 0 and q.max() < 8


@pytest.mark.parametrize("value", [0.1, -3.7e5, 1e-20, 0.0, 7.0])
def test_large_constant_input_round_trips(value):
    # float32 sums of a million copies round: the spread they leave must not hide the constant
    x = np.full(1_000_003, value, np.float32)
    q, info = compat.quantize(x, k=4, dist="gaussian", beta=1.0)
    np.testing.assert_array_equal(compat.dequantize(q, **info), x)
    assert info["scale"] == 0.0 and info["abs_error"] == 0.0
    if abs(value) < 1e-3:  # a spread of one step there underflows float32 statistics
        return
    # two values one float32 step apart are not a constant (decoded to within a step)
    y = x.copy()
    y[::2] = np.nextafter(np.float32(value), np.float32(np.inf))
    q, info = compat.quantize(y, k=4, dist="gaussian", beta=1.0)
    assert info["scale"] > 0.0
    step = abs(np.spacing(np.float32(value)))
    assert np.max(np.abs(compat.dequantize(q, **info) - y)) <= 2 * step


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "k"),
        (dict(k=2, n=4), "only one"),
        (dict(k=0), "k"),
        (dict(k=17), "k"),
        (dict(n=1), "n"),
        (dict(k=4, dist="normal"), "dist"),
        (dict(k=4, beta=-1.0), "beta"),
        (dict(k=1, zero=0.0), "zero"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compat.quantize(np.ones(10, np.float32) + np.arange(10), **kwargs)


def test_bad_data():
    with pytest.raises(ValueError, match="empty"):
        compat.quantize(np.zeros(0, np.float32), k=4)
    with pytest.raises(ValueError, match="NaN"):
        compat.quantize(np.array([1.0, np.nan, 2.0], np.float32), k=4, beta=1.0)
    with pytest.raises(ValueError, match="NaN"):
        compat.quantize(np.array([1.0, np.inf, 2.0], np.float32), k=4)
    with pytest.raises(TypeError, match="floating"):
        compat.quantize(np.arange(10), k=4)
    with pytest.raises(ValueError, match="missing"):
        compat.dequantize(np.zeros(3, np.int64), n=16)


def test_abs_error_matches_dequantize():
    x = _data("logistic", seed=9)
    for k in (3, 4, 6):
        q, info = compat.quantize(x, k=k, dist="logistic")
        err = float(np.mean(np.abs(compat.dequantize(q, **info) - x)))
        assert math.isclose(err, info["abs_error"], rel_tol=1e-4)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("size", [1, 7, 16, 17, 40_001])
def test_word_kernel_matches_distquant_any_length(k, size):
    """Widths dividing 32 are packed by the two-half word kernel: every length (padding of the
    last int64 word included) must give distquant's words, and the error must match decoding."""
    x = (0.3 + 1.7 * np.random.default_rng(size + k).standard_normal(size)).astype(np.float32)
    q, info = compat.quantize(x, k=k, dist="gaussian", beta=1.0)
    assert q.dtype == np.int64 and q.shape == (math.ceil(size / (64 // k)),)
    if size == 1:  # a constant input (distquant divides by a zero std here)
        assert compat.dequantize(q, **info).tolist() == x.tolist()
    else:
        q_ref, _ = _ref(x, k=k, dist="gaussian", beta=1.0)
        assert np.mean(q == q_ref.numpy()) >= 0.999
        err = float(np.mean(np.abs(compat.dequantize(q, **info) - x)))
        assert math.isclose(err, info["abs_error"], rel_tol=1e-4, abs_tol=1e-7)


def test_statistics_with_a_large_mean():
    """A mean far above the spread takes the shifted-sums branch: the scale stays accurate."""
    rng = np.random.default_rng(3)
    x = (1e4 + 0.5 * rng.standard_normal(100_000)).astype(np.float32)
    _, info = compat.quantize(x, k=4, dist="gaussian", beta=1.0)
    x64 = x.astype(np.float64)
    assert math.isclose(info["loc"], x64.mean(), rel_tol=1e-6)
    assert math.isclose(info["scale"], x64.std(ddof=1), rel_tol=1e-3)
    y = (0.01 + rng.standard_normal(100_000)).astype(np.float32)  # the fast branch
    _, info = compat.quantize(y, k=4, dist="gaussian", beta=1.0)
    assert math.isclose(info["scale"], y.astype(np.float64).std(ddof=1), rel_tol=1e-5)


@pytest.mark.parametrize("k,zero", [(1, None), (2, None), (4, None), (4, 0.0), (8, None),
                                    (16, None)])
def test_misaligned_and_ragged_inputs_pack_exactly(k, zero):
    # Large inputs on the word path are read in place from their first 64-byte boundary: the
    # values before it and after the last whole word are encoded apart and the words joined by
    # a funnel shift. Half-integers in [-2, 2] keep every float32 sum exact whatever the split,
    # so the packed words must equal those of an aligned copy bit for bit.
    rng = np.random.default_rng(k)
    base = distquant._aligned_copy(rng.integers(-4, 5, 200_064).astype(np.float32) / 2)
    for h in (0, 1, 7, 12, 15):
        x = base[h : h + 131_077]  # misaligned by h floats, and not a whole number of words
        assert distquant._head_length(x) == (16 - h) % 16
        # (zero with k=4: 15 levels, the word kernel's search padded with an infinite threshold)
        q, info = compat.quantize(x, k=k, dist="gaussian", beta=1.0, zero=zero)
        ref, ref_info = compat.quantize(np.array(x), k=k, dist="gaussian", beta=1.0,
                                        packbits=False, zero=zero)
        np.testing.assert_array_equal(q, bitpack.int64_from_halves(
            bitpack.pack_int64_halves(ref.astype(np.uint32), k)))
        assert info["loc"] == ref_info["loc"] and info["scale"] == ref_info["scale"]
        np.testing.assert_allclose(info["abs_error"], ref_info["abs_error"], rtol=1e-5)
        np.testing.assert_array_equal(compat.dequantize(q, **info),
                                      compat.dequantize(ref, **ref_info))
