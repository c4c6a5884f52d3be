"""World Models (Ha & Schmidhuber 2018) parts: V, M, C, the dream, CMA-ES resume, collection, the vae encoder.

Paper numbers are checked where the reference gives them (parameter counts); the mixture NLL against a value
computed by hand; temperature sampling against its definition.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wmlab.models.mdn_rnn import MDNRNN, MDNRNNConfig, mdn_nll, sample
from wmlab.models.vae import ConvVAE, VAEConfig, load_vae, vae_loss
from wmlab.training.mdn_rnn import SequenceSampler
from wmlab.training.vae import train_vae
from wmlab.worldmodels.controller import ControllerConfig, forward
from wmlab.worldmodels.envs import CarRacingEnv, DodgeEnv, discrete_move

TINY_CHANNELS = [4, 8, 8, 8]


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------- V


@pytest.mark.parametrize(("z_dim", "expected"), [(32, 4_348_547), (64, 4_446_915)])
def test_vae_matches_paper_parameter_count_and_shapes(z_dim, expected):
    vae = ConvVAE(VAEConfig(z_dim=z_dim))
    assert n_params(vae) == expected
    recon, mu, logvar = vae(torch.rand(2, 3, 64, 64))
    assert recon.shape == (2, 3, 64, 64) and mu.shape == logvar.shape == (2, z_dim)
    assert 0 <= recon.min() and recon.max() <= 1
    with pytest.raises(AssertionError, match="64, 64"):
        vae.encode(torch.rand(2, 3, 32, 32))


def test_vae_loss_sums_pixels_and_clamps_kl_at_tolerance():
    x = torch.zeros(2, 3, 4, 4)
    recon = torch.full_like(x, 0.5)  # squared error 0.25 on 48 pixels -> 12 per frame
    mu, logvar = torch.zeros(2, 8), torch.zeros(2, 8)  # KL = 0 -> clamped to 0.5 * 8 = 4
    loss, parts = vae_loss(x, recon, mu, logvar, kl_tolerance=0.5)
    assert loss.item() == pytest.approx(12 + 4)
    assert parts["kl"] == pytest.approx(0.0)
    mu = torch.full((2, 8), 2.0)  # KL = 0.5 * 8 * 4 = 16 > 4: not clamped
    loss, parts = vae_loss(x, recon, mu, logvar, kl_tolerance=0.5)
    assert loss.item() == pytest.approx(12 + 16) and parts["kl"] == pytest.approx(16)


def test_train_vae_on_pointmaze_store_resizes_resumes_and_loads(tiny_store, tmp_path):
    """32 px PointMaze frames -> 64 px; 2 + 2 resumed steps == 4 straight steps, bit for bit."""
    kwargs = dict(z_dim=4, channels=TINY_CHANNELS, batch_size=4, save_every=1, progress=False, device="cpu")
    straight = train_vae(tiny_store.path, tmp_path / "a", steps=4, **kwargs)
    train_vae(tiny_store.path, tmp_path / "b", steps=2, **kwargs)
    resumed = train_vae(tiny_store.path, tmp_path / "b", steps=4, **kwargs)
    a, b = load_vae(straight), load_vae(resumed)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    with pytest.raises(ValueError, match="another config"):
        train_vae(tiny_store.path, tmp_path / "b", steps=4, **{**kwargs, "z_dim": 5})


def test_vae_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-vae"):
        load_vae(tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 3\)"):
        train_vae(np.zeros((4, 64, 64), np.uint8), tmp_path / "x", steps=1, progress=False)
    from wmlab.models.vae import frames_to_input

    with pytest.raises(ValueError, match="NaN"):
        frames_to_input(torch.full((1, 3, 64, 64), float("nan")))


def test_vae_encoder_registered_tokens_are_mu(tmp_path):
    from wmlab.encoders import make_encoder

    frames = np.random.default_rng(0).integers(0, 256, (8, 48, 48, 3), dtype=np.uint8)
    out = train_vae(
        frames,
        tmp_path / "vae",
        z_dim=6,
        channels=TINY_CHANNELS,
        steps=1,
        batch_size=4,
        progress=False,
        device="cpu",
    )
    encoder = make_encoder("vae", weights=out)
    tokens = encoder.encode(frames[:3])
    assert tokens.shape == (3, 1, 6) and encoder.num_tokens == 1 and encoder.dim == 6 and encoder.grid is None
    from wmlab.models.vae import frames_to_input

    mu, _ = load_vae(out).encode(frames_to_input(frames[:3]))
    torch.testing.assert_close(tokens[:, 0], mu)
    assert encoder.decode(tokens).shape == (3, 3, 64, 64)
    with pytest.raises(FileNotFoundError, match="train-vae"):
        make_encoder("vae")


# ---------------------------------------------------------------------------------------------------- M


@pytest.mark.parametrize(
    ("z_dim", "action_dim", "hidden", "doom", "expected"),
    [(32, 3, 256, False, 422_368), (64, 1, 512, True, 1_678_785)],
)
def test_mdn_rnn_matches_paper_parameter_count(z_dim, action_dim, hidden, doom, expected):
    rnn = MDNRNN(
        MDNRNNConfig(z_dim=z_dim, action_dim=action_dim, hidden=hidden, done_head=doom, done_input=doom)
    )
    # torch's LSTM has two bias vectors (b_ih, b_hh), the reference's one
    assert n_params(rnn) - 4 * hidden == expected
    mix, (h, c) = rnn(torch.zeros(2, 7, z_dim), torch.zeros(2, 7, action_dim))
    assert mix["logits"].shape == mix["mean"].shape == mix["logstd"].shape == (2, 7, z_dim, 5)
    assert (mix["done_logit"].shape == (2, 7)) if doom else mix["done_logit"] is None
    assert h.shape == c.shape == (1, 2, hidden)


def test_mixture_nll_equals_hand_computed_value():
    # pi = (1/4, 3/4), means (0, 1), stds (1, 1/2), y = 0.5
    logits = torch.tensor([[0.0, math.log(3.0)]])
    mean = torch.tensor([[0.0, 1.0]])
    logstd = torch.tensor([[0.0, math.log(0.5)]])
    n1 = math.exp(-0.5 * 0.5**2) / math.sqrt(2 * math.pi)  # N(0.5 | 0, 1)
    n2 = math.exp(-0.5 * 1.0**2) / (0.5 * math.sqrt(2 * math.pi))  # N(0.5 | 1, 0.5^2): z-score 1
    expected = -math.log(0.25 * n1 + 0.75 * n2)
    assert expected == pytest.approx(0.796349, abs=1e-6)
    got = mdn_nll(logits, mean, logstd, torch.tensor([0.5]))
    assert got.item() == pytest.approx(expected, abs=1e-6)


def _mixture(B=1, Nz=1):
    logits = torch.tensor([0.0, 1.0, 0.5, -1.0, 0.2]).expand(B, Nz, 5)  # mode: component 1
    mean = torch.tensor([-30.0, 2.0, 30.0, 60.0, 90.0]).expand(B, Nz, 5)  # far apart: draws are attributable
    logstd = torch.zeros(B, Nz, 5)
    return {"logits": logits, "mean": mean, "logstd": logstd, "done_logit": torch.tensor([0.3, -0.3])[:B]}


def test_sampling_as_tau_goes_to_zero_returns_the_modes_mean():
    for tau in (0.0, 1e-6):
        z, done = sample(_mixture(B=2, Nz=3), tau, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(z, torch.full((2, 3), 2.0), atol=1e-2, rtol=0)
        assert done.tolist() == [True, False]  # P(done) > 0.5, never sampled


def test_sampling_divides_logits_by_tau_and_scales_noise_by_sqrt_tau():
    g = torch.Generator().manual_seed(1)
    tau = 2.0
    mix = _mixture(B=40000)
    z, _ = sample(mix, tau, generator=g)
    picked = (z[:, 0, None] - mix["mean"][0, 0]).abs().argmin(-1)  # nearest mean: components are far apart
    freq = torch.bincount(picked, minlength=5).float() / len(picked)
    torch.testing.assert_close(freq, torch.softmax(mix["logits"][0, 0] / tau, -1), atol=0.01, rtol=0)
    one = {**mix, "logits": torch.tensor([0.0, 50.0, 0, 0, 0]).expand(40000, 1, 5)}
    z, _ = sample(one, 0.25, generator=g)
    assert z.mean().item() == pytest.approx(2.0, abs=0.02)
    assert z.std().item() == pytest.approx(0.5, abs=0.01)  # std 1 * sqrt(0.25)


def _packed(lengths, seed=0, nz=2):
    """Packed latents of episodes of ``lengths`` frames; actions = the row index, done = 1 at each end."""
    rng = np.random.default_rng(seed)
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    F = int(starts[-1])
    dones = np.zeros(F, np.float32)
    dones[starts[1:] - 1] = 1
    return {
        "mu": rng.standard_normal((F, nz)).astype(np.float32),
        "logvar": np.full((F, nz), -20, np.float32),
        "actions": np.arange(F, dtype=np.float32)[:, None],
        "dones": dones,
        "starts": starts,
    }


def test_sequence_sampler_windows_masks_and_resamples_z():
    data = _packed([5, 3, 12])
    rng = np.random.default_rng(0)
    batch = SequenceSampler(data, seq_len=6).batch(64, rng)
    assert batch["z"].shape[1] <= 6
    ends = set((data["starts"][1:] - 1).tolist())
    for i in range(64):
        n = int(batch["mask_done"][i].sum())
        assert n >= 1 and batch["mask_done"][i, :n].all()  # valid steps first, padding after
        first = int(batch["a"][i, 0, 0])
        rows = np.arange(first, first + n)
        np.testing.assert_array_equal(batch["a"][i, :n, 0].numpy(), rows)  # one episode, in order
        episode = np.searchsorted(data["starts"], rows, side="right") - 1
        assert (episode == episode[0]).all()
        last = int(rows[-1])
        assert int(batch["mask_z"][i].sum()) == (n - 1 if last in ends else n)  # an end has no next frame
        torch.testing.assert_close(batch["z"][i, :n], torch.from_numpy(data["mu"][rows]), atol=1e-3, rtol=0)
        np.testing.assert_array_equal(batch["done"][i, :n].numpy(), data["dones"][rows])


def test_sequence_sampler_makes_every_transition_an_equally_likely_target():
    """Every row (ends included, episodes shorter and longer than T) is a target equally often."""
    data = _packed([50, 7, 23, 12, 10])
    sampler = SequenceSampler(data, seq_len=10)
    rng = np.random.default_rng(1)
    counts = np.zeros(len(data["dones"]))
    for _ in range(40):
        batch = sampler.batch(200, rng)
        rows = batch["a"][..., 0][batch["mask_done"]].numpy().astype(int)
        np.add.at(counts, rows, 1)
    expected = counts.sum() / len(counts)
    assert counts.sum() == pytest.approx(8000 * sampler.mean_window_steps, rel=0.03)
    assert np.abs(counts / expected - 1).max() < 0.25, counts / expected  # ~6 sigma at ~750 per row


def test_sequence_sampler_keeps_episode_ends_at_their_true_rate():
    """Done targets in sampled windows come at the data's rate, also for episodes longer than seq_len.

    (The old sampler started windows in [0, L - T), so the end of an episode longer than T was never a
    target and the done rate in its windows was 0.)
    """
    lengths = [40, 60, 35, 80, 17, 120]
    data = _packed(lengths, seed=2)
    sampler = SequenceSampler(data, seq_len=16)
    rng = np.random.default_rng(3)
    targets = dones = 0
    for _ in range(30):
        batch = sampler.batch(200, rng)
        targets += int(batch["mask_done"].sum())
        dones += float((batch["done"] * batch["mask_done"]).sum())
    rate, true_rate = dones / targets, data["dones"].mean()
    assert rate == pytest.approx(true_rate, rel=0.15), (rate, true_rate)  # ~5 sigma at ~700 ends


# ---------------------------------------------------------------------------------------------------- C


def test_controller_parameter_counts_match_paper():
    assert ControllerConfig(z_dim=32, hidden=256, out_dim=3, inputs="zh", bias=True).n_params == 867
    assert ControllerConfig(z_dim=64, hidden=512, out_dim=1, inputs="zch", bias=False).n_params == 1088
    assert ControllerConfig(z_dim=32, hidden=256, out_dim=3, inputs="z", bias=True).n_params == 99
    assert (
        ControllerConfig(z_dim=32, hidden=256, out_dim=3, inputs="z", bias=True, mlp_hidden=40).n_params
        == 1443
    )


def test_controller_forward_is_tanh_of_affine_per_candidate():
    cfg = ControllerConfig(z_dim=2, hidden=1, out_dim=1, inputs="zh", bias=True)
    params = torch.tensor([[1.0, 2.0, 3.0, 0.5], [0.0, 0.0, 0.0, -0.25]])  # (P=2, W (1x3) + b)
    x = torch.tensor([[[1.0, 1.0, 1.0]], [[5.0, 5.0, 5.0]]])  # (P, R=1, 3)
    y = forward(cfg, params, x)
    torch.testing.assert_close(y[:, 0, 0], torch.tanh(torch.tensor([6.5, -0.25])))


def test_action_mappings():
    y = np.array([[0.5, -1.0, -0.5], [-0.2, 0.0, 0.7]])
    np.testing.assert_allclose(CarRacingEnv.controller_to_action(y), [[0.5, 0.0, 0.0], [-0.2, 0.5, 0.7]])
    assert [discrete_move(v) for v in (-0.9, -0.34, -0.3, 0.0, 0.3, 0.34, 1.0)] == [-1, -1, 0, 0, 0, 1, 1]
    env = DodgeEnv(max_steps=5, spawn_prob=0.0)
    env.reset(seed=0)
    env.step([-1.0])
    assert env.agent == env.grid // 2 - 1
    with pytest.raises(ValueError, match="finite"):
        env.step([float("nan")])


# ------------------------------------------------------------------------------------------ dream + CMA-ES


@pytest.fixture
def tiny_models(tmp_path):
    """A 1-step VAE and an untrained M with a done head, saved as the stages save them, + a latents file."""
    from wmlab.runs import atomic_save_tensors
    from wmlab.training.mdn_rnn import train_rnn

    frames = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    vae = train_vae(
        frames,
        tmp_path / "vae",
        z_dim=4,
        channels=TINY_CHANNELS,
        steps=1,
        batch_size=4,
        progress=False,
        device="cpu",
    )
    rng = np.random.default_rng(1)
    F = 40
    data = {
        "mu": rng.standard_normal((F, 4)).astype(np.float32),
        "logvar": np.full((F, 4), -2.0, np.float32),
        "actions": rng.uniform(-1, 1, (F, 1)).astype(np.float32),
        "rewards": np.ones(F, np.float32),
        "dones": np.zeros(F, np.float32),
        "starts": np.array([0, 20, 40]),
    }
    data["dones"][[19, 39]] = 1
    latents = tmp_path / "latents.safetensors"
    atomic_save_tensors({k: torch.from_numpy(v) for k, v in data.items()}, latents)
    rnn = train_rnn(
        data,
        tmp_path / "rnn",
        hidden=8,
        done_head=True,
        done_input=True,
        seq_len=10,
        batch_size=4,
        steps=2,
        progress=False,
        device="cpu",
    )
    return {"vae": vae, "rnn": rnn, "latents": latents}


def test_dream_ends_on_done_head_and_shares_random_numbers(tiny_models):
    from wmlab.models.mdn_rnn import load_rnn
    from wmlab.worldmodels.dream import Dream, DreamEnv

    rnn = load_rnn(tiny_models["rnn"])
    cfg = ControllerConfig(z_dim=4, hidden=8, out_dim=1, inputs="zch", bias=False)
    mu, logvar = np.zeros((3, 4)), np.zeros((3, 4))
    params = np.random.default_rng(0).standard_normal((3, cfg.n_params))
    params[2] = params[0]
    with torch.no_grad():
        rnn.head.bias[-1] = -50.0  # never done -> every dream runs to the cap
    out = Dream(rnn, mu, logvar, tau=1.0, max_steps=7, to_action=DodgeEnv.controller_to_action).rollout(
        cfg, params, seeds=[1, 2]
    )
    assert (out["returns"] == 7).all()
    with torch.no_grad():
        rnn.head.bias[-1] = 50.0  # always done -> one step
    dream = Dream(rnn, mu, logvar, tau=1.15, max_steps=7, to_action=DodgeEnv.controller_to_action)
    assert (dream.rollout(cfg, params, seeds=[1, 2])["returns"] == 1).all()
    env = DreamEnv(rnn, mu, logvar, tau=1.15, max_steps=7)
    obs, _ = env.reset(seed=0)
    assert obs.shape == env.observation_space.shape == (4 + 2 * 8,)
    _, reward, terminated, truncated, _ = env.step(np.zeros(1))
    assert reward == 1.0 and terminated and not truncated
    with torch.no_grad():
        rnn.head.bias[-1] = 0.0
        rnn.head.weight[-1] = 0.0
        rnn.head.weight[-1, :8] = 3.0  # done depends on h: candidates differ, identical candidates do not
    out = Dream(rnn, mu, logvar, tau=1.15, max_steps=30, to_action=DodgeEnv.controller_to_action).rollout(
        cfg, params, seeds=[1, 2, 3]
    )
    np.testing.assert_array_equal(out["returns"][0], out["returns"][2])


def test_cmaes_resume_replays_to_the_same_state(tiny_models, tmp_path):
    from wmlab.worldmodels.cmaes import train_controller
    from wmlab.worldmodels.controller import load_controller
    from wmlab.worldmodels.evaluate import read_jsonl

    pytest.importorskip("cma")
    kwargs = dict(
        vae=tiny_models["vae"],
        rnn=tiny_models["rnn"],
        latents=[tiny_models["latents"]],
        wm_env="dodge",
        dream=True,
        temperature=1.15,
        popsize=6,
        rollouts=2,
        eval_every=2,
        eval_rollouts=3,
        max_steps=15,
        progress=False,
    )
    train_controller(tmp_path / "a", generations=4, **kwargs)
    train_controller(tmp_path / "b", generations=3, **kwargs)  # "killed" after generation 3
    train_controller(tmp_path / "b", generations=4, **kwargs)
    from wmlab.runs import load_tensors, read_json

    a, b = (
        load_tensors(tmp_path / "a" / "cmaes.safetensors"),
        load_tensors(tmp_path / "b" / "cmaes.safetensors"),
    )
    for key in ("mean", "fitness", "best_params"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    cfg, params = load_controller(tmp_path / "b")
    assert cfg.n_params == params.size == 4 + 8 + 8
    meta = read_json(tmp_path / "b" / "controller.json")
    assert [h["generation"] for h in meta["history"]] == [1, 2, 3, 4]
    assert [e["generation"] for e in meta["evals"]] == [2, 3, 4]  # 3 = the end of the "killed" run
    with pytest.raises(ValueError, match="other settings"):
        train_controller(tmp_path / "b", generations=5, **{**kwargs, "popsize": 8})
    assert read_jsonl(tmp_path / "none.jsonl") == []


def test_car_dream_refuses_training_without_done_head(tiny_models, tmp_path):
    from wmlab.training.mdn_rnn import train_rnn
    from wmlab.worldmodels.cmaes import DreamEvaluator
    from wmlab.worldmodels.latents import load_latents

    data = load_latents(tiny_models["latents"])
    rnn = train_rnn(
        data, tmp_path / "rnn_car", hidden=8, seq_len=5, batch_size=2, steps=1, progress=False, device="cpu"
    )
    with pytest.raises(ValueError, match="no done head"):
        DreamEvaluator(rnn, tiny_models["latents"], "dodge", 1.0, 10)


# ------------------------------------------------------------------------------------------ collection


def test_collect_resumes_and_refuses_other_settings(tmp_path):
    from wmlab.data.errors import DatasetError
    from wmlab.worldmodels.collect import collect_rollouts

    kwargs = dict(max_steps=30, workers=1, seed=5, progress=False, env_kwargs={"spawn_prob": 0.5})
    straight = collect_rollouts(tmp_path / "a.zarr", "dodge", n_episodes=4, **kwargs)
    collect_rollouts(tmp_path / "b.zarr", "dodge", n_episodes=2, **kwargs)  # then grown: appends slots 2, 3
    grown = collect_rollouts(tmp_path / "b.zarr", "dodge", n_episodes=4, **kwargs)
    np.testing.assert_array_equal(straight.lengths, grown.lengths)
    for i in range(4):
        np.testing.assert_array_equal(straight.frames(i), grown.frames(i))
        np.testing.assert_array_equal(straight.actions(i), grown.actions(i))
    states = straight.states(0)
    assert states.shape[1] == 2 and (states[:, 0] == 1).all()  # reward +1 per step alive
    assert straight.frame_shape == (64, 64, 3)
    with pytest.raises(DatasetError, match="different collection"):
        collect_rollouts(tmp_path / "a.zarr", "dodge", n_episodes=4, **{**kwargs, "seed": 6})
    with pytest.raises(ValueError, match="unknown World Models env"):
        collect_rollouts(tmp_path / "c.zarr", "doom", n_episodes=1, **kwargs)


def test_encode_latents_packs_episodes_in_store_order_and_is_reused(tmp_path):
    from wmlab.models.vae import frames_to_input
    from wmlab.worldmodels.collect import collect_rollouts
    from wmlab.worldmodels.latents import encode_latents, initial_latents, load_latents

    store = collect_rollouts(
        tmp_path / "d.zarr", "dodge", n_episodes=2, max_steps=12, workers=1, progress=False
    )
    vae_dir = train_vae(store.path, tmp_path / "vae", z_dim=3, channels=TINY_CHANNELS, steps=1, batch_size=4,
                        progress=False, device="cpu")  # fmt: skip
    path = encode_latents(store, vae_dir, tmp_path / "lat.safetensors", progress=False)
    stamp = path.stat().st_mtime_ns
    assert encode_latents(store, vae_dir, path, progress=False).stat().st_mtime_ns == stamp  # reused
    data = load_latents([path, path])  # two files back to back
    L0, L1 = (int(v) for v in store.lengths)
    np.testing.assert_array_equal(data["starts"], np.cumsum([0, L0, L1, L0, L1]))
    np.testing.assert_array_equal(data["actions"][L0 : L0 + L1], store.actions(1))
    np.testing.assert_array_equal(data["dones"][:L0], store.states(0)[:, 1])
    mu, _ = load_vae(vae_dir).encode(frames_to_input(store.frames(1)))
    np.testing.assert_allclose(data["mu"][L0 : L0 + L1], mu.detach().numpy(), atol=1e-5)
    first_mu, _ = initial_latents(data)
    np.testing.assert_allclose(first_mu[1], mu[0].detach().numpy(), atol=1e-5)


def test_dream_with_per_candidate_seeds_gives_identical_candidates_different_dreams(tiny_models):
    from wmlab.models.mdn_rnn import load_rnn
    from wmlab.worldmodels.cmaes import rollout_seeds
    from wmlab.worldmodels.dream import Dream

    rnn = load_rnn(tiny_models["rnn"])
    cfg = ControllerConfig(z_dim=4, hidden=8, out_dim=1, inputs="zch", bias=False)
    params = np.repeat(np.random.default_rng(0).standard_normal((1, cfg.n_params)), 4, 0)  # 4 identical
    with torch.no_grad():
        rnn.head.bias[-1] = 0.0
        rnn.head.weight[-1] = 0.0
        rnn.head.weight[-1, :8] = 3.0  # done depends on h, so on the dream's noise
    mu, logvar = np.random.default_rng(1).standard_normal((5, 4)), np.zeros((5, 4))
    dream = Dream(rnn, mu, logvar, tau=1.15, max_steps=30, to_action=DodgeEnv.controller_to_action)
    own = rollout_seeds(0, 0, 6, popsize=4)
    assert own.shape == (4, 6) and len(np.unique(own)) == 24
    shared = rollout_seeds(0, 0, 6)
    assert shared.shape == (6,)
    r_shared = dream.rollout(cfg, params, shared)["returns"]
    assert (r_shared == r_shared[0]).all()  # common random numbers: identical candidates tie
    r_own = dream.rollout(cfg, params, own)["returns"]
    assert not (r_own == r_own[0]).all()  # own seeds: the same candidate meets other dreams
    np.testing.assert_array_equal(r_own, dream.rollout(cfg, params, own)["returns"])  # seeded


@pytest.mark.parametrize("common", [False, True])
def test_cmaes_gives_each_candidate_its_own_rollout_seeds_unless_common(
    common, tiny_models, tmp_path, monkeypatch
):
    from wmlab.worldmodels import cmaes

    pytest.importorskip("cma")
    seen = []
    call = cmaes.DreamEvaluator.__call__

    def spy(self, cfg, params, seeds):
        seen.append((len(params), np.array(seeds)))
        return call(self, cfg, params, seeds)

    monkeypatch.setattr(cmaes.DreamEvaluator, "__call__", spy)
    cmaes.train_controller(
        tmp_path / "c",
        vae=tiny_models["vae"],
        rnn=tiny_models["rnn"],
        latents=[tiny_models["latents"]],
        wm_env="dodge",
        popsize=6,
        rollouts=3,
        generations=2,
        eval_every=5,
        eval_rollouts=2,
        max_steps=10,
        common_seeds=common,
        progress=False,
    )
    train = [s for p, s in seen if p == 6]
    assert len(train) == 2
    for seeds in train:
        if common:
            assert seeds.shape == (3,)
        else:
            assert seeds.shape == (6, 3) and len(np.unique(seeds)) == 18
    assert not np.array_equal(train[0], train[1])  # new seeds every generation


def test_two_sample_tests_match_scipy_and_baselines_are_labelled():
    from wmlab.worldmodels import stats
    from wmlab.worldmodels.collect import BASELINES, baseline_policy

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 50, 40).astype(float), rng.integers(5, 60, 35).astype(float)
    u, p = stats.mann_whitney(a, b)
    t, pt = stats.welch(a, b)
    scipy_stats = pytest.importorskip("scipy.stats")
    ref_u = scipy_stats.mannwhitneyu(a, b, alternative="two-sided")
    assert u == ref_u.statistic and p == pytest.approx(ref_u.pvalue, rel=1e-9)  # same asymptotic method
    ref_t = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(ref_t.statistic) and pt == pytest.approx(ref_t.pvalue, abs=0.002)
    result = stats.compare(a, b)
    assert result["implementation"] == "scipy" and result["difference"] == pytest.approx(a.mean() - b.mean())
    uniform = baseline_policy("random_uniform", 1, 0)
    actions = np.stack([uniform.act(None) for _ in range(200)])
    assert len(np.unique(actions)) == 200  # a fresh action every frame
    hold = baseline_policy("random_hold", 1, 0)
    assert len(np.unique(np.stack([hold.act(None) for _ in range(200)]))) < 60  # held 1-10 frames
    assert all(label for _, label in BASELINES.values())
