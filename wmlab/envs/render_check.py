"""``wmlab check-render``: do our renders of a dataset's states look like its stored frames?

A released DINO-WM checkpoint plans well only if the frames we feed it look like the frames it was
trained on. DINO-WM rendered with mujoco_py on MuJoCo 2.1, whose free-camera distance
(``stat.extent``), lookat and row order (mujoco_py returned OpenGL's bottom-up rows) may differ
from what our ``mujoco`` 3.x env does. So: sample (state, frame) pairs from a dataset, re-render
each state with our env at the frame's size, and report the mean absolute pixel error (0-255); if
it is large, fit the camera distance, lookat x/y and the vertical flip to the samples, and print
the CLI overrides that make our env render like the dataset.

The fit is a pattern search (numpy only): a log-spaced scan of the distance, then coordinate
moves of shrinking size on (distance, lookat x, lookat y), changing the camera of one env in place
(a new env per candidate costs ~0.5 s, a render at 64 px ~3 ms).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

#: Mean absolute error (0-255 scale) below which frames count as matching. Same-backend renders
#: match exactly; a different GPU/driver may shift a few edge pixels, which stays well below this.
MATCH_THRESHOLD = 2.0
#: Samples shown in the PNG grid, and used by the camera fit (the fit's cost grows with them; the
#: camera is shared by all frames, so a few frames pin it down as well as many).
GRID_SAMPLES = 8
FIT_SAMPLES = 8
#: Upper bound on the fit's objective evaluations (each renders ``FIT_SAMPLES`` frames).
FIT_MAX_EVALS = 600
#: Amplification of the |stored - ours| panel of the grid, so that small differences show.
DIFF_GAIN = 4


# ---------------------------------------------------------------------------------------- sampling
def _as_frame(frame, where: str) -> np.ndarray:
    """One frame as uint8 (H, W, 3); floats in [0, 1] are taken as normalised images."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"{where}: a frame must be an (H, W, 3) RGB image, got shape {frame.shape}")
    if frame.dtype == np.uint8:
        return frame
    frame = frame.astype(np.float64)
    if frame.size and frame.max() <= 1.0:
        frame = frame * 255.0
    return np.clip(np.rint(frame), 0, 255).astype(np.uint8)


def _as_state(state, where: str) -> np.ndarray:
    state = np.asarray(state, dtype=np.float64).reshape(-1)
    if state.shape != (4,) or not np.all(np.isfinite(state)):
        raise ValueError(f"{where}: a PointMaze state must be 4 finite numbers [x, y, vx, vy], got {state}")
    return state


