"""Speed at model scale: ``quantize_tree`` on a 50M-parameter transformer-shaped tree.

Run: ``.venv/bin/python experiments/bench_scale.py [--quick] [--no-speed] [--first-runs N]
[--calibrated] [--memory] [--tensor] [--streaming] [--multiprocess]``. Writes
``experiments/out/bench_scale.md`` and prints the same tables.

Sections (each optional):

* speed (default on): distq's specs beside NF4 and Uniform on the tree (4 layers, d=1024, FFN
  4096, Gaussian weights of std 0.02, Flax ``kernel`` leaves): the first call, in a fresh
  process for each spec (compilation included, nothing shared between specs), and the
  compiled time, all specs interleaved in one process (best and median of the rounds), with
  the mean relative error of the leaves and the bits per weight.
* ``--tensor``: one 1024x4096 tensor, compiled (per-tensor default ``Scalar``, the fixed
  ``gaussian, beta=1`` path, NF4), and the compilation a new shape costs.
* ``--calibrated``: calibrated ``quantize_tree`` (GPTQ-style) with a synthetic ``apply_fn``
  (the tree's layers applied to 256 random tokens), first call and once compiled.
* ``--memory``: per-device memory of ``quantize_tree`` under ``jax.jit`` on a row-sharded
  8192x1024 weight over 8 host devices (``memory_analysis`` of the compiled program).
* ``--streaming`` / ``--multiprocess``: run ``experiments/bench_streaming.py`` and
  ``experiments/bench_multiprocess.py`` (other benchmarks, when present) as subprocesses.

The machine is shared (2 cores, several other jobs): every ratio is taken between runs made
side by side, and best and median are both reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out")

SPECS = {  # name -> expression (see spec_of)
    "Scalar(bits=4)": "distq.Scalar(bits=4)",
    "Scalar(bits=3)": "distq.Scalar(bits=3)",
    "Scalar(bits=4, dist='gaussian', beta=1.0)": "distq.Scalar(bits=4, dist='gaussian', beta=1.0)",
    "Scalar(bits=8)": "distq.Scalar(bits=8)",
    "NF4()": "distq.NF4()",
    "Uniform(bits=4, group_size=128)": "distq.Uniform(bits=4, group_size=128)",
}
QUICK = ["Scalar(bits=4)", "NF4()", "Uniform(bits=4, group_size=128)"]


def spec_of(name: str):
    import distq

    return eval(SPECS[name], {"distq": distq})  # noqa: S307 (our own table)


def make_tree(layers: int = 4, d: int = 1024, ffn: int = 4096, seed: int = 0):
    """The 50M-parameter tree: per layer query/key/value/out (d x d), ffn_in (d x ffn),
    ffn_out (ffn x d) Flax kernels, Gaussian of std 0.02 (NumPy, then JAX arrays)."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    tree = {}
    for i in range(layers):
        layer = {n: {"kernel": jnp.asarray(rng.standard_normal((d, d), np.float32) * 0.02)}
                 for n in ("query", "key", "value", "out")}
        layer["ffn_in"] = {"kernel": jnp.asarray(rng.standard_normal((d, ffn), np.float32) * 0.02)}
        layer["ffn_out"] = {"kernel": jnp.asarray(
            rng.standard_normal((ffn, d), np.float32) * 0.02)}
        tree[f"layer{i}"] = layer
    return tree


def apply_fn(params, x):
    """A synthetic forward pass through the tree's kernels (for calibration)."""
    import jax
    import jax.numpy as jnp

    for name in sorted(params):
        p = params[name]
        q, k, v = (x @ p[n]["kernel"] for n in ("query", "key", "value"))
        att = jax.nn.softmax(q @ k.T / jnp.sqrt(jnp.float32(q.shape[-1])), axis=-1)
        x = x + (att @ v) @ p["out"]["kernel"]
        x = x + jax.nn.gelu(x @ p["ffn_in"]["kernel"]) @ p["ffn_out"]["kernel"]
        x = x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    return x


def _quantize(tree, spec, calibration=None):
    import jax
    import distq

    q, report = distq.quantize_tree(tree, spec, calibration=calibration)
    jax.block_until_ready(q)
    errs = [r.rel_error for r in report.leaves if r.rel_error is not None]
    return sum(errs) / len(errs), report.bits_per_weight()


def child_first(spec_name: str, calibrated: bool) -> dict:
    """Runs in a fresh process: the first call of one spec (compilation included)."""
    import jax

    tree = make_tree()
    jax.block_until_ready(tree)
    spec = spec_of(spec_name)
    cal = None
    if calibrated:
        x = jax.random.normal(jax.random.key(1), (256, 1024))
        cal = (apply_fn, (x,))
    t = time.perf_counter()
    err, bpw = _quantize(tree, spec, cal)
    first = time.perf_counter() - t
    out = {"first": first, "err": err, "bpw": bpw}
    if calibrated:  # and once compiled (GPTQ's programs depend only on the shapes)
        t = time.perf_counter()
        _quantize(tree, spec, cal)
        out["second"] = time.perf_counter() - t
    return out


