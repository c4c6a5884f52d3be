"""The tiny world model the training tests share (seconds on a CPU): raw-pixel tokens of 32 px frames
in 8 px patches (16 tokens x 192) and a one-block predictor. Each test adds its own window and
training settings."""

from __future__ import annotations

TINY_MODEL = [
    "encoder=pixels",
    "encoder.input_size=32",
    "encoder.patch_size=8",
    "predictor.depth=1",
    "predictor.heads=2",
    "predictor.dim_head=8",
    "predictor.mlp_dim=32",
]
QUIET_CPU = ["progress=false", "device=cpu"]


# The smallest world model a plan test can use (4 tokens a frame, one history frame), and a plan of it
# that runs in a second: the keyed-result and budget-record tests plan through it.
PLAN_TEST_TRAIN = [
    "encoder=pixels", "encoder.input_size=32", "encoder.patch_size=16", "predictor.depth=1",
    "predictor.heads=2", "predictor.dim_head=8", "predictor.mlp_dim=16", "frameskip=2", "num_hist=1",
    "training.epochs=1", "training.batch_size=8", "training.max_steps_per_epoch=2", "training.val_batches=1",
    "training.rollout_eval_steps=1", "progress=false", "device=cpu",
]  # fmt: skip
TINY_PLAN = [
    "planner=mpc_cem", "planner.samples=4", "planner.topk=2", "planner.opt_steps=1", "n_evals=2", "goal_H=1",
    "max_steps=4", "n_videos=0", "progress=false", "device=cpu",
]  # fmt: skip


def train_config(settings: list[str], store, run_dir, *extra: str) -> dict:
    """The resolved ``wmlab train`` config of ``settings`` on ``store`` into ``run_dir`` (+ ``extra``)."""
    from omegaconf import OmegaConf

    from wmlab.config import compose

    overrides = [*settings, f"data={store.path}", f"run_dir={run_dir}", *extra]
    return OmegaConf.to_container(compose("train", overrides), resolve=True)
