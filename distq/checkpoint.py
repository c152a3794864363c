"""Quantised checkpoints: ``distq.save`` / ``distq.load``.

A checkpoint is one file in the `safetensors <https://huggingface.co/docs/safetensors>`_ layout
(8-byte little-endian header length, a JSON header, then the raw little-endian tensor bytes), so
any safetensors reader can list and read its tensors. distq adds, in the header's
``__metadata__``:

* ``format`` (``"distq"``) and ``version``;
* ``tree``: the JSON description of the tree (dicts, lists, tuples, ``None``, scalars, arrays and
  the compressed leaves with their static metadata), enough to rebuild every QArray / PQArray /
  CastArray without the original model or spec;
* ``leaves``: optional per-leaf report (spec, error) when saved with ``report=``;
* ``sha256``: a digest of the tensor index, the tree and every data byte, verified on load.

Files are written atomically (a temporary file in the same folder, flushed and fsynced, then
renamed over the target), so an interrupted save never leaves a half-written checkpoint and never
damages an existing one. Loading checks the length, the header, the offsets and the digest, and
rebuilds each leaf with validation: a truncated or altered file raises ``ValueError`` instead of
producing a wrong model. Codes and dense arrays load bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from . import pq as _pq
from .qarray import QARRAY_FIELDS, QArray
from .tree import CastArray, TreeReport, spec_str

FORMAT = "distq"
VERSION = "1"

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in _DTYPES.items()}
_LEAF_TYPES = {"qarray": (QArray, QARRAY_FIELDS),
               "pqarray": (_pq.PQArray, ("codes", "codebooks", "rotation")),
               "castarray": (CastArray, ("value",))}
_MAX_HEADER = 1 << 28


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, altered, or not a distq checkpoint."""


# ------------------------------------------------------------------------------------ writing
class _Writer:
    def __init__(self):
        self.tensors: dict[str, np.ndarray] = {}

    def add(self, name: str, a) -> str:
        arr = np.asarray(a)
        if arr.dtype not in _CODES:
            raise TypeError(f"cannot store {name!r}: dtype {arr.dtype} is not supported")
        base, i = name, 1
        while name in self.tensors:
            name, i = f"{base}#{i}", i + 1
        self.tensors[name] = np.asarray(arr, order="C")
        return name

    def node(self, x, path: str) -> dict:
        if x is None:
            return {"t": "none"}
        for kind, (cls, fields) in _LEAF_TYPES.items():
            if isinstance(x, cls):
                arrays = {f: self.add(f"{path}:{f}", getattr(x, f)) for f in fields
                          if getattr(x, f) is not None}
                return {"t": kind, "meta": x.metadata(), "arrays": arrays}
        if isinstance(x, (jax.Array, np.ndarray)):
            return {"t": "array", "ref": self.add(path or "value", x)}
        if isinstance(x, (bool, int, float, str)) or isinstance(x, np.generic):
            v = x.item() if isinstance(x, np.generic) else x
            return {"t": "scalar", "v": v, "py": type(v).__name__}
        state = _as_mapping(x)
        if state is not None:
            keys, nodes = [], []
            for k, v in state.items():
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise TypeError(f"cannot store key {k!r} at {path!r}: keys must be str or int")
                keys.append([type(k).__name__, k])
                nodes.append(self.node(v, f"{path}/{k}" if path else str(k)))
            return {"t": "dict", "k": keys, "v": nodes}
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            return {"t": "namedtuple", "name": type(x).__name__, "fields": list(x._fields),
                    "v": [self.node(v, f"{path}/{f}") for f, v in zip(x._fields, x)]}
        if isinstance(x, (list, tuple)):
            return {"t": type(x).__name__,
                    "v": [self.node(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(x)]}
        raise TypeError(
            f"cannot store a {type(x).__name__} at {path!r}: checkpoints hold dicts, lists, "
            "tuples, arrays, scalars and distq's compressed leaves")


def _as_mapping(x):
    if isinstance(x, dict):
        return x
    try:
        from flax import nnx
        from flax.core import FrozenDict
    except ImportError:  # pragma: no cover
        return None
    if isinstance(x, FrozenDict):
        return dict(x)
    if isinstance(x, nnx.State):
        return x.to_pure_dict()
    return None


def _digest(index: dict, tree: str, leaves: str, data_chunks) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(index, sort_keys=True, separators=(",", ":")).encode())
    h.update(tree.encode())
    h.update(leaves.encode())
    for c in data_chunks:
        h.update(c)
    return h.hexdigest()


