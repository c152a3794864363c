"""The ``distq`` command line: quantise checkpoints, inspect them, run the demo and simulations.

Synopsis::

    distq quantize IN OUT --rule REGEX=SPEC [--rule ...] [--dry-run] [--force] [--quiet]
                          [--progress | --no-progress] [--seed N]
    distq info CKPT [--json]
    distq simulate [--quick] [--no-library] [--out DIR] [--replot]
    distq demo
    distq --version

``IN`` is a safetensors file (e.g. a Hugging Face ``model.safetensors``: leaves are named by their
dotted tensor names, ``encoder.layer.0.attention.self.query.weight``), a msgpack-serialised Flax
tree (``flax.serialization.msgpack_serialize``: leaves are named by their ``/``-joined paths,
``params/Dense_0/kernel``) or a distq checkpoint (``/``-joined paths; already quantised leaves
are kept). Rules are tried in order and the first whose regex ``re.fullmatch``-es the leaf's
name wins; a leaf no rule matches is kept as it is, and so is every leaf that is not floating
point (integer buffers such as ``position_ids``), whatever rule matches.

``SPEC`` is a short string (see :func:`parse_spec`)::

    none | keep                      keep the leaf as it is
    scalar[:BITS]                    distq.Scalar (distributional; default 4 bits)
    int[:BITS]                       distq.Uniform (integer; default 8 bits, symmetric)
    nf4                              distq.NF4 (blocks of 64)
    pq:M[:BITS]                      distq.PQ (M sub-spaces, default 8 bits; matrices only)
    cast[:DTYPE]                     distq.Cast (bfloat16 | float16 | float32)

followed by ``,key=value`` options: the spec's field names (``group_size``, ``axis``,
``symmetric``, ``opq``, ...) or their short forms (``group``, ``sym``, ``scale``, ...); a bare
``,key`` means ``key=true``. Values are parsed to int, float, bool (``true``/``false``), ``none``
or a tuple of ints (``axis=(0,1)``), as the field requires.

Exit status: 0 on success, 2 for a usage error (bad option, rule or spec string), 1 for any other
failure (missing or corrupt file, unsupported input format, a spec a leaf cannot take, refusing to
overwrite). Errors are one line on stderr, ``distq: error: ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import struct
import sys
import time
from typing import Any, Sequence

__all__ = ["main", "parse_spec", "parse_rule", "UsageError", "CliError"]

PROG = "distq"


# ----------------------------------------------------------------------------------- errors
class CliError(Exception):
    """A failure reported as one line on stderr with exit status 1."""

    exit_code = 1


class UsageError(CliError):
    """A command-line mistake (bad option, rule or spec string): exit status 2."""

    exit_code = 2


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (raised, not printed and exited)."""

    def error(self, message: str):  # noqa: D102 (argparse API)
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ----------------------------------------------------------------------------------- specs
_KINDS = ("none", "keep", "scalar", "int", "uniform", "nf4", "pq", "cast")
_CAST_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "f16": "float16", "half": "float16",
                 "fp32": "float32", "f32": "float32", "float": "float32"}
#: short option names -> the spec's field names (only those the spec has are offered)
_ALIASES = {
    "group": "group_size", "gs": "group_size", "gaxis": "group_axis",
    "sym": "symmetric", "scale": "scale_dtype", "obj": "objective", "iter": "max_iter",
    "codebook": "codebook_dtype", "cb": "codebook_dtype",
}
_HIDDEN = {"verbose"}  # PQ.verbose prints from inside jit: not a CLI option


def _spec_classes() -> dict:
    import distq

    return {"scalar": distq.Scalar, "int": distq.Uniform, "uniform": distq.Uniform,
            "nf4": distq.NF4, "pq": distq.PQ, "cast": distq.Cast}


