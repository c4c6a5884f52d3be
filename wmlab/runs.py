"""Run directories: everything needed to rebuild and resume a model, and nothing pickled.

    <run>/
      config.yaml          the resolved config the run was made with
      model.safetensors    world-model weights (latest complete epoch)
      decoder.safetensors  optional pixel decoder
      normalization.json   action/proprio z-score statistics
      metadata.json        encoder id + weight checksum, dataset fingerprint, versions, epoch, metrics
      checkpoint/          training state for resume: model, optimizer (safetensors) + state.json
      tb/                  TensorBoard events

Every file is written to a temp name and renamed, so a kill never leaves a half-written file
under a real name; ``state.json`` is written last, so a checkpoint counts only once complete.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(contiguous, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return load_file(str(path))
    except Exception as err:
        raise ValueError(f"{path} is truncated or not a safetensors file ({err})") from err


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=str))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is corrupt ({err})") from err


def write_config(path: Path, config: dict) -> None:
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))


def read_config(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is this a wmlab run directory?")
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------- optimizer state <-> safetensors
def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON (everything else)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict, extra: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in extra["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": extra["param_groups"]})


def save_training_checkpoint(
    path: Path, module: torch.nn.Module, optimizer, metadata: dict | None = None
) -> dict:
    """Module weights and optimizer tensors in one safetensors file (``model.*``, ``opt.*``).

    Returns the optimizer's non-tensor state: store it in the run's JSON, written after this file.
    """
    opt_tensors, opt_extra = optimizer_to_tensors(optimizer)
    tensors = {f"model.{k}": v for k, v in module.state_dict().items()}
    tensors.update({f"opt.{k}": v for k, v in opt_tensors.items()})
    atomic_save_tensors(tensors, path, metadata)
    return opt_extra


def load_training_checkpoint(path: Path, module: torch.nn.Module, optimizer, opt_extra: dict) -> None:
    """Restore what ``save_training_checkpoint`` wrote (``opt_extra`` from the run's JSON)."""
    tensors = load_tensors(path)
    module.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_tensors = {k[len("opt.") :]: v for k, v in tensors.items() if k.startswith("opt.")}
    optimizer_from_tensors(optimizer, opt_tensors, opt_extra)


def resumable_run(meta_path: Path, ckpt_path: Path, config: dict, what: str) -> dict | None:
    """The JSON of a training run to resume (its checkpoint and JSON both exist), or None for a fresh
    start. A run of another ``config`` is refused: resuming it would silently mix two models."""
    if not (meta_path.is_file() and ckpt_path.is_file()):
        return None
    meta = read_json(meta_path)
    if meta.get("config") != config:
        raise ValueError(
            f"{meta_path.parent} holds {what} with another config {meta.get('config')} (now {config}); "
            "use another out= or delete the directory to start over"
        )
    return meta


def versions() -> dict:
    import numpy

    import wmlab

    return {
        "wmlab": wmlab.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
