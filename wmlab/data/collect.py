"""Collect trajectory datasets with parallel workers, resumable after Ctrl-C or kill.

Each episode slot ``i`` has a seed derived from (base seed, i), so what slot ``i`` holds does not
depend on which worker ran it or how often the job was interrupted. Workers write their episode's
chunks straight into the store; only this process commits, after a worker reports success. A
re-run with the same arguments skips committed slots and redoes the rest, so no episode is lost
or duplicated.

One collector per dataset: ``collect`` holds the dataset's ``WriterLock`` from before it looks at
``out`` until its last commit; a second one is refused with who holds it (``LockHeld``), or waits
up to ``lock_wait`` seconds. Every option is checked before anything is created, so a typo never
leaves a half-made dataset behind.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import time
from pathlib import Path

import numpy as np

from wmlab.data.errors import DatasetError
from wmlab.data.policies import POLICIES, make_policy
from wmlab.data.store import StoreSpec, TrajectoryStore, clean_dead_partials, fault_point, jsonable
from wmlab.envs import ENVS, env_entry, make_env
from wmlab.integrity import WriterLock

#: Metadata that must match for a re-run to resume into an existing dataset.
RESUME_KEYS = ("env", "env_kwargs", "episode_len", "policy", "seed")


def check_count(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``, else a ``DatasetError`` naming the option."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise DatasetError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_lock_wait(lock_wait) -> float:
    if not isinstance(lock_wait, int | float) or isinstance(lock_wait, bool) or not lock_wait >= 0:
        raise DatasetError(f"lock_wait must be a number of seconds >= 0, got {lock_wait!r}")
    return float(lock_wait)


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
    lock_wait: float = 0.0,
) -> TrajectoryStore:
    """Collect ``n_episodes`` episodes of ``episode_len`` steps into the store at ``out``.

    Resumes an existing dataset made with the same env, env kwargs, episode length, policy and
    seed; growing ``n_episodes`` appends slots. Holds the dataset's writer lock throughout: another
    writer of ``out`` makes this raise ``LockHeld`` (or wait ``lock_wait`` seconds for it). Options
    are validated before anything is created. Returns the store (read-only view).
    """
    n_episodes = check_count("n_episodes", n_episodes)
    episode_len = check_count("episode_len", episode_len)
    workers = check_count("workers", workers)
    lock_wait = check_lock_wait(lock_wait)
    if env not in ENVS:
        raise DatasetError(f"unknown env {env!r}; known envs: {', '.join(sorted(ENVS))}")
    if policy not in POLICIES:
        raise DatasetError(f"unknown policy {policy!r}; known policies: {', '.join(sorted(POLICIES))}")
    entry = env_entry(env)
    env_kwargs = dict(env_kwargs or {})
    out = Path(out)
    with WriterLock(out, "dataset", wait=lock_wait):
        store = _open_or_create(out, env, entry, env_kwargs, n_episodes, episode_len, policy, seed)
        clean_dead_partials(out)  # we hold the lock and no worker runs yet: every temp file is dead
        seeds = store.seeds
        lengths = store.lengths
        todo = [i for i in range(n_episodes) if lengths[i] == 0]
        done_before = n_episodes - len(todo)
        started = time.perf_counter()
        bar = _progress_bar(n_episodes, done_before, progress, out)
        committed, frames = 0, 0

        def commit(index: int, length: int) -> None:
            nonlocal committed, frames
            store.commit({index: length})
            fault_point("collect:committed")
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


def ensure_seeds(store: TrajectoryStore, expected: np.ndarray) -> None:
    """Make every uncommitted slot's seed the expected one (a kill may have left them unwritten);
    a committed slot with another seed means the dataset is not this collection: refuse."""
    n = len(expected)
    stored = np.asarray(store.arrays["seeds"][:n])
    committed = store.lengths[:n] > 0
    wrong = np.flatnonzero(committed & (stored != expected))
    if wrong.size:
        i = int(wrong[0])
        raise DatasetError(
            f"{store.path}: committed episode {i} has seed {int(stored[i])}, this collection gives "
            f"{int(expected[i])}; it is not the same collection. Use another out= path."
        )
    if (stored != expected).any():
        seeds = np.asarray(store.arrays["seeds"][:])
        seeds[:n] = expected
        store.set_seeds(seeds)


def _open_or_create(out, env, entry, env_kwargs, n_episodes, episode_len, policy, seed) -> TrajectoryStore:
    wanted = dict(env=env, env_kwargs=env_kwargs, episode_len=episode_len, policy=policy, seed=seed)
    expected = np.array([episode_seed(seed, i) for i in range(n_episodes)], dtype=np.int64)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder made beforehand: create the dataset in its place
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
        ensure_seeds(store, expected)
        return store

    try:  # also validates the env options, before anything is created
        probe = make_env(env, **env_kwargs)
    except (TypeError, ValueError) as err:
        raise DatasetError(f"env {env} does not accept options {env_kwargs}: {err}") from err
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
    store = TrajectoryStore.create(out, spec, metadata, seeds=expected)
    fault_point("collect:created")
    return store


def _versions() -> dict:
    import mujoco

    import wmlab

    return {"wmlab": wmlab.__version__, "mujoco": mujoco.__version__, "numpy": np.__version__}


def _progress_bar(total: int, initial: int, enabled: bool, out: Path):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="ep", desc=f"collect {out.name}", disable=not enabled)
