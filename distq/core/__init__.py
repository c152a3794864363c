"""distq's numerical core: priors, codebooks, searches, bit-packing, k-means, the spec and leaf
protocols and the quantisers themselves.

Nothing here imports Flax, optax, checkpoints or the command line: those integrations build on
the core (``distq.tree``, ``distq.calibrate``, ``distq.nn``, ``distq.checkpoint``, ...).
"""

# importing the built-in quantisers registers them (spec.register): any import of distq.core.*
# sees every built-in spec and leaf type
from . import cast as cast  # noqa: E402
from . import pq as pq  # noqa: E402
from . import scalar as scalar  # noqa: E402
