"""The spec and leaf protocols: one entry point for every spec, batched leaves, row gathers,
the plan, and the package's shape (acyclic imports, no private access across modules, a light
import)."""

import ast
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import distq
from distq.core import spec as S

PKG = os.path.join(os.path.dirname(__file__), os.pardir, "distq")

SPECS = [distq.Scalar(bits=4), distq.Scalar(bits=3, axis=0, outliers=0.01),
         distq.Uniform(bits=8), distq.Uniform(bits=4, symmetric=False, axis=1), distq.NF4(),
         distq.PQ(m=4, bits=4), distq.Cast("bfloat16"), distq.Rotated(distq.Scalar(bits=4)),
         distq.VQ(bits=4)]
IDS = ["scalar", "scalar-axis-outliers", "int8", "int4-affine", "nf4", "pq", "cast", "rotated",
       "vq"]


def _x(shape=(256, 16), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_every_registered_spec_has_an_instance_here():
    assert {type(s) for s in SPECS} == set(S.spec_types())


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_quantize_takes_every_spec(spec):
    x = _x()
    q = distq.quantize(x, spec)
    assert distq.is_quantized(q) and q.shape == x.shape and q.nbytes == spec.nbytes(x.shape)
    err = np.mean((np.asarray(q.dequantize()) - x) ** 2) / np.mean(x ** 2)
    assert err < (0.35 if isinstance(spec, distq.PQ) else 0.05)  # PQ: 4 sub-codes of 4 bits a row
    np.testing.assert_array_equal(np.asarray(distq.dequantize(q)), np.asarray(q.dequantize()))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_vmap_gives_a_batched_leaf(spec):
    xs = np.stack([_x(seed=i) for i in range(3)])
    q = jax.vmap(lambda a: distq.quantize(a, spec))(jnp.asarray(xs))
    assert q.shape == xs.shape and q.ndim == 3
    members = [np.asarray(distq.quantize(xs[i], spec).dequantize()) for i in range(3)]
    eager = np.asarray(q.dequantize())
    jitted = np.asarray(jax.jit(lambda t: t.dequantize())(q))
    for i in range(3):
        np.testing.assert_allclose(eager[i], members[i], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(jitted[i], members[i], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(q[i]), members[i], rtol=1e-6, atol=1e-6)
    assert repr(q)  # no error in the batched repr


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_take_decodes_only_rows_and_matches_dequantize(spec):
    x = _x((300, 16))
    q = distq.quantize(x, spec)
    rows = np.array([[0, 299, -1], [17, 17, 150]])
    want = np.asarray(q.dequantize())[rows]
    np.testing.assert_allclose(np.asarray(q.take(rows)), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda t, r: t.take(r))(q, rows)), want,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(q[5]), np.asarray(q.dequantize())[5], rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("layout", [dict(axis=1), dict(group_size=8), dict(group_size=20,
                                                                              group_axis=0),
                                    dict(group_size=40, group_axis=None)])
def test_take_follows_every_layout_with_outliers(layout):
    x = _x((60, 3, 16)) * np.linspace(0.1, 3, 16, dtype=np.float32)
    q = distq.quantize(x, distq.Scalar(bits=3, outliers=0.02, **layout))
    assert q.n_outliers > 0
    rows = np.arange(60)[::-7]
    np.testing.assert_array_equal(np.asarray(q.take(rows)), np.asarray(q.dequantize())[rows])


def test_uniform_grid_stores_no_level_table():
    x = _x((64, 64))
    q8 = distq.quantize(x, distq.Uniform(bits=8))
    assert q8.codebook is None and q8.nbytes == 64 * 64 + 4
    qa = distq.quantize(x, distq.Uniform(bits=4, symmetric=False))
    assert qa.codebook is None and qa.nbytes == 64 * 64 // 2 + 8
    # decoding the grid: loc + scale * (first + step * code), exactly as a table would
    codes = np.asarray(qa.codes_unpacked()).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(qa.dequantize()),
                               float(qa.loc[0]) + float(qa.scale[0]) * codes, rtol=1e-6)


