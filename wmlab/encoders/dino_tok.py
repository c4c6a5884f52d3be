"""``dino_tok``: a REIMPLEMENTATION of DINO-Tok (arXiv 2511.20565), trained in-domain by wmlab.

DINO-Tok's authors have published neither code nor weights (github.com/MKJia/DINO-Tok holds a README and
figures only; "code will be publicly available"). This module builds what the paper describes, with every
unpublished detail chosen by us, and trains it on the study's own frames (``wmlab train-tokenizer``).
Tokens from it are "DINO-Tok-style", not DINO-Tok's.

What is built (per frame)::

    frame in [0, 1] -> resize to (S/16)*14 px (196 at S = 224), ImageNet mean/std
    -> frozen DINOv2 (``dinov2_size``, transformers Dinov2Model, weights resolved like ``dinov2_patch``)
    -> shallow patch features = hidden_states[shallow_layer] (default depth // 3: block 4 of 12 for ViT-S/B)
       deep patch features    = the final layer-normed output (deep_layer=-1) or hidden_states[deep_layer]
       each (B, (S/16)^2, D), CLS/registers dropped, parameter-free LayerNorm per token
    -> concatenate (B, N, 2D) -> learned projection Linear(2D, proj_hidden) -> GELU -> Linear(., latent_dim)
    -> latent tokens (B, (S/16)^2, latent_dim): 14x14x32 at S = 224, i.e. the paper's 16x downsampling

DINOv2 has 14 px patches, so 16x downsampling at 224 px means feeding it 196 px (as DINO-WM does); the
reconstruction target stays S = 224 px. Training: a pixel decoder (wmlab's VQ-VAE-style transposed-conv
``LatentDecoder``, 16x upsampling, targets in [-1, 1]) learns with the projection to reconstruct the frame
(MSE); DINOv2 stays frozen and its features are computed on the fly. The encoder is the frozen
DINOv2 + projection; the decoder is saved alongside so latents can be viewed.

How this differs from the paper (say so in any result that uses it):
- Continuous latent only (the paper's AE variant). No VQ: no Dominant-Subspace Quantization, no global PCA
  channel selection/reweighting, no semantic/texture codebooks.
- The DINO version/size, the shallow and deep layer indices, the fusion module and the latent channel count
  are not published; ours are DINOv2 (ViT-S by default), depth // 3 and the last layer, concat + 2-layer MLP,
  32 channels (all configurable and recorded in ``tokenizer.json``).
- Our own decoder and loss (plain pixel MSE; the paper's decoder, perceptual/adversarial losses and
  schedule are not reproduced).
- Trained in-domain only (the study's frames, training episodes of the DINO-WM split), not on ImageNet, so
  rFID-style numbers from the paper do not transfer.

Files written by ``wmlab.training.tokenizer.train_tokenizer(data, out)`` into ``out/``:
``tokenizer.safetensors`` (projection + decoder), ``tokenizer.json`` (config, DINOv2 weights source + sha256,
step, loss history), and ``checkpoint.safetensors`` (weights + optimizer state, for resuming). Every file is
written to a temp name and renamed; the checkpoint is one file holding the weights, the optimizer and the
JSON state, and ``tokenizer.safetensors`` + ``tokenizer.json`` are exports written after it (``wmlab.runs``).
``make_encoder("dino_tok", weights=out)`` loads them and checks the DINOv2 weights' sha256 against the one
trained with. ``weights="official:<path>"`` is reserved for the
authors' weights once public (``load_official``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from wmlab.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder, EncoderInfo, normalize, resize
from wmlab.encoders.weights import freeze, weights_sha256

FORMAT = "wmlab-dino-tok"
FORMAT_VERSION = 1
WEIGHTS_FILE = "tokenizer.safetensors"
CONFIG_FILE = "tokenizer.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
CELL = 16  # pixels per latent cell (the paper's 16x downsampling)
DINO_PATCH = 14
PAPER = "DINO-Tok (arXiv 2511.20565)"
MISSING_WEIGHTS = (
    "dino_tok needs weights=<directory written by `wmlab train-tokenizer`>. DINO-Tok's official weights are "
    "not public, so wmlab trains its own reimplementation in-domain: run `wmlab train-tokenizer "
    "data=<dataset.zarr> out=<dir>` (or wmlab.training.tokenizer.train_tokenizer), then pass "
    "encoder.weights=<dir> (it holds tokenizer.safetensors + tokenizer.json)."
)


@dataclass
class TokenizerConfig:
    """Architecture of the reimplementation (recorded in tokenizer.json; a resume must match it)."""

    latent_dim: int = 32
    input_size: int = 224  # frames are reconstructed at this size; grid = input_size / 16 per side
    shallow_layer: int = 4  # hidden_states index (1..depth); train_tokenizer resolves None to depth // 3
    deep_layer: int = -1  # -1 = final layer-normed output, else a hidden_states index > shallow_layer
    proj_hidden: int = 512
    decoder_channel: int = 128
    decoder_res_blocks: int = 2
    decoder_res_channel: int = 32

    @property
    def grid(self) -> int:
        return self.input_size // CELL

    @property
    def dino_input_size(self) -> int:
        return self.grid * DINO_PATCH


class TokenizerHead(nn.Module):
    """The trained part: fusion projection (2D -> latent_dim per token) and pixel decoder (16x upsampling)."""

    def __init__(self, cfg: TokenizerConfig, feature_dim: int) -> None:
        super().__init__()
        from wmlab.models.decoder import DecoderConfig, LatentDecoder

        self.projection = nn.Sequential(
            nn.Linear(2 * feature_dim, cfg.proj_hidden), nn.GELU(), nn.Linear(cfg.proj_hidden, cfg.latent_dim)
        )
        self.decoder = LatentDecoder(
            DecoderConfig(latent_dim=cfg.latent_dim, channel=cfg.decoder_channel,
                          n_res_block=cfg.decoder_res_blocks, n_res_channel=cfg.decoder_res_channel)
        )  # fmt: skip

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Fused features (B, N, 2D) -> latent tokens (B, N, latent_dim)."""
        return self.projection(features)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent tokens (B, g*g, latent_dim) -> images (B, 3, 16g, 16g), about [-1, 1]."""
        return self.decoder(latent)


class DinoFeatures(nn.Module):
    """Frozen DINOv2 -> [shallow | deep] patch features (B, g*g, 2D), each LayerNorm-ed without affine."""

    def __init__(self, dinov2_encoder, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.model = freeze(dinov2_encoder.model)
        self.num_prefix = dinov2_encoder.num_prefix  # CLS + registers
        self.dim = int(self.model.config.hidden_size)
        self.depth = int(self.model.config.num_hidden_layers)
        self.shallow, self.deep = cfg.shallow_layer, cfg.deep_layer
        check_layers(cfg.shallow_layer, cfg.deep_layer, self.depth)
        self.size = cfg.dino_input_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """float (B, 3, H, W) in [0, 1] -> (B, 3, s, s), s = (S/16)*14, ImageNet-normalised."""
        return normalize(resize(images, self.size), IMAGENET_MEAN, IMAGENET_STD)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, s, s) -> (B, (s/14)^2, 2D)."""
        out = self.model(pixel_values=x, output_hidden_states=True)
        p = self.num_prefix
        shallow = out.hidden_states[self.shallow][:, p:]  # (B, N, D)
        deep = (out.last_hidden_state if self.deep == -1 else out.hidden_states[self.deep])[
            :, p:
        ]  # (B, N, D)
        parts = [F.layer_norm(t.float(), (self.dim,)) for t in (shallow, deep)]
        return torch.cat(parts, dim=-1)  # (B, N, 2D)


