"""Run directories and training checkpoints: everything needed to rebuild and resume a model, nothing pickled.

    <run>/
      config.yaml          the resolved config the run was made with
      model.safetensors    world-model weights: an *export* of the checkpoint, tagged with it
      decoder.safetensors  optional pixel decoder
      normalization.json   action/proprio z-score statistics
      metadata.json        encoder id + weight checksum, dataset fingerprint, versions, epoch, metrics
                           (also an export of the checkpoint)
      checkpoint/checkpoint.safetensors   the training state: ONE file, ONE atomic unit
      tb/                  TensorBoard events

**One checkpoint, one file.** A checkpoint is a single safetensors file holding the module weights
(``model.*``), the optimizer tensors (``opt.*``), optionally the RNG state (``rng.*``), and in its
safetensors metadata the JSON state (step/epoch, metrics history, optimizer scalars and param groups,
config, config changes) plus where its exports go. It is serialised in memory and written with
``integrity.atomic_write_with`` (unique temp name, fsync, rename): weights and state cannot disagree,
and a kill or a full disk leaves the previous checkpoint whole.

**Exports never lead.** The files other code reads (``model.safetensors``, ``metadata.json``; the VAE's
``vae.safetensors`` + ``vae.json`` ...) are written *after* the checkpoint commits, and each weights export
carries ``checkpoint_sha256`` + ``checkpoint_progress`` in its metadata. ``sync_exports`` (on resume and
on load) re-exports from the checkpoint when the export lags (a kill between commit and export) and
refuses an export that disagrees (newer than the checkpoint, or same step with another hash).

Run directories of the older layout (``checkpoint/{model,optimizer}.safetensors`` + ``state.json``;
JSON-state checkpoints of the VAE/MDN-RNN/tokenizer/decoder; imported DINO-WM runs with no checkpoint
at all) are still read; the next save writes the one-file layout.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import inspect
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from wmlab import integrity
from wmlab.integrity import LockHeld, UserError, WriterLock, fingerprint, sha256_file

CHECKPOINT_FORMAT = "wmlab-checkpoint"
CHECKPOINT_VERSION = 1
RUN_CHECKPOINT = Path("checkpoint") / "checkpoint.safetensors"  # of a world-model run (wmlab train)
# Disk errors a user fixes (free space, permissions): reported as a one-line CheckpointWriteError.
DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}


class CheckpointWriteError(UserError, OSError):
    """A checkpoint or export could not be written (disk full, read-only); the last good one is intact."""


class ResumeMismatch(UserError, ValueError):
    """The output directory holds a run of another config; resuming it would mix two models."""


class ExportMismatch(UserError):
    """An exported file disagrees with the checkpoint that should have produced it."""


# ------------------------------------------------------------------------------ plain files
def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (``integrity.atomic_write_text``: unique temp name, fsync, rename)."""
    integrity.atomic_write_text(path, text)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """Save ``tensors`` as safetensors atomically; ``metadata`` values are stored as strings."""
    from safetensors.torch import save

    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = save(contiguous, metadata={k: str(v) for k, v in (metadata or {}).items()})
    integrity.atomic_write_bytes(path, data)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return load_file(str(path))
    except Exception as err:
        raise ValueError(f"{path} is truncated or not a safetensors file ({err})") from err


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON atomically (``integrity.atomic_write_json``)."""
    integrity.atomic_write_json(path, data)


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


def _safetensors_metadata(path: Path) -> dict | None:
    """The string metadata of a safetensors file (header only), or None if absent/unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception:
        return None


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


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, settings: list[dict]) -> list[str]:
    """Set each param group's hyper-parameters (``settings[i]`` for group i, e.g. ``{"lr": 1e-4}``).

    Used after a resume so the *current* config wins over the settings saved in the checkpoint (a
    user lowering the learning rate after a NaN needs that). Returns ``"group i lr: old -> new"``
    lines for what changed, to be recorded in the run's metadata.
    """
    if len(settings) != len(optimizer.param_groups):
        raise ValueError(f"{len(settings)} settings for {len(optimizer.param_groups)} param groups")
    changes = []
    for i, (group, wanted) in enumerate(zip(optimizer.param_groups, settings)):
        for name, value in wanted.items():
            if group.get(name) != value:
                changes.append(f"group {i} {name}: {group.get(name)!r} -> {value!r}")
                group[name] = value
    return changes


