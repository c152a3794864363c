"""Tests for distq.nn: reverse-PQ layers (Dense, Embed, Conv), model size, QAT layers, helpers."""

from __future__ import annotations

import math
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import distq
from distq.core import bitpack
from distq import nn as N

F32 = dict(rtol=2e-5, atol=2e-5)
# One shape for most layers (the doctests use it too), so the compiled k-means fit, bit-packing
# and forward ops are shared across tests: vectors (64, 16), 4 sub-spaces of 4 dims, 4 bits.
D_IN, D_OUT, M, BITS = 16, 64, 4, 4
SPEC = distq.PQ(m=M, bits=BITS)
STE_SPEC = distq.Scalar(bits=3, dist="gaussian", refine=False, beta=0.8)  # clips the tails


# ------------------------------------------------------------------------------------ helpers
def np_decode(codes: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """Independent decoder: ``(n, m)`` codes -> ``(n, D)`` rows."""
    m = codebooks.shape[0]
    return np.concatenate([codebooks[s][codes[:, s]] for s in range(m)], axis=1)


def clustered_vectors(seed: int, n: int, dim: int, m: int, k: int, sigma: float = 0.05):
    """``n`` vectors whose sub-vectors come from ``k`` centres per sub-space, plus noise."""
    rng = np.random.default_rng(seed)
    ds = dim // m
    cents = rng.standard_normal((m, k, ds)).astype(np.float32)
    pick = rng.integers(0, k, (n, m))
    x = np.concatenate([cents[s][pick[:, s]] for s in range(m)], axis=1)
    return (x + sigma * rng.standard_normal((n, dim))).astype(np.float32)


def normal(seed: int, shape) -> jax.Array:
    """Test data from NumPy (a jax.random draw would compile once per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def randint(seed: int, shape, lo: int, hi: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(lo, hi, shape).astype(np.int32))


def maybe_jit(fn, use_jit: bool, **kwargs):
    return nnx.jit(fn, **kwargs) if use_jit else fn


def conv_ref(x, kernel, bias, strides=1, padding="SAME", groups=1):
    """``lax.conv_general_dilated`` in NWC/NHWC with an explicit kernel."""
    n = kernel.ndim - 2
    strides = (strides,) * n if isinstance(strides, int) else strides
    dn = lax.conv_dimension_numbers(x.shape, kernel.shape,
                                    (("NWC", "WIO", "NWC") if n == 1 else
                                     ("NHWC", "HWIO", "NHWC")))
    y = lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=dn,
                                 feature_group_count=groups)
    return y + bias.reshape((1,) * (y.ndim - 1) + (-1,))


# --------------------------------------------------------------------------------- exports
def test_package_exports():
    for name in N.__all__:
        assert getattr(N, name).__module__.startswith("distq.nn."), name
    assert {"PQDense", "PQEmbed", "PQConv", "PQCodes", "PQRotation", "QATDense", "QATConv",
            "model_size", "qat", "pq_layers", "table_is_cheaper"} <= set(N.__all__)


# ------------------------------------------------------------------------------------ Dense
@pytest.mark.parametrize("d_in,m,bits,use_jit", [
    (D_IN, M, BITS, False), (D_IN, M, BITS, True),
    (32, 32, 3, True),  # m > 16: the scan path
    pytest.param(D_IN, 16, 9, True, marks=pytest.mark.slow),
    pytest.param(D_IN, 1, 3, True, marks=pytest.mark.slow),
])
def test_dense_table_equals_rebuild(d_in, m, bits, use_jit):
    layer = N.PQDense(d_in, D_OUT, m=m, bits=bits, rngs=nnx.Rngs(0))
    layer.bias[...] = jnp.linspace(-1.0, 1.0, D_OUT)
    kernel = np_decode(np.asarray(layer.codes_unpacked()), np.asarray(layer.codebooks[...])).T
    f = maybe_jit(lambda l, x, fw: l(x, forward=fw), use_jit, static_argnames="fw")
    for lead in [(), (2, 3)] if (use_jit and m == M) or not use_jit else [(5,)]:
        x = normal(1, lead + (d_in,))
        y_tab, y_reb, y_auto = (f(layer, x, fw) for fw in ("table", "rebuild", "auto"))
        ref = np.asarray(x) @ kernel + np.asarray(layer.bias[...])
        assert y_tab.shape == lead + (D_OUT,) and y_tab.dtype == jnp.float32
        np.testing.assert_allclose(y_tab, y_reb, **F32)
        np.testing.assert_allclose(y_tab, ref, **F32)
        np.testing.assert_allclose(y_auto, ref, **F32)


def test_dense_matches_nnx_linear_with_decoded_kernel():
    layer = N.PQDense(D_IN, D_OUT, m=M, bits=BITS, rngs=nnx.Rngs(3))
    lin = nnx.Linear(D_IN, D_OUT, rngs=nnx.Rngs(0))
    lin.kernel[...] = layer.kernel()
    lin.bias[...] = layer.bias[...]
    x = normal(2, (7, D_IN))
    np.testing.assert_allclose(layer(x), lin(x), **F32)
    assert layer.kernel().shape == (D_IN, D_OUT)
    np.testing.assert_array_equal(layer.kernel().T, layer.as_pqarray().dequantize())


def test_dense_random_init_statistics():
    layer = N.PQDense(D_IN, D_OUT, m=M, bits=BITS, rngs=nnx.Rngs(0))
    codes = np.asarray(layer.codes_unpacked())
    assert codes.shape == (D_OUT, M) and codes.min() >= 0 and codes.max() < 1 << BITS
    assert len(np.unique(codes)) == 1 << BITS  # random codes cover the codebook
    std = float(jnp.std(layer.kernel()))
    assert 0.7 / 4 < std < 1.3 / 4  # lecun-normal scale 1/sqrt(in)
    assert layer.codes[...].dtype == jnp.uint32
    assert layer.codes[...].shape == (bitpack.packed_nwords(D_OUT * M, BITS),)
    # the constructor is deterministic in its rngs
    again = N.PQDense(D_IN, D_OUT, m=M, bits=BITS, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(again.codes[...], layer.codes[...])


def test_dense_dtypes_and_no_bias():
    layer = N.PQDense(D_IN, D_OUT, m=M, bits=BITS, use_bias=False, param_dtype=jnp.bfloat16,
                      rngs=nnx.Rngs(0))
    assert layer.bias is None and layer.codebooks[...].dtype == jnp.bfloat16
    assert layer(jnp.ones((2, D_IN), jnp.float32)).dtype == jnp.float32
    assert layer(jnp.ones((2, D_IN), jnp.bfloat16)).dtype == jnp.bfloat16


def test_forward_is_traced_once():
    layer = N.PQDense(D_IN, D_OUT, m=M, bits=BITS, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    x = jnp.ones((3, D_IN))
    apply(state, x)
    apply(jax.tree.map(lambda a: a + 0 if a.dtype != jnp.uint32 else a, state), x + 1.0)


# ------------------------------------------------------------------------------------ Embed
@pytest.mark.parametrize("m,bits,use_jit", [
    (M, BITS, False), (M, BITS, True), (8, 13, True),
    pytest.param(4, 5, True, marks=pytest.mark.slow),
    pytest.param(2, 7, True, marks=pytest.mark.slow),
])
def test_embed_lookup_equals_decoded_rows(m, bits, use_jit):  # 5, 7, 13: codes straddle words
    vocab, feat = D_OUT, D_IN
    emb = N.PQEmbed(vocab, feat, m=m, bits=bits, rngs=nnx.Rngs(bits))
    table = np_decode(np.asarray(emb.codes_unpacked()), np.asarray(emb.codebooks[...]))
    np.testing.assert_array_equal(emb.embedding(), table)
    idx = jnp.array([[0, 1, 63], [7, 7, 23]])
    f = maybe_jit(lambda e, i: e(i), use_jit)
    out = f(emb, idx)
    assert out.shape == (2, 3, feat)
    np.testing.assert_array_equal(out, table[np.asarray(idx)])
    np.testing.assert_array_equal(f(emb, jnp.arange(vocab)), table)


def test_embed_negative_and_out_of_range_indices_follow_nnx_embed():
    emb = N.PQEmbed(D_OUT, D_IN, m=M, bits=BITS, rngs=nnx.Rngs(0))
    ref = nnx.Embed(D_OUT, D_IN, rngs=nnx.Rngs(0))
    ref.embedding[...] = emb.embedding()
    idx = jnp.array([-1, -64, 3, 64, 70])
    out, want = emb(idx), ref(idx)
    np.testing.assert_array_equal(out[:3], want[:3])
    assert bool(jnp.all(jnp.isnan(out[3:])))
    assert bool(jnp.all(jnp.isnan(want[3:])))


@pytest.mark.parametrize("forward", ["table", "rebuild", "auto"])
def test_embed_attend(forward):
    emb = N.PQEmbed(D_OUT, D_IN, m=M, bits=BITS, rngs=nnx.Rngs(1))
    q = normal(0, (2, 5, D_IN))
    np.testing.assert_allclose(emb.attend(q, forward=forward), q @ emb.embedding().T, **F32)


def np_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Reference LSB-first bit stream: code i at stream bits [i * bits, (i + 1) * bits)."""
    stream = 0
    for i, c in enumerate(codes.tolist()):
        stream |= int(c) << (i * bits)
    nwords = -(-codes.size * bits // 32)
    return np.array([(stream >> (32 * w)) & 0xFFFFFFFF for w in range(nwords)], np.uint32)


@settings(max_examples=20)
@given(bits=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_codes_at_reads_packed_stream(bits, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << bits, 40).astype(np.uint32)
    words = np_pack(codes, bits)
    pos = rng.permutation(40)
    np.testing.assert_array_equal(distq.bitpack.take(jnp.asarray(words), bits, jnp.asarray(pos)),
                                  codes[pos])


# ------------------------------------------------------------------------------------- Conv
# (kernel_size, strides, padding, groups, m); cin = 4, cout = 64
CONV_CASES = [
    ((4,), 1, "SAME", 1, M),
    ((2, 2), 1, "SAME", 1, M),
    ((5,), 2, "VALID", 2, 5),
    ((3, 2), (2, 1), ((1, 0), (0, 1)), 2, 6),
]


@pytest.mark.parametrize("case,use_jit", [(0, False), (1, True), (3, True),
                                          pytest.param(2, True, marks=pytest.mark.slow)])
def test_conv_matches_lax_conv_with_rebuilt_kernel(case, use_jit):
    kernel_size, strides, padding, groups, m = CONV_CASES[case]
    n = len(kernel_size)
    conv = N.PQConv(4, D_OUT, kernel_size, strides, m=m, bits=BITS, padding=padding,
                    feature_group_count=groups, rngs=nnx.Rngs(0))
    conv.bias[...] = jnp.linspace(-1.0, 1.0, D_OUT)
    kernel = conv.kernel()
    assert kernel.shape == kernel_size + (4 // groups, D_OUT)
    x = normal(1, (2,) + (8,) * n + (4,))
    y = maybe_jit(lambda c, x: c(x), use_jit)(conv, x)
    pad = padding if isinstance(padding, str) else list(padding)
    np.testing.assert_allclose(y, conv_ref(x, kernel, conv.bias[...], strides, pad, groups),
                               **F32)
    # the vectors are the C-order weights of each output channel
    vec = np_decode(np.asarray(conv.codes_unpacked()), np.asarray(conv.codebooks[...]))
    np.testing.assert_array_equal(kernel, vec.T.reshape(kernel.shape))


@pytest.mark.parametrize("options", [
    dict(padding="CIRCULAR", strides=2),
    dict(padding="CAUSAL", kernel_dilation=2),
    pytest.param(dict(padding="REFLECT", kernel_dilation=2), marks=pytest.mark.slow),
    pytest.param(dict(padding=1, input_dilation=2), marks=pytest.mark.slow),
])
def test_conv_matches_nnx_conv_options(options):
    ks = (4,) if options.get("padding") == "CAUSAL" else (2, 2)
    conv = N.PQConv(4, D_OUT, ks, m=M, bits=BITS, rngs=nnx.Rngs(0), **options)
    ref = nnx.Conv(4, D_OUT, ks, rngs=nnx.Rngs(0), **options)
    ref.kernel[...] = conv.kernel()

    @nnx.jit
    def both(conv, ref, x):
        return conv(x), ref(x), conv(x[0, 0]), ref(x[0, 0])

    x = normal(1, (3, 2) + (8,) * len(ks) + (4,))  # 2 batch dims
    y, y_ref, y1, y1_ref = both(conv, ref, x)
    np.testing.assert_allclose(y, y_ref, **F32)
    np.testing.assert_allclose(y1, y1_ref, **F32)  # no batch dim


# -------------------------------------------------------------------------- from_pretrained
def _fit_decoded(vectors, spec=SPEC, key=7):
    return distq.pq.fit(jax.random.key(key), vectors, spec).encode(vectors)


@pytest.mark.parametrize("opq", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_dense_from_pretrained_reproduces_pq_fit(opq):
    kernel = clustered_vectors(0, D_OUT, D_IN, M, 1 << BITS).T  # columns are the vectors
    bias = jnp.linspace(-1.0, 1.0, D_OUT)
    spec = distq.PQ(m=M, bits=BITS, opq=opq)
    layer = N.PQDense.from_pretrained(kernel, bias, spec=spec, key=jax.random.key(7))
    q = _fit_decoded(kernel.T, spec)
    np.testing.assert_array_equal(layer.kernel(), q.dequantize().T)
    np.testing.assert_array_equal(layer.codes[...], q.codes)
    assert (layer.rotation is not None) == opq
    x = normal(0, (32, D_IN))
    y_float = x @ kernel + bias[None, :]
    y = layer(x, forward="table")
    np.testing.assert_allclose(y, layer(x, forward="rebuild"), **F32)
    rel = float(jnp.linalg.norm(y - y_float) / jnp.linalg.norm(y_float - bias[None, :]))
    assert rel < 0.05, rel
    if opq:  # the rotation is stored and counted
        assert layer.nbytes == 4 * math.ceil(D_OUT * M * BITS / 32) + M * 16 * 4 * 4 + \
            D_IN * D_IN * 4 + D_OUT * 4


def test_dense_from_linear_and_rngs_key():
    lin = nnx.Linear(D_IN, D_OUT, rngs=nnx.Rngs(0))
    a = N.PQDense.from_linear(lin, SPEC, key=jax.random.key(7))
    b = N.PQDense.from_pretrained(lin.kernel[...], lin.bias[...], spec=SPEC,
                                  rngs=nnx.Rngs(params=jax.random.key(7)))
    assert (a.in_features, a.out_features, a.m, a.bits) == (D_IN, D_OUT, M, BITS)
    np.testing.assert_array_equal(a.bias[...], lin.bias[...])
    assert a.kernel().shape == b.kernel().shape == (D_IN, D_OUT)


def test_embed_from_pretrained_reproduces_pq_fit():
    table = clustered_vectors(1, D_OUT, D_IN, M, 1 << BITS)
    emb = N.PQEmbed.from_embed(_embed_with(table), SPEC, key=jax.random.key(7))
    q = _fit_decoded(jnp.asarray(table))
    np.testing.assert_array_equal(emb.embedding(), q.dequantize())
    idx = jnp.array([0, 63, 17])
    np.testing.assert_array_equal(emb(idx), q[idx])
    rel = float(np.sum((np.asarray(emb.embedding()) - table) ** 2) / np.sum(table ** 2))
    assert rel < 0.01, rel


def _embed_with(table):
    emb = nnx.Embed(*table.shape, rngs=nnx.Rngs(0))
    emb.embedding[...] = jnp.asarray(table)
    return emb


@pytest.mark.parametrize("kernel_size", [(4,), (2, 2)])
def test_conv_from_pretrained_reproduces_pq_fit(kernel_size):
    cin = D_IN // math.prod(kernel_size)
    vecs = clustered_vectors(2, D_OUT, D_IN, M, 1 << BITS)
    kernel = jnp.asarray(vecs.T.reshape(kernel_size + (cin, D_OUT)))
    ref = nnx.Conv(cin, D_OUT, kernel_size, strides=2, padding="VALID", rngs=nnx.Rngs(0))
    ref.kernel[...] = kernel
    conv = N.PQConv.from_conv(ref, SPEC, key=jax.random.key(7))
    assert conv.strides == (2,) * len(kernel_size) and conv.padding == "VALID"
    q = _fit_decoded(jnp.asarray(vecs))
    np.testing.assert_array_equal(conv.kernel(), q.dequantize().T.reshape(kernel.shape))
    x = normal(4, (2,) + (8,) * len(kernel_size) + (cin,))
    y, y_float = nnx.jit(lambda a, b, x: (a(x), b(x)))(conv, ref, x)
    assert float(jnp.linalg.norm(y - y_float) / jnp.linalg.norm(y_float)) < 0.05


# ---------------------------------------------------------------------------------- gradients
def _decode_jnp(codebooks, codes):
    m = codebooks.shape[0]
    return jnp.concatenate([codebooks[s][codes[:, s]] for s in range(m)], axis=1)


@pytest.mark.parametrize("forward", ["table", "rebuild"])
def test_dense_codebook_gradient_equals_rebuilt_weight_gradient(forward):
    layer = N.PQDense(D_IN, D_OUT, m=M, bits=BITS, rngs=nnx.Rngs(0))
    x = normal(1, (6, D_IN))
    r = normal(2, (6, D_OUT))
    codes, b = layer.codes_unpacked(), layer.bias[...]

    def loss(l):
        y = l(x, forward=forward)
        return jnp.sum(y * r) + 0.5 * jnp.sum(y ** 2)

    def loss_cb(cb):
        y = x @ _decode_jnp(cb, codes).T + b[None, :]
        return jnp.sum(y * r) + 0.5 * jnp.sum(y ** 2)

    g = nnx.jit(nnx.grad(loss))(layer)
    assert "codes" not in g
    cb = layer.codebooks[...]
    g_ref = jax.jit(jax.grad(loss_cb))(cb)
    assert float(jnp.abs(g["codebooks"][...]).max()) > 0
    np.testing.assert_allclose(g["codebooks"][...], g_ref, rtol=1e-4, atol=1e-4)
    # central difference along a random direction (the loss is quadratic in the codebooks)
    d = normal(3, cb.shape)
    eps = 1e-2
    fd = jax.jit(lambda cb: (loss_cb(cb + eps * d) - loss_cb(cb - eps * d)) / (2 * eps))(cb)
    np.testing.assert_allclose(fd, jnp.vdot(g_ref, d), rtol=2e-3)


def test_embed_gradient_reaches_only_used_centroids():
    emb = N.PQEmbed(D_OUT, D_IN, m=M, bits=BITS, rngs=nnx.Rngs(0))
    idx = jnp.array([3, 5, 3])
    g = nnx.jit(nnx.grad(lambda e: jnp.sum(e(idx) ** 2)))(emb)["codebooks"][...]
    codes = np.asarray(emb.codes_unpacked())[np.asarray(idx)]
    used = np.zeros((M, 1 << BITS), bool)
    for s in range(M):
        used[s, codes[:, s]] = True
    np.testing.assert_array_equal(np.asarray(jnp.any(g != 0, axis=-1)), used)
    all_codes = emb.codes_unpacked()
    g_ref = jax.jit(jax.grad(lambda cb: jnp.sum(_decode_jnp(cb, all_codes)[idx] ** 2)))(
        emb.codebooks[...])
    np.testing.assert_allclose(g, g_ref, **F32)


def test_conv_codebook_gradient():
    conv = N.PQConv(4, D_OUT, (2, 2), m=M, bits=BITS, rngs=nnx.Rngs(0))
    x = normal(1, (2, 6, 6, 4))
    codes, b = conv.codes_unpacked(), conv.bias[...]
    g = nnx.jit(nnx.grad(lambda c: jnp.sum(c(x) ** 2)))(conv)["codebooks"][...]

    def loss_cb(cb):
        k = _decode_jnp(cb, codes).T.reshape(conv.kernel_shape)
        return jnp.sum(conv_ref(x, k, b) ** 2)

    np.testing.assert_allclose(g, jax.jit(jax.grad(loss_cb))(conv.codebooks[...]),
                               rtol=1e-4, atol=1e-4)


class _PQNet(nnx.Module):
    def __init__(self, rngs):
        self.emb = N.PQEmbed(D_OUT, D_IN, m=M, bits=BITS, rngs=rngs)
        self.conv = N.PQConv(D_IN, D_IN, (1,), m=M, bits=BITS, rngs=rngs)
        self.out = N.PQDense(D_IN, 4, m=M, bits=BITS, rngs=rngs)

    def __call__(self, tokens):
        return self.out(jax.nn.relu(self.conv(self.emb(tokens))).mean(axis=1))


def test_optimizer_trains_codebooks_and_leaves_codes():
    model = _PQNet(nnx.Rngs(0))
    tokens = randint(1, (8, 5), 0, D_OUT)
    target = normal(2, (8, 4))
    codes0 = jax.tree.map(jnp.copy, nnx.state(model, N.PQCodes))
    cb0 = model.out.codebooks[...]
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    paths = ["/".join(map(str, p)) for p, _ in jax.tree_util.tree_leaves_with_path(
        nnx.state(opt, nnx.OptState))]
    assert any("codebooks" in p for p in paths) and not any("codes" in p for p in paths)

    @nnx.jit
    def step(model, opt):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(tokens) - target) ** 2))(model)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes its int count with floats
            opt.update(model, g)
        return loss

    losses = [float(step(model, opt)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses
    codes1 = nnx.state(model, N.PQCodes)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), codes0, codes1))
    assert not bool(jnp.all(model.out.codebooks[...] == cb0))


# --------------------------------------------------------------------------------- model size
def _abstract(make):
    """The layer built under ``nnx.eval_shape``: shapes and dtypes only, nothing computed."""
    return nnx.eval_shape(make)


@pytest.mark.parametrize("bits", [1, 3, 8, 12, 16])
def test_model_size_dense_hand_computed(bits):
    d_in, d_out, m = 16, 40, 4
    layer = _abstract(lambda: N.PQDense(d_in, d_out, m=m, bits=bits, rngs=nnx.Rngs(0)))
    codes = 4 * math.ceil(d_out * m * bits / 32)
    codebooks = m * (1 << bits) * (d_in // m) * 4
    assert N.model_size(layer) == codes + codebooks + d_out * 4
    assert layer.nbytes == N.model_size(layer)


def test_model_size_concrete_layer_matches_pqarray():
    layer = N.PQDense(D_IN, D_OUT, m=M, bits=BITS, rngs=nnx.Rngs(0))
    assert layer.as_pqarray().nbytes + D_OUT * 4 == layer.nbytes == 128 + 1024 + 256


@pytest.mark.parametrize("bits", [2, 5, 11])
def test_model_size_embed_conv_and_mixed_model(bits):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.emb = N.PQEmbed(100, 12, m=3, bits=bits, rngs=rngs)
            self.conv = N.PQConv(4, 10, (3, 3), m=6, bits=bits, param_dtype=jnp.bfloat16,
                                 rngs=rngs)
            self.lin = nnx.Linear(12, 7, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)  # RNG state is not counted

    net = _abstract(lambda: Net(nnx.Rngs(0)))
    emb = 4 * math.ceil(100 * 3 * bits / 32) + 3 * (1 << bits) * 4 * 4
    conv = 4 * math.ceil(10 * 6 * bits / 32) + 6 * (1 << bits) * 6 * 2 + 10 * 2
    assert net.emb.nbytes == emb and net.conv.nbytes == conv
    assert N.model_size(net) == emb + conv + (12 * 7 + 7) * 4
    # a params pytree is counted by distq.tree_nbytes (here: without the codes)
    assert N.model_size(nnx.state(net, nnx.Param)) == N.model_size(net) - 4 * (
        math.ceil(100 * 3 * bits / 32) + math.ceil(10 * 6 * bits / 32))


# ------------------------------------------------------------------------------ bad input
def test_bad_input_errors():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="in_features=30 must be divisible by m=4"):
        N.PQDense(30, 8, m=4, rngs=rngs)
    with pytest.raises(ValueError, match="features=10 must be divisible"):
        N.PQEmbed(5, 10, m=3, rngs=rngs)
    with pytest.raises(ValueError, match="prod\\(kernel_size\\)"):
        N.PQConv(3, 4, (3, 3), m=4, rngs=rngs)
    for bits in (0, 17):
        with pytest.raises(ValueError, match="bits"):
            N.PQDense(8, 8, m=2, bits=bits, rngs=rngs)
    with pytest.raises(TypeError, match="bits"):
        N.PQDense(8, 8, m=2, bits=4.0, rngs=rngs)
    with pytest.raises(TypeError, match="m must be an int"):
        N.PQDense(8, 8, m=None, rngs=rngs)
    with pytest.raises(ValueError, match="in_features must be >= 1"):
        N.PQDense(0, 8, m=1, rngs=rngs)
    with pytest.raises(ValueError, match="forward"):
        N.PQDense(8, 8, m=2, forward="fast", rngs=rngs)
    with pytest.raises(TypeError, match="rngs"):
        N.PQDense(8, 8, m=2)
    with pytest.raises(ValueError, match="padding"):
        N.PQConv(3, 4, 3, m=3, padding="FULL", rngs=rngs)
    with pytest.raises(ValueError, match="CAUSAL"):
        N.PQConv(3, 4, (3, 3), m=3, padding="CAUSAL", rngs=rngs)
    with pytest.raises(ValueError, match="strides"):
        N.PQConv(3, 4, (3, 3), (1, 2, 3), m=3, rngs=rngs)
    with pytest.raises(ValueError, match="feature_group_count"):
        N.PQConv(3, 4, (3, 3), m=3, feature_group_count=2, rngs=rngs)
    layer = N.PQDense(D_IN, D_OUT, m=M, bits=BITS, rngs=rngs)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 16\)"):
        layer(jnp.ones((3, 7)))
    with pytest.raises(ValueError, match="forward"):
        layer(jnp.ones((3, D_IN)), forward="fast")
    emb = N.PQEmbed(D_OUT, D_IN, m=M, bits=BITS, rngs=rngs)
    with pytest.raises(TypeError, match="integer"):
        emb(jnp.ones(3))
    with pytest.raises(ValueError, match="query"):
        emb.attend(jnp.ones((2, 3)))
    conv = N.PQConv(4, D_OUT, (2, 2), m=M, bits=BITS, rngs=rngs)
    with pytest.raises(ValueError, match="inputs must have shape"):
        conv(jnp.ones((2, 8, 8, 3)))


