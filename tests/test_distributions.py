"""Tests of distq.distributions: companding maps, tables, name parsing, moments, kappa."""

import math
import warnings

import numpy as np
import pytest
from scipy import integrate, special, stats

from distq.core import distributions as D

FAMILIES4 = ("gaussian", "logistic", "gumbel", "exponential")
PAIRS = [(f, p) for f in FAMILIES4 for p in (0, 1, 2)] + [("cauchy", 0)]
PAIR_IDS = [f"{f}-p{p}" for f, p in PAIRS]

SCIPY = {
    "gaussian": stats.norm,
    "logistic": stats.logistic,
    "gumbel": stats.gumbel_r,
    "exponential": stats.expon,
    "cauchy": stats.cauchy,
}

# the upper tail stops at 1 - 1e-4 here; the tails are checked through symmetry below
U = np.concatenate([[1e-6, 1e-4, 1e-3], np.linspace(0.01, 0.99, 99), [0.999, 1 - 1e-4]])


def _z_grid(family):
    """z values well inside the support where G_p is neither 0 nor 1 in float64."""
    if family == "exponential":
        return np.linspace(0.01, 12.0, 61)
    if family == "gumbel":
        return np.linspace(-2.5, 12.0, 61)
    return np.linspace(-12.0, 12.0, 61)


