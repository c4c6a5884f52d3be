"""Train the latent world model (M) on a dataset, over a frozen encoder (V).

``train(cfg)`` with the config of ``wmlab/conf/train.yaml`` (DINO-WM's names: ``frameskip``,
``num_hist``, ``concat_dim``, ``training.predictor_lr`` ...). Visual tokens come from the frozen-
feature cache when one exists for (dataset, encoder), otherwise frames are encoded on the fly.
Checkpoints are written atomically every epoch; re-running the same command resumes from the
last complete epoch. Multi-GPU: ``torchrun --nproc_per_node=G -m wmlab.cli train ...`` (DDP; each
rank takes a shard of every epoch's permutation, rank 0 writes).
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from wmlab.data.normalization import NormalizationStats
from wmlab.data.store import TrajectoryStore, jsonable
from wmlab.data.windows import WindowDataset, WindowSpec, make_datasets
from wmlab.encoders import make_encoder
from wmlab.integrity import UserError
from wmlab.models.world_model import LatentWorldModel, WorldModelConfig
from wmlab.runs import (
    atomic_save_tensors,
    load_tensors,
    optimizer_from_tensors,
    optimizer_to_tensors,
    read_config,
    read_json,
    versions,
    write_config,
    write_json,
)


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (NaN loss, mismatched resume); the message says what to do."""


# ---------------------------------------------------------------- helpers
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def encoder_kwargs(enc_cfg: dict) -> dict:
    return {k: v for k, v in enc_cfg.items() if k not in ("name", "weights", "token_pool")}


def build_encoder(enc_cfg: dict, device: torch.device):
    encoder = make_encoder(
        enc_cfg["name"], weights=enc_cfg.get("weights"), token_pool=enc_cfg.get("token_pool", 1),
        **encoder_kwargs(enc_cfg),
    )  # fmt: skip
    return encoder.to(device).eval().requires_grad_(False)


def find_feature_cache(store: TrajectoryStore, encoder):
    """The frozen-feature cache of (dataset, encoder) if it was built, else None (encode on the fly).

    A cache that exists but is stale or incomplete is an error, never silently bypassed.
    """
    from wmlab.data.feature_cache import cache_path, open_feature_cache

    if not (cache_path(store.path, encoder.info) / "zarr.json").is_file():
        return None
    return open_feature_cache(store, encoder.info)


class VisualTokens:
    """Turns a batch's ``visual`` entry into float tokens (B, F, N, D): cached or encoded now."""

    def __init__(self, encoder, cached: bool, device: torch.device) -> None:
        self.encoder, self.cached, self.device = encoder, cached, device

    @torch.no_grad()
    def __call__(self, visual: torch.Tensor) -> torch.Tensor:
        if self.cached:
            return visual.to(self.device, non_blocking=True).float()  # (B, F, N, D) from fp16
        B, Fr = visual.shape[:2]
        frames = visual.reshape(B * Fr, *visual.shape[2:]).to(self.device)  # (B*F, H, W, 3) uint8
        tokens = self.encoder.encode(frames)  # (B*F, N, D)
        return tokens.reshape(B, Fr, *tokens.shape[1:]).float()  # (B, F, N, D)


def model_config(cfg: dict, encoder, store: TrajectoryStore) -> WorldModelConfig:
    action_dim = int(store.arrays["actions"].shape[-1]) * int(cfg["frameskip"])
    return WorldModelConfig(
        visual_dim=encoder.info.dim,
        num_visual_tokens=encoder.info.num_tokens,
        action_dim=action_dim,
        proprio_dim=int(store.arrays["states"].shape[-1]),
        action_emb_dim=int(cfg["action_emb_dim"]),
        proprio_emb_dim=int(cfg["proprio_emb_dim"]),
        num_hist=int(cfg["num_hist"]),
        num_pred=int(cfg["num_pred"]),
        concat_dim=int(cfg["concat_dim"]),
        predict_delta=bool(cfg.get("predict_delta", False)),
        predictor=dict(cfg["predictor"]),
    )


