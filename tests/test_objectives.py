"""Objectives against hand-computed numbers; rollout_cost_fn with a tiny world model."""

from __future__ import annotations

import pytest
import torch

from wmlab.models.world_model import LatentWorldModel, WorldModelConfig
from wmlab.planning import make_planner
from wmlab.planning.objectives import Objective, rollout_cost_fn


def frames(values, N=2, D=3):
    """pred_visual (1, 1, T, N, D) whose frame t is filled with values[t]."""
    v = torch.tensor(values, dtype=torch.float32)
    return v[None, None, :, None, None].expand(1, 1, len(values), N, D).clone()


def test_last_mse_and_l1_by_hand():
    pred = frames([5.0, 3.0])  # frames of 5s then 3s, goal all 1s
    goal = torch.ones(1, 2, 3)
    proprio, goal_p = torch.zeros(1, 1, 2, 4), torch.zeros(1, 4)
    assert Objective("last", "mse")(pred, proprio, goal, goal_p).item() == pytest.approx(4.0)  # (3-1)^2
    assert Objective("last", "l1")(pred, proprio, goal, goal_p).item() == pytest.approx(2.0)


def test_all_weights_frames_by_base_power():
    pred = frames([3.0, 2.0, 5.0])  # squared distances to 1: 4, 1, 16
    goal = torch.ones(1, 2, 3)
    proprio, goal_p = torch.zeros(1, 1, 3, 4), torch.zeros(1, 4)
    # base 2: weights 1, 2, 4 over 7 -> (4 + 2 + 64) / 7 = 10
    assert Objective("all", "mse", base=2.0)(pred, proprio, goal, goal_p).item() == pytest.approx(10.0)
    # base 1: plain mean (4 + 1 + 16) / 3 = 7;  L1, base 3: (2 + 3*1 + 9*4) / 13
    assert Objective("all", "mse", base=1.0)(pred, proprio, goal, goal_p).item() == pytest.approx(7.0)
    assert Objective("all", "l1", base=3.0)(pred, proprio, goal, goal_p).item() == pytest.approx(41 / 13)


def test_alpha_adds_the_proprio_distance():
    pred, goal = frames([1.0, 1.0]), torch.ones(1, 2, 3)  # visual distance 0
    proprio = torch.tensor([[[[0.0, 0.0], [2.0, 4.0]]]])  # (1, 1, 2, 2): last frame (2, 4)
    goal_p = torch.tensor([[1.0, 1.0]])
    assert Objective("last", "mse", alpha=0.0)(pred, proprio, goal, goal_p).item() == 0.0
    # alpha 0.5 * mean((2-1)^2, (4-1)^2) = 0.5 * 5
    assert Objective("last", "mse", alpha=0.5)(pred, proprio, goal, goal_p).item() == pytest.approx(2.5)
    assert Objective("last", "l1", alpha=2.0)(pred, proprio, goal, goal_p).item() == pytest.approx(4.0)


def test_batched_shapes_and_errors():
    obj = Objective()
    out = obj(torch.randn(2, 7, 4, 3, 5), torch.randn(2, 7, 4, 6), torch.randn(2, 3, 5), torch.randn(2, 6))
    assert out.shape == (2, 7)
    with pytest.raises(ValueError, match="mode must be one of"):
        Objective(mode="first")
    with pytest.raises(ValueError, match="metric must be one of"):
        Objective(metric="l2")
    with pytest.raises(AssertionError, match="goal_visual \\(2, 4, 5\\) must be"):
        obj(torch.randn(2, 7, 4, 3, 5), torch.randn(2, 7, 4, 6), torch.randn(2, 4, 5), torch.randn(2, 6))


def tiny_model(seed: int = 0, num_hist: int = 3) -> LatentWorldModel:
    torch.manual_seed(seed)
    cfg = WorldModelConfig(
        visual_dim=8, num_visual_tokens=4, action_dim=3, proprio_dim=2, action_emb_dim=4, proprio_emb_dim=5,
        num_hist=num_hist, predictor=dict(depth=2, heads=2, dim_head=8, mlp_dim=32, dropout=0.1),
    )  # fmt: skip
    return LatentWorldModel(cfg).eval()


def inputs(B=2, n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, n, 4, 8, generator=g), torch.randn(B, n, 2, generator=g),
            torch.randn(B, 4, 8, generator=g), torch.randn(B, 2, generator=g))  # fmt: skip


