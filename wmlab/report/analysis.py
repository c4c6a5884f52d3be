"""From the study's long-format episode rows to paired comparisons, budget curves and factor verdicts.

No plotting and no file formats here (``study_report`` renders); everything is a function of the
rows of ``results/episodes.jsonl`` and ``results/diagnostics.jsonl``.

Pairs. Every encoder and seed is evaluated on the same start/goal pairs. A row's pair is its
``pair_seed`` (else ``start_seed``, the name ``wmlab plan`` writes, else its ``episode`` index), so
rows of different encoders and seeds on the same pair line up.

Measures per episode (``MEASURES``; which exist depends on the row fields):

- ``reached`` (0/1): the goal was reached at some observation within the budget;
- ``final`` (0/1): success at the last step (DINO-WM's number);
- ``auc`` (needs ``first_reached_step``): area under the episode's reached-within-k curve over
  k in [0, max_steps], divided by max_steps (1 - first_reached_step / max_steps, 0 if never);
- ``dist`` : the final geodesic distance (last entry of ``dist_trace``) when rows carry it, else
  ``final_dist`` (the xy distance ``wmlab plan`` records). Lower is better.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from wmlab.report import stats

BASELINE = "baseline"
PAIR_KEYS = ("pair_seed", "start_seed", "episode")
ALPHA = 0.05
#: An effect inside these bounds is "no effect worth having" (equivalence): success-type measures in
#: absolute units (5 percentage points), distances relative to the comparison encoder's mean (10%).
EQUIVALENCE = {"success": 0.05, "dist_relative": 0.10}
#: Contrasts of the four-factor section when the study config lists none (the CPU demo's encoders;
#: a contrast whose encoders are absent is skipped with a note).
DEFAULT_CONTRASTS = (
    {"factor": "spatial patch structure", "a": "random_vit", "b": "random_vit_cls"},
    {"factor": "spatial patch structure", "a": "random_vit", "b": "random_vit_pool"},
    {"factor": "architecture prior (ViT vs raw pixels)", "a": "random_vit", "b": "pixels"},
    {"factor": "reconstructive latent (in-domain VAE)", "a": "vae", "b": "random_vit"},
)


def pair_id(row: dict):
    """The start/goal pair a row was evaluated on (see the module docstring)."""
    for key in PAIR_KEYS:
        if row.get(key) is not None:
            return row[key]
    raise ValueError(f"episode row has none of {PAIR_KEYS}: {sorted(row)}")


def has_budget_fields(rows: list[dict]) -> bool:
    """True when every row carries ``first_reached_step`` (int or null), a non-empty ``dist_trace``
    and ``max_steps`` (the budget the curve runs to)."""
    return bool(rows) and all(
        "first_reached_step" in r and r.get("dist_trace") and r.get("max_steps") for r in rows
    )


@dataclass
class Measure:
    key: str
    label: str
    kind: str  # "rate" (0/1, McNemar) or "mean" (continuous, paired bootstrap)
    higher_is_better: bool
    family: str  # "success" or "dist" (for the equivalence bound)


def measures(rows: list[dict]) -> list[Measure]:
    """The measures these rows support, primary first: AUC (if budget fields), reached, final, dist."""
    budget = has_budget_fields(rows)
    out = [Measure("auc", "Success AUC", "mean", True, "success")] if budget else []
    out += [
        Measure("reached", "Success reached", "rate", True, "success"),
        Measure("final", "Success final", "rate", True, "success"),
        Measure("dist", "Final geodesic dist." if budget else "Final xy dist.", "mean", False, "dist"),
    ]
    return out


def value(row: dict, key: str):
    """One episode's value of measure ``key`` (None when the row cannot give it)."""
    if key in ("reached", "final"):
        return float(bool(row[key]))
    if key == "auc":
        return stats.episode_auc(row.get("first_reached_step"), int(row["max_steps"]))
    if key == "dist":
        trace = row.get("dist_trace")
        d = trace[-1] if trace else row.get("final_dist")
        return None if d is None or not math.isfinite(float(d)) else float(d)
    raise KeyError(key)


def outcome_map(rows: list[dict], key: str) -> dict:
    """{seed: {pair: value}} of measure ``key`` (baseline rows: seed None counts as one seed)."""
    out: dict = {}
    for r in rows:
        v = value(r, key)
        if v is not None:
            out.setdefault(r.get("seed"), {})[pair_id(r)] = v
    return out


