"""FID as the field computes it: KID against a direct O(n^2) computation, TF 1.x's legacy bilinear
resize into Inception, and the class-balanced reference order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.metrics import distribution
from pipeline.metrics.distribution import fd, kid, mmd2_unbiased
from pipeline.models.inception import tf_legacy_bilinear
from stages.evaluate import class_balanced_order, real_vs_real


def direct_mmd2(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, pair by pair."""
    d = x.shape[1]

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_mmd2_equals_the_direct_pairwise_sum():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.3, 1.2, size=(9, 5))
    assert mmd2_unbiased(x, y) == pytest.approx(direct_mmd2(x, y), rel=1e-12)
    assert kid(x[:9], y)[0] == pytest.approx(direct_mmd2(x[:9], y), rel=1e-12)  # equal sizes, whole sets: one subset
    assert kid(x[:9], y)[1:] == (0.0, 9)


@pytest.mark.parametrize("kernel_rows", [0, 10 ** 6])  # per-subset kernels, and one kernel read by block
def test_kid_is_the_mean_over_subsets_drawn_without_replacement(monkeypatch, kernel_rows):
    monkeypatch.setattr(distribution, "KID_KERNEL_ROWS", kernel_rows)
    rng = np.random.default_rng(1)
    g, r = rng.normal(size=(15, 4)), rng.normal(0.5, 1.0, size=(20, 4))
    mean, sd, m = kid(g, r, subset_size=6, subsets=7, seed=3)
    draws = np.random.default_rng(3)
    values = []
    for _ in range(7):
        i, j = draws.choice(15, 6, replace=False), draws.choice(20, 6, replace=False)
        values.append(direct_mmd2(g[i], r[j]))
    assert m == 6 and mean == pytest.approx(np.mean(values), rel=1e-10) and sd == pytest.approx(np.std(values, ddof=1), rel=1e-8)


def test_kid_is_unbiased_where_fd_is_not():
    """Two samples of one distribution: KID averages to 0 at n = 10, FD sits far above 0 at that n."""
    rng = np.random.default_rng(2)
    kids, fds = [], []
    for _ in range(300):
        x, y = rng.normal(size=(10, 3)), rng.normal(size=(10, 3))
        kids.append(mmd2_unbiased(x, y))
        fds.append(fd(x, y))
    se = np.std(kids, ddof=1) / np.sqrt(len(kids))
    assert abs(np.mean(kids)) < 3 * se and np.mean(fds) > 20 * se
    shifted = [mmd2_unbiased(rng.normal(size=(10, 3)), rng.normal(1.0, 1.0, size=(10, 3))) for _ in range(300)]
    assert np.mean(shifted) > 10 * se  # a real difference is seen


def test_tf_legacy_bilinear_by_hand():
    row = torch.tensor([[[[0.0, 10.0]]]])
    # output pixel i samples the input at i * 2 / 4: 0, 0.5, 1, 1.5 (past the edge: the last pixel repeats)
    assert tf_legacy_bilinear(row, (1, 4)).flatten().tolist() == [0.0, 5.0, 10.0, 10.0]
    wide = torch.arange(8.0).view(1, 1, 1, 8)
    assert tf_legacy_bilinear(wide, (1, 4)).flatten().tolist() == [0.0, 2.0, 4.0, 6.0]  # no antialiasing, no half pixel
    col = torch.tensor([0.0, 30.0, 60.0]).view(1, 1, 3, 1)
    assert tf_legacy_bilinear(col, (2, 1)).flatten().tolist() == [0.0, 45.0]  # 0 and 1.5


def test_tf_legacy_bilinear_equals_a_shifted_grid_sample():
    """The same resize written as clean-fid's NVIDIA network does it: grid_sample with the sampling
    grid moved so that output pixel i lands on input coordinate i * in / out."""
    x = torch.rand(2, 3, 28, 20) * 255
    oh, ow = 299, 299
    ys = torch.arange(oh, dtype=torch.float64) * 28 / oh
    xs = torch.arange(ow, dtype=torch.float64) * 20 / ow
    gy, gx = (2 * ys + 1) / 28 - 1, (2 * xs + 1) / 20 - 1  # pixel -> normalised, align_corners=False
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1).float()[None].expand(2, -1, -1, -1)
    expected = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    assert torch.allclose(tf_legacy_bilinear(x), expected, atol=2e-3)
    plain = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    assert (plain - expected).abs().max() > 10  # the half-pixel resize is another image


def test_inception_is_fed_the_tf_legacy_resize_in_the_tf_range():
    from pipeline.models.inception import Inception
    net = Inception()
    seen = []
    net.net = lambda x: (seen.append(x), torch.zeros(len(x), 2048))[1]
    images = np.random.default_rng(0).integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    net.features(images)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    assert torch.equal(seen[0], (tf_legacy_bilinear(x) - 128) / 128)
    legacy = Inception(resize="torch-bilinear")
    legacy.net = net.net
    legacy.features(images)
    assert not torch.allclose(seen[1], seen[0])


def test_class_balanced_order_reads_the_classes_in_turn():
    order, classes = class_balanced_order([0, 0, 0, 1, 1, 2, 2, 2, 2])
    assert classes == 3 and order.tolist() == [0, 3, 5, 1, 4, 6]  # up to the smallest class (2 rows)
    labels = np.repeat(np.arange(10), 30)[np.random.default_rng(0).permutation(300)]
    order, _ = class_balanced_order(labels)
    for n in (10, 40, 100, 300):
        assert np.bincount(labels[order[:n]], minlength=10).tolist() == [n // 10] * 10
    order, classes = class_balanced_order([0, 1, -1, 1])  # a row without a label: kept as is
    assert classes is None and order.tolist() == [0, 1, 2, 3]


def test_real_vs_real_floor_takes_spare_rows_then_another_set_then_a_split():
    rng = np.random.default_rng(0)
    ref, spare, other = rng.normal(size=(30, 2)), rng.normal(size=(12, 2)), rng.normal(size=(40, 2))
    a = real_vs_real(fd, ref, 10, spare, "spare", other, "train")
    assert a["floor"] == fd(spare[:10], ref) and a["floor_n"] == [10, 30] and "(spare)" in a["floor_space"]
    b = real_vs_real(fd, ref, 20, spare, "spare", other, "train")
    assert b["floor"] == fd(other[:20], ref) and "(train)" in b["floor_space"]
    c = real_vs_real(fd, ref, 20, None, "", None, "")
    assert c["floor"] == fd(ref[-20:], ref[:10]) and c["floor_n"] == [20, 10]
    assert real_vs_real(fd, ref, 29, None, "", None, "")["floor"] is None
