"""`wmlab study` smoke test: two tiny encoders end to end, a failing cell, resuming without re-running."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from omegaconf import OmegaConf

from wmlab.cli import compose
from wmlab.study import run_study

TINY_TRAIN = [
    "predictor.depth=1", "predictor.heads=2", "predictor.dim_head=8",
    "predictor.mlp_dim=32", "frameskip=2", "num_hist=2", "training.epochs=1", "training.batch_size=8",
    "training.max_steps_per_epoch=3", "training.val_batches=1", "training.rollout_eval_steps=2",
]  # fmt: skip
TINY_PLAN = [
    "n_evals=3", "goal_H=2", "max_steps=8", "planner.samples=6", "planner.topk=2", "planner.opt_steps=2",
    "n_videos=1",
]  # fmt: skip


def study_cfg(store, study_dir, **settings) -> dict:
    """The resolved study config (lists of overrides set in Python: Hydra's grammar would need quoting)."""
    overrides = [f"data={store.path}", f"study_dir={study_dir}", "img_size=32", "collect.n_episodes=6",
                 "seeds=[0]", "planners=[mpc_cem]", "device=cpu", "progress=false"]  # fmt: skip
    cfg = OmegaConf.to_container(compose("study", overrides), resolve=True)
    cfg.update(
        encoders=["pixels", "pixels_big", "dino_tok"],
        encoder_names={"pixels_big": "pixels"},
        encoder_overrides={
            "pixels": ["encoder.input_size=32", "encoder.patch_size=16"],
            "pixels_big": ["encoder.input_size=32", "encoder.patch_size=8"],
        },
        baselines=["random"],
        train=TINY_TRAIN,
        plan=TINY_PLAN,
        diagnostics={"n_frames": 60, "n_pairs": 30, "horizons": 2, "n_windows": 4},
        # dino_tok must fail for want of DINOv2 weights even on a machine that could download them
        # (it would train a full-size tokenizer there): point it at a folder that does not exist.
        tokenizer={**cfg["tokenizer"], "dinov2_weights": "/nonexistent/wmlab-tests/no-dinov2-weights"},
    )
    cfg.update(settings)
    return cfg


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def study_store(tiny_store, tmp_path_factory):
    """A private copy of the tiny dataset: a study writes feature caches beside its dataset."""
    from wmlab.data.store import TrajectoryStore

    copy = tmp_path_factory.mktemp("study_data") / "tiny.zarr"
    shutil.copytree(tiny_store.path, copy)
    return TrajectoryStore(copy)


@pytest.fixture(scope="module")
def finished_study(study_store, tmp_path_factory):
    study_dir = tmp_path_factory.mktemp("study")
    return run_study(study_cfg(study_store, study_dir))


def test_study_writes_long_results_failures_and_report(finished_study):
    results = finished_study / "results"
    episodes = read_jsonl(results / "episodes.jsonl")
    cells = {(r["encoder"], r["seed"], r["planner"]) for r in episodes}
    assert cells == {("pixels", 0, "mpc_cem"), ("pixels_big", 0, "mpc_cem"), ("baseline", None, "random")}
    assert len(episodes) == 9
    assert {r["start_seed"] for r in episodes} == {1, 100, 199}  # the same pairs for every cell
    diagnostics = {r["encoder"]: r for r in read_jsonl(results / "diagnostics.jsonl")}
    assert set(diagnostics) == {"pixels", "pixels_big"}
    assert diagnostics["pixels"]["num_tokens"] == 4 and diagnostics["pixels_big"]["num_tokens"] == 16
    assert (
        diagnostics["pixels"]["val_loss"] is not None and diagnostics["pixels"]["copy_last_loss"] is not None
    )
    failures = read_jsonl(results / "failures.jsonl")
    assert [f["encoder"] for f in failures] == ["dino_tok"]  # no weights: reported, the rest went on
    assert "weights" in failures[0]["error"]
    study = json.loads((finished_study / "study.json").read_text())
    assert study["protocol"]["max_steps"] == 8 and any(k.startswith("train:") for k in study["stage_seconds"])
    html = (finished_study / "report" / "report.html").read_text()
    assert "pixels_big" in html and "dino_tok" in html
    assert list((finished_study / "videos").glob("pixels__seed0__mpc_cem/*.gif"))


def test_the_report_shows_episodes_planning_training_and_provenance(finished_study):
    """What a reader needs beyond the tables, from the results files: each pair's trajectory on the
    maze for every encoder, planning cost per optimiser iteration, training curves, labelled GIFs,
    the versions and the full resolved config."""
    import imageio.v3 as iio

    from wmlab.report.study_report import build_report

    episodes = read_jsonl(finished_study / "results" / "episodes.jsonl")
    for r in episodes:
        assert len(r["xy_trace"]) == r["steps_used"] + 1 and len(r["goal_xy"]) == 2  # every env step
        start, end, goal = (np.asarray(v, float) for v in (r["xy_trace"][0], r["xy_trace"][-1], r["goal_xy"]))
        assert np.linalg.norm(end - goal) == pytest.approx(r["final_dist"], abs=1e-3)  # the path ends there
        assert np.linalg.norm(start - goal) <= r["dist_trace"][0] + 1e-3  # geodesic >= straight line
        # the planner's cost after each CEM iteration (opt_steps=2) is non-increasing; baselines have none
        if r["encoder"] == "baseline":
            assert r["plan_cost_trace"] is None
        else:
            assert len(r["plan_cost_trace"]) == 2 and r["plan_cost_trace"][1] <= r["plan_cost_trace"][0]
    diagnostics = read_jsonl(finished_study / "results" / "diagnostics.jsonl")
    assert all([h["epoch"] for h in d["loss_history"]] == [1] for d in diagnostics)
    study = json.loads((finished_study / "study.json").read_text())
    assert study["config"]["encoders"] == ["pixels", "pixels_big", "dino_tok"]
    assert {"wmlab", "torch", "python", "mujoco"} <= set(study["versions"])

    written = build_report(finished_study, n_boot=200)  # from the results files alone
    for name in ("trajectory_plot", "plan_cost_plot", "training_plot"):
        image = iio.imread(written[name])
        assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 5, name  # drawn, not blank
    md = written["markdown"].read_text()
    assert "trajectories.png" in md and "plan_cost.png" in md and "training_curves.png" in md
    assert "Versions and full configuration" in md and study["versions"]["torch"] in md
    assert "No imagined/ pictures: no run of this study has a decoder" in md  # raw pixels have none
    summary = json.loads(
        next((finished_study / "cells").glob("pixels__seed0__mpc_cem*/summary.json")).read_text()
    )
    assert summary["imagined"] == [] and "decoder" in summary["imagined_note"]
    gif = iio.imread(next((finished_study / "videos").glob("pixels__seed0__mpc_cem/*.gif")), index=0)
    assert gif.shape[0] == 128 + 28 and gif.shape[1] == 2 * 128  # 32 px frames enlarged, label strip on top
    strip = gif[:28]
    assert (strip < 100).any() and (strip > 200).mean() > 0.5  # black text on white


def test_rerunning_a_study_skips_finished_cells(finished_study, study_store):
    summaries = sorted((finished_study / "cells").glob("*/summary.json"))
    stamps = {p: p.stat().st_mtime_ns for p in summaries}
    weights = {p: p.stat().st_mtime_ns for p in (finished_study / "runs").glob("*/model.safetensors")}
    # An "interrupted" study: one evaluation's result is gone; only that cell runs again.
    (lost,) = (finished_study / "cells").glob("pixels__seed0__mpc_cem__*")  # <label>__<key hash>
    (lost / "summary.json").unlink()
    run_study(study_cfg(study_store, finished_study))
    assert (lost / "summary.json").is_file()
    for path, stamp in stamps.items():
        if path.parent != lost:
            assert path.stat().st_mtime_ns == stamp, f"{path} was recomputed"
    for path, stamp in weights.items():
        assert path.stat().st_mtime_ns == stamp, f"{path} was retrained"
    assert len(read_jsonl(finished_study / "results" / "episodes.jsonl")) == 9


def test_one_cell_at_a_time_then_merge(study_store, tmp_path):
    cfg = study_cfg(study_store, tmp_path, encoders=["pixels"], baselines=[])
    run_study({**cfg, "cell": "pixels__seed0"})
    assert [p.parent.name.split("__")[:3] for p in (tmp_path / "cells").glob("*/summary.json")] == [
        ["pixels", "seed0", "mpc_cem"]
    ]
    assert not (tmp_path / "report").exists()  # a cell job does not merge
    run_study(cfg)
    assert len(read_jsonl(tmp_path / "results" / "episodes.jsonl")) == 3


def test_a_finished_cell_of_other_settings_is_not_reused(finished_study, study_store):
    """Regression (issue 12 item 7): a cell was reused by its name alone, so a study re-run with another
    protocol (here max_steps) merged the old cells' results as if they were the new ones."""
    before = {p.parent.name for p in (finished_study / "cells").glob("*/summary.json")}
    plan = [o if not o.startswith("max_steps=") else "max_steps=6" for o in TINY_PLAN]
    run_study(study_cfg(study_store, finished_study, plan=plan, encoders=["pixels"], baselines=[]))
    episodes = read_jsonl(finished_study / "results" / "episodes.jsonl")
    assert len(episodes) == 3 and {r["max_steps"] for r in episodes} == {6}
    after = {p.parent.name for p in (finished_study / "cells").glob("*/summary.json")}
    (new,) = after - before  # a new key, a new cell; the old ones are left alone
    assert before < after and new.startswith("pixels__seed0__mpc_cem__")
    key = json.loads((finished_study / "cells" / new / "study_cell.json").read_text())
    assert key["plan"]["max_steps"] == 6 and key["run"]["weights_sha256"]


def test_a_cell_being_computed_by_another_job_is_skipped_with_who_holds_it(study_store, tmp_path):
    """Regression (issue 12 item 7): two cell jobs of one study both trained and planned the same cell."""
    import subprocess
    import sys

    cfg = study_cfg(study_store, tmp_path, encoders=["pixels"], baselines=[])
    target = tmp_path / "cells" / "pixels__seed0"  # Study.unit_target("pixels", 0)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from wmlab.integrity import WriterLock; "
         f"WriterLock({str(target)!r}, 'study cell').acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        run_study({**cfg, "cell": "pixels__seed0"})
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "runs" / "pixels__seed0").exists()  # nothing trained twice
    log = (tmp_path / "logs" / "failures.log").read_text()
    assert '"stage": "busy"' in log and f"being written by pid {holder.pid}" in log
