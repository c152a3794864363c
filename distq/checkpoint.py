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
* ``sha256``: a digest of the tensor index, every other metadata entry and every data byte
  (from version 3: of the index, the metadata and the SHA-256 of the data section, which a
  writer computes as it writes the data, leaf by leaf).

With ``entropy_coded=True`` (:func:`save`, :class:`Writer`) the packed codes of quantised leaves
are stored entropy-coded (interleaved rANS, :mod:`distq.core.entropy`) wherever that is smaller:
such an array is a ``U8`` tensor holding the coded stream, and the leaf's tree node records
``"coded": {field: {"coder": "rans", "bits": ..., "dtype": "U32", "shape": [...]}}``; loading
decodes it bit for bit. :class:`Writer` writes a checkpoint leaf by leaf (the data goes to a
spool file as it comes, then behind the header), and ``load(path, lazy=True)`` reads one leaf at
a time (:class:`LazyCheckpoint`); :func:`open_safetensors` reads a safetensors file, a sharded
Hugging Face checkpoint (``model.safetensors.index.json``) or a folder holding one, tensor by
tensor, memory-mapped.

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
import functools
import hashlib
import json
import math
import mmap
import os
import re
import reprlib
import secrets
import stat
import struct
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from . import multihost
from .core import bitpack
from .core import entropy
from .core import spec as _spec

