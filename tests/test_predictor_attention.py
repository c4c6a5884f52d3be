"""The block-causal attention backends (sdpa / frames / flex) equal the dense-mask SDPA reference."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from wmlab.models.predictor import (
    BlockCausalPredictor,
    FrameCausal,
    PredictorConfig,
    block_causal_mask,
    flex_block_causal_attention,
    frames_attention,
)


def qkv(Lq: int, Lk: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, Lq, 8, generator=g), torch.randn(2, 3, Lk, 8, generator=g),
            torch.randn(2, 3, Lk, 8, generator=g))  # fmt: skip


@pytest.mark.parametrize("q_start,Lq,Lk", [(0, 12, 12), (4, 8, 12), (8, 4, 12), (0, 8, 8), (2, 6, 8)])
def test_frame_structure_matches_the_dense_mask_and_the_backends_match_sdpa(q_start, Lq, Lk):
    """Full windows, KV-cached suffixes (new frames after cached ones) and a query start inside a frame."""
    N = 4
    structure = FrameCausal(N, q_start)
    dense = block_causal_mask(3, N)[q_start : q_start + Lq, :Lk]
    assert torch.equal(structure.dense(Lq, Lk), dense)
    q, k, v = qkv(Lq, Lk)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)  # (B, H, Lq, Dh)
    torch.testing.assert_close(frames_attention(q, k, v, structure), reference, atol=1e-6, rtol=1e-5)
    # FlexAttention runs eagerly off CUDA (unfused): the same numbers through torch's own flex code
    torch.testing.assert_close(
        flex_block_causal_attention(q, k, v, structure), reference, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("backend", ["frames", "flex", "auto"])
def test_predictor_and_fast_paths_equal_across_backends(backend):
    torch.manual_seed(0)
    cfg = PredictorConfig(num_frames=3, num_tokens=4, dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32)
    model = BlockCausalPredictor(cfg).eval()
    z = torch.randn(2, 3, 4, 16)
    with torch.no_grad():
        ref = model.set_attention("sdpa")(z)
        ref_last = model.forward_last(z)
        model.set_attention(backend)
        torch.testing.assert_close(model(z), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.forward_last(z), ref_last, atol=1e-5, rtol=1e-5)
        cache = [{} for _ in model.blocks]
        model.forward_incremental(z[:, :1], cache)
        torch.testing.assert_close(
            model.forward_incremental(z[:, 1:], cache), ref[:, -1:], atol=1e-5, rtol=1e-5
        )


def test_frames_backend_trains_with_gradients_equal_to_sdpa():
    torch.manual_seed(0)
    cfg = PredictorConfig(
        num_frames=3, num_tokens=4, dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32, dropout=0.0
    )
    model = BlockCausalPredictor(cfg).train()
    z = torch.randn(2, 3, 4, 16)
    grads = {}
    for backend in ("sdpa", "frames"):
        model.zero_grad()
        model.set_attention(backend)(z).square().mean().backward()
        grads[backend] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["sdpa"], grads["frames"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="sdpa"):
        BlockCausalPredictor(PredictorConfig(num_frames=2, num_tokens=2, dim=8, depth=1, heads=1,
                                             dim_head=8, attention="flash"))  # fmt: skip
