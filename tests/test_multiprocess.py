"""distq.save / distq.load across processes: the orbax layout (distq.multihost).

The first test runs two local JAX processes (tests/_mp_worker.py: ``jax.distributed`` on
127.0.0.1, gloo CPU collectives, 4 host devices each) that quantise row-sharded weights under
``jit`` and save them, each process writing its own shards; the checkpoint then loads here, in
one process, bit-identical. The others write the same layout from one process
(``layout="orbax"``) to check its guarantees quickly.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distq
from distq import multihost
from distq.checkpoint import CheckpointError

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_mp_worker.py")
TIMEOUT_S = 240  # both processes together; they take ~20 s on 2 idle cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pair(out: str) -> dict:
    """Runs the two worker processes (one retry if the port was taken meanwhile)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    for attempt in range(2):
        port, procs, logs = _free_port(), [], []
        for pid in range(2):
            log = open(os.path.join(out, f"worker{pid}.log"), "w+")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, WORKER, str(pid), str(port), out],
                                          stdout=log, stderr=subprocess.STDOUT, env=env))
        deadline = time.monotonic() + TIMEOUT_S
        try:
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        texts = []
        for log in logs:
            log.seek(0)
            texts.append(log.read())
            log.close()
        if all(p.returncode == 0 for p in procs):
            with open(os.path.join(out, "result.json")) as f:
                return json.load(f)
        if attempt == 0 and any("address already in use" in t.lower() for t in texts):
            shutil.rmtree(os.path.join(out, "ckpt"), ignore_errors=True)
            continue
        pytest.fail("worker processes failed (return codes "
                    f"{[p.returncode for p in procs]}):\n"
                    + "\n".join(f"--- worker {i}\n{t[-3000:]}" for i, t in enumerate(texts)))
    raise AssertionError("unreachable")


def _bits(x) -> np.ndarray:
    """An array's bytes, to compare floats bit for bit."""
    a = np.ascontiguousarray(np.asarray(x))
    return a.reshape(-1).view(np.uint8)


def test_two_processes_save_their_shards_and_one_process_loads_them(tmp_path):
    sys.path.insert(0, HERE)
    try:
        import _mp_worker as worker
    finally:
        sys.path.remove(HERE)
    r = _run_pair(str(tmp_path))
    assert (r["processes"], r["devices"], r["local_devices"]) == (2, 8, 4)
    assert r["saved_not_addressable"]  # no process held the quantised weights whole
    # loaded back in the two processes: sharded as asked, every decoded value bit-identical
    assert r["reloaded_equal"] and r["other_shardings_equal"]
    assert r["reloaded_sharded"] and r["replicated_is_replicated"]
    assert r["key_equal"] and r["step"] == 7
    assert r["user"] == {"run": "second"}  # the second save replaced the first
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "decoded.npz", "result.json",
                                            "worker0.log", "worker1.log"]  # nothing left over
    path = str(tmp_path / "ckpt")
    assert r["bytes"] == multihost.dir_bytes(path) == distq.checkpoint.info(path)["file_bytes"]

    # here, in one process, with no model: local arrays, every stored array bit-identical
    back = distq.load(path)
    assert jax.process_count() == 1
    run = np.load(tmp_path / "decoded.npz")
    params = back["params"]
    for name, leaf in params.items():
        if distq.is_quantized(leaf):
            for f in leaf.array_fields:
                if getattr(leaf, f) is not None:
                    assert getattr(leaf, f).sharding.is_fully_addressable
                    np.testing.assert_array_equal(_bits(getattr(leaf, f)),
                                                  _bits(run[f"{name}:{f}"]), err_msg=name)
    assert int(params["step"]) == 7
    # ... and decoded bit-identical (decoding compiled alike: jit here as there; eager decoding
    # may round `loc + scale * level` once, not twice, where XLA fuses it into one FMA)
    decode = jax.jit(distq.dequantize_tree)
    decoded = decode(params)
    for name in ("w", "emb", "s", "c", "b"):
        np.testing.assert_array_equal(_bits(decoded[name]), _bits(run[name]), err_msg=name)

    # ... and to a reference quantised here, in one process, from the same global weights
    ref, _ = distq.quantize_tree(worker.make_params(), worker.rules(), warn_unused=False)
    ref_decoded = decode(ref)
    for name in ("w", "emb", "c", "b"):
        np.testing.assert_array_equal(_bits(decoded[name]), _bits(ref_decoded[name]),
                                      err_msg=name)
    # Scalar: the same codes; its per-row scale is a statistic settled to 12 bits, which a
    # float sum in another order can move by one 12-bit step (distq/core/scalar.py, reported)
    np.testing.assert_array_equal(np.asarray(params["s"].codes), np.asarray(ref["s"].codes))
    np.testing.assert_allclose(np.asarray(params["s"].scale), np.asarray(ref["s"].scale),
                               rtol=2.0 ** -11)


