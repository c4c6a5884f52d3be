"""CEM, as in DINO-WM's ``planning/cem.py``, batched over start states.

Per iteration, for each of B start states: draw ``samples`` sequences from N(mu, sigma^2) (sample 0
is mu itself), score them in one cost_fn call, and set mu / sigma to the mean / std (unbiased, as
``torch.std``) of the ``topk`` cheapest. mu starts at ``init`` (DINO-WM: zeros), sigma at
``var_scale``. DINO-WM's defaults (``conf/planner/cem.yaml``): samples 300, topk 30, opt_steps 30,
horizon 5, var_scale 1; its PointMaze MPC uses opt_steps 10.

DINO-WM returns the final mean (``select="mean"``), which no iteration has scored, so its cost takes
one more evaluation (counted in ``n_evaluations``). ``select="best"`` returns the cheapest sequence
evaluated instead. DINO-WM also scores every iteration's plan in the real env and stops once all
envs succeed; a planner here sees only cost_fn, so that early exit belongs to the MPC loop.
"""

from __future__ import annotations

import torch

from wmlab.planning.base import (
    CostFn,
    Planner,
    Tracker,
    check_budget,
    check_horizon,
    check_positive,
    gather_sequences,
)

SELECT = ("mean", "best")


class CEM(Planner):
    """Cross-entropy method. Config keys = constructor arguments (``conf/planner/cem.yaml``)."""

    name = "cem"

    def __init__(
        self,
        samples: int = 300,
        topk: int = 30,
        opt_steps: int = 30,
        var_scale: float = 1.0,
        horizon: int | None = None,
        select: str = "mean",
        min_std: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        check_positive(self.name, samples=samples, topk=topk, opt_steps=opt_steps, var_scale=var_scale)
        if topk < 2 or topk > samples:
            raise ValueError(
                f"cem: need 2 <= topk <= samples (a std needs 2 elites), got {topk=}, {samples=}"
            )
        if select not in SELECT:
            raise ValueError(f"cem: select must be one of {SELECT}, got {select!r}")
        self.samples, self.topk, self.opt_steps = int(samples), int(topk), int(opt_steps)
        self.var_scale, self.horizon, self.select, self.min_std = float(var_scale), horizon, select, min_std

    def _plan(self, cost_fn: CostFn, init: torch.Tensor, budget: int | None, gen: torch.Generator):
        B, T, A = init.shape
        check_horizon(self, T)
        reserve = 1 if self.select == "mean" else 0  # the final mean's own evaluation
        budget = check_budget(budget, 2 + reserve, self.name)
        mu = init.detach().clone()  # (B, T, A)
        sigma = torch.full_like(mu, self.var_scale)  # (B, T, A)
        tracker = Tracker(init)
        with torch.no_grad():
            for _ in range(self.opt_steps):
                S = self.samples
                if budget is not None:  # the last iteration shrinks to land exactly on the budget
                    S = min(S, budget - reserve - tracker.n_evaluations)
                    if S < 2:
                        break
                noise = torch.randn(B, S, T, A, generator=gen, device=mu.device, dtype=mu.dtype)
                candidates = mu[:, None] + sigma[:, None] * noise  # (B, S, T, A)
                candidates[:, 0] = mu
                costs = self.evaluate(cost_fn, candidates)  # (B, S)
                tracker.update(candidates, costs)
                k = min(self.topk, S)
                elites = gather_sequences(
                    candidates, costs.topk(k, dim=1, largest=False).indices
                )  # (B,k,T,A)
                mu = elites.mean(dim=1)  # (B, T, A)
                sigma = elites.std(dim=1).clamp_min(self.min_std)  # (B, T, A)
            if self.select == "best":
                return tracker.result(final_std=sigma)
            cost = self.evaluate(cost_fn, mu[:, None])  # (B, 1)
            tracker.update(mu[:, None], cost, record=False)
        return tracker.result(actions=mu, cost=cost[:, 0], final_std=sigma)
