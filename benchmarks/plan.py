"""One DINO-WM CEM plan on CPU: seconds per plan and per episode, FLOPs, efficiency, batching.

    python benchmarks/plan.py [--image-size 98] [--samples 64] [--opt-steps 3] [--horizon 5]
                              [--episodes 2] [--dtype fp32] [--bf16-check-samples 4]

DINO-WM's planning setup with random weights (no download): a DINOv2-ViT-S/14-shaped encoder
(transformers ``Dinov2Model``: hidden 384, 12 layers, 6 heads, patch 14) on ``image-size`` frames
(98 px -> 7 x 7 = 49 patches), DINO-WM's predictor (depth 6, 16 heads, dim_head 64, MLP 2048, token
width 384 + 10 + 10 = 404, num_hist 3), and CEM with ``samples`` x ``opt-steps`` sequences of
``horizon`` model steps from n = 1 observed frame, last-frame MSE objective (DINO-WM's PointMaze). A
plan = encoding the start and goal frames once + the CEM loop (``select="best"``, so no extra
evaluation: exactly DINO-WM's samples x opt_steps rollouts). DINO-WM's own planner took about 56 s per
plan for this setup once, on an earlier session's machine (~100 GFLOP/s, predictor bound); machines
differ, so ``speedup_vs_dino_wm_56s_*`` is indicative only: the same-run ratio is fast vs reference.

Variants, timed in one run in ``--repeats`` rounds of alternating order, fastest round kept (the
machine is noisy: compare the ratios):
- ``reference``: ``rollout(fast=False)``, DINO-WM's computation (predictor on 1, 2, 3, 3, 3 frames);
- ``fast``: the default eval rollout: a KV cache for the growing window (each of the first 3 calls
  runs only the new frame) and, once the window slides, the last block's queries/MLP on the last
  frame only. Same costs and same plan (checked: max |cost difference| and whether the plans agree);
- ``fast_batched``: ``episodes`` start states planned together (B = episodes in every cost_fn call);
- bf16: autocast bf16 vs fp32 on a small rollout (``--bf16-check-samples``), the full plan in bf16
  only with ``--dtype bf16`` (this CPU has no native bf16 matmul; it is far slower, see matmul_peak);
- ``precision_auto``: what ``precision=auto`` (``wmlab.precision``) picks here, with its evidence.

FLOPs are counted analytically from the model sizes: every matmul is 2 * rows * in * out (qkv,
attention projection, fc1, fc2 per block; the ViT's patch projection too) and attention is
2 * 2 * heads * Lq * Lk * dim_head (QK^T and AV, full Lq x Lk as computed, block-causal mask or not).
LayerNorm, GELU, softmax, embeddings and the objective are left out (< 1%). ``gflop_needed`` is
DINO-WM's computation (the reference path); ``gflop_executed`` is what each variant actually runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from wmlab.models.world_model import LatentWorldModel, WorldModelConfig
from wmlab.planning import make_planner
from wmlab.planning.objectives import Objective, rollout_cost_fn

DINO_WM = dict(depth=6, heads=16, dim_head=64, mlp_dim=2048, dropout=0.1, emb_dropout=0.0)
VIT_S = dict(hidden=384, layers=12, heads=6, patch=14, mlp_ratio=4)
REFERENCE_SECONDS = 56.0  # DINO-WM's planner, this setup, measured once in an earlier session (not this run)


def make_encoder(image_size: int):
    """A random-weight DINOv2-ViT-S/14 in wmlab's encoder wrapper (resize + normalisation + patches)."""
    from transformers import Dinov2Config, Dinov2Model

    from wmlab.encoders.dinov2 import NORMS, HFViTEncoder
    from wmlab.encoders.weights import ResolvedWeights

    config = Dinov2Config(
        hidden_size=VIT_S["hidden"], num_hidden_layers=VIT_S["layers"], num_attention_heads=VIT_S["heads"],
        mlp_ratio=VIT_S["mlp_ratio"], patch_size=VIT_S["patch"], image_size=image_size, layer_norm_eps=1e-6,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Dinov2Model(config)
    mean, std = NORMS["dino_wm"]
    resolved = ResolvedWeights(path=Path("."), source="random", sha256="random")
    return HFViTEncoder(
        model, name="dinov2_patch_random", output="patch", input_size=image_size, patch_size=VIT_S["patch"],
        num_registers=0, mean=mean, std=std, resolved=resolved, extra={},
    ).eval()  # fmt: skip


def encoder_flops(image_size: int, frames: int) -> int:
    """ViT-S/14 on ``frames`` images: patch projection, then per layer qkv + proj + MLP + attention."""
    d, p = VIT_S["hidden"], VIT_S["patch"]
    patches = (image_size // p) ** 2
    L = patches + 1  # + CLS
    per_layer = 2 * L * (4 * d * d + 2 * d * VIT_S["mlp_ratio"] * d) + 4 * L * L * d
    return frames * (2 * patches * 3 * p * p * d + VIT_S["layers"] * per_layer)


def block_flops(cfg: WorldModelConfig, q_rows: int, kv_rows: int, mlp_rows: int) -> int:
    """One predictor block: qkv (q on q_rows, k/v on kv_rows), attention q_rows x kv_rows, proj + MLP
    on mlp_rows (= q_rows)."""
    p = cfg.predictor_config()
    inner = p.heads * p.dim_head
    qkv = 2 * p.dim * inner * (q_rows + 2 * kv_rows)
    attention = 4 * p.heads * q_rows * kv_rows * p.dim_head
    rest = 2 * mlp_rows * (inner * p.dim + 2 * p.dim * p.mlp_dim)
    return qkv + attention + rest


def rollout_flops(cfg: WorldModelConfig, n: int, T: int, fast: bool) -> int:
    """Predictor FLOPs of one rollout of one sequence (n observed frames, T actions -> T calls)."""
    N, H, depth = cfg.num_tokens, cfg.num_hist, cfg.predictor_config().depth
    total, cached = 0, 0
    for k in range(T):  # call k sees frames up to n + k - 1
        frames = n + k
        window = min(frames, H)
        if not fast:
            total += depth * block_flops(cfg, window * N, window * N, window * N)
        elif frames <= H:  # KV cache: only the new frames' rows
            new = frames - cached
            total += depth * block_flops(cfg, new * N, frames * N, new * N)
            cached = frames
        else:  # sliding window: all blocks but the last on every row, the last on the last frame
            L = window * N
            total += (depth - 1) * block_flops(cfg, L, L, L) + block_flops(cfg, N, L, N)
    return total


def amp(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def plan_once(encoder, model, args, episodes: int, fast: bool, dtype: str, seed: int = 0) -> dict:
    """Encode start + goal frames once, then one CEM plan for ``episodes`` start states together."""
    g = torch.Generator().manual_seed(seed)
    size = args.image_size
    start_frames = torch.randint(0, 256, (episodes, size, size, 3), dtype=torch.uint8, generator=g)
    goal_frames = torch.randint(0, 256, (episodes, size, size, 3), dtype=torch.uint8, generator=g)
    proprio = torch.randn(episodes, 1, model.cfg.proprio_dim, generator=g)
    goal_proprio = torch.randn(episodes, model.cfg.proprio_dim, generator=g)
    planner = make_planner(
        "cem", samples=args.samples, topk=min(30, args.samples // 2), opt_steps=args.opt_steps,
        horizon=args.horizon, select="best", seed=seed,
    )  # fmt: skip
    original = model.rollout
    model.rollout = lambda v, p, a: original(v, p, a, fast=fast)  # the variant under test
    try:
        with torch.inference_mode(), amp(dtype):
            started = time.perf_counter()
            tokens = encoder.encode(torch.cat([start_frames, goal_frames]))  # (2E, N, Dv): one batch
            obs_visual, goal_visual = tokens[:episodes, None], tokens[episodes:]  # (E,1,N,Dv), (E,N,Dv)
            encoded = time.perf_counter()
            cost_fn = rollout_cost_fn(model, obs_visual, proprio, goal_visual, goal_proprio, Objective())
            result = planner.plan(cost_fn, torch.zeros(episodes, args.horizon, model.cfg.action_dim))
            seconds = time.perf_counter() - started
    finally:
        model.rollout = original
    return {"seconds": seconds, "encode_seconds": encoded - started, "result": result}


def summarise(run: dict, cfg: WorldModelConfig, args, episodes: int, fast: bool, peak: float) -> dict:
    res, seconds = run["result"], run["seconds"]
    sequences = res.n_evaluations * episodes
    enc = encoder_flops(args.image_size, 2 * episodes)
    needed = enc + sequences * rollout_flops(cfg, 1, args.horizon, fast=False)
    executed = enc + sequences * rollout_flops(cfg, 1, args.horizon, fast=fast)
    return {
        "episodes": episodes,
        "seconds_per_plan": round(seconds, 2),
        "seconds_per_episode": round(seconds / episodes, 2),
        "encode_seconds": round(run["encode_seconds"], 3),
        "sequences_evaluated": sequences,
        "rollout_steps_per_second": round(sequences * args.horizon / seconds, 1),
        "gflop_needed": round(needed / 1e9, 1),
        "gflop_executed": round(executed / 1e9, 1),
        "achieved_gflops": round(executed / seconds / 1e9, 1),
        "effective_gflops": round(needed / seconds / 1e9, 1),  # DINO-WM's work per second
        "peak_fraction": round(executed / seconds / 1e9 / peak, 3),
        "speedup_vs_dino_wm_56s_per_episode": round(REFERENCE_SECONDS / (seconds / episodes), 2),
    }


def bf16_check(model, args) -> dict:
    """A small rollout in fp32 and under bf16 autocast: the speed ratio decides whether bf16 pays."""
    cfg = model.cfg
    visual, proprio = (
        torch.randn(1, 1, cfg.num_visual_tokens, cfg.visual_dim),
        torch.randn(1, 1, cfg.proprio_dim),
    )
    actions = torch.randn(1, args.bf16_check_samples, args.horizon, cfg.action_dim)
    out = {}
    for dtype in ("fp32", "bf16"):
        with torch.inference_mode(), amp(dtype):
            model.rollout(visual, proprio, actions[:, :1])  # warm-up
            started = time.perf_counter()
            model.rollout(visual, proprio, actions)
            out[f"{dtype}_seconds"] = round(time.perf_counter() - started, 3)
    out["samples"] = args.bf16_check_samples
    out["bf16_over_fp32_speed"] = round(out["fp32_seconds"] / out["bf16_seconds"], 3)
    return out


def precision_auto(model, args) -> dict:
    """What ``precision=auto`` (``wmlab.precision``) picks here for this model, with its evidence: the
    micro-benchmark of the model's shapes, then (only if bf16 is faster) agreement on 8 candidates."""
    from wmlab.precision import block_shapes, resolve_precision

    cfg = model.cfg
    g = torch.Generator().manual_seed(3)
    visual = torch.randn(1, 1, cfg.num_visual_tokens, cfg.visual_dim, generator=g)
    proprio, goal_p = (
        torch.randn(1, 1, cfg.proprio_dim, generator=g),
        torch.randn(1, cfg.proprio_dim, generator=g),
    )
    goal = torch.randn(1, cfg.num_visual_tokens, cfg.visual_dim, generator=g)
    candidates = torch.randn(1, 8, args.horizon, cfg.action_dim, generator=g)

    def probe(precision: str) -> torch.Tensor:
        with torch.inference_mode():
            fn = rollout_cost_fn(model, visual, proprio, goal, goal_p, Objective(), precision=precision)
            return fn(candidates)  # (1, 8)

    started = time.perf_counter()
    info = resolve_precision("auto", "cpu", shapes=block_shapes(cfg), probe=probe)
    info["seconds"] = round(time.perf_counter() - started, 2)
    return info


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image-size", type=int, default=98, help="frame size (98 -> 49 patches of 14)")
    parser.add_argument("--samples", type=int, default=64, help="CEM samples per iteration")
    parser.add_argument("--opt-steps", type=int, default=3, help="CEM iterations")
    parser.add_argument("--horizon", type=int, default=5, help="planned model steps")
    parser.add_argument("--episodes", type=int, default=2, help="start states planned together (batched run)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of the plan runs")
    parser.add_argument(
        "--bf16-check-samples", type=int, default=4, help="rollout size of the bf16 check (0: skip)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="rounds of all variants (fastest kept)")
    parser.add_argument("--skip-reference", action="store_true", help="do not time the unoptimised rollout")
    parser.add_argument("--peak-size", type=int, default=2048, help="square matmul size for the peak")
    args = parser.parse_args()

    from matmul_peak import matmul_peak

    started = time.perf_counter()
    encoder = make_encoder(args.image_size)
    N = encoder.info.num_tokens
    torch.manual_seed(0)
    cfg = WorldModelConfig(visual_dim=VIT_S["hidden"], num_visual_tokens=N, predictor=dict(DINO_WM))
    model = LatentWorldModel(cfg).eval()
    params_m = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    result = {
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_before": round(os.getloadavg()[0], 2),
        "setup": {
            "image_size": args.image_size, "patches": N, "token_dim": cfg.token_dim, "samples": args.samples,
            "opt_steps": args.opt_steps, "horizon": args.horizon, "topk": min(30, args.samples // 2),
            "dtype": args.dtype, "world_model_params_m": params_m,
        },
        "flops_per_sequence_gflop": {
            "reference": round(rollout_flops(cfg, 1, args.horizon, fast=False) / 1e9, 3),
            "fast": round(rollout_flops(cfg, 1, args.horizon, fast=True) / 1e9, 3),
        },
        "matmul_peak": matmul_peak(args.peak_size),
    }  # fmt: skip
    peak = result["matmul_peak"][args.dtype]["peak_gflops"]
    plan_once(encoder, model, args, 1, True, args.dtype)  # warm-up (first calls at a shape are slower)
    variants = {} if args.skip_reference else {"reference": (1, False)}
    variants["fast"] = (1, True)
    if args.episodes > 1:
        variants["fast_batched"] = (args.episodes, True)
    # Rounds in alternating order (A B C, C B A, ...) so a load change on the shared machine hits
    # every variant alike; each variant keeps its fastest round (noise only ever adds time).
    runs, all_seconds = {}, {name: [] for name in variants}
    for r in range(args.repeats):
        for name in list(variants) if r % 2 == 0 else list(variants)[::-1]:
            episodes, fast = variants[name]
            run = plan_once(encoder, model, args, episodes, fast, args.dtype)
            all_seconds[name].append(round(run["seconds"], 2))
            if name not in runs or run["seconds"] < runs[name][0]["seconds"]:
                runs[name] = (run, episodes, fast)
    result["plans"] = {k: summarise(run, cfg, args, e, fast, peak) for k, (run, e, fast) in runs.items()}
    for name, seconds in all_seconds.items():
        result["plans"][name]["seconds_all_rounds"] = seconds
    plans = result["plans"]
    ratios = {}
    if "reference" in runs:
        ref, fast = runs["reference"][0]["result"], runs["fast"][0]["result"]
        ratios["fast_speedup_over_reference"] = round(
            plans["reference"]["seconds_per_plan"] / plans["fast"]["seconds_per_plan"], 3
        )
        ratios["flop_ratio_reference_over_fast"] = round(
            plans["reference"]["gflop_executed"] / plans["fast"]["gflop_executed"], 3
        )
        ratios["fast_equals_reference"] = {
            "max_abs_cost_difference": float((ref.cost - fast.cost).abs().max()),
            "max_abs_action_difference": float((ref.actions - fast.actions).abs().max()),
        }
    if "fast_batched" in plans:
        ratios["per_episode_seconds_batched_over_single"] = round(
            plans["fast_batched"]["seconds_per_episode"] / plans["fast"]["seconds_per_episode"], 3
        )
    result["ratios"] = ratios
    if args.bf16_check_samples:
        result["bf16_check"] = bf16_check(model, args)
    result["precision_auto"] = precision_auto(model, args)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
