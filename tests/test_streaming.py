"""Streaming checkpoints: `distq quantize` on a safetensors file, a sharded index or a folder,
leaf by leaf (distq.checkpoint.SafetensorsFiles, Writer), lazy loading, the incremental
checksum, damaged inputs, and outputs that are never half-written."""

from __future__ import annotations

import json
import os
import struct

import jax
import numpy as np
import pytest

import distq
from distq import cli
from distq.checkpoint import CheckpointError, LazyCheckpoint, SafetensorsFiles, Writer

from test_cli import write_safetensors  # a plain safetensors file, written by hand


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "model.layers.0.mlp.weight": rng.standard_normal((64, 32)).astype(np.float32),
        "model.layers.0.mlp.bias": rng.standard_normal(32).astype(np.float32),
        "model.layers.1.mlp.weight": rng.standard_normal((64, 32)).astype(np.float32),
        "model.embed.weight": rng.standard_normal((64, 16)).astype(np.float32),
        "model.norm.weight": (1 + 0.1 * rng.standard_normal(32)).astype(np.float16),
        "model.position_ids": np.arange(16, dtype=np.int64),
    }


RULES = [r"model\.embed\.weight=pq:4:2", r".*mlp\.weight=int:4,group=16", r".*norm.*=int:8",
         r".*=none"]
SHARDS = {"model-00001-of-00002.safetensors": ["model.layers.0.mlp.weight",
                                               "model.layers.0.mlp.bias", "model.embed.weight"],
          "model-00002-of-00002.safetensors": ["model.layers.1.mlp.weight", "model.norm.weight",
                                               "model.position_ids"]}


def _sharded(folder, tensors=None, index_name="model.safetensors.index.json"):
    tensors = _tensors() if tensors is None else tensors
    os.makedirs(folder, exist_ok=True)
    wmap = {}
    for shard, names in SHARDS.items():
        write_safetensors(os.path.join(folder, shard), {n: tensors[n] for n in names})
        wmap.update({n: shard for n in names})
    index = os.path.join(folder, index_name)
    with open(index, "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": wmap}, f)
    return index


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc, err):
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distq: error: "), err
    return lines[0]


def _rules():
    return [x for r in RULES for x in ("--rule", r)]


def _library(seed=0):
    """What the library gives for the same tensors, rules and seed (quantize_tree)."""
    t = _tensors()
    rules = [cli.parse_rule(r) for r in RULES]
    return distq.quantize_tree(t, distq.plan(t, rules), key=jax.random.key(seed),
                               warn_unused=False)


def _assert_same(got: dict, ref: dict):
    assert list(got) == list(ref)
    for name, r in ref.items():
        g = got[name]
        if distq.is_quantized(r):
            assert type(g) is type(r), name
            for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(r)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
        else:
            np.testing.assert_array_equal(np.asarray(g), np.asarray(r), err_msg=name)


# ------------------------------------------------------------------------ inputs
def test_index_and_folder_inputs_give_the_library_result(tmp_path, capsys):
    index = _sharded(tmp_path / "ckpt")
    ref, ref_report = _library(seed=5)
    outs = []
    for i, src in enumerate([index, str(tmp_path / "ckpt")]):
        out = str(tmp_path / f"out{i}.distq")
        rc, stdout, err = run(capsys, "quantize", src, out, "--seed", "5", *_rules())
        assert rc == 0, err
        assert "4 of 6 leaves quantised" in stdout and "wrote" in stdout
        _assert_same(distq.load(out, as_numpy=True), ref)
        outs.append(distq.checkpoint.info(out))
    assert outs[0]["user"].pop("source") == "model.safetensors.index.json"
    assert outs[1]["user"].pop("source") == "ckpt"
    assert {**outs[0], "file_bytes": 0} == {**outs[1], "file_bytes": 0}  # the same content
    info = distq.checkpoint.info(out)
    assert info["user"]["source_format"] == "safetensors (sharded)"
    rows = {r["path"]: r for r in info["leaves"]}
    for r in ref_report.leaves:
        assert rows[r.path]["bytes_after"] == r.bytes_after
        assert (rows[r.path]["rel_error"] is None) == (r.rel_error is None)
        if r.rel_error is not None:
            assert rows[r.path]["rel_error"] == pytest.approx(r.rel_error, rel=1e-4)