def _field_types(cls) -> dict[str, set[str]]:
    """``{field name: set of type names}`` from the dataclass annotations (strings or types)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in _HIDDEN:
            continue
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        names = {p.strip() for p in t.split("|")}
        if "Axis" in names:  # int | tuple[int, ...] | None
            names = (names - {"Axis"}) | {"axis", "None"}
        out[f.name] = names
    return out


def _allowed_keys(cls) -> list[str]:
    fields = _field_types(cls)
    short = [a for a, full in _ALIASES.items() if full in fields]
    return sorted(fields) + sorted(short)


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
    """Parses one option value to the type its field wants; raises :class:`UsageError`."""
    low = raw.strip().lower()
    if low in ("none", "null"):
        if "None" in types:
            return None
        raise UsageError(f"{where}: {key} cannot be none")
    if "bool" in types:
        if low in ("true", "yes", "on", "1"):
            return True
        if low in ("false", "no", "off", "0"):
            return False
        raise UsageError(f"{where}: {key} must be true or false, got {raw!r}")
    if "axis" in types:
        inner = low.strip("()[]")
        items = [s for s in re.split(r"[,+\s]+", inner) if s]
        vals = [_parse_int(s) for s in items]
        if not items or any(v is None for v in vals):
            raise UsageError(f"{where}: {key} must be an int or a tuple of ints like (0,1), "
                             f"got {raw!r}")
        is_tuple = low.startswith(("(", "[")) or len(vals) > 1
        return tuple(vals) if is_tuple else vals[0]
    if "int" in types:
        v = _parse_int(raw.strip())
        if v is None:
            raise UsageError(f"{where}: {key} must be an integer, got {raw!r}")
        return v
    if "float" in types:
        try:
            return float(raw)
        except ValueError:
            raise UsageError(f"{where}: {key} must be a number, got {raw!r}") from None
    if raw.strip() == "":
        raise UsageError(f"{where}: {key} needs a value")
    return raw.strip()


def parse_spec(text: str) -> Any:
    """Parses a short spec string into a distq spec (or ``None`` for "keep").

    Args:
      text: ``KIND[:POS[:POS]][,key=value...]``; see the module docstring for the kinds
        (``none``, ``scalar:4``, ``int:8``, ``nf4``, ``pq:16:8``, ``cast:bfloat16``) and options
        (``scalar:4,group=64``, ``int:4,group=64,symmetric=false``, ``pq:16:8,opq=true``).

    Returns:
      ``None``, or a :class:`distq.Scalar`, :class:`distq.Uniform`, :class:`distq.NF4`,
      :class:`distq.PQ` or :class:`distq.Cast`.

    Raises:
      UsageError: an unknown kind or key, a value of the wrong type, or a spec the library
        rejects (e.g. ``scalar:40``); the message is one line.

    Examples:
      >>> parse_spec("int:4,group=64,symmetric=false")
      Uniform(bits=4, symmetric=False, axis=None, group_size=64, group_axis=-1, scale_dtype='float32')
      >>> parse_spec("none") is None
      True
    """
    where = f"bad spec {text!r}"
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"{where}: empty; expected one of {', '.join(_KINDS)}")
    head, *opts = _split_options(text.strip())
    kind, *pos = [p.strip() for p in head.split(":")]
    kind = kind.lower()
    if kind not in _KINDS:
        raise UsageError(f"{where}: unknown kind {kind!r}; expected one of "
                         f"{', '.join(_KINDS)} (e.g. scalar:4, int:8, nf4, pq:16:8, "
                         "cast:bfloat16)")
    if kind in ("none", "keep"):
        if pos or any(opts):
            raise UsageError(f"{where}: '{kind}' takes no arguments or options")
        return None
    cls = _spec_classes()[kind]
    types = _field_types(cls)
    kwargs: dict[str, Any] = {}
    # positional parts
    if kind in ("scalar", "int", "uniform"):
        names = ["bits"]
    elif kind == "pq":
        names = ["m", "bits"]
    elif kind == "cast":
        names = ["dtype"]
    else:  # nf4
        names = []
    if len(pos) > len(names):
        form = {"scalar": "scalar:BITS", "int": "int:BITS", "uniform": "uniform:BITS",
                "nf4": "nf4", "pq": "pq:M:BITS", "cast": "cast:DTYPE"}[kind]
        raise UsageError(f"{where}: too many ':' parts; the form is {form}")
    for name, raw in zip(names, pos):
        if name == "dtype":
            raw = _CAST_ALIASES.get(raw.lower(), raw)
        kwargs[name] = _coerce(name, raw, types[name], where)
    # options
    for opt in opts:
        if not opt:
            raise UsageError(f"{where}: empty option (a stray ',')")
        key, eq, raw = opt.partition("=")
        key = key.strip().lower().replace("-", "_")
        full = _ALIASES.get(key, key)
        if full not in types:
            raise UsageError(f"{where}: unknown option {key!r} for {kind}; allowed: "
                             f"{', '.join(_allowed_keys(cls))}")
        if not eq:
            if "bool" not in types[full]:
                raise UsageError(f"{where}: option {key!r} needs a value ({key}=...)")
            raw = "true"
        if full in kwargs:
            raise UsageError(f"{where}: {full} is given twice")
        if full == "dtype":
            raw = _CAST_ALIASES.get(raw.strip().lower(), raw)
        kwargs[full] = _coerce(full, raw, types[full], where)
    if kind == "pq" and "m" not in kwargs:
        raise UsageError(f"{where}: pq needs the number of sub-spaces, e.g. pq:16:8 (pq:M:BITS)")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{where}: {e}") from None


def parse_rule(text: str) -> tuple[str, Any]:
    """Parses ``REGEX=SPEC`` into ``(regex, spec)``; the regex is checked to compile.

    The split is at the first ``=`` that is followed by a spec kind (so a regex may hold ``=``,
    e.g. a lookahead, and a spec's options hold ``=`` too).

    Raises:
      UsageError: no ``=SPEC`` part, an invalid regex or a bad spec (one line).
    """
    kinds = "|".join(_KINDS)
    for m in re.finditer("=", text):
        rest = text[m.end():]
        if re.match(rf"\s*({kinds})\s*(:|,|$)", rest, re.IGNORECASE):
            regex = text[:m.start()]
            break
    else:
        raise UsageError(f"bad rule {text!r}: expected REGEX=SPEC with SPEC starting with one of "
                         f"{', '.join(_KINDS)} (e.g. '.*\\.weight=scalar:4')")
    if not regex:
        raise UsageError(f"bad rule {text!r}: empty regex (use '.*' to match every leaf)")
    try:
        re.compile(regex)
    except re.error as e:
        raise UsageError(f"bad rule {text!r}: invalid regex {regex!r}: {e}") from None
    return regex, parse_spec(rest)


# ----------------------------------------------------------------------------------- inputs
def _sniff(path: str) -> str:
    """``"distq"``, ``"safetensors"`` or ``"other"`` from the first bytes of a file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "other"
        (hlen,) = struct.unpack("<Q", head)
        if not 2 <= hlen <= min(1 << 28, size - 8):
            return "other"
        first = f.read(1)
        if first != b"{":
            return "other"
        raw = first + f.read(hlen - 1)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "other"
    if not isinstance(header, dict):
        return "other"
    meta = header.get("__metadata__")
    return "distq" if isinstance(meta, dict) and meta.get("format") == "distq" else "safetensors"


def _check_input(path: str) -> None:
    if not os.path.exists(path):
        raise CliError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CliError(f"{path}: is a directory, expected a file")
    if not os.access(path, os.R_OK):
        raise CliError(f"{path}: not readable")


def _read_msgpack(path: str):
    from flax import serialization

    with open(path, "rb") as f:
        raw = f.read()
    # a msgpack map starts with a fixmap (0x80-0x8f), map16 (0xde) or map32 (0xdf) byte
    if not raw or not (0x80 <= raw[0] <= 0x8F or raw[0] in (0xDE, 0xDF)):
        raise CliError(f"{path}: unsupported input format: neither a safetensors file, a distq "
                       "checkpoint nor a msgpack-serialised Flax tree")
    try:
        tree = serialization.msgpack_restore(raw)
    except Exception as e:  # msgpack raises many types for corrupt data
        raise CliError(f"{path}: cannot read it as a msgpack Flax tree "
                       f"({type(e).__name__}: {_one_line(e)})") from None
    if not isinstance(tree, dict):
        raise CliError(f"{path}: the msgpack data is a {type(tree).__name__}, not a tree of "
                       "arrays")
    return tree


def read_input(path: str) -> tuple[Any, str]:
    """Reads a checkpoint to quantise; returns ``(tree, format)``.

    Safetensors files give a flat ``{dotted name: array}`` dict (so each leaf's path is its
    dotted name); msgpack Flax trees and distq checkpoints give their nested trees.

    Raises:
      CliError: a missing, unreadable, corrupt or unsupported file.
    """
    import distq

    _check_input(path)
    kind = _sniff(path)
    try:
        if kind == "safetensors":
            return dict(distq.checkpoint.read_safetensors(path)), kind
        if kind == "distq":
            return distq.load(path, as_numpy=True), kind
    except distq.checkpoint.CheckpointError as e:
        raise CliError(_one_line(e)) from None
    return _read_msgpack(path), "msgpack"


# ----------------------------------------------------------------------------------- helpers
def _one_line(e: BaseException | str) -> str:
    s = str(e).strip()
    return " ".join(s.split()) or type(e).__name__


def _fmt_bytes(n: int) -> str:
    return f"{n:,}"


def _table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def _shape_str(shape) -> str:
    return "x".join(map(str, shape)) or "()"


def _is_float_dtype(leaf) -> bool:
    import numpy as np
    import jax.numpy as jnp

    dt = getattr(leaf, "dtype", None)
    if dt is None or not hasattr(leaf, "shape"):
        return False
    return bool(jnp.issubdtype(np.dtype(dt), jnp.floating))


def _leaves(tree) -> list[tuple[str, Any]]:
    import jax

    from . import tree as T

    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=T.is_quantized)
    return [(T.path_str(p), leaf) for p, leaf in flat]


