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
