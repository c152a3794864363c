"""Flax nnx layers with product-quantised weights (reverse PQ), and quantisation-aware training.

**Reverse product quantisation** (RPQ). A weight matrix is stored as ``m`` small codebooks of
``K = 2**bits`` sub-vectors each, plus one integer code per (vector, sub-space); the forward
pass reads the weight through the codes. The codebooks are trainable :class:`flax.nnx.Param`;
the codes are a non-trainable :class:`PQCodes` variable, kept bit-packed (``bits`` bits each,
:func:`distq.bitpack.pack`), so the module's state *is* its true size. The codes are either
random and fixed (training from scratch, as in RPQ) or fitted to a trained weight with
:func:`distq.pq.fit` (``from_pretrained``), after which the codebooks can be fine-tuned.

Which vectors are quantised. One vector per *output* unit, cut along the *input* axis:

* :class:`PQDense`, kernel ``W`` of shape ``(in, out)``: the vectors are the columns of ``W``
  (rows of ``W.T``), each of length ``in`` cut into ``m`` sub-vectors of ``in / m``; codes
  ``c[o, s]``. Then ``y[:, o] = sum_s x_s . C_s[c[o, s]] = sum_s T_s[:, c[o, s]]`` with
  ``T_s = x_s C_s^T`` of shape ``(batch, K)``: the product never needs ``W`` (the *table*
  forward: ``batch * in * K`` multiply-adds and ``batch * out * m`` gathered adds, against
  ``in * out`` gathers and ``batch * in * out`` multiply-adds to rebuild ``W`` and multiply).
  ``forward="auto"`` takes the cheaper by :func:`table_is_cheaper` (small batches: tables).
* :class:`PQEmbed`, table ``E`` of shape ``(vocab, features)``: the vectors are the rows; a lookup
  reads the codes of the looked-up rows only (straight from the packed words) and decodes them;
  :meth:`PQEmbed.attend` (``q @ E.T``) uses the tables.
* :class:`PQConv`, kernel ``(*kernel_size, in / groups, out)``: the vectors are the
  ``prod(kernel_size) * in / groups`` weights of each output channel (C order); the forward
  rebuilds the kernel (cheap next to the convolution) and calls ``lax.conv_general_dilated``.

The layout of the codes and codebooks is exactly that of a :class:`distq.pq.PQArray` of the
``(out, in)`` matrix of vectors, so :meth:`PQDense.as_pqarray` is free, and OPQ rotations
(``PQ(opq=True)``) are supported (kept frozen).

**QAT.** :class:`QATDense` and :class:`QATConv` hold a float kernel and a deterministic spec
(:class:`distq.Scalar`, :class:`distq.Uniform`, :class:`distq.NF4`, :class:`distq.Cast`, or any
registered spec that needs no key; not :class:`distq.PQ`) and run on
``distq.fake_quantize(kernel, spec)``: the forward is exactly the quantised layer's, the gradient
is straight-through. :func:`qat` wraps every ``nnx.Linear``/``nnx.Conv`` of a model,
:func:`pq_layers` converts them (and ``nnx.Embed``) to PQ layers.

References:
  H. Jegou, M. Douze, C. Schmid, "Product quantization for nearest neighbor search", IEEE TPAMI
  33(1), 2011 (sub-space codebooks, Sec. III; inner products through per-sub-space tables, as in
  the asymmetric distance of Sec. IV-A).
  RPQ-pytorch (reverse product quantisation of weights: random fixed codes, trained codebooks).
  Y. Bengio, N. Leonard, A. Courville, "Estimating or propagating gradients through stochastic
  neurons for conditional computation", arXiv:1308.3432, 2013 (the straight-through estimator).
"""

# _pq_base: PQ variables and shared state; _pq_layers: PQDense/PQEmbed/PQConv; _table: the
# table/rebuild product; _conv: convolution options and forward; _qat: QATDense/QATConv;
# _convert: qat/pq_layers; _common: argument checks and model_size.
from ..integrations import flax as _flax  # noqa: F401 (flax.serialization knows our leaves)
from ._common import model_size as model_size
from ._convert import pq_layers as pq_layers
from ._convert import qat as qat
from ._pq_base import PQCodes as PQCodes
from ._pq_base import PQRotation as PQRotation
from ._pq_layers import PQConv as PQConv
from ._pq_layers import PQDense as PQDense
from ._pq_layers import PQEmbed as PQEmbed
from ._qat import QATConv as QATConv
from ._qat import QATDense as QATDense
from ._table import table_is_cheaper as table_is_cheaper

__all__ = ["PQCodes", "PQRotation", "PQDense", "PQEmbed", "PQConv", "QATDense", "QATConv",
           "model_size", "qat", "pq_layers", "table_is_cheaper"]