def test_from_pretrained_errors():
    key = jax.random.key(0)
    spec = distq.PQ(m=2, bits=3)
    with pytest.raises(ValueError, match="kernel must have rank 2"):
        N.PQDense.from_pretrained(jnp.ones((2, 4, 16)), spec=spec, key=key)
    with pytest.raises(ValueError, match="kernel must have rank >= 3"):
        N.PQConv.from_pretrained(jnp.ones((4, 16)), spec=spec, key=key)
    with pytest.raises(ValueError, match="embedding must have rank 2"):
        N.PQEmbed.from_pretrained(jnp.ones(16), spec=spec, key=key)
    with pytest.raises(ValueError, match="in_features=5 must be divisible by m=2"):
        N.PQDense.from_pretrained(jnp.ones((5, 16)), spec=spec, key=key)
    with pytest.raises(ValueError, match="needs at least 2\\*\\*bits=8 vectors"):
        N.PQDense.from_pretrained(jnp.ones((4, 6)), spec=spec, key=key)
    with pytest.raises(ValueError, match="bias must have shape"):
        N.PQDense.from_pretrained(jnp.ones((4, 16)), jnp.ones(3), spec=spec, key=key)
    with pytest.raises(TypeError, match="spec must be a distq.PQ"):
        N.PQDense.from_pretrained(jnp.ones((4, 16)), spec=distq.Uniform(bits=4), key=key)
    with pytest.raises(TypeError, match="key"):
        N.PQDense.from_pretrained(jnp.ones((4, 16)), spec=spec)
    with pytest.raises(TypeError, match="floating-point"):
        N.PQDense.from_pretrained(jnp.ones((4, 16), jnp.int32), spec=spec, key=key)
    with pytest.raises(ValueError, match="NaN"):
        N.PQDense.from_pretrained(jnp.full((4, 16), jnp.nan), spec=spec, key=key)
    with pytest.raises(TypeError, match="nnx.Linear"):
        N.PQDense.from_linear(nnx.Embed(4, 4, rngs=nnx.Rngs(0)), spec, key=key)
    with pytest.raises(TypeError, match="nnx.Embed"):
        N.PQEmbed.from_embed(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), spec, key=key)


