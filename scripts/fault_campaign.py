"""Fault-injection campaign: kill, corrupt and double wmlab's writers; count what a user would get.

    python scripts/fault_campaign.py --out /tmp/wmlab_faults            # full campaign (~15-25 min)
    python scripts/fault_campaign.py --out /tmp/wmlab_faults --quick    # a few cases of each kind

Three kinds of fault, each through the real CLI (`python -m wmlab.cli <verb> ...`) on tiny data:

- **Kills.** Every write boundary a verb passes (``wmlab.integrity.fault_point``: before and after
  each atomic rename, logged by an uninterrupted run with ``WMLAB_FAULT_LOG``) and a few timed kills,
  each a SIGKILL of the whole process group, then the same command again. The result is compared with
  the uninterrupted run's: ``exact`` (bit-equal content), ``lost``, ``duplicated``, ``wrong``, or
  ``refused`` (the rerun failed; its message is recorded).
- **Corruption.** Every file kind of a dataset, a feature cache and a run directory gets a bit flip, a
  truncation and a deletion; a verb that reads it runs. ``clear`` (non-zero exit, a message and no
  traceback), ``traceback``, ``silent`` (exit 0 with a result that differs from the clean one) or
  ``harmless`` (exit 0, same result: the byte was not data, or the writer repaired it).
- **Concurrency.** Two writers of one dataset, feature cache, run directory and study at once:
  ``ok`` when one is refused with who holds the lock (or both serialise) and the result equals the
  single-writer one; otherwise ``lost``/``corrupt``.

Prints one JSON object (counts per kind and outcome) and writes every case to ``<out>/cases.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"),
}
ENV.pop("WMLAB_FAULT", None)
ENV.pop("WMLAB_FAULT_LOG", None)

COLLECT = [
    "n_episodes=6",
    "episode_len=20",
    "img_size=24",
    "workers=1",
    "progress=false",
    "preview=false",
    "seed=1",
]
ENCODE = ["encoder=pixels", "encoder.input_size=24", "encoder.patch_size=8", "progress=false", "device=cpu"]
TRAIN = [
    "encoder=pixels", "encoder.input_size=24", "encoder.patch_size=8", "predictor.depth=1",
    "predictor.heads=2", "predictor.dim_head=8", "predictor.mlp_dim=32", "frameskip=2", "num_hist=2",
    "training.batch_size=8",
    "training.max_steps_per_epoch=3", "training.val_batches=1", "training.rollout_eval_steps=2",
    "training.epochs=3", "progress=false", "device=cpu",
]  # fmt: skip


def wmlab(args: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``wmlab <args>`` in its own process group (so a kill takes its workers too)."""
    return subprocess.run(
        [PY, "-m", "wmlab.cli", *args], env=env or ENV, capture_output=True, text=True, timeout=timeout,
        start_new_session=True,
    )  # fmt: skip


def start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, "-m", "wmlab.cli", *args], env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip


def short(text: str, n: int = 300) -> str:
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


# ------------------------------------------------------------------------------- digests
def dataset_digest(path: Path) -> dict:
    """Per committed episode: sha256 of frames, actions, states and its seed; read through the store."""
    from wmlab.data.store import TrajectoryStore

    store = TrajectoryStore(path)
    episodes = {}
    for i in store.committed:
        ep = store.episode(int(i))
        h = hashlib.sha256()
        for name in ("frames", "actions", "states"):
            h.update(ep[name].tobytes())
        episodes[int(i)] = (h.hexdigest()[:16], int(ep["seed"]))
    return {"n_slots": store.n_slots, "episodes": episodes}


def cache_digest(dataset: Path) -> dict:
    from wmlab.data.feature_cache import FeatureCache, list_feature_caches

    out = {}
    for path in list_feature_caches(dataset):
        cache = FeatureCache(path)
        out[path.name] = {
            int(i): hashlib.sha256(cache.episode(int(i)).tobytes()).hexdigest()[:16] for i in cache.committed
        }
    return out


def run_digest(run_dir: Path) -> dict:
    """sha256 of the exported weights' tensors (not the file: metadata may hold times) and the epoch."""
    from safetensors.torch import load_file

    tensors = load_file(str(run_dir / "model.safetensors"))
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].numpy().tobytes())
    meta = json.loads((run_dir / "metadata.json").read_text())
    return {"weights": h.hexdigest()[:16], "epoch": meta.get("epoch")}


