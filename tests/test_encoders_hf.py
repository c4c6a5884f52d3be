"""Pretrained-encoder families (DINOv2, DINOv3, V-JEPA 2, DINO v1, ResNet-18, R3M) on tiny random models.

Every test builds its weights here (no network, no real checkpoints): transformers models at hidden 32
saved with ``save_pretrained``, and original-layout checkpoints (Meta's DINOv2/DINOv3 ``.pth``,
torchvision / R3M ResNets) written key by key with the original names. The original-layout outputs are
checked against small reference forwards written here from the original architectures, so a wrong key
mapping (q/k swapped, a mask not applied) fails rather than round-tripping. Real-weight checks run only
when ``$WMLAB_WEIGHTS_DIR`` holds the folders.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("transformers")
import transformers

from wmlab.encoders import make_encoder
from wmlab.encoders import weights as W
from wmlab.encoders.base import IMAGENET_MEAN, IMAGENET_STD, normalize, resize

transformers.logging.set_verbosity_error()

REAL_WEIGHTS_DIR = os.environ.get("WMLAB_WEIGHTS_DIR", "")
REAL_CACHE_LOOKUP = W._hf_cache_lookup  # the autouse fixture replaces it; one test puts it back
D = 32  # tiny width everywhere


@pytest.fixture(autouse=True)
def _offline_and_isolated(monkeypatch, tmp_path):
    """No test may download, or find real weights by accident (HF cache, torch.hub, ~/.r3m)."""
    monkeypatch.setenv("WMLAB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WMLAB_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(W, "_hf_cache_lookup", lambda hub_id: None)


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _frames(b: int = 2, size: int = 40, seed: int = 0) -> torch.Tensor:
    """uint8 frames (B, H, W, 3), as environments render them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, size, size, 3), generator=g, dtype=torch.uint8)


def _hand_input(frames: torch.Tensor, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """What the encoders should feed their model: [0, 1], resized, normalised -> (B, 3, S, S)."""
    x = frames.permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
    return normalize(resize(x, size), mean, std)


def _check_frozen(enc) -> None:
    assert enc.frozen and not enc.training
    assert all(not p.requires_grad for p in enc.parameters())


def _rand_sd(shapes: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.2 for k, s in shapes.items()}


# ---------------------------------------------------------------------------------------------------
# tiny transformers models, saved once per module


def _save(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        DINOv3ViTConfig,
        DINOv3ViTModel,
        ResNetConfig,
        ResNetModel,
        ViTConfig,
        ViTModel,
        VJEPA2Config,
        VJEPA2Model,
    )

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    vit = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=2)
    return {
        "dinov2": _save(Dinov2Model(Dinov2Config(**vit, image_size=28, patch_size=14)), root / "dinov2"),
        "dinov2_reg": _save(
            Dinov2WithRegistersModel(
                Dinov2WithRegistersConfig(**vit, image_size=28, patch_size=14, num_register_tokens=4)
            ),
            root / "dinov2_reg",
        ),
        "dinov3": _save(
            DINOv3ViTModel(
                DINOv3ViTConfig(
                    **vit, intermediate_size=64, image_size=32, patch_size=16, num_register_tokens=4
                )
            ),
            root / "dinov3",
        ),
        "vjepa2": _save(
            VJEPA2Model(
                VJEPA2Config(
                    **vit,
                    crop_size=64,
                    pred_hidden_size=D,
                    pred_num_hidden_layers=1,
                    pred_num_attention_heads=2,
                )
            ),
            root / "vjepa2",
        ),
        "dino": _save(
            ViTModel(
                ViTConfig(**vit, intermediate_size=64, image_size=32, patch_size=16), add_pooling_layer=False
            ),
            root / "dino",
        ),
        "resnet": _save(
            ResNetModel(
                ResNetConfig(
                    depths=[2, 2, 2, 2], hidden_sizes=[8, 16, 16, D], embedding_size=8, layer_type="basic"
                )
            ),
            root / "resnet",
        ),
    }


def _hf(cls, path, **kw):
    return cls.from_pretrained(str(path), local_files_only=True, **kw).eval()


# ---------------------------------------------------------------------------------------------------
# DINOv2


