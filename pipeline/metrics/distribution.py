"""Distribution metrics on feature matrices: Fréchet distance, KID (unbiased polynomial-kernel MMD),
k-NN precision/recall, and a linear probe used as a conditioning-fidelity proxy. Features are
(n, d) arrays."""

from __future__ import annotations

import numpy as np
import torch


def mean_cov(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1-mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), with the matrix square root taken through
    the symmetric form S1^(1/2) S2 S1^(1/2) so that it stays real and stable."""
    evals, evecs = np.linalg.eigh(sigma1)
    root1 = (evecs * np.sqrt(np.clip(evals, 0, None))) @ evecs.T
    middle = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_sqrt = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def fd(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*mean_cov(a), *mean_cov(b))


def knn_radii(features: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row (exact; the nearest hit is the row itself)."""
    if len(features) <= k:  # no k-th other row: the ball holds everything (as faiss's empty results did)
        return torch.full((len(features),), float("inf"), device=features.device)
    return torch.cat([torch.cdist(features[i:i + chunk], features).topk(k + 1, largest=False).values[:, k]
                      for i in range(0, len(features), chunk)])


def _covered(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Whether each query lies inside some support point's k-NN ball."""
    return torch.cat([(torch.cdist(queries[i:i + chunk], support) <= radii[None]).any(1)
                      for i in range(0, len(queries), chunk)])


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int = 3, device: str = "cpu") -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019): precision = share of generated
    samples inside the real manifold (union of real k-NN balls), recall = the converse. Exact
    k-NN with torch on `device`: the faiss we ship (faiss-cpu) has no GPU search."""
    real, generated = (torch.from_numpy(np.asarray(x, dtype=np.float32)).to(device) for x in (real, generated))
    precision = _covered(generated, real, knn_radii(real, k)).double().mean()
    recall = _covered(real, generated, knn_radii(generated, k)).double().mean()
    return float(precision), float(recall)


def fit_linear_probe(features: np.ndarray, labels: np.ndarray, epochs: int = 200, seed: int = 0):
    """Softmax regression on standardised features (full-batch L-BFGS). Returns predict(features)."""
    torch.manual_seed(seed)
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    mu, sd = x.mean(0), x.std(0) + 1e-6
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    layer = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.LBFGS(layer.parameters(), max_iter=epochs, line_search_fn="strong_wolfe")
    xs = (x - mu) / sd

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(xs), y) + 1e-3 * layer.weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)

    def predict(f: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return layer((torch.from_numpy(np.asarray(f, dtype=np.float32)) - mu) / sd).argmax(-1).numpy()
    return predict


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KID's kernel: k(x, y) = (x . y / d + 1)^3, d the feature width."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _mmd2_from_kernels(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    m, n = len(kxx), len(kyy)
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2 * kxy.mean())


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased squared MMD with the polynomial kernel: the mean of k over distinct pairs within x
    and within y (diagonals left out), minus twice the mean of k between x and y. Its expectation
    is 0 when x and y come from one distribution, so a value can be slightly negative."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return _mmd2_from_kernels(polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y))


KID_KERNEL_ROWS = 12_000  # up to this many rows on both sides together, the kernel is computed once (float64, 1.2 GB)


def kid(generated: np.ndarray, reference: np.ndarray, subset_size: int = 1000, subsets: int = 100,
        seed: int = 0) -> tuple[float, float, int]:
    """Kernel Inception Distance (Bińkowski et al. 2018) as clean-fid and torch-fidelity compute it:
    the unbiased MMD^2 averaged over `subsets` random subsets of `subset_size` rows drawn without
    replacement from each side (fewer when a side is smaller). Returns (mean, sd over subsets, the
    subset size used). Unbiased, so unlike FID its expectation does not depend on n."""
    g, r = np.asarray(generated, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    m = min(subset_size, len(g), len(r))
    if m < 2:
        raise ValueError("KID needs at least 2 rows on each side")
    rng = np.random.default_rng(seed)
    if m == len(g) == len(r):
        subsets = 1  # every subset would be the whole of both sides
    draws = [(rng.choice(len(g), m, replace=False), rng.choice(len(r), m, replace=False)) for _ in range(subsets)]
    if len(g) + len(r) <= KID_KERNEL_ROWS:  # one kernel over both sides; each subset reads its blocks
        both = np.concatenate([g, r])
        k = polynomial_kernel(both, both)
        values = [_mmd2_from_kernels(k[np.ix_(i, i)], k[np.ix_(j + len(g), j + len(g))], k[np.ix_(i, j + len(g))])
                  for i, j in draws]
    else:
        values = [mmd2_unbiased(g[i], r[j]) for i, j in draws]
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, m
