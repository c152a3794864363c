"""Entropy coding (distq/core/entropy.py) and entropy-coded checkpoints: exact round trips on
fresh random inputs and edge cases, size against the empirical entropy, corrupt data refused,
agreement with distq.bitpack's layout, and the checkpoint / CLI integration."""

from __future__ import annotations

import dataclasses
import json
import math
import struct

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import distq
from distq import cli
from distq.checkpoint import CheckpointError
from distq.core import bitpack, entropy


def _rng():
    """A fresh generator per call (seeded from the OS): the properties hold for any input."""
    return np.random.default_rng()


def _skewed(rng, n, bits, alpha=0.3):
    """Codes of a random, strongly skewed distribution over the 2**bits symbols."""
    k = 1 << bits
    p = rng.dirichlet(np.full(min(k, 4096), alpha))
    return rng.choice(min(k, 4096), size=n, p=p) * (k // min(k, 4096))


# ------------------------------------------------------------------------ the coder
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 11, 16])
def test_round_trip_is_exact_on_random_skewed_and_uniform_codes(bits):
    rng = _rng()
    for codes in (_skewed(rng, int(rng.integers(1, 30_000)), bits),
                  rng.integers(0, 1 << bits, size=int(rng.integers(1, 30_000)))):
        blob = entropy.encode(codes, bits)
        back = entropy.decode(blob, codes.size, bits)
        np.testing.assert_array_equal(back, codes)
        assert back.dtype == (np.uint8 if bits <= 8 else np.uint16)


@given(st.integers(1, 16), st.lists(st.integers(0, 2**16 - 1), max_size=3000),
       st.integers(1, 64))
def test_round_trip_property(bits, values, lanes):
    codes = np.array(values, np.int64) % (1 << bits)
    lanes = min(lanes, max(codes.size, 1))
    blob = entropy.encode(codes, bits, lanes=lanes if codes.size else None)
    np.testing.assert_array_equal(entropy.decode(blob, codes.size, bits), codes)


@pytest.mark.parametrize("case", ["empty", "one", "single-symbol", "all-symbols", "two-lanes",
                                  "ragged", "many-lanes", "extreme-skew"])
