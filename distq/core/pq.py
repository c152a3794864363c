"""Product quantisation (PQ) and optimised PQ (OPQ) of matrices, with distance tables.

A row of ``D`` values is cut into ``m`` sub-vectors of ``D / m``; each sub-vector is replaced by the
index of its nearest centroid in that sub-space's codebook of ``K = 2**bits`` centroids, learnt by
k-means (:mod:`distq.kmeans`: greedy k-means++ seeding, Lloyd iterations, all sub-spaces in one
computation). A row then costs ``m * bits`` bits plus its share of the codebooks.

OPQ first rotates the rows by an orthogonal ``R`` (learnt by alternating PQ on ``x @ R`` and the
orthogonal Procrustes solution for ``R`` given the decoded rows), starting from the identity, so it
can only improve on PQ's own training objective.

Products with a quantised matrix never decode it: ``q @ v`` builds one small table per sub-space,
``T_s = C_s @ v_s`` (``K`` entries per column of ``v``), and sums ``T_s[code]`` over sub-spaces;
:meth:`ProductQuantizer.search` does the same with squared distances (asymmetric distance
computation).

References:
  H. Jegou, M. Douze, C. Schmid, "Product quantization for nearest neighbor search", IEEE TPAMI
  33(1), 2011 (PQ, Sec. III; asymmetric distance, Sec. IV-A).
  T. Ge, K. He, Q. Ke, J. Sun, "Optimized product quantization", IEEE TPAMI 36(4), 2014
  (the non-parametric alternating solution, Sec. 3.1; Procrustes step, Eq. 6).
  P. H. Schonemann, "A generalized solution of the orthogonal Procrustes problem",
  Psychometrika 31(1), 1966.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _checks, bitpack
from . import _numerics as nx
from . import kmeans as km
from typing import ClassVar

from . import spec as _spec
from .leaf import LeafBase, leaf_from_state
from .qarray import unpack_block, unpack_words
from .specs import PQ



# ------------------------------------------------------------------------------ the frame
# Squared distances of float32 rows overflow beyond ~1e19 and flush to zero below ~1e-19, and a
# common offset (rows near 1e4 that vary by 1) cancels their digits. Nearest centroids do not
# change when rows and centroids move and scale together, so every distance is computed in a
# frame: centred per column, scaled by a power of two (exactly) to magnitudes near 1. Training
# takes the frame from the training rows (column means) and stores the centroids back in the
# data's units, the means added in (nothing else stored); encoding and search take it from the
# codebooks (their mean per column), so they need nothing stored either.
_FAR = 2.0 ** 50  # framed coordinates are clipped here: squares summed stay finite


def _frame_stats(x: jax.Array):
    """``(k, mu, k2)`` for rows ``(N, D)``: ``(x * 2**k - mu) * 2**k2`` is centred, magnitudes
    near 1 (``mu``: column means of ``x * 2**k``)."""
    x = x.astype(jnp.float32)
    k = -_checks.max_exponent(x.reshape(-1))
    xs = _checks.ldexp(x, k)
    mu = jnp.mean(xs, axis=0)
    k2 = -_checks.max_exponent((xs - mu[None, :]).reshape(-1))
    return k, mu, k2


def _to_frame(x: jax.Array, stats) -> jax.Array:
    k, mu, k2 = stats
    return _checks.ldexp(_checks.ldexp(x.astype(jnp.float32), k) - mu[None, :], k2)


def _codebook_frame(codebooks: jax.Array):
    """``(k0, shift (D,), k1, framed codebooks)``: the frame encoding and search use."""
    cb = codebooks.astype(jnp.float32)
    m, _, ds = cb.shape
    k0 = -_checks.max_exponent(cb.reshape(-1))
    cb0 = _checks.ldexp(cb, k0)
    shift = jnp.mean(cb0, axis=1)  # (m, ds)
    d0 = cb0 - shift[:, None, :]
    k1 = -_checks.max_exponent(d0.reshape(-1))
    return k0, shift.reshape(m * ds), k1, _checks.ldexp(d0, k1)


def _rows_in_frame(x: jax.Array, rotation: jax.Array | None, frame) -> jax.Array:
    """Rows ``(n, D)`` rotated (OPQ) and moved into a codebook frame."""
    k0, shift, k1, _ = frame
    x0 = jnp.clip(_checks.ldexp(x.astype(jnp.float32), k0), -2.0 ** 100, 2.0 ** 100)
    if rotation is not None:
        x0 = x0 @ rotation.astype(jnp.float32)
    return jnp.clip(_checks.ldexp(x0 - shift[None, :], k1), -_FAR, _FAR)


# --------------------------------------------------------------------------- code helpers
def _nearest_block(xb: jax.Array, cbt: jax.Array, half: jax.Array) -> jax.Array:
    """Codes ``(rows, m)`` of a block of rows ``(rows, m, ds)``; one sub-space at a time.

    ``cbt`` holds the transposed codebooks ``(m, ds, K)``. The search is k-means' keyed
    one-reduction search (:func:`distq.kmeans.nearest_rows`) for ``K <= 256``: distances are
    compared to ``2^-15`` of their value, so a centroid that ties the nearest one to that
    precision may be chosen instead (measured: 99.997 % of codes identical to an exact search,
    the others equally near to float32 rounding); exact above 256 centroids.
    """
    xs = jnp.transpose(xb, (1, 0, 2))  # (m, rows, ds)
    xxh = 0.5 * jnp.sum(xs * xs, axis=-1)
    idx = lax.map(lambda a: km.nearest_rows(*a, exact=False)[0], (xs, cbt, half, xxh))
    return idx.T


@functools.partial(jax.jit, static_argnames=("block",))
def _encode_codes(x: jax.Array, codebooks: jax.Array, rotation: jax.Array | None,
                  block: int) -> jax.Array:
    """``(N, D)`` rows -> ``(N, m)`` int32 codes."""
    n, dim = x.shape
    m, _, ds = codebooks.shape
    frame = _codebook_frame(codebooks)
    cb = frame[3]
    half = 0.5 * jnp.sum(cb * cb, axis=-1)
    cbt = jnp.swapaxes(cb, 1, 2)
    if n <= block:
        return _nearest_block(_rows_in_frame(x, rotation, frame).reshape(n, m, ds), cbt, half)

    def fn(start):
        xb = _rows_in_frame(lax.dynamic_slice_in_dim(x, start, block, axis=0), rotation, frame)
        return (_nearest_block(xb.reshape(block, m, ds), cbt, half),)

    (codes,) = km.blocked(n, block, fn, ((jnp.zeros((n, m), jnp.int32),), (0,)))
    return codes


@functools.partial(jax.jit, static_argnames=("block", "bits"))
def _encode_packed(x, codebooks, rotation, block, bits):
    """Codes, bit-packed, and whether ``x`` was finite: one computation, one pass of checks."""
    codes = _encode_codes(x, codebooks, rotation, block)
    words = bitpack.pack(codes.reshape(-1).astype(jnp.uint32), bits)
    return words, jnp.all(jnp.isfinite(x))


def _as_rows(x: Any, dim: int, name: str = "x") -> jax.Array:
    """Float ``(N, dim)`` array (finiteness is checked inside the encoder, in the same pass;
    float64 input is checked to fit float32 first, see :func:`distq.core._checks.
    check_float32_range`)."""
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    dt = np.dtype(x.dtype)
    if not (np.issubdtype(dt, np.floating) or dt == jnp.bfloat16):
        raise TypeError(f"{name} must have a floating-point dtype, got {dt}")
    x = jnp.asarray(_checks.check_float32_range(x, name))
    if x.ndim != 2 or x.shape[1] != dim or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N, {dim}) with N >= 1, got {tuple(x.shape)}")
    return x


def decode_codes(codes: jax.Array, codebooks: jax.Array, rotation: jax.Array | None,
                  dtype: Any = jnp.float32) -> jax.Array:
    """``(n, m)`` codes -> ``(n, D)`` rows (un-rotated), computed in ``dtype``."""
    n, m = codes.shape
    _, k, ds = codebooks.shape
    flat = (codes + (jnp.arange(m, dtype=codes.dtype) * k)[None, :]).reshape(-1)
    rows = jnp.take(codebooks.astype(dtype).reshape(m * k, ds), flat, axis=0).reshape(n, m * ds)
    if rotation is not None:
        rows = rows @ rotation.astype(dtype).T
    return rows


def tables(codebooks: jax.Array, rotation: jax.Array | None, v: jax.Array) -> jax.Array:
    """Inner-product tables ``T[s, c, j] = C_s[c] . (R^T v)_s[:, j]`` for ``v`` of shape (D, k)."""
    m, kk, ds = codebooks.shape
    v = v.astype(jnp.float32)
    if rotation is not None:
        v = rotation.astype(jnp.float32).T @ v
    vs = v.reshape(m, ds, v.shape[-1])
    return jnp.einsum("scd,sdj->scj", codebooks.astype(jnp.float32), vs)


def gather_sum(tables: jax.Array, codes: jax.Array) -> jax.Array:
    """``out[i, j] = sum_s tables[s, codes[i, s], j]``: (n, k)."""
    m = tables.shape[0]
    out = tables[0][codes[:, 0]]
    for s in range(1, m):
        out = out + tables[s][codes[:, s]]
    return out


# ------------------------------------------------------------------------------- the array
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PQArray(LeafBase):
    """A product-quantised matrix: packed codes + codebooks (+ rotation) + static metadata.

    ``dequantize()`` rebuilds the ``(N, D)`` matrix; ``q[rows]`` decodes only those rows;
    ``q @ v``, ``v @ q``, ``v @ q.T`` and ``q.T @ v`` work on the codes through small per-sub-space
    tables and never build the matrix. A pytree: the arrays are leaves, the rest is static.

    Attributes:
      codes: the ``N * m`` codes of ``bits`` bits, row-major, bit-packed into uint32 words
        (:func:`distq.bitpack.pack`).
      codebooks: ``(m, K, D / m)`` centroids (in the rotated space when ``rotation`` is set).
      rotation: ``(D, D)`` orthogonal matrix of OPQ (rows were encoded as ``x @ rotation``), or
        ``None``.
      value_shape, dtype: of the original matrix (``shape`` adds the batch axes of a PQArray
        made under ``vmap``); ``m``, ``bits``: sub-spaces and bits per code.

    Examples:
      >>> import jax, distq
      >>> x = jax.random.normal(jax.random.key(0), (512, 32))
      >>> pq = distq.pq.fit(jax.random.key(1), x, distq.pq.PQ(m=4, bits=4))
      >>> q = pq.encode(x)
      >>> q.shape, q.dtype, q.nbytes == 512 * 4 * 4 // 8 + 4 * 16 * 8 * 4
      ((512, 32), 'float32', True)
      >>> bool(jax.numpy.allclose(q[3], q.dequantize()[3]))
      True
    """

    kind: ClassVar[str] = "pqarray"
    array_fields: ClassVar[tuple[str, ...]] = ("codes", "codebooks", "rotation")
    records_dtype: ClassVar[bool] = True  # dtype is the caller's, even where JAX held float32

    codes: jax.Array
    codebooks: jax.Array
    rotation: jax.Array | None
    value_shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True))
    m: int = dataclasses.field(metadata=dict(static=True))
    bits: int = dataclasses.field(metadata=dict(static=True))

    # numpy must defer ``ndarray @ q`` to ``q.__rmatmul__`` instead of decoding ``q``
    __array_ufunc__ = None

    # ------------------------------------------------------------------ array-like
    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading axes added by ``vmap`` (``()`` for one matrix)."""
        return tuple(getattr(self.codes, "shape", (0,))[:-1])  # () when a tree map put labels here

    @property
    def T(self) -> "PQArrayT":  # noqa: N802 (numpy's name)
        """A transposed view: ``v @ q.T`` and ``q.T @ w`` go through the tables too."""
        return PQArrayT(self)

    def codes_unpacked(self) -> jax.Array:
        """All codes as an ``(N, m)`` int32 array."""
        n = self.value_shape[0]
        c = unpack_words(self.codes, self.bits, n * self.m)
        return c.reshape(n, self.m).astype(jnp.int32)

    def row_codes(self, rows: Any) -> jax.Array:
        """Codes ``(len(rows), m)`` of some rows, read straight from the packed words."""
        rows = jnp.asarray(rows, jnp.int32)
        pos = rows[..., None] * self.m + jnp.arange(self.m, dtype=jnp.int32).reshape(
            (1,) * rows.ndim + (self.m,))
        return bitpack.take(self.codes, self.bits, pos)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The ``(N, D)`` decoded matrix, in the original dtype (or ``dtype``)."""
        if self.batch_shape:
            fn = lambda q: q.dequantize(dtype)  # noqa: E731
            for _ in self.batch_shape:
                fn = jax.vmap(fn)
            return fn(self)
        rows = decode_codes(self.codes_unpacked(), self.codebooks, self.rotation)
        return rows.astype(dtype or _output_dtype(self.dtype))

    #: axes along which :meth:`dequantize_slice` decodes only the slice
    slice_axes: ClassVar[tuple[int, ...]] = (0,)

    def dequantize_slice(self, start: Any, size: int, axis: int = 0, dtype: Any = None, *,
                         align: int = 1) -> jax.Array:
        """``dequantize(dtype)`` sliced to ``[start, start + size)`` along ``axis``.

        Along the rows (``axis=0``) only those rows' codes are read (``start`` may be traced,
        ``size`` static; ``align``: ``start`` is a multiple of it); along the columns the
        matrix is decoded and sliced.

        Examples:
          >>> import jax, distq
          >>> x = jax.random.normal(jax.random.key(0), (512, 32))
          >>> q = distq.pq.quantize(jax.random.key(1), x, distq.PQ(m=4, bits=8))
          >>> bool((q.dequantize_slice(100, 16) == q.dequantize()[100:116]).all())
          True
        """
        if self.batch_shape:
            raise ValueError("dequantize_slice() reads one matrix; index the batch first (q[i])")
        if isinstance(axis, bool) or axis not in (0, 1, -1, -2):
            raise ValueError(f"axis must be 0 or 1 for a matrix, got {axis!r}")
        axis %= 2
        n = self.value_shape[axis]
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not (
                1 <= size <= n):
            raise ValueError(f"size must be an int in 1..{n}, got {size!r}")
        start = jnp.clip(jnp.asarray(start).astype(jnp.int32), 0, n - int(size))
        if axis == 1:
            return lax.dynamic_slice_in_dim(self.dequantize(dtype), start, int(size), axis=1)
        unit = math.gcd(int(align), int(size)) * self.m
        codes = unpack_block(self.codes, self.bits, 1, n * self.m, start * self.m,
                             int(size) * self.m, unit)
        rows = decode_codes(codes.reshape(int(size), self.m).astype(jnp.int32), self.codebooks,
                            self.rotation)
        return rows.astype(dtype or _output_dtype(self.dtype))

    def take(self, rows: Any, dtype: Any = None) -> jax.Array:
        """Decoded rows (an int or an integer array of row indices), reading only their codes."""
        rows = self.checked_rows(rows)
        dec = decode_codes(self.row_codes(rows.reshape(-1)), self.codebooks, self.rotation)
        return dec.reshape(rows.shape + (self.value_shape[1],)).astype(
            dtype or _output_dtype(self.dtype))

    def __getitem__(self, idx) -> Any:
        """Decoded rows: ``q[i]`` (D,), ``q[array]`` (n, D), ``q[a:b]``, ``q[rows, cols]``;
        for a PQArray made under ``vmap``, ``q[i]`` is batch member ``i`` (a PQArray)."""
        if self.batch_shape:
            return jax.tree_util.tree_map(lambda a: a[idx], self)
        rest = ()
        if isinstance(idx, tuple):
            idx, rest = idx[0], idx[1:]
        n = self.value_shape[0]
        if isinstance(idx, slice):
            rows = jnp.arange(*idx.indices(n), dtype=jnp.int32)
        elif idx is Ellipsis:
            rows = jnp.arange(n, dtype=jnp.int32)
        else:
            rows = jnp.asarray(idx)
            if not jnp.issubdtype(rows.dtype, jnp.integer):
                raise TypeError(f"PQArray rows must be integers or a slice, got {rows.dtype}")
            if _checks.is_concrete(rows) and rows.size and (
                int(rows.max()) >= n or int(rows.min()) < -n
            ):
                raise IndexError(f"row index out of range for {n} rows")
            rows = jnp.where(rows < 0, rows + n, rows).astype(jnp.int32)
        flat = rows.reshape(-1)
        dec = decode_codes(self.row_codes(flat), self.codebooks, self.rotation)
        out = dec.reshape(rows.shape + (self.value_shape[1],))
        out = out.astype(_output_dtype(self.dtype))
        return out[(Ellipsis,) + rest] if rest else out

    # ------------------------------------------------------------------ products
    def _out_dtype(self, v: jax.Array):
        with jax.numpy_dtype_promotion("standard"):  # the lattice, whatever the user's config
            return jnp.promote_types(_output_dtype(self.dtype), v.dtype)

    def __matmul__(self, v: Any) -> jax.Array:
        """``X @ v`` for ``v`` of shape (D,) or (D, k), through per-sub-space tables."""
        v = jnp.asarray(v)
        if v.ndim not in (1, 2) or v.shape[0] != self.value_shape[1]:
            raise ValueError(f"cannot multiply a {self.value_shape} PQArray by shape {v.shape}")
        vec = v.ndim == 1
        v2 = v[:, None] if vec else v
        out = gather_sum(tables(self.codebooks, self.rotation, v2), self.codes_unpacked())
        out = out[:, 0] if vec else out
        return out.astype(self._out_dtype(v))

    def __rmatmul__(self, v: Any) -> jax.Array:
        """``v @ X`` for ``v`` of shape (N,) or (k, N): per-code sums of ``v``, then codebooks."""
        v = jnp.asarray(v)
        n, dim = self.value_shape
        if v.ndim not in (1, 2) or v.shape[-1] != n:
            raise ValueError(f"cannot multiply shape {v.shape} by a {self.value_shape} PQArray")
        vec = v.ndim == 1
        v2 = (v[None, :] if vec else v).astype(jnp.float32).T  # (N, k)
        codes = self.codes_unpacked()
        kk = self.codebooks.shape[1]
        cb = self.codebooks.astype(jnp.float32)
        parts = []
        for s in range(self.m):
            w = jax.ops.segment_sum(v2, codes[:, s], kk)  # (K, k)
            parts.append(w.T @ cb[s])  # (k, ds)
        out = jnp.concatenate(parts, axis=1)  # (k, D) in the rotated space
        if self.rotation is not None:
            out = out @ self.rotation.astype(jnp.float32).T
        out = out[0] if vec else out
        return out.astype(self._out_dtype(v))

    def __repr__(self) -> str:
        rot = ", opq" if self.rotation is not None else ""
        return (f"PQArray(shape={self.shape}, dtype={self.dtype}, m={self.m}, bits={self.bits}"
                f"{rot}, nbytes={self.nbytes})")

    # ------------------------------------------------------------------ serialisation
    def metadata(self) -> dict:
        """JSON-able static metadata."""
        return {"shape": list(self.value_shape), "dtype": self.dtype, "m": self.m, "bits": self.bits,
                "method": "pq"}

    @classmethod
    def from_arrays(cls, arrays: dict, metadata: dict) -> "PQArray":
        """Rebuilds a PQArray from its arrays and :meth:`metadata` (validated)."""
        try:
            rot = arrays.get("rotation")
            q = cls(
                codes=jnp.asarray(arrays["codes"]),
                codebooks=jnp.asarray(arrays["codebooks"]),
                rotation=None if rot is None else jnp.asarray(rot),
                value_shape=tuple(int(s) for s in metadata["shape"]),
                dtype=str(metadata["dtype"]),
                m=int(metadata["m"]),
                bits=int(metadata["bits"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"corrupt PQArray metadata or arrays: {e!r}") from None
        q.validate()
        return q

    def validate(self) -> None:
        """Checks that the arrays agree with the metadata (raises ``ValueError``)."""
        n, dim = self.value_shape
        words = bitpack.packed_nbytes(n * self.m, self.bits) // 4
        if self.codes.dtype != jnp.uint32 or self.codes.shape != (words,):
            raise ValueError(f"PQArray.codes must be {words} uint32 words for {self.value_shape}, "
                             f"m={self.m}, bits={self.bits}")
        want = (self.m, 1 << self.bits, dim // self.m)
        if dim % self.m or tuple(self.codebooks.shape) != want:
            raise ValueError(f"PQArray.codebooks must have shape {want}")
        if self.rotation is not None and tuple(self.rotation.shape) != (dim, dim):
            raise ValueError(f"PQArray.rotation must have shape ({dim}, {dim})")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PQArrayT:
    """The transpose of a :class:`PQArray` (``q.T``); products still go through the codes."""

    base: PQArray

    __array_ufunc__ = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.base.value_shape[1], self.base.value_shape[0])

    @property
    def dtype(self) -> str:
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return 2

    @property
    def T(self) -> PQArray:  # noqa: N802
        return self.base

    def dequantize(self, dtype: Any = None) -> jax.Array:
        return self.base.dequantize(dtype).T

    def __rmatmul__(self, v: Any) -> jax.Array:
        """``v @ X.T`` = ``(X @ v.T).T`` for ``v`` of shape (D,) or (k, D)."""
        v = jnp.asarray(v)
        return self.base @ v if v.ndim == 1 else (self.base @ v.T).T

    def __matmul__(self, w: Any) -> jax.Array:
        """``X.T @ w`` = ``(w.T @ X).T`` for ``w`` of shape (N,) or (N, k)."""
        w = jnp.asarray(w)
        return w @ self.base if w.ndim == 1 else (w.T @ self.base).T


def _output_dtype(name: str):
    """The dtype decoding returns for a recorded dtype name (float64 is float32 while JAX runs
    without ``jax_enable_x64``: it has no float64 arrays then)."""
    return jax.dtypes.canonicalize_dtype(jnp.dtype(name))


def is_pqarray(x: Any) -> bool:
    """``True`` for a :class:`PQArray`."""
    return isinstance(x, PQArray)


_spec.register_leaf(PQArray)
_spec.register_quantizer(
    PQ, lambda x, spec, key: quantize(jax.random.key(0) if key is None else key, x, spec))


def from_state_dict(state: dict) -> PQArray:
    """Rebuilds a PQArray from ``flax.serialization.to_state_dict(q)`` without a target."""
    return leaf_from_state(PQArray, state)


# ------------------------------------------------------------------------ fitted quantiser
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ProductQuantizer:
    """A fitted product quantiser (what :func:`fit` returns); a pytree.

    Attributes:
      codebooks: ``(m, K, D / m)`` centroids (rotated space when ``rotation`` is set).
      rotation: ``(D, D)`` orthogonal OPQ rotation, or ``None``.
      inertia: ``(m,)`` training squared error per sub-space (rotated space).
      iters: ``(m,)`` Lloyd iterations run per sub-space (last k-means).
      dim, bits: row length and bits per code; ``block``: rows per encoding block.
    """

    codebooks: jax.Array
    rotation: jax.Array | None
    inertia: jax.Array
    iters: jax.Array
    dim: int = dataclasses.field(metadata=dict(static=True))
    bits: int = dataclasses.field(metadata=dict(static=True))
    block: int = dataclasses.field(default=4096, metadata=dict(static=True))

    @property
    def m(self) -> int:
        return self.codebooks.shape[0]

    def _check_rows(self, x: Any, name: str = "x") -> jax.Array:
        x = _checks.as_float_array(x, name)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape (N, {self.dim}), got {tuple(x.shape)}")
        return x

    def encode(self, x: Any) -> PQArray:
        """Encodes rows ``(N, D)`` into a :class:`PQArray` (nearest centroid per sub-space).

        The PQArray records ``x``'s dtype (float64 too, which JAX without ``jax_enable_x64``
        holds as float32); rows of any finite float32 magnitude encode (distances are computed
        in the codebooks' frame, see the module's source)."""
        dtype = _checks.dtype_name(x)
        x = _as_rows(x, self.dim)
        words, finite = _encode_packed(x, self.codebooks, self.rotation, self.block, self.bits)
        if _checks.is_concrete(finite) and not bool(finite):
            raise ValueError("x contains NaN/inf values; quantisation needs finite input")
        return PQArray(codes=words, codebooks=self.codebooks, rotation=self.rotation,
                       value_shape=tuple(x.shape), dtype=dtype, m=self.m, bits=self.bits)

    def decode(self, q: PQArray, dtype: Any = None) -> jax.Array:
        """Decodes a :class:`PQArray` (same as ``q.dequantize()``)."""
        if not isinstance(q, PQArray):
            raise TypeError(f"decode expects a PQArray, got {type(q).__name__}")
        return q.dequantize(dtype)

    def search(self, q: PQArray, queries: Any, k: int) -> tuple[jax.Array, jax.Array]:
        """Top-``k`` rows of ``q`` nearest to each query by asymmetric squared L2 distance.

        The distance of query ``y`` to row ``i`` is ``|y - xhat_i|^2``, computed as
        ``sum_s |y_s - C_s[code_is]|^2`` from one ``(m, K)`` table per query.

        Args:
          q: the encoded database.
          queries: ``(nq, D)`` or ``(D,)``.
          k: neighbours per query (``<= N``).

        Returns:
          ``(distances, indices)``, each ``(nq, k)`` (or ``(k,)``), nearest first.

        Examples:
          >>> import jax, distq
          >>> x = jax.random.normal(jax.random.key(0), (512, 32))
          >>> pq = distq.pq.fit(jax.random.key(1), x, distq.pq.PQ(m=4, bits=4))
          >>> dist, idx = pq.search(pq.encode(x), x[:2], k=3)
          >>> idx.shape, idx[:, 0].tolist()
          ((2, 3), [0, 1])
        """
        if not isinstance(q, PQArray):
            raise TypeError(f"search expects a PQArray, got {type(q).__name__}")
        y = jnp.asarray(queries)
        vec = y.ndim == 1
        y = self._check_rows(y[None] if vec else y, "queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= q.shape[0]:
            raise ValueError(f"k must be an int in 1..{q.shape[0]}, got {k!r}")
        dist, idx = _search(y, q.codes_unpacked(), q.codebooks, q.rotation, int(k))
        return (dist[0], idx[0]) if vec else (dist, idx)


@functools.partial(jax.jit, static_argnames=("k",))
def _search(y, codes, codebooks, rotation, k):
    m, kk, ds = codebooks.shape
    frame = _codebook_frame(codebooks)  # distances in the frame, scaled back at the end
    y = _rows_in_frame(y, rotation, frame)
    cb = frame[3]
    ys = y.reshape(y.shape[0], m, ds)
    # tables[q, s, c] = |y_s - C_s[c]|^2
    tab = (jnp.sum(ys * ys, -1)[:, :, None] - 2.0 * jnp.einsum("qsd,scd->qsc", ys, cb)
           + jnp.sum(cb * cb, -1)[None])
    dist = tab[:, 0, codes[:, 0]]
    for s in range(1, m):
        dist = dist + tab[:, s, codes[:, s]]
    neg, idx = lax.top_k(-dist, k)
    return _checks.ldexp(jnp.maximum(-neg, 0.0), -2 * (frame[0] + frame[2])), idx


# ------------------------------------------------------------------------------------ fit
def _procrustes(x: jax.Array, y: jax.Array) -> jax.Array:
    """Orthogonal ``R`` minimising ``|x R - y|_F``: ``U V^T`` from the SVD of ``x^T y``."""
    u, _, vt = jnp.linalg.svd(x.T @ y, full_matrices=False)
    return u @ vt


def _split(x: jax.Array, m: int) -> jax.Array:
    """``(N, D)`` -> ``(m, N, D / m)``."""
    n, dim = x.shape
    return jnp.transpose(x.reshape(n, m, dim // m), (1, 0, 2))


@functools.partial(jax.jit, static_argnames=("spec",))
def _sample(key: jax.Array, x: jax.Array, spec: PQ):
    """A random subset of the rows ``(S, D)`` in its frame (see :func:`_frame_stats`), its
    sub-spaces ``(m, S, D / m)`` and the frame.

    A computation of its own: inside the k-means computation XLA:CPU turns the sub-space
    transpose into a layout change of every later read, which made the whole fit 20 % slower.
    """
    xs = km.subsample(key, x.astype(jnp.float32), spec.kmeans().sample_size(x.shape[0]))
    stats = _frame_stats(xs)
    xs = _to_frame(xs, stats)
    return xs, _split(xs, spec.m), stats


@functools.partial(jax.jit, static_argnames=("m", "rows"))
def _split_float32(x: jax.Array, m: int, rows: bool):
    """All rows' sub-spaces in their frame, the frame, and (``rows``: for OPQ) the rows."""
    stats = _frame_stats(x)
    xf = _to_frame(x, stats)
    return (xf if rows else None), _split(xf, m), stats


