"""The study as submitit stages, merge-only mode, `cell=` validation, failures.jsonl, baselines per planner,
held-out episodes for the probe and per-seed in-domain encoders (issues 13 and 14)."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from tests.test_study import TINY_TRAIN, read_jsonl, study_cfg
from wmlab.study import BASELINE, Study, StudyError, grid_units, plan_has_for_planner, run_stage, run_study

#: Episode-row fields that are measurements of time, not results
_TIMING = ("seconds", "time", "_s", "wall", "throughput", "per_s")


def _results(rows: list[dict]) -> list[dict]:
    """Rows without timings, sorted: what must agree between two runs of the same study."""
    clean = [{k: v for k, v in r.items() if not any(t in k for t in _TIMING)} for r in rows]
    return sorted(clean, key=lambda r: json.dumps(r, sort_keys=True))


@pytest.fixture(scope="module")
def jobs_store(tiny_store, tmp_path_factory):
    from wmlab.data.store import TrajectoryStore

    copy = tmp_path_factory.mktemp("jobs_data") / "tiny.zarr"
    shutil.copytree(tiny_store.path, copy)
    return TrajectoryStore(copy)


def two_cell_cfg(store, study_dir, **settings) -> dict:
    """Two encoders (two cells), dino_tok (no weights: fails at prepare) and the random baseline, one
    planner: four cell jobs at once."""
    cfg = study_cfg(store, study_dir, **{"encoders": ["pixels", "pixels_big", "dino_tok"], **settings})
    cfg["cluster"]["stages"] = {s: {"cpus": 1, "gpus": 0, "mem_gb": 2, "timeout_min": 10}
                                for s in ("collect", "cache", "cell", "merge")}  # fmt: skip
    return cfg


@pytest.fixture(scope="module")
def in_process(jobs_store, tmp_path_factory):
    study_dir = tmp_path_factory.mktemp("in_process")
    started = time.perf_counter()
    run_study(two_cell_cfg(jobs_store, study_dir))
    return study_dir, time.perf_counter() - started


def test_cell_not_in_the_grid_is_one_line_listing_the_valid_cells(jobs_store, tmp_path):
    cfg = two_cell_cfg(jobs_store, tmp_path / "s", cell="pixel")
    with pytest.raises(StudyError) as err:
        run_study(cfg)
    message = str(err.value)
    assert "\n" not in message and "cell=pixel is not in the study's grid" in message
    assert "did you mean 'pixels'" in message
    for unit in ("pixels", "pixels__seed0", "pixels_big__seed0", "baseline", "merge"):
        assert unit in message
    assert not (tmp_path / "s").exists()  # refused before anything was made
    assert grid_units(cfg) == [
        "pixels",
        "pixels__seed0",
        "pixels_big",
        "pixels_big__seed0",
        "dino_tok",
        "dino_tok__seed0",
        "baseline",
        "merge",
    ]


def test_cli_cell_typo_exits_1_with_one_line(jobs_store, tmp_path, capsys):
    from wmlab.cli import main

    code = main(["study", f"data={jobs_store.path}", f"study_dir={tmp_path / 's'}", "cell=pixel",
                 f"hydra.run.dir={tmp_path / 'h'}", "progress=false"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "cell=pixel is not in the study's grid" in err[0], err


def test_in_process_study_records_failures_and_tags_baselines(in_process):
    study_dir, _ = in_process
    episodes = read_jsonl(study_dir / "results" / "episodes.jsonl")
    baseline = [r for r in episodes if r["encoder"] == BASELINE]
    assert baseline and {r["planner"] for r in baseline} == {"random"}
    if not plan_has_for_planner():
        pytest.skip("wmlab plan has no for_planner option yet: baselines run once, untagged")
    assert {r["for_planner"] for r in baseline} == {"mpc_cem"}
    assert list((study_dir / "cells").glob("baseline__random@mpc_cem__*/summary.json"))
    assert json.loads((study_dir / "study.json").read_text())["baselines_for_planner"] is True


def test_probe_is_scored_on_the_world_models_validation_episodes(in_process, jobs_store):
    from wmlab.data.windows import split_episodes

    study_dir, _ = in_process
    rows = read_jsonl(study_dir / "results" / "diagnostics.jsonl")
    _, val = split_episodes(jobs_store.committed, 0.9, 42)  # train.yaml's split_ratio / split_seed
    assert rows and all(r["probe_split"] == "heldout" for r in rows)
    assert all(r["probe_test_episodes"] == len(val) for r in rows)
    for path in (study_dir / "cells").glob("*__diagnostics.json"):  # computed under exactly those episodes
        assert json.loads(path.read_text())["key"]["heldout_episodes"] == sorted(int(e) for e in val)


def test_local_submitit_stages_give_the_in_process_results(in_process, jobs_store, tmp_path):
    """CI's cluster test: 3 cache jobs -> 4 concurrent cell jobs -> merge, with submitit's local
    executor, reproduce the in-process run's merged results (timings aside), failures included."""
    reference, in_process_s = in_process
    started = time.perf_counter()
    cfg = two_cell_cfg(jobs_store, tmp_path)
    cfg["cluster"]["executor"] = "local"
    run_study(cfg)
    local_s = time.perf_counter() - started
    print(f"\nstudy wall time: in-process {in_process_s:.1f} s, submitit local {local_s:.1f} s")
    jobs = json.loads((tmp_path / "submitit" / "jobs.json").read_text())
    # the dataset exists: no collect job (it would only find it complete)
    assert [s["stage"] for s in jobs["stages"]] == ["cache", "cell", "merge"]
    assert jobs["stages"][1]["units"] == ["pixels__seed0", "pixels_big__seed0", "dino_tok__seed0", BASELINE]
    states = {(s["stage"], u): state for s in jobs["stages"] for u, state in zip(s["units"], s["states"])}
    assert states.pop(("cache", "dino_tok")).startswith("FAILED: ")  # no weights: its cache job fails
    assert set(states.values()) == {"COMPLETED"}, states  # ... and its cell job records why, and ends
    (failure,) = read_jsonl(tmp_path / "results" / "failures.jsonl")
    assert (failure["cell"], failure["stage"]) == ("dino_tok", "prepare") and "weights" in failure["message"]
    for name in ("episodes.jsonl", "diagnostics.jsonl", "failures.jsonl"):
        ours, theirs = (read_jsonl(d / "results" / name) for d in (tmp_path, reference))
        assert _results(ours) == _results(theirs), name
    assert (tmp_path / "report" / "report.html").is_file()
    info = json.loads((tmp_path / "study.json").read_text())
    assert any(k.startswith("train:") for k in info["stage_seconds"]) and "report" in info["stage_seconds"]


