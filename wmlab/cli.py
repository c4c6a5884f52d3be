"""``wmlab <verb> key=value ...``: one entry point; every verb is a Hydra application.

Each verb has a config ``wmlab/conf/<verb>.yaml`` (config groups such as ``env=`` live beside it)
and a function in the library that does the work; this file maps one onto the other and runs the
verb through Hydra's own app entry (what ``@hydra.main`` runs), so everything Hydra documents works:
``-m``/``--multirun`` sweeps (``wmlab collect -m seed=0,1``), launchers (``hydra/launcher=submitit_local``
or ``submitit_slurm``), ``hydra.run.dir=``/``hydra.sweep.dir=``, ``--cfg job|hydra|all``, ``--info``,
``--config-dir``/``--config-name``, shell completion and the ``.hydra/`` config snapshot.
``wmlab <verb> --help`` prints the verb's settings with their comments.

Overrides follow Hydra (and DINO-WM's names): a typo'd key or an unknown choice fails with the
valid ones listed, and a key added with ``+`` that no code reads is refused. Errors a user can cause
end in one line naming the thing and the fix (exit 1; 2 for bad configuration, 130 interrupted);
``--debug`` or ``WMLAB_DEBUG=1`` shows the full traceback.
"""

from __future__ import annotations

import difflib
import errno
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig

# Nothing heavy at import: `wmlab --help` and `wmlab --version` load neither OmegaConf nor Hydra.
__all__ = ["VERBS", "compose", "main", "run", "run_hydra_app"]

VERBS: dict[str, tuple[str, str]] = {}  # verb -> (config name, one-line help)
_HANDLERS: dict[str, Callable[[DictConfig], object]] = {}
#: verbs whose first bare argument is a path: verb -> the config key it sets
POSITIONAL = {"report": "study_dir", "import-dino-wm": "run"}
#: exit codes
EXIT_USER, EXIT_CONFIG, EXIT_INTERRUPTED = 1, 2, 130


def verb(name: str, config: str, help_text: str):
    def register(fn):
        VERBS[name] = (config, help_text)
        _HANDLERS[name] = fn
        return fn

    return register


def compose(name: str, overrides=()) -> DictConfig:
    """``wmlab.config.compose`` (kept here for callers of the old location)."""
    from wmlab.config import compose as compose_config

    return compose_config(name, overrides)


def _plain(node) -> dict:
    """A config node as plain Python containers, interpolations resolved."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def env_kwargs(cfg: DictConfig) -> dict:
    """The env group's settings as ``make_env`` keyword arguments (without its ``name``)."""
    kwargs = _plain(cfg.env)
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
        lock_wait=cfg.lock_wait,
    )
    run = store.metadata.get("last_run", {})
    print(f"{len(store)}/{store.n_slots} episodes in {store.path} ({run.get('frames_per_second')} frames/s)")
    if cfg.preview:
        from wmlab.report.show import show_dataset

        for path in show_dataset(store.path, cfg.preview_dir, n_episodes=4, n_frames=8):
            print(f"preview: {path}")
    return store.path


@verb("convert", "convert", "convert a DINO-WM point_maze folder into a wmlab dataset")
def _convert(cfg: DictConfig):
    from wmlab.data.dino_wm_format import convert_dino_wm

    src = Path(cfg.data)
    out = Path(cfg.out) if cfg.out else src.with_name(src.name + ".zarr")
    store = convert_dino_wm(src, out, env=cfg.env.name, progress=cfg.progress)
    print(f"converted {len(store)} episodes from {src} into {out}")
    return out


@verb("export", "export", "export a wmlab dataset in DINO-WM's point_maze folder format")
def _export(cfg: DictConfig):
    from wmlab.data.dino_wm_format import export_dino_wm

    export_dino_wm(cfg.data, cfg.out, overwrite=cfg.overwrite)
    print(f"wrote DINO-WM folder {cfg.out}")
    return Path(cfg.out)


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
    return report


