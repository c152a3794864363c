"""The quantiser of :class:`distq.Rotated` and its leaf type, :class:`RotatedArray`.

``quantize(x, Rotated(inner))`` rotates every 1-D slice of ``x`` along the spec's axis by a
random orthogonal matrix ``R`` (:func:`distq.core.hadamard.rotate`), quantises the result with
the inner spec, and keeps the inner leaf plus the rotation's seed. Decoding undoes it:
``x_hat = R^T inner.dequantize()`` along the same axis, one ``O(n log n)`` transform per decode
(what a runtime that decodes leaves at use pays per use).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks
from . import hadamard
from . import spec as _spec
from .cast import CastArray
from .leaf import LeafBase, arrays_nbytes
from .pq import PQArray
from .qarray import QArray, output_dtype
from .specs_rotated import Rotated

#: the array names an inner leaf may store (those of the built-in leaf types): checkpoints list
#: a leaf class's arrays by name, so a RotatedArray stores its inner leaf's arrays under these
INNER_FIELDS: tuple[str, ...] = tuple(dict.fromkeys(
    QArray.array_fields + PQArray.array_fields + CastArray.array_fields))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RotatedArray(LeafBase):
    """A quantised array stored in a rotated basis: the inner leaf and the rotation's seed.

    Attributes:
      inner: the quantised rotated array (a :class:`distq.QArray`, PQ or cast leaf).
      seed: the rotation's seed, a uint32 scalar (one per member for a leaf made under
        ``vmap``); the signs and the transform are rebuilt from it (4 bytes, not ``n**2``).
      axis: the rotated axis of one array (static).
      dtype: the original array's dtype (``dequantize`` returns it).

    The inner leaf's arrays are visible under their own names (``q.codes``, ``q.scale``...),
    which is how checkpoints store them beside ``seed``.

    Examples:
      >>> import jax, jax.numpy as jnp, distq
      >>> w = jax.random.normal(jax.random.key(0), (64, 96))
      >>> q = distq.quantize(w, distq.Rotated(distq.NF4(), axis=1))
      >>> q.axis, q.inner.shape, q.nbytes == q.inner.nbytes + 4
      (1, (64, 96), True)
      >>> bool(jnp.allclose(q.take(jnp.array([3, 5])), q.dequantize()[jnp.array([3, 5])],
      ...                   atol=1e-5))  # rows decoded alone: the rotation is along the rows
      True
    """

    kind: ClassVar[str] = "rotatedarray"
    array_fields: ClassVar[tuple[str, ...]] = ("seed",) + INNER_FIELDS
    records_dtype: ClassVar[bool] = True

    inner: Any
    seed: jax.Array
    axis: int = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True))

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading axes added by ``vmap`` (the seed's shape: ``()`` for one array)."""
        return tuple(getattr(self.seed, "shape", ()))

    @property
    def value_shape(self) -> tuple[int, ...]:
        return tuple(self.inner.shape[len(self.batch_shape):])

    @property
    def nbytes(self) -> int:
        """The inner leaf's bytes plus the seed's 4 (per member)."""
        return int(self.inner.nbytes) + arrays_nbytes(self.seed)

    @property
    def bits(self) -> int | None:
        """The inner leaf's bits per code (``None`` if it has none)."""
        return getattr(self.inner, "bits", None)

    @property
    def n(self) -> int | None:
        """The inner leaf's number of levels (``None`` if it has none)."""
        return getattr(self.inner, "n", None)

    def _unbatched(self, fn):
        for _ in self.batch_shape:
            fn = jax.vmap(fn)
        return fn(self)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """Decodes the inner leaf and undoes the rotation (one transform along ``axis``)."""
        if self.batch_shape:
            return self._unbatched(lambda q: q.dequantize(dtype))
        w = self.inner.dequantize(jnp.float32)
        return hadamard.unrotate(w, self.seed, self.axis).astype(
            dtype or output_dtype(self.dtype))

    def take(self, rows: Any, dtype: Any = None) -> jax.Array:
        """Decoded rows (indices along the first axis).

        When the rotation is along another axis each row is decoded alone (the inner leaf's
        ``take``, then the inverse transform of those rows); a rotation along the rows mixes
        them, so every row is decoded first.
        """
        rows = self.checked_rows(rows)
        out_dtype = dtype or output_dtype(self.dtype)
        if self.axis == 0:
            return self.dequantize(jnp.float32)[rows].astype(out_dtype)
        part = self.inner.take(rows).astype(jnp.float32)
        return hadamard.unrotate(part, self.seed, rows.ndim + self.axis - 1).astype(out_dtype)

    def __repr__(self) -> str:
        return (f"RotatedArray(shape={self.shape}, dtype={self.dtype}, axis={self.axis}, "
                f"inner={self.inner!r}, nbytes={self.nbytes})")

    # ---------------------------------------------------------------- serialisation
    def metadata(self) -> dict:
        """JSON-able static metadata: the axis, the dtype and the inner leaf's kind and
        metadata (the seed is an array)."""
        return {"shape": list(self.value_shape), "dtype": self.dtype, "axis": self.axis,
                "inner_kind": self.inner.kind, "inner": self.inner.metadata()}

    @classmethod
    def from_arrays(cls, arrays: dict, metadata: dict) -> "RotatedArray":
        """Rebuilds a RotatedArray from its arrays and :meth:`metadata` (validating both)."""
        try:
            seed = jnp.asarray(arrays["seed"])
            if seed.dtype != jnp.uint32:
                raise ValueError(f"seed must be uint32, got {seed.dtype}")
            inner_cls = _spec.leaf_class(str(metadata["inner_kind"]))
            if inner_cls is None or inner_cls is cls:
                raise ValueError(f"unknown inner leaf kind {metadata['inner_kind']!r}")
            inner = inner_cls.from_arrays({k: v for k, v in arrays.items() if k != "seed"},
                                          metadata["inner"])
            out = cls(inner=inner, seed=seed, axis=int(metadata["axis"]),
                      dtype=str(metadata["dtype"]))
            jnp.dtype(out.dtype)
            shape = out.value_shape
            if list(shape) != [int(s) for s in metadata["shape"]]:
                raise ValueError(f"shape {list(shape)} disagrees with the metadata")
            if not 0 <= out.axis < len(shape):
                raise ValueError(f"axis {out.axis} is out of range for shape {shape}")
            if tuple(getattr(inner, "batch_shape", ())) != out.batch_shape:
                raise ValueError("the seed's batch axes differ from the inner leaf's")
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"corrupt RotatedArray metadata or arrays: {e!r}") from None
        return out