def _tree():
    """Leaves of each kind built from random arrays (no quantiser to compile), and a report."""
    rng = np.random.default_rng(0)
    f32 = np.float32
    q = distq.QArray.from_arrays(
        {"codes": rng.integers(0, 2 ** 32, 256, dtype=np.uint32),  # 64x32 4-bit codes
         "codebook": np.sort(rng.standard_normal(16)).astype(f32),
         "scale": rng.uniform(0.5, 2, 64).astype(f32), "loc": rng.standard_normal(64).astype(f32)},
        {"shape": [64, 32], "dtype": "float32", "bits": 4, "n": 16, "method": "distributional",
         "layout": {"kind": "channel", "axes": [0], "group_size": None}})
    pq = distq.PQArray.from_arrays(
        {"codes": rng.integers(0, 2 ** 32, 64, dtype=np.uint32),  # 128 rows, 4 sub-codes
         "codebooks": rng.standard_normal((4, 16, 4)).astype(f32)},
        {"shape": [128, 16], "dtype": "float32", "m": 4, "bits": 4})
    h = distq.quantize(jnp.asarray(rng.standard_normal((16, 8)), jnp.bfloat16),
                       distq.Cast("float16"))
    tree = {"params": {"w": q, "e": pq, "h": h, "b": jnp.arange(8, dtype=jnp.int32)},
            "key": jax.random.key(5), "n": np.float16(1.5), "misc": [None, 3, "text", (2.5, True)]}
    report = distq.tree.TreeReport(tuple(
        distq.tree.LeafReport(name, None, tuple(x.shape), "float32", 4 * x.size, x.nbytes, None)
        for name, x in tree["params"].items()))
    return tree, report


def _same(a, b) -> None:
    la, ta = jax.tree_util.tree_flatten(a, is_leaf=distq.is_quantized)
    lb, tb = jax.tree_util.tree_flatten(b, is_leaf=distq.is_quantized)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        if distq.is_quantized(x):
            assert type(x) is type(y) and x.metadata() == y.metadata()
            x, y = x.dequantize(), y.dequantize()
        elif isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        if isinstance(x, (jax.Array, np.ndarray, np.generic)):
            assert np.asarray(x).dtype == np.asarray(y).dtype
            np.testing.assert_array_equal(_bits(x), _bits(y))
        else:
            assert x == y and type(x) is type(y)


def test_orbax_layout_from_one_process_round_trips(tmp_path):
    tree, report = _tree()
    path = str(tmp_path / "ckpt")
    size = distq.save(path, tree, report=report, metadata={"m": "1"}, layout="orbax")
    assert multihost.is_checkpoint(path) and size == multihost.dir_bytes(path) > 0
    back = distq.load(path)
    _same(back, tree)
    assert isinstance(back["n"], np.float16) and back["misc"] == [None, 3, "text", (2.5, True)]
    as_np = distq.load(path, as_numpy=True)
    assert isinstance(as_np["params"]["b"], np.ndarray)
    _same(as_np, tree)
    info = distq.checkpoint.info(path)
    assert info["user"] == {"m": "1"} and info["file_bytes"] == size
    assert [r["path"] for r in info["leaves"]] == [r.path for r in report.leaves]
    # the index is a one-file index: the same tensors, dtypes and shapes as distq.save's file
    one = str(tmp_path / "one.distq")
    distq.save(one, tree, report=report, metadata={"m": "1"})
    ione = distq.checkpoint.info(one)
    assert {k: (e["dtype"], e["shape"]) for k, e in info["tensors"].items()} == \
        {k: (e["dtype"], e["shape"]) for k, e in ione["tensors"].items()}
    assert info["tree"] == ione["tree"]

    # replacing it: the new checkpoint, nothing left beside it
    distq.save(path, {"x": jnp.ones(3)}, metadata={"m": "2"}, layout="orbax")
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "one.distq"]
    assert distq.checkpoint.info(path)["user"] == {"m": "2"}
    np.testing.assert_array_equal(np.asarray(distq.load(path)["x"]), np.ones(3, np.float32))


