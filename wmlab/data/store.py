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
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wmlab.data.errors import DatasetError

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
        self._frame_files = _FrameShards(self.path / "frames", self.arrays["frames"])
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


class _FrameShards:
    """Read and write an episode's frames as one Zarr shard file, directly (else via Zarr's API).

    A shard is the spec's ``sharding_indexed`` layout: the Blosc-compressed frames one after the
    other, then an index of (offset, nbytes) uint64 pairs per frame (2**64 - 1 = empty) and the
    index's CRC32C. One file per episode keeps disk use near the compressed size (a file per frame
    costs a 4 KiB block each, more than a compressed 64 px frame) and still reads any single frame
    with one ``pread``. The fast path is valid only for this store's own layout; tests check that
    Zarr and it read and write the same bytes. Zarr's API costs ~1 ms per frame: more than
    rendering a 64 px frame, and 4x that for a training window.
    """

    EMPTY = np.uint64(2**64 - 1)
    INDEX_CACHE = 4096  # episodes whose shard index stays in memory (16 bytes per frame each)

    def __init__(self, array_dir: Path, array) -> None:
        self.array = array
        self.array_dir = array_dir
        self.max_len = int(array.shape[1])
        self.frame_shape = tuple(array.shape[2:])
        self.fill_value = array.fill_value
        self.codec = None
        self._index_cache: dict[int, np.ndarray] = {}
        try:
            meta = json.loads((array_dir / "zarr.json").read_text())
            self.separator = meta["chunk_key_encoding"]["configuration"]["separator"]
            (sharding,) = meta["codecs"]
            config = sharding["configuration"]
            inner = config["codecs"]
            fast = (
                sharding["name"] == "sharding_indexed"
                and meta["chunk_grid"]["configuration"]["chunk_shape"] == [1, self.max_len, *self.frame_shape]
                and config["chunk_shape"] == [1, 1, *self.frame_shape]
                and [c["name"] for c in inner] == ["bytes", "blosc"]
                and [c["name"] for c in config["index_codecs"]] == ["bytes", "crc32c"]
                and config["index_codecs"][0].get("configuration", {}).get("endian", "little") == "little"
                and config.get("index_location", "end") == "end"
                and meta["data_type"] == "uint8"
            )
            if fast:
                import numcodecs

                blosc = inner[1]["configuration"]
                shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[blosc["shuffle"]]
                self.codec = numcodecs.Blosc(cname=blosc["cname"], clevel=blosc["clevel"], shuffle=shuffle)
        except (OSError, KeyError, ValueError, TypeError):
            self.codec = None

    def shard_path(self, episode: int) -> str:
        # Plain string formatting: pathlib costs more than decoding a frame on this hot path.
        sep = self.separator
        return f"{self.array_dir}/c{sep}{int(episode)}{sep}0{sep}0{sep}0{sep}0"

    def write(self, episode: int, frames: np.ndarray) -> None:
        """Write frames (L, H, W, 3) uint8 as episode ``episode``'s shard, atomically."""
        import google_crc32c

        self._index_cache.pop(int(episode), None)
        if self.codec is None:
            self.array[episode, : len(frames)] = frames
            return
        chunks = [self.codec.encode(np.ascontiguousarray(frame)) for frame in frames]
        index = np.full((self.max_len, 2), self.EMPTY, dtype="<u8")  # (T, [offset, nbytes])
        sizes = np.array([len(c) for c in chunks], dtype=np.uint64)
        index[: len(chunks), 1] = sizes
        index[: len(chunks), 0] = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.uint64)
        index_bytes = index.tobytes()
        checksum = google_crc32c.value(index_bytes).to_bytes(4, "little")
        # One writer per slot at a time, so a per-slot temp name is safe and a killed writer's
        # leftover is simply overwritten when the slot is redone.
        tmp = f"{self.array_dir}/.c{int(episode)}.partial"
        with open(tmp, "wb") as f:
            f.write(b"".join([*chunks, index_bytes, checksum]))
        os.replace(tmp, self.shard_path(episode))

    def _index(self, episode: int, fd: int, path: str) -> np.ndarray:
        """(T, 2) uint64 [offset, nbytes] of a shard, checked against its CRC32C."""
        cached = self._index_cache.get(episode)
        if cached is not None:
            return cached
        import google_crc32c

        size = os.fstat(fd).st_size
        n_index = self.max_len * 16 + 4
        if size < n_index:
            raise DatasetError(
                f"frame shard {path} is truncated ({size} bytes); re-collect episode {episode}"
            )
        tail = os.pread(fd, n_index, size - n_index)
        if google_crc32c.value(tail[:-4]).to_bytes(4, "little") != tail[-4:]:
            raise DatasetError(
                f"frame shard {path} is corrupt (index checksum); re-collect episode {episode}"
            )
        index = np.frombuffer(tail[:-4], dtype="<u8").reshape(self.max_len, 2)
        if len(self._index_cache) >= self.INDEX_CACHE:
            self._index_cache.pop(next(iter(self._index_cache)))
        self._index_cache[episode] = index
        return index

    def read(self, episode: int, times: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Frames uint8 (len(times), H, W, 3), decoded into ``out`` when given (no extra copy)."""
        if out is None:
            out = np.empty((len(times), *self.frame_shape), dtype=np.uint8)
        if self.codec is None:
            out[:] = self.array.oindex[episode, times]
            return out
        path = self.shard_path(episode)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            out[:] = self.fill_value  # Zarr semantics: an unwritten shard holds the fill value
            return out
        try:
            index = self._index(int(episode), fd, path)
            for k, t in enumerate(times):
                offset, nbytes = index[t]
                if offset == self.EMPTY:
                    out[k] = self.fill_value
                    continue
                raw = os.pread(fd, int(nbytes), int(offset))
                try:
                    self.codec.decode(raw, out=out[k])
                except Exception as err:
                    raise DatasetError(
                        f"frame {t} in shard {path} is corrupt or truncated ({err}); "
                        f"re-collect episode {episode}"
                    ) from err
        finally:
            os.close(fd)
        return out


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
