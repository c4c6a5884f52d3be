"""Closed-loop evaluation (``wmlab plan``): success rate, distances, timings, videos.

    plan(cfg) -> out_dir

Start/goal pairs come from the env's ``sample_start_goal`` with DINO-WM's per-episode seeds
(``seed * i + 1``, ``goal_source=random_state``) or from validation-episode segments of a dataset whose
actions are replayed in the env (``goal_source=dset``; the run's own train/validation split, as DINO-WM
draws from its validation set). All episodes run together through ``run_mpc`` (one batched plan per
step for every episode). The baselines (``random``, ``oracle``) run under a model planner's protocol
with ``for_planner=<planner>`` (open loop: one plan of goal_H x frameskip env steps; ``mpc_*``: the
max_steps budget), so every planner is drawn against its own floor and ceiling. Writes into ``out_dir``:

- ``key.json``: everything the results depend on (``plan_key``: run identity and weights hash,
  planner settings, protocol incl. ``for_planner``, the env-step budget and the dset split, objective,
  env settings, data fingerprint, requested precision, layout version);
- ``results.jsonl``: one row per episode (``outcome_row``): ``pair_seed`` (shared by every encoder and
  seed), reached / final success, ``first_reached_step``, ``dist_trace`` (geodesic distance to the goal
  at every observation) with ``obs_steps`` (their env steps, from 0), ``max_steps`` (the budget),
  final distances (xy ``final_dist``, ``final_geodesic_dist``, DINO-WM's ``final_state_dist``), env
  steps used, ``iterations_used`` (plans made), median plan seconds, ``for_planner``; ``xy_trace``
  (agent x, y after every env step, from the start) and ``goal_xy`` (for trajectories drawn on the maze);
  ``plan_cost_trace`` (a model planner's lowest cost after each optimiser iteration of the episode's
  first plan; null for the baselines);
- ``summary.json``: success rates with 95% Wilson intervals, mean final distances, median plan time,
  the protocol (budget; ``unbounded`` when ``max_iter=null`` reproduces DINO-WM's loop), iterations
  used, ``for_planner``, the dset ``split``, and ``policy`` (a model planner's chosen precision with its
  evidence, chunking); written last, so its presence marks a finished cell;
- ``videos/episode_<i>_<success|failure>.gif``: real frames beside the goal for the first episodes,
  each labelled with its env step and distance to the goal.

Where results go. By default a cell lives in ``outputs/plans/<model>__<planner>__<goal_source>_gH<H>_
n<N>_seed<S>__<hash of its key>``: a re-run with exactly the same key is skipped ("already evaluated"),
any other setting (another model, retrained weights, planner settings, max_steps, ...) gets its own
directory. With an explicit ``out=`` a directory holding another key is refused with the list of what
differs (``overwrite=true`` re-runs it). A cell is computed under a writer lock (a second process on
the same cell is refused with who holds it) and a half-finished cell is recomputed only under its key.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wmlab.integrity import (
    KeyMismatch,
    UserError,
    WriterLock,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_key,
    fingerprint,
    keyed_dir,
    sha256_file,
    write_key,
)
from wmlab.planning.mpc import UNBOUNDED_CAP, EpisodeOutcome, Observation, Protocol, run_mpc
from wmlab.report.study_report import wilson_interval

GOAL_SOURCES = ("random_state", "dset")
#: Policies that need no world model (floor and ceiling); they may run under a model planner's protocol.
BASELINES = ("random", "oracle")
#: Version of a plan cell's layout and meaning (key.json, results.jsonl, summary.json, videos/).
#: Bump it when evaluation changes what the same settings produce: old cells then get new keys.
#: 3: rows carry the budget-curve fields (dist_trace, obs_steps, first_reached_step, ...).
#: 4: rows carry xy_trace, goal_xy and plan_cost_trace; GIFs are labelled (step, distance).
PLAN_FORMAT = 4
DEFAULT_PLANS_DIR = Path("outputs") / "plans"


class PlanSettingError(UserError, ValueError):
    """A ``wmlab plan`` setting out of its valid range (refused before anything is created)."""


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
        # Where the policy observed each episode: env step and xy position of every observation,
        # starting with the start state at step 0 (``dist_trace`` and ``obs_steps`` of the rows).
        self.obs_steps: list[list[int]] = []
        self.obs_xy: list[list[np.ndarray]] = []
        for start in self.starts:
            env.reset(options={"state": start})
            self.physics.append(env.get_physics())
            self.frames.append(env.render())
            self.obs_steps.append([0])
            self.obs_xy.append([np.array(env.state[:2], dtype=np.float64)])
        self.videos = {int(i): [self.frames[int(i)]] for i in record if int(i) < len(self)}
        # The agent's (x, y) after every env step, from the start: the path drawn on the maze (xy_trace).
        self.path_xy: list[list[np.ndarray]] = [[xy[0]] for xy in self.obs_xy]
        self.video_xy = {i: [self.obs_xy[i][0]] for i in self.videos}  # agent (x, y) of each video frame
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
            self.path_xy[i].append(np.array(self.env.state[:2], dtype=np.float64))
            if i in self.videos:
                self.videos[i].append(self.env.render())
                self.video_xy[i].append(self.path_xy[i][-1])
        self.physics[i] = self.env.get_physics()
        self.frames[i] = self.videos[i][-1] if i in self.videos else self.env.render()
        # run_mpc executes one plan's actions per call and observes after it: one grid point per call
        self.obs_steps[i].append(self.obs_steps[i][-1] + len(actions))
        self.obs_xy[i].append(np.array(self.env.state[:2], dtype=np.float64))

    def success(self, i: int) -> bool:
        return bool(self.env.evaluate(self.goals[i], self.state(i))["success"])

    @property
    def distance_kind(self) -> str:
        """``geodesic`` (shortest path in the maze, ``wmlab.envs.geodesic``, the oracle's cost) when the
        env is a maze, else ``xy`` (straight-line distance; recorded in every row as ``dist_kind``)."""
        return "geodesic" if getattr(self.env, "layout", None) is not None else "xy"

    def distances_to_goal(self, i: int, xy: np.ndarray) -> np.ndarray:
        """Distance (geodesic in a maze, else xy) from points xy (M, 2) to episode i's goal -> (M,)."""
        goal_xy = np.repeat(self.goals[i : i + 1, :2], len(xy), axis=0)  # (M, 2)
        if self.distance_kind == "geodesic":
            return _geodesic_or_nan(self.env.layout, xy, goal_xy)
        return np.linalg.norm(xy - goal_xy, axis=1)

    def distance_traces(self) -> list[np.ndarray]:
        """Each episode's distance to its goal at every observation (``obs_steps``): float (K_i,).

        One vectorised geodesic call over all observations of all episodes (the visibility graph is
        built once per maze layout). A point the geodesic cannot measure (a goal set inside a wall: no
        path leads there) gets NaN, which the report leaves out of distance statistics."""
        counts = [len(xy) for xy in self.obs_xy]
        xy = np.concatenate([np.stack(p) for p in self.obs_xy])  # (sum K_i, 2)
        goal_xy = np.repeat(self.goals[:, :2], counts, axis=0)  # (sum K_i, 2)
        if self.distance_kind == "geodesic":
            dist = _geodesic_or_nan(self.env.layout, xy, goal_xy)
        else:
            dist = np.linalg.norm(xy - goal_xy, axis=1)
        return np.split(np.asarray(dist, dtype=np.float64), np.cumsum(counts)[:-1])

    def distances(self, i: int) -> dict:
        state = self.state(i)
        measured = self.env.evaluate(self.goals[i], state)
        return {
            "success": measured["success"],
            "state_dist": measured["state_dist"],
            "xy_dist": float(np.linalg.norm(self.goals[i][:2] - state[:2])),
        }


def _geodesic_or_nan(maze, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``geodesic_distance`` of points a, b (M, 2) -> (M,), NaN where a point lies inside a wall."""
    from wmlab.envs.geodesic import geodesic_distance

    try:
        return geodesic_distance(maze, a, b)
    except ValueError:  # some point is in a wall: measure one by one, the others keep their distance
        out = np.full(len(a), np.nan)
        for j in range(len(a)):
            with contextlib.suppress(ValueError):
                out[j] = geodesic_distance(maze, a[j : j + 1], b[j : j + 1])[0]
        return out


# ---------------------------------------------------------------- start / goal pairs
def random_state_pairs(env, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """DINO-WM's ``random_state`` pairs: episode i uses ``sample_start_goal(seed * i + 1)``."""
    seeds = [int(seed) * i + 1 for i in range(n)]
    pairs = [env.sample_start_goal(s) for s in seeds]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), seeds


def validation_episodes(data, split_ratio: float, split_seed: int) -> np.ndarray:
    """The episode ids a run trained with ``split_ratio`` / ``split_seed`` on ``data`` validated on.

    The very split training uses (``make_datasets`` calls ``split_episodes`` on the committed
    episodes), so ``goal_source=dset`` pairs come from episodes the world model never trained on.
    """
    from wmlab.data import open_dataset
    from wmlab.data.windows import split_episodes

    _, val = split_episodes(open_dataset(data).committed, float(split_ratio), int(split_seed))
    if len(val) == 0:
        raise PlanSettingError(
            f"plan: goal_source=dset draws pairs from validation episodes, but split_ratio={split_ratio} "
            f"leaves none of {data}'s episodes for validation: use a run trained with split_ratio < 1"
        )
    return np.sort(val)


def dataset_pairs(
    env, data, n: int, seed: int, goal_steps: int, episodes=None
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Goals reached by replaying ``goal_steps`` dataset actions from a dataset state (DINO-WM's ``dset``).

    Episodes are drawn from ``episodes`` (ids; None = all, DINO-WM draws from its validation set:
    pass ``validation_episodes(...)``) with ``np.random.default_rng(seed)``; the start is the recorded
    state at a random offset and the goal is where the env ends after replaying the recorded actions
    from it. Pair ids are ``episode * 100000 + offset``.
    """
    from wmlab.data import open_dataset

    store = open_dataset(data)
    lengths = np.asarray(store.lengths)
    allowed = np.arange(len(lengths)) if episodes is None else np.asarray(episodes, dtype=np.int64)
    usable = allowed[lengths[allowed] > goal_steps]
    if len(usable) == 0:
        which = "" if episodes is None else f"{len(allowed)} validation episodes of "
        raise PlanSettingError(
            f"plan: no episode of the {which}{data} is longer than goal_H x frameskip = {goal_steps} "
            "steps: lower goal_H or collect longer episodes"
        )
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
def summarize(outcomes: list[EpisodeOutcome], protocol: Protocol, extra: dict | None = None,
              rows: list[dict] | None = None) -> dict:  # fmt: skip
    """Success rates with 95% Wilson intervals, mean final distances, median plan time, plans used.

    rows: the episodes' ``outcome_row``s (for the final geodesic distance and iterations used)."""
    n = len(outcomes)
    summary = {"n_episodes": n, "protocol": protocol.to_dict(), "env_step_budget": env_step_budget(protocol)}
    for key in ("reached", "final"):
        k = sum(getattr(o, key) for o in outcomes)
        lo, hi = wilson_interval(k, n)
        summary[f"success_{key}"] = {"rate": k / max(n, 1), "successes": k, "ci95": [lo, hi]}
    summary["mean_final_dist"] = float(np.mean([o.final_dist for o in outcomes])) if n else float("nan")
    summary["mean_final_state_dist"] = (
        float(np.mean([o.final_state_dist for o in outcomes])) if n else float("nan")
    )
    if rows:
        summary["dist_kind"] = rows[0]["dist_kind"]
        final = np.array([r["dist_trace"][-1] for r in rows], dtype=np.float64)
        measured = final[np.isfinite(final)]  # a goal inside a wall has no geodesic distance (NaN)
        geodesic = rows[0]["dist_kind"] == "geodesic" and len(measured) > 0
        summary["mean_final_geodesic_dist"] = float(measured.mean()) if geodesic else None
        summary["n_unmeasured_dist"] = int(len(final) - len(measured))
        used = [r["iterations_used"] for r in rows]
        summary["iterations_used"] = {
            "mean": float(np.mean(used)),
            "min": int(min(used)),
            "max": int(max(used)),
        }
    seconds = [s for o in outcomes for s in o.plan_seconds]
    summary["median_plan_seconds_per_episode"] = float(np.median(seconds)) if seconds else 0.0
    summary["mean_steps_used"] = float(np.mean([o.steps_used for o in outcomes])) if n else 0.0
    summary.update(extra or {})
    return summary


def env_step_budget(protocol: Protocol) -> int:
    """Env steps an episode may use: max_steps, or the safety cap of DINO-WM's unbounded loop."""
    return int(protocol.max_steps) if protocol.bounded else UNBOUNDED_CAP


def outcome_row(
    i: int, pair_seed: int, outcome: EpisodeOutcome, protocol: Protocol, *, dist_trace=None,
    obs_steps=None, dist_kind: str = "geodesic", for_planner: str | None = None, xy_trace=None,
    goal_xy=None, plan_cost_trace=None,
) -> dict:  # fmt: skip
    """One episode's row of ``results.jsonl`` (the fields ``wmlab.report.analysis`` reads).

    dist_trace (K,): distance to the goal at each observation, ``obs_steps`` (K,) their env steps
    (0 = the start; then after every plan's executed actions, where success is checked).
    ``first_reached_step`` is the first of those steps (after step 0, as in DINO-WM's loop) at which
    the env reported success (xy distance < its success radius; the geodesic distance is >= the xy one,
    so no observation between step 0 and it has ``dist_trace`` under the radius); None if never reached.
    ``max_steps`` is the env-step budget the curve runs to (the cap when ``unbounded``).
    """
    if dist_trace is not None:
        dist_trace = [float(d) for d in dist_trace]
        obs_steps = [int(k) for k in obs_steps]
        assert len(dist_trace) == len(obs_steps) and obs_steps[-1] == outcome.steps_used, (
            f"episode {i}: {len(dist_trace)} distances for {len(obs_steps)} observations "
            f"(last at step {obs_steps[-1]}, {outcome.steps_used} steps used)"
        )
        assert outcome.reached_step is None or outcome.reached_step in obs_steps, (
            f"episode {i}: reached at step {outcome.reached_step}, not an observation step {obs_steps}"
        )
    return {
        "episode": i,
        "pair_seed": pair_seed,
        "start_seed": pair_seed,
        "reached": outcome.reached,
        "reached_step": outcome.reached_step,
        "first_reached_step": outcome.reached_step,
        "final": outcome.final,
        "final_dist": outcome.final_dist,
        "final_state_dist": outcome.final_state_dist,
        "final_geodesic_dist": dist_trace[-1] if dist_trace and dist_kind == "geodesic" else None,
        "dist_kind": dist_kind,
        "dist_trace": dist_trace,
        "obs_steps": obs_steps,
        "steps_used": outcome.steps_used,
        "max_steps": env_step_budget(protocol),
        "unbounded": not protocol.bounded,
        "for_planner": for_planner,
        "plan_time_s": float(np.median(outcome.plan_seconds)) if outcome.plan_seconds else 0.0,
        "n_plans": len(outcome.plan_seconds),
        "iterations_used": len(outcome.plan_seconds),
        "xy_trace": None
        if xy_trace is None
        else [[round(float(x), 4), round(float(y), 4)] for x, y in xy_trace],
        "goal_xy": None if goal_xy is None else [float(goal_xy[0]), float(goal_xy[1])],
        "plan_cost_trace": None if plan_cost_trace is None else [float(c) for c in plan_cost_trace],
    }


def write_videos(
    batch: EpisodeBatch, outcomes: list[EpisodeOutcome], out_dir: Path, fps: int = 12
) -> list[Path]:
    """Each recorded episode as a GIF: the real frames (left) beside the goal image (right), under a
    label strip: "current | goal" and the env step and distance to the goal of each frame."""
    import imageio.v3 as iio

    out_dir.mkdir(parents=True, exist_ok=True)
    goals = batch.goal_frames()
    paths = []
    for i, frames in batch.videos.items():
        tag = "success" if outcomes[i].final else "failure"
        dist = batch.distances_to_goal(i, np.stack(batch.video_xy[i]))  # (len(frames),)
        shown = [*range(0, len(frames), 2), len(frames) - 1]
        side = [
            labelled_frame(frames[k], goals[i], f"step {k}  {batch.distance_kind} {dist[k]:.2f}")
            for k in shown
        ]  # (H', 2W', 3) each
        path = out_dir / f"episode_{i:03d}_{tag}.gif"
        gif = iio.imwrite("<bytes>", np.stack(side), extension=".gif", duration=1000 / fps, loop=0)
        atomic_write_bytes(path, gif, fsync=False)  # a unique temp name per writer, then rename
        paths.append(path)
    return paths


#: Video frames narrower than this are enlarged (nearest neighbour) so their labels stay legible.
LABEL_MIN_WIDTH = 128


def labelled_frame(current: np.ndarray, goal: np.ndarray, caption: str) -> np.ndarray:
    """current | goal (H, W, 3) uint8 side by side, enlarged to >= ``LABEL_MIN_WIDTH`` px each, under a
    strip with "current", "goal" and ``caption`` -> (H' + 28, 2 W', 3) uint8."""
    from PIL import Image, ImageDraw

    scale = max(1, -(-LABEL_MIN_WIDTH // current.shape[1]))  # ceil
    pair = np.concatenate([current, goal], axis=1).repeat(scale, axis=0).repeat(scale, axis=1)
    strip = Image.new("RGB", (pair.shape[1], 28), "white")
    draw = ImageDraw.Draw(strip)
    draw.text((3, 1), "current", fill="black")
    draw.text((pair.shape[1] // 2 + 3, 1), "goal", fill="black")
    draw.text((3, 14), caption, fill="black")
    return np.concatenate([np.asarray(strip), pair], axis=0)


def first_plan_cost_traces(policy, n: int) -> list:
    """Per episode, the lowest cost after each optimiser iteration (I,) of the policy's first plan (every
    episode is active then, in order), or None for a policy without planner traces (the baselines)."""
    results = getattr(policy, "last_results", None) or []
    trace = getattr(results[0], "trace_best", None) if results else None
    if trace is None or trace.ndim != 2 or trace.shape[1] != n:
        return [None] * n
    values = trace.detach().float().cpu().numpy()  # (I, n)
    return [values[:, i] for i in range(n)]


def evaluate_policy(
    policy, env, starts, goals, pair_seeds, protocol: Protocol, out_dir=None, *, n_videos: int = 3,
    extra: dict | None = None, progress: bool = False, before_summary=None,
) -> tuple[list[dict], dict]:  # fmt: skip
    """Run ``policy`` on all pairs at once; return (rows, summary) and write them when ``out_dir``.
    ``before_summary()`` -> dict: more summary fields, computed after the results are written and before
    summary.json (whose presence marks a finished cell), so a kill never leaves a cell without them."""
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
    traces, kind = batch.distance_traces(), batch.distance_kind
    for_planner = (extra or {}).get("for_planner")
    rows = []
    cost_traces = first_plan_cost_traces(policy, len(batch))
    for i, (pair, outcome) in enumerate(zip(pair_seeds, outcomes, strict=True)):
        grid = {"dist_trace": traces[i], "obs_steps": batch.obs_steps[i], "dist_kind": kind,
                "xy_trace": batch.path_xy[i], "goal_xy": batch.goals[i, :2],
                "plan_cost_trace": cost_traces[i]}  # fmt: skip
        rows.append(outcome_row(i, pair, outcome, protocol, for_planner=for_planner, **grid))
    wall = time.perf_counter() - started
    meta = {"policy": policy.metadata} if hasattr(policy, "metadata") else {}
    summary = summarize(outcomes, protocol, {"wall_seconds": wall, **meta, **(extra or {})}, rows)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        videos = write_videos(batch, outcomes, out_dir / "videos") if n_videos else []
        summary["videos"] = [str(p.relative_to(out_dir)) for p in videos]
        atomic_write_text(out_dir / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        if before_summary is not None:
            summary.update(before_summary())
        atomic_write_json(out_dir / "summary.json", summary)  # last: its presence marks a finished cell
    return rows, summary


# ---------------------------------------------------------------- `wmlab plan`
def make_policy(
    planner_cfg: dict, *, env, protocol: Protocol, horizon: int, model=None, objective=None, chunk=None,
    precision: str = "fp32", memory_budget: int | None = None,
):  # fmt: skip
    """The policy named by ``planner_cfg['name']``: ``random``, ``oracle``, ``<planner>`` (open loop:
    plan once, execute the whole plan) or ``mpc_<planner>`` (re-plan every n_taken_actions).

    chunk, precision, memory_budget: passed to ``WorldModelPolicy`` (model planners only; see there).
    A baseline acts every ``protocol.steps_per_plan`` env steps, so under ``for_planner`` it observes
    on that planner's grid."""
    from wmlab.baselines import RandomPolicy, StateOraclePolicy
    from wmlab.planning import make_planner
    from wmlab.planning.policies import WorldModelPolicy

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
        model, planner, objective, horizon=horizon, n_taken_actions=protocol.n_taken_actions, chunk=chunk,
        memory_budget=memory_budget, precision=precision,
    )  # fmt: skip


def resolve_run(run_dir: Path, import_to: Path | None = None, epoch: str | int = "latest") -> Path:
    """A wmlab run directory as is; a DINO-WM run (hydra.yaml + checkpoints/) is imported first.

    The import is keyed by the run's resolved path and its checkpoint's sha256 (``import_dino_wm``):
    an import of exactly that checkpoint is reused, a retrained or different run gets a new one.
    """
    run_dir = Path(run_dir)
    if (run_dir / "config.yaml").is_file():
        return run_dir
    if (run_dir / "hydra.yaml").is_file() and (run_dir / "checkpoints").is_dir():
        from wmlab.models.dino_wm_checkpoint import import_dino_wm

        return import_dino_wm(run_dir, import_to, epoch)
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
    """max_steps (env steps) bounds the episode; max_iter (plans) overrides it; max_iter=null = unbounded.

    The protocol is that of ``for_planner`` when a baseline runs for one (an open-loop planner: one plan
    of goal_H x frameskip env steps; an ``mpc_*`` one: the max_steps budget), else the planner's own
    (baselines without ``for_planner`` run the MPC budget, as before)."""
    planner = cfg["planner"]
    name = cfg.get("for_planner") or planner["name"]
    mpc = name.startswith("mpc_") or name in BASELINES
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


# ---------------------------------------------------------------- settings, keys, cells
def _int_setting(cfg: dict, name: str, minimum: int, meaning: str, allow_none: bool = False) -> None:
    value = cfg.get(name)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        valid = f"an integer >= {minimum}" + (" or null" if allow_none else "")
        raise PlanSettingError(f"plan: {name}={value!r} is not valid: {name} ({meaning}) must be {valid}")


def validate_plan_cfg(cfg: dict) -> None:
    """Refuse out-of-range ``wmlab plan`` settings with the key named, before anything is created."""
    _int_setting(cfg, "n_evals", 1, "start/goal pairs to evaluate")
    _int_setting(cfg, "goal_H", 1, "planning horizon in model steps")
    _int_setting(cfg, "seed", 0, "the pair seed: episode i uses seed * i + 1")
    _int_setting(cfg, "max_steps", 1, "env steps per episode; null = unbounded", allow_none=True)
    _int_setting(cfg, "n_videos", 0, "episodes recorded as GIFs")
    _int_setting(cfg, "frameskip", 1, "env steps per model step")
    if cfg.get("chunk") != "auto":
        _int_setting(cfg, "chunk", 1, "candidates per rollout call; auto or null = by memory_budget", True)
    memory_budget_bytes(cfg.get("memory_budget", "auto"))
    from wmlab.precision import PRECISIONS  # imports torch: only when a plan is validated

    if cfg.get("precision", "fp32") not in PRECISIONS:
        raise PlanSettingError(
            f"plan: precision={cfg.get('precision')!r} is not valid: choose one of {', '.join(PRECISIONS)}"
        )
    for name, check, valid in (
        ("split_ratio", lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1,
         "a number in (0, 1]"),
        ("split_seed", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    ):  # fmt: skip
        if cfg.get(name) is not None and not check(cfg[name]):
            raise PlanSettingError(f"plan: {name}={cfg[name]!r} is not valid: it must be {valid} or null")
    validate_for_planner(cfg)
    if cfg.get("max_iter", "auto") != "auto":
        _int_setting(cfg, "max_iter", 1, "plans per episode; auto or null = unbounded", allow_none=True)
    n_taken = (cfg.get("planner") or {}).get("n_taken_actions")
    if n_taken is not None and (isinstance(n_taken, bool) or not isinstance(n_taken, int) or n_taken < 1):
        raise PlanSettingError(
            f"plan: planner.n_taken_actions={n_taken!r} is not valid: it must be an integer >= 1 or null"
        )
    if cfg.get("goal_source") not in GOAL_SOURCES:
        raise PlanSettingError(
            f"plan: goal_source={cfg.get('goal_source')!r} is not valid: choose one of "
            + ", ".join(GOAL_SOURCES)
        )
    if cfg["goal_source"] == "dset" and not cfg.get("data"):
        raise PlanSettingError("plan: goal_source=dset replays dataset actions: pass data=<dataset>")


def model_planners() -> list[str]:
    """Names of the planner config group that plan through a world model (all but the baselines)."""
    from wmlab.config import _loader

    return [n for n in _loader().get_group_options("planner") if n not in BASELINES]


def validate_for_planner(cfg: dict) -> None:
    """``for_planner`` is for baselines only and must name a model planner (else a PlanSettingError)."""
    target, name = cfg.get("for_planner"), cfg["planner"]["name"]
    if target is None:
        return
    if name not in BASELINES:
        raise PlanSettingError(
            f"plan: for_planner={target!r} is for the baselines (planner=random or oracle); planner={name} "
            "always runs under its own protocol: drop for_planner"
        )
    valid = model_planners()
    if target not in valid:
        raise PlanSettingError(
            f"plan: for_planner={target!r} is not a model planner: choose one of {', '.join(valid)}, or null"
        )


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def memory_budget_bytes(value) -> int | None:
    """``memory_budget`` in bytes: an integer, a size such as ``8GiB`` / ``512MB``, or auto/null (None:
    the device's default budget, ``wmlab.planning.memory.default_budget``)."""
    import re

    if value is None or value == "auto":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(value), flags=re.IGNORECASE)
    if isinstance(value, str) and match and float(match[1]) > 0:
        return int(float(match[1]) * _UNITS[(match[2] or "").lower()])
    raise PlanSettingError(
        f"plan: memory_budget={value!r} is not valid: give bytes (an integer > 0), a size such as 8GiB, "
        "or auto"
    )


def dset_split(cfg: dict, run_cfg: dict | None) -> dict:
    """The train/validation split ``goal_source=dset`` draws its pairs from (validation episodes only):
    the run's own ``split_ratio`` / ``split_seed``; without a run (baselines) or in an imported run that
    records none, the plan's settings, else ``split_episodes``' defaults (DINO-WM's 0.9 / 42). A plan
    setting that contradicts the run's split is refused (its "validation" pairs would be training ones).
    """
    import inspect

    from wmlab.data.windows import split_episodes

    defaults = inspect.signature(split_episodes).parameters
    out, sources = {}, {}
    for name, arg in (("split_ratio", "train_fraction"), ("split_seed", "seed")):
        own, asked = (run_cfg or {}).get(name), cfg.get(name)
        if own is not None and asked is not None and own != asked:
            raise PlanSettingError(
                f"plan: {name}={asked!r} but the run was trained with {name}={own!r}: goal_source=dset draws "
                f"from the run's validation episodes; drop {name} (or set it to {own!r})"
            )
        if own is not None:
            out[name], source = own, "run"
        elif asked is not None:
            out[name], source = asked, "plan setting"
        else:
            out[name], source = defaults[arg].default, "default (DINO-WM's)"
        sources[name] = source
    out["split_ratio"], out["split_seed"] = float(out["split_ratio"]), int(out["split_seed"])
    return {**out, "source": sources, "episodes": "validation"}


def run_dir_of(cfg: dict) -> Path | None:
    """The run a plan reads: ``run_dir=`` itself, else ``<ckpt_base_path>/<model_name>``, else None."""
    if cfg.get("run_dir"):
        return Path(cfg["run_dir"])
    if cfg.get("model_name"):
        return Path(cfg["ckpt_base_path"]) / cfg["model_name"]
    return None


def identity_of_run(run_dir: Path) -> dict:
    """The run's identity for keys (``wmlab.runs.run_identity``): its config fingerprint and the
    sha256 of its exported weights (plus normalisation and dataset fingerprints)."""
    from wmlab.runs import run_identity

    return dict(run_identity(run_dir))


def data_identity(data) -> dict:
    """A dataset's path and content fingerprint (the dataset's own ``fingerprint()``)."""
    from wmlab.data import open_dataset

    return {"path": str(Path(data).resolve()), "fingerprint": open_dataset(data).fingerprint()}


def plan_key(
    cfg: dict, *, run: dict | None, env_cfg: dict, protocol: Protocol, data: dict | None,
    split: dict | None = None,
) -> dict:  # fmt: skip
    """Everything a plan cell's results depend on: reuse only on an exact match.

    run: ``identity_of_run`` (None for baselines without a run); env_cfg: the env actually used
    (name + settings); protocol: the resolved budget (with ``for_planner``, the protocol a baseline ran
    under); data: ``data_identity`` where results read the dataset (``goal_source=dset`` pairs, an
    imported DINO-WM run's normalisation), else None; split: ``dset_split`` (dset pairs), else None.
    precision: the requested one (model planners; None for baselines, which run no model): an fp32
    request never reuses a bf16 or auto result. What ``auto`` chose, with its evidence, and the chunk
    actually used are in ``summary.json`` (``policy``): they depend on the device at run time.
    Left out on purpose: device, chunk, memory_budget, n_videos, progress, out (chunked costs equal
    unchunked ones to fp rounding; the others do not touch the numbers).
    """
    encoder_weights = cfg.get("encoder_weights")
    weights_path = Path(str(encoder_weights)) if encoder_weights else None
    model_planner = cfg["planner"]["name"] not in BASELINES
    return {
        "kind": "plan_cell",
        "format": PLAN_FORMAT,
        "run": run,
        "planner": cfg["planner"],
        "protocol": {
            "goal_source": cfg["goal_source"],
            "goal_H": int(cfg["goal_H"]),
            "n_evals": int(cfg["n_evals"]),
            "seed": int(cfg["seed"]),
            "max_steps": cfg.get("max_steps"),
            "max_iter": cfg.get("max_iter", "auto"),
            "for_planner": cfg.get("for_planner"),
            "env_step_budget": env_step_budget(protocol),
            "split": split,
            **protocol.to_dict(),
        },
        "objective": cfg["objective"],
        "env": env_cfg,
        "data": data,
        "encoder_weights": {
            "value": str(encoder_weights) if encoder_weights else None,
            "sha256": sha256_file(weights_path) if weights_path and weights_path.is_file() else None,
        },
        "precision": {"requested": cfg.get("precision", "fp32")} if model_planner else None,
    }


def _protocol_label(cfg: dict, *, for_planner: bool = True) -> str:
    """``<planner>[_for_<planner>]__<goal_source>_gH<H>_n<N>_seed<S>``: readable, never a key on its own."""
    planner, source = cfg["planner"]["name"], cfg["goal_source"]
    if for_planner and cfg.get("for_planner"):
        planner = f"{planner}_for_{cfg['for_planner']}"
    return f"{planner}__{source}_gH{cfg['goal_H']}_n{cfg['n_evals']}_seed{cfg['seed']}"


def _legacy_default_out(cfg: dict) -> Path:
    """The ``out`` plan.yaml used to default to: treated as "no out given" (the keyed default)."""
    return DEFAULT_PLANS_DIR / _protocol_label(cfg, for_planner=False)


def cell_dir_for(cfg: dict, key: dict, run_dir: Path | None) -> tuple[Path, bool]:
    """(out_dir, explicit): the user's ``out=``, or ``outputs/plans/<label>__<key hash>`` by default."""
    out = cfg.get("out")
    if out and Path(out) != _legacy_default_out(cfg):
        return Path(out), True
    model = run_dir.name if run_dir is not None else "no_model"
    label = f"{model}__{_protocol_label(cfg)}"
    return keyed_dir(cfg.get("plans_dir") or DEFAULT_PLANS_DIR, label, key), False


def cell_status(out_dir: Path, key: dict) -> str:
    """``finished`` (same key, summary.json there), ``todo`` (empty, or half-done under this key);
    refuses a directory of another key (KeyMismatch with the differences) or of unknown provenance."""
    check_key(out_dir, key, "plan results")
    has_key = (out_dir / "key.json").is_file()
    if (out_dir / "summary.json").is_file():
        if has_key:
            return "finished"
        raise KeyMismatch(
            f"plan results at {out_dir} have no key.json (made by an older wmlab): what they were computed "
            f"from cannot be told. Delete {out_dir}, pass overwrite=true, or use another out=."
        )
    leftovers = [n for n in ("results.jsonl", "videos") if (out_dir / n).exists()]
    if not has_key and leftovers:
        raise KeyMismatch(
            f"{out_dir} holds plan output ({', '.join(leftovers)}) without key.json: what it was computed "
            f"from cannot be told. Delete it, pass overwrite=true, or use another out=."
        )
    return "todo"


@dataclass
class PlanSetup:
    """What ``plan`` resolved before loading any model: the key decides whether to compute at all."""

    run_dir: Path | None
    env_cfg: dict
    frameskip: int
    protocol: Protocol
    key: dict
    out_dir: Path
    explicit: bool
    split: dict | None = None  # goal_source=dset: the train/validation split pairs are drawn from


def prepare_plan(cfg: dict) -> PlanSetup:
    """Validate settings, resolve (import) the run, and compute the cell's key and directory."""
    from wmlab.planning.planning_model import read_run_config

    validate_plan_cfg(cfg)
    needs_model = cfg["planner"]["name"] not in BASELINES
    run_dir = run_dir_of(cfg)
    env_cfg, frameskip, run, data = dict(cfg["env"]), int(cfg["frameskip"]), None, None
    run_cfg, split = None, None
    if run_dir is not None:
        run_dir = resolve_run(run_dir, epoch=cfg.get("model_epoch", "latest"))
        run_cfg = read_run_config(run_dir)
        env_cfg = run_env(run_dir, run_cfg, env_cfg)
        frameskip = int(run_cfg["frameskip"])
        run = identity_of_run(run_dir)
        imported_stats = run_cfg.get("normalization") == "dino_wm_all_data"
        if needs_model and imported_stats and cfg.get("data"):
            data = data_identity(cfg["data"])
    elif needs_model:
        raise PlanSettingError(
            f"planner {cfg['planner']['name']!r} needs a world model: pass model_name=<run> or run_dir=<run>"
        )
    if cfg["goal_source"] == "dset":
        data = data_identity(cfg["data"])
        split = dset_split(cfg, run_cfg)
        validation_episodes(cfg["data"], split["split_ratio"], split["split_seed"])  # none: refused here
    protocol = protocol_from(cfg, frameskip)
    key = plan_key(cfg, run=run, env_cfg=env_cfg, protocol=protocol, data=data, split=split)
    out_dir, explicit = cell_dir_for(cfg, key, run_dir)
    return PlanSetup(run_dir, env_cfg, frameskip, protocol, key, out_dir, explicit, split)


def plan(cfg: dict) -> Path:
    """The ``wmlab plan`` verb: evaluate a run's planner (or a baseline) closed-loop; returns out_dir.

    The cell is keyed (``plan_key``) and computed under a ``WriterLock`` on its directory; see the
    module docstring for where it lives and when it is reused or refused.
    """
    setup = prepare_plan(cfg)
    out_dir = setup.out_dir
    with WriterLock(out_dir, "plan cell"):
        status = "todo" if cfg.get("overwrite", False) else cell_status(out_dir, setup.key)
        if status == "finished":
            print(f"already evaluated: {out_dir / 'summary.json'} (same key; overwrite=true to re-run)")
            return out_dir
        # Load the model and build the episodes before writing anything: a missing dataset or wrong
        # weights leave no half-made cell behind.
        env, job = _cell_job(cfg, setup)
        try:
            # The finish marker goes first, old videos next, the key last: a kill from here on leaves a
            # half-done cell that only a run with this same key resumes (recomputes).
            (out_dir / "summary.json").unlink(missing_ok=True)
            shutil.rmtree(out_dir / "videos", ignore_errors=True)
            shutil.rmtree(out_dir / "imagined", ignore_errors=True)
            write_key(out_dir, setup.key)
            # What the model imagined for each recorded episode's first plan (wmlab.imagined), if a
            # decoder exists: the list (or why there is none) goes into summary.json.
            from wmlab.imagined import record_imagined

            names = ("policy", "env", "starts", "goals", "out_dir")
            evaluate_policy(**job, before_summary=lambda: record_imagined(
                setup.run_dir, *(job[k] for k in names), n=job["n_videos"]
            ))  # fmt: skip
        finally:
            env.close()
    return out_dir


def harness_env(env_cfg: dict):
    """The env of ``env_cfg`` (name + settings) for ``EpisodeBatch``: the same frames, but with
    ``visual_obs`` off where the env has it. The batch renders the frame a policy sees itself, once per
    plan; an env rendering on every step too spent ~90% of a random baseline's time on unused frames."""
    import inspect

    from wmlab.envs import env_entry, make_env

    env_cfg = dict(env_cfg)
    name = env_cfg.pop("name")
    module_name, class_name = env_entry(name).entry_point.split(":")
    env_class = getattr(importlib.import_module(module_name), class_name)
    if "visual_obs" in inspect.signature(env_class).parameters:
        env_cfg["visual_obs"] = False
    return make_env(name, **env_cfg)


def _cell_job(cfg: dict, setup: PlanSetup) -> tuple[object, dict]:
    """(env, keyword arguments of ``evaluate_policy``): the model, env, start/goal pairs and policy."""
    import torch

    from wmlab.planning.objectives import Objective
    from wmlab.planning.planning_model import PlanningModel
    from wmlab.runs import resolve_device

    model = None
    if cfg["planner"]["name"] not in BASELINES:
        device = resolve_device(cfg.get("device", "auto"))
        model = PlanningModel.from_run(
            setup.run_dir, device=device, data=cfg.get("data"), encoder_weights=cfg.get("encoder_weights")
        )
    env = harness_env(setup.env_cfg)
    try:
        n, seed = int(cfg["n_evals"]), int(cfg["seed"])
        split = setup.split
        if cfg["goal_source"] == "random_state":
            starts, goals, seeds = random_state_pairs(env, n, seed)
        else:
            steps = int(cfg["goal_H"]) * setup.frameskip
            val = validation_episodes(cfg["data"], split["split_ratio"], split["split_seed"])
            split = {**split, "n_validation_episodes": len(val), "validation_episode_ids": val.tolist()}
            starts, goals, seeds = dataset_pairs(env, cfg["data"], n, seed, steps, episodes=val)
        objective = Objective(**cfg["objective"])
        torch.manual_seed(seed)
        policy = make_policy(
            cfg["planner"], env=env, protocol=setup.protocol, horizon=int(cfg["goal_H"]), model=model,
            objective=objective, chunk=cfg.get("chunk"), precision=cfg.get("precision", "fp32"),
            memory_budget=memory_budget_bytes(cfg.get("memory_budget", "auto")),
        )  # fmt: skip
    except BaseException:
        env.close()
        raise
    extra = {
        "planner": cfg["planner"],
        "for_planner": cfg.get("for_planner"),
        "goal_source": cfg["goal_source"],
        "split": split,
        "goal_H": int(cfg["goal_H"]),
        "seed": seed,
        "objective": cfg["objective"],
        "run_dir": str(setup.run_dir) if setup.run_dir else None,
        "key": fingerprint(setup.key),
    }
    job = {
        "policy": policy, "env": env, "starts": starts, "goals": goals, "pair_seeds": seeds,
        "protocol": setup.protocol, "out_dir": setup.out_dir, "n_videos": int(cfg.get("n_videos", 3)),
        "extra": extra, "progress": bool(cfg.get("progress", True)),
    }  # fmt: skip
    return env, job