FORMAT = "distq"
VERSION = "3"
#: versions this module reads; version 1's digest did not cover the ``user`` metadata, and
#: versions 1 and 2 hashed the data bytes after the header instead of the data's own SHA-256
_READABLE = ("1", "2", "3")

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
#: an entropy-coded tensor decodes to at most this many times its bytes (plus 16 MiB)
_MAX_EXPANSION = 1024
_READ_CHUNK = 16 << 20  # bytes hashed at once when verifying a file without reading it whole


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, altered, malformed, or not a distq checkpoint."""


def _json_size_ok(text: bytes | str) -> bool:
    if isinstance(text, str):
        return text.count("{") + text.count("[") + text.count(",") <= _MAX_JSON_ITEMS
    return text.count(b"{") + text.count(b"[") + text.count(b",") <= _MAX_JSON_ITEMS


def _canon(x: Any) -> bytes:
    return json.dumps(x, sort_keys=True, separators=(",", ":")).encode()


def _digest(index: dict, meta: dict, data_chunks, version: str = VERSION) -> str:
    """SHA-256 of the tensor index, the metadata (without ``sha256``) and the data bytes
    (``data_chunks``: any iterable of byte buffers, e.g. a file read in chunks)."""
    if version not in ("1", "2"):
        inner = hashlib.sha256()
        for c in data_chunks:
            inner.update(c)
        return _digest_of(index, meta, inner.digest())
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


def _digest_of(index: dict, meta: dict, data_sha256: bytes) -> str:
    """The version-3 digest: SHA-256 of the tensor index, the metadata (without ``sha256``) and
    the SHA-256 of the data section, which a writer computes while it writes the data."""
    h = hashlib.sha256()
    h.update(_canon(index))
    h.update(_canon({k: v for k, v in meta.items() if k != "sha256"}))
    h.update(data_sha256)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ writing
def _is_key_array(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _le_buffer(arr: np.ndarray) -> memoryview:
    """The bytes of ``arr`` in C order, little-endian, without a copy where it already is."""
    a = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
    return memoryview(a.reshape(-1).view(np.uint8))


class _Sink:
    """Where a writer's tensors go, in order, hashed as they arrive (the data's SHA-256 of a
    version-3 digest): held in memory (``spool=None``; the buffers are the arrays' own bytes,
    not copies) or appended to a spool file at once (streaming)."""

    def __init__(self, spool: Any = None):
        self.index: dict[str, dict] = {}
        self.offset = 0
        self.hash = hashlib.sha256()
        self.spool = spool
        self.chunks: list[memoryview] = []

    def put(self, name: str, code: str, shape, buf: memoryview) -> None:
        n = buf.nbytes
        self.index[name] = {"dtype": code, "shape": [int(d) for d in shape],
                            "data_offsets": [self.offset, self.offset + n]}
        self.offset += n
        self.hash.update(buf)
        if self.spool is None:
            self.chunks.append(buf)
        else:
            self.spool.write(buf)

    def copy_to(self, f) -> None:
        """Writes the data section to the open file ``f``."""
        if self.spool is None:
            for c in self.chunks:
                f.write(c)
            return
        self.spool.flush()
        f.flush()
        src, dst, left, pos = self.spool.fileno(), f.fileno(), self.offset, 0
        copy_range = getattr(os, "copy_file_range", None)
        while left and copy_range is not None:  # in the kernel, no user-space buffer
            try:
                n = copy_range(src, dst, min(left, 1 << 30), pos)
            except OSError:  # e.g. across file systems on old kernels: copy by hand
                break
            if n <= 0:
                break
            pos, left = pos + n, left - n
        self.spool.seek(pos)
        f.seek(0, os.SEEK_END)
        while left:
            chunk = self.spool.read(min(left, 16 << 20))
            if not chunk:
                raise OSError(f"the spool file ended {left} bytes early")
            f.write(chunk)
            left -= len(chunk)


class _Writer:
    """Turns a tree into JSON nodes; its arrays become named tensors, written to ``sink`` as
    they are met (or collected in ``tensors`` without a sink)."""

    def __init__(self, keep_global: bool = False, sink: _Sink | None = None,
                 entropy_coded: bool = False):
        self.tensors: dict[str, Any] = {}
        self.names: set[str] = set()
        self.keep_global = keep_global  # keep arrays that span processes (orbax writes them)
        self.sink = sink
        self.entropy_coded = entropy_coded

    def _name(self, name: str) -> str:
        base, i = name, 1
        while name in self.names or name == _RESERVED:
            name, i = f"{base}#{i}", i + 1
        self.names.add(name)
        return name

    def add(self, name: str, a: Any) -> str:
        spread = self.keep_global and isinstance(a, jax.Array) and not a.is_fully_addressable
        arr = a if spread else np.asarray(a)
        if arr.dtype not in _CODES:
            raise TypeError(f"cannot store {name!r}: dtype {arr.dtype} is not supported "
                            f"(supported: {', '.join(str(d) for d in _CODES)})")
        name = self._name(name)
        if self.sink is not None:
            self.sink.put(name, _CODES[arr.dtype], arr.shape, _le_buffer(arr))
        else:
            self.tensors[name] = arr if spread else np.asarray(arr, order="C")  # 0-d stays 0-d
        return name

    def add_coded(self, name: str, a: Any, bits: int | None) -> tuple[str, dict] | None:
        """Stores ``a`` (packed codes of ``bits`` bits) entropy-coded if that is smaller (and
        within what a reader accepts); returns its tensor name and ``coded`` entry, or ``None``
        (nothing stored)."""
        if bits is None or self.sink is None:
            return None
        arr = np.asarray(a)
        if arr.dtype != np.uint32 or arr.size == 0:
            return None
        limit = arr.nbytes - 1  # must save at least a byte...
        try:
            blob = entropy.encode_words(arr, bits, max_bytes=limit)
        except ValueError:  # e.g. more distinct codes than a frequency table holds
            return None
        if blob is None or arr.nbytes > _max_decoded(len(blob)):  # ...and not be a bomb
            return None
        name = self._name(name)
        self.sink.put(name, "U8", [len(blob)], memoryview(blob))
        return name, {"coder": "rans", "bits": int(bits), "dtype": _CODES[arr.dtype],
                      "shape": [int(d) for d in arr.shape]}

    def node(self, x: Any, path: str, depth: int = 0) -> dict:
        if depth > _MAX_DEPTH:
            raise ValueError(f"cannot store the tree: it is nested deeper than {_MAX_DEPTH} "
                             f"levels at {path!r} (a container that holds itself?)")
        if x is None:
            return {"t": "none"}
        if isinstance(x, _spec.leaf_types()):
            arrays, coded = {}, {}
            streams = code_streams(x) if self.entropy_coded else {}
            for f in type(x).array_fields:
                if getattr(x, f) is None:
                    continue
                done = self.add_coded(f"{path}:{f}", getattr(x, f), streams.get(f))
                if done is not None:
                    arrays[f], coded[f] = done
                else:
                    arrays[f] = self.add(f"{path}:{f}", getattr(x, f))
            out = {"t": type(x).kind, "meta": x.metadata(), "arrays": arrays}
            if coded:
                out["coded"] = coded
            return out
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


def code_streams(leaf: Any) -> dict[str, int]:
    """The array fields of a quantised leaf that hold bit-packed codes, with their widths: what
    ``entropy_coded`` checkpoints code.

    A leaf class may say so itself with a ``code_streams()`` method returning ``{field: bits}``;
    otherwise a ``codes`` field of ``uint32`` words packed at ``leaf.bits`` bits is assumed (the
    contract of :class:`distq.QArray`, :class:`distq.PQArray` and leaves that wrap them). Any
    ``uint32`` array codes losslessly whatever its content; the width only decides how well.

    Examples:
      >>> import jax.numpy as jnp, distq
      >>> from distq.checkpoint import code_streams
      >>> code_streams(distq.quantize(jnp.ones((8, 8)), distq.Uniform(bits=4)))
      {'codes': 4}
      >>> code_streams(distq.quantize(jnp.ones((8, 8)), distq.Cast("bfloat16")))
      {}
    """
    fn = getattr(leaf, "code_streams", None)
    if callable(fn):
        return {str(k): int(v) for k, v in dict(fn()).items()}
    bits = getattr(leaf, "bits", None)
    if "codes" in type(leaf).array_fields and _is_int(bits) and 1 <= bits <= 16:
        return {"codes": bits}
    return {}


def _max_decoded(coded_bytes: int) -> int:
    """The most bytes an entropy-coded tensor of ``coded_bytes`` may decode to: a bound on what
    a hostile file can make a reader allocate (codes whose entropy is below ~0.03 bit per 32
    are stored plain instead)."""
    return _MAX_EXPANSION * coded_bytes + (16 << 20)


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


def _create_temp(folder: str, name: str, access: int = os.O_WRONLY) -> tuple[int, str]:
    flags = access | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(
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
         metadata: dict[str, str] | None = None, layout: str | None = None,
         entropy_coded: bool = False) -> int:
    """Writes a (quantised) tree to ``path`` atomically; returns the file size in bytes.

    The file is replaced, never edited in place: a new file is written beside it and renamed
    over it (see :func:`atomic_write`), so a crash leaves the old file or the new one. Hence:

    * ``path`` must be a regular file or not exist; a directory, a device (``/dev/null``), a
      FIFO or a socket is refused with ``ValueError``;
    * a symbolic link is followed: the file it points to is replaced and the link kept;
    * a hard-linked file gets a new inode: ``path`` holds the new checkpoint, its other links
      keep the old content;
    * a new file gets ``0o666`` less the umask; a replaced file keeps its permission bits.

    In a multi-process run (``jax.process_count() > 1``, or arrays that span other processes'
    devices) every process calls ``save`` alike and ``path`` becomes an orbax checkpoint
    *directory* in which each process writes its own shards (no gather); it replaces only an
    earlier such directory, and the return value is its size on disk. See
    :mod:`distq.multihost`.

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
      entropy_coded: store the packed codes of quantised leaves (see :func:`code_streams`)
        entropy-coded with rANS (:mod:`distq.core.entropy`), each where that is smaller: a
        4-bit Gaussian QArray's codes take ~3.77 bits per value instead of 4. Lossless;
        :func:`load` decodes them (pure NumPy, tens of MB/s). Other arrays are stored as they
        are.
      layout: ``"file"`` (one file), ``"orbax"`` (a directory, see :mod:`distq.multihost`;
        a multi-process job then restores it sharded without reading it whole) or ``None``:
        ``"orbax"`` in a multi-process run, ``"file"`` otherwise.

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
    if multihost.layout(tree, layout) == multihost.LAYOUT:  # an orbax directory, no gather
        if entropy_coded:
            raise ValueError("entropy_coded applies to single-file checkpoints, not to the "
                             "multi-process (orbax) layout")
        return _save_spread(os.fspath(path), tree, report, metadata)
    path = os.fspath(path)
    _write_target(path)  # fail before any work
    _check_metadata(metadata)
    leaves_json = json.dumps(_report_rows(report), separators=(",", ":"))
    w = _Writer(sink=_Sink(), entropy_coded=_check_flag(entropy_coded, "entropy_coded"))
    return _finish(path, w, w.node(tree, ""), leaves_json, metadata)


