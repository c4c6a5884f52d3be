"""``vfm_vae``: the encoder half of the released VFM-VAE (arXiv 2510.18457), frozen, deterministic.

Licence: the VFM-VAE code and checkpoints are for **research and educational use only, non-commercial**
(NVIDIA Non-Commercial License, inherited from StyleGAN-T; github.com/tianciB/VFM-VAE LICENSE.txt). The
SigLIP2 tower it sits on is Apache-2.0. A study that uses this encoder inherits the non-commercial terms.

Pipeline (facts from the public repository at b3a752a: ``networks/generator.py``,
``networks/utils/ldm_utils.py``, ``networks/utils/vfms/siglip2_utils.py`` and the stage-3 config)::

    frame in [0, 1] -> resize to input_size S (224) -> x2 bilinear upscale (no antialias) -> 2S (448)
    -> (x - 0.5) / 0.5 -> SigLIP2-Large/16 (``google/siglip2-large-patch16-512``, positions interpolated)
    -> patch features of layers [0, 12, -1], each (B, (2S/16)^2, 1024) on a 28x28 grid at S = 224
       (0 = embeddings output, i = output of block i, -1 = last_hidden_state after post_layernorm,
        -k (k >= 2) = hidden_states[-k + 1])
    -> per layer: attention projection 1024 -> 64, pixel-unshuffle x2 -> (B, 14*14, 256)
    -> concatenate -> (B, 196, 768) -> attention projection 768 -> 64 = [mu (32) | logvar (32)]

The encoder returns ``mu`` as tokens (B, (S/16)^2, 32) on the row-major (S/16, S/16) grid: 14x14x32 at
224 (the release is 16x16x32 at 256). Upstream ``encode()`` returns a *sample* ``mu + exp(logvar / 2) * eps``;
here the mean is used so tokens are deterministic (``forward_distribution`` gives both halves; logvar
clamped to [-30, 20] as upstream). Each "attention projection" is one block of: ``proj(norm3(x)) +
attn(norm1(x))`` where ``attn`` is a multi-head self-attention with fused bias-free ``qkv`` plus separate
q/v biases (key bias fixed at zero), whose per-head outputs are *averaged over heads* (head dim 1024 / 16
= 64 = out dim; adaptive average pooling over channels if they differ) and then linearly projected; then
``x + GeGLU-MLP(norm2(x))`` (LayerNorm eps 1e-6, GELU-tanh gate, hidden 2x out). Heads = in // out.

Weights: two separate downloads.
- VFM-VAE: ``vfm_vae_f16d32_siglip2_44m_after_stage_3_patchgan_fine_tuning_legacy.pth`` from the HF repo
  ``tiancibi/VFM-VAE`` (folder ``checkpoints_imagenet256/vfm_vae/``). Its ``['G_ema']`` state dict is read
  with ``torch.load(weights_only=True)`` and mapped BY KEY NAME:
  ``ldm_adapter.patch_quants.{i}.0.blocks.{j}.*`` -> ``head.branches.{i}.blocks.{j}.*`` and
  ``ldm_adapter.final_quant.blocks.{j}.*`` -> ``head.fuse.blocks.{j}.*``.
  Missing or unknown encoder keys raise; decoder keys (``synthesis.*``, ``mapping.*``,
  ``ldm_adapter.post_quant.*``, the alignment head ``ldm_adapter.linear_proj.*``) are ignored. Shapes (widths,
  depth of each projection, latent channels) are read from the checkpoint.
- SigLIP2: ``siglip_weights=`` (None = ``google/siglip2-large-patch16-512``; a hub id or a ``save_pretrained``
  directory), resolved like every HF family (``$WMLAB_WEIGHTS_DIR``, HF cache, download when online). The
  fixed-resolution SigLIP2 releases are SigLIP-architecture checkpoints (``model_type: siglip``), loaded
  with transformers' ``SiglipVisionModel`` exactly as upstream does; NaFlex ``siglip2`` checkpoints are
  refused.
  If the ``G_ema`` dict also carries the frozen tower (``vfm_encoder.encoder.vision_model.*``, as a full
  ``state_dict()`` would), those tensors are compared with the loaded SigLIP2 (``check_tower=True``), so a
  wrong SigLIP2 variant fails loudly.

Uncertain / not recoverable from the public repository (closest faithful choice made here):
- The key names are derived from the upstream module tree (``Generator.ldm_adapter`` = ``LDMAdapter``,
  ``patch_quants[i] = Sequential(AttnProjection, GeneralPixelUnshuffle)``), not read from the released file;
  a renamed or 'conv'-compression release would fail loudly with the offending keys, never load silently.
  The config's ``legacy: True`` concerns decoder noise injection only, not the encoder.
- Whether the released ``.pth`` holds the SigLIP tower inside ``G_ema`` (not inspected: no network for
  weights here). Both layouts load; the tower check runs only when the keys are present.
- Whether the file unpickles under ``weights_only=True``: the training loop saves plain state dicts plus
  ``training_set_kwargs`` (a dict of YAML values, so it should). If it references ``dnnlib.util.EasyDict``,
  a dict stand-in is allow-listed for that one global; any other non-tensor global is refused with an error.
- Numerics: upstream runs the SigLIP tower under CUDA bf16 autocast; here everything runs in fp32. Upstream
  used transformers 4.50.1; SigLIP's position-embedding interpolation (bicubic) is assumed unchanged in 5.x.
- Training resolution is 256 (f16 -> 16x16). At S = 224 the tower sees 448 px, i.e. an interpolated 28x28
  position grid instead of the 32x32 it saw in training; the head is resolution-agnostic (attention over
  all tokens), so this is a mild distribution shift, not an architectural change.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from wmlab.encoders.base import Encoder, EncoderInfo, normalize, resize
from wmlab.encoders.weights import (
    ResolvedWeights,
    freeze,
    hub_dir_name,
    load_hf_model,
    resolve_weights,
    weights_dir,
)

SIGLIP_ID = "google/siglip2-large-patch16-512"
CKPT_REPO = "tiancibi/VFM-VAE"
CKPT_FILE = "vfm_vae_f16d32_siglip2_44m_after_stage_3_patchgan_fine_tuning_legacy.pth"
CKPT_PATH_IN_REPO = f"checkpoints_imagenet256/vfm_vae/{CKPT_FILE}"
CKPT_URL = f"https://huggingface.co/{CKPT_REPO}/blob/main/{CKPT_PATH_IN_REPO}"
LICENCE = (
    "VFM-VAE code and weights: research / educational use only, NON-COMMERCIAL (NVIDIA Non-Commercial "
    "License via StyleGAN-T; github.com/tianciB/VFM-VAE LICENSE.txt). SigLIP2 tower: Apache-2.0"
)
SIGLIP_LICENCE = "Apache-2.0 (google/siglip2 model cards)"
DEFAULT_LAYERS = (0, 12, -1)
MEAN = STD = (0.5, 0.5, 0.5)
LOGVAR_CLAMP = (-30.0, 20.0)
COMPRESSION = 16  # f16: one latent cell per 16x16 input pixels

#: G_ema key groups. Encoder keys are mapped; the rest are recognised and ignored, or refused.
_BRANCH = re.compile(r"^ldm_adapter\.patch_quants\.(\d+)\.0\.blocks\.(\d+)\.(.+)$")
_FUSE = re.compile(r"^ldm_adapter\.final_quant\.blocks\.(\d+)\.(.+)$")
TOWER_PREFIX = "vfm_encoder."
IGNORED_PREFIXES = ("synthesis.", "mapping.", "ldm_adapter.post_quant.", "ldm_adapter.linear_proj.")
#: dict subclasses an upstream checkpoint may reference; allow-listed as plain-dict stand-ins only.
DICT_LIKE_GLOBALS = ("dnnlib.util.EasyDict",)


# ---------------------------------------------------------------------------------------------------
# The head: per-layer attention projections, pixel-unshuffle, concatenation, fused projection


class HeadAttention(nn.Module):
    """Self-attention whose output width is ``out_dim``, with upstream's parameter names.

    in_dim > out_dim: heads of width in_dim / heads, outputs averaged over heads -> (B, N, in_dim / heads),
    adaptively average-pooled over channels to out_dim when the widths differ. Otherwise: heads of width
    out_dim / heads, concatenated. Then ``proj`` (out_dim -> out_dim). The key bias is a zero buffer.
    """

    def __init__(self, in_dim: int, out_dim: int, num_heads: int) -> None:
        super().__init__()
        width = in_dim if in_dim > out_dim else out_dim
        self.in_dim, self.out_dim, self.num_heads = in_dim, out_dim, num_heads
        self.head_dim = width // num_heads
        self.qkv = nn.Linear(in_dim, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))  # persistent: it is in the checkpoint
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, in_dim) -> (B, N, out_dim)."""
        B, N, _ = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, head_dim)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        if self.in_dim > self.out_dim:
            y = y.mean(dim=1)  # (B, N, head_dim)
            if self.head_dim != self.out_dim:
                y = F.adaptive_avg_pool1d(y, self.out_dim)  # (B, N, out_dim)
        else:
            y = y.transpose(1, 2).reshape(B, N, -1)  # (B, N, heads * head_dim = out_dim)
        return self.proj(y)


