"""Z-score statistics for actions and proprio, computed on the training split only.

DINO-WM computes them over *all* trajectories before splitting, which lets validation data leak
into the statistics; we use training episodes only. Std is the unbiased estimate (torch.std).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wmlab.data.errors import DatasetError
from wmlab.integrity import atomic_write_json, fingerprint

#: A dimension that never varies (e.g. a padded action) would divide by zero; clamp its std.
MIN_STD = 1e-6


def _payload_digest(payload: dict) -> str:
    """The full sha256 (64 hex) of the statistics' canonical JSON."""
    return fingerprint(payload, length=64)


@dataclass
class NormalizationStats:
    """Per-dimension mean and std, float32: actions (A,), proprio (P,)."""

    action_mean: np.ndarray
    action_std: np.ndarray
    proprio_mean: np.ndarray
    proprio_std: np.ndarray

    @classmethod
    def compute(
        cls, actions: np.ndarray, proprio: np.ndarray, lengths: np.ndarray, episodes=None
    ) -> NormalizationStats:
        """From padded arrays actions (E, T, A), proprio (E, T, P) and valid lengths (E,).

        ``episodes`` (E,) names the rows in errors (default 0..E-1). Non-finite values in the valid
        steps raise ``DatasetError`` naming the episode and field, so a NaN never reaches the stats.
        """
        if actions.shape[:2] != proprio.shape[:2] or len(lengths) != actions.shape[0]:
            raise DatasetError(
                f"actions {actions.shape}, proprio {proprio.shape} and lengths {lengths.shape} disagree"
            )
        valid = np.arange(actions.shape[1])[None, :] < np.asarray(lengths)[:, None]  # (E, T)
        if valid.sum() < 2:
            raise DatasetError("need at least 2 valid steps to compute normalization statistics")
        names = np.arange(len(lengths)) if episodes is None else np.asarray(episodes).reshape(-1)
        for field, values in (("actions", actions), ("proprio (states)", proprio)):
            bad = ~np.isfinite(values).all(axis=-1) & valid  # (E, T)
            if bad.any():
                row, step = (int(v) for v in np.argwhere(bad)[0])
                raise DatasetError(
                    f"{field} of episode {int(names[row])} are not finite (NaN or inf) at step {step} "
                    f"({int(bad.any(1).sum())} episode(s) affected): normalization statistics cannot be "
                    "computed. Fix or re-collect those episodes, or leave them out"
                )
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
        stats = cls(**{k: np.asarray(d[k], dtype=np.float32) for k in cls.__dataclass_fields__})
        stats.check_finite()
        return stats

    def check_finite(self, where: str = "normalization stats") -> None:
        """Raise ``DatasetError`` if any mean or std is NaN or inf (naming which)."""
        bad = [k for k, v in self.__dict__.items() if not np.isfinite(np.asarray(v, dtype=np.float64)).all()]
        if bad:
            raise DatasetError(
                f"{where} hold non-finite values in {bad}; the data they came from holds NaN or inf. "
                "Recompute them from clean data"
            )

    def save(self, path: str | Path) -> None:
        """Write JSON atomically (temp name unique to this writer, then rename); refuses NaN stats.

        The file carries ``sha256`` of its own statistics (canonical JSON), so a flipped digit, which
        still parses as a number, is caught on load instead of silently shifting every input.
        """
        self.check_finite(f"normalization stats for {path}")
        payload = self.to_dict()
        atomic_write_json(path, {**payload, "sha256": _payload_digest(payload)})

    @classmethod
    def load(cls, path: str | Path) -> NormalizationStats:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise DatasetError("not a JSON object")
            digest = data.pop("sha256", None)  # absent in files written before the checksum
            unknown = set(data) - set(cls.__dataclass_fields__)
            if unknown:  # e.g. a damaged key name, which would otherwise hide the checksum
                raise DatasetError(f"unexpected keys {sorted(unknown)} (the file is damaged or not ours)")
            if digest is not None and digest != _payload_digest(data):
                raise DatasetError(
                    "content does not match its checksum (the file was modified or damaged); "
                    "restore it from a backup or retrain the run (its inputs depend on these values)"
                )
            return cls.from_dict(data)
        except DatasetError as err:
            raise DatasetError(f"{path}: {err}") from err
        except FileNotFoundError:
            raise DatasetError(f"normalization stats not found at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetError(f"normalization stats at {path} are corrupt ({err})") from err
