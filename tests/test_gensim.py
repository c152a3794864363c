"""Tests of distq.integrations.gensim: PQ-compressed KeyedVectors and fastText models.

The fastText model is trained here on gensim's shipped Lee corpus (32 dimensions, 8 epochs, one
worker and a deterministic hash function, ~1.5 s) and compressed with m=8 sub-spaces of 8 bits.
Thresholds were measured on this machine and given some room: top-10 overlap of
``most_similar`` with the float model 0.745 (mean over 100 query words), cosine between
compressed and float out-of-vocabulary vectors 0.9965 mean / 0.984 min (268 words), size ratio
11.5x.
"""

from __future__ import annotations

import doctest
import zlib

import jax
import numpy as np
import pytest

gensim = pytest.importorskip("gensim")

from gensim.models import KeyedVectors  # noqa: E402
from gensim.models.fasttext import FastText, ft_ngram_hashes, load_facebook_model  # noqa: E402
from gensim.test.utils import datapath  # noqa: E402
from gensim.utils import simple_preprocess  # noqa: E402

import distq  # noqa: E402
import distq.integrations.gensim as G  # noqa: E402
from distq.integrations.gensim import CompressedKeyedVectors, compress  # noqa: E402


def _crc(s) -> int:  # deterministic across processes (Python's str hash is salted)
    return zlib.crc32(str(s).encode())


@pytest.fixture(scope="module")
def ft():
    with open(datapath("lee_background.cor"), encoding="utf-8") as f:
        sents = [simple_preprocess(line) for line in f]
    return FastText(sents, vector_size=32, epochs=8, min_count=3, bucket=20000, workers=1,
                    seed=0, alpha=0.05, hashfxn=_crc)


@pytest.fixture(scope="module")
def ckv(ft):
    return compress(ft, distq.PQ(m=8, bits=8), key=jax.random.key(0))


@pytest.fixture(scope="module")
def oov_words(ft):
    words = [w[:-1] + "zq" for w in ft.wv.index_to_key[:300] if len(w) > 3]
    assert not any(w in ft.wv.key_to_index for w in words)
    return words