# ------------------------------------------------------------------------------ fault hooks
_FAULT_COUNTS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Test hook: ``WMLAB_FAULT_KILL=<name>[:<n>]`` SIGKILLs this process at the n-th pass (default 1st).

    Named points: ``checkpoint_tmp_written`` (temp file complete, not yet renamed),
    ``checkpoint_committed`` (renamed, exports not yet written), ``export_weights_written``
    (weights exported, JSON not yet). Costs one dict lookup when unset.
    """
    wanted = os.environ.get("WMLAB_FAULT_KILL")
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _disk_error(err: OSError, path: Path, intact: str) -> CheckpointWriteError:
    reason = os.strerror(err.errno) if err.errno else str(err)
    return CheckpointWriteError(
        f"could not write {path}: {reason} (errno {errno.errorcode.get(err.errno, err.errno)}). {intact} "
        f"Free disk space or make {path.parent} writable (or choose another output directory), then "
        "re-run the same command to resume."
    )


# ------------------------------------------------------------------------------ checkpoints
def commit_checkpoint(
    path: Path,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    *,
    progress: int,
    exports: dict | None = None,
    rng: bool | dict[str, torch.Tensor] = False,
) -> dict:
    """Write the whole training state as ONE safetensors file, atomically; then write its exports.

    Args:
        path: the checkpoint file.
        module, optimizer: their tensors go in as ``model.*`` / ``opt.*``.
        state: JSON state (step, history, config ...); stored in the file's metadata. It is also the
            content of the JSON export (plus ``checkpoint`` = the tag).
        progress: a number that grows with training (optimizer steps): orders checkpoints and exports.
        exports: where the exports go, paths relative to ``path.parent``:
            ``{"weights": "../model.safetensors", "weights_metadata": {...}, "json": "../metadata.json"}``.
        rng: also store RNG state (restored by ``load_checkpoint(..., rng=True)``): True = this
            process's ``rng_state()`` (CPU generator, and the current CUDA device's when CUDA is in
            use); or a dict ``{name: ByteTensor}`` stored as ``rng.<name>`` (a DDP job stores every
            rank's: ``torch``, ``cuda`` for rank 0, ``rank<r>.torch``, ``rank<r>.cuda`` for the others).
    Returns:
        the tag ``{"checkpoint_sha256", "checkpoint_progress"}`` stamped on the exports.
    Raises:
        CheckpointWriteError: disk full / read-only; the previous checkpoint is left whole.
    """
    from safetensors.torch import save

    opt_tensors, opt_extra = optimizer_to_tensors(optimizer)
    tensors = {f"model.{k}": v for k, v in module.state_dict().items()}
    tensors.update({f"opt.{k}": v for k, v in opt_tensors.items()})
    if rng:
        states = rng_state() if rng is True else rng
        tensors.update({f"rng.{name}": state for name, state in states.items()})
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "format_version": str(CHECKPOINT_VERSION),
        "progress": str(int(progress)),
        "state": json.dumps(state, default=str),
        "optimizer": json.dumps(opt_extra, default=str),
        "exports": json.dumps(exports or {}),
    }
    data = save(tensors, metadata=metadata)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
        fault_point("checkpoint_tmp_written")

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        integrity.atomic_write_with(path, write)
    except OSError as err:
        if err.errno in DISK_ERRNOS:
            raise _disk_error(err, path, "The last good checkpoint (the previous one) is intact.") from err
        raise
    fault_point("checkpoint_committed")
    tag = {"checkpoint_sha256": hashlib.sha256(data).hexdigest(), "checkpoint_progress": int(progress)}
    write_exports(path, {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")},
                  {**state, "optimizer": opt_extra}, exports or {}, tag)  # fmt: skip
    return tag


def _export_path(ckpt_path: Path, relative: str) -> Path:
    return Path(os.path.normpath(Path(ckpt_path).parent / relative))  # "<run>/checkpoint/../x" -> "<run>/x"


def write_exports(path: Path, weights: dict, record: dict, exports: dict, tag: dict) -> None:
    """Write a committed checkpoint's exports (tagged weights, then JSON); disk errors -> one line."""
    try:
        if exports.get("weights"):
            meta = {**exports.get("weights_metadata", {}), **tag}
            atomic_save_tensors(weights, _export_path(path, exports["weights"]), meta)
            fault_point("export_weights_written")
        if exports.get("json"):
            write_json(_export_path(path, exports["json"]), {**record, "checkpoint": tag})
    except OSError as err:
        if err.errno in DISK_ERRNOS:
            raise _disk_error(
                err, path.parent, f"The checkpoint {path} was saved; its exports are re-written on resume."
            ) from err
        raise


def read_checkpoint(path: Path) -> dict | None:
    """The header of a one-file checkpoint (no tensors read): ``{"state", "optimizer", "exports",
    "progress"}``; None if ``path`` is absent or an older-layout file (no embedded state)."""
    if not Path(path).is_file():
        return None
    meta = _safetensors_metadata(path)
    if meta is None:
        raise ValueError(f"{path} is truncated or not a safetensors file; delete it to start over")
    if meta.get("format") != CHECKPOINT_FORMAT:
        return None
    return {
        "state": json.loads(meta["state"]),
        "optimizer": json.loads(meta["optimizer"]),
        "exports": json.loads(meta.get("exports", "{}")),
        "progress": int(meta["progress"]),
    }


def rng_state(device=None) -> dict[str, torch.Tensor]:
    """This process's RNG state: ``{"torch": CPU generator[, "cuda": CUDA generator of device]}``.

    device: the CUDA device whose generator is saved (default: the current one, if CUDA has been
    initialised; a CPU run saves none)."""
    states = {"torch": torch.get_rng_state()}
    if device is not None and torch.device(device).type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    elif device is None and torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_state(states: dict[str, torch.Tensor], device=None) -> None:
    """Set the generators saved by ``rng_state`` (a ``cuda`` state only where CUDA is available)."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        cuda = torch.device(device) if device is not None and torch.device(device).type == "cuda" else None
        torch.cuda.set_rng_state(states["cuda"], cuda if cuda is not None else "cuda")


def load_checkpoint(
    path: Path, module: torch.nn.Module, optimizer=None, *, rng: bool | str = False, device=None
) -> dict:
    """Restore module (+ optimizer, + RNG) from a one-file checkpoint; returns its JSON state.

    rng: True restores ``rng.torch`` / ``rng.cuda``; a prefix such as ``"rank1."`` restores
    ``rng.rank1.torch`` / ``rng.rank1.cuda`` (a DDP rank's own streams; absent ones are left as they are).
    device: the CUDA device whose generator gets the saved CUDA state."""
    header = read_checkpoint(path)
    if header is None:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} file")
    tensors = load_tensors(path)
    module.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    if optimizer is not None:
        opt = {k[len("opt.") :]: v for k, v in tensors.items() if k.startswith("opt.")}
        optimizer_from_tensors(optimizer, opt, header["optimizer"])
    if rng:
        prefix = "rng." + ("" if rng is True else str(rng))
        restore_rng_state(
            {name: tensors[prefix + name] for name in ("torch", "cuda") if prefix + name in tensors}, device
        )
    return header["state"]


def checkpoint_tag(path: Path) -> dict:
    header = read_checkpoint(path)
    return {"checkpoint_sha256": sha256_file(path), "checkpoint_progress": header["progress"]}


def export_state(ckpt_path: Path) -> str:
    """How the exports of ``ckpt_path`` stand: ``"none"`` (no one-file checkpoint, or it names no
    export), ``"current"``, or ``"lags"`` (an export missing, untagged, or older: re-export them).

    Raises ExportMismatch for an export newer than the checkpoint or of the same step with another
    hash: something other than this checkpoint wrote it, and which one is right cannot be told.
    """
    header = read_checkpoint(ckpt_path)
    if header is None or not (header["exports"].get("weights") or header["exports"].get("json")):
        return "none"
    tags = []  # (export path, its tag or None)
    if header["exports"].get("weights"):
        export = _export_path(ckpt_path, header["exports"]["weights"])
        tags.append((export, _safetensors_metadata(export) if export.is_file() else None))
    if header["exports"].get("json"):
        export = _export_path(ckpt_path, header["exports"]["json"])
        try:
            tags.append((export, read_json(export).get("checkpoint")))
        except (FileNotFoundError, ValueError):
            tags.append((export, None))
    state = "current"
    for export, tag in tags:
        if not tag or "checkpoint_sha256" not in tag:
            state = "lags"
            continue
        progress = int(tag.get("checkpoint_progress", -1))
        if progress < header["progress"]:
            state = "lags"  # decided without hashing the checkpoint
            continue
        mine = checkpoint_tag(ckpt_path)
        if progress == mine["checkpoint_progress"] and tag["checkpoint_sha256"] == mine["checkpoint_sha256"]:
            continue
        raise ExportMismatch(
            f"{export} (step {progress}, checkpoint {str(tag['checkpoint_sha256'])[:12]}) disagrees with "
            f"{ckpt_path} (step {mine['checkpoint_progress']}, {mine['checkpoint_sha256'][:12]}): it was "
            f"written by another run or by hand. Delete {export} to re-export it from the checkpoint, "
            "or restore the matching checkpoint."
        )
    return state


def sync_exports(ckpt_path: Path) -> bool:
    """Re-export a checkpoint whose exports lag (kill between commit and export). Caller holds the
    run's WriterLock. Returns True if it re-exported. Raises ExportMismatch (see ``export_state``)."""
    if export_state(ckpt_path) != "lags":
        return False
    header = read_checkpoint(ckpt_path)
    tensors = load_tensors(ckpt_path)
    weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    record = {**header["state"], "optimizer": header["optimizer"]}
    write_exports(ckpt_path, weights, record, header["exports"], checkpoint_tag(ckpt_path))
    return True


def ensure_exports(ckpt_path: Path, lock_target: Path, what: str) -> str:
    """For readers: repair lagging exports under the writer lock. Returns the exports' state after it:
    ``"lags"`` only if they could not be repaired (a live writer holds the lock and is about to write
    them itself, or the run is read-only); then read the checkpoint itself (``checkpoint_weights``)."""
    try:
        state = export_state(ckpt_path)
    except FileNotFoundError:
        return "none"
    if state != "lags":
        return state
    try:
        with WriterLock(lock_target, what):
            sync_exports(ckpt_path)
        return "current"
    except (LockHeld, OSError):
        return "lags"


def checkpoint_weights(ckpt_path: Path) -> dict[str, torch.Tensor]:
    """The module weights (``model.*``, prefix stripped) of a one-file checkpoint."""
    return {k[len("model.") :]: v for k, v in load_tensors(ckpt_path).items() if k.startswith("model.")}


# ------------------------------------------------------------ the runs.py-based trainers' helpers
def save_training_checkpoint(
    path: Path, module: torch.nn.Module, optimizer, metadata: dict | None = None, *,
    state: dict | None = None, progress: int | None = None, exports: dict | None = None,
) -> dict:  # fmt: skip
    """One-file checkpoint (``commit_checkpoint``) for the VAE, MDN-RNN, tokenizer and decoder stages.

    ``state`` is the stage's JSON record (its exported ``<stage>.json``); ``progress`` its step
    (defaults to ``metadata["step"]`` / ``state["step"]``). Returns the optimizer's non-tensor state.
    """
    state = dict(state or {})
    step = progress if progress is not None else int((metadata or {}).get("step", state.get("step", 0)))
    commit_checkpoint(path, module, optimizer, state, progress=step, exports=exports)
    return optimizer_to_tensors(optimizer)[1]


def load_training_checkpoint(path: Path, module: torch.nn.Module, optimizer, opt_extra: dict | None = None):
    """Restore what ``save_training_checkpoint`` wrote; returns the checkpoint's JSON state.

    An older-layout checkpoint (tensors only; optimizer scalars in the stage JSON) needs ``opt_extra``.
    """
    if read_checkpoint(path) is not None:
        return load_checkpoint(path, module, optimizer)
    if opt_extra is None:
        raise ValueError(f"{path} is an older-layout checkpoint: pass the optimizer state of its JSON")
    tensors = load_tensors(path)
    module.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_tensors = {k[len("opt.") :]: v for k, v in tensors.items() if k.startswith("opt.")}
    optimizer_from_tensors(optimizer, opt_tensors, opt_extra)
    return None


def resumable_run(meta_path: Path, ckpt_path: Path, config: dict, what: str) -> dict | None:
    """The state of a training run to resume, or None for a fresh start.

    The state comes from the checkpoint itself (its exports are repaired if they lag; ``meta_path``
    is only read for an older-layout checkpoint, whose JSON held the state). A run of another
    ``config`` is refused with what differs: resuming it would silently mix two models.
    """
    integrity.clean_partials(ckpt_path.parent)  # temp files of writers killed mid-write
    header = read_checkpoint(ckpt_path) if ckpt_path.is_file() else None
    if header is not None and header["state"]:
        sync_exports(ckpt_path)
        meta = {**header["state"], "optimizer": header["optimizer"]}
    elif meta_path.is_file() and ckpt_path.is_file():
        meta = read_json(meta_path)  # older layout (or a checkpoint saved without its state)
    else:
        return None
    if meta.get("config") != config:
        diff = "; ".join(integrity.key_differences(meta.get("config") or {}, config))
        raise ResumeMismatch(
            f"{ckpt_path.parent} holds {what} with another config ({diff}); "
            "use another out= or delete the directory to start over"
        )
    return meta


def locked_run(argument: str, what: str) -> Callable:
    """Decorator: hold ``WriterLock(<value of argument>, what)`` while the function runs, so a
    second writer of that output directory is refused with who holds it."""

    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            target = Path(signature.bind(*args, **kwargs).arguments[argument])
            with WriterLock(target, what):
                return function(*args, **kwargs)

        return wrapper

    return decorate


def trained_epochs(run_dir: str | Path) -> int:
    """Epochs a world-model run has completed (0 if none), from its checkpoint; any layout."""
    run_dir = Path(run_dir)
    header = read_checkpoint(run_dir / RUN_CHECKPOINT)
    if header is not None:
        return int(header["state"].get("epoch", 0))
    legacy = run_dir / "checkpoint" / "state.json"
    return int(read_json(legacy).get("epoch", 0)) if legacy.is_file() else 0


# ------------------------------------------------------------------------------ run identity
# Keys of a run's config that say where and how a process ran, not what the model is.
VOLATILE_CONFIG_KEYS = ("run_dir", "ckpt_base_path", "model_name", "data_root", "data", "device",
                        "progress", "resume", "hydra")  # fmt: skip


def run_identity(run_dir: str | Path) -> dict:
    """What a run *is*, for keying caches built from it (plan cells, study cells).

    Returns ``{"config_fingerprint": fingerprint(config.yaml without VOLATILE_CONFIG_KEYS, training),
    "weights_sha256": sha256 of model.safetensors, "normalization_sha256": ... or None,
    "dataset_fingerprint": ... or None}``. Two runs with equal
    identities plan identically; retraining, resuming for more epochs or moving the run to another
    directory is reflected (or not) accordingly. A lagging export is repaired first (so the hash
    names the checkpoint's weights); works for imported DINO-WM runs (no checkpoint).
    """
    run_dir = Path(run_dir)
    ckpt = run_dir / RUN_CHECKPOINT
    if ckpt.is_file():
        ensure_exports(ckpt, run_dir, "training run")
    # training.* only shapes the weights, which are hashed themselves: a resumed or re-run run with
    # other epochs or lr but the same weights is the same model.
    config = {k: v for k, v in (read_config(run_dir / "config.yaml") or {}).items()
              if k not in (*VOLATILE_CONFIG_KEYS, "training")}  # fmt: skip
    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: is {run_dir} a trained wmlab run?")
    meta_path, norm = run_dir / "metadata.json", run_dir / "normalization.json"
    meta = read_json(meta_path) if meta_path.is_file() else {}
    return {
        "config_fingerprint": fingerprint(config),
        "weights_sha256": sha256_file(weights),
        "normalization_sha256": sha256_file(norm) if norm.is_file() else None,
        "dataset_fingerprint": (meta.get("dataset") or {}).get("fingerprint"),
    }


def versions() -> dict:
    import platform
    from importlib import metadata

    import numpy

    import wmlab

    found = {}
    for package in VERSIONED_PACKAGES:  # the libraries results depend on, where installed
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {
        "wmlab": wmlab.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        **found,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


VERSIONED_PACKAGES = ("transformers", "hydra-core", "mujoco", "gymnasium", "zarr", "safetensors", "scipy")


# ------------------------------------------------------------------ world-model run directories
RUN_WHAT = "training run"  # how a world-model run directory is named in lock messages


def resolve_device(name: str) -> torch.device:
    """``auto`` = cuda when available, else cpu; or any torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def encoder_kwargs(enc_cfg: dict) -> dict:
    return {k: v for k, v in enc_cfg.items() if k not in ("name", "weights", "token_pool")}


def build_encoder(enc_cfg: dict, device: torch.device):
    """The frozen encoder a run's ``encoder`` config names, on ``device``, in eval mode, no gradients."""
    from wmlab.encoders import make_encoder

    encoder = make_encoder(
        enc_cfg["name"], weights=enc_cfg.get("weights"), token_pool=enc_cfg.get("token_pool", 1),
        **encoder_kwargs(enc_cfg),
    )  # fmt: skip
    return encoder.to(device).eval().requires_grad_(False)


def find_feature_cache(store, encoder):
    """The frozen-feature cache of (dataset, encoder) if it was built, else None (encode on the fly).

    A cache that exists but is stale or incomplete is an error, never silently bypassed.
    """
    from wmlab.data.feature_cache import cache_path, encode_command, open_feature_cache

    path = cache_path(store.path, encoder.info)
    if not path.exists():
        return None
    if not (path / "zarr.json").is_file():
        # A cache appears only complete (built aside, then renamed), so a directory without its root
        # metadata is damage; encoding on the fly instead would hide it and change the run's speed.
        from wmlab.data.errors import DatasetError

        raise DatasetError(
            f"the feature cache at {path} is damaged (its zarr.json is missing). Delete the directory "
            f"and rebuild it: {encode_command(store.path, info=encoder.info)}"
        )
    return open_feature_cache(store, encoder.info)


def load_run(run_dir: str | Path, device="cpu"):
    """Rebuild a trained model from its run directory alone: (LatentWorldModel in eval mode, config)."""
    from wmlab.models.world_model import LatentWorldModel, WorldModelConfig

    run_dir = Path(run_dir)
    weights = run_dir / "model.safetensors"
    state = None
    if (run_dir / RUN_CHECKPOINT).is_file():  # repair an export that lags; refuse one that disagrees
        if ensure_exports(run_dir / RUN_CHECKPOINT, run_dir, RUN_WHAT) == "lags":
            state = checkpoint_weights(run_dir / RUN_CHECKPOINT)  # unrepairable now: the newest committed
    cfg = read_config(run_dir / "config.yaml")
    meta = read_json(run_dir / "metadata.json")
    model = LatentWorldModel(WorldModelConfig(**meta["model"]))
    model.load_state_dict(state if state is not None else load_tensors(weights))
    return model.to(device).eval(), cfg
