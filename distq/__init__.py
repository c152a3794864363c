"""distq: distributional and product quantisation of tensors and parameter trees in JAX.

The public API is the table below, one name a line. Every name loads on first use, so
``import distq`` costs almost nothing and ``distq --help`` answers before JAX is imported; the
numerical core (:mod:`distq.core`) never imports Flax or optax, and the parts that do
(:mod:`distq.nn`, :mod:`distq.checkpoint`, ...) load only when used.

Examples:
  >>> import jax, jax.numpy as jnp, distq
  >>> w = jax.random.normal(jax.random.key(0), (64, 32))
  >>> q = distq.quantize(w, distq.Uniform(bits=4))  # one array, any registered spec
  >>> q.nbytes, w.nbytes
  (1028, 8192)
  >>> params = {"dense": {"kernel": w, "bias": jnp.zeros(32)}}
  >>> qparams, report = distq.quantize_tree(params, [(".*kernel", "int:4"), (".*bias", None)])
  >>> distq.tree_nbytes(qparams), round(report.ratio, 2)  # a whole tree, by path rules
  (1156, 7.2)
  >>> distq.dequantize_tree(qparams)["dense"]["kernel"].shape
  (64, 32)
"""

from __future__ import annotations

import importlib as _importlib
import importlib.util  # noqa: F401 (find_spec)
import sys as _sys
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> (module, attribute); a module itself when the attribute is None
_API: dict[str, tuple[str, str | None]] = {
    "bitpack": (".core.bitpack", None),
    "distributions": (".core.distributions", None),
    "entropy": (".core.entropy", None),
    "kmeans": (".core.kmeans", None),
    "pq": (".core.pq", None),
    "search": (".core.search", None),
    "calibrate": (".calibrate", None),
    "checkpoint": (".checkpoint", None),
    "cli": (".cli", None),
    "compat": (".compat", None),
    "core": (".core", None),
    "demo": (".demo", None),
    "export": (".export", None),
    "integrations": (".integrations", None),
    "multihost": (".multihost", None),
    "nn": (".nn", None),
    "planning": (".planning", None),
    "prune": (".prune", None),
    "runtime": (".runtime", None),
    "ste": (".ste", None),
    "train": (".train", None),
    "tree": (".tree", None),
    "distill": (".distill", None),
    "Cast": (".core.specs", "Cast"),
    "CastArray": (".core.cast", "CastArray"),
    "PQ": (".core.specs", "PQ"),
    "PQArray": (".core.pq", "PQArray"),
    "Layout": (".core.qarray", "Layout"),
    "QArray": (".core.qarray", "QArray"),
    "is_qarray": (".core.qarray", "is_qarray"),
    "NF4": (".core.specs", "NF4"),
    "Scalar": (".core.specs", "Scalar"),
    "Uniform": (".core.specs", "Uniform"),
    "Rotated": (".core.specs_rotated", "Rotated"),
    "RotatedArray": (".core.rotated", "RotatedArray"),
    "VQ": (".core.specs_vq", "VQ"),
    "VQArray": (".core.vq", "VQArray"),
    "hadamard": (".core.hadamard", None),
    "nf4_levels": (".core.specs", "nf4_levels"),
    "dequantize": (".core.api", "dequantize"),
    "is_quantized": (".core.spec", "is_quantized"),
    "parse_spec": (".core.spec", "parse_spec"),
    "quantize": (".core.api", "quantize"),
    "register": (".core.spec", "register"),
    "spec_str": (".core.spec", "spec_str"),
    "distillation_loss": (".distill", "distillation_loss"),
    "Plan": (".planning", "Plan"),
    "plan": (".planning", "plan"),
    "tree_nbytes": (".planning", "tree_nbytes"),
    "apply_masks": (".prune", "apply_masks"),
    "masked_updates": (".prune", "masked_updates"),
    "prune_magnitude": (".prune", "prune_magnitude"),
    "prune_structured": (".prune", "prune_structured"),
    "sparsity": (".prune", "sparsity"),
    "fake_quantize": (".ste", "fake_quantize"),
    "fake_quantize_tree": (".ste", "fake_quantize_tree"),
    "combine": (".train", "combine"),
    "labels": (".train", "labels"),
    "partition": (".train", "partition"),
    "TreeReport": (".tree", "TreeReport"),
    "dequantize_tree": (".tree", "dequantize_tree"),
    "quantize_tree": (".tree", "quantize_tree"),
    "quantized_apply": (".runtime", "quantized_apply"),
    "save": (".checkpoint", "save"),
    "load": (".checkpoint", "load"),
}