def make_optimizer(model: LatentWorldModel, tcfg: dict) -> torch.optim.Optimizer:
    embeddings = {id(p) for m in (model.action_encoder, model.proprio_encoder) for p in m.parameters()}
    # Everything but the embeddings learns at the predictor's rate (the predictor, the delta head).
    groups = [
        {
            "params": [p for p in model.parameters() if id(p) not in embeddings],
            "lr": float(tcfg["predictor_lr"]),
        },
        {
            "params": [*model.action_encoder.parameters(), *model.proprio_encoder.parameters()],
            "lr": float(tcfg["action_encoder_lr"]),
        },
    ]
    return torch.optim.AdamW(groups, weight_decay=float(tcfg.get("weight_decay", 0.01)))


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int, limit=None):
    """This rank's index batches of one epoch: a seeded permutation, split across ranks."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator).numpy()
    order = order[rank::world]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return batches[:limit] if limit else batches


def _batch_to(batch: dict, device) -> dict:
    return {k: torch.as_tensor(v).to(device) for k, v in batch.items()}


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, dataset: WindowDataset, tokens: VisualTokens, batch_size: int, device, max_batches=None):
    """Mean validation losses and the copy-last-frame baseline (predict z_{t+1} = z_t)."""
    model.eval()
    sums: dict[str, float] = {}
    count = 0
    for ids in epoch_batches(len(dataset), batch_size, 0, 0, 0, 1, max_batches):
        batch = _batch_to(dataset.get_batch(ids), device)
        batch["visual"] = tokens(batch["visual"])
        _, parts = model.loss(batch)
        visual = batch["visual"]  # (B, H+1, N, D)
        parts["copy_last_visual_loss"] = F.mse_loss(visual[:, :-1], visual[:, 1:])
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(ids)
        count += len(ids)
    return {k: v / max(count, 1) for k, v in sums.items()}


@torch.no_grad()
def rollout_errors(
    model, dataset: WindowDataset | None, tokens: VisualTokens, horizon: int, device, n: int = 64
):
    """Open-loop visual error at 1..horizon model steps on held-out windows: raw MSE and MSE
    divided by the tokens' variance (so encoders with different scales compare)."""
    if dataset is None or len(dataset) == 0:
        return {}
    model.eval()
    ids = np.linspace(0, len(dataset) - 1, num=min(n, len(dataset))).astype(int)
    batch = _batch_to(dataset.get_batch(ids), device)
    visual = tokens(batch["visual"])  # (B, H+K, N, D)
    H = model.cfg.num_hist
    out = model.rollout(visual[:, :H], batch["proprio"][:, :H], batch["actions"][:, : H + horizon - 1])
    pred = out["visual"][:, H:]  # (B, K, N, D)
    true = visual[:, H : H + horizon]
    mse = ((pred - true) ** 2).mean(dim=(0, 2, 3))  # (K,)
    variance = true.var().clamp_min(1e-12)
    return {f"rollout_mse_{k + 1}": float(mse[k]) for k in range(horizon)} | {
        f"rollout_nmse_{k + 1}": float(mse[k] / variance) for k in range(horizon)
    }


