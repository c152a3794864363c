"""Input validation shared by the public entry points (private)."""

from __future__ import annotations

import math
import numbers

import numpy as np


def is_concrete(x) -> bool:
    """``False`` for values that are being traced (inside ``jit``/``vmap``)."""
    import jax  # noqa: PLC0415 (specs validate their fields without JAX)

    return not isinstance(x, jax.core.Tracer)


def dtype_name(x) -> str:
    """The name of ``x``'s dtype as the caller made it (``"float64"`` for a NumPy float64 array,
    which JAX without ``jax_enable_x64`` holds as float32); ``"float32"`` for Python numbers."""
    if isinstance(x, (list, tuple, numbers.Number)):
        return "float32"
    dt = np.dtype(getattr(x, "dtype", np.float32))
    return str(dt if dt.isnative else dt.newbyteorder("="))  # big-endian data decodes native


def check_float32_range(x, name: str = "x"):
    """Refuses a concrete wide-float (float64) array that float32 cannot hold: non-finite values,
    magnitudes beyond float32's largest number, non-zero ones that would round to 0 in float32.
    Returns ``x`` as float32 (NumPy) when JAX runs without ``jax_enable_x64``, else ``x``.

    distq represents every value in float32 (about 7 significant digits: far finer than any
    quantisation grid); float16/bfloat16/float32 inputs convert exactly and are not checked.
    """
    import jax  # noqa: PLC0415

    dt = np.dtype(getattr(x, "dtype", np.float32))
    if dt.itemsize <= 4 or not np.issubdtype(dt, np.floating) or not is_concrete(x):
        return x
    a = np.asarray(x)
    finite = np.isfinite(a)
    if not finite.all():
        raise ValueError(
            f"{name} contains {int((~finite).sum())} NaN/inf value(s); quantisation needs finite "
            "input (mask or replace them first)")
    with np.errstate(over="ignore", under="ignore"):
        y = a.astype(np.float32)
    over = np.isinf(y)
    if over.any():
        raise ValueError(
            f"{name} ({dt}) has {int(over.sum())} value(s) beyond float32's range (largest "
            f"magnitude {float(np.abs(a).max()):.3g} > {F32_MAX:.4g}); distq represents values in "
            "float32: scale the array down first")
    under = (y == 0) & (a != 0)
    if under.any():
        raise ValueError(
            f"{name} ({dt}) has {int(under.sum())} non-zero value(s) below float32's range "
            f"(smallest magnitude {float(np.abs(a[under]).min()):.3g} < 1.4e-45, which would "
            "become 0); distq represents values in float32: set them to 0 or scale the array up")
    return a if jax.config.jax_enable_x64 else y


def as_float_array(x, name: str = "x") -> jax.Array:
    """Converts to a JAX array and checks dtype, emptiness, (when concrete) finiteness and, for
    float64 input, that float32 can hold its values (:func:`check_float32_range`)."""
    import jax  # noqa: PLC0415 (specs validate their fields without JAX)
    import jax.numpy as jnp  # noqa: PLC0415
    import ml_dtypes  # noqa: PLC0415

    if hasattr(x, "__array_namespace__") or isinstance(x, (np.ndarray, jax.Array)):
        pass
    elif isinstance(x, (list, tuple, numbers.Number)):
        x = np.asarray(x)
    elif hasattr(x, "numpy") and hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    elif hasattr(x, "__array__"):
        x = np.asarray(x)
    else:
        raise TypeError(f"{name} must be an array of floats (NumPy, JAX, torch, or nested "
                        f"lists of numbers), got {type(x).__name__}")
    if isinstance(x, np.ndarray) and not x.dtype.isnative:  # big-endian data: JAX has none
        x = x.astype(x.dtype.newbyteorder("="))
    dt = np.dtype(getattr(x, "dtype", np.float32))
    if not np.issubdtype(dt, np.floating) and dt != ml_dtypes.bfloat16:
        raise TypeError(f"{name} must have a floating-point dtype, got {dt}")
    if int(np.prod(np.shape(x))) == 0:
        raise ValueError(f"{name} is empty (shape {tuple(np.shape(x))}); nothing to quantise")
    arr = jnp.asarray(check_float32_range(x, name))
    if is_concrete(arr) and not bool(jnp.all(jnp.isfinite(arr))):
        bad = int(jnp.sum(~jnp.isfinite(arr)))
        raise ValueError(
            f"{name} contains {bad} NaN/inf value(s); quantisation needs finite input "
            "(mask or replace them first)"
        )
    return arr


