"""Training V of the classic World Models agent: ``train_vae`` (the conv VAE of ``wmlab.models.vae`` on a
dataset's frames) and ``encode_store`` (V applied once to a dataset: the posteriors M trains on).

``train_vae(data, out)`` trains on any ``TrajectoryStore`` path (CarRacing, TakeCover or PointMaze; frames of
another size are resized to 64x64) or a uint8 array, and writes ``out/vae.safetensors`` and ``out/vae.json``;
``wmlab.models.vae.load_vae(out)`` rebuilds the model from those two files alone.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from wmlab.integrity import NonFiniteError
from wmlab.models.vae import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    ConvVAE,
    VAEConfig,
    frames_to_input,
)
from wmlab.runs import locked_run
from wmlab.training.common import tensorboard, training_device

# ---------------------------------------------------------------------------------------------------
# Training data: frames from one or more trajectory stores, or an in-memory array


class FramePool:
    """Uniform random frames over every committed step of one or more stores (or a uint8 array)."""

    def __init__(self, data, episodes=None) -> None:
        """``episodes``: the episode ids to draw frames from (default: every committed one); a study
        holds its validation episodes out so the diagnostics' probe scores frames no VAE saw."""
        from wmlab.data.store import TrajectoryStore

        sources = data if isinstance(data, list | tuple) else [data]
        self.stores, self.array = [], None
        if len(sources) == 1 and isinstance(sources[0], np.ndarray | torch.Tensor):
            array = np.asarray(sources[0])
            if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
                raise ValueError(f"frames must be uint8 (N, H, W, 3), got {array.dtype} {array.shape}")
            self.array = array
            self.size = len(array)
            self.describe = f"array {array.shape}"
        else:
            for source in sources:
                store = source if isinstance(source, TrajectoryStore) else TrajectoryStore(source)
                self.stores.append(store)
            # (store index, episode, length) for every committed episode, for uniform-frame sampling
            keep = None if episodes is None else {int(e) for e in episodes}
            rows = [(s, int(e), int(st.lengths[e])) for s, st in enumerate(self.stores) for e in st.committed
                    if keep is None or int(e) in keep]  # fmt: skip
            if not rows:
                raise ValueError(f"no committed episodes in {[str(s.path) for s in self.stores]}")
            self.rows = np.asarray(rows, dtype=np.int64)  # (n_episodes, 3)
            self.cum = np.cumsum(self.rows[:, 2])  # frames up to and including each episode
            self.size = int(self.cum[-1])
            self.describe = ", ".join(str(s.path) for s in self.stores)
        if self.size == 0:
            raise ValueError("no frames to train on")

    def read(self, flat_index: np.ndarray) -> np.ndarray:
        """Global frame indices (n,) -> uint8 (n, H, W, 3), read one episode at a time."""
        if self.array is not None:
            return self.array[flat_index]
        flat_index = np.asarray(flat_index, dtype=np.int64)
        rows = np.searchsorted(self.cum, flat_index, side="right")  # (n,) episode row of each frame
        starts = self.cum[rows] - self.rows[rows, 2]
        out = [None] * len(flat_index)
        for row in np.unique(rows):
            pick = np.flatnonzero(rows == row)
            s, e, _ = self.rows[row]
            frames = self.stores[s].frames(int(e), flat_index[pick] - starts[pick])
            for j, k in enumerate(pick):
                out[k] = frames[j]
        return np.stack(out)


