"""Success and final distance against rollouts spent: CEM, iCEM, MPPI in closed-loop MPC on a toy.

    python benchmarks/planner_budget.py [--episodes 50] [--scales 0.05,0.1,0.2,0.35,0.5,1] [--seeds 3]

Why a toy: the question is how many candidate rollouts each planner needs for the same success, and
a trained world model on 2 shared CPU cores costs ~0.1 s per rollout (one point of the curve would
take hours). The toy is a state-space model with a known optimum that keeps the structure of
DINO-WM's PointMaze MPC: a damped 2-D point mass (per env step v <- 0.9 v + 0.5 clip(a, -1, 1) dt,
p <- p + v dt, dt 0.1), model steps of frameskip 5 raw actions (A = 10), horizon 5 model steps,
the last predicted frame's squared distance to the goal as the cost (DINO-WM's objective mode
"last", alpha 0: position only), MPC executing 5 model steps per plan, 100 env steps an episode
(4 plans), start/goal pairs 2-4 units apart (reachable: the optimum is cost 0). The planner sees the
exact model, so differences are the search's alone. Success as in ``wmlab.planning.mpc``: ``reached``
(within ``--radius`` at an observation) and ``final`` (within it at the end).

Each planner runs its config (``conf/planner/mpc_*.yaml``: CEM 300 x 10 + the final mean = DINO-WM's
PointMaze setting; iCEM's shrinking coloured-noise population, 1013 a plan; MPPI 300 x 10) with the
population scaled by each ``--scales`` factor (CEM/MPPI samples and CEM topk; iCEM samples,
min_samples and topk); ``cem_best`` is CEM returning the cheapest sequence it evaluated instead of
DINO-WM's final mean. ``ratios``: for each planner, the fewest rollouts at which its success (mean
over seeds) is within ``--match`` of CEM's at its full DINO-WM budget, and CEM's budget divided by
that. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from wmlab.planning import make_planner
from wmlab.planning.mpc import shift_plan

DT, DAMPING, GAIN, FRAMESKIP, HORIZON, N_TAKEN, PLANS = 0.1, 0.9, 0.5, 5, 5, 5, 4

#: Each planner's MPC config at scale 1 (conf/planner/mpc_*.yaml; MPPI at CEM's 10 iterations).
CONFIGS = {
    "cem": dict(samples=300, topk=30, opt_steps=10, select="mean"),
    "cem_best": dict(samples=300, topk=30, opt_steps=10, select="best"),  # CEM returning its best sample
    "icem": dict(samples=200, topk=10, opt_steps=14, min_samples=20, select="best"),
    "mppi": dict(samples=300, opt_steps=10, select="mean"),
}


def simulate(state: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """state (M, 4) = [x, y, vx, vy], model-step actions (M, T, FRAMESKIP * 2) -> final states (M, 4)."""
    M, T, _ = actions.shape
    raw = actions.reshape(M, T * FRAMESKIP, 2).clamp(-1, 1)  # (M, T*fs, 2), time-major
    p, v = state[:, :2], state[:, 2:]
    for t in range(raw.shape[1]):
        v = DAMPING * v + GAIN * raw[:, t] * DT
        p = p + v * DT
    return torch.cat([p, v], dim=1)


def cost_fn_for(states: torch.Tensor, goals: torch.Tensor):
    """cost_fn(actions (B, S, T, A)) -> (B, S): squared distance of the final position to the goal."""

    def cost_fn(actions: torch.Tensor) -> torch.Tensor:
        B, S, T, A = actions.shape
        final = simulate(states.repeat_interleave(S, 0), actions.reshape(B * S, T, A))  # (B*S, 4)
        goal = goals.repeat_interleave(S, 0)  # (B*S, 2)
        return (final[:, :2] - goal).square().sum(dim=1).reshape(B, S)

    return cost_fn


def pairs(episodes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Start states at rest (E, 4) and goals (E, 2) 2-4 units away in a random direction."""
    g = torch.Generator().manual_seed(1000 + seed)
    start = torch.rand(episodes, 2, generator=g) * 4 - 2
    angle = torch.rand(episodes, generator=g) * 2 * torch.pi
    dist = 2 + 2 * torch.rand(episodes, generator=g)
    goal = start + dist[:, None] * torch.stack([angle.cos(), angle.sin()], dim=1)
    return torch.cat([start, torch.zeros(episodes, 2)], dim=1), goal


