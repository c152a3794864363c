"""Dense bit-packing of small integer codes into machine words.

Two layouts are provided.

*Dense stream layout* (:func:`pack` / :func:`unpack`): ``n`` codes of ``bits``
bits each are written back to back into a little-endian bit stream made of
``uint32`` words. Code ``i`` occupies stream bits ``[i * bits, (i + 1) * bits)``
where stream bit ``b`` is bit ``b % 32`` (LSB = 0) of word ``b // 32``. A code
may straddle two words, and no bits are wasted except the unused high bits of
the last word, which are zero. The output has exactly ``ceil(n * bits / 32)``
words (:func:`packed_nwords`).

*distquant int64 layout* (:func:`pack_int64_halves` /
:func:`unpack_int64_halves`): ``per = 64 // bits`` codes per 64-bit word, the
first code in the most significant field, i.e. code ``j`` of a word sits at
bit offset ``bits * (per - 1 - j)``; the last word is zero padded. Because JAX
has no 64-bit integers unless x64 mode is enabled, every 64-bit word is held as
two ``uint32`` halves ``[low, high]``; :func:`int64_from_halves` and
:func:`halves_from_int64` convert to and from NumPy ``int64`` on the host.

``bits`` and ``n`` must be Python integers (static under :func:`jax.jit`).
Code values are never checked inside a traced computation: any value
``>= 2**bits`` (or negative) is reduced to its low ``bits`` bits (two's
complement for negatives). All packing/unpacking functions are jit-compiled
internally, can be called inside user ``jax.jit`` code, and can be mapped with
:func:`jax.vmap` over a leading batch axis (each row is packed separately).

Implementation notes (XLA:CPU performance):

* The stream is periodic: ``P = 32 / gcd(bits, 32)`` codes fill exactly
  ``Q = bits / gcd(bits, 32)`` words (``P = 32 / bits``, ``Q = 1`` for
  power-of-two widths). The input is viewed as ``(G, P)`` and every output
  word is a bitwise OR of a few input columns shifted by *static* amounts
  (Python arithmetic at trace time), or for 1, 2 and 16 bits a shift-and-sum
  over the ``P`` columns. No gathers or scatters.
* XLA:CPU does not fuse a concatenate with more than 8 operands (each operand
  would then become its own kernel re-reading the whole input). Outputs are
  therefore assembled from at most 8 lane chunks; a chunk is computed from
  ``(G, 1)`` columns broadcast against constant per-lane shift vectors, with
  ``where`` on a constant lane mask when lanes need different columns.
* A length that is not a whole number of blocks is handled as "complete
  blocks (one 2-D kernel) + one padded tail block", joined by a 1-D
  concatenate that XLA keeps out of the big kernel (see ``_blocked``).
  Padding the input and slicing the output of a single kernel instead makes
  XLA emit a 1-D loop with per-element index arithmetic, 2-10x slower; that
  simpler form is only used for small inputs, where it compiles faster.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "pack",
    "unpack",
    "packed_nbytes",
    "packed_nwords",
    "pack_int64_halves",
    "unpack_int64_halves",
    "int64_nwords",
    "int64_from_halves",
    "halves_from_int64",
]

_MIN_BITS = 1
_MAX_BITS = 16
_WORD = 32  # bits per output word
_MAX_CONCAT = 8  # XLA:CPU only fuses concatenates with <= 8 operands
# Ragged inputs with at least this many complete blocks get the copy-join
# layout of `_blocked` (faster at run time, ~10 more kernels to compile).
_SPLIT_MIN_BLOCKS = 1024
# Ragged inputs with fewer complete blocks use a single padded kernel.
_SMALL_BLOCKS = 64

# Widths whose words are packed with a shift-and-sum reduction over the
# ``32 // bits`` codes of a word instead of an OR of static column shifts.
# Both forms are exact (the fields are disjoint); on a 2-core x86 CPU the
# reduction measured about 2x faster for 1 and 2 bits on ragged lengths and
# slightly faster for 16 bits, while the OR form was as fast or faster for
# 4 and 8 bits (experiments/bench_bitpack.py; timings are noisy).
_REDUCE_PACK_BITS = frozenset({1, 2, 16})


# --------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------


def _check_bits(bits: Any) -> int:
    """Returns ``bits`` as an ``int`` or raises ``ValueError``."""
    if (
        isinstance(bits, (bool, np.bool_))
        or not isinstance(bits, (int, np.integer))
        or not _MIN_BITS <= int(bits) <= _MAX_BITS
    ):
        raise ValueError(
            f"`bits` must be a Python int in the range [{_MIN_BITS}, {_MAX_BITS}], "
            f"got {bits!r} (type {type(bits).__name__})."
        )
    return int(bits)


def _check_n(n: Any) -> int:
    """Returns ``n`` as a non-negative ``int`` or raises ``ValueError``."""
    if (
        isinstance(n, (bool, np.bool_))
        or not isinstance(n, (int, np.integer))
        or int(n) < 0
    ):
        raise ValueError(f"`n` must be a non-negative Python int, got {n!r}.")
    return int(n)


def _as_int_array(x: Any, name: str) -> Any:
    """Returns ``x`` (converted to NumPy if it has no dtype); integer dtype only."""
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"`{name}` must have an integer dtype, got dtype {x.dtype}.")
    return x


def _out_dtype(bits: int, dtype: Any) -> np.dtype:
    if dtype is None:
        return np.dtype(np.uint8 if bits <= 8 else np.uint16)
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.integer):
        raise TypeError(f"`dtype` must be an integer dtype, got {dtype}.")
    return dtype


def _size(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------
# static-shift building blocks (all shift amounts are Python ints < 32)
# --------------------------------------------------------------------------


def _mask(bits: int) -> np.uint32:
    return np.uint32((1 << bits) - 1)


def _shl(x: jax.Array, s: int) -> jax.Array:
    return x if s == 0 else jnp.left_shift(x, np.uint32(s))


def _shr(x: jax.Array, s: int) -> jax.Array:
    return x if s == 0 else jnp.right_shift(x, np.uint32(s))  # logical: uint32


def _lanes(v: list[int]) -> jax.Array:
    return jnp.asarray(np.asarray(v, np.uint32))[None, :]


def _bcast(x: jax.Array, lanes: int) -> jax.Array:
    """Broadcasts a ``(rows, 1)`` array to ``(rows, lanes)``."""
    return x if x.shape[-1] == lanes else jnp.broadcast_to(x, (x.shape[0], lanes))


def _shl_v(x: jax.Array, s: list[int]) -> jax.Array:
    """Left shift by static per-lane amounts; result has ``len(s)`` lanes."""
    if all(e == s[0] for e in s):
        return _bcast(_shl(x, s[0]), len(s))
    return jnp.left_shift(x, _lanes(s))


def _shr_v(x: jax.Array, s: list[int]) -> jax.Array:
    """Logical right shift by static per-lane amounts."""
    if all(e == s[0] for e in s):
        return _bcast(_shr(x, s[0]), len(s))
    return jnp.right_shift(x, _lanes(s))


def _or_all(terms: list[jax.Array]) -> jax.Array:
    """Balanced OR-reduction (short dependency chains)."""
    while len(terms) > 1:
        nxt = [terms[k] | terms[k + 1] for k in range(0, len(terms) - 1, 2)]
        if len(terms) % 2:
            nxt.append(terms[-1])
        terms = nxt
    return terms[0]


_Col = Callable[[int], jax.Array]


def _columns(x: jax.Array, fn: Callable[[jax.Array], jax.Array] | None = None) -> _Col:
    """Memoised ``i -> fn(x[:, i:i+1])``: slice first, convert afterwards.

    Converting the whole block first would be materialised by XLA as a wide
    uint32 temporary; per-column conversion keeps everything in one loop.
    """
    cache: dict[int, jax.Array] = {}

    def col(i: int) -> jax.Array:
        if i not in cache:
            c = x[:, i : i + 1]
            cache[i] = c if fn is None else fn(c)
        return cache[i]

    return col


def _lane_select(col: _Col, idx: list[int]) -> jax.Array:
    """Array whose lane ``j`` is column ``col(idx[j])`` (no gather).

    Returns ``(rows, 1)`` if all lanes use the same column (the consumer
    broadcasts), else ``(rows, len(idx))`` built with selects on a constant
    lane mask.
    """
    uniq = list(dict.fromkeys(idx))
    out = col(uniq[0])
    if len(uniq) == 1:
        return out
    out = _bcast(out, len(idx))
    for u in uniq[1:]:
        out = jnp.where(np.asarray([i == u for i in idx])[None, :], col(u), out)
    return out


def _concat_lanes(chunks: list[jax.Array]) -> jax.Array:
    assert len(chunks) <= _MAX_CONCAT
    return chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks, axis=1)


def _codes_u32(bits: int) -> Callable[[jax.Array], jax.Array]:
    mask = _mask(bits)
    return lambda c: c.astype(jnp.uint32) & mask


def _blocked(
    flat: jax.Array,
    block_in: int,
    block_out: int,
    out_len: int,
    fn: Callable[[jax.Array], jax.Array],
) -> jax.Array:
    """Applies a block kernel to a 1-D array of any length.

    ``fn`` maps ``(R, block_in)`` to ``(R, block_out)``. The result is the
    row-major flattening of ``fn`` applied to the zero-padded input, cut to
    ``out_len``.

    If every block is complete (nothing padded, nothing cut), this is a
    single 2-D kernel; small ragged inputs (fewer than ``_SMALL_BLOCKS``
    complete blocks) are padded and use a single kernel too. Otherwise the
    complete blocks and the padded/cut tail
    block are computed separately and concatenated. For large inputs (at
    least ``_SPLIT_MIN_BLOCKS`` complete blocks) the last ``_MAX_CONCAT``
    complete blocks are also computed one by one so that the concatenate has
    more than ``_MAX_CONCAT`` operands: XLA:CPU then keeps the big 2-D kernel
    on its own and joins the pieces with a plain copy, which is several times
    faster than letting the slice/concatenate fuse into the kernel (that
    turns it into a 1-D loop with per-element index arithmetic).
    """
    n = flat.shape[0]
    full = min(n // block_in, out_len // block_out)  # complete blocks
    tail_out = out_len - full * block_out
    tail_in = n - full * block_in
    assert tail_in <= block_in and tail_out <= block_out
    if not tail_out and not tail_in:
        return fn(flat.reshape(full, block_in)).reshape(-1)
    if full < _SMALL_BLOCKS:
        # Small input: one padded kernel (half the code to compile); the
        # slower fused slice does not matter at this size.
        rows = full + (1 if tail_out else 0)
        x = flat[: rows * block_in]
        x = jnp.pad(x, (0, rows * block_in - x.shape[0]))
        return fn(x.reshape(rows, block_in)).reshape(-1)[:out_len]
    parts = []
    if full:
        head = full - _MAX_CONCAT if full >= _SPLIT_MIN_BLOCKS else full
        parts.append(fn(flat[: head * block_in].reshape(head, block_in)))
        for j in range(head, full):
            row = flat[j * block_in : (j + 1) * block_in]
            parts.append(fn(row.reshape(1, block_in)))
    parts = [p.reshape(-1) for p in parts]
    if tail_out:
        tail = jnp.pad(flat[full * block_in :], (0, block_in - tail_in))
        parts.append(fn(tail.reshape(1, block_in)).reshape(-1)[:tail_out])
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


# --------------------------------------------------------------------------
# dense stream kernels
# --------------------------------------------------------------------------


def _group_shape(bits: int) -> tuple[int, int]:
    """Period ``(P, Q)`` of the dense stream: ``P * bits == Q * 32``."""
    g = math.gcd(bits, _WORD)
    return _WORD // g, bits // g


def _pack_reduce(x: jax.Array, bits: int) -> jax.Array:
    """``(R, 32 // bits)`` raw codes -> ``(R, 1)`` words (power-of-two bits)."""
    per = x.shape[1]
    v = x.astype(jnp.uint32) & _mask(bits)
    if per == 1:
        return v
    v = jnp.left_shift(v, _lanes([j * bits for j in range(per)]))
    # The fields are disjoint, so the sum equals the bitwise OR.
    return jnp.sum(v, axis=1, keepdims=True, dtype=jnp.uint32)


def _pack_groups(x: jax.Array, bits: int) -> jax.Array:
    """``(G, P)`` raw codes -> ``(G, Q)`` uint32 words of the dense stream."""
    ncodes = x.shape[1]
    nwords = ncodes * bits // _WORD
    col = _columns(x, _codes_u32(bits))
    # terms[w]: (code index, left shift, right shift) contributing to word w,
    # in increasing code order.
    terms: list[list[tuple[int, int, int]]] = [[] for _ in range(nwords)]
    for i in range(ncodes):
        k, off = divmod(i * bits, _WORD)
        terms[k].append((i, off, 0))
        if off + bits > _WORD:  # high part spills into the next word
            terms[k + 1].append((i, 0, _WORD - off))
    if nwords == 1:
        return _or_all([_shr(_shl(col(i), ls), rs) for i, ls, rs in terms[0]])
    per_chunk = _cdiv(nwords, _MAX_CONCAT)  # words per concatenate operand
    chunks = []
    for w0 in range(0, nwords, per_chunk):
        ws = range(w0, min(w0 + per_chunk, nwords))
        acc = []
        for t in range(max(len(terms[w]) for w in ws)):
            ent = [terms[w][t] if t < len(terms[w]) else None for w in ws]
            some = next(e for e in ent if e is not None)
            full = [some if e is None else e for e in ent]
            v = _lane_select(col, [e[0] for e in full])
            v = _shl_v(_shr_v(v, [e[2] for e in full]), [e[1] for e in full])
            if any(e is None for e in ent):  # lanes without a t-th term
                v = v & _lanes([0 if e is None else 0xFFFFFFFF for e in ent])
            acc.append(v)
        chunks.append(_bcast(_or_all(acc), len(ws)))
    return _concat_lanes(chunks)


def _unpack_groups(w: jax.Array, bits: int) -> jax.Array:
    """``(G, Q)`` uint32 words -> ``(G, P)`` uint32 codes of the dense stream."""
    nwords = w.shape[1]
    ncodes = nwords * _WORD // bits
    col = _columns(w)
    mask = _mask(bits)
    start = [divmod(i * bits, _WORD) for i in range(ncodes)]  # (word, offset)
    per_chunk = _cdiv(nwords, _MAX_CONCAT)  # start words per concatenate operand
    chunks = []
    for k0 in range(0, nwords, per_chunk):
        codes = [i for i in range(ncodes) if k0 <= start[i][0] < k0 + per_chunk]
        ks = [start[i][0] for i in codes]
        offs = [start[i][1] for i in codes]
        v = _shr_v(_lane_select(col, ks), offs)
        spill = [o + bits > _WORD for o in offs]
        if any(spill):
            # Lanes that do not spill reuse a spilling lane's column shifted
            # by 31: only bit 31 can survive, and the mask (bits <= 16) clears it.
            other = next(k + 1 for k, s in zip(ks, spill) if s)
            hi_idx = [k + 1 if s else other for k, s in zip(ks, spill)]
            hi_sh = [_WORD - o if s else _WORD - 1 for o, s in zip(offs, spill)]
            v = v | _shl_v(_lane_select(col, hi_idx), hi_sh)
        chunks.append(v & mask)
    return _concat_lanes(chunks)


@functools.partial(jax.jit, static_argnums=(1,))
def _pack_impl(codes: jax.Array, bits: int) -> jax.Array:
    flat = codes.reshape(-1)
    nwords = _cdiv(flat.shape[0] * bits, _WORD)
    if nwords == 0:
        return jnp.zeros((0,), jnp.uint32)
    ncodes, nw = _group_shape(bits)
    if bits in _REDUCE_PACK_BITS:
        kernel = functools.partial(_pack_reduce, bits=bits)
    else:
        kernel = functools.partial(_pack_groups, bits=bits)
    return _blocked(flat, ncodes, nw, nwords, kernel)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _unpack_impl(words: jax.Array, bits: int, n: int, dtype: np.dtype) -> jax.Array:
    if n == 0:
        return jnp.zeros((0,), dtype)
    ncodes, nw = _group_shape(bits)
    # Only the words that hold the n codes, rounded up to whole groups
    # (a short trailing group is zero-padded by _blocked).
    w = words.reshape(-1)[: _cdiv(n, ncodes) * nw].astype(jnp.uint32)

    def kernel(block: jax.Array) -> jax.Array:
        return _unpack_groups(block, bits).astype(dtype)

    return _blocked(w, nw, ncodes, n, kernel)


# --------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------


def packed_nwords(n: int, bits: int) -> int:
    """Number of ``uint32`` words :func:`pack` produces for ``n`` codes.

    Args:
      n: Number of codes (non-negative int).
      bits: Bits per code, an int in ``[1, 16]``.

    Returns:
      ``ceil(n * bits / 32)``.

    Raises:
      ValueError: If ``n`` or ``bits`` is invalid.

    Example:
      >>> packed_nwords(10, 3)
      1
      >>> packed_nwords(11, 3)
      2
    """
    bits = _check_bits(bits)
    n = _check_n(n)
    return _cdiv(n * bits, _WORD)


def packed_nbytes(n: int, bits: int) -> int:
    """Size in bytes of the dense packing of ``n`` codes of ``bits`` bits.

    Args:
      n: Number of codes (non-negative int).
      bits: Bits per code, an int in ``[1, 16]``.

    Returns:
      ``4 * ceil(n * bits / 32)``, the ``nbytes`` of ``pack(codes, bits)``.

    Raises:
      ValueError: If ``n`` or ``bits`` is invalid.

    Example:
      >>> packed_nbytes(1000, 4)
      500
      >>> packed_nbytes(3, 5)
      4
    """
    return 4 * packed_nwords(n, bits)


def int64_nwords(n: int, bits: int) -> int:
    """Number of 64-bit words of the distquant layout for ``n`` codes.

    Args:
      n: Number of codes (non-negative int).
      bits: Bits per code, an int in ``[1, 16]``.

    Returns:
      ``ceil(n / (64 // bits))``.

    Raises:
      ValueError: If ``n`` or ``bits`` is invalid.

    Example:
      >>> int64_nwords(22, 3)  # 21 codes per int64
      2
    """
    bits = _check_bits(bits)
    n = _check_n(n)
    return _cdiv(n, 64 // bits)


# --------------------------------------------------------------------------
# dense stream: public API
# --------------------------------------------------------------------------


def pack(codes: Any, bits: int) -> jax.Array:
    """Densely packs integer codes into a little-endian ``uint32`` bit stream.

    Code ``i`` (in C order of ``codes``) occupies stream bits
    ``[i * bits, (i + 1) * bits)``; stream bit ``b`` is bit ``b % 32`` of word
    ``b // 32`` (LSB first). Codes may straddle two words. The unused high
    bits of the last word are zero.

    Values are not range-checked (that is impossible under ``jit``): a value
    ``>= 2**bits`` or a negative value is reduced to its low ``bits`` bits.

    Args:
      codes: Integer array of any shape, flattened in C order, with values in
        ``[0, 2**bits)``.
      bits: Bits per code, a Python int in ``[1, 16]`` (static under jit).

    Returns:
      1-D ``uint32`` array of exactly ``ceil(codes.size * bits / 32)`` words.

    Raises:
      ValueError: If ``bits`` is not an int in ``[1, 16]``.
      TypeError: If ``codes`` does not have an integer dtype.

    Example:
      >>> import numpy as np
      >>> w = pack(np.array([1, 2, 3], np.uint8), 4)
      >>> hex(int(w[0]))
      '0x321'
      >>> unpack(w, 4, 3).tolist()
      [1, 2, 3]
    """
    bits = _check_bits(bits)
    codes = _as_int_array(codes, "codes")
    return _pack_impl(codes, bits)


def unpack(words: Any, bits: int, n: int, dtype: Any = None) -> jax.Array:
    """Inverse of :func:`pack`: extracts the first ``n`` codes of a bit stream.

    Args:
      words: Integer array of packed words (flattened; each element is read
        as ``uint32``). It may hold more words than needed.
      bits: Bits per code, a Python int in ``[1, 16]`` (static under jit).
      n: Number of codes to extract, a Python int ``>= 0`` (static under jit).
      dtype: Output dtype; defaults to ``uint8`` if ``bits <= 8`` else
        ``uint16``.

    Returns:
      1-D array of ``n`` codes with values in ``[0, 2**bits)``.

    Raises:
      ValueError: If ``bits`` is invalid, ``n`` is negative, or ``words``
        holds fewer than ``n * bits`` bits.
      TypeError: If ``words`` or ``dtype`` is not an integer type.

    Example:
      >>> import numpy as np
      >>> codes = np.arange(10, dtype=np.uint8) % 7
      >>> w = pack(codes, 3)   # 30 bits -> 1 word
      >>> w.shape
      (1,)
      >>> unpack(w, 3, 10).tolist()
      [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    """
    bits = _check_bits(bits)
    n = _check_n(n)
    words = _as_int_array(words, "words")
    dtype = _out_dtype(bits, dtype)
    size = _size(tuple(words.shape))
    if n * bits > size * _WORD:
        raise ValueError(
            f"`n`={n} codes of {bits} bits need {_cdiv(n * bits, _WORD)} words, "
            f"but `words` holds only {size}."
        )
    return _unpack_impl(words, bits, n, dtype)


def take(words: jax.Array, bits: int, pos: jax.Array) -> jax.Array:
    """The codes at flat positions ``pos`` of a :func:`pack` stream, as int32.

    Reads only the (at most two) words that hold each code, so a few rows of a large packed
    matrix cost a few gathers instead of unpacking everything. Jittable; ``bits`` static.

    Example:
      >>> import numpy as np
      >>> w = pack(np.arange(10, dtype=np.uint8) % 7, 3)
      >>> take(w, 3, np.array([0, 6, 9])).tolist()
      [0, 6, 2]
    """
    b = jnp.asarray(pos).astype(jnp.uint32) * jnp.uint32(bits)
    w = (b >> 5).astype(jnp.int32)
    sh = b & jnp.uint32(31)
    lo = jnp.take(words, w, mode="clip") >> sh
    nxt = jnp.take(words, w + 1, mode="fill", fill_value=0)
    hi = jnp.where(sh == 0, jnp.uint32(0), nxt << ((jnp.uint32(32) - sh) & jnp.uint32(31)))
    return ((lo | hi) & jnp.uint32((1 << bits) - 1)).astype(jnp.int32)


# --------------------------------------------------------------------------
# distquant-compatible int64 layout, as uint32 [low, high] halves
# --------------------------------------------------------------------------


def _field_offsets(bits: int) -> list[int]:
    """Bit offset of code ``j`` inside its 64-bit word (descending in ``j``)."""
    per = 64 // bits
    return [bits * (per - 1 - j) for j in range(per)]


def _pack_halves_rows(x: jax.Array, bits: int) -> jax.Array:
    """``(R, 64 // bits)`` raw codes -> ``(R, 2)`` ``[low, high]`` halves."""
    col = _columns(x, _codes_u32(bits))
    lo_terms, hi_terms = [], []
    for j, o in enumerate(_field_offsets(bits)):
        if o >= _WORD:
            hi_terms.append(_shl(col(j), o - _WORD))
        else:
            lo_terms.append(_shl(col(j), o))
            if o + bits > _WORD:  # field straddles bit 32
                hi_terms.append(_shr(col(j), _WORD - o))
    # bits <= 16 means >= 4 fields, so both halves always get terms.
    return jnp.concatenate([_or_all(lo_terms), _or_all(hi_terms)], axis=1)


def _unpack_halves_rows(h: jax.Array, bits: int) -> jax.Array:
    """``(R, 2)`` uint32 halves -> ``(R, 64 // bits)`` uint32 codes."""
    lo, hi = h[:, 0:1], h[:, 1:2]
    mask = _mask(bits)
    offs = _field_offsets(bits)  # descending: high-half fields come first
    hi_f = [o - _WORD for o in offs if o >= _WORD]
    mid = [o for o in offs if o < _WORD < o + bits]  # at most one field
    lo_f = [o for o in offs if o + bits <= _WORD]
    chunks = []
    if hi_f:
        chunks.append(_shr_v(hi, hi_f) & mask)
    for o in mid:
        chunks.append((_shr(lo, o) | _shl(hi, _WORD - o)) & mask)
    if lo_f:
        chunks.append(_shr_v(lo, lo_f) & mask)
    return _concat_lanes(chunks)


@functools.partial(jax.jit, static_argnums=(1,))
def _pack_halves_impl(codes: jax.Array, bits: int) -> jax.Array:
    flat = codes.reshape(-1)
    per = 64 // bits
    nw = _cdiv(flat.shape[0], per)
    if nw == 0:
        return jnp.zeros((0, 2), jnp.uint32)
    kernel = functools.partial(_pack_halves_rows, bits=bits)
    return _blocked(flat, per, 2, 2 * nw, kernel).reshape(nw, 2)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _unpack_halves_impl(
    halves: jax.Array, bits: int, n: int, dtype: np.dtype
) -> jax.Array:
    if n == 0:
        return jnp.zeros((0,), dtype)
    nw = _cdiv(n, 64 // bits)
    h = halves.reshape(-1)[: 2 * nw].astype(jnp.uint32)

    def kernel(block: jax.Array) -> jax.Array:
        return _unpack_halves_rows(block, bits).astype(dtype)

    return _blocked(h, 2, 64 // bits, n, kernel)


def pack_int64_halves(codes: Any, bits: int) -> jax.Array:
    """Packs codes in the distquant int64 layout, as ``uint32`` halves.

    The layout stores ``per = 64 // bits`` codes per 64-bit word, first code in
    the most significant field (``word = ((c0 << bits | c1) << bits | c2)...``,
    i.e. code ``j`` at bit offset ``bits * (per - 1 - j)``); the last word is
    padded with zero codes. Each 64-bit word is returned as a row
    ``[low 32 bits, high 32 bits]``, so on a little-endian host
    ``int64_from_halves(out)`` (or ``np.asarray(out).view(np.int64)``) is the
    distquant ``int64`` tensor.

    Values ``>= 2**bits`` are reduced to their low ``bits`` bits.

    Args:
      codes: Integer array of any shape (flattened in C order), values in
        ``[0, 2**bits)``.
      bits: Bits per code, a Python int in ``[1, 16]`` (static under jit).

    Returns:
      ``uint32`` array of shape ``(ceil(n / per), 2)``.

    Raises:
      ValueError: If ``bits`` is not an int in ``[1, 16]``.
      TypeError: If ``codes`` does not have an integer dtype.

    Example:
      >>> import numpy as np
      >>> h = pack_int64_halves(np.array([1, 2], np.int32), 16)
      >>> h.shape
      (1, 2)
      >>> int(int64_from_halves(h)[0]) == (1 << 48) | (2 << 32)
      True
    """
    bits = _check_bits(bits)
    codes = _as_int_array(codes, "codes")
    return _pack_halves_impl(codes, bits)


def unpack_int64_halves(
    halves: Any, bits: int, n: int, dtype: Any = None
) -> jax.Array:
    """Inverse of :func:`pack_int64_halves`.

    Args:
      halves: Integer array of shape ``(W, 2)`` holding ``[low, high]``
        ``uint32`` halves of each 64-bit word (a flat array of even length,
        e.g. ``int64_array.view(np.uint32)``, is accepted too). It may hold
        more words than needed.
      bits: Bits per code, a Python int in ``[1, 16]`` (static under jit).
      n: Number of codes to extract, a Python int ``>= 0`` (static under jit).
      dtype: Output dtype; defaults to ``uint8`` if ``bits <= 8`` else
        ``uint16``.

    Returns:
      1-D array of the first ``n`` codes.

    Raises:
      ValueError: If ``bits`` is invalid, ``n`` is negative or larger than the
        words hold, or ``halves`` is not ``(W, 2)`` / flat of even length.
      TypeError: If ``halves`` or ``dtype`` is not an integer type.

    Example:
      >>> import numpy as np
      >>> codes = np.array([5, 0, 7, 3], np.uint8)
      >>> h = pack_int64_halves(codes, 3)
      >>> unpack_int64_halves(h, 3, 4).tolist()
      [5, 0, 7, 3]
    """
    bits = _check_bits(bits)
    n = _check_n(n)
    halves = _as_int_array(halves, "halves")
    dtype = _out_dtype(bits, dtype)
    shape = tuple(halves.shape)
    if len(shape) == 2 and shape[1] == 2:
        nw = shape[0]
    elif len(shape) == 1 and shape[0] % 2 == 0:
        nw = shape[0] // 2
    else:
        raise ValueError(
            "`halves` must have shape (W, 2) (or be flat of even length), "
            f"got shape {shape}."
        )
    per = 64 // bits
    if n > nw * per:
        raise ValueError(
            f"`n`={n} codes of {bits} bits need {_cdiv(n, per)} 64-bit words, "
            f"but `halves` holds only {nw}."
        )
    return _unpack_halves_impl(halves, bits, n, dtype)


# --------------------------------------------------------------------------
# host-side int64 <-> halves conversion (NumPy)
# --------------------------------------------------------------------------

_LITTLE = sys.byteorder == "little"


def int64_from_halves(halves: Any) -> np.ndarray:
    """Converts ``(W, 2)`` ``uint32`` ``[low, high]`` halves to NumPy ``int64``.

    On a little-endian host with a C-contiguous ``uint32`` input this is a
    zero-copy view (it may share memory with ``halves`` and may be
    read-only, e.g. for a JAX array); otherwise a new array is computed.

    Args:
      halves: Array-like of shape ``(W, 2)`` (JAX or NumPy) with dtype
        ``uint32`` (other integer dtypes are reduced to their low 32 bits).

    Returns:
      1-D ``np.int64`` array of length ``W``.

    Raises:
      ValueError: If ``halves`` does not have shape ``(W, 2)``.
      TypeError: If ``halves`` does not have an integer dtype.

    Example:
      >>> import numpy as np
      >>> int64_from_halves(np.array([[3, 1]], np.uint32)).tolist()
      [4294967299]
    """
    a = np.asarray(halves)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"`halves` must have an integer dtype, got {a.dtype}.")
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"`halves` must have shape (W, 2), got {a.shape}.")
    if (
        _LITTLE
        and a.dtype == np.uint32
        and a.dtype.isnative
        and a.flags.c_contiguous
    ):
        return a.view(np.int64).reshape(-1)
    a = a.astype(np.uint64) & np.uint64(0xFFFFFFFF)
    return ((a[:, 1] << np.uint64(32)) | a[:, 0]).view(np.int64)


def halves_from_int64(a: Any) -> np.ndarray:
    """Splits 64-bit integers into ``(W, 2)`` ``uint32`` ``[low, high]`` halves.

    The input is flattened in C order. On a little-endian host with a
    C-contiguous native ``int64``/``uint64`` input the result is a zero-copy
    view that shares memory with ``a``.

    Args:
      a: Array-like with dtype ``int64`` or ``uint64`` (e.g. the distquant
        packed tensor converted with ``tensor.numpy()``).

    Returns:
      ``np.uint32`` array of shape ``(a.size, 2)``.

    Raises:
      TypeError: If ``a`` is not a 64-bit integer array.

    Example:
      >>> import numpy as np
      >>> halves_from_int64(np.array([-1, 4294967299], np.int64)).tolist()
      [[4294967295, 4294967295], [3, 1]]
    """
    a = np.asarray(a)
    if not (np.issubdtype(a.dtype, np.integer) and a.dtype.itemsize == 8):
        raise TypeError(
            f"`a` must be an int64 or uint64 array, got dtype {a.dtype}."
        )
    a = a.reshape(-1)
    if _LITTLE and a.dtype.isnative and a.flags.c_contiguous:
        return a.view(np.uint32).reshape(-1, 2)
    u = a.astype(np.uint64)  # two's complement reinterpretation
    lo = (u & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    hi = (u >> np.uint64(32)).astype(np.uint32)
    return np.stack([lo, hi], axis=1)
