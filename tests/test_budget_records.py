"""`wmlab plan` records what budget curves need (issue 13 item 1): per-episode distance traces on the
observation grid, the first step the goal was reached, baselines under each planner's own protocol,
dset pairs from validation episodes only, and the planning precision in the summary and the key."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest
from omegaconf import OmegaConf
from tiny_configs import PLAN_TEST_TRAIN, TINY_PLAN

from wmlab.cli import compose, run
from wmlab.envs import make_env
from wmlab.envs.geodesic import geodesic_distance
from wmlab.envs.point_maze import SUCCESS_RADIUS
from wmlab.evaluate import (
    PlanSettingError,
    dataset_pairs,
    evaluate_policy,
    memory_budget_bytes,
    random_state_pairs,
    validation_episodes,
)
from wmlab.planning.mpc import UNBOUNDED_CAP, Protocol

BUDGET_FIELDS = ("first_reached_step", "dist_trace", "obs_steps", "pair_seed", "max_steps", "final_dist")


class TowardsGoal:
    """A scripted policy: push towards the goal's xy (reads proprio only, as a planner may)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def reset(self, goal_frames, goal_proprio):
        self.goals = np.asarray(goal_proprio)

    def act(self, obs):
        delta = self.goals[obs.episodes, :2] - obs.proprio[:, :2]  # (B, 2)
        return np.repeat(np.clip(3.0 * delta, -1, 1)[:, None], self.steps, axis=1)  # (B, steps, 2)


@pytest.fixture(scope="module")
def env():
    env = make_env("point_maze", img_size=16)
    yield env
    env.close()


def check_row(row: dict) -> None:
    """The invariants the report relies on, for one episode row."""
    assert set(BUDGET_FIELDS) <= set(row), sorted(set(BUDGET_FIELDS) - set(row))
    trace, steps = row["dist_trace"], row["obs_steps"]
    assert len(trace) == len(steps) >= 2 and steps[0] == 0 and steps[-1] == row["steps_used"]
    assert all(b > a for a, b in itertools.pairwise(steps)) and steps[-1] <= row["max_steps"]
    first = row["first_reached_step"]
    assert (first is not None) == row["reached"]
    # Success is the env's xy distance < SUCCESS_RADIUS, and geodesic >= xy: before the first success
    # (after the start) no observation can have a geodesic distance under the radius.
    stop = steps.index(first) if first is not None else len(steps)
    assert all(d >= SUCCESS_RADIUS for d in trace[1:stop]), (first, trace)
    assert row["final_geodesic_dist"] == trace[-1] >= row["final_dist"] - 1e-9  # geodesic >= xy
    assert row["iterations_used"] == row["n_plans"] == len(steps) - 1


def test_rows_carry_geodesic_traces_on_the_observation_grid(env, tmp_path):
    starts, goals, seeds = random_state_pairs(env, 3, 99)
    # + a pair in sight (reached) and one behind the U-maze's wall (geodesic far longer than xy)
    starts = np.concatenate([starts, [[1.0, 1.0, 0, 0], [1.0, 1.0, 0, 0]]])
    goals = np.concatenate([goals, [[1.3, 1.0, 0, 0], [3.0, 1.0, 0, 0]]])
    protocol = Protocol(max_steps=60, n_taken_actions=2, frameskip=5)  # plans of 10 steps
    rows, summary = evaluate_policy(TowardsGoal(10), env, starts, goals, [*seeds, 7, 8], protocol, tmp_path,
                                    n_videos=0)  # fmt: skip
    on_disk = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert on_disk == rows and [r["pair_seed"] for r in rows] == [1, 100, 199, 7, 8]
    for row in rows:
        check_row(row)
        assert row["obs_steps"] == [0, 10, 20, 30, 40, 50, 60] and row["max_steps"] == 60
        assert row["dist_kind"] == "geodesic" and row["for_planner"] is None
    expected = geodesic_distance(env.layout, starts[:, :2], goals[:, :2])
    np.testing.assert_allclose([r["dist_trace"][0] for r in rows], expected)  # the env's own geodesic
    near, behind = rows[3], rows[4]
    assert near["first_reached_step"] == 10 and near["dist_trace"][1] < SUCCESS_RADIUS
    assert np.linalg.norm(goals[4, :2] - starts[4, :2]) == 2.0 and behind["dist_trace"][0] > 3.0
    assert summary["env_step_budget"] == 60 and summary["dist_kind"] == "geodesic"
    assert summary["iterations_used"] == {"mean": 6.0, "min": 6, "max": 6}
    assert summary["mean_final_geodesic_dist"] == pytest.approx(np.mean([r["dist_trace"][-1] for r in rows]))
    assert summary["n_unmeasured_dist"] == 0


