"""benchmarks/train_throughput.py --tiny: the real training loop at reduced size prints one JSON object."""

from __future__ import annotations

import json
import runpy
import sys

from tests_paths import REPO_ROOT


def test_train_throughput_tiny_measures_every_variant(monkeypatch, capsys):
    argv = ["train_throughput.py", "--tiny", "--workers", "0,1", "--precisions", "fp32,auto"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPO_ROOT / "benchmarks" / "train_throughput.py"), run_name="__main__")
    out = json.loads(capsys.readouterr().out)
    assert out["tiny"] and out["setting"]["batch"] == 8 and out["setting"]["tokens"] == [16, 32]
    assert set(out["variants"]) == {f"workers={w},precision={p}" for w in (0, 1) for p in ("fp32", "auto")}
    for variant in out["variants"].values():
        assert all(v > 0 for v in variant["windows_per_second"].values())
    auto = out["variants"]["workers=0,precision=auto"]["precision"]
    assert (
        auto["requested"] == "auto"
        and auto["chosen"] in ("fp32", "bf16")
        and "bf16" in auto["speedup_over_fp32"]
    )
    best = out["best"]
    assert best["variant"] in out["variants"]
    assert best["vs_dino_wm"]["without_decoder"] == round(best["windows_per_second"] / 3.04, 2)
    assert best["vs_dino_wm"]["with_decoder"] == round(best["windows_per_second"] / 0.88, 2)
