"""Product quantisation on synthetic data: distq against faiss and nanopq, side by side.

Three studies, each timed in this one process, back to back, best of ``--reps`` runs:

1. Clustered set (the DESIGN benchmark): D=512, m=16 sub-spaces, 256 true centroids per
   sub-space drawn from N(0, 1); each row concatenates randomly chosen true sub-centroids plus
   N(0, 0.1^2) noise; N=5000 training rows and 5000 held-out rows from the same centroids.
   8 bits per sub-code (16 bytes per row).
2. Gaussian 100,000 x 300, m=15, 8 bits: error and training time.
3. Encoding 1,000,000 x 128 rows at m=16, 8 bits (codebooks trained once on 65,536 rows).

Error is the relative MSE ``sum |x - xhat|^2 / sum |x - mean(x)|^2`` (squared error over total
squared deviation from the column means); "cosine" is the mean cosine between each row and its
reconstruction; "ratio" is float32 bytes over compressed bytes (codes + codebooks). distq's
timings are warm (compiled once before timing; the compile time is reported separately). faiss
runs with its default OpenMP threads (2 here) and, for reference, with one thread: on a busy
machine OpenMP's spinning threads slow down much more than XLA's.

Usage:
  python experiments/pq_synthetic.py            # writes experiments/out/pq_synthetic.md
  python experiments/pq_synthetic.py --quick    # smaller sizes, for a smoke test
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import distq.core.kmeans as km
import distq.core.pq as P

try:
    import faiss
except ImportError:  # pragma: no cover - the bench extra installs it
    faiss = None
try:
    import nanopq
except ImportError:  # pragma: no cover
    nanopq = None

OUT = Path(__file__).parent / "out" / "pq_synthetic.md"


# ------------------------------------------------------------------------------------ data
def clustered(seed: int, n: int, n_test: int, dim: int = 512, m: int = 16, k: int = 256,
              sigma: float = 0.1):
    """Rows built from true sub-centroids + Gaussian noise; returns (train, test, centroids)."""
    rng = np.random.default_rng(seed)
    ds = dim // m
    cents = rng.standard_normal((m, k, ds)).astype(np.float32)

    def draw(rows):
        pick = rng.integers(0, k, (rows, m))
        x = np.concatenate([cents[s][pick[:, s]] for s in range(m)], axis=1)
        return (x + sigma * rng.standard_normal((rows, dim))).astype(np.float32)

    return draw(n), draw(n_test), cents


# --------------------------------------------------------------------------------- metrics
def rel_mse(x: np.ndarray, xh: np.ndarray) -> float:
    x = x.astype(np.float64)
    return float(((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def mean_cos(x: np.ndarray, xh: np.ndarray) -> float:
    num = (x * xh).sum(1)
    den = np.linalg.norm(x, axis=1) * np.linalg.norm(xh, axis=1) + 1e-30
    return float((num / den).mean())


def nearest_true(x: np.ndarray, cents: np.ndarray) -> np.ndarray:
    """Reconstruction with the true centroids (nearest true sub-centroid per sub-space)."""
    m, _, ds = cents.shape
    out = np.empty_like(x)
    for s in range(m):
        xs = x[:, s * ds:(s + 1) * ds]
        d2 = (cents[s] ** 2).sum(1)[None] - 2 * xs @ cents[s].T
        out[:, s * ds:(s + 1) * ds] = cents[s][d2.argmin(1)]
    return out


def best_of(fn, reps: int):
    """(best wall seconds, last result) over ``reps`` calls."""
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        jax.block_until_ready(out) if not isinstance(out, np.ndarray) else None
        best = min(best, time.perf_counter() - t)
    return best, out


# ---------------------------------------------------------------------------- competitors
class Distq:
    def __init__(self, m, bits, **kw):
        self.spec = P.PQ(m=m, bits=bits, **kw)
        self.key = jax.random.key(0)

    def train(self, x):
        self.pq = P.fit(self.key, x, self.spec)
        return self.pq.codebooks

    def encode(self, x):
        self.q = self.pq.encode(x)
        return self.q.codes

    def decode(self):
        return self.q.dequantize()

    def nbytes(self, n):
        return self.q.nbytes


class Faiss:
    def __init__(self, m, bits, threads=None, hot_start=None):
        self.m, self.bits, self.threads, self.hot = m, bits, threads, hot_start

    def _threads(self):
        faiss.omp_set_num_threads(self.threads or os.cpu_count())

    def train(self, x):
        self._threads()
        self.pq = faiss.ProductQuantizer(x.shape[1], self.m, self.bits)
        if self.hot is not None:  # seeds from outside (k-means++), then faiss's Lloyd
            seeds = self.hot(x)
            faiss.copy_array_to_vector(seeds.reshape(-1), self.pq.centroids)
            self.pq.train_type = faiss.ProductQuantizer.Train_hot_start
        self.pq.train(x)
        return np.zeros(1)

    def encode(self, x):
        self._threads()
        self.codes = self.pq.compute_codes(x)
        return self.codes

    def decode(self):
        self._threads()
        return self.pq.decode(self.codes)

    def nbytes(self, n):
        return self.codes.nbytes + self.pq.centroids.size() * 4


class NanoPQ:
    def __init__(self, m, bits):
        self.m, self.ks = m, 1 << bits

    def train(self, x):
        self.pq = nanopq.PQ(M=self.m, Ks=self.ks, verbose=False)
        self.pq.fit(x, seed=0)
        return np.zeros(1)

    def encode(self, x):
        self.codes = self.pq.encode(x)
        return self.codes

    def decode(self):
        return self.pq.decode(self.codes)

    def nbytes(self, n):
        return self.codes.nbytes + self.pq.codewords.size * 4


def kmeanspp_seeds(m, bits):
    """Plain k-means++ seeds (distq's seeder with one trial) in faiss's centroid layout."""
    def seeds(x):
        n, dim = x.shape
        xs = jnp.asarray(x).reshape(n, m, dim // m).transpose(1, 0, 2)
        sub = xs[:, : min(n, 256 << bits)]
        return np.asarray(km.seed(jax.random.key(0), sub, 1 << bits, trials=1, init="kmeans++"))
    return seeds


def run(name, model, x, x_test, reps, compile_first=False):
    row = {"method": name}
    if compile_first:  # distq: the first call traces and compiles
        t = time.perf_counter()
        jax.block_until_ready(model.train(x))
        jax.block_until_ready(model.encode(x))
        jax.block_until_ready(model.decode())
        row["first"] = time.perf_counter() - t
    row["train"], _ = best_of(lambda: model.train(x), reps)
    row["encode"], _ = best_of(lambda: model.encode(x), reps)
    row["decode"], xh = best_of(model.decode, reps)
    xh = np.asarray(xh, np.float32)
    row["mse"], row["cos"] = rel_mse(x, xh), mean_cos(x, xh)
    row["ratio"] = x.nbytes / model.nbytes(x.shape[0])
    if x_test is not None:
        model.encode(x_test)
        row["mse_test"] = rel_mse(x_test, np.asarray(model.decode(), np.float32))
    return row


def fmt_table(rows, cols):
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, f in cols:
            v = r.get(key)
            cells.append("" if v is None else (f.format(v) if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- studies
def study_clustered(args, log):
    n = 1000 if args.quick else 5000
    x, x_test, cents = clustered(0, n, n, k=256)
    m, bits = 16, 8
    rows = []
    rows.append(run("distq (default: greedy k-means++)", Distq(m, bits), x, x_test, args.reps,
                    compile_first=True))
    rows.append(run("distq, OPQ", Distq(m, bits, opq=True), x, x_test, args.reps,
                    compile_first=True))
    if faiss is not None:
        rows.append(run("faiss default (2 threads)", Faiss(m, bits), x, x_test, args.reps))
        rows.append(run("faiss default (1 thread)", Faiss(m, bits, threads=1), x, x_test,
                        args.reps))
        rows.append(run("faiss, k-means++ seeds (hot start)",
                        Faiss(m, bits, hot_start=kmeanspp_seeds(m, bits)), x, x_test, args.reps))
    if nanopq is not None:
        rows.append(run("nanopq", NanoPQ(m, bits), x, x_test, max(1, args.reps // 2)))
    ref = nearest_true(x, cents)
    rows.append({"method": "true centroids (reference)", "mse": rel_mse(x, ref),
                 "cos": mean_cos(x, ref), "mse_test": rel_mse(x_test, nearest_true(x_test, cents))})
    cols = [("method", "method", "{}"), ("mse", "rel. MSE", "{:.4f}"),
            ("mse_test", "rel. MSE held-out", "{:.4f}"), ("cos", "cosine", "{:.4f}"),
            ("ratio", "ratio", "{:.1f}x"), ("train", "train s", "{:.3f}"),
            ("encode", "encode s", "{:.4f}"), ("decode", "decode s", "{:.4f}"),
            ("first", "distq 1st call s", "{:.2f}")]
    log(f"### 1. Clustered set: N={n} (+{n} held out), D=512, m=16, 8 bits\n")
    log(fmt_table(rows, cols) + "\n")
    return rows


def study_gaussian(args, log):
    n = 20000 if args.quick else 100_000
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 300)).astype(np.float32)
    m, bits = 15, 8
    rows = [run("distq (default)", Distq(m, bits), x, None, args.reps_big, compile_first=True)]
    if faiss is not None:
        rows.append(run("faiss default (2 threads)", Faiss(m, bits), x, None, args.reps_big))
        rows.append(run("faiss default (1 thread)", Faiss(m, bits, threads=1), x, None,
                        args.reps_big))
    cols = [("method", "method", "{}"), ("mse", "rel. MSE", "{:.5f}"),
            ("train", "train s", "{:.2f}"), ("encode", "encode s", "{:.3f}"),
            ("first", "distq 1st call s", "{:.2f}")]
    log(f"### 2. Gaussian N(0,1), {n} x 300, m=15, 8 bits\n")
    log(fmt_table(rows, cols) + "\n")
    return rows


def study_encode(args, log):
    n = 200_000 if args.quick else 1_000_000
    rng = np.random.default_rng(2)
    x = rng.standard_normal((n, 128)).astype(np.float32)
    train = x[:65536]
    m, bits = 16, 8
    rows = []
    d = Distq(m, bits)
    d.train(train)
    xj = jnp.asarray(x)  # a JAX library's natural input: the rows already on the device
    jax.block_until_ready(d.encode(xj))
    t, _ = best_of(lambda: d.encode(xj), args.reps_big)
    rows.append({"method": "distq (JAX array in)", "encode": t, "rate": n / t / 1e6})
    t, _ = best_of(lambda: d.encode(x), args.reps_big)
    rows.append({"method": "distq (NumPy array in, incl. the host copy)", "encode": t,
                 "rate": n / t / 1e6})
    if faiss is not None:
        for threads, label in ((None, "faiss (2 threads)"), (1, "faiss (1 thread)")):
            f = Faiss(m, bits, threads=threads)
            f.train(train)
            t, _ = best_of(lambda: f.encode(x), args.reps_big)
            rows.append({"method": label, "encode": t, "rate": n / t / 1e6})
    cols = [("method", "method", "{}"), ("encode", "encode s", "{:.3f}"),
            ("rate", "M rows/s", "{:.2f}")]
    log(f"### 3. Encoding {n} x 128 rows, m=16, 8 bits\n")
    log(fmt_table(rows, cols) + "\n")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--reps", type=int, default=5, help="timed runs, small studies")
    parser.add_argument("--reps-big", type=int, default=3, help="timed runs, big studies")
    parser.add_argument("--only", choices=("clustered", "gaussian", "encode"), default=None)
    args = parser.parse_args()

    lines: list[str] = []

    def log(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    load0 = os.getloadavg()
    log("# Product quantisation on synthetic data\n")
    log(f"jax {jax.__version__}, faiss {getattr(faiss, '__version__', 'absent')}, "
        f"nanopq {getattr(nanopq, '__version__', 'absent')}; {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}); load average at start "
        f"{load0[0]:.1f}.\n")
    log("Relative MSE = sum |x - xhat|^2 / sum |x - mean(x)|^2. Times: best of several runs, "
        "same process, back to back; distq warm (compile time separate).\n")
    if args.only in (None, "clustered"):
        study_clustered(args, log)
    if args.only in (None, "gaussian"):
        study_gaussian(args, log)
    if args.only in (None, "encode"):
        study_encode(args, log)
    log(f"Load average at end: {os.getloadavg()[0]:.1f}. Command: "
        f"`python experiments/pq_synthetic.py{' --quick' if args.quick else ''}`.")
    if not args.quick and args.only is None:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text("\n".join(lines) + "\n")
        print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
