"""Precision by measurement: ``precision=auto`` picks bf16 (or TF32 on CUDA) only where it pays here.

Whether bf16 is faster depends on the device, not on its type: a CPU with native bf16 (AVX512-BF16 /
AMX) ran DINO-WM's rollout 1.78x faster under bf16 autocast, CPUs without it 2-7x slower; GPUs
differ too. So ``resolve_precision("auto", device, ...)``:

1. times a micro-benchmark of the model's own shapes (``block_shapes``: one predictor block's
   matmuls and its attention on the full window) in fp32, under bf16 autocast and (CUDA) with TF32
   matmuls: a fraction of a second, cached per process, device and shapes;
2. for each lower precision at least ``MIN_SPEEDUP`` faster, fastest first, checks on a fixed probe
   (the caller's ``probe(precision) -> costs (B, K)``: e.g. a plan's cost_fn on K fixed candidates)
   that it agrees with fp32 (``agreement``: the same argmin per start state up to a near tie, and
   every cost within ``TOLERANCE`` of the fp32 cost range);
3. picks the first one that agrees, else fp32.

The returned dict (requested, chosen, reason, timings, speedups, agreement) goes into the run's or
plan's metadata. ``precision_context(chosen, device)`` applies the choice. ``fp32`` / ``bf16`` /
``tf32`` requested explicitly are used as they are (no measurement).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch

PRECISIONS = ("auto", "fp32", "bf16", "tf32")
#: A lower precision must be at least this much faster than fp32 to be picked.
MIN_SPEEDUP = 1.15
#: Agreement tolerance, as a fraction of the fp32 costs' range over the probe's candidates.
TOLERANCE = 0.02

_TIMING_CACHE: dict[tuple, dict] = {}


def check_precision(name: str) -> str:
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    return name


def precision_context(precision: str, device) -> contextlib.AbstractContextManager:
    """The context that runs code at ``precision`` (a resolved choice: fp32, bf16 or tf32)."""
    device = torch.device(device)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "tf32":
        return _tf32() if device.type == "cuda" else contextlib.nullcontext()
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"precision_context needs fp32, bf16 or tf32 (resolve 'auto' first), got {precision!r}")


@contextlib.contextmanager
def _tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def block_shapes(cfg) -> dict:
    """The micro-benchmark's shapes from a ``WorldModelConfig`` (or anything with ``num_tokens``,
    ``token_dim``, ``num_hist`` and ``predictor_config()``): rows = the full window's tokens."""
    p = cfg.predictor_config()
    return {
        "rows": int(cfg.num_hist * cfg.num_tokens),
        "dim": int(cfg.token_dim),
        "heads": int(p.heads),
        "dim_head": int(p.dim_head),
        "mlp_dim": int(p.mlp_dim),
    }


def _block_step(x, w_qkv, w_out, w_fc1, w_fc2, heads: int, dim_head: int) -> torch.Tensor:
    """One predictor block's matmuls and attention on x (b, L, D) -> (b, L, D)."""
    b, L, _ = x.shape
    q, k, v = torch.nn.functional.linear(x, w_qkv).chunk(3, dim=-1)  # each (b, L, H*Dh)
    q, k, v = (t.reshape(b, L, heads, dim_head).transpose(1, 2) for t in (q, k, v))  # (b, H, L, Dh)
    a = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # (b, H, L, Dh)
    x = x + torch.nn.functional.linear(a.transpose(1, 2).reshape(b, L, heads * dim_head), w_out)
    return x + torch.nn.functional.linear(
        torch.nn.functional.gelu(torch.nn.functional.linear(x, w_fc1)), w_fc2
    )


