"""The leaf protocol: what every quantised array type provides, and its flat state form.

A **leaf type** is a pytree that holds a quantised array. Every leaf class provides ``kind``,
``array_fields`` (its array attributes, ``None`` ones allowed), ``shape``, ``dtype``, ``nbytes``
(true storage), ``bits_per_value``, ``dequantize(dtype=None)``, ``take(rows)`` (decoded rows of
the first axis, decoding only those), ``metadata()`` (JSON-able static data) and
``from_arrays(arrays, metadata)`` (validated rebuild, for checkpoints). Leaves made under
``jax.vmap`` carry the batch axes in front (``shape`` shows them).

Optional, for quantised execution (:func:`distq.quantized_apply` tiles a large weight when its
leaf has them): ``dequantize_slice(start, size, axis=0, dtype=None, *, align=1)``, the decoded
values ``[start, start + size)`` along ``axis`` without decoding the rest (``start`` may be
traced, ``size`` and ``align`` are static; ``align`` promises ``start`` is a multiple of it), and
``slice_axes``, the axes it can slice cheaply (all when absent). A leaf without them is decoded
whole where it is used; :class:`distq.QArray`, :class:`distq.PQArray` and the cast leaf have them.

Examples:
  A leaf's flat state and back (what checkpoints and ``flax.serialization`` store):

  >>> import jax.numpy as jnp, distq
  >>> from distq.core.leaf import Leaf, leaf_from_state, leaf_state
  >>> q = distq.quantize(jnp.arange(8.0), distq.Uniform(bits=4))
  >>> isinstance(q, Leaf), isinstance(jnp.ones(3), Leaf)
  (True, False)
  >>> state = leaf_state(q)
  >>> sorted(state)  # the array fields that are not None, and the metadata
  ['codes', 'metadata', 'scale']
  >>> r = leaf_from_state(distq.QArray, state)
  >>> r.shape, bool((r.dequantize() == q.dequantize()).all())
  ((8,), True)
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks


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


class LeafBase:
    """Array-like properties shared by the leaf classes (a mixin without fields).

    A subclass defines ``array_fields``, ``value_shape`` (the shape of one quantised array) and
    ``batch_shape`` (leading axes added by ``vmap``; ``()`` otherwise).
    """

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.batch_shape) + tuple(self.value_shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """True storage in bytes: every stored array, codes bit-packed."""
        return arrays_nbytes(*(getattr(self, f) for f in self.array_fields))

    @property
    def bits_per_value(self) -> float:
        """``8 * nbytes / size``: what each value really costs, overheads included."""
        return 8.0 * self.nbytes / max(self.size, 1)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.dequantize(), dtype=dtype)

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError(f"len() of a 0-d {type(self).__name__}")
        return self.shape[0]

    def __iter__(self):
        """``self[0], self[1], ...`` along the first axis (batch members or decoded rows);
        defined so that Python never falls back to calling ``__getitem__`` without end."""
        return (self[i] for i in range(len(self)))

    def checked_rows(self, rows: Any) -> jax.Array:
        """``rows`` (row indices along the first axis, for ``take``) checked and made
        non-negative int32: integers only, in range when concrete (negative ones count from the
        end), of one unbatched array of rank >= 1."""
        if self.batch_shape:
            raise ValueError("take() reads rows of one array; index the batch first (q[i])")
        if not self.value_shape:
            raise ValueError("take() needs an array of rank >= 1")
        rows = jnp.asarray(rows)
        if not jnp.issubdtype(rows.dtype, jnp.integer):
            raise TypeError(f"rows must be integers, got dtype {rows.dtype}")
        n = self.value_shape[0]
        if _checks.is_concrete(rows) and rows.size and (
                int(rows.max()) >= n or int(rows.min()) < -n):
            raise IndexError(f"row index out of range for {n} rows")
        return jnp.where(rows < 0, rows + n, rows).astype(jnp.int32)

    def __getitem__(self, idx) -> Any:
        """Batch members of a leaf made under ``vmap`` (a leaf); decoded values otherwise.

        Integer row indices decode only those rows (``take``); other indices decode the array
        and index it.
        """
        if self.batch_shape:
            return jax.tree_util.tree_map(lambda a: a[idx], self)
        if isinstance(idx, (int, np.integer)) or (
                hasattr(idx, "dtype") and jnp.issubdtype(idx.dtype, jnp.integer)) or (
                isinstance(idx, list) and all(isinstance(i, (int, np.integer)) for i in idx)):
            return self.take(idx)
        return self.dequantize()[idx]


def arrays_nbytes(*arrays) -> int:
    """Bytes stored by the given arrays (``None`` ones count 0).

    Examples:
      >>> import numpy as np
      >>> arrays_nbytes(np.zeros(3, np.float32), None, np.zeros((2, 2), np.uint8))
      16
    """
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in arrays
               if hasattr(a, "shape") and hasattr(a, "dtype"))  # None (or a label) counts 0


def leaf_state(q: Any) -> dict:
    """A leaf as a flat state dict: its non-``None`` array fields plus JSON ``metadata``.

    This is the form ``flax.serialization`` sees (see :mod:`distq.integrations.flax`).

    Examples:
      >>> import json, jax.numpy as jnp, distq
      >>> state = leaf_state(distq.quantize(jnp.ones((2, 4)), distq.Cast("float16")))
      >>> state["value"].dtype, json.loads(state["metadata"])["dtype"]
      (dtype('float16'), 'float32')
    """
    state = {f: getattr(q, f) for f in q.array_fields if getattr(q, f) is not None}
    state["metadata"] = json.dumps(q.metadata())
    return state


def leaf_from_state(cls: type, state: dict, target: Any = None) -> Any:
    """Rebuilds a leaf of class ``cls`` from :func:`leaf_state` (``target`` supplies the
    metadata when the state has none).

    Examples:
      >>> import jax.numpy as jnp, distq
      >>> q = distq.quantize(jnp.ones((2, 4)), distq.Cast("float16"))
      >>> arrays = {"value": q.value}  # no metadata: take it from a target of the same kind
      >>> leaf_from_state(distq.CastArray, arrays, target=q).dequantize().dtype
      dtype('float32')
      >>> leaf_from_state(distq.CastArray, arrays)
      Traceback (most recent call last):
        ...
      ValueError: a CastArray state needs its 'metadata' entry (or a target)
    """
    if "metadata" in state:
        meta = json.loads(state["metadata"])
    elif target is not None:
        meta = target.metadata()
    else:
        raise ValueError(f"a {cls.__name__} state needs its 'metadata' entry (or a target)")
    return cls.from_arrays({k: v for k, v in state.items() if k != "metadata"}, meta)
