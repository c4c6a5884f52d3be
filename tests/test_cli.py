"""The `wmlab` command at a tiny budget, as a user runs it, including bad input."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests_paths import DINO_WM_POINT_MAZE


def wmlab(*args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "wmlab.cli", *args], capture_output=True, text=True, timeout=300
    )
    if check and result.returncode != 0:
        raise AssertionError(f"wmlab {args} failed ({result.returncode}):\n{result.stderr}")
    return result


def test_help_lists_verbs():
    out = wmlab("--help").stdout
    for verb in ("collect", "convert", "export", "check-render", "show", "info"):
        assert verb in out


def test_collect_info_show(tmp_path):
    data = tmp_path / "pm.zarr"
    wmlab(
        "collect",
        f"out={data}",
        "n_episodes=3",
        "episode_len=12",
        "img_size=24",
        "workers=1",
        "progress=false",
        f"preview_dir={tmp_path / 'preview'}",
    )
    assert (tmp_path / "preview" / "pm_grid.png").is_file() and (tmp_path / "preview" / "pm.gif").is_file()
    info = json.loads(wmlab("info", f"data={data}").stdout)
    assert info["episodes_complete"] == 3 and info["metadata"]["render_size"] == [24, 24]
    shown = wmlab("show", f"data={data}", f"out={tmp_path / 'show'}", "n_episodes=2").stdout.split()
    assert [p.endswith(ext) for p, ext in zip(shown, ("_grid.png", ".gif"))] == [True, True]
    import imageio.v3 as iio

    grid = iio.imread(shown[0])
    assert grid.shape[0] == 2 * (24 + 4)  # two episodes, 2 px border around each frame


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("colect",), "Did you mean 'collect'"),
        (("collect", "env=point_mase"), "Available options in 'env'"),
        (("collect", "n_episode=3"), "did you mean ['n_episodes'"),
        (("info",), "Missing mandatory value: data"),
        (("info", "data=/no/such/dataset"), "does not exist"),
    ],
)
def test_bad_input_is_explained(args, message):
    result = wmlab(*args, check=False)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout


@pytest.mark.skipif(not DINO_WM_POINT_MAZE.is_dir(), reason="../shared/fixtures is absent")
def test_convert_and_export_round_trip(tmp_path):
    converted = tmp_path / "pm.zarr"
    wmlab("convert", f"data={DINO_WM_POINT_MAZE}", f"out={converted}", "progress=false")
    info = json.loads(wmlab("info", f"data={converted}").stdout)
    assert info["episodes_complete"] == 3 and info["steps"] == 6 + 4 + 5
    exported = tmp_path / "exported"
    wmlab("export", f"data={converted}", f"out={exported}")
    info = json.loads(wmlab("info", f"data={exported}").stdout)  # info reads DINO-WM folders directly
    assert info["steps"] == 15
    result = wmlab("export", f"data={converted}", f"out={exported}", check=False)
    assert result.returncode == 1 and "overwrite" in result.stderr


# ------------------------------------------------------- errors end in one line (issue 12 item 8)
def error_lines(stderr: str) -> list[str]:
    """What the user reads, minus Hydra's own 'Error executing job with overrides: [...]' line."""
    return [s for s in stderr.splitlines() if s.strip() and not s.startswith("Error executing job with")]


@pytest.fixture
def hydra_root(tmp_path, monkeypatch):
    monkeypatch.setenv("WMLAB_HYDRA_DIR", str(tmp_path / "hydra_root"))  # keep run records out of the repo


def _safetensors_error(tmp_path):
    from safetensors.torch import load_file

    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    load_file(bad)


