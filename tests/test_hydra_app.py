"""Every verb is a Hydra application (issue 14 item 1): sweeps, launchers, run/sweep dirs, the
``.hydra/`` snapshot, ``--cfg``/``--info``/``--help``/``--version``, user config dirs, shell completion,
unknown keys refused, and DINO-WM's ``ckpt_base_path`` / ``model_epoch``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wmlab.cli import main, run
from wmlab.config import ConfigError, compose


@pytest.fixture(autouse=True)
def hydra_root(tmp_path, monkeypatch):
    """Hydra's run records go under the test's tmp dir, never into the repository."""
    root = tmp_path / "hydra_root"
    monkeypatch.setenv("WMLAB_HYDRA_DIR", str(root))
    return root


def read_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def test_run_dir_snapshot_and_relative_paths(tiny_store, tmp_path, monkeypatch, hydra_root, capsys):
    monkeypatch.chdir(tmp_path)  # relative paths must mean the current directory (hydra.job.chdir=false)
    assert main(["show", f"data={tiny_store.path}", "out=shown", "n_episodes=1", "hydra.run.dir=rec"]) == 0
    assert (tmp_path / "shown" / "tiny_grid.png").is_file()
    record = tmp_path / "rec"
    assert read_yaml(record / ".hydra" / "overrides.yaml") == [
        f"data={tiny_store.path}", "out=shown", "n_episodes=1"
    ]  # fmt: skip
    assert read_yaml(record / ".hydra" / "config.yaml")["n_episodes"] == 1
    assert read_yaml(record / ".hydra" / "hydra.yaml")["hydra"]["job"]["name"] == "show"
    assert (record / "show.log").is_file()
    # without hydra.run.dir: outputs/hydra/<verb>/<date>/<time>/ under WMLAB_HYDRA_DIR (here: tmp)
    assert main(["show", f"data={tiny_store.path}", "out=shown", "n_episodes=1"]) == 0
    snapshots = list(hydra_root.glob("show/*/*/.hydra/config.yaml"))
    assert len(snapshots) == 1
    # a read-only query leaves nothing behind
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert main(["info", f"data={tiny_store.path}"]) == 0
    assert json.loads(capsys.readouterr().out)["episodes_complete"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_multirun_sweeps_a_verb_with_the_basic_launcher(tiny_store, tmp_path):
    sweep = tmp_path / "sweep"
    results = run(
        "show", "-m", f"data={tiny_store.path}", "n_episodes=1,2", "gif=false",
        f"out={tmp_path}/show_${{n_episodes}}", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert len(results) == 2
    assert (tmp_path / "show_1" / "tiny_grid.png").is_file() and (
        tmp_path / "show_2" / "tiny_grid.png"
    ).is_file()
    assert "n_episodes=1" in read_yaml(sweep / "0" / ".hydra" / "overrides.yaml")
    assert "n_episodes=2" in read_yaml(sweep / "1" / ".hydra" / "overrides.yaml")
    assert (sweep / "multirun.yaml").is_file()


def test_multirun_with_the_submitit_local_launcher(tmp_path):
    """``wmlab collect -m seed=0,1 hydra/launcher=submitit_local``: two jobs in their own processes."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    command = [
        sys.executable, "-m", "wmlab.cli", "collect", "-m", "seed=0,1", f"out={tmp_path}/pm_${{seed}}.zarr",
        "n_episodes=1", "episode_len=4", "img_size=16", "workers=1", "progress=false", "preview=false",
        "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in result.stdout + result.stderr
    from wmlab.data import open_dataset

    actions = [open_dataset(tmp_path / f"pm_{seed}.zarr").episode(0)["actions"] for seed in (0, 1)]
    assert actions[0].shape == actions[1].shape and (actions[0] != actions[1]).any()  # seeds applied
    assert list(sweep.glob(".submitit/*/*_result.pkl")) and (sweep / "1" / ".hydra" / "config.yaml").is_file()


