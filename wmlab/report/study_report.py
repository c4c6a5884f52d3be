"""The representation study's report, built from its results files alone.

``build_report(study_dir)`` reads (``*`` = optional; a missing optional file or field leaves its
section saying so, never silently empty)::

    study.json                      env, encoders, seeds, planners, protocol, stage_seconds, command,
                                    contrasts * (the four-factor section's list; defaults otherwise)
    results/episodes.jsonl          one row per encoder x seed x planner x episode: encoder, seed,
                                    planner, episode, reached, final, final_dist, pair_seed or
                                    start_seed, max_steps; * first_reached_step (int | null) and
                                    dist_trace (geodesic distance at every observation; * obs_steps,
                                    the env step of each) for budget curves; baseline rows *
                                    for_planner (the planner whose protocol they ran under)
    results/diagnostics.jsonl *     one row per encoder x seed (``diagnose_run`` keys + seed,
                                    val_loss, copy_last_loss, plan_time_per_step_s)
    results/distances/<encoder>__seed<k>.json *   {"latent": [...], "geodesic": [...], "goal": [...]}
    results/failures.jsonl *        {"encoder", "seed", "planner", "stage", "error"}
    videos/<encoder>__seed<k>__<planner>/*.gif *
    imagined/<encoder>__seed<k>__<planner>/*.png *   decoded imagined vs real rollouts of first plans

and writes ``report/report.md`` (images referenced beside it), ``report/report.html`` (one file:
CSS inline, every image and GIF a base64 data URI, no external reference) and the PNG plots.

Statistics (``wmlab.report.stats``, ``wmlab.report.analysis``): every encoder and seed runs on the
same start/goal pairs, so intervals come from a hierarchical bootstrap over seeds and pairs (not a
binomial interval on pooled episodes) and encoder-vs-encoder comparisons are paired on the pairs
(exact McNemar for rates, paired bootstrap for distances and curve areas), Holm-adjusted per
measure. Rank correlations between a diagnostic and success need >= 8 encoders and carry a
permutation p-value; sizes and times are costs, listed apart.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np

from wmlab.diagnostics import per_goal_spearman, spearman
from wmlab.report import analysis, figures, stats
from wmlab.report.analysis import BASELINE

#: Episode rows must carry these keys (the study runner's contract).
EPISODE_KEYS = ("encoder", "seed", "planner", "episode", "reached", "final", "final_dist")
#: Horizons (model steps) shown in the tables for per-horizon diagnostics.
HORIZONS = (1, 5)
MAX_GIFS = 8  # GIFs shown (one per video folder, in folder order)
MAX_GIF_BYTES = 4 * 2**20  # larger GIFs are linked from the Markdown but not embedded in the HTML
MAX_SCATTER_POINTS = 3000  # per encoder, subsampled (seeded) so the PNG stays light
TRAJECTORY_PAIRS = 4  # start/goal pairs drawn on the maze, every encoder side by side


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (lo, hi) of a binomial proportion ``successes / n``.

    ``z`` = 1.96 gives 95%. n = 0 gives (0, 1): no data, no information. (For one cell of
    independent episodes; the study report uses the clustered bootstrap instead.)
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # Clamp float noise at the ends (0/n must give exactly 0).
    return max(0.0, centre - half), min(1.0, centre + half)


# ---------------------------------------------------------------------------------------- reading
def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err


def _read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number} is not valid JSON ({err})") from err
        missing = [k for k in required if k not in row]
        if missing:
            raise ValueError(f"{path}:{number} lacks keys {missing}")
        rows.append(row)
    return rows


def _optional_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict] | None:
    return _read_jsonl(path, required) if path.is_file() else None


def _ordered(preferred, found) -> list:
    """``preferred`` order first (as listed in study.json), then anything else found, sorted."""
    out = [x for x in preferred if x in found]
    return out + sorted((x for x in found if x not in out), key=str)


# ---------------------------------------------------------------------------------------- numbers
def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v is not None


def _fmt(value, digits: int = 3) -> str:
    """One number on its own: '–' for missing/NaN, thousands separators for integers, else fixed
    digits (scientific when the fixed form would show only zeros)."""
    if not _is_number(value) or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    if 0 < abs(value) < 0.5 * 10**-digits:
        return f"{value:.2e}"
    return f"{value:,.{digits}f}"


def format_column(values, digits: int = 3) -> list[str]:
    """Format a table column consistently: every cell with the same number of decimals.

    Integers (counts) get thousands separators. Floats get ``digits`` significant digits on the
    column's largest magnitude (42,621 and 682 rather than "42,621" beside "682.413"), decimals
    capped at ``digits``; a column whose small nonzero values would print as 0 goes scientific.
    """
    nums = [v for v in values if _is_number(v) and math.isfinite(v)]
    if nums and all(isinstance(v, int) for v in nums):
        return [f"{v:,}" if _is_number(v) else "–" for v in values]
    if not nums:
        return ["–"] * len(values)
    largest = max(abs(v) for v in nums)
    decimals = digits if largest == 0 else min(digits, max(0, digits - 1 - math.floor(math.log10(largest))))
    tiny = [v for v in nums if v != 0 and abs(v) < 0.5 * 10**-decimals]
    out = []
    for v in values:
        if not _is_number(v) or not math.isfinite(v):
            out.append("–")
        elif tiny:
            out.append(f"{v:.2e}")
        else:
            out.append(f"{v:,.{decimals}f}")
    return out


def format_rate(k: int, n: int, ci: tuple[float, float]) -> str:
    """'45.0% [35.6, 54.8] (45/100)': rate and its interval in percent, then the counts."""
    if n == 0:
        return "– (0/0)"
    return f"{100 * k / n:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}] ({k}/{n})"


def _rate_cell(s: dict, key: str) -> str:
    """A rate with its hierarchical-bootstrap interval and the pooled counts."""
    e = s[key]
    if not math.isfinite(e["estimate"]):
        return "–"
    return f"{100 * e['estimate']:.1f}% [{100 * e['lo']:.1f}, {100 * e['hi']:.1f}] ({e['k']}/{s['n']})"


def _mean_cell(s: dict, key: str, percent: bool = False) -> str:
    e = s[key]
    if not math.isfinite(e["estimate"]):
        return "–"
    f = (lambda v: f"{100 * v:.1f}") if percent else (lambda v: f"{v:.3f}")
    return f"{f(e['estimate'])} [{f(e['lo'])}, {f(e['hi'])}]"


def _fmt_p(p) -> str:
    if not _is_number(p) or not math.isfinite(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _diff_cell(result: dict, m: analysis.Measure) -> str:
    """'+12.5 pts [3.1, 20.0]' for success measures, '-0.120 [-0.200, -0.050]' for distances."""
    d, lo, hi = result["diff"], result["lo"], result["hi"]
    if not math.isfinite(d):
        return "–"
    if m.family == "success":
        return f"{100 * d:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _listing(values) -> str:
    return ", ".join(map(str, values or [])) or "–"


# ---------------------------------------------------------------------------------------- blocks
# The report is a list of blocks rendered twice (Markdown and HTML), so the two never drift apart:
# ("h2", text) ("p", text) ("note", text) ("ul", [text]) ("table", header, rows) ("img", path, alt)
# ("pre", text) ("gifs", [paths]).
def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def clean(cell) -> str:
        return str(cell).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _render_markdown(title: str, blocks: list[tuple]) -> str:
    md = [f"# {title}", ""]
    for kind, *args in blocks:
        if kind == "h2":
            md += [f"## {args[0]}", ""]
        elif kind in ("p", "note"):
            md += [args[0], ""]
        elif kind == "ul":
            md += [f"- {item}" for item in args[0]] + [""]
        elif kind == "table":
            md += [_markdown_table(args[0], args[1]), ""]
        elif kind == "img":  # ("img", path, alt[, link from report/ when the image lives elsewhere])
            md += [f"![{args[1]}]({args[2] if len(args) > 2 else args[0].name})", ""]
        elif kind == "pre":
            md += ["```", args[0], "```", ""]
        elif kind == "gifs":
            md += [f"![{g.parent.name}](../videos/{g.parent.name}/{g.name})" for g in args[0]] + [""]
    return "\n".join(md) + "\n"


def _render_html(title: str, blocks: list[tuple]) -> str:
    e = html.escape
    body = [f"<h1>{e(title)}</h1>"]
    for kind, *args in blocks:
        if kind == "h2":
            body.append(f"<h2>{e(args[0])}</h2>")
        elif kind == "p":
            body.append(f"<p>{e(args[0])}</p>")
        elif kind == "note":
            body.append(f"<p class='note'>{e(args[0])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in args[0]) + "</ul>")
        elif kind == "table":
            body.append(_html_table(args[0], args[1]))
        elif kind == "img":
            body.append(f'<img alt="{e(args[1])}" src="{_data_uri(args[0], "image/png")}">')
        elif kind == "pre":
            body.append(f"<pre>{e(args[0])}</pre>")
        elif kind == "gifs":
            for g in args[0]:
                name = e(f"{g.parent.name}/{g.name}")
                size = g.stat().st_size
                if size <= MAX_GIF_BYTES:
                    uri = _data_uri(g, "image/gif")
                    body.append(
                        f"<figure><img alt='{name}' src='{uri}'><figcaption>{name}</figcaption></figure>"
                    )
                else:
                    body.append(f"<p class='note'>{name} is too large to embed ({size:,} bytes).</p>")
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>"
        f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )


# ---------------------------------------------------------------------------------------- plots
_figure, _save = figures.figure, figures.save


BASELINE_STYLES = {"random": ("--", "floor"), "oracle": (":", "ceiling")}


def success_figure(encoders, planners, summaries, floors):
    """Bars of success per encoder (rows: reached, final; columns: planners) with bootstrap intervals.

    Each planner's floor and ceiling (``floors[planner]``: {baseline: summary}) are drawn in that
    planner's panel only, since they ran under its protocol. The legend sits outside the panels so
    it can never cover a bar.
    """
    cols = max(1, len(planners))
    fig = _figure(max(5.0, (0.7 * len(encoders) + 1.5) * cols + 2.0), 5.5)
    axes = np.asarray(fig.subplots(2, cols, sharey=True, squeeze=False))
    x = np.arange(len(encoders))
    handles: dict = {}
    for col, planner in enumerate(planners):
        for row, (key, title) in enumerate(
            (("reached", "reached during the episode"), ("final", "at the final step"))
        ):
            ax = axes[row, col]
            est, lo, hi = [], [], []
            for encoder in encoders:
                s = summaries.get((encoder, planner))
                if s is None or not math.isfinite(s[key]["estimate"]):
                    est.append(np.nan), lo.append(0.0), hi.append(0.0)
                    continue
                e = s[key]
                est.append(100 * e["estimate"])
                (
                    lo.append(100 * max(0.0, e["estimate"] - e["lo"])),
                    hi.append(100 * max(0.0, e["hi"] - e["estimate"])),
                )
            bars = ax.bar(x, est, 0.6, yerr=[lo, hi], capsize=3, color="C0")
            handles.setdefault("model (95% CI)", bars)
            for name, s in (floors.get(planner) or {}).items():
                style, role = BASELINE_STYLES.get(name, ("-.", "baseline"))
                line = ax.axhline(100 * s[key]["estimate"], color="gray", linestyle=style, linewidth=1.2)
                handles.setdefault(f"{name} ({role}, same protocol)", line)
            ax.set_ylim(0, 105)
            ax.set_title(f"{planner}: {title}", fontsize=9)
            if col == 0:
                ax.set_ylabel("success %")
            ax.set_xticks(x, encoders if row == 1 else [""] * len(encoders), rotation=30, ha="right")
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8)
    return fig


def _panel_legend(ax) -> None:
    """A panel's legend below its axes (outside the data area: it covers no line or bar)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2, fontsize=7, frameon=False)


