"""DINO-WM's own CEM planner vs wmlab's, in one run, on the same weights and the same random draws.

    python benchmarks/dino_wm_planner.py --dino-wm-repo /path/to/dino_wm [--samples 64] [--opt-steps 3]
                                         [--episodes 1 2] [--image-size 98] [--repeats 2]

Needs a checkout of github.com/gaoyuezhou/dino_wm (only its ``models/``, ``planning/``,
``preprocessor.py`` are imported) and ``einops`` (``pip install einops``). torchvision is not importable
beside torch 2.13 here, so ``torchvision.transforms`` is replaced by a stand-in whose ``Resize`` is the
identity on frames already at the encoder's size (the only case this benchmark feeds it); DINO-WM's
``utils.move_to_device`` (its module also imports psutil) is given the same 4-line meaning.

Setting (issue 15): a DINOv2-ViT-S/14-shaped encoder with random weights (transformers ``Dinov2Model``,
one instance shared by both sides), frames of ``image-size`` px (98 -> 7 x 7 = 49 patches), DINO-WM's
predictor (ViTPredictor depth 6, 16 heads x 64, MLP 2048, token width 384 + 10 + 10), num_hist 3,
concat_dim 1, PointMaze's model-step actions (2 x frameskip 5 = 10), CEM with ``samples`` x
``opt-steps``, horizon 5, topk = samples / 10, last-frame MSE objective (alpha 0: DINO-WM's PointMaze).

How the two are made identical. DINO-WM's modules are built with its own code, saved with
``torch.save`` in its checkpoint format and imported through ``wmlab``'s restricted unpickler
(``convert_dino_wm_run``: the path a user's checkpoint takes), so both plan with the same predictor and
embeddings. Both CEMs use the same noise (DINO-WM's ``torch.randn`` calls are served from the
(B, S, T, A) draws wmlab's CEM makes from a generator seeded 0, see ``_SameNoise``), so with equal
costs they choose the same elites: the benchmark reports the largest relative difference of the two
sides' costs on fixed candidates, the largest difference between the final plans and whether they
agree.

What is timed: one ``plan`` call each. DINO-WM's CEM loops over episodes and, in every iteration,
re-encodes the start image once per candidate (its rollout takes images); wmlab encodes start and goal
once and scores all episodes' candidates in one batched rollout (KV cache for the growing window).
Rounds alternate the order; the fastest round of each is kept (this machine is noisy).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

VIT_S = dict(hidden=384, layers=12, heads=6, patch=14, mlp_ratio=4)
DINO_WM_PREDICTOR = dict(depth=6, heads=16, dim_head=64, mlp_dim=2048, dropout=0.1, emb_dropout=0.0)
ACTION_DIM, PROPRIO_DIM, EMB = 10, 4, 10  # model-step action (2 x frameskip 5), state, embedding widths
NUM_HIST, HORIZON = 3, 5


def _stub_torchvision() -> None:
    """A ``torchvision.transforms`` with Compose and a Resize that must not resize (see the docstring)."""
    if "torchvision" in sys.modules:
        return

    class Compose:
        def __init__(self, transforms):
            self.transforms = list(transforms)

        def __call__(self, x):
            for t in self.transforms:
                x = t(x)
            return x

    class Resize:
        def __init__(self, size):
            self.size = int(size)

        def __call__(self, x):
            if tuple(x.shape[-2:]) != (self.size, self.size):
                raise ValueError(
                    f"benchmark stand-in Resize: frames are {tuple(x.shape[-2:])}, not {self.size}"
                )
            return x

    transforms = types.ModuleType("torchvision.transforms")
    transforms.Compose, transforms.Resize = Compose, Resize
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms = transforms
    sys.modules["torchvision"], sys.modules["torchvision.transforms"] = torchvision, transforms


def _stub_utils() -> None:
    def move_to_device(dct, device):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dct.items()}

    utils = types.ModuleType("utils")
    utils.move_to_device = move_to_device
    sys.modules["utils"] = utils


def import_dino_wm(repo: Path) -> dict:
    """DINO-WM's classes from its checkout: {"ViTPredictor", "ProprioceptiveEmbedding", "VWorldModel",
    "CEMPlanner", "create_objective_fn", "Preprocessor"}."""
    if not (repo / "models" / "vit.py").is_file() or not (repo / "planning" / "cem.py").is_file():
        raise SystemExit(f"{repo} is not a DINO-WM checkout (no models/vit.py, planning/cem.py)")
    try:
        import einops  # noqa: F401
    except ImportError:
        raise SystemExit("DINO-WM's code needs einops: pip install einops") from None
    _stub_torchvision()
    _stub_utils()
    sys.path.insert(0, str(repo))
    from models.proprio import ProprioceptiveEmbedding
    from models.visual_world_model import VWorldModel
    from models.vit import ViTPredictor
    from planning.cem import CEMPlanner
    from planning.objectives import create_objective_fn
    from preprocessor import Preprocessor

    return {"ViTPredictor": ViTPredictor, "ProprioceptiveEmbedding": ProprioceptiveEmbedding,
            "VWorldModel": VWorldModel, "CEMPlanner": CEMPlanner,
            "create_objective_fn": create_objective_fn, "Preprocessor": Preprocessor}  # fmt: skip


@contextlib.contextmanager
def _mask_on_cpu():
    """DINO-WM's Attention builds its block-causal mask with ``.to('cuda')``; without CUDA, keep it on
    the CPU (the only change to its code's behaviour; the mask's values are its own)."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and args[0] == "cuda":
            args = ("cpu", *args[1:])
        return original(self, *args, **kwargs)

    torch.Tensor.to = to
    try:
        yield
    finally:
        torch.Tensor.to = original


