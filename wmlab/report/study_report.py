"""The representation study's report, built from its results files alone.

``build_report(study_dir)`` reads (``*`` = optional; a missing optional file leaves its section
saying so, never silently empty)::

    study.json                      env, encoders, seeds, planners, protocol, stage_seconds, command
    results/episodes.jsonl          one row per encoder x seed x planner x episode
    results/diagnostics.jsonl *     one row per encoder x seed (``diagnose_run`` keys + seed,
                                    val_loss, copy_last_loss, plan_time_per_step_s)
    results/distances/<encoder>__seed<k>.json *   {"latent": [...], "geodesic": [...]}
    results/failures.jsonl *        {"encoder", "seed", "planner", "stage", "error"}
    videos/<encoder>__seed<k>__<planner>/*.gif *

and writes ``report/report.md`` (images referenced beside it), ``report/report.html`` (one file:
CSS inline, every image and GIF a base64 data URI, no external reference) and the PNG plots.

Success rates pool seeds and episodes of a cell (encoder x planner) and carry 95% Wilson score
intervals: a binomial interval that stays inside [0, 1] and behaves at 0/n and n/n, where the
normal approximation collapses to zero width. Diagnostics are averaged over seeds. The "what
predicts success" section is a Spearman rank correlation across encoders, per planner, between
each diagnostic and the success rate: with few encoders it is a hint, and the report says so.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path

import numpy as np

from wmlab.diagnostics import spearman

#: Episode rows must carry these keys (the study runner's contract).
EPISODE_KEYS = ("encoder", "seed", "planner", "episode", "reached", "final", "final_dist")
#: Diagnostic columns of the main table and the correlation section: (key, label, higher is better).
DIAGNOSTICS = (
    ("probe_r2", "Probe R²", True),
    ("distance_spearman", "Dist. Spearman", True),
    ("nmse@1", "NMSE@1", False),
    ("nmse@5", "NMSE@5", False),
    ("bytes_per_frame", "Bytes/frame", False),
    ("plan_time_per_step_s", "Plan s/step", False),
)
#: Columns of the per-encoder diagnostics table after encoder, seeds and token shape.
DIAGNOSTIC_TABLE_KEYS = (
    "bytes_per_frame", "encoder_images_per_s", "probe_r2", "distance_spearman", "nmse@1", "nmse@5",
    "val_loss", "copy_last_loss", "plan_time_per_step_s",
)  # fmt: skip
BASELINE = "baseline"
MAX_GIFS = 8  # GIFs shown (one per video folder, in folder order)
MAX_GIF_BYTES = 4 * 2**20  # larger GIFs are linked from the Markdown but not embedded in the HTML
MAX_SCATTER_POINTS = 3000  # per encoder, subsampled (seeded) so the PNG stays light


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (lo, hi) of a binomial proportion ``successes / n``.

    ``z`` = 1.96 gives 95%. n = 0 gives (0, 1): no data, no information.
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


# ---------------------------------------------------------------------------------------- tables
def _cell_stats(rows: list[dict]) -> dict:
    n = len(rows)
    reached = sum(bool(r["reached"]) for r in rows)
    final = sum(bool(r["final"]) for r in rows)
    dists = [float(r["final_dist"]) for r in rows if r.get("final_dist") is not None]
    plan = [float(r["plan_time_s"]) for r in rows if r.get("plan_time_s") is not None]
    return {
        "n": n,
        "seeds": len({r["seed"] for r in rows}),
        "reached": reached,
        "final": final,
        "reached_rate": reached / n if n else float("nan"),
        "final_rate": final / n if n else float("nan"),
        "reached_ci": wilson_interval(reached, n),
        "final_ci": wilson_interval(final, n),
        "final_dist": float(np.mean(dists)) if dists else float("nan"),
        "plan_time_s": float(np.median(plan)) if plan else float("nan"),
    }


def _diagnostic_means(rows: list[dict] | None) -> dict[str, dict]:
    """encoder -> {key: mean over seeds} for numeric diagnostics, with nmse@k from the curves."""
    out: dict[str, dict] = {}
    for encoder in sorted({r["encoder"] for r in rows or []}):
        mine = [r for r in rows if r["encoder"] == encoder]
        means: dict = {"seeds": len(mine)}
        keys = {
            k for r in mine for k, v in r.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        for key in sorted(keys - {"seed"}):
            values = [r[key] for r in mine if isinstance(r.get(key), int | float) and r[key] is not None]
            mean = float(np.mean(values)) if values else float("nan")
            # Counts (tokens, dim, bytes) stay integers so the tables print them as such.
            integral = values and all(isinstance(v, int) for v in values) and mean.is_integer()
            means[key] = int(mean) if integral else mean
        curves = [r["nmse_by_horizon"] for r in mine if r.get("nmse_by_horizon")]
        if curves:
            K = min(len(c) for c in curves)
            means["nmse_curve"] = np.mean([c[:K] for c in curves], axis=0).tolist()
            for k in (1, 5):
                means[f"nmse@{k}"] = means["nmse_curve"][k - 1] if K >= k else float("nan")
        out[encoder] = means
    return out


def _fmt(value, digits: int = 3) -> str:
    """A table cell: '–' for missing/NaN, thousands separators for large values, else fixed digits."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    value = float(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if 0 < abs(value) < 10**-digits:
        return f"{value:.2e}"
    return f"{value:.{digits}f}"