def test_single_file_and_a_folder_holding_it(tmp_path, capsys):
    t = _tensors()
    (tmp_path / "one").mkdir()
    f = tmp_path / "one" / "model.safetensors"
    write_safetensors(f, t)
    ref, _ = _library()
    for i, src in enumerate([f, tmp_path / "one"]):
        out = str(tmp_path / f"o{i}.distq")
        rc, _, err = run(capsys, "quantize", str(src), out, "-q", *_rules())
        assert rc == 0, err
        _assert_same(distq.load(out, as_numpy=True), ref)


def test_dry_run_on_a_folder_reads_no_data(tmp_path, capsys, monkeypatch):
    _sharded(tmp_path / "ckpt")
    monkeypatch.setattr(SafetensorsFiles, "__getitem__",
                        lambda self, name: pytest.fail("a dry run read tensor data"))
    rc, out, err = run(capsys, "quantize", str(tmp_path / "ckpt"), "-n", *_rules())
    assert rc == 0, err
    assert "pq:4:2" in out and "dry run" in out


def test_safetensors_files_reads_tensors_memory_mapped(tmp_path):
    index = _sharded(tmp_path / "ckpt")
    t = _tensors()
    with SafetensorsFiles(index) as st:
        assert sorted(st) == sorted(t) and len(st.files) == 2
        for name, a in t.items():
            assert st.shape_dtype(name) == (a.shape, a.dtype)
            got = st[name]
            np.testing.assert_array_equal(got, a)
            assert not got.flags.writeable  # a read-only view of the mapped file
        assert st.metadata == {"total_size": 0}
        shard = tmp_path / "ckpt" / "model-00002-of-00002.safetensors"
        with open(shard, "r+b") as f:  # truncated after it was opened: refused, no SIGBUS
            f.truncate(100)
        with pytest.raises(CheckpointError, match="changed while being read"):
            st["model.position_ids"]


@pytest.mark.parametrize("damage", ["truncated-shard", "missing-shard", "tensor-not-in-shard",
                                    "extra-tensor", "path-in-name", "not-an-index",
                                    "several-files", "bad-offsets"])
def test_damaged_inputs_are_refused_clearly(tmp_path, capsys, damage):
    folder = tmp_path / "ckpt"
    index = _sharded(folder)
    shard = folder / "model-00002-of-00002.safetensors"
    doc = json.loads(open(index).read())
    src, expect = index, None
    if damage == "truncated-shard":
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) - 5)
        expect = "model-00002-of-00002.safetensors' is truncated"
    elif damage == "missing-shard":
        os.unlink(shard)
        expect = "does not exist"
    elif damage == "tensor-not-in-shard":
        doc["weight_map"]["model.extra"] = "model-00002-of-00002.safetensors"
        expect = "does not hold"
    elif damage == "extra-tensor":
        del doc["weight_map"]["model.position_ids"]
        expect = "does not map"
    elif damage == "path-in-name":
        doc["weight_map"]["model.position_ids"] = "../model-00002-of-00002.safetensors"
        expect = "not a plain file name"
    elif damage == "not-an-index":
        doc = {"something": 1}
        expect = "weight_map"
    elif damage == "several-files":
        os.unlink(index)
        src, expect = str(folder), "2 .safetensors files"
    elif damage == "bad-offsets":
        raw = open(shard, "rb").read()
        hlen = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + hlen])
        header["model.norm.weight"]["data_offsets"][1] += 2
        new = json.dumps(header).encode()
        open(shard, "wb").write(struct.pack("<Q", len(new)) + new + raw[8 + hlen:])
        expect = "model.norm.weight"
    if damage not in ("several-files",):
        with open(index, "w") as f:
            json.dump(doc, f)
    out = tmp_path / "out.distq"
    rc, _, err = run(capsys, "quantize", str(src), str(out), *_rules())
    line = _one_line_error(rc, err)
    assert expect in line, line
    assert not out.exists()


