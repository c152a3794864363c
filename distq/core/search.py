"""Searches over the range factor ``beta`` and over prior families, vectorised over candidates.

Every candidate codebook is scored on the same *sorted* data with prefix sums
(:func:`distq._numerics.range_errors`), so a candidate costs ``O(n log N)`` instead of a pass over
the data, and the whole search (grid over families x betas, then a zoom on ``log beta`` around the
winner) is one jitted computation with no host round trip per candidate.
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
    return BETA_GRID_CAUCHY if family == "cauchy" else BETA_GRID


class Candidates:
    """Static description of a set of (dist, beta-grid) candidates in common units.

    For candidate ``i`` with standard tables ``T_i`` (thresholds) and ``L_i`` (levels), the
    codebook in the sorted data's units is ``offset_i + mult_i * beta * L_i``.
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
    """The prefix sums :func:`score` needs (build once, score many candidate sets)."""
    wz = zs if w is None else w * zs
    p1 = nx.PrefixSums.build(wz)
    p2 = nx.PrefixSums.build(wz * zs) if objective == "mse" else None
    pw = None if w is None else nx.PrefixSums.build(w)
    return p1, p2, pw


def score(zs: jax.Array, cands: Candidates, objective: str, rows, betas, w=None,
          sums=None) -> jax.Array:
    """Error of candidates (``rows``, ``betas`` broadcast together) on sorted ``zs`` (weighted by
    ``w`` when given; ``sums`` from :func:`prefix_sums` to reuse)."""
    p1, p2, pw = prefix_sums(zs, objective, w) if sums is None else sums
    t, lv = cands.codebooks(rows, betas)
    flat_t = t.reshape(-1, t.shape[-1])
    flat_l = lv.reshape(-1, lv.shape[-1])
    err = jax.vmap(lambda a, b: nx.range_errors(zs, p1, p2, a, b, objective, pw))(flat_t, flat_l)
    err = err.reshape(betas.shape)
    return jnp.where(jnp.isnan(betas), jnp.inf, err)


def grid_search(zs: jax.Array, cands: Candidates, objective: str, w=None, sums=None):
    """Scores every dist x grid-beta; returns ``(errors (D, B), best_row, best_col)``.

    Ties resolve to the earliest dist and the smallest beta, as the reference's strict ``<``
    over its ordered loops does.
    """
    nd, nb = cands.betas.shape
    rows = jnp.broadcast_to(jnp.arange(nd)[:, None], (nd, nb))
    err = score(zs, cands, objective, rows, jnp.asarray(cands.betas), w, sums)
    flat = jnp.argmin(err.reshape(-1))  # argmin returns the first minimum
    return err, flat // nb, flat % nb


def zoom_search(zs, cands: Candidates, objective: str, row, col, rounds: int = 2, points: int = 17,
                w=None, sums=None):
    """Continuous refinement of ``beta`` for dist ``row`` around grid column ``col``.

    Each round evaluates ``points`` values evenly spaced in ``log beta`` between the neighbours
    of the current best and keeps the best (never worse than the grid's winner).
    """
    sums = prefix_sums(zs, objective, w) if sums is None else sums
    grid = jnp.asarray(cands.betas)[row]
    valid = ~jnp.isnan(grid)
    last = jnp.sum(valid) - 1
    lo = jnp.where(col > 0, grid[jnp.maximum(col - 1, 0)], grid[col] / 1.5)
    hi = jnp.where(col < last, grid[jnp.minimum(col + 1, last)], grid[col] * 1.5)
    best_b = grid[col]
    best_e = score(zs, cands, objective, row[None], best_b[None], w, sums)[0]
    for _ in range(rounds):
        bs = jnp.exp(jnp.linspace(jnp.log(lo), jnp.log(hi), points))
        e = score(zs, cands, objective, jnp.full((points,), row), bs, w, sums)
        j = jnp.argmin(e)
        better = e[j] < best_e
        best_b = jnp.where(better, bs[j], best_b)
        best_e = jnp.where(better, e[j], best_e)
        step = (jnp.log(hi) - jnp.log(lo)) / (points - 1)
        lo, hi = jnp.exp(jnp.log(best_b) - step), jnp.exp(jnp.log(best_b) + step)
    return best_b, best_e

