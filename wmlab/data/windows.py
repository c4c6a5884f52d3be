"""Training windows: ``num_hist + num_pred`` frames spaced by ``frameskip`` (DINO-WM's slicing).

A window starting at raw step ``s`` holds observations at ``s, s + k, ..., s + (F - 1) k`` (F frames,
k = frameskip) and the raw actions ``s .. s + F k - 1`` grouped per model step into (F, k * A).
With DINO-WM's PointMaze settings (T = 100, F = 4, k = 5) each episode yields 81 windows and a
window's actions are (4, 10).

Episodes are split by trajectory exactly as DINO-WM's ``random_split`` does (``torch.randperm``
with a generator seeded 42, first ``int(0.9 N)`` for training), so an imported DINO-WM run and a
wmlab run validate on the same episodes of the same dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wmlab.data.errors import DatasetError
from wmlab.data.normalization import NormalizationStats


@dataclass(frozen=True)
class WindowSpec:
    num_hist: int = 3
    num_pred: int = 1
    frameskip: int = 5

    def __post_init__(self) -> None:
        if min(self.num_hist, self.num_pred, self.frameskip) < 1:
            raise ValueError(f"num_hist, num_pred and frameskip must be >= 1, got {self}")

    @property
    def num_frames(self) -> int:
        return self.num_hist + self.num_pred

    @property
    def span(self) -> int:
        """Raw env steps one window covers (its actions)."""
        return self.num_frames * self.frameskip


def split_episodes(episodes, train_fraction: float = 0.9, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Split episode ids into (train, val) by trajectory, as DINO-WM's ``random_split``."""
    import torch

    episodes = np.asarray(episodes, dtype=np.int64)
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    n_train = int(train_fraction * len(episodes))
    perm = torch.randperm(len(episodes), generator=torch.Generator().manual_seed(seed)).numpy()
    return episodes[perm[:n_train]], episodes[perm[n_train:]]


class FrameSource:
    """Serves frames from a store: ``read(episode, times, out=None) -> uint8 (len(times), H, W, 3)``.

    The frozen-feature cache implements the same ``read`` returning (len(times), N, D) tokens.
    ``out`` lets the batch be decoded in place instead of stacked afterwards.
    """

    key = "visual"

    def __init__(self, store) -> None:
        self.store = store

    def read(self, episode: int, times: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return self.store.frames(episode, times, out=out)


class WindowDataset:
    """Windows of a set of episodes. Item ``i`` -> dict of arrays; ``get_batch(ids)`` stacks them.

    Per window: ``visual`` (F, H, W, 3) uint8 (or features (F, N, D) from a cache source),
    ``proprio`` (F, P) normalized, ``actions`` (F, frameskip * A) normalized, ``state`` (F, S) raw.
    """

    def __init__(
        self,
        store,
        episodes,
        spec: WindowSpec,
        stats: NormalizationStats,
        source=None,
        drop_short: bool = False,
    ) -> None:
        self.store = store
        self.spec = spec
        self.stats = stats
        self.source = source if source is not None else FrameSource(store)
        lengths = store.lengths
        episodes = np.asarray(episodes, dtype=np.int64)
        if episodes.size == 0:
            raise DatasetError(f"no episodes given for windows from {store.path}")
        uncommitted = episodes[lengths[episodes] == 0]
        if uncommitted.size:
            raise DatasetError(f"episodes {uncommitted[:10].tolist()} of {store.path} are not complete")
        short = episodes[lengths[episodes] < spec.span]
        if short.size and not drop_short:
            raise DatasetError(
                f"{short.size} episodes of {store.path} are shorter than one window "
                f"(num_hist + num_pred = {spec.num_frames} frames x frameskip {spec.frameskip} = {spec.span} "
                f"steps), e.g. episode {int(short[0])} has {int(lengths[short[0]])} steps. Lower "
                "frameskip or num_hist, or pass drop_short=true to leave them out."
            )
        kept = episodes[lengths[episodes] >= spec.span]
        if kept.size == 0:
            raise DatasetError(f"no episode of {store.path} is long enough for a {spec.span}-step window")
        counts = lengths[kept] - spec.span + 1  # windows per episode
        self.window_episode = np.repeat(kept, counts)  # (W,)
        self.window_start = np.concatenate([np.arange(c) for c in counts])  # (W,)
        # Small arrays stay in memory; only frames are read lazily.
        raw_actions = store.all_actions()  # (E, T, A)
        self._actions = stats.normalize_actions(raw_actions)
        self._states = store.all_states()  # (E, T, S)
        self._proprio = stats.normalize_proprio(self._states)
        self.episodes = kept

    def __len__(self) -> int:
        return len(self.window_episode)

    def __getitem__(self, i: int) -> dict:
        batch = self.get_batch([i])
        return {k: v[0] for k, v in batch.items()}

    def __getitems__(self, ids) -> dict:
        """Batched fetch used by torch's DataLoader (pass ``collate_fn=lambda b: b``).

        Returns torch tensors (zero-copy views): from DataLoader workers they travel through shared
        memory, whereas numpy arrays would be pickled through a pipe.
        """
        import torch

        return {k: torch.from_numpy(v) for k, v in self.get_batch(ids).items()}

    def get_batch(self, ids) -> dict:
        """Stack windows ``ids`` into a batch of B windows.

        Returns visual (B, F, ...), proprio (B, F, P), actions (B, F, k*A), state (B, F, S), with
        F = num_hist + num_pred frames and k = frameskip.
        """
        ids = np.asarray(ids, dtype=np.int64)
        F, k = self.spec.num_frames, self.spec.frameskip
        episodes, starts = self.window_episode[ids], self.window_start[ids]  # (B,), (B,)
        frame_t = starts[:, None] + k * np.arange(F)[None, :]  # (B, F) observation times
        action_t = starts[:, None] + np.arange(F * k)[None, :]  # (B, F*k) raw action times
        B = len(ids)
        A = self._actions.shape[-1]
        actions = self._actions[episodes[:, None], action_t].reshape(B, F, k * A)  # (B, F, k*A)
        first = self.source.read(int(episodes[0]), frame_t[0])  # (F, ...)
        visual = np.empty((B, *first.shape), dtype=first.dtype)  # (B, F, ...)
        visual[0] = first
        for b in range(1, B):
            self.source.read(int(episodes[b]), frame_t[b], out=visual[b])
        return {
            self.source.key: visual,
            "proprio": self._proprio[episodes[:, None], frame_t],  # (B, F, P)
            "actions": actions,
            "state": self._states[episodes[:, None], frame_t],  # (B, F, S)
        }


def make_datasets(
    store,
    spec: WindowSpec,
    train_fraction: float = 0.9,
    split_seed: int = 42,
    source=None,
    drop_short: bool = False,
    stats: NormalizationStats | None = None,
) -> tuple[WindowDataset, WindowDataset, NormalizationStats]:
    """Split ``store``'s committed episodes, compute stats on the train split (unless ``stats`` are
    given, e.g. a resumed run's), build both datasets."""
    train_ids, val_ids = split_episodes(store.committed, train_fraction, split_seed)
    if len(train_ids) == 0:
        raise DatasetError(f"{store.path} has {len(store)} complete episodes: too few to split")
    lengths = store.lengths
    if stats is None:
        stats = NormalizationStats.compute(
            store.all_actions()[train_ids], store.all_states()[train_ids], lengths[train_ids], train_ids
        )
    train = WindowDataset(store, train_ids, spec, stats, source, drop_short)
    val = WindowDataset(store, val_ids, spec, stats, source, drop_short) if len(val_ids) else None
    return train, val, stats
