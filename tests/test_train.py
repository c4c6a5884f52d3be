"""Training: run directory contents, rebuild from it, resume after a kill, NaN stops with a message."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny_configs import QUIET_CPU, TINY_MODEL, train_config

from wmlab.runs import load_run, load_tensors, trained_epochs
from wmlab.train import TrainingError, train

TINY = [
    *TINY_MODEL,
    "frameskip=2",
    "num_hist=2",
    "training.batch_size=8",
    "training.max_steps_per_epoch=4",
    "training.val_batches=2",
    "training.rollout_eval_steps=3",
    *QUIET_CPU,
]


def tiny_cfg(store, run_dir, *extra) -> dict:
    return train_config(TINY, store, run_dir, *extra)


def test_train_writes_a_run_that_rebuilds_itself(tiny_store, tmp_path):
    run_dir = train(tiny_cfg(tiny_store, tmp_path / "run", "training.epochs=2"))
    for name in (
        "config.yaml",
        "model.safetensors",
        "normalization.json",
        "metadata.json",
        "checkpoint/checkpoint.safetensors",
    ):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.rglob("*.partial"))
    meta = json.loads((run_dir / "metadata.json").read_text())
    assert [h["epoch"] for h in meta["history"]] == [1, 2]
    assert {"val_z_visual_loss", "val_copy_last_visual_loss", "rollout_nmse_3"} <= set(meta["history"][-1])
    assert meta["encoder"]["name"] == "pixels" and meta["dataset"]["fingerprint"] == tiny_store.fingerprint()
    assert list((run_dir / "tb").iterdir()), "TensorBoard events must be written"
    model, cfg = load_run(run_dir)
    assert cfg["num_hist"] == 2
    B, N, D = 3, model.cfg.num_visual_tokens, model.cfg.visual_dim
    out = model.rollout(
        torch.randn(B, 2, N, D), torch.randn(B, 2, 4), torch.randn(B, 6, 4, 4)
    )  # (B, S, n+t, A)
    assert out["visual"].shape == (B, 6, 2 + 2 + 1, N, D)


def test_resume_continues_from_the_last_epoch(tiny_store, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(tiny_store, run, "training.epochs=1"))
    first = trained_epochs(run)
    train(tiny_cfg(tiny_store, run, "training.epochs=3"))
    meta = json.loads((run / "metadata.json").read_text())
    assert first == 1 and [h["epoch"] for h in meta["history"]] == [1, 2, 3]
    with pytest.raises(TrainingError, match=r"different model: predictor\.depth: 1 -> 2"):
        train(tiny_cfg(tiny_store, run, "training.epochs=4", "predictor.depth=2"))


def test_nan_loss_stops_names_the_last_good_checkpoint_and_its_fix_works(tiny_store, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(tiny_store, run, "training.epochs=1"))
    good = load_tensors(run / "model.safetensors")
    # A learning rate that blows up; the advised fix (a lower one) must then take effect on resume.
    with pytest.raises(TrainingError) as caught:
        train(tiny_cfg(tiny_store, run, "training.epochs=2", "training.predictor_lr=1e30"))
    message = str(caught.value)
    assert re.search(r"epoch 2\b.*Last good checkpoint: .*checkpoint\.safetensors \(epoch 1,", message), (
        message
    )
    assert "training.predictor_lr=1e+29" in message and "\n" not in message
    assert trained_epochs(run) == 1  # the diverged epoch was never saved ...
    for name, tensor in load_tensors(run / "model.safetensors").items():  # ... nor exported
        assert torch.equal(tensor, good[name]), name
    train(tiny_cfg(tiny_store, run, "training.epochs=2", "training.predictor_lr=1e-4"))
    meta = json.loads((run / "metadata.json").read_text())
    assert [h["epoch"] for h in meta["history"]] == [1, 2]
    assert all(
        math.isfinite(h["train_loss"]) and math.isfinite(h["val_z_visual_loss"]) for h in meta["history"]
    )
    assert meta["config_changes"][-1]["changes"] == [
        "training.epochs: 1 -> 2",
        "training.predictor_lr: 0.0005 -> 0.0001",
    ]
    assert meta["optimizer"]["param_groups"][0]["lr"] == 1e-4  # the checkpoint's own lr did not win


@pytest.mark.slow
def test_killed_training_resumes_and_finishes(tiny_store, tmp_path):
    run = tmp_path / "run"
    args = [
        *TINY,
        f"data={tiny_store.path}",
        f"run_dir={run}",
        "training.epochs=4",
        "training.max_steps_per_epoch=20",
    ]
    command = [sys.executable, "-m", "wmlab.cli", "train", *args]
    process = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    state = run / "checkpoint" / "checkpoint.safetensors"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline:
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)  # mid-way through a later epoch
    process.wait()
    done = trained_epochs(run)
    assert 1 <= done < 4
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    meta = json.loads((run / "metadata.json").read_text())
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3, 4]


def test_decoder_is_its_own_resumable_stage(tiny_store, tmp_path):
    from wmlab.train_decoder import load_decoder, train_decoder

    run = train(tiny_cfg(tiny_store, tmp_path / "run", "training.epochs=1"))
    small = dict(
        batch_size=4, channel=8, n_res_block=1, n_res_channel=4, save_every=3, progress=False, device="cpu"
    )
    train_decoder(run, steps=6, **small)
    first = json.loads((run / "decoder.json").read_text())
    train_decoder(run, steps=9, **small)
    state = json.loads((run / "decoder.json").read_text())
    assert [h["step"] for h in state["history"]] == [3, 6, 9] and first["step"] == 6
    decoder = load_decoder(run)
    model, _ = load_run(run)
    tokens = torch.randn(2, model.cfg.num_visual_tokens, model.cfg.visual_dim)
    assert decoder(tokens).shape == (2, 3, 16 * 4, 16 * 4)  # a 4x4 grid decodes to 64 px
    # What the model imagines, decoded: real and imagined rows for each validation window.
    import imageio.v3 as iio

    image = iio.imread(run / "decoded_rollout.png")
    horizon = int(tiny_cfg(tiny_store, run)["training"]["rollout_eval_steps"])
    assert image.shape[1] == 64 * horizon and image.shape[0] % (2 * 64) == 0
    assert any("events" in p.name for p in (run / "tb").iterdir())


def test_delta_model_starts_as_copy_last_and_learns_at_once():
    from wmlab.models.world_model import LatentWorldModel, WorldModelConfig

    small = {"depth": 1, "heads": 2, "dim_head": 4, "mlp_dim": 8, "dropout": 0.0}
    delta = LatentWorldModel(
        WorldModelConfig(visual_dim=6, num_visual_tokens=4, predict_delta=True, predictor=small)
    )
    z = torch.randn(2, 3, 4, delta.cfg.token_dim)
    torch.testing.assert_close(delta.predict(z), z)  # at init: the copy-last-frame model
    # ... whose head gets a gradient at once, and can give some tokens a change and others none.
    loss = (delta.predict(z) - z.roll(1, dims=2)).square().mean()
    loss.backward()
    assert delta.delta_head.weight.grad.abs().sum() > 0
    dino_wm = LatentWorldModel(WorldModelConfig(visual_dim=6, num_visual_tokens=4, predictor=small))
    assert not hasattr(dino_wm, "delta_head")  # DINO-WM's own output is unchanged


def test_the_optimizer_trains_every_parameter_of_the_model():
    from wmlab.models.world_model import LatentWorldModel, WorldModelConfig
    from wmlab.train import make_optimizer

    small = {"depth": 1, "heads": 2, "dim_head": 4, "mlp_dim": 8}
    model = LatentWorldModel(
        WorldModelConfig(visual_dim=6, num_visual_tokens=4, predict_delta=True, predictor=small)
    )
    optimizer = make_optimizer(model, {"predictor_lr": 1e-3, "action_encoder_lr": 2e-3})
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}
    assert len(optimized) == sum(len(g["params"]) for g in optimizer.param_groups)  # each once


@pytest.mark.parametrize("concat_dim", [1, 0])
def test_the_no_proprio_arm_sees_no_proprio_and_scores_only_the_visual_part(concat_dim):
    from wmlab.models.world_model import LatentWorldModel, WorldModelConfig

    torch.manual_seed(0)
    small = {"depth": 1, "heads": 2, "dim_head": 4, "mlp_dim": 8, "dropout": 0.0}
    width = {} if concat_dim == 1 else {"action_emb_dim": 6, "proprio_emb_dim": 6}
    cfg = dict(
        visual_dim=6, num_visual_tokens=4, action_dim=4, concat_dim=concat_dim, predictor=small, **width
    )
    arm = LatentWorldModel(WorldModelConfig(**cfg, use_proprio=False))
    batch = {
        "visual": torch.randn(2, 4, 4, 6),
        "proprio": torch.randn(2, 4, 4),
        "actions": torch.randn(2, 4, 4),
    }
    other = {**batch, "proprio": torch.randn(2, 4, 4) * 100}  # wildly different proprio: no effect at all
    loss, parts = arm.loss(batch)
    torch.testing.assert_close(loss, arm.loss(other)[0])
    torch.testing.assert_close(loss, parts["z_visual_loss"])  # the scored part is the visual one alone
    actions = torch.randn(2, 5, 4, 4)  # (B, S, n + t, A)
    rolled = arm.rollout(batch["visual"][:, :3], batch["proprio"][:, :3], actions)
    again = arm.rollout(batch["visual"][:, :3], other["proprio"][:, :3], actions)
    torch.testing.assert_close(rolled["visual"], again["visual"])  # plans cannot depend on proprio either
    full = LatentWorldModel(WorldModelConfig(**cfg))
    full.load_state_dict(arm.state_dict())  # same parameters: the arm changes inputs, not the model
    assert not torch.allclose(full.loss(batch)[0], full.loss(other)[0])


def test_proprio_false_is_a_train_option_recorded_in_the_model(tiny_store, tmp_path):
    run_dir = train(tiny_cfg(tiny_store, tmp_path / "run", "training.epochs=1", "proprio=false"))
    model, cfg = load_run(run_dir)
    assert cfg["proprio"] is False and model.cfg.use_proprio is False


def test_switches_refuse_words_that_would_silently_mean_on(tiny_store, tmp_path):
    for bad in ("proprio=maybe", "predict_delta=yes"):
        with pytest.raises(Exception, match="must be true or false"):
            train(tiny_cfg(tiny_store, tmp_path / "run", bad))
    assert not (tmp_path / "run").exists()
