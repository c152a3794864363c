"""Drop-in replacement for the ``distquant`` package's ``quantize``/``dequantize``.

Same arguments, same semantics, same ``info`` keys and the same int64 bit layout, so code written
for ``distquant`` keeps working (and can dequantise what ``distquant`` packed, and vice versa).
It is built on distq's kernels: the ``beta``/``dist`` searches score every candidate on one sorted
copy of the data in a single jitted computation, and encoding finds each value's cell among the
``n - 1`` decision thresholds precomputed in data space (a branch-free binary search).

Deliberate differences from distquant 0.1.0 (its known defects):

* every code is in range: a value whose CDF rounds to 1.0 gets code ``n - 1`` (distquant gives
  ``n``, which decodes to NaN, or when packed corrupts the neighbouring code);
* the caller's arrays are never modified (distquant's ``dequantize`` shifts a packed tensor in
  place, so a second call returns garbage);
* ``zero`` works with ``k``: for the symmetric families an even ``n`` becomes ``n - 1`` levels, so
  the middle level is exactly ``zero`` (``info['n']`` says how many);
* NaN/inf, empty, and integer input are rejected with a clear error; a constant input round-trips;
* any memory layout (non-contiguous, any strides, big-endian) is accepted, and ``dequantize``
  restores the input's floating dtype (``info['dtype']``); the same values give the same codes,
  ``scale`` and ``loc`` at any memory address (the statistics are summed in an order fixed by the
  values' positions);
* ``beta`` must be finite, in [1e-6, 1e6]; ``zero`` finite (and float32-representable);
  ``dequantize`` checks ``info`` (``n`` in 2..65536, finite ``beta``/``loc``/``scale``, ...) and
  names the key at fault;
* results are NumPy arrays (``int64`` codes, packed or not) whatever the input's array type;
* ``info['scale']`` is always a Python float (distquant returns a tensor for the Gumbel family).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..core import _checks
from ..core import _numerics as nx
from ..core import bitpack
from ..core import distributions as D
from ..core import search as S

_ALIGN = 64  # XLA:CPU aliases host buffers aligned to this many bytes instead of copying them
_WORD_MAX_LEVELS = 32  # the word kernel's unrolled search serves fewer levels than this
_SELECT_MAX_LEVELS = 32  # up to this many levels a select tree beats a gather
_SPLIT_MIN = 1 << 16  # below this many values an aligned copy costs next to nothing
_STAT_ROW = 1 << 12  # values per row of the statistics' sums
_STAT_BLOCK = 1 << 18  # values per block of them (a shifted copy of one block at a time)


def _to_host_float32(data: Any) -> tuple[np.ndarray, np.dtype, tuple[int, ...]]:
    if hasattr(data, "detach") and hasattr(data, "numpy"):  # torch tensor
        data = data.detach().cpu().numpy()
    arr = np.asarray(data)
    if arr.dtype == object or arr.dtype.kind in "SU":
        raise TypeError(f"data must be an array of floats (NumPy, JAX, torch, or nested lists "
                        f"of numbers), got {type(data).__name__}")
    if not np.issubdtype(arr.dtype, np.floating) and arr.dtype != jnp.bfloat16:
        raise TypeError(f"data must have a floating-point dtype, got {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"data is empty (shape {arr.shape}); nothing to quantise")
    shape = tuple(arr.shape)
    flat = arr.reshape(-1)
    if flat.dtype != np.float32 or not flat.flags.c_contiguous:
        flat = _aligned_copy(flat)
    return flat, arr.dtype, shape


def _aligned_copy(flat: np.ndarray) -> np.ndarray:
    """A float32 copy of ``flat`` starting on an ``_ALIGN``-byte boundary."""
    buf = np.empty(flat.size * 4 + _ALIGN, np.uint8)
    off = (-buf.ctypes.data) % _ALIGN
    aligned = buf[off : off + flat.size * 4].view(np.float32)
    np.copyto(aligned, flat, casting="unsafe")
    return aligned


def _head_length(flat: np.ndarray) -> int | None:
    """Values before the first ``_ALIGN``-byte boundary of a float32 vector (``None``: the
    address is not even a multiple of 4 bytes, so no suffix is aligned)."""
    addr = flat.ctypes.data
    if addr % 4:
        return None
    return ((-addr) % _ALIGN) // 4


def _funnel_words(a, b, left: int):
    """``[low, high]`` int64-layout word rows ``a`` shifted ``left`` bits up, filled from the top
    of the next rows ``b`` (a 64-bit funnel shift done on the uint32 halves)."""
    lo0, hi0, lo1, hi1 = a[:, 0], a[:, 1], b[:, 0], b[:, 1]
    right = 64 - left
    if left >= 32:
        hi_a, lo_a = lo0 << (left - 32), jnp.zeros_like(lo0)
    else:
        hi_a, lo_a = (hi0 << left) | (lo0 >> (32 - left)), lo0 << left
    if right >= 32:
        hi_b, lo_b = jnp.zeros_like(hi1), hi1 >> (right - 32)
    else:
        hi_b, lo_b = hi1 >> right, (lo1 >> right) | (hi1 << (32 - right))
    return jnp.stack([lo_a | lo_b, hi_a | hi_b], axis=1)


def _small_words(codes, k: int, lead: int):
    """``(W, 2)`` ``[low, high]`` words of a few codes placed after ``lead`` zero codes."""
    codes = codes.astype(jnp.uint32)
    if lead:
        codes = jnp.concatenate([jnp.zeros((lead,), jnp.uint32), codes])
    return bitpack.pack_int64_halves(codes, k).reshape(-1, 2)


@functools.partial(jax.jit, static_argnames=("k",))
def _join_words(head, main_words, tail, t, lv, *, k):
    """Int64-layout words of ``[head, main, tail]`` from the main part's own words, and the
    summed absolute error of the head and tail values."""
    per64 = 64 // k
    pad = (-head.shape[0]) % per64
    def small(vals, lead):  # a few values: their words and their summed absolute error
        codes = nx.bucketize(vals, t)
        return _small_words(codes, k, lead), jnp.sum(jnp.abs(vals - lv[codes]))

    err = jnp.float32(0.0)
    pre = post = jnp.zeros((0, 2), jnp.uint32)
    if head.shape[0]:
        pre, e = small(head, pad)
        err = err + e
    if tail.shape[0]:
        post, e = small(tail, 0)
        err = err + e
    n_words = -(-(head.shape[0] + main_words.shape[0] // 2 * per64 + tail.shape[0]) // per64)
    m = main_words.reshape(-1, 2)
    if pad == 0:
        return jnp.concatenate([pre, m, post]).reshape(-1)[: 2 * n_words], err
    # the stream [pre, m, post, 0] shifted `pad` codes towards its start. The main words are
    # shifted on their own (one fused pass: a concatenation of them with the few boundary words
    # would be materialised first), and the boundary words are shifted apart and joined on
    first = jnp.concatenate([pre, m[:1]])
    last = jnp.concatenate([m[-1:], post, jnp.zeros((1, 2), jnp.uint32)])
    out = jnp.concatenate([_funnel_words(w[:-1], w[1:], k * pad) for w in (first, m, last)])
    return out.reshape(-1)[: 2 * n_words], err


def _word_path(packbits: bool, k: int, n: int) -> bool:
    """Codes go straight into int64 words by the word kernel: packed, ``k`` dividing 32, and
    few enough levels for its unrolled search (in effect k <= 4)."""
    return bool(packbits) and 32 % k == 0 and n - 1 < _WORD_MAX_LEVELS


def _family_loc_scale(family: str, mean, std, zero):
    loc, scale = D.standardise_from_moments(family, mean, std, zero)
    if family in ("exponential", "cauchy") and zero is None:
        loc = mean * 0.0
    return loc, scale


def _snap_zero(lv, zero):
    """The middle level of an odd symmetric codebook is ``zero`` up to rounding: make it exact."""
    if zero is None:
        return lv
    return jnp.where(jnp.abs(lv - zero) <= 1e-6 * (jnp.abs(lv[-1] - lv[0]) + 1e-30), zero, lv)


def _words_u32(xv, t, k):
    """``(rows, 32 // k)`` values -> one uint32 per row, first code most significant."""
    per = xv.shape[1]
    w = jnp.zeros(xv.shape[:1], jnp.uint32)
    for j in range(per):
        for b, bit in enumerate(nx.search_bits(xv[:, j], t)):
            w = w | (bit.astype(jnp.uint32) << (k * (per - j) - 1 - b))
    return w


@functools.partial(jax.jit, static_argnames=("k",))
def _encode_u32(x, t, *, k):
    """Widths dividing 32: the reference's int64 words as ``[low, high]`` uint32 pairs.

    Each half holds ``32 // k`` codes, first code most significant; the input is padded to whole
    int64 words with code 0. One pass over ``x``: consecutive runs of ``32 // k`` values become
    one uint32 each (a binary search per value), and each pair swaps into ``[low, high]`` order;
    on a little-endian host the result *is* the int64 array. Fewer than ``2**k - 1`` thresholds
    are padded with ``+inf`` (no finite value reaches them).
    """
    per, per64 = 32 // k, 64 // k
    size = x.shape[0]
    padded = -(-size // per64) * per64
    t = nx.full_tree(t, k)
    xp = jnp.pad(x, (0, padded - size), constant_values=-jnp.inf).reshape(-1, per)
    return _words_u32(xp, t, k).reshape(-1, 2)[:, ::-1].reshape(-1)


@jax.jit
def _sum(v):
    return jnp.sum(v)


def _level_select(c, lv, k: int):
    """``lv[c & (2**k - 1)]`` for uint32 ``c``: a select tree on the code's low ``k`` bits (no
    gather); codes past the last level read the last level."""
    levels = [lv[min(i, lv.shape[0] - 1)] for i in range(1 << k)]
    return nx.select(levels, [(c & (1 << b)) != 0 for b in range(k - 1, -1, -1)])


@functools.partial(jax.jit, static_argnames=("k",))
def _abs_error_u32(x, words, lv, *, k):
    """Per-word ``sum |x - lv[code]|`` of :func:`_encode_u32`'s words (levels by a select tree
    on the code bits: no gather, no second threshold search)."""
    per = 32 // k
    size = x.shape[0]
    n_words = words.shape[0]
    xp = jnp.pad(x, (0, n_words * per - size), constant_values=lv[0])
    if per > 8:  # k < 4: the values in order and the halves swapped back (the other way
        # round, XLA:CPU's kernel runs 7-9x slower for rows of 16 or 32 values)
        words = words.reshape(-1, 2)[:, ::-1].reshape(-1)
        xp = xp.reshape(n_words, per)
    else:
        xp = xp.reshape(-1, 2, per)[:, ::-1].reshape(n_words, per)  # [low, high] halves
    err = jnp.zeros((n_words,), jnp.float32)
    for j in range(per):
        err = err + jnp.abs(xp[:, j] - _level_select(words >> (k * (per - 1 - j)), lv, k))
    return err


@jax.jit
def _codes_narrow(x, t):
    """Codes as uint8 (up to 256 levels) or uint16: a quarter or half of int32's writes."""
    return nx.bucketize(x, t).astype(jnp.uint8 if t.shape[0] < 256 else jnp.uint16)


@functools.partial(jax.jit, static_argnames=("k",))
def _pack_generic(codes, *, k):
    return bitpack.pack_int64_halves(codes, k)


@jax.jit
def _abs_error_codes(x, codes, lv):
    """``sum |x - lv[codes]|`` (the barrier keeps the per-value errors out of the sum's fusion:
    XLA:CPU's reduction emitter does not vectorise such producers)."""
    n = lv.shape[0]
    if n <= _SELECT_MAX_LEVELS:
        level = _level_select(codes.astype(jnp.uint32), lv, max(1, (n - 1).bit_length()))
    else:
        level = lv[codes]
    return jnp.sum(lax.optimization_barrier(jnp.abs(x - level)))


def _encode_generic(x, t, lv, *, k, packbits):
    """Codes (packed into ``[low, high]`` int64 halves, or not) and the summed absolute error.

    Three computations: the codes are materialised once (uint8 or uint16) and read by the
    packing and by the error. In one computation XLA:CPU fused the search into its readers and
    repeated it for every read (k=8 on 10M values: 355 ms, against 50 ms apart).
    """
    codes = _codes_narrow(x, t)
    err = _abs_error_codes(x, codes, lv)
    return (_pack_generic(codes, k=k) if packbits else codes), err


def _sums(flat: np.ndarray, shift=None) -> tuple[np.float32, np.float32]:
    """``sum(x - shift)`` and ``sum((x - shift)**2)`` in float32, in an order fixed by the
    values' positions alone: rows of ``_STAT_ROW`` values (NumPy's unrolled SIMD sum and dot
    product, whose order follows the positions, aligned or not), then a pairwise sum of the
    rows' sums. XLA's reductions over the parts of a split input (its head, main part and tail
    follow the buffer's 64-byte alignment) would add in an order that follows the address, and
    the same values would give statistics 1 ulp apart at different addresses (and so different
    codebooks)."""
    size = flat.size
    whole = size // _STAT_ROW * _STAT_ROW
    p1, p2 = [], []
    spans = [(a, min(a + _STAT_BLOCK, whole)) for a in range(0, whole, _STAT_BLOCK)]
    for start, stop in spans + ([(whole, size)] if whole < size else []):
        v = flat[start:stop]
        if shift is not None:
            v = np.subtract(v, shift, dtype=np.float32)
        if stop <= whole:
            rows = v.reshape(-1, _STAT_ROW)
            p1.append(np.einsum("ij->i", rows))
            p2.append(np.einsum("ij,ij->i", rows, rows))
        else:  # the last, partial row
            p1.append(np.einsum("i->", v).reshape(1))
            p2.append(np.einsum("i,i->", v, v).reshape(1))
    return np.add.reduce(np.concatenate(p1)), np.add.reduce(np.concatenate(p2))


def _moments(flat: np.ndarray) -> tuple[np.float32, np.float32]:
    """Mean and standard deviation (``ddof=1``) of a float32 vector in float32 (see
    :func:`_sums`), for data of any finite float32 magnitude: when the sum of squares leaves
    float32's comfortable range (a spread below ~1e-19, whose squares lose their digits or
    vanish, or above ~1e18, whose squares overflow), the statistics are taken again on the
    values scaled by a power of two (exactly) and scaled back. A spread below float32's
    normal range (1.2e-38), which XLA would flush to zero, is refused."""
    mean, var = _plain_moments(flat)
    if np.float32(2.0 ** -60) <= var * np.float32(flat.size) <= np.float32(2.0 ** 100):
        return mean, np.sqrt(var, dtype=np.float32)
    amax = np.max(np.abs(flat))
    if not np.isfinite(amax) or amax == 0:
        return mean, np.sqrt(var, dtype=np.float32)
    e = int(np.frexp(amax)[1])
    m1, v1 = _plain_moments(np.ldexp(flat, -e).astype(np.float32))
    mean = np.float32(np.ldexp(m1, e))
    std = np.float32(np.ldexp(np.sqrt(v1, dtype=np.float32), e))
    if std < _checks.F32_TINY and np.max(flat) != np.min(flat):
        raise ValueError(
            f"data's spread (standard deviation {float(np.ldexp(np.sqrt(float(v1)), e)):.3g}) "
            f"is below float32's normal range ({_checks.F32_TINY:.3g}; XLA flushes smaller "
            "numbers to zero), so its levels cannot be represented: multiply the data by a "
            "power of two first (and divide what dequantize returns by it)")
    return mean, std


def _plain_moments(flat: np.ndarray) -> tuple[np.float32, np.float32]:
    """Mean and variance (``ddof=1``) in float32, as they come."""
    size = np.float32(flat.size)
    dof = np.float32(max(flat.size - 1, 1))
    with np.errstate(all="ignore"):
        # plain sums first; when the mean is large against the spread they cancel, and the sums
        # are redone on values shifted by the mean of a strided sample
        s1, s2 = _sums(flat)
        mean = s1 / size
        var = np.maximum(s2 - s1 * mean, np.float32(0.0)) / dof
        if not mean * mean <= np.float32(1e-2) * var:
            shift = np.mean(flat[:: max(1, flat.size // 4096)], dtype=np.float32)
            t1, t2 = _sums(flat, shift)
            mean = shift + t1 / size
            var = np.maximum(t2 - t1 * t1 / size, np.float32(0.0)) / dof
    return np.float32(mean), np.float32(var)


@functools.partial(jax.jit, static_argnames=("dists", "n", "search", "zero"))
def _run(parts, beta, mean, std, *, dists, n, search, zero):
    """The search, and the chosen codebook's thresholds and levels (encoding is a separate
    computation, so the thresholds reach it as arrays, not as per-element work), from the
    data's ``mean`` and ``std`` (:func:`_moments`).

    ``parts`` is the data as one array, or as head, main part and tail (the search needs one
    array)."""
    x = max(parts, key=lambda p: p.shape[0])
    # constant input (distquant divides by zero here): scale 0 and location = the value itself,
    # so every level, and so every decoded value, is exactly that value. A constant has a
    # computed spread of zero or of rounding size against its mean (its sums take the shifted
    # branch above, which leaves at most ~1e-6 mean^2): max and min, a pass as long as the two
    # sums, are taken only below 1e-4 mean^2
    def constant(_):
        hi = functools.reduce(jnp.maximum, [jnp.max(p, initial=-jnp.inf) for p in parts])
        lo = functools.reduce(jnp.minimum, [jnp.min(p, initial=jnp.inf) for p in parts])
        return hi == lo, hi

    maybe_const = std * std <= 1e-4 * mean * mean + 1e-30
    const, hi = jax.lax.cond(maybe_const, constant, lambda _: (jnp.bool_(False), mean), None)
    offs, muls = [], []
    for d in dists:
        loc, scale = _family_loc_scale(d.family, mean, std, zero)
        offs.append(jnp.where(const, hi, loc))
        muls.append(jnp.where(const, 0.0, jnp.asarray(scale, jnp.float32)))
    offs, muls = jnp.stack(offs), jnp.stack(muls)
    cands = S.Candidates(dists, n, offs, muls, encode="companding")
    if search:
        xs = nx.sort_float(x)
        _, row, col = S.grid_search(xs, cands, "mae")
        beta = jnp.asarray(cands.betas)[row, col]
    else:
        row = col = jnp.int32(0)
    t, lv = cands.codebooks(row, beta)
    lv = _snap_zero(lv, zero)
    return t, lv, row, col, offs[row], muls[row]


def _encode(parts, t, lv, k: int, packbits: bool, word_path: bool):
    """Dispatches the encoding and returns a function that awaits it and gives
    ``(NumPy int64 words or codes, summed absolute error)``."""
    if len(parts) == 3:  # head, aligned main part of whole words, tail (the word path only)
        head, main, tail = parts
        main_words = _encode_u32(main, t, k=k)
        err = _sum(_abs_error_u32(main, main_words, lv, k=k))
        words, small_err = _join_words(head, main_words, tail, t, lv, k=k)
        return lambda: (np.asarray(words).view(np.int64), float(err) + float(small_err))
    x = parts[0]
    if word_path:
        words = _encode_u32(x, t, k=k)
        err = _sum(_abs_error_u32(x, words, lv, k=k))
        # little-endian [low, high] pairs
        return lambda: (np.asarray(words).view(np.int64), float(err))
    out, err = _encode_generic(x, t, lv, k=k, packbits=packbits)

    def collect():
        q = bitpack.int64_from_halves(np.asarray(out)) if packbits else np.asarray(out)
        return q.astype(np.int64, copy=False), float(err)

    return collect


def _as_value_error(check, *args):
    """A ``_checks`` validator whose ``TypeError`` becomes a ``ValueError`` (as distquant's
    argument errors are)."""
    try:
        return check(*args)
    except TypeError as e:
        raise ValueError(str(e)) from None


def _info_fields(info: dict) -> tuple:
    """The validated fields of a :func:`quantize` ``info`` dict: ``n, shape, packbits, dist,
    beta, loc, scale, n_elems, zero, dtype`` (a missing key or a value :func:`quantize` cannot
    have written is a ``ValueError`` naming it)."""
    try:
        n, shape, packbits = info["n"], info["shape"], info["packbits"]
        dist, beta, loc, scale = info["dist"], info["beta"], info["loc"], info["scale"]
    except KeyError as e:
        raise ValueError(f"info is missing the key {e.args[0]!r}") from None

    def number(key, value, lo=None, hi=None):
        value = value.item() if hasattr(value, "item") else value  # a 0-d array or tensor
        return _as_value_error(_checks.check_float, value, f"info[{key!r}]", lo, hi)

    n = _as_value_error(_checks.check_int, n, "info['n']", 2, 1 << 16)
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise ValueError(f"info['shape'] must be a list of ints, got {shape!r}")
    shape = [_as_value_error(_checks.check_int, d, "info['shape'] entries", 0, _checks.INT32_MAX)
             for d in shape]
    packbits = _as_value_error(_checks.check_bool, packbits, "info['packbits']")
    dist = D.parse_dist(dist)
    beta = _as_value_error(_checks.check_beta, beta.item() if hasattr(beta, "item") else beta,
                           "info['beta']")
    f32 = float(np.finfo(np.float32).max)
    loc, scale = number("loc", loc, -f32, f32), number("scale", scale, 0.0, f32)
    n_elems = _as_value_error(_checks.check_int, info.get("n_elems", math.prod(shape)),
                              "info['n_elems']", 0, _checks.INT32_MAX)
    if n_elems != math.prod(shape):
        raise ValueError(f"info['n_elems']={n_elems} does not match info['shape']={shape}")
    zero = info.get("zero", None)
    if zero is not None:
        zero = _as_value_error(_checks.check_zero, zero, "info['zero']")
    dtype = info.get("dtype", "float32")
    try:
        ok = dtype == "bfloat16" or np.issubdtype(np.dtype(dtype), np.floating)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"info['dtype'] must name a floating-point dtype, got {dtype!r}")
    return n, shape, packbits, dist, beta, loc, scale, n_elems, zero, dtype


def quantize(
    data: Any,
    k: int | None = None,
    n: int | None = None,
    dist: str | None = "gaussian",
    packbits: bool = True,
    beta: float | None = None,
    zero: float | None = None,
) -> tuple[np.ndarray, dict]:
    """Quantises a tensor exactly as ``distquant.quantize`` does (with its defects fixed).

    Args:
      data: a floating-point array (NumPy, JAX, torch or nested lists), any shape and layout.
      k: bits per value; or ``n``: number of levels (exactly one of the two).
      dist: one of the nine reference names, or ``None`` to choose the one with the smallest
        mean absolute error.
      packbits: pack ``64 // k`` codes per int64, first code in the most significant field.
      beta: range factor, in [1e-6, 1e6]; ``None`` searches the reference's grid for the
        smallest mean absolute error.
      zero: a value reproduced exactly (the location of the quantiser).

    Returns:
      ``(q, info)``: ``q`` is a NumPy int64 array (packed words, or codes shaped like ``data``);
      ``info`` has the reference's keys ``dist, scale, loc, n, packbits, beta, abs_error, shape,
      n_elems`` plus ``k``, ``dtype`` and ``zero``.

    Examples:
      >>> import numpy as np
      >>> from distq import compat
      >>> x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
      >>> q, info = compat.quantize(x, k=4, dist="gaussian", beta=1.0)
      >>> q.dtype, q.shape, info["n"]
      (dtype('int64'), (625,), 16)
      >>> err = float(np.abs(compat.dequantize(q, **info) - x).mean())
      >>> abs(err - info["abs_error"]) < 1e-6  # info reports the mean absolute error
      True
    """
    if n is None and k is None:
        raise ValueError("give `k` bits or `n` levels (neither was given)")
    if n is not None and k is not None:
        raise ValueError("give only one of `k` bits or `n` levels, not both")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= 16:
            raise ValueError(f"k must be an int in 1..16, got {k!r}")
        n = 1 << int(k)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 2 <= n <= 1 << 16:
        raise ValueError(f"n must be an int in 2..65536, got {n!r}")
    n = int(n)
    if beta is not None:
        beta = _as_value_error(_checks.check_beta, beta)
    if zero is not None:
        zero = _as_value_error(_checks.check_zero, zero)
    _as_value_error(_checks.check_bool, packbits, "packbits")

    flat, in_dtype, shape = _to_host_float32(data)

    names = D.DIST_NAMES if dist is None else (dist,)
    dists = tuple(D.parse_dist(nm) for nm in names)  # validates
    if zero is not None and n % 2 == 0 and any(d.family in D.SYMMETRIC for d in dists):
        if n == 2:
            raise ValueError("zero with k=1 (n=2) would leave a single level; use n >= 3")
        n -= 1  # odd n: the middle level is exactly `zero` (distquant asserts odd n here)
    codes_bits = max(1, math.ceil(math.log2(n)))

    # XLA:CPU reads a host buffer in place only from a 64-byte boundary, and its word kernel is
    # fast only on whole words (a pad or an offset slice fused into it costs 5-10x). On the word
    # path the data therefore goes as three host views: the few values before the first
    # boundary, an aligned main part of whole int64 words (read in place, never copied), and
    # the few values after it; the words are joined by a funnel shift (one pass over the words,
    # several times shorter than one over the values).
    h = _head_length(flat)
    word_path = _word_path(packbits, codes_bits, n)
    if h is None or (h and not (word_path and beta is not None and flat.size >= _SPLIT_MIN)):
        flat, h = _aligned_copy(flat), 0
    whole = None if h else jax.device_put(flat)  # zero-copy: `flat` is 64-byte aligned
    enc_parts = (whole,)
    if word_path and flat.size >= _SPLIT_MIN:
        per64 = 64 // codes_bits  # whole words, an even number of them: with an odd count
        # XLA:CPU's word kernel runs about ten times slower
        end = h + (flat.size - h) // (2 * per64) * (2 * per64)
        enc_parts = (jax.device_put(np.array(flat[:h])), jax.device_put(flat[h:end]),
                     jax.device_put(np.array(flat[end:])))
    # the statistics on the host, in an order that does not depend on the split (see _sums)
    mean, std = _moments(flat)
    if not (np.isfinite(mean) and np.isfinite(std)):
        bad = int(np.sum(~np.isfinite(flat)))
        raise ValueError(
            f"data contains {bad} NaN/inf value(s)" if bad else
            "data is too large for float32 statistics (its variance overflows)"
        )
    t, lv, row, col, loc, scale = _run(
        enc_parts if whole is None else (whole,), jnp.float32(1.0 if beta is None else beta),
        jnp.float32(mean), jnp.float32(std), dists=dists, n=n,
        search=beta is None, zero=zero,
    )
    # encoding is dispatched before the scalars are awaited; they come in one device-to-host
    # transfer
    collect = _encode(enc_parts, t, lv, codes_bits, bool(packbits), word_path)
    row, col, loc, scale = jax.device_get((row, col, loc, scale))
    row = int(row)
    if beta is None:  # report the grid value itself, as the reference does
        beta = S.beta_grid(dists[row].family)[int(col)]
    q, abs_error = collect()
    if not packbits:
        q = q.reshape(shape)
    info = {
        "dist": names[row],
        "scale": float(scale),
        "loc": float(loc),
        "n": n,
        "packbits": bool(packbits),
        "beta": float(beta),
        "abs_error": abs_error / flat.size,
        "shape": list(shape),
        "n_elems": int(flat.size),
        "k": codes_bits,
        "dtype": str(np.dtype(in_dtype)) if in_dtype != jnp.bfloat16 else "bfloat16",
        "zero": zero,
    }
    return q, info


@functools.partial(jax.jit, static_argnames=("dist", "n", "zero"))
def _decode(codes, beta, loc, scale, *, dist, n, zero):
    lv = loc + scale * beta * jnp.asarray(D.levels(dist, n), jnp.float32)
    lv = _snap_zero(lv, zero)
    return lv[codes.astype(jnp.int32)]


def dequantize(q_tensor: Any, **info) -> np.ndarray:
    """Decodes what :func:`quantize` (or ``distquant.quantize``) returned; never modifies it.

    Args:
      q_tensor: the packed int64 words or the codes (NumPy, JAX or torch).
      **info: the ``info`` dict of :func:`quantize`.

    Returns:
      A NumPy array of ``info['shape']`` and the original dtype (float32 if ``info`` has no
      ``dtype``).

    Examples:
      >>> import numpy as np
      >>> from distq import compat
      >>> x = np.random.default_rng(0).standard_normal((100, 100)).astype(np.float32)
      >>> codes, info = compat.quantize(x, k=3, packbits=False)  # beta searched
      >>> codes.shape, info["dist"], info["beta"]
      ((100, 100), 'gaussian', 0.851)
      >>> y = compat.dequantize(codes, **info)
      >>> y.shape, y.dtype, np.unique(y).size
      ((100, 100), dtype('float32'), 8)
      >>> compat.dequantize(codes, n=8)
      Traceback (most recent call last):
        ...
      ValueError: info is missing the key 'shape'
    """
    n, shape, packbits, dist, beta, loc, scale, n_elems, zero, dtype = _info_fields(info)
    if hasattr(q_tensor, "detach") and hasattr(q_tensor, "numpy"):
        q_tensor = q_tensor.detach().cpu().numpy()
    q = np.asarray(q_tensor)
    if not np.issubdtype(q.dtype, np.integer):
        raise TypeError(f"q_tensor must hold integer codes, got dtype {q.dtype}")
    k = max(1, math.ceil(math.log2(n)))
    if packbits:
        halves = bitpack.halves_from_int64(np.ascontiguousarray(q.reshape(-1)).astype(np.int64))
        codes = bitpack.unpack_int64_halves(halves, k, n_elems, dtype=jnp.int32)
    else:
        if q.size != n_elems:
            raise ValueError(f"q_tensor has {q.size} codes, info says {n_elems}")
        codes = jnp.asarray(q.reshape(-1).astype(np.int32))
    codes = jnp.clip(codes, 0, n - 1)
    out = _decode(codes, jnp.float32(beta), jnp.float32(loc), jnp.float32(scale),
                  dist=dist, n=n, zero=zero)
    return np.asarray(out).reshape(shape).astype(dtype)
