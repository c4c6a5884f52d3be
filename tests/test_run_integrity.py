"""Training you can trust: a checkpoint is one atomic unit, exports never lead it, a kill or a full disk
resumes to the uninterrupted weights bit for bit, a second writer is refused, bad values never start."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_configs import QUIET_CPU, TINY_MODEL, train_config

import wmlab.train as train_module
from wmlab.integrity import LockHeld, UserError
from wmlab.runs import (
    RUN_CHECKPOINT,
    CheckpointWriteError,
    ExportMismatch,
    atomic_save_tensors,
    export_state,
    load_run,
    load_tensors,
    read_checkpoint,
    run_identity,
    trained_epochs,
)
from wmlab.train import TrainingError, train

TINY = [
    *TINY_MODEL,
    "frameskip=2",
    "num_hist=2",
    "training.batch_size=8",
    "training.max_steps_per_epoch=2",
    "training.val_batches=1",
    "training.rollout_eval_steps=2",
    *QUIET_CPU,
]
EPOCHS = 3


def cfg_for(store, run_dir, *extra) -> dict:
    epochs = [] if any(e.startswith("training.epochs=") for e in extra) else [f"training.epochs={EPOCHS}"]
    return train_config(TINY, store, run_dir, *epochs, *extra)


@pytest.fixture(scope="module")
def reference(tiny_store, tmp_path_factory):
    """The uninterrupted run: its exported weights after EPOCHS epochs."""
    run = train(cfg_for(tiny_store, tmp_path_factory.mktemp("reference") / "run"))
    return {"run": run, "weights": load_tensors(run / "model.safetensors")}


def assert_same_weights(run: Path, weights: dict) -> None:
    mine = load_tensors(run / "model.safetensors")
    assert mine.keys() == weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(mine[name], tensor), f"{name} differs from the uninterrupted run"


class Killed(BaseException):
    """Stands for SIGKILL in-process: nothing after it runs (not caught by `except Exception`)."""


def fail_replace(monkeypatch, target: Path, occurrence: int, when: str, error: BaseException) -> dict:
    """Make the ``occurrence``-th ``os.replace`` onto ``target`` raise ``error`` (before/after renaming)."""
    real, seen = os.replace, {"n": 0, "fired": False}

    def replace(src, dst, *args, **kwargs):
        if os.path.normpath(os.path.abspath(dst)) == os.path.normpath(os.path.abspath(target)):
            seen["n"] += 1
            if seen["n"] == occurrence:
                seen["fired"] = True
                if when == "after":
                    real(src, dst, *args, **kwargs)
                raise error
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return seen


def record_trained_epochs(monkeypatch) -> list[int]:
    """The epochs whose training batches were drawn (validation draws with another limit)."""
    trained, real = [], train_module.epoch_batches

    def spy(n, batch_size, seed, epoch, rank, world, limit=None):
        if limit == 2:  # training.max_steps_per_epoch; validation uses training.val_batches=1
            trained.append(epoch)
        return real(n, batch_size, seed, epoch, rank, world, limit)

    monkeypatch.setattr(train_module, "epoch_batches", spy)
    return trained


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
EROFS = OSError(errno.EROFS, os.strerror(errno.EROFS))
CASES = {  # name: (file, when, error, epochs committed when it fires)
    "kill_before_checkpoint_rename": (RUN_CHECKPOINT, "before", Killed(), 1),
    "kill_after_checkpoint_rename": (RUN_CHECKPOINT, "after", Killed(), 2),
    "kill_after_weights_export": (Path("model.safetensors"), "after", Killed(), 2),
    "disk_full_on_checkpoint": (RUN_CHECKPOINT, "before", ENOSPC, 1),
    "disk_full_on_metadata_export": (Path("metadata.json"), "before", ENOSPC, 2),
    "read_only_on_checkpoint": (RUN_CHECKPOINT, "before", EROFS, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_interrupted_checkpoint_resumes_to_the_uninterrupted_weights(case, tiny_store, tmp_path, reference):
    name, when, error, committed = CASES[case]
    run = tmp_path / "run"
    with monkeypatch_context() as mp:
        seen = fail_replace(mp, run / name, occurrence=2, when=when, error=error)  # epoch 2's save
        expected = CheckpointWriteError if isinstance(error, OSError) else Killed
        with pytest.raises(expected) as caught:
            train(cfg_for(tiny_store, run))
    assert seen["fired"], f"no write to {name} happened"
    if expected is CheckpointWriteError:  # one line naming the path, what is intact and the fix
        message = str(caught.value)
        assert "\n" not in message and str(run) in message and os.strerror(error.errno) in message
        assert ("is intact" in message) if committed == 1 else ("was saved" in message)
    assert trained_epochs(run) == committed
    if name == RUN_CHECKPOINT and committed == 2:  # the export lags the checkpoint: a reader repairs it
        assert export_state(run / RUN_CHECKPOINT) == "lags"
        load_run(run)
        assert export_state(run / RUN_CHECKPOINT) == "current"
        ckpt = load_tensors(run / RUN_CHECKPOINT)
        for key, tensor in load_tensors(run / "model.safetensors").items():
            assert torch.equal(tensor, ckpt[f"model.{key}"]), key
    with monkeypatch_context() as mp:
        trained = record_trained_epochs(mp)
        train(cfg_for(tiny_store, run))
    assert trained == list(range(committed, EPOCHS)), "a committed epoch was trained again"
    assert_same_weights(run, reference["weights"])
    meta = json.loads((run / "metadata.json").read_text())
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3]
    assert meta["checkpoint"]["checkpoint_progress"] == EPOCHS
    assert not list(run.rglob("*.partial"))


def monkeypatch_context():
    return pytest.MonkeyPatch.context()


@pytest.mark.parametrize("point", ["checkpoint_tmp_written:2", "checkpoint_committed:2"])
def test_sigkill_inside_a_checkpoint_write_resumes_exactly(point, tiny_store, tmp_path, reference):
    """A real SIGKILL (WMLAB_FAULT_KILL hook) inside epoch 2's checkpoint write, in a subprocess."""
    run = tmp_path / "run"
    code = (
        "import json, sys, torch; torch.set_num_threads(1); from wmlab.train import train; "
        "train(json.loads(sys.argv[1]))"
    )
    env = {**os.environ, "WMLAB_FAULT_KILL": point, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(cfg_for(tiny_store, run))], env=env, capture_output=True
    )
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    assert trained_epochs(run) == (1 if point.startswith("checkpoint_tmp") else 2)
    train(cfg_for(tiny_store, run))  # the dead writer's lock is stale and its temp file is cleaned up
    assert_same_weights(run, reference["weights"])
    assert not list(run.rglob("*.partial")) and not list(tmp_path.glob(".*.lock"))


