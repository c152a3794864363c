"""Lossless entropy coding of integer codes: interleaved rANS in NumPy.

Fixed-rate codes spend ``bits`` bits on every value; the codes of a quantised Gaussian weight are
far from uniform (4-bit Lloyd-Max levels carry about 3.77 bits of information), so coding them
at their empirical entropy saves the rest. This module is the coder: :func:`encode` turns an
array of symbols ``0 <= s < 2**bits`` into a self-describing byte string, :func:`decode` gives the
same symbols back, bit for bit; :func:`encode_words` / :func:`decode_words` do the same for a
dense bit stream of packed codes (:func:`distq.bitpack.pack`'s layout). Pure NumPy: no JAX, no
compilation, so a checkpoint writer can run it on every leaf of any shape.

**The coder** is range asymmetric numeral systems (rANS, Duda 2013) with a 32-bit state and
16-bit renormalisation, as in Giesen's ``rans_word`` (2014). A symbol ``s`` of quantised
frequency ``f_s`` (frequencies sum to ``M = 2**n``, cumulative ``c_s``) moves the state ``x`` to

    C(s, x) = floor(x / f_s) * M + (x mod f_s) + c_s          (Duda 2013, eq. 9)

which grows ``x`` by ``log2(M / f_s)`` bits, the symbol's information content; the decoder reads
``s`` from ``x mod M`` and inverts the step. The state is kept in ``[L, 2**16 L)``, ``L = 2**16``,
by moving its low 16 bits to the output before an encoding step would leave that range, so each
symbol costs at most one 16-bit word of I/O.

**Interleaving.** One rANS state decodes one symbol at a time; a loop over every symbol in
Python would crawl. Symbol ``i`` is given to lane ``i mod lanes`` instead, and all lanes advance
together: NumPy runs one vector operation per *step* (``count / lanes`` steps), never one per
symbol. Each lane is an independent coder; their 16-bit words are interleaved in one stream in
the order the decoder needs them (at each step, the lanes that renormalise read one word each,
in lane order, exactly where the encoder wrote them), so no per-lane lengths are stored. The
flush costs 4 bytes per lane, so the lane count grows with the input (at most one lane per
4,096 symbols, at most 16,384 lanes).

**Frequencies** are counted per tensor and scaled to ``M = 2**n`` (``n`` from 12 for up to 32
distinct symbols to 15 for 256 or more) with every symbol that occurs keeping at least 1; the
table (``uint16``, up to the largest symbol) is stored in the output. The cost above the
empirical entropy ``H`` is the Kullback-Leibler divergence of the scaled table and the rANS
approximation (together ~1e-3 bit per symbol for 4-bit Gaussian codes), and a fixed ~30 bytes
of header plus 4 bytes per lane.

**Corrupt input.** :func:`decode` validates everything it reads: the header, the table (it must
sum to ``M``), the initial states (within ``[L, 2**32)``), that every word the lanes need exists,
and at the end that the whole stream was consumed and every lane came back to its starting
state ``L``, which a damaged stream almost never does. Anything else raises ``ValueError``; it
never reads out of bounds and never allocates more than the ``count`` the caller expects.

Format (little-endian): ``b"rANS"``, version ``u8`` (1), ``n`` ``u8``, ``bits`` ``u8``, ``u8`` 0,
count ``u64``, lanes ``u32``, table length ``K`` ``u32``, ``K`` frequencies ``u16`` (padded to 4
bytes), ``lanes`` initial decoder states ``u32``, then the interleaved ``u16`` words.

References:
  J. Duda, "Asymmetric numeral systems: entropy coding combining speed of Huffman coding with
  compression rate of arithmetic coding", arXiv:1311.2540 (2013), section 3 (rANS).
  F. Giesen, "Interleaved entropy coders", arXiv:1402.3392 (2014): interleaving lanes in one
  stream, 16-bit renormalisation.

Examples:
  >>> import numpy as np
  >>> from distq.core import entropy
  >>> rng = np.random.default_rng(0)
  >>> codes = rng.choice(16, size=100_000, p=np.r_[[0.2] * 3, [0.4 / 13] * 13])
  >>> blob = entropy.encode(codes, bits=4)
  >>> h = entropy.empirical_entropy(codes)  # bits per symbol
  >>> round(h, 3), round(8 * len(blob) / codes.size, 3)  # within 1 % of the entropy
  (3.401, 3.411)
  >>> bool((entropy.decode(blob, codes.size, bits=4) == codes).all())
  True
  >>> entropy.decode(blob[:-2], codes.size, bits=4)
  Traceback (most recent call last):
    ...
  ValueError: corrupt rANS stream: it ends early (lane words missing at step ...)
"""