@verb("show", "show", "write a PNG grid and a GIF of a few episodes")
def _show(cfg: DictConfig):
    from wmlab.report.show import show_dataset

    paths = show_dataset(cfg.data, cfg.out, cfg.n_episodes, cfg.n_frames, cfg.gif, cfg.seed)
    for path in paths:
        print(path)
    return paths


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
    return summary


@verb("encode", "encode", "encode every frame of a dataset once into the frozen-feature cache")
def _encode(cfg: DictConfig):
    from wmlab.data.feature_cache import encode_dataset

    enc = _plain(cfg.encoder)
    name, weights, token_pool = enc.pop("name"), enc.pop("weights", None), enc.pop("token_pool", 1)
    cache = encode_dataset(
        cfg.data, name, encoder_kwargs=enc, weights=weights, token_pool=token_pool,
        batch_size=cfg.batch_size, device=cfg.device, progress=cfg.progress, out=cfg.out,
        lock_wait=cfg.lock_wait,
    )  # fmt: skip
    info = cache.info
    print(f"{len(cache)} episodes of {info.num_tokens} x {info.dim} tokens in {cache.path}")
    return cache.path


@verb(
    "train-tokenizer",
    "train_tokenizer",
    "train the DINO-Tok reimplementation's projection + decoder in-domain",
)
def _train_tokenizer(cfg: DictConfig):
    from wmlab.training.tokenizer import train_tokenizer

    kwargs = _plain(cfg)
    out = train_tokenizer(kwargs.pop("data"), kwargs.pop("out"), **kwargs)
    print(f"tokenizer: {out} (use encoder=dino_tok encoder.weights={out})")
    return out


@verb("train", "train", "train the latent world model on a dataset over a frozen encoder (resumable)")
def _train(cfg: DictConfig):
    from wmlab.train import train

    run_dir = train(_plain(cfg))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank returns; one line is enough
        print(f"run directory: {run_dir}")
    return run_dir


@verb("train-decoder", "train_decoder", "train a run's optional pixel decoder on frozen tokens (own stage)")
def _train_decoder(cfg: DictConfig):
    from wmlab.train_decoder import train_decoder

    kwargs = _plain(cfg)
    path = train_decoder(kwargs.pop("run_dir"), **kwargs)
    print(f"decoder: {path}")
    return path


@verb("import-dino-wm", "import_dino_wm", "convert a DINO-WM run (hydra.yaml + checkpoints) to a wmlab run")
def _import_dino_wm(cfg: DictConfig):
    from wmlab.models.dino_wm_checkpoint import import_dino_wm

    out = import_dino_wm(cfg.run, cfg.out, cfg.model_epoch)
    print(f"imported {cfg.run} -> {out}")
    return out


@verb("plan", "plan", "plan towards goal images closed-loop (MPC) and report success with intervals")
def _plan(cfg: DictConfig):
    from wmlab.evaluate import plan

    out = plan(_plain(cfg))
    summary = json.loads((Path(out) / "summary.json").read_text())
    for key in ("reached", "final"):
        s = summary[f"success_{key}"]
        lo, hi = s["ci95"]
        count = f"{s['successes']}/{summary['n_episodes']}"
        print(f"success ({key}): {s['rate']:.2f} [{lo:.2f}, {hi:.2f}] ({count})")
    geodesic = summary.get("mean_final_geodesic_dist")
    along = f"mean final geodesic distance {geodesic:.3f} (straight line {summary['mean_final_dist']:.3f})"
    plain = f"mean final distance {summary['mean_final_dist']:.3f}"
    print(f"{along if geodesic is not None else plain}; env steps per episode "
          f"{summary.get('env_step_budget', '?')}; results in {out}")  # fmt: skip
    return out


@verb("worldmodels", "worldmodels", "the World Models agent: worldmodels collect|train-vae|train-rnn|...")
def _worldmodels(cfg: DictConfig):
    raise AssertionError("unreachable: `worldmodels <stage> ...` runs through wmlab.worldmodels.cli")


