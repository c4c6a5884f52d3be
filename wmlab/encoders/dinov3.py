"""``dinov3_patch`` / ``dinov3_cls``: frozen DINOv3 ViTs (patch 16, 4 register tokens, RoPE), LVD-1689M.

The model is transformers' ``DINOv3ViTModel`` (transformers >= 4.56); its final layer-normed sequence is
[CLS, 4 registers, (S/16)^2 patches]. ``dinov3_patch`` returns the patches on a row-major (S/16, S/16)
grid, ``dinov3_cls`` the CLS as (B, 1, D). Input: resized to ``input_size`` and ImageNet-normalised by
hand (the LVD models' statistics; the SAT-493M satellite models use other ones, not offered here).

Weights (``weights=``): None (``facebook/dinov3-vit{s,s+,b,l,h+}16-pretrain-lvd1689m`` by ``size``), a
hub id, a ``save_pretrained`` directory, or Meta's original ``dinov3_vit*16_pretrain_lvd1689m-<hash>.pth``
(converted here, ``convert_original_state_dict``). The weights are gated under the DINOv3 License:
accept it on the model page, then ``hf auth login`` (or ``huggingface-cli login``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from wmlab.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder
from wmlab.encoders.dinov2 import HFViTEncoder, unwrap_state_dict
from wmlab.encoders.weights import (
    ResolvedWeights,
    load_hf_model,
    load_original_checkpoint,
    resolve_weights,
    strict_from_state_dict,
    torch_hub_checkpoint,
)

#: size -> (hub name part, original file name); the hashes are the released files'.
SIZES = {
    "small": ("vits16", "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"),
    "small_plus": ("vits16plus", "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth"),
    "base": ("vitb16", "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth"),
    "large": ("vitl16", "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"),
    "huge_plus": ("vith16plus", "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth"),
    "7b": ("vit7b16", "dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth"),
}
#: heads per width when the checkpoint has no RoPE periods to read the head dim from.
HEADS_BY_DIM = {384: 6, 768: 12, 1024: 16, 1280: 20, 4096: 32}
LICENCE = "DINOv3 License (Meta's custom licence; gated: accept it before downloading)"
HOW_TO_GET = (
    "on a connected machine, after accepting the licence and logging in (see Gated), `hf download <id>`; "
    "the original .pth files come from the links Meta emails after an access request "
    "(see https://github.com/facebookresearch/dinov3)"
)


def hub_id(size: str = "small") -> str:
    """``facebook/dinov3-vits16-pretrain-lvd1689m`` etc."""
    _check_size(size)
    return f"facebook/dinov3-{SIZES[size][0]}-pretrain-lvd1689m"


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"unknown DINOv3 size {size!r}; choose from {', '.join(SIZES)}")


_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BLOCK_MAP = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "attn.proj.weight": "attention.o_proj.weight",
    "attn.proj.bias": "attention.o_proj.bias",
    "ls1.gamma": "layer_scale1.lambda1",
    "ls2.gamma": "layer_scale2.lambda1",
    "mlp.fc1.weight": "mlp.up_proj.weight",
    "mlp.fc1.bias": "mlp.up_proj.bias",
    "mlp.fc2.weight": "mlp.down_proj.weight",
    "mlp.fc2.bias": "mlp.down_proj.bias",
    # SwiGLU (S+, H+, 7B): silu(w1 x) * (w2 x) -> w3, as transformers' down(silu(gate x) * up x)
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w1.bias": "mlp.gate_proj.bias",
    "mlp.w2.weight": "mlp.up_proj.weight",
    "mlp.w2.bias": "mlp.up_proj.bias",
    "mlp.w3.weight": "mlp.down_proj.weight",
    "mlp.w3.bias": "mlp.down_proj.bias",
}
_TOP_MAP = {
    "cls_token": "embeddings.cls_token",
    "storage_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}


def convert_original_state_dict(state_dict: dict, num_heads: int | None = None):
    """Meta's DINOv3 ViT state dict -> (DINOv3ViTConfig, state dict in transformers' Hub key layout).

    ``attn.qkv`` (3D, D) is split in thirds; its bias is first multiplied by ``bias_mask`` (the released
    models zero the key bias through it, and transformers' config then has ``key_bias=False``).
    ``rope_embed.periods`` (head_dim/4,) gives the head dim (so the head count) and the RoPE base; it is
    then dropped (transformers recomputes it). ``local_cls_norm`` is used only in training: dropped.
    """
    from transformers import DINOv3ViTConfig

    sd = unwrap_state_dict(state_dict)
    for required in ("cls_token", "patch_embed.proj.weight", "norm.weight"):
        if required not in sd:
            raise KeyError(f"not a DINOv3 ViT checkpoint: no {required!r} (keys: {sorted(sd)[:8]}...)")
    if any(k.startswith("cls_norm.") for k in sd):
        raise ValueError("this DINOv3 checkpoint unties the CLS and patch norms; transformers cannot load it")
    dim = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]

    out: dict[str, torch.Tensor] = {}
    unexpected = []
    depth = 0
    for key, value in sd.items():
        if key in _TOP_MAP:
            out[_TOP_MAP[key]] = value
            continue
        if key == "mask_token":
            out["embeddings.mask_token"] = value.reshape(1, 1, dim)  # (1, D) -> (1, 1, D)
            continue
        if key == "rope_embed.periods" or key.startswith("local_cls_norm."):
            continue
        m = _BLOCK.match(key)
        if m is None:
            unexpected.append(key)
            continue
        i, rest = int(m.group(1)), m.group(2)
        depth = max(depth, i + 1)
        prefix = f"layer.{i}."
        if rest == "attn.qkv.bias_mask":
            continue  # applied with the bias below
        if rest == "attn.qkv.weight":
            for part, t in zip("qkv", value.chunk(3, dim=0)):  # (3D, D) -> three (D, D)
                out[f"{prefix}attention.{part}_proj.weight"] = t
        elif rest == "attn.qkv.bias":
            mask = sd.get(f"blocks.{i}.attn.qkv.bias_mask")
            bias = value if mask is None else value * mask.to(value.dtype)
            if not torch.isfinite(bias).all():
                raise ValueError(
                    f"blocks.{i}.attn.qkv bias is not finite after its mask (uninitialised mask?)"
                )
            for part, t in zip("qkv", bias.chunk(3, dim=0)):  # (3D,) -> three (D,)
                out[f"{prefix}attention.{part}_proj.bias"] = t
        elif rest in _BLOCK_MAP:
            out[prefix + _BLOCK_MAP[rest]] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise KeyError(f"DINOv3 checkpoint has keys with no transformers counterpart: {unexpected[:10]}")

    # A zero (masked) key bias is the same as no key bias, which is what transformers' DINOv3 has.
    key_bias = any(k.endswith("attention.k_proj.bias") and bool(v.abs().sum() > 0) for k, v in out.items())
    if not key_bias:
        out = {k: v for k, v in out.items() if not k.endswith("attention.k_proj.bias")}

    rope_theta = 100.0
    periods = sd.get("rope_embed.periods")
    if periods is not None:
        head_dim = 4 * periods.numel()  # periods has head_dim / 4 entries
        heads = dim // head_dim
        n = periods.numel()
        if n > 1:  # periods[k] = base ** (4 k / head_dim): read the base off the second entry
            rope_theta = float(periods[1].double() ** (head_dim / 4))
        expected = rope_theta ** (4 * torch.arange(n, dtype=torch.float64) / head_dim)
        if not torch.allclose(periods.double(), expected, rtol=1e-4):
            raise ValueError(
                "DINOv3 RoPE periods are not base ** (4k / head_dim); min/max periods unsupported"
            )
        if num_heads is not None and num_heads != heads:
            raise ValueError(f"num_heads={num_heads} but the RoPE periods imply {heads} heads")
    else:
        heads = num_heads or HEADS_BY_DIM.get(dim) or max(dim // 64, 1)
    if dim % heads:
        raise ValueError(f"width {dim} is not divisible by {heads} heads; pass num_heads=")

    gated = "layer.0.mlp.gate_proj.weight" in out
    for i in range(depth):  # no layer scale means a scale of 1
        for j in (1, 2):
            out.setdefault(f"layer.{i}.layer_scale{j}.lambda1", torch.ones(dim))
    out.setdefault("embeddings.mask_token", torch.zeros(1, 1, dim))
    out.setdefault("embeddings.register_tokens", torch.zeros(1, 0, dim))
    registers = out["embeddings.register_tokens"].shape[1]
    config = DINOv3ViTConfig(
        hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, patch_size=patch,
        intermediate_size=out["layer.0.mlp.up_proj.weight"].shape[0], use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu", num_register_tokens=registers, rope_theta=rope_theta,
        query_bias="layer.0.attention.q_proj.bias" in out, key_bias=key_bias,
        value_bias="layer.0.attention.v_proj.bias" in out, proj_bias="layer.0.attention.o_proj.bias" in out,
        mlp_bias="layer.0.mlp.up_proj.bias" in out, layer_norm_eps=1e-5, layerscale_value=1.0,
        image_size=224,
    )  # fmt: skip
    return config, out


def load_original(path: Path, num_heads: int | None = None):
    """Original ``.pth`` -> a transformers DINOv3ViTModel with every weight accounted for."""
    from transformers import DINOv3ViTModel

    config, sd = convert_original_state_dict(load_original_checkpoint(path), num_heads=num_heads)
    return strict_from_state_dict(DINOv3ViTModel, config, sd, f"DINOv3 checkpoint {path}")


def load_model(resolved: ResolvedWeights, num_heads: int | None = None):
    """A resolved weights path (HF dir or original file) -> a transformers DINOv3ViTModel (fp32)."""
    from transformers import DINOv3ViTModel

    if not resolved.is_dir:
        return load_original(resolved.path, num_heads=num_heads)
    model_type = json.loads((resolved.path / "config.json").read_text()).get("model_type")
    if model_type != "dinov3_vit":
        raise ValueError(f"{resolved.path} holds a {model_type!r} model, not a DINOv3 ViT (dinov3_vit)")
    return load_hf_model(DINOv3ViTModel, resolved.path)


def make_dinov3(
    name: str = "dinov3_patch",
    weights=None,
    *,
    output: str = "patch",
    size: str = "small",
    input_size: int = 224,
    num_heads: int | None = None,
) -> Encoder:
    """DINOv3 ViT encoder; ``size`` (small, small_plus, base, large, huge_plus, 7b) picks default weights."""
    _check_size(size)
    filename = SIZES[size][1]
    resolved = resolve_weights(
        "dinov3", weights, default_id=hub_id(size), filename_hint=filename, licence=LICENCE, gated=True,
        how_to_get=HOW_TO_GET.replace("<id>", hub_id(size)), search_paths=[torch_hub_checkpoint(filename)],
    )  # fmt: skip
    model = load_model(resolved, num_heads=num_heads)
    return HFViTEncoder(
        model, name=name, output=output, input_size=input_size, patch_size=int(model.config.patch_size),
        num_registers=int(model.config.num_register_tokens), mean=IMAGENET_MEAN, std=IMAGENET_STD,
        resolved=resolved, extra={"family": "dinov3", "licence": LICENCE, "hf_class": type(model).__name__},
    )  # fmt: skip


def make_dinov3_patch(name: str = "dinov3_patch", weights=None, **kwargs) -> Encoder:
    """Patch tokens (B, (S/16)^2, D); see ``make_dinov3``."""
    return make_dinov3(name=name, weights=weights, output="patch", **kwargs)


def make_dinov3_cls(name: str = "dinov3_cls", weights=None, **kwargs) -> Encoder:
    """CLS token (B, 1, D); see ``make_dinov3``."""
    return make_dinov3(name=name, weights=weights, output="cls", **kwargs)
