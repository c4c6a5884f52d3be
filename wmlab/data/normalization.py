"""Z-score statistics for actions and proprio, computed on the training split only.

DINO-WM computes them over *all* trajectories before splitting, which lets validation data leak
into the statistics; we use training episodes only. Std is the unbiased estimate (torch.std).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wmlab.data.errors import DatasetError

#: A dimension that never varies (e.g. a padded action) would divide by zero; clamp its std.
MIN_STD = 1e-6


@dataclass
class NormalizationStats:
    """Per-dimension mean and std, float32: actions (A,), proprio (P,)."""

    action_mean: np.ndarray
    action_std: np.ndarray
    proprio_mean: np.ndarray
    proprio_std: np.ndarray

    @classmethod
    def compute(cls, actions: np.ndarray, proprio: np.ndarray, lengths: np.ndarray) -> NormalizationStats:
        """From padded arrays actions (E, T, A), proprio (E, T, P) and valid lengths (E,)."""
        if actions.shape[:2] != proprio.shape[:2] or len(lengths) != actions.shape[0]:
            raise DatasetError(
                f"actions {actions.shape}, proprio {proprio.shape} and lengths {lengths.shape} disagree"
            )
        valid = np.arange(actions.shape[1])[None, :] < np.asarray(lengths)[:, None]  # (E, T)
        if valid.sum() < 2:
            raise DatasetError("need at least 2 valid steps to compute normalization statistics")
        a, p = actions[valid].astype(np.float64), proprio[valid].astype(np.float64)  # (V, A), (V, P)
        return cls(
            action_mean=a.mean(0).astype(np.float32),
            action_std=np.maximum(a.std(0, ddof=1), MIN_STD).astype(np.float32),
            proprio_mean=p.mean(0).astype(np.float32),
            proprio_std=np.maximum(p.std(0, ddof=1), MIN_STD).astype(np.float32),
        )

    def normalize_actions(self, actions: np.ndarray) -> np.ndarray:
        """(..., A) raw -> normalized."""
        return ((actions - self.action_mean) / self.action_std).astype(np.float32)

    def denormalize_actions(self, actions: np.ndarray) -> np.ndarray:
        """(..., A) normalized -> raw."""
        return (actions * self.action_std + self.action_mean).astype(np.float32)

    def normalize_proprio(self, proprio: np.ndarray) -> np.ndarray:
        """(..., P) raw -> normalized."""
        return ((proprio - self.proprio_mean) / self.proprio_std).astype(np.float32)

    def to_dict(self) -> dict:
        return {k: np.asarray(v).tolist() for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> NormalizationStats:
        missing = {"action_mean", "action_std", "proprio_mean", "proprio_std"} - set(d)
        if missing:
            raise DatasetError(f"normalization stats lack {sorted(missing)}")
        return cls(**{k: np.asarray(d[k], dtype=np.float32) for k in cls.__dataclass_fields__})

    def save(self, path: str | Path) -> None:
        """Write JSON atomically."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".partial")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> NormalizationStats:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise DatasetError(f"normalization stats not found at {path}") from None
        except json.JSONDecodeError as err:
            raise DatasetError(f"normalization stats at {path} are corrupt ({err})") from err