# ---------------------------------------------------------------- main loop
def train(cfg: dict) -> Path:
    """Train (or resume) the run described by ``cfg``; returns the run directory."""
    tcfg = cfg["training"]
    run_dir = Path(cfg["run_dir"])
    rank, world = _distributed()
    device = resolve_device(cfg.get("device", "auto"))
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.manual_seed(int(tcfg["seed"]))

    store = TrajectoryStore(cfg["data"])
    encoder = build_encoder(dict(cfg["encoder"]), device)
    cache = find_feature_cache(store, encoder)
    state_path = run_dir / "checkpoint" / "state.json"
    resuming = state_path.exists() and cfg.get("resume", True)
    # A resumed run keeps the statistics it started with, so its inputs mean the same thing.
    saved_stats = NormalizationStats.load(run_dir / "normalization.json") if resuming else None
    spec = WindowSpec(
        num_hist=int(cfg["num_hist"]), num_pred=int(cfg["num_pred"]), frameskip=int(cfg["frameskip"])
    )
    train_set, val_set, stats = make_datasets(
        store, spec, float(cfg["split_ratio"]), int(cfg["split_seed"]), source=cache,
        drop_short=bool(cfg.get("drop_short", False)), stats=saved_stats,
    )  # fmt: skip
    horizon = int(tcfg.get("rollout_eval_steps", 5))
    rollout_set = None
    if val_set is not None and horizon > 0:
        long_spec = WindowSpec(num_hist=spec.num_hist, num_pred=horizon, frameskip=spec.frameskip)
        try:  # episodes too short for the longer rollout windows are left out of this metric only
            rollout_set = WindowDataset(store, val_set.episodes, long_spec, stats, cache, drop_short=True)
        except ValueError:
            rollout_set = None
    tokens = VisualTokens(encoder, cached=cache is not None, device=device)

    mcfg = model_config(cfg, encoder, store)
    model = LatentWorldModel(mcfg).to(device)
    optimizer = make_optimizer(model, tcfg)
    start_epoch, global_step = 0, 0
    run_dir.mkdir(parents=True, exist_ok=True)
    metadata = jsonable(
        {
            "encoder": encoder.info.__dict__,
            "dataset": {
                "path": str(store.path),
                "fingerprint": store.fingerprint(),
                "env": store.metadata.get("env"),
            },
            "feature_cache": str(cache.path) if cache is not None else None,
            "model": mcfg.to_dict(),
            "versions": versions(),
            "windows": {"train": len(train_set), "val": len(val_set) if val_set else 0},
        }
    )  # JSON types, so a resumed run compares equal to what it wrote
    if resuming:
        start_epoch, global_step = _resume(run_dir, model, optimizer, metadata)
    elif rank == 0:
        (run_dir / "checkpoint").mkdir(exist_ok=True)
        write_config(run_dir / "config.yaml", cfg)
        stats.save(run_dir / "normalization.json")
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.index else None
        )

    writer = _tensorboard(run_dir) if rank == 0 else None
    epochs = int(tcfg["epochs"])
    last_good = state_path if state_path.exists() else None
    from tqdm.auto import tqdm

    for epoch in range(start_epoch, epochs):
        model.train()
        batches = epoch_batches(
            len(train_set), int(tcfg["batch_size"]), int(tcfg["seed"]), epoch, rank, world,
            tcfg.get("max_steps_per_epoch"),
        )  # fmt: skip
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", disable=not cfg.get("progress", True) or rank)
        started, running = time.perf_counter(), 0.0
        for i, ids in enumerate(bar):
            batch = _batch_to(train_set.get_batch(ids), device)
            batch["visual"] = tokens(batch["visual"])
            with _autocast(device, tcfg.get("precision", "auto")):
                loss, _ = ddp_model(batch)  # forward = loss; through DDP's wrapper so gradients sync
            if not torch.isfinite(loss):
                where = (
                    f"{last_good.parent} (epoch {read_json(last_good)['epoch']})" if last_good else "none yet"
                )
                raise TrainingError(
                    f"training loss became {loss.item()} at epoch {epoch + 1}, step {i + 1} (global step "
                    f"{global_step + 1}). Last good checkpoint: {where}. Lower training.predictor_lr or set "
                    "training.grad_clip, then re-run to resume from it."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg.get("grad_clip"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(tcfg["grad_clip"]))
            optimizer.step()
            global_step += 1
            value = loss.item()
            running += value
            bar.set_postfix(loss=f"{value:.4f}")
            if writer is not None and global_step % 10 == 0:
                writer.add_scalar("train/loss", value, global_step)
        if rank != 0:
            continue
        seconds = time.perf_counter() - started
        metrics = {"epoch": epoch + 1, "train_loss": running / max(len(batches), 1), "epoch_seconds": seconds}
        metrics["train_windows_per_second"] = len(batches) * int(tcfg["batch_size"]) / max(seconds, 1e-9)
        if val_set is not None:
            val = evaluate(model, val_set, tokens, int(tcfg["batch_size"]), device, tcfg.get("val_batches"))
            metrics.update({f"val_{k}": v for k, v in val.items()})
            metrics.update(rollout_errors(model, rollout_set, tokens, horizon, device))
        for key, value in metrics.items():
            if key != "epoch" and writer is not None:
                writer.add_scalar(
                    key.replace("val_", "val/", 1) if key.startswith("val_") else f"epoch/{key}",
                    value,
                    epoch + 1,
                )
        _save(run_dir, model, optimizer, epoch + 1, global_step, metadata, metrics)
        last_good = state_path
    if writer is not None:
        writer.close()
    return run_dir


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but never let logging stop training
        return None
    return SummaryWriter(str(run_dir / "tb"))


def _save(
    run_dir: Path, model, optimizer, epoch: int, global_step: int, metadata: dict, metrics: dict
) -> None:
    ckpt = run_dir / "checkpoint"
    opt_tensors, opt_extra = optimizer_to_tensors(optimizer)
    opt_tensors["rng.torch"] = torch.get_rng_state()
    atomic_save_tensors(model.state_dict(), ckpt / "model.safetensors")
    atomic_save_tensors(opt_tensors, ckpt / "optimizer.safetensors")
    atomic_save_tensors(model.state_dict(), run_dir / "model.safetensors", {"epoch": epoch})
    history = (
        read_json(run_dir / "metadata.json").get("history", [])
        if (run_dir / "metadata.json").exists()
        else []
    )
    history = [h for h in history if h.get("epoch", 0) < epoch] + [metrics]
    write_json(run_dir / "metadata.json", {**metadata, "epoch": epoch, "history": history})
    # Written last: a checkpoint counts only once everything above is on disk.
    write_json(ckpt / "state.json", {"epoch": epoch, "global_step": global_step, "optimizer": opt_extra})


def _resume(run_dir: Path, model, optimizer, metadata: dict) -> tuple[int, int]:
    ckpt = run_dir / "checkpoint"
    state = read_json(ckpt / "state.json")
    saved = read_json(run_dir / "metadata.json")
    for key in ("encoder", "model"):
        if saved.get(key) != metadata[key]:
            raise TrainingError(
                f"{run_dir} was trained with a different {key} ({saved.get(key)} vs now {metadata[key]}); "
                "use another model_name, or resume=false to start over in this directory"
            )
    if saved.get("dataset", {}).get("fingerprint") != metadata["dataset"]["fingerprint"]:
        raise TrainingError(
            f"the dataset changed since {run_dir} was trained (fingerprint {saved['dataset']['fingerprint']} "
            f"vs {metadata['dataset']['fingerprint']}); use another model_name or resume=false"
        )
    model.load_state_dict(load_tensors(ckpt / "model.safetensors"))
    opt_tensors = load_tensors(ckpt / "optimizer.safetensors")
    torch.set_rng_state(opt_tensors.pop("rng.torch"))
    optimizer_from_tensors(optimizer, opt_tensors, state["optimizer"])
    return int(state["epoch"]), int(state["global_step"])


def load_run(run_dir: str | Path, device="cpu") -> tuple[LatentWorldModel, dict]:
    """Rebuild a trained model from its run directory alone: (model in eval mode, config)."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir / "config.yaml")
    meta = read_json(run_dir / "metadata.json")
    model = LatentWorldModel(WorldModelConfig(**meta["model"]))
    model.load_state_dict(load_tensors(run_dir / "model.safetensors"))
    return model.to(device).eval(), cfg
