"""Training M of the classic World Models agent: ``SequenceSampler`` (windows of packed latents) and
``train_rnn`` (the MDN-RNN of ``wmlab.models.mdn_rnn``), which re-samples z = mu + sigma * eps from the stored
VAE posteriors every batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wmlab.integrity import NonFiniteError
from wmlab.models.mdn_rnn import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    MDNRNN,
    WEIGHTS_FILE,
    MDNRNNConfig,
)
from wmlab.runs import locked_run
from wmlab.training.common import tensorboard, training_device

# ---------------------------------------------------------------------------------------------------
# Training data: packed latents (see wmlab.worldmodels.latents)


class SequenceSampler:
    """Random windows of at most ``seq_len`` transitions inside episodes of packed latent arrays.

    ``data``: dict with ``mu``, ``logvar`` (F, Nz), ``actions`` (F, A), ``dones`` (F,), ``starts`` (E + 1,)
    (episode e is rows starts[e]:starts[e+1]; its L frames are L transitions, the last one's next frame
    is not stored).

    Every transition is a loss target with the same probability, so episode ends are targets at their
    true rate in the data. A window is drawn as (episode e, offset s) uniformly over
    s in [-(T - 1), L_e - 1] (episode weight L_e + T - 1) and covers rows [max(s, 0), min(s + T, L_e)):
    each transition t lies in exactly T of those windows (s = t - T + 1 .. t), whatever the episode's
    length. A window cut by the episode start begins at the episode's first frame (where M's zero state
    is the true one), one cut by the episode end is padded and masked; episodes shorter than T are
    one cut window. Windows are stored left-aligned and the batch is trimmed to its longest window.

    (The earlier sampler drew s in [0, L - T), so the last transition of an episode longer than T was
    never a target: M never saw an episode end and the dream never ended.)
    """

    def __init__(self, data: dict[str, np.ndarray], seq_len: int) -> None:
        for key in ("mu", "logvar", "actions", "dones", "starts"):
            if key not in data:
                raise KeyError(f"latent data lacks {key!r}")
        if int(seq_len) < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.data = data
        self.seq_len = int(seq_len)
        starts = np.asarray(data["starts"], dtype=np.int64)
        self.starts, self.lengths = starts[:-1], np.diff(starts)
        keep = self.lengths >= 1
        if not keep.any():
            raise ValueError("every episode is empty: nothing to train M on")
        self.starts, self.lengths = self.starts[keep], self.lengths[keep]
        self.offsets = self.lengths + self.seq_len - 1  # window offsets per episode
        self.weights = self.offsets / self.offsets.sum()

    @property
    def transitions(self) -> int:
        return int(self.lengths.sum())

    @property
    def mean_window_steps(self) -> float:
        """Expected targets per window: each transition lies in T of the sum(L + T - 1) windows."""
        return self.transitions * self.seq_len / float(self.offsets.sum())

    def windows(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> episode index (B,), first row within the episode (B,) and steps n (B,) of B windows."""
        eps = rng.choice(len(self.starts), size=batch_size, p=self.weights)
        s = rng.integers(0, self.offsets[eps]) - (self.seq_len - 1)  # (B,) in [-(T-1), L-1]
        first = np.maximum(s, 0)
        n = np.minimum(s + self.seq_len, self.lengths[eps]) - first  # (B,) >= 1
        return eps, first, n

    def batch(self, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """-> z (B, T, Nz) resampled from mu/sigma, a (B, T, A), z_next (B, T, Nz), done (B, T),
        mask_z, mask_done (B, T) bool, with T = the longest window drawn (<= seq_len; shorter ones are
        padded and masked)."""
        Nz, A = self.data["mu"].shape[1], self.data["actions"].shape[1]
        eps, first, steps = self.windows(batch_size, rng)
        T = int(steps.max())
        mu = np.zeros((batch_size, T + 1, Nz), np.float32)
        logvar = np.zeros((batch_size, T + 1, Nz), np.float32)
        actions = np.zeros((batch_size, T, A), np.float32)
        done = np.zeros((batch_size, T), np.float32)
        mask_done = np.zeros((batch_size, T), bool)
        mask_z = np.zeros((batch_size, T), bool)
        for i, (e, s, n) in enumerate(zip(eps, first, steps)):
            L, row = int(self.lengths[e]), int(self.starts[e] + s)
            nz = min(int(n) + 1, L - int(s))  # frames available: the last step's next frame may not exist
            mu[i, :nz], logvar[i, :nz] = self.data["mu"][row : row + nz], self.data["logvar"][row : row + nz]
            actions[i, :n] = self.data["actions"][row : row + n]
            done[i, :n] = self.data["dones"][row : row + n]
            mask_done[i, :n] = True
            mask_z[i, : nz - 1] = True
        z = mu + np.exp(0.5 * logvar) * rng.standard_normal(mu.shape, dtype=np.float32)  # (B, T+1, Nz)
        z = torch.from_numpy(z)
        return {
            "z": z[:, :-1],
            "z_next": z[:, 1:],
            "a": torch.from_numpy(actions),
            "done": torch.from_numpy(done),
            "mask_z": torch.from_numpy(mask_z),
            "mask_done": torch.from_numpy(mask_done),
        }


@locked_run("out", "MDN-RNN training run")  # a second writer of out/ is refused with who holds it
def train_rnn(
    data: dict[str, np.ndarray],
    out,
    *,
    hidden: int = 256,
    n_mix: int = 5,
    done_head: bool = False,
    done_input: bool = False,
    done_pos_weight: float = 10.0,
    seq_len: int = 999,
    batch_size: int = 100,
    steps: int | None = 4000,
    epochs: float | None = None,
    lr: float = 1e-3,
    lr_decay: float = 1.0,
    min_lr: float = 1e-5,
    grad_clip: float = 1.0,
    save_every: int = 500,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    source: str = "",
) -> Path:
    """Train the MDN-RNN on packed latents (``wmlab.worldmodels.latents.load_latents``); resumable.

    Args:
        data: packed ``mu``/``logvar`` (F, Nz), ``actions`` (F, A), ``dones`` (F,), ``starts`` (E + 1,).
        out: output directory (``rnn.safetensors``, ``rnn.json``, ``checkpoint.safetensors``, ``tb/``).
        hidden, n_mix, done_head, done_input, done_pos_weight: architecture (``MDNRNNConfig``).
        seq_len: window length in transitions (Car: 999 = full episodes; Doom: 500-step chunks).
        steps / epochs: length of training; ``epochs`` (expected passes over all transitions, counting the
            targets that the sampler's windows hold on average) wins when given.
        lr, lr_decay, min_lr: Adam; lr multiplied by ``lr_decay`` every step, floored at ``min_lr``.
        grad_clip: gradient value clip (reference: 1.0).
    """
    from tqdm.auto import tqdm

    from wmlab.runs import (
        load_training_checkpoint,
        resumable_run,
        save_training_checkpoint,
        versions,
    )

    sampler = SequenceSampler(data, seq_len)
    Nz, A = data["mu"].shape[1], data["actions"].shape[1]
    cfg = MDNRNNConfig(
        z_dim=Nz,
        action_dim=A,
        hidden=int(hidden),
        n_mix=int(n_mix),
        done_head=bool(done_head),
        done_input=bool(done_input),
        done_pos_weight=float(done_pos_weight),
    )
    if epochs is not None:
        per_batch = sampler.mean_window_steps * batch_size  # expected transitions per batch
        total = max(1, math.ceil(float(epochs) * sampler.transitions / per_batch))
    elif steps is not None:
        total = int(steps)
    else:
        raise ValueError("give steps= or epochs=")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = training_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MDNRNN(cfg).to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    step, history, seconds = 0, [], 0.0
    meta_path, ckpt_path = out / CONFIG_FILE, out / CHECKPOINT_FILE
    meta = resumable_run(meta_path, ckpt_path, asdict(cfg), "an MDN-RNN")
    if meta is not None:
        load_training_checkpoint(ckpt_path, model, optimizer, meta["optimizer"])
        step, history, seconds = int(meta["step"]), meta.get("history", []), float(meta.get("seconds", 0))

    writer = tensorboard(out)
    bar = tqdm(total=total, initial=min(step, total), desc="train-rnn", disable=not progress)
    started, sequences = time.perf_counter(), 0
    while step < total:
        model.train()
        rate = max(min_lr, lr * lr_decay**step)
        for group in optimizer.param_groups:
            group["lr"] = rate
        batch = {
            k: v.to(dev) for k, v in sampler.batch(batch_size, np.random.default_rng([seed, step])).items()
        }
        loss, parts = model.loss(
            batch["z"], batch["a"], batch["z_next"], batch["done"], batch["mask_z"], batch["mask_done"]
        )
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"MDN-RNN loss became {loss.item()} at step {step + 1}; lower lr= and re-run"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_value_(model.parameters(), grad_clip)
        optimizer.step()
        step += 1
        sequences += batch_size
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if writer is not None:
            writer.add_scalar("rnn/loss", loss.item(), step)
            for k, v in parts.items():
                writer.add_scalar(f"rnn/{k}", v, step)
        if step % save_every == 0 or step == total:
            history.append({"step": step, "loss": loss.item(), **parts, "lr": rate})
            elapsed = time.perf_counter() - started
            # One atomic file: weights + Adam state + this JSON; the weights and JSON exports are
            # written after it commits, tagged with it (runs.commit_checkpoint).
            save_training_checkpoint(
                ckpt_path, model, optimizer, progress=step,
                exports={"weights": WEIGHTS_FILE, "weights_metadata": {"step": step, "format": FORMAT},
                         "json": CONFIG_FILE},
                state={
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "config": asdict(cfg),
                    "step": step,
                    "steps": total,
                    "seq_len": seq_len,
                    "batch_size": batch_size,
                    "lr": lr,
                    "lr_decay": lr_decay,
                    "seed": seed,
                    "data": {"source": source, "transitions": sampler.transitions},
                    "sequences_per_second": round(sequences / elapsed, 2) if elapsed > 0 else None,
                    "history": history,
                    "seconds": seconds + elapsed,
                    "versions": versions(),
                },
            )  # fmt: skip
    bar.close()
    if writer is not None:
        writer.close()
    return out