def _study_command(verb_name: str) -> str:
    return " ".join(["wmlab", verb_name, *sys.argv[2:]]) if len(sys.argv) > 1 else f"wmlab {verb_name}"


@verb("study", "study", "compare encoders: train, diagnose and plan per encoder x seed x planner; report")
def _study(cfg: DictConfig):
    from wmlab.study import run_study

    out = run_study({**_plain(cfg), "command": _study_command("study")})
    _print_report(out)
    return out


@verb("demo", "demo", "the representation study on CPU in minutes with no downloads (preset=full: GPU)")
def _demo(cfg: DictConfig):
    from wmlab.study import run_study

    started = time.perf_counter()
    out = run_study({**_plain(cfg), "command": _study_command("demo")})
    print(f"demo finished in {(time.perf_counter() - started) / 60:.1f} min")
    _print_report(out)
    return out


@verb("report", "report", "rebuild a study's report (Markdown + HTML) from its results files")
def _report(cfg: DictConfig):
    from wmlab.report.study_report import build_report

    paths = build_report(cfg.study_dir)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return paths


def _print_report(study_dir) -> None:
    report = Path(study_dir) / "report"
    if (report / "report.html").is_file():
        print(f"report: {report / 'report.html'} (and report.md)")
    else:
        print(
            f"results in {study_dir}; no report yet: this invocation ran one cell or submitted jobs whose "
            "merge job writes it (`wmlab study ... cell=merge` merges and reports what is finished)"
        )


# ------------------------------------------------------------------------------ the Hydra app
class HydraTask:
    """Hydra's task function for one verb (or one ``worldmodels`` stage).

    A module-level class so launchers that run jobs in other processes (submitit) can pickle it.
    Hydra names a job after its task function's module (``hydra.job.name``, the run folder and the
    log file); ``job_name`` gives every verb its own name. ``results`` collects the return values of
    the jobs that ran in this process (one per job), for ``run()``.
    """

    def __init__(self, job_name: str, fn: Callable[[DictConfig], object]) -> None:
        self.fn = fn
        self.results: list = []
        self.defer_errors = False  # set by run_hydra_app for single runs (not pickled to other jobs)
        self.deferred_error: Exception | None = None
        # Hydra reads only the last dotted part (detect_task_name); the class stays importable.
        self.__module__ = f"wmlab.{job_name}"

    def __call__(self, cfg: DictConfig):
        from omegaconf import OmegaConf

        try:
            check_complete(cfg)
            OmegaConf.resolve(cfg)  # interpolation errors surface here, before any work
            result = self.fn(cfg)
        except Exception as err:
            if not self.defer_errors:
                raise
            # A single run: hand the error to run_hydra_app to raise after Hydra returns, so main_guarded
            # prints one line (Hydra would first write "Error executing job with overrides: ...").
            self.deferred_error = err
            return None
        self.results.append(result)
        return result


class _VerbHandler:
    """A verb's handler by name (picklable: the registry is rebuilt on import in a job's process)."""

    def __init__(self, verb_name: str) -> None:
        self.verb_name = verb_name

    def __call__(self, cfg: DictConfig):
        return _HANDLERS[self.verb_name](cfg)


def check_complete(cfg: DictConfig) -> None:
    """Refuse a config with mandatory values (``???``) left unset, naming each one."""
    from omegaconf import OmegaConf

    from wmlab.config import ConfigError

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            "Missing mandatory value: "
            + ", ".join(missing)
            + " (give it on the command line as "
            + " ".join(f"{k}=<value>" for k in missing)
            + ")"
        )


