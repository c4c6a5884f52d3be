"""The study report: Wilson intervals, and a report built from a fake study directory."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from wmlab.report.study_report import build_report, format_rate, wilson_interval


def test_wilson_interval_known_values():
    assert wilson_interval(5, 10) == pytest.approx((0.236590, 0.763410), abs=1e-6)
    # At 0/n and n/n the interval has a closed form: the far end is z^2 / (n + z^2) from the edge.
    assert wilson_interval(0, 10) == pytest.approx((0.0, 3.8416 / 13.8416), abs=1e-9)
    assert wilson_interval(0, 10)[1] == pytest.approx(0.277540, abs=1e-6)
    assert wilson_interval(10, 10) == pytest.approx((10 / 13.8416, 1.0), abs=1e-9)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(45, 100, z=2.576)  # 99%
    assert lo < 0.45 < hi and hi - lo > wilson_interval(45, 100)[1] - wilson_interval(45, 100)[0]
    with pytest.raises(ValueError, match="successes <= n"):
        wilson_interval(11, 10)


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


#: Reached successes per (encoder, seed) out of 10 episodes each; "c" seed 1 failed in training.
REACHED = {("a", 0): 9, ("a", 1): 6, ("b", 0): 4, ("b", 1): 5, ("c", 0): 1}
PROBE = {"a": 0.9, "b": 0.6, "c": 0.2}


def _fake_study(root, *, optional=True):
    study = {
        "env": "point_maze",
        "encoders": ["a", "b", "c"],
        "seeds": [0, 1],
        "planners": ["cem"],
        "protocol": {"max_steps": 30, "goal_source": "random_state", "goal_H": 5, "n_evals": 10},
        "stage_seconds": {"collect": 60.0, "train": 3600.0, "plan": 1800.5},
        "command": "wmlab study preset=tiny",
    }
    (root / "study.json").write_text(json.dumps(study))
    episodes = []
    for (encoder, seed), reached in REACHED.items():
        for i in range(10):
            episodes.append(
                {
                    "encoder": encoder, "seed": seed, "planner": "cem", "episode": i, "start_seed": 100 + i,
                    "reached": i < reached, "final": i < reached - 1, "final_dist": 0.1 * i, "steps_used": 20,
                    "max_steps": 30, "plan_time_s": 0.5, "n_plans": 4,
                }
            )  # fmt: skip
    for planner, reached in (("random", 1), ("oracle", 10)):
        for i in range(10):
            episodes.append(
                {
                    "encoder": "baseline", "seed": 0, "planner": planner, "episode": i, "start_seed": 100 + i,
                    "reached": i < reached, "final": i < reached, "final_dist": 1.0, "steps_used": 30,
                    "max_steps": 30, "plan_time_s": 0.0, "n_plans": 0,
                }
            )  # fmt: skip
    _write_jsonl(root / "results" / "episodes.jsonl", episodes)
    if not optional:
        return
    diagnostics = [
        {
            "encoder": encoder,
            "seed": seed,
            "probe_r2": PROBE[encoder],
            "distance_spearman": PROBE[encoder] / 2,
            "nmse_by_horizon": [0.1 * (k + 1) / PROBE[encoder] for k in range(10)],
            "num_tokens": 16,
            "dim": 192,
            "bytes_per_frame": 6144,
            "encoder_images_per_s": 1000.0,
            "val_loss": 0.01,
            "copy_last_loss": 0.02,
            "plan_time_per_step_s": 0.25,
        }
        for encoder, seed in REACHED
    ]
    _write_jsonl(root / "results" / "diagnostics.jsonl", diagnostics)
    rng = np.random.default_rng(0)
    for encoder in ("a", "b"):  # none for "c": an optional file missing
        geodesic = rng.uniform(0, 5, 50)
        latent = geodesic * PROBE[encoder] + rng.normal(0, 0.5, 50)
        path = root / "results" / "distances" / f"{encoder}__seed0.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"latent": latent.tolist(), "geodesic": geodesic.tolist()}))
    _write_jsonl(
        root / "results" / "failures.jsonl",
        [
            {
                "encoder": "c",
                "seed": 1,
                "planner": None,
                "stage": "train",
                "error": "NaN loss at <epoch 3> | x",
            }
        ],
    )
    import imageio.v3 as iio

    frames = np.zeros((3, 16, 16, 3), np.uint8)
    frames[:, 4:8, 4:8] = [255, 0, 0]
    gif_dir = root / "videos" / "a__seed0__cem"
    gif_dir.mkdir(parents=True)
    iio.imwrite(gif_dir / "episode_000.gif", frames, duration=100, loop=0)


def _assert_self_contained(page: str):
    for attr in re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page):
        assert attr.startswith("data:"), attr[:80]
    assert not re.search(r"<(link|script)\b", page)
    assert "url(" not in page


def test_report_from_a_fake_study(tmp_path):
    _fake_study(tmp_path)
    written = build_report(tmp_path)
    assert {"markdown", "html", "success_plot", "nmse_plot", "scatter_plot"} <= set(written)
    for path in written.values():
        assert path.is_file() and path.stat().st_size > 0 and path.parent == tmp_path / "report"
    md = written["markdown"].read_text()
    page = written["html"].read_text()
    _assert_self_contained(page)
    assert page.count("data:image/png;base64,") == 3 and page.count("data:image/gif;base64,") == 1

    # Pooled over seeds: a reached 9 + 6 of 20, final 8 + 5; mean final distance 0.45.
    a_reached = format_rate(15, 20, wilson_interval(15, 20))
    assert a_reached == "75.0% [53.1, 88.8] (15/20)"
    row = next(line for line in md.splitlines() if line.startswith("| a | cem |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:6] == ["20 (2)", a_reached, format_rate(13, 20, wilson_interval(13, 20)), "0.450"]
    assert cells[6] == "0.900" and cells[8] == "0.111"  # probe R², NMSE@1 = 0.1 / 0.9
    c_row = next(line for line in md.splitlines() if line.startswith("| c | cem |"))
    assert "10 (1)" in c_row and format_rate(1, 10, wilson_interval(1, 10)) in c_row
    assert "| baseline | random (floor) | 10 (1) | 10.0% [1.8, 40.4] (1/10)" in md
    assert "oracle (ceiling) | 10 (1) | 100.0% [72.2, 100.0] (10/10)" in md
    # Success falls a > b > c exactly as the probe: rho = +1, said in words.
    assert "success (goal reached) rises strongly with Probe R² (Spearman ρ = +1.00;" in md
    assert "| a | 2 | 16 x 192 | 6,144 |" in md  # per-encoder diagnostics keep counts as integers
    assert (
        "NaN loss at &lt;epoch 3&gt;" in page
        and "| c | 1 | (all) | train | NaN loss at <epoch 3> \\| x |" in md
    )  # failure listed
    assert "neither results nor a recorded failure" not in md  # c seed 1 is accounted for by its failure
    assert "| max_steps | 30 |" in md and "| plan | 1,800.5 | 0.50 |" in md and "| total | 5,460.5 |" in md
    assert "../videos/a__seed0__cem/episode_000.gif" in md


def test_report_with_only_the_required_files(tmp_path):
    _fake_study(tmp_path, optional=False)
    written = build_report(tmp_path)
    assert set(written) == {"markdown", "html", "success_plot"}
    md = written["markdown"].read_text()
    assert "results/diagnostics.jsonl is missing" in md and "No videos." in md
    assert "| c | 1 | cem |" in md  # the cell with no rows and no recorded failure is listed
    _assert_self_contained(written["html"].read_text())


def test_report_errors_name_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"study\.json"):
        build_report(tmp_path)
    (tmp_path / "study.json").write_text(json.dumps({"env": "point_maze"}))
    with pytest.raises(FileNotFoundError, match=r"episodes\.jsonl"):
        build_report(tmp_path)
    _write_jsonl(tmp_path / "results" / "episodes.jsonl", [{"encoder": "a"}])
    with pytest.raises(ValueError, match=r"episodes\.jsonl:1 lacks keys"):
        build_report(tmp_path)
