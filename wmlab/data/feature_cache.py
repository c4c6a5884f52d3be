"""Frozen-feature cache: every committed frame of a dataset encoded once, stored as fp16 tokens.

Training a world model on a frozen encoder re-encodes the same frames every epoch; a ViT-S/16 at
224 px costs far more than reading its tokens back. ``encode_dataset`` runs the encoder over the
dataset once and ``FeatureCache`` serves the tokens through the same ``read(episode, times)`` as
``FrameSource``, so ``WindowDataset(store, ..., source=FeatureCache(path))`` trains on features.

Layout (beside the dataset, one folder per encoder configuration; ``E``, ``T`` as in the store)::

    <dataset>.zarr/features/<EncoderInfo.cache_key()>/
      zarr.json    group attrs: encoder (every EncoderInfo field), dataset (path, fingerprint,
                   slots, committed episodes), precision, versions, created, last_run
      tokens   float16 (E, T, N, D)   one shard file per episode, one Blosc chunk + CRC32C per frame
      lengths  int64 (E,)             0 = not encoded yet; else the episode's length (CRC32C-checked)

It follows the store's design (``wmlab.data.store``): one shard file per episode written whole and
atomically (temp file + rename), then made visible by rewriting the ``lengths`` commit index (one
atomic file), so a killed run loses at most the episodes it had in flight and a re-run encodes
only the uncommitted ones. A cache records the dataset's ``fingerprint()`` and its encoder's info;
opening it for a changed dataset or a different encoder raises ``DatasetError`` naming what
differs, so stale features are never used silently. The dataset's fingerprint covers its content
(per-episode digests), so re-collecting an episode with other pixels makes the cache stale too.

Integrity and concurrency (format 2). Every token chunk carries Zarr's ``crc32c`` (verified by the
fast path before decoding) and so does ``lengths``, whose fill value -1 makes a lost commit index an
error rather than an empty cache. One writer per cache: ``encode_dataset`` holds the cache's
``WriterLock`` (a second encoder is refused with who holds it, or waits ``lock_wait`` seconds);
readers take no lock. A cache is made under one precision (``fp32`` on CPU, ``bf16-autocast`` on
CUDA), part of its key: encoding more episodes under another precision is refused, never mixed.
Format-1 caches (no checksums) are still read.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import os
import shlex
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from wmlab.data.errors import DatasetError
from wmlab.data.shards import EpisodeShards
from wmlab.data.store import clean_dead_partials, fault_point, jsonable, open_arrays, remove_dead_temp_dirs
from wmlab.integrity import WriterLock, fsync_dir, unique_tmp

FORMAT_NAME = "wmlab-features"
#: 2: CRC32C on every chunk, ``lengths`` filled with -1, ``encode_args`` recorded. 1: no checksums.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
FEATURES_DIR = "features"
#: EncoderInfo fields a cache and the encoder asking for it must agree on (the tokens depend on them).
CHECKED_FIELDS = ("name", "weights_sha256", "input_size", "token_pool", "num_tokens", "dim", "grid")
#: Blosc settings for fp16 tokens. Bit shuffle gathers the sign/exponent/high-mantissa bits, the
#: only compressible part of real-valued features: on random-ViT tokens zstd saves ~13% with it and
#: ~8% with byte shuffle, and decodes ~2x faster (~1 GB/s); lz4 saves nothing on them.
COMPRESSION = {"cname": "zstd", "clevel": 3, "shuffle": "bitshuffle"}
WRITER_THREADS = 2  # Blosc releases the GIL off the main thread, so shards compress in parallel
MAX_PENDING_WRITES = 4  # finished episodes waiting for the writers; bounds memory when disk is slow


def _zarr():
    import zarr

    return zarr


def cache_path(dataset_path: str | Path, encoder_info) -> Path:
    """Where the cache of ``encoder_info``'s tokens of the dataset at ``dataset_path`` lives."""
    return Path(dataset_path) / FEATURES_DIR / encoder_info.cache_key()


