"""Per-teacher feature statistics of a feature set (rows, norms, largest value), kept as sums so that
batches, shards and ranks merge exactly; the manifest records their summary."""

from __future__ import annotations

import math

import numpy as np



def feature_sums(feats: np.ndarray) -> dict:
    f = feats.astype(np.float32)
    finite = np.isfinite(f).all(axis=1)
    norms = np.linalg.norm(f[finite], axis=1).astype(np.float64)
    return {"rows": int(finite.sum()), "nonfinite_rows": int((~finite).sum()),
            "norm_sum": float(norms.sum()), "norm_sq_sum": float((norms ** 2).sum()),
            "norm_min": float(norms.min()) if len(norms) else None,
            "norm_max": float(norms.max()) if len(norms) else None,
            "abs_max": float(np.abs(f[finite]).max()) if finite.any() else None}


def add_sums(a: dict, b: dict) -> dict:
    both = lambda k, fn: fn(v for v in (a[k], b[k]) if v is not None) if (a[k], b[k]) != (None, None) else None  # noqa: E731
    return {"rows": a["rows"] + b["rows"], "nonfinite_rows": a["nonfinite_rows"] + b["nonfinite_rows"],
            "norm_sum": a["norm_sum"] + b["norm_sum"], "norm_sq_sum": a["norm_sq_sum"] + b["norm_sq_sum"],
            "norm_min": both("norm_min", min), "norm_max": both("norm_max", max), "abs_max": both("abs_max", max)}


def summarize(sums: dict) -> dict:
    n = sums["rows"]
    mean = sums["norm_sum"] / n if n else None
    std = math.sqrt(max(sums["norm_sq_sum"] / n - mean ** 2, 0.0)) if n else None
    return {"rows": n, "nonfinite_rows": sums["nonfinite_rows"], "norm_mean": mean, "norm_std": std,
            "norm_min": sums["norm_min"], "norm_max": sums["norm_max"], "abs_max": sums["abs_max"]}


EMPTY_SUMS = feature_sums(np.zeros((0, 1), np.float16))
