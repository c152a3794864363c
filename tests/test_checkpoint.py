"""Checkpoints: exact round trips, atomic writes, every corruption rejected."""

import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import distq
from distq.checkpoint import CheckpointError


def _qtree():
    k = jax.random.split(jax.random.key(0), 4)
    params = {
        "embed": jax.random.normal(k[0], (300, 16)),
        "layers": [
            {"kernel": jax.random.normal(k[1], (16, 32)), "bias": jnp.zeros(32)},
            {"kernel": jax.random.normal(k[2], (32, 8)), "bias": jnp.ones(8, jnp.bfloat16)},
        ],
        "norm": (jnp.ones(8), None),
        "ids": jnp.arange(5, dtype=jnp.int32),
        "mask": jnp.array([True, False]),
        "count": 7,
        "lr": 0.5,
    }
    rules = [(r"embed", distq.PQ(m=4, bits=5)), (r"layers/0/kernel", distq.Scalar(bits=3, axis=-1, dist="gaussian")),
             (r"layers/1/kernel", distq.Uniform(bits=4, symmetric=False, group_size=8)),
             (r"layers/0/bias", distq.Cast("bfloat16")), (r"norm/0", distq.NF4(group_size=8))]
    return distq.quantize_tree(params, rules)


def _assert_same(a, b):
    la, ta = jax.tree_util.tree_flatten(a, is_leaf=distq.is_quantized)
    lb, tb = jax.tree_util.tree_flatten(b, is_leaf=distq.is_quantized)
    assert ta == tb
    for x, y in zip(la, lb):
        assert type(x) is type(y)
        if distq.is_quantized(x):
            for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
                assert u.dtype == v.dtype
                np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
            np.testing.assert_array_equal(np.asarray(x.dequantize()), np.asarray(y.dequantize()))
            assert x.metadata() == y.metadata()
        elif hasattr(x, "dtype"):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            assert x == y and type(x) is type(y)


def test_round_trip_exact(tmp_path):
    q, rep = _qtree()
    f = tmp_path / "m.distq"
    size = distq.save(f, q, report=rep, metadata={"model": "toy"})
    assert size == os.path.getsize(f)
    _assert_same(q, distq.load(f))
    inf = distq.checkpoint.info(f)
    assert inf["user"] == {"model": "toy"}
    assert {r["path"] for r in inf["leaves"]} >= {"embed", "layers/0/kernel"}
    specs = {r["path"]: r["spec"] for r in inf["leaves"]}
    assert specs["embed"] == "pq:4:5" and specs["layers/0/kernel"].startswith("scalar:3")
    # the file is readable as plain safetensors too, and the stored bytes are the packed ones
    raw = distq.checkpoint.read_safetensors(f)
    assert raw["layers/0/kernel:codes"].dtype == np.uint32
    total = sum(a.nbytes for a in raw.values())
    assert total == distq.tree_nbytes(q) - 16  # the two Python scalars live in the header


