"""The state shared by the reverse-PQ layers: codebooks, packed codes, rotation, and the fit.

:class:`PQBase` holds ``codebooks`` (:class:`flax.nnx.Param`, ``(m, 2**bits, D / m)``), ``codes``
(:class:`PQCodes`, ``num_vectors * m`` codes bit-packed into uint32 words, the layout of
:class:`distq.pq.PQArray`) and ``rotation`` (:class:`PQRotation` after an OPQ fit, else
``None``); :func:`fit_vectors` fits them to trained vectors with :func:`distq.pq.fit`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ..core import _checks, bitpack
from ..core import pq as _pq
from ._common import Array, Initializer, check_int, model_size, value


class PQCodes(nnx.Variable):
    """The bit-packed ``uint32`` code words of a PQ layer: state, but never trained.

    ``nnx.grad`` (which differentiates :class:`flax.nnx.Param` by default) and
    ``nnx.Optimizer(..., wrt=nnx.Param)`` leave it alone; :func:`model_size` counts it.
    """


class PQRotation(nnx.Variable):
    """The frozen ``(D, D)`` orthogonal OPQ rotation of a PQ layer (not trained)."""


# ----------------------------------------------------------------------------- validation
def check_split(dim: int, m: Any, dim_name: str) -> int:
    """``m`` as an int that divides ``dim`` (the vector length, called ``dim_name`` in errors)."""
    m = check_int(m, "m")
    if dim % m:
        raise ValueError(f"{dim_name}={dim} must be divisible by m={m} (the number of sub-spaces)")
    return m


def check_pq_spec(spec: Any) -> _pq.PQ:
    """``spec`` if it is a :class:`distq.PQ` (``TypeError`` otherwise)."""
    if not isinstance(spec, _pq.PQ):
        raise TypeError(f"spec must be a distq.PQ, got {type(spec).__name__}")
    return spec


# ----------------------------------------------------------------------------- codes
def _codes_unpacked(words: Array, bits: int, n: int, m: int) -> Array:
    """All ``(n, m)`` codes, int32."""
    return bitpack.unpack(words, bits, n * m, dtype=jnp.int32).reshape(n, m)


def _random_codes(key: Array, n: int, m: int, bits: int) -> Array:
    """``n * m`` uniform random codes in ``[0, 2**bits)``, bit-packed."""
    codes = jax.random.randint(key, (n * m,), 0, 1 << bits, dtype=jnp.int32)
    return bitpack.pack(codes.astype(jnp.uint32), bits)


def fit_vectors(vectors: Array, spec: _pq.PQ, key: Array, what: str):
    """Fits ``spec`` to the ``(n, D)`` vectors; returns (codebooks, packed codes, rotation)."""
    n = vectors.shape[0]
    if n < spec.num_centroids:
        raise ValueError(
            f"spec.bits={spec.bits} needs at least 2**bits={spec.num_centroids} vectors to fit, "
            f"but {what}={n}; use fewer bits (or a random-code layer)"
        )
    fitted = _pq.fit(key, vectors, spec)
    q = fitted.encode(vectors)
    return q.codebooks, q.codes, q.rotation


def resolve_key(key: Array | None, rngs: nnx.Rngs | None, what: str) -> Array:
    """``key``, else ``rngs.params()``; ``what`` names the caller in the error when neither."""
    if key is not None:
        return key
    if rngs is not None:
        return rngs.params()
    raise TypeError(f"{what} needs a jax.random key (key=...) or rngs=nnx.Rngs(...)")


class PQBase(nnx.Module):
    """Shared state of the PQ layers: ``codebooks`` (Param), ``codes`` (PQCodes), ``rotation``.

    A subclass calls :meth:`_set_pq` in its constructor, with the arrays of a fit
    (:func:`fit_vectors`) or ``None`` for random codebooks and codes.
    """

    def _set_pq(self, num_vectors: int, vector_size: int, m: int, bits: int,
                arrays: tuple | None, rngs: nnx.Rngs | None, param_dtype: Any,
                codebook_init: Initializer | None, what: str) -> None:
        m = check_split(vector_size, m, what)
        bits = _checks.check_bits(bits)
        self.num_vectors, self.vector_size, self.m, self.bits = num_vectors, vector_size, m, bits
        k, ds = 1 << bits, vector_size // m
        if arrays is not None:
            codebooks, words, rotation = arrays
            if tuple(codebooks.shape) != (m, k, ds):
                raise ValueError(f"codebooks must have shape {(m, k, ds)}, got {codebooks.shape}")
            nw = bitpack.packed_nwords(num_vectors * m, bits)
            if words.dtype != jnp.uint32 or tuple(words.shape) != (nw,):
                raise ValueError(f"codes must be {nw} packed uint32 words, got {words.dtype} "
                                 f"{tuple(words.shape)}")
        else:
            if rngs is None:
                raise TypeError("rngs=nnx.Rngs(...) is required for random initialisation")
            init = codebook_init or nnx.initializers.normal(stddev=1.0 / math.sqrt(vector_size))
            codebooks = init(rngs.params(), (m, k, ds), param_dtype)
            words = _random_codes(rngs.params(), num_vectors, m, bits)
            rotation = None
        self.codebooks = nnx.Param(codebooks)
        self.codes = PQCodes(words)
        self.rotation = nnx.data(None) if rotation is None else PQRotation(rotation)

    @property
    def num_centroids(self) -> int:
        """``K = 2**bits`` centroids per sub-space."""
        return 1 << self.bits

    @property
    def nbytes(self) -> int:
        """True bytes of the layer: packed codes + codebooks (+ rotation) + bias."""
        return model_size(self)

    def codes_unpacked(self) -> Array:
        """All codes as an ``(num_vectors, m)`` int32 array."""
        return _codes_unpacked(self.codes[...], self.bits, self.num_vectors, self.m)

    def vectors(self) -> Array:
        """The decoded ``(num_vectors, vector_size)`` matrix of quantised vectors."""
        cb = self.codebooks[...]
        return _pq.decode_codes(self.codes_unpacked(), cb, value(self.rotation), cb.dtype)

    def as_pqarray(self) -> _pq.PQArray:
        """The vectors as a :class:`distq.pq.PQArray` (same arrays, nothing is copied)."""
        cb = self.codebooks[...]
        return _pq.PQArray(codes=self.codes[...], codebooks=cb, rotation=value(self.rotation),
                           value_shape=(self.num_vectors, self.vector_size),
                           dtype=str(cb.dtype), m=self.m, bits=self.bits)
