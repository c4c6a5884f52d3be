"""DINO-WM checkpoints: safe loading, weight mapping, and the golden outputs of DINO-WM's own code."""

from __future__ import annotations

import os

import pytest
import torch
from tests_paths import FIXTURES

from wmlab.data import DatasetError
from wmlab.models.decoder import LatentDecoder
from wmlab.models.dino_wm_checkpoint import convert_dino_wm_run, load_pickled_checkpoint
from wmlab.models.world_model import LatentWorldModel

RUN = FIXTURES / "dino_wm" / "outputs" / "tiny_point_maze_a"
needs_fixture = pytest.mark.skipif(not RUN.is_dir(), reason=f"DINO-WM fixture run not found at {RUN}")


@pytest.fixture(scope="module")
def imported():
    converted = convert_dino_wm_run(RUN)
    model = LatentWorldModel(converted["config"])
    model.load_state_dict(converted["state"], strict=True)
    decoder = LatentDecoder(converted["decoder_config"])
    decoder.load_state_dict(converted["decoder_state"], strict=True)
    golden = torch.load(RUN / "golden.pt", weights_only=True)
    return converted, model.eval(), decoder.eval(), golden


@needs_fixture
def test_sizes_recovered_from_weights(imported):
    converted = imported[0]
    cfg = converted["config"]
    assert cfg.predictor["dim_head"] == 8  # not in hydra.yaml: from the qkv weight shape
    assert (cfg.num_visual_tokens, cfg.visual_dim, cfg.token_dim) == (4, 8, 12)
    assert (cfg.predictor["depth"], cfg.predictor["heads"], cfg.predictor["mlp_dim"]) == (2, 2, 16)
    assert (cfg.action_dim, cfg.action_emb_dim, cfg.proprio_emb_dim, cfg.num_hist) == (10, 2, 2, 3)
    assert converted["frameskip"] == 5


@needs_fixture
def test_reproduces_dino_wm_golden_outputs(imported):
    _, model, decoder, g = imported
    with torch.no_grad():
        z = model.embed(g["visual_latents"], g["proprio"], g["actions"][:, :3])
        torch.testing.assert_close(z, g["encoded_z"], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.predict(z), g["predicted_z"], atol=1e-5, rtol=0)
        rollout = model.rollout(g["visual_latents"], g["proprio"], g["actions"])
        torch.testing.assert_close(rollout["z"], g["rollout_z"], atol=1e-5, rtol=0)
        torch.testing.assert_close(rollout["visual"], g["rollout_visual"], atol=1e-5, rtol=0)
        torch.testing.assert_close(rollout["proprio"], g["rollout_proprio"], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            decoder(g["visual_latents"][:, 0]), g["decoded_first_frame"], atol=1e-5, rtol=0
        )


@needs_fixture
def test_batched_rollout_equals_one_candidate_at_a_time(imported):
    _, model, _, g = imported
    candidates = torch.randn(2, 5, 7, 10)  # (B, S, n + t, A)
    with torch.no_grad():
        batched = model.rollout(g["visual_latents"], g["proprio"], candidates)["z"]  # (B, S, 8, N, D)
        for s in range(5):
            single = model.rollout(g["visual_latents"], g["proprio"], candidates[:, s])["z"]
            torch.testing.assert_close(batched[:, s], single, atol=1e-5, rtol=0)


class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


class UnknownModule(torch.nn.Module):
    pass


def test_code_running_checkpoint_is_refused(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "model_latest.pth"
    torch.save({"epoch": 1, "predictor": Payload(sentinel)}, path)
    with pytest.raises(DatasetError, match="refusing to load"):
        load_pickled_checkpoint(path)
    assert not sentinel.exists()


def test_unknown_classes_are_refused(tmp_path):
    path = tmp_path / "model_latest.pth"
    torch.save({"epoch": 1, "predictor": UnknownModule()}, path)
    with pytest.raises(DatasetError, match="UnknownModule"):
        load_pickled_checkpoint(path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"hydra\.yaml"):
        convert_dino_wm_run(tmp_path)
    (tmp_path / "hydra.yaml").write_text("num_hist: 3\n")
    with pytest.raises(FileNotFoundError, match=r"model_latest\.pth"):
        convert_dino_wm_run(tmp_path)