def test_edge_cases_round_trip(case):
    rng = _rng()
    bits = 4
    codes = {
        "empty": np.zeros(0, np.uint8),
        "one": np.array([int(rng.integers(16))]),
        "single-symbol": np.full(int(rng.integers(1, 100_000)), int(rng.integers(16))),
        "all-symbols": rng.permutation(np.repeat(np.arange(16), 50)),
        "two-lanes": rng.integers(0, 16, 3),
        "ragged": rng.integers(0, 16, 4096 * 3 + 17),
        "many-lanes": rng.integers(0, 16, 70_001),
        "extreme-skew": np.where(rng.random(200_000) < 1e-4, 15, 0),
    }[case]
    lanes = {"two-lanes": 2, "many-lanes": 8192}.get(case)
    blob = entropy.encode(codes, bits, lanes=lanes)
    np.testing.assert_array_equal(entropy.decode(blob, codes.size, bits), codes)
    if case == "single-symbol":  # nothing but the header, table and states
        assert len(blob) <= 64 + 4 * (codes.size // 4096 + 1)


def test_all_16_bit_symbols_and_too_many_distinct_ones():
    codes = _rng().permutation(np.arange(1 << 15))  # exactly what a 15-bit table holds
    blob = entropy.encode(codes, 16)
    np.testing.assert_array_equal(entropy.decode(blob, codes.size, 16), codes)
    with pytest.raises(ValueError, match="distinct symbols"):
        entropy.encode(np.arange((1 << 15) + 1), 16)


def _gaussian_codes(n, rng):
    """4-bit codes of Gaussian data with Lloyd-Max-like cells (equal steps near the middle)."""
    edges = np.array([-2.40, -1.84, -1.44, -1.10, -0.80, -0.52, -0.26, 0, 0.26, 0.52, 0.80, 1.10,
                      1.44, 1.84, 2.40])
    return np.searchsorted(edges, rng.standard_normal(n)).astype(np.uint8)


def test_size_within_one_percent_of_the_entropy_plus_4_kib():
    rng = _rng()
    for codes in (_gaussian_codes(1_000_000, rng), _skewed(rng, 300_000, 4),
                  _skewed(rng, 200_000, 8, alpha=0.05)):
        h = entropy.empirical_entropy(codes)
        blob = entropy.encode(codes, 8 if codes.max() > 15 else 4)
        assert len(blob) <= 1.01 * h * codes.size / 8 + 4096, (len(blob), h)
        assert len(blob) >= h * codes.size / 8  # no coder beats the empirical entropy
        assert len(blob) <= entropy.coded_size_bound(codes.size, h, int(codes.max()) + 1)


def test_empirical_entropy_matches_a_direct_formula():
    codes = _rng().integers(0, 5, 1000)
    p = np.bincount(codes) / codes.size
    p = p[p > 0]
    assert entropy.empirical_entropy(codes) == pytest.approx(-(p * np.log2(p)).sum())


def _mutations(blob: bytes, rng):
    """Every kind of damage: flips in the header, table, states and stream; truncation;
    extension."""
    n = len(blob)
    for pos in (4, 5, 6, 8, 16, 20, 26, n // 3, n // 2, n - 3, n - 1):
        for bit in (0, 3, 7):
            b = bytearray(blob)
            b[pos] ^= 1 << bit
            yield f"flip {pos}:{bit}", bytes(b)
    for i in range(20):
        b = bytearray(blob)
        b[int(rng.integers(24, n))] ^= int(rng.integers(1, 256))
        yield f"random {i}", bytes(b)
    yield "truncated", blob[:-2]
    yield "short", blob[:10]
    yield "extended", blob + b"\0\0"


def test_corrupt_data_raises_value_error():
    rng = _rng()
    codes = _gaussian_codes(20_000, rng)
    blob = entropy.encode(codes, 4, lanes=64)
    for what, bad in _mutations(blob, rng):
        with pytest.raises(ValueError, match="corrupt rANS stream"):
            entropy.decode(bad, codes.size, 4)
            pytest.fail(f"{what} was not detected")


def test_decode_refuses_another_count_or_width_before_allocating():
    codes = _gaussian_codes(10_000, _rng())
    blob = entropy.encode(codes, 4)
    with pytest.raises(ValueError, match="expected 10001"):
        entropy.decode(blob, 10_001, 4)
    with pytest.raises(ValueError, match="expected 10000 of 5"):
        entropy.decode(blob, 10_000, 5)
    b = bytearray(blob)
    b[8:16] = struct.pack("<Q", 1 << 60)  # a claimed huge count
    with pytest.raises(ValueError, match="corrupt"):
        entropy.decode(bytes(b), 10_000, 4)


@pytest.mark.parametrize("bad", [0, 17, True, 4.0])
def test_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        entropy.encode([1, 2], bad)


def test_bad_symbols_and_lanes():
    with pytest.raises(ValueError, match=r"\[0, 2\*\*3\)"):
        entropy.encode([0, 8], 3)
    with pytest.raises(ValueError, match=r"\[0, 2\*\*3\)"):
        entropy.encode([-1, 2], 3)
    with pytest.raises(ValueError, match="integers"):
        entropy.encode([0.5], 3)
    with pytest.raises(ValueError, match="lanes"):
        entropy.encode([1, 2, 3], 3, lanes=4)


# ------------------------------------------------------------------------ packed words
@pytest.mark.parametrize("bits", range(1, 17))
def test_word_streams_match_bitpack(bits):
    rng = _rng()
    n = int(rng.integers(1, 3000))
    codes = rng.integers(0, 1 << bits, n)
    words = np.asarray(bitpack.pack(codes, bits))
    np.testing.assert_array_equal(entropy.words_from_symbols(codes, bits), words)
    np.testing.assert_array_equal(entropy.symbols_from_words(words, bits, n), codes)


@pytest.mark.parametrize("bits", [1, 3, 4, 5, 8, 13, 16])
def test_any_uint32_array_round_trips_through_encode_words(bits):
    rng = _rng()
    words = rng.integers(0, 2**32, (3, int(rng.integers(1, 500))), dtype=np.uint64).astype(
        np.uint32)  # any content: the bits after the last whole code are kept too
    blob = entropy.encode_words(words, bits)
    np.testing.assert_array_equal(entropy.decode_words(blob, words.size, bits),
                                  words.reshape(-1))
    assert entropy.encode_words(words, bits, max_bytes=words.nbytes - 1) is None  # no gain
    with pytest.raises(ValueError, match="uint32"):
        entropy.encode_words(words.astype(np.int64), bits)


# ------------------------------------------------------------------------ checkpoints
def _tree():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    xs = rng.standard_normal((3, 64, 32)).astype(np.float32)
    return {"int4": distq.quantize(x, distq.Uniform(bits=4)),
            "pq": distq.quantize(x[:64, :16], distq.PQ(m=4, bits=4), key=jax.random.key(0)),
            "batched": jax.vmap(lambda a: distq.quantize(a, distq.Uniform(bits=4)))(xs),
            "cast": distq.quantize(x[:8], distq.Cast("bfloat16")),
            "dense": x[:4], "step": np.int32(3)}


def _same_leaf(a, b):
    assert type(a) is type(b)
    for fa, fb in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(fa), np.asarray(fb))


def test_entropy_coded_checkpoints_load_exactly_and_are_smaller(tmp_path):
    tree = _tree()
    plain, coded = tmp_path / "plain.distq", tmp_path / "coded.distq"
    n_plain = distq.save(plain, tree)
    n_coded = distq.save(coded, tree, entropy_coded=True)
    assert n_coded < n_plain
    back = distq.load(coded)
    for k, v in tree.items():
        if distq.is_quantized(v):
            _same_leaf(back[k], v)
        else:
            np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(v))
    info = distq.checkpoint.info(coded)
    nodes = dict(zip([k for _, k in info["tree"]["k"]], info["tree"]["v"]))
    for k in ("int4", "batched"):  # Gaussian codes: coded, smaller
        assert nodes[k]["coded"]["codes"]["bits"] == tree[k].bits, k
        assert info["tensors"][nodes[k]["arrays"]["codes"]]["dtype"] == "U8"
    assert "coded" not in nodes["cast"]  # no packed codes
    lazy = distq.load(coded, lazy=True)
    _same_leaf(lazy["int4"], tree["int4"])  # the lazy reader decodes too