def _check_metadata(metadata: Any) -> None:
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise TypeError("metadata must be None or a dict mapping str to str")


def _check_flag(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _finish(path: str, w: _Writer, root: dict, leaves_json: str,
            metadata: dict[str, str] | None) -> int:
    """Writes the file: the header (index, tree ``root``, report, user metadata and the digest
    over them and the data's SHA-256), then the data section held by ``w.sink``."""
    sink = w.sink
    meta = {"format": FORMAT, "version": VERSION,
            "tree": json.dumps(root, separators=(",", ":")), "leaves": leaves_json,
            "user": json.dumps(metadata or {}, separators=(",", ":"))}
    meta["sha256"] = _digest_of(sink.index, meta, sink.hash.digest())
    header = json.dumps({**sink.index, _RESERVED: meta}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    if len(header) > _MAX_HEADER or not _json_size_ok(header):
        raise ValueError(f"cannot store the tree: its description ({len(header)} bytes, "
                         f"{len(sink.index)} tensors) exceeds a checkpoint header's limits "
                         f"({_MAX_HEADER} bytes, {_MAX_JSON_ITEMS} JSON items); save it in parts")

    def write(f):
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        sink.copy_to(f)

    atomic_write(path, write)
    return 8 + len(header) + sink.offset


def _discard(f, path: str) -> None:
    f.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Writer:
    """Writes a checkpoint leaf by leaf: its root is a dict, each entry stored when added.

    What :func:`save` does for a whole tree, in bounded memory: every array of an entry is
    written (and hashed) when the entry is added, to a spool file beside ``path`` (named like
    :func:`atomic_write`'s temporary files, so an interrupted run's leftovers are removed by a
    later save), so the caller can drop the entry at once. :meth:`close` adds the header
    (tree, report, metadata, the digest over them and the data's SHA-256) and moves the result
    over ``path`` atomically (leaving the ``with`` block closes it too): until then ``path`` is
    untouched, and leaving the block by an exception (or :meth:`abort`) writes nothing. The file
    equals what :func:`save` writes for the same dict.

    Args:
      path: the file to write; checked at once (see :func:`save`).
      metadata: extra ``str -> str`` pairs kept in the header.
      entropy_coded: store packed codes entropy-coded where smaller (see :func:`save`).

    Examples:
      >>> import os, tempfile, jax, distq
      >>> from distq.checkpoint import Writer
      >>> folder = tempfile.TemporaryDirectory()
      >>> f = os.path.join(folder.name, "model.distq")
      >>> with Writer(f, entropy_coded=True) as w:
      ...     for i in range(3):  # e.g. one leaf of a large model at a time
      ...         x = jax.random.normal(jax.random.key(i), (256, 256))
      ...         w.add(f"layer{i}", distq.quantize(x, distq.Scalar(bits=4)))
      ...     size = w.close()
      >>> size == os.path.getsize(f), sorted(distq.load(f))
      (True, ['layer0', 'layer1', 'layer2'])
      >>> folder.cleanup()
    """

    def __init__(self, path: str | os.PathLike, *, metadata: dict[str, str] | None = None,
                 entropy_coded: bool = False):
        self.path = os.fspath(path)
        target, _ = _write_target(self.path)
        _check_metadata(metadata)
        self.metadata = metadata
        fd, self._spool_path = _create_temp(*os.path.split(target), access=os.O_RDWR)
        self._spool = os.fdopen(fd, "w+b")
        # a writer dropped without close() or abort() still removes its spool file
        self._cleanup = weakref.finalize(self, _discard, self._spool, self._spool_path)
        self._w = _Writer(sink=_Sink(self._spool),
                          entropy_coded=_check_flag(entropy_coded, "entropy_coded"))
        self._keys: list[list] = []
        self._nodes: list[dict] = []
        self._seen: set = set()
        self.closed = False

    @property
    def data_bytes(self) -> int:
        """Bytes of tensor data written so far."""
        return self._w.sink.offset

    def add(self, key: str | int, value: Any) -> None:
        """Stores ``value`` (anything :func:`save` stores: an array, a quantised leaf, a subtree)
        under ``key`` of the root dict; its arrays are written now."""
        if self.closed:
            raise ValueError("this checkpoint writer is closed")
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise TypeError(f"key must be a str or an int, got {key!r}")
        if key in self._seen:
            raise ValueError(f"key {key!r} was already added")
        node = self._w.node(value, str(key), 1)
        self._seen.add(key)
        self._keys.append([type(key).__name__, key])
        self._nodes.append(node)

    def close(self, report: Any = None) -> int:
        """Writes the header and moves the file into place; returns its size in bytes.

        Args:
          report: as in :func:`save` (rows for the entries added, by their paths).
        """
        if self.closed:
            raise ValueError("this checkpoint writer is closed")
        try:
            leaves_json = json.dumps(_report_rows(report), separators=(",", ":"))
            root = {"t": "dict", "k": self._keys, "v": self._nodes}
            return _finish(self.path, self._w, root, leaves_json, self.metadata)
        finally:
            self.abort()

    def abort(self) -> None:
        """Discards what was written (``path`` is left as it was)."""
        if self.closed:
            return
        self.closed = True
        self._cleanup()

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self.closed:
            self.close()
        self.abort()


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
    f, header, start, _ = _open(path)
    with f:
        data = f.read()
    return header, memoryview(data), start + len(data)


def _open(path: str | os.PathLike) -> tuple[Any, dict, int, int]:
    """``(open file positioned at the data, parsed header, data start, file size)`` of a
    safetensors file; the data is not read."""
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
    f = os.fdopen(fd, "rb")
    try:
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
        if not isinstance(header, dict):  # pragma: no cover (ruled out by the first byte)
            raise CheckpointError(f"{path!r}: header is not a JSON object")
    except BaseException:
        f.close()
        raise
    return f, header, 8 + hlen, size


def _chunks(f, start: int, nbytes: int, path: str):
    """The ``nbytes`` bytes of file ``f`` from ``start``, read in bounded chunks."""
    buf = bytearray(min(nbytes, _READ_CHUNK))
    view = memoryview(buf)
    pos, left = start, nbytes
    while left:
        n = os.preadv(f.fileno(), [view[:min(left, len(buf))]], pos) if hasattr(
            os, "preadv") else _pread_into(f, view[:min(left, len(buf))], pos)
        if n <= 0:
            raise CheckpointError(f"{path!r} is truncated (it changed while being read)")
        yield view[:n]
        pos, left = pos + n, left - n


def _pread_into(f, view: memoryview, pos: int) -> int:  # pragma: no cover (no os.preadv)
    f.seek(pos)
    return f.readinto(view)


def _read_range(f, start: int, nbytes: int, path: str) -> bytearray:
    """``nbytes`` bytes of ``f`` from ``start`` into a new (writable) buffer."""
    out = bytearray(nbytes)
    view, got = memoryview(out), 0
    while got < nbytes:
        n = os.preadv(f.fileno(), [view[got:]], start + got) if hasattr(
            os, "preadv") else _pread_into(f, view[got:], start + got)
        if n <= 0:
            raise CheckpointError(f"{path!r} is truncated (it changed while being read)")
        got += n
    return out


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
        self.accept(header, [self.data], len(self.data))

    def accept(self, header: dict, data_chunks: list, nbytes: int) -> dict:
        """Validates ``header`` (the metadata, the index of ``nbytes`` data bytes, the digest
        over them and ``data_chunks``), parses the tree, report and user metadata; returns the
        metadata."""
        path = self.path
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
        self.index = _tensors(header, nbytes, path)
        if _digest(self.index, meta, data_chunks, version) != meta["sha256"]:
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
        return meta

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
        coded = self.coded(n, refs, where)
        if not build:
            return None
        arrays = {f: self.decoded(self.tensor(ref, where), coded[f],
                                  f"entropy-coded {f!r} of the {cls.kind} at {where}")
                  if f in coded else self.tensor(ref, where) for f, ref in refs.items()}
        try:  # untrusted metadata: any failure to rebuild means a corrupt file
            leaf = cls.from_arrays(arrays, meta)
        except Exception as e:  # noqa: BLE001
            raise self.fail(f"corrupt {cls.kind} at {where}: {e}") from e
        _check_code_range(leaf, arrays, where, self.fail)
        return leaf

    def coded(self, n: dict, refs: dict, where: str) -> dict:
        """The validated ``coded`` entry of a leaf node (its entropy-coded arrays)."""
        coded = n.get("coded", {})
        if not isinstance(coded, dict) or not set(coded) <= set(refs):
            raise self.fail(f"bad entropy-coding entry at {where}: {_short(coded)}")
        for f, c in coded.items():
            e = self.entry(refs[f], where)
            ok = (isinstance(c, dict) and c.get("coder") == "rans" and _is_int(c.get("bits"))
                  and 1 <= c["bits"] <= 16 and c.get("dtype") == "U32"
                  and isinstance(c.get("shape"), list)
                  and all(_is_int(d) and d >= 0 for d in c["shape"])
                  and e["dtype"] == "U8" and len(e["shape"]) == 1)
            if not ok:
                raise self.fail(f"bad entropy-coding entry for {f!r} at {where}: {_short(c)}")
            nbytes = 4 * math.prod(c["shape"])
            if nbytes > _max_decoded(e["shape"][0]):
                raise self.fail(f"entropy-coded {f!r} at {where} claims {nbytes} bytes from "
                                f"{e['shape'][0]} (more than a writer ever codes)")
        return coded

    def decoded(self, blob: Any, c: dict, where: str) -> np.ndarray:
        """The array an entropy-coded tensor holds (exact; corrupt data raises)."""
        try:
            words = entropy.decode_words(np.asarray(blob), math.prod(c["shape"]), c["bits"])
        except ValueError as e:
            raise self.fail(f"{where}: {e}") from None
        return words.reshape(c["shape"])

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
    if isinstance(words, jax.Array) and not words.is_fully_addressable:
        return _max_code_global(words, bits, count)
    return max((int(c.max()) for c in entropy.iter_codes(np.asarray(words), bits, count)
                if c.size), default=0)


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
      "tensors": tensor index, "file_bytes": file size}`` (for a multi-process checkpoint
      directory: the bytes of its files; ``tensors`` gives the offsets its arrays would have in
      one file).

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
    c = _Spread(path) if multihost.is_checkpoint(path) else _Checkpoint(path)
    c.check()
    return {"tree": c.tree, "leaves": c.leaves, "user": c.user, "tensors": c.index,
            "file_bytes": c.size}


def load(path: str | os.PathLike, *, as_numpy: bool = False, sharding: Any = None,
         lazy: bool = False) -> Any:
    """Reads a checkpoint written by :func:`save`, verifying it; returns the tree.

    Dicts come back as ``dict`` (Flax ``FrozenDict`` and ``nnx.State`` were stored as plain
    dicts; use ``nnx.replace_by_pure_dict`` for the latter), named tuples as dicts of their
    fields. Arrays are ``jax.Array`` (or NumPy with ``as_numpy=True``); PRNG keys are typed
    ``jax.random`` keys either way, NumPy scalars come back as NumPy scalars of their dtype.

    A multi-process checkpoint (a directory, see :mod:`distq.multihost`) loads in any topology:
    in one process as local arrays; in several (every process calls ``load``) as global arrays
    sharded by ``sharding`` (a ``Mesh``, a ``Sharding`` or a callable, see
    :func:`distq.multihost.restore_sharding`; ``None`` splits each array's first axis over all
    devices where they divide it). Single files take no ``sharding``.

    With ``lazy=True`` the file is verified (digest over every byte, read in bounded chunks;
    the tree's structure) and a :class:`LazyCheckpoint` is returned: a read-only mapping from
    each leaf's ``/``-joined path to the leaf, read from the file (and decoded, validated) only
    when asked for, one at a time, so a model larger than memory can be processed leaf by leaf.

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
    if multihost.is_checkpoint(path):
        if lazy:
            raise ValueError("lazy=True reads single-file checkpoints; a multi-process "
                             "(orbax) checkpoint restores with lazy=False")
        return _Spread(path).build(as_numpy, sharding)
    if sharding is not None:
        raise ValueError("sharding applies to multi-process checkpoints (orbax directories); a "
                         "single-file checkpoint loads as local arrays")
    if _check_flag(lazy, "lazy"):
        return LazyCheckpoint(path, as_numpy=as_numpy)
    return _Checkpoint(path).build(as_numpy)


class _OnDisk(_Checkpoint):
    """A verified checkpoint whose tensors are read from the (open) file when asked for."""

    def __init__(self, path: str | os.PathLike):
        self.path = path = os.fspath(path)
        self.as_numpy = False
        self.file, header, self.start, self.size = _open(path)
        try:
            self.stat = os.fstat(self.file.fileno())
            self.accept(header, _chunks(self.file, self.start, self.size - self.start, path),
                        self.size - self.start)
        except BaseException:
            self.file.close()
            raise

    def tensor(self, ref: Any, where: str) -> np.ndarray:
        e = self.entry(ref, where)
        st = os.fstat(self.file.fileno())
        if (st.st_size, st.st_mtime_ns) != (self.stat.st_size, self.stat.st_mtime_ns):
            raise self.fail("the file changed after it was verified")
        a, b = e["data_offsets"]
        raw = _read_range(self.file, self.start + a, b - a, self.path)
        dt = _DTYPES[e["dtype"]].newbyteorder("<")
        return np.frombuffer(raw, dtype=dt).reshape(e["shape"]).astype(
            dt.newbyteorder("="), copy=False)


def tree_nodes(tree: dict, path: str = ""):
    """``(path, node)`` of every node of a validated tree description (``info(f)["tree"]``)
    that is not a container, in order: arrays, quantised leaves, keys, scalars, ``None``. Paths
    are ``/``-joined keys, as in :func:`distq.planning.path_str`.

    Examples:
      >>> import os, tempfile, numpy as np, distq
      >>> from distq.checkpoint import info, tree_nodes
      >>> folder = tempfile.TemporaryDirectory()
      >>> f = os.path.join(folder.name, "t.distq")
      >>> _ = distq.save(f, {"a": {"b": np.ones(2)}, "c": [3, None]})
      >>> [(p, n["t"]) for p, n in tree_nodes(info(f)["tree"])]
      [('a/b', 'array'), ('c/0', 'scalar'), ('c/1', 'none')]
      >>> folder.cleanup()
    """
    t = tree["t"]
    if t == "dict":
        for (_, k), v in zip(tree["k"], tree["v"]):
            yield from tree_nodes(v, f"{path}/{k}" if path else str(k))
    elif t == "namedtuple":
        for f, v in zip(tree["fields"], tree["v"]):
            yield from tree_nodes(v, f"{path}/{f}" if path else f)
    elif t in ("list", "tuple"):
        for i, v in enumerate(tree["v"]):
            yield from tree_nodes(v, f"{path}/{i}" if path else str(i))
    else:
        yield path, tree


class LazyCheckpoint(Mapping):
    """A verified checkpoint read one leaf at a time (what ``distq.load(path, lazy=True)``
    returns): a read-only mapping from each leaf's ``/``-joined path to the leaf.

    Opening reads the whole file once, in bounded chunks, to check its digest, and validates
    the tree's structure; ``self[path]`` then reads just that leaf's tensors from the file
    (which stays open, so a later save that replaces it does not disturb this reader; a file
    changed in place is refused). Leaves are arrays (``jax.Array``, or NumPy with
    ``as_numpy=True``), quantised leaves, PRNG keys and scalars; a path that names more than
    one leaf (a dict key holding ``/``) gives the first. Also: ``user`` (the metadata),
    ``report`` (the per-leaf rows), ``file_bytes``; :meth:`close` (or ``with``) closes the file.

    Examples:
      >>> import os, tempfile, jax.numpy as jnp, distq
      >>> folder = tempfile.TemporaryDirectory()
      >>> f = os.path.join(folder.name, "model.distq")
      >>> tree = {"dense": {"kernel": distq.quantize(jnp.ones((64, 32)), distq.NF4()),
      ...                   "bias": jnp.zeros(32)}, "step": 3}
      >>> _ = distq.save(f, tree)
      >>> with distq.load(f, lazy=True) as ckpt:
      ...     print(list(ckpt))
      ...     for path, leaf in ckpt.items():  # one leaf in memory at a time
      ...         print(path, type(leaf).__name__)
      ['dense/kernel', 'dense/bias', 'step']
      dense/kernel QArray
      dense/bias ArrayImpl
      step int
      >>> folder.cleanup()
    """

    def __init__(self, path: str | os.PathLike, *, as_numpy: bool = False):
        self._c = _OnDisk(path)
        try:
            self._c.check()
        except BaseException:
            self._c.file.close()
            raise
        self._c.as_numpy = _check_flag(as_numpy, "as_numpy")
        self._nodes: dict[str, dict] = {}
        for p, n in tree_nodes(self._c.tree):
            self._nodes.setdefault(p, n)
        self.path = self._c.path
        self.user: dict[str, str] = self._c.user
        self.report: list[dict] = self._c.leaves
        self.file_bytes: int = self._c.size

    def __getitem__(self, path: str) -> Any:
        n = self._nodes[path]  # KeyError for an unknown path
        if self._c.file.closed:
            raise ValueError(f"{self.path!r}: this lazy checkpoint is closed")
        return self._c.walk(n, path, True)

    def __iter__(self):
        return iter(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def close(self) -> None:
        self._c.file.close()

    def __enter__(self) -> "LazyCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LazyCheckpoint({self.path!r}, {len(self)} leaves)"


# --------------------------------------------------------------- safetensors inputs, streamed
def _entry_array(f, start: int, e: dict, path: str) -> np.ndarray:
    """Tensor ``e`` of the open file ``f`` (data from ``start``), memory-mapped read-only: its
    pages are read when used and leave memory when the array does."""
    a, b = e["data_offsets"]
    dt = _DTYPES[e["dtype"]].newbyteorder("<")
    if b == a:
        return np.zeros(e["shape"], dt.newbyteorder("="))
    off = start + a
    if os.fstat(f.fileno()).st_size < off + (b - a):  # reading a mapped page past the end
        raise CheckpointError(f"{path!r} is truncated (it changed while being read)")  # = SIGBUS
    base = off - off % mmap.ALLOCATIONGRANULARITY
    mm = mmap.mmap(f.fileno(), off + (b - a) - base, offset=base, access=mmap.ACCESS_READ)
    arr = np.frombuffer(mm, dtype=dt, count=(b - a) // dt.itemsize, offset=off - base)
    return arr.reshape(e["shape"]).astype(dt.newbyteorder("="), copy=False)


def _safe_name(name: Any, folder: str, what: str) -> str:
    """A shard file name from an index: a plain name inside ``folder`` (no path parts)."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name
            or "\\" in name or os.sep in name or (os.altsep and os.altsep in name)):
        raise CheckpointError(f"{what}: shard file name {_short(name)} is not a plain file name "
                              "in the index's folder")
    return os.path.join(folder, name)


