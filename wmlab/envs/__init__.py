"""Environments by name. Each is imported only when made (MuJoCo, Box2D, ViZDoom are heavy).

``make_env("point_maze", img_size=64)`` returns the raw env (our goal-conditioned API on it);
``gymnasium.make("wmlab/PointMaze-UMaze")`` works too once ``wmlab.envs`` is imported (or through
gymnasium's plugin entry point), wrapped as gymnasium wraps every env.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EnvEntry:
    entry_point: str  # "module:Class"
    kwargs: dict = field(default_factory=dict)
    gym_id: str | None = None


ENVS: dict[str, EnvEntry] = {
    "point_maze": EnvEntry("wmlab.envs.point_maze:PointMazeEnv", {"maze": "umaze"}, "wmlab/PointMaze-UMaze"),
    "point_maze_medium": EnvEntry(
        "wmlab.envs.point_maze:PointMazeEnv", {"maze": "medium"}, "wmlab/PointMaze-Medium"
    ),
    "point_maze_large": EnvEntry(
        "wmlab.envs.point_maze:PointMazeEnv", {"maze": "large"}, "wmlab/PointMaze-Large"
    ),
}


def env_entry(name: str) -> EnvEntry:
    if name not in ENVS:
        raise ValueError(f"unknown env {name!r}; known envs: {', '.join(sorted(ENVS))}")
    return ENVS[name]


def make_env(name: str, **kwargs):
    """Build env ``name`` with its registered defaults, overridden by ``kwargs``."""
    entry = env_entry(name)
    module_name, class_name = entry.entry_point.split(":")
    env_class = getattr(importlib.import_module(module_name), class_name)
    return env_class(**{**entry.kwargs, **kwargs})


def register_envs() -> None:
    """Register every env with gymnasium under its ``wmlab/...`` id (idempotent)."""
    import gymnasium

    for entry in ENVS.values():
        if entry.gym_id and entry.gym_id not in gymnasium.registry:
            gymnasium.register(id=entry.gym_id, entry_point=entry.entry_point, kwargs=dict(entry.kwargs))


register_envs()
