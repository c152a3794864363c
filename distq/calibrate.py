"""Calibrated quantisation: error-compensating rounding driven by the data a model sees.

``distq.quantize_tree(params, rules, calibration=(apply_fn, args))`` needs no model-specific
hooks. distq traces ``apply_fn(params, *args)`` to a jaxpr and runs it with the interpreter that
quantised execution uses too (:mod:`distq._jaxpr`, :func:`distq.quantized_apply`), which
follows each parameter leaf through transposes and type casts; wherever a matrix leaf meets an
activation in a matrix product (``dot_general`` contracting one of the leaf's axes), it adds the
activation's Gram matrix ``H = X^T X`` over that axis. Nested ``jit`` calls and custom-derivative
wrappers are followed; loops (``scan``/``while``) are run but not looked into.

Each token (row of the activation) counts by its *relative* error by default: its outer product
enters ``H`` divided by the squared norm of the layer's output for it,
``H = sum_t x_t x_t^T / ||W x_t||^2`` (``Calibration(weighting="relative")``). Plain GPTQ's
``X^T X`` lets a few tokens with massive activations (transformers grow them on separator and
punctuation tokens, in a few feature dimensions) dominate the Gram matrix; rounding then buys
their accuracy with errors larger than the output itself on every other token, although a
following LayerNorm/RMSNorm divides each token by its own scale, so it is each token's relative
error that the model sees. On MiniLM at 3 bits that made calibrated rounding worse than plain
rounding; with relative weights it is far better (see the README).

Each leaf with a Gram matrix is then quantised in the style of GPTQ (Frantar et al., 2023):
the spec first fixes the grid (its codebook, scales and locations, fitted to the weights as
usual), then the inputs are visited one at a time, each column of weights is rounded to the grid
and its rounding error is spread over the columns not yet rounded, in proportion to the inverse
Gram matrix, so that the layer's *output* ``X W`` changes as little as possible. The columns are
processed in blocks (one matrix product per block for the deferred updates) and, by default, in
decreasing order of ``diag(H)`` (the most used inputs first). Calibration never loses to
data-free rounding on its own objective: when the data-free codes give the lower output error
(on the calibration Gram matrix), they are kept.

A :class:`distq.Rotated` leaf is calibrated in its stored basis: the weight is rotated, and when
the rotation acts on the contracted (input) axis the Gram matrix is too, ``H' = R H R^T``
(rounding a rotated weight against an unrotated ``H`` would optimise the wrong objective).

Examples:
  A layer ``x @ w`` on correlated inputs, quantised to 3 bits with and without calibration; the
  error of the layer's output is measured with :func:`output_error`:

  >>> import jax, distq
  >>> from distq import calibrate
  >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  >>> params = {"w": jax.random.normal(k1, (32, 16))}
  >>> x = jax.random.normal(k2, (256, 32)) @ jax.random.normal(k3, (32, 32))
  >>> apply_fn = lambda p, x: x @ p["w"]
  >>> plain, _ = distq.quantize_tree(params, distq.Uniform(bits=3))
  >>> cal, report = distq.quantize_tree(params, distq.Uniform(bits=3),
  ...                                   calibration=(apply_fn, (x,)))
  >>> report.leaves[0].note, report.bytes_after == _.bytes_after  # same grid, same size
  ('calibrated', True)
  >>> err = lambda q: calibrate.output_error(params["w"].T, q["w"].dequantize().T, x.T @ x)
  >>> err(cal) < err(plain) / 2
  True

References:
  E. Frantar, S. Ashkboos, T. Hoefler, D. Alistarh, "GPTQ: Accurate post-training quantization
  for generative pre-trained transformers", ICLR 2023.
  B. Hassibi, D. Stork, "Second order derivatives for network pruning: Optimal Brain Surgeon",
  NeurIPS 1992.
  M. Sun, X. Chen, J. Z. Kolter, Z. Liu, "Massive activations in large language models",
  COLM 2024 (the few huge activations that dominate an unweighted ``X^T X``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ._jaxpr import ALL_CALLS, Interpreter, Tracked
from .core import _checks
from .core import _numerics as nx
from .core import bitpack
from .core import hadamard
from .core import rotated as rot
from .core.qarray import QArray, outlier_values
from .core.specs_rotated import Rotated

_WEIGHTINGS = ("relative", "uniform")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Options of calibrated quantisation.

    Attributes:
      damp: added to the Gram matrix's diagonal, as a fraction of its mean diagonal (keeps the
        inverse well conditioned; GPTQ's usual 0.01).
      block: columns per block of deferred updates.
      act_order: visit inputs in decreasing order of ``diag(H)``.
      refit: after rounding, refit the codebook levels to the rounded codes by least squares on
        the layer's output error (a small linear system per leaf).
      sequential: quantise the leaves in the order the forward pass meets them, each one on the
        activations produced by the leaves already quantised (so later layers compensate for
        earlier layers' errors); runs the traced forward op by op. Otherwise every Gram matrix
        comes from the float model in one compiled pass.
      weighting: "relative" (default): each token (row of the activation) weighs by the
        inverse squared norm of the float layer's output for it, so every token counts by its
        relative error (what a following normalisation layer sees; see the module docstring);
        "uniform": plain ``X^T X`` (GPTQ as published).

    Examples:
      >>> import jax, distq
      >>> from distq.calibrate import Calibration
      >>> params = {"w": jax.random.normal(jax.random.key(0), (32, 16))}
      >>> x = jax.random.normal(jax.random.key(1), (256, 32))
      >>> q, report = distq.quantize_tree(params, distq.Uniform(bits=3),
      ...                                 calibration=(lambda p, x: x @ p["w"], (x,)),
      ...                                 calibration_options=Calibration(sequential=True))
      >>> report.leaves[0].note
      'calibrated'
      >>> Calibration(block=0)
      Traceback (most recent call last):
        ...
      ValueError: block must be a positive int, got 0
    """

    damp: float = 0.01
    block: int = 128
    act_order: bool = True
    refit: bool = True
    sequential: bool = False
    weighting: str = "relative"

    def __post_init__(self):
        if not 0.0 <= self.damp < 10.0:
            raise ValueError(f"damp must be in [0, 10), got {self.damp}")
        if self.weighting not in _WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(_WEIGHTINGS)}, "
                             f"got {self.weighting!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"block must be a positive int, got {self.block!r}")