def test_spec_text_round_trips_for_every_registered_spec():
    for spec in SPECS + [distq.Scalar(bits=2, robust=True, refine=False, axis=(0, 1)),
                         distq.PQ(m=8, bits=6, opq=True, codebook_dtype="float16")]:
        text = distq.spec_str(spec)
        assert distq.parse_spec(text) == spec, text


def test_spec_syntax_errors_name_what_is_allowed():
    with pytest.raises(ValueError, match="unknown kind 'scalr'.*scalar"):
        distq.parse_spec("scalr:4")
    with pytest.raises(ValueError, match="unknown option 'grp'.*group_size"):
        distq.parse_spec("scalar:4,grp=64")
    with pytest.raises(ValueError, match="pq needs m"):
        distq.parse_spec("pq")


def test_register_makes_a_new_spec_usable_everywhere():
    """A new quantiser is one module plus one registration: rules, plans, text, trees."""
    import dataclasses
    from typing import ClassVar

    @dataclasses.dataclass(frozen=True)
    class Halve:
        kind: ClassVar[str] = "halve-test"
        positional: ClassVar[tuple] = ()

        def quantize(self, x, *, key=None):
            return distq.Cast("float16").quantize(x, key=key)

        def resolve(self, shape, role=None):
            return self

        def problem(self, shape):
            return None if len(shape) == 2 else "needs a matrix"

        def nbytes(self, shape):
            return 2 * int(np.prod(shape))

    distq.register(Halve, distq.CastArray)
    try:
        assert distq.parse_spec("halve-test") == Halve()
        params = {"w": jnp.ones((8, 8)), "v": jnp.ones(8)}
        p = distq.plan(params, [("w", "halve-test"), ("v", Halve())])
        assert p.leaves[1].spec == Halve() and "needs a matrix" in p.leaves[0].problem
        q, _ = distq.quantize_tree({"w": jnp.ones((8, 8))}, Halve())
        assert q["w"].nbytes == 128
    finally:
        S.unregister(Halve)
    assert Halve not in S.spec_types()


def test_plan_finds_every_problem_before_any_work():
    params = {"a": jnp.ones((10,)), "b": jnp.ones((100, 30)), "c": jnp.ones((7, 13))}
    rules = [(".*", distq.PQ(m=4, bits=2))]
    p = distq.plan(params, rules)
    assert len(p.problems) == 3
    with pytest.raises(ValueError, match="3 problems") as e:
        distq.quantize_tree(params, rules)
    for name in ("'a'", "'b'", "'c'"):
        assert name in str(e.value)


def test_plan_advises_when_pq_codebooks_outweigh_codes():
    p = distq.plan({"emb": jax.ShapeDtypeStruct((1000, 64), jnp.float32)}, distq.PQ(m=8, bits=8))
    (leaf,) = p.leaves
    assert "outweigh the codes" in leaf.note and leaf.bytes_after == 8000 + 8 * 256 * 8 * 4


def test_plan_on_shapes_equals_plan_on_arrays():
    params = {"k": jnp.ones((64, 32)), "b": jnp.ones(32), "i": jnp.ones(3, jnp.int32)}
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    assert distq.plan(params, distq.Scalar(bits=4)) == distq.plan(shapes, distq.Scalar(bits=4))


def test_unused_rules_are_reported_and_can_be_made_an_error():
    p = distq.plan({"w": jnp.ones((64, 64))}, [("w", distq.NF4()), ("nothing", distq.NF4())])
    assert p.unused_rules == ("nothing",)
    with pytest.raises(ValueError, match="matched no leaf"):
        p.check(allow_unused=False)


