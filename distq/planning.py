"""From rules to a plan: which spec each leaf of a tree gets, and every problem before any work.

A *rule set* maps each leaf of a parameter tree to a spec (or ``None``: keep the leaf):

* an ordered sequence of ``(regex, spec)`` pairs, tried in order against the leaf's path (its
  keys joined by ``/``, e.g. ``params/Dense_0/kernel``), first ``re.fullmatch`` wins; a spec may
  also be given in its text form (``"scalar:4,group=64"``, see :func:`distq.parse_spec`);
* a callable ``(path, leaf) -> spec | None``;
* a single spec, applied to every floating-point leaf.

:func:`plan` resolves the rules against a tree (or a tree of ``jax.ShapeDtypeStruct``, so a plan
needs no data): per leaf the rule that matched, the spec with its automatic fields made concrete
for that leaf (:meth:`distq.Scalar.resolve`), the exact bytes before and after, why a leaf is
kept, and any problem (a spec the leaf cannot take). :func:`distq.quantize_tree`,
:func:`distq.fake_quantize_tree` and the command line all consume a plan, so a dry run shows
exactly what the real run will do.

Leaves that are not floating point (integer buffers, PRNG keys, step counters) are always kept;
leaves already quantised are left alone; a leaf whose spec would not make it smaller is kept and
the plan says so. Trees can be plain dicts, Flax linen ``{'params': ...}`` trees or
``nnx.State``: paths of nnx variables leave out the trailing ``value``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .core import spec as _spec
from .core.specs import INPUT_AXIS

Rules = Any  # Sequence[tuple[str, Spec | str | None]] | Callable[[str, Any], Spec | None] | Spec


# ---------------------------------------------------------------------------------- paths
def _key_str(k) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def path_str(path) -> str:
    """The ``/``-joined path of a ``jax.tree_util`` key path (nnx's trailing ``value`` dropped)."""
    parts = [_key_str(k) for k in path]
    if parts and parts[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
        parts = parts[:-1]
    return "/".join(parts)


def leaves_with_paths(tree) -> tuple[list[tuple[str, Any]], Any]:
    """``([(path, leaf), ...], treedef)``; quantised leaves are kept whole.

    Examples:
      >>> import jax, jax.numpy as jnp, distq
      >>> q = distq.quantize(jnp.ones((4, 4)), distq.Uniform(bits=4))
      >>> tree = {"params": {"Dense_0": {"kernel": q}}, "rng": jax.random.key(0), "step": 3}
      >>> [(path, distq.is_quantized(leaf)) for path, leaf in leaves_with_paths(tree)[0]]
      [('params/Dense_0/kernel', True), ('rng', False), ('step', False)]
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_spec.is_quantized)
    return [(path_str(p), leaf) for p, leaf in flat], treedef


def leaf_role(path: str) -> str:
    """What a parameter is, by its name: ``"kernel"`` (Flax Dense/Conv), ``"weight"`` (PyTorch
    Linear/Conv/Embedding state dicts), ``"embedding"`` (Flax Embed) or ``"matrix"``.

    Examples:
      >>> [leaf_role(p) for p in ("params/Dense_0/kernel", "encoder.layer.0.weight",
      ...                         "Embed_0/embedding", "w")]
      ['kernel', 'weight', 'embedding', 'matrix']
    """
    parts = [p for p in re.split(r"[/.]", path) if p not in ("value", "raw_value")]
    name = parts[-1].lower() if parts else ""
    return name if name in INPUT_AXIS else "matrix"


# ---------------------------------------------------------------------------------- leaves
def is_key(leaf) -> bool:
    """``True`` for typed JAX PRNG key arrays (``jax.random.key``)."""
    dt = getattr(leaf, "dtype", None)
    return dt is not None and jax.dtypes.issubdtype(dt, jax.dtypes.prng_key)


def is_float(leaf) -> bool:
    """``True`` for a floating-point array (or ``ShapeDtypeStruct``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> is_float(jnp.ones(2)), is_float(jax.ShapeDtypeStruct((2,), jnp.bfloat16))
      (True, True)
      >>> is_float(jnp.arange(3)), is_float(jax.random.key(0)), is_key(jax.random.key(0))
      (False, False, True)
    """
    dt = getattr(leaf, "dtype", None)
    if dt is None or not hasattr(leaf, "shape") or is_key(leaf):
        return False
    return bool(jnp.issubdtype(dt, jnp.floating))


def leaf_nbytes(leaf) -> int:
    """True storage of one leaf: packed codes for quantised ones, key data for PRNG keys.

    Examples:
      >>> import jax, jax.numpy as jnp, distq
      >>> leaf_nbytes(jnp.ones((3, 2))), leaf_nbytes(jax.random.key(0)), leaf_nbytes("text")
      (24, 8, 0)
      >>> leaf_nbytes(distq.quantize(jnp.ones((8, 8)), distq.Uniform(bits=4)))  # codes + scale
      36
    """
    if _spec.is_quantized(leaf):
        return int(leaf.nbytes)
    if is_key(leaf):
        data = jax.eval_shape(jax.random.key_data, leaf)
        return math.prod(data.shape) * np.dtype(data.dtype).itemsize
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
    if isinstance(leaf, (bool, int, float, complex, np.generic)):
        return np.asarray(leaf).nbytes
    return 0


def tree_nbytes(tree) -> int:
    """Total true bytes of a (possibly quantised) tree: codes packed, codebooks, scales counted.

    Examples:
      >>> import jax.numpy as jnp, distq
      >>> t = {"w": jnp.zeros((64, 64)), "b": jnp.zeros(64)}
      >>> distq.tree_nbytes(t)
      16640
      >>> q, _ = distq.quantize_tree(t, [("w", distq.Uniform(bits=4)), (".*", None)])
      >>> distq.tree_nbytes(q)  # 2048 B of codes, 1 scale, 256 B of bias
      2308
    """
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=_spec.is_quantized)
    return sum(leaf_nbytes(x) for x in leaves)


# ---------------------------------------------------------------------------------- rules
class _Matcher:
    """Resolves a rule set into ``(path, leaf) -> (spec, rule index)``."""

    def __init__(self, rules: Rules):
        self.callable = None
        self.rules: list[tuple[re.Pattern, Any]] = []
        if _spec.is_spec(rules) or isinstance(rules, str):
            rules = [(".*", rules)]
        if callable(rules) and not _spec.is_spec(rules):
            self.callable = rules
        elif isinstance(rules, Sequence) and not isinstance(rules, (str, bytes)):
            for i, r in enumerate(rules):
                if not (isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str)):
                    raise TypeError(
                        f"rules[{i}] must be a (regex, spec or None) pair, got {r!r}")
                spec = _spec.parse_spec(r[1]) if isinstance(r[1], str) else r[1]
                _spec.check_spec(spec, f"rules[{i}]")
                try:
                    pat = re.compile(r[0])
                except re.error as e:
                    raise ValueError(f"rules[{i}]: invalid regex {r[0]!r}: {e}") from None
                self.rules.append((pat, spec))
        else:
            raise TypeError(
                "rules must be a list of (regex, spec) pairs, a callable (path, leaf) -> spec, "
                f"or a single spec; got {type(rules).__name__}")

    def __call__(self, path: str, leaf) -> tuple[Any, int | None]:
        if self.callable is not None:
            spec = self.callable(path, leaf)
            spec = _spec.parse_spec(spec) if isinstance(spec, str) else spec
            _spec.check_spec(spec, f"rules({path!r})")
            return spec, None
        for i, (pat, spec) in enumerate(self.rules):
            if pat.fullmatch(path):
                return spec, i
        return None, None


# ---------------------------------------------------------------------------------- the plan
@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """What a plan does with one leaf.

    Attributes:
      path: the ``/``-joined path.
      shape, dtype: of the leaf.
      spec: the resolved spec that will be applied, or ``None`` (the leaf is kept).
      requested: the spec the rule gave (before resolution and before any keep decision).
      rule: index of the rule that matched (``None``: no rule, or a callable rule set).
      bytes_before: the leaf's true bytes now.
      bytes_after: its exact bytes after the plan (``bytes_before`` when kept).
      note: why a leaf with a requested spec is kept, or advice about the spec.
      problem: why the leaf cannot take the spec (the plan then fails its :meth:`Plan.check`).
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    spec: Any
    requested: Any
    rule: int | None
    bytes_before: int
    bytes_after: int
    note: str = ""
    problem: str | None = None

    @property
    def bits_per_value(self) -> float:
        return 8.0 * self.bytes_after / max(math.prod(self.shape), 1)


class ByteTotals:
    """Totals over ``self.leaves`` (rows with ``bytes_before``, ``bytes_after`` and ``spec``)."""

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.leaves)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.leaves)

    @property
    def ratio(self) -> float:
        return self.bytes_before / max(self.bytes_after, 1)

    def quantized(self) -> tuple:
        """The rows that get (or got) a spec."""
        return tuple(r for r in self.leaves if r.spec is not None)


@dataclasses.dataclass(frozen=True)
class Plan(ByteTotals):
    """Every leaf's resolved spec, the rules that matched nothing, and every problem.

    Made by :func:`plan`; consumed by :func:`distq.quantize_tree` (pass it as ``rules``),
    :func:`distq.fake_quantize_tree` and the command line. ``str(plan)`` is a table.

    Examples:
      >>> import jax, jax.numpy as jnp, distq
      >>> params = {"w": jax.ShapeDtypeStruct((64, 30), jnp.float32), "b": jnp.zeros(4)}
      >>> p = distq.plan(params, [("w", distq.PQ(m=4, bits=4)), ("b", None), ("head", None)])
      >>> print(p)
      path   rule  spec    shape  bytes  -> bytes  bits/val  note
      ---...
      b      1: b  none    4      16     16        32.00
      w      0: w  pq:4:4  64x30  7,680  7,680     32.00     PROBLEM: m=4 sub-spaces must divide
                                                                      the row length 30
      total                       7,696  7,696               1.00x smaller
      rules that matched nothing: ['head']
      >>> p.check()
      Traceback (most recent call last):
        ...
      ValueError: leaf 'w' (shape (64, 30)) cannot take pq:4:4: m=4 sub-spaces must divide the row length 30
      >>> p.check(allow_unused=False)
      Traceback (most recent call last):
        ...
      ValueError: 2 problems:
        leaf 'w' ...
        rules that matched no leaf: ['head']
    """

    leaves: tuple[LeafPlan, ...]
    rules: tuple[str, ...] = ()
    unused_rules: tuple[str, ...] = ()
    treedef: Any = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def problems(self) -> tuple[str, ...]:
        """One line per leaf that cannot take its spec."""
        return tuple(
            f"leaf {r.path!r} (shape {r.shape}) cannot take {_spec.spec_str(r.requested)}: "
            f"{r.problem}" for r in self.leaves if r.problem)

    def check(self, *, allow_unused: bool = True) -> "Plan":
        """Raises ``ValueError`` naming every problem (and unused rule unless
        ``allow_unused``); returns the plan itself otherwise."""
        lines = list(self.problems)
        if not allow_unused and self.unused_rules:
            lines.append(f"rules that matched no leaf: {list(self.unused_rules)}")
        if lines:
            raise ValueError("; ".join(lines) if len(lines) == 1 else
                             f"{len(lines)} problems:\n  " + "\n  ".join(lines))
        return self

    def table(self) -> str:
        """One row per leaf (path, rule, spec, shape, bytes before and after, note)."""
        rows = [("path", "rule", "spec", "shape", "bytes", "-> bytes", "bits/val", "note")]
        for r in self.leaves:
            rule = "-" if r.rule is None else f"{r.rule}: {self.rules[r.rule]}" \
                if r.rule < len(self.rules) else str(r.rule)
            note = f"PROBLEM: {r.problem}" if r.problem else r.note
            rows.append((r.path, rule, _spec.spec_str(r.spec if r.spec is not None
                                                      else (r.requested if r.problem else None)),
                         "x".join(map(str, r.shape)) or "()", f"{r.bytes_before:,}",
                         f"{r.bytes_after:,}", f"{r.bits_per_value:.2f}", note))
        rows.append(("total", "", "", "", f"{self.bytes_before:,}", f"{self.bytes_after:,}", "",
                     f"{self.ratio:.2f}x smaller"))
        out = format_table(rows)
        if self.unused_rules:
            out += f"\nrules that matched nothing: {list(self.unused_rules)}"
        return out

    def __str__(self) -> str:
        return self.table()


def format_table(rows: list[tuple]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def _leaf_plan(path: str, leaf, requested, rule) -> LeafPlan:
    shape = tuple(int(s) for s in getattr(leaf, "shape", ()))
    dtype = str(getattr(leaf, "dtype", type(leaf).__name__))
    before = leaf_nbytes(leaf)
    kept = dict(path=path, shape=shape, dtype=dtype, spec=None, requested=requested, rule=rule,
                bytes_before=before, bytes_after=before)
    if requested is None:
        return LeafPlan(**kept)
    if _spec.is_quantized(leaf):
        return LeafPlan(**kept, note="already quantised")
    if not is_float(leaf):
        return LeafPlan(**kept, note="not floating point: kept")
    if math.prod(shape) == 0:
        return LeafPlan(**kept, note="empty: kept")
    spec = requested.resolve(shape, role=leaf_role(path))
    why = spec.problem(shape)
    if why:
        return LeafPlan(**kept, problem=why)
    after = int(spec.nbytes(shape))
    if after >= before:
        return LeafPlan(**kept, note=f"kept: {_spec.spec_str(spec)} would take {after:,} B")
    advice = spec.advice(shape) if hasattr(spec, "advice") else None
    return LeafPlan(**{**kept, "spec": spec, "bytes_after": after}, note=advice or "")


def plan(params: Any, rules: Rules) -> Plan:
    """Resolves ``rules`` against the leaves of ``params``; no quantisation happens.

    Args:
      params: a parameter tree (dicts, Flax linen variables, ``nnx.State``); leaves may be
        arrays or ``jax.ShapeDtypeStruct`` (a plan needs only shapes and dtypes).
      rules: ``[(regex, spec | str | None), ...]``, a callable ``(path, leaf) -> spec | None``,
        or one spec for every float leaf (see the module docstring).

    Returns:
      A :class:`Plan`: per leaf the resolved spec (or why it is kept), exact bytes before and
      after, problems (``plan.problems``; ``plan.check()`` raises on them) and
      ``plan.unused_rules``.

    Examples:
      A plan needs only shapes and dtypes:

      >>> import jax, jax.numpy as jnp, distq
      >>> f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
      >>> params = {"dense": {"kernel": f32(1024, 512), "bias": f32(512)}, "norm": {"scale": f32(2)}}
      >>> p = distq.plan(params, [(r".*kernel", distq.Scalar(bits=4)), (r".*/(bias|scale)", "int:8"),
      ...                         (r"head/.*", distq.NF4())])
      >>> for r in p.leaves:
      ...     print(r.path, distq.spec_str(r.spec), r.bytes_before, r.bytes_after)
      dense/bias int:8 2048 516
      dense/kernel scalar:4,axis=0,scale_dtype=bfloat16,outliers=0.00532 2097152 278510
      norm/scale none 8 8

      The kernel's automatic fields became per-input-channel bfloat16 scales and 0.5 % outliers
      (:meth:`distq.Scalar.resolve`); the 2-value leaf is kept, as ``int:8`` would not shrink it:

      >>> p.leaves[2].note, p.unused_rules, round(p.ratio, 2)
      ('kept: int:8 would take 8 B', ('head/.*',), 7.52)
      >>> p.check() is p  # no problems
      True
    """
    if isinstance(rules, Plan):
        return rules
    matcher = _Matcher(rules)
    leaves, treedef = leaves_with_paths(params)
    out, used = [], set()
    for path, leaf in leaves:
        requested, rule = matcher(path, leaf)
        if rule is not None:
            used.add(rule)
        out.append(_leaf_plan(path, leaf, requested, rule))
    patterns = tuple(pat.pattern for pat, _ in matcher.rules)
    unused = tuple(p for i, p in enumerate(patterns) if i not in used)
    return Plan(tuple(out), patterns, unused, treedef)


__all__ = ["LeafPlan", "Plan", "Rules", "is_float", "is_key", "leaf_nbytes", "leaf_role",
           "leaves_with_paths", "path_str", "plan", "tree_nbytes"]
