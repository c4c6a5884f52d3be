"""Two-sample tests for real-env scores: a controller's episode returns against a baseline's.

``compare(a, b)`` gives Welch's t-test and the Mann-Whitney U test (two-sided), from scipy when it is
installed, else from the large-sample normal approximations below (accurate for n >= 30 per group, the
sizes the World Models presets use; the result says which was used).
"""

from __future__ import annotations

import math

import numpy as np


def _normal_sf(x: float) -> float:
    """P(N(0, 1) > x)."""
    return 0.5 * math.erfc(x / math.sqrt(2))


def welch(a, b) -> tuple[float, float]:
    """Welch's t statistic and its two-sided p-value (normal approximation to the t distribution)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    if se == 0:
        return (0.0, 1.0) if a.mean() == b.mean() else (math.copysign(math.inf, a.mean() - b.mean()), 0.0)
    t = (a.mean() - b.mean()) / se
    return float(t), float(2 * _normal_sf(abs(t)))


def mann_whitney(a, b) -> tuple[float, float]:
    """Mann-Whitney U of ``a`` and its two-sided p-value (normal approximation, tie-corrected,
    continuity-corrected, as scipy's asymptotic method)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n1, n2 = len(a), len(b)
    both = np.concatenate([a, b])
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    below = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ranks = (below + (counts + 1) / 2)[inverse]  # mid-ranks (1-based)
    u = ranks[:n1].sum() - n1 * (n1 + 1) / 2
    n = n1 + n2
    var = n1 * n2 / 12 * ((n + 1) - (counts**3 - counts).sum() / (n * (n - 1)))
    if var <= 0:
        return float(u), 1.0
    z = (abs(u - n1 * n2 / 2) - 0.5) / math.sqrt(var)
    return float(u), float(min(1.0, 2 * _normal_sf(max(z, 0.0))))


def compare(a, b) -> dict:
    """Controller returns ``a`` vs baseline returns ``b`` -> means, difference, Welch t and Mann-Whitney U
    (two-sided p-values) and the implementation used ("scipy" or "normal approximation")."""
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    if min(len(a), len(b)) < 2:
        raise ValueError(f"a two-sample test needs >= 2 returns per group, got {len(a)} and {len(b)}")
    try:
        if a.std() == 0 and b.std() == 0:
            raise ImportError  # scipy's t-test warns and gives nan on constant groups: use ours
        from scipy import stats

        t = stats.ttest_ind(a, b, equal_var=False)
        u = stats.mannwhitneyu(a, b, alternative="two-sided")
        welch_t, welch_p, mw_u, mw_p = (
            float(t.statistic),
            float(t.pvalue),
            float(u.statistic),
            float(u.pvalue),
        )
        how = "scipy"
    except ImportError:
        (welch_t, welch_p), (mw_u, mw_p) = welch(a, b), mann_whitney(a, b)
        how = "normal approximation"
    return {
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "n_a": len(a),
        "n_b": len(b),
        "difference": float(a.mean() - b.mean()),
        "welch_t": welch_t,
        "welch_p": welch_p,
        "mann_whitney_u": mw_u,
        "mann_whitney_p": mw_p,
        "implementation": how,
    }