def test_merge_only_never_computes_nor_loads_an_encoder(in_process, jobs_store, monkeypatch):
    study_dir, _ = in_process
    before = read_jsonl(study_dir / "results" / "episodes.jsonl")

    def refuse(*args, **kwargs):
        raise AssertionError("merge-only computed something")

    import wmlab.data.feature_cache
    import wmlab.encoders
    import wmlab.evaluate
    import wmlab.train
    import wmlab.training.vae

    targets = [(wmlab.encoders, "make_encoder"), (wmlab.train, "train"), (wmlab.evaluate, "plan"),
               (wmlab.data.feature_cache, "encode_dataset"), (wmlab.training.vae, "train_vae")]  # fmt: skip
    for module, name in targets:
        monkeypatch.setattr(module, name, refuse)
    # A third encoder that has not run: merge-only leaves it out and reports it, never trains it.
    cfg = two_cell_cfg(jobs_store, study_dir, cell="merge")
    cfg["encoders"] = ["pixels", "pixels_big", "pixels_small"]
    cfg["encoder_names"] = {**cfg["encoder_names"], "pixels_small": "pixels"}
    run_study(cfg)
    assert _results(read_jsonl(study_dir / "results" / "episodes.jsonl")) == _results(before)
    missing = [f for f in read_jsonl(study_dir / "results" / "failures.jsonl") if f["stage"] == "missing"]
    assert [(f["encoder"], f["seed"], f["planner"]) for f in missing] == [("pixels_small", 0, "mpc_cem")]
    assert set(missing[0]) >= {"cell", "stage", "error_type", "message", "time"}
    assert not (study_dir / "runs" / "pixels_small__seed0").exists()


