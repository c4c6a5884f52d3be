"""Encoders and the frozen-feature cache on CPU: throughput, cache size, windows from the cache.

    python benchmarks/encode.py [--data DIR] [--budget SECONDS]

Without ``--data`` a small 64 px PointMaze dataset (12 episodes x 100 steps) is collected into a
temporary folder first (removed afterwards). Prints one JSON object:

- ``encoder_images_per_second``: ``encode`` on uint8 frames, fp32 and under CPU bf16 autocast, for
  ``pixels`` and ``random_vit`` (tiny and ViT-S/16 size) at 64 px and 224 px model input.
- ``cache_size``: bytes per frame (tokens x dim x 2, and measured on disk after Blosc) and both
  extrapolated to a 200k-frame dataset.
- ``windows_per_second``: batches of 32 training windows (4 frames each) read from the cache vs
  read as frames and encoded on the fly (fp32), and the ratio; page cache warm.
- ``cache_read_ms_per_window``: the cache's pread fast path vs Zarr's API for the same window.

Runs in about 2 minutes on 2 CPU cores; ViT-S/16 at 224 px dominates.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wmlab.data.collect import collect
from wmlab.data.feature_cache import encode_dataset
from wmlab.data.store import TrajectoryStore
from wmlab.data.windows import WindowDataset, WindowSpec, make_datasets
from wmlab.encoders import make_encoder

TINY = dict(depth=1, dim=32, heads=2)
VIT_S = dict(depth=12, dim=384, heads=6)
#: label -> (encoder name, kwargs). Tiny ViTs use patch 8 at 64 px and 16 at 224 px (64 / 196 tokens).
CONFIGS = {
    "pixels@64/p8": ("pixels", dict(input_size=64, patch_size=8)),
    "random_vit_tiny@64/p8": ("random_vit", dict(input_size=64, patch_size=8, **TINY)),
    "random_vit_tiny@224/p16": ("random_vit", dict(input_size=224, patch_size=16, **TINY)),
    "random_vit_s@64/p16": ("random_vit", dict(input_size=64, patch_size=16, **VIT_S)),
    "random_vit_s@224/p16": ("random_vit", dict(input_size=224, patch_size=16, **VIT_S)),
}
#: Episodes to encode per config for the cache measurements (ViT-S at 224 px runs ~13 img/s here).
CACHE_EPISODES = {"random_vit_s@64/p16": 3, "random_vit_s@224/p16": 1}
FRAMES_200K = 200_000


def timed(fn, budget: float, min_calls: int = 1) -> tuple[int, float]:
    """Call ``fn`` until ``budget`` seconds pass (at least ``min_calls`` times) -> (calls, seconds)."""
    calls, started = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - started < budget:
        fn()
        calls += 1
    return calls, time.perf_counter() - started


def encoder_throughput(encoder, frames: torch.Tensor, bf16: bool, budget: float) -> float:
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        encoder.encode(frames)  # warm up: the first call at a shape is several times slower
        calls, seconds = timed(lambda: encoder.encode(frames), budget)
    return calls * len(frames) / seconds


def disk_bytes(folder: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of the token shard files in ``folder``."""
    files = [p for p in folder.iterdir() if p.name.startswith("c.")]
    return sum(p.stat().st_size for p in files), sum(p.stat().st_blocks * 512 for p in files)


def window_rates(
    store, episodes, spec, stats, cache, encoder, rng, budget: float, batch: int = 32, warm: bool = True
) -> dict:
    """Windows/s of batches from the cache vs frames read then encoded on the fly (fp32); ``warm=False``
    skips the warm-up call of the latter (ViT-S at 224 px: one batch of 128 frames takes ~10 s)."""
    from_cache = WindowDataset(store, episodes, spec, stats, source=cache)
    from_frames = WindowDataset(store, episodes, spec, stats)
    ids = [rng.integers(0, len(from_cache), batch) for _ in range(200)]
    for b in ids[:20]:  # warm the page cache
        from_cache.get_batch(b)
    cached_ids, frame_ids = iter(ids * 1000), iter(ids * 1000)
    calls, seconds = timed(lambda: from_cache.get_batch(next(cached_ids)), 1.0, min_calls=5)
    cached_rate = calls * batch / seconds

    def on_the_fly() -> None:
        visual = from_frames.get_batch(next(frame_ids))["visual"]  # (B, F, H, W, 3)
        B, F = visual.shape[:2]
        with torch.inference_mode():
            encoder.encode(torch.from_numpy(visual.reshape(B * F, *visual.shape[2:])))  # (B*F, N, D)

    if warm:
        on_the_fly()
    calls, seconds = timed(on_the_fly, budget)
    fly_rate = calls * batch / seconds
    return {
        "from_cache": round(cached_rate, 1),
        "frames_then_encode_fp32": round(fly_rate, 1),
        "ratio": round(cached_rate / fly_rate, 1),
    }