def _report_json(report: TreeReport | None) -> str:
    if report is None:
        return "[]"
    return json.dumps([{"path": r.path, "spec": spec_str(r.spec), "shape": list(r.shape),
                        "dtype": r.dtype, "bytes_before": r.bytes_before,
                        "bytes_after": r.bytes_after, "rel_error": r.rel_error, "note": r.note}
                       for r in report.leaves])


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Calls ``write(f)`` on a temporary file beside ``path``, then fsyncs and renames it over
    ``path`` (and fsyncs the folder): readers see the old file or the new one, never a part."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover (platforms without directory fsync)
        pass


def save(path: str | os.PathLike, tree: Any, *, report: TreeReport | None = None,
         metadata: dict[str, str] | None = None) -> int:
    """Writes a (quantised) tree to ``path`` atomically; returns the file size in bytes.

    Args:
      path: the file to write (conventionally ``*.distq`` or ``*.safetensors``); replaced
        atomically if it exists; its folder must exist.
      tree: dicts (str or int keys), lists, tuples, named tuples, ``None``, scalars, arrays,
        QArray / PQArray / CastArray leaves; Flax ``FrozenDict`` and ``nnx.State`` are stored as
        plain dicts.
      report: the :class:`distq.tree.TreeReport` of :func:`distq.quantize_tree`, stored so that
        ``distq info`` can show each leaf's spec and error.
      metadata: extra ``str -> str`` pairs kept in the header (``info(path)["user"]``).

    Examples:
      >>> import os, tempfile, jax, distq
      >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 32))}
      >>> q, _ = distq.quantize_tree(params, distq.Scalar(bits=4))
      >>> f = os.path.join(tempfile.mkdtemp(), "model.distq")
      >>> size = distq.save(f, q)
      >>> r = distq.load(f)
      >>> bool((r["w"].codes == q["w"].codes).all())
      True
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"path {path!r} is a directory; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"folder {folder!r} of path does not exist")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str)
                                        for k, v in metadata.items()):
        raise TypeError("metadata must map str to str")
    w = _Writer()
    tree_json = json.dumps(w.node(tree, ""), separators=(",", ":"))
    leaves_json = _report_json(report)
    index, offset, chunks = {}, 0, []
    for name, arr in w.tensors.items():
        b = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        index[name] = {"dtype": _CODES[arr.dtype], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        chunks.append(b)
    meta = {"format": FORMAT, "version": VERSION, "tree": tree_json, "leaves": leaves_json,
            "user": json.dumps(metadata or {}),
            "sha256": _digest(index, tree_json, leaves_json, chunks)}
    header = json.dumps({**index, "__metadata__": meta}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for c in chunks:
            f.write(c)

    atomic_write(path, write)
    return 8 + len(header) + offset


# ------------------------------------------------------------------------------------ reading
def _read(path) -> tuple[dict, memoryview, int]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise CheckpointError(f"{path!r} is truncated or not a checkpoint ({len(raw)} bytes)")
    (hlen,) = struct.unpack("<Q", raw[:8])
    if hlen > min(_MAX_HEADER, len(raw) - 8):
        raise CheckpointError(
            f"{path!r} is truncated or not a safetensors/distq checkpoint (header length {hlen} "
            f"but the file has {len(raw)} bytes)")
    try:
        header = json.loads(raw[8:8 + hlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path!r}: header is not valid JSON ({e.__class__.__name__}); "
                              "the file is corrupt or not a checkpoint") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path!r}: header is not a JSON object")
    data = memoryview(raw)[8 + hlen:]
    return header, data, len(raw)


def _tensors(header: dict, data: memoryview, path) -> dict:
    index = {k: v for k, v in header.items() if k != "__metadata__"}
    end = 0
    for name, e in index.items():
        try:
            dt = _DTYPES[e["dtype"]]
            shape = [int(s) for s in e["shape"]]
            a, b = (int(o) for o in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path!r}: bad index entry for tensor {name!r}") from None
        if min(shape, default=0) < 0 or not 0 <= a <= b or b - a != dt.itemsize * int(
                np.prod(shape)):
            raise CheckpointError(f"{path!r}: tensor {name!r} has inconsistent shape/offsets")
        end = max(end, b)
    if end != len(data):
        raise CheckpointError(
            f"{path!r} is truncated or has trailing bytes: the index needs {end} data bytes, the "
            f"file holds {len(data)}")
    return index


def _array(data: memoryview, e: dict) -> np.ndarray:
    a, b = e["data_offsets"]
    dt = _DTYPES[e["dtype"]].newbyteorder("<")
    return np.frombuffer(data[a:b], dtype=dt).reshape(e["shape"]).astype(dt.newbyteorder("="))


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads any safetensors file (e.g. a Hugging Face model) into ``{name: numpy array}``.

    Offsets and lengths are checked (a truncated file raises :class:`CheckpointError`); no
    checksum exists in plain safetensors files.
    """
    header, data, _ = _read(path)
    index = _tensors(header, data, path)
    return {name: _array(data, e) for name, e in index.items()}


