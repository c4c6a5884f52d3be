"""``pixels``: raw image patches as tokens, the no-representation baseline (no weights).

A frame resized to ``input_size`` and scaled to [-1, 1] is cut into ``patch_size`` squares; each
square, flattened (p * p * 3 values), is one token. Grid (input_size / p)^2, row-major.
"""

from __future__ import annotations

import torch

from wmlab.encoders.base import Encoder, EncoderInfo, resize


class PixelPatchEncoder(Encoder):
    def __init__(self, name: str = "pixels", input_size: int = 64, patch_size: int = 8) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} must be a multiple of patch_size {patch_size}")
        g = input_size // patch_size
        self.patch_size = patch_size
        self.info = EncoderInfo(
            name=name, num_tokens=g * g, dim=patch_size * patch_size * 3, grid=(g, g), input_size=input_size,
            extra={"patch_size": patch_size},
        )  # fmt: skip

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return resize(images, self.info.input_size) * 2.0 - 1.0  # (B, 3, S, S) in [-1, 1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        B, C, S, _ = x.shape
        p, g = self.patch_size, S // self.patch_size
        x = x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1)  # (B, g, g, p, p, C)
        return x.reshape(B, g * g, p * p * C)  # (B, N, D)


def make_pixels(name: str = "pixels", weights=None, input_size: int = 64, patch_size: int = 8) -> Encoder:
    if weights is not None:
        raise ValueError("the pixels encoder has no weights; drop weights=")
    return PixelPatchEncoder(name, input_size=input_size, patch_size=patch_size)