def test_rollout_cost_fn_scores_the_predicted_frames():
    model = tiny_model()
    obs_v, obs_p, goal_v, goal_p = inputs()
    actions = torch.randn(2, 5, 4, 3)  # (B, S, T, A)
    objective = Objective("all", "mse", alpha=1.0)
    with torch.no_grad():
        costs = rollout_cost_fn(model, obs_v, obs_p, goal_v, goal_p, objective)(actions)
        out = model.rollout(obs_v, obs_p, actions)  # (B, S, T+1, ...): frame 0 is the observed one
        expected = objective(
            out["visual"][:, :, 1:], out["proprio"][:, :, 1:], goal_v, model.proprio_encoder(goal_p)
        )
    assert costs.shape == (2, 5)
    torch.testing.assert_close(costs, expected)
    # each start state's costs come from its own observation: swapping the starts swaps the costs
    swap = [1, 0]
    with torch.no_grad():
        swapped = rollout_cost_fn(model, obs_v[swap], obs_p[swap], goal_v[swap], goal_p[swap], objective)(
            actions[swap]
        )
    torch.testing.assert_close(swapped, costs[swap])


def test_chunking_equals_unchunked_and_history_needs_past_actions():
    model = tiny_model()
    obs_v, obs_p, goal_v, goal_p = inputs(n=2)
    past = torch.randn(2, 1, 3)
    actions = torch.randn(2, 7, 3, 3)
    obj = Objective("last")
    with torch.no_grad():
        whole = rollout_cost_fn(model, obs_v, obs_p, goal_v, goal_p, obj, past_actions=past)(actions)
        chunked = rollout_cost_fn(model, obs_v, obs_p, goal_v, goal_p, obj, chunk=3, past_actions=past)(
            actions
        )
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="need past_actions"):
        rollout_cost_fn(model, obs_v, obs_p, goal_v, goal_p, obj)
    with pytest.raises(ValueError, match=r"model\.eval"):
        rollout_cost_fn(model.train(), obs_v, obs_p, goal_v, goal_p, obj, past_actions=past)


def test_planners_run_through_the_world_model():
    """CEM and GD plan against a tiny world model: cost goes down, shapes are (B, T, A)."""
    model = tiny_model()
    obs_v, obs_p, goal_v, goal_p = inputs()
    cost_fn = rollout_cost_fn(model, obs_v, obs_p, goal_v, goal_p, Objective())
    init = torch.zeros(2, 4, 3)
    with torch.no_grad():
        start = cost_fn(init[:, None])[:, 0]
    cem = make_planner("cem", samples=32, topk=4, opt_steps=3).plan(cost_fn, init)
    gd = make_planner("gd", opt_steps=10, lr=0.1, init_std=0.0).plan(cost_fn, init)
    for result in (cem, gd):
        assert result.actions.shape == (2, 4, 3)
        assert (result.cost <= start + 1e-6).all()
    assert (gd.trace_best[-1] < start).all()  # gradients through the model reduce the cost


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("concat_dim,predict_delta", [(1, False), (0, False), (1, True)])
def test_fast_rollout_equals_the_reference_path(n, concat_dim, predict_delta):
    """The KV-cached / last-frame-only rollout (eval default) equals the reference rollout, values and
    gradients, for histories shorter than, equal to and longer than num_hist."""
    torch.manual_seed(1)
    dim = 8 if concat_dim == 0 else 4
    cfg = WorldModelConfig(
        visual_dim=8, num_visual_tokens=4, action_dim=3, proprio_dim=2, action_emb_dim=dim,
        proprio_emb_dim=dim, num_hist=3, concat_dim=concat_dim, predict_delta=predict_delta,
        predictor=dict(depth=2, heads=2, dim_head=8, mlp_dim=32, dropout=0.1),
    )  # fmt: skip
    model = LatentWorldModel(cfg).eval()
    if predict_delta:  # its head starts at zero; make the predictor's output count
        torch.nn.init.normal_(model.delta_head.weight, std=0.3)
    visual, proprio = torch.randn(2, n, 4, 8), torch.randn(2, n, 2)
    actions = torch.randn(2, 3, n + 4, 3, requires_grad=True)  # (B, S, n + t, A)
    fast = model.rollout(visual, proprio, actions)
    ref = model.rollout(visual, proprio, actions, fast=False)
    for key in ("z", "visual", "proprio"):
        torch.testing.assert_close(fast[key], ref[key], atol=1e-5, rtol=1e-5)
    (g_fast,) = torch.autograd.grad(fast["visual"][:, :, -1].square().sum(), actions)
    (g_ref,) = torch.autograd.grad(ref["visual"][:, :, -1].square().sum(), actions)
    # gradients sum many more rounded terms (and predict_delta's random norm weights amplify them)
    torch.testing.assert_close(g_fast, g_ref, atol=1e-4, rtol=1e-4)