def test_near_uniform_codes_are_stored_plain(tmp_path):
    rng = _rng()
    q = distq.quantize(rng.standard_normal(20_000).astype(np.float32),
                       distq.Uniform(bits=4, symmetric=False))
    assert q.n == 16
    uniform = bitpack.pack(rng.integers(0, 16, q.size), 4)  # all 16 levels equally likely
    q = dataclasses.replace(q, codes=uniform)
    distq.save(tmp_path / "u", {"q": q}, entropy_coded=True)
    node = distq.checkpoint.info(tmp_path / "u")["tree"]["v"][0]
    assert "coded" not in node
    _same_leaf(distq.load(tmp_path / "u")["q"], q)


def _resigned(blob: bytes, edit) -> bytes:
    """``blob`` with ``edit(header, data)`` applied and a valid digest (as anyone can do)."""
    hlen = struct.unpack("<Q", blob[:8])[0]
    header, data = json.loads(blob[8:8 + hlen]), bytearray(blob[8 + hlen:])
    edit(header, data)
    meta = {k: v for k, v in header["__metadata__"].items() if k != "sha256"}
    index = {k: v for k, v in header.items() if k != "__metadata__"}
    meta["sha256"] = distq.checkpoint._digest(index, meta, [bytes(data)])
    raw = json.dumps(dict(header, __metadata__=meta)).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(data)


