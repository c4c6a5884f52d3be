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
- ``car_rnn_sequences_per_second``: MDN-RNN training, the CarRacing setting (LSTM 256, Nz 32, 999 steps).
- ``car_real_steps_per_second``: the CarRacing agent (V + M 256 + C) in CarRacing-v3, one process.
- ``paper_hours``: estimated hours of every stage of the paper's TakeCover and CarRacing runs on 2 and on
  16 cores, from the rates above (``estimate_hours``): env work (collection, real rollouts) spread over one
  process per core (ideal scaling), VAE/M training at the measured rate times ``--train-scaling`` per
  extra core (default 0.5: intra-op threads scale far from linearly on CPUs). Lower bounds on a busy machine.
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


# The paper's work per stage (counts from ../shared/reference/world_models_ha.md)
PAPER = {
    "take_cover": {
        "episodes": 10_000,
        "frames_per_episode": 335,  # the held-random policy's mean episode here (issue 16)
        "vae_epochs": 1,
        "rnn_epochs": 20,
        "rnn_seq_len": 500,
        "generations": 200,  # blog: ~200 suffice (the published log: 934)
        "popsize": 64,
        "rollouts": 16,
        "eval_every": 25,
        "eval_rollouts": 1024,
        "dream_steps_per_rollout": 1000,  # dreams end at M's done (best agent ~959) or 2100
        "final_trials": 100,
        "real_steps_per_trial": 1000,
    },
    "car_racing": {
        "episodes": 10_000,
        "frames_per_episode": 1000,
        "vae_epochs": 1,
        "rnn_sequences": 4000 * 100,  # 4000 steps of batch 100 full episodes
        "generations": 1800,
        "popsize": 64,
        "rollouts": 16,
        "eval_every": 25,
        "eval_rollouts": 1024,
        "real_steps_per_rollout": 1000,
        "final_trials": 100,
    },
}


def estimate_hours(rates: dict, cores: int, train_scaling: float = 0.5) -> dict:
    """Hours per stage of the paper's two runs on ``cores`` cores from single-process ``rates``.

    Env-bound work (collection, real rollouts) runs one process per core (ideal scaling); training runs at
    the 1-thread rate times 1 + train_scaling * (cores - 1). Missing rates give None.
    """
    train = 1 + train_scaling * (cores - 1)

    def h(work, rate, scale):
        return None if not rate else round(work / (rate * scale) / 3600, 2)

    tc, car = PAPER["take_cover"], PAPER["car_racing"]
    collect = rates.get("collect_frames_per_second") or {}
    tc_frames = tc["episodes"] * tc["frames_per_episode"]
    tc_evals = tc["generations"] // tc["eval_every"] * tc["eval_rollouts"]
    tc_dream = (tc["generations"] * tc["popsize"] * tc["rollouts"] + tc_evals) * tc["dream_steps_per_rollout"]
    out = {
        "take_cover": {
            "collect": h(tc_frames, collect.get("take_cover"), cores),
            "train-vae": h(tc_frames * tc["vae_epochs"], rates.get("vae_images_per_second"), train),
            "train-rnn": h(
                tc["rnn_epochs"] * tc_frames / tc["rnn_seq_len"], rates.get("rnn_sequences_per_second"), train
            ),
            # dream generations are one torch batch: they scale like training, not like env work
            "train-controller (dream)": h(tc_dream, rates.get("dream_steps_per_second"), train),
            "evaluate (real)": h(
                tc["final_trials"] * tc["real_steps_per_trial"], rates.get("real_steps_per_second"), cores
            ),
        },
        "car_racing": {},
    }
    car_frames = car["episodes"] * car["frames_per_episode"]
    car_real = (
        car["generations"] * car["popsize"] * car["rollouts"]
        + car["generations"] // car["eval_every"] * car["eval_rollouts"]
        + car["final_trials"]
    ) * car["real_steps_per_rollout"]
    out["car_racing"] = {
        "collect": h(car_frames, collect.get("car_racing"), cores),
        "train-vae": h(car_frames * car["vae_epochs"], rates.get("vae_images_per_second"), train),
        "train-rnn": h(car["rnn_sequences"], rates.get("car_rnn_sequences_per_second"), train),
        "train-controller (real env)": h(car_real, rates.get("car_real_steps_per_second"), cores),
    }
    for run in out.values():
        known = [v for v in run.values() if v is not None]
        run["total"] = round(sum(known), 1) if len(known) == len(run) else None
    return out


def bench_car(steps: int) -> dict:
    """CarRacing M training (LSTM 256, 999-step sequences) and the full agent in the real env."""
    from wmlab.models.mdn_rnn import MDNRNN, MDNRNNConfig

    out = {}
    rnn = MDNRNN(MDNRNNConfig(z_dim=32, action_dim=3, hidden=256))
    opt = torch.optim.Adam(rnn.parameters(), lr=1e-3)
    z, a = torch.randn(4, 999, 32), torch.rand(4, 999, 3)

    def step():
        loss, _ = rnn.loss(z, a, torch.randn_like(z))
        opt.zero_grad()
        loss.backward()
        opt.step()

    out["car_rnn_sequences_per_second"] = 4 / _timed(step, 2)
    try:
        from wmlab.models.vae import ConvVAE, VAEConfig
        from wmlab.worldmodels.controller import Agent, ControllerConfig, run_real_episode
        from wmlab.worldmodels.envs import CarRacingEnv

        torch.manual_seed(0)
        env = CarRacingEnv(max_steps=steps)
        vae = ConvVAE(VAEConfig(z_dim=32)).eval()
        cfg = ControllerConfig(z_dim=32, hidden=256, out_dim=3, inputs="zh", bias=True)
        params = np.random.default_rng(0).standard_normal(cfg.n_params) * 0.1
        agent = Agent(vae, rnn.eval(), cfg, params, env.controller_to_action)
        started = time.perf_counter()
        n = run_real_episode(env, agent, 0, steps)["steps"]
        out["car_real_steps_per_second"] = n / (time.perf_counter() - started)
        env.close()
    except ImportError as err:
        print(f"# car_racing: {err}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=300, help="episode cap for collection and rollouts")
    parser.add_argument("--rnn-batch", type=int, default=16)
    parser.add_argument("--train-scaling", type=float, default=0.5, help="training speed-up per extra core")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "episode_cap": args.steps, "torch": torch.__version__}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        result["collect_frames_per_second"] = bench_collect(Path(tmp), args.steps)
    result["vae_images_per_second"] = bench_vae()
    result["rnn_sequences_per_second"] = bench_rnn(args.rnn_batch)
    result["rnn_steps_per_second"] = result["rnn_sequences_per_second"] * 500
    result.update(bench_rollouts(args.steps))
    result.update(bench_car(args.steps))
    rates = {k: v for k, v in result.items()}
    result["paper_hours"] = {
        f"{cores}_cores": estimate_hours(rates, cores, args.train_scaling) for cores in (2, 16)
    }
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}, indent=1))


if __name__ == "__main__":
    main()
