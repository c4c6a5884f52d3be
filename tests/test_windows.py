"""Training windows: DINO-WM's slicing, split, train-only statistics, short episodes, DataLoader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wmlab.data import DatasetError
from wmlab.data.normalization import NormalizationStats
from wmlab.data.windows import WindowDataset, WindowSpec, make_datasets, split_episodes


def test_split_reproduces_dino_wm_random_split():
    # DINO-WM: torch.utils.data.random_split(dset, [int(0.9 N), N - int(0.9 N)], Generator().manual_seed(42))
    n = 2000
    lengths = [int(0.9 * n), n - int(0.9 * n)]
    expected = torch.utils.data.random_split(range(n), lengths, generator=torch.Generator().manual_seed(42))
    train, val = split_episodes(np.arange(n))
    assert train.tolist() == list(expected[0].indices) and val.tolist() == list(expected[1].indices)
    assert len(train) == 1800 and len(set(train) | set(val)) == n


def test_window_count_and_content(tiny_store):
    spec = WindowSpec(num_hist=3, num_pred=1, frameskip=5)  # span 20 steps; episodes have 30
    train, val, stats = make_datasets(tiny_store, spec)
    assert len(train.episodes) == 5 and len(val.episodes) == 1  # int(0.9 * 6) = 5
    assert len(train) == 5 * (30 - 20 + 1)
    i = 7
    episode, start = int(train.window_episode[i]), int(train.window_start[i])
    item = train[i]
    assert item["visual"].shape == (4, 32, 32, 3) and item["actions"].shape == (4, 10)
    raw = tiny_store.episode(episode)
    assert np.array_equal(item["visual"], raw["frames"][start : start + 20 : 5])
    assert np.array_equal(item["state"], raw["states"][start : start + 20 : 5])
    # The actions of model step j are raw steps start + 5j .. start + 5j + 4, normalized, concatenated.
    expected = stats.normalize_actions(raw["actions"][start : start + 20]).reshape(4, 10)
    assert np.allclose(item["actions"], expected)
    assert np.allclose(item["proprio"], stats.normalize_proprio(raw["states"][start : start + 20 : 5]))


def test_stats_use_the_training_split_only(tiny_store):
    train, _, stats = make_datasets(tiny_store, WindowSpec(frameskip=2))
    ids = train.episodes
    a = np.concatenate([tiny_store.actions(int(i)) for i in ids]).astype(np.float64)
    assert np.allclose(stats.action_mean, a.mean(0), atol=1e-6)
    assert np.allclose(stats.action_std, a.std(0, ddof=1), atol=1e-6)  # unbiased, as torch.std
    everything = np.concatenate([tiny_store.actions(int(i)) for i in tiny_store.committed])
    assert not np.allclose(stats.action_mean, everything.mean(0))
    stats_path = tiny_store.path.parent / "stats.json"
    stats.save(stats_path)
    assert np.array_equal(NormalizationStats.load(stats_path).proprio_std, stats.proprio_std)


def test_short_episodes_are_an_error_unless_dropped(tiny_store):
    spec = WindowSpec(num_hist=3, num_pred=1, frameskip=8)  # span 32 > 30
    with pytest.raises(DatasetError, match=r"shorter than one window.*frameskip 8 = 32 steps"):
        make_datasets(tiny_store, spec)
    stats = make_datasets(tiny_store, WindowSpec())[2]
    with pytest.raises(DatasetError, match=r"no episode .* long enough"):
        WindowDataset(tiny_store, tiny_store.committed, spec, stats, drop_short=True)


def test_dataloader_batches(tiny_store):
    train, _, _ = make_datasets(tiny_store, WindowSpec())
    loader = torch.utils.data.DataLoader(train, batch_size=8, shuffle=True, collate_fn=lambda batch: batch)
    batch = next(iter(loader))
    assert batch["visual"].shape == (8, 4, 32, 32, 3)
    assert batch["actions"].shape == (8, 4, 10) and batch["proprio"].shape == (8, 4, 4)


class FakeFeatureCache:
    """What the feature cache will offer: read(episode, times) -> (len(times), N, D) tokens."""

    key = "visual"

    def read(self, episode, times, out=None):
        tokens = (
            np.full((len(times), 3, 2), float(episode), dtype=np.float16) + np.asarray(times)[:, None, None]
        )
        if out is not None:
            out[:] = tokens
        return tokens


def test_windows_serve_cached_features(tiny_store):
    train, _, _ = make_datasets(tiny_store, WindowSpec(), source=FakeFeatureCache())
    batch = train.get_batch([0, 1])
    assert batch["visual"].shape == (2, 4, 3, 2)
    assert batch["visual"][1, :, 0, 0].tolist() == [train.window_episode[1] + t for t in (1, 6, 11, 16)]


def test_windows_read_a_dino_wm_folder_directly():
    from tests_paths import DINO_WM_POINT_MAZE

    from wmlab.data.dino_wm_format import DinoWMDataset

    if not DINO_WM_POINT_MAZE.is_dir():
        pytest.skip("../shared/fixtures is absent")
    folder = DinoWMDataset(DINO_WM_POINT_MAZE)  # lengths 6, 4, 5
    spec = WindowSpec(num_hist=1, num_pred=1, frameskip=2)  # span 4 steps
    windows = WindowDataset(folder, [0, 1, 2], spec, make_datasets(folder, spec, train_fraction=1.0)[2])
    assert len(windows) == (6 - 4 + 1) + (4 - 4 + 1) + (5 - 4 + 1)
    batch = windows.get_batch([0, 3])
    assert batch["visual"].shape == (2, 2, 224, 224, 3) and batch["actions"].shape == (2, 2, 4)
    assert np.array_equal(batch["visual"][1], folder.frames(1, [0, 2]))
