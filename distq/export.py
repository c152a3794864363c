"""Portable artefacts: a model's forward with its weights kept quantised, through ``jax.export``.

The exported StableHLO takes the packed codes, codebooks and scales as inputs (or embeds them as
constants) and decodes each weight inside the graph where it is used, as
:func:`distq.quantized_apply` does (embedding rows gathered from their codes, large matrices
decoded tile by tile), so the artefact (or the arrays shipped beside it) stays as small as the
quantised checkpoint and runs in about the memory of the packed weights; any JAX runtime can
deserialise and run it without distq.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax import export as jex

from .runtime import quantized_apply


def export(apply_fn: Callable, qtree: Any, *example_args, embed_weights: bool = False,
           platforms: tuple[str, ...] | None = None, **runtime_options) -> jex.Exported:
    """Exports ``apply_fn(dequantize_tree(qtree), *args)`` with ``jax.export``, each weight
    decoded where it is used (:func:`distq.quantized_apply`).

    Args:
      apply_fn: ``apply_fn(params, *args)``, a pure JAX function of the float tree.
      qtree: the quantised tree (from :func:`distq.quantize_tree` or :func:`distq.load`).
      example_args: arrays or ``jax.ShapeDtypeStruct`` giving the argument shapes (use
        ``jax.export.symbolic_shape`` for a symbolic batch).
      embed_weights: bake the packed arrays into the artefact as constants (the exported
        function then takes only ``*args``); otherwise it takes ``(weights, *args)`` with
        ``weights = distq.export.flat_weights(qtree)``, the tree's arrays as a flat list (so the
        artefact needs no knowledge of distq's types).
      platforms: lowering platforms (default: the current backend).
      runtime_options: ``tile_bytes``, ``ordered``, ``gather_rows`` of
        :func:`distq.quantized_apply`.

    Returns:
      A ``jax.export.Exported``; ``.serialize()`` gives bytes, ``jax.export.deserialize(b)
      .call(...)`` runs it.

    Examples:
      >>> import jax, jax.numpy as jnp, distq
      >>> w = jax.random.normal(jax.random.key(0), (16, 4))
      >>> q, _ = distq.quantize_tree({"w": w}, distq.Uniform(bits=4))
      >>> exp = distq.export.export(lambda p, x: x @ p["w"], q, jnp.ones((2, 16)))
      >>> back = jax.export.deserialize(exp.serialize())
      >>> y = back.call(distq.export.flat_weights(q), jnp.ones((2, 16)))
      >>> bool(jnp.allclose(y, jnp.ones((2, 16)) @ q["w"].dequantize(), atol=1e-5))  # to rounding
      True
    """

    def spec(a):
        return a if isinstance(a, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(
            jax.numpy.shape(a), jax.numpy.result_type(a))

    args = tuple(spec(a) for a in example_args)
    kw = {} if platforms is None else {"platforms": platforms}
    run = quantized_apply(apply_fn, **runtime_options)
    if embed_weights:
        fn = jax.jit(lambda *a: run(qtree, *a))
        return jex.export(fn, **kw)(*args)
    leaves, treedef = jax.tree_util.tree_flatten(qtree)
    fn = jax.jit(lambda w, *a: run(jax.tree_util.tree_unflatten(treedef, w), *a))
    return jex.export(fn, **kw)([spec(x) for x in leaves], *args)


def flat_weights(qtree: Any) -> list:
    """The arrays of a (quantised) tree in the order :func:`export`'s artefact takes them.

    Examples:
      >>> import jax.numpy as jnp, distq
      >>> q, _ = distq.quantize_tree({"w": jnp.ones((64, 32)), "b": jnp.zeros(32)},
      ...                            [("w", distq.Uniform(bits=4)), ("b", None)])
      >>> [(a.shape, str(a.dtype)) for a in distq.export.flat_weights(q)]  # b; w's codes, scale
      [((32,), 'float32'), ((256,), 'uint32'), ((1,), 'float32')]
    """
    return jax.tree_util.tree_leaves(qtree)


__all__ = ["export", "flat_weights"]
