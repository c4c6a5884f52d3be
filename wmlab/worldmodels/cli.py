"""``wmlab worldmodels <stage> key=value ...``: the World Models pipeline's entry point.

Stages: collect | train-vae | train-rnn | train-controller | evaluate | iterate | report. The config is
``wmlab/conf/worldmodels.yaml`` with groups ``wm_env`` (take_cover, car_racing, dodge) and ``preset``
(full, tiny); ``wm_env=car_racing preset=tiny`` pick them (short for Hydra's ``worldmodels/wm_env=...``).

    wmlab worldmodels collect wm_env=take_cover preset=tiny
    wmlab worldmodels train-controller wm_env=take_cover dream=true temperature=1.15
"""

from __future__ import annotations

import difflib
import json

from omegaconf import OmegaConf

from wmlab.config import ConfigError

GROUPS = {"wm_env": "worldmodels/wm_env", "preset": "worldmodels/preset"}
CONFIG = "worldmodels"  # wmlab/conf/worldmodels.yaml


def _stage_collect(cfg: dict) -> None:
    from wmlab.worldmodels import stages

    store = stages.collect(cfg)
    run = store.metadata.get("last_run", {})
    print(f"{len(store)}/{store.n_slots} episodes in {store.path} ({run.get('frames_per_second')} frames/s)")


def _stage_train_vae(cfg: dict) -> None:
    from wmlab.worldmodels import stages

    out = stages.train_vae(cfg)
    print(f"V: {out} (as an encoder: encoder=vae encoder.weights={out})")


def _stage_train_rnn(cfg: dict) -> None:
    from wmlab.worldmodels import stages

    print(f"M: {stages.train_rnn(cfg)}")


def _stage_train_controller(cfg: dict) -> None:
    from wmlab.worldmodels import stages

    out = stages.train_controller(cfg)
    meta = json.loads((out / "controller.json").read_text())
    print(f"C: {out} (best evaluation {meta['best_eval']}, {meta['generation']} generations)")


def _stage_evaluate(cfg: dict) -> None:
    from wmlab.worldmodels import stages

    record = stages.evaluate(cfg)
    real = record.get("real")
    if real:
        print(f"real {cfg['wm_env']['name']}: {real['mean']:.1f} ± {real['std']:.1f} over {real['n']} trials")
    for tau, s in (record.get("dream") or {}).items():
        print(f"dream tau={tau}: {s['mean']:.1f} ± {s['std']:.1f} over {s['n']} dreams")


def _stage_iterate(cfg: dict) -> None:
    from wmlab.worldmodels.evaluate import read_jsonl
    from wmlab.worldmodels.iterate import iterate

    path = iterate(cfg)
    for row in read_jsonl(path):
        print(
            json.dumps({k: row[k] for k in ("iteration", "real_mean", "real_std", "dream_mean", "dream_std")})
        )
    print(f"results: {path}")


def _stage_report(cfg: dict) -> None:
    from wmlab.worldmodels.report import build_report

    print(f"report: {build_report(cfg)}")


STAGES = {
    "collect": _stage_collect,
    "train-vae": _stage_train_vae,
    "train-rnn": _stage_train_rnn,
    "train-controller": _stage_train_controller,
    "evaluate": _stage_evaluate,
    "iterate": _stage_iterate,
    "report": _stage_report,
    "run": lambda cfg: __import__("wmlab.worldmodels.experiments", fromlist=["_"]).stage_run(cfg),
    "tau-sweep": lambda cfg: __import__("wmlab.worldmodels.experiments", fromlist=["_"]).stage_tau_sweep(cfg),
}


def translate(overrides: list[str]) -> list[str]:
    """``wm_env=x`` / ``preset=y`` -> Hydra's group paths; everything else unchanged."""
    out = []
    for override in overrides:
        key, sep, value = override.partition("=")
        out.append(f"{GROUPS[key]}={value}" if sep and key in GROUPS else override)
    return out


def compose(overrides: list[str]) -> dict:
    """The resolved ``worldmodels`` config with ``overrides`` as a plain dict."""
    from wmlab.config import compose as compose_config

    return OmegaConf.to_container(compose_config(CONFIG, translate(list(overrides))), resolve=True)


class _StageHandler:
    """One stage as a Hydra task body (picklable by name, for launchers that run jobs elsewhere)."""

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def __call__(self, cfg) -> object:
        cfg = OmegaConf.to_container(cfg, resolve=True)
        if cfg.get("torch_threads"):
            import torch

            torch.set_num_threads(int(cfg["torch_threads"]))
        return STAGES[self.stage](cfg)


def check_stage(stage: str) -> None:
    """Unknown stages fail with the list of valid ones."""
    if stage not in STAGES:
        close = difflib.get_close_matches(stage, STAGES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown worldmodels stage {stage!r}.{hint} Stages: {', '.join(STAGES)}")


def stage_app(stage: str, args: list[str]) -> list:
    """``wmlab worldmodels <stage> args...`` as a Hydra app (``-m`` sweeps, launchers, ``--cfg``, ...);
    returns the results of the jobs that ran in this process."""
    from wmlab.cli import HydraTask, run_hydra_app

    check_stage(stage)
    task = HydraTask(f"worldmodels_{stage.replace('-', '_')}", _StageHandler(stage))
    return run_hydra_app(task, CONFIG, translate(list(args)), prog=f"wmlab worldmodels {stage}")


def worldmodels_app(args: list[str]):
    """The ``wmlab worldmodels`` verb: ``<stage> [key=value ...]``, or ``--help``."""
    from wmlab.cli import _overrides_only, verb_help

    stage = args[0] if args and not args[0].startswith("-") and "=" not in args[0] else None
    rest = args[1:] if stage else args
    if stage is None and not ({"-h", "--help"} & set(args)):
        raise ConfigError(f"wmlab worldmodels needs a stage: {'|'.join(STAGES)} (wmlab worldmodels --help)")
    if stage is not None:
        check_stage(stage)
    if {"-h", "--help"} & set(rest):
        title = f"wmlab worldmodels {stage}" if stage else "wmlab worldmodels"
        usage = f"usage: wmlab worldmodels {stage or '<stage>'} [key=value ...] [Hydra flags]\n"
        usage += f"stages: {', '.join(STAGES)}"
        summary = "the World Models agent (V: conv VAE, M: MDN-RNN, C: linear by CMA-ES)"
        print(verb_help(title, CONFIG, translate(_overrides_only(rest)), summary, usage=usage))
        return None
    return stage_app(stage, rest)


def worldmodels_main(stage: str, overrides: list[str]):
    """Python entry equal to ``wmlab worldmodels <stage> overrides...`` (the same Hydra app); errors
    are raised. Returns the stage's result (a list for a ``-m`` multirun)."""
    results = stage_app(stage, list(overrides))
    if "-m" in overrides or "--multirun" in overrides:
        return results
    return results[-1] if results else None