from __future__ import annotations

import math
import struct

import numpy as np

__all__ = ["encode", "decode", "encode_words", "decode_words", "empirical_entropy",
           "symbols_from_words", "words_from_symbols", "iter_codes", "coded_size_bound"]

MAGIC = b"rANS"
VERSION = 1
_HEADER = struct.Struct("<4sBBBBQII")  # magic, version, n, bits, 0, count, lanes, K
_L_BITS = 16  # the state lives in [L, L << 16): L = 2**16, 32-bit states, 16-bit words
_L = 1 << _L_BITS
_MIN_PROB_BITS, _MAX_PROB_BITS = 12, 15  # 2**15 fits a uint16 frequency (single symbol: f = M)
_SYMBOLS_PER_LANE = 4096  # at most one lane per this many symbols (4 flush bytes per lane)
_MAX_LANES = 16384
_CHUNK_WORDS = 1 << 20  # words unpacked/packed at once (bounded temporaries)


def _check_bits(bits, hi: int = 16) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= hi:
        raise ValueError(f"bits must be an int in 1..{hi}, got {bits!r}")
    return int(bits)


def _check_count(count) -> int:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    return int(count)


def empirical_entropy(symbols) -> float:
    """The empirical (order-0) entropy of ``symbols`` in bits per symbol: ``-sum p log2 p`` over
    the observed frequencies ``p`` (0 for an empty or constant array).

    Examples:
      >>> empirical_entropy([0, 1, 2, 3]), empirical_entropy([5, 5, 5]), empirical_entropy([])
      (2.0, 0.0, 0.0)
    """
    s = np.asarray(symbols).reshape(-1)
    if s.size == 0:
        return 0.0
    if not np.issubdtype(s.dtype, np.integer) or int(s.min()) < 0:
        raise ValueError("symbols must be non-negative integers")
    counts = _counts(s, int(s.max()) + 1)
    p = counts[counts > 0] / s.size
    return float(-(p * np.log2(p)).sum()) + 0.0  # never -0.0


def _counts(s: np.ndarray, length: int) -> np.ndarray:
    """``np.bincount`` in chunks (it would otherwise copy the symbols as int64)."""
    counts = np.zeros(length, np.int64)
    for i in range(0, s.size, _CHUNK_WORDS):
        counts += np.bincount(s[i:i + _CHUNK_WORDS], minlength=length)[:length]
    return counts


