"""The representation study (``wmlab study``): the same world model and planners over many encoders.

For each encoder: prepare it (train the in-domain ones, ``vae`` and ``dino_tok``, per seed), build its
frozen-feature cache, then for each seed train the world model with identical settings, run the
diagnostics (the probe scored on the validation episodes, which no in-domain encoder trained on),
and evaluate every planner on the same start/goal pairs under the same budget. The random-policy and
state-oracle baselines run on those pairs once per model planner, under that planner's protocol.
Results are written in long format (one row per encoder x seed x planner x episode) and the report
is built from them alone.

Layout of ``study_dir``::

    study.json                      settings, protocol, per-stage seconds and runs (accumulated)
    encoders/<encoder>__seed<k>__<hash>/   in-domain encoder weights (vae, dino_tok), one per seed, trained on
                                    the world model's training episodes only (keyed by settings, seed,
                                    episodes and dataset)
    runs/<encoder>__seed<k>/        world-model run directories (resumable)
    cells/<encoder>__seed<k>__<planner>__<hash>/   each evaluation (key.json, study_cell.json,
                                    results.jsonl, summary.json, videos/)
    cells/baseline__<baseline>@<planner>__<hash>/   each baseline under each model planner's protocol
                                    (``for_planner``; ``baseline__<baseline>__<hash>`` when plan has no
                                    such option)
    cells/<encoder>__seed<k>__diagnostics.json   (with the key it was computed under)
    failures/<unit>.jsonl           the failures of the latest attempt of each unit (collect, <encoder>,
                                    <encoder>__seed<k>, baseline), one JSON per failure
    results/episodes.jsonl, diagnostics.jsonl, distances/, failures.jsonl (merged)
    submitit/                       cluster runs: submitit's scripts and logs per stage, jobs.json
    videos/<encoder>__seed<k>__<planner>/*.gif
    report/report.md, report.html

Keys. A cell's directory name ends in the hash of its key (``cell_key``): the encoder and train
config, the seed, the planner and protocol (the plan config), the dataset fingerprint and the
trained run's identity (config fingerprint + weights sha256). A finished cell is reused only under
exactly that key; changed settings or retrained weights make a new cell, and ``merge`` reads only
the cells of the current keys (never a cell by its name alone). Diagnostics are keyed the same way.

Resuming and concurrency: every finished cell leaves its result file; a re-run skips it. A failing
cell (missing weights, NaN loss, ...) is recorded in ``failures/<unit>.jsonl`` (cell, stage, error type,
message, time; the traceback in ``logs/failures.log``) and the others go on; ``merge`` gathers them,
plus a "missing" row for every grid cell without a result and without a recorded failure (a job killed
by the scheduler leaves no Python error), into ``results/failures.jsonl``. ``cell=<encoder>`` (or
``cell=<encoder>__seed<k>``, ``cell=baseline``) runs only that part, so a cluster can run cells as
separate jobs; ``cell=merge`` (or ``merge_only=true``) only merges the finished cells of the current
keys and reports: it never trains, plans or builds an encoder. A ``cell`` that is not in the grid is
refused with the list of valid ones. Each ``<encoder>__seed<k>`` unit (and the baselines) runs under a
``WriterLock``: one already being computed by another live process is skipped and recorded with who
holds it. ``study.json`` is updated read-modify-write under its own short lock, so concurrent cell
jobs never lose an update.

On a cluster (``cluster.executor=slurm|local|auto``, or ``hydra/launcher=submitit_slurm|submitit_local``
on a single run) the same stages run as dependent submitit jobs: see ``wmlab.study_jobs``.
"""

from __future__ import annotations

import datetime
import functools
import json
import shutil
import time
import traceback
from pathlib import Path
from typing import NamedTuple

from wmlab.data.store import jsonable
from wmlab.integrity import (
    LockHeld,
    UserError,
    WriterLock,
    atomic_write_json,
    atomic_write_text,
    fingerprint,
    keyed_dir,
)
from wmlab.runs import read_json, versions

BASELINE = "baseline"
#: ``cell=merge``: merge and report only (the same as ``merge_only=true``)
MERGE = "merge"
#: Version of a study cell's key and layout; bump when a cell's meaning changes.
CELL_FORMAT = 2
#: Plan / train settings that do not change a cell's results (paths, display, resume switches).
_VOLATILE = ("out", "run_dir", "progress", "device", "overwrite", "n_videos", "chunk", "resume", "data",
             "data_root", "ckpt_base_path", "model_name", "plans_dir")  # fmt: skip
#: How long a study.json update waits for another cell job's update (each holds it for milliseconds).
INFO_LOCK_WAIT_S = 60.0


class InDomain(NamedTuple):
    """An encoder the study trains itself, one per seed on its training episodes (``Study.train_in_domain``):
    its settings block in ``conf/study.yaml``, its key's kind, the JSON its training writes (with ``step``
    and ``steps``: finished when they are equal) and ``module:function`` of the trainer (called as
    ``trainer(data, out, seed=, episodes=, device=, progress=, **settings)``)."""

    settings: str
    kind: str
    marker: str
    trainer: str


