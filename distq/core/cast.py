"""Mixed precision as a spec: store a leaf in a narrower float dtype (:class:`Cast`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import numpy as np

from . import _checks
from .leaf import arrays_nbytes
from .spec import register

_CAST_DTYPES = ("bfloat16", "float16", "float32")


@dataclasses.dataclass(frozen=True)
class Cast:
    """Mixed precision as a rule: store the leaf in a narrower float dtype.

    Examples:
      >>> import jax.numpy as jnp, distq
      >>> c = distq.quantize(jnp.ones((4, 4)), distq.Cast("bfloat16"))
      >>> c.nbytes, c.dequantize().dtype
      (32, dtype('float32'))
    """

    kind: ClassVar[str] = "cast"
    positional: ClassVar[tuple[str, ...]] = ("dtype",)

    dtype: str = "bfloat16"

    def __post_init__(self):
        _checks.check_choice(self.dtype, "dtype", _CAST_DTYPES)

    def quantize(self, x: jax.Array, *, key: jax.Array | None = None) -> "CastArray":
        """``x`` stored as ``dtype`` (``key`` is unused)."""
        del key
        return CastArray(value=x.astype(self.dtype), dtype=str(x.dtype))

    def resolve(self, shape: tuple[int, ...], role: str | None = None) -> "Cast":
        del shape, role
        return self

    def problem(self, shape: tuple[int, ...]) -> str | None:
        del shape
        return None

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape) * jax.numpy.dtype(self.dtype).itemsize


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CastArray:
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

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return arrays_nbytes(self.value)

    @property
    def bits_per_value(self) -> float:
        return 8.0 * jax.numpy.dtype(self.value.dtype).itemsize

    def dequantize(self, dtype: Any = None) -> jax.Array:
        return self.value.astype(dtype or self.dtype)

    def take(self, rows: Any, dtype: Any = None) -> jax.Array:
        """Rows of the first axis, converted back (only those rows)."""
        return self.value[rows].astype(dtype or self.dtype)

    def __getitem__(self, idx) -> jax.Array:
        return self.value[idx].astype(self.dtype)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.dequantize(), dtype=dtype)

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


register(Cast, CastArray)