def sample_pairs(frames_source, n_samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list]:
    """Draw up to ``n_samples`` (state, frame) pairs without replacement.

    ``frames_source`` is either a dataset with ``.lengths`` (int array (E,), 0 = empty slot, skipped)
    and ``.episode(i) -> {"frames": (L, H, W, 3), "states": (L, 4), ...}`` (``TrajectoryStore``,
    ``DinoWMDataset``), or an iterable of ``(state (4,), frame uint8 (H, W, 3))`` pairs.
    Returns states float64 (N, 4), frames uint8 (N, H, W, 3) and where each came from: a list of
    ``[episode, t]`` (dataset) or of pair indices (iterable).
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    rng = np.random.default_rng(seed)
    states, frames, origins = [], [], []
    if hasattr(frames_source, "lengths") and hasattr(frames_source, "episode"):
        lengths = np.asarray(frames_source.lengths, dtype=np.int64).reshape(-1)
        total = int(np.clip(lengths, 0, None).sum())
        if total == 0:
            raise ValueError("the dataset has no committed episodes (all lengths are 0): nothing to check")
        # Uniform over all valid (episode, t) steps, so long episodes are not under-represented.
        flat = np.sort(rng.choice(total, size=min(n_samples, total), replace=False))
        ends = np.cumsum(np.clip(lengths, 0, None))
        episodes = np.searchsorted(ends, flat, side="right")
        times = flat - (ends[episodes] - np.clip(lengths, 0, None)[episodes])
        for episode in np.unique(episodes):  # one read per episode
            data = frames_source.episode(int(episode))
            ep_frames, ep_states = np.asarray(data["frames"]), np.asarray(data["states"])
            if ep_frames.ndim != 4:
                raise ValueError(
                    f"episode {episode}: frames must be (L, H, W, 3), got shape {ep_frames.shape}"
                )
            if ep_states.ndim != 2 or ep_states.shape[1] != 4:
                raise ValueError(
                    f"episode {episode}: states must be (L, 4) [x, y, vx, vy], got shape {ep_states.shape}"
                )
            for t in times[episodes == episode]:
                where = f"episode {episode} step {t}"
                states.append(_as_state(ep_states[t], where))
                frames.append(_as_frame(ep_frames[t], where))
                origins.append([int(episode), int(t)])
    else:
        try:
            pairs = list(frames_source)
        except TypeError as error:
            raise ValueError(
                "frames_source must be a dataset with .lengths and .episode(i), or an iterable of "
                f"(state, frame) pairs; got {type(frames_source).__name__}"
            ) from error
        if not pairs:
            raise ValueError("no (state, frame) pairs given: nothing to check")
        chosen = np.sort(rng.choice(len(pairs), size=min(n_samples, len(pairs)), replace=False))
        for index in chosen:
            pair = pairs[int(index)]
            if len(pair) != 2:
                raise ValueError(f"pair {index}: expected (state, frame), got {len(pair)} items")
            states.append(_as_state(pair[0], f"pair {index}"))
            frames.append(_as_frame(pair[1], f"pair {index}"))
            origins.append(int(index))
    shapes = {frame.shape for frame in frames}
    if len(shapes) != 1:
        raise ValueError(f"sampled frames have different shapes {sorted(shapes)}; expected one size")
    height, width, _ = frames[0].shape
    if height != width:
        raise ValueError(f"frames must be square (our env renders img_size x img_size), got {height}x{width}")
    return np.stack(states), np.stack(frames), origins


# ---------------------------------------------------------------------------------------- rendering
def set_camera(env, distance: float | None = None, lookat=None) -> None:
    """Move ``env``'s free camera in place (no new env, no new GL context).

    Updates both the live ``MjvCamera`` and ``env.render_spec.camera`` so ``env.camera_values()``
    keeps describing what ``env.render()`` draws.
    """
    spec = env.render_spec.camera
    if distance is not None:
        env._camera.distance = float(distance)
        spec.distance = float(distance)
    if lookat is not None:
        lookat = tuple(float(v) for v in lookat)
        env._camera.lookat[:] = lookat
        spec.lookat = lookat


def render_states(env, states: np.ndarray) -> np.ndarray:
    """Render each state of float (N, 4) with ``env``'s current camera: uint8 (N, H, W, 3)."""
    frames = []
    for state in states:
        env.set_state(state)
        frames.append(env.render().copy())  # copy: the renderer may reuse its buffer
    return np.stack(frames)


