"""Cached results keyed by everything they depend on (issue 12 items 1, 2, 7, 8): plan cells, DINO-WM
imports and study.json updates. Each test here failed on the code before keys were introduced."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from tests_paths import FIXTURES
from tiny_configs import PLAN_TEST_TRAIN, TINY_PLAN

from wmlab.cli import compose
from wmlab.integrity import KeyMismatch, LockHeld

DINO_WM_RUN = FIXTURES / "dino_wm" / "outputs" / "tiny_point_maze_a"
needs_dino_wm = pytest.mark.skipif(
    not DINO_WM_RUN.is_dir(), reason=f"DINO-WM fixture not found at {DINO_WM_RUN}"
)

TINY_TRAIN = PLAN_TEST_TRAIN


@pytest.fixture(scope="module")
def two_runs(tiny_store, tmp_path_factory):
    """Two tiny world models of one config that differ only in their training seed (other weights)."""
    from wmlab.data.store import TrajectoryStore
    from wmlab.train import train

    root = tmp_path_factory.mktemp("keys")
    data = root / "tiny.zarr"
    shutil.copytree(tiny_store.path, data)
    store = TrajectoryStore(data)
    runs = {}
    for name, seed in (("A", 0), ("B", 1)):
        overrides = [
            *TINY_TRAIN,
            f"data={store.path}",
            f"run_dir={root / 'runs' / name}",
            f"training.seed={seed}",
        ]
        runs[name] = train(OmegaConf.to_container(compose("train", overrides), resolve=True))
    return runs


def plan(run_dir, *extra) -> dict:
    """`wmlab plan` as a user runs it; returns the summary it wrote."""
    from wmlab.evaluate import plan as plan_verb

    cfg = OmegaConf.to_container(compose("plan", [*TINY_PLAN, f"run_dir={run_dir}", *extra]), resolve=True)
    out = plan_verb(cfg)
    return {**json.loads((out / "summary.json").read_text()), "out": out}


# ------------------------------------------------------------------ item 1: plan cells
def test_plan_results_are_not_reused_for_another_model(two_runs, tmp_path, monkeypatch, capsys):
    """Regression: the default out dir named only planner/goal_source/H/N/seed, so planning model B after
    model A printed "already evaluated" and returned A's numbers."""
    monkeypatch.chdir(tmp_path)
    a = plan(two_runs["A"])
    b = plan(two_runs["B"])
    assert "already evaluated" not in capsys.readouterr().out
    assert a["out"] != b["out"] and b["run_dir"] == str(two_runs["B"])
    assert a["out"].resolve().parent == b["out"].resolve().parent == tmp_path / "outputs" / "plans"
    key_a = json.loads((a["out"] / "key.json").read_text())
    key_b = json.loads((b["out"] / "key.json").read_text())
    assert key_a["run"]["weights_sha256"] != key_b["run"]["weights_sha256"]
    assert key_a["protocol"]["max_steps"] == 4 and key_a["planner"]["samples"] == 4

    again = plan(two_runs["A"])  # exactly the same key: reused
    assert again["out"] == a["out"] and "already evaluated" in capsys.readouterr().out
    longer = plan(two_runs["A"], "max_steps=6")  # another budget: its own cell
    assert longer["out"] != a["out"] and longer["protocol"]["max_steps"] == 6
    other_planner = plan(two_runs["A"], "planner.samples=5")
    assert other_planner["out"] not in (a["out"], longer["out"])
    assert "already evaluated" not in capsys.readouterr().out


def test_an_explicit_out_of_another_key_is_refused_with_the_differences(two_runs, tmp_path):
    out = tmp_path / "cell"
    plan(two_runs["A"], f"out={out}")
    with pytest.raises(KeyMismatch, match=r"(?s)made from other inputs.*run\.weights_sha256") as err:
        plan(two_runs["B"], f"out={out}")
    assert str(out) in str(err.value).splitlines()[0]  # the first line names the directory
    assert json.loads((out / "summary.json").read_text())["run_dir"] == str(two_runs["A"])  # untouched
    replaced = plan(two_runs["B"], f"out={out}", "overwrite=true")
    assert replaced["run_dir"] == str(two_runs["B"])
    assert json.loads((out / "key.json").read_text())["run"]["weights_sha256"] != ""