# ------------------------------------------------------------------------------ jaxpr tracing
_HI = jax.lax.Precision.HIGHEST


def gram(x: jax.Array, axis: int, weight: jax.Array | None = None,
         weight_axis: int = 0) -> jax.Array:
    """``X^T X`` of the activation ``x`` contracted along ``axis`` (every other axis a sample).

    With the matrix ``weight`` it meets (contracted along ``weight_axis``), each sample
    ``x_t`` counts by its relative error: ``sum_t x_t x_t^T / ||W x_t||^2`` (a sample whose
    output norm is below ``1e-6`` of the mean counts as if it were that; all outputs zero:
    uniform weights).

    Examples:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.0, 0.0], [0.0, 10.0]])  # two tokens, the second one 10x larger
      >>> w = jnp.eye(2)
      >>> gram(x, 1).tolist(), gram(x, 1, w, 1).round(6).tolist()  # weighted: each token once
      ([[1.0, 0.0], [0.0, 100.0]], [[1.0, 0.0], [0.0, 1.0]])
    """
    x = jnp.moveaxis(x, axis, -1)
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if weight is None:
        return jnp.matmul(x.T, x, precision=_HI)
    w = jnp.moveaxis(weight.astype(jnp.float32), weight_axis, 0)  # (inputs, outputs)
    n2 = jnp.sum(jnp.square(jnp.matmul(x, w, precision=_HI)), axis=1)
    mean = jnp.mean(n2)
    t = jnp.where(mean > 0, 1.0 / jnp.maximum(n2, 1e-6 * mean), 1.0)
    return jnp.matmul((x * t[:, None]).T, x, precision=_HI)


