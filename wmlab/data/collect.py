"""Collect trajectory datasets with parallel workers, resumable after Ctrl-C or kill.

Each episode slot ``i`` has a seed derived from (base seed, i), so what slot ``i`` holds does not
depend on which worker ran it or how often the job was interrupted. Workers write their episode's
chunks straight into the store; only this process commits, after a worker reports success. A
re-run with the same arguments skips committed slots and redoes the rest, so no episode is lost
or duplicated.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import time
from pathlib import Path

import numpy as np

from wmlab.data.errors import DatasetError
from wmlab.data.policies import make_policy
from wmlab.data.store import StoreSpec, TrajectoryStore, jsonable
from wmlab.envs import env_entry, make_env

#: Metadata that must match for a re-run to resume into an existing dataset.
RESUME_KEYS = ("env", "env_kwargs", "episode_len", "policy", "seed")


def episode_seed(base_seed: int, index: int) -> int:
    """Independent, reproducible seed for episode slot ``index``."""
    return int(np.random.SeedSequence([int(base_seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


def run_episode(env, policy, seed: int, episode_len: int) -> dict:
    """Roll out ``episode_len`` steps; frame/state ``t`` is observed before action ``t`` is taken.

    Returns frames uint8 (T, H, W, 3), actions float32 (T, A), states float32 (T, S).
    """
    obs, info = env.reset(seed=seed)
    frames, actions, states = [], [], []
    for _ in range(episode_len):
        action = policy(obs)
        frames.append(obs["visual"])
        states.append(info["state"])
        actions.append(action)
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            break
    return {
        "frames": np.stack(frames).astype(np.uint8),
        "actions": np.stack(actions).astype(np.float32),
        "states": np.stack(states).astype(np.float32),
    }


# ---------------------------------------------------------------- worker side (one per process)
_WORKER: dict = {}


def _worker_init(out: str, env_name: str, env_kwargs: dict, policy: str, episode_len: int) -> None:
    _WORKER.update(
        store=TrajectoryStore(out, mode="a"),
        env=make_env(env_name, **env_kwargs),
        policy=policy,
        episode_len=episode_len,
    )


def _worker_collect(index: int, seed: int) -> tuple[int, int]:
    env = _WORKER["env"]
    policy = make_policy(_WORKER["policy"], env.action_space, seed=seed + 1)
    episode = run_episode(env, policy, seed, _WORKER["episode_len"])
    _WORKER["store"].write_episode(index, episode["frames"], episode["actions"], episode["states"])
    return index, len(episode["frames"])


# ---------------------------------------------------------------- driver
def run_episode_jobs(
    todo, seeds, workers: int, init, initargs: tuple, collect_one, commit, inline_kwargs=None
):
    """Run ``collect_one(slot, seed)`` for every slot in ``todo``: in this process when ``workers <= 1``
    (after ``init(*initargs, **inline_kwargs)``), else in spawned worker processes (``init`` runs once
    in each; spawn gives every worker a fresh GL / game state). ``commit(*result)`` runs here as each
    episode finishes, so only this process writes the commit index; on any error the pending jobs
    are cancelled and the error propagates.
    """
    if workers <= 1:
        init(*initargs, **(inline_kwargs or {}))
        for index in todo:
            commit(*collect_one(index, int(seeds[index])))
        return
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=context, initializer=init, initargs=initargs) as pool:
        futures = [pool.submit(collect_one, i, int(seeds[i])) for i in todo]
        try:
            for future in cf.as_completed(futures):
                commit(*future.result())
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def collect(
    out: str | Path,
    env: str = "point_maze",
    n_episodes: int = 2000,
    episode_len: int = 100,
    policy: str = "random",
    workers: int = 2,
    seed: int = 0,
    env_kwargs: dict | None = None,
    progress: bool = True,
) -> TrajectoryStore:
    """Collect ``n_episodes`` episodes of ``episode_len`` steps into the store at ``out``.

    Resumes an existing dataset made with the same env, env kwargs, episode length, policy and
    seed; growing ``n_episodes`` appends slots. Returns the store (read-only view).
    """
    if n_episodes < 1 or episode_len < 1:
        raise ValueError(f"n_episodes and episode_len must be >= 1, got {n_episodes}, {episode_len}")
    entry = env_entry(env)
    env_kwargs = dict(env_kwargs or {})
    out = Path(out)
    store = _open_or_create(out, env, entry, env_kwargs, n_episodes, episode_len, policy, seed)
    seeds = np.asarray(store.arrays["seeds"][:])
    lengths = store.lengths
    todo = [i for i in range(n_episodes) if lengths[i] == 0]
    done_before = n_episodes - len(todo)
    started = time.perf_counter()
    bar = _progress_bar(n_episodes, done_before, progress, out)
    committed, frames = 0, 0

    def commit(index: int, length: int) -> None:
        nonlocal committed, frames
        store.commit({index: length})
        committed, frames = committed + 1, frames + length
        bar.update(1)

    try:
        run_episode_jobs(
            todo, seeds, workers, _worker_init, (str(out), env, env_kwargs, policy, episode_len),
            _worker_collect, commit,
        )  # fmt: skip
    except KeyboardInterrupt:
        bar.close()
        raise KeyboardInterrupt(
            f"collection interrupted: {len(store)}/{n_episodes} episodes are complete in {out}; "
            "run the same command again to resume"
        ) from None
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    store.update_metadata(
        last_run={
            "episodes": committed,
            "seconds": round(elapsed, 3),
            "frames_per_second": round(frames / elapsed, 1) if elapsed > 0 else None,
            "workers": workers,
        }
    )
    return TrajectoryStore(out)


def _open_or_create(out, env, entry, env_kwargs, n_episodes, episode_len, policy, seed) -> TrajectoryStore:
    wanted = dict(env=env, env_kwargs=env_kwargs, episode_len=episode_len, policy=policy, seed=seed)
    if out.exists():
        store = TrajectoryStore(out, mode="a")
        meta = store.metadata
        wanted = jsonable(wanted)  # compare as stored: tuples became lists in JSON
        diffs = {k: (meta.get(k), wanted[k]) for k in RESUME_KEYS if meta.get(k) != wanted[k]}
        if diffs:
            listing = "; ".join(f"{k}: dataset has {a!r}, asked {b!r}" for k, (a, b) in diffs.items())
            raise DatasetError(
                f"{out} holds a different collection ({listing}). Use another out= path, or the same "
                "settings to resume it."
            )
        if n_episodes > store.n_slots:
            store.grow(n_episodes)
            store.set_seeds([episode_seed(seed, i) for i in range(n_episodes)])
        return store

    probe = make_env(env, **env_kwargs)
    frame_shape = tuple(probe.observation_space["visual"].shape)
    spec = StoreSpec(
        n_episodes=n_episodes,
        max_len=episode_len,
        frame_shape=frame_shape,
        action_dim=int(np.prod(probe.action_space.shape)),
        state_dim=int(probe.observation_space["proprio"].shape[0]),
    )
    metadata = {
        **wanted,
        "env_id": entry.gym_id,
        "env_version": getattr(probe, "version", None),
        "render_size": list(frame_shape[:2]),
        "camera": probe.camera_values() if hasattr(probe, "camera_values") else None,
        "state_keys": ["x", "y", "vx", "vy"],
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    probe.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    store = TrajectoryStore.create(out, spec, metadata)
    store.set_seeds([episode_seed(seed, i) for i in range(n_episodes)])
    return store


def _versions() -> dict:
    import mujoco

    import wmlab

    return {"wmlab": wmlab.__version__, "mujoco": mujoco.__version__, "numpy": np.__version__}


def _progress_bar(total: int, initial: int, enabled: bool, out: Path):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="ep", desc=f"collect {out.name}", disable=not enabled)