# ------------------------------------------------------------------------------------- QAT
QAT_SPECS = [
    distq.Uniform(bits=4),
    pytest.param(distq.Uniform(bits=3, axis=-1), marks=pytest.mark.slow),
    distq.NF4(group_size=16),
    distq.Cast("bfloat16"),
    STE_SPEC,
    pytest.param(distq.Scalar(bits=3), marks=pytest.mark.slow),  # full family/beta search
]


@pytest.mark.parametrize("spec", QAT_SPECS, ids=lambda s: type(s).__name__)
def test_qat_dense_forward_equals_quantized_forward(spec):
    layer = N.QATDense(D_IN, D_OUT, spec=spec, rngs=nnx.Rngs(0))
    layer.bias[...] = jnp.linspace(-1.0, 1.0, D_OUT)
    x = normal(1, (2, 3, D_IN))
    kq = layer.quantized().dequantize()
    assert not bool(jnp.all(kq == layer.kernel[...]))
    want = x @ kq + layer.bias[...][None, None, :]
    np.testing.assert_array_equal(layer(x), want)
    # under jit the quantiser is refitted inside the computation: equal up to float rounding
    np.testing.assert_allclose(nnx.jit(lambda l, x: l(x))(layer, x), want, **F32)


def test_qat_nbytes():
    layer = N.QATDense(D_IN, D_OUT, spec=distq.Uniform(bits=4), rngs=nnx.Rngs(0))
    assert layer.nbytes == layer.quantized().nbytes + D_OUT * 4
    assert N.model_size(layer) == (D_IN * D_OUT + D_OUT) * 4  # stored in float while training


