"""Trajectory data: the store, collection, DINO-WM's format, training windows.

Heavy modules load on first use: ``from wmlab.data import collect`` costs no MuJoCo import
until ``collect`` runs.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from wmlab.data.errors import DatasetError

_LAZY = {
    "collect": "wmlab.data.collect",
    "TrajectoryStore": "wmlab.data.store",
    "StoreSpec": "wmlab.data.store",
    "convert_dino_wm": "wmlab.data.dino_wm_format",
    "export_dino_wm": "wmlab.data.dino_wm_format",
    "DinoWMDataset": "wmlab.data.dino_wm_format",
    "WindowSpec": "wmlab.data.windows",
    "WindowDataset": "wmlab.data.windows",
    "make_datasets": "wmlab.data.windows",
    "split_episodes": "wmlab.data.windows",
    "NormalizationStats": "wmlab.data.normalization",
}

__all__ = ["DatasetError", "open_dataset", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'wmlab.data' has no attribute {name!r}")


def open_dataset(path: str | Path):
    """Open a wmlab dataset (``zarr.json`` inside) or a DINO-WM folder (``states.pth`` inside).

    Both offer ``lengths`` (E,), ``episode(i)`` and ``frames(i, times)``.
    """
    path = Path(path)
    if (path / "zarr.json").is_file():
        from wmlab.data.store import TrajectoryStore

        return TrajectoryStore(path)
    if (path / "states.pth").is_file() or (path / "obses").is_dir():
        from wmlab.data.dino_wm_format import DinoWMDataset

        return DinoWMDataset(path)
    if not path.exists():
        raise DatasetError(f"no dataset at {path}: the path does not exist")
    raise DatasetError(
        f"{path} is neither a wmlab dataset (zarr.json) nor a DINO-WM folder (states.pth, obses/)"
    )
