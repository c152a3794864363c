"""The ``distq`` command line: quantise checkpoints, inspect them, run the demo.

Synopsis::

    distq quantize IN OUT --rule REGEX=SPEC [--rule ...] [--dry-run] [--allow-unused]
                          [--force] [--quiet] [--progress | --no-progress] [--seed N]
                          [--entropy-coded]
    distq info CKPT [--json]
    distq demo
    distq --version

``IN`` is a safetensors file (e.g. a Hugging Face ``model.safetensors``: leaves are named by their
dotted tensor names, ``encoder.layer.0.attention.self.query.weight``), a sharded one's index
(``model.safetensors.index.json``, the shards beside it) or a folder holding either, a
msgpack-serialised Flax tree (``flax.serialization.msgpack_serialize``: leaves are named by their
``/``-joined paths, ``params/Dense_0/kernel``) or a distq checkpoint (``/``-joined paths; already
quantised leaves are kept).

Safetensors input streams: the plan is made from the headers alone, then each tensor is
memory-mapped, quantised, written to the output (hashed as it goes) and dropped, so memory holds
about one leaf and its quantiser's work whatever the model's size; the output appears atomically
at the end (a failure or an interrupt leaves no file and the old ``OUT`` untouched). Each leaf
gets the same key as in :func:`distq.quantize_tree` (``fold_in(key(seed), i)``), so the result
is the library's. ``--entropy-coded`` stores the packed codes rANS-coded where smaller
(:mod:`distq.core.entropy`); ``distq info`` then shows the fixed-rate and the stored bits per
value.

The command line is a thin layer over the library: the rules become a :func:`distq.plan` (which
rule and resolved spec each leaf gets, every problem, the rules that match nothing); ``--dry-run``
prints that plan, and the real run checks it before any work and hands it to
:func:`distq.quantize_tree`. ``SPEC`` is the text form of :func:`distq.parse_spec`
(``scalar:4,group=64``, ``int:8``, ``nf4``, ``pq:16:8``, ``cast:bf16``, ``none``).

This module imports only the standard library: ``--help``, ``--version`` and the usage errors
that need no spec (a missing argument, a rule without ``=SPEC``, a bad ``--seed``) answer before
JAX is imported.

Exit status: 0 on success, 2 for a usage error (bad option, rule or spec string), 1 for any other
failure (missing or corrupt file, unsupported input format, a spec a leaf cannot take, a rule that
matches no leaf, refusing to overwrite). Errors are one line on stderr, ``distq: error: ...``;
set ``DISTQ_TRACEBACK=1`` to see the traceback of an unexpected one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import struct
import sys
import time
import warnings
from typing import Any, Sequence

__all__ = ["main", "build_parser", "parse_spec", "parse_rule", "read_input", "UsageError",
           "CliError"]

PROG = "distq"
#: ``--seed`` range: a ``jax.random.key`` seed is 32 bits wide without x64 (larger ones collide)
SEED_MAX = 2**32 - 1
#: largest integer option value: JAX integers are 32-bit by default
_INT_MAX = 2**31 - 1


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


def _one_line(e: BaseException | str) -> str:
    s = str(e).strip()
    return " ".join(s.split()) or type(e).__name__


def _clip(s: str, limit: int = 80) -> str:
    """``s``, or its start and its length when it is longer than ``limit`` characters."""
    return s if len(s) <= limit else f"{s[:limit - 24]}...({len(s)} characters)"


def _quoted(text: str) -> str:
    """``repr(text)``, clipped (a pasted 4000-digit number stays a readable message)."""
    return repr(text) if len(text) <= 80 else f"{repr(text[:56])}...({len(text)} characters)"


# ----------------------------------------------------------------------------------- specs
def _spec_module():
    """:mod:`distq.core.spec`: the registry and the text grammar (no JAX: the built-in specs
    are plain dataclasses, their quantisers load when work starts)."""
    from .core import spec

    return spec


def _checkpoint_module():
    """:mod:`distq.checkpoint`, with the built-in leaf kinds registered so that it reads them."""
    _spec_module()
    from . import checkpoint

    return checkpoint


def _check_int_range(spec: Any, where: str) -> None:
    """Rejects integer fields beyond JAX's 32-bit integers (``max_iter=10000000000`` would
    overflow inside a jitted computation, after the earlier leaves' work)."""
    if not dataclasses.is_dataclass(spec):
        return
    for f in dataclasses.fields(spec):
        v = getattr(spec, f.name)
        for x in v if isinstance(v, tuple) else (v,):
            if isinstance(x, int) and not isinstance(x, bool) and abs(x) > _INT_MAX:
                digits = str(x)
                shown = digits if len(digits) <= 24 else f"{digits[:20]}...({len(digits)} digits)"
                raise UsageError(f"{where}: {f.name}={shown} is out of range (at most "
                                 f"{_INT_MAX} in absolute value)")