def _flip_stream(header, data):
    a, b = header["q:codes"]["data_offsets"]
    data[(a + b) // 2] ^= 0x10


def _edit_coded(**change):
    def edit(header, data):
        tree = json.loads(header["__metadata__"]["tree"])
        tree["v"][0]["coded"]["codes"].update(change)
        header["__metadata__"]["tree"] = json.dumps(tree)
    return edit


def _coded_extra_field(header, data):
    tree = json.loads(header["__metadata__"]["tree"])
    tree["v"][0]["coded"]["scale"] = dict(tree["v"][0]["coded"]["codes"])
    header["__metadata__"]["tree"] = json.dumps(tree)


@pytest.mark.parametrize("edit", [_flip_stream, _edit_coded(bits=5), _edit_coded(shape=[7]),
                                  _edit_coded(shape=[1 << 40]), _edit_coded(coder="zstd"),
                                  _edit_coded(dtype="U16"), _coded_extra_field],
                         ids=["stream-bit", "bits", "shape", "bomb", "coder", "dtype",
                              "field-not-coded"])
def test_damaged_entropy_coded_files_raise_checkpoint_errors(tmp_path, edit):
    q = distq.quantize(_gaussian_codes(20_000, _rng()).astype(np.float32), distq.Uniform(bits=4))
    f = tmp_path / "q.distq"
    distq.save(f, {"q": q}, entropy_coded=True)
    blob = f.read_bytes()
    flipped = bytearray(blob)
    flipped[-100] ^= 1
    f.write_bytes(bytes(flipped))  # unsigned damage: the checksum refuses it
    with pytest.raises(CheckpointError, match="checksum"):
        distq.load(f)
    f.write_bytes(_resigned(blob, edit))  # re-signed: the decoder's own checks refuse it
    with pytest.raises(CheckpointError):
        distq.load(f)


def test_save_refuses_a_non_bool_flag(tmp_path):
    with pytest.raises(TypeError, match="entropy_coded"):
        distq.save(tmp_path / "x", {"a": np.ones(2)}, entropy_coded="yes")


def test_cli_entropy_coded_and_info_shows_both_rates(tmp_path, capsys):
    src, out = tmp_path / "in.distq", tmp_path / "out.distq"
    x = np.random.default_rng(0).standard_normal((128, 96)).astype(np.float32)
    distq.save(src, {"w": x, "b": np.zeros(3, np.float32)})
    assert cli.main(["quantize", str(src), str(out), "-q", "-e", "--rule", "w=int:4",
                     "--rule", "b=none"]) == 0
    assert cli.main(["info", str(out), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    rows = {r["path"]: r for r in d["leaves"]}
    w = rows["w"]
    assert w["stored_bytes"] < w["bytes_after"] and w["stored_bits_per_value"] < w[
        "bits_per_value"]
    assert w["stored_bits_per_value"] == pytest.approx(8 * w["stored_bytes"] / x.size)
    assert d["totals"]["stored_bytes"] == sum(r["stored_bytes"] for r in rows.values())
    assert cli.main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "stored b/v" in text and "as stored (entropy-coded)" in text
    np.testing.assert_array_equal(
        np.asarray(distq.load(out)["w"].dequantize()),
        np.asarray(distq.quantize(x, distq.Uniform(bits=4)).dequantize()))


def test_coded_size_in_a_checkpoint_matches_the_coder(tmp_path):
    """The file stores exactly the coder's bytes: stored bits per value = coded stream + the
    leaf's other arrays."""
    q = distq.quantize(np.random.default_rng(1).standard_normal((256, 64)).astype(np.float32),
                       distq.Uniform(bits=4))
    f = tmp_path / "c"
    distq.save(f, {"q": q}, entropy_coded=True)
    info = distq.checkpoint.info(f)
    blob = entropy.encode_words(np.asarray(q.codes), 4)
    assert info["tensors"]["q:codes"]["shape"] == [len(blob)]
    h = entropy.empirical_entropy(np.asarray(q.codes_unpacked()))
    assert len(blob) <= 1.01 * h * q.size / 8 + 4096
    assert math.isclose(len(blob) * 8 / q.size, h, rel_tol=0.02)
