"""DINO-WM's ``point_maze`` dataset folder: read it directly, convert it to a wmlab store, export back.

DINO-WM's layout (``N`` episodes, ``T_max`` = longest episode)::

    point_maze/
      states.pth         float  [N, T_max, 4]   rows past seq_lengths[i] are zero padding
      actions.pth        float  [N, T_max, 2]   same padding
      seq_lengths.pth    int    [N]             valid length of each episode
      obses/episode_{i:03d}.pth  uint8 [T, 224, 224, 3]   one file per episode

The files are pickles (``torch.save``). A pickle can run arbitrary code when loaded, and these
folders are downloaded from the internet, so every file is loaded with ``weights_only=True``
(torch's restricted unpickler: tensors and plain containers only) and anything else is refused.

DINO-WM's own files use float64 states, float32 actions and int64 lengths; ``export_dino_wm``
writes the same dtypes so DINO-WM's loader sees exactly what it would see for its own data.
"""

from __future__ import annotations

import hashlib
import pickle
import time
import warnings
from pathlib import Path

import numpy as np

from wmlab.data.errors import DatasetError
from wmlab.data.store import StoreSpec, TrajectoryStore, clean_dead_partials, fault_point
from wmlab.integrity import WriterLock, atomic_write_with

#: What each top-level file is, for error messages that say what the folder needs.
TOP_FILES = {
    "states.pth": "float [N, T_max, S] states",
    "actions.pth": "float [N, T_max, A] actions",
    "seq_lengths.pth": "int [N] episode lengths",
}
OBSES_DIR = "obses"
#: Seed recorded for converted episodes: DINO-WM does not record per-episode seeds, and 0 is a
#: valid seed, so -1 is used to mean "unknown" unambiguously.
UNKNOWN_SEED = -1
#: Episodes committed per ``store.commit`` (one file write each): bounds the work lost to a kill.
COMMIT_BATCH = 16
#: dtypes of DINO-WM's own point_maze files (checked against the fixture).
EXPORT_DTYPES = {"states": "float64", "actions": "float32", "seq_lengths": "int64"}


def episode_filename(index: int) -> str:
    """DINO-WM's name for episode ``index``'s frames file, e.g. ``episode_007.pth``."""
    return f"episode_{int(index):03d}.pth"


# ---------------------------------------------------------------- safe loading
def safe_torch_load(path: str | Path, what: str | None = None):
    """Load a ``.pth`` file without executing code (``torch.load(..., weights_only=True)`` on CPU).

    ``what`` describes the file for the missing-file message (e.g. "DINO-WM point_maze folder needs
    states.pth ..."). Raises ``DatasetError`` naming the file when it is missing, truncated or
    corrupt, or holds pickled objects other than tensors/containers (which could run code).
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{what or 'file needed'}: {path} does not exist")
    if not path.is_file():
        raise DatasetError(f"{path} is not a file; expected a torch .pth file ({what or 'tensor data'})")
    try:
        with warnings.catch_warnings():
            # Files written with pickle protocol > 2 load fine but torch warns about each one.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            # torch names the refused callable (e.g. "unsupported GLOBAL posix.system"): pass it on.
            lines = str(err).splitlines()
            detail = next((line.strip() for line in lines if "unsupported" in line.lower()), "")
            raise DatasetError(
                f"{path} holds pickled objects other than tensors (code that would run on load); "
                f"we refuse to execute it. Only plain tensor files are accepted. {detail}".rstrip()
            ) from None
        raise DatasetError(f"{path} is truncated or corrupt (unpickling failed: {err})") from err
    except Exception as err:  # torch raises EOFError, RuntimeError, KeyError, ... on bad bytes
        # First sentence only: torch appends long generic advice to its zip-reader errors.
        reason = str(err).split(". ")[0][:200]
        raise DatasetError(
            f"{path} is truncated or corrupt ({type(err).__name__}: {reason}); download or export it again"
        ) from err


def _as_numpy(value, path: Path) -> np.ndarray:
    """A loaded tensor (or array) as numpy; anything else (dict, list, ...) is not this format."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise DatasetError(f"{path} holds a {type(value).__name__}, expected a tensor")


