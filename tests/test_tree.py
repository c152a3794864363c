"""Whole-tree transforms: rules, report, dequantise, bytes, STE, partition, pruning, distillation."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import distq


def _params(seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    return {
        "embed": {"embedding": jax.random.normal(k[0], (512, 32))},
        "dense": {"kernel": jax.random.normal(k[1], (32, 64)) * 0.1, "bias": jnp.zeros(64)},
        "out": {"kernel": jax.random.normal(k[2], (64, 8)) * 0.1, "bias": jnp.ones(8)},
        "step": jnp.array(3, jnp.int32),
    }


def test_rules_first_match_wins_and_report():
    p = _params()
    rules = [(r".*embed.*", distq.PQ(m=8, bits=6)), (r"dense/kernel", distq.Scalar(bits=4)),
             (r".*kernel", distq.Uniform(bits=8, axis=-1)), (r".*", None)]
    q, rep = distq.quantize_tree(p, rules)
    assert isinstance(q["embed"]["embedding"], distq.pq.PQArray)
    assert q["dense"]["kernel"].method == "distributional" and q["dense"]["kernel"].bits == 4
    assert q["out"]["kernel"].method == "uniform" and q["out"]["kernel"].layout.kind == "channel"
    assert q["dense"]["bias"] is p["dense"]["bias"] and q["step"] is p["step"]
    by = {r.path: r for r in rep.leaves}
    assert set(by) == {"embed/embedding", "dense/kernel", "dense/bias", "out/kernel", "out/bias",
                       "step"}
    for path in ("dense/kernel", "out/kernel", "embed/embedding"):
        r = by[path]
        leaf = q[path.split("/")[0]][path.split("/")[1]]
        assert r.bytes_after == leaf.nbytes
        x = np.asarray(p[path.split("/")[0]][path.split("/")[1]], np.float64)
        xh = np.asarray(leaf.dequantize(), np.float64)
        assert r.rel_error == pytest.approx(((xh - x) ** 2).sum() / (x ** 2).sum(), rel=1e-4)
    assert by["dense/bias"].spec is None and by["dense/bias"].bytes_after == 256
    assert rep.bytes_before == distq.tree_nbytes(p)
    assert rep.bytes_after == distq.tree_nbytes(q)
    assert rep.unused_rules == ()
    assert "dense/kernel" in rep.table() and "total" in rep.table()


def test_non_float_leaves_kept_with_note_and_unused_rules_warned():
    p = _params()
    with pytest.warns(UserWarning, match="nothing_matches"):
        q, rep = distq.quantize_tree(p, [("nothing_matches", distq.Scalar()),
                                         (".*", distq.Uniform(bits=3))])
    assert q["step"] is p["step"]
    note = {r.path: r.note for r in rep.leaves}["step"]
    assert "not floating point" in note
    assert rep.unused_rules == ("nothing_matches",)
    # quantising again keeps already-quantised leaves
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q2, rep2 = distq.quantize_tree(q, distq.Uniform(bits=2))
    assert q2["dense"]["kernel"] is q["dense"]["kernel"]
    assert {r.path: r.note for r in rep2.leaves}["dense/kernel"] == "already quantised"


def test_callable_rules_and_single_spec():
    p = _params()
    q, _ = distq.quantize_tree(p, lambda path, x: distq.NF4() if x.ndim == 2 else None)
    assert q["dense"]["kernel"].method == "nf4" and q["dense"]["bias"] is p["dense"]["bias"]
    q, _ = distq.quantize_tree(p, distq.Uniform(bits=8))
    assert all(distq.is_quantized(q[a][b]) for a, b in [("dense", "bias"), ("out", "kernel")])


def test_linen_and_nnx_trees():
    # layers large enough that an 8-bit codebook (1 KiB) still makes them smaller
    model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(64)])
    x = jax.random.normal(jax.random.key(1), (16, 64))
    variables = model.init(jax.random.key(0), x)
    q, rep = distq.quantize_tree(variables, [(r"params/.*/kernel", distq.Scalar(bits=8))])
    assert [r.path for r in rep.quantized()] == ["params/layers_0/kernel", "params/layers_2/kernel"]
    y = model.apply(distq.dequantize_tree(q), x)
    np.testing.assert_allclose(y, model.apply(variables, x), atol=6e-2)

    m = nnx.Sequential(nnx.Linear(64, 32, rngs=nnx.Rngs(0)),
                       nnx.Linear(32, 64, rngs=nnx.Rngs(1)))
    state = nnx.state(m, nnx.Param)
    q, rep = distq.quantize_tree(state, [(r".*kernel", distq.Scalar(bits=8))])
    assert [r.path for r in rep.quantized()] == ["layers/0/kernel", "layers/1/kernel"]
    before = m(x)
    nnx.update(m, distq.dequantize_tree(q))
    np.testing.assert_allclose(m(x), before, atol=6e-2)


def test_small_leaf_is_kept_when_its_spec_would_make_it_larger():
    params = {"b": jnp.arange(10, dtype=jnp.float32), "w": jnp.ones((64, 64))}
    q, rep = distq.quantize_tree(params, distq.Scalar(bits=4))
    assert isinstance(q["b"], jax.Array) and isinstance(q["w"], distq.QArray)
    (b,) = [r for r in rep.leaves if r.path == "b"]
    assert b.spec is None and b.bytes_after == b.bytes_before == 40
    assert "would take" in b.note and "kept" in b.note
    assert distq.tree_nbytes(q) <= distq.tree_nbytes(params)


def test_spec_nbytes_is_exact_for_every_spec():
    """The plan's byte counts (made before any work) equal the stored bytes afterwards."""
    x = jax.random.normal(jax.random.key(0), (256, 64))
    specs = [distq.Scalar(bits=4), distq.Scalar(bits=3, axis=0, outliers=0.01),
             distq.Scalar(bits=2, group_size=32, scale_dtype="float16"), distq.Uniform(bits=8),
             distq.Uniform(bits=4, symmetric=False, group_size=16), distq.Uniform(bits=1),
             distq.NF4(), distq.PQ(m=8, bits=6), distq.PQ(m=4, bits=4, opq=True,
                                                          codebook_dtype="bfloat16"),
             distq.Cast("bfloat16"), distq.Cast("float16")]
    for spec in specs:
        for role in (None, "kernel") if isinstance(spec, distq.Scalar) else (None,):
            r = spec.resolve(x.shape, role=role)
            assert r.nbytes(x.shape) == distq.quantize(x, r).nbytes, (spec, role)


