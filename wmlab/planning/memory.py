"""How many candidate sequences one world-model rollout call may take: a memory budget, in bytes.

A plan scores B start states x S candidates (DINO-WM's PointMaze MPC: 50 x 300 = 15,000 sequences
of 196 x 404 tokens); all at once that is far more than any device holds. ``rollout_cost_fn`` splits
the B * S rows into chunks of ``auto_chunk`` rows, each row costing ``rollout_bytes_per_sequence``.

The estimate counts what is alive at the peak of one sequence's fast eval rollout
(``LatentWorldModel.rollout``): the frames kept for the output and their final concatenation, the
sliding history, every block's cached keys and values (the KV cache of the growing window), and the
largest transient of one block on the full window (attention: LayerNorm output, fused qkv, the
contiguous q/k/v SDPA makes, its output and reshape; MLP: LayerNorm output, fc1 and GELU outputs).
No L x L attention scores: SDPA's CPU kernel and the CUDA fused kernels never materialise them
(``tests/test_planning_memory.py`` measures the peak). Under autograd (the GD planner) every
call's activations are kept for the backward pass, so the per-block transient is counted for every
block of every call. Elements are counted at 4 bytes (fp32; bf16 autocast keeps fp32 residuals).

The default budget fits the device with headroom: on CUDA 80% of the free memory, capped at
``CUDA_CAP_BYTES`` (larger chunks do not run faster on a GPU, and the cap keeps DINO-WM's MPC under
24 GB); on CPU a quarter of the available RAM (MemAvailable), capped at ``CPU_CAP_BYTES``.
"""

from __future__ import annotations

import os

import torch

#: Fraction of free CUDA memory a plan may use, and a cap in bytes.
CUDA_FRACTION, CUDA_CAP_BYTES = 0.8, 16 * 2**30
#: Fraction of available RAM a plan may use on CPU, and a cap in bytes.
CPU_FRACTION, CPU_CAP_BYTES = 0.25, 8 * 2**30
#: Multiplier on the estimate for allocator fragmentation and small tensors not counted.
SAFETY = 1.25
ELEMENT_BYTES = 4


def rollout_bytes_per_sequence(cfg, n: int, T: int, *, grad: bool = False) -> int:
    """Peak bytes one candidate sequence adds to a rollout: cfg a ``WorldModelConfig``, n observed
    frames, T planned model steps (T predictor calls + 1). ``grad``: activations kept for backward."""
    p = cfg.predictor_config()
    N, D, H, depth = cfg.num_tokens, cfg.token_dim, cfg.num_hist, p.depth
    inner = p.heads * p.dim_head
    frames = n + T + 1
    L = min(frames, H) * N  # rows of the largest predictor window
    kept = 2 * frames * N * D + 2 * H * N * D  # frames list + their concatenation, history (+ its cat)
    kv_cache = depth * 2 * L * inner
    attention = L * (D + 3 * inner + 3 * inner + 2 * inner)
    mlp = L * (D + 2 * p.mlp_dim)
    residual = 2 * L * D
    transient = max(attention, mlp) + residual
    if grad:  # every block of every call keeps its activations for the backward pass
        transient = depth * _rows_processed(n, T, H, N) * (attention + mlp + residual) // L
    return int(SAFETY * ELEMENT_BYTES * (kept + kv_cache + transient))


def available_bytes(device) -> int:
    """Memory free on ``device`` now: CUDA free memory, or the host's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def default_budget(device) -> int:
    """The default memory budget of one rollout call on ``device`` (see the module docstring)."""
    device = torch.device(device)
    free = available_bytes(device)
    if device.type == "cuda":
        return int(min(CUDA_FRACTION * free, CUDA_CAP_BYTES))
    return int(min(CPU_FRACTION * free, CPU_CAP_BYTES))


def auto_chunk(cfg, n: int, T: int, rows: int, *, budget: int, grad: bool = False) -> int:
    """Sequences per rollout call (1..rows) so that one call's estimated peak fits ``budget`` bytes.
    A budget below one sequence still runs one at a time (the smallest possible call)."""
    if budget <= 0:
        raise ValueError(f"planning memory budget must be > 0 bytes, got {budget}")
    per_row = rollout_bytes_per_sequence(cfg, n, T, grad=grad)
    return int(max(1, min(rows, budget // per_row)))


def _rows_processed(n: int, T: int, H: int, N: int) -> int:
    """Token rows one sequence's fast rollout runs through a block, summed over its T + 1 calls: a
    new frame's N rows while the window grows (KV cache), the full H * N once it slides."""
    return sum(N if n + k <= H else H * N for k in range(T + 1))