def _encoder_colors(curves: dict) -> dict[str, str]:
    """One colour per encoder, the same in every panel (baselines are gray)."""
    names = []
    for per_planner in curves.values():
        names += [n for n in per_planner if n not in names and n not in BASELINE_STYLES]
    return {n: f"C{i % 10}" for i, n in enumerate(names)}


def budget_figure(planners, curves, floors_curves, aucs):
    """Reached-within-k curves, one panel per planner: a line per encoder (its AUC in the label) and
    the planner's own baselines in gray."""
    cols = max(1, len(planners))
    colors = _encoder_colors(curves)
    fig = _figure(4.8 * cols, 4.6)
    axes = np.atleast_1d(fig.subplots(1, cols, squeeze=False)).ravel()
    for ax, planner in zip(axes, planners, strict=True):
        for encoder, (grid, curve) in curves.get(planner, {}).items():
            auc = aucs.get((encoder, planner), float("nan"))
            ax.step(
                grid, 100 * curve, where="post", color=colors[encoder], label=f"{encoder} (AUC {auc:.3f})"
            )
        for name, (grid, curve) in floors_curves.get(planner, {}).items():
            style = BASELINE_STYLES.get(name, ("-.", ""))[0]
            ax.step(grid, 100 * curve, where="post", color="gray", linestyle=style, label=name)
        ax.set_ylim(0, 105)
        ax.set_xlabel("budget k (env steps)")
        ax.set_ylabel("reached within k, %")
        ax.set_title(f"{planner}: success vs budget", fontsize=9)
        _panel_legend(ax)
    return fig


