"""Input validation (issue 15, "Reliability"): every field of every built-in spec is type- and
range-checked when the spec is made, the distquant drop-in checks its arguments and ``info``,
odd inputs (``None``, big-endian arrays) get clear errors or work, and the distquant drop-in
gives the same result for the same values at any memory address."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import distq
from distq import cli, compat
from distq.core.specs import KMeans

NAN, INF = float("nan"), float("inf")
BIG = 2**31  # one past JAX's int32: counts that reach jitted code stop below it

_BOOL = [(TypeError, "no"), (TypeError, "false"), (TypeError, 1), (TypeError, 0.0),
         (TypeError, None)]
_GROUP_SIZE = [(TypeError, True), (TypeError, 64.0), (TypeError, "64"), (ValueError, 0),
               (ValueError, -64), (ValueError, BIG)]
_GROUP_AXIS = [(TypeError, True), (TypeError, 1.0), (TypeError, "0"), (ValueError, 2**40)]
_AXIS = [(TypeError, 1.5), (TypeError, True), (TypeError, "x"), (TypeError, (0, 1.0)),
         (TypeError, [0]), (ValueError, 2**40)]
_BITS = [(TypeError, True), (TypeError, 4.0), (TypeError, "4"), (TypeError, None),
         (ValueError, 0), (ValueError, 17), (ValueError, 2**40)]


def _count(lo):
    """Bad values of an int field that must be ``>= lo`` (and below ``2**31``)."""
    return [(TypeError, True), (TypeError, float(lo + 1)), (TypeError, str(lo + 1)),
            (TypeError, NAN), (ValueError, lo - 1), (ValueError, BIG), (ValueError, 10**23)]


def _optional_count(lo):
    return [(e, v) for e, v in _count(lo) if v is not None]


_KMEANS_FIELDS = {
    "iters": _count(0),
    "coarse_iters": _count(0),
    "tol": [(ValueError, NAN), (ValueError, INF), (ValueError, -INF), (ValueError, -1.0),
            (TypeError, "0"), (TypeError, True), (TypeError, None)],
    "init": [(ValueError, "forgy"), (ValueError, "Greedy"), (ValueError, 1),
             (ValueError, None)],
    "seed_trials": _optional_count(1),
    "restarts": _count(1),
    "sample": _optional_count(1),
    "seed_sample": _optional_count(1),
    "seed_score": _optional_count(1),
    "block": _count(1),
    "verbose": _BOOL,
}

#: spec class -> (the fields it needs, {field: [(exception, bad value), ...]})
BAD = {
    distq.Scalar: ({}, {
        "bits": _BITS[:3] + _BITS[4:],  # bits=None is the default
        "n": [(TypeError, True), (TypeError, 16.0), (TypeError, "16"), (ValueError, 1),
              (ValueError, 0), (ValueError, -4), (ValueError, 2**20)],
        "dist": [(TypeError, 1), (TypeError, True), (ValueError, "normal"),
                 (ValueError, "Gaussian")],
        "p": [(TypeError, True), (TypeError, 1.0), (TypeError, "1"), (ValueError, 3),
              (ValueError, -1)],
        "beta": [(ValueError, NAN), (ValueError, INF), (ValueError, -INF), (ValueError, 0.0),
                 (ValueError, -1.0), (ValueError, 1e7), (ValueError, 1e-9),
                 (ValueError, 10**400), (TypeError, "1"), (TypeError, True)],
        "objective": [(ValueError, "MSE"), (ValueError, "l3"), (ValueError, 1),
                      (ValueError, None)],
        "refine": _BOOL,
        "max_iter": _count(0),
        "zero": [(ValueError, NAN), (ValueError, INF), (ValueError, -INF), (ValueError, 1e39),
                 (ValueError, 1e-40), (TypeError, "0"), (TypeError, True)],
        "axis": _AXIS,
        "group_size": _GROUP_SIZE,
        "group_axis": _GROUP_AXIS,
        "robust": _BOOL,
        "fit_size": _count(16),
        "scale_dtype": [(ValueError, "int8"), (ValueError, "float64"), (ValueError, 1),
                        (ValueError, None)],
        "outliers": [(ValueError, NAN), (ValueError, INF), (ValueError, 0), (ValueError, 0.3),
                     (ValueError, -0.1), (ValueError, True), (ValueError, "all")],
    }),
    distq.Uniform: ({}, {
        "bits": _BITS,
        "symmetric": _BOOL,
        "axis": _AXIS,
        "group_size": _GROUP_SIZE,
        "group_axis": _GROUP_AXIS,
        "scale_dtype": [(ValueError, "auto"), (ValueError, "int8"), (ValueError, None)],
    }),
    distq.NF4: ({}, {
        "group_size": _GROUP_SIZE,
        "group_axis": _GROUP_AXIS,
        "scale_dtype": [(ValueError, "int8"), (ValueError, None), (ValueError, 4)],
    }),
    KMeans: ({"k": 4}, {
        "k": [(TypeError, 2.5), (TypeError, True), (TypeError, None), (ValueError, 0),
              (ValueError, BIG)],
        **_KMEANS_FIELDS,
    }),
    distq.PQ: ({"m": 4}, {
        "m": [(TypeError, 4.0), (TypeError, True), (TypeError, None), (ValueError, 0),
              (ValueError, BIG)],
        "bits": _BITS,
        "opq": _BOOL,
        "opq_iters": _count(0),
        "opq_lloyd_iters": _count(0),
        "codebook_dtype": [(ValueError, "int8"), (ValueError, None), (ValueError, 16)],
        **_KMEANS_FIELDS,
    }),
    distq.Cast: ({}, {
        "dtype": [(ValueError, "int8"), (ValueError, "float64"), (ValueError, None),
                  (ValueError, 16)],
    }),
}

CASES = [pytest.param(cls, field, exc, value, id=f"{cls.__name__}.{field}={value!r:.20}")
         for cls, (_, fields) in BAD.items() for field, bad in fields.items()
         for exc, value in bad]


@pytest.mark.parametrize("cls", list(BAD), ids=lambda c: c.__name__)
def test_every_field_is_covered(cls):
    """A new field must come with its bad values here."""
    assert {f.name for f in dataclasses.fields(cls)} == set(BAD[cls][1])


@pytest.mark.parametrize("cls, field, exc, value", CASES)
def test_bad_field_values_are_refused(cls, field, exc, value):
    required, _ = BAD[cls]
    with pytest.raises(exc) as e:
        cls(**{**required, field: value})
    msg = str(e.value)
    assert field in msg, msg  # the message names the field ...
    assert "\n" not in msg and len(msg) < 300, msg  # ... in one short line
    allowed = ("must be", "out of range (at most", "choose one of", "one of ", "do not fit")
    assert any(w in msg for w in allowed), msg  # ... and says what is allowed


@pytest.mark.parametrize("make", [
    lambda: distq.Scalar(bits=np.int64(4), beta=np.float32(1.5), zero=np.float64(0.0),
                         refine=np.bool_(False), max_iter=np.int32(10), p=np.int8(2)),
    lambda: distq.Scalar(beta=1, zero=-2, outliers=np.float32(0.01), axis=(0, np.int64(1))),
    lambda: distq.Scalar(zero=float(np.finfo(np.float32).tiny), beta=1e6, fit_size=BIG - 1),
    lambda: distq.Uniform(bits=8, symmetric=np.True_, group_size=np.int64(32)),
    lambda: distq.NF4(group_size=None),
    lambda: KMeans(k=np.int64(16), tol=0, sample=BIG - 1, verbose=np.False_),
    lambda: distq.PQ(m=np.int64(4), bits=np.int32(4), opq=np.bool_(True), tol=np.float32(1e-3)),
])
def test_numpy_scalars_and_edge_values_are_accepted(make):
    make()


def test_specs_in_text_are_checked_too():
    """The text form goes through the same checks (one-line usage errors on the command line)."""
    for text, field in [("scalar:4,zero=nan", "zero"), ("scalar:4,beta=inf", "beta"),
                        ("scalar:4,beta=-inf", "beta"), ("pq:4:4,tol=nan", "tol"),
                        ("scalar:4,max_iter=3000000000", "max_iter"),
                        ("pq:4:4,sample=3000000000", "sample")]:
        with pytest.raises(ValueError, match=field):
            distq.parse_spec(text)
        with pytest.raises(cli.UsageError, match=field):
            cli.parse_spec(text)
    assert distq.parse_spec("scalar:4,refine=no").refine is False  # text: "no" means False


# ------------------------------------------------------------------------- distquant drop-in
X = np.random.default_rng(0).standard_normal(1000).astype(np.float32)


@pytest.mark.parametrize("kwargs, word", [
    (dict(k=4, beta=INF), "beta"),
    (dict(k=4, beta=-INF), "beta"),
    (dict(k=4, beta=NAN), "beta"),
    (dict(k=4, beta=0.0), "beta"),
    (dict(k=4, beta=True), "beta"),
    (dict(k=4, beta="1"), "beta"),
    (dict(k=4, zero=NAN), "zero"),
    (dict(k=4, zero=INF), "zero"),
    (dict(k=4, zero=1e-40), "zero"),
    (dict(k=4, packbits="no"), "packbits"),
    (dict(k=4, packbits=None), "packbits"),
    (dict(n=1), "n"),
    (dict(n=2**20), "n"),
    (dict(k=True), "k"),
])
def test_compat_quantize_refuses_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        compat.quantize(X, **kwargs)


@pytest.mark.parametrize("change, fragment", [
    (dict(n=0), "info['n'] must be in 2..65536, got 0"),
    (dict(n=1), "info['n'] must be in 2..65536, got 1"),
    (dict(n=2**20), "info['n']=1048576 is out of range (at most 65536)"),
    (dict(n=16.5), "info['n'] must be an int"),
    (dict(n=True), "info['n'] must be an int"),
    (dict(beta=INF), "info['beta']"),
    (dict(beta=0.0), "info['beta']"),
    (dict(loc=NAN), "info['loc']"),
    (dict(scale=INF), "info['scale']"),
    (dict(scale=-1.0), "info['scale']"),
    (dict(zero=NAN), "info['zero']"),
    (dict(packbits="no"), "info['packbits']"),
    (dict(shape=[10]), "does not match"),
    (dict(shape=[-1000]), "info['shape']"),
    (dict(shape="1000"), "info['shape']"),
    (dict(dist="normal"), "dist"),
    (dict(dtype="int8"), "info['dtype']"),
])
def test_compat_dequantize_refuses_bad_info(change, fragment):
    q, info = compat.quantize(X, k=4)
    with pytest.raises(ValueError) as e:
        compat.dequantize(q, **{**info, **change})
    msg = str(e.value)
    assert fragment in msg and "math domain" not in msg, msg


def test_compat_dequantize_takes_array_scalars_in_info():
    """distquant's info may hold 0-d tensors (its Gumbel scale): they are numbers."""
    q, info = compat.quantize(X, k=4)
    y = compat.dequantize(q, **{**info, "scale": np.float32(info["scale"]),
                                "loc": np.array(info["loc"])})
    np.testing.assert_array_equal(y, compat.dequantize(q, **info))


