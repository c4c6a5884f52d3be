"""DINO-WM's predictor: a ViT over (frames x tokens) with a frame-level block-causal mask.

Tokens of frame i attend to every token of frames <= i, so one pass predicts all frames of a
window in parallel (teacher forcing) and frame i's output never sees the future. Pre-LN blocks,
a learned absolute position embedding over ``num_frames * num_tokens`` positions, a final
LayerNorm, no CLS token. Attention runs through PyTorch's fused ``scaled_dot_product_attention``.

The block-causal attention has three exact implementations (``PredictorConfig.attention`` or
``BlockCausalPredictor.set_attention``), equal to fp rounding (tests/test_predictor_attention.py):

- ``sdpa``: one SDPA call with the boolean (L, L) mask. On CPU that runs the flash kernel (no L x L
  scores are materialised, measured); on CUDA a boolean mask rules flash out (memory-efficient kernel).
- ``frames``: one SDPA call per query frame over the keys of frames <= it, with no mask, so every
  call may use the flash kernel on any device; it also skips the masked-out key blocks (for 3 frames
  6 of 9 query x key blocks are computed).
- ``flex``: FlexAttention with a frame block mask (``torch.nn.attention.flex_attention``), compiled
  into a fused kernel on CUDA; elsewhere it runs eagerly (unfused, for tests only).
- ``auto`` (default): ``frames`` on CUDA, ``sdpa`` elsewhere.
"""

from __future__ import annotations

import functools
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
    attention: str = "auto"  # sdpa | frames | flex | auto (see the module docstring); results equal


ATTENTION_BACKENDS = ("auto", "sdpa", "frames", "flex")


def check_attention_backend(name: str) -> str:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"predictor attention must be one of {ATTENTION_BACKENDS}, got {name!r}")
    return name


def block_causal_mask(num_frames: int, num_tokens: int, device=None) -> torch.Tensor:
    """bool (F*N, F*N): True where query token may attend to key token (key frame <= query frame)."""
    frame = torch.arange(num_frames * num_tokens, device=device) // num_tokens  # (F*N,)
    return frame[:, None] >= frame[None, :]


@dataclass(frozen=True)
class FrameCausal:
    """The structure of a block-causal mask: ``num_tokens`` rows per frame, query row i sits at
    absolute row ``q_start + i``, key row j at row j; a query sees keys of its own and earlier frames.
    ``FrameCausal(N, q_start).dense(Lq, Lk)`` equals ``block_causal_mask(...)[q_start:q_start+Lq, :Lk]``."""

    num_tokens: int
    q_start: int = 0

    def dense(self, Lq: int, Lk: int, device=None) -> torch.Tensor:
        return _dense_frame_mask(self.num_tokens, self.q_start, Lq, Lk, str(torch.device(device or "cpu")))


@functools.lru_cache(maxsize=64)
def _dense_frame_mask(N: int, q0: int, Lq: int, Lk: int, device: str) -> torch.Tensor:
    """Built once per shape and device (every block of every call reuses it; never written to)."""
    q_frame = (torch.arange(Lq, device=device) + q0) // N  # (Lq,)
    k_frame = torch.arange(Lk, device=device) // N  # (Lk,)
    return q_frame[:, None] >= k_frame[None, :]  # (Lq, Lk)