def check_layers(shallow: int, deep: int, depth: int) -> None:
    if not 0 <= shallow <= depth:
        raise ValueError(f"shallow_layer {shallow} out of range 0..{depth} for a {depth}-block DINOv2")
    if deep != -1 and not shallow < deep <= depth:
        raise ValueError(f"deep_layer {deep} must be -1 (final output) or in {shallow + 1}..{depth}")


def frozen_dinov2(weights, size: str, input_size: int):
    """The ``dinov2_patch`` encoder (frozen HF DINOv2 + resolved weights) at ``input_size``."""
    from wmlab.encoders.dinov2 import make_dinov2

    return make_dinov2("dinov2_patch", weights, size=size, input_size=input_size)


# ---------------------------------------------------------------------------------------------------
# The encoder


class DinoTokEncoder(Encoder):
    """Frozen DINOv2 + trained projection -> latent tokens (B, (S/16)^2, latent_dim), row-major grid."""

    def __init__(self, features: DinoFeatures, head: TokenizerHead, cfg: TokenizerConfig, *, name: str,
                 weights: str, sha256: str, meta: dict) -> None:  # fmt: skip
        super().__init__()
        self.features = features
        self.head = freeze(head)
        self.cfg = cfg
        g = cfg.grid
        dino = meta["dinov2"]
        self.info = EncoderInfo(
            name=name, num_tokens=g * g, dim=cfg.latent_dim, grid=(g, g), input_size=cfg.dino_input_size,
            frozen=True, weights=weights, weights_sha256=sha256,
            extra={"reimplementation_of": PAPER, "config": asdict(cfg), "recon_size": cfg.input_size,
                   "dinov2_weights": dino["weights"], "dinov2_sha256": dino["sha256"],
                   "step": meta.get("step")},
        )  # fmt: skip

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return self.features.preprocess(images)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, s, s) -> (B, g*g, latent_dim)."""
        return self.head.project(self.features(x))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Latent tokens (B, g*g, latent_dim) -> reconstructions (B, 3, S, S) in [0, 1]."""
        return self.head.decode(tokens).add(1).div(2).clamp(0, 1)


