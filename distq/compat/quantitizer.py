"""Drop-in replacement for the ``quantitizer`` package's ``quantitize`` (product quantisation).

``quantitize(matrix, sub_size=8)`` cuts each row into ``sub_size`` equal parts (``sub_size`` is the
*number of sub-spaces*, not their width), learns ``n_cluster`` centroids per part and returns a
matrix-like :class:`Quantitized` with ``nbytes``, row indexing and full decoding, as quantitizer
does. It is built on :func:`distq.pq.fit`, so the codes are bit-packed unsigned integers of
``log2(n_cluster)`` bits and products go through small tables.

Deliberate differences from quantitizer (its known defects):

* codes are unsigned and bit-packed: quantitizer stores them as signed ``int8``, so any code above
  127 wraps to a negative index and decodes the wrong centroid when ``128 < n_cluster <= 256``
  (and ``n_cluster > 256`` cannot be stored at all); here any ``n_cluster = 2**bits``,
  ``bits`` in 1..16, round-trips, at exactly ``bits`` bits per code;
* :meth:`Quantitized.save` / :meth:`Quantitized.load` round-trip exactly at every ``n_cluster``
  (quantitizer's byte format assumes one byte per code and fails at 256 centroids); the file is
  written atomically (a temporary file in the same folder, then ``os.replace``) and is read
  without unpickling;
* ``D % sub_size != 0`` and too few rows raise a ``ValueError`` that names the argument;
* indexing and decoding return the input's dtype (quantitizer returns float16), and the
  result of the fit is a deterministic function of ``key`` (or ``seed``).

The seed's README table reports "accuracy" as the mean cosine between each original row and its
reconstruction and "memory" as the deep Python size of the whole model, vocabulary included;
:func:`compression_report` gives both that number and the plain stored bytes.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import sys
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import checkpoint
from ..core import bitpack
from ..core._checks import check_int
from ..core import pq as P

_FORMAT = "distq.Quantitized"
FILE_VERSION = 1
# quantitizer's kmeans2 ``minit`` names and distq's seeding names
_MINIT = {None: "greedy", "greedy": "greedy", "kmeans++": "kmeans++", "++": "kmeans++",
          "points": "random", "random": "random"}


# ----------------------------------------------------------------------------- file helpers
def atomic_savez(path: str | os.PathLike, arrays: dict[str, Any], metadata: dict) -> None:
    """Writes ``arrays`` + JSON ``metadata`` to an uncompressed ``.npz`` at exactly ``path``.

    The data go to a temporary file in the destination folder first, which is flushed, synced
    and then renamed over ``path``, so a crash never leaves a half-written file behind.
    bfloat16 arrays are stored as their uint16 bit patterns (NumPy's format has no bfloat16).
    """
    store, dtypes = {}, {}
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype == jnp.bfloat16:
            a, dtypes[name] = a.view(np.uint16), "bfloat16"
        store[name] = a
    meta = dict(metadata, _dtypes=dtypes)
    store["metadata"] = np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8)
    checkpoint.atomic_write(path, lambda f: np.savez(f, **store))


def read_npz(path: str | os.PathLike, fmt: str) -> tuple[dict[str, np.ndarray], dict]:
    """Reads a file written by :func:`atomic_savez` and checks its format tag (no pickles)."""
    try:
        with np.load(os.fspath(path), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {os.fspath(path)!r} as a {fmt} file: {e}") from None
    try:
        meta = json.loads(arrays.pop("metadata").tobytes().decode("utf-8"))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{os.fspath(path)!r} has no valid metadata: {e!r}") from None
    if meta.get("format") != fmt:
        raise ValueError(f"{os.fspath(path)!r} is not a {fmt} file (format={meta.get('format')!r})")
    if meta.get("version") != FILE_VERSION:
        raise ValueError(f"{os.fspath(path)!r}: unsupported {fmt} version {meta.get('version')!r}")
    for name, dt in meta.pop("_dtypes", {}).items():
        if dt == "bfloat16":
            arrays[name] = arrays[name].view(jnp.bfloat16)
    return arrays, meta


def pq_arrays(prefix: str, q: P.PQArray) -> dict[str, np.ndarray]:
    out = {f"{prefix}codes": np.asarray(q.codes), f"{prefix}codebooks": np.asarray(q.codebooks)}
    if q.rotation is not None:
        out[f"{prefix}rotation"] = np.asarray(q.rotation)
    return out


def pq_from_arrays(prefix: str, arrays: dict[str, np.ndarray], metadata: dict) -> P.PQArray:
    part = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    return P.PQArray.from_arrays(part, metadata)


# ------------------------------------------------------------------------------ the result
@jax.jit
def _take(arr: P.PQArray, rows: jax.Array) -> jax.Array:
    return arr[rows]


@jax.jit
def dequantize_pq(arr: P.PQArray) -> jax.Array:
    return arr.dequantize()


@jax.jit
def _repack(arr: P.PQArray, rows: jax.Array) -> jax.Array:
    return bitpack.pack(arr.row_codes(rows).reshape(-1).astype(jnp.uint32), arr.bits)


def take_rows(arr: P.PQArray, rows: Any) -> np.ndarray:
    """Decoded rows ``arr[rows]`` as NumPy, for in-range integer ``rows`` (any shape).

    Only those rows are decoded, in one jitted gather; the row count is padded up to a power of
    two so that varying counts reuse a few compilations.

    Examples:
      >>> import numpy as np
      >>> from distq.compat import quantitize, take_rows
      >>> x = np.random.default_rng(0).standard_normal((512, 32)).astype(np.float32)
      >>> q = quantitize(x, sub_size=4, n_cluster=16)
      >>> rows = take_rows(q.array, [[0, 5], [7, 0]])
      >>> rows.shape, rows.dtype, bool((rows[1, 1] == q[0]).all())
      ((2, 2, 32), dtype('float32'), True)
    """
    rows = np.asarray(rows, np.int64)
    flat = rows.reshape(-1)
    size = max(1, 1 << max(flat.size - 1, 0).bit_length())
    padded = np.zeros(size, np.int32)
    padded[: flat.size] = flat
    out = np.asarray(_take(arr, jnp.asarray(padded)))[: flat.size]
    # the input's dtype: float64 too (JAX without jax_enable_x64 decodes it as float32)
    out = out.astype(np.dtype(arr.dtype), copy=False)
    return out.reshape(rows.shape + (arr.shape[1],))


def _code_dtype(bits: int) -> np.dtype:
    return np.dtype(np.uint8 if bits <= 8 else np.uint16)


@dataclasses.dataclass(frozen=True, eq=False)
class Quantitized:
    """A product-quantised matrix returned by :func:`quantitize` (quantitizer's ``PQ``).

    Indexing and decoding return NumPy arrays in the input's dtype, like quantitizer; the
    underlying :class:`distq.pq.PQArray` (``.array``) gives JAX arrays and table products, and
    ``.quantizer`` encodes new rows with the same codebooks.

    Attributes:
      array: the codes and codebooks (:class:`distq.pq.PQArray`).
      quantizer: the fitted :class:`distq.pq.ProductQuantizer` (shares ``array``'s codebooks).

    Examples:
      >>> import numpy as np
      >>> from distq.compat import quantitize
      >>> x = np.random.default_rng(0).standard_normal((512, 32)).astype(np.float32)
      >>> q = quantitize(x, sub_size=4, n_cluster=16)
      >>> q.shape, q.dtype, q.nbytes        # 4 codes of 4 bits per row + 4 x 16 x 8 floats
      ((512, 32), dtype('float32'), 3072)
      >>> q[3].shape, q[[0, 2]].shape, np.asarray(q).shape
      ((32,), (2, 32), (512, 32))
    """

    array: P.PQArray
    quantizer: P.ProductQuantizer

    # numpy defers ``ndarray @ q`` and ``ndarray - q`` to the reflected methods below
    __array_ufunc__ = None

    # ------------------------------------------------------------------ array-like
    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nbytes(self) -> int:
        """Stored bytes: packed codes + codebooks (+ OPQ rotation)."""
        return self.array.nbytes

    @property
    def bits(self) -> int:
        return self.array.bits

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        """Decoded rows (only those rows are decoded): ``q[i]``, ``q[list]``, ``q[a:b]``,
        ``q[rows, cols]``; NumPy indexing rules for the rows (``IndexError`` when out of range).
        """
        rest = ()
        if isinstance(idx, tuple):
            idx, rest = idx[0], idx[1:]
        rows = np.arange(self.shape[0])[idx]
        out = take_rows(self.array, rows)
        return out[(Ellipsis,) + rest] if rest else out

    def decode(self, dtype: Any = None) -> np.ndarray:
        """The whole ``(N, D)`` decoded matrix (input dtype, or ``dtype``)."""
        out = np.asarray(dequantize_pq(self.array))
        return out.astype(self.dtype if dtype is None else dtype, copy=False)

    def unpack(self) -> np.ndarray:
        """quantitizer's name for :meth:`decode`."""
        return self.decode()

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.decode(), dtype=dtype)

    # ------------------------------------------------------------------ quantitizer's fields
    @property
    def vectors(self) -> int:
        """Number of rows (quantitizer's name)."""
        return self.shape[0]

    @property
    def dim(self) -> int:
        """Row length ``D``."""
        return self.shape[1]

    @property
    def qdim(self) -> int:
        """Number of sub-spaces (quantitizer's name; ``sub_size`` of :func:`quantitize`)."""
        return self.array.m

    @property
    def centroids(self) -> int:
        """Centroids per sub-space, ``2**bits``."""
        return 1 << self.array.bits

    @property
    def indexes(self) -> np.ndarray:
        """All codes as an ``(N, qdim)`` unsigned array (uint8 up to 8 bits, else uint16)."""
        return np.asarray(self.array.codes_unpacked()).astype(_code_dtype(self.bits))

    @property
    def codes(self) -> np.ndarray:
        """The ``(qdim, centroids, D / qdim)`` codebooks (quantitizer calls them ``codes``).

        With ``opq=True`` they live in the rotated space: decode with :meth:`decode` instead.
        """
        return np.asarray(self.array.codebooks)

    def sampled(self, ids: Any) -> "Quantitized":
        """A :class:`Quantitized` holding only rows ``ids`` (codes copied, nothing decoded)."""
        rows = np.arange(self.shape[0])[ids]
        rows = np.atleast_1d(rows)
        if rows.size == 0:
            raise ValueError("ids selects no rows")
        words = _repack(self.array, jnp.asarray(rows, jnp.int32))
        arr = dataclasses.replace(self.array, codes=words, value_shape=(int(rows.size), self.dim))
        return Quantitized(arr, self.quantizer)

    def encode(self, x: Any) -> "Quantitized":
        """Encodes new rows ``(n, D)`` with the same codebooks."""
        x = _as_float_matrix(x, "x")
        return Quantitized(self.quantizer.encode(x), self.quantizer)

    # ------------------------------------------------------------------ arithmetic
    def __matmul__(self, v: Any) -> np.ndarray:
        """``X @ v`` through per-sub-space tables (the matrix is never decoded)."""
        return np.asarray(self.array @ jnp.asarray(v))

    def __rmatmul__(self, v: Any) -> np.ndarray:
        return np.asarray(jnp.asarray(v) @ self.array)

    def __add__(self, other):
        return self.decode() + other

    __radd__ = __add__

    def __sub__(self, other):
        return self.decode() - other

    def __rsub__(self, other):
        return other - self.decode()

    def __mul__(self, other):
        return self.decode() * other

    __rmul__ = __mul__

    def __truediv__(self, other):
        return self.decode() / other

    def __rtruediv__(self, other):
        return other / self.decode()

    def __pow__(self, other):
        return self.decode() ** other

    def sqrt(self) -> np.ndarray:
        return np.sqrt(self.decode())

    def __repr__(self) -> str:
        rot = ", opq" if self.array.rotation is not None else ""
        return (f"Quantitized(shape={self.shape}, dtype={self.dtype}, sub_size={self.qdim}, "
                f"n_cluster={self.centroids}{rot}, nbytes={self.nbytes})")

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Saves to an ``.npz`` file at exactly ``path`` (atomic; read back by :meth:`load`).

        Everything is stored bit-exactly: the packed code words, codebooks, rotation and the
        quantiser's training statistics.

        Examples:
          >>> import os, tempfile, numpy as np
          >>> from distq.compat import Quantitized, quantitize
          >>> x = np.random.default_rng(0).standard_normal((512, 32)).astype(np.float32)
          >>> q = quantitize(x, sub_size=4, n_cluster=16)
          >>> folder = tempfile.TemporaryDirectory()
          >>> f = os.path.join(folder.name, "vectors.npz")
          >>> q.save(f)
          >>> r = Quantitized.load(f)
          >>> bool((np.asarray(r) == np.asarray(q)).all())
          True
          >>> folder.cleanup()
        """
        arrays = pq_arrays("", self.array)
        arrays["inertia"] = np.asarray(self.quantizer.inertia)
        arrays["iters"] = np.asarray(self.quantizer.iters)
        meta = {"format": _FORMAT, "version": FILE_VERSION, "array": self.array.metadata(),
                "block": self.quantizer.block}
        atomic_savez(path, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Quantitized":
        """Reads a file written by :meth:`save` (validated; raises ``ValueError`` if corrupt)."""
        arrays, meta = read_npz(path, _FORMAT)
        try:
            inertia, iters = arrays.pop("inertia"), arrays.pop("iters")
            arr = pq_from_arrays("", arrays, meta["array"])
            quant = P.ProductQuantizer(
                codebooks=arr.codebooks, rotation=arr.rotation, inertia=jnp.asarray(inertia),
                iters=jnp.asarray(iters), dim=arr.shape[1], bits=arr.bits,
                block=int(meta["block"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{os.fspath(path)!r} is missing data: {e!r}") from None
        return cls(arr, quant)


# --------------------------------------------------------------------------- quantitize
def _as_float_matrix(matrix: Any, name: str) -> jax.Array | np.ndarray:
    if hasattr(matrix, "detach") and hasattr(matrix, "numpy"):  # torch tensor
        matrix = matrix.detach().cpu().numpy()
    if not hasattr(matrix, "dtype"):
        matrix = np.asarray(matrix)
    dt = np.dtype(matrix.dtype)
    if np.issubdtype(dt, np.integer) or dt == np.bool_:
        matrix = np.asarray(matrix, np.float32)  # quantitizer accepts integer matrices
    elif not (np.issubdtype(dt, np.floating) or dt == jnp.bfloat16):
        raise TypeError(f"{name} must be a real numeric matrix, got dtype {dt}")
    if len(matrix.shape) != 2:
        raise ValueError(f"{name} must be a matrix (N, D), got shape {tuple(matrix.shape)}")
    return matrix


def quantitize(matrix: Any, sub_size: int = 8, n_cluster: int = 256, n_iter: int = 20,
               minit: str | None = None, seed: int = 123, *, bits: int | None = None,
               key: jax.Array | None = None, opq: bool = False,
               codebook_dtype: str = "float32", **pq_options) -> Quantitized:
    """Product-quantises ``matrix`` (quantitizer's ``quantitize``, fixed and bit-packed).

    Args:
      matrix: ``(N, D)`` real matrix (integer input is converted to float32).
      sub_size: number of sub-spaces each row is cut into (quantitizer's meaning: *how many*
        parts, not their width); must divide ``D``.
      n_cluster: centroids per sub-space; a power of two from 2 to 65536.
      n_iter: Lloyd iteration budget per k-means (early stopping may use fewer).
      minit: seeding; ``None`` (distq's greedy k-means++), "kmeans++"/"++", or
        "points"/"random" (random rows, like quantitizer's default).
      seed: builds the key when ``key`` is not given.
      bits: alternative to ``n_cluster`` (``n_cluster = 2**bits``); takes precedence over the
        default ``n_cluster`` and must agree with an explicit non-default one.
      key: a ``jax.random`` key; the result is a deterministic function of it.
      opq: learn an orthogonal rotation first (optimised PQ).
      codebook_dtype: "float32", "float16" (what quantitizer stores) or "bfloat16".
      **pq_options: further :class:`distq.pq.PQ` fields (``sample``, ``restarts``, ...).

    Returns:
      A :class:`Quantitized`.

    Raises:
      TypeError: non-numeric ``matrix`` or non-int arguments.
      ValueError: ``D % sub_size != 0``, ``n_cluster`` not a power of two, fewer than
        ``n_cluster`` rows, NaN/inf values.

    Examples:
      >>> import numpy as np
      >>> from distq.compat import quantitize
      >>> x = np.random.default_rng(0).standard_normal((512, 32)).astype(np.float32)
      >>> q = quantitize(x, sub_size=4, n_cluster=16)    # 4 parts of 8 values, 16 centroids each
      >>> q.indexes.shape, q.indexes.dtype               # unsigned codes (uint8 up to 256 centroids)
      ((512, 4), dtype('uint8'))
      >>> q.nbytes == 512 * 4 // 2 + 4 * 16 * 8 * 4      # 4-bit codes, packed + float32 codebooks
      True
      >>> quantitize(x, sub_size=7)
      Traceback (most recent call last):
      ...
      ValueError: sub_size=7 sub-spaces must divide the row length D=32
    """
    matrix = _as_float_matrix(matrix, "matrix")
    n, dim = (int(s) for s in matrix.shape)
    sub_size = check_int(sub_size, "sub_size", 1)
    if dim % sub_size:
        raise ValueError(f"sub_size={sub_size} sub-spaces must divide the row length D={dim}")
    n_cluster = check_int(n_cluster, "n_cluster", 2, 1 << 16)
    if n_cluster & (n_cluster - 1):
        lo = 1 << (n_cluster.bit_length() - 1)
        raise ValueError(f"n_cluster must be a power of two (codes are bit-packed), got "
                         f"{n_cluster}; use {lo} or {lo * 2}")
    if bits is None:
        bits = n_cluster.bit_length() - 1
    else:
        bits = check_int(bits, "bits", 1, 16)
        if n_cluster != 256 and n_cluster != 1 << bits:
            raise ValueError(f"bits={bits} and n_cluster={n_cluster} disagree "
                             f"(n_cluster must be 2**bits)")
    if n < 1 << bits:
        raise ValueError(f"n_cluster={1 << bits} centroids need at least that many rows, "
                         f"got {n}; use a smaller n_cluster")
    n_iter = check_int(n_iter, "n_iter", 0)
    if minit not in _MINIT:
        raise ValueError(f"minit={minit!r} is not allowed; choose one of "
                         f"{sorted(k for k in _MINIT if k)} or None")
    if key is None:
        key = jax.random.key(check_int(seed, "seed", 0))
    spec = P.PQ(m=sub_size, bits=bits, opq=opq, iters=n_iter, init=_MINIT[minit],
                codebook_dtype=codebook_dtype, **pq_options)
    quant = P.fit(key, matrix, spec)
    return Quantitized(quant.encode(matrix), quant)


# ------------------------------------------------------------------------- memory report
_SKIP = (type, types.ModuleType, types.FunctionType)


def deep_sizeof(obj: Any) -> int:
    """Deep Python size of ``obj`` in bytes: the way quantitizer's README counts "memory".

    Walks every object reachable from ``obj`` (``gc.get_referents``), counting each once:
    NumPy and JAX arrays by their buffer (``nbytes``), everything else by ``sys.getsizeof``
    (so a vocabulary's dict, list and strings all count). Types, modules and functions are
    skipped.

    Examples:
      >>> from distq.compat import deep_sizeof
      >>> deep_sizeof(["a", "b"]) > 2 * sys.getsizeof("a")
      True
    """
    if isinstance(obj, _SKIP):
        raise TypeError(f"deep_sizeof does not measure {type(obj).__name__} objects")
    seen: set[int] = set()
    total = 0
    todo = [obj]
    while todo:
        nxt = []
        for o in todo:
            if isinstance(o, _SKIP) or id(o) in seen:
                continue
            seen.add(id(o))
            if isinstance(o, (np.ndarray, jax.Array)):
                total += int(o.nbytes)
                continue  # a view's base would be counted twice
            total += sys.getsizeof(o)
            nxt.append(o)
        todo = gc.get_referents(*nxt) if nxt else []
    return total


@dataclasses.dataclass(frozen=True)
class CompressionReport:
    """Sizes and quality of a compressed matrix, plainly and the way quantitizer counts them.

    Attributes:
      rows, dim: shape of the matrix.
      original_nbytes: bytes of the original array.
      nbytes: stored bytes of the compressed matrix (codes + codebooks + rotation).
      ratio: ``original_nbytes / nbytes``.
      vocab_nbytes: deep Python size of the vocabulary (0 without one).
      seed_style_nbytes: ``nbytes + vocab_nbytes``: quantitizer's "memory" column.
      seed_style_original_nbytes: ``original_nbytes + vocab_nbytes``.
      mean_cosine: mean over rows of ``cos(x_i, xhat_i)``: quantitizer's "accuracy" column
        (a zero row counts as 0).
      rel_mse: ``sum |x - xhat|^2 / sum |x - mean(x)|^2``.
    """

    rows: int
    dim: int
    original_nbytes: int
    nbytes: int
    ratio: float
    vocab_nbytes: int
    seed_style_nbytes: int
    seed_style_original_nbytes: int
    mean_cosine: float
    rel_mse: float


def compression_report(original: Any, compressed: Any, vocab: Any = None, *,
                       block: int = 65536) -> CompressionReport:
    """Measures a compressed matrix against the original, both plainly and seed-style.

    Rows are decoded ``block`` at a time (a 2M-row matrix is never decoded whole).

    Args:
      original: ``(N, D)`` float matrix.
      compressed: a :class:`Quantitized`, a :class:`distq.pq.PQArray`, or anything with
        ``nbytes`` and row slicing returning decoded rows.
      vocab: optional vocabulary (e.g. ``kv.key_to_index`` and ``kv.index_to_key``) whose deep
        Python size joins the seed-style memory.
      block: rows decoded at a time.

    Returns:
      A :class:`CompressionReport`.

    Examples:
      >>> import numpy as np
      >>> from distq.compat import quantitize, compression_report
      >>> x = np.random.default_rng(0).standard_normal((512, 32)).astype(np.float32)
      >>> q = quantitize(x, sub_size=4, n_cluster=16)
      >>> r = compression_report(x, q, vocab=[f"w{i}" for i in range(512)])
      >>> round(r.ratio, 1), r.seed_style_nbytes > r.nbytes, 0.6 < r.mean_cosine < 1
      (21.3, True, True)
    """
    x = np.asarray(original)
    if x.ndim != 2:
        raise ValueError(f"original must be a matrix (N, D), got shape {x.shape}")
    if tuple(compressed.shape) != x.shape:
        raise ValueError(f"compressed has shape {tuple(compressed.shape)}, original {x.shape}")
    block = check_int(block, "block", 1)
    n, dim = x.shape
    cos_sum = err = 0.0
    mean = x.mean(0, dtype=np.float64)
    tot = float(((x - mean) ** 2).sum(dtype=np.float64)) if n <= block else 0.0
    arr = compressed.array if isinstance(compressed, Quantitized) else compressed
    for start in range(0, n, block):
        xb = x[start:start + block].astype(np.float32)
        if isinstance(arr, P.PQArray):  # fixed-size jitted gathers (the last block padded)
            xh = take_rows(arr, np.arange(start, start + xb.shape[0]))
        else:
            xh = np.asarray(compressed[start:start + block], np.float32)
        xh = xh.astype(np.float32)
        num = (xb * xh).sum(1, dtype=np.float64)
        den = np.linalg.norm(xb, axis=1) * np.linalg.norm(xh, axis=1)
        cos_sum += float(np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0).sum())
        err += float(((xb - xh) ** 2).sum(dtype=np.float64))
        if n > block:
            tot += float(((xb - mean) ** 2).sum(dtype=np.float64))
    vocab_nbytes = 0 if vocab is None else deep_sizeof(vocab)
    nb = int(compressed.nbytes)
    return CompressionReport(
        rows=n, dim=dim, original_nbytes=int(x.nbytes), nbytes=nb,
        ratio=float(x.nbytes) / nb, vocab_nbytes=vocab_nbytes,
        seed_style_nbytes=nb + vocab_nbytes,
        seed_style_original_nbytes=int(x.nbytes) + vocab_nbytes,
        mean_cosine=cos_sum / n, rel_mse=err / tot if tot > 0 else math.nan,
    )


__all__ = ["quantitize", "Quantitized", "compression_report", "CompressionReport", "deep_sizeof"]
