"""``resnet18`` (ImageNet) and ``r3m`` (R3M's ResNet-18): frozen ResNets through transformers' ResNetModel.

``output="pooled"`` (default) gives the global-average-pooled vector as one token, (B, 1, 512);
``output="map"`` gives the last stage's map as tokens, (B, 49, 512) at 224 on a row-major 7x7 grid
(``ceil(S/32)`` per side). Input: resized to ``input_size`` and ImageNet-normalised by hand.

R3M's own ``forward`` takes frames in 0-255 and does /255 and the ImageNet normalisation inside; feeding
our [0, 1] frames through the same normalisation is that computation exactly (its optional 256-resize +
224-crop applies only when it is told a non-224 ``obs_shape``, so it is not repeated here).

Weights (``weights=``):
- ``resnet18``: None (``microsoft/resnet-18``), a hub id, a ``save_pretrained`` directory, or torchvision's
  ``resnet18-f37072fd.pth`` (converted; searched in torch.hub's checkpoint folder when ``weights=None``).
- ``r3m``: R3M's ``model.pt`` (``torch.load(...)['r3m']``, keys ``module.convnet.<torchvision key>``; the
  language parts are dropped), or the folder holding it. Default: ``$WMLAB_WEIGHTS_DIR/r3m_18/model.pt``
  then ``~/.r3m/r3m_18/model.pt`` (where ``r3m.load_r3m('resnet18')`` puts it).
Both converted layouts are checked key by key (no missing, no unexpected).
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

OUTPUTS = ("pooled", "map")
RESNET18_ID = "microsoft/resnet-18"
TORCHVISION_FILE = "resnet18-f37072fd.pth"
TORCHVISION_URL = f"https://download.pytorch.org/models/{TORCHVISION_FILE}"
RESNET18_LICENCE = (
    "Apache-2.0 (microsoft/resnet-18 model card); torchvision's resnet18-f37072fd.pth: BSD-3-Clause"
)
R3M_LICENCE = "MIT (facebookresearch/r3m)"
R3M_FILE = "r3m_18/model.pt"


class ResNetEncoder(Encoder):
    """A frozen transformers ResNetModel -> pooled (B, 1, C) or map (B, h*w, C) tokens."""

    def __init__(
        self, model: torch.nn.Module, *, name: str, output: str, input_size: int, resolved: ResolvedWeights,
        extra: dict,
    ) -> None:  # fmt: skip
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        self.model = freeze(model)
        self.output = output
        side = math.ceil(input_size / 32)  # stem conv + max-pool + 3 strided stages each halve, rounding up
        dim = int(model.config.hidden_sizes[-1])
        self.info = EncoderInfo(
            name=name, num_tokens=1 if output == "pooled" else side * side, dim=dim,
            grid=None if output == "pooled" else (side, side), input_size=input_size, frozen=True,
            weights=resolved.source, weights_sha256=resolved.sha256,
            extra={"output": output, "weights_route": resolved.route, "mean": list(IMAGENET_MEAN),
                   "std": list(IMAGENET_STD), **extra},
        )  # fmt: skip

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """float (B, 3, H, W) in [0, 1] -> (B, 3, S, S) ImageNet-normalised."""
        return normalize(resize(images, self.info.input_size), IMAGENET_MEAN, IMAGENET_STD)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1, C) pooled or (B, h*w, C) map tokens."""
        out = self.model(pixel_values=x)
        if self.output == "pooled":
            B, C = out.pooler_output.shape[:2]
            return out.pooler_output.reshape(B, 1, C)  # (B, C, 1, 1) -> (B, 1, C)
        fmap = out.last_hidden_state  # (B, C, h, w)
        return fmap.flatten(2).transpose(1, 2)  # (B, h*w, C), row-major


# ---------------------------------------------------------------------------------------------------
# torchvision ResNet (basic blocks) -> transformers ResNetModel (Hub key names)

_TV_LAYER = re.compile(r"^layer(\d)\.(\d+)\.(.+)$")
_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torchvision_to_hf_key(key: str) -> str | None:
    """One torchvision resnet key -> its transformers ResNetModel key (None: not part of the backbone)."""
    if key == "conv1.weight":
        return "embedder.embedder.convolution.weight"
    if key.startswith("bn1."):
        return "embedder.embedder.normalization." + key[len("bn1.") :]
    m = _TV_LAYER.match(key)
    if m is None:
        return None
    stage, block, rest = int(m.group(1)) - 1, int(m.group(2)), m.group(3)
    prefix = f"encoder.stages.{stage}.layers.{block}."
    if rest in ("conv1.weight", "conv2.weight"):
        return f"{prefix}layer.{int(rest[4]) - 1}.convolution.weight"
    if rest[:4] in ("bn1.", "bn2.") and rest[4:] in _BN_SUFFIXES:
        return f"{prefix}layer.{int(rest[2]) - 1}.normalization.{rest[4:]}"
    if rest == "downsample.0.weight":
        return prefix + "shortcut.convolution.weight"
    if rest.startswith("downsample.1.") and rest[len("downsample.1.") :] in _BN_SUFFIXES:
        return prefix + "shortcut.normalization." + rest[len("downsample.1.") :]
    return None


