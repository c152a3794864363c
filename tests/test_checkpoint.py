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


# ------------------------------------------------------------------------ leaf registry
def test_leaf_types_come_from_the_registry(tmp_path, monkeypatch):
    """Any leaf class registered in distq.core.spec is saved and rebuilt by its kind and
    array_fields: the checkpoint module lists no leaf types of its own."""
    import ast
    import dataclasses

    from distq.core import spec

    @dataclasses.dataclass(frozen=True)
    class Toy:
        kind = "toyarray"
        array_fields = ("a", "b", "c")
        a: np.ndarray
        b: np.ndarray | None
        c: np.ndarray
        label: str

        def metadata(self):
            return {"label": self.label}

        @classmethod
        def from_arrays(cls, arrays, metadata):
            return cls(np.asarray(arrays["a"]), arrays.get("b"), np.asarray(arrays["c"]),
                       metadata["label"])

    monkeypatch.setitem(spec._LEAVES, Toy.kind, Toy)
    toy = Toy(np.arange(3, dtype=np.int16), None, np.ones((2, 2), np.float32), "hi")
    distq.save(tmp_path / "t", {"toy": toy})
    back = distq.load(tmp_path / "t")["toy"]
    assert type(back) is Toy and back.label == "hi" and back.b is None
    np.testing.assert_array_equal(back.a, toy.a)
    np.testing.assert_array_equal(back.c, toy.c)
    tree = distq.checkpoint.info(tmp_path / "t")["tree"]
    assert tree["v"][0]["t"] == "toyarray" and set(tree["v"][0]["arrays"]) == {"a", "c"}
    monkeypatch.delitem(spec._LEAVES, Toy.kind)
    with pytest.raises(CheckpointError, match="toyarray"):
        distq.load(tmp_path / "t")
    # and the module imports neither the leaf classes nor distq.tree
    src = ast.parse(open(distq.checkpoint.__file__).read())
    imported = {a.name for n in ast.walk(src) if isinstance(n, ast.ImportFrom)
                for a in n.names} | {n.module or "" for n in ast.walk(src)
                                     if isinstance(n, ast.ImportFrom)}
    assert not imported & {"QArray", "PQArray", "CastArray", "tree", "TreeReport", "pq",
                           "qarray"}


def test_report_rows_are_duck_typed(tmp_path):
    from types import SimpleNamespace

    row = SimpleNamespace(path="w", spec=distq.Scalar(bits=4), shape=(4, 2), dtype="float32",
                          bytes_before=32, bytes_after=9, rel_error=np.float32(0.01), note="")
    distq.save(tmp_path / "r", {"w": jnp.ones(2)}, report=SimpleNamespace(leaves=[row]))
    (r,) = distq.checkpoint.info(tmp_path / "r")["leaves"]
    assert r["spec"].startswith("scalar:4") and r["shape"] == [4, 2]
    assert r["rel_error"] == pytest.approx(0.01)
    with pytest.raises(TypeError, match="report"):
        distq.save(tmp_path / "r2", {"w": jnp.ones(2)}, report="x")
    with pytest.raises(TypeError, match=r"report\.leaves\[0\]"):
        distq.save(tmp_path / "r2", {"w": jnp.ones(2)}, report=SimpleNamespace(leaves=[1]))
    assert not (tmp_path / "r2").exists()


