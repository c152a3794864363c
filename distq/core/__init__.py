"""distq's numerical core: priors, codebooks, searches, bit-packing, k-means, the spec and leaf
protocols and the quantisers themselves.

Nothing here imports Flax, optax, checkpoints or the command line: those integrations build on
the core (``distq.tree``, ``distq.calibrate``, ``distq.nn``, ``distq.checkpoint``, ...). The specs
(:mod:`distq.core.specs`) and the registry (:mod:`distq.core.spec`) do not import JAX either;
the registry loads the built-in quantisers by name when it first needs them.
"""

