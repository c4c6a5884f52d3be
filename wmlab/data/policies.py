"""Data-collection policies: ``policy(obs) -> action`` objects, built by name with a seed."""

from __future__ import annotations

import numpy as np

from wmlab.data.errors import DatasetError


class RandomPolicy:
    """Uniform random actions in the env's action box, one independent draw per env step
    (DINO-WM's PointMaze dataset: uniform in [-1, 1]^2)."""

    def __init__(self, action_space, seed: int) -> None:
        self.low = np.asarray(action_space.low, dtype=np.float64)
        self.high = np.asarray(action_space.high, dtype=np.float64)
        self.rng = np.random.default_rng(seed)

    def __call__(self, observation) -> np.ndarray:
        return self.rng.uniform(self.low, self.high).astype(np.float32)


POLICIES = {"random": RandomPolicy}


def make_policy(name: str, action_space, seed: int):
    if name not in POLICIES:
        raise DatasetError(f"unknown policy {name!r}; known policies: {', '.join(sorted(POLICIES))}")
    return POLICIES[name](action_space, seed)
