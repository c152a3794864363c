"""Searches over the range factor ``beta`` and over prior families, vectorised over candidates.

Every candidate codebook is scored on the same *sorted* data with prefix sums
(:func:`distq._numerics.range_errors`), so a candidate costs ``O(n log N)`` instead of a pass over
the data, and the whole search (grid over families x betas, then a zoom on ``log beta`` around the
winner) is one jitted computation with no host round trip per candidate.

Examples:
  Which of three 8-level codebooks, and which ``beta``, fits a standard normal sample best:

  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from distq.core import distributions as D, search as S
  >>> zs = jnp.sort(jax.random.normal(jax.random.key(0), (4096,)))
  >>> dists = [D.Dist("gaussian", 0), D.Dist("gaussian", 2), D.Dist("logistic", 2)]
  >>> cands = S.Candidates(dists, 8, np.zeros(3, np.float32), np.ones(3, np.float32), "nearest")
  >>> cands.betas.shape  # each dist x the 37 betas of BETA_GRID
  (3, 37)
  >>> @jax.jit
  ... def search(zs):
  ...     err, row, col = S.grid_search(zs, cands, "mse")
  ...     beta, best = S.zoom_search(zs, cands, "mse", row, col)
  ...     return row, jnp.asarray(cands.betas)[row, col], beta, best, err[row, col]
  >>> row, grid_beta, beta, best, grid_best = search(zs)
  >>> dists[int(row)], round(float(grid_beta), 3), round(float(beta), 2)
  (Dist(family='gaussian', p=2), 0.794, 0.81)
  >>> bool(best <= grid_best), round(float(best) / zs.size, 4)  # MSE (Lloyd-Max: 0.0345)
  (True, 0.0354)
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import _numerics as nx
from . import distributions as D

#: The reference's 37-value grid (sorted), each value rounded to 3 decimals.
BETA_GRID: tuple[float, ...] = tuple(
    sorted(
        np.logspace(-1, -0.1, 10).round(3).tolist()
        + np.logspace(-0.07, 0.07, 15).round(3).tolist()
        + [0.99, 1.01]
        + np.logspace(0.1, 1.0, 10).round(3).tolist()
    )
)
#: The reference's grid for ``cauchy_cdf``.
BETA_GRID_CAUCHY: tuple[float, ...] = tuple(np.logspace(-3, 3, 31).round(3).tolist())


def beta_grid(family: str) -> tuple[float, ...]:
    """The grid of ``beta`` values searched for a family.

    Examples:
      >>> len(beta_grid("gaussian")), beta_grid("gaussian")[0], 1.0 in beta_grid("gaussian")
      (37, 0.1, True)
      >>> len(beta_grid("cauchy")), beta_grid("cauchy")[0], beta_grid("cauchy")[-1]
      (31, 0.001, 1000.0)
    """
    return BETA_GRID_CAUCHY if family == "cauchy" else BETA_GRID


class Candidates:
    """Static description of a set of (dist, beta-grid) candidates in common units.

    For candidate ``i`` with standard tables ``T_i`` (thresholds) and ``L_i`` (levels), the
    codebook in the sorted data's units is ``offset_i + mult_i * beta * L_i``.

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> from distq.core.distributions import Dist
      >>> c = Candidates([Dist("gaussian", 0)], 4, np.zeros(1), np.ones(1), encode="nearest")
      >>> t, lv = c.codebooks(jnp.array(0), jnp.array(1.0))
      >>> [round(v, 4) for v in lv.tolist()]  # the 4 levels of N(0, 1) at beta = 1
      [-1.1503, -0.3186, 0.3186, 1.1503]
      >>> [round(v, 4) for v in t.tolist()]  # "nearest": midpoints between levels
      [-0.7345, 0.0, 0.7345]
    """

    def __init__(self, dists: Sequence[D.Dist], n: int, offsets, mults, encode: str):
        self.dists = tuple(dists)
        self.n = n
        self.encode = encode  # "companding" (reference thresholds) or "nearest" (midpoints)
        self.T = np.stack([D.thresholds(d, n) for d in self.dists]).astype(np.float32)
        self.L = np.stack([D.levels(d, n) for d in self.dists]).astype(np.float32)
        grids = [beta_grid(d.family) for d in self.dists]
        width = max(len(g) for g in grids)
        self.betas = np.full((len(self.dists), width), np.nan, np.float32)
        for i, g in enumerate(grids):
            self.betas[i, : len(g)] = g
        self.offsets = offsets  # (D,) arrays (may be traced)
        self.mults = mults

    @classmethod
    def from_tables(cls, n: int, encode: str, T, L, betas, offsets, mults) -> "Candidates":
        """Candidates from their tables (arrays, possibly traced: several candidate sets of the
        same shape can then be searched under one ``jax.vmap``); rows of ``betas`` that are
        all NaN are padding (their error is inf)."""
        self = cls.__new__(cls)
        self.dists, self.n, self.encode = (), n, encode
        self.T, self.L, self.betas, self.offsets, self.mults = T, L, betas, offsets, mults
        return self

    def codebooks(self, i_or_all, betas):
        """Thresholds and levels for dist rows ``i`` (array of ints) at ``betas`` (same shape)."""
        off = jnp.asarray(self.offsets)[i_or_all][..., None]
        mul = jnp.asarray(self.mults)[i_or_all][..., None]
        b = betas[..., None]
        lv = off + mul * b * jnp.asarray(self.L)[i_or_all]
        if self.encode == "companding":
            t = off + mul * b * jnp.asarray(self.T)[i_or_all]
        else:
            t = 0.5 * (lv[..., 1:] + lv[..., :-1])
        return t, lv


def prefix_sums(zs: jax.Array, objective: str, w=None):
    """The prefix sums :func:`score` needs (build once, score many candidate sets).

    Examples:
      >>> import jax.numpy as jnp
      >>> p1, p2, pw = prefix_sums(jnp.arange(4.0), "mae")
      >>> p2 is None and pw is None  # "mse" also sums the squares, weights their own sums
      True
    """
    wz = zs if w is None else w * zs
    p1 = nx.PrefixSums.build(wz)
    p2 = nx.PrefixSums.build(wz * zs) if objective == "mse" else None
    pw = None if w is None else nx.PrefixSums.build(w)
    return p1, p2, pw


def score(zs, cands: Candidates, objective: str, rows, betas, w=None,
          sums=None) -> jax.Array:
    """Error of candidates (``rows``, ``betas`` broadcast together) on sorted ``zs`` (weighted by
    ``w`` when given; ``sums`` from :func:`prefix_sums` to reuse), or on a
    :class:`distq.core._numerics.Density` passed as ``zs`` (its expected error).

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> from distq.core.distributions import Dist
      >>> zs = jnp.array([-1.0, -0.5, 0.5, 1.0])
      >>> c = Candidates([Dist("gaussian", 0)], 2, np.zeros(1), np.ones(1), encode="nearest")
      >>> [round(v, 4) for v in c.codebooks(jnp.array(0), jnp.array(1.0))[1].tolist()]
      [-0.6745, 0.6745]
      >>> betas = jnp.array([1.0, 0.75 / 0.6745])  # levels +-0.6745 and +-0.75
      >>> [round(v, 4) for v in score(zs, c, "mse", jnp.zeros(2, int), betas).tolist()]
      [0.2728, 0.25]
    """
    t, lv = cands.codebooks(rows, betas)
    flat_t = t.reshape(-1, t.shape[-1])
    flat_l = lv.reshape(-1, lv.shape[-1])
    if isinstance(zs, nx.Density):
        err = jax.vmap(lambda a, b: nx.density_errors(zs, a, b, objective))(flat_t, flat_l)
    else:
        p1, p2, pw = prefix_sums(zs, objective, w) if sums is None else sums
        err = jax.vmap(lambda a, b: nx.range_errors(zs, p1, p2, a, b, objective, pw))(
            flat_t, flat_l)
    err = err.reshape(betas.shape)
    return jnp.where(jnp.isnan(betas), jnp.inf, err)


def grid_search(zs: jax.Array, cands: Candidates, objective: str, w=None, sums=None):
    """Scores every dist x grid-beta; returns ``(errors (D, B), best_row, best_col)``.

    Ties resolve to the earliest dist and the smallest beta, as the reference's strict ``<``
    over its ordered loops does (see the module's example).
    """
    nd, nb = cands.betas.shape
    rows = jnp.broadcast_to(jnp.arange(nd)[:, None], (nd, nb))
    err = score(zs, cands, objective, rows, jnp.asarray(cands.betas), w, sums)
    flat = jnp.argmin(err.reshape(-1))  # argmin returns the first minimum
    return err, flat // nb, flat % nb


def zoom_search(zs, cands: Candidates, objective: str, row, col, rounds: int = 2, points: int = 17,
                w=None, sums=None, best_e=None):
    """Continuous refinement of ``beta`` for dist ``row`` around grid column ``col``.

    Each round evaluates ``points`` values evenly spaced in ``log beta`` between the neighbours
    of the current best and keeps the best (never worse than the grid's winner, whose error
    ``best_e`` may be passed to save its evaluation; see the module's example). The rounds run
    in one ``lax.fori_loop`` (one scoring computation to compile).
    """
    if sums is None and not isinstance(zs, nx.Density):
        sums = prefix_sums(zs, objective, w)
    grid = jnp.asarray(cands.betas)[row]
    valid = ~jnp.isnan(grid)
    last = jnp.sum(valid) - 1
    lo = jnp.where(col > 0, grid[jnp.maximum(col - 1, 0)], grid[col] / 1.5)
    hi = jnp.where(col < last, grid[jnp.minimum(col + 1, last)], grid[col] * 1.5)
    best_b = grid[col]
    if best_e is None:
        best_e = score(zs, cands, objective, row[None], best_b[None], w, sums)[0]

    def one_round(_, state):
        lo, hi, best_b, best_e = state
        bs = jnp.exp(jnp.linspace(jnp.log(lo), jnp.log(hi), points))
        e = score(zs, cands, objective, jnp.full((points,), row), bs, w, sums)
        j = jnp.argmin(e)
        better = e[j] < best_e
        best_b = jnp.where(better, bs[j], best_b)
        best_e = jnp.where(better, e[j], best_e)
        step = (jnp.log(hi) - jnp.log(lo)) / (points - 1)
        return jnp.exp(jnp.log(best_b) - step), jnp.exp(jnp.log(best_b) + step), best_b, best_e

    _, _, best_b, best_e = jax.lax.fori_loop(0, rounds, one_round, (lo, hi, best_b, best_e))
    return best_b, best_e


def grid_zoom_search(zs, cands: Candidates, objective: str, rounds: int = 2, points: int = 17,
                     w=None, sums=None):
    """:func:`grid_search` then :func:`zoom_search` (same result) as ``1 + rounds`` passes of
    one ``lax.fori_loop``: every pass scores a batch of the grid's size (the zoom's ``points``
    candidates padded with NaN), so one scoring computation is compiled instead of two.

    Returns ``(row, beta, error)``.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from distq.core import distributions as D
      >>> zs = jnp.sort(jax.random.normal(jax.random.key(0), (4096,)))
      >>> c = Candidates([D.Dist("gaussian", 0), D.Dist("gaussian", 2)], 8, np.zeros(2),
      ...                np.ones(2), "nearest")
      >>> row, beta, err = jax.jit(lambda z: grid_zoom_search(z, c, "mse"))(zs)
      >>> _, r2, col = grid_search(zs, c, "mse")
      >>> b2, e2 = zoom_search(zs, c, "mse", r2, col)
      >>> int(row) == int(r2), bool(jnp.isclose(beta, b2)), bool(jnp.isclose(err, e2))
      (True, True, True)
    """
    nd, nb = cands.betas.shape
    size = nd * nb
    if points > size or rounds < 1:
        err, row, col = grid_search(zs, cands, objective, w, sums)
        b, e = zoom_search(zs, cands, objective, row, col, rounds, points, w, sums,
                           best_e=err[row, col])
        return row, b, e
    if sums is None and not isinstance(zs, nx.Density):
        sums = prefix_sums(zs, objective, w)
    grid = jnp.asarray(cands.betas)
    flat_grid = grid.reshape(-1)
    rows0 = jnp.broadcast_to(jnp.arange(nd)[:, None], (nd, nb)).reshape(-1)
    pad = jnp.full((size - points,), jnp.nan, jnp.float32)

    def body(i, st):
        row, lo, hi, best_b, best_e = st
        zoom = jnp.concatenate([jnp.exp(jnp.linspace(jnp.log(lo), jnp.log(hi), points)), pad])
        first = i == 0
        bs = jnp.where(first, flat_grid, zoom)
        e = score(zs, cands, objective, jnp.where(first, rows0, row), bs, w, sums)
        j = jnp.argmin(e)  # (the first minimum: the reference's order on the grid)
        # the grid's winner, and the interval between its neighbours
        g_row, g_col = j // nb, j % nb
        g = grid[g_row]
        last = jnp.sum(~jnp.isnan(g)) - 1
        g_lo = jnp.where(g_col > 0, g[jnp.maximum(g_col - 1, 0)], g[g_col] / 1.5)
        g_hi = jnp.where(g_col < last, g[jnp.minimum(g_col + 1, last)], g[g_col] * 1.5)
        # a zoom round: keep a strictly better point, narrow around the best
        better = e[j] < best_e
        z_b = jnp.where(better, bs[j], best_b)
        z_e = jnp.where(better, e[j], best_e)
        step = (jnp.log(hi) - jnp.log(lo)) / (points - 1)
        z_lo, z_hi = jnp.exp(jnp.log(z_b) - step), jnp.exp(jnp.log(z_b) + step)
        return (jnp.where(first, g_row, row), jnp.where(first, g_lo, z_lo),
                jnp.where(first, g_hi, z_hi), jnp.where(first, g[g_col], z_b),
                jnp.where(first, e[j], z_e))

    one = jnp.float32(1.0)
    row, _, _, b, e = jax.lax.fori_loop(
        0, 1 + rounds, body, (jnp.int32(0), one, one, one, jnp.float32(jnp.inf)))
    return row, b, e
