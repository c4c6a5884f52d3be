"""PointMaze: the MJCF facts, the start/goal sampler, dynamics, walls, rendering."""

from __future__ import annotations

from pathlib import Path

import gymnasium
import numpy as np
import pytest

from wmlab.envs import make_env
from wmlab.envs.maze_layouts import MazeLayout
from wmlab.envs.point_maze import PointMazeEnv


@pytest.fixture(scope="module")
def env():
    return PointMazeEnv(visual_obs=False)


def dino_wm_rule(x: float, y: float) -> bool:
    """DINO-WM's acceptance rule for the U-maze, written out literally."""
    arms = (0.5 <= x <= 1.1 or 2.5 <= x <= 3.1) and (0.5 <= y <= 3.1)
    corridor = (1.1 < x < 2.5) and (2.5 <= y <= 3.1)
    return arms or corridor


def test_model_parameters(env):
    m = env.model
    assert m.opt.timestep == pytest.approx(0.01)
    assert np.allclose(m.opt.gravity, 0)
    assert m.opt.integrator == 0  # Euler
    assert np.allclose(m.dof_damping, 1.0)
    assert np.allclose(m.actuator_gear[:, 0], 100)
    assert np.allclose(m.actuator_ctrlrange, [[-1, 1], [-1, 1]])
    assert len(env.layout.wall_cells) == 25 - 7  # 5x5 grid, 7 free cells
    # The target site stays at the origin in the model, so the camera distance is MuJoCo 3's 9.73.
    assert env.default_camera()["distance"] == pytest.approx(9.7348, abs=1e-3)
    assert env.default_camera()["lookat"] == pytest.approx((3.0, 3.0, 0.0))


def test_sampler_matches_hand_derivation_for_seed_0(env):
    # RandomState(0).random_sample() begins 0.5488135 0.71518937 0.60276338 0.54488318 0.4236548
    # 0.64589411 0.43758721 0.891773 0.96366276 0.38344152 0.79172504 0.52889492 0.56804456 0.92559664.
    # x = 0.5 + 2.6 u. Pairs 1-3 fall in the U's gap (x in (1.1, 2.5) needs y >= 2.5): rejected.
    # Pair 4: x = 1.63772675, y = 2.8186098 -> the top corridor: accepted.
    # v = -5.2262554 + 10.4525108 u with u = 0.96366276, 0.38344152.
    # Goal: x = 2.5584851 (right arm), y = 1.87512679, v from 0.56804456, 0.92559664.
    start, goal = env.sample_start_goal(0)
    assert start == pytest.approx([1.63772675, 2.8186098, 4.84644001, -1.21832878], abs=1e-7)
    assert goal == pytest.approx([2.5584851, 1.87512679, 0.71123651, 4.44855346], abs=1e-7)


def test_sampler_matches_literal_rule_for_many_seeds(env):
    for seed in range(0, 400, 7):
        rs = np.random.RandomState(seed)
        expected = []
        for _ in range(2):
            while True:
                x, y = rs.uniform(0.5, 3.1), rs.uniform(0.5, 3.1)
                if dino_wm_rule(x, y):
                    break
            expected.append([x, y, rs.uniform(-5.2262554, 5.2262554), rs.uniform(-5.2262554, 5.2262554)])
        start, goal = env.sample_start_goal(seed)
        assert np.array_equal(start, expected[0]) and np.array_equal(goal, expected[1]), seed


def test_generic_region_equals_rule_on_a_grid():
    layout = MazeLayout.named("umaze")
    for x in np.linspace(0.4, 3.2, 57):
        for y in np.linspace(0.4, 3.2, 57):
            assert layout.sampler_accepts(x, y) == dino_wm_rule(x, y), (x, y)


def test_push_right_moves_plus_x_and_wall_stops(env):
    env.reset(options={"state": [0.8, 1.0, 0.0, 0.0]})  # bottom-left arm of the U, centre of cell (1,1)
    for _ in range(10):
        _, _, terminated, truncated, info = env.step([0.0, 1.0])  # +y is along the arm
    assert not terminated and not truncated
    env.reset(options={"state": [0.8, 0.8, 0.0, 0.0]})
    for _ in range(10):
        *_, info = env.step([1.0, 0.0])
    x_after = info["state"][0]
    assert x_after > 0.9, "pushing +x for 10 steps must move the disc right"
    # Keep pushing: the wall between the arms (cell (2,1), box x in [2.5, 3.5] world = [1.3, 2.3] qpos)
    # stops the disc's centre at about 1.3 - 0.1 (its radius) - margin.
    for _ in range(100):
        *_, info = env.step([1.0, 0.0])
    assert 1.1 < info["state"][0] < 1.21
    assert abs(info["state"][2]) < 0.05, "the wall must stop the disc"