def test_a_goal_inside_a_wall_has_no_geodesic_distance_but_the_episode_still_counts(env):
    starts, goals = np.array([[1.0, 1.0, 0, 0]] * 2), np.array([[2.0, 1.0, 0, 0], [1.0, 2.0, 0, 0]])
    rows, summary = evaluate_policy(
        TowardsGoal(5), env, starts, goals, [1, 2], Protocol(10, 1, 5), n_videos=0
    )
    assert all(np.isnan(rows[0]["dist_trace"])) and np.isfinite(rows[1]["dist_trace"]).all()
    assert summary["n_unmeasured_dist"] == 1
    assert summary["mean_final_geodesic_dist"] == pytest.approx(rows[1]["dist_trace"][-1])


def test_unbounded_runs_record_iterations_used_and_stop_the_trace_at_success(env):
    starts = np.array([[1.0, 1.0, 0, 0], [1.0, 1.0, 0, 0]])
    goals = np.array([[1.2, 1.0, 0, 0], [1.0, 3.0, 0, 0]])  # both in sight, the second farther
    unbounded = Protocol(max_steps=None, n_taken_actions=1, frameskip=5)
    rows, summary = evaluate_policy(TowardsGoal(5), env, starts, goals, [1, 2], unbounded, n_videos=0)
    for row in rows:
        check_row(row)
        assert row["unbounded"] and row["max_steps"] == UNBOUNDED_CAP
        assert row["obs_steps"][-1] == row["first_reached_step"] == row["steps_used"]
    assert rows[0]["iterations_used"] < rows[1]["iterations_used"]  # the nearer goal needed fewer plans
    assert summary["iterations_used"]["max"] == rows[1]["iterations_used"]


BASELINE = ["planner=random", "n_evals=3", "img_size=16", "max_steps=50", "progress=false", "n_videos=0"]


def plan_summary(out) -> tuple[dict, list[dict], dict]:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), rows, json.loads((out / "key.json").read_text())


