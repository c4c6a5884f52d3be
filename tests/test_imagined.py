"""`wmlab plan` shows what the world model imagined (wmlab.imagined): for the first n_videos episodes a
PNG of the real frames of the first plan's actions (re-simulated open loop) above the decoder's pictures
of the model's rollout of those same actions, each row ending with the goal."""

from __future__ import annotations

import json
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tiny_configs import PLAN_TEST_TRAIN, TINY_PLAN, train_config

from wmlab.cli import compose

GOAL_H, FRAME = 2, 32  # plan horizon (model steps); the tiny store's frames (and decoder output) in px


@pytest.fixture(scope="module")
def runs(tiny_store, tmp_path_factory):
    """A tiny run without a decoder and a copy of it with a 2-step decoder: (plain, decoded)."""
    from wmlab.train import train
    from wmlab.train_decoder import train_decoder

    root = tmp_path_factory.mktemp("imagined")
    plain = train(train_config(PLAN_TEST_TRAIN, tiny_store, root / "plain"))
    decoded = root / "decoded"
    shutil.copytree(plain, decoded)
    train_decoder(decoded, steps=2, batch_size=4, channel=8, n_res_block=1, n_res_channel=4,
                  save_every=2, progress=False, device="cpu")  # fmt: skip
    return plain, decoded