class PatchEncoder(torch.nn.Module):
    """DINO-WM's encoder interface (``name``, ``emb_dim``, ``patch_size``, ``latent_ndim``; forward of
    normalised images (B, 3, H, W) -> patch tokens (B, P, D)) over a transformers Dinov2Model."""

    name = "dinov2_vits14"  # DINO-WM resizes inputs of encoders whose name contains "dino"

    def __init__(self, model) -> None:
        super().__init__()
        self.model, self.emb_dim, self.patch_size, self.latent_ndim = (
            model,
            VIT_S["hidden"],
            VIT_S["patch"],
            2,
        )

    def forward(self, x):
        return self.model(pixel_values=x).last_hidden_state[:, 1:]  # after the final LayerNorm, no CLS


def build(image_size: int, dwm: dict, workdir: Path):
    """(DINO-WM world model, wmlab world model with the same weights, the shared ViT)."""
    from transformers import Dinov2Config, Dinov2Model

    from wmlab.models.dino_wm_checkpoint import convert_dino_wm_run
    from wmlab.models.world_model import LatentWorldModel

    torch.manual_seed(0)
    vit = Dinov2Model(Dinov2Config(
        hidden_size=VIT_S["hidden"], num_hidden_layers=VIT_S["layers"], num_attention_heads=VIT_S["heads"],
        mlp_ratio=VIT_S["mlp_ratio"], patch_size=VIT_S["patch"], image_size=image_size, layer_norm_eps=1e-6,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )).eval()  # fmt: skip
    patches = (image_size // VIT_S["patch"]) ** 2
    p = DINO_WM_PREDICTOR
    with _mask_on_cpu():
        predictor = dwm["ViTPredictor"](
            num_patches=patches, num_frames=NUM_HIST, dim=VIT_S["hidden"] + 2 * EMB, depth=p["depth"],
            heads=p["heads"], mlp_dim=p["mlp_dim"], dim_head=p["dim_head"], dropout=p["dropout"],
            emb_dropout=p["emb_dropout"], pool="mean",
        )  # fmt: skip
    embedding = dwm["ProprioceptiveEmbedding"]
    side = image_size // VIT_S["patch"]
    with contextlib.redirect_stdout(io.StringIO()):  # its constructors print their settings
        action_encoder = embedding(num_frames=1, tubelet_size=1, in_chans=ACTION_DIM, emb_dim=EMB)
        proprio_encoder = embedding(num_frames=1, tubelet_size=1, in_chans=PROPRIO_DIM, emb_dim=EMB)
        # DINO-WM resizes to (image_size // 16) * patch: 16 * side gives frames at the ViT's own size.
        wm = dwm["VWorldModel"](
            image_size=16 * side, num_hist=NUM_HIST, num_pred=1, encoder=PatchEncoder(vit),
            proprio_encoder=proprio_encoder, action_encoder=action_encoder, decoder=None, predictor=predictor,
            proprio_dim=EMB, action_dim=EMB, concat_dim=1, num_action_repeat=1, num_proprio_repeat=1,
            train_encoder=False, train_predictor=False, train_decoder=False,
        )  # fmt: skip
    wm.eval()  # (its eval() returns None)

    # DINO-WM's checkpoint format (whole pickled modules) + hydra.yaml, imported as a user's would be.
    run = workdir / "outputs" / "bench"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 1, "predictor": predictor, "action_encoder": action_encoder,
                "proprio_encoder": proprio_encoder}, run / "checkpoints" / "model_latest.pth")  # fmt: skip
    (run / "hydra.yaml").write_text(
        f"frameskip: 5\nconcat_dim: 1\nnum_hist: {NUM_HIST}\nnum_pred: 1\nnum_action_repeat: 1\n"
        "num_proprio_repeat: 1\nimg_size: 224\n"
        "encoder: {name: dinov2_vits14, feature_key: x_norm_patchtokens}\n"
        f"predictor: {{heads: {p['heads']}, dropout: {p['dropout']}, emb_dropout: {p['emb_dropout']}}}\n"
    )
    converted = convert_dino_wm_run(run)
    ours = LatentWorldModel(converted["config"])
    ours.load_state_dict(converted["state"])
    return wm, ours.eval(), vit


