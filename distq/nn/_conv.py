"""Convolution options and the channels-last forward shared by ``PQConv`` and ``QATConv``.

:class:`ConvMixin` validates and stores the options of ``nnx.Conv`` (strides, padding,
dilations, feature groups; padding "SAME", "VALID", "CIRCULAR", "REFLECT", "CAUSAL" or
``(low, high)`` pairs) and runs ``lax.conv_general_dilated`` with a given kernel;
:func:`conv_options` reads those options off an ``nnx.Conv``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from ._common import Array, check_int, compute_dtype

_PADDING_MODES = ("SAME", "VALID", "CIRCULAR", "REFLECT", "CAUSAL")


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


class ConvMixin:
    """Convolution options and the channels-last forward shared by PQConv and QATConv.

    A layer calls :meth:`_set_conv` in its constructor (it sets ``in_features``,
    ``out_features``, ``kernel_size``, ``strides``, ``padding``, ``input_dilation``,
    ``kernel_dilation``, ``feature_group_count`` and ``kernel_shape``) and :meth:`_conv` in its
    forward; the layer provides ``dtype`` and ``precision``.
    """

    def _set_conv(self, in_features, out_features, kernel_size, strides, padding,
                  input_dilation, kernel_dilation, feature_group_count) -> None:
        in_features = check_int(in_features, "in_features")
        out_features = check_int(out_features, "out_features")
        if isinstance(kernel_size, (int, np.integer)) and not isinstance(kernel_size, bool):
            kernel_size = (int(kernel_size),)
        if not isinstance(kernel_size, Sequence) or not kernel_size:
            raise ValueError(f"kernel_size must be an int or a non-empty tuple, got "
                             f"{kernel_size!r}")
        kernel_size = tuple(check_int(k, "kernel_size") for k in kernel_size)
        n = len(kernel_size)
        groups = check_int(feature_group_count, "feature_group_count")
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
        dt = compute_dtype(self.dtype, x, kernel, bias)
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
            y = y + bias.astype(dt).reshape((1,) * (y.ndim - 1) + (-1,))
        return y if nb == 1 else y.reshape(lead + y.shape[1:])


def conv_options(conv: nnx.Conv) -> dict:
    """The options of an ``nnx.Conv`` as keyword arguments of ``PQConv``/``QATConv``."""
    if getattr(conv, "mask", None) is not None:
        raise ValueError("conv: masked nnx.Conv layers are not supported")
    return dict(strides=conv.strides, padding=conv.padding, input_dilation=conv.input_dilation,
                kernel_dilation=conv.kernel_dilation,
                feature_group_count=conv.feature_group_count, dtype=conv.dtype,
                precision=conv.precision)
