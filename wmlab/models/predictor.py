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

    def heads_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, D) -> q, k, v, each (B, H, L, Dh)."""
        B, L, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)  # each (B, L, H*Dh)
        return tuple(t.view(B, L, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """q (B, H, Lq, Dh), k and v (B, H, Lk, Dh), mask (Lq, Lk) or None -> (B, Lq, D)."""
        B, _, Lq, _ = q.shape
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, Lq, Dh)
        out = out.transpose(1, 2).reshape(B, Lq, self.heads * self.dim_head)  # (B, Lq, H*Dh)
        return self.proj_dropout(self.proj(out))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads_qkv(x)  # (B, H, L, Dh)
        return self.attend(q, k, v, mask)


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

    def forward_cached(self, x: torch.Tensor, cache: dict, mask: torch.Tensor | None) -> torch.Tensor:
        """New rows x (B, Ln, D) after the rows whose keys/values are in ``cache`` ({"k", "v"}: (B, H,
        Lc, Dh), or empty); appends the new keys/values to ``cache``. Equals ``forward`` on all rows,
        restricted to the new ones, because earlier rows never attend to later ones."""
        q, k, v = self.attn.heads_qkv(x)  # (B, H, Ln, Dh)
        if cache:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)  # (B, H, Lc+Ln, Dh)
        cache["k"], cache["v"] = k, v
        x = x + self.attn.attend(q, k, v, mask)
        return x + self.mlp(x)

    def forward_last_rows(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """x (B, L, D) -> ``forward``'s output for the last ``rows`` rows only, (B, rows, D): keys and
        values over all rows, queries and the MLP for the last ones (they see every row, so no mask)."""
        attn = self.attn
        B, L, _ = x.shape
        h = attn.norm(x)  # (B, L, D)
        inner = attn.heads * attn.dim_head
        # The fused qkv weight's rows are [q; k; v]: project queries for the last rows only.
        w, b = attn.qkv.weight, attn.qkv.bias  # (3*H*Dh, D), None (DINO-WM's qkv has no bias)
        q = F.linear(h[:, -rows:], w[:inner], None if b is None else b[:inner])  # (B, rows, H*Dh)
        kv = F.linear(h, w[inner:], None if b is None else b[inner:])  # (B, L, 2*H*Dh)
        k, v = kv.chunk(2, dim=-1)  # each (B, L, H*Dh)
        q = q.view(B, rows, attn.heads, attn.dim_head).transpose(1, 2)  # (B, H, rows, Dh)
        k, v = (t.view(B, L, attn.heads, attn.dim_head).transpose(1, 2) for t in (k, v))  # (B, H, L, Dh)
        x = x[:, -rows:] + attn.attend(q, k, v, None)  # (B, rows, D)
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

    # ------------------------------------------------------------------ inference shortcuts (rollouts)
    # Both return exactly what ``forward`` returns for the last frame (to fp32 rounding), in eval mode.

    def forward_last(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, T, N, D) -> ``forward(z)[:, -1:]`` (B, 1, N, D), skipping the last block's queries,
        attention output and MLP for frames before the last (nothing reads them)."""
        B, T, N, D = z.shape
        assert T <= self.cfg.num_frames and N == self.cfg.num_tokens and D == self.cfg.dim, (
            f"predictor expects (B, <= {self.cfg.num_frames}, {self.cfg.num_tokens}, {self.cfg.dim}), "
            f"got {tuple(z.shape)}"
        )
        L = T * N
        x = self.emb_dropout(z.reshape(B, L, D) + self.pos_embedding[:, :L])  # (B, T*N, D)
        mask = self.mask[:L, :L]
        for block in self.blocks[:-1]:
            x = block(x, mask)
        x = self.blocks[-1].forward_last_rows(x, N)  # (B, N, D)
        return self.norm(x).reshape(B, 1, N, D)

    def forward_incremental(self, z_new: torch.Tensor, cache: list[dict]) -> torch.Tensor:
        """Frames z_new (B, Tn, N, D) that follow the frames already in ``cache`` (a list of one dict
        per block; start with ``[{} for _ in blocks]``) -> ``forward(all frames)[:, -1:]`` (B, 1, N, D).

        Valid while the window still starts at position 0: with absolute position embeddings and a
        block-causal mask, earlier frames' hidden states do not change when frames are appended, so
        their per-block keys/values are computed once and reused (a KV cache). ``cache`` is updated.
        """
        B, Tn, N, D = z_new.shape
        Lc = cache[0]["k"].shape[2] if cache[0] else 0  # cached rows
        Ln = Tn * N
        assert Lc % N == 0 and Lc + Ln <= self.cfg.num_frames * N and N == self.cfg.num_tokens, (
            f"incremental predictor: {Lc // N} cached + {Tn} new frames of {N} tokens exceed "
            f"{self.cfg.num_frames} frames of {self.cfg.num_tokens}"
        )
        x = self.emb_dropout(z_new.reshape(B, Ln, D) + self.pos_embedding[:, Lc : Lc + Ln])  # (B, Ln, D)
        # A single new frame sees every cached and new row: no mask (lets SDPA pick a fused kernel).
        mask = None if Tn == 1 else self.mask[Lc : Lc + Ln, : Lc + Ln]
        for block, block_cache in zip(self.blocks, cache, strict=True):
            x = block.forward_cached(x, block_cache, mask)
        return self.norm(x[:, -N:]).reshape(B, 1, N, D)
