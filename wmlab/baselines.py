"""The baselines every result is drawn against, run by the same MPC harness as the world-model policy.

They use what no planner may see (the env's action box, the simulator and the true state), which is
why they live here and not in ``wmlab.planning``. Same interface as ``WorldModelPolicy``:
``reset(goal_frames (B,H,W,3) uint8, goal_proprio (B,P))`` and ``act(Observation) -> raw env actions
(B_active, steps_per_plan, A)``.

- ``RandomPolicy``: uniform actions in the env's action box (the floor every result sits on).
- ``StateOraclePolicy``: CEM over raw actions simulated with the true MuJoCo model from the true
  state, scored by the maze's shortest-path distance to the goal (the ceiling: what planning could
  reach with a perfect model and a perfect distance).
"""

from __future__ import annotations

import numpy as np
import torch

from wmlab.planning.mpc import Observation


class RandomPolicy:
    """Uniform random raw actions in [low, high] (A,), redrawn every env step."""

    def __init__(self, steps_per_plan: int, action_low, action_high, seed: int = 0) -> None:
        self.steps_per_plan = int(steps_per_plan)
        self.low = np.asarray(action_low, dtype=np.float64)
        self.high = np.asarray(action_high, dtype=np.float64)
        self.rng = np.random.default_rng(seed)

    def reset(self, goal_frames: np.ndarray, goal_proprio: np.ndarray) -> None:
        pass

    def act(self, obs: Observation) -> np.ndarray:
        shape = (len(obs.episodes), self.steps_per_plan, len(self.low))
        return self.rng.uniform(self.low, self.high, size=shape)  # (B, K, A)


class StateOraclePolicy:
    """Plans raw action sequences with the true simulator (privileged: reads the true state).

    Candidates are ``horizon_steps`` raw actions (held ``hold`` env steps each), simulated from the
    observed state with ``mujoco.rollout`` (in C, many at once), scored by the geodesic (shortest
    path) distance from the final position to the goal plus a small speed term, optimised by CEM.
    """

    def __init__(
        self, env, *, steps_per_plan: int, horizon_steps: int = 25, hold: int = 5, samples: int = 64,
        topk: int = 8, opt_steps: int = 4, speed_weight: float = 0.05, seed: int = 0,
    ) -> None:  # fmt: skip
        from wmlab.planning.cem import CEM

        self.env, self.steps_per_plan, self.hold = env, int(steps_per_plan), int(hold)
        if horizon_steps % hold or steps_per_plan % hold:
            raise ValueError(
                f"horizon_steps ({horizon_steps}) and steps_per_plan must be multiples of hold ({hold})"
            )
        self.knots = horizon_steps // hold
        self.speed_weight = float(speed_weight)
        self.planner = CEM(
            horizon=self.knots, samples=samples, topk=topk, opt_steps=opt_steps, select="best", seed=seed
        )

    def reset(self, goal_frames: np.ndarray, goal_proprio: np.ndarray) -> None:
        self.goals = np.asarray(goal_proprio, dtype=np.float64)  # (B, 4)
        self.plans = None

    def act(self, obs: Observation) -> np.ndarray:
        from wmlab.envs.geodesic import geodesic_distance

        states = np.asarray(obs.proprio, dtype=np.float64)  # (B, 4) the true state, for PointMaze
        goals = self.goals[obs.episodes]  # (B, 4)
        B = len(states)

        def cost_fn(actions: torch.Tensor) -> torch.Tensor:
            _, S, K, A = actions.shape
            raw = np.clip(actions.detach().cpu().numpy(), -1.0, 1.0)  # (B, S, K, 2)
            final = self.env.simulate(
                np.repeat(states, S, axis=0), np.repeat(raw.reshape(B * S, K, A), self.hold, axis=1)
            )
            xy = final[:, :2]
            goal_xy = np.repeat(goals[:, :2], S, axis=0)
            cost = geodesic_distance(self.env.layout, xy, goal_xy) + self.speed_weight * np.linalg.norm(
                final[:, 2:4], axis=1
            )
            return torch.as_tensor(cost.reshape(B, S), dtype=torch.float32)

        init = torch.zeros(B, self.knots, 2)
        result = self.planner.plan(cost_fn, init)
        raw = np.clip(result.actions.numpy(), -1.0, 1.0)  # (B, knots, 2)
        return np.repeat(raw, self.hold, axis=1)[:, : self.steps_per_plan]  # (B, steps_per_plan, 2)
