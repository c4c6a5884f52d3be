"""Trajectory store: a Zarr v3 directory holding padded episodes plus a commit index.

Layout (``E`` episode slots, ``T`` = max episode length, frames ``H x W x 3``)::

    <dataset>.zarr/
      zarr.json                 group attributes = metadata (env id, render size, versions, ...)
      frames     uint8  (E, T, H, W, 3)   one shard file per episode, one compressed chunk per frame
      actions    float32 (E, T, A)        one chunk per episode
      states     float32 (E, T, S)        one chunk per episode; state = proprio for PointMaze
      seeds      int64  (E,)              the seed each episode was generated from
      lengths    int64  (E,)              0 = not committed; else the valid length
      digests    int64  (E,)              content checksum of each committed episode's files (format 2)

Why this shape. It is DINO-WM's padded (N, T_max, ...) layout, so conversion is a copy. Episode
slots are fixed, so parallel workers write their own episode's files directly (distinct files), and
unwritten padding costs no disk (Zarr does not store empty chunks). An episode becomes visible only
when the single writer of ``lengths`` commits it (the writer holds the dataset's ``WriterLock``), and
every file is written atomically (temp file + rename), so a reader never sees half an episode and a
killed writer leaves nothing half-valid: resume simply re-collects the uncommitted slots.

Creation is atomic too: ``create`` builds the whole store (arrays, seeds, an all-zero commit index,
metadata) in a temp directory beside it and renames it into place, so a dataset either exists whole
or not at all; temp directories of dead writers are removed on the next creation.

Integrity (format 2). Every chunk carries a CRC32C (Zarr's ``crc32c`` codec: the last inner codec of
the frame shards, the last codec of the other arrays), so Zarr itself verifies what it reads and the
frame fast path (``wmlab.data.shards``) verifies each chunk before decoding. A committed episode must
be whole: a missing shard or chunk file, a bad checksum, a commit index (``lengths``) that is missing
or corrupt, or non-finite actions/states raise ``DatasetError`` naming the file and the fix. Fill
values make loss visible: a missing ``lengths`` chunk reads -1, missing actions/states read NaN.
``digests`` (written at commit, before ``lengths``) make ``fingerprint()`` cover content, not only
lengths and seeds. Stores of format 1 (no checksums, no digests) are still read; ``checksummed`` is
False for them, their digests are computed from the files when needed, and re-collecting (or
``wmlab convert`` again) upgrades them.

Frames are read and written through a fast path that handles the shard files with numcodecs
directly (the Zarr API costs ~1 ms per frame; a window needs 4), checked against Zarr in tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wmlab.data.errors import DatasetError
from wmlab.data.shards import EpisodeShards
from wmlab.integrity import _pid_alive, clean_partials, fault_point, fsync_dir, unique_tmp

REQUIRED_ARRAYS = ("frames", "actions", "states", "seeds", "lengths")
FORMAT_NAME = "wmlab-trajectories"
#: 2: per-chunk CRC32C on every array, NaN/-1 fill values, ``digests``. 1: no checksums (still read).
FORMAT_VERSION = 2
#: Fill of ``seeds`` in format 2 (never a seed we write): a seeds chunk that was lost reads as this.
MISSING_SEED = -(2**63)


def open_arrays(group, path: Path, names, what: str, fix: str) -> dict:
    """``{name: group[name]}``; a missing array, or one whose ``zarr.json`` no longer parses (a flipped
    bit, a truncation), is a ``DatasetError`` naming that file and ``fix`` — never Zarr's or json's own
    message, which names neither the file nor what to do."""
    arrays, missing = {}, []
    for name in names:
        meta = Path(path) / name / "zarr.json"
        if not meta.is_file():
            missing.append(name)
            continue
        try:
            arrays[name] = group[name]
        except Exception as err:  # JSONDecodeError, UnicodeDecodeError, Zarr's metadata validation
            raise DatasetError(f"{what}: {meta} is damaged ({type(err).__name__}: {err}); {fix}") from err
    if missing:
        raise DatasetError(f"{what} lacks arrays {missing}; {fix}")
    return arrays


def _zarr():
    import zarr

    return zarr


def _blosc(cname: str = "lz4", clevel: int = 5):
    from zarr.codecs import BloscCodec

    # No shuffle: frames are uint8, and byte-shuffling halves the ratio on flat-colour renders.
    return BloscCodec(cname=cname, clevel=clevel, shuffle="noshuffle")


def _crc():
    from zarr.codecs import Crc32cCodec

    return Crc32cCodec()


_ZARR_TMP = re.compile(r".*\.[0-9a-f]{32}\.partial$")  # Zarr's own temp names (uuid4, no pid)


def clean_dead_partials(directory: Path) -> int:
    """Remove leftover temp files inside a dataset or cache whose writer lock we hold.

    ``clean_partials`` removes our pid-named temp files of dead writers; Zarr's temp files carry a
    uuid instead of a pid, so they are removed here, which is safe only because the caller holds the
    artefact's ``WriterLock`` and has not started its workers yet: nobody else can be writing.
    """
    directory = Path(directory)
    removed = clean_partials(directory, recursive=True)
    for path in directory.rglob("*.partial"):
        # features/ holds caches with locks of their own: an encoder may be writing there now.
        inside_cache = "features" in path.relative_to(directory).parts
        if path.is_file() and _ZARR_TMP.match(path.name) and not inside_cache:
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    return removed


def remove_dead_temp_dirs(path: Path) -> int:
    """Delete temp directories ``.<name>.<pid>.<random>.partial`` beside ``path`` left by dead writers
    (a creation killed before its rename). Directories of live writers are left alone."""
    path = Path(path)
    if not path.parent.is_dir():
        return 0
    removed = 0
    for tmp in path.parent.glob(f".{path.name}.*.partial"):
        parts = tmp.name[len(path.name) + 2 :].split(".")  # [pid, random, "partial"]
        if not tmp.is_dir() or len(parts) != 3 or not parts[0].isdigit():
            continue
        if _pid_alive(int(parts[0]), None):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed += 1
    return removed


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
    -> uint8 (len(t), H, W, 3); ``store.committed`` -> indices of complete episodes. Readers take no
    lock; writers (collect, convert) hold the dataset's ``WriterLock`` while a store is open with
    ``mode='a'``.
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
        self.format_version = int(self.group.attrs.get("format_version", 1))
        if self.format_version > FORMAT_VERSION:
            raise DatasetError(
                f"dataset {self.path} has format version {self.format_version}; this wmlab reads up to "
                f"{FORMAT_VERSION}. Upgrade wmlab."
            )
        names = REQUIRED_ARRAYS + (("digests",) if self.format_version >= 2 else ())
        self.arrays = open_arrays(
            self.group, self.path, names, f"dataset {self.path}",
            "it was not fully created or is damaged. Delete it and collect (or convert) it again",
        )  # fmt: skip
        self.mode = mode
        self._validate_shapes()
        self._frame_files = EpisodeShards(
            self.path / "frames", self.arrays["frames"], what="frame", redo="re-collect"
        )
        self.refresh()

    @property
    def checksummed(self) -> bool:
        """True when every chunk carries a CRC32C (format 2); False for format-1 stores."""
        return self.format_version >= 2 and self._frame_files.checksummed

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, path: str | Path, spec: StoreSpec, metadata: dict, seeds=None) -> TrajectoryStore:
        """Create an empty store with ``spec.n_episodes`` uncommitted slots and per-slot ``seeds`` (E,).

        Built whole in a temp directory beside ``path`` (arrays, seeds, the commit index, metadata),
        then renamed into place: a kill at any point leaves either no dataset or a complete empty one.
        The caller holds ``WriterLock(path)``.
        """
        path = Path(path)
        if path.exists():
            raise DatasetError(f"{path} already exists; open it with TrajectoryStore(path, mode='a')")
        E = spec.n_episodes
        seeds = np.zeros(E, np.int64) if seeds is None else np.asarray(seeds, dtype=np.int64).reshape(-1)
        if seeds.shape != (E,):
            raise ValueError(f"seeds must have shape ({E},), got {seeds.shape}")
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temp_dirs(path)
        tmp = unique_tmp(path)
        try:
            group = _zarr().open_group(str(tmp), mode="w-")
            _create_arrays(group, spec)
            fault_point("store.create:arrays")
            group["seeds"][:] = seeds
            group["lengths"][:] = np.zeros(E, np.int64)
            meta = dict(metadata)
            meta.update(format=FORMAT_NAME, format_version=FORMAT_VERSION)
            group.attrs.update(jsonable(meta))
            fault_point("store.create:before_rename")
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(path.parent)
        return cls(path, mode="a")

    def grow(self, n_episodes: int) -> None:
        """Add empty slots so the store holds ``n_episodes`` (never shrinks).

        ``lengths`` is resized last and its new slots written at once, so a kill in between leaves
        data arrays larger than the commit index (tolerated: the extra slots are invisible) or a
        commit index whose new tail chunk is missing (repaired on the next open for writing).
        """
        self._require_writable()
        if n_episodes <= self.n_slots:
            return
        old = self._read("lengths", "the commit index")
        seeds = self._read("seeds", "the episode seeds")[: len(old)]
        for name, array in self.arrays.items():
            if name != "lengths" and array.shape[0] < n_episodes:
                array.resize((n_episodes, *array.shape[1:]))
        # New slots' seeds are unknown (-1) until the collector sets them; never the "lost" fill.
        self.arrays["seeds"][:] = np.concatenate([seeds, np.full(n_episodes - len(seeds), -1, np.int64)])
        self.arrays["lengths"].resize((n_episodes,))
        fault_point("store.grow:lengths_resized")
        self.arrays["lengths"][:] = np.concatenate([old, np.zeros(n_episodes - len(old), np.int64)])
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
        for field, values in (("actions", actions), ("states", states)):
            check_finite(np.asarray(values, dtype=np.float32), f"{field} of episode {index} being written")
        self._frame_files.write(index, frames)
        padded_actions = np.zeros(self.arrays["actions"].shape[1:], np.float32)
        padded_actions[:L] = actions
        padded_states = np.zeros(self.arrays["states"].shape[1:], np.float32)
        padded_states[:L] = states
        self.arrays["actions"][index] = padded_actions
        self.arrays["states"][index] = padded_states

    def set_seeds(self, seeds) -> None:
        """Write per-slot seeds (E,) (one atomic file)."""
        self._require_writable()
        self.arrays["seeds"][:] = np.asarray(seeds, dtype=np.int64)
        self._seeds = None

    def commit(self, lengths_by_index: dict[int, int]) -> None:
        """Make episodes visible: their digests, then the commit index (one atomic file write each,
        for any number of episodes). A kill between the two leaves a digest for an invisible slot."""
        self._require_writable()
        if not lengths_by_index:
            return
        if "digests" in self.arrays:
            digests = self._read("digests", "the episode digests")
            for index, length in lengths_by_index.items():
                digests[index] = self.compute_digest(int(index)) if length else -1
            self.arrays["digests"][:] = digests
            fault_point("store.commit:digests")
        lengths = self._read("lengths", "the commit index")
        for index, length in lengths_by_index.items():
            lengths[index] = int(length)
        self.arrays["lengths"][:] = lengths
        self._lengths = lengths
        self._padded_cache = {}
        self._digests = None
        self._seeds = None

    def update_metadata(self, **items) -> None:
        self._require_writable()
        self.group.attrs.update(jsonable(items))

    # ------------------------------------------------------------------ reading
    def refresh(self) -> None:
        """Re-read the commit index (another process may be writing).

        Raises ``DatasetError`` if the commit index is missing, corrupt or out of range: a lost
        ``lengths`` must never read as an empty dataset.
        """
        lengths = np.asarray(self._read("lengths", "the commit index"), dtype=np.int64)
        chunk = int(self.arrays["lengths"].chunks[0])
        if self.format_version >= 2:
            lengths = self._repair_interrupted_grow(lengths)
            lost = np.flatnonzero(lengths == -1)
        else:  # format 1 fills with 0: a missing chunk is only visible as files without an index
            lost = np.array([], np.int64)
            n_chunks = -(-self.n_slots // chunk)
            absent = [k for k in range(n_chunks) if not self._chunk_file("lengths", (k,)).is_file()]
            if absent and any(self._frame_files.exists(i) for i in range(self.n_slots)):
                lost = np.arange(self.n_slots)
        if lost.size:
            where = self._chunk_file("lengths", (int(lost[0]) // chunk,))
            raise DatasetError(
                f"the commit index {where} of dataset {self.path} is missing, so which episodes are "
                f"complete is unknown (slots {lost[:5].tolist()}...). Delete {self.path} and collect "
                "(or convert) it again."
            )
        bad = np.flatnonzero((lengths < 0) | (lengths > self.max_len))
        if bad.size:
            raise DatasetError(
                f"the commit index {self.path / 'lengths'} is corrupt: slot {int(bad[0])} has length "
                f"{int(lengths[bad[0]])}, outside [0, {self.max_len}]. Delete {self.path} and collect again."
            )
        self._lengths = lengths
        self._padded_cache: dict[str, np.ndarray] = {}
        self._digests: np.ndarray | None = None
        self._seeds: np.ndarray | None = None

    def _repair_interrupted_grow(self, lengths: np.ndarray) -> np.ndarray:
        """Slots past the first chunk that read -1 with no frame files are a ``grow`` killed between
        resizing ``lengths`` and writing its new slots: they are empty slots (rewritten in mode 'a')."""
        chunk = int(self.arrays["lengths"].chunks[0])
        lost = np.flatnonzero(lengths == -1)
        if not lost.size or lost[0] < chunk or lost[0] % chunk or lost[-1] != len(lengths) - 1:
            return lengths
        if len(lost) != len(lengths) - lost[0] or any(self._frame_files.exists(int(i)) for i in lost):
            return lengths
        lengths = lengths.copy()
        lengths[lost] = 0
        if self.mode == "a":
            self.arrays["lengths"][:] = lengths
        return lengths

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

    @property
    def seeds(self) -> np.ndarray:
        """int64 (E,) per-slot seeds (checked; read once per commit-index version)."""
        if self._seeds is None:
            seeds = self._read("seeds", "the episode seeds")[: self.n_slots]
            if self.format_version >= 2 and (seeds[self.committed] == MISSING_SEED).any():
                raise DatasetError(
                    f"the seeds of dataset {self.path} are missing ({self.path / 'seeds'}); delete the "
                    "dataset and collect it again"
                )
            self._seeds = seeds
        return self._seeds.copy()

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
        """float32 (L, A) of a committed episode (checked: present, checksum, finite)."""
        return self._episode_field("actions", index)

    def states(self, index: int) -> np.ndarray:
        """float32 (L, S) of a committed episode (checked: present, checksum, finite)."""
        return self._episode_field("states", index)

    def _episode_field(self, name: str, index: int) -> np.ndarray:
        length = self._check_episode(index)
        if name in self._padded_cache:
            return self._padded_cache[name][index, :length].copy()
        values = self._read_episode_chunk(name, index)[:length]
        check_finite(values, f"{name} of episode {index} in {self.path}", self._redo(index))
        return values

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
            "seed": int(self.seeds[index]),
        }

    def all_actions(self) -> np.ndarray:
        """float32 (E, T, A), padded; pair with ``lengths``. Small enough to hold in memory.

        Read once per commit-index version (one chunk per episode makes a full read ~1 ms/episode).
        Every committed episode's chunk must be present, pass its checksum and be finite; rows of
        uncommitted slots are zero. Callers must not modify the returned array.
        """
        return self._padded("actions")

    def all_states(self) -> np.ndarray:
        """float32 (E, T, S), padded; pair with ``lengths``. Callers must not modify it."""
        return self._padded("states")

    def _padded(self, name: str) -> np.ndarray:
        if name not in self._padded_cache:
            committed = self.committed
            for index in committed:  # a lost chunk would read as the fill value: refuse it by name
                if not self._chunk_file(name, (int(index), 0, 0)).is_file():
                    raise self._missing_chunk(name, int(index))
            try:
                values = np.array(self.arrays[name][: self.n_slots])  # (E, T, dim), one Zarr call
            except Exception:
                # Read the committed episodes one by one: names the bad chunk, or (if only an
                # uncommitted slot's chunk is damaged) still serves every committed episode.
                values = np.zeros((self.n_slots, *self.arrays[name].shape[1:]), np.float32)
                for index in committed:
                    values[index] = self._read_episode_chunk(name, int(index))
            values[self._lengths == 0] = 0.0
            valid = np.arange(self.max_len)[None, :] < self._lengths[:, None]  # (E, T)
            bad = ~np.isfinite(values).all(axis=-1) & valid  # (E, T)
            if bad.any():
                index, step = (int(v) for v in np.argwhere(bad)[0])
                raise DatasetError(
                    f"{name} of episode {index} in {self.path} are not finite (NaN or inf) from step {step} "
                    f"({int(bad.any(1).sum())} episode(s) affected); {self._redo(index)}"
                )
            self._padded_cache[name] = values
        return self._padded_cache[name]

    # ------------------------------------------------------------------ content identity
    def compute_digest(self, index: int) -> int:
        """Content checksum of episode ``index``'s files as stored (frame shard, actions and states
        chunks): sha256, first 63 bits. Not CRC32C: each file ends with its own CRC, and a CRC over
        data followed by its CRC is a constant, so CRCs of these files would not tell episodes apart.
        """
        h = hashlib.sha256()
        for file in (
            Path(self._frame_files.shard_path(index)),
            self._chunk_file("actions", (index, 0, 0)),
            self._chunk_file("states", (index, 0, 0)),
        ):
            try:
                h.update(file.read_bytes())
            except FileNotFoundError:
                raise self._missing_chunk(file.parent.name, index, file) from None
        return int.from_bytes(h.digest()[:8], "little") >> 1

    @property
    def digests(self) -> np.ndarray:
        """int64 (E,) content checksum of each committed episode (-1 for uncommitted slots).

        Format 2 stores them at commit; for format 1 they are computed from the files (reads the
        whole dataset once per process).
        """
        if self._digests is None:
            committed = self.committed
            digests = np.full(self.n_slots, -1, np.int64)
            if "digests" in self.arrays:
                stored = self._read("digests", "the episode digests")[: self.n_slots]
                lost = committed[stored[committed] == -1]
                if lost.size:
                    raise DatasetError(
                        f"the digests {self.path / 'digests'} of committed episodes {lost[:5].tolist()} in "
                        f"{self.path} are missing; delete the dataset and collect it again"
                    )
                digests[committed] = stored[committed]
            else:
                digests[committed] = [self.compute_digest(int(i)) for i in committed]
            self._digests = digests
        return self._digests.copy()

    def verify(self, episodes=None) -> None:
        """Recompute the digests of ``episodes`` (default: all committed) from the files and compare
        them with those recorded at commit; raise ``DatasetError`` naming the first that differs."""
        episodes = self.committed if episodes is None else np.asarray(episodes, dtype=np.int64)
        recorded = self.digests
        for index in episodes:
            self._check_episode(int(index))
            if "digests" in self.arrays and self.compute_digest(int(index)) != recorded[index]:
                raise DatasetError(
                    f"episode {int(index)} of {self.path} changed since it was committed (its files no "
                    f"longer match their digest); {self._redo(int(index))}"
                )
            self.frames(int(index))
            self.actions(int(index))
            self.states(int(index))

    def fingerprint(self) -> str:
        """A short hash of the committed content: shapes, lengths, seeds and each committed episode's
        digest (so re-collecting an episode with other pixels changes it; renaming the folder does not).
        """
        h = hashlib.sha256()
        h.update(json.dumps([list(self.frame_shape), self.max_len]).encode())
        committed = self.committed
        h.update(committed.astype("<i8").tobytes())
        h.update(self._lengths[committed].astype("<i8").tobytes())
        h.update(self.seeds[committed].astype("<i8").tobytes())
        h.update(self.digests[committed].astype("<i8").tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ internals
    def _require_writable(self) -> None:
        if self.mode != "a":
            raise PermissionError(f"{self.path} is open read-only; open it with mode='a' to write")

    def _redo(self, index: int) -> str:
        return f"re-collect episode {index} (or delete {self.path} and collect it again)"

    def _chunk_file(self, name: str, coords: tuple[int, ...]) -> Path:
        return self.path / name / self.arrays[name].metadata.encode_chunk_key(coords)

    def _missing_chunk(self, name: str, index: int, file: Path | None = None) -> DatasetError:
        file = file or self._chunk_file(name, (index, 0, 0))
        return DatasetError(
            f"{name} file {file} of committed episode {index} is missing; {self._redo(index)}"
        )

    def _read(self, name: str, what: str) -> np.ndarray:
        """A whole small array (seeds, lengths, digests), its checksum verified by Zarr."""
        try:
            return np.asarray(self.arrays[name][:]).copy()
        except Exception as err:
            raise DatasetError(
                f"{what} {self.path / name} of dataset {self.path} is corrupt ({type(err).__name__}: "
                f"{str(err)[:120]}); delete {self.path} and collect (or convert) it again"
            ) from err

    def _read_episode_chunk(self, name: str, index: int) -> np.ndarray:
        """float32 (T, dim) of one episode's actions/states chunk: present, checksum verified."""
        file = self._chunk_file(name, (index, 0, 0))
        if not file.is_file():
            raise self._missing_chunk(name, index, file)
        try:
            return np.asarray(self.arrays[name][index])
        except Exception as err:
            raise DatasetError(
                f"{name} file {file} of episode {index} is corrupt ({type(err).__name__}: {str(err)[:120]}); "
                f"{self._redo(index)}"
            ) from err

    def _validate_shapes(self) -> None:
        E = self.arrays["lengths"].shape[0]
        for name in self.arrays:
            # Larger is a grow killed before ``lengths`` was resized: the extra slots are invisible.
            if self.arrays[name].shape[0] < E:
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


