"""Scalar(outliers=...): values kept apart beside the codes (positions + float16 values)."""

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import distq
from distq.core import bitpack
from distq.core import qarray as qa
from distq.core.leaf import arrays_nbytes


def _heavy(shape, seed=0):
    return np.random.default_rng(seed).standard_t(3, shape).astype(np.float32)


@pytest.mark.parametrize("shape,spec", [
    ((300, 200), distq.Scalar(bits=4, outliers=0.005)),
    ((300, 200), distq.Scalar(bits=3, axis=1, outliers=0.01)),
    ((70_001,), distq.Scalar(bits=4, outliers=0.002)),  # > 2**16 values: 17-bit positions
    ((64, 96), distq.Scalar(bits=4, group_size=32, outliers=0.02, scale_dtype="float16")),
])
def test_outliers_are_the_extreme_values_and_decode_to_float16(shape, spec):
    x = _heavy(shape, seed=sum(shape))
    q = distq.quantize(x, spec)
    k = spec.n_outliers(x.size)
    assert q.n_outliers == k > 0
    # positions: the k values farthest from their group's centre, in layout row order
    rows = np.asarray(q.layout.to_rows(jnp.asarray(x)), np.float64)
    centre = rows.mean(axis=1, keepdims=True)
    spread = rows.std(axis=1, ddof=1, keepdims=True)
    dev = (np.abs(rows - centre) / spread).ravel()
    pos = np.asarray(q.outlier_positions()).astype(np.int64)
    assert len(set(pos.tolist())) == k
    assert dev[pos].min() >= np.sort(dev)[-k] * (1 - 2e-3)  # float16 scales round the ranking
    # they decode to their float16-rounded standardised value
    d_rows = np.asarray(q.layout.to_rows(q.dequantize()), np.float64).ravel()
    x_rows = rows.ravel()
    err_out = np.abs(d_rows[pos] - x_rows[pos])
    assert np.all(err_out <= 2.0 ** -10 * np.abs(x_rows[pos]) + 1e-3 * spread.max())
    # true bytes: codes + codebook + scales/locs + positions (ceil(log2 size) bits) + values
    bits = max(1, (x.size - 1).bit_length())
    assert q.index_bits == bits
    expected = (bitpack.packed_nbytes(x.size, q.bits) + 4 * q.n + arrays_nbytes(q.scale, q.loc)
                + 4 * qa.position_words(k, bits) + 2 * k)
    assert q.nbytes == expected


def test_outliers_lower_the_error_of_heavy_tails_and_fit_the_rest():
    x = _heavy((200_000,), seed=3)
    plain = distq.quantize(x, distq.Scalar(bits=4))
    kept = distq.quantize(x, distq.Scalar(bits=4, outliers=0.005))
    e_plain = float(np.mean((np.asarray(plain.dequantize()) - x) ** 2))
    e_kept = float(np.mean((np.asarray(kept.dequantize()) - x) ** 2))
    assert e_kept < 0.5 * e_plain
    # the codebook was fitted on the inliers: its range is narrower than the plain one
    assert float(kept.codebook[-1] - kept.codebook[0]) < float(plain.codebook[-1] - plain.codebook[0])


def test_jit_agrees_and_does_not_retrace():
    x = _heavy((128, 96), seed=5)
    spec = distq.Scalar(bits=4, axis=0, outliers=0.01)
    eager = distq.quantize(x, spec)
    f = jax.jit(distq.quantize, static_argnums=1)
    jitted = f(x, spec)
    for a, b in [(eager.codes, jitted.codes), (eager.outlier_index, jitted.outlier_index),
                 (eager.outlier_value, jitted.outlier_value)]:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(eager.dequantize()), np.asarray(jitted.dequantize()),
                               rtol=1e-6, atol=1e-6)


def test_checkpoint_round_trip_is_exact(tmp_path):
    x = _heavy((100, 80), seed=6)
    tree = {"w": distq.quantize(x, distq.Scalar(bits=4, axis=1, outliers=0.01))}
    path = tmp_path / "m.distq"
    distq.save(path, tree)
    back = distq.load(path)
    assert back["w"].n_outliers == tree["w"].n_outliers
    np.testing.assert_array_equal(np.asarray(back["w"].outlier_index),
                                  np.asarray(tree["w"].outlier_index))
    np.testing.assert_array_equal(np.asarray(back["w"].dequantize()),
                                  np.asarray(tree["w"].dequantize()))


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 0.3, True, "all", 1])
def test_bad_outlier_fraction(bad):
    with pytest.raises(ValueError, match="outliers"):
        distq.Scalar(bits=4, outliers=bad)