def test_output_never_overwrites_an_input_shard(tmp_path, capsys):
    _sharded(tmp_path / "ckpt")
    shard = tmp_path / "ckpt" / "model-00001-of-00002.safetensors"
    before = shard.read_bytes()
    rc, _, err = run(capsys, "quantize", str(tmp_path / "ckpt"), str(shard), "--force",
                     *_rules())
    assert "refusing to overwrite the input" in _one_line_error(rc, err)
    assert shard.read_bytes() == before


# ------------------------------------------------------------------------ never half-written
@pytest.mark.parametrize("failure", [ValueError("bad leaf"), KeyboardInterrupt()])
def test_a_failure_midway_leaves_no_file_and_no_temporaries(tmp_path, capsys, monkeypatch,
                                                            failure):
    _sharded(tmp_path / "ckpt")
    out = tmp_path / "out" / "model.distq"
    out.parent.mkdir()
    out.write_bytes(b"the old checkpoint")
    calls = []
    real = distq.quantize

    def quantize(x, spec, key=None):
        calls.append(spec)
        if len(calls) == 2:  # after a leaf was already written to the spool
            raise failure
        return real(x, spec, key=key)

    monkeypatch.setattr(distq, "quantize", quantize)
    rc, _, err = run(capsys, "quantize", str(tmp_path / "ckpt"), str(out), "--force",
                     *_rules())
    assert rc == (130 if isinstance(failure, KeyboardInterrupt) else 1), err
    if isinstance(failure, ValueError):
        assert "leaf 'model.layers.0.mlp.weight'" in _one_line_error(rc, err)
    assert out.read_bytes() == b"the old checkpoint"
    assert os.listdir(out.parent) == ["model.distq"]  # no spool, no temporary file


def test_writer_aborts_on_an_exception_and_refuses_misuse(tmp_path):
    f = tmp_path / "w.distq"
    with pytest.raises(RuntimeError):
        with Writer(f) as w:
            w.add("a", np.ones(3))
            raise RuntimeError("stop")
    assert os.listdir(tmp_path) == []
    with Writer(f) as w:
        w.add("a", np.ones(3))
        with pytest.raises(ValueError, match="already added"):
            w.add("a", np.ones(3))
        with pytest.raises(TypeError, match="key"):
            w.add(1.5, np.ones(3))
    assert os.listdir(tmp_path) == ["w.distq"]  # leaving the block closed it
    with pytest.raises(ValueError, match="closed"):
        w.add("b", np.ones(3))
    with pytest.raises(ValueError, match="directory"):
        Writer(tmp_path)


def test_writer_without_kernel_copy_and_dropped_writers(tmp_path, monkeypatch):
    tree = {"a": np.arange(100_000.0), "b": np.ones(7, np.float16)}
    distq.save(tmp_path / "ref.distq", tree)
    monkeypatch.delattr(os, "copy_file_range", raising=False)  # the portable copy
    with Writer(tmp_path / "w.distq") as w:
        for k, v in tree.items():
            w.add(k, v)
    assert (tmp_path / "w.distq").read_bytes() == (tmp_path / "ref.distq").read_bytes()
    w = Writer(tmp_path / "dropped.distq")
    w.add("a", np.ones(3))
    del w  # neither closed nor aborted: its spool file goes with it
    assert sorted(os.listdir(tmp_path)) == ["ref.distq", "w.distq"]


# ------------------------------------------------------------------------ checksum
def test_streamed_digest_equals_the_whole_file_digest(tmp_path):
    """The writer hashes the data leaf by leaf as it writes; the digest equals the one computed
    over the whole file's data at once, and in chunks of any size, and save() writes the same
    bytes."""
    t = _tensors()
    rng = np.random.default_rng()
    q = distq.quantize(t["model.layers.0.mlp.weight"], distq.Uniform(bits=4))
    tree = {"q": q, **{k: v for k, v in t.items() if k != "model.layers.0.mlp.weight"}}
    f, g = tmp_path / "stream.distq", tmp_path / "save.distq"
    with Writer(f, metadata={"who": "test"}) as w:
        for k, v in tree.items():
            w.add(k, v)
    distq.save(g, tree, metadata={"who": "test"})
    blob = f.read_bytes()
    assert blob == g.read_bytes()
    hlen = struct.unpack("<Q", blob[:8])[0]
    header, data = json.loads(blob[8:8 + hlen]), blob[8 + hlen:]
    meta = header.pop("__metadata__")
    assert meta["version"] == "3"
    whole = distq.checkpoint._digest(header, meta, [data])
    cuts = np.sort(rng.integers(0, len(data), 5))
    parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    assert whole == meta["sha256"] == distq.checkpoint._digest(header, meta, parts)