# ---------------------------------------------------------------- direct reader
class DinoWMDataset:
    """Read a DINO-WM ``point_maze`` folder directly (no conversion).

    states/actions/seq_lengths are loaded once on open and validated; each episode's frames file is
    loaded only when asked for (one file per call), as DINO-WM itself does.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise DatasetError(
                f"DINO-WM point_maze folder not found at {self.path}: it must be a directory holding "
                f"{', '.join(TOP_FILES)} and {OBSES_DIR}/"
            )
        loaded = {}
        for name, desc in TOP_FILES.items():
            file = self.path / name
            raw = safe_torch_load(file, what=f"DINO-WM point_maze folder needs {name} ({desc})")
            loaded[name] = _as_numpy(raw, file)
        states, actions, lengths = loaded["states.pth"], loaded["actions.pth"], loaded["seq_lengths.pth"]
        self.source_dtypes = {
            "states": str(states.dtype),
            "actions": str(actions.dtype),
            "seq_lengths": str(lengths.dtype),
        }
        self._validate(states, actions, lengths)
        # float32 is what wmlab trains on; the raw dtypes are kept in ``source_dtypes``.
        self._states = states.astype(np.float32)
        self._actions = actions.astype(np.float32)
        self._lengths = lengths.astype(np.int64)
        self._check_obses_files()
        self._frame_shape: tuple[int, int, int] | None = None

    def _validate(self, states: np.ndarray, actions: np.ndarray, lengths: np.ndarray) -> None:
        for name, array, ndim in (("states.pth", states, 3), ("actions.pth", actions, 3)):
            if array.ndim != ndim or not np.issubdtype(array.dtype, np.floating):
                raise DatasetError(
                    f"{self.path / name} holds {array.dtype} {list(array.shape)}; expected a float "
                    f"[N, T_max, dim] tensor"
                )
        if lengths.ndim != 1:
            raise DatasetError(
                f"{self.path / 'seq_lengths.pth'} has shape {list(lengths.shape)}; expected [N]"
            )
        n_states = states.shape[0]
        for name, n in (("actions.pth", actions.shape[0]), ("seq_lengths.pth", lengths.shape[0])):
            if n != n_states:
                raise DatasetError(
                    f"{self.path}: states.pth holds {n_states} episodes but {name} holds {n}; the files "
                    "disagree (mixed downloads?)"
                )
        if actions.shape[1] != states.shape[1]:
            raise DatasetError(
                f"{self.path}: states.pth holds {states.shape[1]} steps per episode but actions.pth "
                f"holds {actions.shape[1]}; the files disagree"
            )
        if n_states == 0:
            raise DatasetError(f"{self.path}: states.pth holds no episodes")
        if not np.issubdtype(lengths.dtype, np.integer):
            if not np.all(np.isfinite(lengths)) or np.any(lengths != np.round(lengths)):
                raise DatasetError(f"{self.path / 'seq_lengths.pth'} holds non-integer lengths")
        t_max = states.shape[1]
        bad = np.flatnonzero((lengths < 1) | (lengths > t_max))
        if bad.size:
            i = int(bad[0])
            raise DatasetError(
                f"{self.path / 'seq_lengths.pth'}: episode {i} has length {lengths[i]}, outside [1, {t_max}] "
                f"(T_max of states.pth); {bad.size} episode(s) are out of range"
            )
        valid = np.arange(t_max)[None, :] < lengths.astype(np.int64)[:, None]  # (N, T_max)
        for name, array in (("states.pth", states), ("actions.pth", actions)):
            bad = ~np.isfinite(array).all(axis=-1) & valid  # (N, T_max)
            if bad.any():
                episode, step = (int(v) for v in np.argwhere(bad)[0])
                raise DatasetError(
                    f"{self.path / name}: episode {episode} holds NaN or inf at step {step} "
                    f"({int(bad.any(1).sum())} episode(s) affected); the file is corrupt or was written "
                    "from broken data. Download or export it again"
                )

    def _check_obses_files(self) -> None:
        obses = self.path / OBSES_DIR
        if not obses.is_dir():
            raise DatasetError(
                f"DINO-WM point_maze folder needs {OBSES_DIR}/ with one {episode_filename(0)}-style uint8 "
                f"[T, H, W, 3] file per episode; {obses} does not exist"
            )
        present = {p.name for p in obses.iterdir()}
        missing = [episode_filename(i) for i in range(self.n_episodes) if episode_filename(i) not in present]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DatasetError(
                f"{self.path}: frames file {obses / missing[0]}{more} is missing; seq_lengths.pth lists "
                f"{self.n_episodes} episodes, so {OBSES_DIR}/ needs one file per episode"
            )

    # ------------------------------------------------------------ properties
    @property
    def n_episodes(self) -> int:
        return int(self._lengths.shape[0])

    def __len__(self) -> int:
        return self.n_episodes

    @property
    def lengths(self) -> np.ndarray:
        """Valid length of each episode, int64 (N,)."""
        return self._lengths.copy()

    @property
    def max_len(self) -> int:
        """T_max: steps per padded row of states.pth / actions.pth."""
        return int(self._states.shape[1])

    @property
    def action_dim(self) -> int:
        return int(self._actions.shape[2])

    @property
    def state_dim(self) -> int:
        return int(self._states.shape[2])

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        """(H, W, 3) of episode 0's frames (loads that one file once)."""
        if self._frame_shape is None:
            self._frame_shape = tuple(int(v) for v in self._load_frames(0).shape[1:])
        return self._frame_shape

    def fingerprint(self) -> str:
        """Short hash of states/actions/seq_lengths (not the frames: too large to hash on open)."""
        h = hashlib.sha256()
        for array in (self._lengths, self._states, self._actions):
            h.update(str(array.shape).encode())
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------ reading
    def _check_index(self, index: int) -> int:
        if not 0 <= index < self.n_episodes:
            raise IndexError(f"episode {index} out of range [0, {self.n_episodes}) in {self.path}")
        return int(self._lengths[index])

    def _load_frames(self, index: int) -> np.ndarray:
        """uint8 (L, H, W, 3) frames of episode ``index``, cut to its length."""
        length = self._check_index(index)
        file = self.path / OBSES_DIR / episode_filename(index)
        frames = _as_numpy(safe_torch_load(file, what=f"frames of episode {index}"), file)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise DatasetError(
                f"{file} holds {frames.dtype} {list(frames.shape)}; expected uint8 [T, H, W, 3]"
            )
        if frames.shape[0] < length:
            raise DatasetError(
                f"{file} holds {frames.shape[0]} frames but seq_lengths.pth says episode {index} has "
                f"{length} steps; the file is incomplete"
            )
        return frames[:length]

    def actions(self, index: int) -> np.ndarray:
        """float32 (L, A) actions of episode ``index`` (padding removed)."""
        return self._actions[index, : self._check_index(index)].copy()

    def states(self, index: int) -> np.ndarray:
        """float32 (L, S) states of episode ``index`` (padding removed)."""
        return self._states[index, : self._check_index(index)].copy()

    def frames(self, index: int, times=None, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 (len(times), H, W, 3) frames of episode ``index`` (all L if ``times`` is None),
        copied into ``out`` when given.

        The format stores an episode in one file, so this loads the whole episode file: training
        windows read this way are slow; ``wmlab convert`` once for fast random access.
        """
        frames = self._load_frames(index)
        if times is not None:
            times = np.asarray(times, dtype=np.int64).reshape(-1)
            if times.size and (times.min() < 0 or times.max() >= len(frames)):
                raise IndexError(f"times {times.tolist()} outside episode {index} of length {len(frames)}")
            frames = frames[times]
        if out is not None:
            out[:] = frames
            return out
        return np.ascontiguousarray(frames)

    # The padded views below let training windows (wmlab.data.windows) read this folder directly.
    @property
    def committed(self) -> np.ndarray:
        """Indices of all episodes (a DINO-WM folder has no incomplete ones)."""
        return np.arange(self.n_episodes)

    def all_actions(self) -> np.ndarray:
        """float32 (N, T_max, A), zero-padded past each length."""
        return self._actions

    def all_states(self) -> np.ndarray:
        """float32 (N, T_max, S), zero-padded past each length."""
        return self._states

    def episode(self, index: int) -> dict:
        """Episode ``index`` cut to its length: frames uint8 (L, H, W, 3), actions float32 (L, A),
        states float32 (L, S)."""
        return {
            "frames": np.ascontiguousarray(self._load_frames(index)),
            "actions": self.actions(index),
            "states": self.states(index),
        }


# ---------------------------------------------------------------- DINO-WM -> wmlab store
def convert_dino_wm(
    src: str | Path,
    out: str | Path,
    *,
    env: str = "point_maze",
    progress: bool = True,
    lock_wait: float = 0.0,
) -> TrajectoryStore:
    """Convert the DINO-WM folder ``src`` into a wmlab store at ``out``; returns it read-only.

    The store has one slot per source episode (same order), ``max_len`` = T_max and frames
    (H, W, 3) as in the source. Seeds are unknown in DINO-WM data and are recorded as -1.
    Resumable: if ``out`` already holds a conversion of the same source (same states/actions/
    seq_lengths fingerprint), committed episodes are skipped and the rest converted. Any other
    existing ``out`` raises ``DatasetError``. Holds ``out``'s writer lock: a second writer raises
    ``LockHeld`` (or waits ``lock_wait`` seconds).
    """
    src, out = Path(src), Path(out)
    ds = DinoWMDataset(src)  # validated (shapes, lengths, finite values) before anything is created
    with WriterLock(out, "dataset", wait=lock_wait):
        return _convert_locked(ds, src, out, env, progress)


def _convert_locked(ds: DinoWMDataset, src: Path, out: Path, env: str, progress: bool) -> TrajectoryStore:
    store = _open_or_create_store(ds, src, out, env)
    clean_dead_partials(out)  # we hold the lock: every temp file in it is a dead writer's
    lengths = store.lengths
    # A committed slot whose length disagrees with the source means the source changed under us.
    wrong = [int(i) for i in store.committed if lengths[i] != ds.lengths[i]]
    if wrong:
        i = wrong[0]
        raise DatasetError(
            f"{out}: episode {i} was converted with length {lengths[i]} but {src} now says "
            f"{ds.lengths[i]}; the source changed. Convert into a new out path."
        )
    todo = [i for i in range(ds.n_episodes) if lengths[i] == 0]
    from tqdm.auto import tqdm

    bar = tqdm(
        total=ds.n_episodes, initial=ds.n_episodes - len(todo), unit="ep",
        desc=f"convert {src.name}", disable=not progress,
    )  # fmt: skip
    pending: dict[int, int] = {}
    try:
        for index in todo:
            episode = ds.episode(index)
            if episode["frames"].shape[1:] != store.frame_shape:
                raise DatasetError(
                    f"{src / OBSES_DIR / episode_filename(index)} has frames "
                    f"{list(episode['frames'].shape[1:])} but episode 0 has {list(store.frame_shape)}; "
                    "all episodes must share one size"
                )
            store.write_episode(index, episode["frames"], episode["actions"], episode["states"])
            pending[index] = len(episode["frames"])
            bar.update(1)
            if len(pending) >= COMMIT_BATCH:
                store.commit(pending)
                fault_point("convert:committed")
                pending = {}
    finally:
        # Episodes fully written before an error or Ctrl-C are kept, so a re-run does less work.
        if pending:
            store.commit(pending)
        bar.close()
    return TrajectoryStore(out)


def _open_or_create_store(ds: DinoWMDataset, src: Path, out: Path, env: str) -> TrajectoryStore:
    fingerprint = ds.fingerprint()
    if out.exists():
        try:
            store = TrajectoryStore(out, mode="a")
        except DatasetError as err:
            raise DatasetError(
                f"{out} exists and is not a wmlab store converted from {src}: {err}. Choose another out path."
            ) from err
        meta = store.metadata
        found = {
            "source": meta.get("source"),
            "source_fingerprint": meta.get("source_fingerprint"),
            "env": meta.get("env"),
            "n_episodes": store.n_slots,
            "max_len": store.max_len,
        }
        wanted = {
            "source": "dino_wm",
            "source_fingerprint": fingerprint,
            "env": env,
            "n_episodes": ds.n_episodes,
            "max_len": ds.max_len,
        }
        diffs = [
            f"{k}: {out.name} has {found[k]!r}, {src} gives {wanted[k]!r}"
            for k in wanted
            if found[k] != wanted[k]
        ]
        if diffs:
            raise DatasetError(
                f"{out} exists but is not a conversion of {src} ({'; '.join(diffs)}). Choose another out "
                "path, or delete it to convert again."
            )
        return store

    height, width, _ = ds.frame_shape
    spec = StoreSpec(
        n_episodes=ds.n_episodes,
        max_len=ds.max_len,
        frame_shape=ds.frame_shape,
        action_dim=ds.action_dim,
        state_dim=ds.state_dim,
    )
    metadata = {
        "env": env,
        "env_kwargs": {"img_size": height},
        "source": "dino_wm",
        "source_path": str(src),
        "source_fingerprint": fingerprint,
        "source_dtypes": ds.source_dtypes,
        "episode_len": ds.max_len,
        "policy": "unknown (DINO-WM dataset)",
        "seed": None,
        "seeds_note": f"per-episode seeds are unknown in DINO-WM data; recorded as {UNKNOWN_SEED}",
        "render_size": [height, width],
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return TrajectoryStore.create(out, spec, metadata, seeds=np.full(ds.n_episodes, UNKNOWN_SEED, np.int64))


def _versions() -> dict:
    import torch
    import zarr

    import wmlab

    return {
        "wmlab": wmlab.__version__,
        "numpy": np.__version__,
        "torch": torch.__version__,
        "zarr": zarr.__version__,
    }


# ---------------------------------------------------------------- wmlab store -> DINO-WM
def export_dino_wm(
    store_or_path: TrajectoryStore | str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the committed episodes of a store as a DINO-WM ``point_maze`` folder at ``out_dir``.

    Episodes are renumbered 0..n-1 in slot order. Writes states.pth float64 [n, T, S] and
    actions.pth float32 [n, T, A] (zero-padded to the store's max_len), seq_lengths.pth int64 [n]
    and obses/episode_XXX.pth uint8 [L, H, W, 3]. Each file is written atomically, and states.pth
    last, so an interrupted export is refused by ``DinoWMDataset``. A non-empty ``out_dir`` is
    refused unless ``overwrite=True`` (which replaces these files and removes stale episode files,
    leaving anything else in the folder alone). Returns ``out_dir``.
    """

    store = store_or_path if isinstance(store_or_path, TrajectoryStore) else TrajectoryStore(store_or_path)
    out_dir = Path(out_dir)
    with WriterLock(out_dir, "DINO-WM folder"):
        return _export_locked(store, out_dir, overwrite, progress)


def _export_locked(store: TrajectoryStore, out_dir: Path, overwrite: bool, progress: bool) -> Path:
    import torch

    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DatasetError(f"{out_dir} is not empty; pass overwrite=True to replace its DINO-WM files")
    store.refresh()
    ids = store.committed
    if ids.size == 0:
        raise DatasetError(f"{store.path} has no committed episodes to export")
    lengths = store.lengths[ids]
    T = store.max_len
    # Fresh arrays (not views of a larger one): torch.save writes a tensor's whole storage.
    states = np.asarray(store.all_states()[ids], dtype=EXPORT_DTYPES["states"])
    actions = np.asarray(store.all_actions()[ids], dtype=EXPORT_DTYPES["actions"])
    pad = np.arange(T)[None, :] >= lengths[:, None]  # (n, T) True on padding rows
    states[pad] = 0.0
    actions[pad] = 0.0

    obses = out_dir / OBSES_DIR
    obses.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    for k, index in enumerate(tqdm(ids, unit="ep", desc=f"export {out_dir.name}", disable=not progress)):
        frames = np.ascontiguousarray(store.frames(int(index)))
        _atomic_torch_save(torch.from_numpy(frames), obses / episode_filename(k))
    keep = {episode_filename(k) for k in range(len(ids))}
    for stale in obses.glob("episode_*.pth"):
        if stale.name not in keep:
            stale.unlink()
    seq_lengths = torch.from_numpy(lengths.astype(EXPORT_DTYPES["seq_lengths"]))
    _atomic_torch_save(seq_lengths, out_dir / "seq_lengths.pth")
    _atomic_torch_save(torch.from_numpy(actions), out_dir / "actions.pth")
    _atomic_torch_save(torch.from_numpy(states), out_dir / "states.pth")
    return out_dir


def _atomic_torch_save(value, path: Path) -> None:
    """``torch.save`` to a temp file unique to this writer, then rename: readers never see half a file."""
    import torch

    atomic_write_with(path, lambda tmp: torch.save(value, tmp))