def _fit(key: jax.Array, x: jax.Array, spec: PQ):
    k_sample, k_fit = jax.random.split(key)
    if spec.kmeans().sample_size(x.shape[0]) < x.shape[0]:
        xs, xsplit, stats = _sample(k_sample, x, spec)
    else:  # every row trains: no copy of them, only their sub-spaces (OPQ: and the rows)
        xs, xsplit, stats = _split_float32(x, spec.m, spec.opq and spec.opq_iters > 0)
    return _fit_sample(k_fit, xs, xsplit, stats, spec)


@functools.partial(jax.jit, static_argnames=("spec",))
def _fit_sample(k_fit: jax.Array, xs: jax.Array | None, xsplit: jax.Array, stats, spec: PQ):
    """k-means (and OPQ) on rows in their frame; the codebooks and inertia come back in the
    data's units (the column means added into the centroids, in the rotated space for OPQ)."""
    cfg = spec.kmeans()
    m = spec.m
    dim = m * xsplit.shape[-1]
    res = km.fit_batched(k_fit, xsplit, cfg)
    cb, inertia, iters = res.centroids, res.inertia, res.iters
    rot = None
    if spec.opq and spec.opq_iters > 0:
        rot = jnp.eye(dim, dtype=jnp.float32)

        def alternate(_, carry):
            r, cb, _, _ = carry
            xr = xs @ r
            codes, _ = km.assign(_split(xr, m), cb, block=spec.block)  # (m, S)
            y = decode_codes(codes.T, cb, None)
            r = _procrustes(xs, y)
            res = km.lloyd(_split(xs @ r, m), cb, iters=spec.opq_lloyd_iters, tol=spec.tol,
                           block=spec.block)
            return r, res.centroids, res.inertia, res.iters

        rot, cb, inertia, iters = lax.fori_loop(
            0, spec.opq_iters, alternate, (rot, cb, inertia, iters)
        )
    k, mu, k2 = stats
    mu = mu if rot is None else mu @ rot
    cb = _checks.ldexp(_checks.ldexp(cb, -k2) + mu.reshape(m, 1, dim // m), -k)
    cb = jnp.clip(cb, -_checks.F32_MAX, _checks.F32_MAX).astype(spec.codebook_dtype)
    inertia = _checks.ldexp(inertia, -2 * (k + k2))
    return cb, rot, inertia, iters


def fit(key: jax.Array, x: Any, spec: PQ | None = None, **kwargs) -> ProductQuantizer:
    """Learns a product quantiser for the rows of ``x``.

    Args:
      key: a ``jax.random`` key (the result is a deterministic function of it).
      x: ``(N, D)`` float matrix; ``D`` divisible by ``spec.m``, ``N >= 2**spec.bits``.
      spec: a :class:`PQ`; alternatively pass its fields as keyword arguments.

    Returns:
      A :class:`ProductQuantizer` (``.encode``, ``.decode``, ``.search``).

    Raises:
      TypeError: for a non-float ``x``.
      ValueError: for NaN/inf, a wrong shape, ``D % m != 0`` or too few rows.

    Examples:
      >>> import jax, distq
      >>> x = jax.random.normal(jax.random.key(0), (512, 32))
      >>> pq = distq.pq.fit(jax.random.key(1), x, distq.pq.PQ(m=4, bits=4))
      >>> q = pq.encode(x)
      >>> xc = x - x.mean(0, keepdims=True)
      >>> err = float(((q.dequantize() - x) ** 2).sum() / (xc ** 2).sum())
      >>> 0.4 < err < 0.7  # i.i.d. Gaussian rows, 16 centroids per 8-d sub-space: a hard case
      True
    """
    if spec is None:
        spec = PQ(**kwargs)
    elif kwargs:
        spec = dataclasses.replace(spec, **kwargs)
    if not isinstance(spec, PQ):
        raise TypeError(f"spec must be a distq.pq.PQ, got {type(spec).__name__}")
    x = _checks.as_float_array(x, "x")
    if x.ndim != 2:
        raise ValueError(f"x must be a matrix (N, D), got shape {tuple(x.shape)}")
    n, dim = x.shape
    if dim % spec.m:
        raise ValueError(f"m={spec.m} sub-spaces must divide the row length D={dim}")
    kk = spec.num_centroids
    if n < kk:
        raise ValueError(
            f"bits={spec.bits} needs at least 2**bits={kk} training rows, got N={n}; "
            "use fewer bits or more rows"
        )
    cb, rot, inertia, iters = _fit(key, x, spec)
    if _checks.is_concrete(cb) and not bool(jnp.all(jnp.isfinite(cb))):
        raise ValueError(
            f"codebook_dtype={spec.codebook_dtype!r} cannot hold these centroids (largest "
            f"magnitude {float(jnp.max(jnp.abs(cb.astype(jnp.float32)))):.3g} after rounding; "
            f"{spec.codebook_dtype} ends at {float(jnp.finfo(spec.codebook_dtype).max):.4g}): "
            "use codebook_dtype='float32' or scale the rows first")
    return ProductQuantizer(codebooks=cb, rotation=rot, inertia=inertia, iters=iters, dim=dim,
                            bits=spec.bits, block=spec.block)


def quantize(key: jax.Array, x: Any, spec: PQ) -> PQArray:
    """Fits and encodes in one call: ``fit(key, x, spec).encode(x)``.

    Examples:
      >>> import jax, distq
      >>> x = jax.random.normal(jax.random.key(0), (512, 32))
      >>> q = distq.pq.quantize(jax.random.key(1), x, distq.PQ(m=4, bits=4))
      >>> type(q).__name__, q.shape, q.nbytes  # 512 x 4 4-bit codes, 4 x 16 x 8 codebooks
      ('PQArray', (512, 32), 3072)
    """
    return fit(key, x, spec).encode(x)


__all__ = ["PQ", "PQArray", "PQArrayT", "ProductQuantizer", "fit", "quantize", "is_pqarray",
           "from_state_dict"]

