"""distq.quantized_apply: same results as the dequantize_tree path, in the memory of the codes.

Also the decode fast paths it relies on (QArray/PQArray/CastArray ``dequantize_slice``,
``unpack_words``/``unpack_block``, ``lookup_levels`` in both its CPU and its portable form), the
jaxpr interpreter (:mod:`distq._jaxpr`) and export on the same path.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distq
from distq import runtime
from distq._jaxpr import Interpreter, Tracked
from distq.core import bitpack
from distq.core.qarray import lookup_levels, unpack_block, unpack_words


def _normal(shape, seed=0, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
                       * scale)


def _params(seed=0):
    return {
        "emb": _normal((300, 32), seed),                # gathered rows
        "pos": _normal((64, 32), seed + 1),             # sliced rows
        "w1": _normal((32, 48), seed + 2, 0.2),         # x @ w1 (Flax kernel layout)
        "w2": {"weight": _normal((32, 48), seed + 3, 0.2)},  # h @ w2.T (PyTorch layout)
        "gain": _normal((32,), seed + 4),               # float leaf, kept
        "mix": _normal((32, 32), seed + 5, 0.1),        # used elementwise: decoded whole
    }


def _apply(p, ids):
    t = ids.shape[-1]
    x = jnp.take(p["emb"], ids, axis=0) + p["pos"][:t][None]
    h = jax.nn.gelu(x @ p["w1"])
    y = h @ p["w2"]["weight"].T
    y = y * p["gain"][None, None] + jnp.tanh(p["mix"]).sum(0)[None, None]
    return jnp.einsum("...td,de->...te", y, p["w1"]).mean(-2)


def _scalar(bits, **kw):  # a fixed prior: no search to compile (fast tests)
    return distq.Scalar(bits=bits, dist="gaussian", beta=1.0, refine=False, **kw)


RULES = [("emb", _scalar(4, axis=1, outliers=0.01)),
         ("pos", distq.Uniform(bits=8, axis=0)),
         ("w1", distq.NF4(group_size=16)),
         ("w2/weight", _scalar(4, axis=1, outliers=0.02)),
         ("mix", distq.Cast("bfloat16")),
         (".*", None)]


@pytest.fixture(scope="module")
def model():
    q, _ = distq.quantize_tree(_params(), RULES, errors=False)
    ids = jnp.asarray(np.random.default_rng(7).integers(0, 300, size=(3, 10)), jnp.int32)
    return q, ids


def _close(a, b, tol=1e-4):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


# whole weights; a few tiles (unrolled); > 16 tiles of w1 (a loop); never tiled
@pytest.mark.parametrize("tile_bytes", [4 << 20, 2048, 256, None],
                         ids=["whole", "unrolled", "loop", "never"])
def test_equals_dequantize_tree(model, tile_bytes):
    q, ids = model
    want = jax.jit(lambda q, i: _apply(distq.dequantize_tree(q), i))(q, ids)
    got = jax.jit(distq.quantized_apply(_apply, tile_bytes=tile_bytes))(q, ids)
    _close(got, want)


# the newer leaf types run through the same path: VQ (trellis codes; rows decoded alone by a
# gather) and Rotated (decoded then rotated back)
@pytest.mark.parametrize("spec", [distq.VQ(bits=3), distq.Rotated(_scalar(4, axis=1))],
                         ids=["vq", "rotated"])
def test_vq_and_rotated_leaves(spec):
    p = _params(3)
    rules = [("emb|w1|w2/weight", spec), (".*", None)]
    q, _ = distq.quantize_tree(p, rules, errors=False)
    ids = jnp.asarray(np.random.default_rng(8).integers(0, 300, size=(2, 7)), jnp.int32)
    want = _apply(distq.dequantize_tree(q), ids)
    _close(jax.jit(distq.quantized_apply(_apply, tile_bytes=2048))(q, ids), want)


def test_runs_without_jit(model):
    q, ids = model

    def fn(p, ids):
        return (jnp.take(p["emb"], ids, axis=0) @ p["w1"]) @ p["w2"]["weight"].T

    _close(distq.quantized_apply(fn, tile_bytes=2048)(q, ids),  # compiles itself
           fn(distq.dequantize_tree(q), ids))
    x = _normal((2, 32), 5)
    _close(distq.quantized_apply(lambda p, x: x @ p["w1"], jit=False)(q, x),  # op by op
           x @ q["w1"].dequantize())


def test_gather_reads_only_rows_and_honours_the_index_mode():
    table = _normal((200, 16))
    q = distq.quantize(table, distq.Uniform(bits=4, axis=0))
    ids = jnp.array([0, 5, 199, 250, -3])  # 250 out of range, -3 counts from the end (jnp)
    for fn in (lambda p, i: jnp.take(p, i, axis=0),  # mode fill: NaN rows
               lambda p, i: p[i],  # promise in bounds (clamped)
               lambda p, i: jnp.take(p, i, axis=0, mode="clip")):
        got = jax.jit(distq.quantized_apply(fn))(q, ids)
        want = fn(q.dequantize(), ids)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        _close(jnp.nan_to_num(got), jnp.nan_to_num(want), 1e-6)
    # the embedding table is never decoded whole: no temporary near its size
    c = jax.jit(distq.quantized_apply(lambda p, i: p[i])).lower(q, ids).compile()
    assert c.memory_analysis().temp_size_in_bytes < table.nbytes / 4


def test_flax_linen_and_nnx_models_unchanged():
    import flax.linen as nn
    from flax import nnx

    model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(8)])
    x = _normal((4, 32), 3)
    variables = model.init(jax.random.key(0), x)
    qv, _ = distq.quantize_tree(variables, [(".*kernel", distq.Uniform(bits=4)), (".*", None)],
                                errors=False)
    _close(jax.jit(distq.quantized_apply(model.apply))(qv, x),
           model.apply(distq.dequantize_tree(qv), x), 1e-5)

    m = nnx.Linear(32, 16, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(m)
    qs, _ = distq.quantize_tree(state, [(".*kernel", distq.NF4()), (".*", None)], errors=False)

    def apply(s, x):
        return nnx.merge(graphdef, s)(x)

    _close(jax.jit(distq.quantized_apply(apply))(qs, x), apply(distq.dequantize_tree(qs), x),
           1e-5)


@pytest.fixture(scope="module")
def pq_leaf():
    return distq.pq.quantize(jax.random.key(0), _normal((256, 32), 1), distq.PQ(m=4, bits=4))


def test_pq_leaf_rows_and_products(pq_leaf):
    q = pq_leaf
    p = {"e": q, "v": _normal((32, 8), 2)}
    ids = jnp.array([[1, 2, 255], [7, 7, 0]])

    def fn(p, i):
        rows = p["e"][i]  # a row gather
        logits = rows @ p["e"].T  # the matrix in a product (tied output)
        return logits.sum(-1) + (p["e"] @ p["v"]).sum()

    want = jax.jit(lambda p, i: fn(distq.dequantize_tree(p), i))(p, ids)
    for tb in (1 << 20, 4096):  # whole, and tiles over the rows
        _close(jax.jit(distq.quantized_apply(fn, tile_bytes=tb))(p, ids), want, 1e-3)


def test_vmap_over_inputs_keeps_decodes_unbatched(model):
    q, ids = model
    g = distq.quantized_apply(_apply, tile_bytes=2048)
    batch = jnp.stack([ids, ids[::-1], ids + 1])
    got = jax.jit(jax.vmap(g, in_axes=(None, 0)))(q, batch)
    want = jax.vmap(lambda i: _apply(distq.dequantize_tree(q), i))(batch)
    _close(got, want)
    # decodes are not batched: no dot_general carries the vmap axis on the weight side
    jaxpr = jax.make_jaxpr(jax.vmap(g, in_axes=(None, 0)))(q, batch)
    shapes = [tuple(e.invars[1].aval.shape) for e in jaxpr.jaxpr.eqns
              if e.primitive.name == "dot_general"]
    assert shapes and all(len(s) == 2 for s in shapes)


def test_grad_wrt_inputs_and_float_leaves(model):
    q, ids = model
    x = _normal((3, 10, 32), 9)

    def fn(p, x):
        return jnp.sum(jnp.tanh(x @ p["w1"]) @ p["w2"]["weight"].T)

    g = distq.quantized_apply(fn, tile_bytes=2048)  # tiled: grads through the tiles
    # QAT of codebooks and scales: gradients w.r.t. the float arrays inside the leaves
    train, rest = distq.partition(q)
    grads = jax.jit(jax.grad(lambda t, x: g(distq.combine(t, rest), x), argnums=(0, 1)))
    got_t, got_x = grads(train, x)
    want_t, want_x = jax.jit(jax.grad(
        lambda t, x: fn(distq.dequantize_tree(distq.combine(t, rest)), x), argnums=(0, 1)))(
        train, x)
    _close(got_x, want_x)
    assert got_t["w2"]["weight"].codebook is not None
    for a, b in zip(jax.tree.leaves(got_t), jax.tree.leaves(want_t)):
        _close(a, b, 1e-3)


def test_memory_is_that_of_the_codes():
    k = 256
    params = {f"w{i}": _normal((k, k), i, 0.05) for i in range(6)}

    def fn(p, x):
        for i in range(6):
            x = jax.nn.relu(x @ p[f"w{i}"])
        return x

    x = _normal((4, k), 9)
    q, _ = distq.quantize_tree(params, distq.Uniform(bits=4), errors=False)

    def total(f, *args):
        m = jax.jit(f).lower(*args).compile().memory_analysis()
        return m.argument_size_in_bytes + m.temp_size_in_bytes

    float_b = total(fn, params, x)
    deq_b = total(lambda q, x: fn(distq.dequantize_tree(q), x), q, x)
    # ordered decodes: one decoded weight at a time (no tiling), then one tile at a time
    whole = total(distq.quantized_apply(fn, tile_bytes=None), q, x)
    tiled = total(distq.quantized_apply(fn, tile_bytes=64 << 10), q, x)
    assert deq_b > 0.9 * float_b
    assert whole < 0.35 * float_b and tiled < 0.25 * float_b, (float_b, whole, tiled)
    _close(jax.jit(distq.quantized_apply(fn, tile_bytes=64 << 10))(q, x),
           fn(distq.dequantize_tree(q), x), 1e-5)


def test_export_runs_the_same_path(model):
    q, ids = model
    exp = distq.export.export(_apply, q, ids)
    back = jax.export.deserialize(exp.serialize())
    _close(back.call(distq.export.flat_weights(q), ids), _apply(distq.dequantize_tree(q), ids))
    text = exp.mlir_module()
    assert "f32[300,32]" not in text and "300x32xf32" not in text  # the table is never built


def test_options_are_checked():
    with pytest.raises(ValueError, match="tile_bytes"):
        distq.quantized_apply(_apply, tile_bytes=0)
    with pytest.raises(TypeError, match="callable"):
        distq.quantized_apply(3)


# ------------------------------------------------------------------------------ decode paths
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_unpack_words_and_blocks_match_bitpack(bits):
    rng = np.random.default_rng(bits)
    rows, row_len = 5, 48
    codes = rng.integers(0, 1 << bits, size=rows * row_len).astype(np.uint32)
    words = bitpack.pack(codes, bits)
    np.testing.assert_array_equal(np.asarray(unpack_words(words, bits, codes.size)), codes)
    grid = codes.reshape(rows, row_len)
    for s0, count, unit in [(0, 16, 16), (8, 8, 8), (3, 7, 1), (40, 8, 8), (41, 7, 1)]:
        got = np.asarray(jax.jit(lambda w, s: unpack_block(w, bits, rows, row_len, s, count,
                                                           unit))(words, s0))
        np.testing.assert_array_equal(got, grid[:, s0:s0 + count])
    flat = np.asarray(unpack_block(words, bits, 1, codes.size, 37, 50))
    np.testing.assert_array_equal(flat[0], codes[37:87])


@pytest.mark.parametrize("n", [1, 3, 16, 200])
def test_lookup_levels_select_and_gather_agree(n):
    lv = _normal((n,), n)
    c = jnp.asarray(np.random.default_rng(n).integers(0, 256, size=1000), jnp.uint32)
    want = np.asarray(lv)[np.minimum(np.asarray(c), n - 1)]
    for method in ("select", "gather", None):
        np.testing.assert_array_equal(np.asarray(lookup_levels(lv, c, method)), want)
    with pytest.raises(ValueError, match="method"):
        lookup_levels(lv, c, "table")


def _reference(q):
    """Independent numpy decode of a QArray (float64)."""
    g = q.layout.num_groups(q.value_shape)
    c = np.asarray(bitpack.unpack(q.codes, q.bits, q.value_size)).astype(np.int64)
    z = np.asarray(q.levels(), np.float64)[np.minimum(c, q.n - 1)]
    if q.n_outliers:
        z[np.asarray(q.outlier_positions()).astype(np.int64)] = np.asarray(q.outlier_value,
                                                                           np.float64)
    z = z.reshape(g, -1)
    s = np.asarray(q.scale.astype(jnp.float32), np.float64)
    z = z * np.where(np.signbit(s), np.nan, s)[:, None]
    if q.loc is not None:
        z = z + np.asarray(q.loc.astype(jnp.float32), np.float64)[:, None]
    perm = q.layout.perm(len(q.value_shape))
    return np.transpose(z.reshape([q.value_shape[a] for a in perm]), np.argsort(perm))


SLICE_SPECS = [_scalar(4, axis=0, outliers=0.02), _scalar(3, axis=1),
               distq.Uniform(bits=4, symmetric=False, group_size=6, group_axis=None),
               distq.Uniform(bits=2, group_size=4, group_axis=0)]


@pytest.mark.parametrize("spec", SLICE_SPECS, ids=distq.spec_str)
def test_qarray_decode_and_slices_match_numpy(spec):
    x = _normal((24, 48), 3)
    q = distq.quantize(x, spec)
    ref = _reference(q)
    _close(q.dequantize(), ref, 1e-6)
    sl = jax.jit(lambda q, s, size, axis: q.dequantize_slice(s, size, axis),
                 static_argnums=(2, 3))
    for axis in (0, 1):
        for start, size in [(0, 8), (5, 3), (20, 8)]:  # aligned, unaligned, clamped
            want = np.take(ref, np.arange(min(start, ref.shape[axis] - size),
                                          min(start, ref.shape[axis] - size) + size), axis)
            _close(sl(q, start, size, axis), want, 1e-6)
    with pytest.raises(ValueError, match="size"):
        q.dequantize_slice(0, 0)
    with pytest.raises(ValueError, match="axis"):
        q.dequantize_slice(0, 1, axis=2)


def test_cast_and_pq_slices(pq_leaf):
    c = distq.quantize(_normal((6, 10)), distq.Cast("bfloat16"))
    _close(c.dequantize_slice(2, 3, axis=1), c.dequantize()[:, 2:5], 0)
    q = pq_leaf
    sl = jax.jit(lambda q, s: q.dequantize_slice(s, 16))
    for start in (0, 240, 17):  # aligned, last, unaligned
        _close(sl(q, start), q.dequantize()[start:start + 16], 0)
    _close(q.dequantize_slice(3, 4, axis=1), q.dequantize()[:, 3:7], 0)


# ------------------------------------------------------------------------------ interpreter
def test_interpreter_follows_views_and_nested_calls():
    w = _normal((4, 6))
    x = _normal((3, 4), 1)

    @jax.jit
    def inner(w, x):
        return x @ w.astype(jnp.bfloat16).astype(jnp.float32)

    def fn(w, x):
        return inner(w.T.T, x) + jnp.sum(w)

    closed = jax.make_jaxpr(fn)(w, x)
    met = []

    def dot(interp, eqn, invals):
        t = invals[1]
        met.append((t.perm, [p.name for p, _ in t.casts]))
        return None

    interp = Interpreter(lambda t: t.apply(w), rules={"dot_general": dot})
    (y,) = interp.run(closed.jaxpr, closed.consts, [Tracked.of("w", w), x])
    _close(y, fn(w, x), 1e-6)
    assert met == [((0, 1), ["convert_element_type", "convert_element_type"])]


def test_after_orders_without_changing_values():
    w = jnp.array([-0.0, 1.5, jnp.inf, jnp.nan])
    codes = jnp.arange(4, dtype=jnp.uint32)
    for data in ([jnp.ones(2)], [jnp.array([jnp.nan])], [jnp.array([-jnp.inf])],
                 [jnp.zeros(0), jnp.array([3], jnp.int32)]):
        w2, c2 = runtime.after(data, [w, codes])
        np.testing.assert_array_equal(np.asarray(w2), np.asarray(w))
        assert bool(jnp.signbit(w2[0]))
        np.testing.assert_array_equal(np.asarray(c2), np.asarray(codes))
    # batched data leaves the arrays unbatched; the derivative goes to the arrays only
    out = jax.vmap(lambda d: runtime.after([d], [w[:2]])[0].sum())(jnp.ones((5, 3)))
    np.testing.assert_array_equal(np.asarray(out), np.full(5, 1.5, np.float32))
    g = jax.grad(lambda d, a: runtime.after([d], [a])[0].sum(), argnums=(0, 1))(
        jnp.ones(3), jnp.ones(2))
    np.testing.assert_array_equal(np.asarray(g[0]), 0.0)
    np.testing.assert_array_equal(np.asarray(g[1]), 1.0)


def test_leaf_without_slices_still_works():
    @dataclasses.dataclass(frozen=True)
    class Plain:  # only the required protocol: dequantize and take
        inner: distq.QArray

        def dequantize(self, dtype=None):
            return self.inner.dequantize(dtype)

        def take(self, rows, dtype=None):
            return self.inner.take(rows, dtype)

    q = distq.quantize(_normal((64, 64)), distq.Uniform(bits=4))
    jax.tree_util.register_dataclass(Plain, data_fields=["inner"], meta_fields=[])
    aval = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    closed = jax.make_jaxpr(lambda w, x: x @ w + w[jnp.array([1, 2])].sum())(
        jnp.zeros((64, 64)), jnp.ones((2, 64)))
    interp = runtime.interpreter(runtime.RuntimeOptions(tile_bytes=1024))
    (y,) = jax.jit(lambda p, x: interp.run(closed.jaxpr, closed.consts,
                                           [Tracked.of(p, aval), x]))(Plain(q), jnp.ones((2, 64)))
    w = q.dequantize()
    _close(y, jnp.ones((2, 64)) @ w + w[jnp.array([1, 2])].sum(), 1e-5)
