"""Model-level conversions: :func:`qat` and :func:`pq_layers` (the module-replacement walk)."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from ..core import pq as _pq
from ._common import Array
from ._pq_base import check_pq_spec
from ._pq_layers import PQConv, PQDense, PQEmbed
from ._qat import QATConv, QATDense, check_scalar_spec

_LAYERS = (nnx.Linear, nnx.Conv, nnx.Embed)  # the layer types a conversion may replace


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _matcher(filter: str | Callable | None) -> Callable[[str, nnx.Module], bool]:
    if filter is None:
        return lambda path, mod: True
    if isinstance(filter, str):
        pattern = re.compile(filter)
        return lambda path, mod: pattern.fullmatch(path) is not None
    if callable(filter):
        return filter
    raise TypeError(f"filter must be a regex string, a callable (path, module) -> bool or None, "
                    f"got {type(filter).__name__}")


def _replace_layers(module: nnx.Module, convert: Callable, filter, what: str,
                    check: Callable | None = None) -> nnx.Module:
    """A copy of ``module`` with ``convert(index, path, layer)`` (or ``None``: keep) applied.

    The matched layers are the sub-modules whose path the filter accepts (``index``: position
    among all sub-modules, ``path``: keys joined by ``/``), and ``module`` itself (index -1,
    path ``""``) when it is an ``nnx.Linear``/``Conv``/``Embed``. ``check([(path, layer), ...])``
    sees every matched ``nnx.Linear``/``Conv``/``Embed`` before any layer is converted (to raise
    one error for all of them).
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"module must be an nnx.Module, got {type(module).__name__}")
    match = _matcher(filter)
    model = nnx.clone(module)
    todo = [(p, mod) for p, mod in nnx.iter_modules(model) if p]
    picked = [(i, path, mod) for i, (path, mod) in enumerate(todo) if match(_path_str(path), mod)]
    root = isinstance(module, _LAYERS) and match("", module)
    if check is not None:
        check([(_path_str(path), mod) for _, path, mod in picked if isinstance(mod, _LAYERS)]
              + ([("", module)] if root else []))
    done = 0
    for i, path, mod in picked:
        new = convert(i, _path_str(path), mod)
        if new is None:
            continue
        parent = model
        for k in path[:-1]:
            parent = getattr(parent, k) if isinstance(k, str) else parent[k]
        k = path[-1]
        if isinstance(k, str) and not isinstance(parent, (nnx.List, nnx.Dict, list, dict)):
            setattr(parent, k, new)
        else:
            parent[k] = new
        done += 1
    if root:
        new = convert(-1, "", module)
        if new is not None:
            return new
    if done == 0 and filter is not None:
        warnings.warn(f"{what}: the filter {filter!r} matched no layer", stacklevel=3)
    return model


def qat(module: nnx.Module, spec: Any, *, filter: str | Callable | None = None,
        clip: bool = True) -> nnx.Module:
    """A copy of ``module`` with every ``nnx.Linear``/``nnx.Conv`` wrapped for QAT.

    Args:
      module: an nnx model (not modified; the copy shares its arrays).
      spec: the spec of every wrapped kernel: any registered spec that needs no key
        (:class:`distq.Scalar`, :class:`distq.Uniform`, :class:`distq.NF4`, :class:`distq.Cast`);
        a :class:`distq.PQ` is refused (use :func:`pq_layers`).
      filter: which layers: a regex matched (``re.fullmatch``) against the layer's path (keys
        joined by ``/``, e.g. ``"layers/0"``), a callable ``(path, layer) -> bool``, or ``None``
        (all).
      clip: see :class:`QATDense`.

    Returns:
      The model with :class:`QATDense`/:class:`QATConv` in place of the matched layers; a
      warning is issued when a filter matched nothing.

    Examples:
      >>> import distq
      >>> from flax import nnx
      >>> from distq import nn
      >>> rngs = nnx.Rngs(0)
      >>> net = nnx.Sequential(nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs))
      >>> q = nn.qat(net, distq.Uniform(bits=4), filter="layers/0")
      >>> [type(l).__name__ for l in q.layers]
      ['QATDense', 'Linear']
    """
    spec = check_scalar_spec(spec)

    def convert(i, path, mod):
        if isinstance(mod, nnx.Linear):
            return QATDense.from_linear(mod, spec, clip=clip)
        if isinstance(mod, nnx.Conv):
            return QATConv.from_conv(mod, spec, clip=clip)
        return None

    return _replace_layers(module, convert, filter, "qat")