def test_version_2_files_still_load(tmp_path):
    """Files written before the digest covered the data's own SHA-256 still verify."""
    f = tmp_path / "v3.distq"
    distq.save(f, {"a": np.arange(4.0)})
    blob = f.read_bytes()
    hlen = struct.unpack("<Q", blob[:8])[0]
    header, data = json.loads(blob[8:8 + hlen]), blob[8 + hlen:]
    meta = dict(header.pop("__metadata__"), version="2")
    meta.pop("sha256")
    meta["sha256"] = distq.checkpoint._digest(header, meta, [data], version="2")
    raw = json.dumps({**header, "__metadata__": meta}).encode()
    (tmp_path / "v2.distq").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    np.testing.assert_array_equal(distq.load(tmp_path / "v2.distq", as_numpy=True)["a"],
                                  np.arange(4.0))
    np.testing.assert_array_equal(
        distq.load(tmp_path / "v2.distq", lazy=True, as_numpy=True)["a"], np.arange(4.0))


# ------------------------------------------------------------------------ lazy loading
def test_lazy_load_hands_out_one_leaf_at_a_time(tmp_path):
    ref, _ = _library()
    tree = {"params": ref, "step": 7, "rng": jax.random.key(3), "items": [np.ones(2), None]}
    f = tmp_path / "m.distq"
    distq.save(f, tree)
    full = distq.load(f, as_numpy=True)
    with distq.load(f, lazy=True, as_numpy=True) as lazy:
        assert isinstance(lazy, LazyCheckpoint)
        assert list(lazy) == [f"params/{k}" for k in ref] + ["step", "rng", "items/0",
                                                             "items/1"]
        for path in lazy:
            got = lazy[path]
            want = full
            for part in path.split("/"):
                want = want[int(part)] if isinstance(want, list) else want[part]
            if path == "rng":
                np.testing.assert_array_equal(jax.random.key_data(got),
                                              jax.random.key_data(want))
            elif distq.is_quantized(want):
                _assert_same({path: got}, {path: want})
            elif want is None or isinstance(want, int):
                assert got == want
            else:
                np.testing.assert_array_equal(got, want)
                assert isinstance(got, np.ndarray)
        with pytest.raises(KeyError):
            lazy["nope"]
    with pytest.raises(ValueError, match="closed"):
        lazy["step"]
    with distq.load(f, lazy=True) as lazy:
        assert isinstance(lazy["items/0"], jax.Array)


def test_lazy_load_verifies_first_and_refuses_a_file_changed_later(tmp_path):
    f = tmp_path / "m.distq"
    distq.save(f, {"a": np.arange(1000.0), "b": np.ones(3)})
    blob = bytearray(f.read_bytes())
    blob[-10] ^= 1
    (tmp_path / "bad.distq").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="checksum"):
        distq.load(tmp_path / "bad.distq", lazy=True)
    lazy = distq.load(f, lazy=True, as_numpy=True)
    distq.save(f, {"a": np.zeros(5)})  # an atomic replacement: the open reader keeps its file
    np.testing.assert_array_equal(lazy["a"], np.arange(1000.0))
    lazy.close()
    lazy = distq.load(f, lazy=True)
    with open(f, "r+b") as fh:  # edited in place after verification
        fh.seek(-1, os.SEEK_END)
        fh.write(b"\x01")
        os.utime(f, ns=(0, 0))
    with pytest.raises(CheckpointError, match="changed after it was verified"):
        lazy["a"]
