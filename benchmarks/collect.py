"""Collection throughput (frames/s) at 64 and 224 px with 1 and 2 workers, and dataset size on disk.

    python benchmarks/collect.py [--episodes-64 150] [--episodes-224 60] [--keep DIR]

Prints one JSON object. Throughput includes worker start-up, so it is what a user sees; the
size ratio compares the disk space our store really uses (allocated blocks, as ``du``) with
DINO-WM's raw uint8 .pth frames (H*W*3 bytes each).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from wmlab.data.collect import collect

FULL_EPISODES, FULL_LEN = 2000, 100


def dir_bytes(path: Path) -> int:
    """Disk space really used (allocated blocks, folders included), not the files' apparent size."""
    return sum(p.stat().st_blocks * 512 for p in [path, *path.rglob("*")])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--episodes-64", type=int, default=150)
    parser.add_argument("--episodes-224", type=int, default=60)
    parser.add_argument("--episode-len", type=int, default=100)
    parser.add_argument("--keep", type=Path, default=None, help="keep the 224 px / 2-worker dataset here")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="wmlab_bench_", dir=Path.cwd()))
    results = {"runs": []}
    try:
        for size, episodes in ((64, args.episodes_64), (224, args.episodes_224)):
            for workers in (1, 2):
                out = root / f"pm_{size}_{workers}.zarr"
                started = time.perf_counter()
                store = collect(out, n_episodes=episodes, episode_len=args.episode_len, workers=workers,
                                env_kwargs={"img_size": size}, progress=False)  # fmt: skip
                seconds = time.perf_counter() - started
                frames = episodes * args.episode_len
                frame_bytes = dir_bytes(out / "frames")
                run = {
                    "img_size": size,
                    "workers": workers,
                    "episodes": episodes,
                    "frames": frames,
                    "seconds": round(seconds, 2),
                    "frames_per_second": round(frames / seconds, 1),
                    "bytes_per_frame_on_disk": round(dir_bytes(out) / frames, 1),
                    "frame_compression_ratio": round(frames * size * size * 3 / frame_bytes, 1),
                }
                if size == 224 and workers == 2:
                    full_frames = FULL_EPISODES * FULL_LEN
                    raw = full_frames * size * size * 3
                    ours = run["bytes_per_frame_on_disk"] * full_frames
                    results["full_dataset_224"] = {
                        "episodes": FULL_EPISODES,
                        "episode_len": FULL_LEN,
                        "dino_wm_raw_gb": round(raw / 1e9, 2),
                        "wmlab_estimated_gb": round(ours / 1e9, 2),
                        "size_ratio_raw_over_ours": round(raw / ours, 1),
                        "estimated_collect_minutes": round(full_frames / run["frames_per_second"] / 60, 1),
                    }
                    if args.keep:
                        shutil.rmtree(args.keep, ignore_errors=True)
                        shutil.copytree(out, args.keep)
                results["runs"].append(run)
                del store
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
