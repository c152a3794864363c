"""One of the two processes of tests/test_multiprocess.py (a script, not collected by pytest).

Usage: ``python _mp_worker.py PROCESS_ID PORT OUT_DIR [ROWS COLS]``. Both processes join one
JAX run (``jax.distributed.initialize`` on 127.0.0.1, gloo CPU collectives, 4 host devices
each), build the same global weights, shard them by rows over the 8 devices, quantise them
under ``jit``, save them with ``distq.save`` (an orbax directory: each process writes its own
shards), save again over it, load the result back in the two processes and compare. Process 0
writes ``OUT_DIR/result.json``; the parent test then loads the checkpoint in one process.
"""

from __future__ import annotations

import os
import sys

DEVICES_PER_PROCESS = 4


def make_params(rows: int = 256, cols: int = 128):
    """The global parameters (NumPy, identical in every process and in the parent)."""
    import numpy as np

    rng = np.random.default_rng(0)
    f32 = np.float32
    return {
        "w": rng.standard_normal((rows, cols)).astype(f32),
        "emb": (rng.standard_normal((rows, 64)) * 0.1).astype(f32),
        "s": rng.standard_normal((rows, 32)).astype(f32),
        "c": rng.standard_normal((rows, 16)).astype(f32),
        "b": rng.standard_normal(cols).astype(f32),
        "step": np.int32(7),
    }


def rules():
    import distq

    return [("w", distq.Uniform(bits=4, axis=0)),
            ("emb", distq.NF4(group_size=64, group_axis=-1)),
            ("s", distq.Scalar(bits=3, axis=0, dist="gaussian", beta=1.0, refine=False)),
            ("c", distq.Cast("bfloat16")),
            (".*", None)]


def main(pid: int, port: int, out: str, rows: int, cols: int) -> None:
    import json
    import time

    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=60, heartbeat_timeout_seconds=30,
                               shutdown_timeout_seconds=30)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import distq

    t0 = time.perf_counter()
    mesh = jax.make_mesh((jax.device_count(),), ("x",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    by_rows = NamedSharding(mesh, P("x"))
    host = make_params(rows, cols)
    params = {k: (v if np.ndim(v) == 0 else
                  jax.make_array_from_callback(v.shape, by_rows, lambda idx, v=v: v[idx]))
              for k, v in host.items()}
    spec_rules = rules()

    def quant(p):
        return distq.quantize_tree(p, spec_rules, warn_unused=False)[0]

    qfn = jax.jit(quant)
    compiled = qfn.lower(params).compile()
    mem = compiled.memory_analysis()
    q = qfn(params)
    jax.block_until_ready(q)
    t_quant = time.perf_counter() - t0

    path = os.path.join(out, "ckpt")
    t1 = time.perf_counter()
    first = distq.save(path, {"params": q, "key": jax.random.key(3)},
                       metadata={"run": "first"})
    t_save = time.perf_counter() - t1
    size = distq.save(path, {"params": q, "key": jax.random.key(3)},
                      metadata={"run": "second"})  # replaces the first, atomically

    t2 = time.perf_counter()
    back = distq.load(path)  # in the two processes: global arrays split over the 8 devices
    t_load = time.perf_counter() - t2

    def bits(x):  # compare floats bit for bit
        return jax.lax.bitcast_convert_type(x, jnp.uint32) if x.dtype == jnp.float32 else x

    @jax.jit
    def same(a, b):  # every decoded value bit-identical (one scalar, no gather to a host)
        la = jax.tree_util.tree_leaves(distq.dequantize_tree(a))
        lb = jax.tree_util.tree_leaves(distq.dequantize_tree(b))
        return jnp.all(jnp.stack([jnp.array_equal(bits(x), bits(y)) for x, y in zip(la, lb)]))

    reloaded_equal = bool(jax.device_get(same(back["params"], q)))
    by_mesh = distq.load(path, sharding=mesh)
    replicated = distq.load(path, sharding=NamedSharding(mesh, P()))
    others_equal = all(bool(jax.device_get(same(t["params"], q))) for t in (by_mesh, replicated))

    # the decoded values, gathered (small here) for the parent to compare bit for bit
    from jax.experimental import multihost_utils

    def gather(a):
        return np.asarray(multihost_utils.process_allgather(a, tiled=True))

    deq = jax.jit(distq.dequantize_tree)(q)
    full = {k: gather(v) for k, v in deq.items() if np.ndim(v)}
    for k, leaf in q.items():  # and every stored array of the quantised leaves
        if distq.is_quantized(leaf):
            full.update({f"{k}:{f}": gather(getattr(leaf, f)) for f in leaf.array_fields
                         if getattr(leaf, f) is not None})
    if pid == 0:
        np.savez(os.path.join(out, "decoded.npz"), **full)
    w = back["params"]["w"]
    result = {
        "processes": jax.process_count(), "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "saved_not_addressable": not q["w"].codes.is_fully_addressable,
        "first_bytes": first, "bytes": size,
        "reloaded_equal": reloaded_equal, "other_shardings_equal": others_equal,
        "replicated_is_replicated": replicated["params"]["w"].codes.sharding.is_fully_replicated,
        "user": distq.checkpoint.info(path)["user"],
        "reloaded_sharded": (not w.codes.is_fully_addressable
                             and not w.codes.sharding.is_fully_replicated),
        "key_equal": bool(jax.device_get(jnp.array_equal(
            jax.random.key_data(back["key"]), jax.random.key_data(jax.random.key(3))))),
        "step": int(back["params"]["step"]),
        "memory": None if mem is None else {
            k: int(getattr(mem, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                              "temp_size_in_bytes", "generated_code_size_in_bytes")
            if hasattr(mem, k)},
        "seconds": {"quantize": t_quant, "save": t_save, "load": t_load},
    }
    if pid == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)
    print(json.dumps(result), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    a = sys.argv[1:]
    shape = (int(a[3]), int(a[4])) if len(a) >= 5 else (256, 128)
    main(int(a[0]), int(a[1]), a[2], *shape)
