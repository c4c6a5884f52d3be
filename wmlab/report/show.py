"""A look at a dataset: a PNG grid (episodes x evenly spaced frames) and an animated GIF."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wmlab.data import DatasetError, open_dataset


def _pad(frame: np.ndarray, border: int = 2) -> np.ndarray:
    return np.pad(frame, ((border, border), (border, border), (0, 0)), constant_values=255)


def show_dataset(
    data: str | Path, out: str | Path, n_episodes: int = 4, n_frames: int = 8, gif: bool = True, seed: int = 0
) -> list[Path]:
    """Write ``<out>/<name>_grid.png`` (rows = episodes) and ``<out>/<name>.gif``; return the paths."""
    dataset = open_dataset(data)
    lengths = np.asarray(dataset.lengths)
    complete = np.flatnonzero(lengths > 0)
    if complete.size == 0:
        raise DatasetError(f"{data} has no complete episode to show")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(complete, size=min(n_episodes, complete.size), replace=False))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(data).name.removesuffix(".zarr")
    rows = []
    for episode in chosen:
        times = np.linspace(0, lengths[episode] - 1, num=min(n_frames, lengths[episode])).round().astype(int)
        frames = dataset.frames(int(episode), times)  # (n, H, W, 3)
        rows.append(np.concatenate([_pad(f) for f in frames], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    import imageio.v3 as iio

    written = [out / f"{name}_grid.png"]
    iio.imwrite(written[0], np.concatenate(rows, axis=0))
    if gif:
        T = int(lengths[chosen].min())
        clips = [dataset.frames(int(e), np.arange(T)) for e in chosen]  # each (T, H, W, 3)
        movie = np.stack([np.concatenate([_pad(c[t]) for c in clips], axis=1) for t in range(T)])
        written.append(out / f"{name}.gif")
        iio.imwrite(written[1], movie, duration=50, loop=0)
    return written
