"""Read DINO-WM checkpoints without running their code, and map their weights onto ours.

DINO-WM saves ``torch.save`` of a dict of *whole pickled modules and optimizers*. Unpickling them
normally imports DINO-WM's classes and lets the file call any function it names: a malicious
checkpoint could run code. We instead use torch's ``weights_only`` unpickler (tensors and plain
containers only) and allow exactly DINO-WM's known classes and the torch.nn / optimizer classes
they contain, each mapped to an inert stand-in (``PickledObject``) that only stores its
attributes. Any other global in the file is refused. Weights are then read from the stand-ins'
``_parameters`` / ``_buffers`` and renamed to our modules' names; sizes DINO-WM does not write
down (dim_head, tokens per frame) are recovered from weight shapes.

What is written is checked first (``validate_converted``): heads against the qkv weight, the
position embedding against the tokens per frame, every weight finite, and the converted weights
load strictly into our world model and decoder -- so a bad checkpoint fails at import, naming the
file and the entry, not later in ``plan``. An import is keyed by the source run's resolved path,
the checkpoint's sha256, the epoch chosen and ``hydra.yaml``'s sha256 (``import_key``): the same
checkpoint reuses its import, a retrained or different run (even one with the same folder name)
gets its own. The import is built aside and renamed into place, under a writer lock.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import torch
import yaml

from wmlab.data.errors import DatasetError
from wmlab.integrity import (
    KeyMismatch,
    WriterLock,
    atomic_write_json,
    atomic_write_text,
    check_key,
    keyed_dir,
    sha256_file,
    unique_tmp,
    write_key,
)
from wmlab.models.decoder import DecoderConfig
from wmlab.models.world_model import WorldModelConfig

#: Version of an imported run's layout (config.yaml, model/decoder safetensors, metadata.json,
#: decoder.json, key.json). Bump it when the conversion changes: old imports then get new keys.
IMPORT_FORMAT = 2
DEFAULT_IMPORTS_DIR = Path("outputs") / "imported"

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


def _refused_global(err: BaseException) -> str | None:
    """The class path torch's safe unpickler refused (``GLOBAL a.b.C``), searched along the cause chain."""
    while err is not None:
        match = re.search(r"GLOBAL\s+([\w.]+)", str(err))
        if match:
            return match.group(1).rstrip(".")
        err = err.__cause__ or err.__context__
    return None


def load_pickled_checkpoint(path: str | Path) -> dict:
    """Load a DINO-WM ``model_*.pth`` safely: whole modules become ``PickledObject`` stand-ins."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DINO-WM checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_stand_ins()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        refused = _refused_global(err)
        if refused is not None:
            raise DatasetError(
                f"{path}: refused global {refused} (not one of the DINO-WM classes this reader allows); "
                "refusing to load it, because unpickling it could run arbitrary code"
            ) from err
        if isinstance(err, pickle.UnpicklingError):
            # torch's message buries the reason after "WeightsUnpickler error:"; keep just that.
            detail = str(err).split("WeightsUnpickler error:")[-1].split("from a trusted source.")[-1]
            detail = " ".join(detail.split("Check the documentation")[0].split()).split(". Please")[0]
            raise DatasetError(
                f"{path} contains something that is not part of a DINO-WM checkpoint; refusing to load it, "
                f"because unpickling it could run arbitrary code ({detail})"
            ) from err
        raise DatasetError(
            f"cannot read DINO-WM checkpoint {path} (truncated or not a torch file?): {err}"
        ) from err
    if not isinstance(ckpt, dict):
        raise DatasetError(
            f"{path} holds a {type(ckpt).__name__}, not DINO-WM's checkpoint dict (epoch, predictor, "
            "action_encoder, proprio_encoder, decoder, ...); is it a DINO-WM model_*.pth?"
        )
    return ckpt


def module_state(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flatten a pickled module stand-in into a state dict (parameters and buffers)."""
    if not isinstance(obj, PickledObject):
        raise DatasetError(f"expected a pickled module at '{prefix or '<root>'}', found {type(obj).__name__}")
    state = {}
    for group in ("_parameters", "_buffers", "_modules"):
        entries = getattr(obj, group, None) or {}
        if not isinstance(entries, dict):
            raise DatasetError(
                f"'{prefix or '<root>'}' ({obj!r}) has {group} of type {type(entries).__name__}, not a dict"
            )
        for key, value in entries.items():
            if value is None:
                continue
            if group == "_modules":
                state.update(module_state(value, f"{prefix}{key}."))
            elif isinstance(value, torch.Tensor):
                state[prefix + key] = value.detach().clone()
            else:
                raise DatasetError(f"weight '{prefix}{key}' is a {type(value).__name__}, not a tensor")
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
    from wmlab.planning.planning_model import load_yaml_mapping

    path = run_dir / "hydra.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a DINO-WM run directory holds hydra.yaml and checkpoints/"
        )
    return load_yaml_mapping(path, "restore the hydra.yaml DINO-WM wrote beside this run's checkpoints")


