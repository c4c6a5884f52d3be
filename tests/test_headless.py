"""Headless GL selection: a clear message when mujoco was imported before wmlab chose EGL."""

from __future__ import annotations

import os
import subprocess
import sys


def run_python(code: str, **env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM", "DISPLAY")}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_wmlab_chooses_egl_without_a_display():
    result = run_python(
        "import os; from wmlab.envs.point_maze import PointMazeEnv;"
        "e = PointMazeEnv(img_size=16); e.reset(seed=0); print(os.environ['MUJOCO_GL'])"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "egl"


def test_importing_mujoco_first_explains_the_fix():
    result = run_python(
        "import mujoco; from wmlab.envs.point_maze import PointMazeEnv;"
        "PointMazeEnv(img_size=16).reset(seed=0)"
    )
    assert result.returncode != 0
    assert "import wmlab before mujoco" in result.stderr
