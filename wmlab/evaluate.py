"""Closed-loop evaluation (``wmlab plan``): success rate, distances, timings, videos.

    plan(cfg) -> out_dir

Start/goal pairs come from the env's ``sample_start_goal`` with DINO-WM's per-episode seeds
(``seed * i + 1``, ``goal_source=random_state``) or from dataset segments whose actions are replayed
in the env (``goal_source=dset``). All episodes run together through ``run_mpc`` (one batched plan
per step for every episode). Writes into ``out_dir``:

- ``results.jsonl``: one row per episode (pair seed, reached / final success, final distances,
  env steps used, median plan seconds, plans made);
- ``summary.json``: success rates with 95% Wilson intervals, mean final distance, median plan time,
  the protocol (budget; ``unbounded`` when ``max_iter=null`` reproduces DINO-WM's loop);
- ``videos/episode_<i>_<success|failure>.gif``: real frames beside the goal for the first episodes.
Episodes are written as a whole run; a re-run with the same settings and an existing ``summary.json``
is skipped (``overwrite=true`` re-runs it).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from wmlab.planning.mpc import EpisodeOutcome, Observation, Protocol, run_mpc
from wmlab.report.study_report import wilson_interval
from wmlab.runs import write_json

GOAL_SOURCES = ("random_state", "dset")


class EpisodeBatch:
    """Many episodes on one env: each keeps its own physics snapshot, so they step independently.

    starts, goals: float (B, 4) ``[x, y, vx, vy]``. ``record``: episode indices whose every frame is
    kept for a video.
    """

    def __init__(self, env, starts: np.ndarray, goals: np.ndarray, record=()) -> None:
        self.env = env
        self.starts = np.asarray(starts, dtype=np.float64)
        self.goals = np.asarray(goals, dtype=np.float64)
        if self.starts.shape != self.goals.shape or self.starts.ndim != 2:
            raise ValueError(f"starts {self.starts.shape} and goals {self.goals.shape} must both be (B, S)")
        self.physics, self.frames = [], []
        for start in self.starts:
            env.reset(options={"state": start})
            self.physics.append(env.get_physics())
            self.frames.append(env.render())
        self.videos = {int(i): [self.frames[int(i)]] for i in record if int(i) < len(self)}
        self._goal_frames = None

    def __len__(self) -> int:
        return len(self.starts)

    def goal_frames(self) -> np.ndarray:
        """The goal images (B, H, W, 3): the env rendered at each goal state."""
        if self._goal_frames is None:
            frames = []
            for goal in self.goals:
                self.env.set_state(goal)
                frames.append(self.env.render())
            self._goal_frames = np.stack(frames)
        return self._goal_frames

    def goal_proprio(self) -> np.ndarray:
        return self.goals.astype(np.float32)  # (B, 4)

    def state(self, i: int) -> np.ndarray:
        self.env.set_physics(self.physics[i])
        return self.env.state

    def observe(self, episodes: np.ndarray) -> Observation:
        frames = np.stack([self.frames[i] for i in episodes])  # (B, H, W, 3)
        proprio = np.stack([self.state(i) for i in episodes])  # (B, 4)
        return Observation(frames=frames, proprio=proprio, episodes=np.asarray(episodes))

    def step(self, i: int, actions: np.ndarray) -> None:
        """Execute raw actions (k, A) in episode i, then render the frame the policy will see."""
        self.env.set_physics(self.physics[i])
        for action in actions:
            self.env.step(action)
            if i in self.videos:
                self.videos[i].append(self.env.render())
        self.physics[i] = self.env.get_physics()
        self.frames[i] = self.videos[i][-1] if i in self.videos else self.env.render()

    def success(self, i: int) -> bool:
        return bool(self.env.evaluate(self.goals[i], self.state(i))["success"])

    def distances(self, i: int) -> dict:
        state = self.state(i)
        measured = self.env.evaluate(self.goals[i], state)
        return {
            "success": measured["success"],
            "state_dist": measured["state_dist"],
            "xy_dist": float(np.linalg.norm(self.goals[i][:2] - state[:2])),
        }


# ---------------------------------------------------------------- start / goal pairs
def random_state_pairs(env, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """DINO-WM's ``random_state`` pairs: episode i uses ``sample_start_goal(seed * i + 1)``."""
    seeds = [int(seed) * i + 1 for i in range(n)]
    pairs = [env.sample_start_goal(s) for s in seeds]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), seeds


