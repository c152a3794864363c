"""Quantised checkpoints: ``distq.save`` / ``distq.load``.

A checkpoint is one file in the `safetensors <https://huggingface.co/docs/safetensors>`_ layout
(8-byte little-endian header length, a JSON header, then the raw little-endian tensor bytes), so
any safetensors reader can list and read its tensors. distq adds, in the header's
``__metadata__`` (all values are strings, as safetensors requires):

* ``format`` (``"distq"``) and ``version``;
* ``tree``: the JSON description of the tree (dicts, lists, tuples, ``None``, scalars, arrays,
  typed PRNG keys and the quantised leaves of every type registered in
  :mod:`distq.core.spec` with their static metadata), enough to rebuild each leaf without the
  original model or spec;
* ``leaves``: the per-leaf report (spec, sizes, error) when saved with ``report=``;
* ``user``: the caller's ``str -> str`` metadata;
* ``sha256``: a digest of the tensor index, every other metadata entry and every data byte.

Files are written atomically (a temporary file in the same folder, flushed and fsynced, then
renamed over the target), so an interrupted save never leaves a half-written checkpoint and never
damages an existing one. Loading checks the length, the header, the offsets and the digest, then
validates the structure and rebuilds each leaf with validation: a truncated, altered or foreign
file raises :class:`CheckpointError` instead of producing a wrong model. The digest proves
integrity (no accidental damage), not authenticity: anyone can write a file with a valid digest,
so everything after it is validated as untrusted input. Codes and dense arrays load
bit-identical.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import reprlib
import secrets
import stat
import struct
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .core import spec as _spec

FORMAT = "distq"
VERSION = "2"
#: versions this module reads; version 1's digest did not cover the ``user`` metadata
_READABLE = ("1", "2")

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in _DTYPES.items()}
#: the safetensors header's own key; no tensor may take this name
_RESERVED = "__metadata__"
#: largest header read or written, and largest number of JSON containers and separators (``{``,
#: ``[``, ``,``) in it, counted before parsing. A quantised leaf costs ~1 KB of header and ~60
#: such items (index entries, tree node, report row), so the limits hold ~30,000 leaves (a 1 GB
#: model has ~1,000); a parsed item costs up to ~130 bytes of Python objects, so a hostile
#: header claims at most ~300 MB while parsing instead of GBs.
_MAX_HEADER = 64 << 20
_MAX_JSON_ITEMS = 2_000_000
#: deepest tree (dicts/lists nested in each other) saved or loaded; real trees are < 20 deep, and
#: the JSON of a tree is twice as deep, within Python's recursion limit
_MAX_DEPTH = 100
#: a leftover temporary file of an interrupted save is removed after this many seconds (or at
#: once when the process that created it no longer runs)
_STALE_AFTER_S = 3600.0
_CODE_CHUNK = 1 << 18  # rows of code words checked at once on load (bounded memory)


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, altered, malformed, or not a distq checkpoint."""


def _json_size_ok(text: bytes | str) -> bool:
    if isinstance(text, str):
        return text.count("{") + text.count("[") + text.count(",") <= _MAX_JSON_ITEMS
    return text.count(b"{") + text.count(b"[") + text.count(b",") <= _MAX_JSON_ITEMS


def _canon(x: Any) -> bytes:
    return json.dumps(x, sort_keys=True, separators=(",", ":")).encode()


def _digest(index: dict, meta: dict, data_chunks, version: str = VERSION) -> str:
    """SHA-256 of the tensor index, the metadata (without ``sha256``) and the data bytes."""
    h = hashlib.sha256()
    h.update(_canon(index))
    if version == "1":  # tree and report only
        for key, default in (("tree", ""), ("leaves", "[]")):
            h.update(meta.get(key, default).encode("utf-8", "surrogatepass"))
    else:
        h.update(_canon({k: v for k, v in meta.items() if k != "sha256"}))
    for c in data_chunks:
        h.update(c)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ writing
