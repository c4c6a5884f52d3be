"""Train the latent world model (M) on a dataset, over a frozen encoder (V).

``train(cfg)`` with the config of ``wmlab/conf/train.yaml`` (DINO-WM's names: ``frameskip``,
``num_hist``, ``concat_dim``, ``training.predictor_lr`` ...). Visual tokens come from the frozen-
feature cache when one exists for (dataset, encoder), otherwise frames are encoded on the fly.
Checkpoints are written atomically every epoch; re-running the same command resumes from the
last complete epoch.

Input: windows go through ``wmlab.training_input`` (a DataLoader with ``training.workers`` readers,
prefetch, pinned memory and non-blocking copies on CUDA); losses stay on the device and are checked
for NaN/inf every ``FINITE_CHECK_EVERY`` steps and at epoch end (``FiniteWatch``), so a step issues no
host sync. ``training.precision=auto`` is measured (``wmlab.precision``) and recorded in metadata.json.

Multi-GPU: ``torchrun --nproc_per_node=G -m wmlab.cli train ...`` (DDP). ``training.batch_size`` is per
rank (global batch = batch_size x G; ``training.lr_scaling=linear`` scales the lrs by G). Each epoch's
permutation (a function of seed and epoch) drops its last ``windows % G`` windows and rank r takes every
G-th window from r, so every rank runs the same number of steps and one step trains on the same windows
as one process with batch batch_size x G. Ranks draw dropout from ``rank_seed(seed, rank)``; logged
loss and windows/s are all-reduced over the ranks; rank 0 writes, with every rank's RNG state.
"""

from __future__ import annotations

