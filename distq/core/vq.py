"""Trellis-coded vector quantisation: the :class:`distq.VQ` quantiser and its leaf,
:class:`VQArray`.

A fixed-rate scalar quantiser of a Gaussian source stays 2.7 / 3.5 / 3.9 dB above the
distortion-rate bound ``D(R) = 2**(-2R)`` at 2 / 3 / 4 bits, whatever its levels; coding many
values jointly closes most of that gap. distq codes blocks of values as paths through a
*bitshift trellis* (QTIP; Mao and Gray's "stationary" trellis codes):

* the code stream of a block is ``bits`` bits per value; the **state** after value ``t`` is the
  last ``L`` bits of the stream (symbols ``t - L/bits + 1 .. t``, the newest in the high bits),
  so a state has ``2**bits`` successors, each shifting one new symbol in;
* the reconstruction of value ``t`` is ``table[state_t]``, a fixed pseudo-random Gaussian number
  per state (:func:`code_table`: the ``2**L`` Gaussian quantiles, permuted by an integer hash);
  nothing about the code is stored;
* the trellis is **tail-biting**: the stream is read cyclically within its block (the first
  states take their older bits from the block's end), so a block of ``n`` values costs exactly
  ``n * bits`` bits. The encoder runs Viterbi twice: first unconstrained over the block's wrap
  point (its last and first values, :func:`distq.core.specs_vq.tail_window` each) to choose the
  bits that straddle it, then over the block with its first and last states held to them.

Viterbi's search (Viterbi 1967) keeps, per state, the least squared error of any path ending
there; the ``2**bits`` predecessors of a state share all but their oldest symbol, so one step is
a minimum over ``2**bits`` slabs of ``2**(L - bits)`` costs plus one squared error per state:
about ``2**L`` operations per value whatever ``bits`` is. Blocks are vectorised in the lanes of
the cost array (a ``(2**L, lanes)`` array per step) and processed ``lanes`` at a time, so memory
stays bounded (the back-pointers are one byte per group of states and value). Decoding needs no
search: a value is a window of ``L`` bits of the stream and one table lookup, so any rows can be
decoded alone (:meth:`VQArray.take`).

For model weights the input axis is first rotated by random signs and a Hadamard-type transform
(:mod:`distq.core.hadamard`; only its seed is stored) so that the entries look Gaussian, then
scaled per output channel; :func:`quantize_ldlq` adds error-compensating rounding on calibration
data (LDLQ: GPTQ's feedback through the trellis).

References:
  A. Tseng, Q. Sun, D. Hou, C. De Sa, "QTIP: Quantization with trellises and incoherence
  processing", NeurIPS 2024 (the bitshift trellis, computed Gaussian codes, tail-biting, Sec. 3).
  M. W. Marcellin, T. R. Fischer, "Trellis coded quantization of memoryless and Gauss-Markov
  sources", IEEE Trans. Communications 38(1), 1990.
  A. J. Viterbi, "Error bounds for convolutional codes and an asymptotically optimum decoding
  algorithm", IEEE Trans. Information Theory 13(2), 1967.
  J. Chee, Y. Cai, V. Kuleshov, C. De Sa, "QuIP: 2-bit quantization of large language models
  with guarantees", NeurIPS 2023 (LDLQ, Sec. 3).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks
from . import _numerics as nx
from . import bitpack
from . import hadamard
from . import spec as _spec
from .leaf import LeafBase, leaf_from_state
from .specs_vq import VQ, boost_cols, min_block, rotates, symbols_per_state, tail_window

# ---------------------------------------------------------------------------------- the code
# a bijective integer hash of L-bit states: multiplications by odd constants and xor-shifts
# (each invertible modulo 2**L), so the table holds every Gaussian quantile exactly once
_HASH_STEPS = ((0x9E3779B1, 2), (0x85EBCA77, 3), (0xC2B2AE3D, 2))


@functools.lru_cache(maxsize=None)
def _table(state_bits: int) -> np.ndarray:
    from scipy.special import ndtri  # noqa: PLC0415 (host-side, once per L)

    n, mask = 1 << state_bits, np.uint64((1 << state_bits) - 1)
    s = np.arange(n, dtype=np.uint64)
    for mul, div in _HASH_STEPS:
        s = (s * np.uint64(mul)) & mask
        s ^= s >> np.uint64(max(1, (state_bits + div - 1) // div))
    table = ndtri((s.astype(np.float64) + 0.5) / n).astype(np.float32)
    table.flags.writeable = False
    return table


def code_table(state_bits: int) -> np.ndarray:
    """The reconstruction of every trellis state: ``2**state_bits`` Gaussian numbers.

    Entry ``s`` is the standard normal quantile at ``(h(s) + 1/2) / 2**L``, where ``h`` is a
    fixed bijective integer hash of ``L`` bits: the table holds each of the ``2**L`` quantiles
    once, in a pseudo-random order, so neighbouring states (which share most of their bits)
    reconstruct to unrelated values. It is computed, never stored (float64, then float32).

    Examples:
      >>> from distq.core.vq import code_table
      >>> t = code_table(12)
      >>> t.shape, t.dtype, abs(round(float(t.mean()), 6)), round(float(t.var()), 3)
      ((4096,), dtype('float32'), 0.0, 1.0)
      >>> len(set(t.tolist()))  # every quantile once
      4096
    """
    _checks.check_int(state_bits, "state_bits", 2, 16)
    return _table(int(state_bits))


# ----------------------------------------------------------------------------------- Viterbi
def _viterbi(x: jax.Array, table: jax.Array, z: jax.Array, L: int, k: int) -> jax.Array:
    """Least-squared-error paths of sequences ``x`` (``(T, lanes)``, one per lane).

    A state ``s`` (``L`` bits) moves to ``(s >> k) | (c << (L - k))`` on symbol ``c`` and
    reconstructs to ``table[s]``. ``z`` (``(lanes,)`` int32): the required top ``L - k`` bits of
    the state before the first value and after the last (tail-biting), or -1 for no constraint.
    Returns the symbols, ``(T, lanes)`` int32.
    """
    T, lanes = x.shape
    S, G = 1 << L, 1 << (L - k)
    top = jnp.arange(S, dtype=jnp.int32)[:, None] >> k
    ok = (z[None, :] < 0) | (top == z[None, :])
    cost0 = jnp.where(ok, jnp.float32(0.0), jnp.float32(jnp.inf))
    tab = table.reshape(1 << k, G, 1)  # [c, g]: the state (c << (L - k)) | g

    def step(cost, xt):
        c3 = cost.reshape(G, 1 << k, lanes)  # predecessors of group g: (g << k) | j
        best, arg = c3[:, 0], jnp.zeros((G, lanes), jnp.uint8)
        for j in range(1, 1 << k):
            better = c3[:, j] < best
            best = jnp.where(better, c3[:, j], best)
            arg = jnp.where(better, jnp.uint8(j), arg)
        new = best[None] + (xt[None, None, :] - tab) ** 2
        return new.reshape(S, lanes), arg

    cost, back = jax.lax.scan(step, cost0, x)
    last = jnp.argmin(jnp.where(ok, cost, jnp.float32(jnp.inf)), axis=0).astype(jnp.int32)

    def trace(s, arg):
        g = s & (G - 1)
        j = jnp.take_along_axis(arg, g[None, :], axis=0)[0].astype(jnp.int32)
        return (g << k) | j, s >> (L - k)

    _, symbols = jax.lax.scan(trace, last, back, reverse=True)
    return symbols


def _lanes(L: int, n: int) -> int:
    """Blocks searched together: the cost array (``2**L`` float32 per lane) near 512 KiB, and
    at least 16 lanes (at ``L = 14``, 16 lanes run 1.9x faster per value than 8 on a 2-core
    CPU: the per-step overhead of the scan outweighs the cache)."""
    return max(1, min(n, max(16, (1 << 17) >> L)))


def _encode_blocks(x: jax.Array, table: jax.Array, L: int, k: int) -> jax.Array:
    """Tail-biting codes of ``n`` blocks ``x`` (``(n, T)``): symbols ``(n, T)`` int32."""
    n, T = x.shape
    m = symbols_per_state(k, L)
    w = min(tail_window(k, L), T)
    lanes = _lanes(L, n)
    pad = -n % lanes
    xs = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, lanes, T).transpose(0, 2, 1)
    free = jnp.full((lanes,), -1, jnp.int32)

    def chunk(xc):  # (T, lanes)
        around = jnp.concatenate([xc[T - w:], xc[:w]], axis=0)  # the wrap point in the middle
        sym = _viterbi(around, table, free, L, k)
        # the top L - k bits of the state after the block's last value
        z = _state(lambda j: sym[w - 1 - j], L, k) >> k
        return _viterbi(xc, table, z, L, k)

    out = jax.lax.map(chunk, xs)  # (chunks, T, lanes)
    return out.transpose(0, 2, 1).reshape(-1, T)[:n]


# ---------------------------------------------------------------------------------- geometry
class Geometry(NamedTuple):
    """Where the values of an array sit in its trellis blocks (all static).

    The array is viewed as ``(n_in, cols)`` (its input axis first, the other axes flattened;
    ``(1, size)`` for a plain array), the **arrangement** the rotation and scales act on. The
    codes follow that matrix with its columns permuted: the columns at ``bits`` first, then the
    last ``hc`` at ``bits + 1`` (:attr:`distq.VQ.boost`; which ones is the stored mask). Each
    row of a stream (the ``width`` columns of one bit width) is cut into ``nb`` blocks, the
    first ``r`` of ``t + 1`` values and the others of ``t`` (rows shorter than one block are
    joined: then the whole array is one row, ``rows == 1``, and nothing is boosted).
    """

    n_in: int
    cols: int
    rows: int
    width: int
    nb: int
    t: int
    r: int
    hc: int = 0

    def parts(self) -> list[tuple[int, int, int]]:
        """``(start column, blocks, block length)`` of the long and the short blocks of a row
        of one stream (``hc == 0``)."""
        out = []
        if self.r:
            out.append((0, self.r, self.t + 1))
        if self.nb - self.r:
            out.append((self.r * (self.t + 1), self.nb - self.r, self.t))
        return out

    def streams(self, bits: int) -> list[tuple[int, "Geometry", int, int]]:
        """``(first column, geometry of its columns, bits, first word)`` of each code stream:
        the columns at ``bits``, then the boosted ones at ``bits + 1``; each stream is its
        rows' codes in row-major order, packed, one after the other."""
        if not self.hc:
            return [(0, self, bits, 0)]
        out, word, start = [], 0, 0
        for n, b in ((self.width - self.hc, bits), (self.hc, bits + 1)):
            if n:
                out.append((start, _split(self.rows, n, self.t), b, word))
                word += bitpack.packed_nwords(self.rows * n, b)
                start += n
        return out

    def nwords(self, bits: int) -> int:
        """uint32 words of all the codes (and of the boost mask)."""
        return sum(bitpack.packed_nwords(g.rows * g.width, b) for _, g, b, _ in
                   self.streams(bits)) + (bitpack.packed_nwords(self.cols, 1) if self.hc else 0)