def test_pq_rule_on_vector_is_a_clear_error_naming_the_leaf():
    with pytest.raises(ValueError, match="dense/bias"):
        distq.quantize_tree(_params(), [(r".*bias", distq.PQ(m=2, bits=2))])


@pytest.mark.parametrize("bad", [[("(", distq.Scalar())], [("x",)], ["x"], [("x", "scalarr")],
                                 [("x", 5)], 3])
def test_bad_rules(bad):
    with pytest.raises((TypeError, ValueError)):
        distq.quantize_tree(_params(), bad)


def test_cast_rule_is_mixed_precision():
    p = _params()
    q, rep = distq.quantize_tree(p, [(r".*kernel", distq.Cast("bfloat16"))])
    k = q["dense"]["kernel"]
    assert isinstance(k, distq.CastArray) and k.nbytes == 32 * 64 * 2
    d = distq.dequantize_tree(q)["dense"]["kernel"]
    assert d.dtype == jnp.float32
    np.testing.assert_array_equal(d, p["dense"]["kernel"].astype(jnp.bfloat16).astype(jnp.float32))
    with pytest.raises(ValueError, match="dtype"):
        distq.Cast("int8")


def test_dequantize_tree_jit_matches_eager_and_quantize_tree_under_jit():
    p = _params()
    rules = [(r".*kernel", distq.Scalar(bits=4, axis=-1, dist="gaussian", beta=1.0)),
             (r".*bias", distq.Uniform(bits=8))]
    q, _ = distq.quantize_tree(p, rules)
    a = distq.dequantize_tree(q)
    b = jax.jit(distq.dequantize_tree)(q)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):  # FMA under jit: 1 ulp
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)

    def f(p):
        return distq.quantize_tree(p, rules)[0]

    qj = jax.jit(f)(p)
    np.testing.assert_array_equal(qj["dense"]["kernel"].codes, q["dense"]["kernel"].codes)