import errno
import math
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
from wmlab.integrity import UserError, WriterLock, clean_partials, key_differences
from wmlab.models.world_model import LatentWorldModel, WorldModelConfig
from wmlab.precision import block_shapes, precision_context, resolve_precision
from wmlab.runs import (
    RUN_CHECKPOINT,
    RUN_WHAT,
    VOLATILE_CONFIG_KEYS,
    CheckpointWriteError,
    apply_optimizer_settings,
    build_encoder,
    commit_checkpoint,
    find_feature_cache,
    load_checkpoint,
    load_tensors,
    optimizer_from_tensors,
    read_checkpoint,
    read_config,
    read_json,
    resolve_device,
    rng_state,
    sync_exports,
    versions,
    write_config,
)
from wmlab.training_input import BatchPlan, FiniteWatch, device_batches, window_loader


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (NaN loss, mismatched resume); the message says what to do."""


# ---------------------------------------------------------------- helpers
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
        use_proprio=bool(cfg.get("proprio", True)),
        latent_norm=str(cfg.get("latent_norm", "none")),
        predictor=dict(cfg["predictor"]),
    )


#: Windows read to estimate the per-channel latent statistics (evenly spaced over the training set).
LATENT_STAT_WINDOWS = 256
#: A channel's scale is at least this fraction of the RMS channel std: a channel that never moves in
#: the training episodes (a wall pixel) must not be blown up to unit variance by dividing by ~0.
LATENT_STD_FLOOR = 0.05


@torch.no_grad()
def latent_statistics(dataset: WindowDataset, tokens: VisualTokens, max_windows: int = LATENT_STAT_WINDOWS):
    """Per-channel mean and std (D,) of the visual tokens of up to ``max_windows`` training windows
    (every frame and token of each), accumulated in float64; std floored (``LATENT_STD_FLOOR``).
    Returns (mean, std, info) with info = {"windows", "frames", "floored_channels", "std_floor"}."""
    ids = np.linspace(0, len(dataset) - 1, num=min(max_windows, len(dataset))).round().astype(int)
    total = sq_total = None
    count = 0
    for start in range(0, len(ids), 32):
        visual = tokens(torch.as_tensor(dataset.get_batch(ids[start : start + 32])["visual"]))  # (b, F, N, D)
        flat = visual.double().reshape(-1, visual.shape[-1])  # (b*F*N, D)
        total = flat.sum(0) if total is None else total + flat.sum(0)
        sq_total = (flat**2).sum(0) if sq_total is None else sq_total + (flat**2).sum(0)
        count += flat.shape[0]
    mean = total / count
    var = (sq_total / count - mean**2).clamp_min(0.0)  # (D,)
    floor = LATENT_STD_FLOOR * float(var.mean().sqrt())
    if not floor > 0:
        raise TrainingError(
            "the training episodes' visual tokens are constant in every channel: there is nothing to learn "
            "(is the dataset rendered? is the encoder's input blank?)"
        )
    std = var.sqrt()
    info = {"windows": len(ids), "frames": count // int(visual.shape[2]), "std_floor": floor,
            "floored_channels": int((std < floor).sum())}  # fmt: skip
    return mean.float(), std.clamp_min(floor).float(), info


def make_optimizer(model: LatentWorldModel, tcfg: dict, lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """AdamW with the predictor's and the embeddings' learning rates (x ``lr_scale``: see ``lr_scale``)."""
    embeddings = {id(p) for m in (model.action_encoder, model.proprio_encoder) for p in m.parameters()}
    # Everything but the embeddings learns at the predictor's rate (the predictor, the delta head).
    groups = [
        {
            "params": [p for p in model.parameters() if id(p) not in embeddings],
            "lr": float(tcfg["predictor_lr"]) * lr_scale,
        },
        {
            "params": [*model.action_encoder.parameters(), *model.proprio_encoder.parameters()],
            "lr": float(tcfg["action_encoder_lr"]) * lr_scale,
        },
    ]
    return torch.optim.AdamW(groups, weight_decay=float(tcfg.get("weight_decay", 0.01)))


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s dropout/noise streams in a DDP job: (seed, rank) mixed by numpy's
    SeedSequence, so ranks draw different masks. The data order does not use it (``epoch_batches``)."""
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def lr_scale(scaling: str, world: int) -> float:
    """The learning-rate factor of ``training.lr_scaling``: none = 1; linear = the world size (the
    global batch is ``batch_size`` x world, Goyal et al. 2017's linear scaling rule)."""
    return float(world) if scaling == "linear" else 1.0


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int, limit=None):
    """This rank's index batches of one epoch: a permutation seeded by (seed, epoch) only, split across ranks.

    With ``world`` > 1 the last ``n % world`` windows of the permutation are dropped (torch's
    DistributedSampler with drop_last=True), so every rank gets ``n // world`` windows and the same
    number of batches (an unequal count would leave one rank waiting in an all-reduce forever). Rank r
    takes every world-th window from r, so step k of the job trains on windows
    ``order[k * world * batch_size : (k + 1) * world * batch_size]`` across the ranks: the same batch as
    one process with batch ``world * batch_size`` (the dropped windows aside).
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator).numpy()
    if world > 1:
        order = order[: n - n % world][rank::world]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return batches[:limit] if limit else batches


def _all_reduce(values: torch.Tensor, op: str = "mean") -> torch.Tensor:
    """``values`` combined over the DDP ranks (mean, sum or max); unchanged in a single process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    on = values.device
    if torch.distributed.get_backend() == "nccl" and on.type != "cuda":  # NCCL reduces CUDA tensors only
        on = torch.device("cuda", torch.cuda.current_device())
    out = values.detach().clone().to(on)
    reduce_op = torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
    torch.distributed.all_reduce(out, op=reduce_op)
    out = out.to(values.device)
    return out / torch.distributed.get_world_size() if op == "mean" else out


def replica_difference(model: torch.nn.Module) -> float:
    """The largest |difference| between the DDP ranks' copies of any parameter (0.0 = bitwise equal)."""
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])  # (P,)
    high, low = _all_reduce(flat, "max"), -_all_reduce(-flat, "max")
    return float((high - low).max())


def _gather_rng(rank: int, world: int, device: torch.device) -> dict[str, torch.Tensor] | None:
    """Every rank's RNG state on rank 0 (``runs.commit_checkpoint``'s ``rng`` dict), None elsewhere."""
    mine = rng_state(device if device.type == "cuda" else "cpu")
    if world == 1:
        return mine
    gathered = [None] * world if rank == 0 else None
    torch.distributed.gather_object(mine, gathered, dst=0)
    if rank != 0:
        return None
    out = dict(gathered[0])
    for r, states in enumerate(gathered[1:], start=1):
        out.update({f"rank{r}.{name}": state for name, state in states.items()})
    return out


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
        visual = model.standardize_visual(batch["visual"])  # (B, H+1, N, D) in the loss's units
        parts["copy_last_visual_loss"] = F.mse_loss(visual[:, :-1], visual[:, 1:])
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(ids)
        count += len(ids)
    return {k: v / max(count, 1) for k, v in sums.items()}


