"""Peak memory and time of `distq quantize` on a large sharded checkpoint, streamed leaf by leaf.

Builds, in a temporary folder (about 3.4 GiB of disk, removed at the end):

* a ~3 GiB sharded safetensors checkpoint of 24 leaves of 128 MiB (float32 8192 x 4096) in 4
  shards, with its ``model.safetensors.index.json`` (what Hugging Face writes);
* the same with one such leaf (a single file), and a 60 MiB one-leaf file;

runs ``distq quantize`` on each as a subprocess (peak RSS from ``getrusage`` of a wrapper that
only waits for it, wall time), checks each output (it loads; every leaf is there with its
report's error in the 4-bit range; leaf 0 has the same codes in the sharded and one-leaf outputs,
and equals the library's ``distq.quantize`` of that array), and prints a table. With ``--main
DIR`` (a checkout of the code to compare with, e.g. ``git archive HEAD | tar -x -C DIR``) the
one-leaf files also run through that version, side by side.

The target (issue 16): peak RSS on the sharded checkpoint at most 512 MiB above the one-leaf
run's. Usage::

    python experiments/bench_streaming.py [--leaves 24] [--rule '.*=scalar:4'] [--main DIR]
        [--dir /tmp] [--entropy-coded]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

OUT = os.path.join(os.path.dirname(__file__), "out", "bench_streaming.md")
ROWS, COLS = 8192, 4096  # 128 MiB of float32
SMALL_ROWS = 60 * 2**20 // (4 * COLS)  # 60 MiB
_WRAPPER = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": p.returncode, "seconds": time.perf_counter() - t,
                  "peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "stderr": p.stderr[-2000:], "stdout": p.stdout[-2000:]}))
"""


