"""The study report: Wilson intervals, and a report built from a fake study directory."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from wmlab.report import stats
from wmlab.report.study_report import (
    build_report,
    format_column,
    success_figure,
    wilson_interval,
)


def test_wilson_interval_known_values():
    assert wilson_interval(5, 10) == pytest.approx((0.236590, 0.763410), abs=1e-6)
    # At 0/n and n/n the interval has a closed form: the far end is z^2 / (n + z^2) from the edge.
    assert wilson_interval(0, 10) == pytest.approx((0.0, 3.8416 / 13.8416), abs=1e-9)
    assert wilson_interval(0, 10)[1] == pytest.approx(0.277540, abs=1e-6)
    assert wilson_interval(10, 10) == pytest.approx((10 / 13.8416, 1.0), abs=1e-9)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(45, 100, z=2.576)  # 99%
    assert lo < 0.45 < hi and hi - lo > wilson_interval(45, 100)[1] - wilson_interval(45, 100)[0]
    with pytest.raises(ValueError, match="successes <= n"):
        wilson_interval(11, 10)


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


#: Reached successes per (encoder, seed) out of 10 episodes each; "c" seed 1 failed in training.
REACHED = {("a", 0): 9, ("a", 1): 6, ("b", 0): 4, ("b", 1): 5, ("c", 0): 1}
PROBE = {"a": 0.9, "b": 0.6, "c": 0.2}


def _fake_study(root, *, optional=True):
    study = {
        "env": "point_maze",
        "encoders": ["a", "b", "c"],
        "seeds": [0, 1],
        "planners": ["cem"],
        "protocol": {"max_steps": 30, "goal_source": "random_state", "goal_H": 5, "n_evals": 10},
        "stage_seconds": {"collect": 60.0, "train": 3600.0, "plan": 1800.5},
        "command": "wmlab study preset=tiny",
    }
    (root / "study.json").write_text(json.dumps(study))
    episodes = []
    for (encoder, seed), reached in REACHED.items():
        for i in range(10):
            episodes.append(
                {
                    "encoder": encoder, "seed": seed, "planner": "cem", "episode": i, "start_seed": 100 + i,
                    "reached": i < reached, "final": i < reached - 1, "final_dist": 0.1 * i, "steps_used": 20,
                    "max_steps": 30, "plan_time_s": 0.5, "n_plans": 4,
                }
            )  # fmt: skip
    for planner, reached in (("random", 1), ("oracle", 10)):
        for i in range(10):
            episodes.append(
                {
                    "encoder": "baseline", "seed": 0, "planner": planner, "episode": i, "start_seed": 100 + i,
                    "reached": i < reached, "final": i < reached, "final_dist": 1.0, "steps_used": 30,
                    "max_steps": 30, "plan_time_s": 0.0, "n_plans": 0,
                }
            )  # fmt: skip
    _write_jsonl(root / "results" / "episodes.jsonl", episodes)
    if not optional:
        return
    diagnostics = [
        {
            "encoder": encoder,
            "seed": seed,
            "probe_r2": PROBE[encoder],
            "distance_spearman": PROBE[encoder] / 2,
            "nmse_by_horizon": [0.1 * (k + 1) / PROBE[encoder] for k in range(10)],
            "num_tokens": 16,
            "dim": 192,
            "bytes_per_frame": 6144,
            "encoder_images_per_s": 1000.0,
            "val_loss": 0.01,
            "copy_last_loss": 0.02,
            "plan_time_per_step_s": 0.25,
        }
        for encoder, seed in REACHED
    ]
    _write_jsonl(root / "results" / "diagnostics.jsonl", diagnostics)
    rng = np.random.default_rng(0)
    for encoder in ("a", "b"):  # none for "c": an optional file missing
        geodesic = rng.uniform(0, 5, 50)
        latent = geodesic * PROBE[encoder] + rng.normal(0, 0.5, 50)
        path = root / "results" / "distances" / f"{encoder}__seed0.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"latent": latent.tolist(), "geodesic": geodesic.tolist()}))
    _write_jsonl(
        root / "results" / "failures.jsonl",
        [
            {
                "encoder": "c",
                "seed": 1,
                "planner": None,
                "stage": "train",
                "error": "NaN loss at <epoch 3> | x",
            }
        ],
    )
    import imageio.v3 as iio

    frames = np.zeros((3, 16, 16, 3), np.uint8)
    frames[:, 4:8, 4:8] = [255, 0, 0]
    gif_dir = root / "videos" / "a__seed0__cem"
    gif_dir.mkdir(parents=True)
    iio.imwrite(gif_dir / "episode_000.gif", frames, duration=100, loop=0)


def _assert_self_contained(page: str):
    for attr in re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page):
        assert attr.startswith("data:"), attr[:80]
    assert not re.search(r"<(link|script)\b", page)
    assert "url(" not in page


def test_report_from_a_legacy_study(tmp_path):
    """Rows of an older ``wmlab plan`` (no budget fields, no goal ids, pooled-variance NMSE only)."""
    _fake_study(tmp_path)
    written = build_report(tmp_path, n_boot=500)
    assert {"markdown", "html", "success_plot", "skill_plot", "scatter_plot"} <= set(written)
    assert "budget_plot" not in written
    for path in written.values():
        assert path.is_file() and path.stat().st_size > 0 and path.parent == tmp_path / "report"
    md = written["markdown"].read_text()
    page = written["html"].read_text()
    _assert_self_contained(page)
    assert page.count("data:image/png;base64,") == 3 and page.count("data:image/gif;base64,") == 1
    assert "Budget curves: not available" in md and "Final xy dist." in md
    # Seed-then-pair means: a reached (9/10 + 6/10) / 2 = 75%, the pooled counts beside it.
    row = next(line for line in md.splitlines() if line.startswith("| a | 20 (2) |"))
    assert "| 75.0% [" in row and "(15/20)" in row and "| 0.450 [" in row
    # a vs b reached: a succeeds on 6 cells b fails (seed 0: episodes 4-8; seed 1: episode 5), none reverse.
    assert (
        "| cem | a | b | Success reached | 75.0% | 45.0% | +30.0 pts [" in md
        and "McNemar 6:0 | 0.031 |" in md
    )
    # Three encoders: no rank correlation is stated (the old report said "rises strongly").
    assert "too few encoders to tell (3 with both" in md and "rises strongly" not in md
    assert "| a | 16 x 192 | 6,144 | 1,000 | 0.250 | 0.500 |" in md  # costs, listed apart
    assert "| a | 2 | – | 0.900 |" in md  # per-encoder diagnostics
    assert (
        "NaN loss at &lt;epoch 3&gt;" in page
        and "| c | 1 | (all) | train | NaN loss at <epoch 3> \\| x |" in md
    )  # failure listed
    assert "neither results nor a recorded failure" not in md  # c seed 1 is accounted for by its failure
    assert "| max_steps | 30 |" in md and "| plan | 1,800.5 | 0.50 |" in md and "| total | 5,460.5 |" in md
    assert "../videos/a__seed0__cem/episode_000.gif" in md
    assert "skipped: random_vit, random_vit_cls not in this study" in md  # default contrasts, absent


#: Success probability of each encoder on the shared pairs (a pair is reached when its difficulty is
#: below it, so encoders agree on which pairs are hard, as real ones do).
QUALITY = {"random_vit": 0.8, "random_vit_cls": 0.2, "pixels": 0.95, "vae": 0.8, "resnet": 0.5}
CONTRASTS = [
    {"factor": "spatial patch structure", "a": "random_vit", "b": "random_vit_cls"},
    {"factor": "architecture prior", "a": "random_vit", "b": "pixels"},
    {"factor": "reconstructive latent", "a": "vae", "b": "random_vit"},
    {"factor": "pretrained semantics", "a": "dinov2_patch", "b": "random_vit"},
]


def _first_step(quality, difficulty, max_steps, every):
    """The first observation step at which the goal is reached, or None: easier pairs sooner."""
    if difficulty >= quality:
        return None
    return int(round(difficulty / quality * (max_steps - every) / every) * every) + every


def _episode(encoder, seed, planner, i, difficulty, quality, max_steps, every=5, **extra):
    difficulty = min(max(float(difficulty), 0.0), 1.0)
    first = _first_step(quality, difficulty, max_steps, every)
    steps = np.arange(0, max_steps + 1, every)
    start = 1.0 + 4.0 * difficulty
    trace = [0.0 if first is not None and s >= first else start * (1 - 0.5 * s / max_steps) for s in steps]
    return {
        "encoder": encoder, "seed": seed, "planner": planner, "episode": i, "pair_seed": 99 * i + 1,
        "reached": first is not None, "final": first is not None and difficulty < quality - 0.1,
        "final_dist": trace[-1] * 0.9, "first_reached_step": first, "dist_trace": [float(t) for t in trace],
        "max_steps": max_steps, "plan_time_s": 0.5, "n_plans": 4, **extra,
    }  # fmt: skip


def _budget_study(root, encoders=tuple(QUALITY)[:4], seeds=(0, 1, 2), n_pairs=40, one_planner=False):
    """A study of encoders x seeds x planners on shared pairs, with budget fields and baselines."""
    planners = {"mpc_cem": 100} if one_planner else {"mpc_cem": 100, "cem": 25}
    study = {
        "env": "point_maze", "encoders": list(encoders), "seeds": list(seeds), "planners": list(planners),
        "protocol": {"max_steps": 100, "max_iter": 20, "n_evals": n_pairs}, "contrasts": CONTRASTS,
    }  # fmt: skip
    (root / "study.json").write_text(json.dumps(study))
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0, 1, n_pairs)
    # Seeds differ a little on each pair; encoders of equal quality then behave identically.
    jitters = {seed: rng.normal(0, 0.03, n_pairs) for seed in seeds}
    rows = []
    for encoder in encoders:
        for seed in seeds:
            jitter = jitters[seed]
            for planner, max_steps in planners.items():
                q = QUALITY[encoder] * (1.0 if planner == "mpc_cem" else 0.6)
                for i in range(n_pairs):
                    rows.append(_episode(encoder, seed, planner, i, difficulty[i] + jitter[i], q, max_steps))
    # Baselines under each planner's own protocol: random reaches few pairs, the oracle all.
    for planner, max_steps in planners.items():
        for name, q in (("random", 0.25 if planner == "mpc_cem" else 0.05), ("oracle", 1.01)):
            for i in range(n_pairs):
                rows.append(_episode(BASE, None, name, i, difficulty[i], q, max_steps, for_planner=planner))
    _write_jsonl(root / "results" / "episodes.jsonl", rows)
    diagnostics = []
    for rank, encoder in enumerate(encoders):
        for seed in seeds:
            diagnostics.append(
                {
                    "encoder": encoder, "seed": seed, "probe_r2": QUALITY[encoder], "probe_dims": 64,
                    "probe_split": "heldout", "distance_spearman_per_goal": 0.5, "distance_spearman": 0.4,
                    "skill_by_horizon": [1.2 if encoder == "vae" else 0.8] * 5,
                    "nmse_temporal_by_horizon": [0.5] * 5, "num_tokens": 16, "dim": 128,
                    "bytes_per_frame": 4096 * (rank + 1),
                    "encoder_images_per_s": 682.413 if rank else 42621.3,
                    "val_loss": 0.01, "copy_last_loss": 0.02, "plan_time_per_step_s": 0.25,
                }
            )  # fmt: skip
    _write_jsonl(root / "results" / "diagnostics.jsonl", diagnostics)
    return rows


BASE = "baseline"


def _md_row(md, start):
    line = next(line for line in md.splitlines() if line.startswith(start))
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_with_budget_curves_paired_statistics_and_factors(tmp_path):
    rows = _budget_study(tmp_path)
    written = build_report(tmp_path, n_boot=500)
    assert {"budget_plot", "distance_plot", "success_plot", "skill_plot"} <= set(written)
    md = written["markdown"].read_text()
    _assert_self_contained(written["html"].read_text())
    assert "Budget curves: not available" not in md and "Success AUC" in md

    def mine(encoder, planner):
        return [r for r in rows if r["encoder"] == encoder and r["planner"] == planner]

    # AUC of a cell: the mean over seeds and pairs of 1 - first_reached_step / max_steps (0 if never).
    rv = mine("random_vit", "mpc_cem")
    auc = np.mean([0 if r["first_reached_step"] is None else 1 - r["first_reached_step"] / 100 for r in rv])
    cells = _md_row(md, "| random_vit | 120 (3) |")
    assert cells[2].startswith(f"{auc:.3f} [")
    # Floors and ceilings per planner protocol: cem's table shows the baselines tagged for cem.
    cem_random = [
        r for r in rows if r["encoder"] == BASE and r["planner"] == "random" and r["for_planner"] == "cem"
    ]
    k = sum(r["reached"] for r in cem_random)
    md_cem = md[md.index("Planner cem:") :]
    assert f"({k}/40)" in _md_row(md_cem, "| baseline: random (floor) | 40 (1) |")[3]
    mpc_random = [
        r for r in rows if r["encoder"] == BASE and r["planner"] == "random" and r["for_planner"] == "mpc_cem"
    ]
    assert (
        f"({sum(r['reached'] for r in mpc_random)}/40)"
        in _md_row(md, "| baseline: random (floor) | 40 (1) |")[3]
    )
    # Paired McNemar counts on the shared (seed, pair) cells, recomputed here from the rows.
    a = {(r["seed"], r["pair_seed"]): r["reached"] for r in rv}
    b = {(r["seed"], r["pair_seed"]): r["reached"] for r in mine("random_vit_cls", "mpc_cem")}
    a_only = sum(a[c] and not b[c] for c in a)
    b_only = sum(b[c] and not a[c] for c in a)
    assert b_only == 0 and a_only > 40
    row = _md_row(md, "| mpc_cem | random_vit | random_vit_cls | Success reached |")
    assert row[7] == f"McNemar {a_only}:{b_only}" and row[8] == "<0.001" and row[10] == "120 (3)"
    assert "mpc_cem: random_vit vs random_vit_cls on success auc:" in md  # stated as significant
    # Four factors: one verdict of each kind, and the contrast with an absent encoder skipped.
    factors = md[md.index("## Four factors") : md.index("## Per seed")]
    assert (
        _md_row(factors, "| spatial patch structure | random_vit vs random_vit_cls | mpc_cem |")[-1] == "for"
    )
    assert _md_row(factors, "| architecture prior | random_vit vs pixels | mpc_cem |")[-1] == "against"
    verdict = _md_row(factors, "| reconstructive latent | vae vs random_vit | mpc_cem |")[-1]
    assert verdict.startswith("against (no effect")  # vae behaves exactly as random_vit: equivalence
    assert (
        "pretrained semantics (dinov2_patch vs random_vit): skipped: dinov2_patch not in this study"
        in factors
    )
    # Per-seed table, the copy-last flag, costs apart with consistent number formats.
    assert len([line for line in md.splitlines() if line.startswith("| random_vit | mpc_cem | ")]) == 3
    assert "worse than copy-last at steps 1-5" in _md_row(md, "| vae | 3 | heldout |")[-1]
    assert _md_row(md, "| random_vit | 16 x 128 |")[2:4] == ["4,096", "42,621"]
    assert _md_row(md, "| random_vit_cls | 16 x 128 |")[2:4] == ["8,192", "682"]
    assert "too few encoders to tell (4 with both" in md


def test_rank_correlations_with_eight_encoders_carry_a_permutation_p(tmp_path):
    names = [f"enc{i}" for i in range(8)]
    for i, name in enumerate(names):
        QUALITY[name] = 0.1 + 0.1 * i
    try:
        _budget_study(tmp_path, encoders=names, seeds=(0,), n_pairs=30, one_planner=True)
        md = build_report(tmp_path, n_boot=200)["markdown"].read_text()
    finally:
        for name in names:
            QUALITY.pop(name)
    section = md[md.index("## What predicts success") : md.index("## Costs")]
    # Probe R² is ordered exactly as success: rho = 1, exact permutation p = 2 / 8! < 0.001.
    row = _md_row(section, "| mpc_cem | Probe R² | 8 |")
    assert row[3] == "1.00" and row[4] == "<0.001" and row[6] == "exact"
    assert stats.permutation_spearman(range(8), range(8))["p"] == pytest.approx(2 / 40320)
    assert "Bytes/frame" not in section and "img/s" not in section  # costs are not predictors


def test_success_legend_covers_no_bar():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    full = {"estimate": 1.0, "lo": 1.0, "hi": 1.0}
    summaries = {(e, p): {"reached": full, "final": full} for e in "abcd" for p in ("mpc_cem", "cem")}
    floors = {"cem": {"random": {"reached": {"estimate": 0.1}, "final": {"estimate": 0.1}}}}
    fig = success_figure(list("abcd"), ["mpc_cem", "cem"], summaries, floors)
    FigureCanvasAgg(fig).draw()
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert legends
    bars = [patch.get_window_extent() for ax in fig.axes for patch in ax.patches]
    assert len(bars) == 16
    for legend in legends:
        box = legend.get_window_extent()
        assert not any(box.overlaps(bar) for bar in bars)


def test_columns_share_one_number_format():
    assert format_column([42621.3, 682.413]) == ["42,621", "682"]  # not "42,621" beside "682.413"
    assert format_column([0.987, 0.25, None]) == ["0.987", "0.250", "–"]
    assert format_column([2.84e-6, 2.49e-6]) == ["2.84e-06", "2.49e-06"]
    assert format_column([4096, 8192]) == ["4,096", "8,192"]
    assert format_column([float("nan"), 1.5]) == ["–", "1.50"]


def test_report_with_only_the_required_files(tmp_path):
    _fake_study(tmp_path, optional=False)
    written = build_report(tmp_path, n_boot=200)
    assert set(written) == {"markdown", "html", "success_plot"}
    md = written["markdown"].read_text()
    assert "results/diagnostics.jsonl is missing" in md and "No videos." in md
    assert "| c | 1 | cem |" in md  # the cell with no rows and no recorded failure is listed
    _assert_self_contained(written["html"].read_text())


def test_report_errors_name_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"study\.json"):
        build_report(tmp_path)
    (tmp_path / "study.json").write_text(json.dumps({"env": "point_maze"}))
    with pytest.raises(FileNotFoundError, match=r"episodes\.jsonl"):
        build_report(tmp_path)
    _write_jsonl(tmp_path / "results" / "episodes.jsonl", [{"encoder": "a"}])
    with pytest.raises(ValueError, match=r"episodes\.jsonl:1 lacks keys"):
        build_report(tmp_path)