@torch.no_grad()
def rollout_errors(
    model, dataset: WindowDataset | None, tokens: VisualTokens, horizon: int, device, n: int = 64
):
    """Open-loop visual error at 1..horizon model steps on held-out windows, in the model's latent units:
    MSE and MSE divided by the tokens' variance (so encoders with different scales compare)."""
    if dataset is None or len(dataset) == 0:
        return {}
    model.eval()
    ids = np.linspace(0, len(dataset) - 1, num=min(n, len(dataset))).astype(int)
    batch = _batch_to(dataset.get_batch(ids), device)
    visual = tokens(batch["visual"])  # (B, H+K, N, D)
    H = model.cfg.num_hist
    out = model.rollout(visual[:, :H], batch["proprio"][:, :H], batch["actions"][:, : H + horizon - 1])
    pred = out["visual"][:, H:]  # (B, K, N, D)
    true = model.standardize_visual(visual[:, H : H + horizon])  # (B, K, N, D)
    mse = ((pred - true) ** 2).mean(dim=(0, 2, 3))  # (K,)
    variance = true.var().clamp_min(1e-12)
    return {f"rollout_mse_{k + 1}": float(mse[k]) for k in range(horizon)} | {
        f"rollout_nmse_{k + 1}": float(mse[k] / variance) for k in range(horizon)
    }


# ---------------------------------------------------------------- config values
_ABSENT = object()


def _lookup(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _int_at_least(low: int, optional: bool = False):
    def check(value) -> bool:
        if value is None:
            return optional
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            return False
        return int(value) >= low

    return check, f"an integer >= {low}" + (" or null" if optional else "")


def _positive_float(optional: bool = False, zero: bool = False):
    def check(value) -> bool:
        if value is None:
            return optional
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return value >= 0 if zero else value > 0

    return check, ("a finite number >= 0" if zero else "a finite number > 0") + (
        " or null" if optional else ""
    )


# (key, (check, valid range)): refused before anything is created, naming the key and the range.
VALUE_CHECKS = {
    "training.batch_size": _int_at_least(1),
    "training.epochs": _int_at_least(1),
    "training.predictor_lr": _positive_float(),
    "training.action_encoder_lr": _positive_float(),
    "training.weight_decay": _positive_float(zero=True),
    "training.grad_clip": _positive_float(optional=True),
    "training.max_steps_per_epoch": _int_at_least(1, optional=True),
    "training.val_batches": _int_at_least(1, optional=True),
    "training.rollout_eval_steps": _int_at_least(0),
    "training.prefetch": _int_at_least(1),
    "frameskip": _int_at_least(1),
    "num_hist": _int_at_least(1),
    "num_pred": _int_at_least(1),
    "action_emb_dim": _int_at_least(1),
    "proprio_emb_dim": _int_at_least(1),
    # bool("maybe") is True: a switch given as any other word would silently mean "on"
    "predict_delta": (lambda v: isinstance(v, bool), "true or false"),
    "proprio": (lambda v: isinstance(v, bool), "true or false"),
}


def validate_config(cfg: dict) -> None:
    """Refuse values that cannot train (``training.batch_size=0``, ``training.epochs=-1``, lr <= 0 ...)
    with a UserError naming the key and its valid range, before any file is written."""
    for key, (check, valid) in VALUE_CHECKS.items():
        value = _lookup(cfg, key)
        if value is _ABSENT:
            continue  # not set: the code's default applies
        if not check(value):
            raise UserError(f"{key}={value!r} is not valid: it must be {valid}. Fix it on the command line.")
    ratio = _lookup(cfg, "split_ratio")
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio <= 1:
        raise UserError(f"split_ratio={ratio!r} is not valid: it must be a number in (0, 1].")
    tcfg = cfg.get("training", {})
    choices = {
        "precision": ("auto", "fp32", "bf16", "tf32"),
        "lr_scaling": ("none", "linear"),
    }
    norm = cfg.get("latent_norm", "none")
    if norm not in ("none", "channel"):
        raise UserError(
            f"latent_norm={norm!r} is not valid: it must be none (DINO-WM's raw tokens) or channel."
        )
    for key, valid in choices.items():
        value = tcfg.get(key) or valid[0]
        if value not in valid:
            raise UserError(f"training.{key}={value!r} is not valid: it must be one of {', '.join(valid)}.")
    workers = tcfg.get("workers", "auto")
    if workers != "auto" and not _int_at_least(0)[0](workers):
        raise UserError(f"training.workers={workers!r} is not valid: it must be auto or an integer >= 0.")
    compile_ = tcfg.get("compile", False)
    if not isinstance(compile_, (bool, str)) or compile_ == "":
        raise UserError(
            f"training.compile={compile_!r} is not valid: it must be false, true or a torch.compile "
            "backend name (inductor, aot_eager, eager)."
        )


# ---------------------------------------------------------------- what may change on resume
# Settings a resume applies (and records in metadata.json "config_changes"); every other change of
# config is refused (it would silently mix two models). The optimizer ones override the settings
# saved in the checkpoint, so lowering training.predictor_lr after a NaN takes effect.
RESUME_APPLIED = {
    "training.epochs", "training.predictor_lr", "training.action_encoder_lr", "training.weight_decay",
    "training.grad_clip", "training.val_batches", "training.rollout_eval_steps", "training.precision",
    "training.lr_scaling", "training.workers", "training.prefetch", "training.compile",
}  # fmt: skip
# Keys added after runs were saved without them: absent in a saved config = this default (no change).
ADDED_KEY_DEFAULTS = {
    "training.lr_scaling": "none",
    "training.workers": "auto",
    "training.prefetch": 4,
    "training.compile": False,
    "latent_norm": "none",  # runs before standardisation trained on raw tokens
}


def _flatten(cfg, prefix: str = "") -> dict:
    if isinstance(cfg, dict):
        out: dict = {}
        for k, v in cfg.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: cfg}