def test_tree_nbytes_counts_packed_codes():
    p = {"w": jnp.zeros((100, 30)), "i": jnp.zeros(5, jnp.int8)}
    q, _ = distq.quantize_tree(p, [("w", distq.Uniform(bits=3)), ("i", None)])
    w = q["w"]
    assert w.codebook is None  # an integer grid: its scale is all it stores beside the codes
    expect = (100 * 30 * 3 + 31) // 32 * 4 + w.scale.size * 4 + 5
    assert distq.tree_nbytes(q) == expect


# ---------------------------------------------------------------------------------- STE
@pytest.mark.parametrize("spec,jit", [
    (distq.Scalar(bits=3), False), pytest.param(distq.Scalar(bits=3), True, marks=pytest.mark.slow),
    (distq.Uniform(bits=4, axis=0), False), (distq.Uniform(bits=4, axis=0), True),
    (distq.NF4(group_size=32), True),
    (distq.Scalar(bits=2, group_size=16, dist="gaussian", beta=1.5), True),
    pytest.param(distq.Scalar(bits=2, group_size=16), True, marks=pytest.mark.slow),
])
def test_fake_quantize_forward_exact_and_gradient_masked(spec, jit):
    x = jax.random.normal(jax.random.key(2), (64, 32)) * 2.0
    f = lambda x: distq.fake_quantize(x, spec)  # noqa: E731
    ref = lambda x: distq.quantize(x, spec).dequantize()  # noqa: E731
    f, ref = (jax.jit(f), jax.jit(ref)) if jit else (f, ref)
    np.testing.assert_array_equal(f(x), ref(x))
    g = jax.grad(lambda x: (f(x) * 3.0).sum())(x)
    lo, hi = distq.ste.representable_range(distq.quantize(x, spec))
    inside = (x >= lo) & (x <= hi)
    np.testing.assert_array_equal(g, jnp.where(inside, 3.0, 0.0))
    g2 = jax.grad(lambda x: distq.fake_quantize(x, spec, clip=False).sum())(x)
    np.testing.assert_array_equal(g2, jnp.ones_like(x))


def test_fake_quantize_clips_only_outside_the_codebook():
    x = jnp.concatenate([jax.random.normal(jax.random.key(3), (1000,)), jnp.array([50.0])])
    q = distq.quantize(x, distq.Scalar(bits=2, beta=3.0, refine=False, dist="gaussian"))
    hi = float(q.scale[0] * q.levels().max() + (0 if q.loc is None else q.loc[0]))
    g = jax.grad(lambda x: distq.fake_quantize(
        x, distq.Scalar(bits=2, beta=3.0, refine=False, dist="gaussian")).sum())(x)
    np.testing.assert_array_equal(np.asarray(g) == 0, np.asarray(jnp.abs(x) > hi) |
                                  np.asarray(x < float(q.scale[0] * q.levels().min() +
                                                       (0 if q.loc is None else q.loc[0]))))
    assert g[-1] == 0


def test_fake_quantize_tree_with_masks_keeps_pruned_zero():
    p = _params()
    pruned, masks = distq.prune_magnitude(p, 0.5)
    fq = distq.fake_quantize_tree(p, [(r".*kernel", distq.Uniform(bits=3))], masks=masks)
    k = np.asarray(fq["dense"]["kernel"])
    assert np.all(k[~np.asarray(masks["dense"]["kernel"])] == 0)
    with pytest.raises(ValueError, match="PQ"):
        distq.fake_quantize(p["dense"]["kernel"], distq.PQ(m=2))


def test_partition_combine_trains_codebooks_with_optax():
    w = jax.random.normal(jax.random.key(4), (64, 16))
    q, _ = distq.quantize_tree({"w": w}, distq.Scalar(bits=2, refine=False, dist="gaussian",
                                                      beta=4.0))
    train, rest = distq.partition(q)
    assert train["w"].codes is None and rest["w"].codes is not None
    x = jax.random.normal(jax.random.key(5), (128, 64))
    y = x @ w

    def loss(t):
        wh = distq.dequantize_tree(distq.combine(t, rest))["w"]
        return jnp.mean((x @ wh - y) ** 2)

    opt = optax.adam(1e-2)
    st = opt.init(train)
    l0 = loss(train)
    step = jax.jit(lambda t, s: (lambda g: (lambda u, s2: (optax.apply_updates(t, u), s2))(
        *opt.update(g, s, t)))(jax.grad(loss)(t)))
    with jax.numpy_dtype_promotion("standard"):  # optax's adam mixes its int count with floats
        for _ in range(50):
            train, st = step(train, st)
    assert loss(train) < 0.8 * l0
    merged = distq.combine(train, rest)
    np.testing.assert_array_equal(merged["w"].codes, q["w"].codes)
    assert distq.labels(q)["w"].codes == "frozen"


