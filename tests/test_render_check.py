"""check-render: frames from our own env match; a shifted camera is recovered; a flip is detected."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wmlab.envs import make_env
from wmlab.envs.render_check import MATCH_THRESHOLD, check_render

SIZE = 64  # small frames keep the fit to a few seconds
LOOKAT_SHIFT = (0.2, -0.15)
DISTANCE_FACTOR = 1.1


def _states(n: int) -> np.ndarray:
    """float64 (n, 4) states inside the U-maze's free area (DINO-WM's random_state sampler)."""
    env = make_env("point_maze", img_size=SIZE, visual_obs=False)
    return np.stack([env.sample_start_goal(seed)[0] for seed in range(n)])


def _render(states: np.ndarray, **env_kwargs) -> np.ndarray:
    """uint8 (n, SIZE, SIZE, 3) frames of ``states`` rendered by an env built with ``env_kwargs``."""
    env = make_env("point_maze", img_size=SIZE, **env_kwargs)
    frames = []
    for state in states:
        env.set_state(state)
        frames.append(env.render().copy())
    env.close()
    return np.stack(frames)


@pytest.fixture(scope="module")
def default_camera() -> dict:
    env = make_env("point_maze", img_size=SIZE, visual_obs=False)
    return env.default_camera()


class FakeDataset:
    """The ``.lengths`` / ``.episode(i)`` protocol of TrajectoryStore and DinoWMDataset."""

    def __init__(self, states: np.ndarray, frames: np.ndarray, n_episodes: int = 3) -> None:
        # Slot 1 stays empty (length 0), like an uncommitted TrajectoryStore slot.
        chunks = np.array_split(np.arange(len(states)), n_episodes - 1)
        self.episodes = [chunks[0], np.arange(0), *chunks[1:]]
        self.lengths = np.array([len(c) for c in self.episodes])
        self.states, self.frames = states, frames

    def episode(self, i: int) -> dict:
        if self.lengths[i] == 0:
            raise AssertionError("check_render read an empty episode slot")
        index = self.episodes[i]
        return {"frames": self.frames[index], "states": self.states[index].astype(np.float32)}


def test_own_frames_match(tmp_path):
    states = _states(12)
    dataset = FakeDataset(states, _render(states))
    report = check_render(dataset, tmp_path, n_samples=8, seed=1)
    assert report["n_samples"] == 8
    assert report["mae"] < 0.05
    assert report["mae_flipped"] > report["mae"] + 1.0  # the U-maze is not symmetric top-bottom
    assert report["flip_vertical"] is False
    assert report["camera_fitted"] is None and report["mae_fitted"] is None
    assert report["advice"] == "frames match"
    assert all(len(s["source"]) == 2 and s["source"][0] != 1 for s in report["samples"])
    assert (tmp_path / "check_render.png").stat().st_size > 0
    assert json.loads((tmp_path / "check_render.json").read_text())["advice"] == "frames match"


def test_fit_recovers_shifted_camera(tmp_path, default_camera):
    true_distance = default_camera["distance"] * DISTANCE_FACTOR
    true_lookat = np.array(default_camera["lookat"]) + np.array([*LOOKAT_SHIFT, 0.0])
    states = _states(8)
    frames = _render(states, camera={"distance": true_distance, "lookat": true_lookat.tolist()})
    report = check_render(list(zip(states, frames)), tmp_path, n_samples=8, seed=0)

    assert report["mae"] > MATCH_THRESHOLD
    fitted = report["camera_fitted"]
    assert fitted is not None
    assert abs(fitted["distance"] / true_distance - 1.0) < 0.02
    assert np.max(np.abs(np.array(fitted["lookat"]) - true_lookat)) < 0.05
    assert report["mae_fitted"] < 0.5
    assert report["flip_vertical"] is False
    assert report["fit"]["seconds"] < 30
    # The advice is copy-pasteable CLI overrides: the list value is shell-quoted.
    assert report["advice"].startswith("set env.camera.distance=")
    assert "'env.camera.lookat=[" in report["advice"] and "flip_vertical" not in report["advice"]
    distance_override = next(o for o in report["overrides"] if o.startswith("env.camera.distance="))
    assert float(distance_override.split("=")[1]) == pytest.approx(fitted["distance"], abs=1e-4)


def test_bottom_up_frames_are_detected(tmp_path):
    states = _states(8)
    frames = _render(states)[:, ::-1]  # mujoco_py's bottom-up row order
    report = check_render(list(zip(states, frames)), tmp_path, n_samples=8)
    assert report["flip_vertical"] is True
    assert report["mae_flipped"] < 0.05 < MATCH_THRESHOLD < report["mae"]
    assert report["camera_fitted"] is None  # the flip alone explains the difference
    assert report["advice"] == "set env.flip_vertical=true"

    # A user who already set flip_vertical=true is told the frames match.
    again = check_render(list(zip(states, frames)), tmp_path, env_kwargs={"flip_vertical": True})
    assert again["flip_vertical"] is True and again["advice"] == "frames match"


def test_trajectory_store_source(tmp_path):
    pytest.importorskip("zarr")
    from wmlab.data.store import StoreSpec, TrajectoryStore

    states = _states(6)
    frames = _render(states)
    spec = StoreSpec(n_episodes=3, max_len=4, frame_shape=(SIZE, SIZE, 3), action_dim=2, state_dim=4)
    store = TrajectoryStore.create(tmp_path / "d.zarr", spec, {"env": "point_maze"})
    store.write_episode(0, frames[:3], np.zeros((3, 2), np.float32), states[:3].astype(np.float32))
    store.write_episode(2, frames[3:], np.zeros((3, 2), np.float32), states[3:].astype(np.float32))
    store.commit({0: 3, 2: 3})  # slot 1 is never committed: length 0, must be skipped
    report = check_render(TrajectoryStore(tmp_path / "d.zarr"), tmp_path / "out", n_samples=16)
    assert report["n_samples"] == 6
    assert {tuple(s["source"]) for s in report["samples"]} == {(e, t) for e in (0, 2) for t in range(3)}
    # Stored states are float32, so the re-render may move the disc by a rounding; still a match.
    assert report["mae"] < MATCH_THRESHOLD and report["advice"] == "frames match"


def test_bad_input_raises(tmp_path):
    state = np.array([1.0, 1.0, 0.0, 0.0])
    frame = np.zeros((SIZE, SIZE, 3), np.uint8)
    with pytest.raises(ValueError, match=r"no \(state, frame\) pairs"):
        check_render([], tmp_path)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        check_render([(state, np.zeros((SIZE, SIZE), np.uint8))], tmp_path)
    with pytest.raises(ValueError, match="4 finite numbers"):
        check_render([(np.zeros(6), frame)], tmp_path)
    with pytest.raises(ValueError, match="square"):
        check_render([(state, np.zeros((SIZE, SIZE + 8, 3), np.uint8))], tmp_path)
    with pytest.raises(ValueError, match="no committed episodes"):
        check_render(FakeDataset(np.zeros((0, 4)), np.zeros((0, SIZE, SIZE, 3), np.uint8)), tmp_path)
    with pytest.raises(ValueError, match="states must be"):
        bad = FakeDataset(np.zeros((4, 4)), np.zeros((4, SIZE, SIZE, 3), np.uint8))
        bad.states = np.zeros((4, 6))
        check_render(bad, tmp_path)
    with pytest.raises(ValueError, match="iterable of"):
        check_render(42, tmp_path)
    assert not (tmp_path / "check_render.png").exists()  # nothing written on bad input
