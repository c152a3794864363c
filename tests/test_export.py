"""jax.export of a forward with quantised weights: serialise, reload, run, compare."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distq


@pytest.fixture(scope="module")
def model():
    m = nn.Sequential([nn.Dense(128), nn.relu, nn.Dense(10)])
    x = jax.random.normal(jax.random.key(0), (4, 64))
    variables = m.init(jax.random.key(1), x)
    q, _ = distq.quantize_tree(variables, [(r".*kernel", distq.Uniform(bits=4, axis=-1))])
    return m, variables, q, x


@pytest.mark.parametrize("embed", [False, True])
def test_export_round_trip(model, embed):
    m, variables, q, x = model
    exp = distq.export.export(m.apply, q, x, embed_weights=embed)
    blob = exp.serialize()
    back = jax.export.deserialize(blob)
    args = (x,) if embed else (distq.export.flat_weights(q), x)
    y = back.call(*args)
    ref = m.apply(distq.dequantize_tree(q), x)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    if embed:  # the packed weights are the constants: far below the float weights' size
        assert len(blob) < 0.5 * distq.tree_nbytes(variables)


def test_symbolic_batch(model):
    m, _, q, x = model
    b, = jax.export.symbolic_shape("b")
    exp = distq.export.export(m.apply, q, jax.ShapeDtypeStruct((b, 64), jnp.float32))
    back = jax.export.deserialize(exp.serialize())
    for n in (1, 7):
        xs = jnp.ones((n, 64))
        np.testing.assert_allclose(back.call(distq.export.flat_weights(q), xs),
                                   m.apply(distq.dequantize_tree(q), xs), rtol=1e-5, atol=1e-6)
