"""End-to-end smoke tests of the World Models pipeline through ``worldmodels_main`` (the CLI hook).

``dodge`` needs no optional package, so the whole pipeline (collect, V, M, C in the dream and in the real env
with spawn workers, evaluate, iterate, report) runs in CI; ``take_cover`` runs when ViZDoom is installed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from wmlab.worldmodels.cli import compose, worldmodels_main

# Smaller than preset=tiny: seconds, not minutes
SMOKE = [
    "preset=tiny",
    "progress=false",
    "workers=1",
    "collect.n_episodes=3",
    "collect.max_steps=30",
    "vae.z_dim=4",
    "vae.channels=[4,8,8,8]",
    "vae.steps=3",
    "vae.batch_size=8",
    "rnn.hidden=8",
    "rnn.seq_len=10",
    "rnn.batch_size=4",
    "rnn.steps=3",
    "controller.popsize=4",
    "controller.rollouts=1",
    "controller.generations=2",
    "controller.eval_rollouts=2",
    "controller.max_steps=30",
    "evaluate.n_trials=2",
    "evaluate.temperatures=[1.0]",
    "evaluate.dream_trials=2",
    "iterate.iterations=1",
    "iterate.n_episodes=2",
    "iterate.generations=1",
    "report.gif_steps=5",
    "report.n_recon=2",
]
STAGES = ["collect", "train-vae", "train-rnn", "train-controller", "evaluate", "iterate", "report"]


def _run_pipeline(root, env: str, extra=()) -> None:
    overrides = [f"wm_env={env}", f"root={root}", *SMOKE, *extra]
    for stage in STAGES:
        worldmodels_main(stage, overrides)
    assert (root / "vae" / "vae.safetensors").is_file() and (root / "rnn" / "rnn.safetensors").is_file()
    assert (root / "controller_dream_t1.15" / "controller.safetensors").is_file()
    rows = [json.loads(line) for line in (root / "iterate" / "results.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(r["real_mean"] > 0 and r["dream_mean"] > 0 for r in rows)
    evals = [json.loads(line) for line in (root / "eval.jsonl").read_text().splitlines()]
    assert evals[0]["real"]["n"] == 2 and set(evals[0]["dream"]) == {"1.0"}
    report = (root / "report" / "report.md").read_text()
    assert "| controller_dream_t1.15 | dream | 1.15 |" in report and "## Iterative training" in report
    for figure in ("vae_recon.png", "dream.gif", "cmaes.png"):
        assert (root / "report" / figure).stat().st_size > 0, figure


@pytest.fixture(scope="module")
def dodge_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("wm") / "dodge"
    _run_pipeline(root, "dodge")
    return root


def test_dodge_pipeline_end_to_end(dodge_root):
    # re-running a finished stage resumes into a no-op and changes nothing
    before = (dodge_root / "controller_dream_t1.15" / "cmaes.safetensors").read_bytes()
    worldmodels_main("train-controller", ["wm_env=dodge", f"root={dodge_root}", *SMOKE])
    assert (dodge_root / "controller_dream_t1.15" / "cmaes.safetensors").read_bytes() == before


def test_run_compares_with_baselines_and_tau_sweep_writes_table_2(dodge_root, capsys):
    """``run`` resumes every stage, scores C against the labelled random baselines on the same seeds with
    tests; ``tau-sweep`` trains one C per temperature; the HTML report is one self-contained file."""
    overrides = ["wm_env=dodge", f"root={dodge_root}", *SMOKE, "evaluate.n_trials=4"]
    worldmodels_main("run", overrides)
    printed = capsys.readouterr().out
    assert "random_uniform" in printed and "Mann-Whitney U p=" in printed
    record = [json.loads(line) for line in (dodge_root / "eval.jsonl").read_text().splitlines()][-1]
    assert set(record["baselines"]) == {"random_uniform", "random_hold", "still"}
    for name, b in record["baselines"].items():
        assert b["n"] == 4 and len(b["returns"]) == 4 and b["label"]
        assert b["std"] == pytest.approx(float(np.std(b["returns"])))  # over episodes
        assert 0 <= record["tests"][name]["mann_whitney_p"] <= 1
    worldmodels_main("tau-sweep", [*overrides, "sweep.temperatures=[0.5,1.3]"])
    rows = [json.loads(line) for line in (dodge_root / "tau_sweep.jsonl").read_text().splitlines()]
    assert [r["temperature"] for r in rows] == [0.5, 1.3]
    assert (dodge_root / "controller_dream_t0.5" / "controller.safetensors").is_file()
    worldmodels_main("report", overrides)
    page = (dodge_root / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and "data:image/gif;base64," in page
    assert "virtual score (dream)" in page and "Mann-Whitney" in page and "random_hold" in page


def test_real_env_cmaes_with_spawn_workers(dodge_root, tmp_path):
    """C trained in the real env (CarRacing's mode) by 2 spawn rollout workers, on dodge's V and M."""
    from wmlab.worldmodels.cmaes import train_controller

    out = train_controller(
        tmp_path / "real",
        vae=dodge_root / "vae",
        rnn=dodge_root / "rnn",
        wm_env="dodge",
        dream=False,
        popsize=2,
        rollouts=1,
        generations=1,
        eval_rollouts=1,
        max_steps=20,
        workers=2,
        progress=False,
    )
    meta = json.loads((out / "controller.json").read_text())
    assert meta["generation"] == 1 and meta["settings"]["dream"] is False
    assert 0 < meta["history"][0]["return_mean"] <= 20


def test_cli_errors_list_valid_choices():
    with pytest.raises(ValueError, match="Did you mean 'train-vae'"):
        worldmodels_main("train-vea", [])
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="take_cover"):
        compose(["wm_env=doom"])
    full = compose(["wm_env=take_cover"])
    assert (full["vae"]["z_dim"], full["rnn"]["hidden"], full["controller"]["popsize"]) == (64, 512, 64)
    assert compose(["wm_env=car_racing"])["controller"]["generations"] == 1800


def test_take_cover_pipeline_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("vizdoom", reason="ViZDoom is an optional extra: pip install 'wmlab[worldmodels]'")
    monkeypatch.chdir(tmp_path)  # ViZDoom writes _vizdoom.ini into the working directory
    _run_pipeline(tmp_path / "take_cover", "take_cover", extra=["collect.min_len=5"])