# ---------------------------------------------------------------------------------- pruning
def test_prune_magnitude_global_and_per_leaf():
    p = _params()
    pruned, masks = distq.prune_magnitude(p, 0.8)
    assert masks["dense"]["bias"] is None and masks["step"] is None
    sel = [("embed", "embedding"), ("dense", "kernel"), ("out", "kernel")]
    total = sum(p[a][b].size for a, b in sel)
    kept = sum(int(masks[a][b].sum()) for a, b in sel)
    assert abs((total - kept) - 0.8 * total) <= 1
    mags = np.concatenate([np.abs(np.asarray(p[a][b])).ravel() for a, b in sel])
    keep = np.concatenate([np.asarray(masks[a][b]).ravel() for a, b in sel])
    thr_kept, thr_cut = mags[keep].min(), mags[~keep].max()
    assert thr_cut <= thr_kept
    for a, b in sel:
        np.testing.assert_array_equal(pruned[a][b], jnp.where(masks[a][b], p[a][b], 0))
    _, m2 = distq.prune_magnitude(p, 0.5, scope="leaf", rules=[r".*kernel"])
    assert m2["embed"]["embedding"] is None
    for a, b in [("dense", "kernel"), ("out", "kernel")]:
        assert int((~m2[a][b]).sum()) == p[a][b].size // 2
    assert distq.sparsity(pruned, masks) == pytest.approx(0.8, abs=1e-3)


def test_prune_structured_removes_whole_columns():
    p = _params()
    pruned, masks = distq.prune_structured(p, 0.25, axis=-1, rules=[r"dense/kernel"])
    k = np.asarray(pruned["dense"]["kernel"])
    zero_cols = np.where(np.all(k == 0, axis=0))[0]
    assert len(zero_cols) == 16
    norms = np.linalg.norm(np.asarray(p["dense"]["kernel"]), axis=0)
    assert set(zero_cols) == set(np.argsort(norms)[:16])
    with pytest.raises(ValueError, match="ratio"):
        distq.prune_structured(p, 1.0)


def test_masked_updates_keep_pruned_weights_zero():
    p = _params()
    pruned, masks = distq.prune_magnitude(p, 0.5)
    trainable = {k: v for k, v in pruned.items() if k != "step"}
    tmask = {k: v for k, v in masks.items() if k != "step"}
    opt = optax.chain(optax.adam(1e-1), distq.masked_updates(tmask))
    st = opt.init(trainable)
    g = jax.tree.map(jnp.ones_like, trainable)
    with jax.numpy_dtype_promotion("standard"):  # optax's adam mixes its int count with floats
        for _ in range(3):
            u, st = opt.update(g, st, trainable)
            trainable = optax.apply_updates(trainable, u)
    k = trainable["dense"]["kernel"]
    assert np.all(np.asarray(k)[~np.asarray(masks["dense"]["kernel"])] == 0)
    assert np.any(np.asarray(trainable["dense"]["bias"]) != 0)


def test_distillation_loss_matches_numpy():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(8, 5)), rng.normal(size=(8, 5))
    T = 3.0

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    pt, ps = softmax(t / T), softmax(s / T)
    ref = (pt * (np.log(pt) - np.log(ps))).sum(-1).mean() * T * T
    got = distq.distillation_loss(jnp.asarray(s), jnp.asarray(t), T)
    assert float(got) == pytest.approx(ref, rel=1e-5)
    labels = jnp.asarray(rng.integers(0, 5, 8))
    ce = -np.log(softmax(s))[np.arange(8), np.asarray(labels)].mean()
    got = distq.distillation_loss(jnp.asarray(s), jnp.asarray(t), T, labels=labels, alpha=0.3)
    assert float(got) == pytest.approx(0.3 * ref + 0.7 * ce, rel=1e-5)
    g = jax.grad(lambda t_: distq.distillation_loss(jnp.asarray(s), t_, T))(jnp.asarray(t))
    np.testing.assert_array_equal(g, 0.0)
