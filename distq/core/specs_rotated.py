"""The :class:`Rotated` spec: a random orthogonal transform before any inner spec (no JAX).

Its quantiser and leaf type (:class:`distq.core.rotated.RotatedArray`) are in
:mod:`distq.core.rotated`; the transform itself in :mod:`distq.core.hadamard`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import numpy as np

from . import _checks
from . import spec as _spec
from .specs import AUTO, INPUT_AXIS

SEED_BYTES = 4  # the stored seed: one uint32


@dataclasses.dataclass(frozen=True)
class Rotated:
    """A random orthogonal transform along one axis, then the inner spec; undone at decode.

    Each 1-D slice along ``axis`` is multiplied by ``R = (H_p (x) C_m) S`` (random signs, then
    Walsh-Hadamard and Hartley factors, see :mod:`distq.core.hadamard`): entries become close to
    Gaussian and outliers spread over the whole slice, so a quantiser designed for a Gaussian
    (Lloyd-Max codebooks, NF4) fits them better. ``R`` is stored as its seed (4 bytes), not as
    a matrix; ``dequantize()`` decodes the inner leaf and applies ``R^T`` once
    (``O(n log n)`` per slice). Any length works: 384 = 128 * 3, 1536 = 512 * 3, primes.

    Text form: ``rotated(INNER)`` with options after it, e.g. ``rotated(scalar:4,axis=0)`` or
    ``rotated(nf4),axis=1,seed=3``.

    Attributes:
      spec: the inner spec (any registered spec but another ``Rotated``), applied to the
        rotated array with its own resolution (automatic fields, see :meth:`resolve`).
      axis: the axis rotated; ``"auto"`` (default): for a model weight its *output* axis (the
        one that is not contracted: the calibration Gram matrices are unchanged, and rows of a
        PyTorch ``(out, in)`` weight or of an embedding are decoded alone by ``take``), for a
        plain array its last axis.
      seed: the rotation's seed, an int in ``[0, 2**32)``.

    Examples:
      >>> import jax, distq
      >>> w = jax.random.normal(jax.random.key(0), (256, 384))
      >>> q = distq.quantize(w, distq.Rotated(distq.Scalar(bits=4)))
      >>> type(q).__name__, q.shape, q.nbytes == distq.quantize(w, distq.Scalar(bits=4)).nbytes + 4
      ('RotatedArray', (256, 384), True)
      >>> float(((q.dequantize() - w) ** 2).mean() / w.var()) < 0.012
      True
      >>> distq.spec_str(distq.Rotated(distq.NF4(), axis=0, seed=3))
      'rotated(nf4),axis=0,seed=3'
      >>> distq.parse_spec("rotated(scalar:3,axis=1),seed=5") == distq.Rotated(
      ...     distq.Scalar(bits=3, axis=1), seed=5)
      True
    """

    kind: ClassVar[str] = "rotated"
    positional: ClassVar[tuple[str, ...]] = ()
    wraps: ClassVar[str] = "spec"  # the field holding the inner spec: text form KIND(INNER)
    text_hidden: ClassVar[tuple[str, ...]] = ("spec",)

    spec: Any
    axis: int | str = AUTO
    seed: int = 0

    def __post_init__(self):
        if self.spec is None or not _spec.is_spec(self.spec):
            _spec.check_spec(self.spec, "Rotated's spec")
            raise TypeError("Rotated needs an inner spec, got None")
        if isinstance(self.spec, Rotated):
            raise TypeError("Rotated cannot wrap another Rotated (one rotation per array)")
        if getattr(type(self.spec), "rotates_itself", False):
            raise TypeError(f"Rotated cannot wrap {type(self.spec).__name__}: it rotates on its "
                            "own (give it input_axis=, e.g. VQ(bits=3, input_axis=-1))")
        if not (isinstance(self.axis, str) and self.axis == AUTO):
            if isinstance(self.axis, (bool, np.bool_)) or not isinstance(self.axis,
                                                                         (int, np.integer)):
                raise TypeError(f"axis must be an int or 'auto', got {self.axis!r}")
            _checks.check_int(self.axis, "axis", -_checks.INT32_MAX, _checks.INT32_MAX)
        if isinstance(self.seed, (bool, np.bool_)) or not isinstance(self.seed,
                                                                     (int, np.integer)):
            raise TypeError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
        _checks.check_int(self.seed, "seed", 0, (1 << 32) - 1)

    # ---------------------------------------------------------------- spec protocol
    def quantize(self, x: Any, *, key: Any = None) -> Any:
        """Rotates ``x`` and quantises it with the inner spec (``key`` goes to the inner
        spec); returns a :class:`distq.core.rotated.RotatedArray`."""
        return _spec.quantizer(type(self))(x, self, key)

    def rotation_axis(self, shape: tuple[int, ...], role: str | None = None) -> int:
        """The axis rotated for an array of ``shape`` (non-negative; see ``axis``)."""
        ndim = len(shape)
        if not (isinstance(self.axis, str) and self.axis == AUTO):
            return int(self.axis) % max(ndim, 1)
        if role in INPUT_AXIS and ndim >= 2:
            contracted = INPUT_AXIS[role](ndim)
            return 0 if contracted != 0 else ndim - 1  # the output (not contracted) axis
        return max(ndim - 1, 0)

    def resolve(self, shape: tuple[int, ...], role: str | None = None) -> "Rotated":
        """The concrete spec for an array of ``shape``: the axis made concrete, the inner
        spec resolved for the same shape and role (its automatic fields see the rotated
        array's shape, which is the same)."""
        ndim = len(shape)
        if ndim and not (isinstance(self.axis, str) and self.axis == AUTO) and not (
                -ndim <= self.axis < ndim):
            return self  # problem() says why
        axis = self.rotation_axis(shape, role) if ndim else self.axis
        return dataclasses.replace(self, spec=self.spec.resolve(shape, role), axis=axis)

    def problem(self, shape: tuple[int, ...]) -> str | None:
        """Why an array of ``shape`` cannot take this spec (or ``None``)."""
        if math.prod(shape) == 0:
            return "the array is empty"
        if not shape:
            return "a rotation needs an array of rank >= 1"
        if not (isinstance(self.axis, str) and self.axis == AUTO) and not (
                -len(shape) <= self.axis < len(shape)):
            return f"axis={self.axis} is out of range for an array of rank {len(shape)}"
        return self.spec.problem(shape)

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Stored bytes: the inner leaf's and the seed's."""
        return int(self.spec.nbytes(shape)) + SEED_BYTES

    def advice(self, shape: tuple[int, ...]) -> str | None:
        """The inner spec's advice, if any."""
        fn = getattr(self.spec, "advice", None)
        return fn(shape) if fn is not None else None


_spec.register_spec(Rotated)