def test_dinov2_patch_tokens_grid_and_normalisation(hf_dirs):
    from transformers import Dinov2Model

    enc = make_encoder("dinov2_patch", weights=str(hf_dirs["dinov2"]), input_size=28)
    frames = _frames()
    tokens = enc.encode(frames)
    assert tokens.shape == (2, 4, D) and tokens.dtype == torch.float32
    assert (enc.num_tokens, enc.dim, enc.grid, enc.input_size) == (4, D, (2, 2), 28)
    assert not tokens.requires_grad
    _check_frozen(enc)
    assert enc.info.weights == str(hf_dirs["dinov2"])
    assert enc.info.weights_sha256 == _sha(hf_dirs["dinov2"] / "model.safetensors")

    ref_model = _hf(Dinov2Model, hf_dirs["dinov2"])
    with torch.no_grad():
        ref = ref_model(pixel_values=_hand_input(frames, 28)).last_hidden_state  # (B, 1 + 4, D)
        wrong = ref_model(pixel_values=_hand_input(frames, 28, (0.5,) * 3, (0.5,) * 3)).last_hidden_state
    torch.testing.assert_close(tokens, ref[:, 1:])  # CLS dropped
    assert not torch.allclose(tokens, wrong[:, 1:], atol=1e-3)  # ImageNet, not 0.5, statistics

    cls = make_encoder("dinov2_cls", weights=str(hf_dirs["dinov2"]), input_size=28)
    out = cls.encode(frames)
    assert out.shape == (2, 1, D) and cls.grid is None
    torch.testing.assert_close(out, ref[:, :1])
    with pytest.raises(ValueError, match="no patch grid"):
        cls.set_token_pool(2)


def test_dinov2_registers_are_excluded(hf_dirs):
    from transformers import Dinov2WithRegistersModel

    enc = make_encoder("dinov2_patch", weights=str(hf_dirs["dinov2_reg"]), input_size=28, registers=True)
    frames = _frames()
    tokens = enc.encode(frames)
    assert tokens.shape == (2, 4, D) and enc.info.extra["num_registers"] == 4
    with torch.no_grad():
        ref = _hf(Dinov2WithRegistersModel, hf_dirs["dinov2_reg"])(
            pixel_values=_hand_input(frames, 28)
        ).last_hidden_state  # (B, 1 + 4 + 4, D): [CLS, 4 registers, 4 patches]
    assert ref.shape[1] == 9
    torch.testing.assert_close(tokens, ref[:, 5:])
    torch.testing.assert_close(make_encoder("dinov2_cls", weights=str(hf_dirs["dinov2_reg"]), input_size=28)
                               .encode(frames), ref[:, :1])  # fmt: skip
    with pytest.raises(ValueError, match="register tokens"):
        make_encoder("dinov2_patch", weights=str(hf_dirs["dinov2_reg"]), input_size=28, registers=False)


def test_dinov2_dino_wm_preset_and_pooling(hf_dirs):
    enc = make_encoder("dinov2_patch", weights=str(hf_dirs["dinov2"]), input_size=196, norm="dino_wm")
    assert (enc.num_tokens, enc.grid) == (196, (14, 14))  # DINO-WM: 196 px -> 14x14 patches
    assert enc.info.extra["mean"] == [0.5] * 3 and enc.info.name != "dinov2_patch"
    assert enc.encode(_frames(1, 224)).shape == (1, 196, D)
    pooled = make_encoder("dinov2_patch", weights=str(hf_dirs["dinov2"]), input_size=56, token_pool=2)
    assert pooled.grid == (2, 2) and pooled.encode(_frames(1)).shape == (1, 4, D)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        make_encoder("dinov2_patch", weights=str(hf_dirs["dinov2"]), input_size=30)
    with pytest.raises(ValueError, match="unknown DINOv2 size"):
        make_encoder("dinov2_patch", size="tiny")


# Meta's original layouts and reference forwards written from the original architectures


def _dinov2_original_sd(*, registers: int = 0, swiglu: bool = False, depth: int = 2, side: int = 2) -> dict:
    """DINOv2 ``dinov2_vit*14[_reg4]_pretrain.pth`` key layout at width 32, for a (side*14)^2 image."""
    shapes = {
        "cls_token": (1, 1, D), "mask_token": (1, D), "pos_embed": (1, 1 + side * side, D),
        "patch_embed.proj.weight": (D, 3, 14, 14), "patch_embed.proj.bias": (D,),
        "norm.weight": (D,), "norm.bias": (D,),
    }  # fmt: skip
    if registers:
        shapes["register_tokens"] = (1, registers, D)
    hidden = 88 if swiglu else 4 * D  # 88: transformers' SwiGLU width for ratio 4 at width 32
    for i in range(depth):
        p = f"blocks.{i}."
        shapes |= {
            p + "norm1.weight": (D,), p + "norm1.bias": (D,), p + "attn.qkv.weight": (3 * D, D),
            p + "attn.qkv.bias": (3 * D,), p + "attn.proj.weight": (D, D), p + "attn.proj.bias": (D,),
            p + "ls1.gamma": (D,), p + "norm2.weight": (D,), p + "norm2.bias": (D,), p + "ls2.gamma": (D,),
        }  # fmt: skip
        if swiglu:
            shapes |= {p + "mlp.w12.weight": (2 * hidden, D), p + "mlp.w12.bias": (2 * hidden,),
                       p + "mlp.w3.weight": (D, hidden), p + "mlp.w3.bias": (D,)}  # fmt: skip
        else:
            shapes |= {p + "mlp.fc1.weight": (hidden, D), p + "mlp.fc1.bias": (hidden,),
                       p + "mlp.fc2.weight": (D, hidden), p + "mlp.fc2.bias": (D,)}  # fmt: skip
    sd = _rand_sd(shapes, seed=registers + 10 * swiglu)
    for k in sd:
        if k.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            sd[k] = 1.0 + sd[k]  # layer-norm gains near 1, as trained
    return sd


