"""The latent world model (M): embeddings + block-causal predictor over frozen visual tokens.

Token layout per frame (DINO-WM). With ``concat_dim=1`` the proprio and action embeddings are
tiled onto every visual token: width = Dv + Ep + Ea (384 + 10 + 10 = 404 for DINOv2-S). With
``concat_dim=0`` they are two extra tokens (Dv must then equal Ep = Ea). One model step carries
``frameskip`` raw actions concatenated (2 x 5 = 10 for PointMaze), already z-scored.

Training is teacher-forced: from frames 0..H-1 predict 1..H in one pass; the loss is MSE on the
visual and proprio parts, never on the action part (actions are inputs, not predictions).

Latent standardisation (``latent_norm="channel"``, wmlab's default for runs it trains): the encoder's
tokens are shifted and scaled per channel by statistics of the training episodes (buffers saved with the
weights) before they enter z. Everything downstream of ``embed``, the predictor, the training loss, the
rollout's ``visual`` output and the planning objective (which standardises the goal with
``standardize_visual``), then works in units of each channel's spread. Without it, one encoder's
latents move 5000x more per step than another's, so a GD step size or an MSE cost means something
different for each. ``"none"`` keeps DINO-WM's raw tokens (imported DINO-WM runs, older wmlab runs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from wmlab.models.predictor import BlockCausalPredictor, PredictorConfig

LATENT_NORMS = ("none", "channel")


@dataclass
class WorldModelConfig:
    visual_dim: int  # Dv, width of the encoder's tokens
    num_visual_tokens: int  # N, tokens per frame from the encoder
    action_dim: int = 10  # frameskip * raw action dim
    proprio_dim: int = 4
    action_emb_dim: int = 10
    proprio_emb_dim: int = 10
    num_hist: int = 3
    num_pred: int = 1
    concat_dim: int = 1
    #: False = DINO-WM (predict the next latent). True = predict the change from the current latent
    #: through a zero-initialised linear head on the predictor's output, so training starts at the
    #: copy-last-frame model; needed for tokens that barely move, such as raw pixels (see README).
    predict_delta: bool = False
    #: False = the no-proprio arm: the predictor sees zeros for proprio (same token layout and size, no
    #: information) and only the visual part is scored, so planning quality rests on the visual latent.
    use_proprio: bool = True
    #: "none" = DINO-WM's raw encoder tokens; "channel" = per-channel standardisation with the training
    #: episodes' mean and std (buffers visual_shift / visual_scale; see the module docstring).
    latent_norm: str = "none"
    predictor: dict = field(default_factory=dict)  # PredictorConfig fields except the derived ones

    def predictor_config(self) -> PredictorConfig:
        derived = {"num_frames": self.num_hist, "num_tokens": self.num_tokens, "dim": self.token_dim}
        return PredictorConfig(**{**self.predictor, **derived})

    @property
    def num_tokens(self) -> int:
        return self.num_visual_tokens + (2 if self.concat_dim == 0 else 0)

    @property
    def token_dim(self) -> int:
        if self.concat_dim == 0:
            return self.visual_dim
        return self.visual_dim + self.proprio_emb_dim + self.action_emb_dim

    def to_dict(self) -> dict:
        return asdict(self)


class LatentWorldModel(nn.Module):
    """Embeds (visual tokens, proprio, actions) into z, predicts next-frame z, rolls out plans."""

    def __init__(self, cfg: WorldModelConfig) -> None:
        super().__init__()
        if cfg.concat_dim not in (0, 1):
            raise ValueError(f"concat_dim must be 0 or 1, got {cfg.concat_dim}")
        if cfg.num_pred != 1:
            raise ValueError("only num_pred=1 is supported (as in DINO-WM)")
        if cfg.concat_dim == 0 and not (cfg.visual_dim == cfg.action_emb_dim == cfg.proprio_emb_dim):
            raise ValueError("concat_dim=0 needs action_emb_dim == proprio_emb_dim == the visual token width")
        if cfg.latent_norm not in LATENT_NORMS:
            raise ValueError(f"latent_norm must be one of {LATENT_NORMS}, got {cfg.latent_norm!r}")
        self.cfg = cfg
        if cfg.latent_norm == "channel":
            # Identity until set_latent_statistics (train.py, from the training episodes); loaded with the
            # weights afterwards, so a checkpoint's statistics can never disagree with its predictor.
            self.register_buffer("visual_shift", torch.zeros(cfg.visual_dim))
            self.register_buffer("visual_scale", torch.ones(cfg.visual_dim))
        # DINO-WM uses Conv1d(kernel=1), i.e. the same linear map applied at every step.
        self.action_encoder = nn.Linear(cfg.action_dim, cfg.action_emb_dim)
        self.proprio_encoder = nn.Linear(cfg.proprio_dim, cfg.proprio_emb_dim)
        self.predictor = BlockCausalPredictor(cfg.predictor_config())
        if cfg.predict_delta:
            # A full linear head, zero-initialised: training starts exactly at "the next frame equals
            # this one" and can learn at once from the predictor's features. (Zeroing the final
            # LayerNorm's scale instead starves the blocks of gradient, and a LayerNorm's output has
            # unit variance per token, so it cannot say "no change here, a change there".)
            self.delta_head = nn.Linear(cfg.token_dim, cfg.token_dim)
            nn.init.zeros_(self.delta_head.weight)
            nn.init.zeros_(self.delta_head.bias)

    # ------------------------------------------------------------------ latent standardisation
    def set_latent_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Set the per-channel shift (D,) and scale (D,) of a ``latent_norm="channel"`` model."""
        if self.cfg.latent_norm != "channel":
            raise ValueError(
                f"set_latent_statistics needs latent_norm='channel', not {self.cfg.latent_norm!r}"
            )
        D = self.cfg.visual_dim
        if tuple(mean.shape) != (D,) or tuple(std.shape) != (D,):
            raise ValueError(
                f"latent statistics must be ({D},) each, got {tuple(mean.shape)}, {tuple(std.shape)}"
            )
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("latent statistics must be finite with std > 0")
        self.visual_shift.copy_(mean)
        self.visual_scale.copy_(std)

    def standardize_visual(self, visual: torch.Tensor) -> torch.Tensor:
        """Encoder tokens (..., N, Dv) -> the model's visual latent (identity when latent_norm="none")."""
        if self.cfg.latent_norm == "none":
            return visual
        return (visual - self.visual_shift.to(visual.dtype)) / self.visual_scale.to(visual.dtype)

    def raw_visual(self, visual: torch.Tensor) -> torch.Tensor:
        """The inverse of ``standardize_visual``: the model's visual latent -> encoder token units
        (for a pixel decoder trained on the encoder's tokens)."""
        if self.cfg.latent_norm == "none":
            return visual
        return visual * self.visual_scale.to(visual.dtype) + self.visual_shift.to(visual.dtype)

    # ------------------------------------------------------------------ token layout
    def embed(self, visual: torch.Tensor, proprio: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """visual (B, T, N, Dv) encoder tokens, proprio (B, T, P), actions (B, T, A) -> z (B, T, N', D').
        The visual tokens are standardised here (``standardize_visual``)."""
        B, T, N, Dv = visual.shape
        assert (N, Dv) == (self.cfg.num_visual_tokens, self.cfg.visual_dim), (
            f"visual tokens {tuple(visual.shape)} do not match the model's ({N=}, {Dv=}) -> "
            f"({self.cfg.num_visual_tokens}, {self.cfg.visual_dim})"
        )
        visual = self.standardize_visual(visual)
        if not self.cfg.use_proprio:
            proprio = torch.zeros_like(proprio)  # the no-proprio arm: nothing of the true state gets in
        p = self.proprio_encoder(proprio)  # (B, T, Ep)
        a = self.action_encoder(actions)  # (B, T, Ea)
        if self.cfg.concat_dim == 0:
            return torch.cat([visual, p[:, :, None], a[:, :, None]], dim=2)  # (B, T, N+2, Dv)
        p = p[:, :, None].expand(B, T, N, p.shape[-1])  # (B, T, N, Ep)
        a = a[:, :, None].expand(B, T, N, a.shape[-1])  # (B, T, N, Ea)
        return torch.cat([visual, p, a], dim=3)  # (B, T, N, Dv+Ep+Ea)

    def replace_actions(self, z: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """z (B, T, N', D') with its action part replaced by the embedding of actions (B, T, A)."""
        a = self.action_encoder(actions)  # (B, T, Ea)
        if self.cfg.concat_dim == 0:
            return torch.cat([z[:, :, :-1], a[:, :, None]], dim=2)
        B, T, N, _ = z.shape
        Ea = self.cfg.action_emb_dim
        return torch.cat([z[..., :-Ea], a[:, :, None].expand(B, T, N, Ea)], dim=3)

    def split(self, z: torch.Tensor) -> dict:
        """z (..., N', D') -> {"visual": (..., N, Dv), "proprio": (..., Ep)}, as DINO-WM's separate_emb."""
        if self.cfg.concat_dim == 0:
            return {"visual": z[..., :-2, :], "proprio": z[..., -2, :]}
        Dv, Ep = self.cfg.visual_dim, self.cfg.proprio_emb_dim
        return {"visual": z[..., :Dv], "proprio": z[..., 0, Dv : Dv + Ep]}

    def _prediction_part(self, z: torch.Tensor) -> torch.Tensor:
        """The part of z that is predicted and scored: everything but the action embedding (and, in the
        no-proprio arm, the proprio embedding, which then carries no information)."""
        if self.cfg.concat_dim == 0:
            return z[:, :, :-1] if self.cfg.use_proprio else z[:, :, :-2]
        return z[..., : -self.cfg.action_emb_dim] if self.cfg.use_proprio else z[..., : self.cfg.visual_dim]

    # ------------------------------------------------------------------ prediction
    def predict(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, T, N', D') with T <= num_hist -> next-frame predictions (B, T, N', D')."""
        out = self.predictor(z)
        return z + self.delta_head(out) if self.cfg.predict_delta else out

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Teacher-forced loss on a window batch: visual (B, H+1, N, Dv) tokens, proprio (B, H+1, P),
        actions (B, H+1, A). Returns (loss, components) with visual and proprio parts separately."""
        z = self.embed(batch["visual"], batch["proprio"], batch["actions"])  # (B, H+1, N', D')
        H = self.cfg.num_hist
        pred = self.predict(z[:, :H])  # (B, H, N', D')
        target = z[:, self.cfg.num_pred :].detach()  # (B, H, N', D')
        loss = F.mse_loss(self._prediction_part(pred), self._prediction_part(target))
        with torch.no_grad():
            p, t = self.split(pred), self.split(target)
            parts = {
                "z_loss": loss.detach(),
                "z_visual_loss": F.mse_loss(p["visual"], t["visual"]),
                "z_proprio_loss": F.mse_loss(p["proprio"], t["proprio"]),
            }
        return loss, parts

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """The training loss (so DDP, which syncs gradients through forward, can wrap the model)."""
        return self.loss(batch)

    def rollout(
        self, visual: torch.Tensor, proprio: torch.Tensor, actions: torch.Tensor, *, fast: bool | None = None
    ) -> dict:
        """Autoregressive rollout of S candidate action sequences from each of B start histories.

        visual (B, n, N, Dv) and proprio (B, n, P): the n observed frames, encoded once.
        actions (B, S, n + t, A) or (B, n + t, A): the first n go with the observed frames (as in
        DINO-WM), the next t are planned. Returns {"z": (B, S, n + t + 1, N', D'), "visual":
        (B, S, n + t + 1, N, Dv), "proprio": (B, S, n + t + 1, Ep)}; the last t + 1 frames are predicted.
        "visual" is in the model's latent units (standardised when latent_norm="channel"; compare it with
        ``standardize_visual(tokens)``, decode ``raw_visual`` of it).

        fast (default: in eval mode): compute only what the rollout reads, the last frame of each
        predictor call, with the same result to fp32 rounding. While the window still starts at frame 0
        (the first num_hist - n + 1 calls) earlier frames' keys/values are cached, not recomputed; after
        that the window slides (positions change) and is recomputed, except for the last block's
        queries and MLP on frames before the last. In training mode (dropout) the reference path runs.
        """
        squeeze = actions.ndim == 3
        if squeeze:
            actions = actions[:, None]  # (B, 1, n+t, A)
        B, S, L, A = actions.shape
        n = visual.shape[1]
        assert visual.shape[0] == B and proprio.shape[:2] == (B, n) and L >= n, (
            f"rollout shapes disagree: visual {tuple(visual.shape)}, proprio {tuple(proprio.shape)}, "
            f"actions {tuple(actions.shape)}"
        )
        fast = (not self.training) if fast is None else fast
        # Embed the observed frames once per start state, then share them across the S candidates.
        z_obs = self.embed(visual, proprio, torch.zeros(B, n, A, dtype=actions.dtype, device=actions.device))
        z_obs = (
            z_obs[:, None].expand(B, S, *z_obs.shape[1:]).reshape(B * S, *z_obs.shape[1:])
        )  # (B*S, n, N', D')
        flat_actions = actions.reshape(B * S, L, A)  # (B*S, n+t, A)
        z = self.replace_actions(z_obs, flat_actions[:, :n])  # (B*S, n, N', D')
        predict_next = self._next_frame_fast() if fast else self._next_frame
        frames = [z]
        history = z
        for step in range(L - n):
            z_next = predict_next(history, n + step)  # (B*S, 1, N', D')
            z_next = self.replace_actions(z_next, flat_actions[:, n + step : n + step + 1])
            frames.append(z_next)
            history = torch.cat([history, z_next], dim=1)[:, -self.cfg.num_hist :]
        frames.append(predict_next(history, L))  # the frame after the last action
        z_all = torch.cat(frames, dim=1)  # (B*S, n+t+1, N', D')
        z_all = z_all.reshape(B, S, *z_all.shape[1:])  # (B, S, n+t+1, N', D')
        out = {"z": z_all, **self.split(z_all)}
        if squeeze:
            out = {k: v[:, 0] for k, v in out.items()}
        return out

    def _next_frame(self, history: torch.Tensor, total: int) -> torch.Tensor:
        """The reference step: the predictor on the last <= num_hist frames, its last frame kept."""
        return self.predict(history[:, -self.cfg.num_hist :])[:, -1:]  # (B, 1, N', D')

    def _next_frame_fast(self):
        """A stateful ``_next_frame`` for one rollout: history (B, T, N', D') of the ``total`` frames so
        far (the last <= num_hist of them) -> the next frame (B, 1, N', D'), as ``_next_frame``."""
        H = self.cfg.num_hist
        cache = [{} for _ in self.predictor.blocks]
        cached = 0  # frames whose keys/values are in cache (window starting at frame 0)

        def next_frame(history: torch.Tensor, total: int) -> torch.Tensor:
            nonlocal cached
            if total <= H:  # the window is all frames so far, from position 0: extend the cache
                out = self.predictor.forward_incremental(history[:, cached:total], cache)  # (B, 1, N', D')
                cached = total
            else:
                out = self.predictor.forward_last(history[:, -H:])  # (B, 1, N', D')
            return history[:, -1:] + self.delta_head(out) if self.cfg.predict_delta else out

        return next_frame