def test_sharding_rules_place_arrays_as_asked(tmp_path):
    tree, _ = _tree()
    path = str(tmp_path / "ckpt")
    distq.save(path, tree, layout="orbax")
    mesh = jax.make_mesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    back = distq.load(path, sharding=mesh)
    _same(back, tree)
    codes = back["params"]["w"].codes
    assert isinstance(codes.sharding, jax.sharding.NamedSharding)
    assert codes.sharding.spec == jax.sharding.PartitionSpec(("x",))
    seen = []

    def rule(name, shape, dtype):
        seen.append((name, shape, dtype))
        return None  # local NumPy, read whole

    _same(distq.load(path, sharding=rule), tree)
    assert ("params/w:codes", tuple(tree["params"]["w"].codes.shape), np.dtype(np.uint32)) \
        in seen
    with pytest.raises(TypeError, match="sharding must be"):
        distq.load(path, sharding=3)
    with pytest.raises(ValueError, match="as_numpy"):
        distq.load(path, sharding=mesh, as_numpy=True)
    one = str(tmp_path / "one.distq")
    distq.save(one, tree)
    with pytest.raises(ValueError, match="single-file"):
        distq.load(one, sharding=mesh)


def test_save_never_replaces_a_file_or_a_foreign_directory(tmp_path):
    tree = {"x": jnp.ones(4)}
    f = tmp_path / "notes.txt"
    f.write_bytes(b"keep me")
    d = tmp_path / "photos"
    d.mkdir()
    (d / "a.jpg").write_bytes(b"jpeg")
    for target in (f, d):
        with pytest.raises(ValueError, match="multi-process checkpoint is a directory"):
            distq.save(str(target), tree, layout="orbax")
    assert f.read_bytes() == b"keep me" and os.listdir(d) == ["a.jpg"]
    with pytest.raises(ValueError, match="does not exist"):
        distq.save(str(tmp_path / "missing" / "ckpt"), tree, layout="orbax")
    with pytest.raises(ValueError, match="trailing separator"):
        distq.save(str(tmp_path / "ckpt") + "/", tree, layout="orbax")
    with pytest.raises(ValueError, match="layout must be"):
        distq.save(str(tmp_path / "ckpt"), tree, layout="zip")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "photos"]


# orbax leaves callbacks of the reads it abandoned on a failure to an event loop it closed;
# Python reports them as unraisable exceptions (noise, not a failure)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_directories_raise_checkpoint_errors(tmp_path):
    tree, _ = _tree()
    src = str(tmp_path / "src")
    distq.save(src, tree, layout="orbax")

    def copy(name):
        dst = str(tmp_path / name)
        shutil.copytree(src, dst)
        return dst, os.path.join(dst, multihost.HEADER_ITEM, "metadata")

    p, h = copy("edited")  # the description edited, its digest not
    text = open(h).read()
    assert text.count('\\"py\\":\\"int\\"') == 1
    with open(h, "w") as fh:
        fh.write(text.replace('\\"py\\":\\"int\\"', '\\"py\\": \\"int\\"'))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        distq.load(p)

    p, h = copy("not_json")
    with open(h, "w") as fh:
        fh.write("[1, 2")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        distq.load(p)

    p, _ = copy("no_arrays")
    shutil.rmtree(os.path.join(p, multihost.ARRAYS_ITEM))
    assert distq.checkpoint.info(p)["tree"]  # the description alone is still readable
    with pytest.raises(CheckpointError, match="orbax cannot"):
        distq.load(p)

    p, _ = copy("flipped")  # one byte of the array data
    data = os.path.join(p, multihost.ARRAYS_ITEM, "d")
    f = os.path.join(data, max(os.listdir(data),
                               key=lambda n: os.path.getsize(os.path.join(data, n))))
    b = bytearray(open(f, "rb").read())
    b[len(b) // 2] ^= 0x10
    open(f, "wb").write(bytes(b))
    with pytest.raises(CheckpointError, match="orbax cannot"):  # OCDBT: CRC-32C on each node
        distq.load(p)
    time.sleep(0.5)  # let orbax's abandoned reads report here, under this test's filter
    gc.collect()


def test_cli_info_describes_an_orbax_checkpoint(tmp_path, capsys):
    from distq import cli  # noqa: PLC0415

    x = np.random.default_rng(3).standard_normal((64, 32)).astype(np.float32)
    tree, _ = distq.quantize_tree({"w": x}, [(".*", distq.Uniform(bits=4))])
    path = tmp_path / "ckpt"
    distq.save(path, tree, layout="orbax")
    assert cli.main(["info", "--json", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    (row,) = out["leaves"]
    assert row["path"] == "w" and row["shape"] == [64, 32]
    assert row["bytes_after"] == tree["w"].nbytes
    # a folder that is not a checkpoint is still refused clearly
    (tmp_path / "empty").mkdir()
    assert cli.main(["info", str(tmp_path / "empty")]) != 0
    assert "is a directory" in capsys.readouterr().err
