"""precision=auto: lower precision only where measured faster here AND its plans agree with fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wmlab import precision as P
from wmlab.models.world_model import LatentWorldModel, WorldModelConfig


def costs(seed=0, B=2, K=8):
    return torch.rand(B, K, generator=torch.Generator().manual_seed(seed)) * 10  # (B, K)


def test_agreement_same_argmin_near_ties_and_disagreement():
    ref = torch.tensor([[1.0, 2.0, 3.0, 11.0]])  # range 10: tolerance 0.02 -> 0.2 in cost units
    assert P.agreement(ref, ref + 0.05)["agree"]
    tie = P.agreement(torch.tensor([[1.0, 1.1, 5.0, 11.0]]), torch.tensor([[1.15, 1.1, 5.0, 11.0]]))
    assert tie["agree"] and not tie["same_argmin"]  # a near tie may swap: regret 0.01 <= 0.02
    swapped = P.agreement(ref, torch.tensor([[2.5, 2.0, 3.0, 11.0]]))  # picks a 1.0-worse candidate
    assert not swapped["agree"] and swapped["max_regret"] == pytest.approx(0.1)
    drift = P.agreement(ref, ref + torch.tensor([[0.0, 0.0, 0.0, 0.5]]))  # same argmin, cost off by 5%
    assert drift["same_argmin"] and not drift["agree"]


@pytest.mark.parametrize(
    "timings,agrees,expected",
    [
        ({"fp32": 1.0, "bf16": 0.5}, {"bf16": True}, "bf16"),  # 2x faster and agreeing
        ({"fp32": 1.0, "bf16": 3.0}, {"bf16": True}, "fp32"),  # slower (no native bf16)
        ({"fp32": 1.0, "bf16": 0.95}, {"bf16": True}, "fp32"),  # faster, but below MIN_SPEEDUP
        ({"fp32": 1.0, "bf16": 0.5}, {"bf16": False}, "fp32"),  # faster, plans disagree
        ({"fp32": 1.0, "bf16": 0.4, "tf32": 0.6}, {"bf16": False, "tf32": True}, "tf32"),
        ({"fp32": 1.0, "bf16": 0.5}, {}, "fp32"),  # not checked: no lower precision without evidence
    ],
)
def test_decide_needs_speed_and_agreement(timings, agrees, expected):
    checks = {name: {"agree": ok} for name, ok in agrees.items()}
    chosen, reason = P.decide(timings, checks)
    assert chosen == expected, reason


def test_resolve_auto_probes_fastest_first_and_records_evidence():
    calls = []

    def probe(precision):  # bf16 reorders the candidates, tf32 agrees
        calls.append(precision)
        c = costs()
        return c.flip(1) if precision == "bf16" else c + 1e-4

    info = P.resolve_precision("auto", "cpu", probe=probe, timings={"fp32": 1.0, "bf16": 0.4, "tf32": 0.6})
    assert info["chosen"] == "tf32" and calls == ["fp32", "bf16", "tf32"]
    assert not info["agreement"]["bf16"]["agree"] and info["agreement"]["tf32"]["agree"]
    assert info["speedup_over_fp32"] == {"bf16": 2.5, "tf32": pytest.approx(1.667)}
    calls.clear()
    slow = P.resolve_precision("auto", "cpu", probe=probe, timings={"fp32": 1.0, "bf16": 2.0})
    assert slow["chosen"] == "fp32" and calls == []  # slower: never probed
    assert P.resolve_precision("bf16", "cpu")["chosen"] == "bf16"  # explicit: used as is
    with pytest.raises(ValueError, match="precision must be one of"):
        P.resolve_precision("fp16", "cpu")


def test_measure_speed_times_the_models_shapes_once_per_process():
    torch.manual_seed(0)
    cfg = WorldModelConfig(
        visual_dim=8, num_visual_tokens=4, predictor=dict(depth=1, heads=2, dim_head=8, mlp_dim=16)
    )
    shapes = P.block_shapes(cfg)
    assert shapes == {"rows": 12, "dim": 28, "heads": 2, "dim_head": 8, "mlp_dim": 16}
    P._TIMING_CACHE.clear()
    first = P.measure_speed("cpu", shapes)
    assert set(first) == {"fp32", "bf16"} and all(t > 0 for t in first.values())
    assert P.measure_speed("cpu", shapes) == first and len(P._TIMING_CACHE) == 1  # cached


class TokenModel:
    """A PlanningModel stand-in whose 'frames' already are tokens (B, N, Dv)."""

    def __init__(self, world_model):
        self.world_model, self.device, self.frameskip = world_model, torch.device("cpu"), 1

    def encode(self, frames, proprio):
        return torch.as_tensor(frames, dtype=torch.float32), torch.as_tensor(proprio, dtype=torch.float32)

    def env_actions(self, actions):
        return actions.numpy()


def test_policy_auto_precision_measures_once_and_plans_at_the_choice(monkeypatch):
    from wmlab.planning import make_planner
    from wmlab.planning.mpc import Observation
    from wmlab.planning.objectives import Objective
    from wmlab.planning.policies import WorldModelPolicy

    torch.manual_seed(0)
    cfg = WorldModelConfig(
        visual_dim=8, num_visual_tokens=4, action_dim=3, proprio_dim=2,
        predictor=dict(depth=2, heads=2, dim_head=8, mlp_dim=32),
    )  # fmt: skip
    model = TokenModel(LatentWorldModel(cfg).eval())
    measured = []

    def fake_speed(device, shapes, **kw):  # this device "has" a 2x faster bf16
        measured.append(shapes)
        return {"fp32": 1.0, "bf16": 0.5}

    monkeypatch.setattr(P, "measure_speed", fake_speed)
    rng = np.random.default_rng(0)
    frames, proprio = rng.normal(size=(2, 4, 8)), rng.normal(size=(2, 2))
    results = {}
    for tolerance, expected in ((1.0, "bf16"), (0.0, "fp32")):  # tolerance 0: bf16 can never agree
        monkeypatch.setattr(P, "TOLERANCE", tolerance)
        policy = WorldModelPolicy(
            model, make_planner("cem", samples=8, topk=3, opt_steps=2, horizon=2), Objective(),
            horizon=2, n_taken_actions=1, precision="auto",
        )  # fmt: skip
        policy.reset(frames, proprio)
        obs = Observation(frames=frames, proprio=proprio, episodes=np.arange(2))
        policy.act(obs)
        policy.act(obs)
        info = policy.metadata["precision"]
        assert info["chosen"] == expected, info
        assert info["agreement"]["bf16"]["candidates"] == WorldModelPolicy.PROBE_CANDIDATES
        assert [r.info["precision"] for r in policy.last_results] == [expected, expected]
        results[expected] = policy.last_results[0].cost
    assert len(measured) == 2  # once per policy, not per plan
