"""The spec and leaf protocols, their one registry, and the entry points built on them.

A **spec** is a frozen, hashable dataclass that says how to quantise one array (usable as a static
``jax.jit`` argument). Every spec class provides:

* ``kind`` (class attribute): its short name in text form (``"scalar"``, ``"pq"``, ...), with
  ``kind_aliases`` for other accepted names and ``positional`` for the fields written after ``:``;
* ``quantize(x, *, key=None) -> leaf``: the quantiser (``key`` for randomised specs);
* ``resolve(shape, role=None) -> spec``: the spec with every automatic field made concrete for an
  array of that shape (``role``: what the array is in a model, see :func:`distq.planning.leaf_role`);
* ``problem(shape) -> str | None``: why an array of that shape cannot take the spec (``None``: it
  can), found before any work;
* ``nbytes(shape) -> int``: the exact stored bytes of the leaf it would produce.

A **leaf type** is a pytree that holds a quantised array. Every leaf class provides ``kind``,
``array_fields`` (its array attributes, ``None`` ones allowed), ``shape``, ``dtype``, ``nbytes``
(true storage), ``bits_per_value``, ``dequantize(dtype=None)``, ``take(rows)`` (decoded rows of
the first axis, decoding only those), ``metadata()`` (JSON-able static data) and
``from_arrays(arrays, metadata)`` (validated rebuild, for checkpoints).

:func:`register` adds a spec class and its leaf class; nothing else in distq lists the types.
The text grammar (``KIND[:POS[:POS]][,key=value...]``) is :func:`parse_spec` / :func:`spec_str`;
the leaf protocol is :class:`distq.core.leaf.Leaf`, and the entry points :func:`distq.quantize` /
:func:`distq.dequantize` are in :mod:`distq.core.api`.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    import jax

_SPECS: dict[str, type] = {}  # kind and aliases -> spec class
_LEAVES: dict[str, type] = {}  # kind -> leaf class
_QUANTIZERS: dict[type, Callable] = {}  # built-in spec class -> quantiser(x, spec, key)

# the built-ins, loaded by name the first time the registry needs them: the specs (no JAX), and
# the quantisers with their leaf types (JAX); naming them here keeps the import graph acyclic
_BUILTIN_SPECS = ("distq.core.specs", "distq.core.specs_rotated", "distq.core.specs_vq")
_BUILTIN_IMPLS = ("distq.core.scalar", "distq.core.pq", "distq.core.cast", "distq.core.rotated",
                  "distq.core.vq")


def _load(modules) -> None:
    for name in (modules,) if isinstance(modules, str) else modules:
        importlib.import_module(name)


@runtime_checkable
class Spec(Protocol):
    """How to quantise one array (see the module docstring)."""

    kind: ClassVar[str]

    def quantize(self, x: jax.Array, *, key: jax.Array | None = None) -> Any: ...

    def resolve(self, shape: tuple[int, ...], role: str | None = None) -> "Spec": ...

    def problem(self, shape: tuple[int, ...]) -> str | None: ...

    def nbytes(self, shape: tuple[int, ...]) -> int: ...


def register(spec_cls: type, leaf_cls: type) -> None:
    """Registers a spec class and the leaf class its ``quantize`` returns.

    The spec class needs ``kind`` (and may have ``kind_aliases``); the leaf class needs ``kind``
    and ``array_fields``. Registering makes the spec valid in rules, plans, the CLI's text form,
    and its leaves known to :func:`is_quantized`, tree functions and checkpoints.

    Examples:
      A spec that stores matrices in float16, reusing :class:`distq.CastArray` as its leaf:

      >>> import dataclasses, math, jax.numpy as jnp, distq
      >>> from typing import ClassVar
      >>> from distq.core.spec import unregister
      >>> @dataclasses.dataclass(frozen=True)
      ... class Halve:
      ...     kind: ClassVar[str] = "halve"
      ...     def quantize(self, x, *, key=None):
      ...         return distq.Cast("float16").quantize(x)
      ...     def resolve(self, shape, role=None):
      ...         return self
      ...     def problem(self, shape):
      ...         return None if len(shape) == 2 else "needs a matrix"
      ...     def nbytes(self, shape):
      ...         return 2 * math.prod(shape)
      >>> distq.register(Halve, distq.CastArray)
      >>> distq.parse_spec("halve")
      Halve()
      >>> q, report = distq.quantize_tree({"w": jnp.ones((8, 8)), "b": jnp.ones(8)},
      ...                                 [("w", "halve"), ("b", None)])
      >>> type(q["w"]).__name__, report.bytes_after
      ('CastArray', 160)
      >>> distq.plan({"v": jnp.ones(8)}, Halve()).problems
      ("leaf 'v' (shape (8,)) cannot take halve: needs a matrix",)
      >>> unregister(Halve)
      >>> "halve" in distq.core.spec.spec_kinds()
      False
    """
    register_spec(spec_cls)
    register_leaf(leaf_cls)


def _check_kind(cls: type, what: str) -> None:
    if not isinstance(getattr(cls, "kind", None), str):
        raise TypeError(f"{what} class {cls.__name__} needs a str class attribute 'kind'")


def register_spec(spec_cls: type) -> None:
    """Registers a spec class under its ``kind`` and ``kind_aliases``."""
    _check_kind(spec_cls, "spec")
    for name in (spec_cls.kind, *getattr(spec_cls, "kind_aliases", ())):
        _SPECS[name] = spec_cls


def register_leaf(leaf_cls: type) -> None:
    """Registers a leaf class under its ``kind`` (checkpoints find it by that name)."""
    _check_kind(leaf_cls, "leaf")
    if not isinstance(getattr(leaf_cls, "array_fields", None), tuple):
        raise TypeError(f"leaf class {leaf_cls.__name__} needs a tuple 'array_fields'")
    _LEAVES[leaf_cls.kind] = leaf_cls


def register_quantizer(spec_cls: type, fn: Callable) -> None:
    """Registers ``fn(x, spec, key) -> leaf`` as the quantiser of a spec class whose
    ``quantize`` method delegates here (the built-ins: their specs are free of JAX)."""
    _QUANTIZERS[spec_cls] = fn


def quantizer(spec_cls: type) -> Callable:
    """The registered quantiser of a spec class (loading the built-in ones on first use)."""
    if spec_cls not in _QUANTIZERS:
        _load(_BUILTIN_IMPLS)
    try:
        return _QUANTIZERS[spec_cls]
    except KeyError:
        raise TypeError(f"no quantiser is registered for {spec_cls.__name__}") from None


def unregister(spec_cls: type) -> None:
    """Removes a spec class (every name it was registered under); its leaf class stays."""
    for name in [k for k, v in _SPECS.items() if v is spec_cls]:
        del _SPECS[name]


def spec_types() -> tuple[type, ...]:
    """The registered spec classes."""
    _load(_BUILTIN_SPECS)
    return tuple(dict.fromkeys(_SPECS.values()))


def leaf_types() -> tuple[type, ...]:
    """The registered leaf classes (the built-in ones loaded on first use)."""
    if not _LEAVES:
        _load(_BUILTIN_IMPLS)
    return tuple(_LEAVES.values())


def leaf_class(kind: str) -> type | None:
    """The leaf class registered under ``kind`` (``None`` if there is none)."""
    if kind not in _LEAVES:
        _load(_BUILTIN_IMPLS)
    return _LEAVES.get(kind)


def spec_kinds() -> tuple[str, ...]:
    """Every name the text form accepts for a spec (``none``/``keep`` included).

    Examples:
      >>> from distq.core.spec import leaf_class, spec_kinds
      >>> sorted(spec_kinds())
      ['cast', 'int', 'keep', 'nf4', 'none', 'pq', 'rotated', 'scalar', 'uniform', 'vq']
      >>> leaf_class("qarray").__name__, leaf_class("nothing")
      ('QArray', None)
    """
    _load(_BUILTIN_SPECS)
    return ("none", "keep", *_SPECS)


def is_spec(x: Any) -> bool:
    """``True`` for an instance of a registered spec class."""
    return isinstance(x, spec_types())


def is_quantized(x: Any) -> bool:
    """``True`` for a quantised leaf (an instance of a registered leaf class).

    Use it as ``is_leaf`` in ``jax.tree`` functions to treat quantised leaves as units.

    Examples:
      >>> import jax, jax.numpy as jnp, distq
      >>> tree = {"q": distq.quantize(jnp.ones((8, 8)), distq.Uniform(bits=4)), "x": jnp.ones(3)}
      >>> distq.is_quantized(tree["q"]), distq.is_quantized(tree["x"])
      (True, False)
      >>> len(jax.tree.leaves(tree)), len(jax.tree.leaves(tree, is_leaf=distq.is_quantized))
      (3, 2)
    """
    return isinstance(x, leaf_types())


def check_spec(spec: Any, where: str = "spec") -> None:
    """Raises ``TypeError`` unless ``spec`` is ``None`` or a registered spec.

    Examples:
      >>> import distq
      >>> from distq.core.spec import check_spec, is_spec
      >>> is_spec(distq.NF4()), is_spec("nf4")
      (True, False)
      >>> check_spec("nf4", "rules[0]")
      Traceback (most recent call last):
        ...
      TypeError: rules[0] must be None or a spec (...), got str
    """
    if spec is not None and not is_spec(spec):
        names = ", ".join(f"distq.{c.__name__}" for c in spec_types())
        raise TypeError(f"{where} must be None or a spec ({names}), got {type(spec).__name__}")


# ------------------------------------------------------------------------------- text grammar
#: short option names -> field names (offered only for specs that have the field)
OPTION_ALIASES = {
    "group": "group_size", "gs": "group_size", "gaxis": "group_axis",
    "sym": "symmetric", "scale": "scale_dtype", "obj": "objective", "iter": "max_iter",
    "codebook": "codebook_dtype", "cb": "codebook_dtype",
}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "f16": "float16", "half": "float16",
                  "fp32": "float32", "f32": "float32", "float": "float32"}


class SpecSyntaxError(ValueError):
    """A spec string that does not parse (unknown kind or option, a value of the wrong type)."""


def field_types(cls: type) -> dict[str, set[str]]:
    """``{field: set of type names}`` of a spec class's text-settable fields."""
    hidden = set(getattr(cls, "text_hidden", ()))
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in hidden:
            continue
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        names = {p.strip() for p in t.split("|")}
        if "Axis" in names:  # int | tuple[int, ...] | None
            names = (names - {"Axis"}) | {"axis", "None"}
        out[f.name] = names
    return out


