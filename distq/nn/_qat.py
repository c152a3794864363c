"""Quantisation-aware training layers: :class:`QATDense` and :class:`QATConv`.

Each holds a float kernel and a static deterministic spec (:class:`distq.Scalar`,
:class:`distq.Uniform`, :class:`distq.NF4`, :class:`distq.Cast`, or any other registered spec
that needs no key) and runs on ``distq.fake_quantize(kernel, spec)``: the forward is exactly the
quantised layer's, the gradient is straight-through.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax import lax

from .. import planning as _plan
from .. import ste as _ste
from ..core import spec as _spec
from ._common import (Array, Initializer, check_int, compute_dtype, default_bias_init,
                      value)
from ._conv import ConvMixin, conv_options

_default_kernel_init = nnx.initializers.lecun_normal()


def check_scalar_spec(spec: Any):
    """``spec`` if it is a registered spec that needs no key (a PQ spec is refused: it is fitted
    from a key, and its codebooks train directly in the PQ layers)."""
    _spec.check_spec(spec)
    if spec is None:
        raise TypeError("spec must be a distq spec (distq.Scalar, Uniform, NF4, Cast), got None")
    if getattr(spec, "randomized", False):
        raise ValueError(f"spec: QAT layers take a deterministic spec (distq.Scalar, Uniform, "
                         f"NF4, Cast), not {type(spec).__name__}; for product quantisation use "
                         "distq.nn.PQDense/PQConv (trainable codebooks; distq.nn.pq_layers "
                         "converts a model)")
    return spec


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
        b = value(self.bias)
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
                 bias_init: Initializer = default_bias_init, rngs: nnx.Rngs | None = None,
                 _arrays: tuple | None = None):
        self.in_features = check_int(in_features, "in_features")
        self.out_features = check_int(out_features, "out_features")
        self.spec = check_scalar_spec(spec)
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
                   _arrays=(linear.kernel[...], value(linear.bias)))

    def __call__(self, x: Array) -> Array:
        """``x @ fake_quantize(kernel) + bias`` over the last axis of ``x``."""
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., {self.in_features}), got {x.shape}")
        kernel, bias = self.fake_quantized_kernel(), value(self.bias)
        dt = compute_dtype(self.dtype, x, kernel, bias)
        y = lax.dot_general(x.astype(dt), kernel.astype(dt),
                            (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        return y if bias is None else y + bias.astype(dt).reshape((1,) * (y.ndim - 1) + (-1,))


class QATConv(ConvMixin, _QATBase):
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
                 bias_init: Initializer = default_bias_init, rngs: nnx.Rngs | None = None,
                 _arrays: tuple | None = None):
        self._set_conv(in_features, out_features, kernel_size, strides, padding, input_dilation,
                       kernel_dilation, feature_group_count)
        self.spec = check_scalar_spec(spec)
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
                   _arrays=(conv.kernel[...], value(conv.bias)), **conv_options(conv))

    def __call__(self, inputs: Array) -> Array:
        """The convolution with ``fake_quantize(kernel)``."""
        return self._conv(inputs, self.fake_quantized_kernel(), value(self.bias))
