"""wmlab's envs through gymnasium, in a fresh interpreter as a user meets them (issue 14 item 5).

gymnasium 1.x dropped the ``gymnasium.envs`` entry-point plugin loader that 0.26-0.29 had, so an
installed package cannot register ids on its own; ``gymnasium.make("wmlab:<id>")`` makes gymnasium
import wmlab first, which registers them.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def run_fresh(code: str) -> subprocess.CompletedProcess:
    """``code`` in a new interpreter: nothing of wmlab imported beforehand."""
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip


def test_versioned_ids_make_in_a_fresh_interpreter_and_pass_the_env_checker():
    result = run_fresh(
        """
        import sys
        import gymnasium
        from gymnasium.utils.env_checker import check_env

        assert "wmlab" not in sys.modules
        env = gymnasium.make("wmlab:wmlab/PointMaze-UMaze-v0", img_size=16)  # gymnasium imports wmlab
        assert env.spec.id == "wmlab/PointMaze-UMaze-v0", env.spec.id
        check_env(env.unwrapped)  # raises on any API violation
        obs, _ = env.reset(seed=0)
        assert obs["visual"].shape == (16, 16, 3)
        # once wmlab is imported the plain ids work, and the old unversioned names resolve to -v0
        for old in ["wmlab/PointMaze-UMaze", "wmlab/PointMaze-Medium", "wmlab/PointMaze-Large"]:
            assert gymnasium.make(old, img_size=16).spec.id == old + "-v0"
            assert gymnasium.make(old + "-v0", img_size=16).spec.id == old + "-v0"
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_wmlab_envs_prefix_and_importing_wmlab_before_gymnasium():
    result = run_fresh(
        """
        import sys
        import wmlab  # before gymnasium: importing wmlab stays free of gymnasium
        assert "gymnasium" not in sys.modules
        import gymnasium
        env = gymnasium.make("wmlab.envs:wmlab/PointMaze-Large-v0", img_size=16)
        assert env.spec.id == "wmlab/PointMaze-Large-v0"
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_no_dead_gymnasium_plugin_entry_point_is_declared():
    """A ``gymnasium.envs`` entry point does nothing under gymnasium 1.x: declaring one only misleads."""
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '[project.entry-points."gymnasium.envs"]' not in pyproject