def parse_spec(text: str) -> Any:
    """Parses a spec string with :func:`distq.parse_spec`; errors become :class:`UsageError`.

    Args:
      text: ``KIND[:POS[:POS]][,key=value...]``, e.g. ``none``, ``scalar:4,group=64``,
        ``int:4,symmetric=false``, ``nf4``, ``pq:16:8,opq``, ``cast:bf16``.

    Returns:
      ``None`` (keep the leaf) or a spec (:class:`distq.Scalar`, :class:`distq.Uniform`, ...).

    Raises:
      UsageError: an unknown kind or option, a bad value, a spec the library rejects, or an
        integer beyond 32 bits; the message is one line.

    Examples:
      >>> parse_spec("int:4,group=64,symmetric=false")
      Uniform(bits=4, symmetric=False, axis=None, group_size=64, group_axis=-1, scale_dtype='float32')
      >>> parse_spec("none") is None
      True
    """
    spec_mod = _spec_module()
    try:
        spec = spec_mod.parse_spec(text)
    except spec_mod.SpecSyntaxError as e:
        msg = _one_line(e)
        if isinstance(text, str):
            msg = msg.replace(repr(text), _quoted(text))
        raise UsageError(_clip(msg, 1000)) from None
    _check_int_range(spec, f"bad spec {_quoted(text)}")
    return spec


def parse_rule(text: str) -> tuple[str, Any]:
    """Parses ``REGEX=SPEC`` into ``(regex, spec)``; the regex is checked to compile.

    The split is at the first ``=`` followed by a spec kind (``distq.core.spec.spec_kinds()``),
    so a regex may hold ``=`` (a lookahead) and a spec's options hold ``=`` too. A rule without
    any ``=`` is rejected before JAX is imported.

    Raises:
      UsageError: no ``=SPEC`` part, an invalid regex or a bad spec (one line).

    Examples:
      >>> parse_rule("layer_[0-9]+/bias=int:8")
      ('layer_[0-9]+/bias', Uniform(bits=8, symmetric=True, axis=None, group_size=None, group_axis=-1, scale_dtype='float32'))
      >>> regex, spec = parse_rule("(?!head).*=nf4,group=32")  # '=' in the regex and options
      >>> regex, spec.group_size
      ('(?!head).*', 32)
      >>> parse_rule("kernel")
      Traceback (most recent call last):
        ...
      distq.cli.UsageError: bad rule 'kernel': expected REGEX=SPEC (e.g. ...)
    """
    example = "(e.g. '.*\\.weight=scalar:4')"
    where = f"bad rule {_quoted(text)}"
    if "=" not in text:
        raise UsageError(f"{where}: expected REGEX=SPEC {example}")
    kinds = _spec_module().spec_kinds()
    alternatives = "|".join(re.escape(k) for k in sorted(kinds, key=len, reverse=True))
    for m in re.finditer("=", text):
        rest = text[m.end():]
        if re.match(rf"\s*({alternatives})\s*(:|,|\(|$)", rest, re.IGNORECASE):
            regex = text[:m.start()]
            break
    else:
        raise UsageError(f"{where}: expected REGEX=SPEC with SPEC starting with one of "
                         f"{', '.join(kinds)} {example}")
    if not regex:
        raise UsageError(f"{where}: empty regex (use '.*' to match every leaf)")
    try:
        re.compile(regex)
    except re.error as e:
        raise UsageError(f"{where}: invalid regex {_quoted(regex)}: {e}") from None
    return regex, parse_spec(rest)


