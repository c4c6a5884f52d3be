"""The planner contract (C): a planner sees nothing but a batched cost function.

    result = planner.plan(cost_fn, init, budget=None)

``cost_fn(actions (B, S, T, A)) -> costs (B, S)`` scores S candidate action sequences for each of B
start states in one call (one batched world-model rollout). ``init`` (B, T, A) is the starting mean or
warm start in normalised model-step action space (zeros for a cold start); it fixes B, T and A.
``budget`` optionally caps the candidate sequences evaluated per start state (``n_evaluations``), so
sample-efficiency curves can compare planners at equal cost. Every planner is batched over B (one
cost_fn call per iteration, never a loop over B) and draws all its noise from one ``torch.Generator``
seeded at construction (or passed to ``plan``), so a seed reproduces a plan exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from wmlab.integrity import NonFiniteError

CostFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PlanResult:
    """What ``plan`` returns.

    actions: (B, T, A) the chosen plan per start state (each planner documents which: CEM's final
        mean as in DINO-WM, or the lowest-cost sequence it evaluated).
    cost: (B,) cost_fn's value of ``actions``.
    n_evaluations: candidate sequences evaluated per start state (cost_fn rows; a GD step is one
        forward + backward per sequence and counts as one).
    trace_best: (I, B) lowest cost evaluated so far after each iteration (non-increasing).
    trace_mean: (I, B) mean cost of each iteration's candidates.
    trace_evaluations: (I,) cumulative ``n_evaluations`` after each iteration (the x axis of a
        sample-efficiency curve).
    """

    actions: torch.Tensor
    cost: torch.Tensor
    n_evaluations: int
    trace_best: torch.Tensor
    trace_mean: torch.Tensor
    trace_evaluations: torch.Tensor
    info: dict = field(default_factory=dict)

    @property
    def iterations(self) -> int:
        return int(self.trace_evaluations.shape[0])


def check_costs(costs: torch.Tensor, B: int, S: int, who: str) -> torch.Tensor:
    """Validate cost_fn's output: a (B, S) tensor of finite numbers, else a clear error."""
    if not isinstance(costs, torch.Tensor):
        raise TypeError(f"{who}: cost_fn must return a torch.Tensor (B, S), got {type(costs).__name__}")
    if tuple(costs.shape) != (B, S):
        raise ValueError(f"{who}: cost_fn returned shape {tuple(costs.shape)}, expected (B, S) = ({B}, {S})")
    finite = torch.isfinite(costs)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise NonFiniteError(
            f"{who}: cost_fn returned {int((~finite).sum())} NaN/inf costs of {B * S} (first at start "
            f"state {bad[0]}, candidate {bad[1]}); check the world model's weights, the normalisation "
            "stats and the objective's inputs"
        )
    return costs


def check_init(init: torch.Tensor, who: str) -> tuple[int, int, int]:
    """init must be a finite (B, T, A) float tensor; returns (B, T, A)."""
    if not isinstance(init, torch.Tensor) or init.ndim != 3:
        shape = tuple(init.shape) if isinstance(init, torch.Tensor) else type(init).__name__
        raise ValueError(f"{who}: init must be a (B, T, A) tensor of starting actions, got {shape}")
    if not init.is_floating_point():
        raise TypeError(f"{who}: init must be a float tensor, got {init.dtype}")
    if not bool(torch.isfinite(init).all()):
        raise ValueError(f"{who}: init contains NaN or inf")
    B, T, A = init.shape
    if min(B, T, A) < 1:
        raise ValueError(f"{who}: init (B, T, A) = {tuple(init.shape)} has an empty dimension")
    return B, T, A


def check_budget(budget: int | None, minimum: int, who: str) -> int | None:
    if budget is None:
        return None
    if int(budget) != budget or budget < minimum:
        raise ValueError(
            f"{who}: budget (evaluations per start state) must be an integer >= {minimum}, got {budget!r}"
        )
    return int(budget)


def check_horizon(planner: Planner, T: int) -> None:
    """A configured horizon must agree with init's T (init is what fixes it)."""
    if planner.horizon is not None and int(planner.horizon) != T:
        raise ValueError(
            f"{planner.name}: init has horizon T={T} but the planner is configured with "
            f"horizon={planner.horizon}; build init as (B, {planner.horizon}, A) or set horizon=null"
        )


