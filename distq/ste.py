"""Quantisation-aware training: quantise-dequantise with a straight-through gradient."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from . import planning as _plan
from .core import spec as _spec
from .core.qarray import QArray
from .prune import apply_masks


def representable_range(q: QArray) -> tuple[jax.Array, jax.Array]:
    """Per element, the smallest and largest value ``q``'s codebook can reproduce.

    Examples:
      >>> import jax.numpy as jnp, distq
      >>> from distq.ste import representable_range
      >>> q = distq.quantize(jnp.array([-2.0, 0.5, 1.0, 2.0]), distq.Uniform(bits=4))
      >>> lo, hi = representable_range(q)  # symmetric: -absmax..absmax everywhere
      >>> lo.tolist(), hi.tolist()
      ([-2.0, -2.0, -2.0, -2.0], [2.0, 2.0, 2.0, 2.0])
    """
    s = q.scale.astype(jnp.float32)
    levels = q.levels()
    lo_c, hi_c = jnp.min(levels), jnp.max(levels)
    a, b = s * lo_c, s * hi_c
    lo, hi = jnp.minimum(a, b), jnp.maximum(a, b)
    if q.loc is not None:
        lo, hi = lo + q.loc.astype(jnp.float32), hi + q.loc.astype(jnp.float32)
    return q.per_value(lo), q.per_value(hi)


def fake_quantize(x: jax.Array, spec, clip: bool = True) -> jax.Array:
    """Quantise-dequantise with a straight-through gradient (for quantisation-aware training).

    The forward value is exactly ``quantize(x, spec).dequantize()``; the gradient with respect
    to ``x`` is the identity (straight-through), zeroed where ``x`` lies outside the range the
    codebook can reproduce when ``clip`` is set (those values are clipped, so moving them a little
    changes nothing). Jittable; the codebook/scales are refitted on every call (no gradient
    flows through the fit).

    Non-finite values (NaN, ±inf) follow :func:`distq.quantize`'s policy under ``jit`` or
    ``vmap``: they are left out of the statistics and the fit, so every finite value comes out
    exactly as it would without them (however many there are), they come out as NaN, and their
    gradient is 0. Where the values reach the quantiser concretely (no ``jit``/``vmap``;
    ``grad`` alone does not trace them) they raise a ``ValueError``, as ``quantize`` does.

    Examples:
      >>> import jax, jax.numpy as jnp, distq
      >>> x = jax.random.normal(jax.random.key(0), (64, 64))
      >>> y = distq.fake_quantize(x, distq.Uniform(bits=4))
      >>> bool(jnp.all(y == distq.quantize(x, distq.Uniform(bits=4)).dequantize()))
      True
      >>> float(jax.grad(lambda x: distq.fake_quantize(x, distq.Uniform(bits=4)).sum())(x).mean())
      1.0
    """
    _spec.check_spec(spec)
    if getattr(spec, "randomized", False):
        raise ValueError(f"fake_quantize does not support {type(spec).__name__} specs (a fit "
                         "per step); use the product-quantised layers of distq.nn, whose "
                         "codebooks train directly")
    x = jnp.asarray(x)
    xs = jax.lax.stop_gradient(x)
    q = spec.resolve(tuple(xs.shape)).quantize(xs)
    if isinstance(q, QArray):
        # every finite value decoded (a group that held non-finite values is marked by the sign
        # of its scale: its magnitude decodes the rest); NaN exactly where x is not finite
        q = dataclasses.replace(q, scale=jnp.abs(q.scale))
    xq = jnp.where(jnp.isfinite(xs), q.dequantize(x.dtype), jnp.nan).astype(x.dtype)
    xq = jax.lax.stop_gradient(xq)
    if not clip or not isinstance(q, QArray):
        mask = jax.lax.stop_gradient(jnp.isfinite(xs).astype(x.dtype))  # non-finite: 0
        return xq + mask * jnp.where(jnp.isfinite(xs), x - xs, 0.0).astype(x.dtype)
    lo, hi = representable_range(q)
    mask = jax.lax.stop_gradient(((xs >= lo) & (xs <= hi)).astype(x.dtype))
    return xq + mask * jnp.where(mask > 0, x - xs, 0.0).astype(x.dtype)


def fake_quantize_tree(params, rules: _plan.Rules, *, clip: bool = True, masks=None):
    """:func:`fake_quantize` on every leaf a rule maps to a spec (others unchanged).

    ``masks`` (a tree like ``params`` with boolean arrays or ``None``, e.g. from
    :func:`prune_magnitude`) is applied first, so pruned weights stay exactly zero in the
    forward pass. Differentiable and jittable (rules are static Python objects).

    Examples:
      >>> import jax, jax.numpy as jnp, distq
      >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 64)), "b": jnp.ones(64)}
      >>> rules = [("w", distq.Uniform(bits=4)), ("b", None)]
      >>> fq = distq.fake_quantize_tree(params, rules)
      >>> bool((fq["w"] == distq.quantize(params["w"], distq.Uniform(bits=4)).dequantize()).all())
      True
      >>> g = jax.grad(lambda p: distq.fake_quantize_tree(p, rules)["w"].sum())(params)
      >>> float(g["w"].mean())  # straight through
      1.0

      With pruning masks, pruned weights stay zero:

      >>> pruned, masks = distq.prune_magnitude(params, 0.5)
      >>> fq = distq.fake_quantize_tree(params, rules, masks=masks)
      >>> bool((fq["w"][~masks["w"]] == 0).all())
      True
    """
    if masks is not None:
        params = apply_masks(params, masks)
    p = _plan.plan(params, rules).check()
    leaves, treedef = _plan.leaves_with_paths(params)
    out = [leaf if r.spec is None else fake_quantize(leaf, r.spec, clip)
           for (_, leaf), r in zip(leaves, p.leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)