def _yaml_error(tmp_path):
    import yaml

    yaml.safe_load("run: [1, 2\n")


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        ("training", 1, "the loss is NaN at epoch 3: lower training.predictor_lr"),
        ("lock", 1, "held by pid 1"),
        (FileNotFoundError(errno.ENOENT, "No such file", "/no/run"), 1, "no such file or directory: /no/run"),
        (OSError(errno.ENOSPC, "No space left", "/full/x.zarr"), 1, "disk full / over quota writing /full/x"),
        (OSError(errno.EROFS, "Read-only file system", "/ro/x"), 1, "read-only file system: /ro/x: choose a"),
        (PermissionError(errno.EACCES, "Permission denied", "/root/x"), 1, "permission denied: /root/x"),
        ("safetensors", 1, "a truncated or corrupt .safetensors?"),
        ("yaml", 1, "invalid YAML at line 2"),
        (ValueError("n_evals must be at least 1"), 1, "n_evals must be at least 1"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ],
)  # fmt: skip
def test_errors_a_user_can_cause_end_in_one_line(
    error, code, message, tmp_path, monkeypatch, capsys, hydra_root
):
    """Each class of error, raised inside a verb run through the CLI (the Hydra app, in-process)."""
    from wmlab import cli
    from wmlab.integrity import LockHeld
    from wmlab.train import TrainingError

    def raising(cfg):
        if error == "training":
            raise TrainingError("the loss is NaN at epoch 3: lower training.predictor_lr")
        if error == "lock":
            raise LockHeld("data/x.zarr is being written (lock held by pid 1 on host h since 10:00)")
        if error == "safetensors":
            _safetensors_error(tmp_path)
        if error == "yaml":
            _yaml_error(tmp_path)
        raise error

    monkeypatch.setitem(cli._HANDLERS, "info", raising)
    assert cli.main(["info", "data=x"]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("wmlab info: "), err


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # imageio's __del__ re-flushes
def test_real_disk_full_and_permission_errors_name_the_path(tiny_store, tmp_path, capsys, hydra_root):
    import gc

    from wmlab.cli import main

    full = tmp_path / "full"
    full.mkdir()
    (full / "tiny_grid.png").symlink_to("/dev/full")  # every write there fails with ENOSPC
    assert main(["show", f"data={tiny_store.path}", f"out={full}", "n_episodes=1"]) == 1
    lines = error_lines(capsys.readouterr().err)
    assert lines == [
        f"wmlab show: error: disk full / over quota writing {full / 'tiny_grid.png'}: free space there or "
        "choose another output (out=... / run_dir=... / study_dir=...)"
    ]
    gc.collect()  # the failed writer's file object, closed here rather than in a later test
    if os.access("/sys", os.W_OK) and not Path("/sys/class").is_dir():
        pytest.skip("no sysfs to refuse a write")
    assert main(["show", f"data={tiny_store.path}", "out=/sys/wmlab_test_out", "n_episodes=1"]) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "/sys/wmlab_test_out" in lines[0] and "writable" in lines[0], lines


def test_invalid_yaml_config_and_debug_traceback(tmp_path, capsys, monkeypatch, hydra_root):
    from wmlab.cli import main
    from wmlab.data.errors import DatasetError

    (tmp_path / "mine.yaml").write_text("defaults:\n  - collect\n  - _self_\nn_episodes: [1, 2\n")
    assert main(["collect", "--config-dir", str(tmp_path), "--config-name", "mine"]) == 1
    assert error_lines(capsys.readouterr().err) == [  # the file, the place, the problem
        f"wmlab collect: error: invalid YAML in {tmp_path / 'mine.yaml'} at line 5, column 1: expected ',' "
        "or ']', but got '<stream end>' (fix the file)"
    ]
    with pytest.raises(DatasetError):  # --debug: the full traceback, for a bug report
        main(["info", "data=/no/such/dataset", "--debug"])
    monkeypatch.setenv("WMLAB_DEBUG", "1")
    with pytest.raises(DatasetError):
        main(["info", "data=/no/such/dataset"])


def test_a_failing_sweep_job_fails_the_multirun(tiny_store, tmp_path, capsys, hydra_root):
    from wmlab.cli import main

    code = main(["info", "-m", f"data={tiny_store.path},/no/such/dataset", f"hydra.sweep.dir={tmp_path}/sw"])
    assert code == 1
    assert error_lines(capsys.readouterr().err)[-1].startswith(
        "wmlab info: error: no dataset at /no/such/dataset"
    )