def check_bits(bits, name: str = "bits", lo: int = 1, hi: int = 16) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"{name} must be an int in {lo}..{hi}, got {bits!r}")
    if not lo <= int(bits) <= hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {bits}")
    return int(bits)


def check_int(value, name: str, lo: int, hi: int | None = None) -> int:
    """An int (not a bool) in ``lo..hi`` (``hi=None``: no upper bound), else a clear error."""
    span = f">= {lo}" if hi is None else f"in {lo}..{hi}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int {span}, got {shown(value)}")
    if hi is not None and value > hi:
        raise ValueError(f"{name}={shown(value)} is out of range (at most {hi})")
    if value < lo:
        raise ValueError(f"{name} must be {span}, got {shown(value)}")
    return int(value)


def shown(value, limit: int = 40) -> str:
    """``repr(value)`` for an error message, clipped: a pasted 4000-digit number stays short
    (and one beyond Python's int-to-text limit still prints)."""
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4300 digits
        return f"an int of about {int(value.bit_length() * 0.30103) + 1} digits"
    if len(text) <= limit:
        return text
    if isinstance(value, (int, np.integer)):
        return f"{text[:20]}...({len(text.lstrip('-'))} digits)"
    return f"{text[:limit - 16]}...({len(text)} characters)"


def check_choice(value, name: str, allowed) -> None:
    """``value`` is one of ``allowed`` (strings: a non-string is refused, never compared)."""
    strings = all(isinstance(a, str) for a in allowed)
    if (strings and not isinstance(value, str)) or value not in allowed:
        raise ValueError(f"{name}={shown(value)} is not allowed; choose one of "
                         f"{sorted(map(str, allowed))}")


#: the largest int a spec field may hold where it reaches jitted code (JAX's default int32)
INT32_MAX = 2**31 - 1


def check_bool(value, name: str) -> bool:
    """``True`` or ``False`` (NumPy's too), else a ``TypeError``: a truthy string such as
    ``"no"`` or a number must not pass for ``True``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {shown(value)}")
    return bool(value)


def check_float(value, name: str, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False) -> float:
    """A finite real number (an int or a float, not a bool) in ``[lo, hi]`` (``(lo, hi]`` with
    ``lo_open``; ``None``: no bound), else a clear error (``TypeError`` for a non-number,
    ``ValueError`` for NaN, infinity or a value out of range).

    Examples:
      >>> check_float(0.5, "tol", 0.0)
      0.5
      >>> check_float(float("nan"), "tol", 0.0)
      Traceback (most recent call last):
        ...
      ValueError: tol must be a finite number >= 0.0, got nan
    """
    if lo is not None and hi is not None:
        span = f" in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    elif lo is not None:
        span = f" {'>' if lo_open else '>='} {lo}"
    else:
        span = "" if hi is None else f" <= {hi:g}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number{span}, got {shown(value)}")
    try:
        v = float(value)
    except OverflowError:  # an int beyond float's range
        v = math.inf
    if (not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo))
            or (hi is not None and v > hi)):
        raise ValueError(f"{name} must be a finite number{span}, got {shown(value)}")
    return v


#: ``beta`` (a range factor in standard deviations; the searches' grids span 0.001..1000)
BETA_RANGE = (1e-6, 1e6)


def check_beta(beta, name: str = "beta") -> float:
    """A finite ``beta`` in :data:`BETA_RANGE`."""
    return check_float(beta, name, *BETA_RANGE)


def check_zero(zero, name: str = "zero") -> float:
    """A value to reproduce exactly: 0, or a finite magnitude that float32 holds as a normal
    number (XLA:CPU flushes smaller ones to 0; larger ones overflow)."""
    v = check_float(zero, name, -F32_MAX, F32_MAX)
    if v != 0 and abs(v) < F32_TINY:
        raise ValueError(f"{name} must be 0 or of magnitude >= {F32_TINY:.4g} (float32's "
                         f"smallest normal number), got {zero!r}")
    return v


# ------------------------------------------------------------------------ float32 magnitudes
# distq computes in float32 on XLA, which flushes subnormal numbers (below 2**-126) to zero in
# arithmetic: a statistic, division or square near either end of float32's range silently
# loses everything. The helpers below keep work in the normal range: a group's values are
# scaled by a power of two (exactly, subnormal values included, by integer operations on their
# bits) so that its largest magnitude lies in [1, 2), and results are scaled back the same way.
F32_TINY = 2.0 ** -126  # float32's smallest normal number
F32_MAX = float(np.finfo(np.float32).max)


def pow2(e):
    """``2.0 ** e`` as float32 for int32 ``e`` in -126..127 (its bits, no arithmetic)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    return jax.lax.bitcast_convert_type((e + 127) << 23, jnp.float32)