def test_trees_with_prng_keys_ints_and_bools():
    """An nnx model with Dropout holds typed RNG keys: kept, counted, never quantised."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(64, 64, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)
            self.flag = nnx.Variable(jnp.array(True))
            self.step = nnx.Variable(jnp.array(3, jnp.int32))

    state = nnx.state(Net(nnx.Rngs(0)))
    keys = [x for x in jax.tree.leaves(state) if jax.dtypes.issubdtype(x.dtype,
                                                                       jax.dtypes.prng_key)]
    assert keys  # the model does hold typed keys
    q, report = distq.quantize_tree(state, distq.Scalar(bits=4))
    notes = {r.path: r.note for r in report.leaves}
    assert any("key" in p for p in notes)
    assert all(n == "not floating point: kept" for p, n in notes.items()
               if "key" in p or "count" in p or p.endswith(("flag", "step")))
    kernel = q["lin"]["kernel"]
    assert isinstance(getattr(kernel, "value", kernel), distq.QArray)
    nbytes = distq.tree_nbytes(q)
    assert 0 < nbytes < distq.tree_nbytes(state)
    fq = distq.fake_quantize_tree(state, distq.Scalar(bits=4))
    assert jax.tree.structure(fq) == jax.tree.structure(state)


# ------------------------------------------------------------------------------- package shape
def _modules():
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def _imports(name, path):
    """distq modules imported by ``name`` (anywhere in the file, functions included)."""
    tree = ast.parse(open(path).read())
    pkg = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                found.append((mod, a.name, a.asname))
        elif isinstance(node, ast.Import):
            for a in node.names:
                found.append((a.name, None, a.asname))
    return tree, found


def test_import_graph_is_acyclic_and_core_stays_core():
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for mod, attr, _ in _imports(name, path)[1]:
            if attr and f"{mod}.{attr}" in mods:
                deps.add(f"{mod}.{attr}")
            elif mod in mods:
                deps.add(mod)
        graph[name] = {d for d in deps if d != name and d != "distq"}
        if name.startswith("distq.core"):
            bad = [m for m, _, _ in _imports(name, path)[1]
                   if m.split(".")[0] in ("flax", "optax") or (
                       m.startswith("distq") and not m.startswith("distq.core"))]
            assert not bad, f"{name} imports {bad}"
    state = {}

    def visit(n, stack):
        state[n] = 1
        for d in graph.get(n, ()):
            if state.get(d) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack + [n, d])}")
            if d not in state:
                visit(d, stack + [n])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])


def test_no_module_reaches_into_another_modules_privates():
    mods = _modules()
    offences = []
    for name, path in mods.items():
        tree, imports = _imports(name, path)
        aliases = {}
        for mod, attr, asname in imports:
            target = f"{mod}.{attr}" if attr else mod
            if target.startswith("distq") and target in mods and target != name:
                aliases[asname or (attr or mod.split(".")[-1])] = target
            elif mod.startswith("distq") and attr and attr.startswith("_") and mod != name and \
                    f"{mod}.{attr}" not in mods and not attr.startswith("__"):
                offences.append(f"{name}: from {mod} import {attr}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                offences.append(f"{name}: {node.value.id}.{node.attr}")
    assert not offences, offences


def test_import_is_light_and_loads_no_flax():
    code = ("import sys, time; t = time.perf_counter(); import distq; "
            "dt = time.perf_counter() - t; "
            "assert 'jax' not in sys.modules and 'flax' not in sys.modules, sorted(sys.modules); "
            "distq.quantize; assert 'flax' not in sys.modules and 'optax' not in sys.modules; "
            "assert 'scipy.stats' not in sys.modules; print(dt)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert float(out.stdout) < 0.2


def test_specs_build_and_parse_without_jax():
    """Specs are plain configuration: the command line checks rules before loading JAX."""
    code = ("import sys, distq; from distq.core import spec; "
            "s = spec.parse_spec('scalar:3,group=64'); p = distq.PQ(m=8); "
            "assert spec.spec_str(s) == 'scalar:3,group_size=64', spec.spec_str(s); "
            "assert 'jax' not in sys.modules and 'scipy.special' not in sys.modules; "
            "import distq.core.specs as S; assert S.KMeans(k=4).trials == 3")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_iteration_ends_and_out_of_range_rows_raise(spec):
    x = _x((20, 16))
    q = distq.quantize(x, spec)
    assert len(q) == 20
    rows = list(q)
    assert len(rows) == 20
    np.testing.assert_allclose(np.asarray(rows[-1]), np.asarray(q.dequantize())[-1], rtol=1e-6,
                               atol=1e-6)
    with pytest.raises(IndexError):
        q.take(20)
