"""M of the classic World Models agent: an LSTM with a mixture-density head (MDN-RNN).

Input per step: [z_t, a_t] (CarRacing: 32 + 3 = 35) or [z_t, a_t, d_{t-1}] (Doom: 64 + 1 + 1, the previous
step's done flag). Output per step, for every latent dimension separately, a K-way (K = 5) 1-D Gaussian
mixture over z_{t+1} (logits, means, log-stds: no correlations between dimensions), plus optionally one
logit for d_t = "the episode ends after a_t". Parameters: 422,368 (Car, 256 units) / 1,678,785 (Doom,
512 units) in the reference's count with one LSTM bias; torch's LSTM has two bias vectors, so ours hold
4 * hidden more.

Loss: NLL of z_{t+1} averaged over dimensions and valid steps; + done BCE with positive weight 10.
Training (``train_rnn``) re-samples z = mu + sigma * eps from the stored VAE posteriors every batch.

Sampling at temperature tau (``sample``): mixture logits are divided by tau and the Gaussian noise is scaled
by sqrt(tau); done is declared when P(done) > 0.5 (not sampled).

Sequences in training are windows inside single episodes, so the LSTM state never has to be reset mid
sequence; the done-flag input is still part of M (as in the reference) and is 1 only in a dream that
continues after an episode end.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from wmlab.integrity import NonFiniteError
from wmlab.runs import locked_run

FORMAT = "wmlab-worldmodels-mdn-rnn"
FORMAT_VERSION = 1
WEIGHTS_FILE = "rnn.safetensors"
CONFIG_FILE = "rnn.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class MDNRNNConfig:
    """Architecture (recorded in rnn.json)."""

    z_dim: int = 32
    action_dim: int = 3
    hidden: int = 256
    n_mix: int = 5
    done_head: bool = False
    done_input: bool = False
    done_pos_weight: float = 10.0

    @property
    def input_dim(self) -> int:
        return self.z_dim + self.action_dim + int(self.done_input)


class MDNRNN(nn.Module):
    """LSTM + per-dimension Gaussian-mixture head. ``forward`` over sequences, ``step`` for one step."""

    def __init__(self, cfg: MDNRNNConfig) -> None:
        super().__init__()
        if min(cfg.z_dim, cfg.action_dim, cfg.hidden, cfg.n_mix) < 1:
            raise ValueError(f"every MDN-RNN size must be >= 1, got {cfg}")
        self.cfg = cfg
        self.lstm = nn.LSTM(cfg.input_dim, cfg.hidden, batch_first=True)
        self.head = nn.Linear(cfg.hidden, cfg.z_dim * cfg.n_mix * 3 + int(cfg.done_head))

    def initial_state(self, batch: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero (h, c), each (1, B, hidden)."""
        zeros = torch.zeros(1, batch, self.cfg.hidden, device=device)
        return zeros, zeros.clone()

    def _inputs(self, z, a, done_prev) -> torch.Tensor:
        B, T, Nz = z.shape
        assert Nz == self.cfg.z_dim, f"z has {Nz} dims, M expects {self.cfg.z_dim}"
        assert a.shape == (B, T, self.cfg.action_dim), (
            f"actions {tuple(a.shape)} != {(B, T, self.cfg.action_dim)}"
        )
        parts = [z, a]
        if self.cfg.done_input:
            parts.append(
                (done_prev if done_prev is not None else z.new_zeros(B, T)).reshape(B, T, 1).to(z.dtype)
            )
        return torch.cat(parts, -1)  # (B, T, input_dim)

    def split_head(self, out: torch.Tensor) -> dict[str, torch.Tensor]:
        """Head output (..., Nz*K*3 [+1]) -> logits, mean, logstd (..., Nz, K), done_logit (...)/None."""
        Nz, K = self.cfg.z_dim, self.cfg.n_mix
        lead = out.shape[:-1]
        mix = out[..., : Nz * K * 3].reshape(*lead, Nz, 3, K)  # (..., Nz, 3, K)
        return {
            "logits": mix[..., 0, :],
            "mean": mix[..., 1, :],
            "logstd": mix[..., 2, :],
            "done_logit": out[..., -1] if self.cfg.done_head else None,
        }

    def forward(self, z, a, done_prev=None, state=None):
        """z (B, T, Nz), a (B, T, A), done_prev (B, T) or None -> (mixture over (B, T, Nz, K), (h, c))."""
        out, state = self.lstm(self._inputs(z, a, done_prev), state)  # (B, T, hidden)
        return self.split_head(self.head(out)), state

    def step(self, z, a, done_prev=None, state=None):
        """One step: z (B, Nz), a (B, A), done_prev (B,) -> (mixture dict over (B, Nz, K), (h, c))."""
        dp = None if done_prev is None else done_prev[:, None]
        out, state = self.lstm(self._inputs(z[:, None], a[:, None], dp), state)  # (B, 1, hidden)
        return self.split_head(self.head(out[:, 0])), state

    def loss(self, z, a, z_next, done=None, mask_z=None, mask_done=None, done_prev=None):
        """Mixture NLL of z_next (averaged over dims and valid steps) + weighted done BCE.

        z, z_next (B, T, Nz); a (B, T, A); done (B, T) targets; masks (B, T) bool (None = all valid).
        Returns (total loss, {"nll", "done_bce"}).
        """
        mix, _ = self(z, a, done_prev)
        nll = mdn_nll(mix["logits"], mix["mean"], mix["logstd"], z_next)  # (B, T, Nz)
        nll = nll.mean(-1)  # (B, T)
        m = torch.ones_like(nll, dtype=torch.bool) if mask_z is None else mask_z
        nll = (nll * m).sum() / m.sum().clamp(min=1)
        parts = {"nll": nll.item()}
        total = nll
        if self.cfg.done_head and done is not None:
            md = torch.ones_like(done, dtype=torch.bool) if mask_done is None else mask_done
            bce = F.binary_cross_entropy_with_logits(
                mix["done_logit"],
                done.float(),
                reduction="none",
                pos_weight=torch.tensor(self.cfg.done_pos_weight, device=z.device),
            )
            bce = (bce * md).sum() / md.sum().clamp(min=1)
            total = total + bce
            parts["done_bce"] = bce.item()
        return total, parts


