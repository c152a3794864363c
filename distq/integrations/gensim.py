"""Product-quantised gensim word vectors: ``KeyedVectors`` and fastText models.

:func:`compress` turns a gensim ``FastText`` model (or its ``wv``) or any ``KeyedVectors`` into a
:class:`CompressedKeyedVectors`: the word vectors ``wv.vectors`` and, for fastText, the n-gram
bucket vectors ``wv.vectors_ngrams`` are each product-quantised (:func:`distq.pq.fit`), and the
usual queries keep working on the codes:

* ``get_vector(word)`` / ``kv[word]``: an in-vocabulary word decodes its own row; an
  out-of-vocabulary word gets fastText's composition, the mean of its character n-gram bucket
  rows. The buckets are computed by gensim's own ``ft_ngram_hashes`` (bit-compatible with gensim
  and with Facebook's fastText) and only those rows are decoded (a row gather from the packed
  codes; the bucket matrix is never decoded).
* ``most_similar`` / ``similar_by_vector`` rank the vocabulary by the cosine between the query
  and each *decoded* row, computed from the PQ tables (asymmetric distance computation): one
  ``(m, K)`` table of inner products per query plus one table of squared centroid norms give
  ``q . xhat_i`` and ``|xhat_i|`` for every row by ``m`` look-ups each, in row blocks, with a
  running top-k. The ranking is the one gensim would give on the decoded vectors.
* ``similarity(a, b)``: cosine of the two (decoded or composed) vectors.

Cosine and normalisation: with ``normalize=True`` (the default) the word vectors are scaled to
unit length *before* PQ is fitted, so every word gets the same relative accuracy (long vectors
do not pull the centroids), and the original lengths are kept in ``norms`` (float16 by default:
2 bytes per word) so that ``get_vector`` returns the original scale. The n-gram buckets are never
normalised: fastText adds them up, so their lengths matter.

Files: :meth:`CompressedKeyedVectors.save` writes one ``.npz`` (atomic write, no pickles) and
:meth:`CompressedKeyedVectors.load` reads it back bit-exactly (codes, codebooks, norms,
vocabulary and n-gram settings).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

try:
    from gensim.models.fasttext import FastTextKeyedVectors, ft_ngram_hashes
    from gensim.models.keyedvectors import KeyedVectors
except ImportError as e:  # pragma: no cover - the gensim extra installs it
    raise ImportError("distq.integrations.gensim needs gensim (pip install 'distq[gensim]')") from e

from ..compat import quantitizer as _qz
from ..core import bitpack
from ..core import pq as P

_FORMAT = "distq.CompressedKeyedVectors"
_NORM_DTYPES = ("float16", "float32")
_BLOCK = 16384


def default_spec(dim: int, bits: int = 8) -> P.PQ:
    """The spec :func:`compress` uses by default: 4 values per sub-space when 4 divides ``dim``
    (else 2, else 1), ``bits`` bits per code.

    Examples:
      >>> default_spec(300)
      PQ(m=75, bits=8, ...)
    """
    per = 4 if dim % 4 == 0 else 2 if dim % 2 == 0 else 1
    return P.PQ(m=dim // per, bits=bits)


# ------------------------------------------------------------------------------- kernels
@functools.partial(jax.jit, static_argnames=("k", "block"))
def _cosine_topk(arr: P.PQArray, queries, n, *, k, block):
    """Top-``k`` rows ``i < n`` by ``cos(query, xhat_i)``, from the packed codes, in blocks.

    ``n`` is traced (any vocabulary restriction reuses the compilation); rows past ``n`` score
    ``-inf``.
    """
    m, bits = arr.m, arr.bits
    nq = queries.shape[0]
    tab = P.tables(arr.codebooks, arr.rotation, queries.T)  # (m, K, nq): C_s[c] . q_s
    cb = arr.codebooks.astype(jnp.float32)
    tab = jnp.concatenate([tab, jnp.sum(cb * cb, -1)[..., None]], -1)  # + |C_s[c]|^2
    cols = jnp.arange(m, dtype=jnp.int32)

    def body(b, carry):
        best_s, best_i = carry
        rows = b * block + jnp.arange(block, dtype=jnp.int32)
        valid = rows < n
        rows = jnp.minimum(rows, n - 1)
        codes = bitpack.take(arr.codes, bits, rows[:, None] * m + cols[None, :])  # (block, m)
        acc = P.gather_sum(tab, codes)  # (block, nq + 1)
        s = acc[:, :nq] * lax.rsqrt(jnp.maximum(acc[:, nq:], 1e-30))
        s = jnp.where(valid[:, None], s, -jnp.inf).T  # (nq, block)
        cat_s = jnp.concatenate([best_s, s], 1)
        cat_i = jnp.concatenate([best_i, jnp.broadcast_to(rows, (nq, block))], 1)
        top, arg = lax.top_k(cat_s, k)
        return top, jnp.take_along_axis(cat_i, arg, 1)

    init = (jnp.full((nq, k), -jnp.inf, jnp.float32), jnp.zeros((nq, k), jnp.int32))
    return lax.fori_loop(0, (n + block - 1) // block, body, init)


@functools.partial(jax.jit, static_argnames=("n",))
def _cosine_all(arr: P.PQArray, query, *, n):
    """``cos(query, xhat_i)`` for the first ``n`` rows, from their codes."""
    codes = arr.row_codes(jnp.arange(n, dtype=jnp.int32))
    tab = P.tables(arr.codebooks, arr.rotation, query[:, None])
    cb = arr.codebooks.astype(jnp.float32)
    tab = jnp.concatenate([tab, jnp.sum(cb * cb, -1)[..., None]], -1)
    acc = P.gather_sum(tab, codes)
    return acc[:, 0] * lax.rsqrt(jnp.maximum(acc[:, 1], 1e-30))


def _unit(v: np.ndarray) -> np.ndarray:
    nrm = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.where(nrm > 0, v / np.where(nrm > 0, nrm, 1), 0).astype(np.float32)


# ---------------------------------------------------------------------------- the vectors
@dataclasses.dataclass(frozen=True, eq=False)
class CompressedKeyedVectors:
    """Product-quantised word vectors (+ fastText n-gram buckets) that answer gensim's queries.

    Build one with :func:`compress` or :meth:`load`.

    Attributes:
      index_to_key: the vocabulary, in row order.
      vectors: the word vectors, :class:`distq.pq.PQArray` ``(N, D)`` (unit rows when ``norms``
        is set).
      norms: ``(N,)`` original lengths of the rows (float16 or float32), or ``None`` when the
        rows were quantised as they are.
      ngrams: the fastText bucket vectors, :class:`distq.pq.PQArray` ``(bucket, D)``, or
        ``None`` (plain ``KeyedVectors``: no out-of-vocabulary vectors).
      min_n, max_n: fastText's character n-gram lengths (0 without n-grams).
      key_to_index: ``{word: row}`` (derived from ``index_to_key``).

    Examples:
      >>> import numpy as np, jax, distq
      >>> from gensim.models import KeyedVectors
      >>> from distq.integrations.gensim import compress
      >>> kv = KeyedVectors(32)
      >>> kv.add_vectors([f"w{i}" for i in range(512)],
      ...                np.random.default_rng(0).standard_normal((512, 32)).astype(np.float32))
      >>> ckv = compress(kv, distq.PQ(m=4, bits=4), key=jax.random.key(0))
      >>> ckv["w3"].shape, ckv.most_similar("w3", topn=2)[0][0] != "w3"
      ((32,), True)
      >>> ckv.nbytes < kv.vectors.nbytes
      True
    """

    index_to_key: tuple[str, ...]
    vectors: P.PQArray
    norms: np.ndarray | None = None
    ngrams: P.PQArray | None = None
    min_n: int = 0
    max_n: int = 0
    key_to_index: dict = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        keys = tuple(self.index_to_key)
        object.__setattr__(self, "index_to_key", keys)
        if not isinstance(self.vectors, P.PQArray):
            raise TypeError(
                f"vectors must be a distq.pq.PQArray, got {type(self.vectors).__name__}")
        n, dim = self.vectors.shape
        if len(keys) != n:
            raise ValueError(f"index_to_key has {len(keys)} keys for {n} vector rows")
        k2i = {k: i for i, k in enumerate(keys)}
        if len(k2i) != n:
            raise ValueError("index_to_key has duplicate keys")
        object.__setattr__(self, "key_to_index", k2i)
        if self.norms is not None:
            norms = np.asarray(self.norms)
            if norms.shape != (n,) or norms.dtype.name not in _NORM_DTYPES:
                raise ValueError(f"norms must be a float16/float32 array of shape ({n},)")
            object.__setattr__(self, "norms", norms)
        if self.ngrams is not None:
            if not isinstance(self.ngrams, P.PQArray):
                raise TypeError(
                    f"ngrams must be a distq.pq.PQArray, got {type(self.ngrams).__name__}")
            if self.ngrams.shape[1] != dim:
                raise ValueError(f"ngrams rows have length {self.ngrams.shape[1]}, vectors {dim}")
            if not 1 <= self.min_n <= self.max_n:
                raise ValueError(f"need 1 <= min_n <= max_n with n-grams, got {self.min_n}, "
                                 f"{self.max_n}")

    # ------------------------------------------------------------------ basics
    @property
    def vector_size(self) -> int:
        return self.vectors.shape[1]

    @property
    def bucket(self) -> int:
        """Number of fastText n-gram buckets (0 without n-grams)."""
        return 0 if self.ngrams is None else self.ngrams.shape[0]

    @property
    def nbytes(self) -> int:
        """Stored bytes of the numbers: codes + codebooks (+ rotations) + norms.

        The vocabulary is not included; :meth:`seed_style_nbytes` adds its Python size.
        """
        total = self.vectors.nbytes
        if self.norms is not None:
            total += self.norms.nbytes
        if self.ngrams is not None:
            total += self.ngrams.nbytes
        return total

    def seed_style_nbytes(self) -> int:
        """``nbytes`` plus the deep Python size of the vocabulary (quantitizer's "memory")."""
        return self.nbytes + _qz.deep_sizeof((self.index_to_key, self.key_to_index))

    def __len__(self) -> int:
        return len(self.index_to_key)

    def __contains__(self, word) -> bool:
        """gensim's rule: with n-grams every word has a vector; else only the vocabulary."""
        return self.bucket > 0 or word in self.key_to_index

    def has_index_for(self, word) -> bool:
        """Whether ``word`` is in the vocabulary."""
        return word in self.key_to_index

    def get_index(self, word, default=None) -> int:
        """Row of ``word``; ``KeyError`` if absent and no ``default``."""
        if word in self.key_to_index:
            return self.key_to_index[word]
        if default is not None:
            return default
        raise KeyError(f"Key '{word}' not present")

    def __repr__(self) -> str:
        ng = f", ngrams={self.ngrams.shape}" if self.ngrams is not None else ""
        return (f"CompressedKeyedVectors(words={len(self)}, dim={self.vector_size}, "
                f"m={self.vectors.m}, bits={self.vectors.bits}{ng}, nbytes={self.nbytes})")

    # ------------------------------------------------------------------ vectors
    def _ngram_buckets(self, word: str) -> list[int]:
        return ft_ngram_hashes(word, self.min_n, self.max_n, self.bucket)

    def get_vectors(self, words: Iterable[str], norm: bool = False) -> np.ndarray:
        """``(len(words), D)`` float32 vectors, like ``get_vector`` row by row.

        In-vocabulary rows are decoded in one gather; all out-of-vocabulary words' n-gram
        buckets are decoded in one more gather and averaged per word.
        """
        words = list(words)
        out = np.zeros((len(words), self.vector_size), np.float32)
        known = [(j, self.key_to_index[w]) for j, w in enumerate(words) if w in self.key_to_index]
        if known:
            pos, rows = (np.asarray(t) for t in zip(*known))
            vec = _qz.take_rows(self.vectors, rows).astype(np.float32)
            if self.norms is not None:
                vec = vec * self.norms[rows].astype(np.float32)[:, None]
            out[pos] = vec
        unknown = [j for j, w in enumerate(words) if w not in self.key_to_index]
        if unknown and self.ngrams is None:
            raise KeyError(f"Key '{words[unknown[0]]}' not present (no n-grams for "
                           "out-of-vocabulary words)")
        if unknown:
            hashes = [self._ngram_buckets(words[j]) for j in unknown]
            counts = np.array([len(h) for h in hashes])
            flat = np.fromiter((b for h in hashes for b in h), np.int32, int(counts.sum()))
            if flat.size:
                rows = _qz.take_rows(self.ngrams, flat).astype(np.float32)
                starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
                has = counts > 0
                sums = np.add.reduceat(rows, starts[has], axis=0)
                out[np.asarray(unknown)[has]] = sums / counts[has, None]
        return _unit(out) if norm else out

    def get_vector(self, word: str, norm: bool = False) -> np.ndarray:
        """The ``(D,)`` float32 vector of ``word`` (fastText n-gram mean when out of vocabulary).

        Raises:
          KeyError: an out-of-vocabulary word without n-grams (plain ``KeyedVectors``).
        """
        return self.get_vectors([word], norm=norm)[0]

    def __getitem__(self, words):
        if isinstance(words, (list, tuple, np.ndarray)):
            return self.get_vectors(words)
        return self.get_vector(words)

    def decode(self) -> np.ndarray:
        """All ``(N, D)`` word vectors, decoded (original lengths restored)."""
        vec = np.asarray(_qz.dequantize_pq(self.vectors), np.float32)
        if self.norms is not None:
            vec = vec * self.norms.astype(np.float32)[:, None]
        return vec

    def to_keyedvectors(self) -> KeyedVectors:
        """A float gensim ``KeyedVectors`` (``FastTextKeyedVectors`` with n-grams) of the decoded
        vectors, e.g. for gensim's evaluators (``evaluate_word_analogies``)."""
        if self.ngrams is None:
            kv = KeyedVectors(self.vector_size)
        else:
            kv = FastTextKeyedVectors(self.vector_size, self.min_n, self.max_n, self.bucket)
        kv.add_vectors(list(self.index_to_key), self.decode())
        if self.ngrams is not None:
            kv.vectors_ngrams = np.asarray(_qz.dequantize_pq(self.ngrams), np.float32)
        return kv

    # ------------------------------------------------------------------ similarity
    def similarity(self, w1: str, w2: str) -> float:
        """Cosine similarity of two words' vectors (n-gram composed when out of vocabulary)."""
        a, b = self.get_vectors([w1, w2], norm=True)
        return float(a @ b)

    def _query(self, positive, negative) -> tuple[np.ndarray, set[int]]:
        def items(arg, sign):
            if arg is None:
                return []
            if isinstance(arg, (str, np.ndarray)) or (isinstance(arg, tuple) and len(arg) == 2
                                                       and isinstance(arg[1], (int, float))):
                arg = [arg]
            out = []
            for it in arg:
                if isinstance(it, tuple):
                    out.append((it[0], float(it[1])))
                else:
                    out.append((it, sign))
            return out

        pairs = items(positive, 1.0) + items(negative, -1.0)
        if not pairs:
            raise ValueError("most_similar needs at least one positive or negative key")
        mean = np.zeros(self.vector_size, np.float32)
        total, exclude = 0.0, set()
        words = [k for k, _ in pairs if isinstance(k, str)]
        wvecs = dict(zip(words, self.get_vectors(words, norm=True))) if words else {}
        for k, w in pairs:
            if isinstance(k, str):
                mean += w * wvecs[k]
                if k in self.key_to_index:
                    exclude.add(self.key_to_index[k])
            else:
                v = np.asarray(k, np.float32)
                if v.shape != (self.vector_size,):
                    raise ValueError(f"a query vector must have shape ({self.vector_size},), "
                                     f"got {v.shape}")
                mean += w * v
            total += abs(w)
        return _unit(mean / max(total, 1e-30)), exclude

    def most_similar(self, positive=None, negative=None, topn: int | None = 10,
                     restrict_vocab: int | None = None) -> list[tuple[str, float]] | np.ndarray:
        """gensim's ``most_similar``, answered from the PQ tables.

        Args:
          positive: a word, a vector, or a list of them (or of ``(key, weight)`` pairs).
          negative: the same, subtracted.
          topn: number of results; ``None`` or 0 returns the cosine of every word instead.
          restrict_vocab: rank only the first ``restrict_vocab`` words.

        Returns:
          ``[(word, cosine), ...]`` best first, the query words left out (as gensim).
        """
        q, exclude = self._query(positive, negative)
        n = len(self) if restrict_vocab is None else _qz.check_int(
            restrict_vocab, "restrict_vocab", 1, len(self))
        v = self.vectors
        if not topn:
            return np.asarray(_cosine_all(v, jnp.asarray(q), n=n))
        topn = _qz.check_int(topn, "topn", 1)
        exclude = {i for i in exclude if i < n}
        need = min(topn + len(exclude), n)
        k = 1 << max(need - 1, 15).bit_length()  # bucketed: few compilations
        s, idx = _cosine_topk(v, jnp.asarray(q)[None], jnp.int32(n), k=k,
                              block=min(len(self), _BLOCK))
        s, idx = np.asarray(s[0])[:need], np.asarray(idx[0])[:need]
        res = [(self.index_to_key[i], float(c)) for i, c in zip(idx, s) if i not in exclude]
        return res[:topn]

    def similar_by_vector(self, vector, topn: int = 10, restrict_vocab: int | None = None):
        """Words nearest to a vector (cosine), from the PQ tables."""
        return self.most_similar(positive=[np.asarray(vector)], topn=topn,
                                 restrict_vocab=restrict_vocab)

    def similar_by_word(self, word: str, topn: int = 10, restrict_vocab: int | None = None):
        """Words nearest to ``word`` (cosine), ``word`` itself left out."""
        return self.most_similar(positive=[word], topn=topn, restrict_vocab=restrict_vocab)

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Writes one ``.npz`` file at exactly ``path`` (atomic; read back by :meth:`load`)."""
        raw = [k.encode("utf-8", "surrogatepass") for k in self.index_to_key]
        offsets = np.zeros(len(raw) + 1, np.int64)
        offsets[1:] = np.cumsum([len(b) for b in raw])
        arrays = _qz.pq_arrays("vectors.", self.vectors)
        arrays["vocab.utf8"] = np.frombuffer(b"".join(raw), np.uint8)
        arrays["vocab.offsets"] = offsets
        if self.norms is not None:
            arrays["norms"] = self.norms
        if self.ngrams is not None:
            arrays.update(_qz.pq_arrays("ngrams.", self.ngrams))
        meta = {"format": _FORMAT, "version": _qz.FILE_VERSION, "vectors": self.vectors.metadata(),
                "ngrams": None if self.ngrams is None else self.ngrams.metadata(),
                "min_n": self.min_n, "max_n": self.max_n}
        _qz.atomic_savez(path, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CompressedKeyedVectors":
        """Reads a file written by :meth:`save` (validated; ``ValueError`` if corrupt)."""
        arrays, meta = _qz.read_npz(path, _FORMAT)
        try:
            blob = arrays["vocab.utf8"].tobytes()
            off = arrays["vocab.offsets"]
            keys = tuple(blob[a:b].decode("utf-8", "surrogatepass")
                         for a, b in zip(off[:-1].tolist(), off[1:].tolist()))
            vectors = _qz.pq_from_arrays("vectors.", arrays, meta["vectors"])
            ngrams = None if meta["ngrams"] is None else _qz.pq_from_arrays("ngrams.", arrays,
                                                                      meta["ngrams"])
            return cls(keys, vectors, arrays.get("norms"), ngrams, int(meta["min_n"]),
                       int(meta["max_n"]))
        except (KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"{os.fspath(path)!r} is missing data: {e!r}") from None


# ------------------------------------------------------------------------------ compress
def _fit_encode(key, x: np.ndarray, spec: P.PQ, what: str) -> P.PQArray:
    n, dim = x.shape
    if dim % spec.m:
        raise ValueError(f"spec.m={spec.m} sub-spaces must divide the vector size {dim}")
    if n < spec.num_centroids:
        raise ValueError(f"bits={spec.bits} needs at least {spec.num_centroids} {what}, the "
                         f"model has {n}; use fewer bits")
    return P.fit(key, x, spec).encode(x)


def compress(model: Any, spec: P.PQ | None = None, *, key: jax.Array,
             ngram_spec: P.PQ | None = None, normalize: bool = True,
             norms_dtype: str = "float16", ngrams: bool = True) -> CompressedKeyedVectors:
    """Product-quantises a gensim model's word vectors (and fastText n-gram buckets).

    Args:
      model: a gensim ``FastText`` / ``Word2Vec`` model (its ``.wv`` is used), a
        ``FastTextKeyedVectors`` or a ``KeyedVectors`` with string keys.
      spec: :class:`distq.pq.PQ` for the word vectors; ``None`` means :func:`default_spec`.
      key: a ``jax.random`` key (the result is a deterministic function of it).
      ngram_spec: spec for the n-gram buckets; ``None`` means ``spec``.
      normalize: quantise unit-length word vectors and keep the lengths in ``norms`` (best
        for cosine queries); ``False`` quantises the rows as they are.
      norms_dtype: "float16" (2 bytes per word) or "float32".
      ngrams: keep fastText's n-gram buckets (out-of-vocabulary vectors); ``False`` keeps only
        the vocabulary's vectors.

    Returns:
      A :class:`CompressedKeyedVectors`.

    Raises:
      TypeError: ``model`` is not a gensim model or ``KeyedVectors``, or has non-string keys.
      ValueError: ``spec.m`` does not divide the vector size, fewer rows than centroids, or a
        fastText model whose ``vectors_ngrams`` does not have ``bucket`` rows (a pruned
        pre-4.0 model that gensim itself cannot compose: pass ``ngrams=False``).

    Examples:
      >>> import jax
      >>> from gensim.models.fasttext import load_facebook_model
      >>> from gensim.test.utils import datapath
      >>> from distq.integrations.gensim import compress
      >>> import distq
      >>> ft = load_facebook_model(datapath("lee_fasttext.bin"))   # 1762 words, 1000 buckets, D=10
      >>> ckv = compress(ft, distq.PQ(m=5, bits=4, sample=500), key=jax.random.key(0))
      >>> ckv.get_vector("neverseenword").shape, ckv.bucket
      ((10,), 1000)
    """
    wv = getattr(model, "wv", model)
    if not isinstance(wv, KeyedVectors):
        raise TypeError(f"model must be a gensim model or KeyedVectors, got {type(model).__name__}")
    keys = list(wv.index_to_key)
    bad = next((k for k in keys if not isinstance(k, str)), None)
    if bad is not None:
        raise TypeError(f"model keys must be strings, found {type(bad).__name__} {bad!r}")
    x = np.asarray(wv.vectors, np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"model has no word vectors (shape {x.shape})")
    dim = x.shape[1]
    spec = default_spec(dim) if spec is None else spec
    ngram_spec = spec if ngram_spec is None else ngram_spec
    for name, s in (("spec", spec), ("ngram_spec", ngram_spec)):
        if not isinstance(s, P.PQ):
            raise TypeError(f"{name} must be a distq.pq.PQ, got {type(s).__name__}")
    for name, flag in (("normalize", normalize), ("ngrams", ngrams)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if norms_dtype not in _NORM_DTYPES:
        raise ValueError(f"norms_dtype={norms_dtype!r} is not allowed; choose one of "
                         f"{list(_NORM_DTYPES)}")
    k_vec, k_ng = jax.random.split(key)
    norms = None
    if normalize:
        lengths = np.linalg.norm(x, axis=1)
        x = _unit(x)
        norms = lengths.astype(norms_dtype)
    vectors = _fit_encode(k_vec, x, spec, "word vectors")
    ng_pq, min_n, max_n = None, 0, 0
    if (ngrams and isinstance(wv, FastTextKeyedVectors) and wv.bucket
            and wv.vectors_ngrams is not None):
        ng = np.asarray(wv.vectors_ngrams, np.float32)
        if ng.shape[0] != wv.bucket:
            raise ValueError(
                f"the model's vectors_ngrams has {ng.shape[0]} rows but bucket={wv.bucket}: n-gram "
                "hashes cannot address them (gensim fails on it too); pass ngrams=False")
        ng_pq = _fit_encode(k_ng, ng, ngram_spec, "n-gram buckets")
        min_n, max_n = int(wv.min_n), int(wv.max_n)
    return CompressedKeyedVectors(tuple(keys), vectors, norms, ng_pq, min_n, max_n)


def load(path: str | os.PathLike) -> CompressedKeyedVectors:
    """Same as :meth:`CompressedKeyedVectors.load`."""
    return CompressedKeyedVectors.load(path)


__all__ = ["compress", "load", "CompressedKeyedVectors", "default_spec"]
