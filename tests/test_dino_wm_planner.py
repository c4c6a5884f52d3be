"""benchmarks/dino_wm_planner.py at tiny size: DINO-WM's own CEM and wmlab's plan identically on the same
weights and draws. Needs a DINO-WM checkout in $DINO_WM_REPO and einops; skipped otherwise."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from tests_paths import REPO_ROOT

REPO = os.environ.get("DINO_WM_REPO")


@pytest.mark.skipif(
    not REPO or importlib.util.find_spec("einops") is None,
    reason="set DINO_WM_REPO to a checkout of github.com/gaoyuezhou/dino_wm (and pip install einops)",
)
def test_dino_wm_and_wmlab_cem_choose_the_same_plan():
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "dino_wm_planner.py"), "--dino-wm-repo", REPO,
         "--image-size", "56", "--samples", "6", "--opt-steps", "2", "--episodes", "2", "--repeats", "1"],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    (row,) = result["results"]
    # the same candidates cost the same on both sides (fp32 rounding), so CEM chooses the same plan
    assert row["episodes"] == 2 and row["max_relative_cost_difference"] < 1e-5
    assert row["plans_agree"] and row["max_abs_plan_difference"] < 1e-4
    assert row["dino_wm_seconds_per_plan"] > 0 and row["wmlab_seconds_per_plan"] > 0
