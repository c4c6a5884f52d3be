"""DINO-WM point_maze folders: direct reading, conversion to a store, export back, safe loading."""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from wmlab.data.dino_wm_format import (
    DinoWMDataset,
    convert_dino_wm,
    export_dino_wm,
    safe_torch_load,
)
from wmlab.data.errors import DatasetError
from wmlab.data.store import TrajectoryStore

# CI checks the shared folder out beside the repo: <root>/../shared/fixtures.
FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
POINT_MAZE = FIXTURES / "dino_wm" / "point_maze"
needs_fixture = pytest.mark.skipif(
    not POINT_MAZE.is_dir(), reason=f"DINO-WM point_maze fixture not found at {POINT_MAZE} (../shared absent)"
)
pytestmark = needs_fixture


def _raw(name: str) -> torch.Tensor:
    # Test-side reference reads of known-good fixture files.
    return torch.load(POINT_MAZE / name, map_location="cpu", weights_only=True)


@pytest.fixture
def fixture_copy(tmp_path) -> Path:
    """A writable copy of the fixture folder, for tests that break it."""
    return Path(shutil.copytree(POINT_MAZE, tmp_path / "point_maze"))


# ---------------------------------------------------------------- reading
def test_reads_fixture_cut_to_seq_lengths():
    ds = DinoWMDataset(POINT_MAZE)
    states, actions = _raw("states.pth"), _raw("actions.pth")
    assert ds.n_episodes == 3 and len(ds) == 3
    assert ds.lengths.dtype == np.int64 and ds.lengths.tolist() == [6, 4, 5]
    assert ds.max_len == 6
    assert ds.frame_shape == (224, 224, 3)
    assert ds.source_dtypes == {"states": "float64", "actions": "float32", "seq_lengths": "int64"}
    for i, L in enumerate([6, 4, 5]):
        ep = ds.episode(i)
        assert ep["frames"].dtype == np.uint8 and ep["frames"].shape == (L, 224, 224, 3)
        assert ep["actions"].dtype == np.float32 and ep["actions"].shape == (L, 2)
        assert ep["states"].dtype == np.float32 and ep["states"].shape == (L, 4)
        np.testing.assert_array_equal(ep["states"], states[i, :L].numpy().astype(np.float32))
        np.testing.assert_array_equal(ep["actions"], actions[i, :L].numpy())
        frames = _raw(f"obses/episode_{i:03d}.pth").numpy()
        np.testing.assert_array_equal(ep["frames"], frames[:L])
        np.testing.assert_array_equal(ds.frames(i, [L - 1, 0]), frames[[L - 1, 0]])
    with pytest.raises(IndexError):
        ds.frames(1, [4])
    with pytest.raises(IndexError):
        ds.episode(3)


def test_frames_file_longer_is_cut_shorter_is_refused(fixture_copy):
    frames = _raw("obses/episode_001.pth")  # 4 frames, length 4
    longer = torch.cat([frames, frames[:2]])
    torch.save(longer, fixture_copy / "obses" / "episode_001.pth")
    assert DinoWMDataset(fixture_copy).episode(1)["frames"].shape[0] == 4
    torch.save(frames[:3], fixture_copy / "obses" / "episode_001.pth")
    with pytest.raises(DatasetError, match=r"episode_001\.pth holds 3 frames"):
        DinoWMDataset(fixture_copy).episode(1)


