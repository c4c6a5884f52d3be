"""``vae``: the World Models conv VAE (Ha & Schmidhuber 2018) trained from scratch in-domain, as a V.

Tokens are the posterior mean: (B, 1, Nz), Nz = 32 or 64. Frames are resized to 64x64 (the VAE's only input
size) and kept in [0, 1] (no normalisation, as the VAE was trained). Weights: the directory written by
``wmlab worldmodels train-vae`` or ``wmlab.training.vae.train_vae(data=<dataset.zarr>, out=<dir>)``
(vae.json + vae.safetensors); PointMaze datasets work too (their frames are resized to 64x64).
"""

from __future__ import annotations

from pathlib import Path

import torch

from wmlab.encoders.base import Encoder, EncoderInfo, resize
from wmlab.encoders.weights import freeze, weights_sha256

MISSING_WEIGHTS = (
    "vae needs weights=<directory written by train_vae>: run `wmlab worldmodels train-vae` or "
    "wmlab.training.vae.train_vae(data=<dataset.zarr>, out=<dir>), then pass encoder.weights=<dir>."
)


class VAEEncoder(Encoder):
    """A trained ConvVAE's encoder -> mu as one token (B, 1, Nz)."""

    def __init__(self, vae, *, name: str, weights: str, sha256: str, meta: dict) -> None:
        super().__init__()
        from wmlab.models.vae import IMAGE_SIZE

        self.vae = freeze(vae)
        self.info = EncoderInfo(
            name=name,
            num_tokens=1,
            dim=vae.z_dim,
            grid=None,
            input_size=IMAGE_SIZE,
            frozen=True,
            weights=weights,
            weights_sha256=sha256,
            extra={
                "config": meta["config"],
                "step": meta.get("step"),
                "paper": "World Models (arXiv 1803.10122)",
            },
        )

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """float (B, 3, H, W) in [0, 1] -> (B, 3, 64, 64) in [0, 1]."""
        return resize(images, self.info.input_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 64, 64) -> mu (B, 1, Nz)."""
        mu, _ = self.vae.encode(x)
        return mu[:, None, :]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, 1, Nz) -> reconstructions (B, 3, 64, 64) in [0, 1]."""
        _, N, D = tokens.shape
        assert (N, D) == (1, self.info.dim), (
            f"vae tokens must be (B, 1, {self.info.dim}), got {tuple(tokens.shape)}"
        )
        return self.vae.decode(tokens[:, 0])


def make_vae(name: str = "vae", weights=None) -> Encoder:
    """Load a VAE trained by ``train_vae``. ``weights``: its directory (or a file in it)."""
    from wmlab.models.vae import CONFIG_FILE, WEIGHTS_FILE, load_vae
    from wmlab.runs import read_json

    if weights is None:
        raise FileNotFoundError(MISSING_WEIGHTS)
    path = Path(weights).expanduser()
    if path.is_file() and path.name in (WEIGHTS_FILE, CONFIG_FILE):
        path = path.parent
    if not (path / WEIGHTS_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"vae weights {path}: {WEIGHTS_FILE} / {CONFIG_FILE} not found. {MISSING_WEIGHTS}"
        )
    vae = load_vae(path)
    return VAEEncoder(
        vae,
        name=name,
        weights=str(path),
        sha256=weights_sha256(path / WEIGHTS_FILE),
        meta=read_json(path / CONFIG_FILE),
    )
