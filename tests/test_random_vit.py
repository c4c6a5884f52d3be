"""random_vit: a frozen random ViT from transformers, shaped and seeded as asked."""

from __future__ import annotations

import pytest
import torch

from wmlab.encoders import make_encoder

TINY = dict(input_size=32, patch_size=8, depth=1, dim=32, heads=2)


def frames(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )


def test_tiny_shapes_grid_and_info():
    encoder = make_encoder("random_vit", **TINY)
    info = encoder.info
    assert (info.num_tokens, info.dim, info.grid, info.input_size) == (16, 32, (4, 4), 32)
    assert info.weights == "random:seed=0" and len(info.weights_sha256) == 64
    assert info.extra["depth"] == 1 and info.extra["patch_size"] == 8
    assert encoder.encode(frames()).shape == (2, 16, 32)
    # Any frame size is resized to input_size first.
    assert encoder.encode(frames(3, size=48)).shape == (3, 16, 32)
    # Float (B, 3, H, W) frames in [0, 1] too.
    assert encoder.encode(torch.rand(1, 3, 32, 32)).shape == (1, 16, 32)


def test_default_is_vit_s16_at_224():
    encoder = make_encoder("random_vit")
    info = encoder.info
    assert (info.num_tokens, info.dim, info.grid, info.input_size) == (196, 384, (14, 14), 224)
    assert (info.extra["depth"], info.extra["heads"], info.extra["patch_size"]) == (12, 6, 16)
    assert sum(p.numel() for p in encoder.parameters()) == 21_665_664  # ViT-S/16 without a head
    assert encoder.encode(frames(1, size=64)).shape == (1, 196, 384)


def test_patch_tokens_exclude_cls():
    encoder = make_encoder("random_vit", **TINY)
    x = encoder.preprocess(frames().permute(0, 3, 1, 2).float() / 255)  # (B, 3, 32, 32)
    with torch.no_grad():
        hidden = encoder.model(pixel_values=x).last_hidden_state  # (B, 1 + 16, 32)
        tokens = encoder.encode(frames())  # (B, 16, 32)
    assert hidden.shape[1] == 17
    torch.testing.assert_close(tokens, hidden[:, 1:])


def test_frozen():
    encoder = make_encoder("random_vit", **TINY)
    assert encoder.info.frozen
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()  # a training loop cannot switch a frozen encoder to train mode
    assert not encoder.training and not encoder.model.training
    with torch.enable_grad():
        assert not encoder.encode(frames()).requires_grad


def test_same_seed_same_weights_other_seed_other_key():
    a, b = make_encoder("random_vit", **TINY), make_encoder("random_vit", **TINY)
    c = make_encoder("random_vit", seed=1, **TINY)
    assert a.info.weights_sha256 == b.info.weights_sha256
    assert a.info.cache_key() == b.info.cache_key()
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)
    assert torch.equal(a.encode(frames()), b.encode(frames()))
    assert c.info.weights == "random:seed=1"
    assert c.info.weights_sha256 != a.info.weights_sha256
    assert c.info.cache_key() != a.info.cache_key()
    assert not torch.equal(a.encode(frames()), c.encode(frames()))
    # Another shape is another cache key too, through the weights hash.
    d = make_encoder("random_vit", **{**TINY, "depth": 2})
    assert d.info.cache_key() != a.info.cache_key()


def test_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_encoder("random_vit", **TINY)
    assert torch.equal(torch.rand(3), expected)


def test_token_pool_and_bad_arguments():
    pooled = make_encoder("random_vit", token_pool=2, **TINY)
    assert pooled.info.grid == (2, 2) and pooled.encode(frames()).shape == (2, 4, 32)
    with pytest.raises(ValueError, match="no weights"):
        make_encoder("random_vit", weights="facebook/dino-vits16", **TINY)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        make_encoder("random_vit", **{**TINY, "input_size": 30})
    with pytest.raises(ValueError, match="divisible by heads"):
        make_encoder("random_vit", **{**TINY, "heads": 3})
