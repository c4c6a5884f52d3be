"""A trained run ready to plan: world model + its frozen encoder + normalisation + frameskip.

``PlanningModel.from_run(run_dir)`` works for wmlab runs and for DINO-WM runs converted by
``import_dino_wm`` (those carry no normalisation statistics: DINO-WM computes them over its whole
dataset, so ``data=`` must point at that dataset and they are recomputed the same way).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wmlab.data.normalization import NormalizationStats
from wmlab.integrity import UserError


class RunConfigError(UserError, ValueError):
    """A run's ``config.yaml`` (or a DINO-WM ``hydra.yaml``) is not valid YAML or not a mapping."""


def load_yaml_mapping(path: str | Path, fix: str) -> dict:
    """The YAML mapping in ``path``; unparsable or non-mapping content is a one-line error naming the
    file, the line and ``fix`` (never a ParserError about ``<unicode string>``)."""
    import yaml

    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise RunConfigError(f"{path} is not valid YAML ({problem}{line}); {fix}") from err
    except UnicodeDecodeError as err:
        raise RunConfigError(f"{path} is not a text file ({err}); {fix}") from err
    if not isinstance(cfg, dict):
        raise RunConfigError(f"{path} holds a {type(cfg).__name__}, not a mapping of settings; {fix}")
    return cfg


def read_run_config(run_dir: str | Path) -> dict:
    """``<run>/config.yaml`` as a dict; a missing, unparsable or non-mapping file is a one-line error."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {Path(run_dir)} a wmlab run directory?")
    return load_yaml_mapping(path, "restore it, or re-create the run (train or import it again)")


class PlanningModel:
    """encode(frames, proprio) -> tokens and normalised proprio; env_actions(plan) -> raw actions."""

    def __init__(self, world_model, encoder, stats: NormalizationStats, frameskip: int, device="cpu") -> None:
        self.world_model = world_model.eval().requires_grad_(False)
        self.encoder = encoder.eval().requires_grad_(False)
        self.stats, self.frameskip, self.device = stats, int(frameskip), torch.device(device)
        env_action_dim = len(stats.action_mean)
        if world_model.cfg.action_dim != env_action_dim * self.frameskip:
            raise ValueError(
                f"the model plans {world_model.cfg.action_dim}-D model-step actions, but the env's "
                f"{env_action_dim}-D actions x frameskip {self.frameskip} = {env_action_dim * self.frameskip}"
            )
        info = encoder.info
        if (info.num_tokens, info.dim) != (world_model.cfg.num_visual_tokens, world_model.cfg.visual_dim):
            raise ValueError(
                f"encoder {info.name} gives {info.num_tokens} x {info.dim} tokens but the world model "
                f"expects {world_model.cfg.num_visual_tokens} x {world_model.cfg.visual_dim}"
            )

    @classmethod
    def from_run(
        cls, run_dir, *, device="cpu", data=None, encoder=None, encoder_weights=None
    ) -> PlanningModel:
        """Load ``run_dir``. ``encoder``: an Encoder to use instead of the run's (same token shape);
        ``encoder_weights``: where the run's encoder weights are (hub id or local path)."""
        from wmlab.runs import build_encoder, load_run

        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(
                f"{run_dir} is not a wmlab run (no config.yaml). Train one with `wmlab train`, or convert a "
                "DINO-WM run with `wmlab import-dino-wm <ckpt_base_path>/outputs/<model_name>`."
            )
        read_run_config(run_dir)  # a broken config.yaml is named here, not as a YAML traceback
        model, cfg = load_run(run_dir, device=device)
        stats = cls._stats(run_dir, cfg, data)  # first: a missing dataset is the cheaper mistake to report
        if encoder is None:
            enc_cfg = dict(cfg["encoder"])
            if encoder_weights is not None:
                enc_cfg["weights"] = encoder_weights
            encoder = build_encoder(enc_cfg, torch.device(device))
        return cls(model, encoder.to(device), stats, int(cfg["frameskip"]), device)

    @staticmethod
    def _stats(run_dir: Path, cfg: dict, data) -> NormalizationStats:
        if (run_dir / "normalization.json").is_file():
            return NormalizationStats.load(run_dir / "normalization.json")
        if cfg.get("normalization") != "dino_wm_all_data":
            raise FileNotFoundError(f"{run_dir / 'normalization.json'} is missing")
        if data is None:
            raise ValueError(
                f"{run_dir} is an imported DINO-WM run: DINO-WM keeps no normalisation statistics, they "
                "come from its dataset. Pass data=<the DINO-WM point_maze folder or a wmlab dataset>."
            )
        from wmlab.data import open_dataset

        store = open_dataset(data)
        lengths = np.asarray(store.lengths)
        # DINO-WM normalises with statistics over all trajectories (before its train/val split).
        return NormalizationStats.compute(store.all_actions(), store.all_states(), lengths)

    @torch.no_grad()
    def encode(self, frames: np.ndarray, proprio: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """frames uint8 (B, H, W, 3), raw proprio (B, P) -> tokens (B, N, D), normalised proprio (B, P)."""
        frames = torch.as_tensor(np.ascontiguousarray(frames), device=self.device)
        tokens = self.encoder.encode(frames).float()  # (B, N, D)
        proprio = torch.as_tensor(self.stats.normalize_proprio(np.asarray(proprio, dtype=np.float32)))
        return tokens, proprio.to(self.device)

    def env_actions(self, actions: torch.Tensor) -> np.ndarray:
        """Planned model-step actions (B, k, frameskip * A), normalised -> raw env actions
        (B, k * frameskip, A). A model step's frameskip raw actions are stored time-major."""
        B, k, _ = actions.shape
        A = len(self.stats.action_mean)
        raw = actions.detach().cpu().numpy().reshape(B, k * self.frameskip, A)  # (B, k*fs, A), time-major
        return self.stats.denormalize_actions(raw)
