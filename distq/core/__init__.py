"""distq's numerical core: priors, codebooks, searches, bit-packing, k-means, the spec and leaf
protocols and the quantisers themselves.

Nothing here imports Flax, optax, checkpoints or the command line: those integrations build on
the core (``distq.tree``, ``distq.calibrate``, ``distq.nn``, ``distq.checkpoint``, ...).
"""