@pytest.mark.parametrize("kernel_size,padding", [((4,), "SAME"), ((2, 2), "VALID")])
def test_qat_conv_forward_equals_quantized_forward(kernel_size, padding):
    conv = N.QATConv(4, D_OUT, kernel_size, spec=distq.Uniform(bits=4), padding=padding,
                     rngs=nnx.Rngs(0))
    x = normal(1, (2,) + (8,) * len(kernel_size) + (4,))
    kq = conv.quantized().dequantize()
    np.testing.assert_array_equal(conv(x), conv_ref(x, kq, conv.bias[...], padding=padding))


def _linear_like(layer):
    lin = nnx.Linear(layer.in_features, layer.out_features, rngs=nnx.Rngs(0))
    lin.kernel[...] = layer.kernel[...]
    lin.bias[...] = layer.bias[...]
    return lin


def test_qat_gradient_is_straight_through_and_masked():
    layer = N.QATDense(D_IN, D_OUT, spec=STE_SPEC, rngs=nnx.Rngs(0))
    x = normal(1, (5, D_IN))
    r = normal(2, (5, D_OUT))
    g = nnx.grad(lambda l: jnp.sum(l(x) * r))(layer)
    kernel = layer.kernel[...]
    lo, hi = distq.ste.representable_range(distq.quantize(kernel, STE_SPEC))
    mask = (kernel >= lo) & (kernel <= hi)
    assert 0 < int(jnp.sum(~mask)) < mask.size // 4
    np.testing.assert_allclose(g["kernel"][...], jnp.where(mask, x.T @ r, 0.0), **F32)
    np.testing.assert_allclose(g["bias"][...], r.sum(0), **F32)
    # without clipping the kernel gradient is the plain straight-through one
    noclip = N.QATDense.from_linear(_linear_like(layer), STE_SPEC, clip=False)
    g2 = nnx.grad(lambda l: jnp.sum(l(x) * r))(noclip)
    np.testing.assert_allclose(g2["kernel"][...], x.T @ r, **F32)


