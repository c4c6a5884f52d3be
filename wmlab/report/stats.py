"""Paired, clustered statistics for the representation study (pure numpy).

The study's outcomes form a crossed design: every encoder and every training seed is evaluated on
the same start/goal *pairs*. Two consequences drive everything here:

- **Intervals respect seeds x pairs.** An outcome matrix ``values (S, P)`` (seeds x pairs, NaN where
  a cell is missing) is summarised by the mean over seeds of the mean over pairs, and its interval
  comes from a hierarchical bootstrap: resample seeds with replacement, then resample pairs. Pairs
  are *shared* by all seeds (crossed, not nested), so by default one draw of pair indices serves
  every drawn seed of a replicate; drawing pairs afresh per seed would count a hard pair as S
  independent draws and give intervals too narrow (``pairs="nested"`` does that, for comparison).
  Pooling seeds x pairs as independent trials (a Wilson interval on the pooled count) has the same
  flaw.
- **Comparisons are paired on the shared pairs.** Encoder A vs B: rates by the exact McNemar test
  (a two-sided binomial test on the discordant cells: A succeeded where B failed, and the reverse),
  continuous measures (distances, curve areas) by the hierarchical bootstrap of the per-cell
  difference A - B (percentile interval; p-value from the bootstrap standard error, so it is not
  floored at 1 / n_boot). Several comparisons are adjusted together by Holm's step-down method.

Rank correlations across encoders (a diagnostic vs success) carry a permutation p-value and are
only computed with at least ``MIN_ENCODERS_FOR_CORRELATION`` encoders: with 3 encoders |ρ| = 1 happens
by chance 1 time in 3.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass

import numpy as np

#: Fewest encoders a rank correlation across encoders is computed with (below: "too few to tell").
MIN_ENCODERS_FOR_CORRELATION = 8
#: Bootstrap replicates by default (percentile intervals; p-values resolve down to ~1 / n_boot).
N_BOOT = 2000


# ---------------------------------------------------------------------------------------- tests
def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n fair coin flips (p = 1/2).

    Twice the smaller tail, capped at 1 (the symmetric binomial's "doubling" and "as likely or less"
    definitions agree). n = 0 gives 1.
    """
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 1.0
    low = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(low + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def mcnemar_exact(b: int, c: int) -> float:
    """Exact McNemar p-value from the discordant counts of a paired 2x2 table.

    Args:
        b: cells where A succeeded and B failed.
        c: cells where B succeeded and A failed.
    Returns:
        Two-sided p: under "A and B are equally good" each discordant cell is a fair coin flip.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    return binomial_two_sided(int(b), int(b) + int(c))


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjustment of m p-values (m,) -> adjusted float64 (m,), same order.

    Sorted ascending, the i-th (0-based) p is multiplied by m - i, then a running maximum keeps
    the adjusted values monotone; capped at 1. NaN p-values stay NaN and do not count in m.
    """
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    out = np.full_like(p, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = len(finite)
    if m == 0:
        return out
    order = finite[np.argsort(p[finite], kind="mergesort")]
    adjusted = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    out[order] = np.minimum(adjusted, 1.0)
    return out


# ---------------------------------------------------------------------------------------- bootstrap
@dataclass(frozen=True)
class Interval:
    """A bootstrap summary: the estimate, its percentile interval and the two-sided p of "mean = 0"."""

    estimate: float
    lo: float
    hi: float
    p_zero: float
    n_seeds: int
    n_pairs: int

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    """nanmean without numpy's "mean of empty slice" warning (an all-NaN row is an honest NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def seed_pair_mean(values) -> float:
    """Mean over seeds of the mean over pairs of values (S, P), NaN cells left out."""
    v = np.asarray(values, dtype=np.float64)
    return float(_nanmean(_nanmean(v, axis=-1), axis=-1))


def hierarchical_bootstrap(
    values,
    *,
    n_boot: int = N_BOOT,
    level: float = 0.95,
    seed: int = 0,
    pairs: str = "shared",
    chunk: int = 500,
) -> Interval:
    """Interval of the seed-then-pair mean of ``values`` (S, P) by resampling seeds, then pairs.

    Args:
        values: (S, P) outcomes (0/1 for rates, floats for distances or differences); NaN = missing.
            A 1-D (P,) array is one seed.
        n_boot: bootstrap replicates.
        level: coverage of the percentile interval.
        seed: the resampling generator's seed (results are reproducible).
        pairs: "shared" (default) resamples one set of pair indices per replicate, used by every
            drawn seed (pairs are crossed with seeds); "nested" draws pairs afresh per seed.
        chunk: replicates drawn at once (bounds memory at chunk x S x P floats).
    Returns:
        ``Interval``: estimate = ``seed_pair_mean(values)``; lo/hi = percentiles of the replicates;
        p_zero = two-sided p-value of "the mean is 0" (for differences) from the replicates'
        standard error.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[None]
    if v.ndim != 2:
        raise ValueError(f"values must be (seeds, pairs), got shape {v.shape}")
    if pairs not in ("shared", "nested"):
        raise ValueError(f"pairs must be 'shared' or 'nested', got {pairs!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    # Seeds or pairs with no observation at all carry no information: drop them before resampling.
    v = v[~np.isnan(v).all(axis=1)]
    if v.size:
        v = v[:, ~np.isnan(v).all(axis=0)]
    S, P = v.shape if v.size else (0, 0)
    if S == 0 or P == 0:
        return Interval(float("nan"), float("nan"), float("nan"), float("nan"), S, P)
    estimate = seed_pair_mean(v)
    rng = np.random.default_rng(seed)
    stats = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        s_idx = rng.integers(0, S, size=(b, S))  # (b, S) drawn seeds
        if pairs == "shared":
            p_idx = np.broadcast_to(rng.integers(0, P, size=(b, 1, P)), (b, S, P))  # one pair draw
        else:
            p_idx = rng.integers(0, P, size=(b, S, P))  # (b, S, P) a fresh draw per seed
        drawn = v[s_idx[:, :, None], p_idx]  # (b, S, P)
        stats.append(_nanmean(_nanmean(drawn, axis=2), axis=1))  # (b,)
    boot = np.concatenate(stats)
    boot = boot[np.isfinite(boot)]
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha])
    return Interval(estimate, float(lo), float(hi), _normal_p(estimate, float(np.std(boot))), S, P)


def _normal_p(estimate: float, se: float) -> float:
    """Two-sided p of "mean = 0" from the bootstrap standard error (normal approximation).

    Not the share of replicates beyond 0: that is floored at ~2 / n_boot, which a Holm adjustment
    over many comparisons multiplies past 0.05 however large the effect.
    """
    if not math.isfinite(estimate) or not math.isfinite(se):
        return float("nan")
    if se == 0:
        return 1.0 if estimate == 0 else 0.0
    return math.erfc(abs(estimate) / se / math.sqrt(2.0))


# ---------------------------------------------------------------------------------------- paired
def paired_cells(a: dict, b: dict) -> tuple[list, list, np.ndarray, np.ndarray]:
    """Align two {seed: {pair: value}} maps on their common seeds and pairs.

    Returns:
        (seeds, pairs, A (S, P), B (S, P)) with NaN where one side lacks a cell (a missing cell on
        either side is missing in both, so the comparison stays paired).
    """
    seeds = sorted(set(a) & set(b), key=_sort_key)
    pairs = sorted({p for s in seeds for p in set(a[s]) & set(b[s])}, key=_sort_key)
    A = np.full((len(seeds), len(pairs)), np.nan)
    B = np.full_like(A, np.nan)
    for i, s in enumerate(seeds):
        for j, p in enumerate(pairs):
            if p in a[s] and p in b[s] and a[s][p] is not None and b[s][p] is not None:
                A[i, j], B[i, j] = float(a[s][p]), float(b[s][p])
    return seeds, pairs, A, B


def _sort_key(x):
    return (x is None, str(type(x)), x if x is not None else 0)


def compare_rates(a: dict, b: dict, *, seed: int = 0, n_boot: int = N_BOOT) -> dict:
    """Encoder A vs B on a 0/1 outcome, paired on shared (seed, pair) cells.

    Args:
        a, b: {seed: {pair: bool}}.
    Returns:
        dict: n (paired cells), rate_a, rate_b, diff (A - B, seed-then-pair mean), lo/hi (its
        hierarchical bootstrap interval), a_only / b_only (discordant counts), p (exact McNemar on
        the discordant cells).
    """
    seeds, _pairs, A, B = paired_cells(a, b)
    ok = ~np.isnan(A)
    a_only = int(np.sum((A == 1) & (B == 0) & ok))
    b_only = int(np.sum((A == 0) & (B == 1) & ok))
    interval = hierarchical_bootstrap(A - B, seed=seed, n_boot=n_boot)
    return {
        "n": int(ok.sum()),
        "seeds": len(seeds),
        "rate_a": seed_pair_mean(A),
        "rate_b": seed_pair_mean(B),
        "diff": interval.estimate,
        "lo": interval.lo,
        "hi": interval.hi,
        "a_only": a_only,
        "b_only": b_only,
        "p": mcnemar_exact(a_only, b_only) if ok.any() else float("nan"),
    }


def compare_means(a: dict, b: dict, *, seed: int = 0, n_boot: int = N_BOOT) -> dict:
    """Encoder A vs B on a continuous outcome (distance, curve area), paired bootstrap of A - B.

    Returns:
        dict: n, seeds, mean_a, mean_b, diff, lo, hi, p (two-sided p of "diff = 0" from the
        bootstrap standard error).
    """
    seeds, _pairs, A, B = paired_cells(a, b)
    interval = hierarchical_bootstrap(A - B, seed=seed, n_boot=n_boot)
    return {
        "n": int((~np.isnan(A)).sum()),
        "seeds": len(seeds),
        "mean_a": seed_pair_mean(A),
        "mean_b": seed_pair_mean(B),
        "diff": interval.estimate,
        "lo": interval.lo,
        "hi": interval.hi,
        "p": interval.p_zero,
    }


# ---------------------------------------------------------------------------------------- ranks
def _ranks(x: np.ndarray) -> np.ndarray:
    """Tie-averaged ranks along the last axis (any leading shape)."""
    from wmlab.diagnostics import rankdata

    flat = x.reshape(-1, x.shape[-1])
    return np.stack([rankdata(row) for row in flat]).reshape(x.shape)


def permutation_spearman(
    x, y, *, n_perm: int = 10_000, seed: int = 0, min_n: int = MIN_ENCODERS_FOR_CORRELATION
) -> dict:
    """Spearman ρ of x (n,) and y (n,) with a two-sided permutation p-value.

    Exact (all n! orderings of y) when n <= 8, else ``n_perm`` random permutations with the +1
    correction. Below ``min_n`` points nothing is computed: ``{"n": n, "rho": nan, "p": nan,
    "too_few": True}`` (a caller says "too few to tell").
    Returns:
        dict: n, rho, p, exact (bool), too_few (bool).
    """
    from wmlab.diagnostics import spearman

    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.shape} and {y.shape}")
    n = len(x)
    if n < min_n:
        return {"n": n, "rho": float("nan"), "p": float("nan"), "exact": False, "too_few": True}
    rho = spearman(x, y)
    if not math.isfinite(rho):
        return {"n": n, "rho": rho, "p": float("nan"), "exact": False, "too_few": False}
    rx = _ranks(x)
    rx = (rx - rx.mean()) / np.sqrt(((rx - rx.mean()) ** 2).sum())
    ry = _ranks(y)
    ry = (ry - ry.mean()) / np.sqrt(((ry - ry.mean()) ** 2).sum())
    exact = n <= 8
    if exact:
        perms = np.array(list(itertools.permutations(range(n))))  # (n!, n)
    else:
        rng = np.random.default_rng(seed)
        perms = np.argsort(rng.random((n_perm, n)), axis=1)  # (n_perm, n)
    null = ry[perms] @ rx  # (n_perm,) Pearson of the ranks = Spearman
    hits = int(np.sum(np.abs(null) >= abs(rho) - 1e-12))
    p = hits / len(perms) if exact else (hits + 1) / (len(perms) + 1)
    return {"n": n, "rho": rho, "p": float(p), "exact": exact, "too_few": False}