def checkpoint_path(run_dir: Path, epoch: str | int = "latest") -> Path:
    path = run_dir / "checkpoints" / f"model_{epoch}.pth"
    if not path.is_file():
        available = sorted(p.name for p in (run_dir / "checkpoints").glob("model_*.pth"))
        raise FileNotFoundError(
            f"{path} not found; checkpoints in {run_dir / 'checkpoints'}: {available or 'none'}"
        )
    return path


def _section(hydra: dict, name: str, path: Path) -> dict:
    value = hydra.get(name) or {}
    if not isinstance(value, dict):
        raise DatasetError(f"{path}: '{name}' is a {type(value).__name__}, expected a mapping of settings")
    return value


def _entry(mapping: dict, key: str, where: str, path: Path):
    """``mapping[key]``, or a one-line error naming the file and the missing entry."""
    if key not in mapping:
        raise DatasetError(
            f"{path}: the {where} has no '{key}' (has: {sorted(mapping)[:12]}); this is not a supported "
            "DINO-WM checkpoint layout"
        )
    return mapping[key]


def convert_dino_wm_run(run_dir: str | Path, epoch: str | int = "latest") -> dict:
    """Read a DINO-WM run (``hydra.yaml`` + ``checkpoints/model_<epoch>.pth``) into our format.

    Returns {"config": WorldModelConfig, "state": world-model state dict, "decoder_config":
    DecoderConfig | None, "decoder_state": dict | None, "hydra": the raw config, "epoch": int,
    "encoder": DINO-WM's encoder settings, "frameskip": int, "checkpoint": its path}. Everything is
    validated (``validate_converted``); a checkpoint of another shape or layout is a ``DatasetError``
    naming the file and the entry, never a KeyError / TypeError / AttributeError.
    """
    run_dir = Path(run_dir)
    hydra = read_hydra_config(run_dir)
    path = checkpoint_path(run_dir, epoch)
    ckpt = load_pickled_checkpoint(path)
    try:
        converted = _convert(ckpt, hydra, path, run_dir / "hydra.yaml")
    except (KeyError, TypeError, AttributeError, IndexError, ValueError, ZeroDivisionError) as err:
        if isinstance(err, DatasetError):
            if str(err).startswith(str(path)) or str(err).startswith(str(run_dir)):
                raise
            raise DatasetError(f"{path}: {err}") from err  # every message names the file
        raise DatasetError(
            f"{path}: unexpected DINO-WM checkpoint content ({type(err).__name__}: {err}); "
            "is it a model_*.pth of a supported DINO-WM version?"
        ) from err
    validate_converted(converted, path)
    return converted


