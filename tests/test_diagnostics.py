"""Diagnostics of a latent space: probe, rank correlation, NMSE on known answers; one tiny run end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from wmlab.diagnostics import (
    FEATURE_CAP,
    diagnose_run,
    latent_distance,
    linear_probe_r2,
    mean_step_change,
    normalized_mse,
    open_loop_errors,
    open_loop_nmse,
    pca_fit,
    per_goal_spearman,
    prediction_errors,
    probe_features,
    rankdata,
    spearman,
)


def _episodes(n_episodes=20, length=30, seed=0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0.5, 3.1, size=(n_episodes * length, 2))
    groups = np.repeat(np.arange(n_episodes), length)
    return rng, xy, groups


def test_probe_recovers_a_linear_code_and_not_noise():
    rng, xy, groups = _episodes()
    mixing = rng.normal(size=(2, 64))
    linear = xy @ mixing + 0.01 * rng.normal(size=(len(xy), 64))
    assert linear_probe_r2(linear, xy, groups, seed=1) > 0.99
    noise = rng.normal(size=(len(xy), 256))
    r2 = linear_probe_r2(noise, xy, groups, seed=1)
    assert -0.2 < r2 < 0.1
    # More features than frames (the dual form) still finds a linear code.
    wide = xy @ rng.normal(size=(2, 1500)) + rng.normal(size=(len(xy), 1500))
    assert linear_probe_r2(wide, xy, groups, ridge=1e-2) > 0.95


def test_probe_input_errors():
    _, xy, groups = _episodes(2, 5)
    with pytest.raises(ValueError, match="at least 2 groups"):
        linear_probe_r2(np.ones((10, 3)), xy, np.zeros(10))
    with pytest.raises(ValueError, match="must agree"):
        linear_probe_r2(np.ones((9, 3)), xy, groups)


def test_probe_features_cap_their_size_and_keep_token_layout():
    small = torch.randn(5, 4, 8)  # 32 values: flattened as is
    np.testing.assert_array_equal(probe_features(small), small.reshape(5, 32).numpy())
    big = torch.randn(3, 256, 384)  # DINOv2-S patch tokens: 256 tokens x 8 projected channels
    f = probe_features(big, seed=0)
    assert f.shape == (3, FEATURE_CAP)
    np.testing.assert_array_equal(f, probe_features(big, seed=0))  # same projection every chunk
    many = torch.randn(2, 5000, 4)  # more tokens than the cap: pooled runs of 3 tokens
    assert probe_features(many).shape[1] <= FEATURE_CAP


def test_spearman_against_hand_values():
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.8207826816681233)  # a tie
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 100, 1000, 10_000]) == pytest.approx(1.0)  # monotone, not linear
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    np.testing.assert_array_equal(rankdata([10, 20, 20, 5]), [2.0, 3.5, 3.5, 1.0])
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 6, 200), rng.integers(0, 6, 200)
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)


def test_latent_distance_is_mse_over_tokens():
    a = torch.zeros(2, 3, 4)
    b = torch.ones(2, 3, 4)
    b[1] *= 2
    np.testing.assert_allclose(latent_distance(a, b), [1.0, 4.0])


def test_nmse_is_zero_for_a_perfect_model_and_one_for_the_mean():
    torch.manual_seed(0)
    true = torch.randn(8, 5, 3, 4) * torch.tensor([1.0, 10.0, 0.1, 3.0])  # channels of different scales
    variance = true.reshape(-1, 4).var(dim=0, unbiased=False)
    np.testing.assert_allclose(normalized_mse(true, true, variance), np.zeros(5))
    mean = true.reshape(-1, 4).mean(dim=0).expand_as(true)
    assert normalized_mse(mean, true, variance).mean() == pytest.approx(1.0, rel=1e-6)

    class Oracle:  # a world model whose rollout returns the truth
        class cfg:
            num_hist = 2

        def rollout(self, visual, proprio, actions):
            n, t = visual.shape[1], actions.shape[1] - visual.shape[1]
            start = self.offset
            self.offset += len(visual)
            return {"visual": truth[start : start + len(visual), : n + t + 1]}

    truth = torch.randn(5, 6, 3, 4)
    oracle = Oracle()
    oracle.offset = 0
    nmse = open_loop_nmse(oracle, truth, torch.zeros(5, 6, 4), torch.zeros(5, 6, 10), horizons=4, chunk=2)
    np.testing.assert_allclose(nmse, np.zeros(4))
    with pytest.raises(ValueError, match="num_hist \\+ horizons"):
        open_loop_nmse(oracle, truth, torch.zeros(5, 6, 4), torch.zeros(5, 6, 10), horizons=5)


class _Rollout:
    """A world model stub: ``rollout`` returns the context then whatever ``future(context, t)`` says."""

    class cfg:
        num_hist = 2

    def __init__(self, future):
        self.future = future

    def rollout(self, visual, proprio, actions):
        H, T = visual.shape[1], actions.shape[1] + 1  # frames out: context + predicted
        return {"visual": torch.cat([visual, self.future(visual, T - H)], dim=1)}


def test_copy_last_model_has_skill_exactly_one_and_oracle_zero():
    torch.manual_seed(0)
    walk = torch.randn(6, 8, 3, 4).cumsum(dim=1)  # (B, H + K, N, D) a random walk in latent space
    copy_last = _Rollout(lambda ctx, k: ctx[:, -1:].expand(-1, k, -1, -1))
    errors = open_loop_errors(
        copy_last, walk, torch.zeros(6, 8, 2), torch.zeros(6, 8, 2), horizons=5, chunk=4
    )
    np.testing.assert_array_equal(errors["skill"], np.ones(5))
    np.testing.assert_allclose(errors["mse"], errors["copy_last_mse"])
    # A random walk's copy-last error grows linearly with the horizon: k one-step variances.
    assert errors["nmse_temporal"][0] == pytest.approx(1.0, rel=0.35)
    assert errors["nmse_temporal"][4] == pytest.approx(5.0, rel=0.35)
    truth = walk[:, 2:7]
    perfect = prediction_errors(truth, truth, walk[:, 1], mean_step_change(walk))
    np.testing.assert_array_equal(perfect["skill"], np.zeros(5))
    worse = prediction_errors(truth + 3.0, truth, walk[:, 1], mean_step_change(walk))
    assert (worse["skill"] > 1).all()  # a biased model is worse than copying: skill > 1 flags it


def test_near_constant_channel_does_not_blow_up_the_temporal_nmse():
    rng = np.random.default_rng(0)
    B, L, N, D = 16, 6, 4, 8
    true = np.zeros((B, L, N, D))
    true[..., -1] = rng.normal(size=(B, L, N))  # one channel moves; seven hardly change
    true[..., :-1] = 1e-7 * rng.normal(size=(B, L, N, D - 1))
    pred = true[:, 2:] + 0.01 * rng.normal(size=(B, L - 2, N, D))  # a good model, tiny errors everywhere
    pooled = normalized_mse(pred, true[:, 2:], true.reshape(-1, D).var(axis=0))
    temporal = prediction_errors(pred, true[:, 2:], true[:, 1], mean_step_change(true))["nmse_temporal"]
    assert pooled.min() > 100  # the old normaliser: seven near-zero variances dominate the mean
    assert temporal.max() < 1e-3  # error 8e-4 summed over channels / a one-step change of ~2


def test_per_goal_spearman_ignores_a_per_goal_scale_and_pooled_does_not():
    rng = np.random.default_rng(0)
    goal = np.repeat(np.arange(4), 50)
    geodesic = rng.uniform(0, 5, 200)
    latent = geodesic + rng.normal(0, 0.5, 200)
    scaled = latent * np.array([1.0, 10.0, 0.1, 100.0])[goal]  # goal-dependent latent scale
    rho, n_goals = per_goal_spearman(latent, geodesic, goal)
    rho_scaled, _ = per_goal_spearman(scaled, geodesic, goal)
    assert n_goals == 4 and rho == pytest.approx(rho_scaled, abs=1e-12)
    assert spearman(scaled, geodesic) < spearman(latent, geodesic) - 0.2
    expected = np.mean([spearman(latent[goal == g], geodesic[goal == g]) for g in range(4)])
    assert rho == pytest.approx(expected)
    local, _ = per_goal_spearman(latent, geodesic, goal, radius=1.5)  # the noise matters more up close
    assert local < rho
    geodesic[:5] = np.inf  # unreachable pairs are left out, not ranked
    assert math.isfinite(per_goal_spearman(latent, geodesic, goal)[0])


def test_probe_feature_budget_and_held_out_episodes():
    rng, xy, groups = _episodes()
    X = rng.normal(size=(500, 40)) * np.r_[10.0, 5.0, 2.0, np.full(37, 0.1)]  # three loud axes
    _, comps = pca_fit(X, 3)
    assert comps.shape == (40, 3)
    np.testing.assert_allclose(np.abs(comps[:3, :3]), np.eye(3), atol=0.1)  # the top-variance axes
    wide = xy @ rng.normal(size=(2, 1500)) + rng.normal(size=(len(xy), 1500))  # F > frames: dual form
    assert pca_fit(wide, 16)[1].shape == (1500, 16)
    # The position signal lives in a low-variance corner of a high-variance latent: a budget of 4
    # principal components cannot see it, a budget of 64 can (and the info reports what was used).
    loud = np.concatenate([100 * rng.normal(size=(len(xy), 20)), xy @ rng.normal(size=(2, 4))], axis=1)
    held = [0, 1, 2, 3]
    r2_small, info = linear_probe_r2(loud, xy, groups, pca_dims=4, test_groups=held, return_info=True)
    r2_big, info_big = linear_probe_r2(loud, xy, groups, pca_dims=64, test_groups=held, return_info=True)
    assert r2_small < 0.2 < 0.95 < r2_big
    assert info["pca_dims"] == 4 and info_big["pca_dims"] == 24  # capped at the feature count
    assert info["n_test_episodes"] == 4 and info["n_test_frames"] == 4 * 30
    with pytest.raises(ValueError, match="held-out episodes"):
        linear_probe_r2(loud, xy, groups, test_groups=[99])


def test_diagnose_a_tiny_run(tiny_store, tmp_path):
    from wmlab.cli import compose
    from wmlab.train import train

    overrides = [
        "encoder=pixels", "encoder.input_size=32", "encoder.patch_size=8", "predictor.depth=1",
        "predictor.heads=2", "predictor.dim_head=8", "predictor.mlp_dim=32", "frameskip=2", "num_hist=2",
        "training.batch_size=8", "training.max_steps_per_epoch=4", "training.val_batches=2",
        "training.rollout_eval_steps=3", "training.epochs=1", "progress=false", "device=cpu",
        f"data={tiny_store.path}", f"run_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    run = train(OmegaConf.to_container(compose("train", overrides), resolve=True))
    row, distances = diagnose_run(run, n_frames=150, n_pairs=80, horizons=10, seed=0, probe_dims=8)
    assert row["encoder"] == "pixels"
    assert (row["num_tokens"], row["dim"]) == (16, 8 * 8 * 3)
    assert row["bytes_per_frame"] == 16 * 192 * 2  # float16 in the cache
    assert len(row["nmse_by_horizon"]) == 10  # 30-step episodes allow 30 // 2 - 2 = 13 steps
    assert all(np.isfinite(v) and v >= 0 for v in row["nmse_by_horizon"])
    assert np.isfinite(row["probe_r2"]) and -1.0 <= row["distance_spearman"] <= 1.0
    assert row["encoder_images_per_s"] > 0
    assert len(distances["latent"]) == len(distances["geodesic"]) == len(distances["goal"]) == 80
    assert row["probe_dims"] == 8 and row["probe_split"] == "random"
    K = len(row["skill_by_horizon"])
    assert K == 10 and len(row["nmse_temporal_by_horizon"]) == len(row["copy_last_mse_by_horizon"]) == K
    assert row["worse_than_copy_last"] == [k + 1 for k, v in enumerate(row["skill_by_horizon"]) if v > 1]
    assert -1.0 <= row["distance_spearman_per_goal"] <= 1.0 and row["n_goals"] >= 8  # 80 pairs: 10 goals
    assert row["local_radius"] == pytest.approx(np.quantile(distances["geodesic"], 0.25))
    held = [int(e) for e in tiny_store.committed[:2]]
    row2, _ = diagnose_run(run, n_frames=150, n_pairs=80, horizons=3, seed=0, heldout_episodes=held)
    assert row2["probe_split"] == "heldout" and row2["probe_test_episodes"] <= 2
    with pytest.raises(ValueError, match="heldout_episodes"):
        diagnose_run(run, n_frames=150, n_pairs=80, horizons=3, heldout_episodes=[10_000])
    assert min(distances["geodesic"]) >= 0 and min(distances["latent"]) >= 0
    with pytest.raises(FileNotFoundError, match=r"config\.yaml"):
        diagnose_run(tmp_path / "nowhere")
