"""``vjepa2``: the frozen V-JEPA 2 video encoder (ViT-L/H/g, patch 16, tubelet 2, 3D RoPE) on single frames.

The model is transformers' ``VJEPA2Model``; only its encoder runs (``skip_predictor=True``). A frame
becomes a 2-frame clip by repeating it (one tubelet; the original V-JEPA 2-AC does the same, and HF
would do it implicitly), so the output is (B, (S/16)^2, D) on a row-major (S/16, S/16) grid, no CLS.
Input: resized to ``input_size`` and ImageNet-normalised by hand (the HF video processor would resize to
292 and crop 256).

RoPE gotcha (verified in the reference): transformers computes the patch grid of the rotary positions
from ``config.crop_size``, not from the input, so a 256 checkpoint fed 224 frames would place tokens on a
16-wide grid. The model is therefore loaded with ``crop_size=input_size``.

Weights (``weights=``): None (``facebook/vjepa2-{vitl,vith,vitg}-fpc64-256`` by ``size``), a hub id or a
``save_pretrained`` directory. Meta's original ``.pt`` files are not converted here.
"""

from __future__ import annotations

import json

import torch

from wmlab.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder, EncoderInfo, normalize, resize
from wmlab.encoders.weights import ResolvedWeights, freeze, load_hf_model, resolve_weights

SIZES = {
    "large": "facebook/vjepa2-vitl-fpc64-256",
    "huge": "facebook/vjepa2-vith-fpc64-256",
    "giant": "facebook/vjepa2-vitg-fpc64-256",
    "giant_384": "facebook/vjepa2-vitg-fpc64-384",
}
LICENCE = "MIT (weights and most code; a few files Apache-2.0), per the V-JEPA 2 repository"
FRAMES = 2  # one tubelet: each frame is repeated twice


class VJEPA2Encoder(Encoder):
    """Single frames -> V-JEPA 2 encoder tokens (B, (S/16)^2, D)."""

    def __init__(
        self, model: torch.nn.Module, *, name: str, input_size: int, resolved: ResolvedWeights
    ) -> None:
        super().__init__()
        config = model.config
        if input_size % config.patch_size:
            raise ValueError(
                f"input_size {input_size} must be a multiple of the patch size {config.patch_size}"
            )
        if config.crop_size != input_size:  # see the module doc: RoPE positions follow crop_size
            raise ValueError(f"V-JEPA 2 loaded with crop_size {config.crop_size} for input_size {input_size}")
        self.model = freeze(model)
        g = input_size // config.patch_size
        self.info = EncoderInfo(
            name=name, num_tokens=g * g, dim=int(config.hidden_size), grid=(g, g), input_size=input_size,
            frozen=True, weights=resolved.source, weights_sha256=resolved.sha256,
            extra={"family": "vjepa2", "patch_size": int(config.patch_size),
                   "tubelet_size": int(config.tubelet_size), "frames": FRAMES,
                   "weights_route": resolved.route, "licence": LICENCE,
                   "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        )  # fmt: skip

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """float (B, 3, H, W) in [0, 1] -> (B, 3, S, S) ImageNet-normalised."""
        return normalize(resize(images, self.info.input_size), IMAGENET_MEAN, IMAGENET_STD)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, (S/16)^2, D)."""
        B, C, S, _ = x.shape
        video = x[:, None].expand(B, FRAMES, C, S, S)  # (B, T=2, 3, S, S): the frame twice, one tubelet
        tokens = self.model(pixel_values_videos=video, skip_predictor=True).last_hidden_state  # (B, g*g, D)
        return tokens


def make_vjepa2(name: str = "vjepa2", weights=None, *, size: str = "large", input_size: int = 224) -> Encoder:
    """V-JEPA 2 encoder; ``size`` in large, huge, giant, giant_384 picks the default weights."""
    if size not in SIZES:
        raise ValueError(f"unknown V-JEPA 2 size {size!r}; choose from {', '.join(SIZES)}")
    from transformers import VJEPA2Model

    resolved = resolve_weights(
        "vjepa2", weights, default_id=SIZES[size], licence=LICENCE,
        how_to_get=f"`hf download {SIZES[size]}` (public, ~1.3-4 GB in fp32)",
    )  # fmt: skip
    if not resolved.is_dir:
        raise ValueError(
            f"vjepa2 loads Hugging Face directories only (config.json + model.safetensors), got the file "
            f"{resolved.path}; use `hf download {SIZES[size]} --local-dir DIR` and pass weights=DIR"
        )
    model_type = json.loads((resolved.path / "config.json").read_text()).get("model_type")
    if model_type != "vjepa2":
        raise ValueError(f"{resolved.path} holds a {model_type!r} model, not V-JEPA 2 (vjepa2)")
    model = load_hf_model(VJEPA2Model, resolved.path, crop_size=input_size)
    return VJEPA2Encoder(model, name=name, input_size=input_size, resolved=resolved)
