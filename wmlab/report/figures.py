"""The report's figures of single episodes and runs: trajectories on the maze, planning cost per
optimiser iteration, training loss curves. Each takes plain rows (the results files' dicts) and
returns a matplotlib Figure (Agg, no pyplot state); ``save`` writes it atomically as PNG.

- ``trajectory_figure``: the same start/goal pairs (rows) x every encoder (columns), the agent's
  path (``xy_trace``: its position after every env step) drawn on the maze's walls, start ○,
  goal ★, reached or not.
- ``plan_cost_figure``: per planner, the mean over episodes of the first plan's lowest cost after each
  iteration (``plan_cost_trace``) relative to iteration 1 (costs of different encoders live in
  different latent units, so the panel compares how much each optimiser gains, not the cost itself).
- ``training_figure``: per encoder, training and validation loss per epoch (mean over seeds) and the
  validation copy-last loss (the model must go below it to predict anything).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def figure(width: float, height: float):
    # A bare Figure renders with Agg and touches no global pyplot state or backend setting.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def save(fig, path: Path) -> Path:
    from wmlab.integrity import atomic_write_with

    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def _draw_walls(ax, layout) -> None:
    """Wall cells of a ``MazeLayout`` as gray unit squares, in the qpos coordinates of ``xy_trace``."""
    from matplotlib.patches import Rectangle

    for cell in layout.wall_cells:
        cx, cy = layout.cell_center_qpos(cell)
        ax.add_patch(Rectangle((cx - 0.5, cy - 0.5), 1.0, 1.0, color="0.75", linewidth=0))
    centres = np.array([layout.cell_center_qpos(c) for c in layout.wall_cells])
    if len(centres):
        ax.set_xlim(centres[:, 0].min() - 0.5, centres[:, 0].max() + 0.5)
        ax.set_ylim(centres[:, 1].min() - 0.5, centres[:, 1].max() + 0.5)


def trajectory_figure(pairs: list, columns: list[str], rows_by: dict, layout=None):
    """pairs: the pair ids to draw (figure rows); columns: encoder (or baseline) names; rows_by:
    {(column, pair id): episode row with xy_trace, goal_xy, reached, first_reached_step}. A missing
    cell is left blank with "no trajectory". ``layout``: a ``MazeLayout`` for the walls (None: none)."""
    fig = figure(2.3 * max(1, len(columns)), 2.4 * max(1, len(pairs)) + 0.3)
    axes = np.asarray(fig.subplots(max(1, len(pairs)), max(1, len(columns)), squeeze=False))
    for r, pair in enumerate(pairs):
        for c, name in enumerate(columns):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_aspect("equal")
            if layout is not None:
                _draw_walls(ax, layout)
            row = rows_by.get((name, pair))
            if r == 0:
                ax.set_title(name, fontsize=8)
            if row is None or not row.get("xy_trace"):
                ax.text(0.5, 0.5, "no trajectory", transform=ax.transAxes, ha="center", fontsize=7)
                continue
            xy = np.asarray(row["xy_trace"], dtype=float)  # (steps + 1, 2) after every env step
            color = "tab:green" if row.get("reached") else "tab:red"
            ax.plot(xy[:, 0], xy[:, 1], color=color, linewidth=1.2, marker=".", markersize=2.5)
            ax.plot(*xy[0], marker="o", color="black", markersize=5, fillstyle="none")
            if row.get("goal_xy") is not None:
                ax.plot(*row["goal_xy"], marker="*", color="gold", markeredgecolor="black", markersize=9)
            step = row.get("first_reached_step")
            label = f"reached @ {step}" if row.get("reached") else "not reached"
            ax.text(0.02, 0.02, label, transform=ax.transAxes, fontsize=6.5, color=color)
            if c == 0:
                ax.set_ylabel(f"pair {pair}", fontsize=7)
    return fig


def plan_cost_figure(curves: dict):
    """curves: {planner: {encoder: (mean relative cost per iteration (I,), episodes)}} -> one panel per
    planner, the cost after iteration i divided by the cost after iteration 1, mean over episodes."""
    planners = list(curves)
    fig = figure(4.6 * max(1, len(planners)), 3.9)
    axes = np.atleast_1d(fig.subplots(1, max(1, len(planners)), squeeze=False)).ravel()
    for ax, planner in zip(axes, planners, strict=False):
        for i, (encoder, (curve, n)) in enumerate(curves[planner].items()):
            ax.plot(np.arange(1, len(curve) + 1), curve, marker="o", markersize=3, color=f"C{i % 10}",
                    label=f"{encoder} (n={n})")  # fmt: skip
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimiser iteration (first plan of each episode)")
        ax.set_ylabel("best cost / best cost after iteration 1")
        ax.set_title(f"{planner}: planning cost per iteration", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncols=2, fontsize=7, frameon=False)
    return fig


def relative_cost_curve(rows: list[dict]) -> tuple[np.ndarray, int] | None:
    """Mean over rows of plan_cost_trace / plan_cost_trace[0] (I,) and the number of rows used (rows
    with a trace of the most common length and a positive first cost); None when no row has one."""
    traces = [np.asarray(r["plan_cost_trace"], float) for r in rows if r.get("plan_cost_trace")]
    if not traces:
        return None
    lengths = [len(t) for t in traces]
    common = max(set(lengths), key=lengths.count)
    kept = [t / t[0] for t in traces if len(t) == common and t[0] > 0 and np.isfinite(t).all()]
    if not kept:
        return None
    return np.mean(kept, axis=0), len(kept)


def training_figure(histories: dict):
    """histories: {encoder: [per-seed list of {"epoch", "train_loss", "val_z_visual_loss",
    "val_copy_last_visual_loss"}]} -> the training loss (visual + proprio parts, dotted), the validation
    visual loss (solid) and the validation visual loss of copying the last frame (dashed, thin: the model
    must go below it), per epoch, mean over seeds, one colour per encoder, log scale."""
    fig = figure(6.4, 4.6)
    ax = fig.subplots()
    for i, (encoder, seeds) in enumerate(histories.items()):
        color = f"C{i % 10}"
        for key, style, label in (
            ("train_loss", ":", "train (visual + proprio)"),
            ("val_z_visual_loss", "-", "val visual"),
            ("val_copy_last_visual_loss", "--", "val visual, copy-last"),
        ):
            epochs, mean = _mean_by_epoch(seeds, key)
            if len(epochs):
                width, marker = (0.9, None) if style == "--" else (1.4, "o" if style == "-" else None)
                ax.plot(epochs, mean, linestyle=style, color=color, linewidth=width, marker=marker,
                        markersize=3, label=f"{encoder} {label}")  # fmt: skip
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (MSE in the model's latent units)")
    ax.set_title("Training curves (mean over seeds)", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncols=3, fontsize=7, frameon=False)
    return fig


def _mean_by_epoch(seeds: list[list[dict]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, mean of ``key`` over the seeds that have it at that epoch), epochs in order."""
    values: dict[int, list[float]] = {}
    for history in seeds:
        for h in history:
            if h.get(key) is not None and np.isfinite(h[key]) and h[key] > 0:
                values.setdefault(int(h["epoch"]), []).append(float(h[key]))
    epochs = np.array(sorted(values))
    return epochs, np.array([np.mean(values[e]) for e in epochs])
