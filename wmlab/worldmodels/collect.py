"""Collect World Models rollouts into a ``TrajectoryStore`` (parallel, resumable), as ``wmlab.data.collect``.

Stored per step t: the preprocessed 64x64 frame x_t (seen before acting), the env action a_t (Car: steer,
gas, brake; TakeCover/dodge: one value in [-1, 1]) and ``states`` = [r_t, d_t], the reward and the
termination flag that followed a_t (metadata ``state_keys = ["reward", "done"]``).

Policies (the reference's data):
- ``random_hold``: a uniform action in [-1, 1]^A held for 1-10 frames (Doom).
- ``random_uniform``: a fresh uniform action every frame.
- ``random_agent``: a randomly initialised V + M + C agent (Cauchy controller weights with scale rand * 0.01;
  V and M random too), as the reference's CarRacing "random policy".
- ``controller``: a trained agent (``vae``, ``rnn``, ``controller`` paths) plus Gaussian exploration ``noise``
on   C's tanh outputs (the iterative procedure).

Episodes of ``min_len`` frames or fewer are redrawn with the next attempt seed (reference: Doom drops episodes
of 100 frames or fewer), so slot i's content depends only on (seed, i).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from wmlab.data.collect import check_count, check_lock_wait, ensure_seeds, episode_seed, run_episode_jobs
from wmlab.data.errors import DatasetError
from wmlab.data.store import StoreSpec, TrajectoryStore, clean_dead_partials, jsonable
from wmlab.integrity import WriterLock
from wmlab.worldmodels.envs import FRAME, env_class, make_wm_env

POLICIES = ("random_hold", "random_uniform", "random_agent", "controller")
RESUME_KEYS = ("wm_env", "env_kwargs", "max_steps", "policy", "policy_kwargs", "seed", "min_len")
MAX_ATTEMPTS = 20


class HoldRandom:
    """Uniform action in [-1, 1]^A, held for a uniform 1..10 frames."""

    def __init__(self, action_dim: int, seed: int, hold=(1, 10)) -> None:
        self.rng = np.random.default_rng(seed)
        self.action_dim, self.hold = action_dim, hold
        self.left, self.action = 0, None

    def reset(self) -> None:
        self.left = 0

    def act(self, frame) -> np.ndarray:
        if self.left == 0:
            self.action = self.rng.uniform(-1, 1, self.action_dim).astype(np.float32)
            self.left = int(self.rng.integers(self.hold[0], self.hold[1] + 1))
        self.left -= 1
        return self.action


class UniformRandom:
    """A fresh uniform action in [-1, 1]^A every frame (the paper's TakeCover "random policy" baseline)."""

    def __init__(self, action_dim: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.action_dim = action_dim

    def reset(self) -> None:
        pass

    def act(self, frame) -> np.ndarray:
        return self.rng.uniform(-1, 1, self.action_dim).astype(np.float32)


class Still:
    """Always the zero action (TakeCover/dodge: never move)."""

    def __init__(self, action_dim: int, seed: int = 0) -> None:
        self.action_dim = action_dim

    def reset(self) -> None:
        pass

    def act(self, frame) -> np.ndarray:
        return np.zeros(self.action_dim, np.float32)


# baselines for real-env comparisons: name -> (class, label)
BASELINES = {
    "random_uniform": (UniformRandom, "random: uniform action every frame (the paper's random policy)"),
    "random_hold": (HoldRandom, "random: uniform action held 1-10 frames (the data-collection policy)"),
    "still": (Still, "never moves (zero action)"),
}


def baseline_policy(name: str, action_dim: int, seed: int):
    """A baseline agent (``reset()``, ``act(frame)``) by name: random_uniform, random_hold or still."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline policy {name!r}; known: {', '.join(BASELINES)}")
    return BASELINES[name][0](action_dim, seed)


def random_agent(env_cls, seed: int, vae_kwargs: dict, rnn_hidden: int, inputs: str, bias: bool):
    """A randomly initialised V + M + C ``Agent`` (the reference's CarRacing data policy)."""
    import torch

    from wmlab.models.mdn_rnn import MDNRNN, MDNRNNConfig
    from wmlab.models.vae import ConvVAE, VAEConfig
    from wmlab.worldmodels.controller import Agent, ControllerConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = ConvVAE(VAEConfig(**vae_kwargs)).eval()
        rnn = MDNRNN(MDNRNNConfig(z_dim=vae.z_dim, action_dim=env_cls.action_dim, hidden=rnn_hidden)).eval()
    cfg = ControllerConfig(
        z_dim=vae.z_dim, hidden=rnn_hidden, out_dim=env_cls.action_dim, inputs=inputs, bias=bias
    )
    rng = np.random.default_rng(seed)
    params = rng.standard_cauchy(cfg.n_params) * rng.random() * 0.01
    return Agent(vae, rnn, cfg, params, env_cls.controller_to_action, sample_z=True, seed=seed)


# ---------------------------------------------------------------- worker side (one per process)
_WORKER: dict = {}


def _worker_init(
    out: str,
    wm_env: str,
    env_kwargs: dict,
    policy: str,
    policy_kwargs: dict,
    max_steps: int,
    min_len: int,
    threads: int = 1,
) -> None:
    import torch

    torch.set_num_threads(threads)  # many workers on few cores: one thread each
    _WORKER.update(
        store=TrajectoryStore(out, mode="a"),
        env=make_wm_env(wm_env, **env_kwargs),
        policy=policy,
        policy_kwargs=policy_kwargs,
        max_steps=max_steps,
        min_len=min_len,
    )
    if policy == "controller":
        from wmlab.models.mdn_rnn import load_rnn
        from wmlab.models.vae import load_vae
        from wmlab.worldmodels.controller import load_controller

        _WORKER["vae"] = load_vae(policy_kwargs["vae"])
        _WORKER["rnn"] = load_rnn(policy_kwargs["rnn"])
        _WORKER["controller"] = load_controller(policy_kwargs["controller"])


def _make_agent(seed: int):
    env, kind, kw = _WORKER["env"], _WORKER["policy"], _WORKER["policy_kwargs"]
    if kind == "random_hold":
        return HoldRandom(env.action_dim, seed)
    if kind == "random_uniform":
        return UniformRandom(env.action_dim, seed)
    if kind == "random_agent":
        return random_agent(
            type(env),
            seed,
            kw.get("vae", {}),
            int(kw.get("rnn_hidden", 256)),
            kw.get("inputs", "zh"),
            bool(kw.get("bias", True)),
        )
    from wmlab.worldmodels.controller import Agent

    cfg, params = _WORKER["controller"]
    return Agent(
        _WORKER["vae"],
        _WORKER["rnn"],
        cfg,
        params,
        env.controller_to_action,
        sample_z=bool(kw.get("sample_z", True)),
        noise=float(kw.get("noise", 0.0)),
        seed=seed,
    )


def _episode(seed: int) -> dict:
    from wmlab.worldmodels.controller import run_real_episode

    env = _WORKER["env"]
    agent = _make_agent(seed + 1)  # anything with reset() and act(frame): HoldRandom or Agent
    return run_real_episode(env, agent, seed, _WORKER["max_steps"], record=True)


def _worker_collect(index: int, seed: int) -> tuple[int, int]:
    for attempt in range(MAX_ATTEMPTS):
        episode = _episode(seed if attempt == 0 else episode_seed(seed, attempt))
        if episode["steps"] > _WORKER["min_len"]:
            break
    states = np.stack([episode["rewards"], episode["dones"]], -1)  # (L, 2)
    _WORKER["store"].write_episode(index, episode["frames"], episode["actions"], states)
    return index, len(episode["frames"])


# ---------------------------------------------------------------- driver
def collect_rollouts(
    out,
    wm_env: str = "take_cover",
    *,
    n_episodes: int = 10000,
    max_steps: int | None = None,
    min_len: int = 0,
    policy: str = "random_hold",
    policy_kwargs: dict | None = None,
    env_kwargs: dict | None = None,
    workers: int = 2,
    seed: int = 0,
    progress: bool = True,
    lock_wait: float = 0.0,
) -> TrajectoryStore:
    """Collect ``n_episodes`` rollouts of ``wm_env`` into ``out`` (a new or resumable ``TrajectoryStore``).

    A re-run with the same settings resumes (committed slots are kept, the rest redone); a larger
    ``n_episodes`` appends slots. Holds the dataset's writer lock (a second writer raises ``LockHeld``,
    or waits ``lock_wait`` seconds). Returns a read-only view of the store; its metadata ``last_run``
    holds ``frames_per_second``.
    """
    if policy not in POLICIES:
        raise DatasetError(f"unknown collection policy {policy!r}; known: {', '.join(POLICIES)}")
    n_episodes = check_count("n_episodes", n_episodes)
    workers = check_count("workers", workers)
    lock_wait = check_lock_wait(lock_wait)
    cls = env_class(wm_env)
    env_kwargs = dict(env_kwargs or {})
    policy_kwargs = {k: str(v) if isinstance(v, Path) else v for k, v in (policy_kwargs or {}).items()}
    max_steps = int(max_steps or env_kwargs.get("max_steps") or cls.max_steps)
    env_kwargs["max_steps"] = max_steps
    out = Path(out)
    wanted = dict(
        wm_env=wm_env,
        env_kwargs=env_kwargs,
        max_steps=max_steps,
        policy=policy,
        policy_kwargs=policy_kwargs,
        seed=seed,
        min_len=min_len,
    )
    with WriterLock(out, "dataset", wait=lock_wait):
        return _collect_locked(out, cls, wanted, n_episodes, workers, progress)


def _collect_locked(out: Path, cls, wanted: dict, n_episodes: int, workers: int, progress: bool):
    """``collect_rollouts``' work, under the dataset's writer lock."""
    wm_env, env_kwargs, policy = wanted["wm_env"], wanted["env_kwargs"], wanted["policy"]
    policy_kwargs, max_steps, min_len = wanted["policy_kwargs"], wanted["max_steps"], wanted["min_len"]
    store = _open_or_create(out, cls, wanted, n_episodes)
    clean_dead_partials(out)  # we hold the lock and no worker runs yet: every temp file is dead
    seeds = store.seeds
    todo = [i for i in range(n_episodes) if store.lengths[i] == 0]
    from tqdm.auto import tqdm

    bar = tqdm(
        total=n_episodes,
        initial=n_episodes - len(todo),
        unit="ep",
        desc=f"collect {out.name}",
        disable=not progress,
    )
    frames, started = 0, time.perf_counter()

    def commit(index: int, length: int) -> None:
        nonlocal frames
        store.commit({index: length})
        frames += length
        bar.update(1)

    args = (str(out), wm_env, env_kwargs, policy, policy_kwargs, max_steps, min_len)
    try:
        import torch

        run_episode_jobs(
            todo, seeds, workers if len(todo) > 1 else 1, _worker_init, args, _worker_collect, commit,
            inline_kwargs={"threads": torch.get_num_threads()},
        )  # fmt: skip
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"collection interrupted: {len(store)}/{n_episodes} episodes are complete in {out}; "
            "run the same command again to resume"
        ) from None
    finally:
        bar.close()
        if "env" in _WORKER:
            _WORKER.pop("env").close()
    elapsed = time.perf_counter() - started
    store.update_metadata(
        last_run={
            "episodes": len(todo),
            "frames": frames,
            "seconds": round(elapsed, 3),
            "frames_per_second": round(frames / elapsed, 1) if elapsed > 0 else None,
            "workers": workers,
        }
    )
    return TrajectoryStore(out)


def _open_or_create(out: Path, cls, wanted: dict, n_episodes: int) -> TrajectoryStore:
    seed = wanted["seed"]
    if out.exists():
        store = TrajectoryStore(out, mode="a")
        meta, wanted = store.metadata, jsonable(wanted)
        diffs = {k: (meta.get(k), wanted[k]) for k in RESUME_KEYS if meta.get(k) != wanted[k]}
        if diffs:
            listing = "; ".join(f"{k}: dataset has {a!r}, asked {b!r}" for k, (a, b) in diffs.items())
            raise DatasetError(
                f"{out} holds a different collection ({listing}). Use another out= path, or the same "
                "settings "
                "to resume it."
            )
        if n_episodes > store.n_slots:
            store.grow(n_episodes)
        ensure_seeds(store, np.array([episode_seed(seed, i) for i in range(n_episodes)], np.int64))
        return store
    spec = StoreSpec(
        n_episodes=n_episodes,
        max_len=wanted["max_steps"],
        frame_shape=(FRAME, FRAME, 3),
        action_dim=cls.action_dim,
        state_dim=2,
    )
    import wmlab

    metadata = {
        **wanted,
        "kind": "worldmodels",
        "state_keys": ["reward", "done"],
        "render_size": [FRAME, FRAME],
        "versions": {"wmlab": wmlab.__version__, "numpy": np.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    seeds = np.array([episode_seed(seed, i) for i in range(n_episodes)], np.int64)
    return TrajectoryStore.create(out, spec, metadata, seeds=seeds)  # built aside, seeds included
