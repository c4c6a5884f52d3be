"""Planners against known answers: quadratic costs with a different minimum per start state."""

from __future__ import annotations

import itertools

import pytest
import torch

from wmlab.planning import PLANNERS, make_planner
from wmlab.planning.icem import colored_noise

B, T, A = 3, 5, 2


def quadratic(target: torch.Tensor):
    """cost(actions (B, S, T, A)) = sum of squares to target (B, T, A) -> (B, S); minimum 0 at target."""

    def cost_fn(actions: torch.Tensor) -> torch.Tensor:
        return (actions - target[:, None]).square().sum(dim=(2, 3))

    return cost_fn


def targets(seed: int = 0, smooth: bool = False) -> torch.Tensor:
    """(B, T, A) minima, different per start state; ``smooth``: an offset plus a ramp in time."""
    g = torch.Generator().manual_seed(seed)
    if smooth:
        ramp = torch.linspace(-1, 1, T)[None, :, None]  # (1, T, 1)
        return (torch.rand(B, 1, A, generator=g) * 2 - 1) + 0.3 * torch.randn(B, 1, A, generator=g) * ramp
    return torch.rand(B, T, A, generator=g) * 2 - 1


@pytest.mark.parametrize("name", ["cem", "icem", "mppi"])
def test_sampling_planners_find_each_start_states_minimum(name):
    target = targets(smooth=True)
    result = make_planner(name, seed=1).plan(quadratic(target), torch.zeros(B, T, A))
    assert result.actions.shape == (B, T, A) and result.cost.shape == (B,)
    torch.testing.assert_close(result.actions, target, atol=0.1, rtol=0)
    torch.testing.assert_close(result.cost, quadratic(target)(result.actions[:, None])[:, 0])
    assert (result.trace_best.diff(dim=0) <= 0).all(), "the best-so-far trace must never increase"
    assert result.trace_evaluations[-1] <= result.n_evaluations


def test_cem_defaults_are_dino_wm_and_reach_the_minimum_exactly():
    planner = make_planner("cem")
    assert (planner.samples, planner.topk, planner.opt_steps, planner.var_scale) == (300, 30, 30, 1.0)
    target = targets(1)
    result = planner.plan(quadratic(target), torch.zeros(B, T, A))
    torch.testing.assert_close(result.actions, target, atol=1e-4, rtol=0)
    assert result.n_evaluations == 300 * 30 + 1  # + the final mean's own evaluation
    assert result.trace_best.shape == (30, B)


def test_cem_sample_zero_is_the_mean_and_warm_start_is_respected():
    seen = []
    init = torch.randn(B, T, A, generator=torch.Generator().manual_seed(5))

    def costs(actions):
        return actions.square().sum(dim=(2, 3))

    def cost_fn(actions):
        seen.append(actions.clone())
        return costs(actions)

    result = make_planner("cem", samples=20, topk=5, opt_steps=3).plan(cost_fn, init)
    assert [c.shape[1] for c in seen] == [20, 20, 20, 1]  # 3 iterations, then the final mean alone
    torch.testing.assert_close(seen[0][:, 0], init)  # iteration 0's mean is the warm start
    for before, after in itertools.pairwise(seen):
        index = costs(before).topk(5, dim=1, largest=False).indices  # (B, 5)
        elites = before.gather(1, index[:, :, None, None].expand(B, 5, T, A))  # (B, 5, T, A)
        torch.testing.assert_close(after[:, 0], elites.mean(dim=1))  # sample 0 = the top-k mean
    torch.testing.assert_close(result.actions, seen[-1][:, 0])  # DINO-WM returns the final mean


def test_warm_start_at_the_minimum_keeps_it():
    target = targets(2)
    for name in ("cem", "icem", "mppi"):
        result = make_planner(name, opt_steps=2, select="best").plan(quadratic(target), target.clone())
        assert torch.equal(result.actions, target), name  # the warm start itself is candidate 0
        assert (result.cost == 0).all(), name
    gd = make_planner("gd", opt_steps=5, lr=0.1, action_noise=0.0)
    assert torch.equal(gd.plan(quadratic(target), target.clone()).actions, target)


@pytest.mark.parametrize("optimizer,lr,steps", [("sgd", 0.1, 100), ("adam", 0.1, 200)])
def test_gd_finds_the_minimum_batched(optimizer, lr, steps):
    target = targets(3)
    calls = []

    def cost_fn(actions):
        calls.append(actions.shape)
        return quadratic(target)(actions)

    planner = make_planner("gd", opt_steps=steps, lr=lr, optimizer=optimizer, action_noise=0.0)
    result = planner.plan(cost_fn, torch.zeros(B, T, A))
    torch.testing.assert_close(result.actions, target, atol=1e-2, rtol=0)
    assert len(calls) == steps and set(calls) == {(B, 1, T, A)}  # one batched call per step
    assert result.n_evaluations == steps


def test_gd_dino_wm_defaults_and_cold_steps_start_random():
    planner = make_planner("gd")
    assert (planner.opt_steps, planner.lr, planner.optimizer, planner.action_noise) == (
        1000,
        1.0,
        "sgd",
        0.003,
    )
    first = []

    def cost_fn(actions):
        first.append(actions.detach().clone())
        return actions.square().sum(dim=(2, 3))

    init = torch.zeros(B, T, A)
    init[:, :-1] = 0.5  # a shifted warm start: its new last step is zero
    make_planner("gd", opt_steps=1).plan(cost_fn, init)
    torch.testing.assert_close(first[0][:, 0, :-1], init[:, :-1])  # warm steps kept
    assert (first[0][:, 0, -1] != 0).all()  # the cold step starts at randn