def classify_dataset(base: dict, got: dict) -> str:
    if got == base:
        return "exact"
    seen = [v[0] for v in got["episodes"].values()]
    if len(set(seen)) < len(seen):
        return "duplicated"
    if len(got["episodes"]) < len(base["episodes"]):
        return "lost"
    return "wrong"


# ------------------------------------------------------------------------------- scenarios
class Scenario:
    """One writer verb: how to prepare its inputs, run it, and digest its result."""

    name = "?"

    def __init__(self, root: Path) -> None:
        self.root = root

    def prepare(self, work: Path) -> None:  # inputs the verb reads
        pass

    def args(self, work: Path) -> list[str]:
        raise NotImplementedError

    def digest(self, work: Path):
        raise NotImplementedError

    def classify(self, base, got) -> str:
        return "exact" if got == base else "wrong"


class Collect(Scenario):
    name = "collect"

    def args(self, work):
        return ["collect", f"out={work / 'd.zarr'}", *COLLECT]

    def digest(self, work):
        return dataset_digest(work / "d.zarr")

    def classify(self, base, got):
        return classify_dataset(base, got)


class Encode(Scenario):
    name = "encode"

    def prepare(self, work):  # the dataset without its cache: the clean setup has encoded it already
        shutil.copytree(
            self.root / "clean" / "d.zarr", work / "d.zarr", ignore=shutil.ignore_patterns("features")
        )

    def args(self, work):
        return ["encode", f"data={work / 'd.zarr'}", *ENCODE]

    def digest(self, work):
        return cache_digest(work / "d.zarr")


class Train(Scenario):
    name = "train"

    def prepare(self, work):
        shutil.copytree(self.root / "clean" / "d.zarr", work / "d.zarr")

    def args(self, work):
        return ["train", f"data={work / 'd.zarr'}", f"run_dir={work / 'run'}", *TRAIN]

    def digest(self, work):
        return run_digest(work / "run")


def _hydra_list(items: list[str]) -> str:
    """A Python list of strings as one Hydra override value (each item quoted: they hold '=')."""
    return "[" + ",".join("'" + i + "'" for i in items) + "]"


STUDY_PLAN = ["n_evals=2", "goal_H=2", "max_steps=6", "planner.samples=6", "planner.topk=2",
              "planner.opt_steps=2", "n_videos=0"]  # fmt: skip
STUDY_TRAIN = [a for a in TRAIN if not a.startswith(("encoder", "progress", "device", "training.epochs"))]


class Study(Scenario):
    """A two-cell study (pixels x 1 seed, random baseline) over the clean dataset, merged and reported."""

    name = "study"

    def prepare(self, work):
        shutil.copytree(self.root / "clean" / "d.zarr", work / "d.zarr")

    def args(self, work):
        return [
            "study", f"data={work / 'd.zarr'}", f"study_dir={work / 'study'}", "img_size=24",
            "collect.n_episodes=6", "encoders=[pixels]", "seeds=[0]", "planners=[mpc_cem]",
            "baselines=[random]", "device=cpu", "progress=false",
            "+encoder_overrides.pixels=['encoder.input_size=24','encoder.patch_size=8']",
            f"train={_hydra_list([*STUDY_TRAIN, 'training.epochs=2'])}", f"plan={_hydra_list(STUDY_PLAN)}",
            "diagnostics.n_frames=40", "diagnostics.n_pairs=10", "diagnostics.horizons=2",
        ]  # fmt: skip

    def digest(self, work):
        """The merged per-episode results, without wall-clock fields (a kill changes only those)."""
        rows = []
        for line in (work / "study" / "results" / "episodes.jsonl").read_text().splitlines():
            row = json.loads(line)
            rows.append({k: v for k, v in row.items() if "time" not in k and "second" not in k})
        return sorted(json.dumps(r, sort_keys=True) for r in rows)


WM_SMOKE = [
    "wm_env=dodge", "preset=tiny", "progress=false", "workers=1", "collect.n_episodes=4",
    "collect.max_steps=30", "vae.z_dim=4", "vae.channels=[4,8,8,8]", "vae.steps=3", "vae.batch_size=8",
    "rnn.hidden=8", "rnn.seq_len=10", "rnn.batch_size=4", "rnn.steps=3", "controller.popsize=4",
    "controller.rollouts=2", "controller.generations=6", "controller.eval_rollouts=2",
    "controller.max_steps=30",
]  # fmt: skip


