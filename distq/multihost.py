"""Checkpoints of trees spread over several processes: the orbax layout of ``distq.save``.

In a multi-process JAX run (``jax.distributed.initialize``, a global mesh, ``jit`` over sharded
arrays) a quantised tree holds global arrays whose shards live on different processes: no
process can fetch them whole. There :func:`distq.save` writes an
`orbax-checkpoint <https://orbax.readthedocs.io>`_ directory instead of one file, in which each
process writes its own shards (no gather), and :func:`distq.load` restores it onto any
topology: one process (local arrays), or several (global arrays sharded as asked, see
:func:`restore_sharding`).

Layout of such a checkpoint directory ``PATH/``:

* ``arrays/``: an orbax PyTree item ``{"t0": ..., "t1": ..., ...}``, the checkpoint's tensors
  in the order of their sorted names (:func:`array_keys`);
* ``distq/metadata``: an orbax JSON item holding the same header a single-file checkpoint has
  (:mod:`distq.checkpoint`): the tensor index (name to dtype, shape and the offsets the tensor
  would have in one file) and ``__metadata__`` (format, version, ``layout: "orbax"``, the tree
  description, the per-leaf report, the user metadata, and a SHA-256 of the index and the
  metadata). The tree is thus rebuilt with no model; the digest covers the description, while
  the array bytes are those orbax and TensorStore read back;
* orbax's own commit markers.

Writes are atomic: orbax writes a temporary directory and renames it once every process has
written its shards. An existing checkpoint directory is replaced only after the new one is
complete (it is renamed aside, the new one renamed in, then the old one deleted, by process 0
between barriers); a file or a directory that is not a distq checkpoint is never replaced.

This module does the orbax input and output; :mod:`distq.checkpoint` describes and rebuilds the
tree (``distq.save`` / ``distq.load`` call it). orbax is imported only when used.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

#: ``__metadata__["layout"]`` of a checkpoint written here
LAYOUT = "orbax"
#: orbax items of the checkpoint directory
ARRAYS_ITEM, HEADER_ITEM = "arrays", "distq"
_HEADER_FILE = "metadata"  # the file orbax's JSON handler writes in its item folder
_NEW, _OLD = ".distq-new", ".distq-old"  # suffixes used while replacing a checkpoint


def wants(tree: Any) -> bool:
    """Whether :func:`distq.save` writes ``tree`` as an orbax directory by default: in a
    multi-process run (``jax.process_count() > 1``; only there can arrays span devices of
    other processes). ``tree`` is not inspected.

    Examples:
      >>> import jax.numpy as jnp, distq
      >>> from distq import multihost
      >>> multihost.wants({"w": distq.quantize(jnp.ones((8, 8)), distq.NF4())})  # one process
      False
    """
    del tree
    return jax.process_count() > 1


def _spans_processes(tree: Any) -> bool:
    try:
        leaves = jax.tree_util.tree_leaves(tree)
    except (RecursionError, SystemError):  # a tree too deep: save() reports it
        return False
    return any(isinstance(a, jax.Array) and not a.is_fully_addressable for a in leaves)


def layout(tree: Any, layout: str | None) -> str:
    """The layout :func:`distq.save` writes: ``"orbax"`` or ``"file"`` as asked (``layout``),
    else ``"orbax"`` where :func:`wants` says so.

    Raises:
      ValueError: an unknown ``layout``, or ``"file"`` for arrays that span processes.

    Examples:
      >>> import jax.numpy as jnp
      >>> layout({"w": jnp.ones(3)}, None), layout({"w": jnp.ones(3)}, "orbax")
      ('file', 'orbax')
    """
    if layout not in (None, "file", LAYOUT):
        raise ValueError(f"layout must be None, 'file' or {LAYOUT!r}, got {layout!r}")
    if layout == "file" and jax.process_count() > 1 and _spans_processes(tree):
        raise ValueError("layout='file' cannot hold arrays that span other processes' devices "
                         "(no process can read them whole); use layout='orbax' or None")
    if layout is None:
        return LAYOUT if wants(tree) else "file"
    return layout


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by :func:`save` (it holds the header item).

    Examples:
      >>> import tempfile
      >>> from distq import multihost
      >>> folder = tempfile.TemporaryDirectory()
      >>> multihost.is_checkpoint(folder.name), multihost.is_checkpoint(folder.name + "/none")
      (False, False)
      >>> folder.cleanup()
    """
    path = os.fspath(path)
    return os.path.isdir(path) and os.path.isfile(_header_path(path))


def _header_path(path: str) -> str:
    return os.path.join(path, HEADER_ITEM, _HEADER_FILE)