def frame_mae(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-frame mean absolute error on the 0-255 scale: uint8 (N, H, W, 3) x2 -> float (N,)."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return diff.reshape(len(a), -1).mean(axis=1)


# ---------------------------------------------------------------------------------------- fitting
def fit_camera(env, states: np.ndarray, targets: np.ndarray, max_evals: int = FIT_MAX_EVALS) -> dict:
    """Fit the camera distance and lookat x, y so ``env``'s renders of ``states`` match ``targets``.

    ``states`` float (N, 4), ``targets`` uint8 (N, H, W, 3) already in top-down row order. Starts
    from ``env``'s current camera; leaves ``env`` at the best camera found. Returns
    ``{"distance", "lookat" (3,), "mae", "evals"}``.

    Why a pattern search: the MAE is piecewise constant in the camera (it changes only when an edge
    crosses a pixel centre), so gradients are useless; but it falls roughly monotonically towards
    the true camera, and every wall and checker edge steps at a different sub-pixel offset, so the
    plateau around the optimum is a small fraction of a pixel wide.
    """
    start = env.camera_values()
    d0 = float(start["distance"])
    z = float(start["lookat"][2])
    cache: dict[tuple, float] = {}

    def objective(params: np.ndarray) -> float:
        key = tuple(np.round(params, 6))
        if key not in cache:
            set_camera(env, distance=params[0], lookat=(params[1], params[2], z))
            cache[key] = float(frame_mae(render_states(env, states), targets).mean())
        return cache[key]

    best = np.array([d0, start["lookat"][0], start["lookat"][1]], dtype=np.float64)
    best_value = objective(best)
    # Coarse: the distance may be off by a large factor (a differently computed extent), which
    # small moves would have to walk; a log scan from 0.5x to 2x (~9% apart) lands near it.
    for factor in 2.0 ** np.linspace(-1.0, 1.0, 17):
        candidate = best * np.array([factor, 1.0, 1.0]) if factor != 1.0 else best
        value = objective(candidate)
        if value < best_value:
            best, best_value = candidate, value
    # Fine: coordinate moves; a success doubles that coordinate's step (to cross a long slope
    # quickly), a round without success halves all steps.
    step = np.array([0.05 * best[0], 0.25, 0.25])
    max_step = 4.0 * step
    min_step = np.array([2e-4 * best[0], 2e-3, 2e-3])
    while np.any(step > min_step) and len(cache) < max_evals:
        improved = False
        for i in range(3):
            for sign in (1.0, -1.0):
                candidate = best.copy()
                candidate[i] += sign * step[i]
                if candidate[0] <= 0.05 * d0:
                    continue
                value = objective(candidate)
                if value < best_value:
                    best, best_value, improved = candidate, value, True
                    step[i] = min(2.0 * step[i], max_step[i])
                    break
        if not improved:
            step *= 0.5
    set_camera(env, distance=best[0], lookat=(best[1], best[2], z))
    return {
        "distance": float(best[0]),
        "lookat": [float(best[1]), float(best[2]), z],
        "mae": best_value,
        "evals": len(cache),
    }


# ---------------------------------------------------------------------------------------- report
def _camera_json(values: dict) -> dict:
    return {key: (list(value) if isinstance(value, tuple) else value) for key, value in values.items()}


def _number(value: float) -> str:
    """Shortest text of ``value`` rounded to 4 decimals (1e-4 world units, far below a pixel)."""
    return repr(round(float(value), 4))


def _overrides(camera_fitted: dict | None, camera_default: dict, flip: bool, flip_configured: bool) -> list:
    """The wmlab CLI overrides (argv form) that make our env render like the dataset."""
    out = []
    if camera_fitted is not None:
        if abs(camera_fitted["distance"] - camera_default["distance"]) > 1e-3 * camera_default["distance"]:
            out.append(f"env.camera.distance={_number(camera_fitted['distance'])}")
        if np.max(np.abs(np.subtract(camera_fitted["lookat"], camera_default["lookat"]))) > 1e-3:
            lookat = ",".join(_number(v) for v in camera_fitted["lookat"])
            out.append(f"env.camera.lookat=[{lookat}]")
    if flip != flip_configured:
        out.append(f"env.flip_vertical={str(flip).lower()}")
    return out


def _shell_quote(override: str) -> str:
    # Brackets are glob characters in a shell, so a list value must be quoted to be copy-pasteable.
    return f"'{override}'" if any(c in override for c in "[]*? ") else override


def _upscale(frame: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(frame, factor, axis=0), factor, axis=1) if factor > 1 else frame


def write_grid(path: Path, columns: list[np.ndarray]) -> None:
    """Write a PNG with one row per sample and one column per uint8 (N, H, W, 3) array."""
    import imageio.v2 as imageio

    n, height = len(columns[0]), columns[0].shape[1]
    factor = max(1, 128 // height)  # small frames are blown up (nearest) so edges are visible
    gap = 2
    cell = height * factor
    grid = np.full(
        (n * cell + (n + 1) * gap, len(columns) * cell + (len(columns) + 1) * gap, 3), 255, np.uint8
    )
    for row in range(n):
        for col, frames in enumerate(columns):
            top, left = gap + row * (cell + gap), gap + col * (cell + gap)
            grid[top : top + cell, left : left + cell] = _upscale(frames[row], factor)
    imageio.imwrite(path, grid)


def _diff_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)) * DIFF_GAIN
    return np.clip(diff, 0, 255).astype(np.uint8)


