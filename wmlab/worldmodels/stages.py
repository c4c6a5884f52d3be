"""The pipeline's stages as functions of the composed ``worldmodels`` config (a plain dict).

Layout under ``cfg["root"]``::

    data.zarr                    collected rollouts (TrajectoryStore; states = [reward, done])
    vae/                         V (vae.safetensors + vae.json)
    latents/data.safetensors     mu/logvar of every frame of data.zarr under that V
    rnn/                         M (rnn.safetensors + rnn.json)
    controller_dream_t1.15/      C trained in the dream at tau = 1.15 (or controller_real/)
    eval.jsonl                   one line per `evaluate` call
    iterate/iter_<k>/...         the iterative procedure (see iterate.py); iterate/results.jsonl
    report/                      report.md + figures

Each stage resumes from its own checkpoint, so re-running a stage (or the pipeline) after a kill continues.
"""

from __future__ import annotations

from pathlib import Path


class Layout:
    """Paths of one World Models root folder."""

    def __init__(self, root) -> None:
        self.root = Path(root)

    @property
    def data(self) -> Path:
        return self.root / "data.zarr"

    @property
    def vae(self) -> Path:
        return self.root / "vae"

    @property
    def latents(self) -> Path:
        return self.root / "latents" / "data.safetensors"

    @property
    def rnn(self) -> Path:
        return self.root / "rnn"

    def controller(self, dream: bool, temperature: float) -> Path:
        return self.root / (f"controller_dream_t{float(temperature):g}" if dream else "controller_real")

    @property
    def eval_results(self) -> Path:
        return self.root / "eval.jsonl"

    @property
    def iterate(self) -> Path:
        return self.root / "iterate"

    @property
    def report(self) -> Path:
        return self.root / "report"


def env_kwargs(cfg: dict, max_steps: int | None = None) -> dict:
    kwargs = dict(cfg["wm_env"].get("kwargs") or {})
    kwargs["max_steps"] = int(max_steps or cfg["wm_env"]["max_steps"])
    return kwargs


def _require(path: Path, what: str, stage: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{what} not found at {path}: run `wmlab worldmodels {stage}` first (same root=)"
        )
    return path


def collect(
    cfg: dict,
    out=None,
    policy: str | None = None,
    policy_kwargs: dict | None = None,
    n_episodes: int | None = None,
    seed: int | None = None,
):
    """Collect rollouts into ``out`` (default ``<root>/data.zarr``) with the env's random policy."""
    from wmlab.worldmodels.collect import collect_rollouts

    c = cfg["collect"]
    policy = policy or c["policy"]
    if policy == "random_agent" and policy_kwargs is None:
        policy_kwargs = {
            "vae": {"z_dim": cfg["vae"]["z_dim"], "channels": list(cfg["vae"]["channels"])},
            "rnn_hidden": cfg["rnn"]["hidden"],
            "inputs": cfg["controller"]["inputs"],
            "bias": cfg["controller"]["bias"],
        }
    return collect_rollouts(
        out or Layout(cfg["root"]).data,
        cfg["wm_env"]["name"],
        n_episodes=n_episodes or c["n_episodes"],
        max_steps=c["max_steps"],
        min_len=c["min_len"],
        policy=policy,
        policy_kwargs=policy_kwargs,
        env_kwargs=env_kwargs(cfg, c["max_steps"]),
        workers=cfg["workers"],
        seed=cfg["seed"] if seed is None else seed,
        progress=cfg["progress"],
    )


def train_vae(cfg: dict, data=None) -> Path:
    """Train V on ``data`` (default ``<root>/data.zarr``; any TrajectoryStore, e.g. PointMaze)."""
    from wmlab.training.vae import train_vae as _train

    layout = Layout(cfg["root"])
    v = cfg["vae"]
    data = data or _require(layout.data, "the dataset", "collect")
    return _train(
        data,
        layout.vae,
        z_dim=v["z_dim"],
        channels=v["channels"],
        kl_tolerance=v["kl_tolerance"],
        epochs=v["epochs"] or 1,
        steps=v["steps"],
        batch_size=v["batch_size"],
        lr=v["lr"],
        save_every=v["save_every"],
        seed=cfg["seed"],
        device=cfg["device"],
        progress=cfg["progress"],
    )


def encode(cfg: dict, data=None, out=None) -> Path:
    """mu/logvar of every frame of ``data`` under the trained V (reused when V and data are unchanged)."""
    from wmlab.worldmodels.latents import encode_latents

    layout = Layout(cfg["root"])
    return encode_latents(
        data or _require(layout.data, "the dataset", "collect"),
        _require(layout.vae, "V", "train-vae"),
        out or layout.latents,
        progress=cfg["progress"],
    )


