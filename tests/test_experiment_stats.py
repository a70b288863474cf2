"""The paired comparison's statistics (pipeline/metrics/significance.py) against scipy.stats, an
independent implementation: Student's t tail and critical values, the paired t-test, the power of
the test (noncentral t) and the seeds a difference needs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.metrics.significance import paired_test, seeds_for_power, t_critical, t_test_power, t_two_sided_p

stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 8, 29, 100, 999])
def test_t_tail_and_critical_value_equal_scipys(df):
    for t in (0.0, 0.1, 1.0, 2.5, 7.0, 40.0):
        assert t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(t, df), rel=1e-9, abs=1e-13)
        assert t_two_sided_p(-t, df) == t_two_sided_p(t, df)
    assert t_critical(df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9)
    assert t_critical(df, 0.01) == pytest.approx(stats.t.ppf(0.995, df), rel=1e-9)


def test_t_tail_by_hand():
    assert t_two_sided_p(1.0, 1) == pytest.approx(0.5)  # Cauchy: 1 - 2/pi atan(1)
    assert t_two_sided_p(5.0, 2) == pytest.approx(1 - 5 / math.sqrt(27))  # 1 - t / sqrt(t^2 + 2)
    with pytest.raises(ValueError):
        t_two_sided_p(1.0, 0)


def test_paired_test_equals_scipys_ttest_rel():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 12):
        base = rng.normal(100, 5, n)
        arm = base + rng.normal(-1.5, 2, n)
        d = paired_test(list(arm - base))
        ref = stats.ttest_rel(arm, base)
        assert d["t"] == pytest.approx(ref.statistic, rel=1e-12) and d["p_value"] == pytest.approx(ref.pvalue, rel=1e-8)
        ci = ref.confidence_interval(0.95)
        assert d["ci95"] == pytest.approx([ci.low, ci.high], rel=1e-8)
        assert d["resolved"] == (ref.pvalue < 0.05)


@pytest.mark.parametrize("n", [2, 3, 5, 10, 50])
def test_power_equals_the_noncentral_t(n):
    for effect in (0.1, 0.5, 1.0, 2.0):
        df, crit = n - 1, stats.t.ppf(0.975, n - 1)
        nc = effect * math.sqrt(n)
        expected = stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)
        if not math.isnan(expected):
            assert t_test_power(effect, n) == pytest.approx(expected, abs=1e-8)
    assert t_test_power(0.0, n) == pytest.approx(0.05, abs=1e-8)  # no difference: rejected at the test's level


def test_seeds_for_power_is_the_first_n_reaching_80_percent():
    def brute(effect):
        for n in range(2, 1001):
            crit, nc = stats.t.ppf(0.975, n - 1), effect * math.sqrt(n)
            if stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc) >= 0.8:
                return n
    for mean, sd in ((1.0, 0.2), (-0.37, 0.6), (0.4, 3.4), (2.0, 1.0), (0.15, 1.0)):
        assert seeds_for_power(mean, sd) == brute(abs(mean) / sd)
    assert seeds_for_power(0.01, 10.0) is None  # more than 1000 seeds
    assert seeds_for_power(0.0, 1.0) is None and seeds_for_power(1.0, None) is None
    assert seeds_for_power(1.0, 0.0) == 2
