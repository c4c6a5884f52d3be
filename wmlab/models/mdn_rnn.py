"""M of the classic World Models agent: an LSTM with a mixture-density head (MDN-RNN).

Input per step: [z_t, a_t] (CarRacing: 32 + 3 = 35) or [z_t, a_t, d_{t-1}] (Doom: 64 + 1 + 1, the previous
step's done flag). Output per step, for every latent dimension separately, a K-way (K = 5) 1-D Gaussian
mixture over z_{t+1} (logits, means, log-stds: no correlations between dimensions), plus optionally one
logit for d_t = "the episode ends after a_t". Parameters: 422,368 (Car, 256 units) / 1,678,785 (Doom,
512 units) in the reference's count with one LSTM bias; torch's LSTM has two bias vectors, so ours hold
4 * hidden more.

Loss: NLL of z_{t+1} averaged over dimensions and valid steps; + done BCE with positive weight 10.
Training (``wmlab.training.mdn_rnn.train_rnn``) re-samples z = mu + sigma * eps from the stored VAE
posteriors every batch.

Sampling at temperature tau (``sample``): mixture logits are divided by tau and the Gaussian noise is scaled
by sqrt(tau); done is declared when P(done) > 0.5 (not sampled).

Sequences in training are windows inside single episodes, so the LSTM state never has to be reset mid
sequence; the done-flag input is still part of M (as in the reference) and is 1 only in a dream that
continues after an episode end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

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