def _cos(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_structure_and_size(ft, ckv):
    wv = ft.wv
    assert len(ckv) == len(wv) and ckv.index_to_key == tuple(wv.index_to_key)
    assert ckv.vector_size == 32 and ckv.bucket == 20000
    assert (ckv.min_n, ckv.max_n) == (wv.min_n, wv.max_n)
    assert ckv.norms.dtype == np.float16
    np.testing.assert_allclose(ckv.norms, np.linalg.norm(wv.vectors, axis=1), rtol=1e-3)
    expect = (ckv.vectors.nbytes + ckv.ngrams.nbytes + 2 * len(wv))
    assert ckv.nbytes == expect
    assert (wv.vectors.nbytes + wv.vectors_ngrams.nbytes) / ckv.nbytes > 10  # measured 11.5
    assert ckv.seed_style_nbytes() > ckv.nbytes
    assert "CompressedKeyedVectors(words=" in repr(ckv)


def test_in_vocabulary_vectors(ft, ckv):
    words = ft.wv.index_to_key[:50]
    got = ckv[words]
    dec = ckv.decode()
    np.testing.assert_allclose(got, dec[:50], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ckv["the"], dec[ckv.get_index("the")], rtol=1e-6)
    assert _cos(dec, ft.wv.vectors).mean() > 0.99
    unit = ckv.get_vector("the", norm=True)
    assert abs(np.linalg.norm(unit) - 1) < 1e-5


def test_oov_vectors_close_to_gensim(ft, ckv, oov_words):
    ref = np.stack([ft.wv.get_vector(w) for w in oov_words])
    got = ckv.get_vectors(oov_words)
    cos = _cos(ref, got)
    assert cos.mean() > 0.98 and cos.min() > 0.95  # measured 0.9965 / 0.984
    np.testing.assert_allclose(ckv.get_vector(oov_words[0]), got[0], rtol=1e-6)
    assert oov_words[0] in ckv and not ckv.has_index_for(oov_words[0])


def test_oov_buckets_bit_compatible_with_gensim(ckv, oov_words):
    """Our n-gram composition equals gensim's own code run on the decoded buckets."""
    kv = ckv.to_keyedvectors()
    words = oov_words[:40] + ["é-ß-東京", "a", "xyzzy"]
    ours = ckv.get_vectors(words)
    theirs = np.stack([kv.get_vector(w) for w in words])
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    # and the same with gensim's normalisation
    np.testing.assert_allclose(ckv.get_vector("xyzzy", norm=True),
                               kv.get_vector("xyzzy", norm=True), rtol=1e-5, atol=1e-6)
    # the rows really are the ones gensim hashes to
    h = ft_ngram_hashes("xyzzy", ckv.min_n, ckv.max_n, ckv.bucket)
    rows = np.asarray(ckv.ngrams.dequantize())[h]
    np.testing.assert_allclose(ckv.get_vector("xyzzy"), rows.mean(0), rtol=1e-5, atol=1e-6)


def test_most_similar_overlap_with_float_model(ft, ckv):
    queries = ft.wv.index_to_key[:400:4]
    overlap = [
        len({w for w, _ in ft.wv.most_similar(q, topn=10)}
            & {w for w, _ in ckv.most_similar(q, topn=10)}) / 10
        for q in queries
    ]
    assert np.mean(overlap) > 0.6  # measured 0.745


def test_most_similar_is_cosine_on_decoded_vectors(ft, ckv):
    """The PQ-table ranking equals gensim's ranking on the decoded vectors."""
    kv = ckv.to_keyedvectors()
    for q in ("government", "fire", "australia"):
        ours = ckv.most_similar(q, topn=10)
        theirs = kv.most_similar(q, topn=10)
        # the same list up to float rounding: our scores are gensim's cosines on the decoded
        # vectors, and nothing gensim ranks strictly higher is missing
        np.testing.assert_allclose([s for _, s in ours], [kv.similarity(q, w) for w, _ in ours],
                                   atol=1e-5)
        np.testing.assert_allclose([s for _, s in ours], [s for _, s in theirs], atol=1e-5)
        assert len({w for w, _ in ours} & {w for w, _ in theirs}) >= 8
        assert q not in [w for w, _ in ours]
    # analogies (positive + negative) and raw vectors, as in gensim
    ours = ckv.most_similar(positive=["police", "fire"], negative=["government"], topn=5)
    theirs = kv.most_similar(positive=["police", "fire"], negative=["government"], topn=5)
    np.testing.assert_allclose([s for _, s in ours], [s for _, s in theirs], atol=1e-5)
    vec = ckv["fire"]
    by_vec = ckv.similar_by_vector(vec, topn=3)
    assert by_vec[0][0] == "fire" and by_vec[0][1] == pytest.approx(1.0, abs=1e-5)
    assert [w for w, _ in ckv.similar_by_word("fire", topn=4)] == \
        [w for w, _ in ckv.most_similar("fire", topn=4)]
    # every score, and a restricted vocabulary
    allsc = ckv.most_similar("fire", topn=None)
    assert allsc.shape == (len(ckv),)
    np.testing.assert_allclose(allsc, kv.most_similar("fire", topn=None), atol=1e-5)
    top = ckv.most_similar("fire", topn=5, restrict_vocab=100)
    assert all(ckv.get_index(w) < 100 for w, _ in top)
    # an out-of-vocabulary query works through its n-grams
    assert len(ckv.most_similar("firefighterz", topn=3)) == 3


def test_queries_never_decode_the_matrices(ckv, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("decoded a whole matrix")

    monkeypatch.setattr(distq.pq.PQArray, "dequantize", boom)
    monkeypatch.setattr(distq.pq.PQArray, "codes_unpacked", boom)
    # shapes not used elsewhere, so the jitted helpers are traced again under the patch
    assert len(ckv.most_similar("fire", topn=40)) == 40  # a new top-k size
    long_word = "x" * 70 + "firefighterz"  # ~300 n-grams: a new gather size
    assert ckv.get_vector(long_word).shape == (32,)
    ckv.similarity(long_word, "police")
    with pytest.raises(AssertionError, match="decoded a whole matrix"):
        ckv.vectors.dequantize()


def test_similarity(ft, ckv):
    for a, b in (("government", "minister"), ("fire", "police"), ("fire", "firefighterz")):
        s = ckv.similarity(a, b)
        assert s == pytest.approx(float(_cos(ckv[a], ckv[b])), abs=1e-6)
        assert abs(s - float(ft.wv.similarity(a, b))) < 0.1


def test_save_load_exact(tmp_path, ckv):
    path = tmp_path / "lee.ckv"
    ckv.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["lee.ckv"]
    r = CompressedKeyedVectors.load(path)
    assert r.index_to_key == ckv.index_to_key and r.key_to_index == ckv.key_to_index
    assert (r.min_n, r.max_n, r.bucket) == (ckv.min_n, ckv.max_n, ckv.bucket)
    for a, b in ((ckv.vectors, r.vectors), (ckv.ngrams, r.ngrams)):
        for f in ("codes", "codebooks"):
            x, y = np.asarray(getattr(a, f)), np.asarray(getattr(b, f))
            assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
        assert (a.shape, a.m, a.bits, a.dtype) == (b.shape, b.m, b.bits, b.dtype)
    assert r.norms.dtype == ckv.norms.dtype and r.norms.tobytes() == ckv.norms.tobytes()
    assert r.nbytes == ckv.nbytes
    np.testing.assert_array_equal(r.get_vectors(["fire", "firefighterz"]),
                                  ckv.get_vectors(["fire", "firefighterz"]))
    assert G.load(path).most_similar("fire", topn=3) == ckv.most_similar("fire", topn=3)


def test_unusual_keys_round_trip(tmp_path):
    keys = ["", "a\nb", "東京", "\udcff-lone-surrogate", "tab\tkey"] + [f"k{i}" for i in range(59)]
    kv = KeyedVectors(4)
    kv.add_vectors(keys, np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32))
    c = compress(kv, distq.PQ(m=2, bits=4, init="random"), key=jax.random.key(1),
                 normalize=False)
    assert c.norms is None and c.ngrams is None and c.bucket == 0
    c.save(tmp_path / "k.npz")
    r = CompressedKeyedVectors.load(tmp_path / "k.npz")
    assert r.index_to_key == tuple(keys)
    np.testing.assert_array_equal(r["a\nb"], c["a\nb"])
    with pytest.raises(KeyError, match="not present"):
        c.get_vector("missing")
    assert "missing" not in c and "東京" in c


def test_bad_inputs(ft, ckv, tmp_path):
    with pytest.raises(TypeError, match="model must be a gensim model or KeyedVectors"):
        compress(np.zeros((10, 4)), key=jax.random.key(0))
    with pytest.raises(ValueError, match="spec.m=5 sub-spaces must divide the vector size 32"):
        compress(ft, distq.PQ(m=5, bits=4), key=jax.random.key(0))
    with pytest.raises(ValueError, match="norms_dtype"):
        compress(ft, key=jax.random.key(0), norms_dtype="int8")
    with pytest.raises(TypeError, match="spec must be a distq.pq.PQ"):
        compress(ft, spec="pq", key=jax.random.key(0))
    kv = KeyedVectors(4)
    kv.add_vectors([f"w{i}" for i in range(10)], np.ones((10, 4), np.float32))
    with pytest.raises(ValueError, match="bits=8 needs at least 256 word vectors"):
        compress(kv, key=jax.random.key(0))
    kv2 = KeyedVectors(4)
    kv2.add_vectors([1, 2], np.ones((2, 4), np.float32))
    with pytest.raises(TypeError, match="keys must be strings"):
        compress(kv2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="at least one positive or negative"):
        ckv.most_similar()
    with pytest.raises(ValueError, match="query vector must have shape"):
        ckv.most_similar(positive=[np.zeros(3)])
    with pytest.raises(ValueError, match="topn must be"):
        ckv.most_similar("fire", topn=-1)
    with pytest.raises(ValueError, match="not a distq.CompressedKeyedVectors file"):
        from distq.compat.quantitizer import atomic_savez

        atomic_savez(tmp_path / "x.npz", {"a": np.zeros(1)}, {"format": "x", "version": 1})
        CompressedKeyedVectors.load(tmp_path / "x.npz")


@pytest.mark.slow
def test_shipped_facebook_model(tmp_path):
    """gensim's shipped ``lee_fasttext.bin`` (Facebook format: 1762 words, 1000 buckets, D=10)."""
    model = load_facebook_model(datapath("lee_fasttext.bin"))
    c = compress(model, distq.PQ(m=5, bits=8, init="random"), key=jax.random.key(0))
    assert c.bucket == model.wv.bucket and len(c) == len(model.wv)
    words = ["night", "nights", "nightz", "unseenword"]
    ref = np.stack([model.wv.get_vector(w) for w in words])
    assert _cos(ref, c.get_vectors(words)).min() > 0.9
    c.save(tmp_path / "lee.npz")
    r = CompressedKeyedVectors.load(tmp_path / "lee.npz")
    np.testing.assert_array_equal(r.get_vectors(words), c.get_vectors(words))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lee_fasttext_new.bin", "toy-model.bin",
                                  "toy-model-pretrained.bin", "crime-and-punishment.bin",
                                  "non_ascii_fasttext.bin", "cp852_fasttext.bin"])
