"""GPU acceptance benchmark: training windows/s, DINO-WM's PointMaze MPC plan, TFLOP/s, bf16 agreement.

    python benchmarks/gpu.py                 # one GPU, DINO-WM sizes, < 8 minutes (H100/H200 class)
    python benchmarks/gpu.py --tiny          # reduced sizes on CPU (the test suite runs this, < 20 s)

Prints one JSON object:

- ``device``: name, and the measured matmul peak (TFLOP/s) in fp32, TF32 (CUDA) and bf16: square
  ``--peak-size`` matmuls, best of 5, the yardstick for ``achieved_tflops``.
- ``training``: DINO-WM's predictor (depth 6, 16 heads x 64, MLP 2048, dropout 0.1) on cached
  tokens: ``--tokens`` x 384 per frame (196 = DINOv2-S/14 patches at 224 px), windows of num_hist 3 +
  1 frames, batch ``--batch``. Data loading is included: windows are read from an fp16 token file on
  disk (the feature cache's dtype) by ``--workers`` DataLoader workers (``wmlab.training_input``:
  pinned memory, prefetch, non-blocking copies, NaN checks without per-step syncs). fp32 and bf16
  autocast, each timed over ``--train-seconds`` after warm-up steps: windows/s, seconds/step, achieved
  TFLOP/s (3x the forward's matmul FLOPs) and its fraction of the peak of that precision.
- ``planning``: DINO-WM's PointMaze MPC plan, ``--episodes`` (50) start states x CEM ``--samples``
  (300) x ``--opt-steps`` (10), horizon 5, last-frame MSE, random weights and random start/goal
  tokens (a plan's cost does not depend on what the tokens show), all episodes batched and chunked by
  the default memory budget (``wmlab.planning.memory``). At the precision ``precision=auto`` picks here
  (``wmlab.precision``, its evidence included): seconds per plan and per episode, rows per rollout call,
  peak memory (``torch.cuda.max_memory_allocated``; on CPU the estimate), achieved TFLOP/s.
- ``agreement``: the first ``--agree-episodes`` episodes planned in fp32 and in bf16 (same seed): the
  fp32 cost of both plans, their relative difference, and the largest action difference.
- ``attention``: the predictor forward with each attention backend (sdpa / frames / flex), same output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plan import block_flops, rollout_flops

from wmlab.models.world_model import LatentWorldModel, WorldModelConfig
from wmlab.planning import make_planner
from wmlab.planning.memory import default_budget, rollout_bytes_per_sequence
from wmlab.planning.objectives import Objective, rollout_cost_fn
from wmlab.precision import block_shapes, precision_context, resolve_precision
from wmlab.training_input import FiniteWatch, device_batches, window_loader

DINO_WM = dict(depth=6, heads=16, dim_head=64, mlp_dim=2048, dropout=0.1, emb_dropout=0.0)
TINY = dict(depth=2, heads=2, dim_head=16, mlp_dim=64, dropout=0.1, emb_dropout=0.0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, size: int) -> dict:
    """Best TFLOP/s of a size^3 matmul, per precision (fp32 with TF32 off, TF32, bf16)."""
    out = {}
    variants = [("fp32", torch.float32, False), ("bf16", torch.bfloat16, False)]
    if device.type == "cuda":
        variants.append(("tf32", torch.float32, True))
    previous = torch.backends.cuda.matmul.allow_tf32
    for name, dtype, tf32 in variants:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        best = float("inf")
        for i in range(6):
            sync(device)
            started = time.perf_counter()
            a @ b
            sync(device)
            if i:
                best = min(best, time.perf_counter() - started)
        out[name] = round(2 * size**3 / best / 1e12, 6)  # 6 decimals: tiny CPU runs are ~1e-3
    torch.backends.cuda.matmul.allow_tf32 = previous
    return out


# ---------------------------------------------------------------- training
class TokenWindows:
    """Windows of F frames from an fp16 token file (E, T, N, D) on disk, as the feature cache holds
    them, with random actions/proprio; ``__getitems__`` reads a whole batch (runs in the workers)."""

    def __init__(self, path: Path, shape: tuple, frames: int, action_dim: int, proprio_dim: int) -> None:
        self.path, self.shape, self.frames = path, shape, frames
        self.action_dim, self.proprio_dim = action_dim, proprio_dim
        E, T = shape[:2]
        self.index = [(e, t) for e in range(E) for t in range(T - frames + 1)]
        self._tokens = None

    def __len__(self) -> int:
        return len(self.index)

    def __getitems__(self, ids) -> dict:
        if self._tokens is None:  # opened lazily in each worker
            self._tokens = np.memmap(self.path, dtype=np.float16, mode="r", shape=self.shape)
        visual = np.stack([self._tokens[e, t : t + self.frames] for e, t in (self.index[i] for i in ids)])
        g = np.random.default_rng(int(ids[0]))
        B, F = len(ids), self.frames
        return {
            "visual": torch.from_numpy(visual.astype(np.float32)),  # (B, F, N, D)
            "proprio": torch.from_numpy(g.standard_normal((B, F, self.proprio_dim), dtype=np.float32)),
            "actions": torch.from_numpy(g.standard_normal((B, F, self.action_dim), dtype=np.float32)),
        }


def train_throughput(args, device: torch.device, work: Path, peak: dict) -> dict:
    cfg = WorldModelConfig(visual_dim=args.dim, num_visual_tokens=args.tokens, predictor=dict(args.predictor))
    F = cfg.num_hist + cfg.num_pred
    shape = (args.cache_episodes, args.cache_steps, args.tokens, args.dim)
    path = work / "tokens.f16"
    tokens = np.memmap(path, dtype=np.float16, mode="w+", shape=shape)
    rng = np.random.default_rng(0)
    for e in range(shape[0]):  # one episode at a time (the full file may be several GB)
        tokens[e] = rng.standard_normal(shape[1:], dtype=np.float32).astype(np.float16)
    tokens.flush()
    del tokens
    dataset = TokenWindows(path, shape, F, cfg.action_dim, cfg.proprio_dim)
    forward = args.batch * window_forward_flops(cfg)
    out = {
        "tokens": args.tokens, "dim": args.dim, "batch": args.batch, "workers": args.workers,
        "cache_gb": round(np.prod(shape) * 2 / 1e9, 2),
    }  # fmt: skip
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = LatentWorldModel(cfg).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
        rng = np.random.default_rng(1)
        batches = []  # epochs of shuffled windows, more than --train-seconds can use
        while len(batches) < 20_000:
            order = rng.permutation(len(dataset))
            batches += [order[i : i + args.batch] for i in range(0, len(order) - args.batch + 1, args.batch)]
        loader = window_loader(dataset, batches, workers=args.workers)
        watch = FiniteWatch(every=50)
        steps, started = 0, None
        for batch in device_batches(loader, device):
            if steps == args.warmup_steps:
                sync(device)
                started = time.perf_counter()
            with precision_context(precision, device):
                loss, _ = model(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            watch.add(loss)
            steps += 1
            if started is not None and time.perf_counter() - started >= args.train_seconds:
                break
        sync(device)
        watch.check()
        timed = steps - args.warmup_steps
        if started is None or timed < 1:
            raise RuntimeError(f"training: only {steps} batches; raise --cache-episodes")
        seconds = time.perf_counter() - started
        achieved = 3 * forward * timed / seconds / 1e12
        out[precision] = {
            "windows_per_second": round(timed * args.batch / seconds, 2),
            "seconds_per_step": round(seconds / timed, 4),
            "steps_timed": timed,
            "achieved_tflops": round(achieved, 3),
            "peak_fraction": round(achieved / peak[precision], 3) if peak[precision] else None,
        }
    out["bf16_over_fp32"] = round(out["bf16"]["windows_per_second"] / out["fp32"]["windows_per_second"], 3)
    return out


def window_forward_flops(cfg: WorldModelConfig) -> int:
    """Matmul FLOPs of the teacher-forced forward on one window (num_hist frames, every row)."""
    L = cfg.num_hist * cfg.num_tokens
    return cfg.predictor_config().depth * block_flops(cfg, L, L, L)


# ---------------------------------------------------------------- planning
def plan_inputs(cfg: WorldModelConfig, episodes: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(episodes, 1, cfg.num_visual_tokens, cfg.visual_dim, generator=g)
    goal = torch.randn(episodes, cfg.num_visual_tokens, cfg.visual_dim, generator=g)
    proprio = torch.randn(episodes, 1, cfg.proprio_dim, generator=g)
    goal_p = torch.randn(episodes, cfg.proprio_dim, generator=g)
    return [t.to(device) for t in (obs, proprio, goal, goal_p)]


def one_plan(model, args, inputs, precision: str, device: torch.device, episodes: int) -> dict:
    obs, proprio, goal, goal_p = (t[:episodes] for t in inputs)
    planner = make_planner(
        "cem", samples=args.samples, topk=min(30, args.samples // 2), opt_steps=args.opt_steps, horizon=5,
        select="mean", seed=0,
    )  # fmt: skip
    cost_fn = rollout_cost_fn(model, obs, proprio, goal, goal_p, Objective(), precision=precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    started = time.perf_counter()
    with torch.inference_mode():
        result = planner.plan(cost_fn, torch.zeros(episodes, 5, model.cfg.action_dim, device=device))
    sync(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"result": result, "seconds": seconds, "chunk": cost_fn.max_chunk, "peak_bytes": peak}


def planning(args, device: torch.device, peak: dict) -> tuple[dict, dict]:
    torch.manual_seed(0)
    cfg = WorldModelConfig(visual_dim=args.dim, num_visual_tokens=args.tokens, predictor=dict(args.predictor))
    model = LatentWorldModel(cfg).to(device).eval()
    inputs = plan_inputs(cfg, args.episodes, device)
    k = min(args.agree_episodes, args.episodes)

    def probe(precision: str) -> torch.Tensor:  # 8 fixed candidates from the first 2 start states
        m = min(2, k)
        actions = torch.randn(m, 8, 5, cfg.action_dim, generator=torch.Generator().manual_seed(1)).to(device)
        fn = rollout_cost_fn(model, *(t[:m] for t in inputs), Objective(), precision=precision)
        with torch.inference_mode():
            return fn(actions)  # (m, 8)

    choice = resolve_precision("auto", device, shapes=block_shapes(cfg), probe=probe)
    one_plan(model, args, inputs, choice["chosen"], device, min(2, args.episodes))  # warm-up
    run = one_plan(model, args, inputs, choice["chosen"], device, args.episodes)
    sequences = run["result"].n_evaluations * args.episodes
    flops = sequences * rollout_flops(cfg, 1, 5, fast=True)
    achieved = flops / run["seconds"] / 1e12
    precision_peak = peak.get(choice["chosen"], peak["fp32"])
    per_row = rollout_bytes_per_sequence(cfg, 1, 5)
    plan_out = {
        "episodes": args.episodes, "samples": args.samples, "opt_steps": args.opt_steps,
        "tokens": args.tokens, "token_dim": cfg.token_dim, "precision": choice,
        "seconds_per_plan": round(run["seconds"], 3),
        "seconds_per_episode": round(run["seconds"] / args.episodes, 4),
        "rows_per_rollout_call": run["chunk"], "sequences_per_plan": sequences,
        "memory_budget_gb": round(default_budget(device) / 1e9, 2),
        "estimated_peak_gb": round(per_row * run["chunk"] / 1e9, 2),
        "peak_memory_gb": None if run["peak_bytes"] is None else round(run["peak_bytes"] / 1e9, 2),
        "achieved_tflops": round(achieved, 3),
        "peak_fraction": round(achieved / precision_peak, 3) if precision_peak else None,
    }  # fmt: skip
    # bf16 vs fp32 plans on the first k episodes (same seed, so the same noise draws)
    plans = {p: one_plan(model, args, inputs, p, device, k) for p in ("fp32", "bf16")}
    fp32_cost = rollout_cost_fn(model, *(t[:k] for t in inputs), Objective())
    with torch.inference_mode():
        costs = {p: fp32_cost(r["result"].actions[:, None])[:, 0] for p, r in plans.items()}  # (k,)
    spread = costs["fp32"].abs().clamp_min(1e-12)
    agreement = {
        "episodes": k,
        "fp32_seconds": round(plans["fp32"]["seconds"], 3),
        "bf16_seconds": round(plans["bf16"]["seconds"], 3),
        "bf16_speedup": round(plans["fp32"]["seconds"] / plans["bf16"]["seconds"], 3),
        "mean_fp32_cost_fp32_plan": round(float(costs["fp32"].mean()), 6),
        "mean_fp32_cost_bf16_plan": round(float(costs["bf16"].mean()), 6),
        "max_relative_cost_difference": round(
            float(((costs["bf16"] - costs["fp32"]).abs() / spread).max()), 5
        ),
        "max_action_difference": round(
            float((plans["bf16"]["result"].actions - plans["fp32"]["result"].actions).abs().max()), 5
        ),
    }
    return plan_out, agreement


def attention_backends(args, device: torch.device) -> dict:
    """The predictor forward (training shape) with each attention backend: seconds and max difference."""
    from wmlab.models.predictor import BlockCausalPredictor, PredictorConfig

    pred = {k: v for k, v in args.predictor.items() if k != "emb_dropout"}
    cfg = PredictorConfig(num_frames=3, num_tokens=args.tokens, dim=args.dim + 20, **{**pred, "dropout": 0.0})
    model = BlockCausalPredictor(cfg).to(device).eval()
    z = torch.randn(args.batch, 3, args.tokens, args.dim + 20, device=device)
    out, reference = {}, None
    for backend in ("sdpa", "frames", "flex"):
        if backend == "flex" and device.type != "cuda":  # eager flex is unfused: nothing to time
            out[backend] = {"skipped": "compiled on CUDA only (equality: tests/test_predictor_attention.py)"}
            continue
        model.set_attention(backend)
        try:
            with (
                torch.inference_mode(),
                precision_context("bf16" if device.type == "cuda" else "fp32", device),
            ):
                y = model(z)  # warm-up (compiles flex on CUDA)
                sync(device)
                started = time.perf_counter()
                y = model(z)
                sync(device)
            seconds = time.perf_counter() - started
        except Exception as error:  # a backend this torch/device cannot run is reported, not fatal
            out[backend] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
            continue
        reference = y if reference is None else reference
        out[backend] = {
            "seconds": round(seconds, 5),
            "max_abs_difference": float((y - reference).abs().max()),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="reduced sizes on CPU (test suite)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tokens", type=int, default=196)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--train-seconds", type=float, default=40.0)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--cache-episodes", type=int, default=40)
    parser.add_argument("--cache-steps", type=int, default=100)
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--opt-steps", type=int, default=10)
    parser.add_argument("--agree-episodes", type=int, default=4)
    parser.add_argument("--peak-size", type=int, default=8192)
    parser.add_argument("--workdir", default=None, help="where the token file goes (default: a temp dir)")
    args = parser.parse_args()
    args.predictor = DINO_WM
    if args.tiny:
        args.predictor = TINY
        args.tokens, args.dim, args.batch, args.workers = 8, 16, 4, 1
        args.train_seconds, args.warmup_steps, args.cache_episodes, args.cache_steps = 0.3, 1, 4, 20
        args.episodes, args.samples, args.opt_steps, args.agree_episodes = 3, 8, 2, 2
        args.peak_size = 256
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if args.tiny and args.device == "auto":
        device = torch.device("cpu")
    started = time.perf_counter()
    result = {
        "tiny": args.tiny,
        "torch": torch.__version__,
        "load_average_1min_before": round(os.getloadavg()[0], 2),
        "device": {
            "type": device.type,
            "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(),
        },
    }
    sections = {}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        sections[name] = round(time.perf_counter() - mark, 1)
        mark = time.perf_counter()

    peak = matmul_peak(device, args.peak_size)
    result["device"]["matmul_peak_tflops"] = peak
    lap("matmul_peak")
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        result["training"] = train_throughput(args, device, Path(work), peak)
    lap("training")
    result["planning"], result["agreement"] = planning(args, device, peak)
    lap("planning")
    result["attention"] = attention_backends(args, device)
    lap("attention")
    result["section_seconds"] = sections
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