def matrix(rows: list[dict], key: str) -> np.ndarray:
    """Seeds x pairs matrix (S, P) of measure ``key`` with NaN for missing cells."""
    m = outcome_map(rows, key)
    seeds = sorted(m, key=stats._sort_key)
    pairs = sorted({p for s in seeds for p in m[s]}, key=stats._sort_key)
    out = np.full((len(seeds), len(pairs)), np.nan)
    for i, s in enumerate(seeds):
        for j, p in enumerate(pairs):
            if p in m[s]:
                out[i, j] = m[s][p]
    return out


# ---------------------------------------------------------------------------------------- cells
def cell_summary(rows: list[dict], keys: list[str], *, seed: int = 0, n_boot: int = stats.N_BOOT) -> dict:
    """Per measure: {"estimate", "lo", "hi"} by the hierarchical bootstrap, plus counts for rates."""
    out: dict = {"n": len(rows), "seeds": len({r.get("seed") for r in rows})}
    for key in keys:
        iv = stats.hierarchical_bootstrap(matrix(rows, key), seed=seed, n_boot=n_boot)
        out[key] = {"estimate": iv.estimate, "lo": iv.lo, "hi": iv.hi}
        if key in ("reached", "final"):
            out[key]["k"] = sum(bool(r[key]) for r in rows)
    plan = [float(r["plan_time_s"]) for r in rows if r.get("plan_time_s") is not None]
    out["plan_time_s"] = float(np.median(plan)) if plan else float("nan")
    return out


def per_seed(rows: list[dict], keys: list[str]) -> list[dict]:
    """One summary per seed of a cell: {"seed", "n", key: mean} (no intervals: one seed is one draw)."""
    out = []
    for seed in sorted({r.get("seed") for r in rows}, key=stats._sort_key):
        mine = [r for r in rows if r.get("seed") == seed]
        entry = {"seed": seed, "n": len(mine)}
        for key in keys:
            vals = [v for v in (value(r, key) for r in mine) if v is not None]
            entry[key] = float(np.mean(vals)) if vals else float("nan")
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------- baselines
def baselines_for(planner: str, planner_rows: list[dict], baseline_rows: list[dict]) -> tuple[dict, str]:
    """The floor/ceiling rows (by baseline name) run under ``planner``'s protocol, and a note.

    Baseline rows tagged ``for_planner`` match that planner exactly; untagged rows match when their
    ``max_steps`` equals the planner's (the budget is what makes a floor comparable).
    """
    tagged = [r for r in baseline_rows if r.get("for_planner") is not None]
    if tagged:
        mine = [r for r in tagged if r["for_planner"] == planner]
        note = (
            "" if mine else f"no baseline ran under {planner}'s protocol (none tagged for_planner={planner})"
        )
    else:
        budgets = {r.get("max_steps") for r in planner_rows}
        mine = [r for r in baseline_rows if r.get("max_steps") in budgets]
        other = sorted({r.get("max_steps") for r in baseline_rows} - budgets, key=str)
        note = (
            ""
            if mine
            else (
                f"baselines ran with max_steps={other}, {planner} with max_steps={sorted(budgets, key=str)}: "
                "no floor or ceiling under its protocol"
            )
            if baseline_rows
            else ""
        )
    out: dict[str, list[dict]] = {}
    for r in mine:
        out.setdefault(str(r["planner"]), []).append(r)
    return out, note


# ---------------------------------------------------------------------------------------- curves
def budget_grid(rows: list[dict]) -> np.ndarray:
    """Budgets k (env steps) at which the reached-within-k curve can change: 0, every observation
    step and max_steps. Observation steps come from a row's ``obs_steps``, else are assumed evenly
    spaced from 0 to max_steps over its ``dist_trace``."""
    points = {0.0}
    for r in rows:
        points.add(float(r["max_steps"]))
        points.update(float(s) for s in observation_steps(r))
        if r.get("first_reached_step") is not None:
            points.add(float(r["first_reached_step"]))
    top = max(float(r["max_steps"]) for r in rows) if rows else 0.0
    return np.array(sorted(p for p in points if 0.0 <= p <= top))