class _GramRule:
    """The ``dot_general`` rule of calibration's :class:`distq._jaxpr.Interpreter`.

    Wherever a tracked matrix leaf (the :class:`~distq._jaxpr.Tracked` value's ``source`` is its
    index) meets an untracked activation in a matrix product contracting one axis, it adds the
    activation's Gram matrix over that axis to ``grams[(leaf, axis of the leaf)]``. In sequential
    mode (``on_meet(leaf, axis, H) -> dequantised leaf``) it quantises the leaf at its first use
    instead and the product (and every later use) sees the quantised value.
    """

    def __init__(self, leaves: Sequence[jax.Array], relative: bool = True,
                 on_meet: Callable | None = None):
        self.leaves = list(leaves)
        self.relative = relative
        self.on_meet = on_meet
        self.grams: dict[tuple[int, int], jax.Array] = {}
        self.replaced: dict[int, jax.Array | None] = {}

    def value(self, t: Tracked) -> jax.Array:
        """What a tracked leaf stands for: the float leaf, or its quantised replacement."""
        leaf = self.leaves[t.source]
        new = self.replaced.get(t.source)
        return t.apply(leaf if new is None else new.astype(leaf.dtype))

    def __call__(self, interp: Interpreter, eqn, invals: list) -> None:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        if lb or rb or len(lc) != 1:
            return None
        for side in (0, 1):
            t, act = invals[side], invals[1 - side]
            if not isinstance(t, Tracked) or isinstance(act, Tracked) or t.ndim != 2:
                continue
            c_param, c_act = (lc, rc)[side][0], (lc, rc)[1 - side][0]
            key = (t.source, t.perm[c_param])
            if self.on_meet is not None:
                if t.source not in self.replaced:
                    h = self._gram(act, c_act, interp.materialize(t), c_param)
                    self.replaced[t.source] = self.on_meet(t.source, key[1], h)
                continue
            g = self._gram(act, c_act, interp.materialize(t), c_param)
            self.grams[key] = self.grams[key] + g if key in self.grams else g
        return None  # the product itself: materialise (float or quantised) and bind

    def _gram(self, act, c_act, w, c_param):
        return gram(act, c_act, w, c_param) if self.relative else gram(act, c_act)

    def run(self, closed, leaves: Sequence[jax.Array], wanted: Sequence[bool],
            flat_args: Sequence[Any]) -> None:
        """Evaluates the traced ``apply_fn`` with the wanted leaves tracked."""
        interp = Interpreter(self.value, rules={"dot_general": self}, calls=ALL_CALLS)
        ins = [Tracked.of(i, x) if w else x for i, (x, w) in enumerate(zip(leaves, wanted))]
        interp.run(closed.jaxpr, closed.consts, ins + list(flat_args))


def collect(params, calibration, paths: Sequence[str], wanted: Sequence[bool],
            options: Calibration | None = None) -> dict[str, tuple[int, jax.Array]]:
    """Gram matrices of the inputs that meet each wanted matrix leaf in ``apply_fn``.

    Returns ``{path: (contracted_axis, H)}`` for leaves met in matrix products along a single,
    consistent axis (a leaf met along both axes, e.g. a tied embedding, is left out).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from distq import calibrate
      >>> params = {"kernel": jnp.ones((4, 3)), "weight": jnp.ones((2, 3))}  # Flax, PyTorch
      >>> x = jax.random.normal(jax.random.key(0), (10, 4))
      >>> apply_fn = lambda p, x: (x @ p["kernel"]) @ p["weight"].T
      >>> grams = calibrate.collect(params, (apply_fn, (x,)), ["kernel", "weight"], [True, True])
      >>> {path: (axis, h.shape) for path, (axis, h) in grams.items()}
      {'kernel': (0, (4, 4)), 'weight': (1, (3, 3))}
      >>> y = x @ params["kernel"]  # each token weighs by 1 / ||its output||^2 (relative)
      >>> h = (x / jnp.sum(y * y, axis=1, keepdims=True)).T @ x
      >>> bool(jnp.allclose(grams["kernel"][1], h, rtol=1e-4))
      True
      >>> uniform = calibrate.Calibration(weighting="uniform")  # plain X^T X, as in GPTQ
      >>> grams = calibrate.collect(params, (apply_fn, (x,)), ["kernel", "weight"],
      ...                           [True, False], uniform)
      >>> bool(jnp.allclose(grams["kernel"][1], x.T @ x, rtol=1e-5))
      True
    """
    leaves, args, closed = _flat_trace(params, calibration)
    if len(leaves) != len(paths):
        raise ValueError("calibration: parameter tree changed while quantising")
    wanted = [bool(w) and getattr(x, "ndim", 0) == 2 for w, x in zip(wanted, leaves)]

    @jax.jit
    def grams(leaves, args):
        rule = _GramRule(leaves, relative=(options or Calibration()).weighting == "relative")
        rule.run(closed, leaves, wanted, jax.tree_util.tree_leaves(args))
        return rule.grams

    found = grams(leaves, tuple(args))
    axes: dict[int, list[int]] = {}
    for leaf, axis in found:
        axes.setdefault(leaf, []).append(axis)
    out = {}
    for leaf, ax in axes.items():
        if len(ax) == 1:
            out[paths[leaf]] = (ax[0], found[(leaf, ax[0])])
    return out


