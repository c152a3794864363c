"""Entropy-coded checkpoints: size against the empirical entropy of the codes, and speed.

* The issue's figure: a 4-bit Gaussian QArray of 1M values (default ``Scalar(bits=4)``) saved
  with ``entropy_coded=True``: the coded codes must take at most 1.01x the empirical entropy of
  the codes plus 4 KiB, and load bit-identical.
* Stored bits per value, fixed-rate and entropy-coded, for several specs on Gaussian weights.
* Coding speed both ways (MB/s of packed fixed-rate codes, and millions of codes per second) on
  1M and 32M codes: best and median of 5 runs, encoder and decoder interleaved.

Usage: ``python experiments/bench_entropy.py`` (about a minute on 2 cores). Writes
``experiments/out/bench_entropy.md``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import jax
import numpy as np

import distq
from distq.core import entropy

OUT = os.path.join(os.path.dirname(__file__), "out", "bench_entropy.md")


def figure(lines: list[str]) -> None:
    x = jax.random.normal(jax.random.key(0), (1000, 1000))
    q = distq.quantize(x, distq.Scalar(bits=4))
    codes = np.asarray(q.codes_unpacked()).reshape(-1)
    h = entropy.empirical_entropy(codes)
    with tempfile.TemporaryDirectory() as d:
        plain, coded = os.path.join(d, "p.distq"), os.path.join(d, "c.distq")
        n_plain = distq.save(plain, {"w": q})
        n_coded = distq.save(coded, {"w": q}, entropy_coded=True)
        info = distq.checkpoint.info(coded)
        stream = info["tensors"]["w:codes"]["shape"][0]
        back = distq.load(coded)
        exact = bool((np.asarray(back["w"].codes) == np.asarray(q.codes)).all())
    bound = 1.01 * h * codes.size / 8 + 4096
    lines += [
        "## The figure: 4-bit Gaussian QArray, 1M values, default Scalar(bits=4)", "",
        f"- empirical entropy of the codes: {h:.4f} bits/code = {h * codes.size / 8:,.0f} bytes",
        f"- coded codes in the file: {stream:,} bytes = {8 * stream / codes.size:.4f} bits/code "
        f"({stream / (h * codes.size / 8):.5f}x the entropy; bound 1.01x + 4 KiB = "
        f"{bound:,.0f} bytes: {'met' if stream <= bound else 'NOT met'})",
        f"- fixed-rate codes: {np.asarray(q.codes).nbytes:,} bytes; whole file "
        f"{n_plain:,} -> {n_coded:,} bytes entropy-coded; load exact: {exact}", ""]


def rates(lines: list[str]) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 2048)).astype(np.float32)
    specs = [("scalar:4", distq.Scalar(bits=4)), ("scalar:3", distq.Scalar(bits=3)),
             ("scalar:2", distq.Scalar(bits=2)), ("int:4", distq.Uniform(bits=4)),
             ("int:8", distq.Uniform(bits=8)), ("nf4", distq.NF4()),
             ("pq:256:8", distq.PQ(m=256, bits=8))]
    lines += ["## Stored bits per value (Gaussian 512x2048 weight)", "",
              "| spec | fixed-rate bits/value | entropy-coded bits/value | "
              "codes' entropy bits/code |",
              "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as d:
        for name, spec in specs:
            q = distq.quantize(x, spec, key=jax.random.key(1))
            f = os.path.join(d, name)
            distq.save(f, {"w": q}, entropy_coded=True)
            info = distq.checkpoint.info(f)
            stored = sum(b - a for a, b in (e["data_offsets"] for e in info["tensors"].values()))
            n_codes = 32 * np.asarray(q.codes).size // q.bits
            h = entropy.empirical_entropy(entropy.symbols_from_words(np.asarray(q.codes), q.bits,
                                                                     n_codes))
            lines.append(f"| {name} | {q.bits_per_value:.3f} | {8 * stored / x.size:.3f} | "
                         f"{h:.3f} |")
    lines.append("")


def speed(lines: list[str]) -> None:
    rng = np.random.default_rng(0)
    edges = np.array([-2.40, -1.84, -1.44, -1.10, -0.80, -0.52, -0.26, 0, 0.26, 0.52, 0.80,
                      1.10, 1.44, 1.84, 2.40])
    lines += ["## Speed (4-bit Gaussian codes; MB/s of packed fixed-rate codes)", "",
              "| codes | encode best / median MB/s | decode best / median MB/s | "
              "encode Mcodes/s | decode Mcodes/s |", "|---|---|---|---|---|"]
    for n in (1_000_000, 32_000_000):
        codes = np.searchsorted(edges, rng.standard_normal(n).astype(np.float32)).astype(
            np.uint8)
        words = entropy.words_from_symbols(codes, 4)
        enc, dec = [], []
        for _ in range(5):  # interleaved
            t = time.perf_counter()
            blob = entropy.encode_words(words, 4)
            enc.append(time.perf_counter() - t)
            t = time.perf_counter()
            back = entropy.decode_words(blob, words.size, 4)
            dec.append(time.perf_counter() - t)
            assert (back == words).all()
        mb = words.nbytes / 1e6
        lines.append(f"| {n:,} | {mb / min(enc):.0f} / {mb / statistics.median(enc):.0f} | "
                     f"{mb / min(dec):.0f} / {mb / statistics.median(dec):.0f} | "
                     f"{n / min(enc) / 1e6:.0f} | {n / min(dec) / 1e6:.0f} |")
    lines.append("")


def main() -> None:
    lines = ["# Entropy-coded checkpoints (experiments/bench_entropy.py)", "",
             f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
             "(a shared machine: speeds are noisy)", ""]
    figure(lines)
    rates(lines)
    speed(lines)
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