def _match(rules, path: str) -> tuple[Any, int | None]:
    for i, (regex, spec) in enumerate(rules):
        if re.fullmatch(regex, path):
            return spec, i
    return None, None


def _problem(leaf, spec) -> str | None:
    """Why ``spec`` cannot be applied to ``leaf`` (checked before any work), or ``None``."""
    import distq
    from .core.scalar import layout_for

    shape = tuple(leaf.shape)
    try:
        if isinstance(spec, distq.PQ):
            if len(shape) != 2:
                return f"a PQ spec needs a matrix, got shape {shape}"
            if shape[1] % spec.m:
                return f"m={spec.m} sub-spaces must divide the row length {shape[1]}"
            if shape[0] < spec.num_centroids:
                return (f"bits={spec.bits} needs at least {spec.num_centroids} rows, got "
                        f"{shape[0]}")
        elif isinstance(spec, (distq.Scalar, distq.Uniform, distq.NF4)):
            layout_for(spec, shape)
    except ValueError as e:
        return _one_line(e)
    return None


class _Progress:
    """One stderr line per finished leaf: ``[12/103] name spec 0.4 s``."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled

    def __call__(self, i: int, name: str, what: str, seconds: float) -> None:
        if self.enabled:
            print(f"[{i}/{self.total}] {name} {what} {seconds:.1f} s", file=sys.stderr,
                  flush=True)


# ----------------------------------------------------------------------------------- quantize
def _quantize_leaves(tree, rules, seed: int, progress: _Progress):
    """Quantises leaf by leaf (for progress); returns ``(qtree, TreeReport)``."""
    import warnings

    import jax

    import distq
    from . import tree as T

    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=T.is_quantized)
    key = jax.random.key(seed)
    out, reports, used = [], [], [False] * len(rules)
    for i, (p, leaf) in enumerate(flat):
        path = T.path_str(p)
        spec, ri = _match(rules, path)
        if ri is not None:
            used[ri] = True
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            try:
                q, rep = distq.quantize_tree({path: leaf}, [(".*", spec)] if spec else [],
                                             key=jax.random.fold_in(key, i), warn_unused=False)
            except (ValueError, TypeError) as e:
                raise CliError(_one_line(e)) from None
        (r,) = rep.leaves
        if not r.note and not T.is_quantized(leaf) and not _is_float_dtype(leaf):
            r = dataclasses.replace(r, note="not floating point: kept")
        q = q[path]
        jax.block_until_ready(q)
        out.append(q)
        reports.append(r)
        progress(i + 1, path, T.spec_str(r.spec) if r.spec is not None else "kept",
                 time.perf_counter() - t0)
    unused = tuple(regex for (regex, _), u in zip(rules, used) if not u)
    return jax.tree_util.tree_unflatten(treedef, out), T.TreeReport(tuple(reports), unused)


def _dry_run(tree, rules) -> int:
    from . import tree as T

    rows = [("name", "shape", "dtype", "rule", "spec", "note")]
    used = [False] * len(rules)
    problems = []
    for path, leaf in _leaves(tree):
        spec, ri = _match(rules, path)
        if ri is not None:
            used[ri] = True
        note = ""
        if T.is_quantized(leaf):
            note, spec = ("already quantised: kept" if spec is not None else ""), None
        elif not _is_float_dtype(leaf):
            note, spec = "not floating point: kept", None
        elif spec is not None:
            spec = T.resolve_spec(spec, path, leaf)
            why = _problem(leaf, spec)
            if why:
                note = f"PROBLEM: {why}"
                problems.append(f"leaf {path!r}: {why}")
        rule = "-" if ri is None else f"#{ri + 1} {rules[ri][0]}"
        rows.append((path, _shape_str(getattr(leaf, "shape", ())),
                     str(getattr(leaf, "dtype", type(leaf).__name__)), rule,
                     T.spec_str(spec), note))
    print(_table(rows))
    n_q = sum(1 for r in rows[1:] if r[4] != "none")
    print(f"{len(rows) - 1} leaves, {n_q} to quantise (dry run: nothing written)")
    unused = [regex for (regex, _), u in zip(rules, used) if not u]
    if unused:
        print(f"rules that match no leaf: {unused}")
    if problems:
        raise CliError(f"{len(problems)} leaf/leaves cannot take their spec; first: "
                       f"{problems[0]}")
    return 0


def _check_output(inp: str, out: str, force: bool) -> None:
    same = os.path.realpath(inp) == os.path.realpath(out) or (
        os.path.exists(out) and os.path.samefile(inp, out))
    if same:
        raise CliError(f"refusing to overwrite the input {inp}; choose another OUT")
    if os.path.isdir(out):
        raise CliError(f"{out}: is a directory; give a file name for OUT")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise CliError(f"{out}: folder {folder} does not exist")
    if os.path.exists(out) and not force:
        raise CliError(f"{out} exists; use --force to overwrite it")


def cmd_quantize(args) -> int:
    """``distq quantize``: see ``distq quantize --help``."""
    import distq

    rules = [parse_rule(r) for r in args.rule]
    if args.out is None and not args.dry_run:
        raise UsageError("OUT is required unless --dry-run is given "
                         f"(see '{PROG} quantize --help')")
    _check_input(args.input)
    if args.out is not None and not args.dry_run:
        _check_output(args.input, args.out, args.force)
    t0 = time.perf_counter()
    tree, fmt = read_input(args.input)
    if args.dry_run:
        return _dry_run(tree, rules)
    for path, leaf in _leaves(tree):  # fail before any work, not after an hour
        spec, _ = _match(rules, path)
        if (spec is not None and hasattr(leaf, "shape") and _is_float_dtype(leaf)
                and not distq.is_quantized(leaf)):
            spec = distq.tree.resolve_spec(spec, path, leaf)
            why = _problem(leaf, spec)
            if why:
                raise CliError(f"leaf {path!r} (shape {tuple(leaf.shape)}) cannot take "
                               f"{distq.tree.spec_str(spec)}: {why}")
    show = args.progress if args.progress is not None else (
        sys.stderr.isatty() and not args.quiet)
    n = len(_leaves(tree))
    qtree, report = _quantize_leaves(tree, rules, args.seed, _Progress(n, show))
    metadata = {"source": os.path.basename(args.input), "source_format": fmt,
                "rules": json.dumps([[r, distq.tree.spec_str(s)] for r, s in rules]),
                "distq_version": distq.__version__}
    try:
        size = distq.save(args.out, qtree, report=report, metadata=metadata)
    except (OSError, ValueError, TypeError) as e:
        raise CliError(f"cannot write {args.out}: {_one_line(e)}") from None
    if not args.quiet:
        print(report.table())
        q = report.quantized()
        print(f"{len(q)} of {len(report.leaves)} leaves quantised, "
              f"{report.bits_per_weight():.2f} bits/weight on them; "
              f"{_fmt_bytes(report.bytes_before)} -> {_fmt_bytes(report.bytes_after)} bytes "
              f"({report.ratio:.2f}x); wrote {args.out} ({_fmt_bytes(size)} bytes) in "
              f"{time.perf_counter() - t0:.1f} s")
    return 0


# ----------------------------------------------------------------------------------- info
def _rows_from_tree(info: dict) -> list[dict]:
    """Per-leaf rows from the tree description (checkpoints saved without a report)."""
    tensors = info["tensors"]

    def nbytes(ref):
        a, b = tensors[ref]["data_offsets"]
        return int(b) - int(a)

    rows = []

    def walk(n, path):
        t = n.get("t")
        if t == "dict":
            for (_, k), v in zip(n["k"], n["v"]):
                walk(v, f"{path}/{k}" if path else str(k))
        elif t == "namedtuple":
            for f, v in zip(n["fields"], n["v"]):
                walk(v, f"{path}/{f}" if path else f)
        elif t in ("list", "tuple"):
            for i, v in enumerate(n["v"]):
                walk(v, f"{path}/{i}" if path else str(i))
        elif t == "array":
            e = tensors[n["ref"]]
            b = nbytes(n["ref"])
            rows.append({"path": path, "spec": "none", "shape": e["shape"], "dtype": e["dtype"],
                         "bytes_before": b, "bytes_after": b, "rel_error": None, "note": ""})
        elif t in ("qarray", "pqarray", "castarray"):
            meta = n.get("meta", {})
            b = sum(nbytes(r) for r in n["arrays"].values())
            rows.append({"path": path, "spec": t, "shape": meta.get("shape", []),
                         "dtype": meta.get("dtype", "?"), "bytes_before": None,
                         "bytes_after": b, "rel_error": None, "note": "no report stored"})

    walk(info["tree"], "")
    return rows


def _totals(rows: list[dict]) -> dict:
    before = sum(r["bytes_before"] or 0 for r in rows)
    after = sum(r["bytes_after"] or 0 for r in rows)
    qrows = [r for r in rows if r.get("spec") not in (None, "none")]
    qsize = sum(math.prod(r["shape"]) for r in qrows)
    return {"leaves": len(rows), "quantized_leaves": len(qrows), "bytes_before": before,
            "bytes_after": after, "ratio": before / max(after, 1),
            "bits_per_weight": 8.0 * sum(r["bytes_after"] or 0 for r in qrows) / max(qsize, 1)}


def cmd_info(args) -> int:
    """``distq info``: see ``distq info --help``."""
    import distq

    _check_input(args.ckpt)
    kind = _sniff(args.ckpt)
    try:
        if kind == "distq":
            info = distq.checkpoint.info(args.ckpt)
            rows = info["leaves"] or _rows_from_tree(info)
            fmt, user, size = "distq", info["user"], info["file_bytes"]
        elif kind == "safetensors":
            arrays = distq.checkpoint.read_safetensors(args.ckpt)
            rows = [{"path": k, "spec": "none", "shape": list(a.shape), "dtype": str(a.dtype),
                     "bytes_before": a.nbytes, "bytes_after": a.nbytes, "rel_error": None,
                     "note": ""} for k, a in arrays.items()]
            fmt, user, size = "safetensors (plain, not a distq checkpoint)", {}, \
                os.path.getsize(args.ckpt)
        else:
            raise CliError(f"{args.ckpt}: not a distq checkpoint or safetensors file")
    except distq.checkpoint.CheckpointError as e:
        raise CliError(_one_line(e)) from None
    totals = _totals(rows)
    if args.json:
        print(json.dumps({"file": args.ckpt, "format": fmt, "file_bytes": size,
                          "metadata": user, "totals": totals, "leaves": rows}, indent=1))
        return 0
    table = [("name", "spec", "shape", "dtype", "bytes", "-> bytes", "bits/val", "rel err",
              "note")]
    for r in rows:
        size_r = max(math.prod(r["shape"]), 1)
        table.append((r["path"], r["spec"], _shape_str(r["shape"]), r["dtype"],
                      "?" if r["bytes_before"] is None else _fmt_bytes(r["bytes_before"]),
                      _fmt_bytes(r["bytes_after"]), f"{8 * r['bytes_after'] / size_r:.2f}",
                      "-" if r["rel_error"] is None else f"{r['rel_error']:.2e}", r["note"]))
    table.append(("total", "", "", "", _fmt_bytes(totals["bytes_before"]),
                  _fmt_bytes(totals["bytes_after"]), "", "", f"{totals['ratio']:.2f}x smaller"))
    print(f"{args.ckpt}: {fmt}, {_fmt_bytes(size)} bytes")
    for k, v in user.items():
        print(f"  {k}: {v}")
    print(_table(table))
    print(f"{totals['quantized_leaves']} of {totals['leaves']} leaves quantised, "
          f"{totals['bits_per_weight']:.2f} bits/weight on them")
    return 0


# ----------------------------------------------------------------------------------- simulate, demo
def _experiments_dir() -> str:
    """The source checkout's ``experiments`` folder (absent from an installed wheel)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "experiments")


