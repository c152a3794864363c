"""Flax nnx layers with product-quantised weights (reverse PQ), and quantisation-aware training.

**Reverse product quantisation** (RPQ). A weight matrix is stored as ``m`` small codebooks of
``K = 2**bits`` sub-vectors each, plus one integer code per (vector, sub-space); the forward
pass reads the weight through the codes. The codebooks are trainable :class:`flax.nnx.Param`;
the codes are a non-trainable :class:`PQCodes` variable, kept bit-packed (``bits`` bits each,
:func:`distq.bitpack.pack`), so the module's state *is* its true size. The codes are either
random and fixed (training from scratch, as in RPQ) or fitted to a trained weight with
:func:`distq.pq.fit` (``from_pretrained``), after which the codebooks can be fine-tuned.

Which vectors are quantised. One vector per *output* unit, cut along the *input* axis:

* :class:`PQDense`, kernel ``W`` of shape ``(in, out)``: the vectors are the columns of ``W``
  (rows of ``W.T``), each of length ``in`` cut into ``m`` sub-vectors of ``in / m``; codes
  ``c[o, s]``. Then ``y[:, o] = sum_s x_s . C_s[c[o, s]] = sum_s T_s[:, c[o, s]]`` with
  ``T_s = x_s C_s^T`` of shape ``(batch, K)``: the product never needs ``W`` (the *table*
  forward: ``batch * in * K`` multiply-adds and ``batch * out * m`` gathered adds, against
  ``in * out`` gathers and ``batch * in * out`` multiply-adds to rebuild ``W`` and multiply).
  ``forward="auto"`` takes the cheaper by :func:`table_is_cheaper` (small batches: tables).
* :class:`PQEmbed`, table ``E`` of shape ``(vocab, features)``: the vectors are the rows; a lookup
  reads the codes of the looked-up rows only (straight from the packed words) and decodes them;
  :meth:`PQEmbed.attend` (``q @ E.T``) uses the tables.
* :class:`PQConv`, kernel ``(*kernel_size, in / groups, out)``: the vectors are the
  ``prod(kernel_size) * in / groups`` weights of each output channel (C order); the forward
  rebuilds the kernel (cheap next to the convolution) and calls ``lax.conv_general_dilated``.

The layout of the codes and codebooks is exactly that of a :class:`distq.pq.PQArray` of the
``(out, in)`` matrix of vectors, so :meth:`PQDense.as_pqarray` is free, and OPQ rotations
(``PQ(opq=True)``) are supported (kept frozen).

**QAT.** :class:`QATDense` and :class:`QATConv` hold a float kernel and a scalar spec
(:class:`distq.Scalar`, :class:`distq.Uniform`, :class:`distq.NF4` or :class:`distq.Cast`) and run
on ``distq.fake_quantize(kernel, spec)``: the forward is exactly the quantised layer's, the
gradient is straight-through. :func:`qat` wraps every ``nnx.Linear``/``nnx.Conv`` of a model,
:func:`pq_layers` converts them (and ``nnx.Embed``) to PQ layers.

References:
  H. Jegou, M. Douze, C. Schmid, "Product quantization for nearest neighbor search", IEEE TPAMI
  33(1), 2011 (sub-space codebooks, Sec. III; inner products through per-sub-space tables, as in
  the asymmetric distance of Sec. IV-A).
  RPQ-pytorch (reverse product quantisation of weights: random fixed codes, trained codebooks).
  Y. Bengio, N. Leonard, A. Courville, "Estimating or propagating gradients through stochastic
  neurons for conditional computation", arXiv:1308.3432, 2013 (the straight-through estimator).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from .core import _checks, bitpack
from .core import pq as _pq
from . import planning as _plan
from . import ste as _ste
from .core import spec as _spec
from .integrations import flax as _flax  # noqa: F401 (flax.serialization knows our leaves)
from .core.qarray import QArray

Array = jax.Array
Initializer = Callable[..., Array]

_FORWARDS = ("auto", "table", "rebuild")
_PADDING_MODES = ("SAME", "VALID", "CIRCULAR", "REFLECT", "CAUSAL")
_default_kernel_init = nnx.initializers.lecun_normal()
_zeros = nnx.initializers.zeros_init()


class PQCodes(nnx.Variable):
    """The bit-packed ``uint32`` code words of a PQ layer: state, but never trained.

    ``nnx.grad`` (which differentiates :class:`flax.nnx.Param` by default) and
    ``nnx.Optimizer(..., wrt=nnx.Param)`` leave it alone; :func:`model_size` counts it.
    """


class PQRotation(nnx.Variable):
    """The frozen ``(D, D)`` orthogonal OPQ rotation of a PQ layer (not trained)."""


# ----------------------------------------------------------------------------- validation
def _check_int(v: Any, name: str, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {v!r}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return int(v)


def _check_split(dim: int, m: Any, dim_name: str) -> int:
    m = _check_int(m, "m")
    if dim % m:
        raise ValueError(f"{dim_name}={dim} must be divisible by m={m} (the number of sub-spaces)")
    return m


def _check_forward(forward: str) -> str:
    if forward not in _FORWARDS:
        raise ValueError(f"forward must be one of {_FORWARDS}, got {forward!r}")
    return forward


def _check_pq_spec(spec: Any) -> _pq.PQ:
    if not isinstance(spec, _pq.PQ):
        raise TypeError(f"spec must be a distq.PQ, got {type(spec).__name__}")
    return spec


def _check_scalar_spec(spec: Any):
    _spec.check_spec(spec)
    if spec is None:
        raise TypeError("spec must be a distq spec (distq.Scalar, Uniform, NF4, Cast), got None")
    if getattr(spec, "randomized", False):
        raise ValueError(f"spec: QAT layers take a deterministic spec (distq.Scalar, Uniform, "
                         f"NF4, Cast), not {type(spec).__name__}; for product quantisation use "
                         "PQDense/PQConv (trainable codebooks)")
    return spec


def _as_weight(w: Any, name: str, ndim: int) -> Array:
    w = _checks.as_float_array(w, name)
    if w.ndim != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {tuple(w.shape)}")
    return w


def _as_bias(bias: Any, n: int) -> Array | None:
    if bias is None:
        return None
    b = _checks.as_float_array(bias, "bias")
    if b.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(b.shape)}")
    return b


def _value(v: Any) -> Any:
    """The array of an nnx variable (or ``None``)."""
    return None if v is None else v[...]


# ----------------------------------------------------------------------------- code kernels
def _codes_unpacked(words: Array, bits: int, n: int, m: int) -> Array:
    """All ``(n, m)`` codes, int32."""
    return bitpack.unpack(words, bits, n * m, dtype=jnp.int32).reshape(n, m)


def _table_matmul(x: Array, codebooks: Array, codes: Array, precision) -> Array:
    """``x @ V.T`` for the ``(n, D)`` matrix ``V`` of PQ vectors, without building ``V``.

    ``T_s = x_s C_s^T`` (one ``(batch, K)`` table per sub-space), then
    ``y[:, i] = sum_s T_s[:, c[i, s]]``.
    """
    b = x.shape[0]
    m, _, ds = codebooks.shape
    t = jnp.einsum("bsd,skd->sbk", x.reshape(b, m, ds), codebooks, precision=precision)
    if m <= 16:
        y = jnp.take(t[0], codes[:, 0], axis=1)
        for s in range(1, m):
            y = y + jnp.take(t[s], codes[:, s], axis=1)
        return y

    def step(acc, ts_cs):
        ts, cs = ts_cs
        return acc + jnp.take(ts, cs, axis=1), None

    y0 = jnp.zeros((b, codes.shape[0]), t.dtype)
    return lax.scan(step, y0, (t, codes.T))[0]


def table_is_cheaper(batch: int, d_in: int, d_out: int, m: int, bits: int, *,
                     rotation: bool = False, gather_cost: float = 32.0) -> bool:
    """Whether the table forward of a PQ matrix product is expected to be faster.

    Counts multiply-adds, with every gathered element weighted by ``gather_cost`` (gathers are
    memory-bound; 32 fits XLA:CPU measurements). Table: ``batch * d_in * K`` for the tables plus
    ``gather_cost * batch * d_out * m`` for the gather-sum; rebuild: ``gather_cost * d_out * d_in``
    to decode the matrix plus ``batch * d_in * d_out`` for the product. An OPQ rotation adds
    ``batch * d_in**2`` (rotate the input) or ``d_out * d_in**2`` (rotate the decoded rows).

    Args:
      batch: rows of the input (all leading dimensions flattened).
      d_in: input features (length of each quantised vector).
      d_out: output features (number of quantised vectors).
      m: sub-spaces; ``bits``: bits per code (``K = 2**bits``).
      rotation: whether the vectors carry an OPQ rotation.
      gather_cost: cost of one gathered element, in multiply-adds.

    Returns:
      ``True`` when the table forward is cheaper.

    Examples:
      >>> table_is_cheaper(batch=64, d_in=1024, d_out=1024, m=16, bits=8)
      True
      >>> table_is_cheaper(batch=4096, d_in=512, d_out=512, m=16, bits=8)
      False
    """
    k = 1 << bits
    table = batch * d_in * k + gather_cost * batch * d_out * m
    rebuild = gather_cost * d_out * d_in + batch * d_in * d_out
    if rotation:
        table, rebuild = table + batch * d_in * d_in, rebuild + d_out * d_in * d_in
    return table < rebuild


def _pq_product(x2: Array, codebooks: Array, codes: Array, rotation: Array | None,
                bits: int, forward: str, precision) -> Array:
    """``x2 @ V.T`` (``x2``: ``(batch, D)``) by tables or by rebuilding ``V``."""
    n, m = codes.shape
    batch, d = x2.shape
    if forward == "auto":
        cheaper = table_is_cheaper(batch, d, n, m, bits, rotation=rotation is not None)
        forward = "table" if cheaper else "rebuild"
    if forward == "table":
        if rotation is not None:
            x2 = jnp.matmul(x2, rotation.astype(x2.dtype), precision=precision)
        return _table_matmul(x2, codebooks, codes, precision)
    v = _pq.decode_codes(codes, codebooks, rotation, codebooks.dtype)
    return lax.dot_general(x2, v, (((1,), (1,)), ((), ())), precision=precision)


def _compute_dtype(dtype: Any, *arrays: Array | None):
    if dtype is not None:
        return jnp.dtype(dtype)
    return jnp.result_type(*[a.dtype for a in arrays if a is not None])


def _random_codes(key: Array, n: int, m: int, bits: int) -> Array:
    codes = jax.random.randint(key, (n * m,), 0, 1 << bits, dtype=jnp.int32)
    return bitpack.pack(codes.astype(jnp.uint32), bits)


def _fit_vectors(vectors: Array, spec: _pq.PQ, key: Array, what: str):
    """Fits ``spec`` to the ``(n, D)`` vectors; returns (codebooks, packed codes, rotation)."""
    n = vectors.shape[0]
    if n < spec.num_centroids:
        raise ValueError(
            f"spec.bits={spec.bits} needs at least 2**bits={spec.num_centroids} vectors to fit, "
            f"but {what}={n}; use fewer bits (or a random-code layer)"
        )
    fitted = _pq.fit(key, vectors, spec)
    q = fitted.encode(vectors)
    return q.codebooks, q.codes, q.rotation


def _resolve_key(key: Array | None, rngs: nnx.Rngs | None, what: str) -> Array:
    if key is not None:
        return key
    if rngs is not None:
        return rngs.params()
    raise TypeError(f"{what} needs a jax.random key (key=...) or rngs=nnx.Rngs(...)")


class _PQBase(nnx.Module):
    """Shared state of the PQ layers: ``codebooks`` (Param), ``codes`` (PQCodes), ``rotation``."""

    def _set_pq(self, num_vectors: int, vector_size: int, m: int, bits: int,
                arrays: tuple | None, rngs: nnx.Rngs | None, param_dtype: Any,
                codebook_init: Initializer | None, what: str) -> None:
        m = _check_split(vector_size, m, what)
        bits = _checks.check_bits(bits)
        self.num_vectors, self.vector_size, self.m, self.bits = num_vectors, vector_size, m, bits
        k, ds = 1 << bits, vector_size // m
        if arrays is not None:
            codebooks, words, rotation = arrays
            if tuple(codebooks.shape) != (m, k, ds):
                raise ValueError(f"codebooks must have shape {(m, k, ds)}, got {codebooks.shape}")
            nw = bitpack.packed_nwords(num_vectors * m, bits)
            if words.dtype != jnp.uint32 or tuple(words.shape) != (nw,):
                raise ValueError(f"codes must be {nw} packed uint32 words, got {words.dtype} "
                                 f"{tuple(words.shape)}")
        else:
            if rngs is None:
                raise TypeError("rngs=nnx.Rngs(...) is required for random initialisation")
            init = codebook_init or nnx.initializers.normal(stddev=1.0 / math.sqrt(vector_size))
            codebooks = init(rngs.params(), (m, k, ds), param_dtype)
            words = _random_codes(rngs.params(), num_vectors, m, bits)
            rotation = None
        self.codebooks = nnx.Param(codebooks)
        self.codes = PQCodes(words)
        self.rotation = nnx.data(None) if rotation is None else PQRotation(rotation)

    @property
    def num_centroids(self) -> int:
        """``K = 2**bits`` centroids per sub-space."""
        return 1 << self.bits

    @property
    def nbytes(self) -> int:
        """True bytes of the layer: packed codes + codebooks (+ rotation) + bias."""
        return model_size(self)

    def codes_unpacked(self) -> Array:
        """All codes as an ``(num_vectors, m)`` int32 array."""
        return _codes_unpacked(self.codes[...], self.bits, self.num_vectors, self.m)

    def vectors(self) -> Array:
        """The decoded ``(num_vectors, vector_size)`` matrix of quantised vectors."""
        cb = self.codebooks[...]
        return _pq.decode_codes(self.codes_unpacked(), cb, _value(self.rotation), cb.dtype)

    def as_pqarray(self) -> _pq.PQArray:
        """The vectors as a :class:`distq.pq.PQArray` (same arrays, nothing is copied)."""
        cb = self.codebooks[...]
        return _pq.PQArray(codes=self.codes[...], codebooks=cb, rotation=_value(self.rotation),
                           shape=(self.num_vectors, self.vector_size), dtype=str(cb.dtype),
                           m=self.m, bits=self.bits)


# ----------------------------------------------------------------------------------- Dense
class PQDense(_PQBase):
    """A dense layer whose kernel is product-quantised (trainable codebooks, fixed codes).

    ``y = x @ W + b`` with ``W[:, o]`` (length ``in_features``) cut into ``m`` sub-vectors and
    replaced by ``concat_s C_s[c[o, s]]``. State: ``codebooks`` ``(m, 2**bits, in / m)``
    (:class:`flax.nnx.Param`), ``codes`` (:class:`PQCodes`, ``out * m`` codes bit-packed into
    uint32), ``bias`` ``(out,)`` (Param) and, after an OPQ fit, ``rotation`` (:class:`PQRotation`).

    Args:
      in_features: input features; must be divisible by ``m``.
      out_features: output features (one code vector each).
      m: sub-spaces per kernel column.
      bits: bits per code, 1..16 (``2**bits`` centroids per sub-space).
      use_bias: add a trainable bias.
      forward: "table" (never builds ``W``), "rebuild" (decodes ``W``, then a matmul) or "auto"
        (the cheaper by :func:`table_is_cheaper`, decided at trace time from the batch size).
      dtype: computation dtype (``None``: promote the input and parameter dtypes).
      param_dtype: dtype of the random codebooks and bias.
      precision: ``lax`` precision of the products.
      codebook_init: initialiser ``(key, shape, dtype)`` of the codebooks; default
        ``normal(1 / sqrt(in_features))`` (the variance of a lecun-normal kernel).
      bias_init: initialiser of the bias.
      rngs: random streams; ``rngs.params()`` draws the codebooks and the random codes.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from distq import nn
      >>> layer = nn.PQDense(16, 64, m=4, bits=4, rngs=nnx.Rngs(0))
      >>> layer.codebooks.shape, layer.codes.shape  # 64 * 4 codes of 4 bits = 32 words
      ((4, 16, 4), (32,))
      >>> layer(jnp.ones((2, 5, 16))).shape
      (2, 5, 64)
      >>> layer.nbytes == 32 * 4 + 4 * 16 * 4 * 4 + 64 * 4
      True
    """

    def __init__(self, in_features: int, out_features: int, *, m: int, bits: int = 8,
                 use_bias: bool = True, forward: str = "auto", dtype: Any = None,
                 param_dtype: Any = jnp.float32, precision: Any = None,
                 codebook_init: Initializer | None = None, bias_init: Initializer = _zeros,
                 rngs: nnx.Rngs | None = None, _arrays: tuple | None = None):
        in_features = _check_int(in_features, "in_features")
        out_features = _check_int(out_features, "out_features")
        self.in_features, self.out_features = in_features, out_features
        self.use_bias = bool(use_bias)
        self.forward = _check_forward(forward)
        self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
        self._set_pq(out_features, in_features, m, bits, None if _arrays is None else _arrays[:3],
                     rngs, param_dtype, codebook_init, "in_features")
        if not self.use_bias:
            self.bias = nnx.data(None)
        elif _arrays is not None:
            self.bias = nnx.Param(_arrays[3])
        else:
            self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))

    @classmethod
    def from_pretrained(cls, kernel: Any, bias: Any = None, *, spec: _pq.PQ,
                        key: Array | None = None, rngs: nnx.Rngs | None = None,
                        **options) -> "PQDense":
        """A PQDense whose codebooks and codes are fitted to a trained ``(in, out)`` kernel.

        Runs :func:`distq.pq.fit` on the ``out`` columns of ``kernel`` (the rows of
        ``kernel.T``) and encodes them; the layer's kernel is then exactly
        ``fit(key, kernel.T, spec).encode(kernel.T).dequantize().T``.

        Args:
          kernel: ``(in_features, out_features)`` float array; ``out_features >= 2**spec.bits``.
          bias: ``(out_features,)`` or ``None`` (no bias).
          spec: a :class:`distq.PQ` (``m`` must divide ``in_features``; ``opq=True`` adds a
            frozen rotation).
          key: ``jax.random`` key of the fit (or ``rngs``: ``rngs.params()`` is used).
          **options: ``forward``, ``dtype``, ``precision`` as in the constructor.

        Examples:
          >>> import jax, distq
          >>> w = jax.random.normal(jax.random.key(0), (16, 64))
          >>> layer = PQDense.from_pretrained(w, spec=distq.PQ(m=4, bits=4), key=jax.random.key(1))
          >>> layer.kernel().shape, layer.bias is None
          ((16, 64), True)
        """
        spec = _check_pq_spec(spec)
        kernel = _as_weight(kernel, "kernel", 2)
        d_in, d_out = kernel.shape
        _check_split(d_in, spec.m, "in_features")
        b = _as_bias(bias, d_out)
        key = _resolve_key(key, rngs, "PQDense.from_pretrained")
        cb, words, rot = _fit_vectors(kernel.T, spec, key, "out_features")
        return cls(d_in, d_out, m=spec.m, bits=spec.bits, use_bias=b is not None,
                   _arrays=(cb, words, rot, b), **options)

    @classmethod
    def from_linear(cls, linear: nnx.Linear, spec: _pq.PQ, *, key: Array | None = None,
                    rngs: nnx.Rngs | None = None, **options) -> "PQDense":
        """:meth:`from_pretrained` on an ``nnx.Linear`` (keeps its dtype and precision)."""
        if not isinstance(linear, nnx.Linear):
            raise TypeError(f"linear must be an nnx.Linear, got {type(linear).__name__}")
        options = {"dtype": linear.dtype, "precision": linear.precision, **options}
        return cls.from_pretrained(linear.kernel[...], _value(linear.bias), spec=spec, key=key,
                                   rngs=rngs, **options)

    def kernel(self) -> Array:
        """The decoded ``(in_features, out_features)`` kernel."""
        return self.vectors().T

    def __call__(self, x: Array, *, forward: str | None = None) -> Array:
        """``x @ kernel + bias`` over the last axis of ``x`` (any leading dimensions).

        Args:
          x: ``(..., in_features)`` array.
          forward: overrides the layer's ``forward`` ("auto", "table", "rebuild").
        """
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., {self.in_features}), got {x.shape}")
        forward = self.forward if forward is None else _check_forward(forward)
        cb, bias = self.codebooks[...], _value(self.bias)
        dt = _compute_dtype(self.dtype, x, cb, bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).astype(dt)
        rot = _value(self.rotation)
        y = _pq_product(x2, cb.astype(dt), self.codes_unpacked(),
                        None if rot is None else rot.astype(dt), self.bits, forward,
                        self.precision)
        if bias is not None:
            y = y + bias.astype(dt)
        return y.reshape(lead + (self.out_features,))


# ----------------------------------------------------------------------------------- Embed
class PQEmbed(_PQBase):
    """An embedding table with product-quantised rows (trainable codebooks, fixed codes).

    Row ``v`` of the ``(num_embeddings, features)`` table is ``concat_s C_s[c[v, s]]``. A lookup
    reads only the codes of the looked-up rows (from the packed words) and decodes them, so the
    table is never built; gradients reach only the centroids that were used.

    Args:
      num_embeddings: vocabulary size.
      features: embedding size; must be divisible by ``m``.
      m: sub-spaces per row; ``bits``: bits per code, 1..16.
      dtype: output dtype (``None``: the codebooks' dtype).
      param_dtype: dtype of the random codebooks.
      codebook_init: initialiser of the codebooks; default ``normal(1 / sqrt(features))``
        (the variance of ``nnx.Embed``'s default).
      rngs: random streams (codebooks and codes).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from distq import nn
      >>> emb = nn.PQEmbed(64, 16, m=4, bits=4, rngs=nnx.Rngs(0))
      >>> emb(jnp.array([[1, 2, 3]])).shape
      (1, 3, 16)
      >>> bool(jnp.all(emb(jnp.array([7])) == emb.embedding()[7]))
      True
    """

    def __init__(self, num_embeddings: int, features: int, *, m: int, bits: int = 8,
                 dtype: Any = None, param_dtype: Any = jnp.float32, precision: Any = None,
                 codebook_init: Initializer | None = None, rngs: nnx.Rngs | None = None,
                 _arrays: tuple | None = None):
        num_embeddings = _check_int(num_embeddings, "num_embeddings")
        features = _check_int(features, "features")
        self.num_embeddings, self.features = num_embeddings, features
        self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
        self._set_pq(num_embeddings, features, m, bits, _arrays, rngs, param_dtype,
                     codebook_init, "features")

    @classmethod
    def from_pretrained(cls, embedding: Any, *, spec: _pq.PQ, key: Array | None = None,
                        rngs: nnx.Rngs | None = None, **options) -> "PQEmbed":
        """A PQEmbed fitted to a trained ``(num_embeddings, features)`` table.

        The decoded table equals ``fit(key, embedding, spec).encode(embedding).dequantize()``.

        Examples:
          >>> import jax, distq
          >>> e = jax.random.normal(jax.random.key(0), (64, 16))
          >>> emb = PQEmbed.from_pretrained(e, spec=distq.PQ(m=4, bits=4), key=jax.random.key(1))
          >>> emb.embedding().shape
          (64, 16)
        """
        spec = _check_pq_spec(spec)
        table = _as_weight(embedding, "embedding", 2)
        vocab, features = table.shape
        _check_split(features, spec.m, "features")
        key = _resolve_key(key, rngs, "PQEmbed.from_pretrained")
        arrays = _fit_vectors(table, spec, key, "num_embeddings")
        return cls(vocab, features, m=spec.m, bits=spec.bits, _arrays=arrays, **options)

    @classmethod
    def from_embed(cls, embed: nnx.Embed, spec: _pq.PQ, *, key: Array | None = None,
                   rngs: nnx.Rngs | None = None, **options) -> "PQEmbed":
        """:meth:`from_pretrained` on an ``nnx.Embed``."""
        if not isinstance(embed, nnx.Embed):
            raise TypeError(f"embed must be an nnx.Embed, got {type(embed).__name__}")
        return cls.from_pretrained(embed.embedding[...], spec=spec, key=key, rngs=rngs,
                                   **options)

    def embedding(self) -> Array:
        """The decoded ``(num_embeddings, features)`` table."""
        return self.vectors()

    def _out_dtype(self):
        return jnp.dtype(self.dtype) if self.dtype is not None else self.codebooks[...].dtype

    def __call__(self, inputs: Array) -> Array:
        """Rows of the table at integer ``inputs`` (any shape; negative indices count from the
        end, out-of-range ones give NaN rows like ``nnx.Embed``)."""
        inputs = jnp.asarray(inputs)
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise TypeError(f"inputs must have an integer dtype, got {inputs.dtype}")
        n = self.num_embeddings
        idx = inputs.reshape(-1).astype(jnp.int32)
        idx = jnp.where(idx < 0, idx + n, idx)
        valid = (idx >= 0) & (idx < n)
        idx = jnp.where(valid, idx, 0)
        pos = idx[:, None] * self.m + jnp.arange(self.m, dtype=jnp.int32)
        codes = bitpack.take(self.codes[...], self.bits, pos)
        dt = self._out_dtype()
        rot = _value(self.rotation)
        rows = _pq.decode_codes(codes, self.codebooks[...], rot, dt)
        rows = jnp.where(valid[:, None], rows, jnp.nan)
        return rows.reshape(inputs.shape + (self.features,))

    def attend(self, query: Array, *, forward: str = "auto") -> Array:
        """``query @ table.T`` (logits over the vocabulary) through the per-sub-space tables.

        Args:
          query: ``(..., features)``.
          forward: "table", "rebuild" or "auto" (see :class:`PQDense`).
        """
        query = jnp.asarray(query)
        if query.ndim == 0 or query.shape[-1] != self.features:
            raise ValueError(f"query must have shape (..., {self.features}), got {query.shape}")
        forward = _check_forward(forward)
        cb = self.codebooks[...]
        dt = _compute_dtype(self.dtype, query, cb)
        rot = _value(self.rotation)
        y = _pq_product(query.reshape(-1, self.features).astype(dt), cb.astype(dt),
                        self.codes_unpacked(), None if rot is None else rot.astype(dt),
                        self.bits, forward, self.precision)
        return y.reshape(query.shape[:-1] + (self.num_embeddings,))


# ------------------------------------------------------------------------------------ Conv
def _tuple(v: Any, n: int, name: str) -> tuple[int, ...]:
    if v is None:
        v = 1
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        v = (int(v),) * n
    v = tuple(v)
    if len(v) == 1 and n > 1:
        v = v * n
    if len(v) != n or not all(isinstance(i, (int, np.integer)) and i >= 1 for i in v):
        raise ValueError(f"{name} must be an int >= 1 or {n} of them, got {v!r}")
    return tuple(int(i) for i in v)


def _canon_padding(padding: Any, n: int):
    """'SAME'/'VALID'/'CIRCULAR'/'REFLECT'/'CAUSAL', or ``n`` ``(low, high)`` pairs."""
    if isinstance(padding, str):
        p = padding.upper()
        if p not in _PADDING_MODES:
            raise ValueError(f"padding must be one of {_PADDING_MODES} or pairs, got {padding!r}")
        if p == "CAUSAL" and n != 1:
            raise ValueError("padding='CAUSAL' is only defined for 1-D convolutions")
        return p
    if isinstance(padding, (int, np.integer)):
        return ((int(padding), int(padding)),) * n
    pads = []
    for p in padding:
        if isinstance(p, (int, np.integer)):
            pads.append((int(p), int(p)))
        else:
            lo, hi = p
            pads.append((int(lo), int(hi)))
    if len(pads) == 1 and n > 1:
        pads = pads * n
    if len(pads) != n:
        raise ValueError(f"padding needs {n} (low, high) pairs, got {padding!r}")
    return tuple(pads)


class _ConvMixin:
    """Convolution options and the channels-last forward shared by PQConv and QATConv."""

    def _set_conv(self, in_features, out_features, kernel_size, strides, padding,
                  input_dilation, kernel_dilation, feature_group_count) -> None:
        in_features = _check_int(in_features, "in_features")
        out_features = _check_int(out_features, "out_features")
        if isinstance(kernel_size, (int, np.integer)) and not isinstance(kernel_size, bool):
            kernel_size = (int(kernel_size),)
        if not isinstance(kernel_size, Sequence) or not kernel_size:
            raise ValueError(f"kernel_size must be an int or a non-empty tuple, got "
                             f"{kernel_size!r}")
        kernel_size = tuple(_check_int(k, "kernel_size") for k in kernel_size)
        n = len(kernel_size)
        groups = _check_int(feature_group_count, "feature_group_count")
        if in_features % groups or out_features % groups:
            raise ValueError(f"in_features={in_features} and out_features={out_features} must "
                             f"be divisible by feature_group_count={groups}")
        self.in_features, self.out_features = in_features, out_features
        self.kernel_size = kernel_size
        self.strides = _tuple(strides, n, "strides")
        self.padding = _canon_padding(padding, n)
        self.input_dilation = _tuple(input_dilation, n, "input_dilation")
        self.kernel_dilation = _tuple(kernel_dilation, n, "kernel_dilation")
        self.feature_group_count = groups
        self.kernel_shape = kernel_size + (in_features // groups, out_features)

    def _conv(self, x: Array, kernel: Array, bias: Array | None) -> Array:
        n = len(self.kernel_size)
        x = jnp.asarray(x)
        if x.ndim < n + 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"inputs must have shape (batch..., {n} spatial..., "
                             f"{self.in_features}), got {x.shape}")
        dt = _compute_dtype(self.dtype, x, kernel, bias)
        nb = x.ndim - (n + 1)
        lead = x.shape[:nb]
        x = x.reshape((-1,) + x.shape[nb:]).astype(dt)
        padding = self.padding
        if padding in ("CIRCULAR", "REFLECT"):
            dil = [(k - 1) * d + 1 for k, d in zip(self.kernel_size, self.kernel_dilation)]
            pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dil] + [(0, 0)]
            x = jnp.pad(x, pads, mode="wrap" if padding == "CIRCULAR" else "reflect")
            padding = "VALID"
        elif padding == "CAUSAL":
            left = self.kernel_dilation[0] * (self.kernel_size[0] - 1)
            x = jnp.pad(x, [(0, 0), (left, 0), (0, 0)])
            padding = "VALID"
        spec = (0, n + 1) + tuple(range(1, n + 1))
        dn = lax.ConvDimensionNumbers(lhs_spec=spec, rhs_spec=(n + 1, n) + tuple(range(n)),
                                      out_spec=spec)
        y = lax.conv_general_dilated(
            x, kernel.astype(dt), self.strides, padding, lhs_dilation=self.input_dilation,
            rhs_dilation=self.kernel_dilation, dimension_numbers=dn,
            feature_group_count=self.feature_group_count, precision=self.precision)
        if bias is not None:
            y = y + bias.astype(dt)
        return y if nb == 1 else y.reshape(lead + y.shape[1:])


def _conv_options(conv: nnx.Conv) -> dict:
    if getattr(conv, "mask", None) is not None:
        raise ValueError("conv: masked nnx.Conv layers are not supported")
    return dict(strides=conv.strides, padding=conv.padding, input_dilation=conv.input_dilation,
                kernel_dilation=conv.kernel_dilation,
                feature_group_count=conv.feature_group_count, dtype=conv.dtype,
                precision=conv.precision)


class PQConv(_ConvMixin, _PQBase):
    """An N-D convolution (channels last, like ``nnx.Conv``) with a product-quantised kernel.

    The kernel ``(*kernel_size, in / groups, out)`` is stored as one vector per output channel
    (its ``prod(kernel_size) * in / groups`` weights in C order), cut into ``m`` sub-vectors;
    the forward decodes the kernel and calls ``lax.conv_general_dilated``. The rank of the
    convolution is ``len(kernel_size)`` (an int means 1-D).

    Args:
      in_features, out_features, kernel_size, strides, padding, input_dilation, kernel_dilation,
        feature_group_count, use_bias, dtype, param_dtype, precision, bias_init: as in
        ``nnx.Conv`` (padding: "SAME", "VALID", "CIRCULAR", "REFLECT", "CAUSAL" or pairs).
      m: sub-spaces; must divide ``prod(kernel_size) * in_features / feature_group_count``.
      bits: bits per code, 1..16.
      codebook_init: initialiser of the codebooks; default ``normal(1 / sqrt(fan_in))``.
      rngs: random streams.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from distq import nn
      >>> conv = nn.PQConv(4, 64, (2, 2), m=4, bits=4, rngs=nnx.Rngs(0))
      >>> conv.kernel().shape, conv(jnp.ones((2, 8, 8, 4))).shape
      ((2, 2, 4, 64), (2, 8, 8, 64))
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
                 strides: int | Sequence[int] = 1, *, m: int, bits: int = 8,
                 padding: Any = "SAME", input_dilation: Any = 1, kernel_dilation: Any = 1,
                 feature_group_count: int = 1, use_bias: bool = True, dtype: Any = None,
                 param_dtype: Any = jnp.float32, precision: Any = None,
                 codebook_init: Initializer | None = None, bias_init: Initializer = _zeros,
                 rngs: nnx.Rngs | None = None, _arrays: tuple | None = None):
        self._set_conv(in_features, out_features, kernel_size, strides, padding, input_dilation,
                       kernel_dilation, feature_group_count)
        self.use_bias = bool(use_bias)
        self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
        fan_in = math.prod(self.kernel_shape[:-1])
        self._set_pq(self.out_features, fan_in, m, bits,
                     None if _arrays is None else _arrays[:3], rngs, param_dtype, codebook_init,
                     "prod(kernel_size) * in_features / feature_group_count")
        if not self.use_bias:
            self.bias = nnx.data(None)
        elif _arrays is not None:
            self.bias = nnx.Param(_arrays[3])
        else:
            self.bias = nnx.Param(bias_init(rngs.params(), (self.out_features,), param_dtype))

    @classmethod
    def from_pretrained(cls, kernel: Any, bias: Any = None, *, spec: _pq.PQ,
                        key: Array | None = None, rngs: nnx.Rngs | None = None,
                        feature_group_count: int = 1, **options) -> "PQConv":
        """A PQConv fitted to a trained ``(*kernel_size, in / groups, out)`` kernel.

        The decoded kernel equals the :func:`distq.pq.fit` decoding of the ``(out, fan_in)``
        matrix ``kernel.reshape(-1, out).T``, reshaped back.

        Args:
          kernel: rank ``>= 3`` float array (rank 3: 1-D conv, rank 4: 2-D, ...).
          bias: ``(out,)`` or ``None``.
          spec: a :class:`distq.PQ`; ``out >= 2**spec.bits``.
          key: key of the fit (or ``rngs``).
          feature_group_count: groups of the convolution (``in = kernel.shape[-2] * groups``).
          **options: ``strides``, ``padding``, ``input_dilation``, ``kernel_dilation``,
            ``dtype``, ``precision``.

        Examples:
          >>> import jax, distq
          >>> k = jax.random.normal(jax.random.key(0), (4, 4, 64))
          >>> conv = PQConv.from_pretrained(k, spec=distq.PQ(m=4, bits=4), key=jax.random.key(1))
          >>> conv.kernel_size, conv.kernel().shape
          ((4,), (4, 4, 64))
        """
        spec = _check_pq_spec(spec)
        kernel = _checks.as_float_array(kernel, "kernel")
        if kernel.ndim < 3:
            raise ValueError("kernel must have rank >= 3 (*kernel_size, in_features, "
                             f"out_features), got shape {tuple(kernel.shape)}")
        groups = _check_int(feature_group_count, "feature_group_count")
        out = kernel.shape[-1]
        b = _as_bias(bias, out)
        vecs = kernel.reshape(-1, out).T
        _check_split(vecs.shape[1], spec.m, "prod(kernel_size) * in_features / groups")
        key = _resolve_key(key, rngs, "PQConv.from_pretrained")
        cb, words, rot = _fit_vectors(vecs, spec, key, "out_features")
        return cls(kernel.shape[-2] * groups, out, kernel.shape[:-2], m=spec.m, bits=spec.bits,
                   feature_group_count=groups, use_bias=b is not None,
                   _arrays=(cb, words, rot, b), **options)

    @classmethod
    def from_conv(cls, conv: nnx.Conv, spec: _pq.PQ, *, key: Array | None = None,
                  rngs: nnx.Rngs | None = None, **options) -> "PQConv":
        """:meth:`from_pretrained` on an ``nnx.Conv`` (same strides, padding, dilations...)."""
        if not isinstance(conv, nnx.Conv):
            raise TypeError(f"conv must be an nnx.Conv, got {type(conv).__name__}")
        options = {**_conv_options(conv), **options}
        return cls.from_pretrained(conv.kernel[...], _value(conv.bias), spec=spec, key=key,
                                   rngs=rngs, **options)

    def kernel(self) -> Array:
        """The decoded ``(*kernel_size, in / groups, out)`` kernel."""
        return self.vectors().T.reshape(self.kernel_shape)

    def __call__(self, inputs: Array) -> Array:
        """The convolution of ``(batch..., *spatial, in_features)`` inputs (batch optional)."""
        return self._conv(inputs, self.kernel(), _value(self.bias))


# ------------------------------------------------------------------------------------- QAT
class _QATBase(nnx.Module):
    """Shared methods of the QAT layers (``kernel``, ``bias``, static ``spec`` and ``clip``)."""

    def fake_quantized_kernel(self) -> Array:
        """``distq.fake_quantize(kernel, spec, clip)``: quantised values, straight-through grad."""
        return _ste.fake_quantize(self.kernel[...], self.spec, self.clip)

    def quantized(self) -> Any:
        """The kernel quantised with ``spec`` (a :class:`distq.QArray`, or a ``CastArray``)."""
        return self.spec.resolve(tuple(self.kernel.shape)).quantize(self.kernel[...])

    @property
    def nbytes(self) -> int:
        """True bytes after quantisation: the quantised kernel plus the (float) bias."""
        b = _value(self.bias)
        return int(self.quantized().nbytes) + (0 if b is None else _plan.leaf_nbytes(b))


class QATDense(_QATBase):
    """A dense layer trained through a scalar quantiser (quantisation-aware training).

    The forward is ``x @ fake_quantize(kernel, spec) + bias``: exactly the layer with the
    quantised-then-decoded kernel; the gradient reaches the float kernel straight through (zero
    where the kernel lies outside the codebook's range when ``clip``).

    Args:
      in_features, out_features, use_bias, dtype, param_dtype, precision, kernel_init,
        bias_init, rngs: as in ``nnx.Linear``.
      spec: :class:`distq.Scalar`, :class:`distq.Uniform`, :class:`distq.NF4` or
        :class:`distq.Cast` (static).
      clip: mask the gradient outside the representable range.

    Examples:
      >>> import jax.numpy as jnp, distq
      >>> from flax import nnx
      >>> layer = QATDense(16, 64, spec=distq.Uniform(bits=4), rngs=nnx.Rngs(0))
      >>> x = jnp.ones((2, 16))
      >>> bool(jnp.all(layer(x) == x @ layer.quantized().dequantize() + layer.bias[...]))
      True
    """

    def __init__(self, in_features: int, out_features: int, *, spec: Any, clip: bool = True,
                 use_bias: bool = True, dtype: Any = None, param_dtype: Any = jnp.float32,
                 precision: Any = None, kernel_init: Initializer = _default_kernel_init,
                 bias_init: Initializer = _zeros, rngs: nnx.Rngs | None = None,
                 _arrays: tuple | None = None):
        self.in_features = _check_int(in_features, "in_features")
        self.out_features = _check_int(out_features, "out_features")
        self.spec = _check_scalar_spec(spec)
        self.clip = bool(clip)
        self.use_bias = bool(use_bias)
        self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
        shape = (self.in_features, self.out_features)
        if _arrays is None:
            if rngs is None:
                raise TypeError("rngs=nnx.Rngs(...) is required for random initialisation")
            kernel = kernel_init(rngs.params(), shape, param_dtype)
            bias = bias_init(rngs.params(), (self.out_features,), param_dtype) if use_bias \
                else None
        else:
            kernel, bias = _arrays
        self.kernel = nnx.Param(kernel)
        self.bias = nnx.data(None) if bias is None else nnx.Param(bias)

    @classmethod
    def from_linear(cls, linear: nnx.Linear, spec: Any, *, clip: bool = True) -> "QATDense":
        """Wraps the weights of an ``nnx.Linear`` (same arrays, dtype and precision)."""
        if not isinstance(linear, nnx.Linear):
            raise TypeError(f"linear must be an nnx.Linear, got {type(linear).__name__}")
        return cls(linear.in_features, linear.out_features, spec=spec, clip=clip,
                   use_bias=linear.bias is not None, dtype=linear.dtype,
                   param_dtype=linear.param_dtype, precision=linear.precision,
                   _arrays=(linear.kernel[...], _value(linear.bias)))

    def __call__(self, x: Array) -> Array:
        """``x @ fake_quantize(kernel) + bias`` over the last axis of ``x``."""
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., {self.in_features}), got {x.shape}")
        kernel, bias = self.fake_quantized_kernel(), _value(self.bias)
        dt = _compute_dtype(self.dtype, x, kernel, bias)
        y = lax.dot_general(x.astype(dt), kernel.astype(dt),
                            (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        return y if bias is None else y + bias.astype(dt)


class QATConv(_ConvMixin, _QATBase):
    """An N-D convolution trained through a scalar quantiser (see :class:`QATDense`).

    Args:
      in_features, out_features, kernel_size, strides, padding, input_dilation, kernel_dilation,
        feature_group_count, use_bias, dtype, param_dtype, precision, kernel_init, bias_init,
        rngs: as in ``nnx.Conv``.
      spec: the scalar spec (static); ``clip``: mask the gradient outside the range.

    Examples:
      >>> import jax.numpy as jnp, distq
      >>> from flax import nnx
      >>> conv = QATConv(4, 8, (3,), spec=distq.Uniform(bits=4), rngs=nnx.Rngs(0))
      >>> conv(jnp.ones((2, 10, 4))).shape
      (2, 10, 8)
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
                 strides: int | Sequence[int] = 1, *, spec: Any, clip: bool = True,
                 padding: Any = "SAME", input_dilation: Any = 1, kernel_dilation: Any = 1,
                 feature_group_count: int = 1, use_bias: bool = True, dtype: Any = None,
                 param_dtype: Any = jnp.float32, precision: Any = None,
                 kernel_init: Initializer = _default_kernel_init,
                 bias_init: Initializer = _zeros, rngs: nnx.Rngs | None = None,
                 _arrays: tuple | None = None):
        self._set_conv(in_features, out_features, kernel_size, strides, padding, input_dilation,
                       kernel_dilation, feature_group_count)
        self.spec = _check_scalar_spec(spec)
        self.clip = bool(clip)
        self.use_bias = bool(use_bias)
        self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
        if _arrays is None:
            if rngs is None:
                raise TypeError("rngs=nnx.Rngs(...) is required for random initialisation")
            kernel = kernel_init(rngs.params(), self.kernel_shape, param_dtype)
            bias = bias_init(rngs.params(), (self.out_features,), param_dtype) if use_bias \
                else None
        else:
            kernel, bias = _arrays
            if tuple(kernel.shape) != self.kernel_shape:
                raise ValueError(f"kernel must have shape {self.kernel_shape}, got "
                                 f"{tuple(kernel.shape)}")
        self.kernel = nnx.Param(kernel)
        self.bias = nnx.data(None) if bias is None else nnx.Param(bias)

    @classmethod
    def from_conv(cls, conv: nnx.Conv, spec: Any, *, clip: bool = True) -> "QATConv":
        """Wraps the weights of an ``nnx.Conv`` (same arrays and convolution options)."""
        if not isinstance(conv, nnx.Conv):
            raise TypeError(f"conv must be an nnx.Conv, got {type(conv).__name__}")
        return cls(conv.in_features, conv.out_features, conv.kernel_size, spec=spec, clip=clip,
                   use_bias=conv.bias is not None, param_dtype=conv.param_dtype,
                   _arrays=(conv.kernel[...], _value(conv.bias)), **_conv_options(conv))

    def __call__(self, inputs: Array) -> Array:
        """The convolution with ``fake_quantize(kernel)``."""
        return self._conv(inputs, self.fake_quantized_kernel(), _value(self.bias))


# ------------------------------------------------------------------------------ model level
def model_size(model: Any) -> int:
    """True bytes of a model: PQ codes packed, codebooks, quantised leaves, other arrays.

    For an ``nnx.Module`` every variable except RNG state is counted at its stored size (the
    PQ layers keep their codes bit-packed, so their state is their true size); any other pytree
    (a params dict, ``nnx.state(...)``, a quantised tree) is counted by
    :func:`distq.tree_nbytes`.

    Examples:
      >>> from flax import nnx
      >>> model_size(nnx.Linear(64, 32, rngs=nnx.Rngs(0)))  # (64 * 32 + 32) * 4
      8320
      >>> model_size(PQDense(16, 64, m=4, bits=4, rngs=nnx.Rngs(0)))  # 128 + 1024 + 256
      1408
    """
    tree = nnx.state(model, nnx.Not(nnx.RngState)) if isinstance(model, nnx.Module) else model
    return int(_plan.tree_nbytes(tree))


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _matcher(filter: str | Callable | None) -> Callable[[str, nnx.Module], bool]:
    if filter is None:
        return lambda path, mod: True
    if isinstance(filter, str):
        pattern = re.compile(filter)
        return lambda path, mod: pattern.fullmatch(path) is not None
    if callable(filter):
        return filter
    raise TypeError(f"filter must be a regex string, a callable (path, module) -> bool or None, "
                    f"got {type(filter).__name__}")


def _replace_layers(module: nnx.Module, convert: Callable, filter, what: str) -> nnx.Module:
    """A copy of ``module`` with ``convert(index, path, layer)`` (or ``None``: keep) applied."""
    if not isinstance(module, nnx.Module):
        raise TypeError(f"module must be an nnx.Module, got {type(module).__name__}")
    match = _matcher(filter)
    model = nnx.clone(module)
    todo = [(p, mod) for p, mod in nnx.iter_modules(model) if p]
    done = 0
    for i, (path, mod) in enumerate(todo):
        ps = _path_str(path)
        if not match(ps, mod):
            continue
        new = convert(i, ps, mod)
        if new is None:
            continue
        parent = model
        for k in path[:-1]:
            parent = getattr(parent, k) if isinstance(k, str) else parent[k]
        k = path[-1]
        if isinstance(k, str) and not isinstance(parent, (nnx.List, nnx.Dict, list, dict)):
            setattr(parent, k, new)
        else:
            parent[k] = new
        done += 1
    if isinstance(module, (nnx.Linear, nnx.Conv, nnx.Embed)) and match("", module):
        new = convert(-1, "", module)
        if new is not None:
            return new
    if done == 0 and filter is not None:
        warnings.warn(f"{what}: the filter {filter!r} matched no layer", stacklevel=3)
    return model


def qat(module: nnx.Module, spec: Any, *, filter: str | Callable | None = None,
        clip: bool = True) -> nnx.Module:
    """A copy of ``module`` with every ``nnx.Linear``/``nnx.Conv`` wrapped for QAT.

    Args:
      module: an nnx model (not modified; the copy shares its arrays).
      spec: the scalar spec of every wrapped kernel.
      filter: which layers: a regex matched (``re.fullmatch``) against the layer's path (keys
        joined by ``/``, e.g. ``"layers/0"``), a callable ``(path, layer) -> bool``, or ``None``
        (all).
      clip: see :class:`QATDense`.

    Returns:
      The model with :class:`QATDense`/:class:`QATConv` in place of the matched layers; a
      warning is issued when a filter matched nothing.

    Examples:
      >>> import distq
      >>> from flax import nnx
      >>> rngs = nnx.Rngs(0)
      >>> net = nnx.Sequential(nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs))
      >>> q = qat(net, distq.Uniform(bits=4), filter="layers/0")
      >>> [type(l).__name__ for l in q.layers]
      ['QATDense', 'Linear']
    """
    spec = _check_scalar_spec(spec)

    def convert(i, path, mod):
        if isinstance(mod, nnx.Linear):
            return QATDense.from_linear(mod, spec, clip=clip)
        if isinstance(mod, nnx.Conv):
            return QATConv.from_conv(mod, spec, clip=clip)
        return None

    return _replace_layers(module, convert, filter, "qat")


def pq_layers(module: nnx.Module, spec: _pq.PQ, *, key: Array,
              filter: str | Callable | None = None) -> nnx.Module:
    """A copy of ``module`` with ``nnx.Linear``/``nnx.Conv``/``nnx.Embed`` fitted as PQ layers.

    Each matched layer goes through ``from_linear``/``from_conv``/``from_embed`` with its own
    key (``fold_in(key, index)``). Layers with fewer output vectors than ``2**spec.bits`` cannot
    be fitted: leave them out with ``filter``.

    Args:
      module: an nnx model (not modified).
      spec: the :class:`distq.PQ` of every matched layer.
      key: ``jax.random`` key.
      filter: as in :func:`qat`.

    Examples:
      >>> import jax, distq
      >>> from flax import nnx
      >>> rngs = nnx.Rngs(0)
      >>> net = nnx.Sequential(nnx.Linear(16, 64, rngs=rngs), nnx.Linear(64, 2, rngs=rngs))
      >>> q = pq_layers(net, distq.PQ(m=4, bits=4), key=jax.random.key(0), filter="layers/0")
      >>> [type(l).__name__ for l in q.layers]
      ['PQDense', 'Linear']
    """
    spec = _check_pq_spec(spec)

    def convert(i, path, mod):
        k = jax.random.fold_in(key, i + 1)
        try:
            if isinstance(mod, nnx.Linear):
                return PQDense.from_linear(mod, spec, key=k)
            if isinstance(mod, nnx.Conv):
                return PQConv.from_conv(mod, spec, key=k)
            if isinstance(mod, nnx.Embed):
                return PQEmbed.from_embed(mod, spec, key=k)
        except ValueError as e:
            raise ValueError(f"pq_layers: layer {path!r}: {e}") from None
        return None

    return _replace_layers(module, convert, filter, "pq_layers")


__all__ = ["PQCodes", "PQRotation", "PQDense", "PQEmbed", "PQConv", "QATDense", "QATConv",
           "model_size", "qat", "pq_layers", "table_is_cheaper"]