def test_a_cell_failure_is_in_failures_jsonl_and_cleared_by_a_good_rerun(jobs_store, tmp_path):
    bad = two_cell_cfg(
        jobs_store,
        tmp_path,
        encoders=["pixels"],
        baselines=[],
        train=[*TINY_TRAIN, "training.predictor_lr=-1"],
    )  # the train stage refuses lr < 0 with a UserError
    run_stage(bad, "cell", "pixels__seed0")
    (row,) = read_jsonl(tmp_path / "failures" / "pixels__seed0.jsonl")
    assert (row["cell"], row["stage"], row["error_type"]) == ("pixels__seed0", "train", "UserError")
    assert "training.predictor_lr=-1" in row["message"] and row["time"].endswith("+00:00")
    assert "Traceback" in (tmp_path / "logs" / "failures.log").read_text()  # kept, with the traceback
    run_stage({**bad, "cell": None}, "merge")
    assert [f["cell"] for f in read_jsonl(tmp_path / "results" / "failures.jsonl")] == ["pixels__seed0"]
    assert not (tmp_path / "runs").exists()  # refused before training started
    good = two_cell_cfg(jobs_store, tmp_path, encoders=["pixels"], baselines=[])
    run_stage(good, "cell", "pixels__seed0")
    assert not (tmp_path / "failures" / "pixels__seed0.jsonl").exists()
    run_stage(good, "merge")
    assert read_jsonl(tmp_path / "results" / "failures.jsonl") == []


def test_a_cell_job_never_collects(jobs_store, tmp_path):
    cfg = two_cell_cfg(jobs_store, tmp_path, encoders=["pixels"], baselines=[])
    cfg["data"] = str(tmp_path / "not_collected.zarr")
    with pytest.raises(StudyError, match="the collect stage did not finish"):
        run_stage(cfg, "cell", "pixels__seed0")
    assert not (tmp_path / "not_collected.zarr").exists()
    (row,) = read_jsonl(tmp_path / "failures" / "pixels__seed0.jsonl")
    assert row["stage"] == "prepare"


def test_vae_is_trained_per_seed_on_the_training_episodes_only(jobs_store, tmp_path, monkeypatch):
    import wmlab.training.vae as vae

    seen = []
    real = vae.FramePool

    def spy(data, episodes=None):
        seen.append(None if episodes is None else sorted(episodes))
        return real(data, episodes)

    monkeypatch.setattr(vae, "FramePool", spy)
    tiny_vae = {"z_dim": 4, "steps": 2, "batch_size": 4, "lr": 1e-3, "channels": [4, 4, 4, 4]}
    cfg = two_cell_cfg(jobs_store, tmp_path, encoders=["vae"], seeds=[0, 1], baselines=[], vae=tiny_vae)
    run_stage(cfg, "cache", "vae")
    study = Study(cfg)
    train, val = study.split
    dirs = [study.vae_dir("vae", s) for s in (0, 1)]
    assert dirs[0] != dirs[1] and all((d / "vae.safetensors").is_file() for d in dirs)
    assert seen == [train, train] and not set(train) & set(val)
    assert not list(tmp_path.glob("failures/*.jsonl"))


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """``sbatch`` and ``srun`` on PATH that only record: submitit's real SLURM executor writes its sbatch
    scripts and parses the job ids as on a cluster; nothing runs. Returns the scripts, in order."""
    import os
    import stat

    bin_dir, scripts = tmp_path / "fake_slurm_bin", tmp_path / "sbatch_scripts"
    bin_dir.mkdir()
    scripts.mkdir()
    (bin_dir / "sbatch").write_text(
        "#!/bin/sh\n"
        f'n=$(ls {scripts} | wc -l); n=$((n + 101)); cp "$1" {scripts}/$n.sh; echo "Submitted batch job $n"\n'
    )
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for name in ("sbatch", "srun"):
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return lambda: [p.read_text() for p in sorted(scripts.glob("*.sh"), key=lambda p: int(p.stem))]


