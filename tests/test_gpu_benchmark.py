"""benchmarks/gpu.py at reduced size on CPU (--tiny): every section runs and prints one JSON object."""

from __future__ import annotations

import json
import runpy
import sys
import time

from tests_paths import REPO_ROOT


def test_gpu_benchmark_tiny_runs_every_section_on_cpu(monkeypatch, capsys):
    """In-process (``python benchmarks/gpu.py --tiny`` without a second torch import)."""
    started = time.perf_counter()
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--tiny"])
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    runpy.run_path(str(REPO_ROOT / "benchmarks" / "gpu.py"), run_name="__main__")
    out = json.loads(capsys.readouterr().out)
    seconds = time.perf_counter() - started
    assert out["tiny"] and out["device"]["type"] == "cpu"
    assert set(out["device"]["matmul_peak_tflops"]) == {"fp32", "bf16"}
    for precision in ("fp32", "bf16"):
        train = out["training"][precision]
        assert train["windows_per_second"] > 0 and train["steps_timed"] >= 1
    plan = out["planning"]
    assert plan["sequences_per_plan"] == 3 * (8 * 2 + 1)  # episodes x (samples x opt_steps + final mean)
    assert plan["precision"]["requested"] == "auto" and plan["precision"]["chosen"] in ("fp32", "bf16")
    assert 1 <= plan["rows_per_rollout_call"] <= 3 * 8 and plan["seconds_per_episode"] > 0
    agreement = out["agreement"]
    assert agreement["episodes"] == 2 and agreement["max_relative_cost_difference"] >= 0
    assert out["attention"]["frames"]["max_abs_difference"] < 1e-4
    assert seconds < 60, f"--tiny took {seconds:.1f} s; it must stay small (target < 20 s)"
