"""``python -m distq.demo``: what distq does, on built-in data (about a minute on 2 CPU cores,
most of it compiling the quantisers once).

Quantises a synthetic weight matrix (Gaussian with a few outliers) with the distributional, uniform,
NF4 and product quantisers, then a small Flax MLP with ``distq.quantize_tree`` (saved to a
checkpoint, reloaded and verified), and prints true bytes and errors.
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import distq


def _row(name, x, q, dt):
    xh = np.asarray(q.dequantize(), np.float32)
    rel = float(np.mean((xh - x) ** 2) / np.var(x))
    return (f"| {name:<40} | {q.bits_per_value:6.3f} | {q.nbytes:>9,d} | {rel:10.3e} | "
            f"{dt * 1e3:7.1f} |")


def weight_table(key) -> list[str]:
    w = np.asarray(jax.random.normal(key, (512, 128)), np.float32) * 0.02
    w[::97, ::31] *= 25.0  # a few outliers, as real weights have
    specs = [
        ("distq Scalar(bits=2)", distq.Scalar(bits=2)),
        ("distq Scalar(bits=4)", distq.Scalar(bits=4)),
        ("distq Scalar(bits=8)", distq.Scalar(bits=8)),
        ("Uniform(bits=4) absmax per tensor", distq.Uniform(bits=4)),
        ("Uniform(bits=4) absmax per channel", distq.Uniform(bits=4, axis=-1)),
        ("Uniform(bits=8) absmax per tensor", distq.Uniform(bits=8)),
        ("Uniform(bits=8, symmetric=False) per chan", distq.Uniform(bits=8, symmetric=False,
                                                                    axis=-1)),
        ("NF4 (blocks of 64)", distq.NF4()),
        ("PQ(m=32, bits=6): rows in 4-dim pieces", "pq"),
    ]
    out = [
        f"Weight matrix {w.shape}, float32: {w.nbytes:,d} bytes",
        "",
        "| quantiser                                | bits/w |     bytes |    rel MSE | ms*     |",
        "|------------------------------------------|--------|-----------|------------|---------|",
    ]
    out_tail = ["", "*first call: includes compilation (later calls of the same shape reuse it)"]
    for name, spec in specs:
        t = time.perf_counter()
        if spec == "pq":
            q = distq.pq.quantize(jax.random.key(1), w, distq.PQ(m=32, bits=6))
        else:
            q = distq.quantize(w, spec)
        jax.block_until_ready(q)
        out.append(_row(name, w, q, time.perf_counter() - t))
    return out + out_tail


def mlp_table(key) -> list[str]:
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for width in (256, 256):
                x = nn.relu(nn.Dense(width)(x))
            return nn.Dense(10)(x)

    k1, k2 = jax.random.split(key)
    model = MLP()
    x = jax.random.normal(k1, (512, 128))
    params = model.init(k2, x)
    ref = model.apply(params, x)
    f32 = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    out = ["", f"Flax MLP 128-256-256-10 ({f32:,d} bytes of float32 parameters); kernels quantised,",
           "biases kept:", "",
           "| kernels quantised with         | param bytes | output rel. error | logits agree |",
           "|--------------------------------|-------------|-------------------|--------------|"]
    for bits in (2, 4):
        rules = [(r".*kernel", distq.Scalar(bits=bits)), (r".*", None)]
        qparams, report = distq.quantize_tree(params, rules)
        y = model.apply(distq.dequantize_tree(qparams), x)
        rel = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
        agree = float(jnp.mean(jnp.argmax(y, -1) == jnp.argmax(ref, -1)))
        out.append(f"| Scalar(bits={bits})                | {distq.tree_nbytes(qparams):>11,d} | "
                   f"{rel:17.4f} | {agree:12.3f} |")
    # save the 4-bit model, reload it and check it is the same model
    qparams, report = distq.quantize_tree(params, [(r".*kernel", distq.Scalar(bits=4)),
                                                   (r".*", None)])
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "mlp.distq")
        size = distq.save(path, qparams, report=report)
        back = distq.load(path)
        same = all(bool(jnp.array_equal(a, b)) for a, b in
                   zip(jax.tree.leaves(qparams), jax.tree.leaves(back)))
    out += ["", "4-bit model (report of distq.quantize_tree):", "", report.table(), "",
            f"saved with distq.save: {size:,d} bytes on disk (float32 parameters: {f32:,d}); "
            f"reloaded with distq.load, checksum verified, identical: {same}"]
    return out


def main() -> None:
    key = jax.random.key(0)
    k1, k2 = jax.random.split(key)
    print("distq demo: true (bit-packed) sizes, errors relative to the float32 original\n")
    print("\n".join(weight_table(k1)))
    print("\n".join(mlp_table(k2)))


if __name__ == "__main__":
    main()
