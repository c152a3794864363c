"""Registers distq's leaf types with ``flax.serialization``.

After this module is imported, ``flax.serialization.to_bytes``/``from_bytes``/``to_state_dict``
handle trees that hold QArray, PQArray and CastArray leaves: each becomes its arrays plus a JSON
``metadata`` entry, so it can be rebuilt with or without a target. ``import distq`` imports this
module when Flax is already loaded; :mod:`distq.nn` imports it always. The numerical core never
imports Flax.

Examples:
  >>> import jax.numpy as jnp, distq
  >>> from flax import serialization
  >>> tree = {"w": distq.quantize(jnp.arange(16.0).reshape(4, 4), distq.Uniform(bits=4))}
  >>> sorted(serialization.to_state_dict(tree)["w"].keys())  # arrays plus JSON metadata
  ['codes', 'metadata', 'scale']
  >>> back = serialization.msgpack_restore(serialization.to_bytes(tree))
  >>> w = serialization.from_state_dict(tree, back)["w"]  # or without a target: metadata
  >>> type(w).__name__, bool((w.dequantize() == tree["w"].dequantize()).all())
  ('QArray', True)
"""

from __future__ import annotations

from flax import serialization

from ..core import leaf as _leaf
from ..core import spec as _spec


def register_all() -> None:
    """Registers every leaf type of :func:`distq.core.spec.leaf_types` (idempotent).

    Call it again after :func:`distq.register` adds a leaf type once this module is loaded.

    Examples:
      >>> from flax import serialization
      >>> import distq
      >>> register_all()
      >>> serialization.is_serializable(distq.quantize([1.0, 2.0], distq.Cast("float16")))
      True
    """
    for cls in _spec.leaf_types():
        serialization.register_serialization_state(
            cls, _leaf.leaf_state,
            lambda target, state, cls=cls: _leaf.leaf_from_state(cls, state, target),
            override=True)


register_all()
