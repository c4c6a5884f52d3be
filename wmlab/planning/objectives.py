"""Planning objectives: distance from predicted latents to the goal's, and the world-model cost_fn.

``Objective`` is DINO-WM's ``create_objective_fn`` (``planning/objectives.py``):

- ``mode="last"``: distance of the last predicted frame to the goal;
- ``mode="all"``: every predicted frame's distance, weighted by ``base**i`` (i = 0 for the first
  predicted frame) normalised to sum 1, so later frames count more;
- distance = mean over tokens and channels of the squared (``metric="mse"``) or absolute (``"l1"``)
  difference, plus ``alpha`` x the same distance between the proprio embeddings.

DINO-WM's PointMaze plan uses last / MSE / alpha 0; its other envs alpha 1. One difference in
``mode="all"``: DINO-WM scores all of its rollout's frames, the observed first frame too; here only the
predicted frames are scored. The observed frame's distance is the same for every candidate, so the
ranking of candidates (and so every plan) is unchanged; only the cost's scale differs.
"""

from __future__ import annotations

import torch

MODES = ("last", "all")
METRICS = ("mse", "l1")


class Objective:
    """objective(pred_visual (B, S, T, N, D), pred_proprio (B, S, T, E), goal_visual (B, N, D),
    goal_proprio (B, E)) -> costs (B, S). ``goal_proprio`` is the goal's proprio *embedding*."""

    def __init__(
        self, mode: str = "last", metric: str = "mse", alpha: float = 0.0, base: float = 2.0
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"objective mode must be one of {MODES}, got {mode!r}")
        if metric not in METRICS:
            raise ValueError(f"objective metric must be one of {METRICS}, got {metric!r}")
        if alpha < 0 or base <= 0:
            raise ValueError(f"objective needs alpha >= 0 and base > 0, got {alpha=}, {base=}")
        self.mode, self.metric, self.alpha, self.base = mode, metric, float(alpha), float(base)

    def __repr__(self) -> str:
        return f"Objective(mode={self.mode!r}, metric={self.metric!r}, alpha={self.alpha}, base={self.base})"

    def distance(self, pred: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """pred (B, S, T, *F), goal (B, *F) -> per-frame distance (B, S, T), averaged over F."""
        diff = pred - goal[:, None, None]  # (B, S, T, *F)
        d = diff.square() if self.metric == "mse" else diff.abs()
        return d.flatten(3).mean(dim=3)  # (B, S, T)

    def frame_weights(self, T: int, device=None) -> torch.Tensor:
        """(T,) weights of the predicted frames: one-hot on the last, or base**i normalised."""
        if self.mode == "last":
            w = torch.zeros(T, device=device)
            w[-1] = 1.0
            return w
        w = self.base ** torch.arange(T, device=device, dtype=torch.float64)
        return (w / w.sum()).float()

    def __call__(
        self,
        pred_visual: torch.Tensor,
        pred_proprio: torch.Tensor,
        goal_visual: torch.Tensor,
        goal_proprio: torch.Tensor,
    ) -> torch.Tensor:
        B, S, T, N, D = pred_visual.shape
        assert pred_proprio.shape[:3] == (B, S, T) and pred_proprio.ndim == 4, (
            f"pred_proprio {tuple(pred_proprio.shape)} does not match pred_visual {tuple(pred_visual.shape)}"
        )
        E = pred_proprio.shape[3]
        assert tuple(goal_visual.shape) == (B, N, D), (
            f"goal_visual {tuple(goal_visual.shape)} must be (B, N, D) = {(B, N, D)}"
        )
        assert tuple(goal_proprio.shape) == (B, E), (
            f"goal_proprio {tuple(goal_proprio.shape)} must be the goal's proprio embedding (B, E) = {(B, E)}"
        )
        if self.mode == "last":  # only the last frame is needed: skip the others' distances
            pred_visual, pred_proprio = pred_visual[:, :, -1:], pred_proprio[:, :, -1:]
        w = self.frame_weights(pred_visual.shape[2], pred_visual.device).to(pred_visual.dtype)  # (T',)
        cost = self.distance(pred_visual, goal_visual) @ w  # (B, S)
        if self.alpha:
            cost = cost + self.alpha * (self.distance(pred_proprio, goal_proprio) @ w.to(pred_proprio.dtype))
        return cost


def rollout_cost_fn(
    model,
    obs_visual: torch.Tensor,
    obs_proprio: torch.Tensor,
    goal_visual: torch.Tensor,
    goal_proprio: torch.Tensor,
    objective: Objective,
    chunk: int | str | None = "auto",
    *,
    past_actions: torch.Tensor | None = None,
    memory_budget: int | None = None,
    precision: str = "fp32",
):
    """A planner's cost_fn: roll the world model out on candidate actions and score predicted frames.

    model: a ``LatentWorldModel`` in eval mode (dropout would make costs random).
    obs_visual (B, n, N, Dv), obs_proprio (B, n, P): the n observed frames' encoder tokens and
        normalised proprio, encoded once by the caller (images are never re-encoded here).
    goal_visual (B, N, Dv): goal encoder tokens (standardised here as the model's latents are);
        goal_proprio (B, P): the goal's normalised *raw* proprio,
        embedded here once with the model's proprio encoder, as the rollout's proprio output is.
    chunk: sequences per rollout call, over all start states together (the B x S candidates are
        one list of rows, so a call may span episodes); "auto" or None (default): as many as fit
        ``memory_budget`` (``wmlab.planning.memory``); an int: exactly that many.
    past_actions (B, n - 1, A): the actions taken between the observed frames (needed when n > 1).
    memory_budget: bytes one rollout call may use (auto chunks); None: the device's default budget
        (``memory.default_budget``: CUDA free memory or host RAM, with headroom).
    precision: fp32, bf16 or tf32 (a resolved choice, see ``wmlab.precision``); costs return as fp32.

    Returns cost_fn(actions (B, S, T, A)) -> (B, S): the rollout runs actions[:, :, 0] from the last
    observed frame and T model steps; the T predicted frames are scored. Differentiable in the actions
    (for GD) unless called under torch.no_grad(). ``cost_fn.last_chunk`` / ``max_chunk`` are the rows per
    rollout call of the latest call / the largest so far (for metadata). Chunked costs equal unchunked
    ones to fp rounding (rows are independent).
    """
    from wmlab.planning.memory import auto_chunk, default_budget
    from wmlab.precision import precision_context

    if model.training:
        raise ValueError("rollout_cost_fn: call model.eval() first (dropout would make the costs random)")
    cfg = model.cfg
    B, n, N, Dv = obs_visual.shape
    assert (N, Dv) == (cfg.num_visual_tokens, cfg.visual_dim), (
        f"obs_visual {tuple(obs_visual.shape)} does not match the model's tokens "
        f"({cfg.num_visual_tokens}, {cfg.visual_dim})"
    )
    assert tuple(obs_proprio.shape) == (B, n, cfg.proprio_dim), (
        f"obs_proprio {tuple(obs_proprio.shape)} must be (B, n, P) = {(B, n, cfg.proprio_dim)}"
    )
    assert tuple(goal_visual.shape) == (B, N, Dv), (
        f"goal_visual {tuple(goal_visual.shape)} must be {(B, N, Dv)}"
    )
    assert tuple(goal_proprio.shape) == (B, cfg.proprio_dim), (
        f"goal_proprio {tuple(goal_proprio.shape)} must be the raw normalised proprio (B, P) = "
        f"{(B, cfg.proprio_dim)}; it is embedded here"
    )
    if n > 1:
        if past_actions is None or tuple(past_actions.shape) != (B, n - 1, cfg.action_dim):
            got = None if past_actions is None else tuple(past_actions.shape)
            raise ValueError(
                f"rollout_cost_fn: {n} observed frames need past_actions (B, n-1, A) = "
                f"{(B, n - 1, cfg.action_dim)}, got {got}"
            )
    if chunk is None:
        chunk = "auto"
    if chunk != "auto" and (isinstance(chunk, str) or int(chunk) != chunk or chunk < 1):
        raise ValueError(f"rollout_cost_fn: chunk must be an integer >= 1, 'auto' or null, got {chunk!r}")
    if memory_budget is not None and memory_budget <= 0:
        raise ValueError(f"rollout_cost_fn: memory_budget must be > 0 bytes or null, got {memory_budget}")
    device = obs_visual.device
    with torch.no_grad():
        goal_proprio_emb = model.proprio_encoder(goal_proprio)  # (B, Ep)
        # The rollout's visual output is in the model's latent units; bring the goal's tokens there too.
        goal_visual = model.standardize_visual(goal_visual)  # (B, N, Dv)

    def rows_per_call(S: int, T: int, grad: bool) -> int:
        if chunk != "auto":
            return min(int(chunk), B * S)
        budget = memory_budget if memory_budget is not None else default_budget(device)
        return auto_chunk(cfg, n, T, B * S, budget=budget, grad=grad)

    def score(visual, proprio, goal_v, goal_p, part):
        """One rollout call: starts visual (b, n, N, Dv), proprio (b, n, P), candidates part (b, s, T', A)
        with T' = n - 1 + T -> costs (b, s) of the T predicted frames."""
        T = part.shape[2] - (n - 1)
        out = model.rollout(visual, proprio, part)  # frames (b, s, n+T, ...)
        return objective(out["visual"][:, :, -T:], out["proprio"][:, :, -T:], goal_v, goal_p).float()

    def cost_fn(actions: torch.Tensor) -> torch.Tensor:
        B_, S, T, A = actions.shape
        assert (B_, A) == (B, cfg.action_dim), (
            f"actions {tuple(actions.shape)} must be (B, S, T, A) with B={B}, A={cfg.action_dim}"
        )
        if n > 1:  # the past actions go with the earlier observed frames
            past = past_actions[:, None].expand(B, S, n - 1, A).to(actions.dtype)
            actions = torch.cat([past, actions], dim=2)  # (B, S, n-1+T, A)
        rows = rows_per_call(S, T, torch.is_grad_enabled() and actions.requires_grad)
        cost_fn.last_chunk, cost_fn.max_chunk = rows, max(rows, cost_fn.max_chunk)
        with precision_context(precision, device):
            if rows >= B * S:  # everything in one call
                return score(obs_visual, obs_proprio, goal_visual, goal_proprio_emb, actions)
            # B*S rows in calls of `rows`: each row its own start (a call may span episodes)
            flat = actions.reshape(B * S, 1, actions.shape[2], A)  # (B*S, 1, T', A)
            costs = []
            for start in range(0, B * S, rows):
                idx = torch.arange(start, min(start + rows, B * S), device=device)  # (r,)
                b = idx // S  # (r,) each row's start state
                costs.append(
                    score(obs_visual[b], obs_proprio[b], goal_visual[b], goal_proprio_emb[b], flat[idx])[:, 0]
                )  # (r,)
            return torch.cat(costs).reshape(B, S)  # (B, S)

    cost_fn.last_chunk, cost_fn.max_chunk = None, 0
    return cost_fn