def test_other_shipped_models(tmp_path, name):
    model = load_facebook_model(datapath(name))
    wv = model.wv
    dim, rows = wv.vector_size, min(len(wv), wv.bucket)
    bits = min(8, rows.bit_length() - 1)
    c = compress(model, distq.PQ(m=dim, bits=bits), key=jax.random.key(0))
    oov = "zzqqunseen"
    ref = wv.get_vector(oov)
    np.testing.assert_allclose(c.to_keyedvectors().get_vector(oov), c.get_vector(oov),
                               rtol=1e-5, atol=1e-6)
    if bits >= 6:
        assert _cos(ref, c.get_vector(oov)) > 0.9
    c.save(tmp_path / "m.npz")
    r = CompressedKeyedVectors.load(tmp_path / "m.npz")
    assert r.index_to_key == c.index_to_key
    np.testing.assert_array_equal(r.get_vector(oov), c.get_vector(oov))
    assert len(r.most_similar(wv.index_to_key[0], topn=3)) == 3


@pytest.mark.slow
def test_pruned_old_model_needs_ngrams_false():
    """gensim's shipped compatible-hash-true.model has 85 n-gram rows for bucket=100."""
    model = FastText.load(datapath("compatible-hash-true.model"))
    with pytest.raises(ValueError, match="85 rows but bucket=100"):
        compress(model, distq.PQ(m=5, bits=4), key=jax.random.key(0))
    c = compress(model, distq.PQ(m=5, bits=4), key=jax.random.key(0), ngrams=False)
    assert c.ngrams is None and len(c) == len(model.wv)
    w = model.wv.index_to_key[0]
    assert _cos(c[w], model.wv[w]) > 0.8


@pytest.mark.slow
def test_doctests():
    failures, _ = doctest.testmod(G, optionflags=doctest.ELLIPSIS)
    assert failures == 0
