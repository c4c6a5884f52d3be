"""Optional pixel decoder for visual latents: a VQ-VAE-style transposed-conv stack, quantizer off.

It only lets users *see* what the model imagines; it is trained on detached latents in its own
stage (``wmlab train-decoder``) and never feeds gradients into the predictor. Layout as DINO-WM's
``VQVAE(quantize=False)``: two 4x upsampling stages (each conv, residual blocks, ReLU, two stride-2
transposed convs), so a 14x14 patch grid becomes 224x224 pixels. No output activation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class DecoderConfig:
    latent_dim: int = 384  # visual token width
    channel: int = 384
    n_res_block: int = 4
    n_res_channel: int = 128
    out_channels: int = 3


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


def upsample_x4(in_ch: int, out_ch: int, channel: int, n_res_block: int, n_res_channel: int) -> nn.Sequential:
    """(B, in_ch, h, w) -> (B, out_ch, 4h, 4w)."""
    return nn.Sequential(
        nn.Conv2d(in_ch, channel, 3, padding=1),
        *(ResidualBlock(channel, n_res_channel) for _ in range(n_res_block)),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(channel, channel // 2, 4, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(channel // 2, out_ch, 4, stride=2, padding=1),
    )


class LatentDecoder(nn.Module):
    """Visual tokens (B, N, D) on a square grid -> images (B, 3, 16 sqrt(N), 16 sqrt(N))."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg
        self.upsample = upsample_x4(c.latent_dim, c.latent_dim, c.channel, c.n_res_block, c.n_res_channel)
        self.to_pixels = upsample_x4(c.latent_dim, c.out_channels, c.channel, c.n_res_block, c.n_res_channel)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, D = tokens.shape
        side = round(N**0.5)
        assert side * side == N, f"the decoder needs a square token grid, got {N} tokens"
        x = tokens.transpose(1, 2).reshape(B, D, side, side)  # (B, D, h, w), row-major grid
        return self.to_pixels(self.upsample(x))  # (B, 3, 16h, 16w)