def dataset_pairs(env, data, n: int, seed: int, goal_steps: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Goals reached by replaying ``goal_steps`` dataset actions from a dataset state (DINO-WM's ``dset``).

    Episodes are drawn with ``np.random.default_rng(seed)``; the start is the recorded state at a random
    offset and the goal is where the env ends after replaying the recorded actions from it.
    """
    from wmlab.data import open_dataset

    store = open_dataset(data)
    lengths = np.asarray(store.lengths)
    usable = np.flatnonzero(lengths > goal_steps)
    if len(usable) == 0:
        raise ValueError(f"no episode in {data} is longer than goal_H x frameskip = {goal_steps} steps")
    rng = np.random.default_rng(seed)
    starts, goals, ids = [], [], []
    states, actions = store.all_states(), store.all_actions()
    for _ in range(n):
        e = int(rng.choice(usable))
        t = int(rng.integers(0, lengths[e] - goal_steps))
        env.reset(options={"state": states[e, t]})
        for a in actions[e, t : t + goal_steps]:
            env.step(a)
        starts.append(np.asarray(states[e, t], dtype=np.float64))
        goals.append(env.state.astype(np.float64))
        ids.append(e * 100000 + t)
    return np.stack(starts), np.stack(goals), ids


# ---------------------------------------------------------------- results
def summarize(outcomes: list[EpisodeOutcome], protocol: Protocol, extra: dict | None = None) -> dict:
    """Success rates with 95% Wilson intervals, mean final distance, median plan time."""
    n = len(outcomes)
    summary = {"n_episodes": n, "protocol": protocol.to_dict()}
    for key in ("reached", "final"):
        k = sum(getattr(o, key) for o in outcomes)
        lo, hi = wilson_interval(k, n)
        summary[f"success_{key}"] = {"rate": k / max(n, 1), "successes": k, "ci95": [lo, hi]}
    summary["mean_final_dist"] = float(np.mean([o.final_dist for o in outcomes])) if n else float("nan")
    summary["mean_final_state_dist"] = (
        float(np.mean([o.final_state_dist for o in outcomes])) if n else float("nan")
    )
    seconds = [s for o in outcomes for s in o.plan_seconds]
    summary["median_plan_seconds_per_episode"] = float(np.median(seconds)) if seconds else 0.0
    summary["mean_steps_used"] = float(np.mean([o.steps_used for o in outcomes])) if n else 0.0
    summary.update(extra or {})
    return summary


def outcome_row(i: int, pair_seed: int, outcome: EpisodeOutcome, protocol: Protocol) -> dict:
    return {
        "episode": i,
        "start_seed": pair_seed,
        "reached": outcome.reached,
        "reached_step": outcome.reached_step,
        "final": outcome.final,
        "final_dist": outcome.final_dist,
        "final_state_dist": outcome.final_state_dist,
        "steps_used": outcome.steps_used,
        "max_steps": protocol.max_steps,
        "plan_time_s": float(np.median(outcome.plan_seconds)) if outcome.plan_seconds else 0.0,
        "n_plans": len(outcome.plan_seconds),
    }


def write_videos(
    batch: EpisodeBatch, outcomes: list[EpisodeOutcome], out_dir: Path, fps: int = 12
) -> list[Path]:
    """Each recorded episode as a GIF: the real frames (left) beside the goal image (right)."""
    import imageio.v3 as iio

    out_dir.mkdir(parents=True, exist_ok=True)
    goals = batch.goal_frames()
    paths = []
    for i, frames in batch.videos.items():
        tag = "success" if outcomes[i].final else "failure"
        side = [np.concatenate([f, goals[i]], axis=1) for f in frames[::2] + frames[-1:]]  # (H, 2W, 3)
        path = out_dir / f"episode_{i:03d}_{tag}.gif"
        tmp = path.with_name(path.name + ".partial.gif")
        iio.imwrite(tmp, np.stack(side), duration=1000 / fps, loop=0)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def evaluate_policy(
    policy, env, starts, goals, pair_seeds, protocol: Protocol, out_dir=None, *, n_videos: int = 3,
    extra: dict | None = None, progress: bool = False,
) -> tuple[list[dict], dict]:  # fmt: skip
    """Run ``policy`` on all pairs at once; return (rows, summary) and write them when ``out_dir``."""
    batch = EpisodeBatch(env, starts, goals, record=range(n_videos))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=protocol.max_plans, desc="plans", leave=False)

    def report(done, total, outcomes):
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reached=sum(o.reached for o in outcomes))

    started = time.perf_counter()
    outcomes = run_mpc(policy, batch, protocol, progress=report)
    if bar is not None:
        bar.close()
    rows = [outcome_row(i, s, o, protocol) for i, (s, o) in enumerate(zip(pair_seeds, outcomes, strict=True))]
    summary = summarize(outcomes, protocol, {"wall_seconds": time.perf_counter() - started, **(extra or {})})
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        videos = write_videos(batch, outcomes, out_dir / "videos") if n_videos else []
        summary["videos"] = [str(p.relative_to(out_dir)) for p in videos]
        tmp = out_dir / "results.jsonl.partial"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, out_dir / "results.jsonl")
        write_json(out_dir / "summary.json", summary)  # last: its presence marks a finished evaluation
    return rows, summary


# ---------------------------------------------------------------- `wmlab plan`
def make_policy(
    planner_cfg: dict, *, env, protocol: Protocol, horizon: int, model=None, objective=None, chunk=None
):
    """The policy named by ``planner_cfg['name']``: ``random``, ``oracle``, ``<planner>`` (open loop:
    plan once, execute the whole plan) or ``mpc_<planner>`` (re-plan every n_taken_actions)."""
    from wmlab.planning import make_planner
    from wmlab.planning.policies import RandomPolicy, StateOraclePolicy, WorldModelPolicy

    cfg = dict(planner_cfg)
    name = cfg.pop("name")
    cfg.pop("n_taken_actions", None)
    if name == "random":
        return RandomPolicy(
            protocol.steps_per_plan, env.action_space.low, env.action_space.high, seed=cfg.get("seed", 0)
        )
    if name == "oracle":
        return StateOraclePolicy(env, steps_per_plan=protocol.steps_per_plan, **cfg)
    if model is None:
        raise ValueError(f"planner {name!r} plans through a world model: pass model_name=<run>")
    cfg["horizon"] = horizon
    planner = make_planner(name.removeprefix("mpc_"), **cfg)
    return WorldModelPolicy(
        model, planner, objective, horizon=horizon, n_taken_actions=protocol.n_taken_actions, chunk=chunk
    )


def resolve_run(run_dir: Path, import_to: Path | None = None) -> Path:
    """A wmlab run directory as is; a DINO-WM run (hydra.yaml + checkpoints/) is imported first."""
    run_dir = Path(run_dir)
    if (run_dir / "config.yaml").is_file():
        return run_dir
    if (run_dir / "hydra.yaml").is_file() and (run_dir / "checkpoints").is_dir():
        from wmlab.models.dino_wm_checkpoint import import_dino_wm

        out = import_to or Path("outputs") / "imported" / run_dir.name
        return out if (out / "config.yaml").is_file() else import_dino_wm(run_dir, out)
    raise FileNotFoundError(
        f"no run at {run_dir}: expected a wmlab run (config.yaml) or a DINO-WM run (hydra.yaml + "
        "checkpoints/). Set ckpt_base_path=... model_name=... or run_dir=..."
    )


def run_env(run_dir: Path, run_cfg: dict, fallback: dict) -> dict:
    """The env (name + settings) the run's frames were rendered with: from its dataset's metadata
    when the dataset is still there (authoritative: image size, camera, agent size), else its config."""
    from wmlab.runs import read_json

    meta_path = run_dir / "metadata.json"
    dataset = read_json(meta_path).get("dataset", {}) if meta_path.is_file() else {}
    path = Path(str(dataset.get("path", "")))
    if dataset.get("path") and (path / "zarr.json").is_file():
        from wmlab.data.store import TrajectoryStore

        meta = TrajectoryStore(path).metadata
        if meta.get("env") and meta.get("env_kwargs") is not None:
            return {"name": meta["env"], **meta["env_kwargs"]}
    return {**fallback, **dict(run_cfg.get("env", {}))}


def protocol_from(cfg: dict, frameskip: int) -> Protocol:
    """max_steps (env steps) bounds the episode; max_iter (plans) overrides it; max_iter=null = unbounded."""
    planner = cfg["planner"]
    mpc = planner["name"].startswith("mpc_") or planner["name"] in ("random", "oracle")
    horizon = int(cfg["goal_H"])
    n_taken = int(planner.get("n_taken_actions") or horizon) if mpc else horizon
    max_iter = cfg.get("max_iter", "auto")
    if not mpc:  # open loop (DINO-WM's Table 8): one plan, executed whole
        max_steps = n_taken * frameskip
    elif max_iter is None:
        max_steps = None
    elif max_iter == "auto":
        max_steps = cfg.get("max_steps")
    else:
        max_steps = int(max_iter) * n_taken * frameskip
    return Protocol(max_steps=max_steps, n_taken_actions=n_taken, frameskip=frameskip)


def plan(cfg: dict) -> Path:
    """The ``wmlab plan`` verb: evaluate a run's planner (or a baseline) closed-loop; returns out_dir."""
    import torch

    from wmlab.envs import make_env
    from wmlab.planning.objectives import Objective
    from wmlab.planning.planning_model import PlanningModel
    from wmlab.runs import read_config
    from wmlab.train import resolve_device

    out_dir = Path(cfg["out"])
    if (out_dir / "summary.json").is_file() and not cfg.get("overwrite", False):
        print(f"already evaluated: {out_dir / 'summary.json'} (overwrite=true to re-run)")
        return out_dir
    needs_model = cfg["planner"]["name"] not in ("random", "oracle")
    run_dir = cfg.get("run_dir") or (
        str(Path(cfg["ckpt_base_path"]) / cfg["model_name"]) if cfg.get("model_name") else None
    )
    model, env_cfg, frameskip = None, dict(cfg["env"]), int(cfg["frameskip"])
    if run_dir is not None:
        run_dir = resolve_run(Path(run_dir))
        run_cfg = read_config(run_dir / "config.yaml")
        env_cfg = run_env(run_dir, run_cfg, env_cfg)
        frameskip = int(run_cfg["frameskip"])
        if needs_model:
            device = resolve_device(cfg.get("device", "auto"))
            model = PlanningModel.from_run(
                run_dir, device=device, data=cfg.get("data"), encoder_weights=cfg.get("encoder_weights")
            )
    elif needs_model:
        raise ValueError(f"planner {cfg['planner']['name']!r} needs a world model: pass model_name=<run>")
    env = make_env(env_cfg.pop("name"), **{k: v for k, v in env_cfg.items()})
    protocol = protocol_from(cfg, frameskip)
    if cfg["goal_source"] == "random_state":
        starts, goals, seeds = random_state_pairs(env, int(cfg["n_evals"]), int(cfg["seed"]))
    elif cfg["goal_source"] == "dset":
        if not cfg.get("data"):
            raise ValueError("goal_source=dset replays dataset actions: pass data=<dataset>")
        starts, goals, seeds = dataset_pairs(
            env, cfg["data"], int(cfg["n_evals"]), int(cfg["seed"]), int(cfg["goal_H"]) * frameskip
        )
    else:
        raise ValueError(f"goal_source must be one of {GOAL_SOURCES}, got {cfg['goal_source']!r}")
    objective = Objective(**cfg["objective"])
    torch.manual_seed(int(cfg["seed"]))
    policy = make_policy(cfg["planner"], env=env, protocol=protocol, horizon=int(cfg["goal_H"]), model=model,
                         objective=objective, chunk=cfg.get("chunk"))  # fmt: skip
    extra = {
        "planner": cfg["planner"],
        "goal_source": cfg["goal_source"],
        "goal_H": int(cfg["goal_H"]),
        "seed": int(cfg["seed"]),
        "objective": cfg["objective"],
        "run_dir": str(run_dir) if run_dir else None,
    }
    evaluate_policy(
        policy, env, starts, goals, seeds, protocol, out_dir, n_videos=int(cfg.get("n_videos", 3)),
        extra=extra, progress=bool(cfg.get("progress", True)),
    )  # fmt: skip
    env.close()
    return out_dir