def _flat_trace(params, calibration):
    if not (isinstance(calibration, (tuple, list)) and len(calibration) == 2
            and callable(calibration[0])):
        raise TypeError("calibration must be (apply_fn, args) with apply_fn(params, *args)")
    apply_fn, args = calibration
    if not isinstance(args, (tuple, list)):
        args = (args,)
    leaves, treedef = jax.tree_util.tree_flatten(
        params, is_leaf=lambda x: hasattr(x, "dequantize"))

    def flat_fn(leaves, *a):
        return apply_fn(jax.tree_util.tree_unflatten(treedef, leaves), *a)

    closed = jax.make_jaxpr(flat_fn)(leaves, *args)
    return leaves, tuple(args), closed


def quantize_sequential(params, calibration, paths: Sequence[str], specs: Sequence[Any],
                        options: Calibration | None = None) -> dict[str, Any]:
    """Quantises the matrix leaves in the order the forward pass meets them (see
    :class:`Calibration`'s ``sequential``); returns ``{path: quantised leaf}`` for the leaves met.
    """
    opts = options or Calibration()
    leaves, args, closed = _flat_trace(params, calibration)
    if len(leaves) != len(paths):
        raise ValueError("calibration: parameter tree changed while quantising")
    wanted = [s is not None and getattr(x, "ndim", 0) == 2 for s, x in zip(specs, leaves)]
    done: dict[str, Any] = {}

    def on_meet(leaf, axis, h):
        q = quantize_calibrated(leaves[leaf], specs[leaf], (axis, h), opts)
        done[paths[leaf]] = q
        return q.dequantize(jnp.float32) if hasattr(q, "dequantize") else None

    rule = _GramRule(leaves, relative=opts.weighting == "relative", on_meet=on_meet)
    rule.run(closed, leaves, wanted, jax.tree_util.tree_leaves(args))
    return done


def quantize_all(params, calibration, paths: Sequence[str], specs: Sequence[Any],
                 options: Calibration | None = None) -> dict[str, Any]:
    """Calibrated quantisation of every matrix leaf that a matrix product meets; returns
    ``{path: quantised leaf}`` (``specs[i] is None``: leaf ``i`` is not wanted).

    Sequential (:class:`Calibration`) or from the float model's Gram matrices in one pass.
    """
    opts = options or Calibration()
    if opts.sequential:
        return quantize_sequential(params, calibration, paths, specs, opts)
    grams = collect(params, calibration, paths, [s is not None for s in specs], opts)
    spec_of = dict(zip(paths, specs))
    leaf_of = dict(zip(paths, jax.tree_util.tree_leaves(
        params, is_leaf=lambda x: hasattr(x, "dequantize"))))
    return {p: quantize_calibrated(leaf_of[p], spec_of[p], g, opts) for p, g in grams.items()}


