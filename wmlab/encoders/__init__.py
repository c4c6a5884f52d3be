"""Visual encoders (V) by name. Each family lives in its own module, imported only when chosen.

``make_encoder("pixels", patch_size=8)`` -> an ``Encoder`` (see ``wmlab.encoders.base``).
"""

from __future__ import annotations

import importlib

from wmlab.encoders.base import Encoder, EncoderInfo

#: name -> "module:factory". The factory takes ``weights=`` and family keyword arguments.
ENCODERS: dict[str, str] = {
    "pixels": "wmlab.encoders.pixels:make_pixels",
    "random_vit": "wmlab.encoders.random_vit:make_random_vit",
    "dinov2_patch": "wmlab.encoders.dinov2:make_dinov2_patch",
    "dinov2_cls": "wmlab.encoders.dinov2:make_dinov2_cls",
    "dinov3_patch": "wmlab.encoders.dinov3:make_dinov3_patch",
    "dinov3_cls": "wmlab.encoders.dinov3:make_dinov3_cls",
    "vjepa2": "wmlab.encoders.vjepa2:make_vjepa2",
    "dino_cls": "wmlab.encoders.dino_v1:make_dino_cls",
    "dino_patch": "wmlab.encoders.dino_v1:make_dino_patch",
    "resnet18": "wmlab.encoders.resnet:make_resnet18",
    "r3m": "wmlab.encoders.resnet:make_r3m",
    "vfm_vae": "wmlab.encoders.vfm_vae:make_vfm_vae",
    "dino_tok": "wmlab.encoders.dino_tok:make_dino_tok",
    "vae": "wmlab.encoders.vae:make_vae",
}

__all__ = ["ENCODERS", "Encoder", "EncoderInfo", "make_encoder"]


def make_encoder(name: str, *, weights=None, token_pool: int = 1, **kwargs) -> Encoder:
    """Build encoder ``name``; ``weights`` is a hub id, a local file/dir, or None for the default.

    Unknown names fail with the list of known ones. ``token_pool=k`` average-pools the patch grid.
    """
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known encoders: {', '.join(sorted(ENCODERS))}")
    module_name, factory_name = ENCODERS[name].split(":")
    factory = getattr(importlib.import_module(module_name), factory_name)
    encoder = factory(name=name, weights=weights, **kwargs)
    if token_pool != 1:
        encoder.set_token_pool(token_pool)
    return encoder.eval()