def _create_arrays(group, spec: StoreSpec) -> None:
    """The arrays of a format-2 store: every chunk CRC32C-checked, fills that make loss visible."""
    E, T = spec.n_episodes, spec.max_len
    H, W, C = spec.frame_shape
    # "." keys ("c.3.0.0.0.0") keep every array's files in one folder: nested folders per
    # chunk cost a 4 KiB block each.
    flat_keys = {"name": "default", "separator": "."}
    group.create_array(
        "frames", shape=(E, T, H, W, C), chunks=(1, 1, H, W, C), shards=(1, T, H, W, C),
        dtype="uint8", compressors=[_blosc(spec.compression), _crc()], fill_value=0,
        chunk_key_encoding=flat_keys,
    )  # fmt: skip
    for name, dim in (("actions", spec.action_dim), ("states", spec.state_dim)):
        group.create_array(
            name, shape=(E, T, dim), chunks=(1, T, dim), dtype="float32",
            compressors=[_blosc("zstd"), _crc()], fill_value=float("nan"), chunk_key_encoding=flat_keys,
        )  # fmt: skip
    for name, fill in (("seeds", MISSING_SEED), ("lengths", -1), ("digests", -1)):
        group.create_array(
            name, shape=(E,), chunks=(max(E, 1),), dtype="int64", fill_value=fill,
            compressors=[_crc()], chunk_key_encoding=flat_keys,
        )  # fmt: skip


def check_finite(values: np.ndarray, what: str, fix: str = "fix the data or collect it again") -> None:
    """Raise ``DatasetError`` naming ``what`` and the first non-finite step of values (L, dim)."""
    values = np.asarray(values)
    finite = np.isfinite(values)
    if not finite.all():
        step = int(np.argwhere(~finite)[0][0])
        raise DatasetError(f"{what} are not finite (NaN or inf, first at step {step}); {fix}")


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