class SafetensorsFiles(Mapping):
    """The tensors of a safetensors checkpoint, read one at a time, memory-mapped.

    ``path`` is a safetensors file, a sharded Hugging Face checkpoint's index
    (``model.safetensors.index.json``: ``{"weight_map": {tensor name: shard file}}``, the shards
    beside it) or a folder holding one of those (an index, or a single ``*.safetensors``).
    Every header is read and validated at once (offsets tile each file's data exactly, the
    index and the shards agree); ``self[name]`` maps that tensor's bytes read-only (no copy:
    pages are read as they are used and released with the array), so a checkpoint far larger
    than memory can be processed tensor by tensor. Plain safetensors files carry no checksum.

    Attributes:
      files: the safetensors files read.
      metadata: the ``__metadata__`` of a single file, or the index's ``metadata``.

    Raises:
      FileNotFoundError: a missing file or shard.
      CheckpointError: (a ``ValueError``) a malformed, truncated or inconsistent file, index or
        folder.

    Examples:
      >>> import os, tempfile, numpy as np, distq
      >>> from distq.checkpoint import SafetensorsFiles, save
      >>> folder = tempfile.TemporaryDirectory()
      >>> _ = save(os.path.join(folder.name, "a.safetensors"), {"x": np.ones((2, 3), np.float32)})
      >>> with SafetensorsFiles(folder.name) as st:
      ...     print(list(st), st.shape_dtype("x"), st["x"].sum())
      ['x'] ((2, 3), dtype('float32')) 6.0
      >>> folder.cleanup()
    """

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        self.path = path
        self._open: list = []
        self._paths: list[str] = []
        self._where: dict[str, tuple[int, dict]] = {}
        self.metadata: dict = {}
        try:
            kind, file = self._resolve(path)
            if kind == "file":
                self._add(file, None)
            else:
                self._add_shards(file)
        except BaseException:
            self.close()
            raise
        self.files = list(self._paths)

    @staticmethod
    def _resolve(path: str) -> tuple[str, str]:
        """``("index", index file)`` or ``("file", safetensors file)`` for ``path``."""
        if not os.path.isdir(path):
            return ("index" if path.endswith(".json") else "file"), path
        names = sorted(os.listdir(path))
        idx = [n for n in names if n.endswith(".safetensors.index.json")]
        if "model.safetensors.index.json" in idx:
            idx = ["model.safetensors.index.json"]
        if len(idx) > 1:
            raise CheckpointError(f"{path!r} holds several indexes ({', '.join(idx)}); name one")
        if idx:
            return "index", os.path.join(path, idx[0])
        single = [n for n in names if n.endswith(".safetensors")]
        if len(single) != 1:
            raise CheckpointError(
                f"{path!r} holds {len(single)} .safetensors files and no "
                "*.safetensors.index.json; expected one file or a sharded checkpoint's index")
        return "file", os.path.join(path, single[0])

    def _add(self, file: str, names: set | None) -> None:
        f, header, start, size = _open(file)
        self._open.append((f, start))
        self._paths.append(file)
        index = _tensors(header, size - start, file)
        meta = header.get(_RESERVED)
        if names is None:
            self.metadata = meta if isinstance(meta, dict) else {}
        for name, e in index.items():
            if names is not None and name not in names:
                raise CheckpointError(f"{file!r} holds tensor {_short(name)}, which the index "
                                      "does not map to this shard")
            self._where[name] = (len(self._open) - 1, e)

    def _add_shards(self, index_path: str) -> None:
        with open(index_path, "rb") as fh:
            raw = fh.read(_MAX_HEADER + 1)
        if len(raw) > _MAX_HEADER:
            raise CheckpointError(f"{index_path!r}: an index larger than {_MAX_HEADER} bytes")
        doc = _loads(raw, "index", index_path, constants=False)
        wmap = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(k, str) for k in wmap):
            raise CheckpointError(f"{index_path!r} is not a sharded checkpoint index (no "
                                  '"weight_map" object of tensor name -> shard file)')
        meta = doc.get("metadata")
        self.metadata = meta if isinstance(meta, dict) else {}
        folder = os.path.dirname(os.path.abspath(index_path))
        shards: dict[str, set] = {}
        for name, shard in wmap.items():
            shards.setdefault(_safe_name(shard, folder, index_path), set()).add(name)
        for file, names in shards.items():
            self._add(file, names)
            missing = sorted(names - set(self._where))
            if missing:
                raise CheckpointError(f"{index_path!r} maps {len(missing)} tensors to {file!r} "
                                      f"that it does not hold (e.g. {_short(missing[0])})")

    def __getitem__(self, name: str) -> np.ndarray:
        i, e = self._where[name]
        f, start = self._open[i]
        if f.closed:
            raise ValueError("these safetensors files are closed")
        return _entry_array(f, start, e, self._paths[i])

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """The shape and dtype of tensor ``name`` (from the header; nothing is read)."""
        e = self._where[name][1]
        return tuple(e["shape"]), _DTYPES[e["dtype"]]

    def nbytes(self, name: str) -> int:
        a, b = self._where[name][1]["data_offsets"]
        return b - a

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        for f, _ in self._open:
            f.close()

    def __enter__(self) -> "SafetensorsFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------- several processes (orbax layout)
