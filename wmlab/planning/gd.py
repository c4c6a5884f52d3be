"""Gradient descent on the action sequence through the world model (DINO-WM's ``planning/gd.py``).

Each step: cost = cost_fn(actions) in one batched call, the gradient of the summed cost with respect to
the actions only (``torch.autograd.grad``, so no weight gradients are computed), an optimiser step, then
Gaussian ``action_noise`` added to the actions (DINO-WM's exploration). Summing over the B start states
and ``samples`` parallel sequences keeps their gradients independent (each cost depends only on its
own sequence), so SGD and Adam behave per sequence exactly as if run one at a time.

DINO-WM's defaults (``conf/planner/gd.yaml``): SGD, lr 1, 1000 steps, action_noise 0.003, and a
``randn`` initial plan. Here ``init`` is respected for warm starts: every time step of ``init`` that is
all zeros (a cold start, or the new tail step an MPC loop appends to a shifted plan) starts at
``init_std * randn``, as DINO-WM does for the steps it has no warm start for; non-zero steps start
exactly at ``init``. ``init_std=0`` starts at ``init`` everywhere.

Returned: the cheapest sequence evaluated (DINO-WM returns the last iterate, which no step has scored;
with noise and lr 1 the best evaluated one is never worse). Each step costs ``samples`` evaluations,
each a forward and a backward pass.
"""

from __future__ import annotations

import torch

from wmlab.integrity import NonFiniteError
from wmlab.planning.base import CostFn, Planner, Tracker, check_budget, check_horizon, check_positive

OPTIMIZERS = ("sgd", "adam")


class GD(Planner):
    """Gradient-descent planner. Config keys = constructor arguments (``conf/planner/gd.yaml``)."""

    name = "gd"
    needs_grad = True

    def __init__(
        self,
        opt_steps: int = 1000,
        lr: float = 1.0,
        optimizer: str = "sgd",
        action_noise: float = 0.003,
        init_std: float = 1.0,
        samples: int = 1,
        horizon: int | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        check_positive(self.name, opt_steps=opt_steps, lr=lr, samples=samples)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"gd: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if action_noise < 0 or init_std < 0:
            raise ValueError(f"gd: action_noise and init_std must be >= 0, got {action_noise=}, {init_std=}")
        self.opt_steps, self.lr, self.optimizer = int(opt_steps), float(lr), optimizer
        self.action_noise, self.init_std, self.samples = float(action_noise), float(init_std), int(samples)
        self.horizon, self.betas = horizon, tuple(betas)

    def _plan(self, cost_fn: CostFn, init: torch.Tensor, budget: int | None, gen: torch.Generator):
        B, T, A = init.shape
        check_horizon(self, T)
        S = self.samples
        budget = check_budget(budget, S, self.name)
        steps = self.opt_steps if budget is None else min(self.opt_steps, budget // S)
        start = init.detach()[:, None].expand(B, S, T, A).clone()  # (B, S, T, A)
        cold = (init.detach() == 0).all(dim=-1)[:, None, :, None].expand(B, S, T, A)  # (B, S, T, A)
        start = torch.where(cold, self.init_std * self._randn(start, gen), start)
        actions = start.requires_grad_(True)
        if self.optimizer == "sgd":
            opt = torch.optim.SGD([actions], lr=self.lr)
        else:
            opt = torch.optim.Adam([actions], lr=self.lr, betas=self.betas)
        tracker = Tracker(init)
        for _ in range(steps):
            with torch.enable_grad():
                costs = self.evaluate(cost_fn, actions)  # (B, S)
                if not costs.requires_grad:
                    raise RuntimeError(
                        "gd: cost_fn's output does not depend differentiably on the actions (no grad_fn); "
                        "do not wrap the rollout in torch.no_grad()/inference_mode for gradient planning"
                    )
                (grad,) = torch.autograd.grad(costs.sum(), actions)
            tracker.update(actions, costs)
            if not bool(torch.isfinite(grad).all()):
                raise NonFiniteError("gd: the cost's gradient has NaN/inf entries; try a smaller lr")
            actions.grad = grad
            opt.step()
            if self.action_noise > 0:
                with torch.no_grad():
                    actions.add_(self.action_noise * self._randn(actions, gen))
        return tracker.result()

    @staticmethod
    def _randn(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)