def test_mppi_improves_a_known_cost_monotonically():
    target = targets(4)
    means = []

    def cost_fn(actions):
        costs = quadratic(target)(actions)
        means.append(costs[:, 0])  # sample 0 is the current mean
        return costs

    make_planner("mppi", samples=100, opt_steps=15, seed=0).plan(cost_fn, torch.zeros(B, T, A))
    means = torch.stack(means)  # (iterations + 1, B): the last row is the final mean's evaluation
    assert (means.diff(dim=0) <= 1e-6).all(), f"the mean's cost went up: {means[:, 0].tolist()}"
    assert (means[-1] < 0.01 * means[0]).all()
    # classic MPPI (fixed sigma) improves too, if less sharply
    fixed = make_planner("mppi", samples=100, opt_steps=15, adapt_std=False, noise_sigma=0.3)
    assert (fixed.plan(quadratic(target), torch.zeros(B, T, A)).cost < 0.1 * means[0]).all()


def test_icem_matches_cem_with_a_third_of_the_evaluations():
    """DINO-WM's PointMaze CEM (300 x 10) and iCEM's defaults both cut the cost to 1% of the start's;
    iCEM needs <= 35% of the evaluations, and CEM cut to iCEM's budget does worse."""
    for seed in (0, 1):
        target = targets(seed, smooth=True)
        cost_fn, init = quadratic(target), torch.zeros(B, T, A)
        start = cost_fn(init[:, None])[:, 0]  # (B,)
        cem = make_planner("cem", opt_steps=10, seed=seed).plan(cost_fn, init)
        icem = make_planner("icem", seed=seed).plan(cost_fn, init)
        cem_same = make_planner("cem", opt_steps=10, seed=seed).plan(cost_fn, init, budget=icem.n_evaluations)
        assert (cem.cost < 0.01 * start).all() and (icem.cost < 0.01 * start).all(), (cem.cost, icem.cost)
        assert icem.n_evaluations <= 0.35 * cem.n_evaluations, (icem.n_evaluations, cem.n_evaluations)
        assert cem_same.n_evaluations == icem.n_evaluations
        assert icem.cost.mean() < cem_same.cost.mean(), (icem.cost, cem_same.cost)


def test_colored_noise_has_unit_variance_and_beta_controls_smoothness():
    g = torch.Generator().manual_seed(0)
    white = colored_noise((20000, 6, 1), 0.0, g)[..., 0]  # (n, T)
    torch.testing.assert_close(torch.cov(white.T), torch.eye(6), atol=0.05, rtol=0)
    red = colored_noise((20000, 6, 1), 2.0, g)[..., 0]
    torch.testing.assert_close(red.var(dim=0), torch.ones(6), atol=0.05, rtol=0)
    assert torch.corrcoef(red.T)[0, 1] > 0.3  # neighbouring steps move together
    assert torch.corrcoef(white.T)[0, 1].abs() < 0.05


@pytest.mark.parametrize("name", sorted(PLANNERS))
def test_same_seed_same_plan_and_generator_override(name):
    kw = {"opt_steps": 3} | ({"samples": 16, "topk": 4} if name in ("cem", "icem") else {})
    kw |= {"samples": 16} if name == "mppi" else {}
    target, init = targets(5), torch.zeros(B, T, A)
    a = make_planner(name, seed=7, **kw).plan(quadratic(target), init)
    b = make_planner(name, seed=7, **kw).plan(quadratic(target), init)
    assert torch.equal(a.actions, b.actions) and torch.equal(a.cost, b.cost)
    planner = make_planner(name, seed=7, **kw)
    c = planner.plan(quadratic(target), init, generator=torch.Generator().manual_seed(123))
    d = planner.plan(quadratic(target), init, generator=torch.Generator().manual_seed(123))
    assert torch.equal(c.actions, d.actions)
    assert not torch.equal(a.actions, c.actions)


@pytest.mark.parametrize("name", ["cem", "icem", "mppi", "gd"])
def test_budget_caps_evaluations_exactly(name):
    target = targets(6)
    result = make_planner(name, seed=0).plan(quadratic(target), torch.zeros(B, T, A), budget=250)
    assert result.n_evaluations == 250
    assert int(result.trace_evaluations[-1]) <= 250


def test_bad_input_errors_are_clear():
    with pytest.raises(ValueError, match=r"unknown planner 'cme'.*cem"):
        make_planner("cme")
    with pytest.raises(TypeError, match="unknown config keys \\['sample'\\]"):
        make_planner("cem", sample=10)
    with pytest.raises(ValueError, match="init must be a \\(B, T, A\\)"):
        make_planner("cem").plan(lambda a: a.sum((2, 3)), torch.zeros(T, A))
    with pytest.raises(ValueError, match="horizon=5"):
        make_planner("cem", horizon=5).plan(lambda a: a.sum((2, 3)), torch.zeros(B, 4, A))

    def nan_cost(actions):
        c = actions.square().sum(dim=(2, 3))
        c[1, 3] = float("nan")
        return c

    with pytest.raises(FloatingPointError, match=r"NaN/inf costs .*start state 1, candidate 3"):
        make_planner("cem", samples=8, topk=2).plan(nan_cost, torch.zeros(B, T, A))
    with pytest.raises(ValueError, match="returned shape \\(3, 8, 5\\)"):
        make_planner("cem", samples=8, topk=2).plan(lambda a: a.sum(-1), torch.zeros(B, T, A))
    with pytest.raises(RuntimeError, match="does not depend differentiably"):
        make_planner("gd", opt_steps=1).plan(lambda a: a.detach().sum((2, 3)), torch.zeros(B, T, A))