def _write(path: str, leaves) -> None:
    """A safetensors file of ``leaves`` (``[(name, array generator)]``), written leaf by leaf."""
    header, offset = {}, 0
    for name, _ in leaves:
        n = ROWS * COLS * 4
        header[name] = {"dtype": "F32", "shape": [ROWS, COLS], "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, make in leaves:
            f.write(make().tobytes())


def build(folder: str, n_leaves: int, per_shard: int = 6) -> dict:
    base = np.random.default_rng(0).standard_normal((ROWS, COLS), dtype=np.float32)

    def leaf(i):
        return lambda: base if i == 0 else np.roll(base, 97 * i, axis=1)

    paths = {}
    sharded = os.path.join(folder, "sharded")
    os.makedirs(sharded)
    shards = [list(range(s, min(s + per_shard, n_leaves))) for s in range(0, n_leaves, per_shard)]
    wmap = {}
    for j, ids in enumerate(shards):
        name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        _write(os.path.join(sharded, name),
               [(f"model.layers.{i}.mlp.weight", leaf(i)) for i in ids])
        wmap.update({f"model.layers.{i}.mlp.weight": name for i in ids})
    with open(os.path.join(sharded, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": n_leaves * ROWS * COLS * 4}, "weight_map": wmap}, f)
    paths["sharded"] = sharded
    paths["one"] = os.path.join(folder, "one.safetensors")
    _write(paths["one"], [("model.layers.0.mlp.weight", leaf(0))])
    small = os.path.join(folder, "small.safetensors")  # 60 MiB, the baseline size
    rows = SMALL_ROWS
    header = {"model.layers.0.mlp.weight": {"dtype": "F32", "shape": [rows, COLS],
                                            "data_offsets": [0, rows * COLS * 4]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(small, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + base[:rows].tobytes())
    paths["small"] = small
    del base
    return paths


def run(src: str, out: str, rule: str, code_dir: str | None, entropy: bool) -> dict:
    cmd = [sys.executable, "-m", "distq.cli", "quantize", src, out, "-q", "--force",
           "--rule", rule] + (["--entropy-coded"] if entropy else [])
    env = dict(os.environ)
    if code_dir:
        env["PYTHONPATH"] = os.path.abspath(code_dir)
    p = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True,
                       env=env, cwd=os.path.abspath(code_dir) if code_dir else None)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    if r["rc"] != 0:
        raise SystemExit(f"distq quantize {src} failed:\n{r['stderr']}")
    r["out_bytes"] = os.path.getsize(out)
    return r


def check(out: str, n_leaves: int, rows: int) -> dict:
    """The output loads, holds every leaf, each with a 4-bit error; returns leaf 0."""
    import distq

    with distq.load(out, lazy=True) as ckpt:
        assert len(ckpt) == n_leaves, (len(ckpt), n_leaves)
        errs = [r["rel_error"] for r in ckpt.report]
        assert all(e is not None and 0.001 < e < 0.02 for e in errs), errs
        q0 = ckpt["model.layers.0.mlp.weight"]
        assert distq.is_quantized(q0) and q0.shape == (rows, COLS)
        spec = next(r["spec"] for r in ckpt.report if r["path"] == "model.layers.0.mlp.weight")
        return {"codes": np.asarray(q0.codes), "spec": spec, "max_err": max(errs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--leaves", type=int, default=24)
    ap.add_argument("--rule", default=".*=scalar:4")
    ap.add_argument("--main", default=None, help="a checkout of the version to compare with")
    ap.add_argument("--dir", default=None, help="where to build the files (default: $TMPDIR)")
    ap.add_argument("--entropy-coded", action="store_true")
    args = ap.parse_args()
    folder = tempfile.mkdtemp(prefix="distq-bench-streaming-", dir=args.dir)
    try:
        t = time.perf_counter()
        paths = build(folder, args.leaves)
        print(f"built {args.leaves} x 128 MiB (+ one-leaf files) in "
              f"{time.perf_counter() - t:.0f} s in {folder}", flush=True)
        rows = []
        cases = [("this", "small", 1), ("this", "one", 1), ("this", "sharded", args.leaves)]
        if args.main:
            cases = [("main", "small", 1), *cases[:1], ("main", "one", 1), *cases[1:]]
        leaf0 = {}
        for who, case, n in cases:
            out = os.path.join(folder, f"{who}-{case}.distq")
            r = run(paths[case], out, args.rule, args.main if who == "main" else None,
                    args.entropy_coded)
            if who == "this":
                leaf0[case] = check(out, n, SMALL_ROWS if case == "small" else ROWS)
            os.unlink(out)
            size = sum(os.path.getsize(os.path.join(paths[case], f))
                       for f in os.listdir(paths[case])) if os.path.isdir(paths[case]) \
                else os.path.getsize(paths[case])
            rows.append((who, case, n, size, r["peak_kib"] / 1024, r["seconds"], r["out_bytes"]))
            print(f"{who:5s} {case:8s} {n:3d} leaves  {size / 2**20:8.0f} MiB in  peak RSS "
                  f"{r['peak_kib'] / 1024:7.0f} MiB  {r['seconds']:7.1f} s  "
                  f"out {r['out_bytes'] / 2**20:7.1f} MiB", flush=True)
        np.testing.assert_array_equal(leaf0["one"]["codes"], leaf0["sharded"]["codes"])
        import distq

        with distq.checkpoint.SafetensorsFiles(paths["one"]) as st:
            x = np.array(st["model.layers.0.mlp.weight"])
        import jax

        q = distq.quantize(x, distq.parse_spec(leaf0["one"]["spec"]),
                           key=jax.random.fold_in(jax.random.key(0), 0))
        np.testing.assert_array_equal(np.asarray(q.codes), leaf0["one"]["codes"])
        print("outputs load; leaf 0: same codes in the one-leaf and sharded outputs and as "
              "distq.quantize; every leaf's error", f"<= {leaf0['sharded']['max_err']:.4f}")
        peak = {(w, c): p for w, c, _, _, p, _, _ in rows}
        extra = peak[("this", "sharded")] - peak[("this", "one")]
        print(f"\nsharded - one leaf: {extra:+.0f} MiB peak RSS (target: at most +512 MiB): "
              f"{'met' if extra <= 512 else 'NOT met'}")
        if args.main:
            for c in ("small", "one"):
                print(f"{c}: main {peak[('main', c)]:.0f} MiB -> this {peak[('this', c)]:.0f} MiB")
        table = ["| version | input | leaves | input MiB | peak RSS MiB | seconds | output MiB |",
                 "|---|---|---|---|---|---|---|"]
        for who, case, n, size, p, s, o in rows:
            table.append(f"| {who} | {case} | {n} | {size / 2**20:.0f} | {p:.0f} | {s:.1f} | "
                         f"{o / 2**20:.1f} |")
        table.append(f"\nrule {args.rule!r}{', entropy-coded' if args.entropy_coded else ''}; "
                     f"sharded - one leaf: {extra:+.0f} MiB; load average "
                     f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print("\n" + "\n".join(table))
        os.makedirs(os.path.dirname(OUT), exist_ok=True)
        with open(OUT.replace(".md", "_entropy.md") if args.entropy_coded else OUT, "w") as f:
            f.write("# experiments/bench_streaming.py\n\n" + "\n".join(table) + "\n")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