def array_keys(names: Sequence[str]) -> dict[str, str]:
    """The orbax key of each tensor name: ``t0``, ``t1``, ... in sorted name order (names may
    hold any character; orbax keys become file and TensorStore names).

    Examples:
      >>> array_keys(["w:scale", "b", "w:codes"])
      {'b': 't0', 'w:codes': 't1', 'w:scale': 't2'}
    """
    return {name: f"t{i}" for i, name in enumerate(sorted(names))}


def read_header(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The raw JSON header of a checkpoint directory (without importing orbax).

    Raises:
      FileNotFoundError: ``path`` is not a checkpoint directory.
      ValueError: the header is larger than ``max_bytes``.
    """
    path = os.fspath(path)
    f = _header_path(path)
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{path!r} is not a distq checkpoint directory (no {f!r})")
    with open(f, "rb") as fh:
        raw = fh.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ValueError(f"{f!r} exceeds the {max_bytes} bytes a checkpoint header may have")
    return raw


def dir_bytes(path: str | os.PathLike) -> int:
    """Bytes of every file under ``path`` (what the checkpoint takes on disk).

    Examples:
      >>> import os, tempfile
      >>> folder = tempfile.TemporaryDirectory()
      >>> with open(os.path.join(folder.name, "a"), "wb") as f:
      ...     _ = f.write(b"12345")
      >>> dir_bytes(folder.name)
      5
      >>> folder.cleanup()
    """
    total = 0
    for root, _, files in os.walk(os.fspath(path)):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _check_target(path: str) -> None:
    """Refuses a ``path`` that :func:`save` must not replace."""
    if not path or path.endswith(("/", os.sep)):
        raise ValueError(f"path must name a checkpoint directory (no trailing separator), got "
                         f"{path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"folder {folder!r} of path {path!r} does not exist")
    if os.path.lexists(path) and not is_checkpoint(path):
        what = "a directory that is not a distq checkpoint" if os.path.isdir(path) else (
            "a file" if os.path.isfile(path) else "not a directory")
        raise ValueError(f"path {path!r} is {what}; a multi-process checkpoint is a directory "
                         "and replaces only an earlier one (give a new path)")


def _checkpointer(ocp: Any) -> Any:
    """A synchronous orbax checkpointer of the two items (arrays, header)."""
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
        **{ARRAYS_ITEM: ocp.PyTreeCheckpointHandler(), HEADER_ITEM: ocp.JsonCheckpointHandler()}))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(name)


def _remove_checkpoint(path: str) -> None:
    """Deletes ``path`` if it is a distq checkpoint directory (never anything else)."""
    if is_checkpoint(path):
        shutil.rmtree(path)


def save(path: str | os.PathLike, arrays: dict[str, Any], header: dict) -> int:
    """Writes ``arrays`` (``name -> array``, global arrays included) and the JSON ``header``
    as an orbax checkpoint directory; every process of the run must call it alike.

    Each process writes the shards it holds (orbax writes each shard once); arrays held by
    every process (NumPy ones, replicated ones) are written once. Atomic: see the module
    docstring. Called by :func:`distq.save`, which builds the header.

    Args:
      path: the directory to create, or an earlier distq checkpoint directory to replace.
      arrays: the tensors; names as in the header's index.
      header: a JSON-able dict (the tensor index and ``__metadata__``).

    Returns:
      The bytes the checkpoint takes on disk.

    Raises:
      ValueError: ``path`` is a file, a directory that is not a distq checkpoint, or its
        folder does not exist.
    """
    import orbax.checkpoint as ocp  # noqa: PLC0415 (heavy; only for multi-process saves)

    path = os.fspath(path)
    _check_target(path)
    path = os.path.abspath(path)
    replace = os.path.lexists(path)
    target = path + _NEW if replace else path
    keys = array_keys(list(arrays))
    items = {HEADER_ITEM: ocp.args.JsonSave(header)}
    if arrays:
        items[ARRAYS_ITEM] = ocp.args.PyTreeSave({keys[n]: a for n, a in arrays.items()})
    ckptr = _checkpointer(ocp)
    try:
        if replace and jax.process_index() == 0:  # leftovers of an interrupted replacement
            _remove_checkpoint(path + _NEW)
        _barrier(f"distq-save-start:{path}")
        ckptr.save(target, ocp.args.Composite(**items))  # atomic: a temporary, then a rename
    finally:
        ckptr.close()
    if replace:
        _barrier(f"distq-save-written:{path}")
        if jax.process_index() == 0:  # the old checkpoint stays until the new one is complete
            _remove_checkpoint(path + _OLD)
            os.rename(path, path + _OLD)
            os.rename(target, path)
            _remove_checkpoint(path + _OLD)
    _barrier(f"distq-save-done:{path}")
    return dir_bytes(path)


def restore_sharding(sharding: Any, name: str, shape: tuple[int, ...], dtype: Any) -> Any:
    """The sharding :func:`distq.load` gives tensor ``name`` of an orbax checkpoint, or
    ``None`` for a local NumPy array read whole by every process.

    ``sharding`` is the argument of :func:`distq.load`:

    * ``None``: in one process, local arrays; in several, as for a 1-D mesh of all devices;
    * a :class:`jax.sharding.Mesh`: each array of rank >= 1 split along its first axis over all
      the mesh's devices when they divide it (the layout ``quantize_tree`` gives codes and
      scales of a row-sharded weight), replicated over the mesh otherwise; 0-d arrays local;
    * a :class:`jax.sharding.Sharding`: that sharding for every array of rank >= 1;
    * a callable ``(name, shape, dtype) -> Sharding | None``.

    Examples:
      >>> import jax, numpy as np
      >>> from jax.sharding import PartitionSpec as P
      >>> from distq import multihost
      >>> mesh = jax.make_mesh((1,), ("x",))
      >>> multihost.restore_sharding(mesh, "w:codes", (256,), np.uint32).spec == P(("x",))
      True
      >>> multihost.restore_sharding(mesh, "step", (), np.int32) is None
      True
    """
    if sharding is None:
        if jax.process_count() == 1:
            return None
        sharding = jax.sharding.Mesh(np.asarray(jax.devices()), ("devices",))
    if isinstance(sharding, (jax.sharding.Mesh, jax.sharding.Sharding)):
        if not shape:
            return None
        if isinstance(sharding, jax.sharding.Sharding):
            return sharding
        P = jax.sharding.PartitionSpec
        spec = P(tuple(sharding.axis_names)) if shape[0] % sharding.size == 0 else P()
        return jax.sharding.NamedSharding(sharding, spec)
    if callable(sharding):
        return sharding(name, tuple(shape), np.dtype(dtype))
    raise TypeError(f"sharding must be None, a jax.sharding.Mesh, a jax.sharding.Sharding or a "
                    f"callable (name, shape, dtype) -> Sharding | None, got "
                    f"{type(sharding).__name__}")


def restore(path: str | os.PathLike, tensors: dict[str, tuple[tuple[int, ...], Any]],
            sharding: Any = None, as_numpy: bool = False,
            fail: Callable[[str], Exception] = ValueError) -> dict[str, Any]:
    """Reads the arrays of a checkpoint directory written by :func:`save`.

    Args:
      path: the checkpoint directory.
      tensors: ``name -> (shape, dtype)`` from its (validated) header; orbax's own metadata
        must agree with it.
      sharding: see :func:`restore_sharding`.
      as_numpy: NumPy arrays, each read whole (``sharding`` must then be ``None``).
      fail: builds the exception raised for a checkpoint that does not restore.

    Returns:
      ``name -> array``: a NumPy array where the sharding is ``None``, a global
      ``jax.Array`` with that sharding otherwise.
    """
    if as_numpy and sharding is not None:
        raise ValueError("as_numpy=True reads every array whole; it takes no sharding")
    if not tensors:
        return {}
    import orbax.checkpoint as ocp  # noqa: PLC0415

    path = os.path.abspath(os.fspath(path))
    keys = array_keys(list(tensors))
    ckptr = _checkpointer(ocp)
    try:
        try:
            stored = ckptr.metadata(path).item_metadata[ARRAYS_ITEM].tree
        except Exception as e:  # noqa: BLE001 (orbax raises many kinds)
            raise fail(f"orbax cannot read the array metadata ({type(e).__name__}: "
                       f"{e})") from None
        if not isinstance(stored, dict) or set(stored) != set(keys.values()):
            raise fail(f"the orbax arrays "
                       f"({len(stored) if isinstance(stored, dict) else '?'}) do not match the "
                       f"{len(keys)} tensors of the header")
        args = {}
        for name, (shape, dtype) in tensors.items():
            m = stored[keys[name]]
            if tuple(m.shape) != tuple(shape) or np.dtype(m.dtype) != np.dtype(dtype):
                raise fail(f"tensor {name!r} is stored as {np.dtype(m.dtype)}{list(m.shape)}, "
                           f"the header says {np.dtype(dtype)}{list(shape)}")
            s = None if as_numpy else restore_sharding(sharding, name, tuple(shape), dtype)
            args[keys[name]] = (ocp.RestoreArgs(restore_type=np.ndarray) if s is None else
                                ocp.ArrayRestoreArgs(sharding=s, global_shape=tuple(shape)))
        try:
            out = ckptr.restore(path, ocp.args.Composite(**{
                ARRAYS_ITEM: ocp.args.PyTreeRestore(restore_args=args)}))[ARRAYS_ITEM]
        except Exception as e:  # noqa: BLE001
            raise fail(f"orbax cannot restore the arrays ({type(e).__name__}: {e})") from None
    finally:
        ckptr.close()
    return {name: out[k] for name, k in keys.items()}