def _save_spread(path: str, tree: Any, report: Any, metadata: dict[str, str] | None) -> int:
    """:func:`save` of a tree spread over processes: the header of a one-file checkpoint (the
    index giving the offsets the arrays would have in one file, the digest over index and
    metadata) beside the arrays, which orbax writes shard by shard (:mod:`distq.multihost`)."""
    _check_metadata(metadata)
    w = _Writer(keep_global=True)
    tree_json = json.dumps(w.node(tree, ""), separators=(",", ":"))
    index, offset = {}, 0
    for name in sorted(w.tensors):
        a = w.tensors[name]
        n = np.dtype(a.dtype).itemsize * math.prod(a.shape)
        index[name] = {"dtype": _CODES[np.dtype(a.dtype)], "shape": [int(d) for d in a.shape],
                       "data_offsets": [offset, offset + n]}
        offset += n
    meta = {"format": FORMAT, "version": VERSION, "layout": multihost.LAYOUT, "tree": tree_json,
            "leaves": json.dumps(_report_rows(report), separators=(",", ":")),
            "user": json.dumps(metadata or {}, separators=(",", ":"))}
    meta["sha256"] = _digest(index, meta, [])
    header = {**index, _RESERVED: meta}
    text = json.dumps(header, separators=(",", ":"))
    if len(text) > _MAX_HEADER or not _json_size_ok(text):
        raise ValueError(f"cannot store the tree: its description ({len(text)} bytes, "
                         f"{len(index)} tensors) exceeds a checkpoint header's limits")
    return multihost.save(path, w.tensors, header)


