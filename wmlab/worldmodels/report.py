"""The report of one World Models root: the real-env result against the baselines (with tests), VAE
reconstructions, a dreamed rollout (GIF), CMA-ES curves (best / mean / worst per generation), real-vs-dream
scores by temperature (the paper's table 2 when tau-sweep ran) and the iterative procedure's scores.

``build_report(cfg)`` writes ``<root>/report/report.html`` (one self-contained file: images inline) and
``report.md`` + ``vae_recon.png``, ``dream.gif``, ``cmaes.png``. Missing stages are reported as missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _atomic(path: Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``."""
    import os

    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    write(tmp)
    os.replace(tmp, path)
    return path


def vae_reconstructions(vae_dir, data, out: Path, n: int = 8, seed: int = 0) -> Path:
    """A PNG with ``n`` frames of ``data`` (top) and their VAE reconstructions from mu (bottom)."""
    import torch
    from PIL import Image

    from wmlab.models.vae import frames_to_input, load_vae
    from wmlab.training.vae import FramePool

    vae = load_vae(vae_dir)
    pool = FramePool(data)
    idx = np.sort(np.random.default_rng(seed).choice(pool.size, size=min(n, pool.size), replace=False))
    x = frames_to_input(pool.read(idx))  # (n, 3, 64, 64)
    with torch.no_grad():
        recon = vae.decode(vae.encode(x)[0])
    rows = [torch.cat(list(t), -1) for t in (x, recon)]  # each (3, 64, 64n)
    grid = (torch.cat(rows, 1).permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return _atomic(out, lambda p: Image.fromarray(grid).save(p, format="PNG"))


def dream_gif(
    vae_dir, rnn_dir, latents, controller, wm_env: str, out: Path, *, tau: float, steps: int, seed: int = 0
) -> tuple[Path, int]:
    """Dream one episode with ``controller`` (or C = 0 when None) and decode every z to a frame -> GIF."""
    import imageio.v2 as imageio
    import torch

    from wmlab.models.mdn_rnn import load_rnn
    from wmlab.models.vae import load_vae
    from wmlab.worldmodels.controller import ControllerConfig, load_controller
    from wmlab.worldmodels.dream import Dream
    from wmlab.worldmodels.envs import env_class
    from wmlab.worldmodels.latents import initial_latents, load_latents

    vae, rnn = load_vae(vae_dir), load_rnn(rnn_dir)
    cls = env_class(wm_env)
    if controller is not None and Path(controller).exists():
        cfg, params = load_controller(controller)
    else:
        cfg = ControllerConfig(z_dim=vae.z_dim, hidden=rnn.cfg.hidden, out_dim=cls.action_dim, inputs="z")
        params = np.zeros(cfg.n_params, np.float32)
    mu, logvar = initial_latents(load_latents(latents))
    dream = Dream(rnn, mu, logvar, tau=tau, max_steps=steps, to_action=cls.controller_to_action)
    z = dream.rollout(cfg, params[None], [seed], record=True)["z"]  # (T, Nz)
    with torch.no_grad():
        frames = vae.decode(torch.from_numpy(z)).permute(0, 2, 3, 1).clamp(0, 1).numpy()  # (T, 64, 64, 3)
    frames = (frames * 255).round().astype(np.uint8)
    frames = np.repeat(np.repeat(frames, 2, 1), 2, 2)  # 128 px: easier to look at
    _atomic(out, lambda p: imageio.mimsave(p, list(frames), format="GIF", duration=0.05, loop=0))
    return out, len(frames)


def cmaes_curves(runs: dict[str, dict], out: Path) -> Path:
    """Per controller run: best / mean / worst candidate return per generation (the population's spread)
    and the evaluations of the CMA-ES mean (mean ± std over its evaluation episodes) -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, (name, meta) in enumerate(sorted(runs.items())):
        color = f"C{i % 10}"
        hist = meta.get("history", [])
        g = [int(h["generation"]) for h in hist]
        best = [h["return_best"] for h in hist]
        worst = [h["return_worst"] for h in hist]
        ax.fill_between(g, worst, best, color=color, alpha=0.12)
        ax.plot(g, best, color=color, ls="--", lw=1, label=f"{name}: best candidate")
        ax.plot(g, [h["return_mean"] for h in hist], color=color, lw=1.5, label=f"{name}: population mean")
        ax.plot(g, worst, color=color, ls=":", lw=1, label=f"{name}: worst candidate")
        ev = meta.get("evals", [])
        if ev:
            ax.errorbar(
                [int(e["generation"]) for e in ev],
                [e["mean"] for e in ev],
                yerr=[e["std"] for e in ev],
                color=color,
                marker="o",
                ls="none",
                capsize=3,
                label=f"{name}: CMA-ES mean, eval ± std over episodes",
            )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("generation")
    ax.set_ylabel("return (candidate: mean over its rollouts)")
    ax.set_title("CMA-ES: best / mean / worst candidate per generation")
    ax.legend(fontsize=6)
    fig.tight_layout()
    _atomic(out, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
    return out


def _fmt(entry: dict | None) -> str:
    if not entry or entry.get("mean") is None:
        return "n/a"
    return f"{entry['mean']:.1f} ± {entry['std']:.1f} (n={entry.get('n', '?')})"


def _p(x: float) -> str:
    return f"{x:.2g}"


class Doc:
    """A report as blocks, rendered to Markdown (figures beside it) and to one self-contained HTML file."""

    def __init__(self, title: str) -> None:
        self.title, self.blocks = title, []

    def h(self, text: str) -> None:
        self.blocks.append(("h", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list]) -> None:
        self.blocks.append(("table", (header, rows)))

    def image(self, path: Path, alt: str) -> None:
        self.blocks.append(("img", (path, alt)))

    def markdown(self) -> str:
        md = [f"# {self.title}", ""]
        for kind, x in self.blocks:
            if kind == "h":
                md += [f"## {x}", ""]
            elif kind == "p":
                md += [x, ""]
            elif kind == "table":
                header, rows = x
                md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                md += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows] + [""]
            else:
                md += [f"![{x[1]}]({x[0].name})", ""]
        return "\n".join(md)

    def html(self) -> str:
        import base64
        import html

        e = html.escape
        body = [f"<h1>{e(self.title)}</h1>"]
        for kind, x in self.blocks:
            if kind == "h":
                body.append(f"<h2>{e(x)}</h2>")
            elif kind == "p":
                body.append(f"<p>{e(x)}</p>")
            elif kind == "table":
                header, rows = x
                head = "".join(f"<th>{e(str(c))}</th>" for c in header)
                cells = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
            else:
                path, alt = x
                mime = "image/gif" if path.suffix == ".gif" else "image/png"
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                body.append(f'<figure><img alt="{e(alt)}" src="data:{mime};base64,{data}">'
                            f"<figcaption>{e(alt)}</figcaption></figure>")  # fmt: skip
        return (
            f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(self.title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"
        )


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}
img{max-width:100%;image-rendering:pixelated}figure{display:inline-block;margin:0.5em;vertical-align:top}
figcaption{font-size:12px;color:#555}
"""


def score_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per evaluated controller: its real score and its dream score at each temperature."""
    temps = sorted({float(t) for r in rows for t in (r.get("dream") or {})})
    header = ["controller", "trained in", "train τ", "actual (real env)"] + [f"dream τ={t:g}" for t in temps]
    out = []
    for r in rows:
        dream = r.get("dream") or {}
        out.append(
            [
                Path(r["controller"]).name,
                str(r.get("trained_in")),
                str(r.get("train_temperature")),
                _fmt(r.get("real")),
            ]
            + [_fmt(dream.get(str(t))) for t in temps]
        )
    return header, out


def baseline_rows(record: dict) -> list[list[str]]:
    """The controller and each baseline on the same real-env seeds, with the two-sample tests."""
    rows = [["controller (C trained in the " + str(record.get("trained_in")) + ")", _fmt(record["real"]),
             "", "", ""]]  # fmt: skip
    for name, b in (record.get("baselines") or {}).items():
        t = record["tests"][name]
        rows.append(
            [f"{name}: {b['label']}", _fmt(b), f"{t['difference']:+.1f}", _p(t["mann_whitney_p"]),
             f"t = {t['welch_t']:.2f}, p = {_p(t['welch_p'])}"]
        )  # fmt: skip
    return rows


def score_table(rows: list[dict]) -> list[str]:
    """Markdown lines of ``score_rows`` (kept for callers of the Markdown-only report)."""
    header, body = score_rows(rows)
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in body
    ]


def _upscale_png(path: Path, factor: int) -> None:
    """Nearest-neighbour upscale in place (64 px frames are too small to judge by eye)."""
    from PIL import Image

    img = Image.open(path)
    big = img.resize((img.width * factor, img.height * factor), Image.NEAREST)
    _atomic(path, lambda p: big.save(p, format="PNG"))


def build_report(cfg: dict) -> Path:
    """Write ``<root>/report/report.md`` + ``report.html`` (self-contained) and figures from whatever
    stages have run. Returns the HTML path."""
    from wmlab.runs import atomic_write_text, read_json
    from wmlab.worldmodels.evaluate import read_jsonl
    from wmlab.worldmodels.experiments import sweep_table_rows
    from wmlab.worldmodels.stages import Layout

    layout = Layout(cfg["root"])
    if not layout.root.is_dir():
        raise FileNotFoundError(
            f"{layout.root} does not exist: run the worldmodels stages first (same root=)"
        )
    out = layout.report
    out.mkdir(parents=True, exist_ok=True)
    env = cfg["wm_env"]["name"]
    doc = Doc(f"World Models report: {env} ({cfg.get('preset_name')})")
    doc.p(f"Root: {layout.root}")

    run = read_json(layout.root / "run.json") if (layout.root / "run.json").is_file() else None
    records = read_jsonl(layout.eval_results)
    with_baselines = [r for r in records if r.get("baselines") and r.get("real")]
    if with_baselines:
        record = with_baselines[-1]
        doc.h("Real environment: the controller against the baselines")
        doc.p(
            f"{Path(record['controller']).name} and every baseline on the same {record['real']['n']} "
            "evaluation seeds; ± is the std over those episodes. Two-sided tests: Mann-Whitney U "
            f"(primary: returns are capped and skewed) and Welch's t "
            f"({next(iter(record['tests'].values()))['implementation']})."
        )
        doc.table(["policy", "real return", "difference", "Mann-Whitney p", "Welch"], baseline_rows(record))
    if run:
        doc.table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in run["seconds"].items()])

    doc.h("V: conv VAE")
    if (layout.vae / "vae.json").is_file() and layout.data.exists():
        meta = read_json(layout.vae / "vae.json")
        last = meta["history"][-1] if meta.get("history") else {}
        doc.p(
            f"z = {meta['config']['z_dim']}, channels {meta['config']['channels']}, {meta['step']} steps of "
            f"{meta['batch_size']} frames ({meta.get('images_per_second')} images/s); last loss "
            f"{last.get('train_loss', float('nan')):.1f} (recon {last.get('recon', float('nan')):.1f}, "
            f"KL {last.get('kl', float('nan')):.2f}), validation {last.get('val_loss', float('nan')):.1f}."
        )
        recon = vae_reconstructions(
            layout.vae, layout.data, out / "vae_recon.png", n=cfg["report"]["n_recon"]
        )
        _upscale_png(recon, 2)
        doc.image(recon, "Top: real frames; bottom: V's reconstructions from mu (2x nearest-neighbour)")
    else:
        doc.p("(missing: run `collect` and `train-vae`)")

    doc.h("M: MDN-RNN")
    if (layout.rnn / "rnn.json").is_file():
        meta = read_json(layout.rnn / "rnn.json")
        last = meta["history"][-1] if meta.get("history") else {}
        doc.p(
            f"LSTM {meta['config']['hidden']}, K = {meta['config']['n_mix']}, done head "
            f"{meta['config']['done_head']}; {meta['step']} steps ({meta.get('sequences_per_second')} "
            f"windows/s of up to {meta['seq_len']} steps); last NLL {last.get('nll', float('nan')):.3f}"
            + (f", done BCE {last['done_bce']:.3f}" if "done_bce" in last else "")
            + "."
        )
        if layout.latents.is_file() and (layout.vae / "vae.json").is_file():
            controller = layout.controller(bool(cfg["dream"]), cfg["temperature"])
            _, n = dream_gif(
                layout.vae,
                layout.rnn,
                [layout.latents],
                controller if controller.exists() else None,
                env,
                out / "dream.gif",
                tau=float(cfg["temperature"]),
                steps=cfg["report"]["gif_steps"],
                seed=cfg["seed"],
            )
            who = controller.name if controller.exists() else "C = 0 (no controller yet)"
            doc.image(
                out / "dream.gif", f"A dream at τ = {cfg['temperature']} with {who}: {n} frames decoded by V"
            )
    else:
        doc.p("(missing: run `train-rnn`)")

    doc.h("C: CMA-ES")
    runs = {}
    for path in sorted(layout.root.glob("controller_*/controller.json")) + sorted(
        layout.iterate.glob("iter_*/controller/controller.json")
    ):
        runs[str(path.parent.relative_to(layout.root))] = read_json(path)
    if runs:
        cmaes_curves(runs, out / "cmaes.png")
        doc.image(out / "cmaes.png", "CMA-ES learning curves")
        rows = []
        for name, meta in sorted(runs.items()):
            best = meta.get("best_eval")
            evals = meta.get("evals") or []
            pick = max(evals, key=lambda e: e["mean"]) if evals else None
            rows.append([name, meta["generation"], meta["n_params"], "n/a" if best is None else _fmt(pick)])
        doc.table(
            ["run", "generations", "parameters", "best evaluation of the mean (± std over episodes)"], rows
        )
    else:
        doc.p("(missing: run `train-controller`)")

    doc.h("Real vs dream scores by temperature")
    sweep = read_jsonl(layout.root / "tau_sweep.jsonl")
    if sweep:
        doc.p(
            "The paper's table 2: C trained in the dream at τ, scored in the dream at τ and in the real env."
        )
        header, rows = sweep_table_rows(sweep)
        doc.table(header, rows)
    if records:
        header, rows = score_rows(records)
        doc.table(header, rows)
    else:
        doc.p("(missing: run `evaluate`)")

    iterations = read_jsonl(layout.iterate / "results.jsonl")
    if iterations:
        doc.h("Iterative training")
        rows = []
        for r in iterations:
            real = {"mean": r["real_mean"], "std": r["real_std"], "n": r.get("real_n")}
            dream = {"mean": r.get("dream_mean"), "std": r.get("dream_std"), "n": "-"}
            rows.append([r["iteration"], r["episodes_total"], _fmt(real), _fmt(dream)])
        doc.table(["iteration", "episodes", "real", "dream"], rows)
    atomic_write_text(out / "report.md", doc.markdown())
    path = out / "report.html"
    atomic_write_text(path, doc.html())
    return path
