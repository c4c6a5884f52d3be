"""Read DINO-WM checkpoints without running their code, and map their weights onto ours.

DINO-WM saves ``torch.save`` of a dict of *whole pickled modules and optimizers*. Unpickling them
normally imports DINO-WM's classes and lets the file call any function it names: a malicious
checkpoint could run code. We instead use torch's ``weights_only`` unpickler (tensors and plain
containers only) and allow exactly DINO-WM's known classes and the torch.nn / optimizer classes
they contain, each mapped to an inert stand-in (``PickledObject``) that only stores its
attributes. Any other global in the file is refused. Weights are then read from the stand-ins'
``_parameters`` / ``_buffers`` and renamed to our modules' names; sizes DINO-WM does not write
down (dim_head, tokens per frame) are recovered from weight shapes.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
import yaml

from wmlab.data.errors import DatasetError
from wmlab.models.decoder import DecoderConfig
from wmlab.models.world_model import WorldModelConfig

#: Classes a DINO-WM checkpoint may contain (module, name). Anything else is refused.
KNOWN_CLASSES = [
    ("models.vit", "ViTPredictor"),
    ("models.vit", "Transformer"),
    ("models.vit", "Attention"),
    ("models.vit", "FeedForward"),
    ("models.proprio", "ProprioceptiveEmbedding"),
    ("models.vqvae", "VQVAE"),
    ("models.vqvae", "Encoder"),
    ("models.vqvae", "Decoder"),
    ("models.vqvae", "ResBlock"),
    ("models.vqvae", "Quantize"),
    ("models.dino", "DinoV2Encoder"),
    ("models.decoder.transposed_conv", "TransposedConvDecoder"),
    ("models.dummy", "DummyModel"),
    ("torch.nn.modules.linear", "Linear"),
    ("torch.nn.modules.linear", "Identity"),
    ("torch.nn.modules.normalization", "LayerNorm"),
    ("torch.nn.modules.conv", "Conv1d"),
    ("torch.nn.modules.conv", "Conv2d"),
    ("torch.nn.modules.conv", "ConvTranspose2d"),
    ("torch.nn.modules.container", "Sequential"),
    ("torch.nn.modules.container", "ModuleList"),
    ("torch.nn.modules.dropout", "Dropout"),
    ("torch.nn.modules.activation", "GELU"),
    ("torch.nn.modules.activation", "ReLU"),
    ("torch.nn.modules.activation", "Softmax"),
    ("torch.nn.modules.activation", "Tanh"),
    ("torch.optim.adamw", "AdamW"),
    ("torch.optim.adam", "Adam"),
    ("torch.optim.sgd", "SGD"),
]


class PickledObject:
    """Inert stand-in for a pickled module/optimizer: holds its attributes, runs nothing."""

    _pickled_name = "?"

    def __repr__(self) -> str:
        return f"<pickled {self._pickled_name}>"


def _plain_dict(*_default_factory) -> dict:
    """Optimizer state is pickled as defaultdict(dict); torch's safe unpickler fills only plain
    dicts, and we never use the optimizer state, so rebuild it as a plain dict."""
    return {}


def _stand_ins() -> list:
    allowed = []
    for module, name in KNOWN_CLASSES:
        stand_in = type(name, (PickledObject,), {"_pickled_name": f"{module}.{name}"})
        allowed.append((stand_in, f"{module}.{name}"))
    # Optimizer state is a defaultdict(dict); pickles of protocol 2 name builtins "__builtin__".
    allowed += [(_plain_dict, "collections.defaultdict")]
    allowed += [(set, "builtins.set"), (dict, "builtins.dict")]
    return allowed


def load_pickled_checkpoint(path: str | Path) -> dict:
    """Load a DINO-WM ``model_*.pth`` safely: whole modules become ``PickledObject`` stand-ins."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DINO-WM checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_stand_ins()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message buries the reason after "WeightsUnpickler error:"; keep just that.
        message = str(err)
        detail = message.split("WeightsUnpickler error:")[-1].split("from a trusted source.")[-1]
        detail = detail.split("Check the documentation")[0]
        detail = " ".join(detail.split()).split(". Please")[0]
        raise DatasetError(
            f"{path} contains something that is not part of a DINO-WM checkpoint; refusing to load it, "
            f"because unpickling it could run arbitrary code ({detail})"
        ) from err
    except Exception as err:
        raise DatasetError(
            f"cannot read DINO-WM checkpoint {path} (truncated or not a torch file?): {err}"
        ) from err


