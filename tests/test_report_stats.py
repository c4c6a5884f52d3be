"""Paired, clustered statistics on hand-checkable values and a coverage simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wmlab.report.stats import (
    binomial_two_sided,
    chance_of_perfect_rank,
    compare_means,
    compare_rates,
    episode_auc,
    hierarchical_bootstrap,
    holm,
    mcnemar_exact,
    paired_cells,
    permutation_spearman,
    reached_within,
)


def test_exact_mcnemar_on_known_tables():
    # 7 discordant cells one way, 1 the other: P(X <= 1 | n=8, 1/2) = 9/256, two-sided 18/256.
    assert mcnemar_exact(7, 1) == pytest.approx(18 / 256)
    assert mcnemar_exact(1, 7) == mcnemar_exact(7, 1)
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    # The demo: random_vit 11 vs pixels 10 of 20 at the final step, e.g. 3 vs 2 discordant.
    assert mcnemar_exact(3, 2) == 1.0
    assert binomial_two_sided(0, 10) == pytest.approx(2 / 1024)
    scipy_stats = pytest.importorskip("scipy.stats")
    for k, n in ((3, 17), (12, 30), (0, 1)):
        assert binomial_two_sided(k, n) == pytest.approx(scipy_stats.binomtest(k, n).pvalue)


def test_holm_adjustment_by_hand():
    # Sorted 0.01, 0.03, 0.04 -> x3, x2, x1 = 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06.
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    adjusted = holm([0.5, np.nan, 0.2])
    assert math.isnan(adjusted[1]) and adjusted[0] == pytest.approx(0.5) and adjusted[2] == pytest.approx(0.4)
    np.testing.assert_allclose(holm([0.9, 0.8]), [1.0, 1.0])  # 0.8 x 2 capped at 1; 0.9 kept monotone


def test_paired_rates_count_discordant_cells_on_shared_pairs():
    # Two seeds x 4 pairs; B lacks pair 3 of seed 1 (that cell drops out of both sides).
    a = {0: {0: 1, 1: 1, 2: 1, 3: 0}, 1: {0: 1, 1: 1, 2: 0, 3: 1}}
    b = {0: {0: 0, 1: 1, 2: 0, 3: 0}, 1: {0: 0, 1: 1, 2: 0}, 2: {0: 1}}  # seed 2 has no partner
    seeds, pairs, A, B = paired_cells(a, b)
    assert seeds == [0, 1] and pairs == [0, 1, 2, 3] and np.isnan(A[1, 3]) and np.isnan(B[1, 3])
    out = compare_rates(a, b, n_boot=200)
    assert (out["n"], out["a_only"], out["b_only"]) == (7, 3, 0)
    assert out["p"] == pytest.approx(mcnemar_exact(3, 0)) == pytest.approx(0.25)
    # Seed-then-pair means: A = (3/4 + 2/3) / 2, B = (1/4 + 1/3) / 2.
    assert out["rate_a"] == pytest.approx((0.75 + 2 / 3) / 2) and out["rate_b"] == pytest.approx(7 / 24)
    assert out["diff"] == pytest.approx(out["rate_a"] - out["rate_b"])
    d = compare_means({0: {0: 1.0, 1: 2.0}}, {0: {0: 0.5, 1: 1.0}}, n_boot=200)
    assert d["diff"] == pytest.approx(0.75) and 0.5 <= d["lo"] <= d["hi"] <= 1.0


def test_hierarchical_bootstrap_covers_the_truth_in_a_simulation():
    """Crossed seeds x pairs: y = seed effect + pair effect + noise, true mean 0.

    Resampling pairs once per replicate (they are shared by all seeds) covers near 95%; drawing
    them afresh per seed (treating a seed's pairs as its own) or pooling cells as independent
    trials does not.
    """
    rng = np.random.default_rng(1)
    S, P, n_sims = 3, 40, 150
    cover = {"shared": 0, "nested": 0, "pooled": 0}
    for i in range(n_sims):
        y = rng.normal(0, 0.1, (S, 1)) + rng.normal(0, 1.0, (1, P)) + rng.normal(0, 0.5, (S, P))
        for mode in ("shared", "nested"):
            iv = hierarchical_bootstrap(y, n_boot=300, seed=i, pairs=mode)
            cover[mode] += iv.lo <= 0 <= iv.hi
        se = y.std(ddof=1) / math.sqrt(y.size)
        cover["pooled"] += abs(y.mean()) <= 1.96 * se
    rate = {k: v / n_sims for k, v in cover.items()}
    assert 0.88 <= rate["shared"] <= 1.0, rate
    assert rate["nested"] < rate["shared"] - 0.08 and rate["pooled"] < 0.85, rate


def test_bootstrap_edge_cases():
    iv = hierarchical_bootstrap(np.ones((2, 5)))
    assert (iv.estimate, iv.lo, iv.hi) == (1.0, 1.0, 1.0) and iv.excludes_zero
    assert iv.p_zero == 0.0  # every replicate is 1: no doubt the mean differs from 0
    empty = hierarchical_bootstrap(np.full((2, 3), np.nan))
    assert math.isnan(empty.estimate) and empty.n_seeds == 0
    one_seed = hierarchical_bootstrap([0.0, 1.0, 0.0, 1.0])
    assert one_seed.n_seeds == 1 and one_seed.estimate == 0.5 and one_seed.lo < 0.5 < one_seed.hi
    # p from the bootstrap standard error: mean 0.5 of a 0/1 column with se ~ 0.5 / sqrt(40) -> z ~ 6.3.
    coin = np.tile([0.0, 1.0], 20)
    assert hierarchical_bootstrap(coin, n_boot=4000).p_zero < 1e-6
    assert hierarchical_bootstrap(coin - 0.5, n_boot=4000).p_zero == 1.0  # estimate exactly 0
    with pytest.raises(ValueError, match="shared"):
        hierarchical_bootstrap(np.ones((2, 2)), pairs="other")


def test_permutation_spearman_needs_eight_encoders():
    small = permutation_spearman([1, 2, 3], [3, 4, 5])
    assert small["too_few"] and math.isnan(small["rho"])
    assert chance_of_perfect_rank(3) == pytest.approx(1 / 3)  # the "1 time in 3"
    exact = permutation_spearman(range(8), range(8))
    assert exact["exact"] and exact["rho"] == pytest.approx(1.0)
    assert exact["p"] == pytest.approx(2 / math.factorial(8))  # only the identity and its reverse
    rng = np.random.default_rng(0)
    x = rng.normal(size=12)
    noisy = permutation_spearman(x, rng.normal(size=12), n_perm=2000)
    assert not noisy["exact"] and 0.05 < noisy["p"] <= 1.0
    strong = permutation_spearman(x, x + 0.1 * rng.normal(size=12), n_perm=2000)
    assert strong["p"] < 0.01


def test_budget_curve_and_area_by_hand():
    first = [0, 10, 25, None, 100]
    np.testing.assert_allclose(reached_within(first, [0, 10, 24, 25, 100]), [0.2, 0.4, 0.4, 0.6, 0.8])
    assert episode_auc(None, 100) == 0.0 and episode_auc(0, 100) == 1.0
    assert episode_auc(25, 100) == pytest.approx(0.75) and episode_auc(150, 100) == 0.0
    # The mean per-episode area equals the area under the share-reached step curve.
    grid = np.arange(0, 101)
    curve = reached_within(first, grid)
    area = curve[:-1].sum() / 100  # left Riemann sum of a right-continuous step function
    assert np.mean([episode_auc(f, 100) for f in first]) == pytest.approx(area)