def test_a_half_finished_cell_resumes_only_under_its_key(two_runs, tmp_path):
    out = tmp_path / "cell"
    plan(two_runs["A"], f"out={out}")
    (out / "summary.json").unlink()  # as a kill before the finish marker leaves it
    with pytest.raises(KeyMismatch, match="weights_sha256"):
        plan(two_runs["B"], f"out={out}")
    assert plan(two_runs["A"], f"out={out}")["run_dir"] == str(two_runs["A"])


# Baselines need no model: the quick cases below use the random policy.
BASELINE = ["planner=random", "n_evals=2", "max_steps=4", "n_videos=0", "progress=false", "img_size=16"]


def baseline_cfg(*extra) -> dict:
    return OmegaConf.to_container(compose("plan", [*BASELINE, *extra]), resolve=True)


def test_results_without_a_key_are_not_trusted(tmp_path):
    """Regression: any summary.json in the out dir was taken as "already evaluated"."""
    from wmlab.evaluate import plan as plan_verb

    out = tmp_path / "old"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"n_episodes": 50}))
    (out / "results.jsonl").write_text("")
    with pytest.raises(KeyMismatch, match=r"no key\.json"):
        plan_verb(baseline_cfg(f"out={out}"))
    plan_verb(baseline_cfg(f"out={out}", "overwrite=true"))
    assert json.loads((out / "summary.json").read_text())["n_episodes"] == 2


def test_a_cell_being_computed_by_another_process_is_refused_with_who(tmp_path):
    from wmlab.evaluate import plan as plan_verb

    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from wmlab.integrity import WriterLock; "
         f"WriterLock({str(out)!r}, 'plan cell').acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=rf"plan cell {out} is being written by pid {holder.pid}"):
            plan_verb(baseline_cfg(f"out={out}"))
        assert not (out / "key.json").exists()
    finally:
        holder.kill()
        holder.wait()
    plan_verb(baseline_cfg(f"out={out}"))  # the holder died: its lock is stale and taken over
    assert (out / "summary.json").is_file()


