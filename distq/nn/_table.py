"""The matrix product through a PQ matrix: per-sub-space tables, or rebuilding the matrix.

For the ``(n, D)`` matrix ``V`` of PQ vectors (codes ``c[i, s]``, codebooks ``C_s``),
``x @ V.T`` is ``y[:, i] = sum_s x_s . C_s[c[i, s]] = sum_s T_s[:, c[i, s]]`` with the tables
``T_s = x_s C_s^T`` of shape ``(batch, K)``: the product never needs ``V``. :func:`pq_product`
takes that route or decodes ``V`` and multiplies, whichever :func:`table_is_cheaper` says.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ..core import pq as _pq
from ._common import Array

FORWARDS = ("auto", "table", "rebuild")


def check_forward(forward: str) -> str:
    """``forward`` if it is one of :data:`FORWARDS` ("auto", "table", "rebuild")."""
    if forward not in FORWARDS:
        raise ValueError(f"forward must be one of {FORWARDS}, got {forward!r}")
    return forward


def _table_matmul(x: Array, codebooks: Array, codes: Array, precision) -> Array:
    """``x @ V.T`` for the ``(n, D)`` matrix ``V`` of PQ vectors, without building ``V``.

    ``T_s = x_s C_s^T`` (one ``(batch, K)`` table per sub-space), then
    ``y[:, i] = sum_s T_s[:, c[i, s]]``.
    """
    b = x.shape[0]
    m, _, ds = codebooks.shape
    t = jnp.einsum("bsd,skd->sbk", x.reshape(b, m, ds), codebooks, precision=precision)
    if m <= 16:
        y = jnp.take(t[0], codes[:, 0], axis=1)
        for s in range(1, m):
            y = y + jnp.take(t[s], codes[:, s], axis=1)
        return y

    def step(acc, ts_cs):
        ts, cs = ts_cs
        return acc + jnp.take(ts, cs, axis=1), None

    y0 = jnp.zeros((b, codes.shape[0]), t.dtype)
    return lax.scan(step, y0, (t, codes.T))[0]


def table_is_cheaper(batch: int, d_in: int, d_out: int, m: int, bits: int, *,
                     rotation: bool = False, gather_cost: float = 32.0) -> bool:
    """Whether the table forward of a PQ matrix product is expected to be faster.

    Counts multiply-adds, with every gathered element weighted by ``gather_cost`` (gathers are
    memory-bound; 32 fits XLA:CPU measurements). Table: ``batch * d_in * K`` for the tables plus
    ``gather_cost * batch * d_out * m`` for the gather-sum; rebuild: ``gather_cost * d_out * d_in``
    to decode the matrix plus ``batch * d_in * d_out`` for the product. An OPQ rotation adds
    ``batch * d_in**2`` (rotate the input) or ``d_out * d_in**2`` (rotate the decoded rows).

    Args:
      batch: rows of the input (all leading dimensions flattened).
      d_in: input features (length of each quantised vector).
      d_out: output features (number of quantised vectors).
      m: sub-spaces; ``bits``: bits per code (``K = 2**bits``).
      rotation: whether the vectors carry an OPQ rotation.
      gather_cost: cost of one gathered element, in multiply-adds.

    Returns:
      ``True`` when the table forward is cheaper.

    Examples:
      >>> from distq import nn
      >>> nn.table_is_cheaper(batch=64, d_in=1024, d_out=1024, m=16, bits=8)
      True
      >>> nn.table_is_cheaper(batch=4096, d_in=512, d_out=512, m=16, bits=8)
      False
    """
    k = 1 << bits
    table = batch * d_in * k + gather_cost * batch * d_out * m
    rebuild = gather_cost * d_out * d_in + batch * d_in * d_out
    if rotation:
        table, rebuild = table + batch * d_in * d_in, rebuild + d_out * d_in * d_in
    return table < rebuild


def pq_product(x2: Array, codebooks: Array, codes: Array, rotation: Array | None,
               bits: int, forward: str, precision) -> Array:
    """``x2 @ V.T`` (``x2``: ``(batch, D)``; ``codes``: ``(n, m)`` int32) by tables or by
    rebuilding ``V``; ``forward="auto"`` picks by :func:`table_is_cheaper` at trace time."""
    n, m = codes.shape
    batch, d = x2.shape
    if forward == "auto":
        cheaper = table_is_cheaper(batch, d, n, m, bits, rotation=rotation is not None)
        forward = "table" if cheaper else "rebuild"
    if forward == "table":
        if rotation is not None:
            x2 = jnp.matmul(x2, rotation.astype(x2.dtype), precision=precision)
        return _table_matmul(x2, codebooks, codes, precision)
    v = _pq.decode_codes(codes, codebooks, rotation, codebooks.dtype)
    return lax.dot_general(x2, v, (((1,), (1,)), ((), ())), precision=precision)
