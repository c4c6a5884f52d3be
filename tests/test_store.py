"""The trajectory store: commit visibility, the chunk fast path, corrupt and inconsistent data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from wmlab.data import DatasetError, open_dataset
from wmlab.data.store import StoreSpec, TrajectoryStore


def make_store(path, n=3, T=5, size=8):
    return TrajectoryStore.create(path, StoreSpec(n, T, (size, size, 3), 2, 4), {"env": "test"})


def random_episode(rng, L, size=8):
    return (
        rng.integers(0, 256, (L, size, size, 3), dtype=np.uint8),
        rng.normal(size=(L, 2)).astype(np.float32),
        rng.normal(size=(L, 4)).astype(np.float32),
    )


def test_written_episode_is_invisible_until_committed(tmp_path):
    store = make_store(tmp_path / "d.zarr")
    rng = np.random.default_rng(0)
    frames, actions, states = random_episode(rng, 4)
    store.write_episode(1, frames, actions, states)
    reader = TrajectoryStore(tmp_path / "d.zarr")
    assert len(reader) == 0
    with pytest.raises(DatasetError, match="not complete"):
        reader.episode(1)
    store.commit({1: 4})
    reader.refresh()
    assert reader.committed.tolist() == [1]
    episode = reader.episode(1)
    assert np.array_equal(episode["frames"], frames)
    assert np.array_equal(episode["actions"], actions) and np.array_equal(episode["states"], states)
    assert np.array_equal(reader.frames(1, [3, 0]), frames[[3, 0]])
    with pytest.raises(IndexError):
        reader.frames(1, [4])


def test_fast_path_agrees_with_zarr_both_ways(tmp_path):
    store = make_store(tmp_path / "d.zarr")
    rng = np.random.default_rng(1)
    frames, actions, states = random_episode(rng, 5)
    assert store._frame_files.codec is not None, "the fast path must be in use for our own layout"
    store.write_episode(0, frames[:4], actions[:4], states[:4])  # written by our shard writer
    store.commit({0: 4})
    assert np.array_equal(np.asarray(store.arrays["frames"][0, :4]), frames[:4])  # read by zarr
    assert not np.asarray(store.arrays["frames"][0, 4]).any()  # an empty slot reads as fill value
    store.write_episode(0, frames, actions, states)  # a rewrite replaces the cached index
    store.commit({0: 5})
    assert np.array_equal(np.asarray(store.arrays["frames"][0]), frames)  # read by zarr
    other = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    store.arrays["frames"][2] = other  # written by zarr
    store.arrays["actions"][2] = np.zeros((5, 2), np.float32)
    store.arrays["states"][2] = np.ones((5, 4), np.float32)  # a committed episode needs all its files
    store.commit({2: 5})
    assert np.array_equal(store.frames(2), other)  # read by our chunk reader


def test_truncated_chunk_and_missing_files_are_reported(tmp_path):
    path = tmp_path / "d.zarr"
    store = make_store(path)
    store.write_episode(0, *random_episode(np.random.default_rng(2), 5))
    store.commit({0: 5})
    shard = path / "frames" / "c.0.0.0.0.0"  # episode 0's frames, one file
    whole = shard.read_bytes()
    shard.write_bytes(whole[:-30])  # cut into the index at the end
    with pytest.raises(DatasetError, match=r"shard .* is corrupt"):
        TrajectoryStore(path).frames(0, [2])
    shard.write_bytes(whole[:40])
    with pytest.raises(DatasetError, match="truncated"):
        TrajectoryStore(path).frames(0, [2])
    (path / "zarr.json").write_text("{not json")
    with pytest.raises(DatasetError, match="cannot open"):
        TrajectoryStore(path)
    with pytest.raises(DatasetError, match="not found"):
        TrajectoryStore(tmp_path / "missing.zarr")
    with pytest.raises(DatasetError, match="neither"):
        open_dataset(tmp_path)


def test_arrays_that_disagree_are_refused(tmp_path):
    path = tmp_path / "d.zarr"
    make_store(path, n=3)
    meta_path = path / "actions" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"][0] = 2
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="'actions' has 2 episodes"):
        TrajectoryStore(path)
    shutil.rmtree(path / "states")
    with pytest.raises(DatasetError, match="lacks arrays"):
        TrajectoryStore(path)


def test_write_checks_shapes_and_read_only(tmp_path):
    store = make_store(tmp_path / "d.zarr")
    frames, actions, states = random_episode(np.random.default_rng(3), 4)
    with pytest.raises(DatasetError, match="must be equal"):
        store.write_episode(0, frames, actions[:3], states)
    with pytest.raises(DatasetError, match="in \\[1, 5\\]"):
        store.write_episode(0, *random_episode(np.random.default_rng(3), 6))
    with pytest.raises(PermissionError):
        TrajectoryStore(tmp_path / "d.zarr").commit({0: 1})


def test_grow_adds_empty_slots(tmp_path):
    store = make_store(tmp_path / "d.zarr", n=2)
    store.write_episode(1, *random_episode(np.random.default_rng(4), 5))
    store.commit({1: 5})
    store.grow(5)
    assert store.n_slots == 5 and store.committed.tolist() == [1]
    store.write_episode(4, *random_episode(np.random.default_rng(5), 3))
    store.commit({4: 3})
    assert TrajectoryStore(tmp_path / "d.zarr").lengths.tolist() == [0, 5, 0, 0, 3]
