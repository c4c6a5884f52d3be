"""C of the World Models agent: a = tanh(W [z h] + b), its flat parameter vector, and real-env rollouts.

Inputs: ``"zh"`` (Car: 32 + 256 = 288 -> 3, with bias: 867 parameters), ``"zch"`` (Doom: 64 + 512 + 512
-> 1 without bias: 1088 parameters) or ``"z"`` (the V-only ablation). ``mlp_hidden > 0`` inserts one tanh
layer (the paper's 40-unit ablation). The tanh outputs go through the env's ``controller_to_action`` (Car:
steer, gas, brake; TakeCover/dodge: one value thresholded at +-1/3 by the env).

Parameters are one flat float vector (what CMA-ES searches); ``unflatten`` cuts it into tensors, batched
over a population: ``forward(params (P, n), features (P, R, in)) -> (P, R, out)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

FORMAT = "wmlab-worldmodels-controller"


@dataclass
class ControllerConfig:
    z_dim: int
    hidden: int  # M's LSTM units
    out_dim: int
    inputs: str = "zh"  # "z", "zh" or "zch"
    bias: bool = True
    mlp_hidden: int = 0

    def __post_init__(self) -> None:
        if self.inputs not in ("z", "zh", "zch"):
            raise ValueError(f"controller inputs must be 'z', 'zh' or 'zch', got {self.inputs!r}")

    @property
    def in_dim(self) -> int:
        return self.z_dim + self.hidden * (len(self.inputs) - 1)

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Named parameter shapes, in flat-vector order."""
        if self.mlp_hidden > 0:
            layers = [
                ("w1", (self.mlp_hidden, self.in_dim)),
                ("b1", (self.mlp_hidden,)),
                ("w2", (self.out_dim, self.mlp_hidden)),
            ]
            return layers + ([("b2", (self.out_dim,))] if self.bias else [])
        return [("w", (self.out_dim, self.in_dim))] + ([("b", (self.out_dim,))] if self.bias else [])

    @property
    def n_params(self) -> int:
        return int(sum(np.prod(s) for _, s in self.shapes()))

    def to_dict(self) -> dict:
        return asdict(self)


def features(cfg: ControllerConfig, z: torch.Tensor, state) -> torch.Tensor:
    """C's input from z (..., Nz) and M's LSTM state (h, c), each (1, B, hidden) -> (..., in_dim)."""
    h, c = state
    lead = z.shape[:-1]
    parts = [z]
    if "c" in cfg.inputs:
        parts.append(c[0].reshape(*lead, -1))
    if "h" in cfg.inputs:
        parts.append(h[0].reshape(*lead, -1))
    return torch.cat(parts, -1)


def unflatten(cfg: ControllerConfig, params: torch.Tensor) -> dict[str, torch.Tensor]:
    """params (P, n_params) -> named tensors (P, *shape)."""
    P, n = params.shape
    if n != cfg.n_params:
        raise ValueError(f"controller has {cfg.n_params} parameters, got vectors of {n}")
    out, i = {}, 0
    for name, shape in cfg.shapes():
        size = int(np.prod(shape))
        out[name] = params[:, i : i + size].reshape(P, *shape)
        i += size
    return out