def load_official(path: str):
    """Where the authors' DINO-Tok weights would load, once public. Not implemented: nothing to map yet."""
    raise NotImplementedError(
        f"official {PAPER} weights are not public yet (github.com/MKJia/DINO-Tok has no code or weights; "
        f"got {path!r}). When they are released, map their checkpoint in "
        "wmlab.encoders.dino_tok.load_official (DINO backbone + shallow/deep fusion + AE/VQ latent) and "
        "return a DinoTokEncoder-like Encoder. Until then train the reimplementation: `wmlab train-tokenizer "
        "data=<dataset.zarr> out=<dir>` and pass weights=<dir>."
    )


def make_dino_tok(name: str = "dino_tok", weights=None, *, dinov2_weights=None) -> Encoder:
    """Load a tokenizer trained by ``wmlab.training.tokenizer.train_tokenizer``; ``weights``: its directory
    (or a file in it).

    ``dinov2_weights`` overrides where the frozen DINOv2 is found (default: the source recorded at training,
    e.g. ``facebook/dinov2-small``); its sha256 must equal the one trained with.
    """
    from wmlab.runs import load_tensors, read_json

    if weights is None:
        raise FileNotFoundError(MISSING_WEIGHTS)
    text = os.fspath(weights)
    if text.startswith("official:"):
        return load_official(text[len("official:") :])
    path = Path(text).expanduser()
    if path.is_file() and path.name in (WEIGHTS_FILE, CONFIG_FILE):
        path = path.parent
    missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"dino_tok weights {path}: {', '.join(missing)} not found. {MISSING_WEIGHTS}")
    meta = read_json(path / CONFIG_FILE)
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path / CONFIG_FILE} is not a wmlab DINO-Tok tokenizer (format {meta.get('format')!r})"
        )
    cfg = TokenizerConfig(**meta["config"])
    dino = meta["dinov2"]
    backbone = frozen_dinov2(dinov2_weights if dinov2_weights is not None else dino["weights"], dino["size"],
                       cfg.dino_input_size)  # fmt: skip
    if backbone.info.weights_sha256 != dino["sha256"]:
        raise ValueError(
            f"the DINOv2 weights {backbone.info.weights} (sha256 {backbone.info.weights_sha256[:12]}...) "
            f"are not the ones tokenizer {path} was trained with ({dino['weights']}, sha256 "
            f"{dino['sha256'][:12]}...); "
            "pass dinov2_weights= pointing at those"
        )
    features = DinoFeatures(backbone, cfg)
    head = TokenizerHead(cfg, features.dim)
    state = load_tensors(path / WEIGHTS_FILE)
    result = head.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise KeyError(
            f"{path / WEIGHTS_FILE} does not match its tokenizer.json config: "
            f"missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
    return DinoTokEncoder(features, head, cfg, name=name, weights=str(path),
                          sha256=weights_sha256(path / WEIGHTS_FILE), meta=meta)  # fmt: skip