# ------------------------------------------------------------------------ inverse pairs
@pytest.mark.parametrize("family,p", PAIRS, ids=PAIR_IDS)
def test_cdf_of_ppf_is_identity(family, p):
    d = D.Dist(family, p)
    z = D.ppf(d, U)
    assert np.all(np.isfinite(z))
    assert np.all(np.diff(z) > 0), "ppf must be strictly increasing"
    np.testing.assert_allclose(D.cdf(d, z), U, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family,p", PAIRS, ids=PAIR_IDS)
def test_ppf_of_cdf_is_identity(family, p):
    d = D.Dist(family, p)
    z = _z_grid(family)
    u = D.cdf(d, z)
    assert np.all((u >= 0) & (u <= 1))
    assert np.all(np.diff(u) >= 0), "cdf must be non-decreasing"
    # the inverse is ill-conditioned where the cdf is flat (u within 1e-9 of 0 or 1)
    ok = (u > 1e-300) & (u < 1 - 1e-9)
    assert np.all(np.diff(u[ok]) > 0), "cdf must be strictly increasing on the support"
    assert ok.sum() > 20
    np.testing.assert_allclose(D.ppf(d, u[ok]), z[ok], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------ p = 0: scipy
@pytest.mark.parametrize("family", FAMILIES4 + ("cauchy",))
def test_p0_matches_scipy(family):
    d = D.Dist(family, 0)
    ref = SCIPY[family]
    np.testing.assert_allclose(D.ppf(d, U), ref.ppf(U), rtol=1e-9, atol=1e-9)
    z = _z_grid(family)
    np.testing.assert_allclose(D.cdf(d, z), ref.cdf(z), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "family,p",
    [("gaussian", 0), ("gaussian", 1), ("gaussian", 2), ("logistic", 0), ("logistic", 1),
     ("logistic", 2), ("cauchy", 0)],
)
def test_ppf_is_odd_for_symmetric_families(family, p):
    # regression: logistic p>=1 once computed logit(betaincinv(a, a, u)) for u near 1, where
    # betaincinv returns x within 1e-15 of 1 (p=2: ppf(1 - 1e-6) = inf, 2e-4 error at 1 - 1e-5)
    # G_p^{-1}(1 - u) = -G_p^{-1}(u) for a density symmetric about 0; the lower tail is the
    # well-conditioned side, so this checks the accuracy of the upper tail (levels of large n)
    d = D.Dist(family, p)
    u = np.array([1e-6, 1e-5, 1e-4, 1e-3, 0.1, 0.3])
    lo, hi = D.ppf(d, u), D.ppf(d, 1.0 - u)
    assert np.all(np.isfinite(hi))
    np.testing.assert_allclose(hi, -lo, rtol=1e-9)


@pytest.mark.parametrize(
    "family,p",
    [("gaussian", 0), ("gaussian", 1), ("gaussian", 2), ("logistic", 0),
     ("logistic", 1), ("logistic", 2), ("cauchy", 0)],
)
def test_cdf_is_symmetric_in_the_tails(family, p):
    # G_p(z) + G_p(-z) = 1; the lower tail is the accurate side, so this checks that the upper
    # tail keeps the information float64 can hold (1 - 1e-6 is not 1.0)
    d = D.Dist(family, p)
    z = np.array([0.5, 5.0, 10.0, 20.0, 30.0, 40.0, 60.0])
    np.testing.assert_allclose(D.cdf(d, z) + D.cdf(d, -z) - 1.0, 0.0, atol=1e-14)


def test_p0_exponential_cdf_is_zero_below_support():
    d = D.Dist("exponential", 0)
    np.testing.assert_array_equal(D.cdf(d, np.array([-5.0, -1e-3, 0.0])), 0.0)


# ------------------------------------------------------------------------ p = 1: closed forms
def _p1_reference(family, z):
    if family == "gaussian":
        return stats.norm.cdf(z, scale=math.sqrt(2.0))
    if family == "logistic":
        return (2.0 / np.pi) * np.arctan(np.exp(z / 2.0))
    if family == "gumbel":
        return special.erfc(np.exp(-z / 2.0) / math.sqrt(2.0))
    if family == "exponential":
        return 1.0 - np.exp(-z / 2.0)
    raise AssertionError(family)


def _p1_reference_inverse(family, u):
    # the closed-form inverses of the formulas above, derived by hand
    if family == "gaussian":
        return math.sqrt(2.0) * special.ndtri(u)
    if family == "logistic":
        return 2.0 * np.log(np.tan(np.pi * u / 2.0))
    if family == "gumbel":
        return -2.0 * np.log(math.sqrt(2.0) * special.erfcinv(u))
    if family == "exponential":
        return -2.0 * np.log(1.0 - u)
    raise AssertionError(family)


@pytest.mark.parametrize("family", FAMILIES4)
def test_p1_matches_sqrt_pdf_closed_forms(family):
    d = D.Dist(family, 1)
    z = _z_grid(family)
    np.testing.assert_allclose(D.cdf(d, z), _p1_reference(family, z), rtol=1e-9, atol=1e-12)
    u = U[(U > 1e-5) & (U < 1 - 1e-5)]
    np.testing.assert_allclose(D.ppf(d, u), _p1_reference_inverse(family, u), rtol=1e-8, atol=1e-8)


# ------------------------------------------------------------------------ p = 2: quadrature
def _cube_root_cdf(family, zs):
    pdf = SCIPY[family].pdf
    lo = 0.0 if family == "exponential" else -np.inf

    def f(t):
        return pdf(t) ** (1.0 / 3.0)

    total, _ = integrate.quad(f, lo, np.inf, limit=200, epsabs=1e-13, epsrel=1e-12)
    out = []
    for z in zs:
        # split at 0 so quad sees the bulk of the mass on each side
        if lo == 0.0:
            part, _ = integrate.quad(f, 0.0, z, limit=200, epsabs=1e-13, epsrel=1e-12)
        elif z <= 0:
            part, _ = integrate.quad(f, -np.inf, z, limit=200, epsabs=1e-13, epsrel=1e-12)
        else:
            a, _ = integrate.quad(f, -np.inf, 0.0, limit=200, epsabs=1e-13, epsrel=1e-12)
            b, _ = integrate.quad(f, 0.0, z, limit=200, epsabs=1e-13, epsrel=1e-12)
            part = a + b
        out.append(part / total)
    return np.array(out)


@pytest.mark.parametrize("family", FAMILIES4)
def test_p2_matches_integrated_cube_root_pdf(family):
    d = D.Dist(family, 2)
    zs = {
        "gaussian": [-4.0, -1.5, -0.3, 0.0, 0.7, 2.0, 5.0],
        "logistic": [-8.0, -2.0, 0.0, 0.5, 3.0, 9.0],
        "gumbel": [-2.0, -0.7, 0.0, 1.0, 3.0, 8.0],
        "exponential": [0.05, 0.5, 1.0, 3.0, 7.0],
    }[family]
    ref = _cube_root_cdf(family, zs)
    np.testing.assert_allclose(D.cdf(d, np.array(zs)), ref, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(D.ppf(d, ref), zs, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------ tables
@pytest.mark.parametrize("family,p", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("n", [2, 3, 16, 255])
def test_thresholds_and_levels_interleave(family, p, n):
    d = D.Dist(family, p)
    t, lv = D.thresholds(d, n), D.levels(d, n)
    assert t.shape == (n - 1,) and lv.shape == (n,)
    assert t.dtype == np.float64 and lv.dtype == np.float64
    assert np.all(np.isfinite(t)) and np.all(np.isfinite(lv))
    assert np.all(np.diff(lv) > 0)
    if n > 2:
        assert np.all(np.diff(t) > 0)
    # every threshold lies strictly between its two neighbouring levels
    assert np.all(lv[:-1] < t) and np.all(t < lv[1:])
    # each level carries 1/n of the companded mass: G_p(level_c) = (c + 1/2) / n
    np.testing.assert_allclose(D.cdf(d, lv), (np.arange(n) + 0.5) / n, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(D.cdf(d, t), np.arange(1, n) / n, rtol=1e-8, atol=1e-12)
    if family in D.SYMMETRIC:
        np.testing.assert_allclose(lv, -lv[::-1], atol=1e-9)
    if family == "exponential":
        assert lv[0] > 0


def test_tables_are_not_shared_mutable_state():
    d = D.Dist("gaussian", 1)
    a = D.levels(d, 8)
    a[:] = 0.0
    assert np.all(np.diff(D.levels(d, 8)) > 0)


def test_larger_p_spreads_levels_wider():
    # pdf**(1/(1+p)) has heavier tails for larger p, so the outer level moves outwards
    for fam in FAMILIES4:
        outer = [D.levels(D.Dist(fam, p), 16)[-1] for p in (0, 1, 2)]
        assert outer[0] < outer[1] < outer[2], fam


# ------------------------------------------------------------------------ parse_dist
@pytest.mark.parametrize(
    "name,p,expected",
    [
        ("gaussian", None, ("gaussian", 1)),
        ("gaussian", 0, ("gaussian", 0)),
        ("gaussian", 2, ("gaussian", 2)),
        ("gaussian_cdf", None, ("gaussian", 0)),
        ("gaussian_cdf", 2, ("gaussian", 0)),
        ("logistic", None, ("logistic", 1)),
        ("logistic_cdf", None, ("logistic", 0)),
        ("gumbel", 2, ("gumbel", 2)),
        ("gumbel_cdf", None, ("gumbel", 0)),
        ("exponential", None, ("exponential", 1)),
        ("exponential_cdf", 1, ("exponential", 0)),
        ("cauchy_cdf", None, ("cauchy", 0)),
        ("cauchy", None, ("cauchy", 0)),
        ("cauchy", 0, ("cauchy", 0)),
    ],
)
def test_parse_dist(name, p, expected):
    d = D.parse_dist(name, p)
    assert isinstance(d, D.Dist)
    assert tuple(d) == expected
    assert d.family == expected[0] and d.p == expected[1]


def test_parse_dist_all_reference_names():
    for name in D.DIST_NAMES:
        d = D.parse_dist(name)
        assert d.family in D.FAMILIES
        assert d.p == (0 if name.endswith("_cdf") else 1)
    assert len(D.DIST_NAMES) == 9 and len(set(D.DIST_NAMES)) == 9


@pytest.mark.parametrize("name", ["weibull", "normal", "gaussian_pdf", "Gaussian", "_cdf", ""])
def test_parse_dist_unknown_name(name):
    with pytest.raises(ValueError) as e:
        D.parse_dist(name)
    assert repr(name) in str(e.value)


@pytest.mark.parametrize("p", [1, 2])
def test_parse_dist_cauchy_only_p0(p):
    with pytest.raises(ValueError, match="cauchy"):
        D.parse_dist("cauchy", p)


@pytest.mark.parametrize("p", [3, -1, 0.5])
def test_parse_dist_bad_p(p):
    with pytest.raises(ValueError, match="p"):
        D.parse_dist("gaussian", p)


def test_parse_dist_non_string():
    with pytest.raises(TypeError, match="dist"):
        D.parse_dist(3)


# ------------------------------------------------------------------------ moments
MEAN, STD = 1.7, 2.3


@pytest.mark.parametrize(
    "family,loc,scale",
    [
        ("gaussian", MEAN, STD),
        ("logistic", MEAN, STD * math.sqrt(3) / math.pi),
        ("gumbel", MEAN - 0.5772156649 * STD * math.sqrt(6) / math.pi, STD * math.sqrt(6) / math.pi),
        ("exponential", 0.0, STD),
        ("cauchy", 0.0, 1.0),
    ],
)
def test_standardise_from_moments(family, loc, scale):
    got_loc, got_scale = D.standardise_from_moments(family, MEAN, STD)
    assert got_loc == pytest.approx(loc, rel=1e-12, abs=1e-12)
    assert got_scale == pytest.approx(scale, rel=1e-12)
    # a given zero replaces the location, leaves the scale
    z_loc, z_scale = D.standardise_from_moments(family, MEAN, STD, zero=0.25)
    assert z_loc == pytest.approx(0.25) and z_scale == pytest.approx(scale, rel=1e-12)


@pytest.mark.parametrize("family", ["gaussian", "logistic", "gumbel"])
def test_standardise_from_moments_recovers_scipy_moments(family):
    # the family with the returned (loc, scale) has exactly the given mean and std
    loc, scale = D.standardise_from_moments(family, MEAN, STD)
    m, v = SCIPY[family].stats(loc=loc, scale=scale, moments="mv")
    assert float(m) == pytest.approx(MEAN, rel=1e-9)
    assert math.sqrt(float(v)) == pytest.approx(STD, rel=1e-9)


def test_standardise_from_moments_broadcasts_per_channel():
    mean = np.array([0.0, 1.0, -2.0])
    std = np.array([1.0, 0.5, 4.0])
    for fam in D.FAMILIES:
        loc, scale = D.standardise_from_moments(fam, mean, std)
        loc, scale = np.broadcast_to(loc, (3,)), np.broadcast_to(scale, (3,))
        for i in range(3):
            l1, s1 = D.standardise_from_moments(fam, float(mean[i]), float(std[i]))
            assert loc[i] == pytest.approx(l1) and scale[i] == pytest.approx(s1)
        zl, _ = D.standardise_from_moments(fam, mean, std, zero=0.5)
        np.testing.assert_allclose(np.broadcast_to(zl, (3,)), 0.5)


def test_standardise_from_moments_unknown_family():
    with pytest.raises(ValueError):
        D.standardise_from_moments("weibull", 0.0, 1.0)


# ------------------------------------------------------------------------ kappa
def test_kappa_closed_forms():
    # integral of sqrt(pdf) by hand: gaussian (2 pi)^(-1/4) * sqrt(4 pi); logistic
    # int dz / (2 cosh(z/2)) = pi; gumbel 2 sqrt(pi/2); exponential int e^(-z/2) = 2
    gauss = 1.0 / ((2 * math.pi) ** -0.25 * math.sqrt(4 * math.pi))
    assert gauss == pytest.approx((8 * math.pi) ** -0.25, rel=1e-14)
    assert D.kappa("gaussian") == pytest.approx(gauss, rel=1e-9)
    assert D.kappa("logistic") == pytest.approx(1 / math.pi, rel=1e-9)
    assert D.kappa("gumbel") == pytest.approx(1 / math.sqrt(2 * math.pi), rel=1e-9)
    assert D.kappa("exponential") == pytest.approx(0.5, rel=1e-9)


def test_kappa_cauchy_is_undefined():
    # regression: the divergent integral of sqrt(pdf) (~1/|z| tails) once returned ~0.006
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="cauchy"):
            D.kappa("cauchy")
