"""``dino_cls`` / ``dino_patch``: frozen DINO (v1) ViT-S/16 (also S/8, B/16, B/8) via transformers' ViTModel.

The model is ``ViTModel`` without its pooling layer; its final layer-normed sequence is [CLS, (S/p)^2
patches]. ``dino_cls`` returns the CLS as (B, 1, 384) (what DINO's own ``forward`` returns),
``dino_patch`` the patches, (B, 196, 384) at 224 on a row-major 14x14 grid.

Normalisation gotcha: the Hub's ``preprocessor_config.json`` for ``facebook/dino-vits16`` says mean/std
0.5, but DINO was trained with ImageNet statistics; this encoder normalises with ImageNet's by hand.
Off the checkpoint's 224, the learned position embeddings are interpolated (``interpolate_pos_encoding``).

Weights (``weights=``): None (``facebook/dino-vit{s,b}{16,8}`` by ``variant``), a hub id or a
``save_pretrained`` directory. The original ``dino_deitsmall16_pretrain.pth`` is not converted here.
"""

from __future__ import annotations

import json

from wmlab.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder
from wmlab.encoders.dinov2 import HFViTEncoder
from wmlab.encoders.weights import load_hf_model, resolve_weights

VARIANTS = ("vits16", "vits8", "vitb16", "vitb8")
LICENCE = "Apache-2.0 (code and weights)"


def hub_id(variant: str = "vits16") -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown DINO variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return f"facebook/dino-{variant}"


def make_dino(
    name: str = "dino_cls",
    weights=None,
    *,
    output: str = "cls",
    variant: str = "vits16",
    input_size: int = 224,
) -> Encoder:
    """DINO v1 encoder; ``variant`` picks the default weights (vits16, vits8, vitb16, vitb8)."""
    from transformers import ViTModel

    resolved = resolve_weights(
        "dino", weights, default_id=hub_id(variant), licence=LICENCE,
        how_to_get=f"`hf download {hub_id(variant)}`",
    )  # fmt: skip
    if not resolved.is_dir:
        raise ValueError(
            f"dino loads Hugging Face directories only (config.json + model.safetensors), got the file "
            f"{resolved.path}; use `hf download {hub_id(variant)} --local-dir DIR`"
        )
    model_type = json.loads((resolved.path / "config.json").read_text()).get("model_type")
    if model_type != "vit":
        raise ValueError(f"{resolved.path} holds a {model_type!r} model, not a ViT (vit)")
    model = load_hf_model(ViTModel, resolved.path, add_pooling_layer=False)
    native = model.config.image_size
    return HFViTEncoder(
        model, name=name, output=output, input_size=input_size, patch_size=int(model.config.patch_size),
        num_registers=0, mean=IMAGENET_MEAN, std=IMAGENET_STD, resolved=resolved,
        extra={"family": "dino", "licence": LICENCE, "hf_class": "ViTModel"},
        # ViTModel refuses other sizes unless asked to interpolate its learned position embeddings
        forward_kwargs={"interpolate_pos_encoding": True} if input_size != native else None,
    )  # fmt: skip


def make_dino_cls(name: str = "dino_cls", weights=None, **kwargs) -> Encoder:
    """CLS token (B, 1, D); see ``make_dino``."""
    return make_dino(name=name, weights=weights, output="cls", **kwargs)


def make_dino_patch(name: str = "dino_patch", weights=None, **kwargs) -> Encoder:
    """Patch tokens (B, (S/p)^2, D); see ``make_dino``."""
    return make_dino(name=name, weights=weights, output="patch", **kwargs)