def read_paths(cache, episode: int) -> dict:
    """ms per 4-frame window through the cache's pread fast path and through Zarr's API."""
    times = np.array([10, 15, 20, 25])
    reads = {
        "fast_path": lambda: cache.read(episode, times),
        "zarr_oindex": lambda: cache.tokens.oindex[episode, times],
        "zarr_whole_episode": lambda: cache.tokens[episode][times],
    }
    out = {}
    for key, fn in reads.items():
        np.testing.assert_array_equal(fn(), reads["fast_path"]())
        calls, seconds = timed(fn, 0.5, min_calls=3)
        out[key] = round(1000 * seconds / calls, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--data", type=Path, default=None, help="a collected 64 px dataset (default: collect one)"
    )
    parser.add_argument("--budget", type=float, default=1.5, help="seconds per throughput measurement")
    args = parser.parse_args()
    started = time.perf_counter()
    tmp = None
    if args.data is None:
        tmp = Path(tempfile.mkdtemp(prefix="wmlab_bench_encode_"))
        args.data = tmp / "pm64.zarr"
        collect(
            args.data, n_episodes=12, episode_len=100, workers=2, env_kwargs={"img_size": 64}, progress=False
        )
    store = TrajectoryStore(args.data)
    cache_root = Path(tempfile.mkdtemp(prefix="wmlab_bench_cache_")) if tmp is None else tmp / "caches"
    rng = np.random.default_rng(0)
    frames = torch.from_numpy(store.frames(int(store.committed[0]), np.arange(32)))  # uint8 (32, H, W, 3)
    spec = WindowSpec(num_hist=3, num_pred=1, frameskip=5)
    _, _, stats = make_datasets(store, spec)
    result = {
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_before": round(os.getloadavg()[0], 2),
        "dataset": {"frames": int(store.lengths.sum()), "frame_px": store.frame_shape[0]},
        "encoder_images_per_second": {},
        "cache_size": {},
        "windows_per_second": {},
    }
    try:
        for label, (name, kwargs) in CONFIGS.items():
            encoder = make_encoder(name, **kwargs)
            info = encoder.info
            slow = info.dim >= 384 and info.input_size >= 224
            batch = frames[:4] if slow else frames  # ViT-S at 224 px: ~1 img/s under CPU bf16
            result["encoder_images_per_second"][label] = {
                "tokens": info.num_tokens,
                "dim": info.dim,
                "fp32": round(encoder_throughput(encoder, batch, False, args.budget), 1),
                "bf16_autocast": round(encoder_throughput(encoder, batch, True, args.budget), 1),
            }

            # ---------------------------------------------------------------- cache size
            n_episodes = CACHE_EPISODES.get(label, len(store))
            episodes = store.committed[:n_episodes]
            out = cache_root / label.replace("/", "_").replace("@", "_")
            t0 = time.perf_counter()
            cache = encode_dataset(
                store, name, encoder_kwargs=kwargs, batch_size=64, progress=False, out=out, episodes=episodes
            )
            encode_seconds = time.perf_counter() - t0
            n_frames = int(cache.lengths.sum())
            apparent, allocated = disk_bytes(out / "tokens")
            raw = info.num_tokens * info.dim * 2
            result["cache_size"][label] = {
                "bytes_per_frame_raw": raw,
                "bytes_per_frame_on_disk": round(apparent / n_frames, 1),
                "compression_ratio": round(raw * n_frames / apparent, 3),
                "gib_200k_frames_raw": round(raw * FRAMES_200K / 2**30, 2),
                "gib_200k_frames_on_disk": round(allocated / n_frames * FRAMES_200K / 2**30, 2),
                "encoded_frames": n_frames,
                "encode_frames_per_second": round(n_frames / encode_seconds, 1),
            }

            # ---------------------------------------------------------------- windows
            rates = window_rates(
                store, episodes, spec, stats, cache, encoder, rng, args.budget, warm=not slow
            )
            result["windows_per_second"][label] = rates
            if label == "random_vit_s@224/p16":
                result["cache_read_ms_per_window"] = read_paths(cache, int(episodes[0]))
            del encoder
    finally:
        shutil.rmtree(cache_root if tmp is None else tmp, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["cpu_count"] = os.cpu_count()
    result["load_average_1min_after"] = round(os.getloadavg()[0], 2)  # > cpu_count: a shared, noisy CPU
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
