"""The leaf protocol: what every quantised array type provides, and its flat state form.

A **leaf type** is a pytree that holds a quantised array. Every leaf class provides ``kind``,
``array_fields`` (its array attributes, ``None`` ones allowed), ``shape``, ``dtype``, ``nbytes``
(true storage), ``bits_per_value``, ``dequantize(dtype=None)``, ``take(rows)`` (decoded rows of
the first axis, decoding only those), ``metadata()`` (JSON-able static data) and
``from_arrays(arrays, metadata)`` (validated rebuild, for checkpoints). Leaves made under
``jax.vmap`` carry the batch axes in front (``shape`` shows them).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Protocol, runtime_checkable

import jax
import numpy as np


@runtime_checkable
class Leaf(Protocol):
    """A quantised array (see the module docstring)."""

    kind: ClassVar[str]
    array_fields: ClassVar[tuple[str, ...]]

    @property
    def nbytes(self) -> int: ...

    def dequantize(self, dtype: Any = None) -> jax.Array: ...

    def take(self, rows: Any) -> jax.Array: ...

    def metadata(self) -> dict: ...


def arrays_nbytes(*arrays) -> int:
    """Bytes stored by the given arrays (``None`` ones count 0)."""
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in arrays
               if a is not None)


def leaf_state(q: Any) -> dict:
    """A leaf as a flat state dict: its non-``None`` array fields plus JSON ``metadata``.

    This is the form ``flax.serialization`` sees (see :mod:`distq.integrations.flax`).
    """
    state = {f: getattr(q, f) for f in q.array_fields if getattr(q, f) is not None}
    state["metadata"] = json.dumps(q.metadata())
    return state


def leaf_from_state(cls: type, state: dict, target: Any = None) -> Any:
    """Rebuilds a leaf of class ``cls`` from :func:`leaf_state` (``target`` supplies the
    metadata when the state has none)."""
    if "metadata" in state:
        meta = json.loads(state["metadata"])
    elif target is not None:
        meta = target.metadata()
    else:
        raise ValueError(f"a {cls.__name__} state needs its 'metadata' entry (or a target)")
    return cls.from_arrays({k: v for k, v in state.items() if k != "metadata"}, meta)
