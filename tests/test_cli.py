"""The `wmlab` command at a tiny budget, as a user runs it, including bad input."""

from __future__ import annotations

import json
import subprocess
import sys

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