# ------------------------------------------------------------------------ non-float leaves
class _Net(nnx.Module):
    def __init__(self, seed):
        rngs = nnx.Rngs(seed)
        self.lin = nnx.Linear(4, 4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.rngs = nnx.Rngs(seed + 10, noise=seed + 20)

    def __call__(self, x):
        return self.drop(self.lin(x)) + jax.random.normal(self.rngs.noise(), x.shape)


def test_keys_ints_bools_and_scalars_round_trip(tmp_path):
    k = jax.random.key(0)
    tree = {
        "key": k, "keys": jax.random.split(k, 3), "rbg": jax.random.key(1, impl="rbg"),
        "raw_key": jax.random.PRNGKey(2),
        "dropout": nnx.state(nnx.Dropout(0.1, rngs=nnx.Rngs(0))),
        "ints": [jnp.arange(3, dtype=jnp.int8), jnp.uint32(7), np.arange(4, dtype=np.uint64)],
        "bools": (jnp.array([True, False]), np.bool_(True), True),
        "np": [np.float32(1.5), np.int64(-3), np.uint8(255), np.float16(np.nan), np.bool_(False),
               np.int32(2**31 - 1)],
        "py": [3, -2**70, 2.5, float("inf"), "text", False, None],
    }
    f = tmp_path / "k"
    distq.save(f, tree)
    back = distq.load(f)
    for a, b in [(back["key"], k), (back["keys"], tree["keys"]), (back["rbg"], tree["rbg"]),
                 (back["dropout"]["rngs"]["key"],
                  nnx.to_pure_dict(tree["dropout"])["rngs"]["key"])]:
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
    np.testing.assert_array_equal(back["raw_key"], tree["raw_key"])
    assert back["dropout"]["rngs"]["count"].dtype == jnp.uint32
    assert back["ints"][1].shape == () and back["ints"][1].dtype == jnp.uint32
    assert back["ints"][2].dtype == (jnp.uint64 if jax.config.jax_enable_x64 else jnp.uint32)
    np.testing.assert_array_equal(distq.load(f, as_numpy=True)["ints"][2], tree["ints"][2])
    assert distq.load(f, as_numpy=True)["ints"][2].dtype == np.uint64
    assert back["bools"][0].dtype == jnp.bool_ and back["bools"][2] is True
    for a, b in zip(back["np"], tree["np"]):
        assert type(a) is type(b) and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert back["bools"][1] is np.True_ or type(back["bools"][1]) is np.bool_
    assert back["py"] == tree["py"] and [type(v) for v in back["py"]] == [
        type(v) for v in tree["py"]]
    # a whole model with Dropout and its own Rngs: the restored model draws the same numbers
    m = _Net(0)
    distq.save(f, nnx.state(m))
    m2 = _Net(1)
    state = nnx.state(m2)
    nnx.replace_by_pure_dict(state, distq.load(f))
    nnx.update(m2, state)
    x = jnp.ones((2, 4))
    np.testing.assert_array_equal(m(x), m2(x))
    np.testing.assert_array_equal(m(x), m2(x))


def test_a_leaf_named_like_the_header_metadata_round_trips(tmp_path):
    tree = {"__metadata__": jnp.arange(3.0), "w": jnp.ones(2),
            "q": {"__metadata__": distq.quantize(jnp.linspace(-1, 1, 64), distq.Scalar(bits=4))}}
    top = {"__metadata__": distq.quantize(jnp.linspace(-1, 1, 64), distq.Cast("bfloat16"))}
    for i, t in enumerate((tree, top, jnp.arange(4.0))):
        f = tmp_path / f"m{i}.safetensors"
        distq.save(f, t)
        _assert_same(t, distq.load(f))
        assert "__metadata__" not in distq.checkpoint.info(f)["tensors"]
    st = pytest.importorskip("safetensors.numpy")
    assert set(st.load_file(str(tmp_path / "m0.safetensors"))) >= {"w", "q/__metadata__:codes"}


# ------------------------------------------------------------------------ files on disk
def _mode(p) -> int:
    return os.stat(p).st_mode & 0o777


def test_new_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path):
    old = os.umask(0o022)
    try:
        distq.save(tmp_path / "a", {"x": jnp.ones(2)})
        assert _mode(tmp_path / "a") == 0o644
        os.umask(0o077)
        distq.save(tmp_path / "b", {"x": jnp.ones(2)})
        assert _mode(tmp_path / "b") == 0o600
        (tmp_path / "c").write_bytes(b"old")
        os.chmod(tmp_path / "c", 0o644)
        distq.save(tmp_path / "c", {"x": jnp.ones(2)})
        assert _mode(tmp_path / "c") == 0o644
        os.chmod(tmp_path / "c", 0o640)
        distq.save(tmp_path / "c", {"x": jnp.ones(3)})
        assert _mode(tmp_path / "c") == 0o640
        assert distq.load(tmp_path / "c")["x"].shape == (3,)
    finally:
        os.umask(old)