class CMAES(Scenario):
    """CMA-ES in M's dream (``worldmodels train-controller``) on dodge; V and M come prepared."""

    name = "cmaes"

    def prepare(self, work):
        shutil.copytree(self.root / "clean" / "wm", work / "wm")

    def args(self, work):
        return ["worldmodels", "train-controller", f"root={work / 'wm'}", *WM_SMOKE]

    def digest(self, work):
        """Every generation's fitness, the final mean and the best parameters (not the seconds)."""
        from safetensors.numpy import load_file

        state = load_file(str(next((work / "wm").glob("controller_*/cmaes.safetensors"))))
        h = hashlib.sha256()
        for name in ("fitness", "mean", "best_params", "best_score", "evals"):
            h.update(state[name].tobytes())
        return {"state": h.hexdigest()[:16], "generations": int(state["fitness"].shape[0])}


SCENARIOS = [Collect, Encode, Train, Study, CMAES]


def fresh(root: Path, label: str) -> Path:
    work = root / "work" / label
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def boundaries(scenario: Scenario, root: Path) -> tuple[object, list[tuple[str, int]], float]:
    """Run once uninterrupted, logging every boundary. Returns (digest, [(label, nth)], seconds)."""
    work = fresh(root, f"{scenario.name}_base")
    scenario.prepare(work)
    log = work / "faults.log"
    started = time.perf_counter()
    done = wmlab(scenario.args(work), env={**ENV, "WMLAB_FAULT_LOG": str(log)})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{scenario.name} failed uninterrupted:\n{done.stderr}")
    counts: dict[str, int] = {}
    points = []
    for line in log.read_text().splitlines() if log.exists() else []:
        _, label = line.split(" ", 1)
        counts[label] = counts.get(label, 0) + 1
        points.append((label, counts[label]))
    return scenario.digest(work), points, seconds


def kill_case(scenario: Scenario, root: Path, base, label: str, how: str, when) -> dict:
    work = fresh(root, f"{scenario.name}_kill")
    scenario.prepare(work)
    args = scenario.args(work)
    if how == "point":
        needle, nth = when
        first = wmlab(args, env={**ENV, "WMLAB_FAULT": f"{needle}:{nth}"})
        killed = first.returncode == -signal.SIGKILL
    else:  # timed: SIGKILL the process group after `when` seconds
        proc = start(args)
        time.sleep(when)
        killed = proc.poll() is None
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    rerun = wmlab(args)
    case = {"kind": "kill", "verb": scenario.name, "at": label, "killed": killed}
    if rerun.returncode != 0:
        case.update(outcome="refused", message=short(rerun.stderr))
        return case
    try:
        got = scenario.digest(work)
    except Exception as err:  # a result that cannot even be read back
        case.update(outcome="wrong", message=f"{type(err).__name__}: {err}")
        return case
    case["outcome"] = scenario.classify(base, got)
    if case["outcome"] != "exact":
        case["difference"] = first_difference(base, got)
    return case


def first_difference(base, got, where: str = "") -> str:
    """Where two digests first differ, as a short path (for the cases file)."""
    if isinstance(base, str) and isinstance(got, str) and base.startswith("{") and got.startswith("{"):
        base, got = json.loads(base), json.loads(got)
    if isinstance(base, dict) and isinstance(got, dict):
        for key in sorted(set(base) | set(got), key=str):
            if base.get(key) != got.get(key):
                return first_difference(base.get(key), got.get(key), f"{where}.{key}")
    if isinstance(base, list) and isinstance(got, list):
        if len(base) != len(got):
            return f"{where}: {len(base)} vs {len(got)} entries"
        for i, (a, b) in enumerate(zip(base, got)):
            if a != b:
                return first_difference(a, b, f"{where}[{i}]")
    return short(f"{where}: {base!r} vs {got!r}", 240)