@locked_run("out", "VAE training run")  # a second writer of out/ is refused with who holds it
def train_vae(
    data,
    out,
    *,
    z_dim: int = 32,
    channels=(32, 64, 128, 256),
    kl_tolerance: float = 0.5,
    epochs: float = 10,
    steps: int | None = None,
    batch_size: int = 100,
    lr: float = 1e-4,
    save_every: int = 500,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    episodes=None,
) -> Path:
    """Train the conv VAE on frames; resumable (a re-run continues from the last saved step).

    Args:
        data: a ``TrajectoryStore`` path (or store), a list of them (all their frames are pooled), or a
            uint8 array (N, H, W, 3). Frames of any size are resized to 64x64 (bilinear, antialiased).
        out: output directory: ``vae.safetensors``, ``vae.json`` (config, history), ``checkpoint.safetensors``
            (weights + Adam state), ``tb/``. Re-running with the same config resumes.
        z_dim, channels, kl_tolerance: architecture and loss (``VAEConfig``).
        epochs: passes over all frames (the paper: 1, the reference code: 10); ``steps`` overrides it.
        batch_size, lr: Adam (paper: 100, 1e-4).
        save_every: steps between checkpoints; the last step always saves.
        episodes: train on these episode ids only (a store's; default all committed episodes).
    Returns:
        ``out``, loadable with ``load_vae(out)`` or ``make_encoder("vae", weights=out)``.
    """
    from tqdm.auto import tqdm

    from wmlab.runs import (
        apply_optimizer_settings,
        load_training_checkpoint,
        resumable_run,
        save_training_checkpoint,
        versions,
    )

    cfg = VAEConfig(z_dim=int(z_dim), channels=list(channels), kl_tolerance=float(kl_tolerance))
    if batch_size < 1 or save_every < 1:
        raise ValueError(f"batch_size and save_every must be >= 1, got {batch_size}, {save_every}")
    pool = FramePool(data, episodes)
    total = int(steps) if steps is not None else max(1, math.ceil(float(epochs) * pool.size / batch_size))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = training_device(device)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = ConvVAE(cfg).to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    step, history, seconds, lr_changes = 0, [], 0.0, []
    meta_path, ckpt_path = out / CONFIG_FILE, out / CHECKPOINT_FILE
    meta = resumable_run(meta_path, ckpt_path, asdict(cfg), "a VAE")
    if meta is not None:
        load_training_checkpoint(ckpt_path, model, optimizer, meta["optimizer"])
        step, history, seconds = int(meta["step"]), meta.get("history", []), float(meta.get("seconds", 0))
        # The lr asked for now wins over the one saved (lowering it is the fix for a NaN); recorded.
        changed = apply_optimizer_settings(optimizer, [{"lr": lr}])
        lr_changes = meta.get("lr_changes", []) + ([{"step": step, "changes": changed}] if changed else [])

    val_idx = np.random.default_rng(12345).choice(pool.size, size=min(64, pool.size), replace=False)
    val_x = frames_to_input(pool.read(np.sort(val_idx)), dev)

    def validate() -> float:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            loss, _ = model.loss(val_x)
        return loss.item()

    writer = tensorboard(out)
    bar = tqdm(total=total, initial=min(step, total), desc="train-vae", disable=not progress)
    started = time.perf_counter()
    images = 0
    while step < total:
        model.train()
        # The batch of step t depends on (seed, t) only, so a resumed run sees the batches it would have.
        rng = np.random.default_rng([seed, step])
        idx = np.sort(rng.integers(0, pool.size, size=batch_size))
        x = frames_to_input(pool.read(idx), dev)  # (B, 3, 64, 64)
        torch.manual_seed(int(rng.integers(2**31)))
        loss, parts = model.loss(x)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"VAE loss became {loss.item()} at step {step + 1}; lower lr= and re-run")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        images += len(idx)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.1f}", kl=f"{parts['kl']:.1f}")
        if writer is not None:
            writer.add_scalar("vae/loss", loss.item(), step)
            writer.add_scalar("vae/recon", parts["recon"], step)
            writer.add_scalar("vae/kl", parts["kl"], step)
        if step % save_every == 0 or step == total:
            history.append({"step": step, "train_loss": loss.item(), **parts, "val_loss": validate()})
            elapsed = time.perf_counter() - started
            # One atomic file: weights + Adam state + this JSON; the weights and JSON exports are
            # written after it commits, tagged with it (runs.commit_checkpoint).
            save_training_checkpoint(
                ckpt_path, model, optimizer, progress=step,
                exports={"weights": WEIGHTS_FILE, "weights_metadata": {"step": step, "format": FORMAT},
                         "json": CONFIG_FILE},
                state={
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "config": asdict(cfg),
                    "step": step,
                    "steps": total,
                    "batch_size": batch_size,
                    "lr": lr,
                    "lr_changes": lr_changes,
                    "seed": seed,
                    "data": {"source": pool.describe, "frames": pool.size},
                    "images_per_second": round(images / elapsed, 1) if elapsed > 0 else None,
                    "history": history,
                    "seconds": seconds + elapsed,
                    "versions": versions(),
                },
            )  # fmt: skip
    bar.close()
    if writer is not None:
        writer.close()
    return out


# ---------------------------------------------------------------------------------------------------
# Encoding a dataset once: mu and logvar of every frame, for training M


@torch.no_grad()
def encode_store(vae: ConvVAE, store, batch_size: int = 256, progress: bool = True) -> dict[int, tuple]:
    """Every committed episode's frames -> {episode: (mu, logvar)}, each float32 (L, Nz).

    Per episode, not padded: a padded (E, T_max, Nz) array of 10,000 TakeCover episodes would be ~5 GB.
    ``store``: a ``TrajectoryStore`` or its path.
    """
    from tqdm.auto import tqdm

    from wmlab.data.store import TrajectoryStore

    store = store if isinstance(store, TrajectoryStore) else TrajectoryStore(store)
    device = next(vae.parameters()).device
    out = {}
    for e in tqdm(store.committed, desc=f"encode {store.path.name}", disable=not progress):
        frames = store.frames(int(e))  # (L, H, W, 3)
        parts = [
            vae.encode(frames_to_input(frames[i : i + batch_size], device))
            for i in range(0, len(frames), batch_size)
        ]
        mu = torch.cat([m for m, _ in parts]).cpu().numpy()  # (L, Nz)
        logvar = torch.cat([lv for _, lv in parts]).cpu().numpy()
        out[int(e)] = (mu, logvar)
    return out