def measure_speed(device, shapes: dict, *, repeats: int = 3, batch: int | None = None) -> dict:
    """Best-of-``repeats`` seconds of ``_block_step`` at ``shapes`` per precision on ``device``:
    {"fp32": s, "bf16": s[, "tf32": s]}. Cached per process, device and shapes."""
    device = torch.device(device)
    batch = batch or (16 if device.type == "cuda" else 1)
    key = (str(device), tuple(sorted(shapes.items())), repeats, batch)
    if key in _TIMING_CACHE:
        return dict(_TIMING_CACHE[key])
    g = torch.Generator(device=device).manual_seed(0)
    D, inner, M = shapes["dim"], shapes["heads"] * shapes["dim_head"], shapes["mlp_dim"]

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device) / shape[-1] ** 0.5

    x = rand(batch, shapes["rows"], D)
    weights = (rand(3 * inner, D), rand(D, inner), rand(M, D), rand(D, M))
    variants = ["fp32", "bf16"] + (["tf32"] if device.type == "cuda" else [])
    timings = {}
    with torch.inference_mode():
        for name in variants:
            best = float("inf")
            with precision_context(name, device):
                for i in range(repeats + 1):  # the first call is the warm-up
                    _sync(device)
                    started = time.perf_counter()
                    _block_step(x, *weights, shapes["heads"], shapes["dim_head"])
                    _sync(device)
                    if i:
                        best = min(best, time.perf_counter() - started)
            timings[name] = best
    _TIMING_CACHE[key] = dict(timings)
    return timings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def agreement(reference: torch.Tensor, other: torch.Tensor, tolerance: float | None = None) -> dict:
    """Do costs (B, K) of K fixed candidates under a lower precision agree with fp32's?

    Per start state: ``regret`` = fp32 cost of the candidate the other precision ranks first minus
    the fp32 minimum, and ``max_diff`` = the largest |cost difference|, both divided by the fp32 costs'
    range over the K candidates (the scale on which a planner compares them). They agree when both
    are <= ``tolerance`` (default ``TOLERANCE``) for every start state (the same argmin, or a tie
    within tolerance)."""
    tolerance = TOLERANCE if tolerance is None else float(tolerance)
    reference, other = reference.detach().double().cpu(), other.detach().double().cpu()
    if reference.ndim == 1:
        reference, other = reference[None], other[None]
    assert reference.shape == other.shape and reference.shape[1] >= 2, (
        f"agreement needs costs (B, K >= 2) of equal shapes, got {tuple(reference.shape)}, "
        f"{tuple(other.shape)}"
    )
    spread = (reference.max(dim=1).values - reference.min(dim=1).values).clamp_min(1e-12)  # (B,)
    chosen = other.argmin(dim=1)  # (B,)
    regret = (reference.gather(1, chosen[:, None])[:, 0] - reference.min(dim=1).values) / spread  # (B,)
    max_diff = (other - reference).abs().max(dim=1).values / spread  # (B,)
    same_argmin = bool((chosen == reference.argmin(dim=1)).all())
    agree = bool((regret <= tolerance).all() and (max_diff <= tolerance).all())
    return {
        "agree": agree,
        "same_argmin": same_argmin,
        "max_regret": round(float(regret.max()), 6),
        "max_relative_cost_difference": round(float(max_diff.max()), 6),
        "tolerance": tolerance,
        "candidates": int(reference.shape[1]),
        "start_states": int(reference.shape[0]),
    }


def decide(
    timings: dict[str, float],
    agreements: dict[str, dict],
    *,
    min_speedup: float = MIN_SPEEDUP,
) -> tuple[str, str]:
    """(chosen precision, reason) from measured seconds per precision (``fp32`` required) and the
    agreement dicts of the lower precisions that were checked. Pure: the tests inject both."""
    base = timings["fp32"]
    faster = sorted(
        (name for name in timings if name != "fp32" and base / timings[name] >= min_speedup),
        key=lambda name: timings[name],
    )
    if not faster:
        best = max((base / t, n) for n, t in timings.items() if n != "fp32") if len(timings) > 1 else None
        detail = f" (best: {best[1]} at {best[0]:.2f}x)" if best else ""
        return "fp32", f"no lower precision is >= {min_speedup}x faster than fp32 here{detail}"
    for name in faster:
        check = agreements.get(name)
        if check is not None and check["agree"]:
            return name, f"{name} is {base / timings[name]:.2f}x faster than fp32 and its costs agree"
    rejected = ", ".join(f"{n} ({base / timings[n]:.2f}x)" for n in faster)
    return "fp32", f"faster precisions {rejected} do not agree with fp32 on the probe (or were not checked)"


def resolve_precision(
    requested: str,
    device,
    *,
    shapes: dict | None = None,
    probe: Callable[[str], torch.Tensor] | None = None,
    timings: dict[str, float] | None = None,
    min_speedup: float | None = None,
    tolerance: float | None = None,
) -> dict:
    """The precision to run at, with its evidence, as a dict for metadata.

    requested: fp32 / bf16 / tf32 (used as is) or auto (measured: see the module docstring).
    shapes: ``block_shapes(model_cfg)`` for the micro-benchmark (auto; unless ``timings`` is given).
    probe: ``probe(precision) -> costs (B, K)`` on a fixed candidate set (auto). Without a probe no
        lower precision can be checked, so auto stays at fp32.
    timings: seconds per precision, instead of measuring (tests inject fast / slow bf16).
    Returns {"requested", "chosen", "reason", "device", "timings_s", "speedup_over_fp32", "agreement"}.
    """
    check_precision(requested)
    min_speedup = MIN_SPEEDUP if min_speedup is None else float(min_speedup)
    device = torch.device(device)
    info = {"requested": requested, "device": str(device)}
    if requested != "auto":
        return {**info, "chosen": requested, "reason": "requested explicitly"}
    if timings is None:
        if shapes is None:
            raise ValueError("resolve_precision('auto'): pass shapes=block_shapes(model_cfg) or timings=")
        timings = measure_speed(device, shapes)
    speedups = {n: round(timings["fp32"] / t, 3) for n, t in timings.items() if n != "fp32"}
    agreements: dict[str, dict] = {}
    if probe is not None:
        candidates = [n for n, s in sorted(speedups.items(), key=lambda kv: -kv[1]) if s >= min_speedup]
        if candidates:
            reference = probe("fp32")
            for name in candidates:
                agreements[name] = agreement(reference, probe(name), tolerance)
                if agreements[name]["agree"]:
                    break  # the fastest agreeing one is chosen; no need to probe slower ones
    chosen, reason = decide(timings, agreements, min_speedup=min_speedup)
    return {
        **info,
        "chosen": chosen,
        "reason": reason,
        "timings_s": {n: round(t, 6) for n, t in timings.items()},
        "speedup_over_fp32": speedups,
        "min_speedup": min_speedup,
        "agreement": agreements,
    }
