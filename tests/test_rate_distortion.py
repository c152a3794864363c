"""experiments/rate_distortion.py: its references and its NumPy quantisers (seconds)."""

import math

import numpy as np
import pytest

import _experiments

rd = _experiments.load("rate_distortion")


def test_reference_curves():
    # Gaussian: D(R) = 2^(-2R); Laplace (unit variance, b = 1/sqrt 2): the Shannon lower bound
    # 2^(2h) / (2 pi e) 2^(-2R) with h = log2(2 e b), i.e. e / pi at R = 0
    for r in (1, 3, 8):
        assert rd.reference("gaussian", r) == pytest.approx(2.0 ** (-2 * r), rel=1e-9)
        assert rd.reference("laplace", r) == pytest.approx(math.e / math.pi * 2.0 ** (-2 * r),
                                                           rel=1e-6)
    # the SLB lies below the Gaussian's D(R) (the Gaussian is the hardest unit-variance source)
    assert rd.reference("student_t3", 2) < rd.reference("laplace", 2) < rd.reference("gaussian", 2)
    for name in rd.SOURCES:
        x = rd.sample(name, 1 << 16, 0)
        assert x.dtype == np.float32 and abs(float(x.var()) - 1.0) < (0.3 if "t3" in name else 0.05)


def test_lloyd_max_reaches_the_known_gaussian_optima():
    xs = np.sort(rd.sample("gaussian", 1 << 17, 1))
    # the Gaussian's fixed-rate optima (Max, 1960): 1 - 2/pi, 0.1175, 0.03455
    for k, want in ((1, 1 - 2 / math.pi), (2, 0.1175), (3, 0.03455)):
        assert rd.lloyd_max(xs, k, "gaussian") == pytest.approx(want, rel=0.02)
    # high rate: Panter-Dite's sqrt(3) pi / 2 * 2^(-2k), 4.35 dB above D(R)
    assert rd.db(rd.lloyd_max(xs, 6, "gaussian"), rd.reference("gaussian", 6)) == pytest.approx(
        4.35, abs=0.3)


def test_uniform_entropy_coded_quantiser():
    x = rd.sample("laplace", 1 << 17, 2)
    mse, h, codes = rd.uniform_entropy(x, 5.0)
    assert h == pytest.approx(5.0, abs=0.01) and codes.min() == 0
    # high rate: 1.53 dB (pi e / 6) above the Shannon lower bound
    assert rd.db(mse, rd.reference("laplace", h)) == pytest.approx(1.53, abs=0.1)
    coded = rd.coded_bits(codes)
    assert h <= coded <= 1.01 * h + 8 * 4096 / codes.size
