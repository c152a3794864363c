"""The reverse-PQ layers :class:`PQDense`, :class:`PQEmbed` and :class:`PQConv` (see
:mod:`distq.nn`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx

from ..core import _checks, bitpack
from ..core import pq as _pq
from ._common import (Array, Initializer, as_bias, as_weight, check_int, compute_dtype,
                      default_bias_init, value)
from ._conv import ConvMixin, conv_options
from ._pq_base import PQBase, check_pq_spec, check_split, fit_vectors, resolve_key
from ._table import check_forward, pq_product


# ----------------------------------------------------------------------------------- Dense
class PQDense(PQBase):
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
                 codebook_init: Initializer | None = None,
                 bias_init: Initializer = default_bias_init,
                 rngs: nnx.Rngs | None = None, _arrays: tuple | None = None):
        in_features = check_int(in_features, "in_features")
        out_features = check_int(out_features, "out_features")
        self.in_features, self.out_features = in_features, out_features
        self.use_bias = bool(use_bias)
        self.forward = check_forward(forward)
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
        spec = check_pq_spec(spec)
        kernel = as_weight(kernel, "kernel", 2)
        d_in, d_out = kernel.shape
        check_split(d_in, spec.m, "in_features")
        b = as_bias(bias, d_out)
        key = resolve_key(key, rngs, "PQDense.from_pretrained")
        cb, words, rot = fit_vectors(kernel.T, spec, key, "out_features")
        return cls(d_in, d_out, m=spec.m, bits=spec.bits, use_bias=b is not None,
                   _arrays=(cb, words, rot, b), **options)

    @classmethod
    def from_linear(cls, linear: nnx.Linear, spec: _pq.PQ, *, key: Array | None = None,
                    rngs: nnx.Rngs | None = None, **options) -> "PQDense":
        """:meth:`from_pretrained` on an ``nnx.Linear`` (keeps its dtype and precision)."""
        if not isinstance(linear, nnx.Linear):
            raise TypeError(f"linear must be an nnx.Linear, got {type(linear).__name__}")
        options = {"dtype": linear.dtype, "precision": linear.precision, **options}
        return cls.from_pretrained(linear.kernel[...], value(linear.bias), spec=spec, key=key,
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
        forward = self.forward if forward is None else check_forward(forward)
        cb, bias = self.codebooks[...], value(self.bias)
        dt = compute_dtype(self.dtype, x, cb, bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).astype(dt)
        rot = value(self.rotation)
        y = pq_product(x2, cb.astype(dt), self.codes_unpacked(),
                        None if rot is None else rot.astype(dt), self.bits, forward,
                        self.precision)
        if bias is not None:
            y = y + bias.astype(dt).reshape((1,) * (y.ndim - 1) + (-1,))
        return y.reshape(lead + (self.out_features,))


# ----------------------------------------------------------------------------------- Embed
class PQEmbed(PQBase):
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
        num_embeddings = check_int(num_embeddings, "num_embeddings")
        features = check_int(features, "features")
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
        spec = check_pq_spec(spec)
        table = as_weight(embedding, "embedding", 2)
        vocab, features = table.shape
        check_split(features, spec.m, "features")
        key = resolve_key(key, rngs, "PQEmbed.from_pretrained")
        arrays = fit_vectors(table, spec, key, "num_embeddings")
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
        pos = idx[:, None] * self.m + jnp.arange(self.m, dtype=jnp.int32)[None, :]
        codes = bitpack.take(self.codes[...], self.bits, pos)
        dt = self._out_dtype()
        rot = value(self.rotation)
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
        forward = check_forward(forward)
        cb = self.codebooks[...]
        dt = compute_dtype(self.dtype, query, cb)
        rot = value(self.rotation)
        y = pq_product(query.reshape(-1, self.features).astype(dt), cb.astype(dt),
                        self.codes_unpacked(), None if rot is None else rot.astype(dt),
                        self.bits, forward, self.precision)
        return y.reshape(query.shape[:-1] + (self.num_embeddings,))


# ------------------------------------------------------------------------------------ Conv
class PQConv(ConvMixin, PQBase):
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
                 codebook_init: Initializer | None = None,
                 bias_init: Initializer = default_bias_init,
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
        spec = check_pq_spec(spec)
        kernel = _checks.as_float_array(kernel, "kernel")
        if kernel.ndim < 3:
            raise ValueError("kernel must have rank >= 3 (*kernel_size, in_features, "
                             f"out_features), got shape {tuple(kernel.shape)}")
        groups = check_int(feature_group_count, "feature_group_count")
        out = kernel.shape[-1]
        b = as_bias(bias, out)
        vecs = kernel.reshape(-1, out).T
        check_split(vecs.shape[1], spec.m, "prod(kernel_size) * in_features / groups")
        key = resolve_key(key, rngs, "PQConv.from_pretrained")
        cb, words, rot = fit_vectors(vecs, spec, key, "out_features")
        return cls(kernel.shape[-2] * groups, out, kernel.shape[:-2], m=spec.m, bits=spec.bits,
                   feature_group_count=groups, use_bias=b is not None,
                   _arrays=(cb, words, rot, b), **options)

    @classmethod
    def from_conv(cls, conv: nnx.Conv, spec: _pq.PQ, *, key: Array | None = None,
                  rngs: nnx.Rngs | None = None, **options) -> "PQConv":
        """:meth:`from_pretrained` on an ``nnx.Conv`` (same strides, padding, dilations...)."""
        if not isinstance(conv, nnx.Conv):
            raise TypeError(f"conv must be an nnx.Conv, got {type(conv).__name__}")
        options = {**conv_options(conv), **options}
        return cls.from_pretrained(conv.kernel[...], value(conv.bias), spec=spec, key=key,
                                   rngs=rngs, **options)

    def kernel(self) -> Array:
        """The decoded ``(*kernel_size, in / groups, out)`` kernel."""
        return self.vectors().T.reshape(self.kernel_shape)

    def __call__(self, inputs: Array) -> Array:
        """The convolution of ``(batch..., *spatial, in_features)`` inputs (batch optional)."""
        return self._conv(inputs, self.kernel(), value(self.bias))
