"""Training wmlab's DINO-Tok reimplementation (``wmlab.encoders.dino_tok``): ``train_tokenizer`` learns the
projection + pixel decoder on a dataset's frames with DINOv2 frozen (``wmlab train-tokenizer``).

Files written into ``out/``: ``tokenizer.safetensors`` (projection + decoder), ``tokenizer.json`` (config,
DINOv2 weights source + sha256, step, loss history) and ``checkpoint.safetensors`` (weights + optimizer state,
for resuming); ``make_encoder("dino_tok", weights=out)`` loads them.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from wmlab.encoders.base import resize
from wmlab.encoders.dino_tok import (
    CELL,
    CHECKPOINT_FILE,
    CONFIG_FILE,
    DINO_PATCH,
    FORMAT,
    FORMAT_VERSION,
    PAPER,
    WEIGHTS_FILE,
    DinoFeatures,
    TokenizerConfig,
    TokenizerHead,
    frozen_dinov2,
)
from wmlab.integrity import NonFiniteError
from wmlab.runs import locked_run
from wmlab.training.common import training_device


@locked_run("out", "tokenizer training run")  # a second writer of out/ is refused
def train_tokenizer(
    data,
    out,
    *,
    dinov2_weights=None,
    dinov2_size: str = "small",
    latent_dim: int = 32,
    steps: int = 20000,
    batch_size: int = 64,
    lr: float = 3e-4,
    input_size: int = 224,
    shallow_layer: int | None = None,
    deep_layer: int = -1,
    proj_hidden: int = 512,
    decoder_channel: int = 128,
    save_every: int = 1000,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    episodes=None,
) -> Path:
    """Train the DINO-Tok reimplementation's projection + pixel decoder on a dataset's frames.

    Args:
        data: a ``TrajectoryStore`` or its path. Frames come from the training episodes (``episodes``),
            uniformly over (episode, step); the other committed episodes give a fixed validation batch.
        out: output directory (created); if it holds a checkpoint of the same config and episodes, training
            resumes from its last saved step (bit-identical batches: the batch of step t depends on
            (seed, t) only); one of another config or other episodes is refused.
        dinov2_weights / dinov2_size: the frozen DINOv2 (None = ``facebook/dinov2-<size>``).
        latent_dim, input_size, shallow_layer (None = depth // 3), deep_layer, proj_hidden, decoder_channel:
            architecture (``TokenizerConfig``). input_size must be a multiple of 16.
        steps: total optimisation steps (a resume continues up to this number).
        batch_size, lr: Adam on frame-MSE in [-1, 1] pixel space.
        save_every: steps between saves (and validation); the last step always saves.
        episodes: the training episode ids (a study passes its world models' training episodes, so no
            validation episode is seen); None = the DINO-WM split's training episodes (90%, seed 42).
            Recorded in ``tokenizer.json`` (``data.episodes``).
    Returns:
        ``out`` (pass it as ``make_encoder("dino_tok", weights=out)``).
    """
    from tqdm.auto import tqdm

    from wmlab.data.store import TrajectoryStore
    from wmlab.data.windows import split_episodes
    from wmlab.runs import (
        ResumeMismatch,
        load_training_checkpoint,
        resumable_run,
        save_training_checkpoint,
        versions,
    )

    if input_size % CELL:
        raise ValueError(
            f"input_size must be a multiple of {CELL} (one latent cell per 16 px), got {input_size}"
        )
    if steps < 1 or batch_size < 1 or save_every < 1:
        raise ValueError("steps, batch_size and save_every must be >= 1")
    store = data if isinstance(data, TrajectoryStore) else TrajectoryStore(data)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = training_device(device)

    grid = input_size // CELL
    backbone = frozen_dinov2(dinov2_weights, dinov2_size, grid * DINO_PATCH)
    depth = int(backbone.model.config.num_hidden_layers)
    cfg = TokenizerConfig(
        latent_dim=latent_dim, input_size=input_size,
        shallow_layer=max(1, depth // 3) if shallow_layer is None else int(shallow_layer),
        deep_layer=int(deep_layer), proj_hidden=proj_hidden, decoder_channel=decoder_channel,
    )  # fmt: skip
    features = DinoFeatures(backbone, cfg).to(dev)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        head = TokenizerHead(cfg, features.dim).to(dev)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    dino_meta = {
        "weights": backbone.info.weights, "sha256": backbone.info.weights_sha256, "size": dinov2_size,
        "hidden_size": features.dim, "depth": depth, "num_registers": features.num_prefix - 1,
    }  # fmt: skip

    committed = store.committed
    if len(committed) == 0:
        raise ValueError(f"dataset {store.path} has no committed episodes")
    if episodes is None:  # the DINO-WM split, as before
        train_ids, val_ids = split_episodes(committed)
        if len(train_ids) == 0:
            train_ids = committed
    else:
        keep = {int(e) for e in episodes}
        unknown = sorted(keep - {int(e) for e in committed})
        if not keep or unknown:
            raise ValueError(
                f"episodes must be committed episodes of {store.path}: "
                + (f"not committed: {unknown[:10]}" if unknown else "got none")
            )
        train_ids = np.asarray(sorted(keep), dtype=np.int64)
        val_ids = np.asarray([int(e) for e in committed if int(e) not in keep], dtype=np.int64)
    if len(val_ids) == 0:
        val_ids = train_ids
    # What it trains on, recorded; given episodes must match on resume (the DINO-WM split: as before).
    trained_on, given = sorted(int(e) for e in train_ids), episodes is not None
    lengths = store.lengths

    def batch(ids: np.ndarray, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """-> DINOv2 inputs (n, 3, s, s), targets (n, 3, S, S) in [-1, 1]."""
        episodes = rng.choice(ids, size=n)
        times = (rng.random(n) * lengths[episodes]).astype(np.int64)
        frames = np.stack(
            [store.frames(int(e), [int(t)])[0] for e, t in zip(episodes, times)]
        )  # (n, H, W, 3)
        x = torch.as_tensor(frames).to(dev).permute(0, 3, 1, 2).float().div_(255.0)  # (n, 3, H, W)
        return features.preprocess(x), resize(x, input_size).mul(2).sub(1)

    step, history, seconds = 0, [], 0.0
    meta_path, ckpt_path = out / CONFIG_FILE, out / CHECKPOINT_FILE
    meta = resumable_run(meta_path, ckpt_path, asdict(cfg), "a tokenizer")
    if meta is not None:
        if meta["dinov2"]["sha256"] != dino_meta["sha256"]:
            raise ValueError(f"{out} was trained on other DINOv2 weights ({meta['dinov2']['weights']})")
        saved = meta.get("data") or {}
        was_given = bool(saved.get("episodes_given"))  # False for a run of before episodes=
        if (given or was_given) and (given, trained_on) != (was_given, saved.get("episodes")):
            was, now = (
                f"{len(ids)} given episodes" if g else "the DINO-WM split"
                for g, ids in ((was_given, saved.get("episodes") or []), (given, trained_on))
            )
            raise ResumeMismatch(
                f"{out} holds a tokenizer trained on other episodes ({was}, now {now}); "
                "use another out= or delete the directory to start over"
            )
        load_training_checkpoint(ckpt_path, head, optimizer, meta["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        from safetensors import safe_open

        # One-file checkpoints hold their state (meta is it); an older-layout one names its own step.
        with safe_open(str(ckpt_path), "pt") as f:
            step = int((f.metadata() or {}).get("step", meta["step"]))
        history = [h for h in meta.get("history", []) if h["step"] <= step]
        seconds = float(meta.get("seconds", 0.0))

    val_x, val_y = batch(val_ids, min(64, 4 * batch_size), np.random.default_rng(12345))

    def validate() -> float:
        head.eval()
        with torch.no_grad():
            return F.mse_loss(head.decode(head.project(features(val_x))), val_y).item()

    if step == 0:
        history = [{"step": 0, "val_mse": validate()}]  # the untrained baseline
    bar = tqdm(total=steps, initial=min(step, steps), desc="train-tokenizer", disable=not progress)
    started = time.perf_counter()
    while step < steps:
        head.train()
        x, target = batch(train_ids, batch_size, np.random.default_rng([seed, step]))
        recon = head.decode(head.project(features(x)))  # (B, 3, S, S)
        loss = F.mse_loss(recon, target)
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"tokenizer loss became {loss.item()} at step {step + 1}; lower lr and re-run"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % save_every == 0 or step == steps:
            history.append({"step": step, "train_mse": loss.item(), "val_mse": validate()})
            # One atomic file: weights + Adam state + this JSON; tokenizer.safetensors and tokenizer.json
            # are exports written after it commits, tagged with it (runs.commit_checkpoint).
            save_training_checkpoint(ckpt_path, head, optimizer, progress=step, exports={
                "weights": WEIGHTS_FILE, "weights_metadata": {"step": step, "format": FORMAT},
                "json": CONFIG_FILE,
            }, state={
                "format": FORMAT, "format_version": FORMAT_VERSION, "reimplementation_of": PAPER,
                "differs_from_paper": ["continuous AE only: no VQ / Dominant-Subspace Quantization",
                                       "DINO version, layers, fusion and channel count chosen by wmlab",
                                       "own pixel decoder and MSE loss", "trained in-domain only"],
                "config": asdict(cfg), "dinov2": dino_meta, "step": step, "steps": steps,
                "batch_size": batch_size, "lr": lr, "seed": seed,
                "data": {"path": str(store.path), "train_episodes": len(train_ids),
                         "val_episodes": len(val_ids), "episodes": trained_on, "episodes_given": given},
                "history": history, "seconds": seconds + time.perf_counter() - started,
                "versions": versions(),
            })  # fmt: skip
    bar.close()
    return out