def _is_key_array(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


class _Writer:
    """Turns a tree into JSON nodes, collecting its arrays as named tensors."""

    def __init__(self):
        self.tensors: dict[str, np.ndarray] = {}

    def add(self, name: str, a: Any) -> str:
        arr = np.asarray(a)
        if arr.dtype not in _CODES:
            raise TypeError(f"cannot store {name!r}: dtype {arr.dtype} is not supported "
                            f"(supported: {', '.join(str(d) for d in _CODES)})")
        base, i = name, 1
        while name in self.tensors or name == _RESERVED:
            name, i = f"{base}#{i}", i + 1
        self.tensors[name] = np.asarray(arr, order="C")  # keeps 0-d arrays 0-d
        return name

    def node(self, x: Any, path: str, depth: int = 0) -> dict:
        if depth > _MAX_DEPTH:
            raise ValueError(f"cannot store the tree: it is nested deeper than {_MAX_DEPTH} "
                             f"levels at {path!r} (a container that holds itself?)")
        if x is None:
            return {"t": "none"}
        if isinstance(x, _spec.leaf_types()):
            arrays = {}
            for f in type(x).array_fields:
                if getattr(x, f) is not None:
                    arrays[f] = self.add(f"{path}:{f}", getattr(x, f))
            return {"t": type(x).kind, "meta": x.metadata(), "arrays": arrays}
        if _is_key_array(x):
            return {"t": "key", "impl": str(jax.random.key_impl(x)),
                    "ref": self.add(path or "key", jax.random.key_data(x))}
        if isinstance(x, (jax.Array, np.ndarray)):
            return {"t": "array", "ref": self.add(path or "value", x)}
        if isinstance(x, np.generic):
            return {"t": "npscalar", "ref": self.add(path or "value", np.asarray(x))}
        if isinstance(x, (bool, int, float, str)):
            return {"t": "scalar", "v": x, "py": type(x).__name__}
        state = _as_mapping(x)
        if state is not None:
            keys, nodes = [], []
            for k, v in state.items():
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise TypeError(f"cannot store key {k!r} at {path!r}: keys must be str or int")
                keys.append([type(k).__name__, k])
                nodes.append(self.node(v, f"{path}/{k}" if path else str(k), depth + 1))
            return {"t": "dict", "k": keys, "v": nodes}
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            nodes = []
            for f, v in zip(x._fields, x):
                nodes.append(self.node(v, f"{path}/{f}" if path else f, depth + 1))
            return {"t": "namedtuple", "name": type(x).__name__, "fields": list(x._fields),
                    "v": nodes}
        if isinstance(x, (list, tuple)):
            nodes = []
            for i, v in enumerate(x):
                nodes.append(self.node(v, f"{path}/{i}" if path else str(i), depth + 1))
            return {"t": type(x).__name__, "v": nodes}
        raise TypeError(
            f"cannot store a {type(x).__name__} at {path!r}: checkpoints hold dicts, lists, "
            "tuples, arrays, PRNG keys, scalars and distq's quantised leaves")


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
        to_pure = getattr(nnx, "to_pure_dict", None)  # State.to_pure_dict is deprecated
        return to_pure(x) if to_pure is not None else x.to_pure_dict()
    return None


def _report_rows(report: Any) -> list[dict]:
    """The rows of a report: anything with ``.leaves`` whose items have the fields of
    :class:`distq.tree.LeafReport` (``path``, ``spec``, ``shape``, ``dtype``, ``bytes_before``,
    ``bytes_after``, ``rel_error``, ``note``)."""
    if report is None:
        return []
    leaves = getattr(report, "leaves", None)
    if leaves is None or isinstance(report, (str, bytes)):
        raise TypeError(f"report must be None or the report of distq.quantize_tree (an object "
                        f"with .leaves), got {type(report).__name__}")
    rows = []
    for i, r in enumerate(leaves):
        try:
            spec = r.spec if isinstance(r.spec, str) else _spec.spec_str(r.spec)
            rows.append({
                "path": str(r.path), "spec": spec, "shape": [int(s) for s in r.shape],
                "dtype": str(r.dtype), "bytes_before": None if r.bytes_before is None
                else int(r.bytes_before), "bytes_after": int(r.bytes_after),
                "rel_error": None if r.rel_error is None else float(r.rel_error),
                "note": str(r.note)})
        except (AttributeError, TypeError, ValueError) as e:
            raise TypeError(f"report.leaves[{i}] is not a leaf report row ({e}); rows need "
                            "path, spec, shape, dtype, bytes_before, bytes_after, rel_error "
                            "and note") from None
    return rows


def _describe(st: os.stat_result) -> str:
    m = st.st_mode
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(m):
            return what
    return "not a regular file"


def _write_target(path: str) -> tuple[str, os.stat_result | None]:
    """The file a write to ``path`` replaces (symbolic links followed) and its stat, if any.

    Raises:
      ValueError: ``path`` is empty, names a folder or anything but a regular file, or its
        folder does not exist.
    """
    if not path:
        raise ValueError("path must name a file, got an empty string")
    if path.endswith(("/", os.sep)):
        raise ValueError(f"path {path!r} ends with a separator; give a file name")
    target = os.path.realpath(path)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise ValueError(f"path {path!r} is a directory; give a file name")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise ValueError(f"path {path!r} is {_describe(st)}; checkpoints are written to (and "
                         "replace) regular files only")
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise ValueError(f"folder {folder!r} of path {path!r} does not exist")
    return target, st


def _temp_prefix(name: str) -> str:
    return f".{name[:200]}."


def _pid_alive(pid: int) -> bool | None:
    """Whether process ``pid`` runs on this machine (``None``: cannot tell)."""
    if os.name != "posix":
        return None  # os.kill would terminate the process on Windows
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):
        return False
    return True