def _quote(value: str) -> str:
    """``value`` as a Hydra override value that stays one string (paths with ',', '=', spaces)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _absolute_config_path(args: list[str]) -> list[str]:
    """``--config-path``/``-cp`` relative to the current directory, as a CLI user means it
    (Hydra would read it relative to the Python file that declares the app)."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config-path", "-cp") and i + 1 < len(args):
            out += [arg, _abs_path(args[i + 1])]
            i += 2
            continue
        if arg.startswith("--config-path="):
            arg = "--config-path=" + _abs_path(arg.split("=", 1)[1])
        out.append(arg)
        i += 1
    return out


def _abs_path(path: str) -> str:
    return path if path.startswith("pkg://") or os.path.isabs(path) else os.path.abspath(path)


def run_hydra_app(task: HydraTask, config: str, args: Sequence[str], prog: str) -> list:
    """Run ``task`` as a Hydra application with command line ``args`` (what ``@hydra.main`` does with
    ``sys.argv``): run, ``-m`` multirun through the configured launcher and sweeper, ``--cfg``,
    ``--info``, ``-sc``. Errors propagate as exceptions (``HYDRA_FULL_ERROR``) for the caller to
    report; returns the results of the jobs that ran in this process."""
    from hydra import version
    from hydra._internal.utils import _run_hydra, get_args_parser

    from wmlab.config import SEARCH_PATH, VERSION_BASE, check_overrides

    version.setbase(VERSION_BASE)
    parser = get_args_parser()
    parser.prog = prog
    parsed = parser.parse_args(_absolute_config_path(list(args)))
    check_overrides(parsed.config_name or config, parsed.overrides)
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises; main_guarded prints one line
    task.defer_errors, task.deferred_error = not parsed.multirun, None
    try:
        _run_hydra(
            args=parsed, args_parser=parser, task_function=task, config_path=SEARCH_PATH, config_name=config
        )
        if task.deferred_error is not None:
            raise task.deferred_error
    finally:
        task.defer_errors = False
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
    return task.results


