"""The dream: the environment simulated entirely inside M, for training and scoring C without the real env.

A dream starts from the VAE posterior of a real episode's first frame (z = mu + sigma * eps), then every step
C acts on [z, (c), h], M consumes [z, a] and z_{t+1} is drawn from its mixture at temperature tau. The
episode ends when M's done head says P(done) > 0.5 or at ``max_steps`` (2100 for TakeCover); the reward is
+1 per step alive (TakeCover's living reward). CarRacing's M has no reward or done head, so its dream is for
looking at only (``Dream.rollout(record=True)`` + the VAE decoder).

``Dream.rollout`` runs a whole population x rollouts at once: (P, R) dreams as one batch of P * R through
the LSTM, which is what makes dream training cheap. Seeds (P, R) give every candidate its own dreams (the
reference); seeds (R,) make all P candidates see the same R starting frames and random numbers (common
random numbers).
``DreamEnv`` is the same dream behind the gymnasium API (one episode at a time).
"""

from __future__ import annotations

from typing import ClassVar

import gymnasium
import numpy as np
import torch
from gymnasium import spaces

from wmlab.models.mdn_rnn import MDNRNN, sample
from wmlab.worldmodels.controller import ControllerConfig, features, forward


def _to_action(to_action, y: torch.Tensor) -> torch.Tensor:
    """Env mapping (numpy) on (..., out) tanh outputs -> float32 torch (..., A)."""
    return torch.as_tensor(np.asarray(to_action(y.cpu().numpy()), dtype=np.float32), device=y.device)


class Dream:
    """Batched dreams in M. ``init_mu``/``init_logvar`` (E, Nz): posteriors of real first frames."""

    def __init__(
        self,
        rnn: MDNRNN,
        init_mu,
        init_logvar,
        *,
        tau: float,
        max_steps: int,
        to_action,
        reward_per_step: float = 1.0,
    ) -> None:
        init_mu = torch.as_tensor(np.asarray(init_mu, np.float32))
        init_logvar = torch.as_tensor(np.asarray(init_logvar, np.float32))
        if init_mu.ndim != 2 or init_mu.shape != init_logvar.shape or init_mu.shape[1] != rnn.cfg.z_dim:
            raise ValueError(
                f"initial latents must be (E, {rnn.cfg.z_dim}) mu and logvar, got {tuple(init_mu.shape)} "
                f"and {tuple(init_logvar.shape)}"
            )
        if len(init_mu) == 0:
            raise ValueError("no initial latents to start dreams from")
        if tau < 0:
            raise ValueError(f"temperature must be >= 0, got {tau}")
        self.rnn, self.tau, self.max_steps = rnn.eval(), float(tau), int(max_steps)
        self.init_mu, self.init_logvar = init_mu, init_logvar
        self.to_action, self.reward_per_step = to_action, float(reward_per_step)
        self.device = next(rnn.parameters()).device

    @torch.no_grad()
    def rollout(self, cfg: ControllerConfig, params, seeds, *, record: bool = False) -> dict:
        """Dream P candidates x R rollouts. params (P, n); seeds (P, R) ints (every candidate its own
        dreams, as the reference's CMA-ES) or (R,) (all candidates share the R dreams: common random
        numbers, the same starting frames and noise, so candidates are ranked on equal terms).

        Returns {"returns": (P, R), "steps": (P, R)} float arrays (+ "z": (T, Nz) of dream [0, 0] if record).
        """
        params = torch.as_tensor(np.asarray(params, np.float32), device=self.device)
        if params.ndim == 1:
            params = params[None]
        seeds = np.asarray(seeds, dtype=np.int64)
        P, Nz = params.shape[0], self.rnn.cfg.z_dim
        shared = seeds.ndim == 1
        if not shared and seeds.shape[0] != P:
            raise ValueError(f"seeds {seeds.shape} must be (R,) or (P={P}, R)")
        R = seeds.shape[-1]
        B = P * R
        n = R if shared else B  # independent random streams
        # one generator for the batch, seeded by every seed: dreams are a function of the seed array
        gen = torch.Generator().manual_seed(
            int(np.random.SeedSequence([int(s) for s in seeds.reshape(-1)]).generate_state(1)[0])
        )

        def spread(x: torch.Tensor) -> torch.Tensor:
            """(n, Nz) draws -> (P*R, Nz): shared draws repeat for every candidate."""
            x = x.to(self.device)
            return x[None].expand(P, R, Nz).reshape(B, Nz) if shared else x

        start = torch.randint(len(self.init_mu), (n,), generator=gen)
        eps0 = torch.randn(n, Nz, generator=gen)
        z = spread(self.init_mu[start] + torch.exp(0.5 * self.init_logvar[start]) * eps0)  # (P*R, Nz)
        state = self.rnn.initial_state(B, self.device)
        alive = torch.ones(B, dtype=torch.bool, device=self.device)
        returns = torch.zeros(B, device=self.device)
        steps = torch.zeros(B, device=self.device)
        done_prev = torch.zeros(B, device=self.device) if self.rnn.cfg.done_input else None
        recorded = [z[0].cpu()]
        for _ in range(self.max_steps):
            x = features(cfg, z.reshape(P, R, Nz), state)  # (P, R, in_dim)
            y = forward(cfg, params, x)  # (P, R, out)
            a = _to_action(self.to_action, y).reshape(B, -1)  # (P*R, A)
            mix, state = self.rnn.step(z, a, done_prev, state)
            u = spread(torch.rand(n, Nz, generator=gen))
            eps = spread(torch.randn(n, Nz, generator=gen))
            z, done = sample(mix, self.tau, u=u, eps=eps)
            returns += alive * self.reward_per_step
            steps += alive
            alive &= ~done
            if record and alive[0]:
                recorded.append(z[0].cpu())
            if not alive.any():
                break
        out = {"returns": returns.reshape(P, R).cpu().numpy(), "steps": steps.reshape(P, R).cpu().numpy()}
        if record:
            out["z"] = torch.stack(recorded).numpy()
        return out