def _remove_stale_temporaries(folder: str, name: str) -> None:
    """Deletes temporary files of earlier saves of ``name`` that were interrupted (their process
    is gone, or they were last written more than an hour ago)."""
    pattern = re.compile(re.escape(_temp_prefix(name)) + r"([0-9]{1,10})\.[0-9a-f]{8}\.tmp")
    now = time.time()
    try:
        entries = os.scandir(folder)
    except OSError:
        return
    with entries:
        for e in entries:
            m = pattern.fullmatch(e.name)
            if m is None:
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            pid = int(m.group(1))
            gone = pid != os.getpid() and _pid_alive(pid) is False
            if gone or now - st.st_mtime > _STALE_AFTER_S:
                try:
                    os.unlink(e.path)
                except OSError:
                    pass


def _create_temp(folder: str, name: str) -> tuple[int, str]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(
        os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(folder, f"{_temp_prefix(name)}{os.getpid()}.{secrets.token_hex(4)}"
                                   ".tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp  # 0o666 & ~umask, like any new file
        except FileExistsError:
            continue


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Writes a file atomically: readers of ``path`` see the old file or the new one, never a
    part.

    ``write(f)`` is called on a binary temporary file ``.NAME.PID.RANDOM.tmp`` beside the
    target, which is then flushed, fsynced and renamed over the target (and the folder fsynced).
    A new file gets the usual permissions (``0o666`` less the umask); a replaced file keeps its
    permission bits. If ``path`` is a symbolic link, the file it points to is replaced and the
    link kept; a replaced file gets a new inode, so its other hard links keep the old content.
    Temporary files left by interrupted writes of the same target (their process gone, or
    untouched for an hour) are removed first.

    Args:
      path: the file to write; its folder must exist.
      write: called once with the open binary file.

    Raises:
      ValueError: ``path`` is empty, a directory, a device, a FIFO or anything else that is
        not a regular file, or its folder does not exist.

    Examples:
      >>> import os, tempfile
      >>> from distq.checkpoint import atomic_write
      >>> folder = tempfile.TemporaryDirectory()
      >>> f = os.path.join(folder.name, "notes.txt")
      >>> atomic_write(f, lambda fh: fh.write(b"first"))
      >>> def fail(fh):
      ...     fh.write(b"half of the sec")
      ...     raise RuntimeError("interrupted")
      >>> atomic_write(f, fail)
      Traceback (most recent call last):
        ...
      RuntimeError: interrupted
      >>> with open(f, "rb") as fh:  # the old file, and no temporary file left
      ...     print(fh.read(), os.listdir(folder.name))
      b'first' ['notes.txt']
      >>> atomic_write(folder.name, lambda fh: None)
      Traceback (most recent call last):
        ...
      ValueError: ...
      >>> folder.cleanup()
    """
    path = os.fspath(path)
    target, st = _write_target(path)
    folder, name = os.path.split(target)
    _remove_stale_temporaries(folder, name)
    fd, tmp = _create_temp(folder, name)
    try:
        if st is not None:
            os.chmod(tmp, stat.S_IMODE(st.st_mode) & 0o777)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover (platforms without directory fsync)
        pass


def save(path: str | os.PathLike, tree: Any, *, report: Any = None,
         metadata: dict[str, str] | None = None) -> int:
    """Writes a (quantised) tree to ``path`` atomically; returns the file size in bytes.

    The file is replaced, never edited in place: a new file is written beside it and renamed
    over it (see :func:`atomic_write`), so a crash leaves the old file or the new one. Hence:

    * ``path`` must be a regular file or not exist; a directory, a device (``/dev/null``), a
      FIFO or a socket is refused with ``ValueError``;
    * a symbolic link is followed: the file it points to is replaced and the link kept;
    * a hard-linked file gets a new inode: ``path`` holds the new checkpoint, its other links
      keep the old content;
    * a new file gets ``0o666`` less the umask; a replaced file keeps its permission bits.

    Args:
      path: the file to write (conventionally ``*.distq`` or ``*.safetensors``); its folder
        must exist.
      tree: dicts (str or int keys), lists, tuples, named tuples, ``None``, Python scalars
        (bool, int, float, str), NumPy scalars, arrays of any dtype safetensors holds (float,
        int, unsigned, bool), typed ``jax.random`` keys, and quantised leaves (QArray, PQArray,
        CastArray, ...); Flax ``FrozenDict`` and ``nnx.State`` are stored as plain dicts (an
        ``nnx.State`` with ``nnx.Rngs`` keys and counts included). At most 100 levels deep.
      report: the report of :func:`distq.quantize_tree` (any object with ``.leaves`` rows of
        path, spec, shape, dtype, bytes_before, bytes_after, rel_error, note), stored so that
        ``distq info`` can show each leaf's spec and error; ``None`` stores none.
      metadata: extra ``str -> str`` pairs kept in the header (``info(path)["user"]``).

    Returns:
      The number of bytes written.

    Raises:
      ValueError: a bad ``path`` (see above), or a tree too deep or too large for one header.
      TypeError: a value, key, ``report`` or ``metadata`` that cannot be stored.

    Examples:
      >>> import os, tempfile, jax, distq
      >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 32))}
      >>> q, _ = distq.quantize_tree(params, distq.Uniform(bits=4))
      >>> folder = tempfile.TemporaryDirectory()
      >>> f = os.path.join(folder.name, "model.distq")
      >>> size = distq.save(f, q)
      >>> size == os.path.getsize(f)
      True
      >>> r = distq.load(f)
      >>> bool((r["w"].codes == q["w"].codes).all())
      True
      >>> folder.cleanup()
    """
    path = os.fspath(path)
    _write_target(path)  # fail before any work
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise TypeError("metadata must be None or a dict mapping str to str")
    leaves_json = json.dumps(_report_rows(report), separators=(",", ":"))
    w = _Writer()
    tree_json = json.dumps(w.node(tree, ""), separators=(",", ":"))
    index, offset, chunks = {}, 0, []
    for name, arr in w.tensors.items():
        b = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        index[name] = {"dtype": _CODES[arr.dtype], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        chunks.append(b)
    meta = {"format": FORMAT, "version": VERSION, "tree": tree_json, "leaves": leaves_json,
            "user": json.dumps(metadata or {}, separators=(",", ":"))}
    meta["sha256"] = _digest(index, meta, chunks)
    header = json.dumps({**index, _RESERVED: meta}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    if len(header) > _MAX_HEADER or not _json_size_ok(header):
        raise ValueError(f"cannot store the tree: its description ({len(header)} bytes, "
                         f"{len(index)} tensors) exceeds a checkpoint header's limits "
                         f"({_MAX_HEADER} bytes, {_MAX_JSON_ITEMS} JSON items); save it in parts")

    def write(f):
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for c in chunks:
            f.write(c)

    atomic_write(path, write)
    return 8 + len(header) + offset


# ------------------------------------------------------------------------------------ reading
def _loads(text: bytes | str, what: str, path: str, *, constants: bool = True) -> Any:
    """Parses untrusted JSON, bounding its memory and nesting; errors are CheckpointErrors."""
    if not _json_size_ok(text):
        raise CheckpointError(f"{path!r}: the {what} has more than {_MAX_JSON_ITEMS} JSON items; "
                              "the file is corrupt or not a distq checkpoint")

    def no_constant(name):
        raise ValueError(f"{name} is not allowed")

    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, parse_constant=None if constants else no_constant)
    except RecursionError:
        raise CheckpointError(f"{path!r}: the {what} is nested too deeply") from None
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path!r}: the {what} is not valid JSON ({e}); the file is "
                              "corrupt or not a checkpoint") from None


def _read(path: str | os.PathLike) -> tuple[dict, memoryview, int]:
    """The parsed header, the data bytes and the file size of a safetensors file."""
    path = os.fspath(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)  # non-blocking: opening a FIFO must not wait for a writer
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"checkpoint {path!r} does not exist",
                                path) from None
    except IsADirectoryError:  # pragma: no cover (platforms that cannot open folders)
        raise CheckpointError(f"{path!r} is a directory, not a checkpoint file") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path!r} is {_describe(st)}, not a checkpoint file")
    except BaseException:
        os.close(fd)
        raise
    size = st.st_size
    with os.fdopen(fd, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path!r} is truncated or not a checkpoint "
                                  f"({len(head)} bytes)")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > _MAX_HEADER:
            raise CheckpointError(f"{path!r}: header length {hlen} exceeds the {_MAX_HEADER} "
                                  "bytes a checkpoint header may have; the file is corrupt or "
                                  "not a safetensors/distq checkpoint")
        if hlen > size - 8:
            raise CheckpointError(
                f"{path!r} is truncated or not a safetensors/distq checkpoint (header length "
                f"{hlen} but the file has {size} bytes)")
        raw = f.read(hlen)
        if len(raw) != hlen:
            raise CheckpointError(f"{path!r} is truncated (it changed while being read)")
        if re.match(rb"[ \t\r\n]*\{", raw) is None:
            raise CheckpointError(f"{path!r}: header is not a JSON object; the file is corrupt "
                                  "or not a checkpoint")
        # (a repeated tensor name leaves its first bytes unindexed: _tensors rejects the gap)
        header = _loads(raw, "header", path, constants=False)
        del raw
        data = f.read()
    if not isinstance(header, dict):  # pragma: no cover (ruled out by the first byte)
        raise CheckpointError(f"{path!r}: header is not a JSON object")
    return header, memoryview(data), 8 + hlen + len(data)


def _is_int(x: Any) -> bool:
    return type(x) is int  # not bool, not float


def _short(x: Any) -> str:
    """A bounded ``repr(x)`` for error messages (cheap even for huge values)."""
    r = reprlib.repr(x)
    return r if len(r) <= 80 else r[:77] + "..."


def _tensors(header: dict, nbytes: int, path) -> dict:
    """The validated tensor index: known dtypes, non-negative int shapes, int offsets that
    tile the data section exactly (no overlaps, gaps, or bytes outside)."""
    index = {k: v for k, v in header.items() if k != _RESERVED}
    spans = []
    for name, e in index.items():
        if not isinstance(e, dict):
            raise CheckpointError(f"{path!r}: index entry of tensor {_short(name)} is not an "
                                  "object")
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise CheckpointError(f"{path!r}: tensor {_short(name)} has unknown dtype "
                                  f"{_short(dtype)} "
                                  f"(known: {', '.join(_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise CheckpointError(f"{path!r}: tensor {_short(name)} has a bad shape "
                                  f"{_short(shape)} (a list of non-negative ints)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{path!r}: tensor {_short(name)} has bad data_offsets "
                                  f"{_short(offsets)} (two non-negative ints, begin <= end)")
        a, b = offsets
        if b - a != _DTYPES[dtype].itemsize * math.prod(shape):
            raise CheckpointError(f"{path!r}: tensor {_short(name)} has {b - a} bytes but "
                                  f"shape {_short(shape)} of {dtype} needs "
                                  f"{_DTYPES[dtype].itemsize * math.prod(shape)}")
        spans.append((a, b, name))
    spans.sort()
    end = 0
    for a, b, name in spans:
        if a != end:
            raise CheckpointError(
                f"{path!r}: tensor {_short(name)} starts at byte {a} where {end} was expected "
                f"({'overlapping another tensor' if a < end else 'leaving a gap'})")
        end = b
    if end != nbytes:
        raise CheckpointError(
            f"{path!r} is truncated or has trailing bytes: the index needs {end} data bytes, the "
            f"file holds {nbytes}")
    return index


def _array(data: memoryview, e: dict) -> np.ndarray:
    a, b = e["data_offsets"]
    dt = _DTYPES[e["dtype"]].newbyteorder("<")
    return np.frombuffer(data[a:b], dtype=dt).reshape(e["shape"]).astype(dt.newbyteorder("="))


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads any safetensors file (e.g. a Hugging Face model) into ``{name: numpy array}``.

    Offsets and lengths are checked (a truncated or malformed file raises
    :class:`CheckpointError`); no checksum exists in plain safetensors files.

    Raises:
      FileNotFoundError: no such file.
      CheckpointError: (a ``ValueError``) not a readable safetensors file.

    Examples:
      A distq checkpoint is a safetensors file too: its tensors are the leaves' arrays.

      >>> import os, tempfile, jax.numpy as jnp, distq
      >>> from distq.checkpoint import read_safetensors
      >>> folder = tempfile.TemporaryDirectory()
      >>> f = os.path.join(folder.name, "model.safetensors")
      >>> q, _ = distq.quantize_tree({"w": jnp.ones((64, 32)), "b": jnp.zeros(32)},
      ...                            [("w", distq.Uniform(bits=4)), ("b", None)])
      >>> _ = distq.save(f, q)
      >>> {name: (str(a.dtype), a.shape) for name, a in read_safetensors(f).items()}
      {'b': ('float32', (32,)), 'w:codes': ('uint32', (256,)), 'w:scale': ('float32', (1,))}
      >>> with open(f, "r+b") as fh:
      ...     _ = fh.truncate(100)
      >>> read_safetensors(f)
      Traceback (most recent call last):
        ...
      distq.checkpoint.CheckpointError: '...' is truncated or not a safetensors/distq checkpoint (header length ... but the file has 100 bytes)
      >>> folder.cleanup()
    """
    header, data, _ = _read(path)
    index = _tensors(header, len(data), os.fspath(path))
    return {name: _array(data, e) for name, e in index.items()}


