"""The :class:`VQ` spec: trellis-coded vector quantisation, configured without JAX.

Frozen and hashable (a static ``jax.jit`` argument), validated when constructed, and free of JAX
like :mod:`distq.core.specs`: it can be built, compared and parsed from text (``vq:2``,
``vq:3,state_bits=14``) before JAX is loaded. Its quantiser and leaf type
(:class:`distq.VQArray`) live in :mod:`distq.core.vq`, registered there.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from . import _checks
from . import spec as _spec
from .specs import AUTO, INPUT_AXIS

_SCALES = ("channel", "tensor")
INPUT_POWER = 0.6  # the automatic input_scales exponent
CODE_BUDGET = 0.25  # bits per weight beyond `bits` that the automatic boost may bring codes to
_SCALE_DTYPES = ("float32", "float16", "bfloat16")
MAX_BITS = 4  # bits per value the trellis supports (2**bits branches per state)
MAX_STATE_BITS = 16
WEIGHT_STATE_BITS = 14  # the automatic state length for a model weight


def default_state_bits(bits: int, weight: bool = False) -> int:
    """The trellis' state bits ``L`` used when ``state_bits=None``: 12 for a plain array,
    ``WEIGHT_STATE_BITS = 14`` for a weight (an ``input_axis``), whatever the width.

    Viterbi encoding costs about ``2**L`` operations per value whatever ``bits`` is, so one ``L``
    fits one time budget; 12 puts a Gaussian source within 0.5 / 0.75 / 1.0 / 1.35 dB of the
    distortion-rate bound at 1 / 2 / 3 / 4 bits, 14 within 0.58 / 0.76 / 0.94 dB at 2 / 3 / 4
    bits for about 4x the time (2.4 against 10 µs per value on 2 CPU cores).
    """
    del bits
    return WEIGHT_STATE_BITS if weight else 12


def symbols_per_state(bits: int, state_bits: int) -> int:
    """Symbols that a state's ``state_bits`` bits touch (the oldest may be partly outside)."""
    return -(-state_bits // bits)


def tail_window(bits: int, state_bits: int) -> int:
    """Values on each side of a block's wrap point that the first, unconstrained Viterbi pass of
    tail-biting encoding looks at (about three state lengths, at least 16)."""
    return max(16, 3 * symbols_per_state(bits, state_bits))


def min_block(bits: int, state_bits: int) -> int:
    """The shortest block (values) that a tail-biting trellis of ``state_bits`` can code: its
    bits must hold one state."""
    return symbols_per_state(bits, state_bits)


@dataclasses.dataclass(frozen=True)
class VQ:
    """Trellis-coded vector quantisation at a fixed rate of ``bits`` per value.

    The values are cut into blocks of about ``block`` consecutive values; each block is coded as
    one path through a "bitshift" trellis (Mao-Gray; Tseng et al.'s QTIP): a state is the last
    ``state_bits`` bits of the block's code stream, each value shifts ``bits`` new bits in, and
    the value's reconstruction is a fixed pseudo-random Gaussian number computed from the state
    (:func:`distq.core.vq.code_table`). A Viterbi search finds the path closest to the block in
    squared error; the trellis is tail-biting (the stream is read cyclically), so a block costs
    exactly ``bits`` bits per value. This beats any scalar quantiser: on a Gaussian source it
    lands about 0.7 / 1.0 / 1.35 dB above the distortion-rate bound at 2 / 3 / 4 bits, where
    Lloyd-Max is 2.7 / 3.5 / 3.9 dB above it.

    The code is Gaussian, so weights are first made Gaussian-like: for a model weight (a
    ``role``, see :meth:`resolve`) each input channel is scaled to unit root-mean-square, the
    input axis is rotated by random signs and an orthogonal Hadamard-type transform
    (:func:`distq.core.hadamard.rotate`, undone when decoding; its seed is stored), and each
    output channel gets its own scale.

    Attributes:
      bits: bits per value, 1..4.
      state_bits: the trellis' state length ``L`` (``2 * bits`` to 16); encoding costs about
        ``2**L`` operations per value. ``None``: 14 for a weight (``input_axis`` set), where
        a better code is worth 4x the encoding time (MiniLM, every matrix at 3 bits: cosine
        0.951 against 0.947 at 12), else 12 (:func:`default_state_bits`).
      block: target values per trellis block (blocks tile each coded row in near-equal lengths);
        longer blocks lose less to the tail-biting constraint, shorter ones vectorise better.
      input_axis: the weight's input (contracted) axis, rotated and never scaled; the sequences
        run along the other axes. ``None``: a plain array, coded in its flattened order with one
        scale. ``"auto"`` (default): from the role (see :meth:`resolve`).
      rotate: rotate the input axis (only where ``input_axis`` is set).
      scales: "channel" (one scale per index of the non-input axes, applied after the
        rotation) or "tensor" (one scale); ``"auto"``: channel scales for a weight when they fit
        the budget (see :meth:`resolve`).
      input_scales: an exponent ``a`` in (0, 2]: each input channel is divided by its
        root-mean-square to the power ``a`` before the rotation (and multiplied back after
        decoding; the factors are stored), so that the channel's error grows as that power of
        its size (``1``: the same relative error everywhere; ``0.6``, the default, measured best
        on MiniLM). Needs ``input_axis``. ``None``: off; ``"auto"``: ``0.6`` for a weight, when
        it fits the budget.
      scale_dtype: storage dtype of the scales; ``"auto"``: bfloat16 for channel scales,
        float32 for one scale per tensor.
      boost: the fraction (0..1) of the output channels (the indices of the non-input axes)
        coded with ``bits + 1`` bits: the ones of largest root-mean-square, which a
        squared-error bit allocation favours (each extra bit divides a value's error by about 4,
        so it gains most where the values are largest); which ones is stored as a bit mask.
        Needs ``input_axis``. ``"auto"``: what the budget leaves for a weight, up to ``bits +
        1/4`` bits per value in all (see :meth:`resolve`), 0 for a plain array.

    Examples:
      >>> import jax, distq
      >>> x = jax.random.normal(jax.random.key(0), (4096,))
      >>> q = distq.quantize(x, distq.VQ(bits=2))
      >>> q.bits_per_value  # 2-bit codes and one float32 scale
      2.0078125
      >>> float(((q.dequantize() - x) ** 2).mean() / x.var()) < 0.08  # Lloyd-Max: 0.1175
      True
      >>> distq.spec_str(distq.VQ(bits=3, state_bits=15))
      'vq:3,state_bits=15'
    """

    kind: ClassVar[str] = "vq"
    positional: ClassVar[tuple[str, ...]] = ("bits",)
    randomized: ClassVar[bool] = True  # the rotation's signs come from the key
    rotates_itself: ClassVar[bool] = True  # input_axis= rotates: distq.Rotated refuses it

    bits: int = 2
    state_bits: int | None = None
    block: int = 256
    input_axis: int | str | None = AUTO
    rotate: bool = True
    scales: str = AUTO
    input_scales: float | str | None = AUTO
    scale_dtype: str = AUTO
    boost: float | str = AUTO

    def __post_init__(self):
        _checks.check_bits(self.bits, "bits", 1, MAX_BITS)
        if self.state_bits is not None:
            _checks.check_int(self.state_bits, "state_bits", 1, MAX_STATE_BITS)
            if self.state_bits < 2 * self.bits:
                raise ValueError(f"state_bits must be at least 2 * bits = {2 * self.bits}, got "
                                 f"{self.state_bits}")
        _checks.check_int(self.block, "block", 1, 1 << 20)
        if not (isinstance(self.input_axis, str) and self.input_axis == AUTO) and (
                self.input_axis is not None):
            _checks.check_int(self.input_axis, "input_axis", -64, 63)
        _checks.check_bool(self.rotate, "rotate")
        _checks.check_choice(self.scales, "scales", (AUTO, *_SCALES))
        if not (isinstance(self.input_scales, str) and self.input_scales == AUTO) and (
                self.input_scales is not None):
            _checks.check_float(self.input_scales, "input_scales", 0.0, 2.0, lo_open=True)
        _checks.check_choice(self.scale_dtype, "scale_dtype", (AUTO, *_SCALE_DTYPES))
        if not (isinstance(self.boost, str) and self.boost == AUTO):
            _checks.check_float(self.boost, "boost", 0.0, 1.0)

    @property
    def L(self) -> int:  # noqa: N802 (the trellis literature's name)
        """The state length in bits (``state_bits`` or its default)."""
        return default_state_bits(self.bits) if self.state_bits is None else self.state_bits

    # ---------------------------------------------------------------- spec protocol
    def quantize(self, x: Any, *, key: Any = None) -> Any:
        """Codes ``x`` to a :class:`distq.VQArray` (``key``: the rotation's random signs,
        ``jax.random.key(0)`` when ``None``)."""
        return _spec.quantizer(type(self))(x, self, key)

    def quantize_calibrated(self, x: Any, gram: tuple[int, Any], *, damp: float = 0.01,
                            key: Any = None) -> Any:
        """Codes matrix ``x`` minimising the error of its product with the inputs summarised by
        ``gram = (contracted_axis, H)`` (LDLQ; see :func:`distq.core.vq.quantize_ldlq`).
        :func:`distq.calibrate.quantize_calibrated` calls it for calibrated trees."""
        return _spec.quantizer(type(self))(x, self, key, gram=gram, damp=damp)

    def resolve(self, shape: tuple[int, ...], role: str | None = None) -> "VQ":
        """The concrete spec (no ``"auto"`` field) for an array of ``shape``.

        ``role`` says what the array is (see :meth:`distq.Scalar.resolve`): ``None`` for a plain
        array (coded in its flattened order with one float32 scale, no rotation), or a model
        weight of ``ndim >= 2``: its input axis follows the role's convention (``"kernel"``,
        ``"weight"``, ``"embedding"``; the last axis for ``"matrix"``) and is rotated. Scales
        (bfloat16) spend at most ``bits / 16`` bits per value with the rotation's seed and the
        codes' last word, like the automatic budget of :class:`distq.Scalar`: one per output
        channel (index of the other axes) if they fit, else one float32 scale for the tensor,
        then one per input channel if they fit too. Codes may spend more: the output channels
        of largest root-mean-square get one more bit (``boost``, their mask counted), as many
        as bring the whole array to ``bits + max(bits / 16, 1/4)`` bits per value
        (``CODE_BUDGET``, the issue's MiniLM budget of ``k + 1/4``). A weight's trellis has
        ``WEIGHT_STATE_BITS`` (14) state bits unless ``state_bits`` is set.

        Examples:
          >>> import distq
          >>> spec = distq.VQ(bits=2).resolve((384, 1536), "weight")
          >>> spec.input_axis, spec.scales, spec.input_scales, round(spec.boost, 3)
          (1, 'channel', 0.6, 0.195)
          >>> round(8 * spec.nbytes((384, 1536)) / (384 * 1536), 3)  # bits per weight
          2.248
        """
        ndim, size = len(shape), math.prod(shape)
        axis = self.input_axis
        if axis == AUTO:
            axis = None
            if role is not None and ndim >= 2 and size > 0:
                axis = INPUT_AXIS[role](ndim) if role in INPUT_AXIS else ndim - 1
        weight = axis is not None and -ndim <= axis < ndim and size > 0
        L = default_state_bits(self.bits, weight) if self.state_bits is None else self.state_bits
        dt = 16 if self.scale_dtype in (AUTO, "bfloat16", "float16") else 32
        budget = self.bits / 16 * size - 32 * (1 + self.rotate)  # bits beyond: seed, last word
        scales = self.scales
        if scales == AUTO:
            scales = "channel" if weight and dt * (size // shape[axis]) <= budget else "tensor"
        if weight and scales == "channel":
            budget -= dt * (size // shape[axis])
        input_scales = self.input_scales
        if input_scales == AUTO:
            input_scales = INPUT_POWER if weight and dt * shape[axis] <= budget else None
        if weight and input_scales is not None:
            budget -= dt * shape[axis]
        scale_dtype = self.scale_dtype
        if scale_dtype == AUTO:
            scale_dtype = ("bfloat16" if scales == "channel" or input_scales is not None
                           else "float32")
        boost = self.boost
        if boost == AUTO:
            boost = 0.0
            cols = size // shape[axis] if weight else 0
            if weight and L >= 2 * (self.bits + 1) and cols >= min_block(self.bits, L):
                budget += max(0.0, CODE_BUDGET - self.bits / 16) * size  # codes: to k + 1/4
                # each boosted channel costs an input axis' bits; the mask and a last word
                hc = int(max(budget - 32 - 32 * -(-cols // 32), 0) // shape[axis])
                boost = min(hc, cols) / cols
        return dataclasses.replace(self, state_bits=L, input_axis=axis, scales=scales,
                                   input_scales=input_scales, scale_dtype=scale_dtype,
                                   boost=boost)

    def problem(self, shape: tuple[int, ...]) -> str | None:
        """Why an array of ``shape`` cannot take this spec (or ``None``)."""
        size = math.prod(shape)
        if size == 0:
            return "the array is empty"
        spec = self.resolve(shape)
        need = min_block(spec.bits, spec.L)
        if size < need:
            return (f"a trellis with state_bits={spec.L} needs at least {need} values at "
                    f"bits={spec.bits}, got {size}")
        axis = spec.input_axis
        if axis is not None and not -len(shape) <= axis < len(shape):
            return f"input_axis={axis} is out of range for an array of rank {len(shape)}"
        if spec.input_scales is not None and axis is None:
            return "input_scales needs an input_axis"
        if spec.boost and axis is None:
            return "boost needs an input_axis"
        if spec.boost and spec.L < 2 * (spec.bits + 1):
            return f"boost codes with {spec.bits + 1} bits: it needs state_bits >= " \
                   f"{2 * (spec.bits + 1)}"
        return None

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Stored bytes of the VQArray for ``shape``: packed codes, scales, the rotation's
        seed (a uint32)."""
        spec = self.resolve(shape)
        item = 2 if spec.scale_dtype in ("bfloat16", "float16") else 4
        size, hc = math.prod(shape), boost_cols(spec, shape)
        n_in = 1 if spec.input_axis is None else shape[spec.input_axis]
        cols = size // n_in
        codes = 4 * (-(-(size - hc * n_in) * spec.bits // 32)
                     + -(-hc * n_in * (spec.bits + 1) // 32) + (-(-cols // 32) if hc else 0))
        n_scaled = 0 if spec.input_scales is None else n_in
        return codes + item * (num_scales(spec, shape) + n_scaled) + (4 if rotates(spec) else 0)


def boost_cols(spec: VQ, shape: tuple[int, ...]) -> int:
    """Output channels (columns of the coded matrix) that a resolved spec codes with ``bits +
    1`` bits: none unless the input channels are coded alone (rows of at least one block), and
    each of the two streams is empty or at least one block long."""
    if spec.input_axis is None or not spec.boost:
        return 0
    cols = math.prod(shape) // shape[spec.input_axis]
    lo_min, hi_min = min_block(spec.bits, spec.L), min_block(spec.bits + 1, spec.L)
    if cols < lo_min:
        return 0
    hc = min(cols, int(spec.boost * cols + 0.5))
    if 0 < cols - hc < lo_min:
        hc = cols - lo_min
    return hc if hc >= hi_min else 0


def rotates(spec: VQ) -> bool:
    """Whether a resolved spec rotates (a weight's input axis, ``rotate=True``)."""
    return spec.input_axis is not None and spec.rotate


def num_scales(spec: VQ, shape: tuple[int, ...]) -> int:
    """Scales stored for an array of ``shape`` by a resolved spec."""
    if spec.scales != "channel" or spec.input_axis is None:
        return 1
    return math.prod(shape) // shape[spec.input_axis]


_spec.register_spec(VQ)