def test_baselines_run_under_the_protocol_of_the_planner_they_are_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the keyed default cell directories land in tmp_path/outputs/plans
    cells = {}
    for target in ("cem", "mpc_cem", None):
        run("plan", *BASELINE, *([f"for_planner={target}"] if target else []))
        (cells[target],) = set((tmp_path / "outputs" / "plans").iterdir()) - set(cells.values())
    (open_loop, rows_ol, key_ol), (mpc, rows_mpc, key_mpc) = (
        plan_summary(cells["cem"]),
        plan_summary(cells["mpc_cem"]),
    )
    # open loop (DINO-WM's Table 8): one plan of goal_H x frameskip = 25 env steps, observed at 0 and 25
    assert open_loop["env_step_budget"] == 25 and open_loop["for_planner"] == "cem"
    assert all(
        r["steps_used"] == 25 and r["obs_steps"] == [0, 25] and r["for_planner"] == "cem" for r in rows_ol
    )
    # MPC: the max_steps budget, observed where an MPC planner re-plans
    assert mpc["env_step_budget"] == 50 and mpc["for_planner"] == "mpc_cem"
    assert all(r["steps_used"] == 50 and r["obs_steps"] == [0, 25, 50] for r in rows_mpc)
    for row in rows_ol + rows_mpc:
        check_row(row)
    assert key_ol["protocol"]["for_planner"] == "cem" and key_ol["protocol"]["env_step_budget"] == 25
    assert key_mpc["protocol"]["for_planner"] == "mpc_cem" and key_mpc["precision"] is None
    assert len(set(cells.values())) == 3 and "random_for_cem__" in cells["cem"].name  # three cells
    assert plan_summary(cells[None])[0]["for_planner"] is None
    # the same pairs under every protocol: comparisons stay paired
    assert [r["pair_seed"] for r in rows_ol] == [r["pair_seed"] for r in rows_mpc] == [1, 100, 199]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            ["planner=mpc_cem", "for_planner=cem"],
            r"for_planner='cem' is for the baselines .* drop for_planner",
        ),
        (
            ["planner=random", "for_planner=cme"],
            r"for_planner='cme' is not a model planner: choose one of cem, ",
        ),
        (["planner=oracle", "for_planner=random"], r"for_planner='random' is not a model planner"),
        (["precision=fp16"], r"precision='fp16' is not valid: choose one of auto, fp32"),
        (["memory_budget=lots"], r"memory_budget='lots' is not valid"),
        (["split_ratio=1.5"], r"split_ratio=1.5 is not valid"),
    ],
)
def test_bad_protocol_settings_are_one_line_errors_before_anything_is_made(tmp_path, setting, message):
    from wmlab.evaluate import plan as plan_verb

    cfg = OmegaConf.to_container(
        compose("plan", [*BASELINE, f"out={tmp_path / 'x'}", *setting]), resolve=True
    )
    with pytest.raises(PlanSettingError, match=message) as err:
        plan_verb(cfg)
    assert len(str(err.value).splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_memory_budget_sizes():
    assert memory_budget_bytes("auto") is None and memory_budget_bytes(None) is None
    assert memory_budget_bytes(4096) == 4096 and memory_budget_bytes("1GiB") == 2**30
    assert memory_budget_bytes("512MB") == 512 * 10**6
    with pytest.raises(PlanSettingError, match="memory_budget=0"):
        memory_budget_bytes(0)


# ------------------------------------------------------------------ dset pairs: validation only
def test_dset_pairs_come_only_from_the_runs_validation_episodes(tiny_store, tmp_path, env):
    from wmlab.data.store import TrajectoryStore
    from wmlab.data.windows import WindowSpec, make_datasets

    data = tmp_path / "tiny.zarr"
    shutil.copytree(tiny_store.path, data)
    store = TrajectoryStore(data)
    val = validation_episodes(data, 0.5, 42)
    _, val_set, _ = make_datasets(store, WindowSpec(num_hist=1, frameskip=2), 0.5, 42)
    assert val.tolist() == sorted(val_set.episodes.tolist()) and len(val) == 3  # training's own split
    _, _, ids = dataset_pairs(env, data, 40, 0, 5, episodes=val)
    assert {i // 100000 for i in ids} <= set(val.tolist())
    _, _, everything = dataset_pairs(env, data, 40, 0, 5)
    assert {i // 100000 for i in everything} - set(val.tolist())  # without the split, training ones too
    with pytest.raises(PlanSettingError, match=r"split_ratio=1\.0 leaves none"):
        validation_episodes(data, 1.0, 42)

    out = tmp_path / "dset"
    run("plan", *BASELINE, "goal_source=dset", f"data={data}", "goal_H=2", "split_ratio=0.5", f"out={out}")
    summary, rows, key = plan_summary(out)
    assert summary["split"]["validation_episode_ids"] == val.tolist()
    assert summary["split"]["source"] == {"split_ratio": "plan setting", "split_seed": "default (DINO-WM's)"}
    assert summary["split"]["split_ratio"] == 0.5 and summary["split"]["episodes"] == "validation"
    assert {r["pair_seed"] // 100000 for r in rows} <= set(val.tolist())
    assert key["protocol"]["split"]["split_seed"] == 42


# ------------------------------------------------------------------ precision in the summary and the key
TINY_TRAIN = [*PLAN_TEST_TRAIN, "split_ratio=0.5"]


@pytest.fixture(scope="module")
def tiny_run(tiny_store, tmp_path_factory):
    from wmlab.train import train

    root = tmp_path_factory.mktemp("budget")
    data = root / "tiny.zarr"
    shutil.copytree(tiny_store.path, data)
    cfg = compose("train", [*TINY_TRAIN, f"data={data}", f"run_dir={root / 'run'}"])
    return train(OmegaConf.to_container(cfg, resolve=True)), data


def plan_run(run_dir, *extra):
    from wmlab.evaluate import plan as plan_verb

    cfg = OmegaConf.to_container(compose("plan", [*TINY_PLAN, f"run_dir={run_dir}", *extra]), resolve=True)
    return (*plan_summary(plan_verb(cfg)), plan_verb)


def test_precision_is_recorded_and_part_of_the_cell_key(tiny_run, tmp_path, monkeypatch, capsys):
    run_dir, _ = tiny_run
    monkeypatch.chdir(tmp_path)
    fp32, rows, key32, _ = plan_run(run_dir, "precision=fp32")
    bf16, _, key16, _ = plan_run(run_dir, "precision=bf16")
    auto, _, key_auto, _ = plan_run(run_dir, "precision=auto", "chunk=3")
    assert "already evaluated" not in capsys.readouterr().out  # a bf16 result is never reused for fp32
    assert key_auto["precision"] == {"requested": "auto"}
    assert len(list((tmp_path / "outputs" / "plans").iterdir())) == 3
    assert key32["precision"] == {"requested": "fp32"} and key16["precision"] == {"requested": "bf16"}
    assert fp32["policy"]["precision"]["chosen"] == "fp32" and bf16["policy"]["precision"]["chosen"] == "bf16"
    evidence = auto["policy"]["precision"]
    assert evidence["requested"] == "auto" and evidence["chosen"] in ("fp32", "bf16")
    assert evidence["reason"] and "fp32" in evidence["timings_s"]  # measured here, with its reason
    # chunk: null = by the memory budget (all 4 candidates of the one episode planned per call here)
    assert fp32["policy"]["chunk"] == "auto" and fp32["policy"]["chunk_used"] == 2 * 4
    assert auto["policy"]["chunk"] == 3 and auto["policy"]["chunk_used"] == 3
    for row in rows:
        check_row(row)
    again, _, _, _ = plan_run(run_dir, "precision=fp32", "chunk=5")  # chunk is not part of the key
    assert "already evaluated" in capsys.readouterr().out and again == fp32


def test_dset_split_follows_the_run_and_refuses_a_contradicting_one(tiny_run, tmp_path):
    run_dir, data = tiny_run
    summary, rows, _, plan_verb = plan_run(run_dir, "goal_source=dset", f"data={data}", "precision=fp32",
                                           f"out={tmp_path / 'a'}")  # fmt: skip
    val = validation_episodes(data, 0.5, 42).tolist()  # the run trained with split_ratio=0.5
    assert summary["split"]["source"] == {"split_ratio": "run", "split_seed": "run"}
    assert summary["split"]["validation_episode_ids"] == val
    assert {r["pair_seed"] // 100000 for r in rows} <= set(val)
    cfg = compose("plan", [*TINY_PLAN, f"run_dir={run_dir}", "goal_source=dset", f"data={data}",
                           "split_ratio=0.9", f"out={tmp_path / 'b'}"])  # fmt: skip
    with pytest.raises(
        PlanSettingError, match=r"split_ratio=0.9 but the run was trained with split_ratio=0.5"
    ):
        plan_verb(OmegaConf.to_container(cfg, resolve=True))
    assert not (tmp_path / "b").exists()  # refused before the cell was made


def test_the_harness_env_renders_the_same_frames_without_rendering_every_step(env):
    from wmlab.evaluate import EpisodeBatch, harness_env

    quiet = harness_env({"name": "point_maze", "img_size": 16})
    assert quiet.visual_obs is False and "visual" not in quiet.step(np.zeros(2))[0]
    starts, goals, _ = random_state_pairs(env, 2, 99)
    actions = np.random.default_rng(0).uniform(-1, 1, size=(7, 2))
    a, b = EpisodeBatch(env, starts, goals), EpisodeBatch(quiet, starts, goals)
    for batch in (a, b):
        batch.step(1, actions)
    for i in range(2):  # what the policy sees is the same frame either way
        np.testing.assert_array_equal(a.frames[i], b.frames[i])
    quiet.close()