def config_changes(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """(applied, refused) ``"key: old -> new"`` lines between the config a run was saved with and now.

    Keys naming where/how a process runs (``runs.VOLATILE_CONFIG_KEYS``) are ignored.
    """
    a = _flatten({k: v for k, v in saved.items() if k not in VOLATILE_CONFIG_KEYS})
    b = _flatten({k: v for k, v in now.items() if k not in VOLATILE_CONFIG_KEYS})
    applied, refused = [], []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, ADDED_KEY_DEFAULTS.get(key, "<absent>")), b.get(key, "<absent>")
        if old != new:
            (applied if key in RESUME_APPLIED else refused).append(f"{key}: {old!r} -> {new!r}")
    return applied, refused


def optimizer_settings(tcfg: dict, lr_scale: float = 1.0) -> list[dict]:
    """The per-group settings of ``make_optimizer`` (predictor group, embedding group)."""
    wd = float(tcfg.get("weight_decay", 0.01))
    return [
        {"lr": float(tcfg["predictor_lr"]) * lr_scale, "weight_decay": wd},
        {"lr": float(tcfg["action_encoder_lr"]) * lr_scale, "weight_decay": wd},
    ]


# ---------------------------------------------------------------- main loop
WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG}
MAX_ABS_WEIGHT = 1e6  # a world model's weights are O(1); beyond this training has diverged


def train(cfg: dict) -> Path:
    """Train (or resume) the run described by ``cfg``; returns the run directory.

    The run directory is locked (``WriterLock``) for the whole run: a second ``train`` into it is
    refused with who holds it. Values that cannot train are refused before anything is written.
    """
    validate_config(cfg)
    run_dir = Path(cfg["run_dir"])
    rank, world = _distributed()
    try:
        if rank != 0:  # only rank 0 writes; it holds the lock for the job
            return _train(cfg, rank, world)
        with WriterLock(run_dir, RUN_WHAT):
            return _train(cfg, rank, world)
    except OSError as err:
        # Only errors that can only come from writing (EACCES could be a read: left to the caller).
        if err.errno in WRITE_ERRNOS and not isinstance(err, CheckpointWriteError):
            where = err.filename or run_dir
            raise CheckpointWriteError(
                f"could not write {where}: {os.strerror(err.errno)}. The last good checkpoint "
                f"{run_dir / RUN_CHECKPOINT} (if any) is intact. Free disk space or make it writable (or "
                "choose another run_dir=), then re-run the same command to resume."
            ) from err
        raise


