"""Where an encoder's weights come from: one resolution order for every family, a checksum, a clear error.

``resolve_weights(family, weights, default_id=..., ...)`` turns what the user passed as ``weights=`` into a
local path, without ever touching a model class:

- ``weights`` an existing **directory**: a Hugging Face ``save_pretrained`` layout (config.json +
  model.safetensors), used as is.
- ``weights`` an existing **file**: an original checkpoint (``.pth`` / ``.pt``); the family converts it.
- ``weights`` a **hub id** (``org/name``), or None for the family default (``default_id``), tried in order:

  1. ``$WMLAB_WEIGHTS_DIR/<org>__<name>/`` (a directory in the HF layout; the offline, shared-disk route),
  2. the Hugging Face cache (``huggingface_hub.snapshot_download(id, local_files_only=True)``),
  3. only for the family default (``weights=None``): the original checkpoint file ``filename_hint``
     under ``$WMLAB_WEIGHTS_DIR/`` and then in ``search_paths`` (e.g. torch.hub's
     ``~/.cache/torch/hub/checkpoints/`` where DINO-WM users already have DINOv2, or ``~/.r3m/``),
  4. a download from the Hugging Face Hub, unless ``HF_HUB_OFFLINE=1`` or ``WMLAB_OFFLINE=1``,
  5. else ``FileNotFoundError`` naming the id/file, its source URL, its licence, how to get it (gated
     repos: accept the licence on the model page, then ``hf auth login`` / ``huggingface-cli login``)
     and where to put it.

Local copies come before a download, so a machine that already holds the weights never reaches the
network. ``ResolvedWeights.sha256`` is the checksum of the weight bytes (the runs and the feature cache
record it); ``ResolvedWeights.source`` is what ``EncoderInfo.weights`` records: the hub id when the
weights came from one, else the local path.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

#: Files that hold the weights of a Hugging Face directory, in order of preference (the first pattern
#: that matches anything wins; sharded checkpoints match several files).
_HF_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")

_TRUTHY = {"1", "true", "yes", "on"}

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class ResolvedWeights:
    """A local copy of an encoder's weights.

    path: a directory in the HF layout, or an original checkpoint file.
    source: what to record as ``EncoderInfo.weights``: the hub id, or the local path as given.
    sha256: hex sha256 of the weight file(s) (see ``weights_sha256``).
    route: how it was found: "path", "weights_dir", "hf_cache", "original_file" or "hf_download".
    """

    path: Path
    source: str
    sha256: str
    route: str = "path"

    @property
    def is_dir(self) -> bool:
        return self.path.is_dir()


def weights_dir() -> Path | None:
    """``$WMLAB_WEIGHTS_DIR`` as a Path (user ``~`` expanded), or None when unset/empty."""
    value = os.environ.get("WMLAB_WEIGHTS_DIR", "").strip()
    return Path(value).expanduser() if value else None


def offline() -> bool:
    """True when downloads are off: ``WMLAB_OFFLINE`` or ``HF_HUB_OFFLINE`` set to 1/true/yes/on."""
    if any(os.environ.get(k, "").strip().lower() in _TRUTHY for k in ("WMLAB_OFFLINE", "HF_HUB_OFFLINE")):
        return True
    try:  # huggingface_hub reads HF_HUB_OFFLINE once at import; honour that too
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def hub_dir_name(hub_id: str) -> str:
    """``facebook/dinov2-small`` -> ``facebook__dinov2-small`` (the folder name under $WMLAB_WEIGHTS_DIR)."""
    return hub_id.replace("/", "__")


def torch_hub_checkpoint(filename: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps ``filename`` (respects $TORCH_HOME)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def looks_like_hub_id(value: str) -> bool:
    """``org/name`` with no path syntax (no leading ``.``/``/``/``~``, one slash, no backslash)."""
    if value.startswith((".", "/", "~")) or "\\" in value or value.count("/") != 1:
        return False
    org, name = value.split("/")
    return bool(org) and bool(name) and not name.endswith((".pth", ".pt", ".safetensors", ".bin"))


def hf_weight_files(directory: Path) -> list[Path]:
    """The weight files of an HF directory, sorted by name (safetensors preferred over .bin)."""
    for pattern in _HF_WEIGHT_PATTERNS:
        files = sorted(p for p in directory.glob(pattern) if p.is_file())
        if files:
            return files
    return []


def _file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of one file, read in 4 MiB chunks (multi-GB checkpoints never sit in memory)."""
    path = path.resolve()  # the HF cache stores symlinks into blobs/; hash the bytes
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:  # a giant ViT is GBs: hash it once per process
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 of a weights file, or of a directory's weight files.

    A file: its own sha256 (equal to ``sha256sum file``). A directory with one weight file
    (model.safetensors): that file's sha256. A sharded directory: sha256 over the per-file digests,
    in sorted file-name order, so the value depends only on the weight bytes and their order.
    """
    path = Path(path)
    if path.is_file():
        return _file_sha256(path)
    files = hf_weight_files(path)
    if not files:
        raise FileNotFoundError(
            f"{path} holds no weight files (looked for {', '.join(_HF_WEIGHT_PATTERNS)}); a Hugging Face "
            "directory needs config.json and model.safetensors (what save_pretrained writes)"
        )
    if len(files) == 1:
        return _file_sha256(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{_file_sha256(f)}\n".encode())
    return h.hexdigest()


def _valid_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and bool(hf_weight_files(path))


def _hf_cache_lookup(hub_id: str) -> Path | None:
    """The cached snapshot of ``hub_id`` if it holds config.json + weights; never downloads."""
    try:
        import huggingface_hub
    except ImportError:
        return None
    try:
        snapshot = Path(huggingface_hub.snapshot_download(hub_id, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError, a malformed id, an empty cache: all mean "not cached"
        return None
    return snapshot if _valid_hf_dir(snapshot) else None


def _hf_download(hub_id: str) -> Path:
    """Download config + weights of ``hub_id`` (safetensors when the repo has them, else .bin)."""
    import huggingface_hub

    for patterns in (["*.json", "*.safetensors"], ["*.json", "pytorch_model*.bin"]):
        snapshot = Path(huggingface_hub.snapshot_download(hub_id, allow_patterns=patterns))
        if _valid_hf_dir(snapshot):
            return snapshot
    raise FileNotFoundError(f"the Hugging Face repo {hub_id} has no config.json + weight files")


def _not_found(
    family: str,
    wanted: str,
    *,
    hub_id: str | None,
    filename_hint: str | None,
    looked: list[str],
    licence: str,
    how_to_get: str,
    download_url: str | None,
    gated: bool,
    cause: str | None = None,
) -> FileNotFoundError:
    lines = [f"{family} weights {wanted!r} not found."]
    lines.append("  Looked in: " + ("; ".join(looked) if looked else "nothing (no default)"))
    if cause:
        lines.append(f"  Download failed: {cause}")
    elif hub_id is not None and offline():
        lines.append("  Downloads are off (HF_HUB_OFFLINE or WMLAB_OFFLINE is set).")
    if hub_id is not None:
        lines.append(f"  Source: https://huggingface.co/{hub_id}")
    if download_url:
        lines.append(f"  Original checkpoint: {download_url}")
    lines.append(f"  Licence: {licence}")
    if gated and hub_id is not None:
        lines.append(
            f"  Gated: accept the licence at https://huggingface.co/{hub_id} with your account, then log in "
            "on this machine with `hf auth login` (older huggingface_hub: `huggingface-cli login`) or set "
            "HF_TOKEN."
        )
    if how_to_get:
        lines.append(f"  How to get it: {how_to_get}")
    where = []
    if hub_id is not None:
        where.append(
            f"$WMLAB_WEIGHTS_DIR/{hub_dir_name(hub_id)}/ (config.json + model.safetensors, e.g. "
            f"`hf download {hub_id} --local-dir $WMLAB_WEIGHTS_DIR/{hub_dir_name(hub_id)}`; older "
            "huggingface_hub: `huggingface-cli download ...`)"
        )
    if filename_hint:
        where.append(f"$WMLAB_WEIGHTS_DIR/{filename_hint}")
    where.append("pass weights=/path/to/dir_or_file")
    lines.append("  Put it at: " + ", or ".join(where))
    return FileNotFoundError("\n".join(lines))


def resolve_weights(
    family: str,
    weights: str | os.PathLike | None,
    *,
    default_id: str | None,
    filename_hint: str | None = None,
    licence: str,
    how_to_get: str = "",
    download_url: str | None = None,
    gated: bool = False,
    search_paths: tuple[str | os.PathLike, ...] | list = (),
) -> ResolvedWeights:
    """Find ``weights`` (None, a hub id, a local dir or a local file) on this machine; see the module doc.

    Args:
        family: the encoder family, for messages ("dinov2").
        weights: what the user passed; None means the family default.
        default_id: the family's default hub id (None when the family has no hub copy, e.g. R3M).
        filename_hint: the original checkpoint's file name (or ``dir/file``), searched under
            $WMLAB_WEIGHTS_DIR and in ``search_paths`` when ``weights`` is None.
        licence, how_to_get, download_url, gated: what the not-found error tells the user.
        search_paths: further full paths to try for the default original checkpoint.
    Returns:
        ResolvedWeights(path, source, sha256, route).
    Raises:
        FileNotFoundError with the source, licence and where to put the weights.
    """
    info = dict(
        licence=licence, how_to_get=how_to_get, download_url=download_url, gated=gated,
        filename_hint=filename_hint,
    )  # fmt: skip
    looked: list[str] = []
    wdir = weights_dir()

    if weights is not None:
        text = os.fspath(weights)
        path = Path(text).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise FileNotFoundError(
                    f"{family} weights directory {path} has no config.json: pass a directory written by "
                    "save_pretrained (config.json + model.safetensors) or an original checkpoint file"
                )
            return ResolvedWeights(path, text, weights_sha256(path), "path")
        if path.is_file():
            return ResolvedWeights(path, text, weights_sha256(path), "path")
        if not looks_like_hub_id(text):
            looked.append(str(path))
            raise _not_found(family, text, hub_id=None, looked=looked, **info)
        hub_id = text
        if hub_id != default_id:  # the family's default-specific hints would name the wrong model
            info.update(how_to_get=f"`hf download {hub_id}`", download_url=None, filename_hint=None)
    else:
        hub_id = default_id

    if hub_id is not None:
        if wdir is not None:
            candidate = wdir / hub_dir_name(hub_id)
            looked.append(str(candidate))
            if _valid_hf_dir(candidate):
                return ResolvedWeights(candidate, hub_id, weights_sha256(candidate), "weights_dir")
        else:
            looked.append(f"$WMLAB_WEIGHTS_DIR/{hub_dir_name(hub_id)} (WMLAB_WEIGHTS_DIR is unset)")
        looked.append(f"the Hugging Face cache ({_hf_cache_name()})")
        cached = _hf_cache_lookup(hub_id)
        if cached is not None:
            return ResolvedWeights(cached, hub_id, weights_sha256(cached), "hf_cache")

    if weights is None and filename_hint:
        if wdir is None:
            looked.append(f"$WMLAB_WEIGHTS_DIR/{filename_hint} (WMLAB_WEIGHTS_DIR is unset)")
        candidates = ([wdir / filename_hint] if wdir is not None else []) + [
            Path(p).expanduser() for p in search_paths
        ]
        for candidate in candidates:
            looked.append(str(candidate))
            if candidate.is_file():
                return ResolvedWeights(candidate, str(candidate), weights_sha256(candidate), "original_file")

    cause = None
    if hub_id is not None and not offline():
        try:
            snapshot = _hf_download(hub_id)
            return ResolvedWeights(snapshot, hub_id, weights_sha256(snapshot), "hf_download")
        except Exception as err:  # gated (401/403), no network, unknown repo: report it with the fix
            cause = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    wanted = hub_id if hub_id is not None else (filename_hint or "default")
    raise _not_found(family, wanted, hub_id=hub_id, looked=looked, cause=cause, **info)


def _hf_cache_name() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return "~/.cache/huggingface/hub"


def load_hf_model(model_cls, path: Path, **overrides):
    """``model_cls.from_pretrained(path)`` from local files, fp32, refusing partial loads.

    transformers only warns when a checkpoint lacks weights the class needs (it initialises them at
    random), which would silently give a random encoder, so missing or shape-mismatched keys raise.
    Unexpected keys (a classification head, a V-JEPA predictor we do not run) are fine.
    ``overrides`` go to the config (e.g. V-JEPA 2's ``crop_size``).
    """
    import torch

    model, report = model_cls.from_pretrained(
        str(path), local_files_only=True, dtype=torch.float32, output_loading_info=True, **overrides
    )
    check_loading_report(report, f"{model_cls.__name__} from {path}")
    return model


def check_loading_report(report: dict, what: str) -> None:
    """Raise when transformers' ``output_loading_info`` shows missing or mismatched weights."""
    missing = sorted(report.get("missing_keys") or [])
    mismatched = sorted(str(m) for m in (report.get("mismatched_keys") or []))
    errors = list(report.get("error_msgs") or [])
    if missing or mismatched or errors:
        more = "..." if len(missing) > 8 else ""
        raise RuntimeError(
            f"loading {what} left weights uninitialised: missing {missing[:8]}{more}, "
            f"shape-mismatched {mismatched[:8]}, errors {errors[:3]}; is this the right model family?"
        )


def strict_from_state_dict(model_cls, config, state_dict: dict, what: str):
    """Build ``model_cls(config)`` from a state dict in the Hub key layout, strictly.

    transformers 5 renames some weights on load (Dinov2's ``attention.attention.query`` lives as
    ``attention.q_proj`` in memory); going through ``from_pretrained(None, state_dict=...)`` applies
    those renames, so converters can target the stable Hub names. Missing *and* unexpected keys raise.
    """
    import torch

    model, report = model_cls.from_pretrained(
        None, config=config, state_dict=state_dict, dtype=torch.float32, output_loading_info=True
    )
    check_loading_report(report, what)
    unexpected = sorted(report.get("unexpected_keys") or [])
    if unexpected:
        raise RuntimeError(
            f"converting {what}: unexpected keys {unexpected[:8]} (the key mapping is incomplete)"
        )
    return model


def load_original_checkpoint(path: Path) -> dict:
    """``torch.load`` an original checkpoint safely (``weights_only=True``) onto the CPU -> a dict."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(
            f"could not read checkpoint {path} with torch.load(weights_only=True): {err}"
        ) from err
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, expected a state dict")
    return obj


def freeze(module):
    """Eval mode and no gradients: the encoders are fixed feature extractors."""
    module.eval()
    module.requires_grad_(False)
    return module