def cmd_simulate(args) -> int:
    """``distq simulate``: runs ``experiments/simulations.py`` of the source checkout."""
    path = os.path.join(_experiments_dir(), "simulations.py")
    if not os.path.isfile(path):
        raise CliError(f"the simulations script is not available ({path} does not exist): it "
                       "ships with the distq source repository, not the installed package; run "
                       "'distq simulate' from an editable install of a checkout")
    missing = [m for m in ("matplotlib", "scipy") if importlib.util.find_spec(m) is None]
    if missing:
        raise CliError(f"distq simulate needs {', '.join(missing)}: "
                       "pip install 'distq[experiments]'")
    argv = (["--quick"] if args.quick else []) + (["--no-library"] if args.no_library else [])
    argv += (["--out", args.out] if args.out else []) + (["--replot"] if args.replot else [])
    if args.replot:
        out = args.out or os.path.join(_experiments_dir(), "figures")
        if not os.path.isfile(os.path.join(out, "simulations.json")):
            raise CliError(f"--replot needs {os.path.join(out, 'simulations.json')} from an "
                           "earlier run")
    spec = importlib.util.spec_from_file_location("simulations", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["simulations"] = mod  # its dataclasses and process pool look it up by name
    spec.loader.exec_module(mod)
    return int(mod.main(argv) or 0)


def cmd_demo(args) -> int:
    """``distq demo``: runs :func:`distq.demo.main`."""
    del args
    from . import demo

    demo.main()
    return 0


# ----------------------------------------------------------------------------------- parser
_SPEC_HELP = """\
rules (REGEX=SPEC, first re.fullmatch on the leaf's name wins; unmatched leaves are kept):
  SPEC  none | keep              keep the leaf
        scalar[:BITS]            distributional scalar quantiser (distq.Scalar, default 4 bits)
        int[:BITS]               uniform integers (distq.Uniform, default 8 bits)
        nf4                      NormalFloat-4 in blocks of 64 (distq.NF4)
        pq:M[:BITS]              product quantisation, M sub-spaces (distq.PQ; matrices only)
        cast[:DTYPE]             store as bfloat16 | float16 | float32 (distq.Cast)
  options ',key=value' (the spec's field names or short forms), e.g.
        scalar:4,group=64   scalar:4,axis=1   int:4,group=64,symmetric=false
        pq:16:8,opq=true    scalar:3,dist=gaussian,robust   cast:bf16
  short forms: group=group_size, gaxis=group_axis, sym=symmetric, scale=scale_dtype,
        obj=objective, iter=max_iter, codebook=codebook_dtype

names: safetensors files (Hugging Face) use the dotted tensor names
  ('encoder.layer.0.attention.self.query.weight'); msgpack Flax trees and distq checkpoints use
  '/'-joined paths ('params/Dense_0/kernel'). Leaves that are not floating point (e.g.
  position_ids) are always kept. Use --dry-run to see each leaf's rule.

example:
  distq quantize model.safetensors model.distq \\
      --rule '.*word_embeddings.*=pq:32:8' --rule '.*\\.weight=scalar:4,axis=0' \\
      --rule '.*=none'
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``distq`` argument parser (subcommands quantize, info, simulate, demo)."""
    from . import __version__

    p = _Parser(prog=PROG, description="Quantise checkpoints with distq and inspect them.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    q = sub.add_parser(
        "quantize", help="quantise a safetensors / msgpack Flax checkpoint by name rules",
        description="Quantise a checkpoint (safetensors, msgpack Flax tree or distq) into a\n"
                    "distq checkpoint, by rules on the leaf names.",
        epilog=_SPEC_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("input", metavar="IN", help="input checkpoint")
    q.add_argument("out", metavar="OUT", nargs="?", help="output distq checkpoint (written "
                   "atomically, with the report); optional with --dry-run")
    q.add_argument("-r", "--rule", action="append", required=True, metavar="REGEX=SPEC",
                   help="a rule (repeatable; tried in order)")
    q.add_argument("-n", "--dry-run", action="store_true",
                   help="show which rule and spec each leaf would get; write nothing")
    q.add_argument("-f", "--force", action="store_true", help="overwrite an existing OUT")
    q.add_argument("-q", "--quiet", action="store_true", help="do not print the report")
    q.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a stderr line per leaf (default: when stderr is a terminal)")
    q.add_argument("--seed", type=int, default=0, help="random seed for PQ's k-means "
                   "(default 0)")
    q.set_defaults(func=cmd_quantize)

    i = sub.add_parser("info", help="per-leaf table of a distq checkpoint",
                       description="Show a checkpoint's leaves (name, spec, shape, bytes, "
                                   "error) and totals. Plain safetensors files are listed too.")
    i.add_argument("ckpt", metavar="CKPT", help="a distq checkpoint")
    i.add_argument("--json", action="store_true", help="machine-readable JSON output")
    i.set_defaults(func=cmd_info)

    s = sub.add_parser("simulate", help="run the error-versus-bits simulations "
                                        "(experiments/simulations.py; source checkout only)",
                       description="Run experiments/simulations.py (writes figures, "
                                   "simulations.json and summary.md).")
    s.add_argument("--quick", action="store_true", help="small samples (about a minute)")
    s.add_argument("--no-library", action="store_true",
                   help="skip the JAX library runs (distq.Scalar/Uniform/compat, distquant)")
    s.add_argument("--out", metavar="DIR", help="output folder (default experiments/figures)")
    s.add_argument("--replot", action="store_true",
                   help="only redraw the figures and tables from DIR/simulations.json")
    s.set_defaults(func=cmd_simulate)

    d = sub.add_parser("demo", help="what distq does, on built-in data, in a few seconds",
                       description="Run the demo (python -m distq.demo).")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``distq`` command line; returns the exit status.

    Args:
      argv: the arguments without the program name (default ``sys.argv[1:]``).

    Returns:
      0 on success, 2 for a usage error, 1 for any other failure (one line on stderr).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help / --version
            return int(e.code or 0) if not isinstance(e.code, str) else 2
        if args.command is None:
            raise UsageError("a command is required (quantize, info, simulate, demo); "
                             f"see '{PROG} --help'")
        return int(args.func(args) or 0)
    except CliError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `distq info x | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:  # pragma: no cover
            pass
        return 1
    except OSError as e:  # an unreadable file, a full disk...
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