def test_cfg_info_help_and_version(capsys):
    assert main(["collect", "--cfg", "job", "n_episodes=7"]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["n_episodes"] == 7 and "hydra" not in job
    assert main(["collect", "--cfg", "hydra"]) == 0
    hydra = yaml.safe_load(capsys.readouterr().out)["hydra"]
    assert hydra["job"]["chdir"] is False and "${oc.env:WMLAB_HYDRA_DIR" in hydra["run"]["dir"]
    info = subprocess.run(  # Hydra prints --info through its logger: read it as a user sees it
        [sys.executable, "-m", "wmlab.cli", "plan", "--info", "defaults"], capture_output=True, text=True
    )
    assert info.returncode == 0 and "| hydra_app " in info.stdout and "| planner/mpc_cem " in info.stdout
    assert main(["plan", "--help"]) == 0
    text = capsys.readouterr().out
    assert "# which checkpoint of a DINO-WM run" in text  # the YAML's comments, not a stripped dump
    assert "planner=mpc_cem   (choices:" in text and "-m, --multirun" in text
    assert main(["train", "encoder=dinov2_patch", "--help"]) == 0
    assert "encoder=dinov2_patch   (choices:" in capsys.readouterr().out  # the choice this line picks
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(f"  {v} " in usage for v in ("collect", "plan", "study", "worldmodels"))
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("wmlab ")
    assert main(["worldmodels", "train-vae", "--help"]) == 0
    assert "stages: collect, train-vae" in capsys.readouterr().out


def test_config_dir_and_config_name(tmp_path, capsys):
    (tmp_path / "mine.yaml").write_text("defaults:\n  - collect\n  - _self_\nn_episodes: 3\n")
    assert main(["collect", "--config-dir", str(tmp_path), "--config-name", "mine", "--cfg", "job"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["n_episodes"] == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", "+model_epch=3"], "nothing would read it"),  # once accepted and ignored
        (["plan", "+model_epoch=3"], "give it without '+': model_epoch=3"),
        (["plan", "~seed"], "removes 'seed'"),
        (["plan", "-m", "+n_evalz=1,2"], "not a setting of 'plan'; did you mean ['n_evals'"),
    ],
)
def test_unknown_keys_are_refused(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_config_groups_can_still_be_added_and_the_study_refuses_unknown_keys_too(capsys):
    assert main(["study", "+preset=cpu", "--cfg", "job"]) == 0  # a config group, not a stray key
    assert yaml.safe_load(capsys.readouterr().out)["img_size"] == 64
    with pytest.raises(ConfigError, match="nothing would read it"):
        compose("train", ["+trainig.epochs=3"])  # what the study composes for its cells


def test_dino_wm_ckpt_base_path_and_model_epoch():
    plan = compose("plan", ["ckpt_base_path=/ckpt", "model_name=pm"])
    assert plan.run_dir == "/ckpt/outputs/pm" and plan.model_epoch == "latest"
    assert compose("plan", ["model_name=pm", "run_dir=/elsewhere"]).run_dir == "/elsewhere"
    assert compose("plan", []).run_dir is None  # baselines: no model
    assert compose("plan", ["model_epoch=3"]).model_epoch == 3
    assert compose("train", ["ckpt_base_path=/ckpt", "model_name=m"]).run_dir == "/ckpt/outputs/m"
    assert Path(compose("train", []).run_dir).parts[0] == "outputs"  # default unchanged: ./outputs/<name>


def test_shell_completion(monkeypatch, capsys):
    monkeypatch.setenv("COMP_LINE", "wmlab tr")
    assert main(["-sc", "query=bash"]) == 0
    assert capsys.readouterr().out.split() == ["train-tokenizer", "train", "train-decoder"]
    monkeypatch.setenv("COMP_LINE", "wmlab collect n_ep")
    assert main(["-sc", "query=bash"]) == 0
    assert capsys.readouterr().out.split() == ["n_episodes="]
    monkeypatch.setenv("COMP_LINE", "wmlab plan planner=mpc_")
    assert main(["-sc", "query=bash"]) == 0
    assert "planner=mpc_cem" in capsys.readouterr().out.split()
    assert main(["-sc", "install=bash"]) == 0
    assert "hydra_bash_completion" in capsys.readouterr().out
    assert os.environ["COMP_LINE"] == "wmlab plan planner=mpc_"


def test_a_failed_single_run_prints_exactly_one_line(tmp_path, capsys):
    """Hydra's "Error executing job with overrides" line would repeat the command before our error."""
    assert main(["collect", "policy=randm", f"out={tmp_path / 'd.zarr'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["wmlab collect: error: unknown policy 'randm'; known policies: random"]
    with pytest.raises(Exception, match="unknown policy"):  # from Python the error is raised, not printed
        run("collect", "policy=randm", f"out={tmp_path / 'd.zarr'}")
    assert not (tmp_path / "d.zarr").exists()


def test_non_finite_losses_are_one_line_user_errors(capsys):
    from wmlab.cli import main_guarded
    from wmlab.integrity import NonFiniteError

    def diverge():
        raise NonFiniteError("VAE loss became nan at step 3; lower lr= and re-run")

    assert main_guarded("worldmodels train-vae", diverge) == 1
    assert (
        capsys.readouterr().err
        == "wmlab worldmodels train-vae: error: VAE loss became nan at step 3; lower lr= and re-run\n"
    )
    assert issubclass(NonFiniteError, FloatingPointError)  # callers catching FloatingPointError still do


def test_keys_of_free_form_mappings_can_be_added(capsys):
    """encoder_overrides / encoder_names are empty mappings whose keys the user names."""
    assert main(["study", "+encoder_overrides.pixels=['encoder.patch_size=8']", "+encoder_names.px=pixels",
                 "--cfg", "job"]) == 0  # fmt: skip
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["encoder_overrides"] == {"pixels": ["encoder.patch_size=8"]} and cfg["encoder_names"] == {
        "px": "pixels"
    }
    assert (
        main(["study", "+encoder_overridez.pixels=1"]) == 2
    )  # a typo of the mapping itself is still refused
    # ... and where a preset already fills them (the demo names its pooled ViT), a variant can be added
    variant = ["+encoder_names.vae_noproprio=vae", "+encoder_overrides.vae_noproprio=['proprio=false']"]
    assert main(["demo", *variant, "--cfg", "job"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["encoder_names"] == {"random_vit_pool": "random_vit", "vae_noproprio": "vae"}
    assert cfg["encoder_overrides"]["vae_noproprio"] == ["proprio=false"]
