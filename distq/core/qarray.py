"""QArray: the one container for a quantised tensor.

A QArray holds bit-packed codes, the codebook they index, and per-group scale and location, plus
static metadata (shape, dtype, bits, method, layout). It is a pytree (a frozen dataclass registered
with ``jax.tree_util``) so it passes through ``jax.jit``, ``jax.tree.map`` and ``optax``; its
array fields are the leaves and the metadata is static (hashable) auxiliary data.

A scalar-quantised value decodes as ``loc[g] + scale[g] * level[code]`` where ``g`` is the
value's scaling group (see :class:`Layout`) and the levels are a stored codebook or, for uniform
grids, ``first + step * code`` (nothing stored). Optionally a few values (outliers) are kept
apart: their standardised values replace ``level[code]`` at their positions.

A QArray made under ``jax.vmap`` carries the batch axes in front of its arrays: ``shape`` shows
them, ``dequantize()`` decodes every member, and ``q[i]`` picks members.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import bitpack
from .leaf import LeafBase, leaf_from_state


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a tensor is viewed as ``(groups, group_len)`` rows that share a scale and location.

    Attributes:
      kind: "tensor" (one group), "channel" (one group per index of ``axes``), "group"
        (consecutive blocks of ``group_size`` along ``axes[0]``; every other index separate) or
        "block" (consecutive blocks of ``group_size`` values of the flattened array).
      axes: the channel axes (kind "channel") or the grouped axis (kind "group"), non-negative.
      group_size: block length for kind "group".

    Examples:
      >>> import jax.numpy as jnp, distq
      >>> x = jnp.ones((4, 6))
      >>> distq.quantize(x, distq.Uniform(bits=4, axis=0)).layout  # one scale per row
      Layout(kind='channel', axes=(0,), group_size=None)
      >>> q = distq.quantize(x, distq.Uniform(bits=4, group_size=3))  # blocks of 3 along -1
      >>> q.layout, q.layout.num_groups(x.shape), q.scale.shape
      (Layout(kind='group', axes=(1,), group_size=3), 8, (8,))
      >>> q.layout.to_rows(jnp.arange(24).reshape(4, 6))[:3].tolist()
      [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
      >>> distq.Layout("group", (1,), 4).validate((4, 6))
      Traceback (most recent call last):
        ...
      ValueError: layout group_size 4 does not divide 6
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

    def validate(self, shape: tuple[int, ...]) -> None:
        """Raises ``ValueError`` unless this layout fits an array of ``shape``."""
        ndim, size = len(shape), math.prod(shape)
        if self.kind not in ("tensor", "channel", "group", "block"):
            raise ValueError(f"unknown layout kind {self.kind!r}")
        if any(not 0 <= a < ndim for a in self.axes) or len(set(self.axes)) != len(self.axes):
            raise ValueError(f"layout axes {self.axes} do not fit an array of rank {ndim}")
        if self.kind in ("group", "block"):
            gs = self.group_size
            if gs is None or gs < 1:
                raise ValueError(f"layout group_size must be >= 1, got {gs}")
            length = shape[self.axes[0]] if self.kind == "group" and self.axes else size
            if self.kind == "group" and len(self.axes) != 1:
                raise ValueError("a 'group' layout has exactly one axis")
            if length % gs:
                raise ValueError(f"layout group_size {gs} does not divide {length}")
        elif self.kind == "channel" and not self.axes:
            raise ValueError("a 'channel' layout needs at least one axis")

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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray(LeafBase):
    """A quantised array: packed codes + levels + per-group scale/location + static metadata.

    Attributes:
      codes: bit-packed codes, uint32 words (see :func:`distq.bitpack.pack`), in row order of the
        layout's ``(groups, group_len)`` view.
      codebook: the reconstruction levels in standardised units, shape ``(n,)``, or ``None`` for
        a uniform grid (``grid``).
      scale: per-group scale, shape ``(groups,)``; never negative, except that a QArray made
        under a trace (``jit``/``vmap``, where non-finite input cannot be refused) sets the sign
        bit of the scale of a group that held non-finite values: that group decodes as NaN
        (its finite values keep their codes, and ``abs(scale)`` decodes them).
      loc: per-group location, shape ``(groups,)``, or ``None`` when it is zero everywhere.
      value_shape, dtype: of the original array (``dequantize`` restores both; a float64
        array decodes as float32 while JAX runs without ``jax_enable_x64``, see
        :func:`output_dtype`: values are represented in float32); ``shape`` adds the batch axes
        of a QArray made under ``vmap``.
      bits: bits per code; ``n``: number of levels (``<= 2**bits``).
      method: "distributional", "uniform", "nf4", ... (informational).
      layout: the grouping, a :class:`Layout`.
      outlier_index: bit-packed positions (in the ``(groups, group_len)`` row order, each
        :meth:`index_bits` wide) of values kept apart, or ``None``.
      outlier_value: their standardised values ``(x - loc) / scale`` (float16), or ``None``.
      n_outliers: how many values are kept apart.
      grid: ``(first, step)`` when the levels are ``first + step * code`` and no codebook is
        stored (affine and absmax integer grids), else ``None``.

    Examples:
      >>> import jax, distq
      >>> x = jax.random.normal(jax.random.key(0), (256, 64))
      >>> q = distq.quantize(x, distq.Uniform(bits=4))
      >>> q.shape, q.bits, q.dequantize().shape
      ((256, 64), 4, (256, 64))
      >>> q.nbytes < x.nbytes / 7
      True
      >>> q.take([3, 5]).shape  # rows decoded from their codes alone
      (2, 64)
      >>> qs = jax.vmap(lambda a: distq.quantize(a, distq.Uniform(bits=4)))(x.reshape(4, 64, 64))
      >>> qs.shape, qs[1].shape, qs.dequantize().shape
      ((4, 64, 64), (64, 64), (4, 64, 64))
    """

    kind: ClassVar[str] = "qarray"
    array_fields: ClassVar[tuple[str, ...]] = (
        "codes", "codebook", "scale", "loc", "outlier_index", "outlier_value")
    records_dtype: ClassVar[bool] = True  # dtype is the caller's, even where JAX held float32

    codes: jax.Array
    codebook: jax.Array | None
    scale: jax.Array
    loc: jax.Array | None
    value_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True))
    bits: int = dataclasses.field(metadata=dict(static=True))
    n: int = dataclasses.field(metadata=dict(static=True))
    method: str = dataclasses.field(metadata=dict(static=True))
    layout: Layout = dataclasses.field(default=Layout(), metadata=dict(static=True))
    outlier_index: jax.Array | None = None
    outlier_value: jax.Array | None = None
    n_outliers: int = dataclasses.field(default=0, metadata=dict(static=True))
    grid: tuple[float, float] | None = dataclasses.field(default=None,
                                                         metadata=dict(static=True))

    # ---------------------------------------------------------------- array-like properties
    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading axes added by ``vmap`` (``()`` for a QArray of one array)."""
        return tuple(getattr(self.codes, "shape", (0,))[:-1])  # () when a tree map put labels here

    @property
    def value_size(self) -> int:
        """Values of one (unbatched) array."""
        return math.prod(self.value_shape)

    @property
    def index_bits(self) -> int:
        """Bits per stored outlier position: enough to address every value."""
        return max(1, (self.value_size - 1).bit_length())

    def _unbatched(self, fn):
        """``fn(self)`` per member of a batched QArray (stacked), or ``fn(self)`` itself."""
        for _ in self.batch_shape:
            fn = jax.vmap(fn)
        return fn(self)

    def levels(self) -> jax.Array:
        """The ``n`` levels in standardised units (the codebook, or the grid's values)."""
        if self.codebook is not None:
            return self.codebook
        first, step = self.grid
        return first + step * jnp.arange(self.n, dtype=jnp.float32)

    def _level_of(self, codes: jax.Array) -> jax.Array:
        if self.codebook is not None:
            return lookup_levels(self.codebook, codes)
        first, step = self.grid
        return first + step * codes.astype(jnp.float32)

    def outlier_positions(self) -> jax.Array:
        """Positions of the outliers in the flattened ``(groups, group_len)`` row order."""
        return unpack_positions(self.outlier_index, self.index_bits, self.n_outliers)

    def group_scale(self) -> jax.Array:
        """``scale`` as float32 for decoding: NaN for a group marked as having held non-finite
        values (the sign bit of its scale, see ``scale``)."""
        s = self.scale.astype(jnp.float32)
        return jnp.where(jnp.signbit(s), jnp.nan, s)

    def codes_unpacked(self) -> jax.Array:
        """The codes as integers in the layout's ``(groups, group_len)`` shape."""
        if self.batch_shape:
            return self._unbatched(QArray.codes_unpacked)
        g = self.layout.num_groups(self.value_shape)
        c = unpack_words(self.codes, self.bits, self.value_size)
        return c.reshape(g, -1)

    def per_value(self, per_group: jax.Array) -> jax.Array:
        """A per-group vector (like ``scale``) broadcast to every value, in ``value_shape``."""
        g = self.layout.num_groups(self.value_shape)
        rows = jnp.broadcast_to(per_group.astype(jnp.float32)[:, None],
                                (g, self.value_size // g))
        return self.layout.from_rows(rows, self.value_shape)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """Decodes to a dense array of the original shape and dtype (or ``dtype``).

        One pass over the codes (unpacking, level lookup and scaling fuse into one loop), then
        the outliers are written in place.
        """
        if self.batch_shape:
            return self._unbatched(lambda q: q.dequantize(dtype))
        g = self.layout.num_groups(self.value_shape)
        rows = self._level_of(self.codes_unpacked())
        s = self.group_scale()
        rows = rows * s[:, None]
        if self.loc is not None:
            rows = rows + self.loc.astype(jnp.float32)[:, None]
        if self.n_outliers:
            idx = self.outlier_positions().astype(jnp.int32)
            rows = rows.reshape(-1).at[idx].set(self._outlier_decoded(idx),
                                                unique_indices=True).reshape(g, -1)
        out = self.layout.from_rows(rows, self.value_shape)
        return out.astype(dtype or output_dtype(self.dtype))

    def _outlier_decoded(self, idx: jax.Array) -> jax.Array:
        """Decoded values of the outliers at flat layout positions ``idx``."""
        grp = idx // (self.value_size // self.layout.num_groups(self.value_shape))
        val = self.outlier_value.astype(jnp.float32) * self.group_scale()[grp]
        if self.loc is not None:
            val = val + self.loc.astype(jnp.float32)[grp]
        return val

    def dequantize_slice(self, start: Any, size: int, axis: int = 0, dtype: Any = None, *,
                         align: int = 1) -> jax.Array:
        """``dequantize(dtype)`` sliced to ``[start, start + size)`` along ``axis``, decoding
        only those values (a tile of a weight, for :func:`distq.quantized_apply`).

        ``start`` may be traced (it is clamped to ``[0, shape[axis] - size]``, as
        ``lax.dynamic_slice`` does); ``size`` is a static int; ``align`` (static) promises that
        ``start`` is a multiple of it. The slice's codes are cut out of the packed words (whole
        words where ``align`` says so, else the words around them and a shift); only widths
        that do not divide 32 with unaligned slices read them one by one.

        Examples:
          >>> import jax, jax.numpy as jnp, distq
          >>> x = jax.random.normal(jax.random.key(0), (64, 48))
          >>> q = distq.quantize(x, distq.Scalar(bits=4, axis=0, outliers=0.01))
          >>> tile = q.dequantize_slice(16, 8, axis=1)
          >>> tile.shape, bool((tile == q.dequantize()[:, 16:24]).all())
          ((64, 8), True)
        """
        if self.batch_shape:
            raise ValueError("dequantize_slice() reads one array; index the batch first (q[i])")
        shape = self.value_shape
        nd = len(shape)
        if not nd:
            raise ValueError("dequantize_slice() needs an array of rank >= 1")
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not (
                -nd <= axis < nd):
            raise ValueError(f"axis must be an int in [{-nd}, {nd}), got {axis!r}")
        axis = int(axis) % nd
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not (
                1 <= size <= shape[axis]):
            raise ValueError(f"size must be an int in 1..{shape[axis]}, got {size!r}")
        size = int(size)
        start = jnp.clip(jnp.asarray(start).astype(jnp.int32), 0, shape[axis] - size)
        perm = self.layout.perm(nd)
        pshape = tuple(shape[a] for a in perm)  # the codes are this array, row-major
        j = perm.index(axis)
        a_rows, inner = math.prod(pshape[:j]), math.prod(pshape[j + 1:])
        row_len, count = pshape[j] * inner, size * inner
        s0 = start * inner
        if isinstance(align, bool) or not isinstance(align, (int, np.integer)) or align < 1:
            raise ValueError(f"align must be a positive int, got {align!r}")
        codes = self._block_codes(a_rows, row_len, s0, count, math.gcd(int(align), size) * inner)
        out = self._level_of(codes)  # (a_rows, count)
        scale, loc = self._block_groups(a_rows, row_len, s0, count, inner)
        out = out * scale
        if loc is not None:
            out = out + loc
        if self.n_outliers:
            pos = self.outlier_positions().astype(jnp.int32)
            r, c = pos // row_len, pos % row_len - s0
            c = jnp.where((c >= 0) & (c < count), c, count)  # outside the slice: dropped
            out = out.at[r, c].set(self._outlier_decoded(pos), mode="drop")
        out = out.reshape(pshape[:j] + (size,) + pshape[j + 1:])
        out = jnp.transpose(out, tuple(int(i) for i in np.argsort(perm)))
        return out.astype(dtype or output_dtype(self.dtype))

    def _block_codes(self, a_rows: int, row_len: int, s0: jax.Array, count: int,
                     unit: int) -> jax.Array:
        return unpack_block(self.codes, self.bits, a_rows, row_len, s0, count, unit)

    def _block_groups(self, a_rows: int, row_len: int, s0: jax.Array, count: int,
                      inner: int):
        """Scale and location (or ``None``) broadcastable to a ``(a_rows, count)`` block."""
        g = self.layout.num_groups(self.value_shape)
        glen = self.value_size // g
        gs = self.group_scale()
        loc = None if self.loc is None else self.loc.astype(jnp.float32)

        def pick(v, idx, expand=None):
            if v is None:
                return None
            out = v[idx]
            if expand is not None:
                out = jnp.broadcast_to(out[..., None], out.shape + (expand,)).reshape(
                    a_rows, count)
            return out

        if g == 1:
            return gs[0], None if loc is None else loc[0]
        if glen % row_len == 0:  # a group spans whole rows of the block
            idx = (jnp.arange(a_rows, dtype=jnp.int32) * row_len // glen)[:, None]
            return pick(gs, idx), pick(loc, idx)
        if inner % glen == 0:  # whole groups inside each row, the slice starts on a group
            idx = ((jnp.arange(a_rows, dtype=jnp.int32)[:, None] * row_len + s0) // glen
                   + jnp.arange(count // glen, dtype=jnp.int32)[None, :])
            return pick(gs, idx, glen), pick(loc, idx, glen)
        idx = (jnp.arange(a_rows, dtype=jnp.int32)[:, None] * row_len + s0
               + jnp.arange(count, dtype=jnp.int32)[None, :]) // glen
        return pick(gs, idx), pick(loc, idx)

    def take(self, rows: Any, dtype: Any = None) -> jax.Array:
        """Decoded rows (indices along the first axis), reading only their codes.

        ``q.take(i)`` equals ``q.dequantize()[i]`` for an int or an integer array ``i`` (negative
        indices count from the end), without decoding the other rows: an embedding lookup.
        """
        r = self.checked_rows(rows)
        n0, inner = self.value_shape[0], math.prod(self.value_shape[1:])
        flat = r[..., None] * inner + jnp.arange(inner, dtype=jnp.int32).reshape(
            (1,) * r.ndim + (inner,))  # indices in the original order
        # position of each value in the layout's (groups, group_len) row order
        perm = self.layout.perm(len(self.value_shape))
        multi = jnp.unravel_index(flat, self.value_shape)
        pshape = tuple(self.value_shape[a] for a in perm)
        pos = jnp.ravel_multi_index(tuple(multi[a] for a in perm), pshape, mode="clip")
        group = pos // (self.value_size // self.layout.num_groups(self.value_shape))
        z = self._level_of(bitpack.take(self.codes, self.bits, pos))
        if self.n_outliers:  # written into the rows that hold them, no search
            opos = self.outlier_positions().astype(jnp.int32)
            omulti = jnp.unravel_index(opos, pshape)
            omulti = [omulti[perm.index(a)] for a in range(len(perm))]  # original order
            orow = omulti[0]
            ocol = jnp.ravel_multi_index(tuple(omulti[1:]), self.value_shape[1:],
                                         mode="clip") if inner > 1 else jnp.zeros_like(orow)
            rflat = jnp.clip(r.reshape(-1), 0, n0 - 1)
            nr = rflat.shape[0]
            # slot of each requested row (a row asked for twice: the last slot holds it)
            slot = jnp.full((n0,), nr, jnp.int32).at[rflat].set(
                jnp.arange(nr, dtype=jnp.int32))
            z2 = z.reshape(nr, inner).at[slot[orow], ocol].set(
                self.outlier_value.astype(jnp.float32), mode="drop")
            z = z2[slot[rflat]].reshape(z.shape)
        out = z * self.group_scale()[group]
        if self.loc is not None:
            out = out + self.loc.astype(jnp.float32)[group]
        return out.reshape(r.shape + tuple(self.value_shape[1:])).astype(
            dtype or output_dtype(self.dtype))

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
        meta = {
            "shape": list(self.value_shape),
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
        if self.grid is not None:
            meta["grid"] = [float(v) for v in self.grid]
        return meta

    @classmethod
    def from_arrays(cls, arrays: dict, metadata: dict) -> "QArray":
        """Rebuilds a QArray from its arrays and :meth:`metadata` (validating both)."""
        try:
            lay = metadata["layout"]
            grid = metadata.get("grid")
            q = cls(
                codes=jnp.asarray(arrays["codes"]),
                codebook=_optional(arrays.get("codebook")),
                scale=jnp.asarray(arrays["scale"]),
                loc=_optional(arrays.get("loc")),
                value_shape=tuple(int(s) for s in metadata["shape"]),
                dtype=str(metadata["dtype"]),
                bits=int(metadata["bits"]),
                n=int(metadata["n"]),
                method=str(metadata["method"]),
                layout=Layout(str(lay["kind"]), tuple(int(a) for a in lay["axes"]),
                              None if lay["group_size"] is None else int(lay["group_size"])),
                outlier_index=_optional(arrays.get("outlier_index")),
                outlier_value=_optional(arrays.get("outlier_value")),
                n_outliers=int(metadata.get("outliers", 0)),
                grid=None if grid is None else (float(grid[0]), float(grid[1])),
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"corrupt QArray metadata or arrays: {e!r}") from None
        q.validate()
        return q

    def validate(self) -> None:
        """Checks that array sizes agree with the metadata (raises ``ValueError``).

        A batched QArray (made under ``vmap``) is valid when every array carries the same
        leading batch axes and each member is valid.
        """
        if self.codes.dtype != jnp.uint32 or self.codes.ndim < 1:
            raise ValueError("QArray.codes must be a uint32 array of packed words")
        batch = self.batch_shape
        nb = len(batch)

        def member(a, name):
            if a is None:
                return None
            if tuple(a.shape[:nb]) != batch:
                raise ValueError(f"QArray.{name} must have the batch axes {batch} of its codes")
            return a.shape[nb:]

        if not 1 <= self.bits <= 16 or self.n < 1:
            raise ValueError(f"QArray bits must be in 1..16 and n >= 1, got {self.bits}, {self.n}")
        words = bitpack.packed_nbytes(self.value_size, self.bits) // 4
        if self.codes.shape[nb:] != (words,):
            raise ValueError(f"QArray.codes has {self.codes.shape[nb:]} words; shape "
                             f"{self.value_shape} at {self.bits} bits needs {words}")
        self.layout.validate(self.value_shape)
        g = self.layout.num_groups(self.value_shape)
        if member(self.scale, "scale") != (g,) or (
                self.loc is not None and member(self.loc, "loc") != (g,)):
            raise ValueError(f"QArray scale/loc must have shape ({g},)")
        if (self.codebook is None) == (self.grid is None):
            raise ValueError("QArray needs exactly one of a codebook and a grid")
        if self.codebook is not None and member(self.codebook, "codebook") != (self.n,):
            raise ValueError(f"QArray.codebook must have shape ({self.n},)")
        if self.n > (1 << self.bits):
            raise ValueError(f"QArray has n={self.n} levels, more than 2**bits")
        k = self.n_outliers
        if k < 0 or k > self.value_size or (k > 0) != (self.outlier_index is not None) or (
                (k > 0) != (self.outlier_value is not None)):
            raise ValueError(f"QArray has {k} outliers but outlier arrays do not match")
        if k:
            words = position_words(k, self.index_bits)
            if self.outlier_index.dtype != jnp.uint32 or member(
                    self.outlier_index, "outlier_index") != (words,):
                raise ValueError(f"QArray.outlier_index must be {words} uint32 words")
            if member(self.outlier_value, "outlier_value") != (k,):
                raise ValueError(f"QArray.outlier_value must have shape ({k},)")


def layout_for(spec, shape: tuple[int, ...]) -> Layout:
    """The :class:`Layout` a spec gives an array of ``shape`` (validates divisibility)."""
    ndim = len(shape)
    axis = getattr(spec, "axis", None)
    gs = getattr(spec, "group_size", None)
    if gs is not None:
        if spec.group_axis is None:
            size = math.prod(shape)
            if size % gs:
                raise ValueError(
                    f"group_size={gs} does not divide the array's {size} values; choose a divisor"
                )
            return Layout("block", (), gs)
        a = spec.group_axis
        if not -ndim <= a < ndim:
            raise ValueError(f"group_axis={a} is out of range for an array of rank {ndim}")
        a %= ndim
        if shape[a] % gs:
            raise ValueError(
                f"group_size={gs} does not divide axis {a} of length {shape[a]}; choose a divisor "
                "or group_axis=None for blocks of the flattened array"
            )
        return Layout("group", (a,), gs)
    if axis is not None:
        axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
        for a in axes:
            if not -ndim <= a < ndim:
                raise ValueError(f"axis={axis} is out of range for an array of rank {ndim}")
        axes = tuple(sorted({int(a) % ndim for a in axes}))
        return Layout("channel", axes)
    return Layout("tensor")


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


def output_dtype(name: str):
    """The dtype ``dequantize`` returns for a recorded dtype name: the name itself, except that
    float64 is float32 while JAX runs without ``jax_enable_x64`` (it has no float64 then)."""
    return jax.dtypes.canonicalize_dtype(jnp.dtype(name))


def unpack_words(words: jax.Array, bits: int, n: int) -> jax.Array:
    """The first ``n`` codes of a :func:`distq.bitpack.pack` stream, as uint32.

    For widths that divide 32 (1, 2, 4, 8, 16) each word's codes come out by static shifts, a
    form XLA fuses into whatever consumes the codes (the level lookup and scaling of a decode);
    other widths use :func:`distq.bitpack.unpack`.

    Examples:
      >>> import numpy as np, distq
      >>> w = distq.bitpack.pack(np.arange(10, dtype=np.uint8), 4)
      >>> unpack_words(w, 4, 10).tolist()
      [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    """
    if 32 % bits:
        return bitpack.unpack(words, bits, n).astype(jnp.uint32)
    per = 32 // bits
    shifts = jnp.arange(0, 32, bits, dtype=jnp.uint32)
    codes = (words[:, None] >> shifts[None, :]) & jnp.uint32((1 << bits) - 1)
    codes = codes.reshape(-1)
    return codes if codes.shape[0] == n else codes[:n]


def unpack_block(words: jax.Array, bits: int, a_rows: int, row_len: int, s0: Any,
                 count: int, unit: int = 1) -> jax.Array:
    """Codes ``(a_rows, count)`` of a :func:`distq.bitpack.pack` stream viewed as ``a_rows``
    rows of ``row_len`` codes: row ``r`` gets positions ``r * row_len + s0 + i``, ``i <
    count``. ``s0`` may be traced; ``count`` and ``unit`` (``s0`` and ``count`` are multiples
    of it) are static.

    The words that hold the block are cut out (whole words when ``unit`` says so, else the
    words around it and a shift); only widths that do not divide 32 with unaligned blocks
    read codes one by one.

    Examples:
      >>> import numpy as np, distq
      >>> w = distq.bitpack.pack(np.arange(48, dtype=np.uint8) % 16, 4)  # 3 rows of 16
      >>> unpack_block(w, 4, 3, 16, 5, 4).tolist()
      [[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8]]
    """
    rows_aligned = a_rows == 1 or (row_len * bits) % 32 == 0
    if (unit * bits) % 32 == 0 and rows_aligned:  # the block is whole words
        row_words = row_len * bits // 32
        w = words[:a_rows * row_words].reshape(a_rows, row_words)
        w = lax.dynamic_slice_in_dim(w, s0 * bits // 32, count * bits // 32, axis=1)
        return unpack_words(w.reshape(-1), bits, a_rows * count).reshape(a_rows, count)
    if 32 % bits == 0 and rows_aligned:  # whole words around it, then a shift
        per = 32 // bits
        row_words = -(-row_len // per)
        w = words[:a_rows * row_words].reshape(a_rows, row_words)
        nw = min(-(-count // per) + 1, row_words)
        w0 = jnp.clip(s0 // per, 0, row_words - nw)
        w = lax.dynamic_slice_in_dim(w, w0, nw, axis=1)
        c = unpack_words(w.reshape(-1), bits, a_rows * nw * per).reshape(a_rows, nw * per)
        return lax.dynamic_slice_in_dim(c, s0 - w0 * per, count, axis=1)
    pos = (jnp.arange(a_rows, dtype=jnp.int32)[:, None] * row_len + s0
           + jnp.arange(count, dtype=jnp.int32)[None, :])
    return bitpack.take(words, bits, pos).astype(jnp.uint32)


def lookup_levels(levels: jax.Array, codes: jax.Array, method: str | None = None) -> jax.Array:
    """``levels[codes]`` as float32 (codes past the table read its last level).

    ``method``: "select" (a tree of ``where`` on the code's bits, for tables of at most 16
    levels: on CPU XLA vectorises it, 1.3-1.5x faster than a gather), "gather", or ``None``:
    "select" on the CPU backend for small tables, "gather" elsewhere (GPU and TPU gather from a
    small table at memory speed).

    Examples:
      >>> import jax.numpy as jnp
      >>> lv = jnp.array([-1.0, 0.0, 0.5])
      >>> c = jnp.array([0, 1, 2, 3], jnp.uint32)
      >>> lookup_levels(lv, c, "select").tolist(), lookup_levels(lv, c, "gather").tolist()
      ([-1.0, 0.0, 0.5, 0.5], [-1.0, 0.0, 0.5, 0.5])
    """
    n = levels.shape[-1]
    levels = levels.astype(jnp.float32)
    if method is None:
        method = "select" if n <= 16 and jax.default_backend() == "cpu" else "gather"
    if method == "gather":
        return levels[jnp.minimum(codes.astype(jnp.int32), n - 1)]
    if method != "select":
        raise ValueError(f"method must be 'select', 'gather' or None, got {method!r}")
    depth = max(1, (n - 1).bit_length())
    vals = [levels[min(i, n - 1)] for i in range(1 << depth)]
    c = codes.astype(jnp.uint32)
    for b in range(depth):
        bit = (c & jnp.uint32(1 << b)) != 0
        vals = [jnp.where(bit, vals[2 * i + 1], vals[2 * i]) for i in range(len(vals) // 2)]
    return jnp.where(c >= jnp.uint32(1 << depth), levels[n - 1], vals[0])


def is_qarray(x: Any) -> bool:
    """``True`` for a :class:`QArray` (use as ``is_leaf`` in ``jax.tree`` functions).

    Examples:
      >>> import jax, jax.numpy as jnp, distq
      >>> tree = {"q": distq.quantize(jnp.ones((4, 4)), distq.NF4(group_size=8)), "b": jnp.ones(4)}
      >>> distq.is_qarray(tree["q"]), distq.is_qarray(tree["b"])
      (True, False)
      >>> jax.tree.map(lambda x: x.shape, tree, is_leaf=distq.is_qarray)
      {'b': (4,), 'q': (4, 4)}
    """
    return isinstance(x, QArray)


QARRAY_FIELDS = QArray.array_fields


def from_state_dict(state: dict) -> QArray:
    """Rebuilds a QArray from ``flax.serialization.to_state_dict(q)`` without a target."""
    return leaf_from_state(QArray, state)