def _lanes_for(count: int) -> int:
    return max(1, min(_MAX_LANES, count // _SYMBOLS_PER_LANE))


def _scaled_frequencies(counts: np.ndarray, n: int) -> np.ndarray:
    """Integer frequencies summing to ``2**n``, proportional to ``counts``, >= 1 where a symbol
    occurs (largest-remainder rounding, then any excess taken from the largest ones)."""
    m = 1 << n
    total = int(counts.sum())
    exact = counts.astype(np.float64) * (m / total)
    f = np.floor(exact).astype(np.int64)
    f[(counts > 0) & (f == 0)] = 1
    diff = m - int(f.sum())
    if diff > 0:  # hand the rest out by largest remainder (only to symbols that occur)
        rem = np.where(counts > 0, exact - np.floor(exact), -1.0)
        f[np.argsort(-rem, kind="stable")[:diff]] += 1
    while diff < 0:  # rare symbols raised to 1 overflowed M: shave the largest frequencies
        order = np.argsort(-f, kind="stable")
        take = order[:min(-diff, int((f > 1).sum()))]
        f[take] -= 1
        diff += len(take)
    return f


def _prob_bits(distinct: int) -> int | None:
    # measured: 16 symbols code best at n = 12 (a larger M costs rANS precision, as M nears
    # L), 256 skewed ones at n = 15 (small probabilities need the table's resolution)
    n = max(_MIN_PROB_BITS, math.ceil(math.log2(max(distinct, 1))) + 7)
    n = min(n, _MAX_PROB_BITS)
    return n if distinct <= (1 << n) else None


def coded_size_bound(count: int, entropy_bits: float, table_len: int) -> int:
    """An upper estimate of :func:`encode`'s output bytes for ``count`` symbols of empirical
    entropy ``entropy_bits``: the entropy plus 1 %, the table, the states and the header."""
    lanes = _lanes_for(count) if count else 0
    return (math.ceil(count * entropy_bits * 1.01 / 8) + 2 * table_len + 4 * lanes + 64)


def encode(symbols, bits: int, *, lanes: int | None = None) -> bytes:
    """Entropy-codes integer symbols ``0 <= s < 2**bits`` with interleaved rANS.

    Args:
      symbols: integer array (any shape; read in C order), values in ``[0, 2**bits)``.
      bits: the symbols' width, 1..16 (recorded, and checked again by :func:`decode`).
      lanes: number of interleaved coders (default: one per 4,096 symbols, 1..16,384).

    Returns:
      The coded bytes (see the module docstring for the format).

    Raises:
      ValueError: a symbol out of range, a bad ``bits`` or ``lanes``, or more distinct symbols
        than a 15-bit frequency table holds (over 32,768: such codes are near-uniform anyway).

    Examples:
      >>> import numpy as np
      >>> blob = encode(np.zeros(10_000, np.uint8), bits=4)  # one symbol: no stream at all
      >>> len(blob), int(decode(blob, 10_000, bits=4).max())
      (36, 0)
    """
    bits = _check_bits(bits)
    s = np.asarray(symbols)
    if s.size and not np.issubdtype(s.dtype, np.integer):
        raise ValueError(f"symbols must be integers, got dtype {s.dtype}")
    s = s.reshape(-1)
    count = int(s.size)
    if count == 0:
        return _HEADER.pack(MAGIC, VERSION, _MIN_PROB_BITS, bits, 0, 0, 0, 0)
    lo, hi = int(s.min()), int(s.max())
    if lo < 0 or hi >= 1 << bits:
        raise ValueError(f"symbols must lie in [0, 2**{bits}), got values in [{lo}, {hi}]")
    if lanes is None:
        lanes = _lanes_for(count)
    if isinstance(lanes, bool) or not isinstance(lanes, (int, np.integer)) or not (
            1 <= lanes <= min(count, 1 << 20)):
        raise ValueError(f"lanes must be an int in 1..min(count, 2**20), got {lanes!r}")
    lanes = int(lanes)
    counts = _counts(s, hi + 1)
    n = _prob_bits(int((counts > 0).sum()))
    if n is None:
        raise ValueError(f"{int((counts > 0).sum())} distinct symbols exceed the "
                         f"{1 << _MAX_PROB_BITS} a rANS frequency table holds")
    freq = _scaled_frequencies(counts, n)
    full, rest = divmod(count, lanes)
    steps = full + (rest > 0)
    main = s[:full * lanes].reshape(full, lanes)
    if rest:  # the last step is padded with the most probable (cheapest) symbol; decode drops it
        last = np.full(lanes, int(np.argmax(freq)), s.dtype)
        last[:rest] = s[full * lanes:]
    # The encoder's state lives in float64: every value is an integer below 2**48, so each
    # operation is exact, and floor(x / f) is exact too (x < 2**32, f < 2**15: the rounding
    # error of the division is below 2**-21, the distance of a non-integer quotient from the
    # next integer at least 1 / f), while a vector float division is several times faster
    # than an integer one.
    f_tab = freq.astype(np.float64)
    c_tab = np.concatenate([[0], np.cumsum(freq)[:-1]]).astype(np.float64)
    xmax_tab = f_tab * float(1 << (32 - n))  # ((L >> n) << 16) * f: renormalise at or above
    big_m, word = float(1 << n), float(1 << 16)
    x = np.full(lanes, float(_L))
    chunks: list[np.ndarray] = []
    for t in range(steps - 1, -1, -1):
        row = main[t] if t < full else last
        out = x >= xmax_tab.take(row)
        if out.any():  # move the low 16 bits of these lanes' states to the stream
            idx = np.flatnonzero(out)
            xi = x.take(idx)
            hi = np.floor(xi * (1.0 / word))
            chunks.append((xi - hi * word).astype(np.uint16))
            x[idx] = hi
        f = f_tab.take(row)
        q = np.floor(x / f)
        x = q * big_m + (x - q * f) + c_tab.take(row)
    stream = np.concatenate(chunks[::-1]) if chunks else np.zeros(0, np.uint16)
    table = freq.astype("<u2").tobytes()
    table += b"\0" * (-len(table) % 4)
    return b"".join([_HEADER.pack(MAGIC, VERSION, n, bits, 0, count, lanes, len(freq)), table,
                     x.astype("<u4").tobytes(), stream.astype("<u2", copy=False).tobytes()])


def _corrupt(what: str) -> ValueError:
    return ValueError(f"corrupt rANS stream: {what}")


def decode(data, count: int, bits: int) -> np.ndarray:
    """Decodes :func:`encode`'s output back to its ``count`` symbols (validating everything).

    Args:
      data: the coded bytes (``bytes``, ``memoryview`` or a ``uint8`` array).
      count: the number of symbols the caller expects (refused if the data says otherwise, so a
        corrupt header cannot make it allocate more).
      bits: the symbols' width the caller expects.

    Returns:
      The symbols, 1-D, ``uint8`` for ``bits <= 8`` else ``uint16``.

    Raises:
      ValueError: the data is corrupt, truncated, or was made for another count or width.
    """
    bits, count = _check_bits(bits), _check_count(count)
    buf = np.frombuffer(memoryview(data).cast("B"), np.uint8)
    if buf.size < _HEADER.size:
        raise _corrupt(f"{buf.size} bytes is shorter than its {_HEADER.size}-byte header")
    magic, version, n, b, zero, n_sym, lanes, k = _HEADER.unpack_from(buf)
    if magic != MAGIC or version != VERSION or zero != 0:
        raise _corrupt("bad magic, version or header")
    if b != bits or n_sym != count:
        raise _corrupt(f"it holds {n_sym} symbols of {b} bits, expected {count} of {bits}")
    dtype = np.uint8 if bits <= 8 else np.uint16
    if count == 0:
        if lanes or k or buf.size != _HEADER.size:
            raise _corrupt("an empty stream with lanes, a table or data")
        return np.zeros(0, dtype)
    if not (_MIN_PROB_BITS <= n <= _MAX_PROB_BITS and 1 <= lanes <= min(count, 1 << 20)
            and 1 <= k <= 1 << bits):
        raise _corrupt(f"bad parameters (n={n}, lanes={lanes}, table length {k})")
    pos = _HEADER.size
    tbytes = 2 * k + (-2 * k % 4)
    if buf.size < pos + tbytes + 4 * lanes or (buf.size - pos - tbytes - 4 * lanes) % 2:
        raise _corrupt(f"{buf.size} bytes cannot hold its table, {lanes} states and whole "
                       "16-bit words")
    freq = buf[pos:pos + 2 * k].view("<u2").astype(np.int64)
    pos += tbytes
    m = 1 << n
    if int(freq.sum()) != m:
        raise _corrupt(f"the frequency table sums to {int(freq.sum())}, not {m}")
    x = buf[pos:pos + 4 * lanes].view("<u4").astype(np.uint64)
    pos += 4 * lanes
    stream = buf[pos:].view("<u2")
    if (x < _L).any():
        raise _corrupt("an initial state is below the coder's range")
    sym_of_slot = np.repeat(np.arange(k, dtype=dtype), freq)  # slot -> symbol, M entries
    f_tab = freq.astype(np.uint64)
    c_tab = np.concatenate([[0], np.cumsum(freq)[:-1]]).astype(np.uint64)
    steps = -(-count // lanes)
    out = np.empty((steps, lanes), dtype)
    mask_m, shift_n, shift16 = np.uint64(m - 1), np.uint64(n), np.uint64(16)
    lim = np.uint64(_L)
    p, total = 0, stream.size
    for t in range(steps):
        slot = x & mask_m
        s = sym_of_slot.take(slot)
        out[t] = s
        x = f_tab.take(s) * (x >> shift_n) + slot - c_tab.take(s)
        need = x < lim
        k_need = int(np.count_nonzero(need))
        if k_need:  # these lanes read their next word
            if p + k_need > total:
                raise _corrupt(f"it ends early (lane words missing at step {t} of {steps})")
            idx = np.flatnonzero(need)
            x[idx] = (x.take(idx) << shift16) | stream[p:p + k_need]
            p += k_need
    if p != total:
        raise _corrupt(f"{total - p} words are left over after the last symbol")
    if (x != lim).any():
        raise _corrupt("a lane did not return to its initial state (damaged data)")
    return out.reshape(-1)[:count]


# ------------------------------------------------------------------------- packed bit streams
def _period(bits: int) -> tuple[int, int]:
    g = math.gcd(bits, 32)
    return 32 // g, bits // g  # P codes fill Q words exactly


def symbols_from_words(words, bits: int, count: int) -> np.ndarray:
    """The first ``count`` codes of a dense ``bits``-wide stream in ``uint32`` words
    (:func:`distq.bitpack.pack`'s layout: code ``i`` at stream bits ``[i*bits, (i+1)*bits)``,
    stream bit ``b`` is bit ``b % 32`` of word ``b // 32``), in NumPy.

    Returns ``uint8`` codes for ``bits <= 8``, else ``uint16``.

    Examples:
      >>> import numpy as np
      >>> w = words_from_symbols(np.arange(10) % 8, bits=3)
      >>> w.shape, symbols_from_words(w, 3, 10).tolist()
      ((1,), [0, 1, 2, 3, 4, 5, 6, 7, 0, 1])
    """
    out = np.empty(_check_count(count), np.uint8 if _check_bits(bits) <= 8 else np.uint16)
    pos = 0
    for chunk in iter_codes(words, bits, count):
        out[pos:pos + chunk.size] = chunk
        pos += chunk.size
    return out


def iter_codes(words, bits: int, count: int, chunk: int = _CHUNK_WORDS):
    """The first ``count`` codes of a dense ``bits``-wide stream (as
    :func:`symbols_from_words`; any width 1..32), in order, in arrays of about ``chunk`` codes:
    bounded memory for any stream.

    Examples:
      >>> import numpy as np
      >>> w = words_from_symbols(np.arange(100) % 32, bits=5)
      >>> [int(c.max()) for c in iter_codes(w, 5, 100, chunk=40)]
      [31, 31, 31, 3]
    """
    bits, count = _check_bits(bits, 32), _check_count(count)
    w = np.ascontiguousarray(words, dtype=np.uint32).reshape(-1)
    if count * bits > 32 * w.size:
        raise ValueError(f"{w.size} words hold fewer than {count} codes of {bits} bits")
    dtype = np.uint8 if bits <= 8 else np.uint16 if bits <= 16 else np.uint32
    per, q = _period(bits)
    full, rest = divmod(count, per)
    rows = w[:full * q].reshape(full, q)
    step = max(1, chunk // per)
    for r0 in range(0, full, step):
        out = np.empty((min(step, full - r0), per), dtype)
        _unpack_periods(rows[r0:r0 + step], bits, out)
        yield out.reshape(-1)
    if rest:  # a partial last period: from a zero-padded copy of its (< 32) words
        tail = np.zeros((1, q), np.uint32)
        got = w[full * q:full * q + q]
        tail[0, :got.size] = got
        one = np.empty((1, per), dtype)
        _unpack_periods(tail, bits, one)
        yield one[0, :rest]


def _unpack_periods(rows: np.ndarray, bits: int, out: np.ndarray) -> None:
    """Codes of whole periods: ``rows`` ``(G, Q)`` words -> ``out`` ``(G, P)`` codes."""
    per, _ = _period(bits)
    mask = np.uint32((1 << bits) - 1)
    for j in range(per):
        wi, sh = divmod(j * bits, 32)
        v = rows[:, wi] >> np.uint32(sh)
        if sh + bits > 32:
            v = v | (rows[:, wi + 1] << np.uint32(32 - sh))
        out[:, j] = v & mask


def _pack_periods(rows: np.ndarray, bits: int, out: np.ndarray) -> None:
    per, q = _period(bits)
    step = max(1, _CHUNK_WORDS // q)
    for r0 in range(0, rows.shape[0], step):
        blk = rows[r0:r0 + step]
        o = out[r0:r0 + step]
        for j in range(per):
            wi, sh = divmod(j * bits, 32)
            v = blk[:, j].astype(np.uint32)
            o[:, wi] |= v << np.uint32(sh)
            if sh + bits > 32:
                o[:, wi + 1] |= v >> np.uint32(32 - sh)


def words_from_symbols(symbols, bits: int) -> np.ndarray:
    """Packs codes ``0 <= s < 2**bits`` into a dense stream of ``ceil(n * bits / 32)`` ``uint32``
    words (the inverse of :func:`symbols_from_words`; :func:`distq.bitpack.pack`'s layout)."""
    bits = _check_bits(bits)
    s = np.asarray(symbols).reshape(-1)
    count = s.size
    per, q = _period(bits)
    full, rest = divmod(count, per)
    out = np.zeros(-(-count * bits // 32), np.uint32)
    _pack_periods(s[:full * per].reshape(full, per), bits, out[:full * q].reshape(full, q))
    if rest:
        one = np.zeros((1, per), s.dtype)
        one[0, :rest] = s[full * per:]
        tail = np.zeros((1, q), np.uint32)
        _pack_periods(one, bits, tail)
        out[full * q:] = tail[0, :out.size - full * q]
    return out


def encode_words(words, bits: int, *, lanes: int | None = None,
                 max_bytes: int | None = None) -> bytes | None:
    """Entropy-codes a ``uint32`` array read as a dense stream of ``bits``-wide codes.

    Every bit of ``words`` is kept: the stream's ``floor(32 * words.size / bits)`` codes are
    coded with :func:`encode`, and the fewer than ``bits`` bits left at the end of the last word
    (zero in :func:`distq.bitpack.pack`'s output, but not assumed to be) are stored beside them,
    so :func:`decode_words` restores any ``uint32`` array exactly, whatever its content.

    Args:
      words: a ``uint32`` array (any shape; read in C order).
      bits: the codes' width, 1..16.
      lanes: as in :func:`encode`.
      max_bytes: return ``None`` instead of output longer than this (checked first on the
        entropy of the codes, so near-uniform codes cost one pass over them, not a coding).

    Returns:
      The coded bytes, or ``None`` (see ``max_bytes``).

    Examples:
      >>> import numpy as np
      >>> from distq.core import bitpack
      >>> codes = np.random.default_rng(1).binomial(7, 0.5, size=50_001)  # 3-bit codes
      >>> words = np.asarray(bitpack.pack(codes, bits=3))
      >>> blob = encode_words(words, bits=3)
      >>> round(8 * len(blob) / codes.size, 2), round(empirical_entropy(codes), 2)
      (2.46, 2.45)
      >>> bool((decode_words(blob, words.size, bits=3) == words).all())
      True
    """
    bits = _check_bits(bits)
    w = np.ascontiguousarray(words)
    if w.dtype != np.uint32:
        raise ValueError(f"words must be uint32, got {w.dtype}")
    w = w.reshape(-1)
    count = 32 * w.size // bits
    tail_bits = 32 * w.size - count * bits
    tail = int(w[-1]) >> (32 - tail_bits) if tail_bits else 0
    symbols = symbols_from_words(w, bits, count)
    if max_bytes is not None and count:
        counts = _counts(symbols, 1 << bits)
        p = counts[counts > 0] / count
        h = float(-(p * np.log2(p)).sum())
        if coded_size_bound(count, h, int(np.flatnonzero(counts)[-1]) + 1) + 4 > max_bytes:
            return None
    blob = struct.pack("<I", tail) + encode(symbols, bits, lanes=lanes)
    return None if max_bytes is not None and len(blob) > max_bytes else blob


def decode_words(data, nwords: int, bits: int) -> np.ndarray:
    """The ``nwords`` ``uint32`` words that :func:`encode_words` coded (validated, exact).

    Raises:
      ValueError: corrupt data, or data made for another size or width.
    """
    bits, nwords = _check_bits(bits), _check_count(nwords)
    mv = memoryview(data).cast("B")
    if len(mv) < 4:
        raise _corrupt("no room for the tail bits")
    (tail,) = struct.unpack_from("<I", mv)
    count = 32 * nwords // bits
    tail_bits = 32 * nwords - count * bits
    if tail >> tail_bits if tail_bits else tail:
        raise _corrupt(f"tail value {tail} does not fit its {tail_bits} bits")
    w = words_from_symbols(decode(mv[4:], count, bits), bits)  # exactly nwords words
    if tail_bits:
        w[-1] |= np.uint32(tail << (32 - tail_bits))
    return w
