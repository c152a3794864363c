"""Prior families for distributional quantisation.

A *family* (gaussian, logistic, gumbel, exponential, cauchy) fixes how a tensor is standardised,
``z = (x - loc) / scale``, and the shape of the companding map ``u = G_p(z / beta)``. Codes are
``floor(n * u)`` and a code ``c`` decodes to ``beta * G_p^{-1}((c + 1/2) / n)``.

The companding exponent ``p`` generalises the reference's two variants:

* ``p = 0``: ``G`` is the CDF of the family itself (equal-probability cells; the ``*_cdf`` names).
* ``p = 1``: ``G`` is the CDF of the density proportional to ``pdf ** (1/2)``, the point density
  that is asymptotically optimal for absolute error (the reference's plain names).
* ``p = 2``: density proportional to ``pdf ** (1/3)``, asymptotically optimal for squared error
  (Panter & Dite 1951; Gersho & Gray, *Vector Quantization and Signal Compression*, eq. 6.3.10).

With ``a = 1 / (1 + p)`` every family has a closed form through a standard special function:

=============  ===========================================  ======================================
family         ``G_p(z)``                                   ``G_p^{-1}(u)``
=============  ===========================================  ======================================
gaussian       ``Phi(z * sqrt(a))``                         ``Phi^{-1}(u) / sqrt(a)``
logistic       ``I_{sigmoid(z)}(a, a)`` (regularised beta)  ``logit(I^{-1}_u(a, a))``
gumbel         ``Q(a, a * exp(-z))`` (upper reg. gamma)     ``-log(Q^{-1}(a, u) / a)``
exponential    ``1 - exp(-a z)``                            ``-log(1 - u) / a``
cauchy (p=0)   ``1/2 + atan(z) / pi``                       ``tan(pi (u - 1/2))``
=============  ===========================================  ======================================

(For the Cauchy family ``pdf ** a`` is not integrable for ``a <= 1/2``, so only ``p = 0`` exists.)
The tables of ``G_p^{-1}`` at the cell edges and centres depend only on ``(family, p, n)``; they are
computed once in float64 with SciPy at trace time and enter jitted code as constants, scaled by the
(possibly traced) ``beta``.

References:
  Hoffmann et al., "Distributional Quantization" (the ``distquant`` package), 2023.
  Panter & Dite, "Quantization distortion in pulse-count modulation with nonuniform spacing of
  levels", Proc. IRE 39(1), 1951.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

EULER_GAMMA = 0.5772156649

FAMILIES: tuple[str, ...] = ("gaussian", "logistic", "gumbel", "exponential", "cauchy")

#: The nine names of the reference package, in the order its ``dist=None`` search tries them.
DIST_NAMES: tuple[str, ...] = (
    "gaussian",
    "gaussian_cdf",
    "logistic",
    "logistic_cdf",
    "cauchy_cdf",
    "gumbel",
    "gumbel_cdf",
    "exponential",
    "exponential_cdf",
)

#: Families whose location defaults to a data statistic (and so are symmetric about it).
SYMMETRIC: frozenset[str] = frozenset({"gaussian", "logistic", "cauchy"})


class Dist(NamedTuple):
    """A parsed distribution name: the family and the companding exponent ``p``.

    Examples:
      >>> Dist("gaussian", 0) == parse_dist("gaussian_cdf")
      True
      >>> Dist("exponential", 1).family
      'exponential'
    """

    family: str
    p: int


def parse_dist(name: str, p: int | None = None) -> Dist:
    """Splits a reference name such as ``"gumbel_cdf"`` into ``Dist("gumbel", 0)``.

    Args:
      name: one of :data:`DIST_NAMES` (or a bare family name such as ``"cauchy"``).
      p: companding exponent for the plain names (0, 1 or 2); ignored for ``*_cdf`` names.
        ``None`` means the reference's choice, 1.

    Returns:
      The family and exponent.

    Examples:
      >>> parse_dist("gumbel_cdf")
      Dist(family='gumbel', p=0)
      >>> parse_dist("gaussian", p=2)
      Dist(family='gaussian', p=2)
    """
    if not isinstance(name, str):
        raise TypeError(f"dist must be a string naming a family, got {type(name).__name__}")
    family, cdf = (name[:-4], True) if name.endswith("_cdf") else (name, False)
    if family not in FAMILIES:
        raise ValueError(
            f"dist={name!r} is not a known family; choose one of {', '.join(DIST_NAMES)}"
        )
    if cdf or family == "cauchy":
        if family == "cauchy" and not cdf and p not in (None, 0):
            raise ValueError("dist='cauchy' only exists as 'cauchy_cdf' (p=0): pdf**(1/(1+p)) "
                             "is not integrable for p >= 1")
        return Dist(family, 0)
    p = 1 if p is None else p
    if p not in (0, 1, 2):
        raise ValueError(f"p (companding exponent) must be 0, 1 or 2, got {p!r}")
    return Dist(family, int(p))


def ppf(dist: Dist, u: np.ndarray) -> np.ndarray:
    """``G_p^{-1}(u)`` in float64 (NumPy/SciPy; used to build static tables).

    Examples:
      >>> import math
      >>> z = ppf(Dist("exponential", 1), [0.5])  # G_1(z) = 1 - exp(-z / 2)
      >>> round(float(z[0]), 6) == round(2 * math.log(2), 6)
      True
      >>> ppf(Dist("cauchy", 0), [0.5, 0.75]).round(6).tolist()
      [0.0, 1.0]
    """
    family, p = dist
    from scipy import special as sps  # noqa: PLC0415 (specs parse without loading scipy)

    u = np.asarray(u, np.float64)
    a = 1.0 / (1.0 + p)
    if family == "gaussian":
        return sps.ndtri(u) / math.sqrt(a)
    if family == "logistic":
        # symmetric: evaluate the lower half only (betaincinv loses all precision near 1)
        lower = np.minimum(u, 1.0 - u)
        v = sps.logit(sps.betaincinv(a, a, lower))
        return np.where(u > 0.5, -v, v)
    if family == "gumbel":
        return -np.log(sps.gammainccinv(a, u) / a)
    if family == "exponential":
        return -np.log1p(-u) / a
    if family == "cauchy":
        return np.tan(np.pi * (u - 0.5))
    raise ValueError(family)


def cdf(dist: Dist, z: np.ndarray) -> np.ndarray:
    """``G_p(z)`` in float64 (the independent reference used by tests and simulations).

    Examples:
      >>> import numpy as np
      >>> d = Dist("gaussian", 2)
      >>> z = np.linspace(-3.0, 3.0, 7)
      >>> bool(np.allclose(ppf(d, cdf(d, z)), z))  # ppf inverts cdf
      True
      >>> cdf(Dist("gumbel", 1), [-np.inf, np.inf]).tolist()
      [0.0, 1.0]
    """
    family, p = dist
    from scipy import special as sps  # noqa: PLC0415 (specs parse without loading scipy)

    z = np.asarray(z, np.float64)
    a = 1.0 / (1.0 + p)
    if family == "gaussian":
        return sps.ndtr(z * math.sqrt(a))
    if family == "logistic":
        # symmetric: evaluate the lower tail only (expit rounds to 1.0 for z > ~37)
        lower = sps.betainc(a, a, sps.expit(-np.abs(z)))
        return np.where(z > 0, 1.0 - lower, lower)
    if family == "gumbel":
        return sps.gammaincc(a, a * np.exp(-z))
    if family == "exponential":
        return -np.expm1(-a * np.maximum(z, 0.0))
    if family == "cauchy":
        return 0.5 + np.arctan(z) / np.pi
    raise ValueError(family)


@functools.lru_cache(maxsize=512)
def _tables(dist: Dist, n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    edges = ppf(dist, np.arange(1, n) / n)
    centres = ppf(dist, (np.arange(n) + 0.5) / n)
    return tuple(edges.tolist()), tuple(centres.tolist())


def thresholds(dist: Dist, n: int) -> np.ndarray:
    """Standard decision thresholds ``G_p^{-1}(j / n)``, ``j = 1..n-1`` (float64, increasing).

    Examples:
      >>> thresholds(Dist("gaussian", 0), 4).round(4).tolist()  # the quartiles of N(0, 1)
      [-0.6745, 0.0, 0.6745]
    """
    return np.array(_tables(dist, n)[0], np.float64)


def levels(dist: Dist, n: int) -> np.ndarray:
    """Standard reconstruction levels ``G_p^{-1}((c + 1/2) / n)``, ``c = 0..n-1`` (float64).

    Examples:
      >>> d = Dist("gaussian", 0)
      >>> levels(d, 4).round(4).tolist()
      [-1.1503, -0.3186, 0.3186, 1.1503]
      >>> cdf(d, levels(d, 4)).round(4).tolist()  # the centres of equal-probability cells
      [0.125, 0.375, 0.625, 0.875]
    """
    return np.array(_tables(dist, n)[1], np.float64)


def standardise_from_moments(family: str, mean, std, zero=None):
    """Location and scale of a family from the data's mean and standard deviation.

    Follows the reference: gaussian uses (mean, std); logistic (mean, std*sqrt(3)/pi); gumbel
    ``s = std*sqrt(6)/pi`` and ``loc = mean - 0.5772156649 s``; exponential ``loc = 0`` and
    ``scale = std``; cauchy ``loc = 0`` and ``scale = 1``. A given ``zero`` replaces the location.
    Works on NumPy or JAX arrays (elementwise, so per-channel statistics broadcast).

    Returns:
      ``(loc, scale)``.

    Examples:
      >>> import numpy as np
      >>> standardise_from_moments("gaussian", 1.0, 2.0)
      (1.0, 2.0)
      >>> loc, scale = standardise_from_moments("logistic", np.array([0.0, 1.0]), 2.0, zero=0.5)
      >>> loc.tolist(), round(scale, 4)  # the variance of a logistic is (pi s)^2 / 3
      ([0.5, 0.5], 1.1027)
    """
    if family == "gaussian":
        loc, scale = mean, std
    elif family == "logistic":
        loc, scale = mean, std * (math.sqrt(3.0) / math.pi)
    elif family == "gumbel":
        scale = std * (math.sqrt(6.0) / math.pi)
        loc = mean - EULER_GAMMA * scale
    elif family == "exponential":
        loc, scale = mean * 0, std
    elif family == "cauchy":
        loc, scale = mean * 0, std * 0 + 1
    else:
        raise ValueError(family)
    if zero is not None:
        loc = mean * 0 + zero
    return loc, scale


def kappa(dist_family: str) -> float:
    """``kappa = 1 / integral sqrt(pdf)`` of the standard family (for the minimal-error line).

    Raises:
      ValueError: for "cauchy", whose ``sqrt(pdf)`` decays like ``1/|z|`` and is not integrable.

    Examples:
      >>> import math
      >>> k = kappa("gaussian")  # 1 / integral of (2 pi)^(-1/4) exp(-z^2 / 4) dz
      >>> math.isclose(k, (2 * math.pi) ** 0.25 / (2 * math.sqrt(math.pi)), rel_tol=1e-6)
      True
      >>> round(kappa("exponential"), 6)  # 1 / integral of exp(-z / 2) over z >= 0
      0.5
    """
    from scipy import integrate, stats

    if dist_family == "cauchy":
        raise ValueError("kappa is undefined for dist_family='cauchy': sqrt(pdf) is not integrable")

    pdf = {
        "gaussian": stats.norm.pdf,
        "logistic": stats.logistic.pdf,
        "gumbel": stats.gumbel_r.pdf,
        "exponential": stats.expon.pdf,
        "cauchy": stats.cauchy.pdf,
    }[dist_family]
    lo = 0.0 if dist_family == "exponential" else -np.inf
    val, _ = integrate.quad(lambda t: math.sqrt(pdf(t)), lo, np.inf, limit=200)
    return 1.0 / val
