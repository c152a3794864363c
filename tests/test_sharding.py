"""quantize_tree / dequantize_tree under jit on params sharded over 8 (host) devices.

jax fixes the device count when it is first imported, so the checks run in a fresh process
(tests/_sharded_run.py) with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def result():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_sharded_run.py")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_eight_devices(result):
    assert result["devices"] == 8


@pytest.mark.parametrize("case", ["uniform_rows", "scalar_rows_fixed", "nf4_groups"])
def test_per_channel_and_group_specs_never_gather(result, case):
    r = result[case]
    assert r["codes_equal"] and r["deq_close"]
    # codes and per-row/group scales stay sharded like the weight; nothing is ever gathered
    # (a Scalar codebook shared by all rows may all-reduce a few statistics), and decoding
    # needs no collective at all
    assert r["codes_sharded"] and r["scale_sharded"] and r["deq_sharding"]
    allowed = {"all-reduce"} if case.startswith("scalar") else set()
    assert set(r["quant_collectives"]) <= allowed and r["deq_collectives"] == []


def test_per_tensor_search_gathers_only_to_fit(result):
    r = result["scalar_default"]
    assert r["codes_equal"] and r["deq_close"]
    # one codebook for the whole tensor is fitted to a histogram of a sample (an all-reduce
    # of its integer counts: the same codebook and codes as on one device); the codes stay
    # sharded and decoding needs no communication
    assert r["codes_sharded"] and r["deq_sharding"] and r["deq_collectives"] == []


def test_default_spec_keeps_each_device_within_twice_its_shard(result):
    # the codebook is fitted to an all-reduced histogram of a sample and the outliers are
    # found by counting: no device holds a gathered tensor or a tensor-sized temporary
    # (before: 472 MiB for a 4 MiB shard)
    m = result["memory"]
    assert m["temp"] <= 2 * m["shard"], m