class _Checkpoint:
    """A distq checkpoint whose header, digest and metadata have been validated."""

    def __init__(self, path: str | os.PathLike):
        self.path = path = os.fspath(path)
        self.as_numpy = False
        header, self.data, self.size = _read(path)
        meta = header.get(_RESERVED)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(
                f"{path!r} is not a distq checkpoint (no distq metadata); for a plain "
                "safetensors file use distq.checkpoint.read_safetensors")
        version = meta.get("version")
        if version not in _READABLE:
            raise CheckpointError(f"{path!r}: unsupported distq checkpoint version "
                                  f"{_short(version)} "
                                  f"(this distq reads {', '.join(_READABLE)})")
        for k, v in meta.items():
            if not isinstance(v, str):
                raise CheckpointError(f"{path!r}: metadata entry {_short(k)} is a "
                                      f"{type(v).__name__}, not a string")
        for k in ("tree", "sha256"):
            if k not in meta:
                raise CheckpointError(f"{path!r}: the distq metadata has no {k!r}")
        self.index = _tensors(header, len(self.data), path)
        if _digest(self.index, meta, [self.data], version) != meta["sha256"]:
            raise CheckpointError(
                f"{path!r}: checksum mismatch; the file was altered or corrupted after it was "
                "saved")
        self.tree = _loads(meta["tree"], "tree", path)
        self.leaves = _loads(meta.get("leaves", "[]"), "leaf report", path)
        self.user = _loads(meta.get("user", "{}"), "user metadata", path)
        self._check_report()
        if not isinstance(self.user, dict) or not all(isinstance(v, str)
                                                      for v in self.user.values()):
            raise CheckpointError(f"{path!r}: the user metadata is not a str -> str object")

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path!r}: {what}")

    def _check_report(self) -> None:
        if not isinstance(self.leaves, list):
            raise self.fail("the leaf report is not a list")
        for i, r in enumerate(self.leaves):
            ok = (isinstance(r, dict)
                  and all(isinstance(r.get(k), str) for k in ("path", "spec", "dtype", "note"))
                  and isinstance(r.get("shape"), list)
                  and all(_is_int(s) and s >= 0 for s in r["shape"])
                  and _is_int(r.get("bytes_after")) and r["bytes_after"] >= 0
                  and (r.get("bytes_before") is None or (_is_int(r["bytes_before"])
                                                         and r["bytes_before"] >= 0))
                  and (r.get("rel_error") is None or (type(r["rel_error"]) in (int, float))))
            if not ok:
                raise self.fail(f"row {i} of the leaf report is malformed: {_short(r)}")

    # -------------------------------------------------------------------- tree
    def entry(self, ref: Any, where: str) -> dict:
        """The index entry of tensor ``ref`` (which must exist)."""
        if not isinstance(ref, str) or ref not in self.index:
            raise self.fail(f"{where} refers to a missing tensor {_short(ref)}")
        return self.index[ref]

    def tensor(self, ref: Any, where: str) -> np.ndarray:
        return _array(self.data, self.entry(ref, where))

    def walk(self, n: Any, path: str, build: bool, depth: int = 0) -> Any:
        """Validates the tree node ``n`` at ``path`` (and with ``build`` returns its value)."""
        where = path or "the root"
        if depth > _MAX_DEPTH:
            raise self.fail(f"the tree is nested deeper than {_MAX_DEPTH} levels")
        t = n.get("t") if isinstance(n, dict) else None
        if not isinstance(t, str):
            raise self.fail(f"tree node at {where} is not a node: {_short(n)}")
        if t == "none":
            return None
        if t == "scalar":
            v = n.get("v")
            if type(v) not in (bool, int, float, str) or n.get("py", type(v).__name__) != type(
                    v).__name__:
                raise self.fail(f"bad scalar at {where}: {_short(n)}")
            return v
        if t == "array":
            self.entry(n.get("ref"), where)
            if not build:
                return None
            a = self.tensor(n.get("ref"), where)
            return a if self.as_numpy else jnp.asarray(a)
        if t == "npscalar":
            if self.entry(n.get("ref"), where)["shape"]:
                raise self.fail(f"NumPy scalar at {where} is not 0-dimensional")
            return self.tensor(n.get("ref"), where)[()] if build else None
        if t == "key":
            return self.key(n, where, build)
        if t in ("dict", "namedtuple", "list", "tuple"):
            return self.container(n, t, path, build, depth)
        cls = _spec.leaf_class(t)
        if cls is None:
            raise self.fail(f"unknown tree node type {_short(t)} at {where} (known leaf types: "
                            f"{', '.join(c.kind for c in _spec.leaf_types())})")
        return self.leaf(cls, n, where, build)

    def key(self, n: dict, where: str, build: bool) -> Any:
        ref, impl = n.get("ref"), n.get("impl")
        self.entry(ref, where)
        if not isinstance(impl, str):
            raise self.fail(f"PRNG key at {where} names no implementation")
        if not build:
            return None
        try:
            return jax.random.wrap_key_data(jnp.asarray(self.tensor(ref, where)), impl=impl)
        except (TypeError, ValueError) as e:
            raise self.fail(f"bad PRNG key at {where}: {e}") from None

    def container(self, n: dict, t: str, path: str, build: bool, depth: int) -> Any:
        where = path or "the root"
        values = n.get("v")
        if not isinstance(values, list):
            raise self.fail(f"{t} node at {where} has no value list")
        if t == "dict":
            keys = n.get("k")
            if not isinstance(keys, list) or len(keys) != len(values):
                raise self.fail(f"dict node at {where} has {len(values)} values but keys "
                                f"{_short(keys)}")
            names = []
            for k in keys:
                ok = (isinstance(k, list) and len(k) == 2
                      and ((k[0] == "str" and isinstance(k[1], str))
                           or (k[0] == "int" and _is_int(k[1]))))
                if not ok:
                    raise self.fail(f"bad dict key {_short(k)} at {where}")
                names.append(k[1])
            if len(set(names)) != len(names):
                raise self.fail(f"dict node at {where} repeats a key")
        elif t == "namedtuple":
            names = n.get("fields")
            if (not isinstance(names, list) or len(names) != len(values)
                    or not all(isinstance(f, str) for f in names)
                    or len(set(names)) != len(names)):
                raise self.fail(f"namedtuple node at {where} has bad fields")
        else:
            names = list(range(len(values)))
        out = []
        for name, v in zip(names, values):
            out.append(self.walk(v, f"{path}/{name}" if path else str(name), build, depth + 1))
        if t in ("dict", "namedtuple"):
            return dict(zip(names, out))
        return out if t == "list" else tuple(out)

    def leaf(self, cls: type, n: dict, where: str, build: bool) -> Any:
        meta, refs = n.get("meta"), n.get("arrays")
        if not isinstance(meta, dict) or not isinstance(refs, dict):
            raise self.fail(f"{cls.kind} at {where} lacks its metadata or arrays")
        unknown = set(refs) - set(cls.array_fields)
        if unknown:
            raise self.fail(f"{cls.kind} at {where} has unknown arrays {_short(sorted(unknown))} "
                            f"(allowed: {', '.join(cls.array_fields)})")
        for ref in refs.values():
            self.entry(ref, where)
        if not build:
            return None
        arrays = {f: self.tensor(ref, where) for f, ref in refs.items()}
        try:  # untrusted metadata: any failure to rebuild means a corrupt file
            leaf = cls.from_arrays(arrays, meta)
        except Exception as e:  # noqa: BLE001
            raise self.fail(f"corrupt {cls.kind} at {where}: {e}") from e
        _check_code_range(leaf, arrays, where, self.fail)
        return leaf

    def build(self, as_numpy: bool) -> Any:
        self.as_numpy = as_numpy
        return self.walk(self.tree, "", True)

    def check(self) -> None:
        self.as_numpy = True
        self.walk(self.tree, "", False)