def convert_torchvision_state_dict(state_dict: dict):
    """torchvision-layout ResNet with basic blocks (resnet18/34) -> (ResNetConfig, Hub-layout state dict).

    Widths come from the conv shapes and depths from the block indices, so a thin test ResNet with the
    real layout converts too. The ``fc`` head is dropped; bottleneck ResNets (``conv3``) are refused.
    """
    from transformers import ResNetConfig

    out, unexpected = {}, []
    depths = [0, 0, 0, 0]
    for key, value in state_dict.items():
        if key.startswith("fc."):
            continue  # ImageNet classifier head (R3M has none); we want the features before it
        hf_key = torchvision_to_hf_key(key)
        if hf_key is None:
            unexpected.append(key)
            continue
        out[hf_key] = value
        m = _TV_LAYER.match(key)
        if m is not None:
            depths[int(m.group(1)) - 1] = max(depths[int(m.group(1)) - 1], int(m.group(2)) + 1)
    if unexpected:
        raise KeyError(
            f"ResNet checkpoint keys with no basic-block ResNetModel counterpart: {unexpected[:10]} "
            "(bottleneck ResNets such as R3M-50 are not supported)"
        )
    if "embedder.embedder.convolution.weight" not in out or min(depths) == 0:
        raise KeyError(f"not a torchvision ResNet state dict (keys: {sorted(state_dict)[:8]}...)")
    # each stage's width is its first conv's output channels
    widths = [out[f"encoder.stages.{i}.layers.0.layer.0.convolution.weight"].shape[0] for i in range(4)]
    config = ResNetConfig(
        num_channels=3, embedding_size=out["embedder.embedder.convolution.weight"].shape[0],
        hidden_sizes=widths,
        depths=depths, layer_type="basic", hidden_act="relu", downsample_in_first_stage=False,
    )  # fmt: skip
    return config, out


def load_torchvision(state_dict: dict, what: str):
    from transformers import ResNetModel

    config, sd = convert_torchvision_state_dict(state_dict)
    return strict_from_state_dict(ResNetModel, config, sd, what)


def r3m_convnet_state_dict(checkpoint: dict) -> dict:
    """R3M ``model.pt`` contents -> the torchvision-layout state dict of its ResNet (``convnet``).

    ``checkpoint['r3m']`` is a DataParallel state dict: ``module.convnet.*`` is the ResNet;
    ``module.lang_enc.*`` / ``module.lang_rew.*`` (language model and reward head) are not needed.
    """
    sd = checkpoint.get("r3m", checkpoint)
    convnet, unexpected = {}, []
    for key, value in sd.items():
        k = key[len("module.") :] if key.startswith("module.") else key
        if k.startswith("convnet."):
            convnet[k[len("convnet.") :]] = value
        elif not k.startswith(("lang_enc.", "lang_rew.")):
            unexpected.append(key)
    if unexpected:
        raise KeyError(f"R3M checkpoint has keys outside convnet/lang_enc/lang_rew: {unexpected[:10]}")
    if not convnet:
        raise KeyError(f"no module.convnet.* keys in the R3M checkpoint (keys: {sorted(sd)[:8]}...)")
    return convnet


def make_resnet18(
    name: str = "resnet18", weights=None, *, output: str = "pooled", input_size: int = 224
) -> Encoder:
    """ImageNet ResNet-18: pooled (B, 1, 512) or 7x7 map (B, 49, 512) at 224."""
    from transformers import ResNetModel

    resolved = resolve_weights(
        "resnet18", weights, default_id=RESNET18_ID, filename_hint=TORCHVISION_FILE, licence=RESNET18_LICENCE,
        download_url=TORCHVISION_URL, search_paths=[torch_hub_checkpoint(TORCHVISION_FILE)],
        how_to_get=f"`hf download {RESNET18_ID}`, or torchvision's {TORCHVISION_URL}",
    )  # fmt: skip
    if resolved.is_dir:
        model_type = json.loads((resolved.path / "config.json").read_text()).get("model_type")
        if model_type != "resnet":
            raise ValueError(f"{resolved.path} holds a {model_type!r} model, not a ResNet (resnet)")
        model = load_hf_model(ResNetModel, resolved.path)
    else:
        sd = load_original_checkpoint(resolved.path)
        model = load_torchvision(sd.get("state_dict", sd), f"torchvision ResNet {resolved.path}")
    return ResNetEncoder(
        model, name=name if output == "pooled" else f"{name}+map",  # distinct cache keys per output
        output=output, input_size=input_size, resolved=resolved,
        extra={"family": "resnet18", "licence": RESNET18_LICENCE, "depths": list(model.config.depths)},
    )  # fmt: skip


def make_r3m(name: str = "r3m", weights=None, *, output: str = "pooled", input_size: int = 224) -> Encoder:
    """R3M ResNet-18: pooled (B, 1, 512) (R3M's embedding) or the 7x7 map (B, 49, 512) at 224."""
    if (
        weights is not None
        and Path(weights).expanduser().is_dir()
        and (Path(weights).expanduser() / "model.pt").is_file()
    ):
        weights = Path(weights).expanduser() / "model.pt"  # R3M's own folder (model.pt + config.yaml)
    resolved = resolve_weights(
        "r3m", weights, default_id=None, filename_hint=R3M_FILE, licence=R3M_LICENCE,
        search_paths=[Path("~/.r3m") / R3M_FILE],
        how_to_get="`pip install git+https://github.com/facebookresearch/r3m` and `r3m.load_r3m('resnet18')` "
        "on a connected machine (it downloads model.pt and config.yaml from Google Drive to ~/.r3m/r3m_18/)",
    )  # fmt: skip
    if resolved.is_dir:
        raise ValueError(
            f"r3m expects R3M's model.pt (or the folder holding it), got the directory {resolved.path}"
        )
    convnet = r3m_convnet_state_dict(load_original_checkpoint(resolved.path))
    model = load_torchvision(convnet, f"R3M checkpoint {resolved.path}")
    return ResNetEncoder(
        model, name=name if output == "pooled" else f"{name}+map", output=output, input_size=input_size,
        resolved=resolved,
        extra={"family": "r3m", "licence": R3M_LICENCE, "depths": list(model.config.depths)},
    )  # fmt: skip
