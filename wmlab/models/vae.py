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

``wmlab.training.vae.train_vae(data, out)`` trains it on a dataset's frames (any ``TrajectoryStore`` path:
CarRacing, TakeCover or PointMaze; frames of another size are resized to 64x64) and writes
``out/vae.safetensors`` and ``out/vae.json``;
``load_vae(out)`` rebuilds the model from those two files alone. ``make_encoder("vae", weights=out)`` serves
it as a V of the representation study (tokens = mu).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

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
            "`wmlab worldmodels train-vae` or wmlab.training.vae.train_vae(data=<dataset.zarr>, out=<dir>)."
        )
    meta = read_json(path / CONFIG_FILE)
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path / CONFIG_FILE} is not a wmlab World Models VAE (format {meta.get('format')!r})"
        )
    model = ConvVAE(VAEConfig(**meta["config"]))
    model.load_state_dict(load_tensors(path / WEIGHTS_FILE))
    return model.to(device).eval()
