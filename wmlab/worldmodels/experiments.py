"""The paper's experiments as one command each (stages of ``wmlab worldmodels``).

- ``run``: collect -> V -> M -> C (in the dream or the real env) -> real-env evaluation against the
  random baselines with significance tests -> report. ``wm_env=dodge preset=cpu`` is the CPU learning
  result; ``wm_env=take_cover`` the paper's Doom experiment at ``temperature``; ``wm_env=car_racing`` the
  paper's CarRacing V+M+C trained in the real env.
- ``tau-sweep``: the paper's table 2: one controller trained in the dream per temperature in
  ``sweep.temperatures``, each scored in the real env and in the dream at its own temperature; writes
  ``<root>/tau_sweep.jsonl`` (and the rows of eval.jsonl that the report reads).
Every step resumes from its own files, so a re-run after a kill continues and a finished run only prints.
"""

from __future__ import annotations

import copy
import json
import time

from wmlab.worldmodels import stages
from wmlab.worldmodels.evaluate import append_jsonl, read_jsonl


def _latest_eval(cfg: dict, controller) -> dict | None:
    """The newest eval.jsonl row of ``controller`` made with these evaluation settings, if any."""
    e = cfg["evaluate"]
    for row in reversed(read_jsonl(stages.Layout(cfg["root"]).eval_results)):
        if (
            row.get("controller") == str(controller)
            and row.get("real", {}).get("n") == e["n_trials"]
            and row.get("seed") == cfg["seed"]
            and sorted(row.get("baselines") or {}) == sorted(e.get("baselines") or [])
            and sorted(float(t) for t in row.get("dream") or {}) == sorted(float(t) for t in row_taus(cfg))
        ):
            return row
    return None


def row_taus(cfg: dict) -> list[float]:
    from wmlab.worldmodels.envs import env_class

    has_done = env_class(cfg["wm_env"]["name"]).has_done and cfg["rnn"]["done_head"]
    return [float(t) for t in cfg["evaluate"]["temperatures"]] if has_done else []


def format_result(record: dict) -> list[str]:
    """Lines: the controller's real score, each baseline and the tests against it, dream scores."""
    real = record["real"]
    lines = [
        f"controller ({record.get('trained_in')}, τ={record.get('train_temperature')}) in the real "
        f"{record['wm_env']}: {real['mean']:.1f} ± {real['std']:.1f} (std over n={real['n']} episodes)"
    ]
    for name, b in (record.get("baselines") or {}).items():
        t = record["tests"][name]
        lines.append(
            f"  {name:15s} {b['mean']:7.1f} ± {b['std']:.1f} (n={b['n']})  [{b['label']}]  "
            f"Mann-Whitney U p={t['mann_whitney_p']:.2g}, Welch t={t['welch_t']:.2f} p={t['welch_p']:.2g}"
        )
    for tau, d in (record.get("dream") or {}).items():
        lines.append(f"  dream τ={tau}: {d['mean']:.1f} ± {d['std']:.1f} (n={d['n']} dreams)")
    return lines


def run(cfg: dict) -> dict:
    """The whole pipeline for one setting, then the real-env comparison and the report. -> eval record."""
    from wmlab.worldmodels.report import build_report

    timings = {}
    started = time.perf_counter()
    stages.collect(cfg)
    timings["collect"] = time.perf_counter() - started
    for name, fn in (("train-vae", stages.train_vae), ("train-rnn", stages.train_rnn)):
        t = time.perf_counter()
        fn(cfg)
        timings[name] = time.perf_counter() - t
    t = time.perf_counter()
    controller = stages.train_controller(cfg)
    timings["train-controller"] = time.perf_counter() - t
    t = time.perf_counter()
    record = _latest_eval(cfg, controller)
    if record is None:
        record = stages.evaluate(cfg, controller=controller, extra={"stage": "run"})
    timings["evaluate"] = time.perf_counter() - t
    from wmlab.runs import write_json

    layout = stages.Layout(cfg["root"])
    # stage times of this invocation (a resumed stage counts only what it still had to do)
    write_json(layout.root / "run.json", {"seconds": {k: round(v, 1) for k, v in timings.items()}})
    t = time.perf_counter()
    report = build_report(cfg)
    timings["report"] = time.perf_counter() - t
    record = {**record, "run_seconds": {k: round(v, 1) for k, v in timings.items()}, "report": str(report)}
    return record


def tau_sweep(cfg: dict) -> list[dict]:
    """Train C in the dream at each of ``sweep.temperatures``; score each in the real env and in the dream
    at its own temperature (the paper's table 2). Rows go to ``<root>/tau_sweep.jsonl``; -> the rows."""
    from wmlab.worldmodels.envs import env_class

    if not cfg["dream"] or not env_class(cfg["wm_env"]["name"]).has_done:
        raise ValueError(
            f"tau-sweep trains C in M's dream, which {cfg['wm_env']['name']} does not have (no done head); "
            "use wm_env=take_cover or dodge"
        )
    layout = stages.Layout(cfg["root"])
    path = layout.root / "tau_sweep.jsonl"
    stages.collect(cfg)
    stages.train_vae(cfg)
    stages.train_rnn(cfg)
    done = {float(r["temperature"]): r for r in read_jsonl(path)}
    rows = []
    for tau in cfg["sweep"]["temperatures"]:
        tau = float(tau)
        if tau in done:
            rows.append(done[tau])
            continue
        c = copy.deepcopy(cfg)
        c["temperature"] = tau
        c["evaluate"]["temperatures"] = [tau]
        c["evaluate"]["baselines"] = [] if rows or done else cfg["evaluate"]["baselines"]
        controller = stages.train_controller(c)
        record = stages.evaluate(c, controller=controller, extra={"stage": "tau-sweep"})
        row = {
            "temperature": tau,
            "real": {k: record["real"][k] for k in ("mean", "std", "n")},
            "dream": record["dream"][str(tau)],
            "baselines": {
                k: {f: b[f] for f in ("label", "mean", "std", "n")}
                for k, b in (record.get("baselines") or {}).items()
            },
            "controller": str(controller),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        append_jsonl(path, row)
        rows.append(row)
    return rows


def sweep_table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The paper's table 2 layout: temperature | virtual (dream) score | actual (real env) score."""
    header = ["temperature τ", "virtual score (dream)", "actual score (real env)"]
    out = []
    for r in sorted(rows, key=lambda r: r["temperature"]):
        d, a = r["dream"], r["real"]
        out.append(
            [
                f"{r['temperature']:g}",
                f"{d['mean']:.0f} ± {d['std']:.0f} (n={d['n']})",
                f"{a['mean']:.0f} ± {a['std']:.0f} (n={a['n']})",
            ]
        )
    for r in rows:
        for name, b in (r.get("baselines") or {}).items():
            out.append([f"{name} ({b['label']})", "n/a", f"{b['mean']:.0f} ± {b['std']:.0f} (n={b['n']})"])
    return header, out


def sweep_table(rows: list[dict]) -> list[str]:
    """Markdown lines of ``sweep_table_rows``."""
    header, body = sweep_table_rows(rows)
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in body
    ]


def stage_run(cfg: dict) -> None:
    record = run(cfg)
    print("\n".join(format_result(record)))
    print(json.dumps({"seconds": record["run_seconds"], "report": record["report"]}))


def stage_tau_sweep(cfg: dict) -> None:
    print("\n".join(sweep_table(tau_sweep(cfg))))