def wmlab_encoder(vit, image_size: int):
    from wmlab.encoders.dinov2 import NORMS, HFViTEncoder
    from wmlab.encoders.weights import ResolvedWeights

    mean, std = NORMS["dino_wm"]
    resolved = ResolvedWeights(path=Path("."), source="random", sha256="random")
    return HFViTEncoder(
        vit, name="dinov2_patch_random", output="patch", input_size=image_size, patch_size=VIT_S["patch"],
        num_registers=0, mean=mean, std=std, resolved=resolved, extra={},
    ).eval()  # fmt: skip


def inputs(episodes: int, image_size: int):
    g = np.random.default_rng(0)
    frames = g.integers(0, 256, (2, episodes, 1, image_size, image_size, 3), dtype=np.uint8)  # start, goal
    proprio = g.normal(size=(2, episodes, 1, PROPRIO_DIM)).astype(np.float32)
    return [{"visual": frames[i], "proprio": proprio[i]} for i in (0, 1)]


def plan_dino_wm(wm, dwm, obs_0, obs_g, args) -> tuple[torch.Tensor, float]:
    class NoLogging:
        def log(self, *_args, **_kwargs):
            pass

    preprocessor = dwm["Preprocessor"](
        action_mean=torch.zeros(ACTION_DIM), action_std=torch.ones(ACTION_DIM),
        state_mean=torch.zeros(PROPRIO_DIM), state_std=torch.ones(PROPRIO_DIM),
        proprio_mean=torch.zeros(PROPRIO_DIM), proprio_std=torch.ones(PROPRIO_DIM),
        transform=lambda x: (x - 0.5) / 0.5,  # DINO-WM's dataset normalisation
    )  # fmt: skip
    planner = dwm["CEMPlanner"](
        horizon=HORIZON, topk=args.topk, num_samples=args.samples, var_scale=1.0, opt_steps=args.opt_steps,
        eval_every=1, wm=wm, action_dim=ACTION_DIM, objective_fn=dwm["create_objective_fn"](0.0, 2, "last"),
        preprocessor=preprocessor, evaluator=None, wandb_run=NoLogging(), log_filename=None,
    )  # fmt: skip
    cem_module = sys.modules[type(planner).__module__]
    cem_module.torch = _SameNoise(len(obs_0["visual"]), args.samples)
    try:
        started = time.perf_counter()
        mu, _ = planner.plan(obs_0, obs_g)
        return mu.detach(), time.perf_counter() - started
    finally:
        cem_module.torch = torch


