"""The study as dependent submitit jobs (``cluster.executor=slurm|local|auto``).

The grid runs as four stages, each a job (or a job array) that starts after the previous stage has
ended, whatever its outcome (``afterany``: every stage checks what it needs and records a failure in
``failures/<unit>.jsonl`` when it is missing, so the merge always runs and reports what failed)::

    collect                          the dataset, once
    cache    one job per encoder     in-domain training (VAE, DINO-Tok: one per seed) + feature cache(s)
    cell     an array over cells     <encoder>__seed<k> (train, diagnose, plan) and baseline
    merge                            merge the finished cells of the current keys + report; computes nothing

On SLURM the whole graph is submitted at once with ``--dependency=afterany:<ids>`` and this process
returns (``cluster.wait=true`` waits for the merge job). With submitit's local executor (one machine)
each stage's jobs run as concurrent processes and this process waits for them before submitting the
next stage. Every job runs ``wmlab.study.run_stage``, which is also what ``cell=...`` runs in-process,
so the results equal an in-process run's.

Resources per stage (``cluster.stages.<stage>``: cpus, gpus, mem_gb, timeout_min) and the SLURM
partition, account, qos, array parallelism and setup lines are config keys (``conf/study.yaml``).
On a single run, ``hydra/launcher=submitit_slurm`` (or ``submitit_local``) picks the executor too, with
the launcher's partition, account, qos, array_parallelism and setup where the study leaves them unset.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from wmlab.integrity import atomic_write_json
from wmlab.study import BASELINE, StudyError

#: The study's ``cluster.executor`` values (None: every stage in this process, the default).
EXECUTORS = ("local", "slurm", "auto")
#: Hydra launcher choice -> executor (the launcher itself only acts on multiruns)
HYDRA_LAUNCHERS = {"submitit_local": "local", "submitit_slurm": "slurm"}
#: Settings a submitit Hydra launcher may carry for the whole study (``hydra.launcher.<key>``)
_LAUNCHER_KEYS = ("partition", "account", "qos", "array_parallelism", "setup")


@dataclass
class Stage:
    """One stage of the graph: its jobs' units (None for a single job) and the stage it waits for."""

    name: str
    units: list
    after: str | None = None


def stage_graph(cfg: dict, *, collected: bool = False) -> list[Stage]:
    """The study's stages in order: collect -> cache (per encoder) -> cell (array) -> merge.
    ``collected``: the dataset is complete already, so there is no collect job (caches start at once)."""
    cells = [f"{e}__seed{int(s)}" for e in cfg["encoders"] for s in cfg["seeds"]]
    cells += [BASELINE] if cfg["baselines"] else []
    return [
        *([] if collected else [Stage("collect", [None])]),
        Stage("cache", [str(e) for e in cfg["encoders"]], after=None if collected else "collect"),
        Stage("cell", cells, after="cache"),
        Stage("merge", [None], after="cell"),
    ]


def executor_kind(cfg: dict) -> str | None:
    """``cluster.executor`` (local / slurm / auto), else the submitit Hydra launcher of a single run,
    else None (in-process). An unknown value is refused."""
    cluster = dict(cfg.get("cluster") or {})
    kind = cluster.get("executor")
    if kind in (None, "", "none", "null"):
        kind = _hydra_launcher()
        if kind is None:
            return None
        cfg["cluster"] = {**cluster, **_launcher_settings(cluster)}  # the launcher's partition, account, ...
    if kind not in EXECUTORS:
        raise StudyError(
            f"cluster.executor={kind} is not known; use one of: null (in-process), {', '.join(EXECUTORS)}"
        )
    return str(kind)


def _hydra_launcher() -> str | None:
    """The executor a submitit ``hydra/launcher`` choice asks for on a single (non-multirun) run."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:
        return None
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.RUN:  # a multirun's job is already launched by that launcher
        return None
    return HYDRA_LAUNCHERS.get(str(hc.runtime.choices.get("hydra/launcher")))


def _launcher_settings(cluster: dict) -> dict:
    """The submitit launcher's cluster-wide settings for the study keys it leaves unset."""
    from hydra.core.hydra_config import HydraConfig

    launcher = HydraConfig.get().launcher
    out = {}
    for key in _LAUNCHER_KEYS:
        value = launcher.get(key) if key in launcher else None
        if cluster.get(key) in (None, []) and value not in (None, []):
            out[key] = list(value) if key == "setup" else value
    return out


@dataclass
class StageJob:
    """What one submitit job runs (picklable: the config is a plain dict)."""

    cfg: dict
    stage: str
    unit: str | None = None
    threads: int | None = None

    def __call__(self) -> dict:
        if self.threads:  # the CPUs the scheduler gave this job, not every core of the node
            import torch

            torch.set_num_threads(int(self.threads))
        from wmlab.study import run_stage

        return run_stage(self.cfg, self.stage, self.unit)


