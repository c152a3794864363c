"""Tests of the quantitizer drop-in (distq._quantitize): quantitize, Quantitized, reports."""

from __future__ import annotations

import doctest
import os
import sys

import jax
import numpy as np
import pytest

import distq.compat.quantitizer as QZ
from distq.compat.quantitizer import Quantitized, compression_report, deep_sizeof, quantitize

N, D, SUB = 2048, 32, 8


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    # correlated rows, so that the codebooks have something to learn
    x = rng.standard_normal((N, D)) @ rng.standard_normal((D, D)) / np.sqrt(D)
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def q(data):
    return quantitize(data, sub_size=SUB)  # n_cluster=256: quantitizer's int8 codes break here


def test_shape_dtype_nbytes_and_seed_fields(data, q):
    assert isinstance(q, Quantitized)
    assert q.shape == (N, D) and q.dtype == np.float32 and len(q) == N and q.ndim == 2
    # 8 codes of 8 bits per row + 8 x 256 x 4 float32 codebook entries
    assert q.nbytes == N * SUB + SUB * 256 * (D // SUB) * 4
    assert (q.vectors, q.dim, q.qdim, q.centroids, q.bits) == (N, D, SUB, 256, 8)
    assert q.indexes.shape == (N, SUB) and q.indexes.dtype == np.uint8
    assert q.codes.shape == (SUB, 256, D // SUB)
    assert "sub_size=8" in repr(q) and "n_cluster=256" in repr(q)


def test_codes_above_127_decode_right(q):
    """quantitizer's signed int8 codes wrap above 127; ours are unsigned and exact."""
    idx = q.indexes
    assert idx.max() > 127
    # quantitizer's own decoding formula on our fields gives our decoding
    manual = q.codes[np.arange(SUB), idx.astype(np.int64)].reshape(N, D)
    np.testing.assert_array_equal(manual, q.decode())


def test_indexing_decoding_and_quality(data, q):
    full = q.decode()
    assert isinstance(full, np.ndarray) and full.shape == (N, D) and full.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(q), full)
    np.testing.assert_array_equal(q.unpack(), full)
    np.testing.assert_allclose(q[5], full[5])
    np.testing.assert_allclose(q[[0, 7, 7]], full[[0, 7, 7]])
    np.testing.assert_allclose(q[10:20], full[10:20])
    np.testing.assert_allclose(q[-1], full[-1])
    r = compression_report(data, q)
    assert r.mean_cosine > 0.9 and r.rel_mse < 0.2


def test_arithmetic_and_products(data, q):
    full = q.decode()
    v = np.random.default_rng(1).standard_normal((D, 3)).astype(np.float32)
    np.testing.assert_allclose(q @ v, full @ v, rtol=1e-4, atol=1e-4)
    w = np.random.default_rng(2).standard_normal((2, N)).astype(np.float32)
    np.testing.assert_allclose(w @ q, w @ full, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(q - data, full - data)
    np.testing.assert_allclose(data - q, data - full)
    np.testing.assert_allclose(q * 2, full * 2)
    np.testing.assert_allclose(2 + q, full + 2)
    np.testing.assert_allclose(q / 2, full / 2)
    np.testing.assert_allclose(q ** 2, full ** 2)
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(q.sqrt(), np.sqrt(full), equal_nan=True)


def test_sampled_and_encode(data, q):
    s = q.sampled([3, 1, 4, 1])
    assert s.shape == (4, D)
    np.testing.assert_array_equal(s.decode(), q.decode()[[3, 1, 4, 1]])
    np.testing.assert_array_equal(s.indexes, q.indexes[[3, 1, 4, 1]])
    s2 = q.sampled(slice(100, 110))
    np.testing.assert_array_equal(s2.decode(), q.decode()[100:110])
    # same codebooks for new rows: re-encoding the training rows gives the same codes
    np.testing.assert_array_equal(q.encode(data).indexes, q.indexes)


def test_save_load_round_trip_is_exact(tmp_path, q):
    path = tmp_path / "m.pq"  # no .npz suffix: the file lands at exactly this path
    q.save(path)
    assert path.exists() and os.listdir(tmp_path) == ["m.pq"]  # no temp file left behind
    r = Quantitized.load(path)
    pairs = ((q.array.codes, r.array.codes), (q.array.codebooks, r.array.codebooks),
             (q.quantizer.inertia, r.quantizer.inertia), (q.quantizer.iters, r.quantizer.iters))
    for a, b in pairs:
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    assert r.array.rotation is None and r.shape == q.shape and r.dtype == q.dtype
    np.testing.assert_array_equal(r.decode(), q.decode())
    # overwriting an existing file works and stays exact
    q.sampled([0, 1, 2]).save(path)
    assert Quantitized.load(path).shape == (3, D)


def test_load_rejects_bad_files(tmp_path, q):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a numpy file")
    with pytest.raises(ValueError, match="cannot read"):
        Quantitized.load(bad)
    other = tmp_path / "other.npz"
    QZ.atomic_savez(other, {"a": np.zeros(3)}, {"format": "something.else", "version": 1})
    with pytest.raises(ValueError, match="not a distq.Quantitized file"):
        Quantitized.load(other)
    # arrays that disagree with the metadata are caught by PQArray.validate
    good = tmp_path / "good.npz"
    q.save(good)
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["codes"] = arrays["codes"][:-1]
    np.savez(tmp_path / "trunc.npz", **arrays)
    with pytest.raises(ValueError):
        Quantitized.load(tmp_path / "trunc.npz")


def test_seed_and_key_determinism(data, q):
    again = quantitize(data, sub_size=SUB, seed=123)
    np.testing.assert_array_equal(np.asarray(again.array.codes), np.asarray(q.array.codes))
    keyed = quantitize(data, sub_size=SUB, key=jax.random.key(123))
    np.testing.assert_array_equal(np.asarray(keyed.array.codes), np.asarray(q.array.codes))


def test_integer_input(data):
    x = np.rint(data * 10).astype(np.int32)  # quantitizer accepts integer matrices
    q = quantitize(x, sub_size=SUB)
    assert q.dtype == np.float32 and q.shape == x.shape
    assert compression_report(x.astype(np.float32), q).mean_cosine > 0.9


def test_bad_arguments(data):
    with pytest.raises(ValueError, match="sub_size=7 sub-spaces must divide the row length D=32"):
        quantitize(data, sub_size=7)
    with pytest.raises(ValueError, match="n_cluster must be a power of two"):
        quantitize(data, sub_size=8, n_cluster=200)
    with pytest.raises(ValueError, match="n_cluster=4096 centroids need at least"):
        quantitize(data, sub_size=8, n_cluster=4096)
    with pytest.raises(ValueError, match="disagree"):
        quantitize(data, sub_size=8, n_cluster=16, bits=5)
    with pytest.raises(TypeError, match="sub_size must be an int"):
        quantitize(data, sub_size=2.0)
    with pytest.raises(ValueError, match="minit"):
        quantitize(data, sub_size=8, minit="matrix")
    with pytest.raises(TypeError, match="matrix must be a real numeric matrix"):
        quantitize(np.array([["a", "b"]]), sub_size=1)
    with pytest.raises(ValueError, match="matrix must be a matrix"):
        quantitize(np.zeros(10, np.float32), sub_size=1)
    bad = data.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        quantitize(bad, sub_size=8)


def test_compression_report_both_ways(data, q):
    vocab = [f"word{i}" for i in range(N)]
    r = compression_report(data, q, vocab=vocab)
    xh = q.decode().astype(np.float64)
    x = data.astype(np.float64)
    cos = (x * xh).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(xh, axis=1)
    assert r.mean_cosine == pytest.approx(cos.mean(), rel=1e-6)
    assert r.rel_mse == pytest.approx(((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum(),
                                      rel=1e-5)
    assert r.nbytes == q.nbytes and r.original_nbytes == data.nbytes
    assert r.ratio == pytest.approx(data.nbytes / q.nbytes)
    assert r.vocab_nbytes == deep_sizeof(vocab) > N * 50  # a str costs ~50 bytes in CPython
    assert r.seed_style_nbytes == r.nbytes + r.vocab_nbytes
    assert r.seed_style_original_nbytes == data.nbytes + r.vocab_nbytes
    # block-wise evaluation gives the same numbers
    rb = compression_report(data, q, block=300)
    assert rb.mean_cosine == pytest.approx(r.mean_cosine, rel=1e-9)
    assert rb.rel_mse == pytest.approx(r.rel_mse, rel=1e-6)
    with pytest.raises(ValueError, match="compressed has shape"):
        compression_report(data[:10], q)


def test_deep_sizeof_counts_arrays_once():
    a = np.zeros(1000, np.float32)
    assert deep_sizeof(a) == 4000
    assert 4000 < deep_sizeof({"a": a}) < 5000
    assert 4000 < deep_sizeof([a, a]) < 2 * 4000  # the same array twice counts once
    assert deep_sizeof(["abc"]) == sys.getsizeof(["abc"]) + sys.getsizeof("abc")
    with pytest.raises(TypeError):
        deep_sizeof(np)


@pytest.mark.slow
@pytest.mark.parametrize("n_cluster", [512, 4096])
def test_more_than_256_centroids_round_trip(tmp_path, n_cluster):
    x = np.random.default_rng(3).standard_normal((n_cluster * 2, 8)).astype(np.float32)
    q = quantitize(x, sub_size=2, n_cluster=n_cluster)
    assert q.indexes.dtype == np.uint16 and q.indexes.max() >= 256
    q.save(tmp_path / "q.npz")
    r = Quantitized.load(tmp_path / "q.npz")
    np.testing.assert_array_equal(r.indexes, q.indexes)
    np.testing.assert_array_equal(r.decode(), q.decode())


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_opq_and_half_codebooks_round_trip(tmp_path, data, dtype):
    q = quantitize(data, sub_size=4, n_cluster=16, opq=True, codebook_dtype=dtype)
    assert q.array.rotation is not None and str(q.codes.dtype) == dtype
    assert q.nbytes == N * 4 * 4 // 8 + 4 * 16 * (D // 4) * 2 + D * D * 4
    q.save(tmp_path / "q.npz")
    r = Quantitized.load(tmp_path / "q.npz")
    assert str(r.array.codebooks.dtype) == dtype
    np.testing.assert_array_equal(np.asarray(r.array.rotation), np.asarray(q.array.rotation))
    np.testing.assert_array_equal(r.decode(), q.decode())


@pytest.mark.slow
def test_doctests():
    failures, _ = doctest.testmod(QZ, optionflags=doctest.ELLIPSIS)
    assert failures == 0
