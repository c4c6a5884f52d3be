"""``wmlab <verb> key=value ...``: one entry point, a Hydra config per verb.

Each verb has a config ``wmlab/conf/<verb>.yaml`` (config groups such as ``env=`` live beside it)
and a function in the library that does the work; this file only maps one onto the other.
Overrides follow Hydra (and DINO-WM's names): a typo'd key or an unknown choice fails with the
valid ones listed.
"""

from __future__ import annotations

import difflib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

VERBS: dict[str, tuple[str, str]] = {}  # verb -> (config name, one-line help)
_HANDLERS: dict[str, Callable[[DictConfig], object]] = {}
#: verbs whose first bare argument is a path: verb -> the config key it sets
POSITIONAL = {"report": "study_dir", "import-dino-wm": "run"}


def verb(name: str, config: str, help_text: str):
    def register(fn):
        VERBS[name] = (config, help_text)
        _HANDLERS[name] = fn
        return fn

    return register


def env_kwargs(cfg: DictConfig) -> dict:
    """The env group's settings as ``make_env`` keyword arguments (without its ``name``)."""
    kwargs = OmegaConf.to_container(cfg.env, resolve=True)
    kwargs.pop("name")
    return kwargs


@verb("collect", "collect", "collect a trajectory dataset (parallel, resumable)")
def _collect(cfg: DictConfig):
    from wmlab.data.collect import collect

    store = collect(
        out=cfg.out,
        env=cfg.env.name,
        n_episodes=cfg.n_episodes,
        episode_len=cfg.episode_len,
        policy=cfg.policy,
        workers=cfg.workers,
        seed=cfg.seed,
        env_kwargs=env_kwargs(cfg),
        progress=cfg.progress,
    )
    run = store.metadata.get("last_run", {})
    print(f"{len(store)}/{store.n_slots} episodes in {store.path} ({run.get('frames_per_second')} frames/s)")
    if cfg.preview:
        from wmlab.report.show import show_dataset

        for path in show_dataset(store.path, cfg.preview_dir, n_episodes=4, n_frames=8):
            print(f"preview: {path}")


@verb("convert", "convert", "convert a DINO-WM point_maze folder into a wmlab dataset")
def _convert(cfg: DictConfig):
    from wmlab.data.dino_wm_format import convert_dino_wm

    src = Path(cfg.data)
    out = Path(cfg.out) if cfg.out else src.with_name(src.name + ".zarr")
    store = convert_dino_wm(src, out, env=cfg.env.name, progress=cfg.progress)
    print(f"converted {len(store)} episodes from {src} into {out}")


@verb("export", "export", "export a wmlab dataset in DINO-WM's point_maze folder format")
def _export(cfg: DictConfig):
    from wmlab.data.dino_wm_format import export_dino_wm

    export_dino_wm(cfg.data, cfg.out, overwrite=cfg.overwrite)
    print(f"wrote DINO-WM folder {cfg.out}")


@verb("check-render", "check_render", "compare our renders of a dataset's states with its frames")
def _check_render(cfg: DictConfig):
    from wmlab.data import open_dataset
    from wmlab.envs.render_check import check_render

    kwargs = env_kwargs(cfg)
    kwargs.pop("img_size", None)  # the dataset's frame size decides
    report = check_render(
        open_dataset(cfg.data), cfg.out, env=cfg.env.name, n_samples=cfg.n_samples, seed=cfg.seed,
        fit=cfg.fit, env_kwargs=kwargs,
    )  # fmt: skip
    summary = {k: v for k, v in report.items() if k != "samples"}  # per-sample rows are in the JSON file
    print(json.dumps(summary, indent=1))
    print(f"side-by-side frames and the full report: {Path(cfg.out) / 'check_render.png'}, .json")


@verb("show", "show", "write a PNG grid and a GIF of a few episodes")
def _show(cfg: DictConfig):
    from wmlab.report.show import show_dataset

    for path in show_dataset(cfg.data, cfg.out, cfg.n_episodes, cfg.n_frames, cfg.gif, cfg.seed):
        print(path)


@verb("info", "info", "summarise a dataset: episodes, lengths, shapes, metadata")
def _info(cfg: DictConfig):
    import numpy as np

    from wmlab.data import open_dataset

    dataset = open_dataset(cfg.data)
    lengths = np.asarray(dataset.lengths)
    complete = lengths[lengths > 0]
    summary = {
        "path": str(cfg.data),
        "episodes_complete": int(complete.size),
        "episode_slots": int(lengths.size),
        "steps": int(complete.sum()),
        "length_min_mean_max": [int(complete.min()), float(complete.mean()), int(complete.max())]
        if complete.size
        else None,
        "metadata": getattr(dataset, "metadata", {}),
    }
    print(json.dumps(summary, indent=1, default=str))