def _convert(ckpt: dict, hydra: dict, path: Path, hydra_path: Path) -> dict:
    predictor = _entry(ckpt, "predictor", "checkpoint", path)
    predictor_state = rename(module_state(predictor), _PREDICTOR_RULES, "predictor")
    state = dict(predictor_state)
    state.update(_embedding_weights(_entry(ckpt, "action_encoder", "checkpoint", path), "action_encoder",
                                    "action encoder"))  # fmt: skip
    state.update(_embedding_weights(_entry(ckpt, "proprio_encoder", "checkpoint", path), "proprio_encoder",
                                    "proprio encoder"))  # fmt: skip

    pcfg = _section(hydra, "predictor", hydra_path)
    heads = int(pcfg.get("heads", 16))
    depth = len({k.split(".")[2] for k in predictor_state if k.startswith("predictor.blocks.")})
    if depth == 0:
        raise DatasetError(f"{path}: the predictor has no transformer layers (transformer.layers.*)")
    qkv = _entry(predictor_state, "predictor.blocks.0.attn.qkv.weight", "predictor", path)
    if qkv.ndim != 2 or heads < 1 or qkv.shape[0] % (3 * heads):
        raise DatasetError(
            f"{path}: the qkv weight has shape {tuple(qkv.shape)}, not (3 x heads x dim_head, dim) for "
            f"heads={heads} ({hydra_path} predictor.heads); the checkpoint and its hydra.yaml disagree"
        )
    dim_head = qkv.shape[0] // (3 * heads)  # qkv: (3 * heads * dim_head, dim)
    pos = _entry(predictor_state, "predictor.pos_embedding", "predictor", path)  # (1, num_hist * tokens, dim)
    num_hist = int(hydra.get("num_hist", 3))
    concat_dim = int(hydra.get("concat_dim", 1))
    if num_hist < 1 or concat_dim not in (0, 1):
        raise DatasetError(f"{hydra_path}: num_hist={num_hist} / concat_dim={concat_dim} are not supported")
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[1] % num_hist or pos.shape[2] != qkv.shape[1]:
        raise DatasetError(
            f"{path}: the position embedding has shape {tuple(pos.shape)}, not (1, num_hist x tokens, "
            f"{qkv.shape[1]}) for num_hist={num_hist} ({hydra_path}) and the qkv width {qkv.shape[1]}"
        )
    num_tokens = pos.shape[1] // num_hist
    action_w, proprio_w = state["action_encoder.weight"], state["proprio_encoder.weight"]  # (Ea, A), (Ep, P)
    Ea, A = action_w.shape
    Ep, P = proprio_w.shape
    token_dim = pos.shape[2]
    visual_dim = token_dim - (Ea + Ep if concat_dim == 1 else 0)
    if visual_dim < 1 or num_tokens - (2 if concat_dim == 0 else 0) < 1:
        raise DatasetError(
            f"{path}: token width {token_dim} leaves no visual features after the action ({Ea}) and "
            f"proprio ({Ep}) embeddings (concat_dim={concat_dim})"
        )
    if int(hydra.get("num_action_repeat", 1)) != 1 or int(hydra.get("num_proprio_repeat", 1)) != 1:
        raise DatasetError("DINO-WM runs with num_action_repeat or num_proprio_repeat != 1 are not supported")
    mlp_dim = _entry(predictor_state, "predictor.blocks.0.mlp.fc1.weight", "predictor", path).shape[0]
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
            "mlp_dim": mlp_dim,
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
        first = _entry(decoder_state, "upsample.0.weight", "decoder", path)  # (channel, latent_dim, 3, 3)
        res_blocks = {k.split(".")[1] for k in decoder_state if re.match(r"upsample\.\d+\.conv\.", k)}
        last = _entry(decoder_state, f"to_pixels.{len(res_blocks) + 4}.weight", "decoder", path)
        decoder_config = DecoderConfig(
            latent_dim=first.shape[1],
            channel=first.shape[0],
            n_res_block=len(res_blocks),
            n_res_channel=decoder_state["upsample.1.conv.1.weight"].shape[0] if res_blocks else 1,
            out_channels=last.shape[1],
        )
    return {
        "config": config,
        "state": state,
        "decoder_config": decoder_config,
        "decoder_state": decoder_state,
        "hydra": hydra,
        "epoch": int(ckpt.get("epoch", -1)),
        "encoder": _section(hydra, "encoder", hydra_path),
        "frameskip": int(hydra.get("frameskip", 5)),
        "checkpoint": path,
    }