def _split(rows: int, width: int, block: int) -> Geometry:
    """One stream's geometry: ``rows`` rows of ``width`` values in near-equal blocks of about
    ``block`` values and no fewer (a block of the whole arrangement, so long enough for the
    trellis)."""
    nb = max(1, width // block)
    return Geometry(rows, width, rows, width, nb, width // nb, width % nb)


def geometry(shape: tuple[int, ...], spec: VQ) -> Geometry:
    """The :class:`Geometry` of an array of ``shape`` under a resolved spec.

    Examples:
      >>> import distq
      >>> from distq.core.vq import geometry
      >>> geometry((384, 1536), distq.VQ(bits=2, input_axis=1, boost=0.0))  # rows: the inputs
      Geometry(n_in=1536, cols=384, rows=1536, width=384, nb=2, t=192, r=0, hc=0)
      >>> geometry((1000,), distq.VQ(bits=2, input_axis=None))
      Geometry(n_in=1, cols=1000, rows=1, width=1000, nb=4, t=250, r=0, hc=0)
    """
    size = math.prod(shape)
    axis = spec.input_axis
    n_in = 1 if axis is None else shape[axis]
    cols = size // n_in
    tmin = min_block(spec.bits, spec.L)
    rows, width = (n_in, cols) if cols >= tmin else (1, size)
    nb = max(1, min(int(width / spec.block + 0.5), width // tmin))
    return Geometry(n_in, cols, rows, width, nb, width // nb, width % nb,
                    boost_cols(spec, shape))


def _arrange(x: jax.Array, axis: int | None) -> jax.Array:
    """``x`` as ``(n_in, cols)``: the input axis first, the others flattened."""
    if axis is None:
        return x.reshape(1, -1)
    return jnp.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def _unarrange(z: jax.Array, shape: tuple[int, ...], axis: int | None) -> jax.Array:
    if axis is None:
        return z.reshape(shape)
    moved = (shape[axis],) + tuple(s for i, s in enumerate(shape) if i != axis)
    return jnp.moveaxis(z.reshape(moved), 0, axis)


def _by_stream(fn, arrays: jax.Array, geo: Geometry, k: int) -> jax.Array:
    """``fn(columns of arrays, geometry, bits)`` per code stream, the results side by side."""
    out = [fn(arrays[:, first:first + g.width], g, b) for first, g, b, _ in geo.streams(k)]
    return out[0] if len(out) == 1 else jnp.concatenate(out, axis=1)


def encode(u: jax.Array, geo: Geometry, L: int, k: int) -> jax.Array:
    """Trellis codes (``(rows, width)`` int32 symbols) of standardised values ``u`` laid out as
    ``geo``'s coded rows (the boosted columns last)."""
    table = jnp.asarray(code_table(L))

    def one(u, g, bits):
        out = []
        for start, nblk, ln in g.parts():
            seg = u[:, start:start + nblk * ln].reshape(-1, ln)
            out.append(_encode_blocks(seg, table, L, bits).reshape(g.rows, nblk * ln))
        return out[0] if len(out) == 1 else jnp.concatenate(out, axis=1)

    return _by_stream(one, u, geo, k)


def _state(symbol, L: int, k: int) -> jax.Array:
    """The state whose newest symbol is ``symbol(0)``, older ones ``symbol(1), ...``: the last
    ``L`` bits of the stream, the newest symbol in the high bits."""
    m = symbols_per_state(k, L)
    s = symbol(0) << ((m - 1) * k)
    for j in range(1, m):
        s = s | (symbol(j) << ((m - 1 - j) * k))
    return s >> (m * k - L)


def states(symbols: jax.Array, geo: Geometry, L: int, k: int) -> jax.Array:
    """The trellis state of every value from the symbols (``(rows, width)``): the last ``L`` bits
    of the stream up to the value's symbol, read cyclically within its block."""

    def one(c, g, bits):
        out = []
        for start, nblk, ln in g.parts():
            blocks = c[:, start:start + nblk * ln].reshape(g.rows, nblk, ln)
            s = _state(lambda j: jnp.roll(blocks, j, axis=-1), L, bits)  # noqa: B023
            out.append(s.reshape(g.rows, nblk * ln))
        return out[0] if len(out) == 1 else jnp.concatenate(out, axis=1)

    return _by_stream(one, symbols, geo, k)


def pack_symbols(symbols: jax.Array, geo: Geometry, k: int) -> jax.Array:
    """The symbols (``(rows, width)``) bit-packed: each stream at its width, one after another
    (the boost mask is appended by the caller)."""
    parts = [bitpack.pack(symbols[:, first:first + g.width].reshape(-1).astype(jnp.uint32), b)
             for first, g, b, _ in geo.streams(k)]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def unpack_symbols(words: jax.Array, geo: Geometry, k: int) -> jax.Array:
    """Inverse of :func:`pack_symbols`: ``(rows, width)`` int32."""
    out = []
    for _, g, b, w0 in geo.streams(k):
        n = g.rows * g.width
        c = bitpack.unpack(words[w0:w0 + bitpack.packed_nwords(n, b)], b, n)
        out.append(c.astype(jnp.int32).reshape(g.rows, g.width))
    return out[0] if len(out) == 1 else jnp.concatenate(out, axis=1)


def states_at(words: jax.Array, pos: jax.Array, geo: Geometry, L: int, k: int) -> jax.Array:
    """The states at flat positions ``pos`` (int32, row-major in the coded rows, the boosted
    columns last), read from the packed code stream alone: ``ceil(L / k)`` symbols each,
    wrapping within the value's block."""
    if not geo.hc:
        return _states_at(words, pos, geo, L, k)
    row, col = pos // geo.width, pos % geo.width
    out = None
    for first, g, b, w0 in geo.streams(k):
        inside = (col >= first) & (col < first + g.width)
        n = bitpack.packed_nwords(g.rows * g.width, b)
        p = jnp.where(inside, row * g.width + col - first, 0)
        s = _states_at(words[w0:w0 + n], p, g, L, b)
        out = s if out is None else jnp.where(inside, s, out)
    return out


def _states_at(words: jax.Array, pos: jax.Array, geo: Geometry, L: int, k: int) -> jax.Array:
    row, i = pos // geo.width, pos % geo.width
    span = geo.r * (geo.t + 1)
    long_ = i < span
    start = jnp.where(long_, (i // (geo.t + 1)) * (geo.t + 1), span + ((i - span) // geo.t)
                      * geo.t)
    length = jnp.where(long_, geo.t + 1, geo.t)
    u, base = i - start, row * geo.width + start
    return _state(lambda j: bitpack.take(words, k, base + jnp.remainder(u - j, length)), L, k)


# --------------------------------------------------------------------------------- quantiser
def _unit_exponent(z: jax.Array) -> jax.Array:
    """The power of two that brings the largest magnitude of ``z`` into [0.5, 1) (0 for 0)."""
    return jnp.frexp(jnp.max(jnp.abs(z)))[1].astype(jnp.int32)


def _channel_sums(a: jax.Array, per_channel: bool) -> jax.Array:
    return jnp.sum(a, axis=0) if per_channel else jnp.sum(a).reshape(1)


def _seed(key: jax.Array | None) -> jax.Array:
    return jax.random.bits(jax.random.key(0) if key is None else key, (), jnp.uint32)


class _Prepared(NamedTuple):
    """An array made ready for coding: ``x`` arranged ``= 2**e * in_scale[:, None] * R^T z``
    (``R`` the rotation, ``in_scale`` as stored, or 1), and the scaling groups that held
    non-finite values (``bad``)."""

    z: jax.Array
    e: jax.Array
    in_scale: jax.Array | None
    bad: jax.Array


def _prepare(x: jax.Array, spec: VQ, seed: jax.Array) -> _Prepared:
    z = _arrange(x.astype(jnp.float32), spec.input_axis)
    fin = jnp.isfinite(z)
    per_channel = spec.scales == "channel"
    bad = (~jnp.all(fin, axis=0)) if per_channel else (~jnp.all(fin)).reshape(1)
    z = jnp.where(fin, z, 0.0)
    e = _unit_exponent(z)
    z = jnp.ldexp(z, -e)
    t = None
    if spec.input_scales is not None:  # input channels divided by their size ** a (as stored)
        rms = jnp.sqrt(jnp.mean(z * z, axis=1))
        t = (rms ** jnp.float32(spec.input_scales)).astype(spec.scale_dtype)
        t32 = t.astype(jnp.float32)
        z = z / jnp.where(t32 > 0, t32, 1.0)[:, None]
    if rotates(spec):
        z = hadamard.rotate(z, seed, axis=0)
    return _Prepared(z, e, t, bad)


def _rms(z: jax.Array, per_channel: bool) -> jax.Array:
    n = z.shape[0] if per_channel else z.size
    s = jnp.sqrt(_channel_sums(z * z, per_channel) / n)
    return jnp.where(s > 0, s, 1.0)


class _Order(NamedTuple):
    """The coded column order of an arrangement: the unboosted columns first, then the boosted
    ones (``mask``), each in their original order; ``pos[j]`` is column ``j``'s coded place.
    Both are ``None`` when nothing is boosted (the order is the identity)."""

    mask: jax.Array | None = None
    pos: jax.Array | None = None

    @classmethod
    def from_mask(cls, mask: jax.Array) -> "_Order":
        m = mask.astype(jnp.int32)
        before = jnp.cumsum(m) - m  # boosted columns before each column
        idx = jnp.arange(m.shape[0], dtype=jnp.int32)
        return cls(mask, jnp.where(mask, m.shape[0] - jnp.sum(m) + before, idx - before))

    @classmethod
    def largest(cls, z: jax.Array, hc: int) -> "_Order":
        """The order that boosts the ``hc`` columns of ``z`` of largest root-mean-square (those
        a squared-error bit allocation gives the extra bit)."""
        if not hc:
            return cls()
        top = jax.lax.top_k(jnp.sum(z * z, axis=0), hc)[1]
        return cls.from_mask(jnp.zeros(z.shape[1], bool).at[top].set(True))

    def coded(self, a: jax.Array) -> jax.Array:
        """``a``'s last axis (one entry per column) in the coded order."""
        return a if self.pos is None else jnp.zeros_like(a).at[..., self.pos].set(a)

    def original(self, a: jax.Array) -> jax.Array:
        """Inverse of :meth:`coded`."""
        return a if self.pos is None else a[..., self.pos]


def _finish(x_shape, dtype, spec, geo, symbols, scale_unit, prep: _Prepared, seed,
            order: _Order) -> "VQArray":
    scale = jnp.ldexp(scale_unit, prep.e)
    scale = jnp.where(prep.bad, jnp.float32(jnp.nan), scale).astype(spec.scale_dtype)
    codes = pack_symbols(symbols, geo, spec.bits)
    if geo.hc:
        codes = jnp.concatenate([codes, bitpack.pack(order.mask.astype(jnp.uint32), 1)])
    return VQArray(
        codes=codes,
        scale=scale,
        in_scale=prep.in_scale,
        seed=seed if rotates(spec) else None,
        value_shape=tuple(x_shape), dtype=dtype, bits=spec.bits, state_bits=spec.L,
        block=spec.block, input_axis=spec.input_axis, boost_cols=geo.hc)


def _quantize_impl(x: jax.Array, spec: VQ, key: jax.Array | None) -> "VQArray":
    geo = geometry(x.shape, spec)
    seed = _seed(key)
    prep = _prepare(x, spec, seed)
    z = prep.z
    per_channel = spec.scales == "channel"
    s0 = _rms(z, per_channel)
    L, k = spec.L, spec.bits
    order = _Order.largest(z, geo.hc)
    u = order.coded(z / s0[None, :]).reshape(geo.rows, geo.width)
    symbols = encode(u, geo, L, k)
    c = order.original(jnp.asarray(code_table(L))[states(symbols, geo, L, k)].reshape(z.shape))
    # the scale that is optimal for these codes (least squares)
    s = _channel_sums(z * c, per_channel) / _channel_sums(c * c, per_channel)
    return _finish(x.shape, str(x.dtype), spec, geo, symbols, s, prep, seed, order)


_quantize_jit = jax.jit(_quantize_impl, static_argnums=1)


def _check_scales(q: "VQArray", spec: VQ) -> None:
    s = np.asarray(jax.device_get(q.scale.astype(jnp.float32)))
    if not np.all(np.isfinite(s)):
        raise ValueError(
            f"{_spec.spec_str(spec)} cannot represent this array: a scale overflows "
            f"scale_dtype={spec.scale_dtype!r} (largest {np.finfo(np.float32).max:.3g} for "
            "float32/bfloat16, 65504 for float16); use scale_dtype='float32' or scale the "
            "array down first")


def quantize(x: Any, spec: VQ, key: jax.Array | None = None, *,
             gram: tuple[int, Any] | None = None, damp: float = 0.01) -> "VQArray":
    """Codes ``x`` with ``spec`` (resolved for a plain array when it has automatic fields);
    ``key`` draws the rotation's seed. Jittable with ``spec`` static. With ``gram =
    (contracted_axis, H)`` the rounding is calibrated: :func:`quantize_ldlq` with ``damp``."""
    if gram is not None:
        return quantize_ldlq(x, spec, gram[1], gram[0], damp=damp, key=key)
    dtype = _checks.dtype_name(x)
    x = _checks.as_float_array(x)
    spec = spec.resolve(tuple(x.shape))
    why = spec.problem(tuple(x.shape))
    if why:
        raise ValueError(f"{_spec.spec_str(spec)} cannot take an array of shape "
                         f"{tuple(x.shape)}: {why}")
    q = _quantize_jit(x.astype(jnp.float32), spec, key)
    if _checks.is_concrete(q.scale):
        _check_scales(q, spec)
    return q if q.dtype == dtype else dataclasses.replace(q, dtype=dtype)


# -------------------------------------------------------------------------------------- leaf
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VQArray(LeafBase):
    """A trellis-coded array: packed codes, scales, the rotation's seed, static metadata.

    Attributes:
      codes: the ``bits``-bit symbols of every value, bit-packed into uint32 words
        (:func:`distq.bitpack.pack`) in the row-major order of the coded rows (see
        :class:`Geometry`), the boosted columns' ``bits + 1``-bit symbols after them, then the
        boost mask (one bit per output channel) when there are any.
      scale: the scale of each output channel (``(cols,)``) or of the tensor (``(1,)``); NaN
        for a channel that held non-finite values (possible only under a trace).
      in_scale: the factor of each input channel (``(n_in,)``, its root-mean-square to the
        power ``input_scales``, applied after the inverse rotation), or ``None``.
      seed: the uint32 seed of the input axis' rotation (:func:`distq.core.hadamard.rotate`),
        or ``None`` when there is none.
      value_shape, dtype: of the original array (``shape`` adds the batch axes of a VQArray
        made under ``vmap``).
      bits, state_bits, block: the trellis (bits per value, state length ``L``, target block
        length); input_axis: the rotated input axis, or ``None`` for a plain array;
        boost_cols: output channels coded with ``bits + 1`` bits.

    Examples:
      >>> import jax, distq
      >>> w = jax.random.normal(jax.random.key(0), (256, 128))
      >>> q = distq.quantize(w, distq.VQ(bits=3, input_axis=1))  # rotated inputs, row scales
      >>> q.shape, q.boost_cols, q.nbytes  # 3-bit codes, 29 outputs at 4 bits, scales, a seed
      ((256, 128), 29, 13300)
      >>> float(((q.dequantize() - w) ** 2).mean()) < 0.025  # Lloyd-Max: 0.0345
      True
      >>> rows = jax.numpy.array([3, 7])
      >>> bool(jax.numpy.allclose(q.take(rows), q.dequantize()[rows], atol=1e-5))
      True
    """

    kind: ClassVar[str] = "vqarray"
    array_fields: ClassVar[tuple[str, ...]] = ("codes", "scale", "in_scale", "seed")
    records_dtype: ClassVar[bool] = True

    codes: jax.Array
    scale: jax.Array
    in_scale: jax.Array | None
    seed: jax.Array | None
    value_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True))
    bits: int = dataclasses.field(metadata=dict(static=True))
    state_bits: int = dataclasses.field(metadata=dict(static=True))
    block: int = dataclasses.field(metadata=dict(static=True))
    input_axis: int | None = dataclasses.field(metadata=dict(static=True))
    boost_cols: int = dataclasses.field(default=0, metadata=dict(static=True))

    # ---------------------------------------------------------------- array-like
    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading axes added by ``vmap`` (``()`` for one array)."""
        return tuple(getattr(self.codes, "shape", (0,))[:-1])

    @property
    def spec(self) -> VQ:
        """The resolved spec that describes this array's layout."""
        channel = tuple(getattr(self.scale, "shape", (1,)))[len(self.batch_shape):] != (1,)
        return VQ(bits=self.bits, state_bits=self.state_bits, block=self.block,
                  input_axis=self.input_axis, rotate=self.seed is not None,
                  scales="channel" if channel else "tensor",
                  input_scales=None if self.in_scale is None else 1.0,
                  boost=0.0 if self.input_axis is None else
                  self.boost_cols * self.value_shape[self.input_axis] / math.prod(
                      self.value_shape),
                  scale_dtype=str(getattr(self.scale, "dtype", "float32")))

    @property
    def geometry(self) -> Geometry:
        return geometry(self.value_shape, self.spec)

    def _unbatched(self, fn):
        for _ in self.batch_shape:
            fn = jax.vmap(fn)
        return fn(self)

    def _scale_f32(self) -> jax.Array:
        return self.scale.astype(jnp.float32)

    def _order(self, geo: Geometry) -> _Order:
        """The coded column order, from the boost mask stored after the codes."""
        if not geo.hc:
            return _Order()
        return _Order.from_mask(self._mask(geo).astype(bool))

    def _mask(self, geo: Geometry) -> jax.Array:
        return bitpack.unpack(self.codes[-bitpack.packed_nwords(geo.cols, 1):], 1, geo.cols)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """Decodes to a dense array of the original shape and dtype (or ``dtype``)."""
        if self.batch_shape:
            return self._unbatched(lambda q: q.dequantize(dtype))
        geo, L, k = self.geometry, self.state_bits, self.bits
        st = states(unpack_symbols(self.codes, geo, k), geo, L, k)
        z = self._order(geo).original(jnp.asarray(code_table(L))[st].reshape(geo.n_in, geo.cols))
        z = z * self._scale_f32()[None, :]
        if self.seed is not None:
            z = hadamard.unrotate(z, self.seed, axis=0)
        if self.in_scale is not None:
            z = z * self.in_scale.astype(jnp.float32)[:, None]
        out = _unarrange(z, self.value_shape, self.input_axis)
        return out.astype(dtype or _output_dtype(self.dtype))

    def take(self, rows: Any, dtype: Any = None) -> jax.Array:
        """Decoded rows (indices along the first axis), reading only their codes.

        ``q.take(i)`` equals ``q.dequantize()[i]`` for an int or an integer array ``i``. Rows are
        decoded alone when the first axis is not the rotated input axis (an embedding table or a
        PyTorch-layout weight); with ``input_axis=0`` (a Flax kernel) the rotation mixes the
        rows, so the array is decoded and indexed.
        """
        r = self.checked_rows(rows)
        out_dtype = dtype or _output_dtype(self.dtype)
        axis = self.input_axis
        if axis == 0:
            return self.dequantize(jnp.float32)[r].astype(out_dtype)
        geo, L, k = self.geometry, self.state_bits, self.bits
        table = jnp.asarray(code_table(L))
        scale = self._scale_f32()
        lead = (1,) * r.ndim
        if axis is None:
            inner = math.prod(self.value_shape[1:])
            pos = r[..., None] * inner + jnp.arange(inner, dtype=jnp.int32).reshape(lead + (-1,))
            z = table[states_at(self.codes, pos, geo, L, k)] * scale[0]
            return z.reshape(r.shape + self.value_shape[1:]).astype(out_dtype)
        # the row's values: input j, then the other (non-input) axes after the first
        rest = [s for i, s in enumerate(self.value_shape) if i not in (0, axis)]
        inner = math.prod(rest)
        col = r[..., None] * inner + jnp.arange(inner, dtype=jnp.int32).reshape(lead + (-1,))
        inputs = jnp.arange(geo.n_in, dtype=jnp.int32).reshape(lead + (-1, 1))
        pos = self._order(geo).pos
        coded = col if pos is None else pos[col]
        pos = inputs * geo.cols + coded[..., None, :]  # (..., n_in, inner)
        z = table[states_at(self.codes, pos, geo, L, k)]  # (..., n_in, inner)
        z = z * (scale[col][..., None, :] if scale.shape[0] > 1 else scale[0])
        if self.seed is not None:
            z = hadamard.unrotate(z, self.seed, axis=z.ndim - 2)
        if self.in_scale is not None:
            z = z * self.in_scale.astype(jnp.float32).reshape(lead + (-1, 1))
        # (..., n_in, rest...) -> the row's own axis order (input axis at axis - 1)
        z = z.reshape(r.shape + (geo.n_in,) + tuple(rest))
        z = jnp.moveaxis(z, r.ndim, r.ndim + axis - 1)
        return z.astype(out_dtype)

    def __repr__(self) -> str:
        return (f"VQArray(shape={self.shape}, dtype={self.dtype}, bits={self.bits}, "
                f"state_bits={self.state_bits}, input_axis={self.input_axis}, "
                f"nbytes={self.nbytes})")

    # ---------------------------------------------------------------- serialisation
    def metadata(self) -> dict:
        """JSON-able static metadata (enough to rebuild the VQArray from its arrays)."""
        return {"shape": list(self.value_shape), "dtype": self.dtype, "bits": self.bits,
                "state_bits": self.state_bits, "block": self.block,
                "input_axis": self.input_axis, "boost_cols": self.boost_cols}

    @classmethod
    def from_arrays(cls, arrays: dict, metadata: dict) -> "VQArray":
        """Rebuilds a VQArray from its arrays and :meth:`metadata` (validating both)."""
        try:
            axis = metadata["input_axis"]
            opt = lambda name: None if arrays.get(name) is None else jnp.asarray(arrays[name])  # noqa: E731
            q = cls(codes=jnp.asarray(arrays["codes"]), scale=jnp.asarray(arrays["scale"]),
                    in_scale=opt("in_scale"), seed=opt("seed"),
                    value_shape=tuple(int(s) for s in metadata["shape"]),
                    dtype=str(metadata["dtype"]), bits=int(metadata["bits"]),
                    state_bits=int(metadata["state_bits"]), block=int(metadata["block"]),
                    input_axis=None if axis is None else int(axis),
                    boost_cols=int(metadata.get("boost_cols", 0)))
            if int(metadata.get("boost_rows", 0)):
                raise ValueError("boost_rows (row-boosted codes, written by an earlier distq) "
                                 "is no longer read; quantise the array again")
            jnp.dtype(q.dtype)
            q.validate()
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"corrupt VQArray metadata or arrays: {e!r}") from None
        return q

    def validate(self) -> None:
        """Checks that the arrays agree with the metadata (raises ``ValueError``)."""
        spec = self.spec  # validates bits, state_bits, block, input_axis
        shape, nb = self.value_shape, len(self.batch_shape)
        if self.codes.dtype != jnp.uint32:
            raise ValueError("VQArray.codes must be uint32 words")
        if spec.problem(shape):
            raise ValueError(f"VQArray shape {shape} does not fit its trellis: "
                             f"{spec.problem(shape)}")
        n_in = 1 if self.input_axis is None else shape[self.input_axis]
        if not 0 <= self.boost_cols <= (0 if self.input_axis is None else
                                        math.prod(shape) // n_in):
            raise ValueError(f"VQArray.boost_cols={self.boost_cols} does not fit shape {shape}")
        geo = self.geometry
        if geo.hc != self.boost_cols:
            raise ValueError(f"VQArray.boost_cols={self.boost_cols}: no trellis layout codes "
                             f"that many channels apart for shape {shape}")
        words = geo.nwords(self.bits)
        if tuple(self.codes.shape[nb:]) != (words,):
            raise ValueError(f"VQArray.codes has {self.codes.shape[nb:]} words; shape {shape} "
                             f"at {self.bits} bits needs {words}")
        if geo.hc and _checks.is_concrete(self.codes) and not nb:
            mask = np.asarray(self._mask(geo))
            if int(mask.sum()) != geo.hc:
                raise ValueError(f"VQArray boost mask marks {int(mask.sum())} channels; "
                                 f"boost_cols={geo.hc}")
        ns = tuple(self.scale.shape[nb:])
        if ns not in ((1,), (math.prod(shape) // n_in,)) or self.scale.shape[:nb] != \
                self.codes.shape[:nb]:
            raise ValueError(f"VQArray.scale has shape {ns}; expected (1,) or "
                             f"({math.prod(shape) // n_in},)")
        if self.seed is not None and (self.input_axis is None or self.seed.dtype != jnp.uint32
                                      or tuple(self.seed.shape[nb:]) != ()):
            raise ValueError("VQArray.seed must be a uint32 scalar, with an input axis")
        if self.in_scale is not None and (self.input_axis is None or tuple(
                self.in_scale.shape[nb:]) != (n_in,)):
            raise ValueError(f"VQArray.in_scale must have shape ({n_in},), with an input axis")


def _output_dtype(name: str):
    return jax.dtypes.canonicalize_dtype(jnp.dtype(name))


def from_state_dict(state: dict) -> VQArray:
    """Rebuilds a VQArray from ``flax.serialization.to_state_dict(q)`` without a target."""
    return leaf_from_state(VQArray, state)


# ------------------------------------------------------------------------------------- LDLQ
def _ldlq_impl(x, h, spec: VQ, damp: float, key, block: int, group: int):
    geo = geometry(x.shape, spec)
    n, cols = geo.n_in, geo.cols
    L, k = spec.L, spec.bits
    seed = _seed(key)
    prep = _prepare(x, spec, seed)
    z = prep.z
    hr = h.astype(jnp.float32)
    if prep.in_scale is not None:  # the inputs of the scaled rows: x_j * in_scale_j
        t = prep.in_scale.astype(jnp.float32)
        hr = hr * t[:, None] * t[None, :]
    if rotates(spec):
        hr = hadamard.rotate_gram(hr, seed)
    per_channel = spec.scales == "channel"
    s0 = _rms(z, per_channel)
    u_fac = nx.hinv_upper(hr.astype(jnp.float32), damp)
    group_geo = geo._replace(n_in=group, rows=group)
    table = jnp.asarray(code_table(L))
    order = _Order.largest(z, geo.hc)  # rounding runs in the coded column order
    s0c = order.coded(s0) if per_channel else s0

    def code(u):  # a group's symbols and reconstruction
        sym = encode(u, group_geo, L, k)
        return sym, table[states(sym, group_geo, L, k)]

    nblk = -(-n // block)
    pad = nblk * block - n
    w = jnp.pad(order.coded(z), ((0, pad), (0, 0)))
    u_fac = jnp.pad(u_fac, ((0, pad), (0, pad))) + jnp.diag(
        jnp.concatenate([jnp.zeros(n), jnp.ones(pad)]))

    def block_step(w, b):
        start = b * block
        wb = jax.lax.dynamic_slice(w, (start, 0), (block, cols))
        ub = jax.lax.dynamic_slice(u_fac, (start, start), (block, block))

        def group_step(wb, j):  # inputs j .. j + group - 1, coded together
            target = jax.lax.dynamic_slice(wb, (j, 0), (group, cols))
            sym, rec = code(target / s0c[None, :])
            resid = target - rec * s0c[None, :]
            # their error seen through the factor: E = U_gg^-T (W_g - Q_g) (GPTQ's err / U_jj)
            err = jax.scipy.linalg.solve_triangular(
                jax.lax.dynamic_slice(ub, (j, j), (group, group)), resid, trans=1, lower=False)
            rows = jax.lax.dynamic_slice(ub, (j, 0), (group, block))
            later = jnp.where(jnp.arange(block)[None, :] >= j + group, rows, 0.0)
            wb = wb - jnp.matmul(later.T, err, precision=jax.lax.Precision.HIGHEST)
            return wb, (sym, err)

        _, (sym, errs) = jax.lax.scan(group_step, wb, jnp.arange(0, block, group))
        ur = jax.lax.dynamic_slice(u_fac, (start, 0), (block, u_fac.shape[1]))
        after = jnp.arange(u_fac.shape[1]) >= start + block
        w = w - jnp.matmul(jnp.where(after[None, :], ur, 0.0).T, errs.reshape(block, cols),
                           precision=jax.lax.Precision.HIGHEST)
        return w, sym.reshape(block, cols)

    _, sym = jax.lax.scan(block_step, w, jnp.arange(nblk))
    symbols = sym.reshape(nblk * block, cols)[:n]
    c = order.original(table[states(symbols, geo, L, k)])
    # the scales that are optimal for these codes under the output error tr(E H E^T)
    hc = jnp.matmul(hr.astype(jnp.float32), c, precision=jax.lax.Precision.HIGHEST)
    num, den = _channel_sums(z * hc, per_channel), _channel_sums(c * hc, per_channel)
    s = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), s0)
    return _finish(x.shape, str(x.dtype), spec, geo, symbols, s, prep, seed, order)


_ldlq_jit = jax.jit(_ldlq_impl, static_argnums=(2, 3, 5, 6))


def quantize_ldlq(x: Any, spec: VQ, h: Any, axis: int, *, damp: float = 0.01,
                  key: jax.Array | None = None, block: int = 128, group: int = 1) -> VQArray:
    """Trellis codes of matrix ``x`` that minimise the error of its product with the inputs
    summarised by the Gram matrix ``h = X^T X`` (over ``x``'s ``axis``, the contracted one).

    LDLQ (QuIP's name for GPTQ's rounding with a vector quantiser): in the rotated basis (the
    Gram matrix rotated alike, :func:`distq.core.hadamard.rotate_gram`), the inputs are visited
    in order; each input's row of weights (all outputs) is trellis-coded as a whole, and its
    error is fed forward to the inputs not yet coded through the Cholesky factor of ``H^-1``,
    so that ``X W`` changes as little as possible. The scales are then refitted for the output
    error. ``distq.quantize_tree(..., calibration=...)`` calls it through
    :meth:`distq.VQ.quantize_calibrated`.

    Args:
      x: a matrix; h: its ``(n_in, n_in)`` Gram matrix over ``axis``.
      spec: a :class:`distq.VQ` (its ``input_axis`` is taken from ``axis``).
      damp: added to ``H``'s diagonal as a fraction of its mean diagonal.
      key: draws the rotation's seed; block: inputs per block of deferred updates.
      group: inputs coded together (their trellis searches run side by side); the error
        feedback between them goes through the block form of the factor instead of one input
        at a time (faster, slightly less exact).

    Examples:
      >>> import jax, distq
      >>> from distq import calibrate
      >>> from distq.core.vq import quantize_ldlq
      >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      >>> w = jax.random.normal(k1, (64, 128))  # (outputs, inputs): inputs on axis 1
      >>> xs = jax.random.normal(k2, (512, 128)) @ jax.random.normal(k3, (128, 128))
      >>> h = xs.T @ xs
      >>> spec = distq.VQ(bits=2)
      >>> q = quantize_ldlq(w, spec, h, axis=1)
      >>> q0 = distq.quantize(w, spec.resolve(w.shape, "weight"))
      >>> q.nbytes == q0.nbytes
      True
      >>> calibrate.output_error(w, q.dequantize(), h) < calibrate.output_error(
      ...     w, q0.dequantize(), h) / 1.5
      True
    """
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"quantize_ldlq needs a matrix, got shape {tuple(x.shape)}")
    axis = _checks.check_int(axis, "axis", -2, 1) % 2
    spec = dataclasses.replace(spec, input_axis=axis).resolve(tuple(x.shape), "matrix")
    why = spec.problem(tuple(x.shape))
    if why:
        raise ValueError(f"{_spec.spec_str(spec)} cannot take an array of shape "
                         f"{tuple(x.shape)}: {why}")
    h = jnp.asarray(h, jnp.float32)
    n = x.shape[axis]
    if h.shape != (n, n):
        raise ValueError(f"h must be the ({n}, {n}) Gram matrix of x's axis {axis}, got "
                         f"{tuple(h.shape)}")
    geo = geometry(tuple(x.shape), spec)
    if geo.rows != geo.n_in:  # rows too short for a block: the trellis spans inputs
        return quantize(x, spec, key)
    dtype = _checks.dtype_name(x)
    group = _checks.check_int(group, "group", 1, 64)
    block = group * -(-min(_checks.check_int(block, "block", 1), n) // group)
    q = _ldlq_jit(x.astype(jnp.float32), h, spec, float(damp), key, block, group)
    if _checks.is_concrete(q.scale):
        _check_scales(q, spec)
    return q if q.dtype == dtype else dataclasses.replace(q, dtype=dtype)


_spec.register_leaf(VQArray)
_spec.register_quantizer(VQ, quantize)

__all__ = ["Geometry", "VQ", "VQArray", "code_table", "encode", "from_state_dict", "geometry",
           "quantize", "quantize_ldlq", "states", "states_at"]
