"""Sanity checks of experiments/simulations.py in a tiny configuration (seconds, not minutes)."""

import dataclasses
import math

import numpy as np
import pytest

import _experiments

sim = _experiments.load("simulations")

TINY = dataclasses.replace(
    sim.FULL, m=1 << 15, reps=2, ks=tuple(range(1, 11)), mse_kmax=10,
    hist_bins=(1 << 8, 1 << 10), lloyd_train=(1 << 10,), lloyd_iters=60,
    inputs=("gaussian", "exponential"), threads=1, library=False, k_search=7,
)


@pytest.fixture(scope="module")
def results():
    return sim.run(TINY, log=lambda s: None)


def _mean(results, name, group, key):
    return np.array(results["inputs"][name][group][key]["mean"])


@pytest.mark.parametrize("name", TINY.inputs)
def test_errors_decrease_with_bits(results, name):
    for vname in (name, "cauchy_cdf", "logistic_cdf"):
        e = _mean(results, name, "l1", vname)
        assert e.shape == (len(TINY.ks),)
        assert np.all(np.diff(e) < 0), (vname, e)
    e = _mean(results, name, "mse", "p2:" + name)
    assert np.all(np.diff(e) < 0), e
    for b in TINY.hist_bins:  # the histogram stops at log2(bins) bits
        assert len(_mean(results, name, "l1", f"hist:{b}")) == int(math.log2(b))


@pytest.mark.parametrize("name", TINY.inputs)
def test_matched_variant_approaches_the_minimal_error(results, name):
    r = results["inputs"][name]
    ratio_l1 = _mean(results, name, "l1", name) / np.array(r["min_l1"])
    ratio_mse = _mean(results, name, "mse", "p2:" + name) / np.array(r["min_mse"])
    # moderate k (5..9 bits, >= 64 samples per level): within a few percent of the high-rate line
    assert np.all(np.abs(ratio_l1[4:9] - 1.0) < 0.06), ratio_l1
    assert np.all(np.abs(ratio_mse[4:9] - 1.0) < 0.1), ratio_mse
    # and nearly constant there
    assert np.ptp(ratio_l1[5:9]) < 0.04
    # small k is below the asymptotic line (it is not a lower bound at low rate)
    assert ratio_l1[0] < 1.0 and ratio_mse[0] < 1.0


@pytest.mark.parametrize("name", TINY.inputs)
def test_points_exist(results, name):
    pts = results["inputs"][name]["points"]
    for key in ("qint8:0.01", "qint8:0.03", "qint8:0.1", "qint8:0.3", "quint8:minmax",
                "float16", "bfloat16"):
        l1, mse = pts[key]["l1"]["mean"], pts[key]["mse"]["mean"]
        assert np.isfinite(l1) and np.isfinite(mse) and l1 > 0 and mse > 0
    # float16 keeps 11 significant bits, bfloat16 8: about 8x apart
    assert 4 < pts["bfloat16"]["l1"]["mean"] / pts["float16"]["l1"]["mean"] < 16


def test_minimal_error_constants_match_distq_kappa():
    from distq.core import distributions as D

    for name in sim.INPUTS:
        assert math.isclose(1.0 / sim.power_integral(name, 0.5), D.kappa(name), rel_tol=1e-9)
    # Panter-Dite for the standard normal: (2 pi) 3^(3/2) / 12 per 4^k
    assert math.isclose(sim.min_mse("gaussian", [0])[0], 2 * math.pi * 3**1.5 / 12, rel_tol=1e-8)


def test_prefix_and_direct_errors_agree():
    x = sim.sample("gumbel", 1 << 14, 0, 0)
    d = sim.prepare(x)
    t, lv = sim.compat_codebook("gumbel", 64, 1.2, d.mean, d.std)
    a = sim._errors_prefix(d, t, lv)
    b = sim._errors_direct(d, t, lv)
    assert np.allclose(a, b, rtol=1e-9)
    xhat = lv[np.searchsorted(t, x.astype(np.float64), side="right")]
    assert np.allclose(b, sim.errors_of_values(x, xhat), rtol=1e-9)


def test_beta_search_matches_distq_compat():
    from distq import compat

    x = sim.sample("logistic", 1 << 14, 1, 0)
    d = sim.prepare(x)
    for name in ("logistic", "cauchy_cdf"):
        beta, ours = sim.search_compat_beta(d, name, 8)
        assert math.isclose(ours, sim.errors(d, *sim.compat_codebook(name, 8, beta, d.mean,
                                                                     d.std))[0], rel_tol=1e-9)
        _, info = compat.quantize(x, k=3, dist=name, beta=None, packbits=False)
        assert beta == info["beta"]
        assert math.isclose(ours, info["abs_error"], rel_tol=1e-5)


def test_qint8_matches_torch_definition():
    x = np.array([-100.0, -0.375, 0.125, 0.375, 0.625, 100.0], np.float32)
    # x / scale = -400, -1.5, 0.5, 1.5, 2.5, 400: round half to even, then clamp to [-128, 127]
    assert sim.qint8(x, 0.25).tolist() == [-32.0, -0.5, 0.0, 0.5, 0.5, 31.75]
    assert sim.qint8(x, 0.25, 128, 0, 255).tolist() == [-32.0, -0.5, 0.0, 0.5, 0.5, 31.75]


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    assert sim.main(["--quick", "--out", str(tmp_path)]) == 0
    for name in ("gaussian", "t3"):
        assert (tmp_path / f"l1_{name}.png").stat().st_size > 10_000
        assert (tmp_path / f"mse_{name}.png").stat().st_size > 10_000