class _SameNoise(types.ModuleType):
    """``torch`` for DINO-WM's cem.py whose ``randn`` serves wmlab CEM's noise: wmlab draws
    (B, S, T, A) per iteration from a generator seeded 0, DINO-WM one (S, T, A) per episode in the same
    order; a CPU ``randn`` of B x S x T x A numbers is not B draws of S x T x A concatenated (the normal
    kernel fills in blocks of 16), so without this the two would plan on different noise."""

    def __init__(self, episodes: int, samples: int) -> None:
        super().__init__("torch")
        self._episodes, self._samples, self._queue = episodes, samples, []
        self._gen = torch.Generator().manual_seed(0)  # as wmlab's Planner(seed=0)

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn(self, *shape, **kwargs):
        if not self._queue:  # a new iteration: wmlab's draw for all episodes at once
            block = torch.randn(self._episodes, *shape, generator=self._gen, **kwargs)
            self._queue = list(block.unbind(0))
        return self._queue.pop(0)


def plan_wmlab(model, encoder, obs_0, obs_g, args) -> tuple[torch.Tensor, float]:
    from wmlab.planning import make_planner
    from wmlab.planning.objectives import Objective, rollout_cost_fn

    started = time.perf_counter()
    with torch.no_grad():
        visual = encoder.encode(torch.as_tensor(obs_0["visual"][:, 0])).float()[:, None]  # (B, 1, N, D)
        goal = encoder.encode(torch.as_tensor(obs_g["visual"][:, 0])).float()  # (B, N, D)
    proprio, goal_proprio = torch.as_tensor(obs_0["proprio"]), torch.as_tensor(obs_g["proprio"][:, 0])
    cost_fn = rollout_cost_fn(model, visual, proprio, goal, goal_proprio, Objective("last", "mse", alpha=0.0))
    planner = make_planner("cem", samples=args.samples, topk=args.topk, opt_steps=args.opt_steps,
                           var_scale=1.0, select="mean", seed=0)  # fmt: skip
    result = planner.plan(cost_fn, torch.zeros(len(visual), HORIZON, ACTION_DIM))
    return result.actions.detach(), time.perf_counter() - started