def _train(cfg: dict, rank: int, world: int) -> Path:
    tcfg = cfg["training"]
    run_dir = Path(cfg["run_dir"])
    device = resolve_device(cfg.get("device", "auto"))
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.manual_seed(int(tcfg["seed"]))

    store = TrajectoryStore(cfg["data"])
    encoder = build_encoder(dict(cfg["encoder"]), device)
    cache = find_feature_cache(store, encoder)
    ckpt_path = run_dir / RUN_CHECKPOINT
    legacy_state = run_dir / "checkpoint" / "state.json"
    if rank == 0:  # temp files of writers killed mid-write (their pid is dead; we hold the lock)
        clean_partials(run_dir, recursive=True)
    has_checkpoint = ckpt_path.is_file() or legacy_state.is_file()
    resuming = has_checkpoint and cfg.get("resume", True)
    if has_checkpoint and not resuming and rank == 0:
        _forget_run(run_dir)  # resume=false: a kill before epoch 1 must not resume the old run
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
    latent_info = None
    if mcfg.latent_norm == "channel" and not resuming:  # a resumed run loads its own with the weights
        mean, std, latent_info = latent_statistics(train_set, tokens)
        model.set_latent_statistics(mean.to(device), std.to(device))
    scale = lr_scale(tcfg.get("lr_scaling") or "none", world)
    optimizer = make_optimizer(model, tcfg, scale)
    epochs, batch_size = int(tcfg["epochs"]), int(tcfg["batch_size"])
    if world > 1 and len(train_set) // world == 0:
        raise TrainingError(
            f"{len(train_set)} training windows cannot be shared by {world} ranks; use fewer ranks or "
            "more data"
        )
    workers = input_workers(tcfg.get("workers", "auto"), device)
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
            "input": {"workers": workers, "prefetch": int(tcfg.get("prefetch", 4)),
                      "pin_memory": device.type == "cuda", "compile": tcfg.get("compile", False)},
            "distributed": {
                "world_size": world, "batch_size_per_rank": batch_size,
                "global_batch_size": batch_size * world, "lr_scaling": tcfg.get("lr_scaling") or "none",
                "lr_scale": scale, "shards": "epoch permutation minus its last n % world windows, strided",
            },
        }
    )  # fmt: skip  # JSON types, so a resumed run compares equal to what it wrote
    progress = {"epoch": 0, "global_step": 0, "history": [], "config_changes": []}
    saved_precision = None
    if resuming:
        progress = _resume(run_dir, cfg, model, optimizer, metadata, write=rank == 0, lr_scale=scale,
                           rank=rank, world=world, device=device)  # fmt: skip
        saved_precision = progress.pop("saved_precision", None)
        latent_info = progress.pop("saved_latent_statistics", None)
    elif rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir / "config.yaml", cfg)
        stats.save(run_dir / "normalization.json")
    if latent_info is not None:  # how the statistics in the weights were estimated
        metadata["latent_statistics"] = latent_info
    start_epoch, global_step = progress["epoch"], progress["global_step"]
    if start_epoch < epochs:
        requested = tcfg.get("precision") or "auto"
        if resuming and saved_precision is None and requested == "auto":
            # A run from before measured precision continues under the rule it was trained with.
            saved_precision = {"requested": "auto", "chosen": "bf16" if device.type == "cuda" else "fp32",
                               "reason": "resumed a run made before measured precision: its rule kept "
                               "(bf16 autocast on CUDA, fp32 elsewhere)", "device": str(device)}  # fmt: skip
        metadata["precision"] = _training_precision(
            requested, model, train_set, tokens, device, saved_precision, rank, world
        )
    else:
        metadata["precision"] = saved_precision
    chosen = (metadata["precision"] or {}).get("chosen", "fp32")
    if world > 1 and not resuming:
        # Every rank built the same initial model (same seed); dropout/noise now differ per rank.
        torch.manual_seed(rank_seed(int(tcfg["seed"]), rank))
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    forward = ddp_model
    if tcfg.get("compile", False):
        backend = "inductor" if tcfg["compile"] is True else str(tcfg["compile"])
        forward = torch.compile(ddp_model, backend=backend)

    writer = _tensorboard(run_dir) if rank == 0 and start_epoch < epochs else None
    last_good = progress["history"][-1] if progress["history"] else None
    from tqdm.auto import tqdm

    plan = BatchPlan()
    loader = window_loader(
        train_set, plan, workers=workers, pin_memory=device.type == "cuda",
        prefetch_factor=int(tcfg.get("prefetch", 4)), persistent_workers=workers > 0,
    )  # fmt: skip
    reduce = _all_reduce if world > 1 else None
    for epoch in range(start_epoch, epochs):
        model.train()
        plan.set(epoch_batches(
            len(train_set), batch_size, int(tcfg["seed"]), epoch, rank, world,
            tcfg.get("max_steps_per_epoch"),
        ))  # fmt: skip
        first_step = global_step

        def describe(step: int, value: float, epoch=epoch, first=first_step, last=last_good) -> str:
            return (
                f"training loss became {value} at epoch {epoch + 1}, step {step + 1} (global step "
                f"{first + step + 1}). {_last_good_and_fix(run_dir, last, tcfg)}"
            )

        watch = FiniteWatch(FINITE_CHECK_EVERY, reduce=reduce, describe=describe, error=TrainingError)
        bar = tqdm(total=len(plan), desc=f"epoch {epoch + 1}/{epochs}",
                   disable=not cfg.get("progress", True) or rank)  # fmt: skip
        started, windows = time.perf_counter(), 0
        for batch in device_batches(loader, device):
            batch["visual"] = tokens(batch["visual"])
            windows += len(batch["visual"])
            with precision_context(chosen, device) if chosen != "fp32" else nullcontext():
                loss, _ = forward(batch)  # forward = loss; through DDP's wrapper so gradients sync
            optimizer.zero_grad(set_to_none=True)
            with precision_context(chosen, device) if chosen == "tf32" else nullcontext():
                loss.backward()  # (bf16 autocast covers the forward only, as torch advises)
            if tcfg.get("grad_clip"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(tcfg["grad_clip"]))
            optimizer.step()
            global_step += 1
            watch.add(loss)  # read back (one sync) every FINITE_CHECK_EVERY steps
            _log_steps(watch, writer, bar, first_step)
            bar.update(1)
        watch.check()
        _log_steps(watch, writer, bar, first_step)
        bar.close()
        seconds = time.perf_counter() - started
        # Global figures: windows summed over the ranks, in the slowest rank's time.
        windows = float(_all_reduce(torch.tensor([float(windows)]), "sum")[0])
        seconds = float(_all_reduce(torch.tensor([seconds]), "max")[0])
        difference = replica_difference(model) if world > 1 else None
        rng = _gather_rng(rank, world, device)
        if rank != 0:
            continue
        metrics = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(watch.values)) if watch.values else 0.0,  # global, all ranks
            "epoch_seconds": seconds,
            "train_windows_per_second": windows / max(seconds, 1e-9),
        }
        if difference is not None:
            metrics["replica_max_abs_difference"] = difference
        if val_set is not None:
            val = evaluate(model, val_set, tokens, batch_size, device, tcfg.get("val_batches"))
            metrics.update({f"val_{k}": v for k, v in val.items()})
            metrics.update(rollout_errors(model, rollout_set, tokens, horizon, device))
        problem = checkpoint_problem(model, metrics)
        if problem is not None:  # never saved: the last good checkpoint stays the one to resume from
            raise TrainingError(
                f"epoch {epoch + 1} (global step {global_step}) ended with {problem}; it was not saved. "
                f"{_last_good_and_fix(run_dir, last_good, tcfg)}"
            )
        for key, value in metrics.items():
            if key != "epoch" and writer is not None:
                writer.add_scalar(
                    key.replace("val_", "val/", 1) if key.startswith("val_") else f"epoch/{key}",
                    value,
                    epoch + 1,
                )
        progress["history"] = [h for h in progress["history"] if h.get("epoch", 0) < epoch + 1] + [metrics]
        progress.update(epoch=epoch + 1, global_step=global_step, world_size=world)
        _save(run_dir, cfg, model, optimizer, metadata, progress, rng)
        last_good = metrics
    if writer is not None:
        writer.close()
    if world > 1:
        torch.distributed.barrier()  # the job ends when rank 0 has saved, not when a rank runs out of work
    return run_dir