def test_an_export_that_disagrees_with_its_checkpoint_is_refused(tiny_store, tmp_path):
    run = train(cfg_for(tiny_store, tmp_path / "run", "training.epochs=1"))
    weights = load_tensors(run / "model.safetensors")
    atomic_save_tensors(
        weights, run / "model.safetensors", {"checkpoint_sha256": "0" * 64, "checkpoint_progress": 7}
    )
    with pytest.raises(ExportMismatch, match=r"model\.safetensors \(step 7.*disagrees with .*checkpoint"):
        load_run(run)
    with pytest.raises(ExportMismatch):
        train(cfg_for(tiny_store, run, "training.epochs=2"))


def test_a_good_checkpoint_needs_finite_validation_loss_and_weights(tiny_store, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = train_module.evaluate
    calls = {"n": 0}

    def evaluate(model, *args, **kwargs):
        calls["n"] += 1
        out = real(model, *args, **kwargs)
        if calls["n"] == 2:  # epoch 2: finite train loss, NaN validation loss
            out["z_visual_loss"] = float("nan")
        if calls["n"] == 3:  # epoch 2 again: weights blown up to 1e9 (finite, but diverged)
            with torch.no_grad():
                next(model.parameters()).fill_(1e9)
        return out

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    train(cfg_for(tiny_store, run, "training.epochs=1"))
    good = load_tensors(run / "model.safetensors")
    with pytest.raises(TrainingError, match=r"epoch 2 .*non-finite val_z_visual_loss=nan; it was not saved"):
        train(cfg_for(tiny_store, run, "training.epochs=2"))
    with pytest.raises(
        TrainingError, match=r"epoch 2 .*diverged weights .*Last good checkpoint: .*\(epoch 1,"
    ):
        train(cfg_for(tiny_store, run, "training.epochs=2"))
    assert trained_epochs(run) == 1
    for name, tensor in load_tensors(run / "model.safetensors").items():
        assert torch.equal(tensor, good[name]), name
    history = json.loads((run / "metadata.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1]


def test_resume_applies_and_records_optimizer_changes_and_refuses_others(tiny_store, tmp_path):
    run = tmp_path / "run"
    train(cfg_for(tiny_store, run, "training.epochs=1"))
    with pytest.raises(
        TrainingError, match=r"has finished \(epoch 1 of 1\), so training\.predictor_lr: 0\.0005 -> "
    ):
        train(cfg_for(tiny_store, run, "training.epochs=1", "training.predictor_lr=1e-4"))
    with pytest.raises(TrainingError, match=r"different config: training\.batch_size: 8 -> 4"):
        train(cfg_for(tiny_store, run, "training.epochs=2", "training.batch_size=4"))
    assert trained_epochs(run) == 1
    train(cfg_for(tiny_store, run, "training.epochs=2", "training.action_encoder_lr=2e-4"))
    header = read_checkpoint(run / RUN_CHECKPOINT)
    assert [g["lr"] for g in header["optimizer"]["param_groups"]] == [5e-4, 2e-4]
    change = header["state"]["config_changes"][-1]
    assert change["epoch"] == 1 and "training.action_encoder_lr: 0.0005 -> 0.0002" in change["changes"]
    assert (
        json.loads((run / "metadata.json").read_text())["config_changes"] == header["state"]["config_changes"]
    )


@pytest.mark.parametrize(
    "override, key",
    [
        ("training.batch_size=0", "training.batch_size"),
        ("training.epochs=-1", "training.epochs"),
        ("training.epochs=0", "training.epochs"),
        ("training.predictor_lr=0", "training.predictor_lr"),
        ("training.action_encoder_lr=-1e-3", "training.action_encoder_lr"),
        ("training.max_steps_per_epoch=0", "training.max_steps_per_epoch"),
        ("training.grad_clip=-1", "training.grad_clip"),
        ("num_hist=0", "num_hist"),
        ("frameskip=0", "frameskip"),
    ],
)
def test_values_that_cannot_train_are_refused_before_anything_is_written(override, key, tiny_store, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(UserError, match=rf"^{key}=.* is not valid: it must be "):
        train(cfg_for(tiny_store, run, override))
    assert not run.exists() and not list(tmp_path.iterdir())


def test_train_decoder_values_are_refused(tmp_path):
    from wmlab.train_decoder import train_decoder

    for kwargs, key in (({"steps": 0}, "steps"), ({"batch_size": 0}, "batch_size"), ({"lr": -1.0}, "lr")):
        with pytest.raises(UserError, match=rf"train-decoder {key}=.* is not valid"):
            train_decoder(tmp_path / "run", progress=False, **kwargs)
    assert not list(tmp_path.iterdir())


def test_a_second_writer_is_refused_with_who_holds_the_lock(tiny_store, tmp_path):
    from wmlab.train_decoder import train_decoder
    from wmlab.training.vae import train_vae

    done = train(cfg_for(tiny_store, tmp_path / "done", "training.epochs=1"))
    run, vae = tmp_path / "run", tmp_path / "vae"
    code = (
        "import sys, time; from wmlab.integrity import WriterLock\n"
        "for target in sys.argv[1:]: WriterLock(target, 'test holder').acquire()\n"
        "print('held', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(run), str(done), str(vae)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in done.rglob("*"))
        with pytest.raises(LockHeld, match=rf"training run {run} is being written by pid {holder.pid}"):
            train(cfg_for(tiny_store, run))
        assert not run.exists()
        with pytest.raises(LockHeld, match=rf"pid {holder.pid}"):
            train(cfg_for(tiny_store, done, "training.epochs=2"))
        with pytest.raises(LockHeld, match=rf"pid {holder.pid}"):
            train_decoder(done, steps=2, progress=False, device="cpu")
        with pytest.raises(LockHeld, match=rf"VAE training run {vae} .*pid {holder.pid}"):
            train_vae(np.zeros((8, 64, 64, 3), np.uint8), vae, steps=1, progress=False, device="cpu")
        assert sorted(p.name for p in done.rglob("*")) == before and not vae.exists()
    finally:
        holder.kill()
        holder.wait()


def test_run_identity_names_config_and_weights_not_the_directory(tiny_store, tmp_path, reference):
    import shutil

    identity = run_identity(reference["run"])
    assert set(identity) == {
        "config_fingerprint",
        "weights_sha256",
        "normalization_sha256",
        "dataset_fingerprint",
    }
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(reference["run"], moved)
    assert run_identity(moved) == identity  # where a run lives is not what it is
    other = train(cfg_for(tiny_store, tmp_path / "other", "training.epochs=2"))
    assert run_identity(other)["weights_sha256"] != identity["weights_sha256"]
    assert run_identity(other)["config_fingerprint"] == identity["config_fingerprint"]  # training.* aside
    imported = tmp_path / "imported"  # the layout import-dino-wm writes: no checkpoint at all
    imported.mkdir()
    for name in ("config.yaml", "model.safetensors", "metadata.json", "normalization.json"):
        shutil.copy(reference["run"] / name, imported / name)
    assert run_identity(imported)["weights_sha256"] == identity["weights_sha256"]
    load_run(imported)


def test_runs_of_the_older_layout_still_load_and_resume(tiny_store, tmp_path, reference):
    """checkpoint/{model,optimizer}.safetensors + state.json: what wmlab wrote before one-file checkpoints."""
    run = train(cfg_for(tiny_store, tmp_path / "run", "training.epochs=1"))
    header, tensors = read_checkpoint(run / RUN_CHECKPOINT), load_tensors(run / RUN_CHECKPOINT)
    ckpt = run / "checkpoint"
    model = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    optimizer = {k[len("opt.") :]: v for k, v in tensors.items() if k.startswith("opt.")}
    atomic_save_tensors(model, ckpt / "model.safetensors")
    atomic_save_tensors({**optimizer, "rng.torch": tensors["rng.torch"]}, ckpt / "optimizer.safetensors")
    atomic_save_tensors(model, run / "model.safetensors", {"epoch": 1})
    state = header["state"]
    (ckpt / "state.json").write_text(
        json.dumps({"epoch": 1, "global_step": state["global_step"], "optimizer": header["optimizer"]})
    )
    old_meta = {k: v for k, v in state.items() if k not in ("config", "global_step", "config_changes")}
    (run / "metadata.json").write_text(json.dumps(old_meta))
    (run / RUN_CHECKPOINT).unlink()
    assert trained_epochs(run) == 1
    load_run(run)
    train(cfg_for(tiny_store, run))
    assert_same_weights(run, reference["weights"])
    assert read_checkpoint(run / RUN_CHECKPOINT) is not None and not (ckpt / "state.json").exists()


def test_vae_checkpoint_is_one_unit(tiny_store, tmp_path, monkeypatch):
    """The runs.py trainers share the design: a kill just after the VAE checkpoint commits resumes exactly."""
    from wmlab.models.vae import load_vae
    from wmlab.training.vae import train_vae

    kwargs = dict(z_dim=4, channels=[4, 8, 8, 8], batch_size=4, save_every=2, progress=False, device="cpu")
    straight = load_vae(train_vae(tiny_store.path, tmp_path / "a", steps=4, **kwargs))
    out = tmp_path / "b"
    with monkeypatch.context() as mp:
        seen = fail_replace(mp, out / "checkpoint.safetensors", occurrence=2, when="after", error=Killed())
        with pytest.raises(Killed):
            train_vae(tiny_store.path, out, steps=4, **kwargs)
    assert seen["fired"]
    assert json.loads((out / "vae.json").read_text())["step"] == 2  # the export lags the checkpoint
    resumed = load_vae(train_vae(tiny_store.path, out, steps=4, **kwargs))
    assert json.loads((out / "vae.json").read_text())["step"] == 4
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