def kill_campaign(root: Path, quick: bool, rng: random.Random) -> list[dict]:
    cases = []
    for cls in SCENARIOS:
        scenario = cls(root)
        base, points, seconds = boundaries(scenario, root)
        # Every distinct boundary label (first and last occurrence); the campaign thins repeats.
        chosen: dict[tuple[str, int], None] = {}
        by_label: dict[str, list[int]] = {}
        for label, nth in points:
            by_label.setdefault(label, []).append(nth)
        for label, nths in by_label.items():
            for nth in {nths[0], nths[-1]}:
                chosen[(label, nth)] = None
        picks = list(chosen)
        if quick:
            picks = rng.sample(picks, min(3, len(picks)))
        for label, nth in picks:
            # The needle must match this label only: use the full label.
            cases.append(kill_case(scenario, root, base, f"{label}#{nth}", "point", (label, nth)))
        for frac in [0.5] if quick else [0.3, 0.6, 0.85]:
            cases.append(kill_case(scenario, root, base, f"t={frac:.2f}", "timed", seconds * frac))
        print(f"kills: {scenario.name}: {len(picks)} boundaries + timed", file=sys.stderr)
    return cases


# ------------------------------------------------------------------------------- corruption
def corrupt(path: Path, how: str, rng: random.Random) -> None:
    if how == "delete":
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        return
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "bitflip":
        if not data:
            return
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))


def file_kinds(artefact: Path) -> dict[str, Path]:
    """One representative file of each kind inside an artefact directory."""
    kinds: dict[str, Path] = {}
    for path in sorted(artefact.rglob("*")):
        if not path.is_file() or path.name.endswith((".lock", ".partial")) or "tb" in path.parts:
            continue
        rel = path.relative_to(artefact)
        # c.<i>.0... shard/chunk files: one kind per array folder
        kind = str(rel.parent / ("<chunk>" if path.name.startswith("c.") else path.name))
        kinds.setdefault(kind, path)
    return kinds


def corruption_campaign(root: Path, quick: bool, rng: random.Random) -> list[dict]:
    clean = root / "clean"
    cases = []
    targets = [
        # (artefact label, path inside clean/, consumer verb args given the corrupted copy `work`)
        ("dataset", "d.zarr", lambda w: ["encode", f"data={w / 'd.zarr'}", *ENCODE,
                                         "out=" + str(w / "cache")]),
        ("dataset-train", "d.zarr", lambda w: ["train", f"data={w / 'd.zarr'}", f"run_dir={w / 'run2'}",
                                               *[a for a in TRAIN if not a.startswith("training.epochs")],
                                               "training.epochs=1"]),
        ("cache", "d.zarr/features", lambda w: ["train", f"data={w / 'd.zarr'}", f"run_dir={w / 'run2'}",
                                                *[a for a in TRAIN if not a.startswith("training.epochs")],
                                                "training.epochs=1"]),
        ("run", "run", lambda w: ["train", f"data={w / 'd.zarr'}", f"run_dir={w / 'run'}", *TRAIN,
                                  "training.epochs=4"]),
    ]  # fmt: skip
    reference: dict[str, object] = {}
    for label, inside, consumer in targets:
        # The clean result of the consumer, to tell a silent wrong result from a harmless byte.
        work = fresh(root, f"corrupt_{label}_clean")
        shutil.copytree(clean, work, dirs_exist_ok=True)
        ok = wmlab(consumer(work))
        if ok.returncode != 0:
            raise SystemExit(f"consumer of {label} fails on clean data:\n{ok.stderr}")
        reference[label] = consumer_digest(work, label)
        kinds = file_kinds(clean / inside)
        items = list(kinds.items())
        if quick:
            items = rng.sample(items, min(3, len(items)))
        for kind, path in items:
            for how in ("bitflip", "truncate", "delete"):
                work = fresh(root, f"corrupt_{label}")
                shutil.copytree(clean, work, dirs_exist_ok=True)
                corrupt(work / path.relative_to(clean), how, rng)
                done = wmlab(consumer(work))
                case = {"kind": "corrupt", "artefact": label, "file": kind, "how": how}
                if done.returncode != 0:
                    tb = "Traceback" in done.stderr
                    case.update(outcome="traceback" if tb else "clear", message=short(done.stderr, 240))
                else:
                    try:
                        same = consumer_digest(work, label) == reference[label]
                    except Exception as err:
                        same, case["message"] = False, f"{type(err).__name__}: {err}"
                    case["outcome"] = "harmless" if same else "silent"
                cases.append(case)
        print(f"corruption: {label}: {len(items)} file kinds x 3", file=sys.stderr)
    return cases


