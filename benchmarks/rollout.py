"""Planning rollouts of DINO-WM's predictor on CPU: throughput, FLOP efficiency, peak memory.

    python benchmarks/rollout.py [--samples 300] [--horizon 5] [--tokens 64] [--chunk 10]

One start state (B=1, n=1 observed frame), ``samples`` candidate action sequences of ``horizon``
actions (actions (1, S, horizon, 10)), as a CEM iteration of DINO-WM's PointMaze planner; the
predictor runs 5 times on 1, 2, 3, 3, 3 frames of history. Prints one JSON object:

- ``matmul_peak``: this machine's best fp32 and bf16 matmul GFLOP/s (``matmul_peak.py``), measured
  in the same run.
- ``throughput``: candidate sequences x steps per second under ``torch.inference_mode()``, fp32 and
  bf16 autocast, with ``tokens`` visual tokens per frame (64 = 8 x 8 patches). The S sequences run
  in chunks of ``--chunk`` (``--chunk 0``: all at once); at least one chunk is timed, then more
  until ``--budget`` seconds pass. ``seconds_per_rollout`` projects to all ``samples``.
  ``gflops`` counts the rollout's matmuls analytically (``rollout_flops``); ``peak_fraction``
  divides by the same dtype's matmul peak.
- ``memory``: peak activation memory at DINO-WM's size (196 tokens of 404) for ``samples``:
  analytic (fused attention, and with the L x L score matrices materialised), and measured as peak
  RSS (``VmHWM``) in a fresh subprocess per dtype: the peak of a 1-sequence rollout, then of one with
  ``--mem-samples`` sequences (a full S=300 rollout at 196 tokens takes minutes on 2 cores). Their
  difference per extra sequence (activations are proportional to S) scales the measurement to
  ``samples``; ``analytic_mib_per_sample`` is the estimate to compare it with. The subprocess fixes
  glibc's mmap threshold at 128 KiB so that RSS follows live tensors (see ``memory_in_subprocess``).

Runs in about 2 minutes on 2 CPU cores (no native bf16 there: bf16 is the slow part).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext

import torch

from wmlab.models.world_model import LatentWorldModel, WorldModelConfig

#: DINO-WM's predictor (wmlab/conf/predictor/dino_wm.yaml).
DINO_WM = dict(depth=6, heads=16, dim_head=64, mlp_dim=2048, dropout=0.1, emb_dropout=0.0)
GIB = 2**30


def make_model(tokens: int, visual_dim: int = 384) -> LatentWorldModel:
    cfg = WorldModelConfig(visual_dim=visual_dim, num_visual_tokens=tokens, predictor=dict(DINO_WM))
    return LatentWorldModel(cfg).eval()


def amp(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def call_frames(cfg: WorldModelConfig, n: int, t: int) -> list[int]:
    """History length of each predictor call of ``rollout``: [1, 2, 3, 3, 3] for n=1, t=4."""
    return [min(n + k, cfg.num_hist) for k in range(t + 1)]


def predictor_flops(cfg: WorldModelConfig, frames: int, sequences: int) -> dict:
    """Matmul FLOPs of one predictor forward on ``frames`` frames of ``sequences`` sequences: per
    block, 2 * tokens * in * out for qkv, proj, fc1, fc2 and 2 * 2 * heads * L^2 * dim_head for QK^T
    and AV (the full L x L, as computed). Embeddings, norms and GELU are left out (under 0.1%)."""
    p = cfg.predictor_config()
    inner = p.heads * p.dim_head
    weights = p.dim * 3 * inner + inner * p.dim + 2 * p.dim * p.mlp_dim  # multiply-adds per token
    L = frames * cfg.num_tokens
    linear = 2 * L * weights * p.depth * sequences
    attention = 4 * p.heads * L * L * p.dim_head * p.depth * sequences
    return {"linear": linear, "attention": attention, "total": linear + attention}


def rollout_flops(cfg: WorldModelConfig, samples: int, n: int, t: int) -> dict:
    """Matmul FLOPs of one rollout: the predictor calls on 1, 2, 3, 3, 3 frames (n=1, t=4)."""
    calls = [predictor_flops(cfg, frames, samples) for frames in call_frames(cfg, n, t)]
    return {k: sum(c[k] for c in calls) for k in calls[0]}


def activation_bytes(cfg: WorldModelConfig, samples: int, n: int, t: int, dtype: str) -> dict:
    """Analytic peak of one rollout, in the last (largest) predictor call of a block.

    Live per token row at the attention's peak: the residual stream x (fp32 under autocast too),
    qkv (kept by q, k, v until the block returns), the attention output and its head-merged copy,
    the projection output; in the MLP: x, fc1 output, GELU output. Materialised attention adds the
    scores and the softmax, S * heads * L^2 each (fp32: CPU softmax accumulates in fp32). Plus the
    rollout's own tensors: the frames predicted so far and the history, fp32.
    """
    p = cfg.predictor_config()
    act = 2 if dtype == "bf16" else 4
    inner = p.heads * p.dim_head
    L = max(call_frames(cfg, n, t)) * cfg.num_tokens
    rows = samples * L
    attn_row = 4 * p.dim + act * (3 * inner + 2 * inner + p.dim)
    mlp_row = 4 * p.dim + act * 2 * p.mlp_dim
    layer = rows * max(attn_row, mlp_row)
    scores = 2 * samples * p.heads * L * L * 4
    rollout = 4 * samples * (n + t + 1 + cfg.num_hist) * cfg.num_tokens * p.dim
    params = 4 * sum(x.numel() for x in LatentWorldModel(cfg).parameters())
    growth = layer + rollout  # what a rollout adds to the process (weights are there before)
    return {
        "peak_fused_attention_gib": round((params + growth) / GIB, 3),
        "peak_materialised_attention_gib": round((params + growth + scores) / GIB, 3),
        "growth_fused_attention_gib": round(growth / GIB, 3),
        "per_layer_activations_gib": round(layer / GIB, 3),
        "score_matrices_gib": round(scores / GIB, 3),
        "rollout_tensors_gib": round(rollout / GIB, 3),
        "weights_gib": round(params / GIB, 3),
    }


def run_rollout(model, samples: int, horizon: int, n: int = 1, chunk: int = 0) -> None:
    cfg = model.cfg
    visual = torch.randn(1, n, cfg.num_visual_tokens, cfg.visual_dim)
    proprio = torch.randn(1, n, cfg.proprio_dim)
    step = chunk or samples
    for start in range(0, samples, step):
        actions = torch.randn(1, min(step, samples - start), horizon, cfg.action_dim)
        model.rollout(visual, proprio, actions)  # (1, S, horizon + 1, N, D) frames


def throughput(model, dtype: str, samples: int, horizon: int, chunk: int, budget: float) -> dict:
    chunk = min(chunk or samples, samples)
    with torch.inference_mode(), amp(dtype):
        run_rollout(model, 1, horizon)  # warm-up: the first call at a shape is slower
        done, started = 0, time.perf_counter()
        while done == 0 or (time.perf_counter() - started < budget and done < samples):
            run_rollout(model, chunk, horizon)
            done += chunk
        seconds = time.perf_counter() - started
    flops = rollout_flops(model.cfg, done, 1, horizon - 1)["total"]
    return {
        "timed_samples": done,
        "sequences_x_steps_per_second": round(done * horizon / seconds, 2),
        "seconds_per_rollout": round(seconds * samples / done, 2),
        "gflops": round(flops / seconds / 1e9, 2),
    }


def peak_rss() -> int:
    """This process's peak resident bytes (VmHWM). Not ``ru_maxrss``: Linux keeps that across
    ``exec``, so a subprocess would report its parent's size at the fork if that was larger."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def measure_memory(dtype: str, samples: int, horizon: int, tokens: int) -> dict:
    """In this (fresh) process: resident bytes before, and peak bytes of a 1-sequence rollout and of
    an S-sequence one; their difference over S - 1 is the memory per sequence, free of constants."""
    model = make_model(tokens)
    with torch.inference_mode(), amp(dtype):
        with open("/proc/self/statm") as f:
            before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        run_rollout(model, 1, horizon)  # also loads kernels and libraries
        peak_one = peak_rss()
        started = time.perf_counter()
        run_rollout(model, samples, horizon)
        seconds = time.perf_counter() - started
    return {"rss_before": before, "peak_rss_one": peak_one, "peak_rss": peak_rss(), "seconds": seconds}


