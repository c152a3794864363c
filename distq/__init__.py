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

__version__ = "0.1.0"
