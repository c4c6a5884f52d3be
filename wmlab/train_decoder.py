"""Train the optional pixel decoder of a run, on frozen visual tokens, as a stage of its own.

DINO-WM trains its VQ-VAE decoder jointly with the predictor; measured on CPU that decoder is
about 70% of each training step, although it never feeds gradients into the predictor (it sees
detached latents). So here it is a separate, optional stage on the same tokens (cached when the
run's feature cache exists), and the world model trains without paying for it.

The decoder upsamples the token grid 16x (14x14 -> 224 px for DINOv2 at 196 px); target frames
are resized to that size and scaled to [-1, 1] as DINO-WM does.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from wmlab.data.store import TrajectoryStore
from wmlab.data.windows import split_episodes
from wmlab.integrity import UserError, WriterLock
from wmlab.models.decoder import DecoderConfig, LatentDecoder
from wmlab.runs import (
    RUN_WHAT,
    apply_optimizer_settings,
    build_encoder,
    checkpoint_weights,
    ensure_exports,
    find_feature_cache,
    load_tensors,
    load_training_checkpoint,
    read_config,
    read_json,
    resolve_device,
    resumable_run,
    save_training_checkpoint,
)
from wmlab.train import TrainingError

CHECKPOINT_FILE = "decoder_checkpoint.safetensors"  # one file: weights + Adam state + decoder.json's state


def _frames_to_targets(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, size, size) in [-1, 1]."""
    x = frames.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (B, 3, H, W)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def decode_latents(decode, world_model, visual: torch.Tensor) -> torch.Tensor:
    """World-model latents -> pixels: ``visual`` (..., N, D) in the model's latent units (a rollout's
    ``"visual"``) is brought to encoder token units (``world_model.raw_visual``: a decoder reads the
    encoder's tokens, not the standardised latents), then ``decode`` maps tokens (M, N, D) to images
    (M, 3, s, s) in [-1, 1]. Returns (..., 3, s, s) in [-1, 1]."""
    lead, (N, D) = visual.shape[:-2], visual.shape[-2:]
    images = decode(world_model.raw_visual(visual).reshape(-1, N, D))  # (M, 3, s, s)
    return images.reshape(*lead, *images.shape[1:])


def tile_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """Rows of K images each, (K, 3, s, s) in [-1, 1], stacked top to bottom -> uint8 (3, R*s, K*s)."""
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)  # (3, R*s, K*s)
    return ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().cpu()


def train_decoder(
    run_dir: str | Path,
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 3e-4,
    channel: int = 128,
    n_res_block: int = 2,
    n_res_channel: int = 32,
    save_every: int = 200,
    device: str = "auto",
    progress: bool = True,
    seed: int = 0,
) -> Path:
    """Train ``<run>/decoder.safetensors`` from the run's encoder tokens; resumes from the last save.

    Returns the path of the decoder weights. Metrics (reconstruction MSE on held-out frames) go to
    ``<run>/decoder.json``. The run directory is locked while the decoder trains (a second writer,
    ``train`` or ``train-decoder``, is refused with who holds it); values that cannot train are
    refused before anything is written.
    """
    sizes = {
        "steps": (steps, 1),
        "batch_size": (batch_size, 1),
        "save_every": (save_every, 1),
        "channel": (channel, 1),
        "n_res_block": (n_res_block, 0),
        "n_res_channel": (n_res_channel, 1),
    }
    for name, (value, low) in sizes.items():  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"train-decoder {name}={value!r} is not valid: it must be an integer >= {low}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise UserError(f"train-decoder lr={lr!r} is not valid: it must be a finite number > 0")
    with WriterLock(Path(run_dir), RUN_WHAT):
        return _train_decoder(run_dir, steps, batch_size, lr, channel, n_res_block, n_res_channel, save_every,
                              device, progress, seed)  # fmt: skip