def encode_command(dataset, args: dict | None = None, info=None, out=None) -> str:
    """A valid ``wmlab encode`` command line that rebuilds a cache: ``encoder=<config choice>`` plus
    ``encoder.<key>=<value>`` for every option it was made with (``args`` as recorded in the cache's
    ``encode_args``); without them, the choice and options are derived from ``info``."""
    if args is None:
        args = _args_from_info(info) if info is not None else {"encoder": "<name>", "kwargs": {}}
    words = ["wmlab", "encode", f"data={dataset}", f"encoder={args['encoder']}"]
    if args.get("weights") is not None:
        words.append(f"encoder.weights={args['weights']}")
    if int(args.get("token_pool", 1)) != 1:
        words.append(f"encoder.token_pool={int(args['token_pool'])}")
    for key, value in sorted((args.get("kwargs") or {}).items()):
        words.append(f"encoder.{key}={_override_value(value)}")
    if out is not None:
        words.append(f"out={out}")
    return "`" + " ".join(shlex.quote(w) for w in words) + "`"


def _override_value(value) -> str:
    """A Hydra override value: null/true/false, numbers as they are, lists as [a,b], strings bare."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return str(value)


def _args_from_info(info) -> dict:
    """Best-effort encode arguments of an encoder from its ``EncoderInfo`` (caches of format 1 or no
    cache yet): families mark non-default options in the name (``dinov2_patch+dino_wm_norm``)."""
    choice, _, suffix = info.name.partition("+")
    kwargs: dict = {}
    if suffix.endswith("_norm"):
        kwargs["norm"] = suffix[: -len("_norm")]
    elif suffix:
        kwargs["output"] = suffix
    if "patch_size" in (info.extra or {}) and choice in ("pixels", "random_vit"):
        kwargs["patch_size"] = info.extra["patch_size"]  # an option of these two families only
    if info.input_size:
        kwargs["input_size"] = info.input_size
    return {"encoder": choice, "weights": info.weights, "token_pool": info.token_pool, "kwargs": kwargs}


def _encode_hint(dataset, info, cache=None) -> str:
    args = cache.metadata.get("encode_args") if cache is not None else None
    out = None
    if cache is not None and info is not None and cache.path != cache_path(dataset, info):
        out = cache.path
    return encode_command(dataset, args, info if args is None else None, out)


def _info_from_json(meta: dict):
    from wmlab.encoders.base import EncoderInfo

    fields = {f.name for f in dataclasses.fields(EncoderInfo)}
    values = {k: v for k, v in meta.items() if k in fields}
    if values.get("grid") is not None:
        values["grid"] = tuple(values["grid"])
    return EncoderInfo(**values)


def _comparable(value):
    return list(value) if isinstance(value, tuple) else value


class FeatureCache:
    """Read (and, with ``mode='a'``, write) the token cache of one dataset under one encoder.

    ``read(episode, times)`` -> float16 (len(times), N, D); ``info`` is the encoder's ``EncoderInfo``;
    ``lengths`` (E,) says which episodes are encoded (0 = not yet). Use ``open_feature_cache`` to
    find and check the cache of a dataset and encoder; ``encode_dataset`` makes one.
    """

    key = "visual"  # the batch key WindowDataset serves it under, as FrameSource

    def __init__(self, path: str | Path, mode: str = "r") -> None:
        self.path = Path(path)
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        if not (self.path / "zarr.json").is_file():
            raise DatasetError(
                f"no feature cache at {self.path}; make one with `wmlab encode data=<dataset> encoder=<name>`"
            )
        zarr = _zarr()
        try:
            self.group = zarr.open_group(str(self.path), mode="r" if mode == "r" else "r+")
        except Exception as err:
            raise DatasetError(
                f"cannot open feature cache {self.path}: {err}. Delete it and encode again."
            ) from err
        self.metadata = dict(self.group.attrs)
        if self.metadata.get("format") != FORMAT_NAME:
            raise DatasetError(
                f"{self.path} is not a wmlab feature cache (format {self.metadata.get('format')!r})"
            )
        self.format_version = self.metadata.get("format_version")
        if self.format_version not in READABLE_VERSIONS:
            raise DatasetError(
                f"feature cache {self.path} has format version {self.format_version}, this "
                f"wmlab reads {list(READABLE_VERSIONS)}; delete it and re-run `wmlab encode`"
            )
        arrays = open_arrays(
            self.group, self.path, ("tokens", "lengths"), f"feature cache {self.path}",
            "delete it and re-run `wmlab encode`",
        )  # fmt: skip
        self.mode = mode
        self.tokens, self._lengths_array = arrays["tokens"], arrays["lengths"]
        self.info = _info_from_json(self.metadata["encoder"])
        if tuple(self.tokens.shape[2:]) != (self.info.num_tokens, self.info.dim):
            raise DatasetError(
                f"feature cache {self.path}: tokens have shape {tuple(self.tokens.shape)} but the encoder "
                f"info says ({self.info.num_tokens}, {self.info.dim}) per frame; delete it and encode again"
            )
        self._shards = EpisodeShards(self.path / "tokens", self.tokens, what="token", redo="re-encode")
        self._commit_lock = threading.Lock()
        self.refresh()

    def __reduce__(self):
        # Reopen by path in DataLoader workers: zarr handles and locks do not travel well.
        return (type(self), (str(self.path), self.mode))

    # ------------------------------------------------------------------ reading
    @property
    def checksummed(self) -> bool:
        """True when every token chunk carries a CRC32C (format 2)."""
        return self._shards.checksummed

    def refresh(self) -> None:
        """Re-read the commit index (an encoder may be running). A missing or corrupt one raises
        ``DatasetError`` (never reads as an empty cache)."""
        fix = f"delete {self.path} and re-run `wmlab encode`"
        try:
            lengths = np.asarray(self._lengths_array[:], dtype=np.int64)
        except Exception as err:
            raise DatasetError(
                f"the commit index {self.path / 'lengths'} of feature cache {self.path} is corrupt "
                f"({type(err).__name__}: {str(err)[:120]}); {fix}"
            ) from err
        if (lengths == -1).any():
            raise DatasetError(
                f"the commit index {self.path / 'lengths'} of feature cache {self.path} is missing; {fix}"
            )
        if ((lengths < 0) | (lengths > self.tokens.shape[1])).any():
            raise DatasetError(
                f"the commit index {self.path / 'lengths'} is corrupt (lengths out of range); {fix}"
            )
        self._lengths = lengths

    @property
    def lengths(self) -> np.ndarray:
        """Encoded length per episode slot, int64 (E,); 0 = not encoded."""
        return self._lengths.copy()

    @property
    def committed(self) -> np.ndarray:
        """Indices of encoded episodes."""
        return np.flatnonzero(self._lengths > 0)

    @property
    def num_tokens(self) -> int:
        return self.info.num_tokens

    @property
    def dim(self) -> int:
        return self.info.dim

    def __len__(self) -> int:
        return int((self._lengths > 0).sum())

    def _check_episode(self, episode: int) -> int:
        if not 0 <= episode < len(self._lengths):
            raise IndexError(f"episode {episode} out of range [0, {len(self._lengths)}) in {self.path}")
        length = int(self._lengths[episode])
        if length == 0:
            raise DatasetError(
                f"episode {episode} is not in feature cache {self.path} (encoding was interrupted or ran "
                "on a subset); run `wmlab encode` again to finish it"
            )
        return length

    def read(self, episode: int, times, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens float16 (len(times), N, D) of frames ``times`` of an encoded episode.

        ``out``, if given, is a C-contiguous float16 array of that shape to decode into.
        """
        length = self._check_episode(int(episode))
        times = np.asarray(times, dtype=np.int64).reshape(-1)
        if times.size and (times.min() < 0 or times.max() >= length):
            raise IndexError(f"times {times.tolist()} outside episode {episode} of length {length}")
        return self._shards.read(int(episode), times, out)

    def episode(self, episode: int) -> np.ndarray:
        """All tokens float16 (L, N, D) of an encoded episode."""
        return self.read(episode, np.arange(self._check_episode(int(episode))))

    def check_matches(self, store, encoder_info=None) -> None:
        """Raise ``DatasetError`` unless this cache was made from ``store`` as it is now (same
        fingerprint) and, when given, by an encoder agreeing with ``encoder_info`` on ``CHECKED_FIELDS``.
        """
        from wmlab.data.store import TrajectoryStore

        if not isinstance(store, TrajectoryStore):
            store = TrajectoryStore(store)
        problems = []
        made_from = self.metadata.get("dataset", {})
        fingerprint = store.fingerprint()
        if made_from.get("fingerprint") != fingerprint:
            problems.append(
                f"the dataset changed since it was encoded (fingerprint {made_from.get('fingerprint')} -> "
                f"{fingerprint}; {made_from.get('committed')} complete episodes in "
                f"{made_from.get('n_slots')} slots then, {len(store)} in {store.n_slots} now)"
            )
        if encoder_info is not None:
            for name in CHECKED_FIELDS:
                cached, wanted = getattr(self.info, name), getattr(encoder_info, name)
                if _comparable(cached) != _comparable(wanted):
                    problems.append(f"encoder {name}: the cache has {cached!r}, the encoder has {wanted!r}")
        if problems:
            raise DatasetError(
                f"feature cache {self.path} does not match: {'; '.join(problems)}. It will not be used: "
                f"delete {self.path} and re-run {_encode_hint(store.path, encoder_info or self.info, self)}"
            )

    # ------------------------------------------------------------------ writing
    def write_episode(self, episode: int, tokens: np.ndarray) -> None:
        """Write an episode's tokens float16 (L, N, D) (not visible until ``commit``). Safe in
        parallel for distinct episodes."""
        self._require_writable()
        tokens = np.asarray(tokens)
        if tokens.dtype != np.float16 or tokens.shape[1:] != (self.info.num_tokens, self.info.dim):
            raise ValueError(
                f"tokens must be float16 (L, {self.info.num_tokens}, {self.info.dim}), "
                f"got {tokens.dtype} {tokens.shape}"
            )
        if not 1 <= len(tokens) <= self.tokens.shape[1]:
            raise ValueError(
                f"episode {episode}: {len(tokens)} frames, the cache holds 1..{self.tokens.shape[1]}"
            )
        self._shards.write(int(episode), tokens)

    def commit(self, episode: int, length: int) -> None:
        """Make an episode visible: one atomic rewrite of the commit index (thread-safe)."""
        self._require_writable()
        with self._commit_lock:
            lengths = self._lengths.copy()
            lengths[episode] = int(length)
            fault_point("cache.commit:before")
            self._lengths_array[:] = lengths
            self._lengths = lengths
            fault_point("cache.commit:after")

    def update_metadata(self, **items) -> None:
        self._require_writable()
        self.group.attrs.update(jsonable(items))
        self.metadata = dict(self.group.attrs)

    def _require_writable(self) -> None:
        if self.mode != "a":
            raise PermissionError(f"{self.path} is open read-only; open it with mode='a' to write")