def _first_lines(err: BaseException, n: int = 3) -> str:
    return " ".join(str(err).strip().splitlines()[:n])


def validate_converted(converted: dict, path: Path) -> None:
    """Fail now, naming ``path``, if the converted weights would fail later: every weight finite, and
    the state dicts load strictly (names and shapes) into our world model and decoder."""
    from wmlab.models.decoder import LatentDecoder
    from wmlab.models.world_model import LatentWorldModel

    parts = [("world model", converted["state"]), ("decoder", converted["decoder_state"] or {})]
    for what, state in parts:
        for name, tensor in state.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise DatasetError(
                    f"{path}: {what} weight '{name}' has {bad} non-finite value(s) (NaN/inf); this "
                    "checkpoint diverged or is corrupt -- import an earlier epoch (model_epoch=<n>)"
                )
    models = [("predictor", LatentWorldModel, converted["config"], converted["state"])]
    if converted["decoder_state"] is not None:
        models.append(("decoder", LatentDecoder, converted["decoder_config"], converted["decoder_state"]))
    for what, cls, config, state in models:
        try:
            cls(config).load_state_dict(state, strict=True)
        except (RuntimeError, ValueError, TypeError) as err:
            raise DatasetError(
                f"{path}: the {what} weights do not fit its recovered sizes: {_first_lines(err)}"
            ) from err


#: DINO-WM encoder settings -> our encoder config. DINO-WM resizes frames to (img_size // 16) * 14
#: pixels (196 for 224 px frames) before DINOv2, so its 14-px patches give a 14x14 grid.
def encoder_config_for(dino_wm_encoder: dict, img_size: int = 224) -> dict:
    target = str(dino_wm_encoder.get("_target_", ""))
    name = str(dino_wm_encoder.get("name", ""))
    if "DinoV2Encoder" in target or name.startswith("dinov2"):
        sizes = {"s": "small", "b": "base", "l": "large", "g": "giant"}
        letter = name.removeprefix("dinov2_vit")[:1]
        if letter not in sizes:
            raise DatasetError(f"DINO-WM encoder name {name!r} is not a DINOv2 size (dinov2_vit[s|b|l|g]14)")
        size = sizes[letter]
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


def import_key(run_dir: str | Path, epoch: str | int = "latest") -> dict:
    """What an import depends on: the source's resolved path, the checkpoint file and its sha256, the
    epoch chosen and hydra.yaml's sha256 (a retrained ``model_latest.pth`` changes the key)."""
    run_dir = Path(run_dir)
    hydra = run_dir / "hydra.yaml"
    if not hydra.is_file():
        read_hydra_config(run_dir)  # raises the "not a DINO-WM run" message
    ckpt = checkpoint_path(run_dir, epoch)
    return {
        "kind": "dino_wm_import",
        "format": IMPORT_FORMAT,
        "source": str(run_dir.resolve()),
        "epoch": str(epoch),
        "checkpoint": ckpt.name,
        "checkpoint_sha256": sha256_file(ckpt),
        "hydra_sha256": sha256_file(hydra),
    }


def _remove_dead_partials(out: Path) -> None:
    """Temp import directories of writers that died (``.<name>.<pid>.<random>.partial``)."""
    from wmlab.integrity import _pid_alive

    for tmp in out.parent.glob(f".{out.name}.*.partial"):
        pid = tmp.name.split(".")[-3]
        if tmp.is_dir() and pid.isdigit() and not _pid_alive(int(pid), None):
            shutil.rmtree(tmp, ignore_errors=True)


