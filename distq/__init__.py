"""distq: distributional and product quantisation of tensors and parameter trees in JAX.

The public API is listed here, one name a line. The numerical core (:mod:`distq.core`) and the
tree functions load with ``import distq``; the parts that need Flax, optax, file I/O or tracing
(:mod:`distq.nn`, :mod:`distq.calibrate`, :mod:`distq.checkpoint`, :mod:`distq.export`,
:mod:`distq.compat`, :mod:`distq.integrations`, :mod:`distq.cli`) load on first use.
"""

import importlib as _importlib
import sys as _sys

from .core import bitpack as bitpack
from .core import distributions as distributions
from .core import kmeans as kmeans
from .core import pq as pq
from .core import search as search
from .core.cast import Cast as Cast
from .core.cast import CastArray as CastArray
from .core.pq import PQ as PQ
from .core.pq import PQArray as PQArray
from .core.qarray import Layout as Layout
from .core.qarray import QArray as QArray
from .core.qarray import is_qarray as is_qarray
from .core.scalar import NF4 as NF4
from .core.scalar import Scalar as Scalar
from .core.scalar import Uniform as Uniform
from .core.scalar import nf4_levels as nf4_levels
from .core.spec import dequantize as dequantize
from .core.spec import is_quantized as is_quantized
from .core.spec import parse_spec as parse_spec
from .core.spec import quantize as quantize
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

__version__ = "0.1.0"

# submodules that load on first use (``distq.nn``, ``distq.save``, ...)
_LAZY_MODULES = ("calibrate", "checkpoint", "cli", "compat", "demo", "export", "integrations",
                 "nn")
_LAZY_NAMES = {"save": "checkpoint", "load": "checkpoint"}


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return _importlib.import_module(f".{name}", __name__)
    if name in _LAZY_NAMES:
        return getattr(_importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'distq' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_MODULES) | set(_LAZY_NAMES))


if "flax" in _sys.modules:  # Flax is loaded already: let flax.serialization know our leaves
    from .integrations import flax as _flax  # noqa: F401
