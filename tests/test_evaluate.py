"""Closed-loop evaluation: the MPC harness, the budget, both success measures, baselines, `wmlab plan`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wmlab.cli import run
from wmlab.envs import make_env
from wmlab.evaluate import EpisodeBatch, evaluate_policy, protocol_from, random_state_pairs
from wmlab.planning.mpc import UNBOUNDED_CAP, Protocol, run_mpc, shift_plan


class TowardsGoal:
    """A scripted policy: push towards the goal's xy (reads proprio only, like a planner may)."""

    def __init__(self, steps: int, gain: float = 3.0) -> None:
        self.steps, self.gain, self.calls = steps, gain, 0

    def reset(self, goal_frames, goal_proprio):
        self.goals = np.asarray(goal_proprio)

    def act(self, obs):
        self.calls += 1
        delta = self.goals[obs.episodes, :2] - obs.proprio[:, :2]  # (B, 2)
        return np.repeat(np.clip(self.gain * delta, -1, 1)[:, None], self.steps, axis=1)


class Still:
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def reset(self, goal_frames, goal_proprio):
        pass

    def act(self, obs):
        return np.zeros((len(obs.episodes), self.steps, 2))


@pytest.fixture(scope="module")
def env():
    env = make_env("point_maze", img_size=16)
    yield env
    env.close()


def test_protocol_budget_arithmetic():
    p = Protocol(max_steps=100, n_taken_actions=5, frameskip=5)
    assert (p.steps_per_plan, p.max_plans, p.bounded) == (25, 4, True)
    assert Protocol(max_steps=60, n_taken_actions=1, frameskip=5).max_plans == 12
    assert Protocol(max_steps=None).max_plans == UNBOUNDED_CAP // 25
    with pytest.raises(ValueError, match="max_steps"):
        Protocol(max_steps=0)
    base = {"goal_H": 5, "max_steps": 100, "max_iter": "auto"}
    assert protocol_from({**base, "planner": {"name": "mpc_cem"}}, 5).max_steps == 100
    assert protocol_from({**base, "planner": {"name": "mpc_cem"}, "max_iter": 2}, 5).max_steps == 50
    assert protocol_from({**base, "planner": {"name": "mpc_cem"}, "max_iter": None}, 5).max_steps is None
    open_loop = protocol_from({**base, "planner": {"name": "cem"}}, 5)
    assert (open_loop.max_steps, open_loop.max_plans) == (25, 1)


def test_shift_plan_drops_executed_steps_and_pads_with_the_mean():
    plan = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    shifted = shift_plan(plan, 2)
    assert torch.equal(shifted[:, :3], plan[:, 2:]) and torch.equal(shifted[:, 3:], torch.zeros(2, 2, 3))
    assert torch.equal(shift_plan(plan, 5), torch.zeros_like(plan))


def test_episode_batch_steps_each_episode_as_a_lone_env_would(env):
    starts, goals, _ = random_state_pairs(env, 3, 99)
    batch = EpisodeBatch(env, starts, goals, record=[1])
    actions = np.random.default_rng(0).uniform(-1, 1, size=(3, 2, 7, 2))
    for chunk in range(2):
        for i in (2, 0, 1):  # interleaved on purpose
            batch.step(i, actions[i, chunk])
    lone = make_env("point_maze", img_size=16)
    for i in range(3):
        lone.reset(options={"state": starts[i]})
        for a in actions[i].reshape(-1, 2):
            lone.step(a)
        np.testing.assert_array_equal(batch.state(i), lone.state)
        np.testing.assert_array_equal(batch.frames[i], lone.render())
    lone.close()
    assert len(batch.videos[1]) == 1 + 14 and 0 not in batch.videos


def test_reached_and_final_are_measured_separately(env):
    starts = np.array([[1.0, 1.0, 0, 0], [1.0, 1.0, 0, 0]])
    goals = np.array([[1.2, 1.0, 0, 0], [3.0, 1.0, 0, 0]])  # a straight line / the other end of the U
    batch = EpisodeBatch(env, starts, goals)
    out = run_mpc(TowardsGoal(10), batch, Protocol(max_steps=60, n_taken_actions=2, frameskip=5))
    assert out[0].reached and out[0].reached_step == 10 and out[0].final and out[0].final_dist < 0.5
    assert not out[1].reached and not out[1].final and out[1].final_dist > 1.0  # stuck behind the wall
    assert [o.steps_used for o in out] == [60, 60]  # bounded: everyone uses the whole budget
    assert len(out[0].plan_seconds) == 6


def test_unbounded_loop_stops_each_episode_at_success(env):
    starts = np.array([[1.0, 1.0, 0, 0], [1.0, 1.1, 0, 0]])
    goals = np.array([[1.4, 1.0, 0, 0], [1.0, 1.1, 0, 0]])  # the second starts at its goal
    batch = EpisodeBatch(env, starts, goals)
    policy = TowardsGoal(5)
    out = run_mpc(policy, batch, Protocol(max_steps=None, n_taken_actions=1, frameskip=5))
    assert out[0].reached and out[1].reached and out[1].steps_used == 5 and out[0].steps_used < 60
    assert policy.calls == max(o.steps_used for o in out) // 5