def test_step_clips_action_and_velocity(env):
    env.reset(options={"state": [0.8, 1.5, 0.0, 0.0]})
    *_, big = env.step([50.0, 0.0])
    env.reset(options={"state": [0.8, 1.5, 0.0, 0.0]})
    *_, unit = env.step([1.0, 0.0])
    assert np.array_equal(big["state"], unit["state"])
    env.reset(options={"state": [0.8, 1.5, 40.0, 0.0]})
    *_, info = env.step([0.0, 0.0])
    assert info["state"][2] <= 5.0  # velocity was clipped to 5 before simulating, then damped
    with pytest.raises(ValueError, match="finite"):
        env.step([np.nan, 0.0])
    with pytest.raises(ValueError, match="shape"):
        env.step([1.0, 0.0, 0.0])


def test_evaluate_and_reward():
    result = PointMazeEnv.evaluate([1, 1, 0, 0], [1.3, 1.3, 0, 0])
    assert result == {"success": True, "state_dist": pytest.approx(0.4243, abs=1e-4)}
    assert not PointMazeEnv.evaluate([1, 1, 0, 0], [1.5, 1.0, 0, 0])["success"]  # strictly < 0.5
    env = PointMazeEnv(visual_obs=False)
    env.reset(options={"state": [0.8, 1.0, 0, 0], "goal": [0.8, 1.1, 0, 0]})
    _, reward, *_, info = env.step([0, 0])
    assert reward == 1.0 and info["success"]


def test_random_reset_is_d4rl_style_and_seeded():
    env = PointMazeEnv(visual_obs=False)
    _, a = env.reset(seed=5)
    _, b = env.reset(seed=5)
    assert np.array_equal(a["state"], b["state"])
    cells = np.array(env.layout.free_cells)
    for seed in range(30):
        _, info = env.reset(seed=seed)
        xy = info["state"][:2]
        assert np.min(np.abs(cells - xy).max(axis=1)) <= 0.1 + 1e-6  # cell index + U(-0.1, 0.1)
        assert info["state"].dtype == np.float32


def test_render_shape_flip_and_determinism():
    env = PointMazeEnv(img_size=48)
    obs, _ = env.reset(options={"state": [1.0856, 1.9746, 0, 0]})
    frame = obs["visual"]
    assert frame.shape == (48, 48, 3) and frame.dtype == np.uint8
    assert np.array_equal(frame, env.render())
    flipped = PointMazeEnv(img_size=48, flip_vertical=True)
    flipped.reset(options={"state": [1.0856, 1.9746, 0, 0]})
    assert np.array_equal(flipped.render(), frame[::-1])


def test_matches_reference_render_at_224():
    """Reference section 11's picture of the section-9 model (rendered with anti-aliasing)."""
    import imageio.v3 as iio

    ref_path = Path(__file__).resolve().parents[2] / "shared" / "reference" / "point_maze_224.png"
    if not ref_path.is_file():
        pytest.skip(f"{ref_path} not present (../shared is missing)")
    ref = iio.imread(ref_path)[..., :3].astype(int)
    env = PointMazeEnv(img_size=224)
    env.reset(options={"state": [1.0856, 1.9746, 0.0098, 0.0217]})
    mae = np.abs(env.render().astype(int) - ref).mean()
    assert mae < 1.5, f"our render differs from the reference by MAE {mae:.2f}"


def test_layouts_and_registry():
    env = make_env("point_maze_medium", visual_obs=False)
    start, goal = env.sample_start_goal(1)
    for s in (start, goal):
        assert env.layout.sampler_accepts(s[0], s[1])
    with pytest.raises(ValueError, match="known envs"):
        make_env("point_maez")
    gym_env = gymnasium.make("wmlab/PointMaze-UMaze", img_size=32)
    obs, _ = gym_env.reset(seed=0)
    assert obs["visual"].shape == (32, 32, 3)
    assert hasattr(gym_env.unwrapped, "sample_start_goal")
