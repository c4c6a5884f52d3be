"""A Markdown report of one World Models root: VAE reconstructions, a dreamed rollout (GIF), CMA-ES learning
curves, the real-vs-dream score table by temperature, and the iterative procedure's scores.

``build_report(cfg)`` writes ``<root>/report/report.md`` + ``vae_recon.png``, ``dream.gif``, ``cmaes.png``.
Missing stages are reported as missing, never skipped silently.
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

    from wmlab.models.vae import FramePool, frames_to_input, load_vae

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
    """Plot mean/best return per generation (+ evaluations) of every controller run -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, meta) in enumerate(sorted(runs.items())):
        color = f"C{i % 10}"
        hist = meta.get("history", [])
        g = [h["generation"] for h in hist]
        ax.plot(g, [h["return_mean"] for h in hist], color=color, alpha=0.5, label=f"{name} pop. mean")
        ax.plot(
            g, [h["return_best"] for h in hist], color=color, ls="--", alpha=0.5, label=f"{name} pop. best"
        )
        ev = meta.get("evals", [])
        if ev:
            ax.errorbar(
                [e["generation"] for e in ev],
                [e["mean"] for e in ev],
                yerr=[e["std"] for e in ev],
                color=color,
                marker="o",
                ls="-",
                label=f"{name} eval (mean)",
            )
    ax.set_xlabel("generation")
    ax.set_ylabel("return")
    ax.set_title("CMA-ES learning curves")
    ax.legend(fontsize=6)
    fig.tight_layout()
    _atomic(out, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
    return out


def _fmt(entry: dict | None) -> str:
    if not entry or entry.get("mean") is None:
        return "n/a"
    return f"{entry['mean']:.1f} ± {entry['std']:.1f} (n={entry.get('n', '?')})"


def score_table(rows: list[dict]) -> list[str]:
    """Markdown rows: one per evaluated controller, real score and dream score at each temperature."""
    temps = sorted({float(t) for r in rows for t in (r.get("dream") or {})})
    columns = ["controller", "trained in", "train τ", "actual (real)"] + [f"dream τ={t:g}" for t in temps]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        dream = r.get("dream") or {}
        cells = [
            Path(r["controller"]).name,
            str(r.get("trained_in")),
            str(r.get("train_temperature")),
            _fmt(r.get("real")),
        ] + [_fmt(dream.get(str(t))) for t in temps]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def build_report(cfg: dict) -> Path:
    """Write ``<root>/report/report.md`` and its figures from whatever stages have run."""
    from wmlab.runs import atomic_write_text, read_json
    from wmlab.worldmodels.evaluate import read_jsonl
    from wmlab.worldmodels.stages import Layout

    layout = Layout(cfg["root"])
    if not layout.root.is_dir():
        raise FileNotFoundError(
            f"{layout.root} does not exist: run the worldmodels stages first (same root=)"
        )
    out = layout.report
    out.mkdir(parents=True, exist_ok=True)
    env = cfg["wm_env"]["name"]
    md = [f"# World Models report: {env} ({cfg.get('preset_name')})", "", f"Root: `{layout.root}`", ""]

    md += ["## V: conv VAE", ""]
    if (layout.vae / "vae.json").is_file() and layout.data.exists():
        meta = read_json(layout.vae / "vae.json")
        last = meta["history"][-1] if meta.get("history") else {}
        md += [
            f"z = {meta['config']['z_dim']}, channels {meta['config']['channels']}, {meta['step']} steps of "
            f"{meta['batch_size']} frames ({meta.get('images_per_second')} images/s); last loss "
            f"{last.get('train_loss', float('nan')):.1f} (recon {last.get('recon', float('nan')):.1f}, "
            f"KL {last.get('kl', float('nan')):.2f}), validation {last.get('val_loss', float('nan')):.1f}.",
            "",
        ]
        vae_reconstructions(layout.vae, layout.data, out / "vae_recon.png", n=cfg["report"]["n_recon"])
        md += [
            "Top: frames; bottom: reconstructions from mu.",
            "",
            "![VAE reconstructions](vae_recon.png)",
            "",
        ]
    else:
        md += ["(missing: run `collect` and `train-vae`)", ""]

    md += ["## M: MDN-RNN", ""]
    if (layout.rnn / "rnn.json").is_file():
        meta = read_json(layout.rnn / "rnn.json")
        last = meta["history"][-1] if meta.get("history") else {}
        md += [
            f"LSTM {meta['config']['hidden']}, K = {meta['config']['n_mix']}, done head "
            f"{meta['config']['done_head']}; {meta['step']} steps ({meta.get('sequences_per_second')} "
            f"sequences/s of {meta['seq_len']} steps); last NLL {last.get('nll', float('nan')):.3f}"
            + (f", done BCE {last['done_bce']:.3f}" if "done_bce" in last else "")
            + ".",
            "",
        ]
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
            md += [
                f"A dreamed rollout at τ = {cfg['temperature']} with {who}, {n} frames decoded by V:",
                "",
                "![dream](dream.gif)",
                "",
            ]
    else:
        md += ["(missing: run `train-rnn`)", ""]

    md += ["## C: CMA-ES", ""]
    runs = {}
    for path in sorted(layout.root.glob("controller_*/controller.json")) + sorted(
        layout.iterate.glob("iter_*/controller/controller.json")
    ):
        runs[str(path.parent.relative_to(layout.root))] = read_json(path)
    if runs:
        cmaes_curves(runs, out / "cmaes.png")
        md += [
            "![CMA-ES learning curves](cmaes.png)",
            "",
            "| run | generations | parameters | best eval |",
            "|---|---|---|---|",
        ]
        for name, meta in sorted(runs.items()):
            best = meta.get("best_eval")
            md.append(
                f"| {name} | {meta['generation']} | {meta['n_params']} | "
                f"{'n/a' if best is None else f'{best:.1f}'} |"
            )
        md.append("")
    else:
        md += ["(missing: run `train-controller`)", ""]

    md += ["## Real vs dream scores by temperature", ""]
    rows = read_jsonl(layout.eval_results)
    md += (score_table(rows) if rows else ["(missing: run `evaluate`)"]) + [""]

    iterations = read_jsonl(layout.iterate / "results.jsonl")
    if iterations:
        md += ["## Iterative training", "", "| iteration | episodes | real | dream |", "|---|---|---|---|"]
        for r in iterations:
            real = {"mean": r["real_mean"], "std": r["real_std"], "n": r.get("real_n")}
            dream = {"mean": r.get("dream_mean"), "std": r.get("dream_std"), "n": "-"}
            md.append(f"| {r['iteration']} | {r['episodes_total']} | {_fmt(real)} | {_fmt(dream)} |")
        md.append("")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md))
    return path
