"""MPPI (model-predictive path integral control), batched over start states.

Per iteration: draw ``samples`` sequences mu + sigma * eps (sample 0 is mu itself), score them in one
cost_fn call, and move mu to their softmax-weighted average, weights exp(-(c - c_min) / lambda). The
shift by the per-start minimum only avoids overflow; it leaves the weights unchanged. With
``normalize_costs`` (default) lambda is in units of the per-start cost std of the iteration, so one
temperature works whatever the objective's scale (latent MSE of one encoder is not another's).
``adapt_std`` (default) also sets sigma to the weighted std (as TD-MPC's MPPI does), so the search
narrows; ``adapt_std=False`` is classic MPPI with a fixed ``noise_sigma``.

Defaults (``conf/planner/mppi.yaml``): samples 300, opt_steps 30, horizon 5 (CEM's budget), lambda
0.3 cost stds, noise_sigma 1 (CEM's var_scale). Not DINO-WM's (it has no MPPI): lambda was picked on
quadratic costs (0.05-0.1 collapse sigma before reaching the minimum, 1.0 converges slower).
Returned: the final mean (``select="mean"``, one more evaluation) or the cheapest sequence evaluated.
"""

from __future__ import annotations

import torch

from wmlab.planning.base import CostFn, Planner, Tracker, check_budget, check_horizon, check_positive


class MPPI(Planner):
    """MPPI. Config keys = constructor arguments (``conf/planner/mppi.yaml``)."""

    name = "mppi"

    def __init__(
        self,
        samples: int = 300,
        opt_steps: int = 30,
        temperature: float = 0.3,
        noise_sigma: float = 1.0,
        normalize_costs: bool = True,
        adapt_std: bool = True,
        min_std: float = 0.0,
        horizon: int | None = None,
        select: str = "mean",
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        check_positive(self.name, samples=samples, opt_steps=opt_steps, temperature=temperature,
                       noise_sigma=noise_sigma)  # fmt: skip
        if samples < 2:
            raise ValueError(f"mppi: samples must be >= 2, got {samples}")
        if select not in ("mean", "best"):
            raise ValueError(f"mppi: select must be 'mean' or 'best', got {select!r}")
        self.samples, self.opt_steps, self.temperature = int(samples), int(opt_steps), float(temperature)
        self.noise_sigma, self.normalize_costs, self.adapt_std = (
            float(noise_sigma),
            normalize_costs,
            adapt_std,
        )
        self.min_std, self.horizon, self.select = float(min_std), horizon, select

    def weights(self, costs: torch.Tensor) -> torch.Tensor:
        """costs (B, S) -> softmax weights (B, S) over candidates, per start state."""
        shifted = costs - costs.min(dim=1, keepdim=True).values  # (B, S), >= 0
        if self.normalize_costs:
            shifted = shifted / costs.std(dim=1, keepdim=True).clamp_min(1e-12)
        return torch.softmax(-shifted / self.temperature, dim=1)

    def _plan(self, cost_fn: CostFn, init: torch.Tensor, budget: int | None, gen: torch.Generator):
        B, T, A = init.shape
        check_horizon(self, T)
        reserve = 1 if self.select == "mean" else 0
        budget = check_budget(budget, 2 + reserve, self.name)
        mu = init.detach().clone()  # (B, T, A)
        sigma = torch.full_like(mu, self.noise_sigma)  # (B, T, A)
        tracker = Tracker(init)
        with torch.no_grad():
            for _ in range(self.opt_steps):
                S = self.samples
                if budget is not None:
                    S = min(S, budget - reserve - tracker.n_evaluations)
                    if S < 2:
                        break
                noise = torch.randn(B, S, T, A, generator=gen, device=mu.device, dtype=mu.dtype)
                candidates = mu[:, None] + sigma[:, None] * noise  # (B, S, T, A)
                candidates[:, 0] = mu
                costs = self.evaluate(cost_fn, candidates)  # (B, S)
                tracker.update(candidates, costs)
                w = self.weights(costs.to(mu.dtype))[:, :, None, None]  # (B, S, 1, 1)
                mu = (w * candidates).sum(dim=1)  # (B, T, A)
                if self.adapt_std:
                    var = (w * (candidates - mu[:, None]) ** 2).sum(dim=1)  # (B, T, A)
                    sigma = var.sqrt().clamp_min(self.min_std)
            if self.select == "best":
                return tracker.result(final_std=sigma)
            cost = self.evaluate(cost_fn, mu[:, None])  # (B, 1)
            tracker.update(mu[:, None], cost, record=False)
        return tracker.result(actions=mu, cost=cost[:, 0], final_std=sigma)