def allowed_keys(cls: type) -> list[str]:
    """The option keys a spec class accepts (field names, then short forms)."""
    fields = field_types(cls)
    return sorted(fields) + sorted(a for a, full in OPTION_ALIASES.items() if full in fields)


def _split_options(text: str) -> list[str]:
    """Splits on commas outside parentheses (so ``axis=(0,1)`` stays one option)."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth = max(depth - 1, 0)
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def _parse_int(raw: str) -> int | None:
    try:
        return int(raw, 0) if raw.lower().startswith(("0x", "-0x")) else int(raw)
    except ValueError:
        return None


def _coerce(key: str, raw: str, types: set[str], where: str) -> Any:
    low = raw.strip().lower()
    if low in ("none", "null"):
        if "None" in types:
            return None
        raise SpecSyntaxError(f"{where}: {key} cannot be none")
    if "bool" in types:
        if low in ("true", "yes", "on", "1"):
            return True
        if low in ("false", "no", "off", "0"):
            return False
        raise SpecSyntaxError(f"{where}: {key} must be true or false, got {raw!r}")
    if "axis" in types:
        items = [s for s in re.split(r"[,+\s]+", low.strip("()[]")) if s]
        vals = [_parse_int(s) for s in items]
        if not items or any(v is None for v in vals):
            raise SpecSyntaxError(f"{where}: {key} must be an int or a tuple of ints like (0,1), "
                                  f"got {raw!r}")
        return tuple(vals) if low.startswith(("(", "[")) or len(vals) > 1 else vals[0]
    if "int" in types:
        v = _parse_int(raw.strip())
        if v is not None:
            return v
        if "float" not in types and "str" not in types:
            raise SpecSyntaxError(f"{where}: {key} must be an integer, got {raw!r}")
    if "float" in types:
        try:
            return float(raw)
        except ValueError:
            if "str" not in types:
                raise SpecSyntaxError(f"{where}: {key} must be a number, got {raw!r}") from None
    if raw.strip() == "":
        raise SpecSyntaxError(f"{where}: {key} needs a value")
    value = raw.strip()
    return _DTYPE_ALIASES.get(value.lower(), value) if key.endswith("dtype") else value


def parse_spec(text: str) -> Any:
    """Parses a spec's short text form; ``"none"``/``"keep"`` give ``None`` (keep the leaf).

    The form is ``KIND[:POS[:POS]][,key=value...]``: a registered kind (``scalar``, ``int``,
    ``nf4``, ``pq``, ``cast``, ...), its positional fields (``scalar:BITS``, ``pq:M:BITS``,
    ``cast:DTYPE``), then options named by the spec's fields or their short forms (``group``,
    ``sym``, ``scale``, ...); a bare ``key`` means ``key=true``. :func:`spec_str` writes it.

    Raises:
      SpecSyntaxError: (a ``ValueError``) an unknown kind or option, a bad value, or values
        the spec rejects; the message is one line and lists what is allowed.

    Examples:
      >>> import distq
      >>> distq.parse_spec("int:4,group=64,symmetric=false")
      Uniform(bits=4, symmetric=False, axis=None, group_size=64, group_axis=-1, scale_dtype='float32')
      >>> distq.parse_spec("none") is None
      True
      >>> distq.parse_spec(distq.spec_str(distq.PQ(m=16, opq=True))) == distq.PQ(m=16, opq=True)
      True
      >>> distq.parse_spec("scalar:4,grp=64")
      Traceback (most recent call last):
        ...
      distq.core.spec.SpecSyntaxError: bad spec 'scalar:4,grp=64': unknown option 'grp' for scalar; allowed: ...
    """
    where = f"bad spec {text!r}"
    kinds = ", ".join(spec_kinds())
    if not isinstance(text, str) or not text.strip():
        raise SpecSyntaxError(f"{where}: empty; expected one of {kinds}")
    head, *opts = _split_options(text.strip())
    wrapped = re.fullmatch(r"([\w-]+)\s*\((.*)\)", head, re.S)  # KIND(INNER SPEC)
    kind, *pos = [wrapped.group(1)] if wrapped else [p.strip() for p in head.split(":")]
    kind = kind.lower()
    if kind in ("none", "keep"):
        if pos or any(opts):
            raise SpecSyntaxError(f"{where}: '{kind}' takes no arguments or options")
        return None
    _load(_BUILTIN_SPECS)
    cls = _SPECS.get(kind)
    if cls is None:
        raise SpecSyntaxError(f"{where}: unknown kind {kind!r}; expected one of {kinds} "
                              "(e.g. scalar:4, int:8, nf4, pq:16:8, cast:bfloat16)")
    types = field_types(cls)
    if (wrapped is not None) != (getattr(cls, "wraps", None) is not None):
        raise SpecSyntaxError(f"{where}: {kind} takes no inner spec in parentheses"
                              if wrapped is not None else
                              f"{where}: {kind} wraps a spec: {kind}(INNER), e.g. {kind}(scalar:4)")
    names = list(getattr(cls, "positional", ()))
    if len(pos) > len(names):
        form = ":".join([kind] + [n.upper() for n in names])
        raise SpecSyntaxError(f"{where}: too many ':' parts; the form is {form}")
    kwargs: dict[str, Any] = {}
    if wrapped is not None:  # a wrapper spec (e.g. rotated(scalar:4)): the inner one
        kwargs[cls.wraps] = parse_spec(wrapped.group(2))
    for name, raw in zip(names, pos):
        kwargs[name] = _coerce(name, raw, types[name], where)
    for opt in opts:
        if not opt:
            raise SpecSyntaxError(f"{where}: empty option (a stray ',')")
        key, eq, raw = opt.partition("=")
        key = key.strip().lower().replace("-", "_")
        full = OPTION_ALIASES.get(key, key)
        if full not in types:
            raise SpecSyntaxError(f"{where}: unknown option {key!r} for {kind}; allowed: "
                                  f"{', '.join(allowed_keys(cls))}")
        if not eq:
            if "bool" not in types[full]:
                raise SpecSyntaxError(f"{where}: option {key!r} needs a value ({key}=...)")
            raw = "true"
        if full in kwargs:
            raise SpecSyntaxError(f"{where}: {full} is given twice")
        kwargs[full] = _coerce(full, raw, types[full], where)
    required = [n for n in names if n not in kwargs and _required(cls, n)]
    if required:
        form = ":".join([kind] + [n.upper() for n in names])
        raise SpecSyntaxError(f"{where}: {kind} needs {', '.join(required)} ({form})")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise SpecSyntaxError(f"{where}: {e}") from None


def _required(cls, name: str) -> bool:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def spec_str(spec: Any) -> str:
    """The short text form of a spec (``scalar:4,axis=-1``, ``pq:16:8,opq``, ``none``).

    :func:`parse_spec` reads it back. A spec class may define ``text_positional()`` to choose
    what its positional parts show (``Scalar`` shows its code bits).

    Examples:
      >>> import distq
      >>> distq.spec_str(distq.Scalar(bits=3, axis=-1)), distq.spec_str(distq.PQ(m=16, opq=True))
      ('scalar:3,axis=-1', 'pq:16:8,opq')
      >>> distq.spec_str(distq.Uniform(bits=4, group_size=64)), distq.spec_str(None)
      ('int:4,group_size=64', 'none')
    """
    if spec is None:
        return "none"
    cls = type(spec)
    names = list(getattr(cls, "positional", ()))
    shown = spec.text_positional() if hasattr(spec, "text_positional") else {
        n: getattr(spec, n) for n in names}
    hidden = set(getattr(cls, "text_hidden", ())) | set(names)
    parts = [cls.kind] + [str(shown[n]) for n in names if shown.get(n) is not None]
    if getattr(cls, "wraps", None) is not None:  # KIND(INNER SPEC)
        parts[0] += f"({spec_str(getattr(spec, cls.wraps))})"
    extra = []
    for f in dataclasses.fields(spec):
        if f.name in hidden:
            continue
        v = getattr(spec, f.name)
        if f.default is not dataclasses.MISSING and v == f.default and type(v) is type(
                f.default):
            continue
        if v is True:
            extra.append(f.name)
        elif v is False:
            extra.append(f"{f.name}=false")
        else:
            extra.append(f"{f.name}={v}".replace(" ", ""))
    return ":".join(parts) + ("," + ",".join(extra) if extra else "")