def _inner_view(name: str):
    return property(lambda self: getattr(self.inner, name, None),
                    doc=f"The inner leaf's ``{name}`` (``None`` if it has none).")


for _name in INNER_FIELDS:
    setattr(RotatedArray, _name, _inner_view(_name))


def check_input(x, spec: Rotated, axis: int) -> None:
    """Refuses concrete input that is not finite or whose rotated values could overflow
    float32 (every output of ``R`` is at most ``sqrt(2 n)`` times the largest input)."""
    a = jnp.asarray(x)
    amax = jax.device_get(jnp.max(jnp.where(jnp.isfinite(a), jnp.abs(a), jnp.inf)))
    if not np.isfinite(amax):
        bad = int(jax.device_get(jnp.sum(~jnp.isfinite(a))))
        raise ValueError(f"x contains {bad} NaN/inf value(s); quantisation needs finite input "
                         "(mask or replace them first)")
    limit = _checks.F32_MAX / math.sqrt(2.0 * a.shape[axis])
    if float(amax) > limit:
        raise ValueError(f"{_spec.spec_str(spec)} cannot represent this array: its largest "
                         f"magnitude {float(amax):.3g} could rotate beyond float32's range; "
                         f"it must be at most {limit:.3g} (3.4e38 / sqrt(2 * {a.shape[axis]})): "
                         "scale the array down first")


def rotated_input(x, spec: Rotated) -> tuple[jax.Array, Rotated]:
    """``(R x along the spec's axis, the resolved spec)``: what the inner spec quantises
    (calibration uses it too). Concrete input is checked (:func:`check_input`)."""
    dtype = _checks.dtype_name(x)
    if _checks.is_concrete(x):
        x = _checks.check_float32_range(x)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating-point array, got {dtype}")
    spec = spec.resolve(tuple(x.shape))
    why = spec.problem(tuple(x.shape))
    if why:
        raise ValueError(f"{_spec.spec_str(spec)} cannot take an array of shape "
                         f"{tuple(x.shape)}: {why}")
    if _checks.is_concrete(x):
        check_input(x, spec, spec.axis)
    return hadamard.rotate(x.astype(jnp.float32), spec.seed, spec.axis), spec


def wrap(inner: Any, spec: Rotated, dtype: str) -> RotatedArray:
    """The RotatedArray of an inner leaf quantised from :func:`rotated_input`."""
    extra = set(type(inner).array_fields) - set(INNER_FIELDS)
    if extra:
        raise TypeError(f"Rotated cannot wrap {type(inner).__name__} leaves: their arrays "
                        f"{sorted(extra)} have no place in a RotatedArray (it stores "
                        f"{', '.join(INNER_FIELDS)})")
    return RotatedArray(inner=inner, seed=jnp.asarray(np.uint32(spec.seed)), axis=spec.axis,
                        dtype=dtype)


def _quantize_rotated(x: Any, spec: Rotated, key: Any = None) -> RotatedArray:
    dtype = _checks.dtype_name(x)
    xr, spec = rotated_input(x, spec)
    return wrap(spec.spec.quantize(xr, key=key), spec, dtype)


_spec.register_leaf(RotatedArray)
_spec.register_quantizer(Rotated, _quantize_rotated)

__all__ = ["INNER_FIELDS", "RotatedArray", "check_input", "rotated_input", "wrap"]