def test_save_refuses_what_is_not_a_regular_file(tmp_path):
    # only paths under tmp_path: a broken save run as root must not replace a system device
    import socket
    import stat

    odd = {"fifo": "FIFO"}
    os.mkfifo(tmp_path / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "sock"))
        odd["sock"] = "socket"
    except OSError:  # pragma: no cover (path too long for a socket)
        pass
    try:  # a private copy of /dev/null's device (needs root)
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        odd["null"] = "character device"
    except (PermissionError, AttributeError):
        pass
    try:
        for name, what in odd.items():
            mode = os.stat(tmp_path / name).st_mode
            with pytest.raises(ValueError, match=f"{name}.* is a {what}"):
                distq.save(tmp_path / name, {"x": jnp.ones(2)})
            assert os.stat(tmp_path / name).st_mode == mode
    finally:
        sock.close()
    with pytest.raises(ValueError, match="directory"):
        distq.save(tmp_path, {"x": jnp.ones(2)})
    with pytest.raises(ValueError, match="empty"):
        distq.save("", {"x": jnp.ones(2)})
    with pytest.raises(ValueError, match="separator"):
        distq.save(str(tmp_path / "d") + "/", {"x": jnp.ones(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(odd)


def test_symlinks_are_followed_and_hard_links_keep_the_old_content(tmp_path):
    target = tmp_path / "real.distq"
    distq.save(target, {"x": jnp.zeros(2)})
    link = tmp_path / "link.distq"
    link.symlink_to(target.name)
    distq.save(link, {"x": jnp.ones(5)})
    assert link.is_symlink() and os.readlink(link) == target.name
    assert distq.load(target)["x"].shape == (5,) and distq.load(link)["x"].shape == (5,)
    dangling = tmp_path / "dangling"
    dangling.symlink_to("made.distq")
    distq.save(dangling, {"x": jnp.ones(1)})
    assert dangling.is_symlink() and (tmp_path / "made.distq").is_file()
    hard = tmp_path / "hard.distq"
    os.link(target, hard)
    distq.save(target, {"x": jnp.ones(7)})
    assert distq.load(target)["x"].shape == (7,)
    assert distq.load(hard)["x"].shape == (5,)  # a new inode for the path, as documented
    assert ".tmp" not in " ".join(p.name for p in tmp_path.iterdir())


def test_stale_temporaries_of_killed_saves_are_removed(tmp_path):
    import subprocess
    import sys
    import time

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    dead = int(child.stdout)
    f = tmp_path / "m.distq"
    stale_dead = tmp_path / f".m.distq.{dead}.0123abcd.tmp"
    stale_old = tmp_path / f".m.distq.{os.getppid()}.89abcdef.tmp"
    live = tmp_path / f".m.distq.{os.getppid()}.00000000.tmp"
    other = tmp_path / f".n.distq.{dead}.0123abcd.tmp"
    unrelated = tmp_path / ".m.distq.notes.tmp"
    for p in (stale_dead, stale_old, live, other, unrelated):
        p.write_bytes(b"partial")
    hours_ago = time.time() - 7200
    os.utime(stale_old, (hours_ago, hours_ago))
    distq.save(f, {"x": jnp.ones(2)})
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(p.name for p in (f, live, other, unrelated))


def test_interrupted_save_leaves_only_a_temporary_with_its_pid(tmp_path, monkeypatch):
    f = tmp_path / "m.distq"
    seen = []
    real_replace = os.replace

    def crash(src, dst):
        seen.append(os.path.basename(src))
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        distq.save(f, {"x": jnp.ones(2)})
    monkeypatch.setattr(os, "replace", real_replace)
    (name,) = seen
    assert name.startswith(f".m.distq.{os.getpid()}.") and name.endswith(".tmp")
    assert list(tmp_path.iterdir()) == []


def test_load_says_what_a_path_is(tmp_path):
    with pytest.raises(CheckpointError, match="directory"):
        distq.load(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="FIFO"):
        distq.load(fifo)  # and does not block waiting for a writer
    with pytest.raises(CheckpointError, match="FIFO"):
        distq.checkpoint.info(fifo)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        distq.load(tmp_path / "missing")


def test_trees_too_deep_or_too_large_are_refused_before_writing(tmp_path, monkeypatch):
    loop = []
    loop.append(loop)
    with pytest.raises(ValueError, match="nested deeper"):
        distq.save(tmp_path / "f", loop)
    monkeypatch.setattr(distq.checkpoint, "_MAX_HEADER", 256)
    with pytest.raises(ValueError, match="header"):
        distq.save(tmp_path / "f", {f"leaf{i}": jnp.ones(1) for i in range(20)})
    assert not (tmp_path / "f").exists()


# ------------------------------------------------------------------------ hostile files
def _split(blob: bytes) -> tuple[dict, bytes]:
    hlen = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + hlen]), blob[8 + hlen:]


def _signed(header: dict, data: bytes) -> bytes:
    """The file for ``header`` and ``data`` with a valid digest (as anyone can compute)."""
    meta = {k: v for k, v in header["__metadata__"].items() if k != "sha256"}
    index = {k: v for k, v in header.items() if k != "__metadata__"}
    meta["sha256"] = distq.checkpoint._digest(index, meta, [data])
    return _rebuild(dict(header, __metadata__=meta), data)


def _base_blob(tmp_path) -> bytes:
    x = jax.random.normal(jax.random.key(1), (16, 8))
    q = distq.quantize(x, distq.Uniform(bits=4, group_size=8))
    assert q.n == 15 and q.layout.kind == "group"
    tree = {"a": jnp.arange(2.0), "b": jnp.arange(2.0) + 1, "q": q, "k": jax.random.key(0),
            "s": np.int32(4), "d": {"x": 1, "y": [1, 2]}}
    f = tmp_path / "base.distq"
    distq.save(f, tree, metadata={"owner": "me"})
    return f.read_bytes()


def _edit_tree(fn):
    def edit(h, d):
        tree = json.loads(h["__metadata__"]["tree"])
        fn(tree, h)
        h["__metadata__"]["tree"] = json.dumps(tree)
        return _signed(h, d)
    return edit


def _node(tree, key):
    return tree["v"][[k for _, k in tree["k"]].index(key)]


def _shift(h, after: int, by: int):
    for k, e in h.items():
        if k != "__metadata__" and e["data_offsets"][0] >= after:
            e["data_offsets"] = [o + by for o in e["data_offsets"]]


def _overlap(h, d):
    a, b = h["a"]["data_offsets"], h["b"]["data_offsets"]
    _shift(h, b[1], -(b[1] - b[0]))
    h["b"]["data_offsets"] = list(a)
    return _signed(h, d[:b[0]] + d[b[1]:])


def _gap(h, d):
    end = h["a"]["data_offsets"][1]
    _shift(h, end, 4)
    return _signed(h, d[:end] + b"\0" * 4 + d[end:])


def _code_beyond(h, d):
    tree = json.loads(h["__metadata__"]["tree"])
    ref = _node(tree, "q")["arrays"]["codes"]
    a, _ = h[ref]["data_offsets"]
    word = np.frombuffer(d[a:a + 4], "<u4")[0]
    word = (word & ~np.uint32(0xF)) | np.uint32(15)  # first code := 15 with n = 15
    return _signed(h, d[:a] + np.uint32(word).astype("<u4").tobytes() + d[a + 4:])


def _meta(**kw):
    def edit(h, d):
        h["__metadata__"].update(kw)
        for k, v in kw.items():
            if v is None:
                del h["__metadata__"][k]
        return _signed(h, d)
    return edit


def _deep(h, d):
    n = 20_000
    h["__metadata__"]["tree"] = '{"t":"list","v":[' * n + '{"t":"none"}' + "]}" * n
    return _signed(h, d)


def _raw(old: bytes, new: bytes):
    def edit(h, d):
        blob = _signed(h, d)
        hb = blob[8:8 + struct.unpack("<Q", blob[:8])[0]].rstrip()
        assert old in hb
        hb = hb.replace(old, new, 1)
        hb += b" " * (-len(hb) % 8)
        return struct.pack("<Q", len(hb)) + hb + d
    return edit


# name -> (edit of (header, data) giving the file bytes, whether `info` must fail too)
_HOSTILE = {
    "user-edited": (lambda h, d: _rebuild(
        dict(h, __metadata__=dict(h["__metadata__"], user='{"owner":"you"}')), d), True),
    "overlapping-offsets": (_overlap, True),
    "gap-between-tensors": (_gap, True),
    "offsets-out-of-range": (lambda h, d: _signed(
        dict(h, a=dict(h["a"], data_offsets=[len(d), len(d) + 8])), d), True),
    "offsets-strings": (lambda h, d: _signed(
        dict(h, a=dict(h["a"], data_offsets=[str(o) for o in h["a"]["data_offsets"]])), d),
        True),
    "offsets-floats": (lambda h, d: _signed(
        dict(h, a=dict(h["a"], data_offsets=[float(o) for o in h["a"]["data_offsets"]])), d),
        True),
    "shape-infinity": (lambda h, d: _signed(dict(h, a=dict(h["a"], shape=[float("inf")])), d),
                       True),
    "shape-bool": (lambda h, d: _signed(dict(h, a=dict(h["a"], shape=[True, 2])), d), True),
    "unknown-dtype": (lambda h, d: _signed(dict(h, a=dict(h["a"], dtype="X99")), d), True),
    "index-entry-not-object": (lambda h, d: _signed(dict(h, a=[1]), d), True),
    "duplicate-header-key": (_raw(b'"b": {', b'"a": {'), True),
    "key-value-lengths": (_edit_tree(lambda t, h: t["v"].pop()), True),
    "repeated-dict-key": (_edit_tree(lambda t, h: t["k"].__setitem__(1, ["str", "a"])), True),
    "bad-dict-key": (_edit_tree(lambda t, h: t["k"].__setitem__(1, ["int", "b"])), True),
    "non-dict-node": (_edit_tree(lambda t, h: t["v"].__setitem__(0, 5)), True),
    "node-without-type": (_edit_tree(lambda t, h: t["v"].__setitem__(0, {"v": []})), True),
    "list-node-value": (_edit_tree(lambda t, h: _node(t, "d")["v"][1].__setitem__("v", 5)),
                        True),
    "scalar-list": (_edit_tree(lambda t, h: _node(t, "d")["v"][0].__setitem__("v", [1])), True),
    "missing-tensor": (_edit_tree(lambda t, h: _node(t, "a").__setitem__("ref", "nope")), True),
    "unknown-node-type": (_edit_tree(lambda t, h: _node(t, "a").__setitem__("t", "weird")),
                          True),
    "unknown-leaf-array": (_edit_tree(lambda t, h: _node(t, "q")["arrays"].__setitem__(
        "bogus", "a")), True),
    "leaf-meta-not-object": (_edit_tree(lambda t, h: _node(t, "q").__setitem__("meta", 3)),
                             True),
    "npscalar-not-0d": (_edit_tree(lambda t, h: _node(t, "s").__setitem__("ref", "a")), True),
    "deep-tree": (_deep, True),
    "tree-not-json": (_meta(tree="{"), True),
    "tree-not-a-node": (_meta(tree="[1, 2]"), True),
    "no-tree": (_meta(tree=None), True),
    "no-digest": (lambda h, d: _rebuild(dict(h, __metadata__={
        k: v for k, v in h["__metadata__"].items() if k != "sha256"}), d), True),
    "leaves-5": (lambda h, d: _signed(dict(h, __metadata__=dict(h["__metadata__"], leaves=5)),
                                      d), True),
    "leaves-not-a-list": (_meta(leaves='{"a": 1}'), True),
    "leaves-bad-row": (_meta(leaves='[{"path": 1}]'), True),
    "user-not-json": (_meta(user="{"), True),
    "user-not-object": (_meta(user="[1]"), True),
    "user-not-strings": (_meta(user='{"a": 1}'), True),
    "key-impl-unknown": (_edit_tree(lambda t, h: _node(t, "k").__setitem__("impl", "nope")),
                         False),
    "key-data-shape": (_edit_tree(lambda t, h: _node(t, "k").__setitem__("impl", "rbg")), False),
    "layout-axis-out-of-range": (_edit_tree(lambda t, h: _node(t, "q")["meta"]["layout"].update(
        axes=[5])), False),
    "layout-channel-axis": (_edit_tree(lambda t, h: _node(t, "q")["meta"]["layout"].update(
        kind="channel", axes=[7])), False),
    "group-size-0": (_edit_tree(lambda t, h: _node(t, "q")["meta"]["layout"].update(
        group_size=0)), False),
    "shape-infinity-in-leaf": (_edit_tree(lambda t, h: _node(t, "q")["meta"].update(
        shape=[float("inf")])), False),
    "bits-0": (_edit_tree(lambda t, h: _node(t, "q")["meta"].update(bits=0)), False),
    "code-beyond-codebook": (_code_beyond, False),
}


@pytest.mark.parametrize("name", sorted(_HOSTILE))
def test_hostile_files_raise_checkpoint_errors(tmp_path, name):
    blob = _base_blob(tmp_path)
    edit, info_fails = _HOSTILE[name]
    header, data = _split(blob)
    bad = edit(header, data)
    assert bad != blob
    g = tmp_path / "bad.distq"
    g.write_bytes(bad)
    with pytest.raises(CheckpointError):
        distq.load(g)
    if info_fails:
        with pytest.raises(CheckpointError):
            distq.checkpoint.info(g)
    else:
        distq.checkpoint.info(g)  # valid structure; the leaf itself is what is bad


def test_an_unmodified_base_file_loads(tmp_path):
    blob = _base_blob(tmp_path)
    g = tmp_path / "same.distq"
    g.write_bytes(_signed(*_split(blob)))
    back = distq.load(g)
    assert back["q"].n == 15 and back["d"] == {"x": 1, "y": [1, 2]}


def test_version_1_files_still_load(tmp_path):
    """Files of version 1 (whose digest does not cover the user metadata) still load."""
    header, data = _split(_base_blob(tmp_path))
    meta = dict(header["__metadata__"], version="1")
    index = {k: v for k, v in header.items() if k != "__metadata__"}
    meta["sha256"] = distq.checkpoint._digest(index, meta, [data], version="1")
    g = tmp_path / "v1.distq"
    g.write_bytes(_rebuild(dict(header, __metadata__=meta), data))
    assert distq.load(g)["d"]["y"] == [1, 2]
    assert distq.checkpoint.info(g)["user"] == {"owner": "me"}


def _peak_bytes(fn) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def _load_fails(path):
    def run():
        with pytest.raises(CheckpointError):
            distq.load(path)
    return run


def test_huge_or_hostile_headers_are_rejected_cheaply(tmp_path):
    big = tmp_path / "big"
    with open(big, "wb") as f:  # a sparse file claiming a 128 MiB header
        f.write(struct.pack("<Q", 128 << 20))
        f.truncate(8 + (128 << 20))
    assert _peak_bytes(_load_fails(big)) < 1 << 20
    for name, body in (("list", b"[" + b"{}," * (2 << 20) + b"{}]"),
                       ("nested", b'{"a":[' + b"{}," * (2 << 20) + b"{}]}")):
        f = tmp_path / name
        f.write_bytes(struct.pack("<Q", len(body)) + body)
        assert _peak_bytes(_load_fails(f)) < 3 * len(body), name