# ---------------------------------------------------------------------------- unusual inputs
@pytest.mark.parametrize("x", [None, "abc", object(), {"a": 1.0}])
def test_quantize_non_arrays_name_the_argument(x):
    with pytest.raises(TypeError, match="x must be an array"):
        distq.quantize(x)
    with pytest.raises(TypeError, match="data must be an array"):
        compat.quantize(x, k=4)


@pytest.mark.parametrize("spec", [distq.Scalar(bits=2), distq.Uniform(bits=4),
                                  distq.NF4(group_size=4), distq.Cast("float16")],
                         ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("dtype", [">f4", ">f2", ">f8"])
def test_big_endian_input_is_converted(spec, dtype):
    x = (np.arange(32) - 10.5).astype(dtype)
    native = x.astype(x.dtype.newbyteorder("="))
    q, ref = distq.quantize(x, spec), distq.quantize(native, spec)
    y = q.dequantize()
    assert y.dtype == ref.dequantize().dtype and y.dtype.isnative
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref.dequantize()))


def test_big_endian_input_to_compat():
    x = (np.arange(100) - 40.5).astype(">f4")
    q, info = compat.quantize(x, k=3)
    q_ref, info_ref = compat.quantize(x.astype("<f4"), k=3)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(compat.dequantize(q, **info),
                                  compat.dequantize(q_ref, **info_ref))


