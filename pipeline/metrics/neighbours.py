"""Nearest neighbours by cosine over teacher features, with faiss.

Rows are L2-normalised float32, so inner product = cosine. Small databases get an exact
`IndexFlatIP`; large ones an HNSW graph (the default: 3.8x faster than IVF at higher recall on
1M teacher-like rows, docs/benchmarks/audit-scale/) or an IVF index (nlist ~ 4*sqrt(n)), both over
8-bit codes whose candidates are re-ranked by exact float cosine. The search breadth (nprobe /
efSearch) is raised until recall@1 against exact search reaches a target on a sample of queries,
but never past the point where exact search would be cheaper; the recall is then measured again on
another sample, so that every report says how far an approximate answer may be from the exact one
and whether the target was reached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import faiss
import numpy as np

from pipeline.errors import ArraError

KINDS = ("auto", "exact", "ivf", "hnsw")
EXACT_MAX_ROWS = 50_000  # auto: exact search up to this many database rows, HNSW above
HNSW_M = 32
QUERY_BLOCK = 1 << 25  # queries x max(k, nprobe) per faiss call: bounds the coarse results to ~400 MB
TIE = 1e-5  # an approximate neighbour this close to the exact one's cosine is a hit (ties, rounding)
REFINE = 2  # approximate kinds: k * REFINE candidates from 8-bit codes, re-ranked by exact cosine
MAX_SCAN = 1 / 32  # widen no further than comparing each query with this share of the database:
# approximate scans run ~10x slower per pair than exact search's matrix products, so wider would
# cost about as much as exact search
HNSW_MIN_EF = 16


def normalise(x: np.ndarray) -> np.ndarray:
    """float32 C-contiguous rows of unit L2 norm (all-zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


@dataclass
class Neighbours:
    """A faiss index over `db` (normalised rows) and what a report must say about it."""

    db: np.ndarray
    kind: str
    index: faiss.Index
    params: dict = field(default_factory=dict)
    recall: float = 1.0  # recall@1 against exact search; 1 by construction for `exact`
    recall_queries: int = 0  # queries the recall was measured on (0: not measured, exact)
    recall_target: float | None = None
    widest: bool = False  # the tuning stopped at the widest search allowed, short of the target

    def search(self, queries: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(cosines, row ids), each n x k, best first; ids are -1 where fewer than k were found.
        `queries=None` is the self-join: every database row against the others, its own row left out."""
        if queries is not None:
            return self._search(queries, min(k, self.db.shape[0]))
        k = min(k, self.db.shape[0] - 1)
        sims, ids = self._search(self.db, k + 1)
        return drop_self(sims, ids, np.arange(len(ids)))

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """In blocks of queries: faiss IVF holds n x nprobe coarse results at once (48 GB for
        a million queries at nprobe 4096)."""
        step = max(1024, QUERY_BLOCK // max(k, self.params.get("nprobe", 1)))
        parts = [self.index.search(queries[s:s + step], k) for s in range(0, max(len(queries), 1), step)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def describe(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        if self.kind == "exact":
            return f"exact (IndexFlatIP over {self.db.shape[0]} rows): recall@1 = 1 by construction"
        text = (f"{self.kind} ({params}) over {self.db.shape[0]} rows: recall@1 against exact search "
                f"{self.recall:.4f} measured on {self.recall_queries} sampled queries")
        if self.widest:
            text += (f"; WARNING: the search stopped widening short of the recall target {self.recall_target} "
                     f"(wider would cost about as much as exact search): pass --index exact for exact answers")
        return text

    def to_dict(self) -> dict:
        return {"kind": self.kind, "rows": int(self.db.shape[0]), "params": self.params,
                "recall_at_1": self.recall, "recall_queries": self.recall_queries,
                "recall_target": self.recall_target, "stopped_at_widest_search": self.widest}


def drop_self(sims: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own row from its k+1 results; where it is absent (an exact duplicate
    group larger than k+1, or an approximate miss) the last result goes instead."""
    own = ids == rows[:, None]
    own[~own.any(1), -1] = True
    keep = ~own
    k = ids.shape[1] - 1
    return sims[keep].reshape(-1, k), ids[keep].reshape(-1, k)


def choose_kind(n: int, kind: str = "auto") -> str:
    if kind not in KINDS:
        raise ArraError(f"index must be one of {', '.join(KINDS)}, not {kind!r}")
    return ("exact" if n <= EXACT_MAX_ROWS else "hnsw") if kind == "auto" else kind


def build(db: np.ndarray, kind: str = "auto", queries: np.ndarray | None = None, recall_target: float = 0.95,
          sample: int = 1000, seed: int = 0) -> Neighbours:
    """Index `db` (normalised float32 rows). For approximate kinds, tune the search breadth on
    one sample of `queries` (None: the self-join, queries are the database rows) and measure
    recall@1 on another."""
    n, d = db.shape
    kind = choose_kind(n, kind)
    if kind == "exact":
        index = faiss.IndexFlatIP(d)
        index.add(db)
        return Neighbours(db, kind, index)
    if kind == "ivf":
        nlist = max(1, min(round(4 * math.sqrt(n)), n // 39))  # faiss wants >= 39 training points a list
        base = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(d), d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                             faiss.METRIC_INNER_PRODUCT)
        base.cp.niter = 10  # faiss's default 25: k-means is the bulk of building a 1M IVF index
        train = db[np.random.default_rng(seed).choice(n, min(n, 40 * nlist), replace=False)]
        steps, setter = _doublings(1, max(1, int(nlist * MAX_SCAN))), lambda v: setattr(base, "nprobe", v)
        params = {"nlist": nlist}
    else:
        base = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_8bit, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        train = db  # the 8-bit ranges of each dimension: one pass over every row
        widest = max(4 * HNSW_MIN_EF, int(n * MAX_SCAN / (2 * HNSW_M)))  # efSearch e compares with up to 2M*e rows
        steps, setter = _doublings(HNSW_MIN_EF, widest), lambda v: setattr(base.hnsw, "efSearch", v)
        params = {"M": HNSW_M}
    base.train(np.ascontiguousarray(train))
    index = faiss.IndexRefineFlat(base)
    index.k_factor = REFINE
    index.add(db)
    params |= {"codes": "SQ8", "refine": REFINE}
    nb = Neighbours(db, kind, index, params, recall_target=recall_target)
    tune_rows = sample_rows(db if queries is None else queries, sample // 2, seed + 1)
    exact = exact_top1(db, queries, tune_rows)
    for value in steps:
        setter(value)
        if recall_at_1(nb, queries, tune_rows, exact) >= recall_target:
            break
    else:
        nb.widest = True
    nb.params["nprobe" if kind == "ivf" else "efSearch"] = value
    rows = sample_rows(db if queries is None else queries, sample, seed)
    nb.recall, nb.recall_queries = recall_at_1(nb, queries, rows), len(rows)
    return nb


def _doublings(start: int, stop: int) -> list[int]:
    steps = [start]
    while steps[-1] < stop:
        steps.append(min(steps[-1] * 2, stop))
    return steps


def sample_rows(x: np.ndarray, size: int, seed: int) -> np.ndarray:
    n = x.shape[0]
    return np.sort(np.random.default_rng(seed).choice(n, min(n, size), replace=False))


def _top1(search, db: np.ndarray, queries: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
    """Best cosine of each sampled query (a row of `queries`, or of `db` for the self-join);
    `search(q, k)` returns faiss's (cosines, ids)."""
    if queries is not None:
        return search(np.ascontiguousarray(queries[rows]), 1)[0][:, 0]
    sims, ids = search(np.ascontiguousarray(db[rows]), 2)
    return drop_self(sims, ids, rows)[0][:, 0]


def exact_top1(db: np.ndarray, queries: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
    """Brute force with `faiss.knn` (BLAS, no copy of the database)."""
    return _top1(lambda q, k: faiss.knn(q, db, k, metric=faiss.METRIC_INNER_PRODUCT), db, queries, rows)


def recall_at_1(nb: Neighbours, queries: np.ndarray | None, rows: np.ndarray, exact: np.ndarray | None = None) -> float:
    """Share of sampled queries whose approximate nearest neighbour is as close as the exact one
    (within `TIE`, so that equally close neighbours, e.g. exact duplicates, count as found)."""
    exact = exact_top1(nb.db, queries, rows) if exact is None else exact
    return float(np.mean(_top1(nb.index.search, nb.db, queries, rows) >= exact - TIE))
