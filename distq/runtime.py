"""Quantised execution: run a model from its quantised tree, each weight decoded where it is used.

``distq.quantized_apply(apply_fn)`` turns ``apply_fn(params, *args)``, any pure JAX function of a
float parameter tree (a Flax linen ``model.apply``, an nnx ``merge``-and-call, plain ``jnp`` code
over a dict), into ``g(qparams, *args)`` with the same result as
``apply_fn(distq.dequantize_tree(qparams), *args)``, without a change to the model and without
holding every decoded weight at once. distq traces ``apply_fn`` to a jaxpr (the quantised leaves
stand in as abstract arrays of their decoded shape) and evaluates it equation by equation with
the quantised leaves kept as they are (:mod:`distq._jaxpr`), following them through transposes,
casts and nested ``jit`` calls. Where a leaf is used:

* an **embedding lookup** (a ``gather`` of whole rows) decodes only the rows it reads
  (``leaf.take(rows)``); a ``slice`` decodes only the slice;
* a **matrix product** (``dot_general``) decodes the weight just before it; a weight whose
  decoded size exceeds ``tile_bytes`` is decoded tile by tile along one of its output axes
  (``leaf.dequantize_slice``), each tile multiplied as soon as it is decoded, in a loop, so that
  the program holds one tile instead of the whole matrix;
* anything else decodes the whole leaf there (``leaf.dequantize()``).

Every decode is made to depend on the data it meets (:func:`after`) so that XLA cannot hoist all
decodes to the start of the program (which would hold every decoded weight at once, as
``dequantize_tree`` inside ``jit`` does). The result works under ``jit``, ``vmap`` over the
inputs and ``grad`` with respect to the inputs and to the float arrays of the quantised tree
(codebooks, scales: QAT of codebooks, see :func:`distq.partition`).

Leaf types plug in through the leaf protocol (:mod:`distq.core.leaf`): ``dequantize(dtype)``
and ``take(rows, dtype)`` are required; ``dequantize_slice(start, size, axis, dtype)`` (the
decoded values ``[start, start + size)`` along ``axis``, ``start`` possibly traced, ``size``
static) is optional and enables tiled products, along the axes in the leaf's optional
``slice_axes`` (all axes when absent).

Examples:
  >>> import jax, jax.numpy as jnp, distq
  >>> k1, k2 = jax.random.split(jax.random.key(0))
  >>> params = {"emb": jax.random.normal(k1, (1000, 64)), "w": jax.random.normal(k2, (64, 64))}
  >>> def apply_fn(p, ids):
  ...     return jnp.tanh(p["emb"][ids] @ p["w"]).sum(-1)
  >>> q, _ = distq.quantize_tree(params, distq.Scalar(bits=4))
  >>> ids = jnp.array([[3, 14, 159], [2, 6, 535]])
  >>> y = jax.jit(distq.quantized_apply(apply_fn))(q, ids)
  >>> bool(jnp.allclose(y, apply_fn(distq.dequantize_tree(q), ids), atol=1e-4))
  True

  The decoded embedding table is never built: the compiled program is smaller than the float
  table alone.

  >>> c = jax.jit(distq.quantized_apply(apply_fn)).lower(q, ids).compile()
  >>> m = c.memory_analysis()
  >>> m.argument_size_in_bytes + m.temp_size_in_bytes < params["emb"].nbytes
  True
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _jaxpr
from ._jaxpr import Interpreter, Tracked
from .core import spec as _spec

#: up to this many tiles a product is unrolled (straight-line code); more run in a loop
_UNROLL = 16



@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """How :func:`quantized_apply` decodes.

    Attributes:
      tile_bytes: a weight whose decoded size exceeds this many bytes is decoded in tiles of at
        most this size inside a matrix product (``None``: never tile).
      ordered: make each decode depend on the activations it meets (:func:`after`) so XLA
        decodes each weight just before its use; turn off only to measure what it buys.
      gather_rows: decode only the rows an embedding lookup reads.

    Examples:
      >>> RuntimeOptions(tile_bytes=1 << 20).tile_bytes
      1048576
      >>> RuntimeOptions(tile_bytes=0)
      Traceback (most recent call last):
        ...
      ValueError: tile_bytes must be a positive int or None, got 0
    """

    tile_bytes: int | None = 4 << 20
    ordered: bool = True
    gather_rows: bool = True

    def __post_init__(self):
        tb = self.tile_bytes
        if tb is not None and (isinstance(tb, bool) or not isinstance(tb, (int, np.integer))
                               or tb < 1):
            raise ValueError(f"tile_bytes must be a positive int or None, got {tb!r}")


def quantized_apply(apply_fn: Callable, *, tile_bytes: int | None = 4 << 20,
                    ordered: bool = True, gather_rows: bool = True,
                    jit: bool = True) -> Callable:
    """``g(qparams, *args, **kwargs) == apply_fn(dequantize_tree(qparams), *args, **kwargs)``,
    each quantised leaf decoded where it is used (see the module docstring).

    Args:
      apply_fn: a pure JAX function of a float parameter tree and arrays.
      tile_bytes, ordered, gather_rows: see :class:`RuntimeOptions`.
      jit: called outside any JAX transformation, ``g`` compiles itself (once per input
        structure and hashable ``kwargs``) and runs compiled; ``False`` evaluates the
        equations one by one instead (slow: every operation is dispatched on its own).

    Returns:
      ``g(qparams, *args, **kwargs)``: ``qparams`` is the tree of :func:`distq.quantize_tree`
      (quantised leaves and plain arrays); ``args`` are pytrees of arrays (traced);
      ``kwargs`` are passed to ``apply_fn`` as they are (static, like ``train=False``).
      Under ``jit``, ``vmap`` or ``grad`` it runs inline (traced once per compilation).

    Examples:
      A Flax linen model, run from its quantised variables:

      >>> import jax, jax.numpy as jnp, flax.linen as nn, distq
      >>> model = nn.Sequential([nn.Dense(256), nn.relu, nn.Dense(10)])
      >>> x = jnp.ones((4, 128))
      >>> variables = model.init(jax.random.key(0), x)
      >>> qvars, _ = distq.quantize_tree(variables, [(".*kernel", distq.Scalar(bits=4)),
      ...                                            (".*", None)])
      >>> g = jax.jit(distq.quantized_apply(model.apply))
      >>> want = model.apply(distq.dequantize_tree(qvars), x)
      >>> bool(jnp.allclose(g(qvars, x), want, atol=1e-5))
      True
    """
    opts = RuntimeOptions(tile_bytes=tile_bytes, ordered=ordered, gather_rows=gather_rows)
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")

    def run(qparams, args, kwargs):
        leaves, treedef = jax.tree_util.tree_flatten(qparams, is_leaf=_spec.is_quantized)
        flat_args, args_tree = jax.tree_util.tree_flatten(args)
        stand_ins = [decoded_aval(x) if _spec.is_quantized(x) else x for x in leaves]

        def flat_fn(leaves_, flat_args_):
            params = jax.tree_util.tree_unflatten(treedef, leaves_)
            return apply_fn(params, *jax.tree_util.tree_unflatten(args_tree, flat_args_),
                            **kwargs)

        closed, out_tree = _jaxpr.trace(flat_fn, stand_ins, flat_args)
        inputs = [Tracked.of(x, a) if _spec.is_quantized(x) else x
                  for x, a in zip(leaves, stand_ins)]
        interp = interpreter(opts)
        outs = interp.run(closed.jaxpr, closed.consts, inputs + list(flat_args))
        return jax.tree_util.tree_unflatten(out_tree, [interp.materialize(o) for o in outs])

    compiled = jax.jit(lambda qparams, args, kw: run(qparams, args, dict(kw)),
                       static_argnums=2)

    def g(qparams, *args, **kwargs):
        if jit and not any(isinstance(x, jax.core.Tracer)
                           for x in jax.tree_util.tree_leaves((qparams, args))):
            kw = tuple(sorted(kwargs.items()))
            try:
                hash(kw)
            except TypeError:  # unhashable keyword values: run op by op
                return run(qparams, args, kwargs)
            return compiled(qparams, args, kw)
        return run(qparams, args, kwargs)

    g.__name__ = f"quantized_{getattr(apply_fn, '__name__', 'apply')}"
    g.__doc__ = f"{g.__name__}(qparams, *args, **kwargs): see distq.quantized_apply."
    return g


def decoded_aval(leaf: Any) -> jax.ShapeDtypeStruct:
    """Shape and dtype that ``leaf.dequantize()`` returns, without decoding.

    Examples:
      >>> import jax.numpy as jnp, distq
      >>> decoded_aval(distq.quantize(jnp.ones((4, 8)), distq.Cast("bfloat16")))
      ShapeDtypeStruct(shape=(4, 8), dtype=float32)
    """
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is not None and dtype is not None:
        return jax.ShapeDtypeStruct(tuple(shape),
                                    jax.dtypes.canonicalize_dtype(jnp.dtype(dtype)))
    return jax.eval_shape(lambda q: q.dequantize(), leaf)


# ---------------------------------------------------------------------------- the rules
def interpreter(options: RuntimeOptions | None = None) -> Interpreter:
    """The :class:`distq._jaxpr.Interpreter` that :func:`quantized_apply` runs (its tracked
    values are quantised leaves)."""
    opts = options or RuntimeOptions()
    # the output of the last product a quantised weight went into: the next weight's decode
    # waits for it (an output of a matrix product is always materialised, so reading it does
    # not change how XLA fuses the activations around it)
    state: dict = {"last": None}
    rules = {"dot_general": lambda i, e, v: _dot(opts, state, i, e, v),
             "slice": lambda i, e, v: _slice(opts, i, e, v),
             "dynamic_slice": lambda i, e, v: _slice(opts, i, e, v)}
    if opts.gather_rows:
        rules["gather"] = lambda i, e, v: _gather(opts, i, e, v)
    return Interpreter(_materialize, rules=rules,
                       fallback=lambda i, e, v: _decode_and_bind(opts, i, e, v))


def _decode_dtype(t: Tracked):
    """``(dtype to decode to, casts left)``: a leading float cast is done by the decode."""
    if t.casts:
        prim, params = t.casts[0]
        new = params.get("new_dtype")
        if prim.name == "convert_element_type" and new is not None and jnp.issubdtype(
                new, jnp.floating):
            return new, t.casts[1:]
    return None, t.casts


def _view(t: Tracked, x: jax.Array, casts) -> jax.Array:
    return dataclasses.replace(t, casts=tuple(casts)).apply(x)


def _materialize(t: Tracked) -> jax.Array:
    dtype, casts = _decode_dtype(t)
    return _view(t, t.source.dequantize(dtype), casts)


def _tie(opts: RuntimeOptions, arrays: list, leaves: list) -> tuple[list, list]:
    """``arrays`` and ``leaves``, the leaves' arrays made to depend on ``arrays`` (see
    :func:`after`): whatever is computed from the returned leaves waits for ``arrays``."""
    if not opts.ordered or not arrays or not leaves:
        return arrays, leaves
    flat = [jax.tree_util.tree_flatten(q) for q in leaves]
    tied = after(arrays, [f for f, _ in flat])
    return arrays, [jax.tree_util.tree_unflatten(d, a) for (_, d), a in zip(flat, tied)]


def _zero_of(arrays: list) -> jax.Array:
    """A float32 ``+0.0`` computed from the first value of the first non-empty array, in a way
    XLA does not fold to a constant (``|v * 0|``, or ``0`` where ``v`` is not finite)."""
    for a in arrays:
        if a.size:
            v = jnp.reshape(a, (-1,))[:1]
            v = v.astype(jnp.float32) if jnp.issubdtype(v.dtype, jnp.number) else jnp.zeros(
                (1,), jnp.float32)
            return jnp.reshape(jnp.where(jnp.isfinite(v), jnp.abs(v * 0.0), 0.0), ())
    return jnp.zeros((), jnp.float32)


def _add_zero(z: jax.Array, arrays: list) -> list:
    out = []
    for a in arrays:
        if jnp.issubdtype(a.dtype, jnp.inexact):
            out.append(a - z.astype(a.dtype))  # x - (+0) is x, -0.0 included
        elif a.dtype == jnp.bool_:
            out.append(a | (z != 0))
        else:
            out.append(a + z.astype(a.dtype))
    return out


@jax.custom_batching.custom_vmap
def _after_vmap(data, arrays):
    return _add_zero(_zero_of(data), arrays)


@_after_vmap.def_vmap
def _after_batched(axis_size, in_batched, data, arrays):
    del axis_size
    return _add_zero(_zero_of(data), arrays), in_batched[1]  # batched as ``arrays`` were


def after(data: Any, arrays: Any) -> Any:
    """``arrays`` unchanged, but computed after ``data``: a data dependence that no compiler
    removes, so that whatever is computed from the result waits for ``data``.

    Portable (plain arithmetic: XLA's CPU pipeline drops ``lax.optimization_barrier`` before
    scheduling); under ``vmap`` the result is batched only where ``arrays`` were (a batched
    ``data`` does not batch a weight's decode), and derivatives pass through to ``arrays``
    only.

    Examples:
      >>> import jax.numpy as jnp
      >>> x, (w, c) = jnp.ones(3), (jnp.array([-0.0, 2.0]), jnp.arange(3, dtype=jnp.uint32))
      >>> w2, c2 = after([x], [w, c])
      >>> w2.tolist(), bool(jnp.signbit(w2[0])), c2.tolist()
      ([-0.0, 2.0], True, [0, 1, 2])
    """
    flat, tree = jax.tree_util.tree_flatten(arrays)
    return jax.tree_util.tree_unflatten(tree, _after(jax.tree_util.tree_leaves(data), flat))


@jax.custom_jvp
def _after(data: list, arrays: list) -> list:
    return _after_vmap(data, arrays)


@_after.defjvp
def _after_jvp(primals, tangents):
    return _after(*primals), tangents[1]


def _decode_and_bind(opts: RuntimeOptions, interp: Interpreter, eqn, invals: list) -> list:
    """Anything else: decode every tracked input (after the other inputs exist), then bind."""
    plain = [i for i, v in enumerate(invals) if not isinstance(v, Tracked)
             and isinstance(v, jax.Array)]
    tracked = [i for i, v in enumerate(invals) if isinstance(v, Tracked)]
    arrays, leaves = _tie(opts, [invals[i] for i in plain], [invals[i].source for i in tracked])
    vals = list(invals)
    for i, a in zip(plain, arrays):
        vals[i] = a
    for i, q in zip(tracked, leaves):
        vals[i] = _materialize(dataclasses.replace(invals[i], source=q))
    return _jaxpr.bind(eqn, vals)


def _gather(opts: RuntimeOptions, interp: Interpreter, eqn, invals: list) -> list | None:
    """An embedding lookup of whole rows: ``leaf.take(rows)``."""
    t, idx = invals
    if not isinstance(t, Tracked) or isinstance(idx, Tracked) or not t.is_identity:
        return None
    q = t.source
    if getattr(q, "batch_shape", ()) or not hasattr(q, "take") or t.ndim < 1:
        return None
    dn = eqn.params["dimension_numbers"]
    nb = idx.ndim - 1
    if (idx.ndim < 1 or idx.shape[-1] != 1 or tuple(dn.collapsed_slice_dims) != (0,)
            or tuple(dn.start_index_map) != (0,) or tuple(dn.operand_batching_dims)
            or tuple(dn.start_indices_batching_dims)
            or tuple(dn.offset_dims) != tuple(range(nb, nb + t.ndim - 1))
            or tuple(eqn.params["slice_sizes"]) != (1,) + t.shape[1:]):
        return None
    n = t.shape[0]
    rows = idx[..., 0].astype(jnp.int32)
    valid = (rows >= 0) & (rows < n)
    (rows,), (q,) = _tie(opts, [rows], [q])
    dtype, casts = _decode_dtype(t)
    out = _view(t, q.take(jnp.clip(rows, 0, n - 1), dtype), casts)
    mode = eqn.params.get("mode")
    if "FILL" in str(mode).upper():  # GatherScatterMode.FILL_OR_DROP: out-of-range rows fill
        fill = eqn.params.get("fill_value")
        if fill is None:
            fill = jnp.nan if jnp.issubdtype(out.dtype, jnp.inexact) else 0
        mask = valid.reshape(valid.shape + (1,) * (out.ndim - valid.ndim))
        out = jnp.where(mask, out, jnp.asarray(fill, out.dtype))
    return [out]


def _slice(opts: RuntimeOptions, interp: Interpreter, eqn, invals: list) -> list | None:
    """A slice of a leaf along one axis (``table[:t]``): decode that slice only."""
    t = invals[0]
    if not isinstance(t, Tracked) or any(isinstance(v, Tracked) for v in invals[1:]):
        return None
    q = t.source
    if getattr(q, "batch_shape", ()) or not hasattr(q, "dequantize_slice"):
        return None
    out_shape = tuple(eqn.outvars[0].aval.shape)
    if eqn.primitive.name == "slice":
        if eqn.params.get("strides") not in (None, (1,) * t.ndim):
            return None
        starts = list(eqn.params["start_indices"])
    else:  # dynamic_slice: start indices are operands
        if len(invals) != 1 + t.ndim:
            return None
        starts = list(invals[1:])
    cut = [d for d in range(t.ndim) if out_shape[d] != t.shape[d]]
    if len(cut) != 1 or not _can_slice(q, t.perm[cut[0]]):
        return None
    d = cut[0]
    dtype, casts = _decode_dtype(t)
    start = starts[d]
    arrays, (q,) = _tie(opts, [jnp.asarray(start)] if not isinstance(start, int) else [], [q])
    start = arrays[0] if arrays else start
    align = (start or out_shape[d]) if isinstance(start, int) else 1
    return [_view(t, _slice_of(q, start, out_shape[d], t.perm[d], dtype, align), casts)]


def _slice_of(q: Any, start, size: int, axis: int, dtype, align: int = 1) -> jax.Array:
    """``q.dequantize_slice``, passing the ``align`` hint to leaves that take it."""
    if "align" in inspect.signature(q.dequantize_slice).parameters:
        return q.dequantize_slice(start, size, axis, dtype, align=align)
    return q.dequantize_slice(start, size, axis, dtype)


def _can_slice(q: Any, axis: int) -> bool:
    axes = getattr(q, "slice_axes", None)
    return hasattr(q, "dequantize_slice") and (axes is None or axis in axes)


def _dot(opts: RuntimeOptions, state: dict, interp: Interpreter, eqn,
         invals: list) -> list | None:
    """A matrix product with a quantised operand: decode just before, in tiles if large."""
    lhs, rhs = invals
    if isinstance(lhs, Tracked) == isinstance(rhs, Tracked):
        return None  # both quantised (e.g. W^T W): decode both
    side = 0 if isinstance(lhs, Tracked) else 1
    t, x = invals[side], invals[1 - side]
    anchor = x if state["last"] is None else state["last"]
    out, state["last"] = _tiled_product(opts, eqn, side, t, x, anchor)
    return [out]


def _tiled_product(opts: RuntimeOptions, eqn, side: int, t: Tracked, x: jax.Array,
                   anchor: jax.Array):
    """``(product, last piece computed)`` of ``eqn`` with the quantised operand ``t``."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract, batch = (lc, lb) if side == 0 else (rc, rb)
    _, (q,) = _tie(opts, [anchor], [t.source])
    t = dataclasses.replace(t, source=q)
    dtype, casts = _decode_dtype(t)

    def product(w):
        return _jaxpr.bind(eqn, [w, x] if side == 0 else [x, w])[0]

    free = [d for d in range(t.ndim) if d not in contract and d not in batch
            and t.shape[d] >= 2 and _can_slice(q, t.perm[d])]
    itemsize = jnp.dtype(dtype or decoded_aval(q).dtype).itemsize
    total = math.prod(t.shape) * itemsize
    if (opts.tile_bytes is None or total <= opts.tile_bytes or not free or batch
            or getattr(q, "batch_shape", ())):
        out = product(_view(t, q.dequantize(dtype), casts))
        return out, out
    f = max(free, key=lambda d: t.shape[d])
    length = t.shape[f]
    tile = max(1, min(opts.tile_bytes // max(total // length, 1), length))
    if tile >= 16:
        tile -= tile % 8  # whole words of codes for 1, 2 and 4 bits
    n_tiles = -(-length // tile)
    # position of axis f among the output's axes: batch, lhs free, rhs free
    lhs_nd = (t if side == 0 else x).ndim
    lhs_free = [d for d in range(lhs_nd) if d not in lc and d not in lb]
    if side == 0:
        pos = len(lb) + lhs_free.index(f)
    else:
        rhs_free = [d for d in range(t.ndim) if d not in rc and d not in rb]
        pos = len(lb) + len(lhs_free) + rhs_free.index(f)
    aval = eqn.outvars[0].aval

    if n_tiles <= _UNROLL:  # straight-line tiles, each decoded after the last product
        pieces, prev, start = [], None, 0
        while start < length:
            size = min(tile, length - start)
            qk = q if prev is None else _tie(opts, [prev], [q])[1][0]
            w = _view(t, _slice_of(qk, start, size, t.perm[f], dtype, start or size), casts)
            pieces.append(product(w))
            prev, start = pieces[-1], start + size
        return lax.concatenate(pieces, pos), pieces[-1]
    align = math.gcd(tile, length)  # every start is a multiple of it

    def body(i, out):
        start = jnp.minimum(i * tile, length - tile)  # the last tile overlaps the one before
        w = _view(t, _slice_of(q, start, tile, t.perm[f], dtype, align), casts)
        return lax.dynamic_update_slice_in_dim(out, product(w), start, pos)

    # every tile overwrites its part; the initial buffer is computed from ``anchor`` (its values
    # do not matter) so that XLA cannot allocate every loop's output at the start
    seed = jnp.reshape(_zero_of([anchor]), ()).astype(aval.dtype) if jnp.issubdtype(
        aval.dtype, jnp.number) else jnp.zeros((), aval.dtype)
    out = jnp.broadcast_to(seed, aval.shape)
    out = lax.fori_loop(0, n_tiles, body, out)
    return out, out


__all__ = ["RuntimeOptions", "decoded_aval", "interpreter", "quantized_apply"]