def module_state(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flatten a pickled module stand-in into a state dict (parameters and buffers)."""
    if not isinstance(obj, PickledObject):
        raise DatasetError(f"expected a pickled module at '{prefix or '<root>'}', found {type(obj).__name__}")
    state = {}
    for group in ("_parameters", "_buffers"):
        for key, value in (getattr(obj, group, None) or {}).items():
            if value is not None:
                state[prefix + key] = value.detach().clone() if isinstance(value, torch.Tensor) else value
    for key, child in (getattr(obj, "_modules", None) or {}).items():
        if child is not None:
            state.update(module_state(child, f"{prefix}{key}."))
    return state


_PREDICTOR_RULES = [
    (r"^pos_embedding$", "predictor.pos_embedding"),
    (r"^transformer\.layers\.(\d+)\.0\.norm\.(weight|bias)$", r"predictor.blocks.\1.attn.norm.\2"),
    (r"^transformer\.layers\.(\d+)\.0\.to_qkv\.weight$", r"predictor.blocks.\1.attn.qkv.weight"),
    (r"^transformer\.layers\.(\d+)\.0\.to_out\.0\.(weight|bias)$", r"predictor.blocks.\1.attn.proj.\2"),
    (r"^transformer\.layers\.(\d+)\.1\.net\.0\.(weight|bias)$", r"predictor.blocks.\1.mlp.norm.\2"),
    (r"^transformer\.layers\.(\d+)\.1\.net\.1\.(weight|bias)$", r"predictor.blocks.\1.mlp.fc1.\2"),
    (r"^transformer\.layers\.(\d+)\.1\.net\.4\.(weight|bias)$", r"predictor.blocks.\1.mlp.fc2.\2"),
    (r"^transformer\.norm\.(weight|bias)$", r"predictor.norm.\1"),
]
_DECODER_RULES = [
    (r"^upsample_b\.blocks\.(.+)$", r"upsample.\1"),
    (r"^dec\.blocks\.(.+)$", r"to_pixels.\1"),
    (r"^quantize_b\..+$", None),  # the codebook; unused with quantize off
]


def rename(state: dict, rules, what: str) -> dict:
    """Apply regex ``rules`` to every key; a key no rule matches is an error (nothing is dropped
    silently except what a rule maps to None)."""
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            if re.match(pattern, key):
                if replacement is not None:
                    out[re.sub(pattern, replacement, key)] = value
                break
        else:
            raise DatasetError(
                f"unexpected weight '{key}' in the DINO-WM {what}; this checkpoint layout is unknown"
            )
    return out


def _embedding_weights(obj, name: str, what: str) -> dict:
    """ProprioceptiveEmbedding: Conv1d(k=1) weight (E, D, 1) -> Linear weight (E, D)."""
    state = module_state(obj)
    try:
        weight, bias = state["patch_embed.weight"], state["patch_embed.bias"]
    except KeyError as err:
        raise DatasetError(f"the DINO-WM {what} lacks {err}") from err
    if weight.ndim != 3 or weight.shape[2] != 1:
        raise DatasetError(f"the DINO-WM {what} uses tubelet size {weight.shape[-1]}; only 1 is supported")
    return {f"{name}.weight": weight[:, :, 0].contiguous(), f"{name}.bias": bias}


def read_hydra_config(run_dir: Path) -> dict:
    path = run_dir / "hydra.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a DINO-WM run directory holds hydra.yaml and checkpoints/"
        )
    with open(path) as f:
        return yaml.safe_load(f)


def checkpoint_path(run_dir: Path, epoch: str | int = "latest") -> Path:
    path = run_dir / "checkpoints" / f"model_{epoch}.pth"
    if not path.is_file():
        available = sorted(p.name for p in (run_dir / "checkpoints").glob("model_*.pth"))
        raise FileNotFoundError(
            f"{path} not found; checkpoints in {run_dir / 'checkpoints'}: {available or 'none'}"
        )
    return path


def convert_dino_wm_run(run_dir: str | Path, epoch: str | int = "latest") -> dict:
    """Read a DINO-WM run (``hydra.yaml`` + ``checkpoints/model_<epoch>.pth``) into our format.

    Returns {"config": WorldModelConfig, "state": world-model state dict, "decoder_config":
    DecoderConfig | None, "decoder_state": dict | None, "hydra": the raw config, "epoch": int,
    "encoder": DINO-WM's encoder settings, "frameskip": int}.
    """
    run_dir = Path(run_dir)
    hydra = read_hydra_config(run_dir)
    ckpt = load_pickled_checkpoint(checkpoint_path(run_dir, epoch))
    if "predictor" not in ckpt:
        raise DatasetError(f"{run_dir} checkpoint has no predictor (keys: {sorted(ckpt)})")
    predictor_state = rename(module_state(ckpt["predictor"]), _PREDICTOR_RULES, "predictor")
    state = dict(predictor_state)
    state.update(_embedding_weights(ckpt["action_encoder"], "action_encoder", "action encoder"))
    state.update(_embedding_weights(ckpt["proprio_encoder"], "proprio_encoder", "proprio encoder"))

    pcfg = hydra.get("predictor", {})
    heads = int(pcfg.get("heads", 16))
    depth = len({k.split(".")[2] for k in predictor_state if k.startswith("predictor.blocks.")})
    qkv = predictor_state["predictor.blocks.0.attn.qkv.weight"]  # (3 * heads * dim_head, dim)
    dim_head = qkv.shape[0] // (3 * heads)
    pos = predictor_state["predictor.pos_embedding"]  # (1, num_hist * tokens, dim)
    num_hist = int(hydra.get("num_hist", 3))
    concat_dim = int(hydra.get("concat_dim", 1))
    num_tokens = pos.shape[1] // num_hist
    action_w, proprio_w = state["action_encoder.weight"], state["proprio_encoder.weight"]  # (Ea, A), (Ep, P)
    Ea, A = action_w.shape
    Ep, P = proprio_w.shape
    token_dim = pos.shape[2]
    visual_dim = token_dim - (Ea + Ep if concat_dim == 1 else 0)
    if int(hydra.get("num_action_repeat", 1)) != 1 or int(hydra.get("num_proprio_repeat", 1)) != 1:
        raise DatasetError("DINO-WM runs with num_action_repeat or num_proprio_repeat != 1 are not supported")
    config = WorldModelConfig(
        visual_dim=visual_dim,
        num_visual_tokens=num_tokens - (2 if concat_dim == 0 else 0),
        action_dim=A,
        proprio_dim=P,
        action_emb_dim=Ea,
        proprio_emb_dim=Ep,
        num_hist=num_hist,
        num_pred=int(hydra.get("num_pred", 1)),
        concat_dim=concat_dim,
        predictor={
            "depth": depth,
            "heads": heads,
            "dim_head": dim_head,
            "mlp_dim": predictor_state["predictor.blocks.0.mlp.fc1.weight"].shape[0],
            "dropout": float(pcfg.get("dropout", 0.1)),
            "emb_dropout": float(pcfg.get("emb_dropout", 0.0)),
        },
    )
    decoder_config = decoder_state = None
    if ckpt.get("decoder") is not None:
        if getattr(ckpt["decoder"], "quantize", False):
            raise DatasetError(
                "this DINO-WM decoder quantizes (quantize=True); only quantize=False is supported"
            )
        decoder_state = rename(module_state(ckpt["decoder"]), _DECODER_RULES, "decoder")
        first = decoder_state["upsample.0.weight"]  # (channel, latent_dim, 3, 3)
        res_blocks = {k.split(".")[1] for k in decoder_state if re.match(r"upsample\.\d+\.conv\.", k)}
        decoder_config = DecoderConfig(
            latent_dim=first.shape[1],
            channel=first.shape[0],
            n_res_block=len(res_blocks),
            n_res_channel=decoder_state["upsample.1.conv.1.weight"].shape[0] if res_blocks else 1,
            out_channels=decoder_state[f"to_pixels.{len(res_blocks) + 4}.weight"].shape[1],
        )
    return {
        "config": config,
        "state": state,
        "decoder_config": decoder_config,
        "decoder_state": decoder_state,
        "hydra": hydra,
        "epoch": int(ckpt.get("epoch", -1)),
        "encoder": hydra.get("encoder", {}),
        "frameskip": int(hydra.get("frameskip", 5)),
    }


#: DINO-WM encoder settings -> our encoder config. DINO-WM resizes frames to (img_size // 16) * 14
#: pixels (196 for 224 px frames) before DINOv2, so its 14-px patches give a 14x14 grid.
def encoder_config_for(dino_wm_encoder: dict, img_size: int = 224) -> dict:
    target = str(dino_wm_encoder.get("_target_", ""))
    name = str(dino_wm_encoder.get("name", ""))
    if "DinoV2Encoder" in target or name.startswith("dinov2"):
        size = {"s": "small", "b": "base", "l": "large", "g": "giant"}[name.removeprefix("dinov2_vit")[0]]
        cls = dino_wm_encoder.get("feature_key") == "x_norm_clstoken"
        return {
            "name": "dinov2_cls" if cls else "dinov2_patch",
            "size": size,
            "registers": name.endswith("_reg"),
            "input_size": (img_size // 16) * 14,
            "weights": None,
            "token_pool": 1,
        }
    if "resnet" in target.lower() or name.startswith("resnet"):
        return {"name": "resnet18", "output": "pooled", "weights": None, "token_pool": 1}
    if "r3m" in target.lower() or name.startswith("r3m"):
        return {"name": "r3m", "weights": None, "token_pool": 1}
    raise DatasetError(f"DINO-WM encoder {dino_wm_encoder} has no wmlab equivalent yet")


def import_dino_wm(run_dir: str | Path, out: str | Path | None = None, epoch: str | int = "latest") -> Path:
    """Convert a DINO-WM run into a wmlab run directory (safetensors, YAML, JSON; no pickles)."""
    from wmlab.runs import atomic_save_tensors, versions, write_config, write_json

    run_dir = Path(run_dir)
    converted = convert_dino_wm_run(run_dir, epoch)
    out = Path(out) if out else Path("outputs") / "imported" / run_dir.name
    out.mkdir(parents=True, exist_ok=True)
    hydra = converted["hydra"]
    img_size = int(hydra.get("img_size", 224))
    config = {
        "source": "dino_wm",
        "source_run": str(run_dir),
        "env": {"name": hydra.get("env", {}).get("name", "point_maze"), "img_size": img_size},
        "encoder": encoder_config_for(converted["encoder"], img_size),
        "frameskip": converted["frameskip"],
        "num_hist": converted["config"].num_hist,
        "concat_dim": converted["config"].concat_dim,
        # DINO-WM does not store normalization statistics: they come from its dataset, computed
        # over all trajectories. `wmlab plan` recomputes them that way from data=<dataset>.
        "normalization": "dino_wm_all_data",
    }
    atomic_save_tensors(converted["state"], out / "model.safetensors", {"epoch": converted["epoch"]})
    if converted["decoder_state"] is not None:
        atomic_save_tensors(converted["decoder_state"], out / "decoder.safetensors")
    write_config(out / "config.yaml", config)
    write_json(
        out / "metadata.json",
        {
            "model": converted["config"].to_dict(),
            "decoder": converted["decoder_config"].__dict__ if converted["decoder_config"] else None,
            "epoch": converted["epoch"],
            "encoder": config["encoder"],
            "versions": versions(),
            "source": {"run": str(run_dir), "epoch": str(epoch), "hydra": hydra},
        },
    )
    return out