def check_render(
    frames_source,
    out_dir,
    *,
    env: str = "point_maze",
    n_samples: int = 16,
    seed: int = 0,
    fit: bool = True,
    env_kwargs: dict | None = None,
) -> dict:
    """Compare our renders of sampled dataset states with the dataset's frames; maybe fit the camera.

    ``frames_source``: see :func:`sample_pairs`. ``env_kwargs`` configure our env as the user runs it
    (camera, flip_vertical, ...); ``img_size`` is taken from the frames. Writes ``check_render.png``
    (rows: stored | ours | |diff| x4 [| ours fitted | |diff| x4]) and ``check_render.json`` to
    ``out_dir`` and returns the report: ``mae`` (as configured), ``mae_flipped`` (stored frames
    flipped vertically), ``flip_vertical`` (the better row order), ``camera_default``,
    ``camera_fitted`` / ``mae_fitted`` (None unless fitted), ``overrides`` (argv form) and ``advice``.
    """
    from wmlab.envs import make_env

    states, frames, origins = sample_pairs(frames_source, n_samples, seed)
    kwargs = dict(env_kwargs or {})
    kwargs.pop("img_size", None)
    flip_configured = bool(kwargs.pop("flip_vertical", False))
    # Our env always renders top-down here; the row order is compared by flipping stored frames.
    sim = make_env(env, img_size=int(frames.shape[1]), **kwargs, flip_vertical=False)
    try:
        camera_default = sim.camera_values()
        ours = render_states(sim, states)
        ours_configured = ours[:, ::-1] if flip_configured else ours
        per_sample = frame_mae(frames, ours_configured)
        per_sample_flipped = frame_mae(frames[:, ::-1], ours_configured)
        mae, mae_flipped = float(per_sample.mean()), float(per_sample_flipped.mean())
        flip = flip_configured if mae <= mae_flipped else not flip_configured
        best_mae = min(mae, mae_flipped)

        camera_fitted = mae_fitted = per_sample_fitted = fit_info = ours_fitted = None
        if fit and best_mae > MATCH_THRESHOLD:
            started = time.perf_counter()
            k = min(FIT_SAMPLES, len(states))
            fits = {}
            # Fit under the better row order first; if the other order wins at the fitted camera
            # (possible when the camera is far off), fit that one too and keep the better.
            for candidate_flip in (flip, not flip):
                targets = frames[:k, ::-1] if candidate_flip else frames[:k]
                set_camera(sim, camera_default["distance"], camera_default["lookat"])
                fits[candidate_flip] = fit_camera(sim, states[:k], targets)
                other_targets = frames[:k] if candidate_flip else frames[:k, ::-1]
                other = float(frame_mae(render_states(sim, states[:k]), other_targets).mean())
                if other >= fits[candidate_flip]["mae"]:
                    break
            flip = min(fits, key=lambda f: fits[f]["mae"])
            fit_info = fits[flip]
            set_camera(sim, fit_info["distance"], fit_info["lookat"])
            ours_fitted = render_states(sim, states)
            per_sample_fitted = frame_mae(frames[:, ::-1] if flip else frames, ours_fitted)
            mae_fitted = float(per_sample_fitted.mean())
            camera_fitted = _camera_json(sim.camera_values())
            fit_info = {
                "evals": sum(f["evals"] for f in fits.values()),
                "seconds": round(time.perf_counter() - started, 2),
                "samples": k,
            }
            if flip:
                ours_fitted = ours_fitted[:, ::-1]
    finally:
        sim.close()

    overrides = _overrides(camera_fitted, camera_default, flip, flip_configured)
    final_mae = mae_fitted if mae_fitted is not None else best_mae
    if not overrides and final_mae <= MATCH_THRESHOLD:
        advice = "frames match"
    elif overrides:
        advice = "set " + " ".join(_shell_quote(o) for o in overrides)
        if final_mae > MATCH_THRESHOLD:
            advice += (
                f" (residual MAE {final_mae:.2f} > {MATCH_THRESHOLD}: colours or lighting may differ too)"
            )
    elif not fit:
        advice = f"frames differ (MAE {best_mae:.2f}); run with fit=true to fit the camera"
    else:
        advice = (
            f"frames differ (MAE {final_mae:.2f}) and no camera distance/lookat/flip change helps: "
            "colours, lighting or the camera angle may differ"
        )

    report = {
        "n_samples": len(states),
        "frame_size": [int(v) for v in frames.shape[1:]],
        "mae": mae,
        "mae_flipped": mae_flipped,
        "flip_vertical": bool(flip),
        "camera_default": _camera_json(camera_default),
        "camera_fitted": camera_fitted,
        "mae_fitted": mae_fitted,
        "fit": fit_info,
        "threshold": MATCH_THRESHOLD,
        "overrides": overrides,
        "advice": advice,
        "samples": [
            {
                "source": origin,
                "mae": float(per_sample[i]),
                "mae_flipped": float(per_sample_flipped[i]),
                **({"mae_fitted": float(per_sample_fitted[i])} if per_sample_fitted is not None else {}),
            }
            for i, origin in enumerate(origins)
        ],
    }

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = min(GRID_SAMPLES, len(states))
    columns = [frames[:g], ours_configured[:g], _diff_image(frames[:g], ours_configured[:g])]
    if ours_fitted is not None:
        columns += [ours_fitted[:g], _diff_image(frames[:g], ours_fitted[:g])]
    write_grid(out_dir / "check_render.png", columns)
    (out_dir / "check_render.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
