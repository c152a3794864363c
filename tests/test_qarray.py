"""Tests of distq.QArray: pytree behaviour, jit, serialisation and metadata validation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

import distq
from distq.core import qarray as qa

X = np.random.default_rng(7).standard_normal((32, 64)).astype(np.float32)

SPECS = {
    # a per-channel distributional spec (loc present) and two specs without loc
    "scalar": distq.Scalar(bits=3, dist="gaussian", beta=1.0, axis=-1),
    "uniform": distq.Uniform(bits=8),
    "nf4": distq.NF4(),
    "outliers": distq.Scalar(bits=3, axis=-1, outliers=0.02),
}


@pytest.fixture(scope="module", params=list(SPECS))
def q(request):
    return distq.quantize(X, SPECS[request.param])


def _same(a, b):
    """Bit-identical codes, codebook, scales and dequantized values; equal metadata."""
    assert isinstance(b, distq.QArray)
    np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
    assert np.asarray(b.codes).dtype == np.uint32
    np.testing.assert_array_equal(np.asarray(a.levels()), np.asarray(b.levels()))
    np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))
    assert (a.loc is None) == (b.loc is None)
    if a.loc is not None:
        np.testing.assert_array_equal(np.asarray(a.loc), np.asarray(b.loc))
    for f in ("outlier_index", "outlier_value"):
        assert (getattr(a, f) is None) == (getattr(b, f) is None)
        if getattr(a, f) is not None:
            np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)))
    assert a.metadata() == b.metadata()
    np.testing.assert_array_equal(np.asarray(a.dequantize()), np.asarray(b.dequantize()))
    np.testing.assert_array_equal(np.asarray(a.codes_unpacked()), np.asarray(b.codes_unpacked()))


# ------------------------------------------------------------------------------- pytree
def test_leaves_are_the_arrays(q):
    leaves = jax.tree.leaves(q)
    expected = [getattr(q, f) for f in qa.QARRAY_FIELDS if getattr(q, f) is not None]
    assert len(leaves) == len(expected)
    for a, b in zip(leaves, expected):
        assert a is b
    # metadata lives in the treedef: unflattening the same leaves gives an equal QArray
    flat, treedef = jax.tree.flatten(q)
    _same(q, jax.tree.unflatten(treedef, flat))


def test_tree_map_keeps_metadata(q):
    doubled = jax.tree.map(lambda a: a * 2 if a.dtype != jnp.uint32 else a, q)
    assert isinstance(doubled, distq.QArray)
    assert doubled.metadata() == q.metadata()
    np.testing.assert_array_equal(np.asarray(doubled.codes), np.asarray(q.codes))
    # codebook and scale doubled (and loc): the decoded values follow
    loc = 0.0 if q.loc is None else np.asarray(q.layout.from_rows(
        jnp.broadcast_to(q.loc[:, None], (q.scale.shape[0], q.size // q.scale.shape[0])),
        q.shape))
    factor = 2 if q.codebook is None else 4  # an integer grid is static: only scale doubles
    np.testing.assert_allclose(np.asarray(doubled.dequantize()),
                               factor * (np.asarray(q.dequantize()) - loc) + 2 * loc,
                               rtol=1e-5, atol=1e-5)


def test_through_jit_as_argument_and_return_value(q):
    @jax.jit
    def decode(z):
        return z.dequantize()

    # jit may fuse scale * level + loc into one FMA: equal up to an ulp
    np.testing.assert_allclose(np.asarray(decode(q)), np.asarray(q.dequantize()),
                               rtol=1e-6, atol=1e-6)

    @jax.jit
    def identity(z):
        return z

    _same(q, identity(q))

    @jax.jit
    def rescale(z):
        return jax.tree.map(lambda a: a, z), z.scale * 3

    z2, s3 = rescale(q)
    _same(q, z2)
    np.testing.assert_allclose(np.asarray(s3), 3 * np.asarray(q.scale, np.float32))


def test_quantize_inside_jit_returns_qarray():
    spec = SPECS["scalar"]
    out = jax.jit(distq.quantize, static_argnums=1)(X, spec)
    assert isinstance(out, distq.QArray)
    ref = distq.quantize(X, spec)
    np.testing.assert_array_equal(np.asarray(out.codes), np.asarray(ref.codes))
    assert out.metadata() == ref.metadata()


def test_is_qarray_as_is_leaf(q):
    tree = {"w": q, "b": jnp.ones(3), "nested": [q, 1.5]}
    assert distq.is_qarray(q) and not distq.is_qarray(jnp.ones(3)) and not distq.is_qarray(None)
    dense = jax.tree.map(
        lambda leaf: leaf.dequantize() if distq.is_qarray(leaf) else leaf,
        tree,
        is_leaf=distq.is_qarray,
    )
    ref = np.asarray(q.dequantize())
    np.testing.assert_array_equal(np.asarray(dense["w"]), ref)
    np.testing.assert_array_equal(np.asarray(dense["nested"][0]), ref)
    np.testing.assert_array_equal(np.asarray(dense["b"]), np.ones(3))
    assert dense["nested"][1] == 1.5
    # without is_leaf the QArray is flattened into its arrays instead
    n_arrays = sum(getattr(q, f) is not None for f in qa.QARRAY_FIELDS)
    assert len(jax.tree.leaves(tree)) == 2 * n_arrays + 2


def test_qarray_properties(q):
    assert q.shape == X.shape and q.size == X.size and q.ndim == 2
    assert q.dtype == "float32"
    assert q.bits_per_value == pytest.approx(8 * q.nbytes / X.size)
    assert np.asarray(q).shape == X.shape  # __array__
    assert "QArray(" in repr(q) and str(q.shape) in repr(q)


# ------------------------------------------------------------------------------- flax
def test_flax_bytes_roundtrip_with_target(q):
    blob = serialization.to_bytes(q)
    assert isinstance(blob, bytes)
    _same(q, serialization.from_bytes(q, blob))


def test_flax_bytes_roundtrip_in_a_tree(q):
    tree = {"layer": {"kernel": q, "bias": np.arange(4.0, dtype=np.float32)}}
    back = serialization.from_bytes(tree, serialization.to_bytes(tree))
    _same(q, back["layer"]["kernel"])
    np.testing.assert_array_equal(back["layer"]["bias"], np.arange(4.0))


def test_from_state_dict_without_target(q):
    state = serialization.to_state_dict(q)
    assert isinstance(state, dict)
    _same(q, qa.from_state_dict(state))
    # the state survives a msgpack round trip on its own (no QArray target needed)
    restored = serialization.msgpack_restore(serialization.msgpack_serialize(state))
    _same(q, qa.from_state_dict(restored))


def test_metadata_is_json():
    q = distq.quantize(X, distq.Scalar(bits=3, dist="gaussian", beta=1.0, group_size=16))
    meta = json.loads(json.dumps(q.metadata()))
    assert meta["shape"] == [32, 64] and meta["bits"] == 3 and meta["n"] == 8
    assert meta["layout"] == {"kind": "group", "axes": [1], "group_size": 16}
    arrays = {"codes": q.codes, "codebook": q.codebook, "scale": q.scale, "loc": q.loc}
    _same(q, distq.QArray.from_arrays(arrays, meta))


# ------------------------------------------------------------------------------- corruption
def _parts(q):
    arrays = {"codes": np.asarray(q.codes), "scale": np.asarray(q.scale)}
    for f in ("codebook", "loc", "outlier_index", "outlier_value"):
        if getattr(q, f) is not None:
            arrays[f] = np.asarray(getattr(q, f))
    return arrays, json.loads(json.dumps(q.metadata()))


def _corruptions(q):
    arrays, meta = _parts(q)
    out = {}
    m = json.loads(json.dumps(meta))
    m["shape"] = [64, 64]  # twice the values: word count no longer matches
    out["shape-doubled"] = (arrays, m)
    m = json.loads(json.dumps(meta))
    m["shape"] = [32, 63]
    out["shape-off-by-one-row"] = (arrays, m)
    a = dict(arrays)
    a["codes"] = arrays["codes"][:-1]
    out["codes-truncated"] = (a, meta)
    a = dict(arrays)
    a["codes"] = np.concatenate([arrays["codes"], arrays["codes"][:1]])
    out["codes-extra-word"] = (a, meta)
    a = dict(arrays)
    a["codes"] = arrays["codes"].astype(np.int64)
    out["codes-wrong-dtype"] = (a, meta)
    a = dict(arrays)
    a["scale"] = arrays["scale"][:-1]
    out["scale-short"] = (a, meta)
    a = dict(arrays)
    if "codebook" in arrays:
        a["codebook"] = arrays["codebook"][:-1]
    else:  # an integer grid: a stray codebook contradicts it
        a["codebook"] = np.zeros(meta["n"], np.float32)
    out["codebook-short"] = (a, meta)
    m = json.loads(json.dumps(meta))
    m["bits"] = meta["bits"] + 1
    out["bits-changed"] = (arrays, m)
    m = json.loads(json.dumps(meta))
    m["n"] = 1 << (meta["bits"] + 1)
    out["n-too-big"] = (arrays, m)
    m = json.loads(json.dumps(meta))
    del m["layout"]
    out["no-layout"] = (arrays, m)
    m = json.loads(json.dumps(meta))
    m["shape"] = ["a", 2]
    out["shape-not-int"] = (arrays, m)
    a = dict(arrays)
    del a["codes"]
    out["no-codes"] = (a, meta)
    return out


_CASES = ["shape-doubled", "shape-off-by-one-row", "codes-truncated", "codes-extra-word",
          "codes-wrong-dtype", "scale-short", "codebook-short", "bits-changed", "n-too-big",
          "no-layout", "shape-not-int", "no-codes"]


@pytest.mark.parametrize("case", _CASES)
def test_from_arrays_rejects_corruption(q, case):
    arrays, meta = _corruptions(q)[case]
    with pytest.raises(ValueError):
        distq.QArray.from_arrays(arrays, meta)


def test_from_arrays_accepts_the_uncorrupted_parts(q):
    arrays, meta = _parts(q)
    _same(q, distq.QArray.from_arrays(arrays, meta))


def test_corrupt_state_dict_rejected(q):
    state = dict(serialization.to_state_dict(q))
    meta = json.loads(state["metadata"])
    meta["shape"] = [16, 64]
    state["metadata"] = json.dumps(meta)
    with pytest.raises(ValueError):
        qa.from_state_dict(state)
    with pytest.raises(ValueError):
        serialization.from_state_dict(q, state)


def test_outlier_corruption_rejected():
    q = distq.quantize(X, SPECS["outliers"])
    arrays, meta = _parts(q)
    cases = []
    a = dict(arrays)
    a["outlier_index"] = arrays["outlier_index"][:-1]
    cases.append((a, meta))
    a = dict(arrays)
    a["outlier_value"] = arrays["outlier_value"][:-1]
    cases.append((a, meta))
    a = dict(arrays)
    del a["outlier_value"]
    cases.append((a, meta))
    m = json.loads(json.dumps(meta))
    m["outliers"] = meta["outliers"] + 1
    cases.append((arrays, m))
    m = json.loads(json.dumps(meta))
    m["outliers"] = 0
    cases.append((arrays, m))
    for arrays_c, meta_c in cases:
        with pytest.raises(ValueError):
            distq.QArray.from_arrays(arrays_c, meta_c)