def forward(cfg: ControllerConfig, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """params (P, n) and inputs x (P, R, in_dim) -> tanh outputs (P, R, out_dim)."""
    D = x.shape[-1]
    assert x.ndim == 3 and D == cfg.in_dim, f"controller input has {D} values, expected (P, R, {cfg.in_dim})"
    p = unflatten(cfg, params.to(x.dtype))
    if cfg.mlp_hidden > 0:
        x = torch.tanh(torch.einsum("prd,phd->prh", x, p["w1"]) + p["b1"][:, None])  # (P, R, H)
        y = torch.einsum("prh,poh->pro", x, p["w2"])  # (P, R, out)
        return torch.tanh(y + p["b2"][:, None] if cfg.bias else y)
    y = torch.einsum("prd,pod->pro", x, p["w"])  # (P, R, out)
    return torch.tanh(y + p["b"][:, None] if cfg.bias else y)


def save_controller(path, cfg: ControllerConfig, params: np.ndarray, meta: dict | None = None) -> None:
    """``path`` (a .safetensors file): the flat vector ``params`` (n,) + config in its metadata."""
    import json
    from pathlib import Path

    from wmlab.runs import atomic_save_tensors

    params = torch.as_tensor(np.asarray(params, dtype=np.float32)).reshape(-1)
    if params.numel() != cfg.n_params:
        raise ValueError(f"controller has {cfg.n_params} parameters, got {params.numel()}")
    info = {"format": FORMAT, "config": json.dumps(cfg.to_dict()), **(meta or {})}
    atomic_save_tensors({"params": params}, Path(path), metadata=info)


def load_controller(path) -> tuple[ControllerConfig, np.ndarray]:
    """-> (config, flat params (n,) float32) from a file written by ``save_controller`` (or its directory)."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / "controller.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"controller {path} not found: train one with `wmlab worldmodels train-controller`"
        )
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a wmlab World Models controller (format {meta.get('format')!r})")
        params = f.get_tensor("params").numpy()
    return ControllerConfig(**json.loads(meta["config"])), params


# ---------------------------------------------------------------------------------------------------
# The agent in the real environment


class Agent:
    """V + M + C acting in a real env, one frame at a time.

    Per step: frame -> z (VAE; sampled or mu) -> a = C([z, c, h]) -> env action; then M consumes [z, a] so
    its state is ready for the next frame. ``noise`` adds Gaussian exploration noise to C's tanh outputs.
    """

    def __init__(
        self,
        vae,
        rnn,
        cfg: ControllerConfig,
        params,
        to_action,
        *,
        sample_z: bool = True,
        noise: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.vae, self.rnn, self.cfg = vae, rnn, cfg
        self.params = torch.as_tensor(np.asarray(params, dtype=np.float32)).reshape(1, -1)
        if self.params.shape[1] != cfg.n_params:
            raise ValueError(f"controller needs {cfg.n_params} parameters, got {self.params.shape[1]}")
        self.to_action, self.sample_z, self.noise = to_action, sample_z, float(noise)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.rng = np.random.default_rng(seed)
        self.reset()

    def reset(self) -> None:
        self.state = self.rnn.initial_state(1)

    @torch.no_grad()
    def act(self, frame: np.ndarray) -> np.ndarray:
        """frame uint8 (64, 64, 3) -> env action (A,) float32."""
        from wmlab.models.vae import frames_to_input

        mu, logvar = self.vae.encode(frames_to_input(frame[None]))  # (1, Nz) each
        z = (
            mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=self.generator)
            if self.sample_z
            else mu
        )
        x = features(self.cfg, z, self.state)  # (1, in_dim)
        y = forward(self.cfg, self.params, x[None])[0, 0].numpy()  # (out,)
        if self.noise > 0:
            y = np.clip(y + self.noise * self.rng.standard_normal(y.shape), -1, 1)
        action = np.asarray(self.to_action(y), dtype=np.float32)
        a = torch.as_tensor(action)[None]  # (1, A)
        done_prev = torch.zeros(1) if self.rnn.cfg.done_input else None
        _, self.state = self.rnn.step(z, a, done_prev, self.state)
        return action


def run_real_episode(
    env, agent: Agent, seed: int, max_steps: int | None = None, record: bool = False
) -> dict:
    """One episode of ``agent`` in ``env``: {"return", "steps"} (+ frames, actions, rewards, dones if record).

    Frame t is observed before action t; reward/done t follow action t (the store's convention).
    """
    frame, _ = env.reset(seed=int(seed))
    agent.reset()
    total, steps = 0.0, 0
    frames, actions, rewards, dones = [], [], [], []
    limit = max_steps or env.max_steps
    while steps < limit:
        action = agent.act(frame)
        if record:
            frames.append(frame)
            actions.append(action)
        frame, reward, terminated, truncated, _ = env.step(action)
        total += reward
        steps += 1
        if record:
            rewards.append(reward)
            dones.append(float(terminated))
        if terminated or truncated:
            break
    result = {"return": total, "steps": steps}
    if record:
        result.update(
            frames=np.stack(frames),
            actions=np.stack(actions).astype(np.float32),
            rewards=np.asarray(rewards, np.float32),
            dones=np.asarray(dones, np.float32),
        )
    return result