if TYPE_CHECKING:  # the same names, for type checkers and IDEs
    from .core import bitpack as bitpack
    from .core import distributions as distributions
    from .core import entropy as entropy
    from .core import kmeans as kmeans
    from .core import pq as pq
    from .core import search as search
    from .core.specs import Cast as Cast
    from .core.cast import CastArray as CastArray
    from .core.specs import PQ as PQ
    from .core.pq import PQArray as PQArray
    from .core.qarray import Layout as Layout
    from .core.qarray import QArray as QArray
    from .core.qarray import is_qarray as is_qarray
    from .core.specs import NF4 as NF4
    from .core.specs import Scalar as Scalar
    from .core.specs import Uniform as Uniform
    from .core.specs_rotated import Rotated as Rotated
    from .core.rotated import RotatedArray as RotatedArray
    from .core.specs_vq import VQ as VQ
    from .core.vq import VQArray as VQArray
    from .core import hadamard as hadamard
    from .core.specs import nf4_levels as nf4_levels
    from .core.api import dequantize as dequantize
    from .core.spec import is_quantized as is_quantized
    from .core.spec import parse_spec as parse_spec
    from .core.api import quantize as quantize
    from .core.spec import register as register
    from .core.spec import spec_str as spec_str
    from .distill import distillation_loss as distillation_loss
    from .planning import Plan as Plan
    from .planning import plan as plan
    from .planning import tree_nbytes as tree_nbytes
    from .prune import apply_masks as apply_masks
    from .prune import masked_updates as masked_updates
    from .prune import prune_magnitude as prune_magnitude
    from .prune import prune_structured as prune_structured
    from .prune import sparsity as sparsity
    from .ste import fake_quantize as fake_quantize
    from .ste import fake_quantize_tree as fake_quantize_tree
    from .train import combine as combine
    from .train import labels as labels
    from .train import partition as partition
    from .tree import TreeReport as TreeReport
    from .tree import dequantize_tree as dequantize_tree
    from .tree import quantize_tree as quantize_tree
    from .runtime import quantized_apply as quantized_apply
    from .checkpoint import load as load
    from .checkpoint import save as save


def __getattr__(name: str):
    try:
        module, attr = _API[name]
    except KeyError:
        raise AttributeError(f"module 'distq' has no attribute {name!r}") from None
    value = _importlib.import_module(module, __name__)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))


__all__ = sorted(_API)


# flax.serialization learns distq's leaf types (distq.integrations.flax) as soon as both are
# loaded, in whichever order, without distq importing Flax itself
def _register_with_flax() -> None:
    _importlib.import_module(".integrations.flax", __name__)


class _AfterImport:
    """A meta-path finder that runs ``callback`` right after module ``name`` is executed."""

    def __init__(self, name: str, callback):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        _sys.meta_path.remove(self)
        spec = _importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader, callback = spec.loader, self.callback

        class _Loader:
            def __getattr__(self, attr):
                return getattr(loader, attr)

            def create_module(self, spec_):
                return loader.create_module(spec_)

            def exec_module(self, module):
                loader.exec_module(module)
                callback()

        spec.loader = _Loader()
        return spec


if "flax.serialization" in _sys.modules:
    _register_with_flax()
elif not any(isinstance(f, _AfterImport) for f in _sys.meta_path):
    _sys.meta_path.insert(0, _AfterImport("flax.serialization", _register_with_flax))