def _pq_problem(layer: nnx.Module, spec: _pq.PQ) -> str | None:
    """Why ``pq_layers`` cannot convert ``layer`` with ``spec`` (``None``: it can, or it is not
    a layer ``pq_layers`` converts). Mirrors the checks of the ``from_*`` constructors."""
    if isinstance(layer, nnx.Linear):
        kind, shape = "Linear, kernel", tuple(layer.kernel.shape)
        vectors = (shape[1], shape[0])
    elif isinstance(layer, nnx.Conv):
        kind, shape = "Conv, kernel", tuple(layer.kernel.shape)
        if getattr(layer, "mask", None) is not None:
            return f"{kind} {shape}: masked nnx.Conv layers are not supported"
        vectors = (shape[-1], math.prod(shape[:-1]))
    elif isinstance(layer, nnx.Embed):
        kind, shape = "Embed, embedding", tuple(layer.embedding.shape)
        vectors = shape
    else:
        return None
    reason = spec.problem(vectors)
    if reason is None:
        return None
    return f"{kind} {shape} -> {vectors[0]} vectors of {vectors[1]}: {reason}"


def pq_layers(module: nnx.Module, spec: _pq.PQ, *, key: Array,
              filter: str | Callable | None = None) -> nnx.Module:
    """A copy of ``module`` with ``nnx.Linear``/``nnx.Conv``/``nnx.Embed`` fitted as PQ layers.

    Each matched layer goes through ``from_linear``/``from_conv``/``from_embed`` with its own
    key (``fold_in(key, index)``). A PQ layer fits one vector per output unit (per row of an
    embedding), so it needs at least ``2**spec.bits`` of them, and ``spec.m`` must divide their
    length: every matched layer is checked (``spec.problem``) before any is fitted, and one
    ``ValueError`` lists those that cannot be (a classifier head with fewer outputs than
    ``2**bits``, typically); leave them out with ``filter`` or use fewer bits.

    Args:
      module: an nnx model (not modified).
      spec: the :class:`distq.PQ` of every matched layer.
      key: ``jax.random`` key.
      filter: as in :func:`qat`.

    Examples:
      >>> import jax, distq
      >>> from flax import nnx
      >>> from distq import nn
      >>> rngs = nnx.Rngs(0)
      >>> net = nnx.Sequential(nnx.Linear(16, 64, rngs=rngs), nnx.Linear(64, 2, rngs=rngs))
      >>> q = nn.pq_layers(net, distq.PQ(m=4, bits=4), key=jax.random.key(0), filter="layers/0")
      >>> [type(l).__name__ for l in q.layers]
      ['PQDense', 'Linear']
    """
    spec = check_pq_spec(spec)

    def check(layers):
        bad = [(path, p) for path, mod in layers if (p := _pq_problem(mod, spec)) is not None]
        if not bad:
            return
        lines = "\n".join(f"  {path!r}: {p}" if path else f"  the module itself: {p}"
                          for path, p in bad)
        paths = {path for path, _ in bad}
        raise ValueError(
            f"pq_layers: {len(bad)} of the {len(layers)} matched layers cannot take "
            f"distq.PQ(m={spec.m}, bits={spec.bits}):\n{lines}\n"
            f"Each PQ layer fits one vector per output unit (per row of an embedding): it needs "
            f"at least 2**bits = {spec.num_centroids} of them, and m must divide their length. "
            f"Leave these layers out with filter= (a regex on the paths, or a callable, e.g. "
            f"filter=lambda path, layer: path not in {sorted(paths)!r}), or choose fewer bits "
            f"(or another m).")

    def convert(i, path, mod):
        k = jax.random.fold_in(key, i + 1)
        try:
            if isinstance(mod, nnx.Linear):
                return PQDense.from_linear(mod, spec, key=k)
            if isinstance(mod, nnx.Conv):
                return PQConv.from_conv(mod, spec, key=k)
            if isinstance(mod, nnx.Embed):
                return PQEmbed.from_embed(mod, spec, key=k)
        except ValueError as e:
            raise ValueError(f"pq_layers: layer {path!r}: {e}") from None
        return None

    return _replace_layers(module, convert, filter, "pq_layers", check)
