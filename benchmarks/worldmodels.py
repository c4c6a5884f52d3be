"""Throughput of every World Models stage on this machine, at the paper's sizes (TakeCover unless noted).

    python benchmarks/worldmodels.py [--threads N] [--steps 300]

Prints one JSON object:

- ``collect_frames_per_second``: random-policy collection into a TrajectoryStore, one worker process,
  per env (``take_cover``: action held 1-10 frames; ``car_racing``: the random V+M+C agent; ``dodge``); null
  when the env's optional package is missing.
- ``vae_images_per_second``: training steps (forward + backward + Adam) of the 4.4M-parameter VAE (Nz = 64),
  batch 100, 64x64 frames.
- ``rnn_sequences_per_second``: MDN-RNN training steps, LSTM 512 + done head, batch ``--rnn-batch`` sequences
  of 500 steps (the Doom setting); ``rnn_steps_per_second`` = sequences * 500.
- ``real_rollouts_per_second`` / ``real_steps_per_second``: the full agent (VAE encode + LSTM step + C) in
  VizdoomTakeCover, one process, episodes capped at ``--steps``.
- ``dream_rollouts_per_second`` / ``dream_steps_per_second``: the same agent's M + C in the dream, batch of
  64 x 16 = 1024 dreams (one CMA-ES generation), all run to ``--steps`` (done head disabled, so lengths
  are equal); also for a single dream.
- ``dream_vs_real_speed``: dream steps/s (1024 batch) / real steps/s, and the same per process for batch 1.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _timed(fn, repeat: int) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat


def bench_collect(tmp: Path, steps: int) -> dict:
    from wmlab.worldmodels.collect import collect_rollouts

    out = {}
    for env, policy, n in (
        ("take_cover", "random_hold", 3),
        ("car_racing", "random_agent", 1),
        ("dodge", "random_hold", 20),
    ):
        try:
            kwargs = (
                {"policy_kwargs": {"vae": {"z_dim": 32}, "rnn_hidden": 256}}
                if policy == "random_agent"
                else {}
            )
            store = collect_rollouts(
                tmp / f"{env}.zarr",
                env,
                n_episodes=n,
                max_steps=steps,
                policy=policy,
                workers=1,
                progress=False,
                **kwargs,
            )
            out[env] = store.metadata["last_run"]["frames_per_second"]
        except ImportError as err:
            out[env] = None
            print(f"# {env}: {err}")
    return out


def bench_vae() -> float:
    from wmlab.models.vae import ConvVAE, VAEConfig

    vae = ConvVAE(VAEConfig(z_dim=64))
    opt = torch.optim.Adam(vae.parameters(), lr=1e-4)
    x = torch.rand(100, 3, 64, 64)

    def step():
        loss, _ = vae.loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return 100 / _timed(step, 3)


def bench_rnn(batch: int) -> float:
    from wmlab.models.mdn_rnn import MDNRNN, MDNRNNConfig

    rnn = MDNRNN(MDNRNNConfig(z_dim=64, action_dim=1, hidden=512, done_head=True, done_input=True))
    opt = torch.optim.Adam(rnn.parameters(), lr=1e-3)
    z, a = torch.randn(batch, 500, 64), torch.rand(batch, 500, 1)
    done = torch.zeros(batch, 500)

    def step():
        loss, _ = rnn.loss(z, a, torch.randn_like(z), done)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_value_(rnn.parameters(), 1.0)
        opt.step()

    return batch / _timed(step, 2)


def bench_rollouts(steps: int) -> dict:
    from wmlab.models.mdn_rnn import MDNRNN, MDNRNNConfig
    from wmlab.models.vae import ConvVAE, VAEConfig
    from wmlab.worldmodels.controller import Agent, ControllerConfig, run_real_episode
    from wmlab.worldmodels.dream import Dream
    from wmlab.worldmodels.envs import TakeCoverEnv

    torch.manual_seed(0)
    vae = ConvVAE(VAEConfig(z_dim=64)).eval()
    rnn = MDNRNN(MDNRNNConfig(z_dim=64, action_dim=1, hidden=512, done_head=True, done_input=True)).eval()
    with torch.no_grad():
        rnn.head.bias[-1] = -50.0  # no done: every dream runs to the cap, as long as a capped real episode
    cfg = ControllerConfig(z_dim=64, hidden=512, out_dim=1, inputs="zch", bias=False)
    rng = np.random.default_rng(0)
    out = {}
    try:
        env = TakeCoverEnv(max_steps=steps)
        agent = Agent(vae, rnn, cfg, rng.standard_normal(cfg.n_params) * 0.1, env.controller_to_action)
        run_real_episode(env, agent, 0, 20)  # warm-up
        started, n_steps, n_eps = time.perf_counter(), 0, 0
        while time.perf_counter() - started < 20 or n_eps < 2:
            n_steps += run_real_episode(env, agent, n_eps + 1, steps)["steps"]
            n_eps += 1
        seconds = time.perf_counter() - started
        out.update(
            real_rollouts_per_second=n_eps / seconds,
            real_steps_per_second=n_steps / seconds,
            real_mean_episode_steps=n_steps / n_eps,
        )
        env.close()
    except ImportError as err:
        print(f"# real env: {err}")
    mu, logvar = rng.standard_normal((100, 64)), np.full((100, 64), -2.0)
    dream = Dream(rnn, mu, logvar, tau=1.15, max_steps=steps, to_action=TakeCoverEnv.controller_to_action)
    for label, P, R in (("", 64, 16), ("_batch1", 1, 1)):
        params = rng.standard_normal((P, cfg.n_params)) * 0.1
        started = time.perf_counter()
        result = dream.rollout(cfg, params, seeds=np.arange(R))
        seconds = time.perf_counter() - started
        out[f"dream{label}_rollouts_per_second"] = P * R / seconds
        out[f"dream{label}_steps_per_second"] = float(result["steps"].sum()) / seconds
    if "real_steps_per_second" in out:
        out["dream_vs_real_speed"] = out["dream_steps_per_second"] / out["real_steps_per_second"]
        out["dream_batch1_vs_real_speed"] = (
            out["dream_batch1_steps_per_second"] / out["real_steps_per_second"]
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=300, help="episode cap for collection and rollouts")
    parser.add_argument("--rnn-batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "episode_cap": args.steps, "torch": torch.__version__}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        result["collect_frames_per_second"] = bench_collect(Path(tmp), args.steps)
    result["vae_images_per_second"] = bench_vae()
    result["rnn_sequences_per_second"] = bench_rnn(args.rnn_batch)
    result["rnn_steps_per_second"] = result["rnn_sequences_per_second"] * 500
    result.update(bench_rollouts(args.steps))
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}, indent=1))


if __name__ == "__main__":
    main()
