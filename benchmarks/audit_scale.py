"""Audit at scale: a near-duplicate self-join of N x D clustered random features with an
approximate faiss index, against exact search.

What `arra-pipe audit dedup` does after reading the set: build the index (IVF: k-means on a
sample, add every row; HNSW: add every row), widen the search until recall@1 against exact search
reaches the target on 500 sampled queries, measure recall@1 on 1000 other sampled queries, then
search the k nearest neighbours of every row. Printed: each phase's wall time, the total, the
measured recall, and the exact self-join (IndexFlatIP) of the first --exact-rows rows for
comparison, with its quadratic extrapolation to N clearly labelled as such. --dupes rows are
overwritten with near copies (cosine about 0.999) of others; the share of those pairs found at or
above cosine 0.95 is the recall that matters to `dedup`.

Features: --clusters centres ~ N(0, I), each row a centre plus --noise * N(0, I), L2-normalised
(within-cluster cosine about 1 / (1 + noise^2)), as teacher features of a dataset with many
look-alike images.

    .venv/bin/python benchmarks/audit_scale.py [--rows 1000000] [--dim 512] [--index ivf|hnsw] [--exact-rows 100000]
"""

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline import neighbours  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--rows", type=int, default=1_000_000)
p.add_argument("--dim", type=int, default=512)
p.add_argument("--clusters", type=int, help="default: rows / 100")
p.add_argument("--noise", type=float, default=1.5)
p.add_argument("--dupes", type=int, default=1000, help="planted near-duplicate pairs")
p.add_argument("--index", choices=["ivf", "hnsw"], default="ivf")
p.add_argument("--k", type=int, default=10, help="neighbours per row, as `audit dedup --k`")
p.add_argument("--recall-target", type=float, default=0.95)
p.add_argument("--recall-queries", type=int, default=1000)
p.add_argument("--exact-rows", type=int, default=100_000, help="rows of the exact self-join (0: skip)")
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()


def features(n: int, d: int, clusters: int, noise: float, seed: int, chunk: int = 100_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    x = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        x[s:e] = centres[rng.integers(0, clusters, e - s)] + noise * rng.standard_normal((e - s, d), dtype=np.float32)
        x[s:e] /= np.linalg.norm(x[s:e], axis=1, keepdims=True)
    return x


def plant_dupes(x: np.ndarray, pairs: int, seed: int) -> np.ndarray:
    """Overwrite row b with a near copy of row a for `pairs` disjoint (a, b); returns them."""
    rng = np.random.default_rng(seed + 1)
    ab = rng.choice(len(x), 2 * pairs, replace=False).reshape(pairs, 2)
    copies = x[ab[:, 0]] + 0.03 * rng.standard_normal((pairs, x.shape[1]), dtype=np.float32) / np.sqrt(x.shape[1])
    x[ab[:, 1]] = copies / np.linalg.norm(copies, axis=1, keepdims=True)
    return ab


def timed(label: str, fn):
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    print(f"  {label:46s} {dt:8.1f} s", flush=True)
    return out, dt


print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; {args.rows} x {args.dim} float32, "
      f"{args.clusters or args.rows // 100} clusters, noise {args.noise}")
x, _ = timed("generate features (not part of the audit)",
             lambda: features(args.rows, args.dim, args.clusters or max(1, args.rows // 100), args.noise, args.seed))
planted = plant_dupes(x, args.dupes, args.seed)

print(f"approximate self-join ({args.index}, k={args.k}):")
nb, t_build = timed("build + tune + measure recall", lambda: neighbours.build(
    x, args.index, recall_target=args.recall_target, sample=args.recall_queries, seed=args.seed))
(sims, ids), t_search = timed(f"search {args.k} neighbours of every row", lambda: nb.search(None, args.k))
total = t_build + t_search
print(f"  {'total':46s} {total:8.1f} s")
print(f"index: {nb.describe()}")
a, b = planted[:, 0], planted[:, 1]
found = (((ids[a] == b[:, None]) & (sims[a] >= 0.95)).any(1) | ((ids[b] == a[:, None]) & (sims[b] >= 0.95)).any(1)).mean()
print(f"planted near-duplicate pairs found at cosine >= 0.95: {found:.4f} of {len(planted)}")
print(f"RESULT {args.index} {args.rows} x {args.dim}: {total:.1f} s wall, recall@1 {nb.recall:.4f} "
      f"({nb.recall_queries} queries), {faiss.omp_get_max_threads()} threads")

if args.exact_rows:
    m = min(args.exact_rows, args.rows)
    sub = np.ascontiguousarray(x[:m])
    print(f"exact self-join of the first {m} rows (IndexFlatIP, k={args.k}):")
    _, t_exact = timed("build + search", lambda: neighbours.build(sub, "exact").search(None, args.k))
    print(f"RESULT exact {m} x {args.dim}: {t_exact:.1f} s wall")
    if m < args.rows:
        guess = t_exact * (args.rows / m) ** 2
        print(f"EXTRAPOLATION (not measured): exact self-join of {args.rows} rows ~ {guess:.0f} s "
              f"(x (N/{m})^2); the approximate audit was {guess / total:.1f}x faster than that")
