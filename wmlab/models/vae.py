"""V of the classic World Models agent (Ha & Schmidhuber 2018): a convolutional VAE on 64x64 RGB frames.

Architecture (paper numbers, ``channels=(32, 64, 128, 256)``)::

    x (B, 3, 64, 64) in [0, 1]
    -> 4 x [Conv 4x4 stride 2, no padding, ReLU]: 64 -> 31 -> 14 -> 6 -> 2 px, 32/64/128/256 channels
    -> flatten (B, 1024) -> Linear mu (B, Nz), Linear logvar (B, Nz)
    z (B, Nz) -> Linear (B, 1024) -> (B, 1024, 1, 1)
    -> deconvs 5, 5, 6, 6 (stride 2, ReLU; last sigmoid): 1 -> 5 -> 13 -> 30 -> 64 px, 128/64/32/3 channels

Loss per frame: squared error summed over pixels + KL(q(z|x) || N(0, I)) summed over z, clamped from below
at ``kl_tolerance * Nz`` (the free-bits trick of the reference code: the KL stops pulling once it is small).
Nz = 32 (CarRacing, 4,348,547 parameters) or 64 (Doom, 4,446,915 parameters).

``train_vae(data, out)`` trains it on a dataset's frames (any ``TrajectoryStore`` path: CarRacing, TakeCover
or PointMaze; frames of another size are resized to 64x64) and writes ``out/vae.safetensors`` and
``out/vae.json``;
``load_vae(out)`` rebuilds the model from those two files alone. ``make_encoder("vae", weights=out)`` serves
it as a V of the representation study (tokens = mu).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wmlab.integrity import NonFiniteError
from wmlab.runs import locked_run

FORMAT = "wmlab-worldmodels-vae"
FORMAT_VERSION = 1
WEIGHTS_FILE = "vae.safetensors"
CONFIG_FILE = "vae.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
IMAGE_SIZE = 64


@dataclass
class VAEConfig:
    """Architecture (recorded in vae.json; a resume must match it)."""

    z_dim: int = 32
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    kl_tolerance: float = 0.5

    def __post_init__(self) -> None:
        self.channels = [int(c) for c in self.channels]
        if len(self.channels) != 4 or min(self.channels) < 1:
            raise ValueError(f"VAE channels must be 4 positive widths, got {self.channels}")
        if self.z_dim < 1:
            raise ValueError(f"z_dim must be >= 1, got {self.z_dim}")


class ConvVAE(nn.Module):
    """The World Models conv VAE. ``encode`` -> (mu, logvar); ``decode`` -> images in [0, 1]."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c0, c1, c2, c3 = cfg.channels
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c0, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(c0, c1, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(c2, c3, 4, stride=2),
            nn.ReLU(),
        )
        flat = 4 * c3  # 2 x 2 x c3 after the 4th conv
        self.mu = nn.Linear(flat, cfg.z_dim)
        self.logvar = nn.Linear(flat, cfg.z_dim)
        self.expand = nn.Linear(cfg.z_dim, flat)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(flat, c2, 5, stride=2),
            nn.ReLU(),
            nn.ConvTranspose2d(c2, c1, 5, stride=2),
            nn.ReLU(),
            nn.ConvTranspose2d(c1, c0, 6, stride=2),
            nn.ReLU(),
            nn.ConvTranspose2d(c0, 3, 6, stride=2),
            nn.Sigmoid(),
        )

    @property
    def z_dim(self) -> int:
        return self.cfg.z_dim

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x float (B, 3, 64, 64) in [0, 1] -> mu (B, Nz), logvar (B, Nz)."""
        _, C, H, W = x.shape
        assert (C, H, W) == (3, IMAGE_SIZE, IMAGE_SIZE), (
            f"VAE input must be (B, 3, 64, 64), got {tuple(x.shape)}"
        )
        h = self.encoder(x).flatten(1)  # (B, 4 * c3)
        return self.mu(h), self.logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, Nz) -> images (B, 3, 64, 64) in [0, 1]."""
        h = self.expand(z)[:, :, None, None]  # (B, 4 * c3, 1, 1)
        return self.decoder(h)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, 3, 64, 64) -> reconstruction (B, 3, 64, 64), mu (B, Nz), logvar (B, Nz)."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean over the batch of (pixel-summed squared error + tolerance-clamped KL); x (B, 3, 64, 64)."""
        recon, mu, logvar = self(x)
        return vae_loss(x, recon, mu, logvar, self.cfg.kl_tolerance)


def vae_loss(x, recon, mu, logvar, kl_tolerance: float) -> tuple[torch.Tensor, dict[str, float]]:
    """x, recon (B, 3, H, W); mu, logvar (B, Nz). KL is clamped per frame at ``kl_tolerance * Nz``."""
    Nz = mu.shape[1]
    rec = (x - recon).pow(2).flatten(1).sum(1).mean()
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)  # (B,)
    kl_clamped = kl.clamp(min=kl_tolerance * Nz).mean()
    return rec + kl_clamped, {"recon": rec.item(), "kl": kl.mean().item()}


# ---------------------------------------------------------------------------------------------------
# Frames in, frames out


def frames_to_input(frames, device=None) -> torch.Tensor:
    """uint8 (B, H, W, 3) (numpy or torch) -> float (B, 3, 64, 64) in [0, 1], resized if needed."""
    from wmlab.encoders.base import resize, to_float_images

    x = to_float_images(frames)  # (B, 3, H, W)
    if device is not None:
        x = x.to(device)
    return resize(x, IMAGE_SIZE)


def load_vae(path, device: str | torch.device = "cpu") -> ConvVAE:
    """Rebuild a trained VAE from ``path/vae.json`` + ``path/vae.safetensors`` (``path`` may name either)."""
    from wmlab.runs import load_tensors, read_json

    path = Path(path).expanduser()
    if path.is_file() and path.name in (WEIGHTS_FILE, CONFIG_FILE):
        path = path.parent
    missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"VAE weights {path}: {', '.join(missing)} not found. Train one with "
            "`wmlab worldmodels train-vae` or wmlab.models.vae.train_vae(data=<dataset.zarr>, out=<dir>)."
        )
    meta = read_json(path / CONFIG_FILE)
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path / CONFIG_FILE} is not a wmlab World Models VAE (format {meta.get('format')!r})"
        )
    model = ConvVAE(VAEConfig(**meta["config"]))
    model.load_state_dict(load_tensors(path / WEIGHTS_FILE))
    return model.to(device).eval()


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


def _device(name) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def tensorboard(out: Path):
    """A SummaryWriter into ``out/tb``, or None when tensorboard is unusable (logging never stops a run)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tb"))


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
    dev = _device(device)
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