# ---------------------------------------------------------------- refusing bad folders
class _Payload:
    """Unpickling this runs a shell command that creates ``sentinel``."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.sentinel))}",))


@pytest.mark.skipif(os.name != "posix", reason="the payload uses `touch`")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_safe_load_refuses_code_without_running_it(tmp_path, writer):
    import pickle

    sentinel = tmp_path / "pwned"
    evil = tmp_path / "states.pth"
    if writer == "torch.save":
        torch.save({"states": _Payload(sentinel)}, evil)
    else:
        with open(evil, "wb") as f:
            pickle.dump(_Payload(sentinel), f)
    with pytest.raises(DatasetError, match="refuse to execute") as info:
        safe_torch_load(evil)
    assert "states.pth" in str(info.value)
    assert not sentinel.exists(), "the payload ran"
    # Control: the payload is live, so the check above is meaningful.
    if writer == "torch.save":
        torch.load(evil, weights_only=False)
    else:
        with open(evil, "rb") as f:
            pickle.load(f)
    assert sentinel.exists()


def test_missing_top_file_says_what_folder_needs(fixture_copy):
    (fixture_copy / "seq_lengths.pth").unlink()
    with pytest.raises(DatasetError, match=r"DINO-WM point_maze folder needs seq_lengths\.pth"):
        DinoWMDataset(fixture_copy)


def test_truncated_states_is_refused(fixture_copy):
    path = fixture_copy / "states.pth"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetError, match=r"states\.pth is truncated or corrupt"):
        DinoWMDataset(fixture_copy)


def test_episode_count_mismatch_is_refused(fixture_copy):
    torch.save(_raw("actions.pth")[:2].clone(), fixture_copy / "actions.pth")
    with pytest.raises(DatasetError, match=r"states\.pth holds 3 episodes but actions\.pth holds 2"):
        DinoWMDataset(fixture_copy)


def test_bad_seq_lengths_are_refused(fixture_copy):
    torch.save(torch.tensor([6, 0, 5]), fixture_copy / "seq_lengths.pth")
    with pytest.raises(DatasetError, match=r"episode 1 has length 0, outside \[1, 6\]"):
        DinoWMDataset(fixture_copy)
    torch.save(torch.tensor([6, 7, 5]), fixture_copy / "seq_lengths.pth")
    with pytest.raises(DatasetError, match=r"outside \[1, 6\]"):
        DinoWMDataset(fixture_copy)


def test_missing_obses_file_is_refused(fixture_copy):
    (fixture_copy / "obses" / "episode_001.pth").unlink()
    with pytest.raises(DatasetError, match=r"episode_001\.pth.*is missing"):
        DinoWMDataset(fixture_copy)


# ---------------------------------------------------------------- conversion and export
def _assert_same_episodes(ds: DinoWMDataset, store) -> None:
    assert list(store.lengths) == list(ds.lengths)
    for i in range(ds.n_episodes):
        want, got = ds.episode(i), store.episode(i)
        for key in ("frames", "actions", "states"):
            assert got[key].dtype == want[key].dtype, key
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"episode {i} {key}")


def test_convert_fixture_to_store(tmp_path):
    store = convert_dino_wm(POINT_MAZE, tmp_path / "pm.zarr", progress=False)
    ds = DinoWMDataset(POINT_MAZE)
    _assert_same_episodes(ds, store)
    assert store.n_slots == 3 and store.max_len == 6 and store.frame_shape == (224, 224, 3)
    assert store.arrays["seeds"][:].tolist() == [-1, -1, -1]
    meta = store.metadata
    assert meta["env"] == "point_maze" and meta["env_kwargs"] == {"img_size": 224}
    assert meta["source"] == "dino_wm" and meta["source_path"] == str(POINT_MAZE)
    assert meta["episode_len"] == 6 and meta["render_size"] == [224, 224] and meta["seed"] is None
    assert meta["policy"] == "unknown (DINO-WM dataset)" and "wmlab" in meta["versions"]


def test_convert_resumes_after_a_failure(fixture_copy, tmp_path, monkeypatch):
    good = (fixture_copy / "obses" / "episode_002.pth").read_bytes()
    (fixture_copy / "obses" / "episode_002.pth").write_bytes(good[:100])
    out = tmp_path / "pm.zarr"
    with pytest.raises(DatasetError, match=r"episode_002\.pth"):
        convert_dino_wm(fixture_copy, out, progress=False)
    assert TrajectoryStore(out).committed.tolist() == [0, 1]  # work before the failure is kept

    (fixture_copy / "obses" / "episode_002.pth").write_bytes(good)
    written = []
    original = TrajectoryStore.write_episode
    monkeypatch.setattr(
        TrajectoryStore, "write_episode", lambda self, i, *a: (written.append(i), original(self, i, *a))
    )
    store = convert_dino_wm(fixture_copy, out, progress=False)
    assert written == [2]
    _assert_same_episodes(DinoWMDataset(fixture_copy), store)


def test_convert_refuses_foreign_out(fixture_copy, tmp_path):
    out = tmp_path / "pm.zarr"
    convert_dino_wm(POINT_MAZE, out, progress=False)
    # A different source (other actions) must not be merged into it.
    torch.save(_raw("actions.pth") * 2, fixture_copy / "actions.pth")
    with pytest.raises(DatasetError, match="not a conversion of"):
        convert_dino_wm(fixture_copy, out, progress=False)
    other = tmp_path / "something"
    other.mkdir()
    (other / "notes.txt").write_text("hi")
    with pytest.raises(DatasetError, match="not a wmlab store"):
        convert_dino_wm(POINT_MAZE, other, progress=False)


def test_export_round_trip(tmp_path):
    store = convert_dino_wm(POINT_MAZE, tmp_path / "pm.zarr", progress=False)
    out = export_dino_wm(store, tmp_path / "exported", progress=False)
    ds = DinoWMDataset(out)
    _assert_same_episodes(ds, store)
    # Same file dtypes and padded shapes as DINO-WM's own folder; padding rows are zero.
    for name in ("states.pth", "actions.pth", "seq_lengths.pth"):
        got, want = safe_torch_load(out / name), _raw(name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
    states = safe_torch_load(out / "states.pth")
    assert torch.count_nonzero(states[1, 4:]) == 0 and torch.count_nonzero(states[2, 5:]) == 0
    np.testing.assert_array_equal(states.numpy(), _raw("states.pth").numpy().astype(np.float32))
    np.testing.assert_array_equal(safe_torch_load(out / "actions.pth").numpy(), _raw("actions.pth").numpy())
    obs = safe_torch_load(out / "obses" / "episode_001.pth")
    assert obs.dtype == torch.uint8 and obs.shape == (4, 224, 224, 3)
    assert not list(out.rglob("*.partial"))
    # Folder -> store -> folder again gives the same data.
    again = convert_dino_wm(out, tmp_path / "again.zarr", progress=False)
    _assert_same_episodes(DinoWMDataset(POINT_MAZE), again)


def test_export_only_committed_renumbered_and_refuses_overwrite(tmp_path):
    store = convert_dino_wm(POINT_MAZE, tmp_path / "pm.zarr", progress=False)
    out = tmp_path / "exported"
    export_dino_wm(tmp_path / "pm.zarr", out, progress=False)
    with pytest.raises(DatasetError, match="not empty"):
        export_dino_wm(store, out, progress=False)

    writable = TrajectoryStore(tmp_path / "pm.zarr", mode="a")
    writable.commit({1: 0})  # un-commit slot 1: the export must skip it and renumber 2 -> 1
    export_dino_wm(writable, out, overwrite=True, progress=False)
    ds = DinoWMDataset(out)
    assert ds.lengths.tolist() == [6, 5]
    assert sorted(p.name for p in (out / "obses").iterdir()) == ["episode_000.pth", "episode_001.pth"]
    src = DinoWMDataset(POINT_MAZE)
    np.testing.assert_array_equal(ds.episode(1)["frames"], src.episode(2)["frames"])
    np.testing.assert_array_equal(ds.episode(1)["states"], src.episode(2)["states"])
