"""distq: distributional and product quantisation of tensors and parameter trees in JAX."""

from . import bitpack as bitpack
from . import compat as compat
from . import distributions as distributions
from . import kmeans as kmeans
from . import pq as pq
from .qarray import Layout as Layout
from .qarray import QArray as QArray
from .pq import PQ as PQ
from .qarray import is_qarray as is_qarray
from .scalar import NF4 as NF4
from .scalar import Scalar as Scalar
from .scalar import Uniform as Uniform
from .scalar import dequantize as dequantize
from .scalar import nf4_levels as nf4_levels
from .scalar import quantize as quantize
from . import tree as tree
from . import nn as nn
from . import calibrate as calibrate
from . import export as export
from . import checkpoint as checkpoint
from .checkpoint import load as load
from .checkpoint import save as save
from .tree import Cast as Cast
from .tree import CastArray as CastArray
from .tree import TreeReport as TreeReport
from .tree import apply_masks as apply_masks
from .tree import combine as combine
from .tree import dequantize_tree as dequantize_tree
from .tree import distillation_loss as distillation_loss
from .tree import fake_quantize as fake_quantize
from .tree import fake_quantize_tree as fake_quantize_tree
from .tree import is_quantized as is_quantized
from .tree import masked_updates as masked_updates
from .tree import partition as partition
from .tree import prune_magnitude as prune_magnitude
from .tree import prune_structured as prune_structured
from .tree import quantize_tree as quantize_tree
from .tree import tree_nbytes as tree_nbytes

__version__ = "0.1.0"