def observation_steps(row: dict) -> np.ndarray:
    """Env step of each ``dist_trace`` entry: ``obs_steps`` if the row has it, else evenly spaced."""
    trace = row.get("dist_trace") or []
    if row.get("obs_steps") is not None:
        steps = np.asarray(row["obs_steps"], dtype=np.float64)
        if len(steps) != len(trace):
            raise ValueError(f"obs_steps has {len(steps)} entries, dist_trace {len(trace)}")
        return steps
    return (
        np.linspace(0.0, float(row["max_steps"]), num=len(trace)) if len(trace) > 1 else np.zeros(len(trace))
    )


def success_curve(rows: list[dict], grid: np.ndarray) -> np.ndarray:
    """Mean over seeds of the share of pairs reached within each budget k of ``grid`` -> (K,)."""
    curves = []
    for seed in sorted({r.get("seed") for r in rows}, key=stats._sort_key):
        first = [r.get("first_reached_step") for r in rows if r.get("seed") == seed]
        curves.append(stats.reached_within(first, grid))
    return np.mean(curves, axis=0)


def distance_curve(rows: list[dict], grid: np.ndarray) -> np.ndarray:
    """Mean geodesic distance to the goal at each env step of ``grid`` (traces interpolated between
    observations and held at their last value after it) -> (K,)."""
    traces = []
    for r in rows:
        trace = np.asarray(r["dist_trace"], dtype=np.float64)
        steps = observation_steps(r)
        ok = np.isfinite(trace)
        if ok.sum() >= 1:
            traces.append(np.interp(grid, steps[ok], trace[ok]))
    return np.mean(traces, axis=0) if traces else np.full(len(grid), np.nan)


# ---------------------------------------------------------------------------------------- compare
def compare(a_rows: list[dict], b_rows: list[dict], m: Measure, *, seed: int = 0, n_boot: int = stats.N_BOOT):
    """A vs B on measure ``m``, paired on shared (seed, pair) cells: McNemar for rates, bootstrap else."""
    a, b = outcome_map(a_rows, m.key), outcome_map(b_rows, m.key)
    if m.kind == "rate":
        out = stats.compare_rates(a, b, seed=seed, n_boot=n_boot)
        out["mean_a"], out["mean_b"] = out["rate_a"], out["rate_b"]
    else:
        out = stats.compare_means(a, b, seed=seed, n_boot=n_boot)
    out["measure"] = m.key
    return out


def favours(result: dict, m: Measure) -> int:
    """+1 if the difference A - B is in A's favour, -1 in B's, 0 for no difference."""
    d = result["diff"]
    if not math.isfinite(d) or d == 0:
        return 0
    return (1 if d > 0 else -1) * (1 if m.higher_is_better else -1)


@dataclass
class Comparison:
    planner: str
    a: str
    b: str
    measure: Measure
    result: dict
    p_holm: float = float("nan")

    @property
    def significant(self) -> bool:
        return math.isfinite(self.p_holm) and self.p_holm < ALPHA


def adjust(comparisons: list[Comparison]) -> None:
    """Holm-adjust p-values within each measure over all comparisons given (in place)."""
    for key in {c.measure.key for c in comparisons}:
        group = [c for c in comparisons if c.measure.key == key]
        for c, p in zip(group, stats.holm([c.result["p"] for c in group]), strict=True):
            c.p_holm = float(p)


def pairwise(
    cells: dict, encoders: list[str], planners: list[str], ms: list[Measure], **kw
) -> list[Comparison]:
    """Every encoder pair (in listed order) x planner x measure, Holm-adjusted per measure."""
    out = []
    for planner in planners:
        have = [e for e in encoders if (e, planner) in cells]
        for i, a in enumerate(have):
            for b in have[i + 1 :]:
                for m in ms:
                    out.append(
                        Comparison(
                            planner, a, b, m, compare(cells[(a, planner)], cells[(b, planner)], m, **kw)
                        )
                    )
    adjust(out)
    return out


# ---------------------------------------------------------------------------------------- factors
@dataclass
class FactorResult:
    factor: str
    a: str
    b: str
    planner: str | None
    comparisons: list[Comparison] = field(default_factory=list)
    note: str = ""
    verdict: str = "skipped"


def equivalent(c: Comparison) -> bool:
    """The interval of the difference lies inside the equivalence bounds (no effect worth having)."""
    r = c.result
    if not (math.isfinite(r["lo"]) and math.isfinite(r["hi"])):
        return False
    if c.measure.family == "success":
        bound = EQUIVALENCE["success"]
    else:
        bound = EQUIVALENCE["dist_relative"] * abs(r["mean_b"]) if math.isfinite(r["mean_b"]) else 0.0
    return -bound <= r["lo"] and r["hi"] <= bound