@dataclass
class Submitted:
    """The jobs of one stage and their ids (``<array id>_<index>`` for array tasks on SLURM)."""

    stage: str
    units: list
    jobs: list = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return [str(j.job_id) for j in self.jobs]

    @property
    def dependency_ids(self) -> list[str]:
        """The ids a dependency names (an array once, by its array id)."""
        return sorted({i.split("_")[0] for i in self.ids})


def _executor(folder: Path, kind: str, stage: str, cluster: dict, after: Submitted | None):
    import submitit

    res = dict(cluster["stages"][stage])
    ex = submitit.AutoExecutor(folder=folder / stage, cluster=None if kind == "auto" else kind)
    params = {
        "name": f"wmlab-study-{stage}",
        "timeout_min": int(res["timeout_min"]),
        "cpus_per_task": int(res["cpus"]),
        "gpus_per_node": int(res["gpus"]),
        "mem_gb": float(res["mem_gb"]),
    }
    if ex.cluster == "slurm":
        extra = dict(cluster.get("additional_parameters") or {})
        if after is not None:  # afterany: the next stage starts whatever the outcome (it checks itself)
            extra["dependency"] = "afterany:" + ":".join(after.dependency_ids)
        slurm = {"partition": cluster.get("partition"), "account": cluster.get("account"),
                 "qos": cluster.get("qos"), "array_parallelism": cluster.get("array_parallelism"),
                 "setup": list(cluster.get("setup") or []) or None,
                 "additional_parameters": extra or None}  # fmt: skip
        params.update({f"slurm_{k}": v for k, v in slurm.items() if v is not None})
    ex.update_parameters(**params)
    return ex


def submit_study(cfg: dict, kind: str) -> Path:
    """Submit the study's stage graph with submitit; returns the study directory.

    ``kind``: ``local`` (submitit's local executor: this process waits for each stage before the next),
    ``slurm`` (the whole graph at once, chained by ``afterany`` dependencies) or ``auto`` (SLURM where
    ``sbatch`` exists, else local). ``jobs.json`` in ``cluster.folder`` lists every stage's job ids,
    units and (when waited for) states.
    """
    from wmlab.study import Study

    cluster = dict(cfg["cluster"])
    study_dir = Path(cfg["study_dir"]).absolute()
    folder = Path(cluster.get("folder") or study_dir / "submitit").absolute()
    # Jobs may start in another directory (sbatch): absolute paths; the stages run in-process in each job.
    inner = {
        **cfg, "study_dir": str(study_dir), "data": str(Path(cfg["data"]).absolute()), "cell": None,
        "merge_only": False, "cluster": {**cluster, "executor": None, "folder": str(folder)},
    }  # fmt: skip
    study = Study(inner)
    study.save_info()
    record: dict = {"executor": kind, "folder": str(folder), "stages": []}
    previous: Submitted | None = None
    scheduled = False  # True on SLURM: the scheduler holds each stage until the previous one ends
    for stage in stage_graph(inner, collected=study.dataset_complete()):
        threads = int(cluster["stages"][stage.name]["cpus"])
        ex = _executor(folder, kind, stage.name, cluster, previous)
        scheduled = ex.cluster == "slurm"
        submitted = Submitted(stage.name, stage.units)
        with ex.batch():  # one array per stage on SLURM
            for unit in stage.units:
                submitted.jobs.append(ex.submit(StageJob(inner, stage.name, unit, threads)))
        ids = ", ".join(submitted.ids)
        print(f"study: {stage.name} stage submitted ({len(submitted.jobs)} job(s): {ids})")
        entry = {"stage": stage.name, "units": stage.units, "job_ids": submitted.ids, "after": stage.after}
        if not scheduled:  # no scheduler to hold the next stage back: wait here (afterany: never raise)
            entry["states"] = [_wait(job) for job in submitted.jobs]
        record["stages"].append(entry)
        _save(folder, record)
        previous = submitted
    if scheduled:
        print(f"study: jobs submitted to SLURM; logs in {folder}/<stage>/; the merge job {previous.ids[0]} "
              f"writes {study_dir / 'report'} (or run `wmlab study ... cell=merge` later)")  # fmt: skip
        if cluster.get("wait"):
            record["stages"][-1]["states"] = [_wait(previous.jobs[0])]
            _save(folder, record)
    return study_dir


def _wait(job, poll_s: float = 0.2) -> str:
    """Wait for ``job``; its final state, with the error's last line when it failed."""
    while not job.done():  # submitit's own wait polls every second or more: stages would idle
        time.sleep(poll_s)
    error = job.exception()  # None when it completed
    if error is None:
        return "COMPLETED"
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"FAILED: {lines[-1] if lines else type(error).__name__}"


def _save(folder: Path, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "jobs.json", record)


def read_jobs(study_dir) -> dict:
    """The ``jobs.json`` of the study's last cluster submission ({} when none)."""
    path = Path(study_dir) / "submitit" / "jobs.json"
    return json.loads(path.read_text()) if path.is_file() else {}


__all__ = ["EXECUTORS", "Stage", "StageJob", "executor_kind", "read_jobs", "stage_graph", "submit_study"]