def _index_end(header: dict) -> int:
    """The data end the index of ``header`` claims (``_tensors`` then checks the tiling)."""
    ends = [e["data_offsets"][1] for k, e in header.items()
            if k != _RESERVED and isinstance(e, dict) and isinstance(e.get("data_offsets"), list)
            and len(e["data_offsets"]) == 2 and _is_int(e["data_offsets"][1])]
    return max(ends, default=0)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _max_code_device(words: jax.Array, bits: int, count: int) -> jax.Array:
    return jnp.max(bitpack.unpack(words, bits, count, jnp.uint32))


def _max_code_global(words: jax.Array, bits: int, count: int) -> int:
    """:func:`_max_code` of an array no process holds whole: decoded on its devices, where it
    lives; only the maximum is gathered."""
    return int(jax.device_get(_max_code_device(words, bits, count)))


class _Spread(_Checkpoint):
    """A checkpoint directory in the orbax layout (:mod:`distq.multihost`): the header from its
    JSON item (validated as a file's header is), the arrays restored by orbax on build."""

    def __init__(self, path: str | os.PathLike):
        self.path = path = os.fspath(path)
        self.as_numpy = False
        try:
            raw = multihost.read_header(path, _MAX_HEADER)
        except ValueError as e:
            raise CheckpointError(f"{path!r}: {e}") from None
        if re.match(rb"[ \t\r\n]*\{", raw) is None:
            raise self.fail("the header is not a JSON object")
        header = _loads(raw, "header", path, constants=False)
        meta = self.accept(header, [], _index_end(header))
        if meta.get("layout") != multihost.LAYOUT:
            raise self.fail(f"the header of a checkpoint directory names layout "
                            f"{_short(meta.get('layout'))}, not {multihost.LAYOUT!r}")
        self.size = multihost.dir_bytes(path)
        self.arrays: dict[str, Any] = {}

    def tensor(self, ref: Any, where: str) -> Any:
        self.entry(ref, where)
        return self.arrays[ref]

    def build(self, as_numpy: bool, sharding: Any = None) -> Any:
        tensors = {n: (tuple(e["shape"]), _DTYPES[e["dtype"]]) for n, e in self.index.items()}
        self.arrays = multihost.restore(self.path, tensors, sharding, as_numpy, self.fail)
        return super().build(as_numpy)