def distance_figure(planners, curves):
    """Mean geodesic distance to the goal against the env step, one panel per planner."""
    cols = max(1, len(planners))
    colors = _encoder_colors(curves)
    fig = _figure(4.8 * cols, 4.4)
    axes = np.atleast_1d(fig.subplots(1, cols, squeeze=False)).ravel()
    for ax, planner in zip(axes, planners, strict=True):
        for name, (grid, curve) in curves.get(planner, {}).items():
            if name in BASELINE_STYLES:
                ax.plot(grid, curve, linestyle=BASELINE_STYLES[name][0], color="gray", label=name)
            else:
                ax.plot(grid, curve, color=colors[name], label=name)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("env step")
        ax.set_ylabel("mean geodesic distance to goal")
        ax.set_title(f"{planner}: distance to goal", fontsize=9)
        _panel_legend(ax)
    return fig


def _skill_plot(path: Path, encoders, diag) -> Path | None:
    curves = {e: diag[e]["skill_curve"] for e in encoders if "skill_curve" in diag.get(e, {})}
    key, ylabel, title = "skill", "model error / copy-last error", "Open-loop error relative to copy-last"
    if not curves:  # older diagnostics: the pooled-variance NMSE only
        curves = {e: diag[e]["nmse_curve"] for e in encoders if "nmse_curve" in diag.get(e, {})}
        key, ylabel, title = (
            "nmse",
            "NMSE (pooled channel variance = 1)",
            "Open-loop NMSE (legacy normaliser)",
        )
    if not curves:
        return None
    fig = _figure(6.0, 4.6)
    ax = fig.subplots()
    for encoder, curve in curves.items():
        ax.plot(np.arange(1, len(curve) + 1), curve, marker="o", markersize=3, label=encoder)
    if key == "skill":
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="copy-last (= 1)")
    values = [v for c in curves.values() for v in c]
    if min(values) > 0 and max(values) / min(values) > 20:  # log only when the range needs it
        ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("open-loop model steps")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} (mean over seeds)", fontsize=10)
    _panel_legend(ax)
    return _save(fig, path)


def _first_files(root: Path, pattern: str) -> list[Path]:
    """The first file matching ``pattern`` of each folder under ``root``, at most MAX_GIFS: the first
    seed's cells and the baselines before other seeds, so every encoder gets one before any gets two."""
    found: list[Path] = []
    if root.is_dir():
        folders = [p for p in root.iterdir() if p.is_dir()]
        for folder in sorted(folders, key=lambda p: (_seed_rank(p.name), p.name)):
            if files := sorted(folder.glob(pattern)):
                found.append(files[0])
            if len(found) >= MAX_GIFS:
                break
    return found


def _seed_rank(label: str) -> int:
    """A cell label's seed (``<encoder>__seed<k>__<planner>``), for ordering; baselines count as 0."""
    for part in label.split("__"):
        if part.startswith("seed") and part[4:].isdigit():
            return int(part[4:])
    return 0


def _trajectory_plot(path: Path, study: dict, planners, encoders, cells, floor_rows):
    """Trajectories of TRAJECTORY_PAIRS shared pairs on the maze, every encoder (and the planner's
    baselines) side by side, under the first planner whose rows carry xy_trace, for the first seed.
    Pairs on which the columns disagree (some reached, some not) come first. -> (path, note) or None."""
    from wmlab.envs.maze_layouts import MazeLayout

    for planner in planners:
        columns = [e for e in encoders if any(r.get("xy_trace") for r in cells.get((e, planner), []))]
        if not columns:
            continue
        seed = min(r["seed"] for e in columns for r in cells[(e, planner)])
        rows_by = {
            (e, analysis.pair_id(r)): r for e in columns for r in cells[(e, planner)] if r["seed"] == seed
        }
        for name, rows in (floor_rows.get(planner) or {}).items():
            mine = [r for r in rows if r.get("xy_trace") and r.get("seed", seed) == seed] or [
                r for r in rows if r.get("xy_trace")
            ]
            if mine:
                columns.append(name)
                rows_by.update({(name, analysis.pair_id(r)): r for r in mine})
        pairs = sorted({pair for (_, pair) in rows_by}, key=str)
        disagree = [
            p
            for p in pairs
            if len({bool(rows_by[(c, p)]["reached"]) for c in columns if (c, p) in rows_by}) > 1
        ]
        chosen = (disagree + [p for p in pairs if p not in disagree])[:TRAJECTORY_PAIRS]
        maze = (study.get("env_settings") or {}).get("maze")
        try:
            layout = MazeLayout.named(maze) if maze else None
        except (KeyError, ValueError):
            layout = None
        note = (
            f"{planner}, seed {seed}: {len(chosen)} of the {len(pairs)} shared start/goal pairs "
            f"({sum(p in disagree for p in chosen)} on which the columns disagree come first); the agent's "
            "position after every env step, start ○, goal ★, green = reached."
        )
        return _save(figures.trajectory_figure(chosen, columns, rows_by, layout), path), note
    return None