def format_rate(k: int, n: int, ci: tuple[float, float]) -> str:
    """'45.0% [35.6, 54.8] (45/100)': rate and its interval in percent, then the counts."""
    if n == 0:
        return "– (0/0)"
    return f"{100 * k / n:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}] ({k}/{n})"


def _success_cells(s: dict) -> list[str]:
    """Episodes (seeds), both success rates with intervals, mean final distance."""
    return [
        f"{s['n']} ({s['seeds']})",
        format_rate(s["reached"], s["n"], s["reached_ci"]),
        format_rate(s["final"], s["n"], s["final_ci"]),
        _fmt(s["final_dist"]),
    ]


def _listing(values) -> str:
    return ", ".join(map(str, values or [])) or "–"


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


# ---------------------------------------------------------------------------------------- plots
def _figure(width: float, height: float):
    # A bare Figure renders with Agg and touches no global pyplot state or backend setting.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.partial.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def _success_plot(path: Path, encoders, planners, cells, baselines) -> Path:
    fig = _figure(max(6.0, 1.1 * len(encoders) * max(1, len(planners)) + 2), 5.5)
    axes = fig.subplots(2, 1, sharex=True)
    width = 0.8 / max(1, len(planners))
    x = np.arange(len(encoders))
    for ax, kind, title in (
        (axes[0], "reached", "goal reached during the episode"),
        (axes[1], "final", "at the final step"),
    ):
        for j, planner in enumerate(planners):
            rates, lows, highs = [], [], []
            for encoder in encoders:
                s = cells.get((encoder, planner))
                if s is None or s["n"] == 0:
                    rates.append(np.nan), lows.append(0.0), highs.append(0.0)
                    continue
                rate, (lo, hi) = s[f"{kind}_rate"], s[f"{kind}_ci"]
                rates.append(100 * rate), lows.append(100 * (rate - lo)), highs.append(100 * (hi - rate))
            ax.bar(
                x + (j - (len(planners) - 1) / 2) * width,
                rates,
                width,
                yerr=[lows, highs],
                capsize=3,
                label=planner,
            )
        for (name, s), style in zip(baselines.items(), ("--", ":", "-."), strict=False):
            ax.axhline(
                100 * s[f"{kind}_rate"], color="gray", linestyle=style, linewidth=1, label=f"baseline {name}"
            )
        ax.set_ylim(0, 105)
        ax.set_ylabel("success %")
        ax.set_title(f"Success ({title}), 95% Wilson intervals", fontsize=10)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8, ncols=2)
    axes[1].set_xticks(x, encoders, rotation=30, ha="right")
    return _save(fig, path)