def _seed(text: str) -> int:
    """``--seed``: an integer in ``0..SEED_MAX`` (an ``argparse`` type)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {_quoted(text)}: expected an integer "
                                         f"0..{SEED_MAX}") from None
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"seed {_clip(text, 40)} is out of range 0..{SEED_MAX}")
    return v


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


def _check_input(path: str, folder_ok: bool = False) -> None:
    if not os.path.exists(path):
        raise CliError(f"{path}: no such file")
    if os.path.isdir(path) and not folder_ok:
        raise CliError(f"{path}: is a directory, expected a file")
    if not os.access(path, os.R_OK):
        raise CliError(f"{path}: not readable")


def _streamed(path: str) -> bool:
    """Whether ``distq quantize`` reads ``path`` tensor by tensor: a safetensors file, a
    sharded checkpoint's index (``*.json``) or a folder holding either."""
    return os.path.isdir(path) or path.endswith(".json") or _sniff(path) == "safetensors"


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
    except Exception as e:  # noqa: BLE001 (msgpack raises many types for corrupt data)
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

    Examples:
      >>> import os, tempfile, jax.numpy as jnp, distq
      >>> folder = tempfile.TemporaryDirectory()
      >>> f = os.path.join(folder.name, "model.distq")
      >>> _ = distq.save(f, {"dense": {"kernel": jnp.ones((4, 2))}})
      >>> tree, fmt = read_input(f)
      >>> fmt, tree["dense"]["kernel"].shape
      ('distq', (4, 2))
      >>> read_input(os.path.join(folder.name, "missing.safetensors"))
      Traceback (most recent call last):
        ...
      distq.cli.CliError: ...
      >>> folder.cleanup()
    """
    checkpoint = _checkpoint_module()
    _check_input(path)
    kind = _sniff(path)
    try:
        if kind == "safetensors":
            return dict(checkpoint.read_safetensors(path)), kind
        if kind == "distq":
            return checkpoint.load(path, as_numpy=True), kind
    except checkpoint.CheckpointError as e:
        raise CliError(_one_line(e)) from None
    return _read_msgpack(path), "msgpack"


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


# ----------------------------------------------------------------------------------- helpers
def _fmt_bytes(n: int) -> str:
    return f"{n:,}"


def _table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def _shape_str(shape) -> str:
    return "x".join(map(str, shape)) or "()"


def _fmt_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{int(s) // 60} min {int(s) % 60:02d} s"


@contextlib.contextmanager
def _one_line_warnings():
    """Shows the library's warnings as ``distq: warning: ...`` lines (no file and line)."""
    old = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        del category, filename, lineno, file, line
        print(f"{PROG}: warning: {_one_line(str(message))}", file=sys.stderr, flush=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = old


# ----------------------------------------------------------------------------------- plan checks
def _rule_label(args_rules: list[str], index: int) -> str:
    return f"--rule '{args_rules[index]}'" if index < len(args_rules) else f"rule #{index}"


def _keep_rule_hint(plan) -> str:
    """A regex that matches the first problem leaf (and as many other problem leaves as it can)
    but no leaf the plan quantises: a ``=none`` rule before the others fixes those leaves."""
    bad = [r for r in plan.leaves if r.problem]
    quantised = [r.path for r in plan.leaves if r.spec is not None]
    best, covered = re.escape(bad[0].path), 1
    for token in re.split(r"[./]", bad[0].path):
        if not token or token.isdigit():
            continue
        pattern = f".*{re.escape(token)}.*"
        if any(re.fullmatch(pattern, p) for p in quantised):
            continue
        n = sum(1 for r in bad if re.fullmatch(pattern, r.path))
        if n >= covered:  # ties: the token nearer the leaf's own name
            best, covered = pattern, n
    return best


def _default_axis_hint(leaf) -> str | None:
    """The leaf's spec with ``axis`` back at its default, if that fits the leaf."""
    from . import planning

    spec_mod = _spec_module()
    spec = leaf.requested
    if not dataclasses.is_dataclass(spec):
        return None
    fields = {f.name: f for f in dataclasses.fields(spec)}
    if "axis" not in fields or fields["axis"].default is dataclasses.MISSING:
        return None
    default = fields["axis"].default
    if spec.axis == default:
        return None
    try:
        candidate = dataclasses.replace(spec, axis=default)
        if candidate.resolve(leaf.shape, role=planning.leaf_role(leaf.path)).problem(leaf.shape):
            return None
    except (ValueError, TypeError):
        return None
    return spec_mod.spec_str(candidate)


def _problem_message(plan, args_rules: list[str]) -> str:
    """One line: the first leaf that cannot take its spec, why, and how to fix the rules."""
    spec_mod = _spec_module()
    bad = [r for r in plan.leaves if r.problem]
    first = bad[0]
    rule = "" if first.rule is None else f" (from {_rule_label(args_rules, first.rule)})"
    msg = (f"leaf {first.path!r} (shape {first.shape}) cannot take "
           f"{spec_mod.spec_str(first.requested)}{rule}: {first.problem}")
    if len(bad) > 1:
        more = len(bad) - 1
        msg += (f"; {more} more {'leaf' if more == 1 else 'leaves'} cannot take theirs "
                "(see --dry-run)")
    msg += (f"; keep such leaves with a rule before that one, e.g. "
            f"--rule '{_keep_rule_hint(plan)}=none'")
    axis = _default_axis_hint(first)
    if axis:
        msg += f", or leave the axis to distq: {axis}"
    return msg


def _unused_lines(plan, args_rules: list[str]) -> list[str]:
    """One line per rule that matches no leaf, naming the rule."""
    used = {r.rule for r in plan.leaves if r.rule is not None}
    return [f"{_rule_label(args_rules, i)} matches no leaf" for i in range(len(plan.rules))
            if i not in used]


def _check_plan(plan, args_rules: list[str], allow_unused: bool) -> None:
    """Raises :class:`CliError` for a leaf that cannot take its spec, and for a rule that
    matches nothing unless ``allow_unused`` (then a warning line)."""
    try:
        plan.check(allow_unused=allow_unused)
    except ValueError:
        if plan.problems:
            raise CliError(_problem_message(plan, args_rules)) from None
        names = [r.path for r in plan.leaves[:2]]
        example = f" (leaf names look like {', '.join(map(repr, names))})" if names else ""
        raise CliError("; ".join(_unused_lines(plan, args_rules)) + example
                       + "; fix or remove the rule, or pass --allow-unused") from None
    for line in _unused_lines(plan, args_rules):
        print(f"{PROG}: warning: {line}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------- progress
class _Progress:
    """Progress over the plan's quantised leaves, weighted by their number of values.

    A ``rich`` progress bar with the time left when stderr is a terminal and ``rich`` is
    importable (it comes with Flax), else one stderr line per leaf,
    ``[3/12] name spec  (elapsed 4.1 s, about 9.0 s left)``. Used as
    ``quantize_tree(..., progress=p)`` inside ``with p:``.
    """

    def __init__(self, plan, enabled: bool, terminal: bool):
        self.leaves = plan.quantized()
        self.total = sum(max(math.prod(r.shape), 1) for r in self.leaves)
        self.enabled = enabled and bool(self.leaves)
        self.done = self.count = 0
        self.previous = None
        self.bar = None
        self.spec_str = _spec_module().spec_str
        if self.enabled and terminal:
            try:
                from rich import progress as rp
                from rich.console import Console
            except ImportError:  # pragma: no cover (rich comes with Flax)
                rp = None
            if rp is not None:
                self.bar = rp.Progress(
                    rp.TextColumn("{task.description}", markup=False), rp.BarColumn(),
                    rp.TaskProgressColumn(), rp.TimeElapsedColumn(), rp.TextColumn("eta"),
                    rp.TimeRemainingColumn(), console=Console(file=sys.stderr),
                    transient=False)

    def __enter__(self):
        self.t0 = time.perf_counter()
        if self.bar is not None:
            self.bar.start()
            self.task = self.bar.add_task("quantising", total=self.total)
        return self

    def _finish_previous(self) -> None:
        if self.previous is not None:
            self.done += max(math.prod(self.previous.shape), 1)
            if self.bar is not None:
                self.bar.update(self.task, completed=self.done)

    def __call__(self, i: int, leaf) -> None:
        del i
        if not self.enabled:
            return
        self._finish_previous()
        self.previous, self.count = leaf, self.count + 1
        what = f"[{self.count}/{len(self.leaves)}] {leaf.path}"
        if self.bar is not None:  # the leaf's name only: the bar needs the room
            self.bar.update(self.task, description=what)
            return
        what += f" {self.spec_str(leaf.spec)}"
        elapsed = time.perf_counter() - self.t0
        left = (f", about {_fmt_seconds(elapsed * (self.total - self.done) / self.done)} left"
                if self.done else "")
        print(f"{what}  (elapsed {_fmt_seconds(elapsed)}{left})", file=sys.stderr, flush=True)

    def __exit__(self, exc_type, exc, tb):
        if not self.enabled:
            return
        if exc_type is None:
            self._finish_previous()
            self.previous = None
        elapsed = time.perf_counter() - self.t0
        if self.bar is not None:
            if exc_type is None:
                self.bar.update(self.task, description=f"quantised {self.count} leaves")
            self.bar.stop()
        elif exc_type is None:
            print(f"quantised {self.count} leaves in {_fmt_seconds(elapsed)}", file=sys.stderr,
                  flush=True)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# ----------------------------------------------------------------------------------- quantize
def cmd_quantize(args) -> int:
    """``distq quantize``: see ``distq quantize --help``."""
    if args.out is None and not args.dry_run:
        raise UsageError("OUT is required unless --dry-run is given "
                         f"(see '{PROG} quantize --help')")
    for text in args.rule:  # the checks that need no spec kinds: before JAX is imported
        if "=" not in text:
            parse_rule(text)
    rules = [parse_rule(r) for r in args.rule]
    _check_input(args.input, folder_ok=True)
    if args.out is not None and not args.dry_run:
        _check_output(args.input, args.out, args.force)
    t0 = time.perf_counter()
    if _streamed(args.input):
        return _quantize_streamed(args, rules, t0)
    tree, fmt = read_input(args.input)

    import jax

    import distq

    plan = _checked_plan(tree, rules, args)
    if plan is None:  # a dry run
        return 0

    show = args.progress if args.progress is not None else (
        _stderr_is_terminal() and not args.quiet)
    progress = _Progress(plan, show, _stderr_is_terminal())
    try:
        with _one_line_warnings(), progress:
            qtree, report = distq.quantize_tree(tree, plan, key=jax.random.key(args.seed),
                                                progress=progress, warn_unused=False)
    except (ValueError, TypeError, OverflowError) as e:
        raise CliError(_one_line(e)) from None
    spec_str = _spec_module().spec_str
    metadata = {"source": os.path.basename(args.input), "source_format": fmt,
                "rules": json.dumps([[r, spec_str(s)] for r, s in rules]),
                "distq_version": distq.__version__}
    try:
        size = distq.save(args.out, qtree, report=report, metadata=metadata,
                          entropy_coded=args.entropy_coded)
    except (OSError, ValueError, TypeError) as e:
        raise CliError(f"cannot write {args.out}: {_one_line(e)}") from None
    _print_summary(args, report, size, t0)
    return 0


def _checked_plan(tree, rules, args):
    """The plan of ``rules`` on ``tree``, checked before any work (not after an hour); ``None``
    after printing it for ``--dry-run``."""
    import distq

    try:
        plan = distq.plan(tree, rules)
    except (ValueError, TypeError) as e:
        raise CliError(_one_line(e)) from None
    if args.dry_run:
        print(plan.table())
        print(f"{len(plan.leaves)} leaves, {len(plan.quantized())} to quantise "
              f"(dry run: nothing written)")
    _check_plan(plan, args.rule, args.allow_unused)
    return None if args.dry_run else plan


def _print_summary(args, report, size: int, t0: float) -> None:
    if args.quiet:
        return
    print(report.table())
    q = report.quantized()
    print(f"{len(q)} of {len(report.leaves)} leaves quantised, "
          f"{report.bits_per_weight():.2f} bits/weight on them; "
          f"{_fmt_bytes(report.bytes_before)} -> {_fmt_bytes(report.bytes_after)} bytes "
          f"({report.ratio:.2f}x); wrote {args.out} ({_fmt_bytes(size)} bytes"
          f"{', entropy-coded' if args.entropy_coded else ''}) in "
          f"{_fmt_seconds(time.perf_counter() - t0)}")


def _release_memory() -> None:
    """Hands freed heap memory back to the system between leaves (glibc keeps it otherwise, so
    a process's resident size would creep up leaf after leaf); a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@functools.cache
def _decoder():
    """``leaf.dequantize()`` compiled whole: XLA fuses the decode, where the eager method
    materialises every step (measured: +160 MiB instead of +680 MiB for a 60 MiB leaf)."""
    import jax

    return jax.jit(lambda q: q.dequantize())


def _rel_error(x, q) -> float:
    """``|q - x|^2 / |x|^2`` (``|q - x|^2`` when ``x`` is 0) of a leaf ``q`` quantising ``x``,
    summed in float64 over bounded chunks."""
    import numpy as np

    a, b = np.asarray(x).reshape(-1), np.asarray(_decoder()(q)).reshape(-1)
    err = den = 0.0
    for i in range(0, a.size, 1 << 20):
        u = a[i:i + (1 << 20)].astype(np.float64)
        v = b[i:i + (1 << 20)].astype(np.float64)
        err += float(np.sum((v - u) ** 2))
        den += float(np.sum(u * u))
    return err / den if den > 0 else err


def _quantize_streamed(args, rules, t0: float) -> int:
    """``distq quantize`` on safetensors input, one leaf at a time: each tensor is mapped from
    its file, quantised, written (and hashed) by a :class:`distq.checkpoint.Writer` and dropped,
    so memory holds about one leaf and its quantiser's work, whatever the model's size."""
    checkpoint = _checkpoint_module()
    try:
        src = checkpoint.SafetensorsFiles(args.input)
    except checkpoint.CheckpointError as e:
        raise CliError(_one_line(e)) from None
    with src:
        if args.out is not None and not args.dry_run:
            for f in src.files:
                if os.path.realpath(f) == os.path.realpath(args.out):
                    raise CliError(f"refusing to overwrite the input {f}; choose another OUT")
        import jax

        import distq

        plan = _checked_plan({name: jax.ShapeDtypeStruct(*src.shape_dtype(name))
                              for name in src}, rules, args)
        if plan is None:  # a dry run
            return 0
        spec_str = _spec_module().spec_str
        fmt = "safetensors" if len(src.files) == 1 else "safetensors (sharded)"
        metadata = {"source": os.path.basename(os.path.normpath(args.input)),
                    "source_format": fmt,
                    "rules": json.dumps([[r, spec_str(s)] for r, s in rules]),
                    "distq_version": distq.__version__}
        show = args.progress if args.progress is not None else (
            _stderr_is_terminal() and not args.quiet)
        progress = _Progress(plan, show, _stderr_is_terminal())
        key = jax.random.key(args.seed)
        rows = []
        try:
            writer = checkpoint.Writer(args.out, metadata=metadata,
                                       entropy_coded=args.entropy_coded)
        except (OSError, ValueError, TypeError) as e:
            raise CliError(f"cannot write {args.out}: {_one_line(e)}") from None
        with writer, _one_line_warnings(), progress:
            for i, r in enumerate(plan.leaves):
                try:
                    leaf = src[r.path]
                except checkpoint.CheckpointError as e:  # e.g. a shard truncated meanwhile
                    raise CliError(_one_line(e)) from None
                if r.spec is None:
                    writer.add(r.path, leaf)  # written straight from the mapped file
                    rows.append(distq.tree.LeafReport(r.path, None, r.shape, r.dtype,
                                                      r.bytes_before, r.bytes_before, None,
                                                      r.note))
                    continue
                progress(i, r)
                x = leaf if leaf.dtype.itemsize > 4 else jax.numpy.asarray(leaf)
                del leaf  # unmapped (once copied): the file's pages leave this process
                try:  # the key of quantize_tree's leaf i: the same codes as the library's
                    q = distq.quantize(x, r.spec, key=jax.random.fold_in(key, i))
                except (ValueError, TypeError, OverflowError) as e:
                    raise CliError(f"leaf {r.path!r} (shape {r.shape}) with "
                                   f"{spec_str(r.spec)}: {_one_line(e)}") from None
                err = _rel_error(x, q)
                del x
                writer.add(r.path, q)
                rows.append(distq.tree.LeafReport(r.path, r.spec, r.shape, r.dtype,
                                                  r.bytes_before, distq.planning.leaf_nbytes(q),
                                                  err, r.note))
                del q
                _release_memory()
            report = distq.TreeReport(tuple(rows), plan.unused_rules)
            try:
                size = writer.close(report)
            except (OSError, ValueError, TypeError) as e:
                raise CliError(f"cannot write {args.out}: {_one_line(e)}") from None
    _print_summary(args, report, size, t0)
    return 0


# ----------------------------------------------------------------------------------- info
def _stored_bytes(info: dict) -> dict[str, int]:
    """The bytes each leaf takes in the file (entropy-coded arrays at their coded size)."""
    tensors = info["tensors"]

    def nbytes(ref):
        a, b = tensors[ref]["data_offsets"]
        return int(b) - int(a)

    out = {}
    for path, n in _checkpoint_module().tree_nodes(info["tree"]):
        refs = list(n["arrays"].values()) if isinstance(n.get("arrays"), dict) else (
            [n["ref"]] if "ref" in n else [])
        out.setdefault(path, sum(nbytes(r) for r in refs))
    return out


def _rows_from_tree(info: dict) -> list[dict]:
    """Per-leaf rows from the tree description (checkpoints saved without a report)."""
    tensors = info["tensors"]
    stored = _stored_bytes(info)
    rows = []
    for path, n in _checkpoint_module().tree_nodes(info["tree"]):
        t = n.get("t")
        if t == "array":
            e = tensors[n["ref"]]
            b = stored[path]
            rows.append({"path": path, "spec": "none", "shape": e["shape"], "dtype": e["dtype"],
                         "bytes_before": b, "bytes_after": b, "rel_error": None, "note": ""})
        elif isinstance(n.get("meta"), dict) and isinstance(n.get("arrays"), dict):
            meta = n["meta"]  # a quantised leaf of a registered kind (checked by info())
            coded = n.get("coded", {})
            b = sum(4 * math.prod(coded[f]["shape"]) if f in coded else
                    int(tensors[r]["data_offsets"][1]) - int(tensors[r]["data_offsets"][0])
                    for f, r in n["arrays"].items())  # fixed-rate: codes as packed words
            rows.append({"path": path, "spec": t, "shape": meta.get("shape", []),
                         "dtype": meta.get("dtype", "?"), "bytes_before": None,
                         "bytes_after": b, "rel_error": None, "note": "no report stored"})
    return rows


def _bits_per_value(bytes_after: int, shape) -> float:
    """Stored bits per value: fixed-rate codes plus scales, codebooks and outliers."""
    return 8.0 * bytes_after / max(math.prod(shape), 1)


def _totals(rows: list[dict]) -> dict:
    before = sum(r["bytes_before"] or 0 for r in rows)
    after = sum(r["bytes_after"] or 0 for r in rows)
    qrows = [r for r in rows if r.get("spec") not in (None, "none")]
    qsize = sum(math.prod(r["shape"]) for r in qrows)
    stored = sum(r.get("stored_bytes", r["bytes_after"]) or 0 for r in rows)
    return {"leaves": len(rows), "quantized_leaves": len(qrows), "bytes_before": before,
            "bytes_after": after, "ratio": before / max(after, 1),
            "bits_per_weight": 8.0 * sum(r["bytes_after"] or 0 for r in qrows) / max(qsize, 1),
            "stored_bytes": stored, "stored_bits_per_weight": 8.0 * sum(
                r.get("stored_bytes", r["bytes_after"]) or 0 for r in qrows) / max(qsize, 1)}


def _multihost_module():
    from . import multihost  # noqa: PLC0415  (imports JAX: only once a command needs it)

    return multihost


def cmd_info(args) -> int:
    """``distq info``: see ``distq info --help``."""
    spread = os.path.isdir(args.ckpt) and _multihost_module().is_checkpoint(args.ckpt)
    _check_input(args.ckpt, folder_ok=spread)  # a multi-process (orbax) checkpoint: a folder
    kind = "distq" if spread else _sniff(args.ckpt)
    if kind == "other":
        raise CliError(f"{args.ckpt}: not a distq checkpoint or safetensors file")
    checkpoint = _checkpoint_module()

    try:
        if kind == "distq":
            info = checkpoint.info(args.ckpt)
            rows = info["leaves"] or _rows_from_tree(info)
            fmt, user, size = "distq", info["user"], info["file_bytes"]
        else:
            arrays = checkpoint.read_safetensors(args.ckpt)
            rows = [{"path": k, "spec": "none", "shape": list(a.shape), "dtype": str(a.dtype),
                     "bytes_before": a.nbytes, "bytes_after": a.nbytes, "rel_error": None,
                     "note": ""} for k, a in arrays.items()]
            fmt, user, size = "safetensors (plain, not a distq checkpoint)", {}, \
                os.path.getsize(args.ckpt)
    except checkpoint.CheckpointError as e:
        raise CliError(_one_line(e)) from None
    stored = _stored_bytes(info) if kind == "distq" else {}
    coded = kind == "distq" and any("coded" in n for _, n in checkpoint.tree_nodes(info["tree"]))
    rows = [{**r, "bits_per_value": _bits_per_value(r["bytes_after"], r["shape"]),
             "stored_bytes": stored.get(r["path"], r["bytes_after"])} for r in rows]
    rows = [{**r, "stored_bits_per_value": _bits_per_value(r["stored_bytes"], r["shape"])}
            for r in rows]
    totals = _totals(rows)
    if args.json:
        print(json.dumps({"file": args.ckpt, "format": fmt, "file_bytes": size,
                          "metadata": user, "totals": totals, "leaves": rows}, indent=1))
        return 0
    extra = ("stored", "stored b/v") if coded else ()  # entropy-coded: what the file holds
    table = [("name", "spec", "shape", "dtype", "bytes", "-> bytes", "bits/val", *extra,
              "rel err", "note")]
    for r in rows:
        more = (_fmt_bytes(r["stored_bytes"]), f"{r['stored_bits_per_value']:.2f}") \
            if coded else ()
        table.append((r["path"], r["spec"], _shape_str(r["shape"]), r["dtype"],
                      "?" if r["bytes_before"] is None else _fmt_bytes(r["bytes_before"]),
                      _fmt_bytes(r["bytes_after"]), f"{r['bits_per_value']:.2f}", *more,
                      "-" if r["rel_error"] is None else f"{r['rel_error']:.2e}", r["note"]))
    more = (_fmt_bytes(totals["stored_bytes"]), "") if coded else ()
    table.append(("total", "", "", "", _fmt_bytes(totals["bytes_before"]),
                  _fmt_bytes(totals["bytes_after"]), "", *more, "",
                  f"{totals['ratio']:.2f}x smaller"))
    print(f"{args.ckpt}: {fmt}, {_fmt_bytes(size)} bytes")
    for k, v in user.items():
        print(f"  {k}: {v}")
    print(_table(table))
    line = (f"{totals['quantized_leaves']} of {totals['leaves']} leaves quantised, "
            f"{totals['bits_per_weight']:.2f} bits/weight on them")
    if coded:
        line += (f" at fixed rate, {totals['stored_bits_per_weight']:.2f} as stored "
                 "(entropy-coded)")
    print(line)
    return 0


# ----------------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    """``distq demo``: runs :func:`distq.demo.main`."""
    del args
    from . import demo

    demo.main()
    return 0


# ----------------------------------------------------------------------------------- parser
_SPEC_HELP = """\
rules (REGEX=SPEC, first re.fullmatch on the leaf's name wins; unmatched leaves are kept; a rule
that matches no leaf is an error unless --allow-unused):
  SPEC  none | keep              keep the leaf
        scalar[:BITS]            distributional scalar quantiser (distq.Scalar, default 4 bits;
                                 axis, scales and outliers chosen per leaf unless given)
        int[:BITS]               uniform integers (distq.Uniform, default 8 bits)
        nf4                      NormalFloat-4 in blocks of 64 (distq.NF4)
        pq:M[:BITS]              product quantisation, M sub-spaces (distq.PQ; matrices only)
        cast[:DTYPE]             store as bfloat16 | float16 | float32 (distq.Cast)
  options ',key=value' (the spec's field names or short forms; see distq.parse_spec), e.g.
        scalar:4,group=64   scalar:4,axis=1   int:4,group=64,symmetric=false
        pq:16:8,opq=true    scalar:3,dist=gaussian,robust   cast:bf16

names: safetensors files (Hugging Face) use the dotted tensor names
  ('encoder.layer.0.attention.self.query.weight'); msgpack Flax trees and distq checkpoints use
  '/'-joined paths ('params/Dense_0/kernel'). Leaves that are not floating point (e.g.
  position_ids) are always kept. Every leaf is checked against its spec before any work;
  --dry-run shows each leaf's rule, resolved spec and bytes.

bits/val in the reports is the bits per value at fixed rate: packed codes plus scales,
codebooks and outliers; for a file written with --entropy-coded, distq info adds the bytes and
bits per value as stored (codes entropy-coded).

example:
  distq quantize model.safetensors model.distq \\
      --rule '.*word_embeddings.*=pq:32:8' --rule '.*LayerNorm.*=none' \\
      --rule '.*\\.weight=scalar:4'
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``distq`` argument parser (subcommands quantize, info, demo)."""
    from . import __version__

    p = _Parser(prog=PROG, description="Quantise checkpoints with distq and inspect them.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    q = sub.add_parser(
        "quantize", help="quantise a safetensors / msgpack Flax checkpoint by name rules",
        description="Quantise a checkpoint (safetensors, msgpack Flax tree or distq) into a\n"
                    "distq checkpoint, by rules on the leaf names.",
        epilog=_SPEC_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("input", metavar="IN",
                   help="input checkpoint: a safetensors file, a sharded checkpoint's index "
                        "(model.safetensors.index.json) or a folder holding one (read tensor "
                        "by tensor), a msgpack Flax tree or a distq checkpoint")
    q.add_argument("out", metavar="OUT", nargs="?", help="output distq checkpoint (written "
                   "atomically, with the report); optional with --dry-run")
    q.add_argument("-r", "--rule", action="append", required=True, metavar="REGEX=SPEC",
                   help="a rule (repeatable; tried in order)")
    q.add_argument("-n", "--dry-run", action="store_true",
                   help="show the plan (each leaf's rule, resolved spec and bytes); write "
                        "nothing")
    q.add_argument("--allow-unused", action="store_true",
                   help="a rule that matches no leaf is a warning, not an error")
    q.add_argument("-f", "--force", action="store_true", help="overwrite an existing OUT")
    q.add_argument("-q", "--quiet", action="store_true", help="do not print the report")
    q.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show progress on stderr: a bar with the time left on a terminal, a "
                        "line per leaf otherwise (default: when stderr is a terminal)")
    q.add_argument("--seed", type=_seed, default=0, metavar="N",
                   help=f"random seed for PQ's k-means, 0..{SEED_MAX} (default 0)")
    q.add_argument("-e", "--entropy-coded", action="store_true",
                   help="store the packed codes entropy-coded (rANS, lossless; e.g. 4-bit "
                        "scalar codes of Gaussian weights take ~3.8 bits instead of 4)")
    q.set_defaults(func=cmd_quantize)

    i = sub.add_parser("info", help="per-leaf table of a distq checkpoint",
                       description="Show a checkpoint's leaves (name, spec, shape, bytes, stored "
                                   "bits per value, error) and totals. Plain safetensors files "
                                   "are listed too.")
    i.add_argument("ckpt", metavar="CKPT", help="a distq checkpoint")
    i.add_argument("--json", action="store_true", help="machine-readable JSON output")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("demo", help="what distq does, on built-in data, (about a minute, mostly compiling)",
                       description="Run the demo (python -m distq.demo).")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``distq`` command line; returns the exit status.

    Args:
      argv: the arguments without the program name (default ``sys.argv[1:]``).

    Returns:
      0 on success, 2 for a usage error, 1 for any other failure (one line on stderr).

    Examples:
      >>> import os, tempfile, jax.numpy as jnp, distq
      >>> folder = tempfile.TemporaryDirectory()
      >>> src, dst = (os.path.join(folder.name, n) for n in ("in.distq", "out.distq"))
      >>> _ = distq.save(src, {"dense": {"kernel": jnp.ones((64, 32)), "bias": jnp.zeros(32)}})
      >>> rules = ["--rule", ".*kernel=int:4", "--rule", ".*bias=none"]
      >>> main(["quantize", src, dst, *rules, "--dry-run"])
      path          rule         spec   shape  bytes  -> bytes  bits/val  note
      ---...
      dense/bias    1: .*bias    none   32     128    128       32.00
      dense/kernel  0: .*kernel  int:4  64x32  8,192  1,028     4.02
      total                                    8,320  1,156               7.20x smaller
      2 leaves, 1 to quantise (dry run: nothing written)
      0
      >>> main(["quantize", src, dst, *rules, "--quiet"])
      0
      >>> main(["info", dst])
      /...out.distq: distq, ... bytes
      ...
      name          spec   shape  dtype    bytes  -> bytes  bits/val  rel err   note
      ---...
      dense/bias    none   32     float32  128    128       32.00     -
      dense/kernel  int:4  64x32  float32  8,192  1,028     4.02      ...e-...
      total                                8,320  1,156                         7.20x smaller
      1 of 2 leaves quantised, 4.02 bits/weight on them
      0
      >>> main(["quantize", src, dst, "--rule", "kernel"])  # usage error: one line on stderr
      2
      >>> folder.cleanup()
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help / --version
            return int(e.code or 0) if not isinstance(e.code, str) else 2
        if args.command is None:
            raise UsageError(f"a command is required (quantize, info, demo); see '{PROG} --help'")
        return int(args.func(args) or 0)
    except CliError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `distq info x | head`
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (silences the exit-time flush)
        except OSError:  # pragma: no cover
            pass
        return 1
    except OSError as e:  # an unreadable file, a full disk...
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 (a bug: still one line, unless asked for more)
        if os.environ.get("DISTQ_TRACEBACK"):
            raise
        print(f"{PROG}: error: unexpected {type(e).__name__}: {_one_line(e)} (set "
              "DISTQ_TRACEBACK=1 to see the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