def run_child(args: list[str], env: dict | None = None, timeout: int = 3600) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args],
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stats(ts: list[float]) -> tuple[float, float]:
    s = sorted(ts)
    return s[0], s[len(s) // 2]


def speed_section(names: list[str], rounds: int, emit, first_runs: int = 2) -> None:
    import jax

    # first calls, each in its own process; several times (interleaved) for an idea of the noise
    first = {n: [] for n in names}
    quality = {}
    for _ in range(first_runs):
        for n in names:
            r = run_child(["--child-first", n])
            first[n].append(r["first"])
            quality[n] = (r["err"], r["bpw"])
    tree = make_tree()
    jax.block_until_ready(tree)
    specs = {n: spec_of(n) for n in names}
    for n in names:  # warm up (compile)
        _quantize(tree, specs[n])
    comp = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            t = time.perf_counter()
            _quantize(tree, specs[n])
            comp[n].append(time.perf_counter() - t)
    ref = "NF4()"
    emit("### 50M-parameter tree (4 layers, d=1024, FFN 4096), `quantize_tree(tree, spec)`\n")
    emit(f"First call: a fresh process per spec, {first_runs} runs each, interleaved. Compiled: "
         f"{rounds} rounds, all specs interleaved in one process. Ratios to NF4 best/best "
         "and median/median. Report errors computed for every leaf (included in the times).\n")
    emit("| spec | first call s (best, median) | x NF4 | compiled s (best, median) | x NF4 "
         "| M params/s | mean rel. error | bits/weight |")
    emit("|---|---:|---:|---:|---:|---:|---:|---:|")
    fb_ref, fm_ref = stats(first[ref]) if ref in first else (None, None)
    cb_ref, cm_ref = stats(comp[ref]) if ref in comp else (None, None)
    for n in names:
        fb, fm = stats(first[n])
        cb, cm = stats(comp[n])
        fr = f"{fb / fb_ref:.2f} / {fm / fm_ref:.2f}" if fb_ref else "-"
        cr = f"{cb / cb_ref:.2f} / {cm / cm_ref:.2f}" if cb_ref else "-"
        err, bpw = quality[n]
        emit(f"| `{n}` | {fb:.1f}, {fm:.1f} | {fr} | {cb:.2f}, {cm:.2f} | {cr} | "
             f"{50.33 / cb:.0f} | {err:.5f} | {bpw:.4f} |")
    emit("")


def tensor_section(emit) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import distq

    x = jnp.asarray(np.random.default_rng(0).standard_normal((1024, 4096), np.float32) * 0.02)
    cases = {"Scalar(bits=4), per tensor": distq.Scalar(bits=4),
             "Scalar(bits=4, dist='gaussian', beta=1.0)": distq.Scalar(bits=4, dist="gaussian",
                                                                       beta=1.0),
             "NF4()": distq.NF4(), "Uniform(bits=4, group_size=128)": distq.Uniform(
                 bits=4, group_size=128)}
    for s in cases.values():
        jax.block_until_ready(distq.quantize(x, s))
    ts = {n: [] for n in cases}
    for _ in range(7):
        for n, s in cases.items():
            t = time.perf_counter()
            jax.block_until_ready(distq.quantize(x, s))
            ts[n].append(time.perf_counter() - t)
    emit("### One 1024x4096 tensor, `distq.quantize` (plain array: per tensor), compiled\n")
    emit("| spec | best s | median s |")
    emit("|---|---:|---:|")
    for n in cases:
        b, m = stats(ts[n])
        emit(f"| `{n}` | {b:.4f} | {m:.4f} |")
    emit("")
    # a new shape: first call minus the compiled time, fresh shapes each time
    emit("New shape (first call minus compiled, weight role as in `quantize_tree`):\n")
    emit("| spec | shape | first s | compiled s | compilation s |")
    emit("|---|---|---:|---:|---:|")
    for i, (n, s) in enumerate({"Scalar(bits=4)": distq.Scalar(bits=4), "NF4()": distq.NF4(),
                                "Uniform(bits=4, group_size=128)": distq.Uniform(
                                    bits=4, group_size=128)}.items()):
        shape = (1024 + 128 * (i + 1), 3072)
        w = {"w": {"kernel": jnp.asarray(np.random.default_rng(i).standard_normal(
            shape, np.float32) * 0.02)}}
        t = time.perf_counter()
        jax.block_until_ready(distq.quantize_tree(w, s)[0])
        first = time.perf_counter() - t
        t = time.perf_counter()
        jax.block_until_ready(distq.quantize_tree(w, s)[0])
        again = time.perf_counter() - t
        emit(f"| `{n}` | {shape[0]}x{shape[1]} | {first:.2f} | {again:.3f} | "
             f"{first - again:.2f} |")
    emit("")


def child_memory() -> dict:
    """Runs in a fresh process with 8 host devices."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    import distq

    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, P("x", None))
    w = jax.device_put(jax.random.normal(jax.random.key(0), (8192, 1024)) * 0.02, rows)
    params = {"layer": {"kernel": w}}
    shard = 8192 * 1024 * 4 // 8
    out = {"shard_bytes": shard}
    for name in ("Scalar(bits=4)", "NF4()", "Uniform(bits=4, group_size=128)"):
        spec = spec_of(name)

        def f(p, spec=spec):
            return distq.quantize_tree(p, spec)[0]

        m = jax.jit(f).lower(params).compile().memory_analysis()
        out[name] = {"temp": m.temp_size_in_bytes, "out": m.output_size_in_bytes}
    return out


def memory_section(emit) -> None:
    r = run_child(["--child-memory"],
                  env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    shard = r.pop("shard_bytes")
    emit("### Per-device memory, `jax.jit(quantize_tree)` on a row-sharded 8192x1024 weight, "
         "8 host devices\n")
    emit(f"Each device holds a {shard / 2**20:.0f} MiB shard. "
         "`compile().memory_analysis()` per device:\n")
    emit("| spec | temporaries MiB | x shard | outputs MiB |")
    emit("|---|---:|---:|---:|")
    for name, m in r.items():
        emit(f"| `{name}` | {m['temp'] / 2**20:.2f} | {m['temp'] / shard:.2f} | "
             f"{m['out'] / 2**20:.2f} |")
    emit("")


def calibrated_section(emit) -> None:
    r = run_child(["--child-first", "Scalar(bits=4)", "--calibrated"])
    emit("### Calibrated `quantize_tree` (synthetic `apply_fn`, 256 tokens), 50M tree\n")
    emit("| spec | first call s | second call s | mean rel. error (weights) | bits/weight |")
    emit("|---|---:|---:|---:|---:|")
    emit(f"| `Scalar(bits=4)` calibrated | {r['first']:.1f} | {r['second']:.1f} | "
         f"{r['err']:.5f} | {r['bpw']:.4f} |")
    emit("")


def other_script(name: str, emit) -> None:
    path = os.path.join(HERE, name)
    if not os.path.exists(path):
        emit(f"({name}: not present, skipped)\n")
        return
    proc = subprocess.run([sys.executable, path], capture_output=True, text=True,
                          timeout=3600)
    emit(f"### {name}\n")
    emit(proc.stdout.strip() if proc.returncode == 0 else
         f"failed (exit {proc.returncode}):\n```\n{proc.stderr[-2000:]}\n```")
    emit("")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 specs, 3 compiled rounds")
    ap.add_argument("--no-speed", action="store_true", help="skip the tree speed table")
    ap.add_argument("--first-runs", type=int, default=2,
                    help="fresh processes per spec for the first call (default 2)")
    ap.add_argument("--tensor", action="store_true", help="one-tensor timings, new shapes")
    ap.add_argument("--calibrated", action="store_true", help="calibrated quantize_tree")
    ap.add_argument("--memory", action="store_true", help="per-device memory, 8 devices")
    ap.add_argument("--streaming", action="store_true", help="run bench_streaming.py")
    ap.add_argument("--multiprocess", action="store_true", help="run bench_multiprocess.py")
    ap.add_argument("--child-first", help=argparse.SUPPRESS)
    ap.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_first:
        print(json.dumps(child_first(args.child_first, args.calibrated)))
        return
    if args.child_memory:
        print(json.dumps(child_memory()))
        return

    lines: list[str] = []

    def emit(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    import jax

    emit(f"# bench_scale ({jax.default_backend()}, {os.cpu_count()} CPUs, load average "
         f"{os.getloadavg()[0]:.1f} at start)\n")
    if not args.no_speed:
        speed_section(QUICK if args.quick else list(SPECS), 3 if args.quick else 5, emit,
                      args.first_runs)
    if args.tensor:
        tensor_section(emit)
    if args.calibrated:
        calibrated_section(emit)
    if args.memory:
        memory_section(emit)
    if args.streaming:
        other_script("bench_streaming.py", emit)
    if args.multiprocess:
        other_script("bench_multiprocess.py", emit)
    emit(f"(load average {os.getloadavg()[0]:.1f} at the end)")
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "bench_scale.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