def test_qat_training_reduces_loss_on_toy_regression():
    x = normal(0, (128, D_IN))
    w = normal(1, (D_IN, 4))
    y = x @ w + 0.5
    model = N.QATDense(D_IN, 4, spec=distq.Uniform(bits=4, axis=-1), rngs=nnx.Rngs(2))
    opt = nnx.Optimizer(model, optax.adam(5e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes its int count with floats
            opt.update(model, g)
        return loss

    losses = [float(step(model, opt)) for _ in range(40)]
    assert losses[-1] < 0.1 * losses[0], losses[::10]
    # the deployed (quantised) layer computes what the QAT forward computes
    yq = x @ model.quantized().dequantize() + model.bias[...][None, :]
    np.testing.assert_allclose(yq, model(x), **F32)


def test_qat_errors():
    pq = distq.PQ(m=2)
    with pytest.raises(ValueError, match="deterministic spec.*not PQ.*PQDense"):
        N.QATDense(8, 8, spec=pq, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not PQ.*PQDense"):
        N.QATConv(2, 8, (3,), spec=pq, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not PQ.*PQDense"):
        N.QATDense.from_linear(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), pq)
    with pytest.raises(ValueError, match="not PQ.*PQDense.*pq_layers"):
        N.qat(nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0))), pq)
    with pytest.raises(TypeError, match="spec must be"):
        N.qat(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), None)
    with pytest.raises(TypeError, match="spec must be"):
        N.QATDense(8, 8, spec="int4", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="rngs"):
        N.QATDense(8, 8, spec=distq.Uniform())
    with pytest.raises(TypeError, match="nnx.Conv"):
        N.QATConv.from_conv(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), distq.Uniform())
    with pytest.raises(ValueError, match="x must have shape"):
        N.QATDense(8, 8, spec=distq.Uniform(), rngs=nnx.Rngs(0))(jnp.ones(3))