@verb("encode", "encode", "encode every frame of a dataset once into the frozen-feature cache")
def _encode(cfg: DictConfig):
    from wmlab.data.feature_cache import encode_dataset

    enc = OmegaConf.to_container(cfg.encoder, resolve=True)
    name, weights, token_pool = enc.pop("name"), enc.pop("weights", None), enc.pop("token_pool", 1)
    cache = encode_dataset(
        cfg.data, name, encoder_kwargs=enc, weights=weights, token_pool=token_pool,
        batch_size=cfg.batch_size, device=cfg.device, progress=cfg.progress, out=cfg.out,
    )  # fmt: skip
    info = cache.info
    print(f"{len(cache)} episodes of {info.num_tokens} x {info.dim} tokens in {cache.path}")


@verb(
    "train-tokenizer",
    "train_tokenizer",
    "train the DINO-Tok reimplementation's projection + decoder in-domain",
)
def _train_tokenizer(cfg: DictConfig):
    from wmlab.encoders.dino_tok import train_tokenizer

    kwargs = OmegaConf.to_container(cfg, resolve=True)
    out = train_tokenizer(kwargs.pop("data"), kwargs.pop("out"), **kwargs)
    print(f"tokenizer: {out} (use encoder=dino_tok encoder.weights={out})")


@verb("train", "train", "train the latent world model on a dataset over a frozen encoder (resumable)")
def _train(cfg: DictConfig):
    from wmlab.train import train

    run_dir = train(OmegaConf.to_container(cfg, resolve=True))
    print(f"run directory: {run_dir}")


@verb("train-decoder", "train_decoder", "train a run's optional pixel decoder on frozen tokens (own stage)")
def _train_decoder(cfg: DictConfig):
    from wmlab.train_decoder import train_decoder

    kwargs = OmegaConf.to_container(cfg, resolve=True)
    path = train_decoder(kwargs.pop("run_dir"), **kwargs)
    print(f"decoder: {path}")


@verb("import-dino-wm", "import_dino_wm", "convert a DINO-WM run (hydra.yaml + checkpoints) to a wmlab run")
def _import_dino_wm(cfg: DictConfig):
    from wmlab.models.dino_wm_checkpoint import import_dino_wm

    out = import_dino_wm(cfg.run, cfg.out, cfg.model_epoch)
    print(f"imported {cfg.run} -> {out}")


@verb("plan", "plan", "plan towards goal images closed-loop (MPC) and report success with intervals")
def _plan(cfg: DictConfig):
    from wmlab.evaluate import plan

    out = plan(OmegaConf.to_container(cfg, resolve=True))
    summary = json.loads((Path(out) / "summary.json").read_text())
    for key in ("reached", "final"):
        s = summary[f"success_{key}"]
        lo, hi = s["ci95"]
        count = f"{s['successes']}/{summary['n_episodes']}"
        print(f"success ({key}): {s['rate']:.2f} [{lo:.2f}, {hi:.2f}] ({count})")
    print(f"mean final distance {summary['mean_final_dist']:.3f}; results in {out}")


@verb("worldmodels", "worldmodels", "the World Models agent: worldmodels collect|train-vae|train-rnn|...")
def _worldmodels(cfg: DictConfig):
    raise AssertionError("unreachable: run() hands `worldmodels <stage> ...` to wmlab.worldmodels.cli")


def _study_command(verb_name: str) -> str:
    return " ".join(["wmlab", verb_name, *sys.argv[2:]]) if len(sys.argv) > 1 else f"wmlab {verb_name}"


@verb("study", "study", "compare encoders: train, diagnose and plan per encoder x seed x planner; report")
def _study(cfg: DictConfig):
    from wmlab.study import run_study

    out = run_study({**OmegaConf.to_container(cfg, resolve=True), "command": _study_command("study")})
    _print_report(out)


@verb("demo", "demo", "the representation study on CPU in minutes with no downloads (preset=full: GPU)")
def _demo(cfg: DictConfig):
    from wmlab.study import run_study

    started = time.perf_counter()
    out = run_study({**OmegaConf.to_container(cfg, resolve=True), "command": _study_command("demo")})
    print(f"demo finished in {(time.perf_counter() - started) / 60:.1f} min")
    _print_report(out)