#: Losses are read back from the device (one host sync) once per this many steps, and at epoch end.
FINITE_CHECK_EVERY = 50
#: Reader processes per GPU for ``training.workers=auto`` on CUDA (capped by the CPU cores per rank).
CUDA_WORKERS = 4


def input_workers(setting, device: torch.device) -> int:
    """DataLoader workers for ``training.workers``: an integer as given; auto = 0 on CPU, where the
    readers compete with the model for the same cores (a 64 px, 2-epoch run on 2 cores: 1 and 2
    workers were slower than 0, with identical losses), and ``CUDA_WORKERS`` on CUDA, at most the CPU
    cores a rank has, less one for the training process."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    per_rank = (os.cpu_count() or 1) // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(0, min(CUDA_WORKERS, per_rank - 1))


def _log_steps(watch: FiniteWatch, writer, bar, first_step: int) -> None:
    """Log the losses read back since the last call (TensorBoard every 10th global step, the bar's last)."""
    logged = getattr(watch, "_logged", 0)
    if logged == len(watch.values):
        return
    for i in range(logged, len(watch.values)):
        step = first_step + i + 1
        if writer is not None and step % 10 == 0:
            writer.add_scalar("train/loss", watch.values[i], step)
    watch._logged = len(watch.values)
    bar.set_postfix(loss=f"{watch.values[-1]:.4f}")


def _training_precision(requested, model, train_set, tokens, device, saved, rank, world) -> dict:
    """``training.precision`` resolved with its evidence (``wmlab.precision.resolve_precision``).

    auto: a micro-benchmark of the model's shapes, then (for a faster precision) a probe: the losses
    of 2 x 8 fixed training windows under fp32 and the lower precision must rank the windows alike
    and agree within the tolerance. A resumed run keeps the choice it started with (so it continues
    bit for bit) unless ``training.precision`` itself changed. Rank 0 decides; the ranks share it."""
    if saved is not None and saved.get("requested") == requested:
        return saved
    info = None
    if rank == 0:
        if requested == "auto":
            ids = np.linspace(0, len(train_set) - 1, num=min(16, len(train_set))).astype(int)
            ids = ids[: len(ids) // 2 * 2] if len(ids) >= 4 else np.resize(ids, 4)
            windows = _batch_to(train_set.get_batch(ids), device)
            windows["visual"] = tokens(windows["visual"])

            @torch.no_grad()
            def probe(precision: str) -> torch.Tensor:
                was_training = model.training
                model.eval()  # no dropout: the probe is deterministic and draws no RNG
                try:
                    with precision_context(precision, device):
                        losses = [float(model.loss({k: v[i : i + 1] for k, v in windows.items()})[0])
                                  for i in range(len(ids))]  # fmt: skip
                finally:
                    model.train(was_training)
                return torch.tensor(losses).reshape(2, -1)  # (2 groups, K windows)

            info = resolve_precision("auto", device, shapes=block_shapes(model.cfg), probe=probe)
            info["probe"] = "per-window training loss of 2 x K fixed training windows at initialisation"
        else:
            info = resolve_precision(requested, device)
    if world > 1:
        shared = [info]
        torch.distributed.broadcast_object_list(shared, src=0)
        info = shared[0]
    return jsonable(info)


def checkpoint_problem(model: torch.nn.Module, metrics: dict) -> str | None:
    """Why this epoch's state is not a good checkpoint (non-finite train/validation loss, non-finite
    or diverged weights), or None if it is good."""
    bad = [k for k, v in metrics.items() if k.endswith("loss") and not math.isfinite(float(v))]
    if bad:
        return "non-finite " + ", ".join(f"{k}={metrics[k]}" for k in bad)
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            if not torch.isfinite(tensor).all():
                return f"non-finite weights in {name}"
            if tensor.abs().max() > MAX_ABS_WEIGHT:
                return f"diverged weights in {name} (|w| up to {float(tensor.abs().max()):.3g})"
    return None


def _last_good_and_fix(run_dir: Path, last_good: dict | None, tcfg: dict) -> str:
    lower = float(tcfg["predictor_lr"]) / 10
    if last_good is None:
        where, then = "none yet", "it starts over"
    else:
        epoch, loss = last_good["epoch"], last_good["train_loss"]
        where = f"{run_dir / RUN_CHECKPOINT} (epoch {epoch}, train_loss {loss:.4g})"
        then = f"it resumes from epoch {last_good['epoch']}"
    return (
        f"Last good checkpoint: {where}. Fix: re-run the same command with training.predictor_lr={lower:g} "
        "(a changed learning rate is applied on resume and recorded in metadata.json 'config_changes') "
        f"and/or training.grad_clip=1.0; {then}. If it persists, check the dataset for non-finite values."
    )


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but never let logging stop training
        return None
    return SummaryWriter(str(run_dir / "tb"))


LEGACY_CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "state.json")


def _forget_run(run_dir: Path) -> None:
    """resume=false on an existing run: remove its checkpoint and exports before starting over."""
    for path in (run_dir / RUN_CHECKPOINT, run_dir / "model.safetensors", run_dir / "metadata.json",
                 *(run_dir / "checkpoint" / name for name in LEGACY_CHECKPOINT_FILES)):  # fmt: skip
        path.unlink(missing_ok=True)


def _save(run_dir: Path, cfg: dict, model, optimizer, metadata: dict, progress: dict, rng=True) -> None:
    """Commit epoch ``progress["epoch"]`` as one checkpoint file, then export ``model.safetensors`` and
    ``metadata.json`` from it (tagged with its sha256; ``runs.sync_exports`` repairs a lagging one)."""
    record = {**metadata, **progress, "config": cfg}
    exports = {
        "weights": "../model.safetensors",
        "weights_metadata": {"epoch": progress["epoch"], "global_step": progress["global_step"]},
        "json": "../metadata.json",
    }
    ckpt = run_dir / RUN_CHECKPOINT
    commit_checkpoint(ckpt, model, optimizer, record, progress=progress["epoch"], exports=exports, rng=rng)
    for name in LEGACY_CHECKPOINT_FILES:  # superseded by the one-file checkpoint just committed
        (ckpt.parent / name).unlink(missing_ok=True)


def _resume(
    run_dir: Path,
    cfg: dict,
    model,
    optimizer,
    metadata: dict,
    write: bool,
    lr_scale: float = 1.0,
    rank: int = 0,
    world: int = 1,
    device=None,
) -> dict:
    """Load the run's checkpoint into model/optimizer/RNG; returns its progress (epoch, global_step,
    history, config_changes). Refuses another encoder, model, dataset or config; applies (and records)
    the settings of ``RESUME_APPLIED``, the optimizer ones over those saved in the checkpoint."""
    ckpt = run_dir / RUN_CHECKPOINT
    header = read_checkpoint(ckpt)
    if header is not None:
        if write:
            sync_exports(ckpt)  # a kill between commit and export left them behind: re-export
        state = saved = header["state"]
        saved_cfg = state.get("config") or read_config(run_dir / "config.yaml")
    else:  # the older layout: checkpoint/{model,optimizer}.safetensors + state.json
        saved, saved_cfg = read_json(run_dir / "metadata.json"), read_config(run_dir / "config.yaml")
        state = {**read_json(run_dir / "checkpoint" / "state.json"), "history": saved.get("history", [])}
    for key in ("encoder", "model"):
        if saved.get(key) != metadata[key]:
            raise TrainingError(
                f"{run_dir} was trained with a different {key}: "
                f"{'; '.join(key_differences(saved.get(key) or {}, metadata[key]))}; "
                "use another model_name, or resume=false to start over in this directory"
            )
    if saved.get("dataset", {}).get("fingerprint") != metadata["dataset"]["fingerprint"]:
        raise TrainingError(
            f"the dataset changed since {run_dir} was trained (fingerprint {saved['dataset']['fingerprint']} "
            f"vs {metadata['dataset']['fingerprint']}); use another model_name or resume=false"
        )
    applied, refused = config_changes(saved_cfg, cfg)
    if refused:
        raise TrainingError(
            f"{run_dir} was trained with a different config: {'; '.join(refused)}. Only "
            f"{', '.join(sorted(RESUME_APPLIED))} may change on resume; use another model_name, or "
            "resume=false to start over in this directory"
        )
    epoch, epochs = int(state["epoch"]), int(cfg["training"]["epochs"])
    effective = [line for line in applied if not line.startswith("training.epochs:")]
    if epoch >= epochs and effective:
        raise TrainingError(
            f"{run_dir} has finished (epoch {epoch} of {epochs}), so {'; '.join(effective)} would have no "
            f"effect. Raise training.epochs above {epoch} to train further with it, or use another "
            "model_name."
        )
    if header is not None:
        # Each rank continues its own streams; a rank the checkpoint has none for (the job grew) or a
        # job that was a single process before gets a fresh per-rank seed.
        rank_rng = (world == 1 or int(state.get("world_size", 1)) == world) and (
            rank == 0 or f"rng.rank{rank}.torch" in _tensor_names(ckpt)
        )
        streams = (True if rank == 0 else f"rank{rank}.") if rank_rng else False
        load_checkpoint(ckpt, model, optimizer, rng=streams, device=device)
        if not rank_rng:
            torch.manual_seed(rank_seed(int(cfg["training"]["seed"]) + epoch, rank))
    else:
        model.load_state_dict(load_tensors(run_dir / "checkpoint" / "model.safetensors"))
        opt_tensors = load_tensors(run_dir / "checkpoint" / "optimizer.safetensors")
        torch.set_rng_state(opt_tensors.pop("rng.torch"))
        optimizer_from_tensors(optimizer, opt_tensors, state["optimizer"])
    apply_optimizer_settings(optimizer, optimizer_settings(cfg["training"], lr_scale))
    changes = list(state.get("config_changes", []))
    if applied and epoch < epochs:
        changes.append({"epoch": epoch, "global_step": int(state["global_step"]), "changes": applied,
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})  # fmt: skip
        if write:
            write_config(run_dir / "config.yaml", cfg)
    return {
        "epoch": epoch,
        "global_step": int(state["global_step"]),
        "history": list(state.get("history", [])),
        "config_changes": changes,
        "saved_precision": saved.get("precision"),
        "saved_latent_statistics": saved.get("latent_statistics"),
    }


def _tensor_names(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())
