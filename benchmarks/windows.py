"""Window sampling throughput from the store (windows/s, batch 32) at 224 px, from a warm cache.

    python benchmarks/windows.py --data DIR [--batches 100]

``--data`` is a collected dataset (e.g. ``benchmarks/collect.py --keep DIR``); without it a small
224 px dataset is collected first. "Warm" = the chunk files are in the OS page cache (one pass
over the batches first), as they are after the first epoch. Prints one JSON object with the
single-process rate and the rate through a torch DataLoader with 2 worker processes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wmlab.data.collect import collect
from wmlab.data.store import TrajectoryStore
from wmlab.data.windows import WindowSpec, make_datasets


def rate(fn, batches: int, batch_size: int) -> float:
    started = time.perf_counter()
    for _ in range(batches):
        fn()
    return batches * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    if args.data is None:
        args.data = Path(tempfile.mkdtemp(prefix="wmlab_bench_", dir=Path.cwd())) / "pm224.zarr"
        collect(
            args.data, n_episodes=20, episode_len=100, workers=2, env_kwargs={"img_size": 224}, progress=False
        )
    store = TrajectoryStore(args.data)
    train, _, _ = make_datasets(store, WindowSpec(num_hist=3, num_pred=1, frameskip=5))
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, len(train), args.batch_size) for _ in range(args.batches)]
    for ids in batches:  # warm the page cache
        train.get_batch(ids)
    it = iter(batches * 1000)
    single = rate(lambda: train.get_batch(next(it)), args.batches, args.batch_size)

    loader = torch.utils.data.DataLoader(
        train, batch_size=args.batch_size, shuffle=True, num_workers=2, collate_fn=lambda b: b,
        persistent_workers=True, prefetch_factor=4,
    )  # fmt: skip
    stream = iter(loader)
    for _ in range(10):  # start the workers
        next(stream)
    n = min(args.batches, len(loader) - 11)
    loader_rate = rate(lambda: next(stream), n, args.batch_size)
    print(json.dumps({
        "img_size": store.frame_shape[0],
        "batch_size": args.batch_size,
        "window_frames": 4,
        "windows_per_second_single_process": round(single, 1),
        "windows_per_second_dataloader_2_workers": round(loader_rate, 1),
        "frames_decoded_per_second_single_process": round(single * 4, 1),
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