def _max_code(words: np.ndarray, bits: int, count: int) -> int:
    """The largest of the first ``count`` codes in a dense stream of ``bits``-bit codes
    (:func:`distq.core.bitpack.pack`'s layout: code ``i`` at stream bits ``[i*bits, (i+1)*bits)``,
    stream bit ``b`` is bit ``b % 32`` of word ``b // 32``), in bounded memory."""
    words = np.asarray(words, dtype=np.uint32).reshape(-1)
    g = math.gcd(bits, 32)
    per, q = 32 // g, bits // g  # a period of `per` codes fills `q` words exactly
    periods = count // per
    mask = np.uint32((1 << bits) - 1)
    rows = words[:periods * q].reshape(periods, q)
    top = 0
    for r0 in range(0, periods, _CODE_CHUNK):
        blk = rows[r0:r0 + _CODE_CHUNK]
        for j in range(per):
            w, s = divmod(j * bits, 32)
            v = blk[:, w] >> np.uint32(s)
            if s + bits > 32:
                v = v | (blk[:, w + 1] << np.uint32(32 - s))
            top = max(top, int((v & mask).max()))
    rest = words[periods * q:].astype(np.uint64)
    for i in range(count - periods * per):  # < 32 codes
        w, s = divmod(i * bits, 32)
        lo = int(rest[w]) if w < len(rest) else 0
        hi = int(rest[w + 1]) if w + 1 < len(rest) else 0
        top = max(top, ((lo | (hi << 32)) >> s) & int(mask))
    return top


