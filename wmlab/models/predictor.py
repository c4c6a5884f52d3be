"""DINO-WM's predictor: a ViT over (frames x tokens) with a frame-level block-causal mask.

Tokens of frame i attend to every token of frames <= i, so one pass predicts all frames of a
window in parallel (teacher forcing) and frame i's output never sees the future. Pre-LN blocks,
a learned absolute position embedding over ``num_frames * num_tokens`` positions, a final
LayerNorm, no CLS token. Attention runs through PyTorch's fused ``scaled_dot_product_attention``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class PredictorConfig:
    num_frames: int = 3  # num_hist: frames the predictor sees at once
    num_tokens: int = 196  # tokens per frame (patches, or patches + 2 with concat_dim=0)
    dim: int = 404  # token width (visual + proprio + action embeddings with concat_dim=1)
    depth: int = 6
    heads: int = 16
    dim_head: int = 64
    mlp_dim: int = 2048
    dropout: float = 0.1
    emb_dropout: float = 0.0


def block_causal_mask(num_frames: int, num_tokens: int, device=None) -> torch.Tensor:
    """bool (F*N, F*N): True where query token may attend to key token (key frame <= query frame)."""
    frame = torch.arange(num_frames * num_tokens, device=device) // num_tokens  # (F*N,)
    return frame[:, None] >= frame[None, :]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dim_head, self.dropout = heads, dim_head, dropout
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        # A single head as wide as the token needs no output projection (lucidrains' convention).
        self.proj = nn.Identity() if (heads == 1 and dim_head == dim) else nn.Linear(inner, dim)
        self.proj_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)  # each (B, L, H*Dh)
        q, k, v = (
            t.view(B, L, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v)
        )  # (B, H, L, Dh)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, L, Dh)
        out = out.transpose(1, 2).reshape(B, L, self.heads * self.dim_head)  # (B, L, H*Dh)
        return self.proj_dropout(self.proj(out))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(self.norm(x))))))


class Block(nn.Module):
    def __init__(self, cfg: PredictorConfig) -> None:
        super().__init__()
        self.attn = Attention(cfg.dim, cfg.heads, cfg.dim_head, cfg.dropout)
        self.mlp = FeedForward(cfg.dim, cfg.mlp_dim, cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x, mask)
        return x + self.mlp(x)


class BlockCausalPredictor(nn.Module):
    """z (B, T, N, D) with T <= num_frames -> predicted next-frame tokens (B, T, N, D)."""

    def __init__(self, cfg: PredictorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.pos_embedding = nn.Parameter(torch.randn(1, cfg.num_frames * cfg.num_tokens, cfg.dim))
        self.emb_dropout = nn.Dropout(cfg.emb_dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.register_buffer("mask", block_causal_mask(cfg.num_frames, cfg.num_tokens), persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        B, T, N, D = z.shape
        assert T <= self.cfg.num_frames and N == self.cfg.num_tokens and D == self.cfg.dim, (
            f"predictor expects (B, <= {self.cfg.num_frames}, {self.cfg.num_tokens}, {self.cfg.dim}), "
            f"got {tuple(z.shape)}"
        )
        L = T * N
        x = z.reshape(B, L, D) + self.pos_embedding[:, :L]  # (B, T*N, D)
        x = self.emb_dropout(x)
        mask = self.mask[:L, :L]
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x).reshape(B, T, N, D)  # (B, T, N, D)