def chance_of_perfect_rank(n: int) -> float:
    """Probability that n exchangeable points give |Spearman ρ| = 1 by chance: 2 / n!."""
    return min(1.0, 2.0 / math.factorial(n)) if n >= 2 else 1.0


# ---------------------------------------------------------------------------------------- budgets
def reached_within(first_steps, budgets) -> np.ndarray:
    """Share of episodes reached within each budget: first_steps (E,) (None/NaN = never) -> (K,)."""
    first = np.array([np.nan if f is None else float(f) for f in first_steps], dtype=np.float64)
    k = np.asarray(budgets, dtype=np.float64).reshape(-1)
    if len(first) == 0:
        return np.full(len(k), np.nan)
    return (first[None, :] <= k[:, None]).mean(axis=1)  # NaN <= k is False: never reached


def episode_auc(first_step, max_steps: int) -> float:
    """Area under one episode's reached-within-k curve, k in [0, max_steps], divided by max_steps.

    The curve is the step function 1[first_step <= k], so the area is 1 - first_step / max_steps
    (0 when never reached or reached only after the budget). Averaged over episodes it is the area
    under the success-vs-budget curve (AUC in [0, 1]).
    """
    if max_steps <= 0:
        raise ValueError(f"max_steps must be > 0, got {max_steps}")
    if first_step is None or (isinstance(first_step, float) and not math.isfinite(first_step)):
        return 0.0
    return max(0.0, 1.0 - min(float(first_step), max_steps) / max_steps)