def _dinov3_original_sd(*, swiglu: bool = False, depth: int = 2, heads: int = 2) -> dict:
    """DINOv3 ``dinov3_vit*16_pretrain_lvd1689m-*.pth`` key layout at width 32 (4 storage tokens)."""
    head_dim = D // heads
    shapes = {
        "cls_token": (1, 1, D), "mask_token": (1, D), "storage_tokens": (1, 4, D),
        "patch_embed.proj.weight": (D, 3, 16, 16), "patch_embed.proj.bias": (D,),
        "norm.weight": (D,), "norm.bias": (D,),
    }  # fmt: skip
    hidden = 48 if swiglu else 4 * D
    for i in range(depth):
        p = f"blocks.{i}."
        shapes |= {
            p + "norm1.weight": (D,), p + "norm1.bias": (D,), p + "attn.qkv.weight": (3 * D, D),
            p + "attn.qkv.bias": (3 * D,), p + "attn.proj.weight": (D, D), p + "attn.proj.bias": (D,),
            p + "ls1.gamma": (D,), p + "norm2.weight": (D,), p + "norm2.bias": (D,), p + "ls2.gamma": (D,),
        }  # fmt: skip
        if swiglu:
            for w, (o, n) in {"w1": (hidden, D), "w2": (hidden, D), "w3": (D, hidden)}.items():
                shapes |= {p + f"mlp.{w}.weight": (o, n), p + f"mlp.{w}.bias": (o,)}
        else:
            shapes |= {p + "mlp.fc1.weight": (hidden, D), p + "mlp.fc1.bias": (hidden,),
                       p + "mlp.fc2.weight": (D, hidden), p + "mlp.fc2.bias": (D,)}  # fmt: skip
    sd = _rand_sd(shapes, seed=3 + swiglu)
    for i in range(depth):
        # The released models mask the key bias to zero through this buffer; the raw k bias is junk.
        sd[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones(D), torch.zeros(D), torch.ones(D)])
    sd["rope_embed.periods"] = 100.0 ** (2 * torch.arange(head_dim // 4) / (head_dim // 2))  # (head_dim/4,)
    return sd


def _dinov3_rope(sd: dict, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DINOv3's RoPE sin/cos for an h x w patch grid (normalize_coords='separate'), eval mode."""
    coords_h = torch.arange(0.5, h) / h
    coords_w = torch.arange(0.5, w) / w
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)  # (hw, 2)
    coords = 2.0 * coords - 1.0
    angles = 2 * math.pi * coords[:, :, None] / sd["rope_embed.periods"][None, None, :]  # (hw, 2, hd/4)
    angles = angles.flatten(1, 2).tile(2)  # (hw, hd)
    return torch.sin(angles), torch.cos(angles)


def _original_vit_forward(sd: dict, x: torch.Tensor, *, heads: int, patch: int, eps: float) -> torch.Tensor:
    """Meta's DINOv2 / DINOv3 ViT forward, from the original key names -> normed tokens (B, N, D)."""
    B = x.shape[0]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)  # (B, D, h, w)
    h, w = t.shape[-2:]
    t = t.flatten(2).transpose(1, 2)  # (B, h*w, D)
    cls = sd["cls_token"].expand(B, -1, -1)
    rope = None
    if "pos_embed" in sd:  # DINOv2: learned positions on [CLS, patches], registers inserted after
        t = torch.cat([cls, t], dim=1) + sd["pos_embed"]  # native grid: no interpolation
        if "register_tokens" in sd:
            t = torch.cat([t[:, :1], sd["register_tokens"].expand(B, -1, -1), t[:, 1:]], dim=1)
    else:  # DINOv3: [CLS, storage tokens, patches], RoPE on the patches only
        t = torch.cat([cls, sd["storage_tokens"].expand(B, -1, -1), t], dim=1)
        rope = _dinov3_rope(sd, h, w)
    N = t.shape[1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}."
        y = F.layer_norm(t, (D,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        bias = sd[p + "attn.qkv.bias"] * sd.get(p + "attn.qkv.bias_mask", 1.0)
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], bias).reshape(B, N, 3, heads, D // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, heads, N, hd)
        if rope is not None:
            sin, cos = rope
            pre = N - sin.shape[0]

            def rot(z):
                z1, z2 = z.chunk(2, dim=-1)
                return torch.cat([-z2, z1], dim=-1)

            q = torch.cat([q[:, :, :pre], q[:, :, pre:] * cos + rot(q[:, :, pre:]) * sin], dim=2)
            k = torch.cat([k[:, :, :pre], k[:, :, pre:] * cos + rot(k[:, :, pre:]) * sin], dim=2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        t = t + sd[p + "ls1.gamma"] * F.linear(a, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        y = F.layer_norm(t, (D,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        if p + "mlp.fc1.weight" in sd:
            m = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                         sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])  # fmt: skip
        elif p + "mlp.w12.weight" in sd:  # DINOv2 SwiGLU: fused [gate; up]
            x1, x2 = F.linear(y, sd[p + "mlp.w12.weight"], sd[p + "mlp.w12.bias"]).chunk(2, dim=-1)
            m = F.linear(F.silu(x1) * x2, sd[p + "mlp.w3.weight"], sd[p + "mlp.w3.bias"])
        else:  # DINOv3 SwiGLU
            x1 = F.linear(y, sd[p + "mlp.w1.weight"], sd[p + "mlp.w1.bias"])
            x2 = F.linear(y, sd[p + "mlp.w2.weight"], sd[p + "mlp.w2.bias"])
            m = F.linear(F.silu(x1) * x2, sd[p + "mlp.w3.weight"], sd[p + "mlp.w3.bias"])
        t = t + sd[p + "ls2.gamma"] * m
    return F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], eps)


@pytest.mark.parametrize(("registers", "swiglu"), [(0, False), (4, False), (0, True)])
def test_dinov2_original_checkpoint(tmp_path, registers, swiglu):
    sd = _dinov2_original_sd(registers=registers, swiglu=swiglu)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    frames = _frames()
    with torch.no_grad():
        ref = _original_vit_forward(sd, _hand_input(frames, 28), heads=2, patch=14, eps=1e-6)
    enc = make_encoder("dinov2_patch", weights=str(path), input_size=28, num_heads=2)
    _check_frozen(enc)
    torch.testing.assert_close(enc.encode(frames), ref[:, 1 + registers :], atol=1e-5, rtol=1e-4)
    cls = make_encoder("dinov2_cls", weights=str(path), input_size=28, num_heads=2)
    torch.testing.assert_close(cls.encode(frames), ref[:, :1], atol=1e-5, rtol=1e-4)
    assert enc.info.weights == str(path) and enc.info.weights_sha256 == _sha(path)
    assert enc.info.extra["hf_class"] == ("Dinov2WithRegistersModel" if registers else "Dinov2Model")


def test_dinov2_original_conversion_checks_keys():
    from wmlab.encoders.dinov2 import convert_original_state_dict

    # The released files are built at 518: pos_embed (1, 1370, D) -> the HF configs' image_size 518.
    config, _ = convert_original_state_dict(_dinov2_original_sd(side=37))
    assert config.image_size == 518 and config.num_attention_heads == 1  # width 32 / head dim 64 -> 1
    sd = _dinov2_original_sd()
    with pytest.raises(KeyError, match=r"head\.weight"):
        convert_original_state_dict({**sd, "head.weight": torch.zeros(1)})
    # chunked block layout (blocks.<chunk>.<index>.*) maps to the same layers
    chunked = {
        k.replace("blocks.", "blocks.0.", 1) if k.startswith("blocks.") else k: v for k, v in sd.items()
    }
    assert convert_original_state_dict(chunked)[1].keys() == convert_original_state_dict(sd)[1].keys()


def test_dinov2_original_missing_key_fails(tmp_path):
    from wmlab.encoders.dinov2 import load_original

    sd = _dinov2_original_sd()
    del sd["blocks.1.norm2.bias"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match=r"norm2\.bias"):
        load_original(tmp_path / "broken.pth", num_heads=2)


def test_dinov2_default_finds_torch_hub_checkpoint(tmp_path, monkeypatch):
    """weights=None and no HF copy: DINO-WM users' torch.hub file is found and converted."""
    sd = _dinov2_original_sd()
    ckpt = W.torch_hub_checkpoint("dinov2_vits14_pretrain.pth")  # under the test's TORCH_HOME
    ckpt.parent.mkdir(parents=True)
    torch.save(sd, ckpt)
    enc = make_encoder("dinov2_patch", input_size=28, num_heads=2)
    assert enc.info.weights == str(ckpt) and enc.info.extra["weights_route"] == "original_file"
    assert enc.encode(_frames(1)).shape == (1, 4, D)


# ---------------------------------------------------------------------------------------------------
# DINOv3


def test_dinov3_hf_tokens_exclude_cls_and_registers(hf_dirs):
    from transformers import DINOv3ViTModel

    enc = make_encoder("dinov3_patch", weights=str(hf_dirs["dinov3"]), input_size=32)
    frames = _frames()
    tokens = enc.encode(frames)
    assert tokens.shape == (2, 4, D) and enc.grid == (2, 2) and tokens.dtype == torch.float32
    _check_frozen(enc)
    assert enc.info.weights_sha256 == _sha(hf_dirs["dinov3"] / "model.safetensors")
    with torch.no_grad():
        ref = _hf(DINOv3ViTModel, hf_dirs["dinov3"])(pixel_values=_hand_input(frames, 32)).last_hidden_state
    assert ref.shape[1] == 1 + 4 + 4  # [CLS, 4 registers, 4 patches]
    torch.testing.assert_close(tokens, ref[:, 5:])
    cls = make_encoder("dinov3_cls", weights=str(hf_dirs["dinov3"]), input_size=32)
    torch.testing.assert_close(cls.encode(frames), ref[:, :1])
    big = make_encoder("dinov3_patch", weights=str(hf_dirs["dinov3"]), input_size=64)  # RoPE: any size
    assert big.encode(frames).shape == (2, 16, D) and big.grid == (4, 4)


@pytest.mark.parametrize("swiglu", [False, True])
def test_dinov3_original_checkpoint(tmp_path, swiglu):
    sd = _dinov3_original_sd(swiglu=swiglu)
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save(sd, path)
    frames = _frames()
    with torch.no_grad():
        ref = _original_vit_forward(sd, _hand_input(frames, 32), heads=2, patch=16, eps=1e-5)
    enc = make_encoder("dinov3_patch", weights=str(path), input_size=32)  # heads read off RoPE periods
    torch.testing.assert_close(enc.encode(frames), ref[:, 5:], atol=1e-5, rtol=1e-4)
    cls = make_encoder("dinov3_cls", weights=str(path), input_size=32)
    torch.testing.assert_close(cls.encode(frames), ref[:, :1], atol=1e-5, rtol=1e-4)
    assert enc.model.config.num_attention_heads == 2 and not enc.model.config.key_bias
    assert enc.info.weights_sha256 == _sha(path)


def test_dinov3_original_conversion_checks_keys():
    from wmlab.encoders.dinov3 import convert_original_state_dict

    sd = _dinov3_original_sd()
    with pytest.raises(KeyError, match="dino_head"):
        convert_original_state_dict({**sd, "dino_head.w": torch.zeros(1)})
    with pytest.raises(ValueError, match="num_heads=4"):
        convert_original_state_dict(sd, num_heads=4)
    # training-only local CLS norm (SAT-493M ViT-L) is dropped, not an error
    config, out = convert_original_state_dict({**sd, "local_cls_norm.weight": torch.ones(D)})
    assert not any("cls_norm" in k for k in out) and config.num_register_tokens == 4


# ---------------------------------------------------------------------------------------------------
# V-JEPA 2


def test_vjepa2_single_frames_and_crop_size(hf_dirs):
    from transformers import VJEPA2Model

    enc = make_encoder("vjepa2", weights=str(hf_dirs["vjepa2"]), input_size=32)  # checkpoint crop 64
    frames = _frames()
    tokens = enc.encode(frames)
    assert tokens.shape == (2, 4, D) and enc.grid == (2, 2) and tokens.dtype == torch.float32
    assert enc.model.config.crop_size == 32  # RoPE grid follows the input, not the checkpoint's 64
    _check_frozen(enc)
    assert enc.info.weights_sha256 == _sha(hf_dirs["vjepa2"] / "model.safetensors")
    x = _hand_input(frames, 32)
    clip = x[:, None].repeat(1, 2, 1, 1, 1)  # (B, 2, 3, S, S)
    with torch.no_grad():
        right = _hf(VJEPA2Model, hf_dirs["vjepa2"], crop_size=32)
        ref = right(pixel_values_videos=clip, skip_predictor=True).last_hidden_state
        single = right(pixel_values_videos=x[:, None], skip_predictor=True).last_hidden_state
        wrong = _hf(VJEPA2Model, hf_dirs["vjepa2"])(
            pixel_values_videos=clip, skip_predictor=True
        ).last_hidden_state
    torch.testing.assert_close(tokens, ref)
    torch.testing.assert_close(single, ref)  # HF's own T=1 handling agrees with our explicit repeat
    assert not torch.allclose(tokens, wrong, atol=1e-4)  # the crop_size gotcha is real
    with pytest.raises(ValueError, match="unknown V-JEPA 2 size"):
        make_encoder("vjepa2", size="small")


# ---------------------------------------------------------------------------------------------------
# DINO v1


def test_dino_v1_cls_patch_and_imagenet_norm(hf_dirs):
    from transformers import ViTModel

    frames = _frames()
    cls = make_encoder("dino_cls", weights=str(hf_dirs["dino"]), input_size=32)
    patch = make_encoder("dino_patch", weights=str(hf_dirs["dino"]), input_size=32)
    c, p = cls.encode(frames), patch.encode(frames)
    assert c.shape == (2, 1, D) and p.shape == (2, 4, D) and patch.grid == (2, 2)
    _check_frozen(cls)
    model = _hf(ViTModel, hf_dirs["dino"], add_pooling_layer=False)
    with torch.no_grad():
        ref = model(pixel_values=_hand_input(frames, 32)).last_hidden_state  # (B, 1 + 4, D)
        half = model(pixel_values=_hand_input(frames, 32, (0.5,) * 3, (0.5,) * 3)).last_hidden_state
    torch.testing.assert_close(c, ref[:, :1])
    torch.testing.assert_close(p, ref[:, 1:])
    assert not torch.allclose(c, half[:, :1], atol=1e-3)  # not the Hub preprocessor's 0.5
    assert cls.info.weights_sha256 == _sha(hf_dirs["dino"] / "model.safetensors")
    other = make_encoder("dino_patch", weights=str(hf_dirs["dino"]), input_size=48)  # interpolated positions
    assert other.encode(frames).shape == (2, 9, D)


# ---------------------------------------------------------------------------------------------------
# ResNet-18 and R3M


def _tv_resnet_sd(widths=(8, 16, 16, D), stem: int = 8, fc: bool = False, seed: int = 5) -> dict:
    """A torchvision ``resnet18``-layout state dict (basic blocks, depths 2-2-2-2), thin widths."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(key, o, i, k):
        sd[key] = torch.randn(o, i, k, k, generator=g) * (2.0 / (i * k * k)) ** 0.5

    def bn(prefix, c):
        sd[prefix + "weight"] = 1.0 + 0.1 * torch.randn(c, generator=g)
        sd[prefix + "bias"] = 0.1 * torch.randn(c, generator=g)
        sd[prefix + "running_mean"] = 0.1 * torch.randn(c, generator=g)
        sd[prefix + "running_var"] = 0.5 + torch.rand(c, generator=g)
        sd[prefix + "num_batches_tracked"] = torch.tensor(7)

    conv("conv1.weight", stem, 3, 7)
    bn("bn1.", stem)
    cin = stem
    for s, c in enumerate(widths, start=1):
        for b in range(2):
            p = f"layer{s}.{b}."
            conv(p + "conv1.weight", c, cin if b == 0 else c, 3)
            bn(p + "bn1.", c)
            conv(p + "conv2.weight", c, c, 3)
            bn(p + "bn2.", c)
            if b == 0 and (s > 1 or cin != c):  # torchvision adds a projection when stride or width change
                conv(p + "downsample.0.weight", c, cin, 1)
                bn(p + "downsample.1.", c)
        cin = c
    if fc:
        sd["fc.weight"], sd["fc.bias"] = torch.randn(10, cin, generator=g), torch.zeros(10)
    return sd


def _tv_resnet_forward(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """torchvision ResNet (basic blocks) in eval mode from its keys -> last map (B, C, h, w)."""

    def bn(t, p):
        mean, var = sd[p + "running_mean"], sd[p + "running_var"]
        return F.batch_norm(t, mean, var, sd[p + "weight"], sd[p + "bias"], False, 0.0, 1e-5)

    t = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1."))
    t = F.max_pool2d(t, 3, 2, 1)
    for s in range(1, 5):
        for b in range(2):
            p = f"layer{s}.{b}."
            stride = 2 if (s > 1 and b == 0) else 1
            out = F.relu(bn(F.conv2d(t, sd[p + "conv1.weight"], stride=stride, padding=1), p + "bn1."))
            out = bn(F.conv2d(out, sd[p + "conv2.weight"], padding=1), p + "bn2.")
            short = t
            if p + "downsample.0.weight" in sd:
                short = bn(F.conv2d(t, sd[p + "downsample.0.weight"], stride=stride), p + "downsample.1.")
            t = F.relu(out + short)
    return t


def test_resnet18_hf_pooled_and_map(hf_dirs):
    from transformers import ResNetModel

    frames = _frames(2, 64)
    pooled = make_encoder("resnet18", weights=str(hf_dirs["resnet"]), input_size=64)
    fmap = make_encoder("resnet18", weights=str(hf_dirs["resnet"]), input_size=64, output="map")
    a, b = pooled.encode(frames), fmap.encode(frames)
    assert a.shape == (2, 1, D) and pooled.grid is None
    assert b.shape == (2, 4, D) and fmap.grid == (2, 2)  # 64 / 32 = 2 per side
    _check_frozen(pooled)
    assert pooled.info.cache_key() != fmap.info.cache_key()
    with torch.no_grad():
        out = _hf(ResNetModel, hf_dirs["resnet"])(pixel_values=_hand_input(frames, 64))
    torch.testing.assert_close(a, out.pooler_output.flatten(1)[:, None])  # (B, 1, C)
    torch.testing.assert_close(b, out.last_hidden_state.flatten(2).transpose(1, 2))  # (B, h*w, C)
    torch.testing.assert_close(b.mean(1, keepdim=True), a)  # the pooled vector is the map's mean
    assert make_encoder("resnet18", weights=str(hf_dirs["resnet"]), output="map").grid == (7, 7)


def test_resnet18_torchvision_file(tmp_path):
    sd = _tv_resnet_sd(fc=True)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(sd, path)
    frames = _frames(2, 64)
    enc = make_encoder("resnet18", weights=str(path), input_size=64, output="map")
    with torch.no_grad():
        ref = _tv_resnet_forward(sd, _hand_input(frames, 64))  # (B, C, 2, 2)
    torch.testing.assert_close(enc.encode(frames), ref.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-4)
    assert enc.info.weights_sha256 == _sha(path)


def test_r3m_checkpoint(tmp_path):
    convnet = _tv_resnet_sd(seed=9)
    ckpt = {
        "r3m": {
            **{"module.convnet." + k: v for k, v in convnet.items()},
            "module.lang_enc.model.embeddings.weight": torch.zeros(4, 4),  # dropped: language encoder
            "module.lang_rew.0.weight": torch.zeros(4, 4),  # dropped: language reward head
        }
    }
    path = tmp_path / "r3m_18" / "model.pt"
    path.parent.mkdir()
    torch.save(ckpt, path)
    frames = _frames(2, 64)
    enc = make_encoder("r3m", weights=str(path), input_size=64)
    tokens = enc.encode(frames)
    assert tokens.shape == (2, 1, D) and tokens.dtype == torch.float32
    _check_frozen(enc)
    # R3M's forward: 0-255 frames, /255, ImageNet normalisation, ResNet, average pool.
    obs = frames.permute(0, 3, 1, 2).float()  # (B, 3, 64, 64) in 0..255
    obs = normalize(obs / 255.0, IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        ref = _tv_resnet_forward(convnet, obs).mean((2, 3))  # (B, C)
    torch.testing.assert_close(tokens, ref[:, None], atol=1e-5, rtol=1e-4)
    assert enc.info.weights_sha256 == _sha(path)
    folder = make_encoder("r3m", weights=str(path.parent), input_size=64)  # R3M's own folder works too
    torch.testing.assert_close(folder.encode(frames), tokens)

    ckpt["r3m"]["module.mystery.w"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(KeyError, match="mystery"):
        make_encoder("r3m", weights=str(tmp_path / "bad.pt"), input_size=64)


# ---------------------------------------------------------------------------------------------------
# weights resolution


def test_weights_dir_and_hf_cache_routes(hf_dirs, tmp_path, monkeypatch):
    import shutil

    wdir = tmp_path / "weights"
    shutil.copytree(hf_dirs["dinov2"], wdir / "facebook__dinov2-small")
    monkeypatch.setenv("WMLAB_WEIGHTS_DIR", str(wdir))
    enc = make_encoder("dinov2_patch", input_size=28)  # weights=None -> the default id, found offline
    assert enc.info.weights == "facebook/dinov2-small" and enc.info.extra["weights_route"] == "weights_dir"
    assert enc.info.weights_sha256 == _sha(hf_dirs["dinov2"] / "model.safetensors")
    by_id = make_encoder("dinov2_patch", weights="facebook/dinov2-small", input_size=28)
    assert by_id.info.weights == "facebook/dinov2-small"

    # HF cache: only ever asked with local_files_only=True while offline
    import huggingface_hub

    calls = []

    def fake_snapshot(repo_id, local_files_only=False, **kw):
        calls.append((repo_id, local_files_only))
        if not local_files_only:
            raise AssertionError("must not download while offline")
        return str(hf_dirs["dino"])

    monkeypatch.delenv("WMLAB_WEIGHTS_DIR")
    monkeypatch.setattr(W, "_hf_cache_lookup", REAL_CACHE_LOOKUP)  # the real lookup, on a fake hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    enc = make_encoder("dino_cls", input_size=32)
    assert calls == [("facebook/dino-vits16", True)]
    assert enc.info.weights == "facebook/dino-vits16" and enc.info.extra["weights_route"] == "hf_cache"


def test_download_only_when_online(hf_dirs, monkeypatch):
    import huggingface_hub

    def fake_snapshot(repo_id, local_files_only=False, allow_patterns=None, **kw):
        assert not local_files_only and "*.safetensors" in allow_patterns
        return str(hf_dirs["resnet"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    with pytest.raises(FileNotFoundError, match="Downloads are off"):
        W.resolve_weights("resnet18", None, default_id="microsoft/resnet-18", licence="x")
    monkeypatch.delenv("WMLAB_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    r = W.resolve_weights("resnet18", None, default_id="microsoft/resnet-18", licence="x")
    assert r.route == "hf_download" and r.source == "microsoft/resnet-18" and r.path == hf_dirs["resnet"]


def test_missing_weights_errors_say_what_and_where(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        make_encoder("dinov2_patch")
    msg = str(err.value)
    for part in ("facebook/dinov2-small", "https://huggingface.co/facebook/dinov2-small", "Apache-2.0",
                 "$WMLAB_WEIGHTS_DIR/facebook__dinov2-small", "dinov2_vits14_pretrain.pth",
                 "dl.fbaipublicfiles.com", "weights=/path"):  # fmt: skip
        assert part in msg, (part, msg)

    with pytest.raises(FileNotFoundError) as err:
        make_encoder("dinov3_patch", size="base")
    msg = str(err.value)
    for part in ("facebook/dinov3-vitb16-pretrain-lvd1689m", "DINOv3 License", "Gated", "accept the licence",
                 "huggingface-cli login",
                 "$WMLAB_WEIGHTS_DIR/facebook__dinov3-vitb16-pretrain-lvd1689m"):  # fmt: skip
        assert part in msg, (part, msg)

    with pytest.raises(FileNotFoundError) as err:
        make_encoder("r3m")
    msg = str(err.value)
    for part in ("r3m_18/model.pt", "MIT", ".r3m", "$WMLAB_WEIGHTS_DIR/r3m_18/model.pt"):
        assert part in msg, (part, msg)

    for name in ("vjepa2", "dino_cls", "resnet18"):
        with pytest.raises(FileNotFoundError, match="Licence"):
            make_encoder(name)

    missing = tmp_path / "nope" / "dinov2.pth"
    with pytest.raises(FileNotFoundError, match="nope"):
        make_encoder("dinov2_patch", weights=str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        make_encoder("dinov2_patch", weights=str(tmp_path / "empty"))


def test_wrong_family_directory_is_refused(hf_dirs):
    with pytest.raises(ValueError, match="not DINOv2"):
        make_encoder("dinov2_patch", weights=str(hf_dirs["dinov3"]))
    with pytest.raises(ValueError, match="not a DINOv3"):
        make_encoder("dinov3_patch", weights=str(hf_dirs["dinov2"]))


def test_sha256_of_files_and_sharded_dirs(tmp_path):
    (tmp_path / "a.pth").write_bytes(b"abc" * 1000)
    assert W.weights_sha256(tmp_path / "a.pth") == hashlib.sha256(b"abc" * 1000).hexdigest()
    shards = tmp_path / "sharded"
    shards.mkdir()
    (shards / "model-00002-of-00002.safetensors").write_bytes(b"two")
    (shards / "model-00001-of-00002.safetensors").write_bytes(b"one")
    expected = hashlib.sha256(
        f"model-00001-of-00002.safetensors:{_sha(shards / 'model-00001-of-00002.safetensors')}\n"
        f"model-00002-of-00002.safetensors:{_sha(shards / 'model-00002-of-00002.safetensors')}\n".encode()
    ).hexdigest()
    assert W.weights_sha256(shards) == expected
    assert W.looks_like_hub_id("facebook/dinov2-small")
    assert not W.looks_like_hub_id("./facebook/dinov2-small") and not W.looks_like_hub_id("a/b/c.pth")
    assert W.hub_dir_name("facebook/dinov2-small") == "facebook__dinov2-small"


# ---------------------------------------------------------------------------------------------------
# real weights (skipped unless $WMLAB_WEIGHTS_DIR holds them)

REAL = [
    ("dinov2_patch", {}, "facebook__dinov2-small", (256, 384)),
    ("dinov2_patch", {"registers": True}, "facebook__dinov2-with-registers-small", (256, 384)),
    ("dinov2_patch", {"input_size": 196}, "facebook__dinov2-small", (196, 384)),
    ("dinov3_patch", {}, "facebook__dinov3-vits16-pretrain-lvd1689m", (196, 384)),
    ("vjepa2", {}, "facebook__vjepa2-vitl-fpc64-256", (196, 1024)),
    ("dino_cls", {}, "facebook__dino-vits16", (1, 384)),
    ("dino_patch", {}, "facebook__dino-vits16", (196, 384)),
    ("resnet18", {}, "microsoft__resnet-18", (1, 512)),
    ("r3m", {}, "r3m_18/model.pt", (1, 512)),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "kwargs", "entry", "shape"), REAL, ids=[f"{r[0]}-{r[2]}" for r in REAL])
def test_real_weights(monkeypatch, name, kwargs, entry, shape):
    if not REAL_WEIGHTS_DIR or not (Path(REAL_WEIGHTS_DIR) / entry).exists():
        pytest.skip(f"$WMLAB_WEIGHTS_DIR/{entry} not present")
    monkeypatch.setenv("WMLAB_WEIGHTS_DIR", REAL_WEIGHTS_DIR)
    enc = make_encoder(name, **kwargs)
    tokens = enc.encode(_frames(2, 224))
    assert tokens.shape == (2, *shape) and torch.isfinite(tokens).all()
    assert enc.info.weights_sha256 and len(enc.info.weights_sha256) == 64
