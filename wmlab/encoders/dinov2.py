"""``dinov2_patch`` / ``dinov2_cls``: frozen DINOv2 ViT-{S,B,L,g}/14, with or without 4 registers.

The model is transformers' ``Dinov2Model`` (or ``Dinov2WithRegistersModel``); its final layer-normed
sequence is [CLS, R registers, (S/14)^2 patches]. ``dinov2_patch`` returns the patch tokens on a
row-major (S/14, S/14) grid (CLS and registers dropped), ``dinov2_cls`` the CLS token as (B, 1, D).
Input: the frame resized to ``input_size`` (bilinear, antialiased) and ImageNet-normalised by hand (the
HF image processor would resize to 256 and centre-crop). ``input_size=196`` is DINO-WM's setting (14x14
patches); ``norm="dino_wm"`` also copies DINO-WM's (x - 0.5) / 0.5 input scaling, which it used instead
of ImageNet statistics, so features match a DINO-WM checkpoint's.

Weights (``weights=``): None (``facebook/dinov2[-with-registers]-{size}``), a hub id, a
``save_pretrained`` directory, or Meta's original ``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth``, whose keys
are converted to the transformers layout here (``convert_original_state_dict``). With ``weights=None`` and
no HF copy on the machine, torch.hub's checkpoint folder (where DINO-WM users have it) is searched too.

This module also holds ``HFViTEncoder``, the [CLS, registers, patches] -> tokens wrapper that the DINOv3
and DINO v1 families reuse.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from wmlab.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder, EncoderInfo, normalize, resize
from wmlab.encoders.weights import (
    ResolvedWeights,
    freeze,
    load_hf_model,
    load_original_checkpoint,
    resolve_weights,
    strict_from_state_dict,
    torch_hub_checkpoint,
)

SIZES = {"small": "s", "base": "b", "large": "l", "giant": "g"}
#: DINOv2's heads per width (head dim 64); the original checkpoints do not store it.
HEADS_BY_DIM = {384: 6, 768: 12, 1024: 16, 1536: 24}
SIZE_BY_DIM = {384: "small", 768: "base", 1024: "large", 1536: "giant"}
PATCH_SIZE = 14
DINO_WM_INPUT_SIZE = 196  # DINO-WM resizes 224 frames to 196 -> 14x14 patches
NORMS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "dino_wm": ((0.5,) * 3, (0.5,) * 3)}
LICENCE = "Apache-2.0 (code and weights)"


def hub_id(size: str = "small", registers: bool = False) -> str:
    """``facebook/dinov2-small`` / ``facebook/dinov2-with-registers-small``."""
    _check_size(size)
    return f"facebook/dinov2-{'with-registers-' if registers else ''}{size}"


def original_filename(size: str = "small", registers: bool = False) -> str:
    """``dinov2_vits14_pretrain.pth`` / ``dinov2_vits14_reg4_pretrain.pth``."""
    _check_size(size)
    return f"dinov2_vit{SIZES[size]}14{'_reg4' if registers else ''}_pretrain.pth"


def original_url(size: str = "small", registers: bool = False) -> str:
    folder = f"dinov2_vit{SIZES[size]}14"
    return f"https://dl.fbaipublicfiles.com/dinov2/{folder}/{original_filename(size, registers)}"


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"unknown DINOv2 size {size!r}; choose from {', '.join(SIZES)}")


class HFViTEncoder(Encoder):
    """A frozen transformers ViT whose ``last_hidden_state`` is [CLS, R registers, patches].

    output="patch" -> (B, (S/p)^2, D) on a row-major (S/p, S/p) grid; output="cls" -> (B, 1, D).
    ``forward_kwargs`` go to the model call (ViTModel needs ``interpolate_pos_encoding`` off its size).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        name: str,
        output: str,
        input_size: int,
        patch_size: int,
        num_registers: int,
        mean,
        std,
        resolved: ResolvedWeights,
        extra: dict,
        forward_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if output not in ("patch", "cls"):
            raise ValueError(f"output must be 'patch' or 'cls', got {output!r}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} must be a multiple of the patch size {patch_size}")
        self.model = freeze(model)
        self.output = output
        self.num_prefix = 1 + num_registers  # CLS + registers come before the patches
        self.mean, self.std = tuple(mean), tuple(std)
        self.forward_kwargs = dict(forward_kwargs or {})
        g = input_size // patch_size
        self.num_patches = g * g
        self.info = EncoderInfo(
            name=name, num_tokens=g * g if output == "patch" else 1, dim=int(model.config.hidden_size),
            grid=(g, g) if output == "patch" else None, input_size=input_size, frozen=True,
            weights=resolved.source, weights_sha256=resolved.sha256,
            extra={"patch_size": patch_size, "num_registers": num_registers, "output": output,
                   "mean": list(self.mean), "std": list(self.std), "weights_route": resolved.route, **extra},
        )  # fmt: skip

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """float (B, 3, H, W) in [0, 1] -> (B, 3, S, S) normalised."""
        return normalize(resize(images, self.info.input_size), self.mean, self.std)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> patch tokens (B, (S/p)^2, D) or CLS (B, 1, D)."""
        h = self.model(pixel_values=x, **self.forward_kwargs).last_hidden_state  # (B, 1 + R + g*g, D)
        assert h.shape[1] == self.num_prefix + self.num_patches, (
            f"{self.info.name}: model gave {h.shape[1]} tokens, "
            f"expected {self.num_prefix} + {self.num_patches}"
        )
        if self.output == "cls":
            return h[:, :1]  # (B, 1, D)
        return h[:, self.num_prefix :]  # (B, g*g, D)


# ---------------------------------------------------------------------------------------------------
# Original checkpoint -> transformers (Hub key names; see the reference's key table)


def unwrap_state_dict(obj: dict) -> dict:
    """Plain state dict out of common wrappers (``{'model': sd}``, ``{'teacher': sd}``) and prefixes."""
    for key in ("teacher", "model", "state_dict"):
        if key in obj and isinstance(obj[key], dict) and not any(torch.is_tensor(v) for v in obj.values()):
            obj = obj[key]
            break
    for prefix in ("module.", "backbone."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


_BLOCK = re.compile(r"^blocks\.(?:\d+\.)?(\d+)\.(.+)$")  # "blocks.3.x" or chunked "blocks.0.3.x"

_DINOV2_BLOCK_MAP = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "attn.proj.weight": "attention.output.dense.weight",
    "attn.proj.bias": "attention.output.dense.bias",
    "ls1.gamma": "layer_scale1.lambda1",
    "ls2.gamma": "layer_scale2.lambda1",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "mlp.w12.weight": "mlp.weights_in.weight",  # SwiGLU (ViT-g): [gate; up] stacked, HF chunks it the same
    "mlp.w12.bias": "mlp.weights_in.bias",
    "mlp.w3.weight": "mlp.weights_out.weight",
    "mlp.w3.bias": "mlp.weights_out.bias",
}
_DINOV2_TOP_MAP = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}


def _swiglu_hidden(dim: int, mlp_ratio: int) -> int:
    """transformers' (and DINOv2's) SwiGLU width: 2/3 of dim * ratio, rounded up to a multiple of 8."""
    return (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


def convert_original_state_dict(state_dict: dict, num_heads: int | None = None):
    """Meta's DINOv2 state dict -> (config, state dict in transformers' Hub key layout).

    The config is inferred from the shapes: width from ``cls_token``, depth from ``blocks.N``, patch
    size from the patch conv, ``image_size`` from ``pos_embed`` ((1, 1 + (518/14)^2, D) = (1, 1370, D)
    for the released files, matching the HF configs' 518), registers from ``register_tokens``, SwiGLU
    from ``w12``. Heads are not stored: DINOv2 uses head dim 64 (``num_heads`` overrides). The fused
    ``attn.qkv`` (3D, D) is split in thirds into query, key, value.
    """
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    sd = unwrap_state_dict(state_dict)
    for required in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if required not in sd:
            raise KeyError(f"not a DINOv2 checkpoint: no {required!r} (keys: {sorted(sd)[:8]}...)")
    dim = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    n_pos = sd["pos_embed"].shape[1] - 1  # minus the CLS position
    side = math.isqrt(n_pos)
    if side * side != n_pos:
        raise ValueError(f"pos_embed has {n_pos} patch positions, not a square grid")
    registers = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0

    out: dict[str, torch.Tensor] = {}
    unexpected = []
    depth = 0
    for key, value in sd.items():
        if key in _DINOV2_TOP_MAP:
            out[_DINOV2_TOP_MAP[key]] = value
            continue
        m = _BLOCK.match(key)
        if m is None:
            unexpected.append(key)
            continue
        i, rest = int(m.group(1)), m.group(2)
        depth = max(depth, i + 1)
        prefix = f"encoder.layer.{i}."
        if rest in ("attn.qkv.weight", "attn.qkv.bias"):
            q, k, v = value.chunk(3, dim=0)  # (3D, ...) -> three (D, ...) in q, k, v order
            kind = rest.rsplit(".", 1)[1]
            for part, t in zip(("query", "key", "value"), (q, k, v)):
                out[f"{prefix}attention.attention.{part}.{kind}"] = t
        elif rest in _DINOV2_BLOCK_MAP:
            out[prefix + _DINOV2_BLOCK_MAP[rest]] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise KeyError(f"DINOv2 checkpoint has keys with no transformers counterpart: {unexpected[:10]}")

    heads = num_heads or HEADS_BY_DIM.get(dim) or max(dim // 64, 1)
    if dim % heads:
        raise ValueError(f"width {dim} is not divisible by {heads} heads; pass num_heads=")
    swiglu = "encoder.layer.0.mlp.weights_in.weight" in out
    # transformers' Dinov2Config takes an integer mlp_ratio; the released widths are all 4x.
    if swiglu:
        hidden = out["encoder.layer.0.mlp.weights_in.weight"].shape[0] // 2  # w12 stacks gate and up
        ratios = [r for r in range(1, 17) if _swiglu_hidden(dim, r) == hidden]
    else:
        hidden = out["encoder.layer.0.mlp.fc1.weight"].shape[0]
        ratios = [hidden // dim] if hidden % dim == 0 else []
    if not ratios:
        raise ValueError(f"MLP width {hidden} at width {dim} is no integer mlp_ratio transformers can build")
    mlp_ratio = ratios[0]
    for i in range(depth):  # DINOv2 releases all have layer scale; without it the scale is 1
        for j in (1, 2):
            out.setdefault(f"encoder.layer.{i}.layer_scale{j}.lambda1", torch.ones(dim))
    out.setdefault("embeddings.mask_token", torch.zeros(1, dim))  # unused at inference, required by HF

    common = dict(
        hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, mlp_ratio=mlp_ratio,
        image_size=side * patch, patch_size=patch,
        qkv_bias="encoder.layer.0.attention.attention.query.bias" in out,
        layerscale_value=1.0, use_swiglu_ffn=swiglu, layer_norm_eps=1e-6, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    if registers:
        config = Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
    else:
        config = Dinov2Config(**common)
    return config, out


def load_original(path: Path, num_heads: int | None = None):
    """Original ``.pth`` -> a transformers Dinov2[WithRegisters]Model with every weight accounted for."""
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    config, sd = convert_original_state_dict(load_original_checkpoint(path), num_heads=num_heads)
    cls = Dinov2WithRegistersModel if getattr(config, "num_register_tokens", 0) else Dinov2Model
    return strict_from_state_dict(cls, config, sd, f"DINOv2 checkpoint {path}")


def load_model(resolved: ResolvedWeights, num_heads: int | None = None):
    """A resolved weights path (HF dir or original file) -> a transformers DINOv2 model (fp32)."""
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    if not resolved.is_dir:
        return load_original(resolved.path, num_heads=num_heads)
    model_type = json.loads((resolved.path / "config.json").read_text()).get("model_type")
    classes = {"dinov2": Dinov2Model, "dinov2_with_registers": Dinov2WithRegistersModel}
    if model_type not in classes:
        raise ValueError(f"{resolved.path} holds a {model_type!r} model, not DINOv2 ({', '.join(classes)})")
    return load_hf_model(classes[model_type], resolved.path)


def make_dinov2(
    name: str = "dinov2_patch",
    weights=None,
    *,
    output: str = "patch",
    size: str = "small",
    registers: bool | None = None,
    input_size: int = 224,
    norm: str = "imagenet",
    num_heads: int | None = None,
) -> Encoder:
    """DINOv2 encoder. ``size``/``registers`` pick the default weights; a given ``weights`` decides itself
    (``registers`` then only checks it). ``num_heads`` only for non-standard original checkpoints."""
    _check_size(size)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    reg = bool(registers)
    filename = original_filename(size, reg)
    resolved = resolve_weights(
        "dinov2", weights, default_id=hub_id(size, reg), filename_hint=filename, licence=LICENCE,
        download_url=original_url(size, reg), search_paths=[torch_hub_checkpoint(filename)],
        how_to_get=f"`hf download {hub_id(size, reg)}`, or the original checkpoint from "
        f"{original_url(size, reg)} (torch.hub.load('facebookresearch/dinov2', 'dinov2_vit{SIZES[size]}14"
        f"{'_reg' if reg else ''}') saves it to {torch_hub_checkpoint(filename)})",
    )  # fmt: skip
    model = load_model(resolved, num_heads=num_heads)
    n_reg = int(getattr(model.config, "num_register_tokens", 0))
    if registers is not None and bool(n_reg) != registers:
        raise ValueError(
            f"registers={registers} but the weights {resolved.source} have {n_reg} register tokens; "
            "drop registers= or pass matching weights"
        )
    mean, std = NORMS[norm]
    dim = int(model.config.hidden_size)
    return HFViTEncoder(
        model, name=name if norm == "imagenet" else f"{name}+{norm}_norm",  # the cache key must differ
        output=output, input_size=input_size, patch_size=int(model.config.patch_size), num_registers=n_reg,
        mean=mean, std=std, resolved=resolved,
        extra={"family": "dinov2", "size": SIZE_BY_DIM.get(dim, f"dim{dim}"), "norm": norm,
               "licence": LICENCE, "hf_class": type(model).__name__},
    )  # fmt: skip


def make_dinov2_patch(name: str = "dinov2_patch", weights=None, **kwargs) -> Encoder:
    """Patch tokens (B, (S/14)^2, D); see ``make_dinov2`` for kwargs."""
    return make_dinov2(name=name, weights=weights, output="patch", **kwargs)


def make_dinov2_cls(name: str = "dinov2_cls", weights=None, **kwargs) -> Encoder:
    """CLS token (B, 1, D); see ``make_dinov2`` for kwargs."""
    return make_dinov2(name=name, weights=weights, output="cls", **kwargs)