#: base encoder -> how the study trains it in-domain (unless ``encoder.weights=`` is given)
IN_DOMAIN = {
    "vae": InDomain("vae", "study_vae", "vae.json", "wmlab.training.vae:train_vae"),
    "dino_tok": InDomain(
        "tokenizer", "study_tokenizer", "tokenizer.json", "wmlab.training.tokenizer:train_tokenizer"
    ),
}


class StudyError(UserError, ValueError):
    """A study setting that names nothing in the grid (``cell=pixel``), or a stage run out of order."""


class NotComputed(Exception):
    """Merge-only mode met something that would have to be computed (it is left out, never computed)."""


def grid_units(cfg: dict) -> list[str]:
    """Every valid ``cell=`` value of a study: each encoder, each ``<encoder>__seed<k>``, ``baseline``
    (when the study has baselines) and ``merge``."""
    units = []
    for encoder in cfg["encoders"]:
        units += [str(encoder), *(f"{encoder}__seed{int(s)}" for s in cfg["seeds"])]
    return [*units, *([BASELINE] if cfg["baselines"] else []), MERGE]


def check_cell(cfg: dict) -> None:
    """Refuse a ``cell=`` that is not in the grid (a typo once ran nothing and exited 0)."""
    only = cfg.get("cell")
    if only in (None, ""):
        return
    units = grid_units(cfg)
    if str(only) not in units:
        import difflib

        close = difflib.get_close_matches(str(only), units, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise StudyError(f"cell={only} is not in the study's grid{hint}; valid cells: {', '.join(units)}")


@functools.cache
def plan_has_for_planner() -> bool:
    """Whether ``wmlab plan`` takes ``for_planner=`` (then each baseline runs under every model planner's
    protocol, tagged; otherwise once, under the plan defaults' MPC protocol, untagged, as before)."""
    from wmlab.config import _default_keys

    return "for_planner" in _default_keys("plan")


class Study:
    """One study directory and its settings (the resolved ``conf/study.yaml``).

    ``merge_only``: key and merge finished cells only; anything that would need computing (a VAE not
    trained yet, a run not finished) is left out of the results and reported as missing.
    """

    def __init__(self, cfg: dict, *, merge_only: bool = False, prepared: bool = False) -> None:
        self.cfg = cfg
        self.merge_only = merge_only
        #: a cluster cell job: in-domain encoders must have been trained by the encoder's cache job
        self.prepared = prepared
        self.dir = Path(cfg["study_dir"])
        self.dir.mkdir(parents=True, exist_ok=True)
        #: failures seen by this process (``busy`` ones are kept here only: they are not the unit's own)
        self.failures: list[dict] = []
        #: (encoder, seed, planner) -> the cell directory of its current key (filled as cells are keyed);
        #: baseline cells are (BASELINE, None, "<baseline>@<planner>") or (BASELINE, None, "<baseline>")
        self.cells: dict[tuple, Path] = {}
        #: (encoder, seed) -> the key its diagnostics must have been computed under
        self.diagnostics_keys: dict[tuple, dict] = {}

    # ------------------------------------------------------------------ bookkeeping
    @property
    def info(self) -> dict:
        """``study.json`` as it is on disk now (other cell jobs may have updated it)."""
        path = self.dir / "study.json"
        return read_json(path) if path.is_file() else {}

    def update_info(self, change) -> dict:
        """Read ``study.json``, apply ``change(info)``, write it back atomically, all under its lock:
        concurrent cell jobs serialise their updates and none is lost."""
        path = self.dir / "study.json"
        with WriterLock(path, "study file", wait=INFO_LOCK_WAIT_S, poll=0.02):
            info = read_json(path) if path.is_file() else {}
            change(info)
            atomic_write_json(path, info)
        return info

    def timed(self, stage: str, fn, *args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - started

            def add(info: dict) -> None:
                seconds, runs = info.setdefault("stage_seconds", {}), info.setdefault("stage_runs", {})
                seconds[stage] = seconds.get(stage, 0.0) + elapsed
                runs[stage] = runs.get(stage, 0) + 1

            self.update_info(add)

    def save_info(self) -> None:
        cfg = self.cfg
        settings = {
            "env": cfg["env"]["name"],
            "env_settings": cfg["env"],
            "data": str(cfg["data"]),
            "encoders": list(cfg["encoders"]),
            "seeds": list(cfg["seeds"]),
            "planners": list(cfg["planners"]),
            "baselines": list(cfg["baselines"]),
            "baselines_for_planner": self.baselines_per_planner,
            "protocol": self.protocol,
            "train_overrides": list(cfg["train"]),
            "command": cfg.get("command") or "wmlab study",
            "config": jsonable(cfg),  # the full resolved study config, for the report's appendix
            "versions": versions(),
        }
        if cfg.get("contrasts"):  # the four-factor section's contrasts (the report's defaults otherwise)
            settings["contrasts"] = [dict(c) for c in cfg["contrasts"]]

        def change(info: dict) -> None:
            info.update(settings)
            info.setdefault("stage_seconds", {})

        self.update_info(change)

    @functools.cached_property
    def protocol(self) -> dict:
        """The evaluation protocol every cell shares (composed once: ``save_info`` runs after each stage)."""
        plan = self.plan_cfg((self.cfg["planners"] or ["mpc_cem"])[0], self.dir / "unused")
        return {k: plan[k] for k in ("max_steps", "max_iter", "goal_source", "goal_H", "n_evals", "seed")} | {
            "objective": plan["objective"]
        }

    @staticmethod
    def unit_of(encoder: str, seed) -> str:
        """The unit a failure belongs to: ``collect``, ``<encoder>`` (prepare/encode), ``<encoder>__seed<k>``
        or ``baseline`` (what one cell job runs)."""
        if encoder == BASELINE:
            return BASELINE
        return str(encoder) if seed is None else f"{encoder}__seed{seed}"

    def failures_path(self, unit: str) -> Path:
        return self.dir / "failures" / f"{unit}.jsonl"

    def reset_failures(self, unit: str) -> None:
        """A new attempt of ``unit``: its failures of an earlier attempt no longer hold."""
        self.failures_path(unit).unlink(missing_ok=True)

    def fail(
        self, encoder: str, seed, planner, stage: str, error: BaseException, *, own: bool = True
    ) -> None:
        """Record one failure: printed, appended to ``failures/<unit>.jsonl`` (``own=False`` for a unit
        skipped because another job holds it: not that unit's failure) and to ``logs/failures.log``
        with its traceback."""
        unit = self.unit_of(encoder, seed)
        row = {
            "cell": self.cell_label(encoder, seed, planner) if planner else unit,
            "encoder": encoder,
            "seed": seed,
            "planner": planner,
            "stage": stage,
            "error_type": type(error).__name__,
            "message": str(error),
            "error": f"{type(error).__name__}: {error}",
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        self.failures.append(row)
        print(f"study: {encoder} seed={seed} planner={planner} failed at {stage}: {row['error']}")
        if own:
            path = self.failures_path(unit)
            path.parent.mkdir(parents=True, exist_ok=True)
            with WriterLock(path, "study failures", wait=INFO_LOCK_WAIT_S, poll=0.02):
                previous = path.read_text() if path.is_file() else ""
                atomic_write_text(path, previous + json.dumps(row) + "\n")
        log = self.dir / "logs"
        log.mkdir(exist_ok=True)
        with open(log / "failures.log", "a") as f:
            f.write(json.dumps(row) + "\n" + traceback.format_exc() + "\n")

    # ------------------------------------------------------------------ stages
    def dataset_complete(self) -> bool:
        """Whether the study's dataset holds its ``collect.n_episodes`` episodes already."""
        from wmlab.data.store import TrajectoryStore

        data = Path(self.cfg["data"])
        return (data / "zarr.json").is_file() and len(TrajectoryStore(data)) >= int(
            self.cfg["collect"]["n_episodes"]
        )

    def dataset(self, *, collect: bool = True) -> Path:
        """The study's dataset; collected (resumably) when it does not exist yet (``collect=False``: a
        cluster stage after the collect job, which refuses an incomplete dataset instead)."""
        data = Path(self.cfg["data"])
        c = self.cfg["collect"]
        if self.dataset_complete():
            return data
        if not collect:
            raise StudyError(
                f"dataset {data} is missing or incomplete (< {c['n_episodes']} episodes): the collect stage "
                "did not finish; run `wmlab study ... cell=` jobs only after it (see the collect job's log)"
            )
        from wmlab.data.collect import collect as collect_episodes

        env = dict(self.cfg["env"])
        name = env.pop("name")
        self.timed(
            "collect", collect_episodes, out=data, env=name, n_episodes=int(c["n_episodes"]),
            episode_len=int(c["episode_len"]), policy="random", workers=int(c["workers"]),
            seed=int(c["seed"]), env_kwargs=env, progress=self.cfg["progress"],
            lock_wait=float(self.cfg.get("lock_wait", 0)),
        )  # fmt: skip
        return data

    def encoder_overrides(self, encoder: str, data: Path, seed: int) -> list[str]:
        """Train-time overrides choosing ``encoder``, after preparing it when it learns in-domain (the
        VAE, the DINO-Tok tokenizer: one per seed, on the training episodes only; ``IN_DOMAIN``) and has
        no ``encoder.weights=`` override."""
        overrides = [f"encoder={self.base_encoder(encoder)}", *self.cfg["encoder_overrides"].get(encoder, [])]
        if self.base_encoder(encoder) in IN_DOMAIN and not any(
            o.startswith("encoder.weights=") for o in overrides
        ):
            overrides.append(f"encoder.weights={self.train_in_domain(encoder, seed, data)}")
        return overrides

    def base_encoder(self, encoder: str) -> str:
        """Study keys may name variants (``pixels_pool2``); ``encoder_names`` maps them to encoders."""
        return self.cfg["encoder_names"].get(encoder, encoder)

    @functools.cached_property
    def split(self) -> tuple[list[int], list[int]]:
        """(training, validation) episode ids of the study's world models (``split_ratio``/``split_seed``
        of its train settings): in-domain encoders train on the first only, the probe scores the second."""
        from omegaconf import OmegaConf

        from wmlab.config import compose
        from wmlab.data.store import TrajectoryStore
        from wmlab.data.windows import split_episodes

        cfg = OmegaConf.to_container(compose("train", [*self.cfg["train"], f"data={self.cfg['data']}"]))
        train, val = split_episodes(
            TrajectoryStore(self.cfg["data"]).committed, float(cfg["split_ratio"]), int(cfg["split_seed"])
        )
        return sorted(int(e) for e in train), sorted(int(e) for e in val)

    def in_domain_dir(self, encoder: str, seed: int) -> Path:
        """Where the in-domain weights of ``encoder`` (``IN_DOMAIN``) for ``seed`` live, under the key of
        what they are trained from: the settings block, the seed, the training episodes, the dataset."""
        spec = IN_DOMAIN[self.base_encoder(encoder)]
        key = {"kind": spec.kind, spec.settings: dict(self.cfg.get(spec.settings) or {}), "seed": int(seed),
               "episodes": self.split[0], "data": self.data_fingerprint}  # fmt: skip
        return keyed_dir(self.dir / "encoders", f"{encoder}__seed{seed}", key)

    vae_dir = tokenizer_dir = in_domain_dir

    def train_in_domain(self, encoder: str, seed: int, data: Path) -> Path:
        """Train ``encoder``'s in-domain weights for ``seed`` on the training episodes only (once: a
        finished directory of the same key is reused); merge-only and cluster cell jobs never train."""
        import importlib

        spec = IN_DOMAIN[self.base_encoder(encoder)]
        out = self.in_domain_dir(encoder, seed)
        saved = _read_or_none(out / spec.marker) if (out / spec.marker).is_file() else None
        # Written at every save: finished only at its last step (an interrupted one resumes).
        if not (saved and int(saved.get("step", 0)) >= int(saved.get("steps", 1))):
            if self.merge_only:
                raise NotComputed(f"{out} is not trained")
            if self.prepared:
                raise StudyError(
                    f"{out} is not trained: the cache job of '{encoder}' did not finish (see its log under "
                    f"the study's submitit/cache/); re-run it with `wmlab study ... cell={encoder}`"
                )
            module, name = spec.trainer.split(":")
            train = getattr(importlib.import_module(module), name)  # looked up now (tests replace it)
            self.timed(
                f"prepare:{encoder}", train, data, out, device=self.cfg["device"],
                progress=self.cfg["progress"], seed=int(seed), episodes=self.split[0],
                **dict(self.cfg.get(spec.settings) or {}),
            )  # fmt: skip
        return out

    def train_cfg(self, encoder: str, seed: int, data: Path) -> dict:
        from omegaconf import OmegaConf

        from wmlab.config import compose

        overrides = [
            *self.cfg["train"], *self.encoder_overrides(encoder, data, seed), f"data={data}",
            f"training.seed={seed}", f"run_dir={self.run_dir(encoder, seed)}", f"device={self.cfg['device']}",
            f"progress={self.cfg['progress']}",
        ]  # fmt: skip
        cfg = OmegaConf.to_container(compose("train", overrides), resolve=True)
        cfg["env"] = dict(self.cfg["env"])  # recorded in the run: the env its frames came from
        return cfg

    def run_dir(self, encoder: str, seed: int) -> Path:
        return self.dir / "runs" / f"{encoder}__seed{seed}"

    @staticmethod
    def cell_label(encoder: str, seed, planner: str) -> str:
        """The readable part of a cell's name (also its videos/ folder): never its key on its own."""
        return f"{encoder}__seed{seed}__{planner}" if encoder != BASELINE else f"{BASELINE}__{planner}"

    def cell_dir(self, encoder: str, seed, planner: str) -> Path | None:
        """The directory of the cell's *current* key (None until this invocation has keyed it)."""
        return self.cells.get((encoder, seed, planner))

    def unit_target(self, encoder: str, seed) -> Path:
        """What a cell job locks while it trains / diagnoses / plans one encoder x seed (or baselines)."""
        return self.dir / "cells" / (f"{encoder}__seed{seed}" if encoder != BASELINE else BASELINE)

    @functools.cached_property
    def data_fingerprint(self) -> str:
        from wmlab.data import open_dataset

        return open_dataset(self.cfg["data"]).fingerprint()

    def cell_key(self, encoder: str, seed, planner: str, pcfg: dict, tcfg=None, run=None) -> dict:
        """Everything a cell's results depend on: the encoder and train config, the seed, the planner
        and protocol (plan config), the dataset and the trained run's identity (weights hash)."""
        return {
            "kind": "study_cell",
            "format": CELL_FORMAT,
            "encoder": encoder,
            "encoder_config": tcfg["encoder"] if tcfg else None,
            "train": _settings(tcfg) if tcfg else None,
            "seed": seed,
            "planner": planner,
            "plan": _settings(pcfg),
            "data": self.data_fingerprint,
            "run": run,
        }

    # ------------------------------------------------------------------ baselines under each protocol
    @property
    def baselines_per_planner(self) -> bool:
        return plan_has_for_planner()

    def baseline_cells(self) -> list[tuple[str, str | None, str]]:
        """(cell name, baseline, for_planner) of every baseline cell: ``random@cem`` per model planner."""
        if not self.baselines_per_planner or not self.cfg["planners"]:
            return [(b, b, None) for b in self.cfg["baselines"]]
        return [(f"{b}@{p}", b, p) for b in self.cfg["baselines"] for p in self.cfg["planners"]]

    # ------------------------------------------------------------------ keys
    def key_cell(self, encoder: str, seed, planner: str, run_dir: Path | None, tcfg=None, run=None):
        """Key one cell (recorded in ``self.cells``): returns (cell directory, key, plan config)."""
        if encoder == BASELINE:
            _, baseline, for_planner = next(c for c in self.baseline_cells() if c[0] == planner)
            pcfg = self.plan_cfg(baseline, self.dir / "cells" / "unkeyed", for_planner=for_planner)
        else:
            pcfg = self.plan_cfg(planner, self.dir / "cells" / "unkeyed", run_dir)
        key = self.cell_key(encoder, seed, planner, pcfg, tcfg, run)
        out = keyed_dir(self.dir / "cells", self.cell_label(encoder, seed, planner), key)
        self.cells[(encoder, seed, planner)] = out
        return out, key, pcfg

    def diagnostics_key(self, encoder: str, seed: int, run: dict, tcfg: dict) -> dict:
        key = {"kind": "study_diagnostics", "format": CELL_FORMAT, "run": run,
               "diagnostics": self.cfg["diagnostics"], "heldout_episodes": self.heldout(tcfg),
               "data": self.data_fingerprint}  # fmt: skip
        self.diagnostics_keys[(encoder, seed)] = key
        return key

    def heldout(self, tcfg: dict) -> list[int]:
        """The run's validation episodes: neither its world model nor an in-domain encoder trained on them."""
        from wmlab.data.store import TrajectoryStore
        from wmlab.data.windows import split_episodes

        committed = TrajectoryStore(self.cfg["data"]).committed
        _, val = split_episodes(committed, float(tcfg["split_ratio"]), int(tcfg["split_seed"]))
        return sorted(int(e) for e in val)

    def key_cells(self) -> None:
        """Key every grid cell not keyed yet (finished work only: nothing is trained, planned or loaded
        but configs and the runs' identities, i.e. weight-file hashes), so ``merge`` reads exactly the
        cells of the current keys whichever process computed them."""
        data = Path(self.cfg["data"])
        was, self.merge_only = self.merge_only, True
        try:
            for encoder in self.cfg["encoders"]:
                for seed in (int(s) for s in self.cfg["seeds"]):
                    todo = [p for p in self.cfg["planners"] if (encoder, seed, p) not in self.cells]
                    if not todo and (encoder, seed) in self.diagnostics_keys:
                        continue
                    self._key_seed(encoder, seed, data, todo)
            for name, _, _ in self.baseline_cells():
                if (BASELINE, None, name) not in self.cells:
                    try:
                        self.key_cell(BASELINE, None, name, None)
                    except Exception:
                        continue
        finally:
            self.merge_only = was

    def _key_seed(self, encoder: str, seed: int, data: Path, planners: list[str]) -> None:
        from wmlab.runs import run_identity

        try:
            tcfg = self.train_cfg(encoder, seed, data)
            run_dir = Path(tcfg["run_dir"])
            if not self.train_finished(run_dir, int(tcfg["training"]["epochs"])):
                return
            run = run_identity(run_dir)
        except Exception:
            return
        self.diagnostics_key(encoder, seed, run, tcfg)
        for planner in planners:
            try:
                self.key_cell(encoder, seed, planner, run_dir, tcfg, run)
            except Exception:
                continue

    # ------------------------------------------------------------------ computing
    def plan_cell(self, encoder: str, seed, planner: str, run_dir: Path | None, tcfg=None, run=None) -> None:
        """Evaluate one cell under its key: reuse it when finished under exactly that key."""
        from wmlab.evaluate import plan

        out, key, pcfg = self.key_cell(encoder, seed, planner, run_dir, tcfg, run)
        record = out / "study_cell.json"
        if (out / "summary.json").is_file() and record.is_file() and _same(_read_or_none(record), key):
            return
        pcfg["out"] = str(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(record, key)
        self.timed(f"plan:{encoder}:{planner}", plan, pcfg)

    def plan_cfg(
        self, planner: str, out: Path, run_dir: Path | None = None, *, for_planner: str | None = None
    ) -> dict:
        from omegaconf import OmegaConf

        from wmlab.config import compose

        shared = self.cfg["plan"]
        if planner in ("random", "oracle"):  # the model planners' settings do not apply to baselines
            shared = [o for o in shared if not o.lstrip("+~").startswith("planner.")]
        overrides = [f"planner={planner}", *shared, f"out={out}", f"device={self.cfg['device']}",
                     f"progress={self.cfg['progress']}"]  # fmt: skip
        if for_planner is not None:  # the baseline runs under that model planner's protocol
            overrides.append(f"for_planner={for_planner}")
        if run_dir is not None:
            overrides.append(f"run_dir={run_dir}")
        cfg = OmegaConf.to_container(compose("plan", overrides), resolve=True)
        cfg["env"] = dict(self.cfg["env"])
        return cfg

    def train_finished(self, run_dir: Path, epochs: int) -> bool:
        from wmlab.runs import trained_epochs

        return trained_epochs(run_dir) >= epochs

    def prepare_encoder(
        self, encoder: str, data: Path, seeds: list[int], unit_seed: int | None = None
    ) -> dict[int, dict] | None:
        """Prepare ``encoder`` for ``seeds`` (in-domain training, one per seed) and build its feature
        caches (one per distinct encoder config: a frozen encoder's is shared by every seed). Returns
        the train config per seed, or None after recording the failure: under the encoder's unit, or
        under ``<encoder>__seed<unit_seed>`` for one cell's job (which leaves the encoder's record alone)."""
        if unit_seed is None:
            self.reset_failures(self.unit_of(encoder, None))
        try:
            cfgs = {seed: self.train_cfg(encoder, seed, data) for seed in seeds}
        except Exception as error:  # e.g. weights not found, unknown encoder: the other encoders go on
            self.fail(encoder, unit_seed, None, "prepare", error)
            return None
        built: set[str] = set()
        for tcfg in cfgs.values():
            which = fingerprint(tcfg["encoder"], 16)
            if which in built:
                continue
            try:
                self.timed(f"encode:{encoder}", self.build_cache, tcfg, data)
            except Exception as error:
                self.fail(encoder, unit_seed, None, "encode", error)
                return None
            built.add(which)
        return cfgs

    def run_encoder(self, encoder: str, data: Path, seeds: list[int], unit_seed: int | None = None) -> None:
        if unit_seed is not None:
            self.reset_failures(self.unit_of(encoder, unit_seed))
        cfgs = self.prepare_encoder(encoder, data, seeds, unit_seed)
        if cfgs is None:
            return
        for seed, tcfg in cfgs.items():
            try:
                with WriterLock(self.unit_target(encoder, seed), "study cell"):
                    self.reset_failures(self.unit_of(encoder, seed))
                    self.run_seed(encoder, seed, tcfg, data)
            except LockHeld as error:  # another cell job is computing it: skip, say who
                self.fail(encoder, seed, None, "busy", error, own=False)

    def run_seed(self, encoder: str, seed: int, tcfg: dict, data: Path) -> None:
        """Train (resumably), diagnose and plan one encoder x seed; each result keyed."""
        from wmlab.runs import run_identity
        from wmlab.train import train

        run_dir = Path(tcfg["run_dir"])
        try:
            if not self.train_finished(run_dir, int(tcfg["training"]["epochs"])):
                self.timed(f"train:{encoder}", train, tcfg)
            run = run_identity(run_dir)
        except Exception as error:
            self.fail(encoder, seed, None, "train", error)
            return
        diag_path = self.diagnostics_path(encoder, seed)
        diag_key = self.diagnostics_key(encoder, seed, run, tcfg)
        saved = (_read_or_none(diag_path) or {}) if diag_path.is_file() else {}
        if not _same(saved.get("key"), diag_key):
            try:
                row, distances = self.timed(
                    f"diagnose:{encoder}", self.diagnose, run_dir, data, diag_key["heldout_episodes"]
                )
                diag_path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(diag_path, {"key": diag_key, "row": row, "distances": distances})
            except Exception as error:
                self.fail(encoder, seed, None, "diagnostics", error)
        for planner in self.cfg["planners"]:
            try:
                self.plan_cell(encoder, seed, planner, run_dir, tcfg, run)
            except Exception as error:
                self.fail(encoder, seed, planner, "plan", error)

    def diagnostics_path(self, encoder: str, seed: int) -> Path:
        return self.dir / "cells" / f"{encoder}__seed{seed}__diagnostics.json"

    def build_cache(self, tcfg: dict, data: Path) -> None:
        """Encode the dataset once for this encoder (frozen encoders only; training then reads it)."""
        from wmlab.data.feature_cache import encode_dataset
        from wmlab.runs import encoder_kwargs

        enc = tcfg["encoder"]
        encode_dataset(
            data, enc["name"], encoder_kwargs=encoder_kwargs(enc), weights=enc.get("weights"),
            token_pool=enc.get("token_pool", 1), batch_size=int(self.cfg["encode_batch_size"]),
            device=self.cfg["device"], progress=self.cfg["progress"],
            lock_wait=float(self.cfg.get("lock_wait", 0)),
        )  # fmt: skip

    def diagnose(self, run_dir: Path, data: Path, heldout=None):
        from wmlab.diagnostics import diagnose_run

        d = self.cfg["diagnostics"]
        device = "cuda" if self.cfg["device"] in ("auto", "cuda") and _cuda() else "cpu"
        return diagnose_run(run_dir, data=data, device=device, heldout_episodes=heldout, **d)

    def run_baselines(self) -> None:
        try:
            with WriterLock(self.unit_target(BASELINE, None), "study cell"):
                self.reset_failures(BASELINE)
                for name, _, _ in self.baseline_cells():
                    try:
                        self.plan_cell(BASELINE, None, name, None)
                    except Exception as error:
                        self.fail(BASELINE, None, name, "plan", error)
        except LockHeld as error:
            self.fail(BASELINE, None, None, "busy", error, own=False)

    # ------------------------------------------------------------------ results
    def grid(self) -> list[tuple]:
        """Every (encoder, seed, planner) cell of the study, baselines as (BASELINE, None, name)."""
        cells = [
            (e, int(s), p)
            for e in self.cfg["encoders"]
            for s in self.cfg["seeds"]
            for p in self.cfg["planners"]
        ]
        return cells + [(BASELINE, None, name) for name, _, _ in self.baseline_cells()]

    def merge(self) -> None:
        """Collect every finished cell of the current keys into the long-format results files the report
        reads (cells computed by other jobs are keyed here first; nothing is computed)."""
        self.key_cells()
        results = self.dir / "results"
        (results / "distances").mkdir(parents=True, exist_ok=True)
        episodes, diagnostics, missing = [], [], []
        tags = {name: (baseline, for_planner) for name, baseline, for_planner in self.baseline_cells()}
        for encoder, seed, planner in self.grid():
            cell = self.cell_dir(encoder, seed, planner)  # only cells of the current keys
            if cell is None or not (cell / "summary.json").is_file():
                missing.append((encoder, seed, planner))
                continue
            extra = {"planner": planner}
            if encoder == BASELINE:
                baseline, for_planner = tags[planner]
                extra = {"planner": baseline, **({"for_planner": for_planner} if for_planner else {})}
            for line in (cell / "results.jsonl").read_text().splitlines():
                row = json.loads(line)
                episodes.append({"encoder": encoder, "seed": seed, **row, **extra})
            for kind in ("videos", "imagined"):  # GIFs; decoded imagined vs real rollouts (wmlab.imagined)
                target = self.dir / kind / self.cell_label(encoder, seed, planner)
                if (cell / kind).is_dir():
                    shutil.rmtree(target, ignore_errors=True)
                    shutil.copytree(cell / kind, target)
        for encoder in self.cfg["encoders"]:
            for seed in (int(s) for s in self.cfg["seeds"]):
                path = self.diagnostics_path(encoder, seed)
                if not path.is_file():
                    continue
                saved = _read_or_none(path) or {}
                if not _same(saved.get("key"), self.diagnostics_keys.get((encoder, seed))):
                    continue  # computed under other settings or weights: not this study's result
                row = {
                    **saved["row"],
                    "encoder": encoder,
                    "seed": seed,
                    **self.training_losses(encoder, seed),
                }
                row["plan_time_per_step_s"] = self.plan_time_per_step(encoder, seed)
                diagnostics.append(row)
                atomic_write_json(results / "distances" / f"{encoder}__seed{seed}.json", saved["distances"])
        _write_jsonl(results / "episodes.jsonl", episodes)
        _write_jsonl(results / "diagnostics.jsonl", diagnostics)
        _write_jsonl(results / "failures.jsonl", self.merged_failures(missing))

    def recorded_failures(self) -> list[dict]:
        """The failures of the latest attempt of every unit of the grid (from ``failures/``)."""
        rows = []
        for unit in ["collect", *grid_units(self.cfg)]:
            path = self.failures_path(unit)
            if path.is_file():
                rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return rows

    def merged_failures(self, missing: list[tuple]) -> list[dict]:
        """Recorded failures, this process's ``busy`` skips, and a ``missing`` row for each cell without a
        result that no failure explains (e.g. a job killed for time or memory)."""
        rows = self.recorded_failures()
        # A cell job repeats its encoder's failed preparation (the cache job's): listed once, as in-process.
        encoder_level = {(r["encoder"], r["stage"], r["error"]) for r in rows if r["seed"] is None}
        # ... and a cell job finding no in-domain weights because that preparation failed says only that.
        unprepared = {r["encoder"] for r in rows if r["seed"] is None and r["stage"] == "prepare"}
        rows = [
            r
            for r in rows
            if r["seed"] is None
            or (
                (r["encoder"], r["stage"], r["error"]) not in encoder_level
                and not (r["stage"] == "prepare" and r["encoder"] in unprepared)
            )
        ]
        rows += [f for f in self.failures if f["stage"] == "busy" and f not in rows]
        explained = {(r["encoder"], r["seed"], r["planner"]) for r in rows} | {
            (r["encoder"], r["seed"]) for r in rows if r["planner"] is None
        }
        explained |= {r["encoder"] for r in rows if r["seed"] is None and r["planner"] is None}
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for encoder, seed, planner in missing:
            if (encoder, seed, planner) in explained or (encoder, seed) in explained or encoder in explained:
                continue
            message = (
                f"no finished result under the current key ({self.cell_label(encoder, seed, planner)}); "
                f"its job did not finish (see logs/ and submitit/ in {self.dir}) or has not run yet"
            )
            rows.append({"cell": self.cell_label(encoder, seed, planner), "encoder": encoder, "seed": seed,
                         "planner": planner, "stage": "missing", "error_type": "NoResult", "message": message,
                         "error": f"NoResult: {message}", "time": now})  # fmt: skip
        return rows

    def training_losses(self, encoder: str, seed: int) -> dict:
        meta = self.run_dir(encoder, seed) / "metadata.json"
        history = read_json(meta).get("history", []) if meta.is_file() else []
        last = history[-1] if history else {}
        keep = ("epoch", "train_loss", "val_z_visual_loss", "val_copy_last_visual_loss")
        return {
            "val_loss": last.get("val_z_visual_loss"),
            "copy_last_loss": last.get("val_copy_last_visual_loss"),
            # per epoch, for the report's training curves
            "loss_history": [{k: h[k] for k in keep if k in h} for h in history],
        }

    def plan_time_per_step(self, encoder: str, seed: int):
        """Median seconds per plan call per episode of the first planner evaluated (MPC steps)."""
        for planner in self.cfg["planners"]:
            cell = self.cell_dir(encoder, seed, planner)
            if cell is not None and (cell / "summary.json").is_file():
                return read_json(cell / "summary.json").get("median_plan_seconds_per_episode")
        return None


def run_study(cfg: dict) -> Path:
    """Run (or resume) the study described by ``cfg``; returns the study directory.

    ``cfg["cell"]`` runs one unit (see ``grid_units``); ``cell=merge`` or ``merge_only`` merges and reports
    only. With ``cluster.executor`` set (or a submitit ``hydra/launcher`` on a single run) the stages are
    submitted as dependent jobs instead (``wmlab.study_jobs.submit_study``).
    """
    from wmlab import study_jobs

    check_cell(cfg)
    only = cfg.get("cell")
    merge_only = bool(cfg.get("merge_only")) or only == MERGE
    cluster = study_jobs.executor_kind(cfg)
    if cluster is not None and not only and not merge_only:
        return study_jobs.submit_study(cfg, cluster)
    study = Study(cfg, merge_only=merge_only)
    study.save_info()
    if merge_only:
        return merge_and_report(study)
    data = study.dataset()
    for encoder in cfg["encoders"]:
        seeds, unit_seed = [int(s) for s in cfg["seeds"]], None
        if only and only != encoder and not str(only).startswith(f"{encoder}__seed"):
            continue
        if only and str(only).startswith(f"{encoder}__seed"):
            unit_seed = int(str(only).split("__seed")[1])
            seeds = [unit_seed]
        study.run_encoder(encoder, data, seeds, unit_seed)
    if not only or only == BASELINE:
        study.run_baselines()
    if only:
        return study.dir
    return merge_and_report(study)


def merge_and_report(study: Study) -> Path:
    study.merge()
    if study.cfg.get("report", True):
        from wmlab.report.study_report import build_report

        study.timed("report", build_report, study.dir)
    return study.dir


def run_stage(cfg: dict, stage: str, unit: str | None = None) -> dict:
    """One stage of the study's job graph (what each submitit job runs; see ``wmlab.study_jobs``):

    - ``collect``: the dataset (once).
    - ``cache``: ``unit`` = an encoder: its in-domain training (per seed) and feature cache(s).
    - ``cell``: ``unit`` = ``<encoder>__seed<k>`` or ``baseline``: train, diagnose, plan (never collects).
    - ``merge``: merge the finished cells and report (never computes).
    Returns {"stage", "unit", "failures": [...]} (the failures this job recorded).
    """
    cfg = {**cfg, "cluster": {**dict(cfg.get("cluster") or {}), "executor": None}}
    if stage == "merge":
        study = Study(cfg, merge_only=True)
        study.save_info()
        merge_and_report(study)
        return {"stage": stage, "unit": None, "failures": study.failures}
    study = Study(cfg, prepared=stage == "cell")
    if stage == "collect":
        study.reset_failures("collect")
        study.save_info()
        try:
            study.dataset()
        except Exception as error:
            study.fail("collect", None, None, "collect", error)
            raise
    elif stage == "cache":
        check_cell({**cfg, "cell": unit})
        try:
            data = study.dataset(collect=False)
        except StudyError as error:
            study.reset_failures(str(unit))
            study.fail(str(unit), None, None, "prepare", error)
            raise
        if study.prepare_encoder(str(unit), data, [int(s) for s in cfg["seeds"]]) is None:
            raise StudyError(f"{unit}: preparing the encoder failed (see {study.failures_path(str(unit))})")
    elif stage == "cell":
        check_cell({**cfg, "cell": unit})
        if unit == BASELINE:
            study.run_baselines()
        else:
            encoder, seed = str(unit).rsplit("__seed", 1)
            try:
                data = study.dataset(collect=False)
            except StudyError as error:
                study.reset_failures(str(unit))
                study.fail(encoder, int(seed), None, "prepare", error)
                raise
            study.run_encoder(encoder, data, [int(seed)], int(seed))
    else:
        raise StudyError(f"unknown study stage '{stage}'; stages: collect, cache, cell, merge")
    return {"stage": stage, "unit": unit, "failures": study.failures}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _settings(cfg: dict) -> dict:
    """A composed config without the entries that do not change results (paths, display, resume)."""
    return {k: v for k, v in cfg.items() if k not in _VOLATILE}


def _read_or_none(path: Path):
    """A JSON record, or None when it is unreadable (then the cell is recomputed, never trusted)."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def _same(a, b) -> bool:
    return a is not None and b is not None and fingerprint(a, 64) == fingerprint(b, 64)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