@verb("report", "report", "rebuild a study's report (Markdown + HTML) from its results files")
def _report(cfg: DictConfig):
    from wmlab.report.study_report import build_report

    for kind, path in build_report(cfg.study_dir).items():
        print(f"{kind}: {path}")


def _print_report(study_dir) -> None:
    report = Path(study_dir) / "report"
    if (report / "report.html").is_file():
        print(f"report: {report / 'report.html'} (and report.md)")
    else:
        print(f"results in {study_dir} (this invocation ran one cell; run without cell= to merge and report)")


def compose(verb_name: str, overrides: list[str]) -> DictConfig:
    """The resolved config of ``verb_name`` with ``overrides`` (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    config_name, _ = VERBS[verb_name]
    with initialize_config_module(config_module="wmlab.conf", version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides)
    OmegaConf.resolve(cfg)
    return cfg


def run(verb_name: str, *overrides: str):
    """Python entry equal to the CLI: ``run("collect", "n_episodes=10", "img_size=64")``."""
    if verb_name not in VERBS:
        close = difflib.get_close_matches(verb_name, VERBS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise SystemExit(f"wmlab: unknown verb '{verb_name}'.{hint} Verbs: {', '.join(VERBS)}")
    if verb_name == "worldmodels":  # a verb with stages, each its own config (wmlab/worldmodels/cli.py)
        from wmlab.worldmodels.cli import worldmodels_main

        if not overrides or "=" in overrides[0]:
            raise ValueError(
                "wmlab worldmodels needs a stage: collect|train-vae|train-rnn|train-controller|..."
            )
        return worldmodels_main(overrides[0], list(overrides[1:]))
    return _HANDLERS[verb_name](compose(verb_name, list(overrides)))


def _suggest_keys(verb_name: str, overrides: list[str]) -> str:
    """'Did you mean ...' for override keys that are not in the verb's config."""
    try:
        base = OmegaConf.to_container(compose(verb_name, []), resolve=False)
    except Exception:
        return ""

    def keys(node, prefix=""):
        for k, v in node.items():
            yield prefix + k
            if isinstance(v, dict):
                yield from keys(v, prefix + k + ".")

    known = list(keys(base))
    hints = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            guess = f"; did you mean {close}?" if close else ""
            hints.append(f"'{key}' is not a setting of '{verb_name}'{guess}")
    return ("\n" + "\n".join(hints)) if hints else ""


def _usage() -> str:
    lines = ["usage: wmlab <verb> [key=value ...]   (wmlab <verb> --cfg shows the config)", "", "verbs:"]
    lines += [f"  {name:<14} {help_text}" for name, (_, help_text) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    verb_name, overrides = argv[0], argv[1:]
    # `wmlab report <study_dir>`, `wmlab import-dino-wm <run>`: one bare path is the verb's main key.
    if verb_name in POSITIONAL and overrides and "=" not in overrides[0] and not overrides[0].startswith("-"):
        overrides = [f"{POSITIONAL[verb_name]}={overrides[0]}", *overrides[1:]]

    def invoke():
        if "--cfg" in overrides or "--help" in overrides:
            if verb_name not in VERBS:
                run(verb_name)  # raises the unknown-verb message
            print(OmegaConf.to_yaml(compose(verb_name, [o for o in overrides if not o.startswith("--")])))
            return
        run(verb_name, *overrides)

    return main_guarded(verb_name, invoke, overrides)


def main_guarded(label: str, fn, overrides: list[str] = ()) -> int:
    """Run ``fn`` and turn the errors a user can cause into a message and an exit code."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from wmlab.data.errors import DatasetError

    try:
        fn()
    except (HydraException, OmegaConfBaseException) as err:
        lines = str(err).replace("\n\n", "\n").splitlines()
        # Hydra appends its config search path; a user needs the valid choices, not that.
        if "Config search path:" in lines:
            lines = lines[: lines.index("Config search path:")]
        message = "\n".join(lines)
        if "Missing mandatory value" in message:
            message += "\n(give it on the command line as key=value)"
        if "Could not override" in message and label in VERBS:
            message += _suggest_keys(label, list(overrides))
        print(f"wmlab {label}: bad configuration: {message}", file=sys.stderr)
        return 2
    except (DatasetError, FileNotFoundError, ValueError) as err:
        print(f"wmlab {label}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        print(f"\nwmlab {label}: {err or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