def _check_code_range(leaf: Any, arrays: dict, where: str, fail) -> None:
    """Rejects codes that index past the levels.

    Applies to leaves whose ``codes`` array is one stream of ``prod(shape)`` codes of ``bits``
    bits for ``n < 2**bits`` levels (QArray's contract): decoding would read past the codebook
    (JAX clamps such reads silently) or past the grid.
    """
    n, bits, codes = getattr(leaf, "n", None), getattr(leaf, "bits", None), arrays.get("codes")
    if codes is None or not _is_int(n) or not _is_int(bits) or not 1 <= bits <= 32:
        return
    count = math.prod(getattr(leaf, "shape", ()))
    if n >= 1 << bits or count == 0:
        return
    if codes.dtype != np.uint32 or codes.ndim != 1 or codes.size * 32 < count * bits:
        return  # not one stream of this leaf's codes: the contract does not apply
    top = _max_code(codes, bits, count)
    if top >= n:
        raise fail(f"{leaf.kind} at {where} has code {top}, beyond its {n} levels")


def info(path: str | os.PathLike) -> dict:
    """The checkpoint's description without decoding its arrays (the digest and the tree's
    structure are verified).

    Returns:
      ``{"tree": JSON tree description, "leaves": per-leaf report rows, "user": user metadata,
      "tensors": tensor index, "file_bytes": file size}``.

    Raises:
      FileNotFoundError: no such file.
      CheckpointError: (a ``ValueError``) a truncated, altered, malformed or foreign file.

    Examples:
      >>> import os, tempfile, jax, jax.numpy as jnp, distq
      >>> from distq.checkpoint import info
      >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 32)), "b": jnp.zeros(32)}
      >>> q, report = distq.quantize_tree(params, [("w", distq.Uniform(bits=4)), ("b", None)])
      >>> folder = tempfile.TemporaryDirectory()
      >>> f = os.path.join(folder.name, "model.distq")
      >>> size = distq.save(f, q, report=report, metadata={"model": "toy"})
      >>> d = info(f)
      >>> sorted(d), d["user"], d["file_bytes"] == size
      (['file_bytes', 'leaves', 'tensors', 'tree', 'user'], {'model': 'toy'}, True)
      >>> [(r["path"], r["spec"], r["bytes_after"]) for r in d["leaves"]]
      [('b', 'none', 128), ('w', 'int:4', 1028)]
      >>> d["tensors"]["w:codes"]["shape"]  # 2048 4-bit codes in 256 uint32 words
      [256]
      >>> folder.cleanup()
    """
    c = _Checkpoint(path)
    c.check()
    return {"tree": c.tree, "leaves": c.leaves, "user": c.user, "tensors": c.index,
            "file_bytes": c.size}