def exponent_of_bits(b):
    """``floor(log2 v)`` of the non-negative float32 whose bits are the int32 ``b`` (0 for 0)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    e_field = b >> 23
    subnormal = (31 - jax.lax.clz(b)) - 149  # b is the mantissa: v = b * 2**-149
    return jnp.where(b == 0, 0, jnp.where(e_field > 0, e_field - 127, subnormal))


def exponent(v):
    """``floor(log2 |v|)`` of finite float32 values, subnormal ones included (0 for 0).

    Examples:
      >>> import numpy as np
      >>> from distq.core._checks import exponent
      >>> exponent(np.array([1.0, 3.0, 0.3, 3e38, 1e-40, 0.0], np.float32)).tolist()
      [0, 1, -2, 127, -133, 0]
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    b = jax.lax.bitcast_convert_type(jnp.asarray(v, jnp.float32), jnp.int32) & 0x7FFFFFFF
    return exponent_of_bits(b)


def max_exponent(v, axis=-1):
    """``floor(log2 max |v|)`` along ``axis`` (0 where all are 0), exact for subnormal values:
    the maximum is taken on the bits (ordered like the magnitudes), not by float comparisons,
    which treat subnormal numbers as 0. ``v`` must be finite (mask non-finite values first)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    b = jax.lax.bitcast_convert_type(jnp.asarray(v, jnp.float32), jnp.int32) & 0x7FFFFFFF
    return exponent_of_bits(jnp.max(b, axis=axis))


def ldexp(x, e):
    """``x * 2**e`` for float32 ``x`` and int32 ``e`` (broadcast together), exact wherever the
    result is a normal number, subnormal ``x`` included (``jnp.ldexp`` and plain products
    see a subnormal ``x`` as 0 on XLA:CPU); results below the normal range become 0, above it
    ±inf.

    Examples:
      >>> import numpy as np
      >>> from distq.core._checks import ldexp
      >>> ldexp(np.array([1e-40, 3.0, -3e38, 1.5], np.float32),
      ...       np.array([140, -2, -200, 0], np.int32)).tolist()
      [139.37890625, 0.75, -1.8669045867796043e-22, 1.5]
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    x = jnp.asarray(x, jnp.float32)
    e = jnp.asarray(e, jnp.int32)
    b = jax.lax.bitcast_convert_type(x, jnp.int32)
    mant = (b & 0x7FFFFF).astype(jnp.float32)  # exact: fewer than 24 bits
    sub = (b & 0x7F800000) == 0
    # a subnormal x is its mantissa (a normal number, >= 1) times 2**-149
    x = jnp.where(sub, jnp.where(b < 0, -mant, mant), x)
    e = jnp.clip(jnp.where(sub, e - 149, e), -378, 381)
    # three factors of the same sign, each a normal power of two: the running product is
    # monotonic, so it over- or underflows only where the result does
    e1 = e // 3 + (e % 3 != 0).astype(jnp.int32) * (e < 0).astype(jnp.int32)  # toward 0
    e2 = (e - e1) // 2 + ((e - e1) % 2 != 0).astype(jnp.int32) * (e < 0).astype(jnp.int32)
    return x * pow2(e1) * pow2(e2) * pow2(e - e1 - e2)