def cost_agreement(wm, dwm, model, encoder, obs_0, obs_g, candidates: int = 8) -> float:
    """Largest |DINO-WM cost - wmlab cost| / largest |cost| over fixed candidates (B, K, T, A) scored by
    both (DINO-WM's rollout on images repeated per candidate, as its CEM does; wmlab's rollout_cost_fn)."""
    from einops import repeat

    from wmlab.planning.objectives import Objective, rollout_cost_fn

    B = len(obs_0["visual"])
    g = torch.Generator().manual_seed(1)
    actions = torch.randn(B, candidates, HORIZON, ACTION_DIM, generator=g)
    objective = dwm["create_objective_fn"](0.0, 2, "last")
    theirs = []
    with torch.no_grad():
        for b in range(B):
            visual = torch.as_tensor(obs_0["visual"][b : b + 1]).permute(0, 1, 4, 2, 3) / 255.0  # (1,1,3,H,W)
            obs = {
                "visual": repeat((visual - 0.5) / 0.5, "1 ... -> n ...", n=candidates),
                "proprio": repeat(
                    torch.as_tensor(obs_0["proprio"][b : b + 1]), "1 ... -> n ...", n=candidates
                ),
            }
            goal_visual = torch.as_tensor(obs_g["visual"][b : b + 1]).permute(0, 1, 4, 2, 3) / 255.0
            goal = wm.encode_obs(
                {"visual": (goal_visual - 0.5) / 0.5, "proprio": torch.as_tensor(obs_g["proprio"][b : b + 1])}
            )
            goal = {k: repeat(v, "1 ... -> n ...", n=candidates) for k, v in goal.items()}
            z_obses, _ = wm.rollout(obs_0=obs, act=actions[b])
            theirs.append(objective(z_obses, goal))  # (K,)
        visual = encoder.encode(torch.as_tensor(obs_0["visual"][:, 0])).float()[:, None]
        goal = encoder.encode(torch.as_tensor(obs_g["visual"][:, 0])).float()
        ours = rollout_cost_fn(
            model,
            visual,
            torch.as_tensor(obs_0["proprio"]),
            goal,
            torch.as_tensor(obs_g["proprio"][:, 0]),
            Objective("last", "mse"),
        )(actions)
    theirs = torch.stack(theirs)  # (B, K)
    return float((theirs - ours).abs().max() / theirs.abs().max())  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dino-wm-repo", default=os.environ.get("DINO_WM_REPO"))
    parser.add_argument("--image-size", type=int, default=98)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--opt-steps", type=int, default=3)
    parser.add_argument("--episodes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if not args.dino_wm_repo:
        raise SystemExit(
            "pass --dino-wm-repo <checkout of github.com/gaoyuezhou/dino_wm> (or set DINO_WM_REPO)"
        )
    args.topk = max(2, args.samples // 10)
    if args.threads:
        torch.set_num_threads(args.threads)
    # transformers probes for torchvision at import: import it (and wmlab's encoders) before the stand-in.
    import transformers  # noqa: F401

    import wmlab.encoders.dinov2  # noqa: F401

    dwm = import_dino_wm(Path(args.dino_wm_repo))
    with tempfile.TemporaryDirectory() as tmp:
        wm, ours, vit = build(args.image_size, dwm, Path(tmp))
    encoder = wmlab_encoder(vit, args.image_size)
    rows = []
    for episodes in args.episodes:
        obs_0, obs_g = inputs(episodes, args.image_size)
        best = {"dino_wm": float("inf"), "wmlab": float("inf")}
        plans = {}
        for round_ in range(args.repeats):
            order = ("dino_wm", "wmlab") if round_ % 2 == 0 else ("wmlab", "dino_wm")
            for name in order:
                if name == "dino_wm":
                    plans[name], seconds = plan_dino_wm(wm, dwm, obs_0, obs_g, args)
                else:
                    plans[name], seconds = plan_wmlab(ours, encoder, obs_0, obs_g, args)
                best[name] = min(best[name], seconds)
        diff = float((plans["dino_wm"] - plans["wmlab"]).abs().max())
        cost_difference = cost_agreement(wm, dwm, ours, encoder, obs_0, obs_g)
        rows.append({
            "episodes": episodes,
            "dino_wm_seconds_per_plan": round(best["dino_wm"], 2),
            "wmlab_seconds_per_plan": round(best["wmlab"], 2),
            "dino_wm_seconds_per_episode": round(best["dino_wm"] / episodes, 2),
            "wmlab_seconds_per_episode": round(best["wmlab"] / episodes, 2),
            "speedup_per_episode": round(best["dino_wm"] / best["wmlab"], 2),
            "max_relative_cost_difference": cost_difference,  # same candidates scored by both
            "max_abs_plan_difference": diff,
            # Equal costs make equal plans unless two candidates' costs tie to rounding (then the elite
            # sets may differ): a random-weight model scores candidates alike, so ties happen at tiny sizes.
            "plans_agree": diff < 1e-3,
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({
        "setting": {"image_size": args.image_size, "patches": (args.image_size // VIT_S["patch"]) ** 2,
                    "samples": args.samples, "topk": args.topk, "opt_steps": args.opt_steps,
                    "horizon": HORIZON,
                    "predictor": DINO_WM_PREDICTOR, "threads": torch.get_num_threads(), "precision": "fp32"},
        "results": rows,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
