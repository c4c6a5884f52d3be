"""Planning that fits a memory budget: chunked == unchunked costs, the chunk follows the budget, and
the per-sequence estimate bounds the measured peak (no full-size attention scores materialised)."""

from __future__ import annotations

import pytest
import torch

from wmlab.models.world_model import LatentWorldModel, WorldModelConfig
from wmlab.planning.memory import auto_chunk, default_budget, rollout_bytes_per_sequence
from wmlab.planning.objectives import Objective, rollout_cost_fn


def model_and_inputs(B=3, n=1, N=4, Dv=8, pred=None, seed=0):
    torch.manual_seed(seed)
    cfg = WorldModelConfig(
        visual_dim=Dv, num_visual_tokens=N, action_dim=3, proprio_dim=2, action_emb_dim=4, proprio_emb_dim=5,
        predictor=pred or dict(depth=2, heads=2, dim_head=8, mlp_dim=32, dropout=0.1),
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    inputs = (torch.randn(B, n, N, Dv, generator=g), torch.randn(B, n, 2, generator=g),
              torch.randn(B, N, Dv, generator=g), torch.randn(B, 2, generator=g))  # fmt: skip
    return LatentWorldModel(cfg).eval(), inputs


@pytest.mark.parametrize("n", [1, 2])
def test_chunks_spanning_episodes_give_the_unchunked_costs(n):
    model, (ov, op, gv, gp) = model_and_inputs(n=n)
    past = torch.randn(3, n - 1, 3) if n > 1 else None
    actions = torch.randn(3, 5, 4, 3)  # (B, S, T, A): 15 rows
    obj = Objective("all", alpha=0.5)
    with torch.no_grad():
        whole = rollout_cost_fn(model, ov, op, gv, gp, obj, chunk=10**6, past_actions=past)(actions)
        for rows in (1, 4, 7, 15):  # 4 and 7 split episodes mid-way; 15 = one call
            cost_fn = rollout_cost_fn(model, ov, op, gv, gp, obj, chunk=rows, past_actions=past)
            torch.testing.assert_close(cost_fn(actions), whole, atol=1e-6, rtol=1e-6)
            assert cost_fn.last_chunk == rows
        # auto under a budget of ~3 sequences: chunked, same costs
        per_row = rollout_bytes_per_sequence(model.cfg, n, 4)
        cost_fn = rollout_cost_fn(
            model, ov, op, gv, gp, obj, past_actions=past, memory_budget=3 * per_row + 1
        )
        torch.testing.assert_close(cost_fn(actions), whole, atol=1e-6, rtol=1e-6)
        assert cost_fn.last_chunk == 3


def test_gradients_through_chunks_equal_unchunked():
    model, (ov, op, gv, gp) = model_and_inputs()
    actions = torch.randn(3, 4, 3, 3, requires_grad=True)
    grads = []
    for rows in (12, 5):
        cost = rollout_cost_fn(model, ov, op, gv, gp, Objective(), chunk=rows)(actions).sum()
        grads.append(torch.autograd.grad(cost, actions)[0])
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_the_chunk_shrinks_with_the_budget_and_grad_needs_more():
    model, _ = model_and_inputs()
    per_row = rollout_bytes_per_sequence(model.cfg, 1, 5)
    chunks = [auto_chunk(model.cfg, 1, 5, 15000, budget=k * per_row) for k in (10000, 1000, 100, 10, 1)]
    assert chunks == [10000, 1000, 100, 10, 1]
    assert auto_chunk(model.cfg, 1, 5, 15000, budget=per_row // 2) == 1  # never below one sequence
    assert auto_chunk(model.cfg, 1, 5, 20, budget=10**15) == 20  # never above all rows
    assert rollout_bytes_per_sequence(model.cfg, 1, 5, grad=True) > 3 * per_row
    budget = default_budget("cpu")
    assert 0 < budget <= 8 * 2**30
    with pytest.raises(ValueError, match="memory budget"):
        auto_chunk(model.cfg, 1, 5, 10, budget=0)
    with pytest.raises(ValueError, match="chunk must be"):
        rollout_cost_fn(model, *model_and_inputs()[1], Objective(), chunk=0)


def _peak_bytes(fn) -> int:
    """Peak of live CPU tensor bytes during fn(), from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("grad", [False, True])
def test_estimate_bounds_the_measured_peak_without_attention_scores(grad):
    """64 tokens x 3 frames, 8 heads: the attention scores alone (8 x 192 x 192 x 4 B = 1.2 MB per
    sequence and call, kept for every block and call under autograd) would exceed the estimate, which
    leaves them out; the measured peak per sequence stays
    under the estimate, and the estimate is not wasteful (< 3x the measurement)."""
    pred = dict(depth=2, heads=8, dim_head=8, mlp_dim=64, dropout=0.0)
    model, (ov, op, _gv, _gp) = model_and_inputs(B=1, N=64, Dv=16, pred=pred)
    T = 5
    estimate = rollout_bytes_per_sequence(model.cfg, 1, T, grad=grad)
    L = model.cfg.num_hist * model.cfg.num_tokens
    scores = pred["heads"] * L * L * 4
    # under autograd a materialising attention would keep every block's scores of every call
    assert estimate < (scores * (T + 1) * pred["depth"] if grad else scores)
    peaks = {}
    for S in (4, 8):
        actions = torch.randn(1, S, T, 3, requires_grad=grad)

        def run(actions=actions):
            with torch.set_grad_enabled(grad):
                out = model.rollout(ov, op, actions)
                if grad:
                    out["visual"][:, :, -1].square().mean().backward()

        peaks[S] = _peak_bytes(run)
    per_sequence = (peaks[8] - peaks[4]) / 4
    assert 0 < per_sequence <= estimate < 3 * per_sequence, (per_sequence, estimate)
