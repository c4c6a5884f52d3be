"""Helpers shared by the training loops of this package (V, M, the tokenizer) and the CMA-ES controller."""

from __future__ import annotations

from pathlib import Path

import torch


def training_device(name) -> torch.device:
    """``None`` or ``auto`` = cuda when available, else cpu; or any torch device name."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def tensorboard(out: Path):
    """A SummaryWriter into ``out/tb``, or None when tensorboard is unusable (logging never stops a run)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tb"))
