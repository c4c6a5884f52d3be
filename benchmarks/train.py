"""Training-step throughput on CPU: cached features vs encoding frames on the fly; DINO-WM's size.

    python benchmarks/train.py [--data DIR] [--batch 32] [--budget SECONDS]

A step is what ``wmlab.train.train`` does per batch: read the windows, turn ``visual`` into tokens
(``VisualTokens``: the cache's fp16 tokens, or frames through the frozen encoder), then forward,
backward and an AdamW step. Prints one JSON object:

- ``small_64px``: the ``predictor/small.yaml`` preset over a ViT-S-sized ``random_vit`` (depth 12,
  384-d, 6 heads) at input 64 / patch 8 = 64 tokens, on a 64 px PointMaze dataset (``--episodes``
  x 100 steps collected into a temporary folder under the current directory unless ``--data``).
  The cache is built with ``encode_dataset`` for the first ``--cache-episodes`` episodes (ViT-S
  encodes ~20 frames/s here); both paths train the same model on random windows of those episodes,
  same batch size. ``seconds_per_step`` splits a step into reading, tokens and model.
- ``dino_wm_112px``: DINO-WM's predictor (depth 6, 16 heads x 64, mlp 2048, dropout 0.1) on 49
  cached 384-d tokens a frame (112 px / patch 16), batch 8: random tokens (8, 4, 49, 384) straight
  into ``model.loss``, fp32 and under CPU bf16 autocast. ``vs_dino_wm`` divides windows/s by DINO-WM's
  1.1 windows/s (the target is >= 5); ``gflops`` counts matmuls as 3x the forward's
  (``rollout.predictor_flops``) against the fp32/bf16 matmul peak measured in the same run, and
  ``windows_per_second_at_peak`` is the ceiling if every matmul ran at that peak.

Runs in about 3 minutes on 2 CPU cores (bf16 steps take ~1 minute each here).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import yaml

import wmlab
from wmlab.data.collect import collect
from wmlab.data.feature_cache import encode_dataset
from wmlab.data.store import TrajectoryStore
from wmlab.data.windows import WindowDataset, WindowSpec, make_datasets
from wmlab.models.world_model import LatentWorldModel, WorldModelConfig
from wmlab.runs import build_encoder
from wmlab.train import VisualTokens, make_optimizer, model_config

#: ViT-S/8 at 64 px: 64 patch tokens of 384.
ENCODER = dict(name="random_vit", input_size=64, patch_size=8, dim=384, depth=12, heads=6)
DINO_WM = dict(depth=6, heads=16, dim_head=64, mlp_dim=2048, dropout=0.1, emb_dropout=0.0)
DINO_WM_WINDOWS_PER_SECOND = 1.1
OPTIM = {"predictor_lr": 5e-4, "action_encoder_lr": 5e-4}


def train_step(model, optimizer, batch: dict, dtype: str = "fp32") -> None:
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    with amp:
        loss, _ = model.loss(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def timed_steps(step, budget: float, warm_up=None) -> tuple[int, float]:
    """One warm-up call (of ``warm_up``, default ``step``), then at least one timed call of ``step``,
    more until ``budget`` seconds pass."""
    (warm_up or step)()
    calls, started = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - started < budget:
        step()
        calls += 1
    return calls, time.perf_counter() - started


def small_preset(store: TrajectoryStore, cache_root: Path, args) -> dict:
    device = torch.device("cpu")
    spec = WindowSpec(num_hist=3, num_pred=1, frameskip=5)
    _, _, stats = make_datasets(store, spec)
    episodes = store.committed[: args.cache_episodes]
    started = time.perf_counter()
    kwargs = {k: v for k, v in ENCODER.items() if k != "name"}
    cache = encode_dataset(
        store, "random_vit", encoder_kwargs=kwargs, progress=False, out=cache_root, episodes=episodes
    )
    encode_seconds = time.perf_counter() - started
    encoder = build_encoder(ENCODER, device)
    predictor = yaml.safe_load((Path(wmlab.__file__).parent / "conf/predictor/small.yaml").read_text())
    cfg = dict(frameskip=5, num_hist=3, num_pred=1, concat_dim=1, action_emb_dim=10, proprio_emb_dim=10)
    model = LatentWorldModel(model_config({**cfg, "predictor": predictor}, encoder, store)).train()
    optimizer = make_optimizer(model, OPTIM)
    rng = np.random.default_rng(0)
    out = {
        "encoder": f"random_vit ViT-S {ENCODER['input_size']}px/p{ENCODER['patch_size']}",
        "tokens": encoder.info.num_tokens,
        "predictor": predictor,
        "batch": args.batch,
        "cache": {
            "frames": int(cache.lengths.sum()),
            "encode_frames_per_second": round(int(cache.lengths.sum()) / encode_seconds, 1),
        },
    }
    for label, source, cached in (("cached", cache, True), ("on_the_fly", None, False)):
        dataset = WindowDataset(store, episodes, spec, stats, source=source)
        tokens = VisualTokens(encoder, cached=cached, device=device)
        parts = {"read": 0.0, "tokens": 0.0, "model": 0.0}

        def step(dataset=dataset, tokens=tokens, parts=parts) -> None:
            t0 = time.perf_counter()
            batch = dataset.get_batch(rng.integers(0, len(dataset), args.batch))
            batch = {k: torch.as_tensor(v) for k, v in batch.items()}
            t1 = time.perf_counter()
            batch["visual"] = tokens(batch["visual"])  # (B, 4, 64, 384)
            t2 = time.perf_counter()
            train_step(model, optimizer, batch)
            for key, seconds in zip(parts, (t1 - t0, t2 - t1, time.perf_counter() - t2)):
                parts[key] += seconds

        calls, seconds = timed_steps(step, args.budget)
        out[label] = {
            "steps": calls,
            "windows_per_second": round(calls * args.batch / seconds, 2),
            "seconds_per_step": {k: round(v / (calls + 1), 3) for k, v in parts.items()},  # + warm-up
        }
    out["cached_over_on_the_fly"] = round(
        out["cached"]["windows_per_second"] / out["on_the_fly"]["windows_per_second"], 1
    )
    return out


def dino_wm_size(args, peak: dict) -> dict:
    from rollout import predictor_flops

    cfg = WorldModelConfig(visual_dim=384, num_visual_tokens=49, predictor=dict(DINO_WM))
    model = LatentWorldModel(cfg).train()
    optimizer = make_optimizer(model, OPTIM)
    B = args.dino_batch
    batch = {
        "visual": torch.randn(B, 4, 49, 384),
        "proprio": torch.randn(B, 4, 4),
        "actions": torch.randn(B, 4, 10),
    }
    flops = 3 * predictor_flops(cfg, cfg.num_hist, B)["total"]  # forward + backward (2x) per step
    out = {"batch": B, "tokens": 49, "token_dim": cfg.token_dim, "gflop_per_step": round(flops / 1e9, 1)}
    one = {k: v[:1] for k, v in batch.items()}  # warm up on one window: bf16 steps take ~1 min here
    for dtype in args.dtypes.split(","):
        calls, seconds = timed_steps(
            lambda dtype=dtype: train_step(model, optimizer, batch, dtype),
            args.budget,
            warm_up=lambda dtype=dtype: train_step(model, optimizer, one, dtype),
        )
        rate = calls * B / seconds
        out[dtype] = {
            "steps": calls,
            "windows_per_second": round(rate, 2),
            "vs_dino_wm": round(rate / DINO_WM_WINDOWS_PER_SECOND, 2),
            "gflops": round(calls * flops / seconds / 1e9, 1),
            "peak_fraction": round(calls * flops / seconds / 1e9 / peak[dtype]["peak_gflops"], 3),
            "windows_per_second_at_peak": round(peak[dtype]["peak_gflops"] * 1e9 / (flops / B), 2),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--data", type=Path, default=None, help="a collected 64 px dataset (default: collect)"
    )
    parser.add_argument("--episodes", type=int, default=20, help="episodes x 100 steps to collect")
    parser.add_argument("--cache-episodes", type=int, default=3, help="episodes encoded and trained on")
    parser.add_argument("--batch", type=int, default=32, help="windows per step, small preset")
    parser.add_argument("--dino-batch", type=int, default=8, help="windows per step, DINO-WM size")
    parser.add_argument("--dtypes", default="fp32,bf16", help="DINO-WM size: fp32 and/or bf16 autocast")
    parser.add_argument("--budget", type=float, default=8.0, help="seconds of timed steps per measurement")
    args = parser.parse_args()
    from matmul_peak import matmul_peak

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="wmlab_bench_train_", dir="."))
    result = {
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_before": round(os.getloadavg()[0], 2),
    }
    try:
        data = args.data
        if data is None:
            data = tmp / "pm64.zarr"
            collect(
                data,
                n_episodes=args.episodes,
                episode_len=100,
                workers=2,
                env_kwargs={"img_size": 64},
                progress=False,
            )
        result["small_64px"] = small_preset(TrajectoryStore(data), tmp / "cache", args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    peak = matmul_peak()
    result["matmul_peak_gflops"] = {k: v["peak_gflops"] for k, v in peak.items()}
    result["dino_wm_112px"] = dino_wm_size(args, peak)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