def plan(run_dir, out, *extra) -> tuple[dict, list]:
    """`wmlab plan` of the tiny run; returns (summary, the first plan's actions (B, T, A) as planned)."""
    from wmlab.evaluate import plan as plan_verb
    from wmlab.planning.policies import WorldModelPolicy

    first = []
    act = WorldModelPolicy.act

    def recording_act(self, obs):  # the first plan, as the planner chose it (independent of the module)
        out = act(self, obs)
        if not first:
            first.append(self.last_results[0].actions.detach().clone())
        return out

    overrides = [*TINY_PLAN, f"goal_H={GOAL_H}", f"run_dir={run_dir}", f"out={out}", *extra]
    cfg = OmegaConf.to_container(compose("plan", overrides), resolve=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(WorldModelPolicy, "act", recording_act)
        plan_verb(cfg)
    return json.loads((out / "summary.json").read_text()), first


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(K, 3, s, s) in [-1, 1] -> uint8 (K, s, s, 3), as a PNG tile stores it."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def tiles(row: np.ndarray, s: int) -> np.ndarray:
    """(s, K*s, 3) -> (K, s, s, 3)."""
    return np.stack(np.split(row, row.shape[1] // s, axis=1))


def test_plan_draws_the_imagined_rollout_of_the_first_plan_beside_the_real_one(runs, tmp_path):
    from wmlab.evaluate import harness_env, run_env
    from wmlab.planning.planning_model import PlanningModel, read_run_config
    from wmlab.train_decoder import load_decoder

    _, run = runs
    out = tmp_path / "cell"
    summary, first = plan(run, out, "n_videos=1")
    assert summary["imagined"] == ["imagined/episode_000.png"]  # only the first n_videos episodes
    assert sorted(p.name for p in (out / "imagined").iterdir()) == ["episode_000.png"]
    assert summary["imagined_decoder"] == f"run decoder {run / 'decoder.safetensors'}"
    image = iio.imread(out / "imagined" / "episode_000.png")
    assert image.shape == (2 * FRAME, (GOAL_H + 2) * FRAME, 3)  # 2 rows of T + 1 steps + the goal
    real_row, imagined_row = tiles(image[:FRAME], FRAME), tiles(image[FRAME:], FRAME)

    # Recompute both rows independently from the recorded first plan of episode 0.
    model = PlanningModel.from_run(run, device="cpu")
    assert model.world_model.cfg.latent_norm == "channel"  # the decoder must get raw_visual(latents)
    actions = first[0][:1]  # (1, T, A)
    assert actions.shape[1] == GOAL_H
    pair_seed = json.loads((out / "results.jsonl").read_text().splitlines()[0])["pair_seed"]
    env = harness_env(run_env(run, read_run_config(run), {}))
    try:
        start, goal = env.sample_start_goal(pair_seed)
        raw = model.env_actions(actions)[0]  # (T * frameskip, 2)
        env.reset(options={"state": start})
        real = [env.render()]
        for k in range(GOAL_H):
            for a in raw[k * model.frameskip : (k + 1) * model.frameskip]:
                env.step(a)
            real.append(env.render())
        env.set_state(goal)
        goal_frame = env.render()
    finally:
        env.close()
    np.testing.assert_array_equal(real_row, np.stack([*real, goal_frame]))  # the re-simulated frames

    decoder = load_decoder(run)
    with torch.no_grad():
        tokens, proprio = model.encode(real[0][None], start[None].astype(np.float32))
        latents = model.world_model.rollout(tokens[:, None], proprio[:, None], actions)["visual"][0]
        assert latents.shape[0] == GOAL_H + 1  # model steps 0..T
        imagined = decoder(model.world_model.raw_visual(latents))  # (T+1, 3, s, s)
        goal_decoded = decoder(model.encoder.encode(torch.as_tensor(goal_frame[None])))
    expected = to_uint8(torch.cat([imagined, goal_decoded]))
    assert np.abs(imagined_row.astype(int) - expected.astype(int)).max() <= 1  # fp rounding at most


def test_the_rollout_is_decoded_in_encoder_token_units(runs):
    """With the pixels encoder's exact inverse as the decoder, step 0 of the imagined rollout (the start
    frame's own tokens, through the model's standardised latents and back) is the start frame itself."""
    from wmlab.evaluate import harness_env, run_env
    from wmlab.imagined import imagine
    from wmlab.planning.planning_model import PlanningModel, read_run_config

    plain, _ = runs
    model = PlanningModel.from_run(plain, device="cpu")
    p, (g, _) = model.encoder.patch_size, model.encoder.info.grid

    def unpatchify(tokens):  # (M, g*g, p*p*3) -> (M, 3, g*p, g*p) in [-1, 1]: the pixels encoder, inverted
        x = tokens.reshape(len(tokens), g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(len(tokens), 3, g * p, g * p)

    env = harness_env(run_env(plain, read_run_config(plain), {}))
    try:
        start, _ = env.sample_start_goal(1)
        env.reset(options={"state": start})
        frame = env.render()  # (32, 32, 3)
    finally:
        env.close()
    actions = torch.randn(1, GOAL_H, model.world_model.cfg.action_dim)
    images = imagine(model, unpatchify, frame[None], start[None].astype(np.float32), actions)
    assert images.shape == (1, GOAL_H + 1, 3, FRAME, FRAME)
    target = torch.as_tensor(frame).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(images[0, 0], target, atol=1e-4)
    tokens, proprio = model.encode(frame[None], start[None].astype(np.float32))
    latent = model.world_model.rollout(tokens[:, None], proprio[:, None], actions)["visual"][:, 0]
    assert (unpatchify(latent)[0] - target).abs().mean() > 0.1  # the standardised latent is not a frame


def test_without_a_decoder_the_summary_says_which_were_looked_for(runs, tmp_path):
    plain, _ = runs
    out = tmp_path / "cell"
    summary, _ = plan(plain, out, "n_videos=2")
    assert summary["imagined"] == [] and not (out / "imagined").exists()
    note = summary["imagined_note"]
    assert str(plain / "decoder.safetensors") in note and "train-decoder" in note
    assert "encoder pixels" in note and "vae and dino_tok" in note


def test_an_encoder_with_its_own_decode_is_used_when_the_run_has_no_decoder(runs):
    from wmlab.imagined import find_decoder
    from wmlab.planning.planning_model import PlanningModel

    plain, _ = runs
    model = PlanningModel.from_run(plain, device="cpu")
    model.encoder.decode = lambda tokens: torch.full((len(tokens), 3, 8, 8), 0.75)  # [0, 1], as vae's
    decode, what = find_decoder(plain, model)
    assert what == "encoder pixels's own decode"
    assert torch.allclose(decode(torch.zeros(2, 4, 768)), torch.full((2, 3, 8, 8), 0.5))  # -> [-1, 1]
