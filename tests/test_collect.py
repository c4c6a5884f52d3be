"""Collection: content, determinism, resume after kill or Ctrl-C without loss or duplicates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from wmlab.data import DatasetError
from wmlab.data.collect import collect, episode_seed
from wmlab.data.store import TrajectoryStore
from wmlab.envs.point_maze import PointMazeEnv


def test_episode_content_follows_the_env(tiny_store):
    assert len(tiny_store) == 6
    episode = tiny_store.episode(2)
    assert episode["frames"].shape == (30, 32, 32, 3) and episode["frames"].dtype == np.uint8
    assert episode["actions"].shape == (30, 2) and np.abs(episode["actions"]).max() <= 1.0
    assert episode["seed"] == episode_seed(3, 2)
    # Replaying the stored actions from the stored first state reproduces the stored states
    # and frames: frame t is observed before action t.
    env = PointMazeEnv(img_size=32)
    obs, _ = env.reset(options={"state": episode["states"][0]})
    assert np.array_equal(obs["visual"], episode["frames"][0])
    for t in range(29):
        obs, *_, info = env.step(episode["actions"][t])
        assert np.allclose(info["state"], episode["states"][t + 1], atol=1e-5)
    assert np.array_equal(obs["visual"], episode["frames"][29])
    meta = tiny_store.metadata
    assert meta["env_id"] == "wmlab/PointMaze-UMaze" and meta["render_size"] == [32, 32]
    assert meta["versions"]["wmlab"] and meta["policy"] == "random"


def test_resume_refuses_different_settings(tiny_store):
    with pytest.raises(DatasetError, match="episode_len: dataset has 30, asked 31"):
        collect(tiny_store.path, n_episodes=6, episode_len=31, workers=1, seed=3,
                env_kwargs={"img_size": 32}, progress=False)  # fmt: skip


def _cli(out, n, workers=2):
    args = ["collect", f"out={out}", f"n_episodes={n}", "episode_len=20", "img_size=16", f"workers={workers}"]
    return [sys.executable, "-m", "wmlab.cli", *args, "progress=false", "preview=false"]


def _wait_for_commits(path, at_least, process, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "collection ended before it could be interrupted"
        if (path / "lengths" / "zarr.json").exists():
            try:
                if len(TrajectoryStore(path)) >= at_least:
                    return
            except DatasetError:
                pass
        time.sleep(0.05)
    raise TimeoutError("no commits")


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_collection_resumes_without_loss_or_duplicates(tmp_path, how):
    out = tmp_path / "d.zarr"
    n = 24
    process = subprocess.Popen(_cli(out, n), start_new_session=True, stderr=subprocess.PIPE, text=True)
    _wait_for_commits(out, 2, process)
    os.killpg(process.pid, how)
    _, stderr = process.communicate(timeout=60)
    if how == signal.SIGINT:
        assert process.returncode == 130
        assert "run the same command again to resume" in stderr
    partial = TrajectoryStore(out)
    assert 2 <= len(partial) < n
    subprocess.run(_cli(out, n), check=True, capture_output=True, timeout=300)
    resumed = TrajectoryStore(out)
    assert len(resumed) == n and resumed.lengths.tolist() == [20] * n
    # Every slot holds exactly the episode its seed defines, whichever run produced it.
    reference = collect(tmp_path / "ref.zarr", n_episodes=n, episode_len=20, workers=1,
                        env_kwargs={"img_size": 16}, progress=False)  # fmt: skip
    for i in range(n):
        assert np.array_equal(resumed.states(i), reference.states(i)), i
        assert np.array_equal(resumed.frames(i), reference.frames(i)), i
    assert not list((out / "frames").rglob("*.partial"))
