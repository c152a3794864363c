"""Rotations: the fast transform against dense NumPy matrices, and the Rotated spec and leaf."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distq
from distq.core import hadamard as H

# sizes with every structure: powers of two, odd (dense Hartley factor), primes, odd factors
# beyond DENSE_ODD_MAX (FFT path), MiniLM's 384 and 1536
SIZES = [1, 2, 3, 5, 7, 12, 16, 96, 97, 131, 262, 384, 771, 1000, 1536]
_rotation_matrix = jax.jit(H.rotation_matrix, static_argnums=0)


def _sylvester(p):
    h = np.ones((1, 1))
    while h.shape[0] < p:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(p)


def _hartley(m):
    j = np.arange(m)[:, None] * np.arange(m)[None, :]
    return (np.cos(2 * np.pi * j / m) + np.sin(2 * np.pi * j / m)) / np.sqrt(m)


def _dense_reference(n, seed):
    """R = (H_p kron C_m) diag(s), built from the definitions in float64."""
    p = n & -n
    k = np.kron(_sylvester(p), _hartley(n // p))
    return k * H.sign_bits_numpy(seed, n)[None, :]


_rotate = jax.jit(H.rotate, static_argnums=2)
_unrotate = jax.jit(H.unrotate, static_argnums=2)


@pytest.mark.parametrize("n", SIZES)
def test_rotation_equals_dense_orthogonal_reference(n):
    r_np = _dense_reference(n, seed=11)
    if n <= 400:  # (the reference itself: orthogonal by construction)
        np.testing.assert_allclose(r_np @ r_np.T, np.eye(n), atol=1e-12)
    r = np.asarray(_rotation_matrix(n, jnp.uint32(11)), np.float64)
    np.testing.assert_allclose(r, r_np, atol=2e-6)
    np.testing.assert_allclose(r @ r.T, np.eye(n), atol=2e-6)
    # flat: every entry at most sqrt(2/n) (the incoherence bound)
    assert np.abs(r).max() <= np.sqrt(2.0 / n) * (1 + 1e-5)
    x = np.random.default_rng(n).standard_normal((5, n)).astype(np.float32)
    y = np.asarray(_rotate(x, jnp.uint32(11), 1), np.float64)
    np.testing.assert_allclose(y, x @ r_np.T, atol=3e-5 * np.sqrt(n) / 8 + 1e-5)
    back = np.asarray(_unrotate(y.astype(np.float32), jnp.uint32(11), 1))
    np.testing.assert_allclose(back, x, atol=2e-5 * max(1.0, np.log2(n)) / 4, rtol=0)


def test_fft_and_dense_odd_factors_agree():
    """The Hartley factor by a dense product (small odd factors) and by the FFT (large ones)
    are the same transform: both paths on the same sizes, against the NumPy matrix."""
    for n in (3 * 2 * 45, 771, 97):  # odd factors 135, 771 = 3 * 257, 97
        x = np.random.default_rng(n).standard_normal((4, n)).astype(np.float32)
        p = n & -n
        want = x @ np.kron(_sylvester(p), _hartley(n // p)).T
        for dense_max in (1, 10_000):  # everything by FFT / everything dense
            got = H.hadamard_transform(x, dense_max=dense_max)
            np.testing.assert_allclose(np.asarray(got), want, atol=3e-5)


def test_signs_are_fixed_by_the_seed_forever():
    """A stored seed must rebuild the same rotation in any later version: the first signs of
    seed 0 are pinned here (changing them would corrupt every stored RotatedArray)."""
    s = np.asarray(H.random_signs(0, 16))
    np.testing.assert_array_equal(s, H.sign_bits_numpy(0, 16))
    pinned = {0: "---+--+-+++-+--+", 12345: "----+--+++-+-+--"}
    for seed, want in pinned.items():
        got = np.asarray(H.random_signs(seed, 16))
        assert "".join("+" if v > 0 else "-" for v in got) == want
    a, b = np.asarray(H.random_signs(1, 4096)), np.asarray(H.random_signs(2, 4096))
    assert abs(a.mean()) < 0.05 and 0.45 < np.mean(a != b) < 0.55  # balanced, seeds differ
    np.testing.assert_array_equal(np.asarray(H.random_signs(np.uint32(1), 4096)), a)
    with pytest.raises(ValueError, match="seed"):
        H.random_signs(-1, 4)
    with pytest.raises(TypeError, match="seed"):
        H.random_signs(jnp.float32(1.0), 4)


@pytest.mark.parametrize("jit", [False, True])
def test_rotate_under_jit_and_vmap(jit):
    x = jax.random.normal(jax.random.key(2), (3, 6, 96))
    seeds = jnp.arange(3, dtype=jnp.uint32)
    rot = jax.jit(H.rotate, static_argnums=2) if jit else H.rotate
    out = jax.vmap(lambda a, s: rot(a, s, 1))(x, seeds)
    for i in range(3):
        want = np.asarray(x[i]) @ _dense_reference(96, i).T
        np.testing.assert_allclose(np.asarray(out[i]), want, atol=2e-5)
    back = jax.vmap(lambda a, s: H.unrotate(a, s, 1))(out, seeds)
    np.testing.assert_allclose(np.asarray(back), np.asarray(x), atol=2e-5)
    # other axes and dtypes
    y = H.rotate(x, 4, axis=0)
    np.testing.assert_allclose(np.asarray(y[:, 0, 0]), _dense_reference(3, 4) @ np.asarray(
        x[:, 0, 0]), atol=1e-5)
    assert H.rotate(x.astype(jnp.bfloat16), 4).dtype == jnp.bfloat16
    assert H.rotate(jnp.arange(8), 4).dtype == jnp.float32


def test_rotate_gram_is_the_gram_of_rotated_inputs():
    x = np.random.default_rng(0).standard_normal((200, 96)).astype(np.float32)
    r = _dense_reference(96, 9)
    h = x.T @ x
    np.testing.assert_allclose(np.asarray(H.rotate_gram(h, 9)), r @ h @ r.T, rtol=1e-4,
                               atol=1e-3)


def test_rotation_makes_heavy_tails_gaussian():
    """Incoherence: a Student-t(3) matrix with a planted outlier looks Gaussian once rotated."""
    rng = np.random.default_rng(1)
    w = rng.standard_t(3, size=(256, 384)).astype(np.float32)
    w[5, 7] = 300.0
    wr = np.asarray(H.rotate(w, 0, axis=1))

    def kurtosis(a):
        a = a - a.mean()
        return float((a ** 4).mean() / (a ** 2).mean() ** 2)

    rows = wr / np.sqrt(np.mean(wr ** 2, axis=1, keepdims=True))  # each row in its own units
    assert kurtosis(w) > 50 and abs(kurtosis(rows) - 3.0) < 0.2
    assert np.abs(wr[5]).max() < 300.0 * np.sqrt(2 / 384) + 20  # the outlier spread over its row


def test_split_size_and_bad_arguments():
    assert H.split_size(384) == (128, 3) and H.split_size(1536) == (512, 3)
    assert H.split_size(97) == (1, 97)
    with pytest.raises(ValueError, match="positive"):
        H.split_size(0)
    with pytest.raises(ValueError, match="axis"):
        H.rotate(jnp.ones((2, 3)), 0, axis=2)


# ----------------------------------------------------------------------------- Rotated spec
def _x(shape=(256, 384), seed=0, t=False):
    rng = np.random.default_rng(seed)
    return (rng.standard_t(4, size=shape) if t else rng.standard_normal(shape)).astype(
        np.float32)


SPECS = [distq.Rotated(distq.Scalar(bits=4)), distq.Rotated(distq.NF4(), axis=0),
         distq.Rotated(distq.Uniform(bits=4, axis=0), seed=7), distq.Rotated(distq.PQ(m=8, bits=4)),
         distq.Rotated(distq.Cast("bfloat16"), axis=0)]
IDS = ["scalar", "nf4-axis0", "int4", "pq", "cast"]


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_rotated_decodes_as_explicit_inverse_rotation(spec):
    x = _x((300, 96))
    q = distq.quantize(x, spec)
    assert isinstance(q, distq.RotatedArray) and q.shape == x.shape and q.dtype == "float32"
    assert q.nbytes == spec.nbytes(x.shape) == q.inner.nbytes + 4
    axis = spec.resolve(x.shape).axis
    r = _dense_reference(x.shape[axis], spec.seed)
    inner = np.asarray(q.inner.dequantize(), np.float64)
    want = r.T @ inner if axis == 0 else inner @ r  # R^T along the axis
    np.testing.assert_allclose(np.asarray(q.dequantize()), want, atol=3e-5)
    # the inner leaf holds the quantised *rotated* array
    xr = x.astype(np.float64) @ r.T if axis == 1 else r @ x.astype(np.float64)
    err_inner = np.mean((inner - xr) ** 2)
    err = np.mean((np.asarray(q.dequantize(), np.float64) - x) ** 2)
    np.testing.assert_allclose(err, err_inner, rtol=1e-3)  # orthogonal: same error


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_rotated_take_and_jit(spec):
    x = _x((300, 96))
    q = distq.quantize(x, spec)
    rows = np.array([[0, 299, -1], [17, 17, 150]])
    want = np.asarray(q.dequantize())[rows]
    np.testing.assert_allclose(np.asarray(q.take(rows)), want, atol=2e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda t, r: t.take(r))(q, rows)), want,
                               atol=2e-5)
    np.testing.assert_allclose(np.asarray(q[5]), np.asarray(q.dequantize())[5], atol=2e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda t: t.dequantize())(q)),
                               np.asarray(q.dequantize()), atol=1e-6)
    with pytest.raises(IndexError):
        q.take(300)
    if not isinstance(spec.spec, (distq.PQ, distq.Scalar)):  # (cheap to compile here)
        qj = jax.jit(distq.quantize, static_argnums=1)(jnp.asarray(x), spec)
        np.testing.assert_allclose(np.asarray(qj.dequantize()), np.asarray(q.dequantize()),
                                   atol=1e-5)


@pytest.mark.parametrize("spec", SPECS[1:3] + SPECS[4:], ids=IDS[1:3] + IDS[4:])
def test_rotated_vmap_gives_a_batched_leaf(spec):
    xs = np.stack([_x((64, 48), seed=i) for i in range(3)])
    q = jax.vmap(lambda a: distq.quantize(a, spec))(jnp.asarray(xs))
    assert q.shape == xs.shape and q.batch_shape == (3,) and q.seed.shape == (3,)
    assert q.nbytes == 3 * spec.nbytes(xs.shape[1:])
    for i in range(3):
        member = np.asarray(distq.quantize(xs[i], spec).dequantize())
        np.testing.assert_allclose(np.asarray(q.dequantize()[i]), member, atol=2e-5)
        np.testing.assert_allclose(np.asarray(q[i].dequantize()), member, atol=2e-5)


def test_rotation_lowers_the_error_of_heavy_tailed_weights():
    x = _x((128, 384), t=True)
    for inner in (distq.Uniform(bits=4, axis=0), distq.NF4()):
        plain = distq.quantize(x, inner)
        rot = distq.quantize(x, distq.Rotated(inner))
        e = [float(np.mean((np.asarray(q.dequantize()) - x) ** 2)) for q in (plain, rot)]
        assert e[1] < 0.8 * e[0], (inner, e)


def test_auto_axis_follows_the_role_and_plans_agree():
    spec = distq.Rotated(distq.Scalar(bits=4))
    assert spec.resolve((64, 32), "kernel").axis == 1  # Flax (in, out): the output axis
    assert spec.resolve((64, 32), "weight").axis == 0  # PyTorch (out, in)
    assert spec.resolve((1000, 32), "embedding").axis == 0
    assert spec.resolve((8, 64, 32)).axis == 2 and spec.resolve((5,)).axis == 0
    inner = spec.resolve((64, 32), "weight").spec
    assert inner == distq.Scalar(bits=4).resolve((64, 32), "weight")
    params = {"dense": {"kernel": jnp.asarray(_x((96, 64))), "bias": jnp.zeros(64)}}
    spec = distq.Rotated(distq.Uniform(bits=4))
    p = distq.plan(params, [(".*kernel", spec), (".*", None)])
    q, rep = distq.quantize_tree(params, p)
    assert rep.bytes_after == p.bytes_after and q["dense"]["kernel"].axis == 1


def test_rotated_text_form_and_validation():
    for s in SPECS + [distq.Rotated(distq.Scalar(bits=3, axis=1), axis=0, seed=2**32 - 1)]:
        assert distq.parse_spec(distq.spec_str(s)) == s, distq.spec_str(s)
    assert distq.spec_str(SPECS[1]) == "rotated(nf4),axis=0"
    assert distq.parse_spec("rotated(int:4,axis=0),seed=7") == SPECS[2]
    for bad, msg in [("rotated", "wraps a spec"), ("nf4(scalar:4)", "no inner spec"),
                     ("rotated(none)", "needs an inner spec"),
                     ("rotated(rotated(nf4))", "another Rotated"),
                     ("rotated(vq:3)", "rotates on its own"),
                     ("rotated(nf4),seed=-1", "seed"), ("rotated(nf4),axis=x", "axis")]:
        with pytest.raises(ValueError, match=msg):
            distq.parse_spec(bad)
    with pytest.raises(TypeError, match="seed"):
        distq.Rotated(distq.NF4(), seed=1.5)
    with pytest.raises(TypeError, match="spec"):
        distq.Rotated("nf4")
    assert hash(SPECS[0]) == hash(distq.Rotated(distq.Scalar(bits=4)))


def test_rotated_refuses_bad_input():
    spec = distq.Rotated(distq.NF4(group_size=8))
    x = _x((16, 8))
    x[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        distq.quantize(x, spec)
    with pytest.raises(ValueError, match="largest magnitude"):
        distq.quantize(np.full((4, 8), 3e38, np.float32), spec)
    with pytest.raises(ValueError, match="axis=5"):
        distq.quantize(_x((4, 8)), distq.Rotated(distq.NF4(group_size=8), axis=5))
    # under jit a non-finite value decodes as NaN, never as a number
    q = jax.jit(distq.quantize, static_argnums=1)(jnp.asarray(x), spec)
    assert np.isnan(np.asarray(q.dequantize())[3, 2])


def test_rotated_float64_and_bfloat16_inputs_keep_their_dtype():
    x = _x((32, 24))
    q = distq.quantize(x.astype(np.float64), distq.Rotated(distq.Uniform(bits=8)))
    assert q.dtype == "float64" and q.dequantize().dtype == jnp.float32  # no x64
    q = distq.quantize(jnp.asarray(x, jnp.bfloat16), distq.Rotated(distq.Uniform(bits=8)))
    assert q.dequantize().dtype == jnp.bfloat16


def test_rotated_checkpoint_and_state_round_trip(tmp_path):
    from distq.core.leaf import leaf_from_state, leaf_state

    tree = {"a": distq.quantize(_x((64, 48)), SPECS[0]),
            "b": distq.quantize(_x((64, 48)), SPECS[3])}
    path = tmp_path / "q.safetensors"
    distq.save(path, tree)
    back = distq.load(path)
    for k in tree:
        assert type(back[k]) is distq.RotatedArray and back[k].axis == tree[k].axis
        np.testing.assert_array_equal(np.asarray(back[k].dequantize()),
                                      np.asarray(tree[k].dequantize()))
        state = leaf_state(tree[k])
        r = leaf_from_state(distq.RotatedArray, state)
        np.testing.assert_array_equal(np.asarray(r.dequantize()), np.asarray(tree[k].dequantize()))
    meta = tree["a"].metadata()
    arrays = {k: v for k, v in leaf_state(tree["a"]).items() if k != "metadata"}
    for broken in ({**meta, "axis": 5}, {**meta, "inner_kind": "nothing"},
                   {**meta, "shape": [1, 2]}):
        with pytest.raises(ValueError, match="corrupt RotatedArray"):
            distq.RotatedArray.from_arrays(arrays, broken)
    with pytest.raises(ValueError, match="corrupt RotatedArray"):
        distq.RotatedArray.from_arrays({**arrays, "seed": np.int32(0)}, meta)


def test_rotated_leaf_is_a_registered_pytree():
    q = distq.quantize(_x((32, 24)), SPECS[0])
    assert distq.is_quantized(q)
    leaves = jax.tree.leaves(q)
    assert any(a.dtype == jnp.uint32 and a.shape == () for a in leaves)  # the seed
    q2 = jax.tree.map(lambda a: a, q)
    np.testing.assert_array_equal(np.asarray(q2.dequantize()), np.asarray(q.dequantize()))
    assert q.codes is q.inner.codes and q.codebooks is None  # inner arrays by name
