"""The policy the MPC harness runs for a world model: a planner through the model.

Every policy has ``reset(goal_frames (B,H,W,3) uint8, goal_proprio (B,P))`` and
``act(Observation) -> raw env actions (B_active, steps_per_plan, A)`` (see ``wmlab.planning.mpc``).

- ``WorldModelPolicy``: encodes the current and goal frames once per plan, plans in normalised
  model-step action space (frameskip x action_dim) with any planner, warm-starts from the shifted
  previous plan, and maps the first ``n_taken_actions`` model steps back to raw env actions.

The random and state-oracle baselines read the simulator, which a planner never sees, so they live
outside ``planning/`` (``wmlab.baselines``).
"""

from __future__ import annotations

import numpy as np
import torch

from wmlab.planning.mpc import Observation, shift_plan


class WorldModelPolicy:
    """MPC through a trained world model: plan, execute ``n_taken_actions`` model steps, re-plan.

    model: ``PlanningModel`` (world model + frozen encoder + normalisation + frameskip).
    planner: any ``wmlab.planning`` planner; ``horizon``: model steps planned.
    chunk / memory_budget: rollout rows per call, "auto"/None = by the memory budget (bytes; None:
        the device's default), see ``rollout_cost_fn``.
    precision: fp32 (default: plans identical to earlier runs), bf16, tf32, or auto: measured at the
        first plan (``wmlab.precision``: a micro-benchmark of the model's shapes, then agreement with
        fp32 on ``PROBE_CANDIDATES`` fixed candidates from that plan's real start and goal).
        ``metadata`` holds the choice and its evidence (for the plan's summary).
    """

    #: Fixed candidates (per start state, at most ``PROBE_STATES`` of them) of the precision probe.
    PROBE_CANDIDATES, PROBE_STATES = 8, 2

    def __init__(
        self, model, planner, objective, *, horizon: int, n_taken_actions: int, chunk=None,
        memory_budget: int | None = None, precision: str = "fp32",
    ) -> None:  # fmt: skip
        from wmlab.precision import check_precision

        if not 1 <= n_taken_actions <= horizon:
            raise ValueError(f"n_taken_actions must be in 1..horizon={horizon}, got {n_taken_actions}")
        self.model, self.planner, self.objective = model, planner, objective
        self.horizon, self.n_taken, self.chunk = int(horizon), int(n_taken_actions), chunk
        self.memory_budget, self.requested_precision = memory_budget, check_precision(precision)
        self.precision_info: dict | None = None
        self.last_results: list = []
        self.max_chunk = 0

    @property
    def metadata(self) -> dict:
        """Settings that shaped the plans: precision (with its evidence once resolved) and chunking
        (``chunk`` as set, ``chunk_used``: the most rows one rollout call took in this policy's plans)."""
        return {
            "precision": self.precision_info or {"requested": self.requested_precision},
            "chunk": self.chunk if self.chunk is not None else "auto",
            "chunk_used": self.max_chunk or None,
            "memory_budget": self.memory_budget,
        }

    def _cost_fn(self, visual, proprio, idx, precision: str):
        from wmlab.planning.objectives import rollout_cost_fn

        return rollout_cost_fn(
            self.model.world_model, visual[:, None], proprio[:, None], self.goal_visual[idx],
            self.goal_proprio[idx], self.objective, self.chunk, memory_budget=self.memory_budget,
            precision=precision,
        )  # fmt: skip

    def _resolve_precision(self, visual, proprio, idx) -> str:
        """The precision of every plan of this policy, resolved once (auto: measured here)."""
        if self.precision_info is None:
            from wmlab.precision import block_shapes, resolve_precision

            k = min(len(idx), self.PROBE_STATES)
            A = self.model.world_model.cfg.action_dim
            g = torch.Generator().manual_seed(0)
            probe_actions = torch.randn(k, self.PROBE_CANDIDATES, self.horizon, A, generator=g)
            probe_actions = probe_actions.to(self.model.device)  # (k, K, T, A) fixed candidates

            def probe(precision: str) -> torch.Tensor:
                with torch.no_grad():
                    return self._cost_fn(visual[:k], proprio[:k], idx[:k], precision)(probe_actions)

            self.precision_info = resolve_precision(
                self.requested_precision, self.model.device,
                shapes=block_shapes(self.model.world_model.cfg), probe=probe,
            )  # fmt: skip
        return self.precision_info["chosen"]

    def reset(self, goal_frames: np.ndarray, goal_proprio: np.ndarray) -> None:
        self.goal_visual, self.goal_proprio = self.model.encode(goal_frames, goal_proprio)  # (B,N,D), (B,P)
        B = len(goal_frames)
        A = self.model.world_model.cfg.action_dim
        self.plans = torch.zeros(B, self.horizon, A, device=self.model.device)  # warm starts (B, T, A)
        self.last_results = []

    def act(self, obs: Observation) -> np.ndarray:
        idx = torch.as_tensor(obs.episodes, device=self.model.device)
        visual, proprio = self.model.encode(obs.frames, obs.proprio)  # (B, N, D), (B, P)
        cost_fn = self._cost_fn(visual, proprio, idx, self._resolve_precision(visual, proprio, idx))
        with torch.set_grad_enabled(getattr(self.planner, "needs_grad", False)):
            result = self.planner.plan(cost_fn, self.plans[idx])
        result.info["precision"] = self.precision_info["chosen"]
        result.info["chunk"] = cost_fn.last_chunk
        self.max_chunk = max(self.max_chunk, cost_fn.max_chunk)
        actions = result.actions.detach()  # (B, T, A)
        self.plans[idx] = shift_plan(actions, self.n_taken)
        self.last_results.append(result)
        return self.model.env_actions(actions[:, : self.n_taken])  # (B, n_taken * frameskip, A_env)