def test_quantize_tree_report_counts_outlier_bytes():
    params = {"w": jnp.asarray(_heavy((256, 128), seed=8))}
    spec = distq.Scalar(bits=4, outliers=0.01)
    qtree, report = distq.quantize_tree(params, [(".*", spec)])
    assert distq.tree_nbytes(qtree) == qtree["w"].nbytes
    assert 4.0 < 8 * qtree["w"].nbytes / 256 / 128 < 4.0 + 0.01 * (16 + 15) + 0.03
    assert "outliers=0.01" in distq.spec_str(spec)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 32), k=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_positions_pack_round_trip(bits, k, seed):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, 2**bits, size=k, dtype=np.uint64).astype(np.uint32)
    words = qa.pack_positions(jnp.asarray(idx), bits)
    assert words.shape == (qa.position_words(k, bits),)
    back = np.asarray(qa.unpack_positions(words, bits, k))
    np.testing.assert_array_equal(back, idx)
    assert 4 * words.shape[0] <= math.ceil(k * min(bits, 16) / 32) * 4 + math.ceil(
        k * max(bits - 16, 0) / 32) * 4


# ----------------------------------------------------------------------- automatic fields
def test_plain_arrays_resolve_to_one_scale_and_no_outliers():
    for shape in [(1_000_000,), (1000, 1000), (7,)]:
        r = distq.Scalar(bits=4).resolve(shape)
        assert (r.axis, r.outliers, r.scale_dtype) == (None, None, "float32")
    x = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
    q = distq.quantize(x, distq.Scalar(bits=4))
    assert q.layout.kind == "tensor" and q.n_outliers == 0
    assert q.nbytes - (1 << 20) * 4 // 8 < 300  # k bits per value plus a few hundred bytes


@pytest.mark.parametrize("role,shape,axis", [
    ("kernel", (384, 1536), 0), ("kernel", (3, 3, 64, 128), 2), ("weight", (1536, 384), 1),
    ("weight", (128, 64, 3, 3), 1), ("embedding", (30522, 384), 1), ("matrix", (512, 512), None),
])
def test_weights_get_input_channel_scales_by_convention(role, shape, axis):
    r = distq.Scalar(bits=4).resolve(shape, role)
    assert r.axis == axis
    assert r.outliers is not None and 0 < r.outliers <= 0.01
    assert r.scale_dtype == ("bfloat16" if axis is not None else "float32")


@pytest.mark.parametrize("bits,role,shape", [
    (2, "weight", (384, 384)), (4, "weight", (384, 1536)), (8, "kernel", (64, 64)),
    (3, "kernel", (3, 3, 16, 32)), (4, "embedding", (5000, 64)), (6, "matrix", (200, 30)),
    (4, "weight", (2, 384)), (8, "weight", (384, 384)), (4, "kernel", (64, 64)),
])
def test_automatic_fields_stay_within_bits_over_16(bits, role, shape):
    """Everything beyond the codes fits in bits/16 per value, unless one per-tensor codebook
    alone already costs more (tiny tensors): then nothing is added to it."""
    x = _heavy(shape, seed=bits)
    spec = distq.Scalar(bits=bits).resolve(shape, role)
    q = distq.quantize(x, spec)
    plain = distq.quantize(x, distq.Scalar(bits=bits, axis=None, outliers=None))
    if plain.bits_per_value >= bits + bits / 16:
        assert q.bits_per_value == plain.bits_per_value, (spec, q)
    else:
        assert q.bits_per_value <= bits + bits / 16 + 1e-9, (spec, q)


def test_quantize_tree_default_on_heavy_tailed_weights():
    rng = np.random.default_rng(11)
    params = {"dense": {"kernel": jnp.asarray(rng.standard_t(3, (256, 512)), jnp.float32),
                        "bias": jnp.zeros(512)},
              "emb": {"embedding": jnp.asarray(rng.standard_t(4, (1000, 64)), jnp.float32)}}
    spec = distq.Scalar(bits=4)
    qtree, report = distq.quantize_tree(params, [(".*(kernel|embedding)", spec)])
    k, e = qtree["dense"]["kernel"], qtree["emb"]["embedding"]
    assert k.layout.axes == (0,) and k.n_outliers > 0 and e.layout.axes == (1,)
    specs = {r.path: distq.spec_str(r.spec) for r in report.leaves}
    assert "axis=0" in specs["dense/kernel"] and "outliers=" in specs["dense/kernel"]
    for path, q in [("dense/kernel", k), ("emb/embedding", e)]:
        assert q.bits_per_value <= 4.25
    w = np.asarray(params["dense"]["kernel"])
    plain = distq.quantize(w, distq.Scalar(bits=4, axis=None, outliers=None))
    err = lambda q: float(np.mean((np.asarray(q.dequantize()) - w) ** 2))  # noqa: E731
    assert err(k) < 0.5 * err(plain)
