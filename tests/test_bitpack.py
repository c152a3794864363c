"""Tests for distq.bitpack (dense uint32 stream and distquant int64 layout)."""

from __future__ import annotations

import doctest
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distq.core import bitpack
from distq.core.bitpack import (
    halves_from_int64,
    int64_from_halves,
    int64_nwords,
    pack,
    pack_int64_halves,
    packed_nbytes,
    packed_nwords,
    unpack,
    unpack_int64_halves,
)

# Every new (length, bits) pair costs one XLA compilation (~0.1 s), so the
# property tests use a moderate number of examples.
PROPERTY = settings(max_examples=12, deadline=None)


# --------------------------------------------------------------------------
# independent references
# --------------------------------------------------------------------------


def ref_stream_words(codes, bits: int) -> np.ndarray:
    """Dense little-endian stream via one Python big integer."""
    stream = 0
    for i, c in enumerate(int(c) for c in codes):
        stream |= c << (i * bits)
    nwords = -(-len(codes) * bits // 32)
    return np.array(
        [(stream >> (32 * k)) & 0xFFFFFFFF for k in range(nwords)], np.uint32
    )


def ref_stream_words_np(codes: np.ndarray, bits: int) -> np.ndarray:
    """Dense little-endian stream via np.packbits on the bit matrix."""
    codes = np.asarray(codes, np.int64)
    bit_matrix = (codes[:, None] >> np.arange(bits)) & 1  # LSB first
    stream = bit_matrix.astype(np.uint8).reshape(-1)
    nwords = -(-stream.size // 32)
    padded = np.zeros(nwords * 32, np.uint8)
    padded[: stream.size] = stream
    return np.packbits(padded, bitorder="little").view("<u4").astype(np.uint32)


def ref_distquant_int64(codes, bits: int) -> np.ndarray:
    """distquant layout: first code in the most significant field."""
    per = 64 // bits
    codes = [int(c) for c in codes]
    codes += [0] * (-len(codes) % per)
    out = []
    for w in range(len(codes) // per):
        v = 0
        for c in codes[w * per : (w + 1) * per]:
            v = (v << bits) | c
        out.append(v - (1 << 64) if v >= 1 << 63 else v)  # two's complement
    return np.array(out, np.int64)


def assert_equal(actual, expected) -> None:
    np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))


def random_codes(rng: np.random.Generator, n: int, bits: int, dtype=None):
    dtype = dtype or (np.uint8 if bits <= 8 else np.uint16)
    return rng.integers(0, 2**bits, size=n).astype(dtype)


@st.composite
def bits_and_codes(draw, max_len: int = 300):
    bits = draw(st.integers(1, 16))
    n = draw(st.integers(0, max_len))
    seed = draw(st.integers(0, 2**32 - 1))
    dtypes = [np.uint16, np.int32] + ([np.uint8] if bits <= 8 else [])
    dtype = draw(st.sampled_from(dtypes))
    return bits, random_codes(np.random.default_rng(seed), n, bits, dtype)


# --------------------------------------------------------------------------
# dense stream
# --------------------------------------------------------------------------


@PROPERTY
@given(bits_and_codes())
def test_pack_matches_reference_and_round_trips(case):
    bits, codes = case
    n = codes.size
    words = pack(codes, bits)
    assert words.dtype == jnp.uint32
    assert words.shape == (math.ceil(n * bits / 32),)
    assert words.shape == (packed_nwords(n, bits),)
    assert words.nbytes == packed_nbytes(n, bits)
    assert_equal(words, ref_stream_words(codes, bits))
    assert_equal(words, ref_stream_words_np(codes, bits))

    back = unpack(words, bits, n)
    assert back.dtype == (jnp.uint8 if bits <= 8 else jnp.uint16)
    assert back.shape == (n,)
    assert_equal(back, codes)


@pytest.mark.parametrize("bits", [3])
def test_long_ragged_input_split_path(bits):
    # Enough whole groups to take the split/copy-join path, plus a ragged tail.
    group = 32 // math.gcd(bits, 32)
    n = (bitpack._SPLIT_MIN_BLOCKS + 5) * group + 3
    codes = random_codes(np.random.default_rng(bits), n, bits)
    words = pack(codes, bits)
    assert_equal(words, ref_stream_words_np(codes, bits))
    assert_equal(unpack(words, bits, n), codes)


@pytest.mark.parametrize("bits", [16])
def test_long_ragged_input_split_path_int64(bits):
    n = (bitpack._SPLIT_MIN_BLOCKS + 5) * (64 // bits) + 1
    codes = random_codes(np.random.default_rng(bits), n, bits)
    halves = pack_int64_halves(codes, bits)
    assert_equal(int64_from_halves(halves), ref_distquant_int64(codes, bits))
    assert_equal(unpack_int64_halves(halves, bits, n), codes)


def test_references_agree():
    rng = np.random.default_rng(0)
    for bits in (1, 5, 16):
        codes = random_codes(rng, 77, bits)
        assert_equal(ref_stream_words(codes, bits), ref_stream_words_np(codes, bits))


def test_small_known_values():
    assert int(pack(np.array([1, 2, 3], np.uint8), 4)[0]) == 0x321
    # 3-bit codes straddle the word boundary: code 10 occupies bits 30..32.
    codes = np.zeros(11, np.uint8)
    codes[10] = 0b111
    words = np.asarray(pack(codes, 3))
    assert_equal(words, [0b11 << 30, 0b1])


def test_last_word_unused_bits_are_zero():
    words = np.asarray(pack(np.full(5, 7, np.uint8), 3))  # 15 of 32 bits used
    assert words.tolist() == [(1 << 15) - 1]


def test_multidimensional_input_is_flattened_in_c_order():
    codes = random_codes(np.random.default_rng(1), 120, 5).reshape(4, 5, 6)
    assert_equal(pack(codes, 5), pack(codes.reshape(-1), 5))


def test_out_of_range_values_are_masked():
    assert_equal(pack(np.array([17, 2], np.int32), 4), pack(np.array([1, 2]), 4))
    assert int(pack(np.array([-1], np.int32), 3)[0]) == 0b111


def test_unpack_dtype_and_extra_words():
    codes = random_codes(np.random.default_rng(2), 50, 6)
    extra = np.full(3, 0xFFFFFFFF, np.uint32)
    words = np.concatenate([np.asarray(pack(codes, 6)), extra])
    out = unpack(words, 6, 50, dtype=jnp.int32)
    assert out.dtype == jnp.int32
    assert_equal(out, codes)
    assert_equal(unpack(words, 6, 20), codes[:20])
    # int32 words (e.g. a bit-cast) are read as uint32.
    as_int32 = np.asarray(pack(codes, 6)).view(np.int32)
    assert_equal(unpack(as_int32, 6, 50), codes)


@pytest.mark.parametrize("bits", [1, 7, 16])
def test_empty_input(bits):
    words = pack(np.zeros((0,), np.uint8), bits)
    assert words.shape == (0,) and words.dtype == jnp.uint32
    assert unpack(words, bits, 0).shape == (0,)
    halves = pack_int64_halves(np.zeros((0, 3), np.int32), bits)
    assert halves.shape == (0, 2) and halves.dtype == jnp.uint32
    assert unpack_int64_halves(halves, bits, 0).shape == (0,)
    assert int64_from_halves(halves).shape == (0,)
    assert packed_nbytes(0, bits) == 0


def test_size_helpers():
    assert packed_nbytes(1000, 4) == 500
    assert packed_nbytes(3, 5) == 4
    assert packed_nbytes(33, 1) == 8
    assert packed_nwords(10, 3) == 1 and packed_nwords(11, 3) == 2
    assert int64_nwords(21, 3) == 1 and int64_nwords(22, 3) == 2


# --------------------------------------------------------------------------
# distquant int64 layout
# --------------------------------------------------------------------------


@PROPERTY
@given(bits_and_codes())
def test_int64_layout_matches_reference_and_round_trips(case):
    bits, codes = case
    n = codes.size
    halves = pack_int64_halves(codes, bits)
    assert halves.dtype == jnp.uint32
    assert halves.shape == (math.ceil(n / (64 // bits)), 2)
    ref = ref_distquant_int64(codes, bits)
    assert_equal(int64_from_halves(halves), ref)
    assert_equal(halves, halves_from_int64(ref))
    assert_equal(unpack_int64_halves(halves, bits, n), codes)


def test_int64_host_helpers():
    halves = pack_int64_halves(np.arange(40) % 8, 3)
    host = np.asarray(halves)
    as_int64 = int64_from_halves(host)
    assert as_int64.dtype == np.int64
    assert np.shares_memory(as_int64, host)  # zero-copy view
    assert_equal(as_int64, host.view(np.int64).reshape(-1))
    # Non-contiguous input takes the arithmetic path, same values.
    strided = np.repeat(host, 2, axis=0)[::2]
    assert_equal(int64_from_halves(strided), as_int64)
    back = halves_from_int64(as_int64)
    assert back.dtype == np.uint32 and back.shape == host.shape
    assert_equal(back, host)
    assert_equal(
        halves_from_int64(np.array([-1, 2**32 + 3], np.int64)),
        [[0xFFFFFFFF, 0xFFFFFFFF], [3, 1]],
    )
    # Flat halves (e.g. int64 data viewed as uint32) are accepted for unpacking.
    flat = as_int64.view(np.uint32)
    assert_equal(unpack_int64_halves(flat, 3, 40), np.arange(40) % 8)


def test_int64_top_field_sets_sign_bit():
    # bits=1: code 0 sits in bit 63; bits=16: code 0 fills bits 48..63.
    assert int64_from_halves(pack_int64_halves(np.array([1]), 1))[0] == -(2**63)
    value = int64_from_halves(pack_int64_halves(np.array([0xFFFF, 0, 0, 1]), 16))[0]
    assert value == np.int64(-(2**48) + 1)


@pytest.mark.parametrize("bits", [1, 3, 13, 16])
def test_matches_torch_distquant_packing(bits):
    torch = pytest.importorskip("torch")
    pytest.importorskip("distquant")
    rng = np.random.default_rng(bits)
    n = 1000 + bits  # ragged: exercises the zero padding of the last word
    codes = rng.integers(0, 2**bits, n)
    # The packing loop of distquant.quantize(..., packbits=True).
    per = 64 // bits
    q = torch.tensor(codes, dtype=torch.int64)
    q = torch.cat([q, torch.zeros(-n % per, dtype=torch.int64)]).reshape(-1, per)
    packed = torch.zeros(q.shape[0], dtype=torch.int64)
    for i in range(per):
        packed <<= bits
        packed |= q[:, i]
    expected = packed.numpy()

    halves = pack_int64_halves(codes.astype(np.int32), bits)
    assert_equal(int64_from_halves(halves), expected)
    assert_equal(unpack_int64_halves(halves_from_int64(expected), bits, n), codes)


@pytest.mark.parametrize("bits", [3, 8])
def test_matches_real_distquant_quantize(bits):
    torch = pytest.importorskip("torch")
    distquant = pytest.importorskip("distquant")
    data = torch.randn(999, generator=torch.Generator().manual_seed(bits))
    kwargs = dict(k=bits, dist="gaussian", beta=1.0)
    codes, _ = distquant.quantize(data, packbits=False, **kwargs)
    packed, info = distquant.quantize(data, packbits=True, **kwargs)
    codes = codes.numpy().reshape(-1)

    halves = pack_int64_halves(codes.astype(np.int32), bits)
    assert_equal(int64_from_halves(halves), packed.numpy())
    ours = unpack_int64_halves(halves_from_int64(packed.numpy()), bits, codes.size)
    assert_equal(ours, codes)
    # And distquant can decode what we packed.
    ours_packed = torch.from_numpy(int64_from_halves(halves).copy())
    decoded_ours = distquant.dequantize(ours_packed, **info)  # works in place
    decoded_theirs = distquant.dequantize(packed.clone(), **info)
    assert torch.equal(decoded_ours, decoded_theirs)


# --------------------------------------------------------------------------
# jit / vmap / tracing
# --------------------------------------------------------------------------


@pytest.mark.parametrize("bits,n", [(4, 64), (13, 37)])
def test_jit_matches_eager(bits, n):
    codes = random_codes(np.random.default_rng(n), n, bits)
    words = pack(codes, bits)
    halves = pack_int64_halves(codes, bits)
    jit_pack = jax.jit(pack, static_argnums=1)
    jit_unpack = jax.jit(unpack, static_argnums=(1, 2))
    assert_equal(jit_pack(codes, bits), words)
    assert_equal(jit_unpack(words, bits, n), codes)
    jit_pack64 = jax.jit(lambda c: pack_int64_halves(c, bits))
    jit_unpack64 = jax.jit(lambda h: unpack_int64_halves(h, bits, n))
    assert_equal(jit_pack64(codes), halves)
    assert_equal(jit_unpack64(halves), codes)


@pytest.mark.parametrize("bits,n", [(3, 70), (11, 0)])
def test_vmap_packs_each_row(bits, n):
    batch = random_codes(np.random.default_rng(bits), 4 * n, bits).reshape(4, n)
    words = jax.vmap(lambda row: pack(row, bits))(batch)
    halves = jax.vmap(lambda row: pack_int64_halves(row, bits))(batch)
    assert words.shape == (4, packed_nwords(n, bits))
    for row, w, h in zip(batch, words, halves):
        assert_equal(w, pack(row, bits))
        assert_equal(h, pack_int64_halves(row, bits))
    back = jax.jit(jax.vmap(lambda w: unpack(w, bits, n)))(words)
    assert_equal(back, batch)
    back64 = jax.vmap(lambda h: unpack_int64_halves(h, bits, n))(halves)
    assert_equal(back64, batch)


def test_vmap_multidimensional_rows():
    batch = random_codes(np.random.default_rng(3), 3 * 24, 5).reshape(3, 4, 6)
    words = jax.vmap(lambda row: pack(row, 5))(batch)
    for row, w in zip(batch, words):
        assert_equal(w, pack(row.reshape(-1), 5))


def test_no_retrace_on_repeated_calls():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def roundtrip(codes):
        words = pack(codes, 5)
        halves = pack_int64_halves(codes, 5)
        return unpack(words, 5, codes.size), unpack_int64_halves(halves, 5, codes.size)

    rng = np.random.default_rng(4)
    for _ in range(3):
        codes = jnp.asarray(random_codes(rng, 200, 5))
        a, b = roundtrip(codes)
        assert_equal(a, np.asarray(codes))
        assert_equal(b, np.asarray(codes))
    chex.clear_trace_counter()


def test_public_functions_do_not_retrace_internally():
    if not hasattr(bitpack._pack_impl, "_cache_size"):
        pytest.skip("jax.jit cache introspection not available")
    codes = jnp.asarray(random_codes(np.random.default_rng(5), 96, 6))
    pack(codes, 6)
    before = bitpack._pack_impl._cache_size()
    for _ in range(3):
        pack(codes + 0, 6)
    assert bitpack._pack_impl._cache_size() == before


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------

BAD_BITS = [0, 17, -3, 4.0, True, "4", None, np.float32(4)]


@pytest.mark.parametrize("bits", BAD_BITS)
def test_bad_bits_raise_value_error(bits):
    codes = np.zeros(4, np.uint8)
    halves = np.zeros((1, 2), np.uint32)
    calls = [
        lambda: pack(codes, bits),
        lambda: unpack(np.zeros(1, np.uint32), bits, 1),
        lambda: pack_int64_halves(codes, bits),
        lambda: unpack_int64_halves(halves, bits, 1),
        lambda: packed_nbytes(4, bits),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"`bits`.*\[1, 16\]"):
            call()


def test_numpy_integer_bits_accepted():
    codes = np.arange(8) % 4
    assert_equal(pack(codes, np.int64(2)), pack(codes, 2))


@pytest.mark.parametrize(
    "codes", [np.zeros(4, np.float32), np.zeros(4, bool), [0.5, 1.5]]
)
def test_non_integer_codes_raise_type_error(codes):
    with pytest.raises(TypeError, match="`codes`"):
        pack(codes, 4)
    with pytest.raises(TypeError, match="`codes`"):
        pack_int64_halves(codes, 4)


def test_unpack_validation():
    words = pack(np.arange(10) % 8, 3)  # 30 bits in 1 word
    with pytest.raises(ValueError, match="`n`"):
        unpack(words, 3, -1)
    with pytest.raises(ValueError, match="`n`"):
        unpack(words, 3, 11)  # 33 bits > 32
    unpack(words, 3, 10)  # exactly fits
    with pytest.raises(ValueError, match="`n`"):
        unpack(words, 3, 2.0)
    with pytest.raises(TypeError, match="`words`"):
        unpack(np.zeros(1, np.float32), 3, 1)
    with pytest.raises(TypeError, match="`dtype`"):
        unpack(words, 3, 1, dtype=np.float32)


def test_unpack_int64_validation():
    halves = pack_int64_halves(np.arange(21) % 8, 3)  # 21 codes per word
    unpack_int64_halves(halves, 3, 21)
    with pytest.raises(ValueError, match="`n`"):
        unpack_int64_halves(halves, 3, 22)
    with pytest.raises(ValueError, match="`n`"):
        unpack_int64_halves(halves, 3, -1)
    with pytest.raises(ValueError, match="`halves`"):
        unpack_int64_halves(np.zeros((2, 3), np.uint32), 3, 1)
    with pytest.raises(ValueError, match="`halves`"):
        unpack_int64_halves(np.zeros(3, np.uint32), 3, 1)
    with pytest.raises(TypeError, match="`halves`"):
        unpack_int64_halves(np.zeros((1, 2), np.float32), 3, 1)


def test_host_helper_validation():
    with pytest.raises(TypeError, match="`a`"):
        halves_from_int64(np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="`halves`"):
        int64_from_halves(np.zeros((3,), np.uint32))
    with pytest.raises(TypeError, match="`halves`"):
        int64_from_halves(np.zeros((3, 2), np.float64))


def test_docstring_examples():
    result = doctest.testmod(bitpack, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