def check_positive(who: str, **values) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{who}: {name} must be > 0, got {value!r}")


def gather_sequences(candidates: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """candidates (B, S, T, A), index (B, K) -> (B, K, T, A): per start state, the chosen candidates."""
    B, _S, T, A = candidates.shape
    return torch.gather(candidates, 1, index[:, :, None, None].expand(B, index.shape[1], T, A))


class Tracker:
    """Keeps the lowest-cost sequence seen per start state and the per-iteration trace."""

    def __init__(self, init: torch.Tensor) -> None:
        B = init.shape[0]
        self.best_actions = init.detach().clone()  # (B, T, A)
        self.best_cost = torch.full((B,), float("inf"), dtype=torch.float32, device=init.device)
        self.n_evaluations = 0
        self._best, self._mean, self._evals = [], [], []

    def update(self, candidates: torch.Tensor, costs: torch.Tensor, record: bool = True) -> None:
        """candidates (B, S, T, A), costs (B, S); ``record`` adds one trace row (one iteration)."""
        costs = costs.detach().float()
        low, arg = costs.min(dim=1)  # (B,), (B,)
        better = low < self.best_cost  # (B,)
        chosen = gather_sequences(candidates.detach(), arg[:, None])[:, 0]  # (B, T, A)
        self.best_actions = torch.where(better[:, None, None], chosen, self.best_actions)
        self.best_cost = torch.where(better, low, self.best_cost)
        self.n_evaluations += costs.shape[1]
        if record:
            self._best.append(self.best_cost.clone())
            self._mean.append(costs.mean(dim=1))
            self._evals.append(self.n_evaluations)

    def result(self, actions: torch.Tensor | None = None, cost: torch.Tensor | None = None, **info):
        """The PlanResult; ``actions``/``cost`` default to the best sequence seen."""
        device = self.best_cost.device
        B = self.best_cost.shape[0]
        empty = torch.zeros(0, B, device=device)
        return PlanResult(
            actions=(self.best_actions if actions is None else actions).detach(),
            cost=(self.best_cost if cost is None else cost).detach().float(),
            n_evaluations=self.n_evaluations,
            trace_best=torch.stack(self._best) if self._best else empty,
            trace_mean=torch.stack(self._mean) if self._mean else empty,
            trace_evaluations=torch.tensor(self._evals, dtype=torch.long),
            info=info,
        )


class Planner:
    """Base class: holds the seeded generator; subclasses implement ``_plan``.

    seed: seeds the planner's own torch.Generator (advanced by every ``plan`` call, so an MPC loop
    draws fresh noise each replan while the whole run stays reproducible). ``plan(generator=...)``
    uses a caller's generator instead.
    """

    name = "planner"
    #: True when cost_fn must be differentiable (GD): callers must not wrap plan() in no_grad.
    needs_grad = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self._generator: torch.Generator | None = None

    def generator_for(self, device: torch.device, generator: torch.Generator | None) -> torch.Generator:
        if generator is not None:
            return generator
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def plan(
        self,
        cost_fn: CostFn,
        init: torch.Tensor,
        *,
        budget: int | None = None,
        generator: torch.Generator | None = None,
    ) -> PlanResult:
        """Optimise action sequences against ``cost_fn``.

        cost_fn: actions (B, S, T, A) -> costs (B, S), lower is better (differentiable for GD).
        init: (B, T, A) starting mean / warm start, normalised model-step actions (zeros = cold start).
        budget: at most this many candidate sequences evaluated per start state (None: the config's).
        generator: a torch.Generator to draw noise from instead of the planner's seeded one.
        Returns a PlanResult with actions (B, T, A) and cost (B,).
        """
        check_init(init, self.name)
        return self._plan(cost_fn, init, budget, self.generator_for(init.device, generator))

    def _plan(self, cost_fn: CostFn, init: torch.Tensor, budget: int | None, gen: torch.Generator):
        raise NotImplementedError

    def evaluate(self, cost_fn: CostFn, candidates: torch.Tensor) -> torch.Tensor:
        """One batched cost_fn call on candidates (B, S, T, A), checked -> (B, S)."""
        B, S = candidates.shape[:2]
        return check_costs(cost_fn(candidates), B, S, self.name)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"