def open_feature_cache(dataset, encoder_info, require_complete: bool = True) -> FeatureCache:
    """The checked cache of ``encoder_info``'s tokens of ``dataset`` (a path or ``TrajectoryStore``).

    Raises ``DatasetError`` if there is none, if it is stale or made by another encoder, or (with
    ``require_complete``) if some complete episode of the dataset is not encoded yet.
    """
    from wmlab.data.store import TrajectoryStore

    store = dataset if isinstance(dataset, TrajectoryStore) else TrajectoryStore(dataset)
    path = cache_path(store.path, encoder_info)
    if not (path / "zarr.json").is_file():
        others = list_feature_caches(store.path)
        listing = f" (it has caches: {', '.join(p.name for p in others)})" if others else ""
        raise DatasetError(
            f"no feature cache of {encoder_info.cache_key()} for {store.path}{listing}; make it with "
            f"{_encode_hint(store.path, encoder_info)}"
        )
    cache = FeatureCache(path)
    cache.check_matches(store, encoder_info)
    if require_complete:
        missing = np.flatnonzero((store.lengths > 0) & (cache.lengths == 0))
        if missing.size:
            holder = WriterLock(path, "feature cache").holder()
            why = (
                f"it is being written right now by pid {holder.get('pid')} on {holder.get('host')}; wait "
                "for that encoder to finish"
                if holder
                else f"the encoding was interrupted; run {_encode_hint(store.path, encoder_info, cache)} "
                "again to finish it"
            )
            raise DatasetError(
                f"feature cache {path} lacks {missing.size} of {len(store)} episodes "
                f"(e.g. {missing[:5].tolist()}): {why}"
            )
    return cache