# ------------------------------------------------------------------ item 8: plan values
@pytest.mark.parametrize(
    "setting",
    ["n_evals=0", "n_evals=-3", "goal_H=0", "max_steps=-1", "max_steps=0", "max_iter=0", "seed=-1",
     "n_videos=-1", "planner=mpc_cem planner.n_taken_actions=0", "chunk=0"],
)  # fmt: skip
def test_out_of_range_plan_values_are_refused_before_anything_is_created(tmp_path, setting):
    """Regression: n_evals=0 failed with "need at least one array to stack", goal_H=0 with a message
    about n_taken_actions; now each is refused naming its key, and nothing is written."""
    from wmlab.evaluate import PlanSettingError
    from wmlab.evaluate import plan as plan_verb

    key = setting.split()[-1].split("=")[0]
    out = tmp_path / "never"
    with pytest.raises(PlanSettingError, match=rf"{key}=.* is not valid"):
        plan_verb(baseline_cfg(f"out={out}", *setting.split()))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_plan_values_error_through_the_cli_is_one_line(tmp_path, capsys):
    from wmlab.cli import main

    assert main(["plan", *BASELINE, "n_evals=0", f"out={tmp_path / 'x'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert "n_evals=0 is not valid" in err.splitlines()[-1] and "Traceback" not in err


# ------------------------------------------------------------------ item 2: DINO-WM imports
def dino_wm_copy(dst):
    from test_dino_wm_checkpoint import writable_copy

    return writable_copy(DINO_WM_RUN, dst)


def retrain(source, value: float) -> None:
    """A "retrained" model_latest.pth: one weight (the position embedding's first value) changed."""
    from test_dino_wm_checkpoint import set_first_float

    set_first_float(source / "checkpoints" / "model_latest.pth", "data/0", value)


def first_weight(run_dir) -> float:
    from safetensors.torch import load_file

    return float(load_file(str(run_dir / "model.safetensors"))["predictor.pos_embedding"].flatten()[0])


@needs_dino_wm
def test_two_dino_wm_runs_with_the_same_folder_name_get_their_own_imports(tmp_path, monkeypatch):
    """Regression: both resolved to outputs/imported/run, the first import."""
    from wmlab.evaluate import resolve_run

    monkeypatch.chdir(tmp_path)
    a, b = dino_wm_copy(tmp_path / "a" / "run"), dino_wm_copy(tmp_path / "b" / "run")
    retrain(b, 0.5)
    imported_a, imported_b = resolve_run(a), resolve_run(b)
    assert imported_a != imported_b
    assert imported_a.resolve().parent == imported_b.resolve().parent == tmp_path / "outputs" / "imported"
    assert imported_a.name.startswith("run__") and imported_b.name.startswith("run__")
    assert first_weight(imported_b) == 0.5 != first_weight(imported_a)
    sources = [json.loads((d / "key.json").read_text())["source"] for d in (imported_a, imported_b)]
    assert sources == [str(a.resolve()), str(b.resolve())]


@needs_dino_wm
def test_a_retrained_checkpoint_makes_a_new_import(tmp_path, monkeypatch):
    """Regression: a retrained model_latest.pth was ignored (the old import was reused by name)."""
    from wmlab.evaluate import resolve_run

    monkeypatch.chdir(tmp_path)
    source = dino_wm_copy(tmp_path / "run")
    first = resolve_run(source)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert (
        resolve_run(source) == first and (first / "model.safetensors").stat().st_mtime_ns == stamp
    )  # reused
    retrain(source, 0.25)
    second = resolve_run(source)
    assert second != first and first_weight(second) == 0.25
    assert not list(second.parent.glob(".*.partial"))  # built aside, renamed into place


@needs_dino_wm
def test_an_explicit_import_dir_of_another_checkpoint_is_refused(tmp_path):
    from wmlab.models.dino_wm_checkpoint import import_dino_wm

    a, b = dino_wm_copy(tmp_path / "a" / "run"), dino_wm_copy(tmp_path / "b" / "run")
    retrain(b, 0.5)
    out = tmp_path / "imported"
    assert import_dino_wm(a, out) == out
    with pytest.raises(KeyMismatch, match=r"(?s)checkpoint_sha256.*source"):
        import_dino_wm(b, out)
    assert first_weight(out) != 0.5


@needs_dino_wm
def test_an_invalid_run_config_is_named_when_planning(tmp_path):
    """Regression: a broken config.yaml surfaced as yaml's ParserError naming `<unicode string>`."""
    from wmlab.evaluate import plan as plan_verb
    from wmlab.integrity import UserError
    from wmlab.models.dino_wm_checkpoint import import_dino_wm

    out = import_dino_wm(DINO_WM_RUN, tmp_path / "imported")
    (out / "config.yaml").write_text("encoder: {name: [dinov2\n")
    with pytest.raises(UserError, match=r"config\.yaml is not valid YAML") as err:
        plan_verb(baseline_cfg(f"run_dir={out}", f"out={tmp_path / 'plan'}"))
    assert "<unicode string>" not in str(err.value)


@needs_dino_wm
def test_a_plan_whose_model_cannot_load_leaves_no_cell_behind(tmp_path):
    """A settings mistake found while loading the model (here: an imported DINO-WM run without data=
    for its normalisation) writes no key.json, so the corrected command is not refused as "another key"."""
    from wmlab.evaluate import plan as plan_verb
    from wmlab.models.dino_wm_checkpoint import import_dino_wm

    run_dir = import_dino_wm(DINO_WM_RUN, tmp_path / "imported")
    out = tmp_path / "plan"
    cfg = OmegaConf.to_container(
        compose("plan", [*TINY_PLAN, f"run_dir={run_dir}", f"out={out}"]), resolve=True
    )
    with pytest.raises(ValueError, match="normalisation"):
        plan_verb(cfg)
    assert not (out / "key.json").exists() and not (out / "summary.json").exists()


# ------------------------------------------------------------------ item 7: study.json updates
def _bump_stage(cfg: dict, stage: str, times: int) -> None:
    from wmlab.study import Study

    study = Study(cfg)
    for _ in range(times):
        study.timed(stage, lambda: None)


def test_concurrent_cell_jobs_never_lose_a_study_json_update(tmp_path):
    """Regression: each cell job kept study.json in memory and wrote it whole, so concurrent jobs lost
    each other's stage times. Now each update is a locked read-modify-write."""
    cfg = OmegaConf.to_container(compose("study", [f"study_dir={tmp_path}", "device=cpu"]), resolve=True)
    ctx = multiprocessing.get_context("fork")
    jobs = [ctx.Process(target=_bump_stage, args=(cfg, f"plan:{e}", 15)) for e in ("a", "b", "c")]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(60)
        assert job.exitcode == 0
    info = json.loads((tmp_path / "study.json").read_text())
    assert set(info["stage_seconds"]) == {"plan:a", "plan:b", "plan:c"}
    assert info["stage_runs"] == {"plan:a": 15, "plan:b": 15, "plan:c": 15}
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*.lock"))