def _sbatch(script: str, option: str) -> str | None:
    """The value of ``#SBATCH --<option>=...`` in a submission script (None when absent)."""
    for line in script.splitlines():
        if line.startswith(f"#SBATCH --{option}="):
            return line.split("=", 1)[1]
    return None


def test_slurm_submission_chains_the_stages_afterany(jobs_store, tmp_path, fake_slurm):
    cfg = two_cell_cfg(jobs_store, tmp_path)
    cfg["cluster"].update(
        executor="slurm", partition="gpu", account="lab", setup=["module load cuda"], array_parallelism=2
    )
    cfg["data"] = str(tmp_path / "to_collect.zarr")  # not collected yet: the graph starts with collect
    run_study(cfg)
    scripts = fake_slurm()
    names = [_sbatch(s, "job-name") for s in scripts]
    assert names == [f"wmlab-study-{n}" for n in ("collect", "cache", "cell", "merge")]
    assert [_sbatch(s, "dependency") for s in scripts] == [
        None,
        "afterany:101",
        "afterany:102",
        "afterany:103",
    ]
    # one job, then arrays over the 3 encoders and the 4 cells (at most 2 running at once), then one job
    assert [_sbatch(s, "array") for s in scripts] == [None, "0-2%2", "0-3%2", None]
    assert all(_sbatch(s, "partition") == "gpu" and _sbatch(s, "account") == "lab" for s in scripts)
    assert all("module load cuda" in s for s in scripts)
    assert _sbatch(scripts[2], "cpus-per-task") == "1" and _sbatch(scripts[2], "time") == "10"
    jobs = json.loads((tmp_path / "submitit" / "jobs.json").read_text())
    assert jobs["executor"] == "slurm" and "states" not in jobs["stages"][-1]
    assert [s["units"] for s in jobs["stages"]][1:3] == [
        ["pixels", "pixels_big", "dino_tok"],
        ["pixels__seed0", "pixels_big__seed0", "dino_tok__seed0", BASELINE],
    ]
    assert jobs["stages"][2]["job_ids"] == ["103_0", "103_1", "103_2", "103_3"]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "to_collect.zarr").exists()  # the jobs' work


def test_hydra_submitit_launcher_on_a_single_run_submits_the_stages(jobs_store, tmp_path, fake_slurm):
    """`wmlab study ... hydra/launcher=submitit_slurm` once was accepted and did nothing."""
    from wmlab.cli import run

    run("study", f"data={jobs_store.path}", f"study_dir={tmp_path / 's'}", "img_size=32",
        "collect.n_episodes=6", "encoders=[pixels]", "seeds=[0,1]", "baselines=[]", "progress=false",
        "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
        f"hydra.run.dir={tmp_path / 'h'}")  # fmt: skip
    scripts = fake_slurm()
    assert [_sbatch(s, "job-name") for s in scripts] == [
        f"wmlab-study-{n}" for n in ("cache", "cell", "merge")
    ]
    assert [_sbatch(s, "array") for s in scripts] == [None, "0-1%2", None]  # both cells at once
    assert all(_sbatch(s, "partition") == "gpu" for s in scripts)  # the launcher's partition
    assert _sbatch(scripts[1], "cpus-per-task") == "8"  # the study's own per-stage resources (study.yaml)


def test_the_demo_presets_record_their_contrasts_in_study_json(tmp_path):
    from omegaconf import OmegaConf

    from wmlab.config import compose

    for preset in ("cpu", "full"):
        cfg = OmegaConf.to_container(compose("demo", [f"preset={preset}", f"study_dir={tmp_path / preset}"]))
        Study(OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)).save_info()
        info = json.loads((tmp_path / preset / "study.json").read_text())
        assert info["contrasts"] == cfg["contrasts"] and len(info["contrasts"]) >= 3
        named = {e for c in info["contrasts"] for e in (c["a"], c["b"])}
        assert named - set(cfg["encoders"]) <= {"dino_tok"}  # dino_tok needs its own tokenizer first