class GeGLU(nn.Module):
    """LayerNorm (eps 1e-6) -> GELU-tanh(w0 x) * w1 x -> w2: (B, N, dim) -> (B, N, dim)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.w0 = nn.Linear(dim, hidden)
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.w2(F.gelu(self.w0(x), approximate="tanh") * self.w1(x))


class ProjectionBlock(nn.Module):
    """``proj(norm3(x)) + attn(norm1(x))``, then ``+ mlp(norm2(.))``: (B, N, in_dim) -> (B, N, out_dim)."""

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dim)
        self.attn = HeadAttention(in_dim, out_dim, num_heads)
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm3 = nn.LayerNorm(in_dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = GeGLU(out_dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.norm3(x)) + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AttnProjection(nn.Module):
    """``depth`` blocks keeping the width until the last narrows to ``out_dim`` (upstream's compression)."""

    def __init__(self, in_dim: int, out_dim: int, depth: int, mlp_hidden: list[int]) -> None:
        super().__init__()
        heads = max(1, in_dim // out_dim)
        self.blocks = nn.ModuleList(
            ProjectionBlock(in_dim, out_dim if j == depth - 1 else in_dim, heads, mlp_hidden[j])
            for j in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class VFMVAEHead(nn.Module):
    """Layer features -> (mu, logvar), each (B, h*w, z_dim) on the row-major (h, w) latent grid."""

    def __init__(self, branches: list[dict], fuse: dict, unshuffle: int) -> None:
        super().__init__()
        self.unshuffle = unshuffle
        self.branches = nn.ModuleList(AttnProjection(**b) for b in branches)
        self.fuse = AttnProjection(**fuse)
        self.z_dim = fuse["out_dim"] // 2
        concat = sum(b["out_dim"] * unshuffle**2 for b in branches)
        if concat != fuse["in_dim"]:
            raise ValueError(
                f"VFM-VAE head: {len(branches)} branches x unshuffle {unshuffle}^2 give {concat} channels, "
                f"the fused projection takes {fuse['in_dim']}"
            )

    def forward(
        self, features: list[torch.Tensor], grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features: per layer (B, H*W, C) on the row-major (H, W) = ``grid`` patch grid."""
        H, W = grid
        r = self.unshuffle
        parts = []
        for x, branch in zip(features, self.branches, strict=True):
            y = branch(x)  # (B, H*W, o)
            B, _, o = y.shape
            y = y.transpose(1, 2).reshape(B, o, H, W)  # (B, o, H, W)
            y = F.pixel_unshuffle(y, r)  # (B, o*r*r, H/r, W/r), channel = c*r*r + i*r + j
            parts.append(y.flatten(2).transpose(1, 2))  # (B, h*w, o*r*r)
        z = self.fuse(torch.cat(parts, dim=-1))  # (B, h*w, 2 * z_dim)
        mu, logvar = z[..., : self.z_dim], z[..., self.z_dim :]  # channel halves, as chunk(2, dim=1) upstream
        return mu, logvar.clamp(*LOGVAR_CLAMP)


# ---------------------------------------------------------------------------------------------------
# Checkpoint: G_ema state dict -> head state dict


def split_generator_state_dict(sd: dict) -> tuple[dict, dict]:
    """G_ema state dict -> (head state dict in this module's names, frozen-tower tensors by G_ema name).

    Raises KeyError for keys of no known role (a different VFM-VAE architecture), and ValueError for a
    discrete (VQ) checkpoint, which this loader does not implement.
    """
    head, tower, unknown = {}, {}, []
    for key, value in sd.items():
        if m := _BRANCH.match(key):
            head[f"branches.{m.group(1)}.blocks.{m.group(2)}.{m.group(3)}"] = value
        elif m := _FUSE.match(key):
            head[f"fuse.blocks.{m.group(1)}.{m.group(2)}"] = value
        elif key.startswith(TOWER_PREFIX):
            tower[key] = value
        elif key.startswith("ldm_adapter.quantizer."):
            raise ValueError(
                "this VFM-VAE checkpoint is the discrete (VQ) variant (ldm_adapter.quantizer.*); only the "
                "continuous f16d32 release is supported"
            )
        elif not key.startswith(IGNORED_PREFIXES):
            unknown.append(key)
    if unknown:
        raise KeyError(
            f"VFM-VAE G_ema has keys of no known role (encoder: ldm_adapter.patch_quants/final_quant; "
            f"ignored: {', '.join(IGNORED_PREFIXES)}; tower: {TOWER_PREFIX}*): {sorted(unknown)[:10]}"
        )
    if not head:
        raise KeyError(
            "VFM-VAE checkpoint has no encoder keys (ldm_adapter.patch_quants.*, ldm_adapter.final_quant.*); "
            "a 'conv'-compression variant would have them without '.blocks.' and is not supported"
        )
    return head, tower


def _projection_spec(head_sd: dict, prefix: str) -> dict:
    """Widths of one AttnProjection from its tensors: depth, in/out width, MLP hidden per block."""
    depth = 1 + max(
        (int(k[len(prefix) :].split(".")[1]) for k in head_sd if k.startswith(prefix)), default=-1
    )
    if depth == 0:
        raise KeyError(f"VFM-VAE checkpoint lacks encoder weights {_upstream_name(prefix)}*")
    first, last = f"{prefix}blocks.0.", f"{prefix}blocks.{depth - 1}."
    try:
        in_dim = head_sd[first + "norm1.weight"].shape[0]
        out_dim = head_sd[last + "proj.weight"].shape[0]
        hidden = [head_sd[f"{prefix}blocks.{j}.mlp.w0.weight"].shape[0] for j in range(depth)]
    except KeyError as err:
        raise KeyError(f"VFM-VAE checkpoint lacks encoder weight {err} (for {prefix!r})") from None
    return {"in_dim": in_dim, "out_dim": out_dim, "depth": depth, "mlp_hidden": hidden}


def build_head(head_sd: dict, unshuffle: int, what: str = "VFM-VAE checkpoint") -> VFMVAEHead:
    """A ``VFMVAEHead`` shaped by and loaded from ``head_sd`` (this module's key names), strictly."""
    n_branches = 1 + max((int(k.split(".")[1]) for k in head_sd if k.startswith("branches.")), default=-1)
    branches = [_projection_spec(head_sd, f"branches.{i}.") for i in range(n_branches)]
    head = VFMVAEHead(branches, _projection_spec(head_sd, "fuse."), unshuffle)
    own = head.state_dict()
    missing = sorted(set(own) - set(head_sd))
    unexpected = sorted(set(head_sd) - set(own))
    shapes = [f"{k}: {tuple(head_sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in head_sd and head_sd[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or shapes:
        raise KeyError(
            f"{what}: encoder weights do not match the VFM-VAE encoder: missing {_g(missing)}, "
            f"unknown {_g(unexpected)}, shape-mismatched {shapes[:5]} (names as head.*; upstream "
            "ldm_adapter.patch_quants.{i}.0.blocks.{j}.* / ldm_adapter.final_quant.blocks.{j}.*)"
        )
    head.load_state_dict({k: v.float() for k, v in head_sd.items()})
    return head


def _upstream_name(key: str) -> str:
    """A head key back in G_ema's names, for messages."""
    key = re.sub(r"^branches\.(\d+)\.", r"ldm_adapter.patch_quants.\1.0.", key)
    return re.sub(r"^fuse\.", "ldm_adapter.final_quant.", key)


def _g(keys: list[str]) -> str:
    """Up to 8 head keys in G_ema's names, for messages."""
    return str([_upstream_name(k) for k in keys[:8]]) + ("..." if len(keys) > 8 else "")


def _dict_stand_in(qualified: str) -> type:
    """An allow-listable stand-in for the dict subclass ``qualified`` (e.g. dnnlib.util.EasyDict).

    The weights-only unpickler builds allow-listed classes with ``cls.__new__(cls)`` and then fills them
    item by item, which it permits only on exact dicts; so ``__new__`` hands back a plain ``dict``.
    """
    module, _, name = qualified.rpartition(".")

    def __new__(cls, *args, **kwargs):
        return {}

    return type(name, (dict,), {"__module__": module, "__qualname__": name, "__new__": __new__})


def load_generator_state_dict(path: Path) -> dict:
    """``torch.load(path, weights_only=True)`` -> the ``G_ema`` state dict (or the file's own state dict).

    Never unpickles arbitrary objects: if the file names globals beyond tensors and containers, only the
    allow-listed dict types (``DICT_LIKE_GLOBALS``) are accepted, read as plain dicts; anything else is
    refused with the list of what it needs.
    """
    kwargs = dict(map_location="cpu", weights_only=True)
    try:
        obj = torch.load(path, mmap=True, **kwargs)  # zip-format files: only the tensors used are read
    except Exception:
        obj = _load_restricted(path, kwargs)
    if not isinstance(obj, dict):
        raise ValueError(f"VFM-VAE checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    if "G_ema" in obj:
        obj = obj["G_ema"]
    elif not any(str(k).startswith("ldm_adapter.") for k in obj):
        raise KeyError(f"VFM-VAE checkpoint {path} has no 'G_ema' entry (top-level keys: {sorted(obj)[:8]})")
    if not isinstance(obj, dict):
        raise ValueError(f"VFM-VAE checkpoint {path}: 'G_ema' is a {type(obj).__name__}, not a state dict")
    if obj and all(str(k).startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _load_restricted(path: Path, kwargs: dict):
    """The mmap load failed: retry without mmap (legacy format), then with dict stand-ins if that is all
    the file needs. Raises RuntimeError naming any other globals."""
    try:
        return torch.load(path, **kwargs)
    except Exception as err:
        error = err
    try:
        needed = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip-format file: the globals cannot be listed without unpickling
        needed = []
    refused = [g for g in needed if g not in DICT_LIKE_GLOBALS]
    if not needed or refused:
        raise RuntimeError(
            f"could not read VFM-VAE checkpoint {path} with torch.load(weights_only=True): "
            f"{str(error).splitlines()[0]}"
            + (f"; it needs unpickling of non-tensor objects {refused}" if refused else "")
            + ". wmlab never loads with weights_only=False (that runs arbitrary pickled code). If you trust "
            "the file, re-save just the weights in the upstream environment, e.g. torch.save({'G_ema': "
            "torch.load(f, weights_only=False)['G_ema']}, 'g_ema.pth'), and pass weights='g_ema.pth'."
        ) from error
    with torch.serialization.safe_globals([(_dict_stand_in(g), g) for g in needed]):
        return torch.load(path, mmap=True, **kwargs)  # listing globals worked, so it is a zip-format file


# ---------------------------------------------------------------------------------------------------
# Weights resolution


def _hf_cached_checkpoint() -> Path | None:
    """The checkpoint in the Hugging Face cache (``hf download tiancibi/VFM-VAE <path>``); never downloads."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(CKPT_REPO, CKPT_PATH_IN_REPO)
    except Exception:
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def resolve_checkpoint(weights) -> ResolvedWeights:
    """The VFM-VAE ``.pth``: a file, a folder holding it (flat or in the HF repo layout), or the default."""
    how = (
        f"`hf download {CKPT_REPO} {CKPT_PATH_IN_REPO} "
        f"--local-dir $WMLAB_WEIGHTS_DIR/{hub_dir_name(CKPT_REPO)}` "
        f"(or from {CKPT_URL}); the SigLIP2 tower is a separate download ({SIGLIP_ID})"
    )
    if weights is not None:
        path = Path(os.fspath(weights)).expanduser()
        if path.is_dir():
            for candidate in (path / CKPT_FILE, path / CKPT_PATH_IN_REPO):
                if candidate.is_file():
                    weights = str(candidate)
                    break
            else:
                raise FileNotFoundError(
                    f"VFM-VAE weights folder {path} holds neither {CKPT_FILE} nor {CKPT_PATH_IN_REPO}. "
                    f"Licence: {LICENCE}. How to get it: {how}"
                )
    search = []
    wdir = weights_dir()
    if wdir is not None:
        search.append(wdir / hub_dir_name(CKPT_REPO) / CKPT_PATH_IN_REPO)
    cached = _hf_cached_checkpoint() if weights is None else None
    if cached is not None:
        search.append(cached)
    return resolve_weights(
        "vfm_vae", weights, default_id=None, filename_hint=CKPT_FILE, licence=LICENCE, how_to_get=how,
        download_url=CKPT_URL, search_paths=search,
    )  # fmt: skip


def resolve_siglip(weights) -> ResolvedWeights:
    resolved = resolve_weights(
        "siglip2 (VFM-VAE's frozen tower)", weights, default_id=SIGLIP_ID, licence=SIGLIP_LICENCE,
        how_to_get=f"`hf download {SIGLIP_ID}` (config.json + model.safetensors; the text tower is unused)",
    )  # fmt: skip
    if not resolved.is_dir:
        raise ValueError(
            f"siglip_weights={resolved.source!r} is a file; the SigLIP2 tower needs a Hugging Face directory "
            "(config.json + model.safetensors)"
        )
    return resolved


def load_siglip(resolved: ResolvedWeights):
    """A SigLIP(2) fixed-resolution vision tower (transformers ``SiglipVisionModel``), fp32."""
    from transformers import SiglipVisionModel

    model_type = json.loads((resolved.path / "config.json").read_text()).get("model_type")
    if model_type == "siglip2":
        raise ValueError(
            f"{resolved.path} is a NaFlex SigLIP2 checkpoint (model_type 'siglip2'); VFM-VAE uses the "
            f"fixed-resolution release {SIGLIP_ID} (model_type 'siglip')"
        )
    if model_type not in ("siglip", "siglip_vision_model"):
        raise ValueError(f"{resolved.path} holds a {model_type!r} model, not a SigLIP vision tower")
    return load_hf_model(SiglipVisionModel, resolved.path)


def compare_tower(tower_sd: dict, model: nn.Module, what: str) -> int:
    """Compare the checkpoint's frozen tower (G_ema names) with the loaded SigLIP -> tensors compared."""
    own = model.state_dict()
    compared, differ = 0, []
    for key, value in tower_sd.items():
        name = key.removeprefix(TOWER_PREFIX)
        if not name.startswith("encoder.vision_model."):
            continue  # a text tower (conditional variants) or other VFM parts: not ours to check
        name = name.removeprefix("encoder.vision_model.")
        name = name.removeprefix("vision_model.")  # transformers 4.x nests the transformer one level deeper
        if name not in own:
            continue
        compared += 1
        ref = own[name]
        if ref.shape != value.shape or not torch.allclose(ref.float(), value.float(), rtol=1e-3, atol=1e-4):
            differ.append(f"{name} {tuple(value.shape)} vs {tuple(ref.shape)}")
    if differ:
        raise ValueError(
            f"{what}: the SigLIP tower stored in the VFM-VAE checkpoint differs from the loaded SigLIP2 "
            "weights "
            f"({len(differ)} of {compared} tensors, e.g. {differ[:3]}); pass siglip_weights= pointing at "
            f"{SIGLIP_ID}, or check_tower=False to skip this check"
        )
    return compared


# ---------------------------------------------------------------------------------------------------
# The encoder


class VFMVAEEncoder(Encoder):
    """Frozen SigLIP tower + VFM-VAE head -> mu tokens (B, (S/16)^2, 32) on the row-major latent grid."""

    def __init__(
        self, tower: nn.Module, head: VFMVAEHead, *, name: str, layers, input_size: int, scale_factor: float,
        resolved: ResolvedWeights, siglip: ResolvedWeights, tower_checked: int,
    ) -> None:  # fmt: skip
        super().__init__()
        cfg = tower.config
        self.patch_size = int(cfg.patch_size)
        depth = int(cfg.num_hidden_layers)
        self.layers = tuple(int(i) for i in layers)
        for i in self.layers:
            if not -(depth + 2) <= i <= depth:
                raise ValueError(
                    f"layer {i} out of range for a {depth}-block tower (0..{depth}, or -1..-{depth + 2})"
                )
        if len(self.layers) != len(head.branches):
            raise ValueError(
                f"layers={list(self.layers)} has {len(self.layers)} entries, the checkpoint has "
                f"{len(head.branches)} feature branches"
            )
        hidden = int(cfg.hidden_size)
        for i, b in enumerate(head.branches):
            if b.blocks[0].norm1.normalized_shape[0] != hidden:
                raise ValueError(
                    f"branch {i} of the checkpoint takes {b.blocks[0].norm1.normalized_shape[0]}-d features, "
                    f"the SigLIP tower gives {hidden}-d: wrong siglip_weights?"
                )
        self.scale_factor = float(scale_factor)
        model_size = round(input_size * self.scale_factor)
        feat = model_size // self.patch_size
        if model_size % self.patch_size or feat % head.unshuffle:
            raise ValueError(
                f"input_size {input_size} x {scale_factor} = {model_size} px must give a patch grid "
                "divisible by "
                f"{head.unshuffle} (patch {self.patch_size}); use a multiple of {COMPRESSION}"
            )
        self.feature_grid = (feat, feat)
        self.tower = freeze(tower)
        self.head = freeze(head)
        g = feat // head.unshuffle
        self.info = EncoderInfo(
            name=name, num_tokens=g * g, dim=head.z_dim, grid=(g, g), input_size=input_size, frozen=True,
            weights=resolved.source, weights_sha256=resolved.sha256,
            extra={"layers": list(self.layers), "scale_factor": self.scale_factor, "model_input": model_size,
                   "patch_size": self.patch_size, "output": "mu", "mean": list(MEAN), "std": list(STD),
                   "siglip_weights": siglip.source, "siglip_sha256": siglip.sha256,
                   "weights_route": resolved.route},
        )  # fmt: skip
        self.tower_checked = tower_checked  # tensors of the checkpoint's own tower compared (0 = none stored)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """float (B, 3, H, W) in [0, 1] -> (B, 3, 2S, 2S): resize to S, x2 bilinear, (x - 0.5) / 0.5."""
        x = resize(images, self.info.input_size)  # (B, 3, S, S)
        x = F.interpolate(
            x, scale_factor=self.scale_factor, mode="bilinear", align_corners=False
        )  # (B, 3, 2S, 2S)
        return normalize(x, MEAN, STD)

    def layer_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, 2S, 2S) -> per chosen layer (B, (2S/p)^2, C), with upstream's index convention."""
        need_hidden = any(i != -1 for i in self.layers)
        out = self.tower(pixel_values=x, interpolate_pos_encoding=True, output_hidden_states=need_hidden)
        feats = []
        for i in self.layers:
            if i == -1:
                feats.append(out.last_hidden_state)  # after post_layernorm
            elif i >= 0:
                feats.append(out.hidden_states[i])  # 0 = embeddings, i = block i
            else:
                feats.append(out.hidden_states[i + 1])  # -2 = last block before post_layernorm
        return [f.float() for f in feats]

    def forward_distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model input (B, 3, 2S, 2S) -> (mu, logvar), each (B, (S/16)^2, z_dim)."""
        return self.head(self.layer_features(x), self.feature_grid)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Model input -> mu tokens (B, (S/16)^2, z_dim): deterministic, no sampling."""
        return self.forward_distribution(x)[0]


def make_vfm_vae(
    name: str = "vfm_vae",
    weights=None,
    *,
    siglip_weights=None,
    layers=DEFAULT_LAYERS,
    input_size: int = 224,
    scale_factor: float = 2.0,
    check_tower: bool = True,
) -> Encoder:
    """VFM-VAE encoder. ``weights``: the VFM-VAE ``.pth`` (or its folder; None = the default file under
    $WMLAB_WEIGHTS_DIR / the HF cache); ``siglip_weights``: the SigLIP2 tower (None = ``google/siglip2-large-
    patch16-512``). ``layers``/``scale_factor`` are the release's settings; change them only for other
    checkpoints. Both weights are looked up before either is loaded, so one error names everything missing.
    """
    errors, resolved, siglip = [], None, None
    try:
        resolved = resolve_checkpoint(weights)
    except FileNotFoundError as err:
        errors.append(str(err))
    try:
        siglip = resolve_siglip(siglip_weights)
    except FileNotFoundError as err:
        errors.append(str(err).replace("pass weights=", "pass siglip_weights="))
    if errors:
        raise FileNotFoundError("\n".join(errors))
    unshuffle = round(scale_factor * COMPRESSION / _patch_size(siglip))
    head_sd, tower_sd = split_generator_state_dict(load_generator_state_dict(resolved.path))
    head = build_head(head_sd, unshuffle, what=f"VFM-VAE checkpoint {resolved.path}")
    tower = load_siglip(siglip)
    checked = (
        compare_tower(tower_sd, tower, f"VFM-VAE checkpoint {resolved.path}")
        if check_tower and tower_sd
        else 0
    )
    return VFMVAEEncoder(
        tower, head, name=name, layers=layers, input_size=input_size, scale_factor=scale_factor,
        resolved=resolved, siglip=siglip, tower_checked=checked,
    )  # fmt: skip


def _patch_size(siglip: ResolvedWeights) -> int:
    cfg = json.loads((siglip.path / "config.json").read_text())
    return int(cfg.get("vision_config", cfg).get("patch_size", 16))
