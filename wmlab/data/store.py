"""Trajectory store: a Zarr v3 directory holding padded episodes plus a commit index.

Layout (``E`` episode slots, ``T`` = max episode length, frames ``H x W x 3``)::

    <dataset>.zarr/
      zarr.json                 group attributes = metadata (env id, render size, versions, ...)
      frames     uint8  (E, T, H, W, 3)   one shard file per episode, one compressed chunk per frame
      actions    float32 (E, T, A)        one chunk per episode
      states     float32 (E, T, S)        one chunk per episode; state = proprio for PointMaze
      seeds      int64  (E,)              the seed each episode was generated from
      lengths    int64  (E,)              0 = not committed; else the valid length

Why this shape. It is DINO-WM's padded (N, T_max, ...) layout, so conversion is a copy. Episode
slots are fixed, so parallel workers write their own episode's files directly (distinct files,
no locking), and unwritten padding costs no disk (Zarr does not store empty chunks). An episode
becomes visible only when the single writer of ``lengths`` commits it, and Zarr's local store
writes every file atomically (temp file + rename), so a reader never sees half an episode and a
killed writer leaves nothing half-valid: resume simply re-collects the uncommitted slots.

Frames are read and written through a fast path that handles the shard files with numcodecs
directly (the Zarr API costs ~1 ms per frame; a window needs 4), checked against Zarr in tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wmlab.data.errors import DatasetError
from wmlab.data.shards import EpisodeShards

REQUIRED_ARRAYS = ("frames", "actions", "states", "seeds", "lengths")
FORMAT_NAME = "wmlab-trajectories"
FORMAT_VERSION = 1


def _zarr():
    import zarr

    return zarr


def _blosc(cname: str = "lz4", clevel: int = 5):
    from zarr.codecs import BloscCodec

    # No shuffle: frames are uint8, and byte-shuffling halves the ratio on flat-colour renders.
    return BloscCodec(cname=cname, clevel=clevel, shuffle="noshuffle")


@dataclass(frozen=True)
class StoreSpec:
    """Shapes of a new store. ``frame_shape`` is (H, W, 3); dims exclude the (E, T) axes."""

    n_episodes: int
    max_len: int
    frame_shape: tuple[int, int, int]
    action_dim: int
    state_dim: int
    compression: str = "lz4"


class TrajectoryStore:
    """Read (and, with ``mode='a'``, write) a trajectory dataset.

    Reads: ``store.episode(i)`` -> dict of arrays cut to the episode's length; ``store.frames(i, t)``
    -> uint8 (len(t), H, W, 3); ``store.committed`` -> indices of complete episodes.
    """

    def __init__(self, path: str | Path, mode: str = "r") -> None:
        self.path = Path(path)
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        if not (self.path / "zarr.json").is_file():
            hint = (
                "collect one with `wmlab collect env=point_maze out=...`"
                if not self.path.exists()
                else "it is not a wmlab dataset (no zarr.json); for a DINO-WM folder use `wmlab convert`"
            )
            raise DatasetError(f"dataset not found at {self.path}: {hint}")
        zarr = _zarr()
        try:
            self.group = zarr.open_group(str(self.path), mode="r" if mode == "r" else "r+")
        except Exception as err:
            raise DatasetError(f"cannot open dataset {self.path}: {err}. Is zarr.json truncated?") from err
        missing = [name for name in REQUIRED_ARRAYS if name not in self.group]
        if missing:
            raise DatasetError(
                f"dataset {self.path} lacks arrays {missing}; it was not fully created. "
                "Delete it and collect again."
            )
        self.arrays = {name: self.group[name] for name in REQUIRED_ARRAYS}
        self.mode = mode
        self._validate_shapes()
        self._frame_files = EpisodeShards(
            self.path / "frames", self.arrays["frames"], what="frame", redo="re-collect"
        )
        self.refresh()

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, path: str | Path, spec: StoreSpec, metadata: dict) -> TrajectoryStore:
        """Create an empty store with ``spec.n_episodes`` uncommitted slots."""
        path = Path(path)
        if path.exists():
            raise DatasetError(f"{path} already exists; open it with TrajectoryStore(path, mode='a')")
        zarr = _zarr()
        group = zarr.open_group(str(path), mode="w-")
        E, T = spec.n_episodes, spec.max_len
        H, W, C = spec.frame_shape
        # "." keys ("c.3.0.0.0.0") keep every array's files in one folder: nested folders per
        # chunk cost a 4 KiB block each.
        flat_keys = {"name": "default", "separator": "."}
        group.create_array(
            "frames", shape=(E, T, H, W, C), chunks=(1, 1, H, W, C), shards=(1, T, H, W, C),
            dtype="uint8", compressors=[_blosc(spec.compression)], fill_value=0,
            chunk_key_encoding=flat_keys,
        )  # fmt: skip
        for name, dim in (("actions", spec.action_dim), ("states", spec.state_dim)):
            group.create_array(
                name, shape=(E, T, dim), chunks=(1, T, dim), dtype="float32",
                compressors=[_blosc("zstd")], fill_value=0.0, chunk_key_encoding=flat_keys,
            )  # fmt: skip
        for name in ("seeds", "lengths"):
            group.create_array(
                name, shape=(E,), chunks=(max(E, 1),), dtype="int64", fill_value=0,
                chunk_key_encoding=flat_keys,
            )  # fmt: skip
        meta = dict(metadata)
        meta.update(format=FORMAT_NAME, format_version=FORMAT_VERSION)
        group.attrs.update(jsonable(meta))
        return cls(path, mode="a")

    def grow(self, n_episodes: int) -> None:
        """Add empty slots so the store holds ``n_episodes`` (never shrinks)."""
        self._require_writable()
        E = self.n_slots
        if n_episodes <= E:
            return
        for array in self.arrays.values():
            array.resize((n_episodes, *array.shape[1:]))
        # lengths/seeds are one chunk: re-chunking is not possible, but a larger shape is fine.
        self.refresh()

    # ------------------------------------------------------------------ writing
    def write_episode(self, index: int, frames, actions, states) -> None:
        """Write episode ``index``'s data (not yet visible: call ``commit``). Safe in parallel
        for distinct ``index`` values. Shapes: frames (L, H, W, 3) uint8, actions (L, A), states (L, S)."""
        self._require_writable()
        L = len(frames)
        T = self.max_len
        if not (1 <= L <= T) or len(actions) != L or len(states) != L:
            raise DatasetError(
                f"episode {index}: frames/actions/states lengths {len(frames)}/{len(actions)}/{len(states)} "
                f"must be equal and in [1, {T}]"
            )
        frames = np.asarray(frames, dtype=np.uint8)
        if frames.shape[1:] != self.frame_shape:
            raise DatasetError(
                f"episode {index}: frames have shape {frames.shape[1:]}, the store holds {self.frame_shape}"
            )
        self._frame_files.write(index, frames)
        padded_actions = np.zeros(self.arrays["actions"].shape[1:], np.float32)
        padded_actions[:L] = actions
        padded_states = np.zeros(self.arrays["states"].shape[1:], np.float32)
        padded_states[:L] = states
        self.arrays["actions"][index] = padded_actions
        self.arrays["states"][index] = padded_states

    def set_seeds(self, seeds) -> None:
        self._require_writable()
        self.arrays["seeds"][:] = np.asarray(seeds, dtype=np.int64)

    def commit(self, lengths_by_index: dict[int, int]) -> None:
        """Make episodes visible. One atomic file write for any number of episodes."""
        self._require_writable()
        lengths = self.arrays["lengths"][:]
        for index, length in lengths_by_index.items():
            lengths[index] = int(length)
        self.arrays["lengths"][:] = lengths
        self._lengths = lengths
        self._padded_cache = {}

    def update_metadata(self, **items) -> None:
        self._require_writable()
        self.group.attrs.update(jsonable(items))

    # ------------------------------------------------------------------ reading
    def refresh(self) -> None:
        """Re-read the commit index (another process may be writing)."""
        self._lengths = np.asarray(self.arrays["lengths"][:], dtype=np.int64)
        self._padded_cache: dict[str, np.ndarray] = {}

    @property
    def metadata(self) -> dict:
        return dict(self.group.attrs)

    @property
    def n_slots(self) -> int:
        return int(self.arrays["lengths"].shape[0])

    @property
    def max_len(self) -> int:
        return int(self.arrays["frames"].shape[1])

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.arrays["frames"].shape[2:])

    @property
    def lengths(self) -> np.ndarray:
        """Valid length per slot, int64 (E,); 0 = uncommitted."""
        return self._lengths.copy()

    @property
    def committed(self) -> np.ndarray:
        """Indices of committed (complete) episodes."""
        return np.flatnonzero(self._lengths > 0)

    def __len__(self) -> int:
        return int((self._lengths > 0).sum())

    def _check_episode(self, index: int) -> int:
        if not 0 <= index < self.n_slots:
            raise IndexError(f"episode {index} out of range [0, {self.n_slots}) in {self.path}")
        length = int(self._lengths[index])
        if length == 0:
            raise DatasetError(f"episode {index} of {self.path} is not complete (never committed)")
        return length

    def actions(self, index: int) -> np.ndarray:
        """float32 (L, A) of a committed episode."""
        return self.arrays["actions"][index][: self._check_episode(index)]

    def states(self, index: int) -> np.ndarray:
        """float32 (L, S) of a committed episode."""
        return self.arrays["states"][index][: self._check_episode(index)]

    def frames(self, index: int, times=None, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 (len(times), H, W, 3) frames of a committed episode (all frames if ``times`` is None).

        ``out``, if given, is a C-contiguous uint8 array of that shape to decode into.
        """
        length = self._check_episode(index)
        times = np.arange(length) if times is None else np.asarray(times, dtype=np.int64).reshape(-1)
        if times.size and (times.min() < 0 or times.max() >= length):
            raise IndexError(f"times {times.tolist()} outside episode {index} of length {length}")
        return self._frame_files.read(index, times, out)

    def episode(self, index: int) -> dict:
        """All data of one committed episode: frames, actions, states (cut to its length), seed."""
        return {
            "frames": self.frames(index),
            "actions": self.actions(index),
            "states": self.states(index),
            "seed": int(self.arrays["seeds"][index]),
        }

    def all_actions(self) -> np.ndarray:
        """float32 (E, T, A), padded; pair with ``lengths``. Small enough to hold in memory.

        Read once per commit-index version (one chunk per episode makes a full read ~1 ms/episode).
        Callers must not modify the returned array.
        """
        return self._padded("actions")

    def all_states(self) -> np.ndarray:
        """float32 (E, T, S), padded; pair with ``lengths``. Callers must not modify it."""
        return self._padded("states")

    def _padded(self, name: str) -> np.ndarray:
        if name not in self._padded_cache:
            self._padded_cache[name] = np.asarray(self.arrays[name][:])
        return self._padded_cache[name]

    def fingerprint(self) -> str:
        """A short hash of the committed content's shape and seeds (changes when episodes change)."""
        import hashlib

        h = hashlib.sha256()
        h.update(json.dumps([self.path.name, list(self.frame_shape), self.max_len]).encode())
        h.update(self._lengths.tobytes())
        h.update(np.asarray(self.arrays["seeds"][:]).tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ internals
    def _require_writable(self) -> None:
        if self.mode != "a":
            raise PermissionError(f"{self.path} is open read-only; open it with mode='a' to write")

    def _validate_shapes(self) -> None:
        E = self.arrays["lengths"].shape[0]
        for name in REQUIRED_ARRAYS:
            if self.arrays[name].shape[0] != E:
                raise DatasetError(
                    f"dataset {self.path}: array '{name}' has {self.arrays[name].shape[0]} episodes but "
                    f"'lengths' has {E}; the arrays disagree. The dataset is corrupt: collect it again."
                )
        T = self.arrays["frames"].shape[1]
        for name in ("actions", "states"):
            if self.arrays[name].shape[1] != T:
                raise DatasetError(
                    f"dataset {self.path}: '{name}' holds {self.arrays[name].shape[1]} steps per episode "
                    f"but 'frames' holds {T}. The dataset is corrupt: collect it again."
                )


def jsonable(value):
    """Convert numpy scalars/arrays and tuples inside metadata to plain JSON types."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