def list_feature_caches(dataset_path: str | Path) -> list[Path]:
    """Folders of the feature caches beside the dataset at ``dataset_path`` (unchecked)."""
    root = Path(dataset_path) / FEATURES_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "zarr.json").is_file() and not p.name.startswith("."))


# ---------------------------------------------------------------------------------------- encoding
def encode_dataset(
    data,
    encoder_name: str,
    *,
    encoder_kwargs: dict | None = None,
    weights=None,
    token_pool: int = 1,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
    out: str | Path | None = None,
    episodes=None,
    lock_wait: float = 0.0,
) -> FeatureCache:
    """Encode every complete episode of ``data`` (a path or ``TrajectoryStore``) once with encoder
    ``encoder_name`` (built by ``make_encoder(encoder_name, weights=, token_pool=, **encoder_kwargs)``).

    Tokens are stored float16 (E, T, N, D) in ``out`` (default ``<dataset>/features/<cache key>``).
    Frames stream through in batches of ``batch_size`` (across episode boundaries), under bf16
    autocast on CUDA and fp32 elsewhere. Re-running resumes: encoded episodes are skipped. A cache
    made from another dataset state or encoder raises ``DatasetError``. ``episodes`` limits the run
    to those slots (default: all complete ones). Holds the cache's writer lock while it writes:
    another encoder of the same cache makes this raise ``LockHeld`` (or wait ``lock_wait`` seconds).
    Encoding into a cache made under another precision (fp32 vs bf16) is refused. Returns the cache,
    read-only.
    """
    from wmlab.data.store import TrajectoryStore
    from wmlab.encoders import make_encoder

    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise DatasetError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    store = data if isinstance(data, TrajectoryStore) else TrajectoryStore(data)
    device = _resolve_device(device)
    encoder_kwargs = dict(encoder_kwargs or {})
    encoder = make_encoder(encoder_name, weights=weights, token_pool=token_pool, **encoder_kwargs)
    info = encoder.info
    if not info.frozen:
        raise ValueError(f"encoder {info.name} is trainable; caching its features would freeze it")
    encoder = encoder.to(device).eval()
    path = Path(out) if out is not None else cache_path(store.path, info)
    args = {"encoder": encoder_name, "weights": weights, "token_pool": token_pool, "kwargs": encoder_kwargs}
    with WriterLock(path, "feature cache", wait=lock_wait):
        return _encode_locked(store, encoder, info, path, args, device, batch_size, progress, episodes)