def mdn_nll(logits: torch.Tensor, mean: torch.Tensor, logstd: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-log sum_k softmax(logits)_k N(y | mean_k, exp(logstd_k)^2), per dimension.

    logits, mean, logstd (..., K); y (...) -> (...).
    """
    y = y.unsqueeze(-1)  # (..., 1)
    log_normal = -0.5 * ((y - mean) * torch.exp(-logstd)).pow(2) - logstd - LOG_SQRT_2PI  # (..., K)
    return -torch.logsumexp(F.log_softmax(logits, -1) + log_normal, -1)


def sample(
    mix: dict[str, torch.Tensor],
    tau: float,
    generator: torch.Generator | None = None,
    u: torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
):
    """Draw z_{t+1} (B, Nz) and done (B,) bool from one step's mixture at temperature ``tau``.

    Mixture logits are divided by tau and the Gaussian noise is scaled by sqrt(tau); as tau -> 0 the draw
    becomes the mean of the most likely component; tau <= 0 means exactly that (argmax, no noise).
    ``u`` (uniforms in [0, 1), picking the component by inverse CDF) and ``eps`` (standard normals), both
    (B, Nz), may be given so that many candidates share random numbers; else they come from ``generator``.
    Done is P(done) > 0.5 (all False without a done head).
    """
    logits, mean, logstd = mix["logits"], mix["mean"], mix["logstd"]  # (B, Nz, K)
    B, Nz, K = logits.shape
    if tau <= 0:
        k = logits.argmax(-1, keepdim=True)  # (B, Nz, 1)
        z = mean.gather(-1, k)[..., 0]
    else:
        if u is None:
            u = torch.rand(B, Nz, generator=generator, device=mean.device, dtype=mean.dtype)
        if eps is None:
            eps = torch.randn(B, Nz, generator=generator, device=mean.device, dtype=mean.dtype)
        cdf = F.softmax(logits / tau, -1).cumsum(-1)  # (B, Nz, K)
        k = (u[..., None] > cdf).sum(-1, keepdim=True).clamp(max=K - 1)  # (B, Nz, 1)
        std = torch.exp(logstd.gather(-1, k)[..., 0])  # (B, Nz)
        z = mean.gather(-1, k)[..., 0] + std * math.sqrt(tau) * eps
    if mix["done_logit"] is not None:
        done = torch.sigmoid(mix["done_logit"]) > 0.5
    else:
        done = torch.zeros(B, dtype=torch.bool, device=mean.device)
    return z, done


def load_rnn(path, device: str | torch.device = "cpu") -> MDNRNN:
    """Rebuild a trained MDN-RNN from ``path/rnn.json`` + ``path/rnn.safetensors``."""
    from wmlab.runs import load_tensors, read_json

    path = Path(path).expanduser()
    if path.is_file():
        path = path.parent
    missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"MDN-RNN {path}: {', '.join(missing)} not found. Train one with `wmlab worldmodels train-rnn`."
        )
    meta = read_json(path / CONFIG_FILE)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG_FILE} is not a wmlab MDN-RNN (format {meta.get('format')!r})")
    model = MDNRNN(MDNRNNConfig(**meta["config"]))
    model.load_state_dict(load_tensors(path / WEIGHTS_FILE))
    return model.to(device).eval()


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

    from wmlab.models.vae import _device, tensorboard
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
    dev = _device(device)
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
