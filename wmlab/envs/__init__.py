"""Environments by name. Each is imported only when made (MuJoCo, Box2D, ViZDoom are heavy).

``make_env("point_maze", img_size=64)`` returns the raw env (our goal-conditioned API on it).
Through gymnasium, wrapped as gymnasium wraps every env, in a fresh interpreter::

    gymnasium.make("wmlab:wmlab/PointMaze-UMaze-v0", img_size=64)

gymnasium imports the module named before the ``:`` (here ``wmlab``, which registers the ids when
gymnasium is loaded; ``wmlab.envs:`` works too), then makes the id. Once ``wmlab`` or ``wmlab.envs``
is imported, the plain id works: ``gymnasium.make("wmlab/PointMaze-UMaze-v0")``. The unversioned names
(``wmlab/PointMaze-UMaze``) still work: gymnasium resolves them to the latest version (with a
warning to pin it). gymnasium 1.x no longer loads ``gymnasium.envs`` entry-point plugins (0.26-0.29
did), so no installed package can register ids before something imports it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EnvEntry:
    entry_point: str  # "module:Class"
    kwargs: dict = field(default_factory=dict)
    gym_id: str | None = None  # gymnasium's name without version (recorded in datasets' metadata)
    version: int = 0  # registered as <gym_id>-v<version>

    @property
    def versioned_id(self) -> str | None:
        return f"{self.gym_id}-v{self.version}" if self.gym_id else None


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
    """Register every env with gymnasium under its versioned ``wmlab/<Name>-v<N>`` id (idempotent).

    Bump an id's version when a change alters what the env does for the same seed and actions.
    """
    import gymnasium

    for entry in ENVS.values():
        if entry.versioned_id and entry.versioned_id not in gymnasium.registry:
            gymnasium.register(
                id=entry.versioned_id, entry_point=entry.entry_point, kwargs=dict(entry.kwargs)
            )


register_envs()