def load(path: str | os.PathLike, *, as_numpy: bool = False) -> Any:
    """Reads a checkpoint written by :func:`save`, verifying it; returns the tree.

    Dicts come back as ``dict`` (Flax ``FrozenDict`` and ``nnx.State`` were stored as plain
    dicts; use ``nnx.replace_by_pure_dict`` for the latter), named tuples as dicts of their
    fields. Arrays are ``jax.Array`` (or NumPy with ``as_numpy=True``); PRNG keys are typed
    ``jax.random`` keys either way, NumPy scalars come back as NumPy scalars of their dtype.

    Raises:
      FileNotFoundError: no such file.
      CheckpointError: (a ``ValueError``) a truncated, altered, malformed or foreign file, or a
        path that is a directory, FIFO or device.

    Examples:
      >>> import os, tempfile, jax, jax.numpy as jnp, numpy as np, distq
      >>> tree = {"q": distq.quantize(jnp.ones((8, 8)), distq.NF4()), "key": jax.random.key(1),
      ...         "step": np.int32(7), "layers": [jnp.zeros(2), None]}
      >>> folder = tempfile.TemporaryDirectory()
      >>> f = os.path.join(folder.name, "state.distq")
      >>> _ = distq.save(f, tree)
      >>> back = distq.load(f, as_numpy=True)
      >>> type(back["q"]).__name__, back["step"].dtype, type(back["layers"][0]).__name__
      ('QArray', dtype('int32'), 'ndarray')
      >>> bool((jax.random.key_data(back["key"]) == jax.random.key_data(tree["key"])).all())
      True
      >>> with open(f, "r+b") as fh:  # flip one data byte
      ...     _ = fh.seek(-1, os.SEEK_END); b = fh.read(1); _ = fh.seek(-1, os.SEEK_END)
      ...     _ = fh.write(bytes([b[0] ^ 1]))
      >>> distq.load(f)
      Traceback (most recent call last):
        ...
      distq.checkpoint.CheckpointError: '...': checksum mismatch; the file was altered or corrupted after it was saved
      >>> folder.cleanup()
    """
    return _Checkpoint(path).build(as_numpy)
