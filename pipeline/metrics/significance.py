"""Paired comparisons over seeds: Student's t distribution for integer degrees of freedom, the
paired t-test, and the power of that test (how many seeds a difference of a given size needs).

No scipy: the central t's two-sided tail is the closed form for integer degrees of freedom
(Abramowitz & Stegun 26.7.3-26.7.4), and the noncentral t behind the power is an integral over
the chi distribution of the sample sd, taken numerically (Simpson's rule). Both are checked
against scipy.stats in tests/test_experiment_stats.py.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import torch

ALPHA = 0.05   # two-sided test level
POWER = 0.80   # the usual power for "how many seeds would resolve it"
MAX_SEEDS = 1000


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with an integer number of degrees of freedom >= 1."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, not {df}")
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:  # odd: (2/pi) [theta + sin(theta) (cos + 2/3 cos^3 + 2*4/(3*5) cos^5 + ...)], up to cos^(df-2)
        term = total = math.cos(theta) if df > 1 else 0.0
        for k in range(3, df - 1, 2):
            term *= (k - 1) / k * c2
            total += term
        inside = 2 / math.pi * (theta + s * total)
    else:  # even: sin(theta) (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), up to cos^(df-2)
        term = total = 1.0
        for k in range(2, df - 1, 2):
            term *= (k - 1) / k * c2
            total += term
        inside = s * total
    return min(1.0, max(0.0, 1.0 - inside))


def t_critical(df: int, alpha: float = ALPHA) -> float:
    """The two-sided critical value: P(|T| >= t) = alpha (bisection on the closed form)."""
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > alpha:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > alpha else (lo, mid)
        if hi - lo < 1e-12 * hi:
            break
    return (lo + hi) / 2


def _simpson(y: np.ndarray, h: float) -> float:
    return float(h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum()))


def t_test_power(effect: float, n: int, alpha: float = ALPHA, points: int = 20001) -> float:
    """Power of the two-sided one-sample (paired) t-test with n pairs when the true mean difference
    is `effect` standard deviations: P(|T'| > t_crit) for the noncentral t with n - 1 degrees of
    freedom and noncentrality effect * sqrt(n). T' = (Z + delta) / S with S = sqrt(V / df),
    V ~ chi^2(df); the probability is integrated over the density of S."""
    df, delta = n - 1, abs(effect) * math.sqrt(n)
    crit = t_critical(df, alpha)
    s = np.linspace(0.0, 1.0 + 12.0 / math.sqrt(df), points)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_density = (math.log(2) + (df / 2) * math.log(df / 2) - math.lgamma(df / 2)
                       + (df - 1) * np.log(s) - df * s * s / 2)
    density = np.exp(log_density)
    if df == 1:
        density[0] = math.exp(math.log(2) + 0.5 * math.log(0.5) - math.lgamma(0.5))
    cs = torch.from_numpy(crit * s)
    reject = (torch.special.ndtr(delta - cs) + torch.special.ndtr(-cs - delta)).numpy()
    return min(1.0, _simpson(density * reject, s[1] - s[0]))


def seeds_for_power(mean: float, sd: float | None, power: float = POWER, alpha: float = ALPHA,
                    limit: int = MAX_SEEDS) -> int | None:
    """The fewest pairs (>= 2) at which the paired t-test detects a true difference `mean` with
    per-pair sd `sd` with the given power; None when more than `limit` or no difference."""
    if sd is None or mean == 0:
        return None
    if sd == 0:
        return 2
    effect = abs(mean) / sd
    if t_test_power(effect, 2, alpha) >= power:
        return 2
    lo, hi = 2, 4
    while t_test_power(effect, hi, alpha) < power:
        if hi >= limit:
            return None
        lo, hi = hi, min(2 * hi, limit)
    while hi - lo > 1:  # power grows with n: lo falls short, hi reaches it
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if t_test_power(effect, mid, alpha) >= power else (mid, hi)
    return hi


def paired_test(diffs: list[float], alpha: float = ALPHA, power: float = POWER) -> dict:
    """Mean and sd of per-seed differences, the two-sided paired t-test (t, p) and the 1 - alpha
    t interval of the mean, and the seeds that would detect a true difference of the observed mean
    and sd with the given power."""
    n, mean = len(diffs), statistics.fmean(diffs)
    sd = statistics.stdev(diffs) if n > 1 else None
    out = {"n_pairs": n, "mean_diff": mean, "sd_diff": sd, "t": None, "p_value": None, "ci95": None,
           "resolved": False, "seeds_to_resolve": seeds_for_power(mean, sd, power, alpha)}
    if sd is None:
        return out
    se = sd / math.sqrt(n)
    t = mean / se if se else (math.inf if mean else 0.0)
    half = t_critical(n - 1, alpha) * se
    out.update(t=t, p_value=t_two_sided_p(t, n - 1), ci95=[mean - half, mean + half], resolved=abs(mean) > half)
    return out