def train_rnn(cfg: dict, latents=None, out=None, steps=None, epochs=None) -> Path:
    """Train M on latent files (default: encode ``<root>/data.zarr`` first)."""
    from wmlab.training.mdn_rnn import train_rnn as _train
    from wmlab.worldmodels.latents import load_latents

    layout = Layout(cfg["root"])
    r = cfg["rnn"]
    files = latents or [encode(cfg)]
    if steps is None and epochs is None:
        steps, epochs = r["steps"], r["epochs"]
    return _train(
        load_latents(files),
        out or layout.rnn,
        hidden=r["hidden"],
        n_mix=r["n_mix"],
        done_head=r["done_head"],
        done_input=r["done_input"],
        done_pos_weight=r["done_pos_weight"],
        seq_len=r["seq_len"],
        batch_size=r["batch_size"],
        steps=steps,
        epochs=epochs,
        lr=r["lr"],
        lr_decay=r["lr_decay"],
        min_lr=r["min_lr"],
        grad_clip=r["grad_clip"],
        save_every=r["save_every"],
        seed=cfg["seed"],
        device=cfg["device"],
        progress=cfg["progress"],
        source=", ".join(str(f) for f in files),
    )


def train_controller(cfg: dict, rnn=None, latents=None, out=None, x0=None, generations=None) -> Path:
    """CMA-ES on C, in the dream (``dream=true``, at ``temperature``) or the real env."""
    from wmlab.worldmodels.cmaes import train_controller as _train

    layout = Layout(cfg["root"])
    c = cfg["controller"]
    dream = bool(cfg["dream"])
    if dream and latents is None:
        latents = [_require(layout.latents, "the latents", "train-rnn")]
    return _train(
        out or layout.controller(dream, cfg["temperature"]),
        vae=_require(layout.vae, "V", "train-vae"),
        rnn=rnn or _require(layout.rnn, "M", "train-rnn"),
        wm_env=cfg["wm_env"]["name"],
        env_kwargs=env_kwargs(cfg, c["max_steps"]),
        dream=dream,
        temperature=cfg["temperature"],
        latents=latents,
        inputs=c["inputs"],
        bias=c["bias"],
        mlp_hidden=c["mlp_hidden"],
        popsize=c["popsize"],
        rollouts=c["rollouts"],
        sigma0=c["sigma0"],
        generations=generations or c["generations"],
        l2_coef=c["l2_coef"],
        eval_every=c["eval_every"],
        eval_rollouts=c["eval_rollouts"],
        max_steps=c["max_steps"],
        sample_z=c["sample_z"],
        common_seeds=bool(c.get("common_seeds", False)),
        x0=x0,
        workers=cfg["workers"],
        seed=cfg["seed"],
        progress=cfg["progress"],
    )


def evaluate(
    cfg: dict, controller=None, rnn=None, latents=None, results=None, extra=None, baselines=None
) -> dict:
    """Real-env trials (mean +- std) and dream scores by temperature; appends to ``<root>/eval.jsonl``."""
    from wmlab.worldmodels.envs import env_class
    from wmlab.worldmodels.evaluate import evaluate_controller

    layout = Layout(cfg["root"])
    e, c = cfg["evaluate"], cfg["controller"]
    controller = controller or e["controller"] or layout.controller(bool(cfg["dream"]), cfg["temperature"])
    rnn = rnn or _require(layout.rnn, "M", "train-rnn")
    temperatures = (
        list(e["temperatures"])
        if env_class(cfg["wm_env"]["name"]).has_done and cfg["rnn"]["done_head"]
        else []
    )
    if temperatures and latents is None:
        latents = [_require(layout.latents, "the latents", "train-rnn")]
    return evaluate_controller(
        _require(Path(controller), "the controller", "train-controller"),
        vae=_require(layout.vae, "V", "train-vae"),
        rnn=rnn,
        wm_env=cfg["wm_env"]["name"],
        env_kwargs=env_kwargs(cfg, c["max_steps"]),
        n_trials=e["n_trials"],
        temperatures=temperatures,
        dream_trials=e["dream_trials"],
        latents=latents,
        max_steps=c["max_steps"],
        sample_z=c["sample_z"],
        workers=cfg["workers"],
        seed=cfg["seed"],
        results=results or layout.eval_results,
        extra=extra,
        baselines=list(e.get("baselines") or []) if baselines is None else baselines,
    )
