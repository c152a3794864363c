"""Run in a fresh process with 8 host devices (see test_sharding.py); prints one JSON line."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import distq  # noqa: E402

COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce")


def main():
    out = {"devices": jax.device_count()}
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, P("x", None))
    k = jax.random.split(jax.random.key(0), 2)
    params = {"w": jax.device_put(jax.random.normal(k[0], (1024, 256)), rows),
              "v": jax.device_put(jax.random.normal(k[1], (512, 128)), rows)}
    cases = {
        "uniform_rows": distq.Uniform(bits=4, axis=0),
        "scalar_rows_fixed": distq.Scalar(bits=4, axis=0, dist="gaussian", beta=1.0,
                                          refine=False),
        "nf4_groups": distq.NF4(group_size=64, group_axis=-1),
        "scalar_default": distq.Scalar(bits=4),
    }
    for name, spec in cases.items():
        def quant(p, spec=spec):
            return distq.quantize_tree(p, [(".*", spec)])[0]

        qfn = jax.jit(quant)
        hlo = qfn.lower(params).compile().as_text()
        q = qfn(params)
        eager = quant(jax.device_get(params))
        deq = jax.jit(distq.dequantize_tree)
        dhlo = deq.lower(q).compile().as_text()
        d = deq(q)
        res = {
            "codes_equal": all(bool(np.array_equal(np.asarray(q[n].codes),
                                                   np.asarray(eager[n].codes))) for n in q),
            "deq_close": all(bool(np.allclose(np.asarray(d[n]),
                                              np.asarray(eager[n].dequantize()), rtol=2.0**-10,
                                              atol=1e-6))  # (a scale settled to 12 bits may
                             # round one step apart when its sum's order differs)
                             for n in q),
            "codes_sharded": all(not q[n].codes.sharding.is_fully_replicated for n in q),
            "scale_sharded": all(not q[n].scale.sharding.is_fully_replicated for n in q),
            "deq_sharding": all(d[n].sharding.is_equivalent_to(rows, 2) for n in q),
            "quant_collectives": sorted({c for c in COLLECTIVES if c in hlo}),
            "deq_collectives": sorted({c for c in COLLECTIVES if c in dhlo}),
        }
        out[name] = res
    # per-device memory of the default weight spec on the row-sharded 8192x1024 weight
    big = {"layer": {"kernel": jax.device_put(
        jax.random.normal(jax.random.key(2), (8192, 1024)) * 0.02, rows)}}
    mem = jax.jit(lambda p: distq.quantize_tree(p, distq.Scalar(bits=4))[0]).lower(
        big).compile().memory_analysis()
    out["memory"] = {"temp": int(mem.temp_size_in_bytes), "shard": 8192 * 1024 * 4 // 8}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
