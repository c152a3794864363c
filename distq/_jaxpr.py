"""A jaxpr interpreter that carries chosen inputs through a traced function unevaluated.

Both calibration (which wants the activations that meet each weight in a matrix product) and
quantised execution (which wants to decode each weight only where it is used) need the same
thing: run ``apply_fn``'s jaxpr equation by equation, with some inputs standing for something
other than an array, and act wherever such an input is used.

Such an input is a :class:`Tracked` value: a ``source`` (a quantised leaf, a leaf's index...)
seen through *view* operations that the interpreter follows without evaluating them: transposes
(``perm``), and elementwise unary operations that keep the shape (``convert_element_type``,
``copy``, ``reduce_precision``; ``casts``). Nested calls (``jit``, ``closed_call``, ``remat``
and, when asked, custom-derivative wrappers) are entered when a tracked value goes in, so that a
weight is followed into a jitted layer. Every other equation that receives a tracked value goes
to a *rule* for its primitive, if the caller gave one, or has its tracked inputs
*materialised* (the caller's function turns a :class:`Tracked` into an array) and is bound as
it is. An equation without tracked inputs is bound as it is, custom derivatives included.

Examples:
  Follow a parameter through a transpose into a matrix product and record what meets it:

  >>> import jax, jax.numpy as jnp
  >>> from distq._jaxpr import Interpreter, Tracked
  >>> w, x = jnp.ones((3, 2)), jnp.ones((5, 2))
  >>> closed = jax.make_jaxpr(lambda w, x: x @ w.T)(w, x)
  >>> seen = []
  >>> def on_dot(interp, eqn, invals):
  ...     seen.append([type(v).__name__ for v in invals])
  ...     return None  # not handled here: materialise and bind
  >>> interp = Interpreter(lambda t: t.apply(w), rules={"dot_general": on_dot})
  >>> (y,) = interp.run(closed.jaxpr, closed.consts, [Tracked.of("w", w), x])
  >>> seen, y.shape, float(y[0, 0])
  ([['ArrayImpl', 'Tracked']], (5, 3), 2.0)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax import lax
from jax.extend import core as jcore

#: nested calls that are entered when a tracked value goes in (custom-derivative wrappers are
#: not: entering them would differentiate their primal code instead of their rule)
CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint",
                   "remat2"})
#: :data:`CALLS` plus the custom-derivative wrappers, for forward-only interpreters
ALL_CALLS = CALLS | {"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
                     "custom_lin"}
#: elementwise unary primitives that keep a tracked value tracked (applied after decoding)
VIEW_PRIMITIVES = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision"})

Rule = Callable[["Interpreter", Any, list], "list | None"]


@dataclasses.dataclass(frozen=True, eq=False)
class Tracked:
    """A value of the jaxpr that stands for ``source`` seen through view operations.

    Attributes:
      source: what the caller follows (a quantised leaf, an index, ...).
      shape, dtype: of the view (what the jaxpr variable holds).
      perm: view axis ``i`` is axis ``perm[i]`` of the source.
      casts: elementwise unary ``(primitive, params)`` pairs applied after ``perm``.
    """

    source: Any
    shape: tuple[int, ...]
    dtype: Any
    perm: tuple[int, ...]
    casts: tuple[tuple[Any, dict], ...] = ()

    @classmethod
    def of(cls, source: Any, like: Any) -> "Tracked":
        """A tracked value with no views yet; ``like`` gives the shape and dtype (an array or
        ``jax.ShapeDtypeStruct``)."""
        shape = tuple(like.shape)
        return cls(source, shape, like.dtype, tuple(range(len(shape))))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_identity(self) -> bool:
        """No transpose (casts may remain)."""
        return self.perm == tuple(range(len(self.perm)))

    def apply(self, x: jax.Array) -> jax.Array:
        """The views applied to ``x`` (the source materialised, or a slice of it of the same
        rank)."""
        if not self.is_identity:
            x = lax.transpose(x, self.perm)
        for prim, params in self.casts:
            x = prim.bind(x, **params)
        return x

    def transposed(self, permutation: Sequence[int]) -> "Tracked":
        return dataclasses.replace(self, shape=tuple(self.shape[i] for i in permutation),
                                   perm=tuple(self.perm[i] for i in permutation))

    def cast(self, prim: Any, params: dict, dtype: Any) -> "Tracked":
        return dataclasses.replace(self, dtype=dtype, casts=self.casts + ((prim, dict(params)),))


def sub_jaxpr(eqn) -> Any:
    """The jaxpr (closed or open) a call-like equation runs on its operands, or ``None``."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = eqn.params.get(key)
        if hasattr(j, "jaxpr") or hasattr(j, "eqns"):
            return j
    return None