class DreamEnv(gymnasium.Env):
    """One dream behind the gymnasium API.

    Observation: [z, c, h] float32 (Nz + 2 * hidden,), z the current dreamed latent and (h, c) M's state.
    Action: the real env's action (A,). Reward +1 per step; terminated when P(done) > 0.5; truncated at
    ``max_steps``. ``render()`` decodes z with ``vae`` (if given) to a 64x64 RGB frame.
    """

    metadata: ClassVar[dict] = {"render_modes": ["rgb_array"]}

    def __init__(
        self,
        rnn: MDNRNN,
        init_mu,
        init_logvar,
        *,
        tau: float = 1.15,
        max_steps: int = 2100,
        vae=None,
        render_mode: str | None = "rgb_array",
    ) -> None:
        self.rnn, self.vae, self.render_mode = rnn.eval(), vae, render_mode
        self.tau, self.max_steps = float(tau), int(max_steps)
        self.init_mu = np.asarray(init_mu, np.float32)
        self.init_logvar = np.asarray(init_logvar, np.float32)
        Nz, H, A = rnn.cfg.z_dim, rnn.cfg.hidden, rnn.cfg.action_dim
        self.observation_space = spaces.Box(-np.inf, np.inf, (Nz + 2 * H,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (A,), np.float32)
        self.generator = torch.Generator().manual_seed(0)

    def _obs(self) -> np.ndarray:
        h, c = self.state
        return torch.cat([self.z[0], c[0, 0], h[0, 0]]).numpy()

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self.generator.manual_seed(int(seed))
        i = int(torch.randint(len(self.init_mu), (1,), generator=self.generator))
        mu, logvar = torch.from_numpy(self.init_mu[i : i + 1]), torch.from_numpy(self.init_logvar[i : i + 1])
        self.z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=self.generator)  # (1, Nz)
        self.state = self.rnn.initial_state(1)
        self.t = 0
        return self._obs(), {"z": self.z[0].numpy()}

    @torch.no_grad()
    def step(self, action):
        a = torch.as_tensor(np.asarray(action, np.float32)).reshape(1, -1)
        if a.shape[1] != self.rnn.cfg.action_dim or not torch.isfinite(a).all():
            raise ValueError(f"the dream takes {self.rnn.cfg.action_dim} finite action values, got {action}")
        done_prev = torch.zeros(1) if self.rnn.cfg.done_input else None
        mix, self.state = self.rnn.step(self.z, a, done_prev, self.state)
        self.z, done = sample(mix, self.tau, generator=self.generator)
        self.t += 1
        terminated = bool(done[0])
        return (
            self._obs(),
            1.0,
            terminated,
            self.t >= self.max_steps and not terminated,
            {"z": self.z[0].numpy()},
        )

    @torch.no_grad()
    def render(self):
        if self.vae is None:
            raise ValueError("DreamEnv.render needs vae= (a ConvVAE) to decode latents into frames")
        img = self.vae.decode(self.z)[0]  # (3, 64, 64) in [0, 1]
        return (img.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