def _nmse_plot(path: Path, encoders, diag) -> Path | None:
    curves = {e: diag[e]["nmse_curve"] for e in encoders if "nmse_curve" in diag.get(e, {})}
    if not curves:
        return None
    fig = _figure(6.0, 4.0)
    ax = fig.subplots()
    for encoder, curve in curves.items():
        ax.plot(np.arange(1, len(curve) + 1), curve, marker="o", markersize=3, label=encoder)
    if all(v > 0 for c in curves.values() for v in c):
        ax.set_yscale("log")
    ax.set_xlabel("open-loop model steps")
    ax.set_ylabel("NMSE (per-channel variance = 1)")
    ax.set_title("Open-loop prediction error vs horizon (mean over seeds)", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


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
        ax.set_title(f"{encoder} (ρ = {_fmt(d['rho'], 2)})", fontsize=9)
        ax.set_xlabel("geodesic distance", fontsize=8)
        ax.set_ylabel("latent MSE to goal", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------- report
def _correlations(encoders, planners, cells, diag) -> tuple[list[list[str]], list[str]]:
    """Rows (diagnostic x planner) of Spearman rho between a diagnostic and success, and sentences."""
    rows, sentences = [], []
    for planner in planners:
        have = [e for e in encoders if (e, planner) in cells and cells[(e, planner)]["n"] and e in diag]
        for key, label, higher_better in DIAGNOSTICS:
            pairs = [(diag[e].get(key), cells[(e, planner)]) for e in have]
            pairs = [(v, s) for v, s in pairs if v is not None and math.isfinite(v)]
            n = len(pairs)
            rhos = {}
            for kind in ("reached", "final"):
                if n >= 3:
                    rhos[kind] = spearman([v for v, _ in pairs], [s[f"{kind}_rate"] for _, s in pairs])
                else:
                    rhos[kind] = float("nan")
            rows.append([planner, label, str(n), _fmt(rhos["reached"], 2), _fmt(rhos["final"], 2)])
            rho = rhos["reached"]
            if n < 3:
                continue
            if not math.isfinite(rho):
                sentences.append(
                    f"With {planner}: {label} (or the success rate) is the same for every encoder, so no "
                    "rank correlation."
                )
                continue
            direction = "rises" if rho > 0 else "falls"
            strength = "strongly" if abs(rho) >= 0.7 else "weakly" if abs(rho) < 0.4 else "moderately"
            caveat = "" if (rho > 0) == higher_better else ", the opposite of what one would expect"
            sentences.append(
                f"With {planner}, across {n} encoders, success (goal reached) {direction} {strength} with "
                f"{label} (Spearman ρ = {rho:+.2f}; with success at the final step "
                f"ρ = {_fmt(rhos['final'], 2)}){caveat}."
            )
        if len(have) < 3:
            sentences.append(
                f"{planner}: only {len(have)} encoder(s) with both diagnostics and results; a rank "
                "correlation needs at least 3, so none is stated."
            )
    return rows, sentences


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


def build_report(study_dir: str | Path) -> dict[str, Path]:
    """Write the study's report from its results files (see the module docstring for the layout).

    Returns:
        Paths by name: "markdown" (report/report.md), "html" (report/report.html), and the plots
        made: "success_plot", "nmse_plot" (needs diagnostics), "scatter_plot" (needs distances).
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
    diag_rows = _optional_jsonl(results / "diagnostics.jsonl", ("encoder", "seed"))
    failures = _optional_jsonl(results / "failures.jsonl", ("encoder", "seed", "planner", "stage", "error"))
    out_dir = study_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)

    model_rows = [r for r in episodes if r["encoder"] != BASELINE]
    encoders = _ordered(study.get("encoders", []), {r["encoder"] for r in model_rows})
    encoders = _ordered(encoders, set(encoders) | {r["encoder"] for r in diag_rows or []})
    planners = _ordered(study.get("planners", []), {r["planner"] for r in model_rows})
    cells: dict[tuple, dict] = {}
    for encoder in encoders:
        for planner in planners:
            mine = [r for r in model_rows if r["encoder"] == encoder and r["planner"] == planner]
            if mine:
                cells[(encoder, planner)] = _cell_stats(mine)
    baselines = {
        p: _cell_stats([r for r in episodes if r["encoder"] == BASELINE and r["planner"] == p])
        for p in _ordered(["random", "oracle"], {r["planner"] for r in episodes if r["encoder"] == BASELINE})
    }
    diag = _diagnostic_means(diag_rows)

    # ---- distances for the scatter (all seeds of an encoder pooled)
    scatter: dict[str, dict] = {}
    dist_dir = results / "distances"
    dist_files = sorted(dist_dir.glob("*__seed*.json")) if dist_dir.is_dir() else []
    for encoder in encoders:
        files = [f for f in dist_files if f.stem.rsplit("__seed", 1)[0] == encoder]
        latent, geodesic = [], []
        for f in files:
            d = _read_json(f, "distances")
            if len(d.get("latent", [])) != len(d.get("geodesic", [])):
                raise ValueError(f"{f}: 'latent' and 'geodesic' have different lengths")
            latent += list(d["latent"])
            geodesic += list(d["geodesic"])
        latent, geodesic = np.asarray(latent, float), np.asarray(geodesic, float)
        finite = np.isfinite(latent) & np.isfinite(geodesic)  # an unreachable pair has no rank to compare
        if finite.any():
            latent, geodesic = latent[finite], geodesic[finite]
            scatter[encoder] = {"latent": latent, "geodesic": geodesic, "rho": spearman(latent, geodesic)}

    # ---- plots
    written: dict[str, Path] = {}
    written["success_plot"] = _success_plot(out_dir / "success.png", encoders, planners, cells, baselines)
    if (p := _nmse_plot(out_dir / "nmse_by_horizon.png", encoders, diag)) is not None:
        written["nmse_plot"] = p
    if (p := _scatter_plot(out_dir / "latent_vs_geodesic.png", scatter)) is not None:
        written["scatter_plot"] = p

    # ---- tables
    main_header = [
        "Encoder", "Planner", "Episodes (seeds)", "Success reached [95% CI]", "Success final [95% CI]",
        "Mean final dist", *[label for _, label, _ in DIAGNOSTICS], "Median s/plan",
    ]  # fmt: skip
    main_rows = []
    for (encoder, planner), s in cells.items():
        d = diag.get(encoder, {})
        diagnostics = [_fmt(d.get(key)) for key, _, _ in DIAGNOSTICS]
        main_rows.append([encoder, planner, *_success_cells(s), *diagnostics, _fmt(s["plan_time_s"])])
    for name, s in baselines.items():
        label = {"random": "random (floor)", "oracle": "oracle (ceiling)"}.get(name, name)
        main_rows.append(
            [BASELINE, label, *_success_cells(s), *["–"] * len(DIAGNOSTICS), _fmt(s["plan_time_s"])]
        )
    diag_header = [
        "Encoder", "Seeds", "Tokens x dim", "Bytes/frame", "Encoder img/s", "Probe R²", "Dist. Spearman",
        "NMSE@1", "NMSE@5", "Val loss", "Copy-last loss", "Plan s/step",
    ]  # fmt: skip
    diag_table = [
        [e, str(d["seeds"]), f"{_fmt(d.get('num_tokens'))} x {_fmt(d.get('dim'))}"]
        + [_fmt(d.get(k)) for k in DIAGNOSTIC_TABLE_KEYS]
        for e, d in ((e, diag[e]) for e in encoders if e in diag)
    ]  # fmt: skip
    corr_rows, sentences = _correlations(encoders, planners, cells, diag)
    corr_header = ["Planner", "Diagnostic", "Encoders", "ρ vs success reached", "ρ vs success final"]
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

    # ---- GIFs
    gifs = []
    video_root = study_dir / "videos"
    if video_root.is_dir():
        for folder in sorted(p for p in video_root.iterdir() if p.is_dir()):
            found = sorted(folder.glob("*.gif"))
            if found:
                gifs.append(found[0])
            if len(gifs) >= MAX_GIFS:
                break

    # ---- Markdown
    title = f"Representation study: {study.get('env', '?')}"
    budget = protocol.get("max_steps")
    intro = (
        f"Encoders: {_listing(study.get('encoders'))}. Seeds: {_listing(study.get('seeds'))}. "
        f"Planners: {_listing(study.get('planners'))}. Budget: "
        f"{'max_steps = ' + str(budget) if budget is not None else 'max_steps not set'}."
    )
    interval_note = (
        "Success pools seeds and episodes of a cell; brackets are 95% Wilson score intervals. "
        "Diagnostics are means over seeds (NMSE@k: open-loop error after k model steps, in units of "
        "each latent channel's variance; lower is better)."
    )
    md: list[str] = [f"# {title}", "", intro, "", "## Results", "", interval_note, ""]
    md += [_markdown_table(main_header, main_rows) if main_rows else "No episode results.", ""]
    md += ["![success](success.png)", ""]
    md += ["## What predicts success", ""]
    md += [f"- {s}" for s in sentences] or [
        "Nothing to correlate: it needs diagnostics (results/diagnostics.jsonl) and episode results."
    ]
    md += ["", _markdown_table(corr_header, corr_rows) if corr_rows else "", ""]
    md += ["## Diagnostics per encoder", ""]
    if diag_table:
        md += [_markdown_table(diag_header, diag_table), ""]
    else:
        md += ["results/diagnostics.jsonl is missing: no diagnostics.", ""]
    if "nmse_plot" in written:
        md += ["![nmse](nmse_by_horizon.png)", ""]
    if "scatter_plot" in written:
        md += [
            "Latent distance to a goal frame vs shortest-path distance in the maze:",
            "",
            "![scatter](latent_vs_geodesic.png)",
            "",
        ]
    else:
        md += ["No results/distances/*.json: no latent-vs-geodesic scatter.", ""]
    md += ["## Episodes", ""]
    md += [f"![{g.parent.name}](../videos/{g.parent.name}/{g.name})" for g in gifs] or ["No videos."]
    md += [
        "",
        "## Protocol",
        "",
        _markdown_table(["Setting", "Value"], protocol_rows) if protocol_rows else "Not recorded.",
        "",
    ]
    md += [
        "## Stage timings",
        "",
        _markdown_table(["Stage", "Seconds", "Hours"], stage_rows) if stage_rows else "Not recorded.",
        "",
    ]
    if study.get("command"):
        md += ["Command:", "", "```", str(study["command"]), "```", ""]
    md += ["## Failed cells", ""]
    if failure_rows:
        md += [_markdown_table(["Encoder", "Seed", "Planner", "Stage", "Error"], failure_rows), ""]
    else:
        md += ["None." if failures is not None else "No results/failures.jsonl: none recorded.", ""]
    if missing:
        md += ["Cells of the grid with neither results nor a recorded failure:", ""]
        md += [_markdown_table(["Encoder", "Seed", "Planner"], missing), ""]
    md_path = out_dir / "report.md"
    _atomic_write(md_path, "\n".join(md) + "\n")
    written["markdown"] = md_path

    # ---- HTML (self-contained)
    def img(path: Path, alt: str) -> str:
        return f'<img alt="{html.escape(alt)}" src="{_data_uri(path, "image/png")}">'

    e = html.escape
    body = [
        f"<h1>{e(title)}</h1>",
        f"<p>{e(intro)}</p>",
        "<h2>Results</h2>",
        f"<p class='note'>{e(interval_note)}</p>",
    ]
    body.append(_html_table(main_header, main_rows) if main_rows else "<p>No episode results.</p>")
    body.append(img(written["success_plot"], "success rates"))
    body += ["<h2>What predicts success</h2>"]
    body += ["<ul>" + "".join(f"<li>{e(s)}</li>" for s in sentences) + "</ul>"] if sentences else []
    body += [_html_table(corr_header, corr_rows)] if corr_rows else ["<p>Nothing to correlate.</p>"]
    body += ["<h2>Diagnostics per encoder</h2>"]
    body += (
        [_html_table(diag_header, diag_table)]
        if diag_table
        else ["<p>results/diagnostics.jsonl is missing.</p>"]
    )
    if "nmse_plot" in written:
        body.append(img(written["nmse_plot"], "NMSE vs horizon"))
    if "scatter_plot" in written:
        body += ["<p>Latent distance to a goal frame vs shortest-path distance in the maze:</p>"]
        body.append(img(written["scatter_plot"], "latent vs geodesic distance"))
    body += ["<h2>Episodes</h2>"]
    for g in gifs:
        name = e(f"{g.parent.name}/{g.name}")
        size = g.stat().st_size
        if size <= MAX_GIF_BYTES:
            uri = _data_uri(g, "image/gif")
            body.append(f"<figure><img alt='{name}' src='{uri}'><figcaption>{name}</figcaption></figure>")
        else:
            body.append(f"<p class='note'>{name} is too large to embed ({size:,} bytes).</p>")
    if not gifs:
        body.append("<p>No videos.</p>")
    body += [
        "<h2>Protocol</h2>",
        _html_table(["Setting", "Value"], protocol_rows) if protocol_rows else "<p>Not recorded.</p>",
    ]
    body += [
        "<h2>Stage timings</h2>",
        _html_table(["Stage", "Seconds", "Hours"], stage_rows) if stage_rows else "<p>Not recorded.</p>",
    ]
    if study.get("command"):
        body.append(f"<p>Command:</p><pre>{e(str(study['command']))}</pre>")
    body += ["<h2>Failed cells</h2>"]
    body.append(
        _html_table(["Encoder", "Seed", "Planner", "Stage", "Error"], failure_rows)
        if failure_rows
        else "<p>None.</p>"
    )
    if missing:
        body += [
            "<p>Cells of the grid with neither results nor a recorded failure:</p>",
            _html_table(["Encoder", "Seed", "Planner"], missing),
        ]
    page = (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>"
        f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )
    html_path = out_dir / "report.html"
    _atomic_write(html_path, page)
    written["html"] = html_path
    return written


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
