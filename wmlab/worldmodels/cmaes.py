"""Train C with CMA-ES (pycma): in the real env (parallel rollout workers) or in M's dream (one batch).

Per generation: ``popsize`` candidates (paper: 64) each run ``rollouts`` episodes (paper: 16) on seeds of
their own (as the reference; ``common_seeds=True`` shares one set of seeds among all candidates instead:
common random numbers), fitness = mean return - ``l2_coef`` * mean(w^2) (reference: 0.01); CMA-ES
starts at ``x0`` (zeros) with sigma0 = 0.1. Every ``eval_every`` generations the current mean is scored on
``eval_rollouts`` fixed seeds (paper: 1024 every 25); the best-scoring mean is the saved controller.

Files in ``out/``:

    cmaes.safetensors      source of truth: x0, every generation's fitness vector, per-generation stats,
                           evaluations, best params (metadata: generation count)
    controller.safetensors the best evaluated mean (``load_controller``), written after it
    controller.json        config, history and evaluations as JSON (for the report), written last
    tb/                    TensorBoard

Resume without pickles: CMA-ES is deterministic given its seed and the fitness values it was told, so a
re-run rebuilds the strategy by replaying ask/tell with the stored fitness vectors (no rollouts), checks the
replayed mean against the stored one, and continues. Real-env rollouts run in ``workers`` spawn processes,
each holding its own V, M and env; dream rollouts run all ``popsize * rollouts`` dreams as one torch batch.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import torch

from wmlab.integrity import NonFiniteError
from wmlab.runs import locked_run
from wmlab.worldmodels.controller import ControllerConfig

STATE_FILE = "cmaes.safetensors"
CONTROLLER_FILE = "controller.safetensors"
JSON_FILE = "controller.json"
EVAL_SEED_OFFSET = 10_000_019  # evaluation seeds never coincide with training seeds


def rollout_seeds(seed: int, generation: int, n: int, popsize: int | None = None) -> np.ndarray:
    """Env/dream seeds of one generation: (n,) shared by all candidates when ``popsize`` is None, else
    (popsize, n), every candidate its own."""
    count = n if popsize is None else int(popsize) * n
    seeds = np.random.SeedSequence([int(seed), int(generation)]).generate_state(count) % (2**31 - 1)
    return seeds if popsize is None else seeds.reshape(int(popsize), n)


def eval_seeds(seed: int, n: int) -> np.ndarray:
    """Fixed evaluation seeds (the same at every evaluation, disjoint from training's)."""
    return rollout_seeds(seed + EVAL_SEED_OFFSET, 0, n)


# ---------------------------------------------------------------------------------------------------
# Evaluators: params (P, n) x seeds (R,) shared or (P, R) per candidate -> returns (P, R)


class DreamEvaluator:
    """All P x R rollouts as one batch of dreams in M at temperature ``tau``."""

    def __init__(
        self, rnn_dir, latents, wm_env: str, tau: float, max_steps: int, device: str = "cpu"
    ) -> None:
        from wmlab.models.mdn_rnn import load_rnn
        from wmlab.worldmodels.dream import Dream
        from wmlab.worldmodels.envs import env_class
        from wmlab.worldmodels.latents import initial_latents, load_latents

        cls = env_class(wm_env)
        rnn = load_rnn(rnn_dir, device)
        if not rnn.cfg.done_head:
            raise ValueError(
                f"M at {rnn_dir} has no done head, so its dream has no episode end or reward "
                f"({wm_env}'s dream is "
                "for looking at only, as in the paper); train C in the real env: dream=false"
            )
        mu, logvar = initial_latents(load_latents(latents))
        self.dream = Dream(rnn, mu, logvar, tau=tau, max_steps=max_steps, to_action=cls.controller_to_action)

    def __call__(self, cfg: ControllerConfig, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        return self.dream.rollout(cfg, params, seeds)["returns"]

    def close(self) -> None:
        pass


_WORKER: dict = {}


def _real_worker_init(
    vae_dir: str,
    rnn_dir: str,
    wm_env: str,
    env_kwargs: dict,
    max_steps: int,
    sample_z: bool,
    threads: int = 1,
) -> None:
    from wmlab.models.mdn_rnn import load_rnn
    from wmlab.models.vae import load_vae
    from wmlab.worldmodels.envs import make_wm_env

    torch.set_num_threads(threads)
    _WORKER.update(
        vae=load_vae(vae_dir),
        rnn=load_rnn(rnn_dir),
        env=make_wm_env(wm_env, **env_kwargs),
        max_steps=max_steps,
        sample_z=sample_z,
    )


def _real_worker_run(cfg_dict: dict, params: np.ndarray, seed: int) -> tuple[float, int]:
    from wmlab.worldmodels.controller import Agent, run_real_episode

    env = _WORKER["env"]
    cfg = ControllerConfig(**cfg_dict)
    agent = Agent(
        _WORKER["vae"],
        _WORKER["rnn"],
        cfg,
        params,
        env.controller_to_action,
        sample_z=_WORKER["sample_z"],
        seed=seed,
    )
    result = run_real_episode(env, agent, seed, _WORKER["max_steps"])
    return result["return"], result["steps"]


class RealEvaluator:
    """P x R real-env episodes spread over ``workers`` spawn processes (in-process when workers <= 1)."""

    def __init__(
        self,
        vae_dir,
        rnn_dir,
        wm_env: str,
        env_kwargs: dict,
        max_steps: int,
        sample_z: bool = True,
        workers: int = 2,
    ) -> None:
        env_kwargs = {**env_kwargs, "max_steps": max_steps}
        self.args = (str(vae_dir), str(rnn_dir), wm_env, env_kwargs, int(max_steps), bool(sample_z))
        self.pool = None
        self.steps = 0
        if workers > 1:
            context = multiprocessing.get_context("spawn")  # fresh Box2D/Doom/GL state per worker
            self.pool = cf.ProcessPoolExecutor(
                workers, mp_context=context, initializer=_real_worker_init, initargs=self.args
            )
        else:
            _real_worker_init(*self.args, threads=torch.get_num_threads())

    def __call__(self, cfg: ControllerConfig, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        params = np.atleast_2d(np.asarray(params, np.float32))
        P = len(params)
        seeds = np.asarray(seeds, np.int64)
        seeds = np.broadcast_to(seeds, (P, seeds.shape[-1])) if seeds.ndim == 1 else seeds  # (P, R)
        if seeds.shape[0] != P:
            raise ValueError(f"seeds {seeds.shape} must be (R,) or (P={P}, R)")
        R = seeds.shape[1]
        jobs = [(p, r) for p in range(P) for r in range(R)]
        returns = np.zeros((P, R))
        if self.pool is None:
            results = [_real_worker_run(cfg.to_dict(), params[p], int(seeds[p, r])) for p, r in jobs]
        else:
            futures = [
                self.pool.submit(_real_worker_run, cfg.to_dict(), params[p], int(seeds[p, r]))
                for p, r in jobs
            ]
            results = [f.result() for f in futures]
        for (p, r), (ret, steps) in zip(jobs, results):
            returns[p, r] = ret
            self.steps += steps
        return returns

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None
        elif "env" in _WORKER:
            _WORKER.pop("env").close()


# ---------------------------------------------------------------------------------------------------
# CMA-ES driver


def _ask(es, seed: int, generation: int) -> np.ndarray:
    """es.ask() with numpy's global RNG (which pycma samples from) seeded by (seed, generation).

    This makes every generation's samples a function of the strategy state alone, which is what lets a
    resume replay the run exactly. The caller's global RNG state is restored afterwards.
    """
    # pycma draws from numpy's global RNG, so that is the one to seed
    saved = np.random.get_state()  # noqa: NPY002
    state = int(np.random.SeedSequence([int(seed), int(generation), 7]).generate_state(1)[0])
    np.random.seed(state)  # noqa: NPY002
    try:
        return np.asarray(es.ask())
    finally:
        np.random.set_state(saved)  # noqa: NPY002


def _new_es(x0: np.ndarray, sigma0: float, popsize: int, seed: int):
    try:
        import cma
    except ImportError as err:
        raise ImportError("CMA-ES needs pycma: pip install cma") from err
    opts = {
        "popsize": int(popsize),
        "seed": int(seed) + 1,
        "verbose": -9,
        "tolfun": 0,
        "tolx": 0,
        "tolfunhist": 0,
        "tolflatfitness": 10**9,
        "tolstagnation": 10**9,
    }
    return cma.CMAEvolutionStrategy(np.asarray(x0, np.float64), float(sigma0), opts)


@locked_run("out", "CMA-ES controller run")  # a second writer of out/ is refused
def train_controller(
    out,
    *,
    vae,
    rnn,
    wm_env: str,
    env_kwargs: dict | None = None,
    dream: bool = True,
    temperature: float = 1.15,
    latents=None,
    inputs: str = "zch",
    bias: bool = False,
    mlp_hidden: int = 0,
    popsize: int = 64,
    rollouts: int = 16,
    sigma0: float = 0.1,
    generations: int = 200,
    l2_coef: float = 0.01,
    eval_every: int = 25,
    eval_rollouts: int = 1024,
    max_steps: int | None = None,
    sample_z: bool = True,
    common_seeds: bool = False,
    x0=None,
    workers: int = 2,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Train the linear controller with CMA-ES, in the dream (``dream=True``; needs ``latents``) or real env.

    Args:
        out: output directory (see the module doc); a re-run with the same settings resumes.
        vae, rnn: directories of the trained V and M. latents: latent file(s) whose first frames start dreams.
        wm_env, env_kwargs: the env (``car_racing``, ``take_cover``, ``dodge``) and its options.
        temperature: tau of the dream. max_steps: episode cap (default: the env's).
        inputs, bias, mlp_hidden: controller shape (``ControllerConfig``).
        popsize, rollouts, sigma0, generations, l2_coef: CMA-ES (paper: 64, 16, 0.1, -, 0.01).
        common_seeds: all candidates of a generation on the same ``rollouts`` seeds (common random
            numbers) instead of seeds of their own (the reference).
        eval_every, eval_rollouts: score the mean every k generations over n fixed seeds (training's env).
        x0: start point: None (zeros) or a controller file/dir (the iterative procedure continues from it).
        workers: real-env rollout processes. seed: everything random derives from it.
    Returns: ``out``.
    """
    from tqdm.auto import tqdm

    from wmlab.models.mdn_rnn import load_rnn
    from wmlab.models.vae import load_vae
    from wmlab.runs import atomic_save_tensors, load_tensors, write_json
    from wmlab.training.common import tensorboard
    from wmlab.worldmodels.controller import load_controller, save_controller
    from wmlab.worldmodels.envs import env_class

    cls = env_class(wm_env)
    env_kwargs = dict(env_kwargs or {})
    max_steps = int(max_steps or env_kwargs.get("max_steps") or cls.max_steps)
    if min(popsize, rollouts, generations, eval_every, eval_rollouts) < 1:
        raise ValueError("popsize, rollouts, generations, eval_every and eval_rollouts must be >= 1")
    if popsize < 2:
        raise ValueError(f"CMA-ES needs popsize >= 2, got {popsize}")
    m, v = load_rnn(rnn), load_vae(vae)
    cfg = ControllerConfig(
        z_dim=v.z_dim,
        hidden=m.cfg.hidden,
        out_dim=cls.action_dim,
        inputs=inputs,
        bias=bias,
        mlp_hidden=mlp_hidden,
    )
    if m.cfg.z_dim != v.z_dim:
        raise ValueError(f"M at {rnn} models {m.cfg.z_dim}-d latents but V at {vae} makes {v.z_dim}-d ones")
    del m, v
    settings = {
        "wm_env": wm_env,
        "env_kwargs": env_kwargs,
        "dream": bool(dream),
        "temperature": float(temperature) if dream else None,
        "controller": cfg.to_dict(),
        "popsize": popsize,
        "rollouts": rollouts,
        "sigma0": sigma0,
        "l2_coef": l2_coef,
        "max_steps": max_steps,
        "sample_z": sample_z,
        "common_seeds": bool(common_seeds),
        "seed": seed,
        "eval_every": eval_every,
        "eval_rollouts": eval_rollouts,
        "vae": str(vae),
        "rnn": str(rnn),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    # ---- state: fresh, or replayed from cmaes.safetensors
    state_path = out / STATE_FILE
    if state_path.is_file():
        from safetensors import safe_open

        with safe_open(str(state_path), "pt") as f:
            saved_settings = json.loads((f.metadata() or {})["settings"])
        if saved_settings != json.loads(json.dumps(settings)):
            changed = sorted(
                k for k in settings if saved_settings.get(k) != json.loads(json.dumps(settings[k]))
            )
            raise ValueError(
                f"{out} holds a CMA-ES run with other settings ({changed}); use another out= or "
                "delete it to start over"
            )
        saved = {k: t.numpy() for k, t in load_tensors(state_path).items()}
        start = saved["x0"]
    else:
        saved = None
        start = np.zeros(cfg.n_params) if x0 is None else load_controller(x0)[1].astype(np.float64)
        if len(start) != cfg.n_params:
            raise ValueError(f"x0 {x0} has {len(start)} parameters, this controller {cfg.n_params}")
    es = _new_es(start, sigma0, popsize, seed)
    fitness_hist = np.zeros((0, popsize))
    stats = np.zeros((0, 5))  # per generation: mean return, best, worst, sigma, seconds
    evals = np.zeros((0, 4))  # per evaluation: generation, mean, std, n
    best_params, best_score = start.copy(), -np.inf
    if saved is not None:
        fitness_hist, stats, evals = saved["fitness"], saved["stats"], saved["evals"]
        for g, fit in enumerate(fitness_hist):
            es.tell(_ask(es, seed, g), list(fit))
        if not np.allclose(es.mean, saved["mean"], rtol=1e-9, atol=1e-12):
            raise ValueError(
                f"replaying {state_path} did not reproduce its CMA-ES mean (was pycma upgraded since?); "
                "delete the directory to start over"
            )
        best_params, best_score = saved["best_params"], float(saved["best_score"][0])

    if dream:
        if latents is None:
            raise ValueError("dream training needs latents= (files from encode_latents) to start dreams from")
        evaluator = DreamEvaluator(rnn, latents, wm_env, temperature, max_steps, device)
    else:
        evaluator = RealEvaluator(vae, rnn, wm_env, env_kwargs, max_steps, sample_z, workers)
    writer = tensorboard(out)

    def save(generation: int) -> None:
        save_state(generation)
        export(generation)

    def save_state(generation: int) -> None:
        atomic_save_tensors(
            {
                "x0": torch.as_tensor(start),
                "fitness": torch.as_tensor(fitness_hist),
                "stats": torch.as_tensor(stats),
                "evals": torch.as_tensor(evals),
                "mean": torch.as_tensor(np.asarray(es.mean)),
                "best_params": torch.as_tensor(best_params),
                "best_score": torch.tensor([best_score]),
            },
            state_path,
            metadata={"generation": generation, "settings": json.dumps(settings)},
        )

    def export(generation: int) -> None:
        save_controller(
            out / CONTROLLER_FILE,
            cfg,
            best_params,
            meta={
                "generation": generation,
                "score": best_score,
                "trained_in": "dream" if dream else "real",
                "temperature": temperature if dream else None,
            },
        )
        write_json(
            out / JSON_FILE,
            {
                "settings": settings,
                "generation": generation,
                "n_params": cfg.n_params,
                "best_eval": best_score if np.isfinite(best_score) else None,
                "history": [
                    {
                        "generation": i + 1,
                        "return_mean": s[0],
                        "return_best": s[1],
                        "return_worst": s[2],
                        "sigma": s[3],
                        "seconds": s[4],
                    }
                    for i, s in enumerate(stats.tolist())
                ],
                "evals": [
                    {"generation": int(e[0]), "mean": e[1], "std": e[2], "n": int(e[3])}
                    for e in evals.tolist()
                ],
            },
        )

    def evaluate(generation: int) -> None:
        nonlocal evals, best_params, best_score
        mean = np.asarray(es.mean, np.float32)
        scores = evaluator(cfg, mean[None], eval_seeds(seed, eval_rollouts))[0]
        evals = np.concatenate([evals, [[generation, scores.mean(), scores.std(), len(scores)]]])
        if scores.mean() > best_score:
            best_params, best_score = mean.astype(np.float64), float(scores.mean())
        if writer is not None:
            writer.add_scalar("cmaes/eval_mean", scores.mean(), generation)

    done = len(fitness_hist)
    bar = tqdm(
        total=generations,
        initial=min(done, generations),
        desc=f"cma-es {'dream' if dream else 'real'}",
        unit="gen",
        disable=not progress,
    )
    try:
        for g in range(done, generations):
            started = time.perf_counter()
            X = _ask(es, seed, g)  # (P, n)
            seeds = rollout_seeds(seed, g, rollouts, None if common_seeds else popsize)  # (R,) or (P, R)
            returns = evaluator(cfg, X.astype(np.float32), seeds)  # (P, R)
            fitness = returns.mean(1) - l2_coef * (X**2).mean(1)
            if not np.isfinite(fitness).all():
                raise NonFiniteError(f"generation {g + 1}: non-finite fitness {fitness}")
            es.tell(X, list(-fitness))  # pycma minimises
            fitness_hist = np.concatenate([fitness_hist, -fitness[None]])
            seconds = time.perf_counter() - started
            row = [returns.mean(), returns.mean(1).max(), returns.mean(1).min(), es.sigma, seconds]
            stats = np.concatenate([stats, [row]])
            if (g + 1) % eval_every == 0 or g + 1 == generations:
                evaluate(g + 1)
            save(g + 1)
            if writer is not None:
                for name, value in zip(("return_mean", "return_best", "return_worst", "sigma"), row):
                    writer.add_scalar(f"cmaes/{name}", value, g + 1)
            bar.update(1)
            bar.set_postfix(mean=f"{row[0]:.1f}", best=f"{row[1]:.1f}")
        if done >= generations:
            # cmaes.safetensors is the one atomic unit; the controller and JSON are exports written
            # after it, so a kill between them leaves them behind: re-export them from the state.
            # The state itself is rewritten only when it changed (a finished run stays byte-identical).
            if not len(evals):
                evaluate(done)
                save_state(done)
            export(done)
    finally:
        bar.close()
        evaluator.close()
        if writer is not None:
            writer.close()
    return out
