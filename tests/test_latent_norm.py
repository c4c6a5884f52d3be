"""Per-channel latent standardisation: the planner's step size and cost mean the same for every
encoder scale; the statistics come from the training episodes and travel with the weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_configs import QUIET_CPU, TINY_MODEL, train_config

from wmlab.data.windows import split_episodes
from wmlab.integrity import UserError
from wmlab.models.world_model import LatentWorldModel, WorldModelConfig
from wmlab.planning import make_planner
from wmlab.planning.objectives import Objective, rollout_cost_fn
from wmlab.runs import load_run
from wmlab.train import train


def _model(latent_norm: str, seed: int = 0) -> LatentWorldModel:
    torch.manual_seed(seed)
    cfg = WorldModelConfig(
        visual_dim=8, num_visual_tokens=4, action_dim=3, proprio_dim=2, action_emb_dim=4, proprio_emb_dim=5,
        num_hist=2, latent_norm=latent_norm, predictor=dict(depth=1, heads=2, dim_head=8, mlp_dim=16),
    )  # fmt: skip
    return LatentWorldModel(cfg).eval()


def _gd_plan(model, obs, proprio, goal, goal_proprio):
    cost_fn = rollout_cost_fn(model, obs, proprio, goal, goal_proprio, Objective())
    init = torch.zeros(2, 3, 3)  # (B, T, A)
    return make_planner("gd", opt_steps=5, lr=0.5, init_std=0.0).plan(cost_fn, init), cost_fn


def test_standardised_planning_is_invariant_to_the_encoder_scale():
    """Tokens x and a * x + b (per channel, a up to 1000) give the same costs and the same GD plan when
    the statistics follow the tokens; with DINO-WM's raw latents the cost scales by a^2 and GD moves
    differently, which is the confound standardisation removes."""
    g = torch.Generator().manual_seed(1)
    obs, proprio = torch.randn(2, 1, 4, 8, generator=g), torch.randn(2, 1, 2, generator=g)
    goal, goal_proprio = torch.randn(2, 4, 8, generator=g), torch.randn(2, 2, generator=g)
    a = torch.logspace(-1, 3, 8)  # (D,) channel scales 0.1 .. 1000
    b = torch.linspace(-50, 50, 8)
    mean, std = torch.randn(8, generator=g), torch.rand(8, generator=g) + 0.5

    small, large = _model("channel"), _model("channel")
    large.load_state_dict(small.state_dict())
    small.set_latent_statistics(mean, std)
    large.set_latent_statistics(a * mean + b, a * std)
    plan_small, cost_small = _gd_plan(small, obs, proprio, goal, goal_proprio)
    plan_large, cost_large = _gd_plan(large, a * obs + b, proprio, a * goal + b, goal_proprio)
    probe = torch.randn(2, 6, 3, 3, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(cost_large(probe), cost_small(probe), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plan_large.actions, plan_small.actions, rtol=1e-3, atol=1e-4)
    assert (plan_small.actions.abs() > 1e-3).any(), "GD must have moved for the comparison to mean something"

    raw_small, raw_large = _model("none"), _model("none")
    raw_large.load_state_dict(raw_small.state_dict())
    raw_plan_small, _ = _gd_plan(raw_small, obs, proprio, goal, goal_proprio)
    raw_plan_large, _ = _gd_plan(raw_large, a * obs + b, proprio, a * goal + b, goal_proprio)
    assert not torch.allclose(raw_plan_large.actions, raw_plan_small.actions, atol=1e-2)


def test_latent_statistics_are_checked_and_inverted():
    model = _model("channel")
    with pytest.raises(ValueError, match="std > 0"):
        model.set_latent_statistics(torch.zeros(8), torch.zeros(8))
    with pytest.raises(ValueError, match=r"\(8,\) each"):
        model.set_latent_statistics(torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match="latent_norm='channel'"):
        _model("none").set_latent_statistics(torch.zeros(8), torch.ones(8))
    with pytest.raises(ValueError, match="latent_norm must be one of"):
        _model("layer")
    model.set_latent_statistics(torch.arange(8.0), torch.full((8,), 3.0))
    x = torch.randn(2, 4, 8)
    torch.testing.assert_close(model.raw_visual(model.standardize_visual(x)), x)
    assert set(_model("none").state_dict()) < set(model.state_dict()), "raw runs carry no statistics"


TINY = [*TINY_MODEL, "frameskip=2", "num_hist=2", "training.batch_size=8", "training.max_steps_per_epoch=2",
        "training.val_batches=1", "training.rollout_eval_steps=2", *QUIET_CPU]  # fmt: skip


def test_a_trained_run_standardises_with_its_training_episodes(tiny_store, tmp_path):
    """The default run's statistics are those of its training episodes' tokens (every training frame
    standardised has mean ~0 and std ~1 per channel that moves), saved in the weights, recorded in
    metadata.json and reloaded with the model; latent_norm=none trains on raw tokens."""
    run_dir = train(train_config(TINY, tiny_store, tmp_path / "run", "training.epochs=1"))
    model, cfg = load_run(run_dir)
    assert cfg["latent_norm"] == "channel" and model.cfg.latent_norm == "channel"
    meta = json.loads((run_dir / "metadata.json").read_text())
    assert meta["latent_statistics"]["windows"] > 0 and meta["latent_statistics"]["std_floor"] > 0

    from wmlab.encoders import make_encoder

    encoder = make_encoder("pixels", input_size=32, patch_size=8)
    train_ids, _ = split_episodes(tiny_store.committed, float(cfg["split_ratio"]), int(cfg["split_seed"]))
    frames = np.concatenate(
        [tiny_store.frames(int(e), np.arange(int(tiny_store.lengths[e]))) for e in train_ids]
    )
    with torch.no_grad():
        tokens = encoder.encode(torch.as_tensor(frames)).float()  # (F, N, D)
        z = model.standardize_visual(tokens).reshape(-1, tokens.shape[-1])  # (F*N, D)
    moving = model.visual_scale > meta["latent_statistics"]["std_floor"] * 1.001
    assert moving.sum() > 10
    # windows overlap, so middle frames weigh a little more than in this all-frames check
    assert z.mean(0)[moving].abs().max() < 0.25
    assert ((z.std(0)[moving] - 1).abs() < 0.25).all()

    raw_dir = train(train_config(TINY, tiny_store, tmp_path / "raw", "training.epochs=1", "latent_norm=none"))
    raw, _ = load_run(raw_dir)
    assert raw.cfg.latent_norm == "none" and "visual_scale" not in raw.state_dict()
    with pytest.raises(UserError, match="latent_norm='layer' is not valid"):
        train(train_config(TINY, tiny_store, tmp_path / "bad", "latent_norm=layer"))


def test_resuming_a_raw_run_under_the_new_default_is_refused(tiny_store, tmp_path):
    """A run trained on raw tokens (or from before standardisation) cannot silently continue as a
    standardised one: the change of latent_norm is named."""
    run_dir = tmp_path / "run"
    train(train_config(TINY, tiny_store, run_dir, "training.epochs=1", "latent_norm=none"))
    with pytest.raises(UserError, match="latent_norm"):
        train(train_config(TINY, tiny_store, run_dir, "training.epochs=2"))


def test_diagnostics_and_cache_units_agree(tiny_store, tmp_path):
    """diagnose_run compares predictions with truths in the model's units: a standardised run's
    copy-last error is that of the standardised tokens, not of the raw ones."""
    from wmlab.diagnostics import open_loop_errors

    run_dir = train(train_config(TINY, tiny_store, tmp_path / "run", "training.epochs=1"))
    model, _ = load_run(run_dir)
    g = torch.Generator().manual_seed(0)
    visual = 40 * torch.randn(3, 4, model.cfg.num_visual_tokens, model.cfg.visual_dim, generator=g) + 100
    proprio, actions = torch.randn(3, 4, 4, generator=g), torch.randn(3, 4, 4, generator=g)
    errors = open_loop_errors(model, visual, proprio, actions, horizons=2)
    z = model.standardize_visual(visual)
    expected_copy = ((z[:, 1:2] - z[:, 2:4]) ** 2).mean(dim=(0, 2, 3)).numpy()
    np.testing.assert_allclose(errors["copy_last_mse"], expected_copy, rtol=1e-5)
