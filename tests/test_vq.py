"""Trellis-coded vector quantisation (distq.VQ): the code, Viterbi against brute force, the
decoders against a NumPy reference, storage, the leaf protocol, calibration (LDLQ)."""

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import ndtri

import distq
from distq import calibrate
from distq.core import bitpack
from distq.core import vq as V
from distq.core.specs_vq import default_state_bits


def _x(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _rel(q, x):
    x = np.asarray(x, np.float64)
    return float(np.sum((np.asarray(q.dequantize(), np.float64) - x) ** 2) / np.sum(x * x))


# --------------------------------------------------------------------------------- the code
@pytest.mark.parametrize("L", [4, 12])
def test_code_table_is_every_gaussian_quantile_once(L):
    t = V.code_table(L)
    n = 1 << L
    want = ndtri((np.arange(n) + 0.5) / n).astype(np.float32)
    np.testing.assert_array_equal(np.sort(t), want)
    assert not t.flags.writeable
    # pseudo-random order: neighbouring states are unrelated
    assert abs(np.corrcoef(t[:-1], t[1:])[0, 1]) < 0.1 if L == 12 else True


# ------------------------------------------------------------------- Viterbi vs brute force
def _cyclic_states(sym, L, k):
    """NumPy reference: state_t = the last L bits of the cyclic stream up to symbol t (symbol
    i at stream bits [i k, i k + k), least significant first), as an integer."""
    T = len(sym)
    bits = [(int(sym[i]) >> b) & 1 for i in range(T) for b in range(k)]
    return np.array([sum(bits[((t + 1) * k - L + b) % (T * k)] << b for b in range(L))
                     for t in range(T)])


def _brute(x, tab, L, k, z):
    """The least squared error over all symbol streams of len(x) values: cyclic streams whose
    last m - 1 symbols spell z (tail-biting), or with any prior state when z is None."""
    T = len(x)
    best = np.inf
    for sym in itertools.product(range(1 << k), repeat=T):
        if z is None:
            for prior in range(1 << (L - k)):
                s, cost = prior << k, 0.0
                for t in range(T):
                    s = (s >> k) | (sym[t] << (L - k))
                    cost += (x[t] - tab[s]) ** 2
                best = min(best, cost)
        else:
            if _cyclic_states(sym, L, k)[-1] >> k == z:
                best = min(best, float(np.sum((x - tab[_cyclic_states(sym, L, k)]) ** 2)))
    return best


@pytest.mark.parametrize("L,k,T", [(4, 1, 7), (4, 2, 4), (6, 3, 3), (5, 2, 4)])
def test_viterbi_finds_the_least_error_path(L, k, T):
    tab = np.asarray(V.code_table(L), np.float64)
    rng = np.random.default_rng(L + k)
    x = rng.standard_normal((T, 3)).astype(np.float32)
    zs = [-1, 0, (1 << (L - k)) - 1]
    sym = np.asarray(V._viterbi(jnp.asarray(x), jnp.asarray(V.code_table(L)),
                                jnp.asarray(zs, jnp.int32), L, k))
    assert sym.shape == (T, 3) and sym.min() >= 0 and sym.max() < 1 << k
    for lane, z in enumerate(zs):
        xs = x[:, lane].astype(np.float64)
        if z < 0:  # free start: the path's own states (prior bits unknown), cost vs brute force
            got = _brute(xs, tab, L, k, None)
        else:  # tail-biting: the cyclic states of the returned symbols are the path
            states = _cyclic_states(sym[:, lane], L, k)
            assert states[-1] >> k == z
            got = float(np.sum((xs - tab[states]) ** 2))
            assert got == pytest.approx(_brute(xs, tab, L, k, z), rel=1e-5, abs=1e-6)


def test_two_pass_tail_biting_is_near_the_best_cyclic_stream():
    L, k, T = 4, 1, 10
    tab = np.asarray(V.code_table(L), np.float64)
    x = _x((8, T), 3)
    sym = np.asarray(V._encode_blocks(jnp.asarray(x), jnp.asarray(V.code_table(L)), L, k))
    total_got = total_best = 0.0
    for i in range(8):
        got = float(np.sum((x[i] - tab[_cyclic_states(sym[i], L, k)]) ** 2))
        best = min(_brute(x[i].astype(np.float64), tab, L, k, z) for z in range(1 << (L - k)))
        assert got >= best - 1e-6  # a valid cyclic stream: never below the optimum
        total_got, total_best = total_got + got, total_best + best
    assert total_got <= 1.15 * total_best  # the two-pass choice of the wrap bits: measured 1.06


# -------------------------------------------------------------------------------- decoders
@pytest.mark.parametrize("shape,axis,L", [((50, 7), 1, 12), ((1003,), None, 9),
                                         ((3, 9, 40), 2, 12)])
def test_state_decoders_agree_with_a_numpy_reference(shape, axis, L):
    spec = distq.VQ(bits=2, block=24, state_bits=L, input_axis=axis, input_scales=None,
                    boost=0.0).resolve(shape)
    geo = V.geometry(shape, spec)
    assert geo.rows * geo.width == math.prod(shape) and geo.nb * geo.t + geo.r == geo.width
    rng = np.random.default_rng(0)
    sym = rng.integers(0, 4, (geo.rows, geo.width))
    # NumPy: blocks of t+1 (first r) and t values per row, states read cyclically in each
    want = np.zeros_like(sym)
    for row in range(geo.rows):
        start = 0
        for b in range(geo.nb):
            ln = geo.t + (b < geo.r)
            want[row, start:start + ln] = _cyclic_states(sym[row, start:start + ln], L, 2)
            start += ln
    got = np.asarray(V.states(jnp.asarray(sym, jnp.int32), geo, L, 2))
    np.testing.assert_array_equal(got, want)
    words = bitpack.pack(jnp.asarray(sym.reshape(-1), jnp.uint32), 2)
    pos = rng.integers(0, sym.size, 200).astype(np.int32)
    np.testing.assert_array_equal(
        np.asarray(V.states_at(words, jnp.asarray(pos), geo, L, 2)), want.reshape(-1)[pos])


# ----------------------------------------------------------------------- rate and distortion
@pytest.mark.parametrize("k,db", [(1, 0.65), (2, 0.9), (3, 1.15), (4, 1.45)])
def test_gaussian_source_lands_near_the_distortion_rate_bound(k, db):
    """Lloyd-Max is 1.62 / 2.74 / 3.45 / 3.86 dB above D(R) = 2^-2k; measured here on 1M values
    (experiments/vq_gaussian.py): 0.48 / 0.72 / 0.99 / 1.30 dB."""
    x = _x(1 << 14, k)
    q = distq.quantize(x, distq.VQ(bits=k))
    mse = np.mean((np.asarray(q.dequantize()) - x) ** 2) / np.var(x)
    assert 10 * np.log10(mse / 2.0 ** (-2 * k)) < db
    assert q.nbytes == (1 << 14) * k // 8 + 4  # the codes and one float32 scale


@pytest.mark.parametrize("role,shape", [("weight", (96, 256)), ("kernel", (256, 96)),
                                        ("embedding", (300, 64)), (None, (64, 48)),
                                        ("weight", (2, 384)), ("kernel", (3, 3, 16, 8))])
def test_nbytes_counts_everything_stored(role, shape):
    spec = distq.VQ(bits=3).resolve(shape, role)
    q = jax.eval_shape(lambda a: distq.quantize(a, spec), _x(shape))  # shapes only: no work
    assert q.nbytes == spec.nbytes(shape)
    n = math.prod(shape)
    size = lambda a: 0 if a is None else math.prod(a.shape) * np.dtype(a.dtype).itemsize  # noqa: E731
    n_in = 1 if spec.input_axis is None else shape[spec.input_axis]
    hi = q.boost_cols * n_in  # boosted values: 4 bits, and a mask of one bit per channel
    codes = 4 * math.ceil((n - hi) * 3 / 32) + 4 * math.ceil(hi * 4 / 32)
    codes += 4 * math.ceil(n // n_in / 32) if q.boost_cols else 0
    stored = codes + size(q.scale) + size(q.in_scale) + size(q.seed)
    assert q.nbytes == stored
    if role is not None:
        assert q.bits_per_value <= 3 + 1 / 4 + 1e-9  # the automatic budget: codes to k + 1/4
        extra = size(q.scale) + size(q.in_scale) + size(q.seed)
        assert 8 * extra <= 3 / 16 * n + 64  # scales and seed within k / 16 (+ the last words)
    else:
        assert q.seed is None and q.scale.shape == (1,)


def test_weights_get_rotation_and_scales_that_lower_the_error():
    rng = np.random.default_rng(0)
    w = (rng.standard_t(3, (256, 512)) * np.linspace(0.2, 3.0, 512)).astype(np.float32)
    plain = distq.quantize(w, distq.VQ(bits=2))
    weight = distq.quantize(w, distq.VQ(bits=2).resolve(w.shape, "weight"))
    assert weight.seed is not None and weight.scale.shape == (256,)
    assert weight.in_scale is not None and weight.in_scale.shape == (512,)
    assert weight.boost_cols > 0 and weight.bits_per_value <= 2 + 1 / 4
    assert _rel(weight, w) < 0.8 * _rel(plain, w)


@pytest.mark.parametrize("jit", [False, True])
def test_boost_gives_the_largest_channels_one_more_bit(jit):
    rng = np.random.default_rng(3)
    size = np.exp(rng.normal(0.0, 0.7, 96)).astype(np.float32)  # output channel sizes
    w = rng.standard_normal((96, 128)).astype(np.float32) * size[:, None]
    spec = distq.VQ(bits=2, input_axis=1, boost=0.25, input_scales=None, scales="channel")
    quant = jax.jit(distq.quantize, static_argnums=1) if jit else distq.quantize
    q = quant(w, spec)
    assert q.boost_cols == 24 and q.nbytes == spec.nbytes(w.shape)
    mask = np.asarray(distq.bitpack.unpack(q.codes[-3:], 1, 96)).astype(bool)
    top = np.argsort(-(w.astype(np.float64) ** 2).sum(1))[:24]  # the rotation keeps the norms
    np.testing.assert_array_equal(np.flatnonzero(mask), np.sort(top))
    d = np.asarray(q.dequantize())
    rel = ((d - w) ** 2).sum(1) / (w ** 2).sum(1)  # per output channel
    assert np.median(rel[mask]) < 0.5 * np.median(rel[~mask])  # 3 bits against 2
    plain = distq.quantize(w, dataclasses.replace(spec, boost=0.0))
    assert _rel(q, w) < 0.85 * _rel(plain, w)
    assert q.nbytes < plain.nbytes * (2.26 / 2)
    rows = np.array([0, 95, 40])
    np.testing.assert_allclose(np.asarray(q.take(rows)), d[rows], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ leaf
SPECS = [distq.VQ(bits=2), distq.VQ(bits=3, input_axis=1), distq.VQ(bits=1, input_axis=0),
         distq.VQ(bits=4, input_axis=1, rotate=False, scales="tensor", input_scales=1.0)]
IDS = ["plain", "rows", "kernel", "no-rotation"]


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_take_matches_dequantize_and_jit(spec):
    x = _x((300, 32))
    q = distq.quantize(x, spec)
    assert q.shape == x.shape and q.nbytes == spec.nbytes(x.shape)
    rows = np.array([[0, 299, -1], [17, 17, 150]])
    want = np.asarray(q.dequantize())[rows]
    np.testing.assert_allclose(np.asarray(q.take(rows)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda t, r: t.take(r))(q, rows)), want,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(q[5]), np.asarray(q.dequantize())[5], rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(IndexError):
        q.take(300)
    with pytest.raises(TypeError, match="integers"):
        q.take(jnp.ones(2))
    if spec.input_axis == 1:  # jitted quantisation (spec static) gives the same codes
        qj = jax.jit(distq.quantize, static_argnums=1)(x, spec)
        np.testing.assert_array_equal(np.asarray(qj.codes), np.asarray(q.codes))


def test_take_of_a_3d_weight_along_a_middle_input_axis():
    x = _x((20, 48, 5))
    q = distq.quantize(x, distq.VQ(bits=2, input_axis=1))
    rows = np.array([0, 7, 19])
    np.testing.assert_allclose(np.asarray(q.take(rows)), np.asarray(q.dequantize())[rows],
                               rtol=1e-5, atol=1e-5)


def test_vmap_gives_a_batched_leaf():
    xs = np.stack([_x((64, 32), i) for i in range(3)])
    spec = SPECS[1]
    q = jax.vmap(lambda a: distq.quantize(a, spec))(jnp.asarray(xs))
    assert q.shape == xs.shape and q.batch_shape == (3,)
    for i in range(3):
        member = np.asarray(distq.quantize(xs[i], spec).dequantize())
        np.testing.assert_allclose(np.asarray(q.dequantize())[i], member, atol=1e-5)
        np.testing.assert_allclose(np.asarray(q[i].dequantize()), member, atol=1e-5)


def test_non_finite_input_under_jit_decodes_as_nan_in_its_channel():
    x = _x((64, 32))
    x[3, 5] = np.nan
    q = jax.jit(distq.quantize, static_argnums=1)(x, distq.VQ(bits=2, input_axis=1,
                                                             scales="channel"))
    d = np.asarray(q.dequantize())
    assert np.isnan(d[3]).all() and np.isfinite(np.delete(d, 3, axis=0)).all()
    with pytest.raises(ValueError, match="NaN"):
        distq.quantize(x, distq.VQ(bits=2))


def test_magnitude_and_dtype_are_kept():
    x = _x((64, 32))
    q1 = distq.quantize(x, SPECS[1])
    q2 = distq.quantize(x * 2.0 ** 60, SPECS[1])
    np.testing.assert_array_equal(np.asarray(q1.codes), np.asarray(q2.codes))
    np.testing.assert_allclose(np.asarray(q2.dequantize()) / 2.0 ** 60,
                               np.asarray(q1.dequantize()), rtol=1e-6)
    qb = distq.quantize(jnp.asarray(x, jnp.bfloat16), SPECS[0])
    assert qb.dequantize().dtype == jnp.bfloat16
    z = distq.quantize(np.zeros((64, 32), np.float32), SPECS[1])
    assert np.all(np.asarray(z.dequantize()) == 0)


def test_spec_validation_text_form_and_problems():
    assert distq.parse_spec("vq:3") == distq.VQ(bits=3)
    for spec in (distq.VQ(bits=4, state_bits=8, block=64), distq.VQ(bits=1, input_axis=None),
                 distq.VQ(bits=3, boost=0.25, state_bits=9),
                 distq.VQ(bits=2, input_axis=0, scales="tensor", input_scales=0.75)):
        assert distq.parse_spec(distq.spec_str(spec)) == spec
    assert distq.spec_str(distq.VQ(bits=3, state_bits=15)) == "vq:3,state_bits=15"
    for bad, err in ((dict(bits=5), ValueError), (dict(bits=4, state_bits=7), ValueError),
                     (dict(bits=2, block=0), ValueError), (dict(scales="row"), ValueError),
                     (dict(input_scales="yes"), TypeError), (dict(input_scales=0.0), ValueError),
                     (dict(rotate=1), TypeError)):
        with pytest.raises(err):
            distq.VQ(**bad)
    assert "needs at least 12 values" in distq.VQ(bits=1).problem((5,))
    assert "out of range" in distq.VQ(input_axis=3).problem((4, 4))
    assert "state_bits >= 10" in distq.VQ(bits=4, state_bits=8, boost=0.1,
                                          input_axis=1).problem((64, 64))
    assert distq.VQ(bits=4, state_bits=8).resolve((64, 64), "weight").boost == 0.0
    with pytest.raises(ValueError, match="cannot take"):
        distq.quantize(np.ones(3, np.float32), distq.VQ(bits=2))
    assert default_state_bits(2) == 12
    # a weight gets the longer trellis, a plain array the faster one; an explicit L stays
    assert distq.VQ(bits=3).resolve((64, 64), "weight").state_bits == 14
    assert distq.VQ(bits=3).resolve((4096,)).state_bits == 12
    assert distq.VQ(bits=3, state_bits=11).resolve((64, 64), "weight").state_bits == 11
    assert distq.VQ(bits=1).resolve((64, 64), "weight").input_axis == 1
    assert distq.VQ(bits=1).resolve((64, 64), "kernel").input_axis == 0
    assert distq.VQ(bits=1).resolve((64, 64)).input_axis is None


def test_checkpoint_and_state_round_trip(tmp_path):
    from distq.core.leaf import leaf_from_state, leaf_state

    tree = {"a": distq.quantize(_x((64, 48)), SPECS[1]),
            "b": distq.quantize(_x((500,)), SPECS[0])}
    path = tmp_path / "q.safetensors"
    distq.save(path, tree)
    back = distq.load(path)
    for name, q in tree.items():
        assert type(back[name]) is distq.VQArray
        np.testing.assert_array_equal(np.asarray(back[name].dequantize()),
                                      np.asarray(q.dequantize()))
        r = leaf_from_state(distq.VQArray, leaf_state(q))
        np.testing.assert_array_equal(np.asarray(r.dequantize()), np.asarray(q.dequantize()))
    meta = tree["a"].metadata()
    arrays = {k: v for k, v in leaf_state(tree["a"]).items() if k != "metadata"}
    for broken in ({**meta, "shape": [64, 47]}, {**meta, "bits": 5}, {**meta, "input_axis": 2},
                   {**meta, "state_bits": 7}):
        with pytest.raises(ValueError, match="corrupt VQArray"):
            distq.VQArray.from_arrays(arrays, broken)
    with pytest.raises(ValueError, match="corrupt VQArray"):
        distq.VQArray.from_arrays({**arrays, "scale": np.ones(3, np.float32)}, meta)
    assert tree["a"].boost_cols > 0  # a corrupt boost mask (its last word) is refused
    codes = np.asarray(arrays["codes"]).copy()
    codes[-1] ^= np.uint32(1 << 3)
    with pytest.raises(ValueError, match="boost mask"):
        distq.VQArray.from_arrays({**arrays, "codes": codes}, meta)
    with pytest.raises(ValueError, match="earlier distq"):
        distq.VQArray.from_arrays(arrays, {**meta, "boost_rows": 3})


def test_quantize_tree_plans_and_reports_true_bytes():
    params = {"dense": {"weight": _x((128, 256)), "bias": _x((128,))}}
    q, report = distq.quantize_tree(params, [(".*weight", "vq:2"), (".*bias", None)])
    leaf = q["dense"]["weight"]
    assert type(leaf) is distq.VQArray and leaf.input_axis == 1
    assert report.bytes_after == leaf.nbytes + 128 * 4
    assert distq.plan(params, [(".*weight", "vq:2")]).bytes_after == report.bytes_after


# ------------------------------------------------------------------------------ calibration
def test_ldlq_lowers_the_output_error_at_equal_bytes():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(k1, (64, 128))  # (outputs, inputs)
    xs = jax.random.normal(k2, (512, 128)) @ jax.random.normal(k3, (128, 128))
    h = xs.T @ xs
    spec = distq.VQ(bits=2)
    q0 = distq.quantize(w, spec.resolve(w.shape, "weight"))
    q = V.quantize_ldlq(w, spec, h, axis=1)
    assert q.nbytes == q0.nbytes and q.input_axis == 1
    e0 = calibrate.output_error(w, q0.dequantize(), h)
    e = calibrate.output_error(w, q.dequantize(), h)
    assert e < 0.6 * e0
    assert 0 < q.boost_cols < 64  # the boosted output channels are coded in their own stream
    q4 = V.quantize_ldlq(w, spec, h, axis=1, group=4)  # inputs coded 4 at a time
    assert q4.nbytes == q0.nbytes
    assert calibrate.output_error(w, q4.dequantize(), h) < 1.1 * e
    # the same through the tree, with the Gram matrix traced from apply_fn
    params = {"w": w}
    cal, rep = distq.quantize_tree(params, [("w", spec)],
                                   calibration=(lambda p, x: x @ p["w"].T, (xs,)))
    assert rep.leaves[0].note == "calibrated" and cal["w"].nbytes == q0.nbytes
    assert calibrate.output_error(w, cal["w"].dequantize(), h) < 0.6 * e0
    with pytest.raises(ValueError, match="Gram matrix"):
        V.quantize_ldlq(w, spec, h[:5, :5], axis=1)