def import_dino_wm(
    run_dir: str | Path, out: str | Path | None = None, epoch: str | int = "latest", *,
    imports_dir: str | Path = DEFAULT_IMPORTS_DIR,
) -> Path:  # fmt: skip
    """Convert a DINO-WM run into a wmlab run directory (safetensors, YAML, JSON; no pickles).

    ``out`` defaults to ``<imports_dir>/<run folder name>__<hash of import_key>``. An existing import
    with the same key is reused; an explicit ``out`` holding another key is refused with what differs.
    Returns the run directory, which ``PlanningModel.from_run``, ``load_run`` and ``load_decoder`` read.
    """
    run_dir = Path(run_dir)
    key = import_key(run_dir, epoch)
    explicit = out is not None
    out = Path(out) if explicit else keyed_dir(imports_dir, run_dir.name, key)
    with WriterLock(out, "DINO-WM import", wait=600):
        if _reusable_import(out, key):
            return out
        _remove_dead_partials(out)
        tmp = unique_tmp(out)  # built aside, renamed into place: never a half-written import
        try:
            _write_import(run_dir, epoch, key, tmp)
            if out.is_dir():
                out.rmdir()  # empty (checked by _reusable_import)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _reusable_import(out: Path, key: dict) -> bool:
    """True when ``out`` is a finished import of ``key``; refuses one of another key or of unknown origin."""
    if not out.exists():
        return False
    check_key(out, key, "imported DINO-WM run")
    if (out / "key.json").is_file() and (out / "config.yaml").is_file():
        return True
    if out.is_dir() and not any(out.iterdir()):
        return False
    raise KeyMismatch(
        f"{out} exists but is not an import of this checkpoint (no key.json: an older wmlab import or "
        "another directory); delete it or choose another out="
    )


def _write_import(run_dir: Path, epoch, key: dict, out: Path) -> None:
    from wmlab.runs import atomic_save_tensors, versions

    converted = convert_dino_wm_run(run_dir, epoch)
    out.mkdir(parents=True)
    hydra = converted["hydra"]
    img_size = int(hydra.get("img_size", 224))
    env = hydra.get("env") if isinstance(hydra.get("env"), dict) else {}
    config = {
        "source": "dino_wm",
        "source_run": str(run_dir),
        "env": {"name": env.get("name", "point_maze"), "img_size": img_size},
        "encoder": encoder_config_for(converted["encoder"], img_size),
        "frameskip": converted["frameskip"],
        "num_hist": converted["config"].num_hist,
        "concat_dim": converted["config"].concat_dim,
        # DINO-WM does not store normalization statistics: they come from its dataset, computed
        # over all trajectories. `wmlab plan` recomputes them that way from data=<dataset>.
        "normalization": "dino_wm_all_data",
    }
    atomic_save_tensors(converted["state"], out / "model.safetensors", {"epoch": converted["epoch"]})
    decoder = converted["decoder_config"].__dict__ if converted["decoder_config"] else None
    if converted["decoder_state"] is not None:
        atomic_save_tensors(converted["decoder_state"], out / "decoder.safetensors")
        # What `train_decoder.load_decoder` reads: an imported decoder loads like a trained one.
        atomic_write_json(out / "decoder.json", {"config": decoder, "source": "dino_wm", "step": None})
    atomic_write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    atomic_write_json(
        out / "metadata.json",
        {
            "model": converted["config"].to_dict(),
            "decoder": decoder,
            "epoch": converted["epoch"],
            "encoder": config["encoder"],
            "versions": versions(),
            "source": {"run": str(run_dir), "epoch": str(epoch), "hydra": hydra},
            "import_key": key,
        },
    )
    write_key(out, key)  # last: with config.yaml, it marks a finished import
