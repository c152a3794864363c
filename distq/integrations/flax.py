"""Registers distq's leaf types with ``flax.serialization``.

After this module is imported, ``flax.serialization.to_bytes``/``from_bytes``/``to_state_dict``
handle trees that hold QArray, PQArray and CastArray leaves: each becomes its arrays plus a JSON
``metadata`` entry, so it can be rebuilt with or without a target. ``import distq`` imports this
module when Flax is already loaded; :mod:`distq.nn` imports it always. The numerical core never
imports Flax.
"""

from __future__ import annotations

from flax import serialization

from ..core import leaf as _leaf
from ..core import spec as _spec


def register_all() -> None:
    """Registers every leaf type of :func:`distq.core.spec.leaf_types` (idempotent)."""
    for cls in _spec.leaf_types():
        serialization.register_serialization_state(
            cls, _leaf.leaf_state,
            lambda target, state, cls=cls: _leaf.leaf_from_state(cls, state, target),
            override=True)


register_all()