def _train_decoder(
    run_dir, steps, batch_size, lr, channel, n_res_block, n_res_channel, save_every, device, progress, seed
) -> Path:
    run_dir = Path(run_dir)
    cfg = read_config(run_dir / "config.yaml")
    dev = resolve_device(device)
    store = TrajectoryStore(cfg["data"])
    encoder = build_encoder(dict(cfg["encoder"]), dev)
    if encoder.info.grid is None:
        raise ValueError(f"encoder {encoder.info.name} has no patch grid; the pixel decoder needs one")
    cache = find_feature_cache(store, encoder)
    h, w = encoder.info.grid
    if h != w:
        raise ValueError(f"the decoder needs a square token grid, encoder {encoder.info.name} has {h}x{w}")
    size = 16 * h
    dcfg = DecoderConfig(latent_dim=encoder.info.dim, channel=channel, n_res_block=n_res_block,
                         n_res_channel=n_res_channel)  # fmt: skip
    decoder = LatentDecoder(dcfg).to(dev)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
    train_ids, val_ids = split_episodes(store.committed, float(cfg["split_ratio"]), int(cfg["split_seed"]))
    lengths = store.lengths
    state_path, ckpt_path = run_dir / "decoder.json", run_dir / CHECKPOINT_FILE
    step, history = 0, []
    state = resumable_run(state_path, ckpt_path, dcfg.__dict__, "a decoder")
    if state is not None:
        load_training_checkpoint(ckpt_path, decoder, optimizer, state["optimizer"])
        step, history = int(state["step"]), list(state.get("history", []))
    lr_changes = list((state or {}).get("lr_changes", []))
    changed = apply_optimizer_settings(optimizer, [{"lr": float(lr)}])  # the lr asked for now wins
    if changed and state is not None:
        lr_changes.append({"step": step, "changes": changed})

    def sample(ids: np.ndarray, n: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
        episodes = generator.choice(ids, size=n)
        times = (generator.random(n) * lengths[episodes]).astype(int)
        frames = np.stack(
            [store.frames(int(e), [int(t)])[0] for e, t in zip(episodes, times)]
        )  # (n, H, W, 3)
        if cache is not None:
            tokens = np.stack([cache.read(int(e), np.array([t]))[0] for e, t in zip(episodes, times)])
            tokens = torch.as_tensor(tokens).float().to(dev)  # (n, N, D)
        else:
            with torch.no_grad():
                tokens = encoder.encode(torch.as_tensor(frames).to(dev)).float()  # (n, N, D)
        return tokens, _frames_to_targets(torch.as_tensor(frames).to(dev), size)

    from tqdm.auto import tqdm

    val_rng = np.random.default_rng(12345)
    val_batch = sample(val_ids if len(val_ids) else train_ids, min(64, 4 * batch_size), val_rng)
    bar = tqdm(total=steps, initial=step, desc="decoder", disable=not progress)
    started = time.perf_counter()
    while step < steps:
        decoder.train()
        # The batch of step t depends on (seed, t) only, so a resumed run sees the batches it would have.
        tokens, targets = sample(train_ids, batch_size, np.random.default_rng([seed, step]))
        loss = F.mse_loss(decoder(tokens), targets)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"decoder loss became {loss.item()} at step {step + 1}. {_last_good(run_dir, history, lr)}"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % save_every == 0 or step == steps:
            decoder.eval()
            with torch.no_grad():
                val_mse = F.mse_loss(decoder(val_batch[0]), val_batch[1]).item()
            bad = [
                n for n, t in decoder.state_dict().items() if t.is_floating_point() and not t.isfinite().all()
            ]
            if not (math.isfinite(loss.item()) and math.isfinite(val_mse)) or bad:
                raise TrainingError(
                    f"decoder step {step}: validation MSE {val_mse}, non-finite weights in "
                    f"{bad[:3] or 'none'}; not saved. {_last_good(run_dir, history, lr)}"
                )
            history.append({"step": step, "train_mse": loss.item(), "val_mse": val_mse})
            # One atomic file: weights + Adam + decoder.json's state; decoder.safetensors and decoder.json
            # are exports written after it commits, tagged with it (runs.commit_checkpoint).
            save_training_checkpoint(
                ckpt_path, decoder, optimizer, progress=step,
                exports={"weights": "decoder.safetensors", "weights_metadata": {"step": step},
                         "json": "decoder.json"},
                state={"config": dcfg.__dict__, "step": step, "output_size": size, "history": history,
                       "lr": lr, "lr_changes": lr_changes, "seconds": time.perf_counter() - started},
            )  # fmt: skip
    bar.close()
    decoder.eval()
    log_decoded_rollout(run_dir, decoder, store, cache, encoder, dev, step, size)
    return run_dir / "decoder.safetensors"


@torch.no_grad()
def log_decoded_rollout(run_dir: Path, decoder, store, cache, encoder, dev, step: int, size: int, n: int = 4):
    """What the model imagines: an open-loop rollout of ``n`` validation windows decoded to pixels,
    beside the real frames (rows: real, imagined per window), to TensorBoard ``rollout/decoded``
    and ``<run>/decoded_rollout.png``."""
    import imageio.v3 as iio

    from wmlab.data.normalization import NormalizationStats
    from wmlab.data.windows import WindowDataset, WindowSpec
    from wmlab.runs import load_run
    from wmlab.train import _tensorboard

    model, cfg = load_run(run_dir, device=dev)
    stats = NormalizationStats.load(run_dir / "normalization.json")
    H, horizon = model.cfg.num_hist, int(cfg["training"].get("rollout_eval_steps", 5) or 5)
    spec = WindowSpec(num_hist=H, num_pred=horizon, frameskip=int(cfg["frameskip"]))
    _, val_ids = split_episodes(store.committed, float(cfg["split_ratio"]), int(cfg["split_seed"]))
    try:
        windows = WindowDataset(
            store, val_ids if len(val_ids) else store.committed, spec, stats, None, drop_short=True
        )
    except ValueError:
        return  # episodes too short for a rollout window: nothing to show
    ids = np.linspace(0, len(windows) - 1, num=min(n, len(windows))).astype(int)
    batch = windows.get_batch(ids)
    frames = torch.as_tensor(batch["visual"]).to(dev)  # (n, H+K, Hpx, Wpx, 3) uint8
    B, F_ = frames.shape[:2]
    tokens = encoder.encode(frames.reshape(B * F_, *frames.shape[2:])).float()  # (n*(H+K), N, D)
    tokens = tokens.reshape(B, F_, *tokens.shape[1:])  # (n, H+K, N, D)
    proprio = torch.as_tensor(batch["proprio"]).to(dev)
    actions = torch.as_tensor(batch["actions"]).to(dev)
    out = model.rollout(tokens[:, :H], proprio[:, :H], actions[:, : H + horizon - 1])
    imagined = decode_latents(decoder, model, out["visual"][:, H:])  # (n, K, 3, s, s)
    real = _frames_to_targets(frames[:, H:].reshape(B * horizon, *frames.shape[2:]), size)
    real = real.reshape(B, horizon, *real.shape[1:])  # (n, K, 3, s, s)
    grid = tile_rows([row for b in range(B) for row in (real[b], imagined[b])])  # (3, 2n*s, K*s)
    iio.imwrite(run_dir / "decoded_rollout.png", grid.permute(1, 2, 0).numpy())
    writer = _tensorboard(run_dir)
    if writer is not None:
        writer.add_image("rollout/decoded", grid, step)
        writer.close()


def _last_good(run_dir: Path, history: list, lr: float) -> str:
    where = f"{run_dir / CHECKPOINT_FILE} (step {history[-1]['step']})" if history else "none yet"
    return (
        f"Last good checkpoint: {where}. Fix: re-run with a lower lr, e.g. lr={lr / 10:g} (a changed lr is "
        "applied on resume and recorded in decoder.json 'lr_changes'); it resumes from that checkpoint."
    )


def load_decoder(run_dir: str | Path, device="cpu") -> LatentDecoder:
    """The run's trained decoder (eval mode); an export that lags its checkpoint is re-exported first."""
    run_dir = Path(run_dir)
    weights = None
    if (run_dir / CHECKPOINT_FILE).is_file():  # repair an export that lags; refuse one that disagrees
        if ensure_exports(run_dir / CHECKPOINT_FILE, run_dir, RUN_WHAT) == "lags":
            weights = checkpoint_weights(run_dir / CHECKPOINT_FILE)  # unrepairable now: the newest committed
    state = read_json(run_dir / "decoder.json")
    decoder = LatentDecoder(DecoderConfig(**state["config"]))
    decoder.load_state_dict(weights if weights is not None else load_tensors(run_dir / "decoder.safetensors"))
    return decoder.to(device).eval()