def _meta(header: dict, path) -> dict:
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path!r} is not a distq checkpoint (no distq metadata); for a plain safetensors "
            "file use distq.checkpoint.read_safetensors")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path!r}: unsupported distq checkpoint version "
                              f"{meta.get('version')!r} (this distq reads {VERSION})")
    return meta


def info(path: str | os.PathLike) -> dict:
    """The checkpoint's description without decoding it: tree, per-leaf report, user metadata,
    tensor index and file size (the digest is verified)."""
    header, data, size = _read(path)
    meta = _meta(header, path)
    index = _tensors(header, data, path)
    _verify(meta, index, data, path)
    return {"tree": json.loads(meta["tree"]), "leaves": json.loads(meta.get("leaves", "[]")),
            "user": json.loads(meta.get("user", "{}")), "tensors": index, "file_bytes": size}


def _verify(meta: dict, index: dict, data: memoryview, path) -> None:
    ordered = sorted(index.items(), key=lambda kv: kv[1]["data_offsets"][0])
    chunks = (data[e["data_offsets"][0]:e["data_offsets"][1]] for _, e in ordered)
    got = _digest(index, meta.get("tree", ""), meta.get("leaves", "[]"), chunks)
    if got != meta.get("sha256"):
        raise CheckpointError(
            f"{path!r}: checksum mismatch; the file was altered or corrupted after it was saved")


def load(path: str | os.PathLike, *, as_numpy: bool = False) -> Any:
    """Reads a checkpoint written by :func:`save`, verifying it; returns the tree.

    Dicts come back as ``dict`` (Flax ``FrozenDict`` and ``nnx.State`` were stored as plain
    dicts; use ``nnx.replace_by_pure_dict`` for the latter), named tuples as dicts of their
    fields. Arrays are ``jax.Array`` (or NumPy with ``as_numpy=True``).

    Raises:
      FileNotFoundError: no such file.
      CheckpointError (a ``ValueError``): truncated, altered or foreign file.
    """
    header, data, _ = _read(path)
    meta = _meta(header, path)
    index = _tensors(header, data, path)
    _verify(meta, index, data, path)
    conv = (lambda a: a) if as_numpy else jnp.asarray

    def arr(ref):
        if ref not in index:
            raise CheckpointError(f"{path!r}: tree refers to a missing tensor {ref!r}")
        return _array(data, index[ref])

    def build(n):
        t = n.get("t") if isinstance(n, dict) else None
        if t == "none":
            return None
        if t == "array":
            return conv(arr(n["ref"]))
        if t == "scalar":
            return n["v"]
        if t in _LEAF_TYPES:
            cls, _ = _LEAF_TYPES[t]
            arrays = {f: arr(ref) for f, ref in n["arrays"].items()}
            try:
                return cls.from_arrays(arrays, n["meta"])
            except ValueError as e:
                raise CheckpointError(f"{path!r}: {e}") from None
        if t == "dict":
            return {(int(k) if kt == "int" else str(k)): build(v)
                    for (kt, k), v in zip(n["k"], n["v"])}
        if t == "namedtuple":
            return {f: build(v) for f, v in zip(n["fields"], n["v"])}
        if t in ("list", "tuple"):
            items = [build(v) for v in n["v"]]
            return items if t == "list" else tuple(items)
        raise CheckpointError(f"{path!r}: unknown tree node {str(n)[:80]!r}")

    try:
        return build(json.loads(meta["tree"]))
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path!r}: corrupt tree description ({e!r})") from None