def _scatter_plot(path: Path, scatter: dict[str, dict]) -> Path | None:
    if not scatter:
        return None
    n = len(scatter)
    cols = min(4, n)
    rows = -(-n // cols)
    fig = _figure(3.0 * cols, 2.7 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    rng = np.random.default_rng(0)
    for ax, (encoder, d) in zip(axes, scatter.items(), strict=False):
        lat, geo = np.asarray(d["latent"], float), np.asarray(d["geodesic"], float)
        if len(lat) > MAX_SCATTER_POINTS:
            keep = rng.choice(len(lat), MAX_SCATTER_POINTS, replace=False)
            lat, geo = lat[keep], geo[keep]
        ax.scatter(geo, lat, s=3, alpha=0.4)
        ax.set_title(f"{encoder} (ρ/goal = {_fmt(d['rho_goal'], 2)}, pooled {_fmt(d['rho'], 2)})", fontsize=8)
        ax.set_xlabel("geodesic distance", fontsize=8)
        ax.set_ylabel("latent MSE to goal", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------- diagnostics
def _diagnostic_means(rows: list[dict] | None) -> dict[str, dict]:
    """encoder -> {key: mean over seeds} for numeric diagnostics, with per-horizon values from curves."""
    out: dict[str, dict] = {}
    for encoder in sorted({r["encoder"] for r in rows or []}):
        mine = [r for r in rows if r["encoder"] == encoder]
        means: dict = {"seeds": len(mine)}
        keys = {k for r in mine for k, v in r.items() if _is_number(v)}
        for key in sorted(keys - {"seed"}):
            values = [r[key] for r in mine if _is_number(r.get(key))]
            mean = float(np.mean(values)) if values else float("nan")
            # Counts (tokens, dim, bytes) stay integers so the tables print them as such.
            integral = values and all(isinstance(v, int) for v in values) and mean.is_integer()
            means[key] = int(mean) if integral else mean
        for src, name in (
            ("nmse_by_horizon", "nmse"),
            ("skill_by_horizon", "skill"),
            ("nmse_temporal_by_horizon", "nmse_temporal"),
        ):
            curves = [r[src] for r in mine if r.get(src)]
            if curves:
                K = min(len(c) for c in curves)
                means[f"{name}_curve"] = np.mean([c[:K] for c in curves], axis=0).tolist()
                for k in HORIZONS:
                    means[f"{name}@{k}"] = means[f"{name}_curve"][k - 1] if K >= k else float("nan")
        splits = {r.get("probe_split") for r in mine if r.get("probe_split")}
        means["probe_split"] = "/".join(sorted(splits)) if splits else None
        flags = []
        if "skill_curve" in means:
            worse = [k + 1 for k, v in enumerate(means["skill_curve"]) if v > 1.0]
            if worse:
                flags.append(f"worse than copy-last at {_horizons(worse)}")
        val, copy = means.get("val_loss"), means.get("copy_last_loss")
        if _is_number(val) and _is_number(copy) and math.isfinite(val) and val > copy:
            flags.append("val loss above copy-last")
        means["flags"] = flags
        out[encoder] = means
    return out


def _horizons(ks: list[int]) -> str:
    return "step " + ", ".join(map(str, ks)) if len(ks) < 4 else f"steps {ks[0]}-{ks[-1]}"


def _read_distances(results: Path, encoders) -> dict[str, dict]:
    """Per encoder, all seeds' (latent, geodesic, goal) pooled, with per-goal and pooled ρ."""
    scatter: dict[str, dict] = {}
    dist_dir = results / "distances"
    files = sorted(dist_dir.glob("*__seed*.json")) if dist_dir.is_dir() else []
    for encoder in encoders:
        latent, geodesic, goal = [], [], []
        for f in (f for f in files if f.stem.rsplit("__seed", 1)[0] == encoder):
            d = _read_json(f, "distances")
            if len(d.get("latent", [])) != len(d.get("geodesic", [])):
                raise ValueError(f"{f}: 'latent' and 'geodesic' have different lengths")
            latent += list(d["latent"])
            geodesic += list(d["geodesic"])
            # Goal ids are per seed file: prefix them with the file so goals of two seeds stay apart.
            goal += [f"{f.stem}:{g}" for g in d.get("goal", [None] * len(d["latent"]))]
        lat, geo = np.asarray(latent, float), np.asarray(geodesic, float)
        finite = np.isfinite(lat) & np.isfinite(geo)  # an unreachable pair has no rank to compare
        if finite.any():
            goals = np.asarray(goal, dtype=object)[finite]
            has_goals = not any(g.endswith(":None") for g in goals)
            rho_goal = (
                per_goal_spearman(lat[finite], geo[finite], goals.astype(str))[0] if has_goals else math.nan
            )
            scatter[encoder] = {
                "latent": lat[finite],
                "geodesic": geo[finite],
                "rho": spearman(lat[finite], geo[finite]),
                "rho_goal": rho_goal,
            }
    return scatter


# ---------------------------------------------------------------------------------------- sections
def _results_section(planners, encoders, summaries, floors, floor_notes, ms) -> list[tuple]:
    keys = [m.key for m in ms]
    header = ["Encoder", "Episodes (seeds)"]
    header += ["Success AUC [95% CI]"] if "auc" in keys else []
    header += ["Reached [95% CI]", "Final [95% CI]", f"{ms[-1].label} [95% CI]", "Median s/plan"]
    blocks: list[tuple] = []
    for planner in planners:
        rows = []
        entries = [(e, summaries[(e, planner)]) for e in encoders if (e, planner) in summaries]
        entries += [
            (f"{BASELINE}: {name} ({BASELINE_STYLES.get(name, ('', 'baseline'))[1]})", s)
            for name, s in (floors.get(planner) or {}).items()
        ]
        for label, s in entries:
            row = [label, f"{s['n']} ({s['seeds']})"]
            row += [_mean_cell(s, "auc")] if "auc" in keys else []
            row += [
                _rate_cell(s, "reached"),
                _rate_cell(s, "final"),
                _mean_cell(s, "dist") + s.get("dist_note", ""),
                _fmt(s["plan_time_s"]),
            ]
            rows.append(row)
        if not rows:
            continue
        blocks += [("p", f"Planner {planner}:"), ("table", header, rows)]
        if floor_notes.get(planner):
            blocks.append(("note", f"{planner}: {floor_notes[planner]}."))
    return blocks


def _comparison_section(
    comparisons: list[analysis.Comparison], primary: set[str]
) -> tuple[list[tuple], list[str]]:
    """The comparison table and one sentence per significant difference on a primary measure."""
    header = [
        "Planner",
        "A",
        "B",
        "Measure",
        "A",
        "B",
        "A − B [95% CI]",
        "Test",
        "p",
        "p (Holm)",
        "Cells (seeds)",
    ]
    rows, significant = [], []
    for c in comparisons:
        r, m = c.result, c.measure
        as_pct = m.family == "success"
        a = f"{100 * r['mean_a']:.1f}%" if as_pct else _fmt(r["mean_a"])
        b = f"{100 * r['mean_b']:.1f}%" if as_pct else _fmt(r["mean_b"])
        test = f"McNemar {r['a_only']}:{r['b_only']}" if m.kind == "rate" else "paired bootstrap"
        rows.append(
            [c.planner, c.a, c.b, m.label, a, b, _diff_cell(r, m), test, _fmt_p(r["p"]), _fmt_p(c.p_holm),
             f"{r['n']} ({r['seeds']})"]
        )  # fmt: skip
        if c.significant and m.key in primary:
            better = c.a if analysis.favours(r, m) > 0 else c.b
            significant.append(
                f"{c.planner}: {c.a} vs {c.b} on {m.label.lower()}: {_diff_cell(r, m)}, Holm p = "
                f"{_fmt_p(c.p_holm)} ({better} better)."
            )
    return [("table", header, rows)] if rows else [], significant


def _factor_section(results: list[analysis.FactorResult], from_config: bool) -> list[tuple]:
    source = "listed in study.json" if from_config else "the default list: study.json names no contrasts"
    blocks: list[tuple] = [
        (
            "note",
            f"Each factor is isolated by a paired contrast of two encoders ({source}); its effect on the "
            "primary success measure and on the final distance is the paired difference A − B with a "
            "95% interval, Holm-adjusted over all contrasts. Verdict: 'for' = a significant effect in "
            "A's favour and none against; 'against' = significant in B's favour, or every interval "
            f"inside ±{100 * analysis.EQUIVALENCE['success']:.0f} points of success and "
            f"±{100 * analysis.EQUIVALENCE['dist_relative']:.0f}% of distance (no effect worth having); "
            "else inconclusive.",
        )
    ]
    header = [
        "Factor",
        "Contrast (A vs B)",
        "Planner",
        "Success effect (p Holm)",
        "Distance effect (p Holm)",
        "Verdict",
    ]
    rows, notes = [], []
    for r in results:
        if not r.comparisons:
            notes.append(f"{r.factor} ({r.a} vs {r.b}): {r.note}.")
            continue
        cells = {
            c.measure.family: f"{_diff_cell(c.result, c.measure)} ({_fmt_p(c.p_holm)})" for c in r.comparisons
        }
        success_label = next(c.measure.label for c in r.comparisons if c.measure.family == "success")
        rows.append(
            [r.factor, f"{r.a} vs {r.b}", r.planner, f"{success_label}: {cells.get('success', '–')}",
             cells.get("dist", "–"), r.verdict]
        )  # fmt: skip
    if rows:
        blocks.append(("table", header, rows))
    if notes:
        blocks.append(("ul", notes))
    if not rows:
        blocks.append(("p", "No contrast could be evaluated: none has both of its encoders in this study."))
    return blocks


def _predictor_section(encoders, planners, cells, diag, ms) -> list[tuple]:
    primary = ms[0]
    blocks: list[tuple] = []
    table = []
    for planner in planners:
        rows, n = analysis.predictor_correlations(encoders, planner, cells, diag, primary)
        if n < stats.MIN_ENCODERS_FOR_CORRELATION:
            blocks.append(
                (
                    "p",
                    f"{planner}: too few encoders to tell ({n} with both diagnostics and results). A rank "
                    f"correlation across encoders needs at least {stats.MIN_ENCODERS_FOR_CORRELATION}; "
                    f"with {n}, "
                    f"|ρ| = 1 happens by chance with probability {stats.chance_of_perfect_rank(n):.3g}. No "
                    "diagnostic is said to predict success.",
                )
            )
            continue
        for r in rows:
            table.append(
                [planner, r["label"], str(r["n"]), _fmt(r["rho"], 2), _fmt_p(r["p"]), _fmt_p(r["p_holm"]),
                 "exact" if r["exact"] else "Monte Carlo"]
            )  # fmt: skip
    if table:
        blocks.insert(
            0,
            (
                "note",
                f"Spearman ρ across encoders between each diagnostic and {primary.label.lower()}, with a "
                "two-sided permutation p-value (Holm over the diagnostics of a planner). Sizes and times "
                "are costs (next section), not predictors.",
            ),
        )
        blocks.append(
            (
                "table",
                ["Planner", "Diagnostic", "Encoders", "ρ", "p (permutation)", "p (Holm)", "Null"],
                table,
            )
        )
    return blocks


def _cost_section(encoders, planners, diag, summaries) -> list[tuple]:
    cols = {
        "Tokens x dim": [],
        "Bytes/frame": [],
        "Encoder img/s": [],
        "Plan s/step": [],
        **{f"Median s/plan ({p})": [] for p in planners},
    }
    names = [e for e in encoders if e in diag or any((e, p) in summaries for p in planners)]
    for e in names:
        d = diag.get(e, {})
        cols["Tokens x dim"].append(
            f"{_fmt(d.get('num_tokens'))} x {_fmt(d.get('dim'))}" if "num_tokens" in d else "–"
        )
        cols["Bytes/frame"].append(d.get("bytes_per_frame"))
        cols["Encoder img/s"].append(d.get("encoder_images_per_s"))
        cols["Plan s/step"].append(d.get("plan_time_per_step_s"))
        for p in planners:
            cols[f"Median s/plan ({p})"].append(
                summaries[(e, p)]["plan_time_s"] if (e, p) in summaries else None
            )
    if not names:
        return [("p", "No costs recorded.")]
    formatted = {k: (v if k == "Tokens x dim" else format_column(v)) for k, v in cols.items()}
    rows = [[e, *(formatted[k][i] for k in cols)] for i, e in enumerate(names)]
    return [
        ("note", "What each encoder costs. Listed beside success, never used to explain it."),
        ("table", ["Encoder", *cols], rows),
    ]


def _diagnostic_section(encoders, diag, scatter) -> list[tuple]:
    names = [e for e in encoders if e in diag]
    if not names:
        return [("p", "results/diagnostics.jsonl is missing: no diagnostics.")]
    spec = [
        ("probe_r2", "Probe R²"),
        ("probe_dims", "Probe dims"),
        ("distance_spearman_per_goal", "Dist. ρ per goal"),
        ("distance_spearman_local", "Dist. ρ local"),
        ("local_radius", "Local radius"),
        ("distance_spearman", "Dist. ρ pooled"),
        *[(f"skill@{k}", f"Error vs copy-last @{k}") for k in HORIZONS],
        *[(f"nmse_temporal@{k}", f"Temporal NMSE @{k}") for k in HORIZONS],
        *[(f"nmse@{k}", f"Pooled-var NMSE @{k}") for k in HORIZONS],
        ("val_loss", "Val loss"),
        ("copy_last_loss", "Copy-last loss"),
    ]
    values = {}
    for key, _ in spec:
        column = []
        for e in names:
            v = diag[e].get(key)
            if key == "distance_spearman_per_goal" and not _is_number(v) and e in scatter:
                v = scatter[e]["rho_goal"]  # older rows: computed from the distances files
            column.append(v)
        values[key] = format_column(column)
    header = ["Encoder", "Seeds", "Probe split", *[label for _, label in spec], "Flags"]
    rows = [
        [e, str(diag[e]["seeds"]), diag[e].get("probe_split") or "–", *(values[k][i] for k, _ in spec),
         "; ".join(diag[e]["flags"]) or "–"]
        for i, e in enumerate(names)
    ]  # fmt: skip
    split_note = (
        "Probe split 'heldout': scored on episodes no in-domain encoder trained on; 'random': a random "
        "episode split (an in-domain encoder may have trained on the probe's test frames)."
    )
    return [
        (
            "note",
            "Means over seeds. Probe R²: ridge on the top-k principal components (k = Probe dims, fitted on "
            "the probe's training frames: the same budget for every encoder), scored on held-out episodes. "
            "Dist. ρ per goal: Spearman between latent and geodesic distance to one goal, averaged over "
            "goals; local: only pairs within the local radius (geodesic); pooled: all goals mixed (kept "
            "for reference: goal-dependent scale leaks into it). Error vs copy-last: model MSE / MSE of "
            "repeating the last frame (> 1 = worse than not predicting, flagged). Temporal NMSE: squared "
            "error / mean squared one-step change, summed over channels. Pooled-var NMSE: the older "
            "per-channel normaliser (mostly spatial variance; copy-last already scores far below 1). "
            + split_note,
        ),
        ("table", header, rows),
    ]


def _comparability(protocol: dict, budget: bool) -> str:
    unbounded = protocol.get("max_iter", "unset") is None
    parts = [
        "DINO-WM's tables report success at the end of the episode ('final') on 50 random_state pairs"
        " with an unbounded MPC loop."
    ]
    if unbounded:
        parts.append(
            "This study ran with max_iter = null (unbounded), so its 'final' success under mpc_* planners is "
            "comparable with those tables (same pairs only if n_evals, seed and goal_source match)."
        )
    else:
        parts.append(
            f"This study bounds the budget (max_steps = {protocol.get('max_steps', '?')}), so no number "
            "here is directly comparable with DINO-WM's tables; compare its curves and paired "
            "differences instead."
        )
    if budget:
        parts.append(
            "Success-vs-budget curves, their area and geodesic distances have no DINO-WM counterpart."
        )
    return " ".join(parts)


# ---------------------------------------------------------------------------------------- report
def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:right}th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}
img{max-width:100%}figure{display:inline-block;margin:0.5em;vertical-align:top}
figcaption{font-size:12px;color:#555}pre{background:#f6f6f6;padding:0.6em;overflow-x:auto}
.note{color:#555;font-size:13px}
"""


def build_report(study_dir: str | Path, *, n_boot: int = stats.N_BOOT) -> dict[str, Path]:
    """Write the study's report from its results files (see the module docstring for the layout).

    Args:
        study_dir: a directory written by ``wmlab study``.
        n_boot: bootstrap replicates for every interval and bootstrap p-value.
    Returns:
        Paths by name: "markdown" (report/report.md), "html" (report/report.html), and the plots
        made: "success_plot", "budget_plot" and "distance_plot" (need first_reached_step and
        dist_trace in the episode rows), "skill_plot" (needs diagnostics), "scatter_plot" (needs
        distances).
    Raises:
        FileNotFoundError naming the path if study.json or results/episodes.jsonl is missing;
        ValueError naming file and line for malformed rows.
    """
    study_dir = Path(study_dir)
    study = _read_json(
        study_dir / "study.json", "study description (is this a directory written by `wmlab study`?)"
    )
    results = study_dir / "results"
    episodes_path = results / "episodes.jsonl"
    if not episodes_path.is_file():
        raise FileNotFoundError(f"episode results not found: {episodes_path} (has the study run?)")
    episodes = _read_jsonl(episodes_path, EPISODE_KEYS)
    for number, r in enumerate(episodes, start=1):
        try:
            analysis.pair_id(r)
        except ValueError as err:
            raise ValueError(f"{episodes_path}:{number}: {err}") from None
    diag_rows = _optional_jsonl(results / "diagnostics.jsonl", ("encoder", "seed"))
    failures = _optional_jsonl(results / "failures.jsonl", ("encoder", "seed", "planner", "stage", "error"))
    out_dir = study_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)

    model_rows = [r for r in episodes if r["encoder"] != BASELINE]
    baseline_rows = [r for r in episodes if r["encoder"] == BASELINE]
    encoders = _ordered(study.get("encoders", []), {r["encoder"] for r in model_rows})
    encoders = _ordered(encoders, set(encoders) | {r["encoder"] for r in diag_rows or []})
    planners = _ordered(study.get("planners", []), {r["planner"] for r in model_rows})
    cells: dict[tuple, list[dict]] = {}
    for r in model_rows:
        cells.setdefault((r["encoder"], r["planner"]), []).append(r)
    budget = analysis.has_budget_fields(model_rows)
    ms = analysis.measures(model_rows)
    keys = [m.key for m in ms]
    kw = {"n_boot": n_boot}
    summaries = {c: analysis.cell_summary(rows, keys, **kw) for c, rows in cells.items()}
    floors, floor_rows, floor_notes = {}, {}, {}
    for planner in planners:
        planner_rows = [r for (e, p), rows in cells.items() if p == planner for r in rows]
        mine, note = analysis.baselines_for(planner, planner_rows, baseline_rows)
        floor_rows[planner] = mine
        floor_notes[planner] = note
        b_keys = (
            keys
            if analysis.has_budget_fields([r for rs in mine.values() for r in rs])
            else [k for k in keys if k != "auc"]
        )
        floors[planner] = {
            name: analysis.cell_summary(rows, b_keys, **kw)
            | ({} if "auc" in b_keys else {"auc": _nan_entry()})
            # Without dist_trace a baseline's distance is the xy one: say so beside the geodesic ones.
            | ({"dist_note": " (xy)"} if budget and not analysis.has_budget_fields(rows) else {})
            for name, rows in mine.items()
        }
    diag = _diagnostic_means(diag_rows)
    scatter = _read_distances(results, encoders)

    # ---- analyses
    comparisons = analysis.pairwise(cells, encoders, planners, ms, **kw)
    primary = {next(m.key for m in ms if m.family == "success"), "dist"}
    comparison_blocks, significant = _comparison_section(comparisons, primary)
    n_significant = sum(c.significant for c in comparisons)
    contrasts = study.get("contrasts")
    factor_results = analysis.factor_contrasts(
        contrasts or analysis.DEFAULT_CONTRASTS, cells, encoders, planners, ms, **kw
    )

    # ---- plots
    written: dict[str, Path] = {}
    written["success_plot"] = _save(
        success_figure(encoders, planners, summaries, floors), out_dir / "success.png"
    )
    if budget:
        curves, floor_curves, dist_curves = {}, {}, {}
        for planner in planners:
            rows_p = [r for (e, p), rows in cells.items() if p == planner for r in rows]
            with_trace = [r for rs in floor_rows[planner].values() for r in rs if r.get("dist_trace")]
            grid = analysis.budget_grid(rows_p + with_trace)
            curves[planner] = {
                e: (grid, analysis.success_curve(cells[(e, planner)], grid))
                for e in encoders
                if (e, planner) in cells
            }
            dist_curves[planner] = {
                e: (grid, analysis.distance_curve(cells[(e, planner)], grid))
                for e in encoders
                if (e, planner) in cells
            }
            for name, rows in floor_rows[planner].items():
                if analysis.has_budget_fields(rows):
                    floor_curves.setdefault(planner, {})[name] = (grid, analysis.success_curve(rows, grid))
                    dist_curves[planner][name] = (grid, analysis.distance_curve(rows, grid))
        aucs = {c: s["auc"]["estimate"] for c, s in summaries.items()}
        written["budget_plot"] = _save(
            budget_figure(planners, curves, floor_curves, aucs), out_dir / "success_vs_budget.png"
        )
        written["distance_plot"] = _save(
            distance_figure(planners, dist_curves), out_dir / "distance_vs_step.png"
        )
    trajectories = _trajectory_plot(
        out_dir / "trajectories.png", study, planners, encoders, cells, floor_rows
    )
    if trajectories is not None:
        written["trajectory_plot"], trajectory_note = trajectories
    cost_curves: dict = {}
    for (e, planner), rows in cells.items():
        if (curve := figures.relative_cost_curve(rows)) is not None:
            cost_curves.setdefault(planner, {})[e] = curve
    cost_curves = {p: {e: c[e] for e in encoders if e in c} for p, c in cost_curves.items()}
    if cost_curves:
        written["plan_cost_plot"] = _save(figures.plan_cost_figure(cost_curves), out_dir / "plan_cost.png")
    histories = {
        e: [r["loss_history"] for r in diag_rows or [] if r["encoder"] == e and r.get("loss_history")]
        for e in encoders
    }
    histories = {e: h for e, h in histories.items() if h}
    if histories:
        written["training_plot"] = _save(figures.training_figure(histories), out_dir / "training_curves.png")
    if (p := _skill_plot(out_dir / "prediction_error_by_horizon.png", encoders, diag)) is not None:
        written["skill_plot"] = p
    if (p := _scatter_plot(out_dir / "latent_vs_geodesic.png", scatter)) is not None:
        written["scatter_plot"] = p

    # ---- bookkeeping tables
    protocol = study.get("protocol", {}) or {}
    protocol_rows = [[k, json.dumps(v) if not isinstance(v, str) else v] for k, v in protocol.items()]
    stages = study.get("stage_seconds", {}) or {}
    stage_rows = [[k, f"{float(v):,.1f}", f"{float(v) / 3600:.2f}"] for k, v in stages.items()]
    if stages:
        total = sum(float(v) for v in stages.values())
        stage_rows.append(["total", f"{total:,.1f}", f"{total / 3600:.2f}"])
    failure_rows = [
        [str(f["encoder"]), str(f["seed"]), str(f["planner"] or "(all)"), str(f["stage"]), str(f["error"])]
        for f in failures or []
    ]
    # Grid cells with neither results nor a recorded failure: say so rather than leave a silent gap.
    # A failure without a planner (e.g. in training) covers every planner of its encoder x seed.
    failed = {(str(f["encoder"]), str(f["seed"]), str(f["planner"] or "*")) for f in failures or []}
    done = {(str(r["encoder"]), str(r["seed"]), str(r["planner"])) for r in model_rows}
    missing = [
        [str(e), str(s), str(p)]
        for e in study.get("encoders", [])
        for s in study.get("seeds", [])
        for p in study.get("planners", [])
        if not {(str(e), str(s), str(p)), (str(e), str(s), "*")} & (done | failed)
    ]
    per_seed_rows = []
    for (encoder, planner), rows in cells.items():
        for entry in analysis.per_seed(rows, keys):
            cells_ = [f"{100 * entry[k]:.1f}%" if k in ("reached", "final") else _fmt(entry[k]) for k in keys]
            per_seed_rows.append([encoder, planner, str(entry["seed"]), str(entry["n"]), *cells_])
    gifs = _first_files(study_dir / "videos", "*.gif")
    imagined = _first_files(study_dir / "imagined", "*.png")

    # ---- the report
    title = f"Representation study: {study.get('env', '?')}"
    max_steps = protocol.get("max_steps")
    n_pairs = len({analysis.pair_id(r) for r in model_rows})
    intro = (
        f"Encoders: {_listing(study.get('encoders'))}. Seeds: {_listing(study.get('seeds'))}. "
        f"Planners: {_listing(study.get('planners'))}. Budget: "
        f"{'max_steps = ' + str(max_steps) if max_steps is not None else 'max_steps not set'}. "
        f"Start/goal pairs: {n_pairs}, shared by every encoder and seed."
    )
    stats_note = (
        "Brackets are 95% intervals from a hierarchical bootstrap (resample seeds, then the shared "
        "start/goal pairs; pairs are crossed with seeds, so one pair draw serves every drawn seed); "
        "counts in parentheses pool seeds x pairs for reading only. Rates and means are means over "
        "seeds of the mean over pairs."
    )
    if budget:
        budget_note = (
            "Primary measures: the area under the success-vs-budget curve (AUC: reached within k steps, "
            "k from 0 to max_steps, divided by max_steps) and the final geodesic distance to the goal."
        )
    else:
        budget_note = (
            "Budget curves: not available. The episode rows carry no first_reached_step / dist_trace (an "
            "older `wmlab plan`): success is 'reached' within max_steps and 'final', and distance is the "
            "final xy distance (final_dist), not the geodesic one."
        )
    blocks: list[tuple] = [("p", intro), ("note", stats_note), ("note", budget_note), ("h2", "Results")]
    blocks += _results_section(planners, encoders, summaries, floors, floor_notes, ms) or [
        ("p", "No episode results.")
    ]
    blocks.append(("img", written["success_plot"], "success rates"))
    if budget:
        blocks += [
            ("h2", "Success vs budget"),
            ("note", "Reached within k env steps (k on the observation grid), mean over seeds; floors and "
             "ceilings are the baselines run under the same planner's protocol."),
            ("img", written["budget_plot"], "success vs budget"),
            ("img", written["distance_plot"], "distance to goal vs step"),
        ]  # fmt: skip
    blocks.append(("h2", "Paired comparisons"))
    blocks.append(
        (
            "note",
            "Encoder A vs B on the same (seed, pair) cells. Rates: exact McNemar test on the discordant "
            "cells (A:B = cells only A / only B succeeded). Distances and curve areas: paired hierarchical "
            "bootstrap of A − B. p-values Holm-adjusted over all comparisons of the same measure.",
        )
    )
    blocks += comparison_blocks or [("p", "Fewer than two encoders under a planner: nothing to compare.")]
    if comparisons:
        labels = " and ".join(m.label.lower() for m in ms if m.key in primary)
        blocks.append(
            (
                "p",
                f"{n_significant} of {len(comparisons)} comparisons are significant after Holm adjustment "
                f"(5%). On the primary measures ({labels}):",
            )
        )
        blocks.append(("ul", significant) if significant else ("p", "no significant difference."))
    blocks += [("h2", "Four factors"), *_factor_section(factor_results, bool(contrasts))]
    per_seed_header = ["Encoder", "Planner", "Seed", "Episodes", *[m.label for m in ms]]
    blocks += [("h2", "Per seed"), ("table", per_seed_header, per_seed_rows)] if per_seed_rows else []
    blocks += [("h2", "What predicts success")]
    blocks += (
        _predictor_section(encoders, planners, cells, diag, ms)
        if diag and cells
        else [
            (
                "p",
                "Nothing to correlate: it needs diagnostics (results/diagnostics.jsonl) and episode results.",
            )
        ]
    )
    blocks += [("h2", "Costs"), *_cost_section(encoders, planners, diag, summaries)]
    blocks += [("h2", "Diagnostics per encoder"), *_diagnostic_section(encoders, diag, scatter)]
    if "skill_plot" in written:
        blocks.append(("img", written["skill_plot"], "prediction error vs horizon"))
    if "scatter_plot" in written:
        blocks += [
            ("p", "Latent distance to a goal frame vs shortest-path distance in the maze:"),
            ("img", written["scatter_plot"], "latent vs geodesic distance"),
        ]
    else:
        blocks.append(("p", "No results/distances/*.json: no latent-vs-geodesic scatter."))
    blocks += [("h2", "Planning and training")]
    if "plan_cost_plot" in written:
        blocks += [
            ("note", "The best cost found after each optimiser iteration of every episode's first plan, "
             "divided by the best after the first iteration (costs of different encoders are in different "
             "latent units), mean over episodes and seeds: how much more each iteration buys."),
            ("img", written["plan_cost_plot"], "planning cost per iteration"),
        ]  # fmt: skip
    else:
        blocks.append(("p", "No plan_cost_trace in the episode rows (an older `wmlab plan`): no cost curve."))
    if "training_plot" in written:
        blocks += [("img", written["training_plot"], "training curves")]
    else:
        blocks.append(("p", "No loss_history in results/diagnostics.jsonl: no training curves."))
    blocks += [("h2", "Comparability with DINO-WM"), ("p", _comparability(protocol, budget))]
    blocks += [("h2", "Episodes")]
    if "trajectory_plot" in written:
        blocks += [("note", trajectory_note), ("img", written["trajectory_plot"], "trajectories on the maze")]
    else:
        blocks.append(("p", "No xy_trace in the episode rows (an older `wmlab plan`): no trajectories."))
    blocks += [("gifs", gifs) if gifs else ("p", "No videos.")]
    blocks.append(("h2", "Imagined vs real"))
    if imagined:
        blocks.append(("note", "Per cell, one episode's first plan: top, the real frames when its actions "
                       "are executed open loop, then the goal; bottom, the world model's imagined rollout of "
                       "the same actions through a decoder, then the decoded goal."))  # fmt: skip
        blocks += [
            ("img", p, f"imagined vs real: {p.parent.name}", f"../imagined/{p.parent.name}/{p.name}")
            for p in imagined
        ]
    else:
        blocks.append(("p", "No imagined/ pictures: no run of this study has a decoder (train one with "
                       "`wmlab train-decoder`, or use an encoder with its own, like the vae)."))  # fmt: skip
    blocks += [
        ("h2", "Protocol"),
        ("table", ["Setting", "Value"], protocol_rows) if protocol_rows else ("p", "Not recorded."),
        ("h2", "Stage timings"),
        ("table", ["Stage", "Seconds", "Hours"], stage_rows) if stage_rows else ("p", "Not recorded."),
    ]
    if study.get("command"):
        blocks += [("p", "Command:"), ("pre", str(study["command"]))]
    blocks.append(("h2", "Versions and full configuration"))
    versions = study.get("versions") or {}
    blocks.append(
        ("table", ["Package", "Version"], [[k, str(v)] for k, v in versions.items()])
        if versions else ("p", "Versions not recorded (study.json from an older wmlab).")
    )  # fmt: skip
    if study.get("config"):
        blocks.append(("pre", json.dumps(study["config"], indent=1, sort_keys=True)))
    else:
        blocks.append(("p", "The resolved configuration is not recorded (study.json from an older wmlab)."))
    blocks.append(("h2", "Failed cells"))
    if failure_rows:
        blocks.append(("table", ["Encoder", "Seed", "Planner", "Stage", "Error"], failure_rows))
    else:
        blocks.append(("p", "None." if failures is not None else "No results/failures.jsonl: none recorded."))
    if missing:
        blocks += [
            ("p", "Cells of the grid with neither results nor a recorded failure:"),
            ("table", ["Encoder", "Seed", "Planner"], missing),
        ]

    md_path = out_dir / "report.md"
    _atomic_write(md_path, _render_markdown(title, blocks))
    written["markdown"] = md_path
    html_path = out_dir / "report.html"
    _atomic_write(html_path, _render_html(title, blocks))
    written["html"] = html_path
    return written


def _nan_entry() -> dict:
    return {"estimate": float("nan"), "lo": float("nan"), "hi": float("nan")}


def _atomic_write(path: Path, text: str) -> None:
    from wmlab.integrity import atomic_write_text

    atomic_write_text(path, text)