# ------------------------------------------------------------------------- model-level helpers
class _Net(nnx.Module):
    """Every PQ-convertible layer has (64, 16) vectors, so the k-means fit compiles once."""

    def __init__(self, rngs):
        self.emb = nnx.Embed(D_OUT, D_IN, rngs=rngs)
        self.conv = nnx.Conv(D_IN, D_OUT, (1,), rngs=rngs)
        self.layers = nnx.List([nnx.Linear(D_IN, D_OUT, rngs=rngs),
                                nnx.Linear(D_OUT, 3, rngs=rngs)])

    def __call__(self, tokens):
        h = self.emb(tokens)
        h = jax.nn.relu(self.conv(h) + self.layers[0](h)).mean(axis=1)
        return self.layers[1](h)


def test_qat_helper_wraps_layers_and_matches_quantized_model():
    model = _Net(nnx.Rngs(0))
    spec = distq.Uniform(bits=4)
    q = N.qat(model, spec)
    assert isinstance(q.conv, N.QATConv) and isinstance(q.layers[0], N.QATDense)
    assert isinstance(q.layers[1], N.QATDense) and isinstance(q.emb, nnx.Embed)
    assert isinstance(model.layers[0], nnx.Linear)  # the input is not modified
    ref = nnx.clone(model)
    for lin in (ref.conv, ref.layers[0], ref.layers[1]):
        lin.kernel[...] = distq.quantize(lin.kernel[...], spec).dequantize()
    tokens = randint(0, (4, 6), 0, D_OUT)
    y, y_ref = nnx.jit(lambda a, b, t: (a(t), b(t)))(q, ref, tokens)
    np.testing.assert_allclose(y, y_ref, **F32)
    only = N.qat(model, spec, filter=r"layers/\d+")
    assert isinstance(only.conv, nnx.Conv) and isinstance(only.layers[1], N.QATDense)
    first = N.qat(model, spec, filter=lambda path, mod: path == "layers/0")
    assert isinstance(first.layers[0], N.QATDense) and isinstance(first.layers[1], nnx.Linear)
    with pytest.warns(UserWarning, match="matched no layer"):
        N.qat(model, spec, filter="nothing")
    assert isinstance(N.qat(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), spec), N.QATDense)
    with pytest.raises(TypeError, match="filter"):
        N.qat(model, spec, filter=3)


