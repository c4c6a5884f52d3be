"""The closed loop: plan, execute the first actions, observe the real frame, re-plan (MPC).

Many episodes run together: the policy is asked for the next chunk of raw env actions for every
active episode at once (so a world-model planner plans all of them in one batched call), then each
episode's env steps are executed and its new frame rendered. The policy only ever receives frames
and proprio (``Observation``); simulator state and success stay with the harness (``EpisodeBatch``).

Two success measures per episode (see ``EpisodeOutcome``): ``reached`` -- the env reported success
at an observation within the budget (DINO-WM's MPC criterion, which stops an episode at success) --
and ``final`` -- within the success radius at the end of the budget, having kept planning towards the
goal. Under a bounded budget every episode runs the full budget so both are measured in one run.
``max_steps=None`` reproduces DINO-WM's unbounded loop: episodes stop at success and the rest go on
until all have succeeded (capped at ``UNBOUNDED_CAP`` env steps so a run cannot hang forever).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

#: Safety cap for ``max_steps=None`` (DINO-WM's unbounded loop), in env steps per episode.
UNBOUNDED_CAP = 5000


@dataclass
class Protocol:
    """The evaluation budget.

    max_steps: env steps per episode (None = DINO-WM's unbounded loop, labelled so in results).
    n_taken_actions: model steps executed per plan before re-planning (each = frameskip env steps).
    frameskip: env steps per model step.
    """

    max_steps: int | None = 100
    n_taken_actions: int = 5
    frameskip: int = 5

    def __post_init__(self) -> None:
        if self.max_steps is not None and int(self.max_steps) < 1:
            raise ValueError(f"max_steps must be >= 1 or null (unbounded), got {self.max_steps}")
        if int(self.n_taken_actions) < 1 or int(self.frameskip) < 1:
            raise ValueError(f"n_taken_actions and frameskip must be >= 1, got {self}")

    @property
    def bounded(self) -> bool:
        return self.max_steps is not None

    @property
    def steps_per_plan(self) -> int:
        return int(self.n_taken_actions) * int(self.frameskip)

    @property
    def max_plans(self) -> int:
        """Plans per episode: the budget divided into chunks (the last one may be cut short)."""
        steps = self.max_steps if self.bounded else UNBOUNDED_CAP
        return math.ceil(int(steps) / self.steps_per_plan)

    def to_dict(self) -> dict:
        return {
            "max_steps": self.max_steps,
            "n_taken_actions": int(self.n_taken_actions),
            "frameskip": int(self.frameskip),
            "env_steps_per_plan": self.steps_per_plan,
            "max_plans": self.max_plans,
            "unbounded": not self.bounded,
        }


@dataclass
class Observation:
    """What a policy sees for the active episodes: frames uint8 (B, H, W, 3), proprio (B, P)."""

    frames: np.ndarray
    proprio: np.ndarray
    episodes: np.ndarray  # (B,) indices into the batch, so a policy can keep per-episode state


@dataclass
class EpisodeOutcome:
    """One episode's result (distances in env units)."""

    reached: bool = False
    reached_step: int | None = None
    final: bool = False
    final_dist: float = float("nan")  # xy distance to the goal at the end
    final_state_dist: float = float("nan")  # DINO-WM's state_dist: L2 over [x, y, vx, vy]
    steps_used: int = 0
    plan_seconds: list[float] = field(default_factory=list)  # this episode's share of each plan call


def run_mpc(policy, batch, protocol: Protocol, *, progress=None) -> list[EpisodeOutcome]:
    """Run every episode of ``batch`` (an ``EpisodeBatch``) under ``policy`` until the budget is spent.

    ``policy.reset(goal_frames (B,H,W,3), goal_proprio (B,P))`` is called once, then
    ``policy.act(Observation) -> raw env actions (B_active, protocol.steps_per_plan, A)`` per plan.
    """
    n = len(batch)
    outcomes = [EpisodeOutcome() for _ in range(n)]
    steps = np.zeros(n, dtype=int)
    policy.reset(batch.goal_frames(), batch.goal_proprio())
    cap = protocol.max_steps if protocol.bounded else UNBOUNDED_CAP
    for plan_index in range(protocol.max_plans):
        active = np.array([i for i in range(n) if steps[i] < cap and not _stopped(outcomes[i], protocol)])
        if len(active) == 0:
            break
        obs = batch.observe(active)
        started = time.perf_counter()
        actions = np.asarray(policy.act(obs), dtype=np.float64)
        seconds = time.perf_counter() - started
        expected = (len(active), protocol.steps_per_plan)
        if actions.shape[:2] != expected or not np.all(np.isfinite(actions)):
            raise ValueError(
                f"{type(policy).__name__}.act returned actions of shape {actions.shape} (finite: "
                f"{bool(np.all(np.isfinite(actions)))}); expected finite ({expected[0]}, {expected[1]}, A)"
            )
        for row, i in enumerate(active):
            k = min(protocol.steps_per_plan, cap - steps[i])
            batch.step(i, actions[row, :k])
            steps[i] += k
            outcome = outcomes[i]
            outcome.plan_seconds.append(seconds / len(active))
            if not outcome.reached and batch.success(i):  # checked where the planner observes
                outcome.reached, outcome.reached_step = True, int(steps[i])
        if progress is not None:
            progress(plan_index + 1, protocol.max_plans, outcomes)
    for i, outcome in enumerate(outcomes):
        outcome.steps_used = int(steps[i])
        measured = batch.distances(i)
        outcome.final = bool(measured["success"])
        outcome.final_dist = measured["xy_dist"]
        outcome.final_state_dist = measured["state_dist"]
    return outcomes


def _stopped(outcome: EpisodeOutcome, protocol: Protocol) -> bool:
    # Bounded: keep planning after success so `final` measures holding the goal. Unbounded
    # (DINO-WM): an episode ends at success, the loop at the last success.
    return (not protocol.bounded) and outcome.reached


def shift_plan(actions, n_taken: int):
    """Warm start for the next plan: drop the executed model steps, repeat zeros (the mean action in
    normalised space) at the end. actions (B, T, A) -> (B, T, A)."""
    import torch

    B, T, A = actions.shape
    keep = actions[:, n_taken:]  # (B, T - n_taken, A)
    pad = torch.zeros(B, min(n_taken, T), A, dtype=actions.dtype, device=actions.device)
    return torch.cat([keep, pad], dim=1)[:, :T]  # (B, T, A)
