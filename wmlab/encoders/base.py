"""The encoder contract (V): frames in, tokens (B, N, D) out, with the metadata a study needs.

Every encoder family subclasses ``Encoder`` and implements ``preprocess`` (its own resizing and
normalisation, from float images in [0, 1]) and ``forward_features`` (tokens). ``encode`` accepts
uint8 frames (B, H, W, 3) or float frames (B, 3, H, W) in [0, 1], so callers never have to know a
family's input convention. ``token_pool=k`` average-pools a patch grid by k (fewer tokens, faster
planning), for any encoder with a grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class EncoderInfo:
    """What a run records about its encoder (the feature cache keys on it too)."""

    name: str
    num_tokens: int
    dim: int
    grid: tuple[int, int] | None
    input_size: int
    frozen: bool = True
    token_pool: int = 1
    weights: str | None = None  # hub id or path the weights came from; None = random/no weights
    weights_sha256: str | None = None
    extra: dict = field(default_factory=dict)

    def cache_key(self) -> str:
        """A key that changes whenever the tokens would: family, weights, input size, pooling,
        token shape, and the family's own options (``extra``, e.g. a patch size)."""
        import hashlib
        import json

        sha = (self.weights_sha256 or "noweights")[:12]
        key = f"{self.name}-{sha}-{self.input_size}px-pool{self.token_pool}-{self.num_tokens}x{self.dim}"
        if self.extra:
            options = json.dumps(self.extra, sort_keys=True, default=str).encode()
            key += "-" + hashlib.sha256(options).hexdigest()[:8]
        return key


def to_float_images(images) -> torch.Tensor:
    """uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 1] -> float32 (B, 3, H, W) in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        images = torch.as_tensor(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(
            f"images must be (B, H, W, 3) uint8 or (B, 3, H, W) float, got shape {tuple(images.shape)}"
        )
    if images.dtype == torch.uint8:
        if images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be channels-last (B, H, W, 3), got {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W)
    if images.shape[1] != 3:
        raise ValueError(f"float images must be channels-first (B, 3, H, W), got {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf")
    return images.float()


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize (B, 3, H, W) -> (B, 3, size, size) with antialiasing; no-op at that size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Per-channel (x - mean) / std on (B, 3, H, W)."""
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def pool_tokens(tokens: torch.Tensor, grid: tuple[int, int], k: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Average-pool patch tokens (B, h*w, D) on their row-major grid by k -> (B, ceil(h/k)*ceil(w/k), D)."""
    if k == 1:
        return tokens, grid
    B, N, D = tokens.shape
    h, w = grid
    assert N == h * w, f"tokens {N} do not fill grid {grid}"
    x = tokens.transpose(1, 2).reshape(B, D, h, w)  # (B, D, h, w)
    x = F.avg_pool2d(x, kernel_size=k, stride=k, ceil_mode=True)  # (B, D, h', w')
    new_grid = (x.shape[2], x.shape[3])
    return x.flatten(2).transpose(1, 2), new_grid  # (B, h'*w', D)


class Encoder(nn.Module):
    """Base class. Subclasses set ``self.info`` (before pooling) and implement the two hooks."""

    info: EncoderInfo

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """float (B, 3, H, W) in [0, 1] -> the family's model input (resized, normalised)."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Model input -> tokens (B, N, D) on the family's grid (row-major) when it has one."""
        raise NotImplementedError

    def set_token_pool(self, k: int) -> None:
        """Pool the grid by k from now on (only for encoders with a grid)."""
        k = int(k)
        if k < 1:
            raise ValueError(f"token_pool must be >= 1, got {k}")
        if k > 1 and self.info.grid is None:
            raise ValueError(
                f"encoder {self.info.name} has no patch grid ({self.info.num_tokens} tokens); "
                "token_pool must be 1"
            )
        if self.info.token_pool != 1:
            raise ValueError("token_pool is already set")
        if k > 1:
            h, w = self.info.grid
            self.info.grid = (math.ceil(h / k), math.ceil(w / k))
            self.info.num_tokens = self.info.grid[0] * self.info.grid[1]
            self.info.token_pool = k
            self._pool_from = (h, w)

    @property
    def num_tokens(self) -> int:
        return self.info.num_tokens

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def grid(self) -> tuple[int, int] | None:
        return self.info.grid

    @property
    def input_size(self) -> int:
        return self.info.input_size

    @property
    def frozen(self) -> bool:
        return self.info.frozen

    def encode(self, images) -> torch.Tensor:
        """uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 1] -> tokens float (B, N, D)."""
        device = next(self.parameters(), torch.empty(0)).device
        x = self.preprocess(to_float_images(images).to(device))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.info.frozen):
            tokens = self.forward_features(x)
        if self.info.token_pool > 1:
            tokens, _ = pool_tokens(tokens, self._pool_from, self.info.token_pool)
        _, N, D = tokens.shape
        expected = (self.info.num_tokens, self.info.dim)
        assert (N, D) == expected, (
            f"{self.info.name} produced ({N}, {D}) tokens, its metadata says {expected}"
        )
        return tokens

    def forward(self, images) -> torch.Tensor:
        return self.encode(images)