def test_round_trip_agrees_with_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    q, _ = _qtree()
    f = tmp_path / "m.safetensors"
    distq.save(f, q)
    theirs = st.load_file(str(f))
    ours = distq.checkpoint.read_safetensors(f)
    assert theirs.keys() == ours.keys()
    for k in ours:
        np.testing.assert_array_equal(theirs[k], ours[k])
    g = tmp_path / "plain.safetensors"
    st.save_file({"a.b": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(g))
    np.testing.assert_array_equal(distq.checkpoint.read_safetensors(g)["a.b"],
                                  np.arange(6).reshape(2, 3))
    with pytest.raises(CheckpointError, match="not a distq checkpoint"):
        distq.load(g)


def test_nnx_state_and_optax_state(tmp_path):
    import optax

    m = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
    state = nnx.state(m, nnx.Param)
    q, _ = distq.quantize_tree(state, [(r".*kernel", distq.Scalar(bits=4))])
    distq.save(tmp_path / "s", q)
    back = distq.load(tmp_path / "s")
    assert set(back["layers"]) == {0, 1}
    x = jnp.ones((2, 8))
    ref = m(x)
    nnx.update(m, distq.dequantize_tree(q))
    y1 = m(x)
    nnx.replace_by_pure_dict(state, distq.dequantize_tree(back))
    nnx.update(m, state)
    np.testing.assert_array_equal(m(x), y1)
    assert float(jnp.abs(y1 - ref).max()) < 0.2
    opt_state = optax.adam(1e-3).init({"w": jnp.ones(3)})
    distq.save(tmp_path / "o", opt_state)
    back = distq.load(tmp_path / "o")
    assert back[0]["count"].dtype == jnp.int32


def _corruptions(blob: bytes):
    hlen = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + hlen])
    yield "empty", b""
    yield "short", blob[:5]
    for cut in (9, 8 + hlen // 2, 8 + hlen, len(blob) - 1, len(blob) // 2):
        yield f"truncated@{cut}", blob[:cut]
    yield "trailing", blob + b"\0\0\0\0"
    for pos in (8 + hlen + 3, len(blob) - 2, (8 + hlen + len(blob)) // 2):
        b = bytearray(blob)
        b[pos] ^= 0x10
        yield f"flip@{pos}", bytes(b)
    b = bytearray(blob)
    b[:8] = struct.pack("<Q", hlen + 8)
    yield "header-length", bytes(b)
    b = bytearray(blob)
    b[8 + 1] = ord("#")
    yield "header-json", bytes(b)
    # consistent-looking edits of the header: each must fail the digest or validation
    meta = header["__metadata__"]
    tree = meta["tree"]
    edits = {
        "bits": tree.replace('"bits":3', '"bits":2', 1),
        "shape": tree.replace('"shape":[16,32]', '"shape":[32,16]', 1),
    }
    for name, t in edits.items():
        assert t != tree
        h2 = dict(header, __metadata__=dict(meta, tree=t))
        yield f"edit-{name}", _rebuild(h2, blob[8 + hlen:])
    names = [k for k in header if k != "__metadata__"]
    a, b_ = next((x, y) for i, x in enumerate(names) for y in names[i + 1:]
                 if header[x]["dtype"] == header[y]["dtype"]
                 and header[x]["shape"] == header[y]["shape"])
    h3 = dict(header)
    h3[a], h3[b_] = header[b_], header[a]
    yield "swap-offsets", _rebuild(h3, blob[8 + hlen:])
    h4 = dict(header, __metadata__=dict(meta, sha256="0" * 64))
    yield "digest", _rebuild(h4, blob[8 + hlen:])
    h5 = dict(header, __metadata__=dict(meta, version="99"))
    yield "version", _rebuild(h5, blob[8 + hlen:])


def _rebuild(header: dict, data: bytes) -> bytes:
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + data


def test_every_corruption_is_rejected(tmp_path):
    q, _ = _qtree()
    q = dict(q)
    q["twin_a"] = jnp.arange(4.0)
    q["twin_b"] = jnp.arange(4.0) + 1
    f = tmp_path / "good.distq"
    distq.save(f, q)
    blob = f.read_bytes()
    seen = 0
    for name, bad in _corruptions(blob):
        g = tmp_path / f"bad-{name}"
        g.write_bytes(bad)
        with pytest.raises(CheckpointError):
            distq.load(g)
        seen += 1
    assert seen >= 15
    with pytest.raises(FileNotFoundError):
        distq.load(tmp_path / "missing")


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    f = tmp_path / "ckpt"
    distq.save(f, {"a": jnp.arange(3.0)})
    before = f.read_bytes()

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        distq.save(f, {"a": jnp.arange(1000.0)})
    monkeypatch.undo()
    assert f.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        distq.save(tmp_path, {"a": jnp.ones(2)})
    with pytest.raises(ValueError, match="does not exist"):
        distq.save(tmp_path / "no" / "f", {"a": jnp.ones(2)})
    with pytest.raises(TypeError, match="cannot store"):
        distq.save(tmp_path / "f", {"a": object()})
    with pytest.raises(TypeError, match="keys"):
        distq.save(tmp_path / "f", {(1, 2): jnp.ones(2)})
    with pytest.raises(TypeError, match="metadata"):
        distq.save(tmp_path / "f", {"a": jnp.ones(2)}, metadata={"a": 1})
    assert not (tmp_path / "f").exists()