def _encode_locked(store, encoder, info, path, args, device, batch_size, progress, episodes) -> FeatureCache:
    """``encode_dataset``'s work, under the cache's writer lock."""
    import torch

    use_amp = device.type == "cuda"
    precision = "bf16-autocast" if use_amp else "fp32"
    cache = _open_or_create(path, store, info, precision=precision, args=args)
    clean_dead_partials(path)  # we hold the lock and write nothing yet: every temp file is dead
    if cache.metadata.get("precision") != precision:
        if len(cache):
            raise DatasetError(
                f"feature cache {path} was made under {cache.metadata.get('precision')} and this run would "
                f"encode under {precision} on {device}; one cache never mixes precisions. Encode on the "
                f"device it was made on, or delete {path} and encode again"
            )
        cache.update_metadata(precision=precision)

    lengths = store.lengths
    if episodes is None:
        wanted = store.committed
    else:
        wanted = np.unique(np.asarray(episodes, dtype=np.int64).reshape(-1))
        if wanted.size and (wanted.min() < 0 or wanted.max() >= store.n_slots):
            raise IndexError(f"episodes {wanted.tolist()} outside [0, {store.n_slots}) of {store.path}")
        if (lengths[wanted] == 0).any():
            raise DatasetError(
                f"episodes {wanted[lengths[wanted] == 0].tolist()} of {store.path} are not complete"
            )
    encoded = cache.lengths
    todo = [int(e) for e in wanted if encoded[e] == 0]
    total_frames = int(lengths[todo].sum()) if todo else 0

    from tqdm.auto import tqdm

    bar = tqdm(total=total_frames, unit="frame", desc=f"encode {info.cache_key()}", disable=not progress)
    reader = cf.ThreadPoolExecutor(1, thread_name_prefix="wmlab-encode-read")
    writer = cf.ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="wmlab-encode-write")
    free_slots = threading.BoundedSemaphore(MAX_PENDING_WRITES)
    writes: list[cf.Future] = []
    buffers: dict[int, np.ndarray] = {}  # episode -> float16 (L, N, D) being filled
    pin = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
    started, frames_done = time.perf_counter(), 0

    def write(episode: int, tokens: np.ndarray) -> None:
        try:
            cache.write_episode(episode, tokens)
            cache.commit(episode, len(tokens))
        finally:
            free_slots.release()

    try:
        plan = _plan_batches(todo, lengths, batch_size)
        batch = next(plan, None)
        loading = reader.submit(_load_frames, store, batch, pin) if batch is not None else None
        while batch is not None:
            frames = loading.result()  # uint8 (B, H, W, 3)
            following = next(plan, None)  # decode the next batch while this one encodes
            loading = reader.submit(_load_frames, store, following, pin) if following is not None else None
            with torch.inference_mode(), amp:
                tokens = encoder.encode(frames.to(device, non_blocking=pin))  # (B, N, D)
            tokens = tokens.to(torch.float16)  # halve the transfer too
            if not torch.isfinite(tokens).all():
                raise DatasetError(
                    f"encoder {info.name} produced tokens beyond float16's range (|x| > 65504) on episodes "
                    f"{sorted({s[0] for s in batch})}; a float16 cache cannot hold them"
                )
            tokens = tokens.cpu().numpy()  # (B, N, D) float16
            offset = 0
            for episode, t0, t1 in batch:
                length = int(lengths[episode])
                buffer = buffers.get(episode)
                if buffer is None:
                    buffer = buffers[episode] = np.empty((length, info.num_tokens, info.dim), np.float16)
                buffer[t0:t1] = tokens[offset : offset + t1 - t0]
                offset += t1 - t0
                if t1 == length:
                    free_slots.acquire()
                    writes.append(writer.submit(write, episode, buffers.pop(episode)))
            pending = []
            for future in writes:  # one look per future, so none finishes unseen between two looks
                if not future.done():
                    pending.append(future)
                elif future.exception() is not None:
                    raise future.exception()
            writes = pending
            frames_done += len(tokens)
            bar.update(len(tokens))
            batch = following
    except KeyboardInterrupt:
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)
        cache.refresh()
        raise KeyboardInterrupt(
            f"encoding interrupted: {len(cache)} of {len(wanted)} episodes are in {path}; run the same "
            "command again to resume"
        ) from None
    finally:
        # Episodes already finished still land: a failure loses only the ones in flight.
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)
        bar.close()
    for future in writes:
        future.result()  # surface a failed write
    elapsed = time.perf_counter() - started
    if todo:
        cache.update_metadata(
            last_run={
                "episodes": len(todo),
                "frames": frames_done,
                "seconds": round(elapsed, 3),
                "frames_per_second": round(frames_done / elapsed, 1) if elapsed > 0 else None,
                "device": str(device),
                "batch_size": batch_size,
            }
        )
    return FeatureCache(path)