def scaled(name: str, scale: float) -> dict:
    cfg = dict(CONFIGS[name])
    cfg["samples"] = max(4, round(cfg["samples"] * scale))
    if name.startswith("cem"):
        cfg["topk"] = max(2, min(cfg["samples"], round(cfg["topk"] * scale)))
    if name == "icem":
        cfg["topk"] = max(2, round(cfg["topk"] * min(1.0, 2 * scale)))
        cfg["min_samples"] = max(2 * cfg["topk"], round(cfg["min_samples"] * scale))
    return cfg


def run_mpc(name: str, cfg: dict, episodes: int, seed: int, radius: float) -> dict:
    """All episodes together: PLANS plans of HORIZON steps, N_TAKEN executed each."""
    planner = make_planner(name.removesuffix("_best"), horizon=HORIZON, seed=seed, **cfg)
    states, goals = pairs(episodes, seed)
    plan = torch.zeros(episodes, HORIZON, 2 * FRAMESKIP)
    reached = torch.zeros(episodes, dtype=torch.bool)
    rollouts = 0
    for _ in range(PLANS):
        result = planner.plan(cost_fn_for(states, goals), plan)
        rollouts += result.n_evaluations
        taken = result.actions[:, :N_TAKEN]
        for k in range(N_TAKEN):  # observe after each model step, as the env harness does per plan
            states = simulate(states, taken[:, k : k + 1])
        reached |= (states[:, :2] - goals).norm(dim=1) < radius
        plan = shift_plan(result.actions, N_TAKEN)
    dist = (states[:, :2] - goals).norm(dim=1)
    return {
        "rollouts_per_episode": rollouts,
        "reached": float(reached.float().mean()),
        "final": float((dist < radius).float().mean()),
        "final_dist": round(float(dist.mean()), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scales", default="0.05,0.1,0.2,0.35,0.5,1")
    parser.add_argument("--radius", type=float, default=0.1, help="success radius (env units)")
    parser.add_argument(
        "--match", type=float, default=0.02, help="success within this of CEM's counts as equal"
    )
    parser.add_argument("--planners", default="cem,cem_best,icem,mppi")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    scales = [float(s) for s in args.scales.split(",")]
    out = {"load_average_1min_before": round(os.getloadavg()[0], 2), "setup": vars(args), "curves": {}}
    for name in args.planners.split(","):
        curve = []
        for scale in scales:
            cfg = scaled(name, scale)
            runs = [run_mpc(name, cfg, args.episodes, seed, args.radius) for seed in range(args.seeds)]
            point = {"scale": scale, "config": cfg, "rollouts_per_episode": runs[0]["rollouts_per_episode"]}
            for key in ("reached", "final", "final_dist"):
                point[key] = round(sum(r[key] for r in runs) / len(runs), 4)
            curve.append(point)
        out["curves"][name] = curve
    cem_full = next(p for p in out["curves"]["cem"] if p["scale"] == 1.0)
    ratios = {}
    for name, curve in out["curves"].items():
        ok = [p for p in curve if p["final"] >= cem_full["final"] - args.match]
        if not ok:
            ratios[name] = {"matches_cem": False}
            continue
        cheapest = min(ok, key=lambda p: p["rollouts_per_episode"])
        ratios[name] = {
            "matches_cem": True,
            "rollouts_per_episode": cheapest["rollouts_per_episode"],
            "final": cheapest["final"],
            "cem_rollouts_over_this": round(
                cem_full["rollouts_per_episode"] / cheapest["rollouts_per_episode"], 2
            ),
        }
    out["cem_full_budget"] = {
        k: cem_full[k] for k in ("rollouts_per_episode", "reached", "final", "final_dist")
    }
    out["ratios"] = ratios
    out["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
