"""The study trains the in-domain DINO-Tok tokenizer itself, like the VAE: one per seed, on the study's
training episodes only, keyed by what it is trained from (a tiny random DINOv2 stands in for the hub's)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from tests.test_study import TINY_TRAIN, read_jsonl, study_cfg
from wmlab.study import Study, run_stage, run_study

#: tiny tokenizer settings (the study's `tokenizer:` block; proj_hidden / decoder_channel pass through)
TINY_TOKENIZER = {"steps": 3, "batch_size": 4, "lr": 2e-3, "latent_dim": 8, "input_size": 32,
                  "dinov2_size": "small", "proj_hidden": 16, "decoder_channel": 8}  # fmt: skip
TINY_PLAN = ["n_evals=2", "goal_H=2", "max_steps=4", "planner.samples=4", "planner.topk=2",
             "planner.opt_steps=1", "n_videos=0"]  # fmt: skip


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WMLAB_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory, offline):
    """A tiny randomly initialised DINOv2 in the Hub layout (as tests/test_encoders_vfm_dinotok.py)."""
    from transformers import Dinov2Config, Dinov2Model

    path = tmp_path_factory.mktemp("dinov2") / "tiny_dinov2"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                              patch_size=14, mlp_ratio=2)  # fmt: skip
        Dinov2Model(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok_store(tiny_store, tmp_path_factory):
    """A private copy of the tiny dataset: a study writes feature caches beside its dataset."""
    from wmlab.data.store import TrajectoryStore

    copy = tmp_path_factory.mktemp("tok_data") / "tiny.zarr"
    shutil.copytree(tiny_store.path, copy)
    return TrajectoryStore(copy)


def tok_cfg(store, study_dir, dinov2, **tokenizer) -> dict:
    return study_cfg(
        store, study_dir, encoders=["dino_tok"], encoder_overrides={}, seeds=[0, 1], baselines=[],
        train=[*TINY_TRAIN, "training.max_steps_per_epoch=1"], plan=TINY_PLAN,
        tokenizer={**TINY_TOKENIZER, "dinov2_weights": str(dinov2), **tokenizer}, report=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tok_study(tok_store, tiny_dinov2, tmp_path_factory):
    study_dir = tmp_path_factory.mktemp("tok_study")
    cfg = tok_cfg(tok_store, study_dir, tiny_dinov2)
    run_study(cfg)
    return cfg


def _tokenizer_dirs(study_dir):
    return sorted(
        p for p in (study_dir / "encoders").glob("dino_tok__seed*") if (p / "tokenizer.json").is_file()
    )


def _stamps(study_dir) -> dict:
    return {p: p.stat().st_mtime_ns for p in (study_dir / "encoders").rglob("*") if p.is_file()}


def test_the_study_trains_one_tokenizer_per_seed_on_its_training_episodes(tok_study):
    from safetensors.torch import load_file

    study_dir = Path(tok_study["study_dir"])
    study = Study(tok_study)
    train, val = study.split
    assert train and val and not set(train) & set(val)
    dirs = [study.tokenizer_dir("dino_tok", s) for s in (0, 1)]
    assert dirs[0] != dirs[1] and _tokenizer_dirs(study_dir) == sorted(dirs)
    for seed, d in zip((0, 1), dirs):
        meta = json.loads((d / "tokenizer.json").read_text())
        assert meta["step"] == meta["steps"] == 3 and meta["seed"] == seed
        assert meta["data"]["episodes"] == train and meta["data"]["episodes_given"] is True
        assert meta["data"]["val_episodes"] == len(val)  # validated on the held-out episodes only
    a, b = (load_file(str(d / "tokenizer.safetensors")) for d in dirs)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # seeded per seed
    # the world models were trained on those weights, and every cell ran: no failure
    for seed, d in zip((0, 1), dirs):
        run = json.loads((study_dir / "runs" / f"dino_tok__seed{seed}" / "metadata.json").read_text())
        assert str(d) in json.dumps(run)
    assert read_jsonl(study_dir / "results" / "failures.jsonl") == []
    assert {(r["encoder"], r["seed"]) for r in read_jsonl(study_dir / "results" / "episodes.jsonl")} == {
        ("dino_tok", 0),
        ("dino_tok", 1),
    }
    assert "prepare:dino_tok" in json.loads((study_dir / "study.json").read_text())["stage_seconds"]


def test_rerunning_the_study_trains_no_tokenizer_again(tok_study, monkeypatch):
    import wmlab.training.tokenizer

    study_dir = Path(tok_study["study_dir"])
    before = _stamps(study_dir)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished tokenizer was trained again")

    monkeypatch.setattr(wmlab.training.tokenizer, "train_tokenizer", refuse)
    run_study(tok_study)
    assert _stamps(study_dir) == before  # same directories, nothing rewritten
    assert read_jsonl(study_dir / "results" / "failures.jsonl") == []


def test_other_tokenizer_settings_train_new_tokenizers(tok_study):
    study_dir = Path(tok_study["study_dir"])
    old = _tokenizer_dirs(study_dir)
    cfg = {**tok_study, "tokenizer": {**tok_study["tokenizer"], "lr": 1e-3}}
    run_stage(cfg, "cache", "dino_tok")  # the encoder's preparation only (tokenizers + feature caches)
    new = [Study(cfg).tokenizer_dir("dino_tok", s) for s in (0, 1)]
    assert not set(new) & set(old) and all((d / "tokenizer.safetensors").is_file() for d in new)
    assert json.loads((new[0] / "tokenizer.json").read_text())["lr"] == 1e-3
    # merge-only and cluster cell jobs never train one: a missing tokenizer is reported, not computed
    fresh = {**tok_study, "tokenizer": {**tok_study["tokenizer"], "steps": 2}}
    run_stage(fresh, "cell", "dino_tok__seed0")
    (row,) = read_jsonl(study_dir / "failures" / "dino_tok__seed0.jsonl")
    assert row["stage"] == "prepare" and "the cache job of 'dino_tok' did not finish" in row["message"]
    assert not (Study(fresh).tokenizer_dir("dino_tok", 0) / "tokenizer.json").exists()


def test_train_tokenizer_takes_training_episodes_and_refuses_to_resume_on_others(
    tok_store, tiny_dinov2, tmp_path, monkeypatch
):
    from wmlab.runs import ResumeMismatch
    from wmlab.training.tokenizer import train_tokenizer

    committed = [int(e) for e in tok_store.committed]
    train = committed[:4]
    read = []
    frames = tok_store.frames
    monkeypatch.setattr(tok_store, "frames", lambda e, t, **kw: read.append(int(e)) or frames(e, t, **kw))
    kw = {**TINY_TOKENIZER, "steps": 2, "batch_size": 2, "dinov2_weights": str(tiny_dinov2)}
    out = train_tokenizer(tok_store, tmp_path / "tok", episodes=train, progress=False, device="cpu", **kw)
    n_val = 4 * 2  # the fixed validation batch is read first, then 2 steps x 2 frames
    assert len(read) == n_val + 4
    assert set(read[:n_val]) <= set(committed) - set(train) and set(read[n_val:]) <= set(train)
    data = json.loads((out / "tokenizer.json").read_text())["data"]
    assert data["episodes"] == train and data["val_episodes"] == len(committed) - len(train)
    for other in (train[:3], None):  # other episodes (or the DINO-WM split) never resume silently
        with pytest.raises(ResumeMismatch, match="other episodes"):
            train_tokenizer(
                tok_store, out, episodes=other, progress=False, device="cpu", **{**kw, "steps": 3}
            )
    with pytest.raises(ValueError, match="not committed"):
        train_tokenizer(tok_store, tmp_path / "t2", episodes=[999], progress=False, device="cpu", **kw)
