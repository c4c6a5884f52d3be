"""What the world model imagined for a planned action sequence, beside what really happened.

    record_imagined(run_dir, policy, env, starts, goals, out_dir, n) -> summary fields

For the first ``n`` episodes of a ``wmlab plan`` cell, the first plan's chosen actions (B, T, A), T =
goal_H model steps in normalised model-step action space (``WorldModelPolicy.last_results[0]``), are

- rolled out by the world model from the episode's start frame (as the planner's cost did: one
  observed frame, T planned steps) and decoded to pixels: the *imagined* frames at model steps 0..T;
- executed open loop in the env from the same start state (``env_actions``: T x frameskip raw
  actions), rendered after every model step (env step k x frameskip, the frames the episode video
  records): the *real* frames of exactly those actions.

Each episode gets ``imagined/episode_XXX.png``: top row the real frames 0..T then the goal frame,
bottom row the decoded imagined frames 0..T then the decoded goal (the goal's encoder tokens through the
same decoder: what the objective compares the last imagined frame with); T + 2 tiles of s x s pixels
(s: the decoder's output size; real frames are resized to it).

Decoders, in this order: the run's ``decoder.safetensors`` (``wmlab train-decoder``), then the
encoder's own ``decode`` (in-domain encoders: ``vae``, ``dino_tok``). Both read *encoder token units*;
the rollout's latents are converted with ``raw_visual`` first (``train_decoder.decode_latents``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from wmlab.integrity import atomic_write_bytes
from wmlab.train_decoder import _frames_to_targets, decode_latents, tile_rows

IMAGINED_DIR = "imagined"

#: tokens (M, N, D) in encoder units -> images (M, 3, s, s) in [-1, 1]
Decode = Callable[[torch.Tensor], torch.Tensor]


def find_decoder(run_dir: Path | None, model) -> tuple[Decode | None, str]:
    """(decode, what it is) for the run's latents, or (None, the reason: which decoders were looked for).

    model: a ``PlanningModel``. The run's ``decoder.safetensors`` comes first; then the encoder's own
    ``decode`` (tokens -> images in [0, 1]), unless its tokens are pooled (the decoder reads the grid
    it was trained on). A decoder that cannot be loaded is a reason, not an error: the plan's results
    stand without the pictures."""
    from wmlab.train_decoder import load_decoder

    encoder = model.encoder
    looked = []
    if run_dir is not None:
        path = Path(run_dir) / "decoder.safetensors"
        if path.is_file():
            try:
                decoder = load_decoder(run_dir, model.device)
            except (OSError, ValueError, KeyError, RuntimeError) as err:
                looked.append(f"{path} (present but could not be loaded: {err})")
            else:
                return decoder, f"run decoder {path}"
        else:
            looked.append(f"{path} (not found; train one with `wmlab train-decoder run_dir={run_dir}`)")
    name = encoder.info.name
    if callable(getattr(encoder, "decode", None)) and encoder.info.token_pool == 1:
        return (lambda tokens: encoder.decode(tokens) * 2 - 1), f"encoder {name}'s own decode"
    why = "its tokens are pooled" if callable(getattr(encoder, "decode", None)) else "it has none"
    looked.append(f"a decode method of encoder {name} ({why}; vae and dino_tok have one)")
    return None, "no decoder for this run's latents: looked for " + " and ".join(looked)


@torch.no_grad()
def imagine(
    model, decode: Decode, frames: np.ndarray, proprio: np.ndarray, actions: torch.Tensor
) -> torch.Tensor:
    """The world model's open-loop rollout of ``actions`` from the start frames, decoded.

    model: ``PlanningModel``; frames uint8 (B, H, W, 3) and raw proprio (B, P) of the start states;
    actions (B, T, A) normalised model-step actions (a plan). As the planner's cost: one observed frame,
    ``actions[:, 0]`` goes with it, T frames are predicted. Returns (B, T + 1, 3, s, s) in [-1, 1]:
    model steps 0..T (step 0: the start frame's own tokens, decoded)."""
    visual, proprio = model.encode(frames, proprio)  # (B, N, D) encoder tokens, (B, P) normalised
    actions = actions.to(model.device, torch.float32)
    out = model.world_model.rollout(visual[:, None], proprio[:, None], actions)  # visual (B, T+1, N, D)
    return decode_latents(decode, model.world_model, out["visual"])  # (B, T+1, 3, s, s)


@torch.no_grad()
def decode_frames(model, decode: Decode, frames: np.ndarray) -> torch.Tensor:
    """Frames uint8 (B, H, W, 3) -> their encoder tokens, decoded: (B, 3, s, s) in [-1, 1]."""
    return decode(
        model.encoder.encode(torch.as_tensor(np.ascontiguousarray(frames), device=model.device)).float()
    )


def real_rollout(env, starts: np.ndarray, env_actions: np.ndarray, frameskip: int) -> np.ndarray:
    """Execute raw actions open loop from each start state; frames at every model step.

    starts (B, S) env states; env_actions (B, T * frameskip, A_env) raw actions (``env_actions`` of a
    plan). Resets ``env`` to each start as ``EpisodeBatch`` does. Returns uint8 (B, T + 1, H, W, 3):
    the rendered frame at env steps 0, frameskip, ..., T * frameskip."""
    L = env_actions.shape[1]
    if L % frameskip:
        raise ValueError(f"{L} env actions are not a whole number of model steps of {frameskip}")
    out = []
    for start, actions in zip(starts, env_actions, strict=True):
        env.reset(options={"state": np.asarray(start, dtype=np.float64)})
        frames = [env.render()]
        for k in range(0, L, frameskip):
            for action in actions[k : k + frameskip]:
                env.step(action)
            frames.append(env.render())
        out.append(np.stack(frames))
    return np.stack(out)


def goal_frames(env, goals: np.ndarray) -> np.ndarray:
    """The env rendered at each goal state (B, S) -> uint8 (B, H, W, 3), as ``EpisodeBatch``."""
    frames = []
    for goal in goals:
        env.set_state(goal)
        frames.append(env.render())
    return np.stack(frames)


def imagined_png(
    real: np.ndarray, goal: np.ndarray, imagined: torch.Tensor, goal_decoded: torch.Tensor
) -> np.ndarray:
    """One episode's picture: uint8 (2s, (T + 2) s, 3).

    real uint8 (T + 1, H, W, 3) and goal uint8 (H, W, 3): the top row (resized to s); imagined
    (T + 1, 3, s, s) and goal_decoded (3, s, s) in [-1, 1]: the bottom row."""
    size = imagined.shape[-1]
    top = _frames_to_targets(torch.as_tensor(np.concatenate([real, goal[None]])).to(imagined.device), size)
    bottom = torch.cat([imagined, goal_decoded[None]])  # (T+2, 3, s, s)
    return tile_rows([top, bottom]).permute(1, 2, 0).numpy()  # (2s, (T+2)s, 3)


def record_imagined(run_dir: Path | None, policy, env, starts: np.ndarray, goals: np.ndarray, out_dir: Path,
                    n: int) -> dict:  # fmt: skip
    """Write ``<out_dir>/imagined/episode_XXX.png`` for the first ``n`` episodes of an evaluated plan
    cell and return the summary's fields: ``imagined`` (paths relative to out_dir), with
    ``imagined_decoder`` (which decoder drew them) or ``imagined_note`` (why there are none).

    policy: the ``WorldModelPolicy`` after ``evaluate_policy`` (its ``last_results[0]`` is the first
    plan, (B, T, A) for all episodes in order); starts, goals (B, S): the cell's pairs; env: an env of
    the cell (reset here). A baseline (no world model) or n = 0 gives no pictures, with the reason."""
    import imageio.v3 as iio

    model = getattr(policy, "model", None)
    results = getattr(policy, "last_results", None)
    if model is None or not results:
        return {"imagined": [], "imagined_note": f"{type(policy).__name__} plans through no world model"}
    if n <= 0:
        return {"imagined": [], "imagined_note": "n_videos=0: no episode recorded"}
    decode, what = find_decoder(run_dir, model)
    if decode is None:
        return {"imagined": [], "imagined_note": what}
    n = min(int(n), len(starts))
    actions = results[0].actions[:n].detach()  # (n, T, A) the first plan of each episode
    real = real_rollout(env, starts[:n], model.env_actions(actions), model.frameskip)  # (n, T+1, H, W, 3)
    goal = goal_frames(env, goals[:n])  # (n, H, W, 3)
    imagined = imagine(model, decode, real[:, 0], np.asarray(starts[:n], dtype=np.float32), actions)
    goal_decoded = decode_frames(model, decode, goal)  # (n, 3, s, s)
    folder = Path(out_dir) / IMAGINED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"episode_{i:03d}.png"
        png = iio.imwrite(
            "<bytes>", imagined_png(real[i], goal[i], imagined[i], goal_decoded[i]), extension=".png"
        )
        atomic_write_bytes(path, png, fsync=False)
        paths.append(str(path.relative_to(out_dir)))
    return {"imagined": paths, "imagined_decoder": what}