def memory_in_subprocess(dtype: str, samples: int, horizon: int, tokens: int) -> dict:
    argv = [sys.executable, __file__, "--_memory", dtype, str(samples), str(horizon), str(tokens)]
    # A fixed mmap threshold: every tensor over 128 KiB is mmapped and unmapped when freed, as the
    # large ones are at S=300. glibc's default raises the threshold to 32 MiB after the first free,
    # so at small S freed tensors stay in the heap and RSS overstates live memory about 2x.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=300, help="candidate action sequences (CEM samples)")
    parser.add_argument("--horizon", type=int, default=5, help="actions per sequence (1 observed + planned)")
    parser.add_argument("--tokens", type=int, default=64, help="visual tokens per frame for throughput")
    parser.add_argument("--visual-dim", type=int, default=384)
    parser.add_argument("--chunk", type=int, default=10, help="sequences per rollout call (0: all)")
    parser.add_argument("--budget", type=float, default=15.0, help="seconds of timed chunks per dtype")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--mem-tokens", type=int, default=196, help="tokens per frame for the memory part")
    parser.add_argument("--mem-samples", default="fp32=8,bf16=3", help="S measured per dtype (>= 2; 0: skip)")
    parser.add_argument("--peak-size", type=int, default=2048, help="square matmul size for the peak")
    parser.add_argument("--_memory", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory:
        dtype, samples, horizon, tokens = args._memory
        print(json.dumps(measure_memory(dtype, int(samples), int(horizon), int(tokens))))
        return

    from matmul_peak import matmul_peak

    started = time.perf_counter()
    dtypes = args.dtypes.split(",")
    n, t = 1, args.horizon - 1
    model = make_model(args.tokens, args.visual_dim)
    flops = rollout_flops(model.cfg, args.samples, n, t)
    result = {
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_before": round(os.getloadavg()[0], 2),
        "setup": {
            "samples": args.samples,
            "horizon": args.horizon,
            "actions": [1, args.samples, args.horizon, 10],
            "tokens": args.tokens,
            "token_dim": model.cfg.token_dim,
            "calls_on_frames": call_frames(model.cfg, n, t),
            "chunk": args.chunk,
        },
        "rollout_gflop": {k: round(v / 1e9, 1) for k, v in flops.items()},
        "matmul_peak": matmul_peak(args.peak_size),
        "throughput": {},
    }
    for dtype in dtypes:
        rate = throughput(model, dtype, args.samples, args.horizon, args.chunk, args.budget)
        rate["peak_fraction"] = round(rate["gflops"] / result["matmul_peak"][dtype]["peak_gflops"], 3)
        result["throughput"][dtype] = rate
    if {"fp32", "bf16"} <= set(dtypes):
        fp32, bf16 = result["throughput"]["fp32"], result["throughput"]["bf16"]
        result["throughput"]["bf16_over_fp32"] = round(
            bf16["sequences_x_steps_per_second"] / fp32["sequences_x_steps_per_second"], 3
        )

    mem_cfg = make_model(args.mem_tokens, args.visual_dim).cfg
    mem_samples = dict(item.split("=") for item in args.mem_samples.split(","))
    result["memory"] = {"tokens": args.mem_tokens, "token_dim": mem_cfg.token_dim, "samples": args.samples}
    for dtype in dtypes:
        entry = {"analytic": activation_bytes(mem_cfg, args.samples, n, t, dtype)}
        analytic_growth = entry["analytic"]["growth_fused_attention_gib"] * GIB
        measured_s = int(mem_samples.get(dtype, 0))
        if measured_s > 1:
            m = memory_in_subprocess(dtype, measured_s, args.horizon, args.mem_tokens)
            per_sample = (m["peak_rss"] - m["peak_rss_one"]) / (measured_s - 1)
            growth = m["peak_rss_one"] - m["rss_before"] + per_sample * (args.samples - 1)
            entry["measured"] = {
                "samples": measured_s,
                "rollout_seconds": round(m["seconds"], 1),
                "rss_before_gib": round(m["rss_before"] / GIB, 3),
                "peak_growth_gib": round((m["peak_rss"] - m["rss_before"]) / GIB, 3),
                "peak_growth_one_sample_gib": round((m["peak_rss_one"] - m["rss_before"]) / GIB, 3),
                "mib_per_sample": round(per_sample / 2**20, 2),
                "analytic_mib_per_sample": round(analytic_growth / args.samples / 2**20, 2),
                "growth_scaled_to_samples_gib": round(growth / GIB, 2),
                "process_peak_scaled_gib": round((m["rss_before"] + growth) / GIB, 2),
            }
        result["memory"][dtype] = entry
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