def consumer_digest(work: Path, label: str):
    if label == "dataset":
        return cache_digest_at(work / "cache")
    return run_digest(work / ("run" if label == "run" else "run2"))


def cache_digest_at(path: Path) -> dict:
    from wmlab.data.feature_cache import FeatureCache

    # `encode out=<path>` puts one cache at <path>; otherwise caches are folders under it.
    caches = (
        [path]
        if (path / "zarr.json").is_file()
        else [p for p in path.glob("*") if (p / "zarr.json").is_file()]
    )
    out = {}
    for p in caches:
        cache = FeatureCache(p)
        out[p.name] = {
            int(i): hashlib.sha256(cache.episode(int(i)).tobytes()).hexdigest()[:16] for i in cache.committed
        }
    return out


# ------------------------------------------------------------------------------- concurrency
def concurrency_campaign(root: Path) -> list[dict]:
    cases = []
    for cls in SCENARIOS:
        scenario = cls(root)
        base_work = root / "work" / f"{scenario.name}_base"
        base = scenario.digest(base_work) if base_work.exists() else boundaries(scenario, root)[0]
        work = fresh(root, f"{scenario.name}_twice")
        scenario.prepare(work)
        procs = [start(scenario.args(work)) for _ in range(2)]
        outs = [p.communicate() for p in procs]
        codes = [p.returncode for p in procs]
        refused = [c != 0 for c in codes]
        refusals = [err for (_, err), c in zip(outs, codes) if c != 0]
        messages = [short(err, 300) for err in refusals]
        case = {"kind": "concurrent", "verb": scenario.name, "exit_codes": codes, "messages": messages}
        if all(refused):
            case["outcome"] = "both_refused"
        else:
            try:
                got = scenario.digest(work)
                outcome = scenario.classify(base, got)
            except Exception as err:
                outcome, case["error"] = "corrupt", f"{type(err).__name__}: {err}"
            lock_message = all("being written by" in err for err in refusals)  # the full message
            case["outcome"] = "ok" if outcome == "exact" and (not any(refused) or lock_message) else outcome
        cases.append(case)
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/wmlab_faults")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["kill", "corrupt", "concurrent"], action="append")
    parser.add_argument("--verbs", help="comma-separated scenario names (default: all)")
    args = parser.parse_args()
    root = Path(args.out)
    rng = random.Random(args.seed)
    if root.exists():
        shutil.rmtree(root)
    (root / "clean").mkdir(parents=True)
    started = time.perf_counter()
    # The clean artefacts every corruption case copies: a dataset with its cache, and a trained run.
    for cmd in (
        ["collect", f"out={root / 'clean' / 'd.zarr'}", *COLLECT],
        ["encode", f"data={root / 'clean' / 'd.zarr'}", *ENCODE],
        ["train", f"data={root / 'clean' / 'd.zarr'}", f"run_dir={root / 'clean' / 'run'}", *TRAIN],
    ):
        done = wmlab(cmd)
        if done.returncode != 0:
            raise SystemExit(f"setup {cmd[0]} failed:\n{done.stderr}")
    for stage in ("collect", "train-vae", "train-rnn"):  # V and M for the CMA-ES scenario
        done = wmlab(["worldmodels", stage, f"root={root / 'clean' / 'wm'}", *WM_SMOKE])
        if done.returncode != 0:
            raise SystemExit(f"setup worldmodels {stage} failed:\n{done.stderr}")
    only = set(args.only or ["kill", "corrupt", "concurrent"])
    if args.verbs:
        wanted = set(args.verbs.split(","))
        SCENARIOS[:] = [c for c in SCENARIOS if c.name in wanted]
    cases = []
    if "kill" in only:
        cases += kill_campaign(root, args.quick, rng)
    if "corrupt" in only:
        cases += corruption_campaign(root, args.quick, rng)
    if "concurrent" in only:
        cases += concurrency_campaign(root)
    summary: dict[str, dict[str, int]] = {}
    for case in cases:
        counts = summary.setdefault(case["kind"], {})
        counts[case["outcome"]] = counts.get(case["outcome"], 0) + 1
        counts["tried"] = counts.get("tried", 0) + 1
    (root / "cases.json").write_text(json.dumps(cases, indent=1))
    print(json.dumps({"summary": summary, "seconds": round(time.perf_counter() - started, 1),
                      "cases": str(root / "cases.json")}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
