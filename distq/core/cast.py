"""Mixed precision as a spec: store a leaf in a narrower float dtype (:class:`Cast`)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import numpy as np

from . import _checks
from . import spec as _spec
from .leaf import LeafBase
from .specs import Cast

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CastArray(LeafBase):
    """A leaf stored in a narrower dtype; ``dequantize()`` restores the original dtype.

    Examples:
      >>> import jax.numpy as jnp, distq
      >>> c = distq.quantize(jnp.full((4, 8), 1.001), distq.Cast("bfloat16"))
      >>> c.value.dtype, c.dtype, c.nbytes
      (dtype(bfloat16), 'float32', 64)
      >>> c.take(jnp.array([0, 2])).tolist()[0][:2]  # decoded rows, rounded to bfloat16
      [1.0, 1.0]
    """

    kind: ClassVar[str] = "castarray"
    array_fields: ClassVar[tuple[str, ...]] = ("value",)

    value: jax.Array
    dtype: str = dataclasses.field(metadata=dict(static=True))

    # the stored array has the original shape (batch axes of a vmapped CastArray included)
    batch_shape: ClassVar[tuple[int, ...]] = ()

    @property
    def value_shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        return self.value.astype(dtype or self.dtype)

    def take(self, rows: Any, dtype: Any = None) -> jax.Array:
        """Rows of the first axis, converted back (only those rows)."""
        rows = jax.numpy.asarray(rows)
        n0 = self.value.shape[0]
        if not isinstance(rows, jax.core.Tracer) and rows.size and (
                int(rows.max()) >= n0 or int(rows.min()) < -n0):
            raise IndexError(f"row index out of range for {n0} rows")
        return self.value[rows].astype(dtype or self.dtype)

    def dequantize_slice(self, start: Any, size: int, axis: int = 0, dtype: Any = None, *,
                         align: int = 1) -> jax.Array:
        """``dequantize(dtype)`` sliced to ``[start, start + size)`` along ``axis`` (``start``
        may be traced, ``size`` static), converting only the slice.

        Examples:
          >>> import jax.numpy as jnp, distq
          >>> c = distq.quantize(jnp.arange(12.0).reshape(3, 4), distq.Cast("bfloat16"))
          >>> c.dequantize_slice(1, 2, axis=1).tolist()
          [[1.0, 2.0], [5.0, 6.0], [9.0, 10.0]]
        """
        del align
        return jax.lax.dynamic_slice_in_dim(self.value, start, size, axis).astype(
            dtype or self.dtype)

    def __getitem__(self, idx) -> jax.Array:
        if isinstance(idx, (int, np.integer)):
            return self.take(idx)
        return self.value[idx].astype(self.dtype)

    def metadata(self) -> dict:
        return {"dtype": self.dtype, "stored": str(self.value.dtype), "shape": list(self.shape)}

    @classmethod
    def from_arrays(cls, arrays: dict, metadata: dict) -> "CastArray":
        try:
            v = jax.numpy.asarray(arrays["value"])
            out = cls(value=v, dtype=str(metadata["dtype"]))
            jax.numpy.dtype(out.dtype)
            if list(v.shape) != list(metadata["shape"]) or str(v.dtype) != metadata["stored"]:
                raise ValueError("shape/dtype disagree with the metadata")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"corrupt CastArray metadata or arrays: {e!r}") from None
        return out

    def __repr__(self) -> str:
        return f"CastArray(shape={self.shape}, stored={self.value.dtype}, dtype={self.dtype})"


def _cast(x: jax.Array, spec: Cast, key: Any = None) -> CastArray:
    del key
    return CastArray(value=x.astype(spec.dtype), dtype=str(x.dtype))


_spec.register_leaf(CastArray)
_spec.register_quantizer(Cast, _cast)