def frames_attention(q, k, v, structure: FrameCausal, dropout_p: float = 0.0) -> torch.Tensor:
    """Block-causal attention as one unmasked SDPA call per query frame. q (B, H, Lq, Dh) at rows
    q_start.., k and v (B, H, Lk, Dh) -> (B, H, Lq, Dh). A query frame f sees keys [0, (f+1) N)."""
    N, q0 = structure.num_tokens, structure.q_start
    Lq, Lk = q.shape[2], k.shape[2]
    outs, row = [], 0
    while row < Lq:
        frame = (q0 + row) // N
        end = min(Lq, (frame + 1) * N - q0)  # this frame's last query row + 1
        keys = min(Lk, (frame + 1) * N)
        outs.append(
            F.scaled_dot_product_attention(
                q[:, :, row:end], k[:, :, :keys], v[:, :, :keys], dropout_p=dropout_p
            )
        )  # (B, H, end-row, Dh)
        row = end
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # (B, H, Lq, Dh)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=64)
def _flex_block_mask(N: int, q0: int, Lq: int, Lk: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def frame_causal(b, h, q_idx, kv_idx):
        return (q_idx + q0) // N >= kv_idx // N

    return create_block_mask(frame_causal, None, None, Lq, Lk, device=device)


def flex_block_causal_attention(q, k, v, structure: FrameCausal) -> torch.Tensor:
    """Block-causal attention through FlexAttention with a frame block mask: q (B, H, Lq, Dh), k and v
    (B, H, Lk, Dh) -> (B, H, Lq, Dh). Compiled (fused) on CUDA; eager (unfused, scores materialised)
    elsewhere, which is only meant for tests of equality with the SDPA path."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    Lq, Lk = q.shape[2], k.shape[2]
    mask = _flex_block_mask(structure.num_tokens, structure.q_start, Lq, Lk, str(q.device))
    if q.is_cuda:
        return _compiled_flex()(q, k, v, block_mask=mask)
    with warnings.catch_warnings():  # "called without torch.compile": intended off CUDA
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, k, v, block_mask=mask)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float, backend: str = "auto") -> None:
        super().__init__()
        self.heads, self.dim_head, self.dropout = heads, dim_head, dropout
        self.backend = check_attention_backend(backend)
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
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: FrameCausal | torch.Tensor | None
    ) -> torch.Tensor:
        """q (B, H, Lq, Dh), k and v (B, H, Lk, Dh), mask: a ``FrameCausal`` structure, a boolean
        (Lq, Lk) mask or None (all keys) -> (B, Lq, D)."""
        B, _, Lq, _ = q.shape
        dropout_p = self.dropout if self.training else 0.0
        backend = self.backend
        if backend == "auto":
            backend = "frames" if q.is_cuda else "sdpa"
        if backend == "flex" and dropout_p > 0:
            backend = "frames"  # FlexAttention has no attention dropout
        if isinstance(mask, FrameCausal) and backend == "frames":
            out = frames_attention(q, k, v, mask, dropout_p)  # (B, H, Lq, Dh)
        elif isinstance(mask, FrameCausal) and backend == "flex":
            out = flex_block_causal_attention(q, k, v, mask)  # (B, H, Lq, Dh)
        else:
            if isinstance(mask, FrameCausal):
                mask = mask.dense(Lq, k.shape[2], q.device)  # (Lq, Lk)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(B, Lq, self.heads * self.dim_head)  # (B, Lq, H*Dh)
        return self.proj_dropout(self.proj(out))

    def forward(self, x: torch.Tensor, mask) -> torch.Tensor:
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
        self.attn = Attention(cfg.dim, cfg.heads, cfg.dim_head, cfg.dropout, cfg.attention)
        self.mlp = FeedForward(cfg.dim, cfg.mlp_dim, cfg.dropout)

    def forward(self, x: torch.Tensor, mask) -> torch.Tensor:
        x = x + self.attn(x, mask)
        return x + self.mlp(x)

    def forward_cached(self, x: torch.Tensor, cache: dict, mask) -> torch.Tensor:
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
        # The mask's structure; each attention backend builds what it needs from it (a dense boolean
        # mask for SDPA, per-frame key ranges, or a FlexAttention block mask).
        self.structure = FrameCausal(cfg.num_tokens)

    def set_attention(self, backend: str) -> BlockCausalPredictor:
        """Switch every block's attention implementation (``ATTENTION_BACKENDS``); results are equal."""
        for block in self.blocks:
            block.attn.backend = check_attention_backend(backend)
        return self

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        B, T, N, D = z.shape
        assert T <= self.cfg.num_frames and N == self.cfg.num_tokens and D == self.cfg.dim, (
            f"predictor expects (B, <= {self.cfg.num_frames}, {self.cfg.num_tokens}, {self.cfg.dim}), "
            f"got {tuple(z.shape)}"
        )
        L = T * N
        x = z.reshape(B, L, D) + self.pos_embedding[:, :L]  # (B, T*N, D)
        x = self.emb_dropout(x)
        for block in self.blocks:
            x = block(x, self.structure)
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
        for block in self.blocks[:-1]:
            x = block(x, self.structure)
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
        mask = None if Tn == 1 else FrameCausal(N, Lc)
        for block, block_cache in zip(self.blocks, cache, strict=True):
            x = block.forward_cached(x, block_cache, mask)
        return self.norm(x[:, -N:]).reshape(B, 1, N, D)
