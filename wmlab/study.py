"""The representation study (``wmlab study``): the same world model and planners over many encoders.

For each encoder: prepare it (train the in-domain ones, e.g. the ``vae``, on the dataset), build its
frozen-feature cache, then for each seed train the world model with identical settings, run the
diagnostics, and evaluate every planner on the same start/goal pairs under the same budget. The
random-policy and state-oracle baselines run once on those pairs. Results are written in long format
(one row per encoder x seed x planner x episode) and the report is built from them alone.

Layout of ``study_dir``::

    study.json                      settings, protocol, per-stage seconds and runs (accumulated)
    encoders/<encoder>/             in-domain encoder weights (vae)
    runs/<encoder>__seed<k>/        world-model run directories (resumable)
    cells/<encoder>__seed<k>__<planner>__<hash>/   each evaluation (key.json, study_cell.json,
                                    results.jsonl, summary.json, videos/)
    cells/baseline__<planner>__<hash>/
    cells/<encoder>__seed<k>__diagnostics.json   (with the key it was computed under)
    results/episodes.jsonl, diagnostics.jsonl, distances/, failures.jsonl
    videos/<encoder>__seed<k>__<planner>/*.gif
    report/report.md, report.html

Keys. A cell's directory name ends in the hash of its key (``cell_key``): the encoder and train
config, the seed, the planner and protocol (the plan config), the dataset fingerprint and the
trained run's identity (config fingerprint + weights sha256). A finished cell is reused only under
exactly that key; changed settings or retrained weights make a new cell, and ``merge`` reads only
the cells of the current keys (never a cell by its name alone). Diagnostics are keyed the same way.

Resuming and concurrency: every finished cell leaves its result file; a re-run skips it. A failing
cell (missing weights, NaN loss, ...) is recorded in ``failures.jsonl`` with its error and the
others go on. ``cell=<encoder>`` (or ``cell=<encoder>__seed<k>``) runs only that part, so a cluster
can run cells as separate jobs (see README); a final run without ``cell`` merges and reports. Each
``<encoder>__seed<k>`` unit (and the baselines) runs under a ``WriterLock``: one already being
computed by another live process is skipped and recorded with who holds it. ``study.json`` is
updated read-modify-write under its own short lock, so concurrent cell jobs never lose an update.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
import traceback
from pathlib import Path

from wmlab.integrity import (
    LockHeld,
    WriterLock,
    atomic_write_json,
    atomic_write_text,
    fingerprint,
    keyed_dir,
)
from wmlab.runs import read_json

BASELINE = "baseline"
#: Version of a study cell's key and layout; bump when a cell's meaning changes.
CELL_FORMAT = 2
#: Plan / train settings that do not change a cell's results (paths, display, resume switches).
_VOLATILE = ("out", "run_dir", "progress", "device", "overwrite", "n_videos", "chunk", "resume", "data",
             "data_root", "ckpt_base_path", "model_name", "plans_dir")  # fmt: skip
#: How long a study.json update waits for another cell job's update (each holds it for milliseconds).
INFO_LOCK_WAIT_S = 60.0


class Study:
    """One study directory and its settings (the resolved ``conf/study.yaml``)."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.dir = Path(cfg["study_dir"])
        self.dir.mkdir(parents=True, exist_ok=True)
        self.failures: list[dict] = []
        #: (encoder, seed, planner) -> the cell directory of its current key (filled as cells are keyed)
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
            "protocol": self.protocol,
            "train_overrides": list(cfg["train"]),
            "command": cfg.get("command") or "wmlab study",
        }

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

    def fail(self, encoder: str, seed, planner, stage: str, error: BaseException) -> None:
        row = {
            "encoder": encoder,
            "seed": seed,
            "planner": planner,
            "stage": stage,
            "error": f"{type(error).__name__}: {error}",
        }
        self.failures.append(row)
        print(f"study: {encoder} seed={seed} planner={planner} failed at {stage}: {row['error']}")
        log = self.dir / "logs"
        log.mkdir(exist_ok=True)
        with open(log / "failures.log", "a") as f:
            f.write(json.dumps(row) + "\n" + traceback.format_exc() + "\n")

    # ------------------------------------------------------------------ stages
    def dataset(self) -> Path:
        """The study's dataset; collected (resumably) when it does not exist yet."""
        from wmlab.data.store import TrajectoryStore

        data = Path(self.cfg["data"])
        c = self.cfg["collect"]
        if (data / "zarr.json").is_file() and len(TrajectoryStore(data)) >= int(c["n_episodes"]):
            return data
        from wmlab.data.collect import collect

        env = dict(self.cfg["env"])
        name = env.pop("name")
        self.timed(
            "collect", collect, out=data, env=name, n_episodes=int(c["n_episodes"]),
            episode_len=int(c["episode_len"]), policy="random", workers=int(c["workers"]),
            seed=int(c["seed"]), env_kwargs=env, progress=self.cfg["progress"],
            lock_wait=float(self.cfg.get("lock_wait", 0)),
        )  # fmt: skip
        return data

    def encoder_overrides(self, encoder: str, data: Path) -> list[str]:
        """Train-time overrides choosing ``encoder``, after preparing it when it learns in-domain."""
        overrides = [f"encoder={self.base_encoder(encoder)}", *self.cfg["encoder_overrides"].get(encoder, [])]
        if self.base_encoder(encoder) == "vae" and not any(
            o.startswith("encoder.weights=") for o in overrides
        ):
            overrides.append(f"encoder.weights={self.train_vae(encoder, data)}")
        return overrides

    def base_encoder(self, encoder: str) -> str:
        """Study keys may name variants (``pixels_pool2``); ``encoder_names`` maps them to encoders."""
        return self.cfg["encoder_names"].get(encoder, encoder)

    def train_vae(self, encoder: str, data: Path) -> Path:
        from wmlab.models.vae import train_vae

        out = self.dir / "encoders" / encoder
        if not (out / "vae.json").is_file():
            v = dict(self.cfg["vae"])
            self.timed(
                f"prepare:{encoder}",
                train_vae,
                data,
                out,
                device=self.cfg["device"],
                progress=self.cfg["progress"],
                **v,
            )
        return out

    def train_cfg(self, encoder: str, seed: int, data: Path) -> dict:
        from omegaconf import OmegaConf

        from wmlab.config import compose

        overrides = [
            *self.cfg["train"], *self.encoder_overrides(encoder, data), f"data={data}",
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

    def plan_cell(self, encoder: str, seed, planner: str, run_dir: Path | None, tcfg=None, run=None) -> None:
        """Evaluate one cell under its key: reuse it when finished under exactly that key."""
        from wmlab.evaluate import plan

        pcfg = self.plan_cfg(planner, self.dir / "cells" / "unkeyed", run_dir)
        key = self.cell_key(encoder, seed, planner, pcfg, tcfg, run)
        out = keyed_dir(self.dir / "cells", self.cell_label(encoder, seed, planner), key)
        self.cells[(encoder, seed, planner)] = out
        record = out / "study_cell.json"
        if (out / "summary.json").is_file() and record.is_file() and _same(_read_or_none(record), key):
            return
        pcfg["out"] = str(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(record, key)
        self.timed(f"plan:{encoder}:{planner}", plan, pcfg)

    def plan_cfg(self, planner: str, out: Path, run_dir: Path | None = None) -> dict:
        from omegaconf import OmegaConf

        from wmlab.config import compose

        shared = self.cfg["plan"]
        if planner in ("random", "oracle"):  # the model planners' settings do not apply to baselines
            shared = [o for o in shared if not o.lstrip("+~").startswith("planner.")]
        overrides = [f"planner={planner}", *shared, f"out={out}", f"device={self.cfg['device']}",
                     f"progress={self.cfg['progress']}"]  # fmt: skip
        if run_dir is not None:
            overrides.append(f"run_dir={run_dir}")
        cfg = OmegaConf.to_container(compose("plan", overrides), resolve=True)
        cfg["env"] = dict(self.cfg["env"])
        return cfg

    def train_finished(self, run_dir: Path, epochs: int) -> bool:
        from wmlab.runs import trained_epochs

        return trained_epochs(run_dir) >= epochs

    def run_encoder(self, encoder: str, data: Path, seeds: list[int]) -> None:
        try:
            cfgs = {seed: self.train_cfg(encoder, seed, data) for seed in seeds}
        except Exception as error:  # e.g. weights not found, unknown encoder: the other encoders go on
            self.fail(encoder, None, None, "prepare", error)
            return
        first = cfgs[seeds[0]]
        try:
            self.timed(f"encode:{encoder}", self.build_cache, first, data)
        except Exception as error:
            self.fail(encoder, None, None, "encode", error)
            return
        for seed, tcfg in cfgs.items():
            try:
                with WriterLock(self.unit_target(encoder, seed), "study cell"):
                    self.run_seed(encoder, seed, tcfg, data)
            except LockHeld as error:  # another cell job is computing it: skip, say who
                self.fail(encoder, seed, None, "busy", error)

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
        diag_key = {"kind": "study_diagnostics", "format": CELL_FORMAT, "run": run,
                    "diagnostics": self.cfg["diagnostics"], "data": self.data_fingerprint}  # fmt: skip
        self.diagnostics_keys[(encoder, seed)] = diag_key
        saved = (_read_or_none(diag_path) or {}) if diag_path.is_file() else {}
        if not _same(saved.get("key"), diag_key):
            try:
                row, distances = self.timed(f"diagnose:{encoder}", self.diagnose, run_dir, data)
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
        from wmlab.train import encoder_kwargs

        enc = tcfg["encoder"]
        encode_dataset(
            data, enc["name"], encoder_kwargs=encoder_kwargs(enc), weights=enc.get("weights"),
            token_pool=enc.get("token_pool", 1), batch_size=int(self.cfg["encode_batch_size"]),
            device=self.cfg["device"], progress=self.cfg["progress"],
            lock_wait=float(self.cfg.get("lock_wait", 0)),
        )  # fmt: skip

    def diagnose(self, run_dir: Path, data: Path):
        from wmlab.diagnostics import diagnose_run

        d = self.cfg["diagnostics"]
        device = "cuda" if self.cfg["device"] in ("auto", "cuda") and _cuda() else "cpu"
        return diagnose_run(run_dir, data=data, device=device, **d)

    def run_baselines(self) -> None:
        try:
            with WriterLock(self.unit_target(BASELINE, None), "study cell"):
                for baseline in self.cfg["baselines"]:
                    try:
                        self.plan_cell(BASELINE, None, baseline, None)
                    except Exception as error:
                        self.fail(BASELINE, None, baseline, "plan", error)
        except LockHeld as error:
            self.fail(BASELINE, None, None, "busy", error)

    # ------------------------------------------------------------------ results
    def merge(self) -> None:
        """Collect every finished cell into the long-format results files the report reads."""
        results = self.dir / "results"
        (results / "distances").mkdir(parents=True, exist_ok=True)
        episodes, diagnostics = [], []
        cells = [
            (e, s, p) for e in self.cfg["encoders"] for s in self.cfg["seeds"] for p in self.cfg["planners"]
        ]
        cells += [(BASELINE, None, b) for b in self.cfg["baselines"]]
        for encoder, seed, planner in cells:
            cell = self.cell_dir(encoder, seed, planner)  # only cells of the current keys
            if cell is None or not (cell / "summary.json").is_file():
                continue
            for line in (cell / "results.jsonl").read_text().splitlines():
                row = json.loads(line)
                episodes.append({"encoder": encoder, "seed": seed, "planner": planner, **row})
            videos = self.dir / "videos" / self.cell_label(encoder, seed, planner)
            if (cell / "videos").is_dir():
                shutil.rmtree(videos, ignore_errors=True)
                shutil.copytree(cell / "videos", videos)
        for encoder in self.cfg["encoders"]:
            for seed in self.cfg["seeds"]:
                path = self.diagnostics_path(encoder, seed)
                if not path.is_file():
                    continue
                saved = read_json(path)
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
        _write_jsonl(results / "failures.jsonl", self.failures)

    def training_losses(self, encoder: str, seed: int) -> dict:
        meta = self.run_dir(encoder, seed) / "metadata.json"
        history = read_json(meta).get("history", []) if meta.is_file() else []
        last = history[-1] if history else {}
        return {
            "val_loss": last.get("val_z_visual_loss"),
            "copy_last_loss": last.get("val_copy_last_visual_loss"),
        }

    def plan_time_per_step(self, encoder: str, seed: int):
        """Median seconds per plan call per episode of the first planner evaluated (MPC steps)."""
        for planner in self.cfg["planners"]:
            cell = self.cell_dir(encoder, seed, planner)
            if cell is not None and (cell / "summary.json").is_file():
                return read_json(cell / "summary.json").get("median_plan_seconds_per_episode")
        return None


def run_study(cfg: dict) -> Path:
    """Run (or resume) the study described by ``cfg``; returns the study directory."""
    study = Study(cfg)
    study.save_info()
    data = study.dataset()
    only = cfg.get("cell")
    for encoder in cfg["encoders"]:
        seeds = [int(s) for s in cfg["seeds"]]
        if only and only != encoder and not str(only).startswith(f"{encoder}__seed"):
            continue
        if only and str(only).startswith(f"{encoder}__seed"):
            seeds = [int(str(only).split("__seed")[1])]
        study.run_encoder(encoder, data, seeds)
    if not only or only == BASELINE:
        study.run_baselines()
    if only:
        return study.dir
    study.merge()
    if cfg.get("report", True):
        from wmlab.report.study_report import build_report

        study.timed("report", build_report, study.dir)
    return study.dir


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