def _resolve_device(device):
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _plan_batches(episodes: list[int], lengths: np.ndarray, batch_size: int):
    """Yield batches as lists of (episode, t0, t1) segments, ``batch_size`` frames each (the last
    fewer), in episode order so each episode completes, and is written, as early as possible."""
    batch, n = [], 0
    for episode in episodes:
        t0, length = 0, int(lengths[episode])
        while t0 < length:
            take = min(length - t0, batch_size - n)
            batch.append((episode, t0, t0 + take))
            n, t0 = n + take, t0 + take
            if n == batch_size:
                yield batch
                batch, n = [], 0
    if batch:
        yield batch


def _load_frames(store, batch, pin: bool):
    """The batch's frames as a uint8 tensor (B, H, W, 3) (pinned for an async copy to CUDA)."""
    import torch

    n = sum(t1 - t0 for _, t0, t1 in batch)
    frames = np.empty((n, *store.frame_shape), dtype=np.uint8)  # (B, H, W, 3)
    offset = 0
    for episode, t0, t1 in batch:
        store.frames(episode, np.arange(t0, t1), out=frames[offset : offset + t1 - t0])
        offset += t1 - t0
    frames = torch.from_numpy(frames)
    return frames.pin_memory() if pin else frames


def _open_or_create(path: Path, store, info, precision: str, args: dict | None = None) -> FeatureCache:
    """Open the cache at ``path`` for writing after checking it fits, or create an empty one.

    Called under the cache's writer lock. A new cache is built whole in a temp directory unique to
    this writer (arrays, an all-zero commit index, metadata) and renamed into place.
    """
    if path.exists():
        if not (path / "zarr.json").is_file():
            raise DatasetError(f"{path} exists but is not a feature cache; delete it or pass another out=")
        cache = FeatureCache(path, mode="a")
        cache.check_matches(store, info)
        return cache
    zarr = _zarr()
    from zarr.codecs import BloscCodec, Crc32cCodec

    import wmlab

    if path.parent.name == FEATURES_DIR and not (path.parent / "zarr.json").is_file():
        # A group of its own, so the dataset stays a clean Zarr hierarchy (Zarr warns on bare folders).
        zarr.open_group(str(path.parent), mode="a").attrs.update({"about": "wmlab frozen-feature caches"})
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temp_dirs(path)
    tmp = unique_tmp(path)
    import torch

    try:
        group = zarr.open_group(str(tmp), mode="w-")
        E, T, N, D = store.n_slots, store.max_len, info.num_tokens, info.dim
        flat_keys = {"name": "default", "separator": "."}  # one folder of files, as in the store
        group.create_array(
            "tokens", shape=(E, T, N, D), chunks=(1, 1, N, D), shards=(1, T, N, D), dtype="float16",
            compressors=[BloscCodec(**COMPRESSION), Crc32cCodec()], fill_value=0.0,
            chunk_key_encoding=flat_keys,
        )  # fmt: skip
        group.create_array(
            "lengths", shape=(E,), chunks=(max(E, 1),), dtype="int64", fill_value=-1,
            compressors=[Crc32cCodec()], chunk_key_encoding=flat_keys,
        )  # fmt: skip
        group["lengths"][:] = np.zeros(E, np.int64)
        fault_point("cache.create:arrays")
        group.attrs.update(
            jsonable(
                {
                    "format": FORMAT_NAME,
                    "format_version": FORMAT_VERSION,
                    "encoder": dataclasses.asdict(info),
                    "cache_key": info.cache_key(),
                    "encode_args": args,
                    "dataset": {
                        "path": str(store.path.resolve()),
                        "fingerprint": store.fingerprint(),
                        "n_slots": store.n_slots,
                        "max_len": store.max_len,
                        "committed": len(store),
                        "frame_shape": list(store.frame_shape),
                    },
                    "dtype": "float16",
                    "precision": precision,
                    "versions": {
                        "wmlab": wmlab.__version__,
                        "torch": torch.__version__,
                        "zarr": zarr.__version__,
                    },
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
            )
        )
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    cache = FeatureCache(path, mode="a")
    cache.check_matches(store, info)
    return cache
