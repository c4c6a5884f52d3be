"""The paper's Iterative Training Procedure: collect with C, retrain M on all data, retrain C, evaluate.

Iteration 0 is the ordinary pipeline (random data -> V -> M -> C), each stage resumed or skipped when done.
Iteration k >= 1 (under ``<root>/iterate/iter_<k>/``):

1. collect ``iterate.n_episodes`` real episodes with the current V + M + C plus exploration noise on C's
   outputs (``iterate.noise``) -> ``data.zarr``;
2. encode them with V (V stays fixed, as in the paper's procedure) -> ``latents.safetensors``;
3. train a new M on the latents of *all* data so far -> ``rnn/``;
4. train C in that M's dream (or the real env for CarRacing), CMA-ES starting at the previous C
   -> ``controller/``;
5. score it in the real env (``evaluate.n_trials``) and the dream (at ``temperature``); append one JSON line
   ``{"iteration", "real_mean", "real_std", "dream_mean", "dream_std", ...}``
   to ``iterate/results.jsonl``.

Every step resumes, and an iteration already in results.jsonl is not scored again.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from wmlab.worldmodels import stages
from wmlab.worldmodels.evaluate import append_jsonl, read_jsonl


def iterate(cfg: dict) -> Path:
    """Run iterations 0..``cfg["iterate"]["iterations"]``; returns the results file."""
    layout = stages.Layout(cfg["root"])
    it = cfg["iterate"]
    results = layout.iterate / "results.jsonl"
    scored = {row["iteration"] for row in read_jsonl(results)}
    dream = bool(cfg["dream"])
    score_cfg = copy.deepcopy(cfg)
    score_cfg["evaluate"]["temperatures"] = [cfg["temperature"]]

    def score(k: int, controller: Path, rnn: Path, latents: list[Path], n_episodes: int) -> None:
        if k in scored:
            return
        record = stages.evaluate(
            score_cfg,
            controller=controller,
            rnn=rnn,
            latents=latents,
            results=layout.iterate / "eval.jsonl",
            extra={"iteration": k},
            baselines=None if k == 0 else [],  # baselines do not change between iterations
        )
        dreamed = (record.get("dream") or {}).get(str(float(cfg["temperature"])), {})
        append_jsonl(
            results,
            {
                "iteration": k,
                "real_mean": record["real"]["mean"],
                "real_std": record["real"]["std"],
                "real_n": record["real"]["n"],
                "dream_mean": dreamed.get("mean"),
                "dream_std": dreamed.get("std"),
                "temperature": cfg["temperature"] if dream else None,
                "episodes_total": n_episodes,
                "controller": str(controller),
                "rnn": str(rnn),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )

    # iteration 0: the plain pipeline on random-policy data
    store = stages.collect(cfg)
    stages.train_vae(cfg)
    latents = [stages.encode(cfg)]
    rnn = stages.train_rnn(cfg, latents=latents)
    controller = stages.train_controller(cfg, latents=latents if dream else None)
    n_episodes = len(store)
    score(0, controller, rnn, latents, n_episodes)

    for k in range(1, int(it["iterations"]) + 1):
        folder = layout.iterate / f"iter_{k}"
        store = stages.collect(
            cfg,
            out=folder / "data.zarr",
            policy="controller",
            n_episodes=it["n_episodes"],
            seed=int(cfg["seed"]) + k,
            policy_kwargs={
                "vae": str(layout.vae),
                "rnn": str(rnn),
                "controller": str(controller),
                "noise": float(it["noise"]),
                "sample_z": bool(cfg["controller"]["sample_z"]),
            },
        )
        n_episodes += len(store)
        latents = [
            *latents,
            stages.encode(cfg, data=folder / "data.zarr", out=folder / "latents.safetensors"),
        ]
        rnn = stages.train_rnn(
            cfg, latents=latents, out=folder / "rnn", steps=it["rnn_steps"], epochs=it["rnn_epochs"]
        )
        controller = stages.train_controller(
            cfg,
            rnn=rnn,
            latents=latents if dream else None,
            out=folder / "controller",
            x0=controller,
            generations=it["generations"],
        )
        score(k, controller, rnn, latents, n_episodes)
    return results
