"""Score a controller: N seeded real-env trials (mean +- std) and dreams at one or more temperatures.

``evaluate_controller`` appends one JSON line per call to ``results`` (default ``<root>/eval.jsonl``), the
file the report's real-vs-dream table is built from.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from wmlab.worldmodels.cmaes import DreamEvaluator, RealEvaluator, eval_seeds


def append_jsonl(path, record: dict) -> None:
    """Append one JSON line (flushed and fsynced: a crash never leaves half a line before the next one)."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path) -> list[dict]:
    """All complete lines of a JSON-lines file ([] if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {n} is corrupt ({err}); delete that line") from err
    return rows


def summary(returns) -> dict:
    returns = np.asarray(returns, np.float64).reshape(-1)
    return {"mean": float(returns.mean()), "std": float(returns.std()), "n": int(returns.size)}


def evaluate_baselines(
    names, *, wm_env: str, env_kwargs: dict | None = None, n_trials: int = 100, seed: int = 0, max_steps=None
) -> dict:
    """Real-env returns of baseline policies (``collect.BASELINES``) on the controller's evaluation seeds.

    Returns {name: {"label", "mean", "std" (over the episodes), "n", "returns"}}.
    """
    from wmlab.worldmodels.collect import BASELINES, baseline_policy
    from wmlab.worldmodels.controller import run_real_episode
    from wmlab.worldmodels.envs import make_wm_env

    env_kwargs = dict(env_kwargs or {})
    if max_steps:
        env_kwargs["max_steps"] = int(max_steps)
    env = make_wm_env(wm_env, **env_kwargs)
    out = {}
    try:
        for name in names:
            returns = []
            for s in eval_seeds(seed, n_trials):
                agent = baseline_policy(name, env.action_dim, int(s) + 1)
                returns.append(run_real_episode(env, agent, int(s), max_steps)["return"])
            out[name] = {"label": BASELINES[name][1], **summary(returns), "returns": returns}
    finally:
        env.close()
    return out


def evaluate_controller(
    controller,
    *,
    vae,
    rnn,
    wm_env: str,
    env_kwargs: dict | None = None,
    n_trials: int = 100,
    temperatures=(),
    dream_trials: int = 1024,
    latents=None,
    max_steps: int | None = None,
    sample_z: bool = True,
    workers: int = 2,
    seed: int = 0,
    results=None,
    extra: dict | None = None,
    baselines=(),
) -> dict:
    """Score ``controller`` (file or directory) in the real env (``n_trials`` > 0) and in dreams at each of
    ``temperatures`` (needs ``latents`` and an M with a done head). ``baselines`` (names from
    ``collect.BASELINES``) run on the same seeds, and each is compared with the controller by Welch's t and
    Mann-Whitney U (``record["tests"][name]``). Every std is over evaluation episodes. Returns the record
    appended to ``results``.
    """
    from safetensors import safe_open

    from wmlab.worldmodels.controller import load_controller
    from wmlab.worldmodels.envs import env_class

    cfg, params = load_controller(controller)
    path = Path(controller)
    file = path / "controller.safetensors" if path.is_dir() else path
    with safe_open(str(file), "pt") as f:
        meta = f.metadata() or {}
    cls = env_class(wm_env)
    env_kwargs = dict(env_kwargs or {})
    max_steps = int(max_steps or env_kwargs.get("max_steps") or cls.max_steps)
    record = {
        "controller": str(controller),
        "wm_env": wm_env,
        "trained_in": meta.get("trained_in"),
        "train_temperature": None
        if meta.get("temperature") in (None, "None")
        else float(meta["temperature"]),
        "generation": int(meta.get("generation", 0)),
        "max_steps": max_steps,
        "seed": seed,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
    if n_trials > 0:
        started = time.perf_counter()
        real = RealEvaluator(vae, rnn, wm_env, env_kwargs, max_steps, sample_z, workers)
        try:
            returns = real(cfg, params[None], eval_seeds(seed, n_trials))[0]
        finally:
            real.close()
        record["real"] = {
            **summary(returns),
            "returns": returns.tolist(),
            "seconds": round(time.perf_counter() - started, 3),
        }
    if len(baselines) and n_trials > 0:
        from wmlab.worldmodels.stats import compare

        record["baselines"] = evaluate_baselines(
            baselines, wm_env=wm_env, env_kwargs=env_kwargs, n_trials=n_trials, seed=seed, max_steps=max_steps
        )
        record["tests"] = {
            name: compare(record["real"]["returns"], b["returns"]) for name, b in record["baselines"].items()
        }
    if len(temperatures):
        record["dream"] = {}
        for tau in temperatures:
            dream = DreamEvaluator(rnn, latents, wm_env, float(tau), max_steps)
            record["dream"][str(float(tau))] = summary(
                dream(cfg, params[None], eval_seeds(seed, dream_trials))[0]
            )
    if results is not None:
        append_jsonl(results, record)
    return record
