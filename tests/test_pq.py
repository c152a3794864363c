"""Tests for distq.pq: fit/encode/decode, the PQArray container, tables, search, OPQ."""

from __future__ import annotations

import doctest
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

import distq.core.pq as P
from distq.core import bitpack


# ------------------------------------------------------------------------------------ data
def clustered(seed: int, n: int, dim: int, m: int, k: int, sigma: float = 0.1):
    """The PQ benchmark's structure: per sub-space, ``k`` N(0,1) centroids + N(0, sigma^2)."""
    rng = np.random.default_rng(seed)
    ds = dim // m
    cents = rng.standard_normal((m, k, ds)).astype(np.float32)
    pick = rng.integers(0, k, (n, m))
    x = np.concatenate([cents[s][pick[:, s]] for s in range(m)], axis=1)
    return (x + sigma * rng.standard_normal((n, dim))).astype(np.float32)


def rel_mse(x, xh) -> float:
    x = np.asarray(x, np.float64)
    return float(((x - np.asarray(xh, np.float64)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def np_decode(codes: np.ndarray, codebooks: np.ndarray, rotation=None) -> np.ndarray:
    m = codebooks.shape[0]
    rows = np.concatenate([codebooks[s][codes[:, s]] for s in range(m)], axis=1)
    return rows if rotation is None else rows @ rotation.T


X = clustered(0, 600, 32, 4, 16)
SPEC = P.PQ(m=4, bits=4)


@pytest.fixture(scope="module")
def fitted():
    pq = P.fit(jax.random.key(0), X, SPEC)
    return pq, pq.encode(X)


# ----------------------------------------------------------------------------------- tests
def test_round_trip_shapes_dtypes_and_quality(fitted):
    pq, q = fitted
    assert isinstance(q, P.PQArray) and P.is_pqarray(q)
    assert q.shape == (600, 32) and q.ndim == 2 and q.dtype == "float32" and q.m == 4
    xh = q.dequantize()
    assert xh.shape == (600, 32) and xh.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(pq.decode(q)), np.asarray(xh))
    assert rel_mse(X, xh) < 0.02  # 16 true centroids per sub-space: found
    assert pq.codebooks.shape == (4, 16, 8) and pq.rotation is None
    # codes agree with a numpy nearest-centroid search
    cb = np.asarray(pq.codebooks)
    codes = np.asarray(q.codes_unpacked())
    for s in range(4):
        xs = X[:, 8 * s:8 * (s + 1)]
        ref = ((xs[:, None] - cb[s][None]) ** 2).sum(-1).argmin(1)
        np.testing.assert_array_equal(codes[:, s], ref)
    # a bf16 matrix comes back as bf16
    qb = pq.encode(jnp.asarray(X[:50], jnp.bfloat16))
    assert qb.dtype == "bfloat16" and qb.dequantize().dtype == jnp.bfloat16


def test_nbytes_exact(fitted):
    _, q = fitted
    n, dim, m, bits, k = 600, 32, 4, 4, 16
    words = -(-n * m * bits // 32)
    assert q.codes.dtype == jnp.uint32 and q.codes.shape == (words,)
    assert q.nbytes == 4 * words + 4 * m * k * (dim // m)
    assert q.nbytes < X.nbytes / 10


def test_row_gather_matches_dequantize(fitted):
    _, q = fitted
    dense = np.asarray(q.dequantize())
    np.testing.assert_array_equal(np.asarray(q[7]), dense[7])
    np.testing.assert_array_equal(np.asarray(q[-1]), dense[-1])
    idx = np.array([0, 5, 599, 5, 123])
    np.testing.assert_array_equal(np.asarray(q[idx]), dense[idx])
    np.testing.assert_array_equal(np.asarray(q[jnp.asarray(idx)]), dense[idx])
    np.testing.assert_array_equal(np.asarray(q[10:40:3]), dense[10:40:3])
    np.testing.assert_array_equal(np.asarray(q[idx.reshape(5, 1)]), dense[idx.reshape(5, 1)])
    np.testing.assert_array_equal(np.asarray(q[3, 4:9]), dense[3, 4:9])
    with pytest.raises(IndexError):
        q[600]


def test_products_through_tables(fitted):
    _, q = fitted
    dense = np.asarray(q.dequantize(), np.float64)
    rng = np.random.default_rng(1)
    v, vm = rng.standard_normal(32).astype(np.float32), rng.standard_normal((32, 3)).astype(
        np.float32)
    w, wm = rng.standard_normal(600).astype(np.float32), rng.standard_normal((2, 600)).astype(
        np.float32)
    tol = dict(rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(q @ v), dense @ v, **tol)
    np.testing.assert_allclose(np.asarray(q @ vm), dense @ vm, **tol)
    np.testing.assert_allclose(np.asarray(q @ jnp.asarray(vm)), dense @ vm, **tol)
    np.testing.assert_allclose(np.asarray(vm.T @ q.T), vm.T @ dense.T, **tol)
    np.testing.assert_allclose(np.asarray(v @ q.T), v @ dense.T, **tol)
    np.testing.assert_allclose(np.asarray(jnp.asarray(vm.T) @ q.T), vm.T @ dense.T, **tol)
    np.testing.assert_allclose(np.asarray(w @ q), w @ dense, **tol)
    np.testing.assert_allclose(np.asarray(wm @ q), wm @ dense, **tol)
    np.testing.assert_allclose(np.asarray(q.T @ wm.T), dense.T @ wm.T, **tol)
    assert q.T.shape == (32, 600) and q.T.T is q
    with pytest.raises(ValueError):
        q @ np.ones(31, np.float32)


def test_search_matches_bruteforce(fitted):
    pq, q = fitted
    dense = np.asarray(q.dequantize(), np.float64)
    queries = X[:7] + 0.05
    dist, idx = pq.search(q, queries, 5)
    assert dist.shape == idx.shape == (7, 5)
    d2 = ((queries[:, None].astype(np.float64) - dense[None]) ** 2).sum(-1)
    ref = np.sort(d2, axis=1)[:, :5]
    np.testing.assert_allclose(np.asarray(dist), ref, rtol=1e-4, atol=1e-4)
    # returned rows are at the returned distances (ties may be ordered either way)
    got = np.take_along_axis(d2, np.asarray(idx), axis=1)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    d1, i1 = pq.search(q, queries[0], 3)
    assert i1.shape == (3,)
    np.testing.assert_array_equal(np.asarray(i1), np.asarray(idx[0, :3]))
    with pytest.raises(ValueError):
        pq.search(q, queries, 601)


@pytest.mark.parametrize("bits", list(range(1, 17)))
def test_pqarray_every_width(bits):
    """Packing, row gather and tables for every code width, on a hand-built PQArray."""
    rng = np.random.default_rng(bits)
    n, m, ds = 37, 3, 2
    k = 1 << bits
    codes = rng.integers(0, k, (n, m))
    cb = rng.standard_normal((m, k, ds)).astype(np.float32)
    q = P.PQArray(codes=bitpack.pack(codes.reshape(-1).astype(np.uint32), bits),
                  codebooks=jnp.asarray(cb), rotation=None, value_shape=(n, m * ds), dtype="float32",
                  m=m, bits=bits)
    q.validate()
    dense = np_decode(codes, cb)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), dense)
    idx = np.array([36, 0, 17, 17])
    np.testing.assert_array_equal(np.asarray(q.row_codes(idx)), codes[idx])
    np.testing.assert_array_equal(np.asarray(q[idx]), dense[idx])
    assert q.nbytes == 4 * (-(-n * m * bits // 32)) + cb.nbytes


@pytest.mark.parametrize("bits", [1, 8])
def test_fit_small_widths(bits):
    x = X[: max(300, 2 << bits)]
    pq = P.fit(jax.random.key(1), x, P.PQ(m=4, bits=bits))
    q = pq.encode(x)
    assert q.bits == bits and pq.codebooks.shape == (4, 1 << bits, 8)
    assert int(q.codes_unpacked().max()) < (1 << bits)
    assert rel_mse(x, q.dequantize()) < 1.0


def test_fit_12_bits():
    x = clustered(3, 4096, 4, 2, 64)
    pq = P.fit(jax.random.key(0), x, P.PQ(m=2, bits=12, iters=3))
    q = pq.encode(x)
    assert pq.codebooks.shape == (2, 4096, 2)
    # as many centroids as rows: nearly every row is its own centroid
    assert rel_mse(x, q.dequantize()) < 1e-3


@pytest.mark.slow
def test_fit_16_bits():
    x = np.random.default_rng(0).standard_normal((1 << 16, 2)).astype(np.float32)
    pq = P.fit(jax.random.key(0), x, P.PQ(m=1, bits=16, iters=2))
    q = pq.encode(x)
    assert q.bits == 16 and rel_mse(x, q.dequantize()) < 1e-3


def test_opq_not_worse_than_pq_on_rotated_data():
    rot, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((32, 32)))
    x = (X @ rot).astype(np.float32)  # the sub-space structure is hidden by a rotation
    plain = P.fit(jax.random.key(0), x, SPEC).encode(x)
    opq_pq = P.fit(jax.random.key(0), x, P.PQ(m=4, bits=4, opq=True, opq_iters=3))
    opq = opq_pq.encode(x)
    r = np.asarray(opq_pq.rotation)
    np.testing.assert_allclose(r.T @ r, np.eye(32), atol=1e-4)
    e_pq, e_opq = rel_mse(x, plain.dequantize()), rel_mse(x, opq.dequantize())
    assert e_opq <= e_pq * 1.001
    # the rotation is stored and counted; products undo it
    assert opq.rotation is not None
    assert opq.nbytes == plain.nbytes + 32 * 32 * 4
    v = np.ones((32, 2), np.float32)
    np.testing.assert_allclose(np.asarray(opq @ v), np.asarray(opq.dequantize()) @ v,
                               rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(opq[[1, 2]]), np.asarray(opq.dequantize())[[1, 2]],
                               atol=1e-5)


def test_serialisation_and_pytree(fitted):
    _, q = fitted
    state = serialization.to_state_dict(q)
    assert json.loads(state["metadata"])["bits"] == 4
    back = P.from_state_dict(state)
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(q.dequantize()))
    back2 = serialization.from_state_dict(q, state)
    assert back2.shape == q.shape and back2.bits == q.bits
    restored = serialization.msgpack_restore(serialization.msgpack_serialize(state))
    assert P.from_state_dict(restored).nbytes == q.nbytes
    # a pytree: jit sees the arrays as leaves, the metadata as static
    leaves = jax.tree.leaves(q)
    assert len(leaves) == 2  # codes, codebooks (rotation is None)
    rows = jax.jit(lambda a: a[jnp.arange(3)])(q)
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(q.dequantize())[:3])


def test_fit_is_deterministic(fitted):
    pq, q = fitted
    again = P.fit(jax.random.key(0), X, SPEC)
    np.testing.assert_array_equal(np.asarray(again.codebooks), np.asarray(pq.codebooks))
    np.testing.assert_array_equal(np.asarray(again.encode(X).codes), np.asarray(q.codes))


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"m=5.*D=32"):
        P.fit(jax.random.key(0), X, P.PQ(m=5))
    for bits in (0, 17):
        with pytest.raises(ValueError, match="bits"):
            P.PQ(m=4, bits=bits)
    with pytest.raises(ValueError, match="2\\*\\*bits=256"):
        P.fit(jax.random.key(0), X[:100], P.PQ(m=4, bits=8))
    bad = X.copy()
    bad[2, 3] = np.inf
    with pytest.raises(ValueError, match="NaN/inf"):
        P.fit(jax.random.key(0), bad, SPEC)
    with pytest.raises(TypeError):
        P.fit(jax.random.key(0), X.astype(np.int32), SPEC)
    with pytest.raises(TypeError):
        P.PQ(m=4.0)
    with pytest.raises(ValueError):
        P.fit(jax.random.key(0), X[0], SPEC)


def test_beats_faiss_default_on_clustered_data():
    faiss = pytest.importorskip("faiss")  # installed by the bench extra (CI)
    x = clustered(0, 3000, 128, 4, 256)
    q = P.fit(jax.random.key(0), x, P.PQ(m=4, bits=8)).encode(x)
    ours = rel_mse(x, q.dequantize())
    fq = faiss.ProductQuantizer(128, 4, 8)
    fq.train(x)
    theirs = rel_mse(x, fq.decode(fq.compute_codes(x)))
    truth = 4 * 32 * 0.1**2 / ((x - x.mean(0)) ** 2).sum(1).mean()
    assert ours < 0.5 * theirs
    assert ours < 1.25 * truth  # close to the true centroids' error


@pytest.mark.slow
def test_doctests():
    failures, _ = doctest.testmod(P, optionflags=doctest.ELLIPSIS)
    assert failures == 0