# ------------------------------------------------------------------------------ GPTQ rounding
def _round_columns(w, hinv_u, scale, loc, codebook, block: int, exact=None):
    """GPTQ on ``w`` (rows x cols, columns = inputs in processing order).

    ``hinv_u`` is the upper Cholesky factor of ``H^-1``; ``scale``/``loc`` are per element.
    ``exact`` (bool, per element) marks values stored apart (outliers): they keep their current,
    error-compensated value instead of a code. Returns the codes (rows x cols, int32) and those
    kept values (0 elsewhere).
    """
    rows, cols = w.shape
    mids = 0.5 * (codebook[1:] + codebook[:-1])
    nb = -(-cols // block)
    pad = nb * block - cols
    w = jnp.pad(w, ((0, 0), (0, pad)))
    scale = jnp.pad(scale, ((0, 0), (0, pad)), constant_values=1.0)
    loc = jnp.pad(loc, ((0, 0), (0, pad)))
    exact = jnp.zeros(w.shape, bool) if exact is None else jnp.pad(exact, ((0, 0), (0, pad)))
    u = jnp.pad(hinv_u, ((0, pad), (0, pad)))
    u = u + jnp.diag(jnp.concatenate([jnp.zeros(cols), jnp.ones(pad)]))
    safe = jnp.where(scale != 0, scale, 1.0)

    def quant(col, s, l):
        code = nx.bucketize((col - l) / s, mids)
        return code, l + s * codebook[code]

    def block_step(w, b):
        start = b * block
        wb = jax.lax.dynamic_slice(w, (0, start), (rows, block))
        ub = jax.lax.dynamic_slice(u, (start, start), (block, block))
        sb = jax.lax.dynamic_slice(safe, (0, start), (rows, block))
        lb = jax.lax.dynamic_slice(loc, (0, start), (rows, block))
        eb = jax.lax.dynamic_slice(exact, (0, start), (rows, block))

        def col_step(carry, j):
            wb, codes, errs, kept = carry
            col = wb[:, j]
            code, qv = quant(col, sb[:, j], lb[:, j])
            qv = jnp.where(eb[:, j], col, qv)
            err = (col - qv) / ub[j, j]
            upd = jnp.where(jnp.arange(block) > j, ub[j], 0.0)
            wb = wb - err[:, None] * upd[None, :]
            kept = kept.at[:, j].set(jnp.where(eb[:, j], col, 0.0))
            return (wb, codes.at[:, j].set(code), errs.at[:, j].set(err), kept), None

        zeros = jnp.zeros((rows, block), w.dtype)
        init = (wb, jnp.zeros((rows, block), jnp.int32), zeros, zeros)
        (wb, codes, errs, kept), _ = jax.lax.scan(col_step, init, jnp.arange(block))
        # deferred update of every column after this block
        ur = jax.lax.dynamic_slice(u, (start, 0), (block, u.shape[1]))
        after = jnp.arange(u.shape[1]) >= start + block
        w = w - errs @ jnp.where(after[None, :], ur, 0.0)
        return w, (codes, kept)

    _, (codes, kept) = jax.lax.scan(block_step, w, jnp.arange(nb))  # (nb, rows, block)
    codes = jnp.transpose(codes, (1, 0, 2)).reshape(rows, nb * block)
    kept = jnp.transpose(kept, (1, 0, 2)).reshape(rows, nb * block)
    return codes[:, :cols], kept[:, :cols]


def _refit_levels(w, codes, scale, loc, h, n: int, codebook, exact, kept):
    """Least-squares codebook given codes: minimise tr((W - W_hat) H (W - W_hat)^T)
    (values kept apart are fixed at ``kept``)."""
    onehot = jax.nn.one_hot(codes, n, dtype=jnp.float32)  # rows, cols, n
    a = onehot * jnp.where(exact, 0.0, scale)[..., None]  # W_hat - fixed = sum_k c_k A_k
    r = w - jnp.where(exact, kept, loc)
    ah = jnp.einsum("rck,cd->rdk", a, h)  # (rows, cols, n)
    g = jnp.einsum("rdk,rdl->kl", ah, a)
    b = jnp.einsum("rdk,rd->k", ah, r)
    g = g + 1e-6 * jnp.trace(g) / n * jnp.eye(n)
    used = jnp.diag(g) > 0
    sol = jnp.linalg.solve(jnp.where(used[:, None] & used[None, :], g, jnp.eye(n)),
                           jnp.where(used, b, codebook))
    new = jnp.where(used, sol, codebook)
    ok = jnp.all(jnp.isfinite(new))
    return jnp.where(ok, new, codebook)


def _gptq(w, h, scale, loc, codebook, opts: Calibration, exact):
    cols = w.shape[1]
    order = jnp.argsort(-jnp.diag(h)) if opts.act_order else jnp.arange(cols)
    inv = jnp.argsort(order)
    hp = h[order][:, order]
    u = nx.hinv_upper(hp, opts.damp)
    codes, kept = _round_columns(w[:, order], u, scale[:, order], loc[:, order], codebook,
                                 opts.block, exact[:, order])
    codes, kept = codes[:, inv], kept[:, inv]
    if opts.refit:
        codebook = _refit_levels(w, codes, scale, loc, h, codebook.shape[0], codebook, exact,
                                 kept)
    return codes, codebook, kept


_gptq_jit = jax.jit(_gptq, static_argnums=5)


def quantize_calibrated(x, spec, gram: tuple[int, jax.Array], options: Calibration | None = None):
    """Quantises matrix ``x`` with ``spec``'s grid, rounding to minimise the output error on
    the inputs summarised by ``gram = (contracted_axis, H)``.

    The result is never worse than data-free rounding on that objective: if the spec's own
    codes give a lower ``tr(D H D^T)`` (``D``: the error of the matrix), they are returned.
    A :class:`distq.Rotated` spec is calibrated in its rotated basis (the Gram matrix rotated
    too when the rotation acts on the contracted axis). Specs without a scalar grid (PQ,
    Cast) are quantised as usual.

    Examples:
      >>> import jax, distq
      >>> from distq import calibrate
      >>> w = jax.random.normal(jax.random.key(0), (32, 16))  # (in, out): inputs on axis 0
      >>> x = jax.random.normal(jax.random.key(1), (256, 32)) @ jax.random.normal(
      ...     jax.random.key(2), (32, 32))
      >>> h = x.T @ x
      >>> q = calibrate.quantize_calibrated(w, distq.Uniform(bits=3), (0, h))
      >>> q0 = distq.quantize(w, distq.Uniform(bits=3))
      >>> q.shape, q.nbytes == q0.nbytes  # the grid is the spec's own
      ((32, 16), True)
      >>> err = lambda q: calibrate.output_error(w.T, q.dequantize().T, h)
      >>> err(q) < err(q0) / 2
      True
      >>> spec = distq.Rotated(distq.Uniform(bits=3), axis=0)  # rotates the inputs (and H)
      >>> qr = calibrate.quantize_calibrated(w, spec, (0, h))
      >>> type(qr).__name__, err(qr) < err(distq.quantize(w, spec)) * 0.6
      ('RotatedArray', True)
    """
    opts = options or Calibration()
    axis, h = gram
    if hasattr(spec, "quantize_calibrated"):  # a spec with its own rounding (VQ's LDLQ)
        return spec.quantize_calibrated(x, (axis, h), damp=opts.damp)
    if isinstance(spec, Rotated):
        dtype = _checks.dtype_name(x)
        xr, spec = rot.rotated_input(x, spec)
        if spec.axis == axis:  # the inputs are rotated: H' = R H R^T
            h = hadamard.rotate_gram(jnp.asarray(h, jnp.float32), spec.seed)
        return rot.wrap(quantize_calibrated(xr, spec.spec, (axis, h), opts), spec, dtype)
    x = jnp.asarray(x)
    q0 = spec.quantize(x)
    if not isinstance(q0, QArray) or q0.ndim != 2:  # no scalar grid to round on
        return q0
    q = _round_calibrated(x, spec, q0, axis, jnp.asarray(h, jnp.float32), opts)
    # never worse than the data-free codes on the calibration objective
    t = (lambda a: a.T) if axis == 0 else (lambda a: a)
    w = t(x.astype(jnp.float32))
    better = _weighted_error(w, t(q.dequantize(jnp.float32)), h) <= _weighted_error(
        w, t(q0.dequantize(jnp.float32)), h)
    return jax.tree_util.tree_map(lambda a, b: jnp.where(better, a, b), q, q0)


def _weighted_error(w, wq, h):
    """``tr(D H D^T)`` with ``D = wq - w`` laid out (outputs, inputs)."""
    d = wq - w
    return jnp.sum(d * jnp.matmul(d, jnp.asarray(h, jnp.float32), precision=_HI))


def _round_calibrated(x, spec, q0: QArray, axis: int, h, opts: Calibration) -> QArray:
    """GPTQ codes (and refitted levels, outlier values) on ``q0``'s grid."""
    scale = q0.per_value(q0.scale)
    loc = q0.per_value(q0.loc) if q0.loc is not None else jnp.zeros(q0.shape, jnp.float32)
    # columns = the contracted (input) axis
    t = (lambda a: a.T) if axis == 0 else (lambda a: a)
    g = q0.layout.num_groups(q0.shape)
    exact = jnp.zeros((q0.size,), bool)
    if q0.n_outliers:  # outliers keep GPTQ's error-compensated value, not a code
        pos = q0.outlier_positions().astype(jnp.int32)
        exact = exact.at[pos].set(True)
    exact = q0.layout.from_rows(exact.reshape(g, -1), q0.shape)
    codes, codebook, kept = _gptq_jit(t(x.astype(jnp.float32)), h,
                                      t(scale), t(loc), q0.levels(), opts, t(exact))
    codes = t(codes)
    rows = q0.layout.to_rows(codes.astype(jnp.uint32))
    packed = bitpack.pack(rows.reshape(-1), q0.bits)
    q = dataclasses.replace(q0, codes=packed)
    if getattr(spec, "refits_levels", False):  # other grids are fixed by definition
        q = dataclasses.replace(q, codebook=codebook.astype(q0.codebook.dtype))
    if not q0.n_outliers:
        return q
    grp = pos // (q0.size // g)  # each outlier's scaling group
    scale_g = q0.scale.astype(jnp.float32)[grp]
    loc_g = 0.0 if q0.loc is None else q0.loc.astype(jnp.float32)[grp]
    kept = q0.layout.to_rows(t(kept)).reshape(-1)[pos]
    z = (kept - loc_g) / jnp.where(scale_g != 0, scale_g, 1.0)
    return dataclasses.replace(q, outlier_value=outlier_values(z))


def output_error(x, xq, h) -> float:
    """``tr((X W - X W_hat)^T (...)) / tr((X W)^T X W)`` from the Gram matrix (relative).

    ``x`` and ``xq`` are laid out ``(outputs, inputs)`` (a PyTorch weight; ``W`` above is their
    transpose) and ``h = X^T X`` is over the inputs: pass ``kernel.T`` for a Flax kernel.

    Examples:
      >>> import jax.numpy as jnp
      >>> from distq.calibrate import output_error
      >>> w = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # 3 outputs, 2 inputs
      >>> h = jnp.diag(jnp.array([1.0, 0.0]))  # the second input is always 0
      >>> output_error(w, w.at[:, 1].set(0.0), h)  # its weights do not matter
      0.0
      >>> round(output_error(w, 1.1 * w, h), 6)
      0.01
    """
    x, xq = jnp.asarray(x, jnp.float32), jnp.asarray(xq, jnp.float32)
    d = xq - x
    return float(jnp.trace(d @ h @ d.T) / jnp.trace(x @ h @ x.T))


__all__ = ["Calibration", "collect", "gram", "quantize_all", "quantize_calibrated",
           "quantize_sequential", "output_error"]