def test_pq_layers_helper():
    model = _Net(nnx.Rngs(0))
    with pytest.raises(ValueError, match="layers/1"):  # 3 outputs < 16 centroids
        N.pq_layers(model, SPEC, key=jax.random.key(0))
    q = N.pq_layers(model, SPEC, key=jax.random.key(0), filter="emb|conv|layers/0")
    assert isinstance(q.emb, N.PQEmbed) and isinstance(q.conv, N.PQConv)
    assert isinstance(q.layers[0], N.PQDense) and isinstance(q.layers[1], nnx.Linear)
    assert N.model_size(q) < 0.5 * N.model_size(model)
    tokens = randint(0, (4, 6), 0, D_OUT)
    y, y_float = nnx.jit(lambda a, b, t: (a(t), b(t)))(q, model, tokens)
    assert y.shape == y_float.shape and bool(jnp.all(jnp.isfinite(y)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        N.pq_layers(model, SPEC, key=jax.random.key(0), filter="layers/0")


class _Classifier(nnx.Module):
    """A tiny classifier: only ``hidden`` (256 outputs) can take 8-bit PQ codes."""

    def __init__(self, rngs):
        self.emb = nnx.Embed(20, D_IN, rngs=rngs)  # 20 rows < 256
        self.hidden = nnx.Linear(D_IN, 256, rngs=rngs)
        self.head = nnx.Linear(256, 10, rngs=rngs)  # 10 outputs < 256


def test_pq_layers_checks_every_layer_before_converting(monkeypatch):
    calls = []

    def spy(name):
        def record(cls, layer, spec, **kwargs):
            calls.append(name)
            return layer  # nothing is fitted
        return classmethod(record)

    monkeypatch.setattr(N.PQDense, "from_linear", spy("dense"))
    monkeypatch.setattr(N.PQEmbed, "from_embed", spy("embed"))
    model = _Classifier(nnx.Rngs(0))
    spec = distq.PQ(m=M, bits=8)
    with pytest.raises(ValueError) as info:
        N.pq_layers(model, spec, key=jax.random.key(0))
    assert calls == []  # one error for all, raised before any layer is converted
    msg = str(info.value)
    assert "2 of the 3 matched layers" in msg and "distq.PQ(m=4, bits=8)" in msg
    assert "'emb': Embed, embedding (20, 16) -> 20 vectors of 16" in msg
    assert "'head': Linear, kernel (256, 10) -> 10 vectors of 256" in msg
    assert "'hidden'" not in msg.split("Each PQ layer")[0]
    assert "bits <= 3" in msg and "fewer bits" in msg and "filter=" in msg
    # the filter the message suggests leaves the two layers out
    assert "filter=lambda path, layer: path not in ['emb', 'head']" in msg
    N.pq_layers(model, spec, key=jax.random.key(0),
                filter=lambda path, layer: path not in ['emb', 'head'])
    assert calls == ["dense"]
    # a layer whose vector length m does not divide is listed too
    with pytest.raises(ValueError, match=r"'hidden': .*m=3 sub-spaces must divide"):
        N.pq_layers(model, distq.PQ(m=3, bits=2), key=jax.random.key(0), filter="hidden")
    # the model itself as the layer
    with pytest.raises(ValueError, match=r"the module itself: Linear, kernel \(256, 10\)"):
        N.pq_layers(model.head, spec, key=jax.random.key(0))