# --------------------------------------------------------------- same values, same result
@pytest.mark.parametrize("k, zero", [(4, None), (2, None), (1, None), (4, 0.0)])
def test_compat_result_does_not_depend_on_the_address(k, zero):
    """Large inputs on the word path are read in place from their first 64-byte boundary (a head
    before it, a main part, a tail): the statistics must not add up in an order that follows the
    address. The same 100k values at offsets 0..15 floats give the same codes, scale, location
    and decoded values (they were 1 ulp apart, and 83 % of the decoded values differed)."""
    x = (1.0 + 3.0 * np.random.default_rng(k).standard_normal(100_000)).astype(np.float32)
    results = []
    for off in range(16):
        buf = np.empty(x.size + 16, np.float32)
        a = buf[off : off + x.size]
        a[:] = x
        results.append(compat.quantize(a, k=k, dist="gaussian", beta=1.0, zero=zero))
    q0, info0 = results[0]
    y0 = compat.dequantize(q0, **info0)
    for q, info in results[1:]:
        np.testing.assert_array_equal(q, q0)
        # the summed absolute error is a float32 sum over the encoder's words, which follow the
        # split: it agrees to float32 rounding (see the report of issue 15)
        assert {k_: v for k_, v in info.items() if k_ != "abs_error"} == \
               {k_: v for k_, v in info0.items() if k_ != "abs_error"}
        assert math.isclose(info["abs_error"], info0["abs_error"], rel_tol=1e-6)
        np.testing.assert_array_equal(compat.dequantize(q, **info), y0)


# ------------------------------------------------------------------------------ command line
@pytest.mark.parametrize("extra", [
    ["--rule", ".*=int:8", "--seed", str(2**70)],
    ["--rule", ".*=int:8", "--seed", "2**70"],
    ["--rule", ".*=scalar:4,max_iter=10**23"],
    ["--rule", ".*=scalar:4,max_iter=" + str(10**23)],
    ["--rule", ".*=scalar:4,zero=nan"],
    ["--rule", ".*=scalar:4,beta=inf"],
    ["--rule", ".*=pq:4:4,tol=nan"],
])
def test_cli_bad_numbers_are_one_line_usage_errors(extra, tmp_path, capsys):
    rc = cli.main(["quantize", str(tmp_path / "in.safetensors"), str(tmp_path / "o.distq"),
                   *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distq: error: "), err
    assert "Traceback" not in err
