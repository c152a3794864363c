"""QArray: the one container for a quantised tensor.

A QArray holds bit-packed codes, the codebook they index, and per-group scale and location, plus
static metadata (shape, dtype, bits, method, layout). It is a pytree (a frozen dataclass registered
with ``jax.tree_util``) so it passes through ``jax.jit``, ``jax.tree.map`` and ``optax``; its
array fields are the leaves and the metadata is static (hashable) auxiliary data.

A scalar-quantised value decodes as ``loc[g] + scale[g] * codebook[code]`` where ``g`` is the
value's scaling group (see :class:`Layout`). Optionally a few values (outliers) are kept apart:
their standardised values replace ``codebook[code]`` at their positions.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from . import bitpack


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a tensor is viewed as ``(groups, group_len)`` rows that share a scale and location.

    Attributes:
      kind: "tensor" (one group), "channel" (one group per index of ``axes``), "group"
        (consecutive blocks of ``group_size`` along ``axes[0]``; every other index separate) or
        "block" (consecutive blocks of ``group_size`` values of the flattened array).
      axes: the channel axes (kind "channel") or the grouped axis (kind "group"), non-negative.
      group_size: block length for kind "group".
    """

    kind: str = "tensor"
    axes: tuple[int, ...] = ()
    group_size: int | None = None

    def perm(self, ndim: int) -> tuple[int, ...]:
        if self.kind == "channel":
            return tuple(self.axes) + tuple(a for a in range(ndim) if a not in self.axes)
        if self.kind == "group":
            (a,) = self.axes
            return tuple(i for i in range(ndim) if i != a) + (a,)
        return tuple(range(ndim))

    def num_groups(self, shape: tuple[int, ...]) -> int:
        size = math.prod(shape)
        if self.kind == "channel":
            return math.prod(shape[a] for a in self.axes)
        if self.kind in ("group", "block"):
            return size // self.group_size
        return 1

    def to_rows(self, x: jax.Array) -> jax.Array:
        """``x`` as a ``(groups, group_len)`` matrix."""
        g = self.num_groups(x.shape)
        return jnp.transpose(x, self.perm(x.ndim)).reshape(g, -1) if x.size else x.reshape(g, -1)

    def from_rows(self, rows: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        perm = self.perm(len(shape))
        permuted = rows.reshape(tuple(shape[a] for a in perm))
        return jnp.transpose(permuted, np.argsort(perm))


def arrays_nbytes(*arrays) -> int:
    """Bytes stored by the given arrays (``None`` ones count 0)."""
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in arrays
               if a is not None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantised array: packed codes + codebook + per-group scale/location + static metadata.

    Attributes:
      codes: bit-packed codes, uint32 words (see :func:`distq.bitpack.pack`), in row order of the
        layout's ``(groups, group_len)`` view.
      codebook: the reconstruction levels in standardised units, shape ``(n,)``.
      scale: per-group scale, shape ``(groups,)``.
      loc: per-group location, shape ``(groups,)``, or ``None`` when it is zero everywhere.
      shape, dtype: of the original array (``dequantize`` restores both).
      bits: bits per code; ``n``: codebook size (``<= 2**bits``).
      method: "distributional", "uniform", "nf4", ... (informational).
      layout: the grouping, a :class:`Layout`.
      outlier_index: bit-packed positions (in the ``(groups, group_len)`` row order, each
        :meth:`index_bits` wide) of values kept apart, or ``None``.
      outlier_value: their standardised values ``(x - loc) / scale`` (float16), or ``None``.
      n_outliers: how many values are kept apart.

    Examples:
      >>> import jax, distq
      >>> x = jax.random.normal(jax.random.key(0), (256, 64))
      >>> q = distq.quantize(x, distq.Scalar(bits=4))
      >>> q.shape, q.bits, q.dequantize().shape
      ((256, 64), 4, (256, 64))
      >>> q.nbytes < x.nbytes / 7
      True
    """

    codes: jax.Array
    codebook: jax.Array
    scale: jax.Array
    loc: jax.Array | None
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True))
    bits: int = dataclasses.field(metadata=dict(static=True))
    n: int = dataclasses.field(metadata=dict(static=True))
    method: str = dataclasses.field(metadata=dict(static=True))
    layout: Layout = dataclasses.field(default=Layout(), metadata=dict(static=True))
    outlier_index: jax.Array | None = None
    outlier_value: jax.Array | None = None
    n_outliers: int = dataclasses.field(default=0, metadata=dict(static=True))

    # ---------------------------------------------------------------- array-like properties
    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """True storage in bytes: packed codes + codebook + scales + locations + outliers."""
        return arrays_nbytes(self.codes, self.codebook, self.scale, self.loc,
                             self.outlier_index, self.outlier_value)

    @property
    def index_bits(self) -> int:
        """Bits per stored outlier position: enough to address every value."""
        return max(1, (self.size - 1).bit_length())

    def outlier_positions(self) -> jax.Array:
        """Positions of the outliers in the flattened ``(groups, group_len)`` row order."""
        return unpack_positions(self.outlier_index, self.index_bits, self.n_outliers)

    @property
    def bits_per_value(self) -> float:
        """``8 * nbytes / size``: what each value really costs, overheads included."""
        return 8.0 * self.nbytes / max(self.size, 1)

    def codes_unpacked(self) -> jax.Array:
        """The codes as integers in the layout's ``(groups, group_len)`` shape."""
        g = self.layout.num_groups(self.shape)
        c = bitpack.unpack(self.codes, self.bits, self.size)
        return c.reshape(g, -1)

    def per_value(self, per_group: jax.Array) -> jax.Array:
        """A per-group vector (like ``scale``) broadcast to every value, in ``shape``."""
        g = self.layout.num_groups(self.shape)
        rows = jnp.broadcast_to(per_group.astype(jnp.float32)[:, None], (g, self.size // g))
        return self.layout.from_rows(rows, self.shape)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """Decodes to a dense array of the original shape and dtype (or ``dtype``)."""
        rows = self.codebook[self.codes_unpacked().astype(jnp.int32)]
        if self.n_outliers:
            idx = self.outlier_positions().astype(jnp.int32)
            rows = rows.reshape(-1).at[idx].set(self.outlier_value.astype(jnp.float32))
            rows = rows.reshape(self.layout.num_groups(self.shape), -1)
        rows = rows * self.scale.astype(jnp.float32)[:, None]
        if self.loc is not None:
            rows = rows + self.loc.astype(jnp.float32)[:, None]
        out = self.layout.from_rows(rows, self.shape)
        return out.astype(dtype or self.dtype)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.dequantize(), dtype=dtype)

    def __repr__(self) -> str:
        return (
            f"QArray(shape={self.shape}, dtype={self.dtype}, method={self.method!r}, "
            f"bits={self.bits}, n={self.n}, layout={self.layout.kind}, "
            + (f"outliers={self.n_outliers}, " if self.n_outliers else "")
            + f"nbytes={self.nbytes})"
        )

    # ---------------------------------------------------------------- serialisation
    def metadata(self) -> dict:
        """JSON-able static metadata (enough to rebuild the QArray from its arrays)."""
        return {
            "shape": list(self.shape),
            "dtype": self.dtype,
            "bits": self.bits,
            "n": self.n,
            "method": self.method,
            "layout": {
                "kind": self.layout.kind,
                "axes": list(self.layout.axes),
                "group_size": self.layout.group_size,
            },
            "outliers": self.n_outliers,
        }

    @classmethod
    def from_arrays(cls, arrays: dict, metadata: dict) -> "QArray":
        """Rebuilds a QArray from its arrays and :meth:`metadata` (validating both)."""
        try:
            lay = metadata["layout"]
            q = cls(
                codes=jnp.asarray(arrays["codes"]),
                codebook=jnp.asarray(arrays["codebook"]),
                scale=jnp.asarray(arrays["scale"]),
                loc=None if arrays.get("loc") is None else jnp.asarray(arrays["loc"]),
                shape=tuple(int(s) for s in metadata["shape"]),
                dtype=str(metadata["dtype"]),
                bits=int(metadata["bits"]),
                n=int(metadata["n"]),
                method=str(metadata["method"]),
                layout=Layout(str(lay["kind"]), tuple(int(a) for a in lay["axes"]),
                              None if lay["group_size"] is None else int(lay["group_size"])),
                outlier_index=_optional(arrays.get("outlier_index")),
                outlier_value=_optional(arrays.get("outlier_value")),
                n_outliers=int(metadata.get("outliers", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"corrupt QArray metadata or arrays: {e!r}") from None
        q.validate()
        return q

    def validate(self) -> None:
        """Checks that array sizes agree with the metadata (raises ``ValueError``)."""
        if self.codes.dtype != jnp.uint32 or self.codes.ndim != 1:
            raise ValueError("QArray.codes must be a 1-D uint32 array")
        if self.codes.shape[0] != bitpack.packed_nbytes(self.size, self.bits) // 4:
            raise ValueError(
                f"QArray.codes has {self.codes.shape[0]} words; shape {self.shape} at "
                f"{self.bits} bits needs {bitpack.packed_nbytes(self.size, self.bits) // 4}"
            )
        g = self.layout.num_groups(self.shape)
        if self.scale.shape != (g,) or (self.loc is not None and self.loc.shape != (g,)):
            raise ValueError(f"QArray scale/loc must have shape ({g},)")
        if self.codebook.shape != (self.n,) or self.n > (1 << self.bits):
            raise ValueError(f"QArray.codebook must have shape ({self.n},), n <= 2**bits")
        k = self.n_outliers
        if k < 0 or k > self.size or (k > 0) != (self.outlier_index is not None) or (
                (k > 0) != (self.outlier_value is not None)):
            raise ValueError(f"QArray has {k} outliers but outlier arrays do not match")
        if k:
            words = position_words(k, self.index_bits)
            if self.outlier_index.dtype != jnp.uint32 or self.outlier_index.shape != (words,):
                raise ValueError(f"QArray.outlier_index must be {words} uint32 words")
            if self.outlier_value.shape != (k,):
                raise ValueError(f"QArray.outlier_value must have shape ({k},)")


def _split_bits(bits: int) -> tuple[int, int]:
    return min(bits, 16), max(bits - 16, 0)


def position_words(k: int, bits: int) -> int:
    """uint32 words that :func:`pack_positions` uses for ``k`` positions of ``bits`` bits."""
    lo, hi = _split_bits(bits)
    return sum(bitpack.packed_nbytes(k, b) // 4 for b in (lo, hi) if b)


def pack_positions(idx: jax.Array, bits: int) -> jax.Array:
    """Packs non-negative positions of up to 32 bits densely (a 16-bit stream of low bits,
    then a stream of the ``bits - 16`` high bits when needed)."""
    lo, hi = _split_bits(bits)
    idx = idx.astype(jnp.uint32)
    parts = [bitpack.pack(idx & 0xFFFF if hi else idx, lo)]
    if hi:
        parts.append(bitpack.pack(idx >> 16, hi))
    return jnp.concatenate(parts)


def unpack_positions(words: jax.Array, bits: int, k: int) -> jax.Array:
    """Inverse of :func:`pack_positions`."""
    lo, hi = _split_bits(bits)
    n_lo = bitpack.packed_nbytes(k, lo) // 4
    idx = bitpack.unpack(words[:n_lo], lo, k).astype(jnp.uint32)
    if hi:
        idx = idx | (bitpack.unpack(words[n_lo:], hi, k).astype(jnp.uint32) << 16)
    return idx


def outlier_values(z: jax.Array) -> jax.Array:
    """Standardised outlier values as stored: float16, clipped to its finite range."""
    f16 = float(jnp.finfo(jnp.float16).max)
    return jnp.clip(z, -f16, f16).astype(jnp.float16)


def _optional(a):
    return None if a is None else jnp.asarray(a)


def is_qarray(x: Any) -> bool:
    """``True`` for a :class:`QArray` (use as ``is_leaf`` in ``jax.tree`` functions)."""
    return isinstance(x, QArray)


def register_serialisation(cls, fields: tuple[str, ...]):
    """Registers ``cls`` with ``flax.serialization``: its array ``fields`` (``None`` ones left
    out) plus JSON ``metadata``, so it can be rebuilt with or without a target. ``cls`` needs
    ``metadata()`` and ``from_arrays(arrays, metadata)``. Returns the target-free loader."""

    def to_state(q) -> dict:
        state = {f: getattr(q, f) for f in fields if getattr(q, f) is not None}
        state["metadata"] = json.dumps(q.metadata())
        return state

    def from_state(target, state: dict):
        meta = json.loads(state["metadata"]) if "metadata" in state else target.metadata()
        return cls.from_arrays(state, meta)

    serialization.register_serialization_state(cls, to_state, from_state, override=True)
    return lambda state: from_state(None, state)


QARRAY_FIELDS = ("codes", "codebook", "scale", "loc", "outlier_index", "outlier_value")
_from_state_dict = register_serialisation(QArray, QARRAY_FIELDS)


def from_state_dict(state: dict) -> QArray:
    """Rebuilds a QArray from ``flax.serialization.to_state_dict(q)`` without a target."""
    return _from_state_dict(state)