def test_bad_policy_output_is_a_clear_error(env):
    class Broken(Still):
        def act(self, obs):
            return np.full((len(obs.episodes), self.steps, 2), np.nan)

    batch = EpisodeBatch(env, np.array([[1.0, 1.0, 0, 0]]), np.array([[2.0, 1.0, 0, 0]]))
    with pytest.raises(ValueError, match=r"Broken\.act returned actions"):
        run_mpc(Broken(5), batch, Protocol(max_steps=10, n_taken_actions=1, frameskip=5))


def test_evaluate_policy_writes_rows_summary_and_videos(env, tmp_path):
    starts, goals, seeds = random_state_pairs(env, 4, 99)
    assert seeds == [1, 100, 199, 298]  # DINO-WM's per-episode seeds
    rows, _ = evaluate_policy(
        Still(25), env, starts, goals, seeds, Protocol(max_steps=50), tmp_path, n_videos=2
    )
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0]) == rows[0]
    assert {"start_seed", "reached", "final", "final_dist", "steps_used", "plan_time_s", "n_plans"} <= set(
        rows[0]
    )
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["n_episodes"] == 4 and on_disk["protocol"]["max_steps"] == 50
    k = on_disk["success_final"]["successes"]
    lo, hi = on_disk["success_final"]["ci95"]
    assert lo <= k / 4 <= hi and len(on_disk["videos"]) == 2
    assert all((tmp_path / v).is_file() for v in on_disk["videos"])
    assert all(r["steps_used"] == 50 and r["n_plans"] == 2 for r in rows)


def test_plan_verb_random_and_oracle_baselines(tmp_path):
    common = ["n_evals=6", "img_size=16", "max_steps=50", "progress=false", "n_videos=1"]
    run("plan", "planner=random", f"out={tmp_path / 'random'}", *common)
    run("plan", "planner=oracle", f"out={tmp_path / 'oracle'}", "planner.samples=32", *common)
    random = json.loads((tmp_path / "random" / "summary.json").read_text())
    oracle = json.loads((tmp_path / "oracle" / "summary.json").read_text())
    assert random["planner"]["name"] == "random" and random["run_dir"] is None
    # The true-simulator planner with a shortest-path cost is the ceiling: it beats random clearly.
    assert oracle["success_final"]["successes"] >= 4
    assert oracle["mean_final_dist"] < random["mean_final_dist"]


def test_plan_verb_needs_a_model_for_model_planners(tmp_path):
    with pytest.raises(ValueError, match="needs a world model"):
        run("plan", "planner=mpc_cem", f"out={tmp_path}", "n_evals=1", "progress=false")


def test_an_imported_dino_wm_checkpoint_plans_end_to_end(tmp_path):
    from tests_paths import DINO_WM_POINT_MAZE, FIXTURES

    run = FIXTURES / "dino_wm" / "outputs" / "tiny_point_maze_a"
    if not run.is_dir():
        pytest.skip(f"DINO-WM fixture not found at {run}")
    from wmlab.encoders import make_encoder
    from wmlab.evaluate import resolve_run
    from wmlab.planning import make_planner
    from wmlab.planning.objectives import Objective
    from wmlab.planning.planning_model import PlanningModel
    from wmlab.planning.policies import WorldModelPolicy

    imported = resolve_run(run, tmp_path / "imported")  # a DINO-WM run is converted first
    with pytest.raises(ValueError, match="normalisation"):
        PlanningModel.from_run(imported)  # DINO-WM keeps no statistics: they come from its dataset
    # The fixture's model reads 4 tokens x 8 dims (it was made with an identity encoder): a tiny
    # random ViT of that token shape stands in for the DINOv2 that cannot be downloaded here.
    encoder = make_encoder("random_vit", input_size=32, patch_size=16, dim=8, depth=1, heads=2)
    model = PlanningModel.from_run(imported, data=DINO_WM_POINT_MAZE, encoder=encoder)
    env = make_env("point_maze", img_size=32)
    protocol = Protocol(max_steps=20, n_taken_actions=2, frameskip=model.frameskip)
    planner = make_planner("cem", horizon=2, samples=8, topk=3, opt_steps=2)
    policy = WorldModelPolicy(model, planner, Objective(), horizon=2, n_taken_actions=2)
    starts, goals, seeds = random_state_pairs(env, 2, 99)
    rows, _ = evaluate_policy(policy, env, starts, goals, seeds, protocol, tmp_path / "plan", n_videos=1)
    assert [r["steps_used"] for r in rows] == [20, 20] and all(r["n_plans"] == 2 for r in rows)
    assert policy.last_results[0].actions.shape == (2, 2, 10)  # (B, T, frameskip x 2)
    assert (tmp_path / "plan" / "summary.json").is_file()
    env.close()
