"""This machine's measured matmul peak (GFLOP/s), fp32 and bf16, the yardstick for model throughput.

    python benchmarks/matmul_peak.py [--size 2048] [--repeats 5]

Times square ``size x size`` matmuls in three memory layouts (``a @ b``, ``a @ b.T`` as in
``nn.Linear``, ``a.T @ b``) and keeps the best of ``repeats`` calls of each; the peak is the best
layout. Sizes double from 256 up to ``--size`` while the next size's repeats are predicted to fit
in ``--max-seconds`` (CPUs without native bf16 run some bf16 layouts at ~1 GFLOP/s: 2048^3 would
take a minute a call); the size actually used is reported. Prints one JSON object.
``rollout.py`` imports ``matmul_peak`` to measure the peak in the same run as its throughput.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

LAYOUTS = {
    "a@b": lambda a, b: a @ b,
    "a@b.T": lambda a, b: a @ b.T,
    "a.T@b": lambda a, b: a.T @ b,
}


def _best_seconds(fn, a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn(a, b)
        best = min(best, time.perf_counter() - started)
    return best


def matmul_gflops(dtype: torch.dtype, size: int, layout: str, repeats: int, max_seconds: float) -> dict:
    """Best GFLOP/s of one layout at ``size``, or at the largest size (doubling from 256) whose
    ``repeats`` calls are predicted to fit in ``max_seconds``."""
    fn, n = LAYOUTS[layout], min(256, size)
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        first = _best_seconds(fn, a, b, 1)  # also the warm-up
        if n < size and first * 8 * repeats <= max_seconds:  # the next size costs ~8x more
            n *= 2
            continue
        seconds = min(first, _best_seconds(fn, a, b, repeats))
        return {"size": n, "gflops": round(2 * n**3 / seconds / 1e9, 2)}


def matmul_peak(size: int = 2048, repeats: int = 5, max_seconds: float = 3.0) -> dict:
    """{"fp32": {"peak_gflops", layouts...}, "bf16": {...}}: the best layout is the dtype's peak."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with torch.inference_mode():
            layouts = {k: matmul_gflops(dtype, size, k, repeats, max_seconds) for k in LAYOUTS}
        out[name] = {"peak_gflops": max(v["gflops"] for v in layouts.values()), "layouts": layouts}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=2048, help="square matmul size")
    parser.add_argument("--repeats", type=int, default=5, help="calls per layout; the best one counts")
    parser.add_argument("--max-seconds", type=float, default=3.0, help="time budget per layout")
    args = parser.parse_args()
    started = time.perf_counter()
    result = {
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    result.update(matmul_peak(args.size, args.repeats, args.max_seconds))
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