def bind(eqn, invals: Sequence[Any]) -> list:
    """Binds an equation's primitive to arrays; always returns the list of outputs."""
    ctx = getattr(eqn, "ctx", None)
    manager = getattr(ctx, "manager", None) if ctx is not None else None
    with manager if manager is not None else contextlib.nullcontext():
        out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]


class Interpreter:
    """Evaluates jaxprs with :class:`Tracked` values among the inputs (module docstring).

    Args:
      materialize: ``materialize(tracked) -> array``, the value a tracked input stands for
        (with its views applied: usually ``tracked.apply(decoded source)``).
      rules: ``{primitive name: rule}``; ``rule(interp, eqn, invals)`` is called for an equation
        with at least one tracked input and returns the list of outputs (arrays or tracked
        values) or ``None`` to have the inputs materialised and the equation bound.
      calls: names of call primitives to enter (see :data:`CALLS`, :data:`ALL_CALLS`).
      fallback: ``fallback(interp, eqn, invals) -> outputs`` for an equation with tracked
        inputs that no rule, view or call took; default :meth:`bind` (materialise and bind).
    """

    def __init__(self, materialize: Callable[[Tracked], Any],
                 rules: Mapping[str, Rule] | None = None, calls: frozenset = CALLS,
                 fallback: Rule | None = None):
        self.materialize_fn = materialize
        self.rules = dict(rules or {})
        self.calls = calls
        self.fallback = fallback

    # ------------------------------------------------------------------------------ values
    def materialize(self, v: Any) -> Any:
        """``v`` as an array (tracked values materialised, others unchanged)."""
        return self.materialize_fn(v) if isinstance(v, Tracked) else v

    def bind(self, eqn, invals: Sequence[Any]) -> list:
        """Binds ``eqn`` with every tracked input materialised."""
        return bind(eqn, [self.materialize(v) for v in invals])

    # ------------------------------------------------------------------------------ running
    def run(self, jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list:
        """Evaluates ``jaxpr`` (a ``Jaxpr``) on ``consts`` and ``args``; outputs may be
        tracked (the caller materialises them if it needs arrays)."""
        env: dict[Any, Any] = {}

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = c
        if len(args) != len(jaxpr.invars):
            raise ValueError(f"the jaxpr takes {len(jaxpr.invars)} inputs, got {len(args)}")
        for v, a in zip(jaxpr.invars, args):
            env[v] = a
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            if any(isinstance(v, Tracked) for v in invals):
                outs = self.eval_tracked(eqn, invals)
            else:
                outs = bind(eqn, invals)
            for v, o in zip(eqn.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    env[v] = o
        return [read(v) for v in jaxpr.outvars]

    def eval_tracked(self, eqn, invals: list) -> list:
        """One equation with tracked inputs: a view, a call, a rule, or materialise-and-bind."""
        name = eqn.primitive.name
        if name in self.calls:
            sub = sub_jaxpr(eqn)
            if sub is not None:
                inner = sub.jaxpr if hasattr(sub, "jaxpr") else sub
                consts = sub.consts if hasattr(sub, "consts") else []
                if len(inner.invars) == len(invals) and len(inner.constvars) == len(consts):
                    return self.run(inner, consts, invals)
        rule = self.rules.get(name)
        if rule is not None:
            out = rule(self, eqn, invals)
            if out is not None:
                return list(out)
        view = self.view(eqn, invals)
        if view is not None:
            return view
        if self.fallback is not None:
            return list(self.fallback(self, eqn, invals))
        return self.bind(eqn, invals)

    @staticmethod
    def view(eqn, invals: list) -> list | None:
        """Follows a tracked value through a transpose, a cast or an optimisation barrier."""
        name = eqn.primitive.name
        t = invals[0]
        if name == "transpose" and isinstance(t, Tracked):
            return [t.transposed(eqn.params["permutation"])]
        if name in VIEW_PRIMITIVES and len(invals) == 1 and isinstance(t, Tracked):
            aval = eqn.outvars[0].aval
            if tuple(aval.shape) == t.shape:
                return [t.cast(eqn.primitive, eqn.params, aval.dtype)]
        if name == "optimization_barrier":
            plain = [i for i, v in enumerate(invals) if not isinstance(v, Tracked)]
            outs = list(invals)
            if plain:
                res = lax.optimization_barrier(tuple(invals[i] for i in plain))
                for i, r in zip(plain, res):
                    outs[i] = r
            return outs
        return None


def trace(fn: Callable, *args) -> tuple[Any, Any]:
    """``(closed_jaxpr, out_tree)`` of ``fn(*args)`` for arrays or ``ShapeDtypeStruct``s."""
    closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
    return closed, jax.tree_util.tree_structure(shapes)


__all__ = ["ALL_CALLS", "CALLS", "Interpreter", "Rule", "Tracked", "VIEW_PRIMITIVES", "bind",
           "sub_jaxpr", "trace"]
