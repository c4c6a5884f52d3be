"""Every frame of a World Models dataset through V once: packed mu/logvar per step, for M and dreams.

``encode_latents(store, vae_dir, out_file)`` writes one safetensors file (atomic)::

    mu, logvar  float32 (F, Nz)   F = total committed steps, episodes back to back
    actions     float32 (F, A)
    rewards     float32 (F,)      reward after action t
    dones       float32 (F,)      1 where the episode terminated after action t
    starts      int64   (E + 1,)  episode e is rows starts[e]:starts[e + 1]

Its metadata records the VAE weights' sha256 and the dataset fingerprint; a later call with the same pair
reuses the file, any other pair re-encodes it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

KEYS = ("mu", "logvar", "actions", "rewards", "dones", "starts")


def encode_latents(store, vae_dir, out_file, *, batch_size: int = 256, progress: bool = True) -> Path:
    """Encode a dataset (``TrajectoryStore`` or path; states = [reward, done]) with the VAE at ``vae_dir``."""
    from safetensors import safe_open

    from wmlab.data.store import TrajectoryStore
    from wmlab.encoders.weights import weights_sha256
    from wmlab.models.vae import WEIGHTS_FILE, load_vae
    from wmlab.runs import atomic_save_tensors
    from wmlab.training.vae import encode_store

    store = store if isinstance(store, TrajectoryStore) else TrajectoryStore(store)
    out_file = Path(out_file)
    vae_sha = weights_sha256(Path(vae_dir) / WEIGHTS_FILE)
    key = {"vae_sha256": vae_sha, "dataset": store.fingerprint()}
    if out_file.is_file():
        with safe_open(str(out_file), "pt") as f:
            meta = f.metadata() or {}
        if all(meta.get(k) == v for k, v in key.items()):
            return out_file
    if store.arrays["states"].shape[-1] < 2:
        raise ValueError(
            f"{store.path} holds no [reward, done] states: collect it with `wmlab worldmodels collect`"
        )
    vae = load_vae(vae_dir)
    enc = encode_store(vae, store, batch_size=batch_size, progress=progress)  # {episode: (mu, logvar)}
    ids = store.committed
    lengths = store.lengths[ids]
    actions, states = store.all_actions(), store.all_states()
    packed = {
        "mu": np.concatenate([enc[int(e)][0] for e in ids]),
        "logvar": np.concatenate([enc[int(e)][1] for e in ids]),
        "actions": np.concatenate([actions[e, :L] for e, L in zip(ids, lengths)]),
        "rewards": np.concatenate([states[e, :L, 0] for e, L in zip(ids, lengths)]),
        "dones": np.concatenate([states[e, :L, 1] for e, L in zip(ids, lengths)]),
        "starts": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    }
    out_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in packed.items()},
        out_file,
        metadata={**key, "source": str(store.path)},
    )
    return out_file


def load_latents(paths) -> dict[str, np.ndarray]:
    """One or more latent files -> one packed dict (episodes of all files back to back)."""
    from wmlab.runs import load_tensors

    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    if not paths:
        raise ValueError("no latent files given")
    parts = []
    for path in paths:
        tensors = load_tensors(Path(path))
        missing = [k for k in KEYS if k not in tensors]
        if missing:
            raise ValueError(f"{path} lacks {missing}: not a wmlab World Models latents file")
        parts.append({k: tensors[k].numpy() for k in KEYS})
    dims = {(p["mu"].shape[1], p["actions"].shape[1]) for p in parts}
    if len(dims) != 1:
        raise ValueError(f"latent files disagree on (z_dim, action_dim): {sorted(dims)}")
    out = {k: np.concatenate([p[k] for p in parts]) for k in KEYS if k != "starts"}
    starts, offset = [np.zeros(1, np.int64)], 0
    for p in parts:
        starts.append(p["starts"][1:] + offset)
        offset += int(p["starts"][-1])
    out["starts"] = np.concatenate(starts)
    if not np.isfinite(out["mu"]).all() or not np.isfinite(out["logvar"]).all():
        raise ValueError(f"latents in {paths} contain NaN/inf: retrain the VAE")
    return out


def initial_latents(data: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """mu, logvar (E, Nz) of every episode's first frame (where dreams start)."""
    first = data["starts"][:-1]
    first = first[np.diff(data["starts"]) > 0]
    return data["mu"][first], data["logvar"][first]