def _dispatch(verb_name: str, args: list[str]):
    """``wmlab <verb> args...`` without the error handling: returns the verb's result(s)."""
    from wmlab.config import ConfigError

    if verb_name not in VERBS:
        close = difflib.get_close_matches(verb_name, VERBS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown verb '{verb_name}'.{hint} Verbs: {', '.join(VERBS)} (wmlab --help)")
    if verb_name == "worldmodels":  # a verb with stages, each a Hydra app (wmlab/worldmodels/cli.py)
        from wmlab.worldmodels.cli import worldmodels_app

        return worldmodels_app(args)
    config = VERBS[verb_name][0]
    if "--version" in args:
        print(version_line())
        return None
    if verb_name in POSITIONAL and args and "=" not in args[0] and not args[0].startswith("-"):
        # `wmlab report <study_dir>`, `wmlab import-dino-wm <run>`: one bare path is the verb's main key.
        args = [f"{POSITIONAL[verb_name]}={_quote(args[0])}", *args[1:]]
    if "-h" in args or "--help" in args:
        print(verb_help(f"wmlab {verb_name}", config, _overrides_only(args), VERBS[verb_name][1]))
        return None
    task = HydraTask(config, _VerbHandler(verb_name))
    results = run_hydra_app(task, config, args, prog=f"wmlab {verb_name}")
    return results


def run(verb_name: str, *args: str):
    """Python entry equal to the CLI: ``run("collect", "n_episodes=10", "img_size=64")``.

    The same Hydra app runs (``run("collect", "-m", "seed=0,1")`` sweeps); errors are raised, not
    printed. Returns the verb's result (its output path, mostly), or the list of results of a
    multirun's jobs that ran in this process.
    """
    results = _dispatch(verb_name, list(args))
    if isinstance(results, list) and "-m" not in args and "--multirun" not in args:
        return results[-1] if results else None
    return results


# ------------------------------------------------------------------------------------- help
def version_line() -> str:
    import hydra

    from wmlab import __version__

    return f"wmlab {__version__} (Hydra {hydra.__version__}, Python {sys.version.split()[0]})"


def _overrides_only(args: Sequence[str]) -> list[str]:
    """The key=value arguments of a command line (flags and their values left out)."""
    flags_with_value = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                        "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}  # fmt: skip
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in flags_with_value:
            skip = arg not in ("--info", "-i")
            continue
        if not arg.startswith("-") and "=" in arg:
            out.append(arg)
    return out


def _config_source(relative: str) -> str | None:
    """The text of ``wmlab/conf/<relative>.yaml`` with its comments (None when not a wmlab file)."""
    from importlib.resources import files

    path = files("wmlab.conf").joinpath(f"{relative}.yaml")
    return path.read_text() if path.is_file() else None


def _without_hydra_lines(source: str) -> str:
    """A verb's YAML minus what is Hydra's business (its ``hydra:`` block, hydra_app, overrides)."""
    out, in_hydra_block = [], False
    for line in source.splitlines():
        if line.startswith("hydra:"):
            in_hydra_block = True
            continue
        if in_hydra_block and (line.startswith((" ", "\t")) or not line.strip()):
            continue
        in_hydra_block = False
        entry = line.split("#")[0].strip()
        if entry in ("- hydra_app", "- _self_") or entry.startswith("- override hydra/"):
            continue
        out.append(line)
    if "defaults:" in out:  # a defaults list left with nothing a user picks says nothing
        i = out.index("defaults:")
        if i + 1 >= len(out) or not out[i + 1].lstrip().startswith("- "):
            del out[i]
    return "\n".join(out).rstrip()


HYDRA_FLAGS = """\
Every verb is a Hydra application (https://hydra.cc/docs/1.3/):
  -m, --multirun               sweep: seed=0,1,2  'seeds=[0],[1]'  (one job per combination)
  hydra/launcher=NAME          basic (default, in this process), submitit_local, submitit_slurm
                               (hydra.launcher.timeout_min=60 hydra.launcher.partition=... etc.)
  hydra.run.dir=DIR            where this run's record goes (.hydra/ config snapshot + log);
  hydra.sweep.dir=DIR          default outputs/hydra/<verb>/... (WMLAB_HYDRA_DIR moves the root)
  --cfg job|hydra|all          print the composed config instead of running (--resolve to resolve)
  --info [config|defaults|defaults-tree|plugins|searchpath]
  --config-dir DIR             add a config directory (your own experiment configs)
  --config-name NAME           use another primary config (e.g. one of yours in --config-dir)
  --hydra-help                 Hydra's own help
  -sc install=bash             shell completion (also zsh, fish)
wmlab flags: --version, --debug (full tracebacks; or WMLAB_DEBUG=1)"""


def verb_help(title: str, config: str, overrides: Sequence[str], summary: str, usage: str = "") -> str:
    """The verb's settings as its YAML files say them, comments included, with the config-group
    choices this command line would pick (``wmlab train encoder=dinov2_patch --help``)."""
    from omegaconf import OmegaConf

    from wmlab.config import _loader, compose_with_hydra

    usage = usage or f"usage: {title} [key=value ...] [Hydra flags]"
    lines = [f"{title}: {summary}", usage, ""]
    source = _config_source(config)
    if source is not None:
        lines += [f"Settings (wmlab/conf/{config}.yaml; override any with key=value):", ""]
        lines += ["  " + line if line else "" for line in _without_hydra_lines(source).splitlines()]
    try:
        choices = OmegaConf.to_container(compose_with_hydra(config, overrides).hydra.runtime.choices)
    except Exception as err:  # help must still show what it can (the error itself is the news)
        choices = {}
        lines += ["", f"(could not compose with {list(overrides)}: {str(err).splitlines()[0]})"]
    for group, choice in sorted(choices.items()):
        if group.startswith("hydra/") or choice is None:
            continue
        options = _loader().get_group_options(group)
        key = group.rsplit("/", 1)[-1]
        lines += ["", f"{key}={choice}   (choices: {' | '.join(options)}; its keys: {key}.<key>=<value>)"]
        group_source = _config_source(f"{group}/{choice}")
        if group_source is not None:
            lines += ["  " + line if line else "" for line in group_source.rstrip().splitlines()]
    lines += ["", HYDRA_FLAGS]
    return "\n".join(lines)


def _usage() -> str:
    lines = [
        "usage: wmlab <verb> [key=value ...] [Hydra flags]",
        "       wmlab <verb> --help     the verb's settings, with their comments",
        "       wmlab --version",
        "",
        "verbs:",
    ]
    lines += [f"  {name:<16} {help_text}" for name, (_, help_text) in VERBS.items()]
    lines += ["", HYDRA_FLAGS]
    return "\n".join(lines)


# ------------------------------------------------------------------------- shell completion
def _top_level_completion(argv: list[str]) -> int:
    """``wmlab -sc install=bash`` and the completion queries the installed script sends.

    Hydra's script asks ``wmlab -sc query=bash`` with the whole line in ``COMP_LINE``: the verb (and
    a ``worldmodels`` stage) is completed here; after it, the verb's own app completes its settings,
    given the line without the verb.
    """
    if not any(a.startswith("query=") for a in argv[1:]):  # install / uninstall: one script for all verbs
        return main(["info", *argv])
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    position = len(words) if line.endswith(" ") or not words else len(words) - 1  # the word being typed
    typed = words[position] if position < len(words) else ""
    if position <= 1:
        print(" ".join(v for v in VERBS if v.startswith(typed)))
        return 0
    verb_name = words[1]
    if verb_name == "worldmodels" and position == 2:
        from wmlab.worldmodels.cli import STAGES

        print(" ".join(s for s in STAGES if s.startswith(typed)))
        return 0
    if verb_name not in VERBS:
        return 0
    skip = 2 if verb_name == "worldmodels" else 1
    os.environ["COMP_LINE"] = " ".join([words[0], *words[1 + skip :]]) + (" " if line.endswith(" ") else "")
    try:
        return main([*words[1 : 1 + skip], *argv])
    finally:
        os.environ["COMP_LINE"] = line


# ------------------------------------------------------------------------------ entry point
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("WMLAB_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("--version", "-V"):
        print(version_line())
        return 0
    if argv[0] in ("-sc", "--shell-completion"):
        return _top_level_completion(argv)
    if argv[0].startswith("-"):
        print(f"wmlab: give the verb first: wmlab <verb> {' '.join(argv)} (wmlab --help)", file=sys.stderr)
        return EXIT_CONFIG
    verb_name, args = argv[0], argv[1:]
    return main_guarded(verb_name, lambda: _dispatch(verb_name, args), _overrides_only(args), debug=debug)


def _config_message(err: BaseException, label: str, overrides: Sequence[str]) -> str:
    """Hydra's/OmegaConf's message for a bad configuration, trimmed to what a user acts on."""
    text = str(err)
    if err.__cause__ is not None and str(err.__cause__) not in text:
        text = f"{text}\n{err.__cause__}" if text else str(err.__cause__)
    lines = [line for line in text.replace("\n\n", "\n").splitlines() if line.strip()]
    # Hydra appends its config search path and OmegaConf its node details: a user needs neither.
    if "Config search path:" in lines:
        lines = lines[: lines.index("Config search path:")]
    drop = ("full_key:", "object_type=", "reference_type=", "To append to your config use")
    lines = [line for line in lines if not line.strip().startswith(drop)]
    message = "\n".join(lines)
    from wmlab.config import suggest_keys

    if "Missing mandatory value" in message and "give it on the command line" not in message:
        message += "\n(give it on the command line as key=value)"
    if "Could not override" in message or "not in struct" in message:
        config = VERBS[label][0] if label in VERBS else label
        hints = suggest_keys(config, overrides)
        message += f"\n{hints}" if hints else ""
    return message


_OUT_KEYS = "output (out=... / run_dir=... / study_dir=...)"


def _path_in_traceback(err: BaseException) -> str | None:
    """The file a failed write was writing, when the OSError does not say (``f.write`` raising
    ENOSPC carries no file name): the innermost frame's local ``filename``/``path``/``out``."""
    tb, found = err.__traceback__, None
    while tb is not None:
        local = tb.tb_frame.f_locals
        for name in ("filename", "path", "file", "out", "target"):
            value = local.get(name)
            if isinstance(value, (str, Path)) and str(value):
                found = str(value)
                break
        tb = tb.tb_next
    return found


def _os_error_message(err: OSError) -> str:
    """Disk full, read-only, no permission, missing file: the path and what to do."""
    path = err.filename or _path_in_traceback(err) or "the output"
    code = err.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return f"disk full / over quota writing {path}: free space there or choose another {_OUT_KEYS}"
    if code == errno.EROFS:
        return f"read-only file system: {path}: choose a writable {_OUT_KEYS}"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied: {path}: choose a writable {_OUT_KEYS} or fix its permissions"
    if code == errno.ENOENT and err.filename:
        return f"no such file or directory: {err.filename} (check the path given on the command line)"
    if err.strerror and err.filename:
        return f"{err.strerror}: {err.filename}"
    return str(err)


def _safetensors_message(err: Exception) -> str:
    """safetensors' Rust errors carry the OS error code in their text (``Os { code: 28, ... }``)."""
    first = (str(err).splitlines() or [""])[0]
    for code, what in ((errno.ENOSPC, "disk full"), (errno.EROFS, "read-only file system"),
                       (errno.EACCES, "permission denied")):  # fmt: skip
        if f"code: {code}," in first or f"code: {code} " in first:
            return f"{what} writing weights (safetensors: {first}): free space or choose another {_OUT_KEYS}"
    return f"unreadable weights (safetensors: {first}): a truncated or corrupt .safetensors? re-create it"


def main_guarded(label: str, fn, overrides: Sequence[str] = (), debug: bool = False) -> int:
    """Run ``fn`` and turn the errors a user can cause into one message and an exit code:
    1 user error, 2 bad configuration, 130 interrupted. ``debug`` re-raises (full traceback)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from wmlab.config import ConfigError
    from wmlab.integrity import UserError

    def say(kind: str, message: str, code: int) -> int:
        print(f"wmlab {label}: {kind}{message}", file=sys.stderr)
        return code

    try:
        fn()
    except SystemExit as exit_:  # argparse and Hydra's --help/--hydra-help exit themselves
        code = exit_.code
        if isinstance(code, str):
            return say("", code, EXIT_USER)
        return int(code or 0)
    except KeyboardInterrupt as err:
        print(f"\nwmlab {label}: {str(err) or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `wmlab ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except Exception as err:
        if debug:
            raise
        if isinstance(err, (ConfigError, HydraException, OmegaConfBaseException)):
            return say("bad configuration: ", _config_message(err, label, overrides), EXIT_CONFIG)
        if isinstance(err, UserError):
            return say("error: ", str(err), EXIT_USER)
        if isinstance(err, OSError):
            return say("error: ", _os_error_message(err), EXIT_USER)
        if type(err).__name__ == "SafetensorError":
            return say("error: ", _safetensors_message(err), EXIT_USER)
        if type(err).__module__.startswith("yaml") and hasattr(err, "problem"):  # yaml.YAMLError
            where = getattr(err, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            if where is not None and where.name and not where.name.startswith("<"):
                at = f" in {where.name}{at}"  # a named file (Hydra parses text: then no name)
            return say("error: ", f"invalid YAML{at}: {err.problem} (fix the file)", EXIT_USER)
        if type(err).__name__ == "OutOfMemoryError":
            first = (str(err).splitlines() or [""])[0]
            hint = "lower batch_size= / chunk= or use a smaller model"
            return say("error: ", f"out of memory ({first}): {hint}", EXIT_USER)
        if isinstance(err, ValueError):
            return say("error: ", str(err), EXIT_USER)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