def verdict(comparisons: list[Comparison]) -> str:
    """'for' (a significant paired effect in A's favour and none against), 'against' (significant in
    B's favour and none for, or every interval inside the equivalence bounds), else 'inconclusive'."""
    if not comparisons:
        return "skipped"
    pro = any(c.significant and favours(c.result, c.measure) > 0 for c in comparisons)
    con = any(c.significant and favours(c.result, c.measure) < 0 for c in comparisons)
    if pro and not con:
        return "for"
    if con and not pro:
        return "against"
    if pro and con:
        return "inconclusive (measures disagree)"
    if all(equivalent(c) for c in comparisons):
        return "against (no effect beyond the equivalence bounds)"
    return "inconclusive"


def factor_contrasts(
    contrasts, cells: dict, encoders: list[str], planners: list[str], ms: list[Measure], **kw
) -> list[FactorResult]:
    """The four-factor section: for each contrast (A vs B isolating one factor), the paired effect on
    the primary success measure and on distance under each planner, Holm-adjusted over all contrasts
    per measure, and a verdict.

    Args:
        contrasts: [{"factor": str, "a": encoder, "b": encoder, "planner": optional}] (the study
            config's ``contrasts``; ``DEFAULT_CONTRASTS`` when it lists none).
        cells: (encoder, planner) -> episode rows.
    Returns:
        One ``FactorResult`` per contrast x planner; absent encoders give one skipped result with a note.
    """
    primary = [m for m in ms if m.family == "success"][:1] + [m for m in ms if m.family == "dist"]
    out: list[FactorResult] = []
    for c in contrasts:
        factor, a, b = str(c["factor"]), str(c["a"]), str(c["b"])
        missing = [e for e in (a, b) if e not in encoders]
        if missing:
            out.append(
                FactorResult(factor, a, b, None, note=f"skipped: {', '.join(missing)} not in this study")
            )
            continue
        chosen = [c["planner"]] if c.get("planner") else planners
        for planner in chosen:
            if (a, planner) not in cells or (b, planner) not in cells:
                out.append(
                    FactorResult(factor, a, b, planner, note=f"skipped: no {planner} results for both")
                )
                continue
            res = FactorResult(factor, a, b, planner)
            res.comparisons = [
                Comparison(planner, a, b, m, compare(cells[(a, planner)], cells[(b, planner)], m, **kw))
                for m in primary
            ]
            out.append(res)
    adjust([c for r in out for c in r.comparisons])
    for r in out:
        if r.comparisons:
            r.verdict = verdict(r.comparisons)
    return out


# ---------------------------------------------------------------------------------------- predictors
#: Diagnostics correlated with success across encoders (key, label, higher is better). Costs (size,
#: throughput, plan time) are deliberately absent: they are listed apart, never as predictors.
PREDICTORS = (
    ("probe_r2", "Probe R²", True),
    ("distance_spearman_per_goal", "Dist. ρ per goal", True),
    ("distance_spearman_local", "Dist. ρ local", True),
    ("skill@1", "Error vs copy-last @1", False),
    ("skill@5", "Error vs copy-last @5", False),
    ("nmse_temporal@1", "Temporal NMSE @1", False),
)


def predictor_correlations(
    encoders: list[str], planner: str, cells: dict, diag: dict, m: Measure, **kw
) -> tuple[list[dict], int]:
    """Spearman ρ across encoders between each predictor and the success measure, with permutation p.

    Returns:
        (rows, n_encoders): rows {"key", "label", "n", "rho", "p", "too_few"}; with fewer than
        ``stats.MIN_ENCODERS_FOR_CORRELATION`` encoders every row is too_few (nothing computed).
    """
    have = [e for e in encoders if (e, planner) in cells and e in diag]
    rows = []
    for key, label, _ in PREDICTORS:
        xs, ys = [], []
        for e in have:
            x = diag[e].get(key)
            if x is None or not isinstance(x, int | float) or not math.isfinite(x):
                continue
            y = stats.seed_pair_mean(matrix(cells[(e, planner)], m.key))
            if math.isfinite(y):
                xs.append(float(x)), ys.append(y)
        r = stats.permutation_spearman(xs, ys, **kw)
        rows.append({"key": key, "label": label, **r})
    ps = stats.holm([r["p"] for r in rows])
    for r, p in zip(rows, ps, strict=True):
        r["p_holm"] = float(p)
    return rows, len(have)
